//! Golden bytes: the encoding of one sample of every message variant is frozen in
//! `tests/golden/v<N>/*.hex`, one directory per protocol version. A failure here means the
//! wire format changed: undo the change, or bump `PROTOCOL_VERSION`, freeze the old shapes
//! (as `v1` does) and bless the new version's directory with `DLSESSION_BLESS=2` (never an
//! older one: those bytes are what installed apps speak).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::PathBuf;

use dlsession_proto::handshake::{HandshakeStatus, Preamble};
use dlsession_proto::*;

fn sample_error() -> ErrorInfo {
    ErrorInfo::http(404, "server answered 404 Not Found")
}

fn sample_task_info() -> TaskInfo {
    TaskInfo {
        id: 42,
        session: "org.example.fetcher".into(),
        state: TaskState::Waiting,
        url: "https://example.org/a.bin".into(),
        description: Some("first".into()),
        priority: 0.75,
        bytes_received: 1 << 20,
        bytes_expected: Some(3 << 20),
        speed: 1000,
        location: None,
        error: None,
        created_at: 1_700_000_000_000,
        wait: Some(WaitReason::Backoff {
            until: 1_700_000_005_000,
            attempt: 2,
            last_error: ErrorInfo::new(ErrorCode::Network, "connection reset"),
        }),
        upload: None,
    }
}

fn sample_config() -> SessionConfig {
    SessionConfig {
        app_id: Some("org.example.fetcher".into()),
        launch: Some(LaunchSpec::Command { argv: vec!["/usr/bin/fetcher".into(), "--background".into()] }),
        http_headers: vec![Header::new("User-Agent", "fetcher/1.0")],
        max_concurrent_tasks: Some(4),
        bandwidth_limit: Some(1_000_000),
        ..SessionConfig::default()
    }
}

fn sample_session() -> SessionInfo {
    SessionInfo {
        identifier: "org.example.fetcher".into(),
        config: sample_config(),
        attached: true,
        tasks: TaskCounts { suspended: 1, queued: 2, running: 3, waiting: 4, completed: 5 },
        pending_events: 6,
        wake: WakeStatus { attempts: 1, last_wake: Some(10), next_wake: Some(20), last_error: None },
        invalidating: false,
        created_at: 1_700_000_000_000,
    }
}

fn requests() -> Vec<(&'static str, Request)> {
    let mut spec = TaskSpec::get("https://example.org/a.bin");
    spec.headers.push(Header::new("Authorization", "Bearer x"));
    spec.expected_sha256 = Some([7; 32]);
    spec.destination = Some("/home/u/a.bin".into());
    spec.earliest_begin = Some(5);
    spec.expected_size = Some(9);
    vec![
        ("req_status", Request::Status),
        (
            "req_attach",
            Request::Attach { identifier: "org.example.fetcher".into(), config: sample_config(), takeover: true },
        ),
        ("req_detach", Request::Detach { identifier: "s".into() }),
        ("req_open_session", Request::OpenSession { identifier: "s".into(), config: Some(SessionConfig::default()) }),
        ("req_get_session", Request::GetSession { identifier: "s".into() }),
        ("req_list_sessions", Request::ListSessions),
        ("req_create_tasks", Request::CreateTasks { identifier: "s".into(), tasks: vec![spec], resume: true }),
        (
            "req_create_from_resume",
            Request::CreateTaskFromResumeData { identifier: "s".into(), resume_data: vec![1, 2, 3], resume: false },
        ),
        ("req_control", Request::ControlTask { task: 7, action: TaskAction::CancelProducingResumeData }),
        ("req_get_task", Request::GetTask { task: 7 }),
        (
            "req_list_tasks",
            Request::ListTasks(TaskQuery {
                session: Some("s".into()),
                states: vec![TaskState::Running],
                after: Some(3),
                limit: 100,
            }),
        ),
        ("req_ack", Request::AckEvents { identifier: "s".into(), seqs: vec![1, 2, 300] }),
        ("req_finish_invalidate", Request::FinishTasksAndInvalidate { identifier: "s".into() }),
        ("req_invalidate_cancel", Request::InvalidateAndCancel { identifier: "s".into() }),
        ("req_wake", Request::Wake { identifier: "s".into() }),
        ("req_watch", Request::Watch(WatchFilter { session: None, tasks: vec![1, 2] })),
        ("req_unwatch", Request::Unwatch),
        ("req_acknowledge_tasks", Request::AcknowledgeTasks { tasks: vec![4, 5] }),
    ]
}

fn server_messages() -> Vec<(&'static str, ServerMessage)> {
    let resp = |r: Response| ServerMessage::Response { id: 9, result: Ok(r) };
    let detail = TaskDetail {
        info: sample_task_info(),
        request_headers: vec![Header::new("Accept", "*/*")],
        expected_sha256: None,
        destination: None,
        partial_path: Some("/cache/1.part".into()),
        final_url: Some("https://cdn.example.org/a.bin".into()),
        response_status: Some(206),
        response_headers: vec![Header::new("ETag", "\"abc\"")],
        etag: Some("\"abc\"".into()),
        last_modified: None,
        committed_offset: 1 << 20,
        resumable: true,
        attempts: 2,
        last_error: Some(sample_error()),
        started_at: Some(1),
        finished_at: None,
        resource_deadline: Some(2),
        retired: false,
    };
    let status = DaemonStatus {
        daemon_version: "0.1.0".into(),
        protocol_version: 1,
        pid: 1234,
        started_at: 1,
        uptime_ms: 2,
        socket: "/run/user/1000/dlsessiond/dlsessiond.sock".into(),
        state_dir: "/s".into(),
        cache_dir: "/c".into(),
        database: "/s/dlsessiond.db".into(),
        tasks: TaskCounts::default(),
        sessions: 3,
        connections: 4,
        download_rate: 5,
        bytes_downloaded: 6,
        max_concurrent_downloads: 16,
        storage: None,
    };
    vec![
        ("resp_ok", resp(Response::Ok)),
        ("resp_err", ServerMessage::Response { id: 10, result: Err(sample_error()) }),
        ("resp_status", resp(Response::Status(status))),
        ("resp_session", resp(Response::Session(sample_session()))),
        ("resp_sessions", resp(Response::Sessions(vec![sample_session()]))),
        ("resp_tasks_created", resp(Response::TasksCreated(vec![1, 2, 3]))),
        ("resp_resume_data", resp(Response::ResumeData(vec![0xde, 0xad]))),
        ("resp_task", resp(Response::Task(detail))),
        ("resp_tasks", resp(Response::Tasks(TaskPage { tasks: vec![sample_task_info()], next_after: Some(42) }))),
        ("resp_wake", resp(Response::Wake(WakeOutcome::Launched { pid: 77 }))),
        (
            "ev_resumed",
            ServerMessage::Event(Event::Durable {
                identifier: "s".into(),
                seq: 1,
                event: DurableEvent::ResumedAtOffset { task: 4, offset: 100, expected_total: Some(200) },
            }),
        ),
        (
            "ev_finished",
            ServerMessage::Event(Event::Durable {
                identifier: "s".into(),
                seq: 2,
                event: DurableEvent::FinishedDownloading { task: 4, location: "/c/4.download".into() },
            }),
        ),
        (
            "ev_completed",
            ServerMessage::Event(Event::Durable {
                identifier: "s".into(),
                seq: 3,
                event: DurableEvent::Completed { task: 4, error: Some(sample_error()) },
            }),
        ),
        (
            "ev_invalid",
            ServerMessage::Event(Event::Durable {
                identifier: "s".into(),
                seq: 4,
                event: DurableEvent::DidBecomeInvalid { error: None },
            }),
        ),
        (
            "ev_progress",
            ServerMessage::Event(Event::Progress {
                identifier: "s".into(),
                task: 4,
                bytes_written: 10,
                total_bytes_written: 20,
                total_bytes_expected: None,
            }),
        ),
        ("ev_finished_events", ServerMessage::Event(Event::FinishedEvents { identifier: "s".into() })),
        (
            "ev_detached",
            ServerMessage::Event(Event::Detached { identifier: "s".into(), reason: DetachReason::TakenOver }),
        ),
        ("ev_wake", ServerMessage::Event(Event::Wake { identifier: "s".into(), reason: WakeReason::FinishedEvents })),
        ("ev_task_update", ServerMessage::Event(Event::TaskUpdate(sample_task_info()))),
    ]
}

/// Messages that exist since protocol 2.
fn requests_v2() -> Vec<(&'static str, Request)> {
    vec![
        ("req_list_sessions_page", Request::ListSessionsPage(SessionQuery { after: Some("a".into()), limit: 50 })),
        ("req_handle_wakes", Request::HandleWakes),
    ]
}

fn server_messages_v2() -> Vec<(&'static str, ServerMessage)> {
    let resp = |r: Response| ServerMessage::Response { id: 9, result: Ok(r) };
    let mut waiting = sample_task_info();
    waiting.wait = Some(WaitReason::DestinationUnavailable {
        error: ErrorInfo::new(ErrorCode::DestinationUnavailable, "No space left on device (os error 28)"),
        attempt: 3,
        next_try: Some(1_700_000_009_000),
    });
    let mut held = sample_task_info();
    held.wait =
        Some(WaitReason::StorageFull { error: ErrorInfo::new(ErrorCode::StorageFull, "database or disk is full") });
    vec![
        (
            "resp_sessions_page",
            resp(Response::SessionsPage(SessionPage {
                sessions: vec![sample_session()],
                next_after: Some("z".into()),
            })),
        ),
        ("ev_task_update_destination", ServerMessage::Event(Event::TaskUpdate(waiting))),
        ("ev_task_update_storage", ServerMessage::Event(Event::TaskUpdate(held))),
        (
            "resp_err_storage",
            ServerMessage::Response { id: 11, result: Err(ErrorInfo::new(ErrorCode::StorageFull, "full")) },
        ),
    ]
}

/// Messages that exist since protocol 3.
fn requests_v3() -> Vec<(&'static str, Request)> {
    vec![
        (
            "req_set_bandwidth_limit",
            Request::SetBandwidthLimit { target: LimitTarget::Task { task: 7 }, bytes_per_second: Some(65536) },
        ),
        ("req_get_bandwidth_limits", Request::GetBandwidthLimits),
        ("req_get_conditions", Request::GetConditions),
        (
            "req_set_session_policy",
            Request::SetSessionPolicy { identifier: "s".into(), policy: SessionPolicy::default() },
        ),
        ("req_get_session_policy", Request::GetSessionPolicy { identifier: "s".into() }),
        (
            "req_set_task_policy",
            Request::SetTaskPolicy {
                tasks: vec![7, 8],
                policy: TaskPolicy { allows_metered: Some(false), discretionary: Some(true), ..TaskPolicy::default() },
            },
        ),
        ("req_get_task_policy", Request::GetTaskPolicy { task: 7 }),
        ("req_set_session_cookies", Request::SetSessionCookies { identifier: "s".into(), enabled: false }),
        ("req_get_session_cookies", Request::GetSessionCookies { identifier: "s".into() }),
        (
            "req_set_session_proxy",
            Request::SetSessionProxy {
                identifier: "s".into(),
                proxy: Some(SessionProxy {
                    url: Some("socks5h://127.0.0.1:1080".into()),
                    no_proxy: "10.0.0.0/8".into(),
                }),
            },
        ),
        ("req_get_session_proxy", Request::GetSessionProxy { identifier: "s".into() }),
    ]
}

fn server_messages_v3() -> Vec<(&'static str, ServerMessage)> {
    let resp = |r: Response| ServerMessage::Response { id: 9, result: Ok(r) };
    let with_wait = |w: WaitReason| {
        let mut t = sample_task_info();
        t.wait = Some(w);
        ServerMessage::Event(Event::TaskUpdate(t))
    };
    let mut desktop = sample_session();
    desktop.config.launch = Some(LaunchSpec::DesktopApp { app_id: "org.example.App".into() });
    vec![
        ("ev_task_update_no_network", with_wait(WaitReason::NoNetwork { since: 1_700_000_001_000 })),
        ("ev_task_update_metered", with_wait(WaitReason::MeteredNetwork)),
        ("ev_task_update_on_battery", with_wait(WaitReason::OnBattery)),
        ("ev_task_update_discretionary", with_wait(WaitReason::Discretionary)),
        (
            "ev_completed_not_connected",
            ServerMessage::Event(Event::Durable {
                identifier: "s".into(),
                seq: 3,
                event: DurableEvent::Completed {
                    task: 42,
                    error: Some(ErrorInfo::new(ErrorCode::NotConnected, "no route")),
                },
            }),
        ),
        ("resp_session_desktop_app", resp(Response::Session(desktop))),
        ("resp_wake_activated", resp(Response::Wake(WakeOutcome::Activated { app_id: "org.example.App".into() }))),
        (
            "resp_bandwidth_limits",
            resp(Response::BandwidthLimits(BandwidthLimits {
                global: Some(1 << 20),
                sessions: vec![("s".into(), 65536)],
                tasks: vec![(7, 4096)],
            })),
        ),
        (
            "resp_conditions",
            resp(Response::Conditions(Conditions {
                online: true,
                metered: true,
                on_battery: false,
                battery_percent: Some(80),
                network_source: "rtnetlink+NetworkManager".into(),
                power_source: "UPower".into(),
            })),
        ),
        ("resp_session_policy", resp(Response::SessionPolicy(SessionPolicy::default()))),
        ("resp_session_proxy", resp(Response::SessionProxy(Some(SessionProxy { url: None, no_proxy: String::new() })))),
        ("resp_session_cookies", resp(Response::SessionCookies(SessionCookies { enabled: true, stored: 3 }))),
        (
            "resp_task_policy",
            resp(Response::TaskPolicy(TaskPolicyInfo {
                own: TaskPolicy { allows_battery: Some(false), ..TaskPolicy::default() },
                effective: SessionPolicy { allows_battery: false, ..SessionPolicy::default() },
            })),
        ),
    ]
}

/// Messages that exist since protocol 4.
fn requests_v4() -> Vec<(&'static str, Request)> {
    let mut request = TaskSpec::get("https://example.org/upload");
    request.headers.push(Header::new("Content-Type", "image/jpeg"));
    vec![
        (
            "req_create_uploads",
            Request::CreateUploads {
                identifier: "s".into(),
                uploads: vec![UploadSpec {
                    request,
                    method: UploadMethod::Post,
                    file: "/home/u/photo.jpg".into(),
                    idempotent: true,
                }],
                resume: true,
            },
        ),
        ("req_set_session_challenges", Request::SetSessionChallenges { identifier: "s".into(), answers: true }),
        ("req_get_session_challenges", Request::GetSessionChallenges { identifier: "s".into() }),
        (
            "req_answer_challenge",
            Request::AnswerChallenge {
                task: 7,
                round: Some(1),
                answer: ChallengeAnswer::Use {
                    credential: Credential::Basic { user: "u".into(), password: "p".into() },
                    scope: CredentialScope::ProtectionSpace,
                    keep: true,
                },
            },
        ),
        (
            "req_answer_challenge_cancel",
            Request::AnswerChallenge { task: 7, round: None, answer: ChallengeAnswer::Cancel },
        ),
        (
            "req_set_session_client_cert",
            Request::SetSessionClientCert {
                identifier: "s".into(),
                cert: Some(ClientCertificate { cert_file: "/c/me.pem".into(), key_file: "/c/me.key".into() }),
            },
        ),
        ("req_get_session_client_cert", Request::GetSessionClientCert { identifier: "s".into() }),
    ]
}

fn sample_challenge() -> Challenge {
    Challenge {
        scheme: "Basic".into(),
        realm: Some("files".into()),
        origin: "https://example.org:443".into(),
        proxy: false,
        round: 1,
    }
}

fn server_messages_v4() -> Vec<(&'static str, ServerMessage)> {
    let mut upload = sample_task_info();
    upload.upload = Some(UploadInfo {
        method: UploadMethod::Put,
        file: "/home/u/photo.jpg".into(),
        bytes_total: 30,
        bytes_sent: 20,
        idempotent: false,
        resumable: true,
    });
    let mut waiting = sample_task_info();
    waiting.wait = Some(WaitReason::AuthRequired { challenge: sample_challenge() });
    let resp = |r: Response| ServerMessage::Response { id: 9, result: Ok(r) };
    vec![
        ("ev_task_update_auth_required", ServerMessage::Event(Event::TaskUpdate(waiting))),
        (
            "ev_challenge",
            ServerMessage::Event(Event::Durable {
                identifier: "s".into(),
                seq: 6,
                event: DurableEvent::Challenge { task: 4, challenge: sample_challenge() },
            }),
        ),
        (
            "resp_session_challenges",
            resp(Response::SessionChallenges(SessionChallenges { answers: true, credentials: 2, kept: 1 })),
        ),
        (
            "resp_session_client_cert",
            resp(Response::SessionClientCert(Some(ClientCertificate {
                cert_file: "/c/me.pem".into(),
                key_file: "/c/me.key".into(),
            }))),
        ),
        ("ev_task_update_upload", ServerMessage::Event(Event::TaskUpdate(upload))),
        (
            "ev_send_progress",
            ServerMessage::Event(Event::SendProgress {
                identifier: "s".into(),
                task: 4,
                bytes_sent: 10,
                total_bytes_sent: 20,
                total_bytes_expected_to_send: 30,
            }),
        ),
        (
            "ev_upload_response",
            ServerMessage::Event(Event::Durable {
                identifier: "s".into(),
                seq: 5,
                event: DurableEvent::UploadResponse {
                    task: 4,
                    status: 201,
                    headers: vec![Header::new("Location", "/photos/9")],
                    body: "/c/4.response".into(),
                    body_truncated: false,
                },
            }),
        ),
    ]
}

fn golden_dir(version: u16) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/v{version}"))
}

fn check(version: u16, name: &str, bytes: &[u8]) {
    let path = golden_dir(version).join(format!("{name}.hex"));
    let hex = validate::to_hex(bytes);
    if std::env::var("DLSESSION_BLESS").ok() == Some(version.to_string()) {
        std::fs::create_dir_all(golden_dir(version)).unwrap();
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (only the current version's directory may be blessed: DLSESSION_BLESS=<that version>; an older one is frozen)", path.display()));
    assert_eq!(hex, want.trim(), "wire encoding of {name} changed");
}

#[test]
fn handshake_is_frozen() {
    let v1 = v1::ClientHello {
        client_name: "dlsessionctl".into(),
        client_version: "0.1.0".into(),
        app_id: Some("org.example.fetcher".into()),
    };
    check(1, "hello", &frame::encode_frame(&v1).unwrap());
    let hello = ClientHello::from(v1);
    let hello = frame::encode_frame(&ClientHello { umask: Some(0o027), ..hello }).unwrap();
    check(2, "hello", &hello);
    check(3, "hello", &hello);
    check(4, "hello", &hello);
    check(5, "hello", &hello);
    check(6, "hello", &hello);
    check(7, "hello", &hello);
    check(8, "hello", &hello);
    let welcome = Welcome { daemon_version: "0.1.0".into(), pid: 4242, connection_id: 7 };
    for version in 1..=8 {
        check(version, "welcome", &frame::encode_frame(&welcome).unwrap());
    }
    assert_eq!(&Preamble::ours(HandshakeStatus::Ok).to_bytes(), b"DLSD\x00\x08\x00\x00");
    assert_eq!(&Preamble { version: 9, status: HandshakeStatus::VersionMismatch }.to_bytes(), b"DLSD\x00\x09\x00\x01");
}

#[test]
fn daemons_serve_every_supported_version() {
    let with = |version| Preamble { version, status: HandshakeStatus::Ok };
    assert_eq!(with(1).negotiate().unwrap(), 1);
    assert_eq!(with(2).negotiate().unwrap(), 2);
    assert_eq!(with(3).negotiate().unwrap(), 3);
    assert_eq!(with(4).negotiate().unwrap(), 4);
    assert_eq!(with(5).negotiate().unwrap(), 5);
    assert_eq!(with(6).negotiate().unwrap(), 6);
    assert_eq!(with(PROTOCOL_VERSION).negotiate().unwrap(), PROTOCOL_VERSION);
    assert!(with(0).negotiate().is_err());
    assert!(with(PROTOCOL_VERSION + 1).negotiate().is_err());
    // A client insists on its own version.
    assert!(with(1).check_version().is_err());
}

#[test]
fn requests_are_frozen_and_round_trip() {
    // Protocol 2 only appended requests: protocol 1's bytes mean the same thing.
    for (name, request) in requests() {
        let frame = RequestFrame { id: 0x1234, request };
        let bytes = frame::encode_frame(&frame).unwrap();
        check(1, name, &bytes);
        check(2, name, &bytes);
        check(3, name, &bytes);
        check(4, name, &bytes);
        check(5, name, &bytes);
        check(6, name, &bytes);
        check(7, name, &bytes);
        check(8, name, &bytes);
        let back: Vec<RequestFrame> = frame::decode_frames(&bytes).unwrap();
        assert_eq!(back, vec![frame], "{name} does not round-trip");
    }
    for (name, request) in requests_v2() {
        let frame = RequestFrame { id: 0x1234, request };
        let bytes = frame::encode_frame(&frame).unwrap();
        check(2, name, &bytes);
        check(3, name, &bytes);
        check(4, name, &bytes);
        check(5, name, &bytes);
        check(6, name, &bytes);
        check(7, name, &bytes);
        check(8, name, &bytes);
        let back: Vec<RequestFrame> = frame::decode_frames(&bytes).unwrap();
        assert_eq!(back, vec![frame], "{name} does not round-trip");
    }
    for (name, request) in requests_v3() {
        let frame = RequestFrame { id: 0x1234, request };
        let bytes = frame::encode_frame(&frame).unwrap();
        check(3, name, &bytes);
        check(4, name, &bytes);
        check(5, name, &bytes);
        check(6, name, &bytes);
        check(7, name, &bytes);
        check(8, name, &bytes);
        let back: Vec<RequestFrame> = frame::decode_frames(&bytes).unwrap();
        assert_eq!(back, vec![frame], "{name} does not round-trip");
    }
    for (name, request) in requests_v4() {
        let frame = RequestFrame { id: 0x1234, request };
        let bytes = frame::encode_frame(&frame).unwrap();
        check(4, name, &bytes);
        check(5, name, &bytes);
        check(6, name, &bytes);
        check(7, name, &bytes);
        check(8, name, &bytes);
        let back: Vec<RequestFrame> = frame::decode_frames(&bytes).unwrap();
        assert_eq!(back, vec![frame], "{name} does not round-trip");
    }
    // Protocol 5 only appended a request: protocol 4's messages are unchanged.
    let frame = RequestFrame { id: 0x1234, request: Request::ResumeTasks { tasks: vec![7, 8, 1 << 40] } };
    let bytes = frame::encode_frame(&frame).unwrap();
    check(5, "req_resume_tasks", &bytes);
    check(6, "req_resume_tasks", &bytes);
    check(7, "req_resume_tasks", &bytes);
    check(8, "req_resume_tasks", &bytes);
    let back: Vec<RequestFrame> = frame::decode_frames(&bytes).unwrap();
    assert_eq!(back, vec![frame], "req_resume_tasks does not round-trip");
    // Protocol 6 only appended a request: protocol 5's messages are unchanged.
    let create = CreateRequest::Tasks {
        identifier: "s".into(),
        tasks: vec![TaskSpec::get("https://example.org/a")],
        resume: true,
    };
    let frame = RequestFrame { id: 0x1234, request: Request::Once { key: u128::MAX - 7, request: create } };
    let bytes = frame::encode_frame(&frame).unwrap();
    check(6, "req_once", &bytes);
    check(7, "req_once", &bytes);
    check(8, "req_once", &bytes);
    let back: Vec<RequestFrame> = frame::decode_frames(&bytes).unwrap();
    assert_eq!(back, vec![frame], "req_once does not round-trip");
    // Protocol 8 only appended a request: protocol 7's messages are unchanged.
    let frame = RequestFrame {
        id: 0x1234,
        request: Request::ReplayEvents { identifier: "s".into(), from_seq: 1 << 33, room: 2048 },
    };
    let bytes = frame::encode_frame(&frame).unwrap();
    check(8, "req_replay_events", &bytes);
    let back: Vec<RequestFrame> = frame::decode_frames(&bytes).unwrap();
    assert_eq!(back, vec![frame], "req_replay_events does not round-trip");
}

#[test]
fn server_messages_are_frozen_and_round_trip() {
    for (name, msg) in server_messages().into_iter().chain(server_messages_v2()) {
        let bytes = frame::encode_frame(&msg).unwrap();
        check(4, name, &bytes);
        check(5, name, &bytes);
        check(6, name, &bytes);
        check(7, name, &bytes);
        check(8, name, &bytes);
        let back: Vec<ServerMessage> = frame::decode_frames(&bytes).unwrap();
        assert_eq!(back, vec![msg.clone()], "{name} does not round-trip");
        // Protocols 2 and 3 get the bytes they always got.
        let old = frame::encode_server_frame(3, msg.clone()).unwrap();
        check(2, name, &old);
        check(3, name, &old);
        assert_eq!(frame::encode_server_frame(2, msg).unwrap(), old);
        let back: Vec<v3::ServerMessage> = frame::decode_frames(&old).unwrap();
        assert_eq!(back.len(), 1, "{name}");
    }
    for (name, msg) in server_messages_v3() {
        let bytes = frame::encode_frame(&msg).unwrap();
        check(4, name, &bytes);
        check(5, name, &bytes);
        check(6, name, &bytes);
        check(7, name, &bytes);
        check(8, name, &bytes);
        let back: Vec<ServerMessage> = frame::decode_frames(&bytes).unwrap();
        assert_eq!(back, vec![msg.clone()], "{name} does not round-trip");
        check(3, name, &frame::encode_server_frame(3, msg).unwrap());
    }
    for (name, msg) in server_messages_v4() {
        let bytes = frame::encode_frame(&msg).unwrap();
        check(4, name, &bytes);
        check(5, name, &bytes);
        check(6, name, &bytes);
        check(7, name, &bytes);
        check(8, name, &bytes);
        let back: Vec<ServerMessage> = frame::decode_frames(&bytes).unwrap();
        assert_eq!(back, vec![msg], "{name} does not round-trip");
    }
}

/// What protocol 4 added reaches protocol-3 (and 2, and 1) clients as what they know.
#[test]
fn older_clients_get_uploads_as_downloads() {
    for (name, msg) in server_messages_v4() {
        for version in 1..=3 {
            let bytes = frame::encode_server_frame(version, msg.clone()).unwrap();
            if version == 1 {
                let back: Vec<v1::ServerMessage> = frame::decode_frames(&bytes).unwrap();
                assert_eq!(back.len(), 1, "{name}");
                continue;
            }
            let back: Vec<v3::ServerMessage> = frame::decode_frames(&bytes).unwrap();
            match (name, &back[0]) {
                ("ev_task_update_upload", v3::ServerMessage::Event(v3::Event::TaskUpdate(t))) => {
                    assert_eq!(t.id, 42)
                }
                ("ev_task_update_auth_required", v3::ServerMessage::Event(v3::Event::TaskUpdate(t))) => {
                    assert_eq!(t.wait, Some(WaitReason::Suspended))
                }
                (
                    "ev_challenge",
                    v3::ServerMessage::Event(v3::Event::Durable {
                        event: DurableEvent::ResumedAtOffset { task: 4, offset: 0, expected_total: None },
                        ..
                    }),
                ) => {}
                (
                    "resp_session_challenges" | "resp_session_client_cert",
                    v3::ServerMessage::Response { result: Ok(v3::Response::Ok), .. },
                ) => {}
                (
                    "ev_send_progress",
                    v3::ServerMessage::Event(v3::Event::Progress {
                        bytes_written: 10,
                        total_bytes_written: 20,
                        total_bytes_expected: Some(30),
                        ..
                    }),
                ) => {}
                (
                    "ev_upload_response",
                    v3::ServerMessage::Event(v3::Event::Durable {
                        event: DurableEvent::FinishedDownloading { task: 4, location },
                        ..
                    }),
                ) => assert_eq!(location, "/c/4.response"),
                (name, other) => panic!("{name} (protocol {version}): {other:?}"),
            }
        }
    }
}

/// What protocol 3 added reaches a protocol-2 client as variants protocol 2 has.
#[test]
fn protocol_2_clients_get_only_protocol_2_variants() {
    for (name, msg) in server_messages_v3() {
        let down = v2::downgrade(msg);
        let known_wait = |w: &Option<WaitReason>| {
            !matches!(
                w,
                Some(
                    WaitReason::NoNetwork { .. }
                        | WaitReason::MeteredNetwork
                        | WaitReason::OnBattery
                        | WaitReason::Discretionary
                )
            )
        };
        match &down {
            ServerMessage::Event(Event::TaskUpdate(t)) => assert!(known_wait(&t.wait), "{name}: {t:?}"),
            ServerMessage::Event(Event::Durable { event: DurableEvent::Completed { error: Some(e), .. }, .. }) => {
                assert_eq!(e.code, ErrorCode::Network, "{name}");
                assert!(e.message.starts_with("not_connected: "), "{name}: {e:?}");
            }
            ServerMessage::Response { result: Ok(Response::Session(s)), .. } => {
                assert_eq!(s.config.launch, None, "{name}")
            }
            ServerMessage::Response { result: Ok(Response::Wake(w)), .. } => {
                assert_eq!(*w, WakeOutcome::UnitStarted { unit: "org.example.App".into() }, "{name}")
            }
            ServerMessage::Response { result: Ok(Response::Ok), .. } => {}
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(frame::encode_server_frame(2, down.clone()).unwrap(), frame::encode_server_frame(3, down).unwrap());
    }
}

/// Protocol 7 appended the error code `shutting_down` (a refusal while the daemon stops):
/// older clients get it as `internal` with the same message, as they always did.
#[test]
fn older_clients_get_shutting_down_as_internal() {
    let refusal = ErrorInfo::new(ErrorCode::ShuttingDown, "the daemon is shutting down; try again when it is back");
    let msg = ServerMessage::Response { id: 9, result: Err(refusal.clone()) };
    let bytes = frame::encode_frame(&msg).unwrap();
    check(7, "resp_err_shutting_down", &bytes);
    check(8, "resp_err_shutting_down", &bytes);
    assert_eq!(frame::encode_server_frame(7, msg.clone()).unwrap(), bytes);
    let internal = ServerMessage::Response { id: 9, result: Err(ErrorInfo { code: ErrorCode::Internal, ..refusal }) };
    for version in 2..=6 {
        let old = frame::encode_server_frame(version, msg.clone()).unwrap();
        assert_eq!(old, frame::encode_server_frame(version, internal.clone()).unwrap(), "protocol {version}");
    }
    let v1_bytes = frame::encode_server_frame(1, msg).unwrap();
    assert_eq!(v1_bytes, frame::encode_server_frame(1, internal).unwrap());
}

/// What a protocol-1 client receives is byte for byte what protocol-1 daemons sent.
#[test]
fn protocol_1_clients_get_protocol_1_bytes() {
    for (name, msg) in server_messages() {
        let bytes = frame::encode_server_frame(1, msg.clone()).unwrap();
        check(1, name, &bytes);
        let back: Vec<v1::ServerMessage> = frame::decode_frames(&bytes).unwrap();
        assert_eq!(back, vec![v1::downgrade(msg)], "{name} does not round-trip");
    }
    // What protocol 1 cannot say becomes the nearest thing it can, and still decodes.
    for (name, msg) in server_messages_v2() {
        let bytes = frame::encode_server_frame(1, msg).unwrap();
        let back: Vec<v1::ServerMessage> = frame::decode_frames(&bytes).unwrap();
        match (name, &back[0]) {
            ("resp_sessions_page", v1::ServerMessage::Response { result: Ok(v1::Response::Sessions(s)), .. }) => {
                assert_eq!(s.len(), 1)
            }
            (
                "ev_task_update_destination",
                v1::ServerMessage::Event(v1::Event::TaskUpdate(v1::TaskInfo {
                    wait: Some(v1::WaitReason::Backoff { until, attempt: 3, last_error }),
                    ..
                })),
            ) => {
                assert_eq!(*until, 1_700_000_009_000);
                assert_eq!(last_error.code, v1::ErrorCode::FileError);
                assert!(last_error.message.starts_with("destination_unavailable: "), "{last_error:?}");
            }
            (
                "ev_task_update_storage",
                v1::ServerMessage::Event(v1::Event::TaskUpdate(v1::TaskInfo {
                    wait: Some(v1::WaitReason::Backoff { last_error, .. }),
                    ..
                })),
            ) => assert_eq!(last_error.code, v1::ErrorCode::Internal),
            ("resp_err_storage", v1::ServerMessage::Response { result: Err(e), .. }) => {
                assert_eq!(e.code, v1::ErrorCode::Internal);
                assert_eq!(e.message, "storage_full: full");
            }
            (name, other) => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn error_codes_are_stable() {
    let names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        names,
        [
            "invalid_url",
            "unsupported_scheme",
            "invalid_identifier",
            "invalid_request",
            "session_in_use",
            "no_such_session",
            "no_such_task",
            "session_invalidated",
            "http_status",
            "network",
            "tls",
            "timed_out",
            "too_many_redirects",
            "cannot_resume",
            "checksum_mismatch",
            "insufficient_space",
            "file_error",
            "cancelled",
            "protocol_version",
            "permission_denied",
            "internal",
            "storage_full",
            "destination_unavailable",
            "not_connected",
            "shutting_down",
        ]
    );
    for (i, code) in ErrorCode::ALL.iter().enumerate() {
        // The wire carries the position; it must match the list order.
        assert_eq!(codec::encode(code).unwrap(), vec![i as u8]);
        assert_eq!(ErrorCode::from_name(code.as_str()), Some(*code));
    }
}
