//! Waiting in tests: for a condition (polled), or for a future from synchronous code.

use std::time::{Duration, Instant};

/// How long a test waits for something that should happen "soon" before it fails.
pub const LONG: Duration = Duration::from_secs(60);

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` every 20 ms until it is true (at most [`LONG`]), without blocking the runtime.
pub async fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LONG;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "condition not reached within {LONG:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a future to completion from synchronous code inside a multi-thread test runtime.
pub fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
