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

    /// Removes and returns the best queued task among lanes that `may_start` allows
    /// (given the lane key and how many of its tasks run).
    pub fn pop_best(&mut self, mut may_start: impl FnMut(&LaneKey, u32) -> bool) -> Option<(LaneKey, TaskId)> {
        let mut best: Option<(&LaneKey, Entry)> = None;
        for (key, lane) in &self.lanes {
            let Some(head) = lane.queue.first() else { continue };
            if best.as_ref().is_some_and(|(_, b)| b <= head) {
                continue;
            }
            if may_start(key, lane.running) {
                best = Some((key, *head));
            }
        }
        let (key, entry) = best.map(|(k, e)| (k.clone(), e))?;
        if let Some(lane) = self.lanes.get_mut(&key) {
            lane.queue.remove(&entry);
        }
        Some((key, entry.1))
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
        let order: Vec<TaskId> = std::iter::from_fn(|| l.pop_best(|_, _| true).map(|(_, t)| t)).collect();
        assert_eq!(order, vec![12, 9, 10, 11]);
    }

    #[test]
    fn saturated_lanes_are_skipped() {
        let mut l = Lanes::default();
        l.push(&key(1, "a"), 1.0, 1);
        l.push(&key(1, "b"), 0.1, 2);
        l.started(&key(1, "a"));
        let got = l.pop_best(|k, running| !(k.1 == "a" && running >= 1));
        assert_eq!(got, Some((key(1, "b"), 2)));
        assert_eq!(l.pop_best(|k, running| !(k.1 == "a" && running >= 1)), None);
        l.stopped(&key(1, "a"));
        assert_eq!(l.pop_best(|_, _| true), Some((key(1, "a"), 1)));
    }

    #[test]
    fn removal() {
        let mut l = Lanes::default();
        l.push(&key(1, "a"), 0.3, 1);
        assert!(l.remove(&key(1, "a"), 0.3, 1));
        assert!(!l.remove(&key(1, "a"), 0.3, 1));
        assert_eq!(l.pop_best(|_, _| true), None);
    }
}
