//! Run queues: one lane per (session, host), each ordered by priority then age.
//!
//! Picking the next task costs one look at the head of each lane, so a long queue
//! behind a saturated host never has to be scanned.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

use dlsession_proto::TaskId;

use crate::model::SessionKey;

pub type LaneKey = (SessionKey, String);

/// The host part of a lane key: host and port of a URL.
pub fn host_key(url: &url::Url) -> String {
    format!("{}:{}", url.host_str().unwrap_or(""), url.port_or_known_default().unwrap_or(0))
}

/// Priority as an orderable integer (0.0..=1.0 → 0..=1_000_000).
pub fn prio_key(priority: f32) -> u32 {
    (priority.clamp(0.0, 1.0) * 1_000_000.0) as u32
}

type Entry = (Reverse<u32>, TaskId);
/// How a lane's head compares with the others': priority, its owner's load, age.
type Rank = (Reverse<u32>, u32, TaskId);

#[derive(Debug, Default)]
struct Lane {
    queue: BTreeSet<Entry>,
    running: u32,
}

#[derive(Debug, Default)]
pub struct Lanes {
    lanes: HashMap<LaneKey, Lane>,
}

impl Lanes {
    pub fn push(&mut self, key: &LaneKey, priority: f32, task: TaskId) {
        self.lanes.entry(key.clone()).or_default().queue.insert((Reverse(prio_key(priority)), task));
    }

    pub fn remove(&mut self, key: &LaneKey, priority: f32, task: TaskId) -> bool {
        let Some(lane) = self.lanes.get_mut(key) else { return false };
        let removed = lane.queue.remove(&(Reverse(prio_key(priority)), task));
        self.tidy(key);
        removed
    }

    /// No lane has a queued or running task.
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    pub fn running(&self, key: &LaneKey) -> u32 {
        self.lanes.get(key).map_or(0, |l| l.running)
    }

    pub fn started(&mut self, key: &LaneKey) {
        self.lanes.entry(key.clone()).or_default().running += 1;
    }

    pub fn stopped(&mut self, key: &LaneKey) {
        if let Some(lane) = self.lanes.get_mut(key) {
            lane.running = lane.running.saturating_sub(1);
        }
        self.tidy(key);
    }

    fn tidy(&mut self, key: &LaneKey) {
        if self.lanes.get(key).is_some_and(|l| l.running == 0 && l.queue.is_empty()) {
            self.lanes.remove(key);
        }
    }

    /// Removes and returns the best queued task among lanes that `may_start` allows: it
    /// is given the lane key and how many of the lane's tasks run, and answers `None`
    /// (refused) or the load of the lane's owner (its session's running tasks). Best is
    /// the highest priority, then the least loaded owner (so sessions share the slots
    /// rather than the oldest backlog taking them all), then the oldest task.
    pub fn pop_best(&mut self, mut may_start: impl FnMut(&LaneKey, u32) -> Option<u32>) -> Option<(LaneKey, TaskId)> {
        let mut best: Option<(&LaneKey, Rank)> = None;
        for (key, lane) in &self.lanes {
            let Some(&(prio, id)) = lane.queue.first() else { continue };
            // No owner can beat the best one found with a lower priority.
            if best.as_ref().is_some_and(|(_, (p, _, _))| *p < prio) {
                continue;
            }
            let Some(load) = may_start(key, lane.running) else { continue };
            let rank = (prio, load, id);
            if best.as_ref().is_none_or(|(_, b)| rank < *b) {
                best = Some((key, rank));
            }
        }
        let (key, (prio, _, id)) = best.map(|(k, r)| (k.clone(), r))?;
        if let Some(lane) = self.lanes.get_mut(&key) {
            lane.queue.remove(&(prio, id));
        }
        // Usually `started` follows at once; a task that completes before it starts (an
        // upload that cannot be sent again) must not leave an empty lane behind, which
        // would keep the daemon from ever being idle.
        self.tidy(&key);
        Some((key, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: i64, h: &str) -> LaneKey {
        (s, h.to_owned())
    }

    #[test]
    fn priority_then_age_across_lanes() {
        let mut l = Lanes::default();
        l.push(&key(1, "a"), 0.5, 10);
        l.push(&key(1, "a"), 0.5, 11);
        l.push(&key(1, "b"), 0.9, 12);
        l.push(&key(2, "a"), 0.5, 9);
        let order: Vec<TaskId> = std::iter::from_fn(|| l.pop_best(|_, _| Some(0)).map(|(_, t)| t)).collect();
        assert_eq!(order, vec![12, 9, 10, 11]);
    }

    #[test]
    fn saturated_lanes_are_skipped() {
        let mut l = Lanes::default();
        l.push(&key(1, "a"), 1.0, 1);
        l.push(&key(1, "b"), 0.1, 2);
        l.started(&key(1, "a"));
        let got = l.pop_best(|k, running| (!(k.1 == "a" && running >= 1)).then_some(0));
        assert_eq!(got, Some((key(1, "b"), 2)));
        assert_eq!(l.pop_best(|k, running| (!(k.1 == "a" && running >= 1)).then_some(0)), None);
        l.stopped(&key(1, "a"));
        assert_eq!(l.pop_best(|_, _| Some(0)), Some((key(1, "a"), 1)));
    }

    #[test]
    fn a_task_taken_and_never_started_leaves_no_lane() {
        let mut l = Lanes::default();
        l.push(&key(1, "a"), 0.5, 1);
        assert_eq!(l.pop_best(|_, _| Some(0)), Some((key(1, "a"), 1)));
        assert!(l.is_empty(), "an empty lane with nothing running is gone");
    }

    #[test]
    fn removal() {
        let mut l = Lanes::default();
        l.push(&key(1, "a"), 0.3, 1);
        assert!(l.remove(&key(1, "a"), 0.3, 1));
        assert!(!l.remove(&key(1, "a"), 0.3, 1));
        assert_eq!(l.pop_best(|_, _| Some(0)), None);
    }

    /// At one priority the least loaded owner goes first, whatever the age; priority
    /// still beats load.
    #[test]
    fn owners_share_before_age_decides() {
        let mut l = Lanes::default();
        for t in 1..=3 {
            l.push(&key(1, "a"), 0.5, t);
        }
        l.push(&key(2, "a"), 0.5, 10);
        l.push(&key(3, "a"), 0.9, 20);
        let mut running: HashMap<i64, u32> = HashMap::from([(1, 0), (2, 0), (3, 5)]);
        let mut order = Vec::new();
        while let Some((k, t)) = l.pop_best(|k, _| running.get(&k.0).copied()) {
            *running.entry(k.0).or_default() += 1;
            order.push(t);
        }
        // 20 first (priority, though its owner is the busiest); then 1 (owners tie at 0,
        // the older task); then 10 (its owner runs none), then 1's session's others.
        assert_eq!(order, vec![20, 1, 10, 2, 3]);
    }
}
