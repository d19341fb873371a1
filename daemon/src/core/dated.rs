//! Queued tasks whose `earliest_begin` is still ahead, by date: one timer for all of them,
//! at the first date or the next recheck of the wall clock, whichever is sooner (a timer per
//! task, each rechecking every 15 s, woke a daemon holding 100,000 tasks for tonight
//! 100,000 times every 15 s).

use std::collections::BTreeSet;

use dlsession_proto::{TaskId, UnixMillis};

use super::timers::Mono;

#[derive(Debug, Default)]
pub(super) struct Dated {
    by_date: BTreeSet<(UnixMillis, TaskId)>,
    /// When the one timer is set for.
    pub timer: Option<Mono>,
}

impl Dated {
    pub fn insert(&mut self, at: UnixMillis, task: TaskId) {
        self.by_date.insert((at, task));
    }

    pub fn remove(&mut self, at: UnixMillis, task: TaskId) {
        self.by_date.remove(&(at, task));
    }

    /// The first date.
    pub fn first(&self) -> Option<UnixMillis> {
        self.by_date.first().map(|&(at, _)| at)
    }

    /// Takes the tasks whose date has come by the wall clock's `now`.
    pub fn take_due(&mut self, now: UnixMillis) -> Vec<TaskId> {
        let later = self.by_date.split_off(&(now.saturating_add(1), 0));
        let due = std::mem::replace(&mut self.by_date, later);
        due.into_iter().map(|(_, task)| task).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_is_due_is_taken_in_date_order() {
        let mut d = Dated::default();
        d.insert(300, 1);
        d.insert(100, 2);
        d.insert(200, 3);
        d.insert(100, 4);
        d.remove(200, 3);
        assert_eq!(d.first(), Some(100));
        assert_eq!(d.take_due(99), Vec::<TaskId>::new());
        assert_eq!(d.take_due(250), vec![2, 4]);
        assert_eq!(d.first(), Some(300));
        assert_eq!(d.take_due(u64::MAX), vec![1]);
        assert_eq!(d.first(), None);
    }
}
