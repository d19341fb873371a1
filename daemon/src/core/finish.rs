//! Finishing a download: the data is complete (checked against its SHA-256), the file is
//! put in place by a worker, and `finished_downloading` + `completed` are committed; or
//! the move fails and the task waits with its data kept, to try again
//! (docs/behaviour.md, "Durability", "Full disks and unavailable destinations").

use tracing::{debug, warn};

use super::backoff::Backoff;
use super::task::{AfterStop, OffLanes, Run, Task};
use super::timers::wall_after;
use super::{After, Core, Timer};
use crate::engine::files::Leftovers;
use crate::engine::{FinishPlan, WorkerLink};
use crate::model::Phase;
use crate::store::Op;
use dlsession_proto::{ErrorCode, ErrorInfo, TaskId, TaskState};

impl Core {
    pub(super) fn on_data_complete(
        &mut self,
        id: TaskId,
        size: u64,
        sha256: Option<[u8; 32]>,
        marked: bool,
        spliced: bool,
        reply: tokio::sync::oneshot::Sender<FinishPlan>,
    ) {
        self.flush_progress(id);
        let (to, overwrite) = match self.tasks.get(&id) {
            Some(t) => self.target_of(&t.rec),
            None => return,
        };
        let Some(t) = self.tasks.get_mut(&id) else { return };
        if let Some(expected) = t.rec.expected_sha256
            && sha256 != Some(expected)
        {
            let _ = reply.send(FinishPlan::Abort);
            let got = sha256.map(|d| dlsession_proto::validate::to_hex(&d)).unwrap_or_default();
            let mismatch = format!(
                "SHA-256 of the downloaded {size} bytes is {got}, expected {}",
                dlsession_proto::validate::to_hex(&expected)
            );
            // Bytes joined to kept ones may be the splice of two versions a server passed
            // off as one (the same validator for changed content): the file is downloaded
            // once more, whole, before the mismatch is believed.
            if spliced && !t.rec.refetched {
                t.rec.refetched = true;
                warn!(task = id, "{mismatch}; the file was resumed: downloading it again from zero");
                let failure = crate::engine::Failure::restart(
                    ErrorCode::ChecksumMismatch,
                    format!("{mismatch}; the file was resumed, so it is downloaded again from zero"),
                );
                return self.on_failed(id, failure);
            }
            let again = if t.rec.refetched { " (after downloading it again from zero)" } else { "" };
            let error = ErrorInfo::new(ErrorCode::ChecksumMismatch, format!("{mismatch}{again}"));
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
        // Stored with the finish: a move after a restart knows not to ask for the mark.
        t.rec.unmarked = !marked;
        // The phase is `finishing` in memory from here (no stop, no stall check, no network
        // handling touches the task); a commit of it is the unmarked protocol's.
        if marked {
            // Its mark at the destination proves the move after a crash: the finish is
            // recorded with the completion (one commit and its sync fewer per download).
            let _ = reply.send(FinishPlan::Move { to, overwrite, recorded: false });
            return;
        }
        let ops = vec![Op::UpdateTask(Box::new(t.rec.clone()))];
        self.commit(ops, vec![After::Plan { reply, plan: FinishPlan::Move { to, overwrite, recorded: true } }]);
    }

    /// An attempt found the task's file in place, marked (see `engine::files::MARK`): it was
    /// moved before a crash, only its completion was not committed. `error`: its directory
    /// could not be synced; the move is then retried like any failed move.
    pub(super) fn on_found_in_place(&mut self, id: TaskId, location: String, size: u64, error: Option<ErrorInfo>) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        t.rec.committed_offset = size;
        t.rec.bytes_expected = Some(size);
        t.progress.received.store(size, std::sync::atomic::Ordering::Relaxed);
        match error {
            None => {
                debug!(task = id, %location, "the finished file was found in place");
                self.on_moved(id, location);
            }
            Some(error) => self.on_move_failed(id, error),
        }
    }

    /// A task read from the database at start was found with its file in place (see
    /// `look_in_place_at_start`). Taken only while it still waits in the queue: an attempt
    /// that began meanwhile looks for itself.
    pub(super) fn on_found_at_start(&mut self, id: TaskId, location: String, size: u64, error: Option<ErrorInfo>) {
        let Some(t) = self.tasks.get(&id) else { return };
        // One held for this answer (`OffLanes::Cancelling`) takes it in any state it was
        // put in meanwhile (a suspend), but completed.
        let held = t.off_lanes == Some(OffLanes::Cancelling) && t.state != TaskState::Completed;
        // `restored` stays: a move tried again after a failed directory sync still counts
        // copies named by this pid as leftovers (`start_move`).
        if !(waits_for_a_slot(t) || held) || t.run.is_some() || !t.restored {
            return;
        }
        self.unqueue(id);
        // From here it goes as any found file does (a failed directory sync: moved again).
        if let Some(t) = self.tasks.get_mut(&id) {
            t.off_lanes = None;
        }
        self.on_found_in_place(id, location, size, error);
    }

    /// A task of a session that `invalidate_and_cancel` ended before the daemon stopped,
    /// held back at start until its file was looked for, was not found in place: it is
    /// cancelled now (see `recovery::restore`).
    pub(super) fn on_not_in_place(&mut self, id: TaskId) {
        let Some(t) = self.tasks.get(&id) else { return };
        if t.off_lanes != Some(OffLanes::Cancelling) || t.state == TaskState::Completed {
            return;
        }
        self.unqueue(id);
        self.cancel_at_start(vec![id]);
    }

    /// Tasks read from the database that were downloading may have had their file moved into
    /// place just before the daemon stopped (a marked file's finish is committed after its
    /// move). Each is looked for at start, off this thread, rather than when it gets a
    /// download slot: behind a long queue that could take hours, with its file already
    /// delivered. Every queued or retrying one is looked for: a fresh transfer records
    /// nothing before its first checkpoint or its finish, so none can be ruled out.
    pub(super) fn look_in_place_at_start(&mut self) {
        let mut looks: Vec<_> = self
            .tasks
            .values()
            .filter(|t| t.restored && waits_for_a_slot(t) && t.rec.phase != Phase::Finishing)
            .filter(|t| marked_in_place(&t.rec))
            .map(|t| super::disk::Look {
                task: t.rec.id,
                part: self.part_path(&t.rec),
                to: self.target_of(&t.rec).0,
                mark: task_mark(&t.rec),
                sha256: t.rec.expected_sha256,
                report_missing: t.off_lanes == Some(OffLanes::Cancelling),
            })
            .collect();
        // Those held for their answer go first; and if the looks hang (a hung mount), they
        // are cancelled after `disk_check_timeout` rather than held for ever (a file found
        // after that stays where it is).
        looks.sort_by_key(|l| !l.report_missing);
        let held: Vec<TaskId> = looks.iter().filter(|l| l.report_missing).map(|l| l.task).collect();
        if !held.is_empty() {
            let (tx, after) = (self.tx.clone(), self.cfg.timing.disk_check_timeout);
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                for task in held {
                    let _ = tx.send(super::CoreMsg::Disk(super::disk::DiskReport::NotInPlace { task }));
                }
            });
        }
        let tx = self.tx.clone();
        super::disk::look_in_place(looks, move |r| {
            let _ = tx.send(super::CoreMsg::Disk(r));
        });
    }

    pub(super) fn on_moved(&mut self, id: TaskId, location: String) {
        self.release(id);
        self.refuse_waiting_stops(id, "finished downloading");
        let session = self.tasks.get(&id).map_or("?", |t| self.sessions.identifier(t.rec.session));
        // Debug, not info: one line per file was ~4 % of the daemon's time on 1,000 small
        // files and floods the journal; failures, wakes and relaunches stay at info/warn.
        debug!(%session, task = id, "download finished");
        self.mark_finished(id, location);
    }

    /// Puts a task's complete file at its destination again (its earlier move failed, or a
    /// restart cut it short). It takes no download slot: the network is done with it.
    pub(super) fn start_move(&mut self, id: TaskId, leftovers: Leftovers) {
        // Nothing moves before the database passed its start check.
        if let Some(start) = self.life.start.as_mut() {
            start.finishing.push((id, leftovers));
            return;
        }
        let generation = self.slots.generation();
        // Its first move since it was read from the database (one waiting to move again
        // at start): no copy of it by this process exists, so one named by this pid is a
        // leftover of an earlier process (pids repeat, in containers every start).
        let Some(restored) = self.tasks.get_mut(&id).map(|t| std::mem::take(&mut t.restored)) else { return };
        let leftovers = if restored { Leftovers::Any } else { leftovers };
        let Some(t) = self.tasks.get(&id) else { return };
        let link = WorkerLink::new(self.sink.clone(), id, generation);
        let worker = self.engine.spawn_move(link, self.finish_of(t), leftovers);
        let key = t.rec.session;
        if let Some(t) = self.tasks.get_mut(&id) {
            // A move cannot be stopped: nobody holds the other end of its stop channel.
            let (stop, _) = tokio::sync::watch::channel(false);
            t.run = Some(Run::new(generation, t.lane(), false, stop, &t.progress, worker));
        }
        self.slots.occupy(id, None);
        if let Some(s) = self.sessions.get_mut(&key) {
            s.running += 1;
        }
        self.set_state(id, TaskState::Running);
    }

    /// The data is complete but could not be put at its destination: keep it, wait, try
    /// again (the resource timeout does not apply: the download is done, and giving up
    /// would mean deleting it).
    pub(super) fn on_move_failed(&mut self, id: TaskId, error: ErrorInfo) {
        let run = self.release(id);
        self.after_move_failed(id, run, error);
    }

    /// What follows a finish that failed (its worker already released, as `run`).
    pub(super) fn after_move_failed(&mut self, id: TaskId, run: Option<Run>, error: ErrorInfo) {
        // `invalidate_and_cancel` reached it while it moved (its session is ending): it
        // completes `cancelled`, as a task already waiting to move again does, instead of
        // waiting to move again and keeping the session from ending. Also after a restart,
        // when the move was started by the start itself (no stop was asked of it then):
        // the session's stored `cancelling` says so.
        let session =
            self.tasks.get(&id).and_then(|t| Some((t.rec.committed_offset, self.sessions.get(&t.rec.session)?)));
        let ending = session.filter(|(_, s)| s.rec.invalidating).map(|(offset, s)| (offset, s.rec.cancelling));
        if let Some((offset, cancelling)) = ending
            && (cancelling || run.is_some_and(|r| r.after_stop == Some(AfterStop::Cancel)))
        {
            return self.apply_after_stop(id, AfterStop::Cancel, offset);
        }
        self.refuse_waiting_stops(id, "finished downloading");
        self.hold_for_move(id, error);
    }

    /// Where a task's finished file goes (its destination, else its cache file), and
    /// whether it may replace a file there.
    pub(super) fn target_of(&self, rec: &crate::model::TaskRecord) -> (std::path::PathBuf, bool) {
        match &rec.destination {
            Some(d) => (d.into(), rec.overwrite),
            None => (self.cache_location(rec), true),
        }
    }

    /// Where a task's finished file goes, and how.
    pub(super) fn finish_of(&self, t: &Task) -> crate::engine::files::Finish {
        let (to, overwrite) = self.target_of(&t.rec);
        crate::engine::files::Finish {
            from: self.part_path(&t.rec),
            to,
            overwrite,
            size: t.rec.committed_offset,
            mode: t.rec.file_mode,
            progress: t.progress.clone(),
            // Moves from here follow a committed finishing phase.
            recorded: true,
            mark: marked_in_place(&t.rec).then(|| task_mark(&t.rec)),
            sha256: t.rec.expected_sha256,
        }
    }

    /// Makes a task whose file could not be moved wait for the next try.
    pub(super) fn hold_for_move(&mut self, id: TaskId, error: ErrorInfo) {
        let session =
            self.tasks.get(&id).map(|t| self.sessions.identifier(t.rec.session).to_owned()).unwrap_or_default();
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
}

/// A task queued for a download slot, or waiting to retry (not for its app's answer to a
/// challenge).
fn waits_for_a_slot(t: &Task) -> bool {
    match t.state {
        TaskState::Queued => true,
        TaskState::Waiting => t.rec.challenge.is_none(),
        _ => false,
    }
}

/// Whether the task's files carry its mark: not when others may write them (anyone could
/// then write the mark).
pub(super) fn marks(rec: &crate::model::TaskRecord) -> bool {
    rec.file_mode & 0o022 == 0
}

/// Whether the task's finished file, once moved into place, carries its mark (it marks
/// its files, and its finish did not record that this one could not): found in place,
/// the file proves its move, so a move may have happened that no commit recorded.
pub(super) fn marked_in_place(rec: &crate::model::TaskRecord) -> bool {
    marks(rec) && !rec.unmarked
}

/// A task's mark on its finished file (see `engine::files::MARK`): unique to the task, even
/// across databases (the creation time in ms goes with the id).
pub(super) fn task_mark(rec: &crate::model::TaskRecord) -> String {
    format!("{}.{}.{}", rec.session, rec.id, rec.created_at)
}
