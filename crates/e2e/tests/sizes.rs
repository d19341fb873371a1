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

/// A batch the library splits into several requests starts nothing until every part
/// exists: when a later part is refused, no task of the earlier parts has reached the
/// server, and the app's delegate hears nothing of the tasks taken back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_batch_refused_halfway_ran_nothing_and_tells_nothing() {
    use dlsession::DownloadRequest;
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let (session, mut events) =
        dlsession_testkit::app::attach(&env, dlsession_testkit::app::config(&env, "t.run")).await;
    let mut requests: Vec<DownloadRequest> = (0..3000).map(|i| DownloadRequest::new(s.url(&format!("/{i}")))).collect();
    requests[2500] = DownloadRequest::new("ftp://127.0.0.1/not-http");
    let err = session.download_tasks(requests, true).await.unwrap_err();
    assert_eq!(err.code(), dlsession::ErrorCode::UnsupportedScheme, "{err}");
    // Anything that ran would have reached the server and completed by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.requests().len(), 0, "tasks of the refused batch ran");
    events.drain();
    assert!(events.seen.is_empty(), "the delegate heard of tasks it never had: {} events", events.seen.len());
    assert!(session.get_all_tasks().await.unwrap().is_empty());
    // The session works on: a task created now runs and is heard of.
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/after"))], true).await.unwrap().remove(0);
    let error = events.completion(task.id(), Duration::from_secs(20)).await;
    assert!(error.is_some(), "a missing resource completes with its 404");
}

/// A started batch split into several requests is started whole once every part exists
/// (`ResumeTasks`), and `ResumeTasks` itself is all or nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_batch_starts_whole_and_resume_tasks_is_all_or_nothing() {
    use dlsession::proto::TaskSpec;
    use dlsession::{DownloadRequest, TaskState};
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    // Never answered: the tasks stay queued or running while we look.
    s.add("/slow", Resource::generated(10, 1).fault(Hits::All, Fault::SlowHeaders(Duration::from_secs(3600))));
    let (session, _events) =
        dlsession_testkit::app::attach(&env, dlsession_testkit::app::config(&env, "t.whole")).await;
    let requests: Vec<DownloadRequest> = (0..1500).map(|_| DownloadRequest::new(s.url("/slow"))).collect();
    let tasks = session.download_tasks(requests, true).await.unwrap();
    assert_eq!(tasks.len(), 1500);
    let suspended = session.get_all_tasks().await.unwrap().iter().filter(|t| t.state == TaskState::Suspended).count();
    assert_eq!(suspended, 0, "tasks of a started batch left suspended");

    let client = dlsession_testkit::app::client(&env).await;
    let specs = (0..3).map(|_| TaskSpec::get(s.url("/slow"))).collect();
    let ids = client.create_tasks("t.whole", specs, false).await.unwrap();
    let with_unknown = ids.iter().copied().chain([1 << 40]).collect();
    let err = client.request(Request::ResumeTasks { tasks: with_unknown }).await.unwrap_err();
    assert_eq!(err.code(), dlsession::ErrorCode::NoSuchTask, "{err}");
    let state = |id| {
        let client = client.clone();
        async move {
            match client.request(Request::GetTask { task: id }).await.unwrap() {
                Response::Task(t) => t.info.state,
                other => panic!("{other:?}"),
            }
        }
    };
    for &id in &ids {
        assert_eq!(state(id).await, TaskState::Suspended, "resumed by a refused request");
    }
    client.request(Request::ResumeTasks { tasks: ids.clone() }).await.unwrap();
    for &id in &ids {
        assert_ne!(state(id).await, TaskState::Suspended);
    }
}

/// Two destinations naming one file are refused across a batch split into several
/// requests as within one: before anything is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_destination_twice_across_a_split_batch_is_refused() {
    use dlsession::proto::TaskSpec;
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let client = dlsession_testkit::app::client(&env).await;
    client.request(Request::OpenSession { identifier: "t.dup".into(), config: None }).await.unwrap();
    let dir = env.path().join("dup");
    let dest = |name: &str| Some(format!("{}/{name}", dir.display()));
    let mut specs: Vec<TaskSpec> = (0..1500)
        .map(|i| TaskSpec { destination: dest(&i.to_string()), ..TaskSpec::get(format!("http://127.0.0.1:9/{i}")) })
        .collect();
    specs[1200].destination = dest(".//3");
    let err = client.create_tasks("t.dup", specs, false).await.unwrap_err();
    assert_eq!(err.code(), dlsession::ErrorCode::InvalidRequest, "{err}");
    assert!(err.to_string().contains("more than one task"), "{err}");
    // Split by size rather than by count (600 specs of about 1 KB each): the same.
    let pad = dlsession::proto::Header::new("X-Pad", "p".repeat(1000));
    let mut specs: Vec<TaskSpec> = (0..600)
        .map(|i| TaskSpec {
            destination: dest(&format!("s{i}")),
            headers: vec![pad.clone()],
            ..TaskSpec::get(format!("http://127.0.0.1:9/{i}"))
        })
        .collect();
    specs[550].destination = dest(".//s5");
    let err = client.create_tasks("t.dup", specs, false).await.unwrap_err();
    assert_eq!(err.code(), dlsession::ErrorCode::InvalidRequest, "{err}");
    assert_eq!(dlsession_testkit::cli::listed_tasks(&env).len(), 0, "created before the refusal");
}

/// Uploads whose specs together exceed a frame are sent in several requests, like
/// downloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_batch_larger_than_a_frame_is_created() {
    use dlsession::UploadRequest;
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    // A file whose path alone takes about 1 KB: 1,200 uploads of it are over a megabyte.
    let deep = (0..5).fold(env.path().to_path_buf(), |p, i| p.join(format!("{i}{}", "d".repeat(200))));
    std::fs::create_dir_all(&deep).unwrap();
    let file = deep.join("body.bin");
    std::fs::write(&file, b"payload").unwrap();
    let (session, _events) = dlsession_testkit::app::attach(&env, dlsession_testkit::app::config(&env, "t.up")).await;
    let n = 1200;
    let requests: Vec<UploadRequest> =
        (0..n).map(|i| UploadRequest::new(format!("http://127.0.0.1:9/{i}"), &file)).collect();
    let tasks = session.upload_tasks(requests, false).await.unwrap();
    assert_eq!(tasks.len(), n);
    assert_eq!(session.get_all_tasks().await.unwrap().len(), n);
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

/// Makes `n` suspended tasks (never fetched) in a new session `name`.
async fn suspended_tasks(client: &dlsession::Client, name: &str, n: usize) {
    client.request(Request::OpenSession { identifier: name.into(), config: None }).await.unwrap();
    let tasks = (0..n).map(|i| dlsession::proto::TaskSpec::get(format!("http://127.0.0.1:9/{name}/{i}"))).collect();
    assert_eq!(client.create_tasks(name, tasks, false).await.unwrap().len(), n);
}

/// Unfinished tasks of `name`, and its pending events.
async fn unfinished(client: &dlsession::Client, name: &str) -> (u64, u64) {
    match client.request(Request::GetSession { identifier: name.into() }).await.unwrap() {
        Response::Session(s) => (s.tasks.total() - s.tasks.completed, s.pending_events),
        other => panic!("{other:?}"),
    }
}

/// Cancelling a session of 6,000 tasks ends every one cancelled and the session invalid,
/// durably: after a restart it is so still.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_large_session_cancels_every_task() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let client = dlsession_testkit::app::client(&env).await;
    suspended_tasks(&client, "t.large", 6_000).await;
    let answer = client.request(Request::InvalidateAndCancel { identifier: "t.large".into() }).await.unwrap();
    assert_eq!(answer, Response::Ok);
    assert_eq!(unfinished(&client, "t.large").await, (0, 6_001), "6,000 completions and did_become_invalid");
    drop(client);
    assert!(tokio::task::block_in_place(|| d.terminate()).success());
    d.restart();
    let client = dlsession_testkit::app::client(&env).await;
    assert_eq!(unfinished(&client, "t.large").await, (0, 6_001));
}
