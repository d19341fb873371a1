//! The blocking half of a download: writes body chunks to the partial file on a blocking
//! thread, so network reads and disk writes overlap, and makes checkpoints durable.
//!
//! Checkpoint order (docs/behaviour.md, "Durability"): write (there is no user-space buffer), `fdatasync`, and
//! only then report the offset for the core to commit. A committed offset therefore never
//! exceeds the synced bytes.

use std::fs::File;
use std::io::{IoSlice, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::checkpoint::{
    CheckpointPolicy, SYNC_THREAD, join, report_checkpoint, still_named, sync_data, test_sync_delay,
};
use super::progress::Progress;
pub(super) use super::report::abandoned;
use super::report::{Timing, WorkerLink};

#[derive(Debug)]
pub enum WriterMsg {
    /// Body chunks, in order.
    Data(Vec<Bytes>),
    /// All data is in: sync and return the size and digest.
    Finish,
    /// Stop early: sync what we have and report it as a checkpoint.
    Stop,
}

#[derive(Debug)]
pub struct WriterDone {
    pub offset: u64,
    pub sha256: Option<[u8; 32]>,
    /// The finished file carries its task's mark (see `files::MARK`), synced with its data.
    pub marked: bool,
}

/// The partial file, opened and trimmed to where the next attempt continues.
#[derive(Debug)]
pub struct Prepared {
    pub file: File,
    pub offset: u64,
    pub hasher: Option<Sha256>,
    /// The file was created (or emptied) now: its directory entry is made durable before
    /// the first checkpoint refers to it.
    pub fresh: bool,
    /// The mode the finished file is handed over with (until then it is 0600).
    pub final_mode: u32,
}

/// Opens (creating) the partial file and trims it to `offset`. If the file is shorter
/// than `offset` (deleted or truncated behind our back) the download restarts at zero.
/// A new file is private (0600, whatever the daemon's umask); the finished file gets
/// `mode` (see [`run`]). Re-hashing a resumed file shows as signs of life in `progress`.
///
/// Never writes through a symlink: a symlink planted where the partial file or its
/// session directory should be is removed (or refused), not followed.
pub fn prepare(path: &Path, offset: u64, hash: bool, mode: u32, progress: &Progress) -> std::io::Result<Prepared> {
    if let Some(dir) = path.parent() {
        match std::fs::symlink_metadata(dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(std::io::Error::other(format!(
                    "{} is a symlink; refusing to write through it",
                    dir.display()
                )));
            }
            Ok(_) => {}
            // Created only when missing: one stat per download instead of a mkdir per level.
            Err(_) => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
                // The new directory's own entry must be durable before a checkpoint refers
                // to a file in it (rare: once per session).
                super::files::sync_parent(dir)?;
            }
        }
    }
    if offset == 0 {
        let file = open_fresh(path)?;
        let hasher = hash.then(Sha256::new);
        return Ok(Prepared { file, offset, hasher, fresh: true, final_mode: mode });
    }
    let existed = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => {
            // A finished file gets its final mode before its move (0444 with a umask of
            // 0222): if the attempt failed after that (a short body, a crash before the
            // move), the file is resumed private and writable again. It is a regular file
            // of ours in our private directory, so the mode is set by name.
            if m.permissions().mode() & 0o7777 != PARTIAL_MODE {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(PARTIAL_MODE))?;
            }
            true
        }
        Ok(m) if m.file_type().is_symlink() => {
            // Planted: drop the link itself and start over.
            std::fs::remove_file(path)?;
            false
        }
        Ok(_) => return Err(not_regular(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        // Anything else (EIO, ENOMEM) is no reason to empty the committed bytes: the attempt
        // fails and is retried.
        Err(e) => return Err(e),
    };
    let mut file = partial_file().create(true).truncate(false).open(path)?;
    if !existed {
        file.set_permissions(std::fs::Permissions::from_mode(PARTIAL_MODE))?;
    }
    let len = file.metadata()?.len();
    let offset = if !existed || len < offset { 0 } else { offset };
    if len != offset {
        file.set_len(offset)?;
    }
    let hasher = if hash {
        let mut h = Sha256::new();
        file.seek(SeekFrom::Start(0))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = offset;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let chunk = buf.get_mut(..want).unwrap_or_default();
            file.read_exact(chunk)?;
            h.update(&*chunk);
            left -= want as u64;
            progress.beat();
        }
        Some(h)
    } else {
        None
    };
    file.seek(SeekFrom::Start(offset))?;
    Ok(Prepared { file, offset, hasher, fresh: !existed, final_mode: mode })
}

/// A partial file's mode: private until it is finished (and the daemon can always open it
/// again, whatever mode it is handed over with).
const PARTIAL_MODE: u32 = 0o600;

/// Opens the partial file of a download that starts at zero, emptied. No stat first: with
/// 16 downloads creating files in one directory, every path lookup waits on the others'
/// creates and renames, and a fresh download needs only the open.
fn open_fresh(path: &Path) -> std::io::Result<File> {
    // The usual case, a name nothing holds: created here (`O_EXCL` neither follows nor
    // reuses anything), so it is a regular file of mode 0600 with no stat or chmod to
    // check it: two system calls fewer per file of a small-files batch.
    if umask_keeps(PARTIAL_MODE) {
        match partial_file().create_new(true).mode(PARTIAL_MODE).open(path) {
            Ok(file) => {
                #[cfg(test)]
                CREATED_HERE.with(|n| n.set(n.get() + 1));
                return Ok(file);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    let open = || partial_file().create(true).truncate(true).open(path);
    let file = match open() {
        // Planted symlink: drop the link itself and create the file. A file left with a
        // finished file's mode (0444, see `prepare`) that we may not open for writing:
        // its bytes are not wanted, so the same.
        Err(e)
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
                || e.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            std::fs::remove_file(path)?;
            open()?
        }
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::ISDIR.raw_os_error()) => return Err(not_regular(path)),
        other => other?,
    };
    if !file.metadata()?.is_file() {
        return Err(not_regular(path));
    }
    // An explicit mode: the file may be left over from an attempt of another mode.
    file.set_permissions(std::fs::Permissions::from_mode(PARTIAL_MODE))?;
    Ok(file)
}

#[cfg(test)]
thread_local! {
    /// Partial files `open_fresh` created with one `open` on this thread.
    static CREATED_HERE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Whether the process umask leaves `mode` whole, so a file created with it has it. The
/// daemon never changes its umask (whatever started it gave it), so it is read once, from
/// /proc; unknown counts as no (every new file is then set explicitly).
fn umask_keeps(mode: u32) -> bool {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let umask = UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let value = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(value.trim(), 8).ok()
    });
    umask.is_some_and(|u| u & mode == 0)
}

/// How a partial file is opened: read and written, never through a symlink at its name.
fn partial_file() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    options
}

fn not_regular(path: &Path) -> std::io::Error {
    std::io::Error::other(format!("{} is not a regular file", path.display()))
}

/// Runs on a blocking thread until told to finish or stop (or the sender is dropped,
/// which counts as a stop).
///
/// Checkpoints are synced by a second thread, so the writer keeps writing (and the network
/// keeps flowing) while the disk flushes; one sync is in flight at a time, and the offset
/// it reports is the one written to the kernel before the sync started.
pub fn run(
    prepared: Prepared,
    path: &Path,
    policy: CheckpointPolicy,
    link: WorkerLink,
    mut rx: mpsc::Receiver<WriterMsg>,
    mark: Option<&str>,
) -> std::io::Result<WriterDone> {
    let Prepared { file: mut out, offset, mut hasher, fresh, final_mode } = prepared;
    let mut offset = offset;
    // A checkpoint must not refer to a file whose directory entry a power cut could lose.
    let mut entry_unsynced = fresh;
    let sync_entry = |pending: &mut bool| -> std::io::Result<()> {
        if std::mem::take(pending) {
            super::files::sync_parent(path)?;
        }
        Ok(())
    };
    // A fast download switches to direct writes once (see `direct`).
    let started = Instant::now();
    let start_offset = offset;
    let mut direct: Option<super::direct::Direct> = None;
    let mut direct_tried = false;
    // The last offset handed to a sync (reported once that sync is done). Durable at the
    // start (a fresh file is empty, a resumed one was cut to its committed offset) and
    // whenever no sync is in flight.
    let mut requested = offset;
    let mut last_request = Instant::now();
    // Started on the first checkpoint: small downloads never need it.
    let mut syncer: Option<Syncer> = None;
    // Where writeback was last started (see `start_writeback`).
    let mut kicked = offset;
    let sync_inline = |out: &mut File, offset: u64| -> std::io::Result<()> {
        sync_data(&*out, path)?;
        tracing::debug!(task = link.task(), offset, "synced");
        Ok(())
    };
    loop {
        match rx.blocking_recv() {
            Some(WriterMsg::Data(_)) if link.is_abandoned() => return Err(abandoned()),
            Some(WriterMsg::Data(chunks)) => {
                if !direct_tried
                    && policy.bytes >= super::direct::MIN_WINDOW
                    && offset - start_offset >= DIRECT_AFTER
                    && is_fast(offset - start_offset, started)
                {
                    direct_tried = true;
                    // The sync thread's last report must come before the direct thread's first.
                    if let Some(s) = syncer.take() {
                        s.finish()?;
                    }
                    // Every sync requested so far is done: `requested` is durable.
                    sync_entry(&mut entry_unsynced)?;
                    direct = super::direct::Direct::start(path, &out, offset, requested, link.clone())?;
                    if direct.is_some() {
                        tracing::debug!(task = link.task(), offset, "fast download: writing directly");
                    }
                }
                let began = Instant::now();
                match direct.as_mut() {
                    Some(d) => chunks.iter().try_for_each(|bytes| d.write(bytes, &policy))?,
                    None => write_batch(&mut out, &chunks)?,
                }
                Timing::add(&link.timing().write, began);
                for bytes in &chunks {
                    if let Some(h) = hasher.as_mut() {
                        h.update(bytes);
                    }
                    offset += bytes.len() as u64;
                }
                // The direct thread syncs and reports its own checkpoints.
                if direct.is_some() {
                    continue;
                }
                if offset - kicked >= KICK_BYTES {
                    start_writeback(&out, kicked, offset - kicked);
                    kicked = offset;
                }
                if offset - requested >= policy.sync_every() || last_request.elapsed() >= policy.interval {
                    let s = match syncer.as_mut() {
                        Some(s) => s,
                        None => {
                            sync_entry(&mut entry_unsynced)?;
                            syncer.insert(Syncer::start(&out, path, requested, link.clone())?)
                        }
                    };
                    s.check()?;
                    if s.is_busy() && offset - s.synced() >= policy.bytes {
                        // The window is full: more data now would be more than a crash may cost.
                        s.wait(&link)?;
                    }
                    if !s.is_busy() {
                        s.request(offset);
                        requested = offset;
                        last_request = Instant::now();
                    }
                }
            }
            Some(WriterMsg::Finish) => {
                if let Some(s) = syncer.take() {
                    s.finish()?;
                }
                if let Some(d) = direct.take() {
                    d.finish(&out)?;
                }
                // The mark and the mode it is handed over with (set explicitly: the daemon's
                // umask does not matter), made durable with the data: a full fsync.
                let marked = mark.is_some_and(|m| match super::files::mark(&out, m) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::debug!(task = link.task(), error = %e, "cannot mark the finished file");
                        false
                    }
                });
                out.set_permissions(std::fs::Permissions::from_mode(final_mode))?;
                out.sync_all()?;
                // The finish is committed with the file's size before its move. An unmarked
                // file is recognised after a crash only in the cache (its size there): a
                // fresh one that never reached a checkpoint has its directory entry synced
                // first. A marked one is found at its destination too; syncing its entry
                // here would cost a directory sync per file (measured: 1,000 × 100 KiB
                // 0.25 s → 0.41 s, twice the daemon's CPU).
                if !marked {
                    sync_entry(&mut entry_unsynced)?;
                }
                // A file removed meanwhile would fail its move; started over at once instead.
                still_named(&out, path)?;
                tracing::debug!(task = link.task(), offset, marked, "synced");
                let sha256 = hasher.map(|h| h.finalize().into());
                return Ok(WriterDone { offset, sha256, marked });
            }
            // The attempt's async half is gone without a word (aborted by the core after it
            // stopped responding, or a panic): a newer attempt may own the file by the time
            // this thread runs on, so nothing more is written, and its checkpoint would be
            // stale anyway.
            None => return Err(abandoned()),
            Some(WriterMsg::Stop) => {
                if let Some(s) = syncer.take() {
                    s.finish()?;
                }
                if let Some(d) = direct.take() {
                    d.finish(&out)?;
                }
                // Everything written so far becomes the last checkpoint.
                sync_inline(&mut out, offset)?;
                sync_entry(&mut entry_unsynced)?;
                report_checkpoint(&link, offset);
                return Ok(WriterDone { offset, sha256: None, marked: false });
            }
        }
    }
}

/// A download switches to direct writes after this much data…
const DIRECT_AFTER: u64 = 16 << 20;
/// …if it arrived at least this fast (bytes per second): a slow download gains nothing
/// from it and would hold three 4 MiB buffers for its whole life.
const DIRECT_RATE: u64 = 100 << 20;

fn is_fast(bytes: u64, since: Instant) -> bool {
    let secs = since.elapsed().as_secs_f64();
    secs <= 0.0 || bytes as f64 / secs >= DIRECT_RATE as f64
}

/// How much written data may sit in the page cache before its writeback is started.
const KICK_BYTES: u64 = 8 << 20;

/// Starts writeback of a written range without waiting for it (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE` only: no metadata, no cache flush, so nothing here is a
/// durability promise). The disk then works while the network delivers, and the next
/// checkpoint's `fdatasync`, above all the last one after the body ended, finds little
/// left to write: on a 1 GiB download the final sync otherwise flushed up to a whole
/// checkpoint window (64 MiB, about 100 ms here) while nothing else could overlap it.
///
/// Errors are ignored: a failed write-out is reported by the `fdatasync` that follows.
#[allow(unsafe_code)]
fn start_writeback(out: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(len)) else { return };
    // SAFETY: a plain syscall on a descriptor `out` keeps open; no memory is passed.
    let rc = unsafe { libc::sync_file_range(out.as_raw_fd(), from, len, libc::SYNC_FILE_RANGE_WRITE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "starting writeback failed");
    }
}

/// Writes the chunks with `writev`, straight from the network buffers: HTTP/2 DATA frames
/// are 8-16 KiB, and copying them into a buffer first cost a memcpy of every byte.
fn write_batch(out: &mut File, chunks: &[Bytes]) -> std::io::Result<()> {
    /// `IOV_MAX` on Linux.
    const MAX_SLICES: usize = 1024;
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().filter(|c| !c.is_empty()).map(|c| IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let upto = rest.len().min(MAX_SLICES);
        let n = match out.write_vectored(rest.get(..upto).unwrap_or_default()) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// The thread that makes checkpoints durable and reports them.
struct Syncer {
    tx: std::sync::mpsc::Sender<u64>,
    busy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The end of the last sync that finished.
    synced: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Syncer {
    /// Starts the thread on the writer's thread (which it wakes after each sync);
    /// `durable` is how much of the file is synced already.
    fn start(file: &File, path: &Path, durable: u64, link: WorkerLink) -> std::io::Result<Syncer> {
        use std::sync::atomic::Ordering;
        let (fd, path) = (file.try_clone()?, path.to_path_buf());
        let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let synced = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(durable));
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let (flag, done) = (busy.clone(), synced.clone());
        let writer = std::thread::current();
        let delay = test_sync_delay();
        let thread = std::thread::Builder::new().name("dl-sync".into()).spawn(move || {
            let result = (|| {
                for offset in rx {
                    let began = Instant::now();
                    let result = sync_data(&fd, &path);
                    Timing::add(&link.timing().sync, began);
                    std::thread::sleep(delay);
                    if result.is_ok() {
                        tracing::debug!(task = link.task(), offset, "synced");
                        // Reported before the writer may go on: until the core has it,
                        // the window still counts from the previous checkpoint.
                        report_checkpoint(&link, offset);
                        done.store(offset, Ordering::Release);
                    }
                    flag.store(false, Ordering::Release);
                    writer.unpark();
                    result?;
                }
                Ok(())
            })();
            // A writer waiting for this thread must see it gone.
            writer.unpark();
            result
        })?;
        Ok(Syncer { tx, busy, synced, thread: Some(thread) })
    }

    fn is_busy(&self) -> bool {
        self.busy.load(std::sync::atomic::Ordering::Acquire)
    }

    fn synced(&self) -> u64 {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits for the sync in flight; an error if the thread stopped.
    fn wait(&mut self, link: &WorkerLink) -> std::io::Result<()> {
        while self.is_busy() {
            self.check()?;
            if link.is_abandoned() {
                return Err(abandoned());
            }
            // Woken by the sync thread; the timeout only guards against a missed wake-up.
            std::thread::park_timeout(Duration::from_millis(100));
        }
        self.check()
    }

    /// Hands `offset` (already written to the kernel) to the sync thread.
    fn request(&self, offset: u64) {
        self.busy.store(true, std::sync::atomic::Ordering::Release);
        if self.tx.send(offset).is_err() {
            self.busy.store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// Surfaces a failed sync (the thread has stopped) as the writer's error, with its
    /// errno (a full disk must still read as `ENOSPC`).
    fn check(&mut self) -> std::io::Result<()> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            join(self.thread.take(), SYNC_THREAD)?;
            return Err(std::io::Error::other(format!("{SYNC_THREAD} stopped")));
        }
        Ok(())
    }

    /// Waits for the sync in flight and returns its error, if any.
    fn finish(self) -> std::io::Result<()> {
        let Syncer { tx, thread, .. } = self;
        drop(tx);
        join(thread, SYNC_THREAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::WorkerEvent;
    use crate::engine::checkpoint::SYNC_DELAY;

    #[test]
    fn a_planted_symlink_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let part = dir.path().join("s1/7.part");
        std::fs::create_dir_all(part.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&victim, &part).unwrap();
        let p = prepare(&part, 5, false, 0o644, &Progress::default()).unwrap();
        assert_eq!(p.offset, 0, "starts over");
        assert!(std::fs::symlink_metadata(&part).unwrap().file_type().is_file());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "the link target is untouched");
        // The same for a download that starts at zero (no stat before the open).
        std::fs::remove_file(&part).unwrap();
        std::os::unix::fs::symlink(&victim, &part).unwrap();
        let mut p = prepare(&part, 0, false, 0o644, &Progress::default()).unwrap();
        p.file.write_all(b"new").unwrap();
        assert!(std::fs::symlink_metadata(&part).unwrap().file_type().is_file());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "the link target is untouched");
        // Not a regular file: refused, not written to.
        let fifo = dir.path().join("s1/8.part");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
            0,
        )
        .unwrap();
        assert!(prepare(&fifo, 0, false, 0o644, &Progress::default()).is_err(), "a FIFO is refused");
        std::fs::create_dir(dir.path().join("s1/9.part")).unwrap();
        assert!(
            prepare(&dir.path().join("s1/9.part"), 0, false, 0o644, &Progress::default()).is_err(),
            "a directory is refused"
        );

        let linked_dir = dir.path().join("s2");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &linked_dir).unwrap();
        std::fs::create_dir_all(dir.path().join("elsewhere")).unwrap();
        assert!(
            prepare(&linked_dir.join("1.part"), 0, false, 0o644, &Progress::default()).is_err(),
            "a symlinked session directory is refused"
        );
    }

    /// Runs the writer over `body` sent in uneven chunks from another thread, continuing a
    /// partial file that holds `head`; returns what it reported and the checkpoints.
    fn write_through(head: &[u8], body: &[u8], stop: bool) -> (WriterDone, Vec<u64>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("s/1.part");
        std::fs::create_dir_all(part.parent().unwrap()).unwrap();
        std::fs::write(&part, head).unwrap();
        let prepared = prepare(&part, head.len() as u64, true, 0o644, &Progress::default()).unwrap();
        let (sink, mut core_rx) = Collect::sink();
        let link = WorkerLink::new(sink, 1, 1);
        let (tx, rx) = mpsc::channel(4);
        let chunks: Vec<Bytes> = {
            let mut v = Vec::new();
            let mut rest = body;
            let mut n = 1usize;
            while !rest.is_empty() {
                let take = rest.len().min(n * 7919 % (300 << 10) + 1);
                v.push(Bytes::copy_from_slice(rest.get(..take).unwrap()));
                rest = rest.get(take..).unwrap();
                n += 1;
            }
            v
        };
        let sender = std::thread::spawn(move || {
            for c in chunks.chunks(3) {
                tx.blocking_send(WriterMsg::Data(c.to_vec())).unwrap();
            }
            tx.blocking_send(if stop { WriterMsg::Stop } else { WriterMsg::Finish }).unwrap();
        });
        let policy = CheckpointPolicy { bytes: super::super::direct::MIN_WINDOW, interval: Duration::from_secs(60) };
        let before = super::super::direct::STARTED_HERE.with(std::cell::Cell::get);
        let done = run(prepared, &part, policy, link, rx, None).unwrap();
        sender.join().unwrap();
        let after = super::super::direct::STARTED_HERE.with(std::cell::Cell::get);
        assert!(after > before, "the download did not switch to direct writes");
        let checkpoints = checkpoints_sent(&mut core_rx);
        (done, checkpoints, std::fs::read(&part).unwrap())
    }

    /// A sink that hands every report to a channel, as the core's would.
    #[derive(Debug)]
    struct Collect(std::sync::Mutex<std::sync::mpsc::Sender<WorkerEvent>>);

    impl Collect {
        fn sink() -> (std::sync::Arc<dyn crate::engine::Sink>, std::sync::mpsc::Receiver<WorkerEvent>) {
            let (tx, rx) = std::sync::mpsc::channel();
            (std::sync::Arc::new(Collect(std::sync::Mutex::new(tx))), rx)
        }
    }

    impl crate::engine::Sink for Collect {
        fn report(&self, _: dlsession_proto::TaskId, _: u64, event: WorkerEvent) {
            let _ = self.0.lock().unwrap().send(event);
        }
    }

    /// The checkpoints a writer reported so far, in order.
    fn checkpoints_sent(reports: &mut std::sync::mpsc::Receiver<WorkerEvent>) -> Vec<u64> {
        let mut checkpoints = Vec::new();
        while let Ok(WorkerEvent::Checkpoint { offset }) = reports.try_recv() {
            checkpoints.push(offset);
        }
        checkpoints
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8).collect()
    }

    /// A fresh partial file and the channels around its writer.
    struct Rig {
        _dir: tempfile::TempDir,
        part: std::path::PathBuf,
        prepared: Prepared,
        core_rx: std::sync::mpsc::Receiver<WorkerEvent>,
        link: WorkerLink,
        tx: mpsc::Sender<WriterMsg>,
        rx: mpsc::Receiver<WriterMsg>,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("s/1.part");
        let prepared = prepare(&part, 0, false, 0o644, &Progress::default()).unwrap();
        let (sink, core_rx) = Collect::sink();
        let link = WorkerLink::new(sink, 1, 1);
        let (tx, rx) = mpsc::channel(4);
        Rig { _dir: dir, part, prepared, core_rx, link, tx, rx }
    }

    /// Writes `len` bytes, sent as fast as the writer takes them, with every sync held
    /// `delay` longer; returns how far the data sent ever ran past the last checkpoint the
    /// core had been told about, and whether the writer switched to direct writes.
    /// The first messages have the sizes in `lead`, the rest 256 KiB.
    fn largest_gap(lead: &[usize], len: usize, window: u64, delay: Duration) -> (u64, bool) {
        let Rig { _dir, part, prepared, mut core_rx, link, tx, rx } = rig();
        let body = pattern(len, 9);
        let mut messages = Vec::new();
        let mut rest = &body[..];
        for &n in lead.iter().chain(std::iter::repeat(&(256 << 10))) {
            if rest.is_empty() {
                break;
            }
            let (now, later) = rest.split_at(n.min(rest.len()));
            messages.push(Bytes::copy_from_slice(now));
            rest = later;
        }
        let sender = std::thread::spawn(move || {
            let (mut sent, mut durable, mut gap) = (0u64, 0u64, 0u64);
            for c in messages {
                durable = checkpoints_sent(&mut core_rx).last().copied().unwrap_or(durable);
                sent += c.len() as u64;
                gap = gap.max(sent - durable);
                tx.blocking_send(WriterMsg::Data(vec![c])).unwrap();
            }
            tx.blocking_send(WriterMsg::Finish).unwrap();
            gap
        });
        let before = super::super::direct::STARTED_HERE.with(std::cell::Cell::get);
        SYNC_DELAY.with(|d| d.set(delay));
        let policy = CheckpointPolicy { bytes: window, interval: Duration::from_secs(60) };
        let done = run(prepared, &part, policy, link, rx, None);
        SYNC_DELAY.with(|d| d.set(Duration::ZERO));
        let gap = sender.join().unwrap();
        assert_eq!(done.unwrap().offset, len as u64);
        let after = super::super::direct::STARTED_HERE.with(std::cell::Cell::get);
        (gap, after > before)
    }

    /// What the data sent may run ahead of the writer: the channel's four messages, the
    /// one being sent and the one being written (256 KiB each).
    const IN_FLIGHT: u64 = 6 * (256 << 10);

    #[test]
    fn slow_syncs_hold_a_buffered_download_within_its_checkpoint_window() {
        let window = 4 << 20;
        let (gap, direct) = largest_gap(&[], 24 << 20, window, Duration::from_millis(150));
        assert!(!direct, "a 4 MiB window is too small for direct writes");
        assert!(gap <= window + IN_FLIGHT, "{gap} bytes ran past the last checkpoint (window {window})");
        assert!(gap > window / 2, "the syncs were not slow enough to test anything: {gap}");
    }

    #[test]
    fn slow_syncs_hold_a_direct_download_within_its_checkpoint_window() {
        let window = super::super::direct::MIN_WINDOW;
        let (gap, direct) = largest_gap(&[], 80 << 20, window, Duration::from_millis(100));
        assert!(direct, "the download did not switch to direct writes");
        assert!(gap <= window + IN_FLIGHT, "{gap} bytes ran past the last checkpoint (window {window})");
        assert!(gap > window / 2, "the syncs were not slow enough to test anything: {gap}");
    }

    #[test]
    fn a_switch_to_direct_writes_with_unsynced_data_stays_within_the_window() {
        // 12 MiB start a sync; 11.75 MiB more stay unsynced (under half a window) when
        // the next message switches to direct writes, nearly half a window behind.
        let window = super::super::direct::MIN_WINDOW;
        let (gap, direct) = largest_gap(&[12 << 20, (47 << 20) / 4], 60 << 20, window, Duration::from_millis(300));
        assert!(direct, "the download did not switch to direct writes");
        assert!(gap <= window + IN_FLIGHT, "{gap} bytes ran past the last checkpoint (window {window})");
    }

    #[test]
    fn a_fast_download_switches_to_direct_writes_and_keeps_every_byte() {
        // An unaligned resume offset and an unaligned end: both partial blocks must survive.
        let head = pattern(12_345, 1);
        let body = pattern(40 * (1 << 20) + 777, 2);
        let (done, checkpoints, file) = write_through(&head, &body, false);
        let mut want = head.clone();
        want.extend_from_slice(&body);
        assert_eq!(done.offset, want.len() as u64);
        assert!(file == want, "the file differs from what was sent");
        let digest: [u8; 32] = Sha256::digest(&want).into();
        assert_eq!(done.sha256, Some(digest));
        assert!(!checkpoints.is_empty(), "checkpoints while writing directly");
        assert!(checkpoints.windows(2).all(|w| w[0] <= w[1]), "{checkpoints:?}");
        assert!(checkpoints.iter().all(|&c| c <= want.len() as u64));
    }

    #[test]
    fn a_download_that_slows_down_after_switching_still_checkpoints_on_time() {
        let Rig { _dir, part, prepared, mut core_rx, link, tx, rx } = rig();
        let fast = pattern(20 << 20, 5);
        let slow = pattern(10_000, 6);
        let sender = std::thread::spawn(move || {
            for c in fast.chunks(256 << 10) {
                tx.blocking_send(WriterMsg::Data(vec![Bytes::copy_from_slice(c)])).unwrap();
            }
            // Then a trickle: 10,000 bytes, well under one 4 MiB buffer, over 300 ms.
            for c in slow.chunks(2_500) {
                std::thread::sleep(Duration::from_millis(100));
                tx.blocking_send(WriterMsg::Data(vec![Bytes::copy_from_slice(c)])).unwrap();
            }
            std::thread::sleep(Duration::from_millis(200));
            tx.blocking_send(WriterMsg::Finish).unwrap();
        });
        let policy = CheckpointPolicy { bytes: 64 << 20, interval: Duration::from_millis(50) };
        let done = run(prepared, &part, policy, link, rx, None).unwrap();
        sender.join().unwrap();
        let total = (20 << 20) + 10_000u64;
        assert_eq!(done.offset, total);
        let checkpoints = checkpoints_sent(&mut core_rx);
        // The trickle's whole blocks were written and synced before the finish.
        let beyond = (20 << 20) + 8_192u64;
        assert!(checkpoints.contains(&beyond), "no checkpoint of the trickle's whole blocks: {checkpoints:?}");
        assert_eq!(std::fs::metadata(&part).unwrap().len(), total);
    }

    #[test]
    fn a_stop_while_writing_directly_checkpoints_everything_received() {
        let body = pattern(30 * (1 << 20) + 4097, 3);
        let (done, checkpoints, file) = write_through(&[], &body, true);
        assert_eq!(done.offset, body.len() as u64);
        assert!(file == body, "the file differs from what was sent");
        assert_eq!(checkpoints.last(), Some(&(body.len() as u64)), "the stop reports all of it: {checkpoints:?}");
    }

    #[test]
    fn a_fresh_start_empties_a_stale_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("s/1.part");
        std::fs::create_dir_all(part.parent().unwrap()).unwrap();
        std::fs::write(&part, b"left over from an attempt that never checkpointed").unwrap();
        let created = CREATED_HERE.with(std::cell::Cell::get);
        let p = prepare(&part, 0, true, 0o644, &Progress::default()).unwrap();
        assert_eq!(p.offset, 0);
        assert_eq!(std::fs::metadata(&part).unwrap().len(), 0);
        assert!(p.hasher.is_some());
        assert_eq!(CREATED_HERE.with(std::cell::Cell::get), created, "an existing file takes the checked way");
        // A missing session directory is created; a new file takes one open (the test's
        // umask, like the daemon's, leaves 0600 alone).
        assert!(umask_keeps(0o600));
        let p = prepare(&dir.path().join("new/2.part"), 0, false, 0o644, &Progress::default()).unwrap();
        assert!(p.hasher.is_none());
        assert_eq!(CREATED_HERE.with(std::cell::Cell::get), created + 1, "created with one open");
    }

    /// Hashing a resumed file again shows signs of life, and partial files are private
    /// until they are finished.
    #[test]
    fn rehashing_shows_signs_of_life_and_partials_are_private() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("1.part");
        std::fs::write(&part, vec![1u8; 8 << 20]).unwrap();
        let progress = Progress::default();
        let p = prepare(&part, 8 << 20, true, 0o644, &progress).unwrap();
        assert!(progress.signs() >= 8, "one sign per MiB hashed: {}", progress.signs());
        assert!(p.hasher.is_some());
        let fresh = dir.path().join("2.part");
        let p = prepare(&fresh, 0, false, 0o444, &progress).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o600, "private, and writable by us");
        assert_eq!(p.final_mode, 0o444);
    }

    /// A finished file whose attempt then failed (a short body, a crash before its move)
    /// carries its final mode and mark: resumed, or started over, it is private again.
    #[test]
    fn a_file_finished_by_a_failed_attempt_is_private_again() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        for (want, mode) in [(6u64, 0o444), (6, 0o644), (0, 0o444)] {
            let part = dir.path().join(format!("{want}-{mode:o}.part"));
            std::fs::write(&part, b"abcdef").unwrap();
            std::fs::set_permissions(&part, std::fs::Permissions::from_mode(mode)).unwrap();
            let p = prepare(&part, want, false, mode, &Progress::default()).unwrap();
            assert_eq!(p.offset, want);
            assert_eq!(std::fs::metadata(&part).unwrap().mode() & 0o7777, 0o600, "{want} {mode:o}");
        }
    }

    /// A writer whose attempt was given up while it was busy (its sender dropped without
    /// a stop) writes nothing more: the bytes still in its direct-write buffer stay out of
    /// the file a newer attempt may own.
    #[test]
    fn an_abandoned_writer_leaves_the_file_alone() {
        let Rig { _dir, part, prepared, core_rx: _core_rx, link, tx, rx } = rig();
        let policy = CheckpointPolicy { bytes: super::super::direct::MIN_WINDOW, interval: Duration::from_secs(60) };
        // Past the switch to direct writes, and 1 MiB into a direct-write buffer (made
        // first: the switch needs the bytes to come fast).
        let sent = DIRECT_AFTER + (1 << 20);
        let body = pattern(usize::try_from(sent).unwrap(), 3);
        let (writer_link, writer_part) = (link.clone(), part.clone());
        let writer = std::thread::spawn(move || {
            let done = run(prepared, &writer_part, policy, writer_link, rx, None);
            (done, super::super::direct::STARTED_HERE.with(std::cell::Cell::get))
        });
        for chunk in body.chunks(256 << 10) {
            tx.blocking_send(WriterMsg::Data(vec![Bytes::copy_from_slice(chunk)])).unwrap();
        }
        let taken = Instant::now();
        while tx.capacity() < tx.max_capacity() {
            assert!(taken.elapsed() < Duration::from_secs(10), "the writer took nothing");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(200));
        // Given up: the flag, and the sender dropped (the core aborted the attempt).
        link.abandoned.store(true, std::sync::atomic::Ordering::Release);
        drop(tx);
        let (done, direct) = writer.join().unwrap();
        assert_eq!(direct, 1, "the writer switched to direct writes");
        assert!(done.is_err(), "an abandoned writer ends with an error");
        std::thread::sleep(Duration::from_millis(200));
        let len = std::fs::metadata(&part).unwrap().len();
        assert!(len < sent, "{len} bytes in the file: the buffered MiB was written after the attempt was given up");
    }

    #[test]
    fn a_short_partial_file_restarts_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("1.part");
        std::fs::write(&part, b"abc").unwrap();
        assert_eq!(prepare(&part, 10, false, 0o644, &Progress::default()).unwrap().offset, 0);
        std::fs::write(&part, b"abcdef").unwrap();
        let p = prepare(&part, 4, true, 0o644, &Progress::default()).unwrap();
        assert_eq!(p.offset, 4);
        assert_eq!(std::fs::metadata(&part).unwrap().len(), 4, "trimmed to the committed offset");
    }
}
