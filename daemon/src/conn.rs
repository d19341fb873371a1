//! Where the socket server (`ipc`) and the core meet: what a connection is (its handle
//! and outbound mailbox), what the server tells the core (`ConnEvent`, through `ToCore`),
//! and how the core asks the server to pause (`PauseCheck`). Both sides use this module;
//! it uses neither, so neither imports the other.
//!
//! Responses and durable events go through a channel whose length is counted
//! ([`Outbox`]): responses are bounded by the requests in flight, and the core sends
//! durable events only while fewer than [`BACKLOG_WINDOW`] messages wait, so a client that
//! never reads costs a bounded window however many events its sessions hold or however
//! often it attaches. Progress and task updates are coalesced in a [`Mailbox`] keyed by
//! task, so such a client costs at most one entry per task there and never slows a
//! download.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, oneshot};

use dlsession_proto::{Event, Request, ServerMessage, TaskId, TaskInfo, WakeReason};

pub type ConnId = u64;

/// What the socket server tells the core about its connections.
#[derive(Debug)]
pub enum ConnEvent {
    /// A client finished its handshake.
    Open(ConnHandle),
    Closed(ConnId),
    /// The connection's outgoing queue drained after the core held events back.
    Drained(ConnId),
    Request {
        conn: ConnId,
        id: u64,
        request: Request,
    },
}

/// Where the socket server's events go (the core implements it).
pub trait ToCore: Clone + Send + Sync + 'static {
    /// False once nobody listens any more (the core has stopped).
    fn send(&self, event: ConnEvent) -> bool;

    /// Resolves once the core takes nothing more: every answer it will give is queued (the
    /// last ones, to what came as it stopped, refusals) or on its way.
    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send;
}

/// The core decides the daemon is idle and asks the server whether any connection is open.
/// If none is, the server stops accepting (answered inside its accept loop, so no
/// connection slips in between) and waits: `resume` firing means accept again, `resume`
/// dropped means stop for good. The pause lets the core first handle what connections that
/// just closed had sent.
#[derive(Debug)]
pub struct PauseCheck {
    pub reply: oneshot::Sender<bool>,
    pub resume: oneshot::Receiver<()>,
}

#[derive(Debug, Clone)]
pub struct ConnHandle {
    pub id: ConnId,
    pub client_name: String,
    pub app_id: Option<String>,
    pub pid: Option<u32>,
    /// The protocol version spoken with this client.
    pub protocol: u16,
    /// The mode files handed to this client get (from its umask).
    pub file_mode: u32,
    pub out: Outbox,
    pub mailbox: Arc<Mailbox>,
}

impl ConnHandle {
    pub fn send(&self, msg: ServerMessage) {
        self.out.send(msg);
    }

    pub fn event(&self, event: Event) {
        self.send(ServerMessage::Event(event));
    }
}

/// The core holds durable events back while this many messages wait to be written.
pub const BACKLOG_WINDOW: usize = 4096;
/// ... and sends more once no more than this many wait.
pub const BACKLOG_LOW: usize = 1024;

/// A connection's outgoing messages, counted while they wait for its writer.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<ServerMessage>,
    backlog: Arc<Backlog>,
}

/// The writer's side of an [`Outbox`].
#[derive(Debug)]
pub struct OutboxReader {
    rx: mpsc::UnboundedReceiver<ServerMessage>,
    backlog: Arc<Backlog>,
}

#[derive(Debug, Default)]
struct Backlog {
    queued: AtomicUsize,
    /// The core held events back and waits to hear that the queue drained.
    held: AtomicBool,
}

pub fn outbox() -> (Outbox, OutboxReader) {
    let (tx, rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::default());
    (Outbox { tx, backlog: backlog.clone() }, OutboxReader { rx, backlog })
}

impl Outbox {
    pub fn send(&self, msg: ServerMessage) {
        // Counted first: the writer may take it the moment it is in the channel.
        self.backlog.queued.fetch_add(1, SeqCst);
        if self.tx.send(msg).is_err() {
            self.backlog.queued.fetch_sub(1, SeqCst);
        }
    }

    /// How many more messages the core may queue before holding events back.
    pub fn room(&self) -> usize {
        BACKLOG_WINDOW.saturating_sub(self.backlog.queued.load(SeqCst))
    }

    /// The core holds events back: the writer sends [`ConnEvent::Drained`] once the queue
    /// is down to [`BACKLOG_LOW`]. True if it is already (the core goes on at once).
    pub fn hold(&self) -> bool {
        // With `took`, a Dekker pair: either the writer sees `held` after its decrement,
        // or this sees the decrement, so a drain is never missed. Only the writer clears
        // `held`: a session that goes on at once must not take the notice another session
        // of the connection waits for (a notice it did not need costs one idle delivery).
        self.backlog.held.store(true, SeqCst);
        self.backlog.queued.load(SeqCst) <= BACKLOG_LOW
    }
}

impl OutboxReader {
    /// The next message, and whether the core must now hear that the queue drained.
    pub async fn recv(&mut self) -> Option<(ServerMessage, bool)> {
        let msg = self.rx.recv().await?;
        Some((msg, self.took()))
    }

    pub fn try_recv(&mut self) -> Option<(ServerMessage, bool)> {
        let msg = self.rx.try_recv().ok()?;
        Some((msg, self.took()))
    }

    fn took(&self) -> bool {
        let left = self.backlog.queued.fetch_sub(1, SeqCst).saturating_sub(1);
        left <= BACKLOG_LOW && self.backlog.held.load(SeqCst) && self.backlog.held.swap(false, SeqCst)
    }
}

#[derive(Debug, Default)]
pub struct Mailbox {
    inner: Mutex<MailboxInner>,
    pub notify: Notify,
}

#[derive(Debug, Default)]
struct MailboxInner {
    progress: BTreeMap<TaskId, PendingProgress>,
    updates: BTreeMap<TaskId, TaskInfo>,
    /// Unsent wakes, one per session: a client that does not read (while another loops
    /// `wake`) is owed one per session, not one per request.
    wakes: BTreeMap<String, WakeReason>,
}

#[derive(Debug)]
struct PendingProgress {
    identifier: String,
    written: u64,
    total: u64,
    expected: Option<u64>,
    /// An upload's body going out (`SendProgress`), not a download's coming in.
    sending: bool,
}

/// Which way a task's bytes go, for its progress events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Receiving,
    Sending,
}

impl Mailbox {
    /// Adds `written` bytes of progress for `task`, merging with what is not yet sent.
    pub fn add_progress(
        &self,
        identifier: &str,
        task: TaskId,
        (written, total, expected): (u64, u64, Option<u64>),
        direction: Direction,
    ) {
        if let Ok(mut m) = self.inner.lock() {
            let p = m.progress.entry(task).or_insert_with(|| PendingProgress {
                identifier: identifier.to_owned(),
                written: 0,
                total,
                expected,
                sending: direction == Direction::Sending,
            });
            p.written += written;
            p.total = total;
            p.expected = expected;
        }
        self.notify.notify_one();
    }

    /// Replaces any unsent update of the same task.
    pub fn put_update(&self, info: TaskInfo) {
        if let Ok(mut m) = self.inner.lock() {
            m.updates.insert(info.id, info);
        }
        self.notify.notify_one();
    }

    /// Wakes the app for session `identifier`, replacing an unsent wake of it.
    pub fn put_wake(&self, identifier: &str, reason: WakeReason) {
        if let Ok(mut m) = self.inner.lock() {
            m.wakes.insert(identifier.to_owned(), reason);
        }
        self.notify.notify_one();
    }

    /// The unsent progress of one task (sent ahead of its final events).
    pub fn take_progress(&self, task: TaskId) -> Option<ServerMessage> {
        let p = self.inner.lock().ok()?.progress.remove(&task)?;
        Some(progress_message(task, p))
    }

    pub fn take_all(&self) -> Vec<ServerMessage> {
        let Ok(mut m) = self.inner.lock() else { return Vec::new() };
        let progress = std::mem::take(&mut m.progress);
        let updates = std::mem::take(&mut m.updates);
        let wakes = std::mem::take(&mut m.wakes);
        drop(m);
        let mut out: Vec<ServerMessage> = progress.into_iter().map(|(t, p)| progress_message(t, p)).collect();
        out.extend(updates.into_values().map(|i| ServerMessage::Event(Event::TaskUpdate(i))));
        out.extend(
            wakes.into_iter().map(|(identifier, reason)| ServerMessage::Event(Event::Wake { identifier, reason })),
        );
        out
    }

    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.inner.lock().map(|m| m.progress.len() + m.updates.len() + m.wakes.len()).unwrap_or(0)
    }
}

fn progress_message(task: TaskId, p: PendingProgress) -> ServerMessage {
    if p.sending {
        return ServerMessage::Event(Event::SendProgress {
            identifier: p.identifier,
            task,
            bytes_sent: p.written,
            total_bytes_sent: p.total,
            total_bytes_expected_to_send: p.expected.unwrap_or(p.total),
        });
    }
    ServerMessage::Event(Event::Progress {
        identifier: p.identifier,
        task,
        bytes_written: p.written,
        total_bytes_written: p.total,
        total_bytes_expected: p.expected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_coalesces_per_task() {
        let m = Mailbox::default();
        for i in 1..=1000u64 {
            m.add_progress("s", i % 3, (10, i * 10, Some(100_000)), Direction::Receiving);
        }
        assert_eq!(m.pending(), 3, "one entry per task, however many updates");
        let all = m.take_all();
        let written: u64 = all
            .iter()
            .map(|msg| match msg {
                ServerMessage::Event(Event::Progress { bytes_written, .. }) => *bytes_written,
                _ => 0,
            })
            .sum();
        assert_eq!(written, 10_000, "no bytes lost in coalescing");
        assert_eq!(m.pending(), 0);
    }

    /// Wakes a client has not read yet are one per session, the latest reason kept.
    #[test]
    fn wakes_coalesce_per_session() {
        let m = Mailbox::default();
        for _ in 0..10_000 {
            m.put_wake("a", WakeReason::Requested);
        }
        m.put_wake("b", WakeReason::Requested);
        m.put_wake("a", WakeReason::FinishedEvents);
        assert_eq!(m.pending(), 2);
        let wakes: Vec<(String, WakeReason)> = m
            .take_all()
            .into_iter()
            .filter_map(|msg| match msg {
                ServerMessage::Event(Event::Wake { identifier, reason }) => Some((identifier, reason)),
                _ => None,
            })
            .collect();
        assert_eq!(wakes, [("a".into(), WakeReason::FinishedEvents), ("b".into(), WakeReason::Requested)]);
    }

    fn event() -> ServerMessage {
        ServerMessage::Event(Event::FinishedEvents { identifier: "s".into() })
    }

    #[tokio::test]
    async fn a_held_outbox_says_once_when_it_drained() {
        let (out, mut reader) = outbox();
        for _ in 0..BACKLOG_WINDOW {
            out.send(event());
        }
        assert_eq!(out.room(), 0);
        assert!(!out.hold(), "a full queue holds");
        let mut told = 0;
        for taken in 1..=BACKLOG_WINDOW {
            let (_, drained) = reader.recv().await.expect("queued");
            if drained {
                told += 1;
                assert_eq!(BACKLOG_WINDOW - taken, BACKLOG_LOW, "told as soon as it is down to the low mark");
            }
        }
        assert_eq!(told, 1, "told once per hold");
        assert_eq!(out.room(), BACKLOG_WINDOW);
    }

    #[test]
    fn a_hold_on_a_drained_outbox_goes_on_at_once_and_is_still_told() {
        let (out, mut reader) = outbox();
        out.send(event());
        assert!(out.hold(), "nothing much waits: go on");
        // Another session of the connection may have held before: the notice still comes.
        assert!(reader.try_recv().expect("queued").1, "told");
        out.send(event());
        assert!(!reader.try_recv().expect("queued").1, "once");
    }
}
