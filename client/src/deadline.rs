//! Deadlines from timeouts an app chose: `Duration::MAX` means "no timeout", and adding it
//! to now would panic.

use std::time::{Duration, Instant};

/// `after` from now, or a century from now if that is past what an `Instant` holds.
pub(crate) fn after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after).unwrap_or_else(|| now + CENTURY)
}

/// The same as a tokio instant.
pub(crate) fn after_tokio(after: Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(self::after(after))
}

const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);

#[cfg(test)]
mod tests {
    #[test]
    fn no_timeout_is_far_away_not_a_panic() {
        let far = super::after(std::time::Duration::MAX);
        assert!(far > std::time::Instant::now() + std::time::Duration::from_secs(1 << 30));
        let _ = super::after_tokio(std::time::Duration::MAX);
    }
}
