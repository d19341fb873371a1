//! Bandwidth limits (docs/behaviour.md, "Bandwidth limits"): daemon-wide, per session and
//! per task, changed while downloads run, shared by the downloads under them, and kept
//! across restarts. Rates here are checked loosely (a shared machine); their accuracy is a
//! benchmark's business.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use dlsession::proto::{LimitTarget, Request, Response};
use dlsession::{DownloadRequest, DownloadTask, ErrorCode, Session};
use dlsession_testkit::app::{client, config};
use dlsession_testkit::{
    Fault, Hits, LONG, Recorder, Resource, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex,
};

async fn set(env: &TestEnv, target: LimitTarget, rate: Option<u64>) {
    let c = client(env).await;
    let answer = c.request(Request::SetBandwidthLimit { target, bytes_per_second: rate }).await.unwrap();
    assert_eq!(answer, Response::Ok);
}

async fn received(task: &DownloadTask) -> u64 {
    task.info().await.unwrap().bytes_received
}

/// Bytes the tasks received over `window`, each.
async fn rates(tasks: &[&DownloadTask], window: Duration) -> Vec<f64> {
    let mut before = Vec::new();
    for t in tasks {
        before.push(received(t).await);
    }
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let secs = start.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for (t, b) in tasks.iter().zip(before) {
        out.push((received(t).await - b) as f64 / secs);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_limit_applies_and_lifts_while_it_downloads() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 24 << 20;
    server.add("/big", Resource::generated(len, 8));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.lim"), delegate).await.unwrap();
    let task = session.download_task(DownloadRequest::new(server.url("/big"))).await.unwrap();
    set(&env, LimitTarget::Task { task: task.id() }, Some(512 << 10)).await;
    task.resume().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rate = rates(&[&task], Duration::from_secs(2)).await[0];
    assert!((256e3..1024e3).contains(&rate), "about 512 KiB/s under the limit: {rate:.0} B/s");

    // Lifted while running: the same attempt speeds up and finishes.
    set(&env, LimitTarget::Task { task: task.id() }, None).await;
    let lifted = Instant::now();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert!(lifted.elapsed() < Duration::from_secs(20), "the rest came fast: {:?}", lifted.elapsed());
    let shown = env.ctl(&["--json", "show", &task.id().to_string()]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["attempts"], 1, "the download was never restarted: {shown}");
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(8, len)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_under_one_session_limit_share_it() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(32 << 20, 1));
    server.add("/b", Resource::generated(32 << 20, 2));
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.share"), delegate).await.unwrap();
    let tasks = session
        .download_tasks(vec![DownloadRequest::new(server.url("/a")), DownloadRequest::new(server.url("/b"))], false)
        .await
        .unwrap();
    set(&env, LimitTarget::Session { identifier: "t.share".into() }, Some(1 << 20)).await;
    for t in &tasks {
        t.resume().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = rates(&[&tasks[0], &tasks[1]], Duration::from_secs(3)).await;
    let total = r[0] + r[1];
    // The limit holds (a loaded machine may deliver less, never more).
    assert!((0.3 * 1048576.0..1.4 * 1048576.0).contains(&total), "1 MiB/s together: {r:?}");
    assert!(r[0] > 0.25 * total && r[1] > 0.25 * total, "shared fairly: {r:?}");

    // Raised live: both go faster without restarting.
    set(&env, LimitTarget::Session { identifier: "t.share".into() }, Some(4 << 20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let faster = rates(&[&tasks[0], &tasks[1]], Duration::from_secs(2)).await;
    assert!(faster[0] + faster[1] > 1.5 * total, "the new limit applies to running downloads: {faster:?} vs {r:?}");
    assert_eq!(session.info().await.unwrap().config.bandwidth_limit, Some(4 << 20), "stored as the session's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_set_and_shown_by_dlsessionctl_and_kept_across_a_restart() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/x", Resource::generated(1 << 20, 3));
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.kept"), delegate).await.unwrap();
    let task = session.download_task(DownloadRequest::new(server.url("/x"))).await.unwrap();
    let id = task.id().to_string();
    for args in [vec!["limit", "--global", "2MiB"], vec!["limit", "--session", "t.kept", "700k"]] {
        let o = env.ctl(&args);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let o = env.ctl(&["limit", "--task", &id, "64 KiB"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("task {id} limit: 64.0 KiB/s")), "{o:?}");
    drop(session);
    d.terminate();
    d.restart();
    d.wait_ready(LONG);
    let o = env.ctl(&["--json", "limit"]);
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["global"], 2 << 20, "{shown}");
    assert_eq!(shown["sessions"]["t.kept"], 700_000, "{shown}");
    assert_eq!(shown["tasks"][&id], 64 << 10, "{shown}");
    let o = env.ctl(&["limit"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("daemon-wide: 2.0 MiB/s") && text.contains("session t.kept: 683.6 KiB/s"), "{text}");

    // Lifted, and bad input refused with a reason.
    assert!(env.ctl(&["limit", "--global", "off"]).status.success());
    let o = env.ctl(&["--json", "limit"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["global"], serde_json::Value::Null);
    let o = env.ctl(&["limit", "2MiB"]);
    assert_eq!(o.status.code(), Some(2), "which limit? {o:?}");
    let o = env.ctl(&["limit", "--global", "10"]);
    assert_eq!(o.status.code(), Some(2), "below the lowest limit: {o:?}");
    let o = env.ctl(&["limit", "--task", "999999", "1MiB"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no_such_task"), "{o:?}");
    let c = client(&env).await;
    let err = c
        .request(Request::SetBandwidthLimit { target: LimitTarget::Global, bytes_per_second: Some(5) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidRequest, "{err}");
}

/// A paced body reaches the partial file as it is paced, not once a whole batch for the
/// writer has gathered (256 KiB: four seconds at this limit; hyper reads ahead of the pace,
/// so the next frame is always there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_download_is_written_as_it_goes() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/big", Resource::generated(4 << 20, 9));
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.paced-write"), delegate).await.unwrap();
    let task = session.download_task(DownloadRequest::new(server.url("/big"))).await.unwrap();
    set(&env, LimitTarget::Task { task: task.id() }, Some(64 << 10)).await;
    task.resume().await.unwrap();
    let part = env.downloads_dir().join("s1").join(format!("{}.part", task.id()));
    dlsession_testkit::wait_for("paced bytes in the partial file", Duration::from_secs(3), || {
        (std::fs::metadata(&part).ok()?.len() >= 32 << 10).then_some(())
    });
    assert!(received(&task).await < 256 << 10, "paced: not a whole batch yet");
}

/// A session's `max_concurrent_tasks` raised while its one running task waits for a slow
/// server lets the next task start at once, with the session limit as its wait reason
/// until then (before, it waited for whatever event next looked at the queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_session_limit_starts_the_next_task_at_once() {
    use dlsession::proto::{SessionConfig, WaitReason};
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    s.add("/slow", Resource::generated(1000, 61).fault(Hits::All, Fault::SlowHeaders(Duration::from_secs(30))));
    s.add("/quick", Resource::generated(1000, 62));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.limit").max_concurrent_tasks(1), delegate).await.unwrap();
    session.download_tasks(vec![DownloadRequest::new(s.url("/slow"))], true).await.unwrap();
    dlsession_testkit::wait_until(|| dlsession_testkit::block(session.info()).is_ok_and(|i| i.tasks.running == 1))
        .await;
    let quick = session.download_tasks(vec![DownloadRequest::new(s.url("/quick"))], true).await.unwrap().remove(0);
    let held = dlsession_testkit::wait_for("the session limit", LONG, || {
        dlsession_testkit::block(quick.info())
            .ok()
            .filter(|i| matches!(i.wait, Some(WaitReason::SessionLimit { limit: 1 })))
    });
    assert_eq!(held.state, dlsession::TaskState::Queued);

    let other = client(&env).await;
    let raised = SessionConfig { max_concurrent_tasks: Some(2), ..session.info().await.unwrap().config };
    other.request(Request::OpenSession { identifier: "t.limit".into(), config: Some(raised) }).await.unwrap();
    let raised_at = Instant::now();
    assert_eq!(events.completion(quick.id(), Duration::from_secs(10)).await, None);
    assert!(raised_at.elapsed() < Duration::from_secs(10), "{:?}", raised_at.elapsed());
}

/// Downloads slowed by their limits over HTTP/2 do not hold up the others on their
/// connection: what a stream has received and not yet taken counts against the
/// connection's window too, and three paced streams holding their own windows full once
/// left none for the rest: an unlimited download beside them crawled at their pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_h2_streams_do_not_hold_up_the_others_on_their_connection() {
    let env = TestEnv::new();
    let ca = dlsession_testkit::TestCa::new().unwrap();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let _d = TestDaemon::start(&env);
    let server = TestServer::start_tls(&ca).await.unwrap();
    let len = 32 << 20;
    for (path, seed) in [("/paced1", 1), ("/paced2", 2), ("/paced3", 3), ("/free", 4)] {
        server.add(path, Resource::generated(len, seed));
    }
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.h2window"), delegate).await.unwrap();
    for path in ["/paced1", "/paced2", "/paced3"] {
        let task = session.download_task(DownloadRequest::new(server.url(path))).await.unwrap();
        set(&env, LimitTarget::Task { task: task.id() }, Some(16 << 10)).await;
        task.resume().await.unwrap();
    }
    // Their streams fill up to their windows meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let free = session.download_task(DownloadRequest::new(server.url("/free"))).await.unwrap();
    free.resume().await.unwrap();
    let started = Instant::now();
    assert_eq!(events.completion(free.id(), LONG).await, None);
    assert!(started.elapsed() < Duration::from_secs(20), "the free download took {:?}", started.elapsed());
    assert_eq!(sha256_file(&events.moved_to(free.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(4, len)));
    let versions: Vec<_> = server.requests().iter().map(|r| r.version).collect();
    assert_eq!(versions, vec![http::Version::HTTP_2; 4], "all four over HTTP/2");
}
