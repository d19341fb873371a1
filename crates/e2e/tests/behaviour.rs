//! What a download does, end to end: redirects, checksums, retries, limits, priority,
//! suspend/resume/cancel, destinations, and clear refusals of bad requests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use dlsession::proto::{Request, TaskAction, WaitReason};
use dlsession::{DownloadRequest, ErrorCode, Session, SessionConfiguration, TaskState};
use dlsession_testkit::app::attach as attach_with;
use dlsession_testkit::host::now_ms;
use dlsession_testkit::{
    Fault, Hits, Resource, TestCa, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex,
};
use dlsession_testkit::{LONG, Seen, block};

async fn attach(env: &TestEnv, id: &str) -> (Session, dlsession_testkit::Events) {
    attach_with(env, SessionConfiguration::background(id)).await
}

fn code(e: dlsession::Error) -> ErrorCode {
    e.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_followed_within_limits() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/file", Resource::generated(100_000, 3));
    server.add("/r1", Resource::bytes("").fault(Hits::All, Fault::Redirect { status: 301, location: "/r2".into() }));
    server.add(
        "/r2",
        Resource::bytes("").fault(Hits::All, Fault::Redirect { status: 307, location: server.url("/file") }),
    );
    server
        .add("/loop", Resource::bytes("").fault(Hits::All, Fault::Redirect { status: 302, location: "/loop".into() }));
    // A `Location` in raw UTF-8 (not percent-encoded) is followed as browsers follow it.
    server.add("/caf%C3%A9/n%C3%BC", Resource::generated(1000, 4));
    server.add(
        "/utf8",
        Resource::bytes("").fault(Hits::All, Fault::Redirect { status: 302, location: "/café/nü".into() }),
    );
    let (session, mut events) = attach(&env, "t.redirect").await;
    let requests = ["/r1", "/loop", "/utf8"].map(|p| DownloadRequest::new(server.url(p)));
    let tasks = session.download_tasks(requests.to_vec(), true).await.unwrap();
    assert_eq!(events.completion(tasks[0].id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(tasks[0].id()).unwrap()).unwrap(), to_hex(&pattern_sha256(3, 100_000)));
    let err = events.completion(tasks[1].id(), LONG).await.unwrap();
    assert_eq!(err.code, ErrorCode::TooManyRedirects);
    assert_eq!(server.hits("/loop"), 11, "the first request and ten redirects");
    assert_eq!(events.completion(tasks[2].id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(tasks[2].id()).unwrap()).unwrap(), to_hex(&pattern_sha256(4, 1000)));
}

/// What a server sends can end up quoted in an error: a redirect to an invalid location of
/// 900 KB (percent-encoded: 2.7 MB) still gives a completion the app receives, and the
/// session's tasks can be listed (the message is cut, not the event dropped for outgrowing a frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_invalid_redirect_still_completes_its_task() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let location = format!("http://[{}", "é".repeat(450_000));
    server.add("/huge", Resource::bytes("").fault(Hits::All, Fault::Redirect { status: 302, location }));
    let (session, mut events) = attach(&env, "t.huge-location").await;
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/huge"))], true).await.unwrap().remove(0);
    let err = events.completion(task.id(), LONG).await.expect("a failure");
    assert_eq!(err.code, ErrorCode::InvalidUrl, "{}", &err.message[..200.min(err.message.len())]);
    assert!(err.message.len() <= dlsession_proto::MAX_ERROR_MESSAGE, "{} bytes", err.message.len());
    session.get_all_tasks().await.expect("the session's tasks can be listed");
    // A valid location longer than a task's URL may be (8 KiB) is refused the same way.
    server.add(
        "/long",
        Resource::bytes("")
            .fault(Hits::All, Fault::Redirect { status: 302, location: format!("/{}", "a".repeat(20_000)) }),
    );
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/long"))], true).await.unwrap().remove(0);
    let err = events.completion(task.id(), LONG).await.expect("a failure");
    assert_eq!(err.code, ErrorCode::InvalidUrl, "{err}");
    assert!(err.message.contains("the limit is 8192"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_to_http_redirect_is_refused() {
    let env = TestEnv::new();
    let ca = TestCa::new().unwrap();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let _d = TestDaemon::start(&env);
    let plain = TestServer::start().await.unwrap();
    plain.add("/x", Resource::generated(10, 1));
    let tls = TestServer::start_tls(&ca).await.unwrap();
    tls.add("/down", Resource::bytes("").fault(Hits::All, Fault::Redirect { status: 302, location: plain.url("/x") }));
    let (session, mut events) = attach(&env, "t.downgrade").await;
    let task = session.download_tasks(vec![DownloadRequest::new(tls.url("/down"))], true).await.unwrap().remove(0);
    let err = events.completion(task.id(), LONG).await.unwrap();
    assert_eq!(err.code, ErrorCode::UnsupportedScheme);
    assert!(err.message.contains("https to insecure http"), "{err}");
    assert_eq!(plain.hits("/x"), 0, "the insecure URL was never fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificates_fail_with_tls_and_are_not_retried() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let ca = TestCa::new().unwrap(); // not given to the daemon
    let tls = TestServer::start_tls(&ca).await.unwrap();
    tls.add("/a", Resource::generated(10, 1));
    let (session, mut events) = attach(&env, "t.tls").await;
    let task = session.download_tasks(vec![DownloadRequest::new(tls.url("/a"))], true).await.unwrap().remove(0);
    let err = events.completion(task.id(), LONG).await.unwrap();
    assert_eq!(err.code, ErrorCode::Tls, "{err}");
    assert_eq!(tls.hits("/a"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksums_are_verified() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(200_000, 8));
    server.add("/b", Resource::generated(200_000, 8));
    let (session, mut events) = attach(&env, "t.sha").await;
    let good = DownloadRequest::new(server.url("/a")).expected_sha256(pattern_sha256(8, 200_000));
    let bad = DownloadRequest::new(server.url("/b")).expected_sha256([0; 32]);
    let tasks = session.download_tasks(vec![good, bad], true).await.unwrap();
    assert_eq!(events.completion(tasks[0].id(), LONG).await, None);
    let err = events.completion(tasks[1].id(), LONG).await.unwrap();
    assert_eq!(err.code, ErrorCode::ChecksumMismatch);
    assert!(events.moved_to(tasks[1].id()).is_none(), "a mismatching file is never delivered");
    // A file from one response is not downloaded again (only a spliced one is).
    assert_eq!(server.hits("/b"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_dates_and_429_are_honoured() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let when = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(2));
    server.add(
        "/a",
        Resource::generated(1000, 2)
            .fault(Hits::Nth(1), Fault::Status { code: 429, retry_after: Some(when) })
            .fault(Hits::Nth(2), Fault::Status { code: 500, retry_after: None }),
    );
    let (session, mut events) = attach(&env, "t.429").await;
    let started = std::time::Instant::now();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/a"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert!(started.elapsed() >= Duration::from_millis(900), "waited for Retry-After: {:?}", started.elapsed());
    assert_eq!(server.hits("/a"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_tasks_say_why_and_until_when() {
    let env = TestEnv::new();
    env.set_config("retry_initial_ms", "30000");
    env.set_config("retry_max_ms", "60000");
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/busy", Resource::generated(10, 1).fault(Hits::All, Fault::Status { code: 503, retry_after: None }));
    let (session, _events) = attach(&env, "t.why").await;
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/busy"))], true).await.unwrap().remove(0);
    let info = dlsession_testkit::wait_for("backoff", LONG, || {
        let info = block(task.info()).unwrap();
        (info.state == TaskState::Waiting).then_some(info)
    });
    match info.wait {
        Some(WaitReason::Backoff { until, attempt, last_error }) => {
            assert_eq!(attempt, 1);
            assert_eq!(last_error.code, ErrorCode::HttpStatus);
            assert_eq!(last_error.http_status, Some(503));
            assert!(until > now_ms() + 10_000, "backs off ~30 s");
        }
        other => panic!("expected a backoff reason, got {other:?}"),
    }
}

/// A task whose body has arrived gives its download slot to the next task while it syncs
/// and moves its file: with one slot, a second download completes while the first is held
/// just before its move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finishing_task_frees_its_download_slot() {
    let env = TestEnv::new();
    env.set_config("max_concurrent_downloads", "1");
    let pause = std::ffi::OsStr::new("finish-before-move:1:sleep-ms=5000");
    let d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", pause)]);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(50_000, 1));
    // b takes about half a second, so a (hit by the pause) reaches its move first.
    server.add("/b", Resource::generated(50_000, 2).throttle(100_000));
    let (session, mut events) = attach(&env, "t.slots").await;
    let reqs = vec![DownloadRequest::new(server.url("/a")), DownloadRequest::new(server.url("/b"))];
    let tasks = session.download_tasks(reqs, true).await.unwrap();
    let (a, b) = (tasks[0].id(), tasks[1].id());
    assert_eq!(events.completion(b, LONG).await, None);
    assert!(
        !events.seen.iter().any(|e| matches!(e, Seen::Completed { task, .. } if *task == a)),
        "the first task is still paused before its move: {:?}",
        events.seen
    );
    assert!(d.log().contains("failpoint finish-before-move reached; pausing"), "{}", d.log());
    assert_eq!(events.completion(a, LONG).await, None);
    let order: Vec<String> = server.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(order, ["/a", "/b"], "the first task started first");
    for (task, seed) in [(a, 1), (b, 2)] {
        let file = events.moved_to(task).unwrap();
        assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(seed, 50_000)));
    }
}

/// A task's destination is checked on disk when it is created, off the core: while that
/// check hangs (a stuck network mount, here a failpoint pause), other requests are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_destination_check_does_not_stall_the_daemon() {
    let env = TestEnv::new();
    let pause = std::ffi::OsStr::new("destination-check:1:sleep-ms=3000");
    let d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", pause)]);
    let server = TestServer::start().await.unwrap();
    server.add("/h", Resource::generated(20_000, 8));
    let (session, mut events) = attach(&env, "t.hung").await;
    let dest = env.path().join("hung-dest.bin");
    let request = DownloadRequest::new(server.url("/h")).destination(&dest);
    let creating = tokio::spawn(async move {
        let created = session.download_tasks(vec![request], true).await;
        (session, created)
    });
    check_paused(&d);
    let asked = std::time::Instant::now();
    let client = dlsession_testkit::app::client(&env).await;
    client.request(Request::Status).await.unwrap();
    let took = asked.elapsed();
    assert!(took < Duration::from_millis(1500), "connecting and asking for status took {took:?} behind the check");
    assert!(!creating.is_finished(), "the creation waits for its check");
    let (_session, created) = creating.await.unwrap();
    let task = created.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let finished = events.seen.iter().find_map(|e| match e {
        Seen::Finished { task: t, location, moved_to } if *t == task.id() => Some((location.clone(), moved_to.clone())),
        _ => None,
    });
    let (location, moved_to) = finished.expect("did_finish_downloading_to");
    assert_eq!(location, dest, "the file landed at its destination");
    assert_eq!(sha256_file(&moved_to).unwrap(), to_hex(&pattern_sha256(8, 20_000)));
}

/// Requests act in the order sent, a destination check included: a listing sent right
/// behind a creation whose check is under way waits for it, and lists its task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_behind_a_destination_check_waits_for_it() {
    use dlsession::proto::{Response, ServerMessage, TaskQuery};
    let env = TestEnv::new();
    let _d = with_paused_check(&env);
    let mut raw = raw_with_session(&env, "t.order");
    let list = TaskQuery { session: Some("t.order".into()), states: vec![], after: None, limit: 0 };
    raw.send([(2, create_to("t.order", &env.path().join("ordered.bin"))), (3, Request::ListTasks(list))]);
    let mut answers = Vec::new();
    while answers.len() < 2 {
        if let ServerMessage::Response { id, result } = raw.recv() {
            answers.push((id, result.unwrap()));
        }
    }
    // (Answers may come in another order: the creation's waits for its commit.)
    answers.sort_by_key(|(id, _)| *id);
    assert!(matches!(answers[0].1, Response::TasksCreated(_)), "{:?}", answers[0].1);
    match &answers[1].1 {
        Response::Tasks(page) => assert_eq!(page.tasks.len(), 1, "the listing saw the task created before it"),
        other => panic!("{other:?}"),
    }
}

/// A creation whose client leaves during its destination check is dropped, as requests
/// of a closed connection are: no task appears that nobody was told of (and whose files
/// would not get the creator's file mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_whose_client_left_during_its_check_is_dropped() {
    let env = TestEnv::new();
    let d = with_paused_check(&env);
    let mut raw = raw_with_session(&env, "t.left");
    raw.send([(2, create_to("t.left", &env.path().join("left.bin")))]);
    check_paused(&d);
    drop(raw);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let tasks = dlsession_testkit::cli::listed_tasks(&env);
    assert_eq!(tasks.len(), 0, "created for a client that left: {tasks:?}");
}

/// A destination check that hangs longer than `disk_check_timeout_ms` fails its request
/// with `file_error`, and the connection's later requests go on; what the check finds
/// afterwards is dropped. A check that panics (a bug) fails its request at once the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_check_that_hangs_or_panics_fails_and_the_connection_goes_on() {
    use dlsession::proto::{Response, ServerMessage};
    for (failpoint, code) in [
        ("destination-check:1:sleep-ms=4000", dlsession::ErrorCode::FileError),
        ("destination-check:1:panic", dlsession::ErrorCode::Internal),
    ] {
        let env = TestEnv::new();
        env.set_config("disk_check_timeout_ms", "1000");
        let _d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", std::ffi::OsStr::new(failpoint))]);
        let mut raw = raw_with_session(&env, "t.hung");
        let began = std::time::Instant::now();
        raw.send([(2, create_to("t.hung", &env.path().join("hung.bin"))), (3, Request::Status)]);
        let mut answers = Vec::new();
        while answers.len() < 2 {
            if let ServerMessage::Response { id, result } = raw.recv() {
                answers.push((id, result));
            }
        }
        let took = began.elapsed();
        answers.sort_by_key(|(id, _)| *id);
        match &answers[0].1 {
            Err(e) => assert_eq!(e.code, code, "{failpoint}: {e}"),
            Ok(other) => panic!("{failpoint}: {other:?}"),
        }
        assert!(matches!(answers[1].1, Ok(Response::Status(_))), "{failpoint}: {:?}", answers[1]);
        assert!(took < Duration::from_secs(3), "{failpoint}: answered after {took:?}");
        // The same id again: ids need not be unique, and the hung check's late finding
        // must not be taken for a later request's.
        let create = |name: &str| (2, create_to("t.hung", &env.path().join(name)));
        if code == dlsession::ErrorCode::FileError {
            // While it still hangs, the connection's next check fails at once (one hung
            // check thread per connection at most).
            raw.send([create("second.bin")]);
            match raw.recv() {
                ServerMessage::Response { result: Err(e), .. } => assert!(e.message.contains("still hangs"), "{e}"),
                other => panic!("{other:?}"),
            }
            // On another mount, checks go on meanwhile (the task is never started).
            let shm = std::path::Path::new("/dev/shm");
            // Every Linux has it; a machine without it cannot run this part, and says so.
            assert!(shm.is_dir(), "no /dev/shm here to put a destination on another mount");
            {
                let elsewhere = shm.join(format!("dlsession-test-{}.bin", std::process::id()));
                raw.send([(4, create_to("t.hung", &elsewhere))]);
                match raw.recv() {
                    ServerMessage::Response { result: Ok(Response::TasksCreated(ids)), .. } => {
                        raw.send([(
                            5,
                            Request::ControlTask { task: ids[0], action: dlsession::proto::TaskAction::Cancel },
                        )]);
                        let _ = raw.recv();
                        raw.send([(6, Request::AcknowledgeTasks { tasks: ids })]);
                        let _ = raw.recv();
                    }
                    other => panic!("another mount is not held up: {other:?}"),
                }
            }
        }
        // The check ends later: its finding is dropped, and checks work again.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        raw.send([create("third.bin")]);
        match raw.recv() {
            ServerMessage::Response { result: Ok(Response::TasksCreated(ids)), .. } => assert_eq!(ids.len(), 1),
            other => panic!("{failpoint}: {other:?}"),
        }
        let tasks = dlsession_testkit::cli::listed_tasks(&env);
        assert_eq!(tasks.len(), 1, "{failpoint}: only the last creation: {tasks:?}");
    }
}

/// A daemon told to stop while a request is in its disk phase waits for it (within its
/// grace) and answers it, refused, instead of closing the connection on it unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_destination_check_answers_it() {
    use dlsession::proto::ServerMessage;
    let env = TestEnv::new();
    let mut d = with_paused_check(&env);
    let mut raw = raw_with_session(&env, "t.stop");
    raw.send([(2, create_to("t.stop", &env.path().join("stop.bin")))]);
    check_paused(&d);
    let stopping = std::thread::spawn(move || d.terminate());
    loop {
        match raw.recv() {
            ServerMessage::Response { id: 2, result } => {
                let e = result.expect_err("refused, the daemon is stopping");
                assert!(e.message.contains("shutting down"), "{e}");
                break;
            }
            ServerMessage::Response { id, result } => panic!("{id}: {result:?}"),
            ServerMessage::Event(_) => {}
        }
    }
    assert!(stopping.join().unwrap().success());
}

/// A daemon whose first destination check pauses 1.5 s.
fn with_paused_check(env: &TestEnv) -> TestDaemon {
    TestDaemon::start_with_env(
        env,
        &[("DLSESSIOND_FAILPOINT", std::ffi::OsStr::new("destination-check:1:sleep-ms=1500"))],
    )
}

/// Waits until `d`'s destination check is paused.
fn check_paused(d: &TestDaemon) {
    dlsession_testkit::wait_for("the check to pause", LONG, || {
        d.log().contains("failpoint destination-check reached; pausing").then_some(())
    });
}

/// A raw connection with session `identifier` opened on it (request id 1).
fn raw_with_session(env: &TestEnv, identifier: &str) -> dlsession_testkit::raw::RawClient {
    use dlsession::proto::{Response, ServerMessage};
    let mut raw = dlsession_testkit::raw::RawClient::connect(&env.socket);
    raw.send([(1, Request::OpenSession { identifier: identifier.into(), config: None })]);
    assert!(matches!(raw.recv(), ServerMessage::Response { id: 1, result: Ok(Response::Session(_)) }));
    raw
}

/// Creates one task (never started) of session `identifier` whose destination is `path`.
fn create_to(identifier: &str, path: &std::path::Path) -> Request {
    let mut spec = dlsession::proto::TaskSpec::get("http://127.0.0.1:9/x");
    spec.destination = Some(path.to_string_lossy().into_owned());
    Request::CreateTasks { identifier: identifier.into(), tasks: vec![spec], resume: false }
}

/// Many destination checks hanging at once (a stuck mount, here a pause on every check
/// after the first) keep to threads of their own: the daemon's other file work goes on, so
/// a resumed download, whose partial file is prepared off the runtime, still finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_hanging_destination_checks_leave_other_file_work_alone() {
    let env = TestEnv::new();
    env.set_config("checkpoint_bytes", "262144");
    let pause = std::ffi::OsStr::new("destination-check:2+:sleep-ms=60000");
    let d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", pause)]);
    let server = TestServer::start().await.unwrap();
    let len = 2u64 << 20;
    server.add("/r", Resource::generated(len, 15).throttle(1 << 20));
    let (session, mut events) = attach(&env, "t.many-hung").await;
    let dest = env.path().join("resumed.bin");
    let task =
        session.download_tasks(vec![DownloadRequest::new(server.url("/r")).destination(&dest)], true).await.unwrap();
    let task = &task[0];
    let client = dlsession_testkit::app::client(&env).await;
    dlsession_testkit::app::wait_for_checkpoint(&client, task.id(), 256 << 10).await;
    task.suspend().await.unwrap();
    // More creations than the runtime's blocking pool has threads, each check hanging.
    // (Each on a connection of its own: a connection's later requests wait for its check.)
    let mut hung = Vec::new();
    for i in 0..100 {
        let mut spec = dlsession::proto::TaskSpec::get(server.url("/r"));
        spec.destination = Some(env.path().join(format!("hung-{i}.bin")).to_string_lossy().into_owned());
        let request = Request::CreateTasks { identifier: "t.many-hung".into(), tasks: vec![spec], resume: false };
        let mut raw = dlsession_testkit::raw::RawClient::connect(&env.socket);
        raw.send([(1, request)]);
        hung.push(raw);
    }
    dlsession_testkit::wait_for("checks to hang", LONG, || {
        (d.log().matches("failpoint destination-check reached").count() >= 16).then_some(())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    task.resume().await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(20), events.completion(task.id(), LONG)).await;
    assert_eq!(done.expect("the resumed download finished beside the hanging checks"), None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(15, len)));
    drop(hung);
}

/// A move that hangs (a stuck network mount, here a 3 s failpoint pause on the first one)
/// does not hold back the moves queued behind it: they are done elsewhere after 250 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_move_does_not_hold_back_the_ones_queued_behind_it() {
    let env = TestEnv::new();
    let pause = std::ffi::OsStr::new("finish-before-move:1:sleep-ms=3000");
    let _d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", pause)]);
    let server = TestServer::start().await.unwrap();
    server.add("/m1", Resource::generated(20_000, 11));
    server.add("/m2", Resource::generated(20_000, 12));
    let (session, mut events) = attach(&env, "t.movers").await;
    let started = std::time::Instant::now();
    let reqs = vec![DownloadRequest::new(server.url("/m1")), DownloadRequest::new(server.url("/m2"))];
    let tasks = session.download_tasks(reqs, true).await.unwrap();
    let mut done = Vec::new();
    for _ in 0..2 {
        let e = events.wait("a completion", LONG, |e| matches!(e, Seen::Completed { .. })).await;
        assert!(matches!(e, Seen::Completed { error: None, .. }), "{e:?}");
        done.push(started.elapsed());
    }
    assert!(done[0] < Duration::from_millis(2000), "the queued move waited for the hung one: {done:?}");
    assert!(done[1] >= Duration::from_millis(2500), "the first move did not pause: {done:?}");
    for (t, seed) in tasks.iter().zip([11, 12]) {
        assert_eq!(sha256_file(&events.moved_to(t.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(seed, 20_000)));
    }
}

/// Once the body is in, the task is syncing and moving its file: a suspend or cancel is
/// answered at once (too late), never left hanging, and the download completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_finishing_task_is_refused_at_once() {
    let env = TestEnv::new();
    let pause = std::ffi::OsStr::new("finish-before-move:1:sleep-ms=2000");
    let d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", pause)]);
    let server = TestServer::start().await.unwrap();
    server.add("/f", Resource::generated(30_000, 7));
    let (session, mut events) = attach(&env, "t.late").await;
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/f"))], true).await.unwrap().remove(0);
    dlsession_testkit::wait_for("the finish to pause", LONG, || {
        d.log().contains("failpoint finish-before-move reached; pausing").then_some(())
    });
    for (what, result) in [("suspend", task.suspend().await), ("cancel", task.cancel().await)] {
        match result {
            Err(dlsession::Error::Daemon(e)) => {
                assert_eq!(e.code, ErrorCode::InvalidRequest, "{what}: {e:?}");
                assert!(e.message.contains("finishing"), "{what}: {}", e.message);
            }
            other => panic!("{what} of a finishing task: {other:?}"),
        }
    }
    assert_eq!(events.completion(task.id(), LONG).await, None, "the download still completes");
    let file = events.moved_to(task.id()).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(7, 30_000)));
}

/// Finishing tasks are bounded too: with one download slot and every finish held open, at
/// most four tasks (FINISHING_FACTOR x the limit) are running at once; the fifth starts
/// only when one of them is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finishing_tasks_are_bounded_at_four_times_the_limit() {
    let env = TestEnv::new();
    env.set_config("max_concurrent_downloads", "1");
    let pause = std::ffi::OsStr::new("finish-before-move:1+:sleep-ms=1500");
    let _d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", pause)]);
    let server = TestServer::start().await.unwrap();
    for i in 0..6 {
        server.add(&format!("/f{i}"), Resource::generated(10_000, i));
    }
    let (session, mut events) = attach(&env, "t.finishing").await;
    let reqs = (0..6).map(|i| DownloadRequest::new(server.url(&format!("/f{i}")))).collect();
    let tasks = session.download_tasks(reqs, true).await.unwrap();
    let started = std::time::Instant::now();
    while server.requests().len() < 4 {
        assert!(started.elapsed() < LONG, "four tasks should start: {:?}", server.requests());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // All four are held in their finish now (well under the 1.5 s pause).
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(server.requests().len(), 4, "a fifth task started while four were finishing");
    for t in &tasks {
        assert_eq!(events.completion(t.id(), LONG).await, None);
    }
    assert_eq!(server.requests().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_host_limit_and_priority_order() {
    let env = TestEnv::new();
    env.set_config("max_concurrent_downloads", "3");
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    for i in 0..8 {
        server.add(&format!("/slow{i}"), Resource::generated(100_000, i).throttle(400_000));
    }
    // One connection per host makes the start order observable at the server.
    let config = SessionConfiguration::background("t.limits").max_connections_per_host(1);
    let (session, mut events) = attach_with(&env, config).await;
    // Created suspended, then resumed in one batch: order follows priority, then age.
    let reqs: Vec<_> = (0..8)
        .map(|i| DownloadRequest::new(server.url(&format!("/slow{i}"))).priority(if i == 7 { 1.0 } else { 0.5 }))
        .collect();
    let tasks = session.download_tasks(reqs, true).await.unwrap();
    let snapshot = dlsession_testkit::wait_for("one running", LONG, || {
        let all = block(session.get_all_tasks()).unwrap();
        (all.iter().filter(|t| t.state == TaskState::Running).count() == 1).then_some(all)
    });
    let queued: Vec<_> = snapshot.iter().filter(|t| t.state == TaskState::Queued).collect();
    assert!(!queued.is_empty());
    for t in &queued {
        assert!(
            matches!(&t.wait, Some(WaitReason::HostLimit { limit: 1, host }) if host.starts_with("127.0.0.1:")),
            "queued behind the per-host limit: {:?}",
            t.wait
        );
    }
    for t in &tasks {
        assert_eq!(events.completion(t.id(), LONG).await, None);
    }
    let order: Vec<String> = server.requests().iter().map(|r| r.path.clone()).collect();
    let want: Vec<String> = [7, 0, 1, 2, 3, 4, 5, 6].iter().map(|i| format!("/slow{i}")).collect();
    assert_eq!(order, want, "highest priority first, then oldest first");
}

/// A body of at most 1 MiB is gathered in memory before the writer starts; a suspend in
/// the middle must still keep (write, sync and commit) what had arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_download_suspended_mid_body_keeps_what_arrived() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 800_000u64;
    server.add("/s", Resource::generated(len, 44).throttle(400_000));
    let (session, mut events) = attach(&env, "t.small").await;
    let t = session.download_tasks(vec![DownloadRequest::new(server.url("/s"))], true).await.unwrap().remove(0);
    events
        .wait("progress", LONG, |e| matches!(e, Seen::Progress { task, total } if *task == t.id() && *total >= 200_000))
        .await;
    t.suspend().await.unwrap();
    let info = t.info().await.unwrap();
    assert_eq!(info.state, TaskState::Suspended);
    assert!(info.bytes_received >= 200_000, "kept only {} bytes", info.bytes_received);
    assert!(info.bytes_received < len, "the whole body arrived before the suspend: nothing tested");
    let hits = server.hits("/s");
    t.resume().await.unwrap();
    assert_eq!(events.completion(t.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(t.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(44, len)));
    let resumed = &server.requests_for("/s")[hits];
    assert_eq!(resumed.range.as_deref(), Some(format!("bytes={}-", info.bytes_received).as_str()));
}

/// `did_resume_at_offset` comes before any progress of the attempt it announces, as with
/// Apple's delegate. The event waits for its commit, which is made slow here: a second
/// download checkpoints every 128 KiB and every commit holding a checkpoint pauses the
/// database thread for 30 ms, while progress is sampled every 1 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_at_offset_comes_before_the_progress_of_its_attempt() {
    let env = TestEnv::new();
    env.set_config("progress_interval_ms", "1");
    env.set_config("checkpoint_bytes", "131072");
    let slow_commits = std::ffi::OsStr::new("checkpoint-after-commit:1+:sleep-ms=30");
    let _d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", slow_commits)]);
    let server = TestServer::start().await.unwrap();
    let len = 8u64 << 20;
    server.add("/r", Resource::generated(len, 45).throttle(4 << 20));
    server.add("/noise", Resource::generated(256 << 20, 46).throttle(8 << 20));
    let (session, mut events) = attach(&env, "t.order").await;
    let noise = session.download_task(DownloadRequest::new(server.url("/noise"))).await.unwrap();
    noise.resume().await.unwrap();
    let t = session.download_tasks(vec![DownloadRequest::new(server.url("/r"))], true).await.unwrap().remove(0);
    let mut reached = 0u64;
    for round in 1..=4u64 {
        let want = round * (1 << 20);
        events
            .wait(
                "progress",
                LONG,
                |e| matches!(e, Seen::Progress { task, total } if *task == t.id() && *total >= want),
            )
            .await;
        t.suspend().await.unwrap();
        reached = t.info().await.unwrap().bytes_received;
        t.resume().await.unwrap();
        events.wait("resumed", LONG, |e| matches!(e, Seen::Resumed { task, .. } if *task == t.id())).await;
    }
    assert_eq!(events.completion(t.id(), LONG).await, None);
    noise.cancel().await.unwrap();
    assert!(reached >= 4 << 20);
    // Between one resume and the next, progress never runs past the offset the next
    // resume announces: the previous attempt stopped there, so anything beyond it came
    // from the new attempt, ahead of its announcement.
    let mut since_resume: Vec<u64> = Vec::new();
    let mut resumes = 0;
    for e in &events.seen {
        match e {
            Seen::Progress { task, total } if *task == t.id() => since_resume.push(*total),
            Seen::Resumed { task, offset } if *task == t.id() => {
                resumes += 1;
                assert!(
                    since_resume.iter().all(|&p| p <= *offset),
                    "progress {since_resume:?} reached past {offset} before resumed_at_offset({offset})"
                );
                since_resume.clear();
            }
            _ => {}
        }
    }
    assert_eq!(resumes, 4);
}

/// An app that attaches while a resumed download runs gets the missed
/// `did_resume_at_offset` before the progress that follows it (progress waits while the
/// attach commits and replays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_replays_a_resume_before_the_progress_after_it() {
    let env = TestEnv::new();
    env.set_config("progress_interval_ms", "1");
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 8u64 << 20;
    server.add("/r", Resource::generated(len, 47).throttle(2 << 20));
    let (session, mut events) = attach(&env, "t.replay").await;
    let t = session.download_tasks(vec![DownloadRequest::new(server.url("/r"))], true).await.unwrap().remove(0);
    events
        .wait("progress", LONG, |e| matches!(e, Seen::Progress { task, total } if *task == t.id() && *total >= 1 << 20))
        .await;
    drop(session); // the app goes away; the download goes on
    let client = dlsession_testkit::app::client(&env).await;
    for action in [TaskAction::Suspend, TaskAction::Resume] {
        client.request(Request::ControlTask { task: t.id(), action }).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A changed configuration makes the attach commit before it replays, while progress
    // is sampled every 1 ms.
    let config = SessionConfiguration::background("t.replay").timeout_for_request(Duration::from_secs(77));
    let (session, mut events) = attach_with(&env, config).await;
    assert_eq!(events.completion(t.id(), LONG).await, None);
    let resumed = events.seen.iter().position(|e| matches!(e, Seen::Resumed { task, .. } if *task == t.id()));
    let progress = events.seen.iter().position(|e| matches!(e, Seen::Progress { task, .. } if *task == t.id()));
    let (Some(resumed), Some(progress)) = (resumed, progress) else {
        panic!("no resume or no progress replayed: {:?}", events.seen)
    };
    assert!(resumed < progress, "progress before the replayed resume: {:?}", &events.seen[..=resumed]);
    drop(session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_resume_and_cancel() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 6u64 << 20;
    server.add("/a", Resource::generated(len, 4).throttle(3 << 20));
    server.add("/b", Resource::generated(len, 5).throttle(1 << 20));
    let (session, mut events) = attach(&env, "t.control").await;
    let a = session.download_tasks(vec![DownloadRequest::new(server.url("/a"))], true).await.unwrap().remove(0);
    events
        .wait(
            "progress of a",
            LONG,
            |e| matches!(e, Seen::Progress { task, total } if *task == a.id() && *total > 1 << 20),
        )
        .await;
    a.suspend().await.unwrap();
    let info = a.info().await.unwrap();
    assert_eq!(info.state, TaskState::Suspended);
    assert_eq!(info.wait, Some(WaitReason::Suspended));
    assert!(info.bytes_received > 0, "suspending keeps the synced bytes");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hits = server.hits("/a");
    a.resume().await.unwrap();
    assert_eq!(events.completion(a.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(a.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(4, len)));
    let resumed = &server.requests_for("/a")[hits];
    assert!(resumed.range.as_deref().is_some_and(|r| r != "bytes=0-"), "resume continues with Range");

    let b = session.download_tasks(vec![DownloadRequest::new(server.url("/b"))], true).await.unwrap().remove(0);
    events
        .wait("progress of b", LONG, |e| matches!(e, Seen::Progress { task, total } if *task == b.id() && *total > 0))
        .await;
    let part = env.downloads_dir().join("s1").join(format!("{}.part", b.id()));
    assert!(part.exists(), "partial data lives in the cache directory");
    b.cancel().await.unwrap();
    let err = events.completion(b.id(), LONG).await.unwrap();
    assert_eq!(err.code, ErrorCode::Cancelled);
    dlsession_testkit::wait_for("partial file removed", LONG, || (!part.exists()).then_some(()));
    let again = b.resume().await.unwrap_err();
    assert!(matches!(code(again), ErrorCode::InvalidRequest | ErrorCode::NoSuchTask), "completed tasks cannot resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_and_bad_requests() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(5000, 6));
    let (session, mut events) = attach(&env, "t.dest").await;
    let dest = env.path().join("saved/a.bin");
    let task = session
        .download_tasks(vec![DownloadRequest::new(server.url("/a")).destination(&dest)], true)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(events.location(task.id()), Some(dest.clone()), "delivered at its destination");
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(6, 5000)));
    std::fs::write(&dest, b"the user's file").unwrap();

    let refused = |r: DownloadRequest| {
        let session = session.clone();
        async move { code(session.download_task(r).await.unwrap_err()) }
    };
    assert_eq!(
        refused(DownloadRequest::new(server.url("/a")).destination(&dest)).await,
        ErrorCode::FileError,
        "exists"
    );
    assert_eq!(refused(DownloadRequest::new("file:///etc/passwd")).await, ErrorCode::UnsupportedScheme);
    assert_eq!(refused(DownloadRequest::new("ftp://example.org/x")).await, ErrorCode::UnsupportedScheme);
    assert_eq!(refused(DownloadRequest::new("http//nope")).await, ErrorCode::InvalidUrl);
    assert_eq!(
        refused(DownloadRequest::new(server.url("/a")).header("X-Evil", "a\r\nHost: x")).await,
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        refused(DownloadRequest::new(server.url("/a")).destination("relative/x")).await,
        ErrorCode::InvalidRequest
    );
    assert_eq!(refused(DownloadRequest::new(server.url("/a")).priority(2.0)).await, ErrorCode::InvalidRequest);
    // Destinations no move could reach are refused up front, not after the whole download.
    let with_slash = format!("{}/", env.path().join("saved/b.bin").display());
    let under_a_file = dest.join("inner.bin");
    let too_long = env.path().join("x".repeat(300));
    for (bad, why, expected) in [
        (std::path::PathBuf::from(&with_slash), "a trailing slash", ErrorCode::InvalidRequest),
        (under_a_file, "under a file", ErrorCode::FileError),
        (too_long, "a name over 255 bytes", ErrorCode::InvalidRequest),
    ] {
        assert_eq!(refused(DownloadRequest::new(server.url("/a")).destination(&bad)).await, expected, "{why}");
    }
    // The daemon's own files never: its database, also through a symlink, and its socket.
    let link = env.path().join("state-link");
    std::os::unix::fs::symlink(env.database().parent().unwrap(), &link).unwrap();
    for (own, why) in
        [(link.join("dlsessiond.db"), "the database through a symlink"), (env.socket.clone(), "the socket")]
    {
        let r = DownloadRequest::new(server.url("/a")).destination(&own).overwrite(true);
        assert_eq!(refused(r).await, ErrorCode::InvalidRequest, "{why}");
    }
    // One file however its path is spelled: twice in one batch is refused.
    let twice = [env.path().join("saved/c.bin"), env.path().join("saved/./c.bin")]
        .map(|d| DownloadRequest::new(server.url("/a")).destination(d));
    let err = session.download_tasks(twice.to_vec(), true).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::InvalidRequest);
    let bad_id = Session::attach(
        SessionConfiguration::background("").socket(&env.socket),
        dlsession_testkit::Recorder::new(&env.path().join("x")).0,
    )
    .await;
    assert_eq!(code(bad_id.unwrap_err()), ErrorCode::InvalidIdentifier);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_leaves_finds_its_results_when_it_rejoins() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(300_000, 9).throttle(1 << 20));
    let (session, _events) = attach(&env, "t.leave").await;
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/a"))], true).await.unwrap().remove(0);
    drop(session); // the app goes away mid-download
    dlsession_testkit::wait_for("download done", LONG, || (server.bytes_sent("/a") >= 300_000).then_some(()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (session, mut events) = attach(&env, "t.leave").await;
    let all = session.get_all_tasks().await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].state, TaskState::Completed);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(9, 300_000)));
    events.wait("finished events", LONG, |e| *e == Seen::FinishedEvents).await;
    // Acknowledged: the task is history now.
    dlsession_testkit::wait_for("task retired", LONG, || {
        block(session.get_all_tasks()).unwrap().is_empty().then_some(())
    });
}

/// Dated tasks start at their dates, in date order, and one taken off the queue before its
/// date (suspended) does not start then: all of them share one timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dated_tasks_start_at_their_dates_and_not_when_taken_off() {
    use dlsession::proto::TaskSpec;
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    for (i, path) in ["/first", "/taken-off", "/later"].iter().enumerate() {
        s.add(path, Resource::generated(1000, 30 + i as u64));
    }
    let c = dlsession_testkit::app::client(&env).await;
    c.request(Request::OpenSession { identifier: "t.dated".into(), config: None }).await.unwrap();
    let start = now_ms();
    let dated =
        |path: &str, after_ms: u64| TaskSpec { earliest_begin: Some(start + after_ms), ..TaskSpec::get(s.url(path)) };
    let ids = c
        .create_tasks("t.dated", vec![dated("/later", 3_000), dated("/taken-off", 1_500), dated("/first", 1_500)], true)
        .await
        .unwrap();
    c.request(Request::ControlTask { task: ids[1], action: TaskAction::Suspend }).await.unwrap();
    dlsession_testkit::wait_for("the first date's task", LONG, || (s.hits("/first") > 0).then_some(()));
    assert!(now_ms() >= start + 1_500, "not before its date");
    assert_eq!(s.hits("/later"), 0, "not before its own date");
    dlsession_testkit::wait_for("the later date's task", LONG, || (s.hits("/later") > 0).then_some(()));
    assert!(now_ms() >= start + 3_000, "not before its date");
    assert_eq!(s.hits("/taken-off"), 0, "suspended before its date: never started");
}

/// A watcher hears why a new task waits once it is placed: a task created to start in an
/// hour is told as waiting for its `earliest_begin` (before, its only update said queued
/// with no reason, "may start now", until it started an hour later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_hears_that_a_new_task_waits_for_its_begin_date() {
    use dlsession::proto::{Event, ServerMessage, TaskSpec, WatchFilter};
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let mut raw = dlsession_testkit::raw::RawClient::connect(&env.socket);
    raw.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut spec = TaskSpec::get("http://127.0.0.1:9/later.bin");
    spec.earliest_begin = Some(now_ms() + 3_600_000);
    raw.send([
        (1, Request::OpenSession { identifier: "t.begin-watch".into(), config: None }),
        (2, Request::Watch(WatchFilter { session: Some("t.begin-watch".into()), tasks: Vec::new() })),
        (3, Request::CreateTasks { identifier: "t.begin-watch".into(), tasks: vec![spec], resume: true }),
    ]);
    let mut seen = Vec::new();
    loop {
        if let ServerMessage::Event(Event::TaskUpdate(info)) = raw.recv() {
            if matches!(info.wait, Some(WaitReason::EarliestBegin { .. })) {
                break;
            }
            seen.push(info.wait);
            assert!(seen.len() < 20, "no update with the begin date: {seen:?}");
        }
    }
}
