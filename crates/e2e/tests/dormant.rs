//! Suspended tasks after a restart stay on disk until a request touches their session
//! (docs/behaviour.md, "Suspended tasks after a start"): they are counted from the start,
//! read when asked for, their partial files survive the start's sweep, and a connection's
//! requests still act in the order sent while one of them waits for the read.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use dlsession::Client;
use dlsession_proto::{Request, Response, TaskAction, TaskId, TaskInfo, TaskQuery, TaskSpec, TaskState};
use dlsession_testkit::app::client as connect;
use dlsession_testkit::{Resource, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex, wait_until};

async fn ask(client: &Client, request: Request) -> Response {
    let name = request.name();
    client.request(request).await.unwrap_or_else(|e| panic!("{name}: {e}"))
}

async fn task(client: &Client, id: TaskId) -> TaskInfo {
    match ask(client, Request::GetTask { task: id }).await {
        Response::Task(d) => d.info,
        other => panic!("{other:?}"),
    }
}

async fn suspended(client: &Client) -> u64 {
    match ask(client, Request::Status).await {
        Response::Status(s) => s.tasks.suspended,
        other => panic!("{other:?}"),
    }
}

async fn list(client: &Client, session: Option<&str>) -> Vec<TaskInfo> {
    let query = TaskQuery { session: session.map(str::to_owned), states: Vec::new(), after: None, limit: 0 };
    match ask(client, Request::ListTasks(query)).await {
        Response::Tasks(page) => page.tasks,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_tasks_are_read_when_touched() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 2u64 << 20;
    s.add("/big", Resource::generated(len, 61).etag("\"b\"").throttle(1 << 20));
    for i in 1..=8 {
        s.add(&format!("/f{i}"), Resource::generated(64 << 10, i));
    }
    let client = connect(&env).await;
    let mut ids: Vec<Vec<TaskId>> = Vec::new();
    for (name, paths) in
        [("t.a", ["/big", "/f1", "/f2"]), ("t.b", ["/f3", "/f4", "/f5"]), ("t.c", ["/f6", "/f7", "/f8"])]
    {
        ask(&client, Request::OpenSession { identifier: name.into(), config: None }).await;
        let tasks = paths.iter().map(|p| TaskSpec::get(s.url(p))).collect();
        match ask(&client, Request::CreateTasks { identifier: name.into(), tasks, resume: false }).await {
            Response::TasksCreated(created) => ids.push(created),
            other => panic!("{other:?}"),
        }
    }
    // Part of /big arrives, then it is suspended: its partial file must outlive the restart.
    let big = ids[0][0];
    ask(&client, Request::ControlTask { task: big, action: TaskAction::Resume }).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while task(&client, big).await.bytes_received < 256 << 10 {
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ask(&client, Request::ControlTask { task: big, action: TaskAction::Suspend }).await;
    let kept = task(&client, big).await;
    assert_eq!(kept.state, TaskState::Suspended);
    assert!(kept.bytes_received > 0);
    drop(client);
    assert!(tokio::task::block_in_place(|| d.terminate()).success());

    d.restart();
    let client = connect(&env).await;
    let log = d.log();
    let loaded = log.lines().rev().find(|l| l.contains("state loaded")).expect("a state loaded line");
    assert!(loaded.contains("live_tasks=0") && loaded.contains("dormant=9"), "nothing read at start: {loaded}");
    assert_eq!(suspended(&client).await, 9, "dormant tasks are counted");
    match ask(&client, Request::GetSession { identifier: "t.b".into() }).await {
        Response::Session(info) => assert_eq!(info.tasks.suspended, 3),
        other => panic!("{other:?}"),
    }

    // One connection's requests act in order: the status sent after a resume that waits
    // for its session to be read sees the resume.
    let resumed = client.send_request(Request::ControlTask { task: big, action: TaskAction::Resume }).unwrap();
    let status = client.send_request(Request::Status).unwrap();
    assert_eq!(resumed.await.unwrap(), Ok(Response::Ok));
    match status.await.unwrap() {
        Ok(Response::Status(st)) => assert_eq!(st.tasks.suspended, 8, "answered after the resume"),
        other => panic!("{other:?}"),
    }
    wait_until(|| dlsession_testkit::block(task(&client, big)).state == TaskState::Completed).await;
    let done = task(&client, big).await;
    assert!(done.error.is_none(), "{:?}", done.error);
    let file = done.location.expect("a location");
    assert_eq!(sha256_file(std::path::Path::new(&file)).unwrap(), to_hex(&pattern_sha256(61, len)));
    let ranges: Vec<_> = s.requests_for("/big").into_iter().filter_map(|r| r.range).collect();
    assert!(!ranges.is_empty(), "resumed from the kept partial file with a Range request");

    // Read by session, and all of them.
    let b = list(&client, Some("t.b")).await;
    assert_eq!(b.iter().map(|t| t.id).collect::<Vec<_>>(), ids[1]);
    assert!(b.iter().all(|t| t.state == TaskState::Suspended && t.bytes_received == 0));
    let all = list(&client, None).await;
    let mut every: Vec<TaskId> = ids.concat();
    every.sort();
    assert_eq!(all.iter().map(|t| t.id).collect::<Vec<_>>(), every);
    assert_eq!(suspended(&client).await, 8, "read tasks are not counted twice");

    // Restarted again: ending a session cancels its dormant tasks too.
    drop(client);
    assert!(tokio::task::block_in_place(|| d.terminate()).success());
    d.restart();
    let client = connect(&env).await;
    assert_eq!(suspended(&client).await, 8);
    // Session settings and an invalidation that only counts them leave them on disk.
    let reads = |d: &TestDaemon| d.log().matches("dormant tasks read").count();
    let before = reads(&d);
    let b = || "t.b".to_owned();
    let policy = dlsession_proto::SessionPolicy { allows_metered: false, ..Default::default() };
    for request in [
        Request::SetSessionPolicy { identifier: b(), policy },
        Request::SetSessionCookies { identifier: b(), enabled: false },
        Request::SetSessionProxy { identifier: b(), proxy: None },
        Request::FinishTasksAndInvalidate { identifier: b() },
    ] {
        assert_eq!(ask(&client, request).await, Response::Ok);
    }
    match ask(&client, Request::GetSession { identifier: b() }).await {
        Response::Session(info) => {
            assert!(info.invalidating, "{info:?}");
            assert_eq!(info.tasks.suspended, 3, "its suspended tasks hold it back, counted: {info:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(reads(&d), before, "no dormant task was read:\n{}", d.log());
    ask(&client, Request::InvalidateAndCancel { identifier: "t.c".into() }).await;
    wait_until(|| dlsession_testkit::block(suspended(&client)) == 5).await;
    for id in &ids[2] {
        let err = client.request(Request::GetTask { task: *id }).await;
        assert!(
            matches!(&err, Ok(Response::Task(d)) if d.info.state == TaskState::Completed),
            "a cancelled task is completed (history): {err:?}"
        );
    }
    // A task named directly is read with its session.
    let f3 = ids[1][0];
    assert_eq!(task(&client, f3).await.state, TaskState::Suspended);
    assert_eq!(suspended(&client).await, 5);
    assert_eq!(s.requests_for("/f3").len(), 0, "suspended tasks never started");
}

/// While the start's database check runs (held open 1.5 s by a failpoint), reads and an
/// app's attach are answered, but anything that may change something waits for the check,
/// and the connection's later requests wait behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_wait_for_the_database_check() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let client = connect(&env).await;
    ask(&client, Request::OpenSession { identifier: "t.check".into(), config: None }).await;
    let tasks = vec![TaskSpec::get("http://127.0.0.1:9/never".to_owned())];
    let id = match ask(&client, Request::CreateTasks { identifier: "t.check".into(), tasks, resume: false }).await {
        Response::TasksCreated(ids) => ids[0],
        other => panic!("{other:?}"),
    };
    drop(client);
    assert!(tokio::task::block_in_place(|| d.terminate()).success());

    d.set_env(&[("DLSESSIOND_FAILPOINT", std::ffi::OsStr::new("database-check:1:sleep-ms=1500"))]);
    d.restart();
    let passed = || d.log().contains("database check done");
    let client = connect(&env).await;
    let suspend = client.send_request(Request::ControlTask { task: id, action: TaskAction::Suspend }).unwrap();
    let behind = client.send_request(Request::Status).unwrap();
    let reader = connect(&env).await;
    assert_eq!(suspended(&reader).await, 1);
    ask(&reader, Request::Attach { identifier: "t.check".into(), config: Default::default(), takeover: false }).await;
    assert!(!passed(), "a read and an attach are answered during the check:\n{}", d.log());
    assert_eq!(suspend.await.unwrap(), Ok(Response::Ok));
    assert!(passed(), "a change is answered after the check");
    assert!(matches!(behind.await.unwrap(), Ok(Response::Status(_))));
    assert!(d.log().contains("dormant=1"));
}
