//! Failpoints for crash tests: `DLSESSIOND_FAILPOINT=NAME` (or `NAME:N` for the Nth time
//! it is reached) makes the daemon abort at that point, as a power cut or `kill -9`
//! would stop it. Unset, a failpoint costs one relaxed atomic load.
//!
//! | name | where |
//! |---|---|
//! | `checkpoint-after-sync` | the writer has `fdatasync`ed a checkpoint, the offset is not reported yet |
//! | `checkpoint-after-commit` | the store committed a batch holding a checkpoint |
//! | `finish-before-move` | the finishing phase is committed, the file not moved yet |
//! | `finish-after-move` | the file is moved and its directory synced, `completed` not committed yet |

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

pub const ENV: &str = "DLSESSIOND_FAILPOINT";

struct Armed {
    name: String,
    nth: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok().filter(|s| !s.is_empty())?;
            let (name, nth) = match spec.split_once(':') {
                Some((n, k)) => (n.to_owned(), k.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some(Armed { name, nth, hits: AtomicU64::new(0) })
        })
        .as_ref()
}

/// Aborts the process if `name` is the armed failpoint and this is its Nth hit.
pub fn hit(name: &str) {
    let Some(a) = armed() else { return };
    if a.name == name && a.hits.fetch_add(1, Ordering::Relaxed) + 1 == a.nth {
        eprintln!("dlsessiond: failpoint {name} reached; aborting");
        std::process::abort();
    }
}
