//! Upgrades lose nothing: apps built against protocol 1 keep working with this daemon, and
//! a state directory made by schema version 1 opens with every task, partial file and
//! event intact.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use dlsession_proto::handshake::{HandshakeStatus, Preamble};
use dlsession_proto::{
    Request, RequestFrame, SessionConfig, TaskAction, TaskSpec, TaskState, Welcome, codec, frame, v1,
};
use dlsession_testkit::{Resource, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex};

/// A client that speaks protocol 1 exactly as the client library of protocol 1 did: its
/// preamble, its hello, and protocol 1's shapes for everything it reads.
struct V1Client {
    s: UnixStream,
    next_id: u64,
    /// Events read while waiting for a response.
    events: Vec<v1::Event>,
}

impl V1Client {
    fn connect(socket: &Path, app_id: Option<&str>) -> V1Client {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut opening = Preamble { version: 1, status: HandshakeStatus::Ok }.to_bytes().to_vec();
        let hello = v1::ClientHello {
            client_name: "v1-app".into(),
            client_version: "0.1.0".into(),
            app_id: app_id.map(Into::into),
        };
        opening.extend(frame::encode_frame(&hello).unwrap());
        s.write_all(&opening).unwrap();
        let mut pre = [0u8; 8];
        s.read_exact(&mut pre).unwrap();
        let pre = Preamble::parse(pre).unwrap();
        assert_eq!(pre.status, HandshakeStatus::Ok);
        // Protocol 1 clients refuse any daemon whose preamble says another version.
        pre.check_version().unwrap_err();
        assert_eq!(pre.version, 1, "the daemon answers in the client's version");
        let welcome: Welcome = codec::decode(&read_payload(&mut s)).unwrap();
        assert!(welcome.pid > 0);
        V1Client { s, next_id: 1, events: Vec::new() }
    }

    fn read(&mut self) -> v1::ServerMessage {
        // Every byte must decode as protocol 1: never garbage.
        codec::decode(&read_payload(&mut self.s)).expect("a protocol-1 message")
    }

    fn request(&mut self, request: Request) -> Result<v1::Response, v1::ErrorInfo> {
        let id = self.next_id;
        self.next_id += 1;
        self.s.write_all(&frame::encode_frame(&RequestFrame { id, request }).unwrap()).unwrap();
        loop {
            match self.read() {
                v1::ServerMessage::Response { id: got, result } if got == id => return result,
                v1::ServerMessage::Response { id: got, .. } => panic!("answer to {got}, waiting for {id}"),
                v1::ServerMessage::Event(e) => self.events.push(e),
            }
        }
    }

    fn next_event(&mut self) -> v1::Event {
        if !self.events.is_empty() {
            return self.events.remove(0);
        }
        match self.read() {
            v1::ServerMessage::Event(e) => e,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn read_payload(s: &mut UnixStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let len = frame::payload_len(len).unwrap();
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// The whole background story, spoken in protocol 1 against this daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_1_clients_keep_working() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/a.bin", Resource::generated(300_000, 41));
    server.add(
        "/gone.bin",
        Resource::generated(10, 42)
            .fault(dlsession_testkit::Hits::All, dlsession_testkit::Fault::Status { code: 404, retry_after: None }),
    );
    let socket = env.socket.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = V1Client::connect(&socket, Some("org.example.v1"));
        let status = match c.request(Request::Status).unwrap() {
            v1::Response::Status(s) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(status.protocol_version, dlsession_proto::PROTOCOL_VERSION);
        let config = SessionConfig { app_id: Some("org.example.v1".into()), ..SessionConfig::default() };
        let attach = Request::Attach { identifier: "org.example.v1.bg".into(), config, takeover: false };
        assert!(matches!(c.request(attach).unwrap(), v1::Response::Session(_)));
        assert!(matches!(c.next_event(), v1::Event::FinishedEvents { .. }));
        let tasks = vec![TaskSpec::get(server.url("/a.bin")), TaskSpec::get(server.url("/gone.bin"))];
        let ids = match c.request(Request::CreateTasks { identifier: "org.example.v1.bg".into(), tasks, resume: true })
        {
            Ok(v1::Response::TasksCreated(ids)) => ids,
            other => panic!("{other:?}"),
        };
        // Collect the durable events of both tasks, acknowledging them as the library does.
        let mut finished = None;
        let mut failed = None;
        let mut completed = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while completed < 2 && Instant::now() < deadline {
            if let v1::Event::Durable { seq, event, .. } = c.next_event() {
                match event {
                    v1::DurableEvent::FinishedDownloading { task, location } if task == ids[0] => {
                        let copy = env.path().join("a.bin");
                        std::fs::copy(&location, &copy).unwrap();
                        finished = Some(copy);
                    }
                    v1::DurableEvent::Completed { task, error } => {
                        completed += 1;
                        if task == ids[1] {
                            failed = error;
                        }
                    }
                    _ => {}
                }
                let ack = Request::AckEvents { identifier: "org.example.v1.bg".into(), seqs: vec![seq] };
                assert!(matches!(c.request(ack).unwrap(), v1::Response::Ok));
            }
        }
        let file = finished.expect("finished_downloading");
        assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(41, 300_000)));
        let error = failed.expect("the 404 completes with an error");
        assert_eq!(error.code, v1::ErrorCode::HttpStatus);
        assert_eq!(error.http_status, Some(404));
        // Listing and inspecting answer in protocol 1's shapes.
        match c.request(Request::GetSession { identifier: "org.example.v1.bg".into() }).unwrap() {
            v1::Response::Session(info) => assert_eq!(info.pending_events, 0),
            other => panic!("{other:?}"),
        }
        // A task that waits for a reason protocol 1 lacks is shown with the nearest one.
        let spec = TaskSpec::get(server.url("/a.bin"));
        let id = match c.request(Request::CreateTasks {
            identifier: "org.example.v1.bg".into(),
            tasks: vec![spec],
            resume: false,
        }) {
            Ok(v1::Response::TasksCreated(ids)) => ids[0],
            other => panic!("{other:?}"),
        };
        match c.request(Request::GetTask { task: id }).unwrap() {
            v1::Response::Task(d) => {
                assert_eq!(d.info.state, TaskState::Suspended);
                assert_eq!(d.info.wait, Some(v1::WaitReason::Suspended));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.request(Request::ControlTask { task: id, action: TaskAction::Cancel }).unwrap(),
            v1::Response::Ok
        ));
        let err = c.request(Request::GetSession { identifier: "nope".into() }).unwrap_err();
        assert_eq!(err.code, v1::ErrorCode::NoSuchSession);
    })
    .await
    .unwrap();
}

/// What protocol 4 added reaches a protocol-1 app as what it knows: a challenge in a
/// session opted in by someone else reads as `resumed_at_offset 0`, and acknowledging it
/// unanswered fails the task with the 401, as before; an upload another client put in the
/// session reads as `finished_downloading` of its response body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_1_apps_see_challenges_and_uploads_as_they_always_did() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/private", Resource::generated(1000, 43).require_auth("Basic eDp5", "Basic realm=\"r\""));
    let uploads = dlsession_testkit::UploadServer::start(false).await.unwrap();
    let file = env.path().join("up.bin");
    std::fs::write(&file, b"hello, server").unwrap();
    let socket = env.socket.clone();
    let session = "org.example.v1.auth";
    let (url, up_url) = (server.url("/private"), uploads.url("/files/up"));
    let file_arg = file.to_str().unwrap().to_owned();
    let ctl = move |args: &[&str]| {
        let out = std::process::Command::new(dlsession_testkit::bin_path("dlsessionctl"))
            .args(["--socket", socket.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    let socket = env.socket.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = V1Client::connect(&socket, Some("org.example.v1"));
        let config = SessionConfig { app_id: Some("org.example.v1".into()), ..SessionConfig::default() };
        let attach = Request::Attach { identifier: session.into(), config, takeover: false };
        assert!(matches!(c.request(attach).unwrap(), v1::Response::Session(_)));
        assert!(matches!(c.next_event(), v1::Event::FinishedEvents { .. }));
        ctl(&["policy", session, "--challenges", "ask"]);
        let tasks = vec![TaskSpec::get(url)];
        let id = match c.request(Request::CreateTasks { identifier: session.into(), tasks, resume: true }) {
            Ok(v1::Response::TasksCreated(ids)) => ids[0],
            other => panic!("{other:?}"),
        };
        ctl(&["upload", &file_arg, &up_url, "--session", session]);
        let (mut resumed, mut failed, mut body, mut completed) = (false, None, None, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while completed < 2 && Instant::now() < deadline {
            if let v1::Event::Durable { seq, event, .. } = c.next_event() {
                match event {
                    v1::DurableEvent::ResumedAtOffset { task, offset: 0, .. } if task == id => resumed = true,
                    v1::DurableEvent::FinishedDownloading { location, .. } => {
                        body = Some(std::fs::read(&location).unwrap());
                    }
                    v1::DurableEvent::Completed { task, error } => {
                        completed += 1;
                        if task == id {
                            failed = error;
                        }
                    }
                    _ => {}
                }
                let ack = Request::AckEvents { identifier: session.into(), seqs: vec![seq] };
                assert!(matches!(c.request(ack).unwrap(), v1::Response::Ok));
            }
        }
        assert!(resumed, "the challenge reads as resumed_at_offset 0");
        let error = failed.expect("acknowledged unanswered: the 401");
        assert_eq!((error.code, error.http_status), (v1::ErrorCode::HttpStatus, Some(401)), "{error:?}");
        let body = String::from_utf8(body.expect("the upload's response as a finished download")).unwrap();
        assert!(body.contains("\"size\":13"), "{body}");
    })
    .await
    .unwrap();
}

/// A client of a protocol this daemon does not serve gets a clear refusal, never garbage.
#[test]
fn clients_of_unknown_protocols_are_refused_clearly() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    for version in [0, dlsession_proto::PROTOCOL_VERSION + 1] {
        let mut s = UnixStream::connect(&env.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&Preamble { version, status: HandshakeStatus::Ok }.to_bytes()).unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).unwrap();
        let pre = Preamble::parse(reply[..8].try_into().unwrap()).unwrap();
        assert_eq!(pre.status, HandshakeStatus::VersionMismatch, "version {version}");
        assert_eq!(pre.version, dlsession_proto::PROTOCOL_VERSION);
        assert_eq!(reply.len(), 8, "nothing but the refusal");
    }
}

/// Copies a directory tree (files and directories only).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The state a daemon of schema version 1 left behind (`crates/e2e/fixtures/schema-v1`) opens
/// in this daemon, migrated, with every session, task, partial file and event intact:
/// the partial downloads resume where they stopped, the resume data works, the events
/// are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_1_state_directory_opens_with_everything_intact() {
    use dlsession::proto::{Response as R, TaskState as S};
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/schema-v1");
    // Paths in the database point here. Everything that ages is held still: the test must
    // pass in 2030 too.
    let config = format!(
        "{}event_retention_days = 36500\nretired_history_days = 36500\nretry_after_max_ms = 1000\n",
        dlsession_testkit::daemon::FAST_CONFIG
    );
    let env = TestEnv::at(Path::new("/tmp/dlsessiond-fixture-v1"), &config);
    copy_tree(&fixture.join("state"), &env.state_dir.join("dlsessiond"));
    copy_tree(&fixture.join("cache"), &env.cache_dir.join("dlsessiond"));
    for entry in std::fs::read_dir(env.downloads_dir().join("resume")).unwrap() {
        let f = std::fs::File::options().write(true).open(entry.unwrap().path()).unwrap();
        f.set_modified(std::time::SystemTime::now()).unwrap();
    }
    let s = TestServer::start().await.unwrap();
    s.add("/partial.bin", Resource::generated(8 << 20, 101).etag("\"fixture-partial\""));
    s.add("/done.bin", Resource::generated(100 << 10, 102));
    s.add("/fresh.bin", Resource::generated(1000, 108));
    s.add("/kept.bin", Resource::generated(8 << 20, 106).etag("\"fixture-kept\""));
    // Still unavailable for now: task 6 keeps waiting (its events would change the counts).
    let unavailable = dlsession_testkit::Fault::Status { code: 503, retry_after: None };
    s.add("/busy.bin", Resource::generated(1000, 105).fault(dlsession_testkit::Hits::All, unavailable));
    let proxy = format!("http://127.0.0.1:{}", s.addr().port());
    let d = TestDaemon::start_with_env(
        &env,
        &[("HTTP_PROXY", std::ffi::OsStr::new(&proxy)), ("NO_PROXY", std::ffi::OsStr::new(""))],
    );
    // The socket accepts (into its backlog) before the database is opened: wait for it.
    dlsession_testkit::wait_for("the database migrated", Duration::from_secs(20), || {
        // 8 live tasks: the 3 suspended ones stay on disk until their session is touched.
        d.log().contains("state restored sessions=2 tasks=5 dormant=3").then_some(())
    });
    assert!(d.log().contains("database migrated version=2"), "{}", d.log());
    let c = dlsession_testkit::app::client(&env).await;

    // Sessions and their configuration.
    let sessions = c.list_sessions().await.unwrap();
    assert_eq!(sessions.len(), 2);
    let photos = sessions.iter().find(|s| s.identifier == "org.example.fixture.photos").unwrap();
    assert_eq!(photos.config.app_id.as_deref(), Some("org.example.fixture"));
    assert_eq!(
        photos.config.launch,
        Some(dlsession::proto::LaunchSpec::Command {
            argv: vec!["/usr/bin/fixture-app".into(), "--background".into()]
        })
    );
    assert!(photos.config.http_headers.iter().any(|h| h.name == "Authorization" && h.value == "Bearer fixture-secret"));
    assert_eq!(photos.config.max_concurrent_tasks, Some(3));
    assert_eq!(photos.config.bandwidth_limit, Some(4 << 20));
    assert_eq!(photos.pending_events, 4);
    let inv = sessions.iter().find(|s| s.identifier == "org.example.fixture.invalidating").unwrap();
    assert!(inv.invalidating);

    // Every task, as it was.
    let detail = |id: u64| {
        let c = c.clone();
        async move {
            match c.request(Request::GetTask { task: id }).await.unwrap() {
                R::Task(d) => d,
                other => panic!("{other:?}"),
            }
        }
    };
    let fresh = detail(1).await;
    assert_eq!(fresh.info.state, S::Suspended);
    assert_eq!(fresh.info.description.as_deref(), Some("never started"));
    assert_eq!(fresh.info.priority, 0.9);
    assert_eq!(fresh.expected_sha256, Some([0xab; 32]));
    assert_eq!(fresh.destination.as_deref(), Some("/nonexistent/fixture/fresh.bin"));
    assert!(fresh.request_headers.iter().any(|h| h.name == "X-Task"));
    let partial = detail(2).await;
    assert_eq!((partial.info.state, partial.committed_offset), (S::Suspended, 340_782));
    assert_eq!(partial.etag.as_deref(), Some("\"fixture-partial\""));
    let done = detail(3).await;
    assert_eq!(done.info.state, S::Completed);
    let location = done.info.location.clone().unwrap();
    assert_eq!(sha256_file(Path::new(&location)).unwrap(), to_hex(&pattern_sha256(102, 100 << 10)));
    let missing = detail(4).await;
    assert_eq!(missing.info.error.as_ref().map(|e| e.http_status), Some(Some(404)));
    let later = detail(5).await;
    assert_eq!(later.info.state, S::Queued);
    assert!(matches!(later.info.wait, Some(dlsession::proto::WaitReason::EarliestBegin { at: 4_102_444_800_000 })));
    assert!(detail(8).await.retired, "history is kept");
    assert_eq!(detail(9).await.info.state, S::Suspended);

    // The task that waited on a 503 retries, and once the server works, finishes.
    s.add("/busy.bin", Resource::generated(1000, 105));
    let busy_done = dlsession_testkit::wait_for("task 6 to finish", Duration::from_secs(60), || {
        let d = tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(detail(6)));
        (d.info.state == S::Completed).then_some(d)
    });
    assert_eq!(busy_done.info.error, None);

    // The events wait for the app, in order, and are delivered on attach.
    let (delegate, mut seen) = dlsession_testkit::Recorder::new(&env.path().join("collected"));
    let session = dlsession::Session::attach_with(
        &c,
        dlsession::SessionConfiguration::background("org.example.fixture.photos")
            .app_id("org.example.fixture")
            .launch_command(["/usr/bin/fixture-app", "--background"]),
        std::sync::Arc::new(delegate),
    )
    .await
    .unwrap();
    assert_eq!(seen.completion(4, Duration::from_secs(30)).await.unwrap().http_status, Some(404));
    assert_eq!(seen.completion(3, Duration::from_secs(30)).await, None);
    assert_eq!(sha256_file(&seen.moved_to(3).unwrap()).unwrap(), to_hex(&pattern_sha256(102, 100 << 10)));
    assert_eq!(seen.completion(7, Duration::from_secs(30)).await.unwrap().code, dlsession::ErrorCode::Cancelled);

    // The partial download resumes where it stopped, byte-exact.
    let resumed = c.request(Request::ControlTask { task: 2, action: TaskAction::Resume }).await.unwrap();
    assert!(matches!(resumed, R::Ok));
    assert_eq!(seen.completion(2, Duration::from_secs(60)).await, None);
    assert_eq!(sha256_file(&seen.moved_to(2).unwrap()).unwrap(), to_hex(&pattern_sha256(101, 8 << 20)));
    let asked = s.requests_for("/partial.bin");
    assert_eq!(asked[0].range.as_deref(), Some("bytes=340782-"), "resumed, not restarted: {asked:?}");
    assert_eq!(asked[0].if_range.as_deref(), Some("\"fixture-partial\""));

    // The resume data handed out by the old daemon continues its download.
    let blob = std::fs::read(fixture.join("resume-data.bin")).unwrap();
    let kept = match c
        .request(Request::CreateTaskFromResumeData {
            identifier: "org.example.fixture.photos".into(),
            resume_data: blob,
            resume: true,
        })
        .await
        .unwrap()
    {
        R::TasksCreated(ids) => ids[0],
        other => panic!("{other:?}"),
    };
    assert!(kept >= 10, "task ids are never reused: {kept}");
    assert_eq!(seen.completion(kept, Duration::from_secs(60)).await, None);
    assert_eq!(sha256_file(&seen.moved_to(kept).unwrap()).unwrap(), to_hex(&pattern_sha256(106, 8 << 20)));
    assert_eq!(s.requests_for("/kept.bin")[0].range.as_deref(), Some("bytes=340782-"));
    drop(session);
}
