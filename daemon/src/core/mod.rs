//! The core: the single owner of all session, task and connection state.
//!
//! Everything else talks to it through [`CoreMsg`] on one channel, and it never awaits
//! inside a handler nor touches a disk: store writes are queued (FIFO) and report back
//! with `CoreMsg::Committed`, file work goes to the disk thread (`disk`), workers report
//! with `CoreMsg::Worker`. A state change is applied in memory at once; anything
//! observable outside the daemon that depends on it (a response, a durable event) is
//! released only after its commit.
//!
//! State, one part per kind, each keeping its own invariants and importing nothing of the
//! core: `sessions` (records, attachments, undelivered events), `task` (live tasks and
//! their running attempts), `admission` (run queues, running workers, the limits: who may
//! start and why not), `conns` (connections), `timers`, `status` (statistics, systemd
//! status), `disk` (the disk thread), `held` (requests held back), `start` (the start's
//! work waiting for the database's check), `creations` (creation keys); and, here,
//! `Lifecycle` and `Housekeeping`.
//! Behaviour, as methods of [`Core`] that wire the parts together: `requests` (one
//! handler per request), `transitions` (queueing, workers' reports, completion), `finish`
//! (putting files in place), `delivery` (durable events), `progress`, `wake`, `resume`,
//! `retention`, `life` (idle exit, storage health, shutdown), `recovery` (start),
//! `dormant` (suspended tasks read from disk when first touched), `convert` (domain to
//! wire types).

mod admission;
mod auth;
mod backoff;
mod client_cert;
mod conns;
mod convert;
mod cookies;
mod creations;
mod credentials;
mod dated;
mod delivery;
mod disk;
mod dormant;
mod finish;
mod held;
mod launches;
mod life;
mod network;
mod progress;
mod recovery;
mod requests;
mod resume;
mod retention;
mod sched;
mod sessions;
mod start;
mod status;
mod task;
mod timers;
mod transitions;
mod uploads;
mod wake;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::Config;
use crate::conn::{ConnEvent, ConnHandle, ConnId};
use crate::engine::{Engine, FinishPlan, WorkerEvent};
use crate::model::{SessionKey, TaskRecord, now_ms};
use crate::store::{Op, Snapshot, Store};
use admission::Slots;
use conns::Conns;
use dlsession_proto::{ErrorInfo, Request, Response, TaskId};
use sessions::Sessions;
use status::{Stats, StatusReport};
use task::Tasks;
use timers::{Mono, Timer, Timers};

pub type CoreTx = mpsc::UnboundedSender<CoreMsg>;

/// The socket server's events, as messages on the core's channel.
impl crate::conn::ToCore for CoreTx {
    fn send(&self, event: ConnEvent) -> bool {
        mpsc::UnboundedSender::send(self, CoreMsg::Conn(event)).is_ok()
    }

    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send {
        mpsc::UnboundedSender::closed(self)
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
    /// A task-creating request's disk phase is over (see `disk`).
    DiskChecked {
        conn: ConnId,
        token: u64,
        request: Box<Request>,
        result: disk::Checked,
    },
    /// A disk phase took longer than `disk_check_timeout` (see `requests::tasks`).
    DiskCheckTimedOut {
        conn: ConnId,
        token: u64,
    },
    /// The disk thread reports.
    Disk(disk::DiskReport),
    Worker {
        task: TaskId,
        generation: u64,
        event: WorkerEvent,
    },
    Committed {
        result: Result<(), String>,
        after: Vec<After>,
    },
    /// A relaunch was started (or could not be), off the core's thread.
    Launched {
        session: SessionKey,
        launch: launches::LaunchNo,
        launched: Result<crate::launcher::Launched, String>,
    },
    LaunchFinished {
        session: SessionKey,
        launch: launches::LaunchNo,
        result: Result<(), String>,
    },
    /// The database stopped (or started again) taking writes.
    Storage(crate::store::Health),
    /// A stored client certificate read at start after its time was up.
    LateClientCert {
        session: SessionKey,
        files: dlsession_proto::ClientCertificate,
        identity: Result<Arc<crate::engine::http::ClientIdentity>, String>,
    },
    /// The network watcher (`crate::net`) runs.
    NetworkWatched,
    /// Links, addresses or routes changed.
    NetworkChanged,
    /// The network watcher stopped.
    NetworkUnwatched,
    /// NetworkManager or UPower said something new.
    Desktop(crate::desktop::Desktop),
    /// The user clicked a session's notification.
    NotificationClicked {
        identifier: String,
    },
    /// A session's cookie jar changed: store it.
    CookiesChanged(SessionKey),
    /// The database passed its start check; every dormant task's id and session.
    Checked(Result<Vec<(TaskId, SessionKey)>, crate::store::StoreError>),
    /// Dormant tasks read for the requests holding `ticket` (see `dormant`).
    Woken {
        ticket: u64,
        result: Result<crate::store::Woken, String>,
    },
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
    /// An error answer (see `Core::commit_after_pending`).
    Refuse {
        conn: ConnId,
        id: u64,
        error: ErrorInfo,
    },
    /// An event to a connection (if it is still open) about a change now durable.
    Tell {
        conn: ConnId,
        event: dlsession_proto::Event,
    },
    /// Like `Reply`, once the disk thread has done what was queued before (a kept file).
    ReplyAfterDisk {
        conn: ConnId,
        id: u64,
        response: Response,
    },
    RemoveFiles(Vec<PathBuf>),
    RemoveDir(PathBuf),
    /// A cancelled task's partial file moved aside for its resume data (disk thread).
    Keep {
        from: PathBuf,
        to: PathBuf,
    },
    /// Tell a waiting worker that its commit is durable.
    Signal(oneshot::Sender<()>),
    /// The attempt's `resumed_at_offset` is out: its progress may follow.
    ReleaseProgress {
        task: TaskId,
        generation: u64,
    },
    /// New tasks are durable: the queued ones join their lanes.
    Created(Vec<TaskId>),
    /// A part of an expiry is durable: expire the next (`Core::on_housekeeping`).
    ExpireMore,
}

/// The core actor. Build with [`Core::new`], drive with [`Core::run`]. It owns one part
/// per kind of state, each with its own invariants (see the modules); the methods here
/// and in the behaviour modules wire them together.
#[derive(Debug)]
pub struct Core {
    cfg: Arc<Config>,
    /// The daemon's own places (never a destination), resolved at start.
    own: Arc<crate::validate::OwnPlaces>,
    store: Store,
    engine: Arc<Engine>,
    tx: CoreTx,
    /// Where workers report (`tx`, seen by the engine).
    sink: Arc<dyn crate::engine::Sink>,
    rx: mpsc::UnboundedReceiver<CoreMsg>,
    /// Where file work goes (the cache directory's; never done on this thread).
    disk: disk::Disk,
    sessions: Sessions,
    tasks: Tasks,
    /// Run queues, running workers and the limits on them.
    slots: Slots,
    conns: Conns,
    timers: Timers,
    stats: Stats,
    status: Option<StatusReport>,
    life: Lifecycle,
    housekeeping: Housekeeping,
    /// Queued tasks waiting for their `earliest_begin`, and their one timer.
    dated: dated::Dated,
    rng: u64,
    /// How relaunched apps are started (in a scope of their own under systemd).
    launch_scope: crate::launcher::Scope,
    /// The daemon-wide bandwidth limit (rate 0 when none), held by every running download.
    bandwidth: Arc<crate::engine::limiter::RateLimiter>,
    /// Desktop notifications of sessions that ask for them.
    notifier: crate::notify::Notifier,
    /// Relaunch slots (`max_concurrent_launches`) and the sessions waiting for one.
    launches: launches::Launches,
    /// Which sessions answer challenges, and the credentials held.
    auth: credentials::Auth,
    /// Requests waiting for dormant tasks to be read.
    held: held::Held,
    /// What requests sent `Once` created, by key.
    creations: creations::Creations,
}

/// Where the daemon is in its life, and what keeps it from leaving.
#[derive(Debug, Default)]
struct Lifecycle {
    pub shutting_down: bool,
    /// The shutdown's grace period is over: nothing more is waited for.
    pub grace_over: bool,
    /// Set while the database refuses writes: changes are refused, downloads held.
    pub storage: Option<ErrorInfo>,
    pub idle_exit: Option<IdleExit>,
    /// Store batches whose `Committed` has not come back yet (their follow-up actions,
    /// such as deleting acknowledged files, are still to run).
    pub commits_in_flight: usize,
    /// Relaunched apps (or `systemctl --user start`) not yet exited: under systemd they
    /// live in the daemon's cgroup, so the daemon must not leave before them.
    pub launches_running: usize,
    /// The network watcher runs: tasks may wait for the network (`core::network`).
    pub network_watched: bool,
    /// A route beyond the local networks exists (as of the last change).
    pub online: bool,
    /// When tasks backing off after network errors were last retried because the network
    /// came back (a link that flaps retries them at most once per `COME_BACK_DAMPING`).
    pub came_back_at: Option<std::time::Instant>,
    /// What NetworkManager and UPower say (`crate::desktop`).
    pub desktop: crate::desktop::Desktop,
    /// The desktop watcher has reported once (until then nothing is known, not even that
    /// the services are absent).
    pub desktop_heard: bool,
    /// The addresses traffic to the internet leaves from, at the last network pass
    /// (`net::way_out`).
    pub way_out: Option<(Option<std::net::IpAddr>, Option<std::net::IpAddr>)>,
    /// Since when NetworkManager says the network is behind a captive portal (wall clock).
    pub portal_since: Option<dlsession_proto::UnixMillis>,
    /// The database passed its start check: work may start (`recovery::on_checked`).
    pub checked: bool,
    /// When it did.
    pub checked_at: Option<std::time::Instant>,
    /// The start's work, until then.
    pub start: Option<start::StartWork>,
    /// Why the daemon must stop with an error (a database that failed its check).
    pub fatal: Option<String>,
}

/// Exiting when idle (under socket activation, where the next connection starts the
/// daemon again): after how long, and how to ask the socket server to pause accepting.
#[derive(Debug)]
pub struct IdleExit {
    pub after: std::time::Duration,
    pub ask: mpsc::Sender<crate::conn::PauseCheck>,
}

/// When retention work was last done and is next due.
#[derive(Debug, Default)]
struct Housekeeping {
    /// When retired history was last pruned.
    last_prune: Option<std::time::Instant>,
    /// Tasks retired since.
    retired_since_prune: u64,
    /// When the housekeeping timer fires.
    pub timer: Option<Mono>,
    /// The modification time of the oldest kept partial file of resume data.
    oldest_resume_file: Option<dlsession_proto::UnixMillis>,
    /// A clean of the resume directory is queued on the disk thread.
    cleaning: bool,
    /// A part of an expiry is on its way to the database; the next waits for it
    /// (`retention::EXPIRE_PART`).
    expiring: bool,
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
    ) -> Result<Core, String> {
        let report = tx.clone();
        let disk = disk::Disk::start(move |r| {
            let _ = report.send(CoreMsg::Disk(r));
        })
        .map_err(|e| format!("cannot start the disk thread: {e}"))?;
        let clicked = tx.clone();
        let notifier = crate::notify::Notifier::start(move |identifier| {
            let _ = clicked.send(CoreMsg::NotificationClicked { identifier });
        });
        // Set at run time (stored) wins over the config file's.
        let global_limit = snapshot.global_limit.unwrap_or(cfg.limits.bandwidth_limit);
        let cfg_launches = cfg.limits.max_concurrent_launches;
        let mut core = Core {
            own: Arc::new(crate::validate::OwnPlaces::of(&cfg)),
            cfg,
            store,
            engine,
            sink: Arc::new(ToCore(tx.clone())),
            tx,
            rx,
            disk,
            sessions: Sessions::new(snapshot.seq_floor),
            tasks: Tasks::new(snapshot.next_task_id),
            slots: Slots::new(),
            conns: Conns::default(),
            timers: Timers::new(),
            stats: Stats::new(),
            status: StatusReport::from_env(),
            life: Lifecycle::default(),
            housekeeping: Housekeeping::default(),
            dated: dated::Dated::default(),
            rng: seed(),
            launch_scope: crate::launcher::Scope::detect(),
            bandwidth: Arc::new(crate::engine::limiter::RateLimiter::new(global_limit)),
            notifier,
            launches: launches::Launches::new(cfg_launches),
            auth: credentials::Auth::default(),
            held: held::Held::default(),
            creations: creations::Creations::default(),
        };
        core.restore(snapshot);
        let mut ops = Vec::new();
        core.prune_history(0, &mut ops);
        core.commit(ops, Vec::new());
        core.on_housekeeping();
        Ok(core)
    }

    /// Runs until shutdown completes.
    pub async fn run(mut self) -> Result<(), String> {
        self.schedule();
        let mut ticker: Option<tokio::time::Interval> = None;
        // Pinging from this loop (not a side task) means a wedged core is restarted.
        let mut watchdog = status::Watchdog::from_env();
        // When the daemon last became idle; reset by anything that happens.
        let mut idle_since: Option<tokio::time::Instant> = None;
        loop {
            // A request in its disk phase is waited for too: refused when it comes back, a
            // resume file it moved goes back; and so are commits on their way, whose replies
            // (a cancel, a creation) go out only once they are durable (within the grace,
            // see `ShutdownDeadline`).
            if self.life.shutting_down
                && self.slots.running_count() == 0
                && !self.held.any_on_disk()
                && (self.life.commits_in_flight == 0 || self.life.grace_over)
            {
                break;
            }
            let idle_at = match &self.life.idle_exit {
                Some(idle) if self.has_nothing_to_do() => {
                    Some(*idle_since.get_or_insert_with(tokio::time::Instant::now) + idle.after)
                }
                _ => {
                    idle_since = None;
                    None
                }
            };
            let want_ticks = self.slots.running_count() > 0;
            if want_ticks && ticker.is_none() {
                let mut t = tokio::time::interval(self.cfg.timing.progress_interval);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                self.stats.restart_ticks();
                ticker = Some(t);
            } else if !want_ticks && ticker.is_some() {
                // Nothing runs: no timer fires until something happens.
                ticker = None;
                self.stats.download_rate = 0;
            }
            if let Some(w) = &mut watchdog {
                w.follow(
                    want_ticks || !self.conns.is_empty() || self.life.commits_in_flight > 0 || !self.timers.only_idle(),
                );
            }
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(msg) => {
                        // Watched closely from here: a core that wedges handling what woke
                        // it after a quiet spell is found within the unit's period. (Timers
                        // that fire while idle are housekeeping; any other keeps it busy.)
                        if let Some(w) = &mut watchdog {
                            w.follow(true);
                        }
                        self.handle(msg)
                    }
                    None => break,
                },
                _ = self.timers.sleep() => self.fire_timers(),
                _ = tick(&mut ticker) => self.on_tick(),
                () = ping(&mut watchdog) => {}
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
                            let after = self.life.idle_exit.as_ref().map(|i| i.after).unwrap_or_default();
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
        self.take_nothing_more();
        self.notify_shutdown();
        if let Some(fatal) = self.life.fatal.take() {
            return Err(fatal);
        }
        // While the disk refuses writes this cannot wait forever: what is not written is
        // what was never acknowledged (the restart recovers from the last commit).
        if !self.store.flush(self.cfg.timing.shutdown_grace).await {
            warn!("the database still refuses writes; exiting with the last changes unwritten");
        }
        // Replies waiting for kept files, and removals of acknowledged files (left to the
        // next start's clean-up if the disk hangs).
        if !self.disk.drain(self.cfg.timing.shutdown_grace).await {
            warn!("file work still queued at exit; the next start cleans up");
        }
        Ok(())
    }

    fn handle(&mut self, msg: CoreMsg) {
        match msg {
            CoreMsg::Conn(ConnEvent::Open(handle)) => self.on_open(handle),
            CoreMsg::Conn(ConnEvent::Closed(id)) => self.on_closed(id),
            CoreMsg::Conn(ConnEvent::Drained(id)) => self.on_drained(id),
            CoreMsg::Conn(ConnEvent::Request { conn, id, request }) => self.on_request(conn, id, request),
            CoreMsg::DiskChecked { conn, token, request, result } => {
                self.on_disk_checked(conn, token, *request, result)
            }
            CoreMsg::DiskCheckTimedOut { conn, token } => self.on_disk_check_timed_out(conn, token),
            CoreMsg::Disk(report) => self.on_disk_report(report),
            CoreMsg::Worker { task, generation, event } => self.on_worker(task, generation, event),
            CoreMsg::Committed { result, after } => {
                self.life.commits_in_flight = self.life.commits_in_flight.saturating_sub(1);
                match result {
                    Ok(()) => self.run_after(after),
                    // The store already reported the failure; nothing depending on it happens.
                    Err(e) => {
                        warn!(error = %e, "dropping actions of a failed commit");
                        // An expiry's next part is not owed any more: the timer may try again.
                        if after.iter().any(|a| matches!(a, After::ExpireMore)) {
                            self.housekeeping.expiring = false;
                        }
                    }
                }
            }
            CoreMsg::Launched { session, launch, launched } => self.on_launched(session, launch, launched),
            CoreMsg::LaunchFinished { session, launch, result } => self.on_launch_finished(session, launch, result),
            CoreMsg::Storage(health) => self.on_storage(health),
            CoreMsg::LateClientCert { session, files, identity } => self.on_late_client_cert(session, files, identity),
            CoreMsg::NetworkWatched => self.on_network_watched(),
            CoreMsg::NetworkChanged => self.on_network_changed(),
            CoreMsg::NetworkUnwatched => self.on_network_unwatched(),
            CoreMsg::Desktop(facts) => self.on_desktop(facts),
            CoreMsg::NotificationClicked { identifier } => self.on_notification_clicked(&identifier),
            CoreMsg::CookiesChanged(key) => self.on_cookies_changed(key),
            CoreMsg::Checked(ids) => self.on_checked(ids),
            CoreMsg::Woken { ticket, result } => self.on_woken(ticket, result),
            CoreMsg::Shutdown => self.begin_shutdown(),
        }
    }

    fn on_open(&mut self, handle: ConnHandle) {
        let (id, app_id) = (handle.id, handle.app_id.clone());
        self.conns.open(handle);
        match (app_id, self.life.start.as_mut()) {
            // Wakes wait for the start's database check (`recovery::on_checked`).
            (Some(app_id), Some(start)) => start.new_apps.push((id, app_id)),
            (Some(app_id), None) => self.wake_for_new_app(&app_id, id),
            (None, _) => {}
        }
    }

    fn on_closed(&mut self, id: ConnId) {
        self.forget_held(id);
        let Some(conn) = self.conns.close(id) else { return };
        let took_wakes = conn.rejoins_on_wake().then(|| conn.handle.app_id.clone()).flatten();
        for &key in &conn.attached {
            if let Some(s) = self.sessions.get_mut(&key) {
                s.detach(id);
            }
            // The app left (or crashed) with events unacknowledged: wake it later, not at once.
            self.check_wake(key, self.cfg.timing.wake_initial);
        }
        if !conn.attached.is_empty() {
            self.sessions_left(conn.attached);
        }
        if let Some(app_id) = took_wakes {
            self.wake_target_gone(&app_id);
        }
    }

    /// Queues `ops`; `after` runs once they are durable (at once if there is nothing to write).
    fn commit(&mut self, ops: Vec<Op>, after: Vec<After>) {
        if ops.is_empty() {
            self.run_after(after);
            return;
        }
        self.queue_commit(ops, after);
    }

    /// As [`Core::commit`], but with nothing to write `after` still waits for the commits
    /// on their way (an empty batch keeps its place in the store's queue): for a reply
    /// that repeats a change another request made (a second suspend of a task just
    /// suspended, a second acknowledgement of the same events), which must not go out
    /// before that change is durable. Replies that change nothing (reads, an attach) do
    /// not wait so.
    fn commit_after_pending(&mut self, ops: Vec<Op>, after: Vec<After>) {
        if ops.is_empty() && self.life.commits_in_flight == 0 {
            self.run_after(after);
            return;
        }
        self.queue_commit(ops, after);
    }

    fn queue_commit(&mut self, ops: Vec<Op>, after: Vec<After>) {
        let tx = self.tx.clone();
        self.life.commits_in_flight += 1;
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
                After::Refuse { conn, id, error } => self.reply(conn, id, Err(error)),
                After::Tell { conn, event } => {
                    if let Some(c) = self.conns.get(&conn) {
                        c.handle.event(event);
                    }
                }
                After::Events { session, seq } => self.on_events_committed(session, seq),
                After::Replay { conn, id, session } => self.replay(conn, id, session),
                After::Plan { reply, plan } => {
                    let _ = reply.send(plan);
                }
                After::Signal(tx) => {
                    let _ = tx.send(());
                }
                After::ReleaseProgress { task, generation } => self.release_progress(task, generation),
                After::Created(ids) => self.on_created(ids),
                After::ExpireMore => {
                    self.housekeeping.expiring = false;
                    // A stop does not wait for the rest: the next start expires it.
                    if !self.life.shutting_down {
                        self.on_housekeeping();
                    }
                }
                After::ReplyAfterDisk { conn, id, response } => {
                    if let Some(c) = self.conns.get(&conn) {
                        let out = c.handle.clone();
                        self.disk.then(move || {
                            out.send(dlsession_proto::ServerMessage::Response { id, result: Ok(response) })
                        });
                    }
                }
                After::RemoveFiles(paths) => self.disk.remove(paths),
                After::Keep { from, to } => {
                    self.disk.keep(from, to);
                    self.kept_resume_file();
                }
                After::RemoveDir(dir) => self.disk.remove_dir(dir),
            }
        }
    }

    fn reply(&self, conn: ConnId, id: u64, result: Result<Response, ErrorInfo>) {
        self.conns.reply(conn, id, result);
    }

    fn fire_timers(&mut self) {
        while let Some(timer) = self.timers.pop_due() {
            match timer {
                Timer::Retry(id) => self.on_task_timer(id),
                Timer::Dated => self.on_dated_timer(),
                Timer::HeldDeadline(id) => self.on_held_deadline(id),
                Timer::Wake(key) => self.on_wake_timer(key),
                Timer::WakeUnanswered(key) => self.on_wake_unanswered(key),
                Timer::LaunchSlot(key) => self.on_launch_slot_timer(key),
                Timer::Housekeeping => {
                    self.housekeeping.timer = None;
                    self.on_housekeeping();
                }
                Timer::Status => {
                    if let Some(r) = self.status.as_mut() {
                        r.timer_fired();
                    }
                }
                Timer::ShutdownDeadline => {
                    warn!(
                        running = self.slots.running_count(),
                        "shutdown grace period over; exiting without final checkpoints"
                    );
                    self.life.grace_over = true;
                    self.slots.abandon_all();
                    self.give_up_disk_phases();
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
        let elapsed = self.stats.tick();
        let mut rate = 0u64;
        for id in self.slots.running() {
            let Some(t) = self.tasks.get_mut(&id) else { continue };
            let received = t.progress.received();
            let delta = received.saturating_sub(t.sampled);
            t.sampled = received;
            let instant = (delta as f64 / elapsed) as u64;
            t.speed = if t.speed == 0 { instant } else { (t.speed * 3 + instant * 7) / 10 };
            rate += t.speed;
            self.stats.bytes_downloaded += delta;
            self.report_progress(id, delta);
        }
        self.stats.download_rate = rate;
        self.supervise();
    }

    /// Tells systemd what the daemon is doing, at most once a second and only when it changed.
    fn report_status(&mut self) {
        let Some(report) = self.status.as_mut() else { return };
        let line = status::status_line(self.tasks.counts(), self.sessions.len(), self.conns.len());
        if let Some(wait) = report.offer(line) {
            let at = self.timers.after(wait);
            self.timers.set(at, Timer::Status);
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
        self.session_dir(rec.session).join(format!("{}.{}", rec.id, disk::PART_EXT))
    }

    fn cache_location(&self, rec: &TaskRecord) -> PathBuf {
        self.session_dir(rec.session).join(format!("{}.{}", rec.id, disk::CACHE_EXT))
    }

    fn resume_dir(&self) -> PathBuf {
        self.cfg.downloads_dir().join("resume")
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

async fn ping(watchdog: &mut Option<status::Watchdog>) {
    match watchdog {
        Some(w) => w.ping().await,
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
