//! Sessions (docs/behaviour.md, "Sessions", "Waking the app"): exclusive attach and takeover, invalidation and reuse of the
//! identifier, resume data, and wakes that back off while the app stays away.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use dlsession::proto::{Request, Response, SessionConfig, SessionInfo, TaskSpec};
use dlsession::{DetachReason, DownloadRequest, ErrorCode, Session, SessionConfiguration};
use dlsession_testkit::app::config;
use dlsession_testkit::{LONG, Recorder, Seen, block};
use dlsession_testkit::{Resource, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex, wait_for};

async fn info(env: &TestEnv, id: &str) -> Option<SessionInfo> {
    let client = dlsession_testkit::app::client(env).await;
    match client.request(Request::GetSession { identifier: id.into() }).await {
        Ok(Response::Session(s)) => Some(s),
        Ok(other) => panic!("unexpected {other:?}"),
        Err(e) if e.code() == ErrorCode::NoSuchSession => None,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_attachment_at_a_time_and_explicit_takeover() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let (first, mut first_events) = Recorder::new(&env.path().join("a"));
    let _a = Session::attach(config(&env, "t.excl"), first).await.unwrap();
    let (second, _) = Recorder::new(&env.path().join("b"));
    let err = Session::attach(config(&env, "t.excl"), second).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::SessionInUse);
    assert!(err.to_string().contains("takeover"), "says how to take over: {err}");

    let (third, _) = Recorder::new(&env.path().join("c"));
    let _c = Session::attach(config(&env, "t.excl").takeover(true), third).await.unwrap();
    first_events.wait("detached", LONG, |e| *e == Seen::Detached(DetachReason::TakenOver)).await;
    assert!(info(&env, "t.excl").await.unwrap().attached);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_tasks_and_invalidate_then_the_identifier_is_reused() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(500_000, 1).throttle(1 << 20));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.inv"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/a"))], true).await.unwrap().remove(0);
    session.finish_tasks_and_invalidate().await.unwrap();
    let refused = session.download_task(DownloadRequest::new(server.url("/a"))).await.unwrap_err();
    assert_eq!(refused.code(), ErrorCode::SessionInvalidated, "no new tasks once invalidating");
    // The running task still finishes, then the session becomes invalid.
    assert_eq!(events.completion(task.id(), LONG).await, None);
    events.wait("did_become_invalid", LONG, |e| *e == Seen::Invalid).await;
    events.wait("detached", LONG, |e| *e == Seen::Detached(DetachReason::Invalidated)).await;
    wait_for("session removed", LONG, || block(info(&env, "t.inv")).is_none().then_some(()));
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(1, 500_000)));

    // Its task stays in the history, under its session's name.
    let shown = env.ctl(&["--json", "show", &task.id().to_string()]);
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["session"], "t.inv (invalidated)", "{shown}");
    assert_eq!(shown["state"], "completed", "{shown}");

    // The identifier can be used again: a fresh, empty session.
    let (delegate, _) = Recorder::new(&env.path().join("out2"));
    let again = Session::attach(config(&env, "t.inv"), delegate).await.unwrap();
    assert!(again.get_all_tasks().await.unwrap().is_empty());
    let t2 = again.download_task(DownloadRequest::new(server.url("/a"))).await.unwrap();
    assert!(t2.id() > task.id(), "task ids are never reused");

    // After a restart: the history still has the old task, the new session is intact.
    drop(again);
    d.terminate();
    d.restart();
    d.wait_ready(LONG);
    let shown = env.ctl(&["--json", "show", &task.id().to_string()]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["session"], "t.inv (invalidated)", "{shown}");
    let sessions: Vec<String> = block(info(&env, "t.inv")).into_iter().map(|s| s.identifier).collect();
    assert_eq!(sessions, ["t.inv"], "one live session of that name");
    let (delegate, _) = Recorder::new(&env.path().join("out3"));
    let third = Session::attach(config(&env, "t.inv").takeover(true), delegate).await.unwrap();
    assert_eq!(third.get_all_tasks().await.unwrap().iter().map(|t| t.id).collect::<Vec<_>>(), [t2.id()]);
    let other = Session::attach(config(&env, "t.other"), Recorder::new(&env.path().join("o")).0).await.unwrap();
    assert!(other.info().await.unwrap().identifier == "t.other", "a new session gets a fresh key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_cancel_cancels_everything() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/slow", Resource::generated(20 << 20, 2).throttle(1 << 20));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.cancel"), delegate).await.unwrap();
    let running =
        session.download_tasks(vec![DownloadRequest::new(server.url("/slow"))], true).await.unwrap().remove(0);
    let suspended = session.download_task(DownloadRequest::new(server.url("/slow"))).await.unwrap();
    events.wait("progress", LONG, |e| matches!(e, Seen::Progress { task, .. } if *task == running.id())).await;
    session.invalidate_and_cancel().await.unwrap();
    for t in [&running, &suspended] {
        assert_eq!(events.completion(t.id(), LONG).await.unwrap().code, ErrorCode::Cancelled);
    }
    events.wait("did_become_invalid", LONG, |e| *e == Seen::Invalid).await;
    let invalid_at = events.seen.iter().position(|e| *e == Seen::Invalid).unwrap();
    let last_completed = events.seen.iter().rposition(|e| matches!(e, Seen::Completed { .. })).unwrap();
    assert!(last_completed < invalid_at, "did_become_invalid comes after every completion");
    wait_for("session removed", LONG, || block(info(&env, "t.cancel")).is_none().then_some(()));
}

/// A task moving its finished file when `invalidate_and_cancel` comes, whose move then
/// fails, completes `cancelled` (as one already waiting to move again does) instead of
/// waiting to move again: the session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_cancel_ends_a_task_whose_move_fails_meanwhile() {
    let env = TestEnv::new();
    // The move waits 2 s before its rename: the invalidation comes then.
    let d = TestDaemon::start_with_env(
        &env,
        &[("DLSESSIOND_FAILPOINT", std::ffi::OsStr::new("finish-before-move:1:sleep-ms=2000"))],
    );
    let server = TestServer::start().await.unwrap();
    server.add("/f", Resource::generated(1 << 20, 4).throttle(2 << 20));
    let dir = env.path().join("d");
    std::fs::create_dir(&dir).unwrap();
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.cancel-move"), delegate).await.unwrap();
    let request = DownloadRequest::new(server.url("/f")).destination(dir.join("f.bin"));
    let task = session.download_tasks(vec![request], true).await.unwrap().remove(0);
    // The destination's directory becomes a file: the move will fail.
    std::fs::remove_dir(&dir).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    wait_for("the move to begin", LONG, || d.log().contains("failpoint finish-before-move reached").then_some(()));
    session.invalidate_and_cancel().await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(20), events.completion(task.id(), LONG))
        .await
        .expect("the task completes")
        .expect("with an error");
    assert_eq!(error.code, ErrorCode::Cancelled, "{error:?}");
    events.wait("did_become_invalid", LONG, |e| *e == Seen::Invalid).await;
}

/// A server's `ETag` near the 1 MiB a response head may take is not kept as a validator
/// (it would not fit in resume data): cancelling for resume data still gives a blob that
/// makes a task, which starts over. Before, the blob came back empty after the cancel had
/// been committed, and the download was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_etag_still_gives_usable_resume_data() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 8u64 << 20;
    let etag = format!("\"{}\"", "a".repeat(1_040_000));
    server.add("/tagged", Resource::generated(len, 5).etag(&etag).throttle(4 << 20));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.huge-etag"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/tagged"))], true).await.unwrap().remove(0);
    events
        .wait("1 MiB", LONG, |e| matches!(e, Seen::Progress { task: t, total } if *t == task.id() && *total >= 1 << 20))
        .await;
    let data = task.cancel_producing_resume_data().await.expect("resume data");
    assert!(!data.is_empty(), "an empty blob makes no task");
    let again = session.download_task_with_resume_data(&data).await.expect("a task from the blob");
    again.resume().await.unwrap();
    assert_eq!(events.completion(again.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(again.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(5, len)));
}

/// Resume data of a download whose server stated no length (no `Content-Length`) carries
/// the app's `expected_size` as a hint, not as the file's length: the new task continues
/// when the server then states another length (it was taken for a changed resource, and
/// the kept bytes were thrown away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_data_keeps_a_size_hint_apart_from_the_length() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 6u64 << 20;
    server.add("/unsized", Resource::generated(len, 9).etag("\"u\"").no_content_length().throttle(2 << 20));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.hint"), delegate).await.unwrap();
    let request = DownloadRequest::new(server.url("/unsized")).expected_size(4 << 20);
    let task = session.download_tasks(vec![request], true).await.unwrap().remove(0);
    dlsession_testkit::app::wait_for_checkpoint(session.client(), task.id(), 1).await;
    let data = task.cancel_producing_resume_data().await.unwrap();
    let resumed = session.download_task_with_resume_data(&data).await.unwrap();
    assert_eq!(resumed.info().await.unwrap().bytes_expected, Some(4 << 20), "the hint stays");
    resumed.resume().await.unwrap();
    assert_eq!(events.completion(resumed.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(resumed.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(9, len)));
    let offsets: Vec<u64> = events
        .seen
        .iter()
        .filter_map(|e| match e {
            Seen::Resumed { task, offset } if *task == resumed.id() => Some(*offset),
            _ => None,
        })
        .collect();
    assert!(matches!(offsets[..], [o] if o > 0), "continued once, never from zero: {offsets:?}");
}

/// Two stops of one running task, a plain cancel and one producing resume data: each
/// requester hears what it asked for. The blob (the task's credentials in clear) goes only
/// to the one that asked for it; the other gets `ok` (it got the blob too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stop_of_a_task_hears_what_it_asked_for() {
    use dlsession::proto::TaskAction;
    let env = TestEnv::new();
    // The stop's checkpoint, held: both requests wait for the same stop.
    env.set_config("checkpoint_interval_ms", "600000");
    let held = std::ffi::OsStr::new("checkpoint-after-sync:1:sleep-ms=1000");
    let _d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", held)]);
    let server = TestServer::start().await.unwrap();
    server.add("/big", Resource::generated(8 << 20, 31).etag("\"b\"").throttle(1 << 20));
    let c = dlsession_testkit::app::client(&env).await;
    c.request(Request::OpenSession { identifier: "t.stops".into(), config: None }).await.unwrap();
    let id = c.create_tasks("t.stops", vec![TaskSpec::get(server.url("/big"))], true).await.unwrap()[0];
    wait_for("bytes to arrive", LONG, || match block(c.request(Request::GetTask { task: id })) {
        Ok(Response::Task(d)) if d.info.bytes_received > 0 => Some(()),
        _ => None,
    });
    let plain = c.send_request(Request::ControlTask { task: id, action: TaskAction::Cancel }).unwrap();
    let data =
        c.send_request(Request::ControlTask { task: id, action: TaskAction::CancelProducingResumeData }).unwrap();
    assert_eq!(plain.await.unwrap(), Ok(Response::Ok));
    match data.await.unwrap() {
        Ok(Response::ResumeData(blob)) => assert!(!blob.is_empty()),
        other => panic!("{other:?}"),
    }
}

/// A delegate that takes its time over each finished file, and notes the tasks it took.
struct Slow {
    dir: std::path::PathBuf,
    took: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
}

impl dlsession::SessionDelegate for Slow {
    fn did_finish_downloading_to(&self, _: &Session, task: &dlsession::DownloadTask, location: &std::path::Path) {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::rename(location, self.dir.join(task.id().to_string())).unwrap();
        self.took.lock().unwrap().push(task.id());
    }
}

/// Session `identifier`, with no app attached, downloads `n` files of `size` bytes (patterns
/// from `seed`) from `server`; returns once all are done, their events (two each) pending.
async fn finished_while_away(
    env: &TestEnv,
    server: &TestServer,
    identifier: &str,
    n: u64,
    size: u64,
    seed: u64,
) -> dlsession::Client {
    let c = dlsession_testkit::app::client(env).await;
    c.request(Request::OpenSession { identifier: identifier.into(), config: None }).await.unwrap();
    let specs: Vec<TaskSpec> = (0..n)
        .map(|i| {
            let path = format!("/{identifier}/{i}");
            server.add(&path, Resource::generated(size, seed + i));
            TaskSpec::get(server.url(&path))
        })
        .collect();
    c.create_tasks(identifier, specs, true).await.unwrap();
    wait_for("every download to finish", LONG, || {
        match block(c.request(Request::GetSession { identifier: identifier.into() })) {
            Ok(Response::Session(info)) if info.pending_events >= 2 * n => Some(()),
            _ => None,
        }
    });
    c
}

/// Events the app handled are acknowledged even when it drops its session while more are
/// still coming (as an app that exits does): they came again at the next attach, the
/// files they named gone already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_an_app_handled_before_dropping_its_session_does_not_come_again() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let c = finished_while_away(&env, &server, "t.dropped", 12, 1_000, 40).await;
    let dir = env.path().join("took");
    std::fs::create_dir_all(&dir).unwrap();
    let took = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let slow = Slow { dir: dir.clone(), took: took.clone() };
    let session = Session::attach(config(&env, "t.dropped"), slow).await.unwrap();
    wait_for("a few files taken", LONG, || (took.lock().unwrap().len() >= 3).then_some(()));
    drop(session);
    // The first attachment's thread acknowledges what it handled, then ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first: Vec<u64> = took.lock().unwrap().clone();
    let left = 24 - first.len() as u64;
    wait_for("the handled events acknowledged", LONG, || {
        match block(c.request(Request::GetSession { identifier: "t.dropped".into() })) {
            Ok(Response::Session(info)) if info.pending_events <= left => Some(()),
            _ => None,
        }
    });
    let again = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let session = Session::attach(config(&env, "t.dropped"), Slow { dir, took: again.clone() }).await.unwrap();
    tokio::time::timeout(LONG, session.wait_idle()).await.unwrap().unwrap();
    let second: Vec<u64> = again.lock().unwrap().clone();
    assert!(first.iter().all(|t| !second.contains(t)), "handed over twice: first {first:?}, then {second:?}");
    assert_eq!(first.len() + second.len(), 12, "first {first:?}, then {second:?}");
}

/// The size of `/big`, served at 4 MiB/s by `cancelled_at_2_mib`.
const BIG: u64 = 8 << 20;

/// A download of `/big` (a pattern of `seed`) in session `identifier`, cancelled with its
/// resume data once 2 MiB are in: the session, its events, the task and the resume data.
async fn cancelled_at_2_mib(
    env: &TestEnv,
    server: &TestServer,
    identifier: &str,
    seed: u64,
) -> (Session, dlsession_testkit::Events, dlsession::DownloadTask, Vec<u8>) {
    server.add("/big", Resource::generated(BIG, seed).throttle(4 << 20));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(env, identifier), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/big"))], true).await.unwrap().remove(0);
    events
        .wait("2 MiB", LONG, |e| matches!(e, Seen::Progress { task: t, total } if *t == task.id() && *total >= 2 << 20))
        .await;
    let data = task.cancel_producing_resume_data().await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await.unwrap().code, ErrorCode::Cancelled);
    (session, events, task, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_data_continues_at_the_offset() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = BIG;
    let (session, mut events, task, data) = cancelled_at_2_mib(&env, &server, "t.resume", 3).await;
    assert!(!data.is_empty());

    let resumed = session.download_task_with_resume_data(&data).await.unwrap();
    assert_ne!(resumed.id(), task.id());
    assert_eq!(resumed.url(), server.url("/big"));
    resumed.resume().await.unwrap();
    assert_eq!(events.completion(resumed.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(resumed.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(3, len)));
    // The server saw the new task continue where the old one stopped.
    let last = server.requests_for("/big").pop().unwrap();
    let offset: u64 =
        last.range.as_deref().unwrap().trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    assert!(offset >= 2 << 20, "continued at {offset}");
    // The kept file went once the new task was committed.
    let kept: Vec<_> = std::fs::read_dir(env.downloads_dir().join("resume"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(kept.is_empty(), "left in resume/: {kept:?}");
    assert!(
        events
            .seen
            .iter()
            .any(|e| matches!(e, Seen::Resumed { task, offset: o } if *task == resumed.id() && *o == offset))
    );
    // Garbage is refused with a clear error.
    let err = session.download_task_with_resume_data(b"not resume data").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidRequest);
}

/// A kept partial file that cannot be taken (here: its task's directory cannot be made) is
/// refused as a `file_error`, the bytes kept: before, any error counted as "the file is
/// gone" and the new task silently started from zero, the kept file left to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_data_whose_file_cannot_be_taken_is_refused_not_restarted() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let (session, mut events, _, data) = cancelled_at_2_mib(&env, &server, "t.adopt", 4).await;
    // The session's cache directory becomes a file: the new task's partial file has nowhere to go.
    let dir = std::fs::read_dir(env.downloads_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('s')) && p.is_dir())
        .expect("the session's directory");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"in the way").unwrap();
    let err = session.download_task_with_resume_data(&data).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::FileError, "{err}");
    assert!(err.to_string().contains("kept partial file"), "{err}");
    // Out of the way, the same resume data continues where it stopped.
    std::fs::remove_file(&dir).unwrap();
    let resumed = session.download_task_with_resume_data(&data).await.unwrap();
    resumed.resume().await.unwrap();
    assert_eq!(events.completion(resumed.id(), LONG).await, None);
    let from = server.requests_for("/big").pop().unwrap().range.unwrap_or_default();
    assert!(from.starts_with("bytes=") && from != "bytes=0-", "continued, not from zero: {from}");
}

/// An old handle of a session, dropped after the identifier was attached again on the same
/// connection, does not detach the new attachment (whose events keep coming).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_old_handle_leaves_a_new_attachment_alone() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(20_000, 8));
    let client = dlsession_testkit::app::client(&env).await;
    let (d1, _e1) = Recorder::new(&env.path().join("out1"));
    let old = Session::attach_with(&client, config(&env, "t.twice"), std::sync::Arc::new(d1)).await.unwrap();
    old.detach().await.unwrap();
    let (d2, mut events) = Recorder::new(&env.path().join("out2"));
    let new = Session::attach_with(&client, config(&env, "t.twice"), std::sync::Arc::new(d2)).await.unwrap();
    // A third attachment on the same connection is refused while the second lives.
    let (d3, _e3) = Recorder::new(&env.path().join("out3"));
    let err = Session::attach_with(&client, config(&env, "t.twice"), std::sync::Arc::new(d3)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidRequest, "{err}");
    drop(old);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(info(&env, "t.twice").await.unwrap().attached, "still attached after the old handle went");
    let task = new.download_tasks(vec![DownloadRequest::new(server.url("/a"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None, "events reach the new attachment");
}

/// Two attaches of one identifier racing on one connection (the app's own and a wake's
/// rejoin, say): one wins and gets the events, the other is told, none is left deaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_attaches_racing_on_one_connection_leave_one_attached() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(20_000, 8));
    let client = dlsession_testkit::app::client(&env).await;
    let (d1, e1) = Recorder::new(&env.path().join("out1"));
    let (d2, e2) = Recorder::new(&env.path().join("out2"));
    // Both ask for the stored session before routing (their configurations leave settings
    // to it), so both pass the first check before either routes.
    let (a, b) = tokio::join!(
        Session::attach_with(&client, config(&env, "t.race"), std::sync::Arc::new(d1)),
        Session::attach_with(&client, config(&env, "t.race"), std::sync::Arc::new(d2)),
    );
    let (session, mut events, err) = match (a, b) {
        (Ok(s), Err(e)) => (s, e1, e),
        (Err(e), Ok(s)) => (s, e2, e),
        (a, b) => panic!("exactly one attach must win: {:?} / {:?}", a.map(|_| ()), b.map(|_| ())),
    };
    assert_eq!(err.code(), ErrorCode::InvalidRequest, "{err}");
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/a"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None, "events reach the attachment that won");
}

struct Panicky;

impl dlsession::SessionDelegate for Panicky {
    fn did_finish_downloading_to(&self, _: &Session, _: &dlsession::DownloadTask, _: &std::path::Path) {
        panic!("the app's delegate fails");
    }
}

/// A delegate that panics detaches its session instead of leaving it attached and deaf;
/// the event it failed on comes again on the next attach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_delegate_detaches_and_its_event_comes_again() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/p", Resource::generated(10_000, 9));
    let session = Session::attach(config(&env, "t.panic"), Panicky).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/p"))], true).await.unwrap().remove(0);
    let started = std::time::Instant::now();
    while info(&env, "t.panic").await.is_some_and(|i| i.attached) {
        assert!(started.elapsed() < LONG, "still attached after the delegate panicked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(session);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let _session = Session::attach(config(&env, "t.panic"), delegate).await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(9, 10_000)));
}

/// Kept resume files are dated from the cancel: a partial file last written 8 days ago
/// (a task suspended that long) survives the next start-up's cleanup once kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_data_of_a_long_suspended_task_survives_a_restart() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    server.add("/big", Resource::generated(len, 5).throttle(2 << 20));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.old"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/big"))], true).await.unwrap().remove(0);
    events
        .wait("1 MiB", LONG, |e| matches!(e, Seen::Progress { task: t, total } if *t == task.id() && *total >= 1 << 20))
        .await;
    task.suspend().await.unwrap();
    let part = std::fs::read_dir(env.downloads_dir().join("s1"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "part"))
        .expect("the partial file");
    let st = std::process::Command::new("touch").arg("-d").arg("8 days ago").arg(&part).status().unwrap();
    assert!(st.success());
    let data = task.cancel_producing_resume_data().await.unwrap();
    drop(session);
    assert!(d.terminate().success());
    d.restart();
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let session = Session::attach(config(&env, "t.old"), delegate).await.unwrap();
    let resumed = session.download_task_with_resume_data(&data).await.unwrap();
    resumed.resume().await.unwrap();
    assert_eq!(events.completion(resumed.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(resumed.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(5, len)));
    let last = server.requests_for("/big").pop().unwrap();
    let offset: u64 =
        last.range.as_deref().unwrap_or("bytes=0-").trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    assert!(offset >= 1 << 20, "continued at {offset}, not from zero");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakes_back_off_while_the_app_stays_away() {
    let env = TestEnv::new();
    env.set_config("wake_initial_ms", "200");
    env.set_config("wake_max_ms", "100000");
    // A launch that ends at once without its app attaching counts as under way this long:
    // short, so that the backoff alone paces the wakes here.
    env.set_config("wake_answer_ms", "100");
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(1000, 1));
    // An app whose relaunch command never rejoins.
    let config = config(&env, "t.away").app_id("org.example.away").launch_command(["/bin/true"]);
    let (delegate, _) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config, delegate).await.unwrap();
    session.download_tasks(vec![DownloadRequest::new(server.url("/a"))], true).await.unwrap();
    session.detach().await.unwrap();
    drop(session);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let s = info(&env, "t.away").await.unwrap();
    // 0, 200, 600, 1400, 3000 ms: about five wakes in 3.2 s, never a tight loop.
    assert!((3..=6).contains(&s.wake.attempts), "{:?}", s.wake);
    let (last, next) = (s.wake.last_wake.unwrap(), s.wake.next_wake.unwrap());
    let gap = next - last;
    assert!(
        gap >= 200 << (s.wake.attempts - 1) >> 1,
        "doubling backoff, next gap {gap} ms after {} wakes",
        s.wake.attempts
    );
    assert_eq!(s.pending_events, 2, "finished_downloading and completed still wait");
    // Attaching resets the backoff.
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let _s = Session::attach(SessionConfiguration::background("t.away").socket(&env.socket), delegate).await.unwrap();
    events.wait("finished events", LONG, |e| *e == Seen::FinishedEvents).await;
    wait_for("acknowledged", LONG, || block(info(&env, "t.away")).filter(|s| s.pending_events == 0));
    let s = info(&env, "t.away").await.unwrap();
    assert_eq!(s.wake.attempts, 0);
    assert_eq!(s.wake.next_wake, None);
}

/// Launches in 5 s of an app whose every process registers for wakes, hears the wake and
/// ignores it, then exits (or, with `stay`, stays connected).
async fn launches_of_an_app_that_ignores_wakes(stay: bool) -> usize {
    let env = TestEnv::new();
    env.set_config("wake_initial_ms", "1500");
    env.set_config("wake_answer_ms", "200");
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    // Done once the app has gone: its events wait for it.
    server.add("/a", Resource::generated(1000, 74).throttle(4000));
    let launches = env.path().join("launches.txt");
    let argv = ["/bin/sh".to_owned(), "-c".to_owned(), format!("echo launched >> {}", launches.display())];
    let app = "org.example.flaky";
    let config = config(&env, "t.flaky").app_id(app).launch_command(argv);
    let (delegate, _) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config, delegate).await.unwrap();
    session.download_tasks(vec![DownloadRequest::new(server.url("/a"))], true).await.unwrap();
    session.detach().await.unwrap();
    drop(session);
    // Plays the process each launch starts.
    let count = || std::fs::read_to_string(&launches).map(|s| s.lines().count()).unwrap_or(0);
    let (mut played, mut staying) = (0, Vec::new());
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if count() > played {
            played = count();
            let options = dlsession::ClientOptions {
                socket: Some(env.socket.clone()),
                app_id: Some(app.into()),
                autostart: false,
                ..dlsession::ClientOptions::default()
            };
            // On a runtime of its own: the process's exit is that runtime's end, which
            // closes its connection.
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let heard = std::thread::spawn(move || {
                let heard = runtime.block_on(async {
                    let client = dlsession::Client::connect(options).await.unwrap();
                    let (handler, mut woken) = dlsession_testkit::app::IgnoredWakes::new();
                    client.handle_wakes(handler);
                    tokio::time::timeout(Duration::from_secs(2), woken.recv()).await.ok().flatten()
                });
                (heard, stay.then_some(runtime))
            })
            .join()
            .unwrap();
            assert_eq!(heard.0.as_deref(), Some("t.flaky"), "the new process is woken");
            staying.extend(heard.1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = info(&env, "t.flaky").await.unwrap();
    eprintln!("{} launches in 5 s; {:?}", count(), s.wake);
    // (Runtimes are not dropped inside another's context.)
    std::thread::spawn(move || drop(staying)).join().unwrap();
    count()
}

/// A relaunched app that registers for wakes and exits before rejoining is relaunched at
/// the wake backoff, not every `wake_answer_ms` (the woken process was gone, yet the
/// unanswered wake relaunched it, and each new process was woken again: 23 launches in 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_exits_after_its_wake_is_relaunched_at_the_backoff() {
    // Wakes at 1.5 s, then 1.5 s and 3 s later.
    let launches = launches_of_an_app_that_ignores_wakes(false).await;
    assert!((1..=3).contains(&launches), "{launches} launches in 5 s");
}

/// The same with processes that stay without rejoining: a new one is woken at once, but
/// only a wake at the backoff that goes unanswered relaunches the app again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_ignores_its_wakes_is_relaunched_at_the_backoff() {
    let launches = launches_of_an_app_that_ignores_wakes(true).await;
    assert!((1..=4).contains(&launches), "{launches} launches in 5 s");
}

/// Pausing the last task still running in a session whose app is away, with events
/// waiting, brings the app (nothing planned a wake before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_the_last_running_task_wakes_the_app_for_its_events() {
    let env = TestEnv::new();
    env.set_config("wake_initial_ms", "100");
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/small", Resource::generated(1000, 75));
    server.add("/slow", Resource::generated(10 << 20, 76).throttle(64 << 10));
    let launched = env.path().join("launched.txt");
    let argv = ["/bin/sh".to_owned(), "-c".to_owned(), format!("echo launched >> {}", launched.display())];
    let config = config(&env, "t.paused").launch_command(argv);
    let (delegate, _) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config, delegate).await.unwrap();
    let tasks = session
        .download_tasks(
            vec![DownloadRequest::new(server.url("/slow")), DownloadRequest::new(server.url("/small"))],
            true,
        )
        .await
        .unwrap();
    session.detach().await.unwrap();
    drop(session);
    // The small one's events wait; the slow one keeps the session from resting.
    wait_for("the small one done", LONG, || block(info(&env, "t.paused")).filter(|s| s.pending_events >= 2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!launched.exists(), "no wake while a task runs");
    let client = dlsession_testkit::app::client(&env).await;
    let pause = Request::ControlTask { task: tasks[0].id(), action: dlsession::proto::TaskAction::Suspend };
    client.request(pause).await.unwrap();
    wait_for("the app relaunched", LONG, || launched.exists().then_some(()));
}

/// A session that reuses a deleted one's identifier numbers its events after the old
/// one's (across a restart too), so an acknowledgement meant for the old one that arrives
/// late cannot delete the new one's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_acknowledgement_for_a_reused_identifier_deletes_nothing_new() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(10_000, 61));
    server.add("/b", Resource::generated(10_000, 62));
    // The first incarnation: one download, then invalidated (events 1 to 3).
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.late"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/a"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    session.finish_tasks_and_invalidate().await.unwrap();
    events.wait("detached", LONG, |e| *e == Seen::Detached(DetachReason::Invalidated)).await;
    drop(session);
    wait_for("session removed", LONG, || block(info(&env, "t.late")).is_none().then_some(()));
    assert!(d.terminate().success());
    d.restart();

    // The second incarnation runs a download with nobody attached: its events wait.
    let client = dlsession_testkit::app::client(&env).await;
    let open = Request::OpenSession { identifier: "t.late".into(), config: Some(SessionConfig::default()) };
    client.request(open).await.unwrap();
    let create = Request::CreateTasks {
        identifier: "t.late".into(),
        tasks: vec![TaskSpec::get(server.url("/b"))],
        resume: true,
    };
    let id = match client.request(create).await.unwrap() {
        Response::TasksCreated(ids) => ids[0],
        other => panic!("unexpected {other:?}"),
    };
    wait_for("the new download's events", LONG, || {
        block(info(&env, "t.late")).filter(|s| s.pending_events == 2).map(|_| ())
    });
    // A late acknowledgement of the first incarnation's events.
    client.request(Request::AckEvents { identifier: "t.late".into(), seqs: (1..=3).collect() }).await.unwrap();
    assert_eq!(info(&env, "t.late").await.unwrap().pending_events, 2, "the new incarnation's events were deleted");
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let _session = Session::attach(config(&env, "t.late"), delegate).await.unwrap();
    assert_eq!(events.completion(id, LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(id).unwrap()).unwrap(), to_hex(&pattern_sha256(62, 10_000)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_keeps_what_the_app_leaves_unset_and_clears_what_it_says() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let registered = config(&env, "t.merge")
        .app_id("org.example.merge")
        .launch_command(["/usr/bin/true", "--collect"])
        .header("X-App", "1")
        .bandwidth_limit(1 << 20);
    let (first, _) = Recorder::new(&env.path().join("a"));
    drop(Session::attach(registered, first).await.unwrap());
    let stored = || async { info(&env, "t.merge").await.unwrap().config };
    wait_for("detached", LONG, || (!block(info(&env, "t.merge")).unwrap().attached).then_some(()));

    // An attach that names nothing keeps everything.
    let (second, _) = Recorder::new(&env.path().join("b"));
    drop(Session::attach(config(&env, "t.merge"), second).await.unwrap());
    let kept = stored().await;
    assert_eq!(kept.app_id.as_deref(), Some("org.example.merge"));
    assert!(
        matches!(&kept.launch, Some(dlsession::proto::LaunchSpec::Command { argv }) if argv == &["/usr/bin/true", "--collect"]),
        "launch command kept: {:?}",
        kept.launch
    );
    assert_eq!(kept.http_headers.len(), 1, "headers kept");
    assert_eq!(kept.bandwidth_limit, Some(1 << 20));
    wait_for("detached", LONG, || (!block(info(&env, "t.merge")).unwrap().attached).then_some(()));

    // What it sets replaces, what it clears is cleared, the rest stays.
    let (third, _) = Recorder::new(&env.path().join("c"));
    let changed = config(&env, "t.merge").no_launch().max_concurrent_tasks(3).no_bandwidth_limit();
    let _s = Session::attach(changed, third).await.unwrap();
    let now = stored().await;
    assert_eq!(now.launch, None, "no_launch() clears the stored command");
    assert_eq!(now.bandwidth_limit, None, "no_bandwidth_limit() clears the stored limit");
    assert_eq!(now.max_concurrent_tasks, Some(3));
    assert_eq!(now.app_id.as_deref(), Some("org.example.merge"), "app_id still kept");
    assert_eq!(now.http_headers.len(), 1, "headers still kept");
    drop(_s);
    wait_for("detached", LONG, || (!block(info(&env, "t.merge")).unwrap().attached).then_some(()));
    let (fourth, _) = Recorder::new(&env.path().join("d"));
    let _s = Session::attach(config(&env, "t.merge").no_max_concurrent_tasks(), fourth).await.unwrap();
    assert_eq!(stored().await.max_concurrent_tasks, None, "no_max_concurrent_tasks() clears the stored limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_events_only_after_events_were_delivered() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(300_000, 2).throttle(1 << 20));
    // An attach with nothing to deliver says nothing.
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.fin"), delegate).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    events.drain();
    assert!(!events.seen.contains(&Seen::FinishedEvents), "empty attach: {:?}", events.seen);

    // While attached: once the last task has completed and its events are acknowledged.
    let tasks = session
        .download_tasks(vec![DownloadRequest::new(server.url("/a")), DownloadRequest::new(server.url("/a"))], true)
        .await
        .unwrap();
    events.wait("did_finish_events", LONG, |e| *e == Seen::FinishedEvents).await;
    for t in &tasks {
        let done = events.seen.iter().position(|e| matches!(e, Seen::Completed { task, .. } if *task == t.id()));
        assert!(done.is_some(), "task {} completed before finished-events: {:?}", t.id(), events.seen);
    }
    assert_eq!(events.seen.iter().filter(|e| **e == Seen::FinishedEvents).count(), 1);
    let now = session.info().await.unwrap();
    assert_eq!(now.pending_events, 0, "everything acknowledged when the app hears it");

    // Rejoining with nothing new: silent again.
    drop(session);
    wait_for("detached", LONG, || (!block(info(&env, "t.fin")).unwrap().attached).then_some(()));
    let (again, mut later) = Recorder::new(&env.path().join("out2"));
    let _s = Session::attach(config(&env, "t.fin"), again).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    later.drain();
    assert!(later.seen.is_empty(), "nothing to deliver, nothing said: {:?}", later.seen);
}

/// The wire itself (not the library, which would hide a duplicate): each attach gets one
/// `finished_events` after its replay, and one more when the session's last task completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_events_once_per_replay_and_once_per_quiet_down() {
    use dlsession::proto::handshake::{HandshakeStatus, Preamble};
    use dlsession::proto::{ClientHello, Event, RequestFrame, ServerMessage, codec, frame};
    use std::io::{Read, Write};

    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(100_000, 4));
    let url = server.url("/a");
    let socket = env.socket.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut opening =
            Preamble { version: dlsession::proto::PROTOCOL_VERSION, status: HandshakeStatus::Ok }.to_bytes().to_vec();
        let hello = ClientHello { client_name: "raw".into(), client_version: "0".into(), app_id: None, umask: None };
        opening.extend(frame::encode_frame(&hello).unwrap());
        s.write_all(&opening).unwrap();
        let mut pre = [0u8; 8];
        s.read_exact(&mut pre).unwrap();
        let read = |s: &mut std::os::unix::net::UnixStream| -> Option<ServerMessage> {
            let mut len = [0u8; 4];
            s.read_exact(&mut len).ok()?;
            let mut buf = vec![0u8; frame::payload_len(len).unwrap()];
            s.read_exact(&mut buf).unwrap();
            Some(codec::decode(&buf).unwrap())
        };
        let mut welcome = [0u8; 4];
        s.read_exact(&mut welcome).unwrap();
        let mut rest = vec![0u8; frame::payload_len(welcome).unwrap()];
        s.read_exact(&mut rest).unwrap();
        let send = |s: &mut std::os::unix::net::UnixStream, id: u64, request: Request| {
            s.write_all(&frame::encode_frame(&RequestFrame { id, request }).unwrap()).unwrap();
        };
        // Until the stream is quiet for 2 s: how many `finished_events`, and the durable seqs.
        let drain = |s: &mut std::os::unix::net::UnixStream| {
            let (mut finished, mut seqs) = (0, Vec::new());
            while let Some(m) = read(s) {
                match m {
                    ServerMessage::Event(Event::FinishedEvents { .. }) => finished += 1,
                    ServerMessage::Event(Event::Durable { seq, .. }) => seqs.push(seq),
                    _ => {}
                }
            }
            (finished, seqs)
        };
        let attach = Request::Attach { identifier: "t.raw".into(), config: SessionConfig::default(), takeover: false };
        send(&mut s, 1, attach.clone());
        assert_eq!(drain(&mut s).0, 1, "a first attach: one finished_events");
        let spec = TaskSpec::get(url);
        send(&mut s, 2, Request::CreateTasks { identifier: "t.raw".into(), tasks: vec![spec], resume: true });
        let (finished, seqs) = drain(&mut s);
        assert_eq!((finished, seqs.len()), (1, 2), "the task's two events, then one finished_events");
        // Attaching again replays the unacknowledged events: one finished_events after them.
        send(&mut s, 3, attach);
        let (finished, again) = drain(&mut s);
        assert_eq!((finished, again), (1, seqs), "a replay: the same events, one finished_events");
    })
    .await
    .unwrap();
}

/// Many sessions finishing at once relaunch their apps at most `max_concurrent_launches`
/// at a time, in turn: each launch holds a slot until its app attaches; everything is
/// collected in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaunches_wait_their_turn_beyond_max_concurrent_launches() {
    relaunches_within_the_cap(false).await;
}

/// The same with a launcher that puts the app in the background and exits at once with
/// success (as `gtk-launch`, `xdg-open` or a starting unit do): its exit does not free the
/// slot, the app's attach does (before, every session's app came up at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launcher_that_exits_at_once_still_holds_its_launch_slot() {
    relaunches_within_the_cap(true).await;
}

async fn relaunches_within_the_cap(background: bool) {
    let env = TestEnv::new();
    env.set_config("max_concurrent_launches", "2");
    let d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(1000, 71));
    // The app: notes when it started, takes a while to come up, then attaches (which
    // collects and acknowledges everything) as the session's app.
    let log = env.path().join("launches.log");
    let app = env.path().join("app.sh");
    let ctl = dlsession_testkit::bin_path("dlsessionctl");
    let body = format!(
        "echo \"start $1 $(date +%s%N)\" >> {log}\nsleep 0.4\necho \"up $1 $(date +%s%N)\" >> {log}\n\
         exec {ctl} --socket {socket} attach \"$1\" > /dev/null\n",
        log = log.display(),
        ctl = ctl.display(),
        socket = env.socket.display()
    );
    let script = if background { format!("#!/bin/sh\n(\n{body}) &\nexit 0\n") } else { format!("#!/bin/sh\n{body}") };
    std::fs::write(&app, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
    let client = dlsession_testkit::app::client(&env).await;
    let ids: Vec<String> = (0..5).map(|i| format!("t.turn{i}")).collect();
    for id in &ids {
        let launch = dlsession::LaunchSpec::Command { argv: vec![app.to_string_lossy().into_owned(), id.clone()] };
        let config = SessionConfig { launch: Some(launch), ..SessionConfig::default() };
        client.request(Request::OpenSession { identifier: id.clone(), config: Some(config) }).await.unwrap();
    }
    for id in &ids {
        let create =
            Request::CreateTasks { identifier: id.clone(), tasks: vec![TaskSpec::get(server.url("/a"))], resume: true };
        client.request(create).await.unwrap();
    }
    for id in &ids {
        wait_for("every app relaunched and done", LONG, || block(info(&env, id)).filter(|s| s.pending_events == 0));
    }
    // Between its start and coming up, each app holds a slot: never more than two at once.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut edges: Vec<(u128, i32)> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[2].parse().unwrap(), if f[0] == "start" { 1 } else { -1 })
        })
        .collect();
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, step) in &edges {
        now += step;
        most = most.max(now);
    }
    assert_eq!(edges.iter().filter(|e| e.1 == 1).count(), 5, "one launch per session: {text}");
    assert_eq!(most, 2, "at most max_concurrent_launches apps coming up at once: {text}");
    assert!(d.log().contains("relaunch waits for a launch slot"), "{}", d.log());
}

/// Opens session `identifier`, relaunched by `sh -c script`, and gives it a download of
/// `url` with nobody attached: once it is done, the app is relaunched to collect it.
/// Returns the client that asked.
async fn relaunched_by_shell(env: &TestEnv, identifier: &str, script: String, url: String) -> dlsession::Client {
    let argv = vec!["/bin/sh".to_owned(), "-c".to_owned(), script];
    let config = SessionConfig { launch: Some(dlsession::LaunchSpec::Command { argv }), ..SessionConfig::default() };
    let client = dlsession_testkit::app::client(env).await;
    client.request(Request::OpenSession { identifier: identifier.into(), config: Some(config) }).await.unwrap();
    let create = Request::CreateTasks { identifier: identifier.into(), tasks: vec![TaskSpec::get(url)], resume: true };
    client.request(create).await.unwrap();
    client
}

/// A relaunched app that hangs before it attaches (at a password prompt, say) is not started
/// again beside itself at every backoff: the wake fails instead, saying why, until the
/// process ends. Before, a new instance piled up at each try, none ever ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_relaunched_app_is_not_started_again_beside_itself() {
    let env = TestEnv::new();
    env.set_config("wake_initial_ms", "200");
    env.set_config("wake_answer_ms", "100");
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(1000, 9));
    let pids = env.path().join("pids");
    let script = format!("echo $$ >> {}; exec sleep 30", pids.display());
    let _client = relaunched_by_shell(&env, "t.hung", script, server.url("/a")).await;
    let read = || std::fs::read_to_string(&pids).unwrap_or_default();
    wait_for("the first relaunch", LONG, || (!read().is_empty()).then_some(()));
    // Backoffs of 0.2, 0.4, 0.8 and 1.6 s fall in these 3 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = read();
    let wake = block(info(&env, "t.hung")).unwrap().wake;
    kill_listed(&started);
    assert_eq!(started.lines().count(), 1, "one instance, not one per wake: {started}");
    assert!(wake.last_error.as_ref().is_some_and(|e| e.message.contains("still runs")), "{wake:?}");
    assert!(wake.attempts >= 2, "the wakes went on, failing: {wake:?}");
}

/// A relaunched app that attached, collected and stays open (a tray app) is no hung one:
/// when the session has news again, the app is relaunched as before (a single-instance
/// app hands over to the running one), not refused as "still runs".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_attached_and_stays_open_is_relaunched_again() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(1000, 10));
    let pids = env.path().join("pids");
    let ctl = dlsession_testkit::bin_path("dlsessionctl");
    let script = format!(
        "echo $$ >> {pids}; {ctl} --socket {socket} attach t.stays > /dev/null; exec sleep 30",
        pids = pids.display(),
        ctl = ctl.display(),
        socket = env.socket.display()
    );
    let client = relaunched_by_shell(&env, "t.stays", script, server.url("/a")).await;
    let read = || std::fs::read_to_string(&pids).unwrap_or_default();
    wait_for("collected by the first instance", LONG, || {
        block(info(&env, "t.stays")).filter(|s| s.pending_events == 0 && read().lines().count() == 1)
    });
    let create = Request::CreateTasks {
        identifier: "t.stays".into(),
        tasks: vec![TaskSpec::get(server.url("/a"))],
        resume: true,
    };
    client.request(create).await.unwrap();
    // Well before the first instance ends (its sleep is 30 s).
    let started =
        wait_for("a second relaunch", Duration::from_secs(15), || Some(read()).filter(|t| t.lines().count() == 2));
    kill_listed(&started);
}

/// A daemon that is stopping starts no relaunch: a wake that comes due while the stop
/// waits for a download's last sync (held 8 s here) is left to the next start, which plans
/// every session's wakes anyway. Before, the app was started against a daemon about to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_daemon_relaunches_nothing() {
    let env = TestEnv::new();
    // No checkpoint but the stop's: the failpoint holds exactly that one.
    env.set_config("checkpoint_bytes", "1073741824");
    env.set_config("checkpoint_interval_ms", "600000");
    env.set_config("shutdown_grace_ms", "20000");
    let wake_after = Duration::from_millis(2500);
    env.set_config("wake_initial_ms", &wake_after.as_millis().to_string());
    let hold = std::ffi::OsStr::new("checkpoint-after-sync:1:sleep-ms=8000");
    let mut d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", hold)]);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(1000, 5));
    server.add("/big", Resource::generated(64 << 20, 6).throttle(1 << 20));
    // An app that fails without collecting: it is relaunched again after `wake_after`.
    let count = env.path().join("launched");
    let script = format!("echo x >> {}; exit 1", count.display());
    let _b = relaunched_by_shell(&env, "t.stop-b", script, server.url("/a")).await;
    let lines = |p: &std::path::Path| std::fs::read_to_string(p).map_or(0, |t| t.lines().count());
    wait_for("the first relaunch", LONG, || (lines(&count) == 1).then_some(()));
    let first = std::time::Instant::now();
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let a = Session::attach(config(&env, "t.stop-a"), delegate).await.unwrap();
    let task = a.download_tasks(vec![DownloadRequest::new(server.url("/big"))], true).await.unwrap().remove(0);
    events
        .wait("bytes", LONG, |e| matches!(e, Seen::Progress { task: t, total } if *t == task.id() && *total >= 1 << 18))
        .await;
    assert!(first.elapsed() < wake_after, "too slow to stop before the next wake: {:?}", first.elapsed());
    let status = tokio::task::spawn_blocking(move || (d.terminate(), d)).await.unwrap();
    assert!(first.elapsed() > wake_after + Duration::from_secs(1), "the stop ended before the wake came due");
    assert!(status.0.success(), "{}", status.1.log());
    assert_eq!(lines(&count), 1, "relaunched while stopping:\n{}", status.1.log());
}

/// The daemon raises its own descriptor limit; an app it relaunches gets the limit the
/// daemon was started with, as if started from the desktop (a program that uses `select`
/// breaks on descriptors above 1,024).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relaunched_app_gets_the_descriptor_limit_the_daemon_was_started_with() {
    let env = TestEnv::new();
    let hard = std::process::Command::new("/bin/sh").args(["-c", "ulimit -Hn"]).output().unwrap();
    let hard = String::from_utf8_lossy(&hard.stdout).trim().to_owned();
    // A machine whose hard limit leaves nothing to raise cannot run this test, and says so.
    assert!(
        hard == "unlimited" || hard.parse::<u64>().unwrap() > 256,
        "the hard descriptor limit here ({hard}) leaves nothing for the daemon to raise"
    );
    let d = TestDaemon::start_after(&env, "ulimit -Sn 256");
    let raised = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let soft = raised.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().nth(3).unwrap();
    assert_ne!(soft, "256", "the daemon raised its own limit: {raised}");
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(1000, 72));
    let seen = env.path().join("limit.txt");
    relaunched_by_shell(&env, "t.limit", format!("ulimit -Sn > {}", seen.display()), server.url("/a")).await;
    let written =
        wait_for("the app relaunched", LONG, || std::fs::read_to_string(&seen).ok().filter(|s| s.ends_with('\n')));
    assert_eq!(written.trim(), "256", "the app's soft limit");
}

/// A removed session's launch logs go with it (they piled up, a pair per identifier).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_sessions_launch_logs_go_with_it() {
    use dlsession::proto::{Event, ServerMessage};
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(1000, 78));
    let client = relaunched_by_shell(&env, "t.logs", "echo the app ran".into(), server.url("/a")).await;
    let logs = env.state_dir.join("dlsessiond/launch-logs");
    let log = wait_for("the app relaunched and logged", LONG, || {
        std::fs::read_dir(&logs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("the app ran")))
    });
    // The session ends: invalidated, every event acknowledged.
    client.request(Request::FinishTasksAndInvalidate { identifier: "t.logs".into() }).await.unwrap();
    let mut app = dlsession_testkit::raw::RawClient::connect(&env.socket);
    app.send([(1, Request::Attach { identifier: "t.logs".into(), config: Default::default(), takeover: false })]);
    let mut seqs = Vec::new();
    loop {
        match app.recv() {
            ServerMessage::Event(Event::Durable { seq, .. }) => seqs.push(seq),
            ServerMessage::Event(Event::FinishedEvents { .. }) => break,
            _ => {}
        }
    }
    app.send([(2, Request::AckEvents { identifier: "t.logs".into(), seqs })]);
    loop {
        if let ServerMessage::Event(Event::Detached { .. }) = app.recv() {
            break;
        }
    }
    wait_for("the launch log removed", LONG, || (!log.exists()).then_some(()));
}

/// The launch log of a relaunched app that keeps running and talking is capped while it
/// runs (copied to `.log.1` and emptied in place), not only at the next launch: before, a
/// chatty app filled the disk the database lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_apps_launch_log_is_capped_while_it_runs() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(1000, 79));
    let pid_file = env.path().join("pid");
    let script = format!("echo $$ > {}; head -c 3000000 /dev/zero | tr '\\0' x; exec sleep 30", pid_file.display());
    let _client = relaunched_by_shell(&env, "t.chatty", script, server.url("/a")).await;
    let size = |ext: &str| launch_log_size(&env, "t.chatty", ext);
    wait_for("the app's output", LONG, || size(".log").filter(|n| *n >= 3_000_000).map(|_| ()));
    let capped = wait_for("the log capped while the app runs", Duration::from_secs(20), || {
        size(".log").filter(|n| *n < 1 << 20).and(size(".log.1"))
    });
    assert!(capped >= 3_000_000, "the earlier generation kept: {capped}");
    kill_listed(&std::fs::read_to_string(&pid_file).unwrap_or_default());
}

/// The launch log of an app whose launcher put it in the background and exited is still
/// capped while the app talks (it was looked at only while the launched process ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backgrounded_apps_launch_log_is_capped_too() {
    let env = TestEnv::new();
    // One launch only: the next one's start would cap the log anyway.
    env.set_config("wake_initial_ms", "600000");
    env.set_config("wake_max_ms", "600000");
    env.set_config("wake_answer_ms", "600000");
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(1000, 80));
    let pid_file = env.path().join("pid");
    let script = format!(
        "(echo $$ > {}; sleep 1; head -c 200000 /dev/zero | tr '\\0' y; sleep 5; head -c 3000000 /dev/zero | tr '\\0' x; \
         exec sleep 30) & exit 0",
        pid_file.display()
    );
    let _client = relaunched_by_shell(&env, "t.background", script, server.url("/a")).await;
    let size = |ext: &str| launch_log_size(&env, "t.background", ext);
    let capped = wait_for("the log capped while the backgrounded app runs", Duration::from_secs(40), || {
        size(".log").filter(|n| *n < 1 << 20).and(size(".log.1")).filter(|n| *n >= 3_000_000)
    });
    assert!(capped >= 3_000_000, "the earlier generation kept: {capped}");
    kill_listed(&std::fs::read_to_string(&pid_file).unwrap_or_default());
}

/// The size of the launch log (`ext`: ".log" or ".log.1") of the session `identifier`.
fn launch_log_size(env: &TestEnv, identifier: &str, ext: &str) -> Option<u64> {
    let logs = env.state_dir.join("dlsessiond/launch-logs");
    let found = std::fs::read_dir(&logs).ok()?.flatten().map(|e| e.path()).find(|p| {
        p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(identifier) && n.to_string_lossy().ends_with(ext))
    })?;
    std::fs::metadata(found).ok().map(|m| m.len())
}

/// Ends the processes whose pids `listed` holds, one per line (apps a test relaunched
/// that would otherwise outlive it).
fn kill_listed(listed: &str) {
    for pid in listed.lines().filter_map(|p| p.trim().parse::<i32>().ok()).filter_map(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// A relaunched app inherits none of the daemon's sockets (its netlink socket leaked into
/// every app it started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relaunched_app_inherits_no_socket_of_the_daemon() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(1000, 73));
    let seen = env.path().join("fds.txt");
    let list = format!(
        "for f in /proc/$$/fd/*; do echo \"$f $(readlink $f)\"; done > {0}.tmp; mv {0}.tmp {0}",
        seen.display()
    );
    relaunched_by_shell(&env, "t.fds", list, server.url("/a")).await;
    let fds = wait_for("the app relaunched", LONG, || std::fs::read_to_string(&seen).ok());
    assert!(fds.lines().count() >= 3, "{fds}");
    assert!(!fds.contains("socket:"), "the app's descriptors:\n{fds}");
}

/// A relaunched app starts in the user's home, whatever directory the daemon started in;
/// `get --launch-cmd ./app` means the app in the directory `get` ran in; the daemon refuses
/// a relative program path, which would name another file from the home directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relaunched_app_starts_in_the_home_directory() {
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(1000, 77));
    let project = env.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    let seen = env.path().join("pwd.txt");
    let app = project.join("app.sh");
    std::fs::write(&app, format!("#!/bin/sh\npwd > {0}.tmp && mv {0}.tmp {0}\n", seen.display())).unwrap();
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = env.path().join("a.bin");
    let get = env
        .command(dlsession_testkit::bin_path("dlsessionctl"))
        .args(["get", &server.url("/a"), "-o", out.to_str().unwrap(), "--session", "t.cwd", "--launch-cmd", "./app.sh"])
        .current_dir(&project)
        .output()
        .unwrap();
    assert!(get.status.success(), "{get:?}");
    let pwd = wait_for("the app relaunched", LONG, || std::fs::read_to_string(&seen).ok());
    assert_eq!(std::path::Path::new(pwd.trim()), env.home);

    let client = dlsession_testkit::app::client(&env).await;
    let argv = vec!["./app.sh".to_owned()];
    let config = SessionConfig { launch: Some(dlsession::LaunchSpec::Command { argv }), ..SessionConfig::default() };
    let err = client.request(Request::OpenSession { identifier: "t.relative".into(), config: Some(config) }).await;
    let err = err.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidRequest);
    assert!(err.to_string().contains("relative path"), "{err}");
}

/// A daemon with one launch slot, held by the app of session "t.holder" (slow to come up,
/// never attaching), and session `other`, whose app would launch the same way.
async fn one_launch_slot_held(env: &TestEnv, other: &str) -> TestDaemon {
    env.set_config("max_concurrent_launches", "1");
    env.set_config("wake_answer_ms", "60000");
    let d = TestDaemon::start(env);
    let slow = vec!["/bin/sh".to_owned(), "-c".to_owned(), "sleep 10".to_owned()];
    let client = dlsession_testkit::app::client(env).await;
    for id in ["t.holder", other] {
        let launch = Some(dlsession::LaunchSpec::Command { argv: slow.clone() });
        let config = SessionConfig { launch, ..SessionConfig::default() };
        client.request(Request::OpenSession { identifier: id.into(), config: Some(config) }).await.unwrap();
    }
    let holder = client.request(Request::Wake { identifier: "t.holder".into() }).await.unwrap();
    assert!(matches!(holder, Response::Wake(dlsession::proto::WakeOutcome::Launched { .. })), "{holder:?}");
    d
}

/// A `wake` request waiting in line for a launch slot is answered when its session is
/// removed meanwhile (it used to wait for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_waiting_for_a_slot_is_answered_when_its_session_goes() {
    let env = TestEnv::new();
    let _d = one_launch_slot_held(&env, "t.gone").await;
    let waiting = {
        let client = dlsession_testkit::app::client(&env).await;
        tokio::spawn(async move { client.request(Request::Wake { identifier: "t.gone".into() }).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the second wake waits for the slot");
    // Its app attaches by itself, invalidates the session and collects that: it is removed.
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.gone"), delegate).await.unwrap();
    session.invalidate_and_cancel().await.unwrap();
    wait_for("the session removed", LONG, || block(info(&env, "t.gone")).is_none().then_some(()));
    let answer = tokio::time::timeout(LONG, waiting).await.expect("the waiting wake is answered").unwrap();
    match answer {
        Err(dlsession::Error::Daemon(e)) => assert_eq!(e.code, ErrorCode::NoSuchSession, "{e:?}"),
        other => panic!("{other:?}"),
    }
}

/// A `wake` waiting for a launch slot when the daemon stops is answered `shutting_down`
/// (the relaunch will not start): it went unanswered, its connection closed under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_waiting_for_a_slot_is_answered_when_the_daemon_stops() {
    use dlsession::proto::ServerMessage;
    let env = TestEnv::new();
    let d = one_launch_slot_held(&env, "t.waits").await;
    let socket = env.socket.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let mut raw = dlsession_testkit::raw::RawClient::connect(&socket);
        raw.send([(7, Request::Wake { identifier: "t.waits".into() })]);
        // No answer while the slot is taken.
        assert!(raw.recv_within(Duration::from_millis(300)).is_none(), "the second wake waits for the slot");
        raw
    })
    .await
    .unwrap();
    d.signal_term();
    let got = tokio::task::spawn_blocking(move || {
        let mut raw = answer;
        raw.recv_within(Duration::from_secs(10))
    })
    .await
    .unwrap();
    match got {
        Some(ServerMessage::Response { id: 7, result: Err(e) }) => assert_eq!(e.code, ErrorCode::ShuttingDown, "{e:?}"),
        other => panic!("{other:?}"),
    }
}

/// Paced delivery (`ReplayEvents`, what the library asks once its event queue overflowed):
/// the daemon sends at most `room` events from `from_seq` on, holds the rest until asked
/// again, and ends with `finished_events` once every one is out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_replay_sends_no_more_than_the_room_asked_for() {
    use dlsession::proto::{Event, ServerMessage};

    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    finished_while_away(&env, &server, "t.paced", 6, 500, 70).await;
    let socket = env.socket.clone();
    tokio::task::spawn_blocking(move || {
        let mut raw = dlsession_testkit::raw::RawClient::connect(&socket);
        // What comes after a request until nothing more does: durable seqs, and whether
        // `finished_events` came.
        let heard = |raw: &mut dlsession_testkit::raw::RawClient| -> (Vec<u64>, bool) {
            let (mut seqs, mut finished) = (Vec::new(), false);
            while let Some(msg) = raw.recv_within(Duration::from_millis(400)) {
                match msg {
                    ServerMessage::Event(Event::Durable { seq, .. }) => seqs.push(seq),
                    ServerMessage::Event(Event::FinishedEvents { .. }) => finished = true,
                    _ => {}
                }
            }
            (seqs, finished)
        };
        let config = Default::default();
        raw.send([(1, Request::Attach { identifier: "t.paced".into(), config, takeover: false })]);
        let (all, finished) = heard(&mut raw);
        assert_eq!(all.len(), 12, "an attach replays everything: {all:?}");
        assert!(finished);
        let mut got = Vec::new();
        let mut from = all[0];
        for round in 0..3 {
            let replay = Request::ReplayEvents { identifier: "t.paced".into(), from_seq: from, room: 5 };
            raw.send([(10 + round, replay)]);
            let (seqs, finished) = heard(&mut raw);
            let want = if round < 2 { 5 } else { 2 };
            assert_eq!(seqs.len(), want, "round {round}: {seqs:?}");
            assert_eq!(finished, round == 2, "finished_events only once every event is out (round {round})");
            from = seqs.last().unwrap() + 1;
            got.extend(seqs);
        }
        assert_eq!(got, all, "each pending event once, in order");
    })
    .await
    .unwrap();
}
