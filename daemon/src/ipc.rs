//! The socket server: peer check, handshake, and one reader and one writer per connection.
//!
//! Nothing from a peer is trusted: the uid is checked before a byte is read, the
//! handshake has a deadline, frames are size-checked before allocation, and a bad frame
//! closes only its own connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use interprocess::local_socket::tokio::{Listener, Stream, prelude::*};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::conn::{self, ConnEvent, ConnHandle, Mailbox, OutboxReader, PauseCheck, ToCore};
use dlsession_proto::handshake::{HandshakeStatus, Preamble};
use dlsession_proto::io::{read_frame, read_preamble};
use dlsession_proto::{ClientHello, ErrorCode, ErrorInfo, ProtoError, RequestFrame, ServerMessage, Welcome, frame, v1};

/// Requests a connection may have in flight before the daemon stops reading from it.
const MAX_IN_FLIGHT: usize = 256;
/// Messages written before the writer flushes and looks at the mailbox again.
const WRITE_BATCH: usize = 256;

#[derive(Debug, Clone)]
pub struct IpcSettings {
    pub handshake_timeout: Duration,
    pub max_connections: usize,
}

/// What woke the accept loop.
enum Next {
    Accepted(std::io::Result<Stream>),
    PauseCheck(PauseCheck),
}

/// Accepts connections until `shutdown` turns true, or until the core lets an idle pause
/// (see [`PauseCheck`]) end in a stop.
pub async fn serve<C: ToCore>(
    listener: Listener,
    core: C,
    settings: IpcSettings,
    mut shutdown: watch::Receiver<bool>,
    mut idle_checks: mpsc::Receiver<PauseCheck>,
) {
    let our_uid = rustix::process::geteuid().as_raw();
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let ids = AtomicU64::new(1);
    // Accepted connections whose task has not ended, counted from the moment of accept.
    let live = Arc::new(Live::default());
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            Some(check) = idle_checks.recv() => Next::PauseCheck(check),
            r = listener.accept() => Next::Accepted(r),
        };
        let accepted = match accepted {
            Next::Accepted(r) => r,
            Next::PauseCheck(check) => {
                let idle = live.count.load(Ordering::Acquire) == 0;
                let _ = check.reply.send(idle);
                if idle {
                    let go_on = tokio::select! {
                        _ = shutdown.wait_for(|s| *s) => false,
                        r = check.resume => r.is_ok(),
                    };
                    if !go_on {
                        break;
                    }
                }
                continue;
            }
        };
        match accepted {
            Ok(stream) => {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let conn = Connection { id, core: core.clone(), settings: settings.clone(), our_uid };
                let slots = slots.clone();
                live.count.fetch_add(1, Ordering::AcqRel);
                let live = LiveGuard(live.clone());
                tokio::spawn(
                    async move {
                        let _live = live;
                        conn.run(stream, slots).await;
                    }
                    .instrument(info_span!("conn", id)),
                );
            }
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    debug!("no longer accepting connections");
    // Answers the core queued last (to changes committed while it stopped) are still to be
    // written: each connection ends once the core has stopped and its writer has written
    // them, within `FLUSH_AT_EXIT` (a client that does not read is not waited for longer).
    core.stopped().await;
    let all_ended = async {
        loop {
            let ended = live.ended.notified();
            if live.count.load(Ordering::Acquire) == 0 {
                return;
            }
            ended.await;
        }
    };
    let _ = tokio::time::timeout(FLUSH_AT_EXIT, all_ended).await;
}

/// How long connections get, once the core has stopped, to write what it queued.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

/// Connections whose task has not ended, and a signal as each ends.
#[derive(Default)]
struct Live {
    count: AtomicUsize,
    ended: tokio::sync::Notify,
}

/// Counts a connection as live until its task ends (however it ends).
struct LiveGuard(Arc<Live>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.notify_waiters();
    }
}

/// Tells the core a connection is closed when dropped (however its task ends).
struct ClosedOnDrop<C: ToCore> {
    core: C,
    id: crate::conn::ConnId,
}

impl<C: ToCore> Drop for ClosedOnDrop<C> {
    fn drop(&mut self) {
        self.core.send(ConnEvent::Closed(self.id));
    }
}

/// The connection's socket, shared by its reader and its writer (a stream is read and
/// written through shared references at once; no lock between the two).
#[derive(Clone)]
struct Socket(Arc<Stream>);

impl Socket {
    /// Whether the peer has closed its end (or the socket failed), without reading: a
    /// reader that stopped reading (back-pressure) would otherwise never see it go.
    fn peer_gone(&self) -> bool {
        use rustix::event::{PollFd, PollFlags, poll};
        let Stream::UdSocket(stream) = &*self.0;
        let mut fds = [PollFd::new(stream, PollFlags::RDHUP)];
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        match poll(&mut fds, Some(&zero)) {
            Ok(_) => fds[0].revents().intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR),
            Err(_) => false,
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut &*self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_shutdown(cx)
    }
}

/// How often a reader held back by [`MAX_IN_FLIGHT`] looks whether its peer went away.
const GONE_CHECK: Duration = Duration::from_secs(1);

struct Connection<C> {
    id: u64,
    core: C,
    settings: IpcSettings,
    our_uid: u32,
}

impl<C: ToCore> Connection<C> {
    async fn run(self, stream: Stream, slots: Arc<Semaphore>) {
        let creds = stream.peer_creds();
        let (uid, pid) = match &creds {
            Ok(c) => (c.euid(), c.pid().and_then(|p| u32::try_from(p).ok())),
            Err(_) => (None, None),
        };
        let socket = Socket(Arc::new(stream));
        let (mut rd, mut wr) = (socket.clone(), socket);
        if uid != Some(self.our_uid) {
            warn!(peer_uid = ?uid, peer_pid = ?pid, "refused a connection from another user");
            refuse_and_linger(&mut rd, &mut wr, HandshakeStatus::PermissionDenied).await;
            return;
        }
        let Ok(_slot) = slots.try_acquire_owned() else {
            warn!(max = self.settings.max_connections, "refused a connection: too many connections");
            refuse_and_linger(&mut rd, &mut wr, HandshakeStatus::TooManyConnections).await;
            return;
        };
        let (version, hello) = match tokio::time::timeout(self.settings.handshake_timeout, read_hello(&mut rd)).await {
            Ok(Ok(hello)) => hello,
            Ok(Err(HelloError::Closed)) => {
                // A probe (is anyone listening?), as autostart makes: nothing to refuse.
                debug!("connection closed before its handshake");
                return;
            }
            Ok(Err(HelloError::Version(theirs))) => {
                info!(theirs, "client speaks a protocol version this daemon does not serve");
                refuse_and_linger(&mut rd, &mut wr, HandshakeStatus::VersionMismatch).await;
                return;
            }
            Ok(Err(HelloError::Bad(e))) => {
                info!(error = %e, "bad handshake");
                refuse(&mut wr, HandshakeStatus::BadHello).await;
                return;
            }
            Err(_) => {
                info!("handshake timed out");
                refuse(&mut wr, HandshakeStatus::BadHello).await;
                return;
            }
        };
        let welcome = Welcome {
            daemon_version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            connection_id: self.id,
        };
        // Answered in the client's own version: it checks that the versions match.
        let mut opening = Preamble { version, status: HandshakeStatus::Ok }.to_bytes().to_vec();
        match frame::encode_frame(&welcome) {
            Ok(frame) => opening.extend_from_slice(&frame),
            Err(_) => return,
        }
        if wr.write_all(&opening).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        info!(client = %hello.client_name, app_id = ?hello.app_id, pid = ?pid, protocol = version, "client connected");
        let file_mode = hello.file_mode();

        let (out_tx, out_rx) = conn::outbox();
        let mailbox = Arc::new(Mailbox::default());
        let handle = ConnHandle {
            id: self.id,
            client_name: hello.client_name,
            app_id: hello.app_id,
            pid,
            protocol: version,
            file_mode,
            out: out_tx.clone(),
            mailbox: mailbox.clone(),
        };
        if !self.core.send(ConnEvent::Open(handle)) {
            return;
        }
        // Also when this task panics (a bug): else the core kept its sessions attached to a
        // dead connection, deaf to their events and refusing the app's next attach.
        let closed = ClosedOnDrop { core: self.core.clone(), id: self.id };
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let drained = {
            let (core, id) = (self.core.clone(), self.id);
            move || {
                core.send(ConnEvent::Drained(id));
            }
        };
        let writer = tokio::spawn(write_loop(wr, version, out_rx, mailbox, in_flight.clone(), drained));
        let end = self.read_loop(&mut rd, in_flight).await;
        drop(rd);
        if let Err(e) = end {
            // Tell the peer why before closing; id 0 marks a connection-level error.
            info!(error = %e, "closing connection after a bad frame");
            let error = ErrorInfo::new(ErrorCode::InvalidRequest, format!("malformed request, closing: {e}"));
            out_tx.send(ServerMessage::Response { id: 0, result: Err(error) });
        }
        drop(out_tx);
        drop(closed);
        let _ = writer.await;
        debug!("connection closed");
    }

    async fn read_loop(&self, rd: &mut Socket, in_flight: Arc<Semaphore>) -> Result<(), ProtoError> {
        let mut buf = Vec::new();
        loop {
            // Back-pressure: a client that does not read its responses stops being read.
            // Meanwhile it may go away (its requests held, or its answers unwritable): then
            // the connection ends, and the sessions it held are free again.
            let permit = match in_flight.try_acquire() {
                Err(tokio::sync::TryAcquireError::NoPermits) => loop {
                    tokio::select! {
                        permit = in_flight.acquire() => break permit,
                        () = self.core.stopped() => return Ok(()),
                        () = tokio::time::sleep(GONE_CHECK) => if rd.peer_gone() {
                            debug!("the client went away while its requests waited");
                            return Ok(());
                        },
                    }
                },
                Err(tokio::sync::TryAcquireError::Closed) => return Ok(()),
                Ok(permit) => Ok(permit),
            };
            // Closed by the writer when it stops (the peer cannot be written to).
            let Ok(permit) = permit else { return Ok(()) };
            permit.forget();
            // Once the core has stopped nothing more is answered: the connection ends, and
            // its writer sends what the core queued (see `serve`).
            let frame = tokio::select! {
                frame = read_frame::<_, RequestFrame>(rd, &mut buf) => frame?,
                () = self.core.stopped() => return Ok(()),
            };
            let Some(frame) = frame else { return Ok(()) };
            crate::failpoint::hit("connection-request");
            let msg = ConnEvent::Request { conn: self.id, id: frame.id, request: frame.request };
            if !self.core.send(msg) {
                return Ok(());
            }
            if buf.capacity() > 64 << 10 {
                buf = Vec::new();
            }
        }
    }
}

enum HelloError {
    /// Closed before sending a byte.
    Closed,
    Version(u16),
    Bad(ProtoError),
}

/// Reads the client's preamble and hello: the protocol version to speak, and who it is.
async fn read_hello<R: AsyncRead + Unpin>(rd: &mut R) -> Result<(u16, ClientHello), HelloError> {
    let mut first = [0u8; 1];
    if rd.read(&mut first).await.map_err(|e| HelloError::Bad(ProtoError::Io(e)))? == 0 {
        return Err(HelloError::Closed);
    }
    let rd = &mut (&first[..]).chain(rd);
    let preamble = read_preamble(rd).await.map_err(HelloError::Bad)?;
    let version = preamble.negotiate().map_err(|_| HelloError::Version(preamble.version))?;
    let mut buf = Vec::new();
    let truncated = || HelloError::Bad(ProtoError::Truncated);
    let hello: ClientHello = if version == 1 {
        read_frame::<_, v1::ClientHello>(rd, &mut buf).await.map_err(HelloError::Bad)?.ok_or_else(truncated)?.into()
    } else {
        read_frame(rd, &mut buf).await.map_err(HelloError::Bad)?.ok_or_else(truncated)?
    };
    if hello.client_name.len() > 256 {
        return Err(HelloError::Bad(ProtoError::Decode("client name too long".into())));
    }
    if let Some(app_id) = &hello.app_id
        && (app_id.is_empty() || app_id.len() > 255 || app_id.chars().any(char::is_control))
    {
        return Err(HelloError::Bad(ProtoError::Decode("invalid app_id".into())));
    }
    Ok((version, hello))
}

async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, status: HandshakeStatus) {
    let _ = wr.write_all(&Preamble::ours(status).to_bytes()).await;
    let _ = wr.flush().await;
}

/// Refuses, then reads (and drops) what the peer already sent for a moment before
/// closing: closing with unread input would reset the connection and could discard the
/// refusal before the peer reads it.
async fn refuse_and_linger<R, W>(rd: &mut R, wr: &mut W, status: HandshakeStatus)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    refuse(wr, status).await;
    let mut sink = [0u8; 1024];
    let mut left: usize = 64 << 10;
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while left > 0 {
            match tokio::io::AsyncReadExt::read(rd, &mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Writes what the core sends, in the shapes of the connection's protocol `version`.
async fn write_loop<W: AsyncWrite + Unpin>(
    wr: W,
    version: u16,
    mut rx: OutboxReader,
    mailbox: Arc<Mailbox>,
    in_flight: Arc<Semaphore>,
    drained: impl Fn(),
) {
    // However the writer stops, the reader waiting for permits stops too.
    struct CloseOnExit(Arc<Semaphore>);
    impl Drop for CloseOnExit {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _close = CloseOnExit(in_flight.clone());
    let mut w = BufWriter::with_capacity(64 << 10, wr);
    let write = |(msg, now_drained): (ServerMessage, bool)| {
        if matches!(msg, ServerMessage::Response { .. }) {
            in_flight.add_permits(1);
        }
        if now_drained {
            drained();
        }
        msg
    };
    loop {
        let first = tokio::select! {
            biased;
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
            _ = mailbox.notify.notified() => {
                let mut ok = true;
                for m in mailbox.take_all() {
                    ok &= send(&mut w, version, m).await.is_ok();
                }
                if !ok || w.flush().await.is_err() {
                    return;
                }
                continue;
            }
        };
        if send(&mut w, version, write(first)).await.is_err() {
            return;
        }
        for _ in 0..WRITE_BATCH {
            let Some(m) = rx.try_recv() else { break };
            if send(&mut w, version, write(m)).await.is_err() {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.flush().await;
}

/// Encodes and writes one message (without flushing). A response too large for a frame
/// is answered with an error instead, so the request never goes unanswered; an event too
/// large is dropped (none can be: every field that could grow is bounded).
async fn send<W: AsyncWrite + Unpin>(w: &mut W, version: u16, msg: ServerMessage) -> std::io::Result<()> {
    let id = match &msg {
        ServerMessage::Response { id, .. } => Some(*id),
        ServerMessage::Event(_) => None,
    };
    let bytes = match frame::encode_server_frame(version, msg) {
        Ok(bytes) => bytes,
        Err(e) => {
            warn!(error = %e, "cannot send a message to a client");
            let Some(id) = id else { return Ok(()) };
            let error = ErrorInfo::new(ErrorCode::Internal, format!("the answer cannot be sent: {e}"));
            match frame::encode_server_frame(version, ServerMessage::Response { id, result: Err(error) }) {
                Ok(bytes) => bytes,
                Err(_) => return Ok(()),
            }
        }
    };
    w.write_all(&bytes).await
}
