//! Moving a finished file into place, crash-safely (SPEC §8).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use rustix::fs::{CWD, RenameFlags};

/// Why a finished file could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("destination {0} already exists (pass overwrite to replace it)")]
    Exists(PathBuf),
    #[error("cannot move the finished file to {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the thread that moves finished files has stopped")]
    MoverStopped,
}

/// Why a finish could not be completed (see [`complete_move`]).
#[derive(Debug, thiserror::Error)]
pub enum CompleteError {
    /// Neither the cache nor the destination holds the complete file: download again.
    #[error("the finished file is gone")]
    Lost,
    #[error(transparent)]
    Move(#[from] MoveError),
}

/// Finishes putting a complete file of `size` bytes from `from` at `to`, wherever an
/// earlier try stopped (a crash, a failed move, a move still hanging on a dead mount when
/// it was given up): the file is moved now, or found already moved (only the same bytes
/// prove it: a file that was there before may have the same size), or found lost.
/// Leftovers of an interrupted copy are removed first.
pub fn complete_move(from: &Path, to: &Path, overwrite: bool, size: u64) -> Result<(), CompleteError> {
    remove_stale_copies(to);
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    let sync_err = |source: io::Error| MoveError::Io { path: to.to_path_buf(), source };
    match (len(from), len(to)) {
        // Copied across filesystems and renamed, but the source not yet removed. The
        // destination's directory is synced first: the cache copy is the only other one.
        (Some(a), Some(b)) if a == size && b == size && !overwrite && same_contents(from, to) => {
            sync_parent(to).map_err(sync_err)?;
            let _ = std::fs::remove_file(from);
            Ok(())
        }
        (Some(a), _) if a == size => Ok(move_into_place(from, to, overwrite)?),
        // Renamed; whether the rename is durable is not known, so make it so.
        (None, Some(b)) if b == size => Ok(sync_parent(to).map_err(sync_err)?),
        _ => Err(CompleteError::Lost),
    }
}

/// Whether two files hold the same bytes (false on any read error).
fn same_contents(a: &Path, b: &Path) -> bool {
    let (Ok(mut fa), Ok(mut fb)) = (File::open(a), File::open(b)) else { return false };
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let Ok(n) = read_full(&mut fa, &mut ba) else { return false };
        let Ok(m) = read_full(&mut fb, &mut bb) else { return false };
        if n != m || ba.get(..n) != bb.get(..m) {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..).filter(|r| !r.is_empty()) {
        match f.read(rest) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Moves `from` (synced) to `to`, then syncs `to`'s directory.
///
/// Without `overwrite` an existing `to` is never replaced (`RENAME_NOREPLACE`). Across
/// filesystems the data is copied to a temporary file beside `to`, synced, and renamed.
/// Idempotent for crash recovery: if `from` is gone and `to` exists, it was moved.
pub fn move_into_place(from: &Path, to: &Path, overwrite: bool) -> Result<(), MoveError> {
    match rename_into_place(from, to, overwrite)? {
        Renamed::Here => sync_parent(to).map_err(|source| MoveError::Io { path: to.to_path_buf(), source }),
        Renamed::OtherFilesystem => move_across(from, to, overwrite),
    }
}

/// What `rename_into_place` did.
enum Renamed {
    /// `to` names the file now; its directory is not synced yet.
    Here,
    /// `to` is on another filesystem: nothing was done (see `move_across`).
    OtherFilesystem,
}

/// The rename step of `move_into_place`, creating `to`'s missing directories.
fn rename_into_place(from: &Path, to: &Path, overwrite: bool) -> Result<Renamed, MoveError> {
    let io_err = |source: io::Error| MoveError::Io { path: to.to_path_buf(), source };
    let mut renamed = rename(from, to, overwrite);
    if renamed.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::NotFound) && from.exists() {
        // The destination's directory is missing: create it (only then) and try again.
        if let Some(dir) = to.parent() {
            create_dirs_durably(dir).map_err(io_err)?;
        }
        renamed = rename(from, to, overwrite);
    }
    match renamed {
        Ok(()) => Ok(Renamed::Here),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => Ok(Renamed::OtherFilesystem),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(MoveError::Exists(to.to_path_buf())),
        Err(e) => Err(io_err(e)),
    }
}

/// Copies `from` to `to` on another filesystem, then removes `from`.
fn move_across(from: &Path, to: &Path, overwrite: bool) -> Result<(), MoveError> {
    let io_err = |source: io::Error| MoveError::Io { path: to.to_path_buf(), source };
    copy_then_rename(from, to, overwrite)?;
    // The copy's name must be durable before the only other copy goes.
    sync_parent(to).map_err(io_err)?;
    std::fs::remove_file(from).map_err(io_err)
}

/// A finished download to put in place, and where to say how it went.
struct MoveJob {
    from: PathBuf,
    to: PathBuf,
    overwrite: bool,
    reply: tokio::sync::oneshot::Sender<Result<(), MoveError>>,
    claim: Claim,
}

/// Taken by whoever moves the file: the mover, or the caller that stopped waiting for a
/// stuck mover. Exactly one of them gets it.
#[derive(Debug, Clone, Default)]
struct Claim(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Claim {
    /// Takes the claim; false if the other side already has.
    fn take(&self) -> bool {
        !self.0.swap(true, std::sync::atomic::Ordering::AcqRel)
    }
}

/// The thread that moves finished downloads into place, in batches.
///
/// Whatever finished while the previous batch was being moved goes together: every file is
/// renamed, then each destination directory is synced once for all of them. One thread
/// instead of a blocking task per file saves two thread hand-offs per download, and
/// renames no longer queue on each other's directory locks and sync state (1,000 files of
/// 100 KiB: 18,500 context switches system-wide before, 13,100 after). A move across
/// filesystems copies the data, so it gets a thread of its own and never holds up the batch.
///
/// One slow move (a directory sync on a busy disk, a lookup on a hung network mount) must
/// not hold every other download back: while a batch has been running for more than
/// `STUCK`, new moves are done on blocking threads of their own, as before the mover, and
/// a move that has waited `STUCK` in the queue is taken back by its caller and done the
/// same way (unless the mover has started on it).
#[derive(Debug)]
pub struct Mover {
    tx: std::sync::mpsc::Sender<MoveJob>,
    clock: std::sync::Arc<MoverClock>,
}

/// When the running batch started, in µs after `base` plus one (0: no batch running).
#[derive(Debug)]
struct MoverClock {
    base: std::time::Instant,
    batch_since: std::sync::atomic::AtomicU64,
}

impl MoverClock {
    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX - 1) + 1
    }
}

/// How long a batch may run before new moves stop waiting for it.
const STUCK: std::time::Duration = std::time::Duration::from_millis(250);

impl Mover {
    /// Starts the thread; it ends when the `Mover` is dropped and its queue is empty.
    pub fn start() -> io::Result<Mover> {
        let (tx, rx) = std::sync::mpsc::channel::<MoveJob>();
        let clock = std::sync::Arc::new(MoverClock {
            base: std::time::Instant::now(),
            batch_since: std::sync::atomic::AtomicU64::new(0),
        });
        let shared = clock.clone();
        std::thread::Builder::new().name("dl-mover".into()).spawn(move || mover_loop(&rx, &shared))?;
        Ok(Mover { tx, clock })
    }

    /// `move_into_place`, done on the mover thread (or, while it is stuck, on a thread of
    /// its own), with the failpoints of the finish protocol around it.
    pub async fn move_into_place(&self, from: PathBuf, to: PathBuf, overwrite: bool) -> Result<(), MoveError> {
        let since = self.clock.batch_since.load(std::sync::atomic::Ordering::Acquire);
        if since != 0 && u128::from(self.clock.now().saturating_sub(since)) > STUCK.as_micros() {
            tracing::debug!(to = %to.display(), "the mover is busy; moving on a thread of its own");
            return move_on_own_thread(from, to, overwrite).await;
        }
        let (reply, mut done) = tokio::sync::oneshot::channel();
        let claim = Claim::default();
        let job = MoveJob { from: from.clone(), to: to.clone(), overwrite, reply, claim: claim.clone() };
        if let Err(std::sync::mpsc::SendError(job)) = self.tx.send(job) {
            // The mover thread is gone (it cannot panic short of a bug): move without it.
            tracing::warn!(to = %job.to.display(), "the mover thread has stopped; moving on a thread of its own");
            return move_on_own_thread(job.from, job.to, job.overwrite).await;
        }
        tokio::select! {
            moved = &mut done => return moved.map_err(|_| MoveError::MoverStopped)?,
            () = tokio::time::sleep(STUCK) => {}
        }
        // Still queued behind a slow batch: move it here, unless the mover has started.
        if claim.take() {
            tracing::debug!(to = %to.display(), "the mover is stuck; moving on a thread of its own");
            return move_on_own_thread(from, to, overwrite).await;
        }
        done.await.map_err(|_| MoveError::MoverStopped)?
    }
}

/// `move_into_place` on a blocking thread of its own, with the finish protocol's failpoints.
async fn move_on_own_thread(from: PathBuf, to: PathBuf, overwrite: bool) -> Result<(), MoveError> {
    let moved = tokio::task::spawn_blocking(move || {
        crate::failpoint::hit("finish-before-move");
        after_move(move_into_place(&from, &to, overwrite))
    });
    moved.await.map_err(|_| MoveError::MoverStopped)?
}

/// Passes a move's result on, hitting the `finish-after-move` failpoint when it succeeded
/// (the file is in place and its directory synced).
fn after_move(moved: Result<(), MoveError>) -> Result<(), MoveError> {
    if moved.is_ok() {
        crate::failpoint::hit("finish-after-move");
    }
    moved
}

/// Marks a batch as running for as long as it lives, even if the batch panics.
struct BatchRunning<'a>(&'a MoverClock);

impl<'a> BatchRunning<'a> {
    fn start(clock: &'a MoverClock) -> BatchRunning<'a> {
        clock.batch_since.store(clock.now(), std::sync::atomic::Ordering::Release);
        BatchRunning(clock)
    }
}

impl Drop for BatchRunning<'_> {
    fn drop(&mut self) {
        self.0.batch_since.store(0, std::sync::atomic::Ordering::Release);
    }
}

/// Most files moved before their directories are synced (and their callers answered).
const MOVE_BATCH: usize = 256;

fn mover_loop(rx: &std::sync::mpsc::Receiver<MoveJob>, clock: &MoverClock) {
    while let Ok(first) = rx.recv() {
        let _running = BatchRunning::start(clock);
        move_batch(first, rx);
    }
}

fn move_batch(first: MoveJob, rx: &std::sync::mpsc::Receiver<MoveJob>) {
    let mut batch = vec![first];
    while batch.len() < MOVE_BATCH {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    let mut renamed = Vec::with_capacity(batch.len());
    for job in batch {
        if !job.claim.take() {
            // Its caller gave up waiting and moves it on a thread of its own.
            continue;
        }
        crate::failpoint::hit("finish-before-move");
        match rename_into_place(&job.from, &job.to, job.overwrite) {
            Ok(Renamed::Here) => renamed.push(job),
            Ok(Renamed::OtherFilesystem) => {
                let copy = |job: MoveJob| {
                    let _ = job.reply.send(after_move(move_across(&job.from, &job.to, job.overwrite)));
                };
                // The job comes back if the thread cannot start: then it is copied here.
                let slot = std::sync::Arc::new(Mutex::new(Some(job)));
                let theirs = slot.clone();
                let spawned = std::thread::Builder::new().name("dl-copy".into()).spawn(move || {
                    if let Some(job) = theirs.lock().ok().and_then(|mut j| j.take()) {
                        copy(job);
                    }
                });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a thread to copy a finished file; copying on the mover");
                    if let Some(job) = slot.lock().ok().and_then(|mut j| j.take()) {
                        copy(job);
                    }
                }
            }
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
    }
    // One sync per destination directory covers every rename in it.
    let mut synced: HashMap<PathBuf, Option<(io::ErrorKind, String)>> = HashMap::new();
    for job in renamed {
        let dir = parent_dir(&job.to).to_path_buf();
        let outcome =
            synced.entry(dir).or_insert_with_key(|dir| DIR_SYNCS.sync(dir).err().map(|e| (e.kind(), e.to_string())));
        let result = match outcome {
            None => Ok(()),
            Some((kind, msg)) => {
                Err(MoveError::Io { path: job.to.clone(), source: io::Error::new(*kind, msg.clone()) })
            }
        };
        let _ = job.reply.send(after_move(result));
    }
}

fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// `create_dir_all`, with each new directory's entry synced into its parent: a finished
/// file is only as durable as the directories leading to it.
fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d);
        cur = d.parent();
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => sync_parent(d)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn rename(from: &Path, to: &Path, overwrite: bool) -> io::Result<()> {
    if overwrite {
        std::fs::rename(from, to)
    } else {
        rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE).map_err(io::Error::from)
    }
}

/// The temporary name a copy across filesystems is written under, beside `to`: the pid
/// and a per-process sequence number keep concurrent copies apart.
fn copy_temp_path(to: &Path, pid: u32, seq: u64) -> PathBuf {
    let name = to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    to.with_file_name(format!(".{name}.dlsessiond-{pid}-{seq}.tmp"))
}

static COPY_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Creates a fresh temporary file for a copy to `to`, skipping names already taken (left
/// by an earlier process that had the same pid, say).
fn create_copy_temp(to: &Path) -> io::Result<(PathBuf, File)> {
    for _ in 0..64 {
        let seq = COPY_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = copy_temp_path(to, std::process::id(), seq);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("no free temporary name beside the destination"))
}

/// Removes copies to `to` that an interrupted move left half-written. Recovery calls it
/// before this process moves anything, so a copy named by this process's own pid is a
/// leftover too (pids repeat, in containers every start); a copy by another live process
/// (a second daemon of this user, copying right now) is left alone.
pub fn remove_stale_copies(to: &Path) {
    let (Some(dir), Some(name)) = (to.parent(), to.file_name()) else { return };
    let prefix = format!(".{}.dlsessiond-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        let Some(tag) = file.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(".tmp")) else { continue };
        // "PID-SEQ", or "PID" from before sequence numbers.
        let (pid, seq) = tag.split_once('-').unwrap_or((tag, "0"));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let Some(pid) = pid.parse::<i32>().ok().filter(|_| digits(pid) && digits(seq)) else { continue };
        if pid != i32::try_from(std::process::id()).unwrap_or(-1) && is_running(pid) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => tracing::info!(path = %entry.path().display(), "removed a copy left by an interrupted move"),
            Err(e) => tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a stale copy"),
        }
    }
}

/// Whether a process `pid` exists (ours to signal or not).
fn is_running(pid: i32) -> bool {
    match rustix::process::Pid::from_raw(pid) {
        Some(pid) => !matches!(rustix::process::test_kill_process(pid), Err(rustix::io::Errno::SRCH)),
        None => false,
    }
}

fn copy_then_rename(from: &Path, to: &Path, overwrite: bool) -> Result<(), MoveError> {
    let io_err = |source: io::Error| MoveError::Io { path: to.to_path_buf(), source };
    let (tmp, mut dst) = create_copy_temp(to).map_err(io_err)?;
    let result = (|| {
        let mut src = File::open(from)?;
        // The copy is handed over with the file's mode, not the daemon's umask.
        dst.set_permissions(src.metadata()?.permissions())?;
        io::copy(&mut src, &mut dst)?;
        dst.sync_all()?;
        rename(&tmp, to, overwrite)
    })();
    if let Err(e) = result {
        // The temporary file is ours: created above.
        let _ = std::fs::remove_file(&tmp);
        return Err(if e.kind() == io::ErrorKind::AlreadyExists {
            MoveError::Exists(to.to_path_buf())
        } else {
            io_err(e)
        });
    }
    Ok(())
}

/// fsyncs the directory holding `path`, making a rename in it durable.
///
/// Concurrent callers for one directory share syncs (a group commit for directories): a
/// sync that starts after a caller's rename covers it, so many finishing downloads in one
/// directory cost a few fsyncs, not one each.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    DIR_SYNCS.sync(parent_dir(path))
}

static DIR_SYNCS: DirSyncs = DirSyncs { state: Mutex::new(None), done: Condvar::new() };

struct DirSyncs {
    state: Mutex<Option<HashMap<PathBuf, DirSync>>>,
    done: Condvar,
}

#[derive(Default)]
struct DirSync {
    /// Requests so far; a sync started when this was N covers requests 1..=N.
    requested: u64,
    /// Requests covered by a finished sync.
    covered: u64,
    running: bool,
    /// The error of the last sync, handed to the requests it covered.
    failed: Option<(u64, io::ErrorKind, String)>,
}

impl DirSyncs {
    fn sync(&self, dir: &Path) -> io::Result<()> {
        let poisoned = || io::Error::other("directory sync state poisoned");
        let mut guard = self.state.lock().map_err(|_| poisoned())?;
        let entry = guard.get_or_insert_with(HashMap::new).entry(dir.to_path_buf()).or_default();
        entry.requested += 1;
        let mine = entry.requested;
        loop {
            // An entry disappears only once every request was covered by a good sync.
            let Some(entry) = guard.get_or_insert_with(HashMap::new).get_mut(dir) else { return Ok(()) };
            if entry.covered >= mine {
                return match &entry.failed {
                    Some((upto, kind, msg)) if *upto >= mine => Err(io::Error::new(*kind, msg.clone())),
                    _ => Ok(()),
                };
            }
            if entry.running {
                guard = self.done.wait(guard).map_err(|_| poisoned())?;
                continue;
            }
            entry.running = true;
            let target = entry.requested;
            drop(guard);
            let result = File::open(dir).and_then(|d| d.sync_all());
            guard = self.state.lock().map_err(|_| poisoned())?;
            let map = guard.get_or_insert_with(HashMap::new);
            if let Some(entry) = map.get_mut(dir) {
                entry.running = false;
                entry.covered = target;
                entry.failed = result.as_ref().err().map(|e| (target, e.kind(), e.to_string()));
                // Forget idle directories so the map does not grow with every destination.
                if entry.covered == entry.requested && entry.failed.is_none() {
                    map.remove(dir);
                }
            }
            self.done.notify_all();
            return result;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_directory_syncs_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        // Many rounds of many threads: waiters must also survive the entry being removed
        // by the sync that covered them.
        for round in 0..50 {
            let threads: Vec<_> = (0..16)
                .map(|i| {
                    let f = dir.path().join(format!("f{round}-{i}"));
                    std::thread::spawn(move || {
                        std::fs::write(&f, b"x").unwrap();
                        sync_parent(&f)
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap().unwrap();
            }
        }
        assert!(sync_parent(Path::new("/nonexistent/dir/file")).is_err(), "errors reach the caller");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_mover_puts_a_batch_in_place_and_answers_each_file() {
        use std::os::unix::fs::MetadataExt;
        let cache = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let mover = std::sync::Arc::new(Mover::start().unwrap());
        std::fs::write(dest.path().join("taken"), b"theirs").unwrap();
        // Another filesystem, if this machine has one: the copy path runs on its own thread.
        let other = tempfile::tempdir_in("/dev/shm")
            .ok()
            .filter(|d| std::fs::metadata(d.path()).unwrap().dev() != std::fs::metadata(cache.path()).unwrap().dev());
        let mut moves = Vec::new();
        for i in 0..40u32 {
            let from = cache.path().join(format!("{i}.part"));
            std::fs::write(&from, i.to_le_bytes()).unwrap();
            let to = match i {
                0 => dest.path().join("taken"),
                1 => dest.path().join("new/deeper/f1"),
                2 => other.as_ref().map_or_else(|| dest.path().join("f2"), |o| o.path().join("f2")),
                _ => dest.path().join(format!("d{}/f{i}", i % 3)),
            };
            if i >= 3 {
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            }
            let mover = mover.clone();
            moves.push(tokio::spawn(async move { (i, to.clone(), mover.move_into_place(from, to, false).await) }));
        }
        for m in moves {
            let (i, to, result) = m.await.unwrap();
            if i == 0 {
                assert!(matches!(result, Err(MoveError::Exists(_))), "{result:?}");
                assert_eq!(std::fs::read(&to).unwrap(), b"theirs", "never replaced without overwrite");
                assert!(cache.path().join("0.part").exists(), "the download stays");
            } else {
                result.unwrap();
                assert_eq!(std::fs::read(&to).unwrap(), i.to_le_bytes(), "file {i}");
                assert!(!cache.path().join(format!("{i}.part")).exists(), "file {i} moved, not copied");
            }
        }
    }

    #[test]
    fn stale_copies_of_an_interrupted_move_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("report.pdf");
        // A process that has exited.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = [
            copy_temp_path(&to, dead, 3),
            // This process's own pid: recovery runs before any move of ours, so it was a
            // process before us with the same pid.
            copy_temp_path(&to, std::process::id(), 0),
            // The name used before sequence numbers.
            dir.path().join(format!(".report.pdf.dlsessiond-{dead}.tmp")),
        ];
        let keep = [
            // A live process (init) may be copying right now.
            copy_temp_path(&to, 1, 0),
            dir.path().join(".report.pdf.dlsessiond-12x.tmp"),
            dir.path().join(".report.pdf.dlsessiond-7-x.tmp"),
            dir.path().join(".other.pdf.dlsessiond-7-0.tmp"),
            dir.path().join("report.pdf.dlsessiond-7-0.tmp"),
            dir.path().join(".report.pdf.dlsessiond-.tmp"),
        ];
        for p in keep.iter().chain(&stale) {
            std::fs::write(p, b"x").unwrap();
        }
        remove_stale_copies(&to);
        for p in &stale {
            assert!(!p.exists(), "{} is a leftover and goes", p.display());
        }
        for p in &keep {
            assert!(p.exists(), "{} is not a leftover of ours and stays", p.display());
        }
        remove_stale_copies(&dir.path().join("missing-dir/x"));
    }

    #[test]
    fn a_copy_skips_a_temporary_name_that_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("f");
        // Leftovers under the next names this process would pick.
        let next = COPY_SEQ.load(std::sync::atomic::Ordering::Relaxed);
        for seq in next..next + 3 {
            std::fs::write(copy_temp_path(&to, std::process::id(), seq), b"old").unwrap();
        }
        let src = dir.path().join("src");
        std::fs::write(&src, b"new data").unwrap();
        copy_then_rename(&src, &to, false).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"new data", "not refused as if the destination existed");
    }

    #[test]
    fn a_finish_completes_wherever_an_earlier_try_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("1.part");
        let to = dir.path().join("out/f");
        // Not moved yet.
        std::fs::write(&from, b"12345").unwrap();
        complete_move(&from, &to, false, 5).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"12345");
        assert!(!from.exists());
        // Moved already (the source is gone): nothing to do but sync.
        complete_move(&from, &to, false, 5).unwrap();
        // Copied already, the source not yet removed: adopted only with the same bytes.
        std::fs::write(&from, b"12345").unwrap();
        complete_move(&from, &to, false, 5).unwrap();
        assert!(!from.exists());
        std::fs::write(&from, b"54321").unwrap();
        assert!(matches!(complete_move(&from, &to, false, 5), Err(CompleteError::Move(MoveError::Exists(_)))));
        assert_eq!(std::fs::read(&from).unwrap(), b"54321", "kept");
        // Gone from both places: lost.
        std::fs::remove_file(&from).unwrap();
        std::fs::remove_file(&to).unwrap();
        assert!(matches!(complete_move(&from, &to, false, 5), Err(CompleteError::Lost)));
        // A short cache file is not a finished download.
        std::fs::write(&from, b"123").unwrap();
        assert!(matches!(complete_move(&from, &to, false, 5), Err(CompleteError::Lost)));
    }

    #[test]
    fn refuses_to_overwrite_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("sub/b");
        std::fs::write(&a, b"new").unwrap();
        move_into_place(&a, &b, false).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"new");
        assert!(!a.exists());
        std::fs::write(&a, b"newer").unwrap();
        assert!(matches!(move_into_place(&a, &b, false), Err(MoveError::Exists(_))));
        assert_eq!(std::fs::read(&b).unwrap(), b"new", "existing file untouched");
        move_into_place(&a, &b, true).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"newer");
        // Several missing levels are created (and synced) on the way.
        std::fs::write(&a, b"deep").unwrap();
        let deep = dir.path().join("x/y/z/f");
        move_into_place(&a, &deep, false).unwrap();
        assert_eq!(std::fs::read(&deep).unwrap(), b"deep");
    }
}
