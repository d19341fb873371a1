//! The client library as apps use it beyond the delegate: `wait_idle`, the event stream
//! and the blocking facade (docs/behaviour.md, "Events").

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use dlsession::{DetachReason, DownloadRequest, ErrorCode, Session, SessionEvent, TaskState};
use dlsession_testkit::app::config;
use dlsession_testkit::cli::pending_events;
use dlsession_testkit::{LONG, Recorder, Seen};
use dlsession_testkit::{Resource, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_idle_returns_once_everything_is_delivered() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(400_000, 3).throttle(1 << 20));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.idle"), delegate).await.unwrap();
    // Idle already: returns at once.
    tokio::time::timeout(Duration::from_secs(5), session.wait_idle()).await.expect("idle session").unwrap();

    let requests = (0..3).map(|_| DownloadRequest::new(server.url("/a"))).collect();
    let tasks = session.download_tasks(requests, true).await.unwrap();
    // A suspended task waits for the app, so it does not keep the session busy.
    let parked = session.download_task(DownloadRequest::new(server.url("/a"))).await.unwrap();
    tokio::time::timeout(LONG, session.wait_idle()).await.expect("idle in time").unwrap();
    events.drain();
    for t in &tasks {
        assert!(
            events.seen.iter().any(|e| matches!(e, Seen::Completed { task, error: None } if *task == t.id())),
            "task {} was handed to the delegate before wait_idle returned: {:?}",
            t.id(),
            events.seen
        );
    }
    let info = session.info().await.unwrap();
    assert_eq!((info.tasks.active(), info.pending_events), (0, 0), "{info:?}");
    assert_eq!(parked.info().await.unwrap().state, TaskState::Suspended);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_idle_fails_when_another_process_takes_the_session() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/slow", Resource::generated(4 << 20, 1).throttle(64 << 10));
    let (delegate, _events) = Recorder::new(&env.path().join("a"));
    let session = Session::attach(config(&env, "t.taken"), delegate).await.unwrap();
    session.download_tasks(vec![DownloadRequest::new(server.url("/slow"))], true).await.unwrap();
    let waiting = tokio::spawn({
        let session = session.clone();
        async move { session.wait_idle().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (other, _) = Recorder::new(&env.path().join("b"));
    let _b = Session::attach(config(&env, "t.taken").takeover(true), other).await.unwrap();
    let err = tokio::time::timeout(LONG, waiting).await.expect("wait_idle ends").unwrap().unwrap_err();
    assert_eq!(err.code(), ErrorCode::SessionInUse, "{err}");
    assert!(matches!(err, dlsession::Error::Detached { reason: DetachReason::TakenOver }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_follows_the_delegate() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(700_000, 5).throttle(1 << 20));
    let (delegate, mut delegate_events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.stream"), delegate).await.unwrap();
    let mut stream = session.events();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/a"))], true).await.unwrap().remove(0);
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(LONG, stream.recv()).await.expect("events in time").expect("stream open");
        seen.push(event.clone());
        if event == SessionEvent::FinishedEvents {
            break;
        }
    }
    let progress: u64 = seen
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Progress { task: t, bytes_written, .. } if *t == task.id() => Some(*bytes_written),
            _ => None,
        })
        .sum();
    assert_eq!(progress, 700_000, "every byte's progress: {seen:?}");
    let finished = seen
        .iter()
        .position(|e| matches!(e, SessionEvent::FinishedDownloading { task: t, kept: false, .. } if *t == task.id()));
    let completed = seen.iter().position(|e| *e == SessionEvent::Completed { task: task.id(), error: None });
    assert!(finished.is_some() && completed.is_some() && finished < completed, "in order: {seen:?}");
    // By the time the stream hears of the file, the delegate has moved it.
    assert_eq!(delegate_events.completion(task.id(), LONG).await, None);
    let moved = delegate_events.moved_to(task.id()).unwrap();
    assert_eq!(sha256_file(&moved).unwrap(), to_hex(&pattern_sha256(5, 700_000)));

    // The stream ends with the attachment.
    let (other, _) = Recorder::new(&env.path().join("b"));
    let _b = Session::attach(config(&env, "t.stream").takeover(true), other).await.unwrap();
    let mut rest = Vec::new();
    while let Some(e) = tokio::time::timeout(LONG, stream.recv()).await.expect("stream ends") {
        rest.push(e);
    }
    assert_eq!(rest.last(), Some(&SessionEvent::Detached(DetachReason::TakenOver)), "{rest:?}");
}

/// A daemon and a test server for a program without a runtime of its own (the server
/// needs one; the app under test does not).
fn for_a_plain_program() -> (TestEnv, TestDaemon, tokio::runtime::Runtime, TestServer) {
    let env = TestEnv::new();
    let daemon = TestDaemon::start(&env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(TestServer::start()).unwrap();
    (env, daemon, rt, server)
}

/// A plain program, no async runtime of its own: the blocking facade.
#[test]
fn the_blocking_facade_downloads_without_a_runtime() {
    let (env, _d, _rt, server) = for_a_plain_program();
    server.add("/b", Resource::generated(1 << 20, 9));
    let dest = env.path().join("b.bin");

    // With a destination, the file is already where the app wants it: nothing to move.
    struct Quiet;
    impl dlsession::SessionDelegate for Quiet {}
    let session = dlsession::blocking::Session::attach(config(&env, "t.blocking"), Quiet).unwrap();
    let events = session.events();
    let task = session.download_task(DownloadRequest::new(server.url("/b")).destination(&dest)).unwrap();
    task.resume().unwrap();
    assert!(session.wait_idle_for(LONG).unwrap(), "idle in time");
    assert_eq!(sha256_file(&dest).unwrap(), to_hex(&pattern_sha256(9, 1 << 20)));
    let completed = events
        .take_while(|e| *e != SessionEvent::FinishedEvents)
        .any(|e| matches!(e, SessionEvent::Completed { task: t, error: None } if t == task.id()));
    assert!(completed, "the iterator saw the completion");
    assert_eq!(session.tasks().unwrap().len(), 0, "the completed task is retired once acknowledged");
    let missing = session.task(999_999).unwrap_err();
    assert_eq!(missing.code(), ErrorCode::NoSuchTask, "{missing}");
}

/// Dropping a blocking session whose delegate is still in a callback returns after five
/// seconds, and what the callback handled is still acknowledged once it returns: the
/// library's runtime lives until then. Before, it was shut down under the delegate's
/// thread, which panicked, and the event came again.
#[test]
fn a_blocking_session_dropped_during_a_long_callback_still_acknowledges() {
    let (env, _d, _rt, server) = for_a_plain_program();
    server.add("/c", Resource::generated(1000, 4));
    struct Slow(std::sync::Mutex<std::sync::mpsc::Sender<()>>);
    impl dlsession::SessionDelegate for Slow {
        fn did_complete_with_error(&self, _: &Session, _: &dlsession::DownloadTask, _: Option<&dlsession::TaskError>) {
            let _ = self.0.lock().unwrap().send(());
            std::thread::sleep(Duration::from_secs(7));
        }
    }
    let (entered, callback) = std::sync::mpsc::channel();
    let session =
        dlsession::blocking::Session::attach(config(&env, "t.slow-callback"), Slow(std::sync::Mutex::new(entered)))
            .unwrap();
    let dest = env.path().join("c.bin");
    session.download_tasks(vec![DownloadRequest::new(server.url("/c")).destination(&dest)], true).unwrap();
    callback.recv_timeout(LONG).expect("the completion reached the delegate");
    let dropped = std::time::Instant::now();
    drop(session);
    let waited = dropped.elapsed();
    assert!(waited < Duration::from_secs(6), "the drop waited {waited:?} for the callback");
    // The callback returns 7 s after it began; its acknowledgement follows.
    dlsession_testkit::wait_for("the callback's acknowledgement", Duration::from_secs(15), || {
        (pending_events(&env, "t.slow-callback") == Some(0)).then_some(())
    });
}

/// A blocking session dropped from inside its own callback (the C API forbids it, a Rust
/// app can do it) returns at once instead of waiting 5 s for itself, and what the
/// callback handled is still acknowledged.
#[test]
fn a_blocking_session_dropped_in_its_own_callback_does_not_wait_for_itself() {
    let (env, _d, _rt, server) = for_a_plain_program();
    server.add("/c", Resource::generated(1000, 6));
    type Slot = std::sync::Arc<std::sync::Mutex<Option<dlsession::blocking::Session>>>;
    struct DropsItself(Slot, std::sync::Mutex<std::sync::mpsc::Sender<Duration>>);
    impl dlsession::SessionDelegate for DropsItself {
        fn did_complete_with_error(&self, _: &Session, _: &dlsession::DownloadTask, _: Option<&dlsession::TaskError>) {
            let session = self.0.lock().unwrap().take();
            let began = std::time::Instant::now();
            drop(session);
            let _ = self.1.lock().unwrap().send(began.elapsed());
        }
    }
    let slot: Slot = Default::default();
    let (tx, dropped) = std::sync::mpsc::channel();
    let delegate = DropsItself(std::sync::Arc::clone(&slot), std::sync::Mutex::new(tx));
    let session = dlsession::blocking::Session::attach(config(&env, "t.drops-itself"), delegate).unwrap();
    let dest = env.path().join("c.bin");
    let request = DownloadRequest::new(server.url("/c")).destination(&dest);
    {
        // In the slot before the task can complete: the callback waits for it there.
        let mut held = slot.lock().unwrap();
        held.insert(session).download_tasks(vec![request], true).unwrap();
    }
    let waited = dropped.recv_timeout(LONG).expect("the callback dropped the session");
    assert!(waited < Duration::from_secs(2), "the drop waited {waited:?} for its own thread");
    dlsession_testkit::wait_for("the callback's acknowledgement", Duration::from_secs(10), || {
        (pending_events(&env, "t.drops-itself") == Some(0)).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_idle_and_the_stream_end_when_this_process_detaches() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/slow", Resource::generated(4 << 20, 1).throttle(64 << 10));
    let (delegate, _events) = Recorder::new(&env.path().join("a"));
    let session = Session::attach(config(&env, "t.gone"), delegate).await.unwrap();
    session.download_tasks(vec![DownloadRequest::new(server.url("/slow"))], true).await.unwrap();
    let mut stream = session.events();
    let waiting = tokio::spawn({
        let session = session.clone();
        async move { session.wait_idle().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    session.detach().await.unwrap();
    let err = tokio::time::timeout(LONG, waiting).await.expect("wait_idle ends").unwrap().unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidRequest, "{err}");
    assert!(matches!(err, dlsession::Error::NotAttached { .. }), "{err:?}");
    while tokio::time::timeout(LONG, stream.recv()).await.expect("the stream ends").is_some() {}
    assert!(session.events().recv().await.is_none(), "a stream asked for afterwards ends at once");
}

/// A destination or upload file whose path is not UTF-8 cannot go to the daemon as text
/// without naming another file: the batch is refused (`invalid_request`), nothing is
/// created. Before, the path was made text with U+FFFD and the file saved elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_utf8_is_refused_not_renamed() {
    use std::os::unix::ffi::OsStrExt;
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(1000, 3));
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.not-utf8"), delegate).await.unwrap();
    let mut bad = env.path().as_os_str().as_bytes().to_vec();
    bad.extend(b"/caf\xe9.bin");
    let bad = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&bad));
    let requests = vec![
        DownloadRequest::new(server.url("/a")).destination(env.path().join("fine.bin")),
        DownloadRequest::new(server.url("/a")).destination(&bad),
    ];
    let err = session.download_tasks(requests, true).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidRequest, "{err}");
    assert!(err.to_string().contains("not UTF-8"), "{err}");
    let upload = dlsession::UploadRequest::new(server.url("/up"), &bad);
    let err = session.upload_tasks(vec![upload], true).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidRequest, "{err}");
    assert!(session.get_all_tasks().await.unwrap().is_empty(), "nothing was created");
}
