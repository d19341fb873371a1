//! Clients survive daemon restarts: the library connects again by itself, rejoins its
//! sessions and gets their events (again), requests in flight fail with a typed error, and
//! `dlsessionctl attach --wait` rides it out.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::process::Stdio;
use std::time::Duration;

use dlsession::{DownloadRequest, Error, Session, SessionConfiguration};
use dlsession_testkit::host::signal;
use dlsession_testkit::{LONG, Recorder, Seen};
use dlsession_testkit::{Resource, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex};

/// The daemon is killed and started again while an app is attached and a download runs:
/// the app is told, reconnects by itself, and receives the download's events, byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_app_reconnects_and_gets_its_events() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 6u64 << 20;
    s.add("/big", Resource::generated(len, 51).throttle(3 << 20));
    let dir = env.path().join("out");
    let (delegate, mut events) = Recorder::new(&dir);
    let config = SessionConfiguration::background("t.restart").socket(&env.socket);
    let session = Session::attach(config, delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/big"))], true).await.unwrap().remove(0);
    events.wait("progress", LONG, |e| matches!(e, Seen::Progress { total, .. } if *total > 1 << 20)).await;

    // A request in flight when the daemon dies fails with a typed error, never hangs.
    signal(d.pid(), rustix::process::Signal::STOP);
    let in_flight = tokio::spawn({
        let task = task.clone();
        async move { task.info().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.kill9();
    let err = in_flight.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Disconnected { .. }), "{err:?}");
    events.wait("the app told of the lost connection", LONG, |e| *e == Seen::ConnectionLost).await;

    // Requests made while the daemon is away wait for it (up to their timeout).
    let waiting = tokio::spawn({
        let session = session.clone();
        async move { session.get_all_tasks().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.restart();
    events.wait("the app told it is back", LONG, |e| *e == Seen::Reconnected).await;
    assert_eq!(waiting.await.unwrap().unwrap().len(), 1, "answered once the daemon was back");
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let file = events.moved_to(task.id()).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(51, len)));
    // The events were acknowledged on the new connection.
    dlsession_testkit::wait_until(|| {
        dlsession_testkit::block(session.info())
            .map(|i| i.pending_events == 0 && i.tasks.active() == 0)
            .unwrap_or(false)
    })
    .await;
}

/// The daemon dies after committing new tasks and before answering: the library sends the
/// request again under its creation key once the daemon is back and gets those tasks'
/// ids. Nothing is created twice, and the app knows every task it made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_whose_answer_was_lost_are_created_once() {
    let env = TestEnv::new();
    let lost = std::ffi::OsStr::new("tasks-after-commit:1");
    let mut d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", lost)]);
    let s = TestServer::start().await.unwrap();
    let paths = ["/once-a", "/once-b", "/once-c"];
    for (i, path) in paths.iter().enumerate() {
        s.add(path, Resource::generated(10_000, 60 + i as u64));
    }
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session =
        Session::attach(SessionConfiguration::background("t.once").socket(&env.socket), delegate).await.unwrap();
    let creating = tokio::spawn({
        let session = session.clone();
        let requests: Vec<DownloadRequest> = paths.iter().map(|p| DownloadRequest::new(s.url(p))).collect();
        async move { session.download_tasks(requests, true).await }
    });
    // Committed, then the daemon stops where a crash would: the answer never goes.
    assert!(!d.wait_exit(LONG).success(), "stopped at the failpoint");
    d.set_env(&[]);
    d.restart();
    let tasks = creating.await.unwrap().expect("answered once the daemon was back");
    let mut made: Vec<u64> = tasks.iter().map(|t| t.id()).collect();
    let mut listed: Vec<u64> = session.get_all_tasks().await.unwrap().iter().map(|t| t.id).collect();
    made.sort_unstable();
    listed.sort_unstable();
    assert_eq!(made, listed, "the daemon holds exactly the tasks the app was told of");
    assert_eq!(listed.len(), paths.len());
    for task in &tasks {
        assert_eq!(events.completion(task.id(), LONG).await, None);
    }
    assert!(d.log().contains("created before under this key"), "{}", d.log());
}

/// New tasks start only once their creation is durable: a daemon that dies before that
/// commit has downloaded nothing (else a file could sit at a destination no task owns after
/// the restart), and the request, sent again under its key, creates them then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_start_only_once_their_creation_is_durable() {
    let env = TestEnv::new();
    let slow = std::ffi::OsStr::new("tasks-before-commit:1:sleep-ms=5000");
    let mut d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", slow)]);
    let s = TestServer::start().await.unwrap();
    s.add("/early", Resource::generated(10_000, 70));
    let dest = env.path().join("early.bin");
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let config = SessionConfiguration::background("t.early").socket(&env.socket);
    let session = Session::attach(config, delegate).await.unwrap();
    let creating = tokio::spawn({
        let (session, request) = (session.clone(), DownloadRequest::new(s.url("/early")).destination(&dest));
        async move { session.download_tasks(vec![request], true).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.hits("/early"), 0, "nothing is fetched before the creation is durable");
    d.kill9();
    assert!(!dest.exists());
    d.set_env(&[]);
    d.restart();
    let task = creating.await.unwrap().expect("created once the daemon was back").remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(events.location(task.id()).as_deref(), Some(dest.as_path()), "delivered at its destination");
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(70, 10_000)));
}

/// A batch made in several requests is carried to its end when the app stops waiting for it
/// half-way (a timeout around `download_tasks`): its parts are created suspended and started
/// only once all exist, so a dropped wait left them suspended for ever, unknown to the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_parts_whose_wait_is_dropped_still_starts_whole() {
    let env = TestEnv::new();
    // The second part's commit is held: the wait is dropped meanwhile.
    let slow = std::ffi::OsStr::new("tasks-before-commit:2:sleep-ms=3000");
    let _d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", slow)]);
    let s = TestServer::start().await.unwrap();
    s.add("/part", Resource::generated(1_000, 71));
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let config = SessionConfiguration::background("t.parts").socket(&env.socket);
    let session = Session::attach(config, delegate).await.unwrap();
    let requests = vec![DownloadRequest::new(s.url("/part")); 1_500];
    let waited = tokio::time::timeout(Duration::from_millis(1500), session.download_tasks(requests, true)).await;
    assert!(waited.is_err(), "the wait was meant to end before the batch was made: {waited:?}");
    let deadline = tokio::time::Instant::now() + LONG;
    while s.hits("/part") < 1_500 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of 1,500 tasks fetched: the rest were left suspended",
            s.hits("/part")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A clean restart (SIGTERM, as systemd and upgrades do it) does not end an attached
/// app's session either: the app hears the connection went, rejoins, and gets its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_keeps_the_app_attached() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    s.add("/big", Resource::generated(len, 54).etag("\"r\"").throttle(2 << 20));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let config = SessionConfiguration::background("t.clean").socket(&env.socket);
    let session = Session::attach(config, delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/big"))], true).await.unwrap().remove(0);
    events.wait("progress", LONG, |e| matches!(e, Seen::Progress { total, .. } if *total > 1 << 20)).await;
    let status = tokio::task::block_in_place(|| d.terminate());
    assert!(status.success(), "{status:?}");
    events.wait("the app told of the lost connection", LONG, |e| *e == Seen::ConnectionLost).await;
    d.restart();
    events.wait("the app told it is back", LONG, |e| *e == Seen::Reconnected).await;
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let file = events.moved_to(task.id()).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(54, len)));
    assert!(
        !events.seen.iter().any(|e| matches!(e, Seen::Detached(_))),
        "a restart is not a detach: {:?}",
        events.seen
    );
}

/// A daemon stopping (SIGTERM) while an app's download of `BIG` bytes runs, held in its
/// shutdown by that download's checkpoint (a failpoint pausing `hold_ms`), answering
/// meanwhile.
struct Stopping {
    d: TestDaemon,
    s: TestServer,
    session: Session,
    events: dlsession_testkit::app::Events,
    task: dlsession::DownloadTask,
}

const BIG: u64 = 4 << 20;

async fn stopping(env: &TestEnv, hold_ms: u64, seed: u64) -> Stopping {
    // The shutdown's checkpoint is the first one, the one held.
    env.set_config("checkpoint_interval_ms", "600000");
    let held = format!("checkpoint-after-sync:1:sleep-ms={hold_ms}");
    let d = TestDaemon::start_with_env(env, &[("DLSESSIOND_FAILPOINT", std::ffi::OsStr::new(&held))]);
    let s = TestServer::start().await.unwrap();
    s.add("/big", Resource::generated(BIG, seed).etag("\"r\"").throttle(1 << 20));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let config = SessionConfiguration::background(format!("t.stopping{seed}")).socket(&env.socket);
    let session = Session::attach(config, delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/big"))], true).await.unwrap().remove(0);
    events.wait("progress", LONG, |e| matches!(e, Seen::Progress { total, .. } if *total > 0)).await;
    d.signal_term();
    tokio::task::block_in_place(|| d.wait_logged("shutting down: checkpointing running downloads", LONG));
    Stopping { d, s, session, events, task }
}

/// Requests the daemon refuses while it stops (SIGTERM, as a restart or an upgrade does it)
/// go again once it is back: the app gets its answer, not `shutting_down`. The daemon is
/// held in its shutdown by its last checkpoint (a failpoint), answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_while_the_daemon_stops_go_again_once_it_is_back() {
    let env = TestEnv::new();
    let Stopping { mut d, s, session, mut events, task: big } = stopping(&env, 3_000, 73).await;
    s.add("/small", Resource::generated(10_000, 74));
    let creating = tokio::spawn({
        let session = session.clone();
        let small = DownloadRequest::new(s.url("/small"));
        async move { session.download_tasks(vec![small], true).await }
    });
    let suspending = tokio::spawn(async move { big.suspend().await.map(|()| big) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!creating.is_finished() && !suspending.is_finished(), "refused, they wait for the daemon to come back");
    assert!(tokio::task::block_in_place(|| d.wait_exit(LONG)).success());
    d.set_env(&[]);
    d.restart();
    let small = creating.await.unwrap().expect("created once the daemon was back").remove(0);
    let big = suspending.await.unwrap().expect("suspended once the daemon was back");
    assert_eq!(events.completion(small.id(), LONG).await, None);
    let file = events.moved_to(small.id()).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(74, 10_000)));
    let info = big.info().await.unwrap();
    assert_eq!(info.state, dlsession::TaskState::Suspended, "{info:?}");
}

/// A change committed while the daemon stops is answered before it exits: a `dlsessionctl
/// get` whose tasks were being committed when SIGTERM came prints them and exits 0 (the
/// daemon used to exit without the answer, the command failing though its task was made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_while_the_daemon_stops_is_answered() {
    let env = TestEnv::new();
    let held = std::ffi::OsStr::new("tasks-before-commit:1:sleep-ms=1500");
    let mut d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", held)]);
    let s = TestServer::start().await.unwrap();
    s.add("/f", Resource::generated(1_000, 75));
    let dest = env.path().join("f.bin");
    let ctl = spawn_ctl(&env, &["get", &s.url("/f"), "-o", dest.to_str().unwrap(), "--session", "t.stopcommit"]);
    tokio::task::block_in_place(|| d.wait_logged("failpoint tasks-before-commit reached", LONG));
    d.signal_term();
    let out = tokio::task::block_in_place(|| ctl.wait_with_output()).unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}\nlog: {}", d.log());
    assert!(tokio::task::block_in_place(|| d.wait_exit(LONG)).success());
    // The task the command was told of is the one the daemon holds, and it runs once back.
    d.set_env(&[]);
    d.restart();
    let listed = env.ctl(&["tasks", "--session", "t.stopcommit", "--json"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    let id = stdout.strip_prefix("task ").and_then(|rest| rest.split(':').next()).unwrap_or_default();
    assert!(!id.is_empty() && listed.contains(&format!("\"id\":{id}")), "told {stdout:?}, holds {listed}");
}

/// A second stop signal ends the daemon at once (as a second Ctrl-C is meant to), not after
/// its shutdown's checkpoints; the next start recovers from the last commit, byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_ends_the_daemon_at_once() {
    let env = TestEnv::new();
    env.set_config("shutdown_grace_ms", "60000");
    let Stopping { mut d, s: _s, session: _session, mut events, task } = stopping(&env, 60_000, 76).await;
    d.signal_term();
    let status = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(5)));
    assert!(!status.success(), "{status:?}");
    assert!(d.log().contains("a second stop signal"), "{}", d.log());
    d.set_env(&[]);
    d.restart();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let file = events.moved_to(task.id()).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(76, BIG)));
}

/// Starts `dlsessionctl ARGS`, its output piped. The test restarts the daemon itself: the
/// command must not start one first.
fn spawn_ctl(env: &TestEnv, args: &[&str]) -> std::process::Child {
    env.command(dlsession_testkit::bin_path("dlsessionctl"))
        .args(args)
        .env("DLSESSION_NO_AUTOSTART", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `dlsessionctl attach --wait` stays until the session is drained, across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_wait_rides_out_a_restart() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    s.add("/w", Resource::generated(len, 52).throttle(2 << 20));
    let out = env.path().join("collected");
    let created =
        env.ctl(&["get", &s.url("/w"), "-o", env.path().join("w.bin").to_str().unwrap(), "--session", "t.wait"]);
    assert!(created.status.success(), "{created:?}");
    let mut attach = spawn_ctl(&env, &["attach", "t.wait", "--wait", "--move-to", out.to_str().unwrap()]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(attach.try_wait().unwrap().is_none(), "still waiting for the download");
    d.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.restart();
    let status = dlsession_testkit::wait_for("attach --wait to finish", LONG, || attach.try_wait().unwrap());
    let output = attach.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("connected to dlsessiond again"), "{stderr}");
    assert_eq!(sha256_file(&out.join("w")).unwrap(), to_hex(&pattern_sha256(52, len)));
}

/// `dlsessionctl watch` across a restart: a task that completed while it was away (the
/// daemon sends only tasks not completed on the new connection) still ends the watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_a_task_completed_while_it_reconnected() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    s.add("/v", Resource::generated(8 << 20, 54).throttle(1 << 20));
    let out = env.path().join("v.bin");
    let created = env.ctl(&["--json", "get", &s.url("/v"), "-o", out.to_str().unwrap(), "--session", "t.watch"]);
    assert!(created.status.success(), "{created:?}");
    let task: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let id = task["task"].as_u64().unwrap().to_string();
    let mut watch = spawn_ctl(&env, &["watch", "--session", "t.watch"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.kill9();
    // Its tries to connect again are 1.6 s apart by then, and the next 3.2 s.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    d.restart();
    let cancel = env.ctl(&["cancel", &id]);
    assert!(cancel.status.success(), "{cancel:?}");
    let status = dlsession_testkit::wait_for("watch to finish", Duration::from_secs(20), || watch.try_wait().unwrap());
    let output = watch.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("cancelled"), "{stdout}");
}

/// `attach --move-to` acknowledges nothing whose file it could not move: the file stays
/// in the daemon's cache, and the next attach moves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_keeps_what_it_could_not_move() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    s.add("/m", Resource::generated(70_000, 53));
    // Without --wait the events stay for whoever collects them: here `attach`.
    let get = env.ctl(&["get", &s.url("/m"), "-d", env.path().join("d").to_str().unwrap(), "--session", "t.keep2"]);
    assert!(get.status.success(), "{get:?}");
    dlsession_testkit::wait_until(|| {
        let out = env.ctl(&["--json", "tasks", "--session", "t.keep2"]);
        String::from_utf8_lossy(&out.stdout).contains("\"completed\"")
    })
    .await;
    // A destination that cannot take the file: a directory where the file should go.
    let dir = env.path().join("collect");
    std::fs::create_dir_all(dir.join("m")).unwrap();
    for n in 1..1000 {
        std::fs::create_dir_all(dir.join(format!("m ({n})"))).unwrap();
    }
    let first = env.ctl(&["attach", "t.keep2", "--move-to", dir.to_str().unwrap()]);
    assert_eq!(first.status.code(), Some(1), "{first:?}");
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(stderr.contains("stays in dlsessiond's cache"), "{stderr}");
    let sessions = env.ctl(&["--json", "sessions"]);
    let list: serde_json::Value = serde_json::from_slice(&sessions.stdout).unwrap();
    let keep2 = list.as_array().unwrap().iter().find(|s| s["identifier"] == "t.keep2").unwrap();
    assert_eq!(keep2["pending_events"], 2, "nothing acknowledged: {keep2}");
    // The destination is fixed: the next attach moves it and acknowledges.
    std::fs::remove_dir(dir.join("m")).unwrap();
    let second = env.ctl(&["attach", "t.keep2", "--move-to", dir.to_str().unwrap()]);
    assert!(second.status.success(), "{second:?}");
    assert_eq!(sha256_file(&dir.join("m")).unwrap(), to_hex(&pattern_sha256(53, 70_000)));
}

/// Every request has a deadline: a daemon that stops answering (here: stopped with
/// SIGSTOP) makes it fail with `timed_out`, not hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_stops_answering_times_requests_out() {
    let env = TestEnv::new();
    let d = TestDaemon::start(&env);
    let client = dlsession::Client::connect(dlsession::ClientOptions {
        socket: Some(env.socket.clone()),
        autostart: false,
        request_timeout: Duration::from_millis(500),
        ..dlsession::ClientOptions::default()
    })
    .await
    .unwrap();
    signal(d.pid(), rustix::process::Signal::STOP);
    let started = std::time::Instant::now();
    let err = client.request(dlsession::proto::Request::Status).await.unwrap_err();
    signal(d.pid(), rustix::process::Signal::CONT);
    assert!(matches!(err, Error::TimedOut { .. }), "{err:?}");
    assert_eq!(err.code(), dlsession::ErrorCode::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A slow app with a small event queue: the events that did not fit are asked for again,
/// and every one arrives (at least once), in order: no task's completion reaches the
/// delegate before its file (a live event let through while the replay was asked for
/// overtook the older ones the replay brings); the session ends up drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_overflow_the_queue_come_again() {
    struct Slow(tokio::sync::mpsc::UnboundedSender<u64>, std::sync::Mutex<Vec<(bool, u64)>>);
    impl dlsession::SessionDelegate for Slow {
        fn did_finish_downloading_to(&self, _: &Session, task: &dlsession::DownloadTask, _: &std::path::Path) {
            self.1.lock().unwrap().push((false, task.id()));
        }
        fn did_complete_with_error(
            &self,
            _: &Session,
            task: &dlsession::DownloadTask,
            _: Option<&dlsession::TaskError>,
        ) {
            self.1.lock().unwrap().push((true, task.id()));
            std::thread::sleep(Duration::from_millis(20));
            let _ = self.0.send(task.id());
        }
    }
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let n = 40u64;
    let (s, client) = small_files_and_a_queue_of_4(&env, "e", n, 200).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let config = SessionConfiguration::background("t.overflow");
    let delegate = std::sync::Arc::new(Slow(tx, std::sync::Mutex::default()));
    let session = Session::attach_with(&client, config, delegate.clone()).await.unwrap();
    let reqs = (0..n).map(|i| DownloadRequest::new(s.url(&format!("/e{i}")))).collect();
    let tasks = session.download_tasks(reqs, true).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < tasks.len() {
        let id = tokio::time::timeout(LONG, rx.recv()).await.expect("every completion arrives").unwrap();
        seen.insert(id);
    }
    let order = delegate.1.lock().unwrap().clone();
    for task in &tasks {
        let first = |completed| order.iter().position(|&(c, t)| c == completed && t == task.id());
        assert!(first(false).is_some(), "task {}: its file never came: {order:?}", task.id());
        assert!(first(false) < first(true), "task {}: completed before its file came: {order:?}", task.id());
    }
    dlsession_testkit::wait_until(|| {
        dlsession_testkit::block(session.info()).map(|i| i.pending_events == 0).unwrap_or(false)
    })
    .await;
}

/// A change another client made to an attached app's session (here `dlsessionctl limit`)
/// survives the app's rejoin after a restart: the rejoin sends the stored configuration,
/// not what the app set when it attached (which undid the change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_keeps_what_another_client_changed() {
    use dlsession::proto::{LimitTarget, Request, Response};
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let config = SessionConfiguration::background("t.limited").socket(&env.socket).bandwidth_limit(1 << 20);
    let _session = Session::attach(config, delegate).await.unwrap();
    let user = dlsession_testkit::app::client(&env).await;
    let target = LimitTarget::Session { identifier: "t.limited".into() };
    user.request(Request::SetBandwidthLimit { target, bytes_per_second: Some(100 << 10) }).await.unwrap();
    d.kill9();
    events.wait("the app told of the lost connection", LONG, |e| *e == Seen::ConnectionLost).await;
    d.restart();
    events.wait("the app told it is back", LONG, |e| *e == Seen::Reconnected).await;
    let user = dlsession_testkit::app::client(&env).await;
    let info = dlsession_testkit::wait_for("the rejoin", LONG, || {
        match dlsession_testkit::block(user.request(Request::GetSession { identifier: "t.limited".into() })) {
            Ok(Response::Session(info)) if info.attached => Some(info),
            _ => None,
        }
    });
    assert_eq!(info.config.bandwidth_limit, Some(100 << 10), "the user's limit, not the app's first one");
}

/// An app that registers for wakes while the daemon is away is woken once it is back: the
/// registration is kept for the next connection (it was lost, and the app relaunched
/// instead of woken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_handler_registered_while_the_daemon_is_away_works_once_it_is_back() {
    use dlsession::proto::{Request, Response, SessionConfig, WakeOutcome};
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let app = dlsession::Client::connect(dlsession::ClientOptions {
        socket: Some(env.socket.clone()),
        app_id: Some("org.example.woken".into()),
        autostart: false,
        ..dlsession::ClientOptions::default()
    })
    .await
    .unwrap();
    d.kill9();
    dlsession_testkit::wait_until(|| !app.is_connected()).await;
    let (handler, mut told) = dlsession_testkit::app::IgnoredWakes::new();
    app.handle_wakes(handler);
    d.restart();
    dlsession_testkit::wait_until(|| app.is_connected()).await;
    let user = dlsession_testkit::app::client(&env).await;
    let config = SessionConfig { app_id: Some("org.example.woken".into()), ..SessionConfig::default() };
    user.request(Request::OpenSession { identifier: "t.woken".into(), config: Some(config) }).await.unwrap();
    let outcome = dlsession_testkit::wait_for("the app's connection to handle wakes", LONG, || {
        match dlsession_testkit::block(user.request(Request::Wake { identifier: "t.woken".into() })) {
            Ok(Response::Wake(WakeOutcome::Woken { connections })) => Some(connections),
            _ => None,
        }
    });
    assert_eq!(outcome, 1);
    let heard = tokio::time::timeout(LONG, told.recv()).await.unwrap();
    assert_eq!(heard.as_deref(), Some("t.woken"));
}

/// A session another process took while this one was away stays with it: the rejoin does
/// not take it back, and this process hears that it was taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_never_takes_a_session_from_another_process() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let dir = env.path().join("a");
    let (delegate, mut events) = Recorder::new(&dir);
    let a =
        Session::attach(SessionConfiguration::background("t.contested").socket(&env.socket), delegate).await.unwrap();
    d.kill9();
    // Long enough for the first process's reconnect backoff to grow past a second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    d.restart();
    let (delegate_b, _events_b) = Recorder::new(&env.path().join("b"));
    let _b = Session::attach(SessionConfiguration::background("t.contested").socket(&env.socket), delegate_b)
        .await
        .expect("the other process attaches while the first is still away");
    events
        .wait("the first process told it was taken over", LONG, |e| {
            *e == Seen::Detached(dlsession::DetachReason::TakenOver)
        })
        .await;
    let info = a.info().await.unwrap();
    assert!(info.attached, "still attached: by the other process");
}

/// An app the daemon relaunched keeps running when the daemon stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relaunched_app_outlives_the_daemon() {
    use dlsession::proto::{LaunchSpec, Request, SessionConfig, TaskSpec};
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    s.add("/x", Resource::generated(1000, 60));
    let pidfile = env.path().join("app.pid");
    let c = dlsession_testkit::app::client(&env).await;
    let config = SessionConfig {
        launch: Some(LaunchSpec::Command {
            argv: vec!["/bin/sh".into(), "-c".into(), format!("echo $$ > {}; exec sleep 30", pidfile.display())],
        }),
        ..SessionConfig::default()
    };
    c.request(Request::OpenSession { identifier: "t.outlive".into(), config: Some(config) }).await.unwrap();
    c.create_tasks("t.outlive", vec![TaskSpec::get(s.url("/x"))], true).await.unwrap();
    let pid: i32 = dlsession_testkit::wait_for("the relaunched app", LONG, || {
        std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse().ok())
    });
    drop(c);
    assert!(d.terminate().success());
    let alive = rustix::process::test_kill_process(rustix::process::Pid::from_raw(pid).unwrap()).is_ok();
    assert!(alive, "the app died with the daemon");
    let _ = rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), rustix::process::Signal::KILL);
}

/// After a daemon restart, an app that handles wakes is not woken for a session it is
/// rejoining itself. Before, the library registered for wakes ahead of its rejoins: the
/// daemon saw the session unattached with events waiting and woke this very app, whose
/// handler was asked to rejoin a session it had (or another process of it could take it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_is_not_woken_for_a_session_it_is_rejoining() {
    use dlsession::{DownloadTask, Handled, SessionDelegate};
    /// Keeps every file for later: the events stay unacknowledged.
    struct Keeper;
    impl SessionDelegate for Keeper {
        fn finish_downloading(&self, _: &Session, _: &DownloadTask, _: &std::path::Path) -> Handled {
            Handled::Later
        }
    }
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    s.add("/f", Resource::generated(1000, 3));
    let app = dlsession::Client::connect(dlsession::ClientOptions {
        socket: Some(env.socket.clone()),
        app_id: Some("org.example.self".into()),
        autostart: false,
        ..dlsession::ClientOptions::default()
    })
    .await
    .unwrap();
    let (handler, mut told) = dlsession_testkit::app::IgnoredWakes::new();
    app.handle_wakes(handler);
    let config = SessionConfiguration::background("t.self").socket(&env.socket).app_id("org.example.self");
    let session = Session::attach_with(&app, config, std::sync::Arc::new(Keeper)).await.unwrap();
    session.download_tasks(vec![DownloadRequest::new(s.url("/f"))], true).await.unwrap();
    dlsession_testkit::wait_until(|| {
        dlsession_testkit::block(session.info()).is_ok_and(|i| i.pending_events >= 2 && i.tasks.active() == 0)
    })
    .await;

    d.kill9();
    dlsession_testkit::wait_until(|| !app.is_connected()).await;
    d.restart();
    dlsession_testkit::wait_until(|| app.is_connected()).await;
    dlsession_testkit::wait_until(|| dlsession_testkit::block(session.info()).is_ok_and(|i| i.attached)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(told.try_recv().is_err(), "the app was woken for a session it was rejoining");
    assert!(dlsession_testkit::block(session.info()).unwrap().attached);
}

/// A session stored before a rule about its configuration was added (here a relative
/// launch path, refused since) is rejoined with that configuration as stored: before, every
/// rejoin was refused with `invalid_request` and retried for ever, the app silently cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stored_under_older_rules_is_rejoined() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let config = SessionConfiguration::background("t.older").socket(&env.socket).launch_command(["/bin/true"]);
    let session = Session::attach(config, delegate).await.unwrap();
    d.kill9();
    events.wait("the app told of the lost connection", LONG, |e| *e == Seen::ConnectionLost).await;
    let db = rusqlite::Connection::open(env.database()).unwrap();
    let changed = db.execute("UPDATE sessions SET launch_value = './app.sh' WHERE identifier = 't.older'", []).unwrap();
    assert_eq!(changed, 1);
    drop(db);
    d.restart();
    events.wait("the app told it is back", LONG, |e| *e == Seen::Reconnected).await;
    dlsession_testkit::wait_for("the rejoin", LONG, || {
        dlsession_testkit::block(session.info()).ok().filter(|i| i.attached).map(|_| ())
    });
}

/// A session whose event queue is full when the daemon goes away still hears that the
/// connection was lost (and that it is back): the notices wait for room instead of being
/// dropped as progress is (before, the delegate never heard `did_lose_connection`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_event_queue_still_hears_the_connection_lost() {
    use std::sync::Mutex;
    struct Gate {
        open: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        heard: tokio::sync::mpsc::UnboundedSender<&'static str>,
    }
    impl dlsession::SessionDelegate for Gate {
        fn did_complete_with_error(&self, _: &Session, _: &dlsession::DownloadTask, _: Option<&dlsession::TaskError>) {
            let gate = self.open.lock().unwrap().take();
            if let Some(rx) = gate {
                let _ = self.heard.send("held");
                let _ = rx.recv();
            }
        }
        fn did_lose_connection(&self, _: &Session, _: &str) {
            let _ = self.heard.send("lost");
        }
        fn did_reconnect(&self, _: &Session) {
            let _ = self.heard.send("back");
        }
    }
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let n = 20u64;
    let (s, client) = small_files_and_a_queue_of_4(&env, "q", n, 300).await;
    let (open, gate) = std::sync::mpsc::channel();
    let (heard, mut told) = tokio::sync::mpsc::unbounded_channel();
    let delegate = std::sync::Arc::new(Gate { open: Mutex::new(Some(gate)), heard });
    let config = SessionConfiguration::background("t.full");
    let session = Session::attach_with(&client, config, delegate).await.unwrap();
    let reqs = (0..n).map(|i| DownloadRequest::new(s.url(&format!("/q{i}")))).collect();
    session.download_tasks(reqs, true).await.unwrap();
    assert_eq!(tokio::time::timeout(LONG, told.recv()).await.unwrap(), Some("held"));
    // The other downloads finish meanwhile: their events fill the queue of 4.
    dlsession_testkit::wait_until(|| dlsession_testkit::block(session.info()).is_ok_and(|i| i.tasks.active() == 0))
        .await;
    d.kill9();
    dlsession_testkit::wait_until(|| !client.is_connected()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.restart();
    dlsession_testkit::wait_until(|| client.is_connected()).await;
    open.send(()).unwrap();
    let mut notices = Vec::new();
    while notices.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), told.recv()).await {
            Ok(Some(notice)) => notices.push(notice),
            _ => break,
        }
    }
    assert_eq!(notices, ["lost", "back"]);
}

/// A server with `n` files of 1,000 bytes (`/{prefix}{i}`, seeds from `seed`) and a client
/// whose sessions queue at most 4 events.
async fn small_files_and_a_queue_of_4(
    env: &TestEnv,
    prefix: &str,
    n: u64,
    seed: u64,
) -> (TestServer, dlsession::Client) {
    let s = TestServer::start().await.unwrap();
    for i in 0..n {
        s.add(&format!("/{prefix}{i}"), Resource::generated(1000, seed + i));
    }
    let options = dlsession::ClientOptions {
        socket: Some(env.socket.clone()),
        autostart: false,
        event_queue: 4,
        ..dlsession::ClientOptions::default()
    };
    (s, dlsession::Client::connect(options).await.unwrap())
}
