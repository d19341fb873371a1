//! Relaunch slots: at most `max_concurrent_launches` apps are being relaunched at once,
//! and the sessions beyond wait their turn in order (docs/behaviour.md, "Wake and
//! relaunch"). A slot is held from the launch until the app attaches, its process fails
//! (or ends once nothing waits for the app), or `wake_answer_ms` passes, whichever comes
//! first.
//!
//! Every launch that takes a slot gets a number of its own, and the end of a launch frees
//! the slot only if that launch still holds it: a process relaunched long ago (its slot
//! given on when `wake_answer_ms` passed) that exits now must not free the slot of the
//! session's newer launch, or more than the cap would start at once.
//!
//! Invariants kept here: a session holds at most one slot and waits at most once, never
//! both; `holders.len() <= cap`.

use std::collections::{HashMap, VecDeque};

use dlsession_proto::WakeReason;

use crate::model::SessionKey;

#[derive(Debug)]
pub(super) struct Launches {
    cap: usize,
    /// Each holder with the number of the launch that holds its slot.
    holders: HashMap<SessionKey, LaunchNo>,
    waiting: VecDeque<(SessionKey, WakeReason)>,
    last: LaunchNo,
}

/// Numbers a session's launches (daemon-wide, from 1).
pub(super) type LaunchNo = u64;

impl Launches {
    pub fn new(cap: u32) -> Launches {
        Launches { cap: (cap as usize).max(1), holders: HashMap::new(), waiting: VecDeque::new(), last: 0 }
    }

    fn hold(&mut self, key: SessionKey) -> LaunchNo {
        self.last += 1;
        self.holders.insert(key, self.last);
        self.last
    }

    /// Takes a slot for `key` if one is free (the new launch's number), or puts it in line
    /// (`None`). A session that already holds one or waits is not counted twice; one that
    /// holds a slot keeps it for its new launch (the older launch's end no longer frees it).
    pub fn take_or_wait(&mut self, key: SessionKey, reason: WakeReason) -> Option<LaunchNo> {
        if self.holders.contains_key(&key) || (self.holders.len() < self.cap && self.waiting.is_empty()) {
            return Some(self.hold(key));
        }
        if !self.waiting.iter().any(|(k, _)| *k == key) {
            self.waiting.push_back((key, reason));
        }
        None
    }

    /// `key`'s launch is over (attached, timed out, forgotten: `launch` is `None`; or launch
    /// number `launch` exited or failed): its slot is free. True if it held one.
    pub fn release(&mut self, key: SessionKey, launch: Option<LaunchNo>) -> bool {
        match (self.holders.get(&key), launch) {
            (Some(held), Some(ended)) if *held != ended => false,
            (Some(_), _) => self.holders.remove(&key).is_some(),
            (None, _) => false,
        }
    }

    /// A session that no longer exists leaves the line too.
    pub fn forget(&mut self, key: SessionKey) {
        self.holders.remove(&key);
        self.waiting.retain(|(k, _)| *k != key);
    }

    /// The next session in line, given the slot just freed (if one is free), with its
    /// launch's number.
    pub fn next(&mut self) -> Option<(SessionKey, WakeReason, LaunchNo)> {
        if self.holders.len() >= self.cap {
            return None;
        }
        let (key, reason) = self.waiting.pop_front()?;
        Some((key, reason, self.hold(key)))
    }

    /// The daemon stops: nothing waiting will be launched; the sessions that waited.
    pub fn give_up_waiting(&mut self) -> Vec<SessionKey> {
        self.waiting.drain(..).map(|(key, _)| key).collect()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn holds(&self, key: SessionKey) -> bool {
        self.holders.contains_key(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_in_order_and_never_beyond_the_cap() {
        let mut l = Launches::new(2);
        let r = WakeReason::FinishedEvents;
        assert!(l.take_or_wait(1, r).is_some() && l.take_or_wait(2, r).is_some());
        assert!(l.take_or_wait(1, r).is_some(), "a holder is not counted twice");
        assert!(l.take_or_wait(3, r).is_none() && l.take_or_wait(4, r).is_none() && l.take_or_wait(3, r).is_none());
        assert_eq!(l.waiting(), 2, "a waiting session waits once");
        assert_eq!(l.next(), None, "no free slot");
        assert!(l.release(1, None) && !l.release(1, None));
        // A newcomer does not overtake the line.
        assert!(l.take_or_wait(5, r).is_none());
        assert!(matches!(l.next(), Some((3, _, _))));
        assert_eq!(l.next(), None);
        l.forget(4);
        assert!(l.release(2, None));
        assert!(matches!(l.next(), Some((5, _, _))));
        assert!(l.holds(3) && l.holds(5) && !l.holds(4));
    }

    #[test]
    fn an_older_launch_ending_does_not_free_a_newer_launchs_slot() {
        let mut l = Launches::new(1);
        let r = WakeReason::FinishedEvents;
        let first = l.take_or_wait(1, r).unwrap();
        // Its app did not attach in time: the slot went on, and the session launched again.
        assert!(l.release(1, None));
        let second = l.take_or_wait(1, r).unwrap();
        assert_ne!(first, second);
        assert!(l.take_or_wait(2, r).is_none(), "the one slot is taken");
        // The first process exits now.
        assert!(!l.release(1, Some(first)), "a stale launch frees nothing");
        assert_eq!(l.next(), None, "the cap still holds");
        // Launching again while holding the slot renumbers it.
        let third = l.take_or_wait(1, r).unwrap();
        assert!(!l.release(1, Some(second)) && l.holds(1));
        assert!(l.release(1, Some(third)));
        assert!(matches!(l.next(), Some((2, _, _))));
    }
}
