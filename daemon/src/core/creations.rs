//! Creation keys (`Request::Once`): which tasks a request sent under a key created, kept a
//! day (at most `CREATIONS_MOST` keys), so the same request sent again after its answer
//! was lost is answered with the same ids instead of creating the tasks twice.
//!
//! Invariant: a key is here only once its tasks exist in memory, and its row is in the
//! same commit as theirs (an answer from here waits for the commits on their way).

use std::collections::{HashMap, VecDeque};

use dlsession_proto::{TaskId, UnixMillis};

use crate::model::{CREATION_KEPT_MS, CREATIONS_MOST, Creation, SessionKey};

#[derive(Debug, Default)]
pub(super) struct Creations {
    by_key: HashMap<(SessionKey, u128), (TaskId, u64)>,
    /// Oldest first, for forgetting.
    order: VecDeque<(UnixMillis, SessionKey, u128)>,
}

impl Creations {
    /// The ids `key` created in `session`, if it did (and is still remembered).
    pub fn get(&self, session: SessionKey, key: u128) -> Option<Vec<TaskId>> {
        let (first, count) = *self.by_key.get(&(session, key))?;
        Some((first..first.saturating_add(count)).collect())
    }

    /// Remembers `c`, forgetting keys older than a day (as of `c`) and the oldest past `CREATIONS_MOST`.
    pub fn add(&mut self, c: Creation) {
        let before = c.created_at.saturating_sub(CREATION_KEPT_MS);
        while let Some(&(at, session, key)) = self.order.front()
            && (at < before || self.order.len() >= CREATIONS_MOST)
        {
            self.order.pop_front();
            self.by_key.remove(&(session, key));
        }
        if self.by_key.insert((c.session, c.key), (c.first, c.count)).is_none() {
            self.order.push_back((c.created_at, c.session, c.key));
        }
    }
}

/// The record of `ids` created under `key` (ids a request allocates one after another;
/// `None` if these are not, which no request makes).
pub(super) fn record(session: SessionKey, key: u128, ids: &[TaskId], now: UnixMillis) -> Option<Creation> {
    let first = *ids.first()?;
    let consecutive =
        ids.iter().enumerate().all(|(i, id)| u64::try_from(i).is_ok_and(|i| first.checked_add(i) == Some(*id)));
    consecutive.then_some(Creation { session, key, first, count: ids.len() as u64, created_at: now })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_answer_their_ids_for_a_day() {
        let mut c = Creations::default();
        c.add(record(1, 7, &[10, 11, 12], 1_000).unwrap());
        assert_eq!(c.get(1, 7), Some(vec![10, 11, 12]));
        assert_eq!(c.get(2, 7), None, "keys are per session");
        c.add(record(1, 8, &[13], 1_000 + CREATION_KEPT_MS).unwrap());
        assert_eq!(c.get(1, 7), Some(vec![10, 11, 12]), "a day old is still kept");
        c.add(record(1, 9, &[14], 1_001 + CREATION_KEPT_MS).unwrap());
        assert_eq!(c.get(1, 7), None, "older than a day is forgotten");
        assert_eq!(c.get(1, 8), Some(vec![13]));
    }

    #[test]
    fn only_consecutive_ids_are_recorded() {
        assert!(record(1, 1, &[3, 5], 0).is_none());
        assert!(record(1, 1, &[], 0).is_none());
        assert_eq!(record(1, 1, &[4], 0).map(|c| (c.first, c.count)), Some((4, 1)));
    }

    #[test]
    fn memory_is_bounded() {
        let mut c = Creations::default();
        for key in 0..(CREATIONS_MOST as u128 + 10) {
            c.add(record(1, key, &[1], 5).unwrap());
        }
        assert!(c.by_key.len() <= CREATIONS_MOST && c.order.len() == c.by_key.len());
        assert_eq!(c.get(1, 0), None, "the oldest went first");
        assert!(c.get(1, CREATIONS_MOST as u128 + 9).is_some());
    }
}
