//! Token buckets for bandwidth limits: one daemon-wide, one per session, one per task. A
//! download takes its bytes from each bucket it is under; a rate changes while downloads
//! run (`set_rate`), and 0 means no limit.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; 0: unlimited.
    rate: AtomicU64,
    state: Mutex<Bucket>,
}

/// A virtual schedule (GCRA): every chunk reserves its time in arrival order, so the
/// downloads under one bucket take turns instead of one starving the others.
#[derive(Debug)]
struct Bucket {
    /// When everything reserved so far will have been paid for.
    paid_until: Instant,
    /// Bumped by a rate change: chunks waiting reserve again at the new rate.
    generation: u64,
}

/// The longest a chunk waits before it looks at the rate again (a limit lifted or raised
/// takes effect within this).
const LONGEST_WAIT: Duration = Duration::from_millis(250);

impl RateLimiter {
    /// `rate` bytes per second (`None`: unlimited), with a burst of a quarter second (at
    /// least 16 KiB).
    pub fn new(rate: Option<u64>) -> RateLimiter {
        RateLimiter {
            rate: AtomicU64::new(rate.unwrap_or(0)),
            state: Mutex::new(Bucket { paid_until: Instant::now(), generation: 0 }),
        }
    }

    /// The rate, if limited.
    pub fn rate(&self) -> Option<u64> {
        Some(self.rate.load(Ordering::Relaxed)).filter(|r| *r > 0)
    }

    /// Changes the rate for every download under this bucket, at once: what was reserved
    /// at the old rate is forgotten, and waiting chunks reserve again. The same rate again
    /// changes nothing (forgetting would hand out a fresh burst each time it is set).
    pub fn set_rate(&self, rate: Option<u64>) {
        let rate = rate.unwrap_or(0);
        if self.rate.swap(rate, Ordering::Relaxed) == rate {
            return;
        }
        if let Ok(mut b) = self.state.lock() {
            b.generation = b.generation.wrapping_add(1);
            b.paid_until = Instant::now();
        }
    }

    /// Takes `n` bytes' worth of the rate, sleeping until their turn. Never holds the lock
    /// across the sleep.
    pub async fn acquire(&self, n: usize) {
        loop {
            let rate = self.rate.load(Ordering::Relaxed);
            if rate == 0 {
                return;
            }
            let (turn, generation) = {
                let Ok(mut b) = self.state.lock() else { return };
                let now = Instant::now();
                let burst = Duration::from_secs_f64((rate as f64 / 4.0).max(16384.0) / rate as f64);
                let cost = Duration::try_from_secs_f64(n as f64 / rate as f64).unwrap_or(LONGEST_WAIT);
                b.paid_until = b.paid_until.max(now) + cost;
                // Up to a burst's worth may run ahead of the schedule.
                (b.paid_until.checked_sub(burst).unwrap_or(now), b.generation)
            };
            loop {
                let now = Instant::now();
                if now >= turn || self.rate.load(Ordering::Relaxed) == 0 {
                    return;
                }
                tokio::time::sleep((turn - now).min(LONGEST_WAIT)).await;
                let changed = self.state.lock().map(|b| b.generation != generation).unwrap_or(false);
                if changed {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_to_the_rate() {
        let limiter = RateLimiter::new(Some(100_000));
        let start = tokio::time::Instant::now();
        for _ in 0..50 {
            limiter.acquire(10_000).await;
        }
        // 500 kB at 100 kB/s: about 5 s (minus the initial burst allowance).
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(4500), "{took:?}");
        assert!(took <= Duration::from_millis(5100), "{took:?}");
    }

    /// A script setting the same limit every second does not lift it.
    #[tokio::test(start_paused = true)]
    async fn the_same_rate_set_again_gives_no_fresh_burst() {
        let limiter = RateLimiter::new(Some(16_384));
        let start = tokio::time::Instant::now();
        let nag = async {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                limiter.set_rate(Some(16_384));
            }
        };
        let go = async {
            for _ in 0..10 {
                limiter.acquire(16_384).await;
            }
            start.elapsed()
        };
        let (took, ()) = tokio::join!(go, nag);
        // 160 KiB at 16 KiB/s: about 9 s, the first burst aside.
        assert!(took >= Duration::from_secs(8), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_rate_applies_to_a_waiting_chunk() {
        let limiter = RateLimiter::new(Some(16_384));
        // 1 MiB at 16 KiB/s would take a minute; lifted after a second, it goes on at once.
        let start = tokio::time::Instant::now();
        let lift = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            limiter.set_rate(None);
        };
        tokio::join!(limiter.acquire(1 << 20), lift);
        assert!(start.elapsed() < Duration::from_millis(1300), "{:?}", start.elapsed());
        assert_eq!(limiter.rate(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn downloads_under_one_bucket_take_turns() {
        let limiter = std::sync::Arc::new(RateLimiter::new(Some(100_000)));
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        let run = |l: std::sync::Arc<RateLimiter>| async move {
            let mut got = 0u64;
            while tokio::time::Instant::now() < until {
                l.acquire(16_384).await;
                got += 16_384;
            }
            got
        };
        let (a, b) = tokio::join!(run(limiter.clone()), run(limiter.clone()));
        let total = (a + b) as f64;
        assert!((950_000.0..1_100_000.0).contains(&total), "10 s at 100 kB/s together: {a} + {b}");
        assert!(a.abs_diff(b) as f64 <= 0.1 * total, "shared evenly: {a} and {b}");
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let limiter = RateLimiter::new(None);
        let start = tokio::time::Instant::now();
        limiter.acquire(100 << 20).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
