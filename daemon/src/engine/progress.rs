//! What a running task shows of itself: bytes in its file, and signs of life.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Live counters of a task, shared between its worker (and its threads) and the core.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes in the partial file, including those from earlier attempts.
    pub received: AtomicU64,
    /// `u64::MAX` when unknown.
    pub expected: AtomicU64,
    /// Bumped by long steps that move no bytes of the download (hashing a resumed file,
    /// copying a finished one to another file system): the core's supervisor takes it as
    /// a sign of life, so a healthy long step is never abandoned as stuck.
    pub alive: AtomicU64,
    /// An upload's attempt has handed its whole body to the connection (`received` then
    /// counts bytes sent): from here on the server may have all of it.
    pub sent_whole: AtomicBool,
    /// How many of an upload's bodies wait for their turn under a bandwidth limit (one,
    /// but a body of an earlier request may still be draining): quiet, but not idle.
    pub paced: AtomicU64,
    /// Numbers an upload's request bodies: only the newest one counts its bytes (one of an
    /// earlier request may still be draining after a redirect or an early answer).
    pub body: AtomicU64,
    /// Where an upload's newest body began (the server's offset, for one it resumes): only
    /// bytes sent beyond it are this attempt's progress.
    pub body_from: AtomicU64,
}

impl Progress {
    pub fn new(received: u64, expected: Option<u64>) -> Progress {
        Progress {
            received: AtomicU64::new(received),
            expected: AtomicU64::new(expected.unwrap_or(u64::MAX)),
            alive: AtomicU64::new(0),
            sent_whole: AtomicBool::new(false),
            paced: AtomicU64::new(0),
            body: AtomicU64::new(0),
            body_from: AtomicU64::new(0),
        }
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn expected(&self) -> Option<u64> {
        Some(self.expected.load(Ordering::Relaxed)).filter(|&e| e != u64::MAX)
    }

    /// Signs of life so far (see `alive`).
    pub fn signs(&self) -> u64 {
        self.alive.load(Ordering::Relaxed).wrapping_add(self.received())
    }

    /// A long step made progress.
    pub fn beat(&self) {
        self.alive.fetch_add(1, Ordering::Relaxed);
    }
}
