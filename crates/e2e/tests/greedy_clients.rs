//! Slow and greedy clients (docs/behaviour.md, "Security and bad input"): a connection limit with a clear refusal, a client
//! that stops in the middle of a frame, and hundreds of clients connecting and leaving
//! while a well-behaved client keeps getting fast answers and memory stays flat.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use dlsession::proto::handshake::{HandshakeStatus, Preamble};
use dlsession::proto::{ClientHello, Request, Response, frame};
use dlsession::{Client, ClientOptions};
use dlsession_testkit::host::{open_fds, rss_kib};
use dlsession_testkit::{TestDaemon, TestEnv};

fn hello() -> Vec<u8> {
    let mut v = Preamble::ours(HandshakeStatus::Ok).to_bytes().to_vec();
    v.extend(
        frame::encode_frame(&ClientHello {
            client_name: "greedy".into(),
            client_version: "0".into(),
            app_id: None,
            umask: None,
        })
        .unwrap(),
    );
    v
}

/// Connects and completes the handshake; returns the daemon's preamble status.
fn handshake(socket: &std::path::Path) -> (UnixStream, HandshakeStatus) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello()).unwrap();
    let mut pre = [0u8; 8];
    s.read_exact(&mut pre).unwrap();
    (s, Preamble::parse(pre).unwrap().status)
}

async fn status_latency(client: &Client) -> Duration {
    let t = Instant::now();
    assert!(matches!(client.request(Request::Status).await.unwrap(), Response::Status(_)));
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_clearly() {
    let env = TestEnv::new();
    env.set_config("max_connections", "4");
    let _d = TestDaemon::start(&env);
    let held: Vec<UnixStream> = (0..4)
        .map(|_| {
            let (s, status) = handshake(&env.socket);
            assert_eq!(status, HandshakeStatus::Ok);
            s
        })
        .collect();
    let (_, status) = handshake(&env.socket);
    assert_eq!(status, HandshakeStatus::TooManyConnections);
    let err = Client::connect(ClientOptions { socket: Some(env.socket.clone()), ..ClientOptions::default() })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("too many connections"), "{err}");
    drop(held);
    // Slots come back when connections close.
    let client = dlsession_testkit::wait_for("a free slot", Duration::from_secs(10), || {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(Client::connect(ClientOptions {
                    socket: Some(env.socket.clone()),
                    ..ClientOptions::default()
                }))
                .ok()
        })
    });
    status_latency(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stuck_in_the_middle_of_a_frame_bothers_nobody() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let mut stuck = Vec::new();
    for _ in 0..20 {
        let (mut s, _) = handshake(&env.socket);
        let mut welcome_len = [0u8; 4];
        s.read_exact(&mut welcome_len).unwrap();
        s.write_all(&[0, 0, 1]).unwrap(); // three bytes of a four-byte header, then nothing
        stuck.push(s);
    }
    let client =
        Client::connect(ClientOptions { socket: Some(env.socket.clone()), ..ClientOptions::default() }).await.unwrap();
    assert!(status_latency(&client).await < Duration::from_secs(1));
}

/// Clients that announce a 1 MiB frame and send nothing more hold no megabyte each: the
/// daemon's buffer grows with the bytes that come (before, 200 such clients made it
/// allocate and zero 200 MiB).
#[test]
fn frames_announced_but_not_sent_hold_no_memory() {
    let env = TestEnv::new();
    let d = TestDaemon::start(&env);
    let before = dlsession_testkit::host::peak_rss_kib(d.pid());
    let mut stuck = Vec::new();
    for _ in 0..200 {
        let (mut s, _) = handshake(&env.socket);
        let mut welcome_len = [0u8; 4];
        s.read_exact(&mut welcome_len).unwrap();
        s.write_all(&(1u32 << 20).to_be_bytes()).unwrap();
        s.write_all(&[0]).unwrap(); // one byte of the megabyte, then nothing
        stuck.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let grew = dlsession_testkit::host::peak_rss_kib(d.pid()).saturating_sub(before);
    assert!(grew < 64 << 10, "the daemon's peak memory grew by {} MiB", grew >> 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_coming_and_going() {
    let env = TestEnv::new();
    let daemon = TestDaemon::start(&env);
    let client =
        Client::connect(ClientOptions { socket: Some(env.socket.clone()), ..ClientOptions::default() }).await.unwrap();
    // Warm up, then take the baseline.
    for _ in 0..20 {
        status_latency(&client).await;
    }
    let rss_before = rss_kib(daemon.pid());
    let fds_before = open_fds(daemon.pid());

    let socket = env.socket.clone();
    let churn = std::thread::spawn(move || {
        let mut refused = 0;
        for round in 0..500 {
            // A third leave mid-handshake, a third right after it, a third after a request.
            let mut s = UnixStream::connect(&socket).unwrap();
            match round % 3 {
                0 => s.write_all(&hello()[..5]).unwrap(),
                1 => {
                    s.write_all(&hello()).unwrap();
                    let mut pre = [0u8; 8];
                    let _ = s.read_exact(&mut pre);
                    if Preamble::parse(pre).map(|p| p.status).ok() != Some(HandshakeStatus::Ok) {
                        refused += 1;
                    }
                }
                _ => {
                    s.write_all(&hello()).unwrap();
                    s.write_all(
                        &frame::encode_frame(&dlsession::proto::RequestFrame { id: 1, request: Request::Status })
                            .unwrap(),
                    )
                    .unwrap();
                    let mut buf = [0u8; 64];
                    let _ = s.read(&mut buf);
                }
            }
        }
        refused
    });
    let mut latencies = Vec::new();
    while !churn.is_finished() {
        latencies.push(status_latency(&client).await);
    }
    let refused = churn.join().unwrap();
    assert_eq!(refused, 0, "well-formed handshakes were all accepted");
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!("status round trip during churn: {} samples, p50 {p50:?}, p99 {p99:?}", latencies.len());
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");

    // Everything those clients held is released.
    let fds = dlsession_testkit::wait_for("connections released", Duration::from_secs(10), || {
        let n = open_fds(daemon.pid());
        (n <= fds_before).then_some(n)
    });
    let rss_after = rss_kib(daemon.pid());
    eprintln!("daemon fds {fds_before} -> {fds}, RSS {rss_before} KiB -> {rss_after} KiB");
    assert!(rss_after < rss_before + 16 * 1024, "RSS grew by {} KiB", rss_after - rss_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_batches_are_refused_whole() {
    let env = TestEnv::new();
    env.set_config("max_tasks_per_batch", "10");
    let _d = TestDaemon::start(&env);
    let client =
        Client::connect(ClientOptions { socket: Some(env.socket.clone()), ..ClientOptions::default() }).await.unwrap();
    client.request(Request::OpenSession { identifier: "t.batch".into(), config: None }).await.unwrap();
    let specs = |n: usize| (0..n).map(|i| dlsession::proto::TaskSpec::get(format!("http://127.0.0.1:9/{i}"))).collect();
    let err = client
        .request(Request::CreateTasks { identifier: "t.batch".into(), tasks: specs(11), resume: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), dlsession::ErrorCode::InvalidRequest);
    assert!(err.to_string().contains("11 tasks in one batch; the limit is 10"), "{err}");
    // One bad task refuses the whole batch, naming it.
    let mut bad: Vec<dlsession::proto::TaskSpec> = specs(3);
    bad[1].url = "gopher://example.org/".into();
    let err = client
        .request(Request::CreateTasks { identifier: "t.batch".into(), tasks: bad, resume: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), dlsession::ErrorCode::UnsupportedScheme);
    assert!(err.to_string().contains("task 2 of the batch"), "{err}");
    let Response::Session(s) = client.request(Request::GetSession { identifier: "t.batch".into() }).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(s.tasks.total(), 0, "nothing of a refused batch was created");
}

/// A request that names one task many times (it fits a frame a million times) costs what
/// naming it once does: a policy set on a large task's id repeated 2,000 times copied its
/// record 2,000 times (about 1 GB here; hundreds of GB within a frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_one_task_many_times_costs_one() {
    use dlsession::proto::{Header, TaskPolicy, TaskSpec};
    let env = TestEnv::new();
    let d = TestDaemon::start(&env);
    let client =
        Client::connect(ClientOptions { socket: Some(env.socket.clone()), ..ClientOptions::default() }).await.unwrap();
    client.request(Request::OpenSession { identifier: "t.repeat".into(), config: None }).await.unwrap();
    let mut spec = TaskSpec::get("http://127.0.0.1:9/large");
    spec.headers = (0..60).map(|i| Header::new(format!("X-Large-{i}"), "v".repeat(8_000))).collect();
    let r = client.request(Request::CreateTasks { identifier: "t.repeat".into(), tasks: vec![spec], resume: false });
    let Response::TasksCreated(ids) = r.await.unwrap() else { panic!("tasks_created expected") };
    let before = dlsession_testkit::host::peak_rss_kib(d.pid());
    let policy = TaskPolicy { allows_metered: Some(false), ..TaskPolicy::default() };
    let r = client.request(Request::SetTaskPolicy { tasks: vec![ids[0]; 2_000], policy }).await.unwrap();
    assert_eq!(r, Response::Ok);
    let grew = dlsession_testkit::host::peak_rss_kib(d.pid()).saturating_sub(before);
    assert!(grew < 200 << 10, "the daemon's peak memory grew by {} MiB", grew >> 10);
    let Response::TaskPolicy(got) = client.request(Request::GetTaskPolicy { task: ids[0] }).await.unwrap() else {
        panic!("task_policy expected")
    };
    assert_eq!(got.own.allows_metered, Some(false), "the policy was set");
}

/// A client that leaves while the daemon has stopped reading it (its requests wait behind
/// a destination check that hangs, more than the in-flight limit of them) does not keep
/// its session attached: the daemon sees it go, and the app's next attach, without
/// taking over, gets the session.
#[test]
fn a_client_gone_while_its_requests_wait_frees_its_session() {
    use dlsession::proto::{ServerMessage, SessionConfig, TaskSpec};
    use dlsession_testkit::raw::RawClient;
    let env = TestEnv::new();
    let pause = std::ffi::OsStr::new("destination-check:1:sleep-ms=60000");
    let _d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", pause)]);
    let attach = |id: u64| {
        (id, Request::Attach { identifier: "t.gone".into(), config: SessionConfig::default(), takeover: false })
    };
    let mut first = RawClient::connect(&env.socket);
    first.send([attach(1)]);
    assert!(matches!(first.recv(), ServerMessage::Response { id: 1, result: Ok(Response::Session(_)) }));
    let mut spec = TaskSpec::get("http://127.0.0.1:9/x");
    spec.destination = Some(env.path().join("hung.bin").to_string_lossy().into_owned());
    let create = Request::CreateTasks { identifier: "t.gone".into(), tasks: vec![spec], resume: false };
    first.send(std::iter::once((2, create)).chain((3..400).map(|id| (id, Request::Status))));
    std::thread::sleep(Duration::from_millis(500));
    drop(first);
    let began = Instant::now();
    loop {
        let mut next = RawClient::connect(&env.socket);
        next.send([attach(1)]);
        match next.recv() {
            ServerMessage::Response { result: Ok(Response::Session(_)), .. } => break,
            ServerMessage::Response { result: Err(e), .. } if e.code == dlsession::ErrorCode::SessionInUse => {
                assert!(began.elapsed() < Duration::from_secs(10), "still attached to the client that left: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            other => panic!("{other:?}"),
        }
    }
}
