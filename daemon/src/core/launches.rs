//! Relaunch slots: at most `max_concurrent_launches` apps are being relaunched at once,
//! and the sessions beyond wait their turn in order (docs/behaviour.md, "Wake and
//! relaunch"). A slot is held from the launch until the app attaches, its process exits,
//! or `wake_answer_ms` passes, whichever comes first.
//!
//! Invariants kept here: a session holds at most one slot and waits at most once, never
//! both; `holders.len() <= cap`.

use std::collections::{HashSet, VecDeque};

use dlsession_proto::WakeReason;

use crate::model::SessionKey;

#[derive(Debug)]
pub(super) struct Launches {
    cap: usize,
    holders: HashSet<SessionKey>,
    waiting: VecDeque<(SessionKey, WakeReason)>,
}

impl Launches {
    pub fn new(cap: u32) -> Launches {
        Launches { cap: (cap as usize).max(1), holders: HashSet::new(), waiting: VecDeque::new() }
    }

    /// Takes a slot for `key` if one is free (true), or puts it in line (false). A session
    /// that already holds one or waits is not counted twice.
    pub fn take_or_wait(&mut self, key: SessionKey, reason: WakeReason) -> bool {
        if self.holders.contains(&key) {
            return true;
        }
        if self.holders.len() < self.cap && self.waiting.is_empty() {
            self.holders.insert(key);
            return true;
        }
        if !self.waiting.iter().any(|(k, _)| *k == key) {
            self.waiting.push_back((key, reason));
        }
        false
    }

    /// `key`'s launch is over (attached, exited, timed out, failed): its slot is free.
    /// True if it held one.
    pub fn release(&mut self, key: SessionKey) -> bool {
        self.holders.remove(&key)
    }

    /// A session that no longer exists leaves the line too.
    pub fn forget(&mut self, key: SessionKey) {
        self.holders.remove(&key);
        self.waiting.retain(|(k, _)| *k != key);
    }

    /// The next session in line, given the slot just freed (if one is free).
    pub fn next(&mut self) -> Option<(SessionKey, WakeReason)> {
        if self.holders.len() >= self.cap {
            return None;
        }
        let (key, reason) = self.waiting.pop_front()?;
        self.holders.insert(key);
        Some((key, reason))
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn holds(&self, key: SessionKey) -> bool {
        self.holders.contains(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_in_order_and_never_beyond_the_cap() {
        let mut l = Launches::new(2);
        let r = WakeReason::FinishedEvents;
        assert!(l.take_or_wait(1, r) && l.take_or_wait(2, r));
        assert!(l.take_or_wait(1, r), "a holder is not counted twice");
        assert!(!l.take_or_wait(3, r) && !l.take_or_wait(4, r) && !l.take_or_wait(3, r));
        assert_eq!(l.waiting(), 2, "a waiting session waits once");
        assert_eq!(l.next(), None, "no free slot");
        assert!(l.release(1) && !l.release(1));
        // A newcomer does not overtake the line.
        assert!(!l.take_or_wait(5, r));
        assert_eq!(l.next(), Some((3, r)));
        assert_eq!(l.next(), None);
        l.forget(4);
        assert!(l.release(2));
        assert_eq!(l.next(), Some((5, r)));
        assert!(l.holds(3) && l.holds(5) && !l.holds(4));
    }
}
