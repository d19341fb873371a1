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
