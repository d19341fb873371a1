//! The SQLite store: the only module that contains SQL.
//!
//! One connection lives on a dedicated thread (`db-writer`). The core submits batches of
//! [`Op`]s in order; the thread applies every batch waiting in its queue inside one
//! transaction (group commit), so a burst of task completions costs one `fsync`, not one
//! each. A batch's `done` callback runs only after its transaction committed.
//!
//! Durability: WAL with `synchronous=FULL`, so a committed transaction survives power loss.
//! The schema changes only by appending a migration to [`MIGRATIONS`].

mod codec;
mod schema;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior, params};
use tracing::{debug, error};

use crate::model::{EventRecord, SessionKey, SessionRecord, TaskRecord};
use dlsession_proto::TaskId;

pub use schema::{APPLICATION_ID, LATEST_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error(
        "the database {path} has schema version {found}, newer than this dlsessiond understands ({known}); \
         refusing to start (upgrade dlsessiond, or move the file away to start empty)"
    )]
    TooNew { path: PathBuf, found: i64, known: i64 },
    #[error("{path} is not a dlsessiond database (application_id {found:#x}); refusing to start")]
    Foreign { path: PathBuf, found: i64 },
    #[error(
        "the database {path} is corrupt ({detail}); refusing to start. Move it away to start empty, \
         or restore a backup"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the database thread has stopped")]
    Closed,
}

/// One change to persist. Ops of one batch commit together or not at all.
#[derive(Debug)]
pub enum Op {
    InsertSession(SessionRecord),
    /// Configuration, flags and `next_seq`.
    UpdateSession(SessionRecord),
    /// The session, its tasks and its events.
    DeleteSession(SessionKey),
    InsertTask(Box<TaskRecord>),
    /// Every mutable column.
    UpdateTask(Box<TaskRecord>),
    /// Just the synced byte offset (the hot path while downloading).
    Checkpoint {
        task: TaskId,
        offset: u64,
    },
    /// Also advances the session's `next_seq` past it.
    InsertEvent(EventRecord),
    DeleteEvents {
        session: SessionKey,
        seqs: Vec<u64>,
    },
    RetireTasks(Vec<TaskId>),
    /// Deletes retired tasks that finished (or, never started, were created) at or before this.
    PruneRetired {
        before: u64,
    },
    SetNextTaskId(TaskId),
    /// Event sequence numbers of any later session start here (never lowered): a session
    /// that reuses a deleted one's identifier must not reuse its sequence numbers, or a
    /// late acknowledgement meant for the old one would delete the new one's events.
    SetSeqFloor(u64),
}

/// Runs after the batch's transaction committed (or failed).
pub type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

enum Job {
    Write { ops: Vec<Op>, done: Option<Done> },
    Read(Box<dyn FnOnce(&Connection) + Send>),
}

/// Everything the daemon needs to rebuild its state at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub sessions: Vec<SessionRecord>,
    /// Tasks not yet retired.
    pub tasks: Vec<TaskRecord>,
    /// Durable events not yet acknowledged, in (session, seq) order.
    pub events: Vec<EventRecord>,
    pub next_task_id: TaskId,
    /// Where a new session's event sequence numbers start (see `Op::SetSeqFloor`).
    pub seq_floor: u64,
}

/// Handle to the database thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    tx: mpsc::Sender<Job>,
}

/// Most batches merged into one transaction.
const MAX_GROUP: usize = 512;

impl Store {
    /// Opens (or creates) the database, checks and migrates it, loads the snapshot and
    /// starts the writer thread. `on_fatal` is called if a later commit fails.
    pub fn open(path: &Path, on_fatal: impl Fn(String) + Send + 'static) -> Result<(Store, Snapshot), StoreError> {
        let mut conn = schema::open(path)?;
        let snapshot = load_snapshot(&mut conn)?;
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("db-writer".into())
            .spawn(move || writer_loop(conn, rx, on_fatal))
            .map_err(|e| StoreError::Sql(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok((Store { tx }, snapshot))
    }

    /// Queues a batch; `done` runs once it is durable.
    pub fn write(&self, ops: Vec<Op>, done: Option<Done>) {
        if let Err(mpsc::SendError(Job::Write { done: Some(done), .. })) = self.tx.send(Job::Write { ops, done }) {
            done(Err("the database thread has stopped".into()));
        }
    }

    /// Loads one task, retired or not (for `show`).
    pub async fn load_task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Job::Read(Box::new(move |conn: &Connection| {
            let _ = tx.send(codec::load_task(conn, id));
        }));
        self.tx.send(job).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Waits until everything queued before this call is committed.
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.write(
            Vec::new(),
            Some(Box::new(move |_| {
                let _ = tx.send(());
            })),
        );
        let _ = rx.await;
    }
}

fn load_snapshot(conn: &mut Connection) -> Result<Snapshot, StoreError> {
    Ok(Snapshot {
        sessions: codec::load_sessions(conn)?,
        tasks: codec::load_live_tasks(conn)?,
        events: codec::load_events(conn)?,
        next_task_id: codec::load_next_task_id(conn)?,
        seq_floor: codec::load_seq_floor(conn)?,
    })
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Job>, on_fatal: impl Fn(String)) {
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let mut writes: Vec<(Vec<Op>, Option<Done>)> = Vec::new();
        for job in group {
            match job {
                Job::Write { ops, done } => writes.push((ops, done)),
                Job::Read(f) => {
                    // Reads see everything queued before them.
                    flush_writes(&mut conn, &mut writes, &mut failed, &on_fatal);
                    f(&conn);
                }
            }
        }
        flush_writes(&mut conn, &mut writes, &mut failed, &on_fatal);
    }
    debug!("database thread exiting");
}

fn flush_writes(
    conn: &mut Connection,
    writes: &mut Vec<(Vec<Op>, Option<Done>)>,
    failed: &mut Option<String>,
    on_fatal: &impl Fn(String),
) {
    if writes.is_empty() {
        return;
    }
    let batch = std::mem::take(writes);
    // After one failed commit nothing more is written: the in-memory state may be ahead
    // of the disk, and the daemon is shutting down to reload from a consistent file.
    let result = match failed {
        Some(msg) => Err(msg.clone()),
        None => commit(conn, batch.iter().flat_map(|(ops, _)| ops.iter())).map_err(|e| e.to_string()),
    };
    if result.is_ok() {
        let mut checkpoints = batch.iter().flat_map(|(ops, _)| ops.iter()).filter_map(|op| match op {
            Op::Checkpoint { task, offset } => Some((*task, *offset)),
            _ => None,
        });
        if let Some(first) = checkpoints.next() {
            for (task, offset) in std::iter::once(first).chain(checkpoints) {
                debug!(task, offset, "checkpoint committed");
            }
            crate::failpoint::hit("checkpoint-after-commit");
        }
    }
    if let Err(msg) = &result
        && failed.is_none()
    {
        error!(error = %msg, "database commit failed");
        *failed = Some(msg.clone());
        on_fatal(msg.clone());
    }
    for (_, done) in batch {
        if let Some(done) = done {
            done(result.clone());
        }
    }
}

fn commit<'a>(conn: &mut Connection, ops: impl Iterator<Item = &'a Op>) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for op in ops {
        apply(&tx, op)?;
    }
    tx.commit()
}

fn apply(tx: &Transaction<'_>, op: &Op) -> Result<(), rusqlite::Error> {
    match op {
        Op::InsertSession(s) | Op::UpdateSession(s) => codec::save_session(tx, s),
        Op::DeleteSession(key) => {
            tx.execute("DELETE FROM events WHERE session_id = ?1", params![key])?;
            tx.execute("DELETE FROM tasks WHERE session_id = ?1", params![key])?;
            tx.execute("DELETE FROM sessions WHERE id = ?1", params![key])?;
            Ok(())
        }
        Op::InsertTask(t) | Op::UpdateTask(t) => codec::save_task(tx, t),
        Op::Checkpoint { task, offset } => {
            tx.prepare_cached("UPDATE tasks SET committed_offset = ?2 WHERE id = ?1")?
                .execute(params![*task as i64, *offset as i64])?;
            Ok(())
        }
        Op::InsertEvent(e) => codec::insert_event(tx, e),
        Op::DeleteEvents { session, seqs } => {
            let mut stmt = tx.prepare_cached("DELETE FROM events WHERE session_id = ?1 AND seq = ?2")?;
            for seq in seqs {
                stmt.execute(params![session, *seq as i64])?;
            }
            Ok(())
        }
        Op::RetireTasks(ids) => {
            let mut stmt = tx.prepare_cached("UPDATE tasks SET retired = 1 WHERE id = ?1")?;
            for id in ids {
                stmt.execute(params![*id as i64])?;
            }
            Ok(())
        }
        Op::PruneRetired { before } => {
            let before = i64::try_from(*before).unwrap_or(i64::MAX);
            tx.execute(
                "DELETE FROM tasks WHERE retired = 1 AND coalesce(finished_at, created_at) <= ?1",
                params![before],
            )?;
            Ok(())
        }
        Op::SetNextTaskId(id) => codec::raise_meta(tx, "next_task_id", *id),
        Op::SetSeqFloor(seq) => codec::raise_meta(tx, "seq_floor", *seq),
    }
}

/// Opens a database read-only for inspection (tests and diagnostics).
pub fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|source| StoreError::Open { path: path.to_path_buf(), source })?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}
