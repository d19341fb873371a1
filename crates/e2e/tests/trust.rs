//! Trust under real conditions: hostile `Retry-After` values, wall-clock jumps, workers
//! that panic or hang, and `resume` of a task that is backing off.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dlsession::proto::{Event, Request, Response, ServerMessage, SessionProxy, WaitReason};
use dlsession::{DownloadRequest, ErrorCode, Session, SessionConfiguration, TaskState};
use dlsession_testkit::LONG;
use dlsession_testkit::app::attach;
use dlsession_testkit::host::{mode, now_ms};
use dlsession_testkit::{Fault, Hits, Resource, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex};

fn unavailable(retry_after: &str) -> Resource {
    Resource::generated(10, 1).fault(Hits::All, Fault::Status { code: 503, retry_after: Some(retry_after.into()) })
}

/// Whatever a server puts in `Retry-After` (delta-seconds past `u64::MAX`, dates years
/// ahead, garbage) becomes a bounded wait: no request storm, no task parked for ever, and
/// past the resource deadline the task times out at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_never_storms_and_never_parks_a_task() {
    let env = TestEnv::new();
    env.set_config("retry_after_max_ms", "1500");
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let years_ahead = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(50 * 365 * 86_400));
    let cases = [
        ("/max", "18446744073709551615".to_owned()),
        ("/near-max", "18446744073709500".to_owned()),
        ("/past-max", "99999999999999999999999999".to_owned()),
        ("/date", years_ahead),
        ("/garbage", "soon, maybe".to_owned()),
        ("/negative", "-5".to_owned()),
    ];
    for (path, value) in &cases {
        s.add(path, unavailable(value));
    }
    let (session, _events) = attach(&env, SessionConfiguration::background("t.retry-after")).await;
    let reqs = cases.iter().map(|(p, _)| DownloadRequest::new(s.url(p))).collect();
    let tasks = session.download_tasks(reqs, true).await.unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let elapsed = started.elapsed().as_secs_f64();
    for ((path, value), task) in cases.iter().zip(&tasks) {
        let hits = s.hits(path);
        let info = task.info().await.unwrap();
        assert_eq!(info.state, TaskState::Waiting, "{path}: {info:?}");
        let Some(WaitReason::Backoff { until, last_error, .. }) = &info.wait else { panic!("{path}: {info:?}") };
        assert_eq!(last_error.http_status, Some(503));
        let now = now_ms();
        assert!(*until <= now + 2_300, "{path}: waits until {until}, now {now}: beyond the cap");
        // A huge value is capped at 1.5 s (about 3 requests in 4 s); garbage falls back to
        // our own backoff from 100 ms, doubling (about 6). Never a storm.
        assert!(hits >= 2, "{path} ({value}): retried {hits} times in {elapsed:.1} s: parked");
        assert!(hits <= 8, "{path} ({value}): {hits} requests in {elapsed:.1} s: a storm");
    }
    // With the resource deadline closer than the server's wait: timed out at once.
    let env2 = TestEnv::new();
    let _d2 = TestDaemon::start(&env2);
    s.add("/hour", unavailable("3600"));
    let config = SessionConfiguration::background("t.deadline").timeout_for_resource(Duration::from_secs(20));
    let (session, mut events) = attach(&env2, config).await;
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/hour"))], true).await.unwrap().remove(0);
    let err = tokio::time::timeout(Duration::from_secs(10), events.completion(task.id(), LONG))
        .await
        .expect("timed out at once, not after the hour")
        .unwrap();
    assert_eq!(err.code, ErrorCode::TimedOut, "{err}");
    assert_eq!(err.http_status, Some(503));
    assert_eq!(s.hits("/hour"), 1);
}

/// A daemon whose events expire after a day and whose wall clock the test moves (write
/// `+Nd` to the returned file, then restart it).
fn retention_of_a_day() -> (TestEnv, PathBuf, TestDaemon) {
    let env = TestEnv::new();
    env.set_config("event_retention_days", "1");
    env.set_config("wake_initial_ms", "300");
    let clock = env.path().join("faketime");
    let d = faked_clock_daemon(&env, &clock);
    (env, clock, d)
}

/// The daemon with its wall clock under a file's control (libfaketime), its monotonic
/// clock untouched.
fn faked_clock_daemon(env: &TestEnv, offset_file: &Path) -> TestDaemon {
    let lib = ["/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1", "/usr/lib/faketime/libfaketimeMT.so.1"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("libfaketime is needed to move the daemon's wall clock: apt-get install faketime (CI does)");
    std::fs::write(offset_file, "+0\n").unwrap();
    TestDaemon::start_with_env(
        env,
        &[
            ("LD_PRELOAD", lib.as_os_str()),
            ("FAKETIME_TIMESTAMP_FILE", offset_file.as_os_str()),
            ("FAKETIME_NO_CACHE", OsStr::new("1")),
            ("DONT_FAKE_MONOTONIC", OsStr::new("1")),
        ],
    )
}

/// A begin date comes nearer when the wall clock moves forward without the monotonic clock
/// (a machine that slept, a clock set forward): the task starts soon after its date, not
/// when the monotonic time it was given runs out (two hours later here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_date_is_kept_when_the_wall_clock_moves_forward() {
    use dlsession::proto::{Request, TaskSpec};
    let env = TestEnv::new();
    let clock = env.path().join("faketime");
    let _d = faked_clock_daemon(&env, &clock);
    let s = TestServer::start().await.unwrap();
    s.add("/later", Resource::generated(1000, 16));
    let c = dlsession_testkit::app::client(&env).await;
    c.request(Request::OpenSession { identifier: "t.begin".into(), config: None }).await.unwrap();
    let spec = TaskSpec { earliest_begin: Some(now_ms() + 2 * 3600 * 1000), ..TaskSpec::get(s.url("/later")) };
    c.create_tasks("t.begin", vec![spec], true).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(s.hits("/later"), 0, "not before its date");
    // The machine "sleeps" two hours: the wall clock jumps, the monotonic one does not.
    std::fs::write(&clock, "+2h\n").unwrap();
    let moved = Instant::now();
    dlsession_testkit::wait_for("the task to start at its date", Duration::from_secs(40), || {
        (s.hits("/later") > 0).then_some(())
    });
    assert!(moved.elapsed() < Duration::from_secs(30), "started {:?} after the date came", moved.elapsed());
}

/// Setting the wall clock hours back or forward neither parks a backing-off task for hours
/// nor makes every waiting task retry at once: delays run on the monotonic clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_neither_storm_nor_hang() {
    let env = TestEnv::new();
    env.set_config("retry_initial_ms", "1500");
    env.set_config("retry_max_ms", "1500");
    let clock = env.path().join("faketime");
    let _d = faked_clock_daemon(&env, &clock);
    let s = TestServer::start().await.unwrap();
    s.add(
        "/flaky",
        Resource::generated(50_000, 3).fault(Hits::First(2), Fault::Status { code: 500, retry_after: None }),
    );
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.clock")).await;
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/flaky"))], true).await.unwrap().remove(0);
    dlsession_testkit::wait_until(|| s.hits("/flaky") == 1).await;
    // Five hours back while the first retry is 1.5 s away.
    std::fs::write(&clock, "-5h\n").unwrap();
    let backward = Instant::now();
    dlsession_testkit::wait_until(|| s.hits("/flaky") == 2).await;
    let waited = backward.elapsed();
    assert!(waited < Duration::from_secs(5), "the retry waited {waited:?} after the clock went back");
    // Then ten hours forward: the next retry still comes after its own 1.5 s, not at once.
    std::fs::write(&clock, "+5h\n").unwrap();
    let forward = Instant::now();
    dlsession_testkit::wait_until(|| s.hits("/flaky") == 3).await;
    assert!(forward.elapsed() >= Duration::from_millis(1000), "retried {:?} after the jump", forward.elapsed());
    assert_eq!(events.completion(task.id(), LONG).await, None);
}

/// `resume` of a task that is backing off retries it now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_retries_a_backing_off_task_now() {
    let env = TestEnv::new();
    env.set_config("retry_initial_ms", "600000");
    env.set_config("retry_max_ms", "600000");
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    s.add("/once", Resource::generated(20_000, 4).fault(Hits::Nth(1), Fault::Status { code: 503, retry_after: None }));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.nudge")).await;
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/once"))], true).await.unwrap().remove(0);
    dlsession_testkit::wait_for("backoff", LONG, || {
        let info = dlsession_testkit::block(task.info()).unwrap();
        matches!(info.wait, Some(WaitReason::Backoff { .. })).then_some(())
    });
    let out = env.ctl(&["resume", &task.id().to_string()]);
    assert!(out.status.success(), "{out:?}");
    let done = tokio::time::timeout(Duration::from_secs(20), events.completion(task.id(), LONG)).await;
    assert_eq!(done.expect("retried at once, not in 10 minutes"), None);
    assert_eq!(s.hits("/once"), 2);
}

/// A worker that panics fails its attempt with `internal`; the task retries and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_fails_only_its_attempt() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", OsStr::new("worker-response:1:panic"))]);
    let s = TestServer::start().await.unwrap();
    s.add("/p", Resource::generated(200_000, 5));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.panic")).await;
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/p"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(5, 200_000)));
    assert_eq!(s.hits("/p"), 2, "the second attempt did it");
    let log = d.log();
    assert!(log.contains("the download worker failed: failpoint worker-response"), "{log}");
    assert!(session.get_all_tasks().await.is_ok(), "the daemon is fine");
    assert!(d.terminate().success());
}

/// A connection whose task panics (a bug) is closed for the core too: the session it held is
/// free for the app's next attach (it stayed attached to the dead connection: `session_in_use`,
/// its events going nowhere, no wake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_connection_frees_its_session() {
    let env = TestEnv::new();
    let d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", OsStr::new("connection-request:2:panic"))]);
    let first = dlsession_testkit::app::client(&env).await;
    let attach = Request::Attach { identifier: "t.conn".into(), config: Default::default(), takeover: false };
    first.request(attach.clone()).await.unwrap();
    // Its second request panics the connection's task.
    assert!(first.request(Request::Status).await.is_err());
    d.wait_logged("failpoint connection-request reached", LONG);
    let next = dlsession_testkit::app::client(&env).await;
    dlsession_testkit::wait_for("the session free again", LONG, || {
        match dlsession_testkit::block(next.request(Request::GetSession { identifier: "t.conn".into() })) {
            Ok(Response::Session(info)) if !info.attached => Some(()),
            _ => None,
        }
    });
    assert!(matches!(next.request(attach).await, Ok(Response::Session(_))), "attached again without takeover");
}

/// A database thread that panics (a bug) stops the daemon with an error, instead of every
/// later commit waiting for ever unanswered; the next start goes on from the last commit, and
/// the app's create, sent again under its key, makes its task once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_database_thread_stops_the_daemon() {
    let env = TestEnv::new();
    // No backtrace: symbolizing one took a minute on a debug build.
    let mut d = TestDaemon::start_with_env(
        &env,
        &[("DLSESSIOND_FAILPOINT", OsStr::new("tasks-before-commit:1:panic")), ("RUST_BACKTRACE", OsStr::new("0"))],
    );
    let s = TestServer::start().await.unwrap();
    s.add("/f", Resource::generated(1_000, 3));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.db")).await;
    let creating = {
        let session = session.clone();
        let url = s.url("/f");
        tokio::spawn(async move { session.download_tasks(vec![DownloadRequest::new(url)], true).await })
    };
    let status = d.wait_exit(LONG);
    assert_eq!(status.code(), Some(1), "{}", d.log());
    assert!(d.log().contains("the database thread panicked"), "{}", d.log());
    // What the thread held heard it would not be written: the stop waited for nothing.
    assert!(!d.log().contains("grace period over"), "{}", d.log());
    d.set_env(&[]);
    d.restart();
    let tasks = creating.await.unwrap().unwrap();
    assert_eq!(events.completion(tasks[0].id(), LONG).await, None);
    // A second task made under the same key would be fetching by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.hits("/f"), 1, "made once");
}

/// A daemon whose first checkpoint sync sticks for a minute (on a 4 MiB download at
/// 4 MiB/s, `/stuck` on the returned server, a pattern of `seed`), told to stop a worker
/// silent for 0.5 s and to abandon it 1 s later; `config` adds settings.
async fn stuck_worker(config: &[(&str, &str)], seed: u64) -> (TestEnv, TestDaemon, TestServer) {
    let env = TestEnv::new();
    env.set_config("checkpoint_bytes", "524288");
    env.set_config("stall_timeout_ms", "500");
    env.set_config("shutdown_grace_ms", "1000");
    for (key, value) in config {
        env.set_config(key, value);
    }
    let d = TestDaemon::start_with_env(
        &env,
        &[("DLSESSIOND_FAILPOINT", OsStr::new("checkpoint-after-sync:1:sleep-ms=60000"))],
    );
    let s = TestServer::start().await.unwrap();
    s.add("/stuck", Resource::generated(4 << 20, seed).throttle(4 << 20));
    (env, d, s)
}

/// A worker stuck on its disk (here: a checkpoint sync that takes a minute) is stopped, then
/// abandoned; the task retries, never stays `running` for ever, and ends byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_worker_is_abandoned_and_the_task_retried() {
    let (env, d, s) = stuck_worker(&[], 6).await;
    let len = 4u64 << 20;
    let config = SessionConfiguration::background("t.stuck").timeout_for_request(Duration::from_secs(1));
    let (session, mut events) = attach(&env, config).await;
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/stuck"))], true).await.unwrap().remove(0);
    let done = tokio::time::timeout(Duration::from_secs(25), events.completion(task.id(), LONG)).await;
    assert_eq!(done.expect("finished long before the stuck sync would have returned"), None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(6, len)));
    assert!(s.hits("/stuck") >= 2);
    let log = d.log();
    assert!(log.contains("download worker silent for too long"), "{log}");
}

/// The slot a stuck worker held goes to the next queued task as soon as the worker is
/// abandoned, not when the stuck task's retry timer happens to wake the scheduler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_workers_slot_goes_to_the_next_task_at_once() {
    // One download at a time; the abandoned task waits a minute before its retry.
    let settings = [("max_concurrent_downloads", "1"), ("retry_initial_ms", "60000"), ("retry_max_ms", "120000")];
    let (env, _d, s) = stuck_worker(&settings, 7).await;
    s.add("/next", Resource::generated(100_000, 8));
    let config = SessionConfiguration::background("t.slot").timeout_for_request(Duration::from_secs(1));
    let (session, mut events) = attach(&env, config).await;
    let tasks = session
        .download_tasks(vec![DownloadRequest::new(s.url("/stuck")), DownloadRequest::new(s.url("/next"))], true)
        .await
        .unwrap();
    let began = Instant::now();
    let done = tokio::time::timeout(Duration::from_secs(20), events.completion(tasks[1].id(), LONG)).await;
    assert_eq!(done.expect("the queued task ran once the stuck one was abandoned"), None);
    assert!(began.elapsed() < Duration::from_secs(20));
    let stuck = session.get_all_tasks().await.unwrap().into_iter().find(|t| t.id == tasks[0].id()).unwrap();
    assert!(matches!(stuck.wait, Some(WaitReason::Backoff { .. })), "the stuck one waits for its retry: {stuck:?}");
}

/// A cancel asked of a stuck worker is kept when the worker is abandoned: the task
/// completes `cancelled` and the request is answered, instead of the task being retried
/// and the request left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_of_a_stuck_worker_survives_its_abandonment() {
    let (env, _d, s) = stuck_worker(&[], 9).await;
    let config = SessionConfiguration::background("t.cancel-stuck").timeout_for_request(Duration::from_secs(1));
    let (session, mut events) = attach(&env, config).await;
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/stuck"))], true).await.unwrap().remove(0);
    // Stuck once the first checkpoint's sync holds (the download window fills behind it).
    dlsession_testkit::wait_for("the first checkpoint to stick", LONG, || {
        let t = dlsession_testkit::block(session.get_all_tasks()).unwrap().remove(0);
        (t.bytes_received >= 512 << 10).then_some(())
    });
    let cancelled = tokio::time::timeout(Duration::from_secs(20), task.cancel()).await;
    cancelled.expect("the cancel is answered").unwrap();
    let error = tokio::time::timeout(Duration::from_secs(20), events.completion(task.id(), LONG))
        .await
        .expect("the task completes")
        .expect("with an error");
    assert_eq!(error.code, ErrorCode::Cancelled, "{error:?}");
}

/// A request that repeats a change whose commit is still on its way (a second suspend,
/// resume or cancel of a task just suspended, resumed or cancelled) is answered only once
/// that change is durable, never before the request that made it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_requests_are_answered_after_the_first_is_durable() {
    let env = TestEnv::new();
    env.set_config("checkpoint_bytes", "524288");
    env.set_config("max_concurrent_downloads", "1");
    // The database thread pauses after each commit holding a checkpoint, before it answers
    // anything: while the first download runs, commits queue behind it.
    let d = TestDaemon::start_with_env(
        &env,
        &[("DLSESSIOND_FAILPOINT", OsStr::new("checkpoint-after-commit:1+:sleep-ms=700"))],
    );
    let s = TestServer::start().await.unwrap();
    s.add("/running", Resource::generated(64 << 20, 10).throttle(4 << 20));
    s.add("/queued", Resource::generated(100_000, 11));
    let (session, _events) = attach(&env, SessionConfiguration::background("t.repeat")).await;
    let tasks = session
        .download_tasks(vec![DownloadRequest::new(s.url("/running")), DownloadRequest::new(s.url("/queued"))], true)
        .await
        .unwrap();
    dlsession_testkit::wait_for("the database to pause", LONG, || {
        d.log().contains("failpoint checkpoint-after-commit reached").then_some(())
    });
    let queued = &tasks[1];
    for what in ["suspend", "resume", "cancel"] {
        let act = || async {
            match what {
                "suspend" => queued.suspend().await.map(|_| ()),
                "resume" => queued.resume().await.map(|_| ()),
                _ => queued.cancel().await.map(|_| ()),
            }
        };
        let began = Instant::now();
        let first = async {
            act().await.unwrap();
            began.elapsed()
        };
        let second = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // The second cancel is refused (completed already): either way, not before.
            let _ = act().await;
            began.elapsed()
        };
        // In order: when both answers are in at one wake-up, `join!` would otherwise poll
        // the second first now and then, and time it before the first.
        let (first, second) = tokio::join!(biased; first, second);
        // Else the order below would hold whatever the daemon did.
        assert!(first > Duration::from_millis(100), "the first {what} was answered before the second was sent");
        assert!(
            second >= first,
            "the second {what} was answered at {second:?}, before the first ({first:?}) was durable"
        );
    }
    // The same for session settings asked twice: the second finds memory already so.
    let client = dlsession_testkit::app::client(&env).await;
    let id = || "t.repeat".to_owned();
    let twice = |r: Request| (r.clone(), r);
    let pairs = [
        twice(Request::SetSessionCookies { identifier: id(), enabled: false }),
        twice(Request::SetSessionChallenges { identifier: id(), answers: true }),
        twice(Request::SetSessionProxy {
            identifier: id(),
            proxy: Some(SessionProxy { url: Some("http://127.0.0.1:9".into()), no_proxy: String::new() }),
        }),
        // A session another request is creating: the second is told it exists.
        (
            Request::OpenSession { identifier: "t.made".into(), config: Some(Default::default()) },
            Request::OpenSession { identifier: "t.made".into(), config: None },
        ),
        // Its running download keeps the session invalidating, not yet invalid.
        twice(Request::FinishTasksAndInvalidate { identifier: id() }),
    ];
    for (request, again) in pairs {
        let what = request.name();
        let began = Instant::now();
        let first = async {
            client.request(request).await.unwrap();
            began.elapsed()
        };
        let second = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.request(again).await.unwrap();
            began.elapsed()
        };
        // In order: when both answers are in at one wake-up, `join!` would otherwise poll
        // the second first now and then, and time it before the first.
        let (first, second) = tokio::join!(biased; first, second);
        assert!(first > Duration::from_millis(100), "the first {what} was answered before the second was sent");
        assert!(second >= first, "the second {what} was answered at {second:?}, before the first ({first:?})");
    }
}

/// Acknowledging an invalid session's last events removes it: the attached connection
/// hears it was invalidated only once the removal is durable (it heard it at once before,
/// so an app could exit and find the session and its events back after a crash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_session_detaches_its_app_once_the_removal_is_durable() {
    let env = TestEnv::new();
    env.set_config("checkpoint_bytes", "524288");
    // Commits queue behind a running download's, each of which pauses the database.
    let d = TestDaemon::start_with_env(
        &env,
        &[("DLSESSIOND_FAILPOINT", OsStr::new("checkpoint-after-commit:1+:sleep-ms=700"))],
    );
    let s = TestServer::start().await.unwrap();
    s.add("/running", Resource::generated(64 << 20, 12).throttle(4 << 20));
    let (background, _events) = attach(&env, SessionConfiguration::background("t.busy")).await;
    background.download_tasks(vec![DownloadRequest::new(s.url("/running"))], true).await.unwrap();
    dlsession_testkit::wait_for("the database to pause", LONG, || {
        d.log().contains("failpoint checkpoint-after-commit reached").then_some(())
    });
    let client = dlsession_testkit::app::client(&env).await;
    let id = || "t.removed".to_owned();
    let ok = |r: Result<Response, dlsession::Error>| assert!(r.is_ok(), "{r:?}");
    ok(client.request(Request::OpenSession { identifier: id(), config: None }).await);
    ok(client.request(Request::FinishTasksAndInvalidate { identifier: id() }).await);
    // The app attaches, hears `did_become_invalid` and acknowledges it: the session goes.
    let mut app = dlsession_testkit::raw::RawClient::connect(&env.socket);
    app.send([(1, Request::Attach { identifier: id(), config: Default::default(), takeover: false })]);
    let seq = loop {
        if let ServerMessage::Event(Event::Durable { seq, .. }) = app.recv() {
            break seq;
        }
    };
    app.send([(2, Request::AckEvents { identifier: id(), seqs: vec![seq] })]);
    loop {
        match app.recv() {
            ServerMessage::Event(Event::Detached { .. }) => break,
            ServerMessage::Response { id: 2, .. } => panic!("the acknowledgement answered before the detach"),
            _ => {}
        }
    }
    let db = rusqlite::Connection::open_with_flags(env.database(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let left: i64 =
        db.query_row("SELECT count(*) FROM sessions WHERE identifier = 't.removed'", [], |r| r.get(0)).unwrap();
    assert_eq!(left, 0, "the app heard the session was removed before the removal was durable");
}

/// A test environment whose state directory is a tmpfs of `size` (root only; the mount goes
/// when the returned `Mount` is dropped): the directory, to fill with [`fill`].
fn on_a_small_state_disk(size: &str) -> (TestEnv, PathBuf, dlsession_testkit::Mount) {
    dlsession_testkit::require_root();
    let env = TestEnv::new();
    let state = env.state_dir.join("dlsessiond");
    let mount = dlsession_testkit::Mount::tmpfs(&state, &format!("size={size},mode=0700"));
    (env, state, mount)
}

/// A small state disk holding a database a daemon made (and stopped), then filled: the
/// filler file is returned (remove it to free the space).
fn a_full_state_disk_with_a_database() -> (TestEnv, PathBuf, dlsession_testkit::Mount) {
    let (env, state, mount) = on_a_small_state_disk("2m");
    {
        let mut d = TestDaemon::start(&env);
        assert!(d.terminate().success());
    }
    let filler = fill(&state);
    (env, filler, mount)
}

/// Fills `dir`'s filesystem; returns the filler file (remove it to free the space).
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 << 10];
    use std::io::Write;
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    filler
}

/// The state directory's filesystem fills up: the daemon stays up, answers reads, refuses
/// changes with `storage_full`, holds downloads at their checkpoint, and when space returns
/// goes on by itself with nothing that was acknowledged lost.
#[cfg_attr(not(dlsession_root), ignore = "needs root to mount a small filesystem; CI runs it as root")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_directory_is_weather_not_death() {
    let (env, state, _mount) = on_a_small_state_disk("3m");
    env.set_config("checkpoint_bytes", "262144");
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 12u64 << 20;
    s.add("/big", Resource::generated(len, 7).throttle(2 << 20));
    s.add("/small", Resource::generated(5_000, 8));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.statefull")).await;
    let big = session.download_tasks(vec![DownloadRequest::new(s.url("/big"))], true).await.unwrap().remove(0);
    dlsession_testkit::wait_until(|| dlsession_testkit::block(big.info()).unwrap().bytes_received > 1 << 20).await;

    let filler = fill(&state);
    // The running download's next checkpoint cannot commit: the daemon notices and holds it.
    let status = dlsession_testkit::wait_for("storage failing in status", LONG, || {
        let out = env.ctl(&["--json", "status"]);
        assert!(out.status.success(), "status answers: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (!v["storage"].is_null()).then_some(v)
    });
    assert_eq!(status["storage"]["code"], "storage_full", "{status}");
    assert!(d.log().contains("holding changes and retrying"), "{}", d.log());
    // Reads are answered; changes refused with a clear code.
    let held = dlsession_testkit::wait_for("the download held", LONG, || {
        let info = dlsession_testkit::block(big.info()).unwrap();
        matches!(info.wait, Some(WaitReason::StorageFull { .. })).then_some(info)
    });
    assert_eq!(held.state, TaskState::Queued);
    let shown = env.ctl(&["show", &big.id().to_string()]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("cannot write its database"), "{shown:?}");
    assert!(env.ctl(&["tasks"]).status.success());
    let refused = session.download_tasks(vec![DownloadRequest::new(s.url("/small"))], true).await.unwrap_err();
    assert_eq!(refused.code(), ErrorCode::StorageFull, "{refused}");
    let out = env.ctl(&["get", &s.url("/small"), "-o", env.path().join("small").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("storage_full"), "{out:?}");
    let bytes_then = dlsession_testkit::block(big.info()).unwrap().bytes_received;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(dlsession_testkit::block(big.info()).unwrap().bytes_received, bytes_then, "held, not downloading");

    // Space returns: everything goes on by itself.
    std::fs::remove_file(&filler).unwrap();
    dlsession_testkit::wait_for("storage recovered", LONG, || {
        let out = env.ctl(&["--json", "status"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["storage"].is_null().then_some(())
    });
    let small = session.download_tasks(vec![DownloadRequest::new(s.url("/small"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(big.id(), LONG).await, None);
    assert_eq!(events.completion(small.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(big.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(7, len)));
    // Nothing was lost: a restart finds everything the daemon acknowledged.
    drop(session);
    assert!(d.terminate().success(), "stopped cleanly");
    d.restart();
    assert!(d.log().contains("state restored"));
}

/// A session whose events wait for its app `org.example.trust`, relaunched by a command that
/// appends a line to `launches`.
async fn session_with_waiting_events(env: &TestEnv, s: &TestServer, identifier: &str, launches: &Path) {
    use dlsession::proto::{LaunchSpec, Request, SessionConfig, TaskSpec};
    let c = dlsession_testkit::app::client(env).await;
    let config = SessionConfig {
        app_id: Some("org.example.trust".into()),
        launch: Some(LaunchSpec::Command {
            argv: vec!["/bin/sh".into(), "-c".into(), format!("date +%s%N >> {}", launches.display())],
        }),
        ..SessionConfig::default()
    };
    c.request(Request::OpenSession { identifier: identifier.into(), config: Some(config) }).await.unwrap();
    s.add("/w", Resource::generated(1000, 9));
    c.request(Request::CreateTasks {
        identifier: identifier.into(),
        tasks: vec![TaskSpec::get(s.url("/w"))],
        resume: true,
    })
    .await
    .unwrap();
}

fn launch_count(launches: &Path) -> usize {
    std::fs::read_to_string(launches).map(|t| t.lines().count()).unwrap_or(0)
}

/// A running process of the app that cannot rejoin (no wake handler) does not swallow the
/// wake: the daemon relaunches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_without_a_wake_handler_is_relaunched() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let launches = env.path().join("launches");
    // The app runs (announces its app id) but never registered a wake handler.
    let _running = dlsession::Client::connect(dlsession::ClientOptions {
        socket: Some(env.socket.clone()),
        app_id: Some("org.example.trust".into()),
        autostart: false,
        ..dlsession::ClientOptions::default()
    })
    .await
    .unwrap();
    session_with_waiting_events(&env, &s, "t.nohandler", &launches).await;
    dlsession_testkit::wait_for("a relaunch", LONG, || (launch_count(&launches) >= 1).then_some(()));
}

/// A protocol-1 app that is sent `wake` and does not rejoin within `wake_answer_ms` is
/// relaunched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_wake_falls_back_to_relaunch() {
    use std::io::{Read, Write};
    let env = TestEnv::new();
    env.set_config("wake_answer_ms", "500");
    let d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let launches = env.path().join("launches");
    // A protocol-1 process of the app: it gets `wake` but never rejoins.
    let mut old = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
    let mut opening = dlsession_proto::handshake::Preamble { version: 1, status: dlsession_proto::HandshakeStatus::Ok }
        .to_bytes()
        .to_vec();
    let hello = dlsession_proto::v1::ClientHello {
        client_name: "old-app".into(),
        client_version: "0.1.0".into(),
        app_id: Some("org.example.trust".into()),
    };
    opening.extend(dlsession_proto::frame::encode_frame(&hello).unwrap());
    old.write_all(&opening).unwrap();
    let mut pre = [0u8; 8];
    old.read_exact(&mut pre).unwrap();
    session_with_waiting_events(&env, &s, "t.unanswered", &launches).await;
    dlsession_testkit::wait_for("a relaunch after the unanswered wake", LONG, || {
        (launch_count(&launches) >= 1).then_some(())
    });
    let log = d.log();
    assert!(log.contains("did not rejoin after wake; relaunching"), "{log}");
}

/// A delegate that keeps every finished download for later (`Handled::Later`): its events
/// stay unacknowledged. Remembers the last file handed over.
#[derive(Default)]
struct KeepForLater(std::sync::Arc<std::sync::Mutex<Option<PathBuf>>>);

impl dlsession::SessionDelegate for KeepForLater {
    fn finish_downloading(&self, _: &Session, _: &dlsession::DownloadTask, at: &Path) -> dlsession::Handled {
        *self.0.lock().unwrap() = Some(at.to_path_buf());
        dlsession::Handled::Later
    }
}

/// An app that attaches and leaves (or crashes) without collecting is relaunched less and
/// less often: attaching does not reset the wake backoff; only collecting does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaching_does_not_reset_the_wake_backoff() {
    let env = TestEnv::new();
    env.set_config("wake_initial_ms", "400");
    env.set_config("wake_max_ms", "60000");
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let launches = env.path().join("launches");
    session_with_waiting_events(&env, &s, "t.crashy", &launches).await;
    let mut gaps = Vec::new();
    for n in 1..=4 {
        dlsession_testkit::wait_for("a relaunch", LONG, || (launch_count(&launches) >= n).then_some(()));
        // The "app" attaches (keeping its configuration), collects nothing, and goes.
        let config = SessionConfiguration::background("t.crashy")
            .socket(&env.socket)
            .app_id("org.example.trust")
            .launch_command(["/bin/sh".to_owned(), "-c".to_owned(), format!("date +%s%N >> {}", launches.display())]);
        let session = Session::attach(config, KeepForLater::default()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(session);
        let left = Instant::now();
        if n < 4 {
            dlsession_testkit::wait_for("the next relaunch", LONG, || (launch_count(&launches) > n).then_some(()));
            gaps.push(left.elapsed());
        }
    }
    // 400 ms, 800 ms, 1.6 s after each departure (each at least the backoff).
    assert!(gaps[1] >= gaps[0] + Duration::from_millis(250), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(1400), "{gaps:?}");
}

/// Files handed over get the mode the client itself would give a file (0666 minus its
/// umask), whatever the daemon's own umask (0077 here); the daemon's cache
/// and state stay private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_over_files_get_the_clients_mode() {
    let env = TestEnv::new();
    let _d = TestDaemon::start_with_umask(&env, 0o077);
    let s = TestServer::start().await.unwrap();
    s.add("/a", Resource::generated(3000, 10));
    s.add("/b", Resource::generated(3000, 11));
    let a = env.path().join("a.bin");
    let out = env.ctl_with_umask(0o027, &["get", &s.url("/a"), "-o", a.to_str().unwrap(), "--wait"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&a), 0o640);
    let b = env.path().join("b.bin");
    let out = env.ctl_with_umask(0o002, &["get", &s.url("/b"), "-o", b.to_str().unwrap(), "--wait"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&b), 0o664);
    assert_eq!(mode(&env.database()), 0o600, "the database is private");
    assert_eq!(mode(&env.state_dir.join("dlsessiond")), 0o700);
    assert_eq!(mode(&env.downloads_dir()), 0o700);
}

/// Retention is for events nobody collects: one the attached app keeps for later stays
/// (with its file) past `event_retention_days` while the app is there, also across a daemon
/// restart it rides out, and expires once it has left (`wake_initial_ms` after). Before, it
/// expired under the app, its file deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_do_not_expire_while_their_app_is_attached() {
    let env = TestEnv::new();
    // About 1.7 s; an app that left (or was there before a restart) gets 3 s to come back.
    env.set_config("event_retention_days", "0.00002");
    env.set_config("wake_initial_ms", "3000");
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    s.add("/k", Resource::generated(3000, 14));
    let config = SessionConfiguration::background("t.kept").socket(&env.socket);
    let keep = KeepForLater::default();
    let handed = std::sync::Arc::clone(&keep.0);
    let session = Session::attach(config, keep).await.unwrap();
    session.download_tasks(vec![DownloadRequest::new(s.url("/k"))], true).await.unwrap();
    let cached = dlsession_testkit::wait_for("the file handed over", LONG, || handed.lock().unwrap().clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pending = || dlsession_testkit::cli::pending_events(&env, "t.kept").unwrap_or(0);
    assert!(cached.exists() && pending() > 0, "expired under the attached app");
    // A restart: the library reconnects and rejoins within the grace, and keeps it still.
    assert!(d.terminate().success());
    d.restart();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(cached.exists() && pending() > 0, "expired at the restart, before the app was back");
    drop(session);
    dlsession_testkit::wait_for("the kept event to expire once the app left", LONG, || (pending() == 0).then_some(()));
    // Its file goes once the expiry is committed.
    dlsession_testkit::wait_for("its file to go with it", LONG, || (!cached.exists()).then_some(()));
}

/// What nobody collects does not pile up: events of an app that never returns expire
/// after `event_retention_days` (their file in the cache goes, the task retires, a log
/// line says so), and kept partial files of resume data after 7 days. Here the daemon
/// comes back nine days later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncollected_events_and_old_resume_files_expire() {
    use dlsession::proto::{Request, Response, TaskAction, TaskSpec};
    let (env, clock, mut d) = retention_of_a_day();
    let s = TestServer::start().await.unwrap();
    s.add("/done", Resource::generated(5000, 12));
    s.add("/slow", Resource::generated(8 << 20, 13).etag("\"e\"").throttle(1 << 20));
    let c = dlsession_testkit::app::client(&env).await;
    c.request(Request::OpenSession { identifier: "t.expire".into(), config: None }).await.unwrap();
    let ids = c
        .create_tasks("t.expire", vec![TaskSpec::get(s.url("/done")), TaskSpec::get(s.url("/slow"))], true)
        .await
        .unwrap();
    let detail = |id| {
        let c = c.clone();
        async move {
            match c.request(Request::GetTask { task: id }).await.unwrap() {
                Response::Task(d) => d,
                other => panic!("{other:?}"),
            }
        }
    };
    dlsession_testkit::wait_until(|| dlsession_testkit::block(detail(ids[0])).info.state == TaskState::Completed).await;
    dlsession_testkit::app::wait_for_checkpoint(&c, ids[1], 1).await;
    let blob =
        c.request(Request::ControlTask { task: ids[1], action: TaskAction::CancelProducingResumeData }).await.unwrap();
    assert!(matches!(blob, Response::ResumeData(_)));
    let cached = PathBuf::from(detail(ids[0]).await.info.location.unwrap());
    assert!(cached.exists());
    let resume_dir = env.downloads_dir().join("resume");
    assert_eq!(std::fs::read_dir(&resume_dir).unwrap().count(), 1);
    drop(c);
    assert!(d.terminate().success());

    // Nine days later. The app gets `wake_initial_ms` after the start to come back first.
    std::fs::write(&clock, "+9d\n").unwrap();
    d.restart();
    d.wait_logged("expiring events nobody collected", LONG);
    dlsession_testkit::wait_for("the uncollected file to go", LONG, || (!cached.exists()).then_some(()));
    assert_eq!(std::fs::read_dir(&resume_dir).unwrap().count(), 0, "the old kept partial went");
    let c = dlsession_testkit::app::client(&env).await;
    let info = match c.request(Request::GetSession { identifier: "t.expire".into() }).await.unwrap() {
        Response::Session(i) => i,
        other => panic!("{other:?}"),
    };
    assert_eq!(info.pending_events, 0);
    match c.request(Request::GetTask { task: ids[0] }).await.unwrap() {
        Response::Task(d) => assert!(d.retired, "retired, still in history"),
        other => panic!("{other:?}"),
    }
}

/// A daemon started while its state directory is full waits for space (saying so) instead
/// of exiting (which under systemd would be a restart loop), and starts when space returns.
#[cfg_attr(not(dlsession_root), ignore = "needs root to mount a small filesystem; CI runs it as root")]
#[test]
fn a_start_on_a_full_state_directory_waits_for_space() {
    let (env, filler, _mount) = a_full_state_disk_with_a_database();
    let log = env.path().join("daemon.log");
    let freer = std::thread::spawn(move || {
        let deadline = Instant::now() + LONG;
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("waiting until it works") {
            assert!(Instant::now() < deadline, "the daemon never said it waits");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        std::fs::remove_file(&filler).unwrap();
    });
    // Ready only once space is back (TestDaemon fails if the process exits meanwhile).
    let d = TestDaemon::start(&env);
    freer.join().unwrap();
    assert!(d.log().contains("the database opens again; starting"), "{}", d.log());
}

/// A daemon waiting for its state directory to take writes stops when asked (SIGTERM, as
/// `systemctl stop` and a logout do), instead of waiting on until someone frees space.
#[cfg_attr(not(dlsession_root), ignore = "needs root to mount a small filesystem; CI runs it as root")]
#[test]
fn a_start_waiting_for_space_stops_when_asked() {
    let (env, _filler, _mount) = a_full_state_disk_with_a_database();
    let mut d = TestDaemon::start_unready(&env);
    d.wait_logged("waiting until it works", LONG);
    d.signal_term();
    assert!(d.wait_exit(Duration::from_secs(10)).success(), "{}", d.log());
    assert!(d.log().contains("stopped before the database opened"), "{}", d.log());
}

/// Kept partial files of resume data go when their retention ends, while the daemon runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_resume_files_expire_while_the_daemon_runs() {
    use dlsession::proto::{Request, Response, TaskAction, TaskSpec};
    let env = TestEnv::new();
    env.set_config("resume_retention_days", "0.00003"); // about 2.6 s
    let d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    s.add("/slow", Resource::generated(8 << 20, 14).etag("\"e\"").throttle(1 << 20));
    let c = dlsession_testkit::app::client(&env).await;
    c.request(Request::OpenSession { identifier: "t.resume".into(), config: None }).await.unwrap();
    // An event nobody collects sets the housekeeping timer first, for its own expiry in 30
    // days: the kept file's earlier expiry must still be seen to.
    s.add("/small", Resource::generated(1000, 15));
    let small = c.create_tasks("t.resume", vec![TaskSpec::get(s.url("/small"))], true).await.unwrap()[0];
    dlsession_testkit::wait_until(|| match dlsession_testkit::block(c.request(Request::GetTask { task: small })) {
        Ok(Response::Task(d)) => d.info.state == dlsession::TaskState::Completed,
        _ => false,
    })
    .await;
    let id = c.create_tasks("t.resume", vec![TaskSpec::get(s.url("/slow"))], true).await.unwrap()[0];
    dlsession_testkit::app::wait_for_checkpoint(&c, id, 1).await;
    let blob = c.request(Request::ControlTask { task: id, action: TaskAction::CancelProducingResumeData }).await;
    assert!(matches!(blob, Ok(Response::ResumeData(_))));
    let resume_dir = env.downloads_dir().join("resume");
    assert_eq!(std::fs::read_dir(&resume_dir).unwrap().count(), 1);
    dlsession_testkit::wait_for("the kept partial file to expire", LONG, || {
        (std::fs::read_dir(&resume_dir).unwrap().count() == 0).then_some(())
    });
    // The disk thread removes it, then the core logs what it reports.
    dlsession_testkit::wait_for("the expiry to be logged", LONG, || {
        d.log().contains("removed kept partial files of resume data past their retention").then_some(())
    });
}

/// The app hears "every event is delivered, you may rest" only once its acknowledgements
/// are durable. Here the state directory fills while a callback runs, so the daemon cannot
/// commit them: the library sends them again until it can (before, it gave up after the
/// request timeout and told the app to rest; the app exited, and was woken later for the
/// same events).
#[cfg_attr(not(dlsession_root), ignore = "needs root to mount a small filesystem; CI runs it as root")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_may_rest_only_once_its_acknowledgements_are_durable() {
    use dlsession::{DownloadTask, Handled, SessionDelegate};
    use std::sync::Mutex;
    struct Gate {
        open: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        arrived: tokio::sync::mpsc::UnboundedSender<&'static str>,
    }
    impl SessionDelegate for Gate {
        fn finish_downloading(&self, _: &Session, _: &DownloadTask, _: &Path) -> Handled {
            let _ = self.arrived.send("finished_downloading");
            if let Some(rx) = self.open.lock().unwrap().take() {
                let _ = rx.recv();
            }
            Handled::Done
        }
        fn did_finish_events_for_background_session(&self, _: &Session) {
            let _ = self.arrived.send("may rest");
        }
    }

    let (env, state, _mount) = on_a_small_state_disk("3m");
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    s.add("/f", Resource::generated(5_000, 10));
    let (open, gate) = std::sync::mpsc::channel();
    let (arrived, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let delegate = std::sync::Arc::new(Gate { open: Mutex::new(Some(gate)), arrived });
    let options = dlsession::ClientOptions {
        socket: Some(env.socket.clone()),
        autostart: false,
        request_timeout: Duration::from_secs(1),
        ..dlsession::ClientOptions::default()
    };
    let client = dlsession::Client::connect(options).await.unwrap();
    let config = SessionConfiguration::background("t.rest").socket(&env.socket);
    let session = Session::attach_with(&client, config, delegate).await.unwrap();
    session.download_tasks(vec![DownloadRequest::new(s.url("/f"))], true).await.unwrap();
    async fn next(
        heard: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>,
        within: Duration,
    ) -> Option<&'static str> {
        tokio::time::timeout(within, heard.recv()).await.ok().flatten()
    }
    assert_eq!(next(&mut heard, LONG).await, Some("finished_downloading"));

    // The callback returns with the state directory full: the acknowledgement's commit fails.
    let filler = fill(&state);
    open.send(()).unwrap();
    assert_eq!(next(&mut heard, Duration::from_secs(4)).await, None, "told to rest with its events not acknowledged");

    // Space returns: the acknowledgements go through, and then the app may rest.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(next(&mut heard, LONG).await, Some("may rest"));
    assert_eq!(dlsession_testkit::block(session.info()).unwrap().pending_events, 0);
}

/// Resume data moves a cancelled task's partial file aside only once the cancel is durable:
/// moved before (here the cancel's commit is held by a full state disk, and the daemon is
/// then killed), the database still had the task queued with its file gone, and it started
/// over from 0 after the restart.
#[cfg_attr(not(dlsession_root), ignore = "needs root to mount a small filesystem; CI runs it as root")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_data_takes_the_partial_file_only_once_the_cancel_is_durable() {
    let (env, state, _mount) = on_a_small_state_disk("3m");
    env.set_config("checkpoint_bytes", "262144");
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 1u64 << 20;
    // A checkpoint every 4 s: none falls between filling the disk and the cancel.
    s.add("/big", Resource::generated(len, 12).throttle(64 << 10));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.kept")).await;
    let big = session.download_tasks(vec![DownloadRequest::new(s.url("/big"))], true).await.unwrap().remove(0);
    let client = dlsession_testkit::app::client(&env).await;
    let committed = dlsession_testkit::app::wait_for_checkpoint(&client, big.id(), 1).await;

    let filler = fill(&state);
    let cancelling = tokio::spawn({
        let big = big.clone();
        async move { big.cancel_producing_resume_data().await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let part = env.downloads_dir().join("s1").join(format!("{}.part", big.id()));
    assert!(part.exists(), "the partial file stays while the cancel is not durable");
    let resume = env.downloads_dir().join("resume");
    assert!(std::fs::read_dir(&resume).map_or(true, |mut d| d.next().is_none()), "nothing moved aside yet");
    assert!(!cancelling.is_finished(), "the cancel was taken and waits for its commit (not refused)");
    d.kill9();
    cancelling.abort();
    std::fs::remove_file(&filler).unwrap();
    d.restart();

    // The cancel never became durable: the task goes on from its checkpoint, not from 0.
    assert_eq!(events.completion(big.id(), LONG).await, None);
    let last = s.requests_for("/big").pop().unwrap();
    let from: u64 =
        last.range.as_deref().and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()).unwrap_or(0);
    assert!(from >= committed, "resumed at {from}, committed {committed}: {last:?}");
    assert_eq!(sha256_file(&events.moved_to(big.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(12, len)));
}

/// A chain of slow redirects, each answered within the request timeout, is not a stuck
/// worker: each response is a sign of life (before, the chain's whole time counted as
/// silence, and the download was stopped and started over for ever, without a backoff).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_redirects_are_not_a_stuck_worker() {
    let env = TestEnv::new();
    env.set_config("stall_timeout_ms", "1000");
    let d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    // Each hop well within the request timeout, the chain well past timeout + stall.
    let slow = Duration::from_millis(2000);
    s.add(
        "/r1",
        Resource::generated(10, 1).fault(Hits::All, Fault::SlowRedirect { after: slow, location: "/r2".into() }),
    );
    s.add(
        "/r2",
        Resource::generated(10, 1).fault(Hits::All, Fault::SlowRedirect { after: slow, location: "/r3".into() }),
    );
    s.add("/r3", Resource::generated(5000, 63).fault(Hits::All, Fault::SlowHeaders(slow)));
    let config = SessionConfiguration::background("t.hops").timeout_for_request(Duration::from_secs(3));
    let (session, mut events) = attach(&env, config).await;
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/r1"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(63, 5000)));
    assert_eq!(s.hits("/r1"), 1, "one attempt");
    assert!(!d.log().contains("silent for too long"), "{}", d.log());
}

/// After a restart, a session whose events were waiting is not woken sooner than
/// `wake_initial` after the start, also when a task of it was still to finish then (its
/// wake was planned only once that task was done, with the backoff the restart had reset:
/// at once, so a daemon restarting in a loop relaunched the app at every start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_wake_after_a_start_waits_also_behind_a_running_task() {
    use dlsession::proto::{Request, TaskSpec};
    let env = TestEnv::new();
    env.set_config("wake_initial_ms", "4000");
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let launches = env.path().join("launches");
    session_with_waiting_events(&env, &s, "t.loop", &launches).await;
    // Its first wake comes `wake_initial` after the daemon started.
    dlsession_testkit::wait_for("the first launch", LONG, || (launch_count(&launches) >= 1).then_some(()));
    s.add("/slow", Resource::generated(200_000, 64).throttle(100_000));
    let c = dlsession_testkit::app::client(&env).await;
    let tasks = vec![TaskSpec::get(s.url("/slow"))];
    c.request(Request::CreateTasks { identifier: "t.loop".into(), tasks, resume: true }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.kill9();
    let before = launch_count(&launches);
    let restarting = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    d.restart();
    // The slow task finishes about 2 s after the start; the launch comes 4 s after it.
    dlsession_testkit::wait_for("the wake after wake_initial", LONG, || {
        (launch_count(&launches) > before).then_some(())
    });
    let text = std::fs::read_to_string(&launches).unwrap();
    let launched: u128 = text.lines().nth(before).unwrap().trim().parse().unwrap();
    let after = Duration::from_nanos(u64::try_from(launched.saturating_sub(restarting)).unwrap());
    assert!(after >= Duration::from_secs(4), "relaunched {after:?} after the restart began");
}

/// A backlog of uncollected events larger than a part expires a part at a time, each
/// committed before the next (in one transaction a million would hold every app's writes
/// for seconds); all of it goes, and the invalid session with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_of_events_expires_in_parts() {
    use dlsession::proto::TaskSpec;
    let (env, clock, mut d) = retention_of_a_day();
    let c = dlsession_testkit::app::client(&env).await;
    c.request(Request::OpenSession { identifier: "t.backlog".into(), config: None }).await.unwrap();
    let tasks: Vec<TaskSpec> = (0..10_500).map(|i| TaskSpec::get(format!("http://127.0.0.1:9/{i}"))).collect();
    c.create_tasks("t.backlog", tasks, false).await.unwrap();
    // Each completes (cancelled) with an event nobody collects, and the session's last says
    // it is invalid.
    assert_eq!(c.request(Request::InvalidateAndCancel { identifier: "t.backlog".into() }).await.unwrap(), Response::Ok);
    drop(c);
    assert!(d.terminate().success());
    std::fs::write(&clock, "+2d\n").unwrap();
    d.restart();
    let c = dlsession_testkit::app::client(&env).await;
    dlsession_testkit::wait_for("the session to go with its events", LONG, || {
        let gone = dlsession_testkit::block(c.request(Request::GetSession { identifier: "t.backlog".into() }));
        matches!(gone, Err(dlsession::Error::Daemon(e)) if e.code == ErrorCode::NoSuchSession).then_some(())
    });
    let parts: Vec<String> =
        d.log().lines().filter(|l| l.contains("expiring events nobody collected")).map(str::to_owned).collect();
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert!(parts[0].contains("events=10000") && parts[1].contains("events=501"), "{parts:?}");
}
