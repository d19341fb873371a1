//! Who may start, and why the others wait: the daemon-wide, per-session and per-host
//! limits, the policies, and the run queues they guard.
//!
//! One function, [`Slots::admit`], answers both "may this task start now?" and "why
//! not?": the scheduler (`Slots::pop_next`) is built from its parts and `tasks` / `show`
//! report its refusal, so the two can never disagree about why a task waits.
//!
//! Policies (a task's own over its session's) are weighed per task, not per lane: a
//! queued task its policy refuses in today's conditions is *held* off the lanes, so the
//! scheduler never looks at it, and `Core::enforce_policies` moves tasks between the lanes
//! and the held set whenever conditions or policies change.
//!
//! Invariants kept here: `running` holds exactly the tasks with a worker, `downloading`
//! counts those of them that still hold a download slot, a queued task is in at most one
//! of its lane and `held`, and every generation number is used once.

use std::collections::HashSet;

use dlsession_proto::{SessionPolicy, TaskId};

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
    /// The network is behind a captive portal: whatever the policy, nothing starts (an
    /// HTTPS download would fail on the portal's certificate, an HTTP one save its page).
    Portal,
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
    pub portal: bool,
}

#[derive(Debug)]
pub(super) struct Slots {
    lanes: Lanes,
    /// Every task with a worker: downloading, or syncing and moving its file.
    running: HashSet<TaskId>,
    /// Queued tasks that their policy keeps waiting in today's conditions (off the lanes).
    held: HashSet<TaskId>,
    /// How many of them still hold a download slot (`Run::holds_slot`).
    downloading: usize,
    next_generation: u64,
}

impl Slots {
    pub fn new() -> Slots {
        Slots {
            lanes: Lanes::default(),
            running: HashSet::new(),
            held: HashSet::new(),
            downloading: 0,
            next_generation: 1,
        }
    }

    /// May a task of `session` on `lane`, running under `policy`, start now? The daemon's
    /// state first, then the policy (which holds the task whatever the slots), then the
    /// daemon's, the session's and the host's limits.
    pub fn admit(
        &self,
        limits: Limits,
        session: &Session,
        lane: &LaneKey,
        policy: SessionPolicy,
    ) -> Result<(), Refusal> {
        admit_state(limits)?;
        admit_policy(policy, limits)?;
        self.admit_daemon(limits)?;
        admit_in_session(session, self.lanes.running(lane))
    }

    fn admit_daemon(&self, limits: Limits) -> Result<(), Refusal> {
        admit_state(limits)?;
        let max = limits.max_downloads as usize;
        if self.downloading >= max || self.running.len() >= max.saturating_mul(FINISHING_FACTOR) {
            return Err(Refusal::Daemon { limit: limits.max_downloads });
        }
        Ok(())
    }

    /// Takes the best queued task that `admit` lets start (priority, then the session with
    /// the fewest running tasks, then age), if any;
    /// the lanes hold only tasks their policy lets run (see the module's comment).
    pub fn pop_next(&mut self, limits: Limits, sessions: &Sessions) -> Option<(LaneKey, TaskId)> {
        self.admit_daemon(limits).ok()?;
        self.lanes.pop_best(|(key, _), lane_running| {
            sessions.get(key).filter(|s| admit_in_session(s, lane_running).is_ok()).map(|s| s.running)
        })
    }

    pub fn queue(&mut self, lane: &LaneKey, priority: f32, id: TaskId) {
        self.lanes.push(lane, priority, id);
    }

    pub fn unqueue(&mut self, lane: &LaneKey, priority: f32, id: TaskId) {
        if !self.held.remove(&id) {
            self.lanes.remove(lane, priority, id);
        }
    }

    /// A queued task that its policy refuses now waits off the lanes (taken out of its
    /// lane if it was there).
    pub fn hold(&mut self, lane: &LaneKey, priority: f32, id: TaskId) {
        self.lanes.remove(lane, priority, id);
        self.held.insert(id);
    }

    /// A held task that its policy allows again goes back to its lane.
    pub fn release(&mut self, lane: &LaneKey, priority: f32, id: TaskId) {
        if self.held.remove(&id) {
            self.lanes.push(lane, priority, id);
        }
    }

    pub fn is_held(&self, id: TaskId) -> bool {
        self.held.contains(&id)
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

    /// Nothing queued (held or not) and nothing running.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.lanes.is_empty() && self.held.is_empty()
    }
}

/// Nothing starts while the daemon stops or its database refuses writes.
fn admit_state(limits: Limits) -> Result<(), Refusal> {
    if limits.shutting_down {
        return Err(Refusal::ShuttingDown);
    }
    if limits.storage_full {
        return Err(Refusal::StorageFull);
    }
    Ok(())
}

/// Whether a task under `policy` (its own over its session's) may run in these conditions.
pub(super) fn admit_policy(policy: SessionPolicy, l: Limits) -> Result<(), Refusal> {
    if l.portal {
        return Err(Refusal::Portal);
    }
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

/// The session's and host's part of admission, for a lane with `lane_running` workers.
fn admit_in_session(s: &Session, lane_running: u32) -> Result<(), Refusal> {
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
            portal: false,
        };
        let mut started = Vec::new();
        while let Some((lane, id)) = slots.pop_next(limits, &sessions) {
            let s = sessions.get(&key).unwrap();
            let p = SessionPolicy::default();
            assert_eq!(slots.admit(limits, s, &lane, p), Ok(()), "started {id} although admit refuses it");
            slots.occupy(id, Some(&lane));
            sessions.get_mut(&key).unwrap().running += 1;
            started.push(id);
        }
        assert_eq!(started, vec![1, 3]);
        let s = sessions.get(&key).unwrap();
        assert_eq!(slots.admit(limits, s, &a, SessionPolicy::default()), Err(Refusal::Daemon { limit: 2 }));
        slots.free_slot(&b);
        slots.vacate(3);
        sessions.get_mut(&key).unwrap().running -= 1;
        let s = sessions.get(&key).unwrap();
        assert_eq!(slots.admit(limits, s, &a, SessionPolicy::default()), Err(Refusal::Host { limit: 1 }));
        assert_eq!(slots.pop_next(limits, &sessions), None, "task 2 waits for its host");
        let full = Limits { storage_full: true, ..limits };
        assert_eq!(slots.admit(full, s, &b, SessionPolicy::default()), Err(Refusal::StorageFull));
    }

    #[test]
    fn policies_weigh_the_conditions() {
        let good = Limits {
            max_downloads: 1,
            shutting_down: false,
            storage_full: false,
            metered: false,
            on_battery: false,
            battery_percent: None,
            portal: false,
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
        // Behind a captive portal nothing starts, whatever the policy.
        assert_eq!(admit_policy(SessionPolicy::default(), Limits { portal: true, ..good }), Err(Refusal::Portal));
    }

    /// A held task is never started, is released into its lane, and leaves on unqueue.
    #[test]
    fn held_tasks_stay_off_the_lanes() {
        let mut sessions = Sessions::new(0);
        let key = sessions.create("s".into(), SessionConfig::default(), 0).key;
        let mut slots = Slots::new();
        let lane = (key, "a:80".to_owned());
        let limits = Limits {
            max_downloads: 4,
            shutting_down: false,
            storage_full: false,
            metered: true,
            on_battery: false,
            battery_percent: None,
            portal: false,
        };
        slots.queue(&lane, 0.9, 1);
        slots.queue(&lane, 0.1, 2);
        slots.hold(&lane, 0.9, 1);
        assert!(slots.is_held(1) && !slots.is_idle());
        assert_eq!(slots.pop_next(limits, &sessions), Some((lane.clone(), 2)), "the held task is skipped");
        assert_eq!(slots.pop_next(limits, &sessions), None);
        slots.release(&lane, 0.9, 1);
        slots.release(&lane, 0.9, 1);
        assert!(!slots.is_held(1));
        assert_eq!(slots.pop_next(limits, &sessions), Some((lane.clone(), 1)));
        assert_eq!(slots.pop_next(limits, &sessions), None, "released once");
        slots.queue(&lane, 0.5, 3);
        slots.hold(&lane, 0.5, 3);
        slots.unqueue(&lane, 0.5, 3);
        assert!(!slots.is_held(3));
        let s = sessions.get(&key).unwrap();
        let strict = SessionPolicy { allows_metered: false, ..SessionPolicy::default() };
        assert_eq!(slots.admit(limits, s, &lane, strict), Err(Refusal::Metered));
        let full = Limits { max_downloads: 0, ..limits };
        assert_eq!(
            slots.admit(full, s, &lane, strict),
            Err(Refusal::Metered),
            "the policy is the reason, not the slots"
        );
    }
}
