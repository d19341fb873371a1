//! Failpoints for crash tests: `DLSESSIOND_FAILPOINT=NAME` (or `NAME:N` for the Nth time
//! it is reached) makes the daemon abort at that point, as a power cut or `kill -9`
//! would stop it; `NAME:N:sleep-ms=MS` pauses the thread there instead (to hold a step
//! open), `NAME:N:panic` panics there (to prove a bug is contained), and `NAME:N+:…`
//! does it at every hit from the Nth on. Failpoints are
//! reached on blocking threads, except where the table says abort only.
//! Unset, a failpoint costs one relaxed atomic load.
//!
//! | name | where |
//! |---|---|
//! | `checkpoint-after-sync` | the writer has `fdatasync`ed a checkpoint, the offset is not reported yet |
//! | `checkpoint-after-commit` | the store committed a batch holding a checkpoint |
//! | `tasks-before-commit` | the store is about to commit a batch that creates tasks |
//! | `tasks-after-commit` | the store committed a batch that created tasks, their request not answered yet |
//! | `finish-before-move` | the finishing phase is committed, the file not moved yet |
//! | `finish-after-move` | the file is moved and its directory synced, `completed` not committed yet |
//! | `destination-check` | a task-creating request's destinations are about to be checked on disk (off the core thread) |
//! | `restart-after-reset` | a resource that changed is starting over: its reset offset is committed, no new byte written (abort or panic only: reached on the async runtime) |
//! | `client-cert-read` | a session's client certificate files are about to be read (when set, and at start) |
//! | `look-in-place` | the start's look for a task's file moved into place before a stop is about to look (each task) |
//! | `database-check` | the `db-check` thread is about to run the start's `quick_check` |
//! | `worker-response` | a download worker accepted a response and is about to write (abort or panic only) |
//! | `connection-request` | a connection read a request and is about to hand it to the core (abort or panic only: reached on the async runtime) |

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

pub const ENV: &str = "DLSESSIOND_FAILPOINT";

struct Armed {
    name: String,
    nth: u64,
    /// Every hit from the Nth on, not only the Nth.
    onwards: bool,
    action: Action,
    hits: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Abort,
    Sleep(std::time::Duration),
    Panic,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok().filter(|s| !s.is_empty())?;
            let mut parts = spec.splitn(3, ':');
            let name = parts.next().unwrap_or_default().to_owned();
            let count = parts.next().unwrap_or_default();
            let onwards = count.ends_with('+');
            let nth = count.trim_end_matches('+').parse().unwrap_or(1);
            let action = match parts.next() {
                None => Action::Abort,
                Some("panic") => Action::Panic,
                Some(action) => match action.strip_prefix("sleep-ms=").and_then(|ms| ms.parse().ok()) {
                    Some(ms) => Action::Sleep(std::time::Duration::from_millis(ms)),
                    None => {
                        // A typo must not turn a pause into an abort.
                        eprintln!("dlsessiond: {ENV}={spec}: unknown action {action:?}; failpoint disarmed");
                        return None;
                    }
                },
            };
            Some(Armed { name, nth, onwards, action, hits: AtomicU64::new(0) })
        })
        .as_ref()
}

/// Aborts (or pauses) if `name` is the armed failpoint and this is its Nth hit.
pub fn hit(name: &str) {
    let Some(a) = armed() else { return };
    if a.name != name {
        return;
    }
    let n = a.hits.fetch_add(1, Ordering::Relaxed) + 1;
    if n == a.nth || (a.onwards && n > a.nth) {
        match a.action {
            Action::Sleep(pause) => {
                eprintln!("dlsessiond: failpoint {name} reached; pausing for {pause:?}");
                std::thread::sleep(pause);
            }
            Action::Panic => {
                eprintln!("dlsessiond: failpoint {name} reached; panicking");
                // The one deliberate panic: tests prove a bug in a worker is contained.
                #[allow(clippy::panic)]
                std::panic::panic_any(format!("failpoint {name}"));
            }
            Action::Abort => {
                eprintln!("dlsessiond: failpoint {name} reached; aborting");
                std::process::abort();
            }
        }
    }
}
