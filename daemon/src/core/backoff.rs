//! How long to wait before trying again: pure arithmetic, no clock, no state.
//!
//! Every input may come from outside (a server's `Retry-After`, a failure count that grew
//! for a week), so everything saturates: no delay overflows, none is shorter than our own
//! backoff, none is longer than its cap.

use std::time::Duration;

/// Exponential backoff: `initial`, doubling per consecutive failure, capped at `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay after the `failures`-th consecutive failure (1 for the first), before
    /// jitter: `initial × 2^(failures-1)`, at most `max`.
    pub fn base(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(32);
        self.initial.saturating_mul(1u32 << doublings.min(31)).min(self.max)
    }

    /// [`Backoff::base`] with up to ±1/8 of jitter from `random` (so that many tasks that
    /// failed together do not retry together), never above `max` by more than 1/8.
    pub fn with_jitter(&self, failures: u32, random: u64) -> Duration {
        let base = self.base(failures);
        let eighth = base / 8;
        let span = u64::try_from((eighth * 2).as_millis()).unwrap_or(u64::MAX).saturating_add(1);
        (base - eighth).saturating_add(Duration::from_millis(random % span))
    }
}

/// The wait before a retry: our own backoff, but not before the server's `Retry-After`,
/// which counts only up to `cap` (a server cannot park a task for a year, nor make it
/// retry sooner than we would anyway).
pub fn retry_delay(ours: Duration, server: Option<Duration>, cap: Duration) -> Duration {
    ours.max(server.unwrap_or(Duration::ZERO).min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: Backoff = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(600) };

    #[test]
    fn doubles_up_to_the_cap() {
        let secs: Vec<u64> = (1..=12).map(|n| B.base(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(B.base(0), Duration::from_secs(1));
        assert_eq!(B.base(u32::MAX), Duration::from_secs(600));
        let huge = Backoff { initial: Duration::MAX, max: Duration::MAX };
        assert_eq!(huge.base(40), Duration::MAX);
    }

    proptest! {
        #[test]
        fn delays_are_bounded(failures in any::<u32>(), random in any::<u64>(), server in proptest::option::of(any::<u64>()), cap_s in 1u64..100_000) {
            let cap = Duration::from_secs(cap_s);
            let ours = B.with_jitter(failures, random);
            let base = B.base(failures);
            prop_assert!(ours >= base - base / 8 && ours <= base + base / 8);
            let server = server.map(Duration::from_secs);
            let d = retry_delay(ours, server, cap);
            prop_assert!(d >= ours, "never sooner than our own backoff");
            prop_assert!(d <= ours.max(cap), "never later than the cap");
            if let Some(s) = server {
                prop_assert!(d >= s.min(cap), "the server's wait is honoured up to the cap");
            }
        }
    }
}
