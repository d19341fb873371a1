//! What the daemon tells about itself: transfer statistics (for `status`) and the one-line
//! summary systemd shows (`systemctl --user status dlsessiond`).

use std::time::{Duration, Instant};

use dlsession_proto::{TaskCounts, UnixMillis};

use crate::model::now_ms;

/// At most one `STATUS=` line per second.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(super) struct Stats {
    pub started_at: UnixMillis,
    last_tick: Instant,
    pub bytes_downloaded: u64,
    /// Bytes per second over every running task, as of the last tick.
    pub download_rate: u64,
}

impl Stats {
    pub fn new() -> Stats {
        Stats { started_at: now_ms(), last_tick: Instant::now(), bytes_downloaded: 0, download_rate: 0 }
    }

    /// Seconds since the last tick (at least a millisecond); starts the next interval.
    pub fn tick(&mut self) -> f64 {
        let elapsed = self.last_tick.elapsed().as_secs_f64().max(0.001);
        self.last_tick = Instant::now();
        elapsed
    }

    /// Ticks start again (something runs after a quiet spell).
    pub fn restart_ticks(&mut self) {
        self.last_tick = Instant::now();
    }
}

/// systemd's watchdog (`WatchdogSec=`): pinged from the core loop every half period, so
/// a wedged core is restarted. While the daemon is idle (nothing running, no client, no
/// work timer) the period is stretched to the longest `WATCHDOG_USEC` can say (about 71
/// minutes): an idle daemon is not woken every few seconds only to say it lives.
#[derive(Debug)]
pub(super) struct Watchdog {
    every: Duration,
    ping: tokio::time::Interval,
    idle: bool,
}

/// The watchdog period while idle: `WATCHDOG_USEC` is a 32-bit count of microseconds.
const IDLE_WATCHDOG: Duration = Duration::from_micros(u32::MAX as u64);

impl Watchdog {
    pub fn from_env() -> Option<Watchdog> {
        sd_notify::watchdog_enabled().map(|every| Watchdog { every, ping: pinger(every), idle: false })
    }

    /// Follows whether the daemon is busy: the period systemd expects changes with it.
    pub fn follow(&mut self, busy: bool) {
        if busy != self.idle {
            return;
        }
        self.idle = !busy;
        let period = if busy { self.every } else { IDLE_WATCHDOG.max(self.every) };
        let usec = u32::try_from(period.as_micros()).unwrap_or(u32::MAX);
        let _ = sd_notify::notify(&[sd_notify::NotifyState::WatchdogUsec(usec), sd_notify::NotifyState::Watchdog]);
        self.ping = pinger(period);
    }

    /// Waits for the next ping, then sends it.
    pub async fn ping(&mut self) {
        self.ping.tick().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
    }
}

/// Ticks every half `period`, the first half a period from now (a ping was just sent, or
/// the service just started).
fn pinger(period: Duration) -> tokio::time::Interval {
    let half = period / 2;
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + half, half);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// Systemd status reporting: present when `NOTIFY_SOCKET` is set.
#[derive(Debug, Default)]
pub(super) struct StatusReport {
    last: String,
    sent_at: Option<Instant>,
    /// A line waits for the throttle's timer.
    pending: bool,
}

impl StatusReport {
    pub fn from_env() -> Option<StatusReport> {
        std::env::var_os("NOTIFY_SOCKET").map(|_| StatusReport::default())
    }

    /// Sends `line` if it is new and the last one is old enough. Otherwise, if it is new,
    /// returns how long to wait before offering it again (set a timer, then call
    /// [`StatusReport::timer_fired`]).
    pub fn offer(&mut self, line: String) -> Option<Duration> {
        if line == self.last || self.pending {
            return None;
        }
        match self.sent_at.map(|t| t.elapsed()) {
            Some(since) if since < STATUS_INTERVAL => {
                self.pending = true;
                Some(STATUS_INTERVAL - since)
            }
            _ => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
                self.last = line;
                self.sent_at = Some(Instant::now());
                None
            }
        }
    }

    pub fn timer_fired(&mut self) {
        self.pending = false;
    }
}

/// The summary line: what runs and waits, or that the daemon is idle.
pub(super) fn status_line(c: TaskCounts, sessions: usize, clients: usize) -> String {
    if c.active() == 0 {
        format!("idle; {} suspended, {sessions} sessions, {clients} clients", c.suspended)
    } else {
        format!(
            "{} running, {} queued, {} waiting; {sessions} sessions, {clients} clients",
            c.running, c.queued, c.waiting
        )
    }
}
