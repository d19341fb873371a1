//! The whole path once: real daemon process, real HTTP(S) server on loopback, real client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use dlsession::{DownloadRequest, ErrorCode, Session};
use dlsession_testkit::app::config;
use dlsession_testkit::{DEFAULT_LAST_MODIFIED, LONG, Recorder, Seen};
use dlsession_testkit::{
    Fault, Hits, Resource, TestCa, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_download_is_byte_exact() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a.bin", Resource::generated(3 << 20, 7));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "test.basic"), delegate).await.unwrap();
    let task = session.download_task(DownloadRequest::new(server.url("/a.bin"))).await.unwrap();
    assert_eq!(task.info().await.unwrap().state, dlsession::TaskState::Suspended, "new tasks start suspended");
    task.resume().await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let file = events.moved_to(task.id()).expect("finished_downloading came before completed");
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(7, 3 << 20)));
    // Progress reached the full size.
    assert!(
        events
            .seen
            .iter()
            .any(|e| matches!(e, Seen::Progress { task: t, total } if *t == task.id() && *total == 3 << 20))
    );
}

/// A daemon that trusts a new test CA, and an HTTPS server (HTTP/2 by ALPN) with its
/// certificate.
async fn over_tls() -> (TestEnv, TestDaemon, TestServer) {
    let env = TestEnv::new();
    let ca = TestCa::new().unwrap();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let daemon = TestDaemon::start(&env);
    let server = TestServer::start_tls(&ca).await.unwrap();
    (env, daemon, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_download_over_h2_with_test_ca() {
    let (env, _daemon, server) = over_tls().await;
    server.add("/b.bin", Resource::generated(5 << 20, 11));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "test.https"), delegate).await.unwrap();
    let task = session.download_task(DownloadRequest::new(server.url("/b.bin"))).await.unwrap();
    task.resume().await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(11, 5 << 20)));
    let versions: Vec<_> = server.requests_for("/b.bin").iter().map(|r| r.version).collect();
    assert_eq!(versions, vec![http::Version::HTTP_2], "ALPN negotiated HTTP/2");
}

/// An HTTP/2 body of unknown length that a reset cut short is not a complete file, whatever
/// the reset's reason: hyper ends a body reset with `NO_ERROR` as if it had ended, and the
/// first 1 MiB of 4 was taken for the whole file. Now the attempt fails and the next resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_body_cut_by_a_graceful_reset_is_not_taken_for_complete() {
    let (env, _daemon, server) = over_tls().await;
    let len = 4u64 << 20;
    server.add(
        "/cut.bin",
        Resource::generated(len, 15).no_content_length().fault(Hits::Nth(1), Fault::GracefulResetAfter(1 << 20)),
    );
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "test.h2-graceful-reset"), delegate).await.unwrap();
    let task = session.download_task(DownloadRequest::new(server.url("/cut.bin"))).await.unwrap();
    task.resume().await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(15, len)));
    let requests = server.requests_for("/cut.bin");
    assert_eq!(requests.iter().map(|r| r.version).collect::<Vec<_>>(), [http::Version::HTTP_2; 2], "{requests:?}");
    assert!(requests[1].range.is_some(), "the second request resumed after the kept bytes: {requests:?}");
}

/// A response head over HTTP/2 is taken up to the size HTTP/1.1's is (1 MiB), not h2's
/// default of 16 KiB: a 40 KB head (large cookies, a long policy header) downloads as it
/// would over HTTP/1.1. Before, h2 reset the stream and the task retried for days.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_response_head_over_h2_is_taken_as_over_h1() {
    let (env, _daemon, server) = over_tls().await;
    server.add("/padded.bin", Resource::generated(100_000, 13).fault(Hits::All, Fault::HugeHeaders(40_000)));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "test.h2-head"), delegate).await.unwrap();
    let task = session.download_task(DownloadRequest::new(server.url("/padded.bin"))).await.unwrap();
    task.resume().await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(13, 100_000)));
    let versions: Vec<_> = server.requests_for("/padded.bin").iter().map(|r| r.version).collect();
    assert_eq!(versions, vec![http::Version::HTTP_2], "over HTTP/2, once");
    // One far larger than any real one fails as over HTTP/1.1: at once, not retried.
    server.add("/huge.bin", Resource::generated(1000, 14).fault(Hits::All, Fault::HugeHeaders(2 << 20)));
    let task = session.download_task(DownloadRequest::new(server.url("/huge.bin"))).await.unwrap();
    task.resume().await.unwrap();
    let error = events.completion(task.id(), LONG).await.expect("fails");
    assert_eq!(error.code, ErrorCode::Network, "{error}");
    assert_eq!(server.hits("/huge.bin"), 1, "not retried: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_completes_with_http_status_and_no_file() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "test.404"), delegate).await.unwrap();
    let dest = env.path().join("never.bin");
    let task = session.download_task(DownloadRequest::new(server.url("/missing")).destination(&dest)).await.unwrap();
    task.resume().await.unwrap();
    let error = events.completion(task.id(), LONG).await.expect("an error");
    assert_eq!(error.code, ErrorCode::HttpStatus);
    assert_eq!(error.http_status, Some(404));
    assert!(!events.seen.iter().any(|e| matches!(e, Seen::Finished { .. })), "no file is delivered");
    assert!(!dest.exists(), "the error page is never written to the destination");
    assert_eq!(server.hits("/missing"), 1, "404 is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_still_give_a_byte_exact_file() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    // Reset mid-body, then 503 with Retry-After, then fine: resumes with Range.
    server.add(
        "/flaky.bin",
        Resource::generated(len, 21)
            .fault(Hits::Nth(1), Fault::ResetAfter(1 << 20))
            .fault(Hits::Nth(2), Fault::Status { code: 503, retry_after: Some("1".into()) }),
    );
    // Ignores Range after a drop: must restart from zero, never splice.
    server
        .add("/norange.bin", Resource::generated(len, 22).no_ranges().fault(Hits::Nth(1), Fault::ResetAfter(1 << 20)));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "test.faults"), delegate).await.unwrap();
    let tasks = session
        .download_tasks(
            vec![DownloadRequest::new(server.url("/flaky.bin")), DownloadRequest::new(server.url("/norange.bin"))],
            true,
        )
        .await
        .unwrap();
    for t in &tasks {
        assert_eq!(events.completion(t.id(), LONG).await, None);
    }
    assert_eq!(sha256_file(&events.moved_to(tasks[0].id()).unwrap()).unwrap(), to_hex(&pattern_sha256(21, len)));
    assert_eq!(sha256_file(&events.moved_to(tasks[1].id()).unwrap()).unwrap(), to_hex(&pattern_sha256(22, len)));

    let flaky = server.requests_for("/flaky.bin");
    assert_eq!(flaky.len(), 3, "reset, 503, then success: {flaky:?}");
    let last = flaky.last().unwrap();
    let range = last.range.as_deref().expect("the final attempt resumes with Range");
    assert_ne!(range, "bytes=0-");
    assert!(last.if_range.is_some(), "with If-Range");
    // Resumed events say where each transfer restarted.
    assert!(
        events
            .seen
            .iter()
            .any(|e| matches!(e, Seen::Resumed { task, offset } if *task == tasks[0].id() && *offset > 0))
    );
    assert!(events.seen.iter().any(|e| matches!(e, Seen::Resumed { task, offset: 0 } if *task == tasks[1].id())));
}

/// A resource that changed while its download was paused, on a server that honours
/// `If-Range` by its `Last-Modified` only and sends the new version's range without an
/// `ETag`: the 206 lacks the validator `If-Range` carried, so the download starts over
/// instead of splicing the new bytes onto the old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_without_the_validator_it_was_asked_with_is_not_spliced() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    // The first version has an ETag and no Last-Modified.
    let old_etag = "\"v1\"";
    let v1 = Resource::generated(len, 25).no_validators().etag(old_etag).throttle(2 << 20);
    server.add("/v.bin", v1);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.splice"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/v.bin"))], true).await.unwrap().remove(0);
    events.wait("1 MiB", LONG, |e| matches!(e, Seen::Progress { total, .. } if *total >= 1 << 20)).await;
    task.suspend().await.unwrap();
    // A new version, no ETag, a Last-Modified that happens to equal the old ETag: the test
    // server takes `If-Range: <old ETag>` as matching it and answers with a range.
    server.add("/v.bin", Resource::generated(len, 26).no_validators().last_modified(old_etag));
    task.resume().await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(26, len)));
    let resumed = server.requests_for("/v.bin");
    assert!(resumed.iter().any(|r| r.range.is_some()), "the resume asked for a range: {resumed:?}");
}

/// A resource known by its `Last-Modified` alone resumes even when the 206 leaves that
/// header out (RFC 9110 asks a 206 for its `ETag`, not its `Last-Modified`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_without_last_modified_still_resumes_a_resource_known_by_its_date() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    let dated = Resource::generated(len, 29).no_validators().last_modified("Tue, 01 Dec 2026 10:00:00 GMT");
    server.add(
        "/dated.bin",
        dated.fault(Hits::Nth(1), Fault::ResetAfter(1 << 20)).fault(Hits::Nth(2), Fault::NoLastModified),
    );
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.dated"), delegate).await.unwrap();
    let task =
        session.download_tasks(vec![DownloadRequest::new(server.url("/dated.bin"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(29, len)));
    let requests = server.requests_for("/dated.bin");
    assert_eq!(requests.len(), 2, "one resume, not a restart: {requests:?}");
    assert!(requests[1].range.as_deref().is_some_and(|r| r != "bytes=0-"), "{requests:?}");
}

/// ... and the date a 206 left out is kept: a second interruption resumes again instead of
/// starting over (the 206's missing header used to erase the stored date).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_date_a_range_left_out_still_resumes_the_next_time() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    let dated = Resource::generated(len, 30)
        .no_validators()
        .last_modified("Tue, 01 Dec 2026 10:00:00 GMT")
        .throttle(2 << 20)
        .fault(Hits::Nth(1), Fault::ResetAfter(1 << 20))
        .fault(Hits::Nth(2), Fault::NoLastModified);
    server.add("/dated.bin", dated);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.dated2"), delegate).await.unwrap();
    let task =
        session.download_tasks(vec![DownloadRequest::new(server.url("/dated.bin"))], true).await.unwrap().remove(0);
    // Into the second answer (the resumed one, without the date), then stopped.
    let deadline = std::time::Instant::now() + LONG;
    while task.info().await.unwrap().bytes_received < (5 << 19) || server.requests_for("/dated.bin").len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the second answer never got going");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    task.suspend().await.unwrap();
    task.resume().await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(30, len)));
    let requests = server.requests_for("/dated.bin");
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert!(requests[2].range.as_deref().is_some_and(|r| r != "bytes=0-"), "resumed again: {requests:?}");
}

/// A resumed range whose body runs past the end its `Content-Range` announced (chunked, so
/// no `Content-Length` bounds it) is cut at that end: nothing past it is written, and the
/// next attempt resumes exactly there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_body_longer_than_its_range_is_cut_at_the_announced_end() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    server.add(
        "/long.bin",
        Resource::generated(len, 31)
            .fault(Hits::Nth(1), Fault::ResetAfter(1 << 20))
            .fault(Hits::Nth(2), Fault::LongRangeOfUnknownTotal(1 << 20)),
    );
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.long-range"), delegate).await.unwrap();
    let task =
        session.download_tasks(vec![DownloadRequest::new(server.url("/long.bin"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(31, len)));
    let requests = server.requests_for("/long.bin");
    let announced_end = len - (1 << 20);
    assert_eq!(
        requests.get(2).and_then(|r| r.range.clone()),
        Some(format!("bytes={announced_end}-")),
        "the third request resumes at the end the second announced: {requests:?}"
    );
}

/// A server that caps its ranges answers less than was asked: the bytes it sent are kept
/// (synced and committed) and the next attempt asks for the rest, whether the answer gave
/// the file's length (`/T`) or not (`/*`, where the length known from the first answer
/// holds). Before, `/*` ended the file at the range's end (a truncated file reported as a
/// success) and `/T` threw the partial data away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_caps_its_ranges_gets_asked_for_the_rest() {
    capped_ranges_are_asked_for_the_rest("t.capped-range", None).await;
}

/// The same when the app's `expected_size` equals the file's length: the length the server
/// stated is still known as the server's (it was taken for only the app's hint, and a
/// range ending early ended the file: a truncated file delivered as a success).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_range_is_asked_for_the_rest_when_the_app_gave_the_size() {
    capped_ranges_are_asked_for_the_rest("t.capped-hinted", Some(4 << 20)).await;
}

/// A refusal of the request for the rest (here a 403) ends only that attempt: the capped
/// range's bytes stay and the next attempt goes on from there. Before, the 403 ended the
/// task for good and deleted its partial data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_for_the_rest_keeps_the_capped_bytes() {
    let refused = Fault::Status { code: 403, retry_after: None };
    let (ranges, _) = after_a_capped_range("t.refused-rest", 42, refused, None).await;
    let from = |n: u64| Some(format!("bytes={}-", n * MIB));
    assert_eq!(ranges, vec![None, from(1), from(2), from(2)], "the next attempt went on from the capped range's end");
}

async fn capped_ranges_are_asked_for_the_rest(identifier: &str, expected_size: Option<u64>) {
    let capped_again = Fault::CappedRange { most: MIB, unknown_total: false };
    let (ranges, resumes) = after_a_capped_range(identifier, 41, capped_again, expected_size).await;
    let from = |n: u64| Some(format!("bytes={}-", n * MIB));
    assert_eq!(ranges, vec![None, from(1), from(2), from(3)], "each answer's bytes were kept");
    // The rest was asked for within the resumed attempt: one resume, no backoff between.
    assert_eq!(resumes, 1);
}

const MIB: u64 = 1 << 20;

/// Downloads a 4 MiB file (`seed`) whose first answer breaks after 1 MiB, whose second is a
/// range capped at 1 MiB of unknown total, and whose third is `third`; it must arrive whole.
/// Returns the ranges asked for, in order, and how many resumes the task reported.
async fn after_a_capped_range(
    identifier: &str,
    seed: u64,
    third: Fault,
    expected_size: Option<u64>,
) -> (Vec<Option<String>>, usize) {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 4 * MIB;
    server.add(
        "/capped.bin",
        Resource::generated(len, seed)
            .fault(Hits::Nth(1), Fault::ResetAfter(MIB))
            .fault(Hits::Nth(2), Fault::CappedRange { most: MIB, unknown_total: true })
            .fault(Hits::Nth(3), third),
    );
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, identifier), delegate).await.unwrap();
    let mut request = DownloadRequest::new(server.url("/capped.bin"));
    if let Some(size) = expected_size {
        request = request.expected_size(size);
    }
    let task = session.download_tasks(vec![request], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(seed, len)));
    let ranges = server.requests_for("/capped.bin").into_iter().map(|r| r.range).collect();
    let resumes = events.seen.iter().filter(|e| matches!(e, Seen::Resumed { task: t, .. } if *t == task.id())).count();
    (ranges, resumes)
}

/// A `416` saying the resource ends exactly where the partial data does, from a server
/// (or a cache) holding a shorter copy under the same validators, does not finish a file
/// whose length is known to be longer: the download starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_416_at_the_partial_end_of_a_longer_file_does_not_finish_it() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    server.add(
        "/short-copy.bin",
        Resource::generated(len, 43)
            .fault(Hits::Nth(1), Fault::ResetAfter(1 << 20))
            .fault(Hits::Nth(2), Fault::EndsWhereTheRangeStarts),
    );
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.short-416"), delegate).await.unwrap();
    let task = session
        .download_tasks(vec![DownloadRequest::new(server.url("/short-copy.bin"))], true)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(43, len)));
    let requests = server.requests_for("/short-copy.bin");
    assert_eq!(requests.len(), 3, "started over after the 416: {requests:?}");
}

/// A resource known by its date alone, replaced within the same second by a longer one: the
/// date still matches, but the length changed, so the partial data is not continued with
/// the new version's bytes (a splice); the download starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_that_changed_under_the_same_date_is_not_spliced() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let date = "Tue, 01 Dec 2026 10:00:00 GMT";
    let old = Resource::generated(4 << 20, 32).no_validators().last_modified(date);
    server.add("/same-date.bin", old.fault(Hits::Nth(1), Fault::ResetAfter(1 << 20)));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.same-date"), delegate).await.unwrap();
    let task =
        session.download_tasks(vec![DownloadRequest::new(server.url("/same-date.bin"))], true).await.unwrap().remove(0);
    dlsession_testkit::wait_until(|| server.hits("/same-date.bin") >= 1).await;
    let new_len = 5u64 << 20;
    server.add("/same-date.bin", Resource::generated(new_len, 33).no_validators().last_modified(date));
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let file = events.moved_to(task.id()).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(33, new_len)), "entirely the new version");
}

/// A resume follows RFC 9110's rules for validators: no `If-Range` date beside a weak
/// `ETag` (the 206 must then repeat the date), no resume by a date that is not strong (a
/// second change within its second would not show), none of encoded bytes by a date, and a
/// 206 whose bytes come encoded is not spliced onto plain ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_trusts_only_strong_validators() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let (len, reset) = (4u64 << 20, Fault::ResetAfter(1 << 20));
    let by_date = |seed| Resource::generated(len, seed).no_validators().last_modified(DEFAULT_LAST_MODIFIED);
    // Modified after the response's `Date`: not a strong validator (nor within its second).
    let later = httpdate::fmt_http_date(std::time::SystemTime::now() + std::time::Duration::from_secs(3600));
    let cases = [
        ("/weak-date.bin", by_date(40).last_modified(&later).fault(Hits::Nth(1), reset.clone()), 2),
        ("/weak-etag.bin", Resource::generated(len, 41).etag("W/\"v1\"").fault(Hits::Nth(1), reset.clone()), 2),
        (
            "/weak-etag-new-date.bin",
            Resource::generated(len, 45)
                .etag("W/\"v1\"")
                .fault(Hits::Nth(1), reset.clone())
                .fault(Hits::Nth(2), Fault::ChangeLastModified("Thu, 22 Oct 2015 07:28:00 GMT".into())),
            3,
        ),
        (
            "/weak-etag-no-date.bin",
            Resource::generated(len, 42)
                .etag("W/\"v1\"")
                .fault(Hits::Nth(1), reset.clone())
                .fault(Hits::Nth(2), Fault::NoLastModified),
            3,
        ),
        (
            // Every `Content-Encoding` line counts.
            "/encoded.bin",
            by_date(43)
                .with_header("content-encoding", "identity")
                .with_header("content-encoding", "gzip")
                .fault(Hits::Nth(1), reset.clone()),
            2,
        ),
        (
            "/encoded-206.bin",
            by_date(44).fault(Hits::Nth(1), reset.clone()).fault(Hits::Nth(2), Fault::ContentEncoding("gzip".into())),
            3,
        ),
    ];
    for (path, resource, _) in &cases {
        server.add(path, resource.clone());
    }
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.validators"), delegate).await.unwrap();
    let requests = cases.iter().map(|(path, ..)| DownloadRequest::new(server.url(path))).collect();
    let tasks = session.download_tasks(requests, true).await.unwrap();
    for ((path, resource, hits), task) in cases.iter().zip(&tasks) {
        assert_eq!(events.completion(task.id(), LONG).await, None, "{path}");
        let file = events.moved_to(task.id()).unwrap();
        assert_eq!(sha256_file(&file).unwrap(), resource.sha256_hex(), "{path}");
        let requests = server.requests_for(path);
        assert_eq!(requests.len(), *hits, "{path}: {requests:?}");
        let second = &requests[1];
        match *path {
            "/weak-etag.bin" | "/weak-etag-no-date.bin" | "/weak-etag-new-date.bin" => {
                assert!(second.range.is_some(), "{path} resumed: {requests:?}");
                assert_eq!(second.if_range, None, "{path}: no date beside a weak ETag: {requests:?}");
            }
            "/encoded-206.bin" => assert!(second.range.is_some() && second.if_range.is_some(), "{requests:?}"),
            _ => assert_eq!(second.range, None, "{path} started over: {requests:?}"),
        }
        if *hits == 3 {
            assert_eq!(requests[2].range, None, "{path}: the 206 was refused, the download started over");
        }
    }
}

/// A 206 answering a request without `Range` (the whole body as a range, as some servers
/// send) is the download itself, whatever validators and encoding it has, and it keeps only
/// its own validators: not those of an earlier answer whose bytes were not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_206_to_a_request_without_range_is_taken_whole() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 1u64 << 20;
    let plain = Resource::generated(len, 50).no_validators().whole_as_206();
    let encoded = Resource::generated(len, 51).no_validators().with_header("content-encoding", "gzip").whole_as_206();
    // The first answer (with an ETag) breaks before its first byte; the second has none.
    let again = Resource::generated(len, 52)
        .whole_as_206()
        .fault(Hits::Nth(1), Fault::ResetAfter(0))
        .fault(Hits::Nth(2), Fault::NoEtag);
    let cases = [("/plain.bin", plain, 1), ("/encoded.bin", encoded, 1), ("/again.bin", again, 2)];
    for (path, resource, _) in &cases {
        server.add(path, resource.clone());
    }
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.whole-206"), delegate).await.unwrap();
    let requests = cases.iter().map(|(path, ..)| DownloadRequest::new(server.url(path))).collect();
    let tasks = session.download_tasks(requests, true).await.unwrap();
    let client = dlsession_testkit::app::client(&env).await;
    for (task, (path, resource, hits)) in tasks.iter().zip(&cases) {
        assert_eq!(events.completion(task.id(), LONG).await, None, "{path}");
        assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), resource.sha256_hex(), "{path}");
        assert_eq!(server.hits(path), *hits, "{path}");
        let r = client.request(dlsession::proto::Request::GetTask { task: task.id() }).await.unwrap();
        let dlsession::proto::Response::Task(detail) = r else { panic!("{r:?}") };
        assert_eq!(detail.etag, None, "{path}: no ETag came with the bytes kept");
    }
}

/// A resumed range of unknown total (`bytes N-M/*`) whose `Content-Length` is shorter than
/// the range would make the file end early: it is refused, and the download starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_whose_length_disagrees_with_it_is_not_taken() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    server.add(
        "/short.bin",
        Resource::generated(len, 27)
            .fault(Hits::Nth(1), Fault::ResetAfter(1 << 20))
            .fault(Hits::Nth(2), Fault::ShortRangeOfUnknownTotal(100_000)),
    );
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.short-range"), delegate).await.unwrap();
    let task =
        session.download_tasks(vec![DownloadRequest::new(server.url("/short.bin"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(27, len)));
    let requests = server.requests_for("/short.bin");
    assert!(requests.get(1).is_some_and(|r| r.range.is_some()), "the second request resumed: {requests:?}");
    // Without a Content-Length (chunked), the range's end says where the answer ends.
    server.add(
        "/chunked.bin",
        Resource::generated(len, 28)
            .no_content_length()
            .fault(Hits::Nth(1), Fault::ResetAfter(1 << 20))
            .fault(Hits::Nth(2), Fault::ShortRangeOfUnknownTotal(100_000)),
    );
    let task =
        session.download_tasks(vec![DownloadRequest::new(server.url("/chunked.bin"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(28, len)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_cert_file_adds_trust_roots() {
    let env = TestEnv::new();
    let ca = TestCa::new().unwrap();
    let _daemon = TestDaemon::start_with_env(&env, &[("SSL_CERT_FILE", ca.ca_pem_path().as_os_str())]);
    let server = TestServer::start_tls(&ca).await.unwrap();
    server.add("/c.bin", Resource::generated(100_000, 12));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "test.sslcertfile"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/c.bin"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None, "the CA from SSL_CERT_FILE is trusted");
}

/// A large download says in one log line (at info) where its time went; a small one says
/// it only at debug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_download_logs_where_its_time_went() {
    let env = TestEnv::new();
    let d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_LOG", std::ffi::OsStr::new("info"))]);
    let server = TestServer::start().await.unwrap();
    let (big, small) = (64u64 << 20, 1u64 << 20);
    server.add("/big.bin", Resource::generated(big, 23));
    server.add("/small.bin", Resource::generated(small, 24));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "test.timing"), delegate).await.unwrap();
    let tasks = session
        .download_tasks(
            vec![DownloadRequest::new(server.url("/big.bin")), DownloadRequest::new(server.url("/small.bin"))],
            true,
        )
        .await
        .unwrap();
    for t in &tasks {
        assert_eq!(events.completion(t.id(), LONG).await, None);
    }
    let log = d.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("download timing")).collect();
    assert_eq!(lines.len(), 1, "one line, for the large download only: {log}");
    let line = lines[0];
    assert!(line.contains(&format!("task={}", tasks[0].id())) && line.contains(&format!("bytes={big}")), "{line}");
    let field = |name: &str| -> f64 {
        let value = line.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{name}="))).unwrap_or_else(|| {
            panic!("no {name} in {line}");
        });
        value.parse().unwrap()
    };
    for name in ["network_wait_ms", "writer_wait_ms", "write_ms", "disk_ms", "sync_ms", "drain_ms", "finishing_ms"] {
        assert!(field(name) >= 0.0);
    }
    // The body took time; the reader's waits happened within it.
    let body = field("body_ms");
    assert!(body > 0.0, "{line}");
    assert!(field("network_wait_ms") + field("writer_wait_ms") <= body + 1.0, "{line}");
    assert!(field("write_ms") > 0.0 && field("move_ms") > 0.0, "64 MiB was written and moved: {line}");
}

/// Serves `response` (raw bytes) to every connection on a loopback port; returns the URL
/// and a count of the connections.
async fn raw_server(response: &'static [u8]) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/raw.bin", listener.local_addr().unwrap());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(response).await;
            });
        }
    });
    (url, hits)
}

/// A body in a transfer coding other than `chunked` (which would be written as the file:
/// gzip bytes delivered as a success), or framed by both `Transfer-Encoding` and
/// `Content-Length` (RFC 9112 6.3: an error), fails at once and is not tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_in_an_unsupported_transfer_coding_is_refused() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let (session_delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.transfer-coding"), session_delegate).await.unwrap();
    let gzip: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let both: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    for (response, says) in [(gzip, "transfer coding"), (both, "Content-Length")] {
        let (url, hits) = raw_server(response).await;
        let task = session.download_task(DownloadRequest::new(url)).await.unwrap();
        task.resume().await.unwrap();
        let error = events.completion(task.id(), LONG).await.expect("refused");
        assert_eq!(error.code, ErrorCode::Network, "{error}");
        assert!(error.message.contains(says), "{error}");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1, "not tried again: {error}");
    }
}
