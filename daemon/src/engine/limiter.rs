//! A token bucket shared by the downloads of one session (its bandwidth limit).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    rate: u64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// `rate` bytes per second, with a burst of a quarter second (at least 16 KiB).
    pub fn new(rate: u64) -> RateLimiter {
        RateLimiter { rate: rate.max(1), state: Mutex::new(Bucket { tokens: 0.0, last: Instant::now() }) }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn burst(&self) -> f64 {
        (self.rate as f64 / 4.0).max(16384.0)
    }

    /// Takes `n` bytes' worth of tokens, sleeping as long as needed. Never holds the lock
    /// across the sleep; a chunk larger than the burst simply runs the bucket negative.
    pub async fn acquire(&self, n: usize) {
        let wait = {
            let Ok(mut b) = self.state.lock() else { return };
            let now = Instant::now();
            let refill = now.duration_since(b.last).as_secs_f64() * self.rate as f64;
            b.tokens = (b.tokens + refill).min(self.burst());
            b.last = now;
            b.tokens -= n as f64;
            if b.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::try_from_secs_f64(-b.tokens / self.rate as f64).unwrap_or(Duration::from_secs(1))
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_to_the_rate() {
        let limiter = RateLimiter::new(100_000);
        let start = tokio::time::Instant::now();
        for _ in 0..50 {
            limiter.acquire(10_000).await;
        }
        // 500 kB at 100 kB/s: about 5 s (minus the initial burst allowance).
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(4500), "{took:?}");
        assert!(took <= Duration::from_millis(5100), "{took:?}");
    }
}
