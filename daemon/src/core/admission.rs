//! Who may start, and why the others wait: the daemon-wide, per-session and per-host
//! limits, and the run queues they guard.
//!
//! One function, [`Slots::admit`], answers both "may this task start now?" and "why
//! not?": the scheduler (`Slots::pop_next`) is built from its two halves and `tasks` /
//! `show` report its refusal, so the two can never disagree about why a task waits.
//!
//! Invariants kept here: `running` holds exactly the tasks with a worker, `downloading`
//! counts those of them that still hold a download slot, and every generation number is
//! used once.

use std::collections::HashSet;

use dlsession_proto::TaskId;

use super::sched::{LaneKey, Lanes};
use super::sessions::{Session, Sessions};

/// Tasks past their body (syncing and moving files) may number this many times the
/// download limit; beyond that new downloads wait, so a slow disk bounds open files.
const FINISHING_FACTOR: usize = 4;

/// Why a queued task may not start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The daemon is shutting down: nothing starts any more.
    ShuttingDown,
    /// The database refuses writes: nothing starts until it takes them again.
    StorageFull,
    /// The daemon's `max_concurrent_downloads` (or the bound on finishing tasks).
    Daemon { limit: u32 },
    /// The session's `max_concurrent_tasks`.
    Session { limit: u32 },
    /// The session's `max_connections_per_host`.
    Host { limit: u32 },
    /// The network is metered and the session's policy refuses that.
    Metered,
    /// The machine runs on battery and the session's policy refuses that.
    OnBattery,
    /// The session is discretionary and conditions are not good enough.
    Discretionary,
}

/// What admission depends on besides the slots: the daemon's state and the machine's
/// conditions (which sessions' policies weigh).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub max_downloads: u32,
    pub shutting_down: bool,
    pub storage_full: bool,
    pub metered: bool,
    pub on_battery: bool,
    pub battery_percent: Option<u8>,
}

#[derive(Debug)]
pub(super) struct Slots {
    lanes: Lanes,
    /// Every task with a worker: downloading, or syncing and moving its file.
    running: HashSet<TaskId>,
    /// How many of them still hold a download slot (`Run::holds_slot`).
    downloading: usize,
    next_generation: u64,
}

impl Slots {
    pub fn new() -> Slots {
        Slots { lanes: Lanes::default(), running: HashSet::new(), downloading: 0, next_generation: 1 }
    }

    /// May a task of `session` on `lane` start now? Daemon-wide limits first, then the
    /// session's, then the host's.
    pub fn admit(&self, limits: Limits, session: &Session, lane: &LaneKey) -> Result<(), Refusal> {
        self.admit_daemon(limits)?;
        admit_in_session(session, self.lanes.running(lane), limits)
    }

    fn admit_daemon(&self, limits: Limits) -> Result<(), Refusal> {
        if limits.shutting_down {
            return Err(Refusal::ShuttingDown);
        }
        if limits.storage_full {
            return Err(Refusal::StorageFull);
        }
        let max = limits.max_downloads as usize;
        if self.downloading >= max || self.running.len() >= max.saturating_mul(FINISHING_FACTOR) {
            return Err(Refusal::Daemon { limit: limits.max_downloads });
        }
        Ok(())
    }

    /// Takes the best queued task that `admit` lets start (priority, then age), if any.
    pub fn pop_next(&mut self, limits: Limits, sessions: &Sessions) -> Option<(LaneKey, TaskId)> {
        self.admit_daemon(limits).ok()?;
        self.lanes.pop_best(|(key, _), lane_running| {
            sessions.get(key).is_some_and(|s| admit_in_session(s, lane_running, limits).is_ok())
        })
    }

    pub fn queue(&mut self, lane: &LaneKey, priority: f32, id: TaskId) {
        self.lanes.push(lane, priority, id);
    }

    pub fn unqueue(&mut self, lane: &LaneKey, priority: f32, id: TaskId) {
        self.lanes.remove(lane, priority, id);
    }

    /// A number for a new worker (its reports carry it; stale ones are told apart).
    pub fn generation(&mut self) -> u64 {
        let g = self.next_generation;
        self.next_generation += 1;
        g
    }

    /// A worker starts on `id`; with a `lane` it downloads and takes a download slot.
    pub fn occupy(&mut self, id: TaskId, lane: Option<&LaneKey>) {
        self.running.insert(id);
        if let Some(lane) = lane {
            self.lanes.started(lane);
            self.downloading += 1;
        }
    }

    /// The download slot of a task on `lane` is free (its body is in, or it stopped).
    pub fn free_slot(&mut self, lane: &LaneKey) {
        self.lanes.stopped(lane);
        self.downloading = self.downloading.saturating_sub(1);
    }

    /// The worker on `id` is gone.
    pub fn vacate(&mut self, id: TaskId) {
        self.running.remove(&id);
    }

    /// Forgets every worker (the shutdown grace ran out: nobody waits for them).
    pub fn abandon_all(&mut self) {
        self.running.clear();
    }

    pub fn running(&self) -> Vec<TaskId> {
        self.running.iter().copied().collect()
    }

    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    /// Nothing queued and nothing running.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.lanes.is_empty()
    }
}

/// The session's and host's half of admission, for a lane with `lane_running` workers.
/// Whether the session's policy lets its tasks run in these conditions.
pub(super) fn admit_policy(policy: dlsession_proto::SessionPolicy, l: Limits) -> Result<(), Refusal> {
    if l.metered && !policy.allows_metered {
        return Err(Refusal::Metered);
    }
    if l.on_battery && !policy.allows_battery {
        return Err(Refusal::OnBattery);
    }
    let low_battery =
        l.on_battery && l.battery_percent.is_none_or(|p| p < dlsession_proto::DISCRETIONARY_BATTERY_PERCENT);
    if policy.discretionary && (l.metered || low_battery) {
        return Err(Refusal::Discretionary);
    }
    Ok(())
}

fn admit_in_session(s: &Session, lane_running: u32, limits: Limits) -> Result<(), Refusal> {
    admit_policy(s.rec.policy, limits)?;
    if let Some(limit) = s.rec.config.max_concurrent_tasks.filter(|&m| s.running >= m) {
        return Err(Refusal::Session { limit });
    }
    let per_host = s.rec.config.max_connections_per_host;
    if lane_running >= per_host {
        return Err(Refusal::Host { limit: per_host });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlsession_proto::SessionConfig;

    /// The scheduler starts exactly what `admit` allows, and a refusal names the limit.
    #[test]
    fn the_scheduler_and_admit_agree() {
        let mut sessions = Sessions::new(0);
        let config = SessionConfig { max_connections_per_host: 1, ..SessionConfig::default() };
        let key = sessions.create("s".into(), config, 0).key;
        let mut slots = Slots::new();
        let (a, b) = ((key, "a:80".to_owned()), (key, "b:80".to_owned()));
        slots.queue(&a, 0.5, 1);
        slots.queue(&a, 0.5, 2);
        slots.queue(&b, 0.5, 3);
        let limits = Limits {
            max_downloads: 2,
            shutting_down: false,
            storage_full: false,
            metered: false,
            on_battery: false,
            battery_percent: None,
        };
        let mut started = Vec::new();
        while let Some((lane, id)) = slots.pop_next(limits, &sessions) {
            let s = sessions.get(&key).unwrap();
            assert_eq!(slots.admit(limits, s, &lane), Ok(()), "started {id} although admit refuses it");
            slots.occupy(id, Some(&lane));
            sessions.get_mut(&key).unwrap().running += 1;
            started.push(id);
        }
        assert_eq!(started, vec![1, 3]);
        let s = sessions.get(&key).unwrap();
        assert_eq!(slots.admit(limits, s, &a), Err(Refusal::Daemon { limit: 2 }));
        slots.free_slot(&b);
        slots.vacate(3);
        sessions.get_mut(&key).unwrap().running -= 1;
        let s = sessions.get(&key).unwrap();
        assert_eq!(slots.admit(limits, s, &a), Err(Refusal::Host { limit: 1 }));
        assert_eq!(slots.pop_next(limits, &sessions), None, "task 2 waits for its host");
        let full = Limits { storage_full: true, ..limits };
        assert_eq!(slots.admit(full, s, &b), Err(Refusal::StorageFull));
    }

    #[test]
    fn policies_weigh_the_conditions() {
        use dlsession_proto::SessionPolicy;
        let good = Limits {
            max_downloads: 1,
            shutting_down: false,
            storage_full: false,
            metered: false,
            on_battery: false,
            battery_percent: None,
        };
        let strict = SessionPolicy { allows_metered: false, allows_battery: false, ..SessionPolicy::default() };
        let discretionary = SessionPolicy { discretionary: true, ..SessionPolicy::default() };
        assert_eq!(admit_policy(strict, good), Ok(()));
        assert_eq!(admit_policy(strict, Limits { metered: true, ..good }), Err(Refusal::Metered));
        assert_eq!(admit_policy(strict, Limits { on_battery: true, ..good }), Err(Refusal::OnBattery));
        assert_eq!(admit_policy(SessionPolicy::default(), Limits { metered: true, on_battery: true, ..good }), Ok(()));
        assert_eq!(admit_policy(discretionary, Limits { metered: true, ..good }), Err(Refusal::Discretionary));
        let low = Limits { on_battery: true, battery_percent: Some(30), ..good };
        assert_eq!(admit_policy(discretionary, low), Err(Refusal::Discretionary));
        assert_eq!(admit_policy(discretionary, Limits { battery_percent: Some(80), ..low }), Ok(()));
    }
}
