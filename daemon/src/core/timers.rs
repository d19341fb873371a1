//! The core's timers, on the monotonic clock, counting the time the machine slept.
//!
//! Every delay the daemon waits (a retry's backoff, a wake's backoff, a status update, the
//! shutdown grace) is measured on the monotonic clock, so setting the wall clock (NTP after
//! a suspend, a user fixing the time zone) neither fires them all at once nor delays them by
//! hours. Time asleep counts (as `CLOCK_BOOTTIME` counts it): a one-hour deadline that a
//! ten-hour suspend passed is due at the resume, not nine hours later. The core sleeps at
//! most `AWAKE_CHECK` at a time while a timer other than an idle one is set, so such a timer
//! fires within that of a resume even if nothing else wakes the core. Wall-clock times are
//! kept only for display (`retry_at`, `next_wake`) and for what is a date by nature
//! (`earliest_begin`, checked against the wall clock when it fires).

use std::collections::BTreeSet;
use std::time::Duration;

use dlsession_proto::{TaskId, UnixMillis};
use tokio::time::Instant;

use crate::model::{SessionKey, now_ms};

/// Milliseconds on the core's monotonic clock (since the core started).
pub type Mono = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// The first `earliest_begin` of a queued task, or the next look at the wall clock.
    Dated,
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

/// The longest the core sleeps at once while a timer that keeps it busy is set: after a
/// resume (when the monotonic sleep resumes where it stopped) such a timer is looked at
/// within this. Idle timers (status, housekeeping) are not: an idle daemon stays asleep.
const AWAKE_CHECK: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Timers {
    base: Instant,
    /// How long the machine had slept when the core started (see `asleep_ms`).
    asleep_at_base: u64,
    /// Where the time asleep is read (a stand-in in tests).
    asleep: fn() -> u64,
    /// The latest `now`: the time asleep is a difference of two clocks read one after the
    /// other, which may come out a millisecond short; `now` never goes back.
    latest: std::sync::atomic::AtomicU64,
    set: BTreeSet<(Mono, Timer)>,
}

/// How long the machine has slept since it booted, in milliseconds: the boot-time clock,
/// which counts suspend, less the monotonic one, which does not.
fn asleep_ms() -> u64 {
    let ms = |t: rustix::time::Timespec| {
        u64::try_from(t.tv_sec).unwrap_or(0).saturating_mul(1000) + u64::try_from(t.tv_nsec / 1_000_000).unwrap_or(0)
    };
    let boot = ms(rustix::time::clock_gettime(rustix::time::ClockId::Boottime));
    boot.saturating_sub(ms(rustix::time::clock_gettime(rustix::time::ClockId::Monotonic)))
}

impl Timers {
    pub fn new() -> Timers {
        Timers::with_asleep(asleep_ms)
    }

    fn with_asleep(asleep: fn() -> u64) -> Timers {
        Timers {
            base: Instant::now(),
            asleep_at_base: asleep(),
            asleep,
            latest: Default::default(),
            set: BTreeSet::new(),
        }
    }

    pub fn now(&self) -> Mono {
        let awake = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        let now = awake.saturating_add((self.asleep)().saturating_sub(self.asleep_at_base));
        // One thread (the core's) asks: relaxed is enough.
        self.latest.fetch_max(now, std::sync::atomic::Ordering::Relaxed).max(now)
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
        let most = if self.only_idle() { MAX_SLEEP } else { AWAKE_CHECK };
        let wait = Duration::from_millis(at.saturating_sub(self.now())).min(most);
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
        // A timer at the end of time is looked at again a minute at a time (a day at a
        // time if only idle timers are set), and never overflows.
        let before = t.now();
        t.sleep().await;
        assert_eq!(t.now() - before, millis(AWAKE_CHECK));
        assert_eq!(t.pop_due(), None);
        let mut idle = Timers::new();
        idle.set(idle.after(Duration::MAX), Timer::Housekeeping);
        let before = idle.now();
        idle.sleep().await;
        assert_eq!(idle.now() - before, millis(MAX_SLEEP));
    }

    /// The time the machine slept counts: a deadline a suspend passed is due at once.
    #[tokio::test(start_paused = true)]
    async fn time_asleep_counts() {
        static ASLEEP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut t = Timers::with_asleep(|| ASLEEP.load(std::sync::atomic::Ordering::Relaxed));
        t.set(t.after(Duration::from_secs(3600)), Timer::HeldDeadline(1));
        assert_eq!(t.pop_due(), None);
        ASLEEP.store(10 * 3600 * 1000, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(t.pop_due(), Some(Timer::HeldDeadline(1)), "ten hours asleep passed the hour");
    }

    #[test]
    fn the_machine_has_slept_no_negative_time() {
        let (a, b) = (asleep_ms(), asleep_ms());
        assert!(b >= a.saturating_sub(1), "{a} then {b}");
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
