//! What the buffered writer (`writer`) and the direct writer (`direct`) share: the
//! checkpoint policy, how a checkpoint is reported, and joining helper threads. Both use
//! it; it uses neither.

use std::time::Duration;

use super::report::{WorkerEvent, WorkerLink};

/// How much a crash may cost and how stale a checkpoint may get.
#[derive(Debug)]
pub struct CheckpointPolicy {
    /// The most received data a crash may lose (the checkpoint window): a sync starts
    /// each time half of it has arrived, so the next half can arrive while that sync is in
    /// flight; a writer whose sync falls further behind waits for it.
    pub bytes: u64,
    pub interval: Duration,
}

impl CheckpointPolicy {
    /// Data between the starts of two syncs.
    pub fn sync_every(&self) -> u64 {
        (self.bytes / 2).max(1)
    }
}

/// Syncs a partial file's data for a checkpoint, then makes sure it still has a name: one
/// removed behind the daemon's back (someone cleaning ~/.cache) would otherwise take every
/// later byte, and checkpoints no restart can find, until its move failed. The error is
/// `NotFound`, which starts the download over (`engine::file_failure`).
pub fn sync_data(file: impl std::os::fd::AsFd, path: &std::path::Path) -> std::io::Result<()> {
    rustix::fs::fdatasync(&file)?;
    still_named(file, path)
}

/// `NotFound` when the file at `path`, open as `file`, has no name left (see [`sync_data`]).
pub fn still_named(file: impl std::os::fd::AsFd, path: &std::path::Path) -> std::io::Result<()> {
    let open = rustix::fs::fstat(file)?;
    if open.st_nlink > 0 {
        return Ok(());
    }
    // Some filesystems (FUSE, network ones) report no links for a file that has its name:
    // the name decides.
    match rustix::fs::lstat(path) {
        Ok(named) if named.st_dev == open.st_dev && named.st_ino == open.st_ino => Ok(()),
        _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "the partial file was removed")),
    }
}

/// Reports `offset` to the core as a checkpoint; its bytes were just synced (docs/behaviour.md, "Durability").
pub fn report_checkpoint(link: &WorkerLink, offset: u64) {
    crate::failpoint::hit("checkpoint-after-sync");
    link.send(WorkerEvent::Checkpoint { offset });
}

/// Waits for a helper thread (`what` names it in the panic error) and returns its error.
pub fn join(thread: Option<std::thread::JoinHandle<std::io::Result<()>>>, what: &str) -> std::io::Result<()> {
    match thread {
        Some(t) => t.join().map_err(|_| std::io::Error::other(format!("{what} panicked")))?,
        None => Ok(()),
    }
}

pub const SYNC_THREAD: &str = "the checkpoint thread";

#[cfg(test)]
thread_local! {
    /// Tests make the syncs started from their thread this much slower.
    pub static SYNC_DELAY: std::cell::Cell<Duration> = const { std::cell::Cell::new(Duration::ZERO) };
}

/// How long a sync thread started from this thread waits after each sync (tests only).
pub fn test_sync_delay() -> Duration {
    #[cfg(test)]
    return SYNC_DELAY.with(std::cell::Cell::get);
    #[cfg(not(test))]
    Duration::ZERO
}
