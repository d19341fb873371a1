//! A client that attaches and never reads its socket costs the daemon bounded memory and
//! never slows the downloads: progress is coalesced per task, not queued, and durable
//! events wait in their session while a window of messages waits to be written.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use dlsession::proto::{
    DurableEvent, Event, Request, Response, ServerMessage, SessionConfig, TaskAction, TaskQuery, TaskSpec, TaskState,
};
use dlsession::{Client, ClientOptions};
use dlsession_testkit::host::rss_kib;
use dlsession_testkit::raw::RawClient;
use dlsession_testkit::{Resource, TestDaemon, TestEnv, TestServer};

const TASKS: usize = 100;
const SIZE: u64 = 2 << 20;
const RATE: u64 = 256 << 10;

fn session_config() -> SessionConfig {
    SessionConfig { max_connections_per_host: TASKS as u32, ..SessionConfig::default() }
}

/// Attaches `identifier` over a raw connection that will never be read again.
fn stuck_attach(socket: &std::path::Path, identifier: &str) -> RawClient {
    let mut client = RawClient::connect(socket);
    let request = Request::Attach { identifier: identifier.into(), config: session_config(), takeover: false };
    client.send([(1, request)]);
    client
}

/// Creates the tasks from another connection and times them until all are completed.
async fn run_batch(client: &Client, server: &TestServer, identifier: &str, prefix: &str) -> Duration {
    let specs: Vec<TaskSpec> = (0..TASKS)
        .map(|i| {
            let path = format!("/{prefix}{i}");
            server.add(&path, Resource::generated(SIZE, i as u64).throttle(RATE));
            TaskSpec::get(server.url(&path))
        })
        .collect();
    let started = Instant::now();
    let r = client
        .request(Request::CreateTasks { identifier: identifier.into(), tasks: specs, resume: true })
        .await
        .unwrap();
    assert!(matches!(r, Response::TasksCreated(ref ids) if ids.len() == TASKS));
    loop {
        let query = TaskQuery {
            session: Some(identifier.into()),
            states: vec![TaskState::Completed],
            after: None,
            limit: 1000,
        };
        let Response::Tasks(page) = client.request(Request::ListTasks(query)).await.unwrap() else { panic!() };
        if page.tasks.len() == TASKS {
            assert!(page.tasks.iter().all(|t| t.error.is_none()), "all succeeded");
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{} of {TASKS} done", page.tasks.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_costs_bounded_memory_and_no_speed() {
    let env = TestEnv::new();
    env.set_config("max_concurrent_downloads", &TASKS.to_string());
    // Progress every 2 ms: without coalescing this would queue ~200k messages (~40 MB).
    env.set_config("progress_interval_ms", "2");
    let daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let client =
        Client::connect(ClientOptions { socket: Some(env.socket.clone()), ..ClientOptions::default() }).await.unwrap();

    // Baseline: nobody attached to the session. The first batch is a warm-up: it grows the
    // blocking-thread pool and the allocator's arenas once, which is not what is measured here.
    let r = client.request(Request::OpenSession { identifier: "t.base".into(), config: Some(session_config()) }).await;
    assert!(r.is_ok());
    let r = client.request(Request::OpenSession { identifier: "t.warm".into(), config: Some(session_config()) }).await;
    assert!(r.is_ok());
    run_batch(&client, &server, "t.warm", "w").await;
    let rss_warm = rss_kib(daemon.pid());
    let baseline = run_batch(&client, &server, "t.base", "b").await;
    let rss_before = rss_kib(daemon.pid());

    // The same work while a client attached to the session never reads.
    let _stuck = stuck_attach(&env.socket, "t.stuck");
    loop {
        match client.request(Request::GetSession { identifier: "t.stuck".into() }).await {
            Ok(Response::Session(s)) if s.attached => break,
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let with_stuck = run_batch(&client, &server, "t.stuck", "s").await;
    let rss_after = rss_kib(daemon.pid());
    eprintln!(
        "{TASKS} tasks: {baseline:?} without, {with_stuck:?} with a client that never reads; daemon RSS {rss_warm} KiB after warm-up, {rss_before} KiB after the baseline, {rss_after} KiB after"
    );
    assert!(with_stuck.as_secs_f64() < baseline.as_secs_f64() * 1.5 + 1.0, "downloads slowed down");
    assert!(rss_after < rss_before + 8 * 1024, "daemon memory grew by {} KiB", rss_after.saturating_sub(rss_before));
    // And the daemon still answers everyone else at once.
    let t = Instant::now();
    assert!(matches!(client.request(Request::Status).await.unwrap(), Response::Status(_)));
    assert!(t.elapsed() < Duration::from_secs(1));
}

/// A session with many unacknowledged events, attached again and again by a client that
/// does not read: each attach replays every event, but the daemon queues a bounded window
/// of them, and the client gets them all, in order, once it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_attaches_by_a_client_that_does_not_read_cost_a_bounded_window() {
    const EVENTS: usize = 10_000;
    const ATTACHES: u64 = 64;
    let env = TestEnv::new();
    let daemon = TestDaemon::start(&env);
    let client =
        Client::connect(ClientOptions { socket: Some(env.socket.clone()), ..ClientOptions::default() }).await.unwrap();
    let identifier = "t.many";
    let r = client.request(Request::OpenSession { identifier: identifier.into(), config: None }).await;
    assert!(r.is_ok());
    // Suspended tasks, each cancelled: one `completed` event apiece, no network.
    let specs: Vec<TaskSpec> = (0..EVENTS).map(|i| TaskSpec::get(format!("http://127.0.0.1:9/never/{i}"))).collect();
    let r = client.request(Request::CreateTasks { identifier: identifier.into(), tasks: specs, resume: false }).await;
    let Ok(Response::TasksCreated(ids)) = r else { panic!("{r:?}") };
    let mut cancels = tokio::task::JoinSet::new();
    for chunk in ids.chunks(EVENTS / 8) {
        let (client, chunk) = (client.clone(), chunk.to_vec());
        cancels.spawn(async move {
            for task in chunk {
                let r = client.request(Request::ControlTask { task, action: TaskAction::Cancel }).await;
                assert!(matches!(r, Ok(Response::Ok)), "{r:?}");
            }
        });
    }
    while let Some(r) = cancels.join_next().await {
        r.unwrap();
    }
    let rss_before = rss_kib(daemon.pid());

    let mut stuck = RawClient::connect(&env.socket);
    let attach =
        || Request::Attach { identifier: identifier.into(), config: SessionConfig::default(), takeover: false };
    stuck.send((1..=ATTACHES).map(|id| (id, attach())));
    // Without a window, every attach queues all the events again (~100 MB here): wait until
    // the daemon's memory stops growing for a while, or grows too far.
    let limit = 24 * 1024;
    let mut last = rss_before;
    let mut still = 0;
    let waited = Instant::now();
    while still < 5 && waited.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(matches!(client.request(Request::Status).await.unwrap(), Response::Status(_)));
        let rss = rss_kib(daemon.pid());
        assert!(
            rss < rss_before + limit,
            "{ATTACHES} attaches of {EVENTS} events by a client that does not read grew the daemon by {} KiB",
            rss - rss_before
        );
        still = if rss <= last { still + 1 } else { 0 };
        last = last.max(rss);
    }
    eprintln!("daemon RSS {rss_before} KiB before the attaches, {last} KiB at most after");

    // Now it reads: every attach is answered, and after the last one comes every event, in
    // order, then `finished_events`.
    stuck.stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answered = 0;
    let mut seqs = Vec::new();
    loop {
        match stuck.recv() {
            ServerMessage::Response { id, result } => {
                assert!(matches!(result, Ok(Response::Session(_))), "{result:?}");
                answered += 1;
                assert_eq!(id, answered, "answers in order");
                seqs.clear();
            }
            ServerMessage::Event(Event::Durable { seq, event, .. }) => {
                assert!(matches!(event, DurableEvent::Completed { .. }), "{event:?}");
                assert!(seqs.last().is_none_or(|&l| l < seq), "seq {seq} after {seqs:?}");
                seqs.push(seq);
            }
            ServerMessage::Event(Event::FinishedEvents { .. }) if answered == ATTACHES => break,
            ServerMessage::Event(Event::FinishedEvents { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seqs.len(), EVENTS, "the last replay brought every event before finished_events");
    // And nothing after it: the queue draining says nothing new to a session at rest.
    stuck.stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut byte = [0u8; 1];
    let more = std::io::Read::read(&mut stuck.stream, &mut byte);
    assert!(more.is_err(), "a message after the replay's finished_events: {more:?}");
}
