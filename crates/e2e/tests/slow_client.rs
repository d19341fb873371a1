//! A client that attaches and never reads its socket costs the daemon bounded memory and
//! never slows the downloads: progress is coalesced per task, not queued.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use dlsession::proto::handshake::{HandshakeStatus, Preamble};
use dlsession::proto::{
    ClientHello, Request, RequestFrame, Response, SessionConfig, TaskQuery, TaskSpec, TaskState, frame,
};
use dlsession::{Client, ClientOptions};
use dlsession_testkit::host::rss_kib;
use dlsession_testkit::{Resource, TestDaemon, TestEnv, TestServer};

const TASKS: usize = 100;
const SIZE: u64 = 2 << 20;
const RATE: u64 = 256 << 10;

fn session_config() -> SessionConfig {
    SessionConfig { max_connections_per_host: TASKS as u32, ..SessionConfig::default() }
}

/// Attaches `identifier` over a raw connection that will never be read again.
fn stuck_attach(socket: &std::path::Path, identifier: &str) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    let mut bytes = Preamble::ours(HandshakeStatus::Ok).to_bytes().to_vec();
    bytes.extend(
        frame::encode_frame(&ClientHello {
            client_name: "stuck".into(),
            client_version: "0".into(),
            app_id: None,
            umask: None,
        })
        .unwrap(),
    );
    bytes.extend(
        frame::encode_frame(&RequestFrame {
            id: 1,
            request: Request::Attach { identifier: identifier.into(), config: session_config(), takeover: false },
        })
        .unwrap(),
    );
    s.write_all(&bytes).unwrap();
    let mut pre = [0u8; 8];
    s.read_exact(&mut pre).unwrap();
    s
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
