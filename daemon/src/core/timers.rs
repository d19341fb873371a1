//! The core's timers, on the monotonic clock.
//!
//! Every delay the daemon waits (a retry's backoff, a wake's backoff, a status update, the
//! shutdown grace) is measured on the monotonic clock, so setting the wall clock (NTP after
//! a suspend, a user fixing the time zone) neither fires them all at once nor delays them by
//! hours. Wall-clock times are kept only for display (`retry_at`, `next_wake`) and for what
//! is a date by nature (`earliest_begin`, checked against the wall clock when it fires).

use std::collections::BTreeSet;
use std::time::Duration;

use dlsession_proto::{TaskId, UnixMillis};
use tokio::time::Instant;

use crate::model::{SessionKey, now_ms};

/// Milliseconds on the core's monotonic clock (since the core started).
pub type Mono = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    Begin(TaskId),
    Retry(TaskId),
    Wake(SessionKey),
    /// A `wake` went to a running app that has not rejoined the session since: relaunch.
    WakeUnanswered(SessionKey),
    /// A relaunched app has neither attached nor exited in `wake_answer`: its launch slot
    /// goes to the next session in line.
    LaunchSlot(SessionKey),
    ShutdownDeadline,
    /// A throttled `STATUS=` update to systemd.
    Status,
    /// Expiring what nobody collects (see `retention`); days away, and redone at start.
    Housekeeping,
    /// A task its policy holds off the lanes reaches its resource deadline.
    HeldDeadline(TaskId),
}

/// The longest the core sleeps at once: a timer further away is looked at again then.
/// (Far-away deadlines come from clients and servers; they must never overflow.)
const MAX_SLEEP: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug)]
pub struct Timers {
    base: Instant,
    set: BTreeSet<(Mono, Timer)>,
}

impl Timers {
    pub fn new() -> Timers {
        Timers { base: Instant::now(), set: BTreeSet::new() }
    }

    pub fn now(&self) -> Mono {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// `d` from now (saturating: a delay of centuries is simply never).
    pub fn after(&self, d: Duration) -> Mono {
        self.now().saturating_add(millis(d))
    }

    /// The monotonic time as far from now as the wall-clock time `wall` is.
    pub fn at_wall(&self, wall: UnixMillis) -> Mono {
        self.now().saturating_add(wall.saturating_sub(now_ms()))
    }

    pub fn set(&mut self, at: Mono, timer: Timer) {
        self.set.insert((at, timer));
    }

    pub fn clear(&mut self, at: Option<Mono>, timer: Timer) {
        if let Some(at) = at {
            self.set.remove(&(at, timer));
        }
    }

    /// Takes the next timer that is due, if any.
    pub fn pop_due(&mut self) -> Option<Timer> {
        let now = self.now();
        let &(at, timer) = self.set.first()?;
        if at > now {
            return None;
        }
        self.set.remove(&(at, timer));
        Some(timer)
    }

    /// Only timers that do not keep the daemon busy are set: the systemd status update,
    /// and housekeeping (a restart does it anyway).
    pub fn only_idle(&self) -> bool {
        self.set.iter().all(|(_, t)| matches!(t, Timer::Status | Timer::Housekeeping))
    }

    /// Sleeps until the first timer is due (forever if there is none).
    pub async fn sleep(&self) {
        let Some(&(at, _)) = self.set.first() else { return std::future::pending().await };
        let wait = Duration::from_millis(at.saturating_sub(self.now())).min(MAX_SLEEP);
        tokio::time::sleep(wait).await;
    }
}

/// A duration in whole milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The wall-clock time `d` from now (for display and for the database), saturating.
pub fn wall_after(d: Duration) -> UnixMillis {
    now_ms().saturating_add(millis(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn timers_fire_in_order_on_the_monotonic_clock() {
        let mut t = Timers::new();
        t.set(t.after(Duration::from_secs(5)), Timer::Retry(2));
        t.set(t.after(Duration::from_secs(1)), Timer::Retry(1));
        t.set(t.after(Duration::MAX), Timer::Wake(7));
        assert_eq!(t.pop_due(), None);
        t.sleep().await;
        assert_eq!(t.pop_due(), Some(Timer::Retry(1)));
        assert_eq!(t.pop_due(), None);
        t.sleep().await;
        assert_eq!(t.pop_due(), Some(Timer::Retry(2)));
        // A timer at the end of time sleeps a day at a time and never overflows.
        let before = t.now();
        t.sleep().await;
        assert_eq!(t.now() - before, millis(MAX_SLEEP));
        assert_eq!(t.pop_due(), None);
    }

    #[test]
    fn wall_times_never_overflow() {
        let t = Timers::new();
        assert_eq!(t.at_wall(u64::MAX), t.now().saturating_add(u64::MAX - now_ms()));
        assert_eq!(t.at_wall(0), t.now(), "a past date is now");
        assert_eq!(wall_after(Duration::MAX), u64::MAX);
        assert_eq!(t.after(Duration::MAX), u64::MAX);
    }
}
