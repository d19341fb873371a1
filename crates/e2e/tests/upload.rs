//! Uploads (docs/behaviour.md, "Uploads"): a file streamed as a PUT or POST body, its
//! response handed to the app; retried only when that cannot repeat a request; a file
//! changed under it fails it; a server speaking the resumable uploads draft lets it go on
//! from the server's offset after a cut connection and after SIGKILL of the daemon.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};

use dlsession::{ErrorCode, Session, UploadMethod, UploadRequest};
use dlsession_testkit::app::config;
use dlsession_testkit::cli::{show_field, stdout};
use dlsession_testkit::{
    Fault, Hits, LONG, Recorder, Resource, Seen, TestCa, TestDaemon, TestEnv, TestProxy, TestServer, UploadFaults,
    UploadServer, fill_pattern, sha256_hex, wait_until,
};

fn make_file(dir: &Path, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut data = vec![0u8; len];
    fill_pattern(seed, 0, &mut data);
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_streams_the_file_and_the_app_gets_the_response() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    let (file, data) = make_file(env.path(), "photo.bin", 3 << 20, 7);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.upload"), delegate).await.unwrap();
    let request = UploadRequest::new(server.url("/files/photo.bin"), &file).content_type("image/jpeg");
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(server.file("photo.bin").as_deref(), Some(&data[..]), "the server has the file byte for byte");

    // The response came before the completion, its body readable in the callback.
    let (status, body, truncated) = events.response(task.id()).expect("a response event");
    assert_eq!((status, truncated), (201, false));
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains(&sha256_hex(&data)), "{body}");
    let sent: Vec<(u64, u64)> = events
        .seen
        .iter()
        .filter_map(|e| match e {
            Seen::Sent { task: t, total, expected } if *t == task.id() => Some((*total, *expected)),
            _ => None,
        })
        .collect();
    assert_eq!(sent.last(), Some(&(3 << 20, 3 << 20)), "send progress ends at the whole body: {sent:?}");
    let records = server.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!((records[0].method.as_str(), records[0].body_bytes), ("PUT", 3 << 20));
    assert_eq!(records[0].header("content-type"), Some("image/jpeg"));
    assert_eq!(records[0].header("upload-draft-interop-version"), Some("6"));
    assert_eq!(records[0].header("upload-complete"), Some("?1"));

    // `show` tells what it sent and what came back.
    let text = stdout(&env.ctl(&["show", &task.id().to_string()]));
    assert_eq!(show_field(&text, "upload"), format!("PUT of {}", file.display()));
    assert_eq!(show_field(&text, "response status"), "201");
    assert!(show_field(&text, "sent").contains("3.0 MiB / 3.0 MiB"), "{text}");

    // The CLI: the response body goes to stdout, like curl's.
    let (file2, data2) = make_file(env.path(), "notes.txt", 1000, 8);
    let url = server.url("/files/notes.txt");
    let out = env.ctl(&[
        "upload",
        file2.to_str().unwrap(),
        &url,
        "--method",
        "POST",
        "-H",
        "X-Album: Holidays 2026",
        "--content-type",
        "text/plain",
        "--wait",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains(&sha256_hex(&data2)), "{out:?}");
    assert_eq!(server.file("notes.txt").as_deref(), Some(&data2[..]));
    let last = server.records().last().unwrap().clone();
    assert_eq!(last.method, "POST");
    assert_eq!((last.header("x-album"), last.header("content-type")), (Some("Holidays 2026"), Some("text/plain")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_at_submit_and_a_changed_file_fails_clearly() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.bad"), delegate).await.unwrap();
    let url = server.url("/files/x");
    let refused = |r: dlsession::Result<dlsession::DownloadTask>| match r {
        Err(dlsession::Error::Daemon(e)) => e,
        other => panic!("not refused: {other:?}"),
    };
    let e = refused(session.upload_task(UploadRequest::new(&url, env.path().join("missing"))).await);
    assert_eq!(e.code, ErrorCode::FileError);
    assert!(e.message.contains("No such file"), "{e:?}");
    let e = refused(session.upload_task(UploadRequest::new(&url, env.path())).await);
    assert!(e.message.contains("it is a directory"), "{e:?}");
    let (file, _) = make_file(env.path(), "a.bin", 100_000, 9);
    let e = refused(session.upload_task(UploadRequest::new(&url, &file).header("Content-Length", "5")).await);
    assert_eq!(e.code, ErrorCode::InvalidRequest, "{e:?}");
    let e = refused(session.upload_task(UploadRequest::new("ftp://h/x", &file)).await);
    assert_eq!(e.code, ErrorCode::UnsupportedScheme, "{e:?}");
    assert!(session.tasks().await.unwrap().is_empty(), "nothing was created");
    let out = env.ctl(&["upload", env.path().join("missing").to_str().unwrap(), &url]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("missing"), "{out:?}");
    // Refused by the daemon: the session the command made for it goes too; an existing one stays.
    let dir = env.path().join("got");
    for (session, stays) in [("t.made", false), ("t.bad", true), ("t.got", false)] {
        let out = if session == "t.got" {
            env.ctl(&["get", "ftp://h/y", "-d", dir.to_str().unwrap(), "--session", session])
        } else {
            env.ctl(&["upload", file.to_str().unwrap(), "ftp://h/x", "--session", session])
        };
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unsupported"), "{out:?}");
        let listed = stdout(&env.ctl(&["sessions"]));
        assert_eq!(listed.contains(session), stays, "{session} in {listed}");
    }

    // Submitted, then changed before it starts: it fails saying so, and sends nothing.
    let task = session.upload_task(UploadRequest::new(&url, &file)).await.unwrap();
    std::fs::write(&file, b"something else entirely").unwrap();
    task.resume().await.unwrap();
    let error = events.completion(task.id(), LONG).await.expect("a changed file fails the upload");
    assert_eq!(error.code, ErrorCode::FileError);
    assert!(error.message.contains("changed since the upload was submitted"), "{error:?}");
    assert_eq!(server.received(), 0);
    assert!(server.file("x").is_none());
}

/// Changes that keep the size are caught by the modification time: before the upload
/// starts, and while it is sent (checked again before the last bytes go), so the server
/// never gets a whole body mixing old and new bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_in_place_fails_the_upload_before_its_end() {
    // More than loopback's socket buffers take at once, so the end is still to be sent.
    const SIZE: usize = 24 << 20;
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    server.set_faults(UploadFaults { rate: Some(8 << 20), ..UploadFaults::default() });
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.changed"), delegate).await.unwrap();
    let rewrite = |path: &Path| {
        let mut other = vec![0u8; SIZE];
        fill_pattern(99, 0, &mut other);
        std::fs::write(path, &other).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options().write(true).open(path).unwrap().set_modified(later).unwrap();
    };

    let (before, _) = make_file(env.path(), "before.bin", SIZE, 20);
    let task = session.upload_task(UploadRequest::new(server.url("/files/before"), &before)).await.unwrap();
    rewrite(&before);
    task.resume().await.unwrap();
    let error = events.completion(task.id(), LONG).await.expect("changed before the start");
    assert!(error.message.contains("changed since the upload was submitted"), "{error:?}");
    assert_eq!(server.received(), 0, "nothing sent");

    let (during, _) = make_file(env.path(), "during.bin", SIZE, 21);
    let task = session.upload_task(UploadRequest::new(server.url("/files/during"), &during)).await.unwrap();
    task.resume().await.unwrap();
    wait_until(|| server.received() >= 1 << 20).await;
    rewrite(&during);
    let error = events.completion(task.id(), LONG).await.expect("changed while sent");
    assert_eq!(error.code, ErrorCode::FileError, "{error:?}");
    assert!(error.message.contains("changed since the upload was submitted"), "{error:?}");
    assert!(server.file("during").is_none(), "the server never got a whole body");
    assert!(server.received() < SIZE as u64, "{}", server.received());
}

/// A response body longer than the limit reaches the app cut at 1 MiB and marked so;
/// the response's headers reach it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_upload_response_is_cut_at_the_limit_and_its_headers_reach_the_app() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    server.set_faults(UploadFaults { response_size: Some(3 << 20), ..UploadFaults::default() });
    let (file, data) = make_file(env.path(), "long.bin", 50_000, 22);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.long"), delegate).await.unwrap();
    let task = session.upload_task(UploadRequest::new(server.url("/files/long"), &file)).await.unwrap();
    task.resume().await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let (status, body, truncated) = events.response(task.id()).expect("a response");
    assert_eq!((status, truncated, body.len() as u64), (201, true, dlsession::proto::UPLOAD_RESPONSE_BODY_LIMIT));
    assert!(
        String::from_utf8_lossy(&body)
            .starts_with(&format!(r#"{{"name":"long","size":50000,"sha256":"{}"#, sha256_hex(&data)))
    );
    assert_eq!(events.response_header(task.id(), "location").as_deref(), Some("/files/long"));
    assert_eq!(events.response_header(task.id(), "content-type").as_deref(), Some("application/json"));
}

/// A server that trickles its answer (a byte every 300 ms) cannot hold a cancel off: the
/// answer is read for a few seconds more, then kept as far as it came, and the task ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_upload_answer_does_not_hold_a_cancel_off() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    // About 400 bytes of answer: two minutes at this pace.
    let trickle = Some(std::time::Duration::from_millis(300));
    server.set_faults(UploadFaults { response_size: Some(400), response_trickle: trickle, ..UploadFaults::default() });
    let (file, _data) = make_file(env.path(), "slow-answer.bin", 50_000, 23);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.trickle"), delegate).await.unwrap();
    let task = session.upload_task(UploadRequest::new(server.url("/files/slow-answer"), &file)).await.unwrap();
    task.resume().await.unwrap();
    // The server has the file and is sending its answer.
    wait_until(|| server.file("slow-answer").is_some()).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let asked = std::time::Instant::now();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(15), task.cancel()).await.expect("the cancel is answered");
    let done = tokio::time::timeout(std::time::Duration::from_secs(15), events.completion(task.id(), LONG)).await;
    done.expect("the task ended long before the answer would have");
    assert!(asked.elapsed() < std::time::Duration::from_secs(15));
    let (status, body, truncated) = events.response(task.id()).expect("the answer, as far as it came");
    assert_eq!((status, truncated), (201, true));
    assert!(body.len() < 400, "{} bytes", body.len());
}

/// The server's answer breaks off in its body: the upload completes with the status the
/// server gave and the body as far as it came (the PUT was sent again before, and a POST
/// failed as "may have reached the server" although its answer was known).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_in_its_body_keeps_its_status() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    server.set_faults(UploadFaults { response_cut_after: Some(10), ..UploadFaults::default() });
    let (file, data) = make_file(env.path(), "cut-answer.bin", 50_000, 26);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.cut"), delegate).await.unwrap();
    let task = session.upload_task(UploadRequest::new(server.url("/files/cut-answer"), &file)).await.unwrap();
    task.resume().await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None, "{:?}", server.records());
    let (status, body, truncated) = events.response(task.id()).expect("the answer, as far as it came");
    assert_eq!((status, truncated, body.len()), (201, true, 10));
    assert_eq!(server.file("cut-answer").as_deref(), Some(&data[..]));
    assert_eq!(server.records().len(), 1, "sent once");
}

/// A PUT is retried after a 503; a plain POST is not (its whole body went out), an
/// idempotent one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_never_sent_twice_unless_it_may_be() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.retry"), delegate).await.unwrap();
    let (file, data) = make_file(env.path(), "f.bin", 200_000, 10);
    let cases =
        [(UploadMethod::Put, false, true), (UploadMethod::Post, false, false), (UploadMethod::Post, true, true)];
    for (method, idempotent, retried) in cases {
        let server = UploadServer::start(false).await.unwrap();
        server.set_faults(UploadFaults { statuses: vec![(1, 503)], ..UploadFaults::default() });
        let request = UploadRequest::new(server.url("/files/f"), &file).method(method).idempotent(idempotent);
        let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
        let error = events.completion(task.id(), LONG).await;
        let records = server.records();
        let case = format!("{method:?} idempotent={idempotent}: {records:?}");
        if retried {
            assert_eq!(error, None, "{case}");
            assert_eq!(records.len(), 2, "{case}");
            assert_eq!(server.file("f").as_deref(), Some(&data[..]), "{case}");
        } else {
            let error = error.expect("the 503 ends it");
            assert_eq!((error.code, error.http_status), (ErrorCode::HttpStatus, Some(503)), "{case}");
            assert_eq!(records.len(), 1, "sent once: {case}");
            // The app still gets the server's answer.
            assert_eq!(events.response(task.id()).map(|r| r.0), Some(503), "{case}");
        }
    }
}

/// A POST under way when the daemon is killed is not sent again after the restart: it
/// completes with an error that says why (the server may have it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_cut_short_by_a_crash_is_not_repeated() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    server.set_faults(UploadFaults { rate: Some(512 << 10), ..UploadFaults::default() });
    let (file, _) = make_file(env.path(), "form.bin", 2 << 20, 12);
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.post"), delegate).await.unwrap();
    let request = UploadRequest::new(server.url("/files/form"), &file).method(UploadMethod::Post);
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
    wait_until(|| server.received() >= 256 << 10).await;
    drop(session);
    d.kill9();
    d.restart();
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let _session = Session::attach(config(&env, "t.post"), delegate).await.unwrap();
    let error = events.completion(task.id(), LONG).await.expect("not sent again");
    assert!(error.message.contains("may have reached the server"), "{error:?}");
    let posts = server.records().iter().filter(|r| r.method == "POST").count();
    assert_eq!(posts, 1, "{:?}", server.records());
}

/// The server offers resumption: a cut connection and then a SIGKILL of the daemon each
/// cost a HEAD and a PATCH from the server's offset, never the bytes it already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumable_upload_goes_on_from_the_servers_offset_after_a_cut_and_a_crash() {
    const SIZE: usize = 6 << 20;
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let server = UploadServer::start(true).await.unwrap();
    server.set_faults(UploadFaults { cut_after: Some(1 << 20), rate: Some(3 << 20), ..UploadFaults::default() });
    let (file, data) = make_file(env.path(), "video.bin", SIZE, 11);
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.resumable"), delegate).await.unwrap();
    // A POST: only the server's offer makes retrying it safe.
    let request = UploadRequest::new(server.url("/files/video.bin"), &file).method(UploadMethod::Post);
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);

    // Cut after 1 MiB, resumed with a PATCH; killed once the server holds 3 MiB.
    wait_until(|| server.records().iter().any(|r| r.method == "PATCH")).await;
    wait_until(|| server.partial() >= 3 << 20).await;
    drop(session);
    d.kill9();
    let held = server.partial();
    assert!(held < SIZE as u64, "killed before the end ({held} bytes held)");
    d.restart();
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let session = Session::attach(config(&env, "t.resumable"), delegate).await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let got = server.file("video.bin").expect("the server has the file");
    let differs = got.iter().zip(&data).position(|(a, b)| a != b);
    assert_eq!((got.len(), differs), (SIZE, None), "byte-exact on the server: {:?}", server.records());
    let (status, _, _) = events.response(task.id()).expect("the final response");
    assert_eq!(status, 201);

    let records = server.records();
    let methods: Vec<&str> = records.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods.first(), Some(&"POST"), "{methods:?}");
    assert!(methods.iter().filter(|m| **m == "HEAD").count() >= 2, "{methods:?}");
    let patches: Vec<_> = records.iter().filter(|r| r.method == "PATCH").collect();
    assert!(patches.len() >= 2, "{methods:?}");
    assert!(patches.iter().all(|p| p.header("upload-offset").is_some_and(|o| o != "0")), "{patches:?}");
    assert!(patches.iter().all(|p| p.header("content-type") == Some("application/partial-upload")), "{patches:?}");
    // Nothing the server had was sent again.
    assert_eq!(server.received(), SIZE as u64, "{records:?}");
    drop(session);
}

/// A session's headers never frame an upload's body: one named `Upload-Offset` (or any
/// `Upload-*`) is left off its uploads (a task's own are refused), so the draft's framing
/// stays the daemon's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_headers_never_frame_an_upload() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(true).await.unwrap();
    let (file, data) = make_file(env.path(), "framed.bin", 50_000, 16);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let config = config(&env, "t.framed").header("Upload-Offset", "999").header("X-Team", "blue");
    let session = Session::attach(config, delegate).await.unwrap();
    let request = UploadRequest::new(server.url("/files/framed"), &file);
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(server.file("framed").as_deref(), Some(&data[..]));
    let records = server.records();
    assert!(records.iter().all(|r| r.header("upload-offset").is_none()), "{records:?}");
    assert!(records.iter().all(|r| r.header("x-team") == Some("blue")), "other session headers still go: {records:?}");
}

/// A server that offers resumption at a URL longer than a task's may be is not taken up on
/// it (the URL would be stored and asked again): a cut upload goes again from its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_to_resume_at_an_overlong_url_is_not_taken() {
    const SIZE: usize = 2 << 20;
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(true).await.unwrap();
    let faults = UploadFaults { cut_after: Some(1 << 20), offer_padding: Some(40_000), ..UploadFaults::default() };
    server.set_faults(faults);
    let (file, data) = make_file(env.path(), "long.bin", SIZE, 12);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.longoffer"), delegate).await.unwrap();
    let request = UploadRequest::new(server.url("/files/long.bin"), &file);
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(server.file("long.bin").as_deref(), Some(&data[..]));
    let methods: Vec<String> = server.records().iter().map(|r| r.method.clone()).collect();
    assert!(!methods.iter().any(|m| m == "HEAD" || m == "PATCH"), "the offer was taken: {methods:?}");
    assert!(methods.iter().filter(|m| *m == "PUT").count() >= 2, "sent again after the cut: {methods:?}");
}

/// Over HTTPS, to a server that also speaks HTTP/2 (as real ones do): uploads go over
/// HTTP/1.1, where a `104` can arrive, so the server's offer is taken and a POST cut
/// mid-body goes on from the server's offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumable_upload_over_https_goes_on_after_a_cut() {
    const SIZE: usize = 3 << 20;
    let env = TestEnv::new();
    let ca = TestCa::new().unwrap();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start_tls(true, &ca).await.unwrap();
    server.set_faults(UploadFaults { cut_after: Some(1 << 20), ..UploadFaults::default() });
    let (file, data) = make_file(env.path(), "over-tls.bin", SIZE, 17);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.tlsupload"), delegate).await.unwrap();
    let request = UploadRequest::new(server.url("/files/over-tls.bin"), &file).method(UploadMethod::Post);
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
    let done = events.completion(task.id(), LONG).await;
    assert_eq!(done, None, "{:?} {:?}", server.protocols(), server.records());
    assert_eq!(server.file("over-tls.bin").as_deref(), Some(&data[..]), "byte-exact");
    let methods: Vec<String> = server.records().into_iter().map(|r| r.method).collect();
    assert_eq!(methods, ["POST", "HEAD", "PATCH"]);
    assert_eq!(server.received(), SIZE as u64, "nothing sent twice");
    let protocols = server.protocols();
    // HTTP/1.1 offers no ALPN at all ("").
    assert!(!protocols.is_empty() && protocols.iter().all(|p| p.is_empty()), "{protocols:?}");
}

/// A proxy that refuses an https upload's tunnel (503) stopped it before the server: even
/// a plain POST with an empty body, which counts as sent once it goes, is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_refused_at_the_proxy_is_sent_again() {
    let env = TestEnv::new();
    let ca = TestCa::new().unwrap();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let proxy = TestProxy::start().await.unwrap();
    proxy.refuse_next(&[503]);
    let via = proxy.url();
    let _d = TestDaemon::start_with_env(
        &env,
        &[("HTTPS_PROXY", std::ffi::OsStr::new(&via)), ("NO_PROXY", std::ffi::OsStr::new(""))],
    );
    let server = UploadServer::start_tls(false, &ca).await.unwrap();
    let (file, _) = make_file(env.path(), "empty.bin", 0, 23);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.proxied"), delegate).await.unwrap();
    let request = UploadRequest::new(server.url("/files/empty"), &file).method(UploadMethod::Post);
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None, "{:?}", proxy.records());
    assert_eq!(server.file("empty").as_deref(), Some(&[][..]));
    let connects = proxy.records().iter().filter(|r| r.method == "CONNECT").count();
    assert_eq!(connects, 2, "refused once, then through");
    assert_eq!(server.records().len(), 1, "the server saw it once");
}

/// A POST answered `303 See Other` was taken by the server: a proxy refusing the tunnel
/// to where the 303 points does not make it count as unsent, and it is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_not_sent_again_when_the_proxy_refuses_where_its_303_points() {
    let env = TestEnv::new();
    env.set_config("retry_initial_ms", "50");
    let ca = TestCa::new().unwrap();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let proxy = TestProxy::start().await.unwrap();
    let via = proxy.url();
    let _d = TestDaemon::start_with_env(
        &env,
        &[("HTTPS_PROXY", std::ffi::OsStr::new(&via)), ("NO_PROXY", std::ffi::OsStr::new(""))],
    );
    let form = TestServer::start_tls(&ca).await.unwrap();
    let results = TestServer::start_tls(&ca).await.unwrap();
    results.add("/result", Resource::generated(100, 24));
    let location = results.url("/result");
    form.add(
        "/submit",
        Resource::bytes("").fault(Hits::All, Fault::Redirect { status: 303, location: location.clone() }),
    );
    let target = location.trim_start_matches("https://").trim_end_matches("/result").to_owned();
    proxy.refuse_target(&target, 503);
    let (file, _) = make_file(env.path(), "form.bin", 100, 25);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.proxied-303"), delegate).await.unwrap();
    let request = UploadRequest::new(form.url("/submit"), &file).method(UploadMethod::Post);
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
    let error = events.completion(task.id(), LONG).await.expect("failed: the result is out of reach");
    assert!(error.message.contains("not sent again"), "{error:?}");
    assert_eq!(form.requests_for("/submit").len(), 1, "the POST went once: {:?}", proxy.records());
}

/// A POST the server offered to resume goes on after a 503 to its whole body (the server
/// said it holds it), and is given up, never sent whole again, when the server forgets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumable_post_goes_on_after_a_503_and_is_not_repeated_when_forgotten() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let (file, data) = make_file(env.path(), "doc.bin", 300_000, 13);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.offer"), delegate).await.unwrap();

    let server = UploadServer::start(true).await.unwrap();
    server.set_faults(UploadFaults { statuses: vec![(1, 503)], ..UploadFaults::default() });
    let request = UploadRequest::new(server.url("/files/doc"), &file).method(UploadMethod::Post);
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None, "{:?}", server.records());
    assert_eq!(server.file("doc").as_deref(), Some(&data[..]));
    let methods: Vec<String> = server.records().into_iter().map(|r| r.method).collect();
    assert_eq!(methods, ["POST", "HEAD", "PATCH"], "the body went once");
    assert_eq!(server.received(), data.len() as u64);

    // Cut, then the server no longer knows the upload: a plain POST is not sent again.
    let server = UploadServer::start(true).await.unwrap();
    server.set_faults(UploadFaults { statuses: vec![(2, 404)], cut_after: Some(100_000), ..UploadFaults::default() });
    let request = UploadRequest::new(server.url("/files/doc"), &file).method(UploadMethod::Post);
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
    let error = events.completion(task.id(), LONG).await.expect("given up");
    assert_eq!(error.code, ErrorCode::CannotResume, "{error:?}");
    let methods: Vec<String> = server.records().into_iter().map(|r| r.method).collect();
    assert_eq!(methods, ["POST", "HEAD"], "never sent whole again");
}

/// A resumed upload that sends nothing new is no progress: its backoff grows with each
/// failure (the offset it resumed from counted as bytes sent, so a server answering 503 to
/// every PATCH had it retried at the first delay until its resource deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_upload_that_sends_nothing_new_backs_off_more_each_time() {
    let env = TestEnv::new();
    env.set_config("retry_initial_ms", "50");
    let d = TestDaemon::start(&env);
    // Big and paced enough that the cut comes while the body still goes out, after the
    // server's offer was read (a small body is all in the socket's buffers first).
    let (file, data) = make_file(env.path(), "again.bin", 6 << 20, 15);
    let server = UploadServer::start(true).await.unwrap();
    // The PUT is cut; the first PATCH sends the rest (progress) and is answered 503 like
    // the three after it, which have nothing left to send.
    let statuses = vec![(3, 503), (5, 503), (7, 503), (9, 503)];
    let faults = UploadFaults { statuses, cut_after: Some(1 << 20), rate: Some(3 << 20), ..UploadFaults::default() };
    server.set_faults(faults);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.nothingnew"), delegate).await.unwrap();
    let task = session.upload_tasks(vec![UploadRequest::new(server.url("/files/again"), &file)], true).await.unwrap();
    assert_eq!(events.completion(task[0].id(), LONG).await, None, "{:?}", server.records());
    assert_eq!(server.file("again").as_deref(), Some(&data[..]));
    let methods: Vec<String> = server.records().into_iter().map(|r| r.method).collect();
    assert_eq!(methods.iter().filter(|m| *m == "PATCH").count(), 5, "{methods:?}");
    let log = d.log();
    let failures: Vec<&str> = log.lines().filter(|l| l.contains("attempt failed")).collect();
    assert!(failures.iter().any(|l| l.contains("consecutive=4")), "the backoff grew: {failures:#?}");
}

/// The app may exit: the daemon finishes the upload and relaunches it, which collects the
/// server's response then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_finishes_without_its_app_and_relaunches_it() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    server.set_faults(UploadFaults { rate: Some(1 << 20), ..UploadFaults::default() });
    let (file, data) = make_file(env.path(), "big.bin", 2 << 20, 14);
    let marker = env.path().join("relaunched");
    let launch = ["/bin/sh".to_owned(), "-c".to_owned(), format!("touch {}", marker.display())];
    let config = config(&env, "t.away").app_id("org.example.Away").launch_command(launch);
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config.clone(), delegate).await.unwrap();
    let task =
        session.upload_tasks(vec![UploadRequest::new(server.url("/files/big"), &file)], true).await.unwrap().remove(0);
    session.detach().await.unwrap();
    drop(session);
    wait_until(|| marker.exists()).await;
    assert_eq!(server.file("big").as_deref(), Some(&data[..]), "finished while the app was away");
    // The relaunched app (here: this test) attaches and gets the response.
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let _session = Session::attach(config, delegate).await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(events.response(task.id()).map(|r| r.0), Some(201));
}

/// `dlsessionctl watch` shows an upload's body going out (the client library forwards
/// send progress of sessions it is not attached to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_an_uploads_progress() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    // Larger than the socket buffers can take at once (loopback grows them to several MiB),
    // so the body is still going out when the watch starts.
    server.set_faults(UploadFaults { rate: Some(8 << 20), ..UploadFaults::default() });
    let (file, _) = make_file(env.path(), "w.bin", 24 << 20, 15);
    let out = env.ctl(&["upload", file.to_str().unwrap(), &server.url("/files/w"), "--session", "t.watch"]);
    assert!(out.status.success(), "{out:?}");
    let out = env.ctl(&["--json", "watch", "--session", "t.watch"]);
    let lines: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let sent: Vec<u64> = lines
        .iter()
        .filter(|l| l["event"] == "send_progress")
        .map(|l| l["total_bytes_sent"].as_u64().unwrap())
        .collect();
    assert!(!sent.is_empty(), "{lines:?}");
    assert!(sent.iter().all(|&n| n <= 24 << 20), "{sent:?}");
}

/// Bandwidth limits pace uploads as they pace downloads: 2 MiB under a session limit of
/// 512 KiB/s takes about 4 s (a quarter second's burst less), not the moment it takes
/// on loopback, and arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_limit_paces_an_upload() {
    use dlsession::proto::{LimitTarget, Request, Response};
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    let (file, data) = make_file(env.path(), "paced.bin", 2 << 20, 12);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.paced"), delegate).await.unwrap();
    let client = dlsession_testkit::app::client(&env).await;
    let limit = Request::SetBandwidthLimit {
        target: LimitTarget::Session { identifier: "t.paced".into() },
        bytes_per_second: Some(512 << 10),
    };
    assert!(matches!(client.request(limit).await.unwrap(), Response::Ok));
    let task = session.upload_task(UploadRequest::new(server.url("/files/paced.bin"), &file)).await.unwrap();
    let began = std::time::Instant::now();
    task.resume().await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let took = began.elapsed();
    assert!(took >= std::time::Duration::from_millis(3400), "2 MiB at 512 KiB/s went in {took:?}");
    assert_eq!(server.file("paced.bin").as_deref(), Some(&data[..]), "byte for byte");
}

/// Waiting for its turn under a bandwidth limit is not idleness: an upload paced in slices
/// a quarter second apart (past the bucket's 16 KiB burst) goes through with a 100 ms
/// request timeout, in one request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_upload_is_not_timed_out_while_it_waits_its_turn() {
    use dlsession::proto::{LimitTarget, Request, Response};
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    let (file, data) = make_file(env.path(), "slow.bin", 20 << 10, 13);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let configuration = config(&env, "t.slow").timeout_for_request(std::time::Duration::from_millis(100));
    let session = Session::attach(configuration, delegate).await.unwrap();
    let client = dlsession_testkit::app::client(&env).await;
    let limit = Request::SetBandwidthLimit {
        target: LimitTarget::Session { identifier: "t.slow".into() },
        bytes_per_second: Some(4096),
    };
    assert!(matches!(client.request(limit).await.unwrap(), Response::Ok));
    let task = session.upload_task(UploadRequest::new(server.url("/files/slow.bin"), &file)).await.unwrap();
    let began = std::time::Instant::now();
    task.resume().await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert!(began.elapsed() >= std::time::Duration::from_millis(700), "paced: {:?}", began.elapsed());
    assert_eq!(server.file("slow.bin").as_deref(), Some(&data[..]));
    assert_eq!(server.records().len(), 1, "one request, never timed out: {:?}", server.records());
}

/// The server has answered, but the answer's body cannot be written (here a directory
/// sits where its file goes): the upload is never sent again. The body is tried again,
/// with the reason shown, and kept once it can be; a task stopped while it still cannot
/// completes with the server's status and why its body was not kept. Before, the attempt
/// failed as transient: a PUT went to the server again and again, and a POST ended as
/// "may have reached the server" with the server's answer thrown away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_body_cannot_be_kept_never_sends_the_upload_again() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    let (file, data) = make_file(env.path(), "kept.bin", 100_000, 31);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.keep"), delegate).await.unwrap();
    let block = |id: u64| {
        let dir = env.downloads_dir().join("s1").join(format!("{id}.download"));
        std::fs::create_dir_all(dir.join("in-the-way")).unwrap();
        dir
    };

    let put = session.upload_task(UploadRequest::new(server.url("/files/put"), &file)).await.unwrap();
    let obstacle = block(put.id());
    put.resume().await.unwrap();
    let id = put.id().to_string();
    wait_until(|| stdout(&env.ctl(&["show", &id])).contains("cannot keep the server's answer yet")).await;
    std::fs::remove_dir_all(&obstacle).unwrap();
    assert_eq!(events.completion(put.id(), LONG).await, None);
    let (status, body, truncated) = events.response(put.id()).expect("the answer");
    assert_eq!((status, truncated), (201, false));
    assert!(String::from_utf8(body).unwrap().contains(&sha256_hex(&data)));
    assert_eq!(server.records().len(), 1, "sent once: {:?}", server.records());
    assert!(!stdout(&env.ctl(&["show", &id])).contains("cannot keep"), "kept now: no longer said");

    let request = UploadRequest::new(server.url("/files/post"), &file).method(UploadMethod::Post);
    let post = session.upload_task(request).await.unwrap();
    block(post.id());
    post.resume().await.unwrap();
    let id = post.id().to_string();
    wait_until(|| stdout(&env.ctl(&["show", &id])).contains("cannot keep the server's answer yet")).await;
    let _ = post.cancel().await;
    let error = events.completion(post.id(), LONG).await.expect("why the answer's body is missing");
    assert_eq!((error.code, error.http_status), (ErrorCode::FileError, Some(201)), "{error:?}");
    assert!(error.message.contains("201") && error.message.contains("not sent again"), "{}", error.message);
    let (status, _, truncated) = events.response(post.id()).expect("the answer's status and headers");
    assert_eq!((status, truncated), (201, true));
    assert_eq!(server.records().len(), 2, "each sent once: {:?}", server.records());
}

/// A PUT the server keeps refusing with 503 is retried with a growing delay: bytes sent
/// are no progress for an upload that sends them all again (before, every attempt reset
/// the delay to `retry_initial_ms`: a 10-second window saw about 50 attempts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_backs_off() {
    let env = TestEnv::new();
    env.set_config("retry_initial_ms", "200");
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    server.set_faults(UploadFaults { statuses: (1..=100).map(|n| (n, 503)).collect(), ..UploadFaults::default() });
    let (file, _) = make_file(env.path(), "refused.bin", 20_000, 32);
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.backoff"), delegate).await.unwrap();
    let task = session.upload_task(UploadRequest::new(server.url("/files/refused"), &file)).await.unwrap();
    task.resume().await.unwrap();
    // Doubling from 200 ms (jitter aside): attempts at about 0, 0.2, 0.6, 1.4, 3.0, 6.2 s.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let attempts = server.records().len();
    assert!((3..=9).contains(&attempts), "{attempts} attempts in 8 s");
}

/// A server that answers 503 before the body is all read (and then reads the rest): a
/// POST that must not go twice is sent again, since the server answered a request it had
/// not got whole. (Whether it went whole is decided when the answer's head arrives; the
/// race of the rest going out just after it, which made the retry fail as "may have
/// reached the server", cannot be timed here: this server never lets the rest out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_whole_body_lets_a_post_go_again() {
    let env = TestEnv::new();
    env.set_config("retry_initial_ms", "100");
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    server.set_faults(UploadFaults { answer_early: Some((1, 64 << 10, 503)), ..UploadFaults::default() });
    // Larger than the socket buffers hold: the answer comes while the body still goes.
    let (file, data) = make_file(env.path(), "early.bin", 32 << 20, 33);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.early"), delegate).await.unwrap();
    let request = UploadRequest::new(server.url("/files/early"), &file).method(UploadMethod::Post);
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None, "{:?}", server.records());
    // The first connection's record is closed once the server notices the client left.
    let statuses = || server.records().iter().map(|r| r.status).collect::<Vec<u16>>();
    wait_until(|| statuses() == [503, 201]).await;
    assert_eq!(server.file("early").as_deref(), Some(&data[..]));
}

/// A redirect to an invalid location after an upload fails the task with `invalid_url`, as
/// it does a download; before, the 3xx went to the app as if it were the server's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_redirected_to_an_invalid_location_fails_with_invalid_url() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    server.set_faults(UploadFaults { redirect: Some((1, 307, "http://[".into())), ..UploadFaults::default() });
    let (file, _) = make_file(env.path(), "r.bin", 1000, 3);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.upload-bad-redirect"), delegate).await.unwrap();
    let request = UploadRequest::new(server.url("/files/r.bin"), &file);
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
    let error = events.completion(task.id(), LONG).await.expect("fails");
    assert_eq!(error.code, ErrorCode::InvalidUrl, "{error}");
    assert!(events.response(task.id()).is_none(), "the redirect is no answer of the server's");
}
