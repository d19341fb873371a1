//! Containing a panic (a bug) where the thread it kills holds work others wait for: the
//! daemon's threads that must not end silently catch it, log it and say so, so a request
//! is answered or the daemon stops instead of waiting for ever.

/// The text of a panic payload.
pub fn message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic".into()
    }
}

/// Runs `f`; a panic is logged with `what` and returned as its text.
pub fn contained<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let text = message(panic.as_ref());
        tracing::error!(panic = %text, "{what} panicked");
        text
    })
}
