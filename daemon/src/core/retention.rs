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

use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use super::Core;
use super::timers::{Timer, millis};
use crate::model::{SessionKey, now_ms};
use crate::store::Op;

impl Core {
    /// Deletes retired tasks older than `retired_history`, and all but the newest
    /// `retired_history_max`: at start, then at most once an hour (or a tenth of the
    /// history, if shorter) when tasks retire. History grows only as tasks retire, so this
    /// needs no timer of its own.
    pub(super) fn prune_history(&mut self, ops: &mut Vec<Op>) {
        let history = self.cfg.timing.retired_history;
        let every = (history / 10).min(Duration::from_secs(3600));
        if self.last_prune.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.last_prune = Some(Instant::now());
        ops.push(Op::PruneRetired {
            before: now_ms().saturating_sub(millis(history)),
            keep: self.cfg.timing.retired_history_max,
        });
    }

    /// Expires what is due and sets the timer for the next expiry.
    pub(super) fn on_housekeeping(&mut self) {
        self.expire_events();
        let keep = self.cfg.timing.resume_retention;
        if self.oldest_resume_file.is_some_and(|t| t.saturating_add(millis(keep)) <= now_ms()) {
            let removed = self.clean_resume_dir();
            if removed > 0 {
                info!(removed, ?keep, "removed kept partial files of resume data past their retention");
            }
        }
        self.arm_housekeeping();
    }

    /// A durable event was written or a partial file kept: make sure a timer will see it
    /// expire (a timer already set fires earlier).
    pub(super) fn ensure_housekeeping(&mut self) {
        if self.housekeeping.is_none() {
            self.arm_housekeeping();
        }
    }

    fn arm_housekeeping(&mut self) {
        let retention = millis(self.cfg.timing.event_retention);
        let oldest_event = self.sessions.values().filter_map(|s| s.events.values().next().map(|e| e.created_at)).min();
        let next = [
            oldest_event.map(|t| t.saturating_add(retention)),
            self.oldest_resume_file.map(|t| t.saturating_add(millis(self.cfg.timing.resume_retention))),
        ]
        .into_iter()
        .flatten()
        .min();
        let old = self.housekeeping.take();
        self.clear_timer(old, Timer::Housekeeping);
        if let Some(at) = next {
            let at = self.timers.at_wall(at);
            self.housekeeping = Some(at);
            self.set_timer(at, Timer::Housekeeping);
        }
    }

    /// Drops events older than `event_retention`, as if the app had acknowledged them.
    fn expire_events(&mut self) {
        let horizon = now_ms().saturating_sub(millis(self.cfg.timing.event_retention));
        let expired: Vec<(SessionKey, Vec<u64>)> = self
            .sessions
            .iter()
            .map(|(k, s)| {
                (*k, s.events.values().filter(|e| e.created_at <= horizon).map(|e| e.seq).collect::<Vec<_>>())
            })
            .filter(|(_, seqs)| !seqs.is_empty())
            .collect();
        for (key, seqs) in expired {
            let days = self.cfg.timing.event_retention.as_secs() / 86_400;
            warn!(
                session = %self.identifier(key),
                events = seqs.len(),
                days,
                "expiring events nobody collected (files left in the cache are deleted, tasks retired)"
            );
            self.acknowledge_quietly(key, seqs);
        }
    }

    /// Removes kept partial files past their retention; remembers the oldest left.
    pub(super) fn clean_resume_dir(&mut self) -> usize {
        self.oldest_resume_file = None;
        let Ok(entries) = std::fs::read_dir(self.resume_dir()) else { return 0 };
        let mut removed = 0;
        let now = SystemTime::now();
        let mut oldest: Option<u64> = None;
        for entry in entries.flatten() {
            let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else { continue };
            let age = now.duration_since(modified).unwrap_or(Duration::ZERO);
            if age > self.cfg.timing.resume_retention {
                if std::fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
                continue;
            }
            let at = now_ms().saturating_sub(millis(age));
            oldest = Some(oldest.map_or(at, |o| o.min(at)));
        }
        self.oldest_resume_file = oldest;
        removed
    }

    /// A partial file was kept for resume data now.
    pub(super) fn kept_resume_file(&mut self) {
        let now = now_ms();
        self.oldest_resume_file = Some(self.oldest_resume_file.map_or(now, |o| o.min(now)));
        self.ensure_housekeeping();
    }
}
