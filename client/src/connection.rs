//! One connection to the daemon: handshake, request/response matching, event routing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use interprocess::local_socket::tokio::{Stream, prelude::*};
use interprocess::local_socket::{GenericFilePath, ToFsName};
use tokio::io::{AsyncRead, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::error::{Error, Result};
use dlsession_proto::handshake::{HandshakeStatus, Preamble};
use dlsession_proto::io::{read_frame, read_preamble};
use dlsession_proto::{
    ClientHello, ErrorCode, ErrorInfo, Event, PROTOCOL_VERSION, Request, RequestFrame, Response, ServerMessage,
    Welcome, frame,
};

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The daemon's socket; `None` uses `DLSESSION_SOCKET`, `DLSESSIOND_SOCKET`, then the XDG default.
    pub socket: Option<PathBuf>,
    /// Shown in the daemon's logs and status.
    pub client_name: String,
    /// Announce this app: the daemon sends it `wake` for sessions registered with it.
    pub app_id: Option<String>,
    /// Deadline for connecting and the handshake.
    pub timeout: Duration,
    /// Start `dlsessiond` if nothing listens on the socket (unless `DLSESSION_NO_AUTOSTART=1`).
    pub autostart: bool,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            socket: None,
            client_name: std::env::args()
                .next()
                .and_then(|a| Path::new(&a).file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "dlsession".into()),
            app_id: None,
            timeout: Duration::from_secs(10),
            autostart: true,
        }
    }
}

type Pending = HashMap<u64, oneshot::Sender<std::result::Result<Response, ErrorInfo>>>;

#[derive(Debug)]
struct Inner {
    out: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<Option<Pending>>,
    next_id: AtomicU64,
    /// Events of attached sessions, by identifier, with the token of the session that
    /// owns the route (a later attachment of the same identifier gets a new one).
    routes: Mutex<HashMap<String, (u64, mpsc::UnboundedSender<Event>)>>,
    next_route: AtomicU64,
    /// Everything else (watch updates, progress of watched tasks, wakes).
    other: Mutex<Option<mpsc::UnboundedSender<Event>>>,
    closed_reason: Mutex<Option<String>>,
    welcome: Welcome,
    socket: PathBuf,
}

/// A connection to `dlsessiond`. Cheap to clone; closes when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
    _guard: Arc<DropGuard>,
}

#[derive(Debug)]
struct DropGuard {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Client {
    /// Connects and performs the handshake.
    pub async fn connect(options: ClientOptions) -> Result<Client> {
        let socket = match options.socket.clone() {
            Some(s) => s,
            None => dlsession_proto::paths::client_socket()?,
        };
        let timeout = options.timeout;
        let attempt = |options: ClientOptions| {
            let socket = socket.clone();
            async move {
                tokio::time::timeout(timeout, Self::connect_inner(socket.clone(), options)).await.map_err(|_| {
                    Error::NotRunning {
                        path: socket,
                        source: std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
                    }
                })?
            }
        };
        match attempt(options.clone()).await {
            // Nothing listens (no socket, or a stale one): start the daemon and try again.
            Err(Error::NotRunning { source, .. })
                if options.autostart
                    && crate::autostart::enabled()
                    && matches!(
                        source.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                crate::autostart::start(&socket, timeout).await?;
                attempt(options).await
            }
            other => other,
        }
    }

    async fn connect_inner(socket: PathBuf, options: ClientOptions) -> Result<Client> {
        let name = socket
            .as_path()
            .to_fs_name::<GenericFilePath>()
            .map_err(|source| Error::NotRunning { path: socket.clone(), source })?;
        let stream =
            Stream::connect(name).await.map_err(|source| Error::NotRunning { path: socket.clone(), source })?;
        let (mut rd, wr) = tokio::io::split(stream);
        let mut wr = BufWriter::new(wr);
        let hello = ClientHello {
            client_name: options.client_name,
            client_version: env!("CARGO_PKG_VERSION").into(),
            app_id: options.app_id,
            umask: process_umask(),
        };
        let mut opening = Preamble::ours(HandshakeStatus::Ok).to_bytes().to_vec();
        opening.extend_from_slice(&frame::encode_frame(&hello)?);
        let sent = async {
            wr.write_all(&opening).await?;
            wr.flush().await
        }
        .await;
        // Read the answer even if sending failed: a daemon that refuses us answers and
        // closes without reading, so our write may break while its refusal is waiting.
        let theirs = match (read_preamble(&mut rd).await, sent) {
            (Ok(p), _) => p,
            (Err(_), Err(source)) => return Err(Error::NotRunning { path: socket.clone(), source }),
            (Err(e), Ok(())) => return Err(e.into()),
        };
        match theirs.status {
            HandshakeStatus::Ok => theirs
                .check_version()
                .map_err(|_| Error::VersionMismatch { ours: PROTOCOL_VERSION, theirs: theirs.version })?,
            HandshakeStatus::VersionMismatch => {
                return Err(Error::VersionMismatch { ours: PROTOCOL_VERSION, theirs: theirs.version });
            }
            HandshakeStatus::PermissionDenied => {
                return Err(Error::Refused {
                    code: ErrorCode::PermissionDenied,
                    reason: "this user may not use that daemon (its uid differs)".into(),
                });
            }
            HandshakeStatus::TooManyConnections => {
                return Err(Error::Refused {
                    code: ErrorCode::Internal,
                    reason: "too many connections; try again later".into(),
                });
            }
            HandshakeStatus::BadHello | HandshakeStatus::Unknown(_) => {
                return Err(Error::Refused { code: ErrorCode::Internal, reason: "handshake rejected".into() });
            }
        }
        let mut buf = Vec::new();
        let welcome: Welcome = read_frame(&mut rd, &mut buf).await?.ok_or(Error::Disconnected { reason: None })?;

        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let inner = Arc::new(Inner {
            out: out_tx,
            pending: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(1),
            routes: Mutex::new(HashMap::new()),
            next_route: AtomicU64::new(1),
            other: Mutex::new(None),
            closed_reason: Mutex::new(None),
            welcome,
            socket,
        });
        let writer = tokio::spawn(async move {
            while let Some(bytes) = out_rx.recv().await {
                if wr.write_all(&bytes).await.is_err() {
                    break;
                }
                while let Ok(more) = out_rx.try_recv() {
                    if wr.write_all(&more).await.is_err() {
                        return;
                    }
                }
                if wr.flush().await.is_err() {
                    break;
                }
            }
        });
        let reader_inner = Arc::downgrade(&inner);
        let reader = tokio::spawn(async move {
            let reason = read_loop(&mut rd, &reader_inner).await;
            if let Some(inner) = reader_inner.upgrade() {
                inner.close(reason);
            }
        });
        Ok(Client { inner, _guard: Arc::new(DropGuard { tasks: vec![writer, reader] }) })
    }

    /// Sends a request and waits for its response.
    pub async fn request(&self, request: Request) -> Result<Response> {
        let rx = self.send_request(request)?;
        match rx.await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(Error::Daemon(e)),
            Err(_) => Err(self.disconnected()),
        }
    }

    /// Sends a request without waiting for the answer (used for acknowledgements).
    pub fn send_request(
        &self,
        request: Request,
    ) -> Result<oneshot::Receiver<std::result::Result<Response, ErrorInfo>>> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = frame::encode_frame(&RequestFrame { id, request })?;
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.inner.pending.lock().map_err(|_| self.disconnected())?;
            let Some(pending) = pending.as_mut() else { return Err(self.disconnected()) };
            pending.insert(id, tx);
        }
        self.inner.out.send(bytes).map_err(|_| self.disconnected())?;
        Ok(rx)
    }

    fn disconnected(&self) -> Error {
        Error::Disconnected { reason: self.inner.closed_reason.lock().ok().and_then(|r| r.clone()) }
    }

    /// Events not routed to an attached [`crate::Session`]: task updates and progress for
    /// `Watch`, and `Wake`. Only one receiver exists at a time; a new call replaces it.
    pub fn events(&self) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut other) = self.inner.other.lock() {
            *other = Some(tx);
        }
        rx
    }

    /// Routes the identifier's events to a new channel; the token proves ownership.
    pub(crate) fn route(&self, identifier: &str) -> (u64, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let token = self.inner.next_route.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut routes) = self.inner.routes.lock() {
            routes.insert(identifier.to_owned(), (token, tx));
        }
        (token, rx)
    }

    pub(crate) fn is_routed(&self, identifier: &str) -> bool {
        self.inner.routes.lock().map(|r| r.contains_key(identifier)).unwrap_or(false)
    }

    /// Removes the route if `token` still owns it; says whether it did.
    pub(crate) fn unroute(&self, identifier: &str, token: u64) -> bool {
        let Ok(mut routes) = self.inner.routes.lock() else { return false };
        if routes.get(identifier).is_some_and(|(owner, _)| *owner == token) {
            routes.remove(identifier);
            return true;
        }
        false
    }

    /// What the daemon said about itself in the handshake.
    pub fn welcome(&self) -> &Welcome {
        &self.inner.welcome
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.inner.socket
    }

    /// True once the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.inner.pending.lock().map(|p| p.is_none()).unwrap_or(true)
    }
}

impl Inner {
    fn close(&self, reason: Option<String>) {
        if let Ok(mut r) = self.closed_reason.lock() {
            *r = reason;
        }
        // Dropping the senders fails every waiting request with `Disconnected`.
        if let Ok(mut p) = self.pending.lock() {
            *p = None;
        }
        if let Ok(mut routes) = self.routes.lock() {
            routes.clear();
        }
        if let Ok(mut other) = self.other.lock() {
            *other = None;
        }
    }

    fn dispatch(&self, msg: ServerMessage) -> Option<String> {
        match msg {
            ServerMessage::Response { id: 0, result: Err(e) } => return Some(e.message),
            ServerMessage::Response { id, result } => {
                let waiter = self.pending.lock().ok().and_then(|mut p| p.as_mut().and_then(|p| p.remove(&id)));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(result);
                    }
                    None => debug!(id, "response to an unknown request"),
                }
            }
            ServerMessage::Event(event) => {
                let identifier = match &event {
                    Event::Durable { identifier, .. }
                    | Event::FinishedEvents { identifier }
                    | Event::Detached { identifier, .. } => Some(identifier.as_str()),
                    Event::Progress { identifier, .. } => Some(identifier.as_str()),
                    Event::Wake { .. } | Event::TaskUpdate(_) => None,
                };
                let routed = identifier.and_then(|id| {
                    let routes = self.routes.lock().ok()?;
                    routes.get(id).map(|(_, tx)| tx.clone())
                });
                match routed {
                    Some(tx) => {
                        let _ = tx.send(event);
                    }
                    None => {
                        if let Some(tx) = self.other.lock().ok().and_then(|o| o.clone()) {
                            let _ = tx.send(event);
                        }
                    }
                }
            }
        }
        None
    }
}

/// This process's file-creation mask, read without changing it (`umask(2)` can only set
/// it, which would race with other threads creating files): the daemon gives the files
/// it hands over the mode this process would give files it creates.
fn process_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(line.trim(), 8).ok().filter(|m| *m <= 0o777)
}

async fn read_loop<R: AsyncRead + Unpin>(rd: &mut R, inner: &std::sync::Weak<Inner>) -> Option<String> {
    let mut buf = Vec::new();
    loop {
        let msg = match read_frame::<_, ServerMessage>(rd, &mut buf).await {
            Ok(Some(msg)) => msg,
            Ok(None) => return None,
            Err(e) => return Some(e.to_string()),
        };
        let inner = inner.upgrade()?;
        if let Some(reason) = inner.dispatch(msg) {
            return Some(reason);
        }
    }
}
