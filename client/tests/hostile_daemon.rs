//! Nothing a daemon sends can panic the client: a fake daemon on a Unix socket answers
//! with wrong versions, refusals, garbage, oversized frames and the wrong responses, and
//! every case ends in a typed error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::PathBuf;

use dlsession::proto::handshake::{HandshakeStatus, Preamble};
use dlsession::proto::{ErrorCode, Response, ServerMessage, Welcome, frame};
use dlsession::{Client, ClientOptions, Error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Serves one connection with `script` after reading the client's opening (preamble and
/// hello frame).
async fn fake_daemon<F, Fut>(script: F) -> (tempfile::TempDir, PathBuf)
where
    F: FnOnce(UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (dir, path, listener) = listen();
    tokio::spawn(async move { script(opened(&listener).await).await });
    (dir, path)
}

/// A socket in a directory of its own, for a fake daemon to listen on.
fn listen() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, listener)
}

/// The next connection, its opening (preamble and hello frame) read.
async fn opened(listener: &UnixListener) -> UnixStream {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut pre = [0u8; 8];
    let _ = s.read_exact(&mut pre).await;
    let _ = read_frame(&mut s).await;
    s
}

async fn read_frame(s: &mut UnixStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).await.is_err() {
        return Vec::new();
    }
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    let _ = s.read_exact(&mut body).await;
    body
}

fn options(path: PathBuf) -> ClientOptions {
    ClientOptions { socket: Some(path), autostart: false, reconnect: false, ..ClientOptions::default() }
}

/// Task `seq` of session "s" completed, as durable event `seq`.
fn completed(seq: u64) -> ServerMessage {
    let event = dlsession::proto::DurableEvent::Completed { task: seq, error: None };
    ServerMessage::Event(dlsession::proto::Event::Durable { identifier: "s".into(), seq, event })
}

/// Records the tasks whose completion it hears, in order (twice if handed twice), pausing
/// `pause` in each (a slow app), and how its attachment ended.
#[derive(Default)]
struct Completions {
    heard: std::sync::Mutex<Vec<u64>>,
    pause: std::time::Duration,
    detached: std::sync::Mutex<Option<dlsession::DetachReason>>,
}

impl dlsession::SessionDelegate for Completions {
    fn did_complete_with_error(
        &self,
        _: &dlsession::Session,
        task: &dlsession::DownloadTask,
        _: Option<&dlsession::TaskError>,
    ) {
        self.heard.lock().unwrap().push(task.id());
        std::thread::sleep(self.pause);
    }

    fn did_detach(&self, _: &dlsession::Session, reason: dlsession::DetachReason) {
        *self.detached.lock().unwrap() = Some(reason);
    }
}

/// Session "s", attached, one event pending.
fn session_info() -> dlsession::proto::SessionInfo {
    dlsession::proto::SessionInfo {
        identifier: "s".into(),
        config: dlsession::proto::SessionConfig::default(),
        attached: true,
        tasks: dlsession::proto::TaskCounts::default(),
        pending_events: 1,
        wake: Default::default(),
        invalidating: false,
        created_at: 0,
    }
}

async fn welcome(s: &mut UnixStream) {
    let mut bytes = Preamble::ours(HandshakeStatus::Ok).to_bytes().to_vec();
    bytes.extend(frame::encode_frame(&Welcome { daemon_version: "fake".into(), pid: 1, connection_id: 1 }).unwrap());
    s.write_all(&bytes).await.unwrap();
}

#[tokio::test]
async fn another_protocol_version_is_a_typed_error() {
    let (_d, path) = fake_daemon(|mut s| async move {
        let _ = s.write_all(&Preamble { version: 9, status: HandshakeStatus::VersionMismatch }.to_bytes()).await;
    })
    .await;
    let err = Client::connect(options(path)).await.unwrap_err();
    assert!(matches!(err, Error::VersionMismatch { ours: dlsession::proto::PROTOCOL_VERSION, theirs: 9 }), "{err:?}");
    assert_eq!(err.code(), ErrorCode::ProtocolVersion);
}

/// A daemon that comes back speaking another version (downgraded under a running app):
/// requests fail with that, not with a bare timeout, while the client keeps trying.
#[tokio::test]
async fn a_daemon_back_in_another_version_fails_requests_with_it() {
    let (_dir, path, listener) = listen();
    tokio::spawn(async move {
        // Ours first, gone at once; then only an older one answers.
        welcome(&mut opened(&listener).await).await;
        loop {
            let mut s = opened(&listener).await;
            let _ = s.write_all(&Preamble { version: 5, status: HandshakeStatus::VersionMismatch }.to_bytes()).await;
        }
    });
    let options =
        ClientOptions { reconnect: true, request_timeout: std::time::Duration::from_secs(2), ..options(path) };
    let client = Client::connect(options).await.unwrap();
    while client.is_connected() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let err = client.request(dlsession::proto::Request::Status).await.unwrap_err();
    assert!(matches!(err, Error::VersionMismatch { theirs: 5, .. }), "{err:?}");
    assert_eq!(err.code(), ErrorCode::ProtocolVersion);
}

#[tokio::test]
async fn a_refusal_names_its_reason() {
    let (_d, path) = fake_daemon(|mut s| async move {
        let _ = s.write_all(&Preamble::ours(HandshakeStatus::PermissionDenied).to_bytes()).await;
    })
    .await;
    let err = Client::connect(options(path)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err}");
}

#[tokio::test]
async fn not_a_daemon_at_all() {
    let (_d, path) = fake_daemon(|mut s| async move {
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    })
    .await;
    let err = Client::connect(options(path)).await.unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
}

#[tokio::test]
async fn garbage_after_the_handshake_fails_the_request_not_the_process() {
    let (_d, path) = fake_daemon(|mut s| async move {
        welcome(&mut s).await;
        let _ = read_frame(&mut s).await;
        let _ = s.write_all(&[0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef]).await;
    })
    .await;
    let client = Client::connect(options(path)).await.unwrap();
    let err = client.request(dlsession::proto::Request::Status).await.unwrap_err();
    assert!(matches!(err, Error::Disconnected { reason: Some(_) }), "{err:?}");
    assert!(client.is_closed());
}

/// A daemon that stops reading but keeps its end open: the request's write fails, and the
/// link ends at once with that reason instead of the request waiting its whole timeout.
#[tokio::test]
async fn a_daemon_that_stops_reading_ends_the_link() {
    let (_d, path) = fake_daemon(|mut s| async move {
        welcome(&mut s).await;
        let s = s.into_std().unwrap();
        s.shutdown(std::net::Shutdown::Read).unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        drop(s);
    })
    .await;
    let client = Client::connect(options(path)).await.unwrap();
    let asked = std::time::Instant::now();
    let err = client.request(dlsession::proto::Request::Status).await.unwrap_err();
    assert!(asked.elapsed() < std::time::Duration::from_secs(10), "waited {:?}", asked.elapsed());
    assert!(
        matches!(&err, Error::Disconnected { reason: Some(r) } if r.contains("cannot write to dlsessiond")),
        "{err:?}"
    );
    assert!(client.is_closed());
}

#[tokio::test]
async fn an_oversized_frame_is_refused_before_allocation() {
    let (_d, path) = fake_daemon(|mut s| async move {
        welcome(&mut s).await;
        let _ = read_frame(&mut s).await;
        let _ = s.write_all(&u32::MAX.to_be_bytes()).await;
    })
    .await;
    let client = Client::connect(options(path)).await.unwrap();
    let err = client.request(dlsession::proto::Request::Status).await.unwrap_err();
    match err {
        Error::Disconnected { reason: Some(r) } => assert!(r.contains("exceeds the limit"), "{r}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_wrong_response_is_an_unexpected_response_error() {
    let (_d, path) = fake_daemon(|mut s| async move {
        welcome(&mut s).await;
        // Read the first request's frame (attaching reads the stored configuration first)
        // and answer it with `Ok` instead of `Session`.
        let body = read_frame(&mut s).await;
        let req: dlsession::proto::RequestFrame = dlsession::proto::codec::decode(&body).unwrap();
        let reply = ServerMessage::Response { id: req.id, result: Ok(Response::Ok) };
        s.write_all(&frame::encode_frame(&reply).unwrap()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    })
    .await;
    let client = Client::connect(options(path)).await.unwrap();
    struct Nothing;
    impl dlsession::SessionDelegate for Nothing {}
    let err = dlsession::Session::attach_with(
        &client,
        dlsession::SessionConfiguration::background("x"),
        std::sync::Arc::new(Nothing),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::UnexpectedResponse { expected: "session", got: "ok" }), "{err:?}");
}

#[tokio::test]
async fn nobody_listening_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let err = Client::connect(options(dir.path().join("none.sock"))).await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    assert!(err.to_string().contains("dlsessiond is not running"));
}

/// Events keep their order across an overflow of the session's queue: while the library
/// asks for the dropped ones again, an event the daemon sends before answering is not handed
/// to the delegate ahead of them; it comes in the replay, after them. And the replay is
/// paced: each event is sent again at most once (a replay of the whole backlog overflowed
/// the queue again each time, so a slow app with N events pending was sent about N²/2Q). A
/// scripted daemon holds exactly that order on the wire and counts what it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_event_never_overtakes_the_replay_of_an_overflow() {
    use dlsession::proto::{Event, Request, RequestFrame};
    use dlsession::{Session, SessionConfiguration};
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    const EVENTS: u64 = 60;
    let sent_times = Arc::new(Mutex::new(BTreeMap::<u64, u32>::new()));
    let counted = sent_times.clone();
    let (_d, path) = fake_daemon(|mut s| async move {
        welcome(&mut s).await;
        let mut asked = 0;
        let mut acked = BTreeSet::<u64>::new();
        let mut newest = EVENTS - 1;
        let send = async |s: &mut UnixStream, msg: &ServerMessage| {
            if let ServerMessage::Event(Event::Durable { seq, .. }) = msg {
                *counted.lock().unwrap().entry(*seq).or_insert(0) += 1;
            }
            s.write_all(&frame::encode_frame(msg).unwrap()).await.unwrap();
        };
        loop {
            let body = read_frame(&mut s).await;
            if body.is_empty() {
                return;
            }
            let Ok(frame) = dlsession::proto::codec::decode::<RequestFrame>(&body) else { return };
            let mut replay = None;
            let attach = matches!(frame.request, Request::Attach { .. });
            let answer = match frame.request {
                Request::GetSession { .. } | Request::Attach { .. } => Ok(Response::Session(session_info())),
                Request::ReplayEvents { from_seq, room, .. } => {
                    asked += 1;
                    if asked == 1 {
                        // A newer event goes first, then the answer, then the replay.
                        newest = EVENTS;
                        send(&mut s, &completed(EVENTS)).await;
                    }
                    replay = Some((from_seq, room));
                    Ok(Response::Ok)
                }
                Request::AckEvents { seqs, .. } => {
                    acked.extend(seqs);
                    Ok(Response::Ok)
                }
                Request::GetTask { task } => {
                    Err(dlsession::proto::ErrorInfo::new(ErrorCode::NoSuchTask, format!("no task {task}")))
                }
                _ => Ok(Response::Ok),
            };
            send(&mut s, &ServerMessage::Response { id: frame.id, result: answer }).await;
            if attach {
                // Many events at once into a queue of four: most are dropped.
                for seq in 1..EVENTS {
                    send(&mut s, &completed(seq)).await;
                }
            }
            if let Some((from, room)) = replay {
                let due: Vec<u64> = (from..=newest).filter(|seq| !acked.contains(seq)).take(room as usize).collect();
                for seq in due {
                    send(&mut s, &completed(seq)).await;
                }
            }
        }
    })
    .await;
    let client = Client::connect(ClientOptions { event_queue: 4, ..options(path) }).await.unwrap();
    let delegate = Arc::new(Completions { pause: std::time::Duration::from_millis(5), ..Completions::default() });
    let _session =
        Session::attach_with(&client, SessionConfiguration::background("s"), delegate.clone()).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while delegate.heard.lock().unwrap().len() < EVENTS as usize {
        assert!(std::time::Instant::now() < deadline, "heard only {:?}", delegate.heard.lock().unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let heard = delegate.heard.lock().unwrap().clone();
    assert_eq!(heard, (1..=EVENTS).collect::<Vec<u64>>(), "events heard out of their order, or twice");
    let most = sent_times.lock().unwrap().values().copied().max().unwrap();
    assert!(most <= 2, "an event was sent {most} times: {:?}", sent_times.lock().unwrap());
}

/// An event the delegate handled whose acknowledgement was lost with the connection comes
/// again in the rejoin's replay: it is acknowledged again, not handed to the delegate a
/// second time (an app would move a file it had moved already).
#[tokio::test]
async fn an_event_handled_before_a_reconnect_is_not_handed_over_again() {
    use dlsession::proto::{DurableEvent, Event, Request, RequestFrame};
    use dlsession::{Session, SessionConfiguration};
    use std::sync::{Arc, Mutex};

    let completed = ServerMessage::Event(Event::Durable {
        identifier: "s".into(),
        seq: 1,
        event: DurableEvent::Completed { task: 1, error: None },
    });
    let (_dir, path, listener) = listen();
    let acked_later = Arc::new(Mutex::new(Vec::<u64>::new()));
    let acked = acked_later.clone();
    tokio::spawn(async move {
        for connection in 1.. {
            let mut s = opened(&listener).await;
            welcome(&mut s).await;
            loop {
                let body = read_frame(&mut s).await;
                let Ok(frame) = dlsession::proto::codec::decode::<RequestFrame>(&body) else { break };
                let answer = match frame.request {
                    // The first connection goes before it answers the acknowledgement.
                    Request::AckEvents { .. } if connection == 1 => break,
                    Request::AckEvents { seqs, .. } => {
                        acked.lock().unwrap().extend(seqs);
                        Ok(Response::Ok)
                    }
                    Request::GetTask { task } => {
                        Err(dlsession::proto::ErrorInfo::new(ErrorCode::NoSuchTask, format!("no task {task}")))
                    }
                    Request::Attach { .. } | Request::GetSession { .. } => Ok(Response::Session(session_info())),
                    _ => Ok(Response::Ok),
                };
                let is_attach = matches!(answer, Ok(Response::Session(_)));
                let reply = ServerMessage::Response { id: frame.id, result: answer };
                s.write_all(&frame::encode_frame(&reply).unwrap()).await.unwrap();
                if is_attach {
                    // Unacknowledged: sent at every attach.
                    s.write_all(&frame::encode_frame(&completed).unwrap()).await.unwrap();
                }
            }
        }
    });
    let client = Client::connect(ClientOptions { reconnect: true, ..options(path) }).await.unwrap();
    let delegate = Arc::new(Completions::default());
    let _session =
        Session::attach_with(&client, SessionConfiguration::background("s"), delegate.clone()).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while acked_later.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never acknowledged on the new connection");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A second handing over, or a second acknowledgement, would come by now.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(*delegate.heard.lock().unwrap(), [1], "handed to the delegate once");
    assert_eq!(*acked_later.lock().unwrap(), [1], "acknowledged again, once");
}

/// An app that drops its session while the delegate handles an event detaches only after
/// acknowledging what it handled: the daemon applies requests in order, and a detach first
/// left the session unattached with that event pending (a process attaching then, or the
/// relaunch the daemon starts, was handed it again, its file moved already).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_session_detaches_after_its_acknowledgements() {
    use dlsession::proto::{DurableEvent, Event, Request, RequestFrame};
    use dlsession::{Session, SessionConfiguration};
    use std::sync::{Arc, Mutex};

    let (_dir, path, listener) = listen();
    let heard = Arc::new(Mutex::new(Vec::<String>::new()));
    let order = heard.clone();
    tokio::spawn(async move {
        let mut s = opened(&listener).await;
        welcome(&mut s).await;
        loop {
            let body = read_frame(&mut s).await;
            let Ok(frame) = dlsession::proto::codec::decode::<RequestFrame>(&body) else { break };
            let answer = match &frame.request {
                Request::Attach { .. } | Request::GetSession { .. } => Ok(Response::Session(session_info())),
                Request::GetTask { task } => {
                    Err(dlsession::proto::ErrorInfo::new(ErrorCode::NoSuchTask, format!("no task {task}")))
                }
                _ => Ok(Response::Ok),
            };
            match &frame.request {
                Request::AckEvents { seqs, .. } => order.lock().unwrap().push(format!("ack {seqs:?}")),
                Request::Detach { .. } => order.lock().unwrap().push("detach".into()),
                _ => {}
            }
            let is_attach = matches!(frame.request, Request::Attach { .. });
            let reply = ServerMessage::Response { id: frame.id, result: answer };
            s.write_all(&frame::encode_frame(&reply).unwrap()).await.unwrap();
            if is_attach {
                for seq in [1, 2] {
                    let event = ServerMessage::Event(Event::Durable {
                        identifier: "s".into(),
                        seq,
                        event: DurableEvent::Completed { task: seq, error: None },
                    });
                    s.write_all(&frame::encode_frame(&event).unwrap()).await.unwrap();
                }
            }
        }
    });
    /// Busy with the first event while the app drops its session.
    struct Busy(std::sync::mpsc::Sender<()>);
    impl dlsession::SessionDelegate for Busy {
        fn did_complete_with_error(&self, _: &Session, _: &dlsession::DownloadTask, _: Option<&dlsession::TaskError>) {
            let _ = self.0.send(());
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }
    let client = Client::connect(options(path)).await.unwrap();
    let (entered, inside) = std::sync::mpsc::channel();
    let session =
        Session::attach_with(&client, SessionConfiguration::background("s"), Arc::new(Busy(entered))).await.unwrap();
    tokio::task::spawn_blocking(move || inside.recv_timeout(std::time::Duration::from_secs(20)).unwrap())
        .await
        .unwrap();
    drop(session);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !heard.lock().unwrap().iter().any(|h| h == "detach") {
        assert!(std::time::Instant::now() < deadline, "never detached: {:?}", heard.lock().unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(*heard.lock().unwrap(), ["ack [1]", "detach"], "the handled event acknowledged before the detach");
}

/// A connection that breaks while a session catches up after an overflow: the library waits
/// for its rejoin (whose attach replays everything) instead of asking the new connection for
/// the rest first, which the daemon answers `session_in_use` (not attached there yet) and the
/// library took for a takeover, ending the session. The scripted daemon answers the rejoin
/// slowly, so asking first is what would happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_catching_up_across_a_reconnect_is_not_taken_for_taken_over() {
    use dlsession::proto::{Request, RequestFrame};
    use dlsession::{Session, SessionConfiguration};
    use std::sync::{Arc, Mutex};

    const EVENTS: u64 = 30;
    let (_dir, path, listener) = listen();
    let asked_unattached = Arc::new(Mutex::new(0u32));
    let asked = asked_unattached.clone();
    tokio::spawn(async move {
        let mut acked = std::collections::BTreeSet::<u64>::new();
        for connection in 1.. {
            let mut s = opened(&listener).await;
            welcome(&mut s).await;
            let mut attached = false;
            loop {
                let body = read_frame(&mut s).await;
                let Ok(frame) = dlsession::proto::codec::decode::<RequestFrame>(&body) else { break };
                let answer = match &frame.request {
                    // The first connection breaks when asked for the rest.
                    Request::ReplayEvents { .. } if connection == 1 => break,
                    Request::ReplayEvents { .. } if !attached => {
                        *asked.lock().unwrap() += 1;
                        Err(dlsession::proto::ErrorInfo::new(ErrorCode::SessionInUse, "not attached here"))
                    }
                    // The rejoin's first request, answered slowly.
                    Request::GetSession { .. } if connection > 1 && !attached => {
                        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
                        Ok(Response::Session(session_info()))
                    }
                    Request::GetSession { .. } | Request::Attach { .. } => Ok(Response::Session(session_info())),
                    Request::AckEvents { seqs, .. } => {
                        acked.extend(seqs.iter().copied());
                        Ok(Response::Ok)
                    }
                    Request::GetTask { task } => {
                        Err(dlsession::proto::ErrorInfo::new(ErrorCode::NoSuchTask, format!("no task {task}")))
                    }
                    _ => Ok(Response::Ok),
                };
                // Everything unacknowledged after an attach (far more than the queue holds); a
                // paced replay's room from where it asks.
                let due: Vec<u64> = match &frame.request {
                    _ if answer.is_err() => Vec::new(),
                    Request::Attach { .. } => (1..=EVENTS).filter(|seq| !acked.contains(seq)).collect(),
                    Request::ReplayEvents { from_seq, room, .. } => {
                        (*from_seq..=EVENTS).filter(|seq| !acked.contains(seq)).take(*room as usize).collect()
                    }
                    _ => Vec::new(),
                };
                attached |= matches!(frame.request, Request::Attach { .. });
                let reply = ServerMessage::Response { id: frame.id, result: answer };
                s.write_all(&frame::encode_frame(&reply).unwrap()).await.unwrap();
                for seq in due {
                    s.write_all(&frame::encode_frame(&completed(seq)).unwrap()).await.unwrap();
                }
            }
        }
    });
    let options = ClientOptions { reconnect: true, event_queue: 4, ..options(path) };
    let client = Client::connect(options).await.unwrap();
    let delegate = Arc::new(Completions::default());
    let _session =
        Session::attach_with(&client, SessionConfiguration::background("s"), delegate.clone()).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let distinct = || delegate.heard.lock().unwrap().iter().collect::<std::collections::BTreeSet<_>>().len();
    while distinct() < EVENTS as usize {
        assert_eq!(
            *delegate.detached.lock().unwrap(),
            None,
            "the session ended; heard {:?}",
            delegate.heard.lock().unwrap()
        );
        assert!(std::time::Instant::now() < deadline, "heard only {:?}", delegate.heard.lock().unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(*delegate.detached.lock().unwrap(), None);
    assert_eq!(*asked_unattached.lock().unwrap(), 0, "asked the new connection before the rejoin");
}
