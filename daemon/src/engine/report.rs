//! What workers report, and through what: the engine's whole outward interface. The
//! engine defines it and knows nothing of who listens (the core implements [`Sink`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dlsession_proto::{Header, TaskId};
use tokio::sync::oneshot;

use super::http::Failure;

/// What a worker reports. Tagged with the task and run generation by [`WorkerLink`].
#[derive(Debug)]
pub enum WorkerEvent {
    /// A response was accepted; the body transfer starts at `meta.offset`. With `durable`,
    /// the worker writes nothing until the core answers that the new metadata (and the
    /// offset reset to zero) is committed.
    Started {
        meta: ResponseMeta,
        durable: Option<oneshot::Sender<()>>,
    },
    /// Bytes up to `offset` are synced to disk: commit it.
    Checkpoint {
        offset: u64,
    },
    /// The whole body has arrived (the connection is free); the file is still being synced.
    BodyReceived,
    /// Every byte is written and synced. The core answers with where to move the file,
    /// after committing the finishing phase unless the file is `marked` (its mark at the
    /// destination proves the move after a crash; see `files::MARK`).
    DataComplete {
        size: u64,
        sha256: Option<[u8; 32]>,
        marked: bool,
        /// The file's bytes came from more than one response: the last began past the
        /// file's first byte, or a capped range's rest was asked for (a mismatching SHA-256
        /// then earns one download from zero).
        spliced: bool,
        reply: oneshot::Sender<FinishPlan>,
    },
    /// The file is in its final place.
    Moved {
        location: String,
    },
    /// An attempt that found no partial file found the task's file at its destination
    /// with its mark: it was moved before a crash, and only the commit is missing. `size`
    /// bytes; the directory is synced unless `error` says why not.
    FoundInPlace {
        location: String,
        size: u64,
        error: Option<dlsession_proto::ErrorInfo>,
    },
    /// The file is complete (and synced) but could not be put at its destination; it
    /// stays where it is.
    MoveFailed {
        error: dlsession_proto::ErrorInfo,
    },
    Failed(Failure),
    /// Stopped on request; everything up to `offset` is synced.
    Stopped {
        offset: u64,
    },
    /// An upload's server offered to resume it at `url` (`None`: the offer is gone, the
    /// server no longer knows the upload). Stored, so a retry after a crash continues there.
    ResumeUrl {
        url: Option<String>,
    },
    /// An upload's final response is in, but its body could not be written yet: the worker
    /// tries again (`error` says why, for `show`).
    AnswerHeld {
        error: dlsession_proto::ErrorInfo,
    },
    /// An upload got its final response; its body is synced at `response.location`.
    UploadDone {
        response: UploadResponse,
    },
}

/// An upload's final response as the worker kept it.
#[derive(Debug, Clone)]
pub struct UploadResponse {
    pub status: u16,
    pub final_url: String,
    pub headers: Vec<Header>,
    /// The response body's file (synced) and its length.
    pub location: String,
    pub size: u64,
    /// The body was longer than `UPLOAD_RESPONSE_BODY_LIMIT`: only its start was kept.
    pub truncated: bool,
    /// Why the task fails with this response (a status that is not a success); the
    /// response is reported all the same.
    pub error: Option<dlsession_proto::ErrorInfo>,
}

#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub status: u16,
    pub final_url: String,
    pub headers: Vec<Header>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// The file's length, when known.
    pub total: Option<u64>,
    /// `total` is a length a server stated (now or in an earlier answer), not the end of a
    /// range taken for it.
    pub total_stated: bool,
    /// Where this answer's body ends in the file, when known: before `total` when the
    /// server sent a shorter range than was asked for (the next attempt resumes after it).
    pub ends_at: Option<u64>,
    /// Where this transfer starts in the file.
    pub offset: u64,
    /// Earlier data was discarded (resource changed, no validators, or no range support).
    pub restarted: bool,
    /// The partial file already holds the whole resource: there is no body to write.
    pub complete: bool,
    /// The address the response came from (the proxy's, through a proxy): the core checks
    /// its route when the network changes.
    pub peer: Option<std::net::IpAddr>,
}

#[derive(Debug)]
pub enum FinishPlan {
    Move {
        to: PathBuf,
        overwrite: bool,
        /// The finishing phase is committed (see `files::Finish::recorded`).
        recorded: bool,
    },
    /// The core failed the task (e.g. checksum mismatch); do nothing more.
    Abort,
}

/// Where workers report. The engine defines it and knows nothing of who listens: the
/// core implements it (one message on its channel per report); tests collect reports.
pub trait Sink: Send + Sync + std::fmt::Debug {
    fn report(&self, task: TaskId, generation: u64, event: WorkerEvent);
}

/// A worker's way back: its task, its attempt, and the sink.
#[derive(Debug, Clone)]
pub struct WorkerLink {
    sink: Arc<dyn Sink>,
    task: TaskId,
    generation: u64,
    /// Set when the attempt's async half is gone (finished, or aborted by the core after it
    /// stopped responding): its blocking threads must not write another byte, since a new
    /// attempt may own the file by then.
    pub(super) abandoned: Arc<std::sync::atomic::AtomicBool>,
    /// Where the attempt's threads spent their time (see `Timing`).
    pub(super) timing: Arc<Timing>,
}

/// Where one attempt's time went, summed by the threads that spent it (microseconds).
/// The writer's, the direct-write thread's and the sync threads' times overlap the body's
/// arrival and one another: they are logged beside it, not as parts of it.
#[derive(Debug, Default)]
pub struct Timing {
    /// The body's reader waiting for the network.
    pub network_wait: AtomicU64,
    /// The body's reader waiting for the writer (its queue full: the disk is behind).
    pub writer_wait: AtomicU64,
    /// The writer writing: into the page cache, or copying into direct-write buffers (and
    /// waiting for one to come back from the disk).
    pub write: AtomicU64,
    /// Direct writes to the disk (`pwrite` with `O_DIRECT`).
    pub disk: AtomicU64,
    /// Checkpoint syncs (`fdatasync`) while the body arrived.
    pub sync: AtomicU64,
}

impl Timing {
    /// Adds the time since `since` to `counter`.
    pub fn add(counter: &AtomicU64, since: std::time::Instant) {
        let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
        counter.fetch_add(us, Ordering::Relaxed);
    }

    pub fn ms(counter: &AtomicU64) -> f64 {
        counter.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

impl WorkerLink {
    pub fn new(sink: Arc<dyn Sink>, task: TaskId, generation: u64) -> WorkerLink {
        WorkerLink { sink, task, generation, abandoned: Arc::default(), timing: Arc::default() }
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    pub fn task(&self) -> TaskId {
        self.task
    }

    /// The attempt was given up (see `abandoned`).
    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    pub fn send(&self, event: WorkerEvent) {
        self.sink.report(self.task, self.generation, event);
    }
}

/// The error of a thread whose attempt was given up (see `WorkerLink::abandoned`).
pub(super) fn abandoned() -> std::io::Error {
    std::io::Error::other("the attempt was abandoned")
}
