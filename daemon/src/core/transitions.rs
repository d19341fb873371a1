//! Task state transitions: queueing, starting workers, reacting to what they report,
//! completing. Admission (who may start) is `admission`'s; this module acts on it.

use std::time::Duration;

use tracing::{info, warn};

use super::admission::{Limits, Refusal, admit_policy};
use super::backoff::{Backoff, retry_delay};
use super::sched::LaneKey;
use super::task::{AfterStop, OffLanes, Run};
use super::timers::wall_after;
use super::{After, Core, Timer};
use crate::engine::files::Leftovers;
use crate::engine::{FinishPlan, Job, ResponseMeta, Retry, WorkerEvent, WorkerLink};
use crate::model::{Phase, now_ms};
use crate::store::Op;
use dlsession_proto::{DurableEvent, ErrorCode, ErrorInfo, Header, TaskId, TaskState};

/// Response headers kept per task (for `show`); more are dropped.
const MAX_KEPT_HEADERS: usize = 64;
const MAX_KEPT_HEADER_LEN: usize = 1024;
const MAX_KEPT_HEADER_NAME: usize = 256;

impl Core {
    /// Moves a task to `state`, keeping the counters and watchers in step.
    pub(super) fn set_state(&mut self, id: TaskId, state: TaskState) {
        let Some((key, old)) = self.tasks.set_state(id, state) else { return };
        let mut rests = false;
        if let Some(s) = self.sessions.get_mut(&key) {
            let active = s.counts.active();
            s.counts.remove(old);
            s.counts.add(state);
            rests = active > 0 && s.counts.active() == 0;
        }
        self.notify_watchers(id);
        // Its last active task paused: the events it has wait for the app, which may be away
        // (a completion's own commit already plans the wake).
        if rests && state == TaskState::Suspended {
            self.check_wake(key, std::time::Duration::ZERO);
        }
    }

    /// Adds a task (in the state its record says) to the live tasks and its session.
    pub(super) fn insert_task(&mut self, rec: crate::model::TaskRecord, host: String) {
        let (id, key, state) = (rec.id, rec.session, rec.state);
        self.tasks.insert(rec, host);
        if let Some(s) = self.sessions.get_mut(&key) {
            s.tasks.insert(id);
            s.counts.add(state);
        }
    }

    /// Suspended → queued: starts the resource clock on first resume.
    pub(super) fn make_queued(&mut self, id: TaskId, now: u64) {
        let budget = self
            .tasks
            .get(&id)
            .and_then(|t| self.sessions.get(&t.rec.session))
            .map(|s| s.rec.config.timeout_for_resource_ms)
            .unwrap_or(dlsession_proto::SessionConfig::DEFAULT_TIMEOUT_FOR_RESOURCE_MS);
        if let Some(t) = self.tasks.get_mut(&id) {
            t.rec.resource_deadline.get_or_insert(now.saturating_add(budget));
            t.rec.retry_at = None;
        }
        self.set_state(id, TaskState::Queued);
        self.enqueue(id);
        self.tell_begin_date(id);
    }

    /// Watchers were told a task is queued before it was placed: one that waits for its
    /// `earliest_begin` is told so now (a held one is told by `hold_queued`; one in its
    /// lane was told right, and with thousands created at once, once is enough).
    fn tell_begin_date(&self, id: TaskId) {
        if self.tasks.get(&id).is_some_and(|t| t.state == TaskState::Queued && t.timer.is_some()) {
            self.notify_watchers(id);
        }
    }

    /// New tasks are durable: the queued ones join their lanes (or their `earliest_begin`
    /// timers) and may start.
    pub(super) fn on_created(&mut self, ids: Vec<TaskId>) {
        for id in ids {
            let Some(t) = self.tasks.get_mut(&id) else { continue };
            if t.off_lanes != Some(OffLanes::Creating) {
                continue;
            }
            t.off_lanes = None;
            if t.state == TaskState::Queued {
                self.enqueue(id);
                self.tell_begin_date(id);
            }
        }
        self.schedule();
    }

    /// What stores a suspended task that `make_queued` made queued: its state, deadline and
    /// retry alone, or its whole record when that holds changes not stored yet.
    pub(super) fn queued_op(&mut self, id: TaskId) -> Option<Op> {
        // Every way into `Suspended` stores the whole record, so nothing else can be
        // waiting to be stored but what `unsaved` marks.
        let t = self.tasks.get_mut(&id)?;
        Some(if t.unsaved { save_op(t) } else { Op::Queued { task: id, resource_deadline: t.rec.resource_deadline } })
    }

    /// Persists a task's record; `after` runs once it is durable.
    pub(super) fn save_task(&mut self, task: TaskId, after: Vec<After>) {
        let ops = self.tasks.get_mut(&task).map(|t| vec![save_op(t)]).unwrap_or_default();
        self.commit(ops, after);
    }

    /// Puts a queued task where it waits: its lane, or a timer until `earliest_begin`. A
    /// task whose data is complete has only its move left: that starts now, off the lanes.
    /// A waiting (or queued) task goes again now: out of its timers, queued, stored; with
    /// `reset_backoff` its next failure backs off from the start.
    pub(super) fn retry_now(&mut self, id: TaskId, reset_backoff: bool, after: Vec<After>) {
        self.unqueue(id);
        if reset_backoff && let Some(t) = self.tasks.get_mut(&id) {
            t.failures = 0;
        }
        // Asked again without an answer: the request goes as before, and may bring the
        // challenge back.
        let withdrawn = self.drop_challenge(id);
        if !withdrawn.is_empty() {
            self.commit(withdrawn, Vec::new());
        }
        self.set_state(id, TaskState::Queued);
        self.enqueue(id);
        self.save_task(id, after);
    }

    pub(super) fn enqueue(&mut self, id: TaskId) {
        let now = now_ms();
        let Some(t) = self.tasks.get_mut(&id) else { return };
        // Kept off for now (see `OffLanes`): whatever ends that queues it.
        if t.off_lanes.is_some() {
            return;
        }
        if t.rec.phase == Phase::Finishing {
            return self.start_move(id, Leftovers::OthersOnly);
        }
        match t.rec.earliest_begin.filter(|&at| at > now) {
            Some(at) => {
                // A date: in no lane until it comes (`t.timer` says so; `dated` holds it).
                t.timer = Some(self.timers.at_wall(at));
                self.dated.insert(at, id);
                self.arm_dated();
            }
            None => {
                let (lane, prio) = (t.lane(), t.rec.priority);
                match self.tasks.get(&id).and_then(|t| admit_policy(self.policy_of(t), self.limits()).err()) {
                    Some(why) => self.hold_queued(&lane, prio, id, Some(why)),
                    None => self.slots.queue(&lane, prio, id),
                }
            }
        }
    }

    /// Holds a queued task its policy refuses off the lanes, until its resource deadline:
    /// still held then (the network stayed metered, say), it completes `timed_out`, as a
    /// task that could run would by then. The wait counts against the budget like any.
    /// `why`: the refusal that holds it, as its caller weighed it.
    pub(super) fn hold_queued(&mut self, lane: &LaneKey, priority: f32, id: TaskId, why: Option<Refusal>) {
        self.slots.hold(lane, priority, id);
        // Its reason changed (watchers saw a limit, or none).
        self.note_held_for(id, why);
        let Some(t) = self.tasks.get_mut(&id) else { return };
        if let (None, Some(deadline)) = (t.held_deadline, t.rec.resource_deadline) {
            let at = self.timers.at_wall(deadline);
            t.held_deadline = Some(at);
            self.timers.set(at, Timer::HeldDeadline(id));
        }
    }

    /// A held task its policy allows again goes back to its lane (its deadline is the
    /// engine's to keep again).
    pub(super) fn release_held_task(&mut self, lane: &LaneKey, priority: f32, id: TaskId) {
        self.slots.release(lane, priority, id);
        if let Some(t) = self.tasks.get_mut(&id) {
            t.held_for = None;
        }
        self.disarm_held_deadline(id);
        self.notify_watchers(id);
    }

    /// Records why a held task waits, and tells its watchers.
    pub(super) fn note_held_for(&mut self, id: TaskId, why: Option<Refusal>) {
        if let Some(t) = self.tasks.get_mut(&id) {
            t.held_for = why;
        }
        self.notify_watchers(id);
    }

    fn disarm_held_deadline(&mut self, id: TaskId) {
        let at = self.tasks.get_mut(&id).and_then(|t| t.held_deadline.take());
        self.clear_timer(at, Timer::HeldDeadline(id));
    }

    /// A held task reached its resource deadline: still held, it completes `timed_out`.
    pub(super) fn on_held_deadline(&mut self, id: TaskId) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        t.held_deadline = None;
        if t.state != TaskState::Queued || !self.slots.is_held(id) {
            return;
        }
        let Some(deadline) = t.rec.resource_deadline else { return };
        let (lane, prio) = (t.lane(), t.rec.priority);
        let refusal = self.tasks.get(&id).map(|t| admit_policy(self.policy_of(t), self.limits()));
        if now_ms() < deadline {
            // The wall clock was set back: not yet.
            return self.hold_queued(&lane, prio, id, refusal.and_then(Result::err));
        }
        let why = match refusal.unwrap_or(Ok(())) {
            Err(Refusal::Metered) => "the network is metered, and its policy refuses that",
            Err(Refusal::OnBattery) => "the machine runs on battery, and its policy refuses that",
            Err(Refusal::Discretionary) => "it is discretionary, and conditions were not good enough",
            Err(Refusal::Portal) => "the network is behind a captive portal (sign in to it first)",
            _ => "its policy held it",
        };
        self.unqueue(id);
        let error = ErrorInfo::new(ErrorCode::TimedOut, format!("timeout_for_resource ran out while it waited: {why}"));
        let (mut ops, mut after) = (Vec::new(), Vec::new());
        self.complete(id, Some(error), &mut ops, &mut after);
        self.commit(ops, after);
    }

    /// Takes a queued or waiting task out of its lane and timers.
    pub(super) fn unqueue(&mut self, id: TaskId) {
        self.disarm_held_deadline(id);
        let Some(t) = self.tasks.get_mut(&id) else { return };
        let timer = t.timer.take();
        let (lane, prio, state) = (t.lane(), t.rec.priority, t.state);
        match state {
            TaskState::Queued => {
                self.slots.unqueue(&lane, prio, id);
                if let (Some(_), Some(at)) = (timer, self.tasks.get(&id).and_then(|t| t.rec.earliest_begin)) {
                    self.dated.remove(at, id);
                }
            }
            TaskState::Waiting => self.clear_timer(timer, Timer::Retry(id)),
            _ => {}
        }
        if let Some(t) = self.tasks.get_mut(&id) {
            t.rec.retry_at = None;
        }
    }

    /// Sets the one timer of the dated tasks: at the first date, asking the wall clock
    /// again then (it may have been set back meanwhile), and at least every `BEGIN_RECHECK`
    /// (a wall clock set forward brings the dates nearer).
    fn arm_dated(&mut self) {
        let at = self.dated.first().map(|first| self.timers.at_wall(first).min(self.timers.after(BEGIN_RECHECK)));
        // One set already comes no later (it re-arms when it fires): kept, so a stream of
        // new dated tasks does not push the wall clock's recheck away for ever.
        if self.dated.timer.is_some_and(|set| at.is_none_or(|at| at >= set)) {
            return;
        }
        let old = std::mem::replace(&mut self.dated.timer, at);
        self.clear_timer(old, Timer::Dated);
        if let Some(at) = at {
            self.set_timer(at, Timer::Dated);
        }
    }

    /// Dated tasks whose date has come (by the wall clock) join their lanes.
    pub(super) fn on_dated_timer(&mut self) {
        self.dated.timer = None;
        for id in self.dated.take_due(now_ms()) {
            let Some(t) = self.tasks.get_mut(&id) else { continue };
            if t.state == TaskState::Queued && t.timer.take().is_some() {
                self.enqueue(id);
            }
        }
        self.arm_dated();
    }

    pub(super) fn on_task_timer(&mut self, id: TaskId) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        t.timer = None;
        match t.state {
            TaskState::Queued => self.enqueue(id),
            // Its wait for credentials outlived `timeout_for_resource`.
            TaskState::Waiting if t.rec.challenge.is_some() => self.on_challenge_deadline(id),
            TaskState::Waiting => {
                // Stored state stays `waiting` with a past `retry_at`: after a restart it
                // queues at once, which is the same thing.
                self.set_state(id, TaskState::Queued);
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.rec.retry_at = None;
                }
                self.enqueue(id);
            }
            _ => {}
        }
    }

    /// Starts queued tasks while `admission` lets them, best priority first. (While the
    /// database refuses writes nothing starts: a download would soon need a checkpoint
    /// commit, and its durable events could not be written.)
    pub(super) fn schedule(&mut self) {
        // Until the database passed its start check nothing starts (`recovery::on_checked`).
        if !self.life.checked {
            return;
        }
        while let Some((lane, id)) = self.slots.pop_next(self.limits(), &self.sessions) {
            self.start(id, lane);
        }
    }

    /// What the daemon-wide half of admission depends on now.
    pub(super) fn limits(&self) -> Limits {
        Limits {
            max_downloads: self.cfg.limits.max_concurrent_downloads,
            shutting_down: self.life.shutting_down,
            storage_full: self.life.storage.is_some(),
            // Before the desktop's first word, a policy that cares waits rather than
            // spending a metered link or the battery; silence afterwards means "no".
            metered: self.life.desktop.metered.unwrap_or(!self.life.desktop_heard),
            on_battery: self.life.desktop.on_battery.unwrap_or(!self.life.desktop_heard),
            battery_percent: self.life.desktop.battery_percent,
            portal: self.life.desktop.portal == Some(true),
        }
    }

    fn start(&mut self, id: TaskId, lane: LaneKey) {
        if self.upload_interrupted(id) {
            return;
        }
        let generation = self.slots.generation();
        let upload = self.upload_job(id);
        let Some(t) = self.tasks.get(&id) else { return };
        let Some(s) = self.sessions.get(&t.rec.session) else { return };
        if upload.is_none() {
            // A download's attempt starts from what is committed (an earlier attempt's count
            // may be higher: bytes it lost, a file thrown away): shown so, and its progress
            // counted from there.
            t.progress.received.store(t.rec.committed_offset, std::sync::atomic::Ordering::Relaxed);
        }
        let now = now_ms();
        // Task headers override session headers of the same name.
        let mut headers: Vec<Header> = s
            .rec
            .config
            .http_headers
            .iter()
            .filter(|h| !t.rec.headers.iter().any(|o| o.name.eq_ignore_ascii_case(&h.name)))
            // An upload's body is framed by the daemon alone (a task's own are refused).
            .filter(|h| upload.is_none() || !dlsession_proto::validate::is_upload_framing_header(&h.name))
            .cloned()
            .collect();
        headers.extend(t.rec.headers.iter().cloned());
        // A deadline beyond what the clock can count is no deadline.
        let deadline = t
            .rec
            .resource_deadline
            .and_then(|d| tokio::time::Instant::now().checked_add(Duration::from_millis(d.saturating_sub(now))));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // A file others may write could carry a mark anyone wrote: such a task's finish is
        // committed before its move instead (docs/behaviour.md, "Durability").
        let mark = super::finish::marks(&t.rec).then(|| super::finish::task_mark(&t.rec));
        let job = Job {
            link: WorkerLink::new(self.sink.clone(), id, generation),
            session: s.rec.identifier.clone(),
            url: t.rec.url.clone(),
            headers,
            offset: t.rec.committed_offset,
            etag: t.rec.etag.clone(),
            last_modified: t.rec.last_modified.clone(),
            // A length a server stated; in rows from before that was recorded, one equal to
            // the app's hint may be only the hint.
            total: t
                .rec
                .bytes_expected
                .filter(|&n| t.rec.committed_offset > 0 && t.rec.total_known.unwrap_or(Some(n) != t.rec.expected_size)),
            expected_sha256: t.rec.expected_sha256,
            part_path: self.part_path(&t.rec),
            file_mode: t.rec.file_mode,
            idle_timeout: Duration::from_millis(s.rec.config.timeout_for_request_ms),
            deadline,
            progress: t.progress.clone(),
            limiters: vec![t.limiter.clone(), s.limiter.clone(), self.bandwidth.clone()],
            cookies: s.cookies.clone(),
            proxy: s.proxy.clone(),
            stop: stop_rx,
            upload,
            auth: self.auth_headers(id, t.rec.session),
            answers_challenges: self.answers_challenges(t.rec.session),
            client_cert: self.client_identity(t.rec.session),
            look_in_place: (t.restored && mark.is_some()).then(|| self.target_of(&t.rec).0),
            mark,
        };
        let worker = self.engine.spawn(job);
        let key = t.rec.session;
        if let Some(t) = self.tasks.get_mut(&id) {
            // The attempt looks first thing.
            t.restored = false;
            t.policy_deferred = false;
            t.rec.attempts += 1;
            // Learnt again from this attempt's response (the network may have changed); the
            // last one known serves until then.
            t.earlier_peer = t.peer.or(t.earlier_peer);
            t.peer = None;
            t.rec.started_at.get_or_insert(now);
            t.sampled = t.progress.received();
            let mut run = Run::new(generation, lane.clone(), true, stop_tx, &t.progress, worker);
            // A resume announces its offset before its progress (see `on_started`).
            run.progress_held = t.rec.committed_offset > 0;
            t.run = Some(run);
        }
        self.slots.occupy(id, Some(&lane));
        if let Some(s) = self.sessions.get_mut(&key) {
            s.running += 1;
        }
        self.set_state(id, TaskState::Running);
    }

    /// Asks a running worker to stop; `how` says what happens once it has.
    pub(super) fn stop_worker(&mut self, id: TaskId, how: AfterStop) {
        if let Some(run) = self.tasks.run_mut(&id) {
            run.stop(how);
        }
    }

    /// The body has arrived: the network slot goes to the next task while this one syncs
    /// and moves its file (the fsyncs of small files then overlap other downloads).
    fn free_slot(&mut self, id: TaskId) {
        let Some(run) = self.tasks.run_mut(&id) else { return };
        if std::mem::replace(&mut run.holds_slot, false) {
            self.slots.free_slot(&run.lane);
        }
    }

    /// The worker is gone: give back its slot.
    pub(super) fn release(&mut self, id: TaskId) -> Option<Run> {
        self.free_slot(id);
        let t = self.tasks.get_mut(&id)?;
        let run = t.run.take()?;
        // An attempt that did not get its whole body out cannot have been taken whole by
        // the server: it may go again (stored with the task's next save).
        let sent_whole = t.progress.sent_whole.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(up) = t.rec.upload.as_mut().filter(|_| !sent_whole) {
            up.in_flight = false;
        }
        t.speed = 0;
        let key = t.rec.session;
        if let Some(s) = self.sessions.get_mut(&key) {
            s.running = s.running.saturating_sub(1);
        }
        self.slots.vacate(id);
        Some(run)
    }

    pub(super) fn on_worker(&mut self, id: TaskId, generation: u64, event: WorkerEvent) {
        let current = self.tasks.get(&id).and_then(|t| t.run.as_ref()).map(|r| r.generation);
        if current != Some(generation) {
            // A report from a run that has since been replaced or abandoned.
            if let WorkerEvent::DataComplete { reply, .. } = event {
                let _ = reply.send(FinishPlan::Abort);
            }
            return;
        }
        if let Some(run) = self.tasks.run_mut(&id) {
            run.last_sign = std::time::Instant::now();
        }
        match event {
            WorkerEvent::Started { meta, durable } => self.on_started(id, meta, durable),
            WorkerEvent::MoveFailed { error } => self.on_move_failed(id, error),
            WorkerEvent::Checkpoint { offset } => {
                let Some(t) = self.tasks.get_mut(&id) else { return };
                t.rec.committed_offset = offset;
                // The validators must be durable before an offset that relies on them.
                let op = if t.unsaved { save_op(t) } else { Op::Checkpoint { task: id, offset } };
                self.commit(vec![op], Vec::new());
            }
            WorkerEvent::BodyReceived => self.free_slot(id),
            WorkerEvent::DataComplete { size, sha256, marked, spliced, reply } => {
                self.on_data_complete(id, size, sha256, marked, spliced, reply)
            }
            WorkerEvent::Moved { location } => self.on_moved(id, location),
            WorkerEvent::FoundInPlace { location, size, error } => self.on_found_in_place(id, location, size, error),
            WorkerEvent::Failed(failure) => self.on_failed(id, failure),
            WorkerEvent::Stopped { offset } => self.on_stopped(id, offset),
            WorkerEvent::ResumeUrl { url } => self.on_resume_url(id, url),
            WorkerEvent::AnswerHeld { error } => self.on_answer_held(id, error),
            WorkerEvent::UploadDone { response } => self.on_upload_done(id, response),
        }
        self.schedule();
    }

    fn on_started(&mut self, id: TaskId, meta: ResponseMeta, durable: Option<tokio::sync::oneshot::Sender<()>>) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        let discarded = std::mem::take(&mut t.discarded);
        let had_data = t.rec.committed_offset > 0 || discarded;
        t.peer = meta.peer.or(t.peer);
        let rec = &mut t.rec;
        rec.response_status = Some(meta.status);
        rec.final_url = Some(meta.final_url);
        rec.response_headers = kept_headers(meta.headers);
        rec.etag = meta.etag;
        rec.last_modified = meta.last_modified;
        rec.bytes_expected = meta.total.or(rec.expected_size);
        rec.total_known = Some(meta.total_stated);
        if meta.restarted || meta.offset == 0 {
            // Committed before any new byte is written: the old offset must not point
            // into data of a changed resource after a crash.
            rec.committed_offset = 0;
        }
        let key = rec.session;
        let expected_total = rec.bytes_expected;
        if meta.offset == 0 && !had_data {
            // A fresh transfer: nothing on disk depends on this metadata yet, so it is
            // written with the first checkpoint or the finish (one commit fewer per file).
            t.unsaved = true;
            if let Some(tx) = durable {
                let _ = tx.send(());
            }
            self.notify_watchers(id);
            return;
        }
        let announces = meta.offset > 0 || meta.restarted || discarded;
        let mut ops = vec![Op::UpdateTask(Box::new(rec.clone()))];
        t.unsaved = false;
        let mut after = Vec::new();
        if announces {
            let event = DurableEvent::ResumedAtOffset { task: id, offset: meta.offset, expected_total };
            let seq = self.emit(key, event, &mut ops);
            after.push(After::Events { session: key, seq });
        }
        // Progress was held from the start of a resumed attempt (a tick may come before
        // this message): until the event is out, or now when there is none.
        if let Some(run) = self.tasks.run_mut(&id) {
            run.progress_held = announces;
            if announces {
                after.push(After::ReleaseProgress { task: id, generation: run.generation });
            }
        }
        if !announces {
            self.report_progress(id, 0);
        }
        if let Some(tx) = durable {
            after.push(After::Signal(tx));
        }
        self.commit(ops, after);
        self.notify_watchers(id);
    }

    /// Running uploads whose policy refused them while they awaited their server's answer
    /// (`Task::policy_deferred`): one whose body goes again (a 307 or 308) stops now, as the
    /// policy said; one the policy allows again is forgotten.
    fn apply_deferred_policies(&mut self) {
        let mut stop = Vec::new();
        for id in self.slots.running() {
            let Some(t) = self.tasks.get(&id).filter(|t| t.policy_deferred) else { continue };
            let refuses = self.policy_refuses(t);
            if refuses && t.awaits_answer() {
                continue;
            }
            if refuses {
                stop.push(id);
            }
            if let Some(t) = self.tasks.get_mut(&id) {
                t.policy_deferred = false;
            }
        }
        for id in stop {
            info!(task = id, "the upload goes again (a redirect) and its policy refuses it now: stopping it");
            self.stop_worker(id, AfterStop::Requeue);
        }
    }

    /// Abandons workers that have shown no sign of life for too long (a hung disk, a
    /// bug): told to stop first, and if even that goes unanswered, the attempt fails with
    /// `internal` and the task retries. Nothing stays `running` with nobody working on it.
    pub(super) fn supervise(&mut self) {
        self.apply_deferred_policies();
        let now = std::time::Instant::now();
        let mut silent = Vec::new();
        for id in self.slots.running() {
            let Some(t) = self.tasks.get_mut(&id) else { continue };
            let Some(run) = t.run.as_mut() else { continue };
            let signs = t.progress.signs();
            if signs != run.signs_seen {
                run.signs_seen = signs;
                run.last_sign = now;
                continue;
            }
            // The worker's own idle timeout fails a silent network first; beyond it, silence
            // means the worker itself is stuck.
            let request = self.sessions.get(&t.rec.session).map_or(0, |s| s.rec.config.timeout_for_request_ms);
            let limit = self.cfg.timing.stall_timeout.saturating_add(Duration::from_millis(request));
            match run.abandoned_at {
                None if now.duration_since(run.last_sign) > limit => silent.push((id, false, limit)),
                Some(at) if now.duration_since(at) > self.cfg.timing.shutdown_grace => silent.push((id, true, limit)),
                _ => {}
            }
        }
        let gave_up = silent.iter().any(|(_, give_up, _)| *give_up);
        for (id, give_up, limit) in silent {
            if !give_up {
                warn!(task = id, ?limit, "download worker silent for too long; stopping it");
                if let Some(run) = self.tasks.run_mut(&id) {
                    run.abandoned_at = Some(now);
                }
                self.stop_worker(id, AfterStop::Requeue);
                continue;
            }
            warn!(task = id, "download worker did not stop; abandoning it and retrying the task");
            if let Some(run) = self.tasks.run_mut(&id) {
                // Whatever it reports later carries a stale generation and is ignored.
                run.worker.abort();
                // Our own stop (a requeue) gives way to the failure and its backoff; a stop
                // someone asked for (a suspend, a cancel, a shutdown) is still carried out.
                if run.after_stop == Some(AfterStop::Requeue) {
                    run.after_stop = None;
                }
            }
            let failure = crate::engine::Failure::transient(
                ErrorCode::Internal,
                format!("the download worker stopped responding (nothing for over {} s)", limit.as_secs()),
            );
            let finishing = self.tasks.get(&id).is_some_and(|t| t.rec.phase == Phase::Finishing);
            if finishing {
                self.on_move_failed(id, ErrorInfo::new(ErrorCode::DestinationUnavailable, failure.error.message));
            } else {
                self.on_failed(id, failure);
            }
        }
        // The slots they held go to the tasks queued behind them now, as when a worker
        // reports its end (nothing else may come to wake the scheduler for a while).
        if gave_up {
            self.schedule();
        }
    }

    pub(super) fn on_failed(&mut self, id: TaskId, failure: crate::engine::Failure) {
        let run = self.release(id);
        let session =
            self.tasks.get(&id).map(|t| self.sessions.identifier(t.rec.session).to_owned()).unwrap_or_default();
        // An attempt that failed before any response knows where it connected only by what
        // the name resolved to (a server on a LAN without a default route that refused).
        if let Some(t) = self.tasks.get_mut(&id) {
            t.peer = t.peer.or(failure.first_hop);
        }
        // No route to the server: the network is gone, not the download failing.
        let offline = self.offline_for(id, &failure);
        // Behind a captive portal (or with no internet, says NetworkManager) a certificate
        // is the portal's, not the server's: not a reason to give up.
        let mut failure = failure;
        if failure.error.code == ErrorCode::Tls
            && failure.retry == Retry::Never
            && self.life.desktop.nm_internet == Some(false)
        {
            failure.retry = Retry::After(None);
        }
        let Some(t) = self.tasks.get_mut(&id) else { return };
        // Bytes kept count as progress: received ones, or sent ones a server offered to keep.
        // Other uploads send everything again, so bytes sent are no progress (else a PUT
        // answered 503 again and again would be retried at the first delay for ever); nor is
        // the offset a resumed upload starts from (only what it sends beyond it).
        let keeps_progress = t.rec.upload.as_ref().is_none_or(|u| u.resume_url.is_some());
        let from = t.progress.body_from.load(std::sync::atomic::Ordering::Relaxed);
        let made_progress =
            keeps_progress && run.as_ref().is_some_and(|r| t.progress.received() > r.start_received.max(from));
        t.failures = match (made_progress, offline) {
            (true, _) => 1,
            (false, true) => t.failures,
            (false, false) => t.failures + 1,
        };
        let consecutive = t.failures;
        warn!(%session, task = id, error = %failure.error, attempt = t.rec.attempts, consecutive, "download attempt failed");
        if failure.discard_partial {
            t.discarded |= t.rec.committed_offset > 0 || t.rec.phase == Phase::Finishing;
            t.rec.committed_offset = 0;
            t.rec.etag = None;
            t.rec.last_modified = None;
        }
        t.rec.last_error = Some(failure.error.clone());
        if t.rec.phase == Phase::Finishing && !failure.discard_partial {
            // The data is complete and committed (a bug or a hang hit the finish): keep it
            // and try the move again, never the download (as a move that failed: a session
            // being cancelled cancels it, a stop asked for meanwhile hears it came too late).
            let error = ErrorInfo::new(ErrorCode::DestinationUnavailable, failure.error.message);
            return self.after_move_failed(id, run, error);
        }
        let file_lost = t.rec.phase == Phase::Finishing;
        t.rec.phase = Phase::Transfer;
        // A stop was requested while the attempt was failing: honour the request, unless the
        // failure ends the task anyway (a 404 completes it; only a cancel says otherwise):
        // suspended or queued again, it would try again for nothing.
        let ends = matches!(failure.retry, Retry::Never) && failure.challenge.is_none();
        let after_stop = run
            .and_then(|r| r.after_stop)
            .filter(|how| !ends || matches!(how, AfterStop::Cancel | AfterStop::CancelProducingResumeData));
        if let Some(how) = after_stop {
            let offset = t.rec.committed_offset;
            return self.apply_after_stop(id, how, offset);
        }
        if let Some(challenge) = failure.challenge.clone()
            && self.on_challenge(id, *challenge, failure.error.clone())
        {
            return;
        }
        let Some(t) = self.tasks.get_mut(&id) else { return };
        if file_lost {
            // The finished file is gone from the cache and from its destination (found by
            // the move after a crash): download it again now. Nothing failed that a
            // backoff would help, and the resource budget is not the download's fault.
            t.failures = 0;
            self.set_state(id, TaskState::Queued);
            self.enqueue(id);
            return self.save_task(id, Vec::new());
        }
        if offline && !matches!(failure.retry, Retry::Never) {
            if self.waits_for_network(id) {
                self.wait_for_network(id);
                return self.save_task(id, Vec::new());
            }
            let (mut ops, mut after) = (Vec::new(), Vec::new());
            self.complete(id, Some(super::network::not_connected()), &mut ops, &mut after);
            return self.commit(ops, after);
        }
        let failures = t.failures;
        let delay = match failure.retry {
            Retry::Never => None,
            Retry::After(server) => {
                let random = self.random();
                let timing = &self.cfg.timing;
                let ours =
                    Backoff { initial: timing.retry_initial, max: timing.retry_max }.with_jitter(failures, random);
                Some(retry_delay(ours, server, timing.retry_after_max))
            }
        };
        let Some(t) = self.tasks.get_mut(&id) else { return };
        let mut ops = Vec::new();
        let mut after = Vec::new();
        let retry_at = delay.map(wall_after);
        match (delay, retry_at) {
            (Some(delay), Some(retry_at)) if t.rec.resource_deadline.is_none_or(|d| retry_at < d) => {
                let at = self.timers.after(delay);
                t.rec.retry_at = Some(retry_at);
                t.timer = Some(at);
                self.timers.set(at, Timer::Retry(id));
                self.set_state(id, TaskState::Waiting);
                if let Some(t) = self.tasks.get(&id) {
                    ops.push(Op::UpdateTask(Box::new(t.rec.clone())));
                }
            }
            (Some(delay), _) => {
                let error = ErrorInfo {
                    code: ErrorCode::TimedOut,
                    message: format!(
                        "gave up after {} attempts: the next one ({} s from now) would come after \
                         timeout_for_resource runs out (last error: {})",
                        t.rec.attempts,
                        delay.as_secs(),
                        failure.error
                    ),
                    http_status: failure.error.http_status,
                };
                self.complete(id, Some(error), &mut ops, &mut after);
            }
            (None, _) => self.complete(id, Some(failure.error), &mut ops, &mut after),
        }
        self.commit(ops, after);
    }

    /// A suspend or cancel asked for while the body was still arriving, but the body
    /// completed first: the task was not stopped, and its requester hears so.
    pub(super) fn refuse_waiting_stops(&mut self, id: TaskId, what: &str) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        for (conn, req, _) in std::mem::take(&mut t.waiting_replies) {
            let error =
                ErrorInfo::new(ErrorCode::InvalidRequest, format!("task {id} {what} before it could be stopped"));
            self.reply(conn, req, Err(error));
        }
    }

    fn on_stopped(&mut self, id: TaskId, offset: u64) {
        let how = self.release(id).and_then(|r| r.after_stop).unwrap_or(AfterStop::Requeue);
        self.apply_after_stop(id, how, offset);
    }

    pub(super) fn apply_after_stop(&mut self, id: TaskId, how: AfterStop, offset: u64) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        t.rec.committed_offset = offset;
        let replies = std::mem::take(&mut t.waiting_replies);
        let by = t.cancelled_by.take().unwrap_or_else(|| "a client".into());
        let mut ops = Vec::new();
        let mut after = Vec::new();
        let mut response = dlsession_proto::Response::Ok;
        let mut after_disk = false;
        match how {
            AfterStop::Suspend => self.set_state(id, TaskState::Suspended),
            AfterStop::NoNetwork if self.waits_for_network(id) => self.wait_for_network(id),
            AfterStop::NoNetwork => self.complete(id, Some(super::network::not_connected()), &mut ops, &mut after),
            AfterStop::Requeue => {
                self.set_state(id, TaskState::Queued);
                self.enqueue(id);
            }
            AfterStop::Shutdown => {
                // Stays queued in the store; the restart picks it up from `offset`.
                self.set_state(id, TaskState::Queued);
            }
            AfterStop::Cancel => self.complete(id, Some(cancelled(&by)), &mut ops, &mut after),
            AfterStop::CancelProducingResumeData => {
                response = dlsession_proto::Response::ResumeData(self.keep_for_resume(id, &mut after));
                after_disk = true;
                self.complete(id, Some(cancelled(&by)), &mut ops, &mut after);
            }
        }
        if !ops.iter().any(|op| matches!(op, Op::UpdateTask(r) if r.id == id))
            && let Some(t) = self.tasks.get_mut(&id)
        {
            ops.push(save_op(t));
        }
        // Each requester hears of what it asked for: the blob only goes to those who asked
        // for resume data (it holds the task's credentials), and one who did gets a blob or
        // a refusal, never a plain `Ok` (the task stopped otherwise: another request's stop
        // came first, or its session is being cancelled).
        for (conn, req, asked) in replies {
            let wants_data = asked == dlsession_proto::TaskAction::CancelProducingResumeData;
            after.push(match (&response, wants_data) {
                (dlsession_proto::Response::ResumeData(_), true) => {
                    After::ReplyAfterDisk { conn, id: req, response: response.clone() }
                }
                (_, true) => After::Refuse {
                    conn,
                    id: req,
                    error: ErrorInfo::new(
                        ErrorCode::InvalidRequest,
                        format!("task {id} {} before its resume data could be made", how.told()),
                    ),
                },
                (_, false) if after_disk => {
                    After::ReplyAfterDisk { conn, id: req, response: dlsession_proto::Response::Ok }
                }
                (_, false) => After::Reply { conn, id: req, response: dlsession_proto::Response::Ok },
            });
        }
        self.commit(ops, after);
    }

    /// Completes a task that did not succeed (failure or cancellation): the partial file
    /// goes once the completion is durable, and `completed` is emitted.
    pub(super) fn complete(&mut self, id: TaskId, error: Option<ErrorInfo>, ops: &mut Vec<Op>, after: &mut Vec<After>) {
        let now = now_ms();
        let part = match self.tasks.get(&id) {
            Some(t) => self.part_path(&t.rec),
            None => return,
        };
        let Some(t) = self.tasks.get_mut(&id) else { return };
        // Requests waiting for a stop that none answered (the attempt failed for good, or its
        // worker was given up) hear that it completed, once that is durable.
        for (conn, req, _) in std::mem::take(&mut t.waiting_replies) {
            let error =
                ErrorInfo::new(ErrorCode::InvalidRequest, format!("task {id} completed before it could be stopped"));
            after.push(After::Refuse { conn, id: req, error });
        }
        // A waiting task's timer (a retry, or the deadline of a wait for credentials) goes,
        // and a held one's deadline.
        if t.state == TaskState::Waiting {
            self.timers.clear(t.timer.take(), Timer::Retry(id));
        }
        self.timers.clear(t.held_deadline.take(), Timer::HeldDeadline(id));
        t.rec.error = error.clone();
        t.rec.finished_at = Some(now);
        t.rec.retry_at = None;
        t.rec.phase = Phase::Transfer;
        t.off_lanes = None;
        let key = t.rec.session;
        ops.extend(self.drop_challenge(id));
        self.forget_task_auth(id, key, ops);
        self.set_state(id, TaskState::Completed);
        let seq = self.emit(key, DurableEvent::Completed { task: id, error }, ops);
        if let Some(t) = self.tasks.get(&id) {
            ops.push(Op::UpdateTask(Box::new(t.rec.clone())));
        }
        after.push(After::RemoveFiles(vec![part]));
        after.push(After::Events { session: key, seq });
        self.check_invalidation(key, ops, after);
    }
}

/// How long a task waiting for its begin date goes without asking the wall clock again.
const BEGIN_RECHECK: Duration = Duration::from_secs(15);

/// Response headers as a task keeps them (bounded).
pub(super) fn kept_headers(headers: Vec<Header>) -> Vec<Header> {
    headers
        .into_iter()
        // A name that long is no header an app looks for; cut, it would be another name.
        .filter(|h| h.name.len() <= MAX_KEPT_HEADER_NAME)
        .take(MAX_KEPT_HEADERS)
        .map(|mut h| {
            h.value.truncate(h.value.floor_char_boundary(MAX_KEPT_HEADER_LEN));
            h
        })
        .collect()
}

/// The completion error of a task cancelled at the request of `by` (who, and how).
pub(super) fn cancelled(by: &str) -> ErrorInfo {
    ErrorInfo::new(ErrorCode::Cancelled, format!("cancelled by {by}"))
}

/// The op that stores a task's whole record: nothing of it is left unsaved after it.
fn save_op(t: &mut super::task::Task) -> Op {
    t.unsaved = false;
    Op::UpdateTask(Box::new(t.rec.clone()))
}
