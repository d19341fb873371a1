//! The live tasks: each task's record, its in-memory state and its running attempt.
//!
//! Invariants kept here: the daemon-wide counts per state always match the tasks held
//! (change a state only through `Tasks::set_state`), and task ids are never reused.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use dlsession_proto::{TaskAction, TaskCounts, TaskId, TaskState};
use tokio::sync::watch;

use super::sched::LaneKey;
use super::timers::Mono;
use crate::conn::ConnId;
use crate::engine::Progress;
use crate::model::{SessionKey, TaskRecord};

/// What a running task should do once its worker has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterStop {
    Suspend,
    Requeue,
    Cancel,
    CancelProducingResumeData,
    Shutdown,
    /// The route to the peer is gone: wait for the network (`no_network`).
    NoNetwork,
}

impl AfterStop {
    /// What happened to the task, for a requester who asked for something else.
    pub fn told(self) -> &'static str {
        match self {
            AfterStop::Suspend => "was suspended",
            AfterStop::Requeue => "was queued again",
            AfterStop::Cancel => "was cancelled (its session is being cancelled, or a cancel came first)",
            AfterStop::CancelProducingResumeData => "was cancelled",
            AfterStop::Shutdown => "was stopped by the daemon's shutdown",
            AfterStop::NoNetwork => "lost its network",
        }
    }

    /// When several stops are asked for, the strongest wins (a cancel beats a suspend).
    fn rank(self) -> u8 {
        match self {
            AfterStop::Requeue => 0,
            AfterStop::NoNetwork => 1,
            AfterStop::Shutdown => 2,
            AfterStop::Suspend => 3,
            AfterStop::Cancel => 4,
            AfterStop::CancelProducingResumeData => 5,
        }
    }
}

/// A worker at work on a task: downloading, or syncing and moving the finished file.
#[derive(Debug)]
pub(super) struct Run {
    pub generation: u64,
    pub stop: watch::Sender<bool>,
    pub after_stop: Option<AfterStop>,
    pub lane: LaneKey,
    /// Counted against the global and per-host limits: true until the whole body has
    /// arrived (the final sync and the move no longer use the network).
    pub holds_slot: bool,
    /// Bytes in the file when the attempt began (to tell progress from a stall).
    pub start_received: u64,
    /// Progress waits while this attempt's `resumed_at_offset` is being committed, so a
    /// client hears where the transfer restarted before it hears of new bytes.
    pub progress_held: bool,
    /// Progress that arrived meanwhile.
    pub held_bytes: u64,
    /// When the worker last showed life (a report, or bytes arriving): one silent for
    /// longer than the stall limit is abandoned (see `transitions::supervise`).
    pub last_sign: Instant,
    /// `Progress::signs` at `last_sign`.
    pub signs_seen: u64,
    /// The worker was told to stop because it went silent; when that happened.
    pub abandoned_at: Option<Instant>,
    pub worker: tokio::task::JoinHandle<()>,
}

impl Run {
    /// `stop` is the sending end of the worker's stop channel.
    pub fn new(
        generation: u64,
        lane: LaneKey,
        holds_slot: bool,
        stop: watch::Sender<bool>,
        progress: &Progress,
        worker: tokio::task::JoinHandle<()>,
    ) -> Run {
        Run {
            generation,
            stop,
            after_stop: None,
            lane,
            holds_slot,
            start_received: progress.received(),
            progress_held: false,
            held_bytes: 0,
            last_sign: Instant::now(),
            signs_seen: progress.signs(),
            abandoned_at: None,
            worker,
        }
    }

    /// Asks the worker to stop; `how` says what happens once it has.
    pub fn stop(&mut self, how: AfterStop) {
        if self.after_stop.is_none_or(|cur| how.rank() > cur.rank()) {
            self.after_stop = Some(how);
        }
        let _ = self.stop.send(true);
    }
}

/// Why a task waits off the lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OffLanes {
    /// Created, its creation not durable yet (started before, a crash could leave a file at
    /// its destination that no task owns).
    Creating,
    /// Its session was ended by `invalidate_and_cancel` before the daemon stopped: its file
    /// is looked for first (it may have been delivered), then it is cancelled.
    Cancelling,
}

#[derive(Debug)]
pub(super) struct Task {
    pub rec: TaskRecord,
    /// The live state (including `Running`, which is never stored). Read freely; change
    /// it through `Tasks::set_state`.
    pub state: TaskState,
    pub host: String,
    pub progress: Arc<Progress>,
    pub run: Option<Run>,
    /// The deadline this task has in the core's timers, if any.
    pub timer: Option<Mono>,
    /// While its policy holds it off the lanes: its resource deadline in the core's timers
    /// (`Timer::HeldDeadline`; still held then, it completes `timed_out`).
    pub held_deadline: Option<Mono>,
    /// Why its policy holds it, as its watchers were last told (they hear of a change).
    pub held_for: Option<super::admission::Refusal>,
    /// Consecutive failed attempts without progress (the backoff exponent).
    pub failures: u32,
    /// Consecutive failed moves of the finished file to its destination.
    pub move_failures: u32,
    /// The record changed (response metadata of a fresh transfer) without a commit of its
    /// own: the next checkpoint writes the whole record instead of just the offset.
    pub unsaved: bool,
    pub speed: u64,
    pub sampled: u64,
    /// Requests answered once the worker has stopped, with what each asked for.
    pub waiting_replies: Vec<(ConnId, u64, TaskAction)>,
    /// Who asked for a cancel under way: the completion error says so.
    pub cancelled_by: Option<String>,
    /// The address its last response came from (not stored: learnt again after a restart).
    pub peer: Option<std::net::IpAddr>,
    /// The one an earlier attempt learnt: where to look for a route when this attempt
    /// learnt none (a name that failed to resolve on a LAN without a default route).
    pub earlier_peer: Option<std::net::IpAddr>,
    /// Waiting for a route to its peer since then (state `Waiting`, no timer).
    pub no_network_since: Option<dlsession_proto::UnixMillis>,
    /// Read from the database (at start, or dormant until now) and not yet looked at: a
    /// crash may have cut its finish short after its file was moved, marked, into place;
    /// its next attempt looks there before anything else (see `engine::files::found_in_place`).
    pub restored: bool,
    /// Its policy refused it while it awaited its server's answer (an upload whose body was
    /// out, which is not stopped then): looked at again each tick while it runs, in case
    /// its body goes again (a 307 or 308).
    pub policy_deferred: bool,
    /// Kept off the lanes (queued or waiting, it starts nothing) until the reason ends.
    pub off_lanes: Option<OffLanes>,
    /// Its data was thrown away (the resource changed, or the finished file was lost): the
    /// next attempt announces that it starts at 0 (`resumed_at_offset`), though it is not
    /// resuming anything (not stored: after a restart the event is not sent).
    pub discarded: bool,
    /// An upload's answer is in and its body waits to be written: `rec.last_error` says so
    /// only until it is (see `on_answer_held`).
    pub answer_held: bool,
    /// The task's own bandwidth limit (`rec.bandwidth_limit`; rate 0 when none), held by its
    /// running download.
    pub limiter: Arc<crate::engine::limiter::RateLimiter>,
}

impl Task {
    /// An upload whose whole body went out and whose answer is awaited: a stop nobody asked
    /// for (a policy, a full state disk) would throw the answer away, and a POST could not
    /// be sent again ("may have reached the server"). Such a stop waits for the answer.
    pub fn awaits_answer(&self) -> bool {
        self.rec.upload.is_some() && self.progress.sent_whole.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn lane(&self) -> LaneKey {
        (self.rec.session, self.host.clone())
    }
}

/// Every live task (history lives only in the database), but for suspended tasks still
/// on disk since the start ("dormant", see `core::dormant`), which are only counted.
#[derive(Debug)]
pub(super) struct Tasks {
    /// Boxed: filled in id order, a map's nodes stay half full, and tasks are large.
    by_id: BTreeMap<TaskId, Box<Task>>,
    next_id: TaskId,
    /// Of the tasks held.
    counts: TaskCounts,
    /// Suspended tasks not held yet.
    dormant: u64,
}

impl Tasks {
    pub fn new(next_id: TaskId) -> Tasks {
        Tasks { by_id: BTreeMap::new(), next_id, counts: TaskCounts::default(), dormant: 0 }
    }

    /// `n` more suspended tasks stay on disk.
    pub fn add_dormant(&mut self, n: u64) {
        self.dormant += n;
    }

    /// `n` dormant tasks are about to be inserted (or were found gone).
    pub fn take_dormant(&mut self, n: u64) {
        self.dormant = self.dormant.saturating_sub(n);
    }

    pub fn dormant(&self) -> u64 {
        self.dormant
    }

    /// A fresh id (stored with `Op::SetNextTaskId(self.next_id())`).
    pub fn allocate(&mut self) -> TaskId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn next_id(&self) -> TaskId {
        self.next_id
    }

    /// Adds a task in the state its record says.
    pub fn insert(&mut self, rec: TaskRecord, host: String) {
        let progress = Arc::new(Progress::new(rec.committed_offset, rec.bytes_expected.or(rec.expected_size)));
        let (id, state, sampled, bandwidth_limit) = (rec.id, rec.state, rec.committed_offset, rec.bandwidth_limit);
        let task = Task {
            rec,
            state,
            host,
            progress,
            run: None,
            timer: None,
            held_deadline: None,
            held_for: None,
            failures: 0,
            move_failures: 0,
            unsaved: false,
            speed: 0,
            sampled,
            waiting_replies: Vec::new(),
            cancelled_by: None,
            peer: None,
            earlier_peer: None,
            no_network_since: None,
            restored: false,
            off_lanes: None,
            policy_deferred: false,
            discarded: false,
            answer_held: false,
            limiter: Arc::new(crate::engine::limiter::RateLimiter::new(bandwidth_limit)),
        };
        self.counts.add(state);
        if let Some(old) = self.by_id.insert(id, Box::new(task)) {
            self.counts.remove(old.state);
        }
    }

    pub fn remove(&mut self, id: TaskId) -> Option<Box<Task>> {
        let t = self.by_id.remove(&id)?;
        self.counts.remove(t.state);
        Some(t)
    }

    /// Moves a task to `state`; returns its session and old state if that changed.
    pub fn set_state(&mut self, id: TaskId, state: TaskState) -> Option<(SessionKey, TaskState)> {
        let t = self.by_id.get_mut(&id)?;
        let old = std::mem::replace(&mut t.state, state);
        if state != TaskState::Waiting {
            t.no_network_since = None;
        }
        if state != TaskState::Running {
            t.rec.state = state;
        }
        if old == state {
            return None;
        }
        self.counts.remove(old);
        self.counts.add(state);
        Some((t.rec.session, old))
    }

    pub fn get(&self, id: &TaskId) -> Option<&Task> {
        self.by_id.get(id).map(|t| &**t)
    }

    pub fn get_mut(&mut self, id: &TaskId) -> Option<&mut Task> {
        self.by_id.get_mut(id).map(|t| &mut **t)
    }

    /// The running attempt of a task, if it has one.
    pub fn run_mut(&mut self, id: &TaskId) -> Option<&mut Run> {
        self.get_mut(id).and_then(|t| t.run.as_mut())
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn values(&self) -> impl Iterator<Item = &Task> {
        self.by_id.values().map(|t| &**t)
    }

    /// Tasks from id `from` on, in id order.
    pub fn ids_from(&self, from: TaskId) -> impl Iterator<Item = TaskId> + '_ {
        self.by_id.range(from..).map(|(id, _)| *id)
    }

    /// Every live task's state, dormant ones included (as suspended).
    pub fn counts(&self) -> TaskCounts {
        TaskCounts { suspended: self.counts.suspended + self.dormant, ..self.counts }
    }
}
