//! The core's disk work, done off its thread: the core never waits on a disk except
//! through the store's thread and this module's.
//!
//! - One thread, first in first out, for the daemon's own cache directory: removing
//!   files, keeping a cancelled task's partial file for its resume data, collecting
//!   garbage at start, expiring kept files. In order, so a removal queued after a keep
//!   never overtakes it, and a reply queued behind a keep (`Disk::then`) goes out only
//!   once the kept file is in place.
//! - Threads of their own for the checks of a client's destinations (`check_request`, at
//!   most 64 at once, as many as the blocking pool they used to share): a destination on
//!   a hung network mount stalls those requests only, never the daemon's other file work.
//!   Adopting the kept file of resume data happens there too, once its destination is
//!   known to be fine.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime};

use dlsession_proto::{ErrorCode, ErrorInfo, TaskId, UnixMillis};
use tracing::{info, warn};

use super::timers::millis;
use crate::model::{SessionKey, now_ms};

/// What the disk thread tells the core.
#[derive(Debug)]
pub enum DiskReport {
    /// The resume directory was cleaned: how many files went, and the oldest kept file
    /// left (its modification time).
    ResumeDir { removed: usize, oldest: Option<UnixMillis> },
    /// A task's finished file, looked for at start, is in place (see `Look`).
    FoundInPlace { task: TaskId, location: String, size: u64, error: Option<ErrorInfo> },
    /// A task looked for with `Look::report_missing` is not in place.
    NotInPlace { task: TaskId },
}

/// At start: where a task that was downloading may have had its file moved just before the
/// daemon stopped (see `crate::engine::files::found_in_place`). Looked for on a thread of
/// its own (`look_in_place`), not the disk thread: it touches destinations, which may sit on
/// a hung mount.
#[derive(Debug)]
pub(super) struct Look {
    pub task: TaskId,
    pub part: PathBuf,
    pub to: PathBuf,
    pub mark: String,
    pub sha256: Option<[u8; 32]>,
    /// Report it not found too (a task to cancel unless its file was delivered).
    pub report_missing: bool,
}

/// The extension of a task's partial file (`ID.part` in its session's directory).
pub(super) const PART_EXT: &str = "part";
/// The extension of a finished file left in the cache (`ID.download`).
pub(super) const CACHE_EXT: &str = "download";

/// At start: what the cache directory may hold.
#[derive(Debug)]
pub(super) struct Garbage {
    pub downloads: PathBuf,
    pub sessions: HashSet<SessionKey>,
    /// Sessions from here on were created after the list was made: their directories stay.
    pub first_new_session: SessionKey,
    /// Unfinished tasks and their sessions: each may have its `ID.part` and `ID.download`
    /// in its session's directory (an id, not a path, per task: building 200,000 paths
    /// at start-up cost more than the whole rest of the restore).
    pub unfinished: HashMap<TaskId, SessionKey>,
    /// Finished files of completed tasks that are still in the cache, by [`cache_tail`].
    pub locations: HashSet<PathBuf>,
    /// Task ids from here on were handed out after the list was made: their files stay.
    pub first_new_id: TaskId,
}

/// The part of a cache file's path the sweep matches it by: its session's directory and
/// its name (`sK/NAME`), not the whole text: the cache may be reached by another path than
/// the one stored with the task (through a link, or another `--cache-dir`).
pub(super) fn cache_tail(path: &Path) -> PathBuf {
    path.iter().rev().take(2).collect::<Vec<_>>().into_iter().rev().collect()
}

enum Job {
    Remove(Vec<PathBuf>),
    RemoveDir(PathBuf),
    /// A cancelled task's partial file, moved aside for its resume data.
    Keep {
        part: PathBuf,
        kept: PathBuf,
    },
    /// An adopted kept file whose task was refused after all, put back.
    Unadopt {
        part: PathBuf,
        kept: PathBuf,
    },
    CollectGarbage(Garbage),
    /// Removes kept partial files older than `retention` (reports `ResumeDir`).
    CleanResumeDir {
        dir: PathBuf,
        retention: Duration,
    },
    /// Runs once everything queued before it is done.
    Then(Box<dyn FnOnce() + Send>),
}

/// The handle to the disk thread. Dropping it lets the thread finish what is queued and end.
#[derive(Debug)]
pub(super) struct Disk {
    jobs: std_mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Job::Remove(_) => "Remove",
            Job::RemoveDir(_) => "RemoveDir",
            Job::Keep { .. } => "Keep",
            Job::Unadopt { .. } => "Unadopt",
            Job::CollectGarbage(_) => "CollectGarbage",
            Job::CleanResumeDir { .. } => "CleanResumeDir",
            Job::Then(_) => "Then",
        })
    }
}

impl Disk {
    /// Starts the thread; `report` hands its reports to the core.
    pub fn start(report: impl Fn(DiskReport) + Send + 'static) -> io::Result<Disk> {
        let (jobs, rx) = std_mpsc::channel::<Job>();
        std::thread::Builder::new().name("dlsessiond-disk".into()).spawn(move || {
            for job in rx {
                // A job that panics (a bug) is lost, not the thread: the jobs behind it
                // still run and the replies queued behind them still go.
                let _ = crate::panics::contained("cache file work", || run(job, &report));
            }
        })?;
        Ok(Disk { jobs })
    }

    fn send(&self, job: Job) {
        if self.jobs.send(job).is_err() {
            warn!("the disk thread has stopped; cache files are left for the next start to clean");
        }
    }

    pub fn remove(&self, paths: Vec<PathBuf>) {
        if !paths.is_empty() {
            self.send(Job::Remove(paths));
        }
    }

    pub fn remove_dir(&self, dir: PathBuf) {
        self.send(Job::RemoveDir(dir));
    }

    pub fn keep(&self, part: PathBuf, kept: PathBuf) {
        self.send(Job::Keep { part, kept });
    }

    pub fn unadopt(&self, part: PathBuf, kept: PathBuf) {
        self.send(Job::Unadopt { part, kept });
    }

    pub fn collect_garbage(&self, garbage: Garbage) {
        self.send(Job::CollectGarbage(garbage));
    }

    pub fn clean_resume_dir(&self, dir: PathBuf, retention: Duration) {
        self.send(Job::CleanResumeDir { dir, retention });
    }

    /// Runs `f` on the disk thread once everything queued so far is done.
    pub fn then(&self, f: impl FnOnce() + Send + 'static) {
        self.send(Job::Then(Box::new(f)));
    }

    /// Waits (at most `grace`) until everything queued so far is done.
    pub async fn drain(&self, grace: Duration) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.then(move || {
            let _ = tx.send(());
        });
        tokio::time::timeout(grace, rx).await.is_ok_and(|r| r.is_ok())
    }
}

fn run(job: Job, report: &impl Fn(DiskReport)) {
    match job {
        Job::Remove(paths) => {
            for p in paths {
                remove_file_quietly(&p);
            }
        }
        Job::RemoveDir(dir) => {
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != io::ErrorKind::NotFound
            {
                warn!(dir = %dir.display(), error = %e, "cannot remove session directory");
            }
        }
        Job::Keep { part, kept } => {
            if let Err(e) = keep(&part, &kept) {
                info!(error = %e, "cannot keep the partial file; its resume data will restart from zero");
            }
        }
        Job::Unadopt { part, kept } => {
            if let Err(e) = std::fs::rename(&part, &kept) {
                warn!(error = %e, "cannot put back the partial file of resume data; its task starts from zero");
            }
        }
        Job::CollectGarbage(g) => {
            let removed = collect_garbage(&g);
            if removed > 0 {
                info!(removed, "removed stray files from the cache directory");
            }
        }
        Job::CleanResumeDir { dir, retention } => {
            // The core waits for this report to clean again: a panic (a bug) tries again a
            // retention later instead of never.
            let (removed, oldest) =
                crate::panics::contained("cleaning kept partial files", || clean_resume_dir(&dir, retention))
                    .unwrap_or((0, Some(crate::model::now_ms())));
            report(DiskReport::ResumeDir { removed, oldest });
        }
        Job::Then(f) => f(),
    }
}

/// Looks for each task's file in place, on a thread of its own, and reports those found
/// (`DiskReport::FoundInPlace`). A look that hangs holds up only the looks behind it; those
/// tasks look for themselves when they get a download slot.
pub(super) fn look_in_place(looks: Vec<Look>, report: impl Fn(DiskReport) + Send + Sync + 'static) {
    if looks.is_empty() {
        return;
    }
    let missing: Vec<TaskId> = looks.iter().filter(|l| l.report_missing).map(|l| l.task).collect();
    let report = std::sync::Arc::new(report);
    let reporter = report.clone();
    let spawned = std::thread::Builder::new().name("dlsessiond-look".into()).spawn(move || {
        for l in looks {
            crate::failpoint::hit("look-in-place");
            match crate::engine::files::found_in_place(&l.part, &l.to, &l.mark, l.sha256) {
                Some(found) => {
                    let (location, size, error) = found.outcome(&l.to);
                    reporter(DiskReport::FoundInPlace { task: l.task, location, size, error });
                }
                None if l.report_missing => reporter(DiskReport::NotInPlace { task: l.task }),
                None => {}
            }
        }
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot look for files moved before the last stop; each task looks when it starts");
        // Those waiting for the answer are told nothing was found: they go on without it.
        for task in missing {
            report(DiskReport::NotInPlace { task });
        }
    }
}

fn remove_file_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), error = %e, "cannot remove file");
    }
}

/// Creates a private directory (and its parents) if it is missing.
fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Moves `part` to `kept`, dated now (retention counts from the cancel, not from the last
/// byte written), and makes both directory entries durable.
fn keep(part: &Path, kept: &Path) -> io::Result<()> {
    if let Some(dir) = kept.parent() {
        private_dir(dir)?;
    }
    std::fs::rename(part, kept)?;
    std::fs::File::options().write(true).open(kept)?.set_modified(SystemTime::now())?;
    crate::engine::files::sync_parent(kept)?;
    crate::engine::files::sync_parent(part)
}

/// Removes what no live task refers to: directories of sessions that are gone, and
/// files in a live session's directory that are not its tasks'.
fn collect_garbage(g: &Garbage) -> usize {
    let Ok(entries) = std::fs::read_dir(&g.downloads) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(key) = name.strip_prefix('s').and_then(|k| k.parse::<SessionKey>().ok()) else { continue };
        let path = entry.path();
        // Never through a link: a session directory replaced by a symlink to the user's
        // files would have them removed as "not its tasks'" (the writer refuses it too).
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !g.sessions.contains(&key) {
            if key >= g.first_new_session {
                continue;
            }
            if if is_dir { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) }.is_ok() {
                removed += 1;
            }
            continue;
        }
        if !is_dir {
            continue;
        }
        let Ok(files) = std::fs::read_dir(&path) else { continue };
        for file in files.flatten() {
            let path = file.path();
            let name = file.file_name().to_string_lossy().into_owned();
            let task_file = name.split_once('.').and_then(|(id, ext)| Some((id.parse::<TaskId>().ok()?, ext)));
            let new = task_file.is_some_and(|(id, _)| id >= g.first_new_id);
            let live = task_file
                .is_some_and(|(id, ext)| (ext == PART_EXT || ext == CACHE_EXT) && g.unfinished.get(&id) == Some(&key));
            if !new && !live && !g.locations.contains(&cache_tail(&path)) && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// Removes kept partial files older than `retention`; returns how many went and the
/// modification time of the oldest left.
fn clean_resume_dir(dir: &Path, retention: Duration) -> (usize, Option<UnixMillis>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return (0, None) };
    let now = SystemTime::now();
    let (mut removed, mut oldest) = (0, None::<UnixMillis>);
    for entry in entries.flatten() {
        let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else { continue };
        let age = now.duration_since(modified).unwrap_or(Duration::ZERO);
        if age > retention {
            if std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
            continue;
        }
        let at = now_ms().saturating_sub(millis(age));
        oldest = Some(oldest.map_or(at, |o| o.min(at)));
    }
    (removed, oldest)
}

/// What became of a kept partial file offered to a new task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// No file to adopt, or it is gone (taken by another task, expired): the task starts
    /// from zero.
    None,
    /// Moved to be the new task's partial file. Moved, not linked: two tasks made from
    /// one blob must never share a file. If the request is refused after this, the file
    /// is moved back (see `Core::on_disk_checked`).
    Adopted { kept: PathBuf, part: PathBuf },
}

/// Gives task `part` the kept file `kept` (on a blocking thread).
pub(super) fn adopt(kept: &Path, part: &Path) -> Result<Adoption, ErrorInfo> {
    let refused = |what: &str, e: io::Error| {
        ErrorInfo::new(
            ErrorCode::FileError,
            format!("cannot take the kept partial file of this resume data ({what}: {e}); it stays, try again"),
        )
    };
    if let Some(dir) = part.parent() {
        private_dir(dir).map_err(|e| refused("its task's directory", e))?;
    }
    match std::fs::rename(kept, part) {
        Ok(()) => {}
        // Taken by another task, or expired: the new task starts from zero.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            info!("resume data's partial file is gone; the new task starts from zero");
            return Ok(Adoption::None);
        }
        // Anything else (EIO, EACCES) is no reason to throw the kept bytes away.
        Err(e) => return Err(refused("moving it", e)),
    }
    // Both entries durable before the new task's commit names the offset: else a power cut
    // could put the file back in resume/, for the same blob to adopt again.
    let synced = crate::engine::files::sync_parent(part).and_then(|()| crate::engine::files::sync_parent(kept));
    if let Err(e) = synced {
        let _ = std::fs::rename(part, kept);
        return Err(refused("syncing its directories", e));
    }
    Ok(Adoption::Adopted { kept: kept.to_path_buf(), part: part.to_path_buf() })
}

/// What the filesystem says about a destination that passed `task`: not a directory, and
/// not there yet unless `overwrite`. It can block (a hung network mount), so the core runs
/// it on a blocking thread. The move itself refuses to replace a file either way (this
/// only reports the problem at creation instead of after the download).
pub(super) fn destination_on_disk(
    dest: &str,
    overwrite: bool,
    own: &crate::validate::OwnPlaces,
) -> Result<(), ErrorInfo> {
    own.refuse_on_disk(dest)?;
    match std::fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => {
            Err(ErrorInfo::new(ErrorCode::FileError, format!("destination {dest:?} is a directory; give a file path")))
        }
        Ok(_) if !overwrite => Err(ErrorInfo::new(
            ErrorCode::FileError,
            format!("destination {dest:?} already exists (set overwrite to replace it)"),
        )),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // A parent that is a file, a name too long, a directory we may not search: the move
        // would fail the same way after the whole download.
        Err(e) => Err(ErrorInfo::new(ErrorCode::FileError, format!("destination {dest:?} cannot be used: {e}"))),
    }
}

/// The outcome of a request's disk phase.
pub type Checked = Result<Prepared, ErrorInfo>;

/// What a task-creating request's disk phase prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// For resume data: the id the new task gets, and its kept file.
    pub resume: Option<(TaskId, Adoption)>,
    /// For uploads: each file as it was when checked, in request order.
    pub uploads: Vec<FileSnapshot>,
    /// For a session's client certificate: read and checked.
    pub client_cert: Option<std::sync::Arc<crate::engine::http::ClientIdentity>>,
}

/// An upload's file when it was submitted: the body is this, or the upload fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSnapshot {
    pub size: u64,
    pub mtime_ns: i64,
}

/// Checks that `path` is a regular file this daemon can read, and notes its size and
/// modification time.
pub fn upload_file(path: &str) -> Result<FileSnapshot, ErrorInfo> {
    let refuse = |what: String| ErrorInfo::new(ErrorCode::FileError, format!("cannot upload {path:?}: {what}"));
    // The kind first: opening a FIFO would block until someone writes to it.
    let kind = std::fs::metadata(path).map_err(|e| refuse(e.to_string()))?;
    if !kind.is_file() {
        return Err(refuse(if kind.is_dir() { "it is a directory".into() } else { "it is not a regular file".into() }));
    }
    // Opened without blocking: the path may have become a FIFO since.
    let file = crate::engine::upload::open_regular(Path::new(path)).map_err(|e| refuse(e.to_string()))?;
    let meta = file.metadata().map_err(|e| refuse(e.to_string()))?;
    Ok(FileSnapshot { size: meta.len(), mtime_ns: crate::engine::upload::mtime_ns_of(&meta) })
}

/// Runs `check` on a thread of the checks' own, then hands its outcome to `done`.
///
/// Not on the runtime's blocking pool: checks on a hung mount would hold its threads, and
/// with them every resumed download's preparation, every move on a thread of its own and
/// every relaunch. At most `CHECK_THREADS` run at once; more wait their turn, in order.
pub(super) fn check_request(
    check: impl FnOnce() -> Checked + Send + 'static,
    done: impl FnOnce(Checked) + Send + 'static,
) {
    static CHECKS: std::sync::OnceLock<crate::engine::threads::JobThreads> = std::sync::OnceLock::new();
    let threads = CHECKS.get_or_init(|| crate::engine::threads::JobThreads::named("dest-check", CHECK_THREADS));
    // The job starts now; its answer goes to `done`, not to the returned future.
    drop(threads.run(move || {
        // A panic (a bug) still answers: the request fails, its connection goes on.
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::failpoint::hit("destination-check");
            check()
        }))
        .unwrap_or_else(|_| {
            Err(ErrorInfo::new(
                ErrorCode::Internal,
                "checking the files on disk failed unexpectedly (a bug; see the log)",
            ))
        });
        done(checked);
    }));
}

/// The mount points `paths` lie under, from `/proc/self/mountinfo` (the longest mount
/// point that prefixes each path; nothing is looked up on the paths themselves, which may
/// hang). Unreadable mount table: `/` for each.
pub(super) fn mounts_of(paths: &[std::path::PathBuf]) -> Vec<std::path::PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let points: Vec<std::path::PathBuf> =
        table.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| unescape_mount(p).into()).collect();
    let mut found: Vec<std::path::PathBuf> = paths
        .iter()
        .map(|p| points.iter().filter(|m| p.starts_with(m)).max_by_key(|m| m.as_os_str().len()).cloned())
        .map(|m| m.unwrap_or_else(|| "/".into()))
        .collect();
    found.sort();
    found.dedup();
    found
}

/// A mount point as `mountinfo` writes it: space, tab, newline and backslash as octal
/// escapes (`\040`).
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let code = bytes.get(i + 1..i + 4).filter(|_| b == b'\\').and_then(|d| std::str::from_utf8(d).ok());
        match code.and_then(|d| u8::from_str_radix(d, 8).ok()) {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Destination checks at once, at most (see `check_request`).
const CHECK_THREADS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_lies_under_its_longest_mount_point() {
        assert_eq!(unescape_mount("/mnt/with\\040space"), "/mnt/with space");
        assert_eq!(unescape_mount("/plain\\"), "/plain\\");
        let mounts = mounts_of(&["/proc/self/status".into(), "/".into()]);
        assert!(mounts.contains(&"/proc".into()), "{mounts:?}");
        assert!(mounts.contains(&"/".into()), "{mounts:?}");
    }

    #[tokio::test]
    async fn removals_never_overtake_a_keep_and_replies_wait_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("s1/7.part");
        let kept = dir.path().join("resume/k.part");
        std::fs::create_dir_all(part.parent().unwrap()).unwrap();
        std::fs::write(&part, b"data").unwrap();
        let disk = Disk::start(|_| {}).unwrap();
        disk.keep(part.clone(), kept.clone());
        disk.remove(vec![part.clone()]);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let seen = kept.clone();
        disk.then(move || {
            let _ = tx.send(seen.exists());
        });
        assert!(rx.await.unwrap(), "the reply went out before the file was kept");
        assert_eq!(std::fs::read(&kept).unwrap(), b"data");
        assert!(disk.drain(Duration::from_secs(5)).await);
    }

    #[test]
    fn destinations_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let existing = dir.path().join("exists");
        std::fs::write(&existing, b"x").unwrap();
        let new = dir.path().join("new");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let own = crate::validate::OwnPlaces::resolved(vec![(state.clone(), "the state directory")], Vec::new());
        assert!(destination_on_disk(new.to_str().unwrap(), false, &own).is_ok());
        assert_eq!(
            destination_on_disk(existing.to_str().unwrap(), false, &own).unwrap_err().code,
            ErrorCode::FileError
        );
        assert!(destination_on_disk(existing.to_str().unwrap(), true, &own).is_ok());
        assert_eq!(
            destination_on_disk(dir.path().to_str().unwrap(), true, &own).unwrap_err().code,
            ErrorCode::FileError
        );
        let database = state.join("dlsessiond.db");
        assert_eq!(
            destination_on_disk(database.to_str().unwrap(), true, &own).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn garbage_is_what_no_task_refers_to() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["s1/1.part", "s1/1.tmp", "s1/2.part", "s1/3.download", "s1/6.part", "s1/9.part", "s2/4.part"] {
            std::fs::create_dir_all(d.join(f).parent().unwrap()).unwrap();
            std::fs::write(d.join(f), b"x").unwrap();
        }
        std::fs::create_dir_all(d.join("s5")).unwrap();
        std::fs::write(d.join("s5/1.part"), b"x").unwrap();
        // A live session's directory replaced by a link to the user's files, and a dead one's.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("x.txt"), b"mine").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.join("s3")).unwrap();
        std::os::unix::fs::symlink(outside.path(), d.join("s4")).unwrap();
        let g = Garbage {
            downloads: d.to_path_buf(),
            sessions: HashSet::from([1, 3]),
            first_new_session: 5,
            // Task 6 is of session 3: a file of that name in session 1's directory is no one's.
            unfinished: HashMap::from([(1, 1), (6, 3)]),
            // Stored under another path to the same cache (a link, another --cache-dir).
            locations: HashSet::from([cache_tail(Path::new("/elsewhere/cache/downloads/s1/3.download"))]),
            first_new_id: 9,
        };
        assert_eq!(collect_garbage(&g), 5, "s1/1.tmp, s1/2.part, s1/6.part, session 2's directory, session 4's link");
        assert!(outside.path().join("x.txt").exists(), "nothing is removed through a link");
        assert!(!d.join("s4").exists() && d.join("s3").exists(), "a dead session's link goes, not what it names");
        assert!(d.join("s1/1.part").exists() && d.join("s1/3.download").exists());
        assert!(!d.join("s1/1.tmp").exists() && !d.join("s1/6.part").exists());
        assert!(d.join("s1/9.part").exists(), "a task created after the list was made keeps its file");
        assert!(!d.join("s1/2.part").exists() && !d.join("s2").exists());
        assert!(d.join("s5/1.part").exists(), "a session created after the list was made keeps its files");
    }
}
