//! The SQLite store: the only module that contains SQL.
//!
//! One connection lives on a dedicated thread (`db-writer`). The core submits batches of
//! [`Op`]s in order; the thread applies every batch waiting in its queue inside one
//! transaction (group commit), so a burst of task completions costs one `fsync`, not one
//! each. A batch's `done` callback runs only after its transaction committed.
//!
//! Durability: WAL with `synchronous=FULL`, so a committed transaction survives power loss.
//! The schema changes only by appending a migration to `schema::MIGRATIONS`. The start's
//! `PRAGMA quick_check` runs on a read-only connection on a thread of its own (`db-check`),
//! beside the first reads; nothing is committed before it passed, and a file that fails it
//! is never written ([`Health::Corrupt`]).
//!
//! A full disk or an I/O error is weather, not death: a batch that fails to commit is kept,
//! with every batch queued after it, and tried again (every second, backing off to ten);
//! nothing waiting on them runs until they commit, so nothing is acknowledged that is not
//! on disk. The core hears [`Health::Failing`] once and [`Health::Recovered`] when the
//! backlog is in.

mod codec;
mod error;
mod schema;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior, params};
use tracing::{debug, error, info, warn};

use codec::sat;

use crate::model::{EventRecord, SessionKey, SessionRecord, TaskRecord};
use dlsession_proto::TaskId;

pub use error::StoreError;
pub use schema::{APPLICATION_ID, LATEST_VERSION};

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
    /// A suspended task resumed: queued, with its resource deadline, no retry pending (a
    /// batch of 100,000 resumed at once wrote each whole row again otherwise).
    Queued {
        task: TaskId,
        resource_deadline: Option<u64>,
    },
    /// Also advances the session's `next_seq` past it.
    InsertEvent(EventRecord),
    DeleteEvents {
        session: SessionKey,
        seqs: Vec<u64>,
    },
    RetireTasks(Vec<TaskId>),
    /// Starts a prune of the history once the batch carrying it committed (so it sees the
    /// retirements committed with it), as [`Store::prune_history`] does.
    PruneRetired {
        before: u64,
        keep: u64,
    },
    SetNextTaskId(TaskId),
    /// Event sequence numbers of any later session start here (never lowered): a session
    /// that reuses a deleted one's identifier must not reuse its sequence numbers, or a
    /// late acknowledgement meant for the old one would delete the new one's events.
    SetSeqFloor(u64),
    /// The daemon-wide bandwidth limit set at run time (`None`: lifted).
    SetGlobalLimit(Option<u64>),
    /// A session's cookie jar, or that it keeps none.
    SaveCookies {
        session: SessionKey,
        enabled: bool,
        jar: JarJson,
    },
    /// A session's own proxy (`None`: the environment's).
    SaveProxy {
        session: SessionKey,
        proxy: Option<dlsession_proto::SessionProxy>,
    },
    /// Whether a session answers challenges.
    SaveChallenges {
        session: SessionKey,
        answers: bool,
    },
    /// A credential to keep (replacing one for the same task or space, origin and kind).
    SaveCredential {
        session: SessionKey,
        credential: crate::model::HeldCredential,
    },
    /// One kept credential: a task's (or the space's) for an origin.
    ForgetCredential {
        session: SessionKey,
        task: Option<TaskId>,
        origin: String,
        proxy: bool,
    },
    /// A task's kept credentials, or (`task: None`) every one of the session.
    DeleteCredentials {
        session: SessionKey,
        task: Option<TaskId>,
    },
    /// A session's client certificate files (`None`: none).
    SaveClientCert {
        session: SessionKey,
        cert: Option<dlsession_proto::ClientCertificate>,
    },
    /// What a request sent `Once` created; keys older than a day go with it.
    SaveCreation(crate::model::Creation),
}

/// A cookie jar as stored (JSON). `Debug` shows its size only: cookies are credentials,
/// and an `Op` or a `Snapshot` may be logged.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct JarJson(pub String);

impl std::fmt::Debug for JarJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JarJson(<{} bytes>)", self.0.len())
    }
}

/// Runs after the batch's transaction committed (or, the database thread gone, never will).
pub type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A write's `done`, answered `Err` if it is dropped unanswered (a database thread that ends
/// or dies with it held or queued): nobody waits on a write for ever (the core counts its
/// commits in flight, and a stop waits for them).
struct Answer(Option<Done>);

impl Answer {
    fn call(mut self, result: Result<(), String>) {
        if let Some(done) = self.0.take() {
            done(result);
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done(Err(STOPPED.into()));
        }
    }
}

/// Whether the database takes writes (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// A commit failed; batches wait and are retried. The text says why.
    Failing(String),
    /// Everything that waited is committed.
    Recovered,
    /// The file failed `PRAGMA quick_check` after the start (or the check could not finish):
    /// nothing was or will be written; the daemon must stop. The text is the refusal to show.
    Corrupt(String),
    /// The database thread ended by a panic (a bug): what it held is not committed and
    /// nothing more will be; the daemon must stop (a restart recovers from the last commit).
    Stopped(String),
}

/// The first retry of a failed commit comes after this; each next one waits twice as
/// long, up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// A read, run on the database thread.
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

enum Job {
    Write {
        ops: Vec<Op>,
        done: Answer,
    },
    Read(ReadJob),
    /// A read that runs once the start's check passed (the answer also says it passed).
    ReadAfterCheck(ReadJob),
    /// The start's `quick_check` ended (on a thread and connection of its own).
    Checked(Result<(), StoreError>),
    /// See [`Store::prune_history`].
    Prune {
        before: u64,
        keep: u64,
        reply: Reply<u64>,
    },
}

/// Everything the daemon needs to rebuild its state at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub sessions: Vec<SessionRecord>,
    /// Tasks not yet retired, but for suspended ones (see `dormant`).
    pub tasks: Vec<TaskRecord>,
    /// Per session, how many suspended live tasks it has: they stay on disk until
    /// [`Store::load_dormant`] brings them.
    pub dormant: Vec<(SessionKey, u64)>,
    /// Durable events not yet acknowledged, in (session, seq) order.
    pub events: Vec<EventRecord>,
    pub next_task_id: TaskId,
    /// Above every session row's key, ended sessions kept for the history included.
    pub next_session_key: i64,
    /// The daemon-wide bandwidth limit set at run time (`None`: never; see `Op::SetGlobalLimit`).
    pub global_limit: Option<Option<u64>>,
    /// Where a new session's event sequence numbers start (see `Op::SetSeqFloor`).
    pub seq_floor: u64,
    /// Sessions' cookie jars: (session, enabled, JSON); a session without one keeps
    /// cookies and has none yet.
    pub cookie_jars: Vec<(SessionKey, bool, JarJson)>,
    /// Sessions' own proxies.
    pub session_proxies: Vec<(SessionKey, dlsession_proto::SessionProxy)>,
    /// Sessions that answer challenges.
    pub session_challenges: Vec<(SessionKey, bool)>,
    /// Credentials kept, by session.
    pub credentials: Vec<(SessionKey, crate::model::HeldCredential)>,
    /// Sessions' client certificates.
    pub client_certs: Vec<(SessionKey, dlsession_proto::ClientCertificate)>,
    /// Creation keys of the last day, oldest first.
    pub creations: Vec<crate::model::Creation>,
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
    /// starts the writer thread. `on_health` hears when commits start failing and when
    /// they work again.
    pub fn open(
        path: &Path,
        on_health: impl Fn(Health) + Clone + Send + 'static,
    ) -> Result<(Store, Snapshot), StoreError> {
        let (mut conn, check) = schema::open(path)?;
        let snapshot = match load_snapshot(&mut conn) {
            Ok(snapshot) => snapshot,
            // A file that cannot be read through is more likely corrupt than anything else:
            // say so if the check agrees.
            Err(e) => {
                if check == schema::Check::Due {
                    schema::quick_check(&conn, path)?;
                }
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let checked = check == schema::Check::Passed || !start_check(path, tx.clone());
        if !checked {
            debug!("database check started beside the first answers");
        } else if check == schema::Check::Due {
            // No second connection or thread for it: checked here, before anything else.
            schema::quick_check(&conn, path)?;
        }
        let path = path.to_path_buf();
        thread::Builder::new()
            .name("db-writer".into())
            .spawn(move || {
                let on_death = on_health.clone();
                let writer = Writer {
                    conn,
                    path,
                    on_health,
                    backlog: Vec::new(),
                    failing: None,
                    checked,
                    after_check: Vec::new(),
                    pruning: None,
                };
                // Else every later commit waited for ever, its request unanswered.
                // What it held or had queued is answered as it is dropped (`Answer`).
                if let Err(why) = crate::panics::contained("the database thread", || writer.run(&rx)) {
                    on_death(Health::Stopped(format!("the database thread panicked: {why}")));
                }
            })
            .map_err(|e| StoreError::Sql(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok((Store { tx }, snapshot))
    }

    /// Queues a batch; `done` runs once it is durable.
    pub fn write(&self, ops: Vec<Op>, done: Option<Done>) {
        // A thread that has stopped drops the job: its `Answer` says so.
        let _ = self.tx.send(Job::Write { ops, done: Answer(done) });
    }

    /// Deletes retired tasks that finished (or, never started, were created) at or before
    /// `before`, and all but the newest `keep` retired tasks; `then` hears how many went.
    /// A few thousand rows per transaction, with writes queued meanwhile committed in
    /// between: a million rows in one transaction held every commit for many seconds. A
    /// prune asked for while one is under way takes its place. The daemon asks with
    /// `Op::PruneRetired`, in the batch whose retirements it should see.
    pub fn prune_history(&self, before: u64, keep: u64, then: impl FnOnce(Result<u64, StoreError>) + Send + 'static) {
        let _ = self.tx.send(Job::Prune { before, keep, reply: Reply::new(then) });
    }

    /// Loads one task, retired or not (for `show`), with the identifier of its session
    /// (marked "(invalidated)" if the session has ended).
    pub async fn load_task(&self, id: TaskId) -> Result<Option<(TaskRecord, String)>, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Job::Read(Box::new(move |conn: &Connection| {
            let _ = tx.send(codec::load_task(conn, id));
        }));
        self.tx.send(job).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Loads suspended tasks that stayed on disk; `then` gets them on the database thread.
    pub fn load_dormant(&self, which: Dormant, then: impl FnOnce(Result<Woken, StoreError>) + Send + 'static) {
        let reply = Reply::new(then);
        let _ = self.tx.send(Job::Read(Box::new(move |conn: &Connection| {
            let woken = match which {
                Dormant::All => codec::load_dormant(conn, None).map(|tasks| Woken { sessions: None, tasks }),
                Dormant::Sessions(keys) => {
                    codec::load_dormant(conn, Some(&keys)).map(|tasks| Woken { sessions: Some(keys), tasks })
                }
                Dormant::OfTasks(ids) => codec::sessions_of_dormant(conn, &ids).and_then(|keys| {
                    codec::load_dormant(conn, Some(&keys)).map(|tasks| Woken { sessions: Some(keys), tasks })
                }),
            };
            reply.send(woken.map_err(StoreError::from));
        })));
    }

    /// Every suspended task's id and session, for the start's sweep of the cache, once the
    /// start's `quick_check` passed: the answer also says the file passed it (there is none
    /// if it failed).
    pub fn dormant_ids(&self, then: impl FnOnce(Result<Vec<(TaskId, SessionKey)>, StoreError>) + Send + 'static) {
        let reply = Reply::new(then);
        let _ = self.tx.send(Job::ReadAfterCheck(Box::new(move |conn: &Connection| {
            reply.send(codec::load_dormant_ids(conn).map_err(StoreError::from));
        })));
    }

    /// Waits until everything queued before this call is committed, or `limit` passed
    /// (while the disk refuses writes); says whether it all committed.
    pub async fn flush(&self, limit: Duration) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.write(
            Vec::new(),
            Some(Box::new(move |result| {
                let _ = tx.send(result.is_ok());
            })),
        );
        matches!(tokio::time::timeout(limit, rx).await, Ok(Ok(true)))
    }
}

fn load_snapshot(conn: &mut Connection) -> Result<Snapshot, StoreError> {
    let mut sessions = codec::load_sessions(conn)?;
    let events = codec::load_events(conn)?;
    // A session's next number is above every event it stored, whatever its row says: one
    // at or below would collide with a stored event, and that commit would fail for ever,
    // holding every write behind it (a database edited by hand, or restored in part).
    let mut above: HashMap<SessionKey, u64> = HashMap::new();
    for ev in &events {
        let next = above.entry(ev.session).or_default();
        *next = (*next).max(ev.seq.saturating_add(1));
    }
    for s in &mut sessions {
        if let Some(&next) = above.get(&s.key)
            && s.next_seq < next
        {
            warn!(session = %s.identifier, stored = s.next_seq, next, "a session's next event number was below its stored events; raised");
            s.next_seq = next;
        }
    }
    Ok(Snapshot {
        sessions,
        tasks: codec::load_awake_tasks(conn)?,
        dormant: codec::load_dormant_counts(conn)?,
        events,
        next_task_id: codec::load_next_task_id(conn)?,
        next_session_key: codec::load_next_session_key(conn)?,
        global_limit: codec::load_global_limit(conn)?,
        seq_floor: codec::load_seq_floor(conn)?,
        cookie_jars: codec::load_cookie_jars(conn)?,
        session_proxies: codec::load_session_proxies(conn)?,
        session_challenges: codec::load_session_challenges(conn)?,
        credentials: codec::load_credentials(conn)?,
        client_certs: codec::load_client_certs(conn)?,
        creations: codec::load_creations(conn, crate::model::now_ms().saturating_sub(crate::model::CREATION_KEPT_MS))?,
    })
}

/// Runs the start's `quick_check` on a read-only connection and thread of its own, so
/// reads go on meanwhile; the result comes back as a job. False if it cannot be started.
fn start_check(path: &Path, jobs: mpsc::Sender<Job>) -> bool {
    let Ok(conn) = open_read_only(path) else { return false };
    let path = path.to_path_buf();
    thread::Builder::new()
        .name("db-check".into())
        .spawn(move || {
            // Made on the thread: a thread that never started sends nothing (the caller
            // checks then); one that ends without an answer (a panic) says it could not.
            let detail = "the check ended without an answer".to_owned();
            let unanswered = StoreError::Unchecked { path: path.clone(), detail };
            let answer = Reply::or(unanswered, move |result| {
                let _ = jobs.send(Job::Checked(result));
            });
            let started = std::time::Instant::now();
            crate::failpoint::hit("database-check");
            let result = schema::quick_check(&conn, &path);
            debug!(ms = started.elapsed().as_millis() as u64, ok = result.is_ok(), "database check done");
            answer.send(result);
        })
        .is_ok()
}

/// An answer given once; if it is never given (the database thread stopped before the
/// read ran, a thread ended early), dropping it gives its error instead, so nothing waits
/// for ever.
struct Reply<T> {
    then: Option<Then<T>>,
    unanswered: Option<StoreError>,
}

/// Where an answer goes.
type Then<T> = Box<dyn FnOnce(Result<T, StoreError>) + Send>;

impl<T> Reply<T> {
    /// A read's answer: `StoreError::Closed` if it never runs.
    fn new(then: impl FnOnce(Result<T, StoreError>) + Send + 'static) -> Reply<T> {
        Reply::or(StoreError::Closed, then)
    }

    fn or(unanswered: StoreError, then: impl FnOnce(Result<T, StoreError>) + Send + 'static) -> Reply<T> {
        Reply { then: Some(Box::new(then)), unanswered: Some(unanswered) }
    }

    fn send(mut self, result: Result<T, StoreError>) {
        if let Some(then) = self.then.take() {
            then(result);
        }
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        if let (Some(then), Some(e)) = (self.then.take(), self.unanswered.take()) {
            then(Err(e));
        }
    }
}

const STOPPED: &str = "the database thread stopped before this could be written";

/// The `db-writer` thread: the one connection and the batches not yet committed.
struct Writer<H> {
    conn: Connection,
    path: PathBuf,
    on_health: H,
    /// Batches waiting to commit, in order (while commits fail).
    backlog: Vec<(Vec<Op>, Answer)>,
    /// The last commit failed: why, when, and how long until the next try.
    failing: Option<Failing>,
    /// The start's `quick_check` passed (or was not due): commits may happen.
    checked: bool,
    /// Reads waiting for it.
    after_check: Vec<ReadJob>,
    /// A prune of the history under way, done a chunk at a time while nothing else waits.
    pruning: Option<Pruning>,
}

/// Rows a prune deletes per transaction (under 10 ms on this machine: 100,000 took 0.38 s).
const PRUNE_CHUNK: u64 = 2_000;

/// While other work is queued, a prune still goes on a chunk at least this often.
const PRUNE_BUSY_EVERY: Duration = Duration::from_millis(250);

struct Pruning {
    before: u64,
    keep: u64,
    /// Every task older than `before` is gone: the count goes next.
    aged: bool,
    /// Found once `aged`: the id at and below which retired tasks are past `keep`.
    cutoff: Option<Option<i64>>,
    deleted: u64,
    /// Who asked ([`Store::prune_history`]); none for an `Op::PruneRetired`.
    reply: Option<Reply<u64>>,
    last_chunk: std::time::Instant,
}

struct Failing {
    error: String,
    at: std::time::Instant,
    wait: Duration,
    /// Open the connection anew before the next try (after an I/O error).
    reopen: bool,
}

/// Which suspended tasks [`Store::load_dormant`] brings.
#[derive(Debug, Clone)]
pub enum Dormant {
    All,
    Sessions(Vec<SessionKey>),
    /// The sessions holding any of these tasks (all of each session's suspended tasks).
    OfTasks(Vec<TaskId>),
}

/// What [`Store::load_dormant`] brought: every suspended task of `sessions` (of every
/// session when `None`).
#[derive(Debug)]
pub struct Woken {
    pub sessions: Option<Vec<SessionKey>>,
    pub tasks: Vec<TaskRecord>,
}

impl<H: Fn(Health)> Writer<H> {
    fn run(mut self, rx: &mpsc::Receiver<Job>) {
        'jobs: loop {
            let first = if let Some(p) = self.pruning.as_ref().filter(|_| self.checked && self.failing.is_none()) {
                // A prune goes on a chunk at a time while nothing else is queued, and now
                // and then also when something is (a busy daemon would starve it).
                let due = p.last_chunk.elapsed() >= PRUNE_BUSY_EVERY;
                match rx.try_recv() {
                    Ok(job) => {
                        if due {
                            self.prune_some();
                        }
                        Some(job)
                    }
                    Err(mpsc::TryRecvError::Empty) => {
                        self.prune_some();
                        continue;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            } else {
                // While failing, wake up for the next retry even if nothing new comes.
                match &self.failing {
                    None => rx.recv().ok(),
                    Some(f) => match rx.recv_timeout(f.wait.saturating_sub(f.at.elapsed())) {
                        Ok(job) => Some(job),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    },
                }
            };
            let mut group: Vec<Job> = Vec::new();
            match first {
                Some(job) => group.push(job),
                None if self.failing.is_none() => break,
                None => {}
            }
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            for job in group {
                match job {
                    Job::Write { ops, done } => self.backlog.push((ops, done)),
                    Job::ReadAfterCheck(f) if !self.checked => self.after_check.push(f),
                    Job::Read(f) | Job::ReadAfterCheck(f) => {
                        // Reads see everything queued before them (when it can be written).
                        self.flush();
                        f(&self.conn);
                    }
                    Job::Checked(Ok(())) => {
                        self.checked = true;
                        self.flush();
                        for f in std::mem::take(&mut self.after_check) {
                            f(&self.conn);
                        }
                    }
                    Job::Checked(Err(e)) => {
                        // Nothing was written: the file stays as it was, the core stops.
                        error!(error = %e, "the database failed its check; nothing will be written");
                        (self.on_health)(Health::Corrupt(e.to_string()));
                        break 'jobs;
                    }
                    Job::Prune { before, keep, reply } => self.start_prune(before, keep, Some(reply)),
                }
            }
            self.flush();
        }
        debug!("database thread exiting");
    }

    /// Commits the backlog in one transaction, unless a failed commit's retry is not due.
    fn flush(&mut self) {
        if !self.checked || self.backlog.is_empty() || self.failing.as_ref().is_some_and(|f| f.at.elapsed() < f.wait) {
            return;
        }
        if self.failing.as_ref().is_some_and(|f| f.reopen) {
            match schema::reopen(&self.path) {
                Ok(conn) => self.conn = conn,
                Err(e) => return self.failed(e.to_string(), true),
            }
        }
        if self.backlog.iter().flat_map(|(ops, _)| ops.iter()).any(|op| matches!(op, Op::InsertTask(_))) {
            crate::failpoint::hit("tasks-before-commit");
        }
        match commit(&mut self.conn, self.backlog.iter().flat_map(|(ops, _)| ops.iter())) {
            Ok(()) => {
                let batch = std::mem::take(&mut self.backlog);
                after_commit(&batch);
                if self.failing.take().is_some() {
                    info!(
                        batches = batch.len(),
                        "the database takes writes again; everything that waited is committed"
                    );
                    (self.on_health)(Health::Recovered);
                }
                let mut prunes = batch.iter().flat_map(|(ops, _)| ops.iter()).filter_map(|op| match op {
                    Op::PruneRetired { before, keep } => Some((*before, *keep)),
                    _ => None,
                });
                if let Some((before, keep)) = prunes.next_back() {
                    self.start_prune(before, keep, None);
                }
                for (_, done) in batch {
                    done.call(Ok(()));
                }
            }
            Err(e) => {
                let reopen = matches!(&e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::SystemIoFailure);
                self.failed(e.to_string(), reopen);
            }
        }
    }

    /// Starts a prune; one under way gives way to it (and who asked for that one hears what
    /// it did).
    fn start_prune(&mut self, before: u64, keep: u64, reply: Option<Reply<u64>>) {
        let new = Pruning {
            before,
            keep,
            aged: false,
            cutoff: None,
            deleted: 0,
            reply,
            last_chunk: std::time::Instant::now(),
        };
        if let Some(Pruning { reply: Some(reply), deleted, .. }) = self.pruning.replace(new) {
            reply.send(Ok(deleted));
        }
    }

    /// Deletes the next chunk of the prune under way: by age first, then (the cutoff found
    /// once those are gone) by count; ends it once a chunk comes short.
    fn prune_some(&mut self) {
        let Writer { conn, pruning: Some(p), .. } = self else { return };
        p.last_chunk = std::time::Instant::now();
        let chunk = (|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut deleted = 0;
            if !p.aged {
                deleted = codec::prune_aged(&tx, p.before, PRUNE_CHUNK)?;
                p.aged = deleted < PRUNE_CHUNK;
            }
            if p.aged && deleted < PRUNE_CHUNK {
                if p.cutoff.is_none() {
                    p.cutoff = Some(codec::history_cutoff(&tx, p.keep)?);
                }
                if let Some(Some(cutoff)) = p.cutoff {
                    deleted += codec::prune_beyond(&tx, cutoff, PRUNE_CHUNK - deleted)?;
                }
            }
            if deleted < PRUNE_CHUNK {
                codec::drop_ended_sessions(&tx)?;
            }
            tx.commit()?;
            Ok::<_, rusqlite::Error>(deleted)
        })();
        let result = match chunk {
            Ok(PRUNE_CHUNK) => return p.deleted += PRUNE_CHUNK,
            Ok(deleted) => Ok(p.deleted + deleted),
            // History is not worth the retries writes get: the next prune tries again.
            Err(e) => {
                warn!(error = %e, "cannot prune the task history; it is tried again as more tasks retire");
                Err(e.into())
            }
        };
        let Some(p) = self.pruning.take() else { return };
        match (p.reply, result) {
            (Some(reply), result) => reply.send(result),
            (None, Ok(deleted)) if deleted > 0 => debug!(deleted, "pruned the task history"),
            (None, _) => {}
        }
    }

    fn failed(&mut self, error: String, reopen: bool) {
        let wait = match &self.failing {
            None => {
                error!(error = %error, "database commit failed; holding changes and retrying until it works");
                (self.on_health)(Health::Failing(error.clone()));
                RETRY_MIN
            }
            Some(f) => {
                if f.error != error {
                    warn!(error = %error, "database commit still failing");
                }
                (f.wait * 2).min(RETRY_MAX)
            }
        };
        self.failing = Some(Failing { error, at: std::time::Instant::now(), wait, reopen });
    }
}

/// Logs the checkpoints a batch committed; the failpoints right after a commit.
fn after_commit(batch: &[(Vec<Op>, Answer)]) {
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
    if batch.iter().flat_map(|(ops, _)| ops.iter()).any(|op| matches!(op, Op::InsertTask(_))) {
        crate::failpoint::hit("tasks-after-commit");
    }
}

fn commit<'a>(conn: &mut Connection, ops: impl Iterator<Item = &'a Op>) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Each session's highest new event number (a commit usually holds one or two sessions).
    let mut events: Vec<(SessionKey, u64)> = Vec::new();
    for op in ops {
        apply(&tx, op)?;
        if let Op::InsertEvent(e) = op {
            match events.iter_mut().find(|(s, _)| *s == e.session) {
                Some((_, seq)) => *seq = (*seq).max(e.seq),
                None => events.push((e.session, e.seq)),
            }
        }
    }
    for (session, seq) in events {
        codec::raise_next_seq(&tx, session, seq)?;
    }
    tx.commit()
}

fn apply(tx: &Transaction<'_>, op: &Op) -> Result<(), rusqlite::Error> {
    match op {
        Op::InsertSession(s) | Op::UpdateSession(s) => codec::save_session(tx, s),
        Op::DeleteSession(key) => {
            // Its key stays used: a new session must not take it (and its directory, if its
            // removal was cut short).
            codec::raise_meta(tx, "next_session_key", u64::try_from(*key).unwrap_or(0).saturating_add(1))?;
            tx.execute("DELETE FROM events WHERE session_id = ?1", params![key])?;
            tx.execute("DELETE FROM cookie_jars WHERE session_id = ?1", params![key])?;
            tx.execute("DELETE FROM session_proxies WHERE session_id = ?1", params![key])?;
            tx.execute("DELETE FROM session_challenges WHERE session_id = ?1", params![key])?;
            tx.execute("DELETE FROM credentials WHERE session_id = ?1", params![key])?;
            tx.execute("DELETE FROM session_client_certs WHERE session_id = ?1", params![key])?;
            tx.execute("DELETE FROM creations WHERE session_id = ?1", params![key])?;
            // A session is deleted once all its tasks are retired; any other would be orphaned.
            tx.execute("DELETE FROM tasks WHERE session_id = ?1 AND retired = 0", params![key])?;
            // Its retired tasks stay in the history (`show` finds them) under a tombstone row whose
            // identifier no session can have; the row goes when the history has pruned them.
            let has_tasks: bool =
                tx.query_row("SELECT EXISTS(SELECT 1 FROM tasks WHERE session_id = ?1)", params![key], |r| r.get(0))?;
            if has_tasks {
                tx.execute(
                    "UPDATE sessions SET identifier = ?2 || id || ?2 || identifier, invalid = 1 WHERE id = ?1",
                    params![key, codec::TOMBSTONE],
                )?;
            } else {
                tx.execute("DELETE FROM sessions WHERE id = ?1", params![key])?;
            }
            Ok(())
        }
        Op::InsertTask(t) | Op::UpdateTask(t) => codec::save_task(tx, t),
        Op::Checkpoint { task, offset } => {
            tx.prepare_cached("UPDATE tasks SET committed_offset = ?2 WHERE id = ?1")?
                .execute(params![sat(*task), sat(*offset)])?;
            Ok(())
        }
        Op::Queued { task, resource_deadline } => codec::set_queued(tx, *task, *resource_deadline),
        Op::InsertEvent(e) => codec::insert_event(tx, e),
        Op::DeleteEvents { session, seqs } => {
            let mut stmt = tx.prepare_cached("DELETE FROM events WHERE session_id = ?1 AND seq = ?2")?;
            for seq in seqs {
                stmt.execute(params![session, sat(*seq)])?;
            }
            Ok(())
        }
        Op::RetireTasks(ids) => {
            let mut stmt = tx.prepare_cached("UPDATE tasks SET retired = 1 WHERE id = ?1")?;
            for id in ids {
                stmt.execute(params![sat(*id)])?;
            }
            Ok(())
        }
        // Not a change of this transaction: it starts after the commit (`Writer::flush`).
        Op::PruneRetired { .. } => Ok(()),
        Op::SetNextTaskId(id) => codec::raise_meta(tx, "next_task_id", *id),
        Op::SetSeqFloor(seq) => codec::raise_meta(tx, "seq_floor", *seq),
        Op::SetGlobalLimit(rate) => codec::set_global_limit(tx, *rate),
        Op::SaveCookies { session, enabled, jar } => codec::save_cookie_jar(tx, *session, *enabled, &jar.0),
        Op::SaveProxy { session, proxy } => codec::save_session_proxy(tx, *session, proxy.as_ref()),
        Op::SaveChallenges { session, answers } => {
            tx.execute(
                "INSERT OR REPLACE INTO session_challenges (session_id, answers) VALUES (?1, ?2)",
                params![session, answers],
            )?;
            Ok(())
        }
        Op::SaveCredential { session, credential } => codec::save_credential(tx, *session, credential),
        Op::SaveClientCert { session, cert: Some(c) } => {
            tx.execute(
                "INSERT OR REPLACE INTO session_client_certs (session_id, cert_file, key_file) VALUES (?1, ?2, ?3)",
                params![session, c.cert_file, c.key_file],
            )?;
            Ok(())
        }
        Op::SaveClientCert { session, cert: None } => {
            tx.execute("DELETE FROM session_client_certs WHERE session_id = ?1", params![session])?;
            Ok(())
        }
        Op::SaveCreation(c) => codec::save_creation(tx, c),
        Op::ForgetCredential { session, task, origin, proxy } => {
            tx.execute(
                "DELETE FROM credentials WHERE session_id = ?1 AND task_id = ?2 AND origin = ?3 AND proxy = ?4",
                params![session, task.map_or(0, sat), origin, proxy],
            )?;
            Ok(())
        }
        Op::DeleteCredentials { session, task: Some(task) } => {
            tx.execute("DELETE FROM credentials WHERE session_id = ?1 AND task_id = ?2", params![session, sat(*task)])?;
            Ok(())
        }
        Op::DeleteCredentials { session, task: None } => {
            tx.execute("DELETE FROM credentials WHERE session_id = ?1", params![session])?;
            Ok(())
        }
    }
}

/// Opens a database read-only for inspection (tests and diagnostics).
pub fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|source| StoreError::Open { path: path.to_path_buf(), source })?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_op_or_snapshot_shows_no_cookie() {
        let jar = JarJson(r#"[{"name":"sid","value":"s3cr3t-cookie"}]"#.into());
        let op = Op::SaveCookies { session: 1, enabled: true, jar: jar.clone() };
        let snapshot = Snapshot { cookie_jars: vec![(1, true, jar)], ..Snapshot::default() };
        for text in [format!("{op:?}"), format!("{snapshot:?}")] {
            assert!(!text.contains("s3cr3t"), "{text}");
            assert!(text.contains("bytes"), "{text}");
        }
    }
}
