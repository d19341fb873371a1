//! One connection to the daemon: the handshake, a writer task, a reader task, and the
//! requests waiting for their answers. [`crate::Client`] owns the current link and makes a
//! new one when it breaks.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use interprocess::local_socket::tokio::{Stream, prelude::*};
use interprocess::local_socket::{GenericFilePath, ToFsName};
use tokio::io::{AsyncRead, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use dlsession_proto::handshake::{HandshakeStatus, Preamble};
use dlsession_proto::io::{read_frame, read_preamble};
use dlsession_proto::{
    ClientHello, ErrorCode, ErrorInfo, PROTOCOL_VERSION, Request, RequestFrame, Response, ServerMessage, Welcome, frame,
};

/// After a failed write, how long the link reads on before it closes.
const WRITE_BROKE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The answer to one request.
pub type Answer = std::result::Result<Response, ErrorInfo>;

/// Run on an answer in its place among the messages (see [`Incoming::Answer`]).
pub struct InOrder(pub Box<dyn FnOnce(&Answer) + Send>);

impl std::fmt::Debug for InOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InOrder")
    }
}

/// Who waits for an answer, and what runs on it in order, if anything.
type Pending = HashMap<u64, (oneshot::Sender<Answer>, Option<InOrder>)>;

/// A live connection. Dropping it closes the socket.
#[derive(Debug)]
pub struct Link {
    out: mpsc::UnboundedSender<Vec<u8>>,
    /// `None` once the connection closed: every waiting request has failed.
    pending: Mutex<Option<Pending>>,
    closed_reason: Mutex<Option<String>>,
    pub welcome: Welcome,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Link {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What the reader hands to the client: every message that is not an answer, the answers
/// to be handled in order with them, and once, when the connection ends, why.
#[derive(Debug)]
pub enum Incoming {
    Message(ServerMessage),
    /// An answer whose request asked for it in its place among the messages: its hook runs
    /// after every message read before it was routed and before any read after it, then
    /// the waiter gets it.
    Answer(oneshot::Sender<Answer>, InOrder, Answer),
    Closed(Option<String>),
}

/// The daemon must run as this user: another user's process listening there (on a socket
/// planted in a `/tmp` directory made before ours, when `XDG_RUNTIME_DIR` is unset) would
/// be handed every request, credentials included, and could invent events. Checked before
/// a byte is sent.
fn run_by_us(stream: &Stream, socket: &Path) -> Result<()> {
    let ours = dlsession_proto::paths::effective_uid();
    let refused = |reason: String| Error::Refused { code: ErrorCode::PermissionDenied, reason };
    match stream.peer_creds() {
        Ok(creds) if creds.euid() == Some(ours) => Ok(()),
        Ok(creds) => Err(refused(format!(
            "the process listening on {} runs as uid {}, not as this user (uid {ours}); not talking to it",
            socket.display(),
            creds.euid().map_or_else(|| "unknown".to_owned(), |uid| uid.to_string()),
        ))),
        Err(e) => Err(refused(format!("cannot tell who listens on {}: {e}; not talking to it", socket.display()))),
    }
}

impl Link {
    /// Connects and performs the handshake. Messages other than answers go to `incoming`.
    pub async fn open(
        socket: &Path,
        hello: ClientHello,
        incoming: mpsc::UnboundedSender<(u64, Incoming)>,
        generation: u64,
    ) -> Result<std::sync::Arc<Link>> {
        let name = socket
            .to_fs_name::<GenericFilePath>()
            .map_err(|source| Error::NotRunning { path: socket.to_path_buf(), source })?;
        let stream =
            Stream::connect(name).await.map_err(|source| Error::NotRunning { path: socket.to_path_buf(), source })?;
        run_by_us(&stream, socket)?;
        let (mut rd, wr) = tokio::io::split(stream);
        let mut wr = BufWriter::new(wr);
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
            (Err(_), Err(source)) => return Err(Error::NotRunning { path: socket.to_path_buf(), source }),
            (Err(e), Ok(())) => return Err(e.into()),
        };
        check_status(theirs)?;
        let mut buf = Vec::new();
        let welcome: Welcome = read_frame(&mut rd, &mut buf).await?.ok_or(Error::Disconnected { reason: None })?;

        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (write_failed, failed) = oneshot::channel::<std::io::Error>();
        let writer = tokio::spawn(async move {
            let written: std::io::Result<()> = async {
                while let Some(bytes) = out_rx.recv().await {
                    wr.write_all(&bytes).await?;
                    while let Ok(more) = out_rx.try_recv() {
                        wr.write_all(&more).await?;
                    }
                    wr.flush().await?;
                }
                Ok(())
            }
            .await;
            if let Err(e) = written {
                let _ = write_failed.send(e);
            }
        });
        // A daemon that stops reading but keeps its end open (half closed) would leave every
        // request waiting its whole timeout and no reconnect: a failed write ends the link,
        // after a moment to read what the daemon sent before it (its answer, or why).
        let write_broke = async {
            let e = failed.await.ok()?;
            tokio::time::sleep(WRITE_BROKE_GRACE).await;
            Some(format!("cannot write to dlsessiond: {e}"))
        };
        let link = std::sync::Arc::new_cyclic(|weak: &std::sync::Weak<Link>| {
            let weak = weak.clone();
            let reader = tokio::spawn(async move {
                let reason = tokio::select! {
                    reason = read_loop(&mut rd, &weak, &incoming, generation) => reason,
                    Some(reason) = write_broke => Some(reason),
                };
                if let Some(link) = weak.upgrade() {
                    link.close(reason.clone());
                }
                let _ = incoming.send((generation, Incoming::Closed(reason)));
            });
            Link {
                out: out_tx,
                pending: Mutex::new(Some(HashMap::new())),
                closed_reason: Mutex::new(None),
                welcome,
                tasks: vec![writer, reader],
            }
        });
        Ok(link)
    }

    /// Sends a request; the receiver gets its answer (or an error when the link breaks).
    /// With `in_order`, the answer goes through the messages' way and the hook runs on it
    /// there (see [`Incoming::Answer`]).
    pub fn send(&self, id: u64, request: Request, in_order: Option<InOrder>) -> Result<oneshot::Receiver<Answer>> {
        let bytes = frame::encode_frame(&RequestFrame { id, request })?;
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().map_err(|_| self.disconnected())?;
            let Some(pending) = pending.as_mut() else { return Err(self.disconnected()) };
            pending.insert(id, (tx, in_order));
        }
        if self.out.send(bytes).is_err() {
            // The writer ended on a failed write; the link closes a moment later.
            if let Ok(mut pending) = self.pending.lock()
                && let Some(pending) = pending.as_mut()
            {
                pending.remove(&id);
            }
            let reason = self.closed_reason.lock().ok().and_then(|r| r.clone());
            return Err(Error::Disconnected { reason: reason.or_else(|| Some("cannot write to dlsessiond".into())) });
        }
        Ok(rx)
    }

    pub fn is_closed(&self) -> bool {
        self.pending.lock().map(|p| p.is_none()).unwrap_or(true)
    }

    pub fn disconnected(&self) -> Error {
        Error::Disconnected { reason: self.closed_reason.lock().ok().and_then(|r| r.clone()) }
    }

    fn close(&self, reason: Option<String>) {
        if let Ok(mut r) = self.closed_reason.lock() {
            *r = reason;
        }
        // Dropping the senders fails every waiting request with `Disconnected`.
        if let Ok(mut p) = self.pending.lock() {
            *p = None;
        }
    }

    /// Hands an answer to its request, or to the messages' way if it asked to be handled
    /// in order; false if that way is closed.
    fn answer(
        &self,
        id: u64,
        result: Answer,
        incoming: &mpsc::UnboundedSender<(u64, Incoming)>,
        generation: u64,
    ) -> bool {
        let waiter = self.pending.lock().ok().and_then(|mut p| p.as_mut().and_then(|p| p.remove(&id)));
        match waiter {
            Some((tx, None)) => {
                let _ = tx.send(result);
            }
            Some((tx, Some(hook))) => return incoming.send((generation, Incoming::Answer(tx, hook, result))).is_ok(),
            None => tracing::debug!(id, "response to an unknown request"),
        }
        true
    }
}

fn check_status(theirs: Preamble) -> Result<()> {
    match theirs.status {
        HandshakeStatus::Ok => theirs
            .check_version()
            .map_err(|_| Error::VersionMismatch { ours: PROTOCOL_VERSION, theirs: theirs.version }),
        HandshakeStatus::VersionMismatch => {
            Err(Error::VersionMismatch { ours: PROTOCOL_VERSION, theirs: theirs.version })
        }
        HandshakeStatus::PermissionDenied => Err(Error::Refused {
            code: ErrorCode::PermissionDenied,
            reason: "this user may not use that daemon (its uid differs)".into(),
        }),
        HandshakeStatus::TooManyConnections => {
            Err(Error::Refused { code: ErrorCode::Internal, reason: "too many connections; try again later".into() })
        }
        HandshakeStatus::BadHello | HandshakeStatus::Unknown(_) => {
            Err(Error::Refused { code: ErrorCode::Internal, reason: "handshake rejected".into() })
        }
    }
}

/// Reads until the connection ends; returns why it ended (`None`: closed cleanly).
async fn read_loop<R: AsyncRead + Unpin>(
    rd: &mut R,
    link: &std::sync::Weak<Link>,
    incoming: &mpsc::UnboundedSender<(u64, Incoming)>,
    generation: u64,
) -> Option<String> {
    let mut buf = Vec::new();
    loop {
        let msg = match read_frame::<_, ServerMessage>(rd, &mut buf).await {
            Ok(Some(msg)) => msg,
            Ok(None) => return None,
            Err(e) => return Some(e.to_string()),
        };
        match msg {
            // A connection-level error from the daemon: it closes next.
            ServerMessage::Response { id: 0, result: Err(e) } => return Some(e.message),
            ServerMessage::Response { id, result } => {
                if !link.upgrade()?.answer(id, result, incoming, generation) {
                    return None;
                }
            }
            other => {
                if incoming.send((generation, Incoming::Message(other))).is_err() {
                    return None;
                }
            }
        }
    }
}
