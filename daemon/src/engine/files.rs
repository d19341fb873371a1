//! Moving a finished file into place, crash-safely (docs/behaviour.md, "Durability").

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::sync::Arc;

use rustix::fs::{CWD, RenameFlags};

use super::progress::Progress;

/// Why a finished file could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("destination {0} already exists (pass overwrite to replace it)")]
    Exists(PathBuf),
    #[error("cannot move the finished file to {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the thread that moves finished files has stopped")]
    MoverStopped,
    /// The destination is on another filesystem, and a copy does not carry the file's
    /// mark; or its filesystem cannot rename without replacing, and the link that does it
    /// there leaves two names after a crash: the finishing phase must be committed first
    /// (nothing was done).
    #[error("{0} cannot take the file by a plain rename; the finish must be recorded first")]
    Unrecorded(PathBuf),
}

/// The extended attribute a finished file carries: its task's mark ([`mark`]), set before
/// the file's last `fsync` and so durable with its data. Renamed into place, the file
/// keeps it; after a crash between the move and the commit that records it, the mark at
/// the destination proves the file there is the task's own, complete (docs/behaviour.md,
/// "Durability"). It stays on the delivered file (it names the task that wrote it).
pub const MARK: &str = "user.dlsessiond.task";

/// Sets the task's mark on a finished file (see [`MARK`]). Fails where the filesystem
/// keeps no user extended attributes.
pub fn mark(file: &File, mark: &str) -> io::Result<()> {
    rustix::fs::fsetxattr(file, MARK, mark.as_bytes(), rustix::fs::XattrFlags::empty()).map_err(io::Error::from)
}

/// A task's finished file found at its destination, marked (see [`found_in_place`]).
#[derive(Debug)]
pub struct Found {
    pub size: u64,
    /// Syncing the destination's directory, which makes the move durable.
    pub synced: io::Result<()>,
}

impl Found {
    /// Where the file is, its size, and the error that keeps it from counting as moved yet
    /// (its directory could not be synced: the move is tried again).
    pub fn outcome(self, to: &Path) -> (String, u64, Option<dlsession_proto::ErrorInfo>) {
        let error = self.synced.err().map(|e| {
            dlsession_proto::ErrorInfo::new(
                dlsession_proto::ErrorCode::DestinationUnavailable,
                format!("cannot sync the directory of {}: {e}; the download is kept", to.display()),
            )
        });
        (to.to_string_lossy().into_owned(), self.size, error)
    }
}

/// Looks for the task's finished file at `to` when its partial file `part` is gone: a file
/// there that carries `mark` was renamed into place before a crash cut the finish short.
/// It counts only as a regular file of this user that nobody else may write and that has
/// no other name (another user can write any mark on a file of their own, or on one of
/// ours they may write), with the expected SHA-256 when the task has one. Its directory is
/// synced before it counts. Anything that cannot be examined is not found: the download
/// goes on, and its move deals with the destination.
pub fn found_in_place(part: &Path, to: &Path, mark: &str, sha256: Option<[u8; 32]>) -> Option<Found> {
    match std::fs::symlink_metadata(part) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        // Still there (or unknown): not renamed.
        _ => return None,
    }
    let size = marked_size(to, mark, sha256)?;
    Some(Found { size, synced: sync_parent(to) })
}

/// The size of the file at `to` if it is the task's (see [`found_in_place`]): a regular
/// file of this user, written by nobody else, with no other name, carrying `mark`, with
/// the SHA-256 `sha256` when given.
fn marked_size(to: &Path, mark: &str, sha256: Option<[u8; 32]>) -> Option<u64> {
    let (mut file, meta) = open_own(to, 0, None)?;
    let mut buf = [0u8; 128];
    let n = rustix::fs::fgetxattr(&file, MARK, &mut buf[..]).ok()?;
    if buf.get(..n) != Some(mark.as_bytes()) {
        return None;
    }
    if sha256.is_some_and(|expected| sha256_of(&mut file) != Some(expected)) {
        return None;
    }
    Some(meta.len())
}

/// `to` opened for reading if it is a regular file of this user (not a link to one) that
/// nobody else may write beyond the `allowed` group/other write bits, with one name (or
/// two, the other being `also`: a hard link left by a move that crashed between its link
/// and its unlink). Anything else may be someone else's and is never taken for ours.
fn open_own(to: &Path, allowed: u32, also: Option<&Path>) -> Option<(File, std::fs::Metadata)> {
    let euid = rustix::process::geteuid().as_raw();
    // Never opened unless it looks like a candidate (a device or FIFO is not opened at all).
    let looked = std::fs::symlink_metadata(to).ok()?;
    if !looked.is_file() || looked.uid() != euid {
        return None;
    }
    // One descriptor for every check: the name cannot be swapped between them.
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(to).ok()?;
    let meta = file.metadata().ok()?;
    let one_name = meta.nlink() == 1
        || (meta.nlink() == 2
            && also
                .and_then(|p| std::fs::symlink_metadata(p).ok())
                .is_some_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino()));
    let writable_by_others = meta.mode() & 0o022 & !allowed != 0;
    (meta.is_file() && meta.uid() == euid && !writable_by_others && one_name).then_some((file, meta))
}

/// The SHA-256 of what is left to read of `file` (`None` on a read error).
fn sha256_of(file: &mut File) -> Option<[u8; 32]> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match read_full(file, &mut buf).ok()? {
            0 => return Some(hasher.finalize().into()),
            n => hasher.update(buf.get(..n)?),
        }
    }
}

/// Whether the file of the task's size at `to`, its cache copy gone, is the task's own
/// (moved before a crash cut the finish short) rather than one that was there before (the
/// reason an earlier move failed) while the cache copy was cleaned away. Its mark proves
/// it; without one it counts only where the filesystem keeps no marks (so the task's file
/// could not carry one either), or when the task's file was never marked (others may
/// write it). The expected SHA-256, when the task has one, must match either way.
fn proven_ours(to: &Path, job: &Finish) -> bool {
    if let Some(mark) = job.mark.as_deref() {
        if marked_size(to, mark, job.sha256) == Some(job.size) {
            return true;
        }
        // A mark of another task, or none where one could be kept: not ours.
        let kept_none = matches!(rustix::fs::lgetxattr(to, MARK, &mut [0u8; 0][..]), Err(rustix::io::Errno::NOTSUP));
        if !kept_none {
            return false;
        }
    }
    let Some((mut file, _)) = open_own(to, job.mode & 0o022, None) else { return false };
    job.sha256.is_none_or(|expected| sha256_of(&mut file) == Some(expected))
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

/// A finished file to put in place: `size` synced bytes at `from`, handed over at `to`
/// with `mode`.
#[derive(Debug, Clone)]
pub struct Finish {
    pub from: PathBuf,
    pub to: PathBuf,
    pub overwrite: bool,
    pub size: u64,
    pub mode: u32,
    /// Where a long copy shows it is alive.
    pub progress: Arc<Progress>,
    /// The finishing phase is committed. When it is not, the file carries its mark and
    /// may only be renamed: a move across filesystems fails with [`MoveError::Unrecorded`].
    pub recorded: bool,
    /// The task's mark (see [`MARK`]), when the file's mode lets nobody else write it: a
    /// copy across filesystems gets it too, and only a destination carrying it counts as
    /// the task's file once the cache copy is gone.
    pub mark: Option<String>,
    /// The SHA-256 the task expects, checked as well when the file is found that way.
    pub sha256: Option<[u8; 32]>,
}

/// Which half-written copies next to a destination are leftovers (see [`remove_stale_copies`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftovers {
    /// At start, before this process moved anything: a copy named by its own pid is one
    /// too (pids repeat).
    Any,
    /// While running: only copies of processes that no longer exist (a copy of ours that
    /// hung and was given up may still be writing).
    OthersOnly,
}

/// Finishes putting a complete file in place, wherever an earlier try stopped (a crash, a
/// failed move, a move still hanging on a dead mount when it was given up): the file is
/// moved now, or found already moved (only the same bytes prove it: a file that was there
/// before may have the same size), or found lost. Leftovers of an interrupted copy are
/// removed first. A file that cannot even be looked at is an error, never "lost": lost
/// means downloading again, and the data may well be there.
pub fn complete_move(job: &Finish, leftovers: Leftovers) -> Result<(), CompleteError> {
    let (from, to) = (job.from.as_path(), job.to.as_path());
    remove_stale_copies(to, leftovers);
    let io_err = |source: io::Error| MoveError::Io { path: to.to_path_buf(), source };
    let size_of = |p: &Path| match std::fs::metadata(p) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(MoveError::Io { path: p.to_path_buf(), source: e }),
    };
    let size = job.size;
    match (size_of(from)?, size_of(to)?) {
        // Copied across filesystems and renamed, but the source not yet removed. The
        // destination's directory is synced first: the cache copy is the only other one.
        // Only a file that is ours counts: another user's file of the same bytes planted
        // there (or a link to one) could be changed once the cache copy is gone.
        (Some(a), Some(b))
            if a == size
                && b == size
                && !job.overwrite
                && open_own(to, job.mode & 0o022, Some(from)).is_some_and(|(f, _)| same_contents(from, f)) =>
        {
            sync_parent(to).map_err(io_err)?;
            let _ = std::fs::remove_file(from);
            Ok(())
        }
        (Some(a), _) if a == size => {
            // Its mode, in case a crash came before it was made durable.
            std::fs::set_permissions(from, std::fs::Permissions::from_mode(job.mode)).map_err(io_err)?;
            Ok(move_into_place(job)?)
        }
        // Renamed; whether the rename is durable is not known, so make it so. Only if it is
        // ours: a file of the same size may have been there all along (the reason the move
        // failed) while the cache copy was cleaned away.
        (None, Some(b)) if b == size && proven_ours(to, job) => Ok(sync_parent(to).map_err(io_err)?),
        _ => Err(CompleteError::Lost),
    }
}

/// Whether the file at `a` holds the same bytes as `fb` (false on any read error).
fn same_contents(a: &Path, mut fb: File) -> bool {
    let Ok(mut fa) = File::open(a) else { return false };
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
/// filesystems the data is copied to a temporary file beside `to`, synced, and renamed
/// (showing signs of life in `progress` as it goes).
pub fn move_into_place(job: &Finish) -> Result<(), MoveError> {
    match rename_into_place(job)? {
        Renamed::Here => sync_parent(&job.to).map_err(|source| MoveError::Io { path: job.to.clone(), source }),
        Renamed::OtherFilesystem => move_across(job),
    }
}

/// The mode of a directory made for a file of `mode`: searchable where readable (0644
/// gives 0755, 0640 gives 0750), as the app's own umask would have made it.
fn dir_mode(mode: u32) -> u32 {
    // The owner may always write and search it: a file handed over read-only (umask 0222)
    // made a read-only directory no move could enter.
    (mode | ((mode & 0o444) >> 2) | 0o300) & 0o777
}

/// What `rename_into_place` did.
enum Renamed {
    /// `to` names the file now; its directory is not synced yet.
    Here,
    /// `to` is on another filesystem: nothing was done (see `move_across`). Only for a
    /// recorded finish: an unrecorded one gets [`MoveError::Unrecorded`].
    OtherFilesystem,
}

/// The rename step of `move_into_place`, creating `to`'s missing directories (`dir_mode`).
fn rename_into_place(job: &Finish) -> Result<Renamed, MoveError> {
    let (from, to, overwrite) = (job.from.as_path(), job.to.as_path(), job.overwrite);
    let io_err = |source: io::Error| MoveError::Io { path: to.to_path_buf(), source };
    let fallback = if job.recorded { NoReplace::Link } else { NoReplace::Refuse };
    let mut renamed = rename(from, to, overwrite, fallback);
    if renamed.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::NotFound) && from.exists() {
        // The destination's directory is missing: create it (only then) and try again.
        if let Some(dir) = to.parent() {
            create_dirs_durably(dir, dir_mode(job.mode)).map_err(io_err)?;
        }
        renamed = rename(from, to, overwrite, fallback);
    }
    match renamed {
        Ok(()) => Ok(Renamed::Here),
        Err(e) if e.kind() == io::ErrorKind::Unsupported => Err(MoveError::Unrecorded(to.to_path_buf())),
        // A copy would not carry the mark that proves an unrecorded finish.
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) && !job.recorded => {
            Err(MoveError::Unrecorded(to.to_path_buf()))
        }
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => Ok(Renamed::OtherFilesystem),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(MoveError::Exists(to.to_path_buf())),
        Err(e) => Err(io_err(e)),
    }
}

/// Copies `from` to `to` on another filesystem, then removes `from`.
fn move_across(job: &Finish) -> Result<(), MoveError> {
    let io_err = |source: io::Error| MoveError::Io { path: job.to.clone(), source };
    copy_then_rename(job)?;
    // The copy's name must be durable before the only other copy goes.
    sync_parent(&job.to).map_err(io_err)?;
    std::fs::remove_file(&job.from).map_err(io_err)
}

/// A finished download to put in place, and where to say how it went.
struct MoveJob {
    finish: Finish,
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
    pub async fn move_into_place(&self, finish: Finish) -> Result<(), MoveError> {
        let since = self.clock.batch_since.load(std::sync::atomic::Ordering::Acquire);
        if since != 0 && u128::from(self.clock.now().saturating_sub(since)) > STUCK.as_micros() {
            tracing::debug!(to = %finish.to.display(), "the mover is busy; moving on a thread of its own");
            return move_on_own_thread(finish).await;
        }
        let (reply, mut done) = tokio::sync::oneshot::channel();
        let claim = Claim::default();
        let job = MoveJob { finish: finish.clone(), reply, claim: claim.clone() };
        if let Err(std::sync::mpsc::SendError(job)) = self.tx.send(job) {
            // The mover thread is gone (it cannot panic short of a bug): move without it.
            tracing::warn!(to = %job.finish.to.display(), "the mover thread has stopped; moving on a thread of its own");
            return move_on_own_thread(job.finish).await;
        }
        tokio::select! {
            moved = &mut done => return moved.map_err(|_| MoveError::MoverStopped)?,
            () = tokio::time::sleep(STUCK) => {}
        }
        // Still queued behind a slow batch: move it here, unless the mover has started.
        if claim.take() {
            tracing::debug!(to = %finish.to.display(), "the mover is stuck; moving on a thread of its own");
            return move_on_own_thread(finish).await;
        }
        done.await.map_err(|_| MoveError::MoverStopped)?
    }
}

/// `move_into_place` on a blocking thread of its own, with the finish protocol's failpoints.
async fn move_on_own_thread(finish: Finish) -> Result<(), MoveError> {
    let moved = tokio::task::spawn_blocking(move || {
        crate::failpoint::hit("finish-before-move");
        after_move(move_into_place(&finish))
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
        match rename_into_place(&job.finish) {
            Ok(Renamed::Here) => renamed.push(job),
            Ok(Renamed::OtherFilesystem) => {
                let copy = |job: MoveJob| {
                    let _ = job.reply.send(after_move(move_across(&job.finish)));
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
        let to = &job.finish.to;
        let outcome = synced
            .entry(parent_dir(to).to_path_buf())
            .or_insert_with_key(|dir| DIR_SYNCS.sync(dir, to).err().map(|e| (e.kind(), e.to_string())));
        let result = match outcome {
            None => Ok(()),
            Some((kind, msg)) => {
                Err(MoveError::Io { path: job.finish.to.clone(), source: io::Error::new(*kind, msg.clone()) })
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
fn create_dirs_durably(dir: &Path, mode: u32) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d);
        cur = d.parent();
    }
    for d in missing.into_iter().rev() {
        // Private until its mode is set: never, for a moment, what the umask allows.
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            // Set explicitly: the daemon's own umask (whatever started it: an autostarting
            // app's, or a unit's) must not decide the user's new directories' mode.
            // Through a descriptor of the directory itself, never a link put in its place.
            Ok(()) => {
                let made = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                    .open(d)?;
                made.set_permissions(std::fs::Permissions::from_mode(mode))?;
                sync_parent(d)?;
            }
            // Made by someone else since we looked: only a directory of ours is used (another
            // user's could swap the file once it is delivered).
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let meta = std::fs::symlink_metadata(d)?;
                if !meta.is_dir() || meta.uid() != rustix::process::geteuid().as_raw() {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("{} appeared meanwhile, not a directory of ours", d.display()),
                    ));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What a rename that must not replace does where the filesystem has no
/// `RENAME_NOREPLACE` (NFS, FUSE filesystems without rename flags: `EINVAL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoReplace {
    /// A hard link, then the old name removed (see [`link_then_unlink`]).
    Link,
    /// An `Unsupported` error, nothing done: a crash between the link and the removal
    /// would leave two names, which only a recorded finish resolves (`complete_move`).
    Refuse,
}

/// Renames `from` to `to`. Without `overwrite` an existing `to` is never replaced
/// (`AlreadyExists`).
fn rename(from: &Path, to: &Path, overwrite: bool, fallback: NoReplace) -> io::Result<()> {
    if overwrite {
        return std::fs::rename(from, to);
    }
    match rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => match fallback {
            NoReplace::Link => link_then_unlink(from, to),
            NoReplace::Refuse => {
                Err(io::Error::new(io::ErrorKind::Unsupported, "this filesystem cannot rename without replacing"))
            }
        },
        Err(e) => Err(e.into()),
    }
}

/// A rename that never replaces, where the filesystem cannot do one: a hard link (which
/// never replaces), its directory synced, then the old name removed. A crash in between
/// leaves both names with the same bytes, which `complete_move` resolves by removing the
/// cache copy. Where there are no hard links either, `to` is looked at, then renamed over:
/// a file made there in that instant would be replaced.
fn link_then_unlink(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::io::Errno;
    match std::fs::hard_link(from, to) {
        // The new name durable before the old one goes: a crash between them leaves two
        // names, never none.
        Ok(()) => {
            sync_parent(to)?;
            std::fs::remove_file(from)
        }
        Err(e)
            if [Errno::PERM, Errno::OPNOTSUPP, Errno::NOSYS, Errno::MLINK]
                .iter()
                .any(|n| e.raw_os_error() == Some(n.raw_os_error())) =>
        {
            match std::fs::symlink_metadata(to) {
                Ok(_) => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
                Err(missing) if missing.kind() == io::ErrorKind::NotFound => std::fs::rename(from, to),
                Err(other) => Err(other),
            }
        }
        Err(e) => Err(e),
    }
}

/// The temporary name a copy across filesystems is written under, beside `to`: the pid
/// and a per-process sequence number keep concurrent copies apart.
fn copy_temp_path(to: &Path, pid: u32, seq: u64) -> PathBuf {
    let name = to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    to.with_file_name(format!("{}{pid}-{seq}.tmp", copy_temp_prefix(&name)))
}

/// How the temporary names of copies to a file named `name` start. The name is cut (at a
/// character) so that the whole stays within a name's 255 bytes whatever the pid and
/// sequence number: a destination of a long name could otherwise never be copied to.
fn copy_temp_prefix(name: &str) -> String {
    // ".", ".dlsessiond-", up to 20 digits, "-", up to 20 digits, ".tmp".
    const ROOM: usize = 255 - (1 + 12 + 20 + 1 + 20 + 4);
    format!(".{}.dlsessiond-", &name[..name.floor_char_boundary(ROOM)])
}

static COPY_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Creates a fresh temporary file for a copy to `to`, skipping names already taken (left
/// by an earlier process that had the same pid, say).
fn create_copy_temp(to: &Path) -> io::Result<(PathBuf, File)> {
    for _ in 0..64 {
        let seq = COPY_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = copy_temp_path(to, std::process::id(), seq);
        // Private from the start (the task's mode is set next): under a loose umask another
        // user could open it in between and keep a handle to write through.
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp) {
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
pub fn remove_stale_copies(to: &Path, leftovers: Leftovers) {
    let (Some(dir), Some(name)) = (to.parent(), to.file_name()) else { return };
    let prefix = copy_temp_prefix(&name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        let Some(tag) = file.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(".tmp")) else { continue };
        // "PID-SEQ", or "PID" from before sequence numbers.
        let (pid, seq) = tag.split_once('-').unwrap_or((tag, "0"));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let Some(pid) = pid.parse::<i32>().ok().filter(|_| digits(pid) && digits(seq)) else { continue };
        let ours = pid == i32::try_from(std::process::id()).unwrap_or(-1);
        if (ours && leftovers == Leftovers::OthersOnly) || (!ours && is_running(pid)) {
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

fn copy_then_rename(job: &Finish) -> Result<(), MoveError> {
    let (to, overwrite) = (job.to.as_path(), job.overwrite);
    let io_err = |source: io::Error| MoveError::Io { path: to.to_path_buf(), source };
    let (tmp, mut dst) = create_copy_temp(to).map_err(io_err)?;
    let result = (|| {
        let mut src = File::open(&job.from)?;
        copy_beating(&mut src, &mut dst, &job.progress)?;
        // The copy carries the mark too, where the filesystem keeps one: it is what
        // proves the file ours if the cache copy is gone before the task is completed.
        // Set before the mode: a file without owner write takes no user attribute.
        if let Some(m) = &job.mark
            && let Err(e) = mark(&dst, m)
        {
            tracing::debug!(error = %e, path = %to.display(), "the destination's filesystem keeps no mark");
        }
        // The copy is handed over with the file's mode, not the daemon's umask.
        dst.set_permissions(std::fs::Permissions::from_mode(job.mode))?;
        dst.sync_all()?;
        // The copy is a temporary name of ours, removed as a leftover after a crash.
        rename(&tmp, to, overwrite, NoReplace::Link)
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

/// Copies `src` into `dst`, showing a sign of life every 8 MiB (a copy of a large file to
/// a slow disk takes minutes and is no stall).
fn copy_beating(src: &mut File, dst: &mut File, progress: &Progress) -> io::Result<()> {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 1 << 20];
    let mut since_beat = 0usize;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        dst.write_all(buf.get(..n).unwrap_or_default())?;
        since_beat += n;
        if since_beat >= 8 << 20 {
            since_beat = 0;
            progress.beat();
        }
    }
}

/// fsyncs the directory holding `path`, making a rename in it durable.
///
/// Concurrent callers for one directory share syncs (a group commit for directories): a
/// sync that starts after a caller's rename covers it, so many finishing downloads in one
/// directory cost a few fsyncs, not one each.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    DIR_SYNCS.sync(parent_dir(path), path)
}

/// fsyncs `dir`, where `child` was just renamed. A directory that cannot be opened for
/// reading (mode 0300: writable and searchable, a "drop box") or whose filesystem refuses
/// to sync a directory (`EINVAL`) is made durable by syncing its whole filesystem through
/// `child` (`syncfs`; every filesystem only if `child` cannot be opened either): slower,
/// but the rename in it is no failed move (it happened; retrying would fail for ever).
fn sync_dir(dir: &Path, child: &Path) -> io::Result<()> {
    match File::open(dir).and_then(|d| d.sync_all()) {
        Err(e) if cannot_sync_directly(&e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot sync the directory itself; syncing its filesystem");
            let opened =
                std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(child);
            match opened {
                Ok(file) => rustix::fs::syncfs(&file).map_err(io::Error::from),
                Err(_) => {
                    rustix::fs::sync();
                    Ok(())
                }
            }
        }
        other => other,
    }
}

/// Errors of opening or syncing a directory that say "not this way", not "failed".
fn cannot_sync_directly(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if [libc::EACCES, libc::EINVAL, libc::ENOTSUP].contains(&code))
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
    fn sync(&self, dir: &Path, child: &Path) -> io::Result<()> {
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
            let result = sync_dir(dir, child);
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

    fn finish(from: &Path, to: &Path, overwrite: bool, size: u64) -> Finish {
        Finish {
            recorded: true,
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            overwrite,
            size,
            mode: 0o644,
            progress: Arc::new(Progress::default()),
            mark: None,
            sha256: None,
        }
    }

    #[test]
    fn a_moved_file_is_known_by_its_mark_and_nothing_else() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (part, to) = (dir.path().join("1.part"), dir.path().join("f.bin"));
        std::fs::write(&part, b"abcd").unwrap();
        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o644)).unwrap();
        mark(&File::open(&part).unwrap(), "1.2.3").unwrap();
        assert!(found_in_place(&part, &to, "1.2.3", None).is_none(), "not moved: the partial file is there");
        std::fs::rename(&part, &to).unwrap();
        let found = found_in_place(&part, &to, "1.2.3", None).expect("the mark goes with the file");
        assert_eq!(found.size, 4);
        assert!(found.synced.is_ok());
        let sha = |b: &[u8]| -> [u8; 32] { <sha2::Sha256 as sha2::Digest>::digest(b).into() };
        assert!(found_in_place(&part, &to, "1.2.3", Some(sha(b"abcd"))).is_some(), "the expected SHA-256");
        assert!(found_in_place(&part, &to, "1.2.3", Some(sha(b"abce"))).is_none(), "another SHA-256");
        assert!(found_in_place(&part, &to, "1.2.4", None).is_none(), "another task's mark");
        assert!(found_in_place(&part, &to, "1.2.", None).is_none(), "a prefix is not the mark");
        assert!(found_in_place(&part, &dir.path().join("missing"), "1.2.3", None).is_none());
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert!(found_in_place(&part, &to, "1.2.3", None).is_none(), "others may write it");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
        let second = dir.path().join("second-name");
        std::fs::hard_link(&to, &second).unwrap();
        assert!(found_in_place(&part, &to, "1.2.3", None).is_none(), "it has another name");
        std::fs::remove_file(&second).unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"abcd").unwrap();
        assert!(found_in_place(&part, &plain, "1.2.3", None).is_none(), "an unmarked file");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&to, &link).unwrap();
        assert!(found_in_place(&part, &link, "1.2.3", None).is_none(), "a symlink is not followed");
        assert!(found_in_place(&part, &to, "1.2.3", None).is_some(), "and the file itself still is");
    }

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
        // A directory that cannot be opened for reading, or a filesystem that syncs no
        // directory, is synced another way; anything else is an error.
        for code in [libc::EACCES, libc::EINVAL, libc::ENOTSUP] {
            assert!(cannot_sync_directly(&io::Error::from_raw_os_error(code)), "{code}");
        }
        for code in [libc::EIO, libc::ENOSPC, libc::ENOENT, libc::EROFS] {
            assert!(!cannot_sync_directly(&io::Error::from_raw_os_error(code)), "{code}");
        }
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
            let size = std::fs::metadata(&from).unwrap().len();
            moves.push(tokio::spawn(async move {
                (i, to.clone(), mover.move_into_place(finish(&from, &to, false, size)).await)
            }));
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
        // While running, a copy under our own pid may still be in progress: kept.
        remove_stale_copies(&to, Leftovers::OthersOnly);
        assert!(stale[1].exists(), "our own copy is left alone while running");
        assert!(!stale[0].exists() && !stale[2].exists(), "a dead process's copies go");
        remove_stale_copies(&to, Leftovers::Any);
        for p in &stale {
            assert!(!p.exists(), "{} is a leftover and goes", p.display());
        }
        for p in &keep {
            assert!(p.exists(), "{} is not a leftover of ours and stays", p.display());
        }
        remove_stale_copies(&dir.path().join("missing-dir/x"), Leftovers::Any);
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
        copy_then_rename(&finish(&src, &to, false, 8)).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"new data", "not refused as if the destination existed");
    }

    #[test]
    fn a_finish_completes_wherever_an_earlier_try_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("1.part");
        let to = dir.path().join("out/f");
        let marked = |f: &Path| Finish { mark: Some("1.2.3".into()), ..finish(f, &to, false, 5) };
        // Not moved yet.
        std::fs::write(&from, b"12345").unwrap();
        mark(&File::open(&from).unwrap(), "1.2.3").unwrap();
        complete_move(&marked(&from), Leftovers::OthersOnly).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"12345");
        assert!(!from.exists());
        // Moved already (the source is gone): nothing to do but sync.
        complete_move(&marked(&from), Leftovers::OthersOnly).unwrap();
        // Unless what is there is not the task's file: a file of the same size that was
        // there before (the reason the move failed), the cache copy since cleaned away.
        let other = Finish { mark: Some("1.2.4".into()), ..finish(&from, &to, false, 5) };
        assert!(matches!(complete_move(&other, Leftovers::OthersOnly), Err(CompleteError::Lost)), "another task's");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"54321").unwrap();
        let unmarked = Finish { to: plain.clone(), ..marked(&from) };
        assert!(
            matches!(complete_move(&unmarked, Leftovers::OthersOnly), Err(CompleteError::Lost)),
            "unmarked where a mark is kept"
        );
        let sha = |b: &[u8]| -> [u8; 32] { <sha2::Sha256 as sha2::Digest>::digest(b).into() };
        let never_marked = Finish { to: plain.clone(), sha256: Some(sha(b"12345")), ..finish(&from, &plain, false, 5) };
        assert!(matches!(complete_move(&never_marked, Leftovers::OthersOnly), Err(CompleteError::Lost)), "other bytes");
        let never_marked = Finish { sha256: Some(sha(b"54321")), ..never_marked };
        complete_move(&never_marked, Leftovers::OthersOnly).unwrap();
        // Copied already, the source not yet removed: adopted only with the same bytes.
        std::fs::write(&from, b"12345").unwrap();
        complete_move(&finish(&from, &to, false, 5), Leftovers::OthersOnly).unwrap();
        assert!(!from.exists());
        std::fs::write(&from, b"54321").unwrap();
        assert!(matches!(
            complete_move(&finish(&from, &to, false, 5), Leftovers::OthersOnly),
            Err(CompleteError::Move(MoveError::Exists(_)))
        ));
        assert_eq!(std::fs::read(&from).unwrap(), b"54321", "kept");
        // The same bytes, but not ours to take: a link to them, a file others may write.
        // The cache copy is the only one we can vouch for, so it stays.
        let (linked, planted) = (dir.path().join("linked"), dir.path().join("planted"));
        std::fs::write(&planted, b"54321").unwrap();
        std::os::unix::fs::symlink(&planted, &linked).unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
        for to in [&linked, &planted] {
            assert!(
                matches!(
                    complete_move(&finish(&from, to, false, 5), Leftovers::OthersOnly),
                    Err(CompleteError::Move(MoveError::Exists(_)))
                ),
                "{to:?} taken for the download"
            );
            assert!(from.exists(), "the cache copy stays");
        }
        // A move that crashed between its link and its unlink left one file with two names.
        let both = dir.path().join("both");
        std::fs::hard_link(&from, &both).unwrap();
        complete_move(&finish(&from, &both, false, 5), Leftovers::OthersOnly).unwrap();
        assert!(!from.exists() && std::fs::read(&both).unwrap() == b"54321");
        std::fs::rename(&both, &from).unwrap();
        // Gone from both places: lost.
        std::fs::remove_file(&from).unwrap();
        std::fs::remove_file(&to).unwrap();
        assert!(matches!(
            complete_move(&finish(&from, &to, false, 5), Leftovers::OthersOnly),
            Err(CompleteError::Lost)
        ));
        // A short cache file is not a finished download.
        std::fs::write(&from, b"123").unwrap();
        assert!(matches!(
            complete_move(&finish(&from, &to, false, 5), Leftovers::OthersOnly),
            Err(CompleteError::Lost)
        ));
        // A file that cannot be looked at is not lost: it may be complete.
        let unreadable = dir.path().join("not-a-dir/x.part");
        std::fs::write(dir.path().join("not-a-dir"), b"a file").unwrap();
        let err = complete_move(&finish(&unreadable, &to, false, 5), Leftovers::OthersOnly).unwrap_err();
        assert!(matches!(err, CompleteError::Move(MoveError::Io { .. })), "{err:?}");
    }

    /// A long copy shows signs of life, so the supervisor never takes it for a stall.
    #[test]
    fn a_long_copy_shows_signs_of_life() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("big");
        std::fs::write(&from, vec![7u8; 40 << 20]).unwrap();
        let job = finish(&from, &dir.path().join("copy"), false, 40 << 20);
        copy_then_rename(&job).unwrap();
        assert!(job.progress.signs() >= 5, "one sign per 8 MiB: {}", job.progress.signs());
        assert_eq!(std::fs::metadata(dir.path().join("copy")).unwrap().len(), 40 << 20);
    }

    #[test]
    fn handed_over_files_and_new_directories_get_the_clients_mode() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("1.part");
        std::fs::write(&from, b"data").unwrap();
        let to = dir.path().join("a/b/f");
        let job = Finish { mode: 0o640, ..finish(&from, &to, false, 4) };
        complete_move(&job, Leftovers::OthersOnly).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&to), 0o640);
        assert_eq!(mode(&dir.path().join("a")), 0o750);
        assert_eq!(mode(&dir.path().join("a/b")), 0o750);
        assert_eq!(dir_mode(0o644), 0o755);
        assert_eq!(dir_mode(0o600), 0o700);
        assert_eq!(dir_mode(0o664), 0o775);
        // A read-only file (umask 0222) still gets directories a move can enter.
        assert_eq!(dir_mode(0o444), 0o755);
        assert_eq!(dir_mode(0o400), 0o700);
        let ro = Finish { mode: 0o444, ..finish(&dir.path().join("2.part"), &dir.path().join("c/d/g"), false, 4) };
        std::fs::write(&ro.from, b"data").unwrap();
        complete_move(&ro, Leftovers::OthersOnly).unwrap();
        assert_eq!(mode(&dir.path().join("c/d/g")), 0o444);
    }

    /// A copy to a name as long as a name may be gets a temporary name that fits, and its
    /// leftovers are still found.
    #[test]
    fn a_copy_to_a_long_name_fits_its_temporary_name() {
        let dir = tempfile::tempdir().unwrap();
        let name = "é".repeat(127); // 254 bytes
        let to = dir.path().join(&name);
        let tmp = copy_temp_path(&to, u32::MAX, u64::MAX);
        assert!(tmp.file_name().unwrap().len() <= 255, "{}", tmp.file_name().unwrap().len());
        let src = dir.path().join("src");
        std::fs::write(&src, b"long").unwrap();
        copy_then_rename(&finish(&src, &to, false, 4)).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"long");
        // Left by this process's pid: a leftover when recovery asks for any.
        let left = copy_temp_path(&to, std::process::id(), 7);
        std::fs::write(&left, b"left").unwrap();
        remove_stale_copies(&to, Leftovers::Any);
        assert!(!left.exists(), "a leftover under the cut name is found");
    }

    #[test]
    fn refuses_to_overwrite_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("sub/b");
        std::fs::write(&a, b"new").unwrap();
        move_into_place(&finish(&a, &b, false, 0)).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"new");
        assert!(!a.exists());
        std::fs::write(&a, b"newer").unwrap();
        assert!(matches!(move_into_place(&finish(&a, &b, false, 0)), Err(MoveError::Exists(_))));
        assert_eq!(std::fs::read(&b).unwrap(), b"new", "existing file untouched");
        move_into_place(&finish(&a, &b, true, 0)).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"newer");
        // Several missing levels are created (and synced) on the way.
        std::fs::write(&a, b"deep").unwrap();
        let deep = dir.path().join("x/y/z/f");
        move_into_place(&finish(&a, &deep, false, 0)).unwrap();
        assert_eq!(std::fs::read(&deep).unwrap(), b"deep");
    }
}
