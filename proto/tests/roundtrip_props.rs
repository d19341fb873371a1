//! Every message type round-trips through the codec unchanged, for arbitrary values.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use dlsession_proto::*;
use proptest::collection::vec;
use proptest::option::of;
use proptest::prelude::*;

fn s() -> impl Strategy<Value = String> {
    ".{0,24}"
}

fn header() -> impl Strategy<Value = Header> {
    (s(), s()).prop_map(|(n, v)| Header::new(n, v))
}

fn error() -> impl Strategy<Value = ErrorInfo> {
    (0..ErrorCode::ALL.len(), s(), of(any::<u16>())).prop_map(|(i, m, h)| ErrorInfo {
        code: ErrorCode::ALL[i],
        message: m,
        http_status: h,
    })
}

fn state() -> impl Strategy<Value = TaskState> {
    (0..TaskState::ALL.len()).prop_map(|i| TaskState::ALL[i])
}

fn counts() -> impl Strategy<Value = TaskCounts> {
    any::<[u64; 5]>().prop_map(|[a, b, c, d, e]| TaskCounts {
        suspended: a,
        queued: b,
        running: c,
        waiting: d,
        completed: e,
    })
}

fn launch() -> impl Strategy<Value = LaunchSpec> {
    prop_oneof![
        vec(s(), 0..4).prop_map(|argv| LaunchSpec::Command { argv }),
        s().prop_map(|unit| LaunchSpec::SystemdUnit { unit })
    ]
}

fn config() -> impl Strategy<Value = SessionConfig> {
    (of(s()), of(launch()), vec(header(), 0..3), any::<(u64, u64, u32)>(), of(any::<u32>()), of(any::<u64>())).prop_map(
        |(app_id, launch, http_headers, (req, res, per_host), max, bw)| SessionConfig {
            app_id,
            launch,
            http_headers,
            timeout_for_request_ms: req,
            timeout_for_resource_ms: res,
            max_connections_per_host: per_host,
            max_concurrent_tasks: max,
            bandwidth_limit: bw,
        },
    )
}

fn spec() -> impl Strategy<Value = TaskSpec> {
    (
        s(),
        vec(header(), 0..3),
        of(s()),
        any::<f32>(),
        of(any::<u64>()),
        of(any::<[u8; 32]>()),
        of(s()),
        any::<bool>(),
        of(any::<u64>()),
    )
        .prop_map(
            |(
                url,
                headers,
                description,
                priority,
                earliest_begin,
                expected_sha256,
                destination,
                overwrite,
                expected_size,
            )| {
                TaskSpec {
                    url,
                    headers,
                    description,
                    priority,
                    earliest_begin,
                    expected_sha256,
                    destination,
                    overwrite,
                    expected_size,
                }
            },
        )
}

fn wait() -> impl Strategy<Value = WaitReason> {
    prop_oneof![
        Just(WaitReason::Suspended),
        any::<u32>().prop_map(|limit| WaitReason::GlobalLimit { limit }),
        (s(), any::<u32>()).prop_map(|(host, limit)| WaitReason::HostLimit { host, limit }),
        any::<u32>().prop_map(|limit| WaitReason::SessionLimit { limit }),
        any::<u64>().prop_map(|at| WaitReason::EarliestBegin { at }),
        (any::<u64>(), any::<u32>(), error()).prop_map(|(until, attempt, last_error)| WaitReason::Backoff {
            until,
            attempt,
            last_error
        }),
        of(any::<u64>()).prop_map(|next_wake| WaitReason::EventsPending { next_wake }),
        (error(), any::<u32>(), of(any::<u64>()))
            .prop_map(|(error, attempt, next_try)| { WaitReason::DestinationUnavailable { error, attempt, next_try } }),
        error().prop_map(|error| WaitReason::StorageFull { error }),
    ]
}

fn info() -> impl Strategy<Value = TaskInfo> {
    (
        any::<u64>(),
        s(),
        state(),
        s(),
        of(s()),
        any::<f32>(),
        any::<(u64, u64)>(),
        of(any::<u64>()),
        of(s()),
        of(error()),
        any::<u64>(),
        of(wait()),
    )
        .prop_map(
            |(
                id,
                session,
                state,
                url,
                description,
                priority,
                (bytes_received, speed),
                bytes_expected,
                location,
                error,
                created_at,
                wait,
            )| TaskInfo {
                id,
                session,
                state,
                url,
                description,
                priority,
                bytes_received,
                bytes_expected,
                speed,
                location,
                error,
                created_at,
                wait,
                upload: None,
            },
        )
        .prop_flat_map(|t| of(upload()).prop_map(move |upload| TaskInfo { upload, ..t.clone() }))
}

fn upload() -> impl Strategy<Value = UploadInfo> {
    (any::<bool>(), s(), any::<(u64, u64)>(), any::<(bool, bool)>()).prop_map(
        |(put, file, (bytes_total, bytes_sent), (idempotent, resumable))| UploadInfo {
            method: if put { UploadMethod::Put } else { UploadMethod::Post },
            file,
            bytes_total,
            bytes_sent,
            idempotent,
            resumable,
        },
    )
}

fn detail() -> impl Strategy<Value = TaskDetail> {
    (
        info(),
        vec(header(), 0..3),
        of(any::<[u8; 32]>()),
        (of(s()), of(s()), of(s())),
        of(any::<u16>()),
        vec(header(), 0..3),
        (of(s()), of(s())),
        any::<(u64, bool, u32, bool)>(),
        of(error()),
        (of(any::<u64>()), of(any::<u64>()), of(any::<u64>())),
    )
        .prop_map(
            |(
                info,
                request_headers,
                expected_sha256,
                (destination, partial_path, final_url),
                response_status,
                response_headers,
                (etag, last_modified),
                (committed_offset, resumable, attempts, retired),
                last_error,
                (started_at, finished_at, resource_deadline),
            )| TaskDetail {
                info,
                request_headers,
                expected_sha256,
                destination,
                partial_path,
                final_url,
                response_status,
                response_headers,
                etag,
                last_modified,
                committed_offset,
                resumable,
                attempts,
                last_error,
                started_at,
                finished_at,
                resource_deadline,
                retired,
            },
        )
}

fn session_info() -> impl Strategy<Value = SessionInfo> {
    (
        s(),
        config(),
        any::<bool>(),
        counts(),
        any::<u64>(),
        (any::<u32>(), of(any::<u64>()), of(any::<u64>()), of(error())),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(
                identifier,
                config,
                attached,
                tasks,
                pending_events,
                (attempts, last_wake, next_wake, last_error),
                invalidating,
                created_at,
            )| SessionInfo {
                identifier,
                config,
                attached,
                tasks,
                pending_events,
                wake: WakeStatus { attempts, last_wake, next_wake, last_error },
                invalidating,
                created_at,
            },
        )
}

fn status() -> impl Strategy<Value = DaemonStatus> {
    (
        (s(), any::<u16>(), any::<u32>(), any::<u64>(), any::<u64>()),
        (s(), s(), s(), s()),
        counts(),
        any::<(u64, u64, u64, u64, u32)>(),
        of(error()),
    )
        .prop_map(
            |(
                (daemon_version, protocol_version, pid, started_at, uptime_ms),
                (socket, state_dir, cache_dir, database),
                tasks,
                (sessions, connections, download_rate, bytes_downloaded, max_concurrent_downloads),
                storage,
            )| DaemonStatus {
                daemon_version,
                protocol_version,
                pid,
                started_at,
                uptime_ms,
                socket,
                state_dir,
                cache_dir,
                database,
                tasks,
                sessions,
                connections,
                download_rate,
                bytes_downloaded,
                max_concurrent_downloads,
                storage,
            },
        )
}

fn action() -> impl Strategy<Value = TaskAction> {
    prop_oneof![
        Just(TaskAction::Resume),
        Just(TaskAction::Suspend),
        Just(TaskAction::Cancel),
        Just(TaskAction::CancelProducingResumeData)
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Status),
        (s(), config(), any::<bool>()).prop_map(|(identifier, config, takeover)| Request::Attach {
            identifier,
            config,
            takeover
        }),
        s().prop_map(|identifier| Request::Detach { identifier }),
        (s(), of(config())).prop_map(|(identifier, config)| Request::OpenSession { identifier, config }),
        s().prop_map(|identifier| Request::GetSession { identifier }),
        Just(Request::ListSessions),
        (s(), vec(spec(), 0..3), any::<bool>()).prop_map(|(identifier, tasks, resume)| Request::CreateTasks {
            identifier,
            tasks,
            resume
        }),
        (s(), vec(any::<u8>(), 0..64), any::<bool>()).prop_map(|(identifier, resume_data, resume)| {
            Request::CreateTaskFromResumeData { identifier, resume_data, resume }
        }),
        (any::<u64>(), action()).prop_map(|(task, action)| Request::ControlTask { task, action }),
        any::<u64>().prop_map(|task| Request::GetTask { task }),
        (of(s()), vec(state(), 0..3), of(any::<u64>()), any::<u32>()).prop_map(|(session, states, after, limit)| {
            Request::ListTasks(TaskQuery { session, states, after, limit })
        }),
        (s(), vec(any::<u64>(), 0..8)).prop_map(|(identifier, seqs)| Request::AckEvents { identifier, seqs }),
        s().prop_map(|identifier| Request::FinishTasksAndInvalidate { identifier }),
        s().prop_map(|identifier| Request::InvalidateAndCancel { identifier }),
        s().prop_map(|identifier| Request::Wake { identifier }),
        (of(s()), vec(any::<u64>(), 0..4)).prop_map(|(session, tasks)| Request::Watch(WatchFilter { session, tasks })),
        Just(Request::Unwatch),
        vec(any::<u64>(), 0..8).prop_map(|tasks| Request::AcknowledgeTasks { tasks }),
        (of(s()), any::<u32>()).prop_map(|(after, limit)| Request::ListSessionsPage(SessionQuery { after, limit })),
        Just(Request::HandleWakes),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    // Boxed arms: one nested type for every variant overflowed the test thread's stack.
    prop_oneof![
        Just(Response::Ok),
        status().prop_map(Response::Status).boxed(),
        session_info().prop_map(Response::Session).boxed(),
        vec(session_info(), 0..3).prop_map(Response::Sessions).boxed(),
        vec(any::<u64>(), 0..5).prop_map(Response::TasksCreated),
        vec(any::<u8>(), 0..64).prop_map(Response::ResumeData),
        detail().prop_map(Response::Task).boxed(),
        (vec(info(), 0..3), of(any::<u64>()))
            .prop_map(|(tasks, next_after)| Response::Tasks(TaskPage { tasks, next_after }))
            .boxed(),
        prop_oneof![
            Just(WakeOutcome::Attached),
            any::<u32>().prop_map(|connections| WakeOutcome::Woken { connections }),
            any::<u32>().prop_map(|pid| WakeOutcome::Launched { pid }),
            s().prop_map(|unit| WakeOutcome::UnitStarted { unit }),
            Just(WakeOutcome::NoTarget),
        ]
        .prop_map(Response::Wake),
        (vec(session_info(), 0..3), of(s()))
            .prop_map(|(sessions, next_after)| Response::SessionsPage(SessionPage { sessions, next_after }))
            .boxed(),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let durable = prop_oneof![
        (any::<u64>(), any::<u64>(), of(any::<u64>()))
            .prop_map(|(task, offset, expected_total)| DurableEvent::ResumedAtOffset { task, offset, expected_total }),
        (any::<u64>(), s()).prop_map(|(task, location)| DurableEvent::FinishedDownloading { task, location }),
        (any::<u64>(), of(error())).prop_map(|(task, error)| DurableEvent::Completed { task, error }),
        of(error()).prop_map(|error| DurableEvent::DidBecomeInvalid { error }),
    ];
    let detach =
        prop_oneof![Just(DetachReason::TakenOver), Just(DetachReason::Invalidated), Just(DetachReason::DaemonShutdown)];
    let reason = prop_oneof![Just(WakeReason::FinishedEvents), Just(WakeReason::Requested)];
    prop_oneof![
        (s(), any::<u64>(), durable).prop_map(|(identifier, seq, event)| Event::Durable { identifier, seq, event }),
        (s(), any::<(u64, u64, u64)>(), of(any::<u64>())).prop_map(|(identifier, (task, written, total), expected)| {
            Event::Progress {
                identifier,
                task,
                bytes_written: written,
                total_bytes_written: total,
                total_bytes_expected: expected,
            }
        }),
        s().prop_map(|identifier| Event::FinishedEvents { identifier }),
        (s(), detach).prop_map(|(identifier, reason)| Event::Detached { identifier, reason }),
        (s(), reason).prop_map(|(identifier, reason)| Event::Wake { identifier, reason }),
        info().prop_map(Event::TaskUpdate),
    ]
}

/// Whatever the daemon sends a protocol-1 client decodes as protocol 1, as the downgrade says.
fn reaches_protocol_1(msg: ServerMessage) -> bool {
    let bytes = frame::encode_server_frame(1, msg.clone()).unwrap();
    let back: Vec<v1::ServerMessage> = frame::decode_frames(&bytes).unwrap();
    back.len() == 1 && same_encoding(&back[0], &v1::downgrade(msg))
}

/// NaN != NaN: compare floats by bits by comparing the encodings instead.
fn same_encoding<T: serde::Serialize>(a: &T, b: &T) -> bool {
    codec::encode(a).unwrap() == codec::encode(b).unwrap()
}

/// `PROPTEST_CASES` raises the count for the long profile (`scripts/long-tests.sh`).
fn cases(default: u32) -> ProptestConfig {
    ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default))
}

proptest! {
    #![proptest_config(cases(500))]

    #[test]
    fn requests_round_trip(id in any::<u64>(), request in request()) {
        let frame = RequestFrame { id, request };
        let bytes = frame::encode_frame(&frame).unwrap();
        let back: Vec<RequestFrame> = frame::decode_frames(&bytes).unwrap();
        prop_assert_eq!(back.len(), 1);
        prop_assert!(same_encoding(&back[0], &frame));
    }

    #[test]
    fn responses_round_trip(id in any::<u64>(), result in prop_oneof![response().prop_map(Ok), error().prop_map(Err)]) {
        let msg = ServerMessage::Response { id, result };
        let back: ServerMessage = codec::decode(&codec::encode(&msg).unwrap()).unwrap();
        prop_assert!(same_encoding(&back, &msg));
        prop_assert!(reaches_protocol_1(msg));
    }

    #[test]
    fn events_round_trip(event in event()) {
        let msg = ServerMessage::Event(event);
        let back: ServerMessage = codec::decode(&codec::encode(&msg).unwrap()).unwrap();
        prop_assert!(same_encoding(&back, &msg));
        prop_assert!(reaches_protocol_1(msg));
    }

    #[test]
    fn hellos_round_trip(client_name in s(), client_version in s(), app_id in of(s()), umask in of(any::<u32>()), pid in any::<u32>(), connection_id in any::<u64>()) {
        let hello = ClientHello { client_name, client_version, app_id, umask };
        prop_assert_eq!(codec::decode::<ClientHello>(&codec::encode(&hello).unwrap()).unwrap(), hello);
        let welcome = Welcome { daemon_version: "v".into(), pid, connection_id };
        prop_assert_eq!(codec::decode::<Welcome>(&codec::encode(&welcome).unwrap()).unwrap(), welcome);
    }

    #[test]
    fn preambles_round_trip(version in any::<u16>(), status in any::<u16>()) {
        let p = handshake::Preamble { version, status: handshake::HandshakeStatus::from_u16(status) };
        prop_assert_eq!(handshake::Preamble::parse(p.to_bytes()).unwrap(), p);
    }
}
