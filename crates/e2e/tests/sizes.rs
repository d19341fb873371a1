//! Any size works: batches and listings far beyond one frame go through in bounded
//! requests and pages, and an answer that cannot fit a frame is an error, never a hang.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use dlsession::proto::{LaunchSpec, Request, Response, SessionConfig};
use dlsession_testkit::{Fault, Hits, Resource, TestDaemon, TestEnv, TestServer};

/// 20,000 URLs in one `get -i` (over a megabyte of requests) are all created, and
/// `tasks --json` lists them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_urls_in_one_get() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    // The downloads never get far: this is about the requests, not the transfers.
    let n = 20_000;
    for i in 0..n {
        let slow = Resource::generated(10, 1).fault(Hits::All, Fault::SlowHeaders(Duration::from_secs(3600)));
        s.add(&format!("/slow/{i}-{}.bin", "x".repeat(40)), slow);
    }
    let list: String = (0..n).map(|i| format!("{}\n", s.url(&format!("/slow/{i}-{}.bin", "x".repeat(40))))).collect();
    let input = env.path().join("urls.txt");
    std::fs::write(&input, list).unwrap();
    let dir = env.path().join("many");
    let out = env.ctl(&["--json", "get", "-i", input.to_str().unwrap(), "-d", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let created = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(created, n);
    let listed = env.ctl(&["--json", "tasks"]);
    assert!(listed.status.success());
    let tasks: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(tasks.as_array().unwrap().len(), n);
}

/// A batch that takes several requests is all or nothing: when a later request is
/// refused, the tasks the earlier ones created are cancelled and retired again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_halfway_leaves_nothing_behind() {
    use dlsession::proto::{TaskQuery, TaskSpec};
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let client = dlsession_testkit::app::client(&env).await;
    client.request(Request::OpenSession { identifier: "t.half".into(), config: None }).await.unwrap();
    let mut specs: Vec<TaskSpec> = (0..3000).map(|i| TaskSpec::get(format!("http://127.0.0.1:9/{i}"))).collect();
    specs[2500] = TaskSpec::get("ftp://127.0.0.1/not-http");
    let err = client.create_tasks("t.half", specs, false).await.unwrap_err();
    assert_eq!(err.code(), dlsession::ErrorCode::UnsupportedScheme, "{err}");
    let page = client
        .request(Request::ListTasks(TaskQuery {
            session: Some("t.half".into()),
            states: vec![],
            after: None,
            limit: 0,
        }))
        .await
        .unwrap();
    match page {
        Response::Tasks(page) => assert!(page.tasks.is_empty(), "left behind: {} tasks", page.tasks.len()),
        other => panic!("{other:?}"),
    }
}

/// A session larger than a page's byte budget (64 headers of 8 KB) still gets listed,
/// and so do the sessions after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_larger_than_a_page_is_listed() {
    use dlsession::proto::Header;
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let client = dlsession_testkit::app::client(&env).await;
    let headers = (0..64).map(|i| Header::new(format!("X-Big-{i}"), "v".repeat(8000))).collect();
    let big = SessionConfig { http_headers: headers, ..SessionConfig::default() };
    client.request(Request::OpenSession { identifier: "a.big".into(), config: Some(big) }).await.unwrap();
    client.request(Request::OpenSession { identifier: "b.small".into(), config: None }).await.unwrap();
    let names: Vec<String> = client.list_sessions().await.unwrap().into_iter().map(|s| s.identifier).collect();
    assert_eq!(names, ["a.big", "b.small"]);
}

/// A protocol-1 listing too large for a frame is answered with an error, at once; the
/// paged listing of protocol 2 (and `dlsessionctl sessions`) shows every session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_for_a_frame_is_an_error_not_a_hang() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let c = dlsession_testkit::app::client(&env).await;
    for i in 0..20 {
        let argv: Vec<String> =
            std::iter::once("/bin/app".to_owned()).chain((0..250).map(|_| "a".repeat(250))).collect();
        let config = SessionConfig { launch: Some(LaunchSpec::Command { argv }), ..SessionConfig::default() };
        c.request(Request::OpenSession { identifier: format!("s{i:02}"), config: Some(config) }).await.unwrap();
    }
    let err = tokio::time::timeout(Duration::from_secs(10), c.request(Request::ListSessions))
        .await
        .expect("answered, not left waiting")
        .unwrap_err();
    assert!(err.to_string().contains("cannot be sent"), "{err}");
    let all = c.list_sessions().await.unwrap();
    assert_eq!(all.len(), 20);
    let out = env.ctl(&["--json", "sessions"]);
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 20);
    // The connection is fine afterwards.
    assert!(matches!(c.request(Request::Status).await.unwrap(), Response::Status(_)));
}
