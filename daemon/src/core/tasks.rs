//! Task state transitions: queueing, starting workers, reacting to what they report.

use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};

use super::backoff::{Backoff, retry_delay};
use super::requests::cancelled;
use super::timers::wall_after;
use super::{After, AfterStop, Core, Run, Timer};
use crate::engine::{FinishPlan, Job, ResponseMeta, Retry, WorkerEvent, WorkerLink};
use crate::model::{Phase, now_ms};
use crate::store::Op;
use dlsession_proto::{DurableEvent, ErrorCode, ErrorInfo, Header, TaskId, TaskState};

/// Response headers kept per task (for `show`); more are dropped.
const MAX_KEPT_HEADERS: usize = 64;
/// Tasks past their body (syncing and moving files) may number this many times the
/// download limit; beyond that new downloads wait, so a slow disk bounds open files.
pub(super) const FINISHING_FACTOR: usize = 4;
const MAX_KEPT_HEADER_LEN: usize = 1024;

impl Core {
    /// Moves a task to `state`, keeping the counters and watchers in step.
    pub(super) fn set_state(&mut self, id: TaskId, state: TaskState) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        let old = t.state;
        t.state = state;
        if state != TaskState::Running {
            t.rec.state = state;
        }
        if old == state {
            return;
        }
        let key = t.rec.session;
        self.counts.remove(old);
        self.counts.add(state);
        if let Some(s) = self.sessions.get_mut(&key) {
            s.counts.remove(old);
            s.counts.add(state);
        }
        self.notify_watchers(id);
    }

    /// Puts a queued task where it waits: its lane, or a timer until `earliest_begin`. A
    /// task whose data is complete has only its move left: that starts now, off the lanes.
    pub(super) fn enqueue(&mut self, id: TaskId) {
        let now = now_ms();
        let Some(t) = self.tasks.get_mut(&id) else { return };
        if t.rec.phase == Phase::Finishing {
            return self.start_move(id);
        }
        match t.rec.earliest_begin.filter(|&at| at > now) {
            Some(at) => {
                // A date: when the timer fires, the wall clock is asked again (it may
                // have been set back meanwhile).
                let at = self.timers.at_wall(at);
                t.timer = Some(at);
                self.timers.set(at, Timer::Begin(id));
            }
            None => {
                let lane = t.lane();
                let prio = t.rec.priority;
                self.lanes.push(&lane, prio, id);
            }
        }
    }

    /// Takes a queued or waiting task out of its lane and timers.
    pub(super) fn unqueue(&mut self, id: TaskId) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        let timer = t.timer.take();
        let (lane, prio, state) = (t.lane(), t.rec.priority, t.state);
        match state {
            TaskState::Queued => {
                self.lanes.remove(&lane, prio, id);
                self.clear_timer(timer, Timer::Begin(id));
            }
            TaskState::Waiting => self.clear_timer(timer, Timer::Retry(id)),
            _ => {}
        }
        if let Some(t) = self.tasks.get_mut(&id) {
            t.rec.retry_at = None;
        }
    }

    pub(super) fn on_task_timer(&mut self, id: TaskId) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        t.timer = None;
        match t.state {
            TaskState::Queued => self.enqueue(id),
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

    /// Starts queued tasks while slots are free, best priority first.
    pub(super) fn schedule(&mut self) {
        // While the database refuses writes, nothing starts: a download would soon need
        // a checkpoint commit, and its durable events could not be written.
        if self.shutting_down || self.storage.is_some() {
            return;
        }
        let max = self.cfg.limits.max_concurrent_downloads as usize;
        while self.downloading < max && self.running.len() < max.saturating_mul(FINISHING_FACTOR) {
            let sessions = &self.sessions;
            let picked = self.lanes.pop_best(|(key, _), lane_running| {
                sessions.get(key).is_some_and(|s| {
                    lane_running < s.rec.config.max_connections_per_host
                        && s.rec.config.max_concurrent_tasks.is_none_or(|m| s.running < m)
                })
            });
            let Some((lane, id)) = picked else { break };
            self.start(id, lane);
        }
    }

    fn start(&mut self, id: TaskId, lane: super::LaneKey) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let Some(t) = self.tasks.get(&id) else { return };
        let Some(s) = self.sessions.get(&t.rec.session) else { return };
        let now = now_ms();
        // Task headers override session headers of the same name.
        let mut headers: Vec<Header> = s
            .rec
            .config
            .http_headers
            .iter()
            .filter(|h| !t.rec.headers.iter().any(|o| o.name.eq_ignore_ascii_case(&h.name)))
            .cloned()
            .collect();
        headers.extend(t.rec.headers.iter().cloned());
        // A deadline beyond what the clock can count is no deadline.
        let deadline = t
            .rec
            .resource_deadline
            .and_then(|d| tokio::time::Instant::now().checked_add(Duration::from_millis(d.saturating_sub(now))));
        let (stop_tx, stop_rx) = watch::channel(false);
        let job = Job {
            link: WorkerLink::new(self.sink.clone(), id, generation),
            session: s.rec.identifier.clone(),
            url: t.rec.url.clone(),
            headers,
            offset: t.rec.committed_offset,
            etag: t.rec.etag.clone(),
            last_modified: t.rec.last_modified.clone(),
            expected_sha256: t.rec.expected_sha256,
            part_path: self.part_path(&t.rec),
            file_mode: t.rec.file_mode,
            idle_timeout: Duration::from_millis(s.rec.config.timeout_for_request_ms),
            deadline,
            progress: t.progress.clone(),
            limiter: s.limiter.clone(),
            stop: stop_rx,
        };
        let worker = self.engine.spawn(job);
        let key = t.rec.session;
        if let Some(t) = self.tasks.get_mut(&id) {
            t.rec.attempts += 1;
            t.rec.started_at.get_or_insert(now);
            t.sampled = t.progress.received();
            t.run = Some(Run {
                generation,
                stop: stop_tx,
                after_stop: None,
                lane: lane.clone(),
                holds_slot: true,
                start_received: t.progress.received(),
                // A resume announces its offset before its progress (see `on_started`).
                progress_held: t.rec.committed_offset > 0,
                held_bytes: 0,
                last_sign: std::time::Instant::now(),
                signs_seen: t.progress.signs(),
                abandoned_at: None,
                _worker: worker,
            });
        }
        self.lanes.started(&lane);
        if let Some(s) = self.sessions.get_mut(&key) {
            s.running += 1;
        }
        self.running.insert(id);
        self.downloading += 1;
        self.set_state(id, TaskState::Running);
    }

    /// Asks a running worker to stop; `how` says what happens once it has.
    pub(super) fn stop_worker(&mut self, id: TaskId, how: AfterStop) {
        let Some(run) = self.tasks.get_mut(&id).and_then(|t| t.run.as_mut()) else { return };
        let rank = |a: AfterStop| match a {
            AfterStop::Requeue => 0,
            AfterStop::Shutdown => 1,
            AfterStop::Suspend => 2,
            AfterStop::Cancel => 3,
            AfterStop::CancelProducingResumeData => 4,
        };
        if run.after_stop.is_none_or(|cur| rank(how) > rank(cur)) {
            run.after_stop = Some(how);
        }
        let _ = run.stop.send(true);
    }

    /// The body has arrived: the network slot goes to the next task while this one syncs
    /// and moves its file (the fsyncs of small files then overlap other downloads).
    fn free_slot(&mut self, id: TaskId) {
        let Some(run) = self.tasks.get_mut(&id).and_then(|t| t.run.as_mut()) else { return };
        if std::mem::replace(&mut run.holds_slot, false) {
            self.lanes.stopped(&run.lane);
            self.downloading = self.downloading.saturating_sub(1);
        }
    }

    /// The worker is gone: give back its slot.
    fn release(&mut self, id: TaskId) -> Option<Run> {
        self.free_slot(id);
        let t = self.tasks.get_mut(&id)?;
        let run = t.run.take()?;
        t.speed = 0;
        let key = t.rec.session;
        if let Some(s) = self.sessions.get_mut(&key) {
            s.running = s.running.saturating_sub(1);
        }
        self.running.remove(&id);
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
        if let Some(run) = self.tasks.get_mut(&id).and_then(|t| t.run.as_mut()) {
            run.last_sign = std::time::Instant::now();
        }
        match event {
            WorkerEvent::Started { meta, durable } => self.on_started(id, meta, durable),
            WorkerEvent::MoveFailed { error } => self.on_move_failed(id, error),
            WorkerEvent::Checkpoint { offset } => {
                let Some(t) = self.tasks.get_mut(&id) else { return };
                t.rec.committed_offset = offset;
                let op = if std::mem::take(&mut t.unsaved) {
                    // The validators must be durable before an offset that relies on them.
                    Op::UpdateTask(Box::new(t.rec.clone()))
                } else {
                    Op::Checkpoint { task: id, offset }
                };
                self.commit(vec![op], Vec::new());
            }
            WorkerEvent::BodyReceived => self.free_slot(id),
            WorkerEvent::DataComplete { size, sha256, reply } => self.on_data_complete(id, size, sha256, reply),
            WorkerEvent::Moved { location } => self.on_moved(id, location),
            WorkerEvent::Failed(failure) => self.on_failed(id, failure),
            WorkerEvent::Stopped { offset } => self.on_stopped(id, offset),
        }
        self.schedule();
    }

    fn on_started(&mut self, id: TaskId, meta: ResponseMeta, durable: Option<tokio::sync::oneshot::Sender<()>>) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        let had_data = t.rec.committed_offset > 0;
        let rec = &mut t.rec;
        rec.response_status = Some(meta.status);
        rec.final_url = Some(meta.final_url);
        rec.response_headers = meta
            .headers
            .into_iter()
            .take(MAX_KEPT_HEADERS)
            .map(|mut h| {
                h.value.truncate(h.value.floor_char_boundary(MAX_KEPT_HEADER_LEN));
                h
            })
            .collect();
        rec.etag = meta.etag;
        rec.last_modified = meta.last_modified;
        rec.bytes_expected = meta.total.or(rec.expected_size);
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
        let announces = meta.offset > 0 || meta.restarted;
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
        if let Some(run) = self.tasks.get_mut(&id).and_then(|t| t.run.as_mut()) {
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

    fn on_data_complete(
        &mut self,
        id: TaskId,
        size: u64,
        sha256: Option<[u8; 32]>,
        reply: tokio::sync::oneshot::Sender<FinishPlan>,
    ) {
        self.flush_progress(id);
        let cache_location = match self.tasks.get(&id) {
            Some(t) => self.cache_location(&t.rec),
            None => return,
        };
        let Some(t) = self.tasks.get_mut(&id) else { return };
        if let Some(expected) = t.rec.expected_sha256
            && sha256 != Some(expected)
        {
            let _ = reply.send(FinishPlan::Abort);
            let got = sha256.map(|d| dlsession_proto::validate::to_hex(&d)).unwrap_or_default();
            let error = ErrorInfo::new(
                ErrorCode::ChecksumMismatch,
                format!(
                    "SHA-256 of the downloaded {size} bytes is {got}, expected {}",
                    dlsession_proto::validate::to_hex(&expected)
                ),
            );
            self.release(id);
            self.refuse_waiting_stops(id, "completed (its checksum did not match)");
            let mut ops = Vec::new();
            let mut after = Vec::new();
            self.complete(id, Some(error), &mut ops, &mut after);
            self.commit(ops, after);
            return;
        }
        t.rec.phase = Phase::Finishing;
        t.rec.committed_offset = size;
        t.rec.bytes_expected = Some(size);
        let (to, overwrite) = match &t.rec.destination {
            Some(dest) => (dest.into(), t.rec.overwrite),
            None => (cache_location, true),
        };
        let ops = vec![Op::UpdateTask(Box::new(t.rec.clone()))];
        self.commit(ops, vec![After::Plan { reply, plan: FinishPlan::Move { to, overwrite } }]);
    }

    fn on_moved(&mut self, id: TaskId, location: String) {
        self.release(id);
        self.refuse_waiting_stops(id, "finished downloading");
        let session = self.tasks.get(&id).map(|t| self.identifier(t.rec.session)).unwrap_or("?");
        // Debug, not info: one line per file was ~4 % of the daemon's time on 1,000 small
        // files and floods the journal; failures, wakes and relaunches stay at info/warn.
        debug!(%session, task = id, "download finished");
        self.mark_finished(id, location);
    }

    /// Puts a task's complete file at its destination again (its earlier move failed, or a
    /// restart cut it short). It takes no download slot: the network is done with it.
    pub(super) fn start_move(&mut self, id: TaskId) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let Some(t) = self.tasks.get(&id) else { return };
        let link = WorkerLink::new(self.sink.clone(), id, generation);
        let worker = self.engine.spawn_move(link, self.finish_of(t));
        let key = t.rec.session;
        let (stop, _) = watch::channel(false);
        if let Some(t) = self.tasks.get_mut(&id) {
            let received = t.progress.received();
            t.run = Some(Run {
                generation,
                stop,
                after_stop: None,
                lane: t.lane(),
                holds_slot: false,
                start_received: received,
                progress_held: false,
                held_bytes: 0,
                last_sign: std::time::Instant::now(),
                signs_seen: t.progress.signs(),
                abandoned_at: None,
                _worker: worker,
            });
        }
        if let Some(s) = self.sessions.get_mut(&key) {
            s.running += 1;
        }
        self.running.insert(id);
        self.set_state(id, TaskState::Running);
    }

    /// The data is complete but could not be put at its destination: keep it, wait, try
    /// again (the resource timeout does not apply: the download is done, and giving up
    /// would mean deleting it).
    fn on_move_failed(&mut self, id: TaskId, error: ErrorInfo) {
        self.release(id);
        self.refuse_waiting_stops(id, "finished downloading");
        self.hold_for_move(id, error);
    }

    /// Where a task's finished file goes, and how.
    pub(super) fn finish_of(&self, t: &super::Task) -> crate::engine::files::Finish {
        let (to, overwrite) = match &t.rec.destination {
            Some(d) => (d.into(), t.rec.overwrite),
            None => (self.cache_location(&t.rec), true),
        };
        crate::engine::files::Finish {
            from: self.part_path(&t.rec),
            to,
            overwrite,
            size: t.rec.committed_offset,
            mode: t.rec.file_mode,
            progress: t.progress.clone(),
        }
    }

    /// Makes a task whose file could not be moved wait for the next try.
    pub(super) fn hold_for_move(&mut self, id: TaskId, error: ErrorInfo) {
        let session = self.tasks.get(&id).map(|t| self.identifier(t.rec.session).to_owned()).unwrap_or_default();
        let random = self.random();
        let Some(t) = self.tasks.get_mut(&id) else { return };
        t.move_failures = t.move_failures.saturating_add(1);
        let timing = &self.cfg.timing;
        let delay =
            Backoff { initial: timing.retry_initial, max: timing.retry_max }.with_jitter(t.move_failures, random);
        warn!(
            %session,
            task = id,
            error = %error,
            attempt = t.move_failures,
            retry_in = ?delay,
            "cannot put the finished download in place; keeping it and trying again"
        );
        t.rec.phase = Phase::Finishing;
        t.rec.last_error = Some(error);
        t.rec.retry_at = Some(wall_after(delay));
        let at = self.timers.after(delay);
        t.timer = Some(at);
        self.timers.set(at, Timer::Retry(id));
        self.set_state(id, TaskState::Waiting);
        self.save_task(id, Vec::new());
    }

    /// Abandons workers that have shown no sign of life for too long (a hung disk, a
    /// bug): told to stop first, and if even that goes unanswered, the attempt fails with
    /// `internal` and the task retries. Nothing stays `running` with nobody working on it.
    pub(super) fn supervise(&mut self) {
        let now = std::time::Instant::now();
        let mut silent = Vec::new();
        for &id in &self.running {
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
        for (id, give_up, limit) in silent {
            if !give_up {
                warn!(task = id, ?limit, "download worker silent for too long; stopping it");
                if let Some(run) = self.tasks.get_mut(&id).and_then(|t| t.run.as_mut()) {
                    run.abandoned_at = Some(now);
                }
                self.stop_worker(id, AfterStop::Requeue);
                continue;
            }
            warn!(task = id, "download worker did not stop; abandoning it and retrying the task");
            if let Some(run) = self.tasks.get_mut(&id).and_then(|t| t.run.as_mut()) {
                // Whatever it reports later carries a stale generation and is ignored.
                run._worker.abort();
                run.after_stop = None;
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
    }

    fn on_failed(&mut self, id: TaskId, failure: crate::engine::Failure) {
        let run = self.release(id);
        let session = self.tasks.get(&id).map(|t| self.identifier(t.rec.session).to_owned()).unwrap_or_default();
        let Some(t) = self.tasks.get_mut(&id) else { return };
        let made_progress = run.as_ref().is_some_and(|r| t.progress.received() > r.start_received);
        t.failures = if made_progress { 1 } else { t.failures + 1 };
        warn!(%session, task = id, error = %failure.error, attempt = t.rec.attempts, "download attempt failed");
        if failure.discard_partial {
            t.rec.committed_offset = 0;
            t.rec.etag = None;
            t.rec.last_modified = None;
        }
        t.rec.last_error = Some(failure.error.clone());
        if t.rec.phase == Phase::Finishing && !failure.discard_partial {
            // The data is complete and committed (a bug or a hang hit the finish): keep it
            // and try the move again, never the download.
            let error = ErrorInfo::new(ErrorCode::DestinationUnavailable, failure.error.message);
            return self.hold_for_move(id, error);
        }
        t.rec.phase = Phase::Transfer;
        let after_stop = run.and_then(|r| r.after_stop);
        // A stop was requested while the attempt was failing: honour the request.
        if let Some(how) = after_stop {
            let offset = t.rec.committed_offset;
            return self.apply_after_stop(id, how, offset);
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
    fn refuse_waiting_stops(&mut self, id: TaskId, what: &str) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        for (conn, req) in std::mem::take(&mut t.waiting_replies) {
            let error =
                ErrorInfo::new(ErrorCode::InvalidRequest, format!("task {id} {what} before it could be stopped"));
            self.reply(conn, req, Err(error));
        }
    }

    fn on_stopped(&mut self, id: TaskId, offset: u64) {
        let how = self.release(id).and_then(|r| r.after_stop).unwrap_or(AfterStop::Requeue);
        self.apply_after_stop(id, how, offset);
    }

    fn apply_after_stop(&mut self, id: TaskId, how: AfterStop, offset: u64) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        t.rec.committed_offset = offset;
        let replies = std::mem::take(&mut t.waiting_replies);
        let mut ops = Vec::new();
        let mut after = Vec::new();
        let mut response = dlsession_proto::Response::Ok;
        match how {
            AfterStop::Suspend => self.set_state(id, TaskState::Suspended),
            AfterStop::Requeue => {
                self.set_state(id, TaskState::Queued);
                self.enqueue(id);
            }
            AfterStop::Shutdown => {
                // Stays queued in the store; the restart picks it up from `offset`.
                self.set_state(id, TaskState::Queued);
            }
            AfterStop::Cancel => self.complete(id, Some(cancelled()), &mut ops, &mut after),
            AfterStop::CancelProducingResumeData => {
                response = dlsession_proto::Response::ResumeData(self.keep_for_resume(id));
                self.complete(id, Some(cancelled()), &mut ops, &mut after);
            }
        }
        if let Some(t) = self.tasks.get(&id)
            && !ops.iter().any(|op| matches!(op, Op::UpdateTask(r) if r.id == id))
        {
            ops.push(Op::UpdateTask(Box::new(t.rec.clone())));
        }
        for (conn, req) in replies {
            after.push(After::Reply { conn, id: req, response: response.clone() });
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
        t.rec.error = error.clone();
        t.rec.finished_at = Some(now);
        t.rec.retry_at = None;
        t.rec.phase = Phase::Transfer;
        let key = t.rec.session;
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
