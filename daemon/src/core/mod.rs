//! The core: the single owner of all session, task and connection state.
//!
//! Everything else talks to it through [`CoreMsg`] on one channel, and it never awaits
//! inside a handler: store writes are queued (FIFO) and report back with
//! `CoreMsg::Committed`, workers report with `CoreMsg::Worker`. A state change is applied
//! in memory at once; anything observable outside the daemon that depends on it (a
//! response, a durable event) is released only after its commit.

mod backoff;
mod convert;
mod delivery;
mod recovery;
mod requests;
mod retention;
mod sched;
mod tasks;
mod timers;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::conn::{ConnEvent, ConnHandle, ConnId, PauseCheck};
pub use sched::LaneKey;

use crate::config::Config;
use crate::engine::limiter::RateLimiter;
use crate::engine::{Engine, FinishPlan, Progress, WorkerEvent};
use crate::model::{EventRecord, SessionKey, SessionRecord, TaskRecord, now_ms};
use crate::store::{Op, Snapshot, Store};
use dlsession_proto::{
    ErrorCode, ErrorInfo, Request, Response, ServerMessage, TaskCounts, TaskId, TaskState, UnixMillis, WakeStatus,
};
use sched::Lanes;
use timers::{Mono, Timer, Timers};

pub type CoreTx = mpsc::UnboundedSender<CoreMsg>;

/// The socket server's events, as messages on the core's channel.
impl crate::conn::ToCore for CoreTx {
    fn send(&self, event: ConnEvent) -> bool {
        mpsc::UnboundedSender::send(self, CoreMsg::Conn(event)).is_ok()
    }
}

/// The engine's reports, as messages on the core's channel.
#[derive(Debug)]
struct ToCore(CoreTx);

impl crate::engine::Sink for ToCore {
    fn report(&self, task: TaskId, generation: u64, event: WorkerEvent) {
        let _ = self.0.send(CoreMsg::Worker { task, generation, event });
    }
}

/// Everything the core reacts to.
#[derive(Debug)]
pub enum CoreMsg {
    /// From the socket server.
    Conn(ConnEvent),
    /// A task-creating request's destinations were checked on disk (off this thread).
    DestinationsChecked {
        conn: ConnId,
        id: u64,
        request: Box<Request>,
        result: Result<(), ErrorInfo>,
    },
    Worker {
        task: TaskId,
        generation: u64,
        event: WorkerEvent,
    },
    Committed {
        result: Result<(), String>,
        after: Vec<After>,
    },
    LaunchFinished {
        session: SessionKey,
        result: Result<(), String>,
    },
    /// The database stopped (or started again) taking writes.
    Storage(crate::store::Health),
    Shutdown,
}

/// What to do once a batch is durable.
#[derive(Debug)]
pub enum After {
    Reply {
        conn: ConnId,
        id: u64,
        response: Response,
    },
    /// Durable events up to `seq` are committed: deliver them.
    Events {
        session: SessionKey,
        seq: u64,
    },
    /// Finish an attach: reply, then replay every undelivered event.
    Replay {
        conn: ConnId,
        id: u64,
        session: SessionKey,
    },
    Plan {
        reply: oneshot::Sender<FinishPlan>,
        plan: FinishPlan,
    },
    RemoveFiles(Vec<PathBuf>),
    RemoveDir(PathBuf),
    /// Tell a waiting worker that its commit is durable.
    Signal(oneshot::Sender<()>),
    /// The attempt's `resumed_at_offset` is out: its progress may follow.
    ReleaseProgress {
        task: TaskId,
        generation: u64,
    },
}

/// What a running task should do once its worker has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    Suspend,
    Requeue,
    Cancel,
    CancelProducingResumeData,
    Shutdown,
}

#[derive(Debug)]
struct Run {
    generation: u64,
    stop: watch::Sender<bool>,
    after_stop: Option<AfterStop>,
    lane: LaneKey,
    /// Counted against the global and per-host limits: true until the whole body has
    /// arrived (the final sync and the move no longer use the network).
    holds_slot: bool,
    /// Bytes in the file when the attempt began (to tell progress from a stall).
    start_received: u64,
    /// Progress waits while this attempt's `resumed_at_offset` is being committed, so a
    /// client hears where the transfer restarted before it hears of new bytes.
    progress_held: bool,
    /// Progress that arrived meanwhile.
    held_bytes: u64,
    /// When the worker last showed life (a report, or bytes arriving): one silent for
    /// longer than the stall limit is abandoned (see `supervise`).
    last_sign: Instant,
    /// `Progress::signs` at `last_sign`.
    signs_seen: u64,
    /// The worker was told to stop because it went silent; when that happened.
    abandoned_at: Option<Instant>,
    _worker: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Task {
    rec: TaskRecord,
    /// The live state (including `Running`, which is never stored).
    state: TaskState,
    host: String,
    progress: Arc<Progress>,
    run: Option<Run>,
    /// The deadline this task has in `Core::timers`, if any.
    timer: Option<Mono>,
    /// Consecutive failed attempts without progress (the backoff exponent).
    failures: u32,
    /// Consecutive failed moves of the finished file to its destination.
    move_failures: u32,
    /// The record changed (response metadata of a fresh transfer) without a commit of its
    /// own: the next checkpoint writes the whole record instead of just the offset.
    unsaved: bool,
    speed: u64,
    sampled: u64,
    /// Requests answered once the worker has stopped.
    waiting_replies: Vec<(ConnId, u64)>,
}

impl Task {
    fn lane(&self) -> LaneKey {
        (self.rec.session, self.host.clone())
    }
}

#[derive(Debug)]
struct Session {
    rec: SessionRecord,
    attached: Option<ConnId>,
    /// Replaying undelivered events to a new attachment: live delivery waits.
    replaying: bool,
    /// Highest seq sent to the attached connection.
    delivered: u64,
    /// Highest seq known committed.
    committed: u64,
    /// Unacknowledged durable events.
    events: BTreeMap<u64, EventRecord>,
    /// How many of them each task has (so "has this task events pending?" costs nothing).
    pending_by_task: HashMap<TaskId, u32>,
    tasks: BTreeSet<TaskId>,
    counts: TaskCounts,
    running: u32,
    wake: WakeStatus,
    /// When the next wake is due (`wake.next_wake` is the same on the wall clock).
    wake_timer: Option<Mono>,
    /// A `wake` went to a running app: when it counts as unanswered (then: relaunch).
    wake_unanswered: Option<Mono>,
    limiter: Option<Arc<RateLimiter>>,
}

#[derive(Debug)]
struct Conn {
    handle: ConnHandle,
    attached: HashSet<SessionKey>,
    watch: Option<Watch>,
    /// Asked for `Wake`s with a handler that rejoins (`Request::HandleWakes`).
    handles_wakes: bool,
}

/// What a connection watches (`Request::Watch`), indexed.
#[derive(Debug)]
struct Watch {
    session: Option<SessionKey>,
    /// Empty: every task (of the session).
    tasks: HashSet<TaskId>,
}

/// The core actor. Build with [`Core::new`], drive with [`Core::run`].
#[derive(Debug)]
pub struct Core {
    cfg: Arc<Config>,
    store: Store,
    engine: Arc<Engine>,
    tx: CoreTx,
    /// Where workers report (`tx`, seen by the engine).
    sink: Arc<dyn crate::engine::Sink>,
    rx: mpsc::UnboundedReceiver<CoreMsg>,
    sessions: HashMap<SessionKey, Session>,
    /// Ordered: sessions are listed (and paged) by identifier.
    by_identifier: BTreeMap<String, SessionKey>,
    next_session_key: SessionKey,
    /// A new session's first event sequence number (see `store::Op::SetSeqFloor`).
    seq_floor: u64,
    /// Boxed: filled in id order, a map's nodes stay half full, and tasks are large.
    tasks: BTreeMap<TaskId, Box<Task>>,
    next_task_id: TaskId,
    next_generation: u64,
    conns: HashMap<ConnId, Conn>,
    lanes: Lanes,
    /// Every task with a worker: downloading, or syncing and moving its file.
    running: HashSet<TaskId>,
    /// How many of them still hold a download slot (`Run::holds_slot`).
    downloading: usize,
    timers: Timers,
    counts: TaskCounts,
    started_at: UnixMillis,
    last_tick: Instant,
    bytes_downloaded: u64,
    download_rate: u64,
    rng: u64,
    shutting_down: bool,
    /// Set while the database refuses writes: changes are refused, downloads held.
    storage: Option<ErrorInfo>,
    /// Systemd status reporting: enabled when `NOTIFY_SOCKET` is set.
    status: Option<StatusReport>,
    idle_exit: Option<IdleExit>,
    /// Store batches whose `Committed` has not come back yet (their follow-up actions,
    /// such as deleting acknowledged files, are still to run).
    commits_in_flight: usize,
    /// Relaunched apps (or `systemctl --user start`) not yet exited: under systemd they
    /// live in the daemon's cgroup, so the daemon must not leave before them.
    launches_running: usize,
    /// When retired history was last pruned (see `retention`).
    last_prune: Option<Instant>,
    /// When the housekeeping timer fires (see `retention`).
    housekeeping: Option<Mono>,
    /// The modification time of the oldest kept partial file of resume data.
    oldest_resume_file: Option<UnixMillis>,
    /// How relaunched apps are started (in a scope of their own under systemd).
    launch_scope: crate::launcher::Scope,
}

#[derive(Debug, Default)]
struct StatusReport {
    last: String,
    sent_at: Option<Instant>,
    pending: bool,
}

/// At most one `STATUS=` line per second.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Exiting when idle (under socket activation, where the next connection starts the
/// daemon again): after how long, and how to ask the socket server to pause accepting.
#[derive(Debug)]
pub struct IdleExit {
    pub after: Duration,
    pub ask: mpsc::Sender<PauseCheck>,
}

impl Core {
    /// Builds the core from the store's snapshot, recovering interrupted finishes and
    /// cleaning stray files (see `recovery`).
    pub fn new(
        cfg: Arc<Config>,
        store: Store,
        snapshot: Snapshot,
        engine: Arc<Engine>,
        tx: CoreTx,
        rx: mpsc::UnboundedReceiver<CoreMsg>,
    ) -> Core {
        let mut core = Core {
            cfg,
            store,
            engine,
            sink: Arc::new(ToCore(tx.clone())),
            tx,
            rx,
            sessions: HashMap::new(),
            by_identifier: BTreeMap::new(),
            next_session_key: 1,
            seq_floor: snapshot.seq_floor,
            tasks: BTreeMap::new(),
            next_task_id: snapshot.next_task_id,
            next_generation: 1,
            conns: HashMap::new(),
            lanes: Lanes::default(),
            running: HashSet::new(),
            downloading: 0,
            timers: Timers::new(),
            counts: TaskCounts::default(),
            started_at: now_ms(),
            last_tick: Instant::now(),
            bytes_downloaded: 0,
            download_rate: 0,
            rng: seed(),
            shutting_down: false,
            storage: None,
            status: std::env::var_os("NOTIFY_SOCKET").map(|_| StatusReport::default()),
            idle_exit: None,
            commits_in_flight: 0,
            launches_running: 0,
            last_prune: None,
            housekeeping: None,
            oldest_resume_file: None,
            launch_scope: crate::launcher::Scope::detect(),
        };
        core.restore(snapshot);
        let mut ops = Vec::new();
        core.prune_history(&mut ops);
        core.commit(ops, Vec::new());
        core.on_housekeeping();
        core
    }

    /// Exit once nothing has happened for `idle.after` (see [`Core::has_nothing_to_do`]).
    pub fn exit_when_idle(&mut self, idle: IdleExit) {
        self.idle_exit = Some(idle);
    }

    /// No client, no download, nothing queued, no timer that must fire (a retry, a
    /// delayed begin, a wake): everything is durable and nothing would happen until a
    /// client comes, so the process may go.
    fn has_nothing_to_do(&self) -> bool {
        !self.shutting_down
            && self.conns.is_empty()
            && self.running.is_empty()
            && self.lanes.is_empty()
            && self.commits_in_flight == 0
            && self.launches_running == 0
            && self.timers.only_idle()
    }

    /// Asks the socket server to pause accepting if no connection is open (in any
    /// state). Paused, it returns the handle that resumes it (send) or stops it (drop).
    async fn pause_accepting_if_idle(&self) -> Option<oneshot::Sender<()>> {
        let idle = self.idle_exit.as_ref()?;
        let (reply, answer) = oneshot::channel();
        let (resume_tx, resume) = oneshot::channel();
        idle.ask.send(PauseCheck { reply, resume }).await.ok()?;
        answer.await.unwrap_or(false).then_some(resume_tx)
    }

    /// Runs until shutdown completes.
    pub async fn run(mut self) -> Result<(), String> {
        self.schedule();
        let mut ticker: Option<tokio::time::Interval> = None;
        // Pinging from this loop (not a side task) means a wedged core is restarted.
        let mut watchdog = sd_notify::watchdog_enabled().map(|every| {
            let mut t = tokio::time::interval(every / 2);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        // When the daemon last became idle; reset by anything that happens.
        let mut idle_since: Option<tokio::time::Instant> = None;
        loop {
            if self.shutting_down && self.running.is_empty() {
                break;
            }
            let idle_at = match &self.idle_exit {
                Some(idle) if self.has_nothing_to_do() => {
                    Some(*idle_since.get_or_insert_with(tokio::time::Instant::now) + idle.after)
                }
                _ => {
                    idle_since = None;
                    None
                }
            };
            let want_ticks = !self.running.is_empty();
            if want_ticks && ticker.is_none() {
                let mut t = tokio::time::interval(self.cfg.timing.progress_interval);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                self.last_tick = Instant::now();
                ticker = Some(t);
            } else if !want_ticks && ticker.is_some() {
                // Nothing runs: no timer fires until something happens.
                ticker = None;
                self.download_rate = 0;
            }
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                _ = self.timers.sleep() => self.fire_timers(),
                _ = tick(&mut ticker) => self.on_tick(),
                _ = tick(&mut watchdog) => {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
                _ = sleep_until(idle_at) => {
                    idle_since = None;
                    if let Some(resume) = self.pause_accepting_if_idle().await {
                        // Connections that closed just before the pause may have left
                        // messages behind; nothing new can arrive while paused.
                        while let Ok(msg) = self.rx.try_recv() {
                            self.handle(msg);
                        }
                        if self.has_nothing_to_do() {
                            drop(resume);
                            let after = self.idle_exit.as_ref().map(|i| i.after).unwrap_or_default();
                            info!(?after, "idle with nothing to do; exiting (the next connection starts the daemon again)");
                            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                            self.begin_shutdown();
                        } else {
                            let _ = resume.send(());
                        }
                    }
                }
            }
            self.report_status();
        }
        self.notify_shutdown();
        // While the disk refuses writes this cannot wait forever: what is not written is
        // what was never acknowledged (the restart recovers from the last commit).
        if !self.store.flush(self.cfg.timing.shutdown_grace).await {
            warn!("the database still refuses writes; exiting with the last changes unwritten");
        }
        Ok(())
    }

    fn handle(&mut self, msg: CoreMsg) {
        match msg {
            CoreMsg::Conn(ConnEvent::Open(handle)) => self.on_open(handle),
            CoreMsg::Conn(ConnEvent::Closed(id)) => self.on_closed(id),
            CoreMsg::Conn(ConnEvent::Request { conn, id, request }) => self.on_request(conn, id, request),
            CoreMsg::DestinationsChecked { conn, id, request, result } => match result {
                Ok(()) => self.handle_request(conn, id, *request, requests::DiskCheck::Done),
                Err(e) => self.reply(conn, id, Err(e)),
            },
            CoreMsg::Worker { task, generation, event } => self.on_worker(task, generation, event),
            CoreMsg::Committed { result, after } => {
                self.commits_in_flight = self.commits_in_flight.saturating_sub(1);
                match result {
                    Ok(()) => self.run_after(after),
                    // The store already reported the failure; nothing depending on it happens.
                    Err(e) => warn!(error = %e, "dropping actions of a failed commit"),
                }
            }
            CoreMsg::LaunchFinished { session, result } => self.on_launch_finished(session, result),
            CoreMsg::Storage(health) => self.on_storage(health),
            CoreMsg::Shutdown => self.begin_shutdown(),
        }
    }

    fn on_open(&mut self, handle: ConnHandle) {
        let (id, app_id) = (handle.id, handle.app_id.clone());
        self.conns.insert(id, Conn { handle, attached: HashSet::new(), watch: None, handles_wakes: false });
        if let Some(app_id) = app_id {
            self.wake_for_new_app(&app_id, id);
        }
    }

    fn on_closed(&mut self, id: ConnId) {
        let Some(conn) = self.conns.remove(&id) else { return };
        for key in conn.attached {
            if let Some(s) = self.sessions.get_mut(&key)
                && s.attached == Some(id)
            {
                s.attached = None;
                s.replaying = false;
            }
            // The app left (or crashed) with events unacknowledged: wake it later, not at once.
            self.check_wake(key, self.cfg.timing.wake_initial);
        }
    }

    /// The database stopped taking writes (a full disk, an I/O error), or takes them
    /// again. Meanwhile reads are answered, changes refused with `storage_full`, and
    /// downloads held at their last checkpoint (each would soon need a commit).
    fn on_storage(&mut self, health: crate::store::Health) {
        match health {
            crate::store::Health::Failing(e) => {
                let dir = self.cfg.state_dir.display();
                let error = ErrorInfo::new(
                    ErrorCode::StorageFull,
                    format!(
                        "dlsessiond cannot write its database in {dir} ({e}); free space there, it retries by itself"
                    ),
                );
                warn!(running = self.running.len(), "database refuses writes: holding downloads, refusing changes");
                self.storage = Some(error);
                let holding: Vec<TaskId> = self.running.iter().copied().collect();
                for id in holding {
                    if self.tasks.get(&id).and_then(|t| t.run.as_ref()).is_some_and(|r| r.holds_slot) {
                        self.stop_worker(id, AfterStop::Requeue);
                    }
                }
            }
            crate::store::Health::Recovered => {
                info!("database takes writes again: downloads go on");
                self.storage = None;
                self.schedule();
            }
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        info!(running = self.running.len(), "shutting down: checkpointing running downloads");
        self.shutting_down = true;
        let running: Vec<TaskId> = self.running.iter().copied().collect();
        for id in running {
            self.stop_worker(id, AfterStop::Shutdown);
        }
        let deadline = self.timers.after(self.cfg.timing.shutdown_grace);
        self.timers.set(deadline, Timer::ShutdownDeadline);
    }

    fn notify_shutdown(&mut self) {
        for conn in self.conns.values() {
            for key in &conn.attached {
                if let Some(s) = self.sessions.get(key) {
                    conn.handle.event(dlsession_proto::Event::Detached {
                        identifier: s.rec.identifier.clone(),
                        reason: dlsession_proto::DetachReason::DaemonShutdown,
                    });
                }
            }
        }
    }

    /// Queues `ops`; `after` runs once they are durable (at once if there is nothing to write).
    fn commit(&mut self, ops: Vec<Op>, after: Vec<After>) {
        if ops.is_empty() {
            self.run_after(after);
            return;
        }
        let tx = self.tx.clone();
        self.commits_in_flight += 1;
        self.store.write(
            ops,
            Some(Box::new(move |result| {
                let _ = tx.send(CoreMsg::Committed { result, after });
            })),
        );
    }

    fn run_after(&mut self, after: Vec<After>) {
        for a in after {
            match a {
                After::Reply { conn, id, response } => self.reply(conn, id, Ok(response)),
                After::Events { session, seq } => self.on_events_committed(session, seq),
                After::Replay { conn, id, session } => self.replay(conn, id, session),
                After::Plan { reply, plan } => {
                    let _ = reply.send(plan);
                }
                After::Signal(tx) => {
                    let _ = tx.send(());
                }
                After::ReleaseProgress { task, generation } => self.release_progress(task, generation),
                After::RemoveFiles(paths) => {
                    for p in paths {
                        remove_file_quietly(&p);
                    }
                }
                After::RemoveDir(dir) => {
                    if let Err(e) = std::fs::remove_dir_all(&dir)
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        warn!(dir = %dir.display(), error = %e, "cannot remove session directory");
                    }
                }
            }
        }
    }

    fn reply(&self, conn: ConnId, id: u64, result: Result<Response, ErrorInfo>) {
        if let Some(c) = self.conns.get(&conn) {
            c.handle.send(ServerMessage::Response { id, result });
        }
    }

    fn fire_timers(&mut self) {
        while let Some(timer) = self.timers.pop_due() {
            match timer {
                Timer::Begin(id) | Timer::Retry(id) => self.on_task_timer(id),
                Timer::Wake(key) => self.on_wake_timer(key),
                Timer::WakeUnanswered(key) => self.on_wake_unanswered(key),
                Timer::Housekeeping => {
                    self.housekeeping = None;
                    self.on_housekeeping();
                }
                Timer::Status => {
                    if let Some(r) = self.status.as_mut() {
                        r.pending = false;
                    }
                }
                Timer::ShutdownDeadline => {
                    warn!(
                        running = self.running.len(),
                        "shutdown grace period over; exiting without final checkpoints"
                    );
                    self.running.clear();
                }
            }
        }
        self.schedule();
    }

    fn set_timer(&mut self, at: Mono, timer: Timer) {
        self.timers.set(at, timer);
    }

    fn clear_timer(&mut self, at: Option<Mono>, timer: Timer) {
        self.timers.clear(at, timer);
    }

    fn on_tick(&mut self) {
        let elapsed = self.last_tick.elapsed().as_secs_f64().max(0.001);
        self.last_tick = Instant::now();
        let mut rate = 0u64;
        let ids: Vec<TaskId> = self.running.iter().copied().collect();
        for id in ids {
            let Some(t) = self.tasks.get_mut(&id) else { continue };
            let received = t.progress.received();
            let delta = received.saturating_sub(t.sampled);
            t.sampled = received;
            let instant = (delta as f64 / elapsed) as u64;
            t.speed = if t.speed == 0 { instant } else { (t.speed * 3 + instant * 7) / 10 };
            rate += t.speed;
            self.bytes_downloaded += delta;
            self.report_progress(id, delta);
        }
        self.download_rate = rate;
        self.supervise();
    }

    /// Tells systemd what the daemon is doing (`systemctl --user status`), at most once a
    /// second and only when it changed.
    fn report_status(&mut self) {
        let Some(report) = self.status.as_ref() else { return };
        let c = self.counts;
        let line = if c.active() == 0 {
            format!("idle; {} suspended, {} sessions, {} clients", c.suspended, self.sessions.len(), self.conns.len())
        } else {
            format!(
                "{} running, {} queued, {} waiting; {} sessions, {} clients",
                c.running,
                c.queued,
                c.waiting,
                self.sessions.len(),
                self.conns.len()
            )
        };
        if line == report.last || report.pending {
            return;
        }
        match report.sent_at.map(|t| t.elapsed()) {
            Some(since) if since < STATUS_INTERVAL => {
                let at = self.timers.after(STATUS_INTERVAL - since);
                self.timers.set(at, Timer::Status);
                if let Some(r) = self.status.as_mut() {
                    r.pending = true;
                }
            }
            _ => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
                if let Some(r) = self.status.as_mut() {
                    r.last = line;
                    r.sent_at = Some(Instant::now());
                }
            }
        }
    }

    /// A pseudo-random number for backoff jitter (xorshift; not for secrets).
    fn random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn session_dir(&self, key: SessionKey) -> PathBuf {
        self.cfg.downloads_dir().join(format!("s{key}"))
    }

    fn part_path(&self, rec: &TaskRecord) -> PathBuf {
        self.session_dir(rec.session).join(format!("{}.part", rec.id))
    }

    fn cache_location(&self, rec: &TaskRecord) -> PathBuf {
        self.session_dir(rec.session).join(format!("{}.download", rec.id))
    }

    fn resume_dir(&self) -> PathBuf {
        self.cfg.downloads_dir().join("resume")
    }

    /// The identifier of a session, for logs.
    fn identifier(&self, key: SessionKey) -> &str {
        self.sessions.get(&key).map_or("?", |s| s.rec.identifier.as_str())
    }

    fn session_by_identifier(&self, identifier: &str) -> Result<SessionKey, ErrorInfo> {
        self.by_identifier
            .get(identifier)
            .copied()
            .ok_or_else(|| ErrorInfo::new(ErrorCode::NoSuchSession, format!("no session named {identifier:?}")))
    }
}

fn seed() -> u64 {
    let mut buf = [0u8; 8];
    match rustix::rand::getrandom(&mut buf, rustix::rand::GetRandomFlags::empty()) {
        Ok(8) => u64::from_le_bytes(buf) | 1,
        _ => (now_ms() ^ u64::from(std::process::id()) << 32) | 1,
    }
}

/// A random 64-bit value from the kernel (for resume-data file names).
fn secret() -> u64 {
    seed()
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn remove_file_quietly(path: &std::path::Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), error = %e, "cannot remove file");
    }
}
