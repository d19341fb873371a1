//! Keeping what the daemon stores bounded, with nothing lost that someone may still want.
//!
//! - Retired history (tasks whose `completed` was acknowledged) is pruned by age
//!   (`retired_history_days`) and count (`retired_history_max`), as tasks retire.
//! - Durable events nobody collects (an app that never comes back) expire after
//!   `event_retention_days`: they are dropped as if acknowledged (files left in the cache
//!   go, completed tasks retire), with a log line per session.
//! - Kept partial files of resume data expire after `resume_retention_days`.
//!
//! One timer, at the earliest expiry, does the last two while the daemon runs; a start
//! does them too. It never keeps an idle daemon from exiting.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::disk::DiskReport;
use super::sessions::Session;
use super::timers::{Timer, millis};
use super::{After, Core};
use crate::model::{SessionKey, now_ms};
use crate::store::Op;

/// Retirements after which history is pruned at the latest, whatever the time.
const PRUNE_AFTER: u64 = 10_000;
/// Events expired per commit (each a row deleted, a task retired).
const EXPIRE_PART: usize = 10_000;

impl Core {
    /// Deletes retired tasks older than `retired_history`, and all but the newest
    /// `retired_history_max`: at start, then when `retired` more tasks retire, once a tenth
    /// of the cap (at most [`PRUNE_AFTER`]) retired since the last prune or an hour has
    /// passed (or a tenth of the history, if shorter). History grows only as tasks retire,
    /// so this needs no timer of its own; counting keeps a burst of retirements from
    /// growing it far past its cap (and then deleting it all at once).
    pub(super) fn prune_history(&mut self, retired: usize, ops: &mut Vec<Op>) {
        let history = self.cfg.timing.retired_history;
        let keep = self.cfg.timing.retired_history_max;
        let every = (history / 10).min(Duration::from_secs(3600));
        let h = &mut self.housekeeping;
        h.retired_since_prune = h.retired_since_prune.saturating_add(retired as u64);
        let by_count = h.retired_since_prune >= (keep / 10).clamp(1, PRUNE_AFTER);
        if !by_count && h.last_prune.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        h.last_prune = Some(Instant::now());
        h.retired_since_prune = 0;
        // With the batch that retires the tasks: it starts once they are committed.
        ops.push(Op::PruneRetired { before: now_ms().saturating_sub(millis(history)), keep });
    }

    /// Expires what is due and sets the timer for the next expiry.
    pub(super) fn on_housekeeping(&mut self) {
        self.expire_events();
        let keep = self.cfg.timing.resume_retention;
        let h = &self.housekeeping;
        if !h.cleaning && h.oldest_resume_file.is_some_and(|t| t.saturating_add(millis(keep)) <= now_ms()) {
            self.clean_resume_dir();
        }
        self.arm_housekeeping();
    }

    /// A durable event was written: make sure a timer will see it expire (a timer already
    /// set fires earlier: events expire in the order they were written).
    pub(super) fn ensure_housekeeping(&mut self) {
        if self.housekeeping.timer.is_none() {
            self.arm_housekeeping();
        }
    }

    /// The apps of `keys` left: their events may expire, `wake_initial` from now at the
    /// soonest (see `expire_events`).
    pub(super) fn sessions_left(&mut self, keys: impl IntoIterator<Item = SessionKey>) {
        let now = now_ms();
        for key in keys {
            if let Some(s) = self.sessions.get_mut(&key) {
                s.left_at = now;
            }
        }
        self.arm_housekeeping();
    }

    /// From when a session's events may expire (wall-clock ms): `wake_initial` after its app
    /// left or the daemon started, so one that comes back finds them; never while attached.
    fn expiring_from(&self, s: &Session) -> Option<u64> {
        s.attached.is_none().then(|| s.left_at.saturating_add(millis(self.cfg.timing.wake_initial)))
    }

    fn arm_housekeeping(&mut self) {
        let retention = millis(self.cfg.timing.event_retention);
        // While a part of an expiry is on its way, its `ExpireMore` comes back for the rest.
        let first_event_due = if self.housekeeping.expiring {
            None
        } else {
            self.sessions
                .values()
                .filter_map(|s| {
                    let first = s.events.values().next()?;
                    Some(first.created_at.saturating_add(retention).max(self.expiring_from(s)?))
                })
                .min()
        };
        let next = [
            first_event_due,
            self.housekeeping.oldest_resume_file.map(|t| t.saturating_add(millis(self.cfg.timing.resume_retention))),
        ]
        .into_iter()
        .flatten()
        .min();
        let old = self.housekeeping.timer.take();
        self.clear_timer(old, Timer::Housekeeping);
        if let Some(at) = next {
            let at = self.timers.at_wall(at);
            self.housekeeping.timer = Some(at);
            self.set_timer(at, Timer::Housekeeping);
        }
    }

    /// Drops events older than `event_retention`, as if the app had acknowledged them, of
    /// sessions no app is attached to and none left within `wake_initial` (or since the
    /// start): an attached app collects them (one it keeps for later is its to keep:
    /// expired, its file went from under the app), and one that reconnects finds them.
    fn expire_events(&mut self) {
        if self.housekeeping.expiring {
            return;
        }
        let now = now_ms();
        let horizon = now.saturating_sub(millis(self.cfg.timing.event_retention));
        // At most `EXPIRE_PART` per commit: a backlog of a million acknowledged in one
        // transaction would hold every app's writes for seconds.
        let mut room = EXPIRE_PART;
        let mut more = false;
        let mut expired: Vec<(SessionKey, Vec<u64>)> = Vec::new();
        for (k, s) in self.sessions.iter() {
            if self.expiring_from(s).is_none_or(|from| from > now) {
                continue;
            }
            // In the order they were written, as the timer reckons them (`arm_housekeeping`):
            // the first not yet due ends the look, so a part never walks the rest.
            let mut seqs: Vec<u64> =
                s.events.values().take_while(|e| e.created_at <= horizon).map(|e| e.seq).take(room + 1).collect();
            if seqs.len() > room {
                seqs.truncate(room);
                more = true;
            }
            room -= seqs.len();
            if !seqs.is_empty() {
                expired.push((*k, seqs));
            }
            if room == 0 {
                more = true;
                break;
            }
        }
        let (mut ops, mut after) = (Vec::new(), Vec::new());
        for (key, seqs) in expired {
            let days = self.cfg.timing.event_retention.as_secs() / 86_400;
            warn!(
                session = %self.sessions.identifier(key),
                events = seqs.len(),
                days,
                "expiring events nobody collected (files left in the cache are deleted, tasks retired)"
            );
            let (o, a) = self.ack_ops(key, seqs);
            ops.extend(o);
            after.extend(a);
        }
        // The next part once this one is durable (a timer would queue it at once).
        if more && !ops.is_empty() {
            self.housekeeping.expiring = true;
            after.push(After::ExpireMore);
        }
        self.commit(ops, after);
    }

    /// Queues the removal of kept partial files past their retention (on the disk
    /// thread, which reports the oldest file left: `on_disk_report`).
    pub(super) fn clean_resume_dir(&mut self) {
        // Unknown until the report (so no timer fires for it meanwhile); files kept in
        // between are counted from `kept_resume_file`.
        self.housekeeping.oldest_resume_file = None;
        self.housekeeping.cleaning = true;
        self.disk.clean_resume_dir(self.resume_dir(), self.cfg.timing.resume_retention);
    }

    pub(super) fn on_disk_report(&mut self, report: DiskReport) {
        match report {
            DiskReport::ResumeDir { removed, oldest } => {
                self.housekeeping.cleaning = false;
                if removed > 0 {
                    let keep = self.cfg.timing.resume_retention;
                    info!(removed, ?keep, "removed kept partial files of resume data past their retention");
                }
                let h = &mut self.housekeeping;
                h.oldest_resume_file = [oldest, h.oldest_resume_file].into_iter().flatten().min();
                self.arm_housekeeping();
            }
            DiskReport::FoundInPlace { task, location, size, error } => {
                self.on_found_at_start(task, location, size, error)
            }
            DiskReport::NotInPlace { task } => self.on_not_in_place(task),
        }
    }

    /// A partial file was kept for resume data now.
    pub(super) fn kept_resume_file(&mut self) {
        let now = now_ms();
        self.housekeeping.oldest_resume_file = Some(self.housekeeping.oldest_resume_file.map_or(now, |o| o.min(now)));
        // Its expiry may come before that of the event the timer waits for.
        self.arm_housekeeping();
    }
}
