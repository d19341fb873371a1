//! Fast large downloads written with `O_DIRECT`, past the page cache.
//!
//! Buffered writes copy every byte into the page cache and write it back later; on this
//! kind of machine that copy is the daemon's largest cost on a 1 GiB download and, when
//! the VM host is slow to hand out fresh pages, it doubles. A download that turns out to
//! be fast switches to direct writes: the body is gathered into aligned 4 MiB buffers
//! (three per fast download) that a second thread writes with `pwrite` while the next ones
//! fill, so network and disk overlap and the kernel copies nothing into the page cache.
//! 1 GiB from nginx on loopback, alternating with the buffered build: through a slow
//! stretch of the host 0.75-0.96 s and 0.55-0.69 CPU s, against 0.67-2.06 s and 0.77-2.38 s
//! buffered; in a calm one about level (medians 0.87 against 1.01 s).
//!
//! The buffers sit on transparent huge pages (`MADV_HUGEPAGE`): each write pins its buffer
//! for the device, two pages instead of 1,024, and the copies into them miss the TLB less.
//! 1 GiB over HTTP, 6 alternating rounds: wall median 0.86 -> 0.67 s, CPU 0.75 -> 0.63 s.
//!
//! Durability is unchanged: a checkpoint is reported only after an `fdatasync` that
//! follows the writes it covers, on the same thread. The bytes after the last whole block
//! (under 4 KiB) are written through the ordinary descriptor when the download ends or
//! stops, then the whole file is synced as before.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use super::checkpoint::CheckpointPolicy;
use super::report::{Timing, WorkerLink};

const DIRECT_THREAD: &str = "the direct-write thread";

/// Direct I/O offsets, lengths and buffer addresses are multiples of this.
const BLOCK: usize = 4096;
/// One buffer; three of them per fast download (2 MiB buffers, two of them, kept the
/// writer waiting for the disk: 0.80 s against 0.70 s buffered in a calm stretch).
const BUF: usize = 4 << 20;

/// Direct writes need a checkpoint window at least this large: while a sync is in flight
/// its three buffers can hold up to 12 MiB received after the synced offset, and with a sync
/// every half window that must fit in the other half (see `CheckpointPolicy`).
pub const MIN_WINDOW: u64 = 2 * 3 * BUF as u64;

#[cfg(test)]
thread_local! {
    /// How many downloads written on this thread switched to direct writes (tests run in
    /// parallel, so a global count would mix them up).
    pub static STARTED_HERE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A buffer whose usable part starts at a block-aligned address.
struct Aligned {
    mem: Vec<u8>,
    at: usize,
}

/// Buffers start on a huge page's boundary and ask for transparent huge pages.
const HUGE: usize = 2 << 20;

impl Aligned {
    fn new() -> Aligned {
        // Untouched until written (a fresh mapping: 4 MiB and more come from `mmap`, see
        // `tune_malloc`, unless the user tuned malloc), so the advice applies from the first
        // write.
        let mem = vec![0u8; BUF + HUGE];
        let at = (HUGE - mem.as_ptr() as usize % HUGE) % HUGE;
        if let Some(usable) = mem.get(at..at + BUF) {
            advise_huge_pages(usable);
        }
        Aligned { mem, at }
    }

    fn slice(&self, len: usize) -> &[u8] {
        self.mem.get(self.at..self.at + len).unwrap_or_default()
    }

    fn slice_mut(&mut self, from: usize, to: usize) -> &mut [u8] {
        self.mem.get_mut(self.at + from..self.at + to).unwrap_or_default()
    }
}

/// Asks for transparent huge pages under `region` (`MADV_HUGEPAGE`; the system's default
/// is often `madvise`, huge pages only where asked for). Each direct write pins its buffer's
/// pages for the device: 1,024 small pages per 4 MiB buffer, two huge ones. Refused advice
/// (no THP in this kernel) changes nothing but the cost.
#[allow(unsafe_code)]
fn advise_huge_pages(region: &[u8]) {
    // SAFETY: the advice changes only how the kernel backs pages of memory `region` owns
    // (page-aligned: it starts on a huge page's boundary); their contents stay as they are.
    let rc = unsafe { libc::madvise(region.as_ptr().cast_mut().cast(), region.len(), libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "no huge pages for direct-write buffers");
    }
}

enum Job {
    /// Write `len` bytes of the buffer at file offset `pos`, then hand the buffer back.
    Write { buf: Aligned, len: usize, pos: u64 },
    /// fdatasync, then report `upto` as a checkpoint.
    Sync { upto: u64 },
}

/// The direct-I/O side of one download's writer.
pub struct Direct {
    cur: Aligned,
    /// File offset of `cur`'s first byte (block-aligned).
    base: u64,
    /// Bytes in `cur`.
    fill: usize,
    spare: Vec<Aligned>,
    jobs: Option<mpsc::SyncSender<Job>>,
    back: mpsc::Receiver<Aligned>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
    /// The end of the data handed to the I/O thread (what a checkpoint may cover).
    written: u64,
    requested: u64,
    last_request: Instant,
}

impl Direct {
    /// Opens `path` for direct writes continuing at `offset` (what `file`, the ordinary
    /// descriptor, holds so far, synced up to `durable`). `None` when the filesystem does
    /// not do direct I/O.
    pub fn start(path: &Path, file: &File, offset: u64, durable: u64, link: WorkerLink) -> io::Result<Option<Direct>> {
        let direct = match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
        {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "no direct I/O here; writing through the page cache");
                return Ok(None);
            }
        };
        if !suits(file, &direct) {
            return Ok(None);
        }
        let mut cur = Aligned::new();
        let base = offset - offset % BLOCK as u64;
        let fill = usize::try_from(offset - base).unwrap_or(0);
        // The partial block before `offset` is rewritten with the first buffer.
        if fill > 0 {
            file.read_exact_at(cur.slice_mut(0, fill), base)?;
        }
        #[cfg(test)]
        STARTED_HERE.with(|n| n.set(n.get() + 1));
        let (jobs, rx) = mpsc::sync_channel::<Job>(4);
        let (back_tx, back) = mpsc::channel::<Aligned>();
        let delay = super::checkpoint::test_sync_delay();
        let thread = std::thread::Builder::new().name("dl-direct".into()).spawn({
            let path = path.to_path_buf();
            move || io_loop(&direct, &path, &rx, &back_tx, &link, delay)
        })?;
        let mut d = Direct {
            cur,
            base,
            fill,
            spare: vec![Aligned::new(), Aligned::new()],
            jobs: Some(jobs),
            back,
            thread: Some(thread),
            written: offset,
            requested: durable,
            last_request: Instant::now(),
        };
        // What the ordinary descriptor wrote since its last sync is synced first (the
        // same inode): otherwise up to half a window of it would come on top of the
        // buffers' 12 MiB while the first direct sync runs.
        if offset > durable {
            d.checkpoint()?;
        }
        Ok(Some(d))
    }

    /// Appends body bytes; full buffers go to the I/O thread.
    pub fn write(&mut self, mut data: &[u8], policy: &CheckpointPolicy) -> io::Result<()> {
        while !data.is_empty() {
            let n = data.len().min(BUF - self.fill);
            let (now, rest) = data.split_at(n);
            self.cur.slice_mut(self.fill, self.fill + n).copy_from_slice(now);
            self.fill += n;
            data = rest;
            if self.fill == BUF {
                self.hand_over(BUF)?;
                // Before the next buffer could take the gap past half a window (the
                // buffers' hold beyond a sync in flight fits in the other half).
                if self.written + BUF as u64 - self.requested > policy.sync_every() {
                    self.checkpoint()?;
                }
            }
        }
        // A download that slowed down still checkpoints on time: the whole blocks in the
        // buffer go out, the partial block stays for the next write.
        if self.last_request.elapsed() >= policy.interval {
            if self.fill >= BLOCK {
                let tail = self.send_whole_blocks()?;
                self.cur.slice_mut(0, tail.len()).copy_from_slice(&tail);
                self.fill = tail.len();
            }
            if self.written > self.requested {
                self.checkpoint()?;
            }
        }
        Ok(())
    }

    fn checkpoint(&mut self) -> io::Result<()> {
        self.send(Job::Sync { upto: self.written })?;
        self.requested = self.written;
        self.last_request = Instant::now();
        Ok(())
    }

    /// Sends the first `len` (block-aligned) bytes of the current buffer to be written and
    /// continues in a fresh buffer.
    fn hand_over(&mut self, len: usize) -> io::Result<()> {
        let next = match self.spare.pop() {
            Some(b) => b,
            None => match self.back.recv() {
                Ok(b) => b,
                // The I/O thread stopped: its error comes from `join`.
                Err(_) => return Err(self.join_error()),
            },
        };
        let buf = std::mem::replace(&mut self.cur, next);
        let pos = self.base;
        self.send(Job::Write { buf, len, pos })?;
        self.base += len as u64;
        self.written = self.base;
        self.fill = 0;
        Ok(())
    }

    /// Hands the whole blocks in the current buffer to the I/O thread and returns the bytes
    /// after them (under a block, at file offset `base` now), which leave the buffer.
    fn send_whole_blocks(&mut self) -> io::Result<Vec<u8>> {
        let whole = self.fill - self.fill % BLOCK;
        let tail = self.cur.slice(self.fill).get(whole..).unwrap_or_default().to_vec();
        if whole > 0 {
            self.hand_over(whole)?;
        } else {
            self.fill = 0;
        }
        Ok(tail)
    }

    fn send(&mut self, job: Job) -> io::Result<()> {
        match self.jobs.as_ref().map(|j| j.send(job)) {
            Some(Ok(())) => Ok(()),
            _ => Err(self.join_error()),
        }
    }

    /// Closes the job queue and waits for the I/O thread; its error, if any.
    fn join(&mut self) -> io::Result<()> {
        self.jobs = None;
        super::checkpoint::join(self.thread.take(), DIRECT_THREAD)
    }

    /// Why the I/O thread is gone (it ends early only on an error).
    fn join_error(&mut self) -> io::Error {
        self.join().err().unwrap_or_else(|| io::Error::other(format!("{DIRECT_THREAD} stopped")))
    }

    /// Writes everything still buffered (whole blocks directly, the rest through `file`)
    /// and waits for the I/O thread. The caller syncs the file afterwards.
    pub fn finish(mut self, file: &File) -> io::Result<()> {
        let tail = self.send_whole_blocks()?;
        let tail_pos = self.base;
        self.join()?;
        if !tail.is_empty() {
            file.write_all_at(&tail, tail_pos)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct").field("base", &self.base).field("fill", &self.fill).finish_non_exhaustive()
    }
}

/// Whether direct writes of 4 KiB-aligned buffers at 4 KiB-aligned offsets suit this file:
/// the same file as `file` (not one put at its path meanwhile), and a filesystem whose
/// direct-I/O alignment divides 4 KiB (asked with `STATX_DIOALIGN` where the kernel knows
/// it; older kernels are trusted, a refusal then fails the attempt like any write error).
fn suits(file: &File, direct: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), direct.metadata()) {
        (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino() => {}
        _ => return false,
    }
    let flags = rustix::fs::AtFlags::EMPTY_PATH;
    match rustix::fs::statx(direct, "", flags, rustix::fs::StatxFlags::DIOALIGN) {
        Ok(st) if st.stx_mask & rustix::fs::StatxFlags::DIOALIGN.bits() != 0 => {
            let fits = |a: u32| a != 0 && a as usize <= BLOCK && BLOCK.is_multiple_of(a as usize);
            fits(st.stx_dio_offset_align) && fits(st.stx_dio_mem_align)
        }
        _ => true,
    }
}

/// `pwrite`s whole blocks. A short write that ends inside a block cannot be continued
/// directly, so it is reported rather than retried into an `EINVAL`: as the disk being
/// full, which is what stops a write short (the task waits and resumes, its data kept).
fn write_blocks(direct: &File, data: &[u8], pos: u64) -> io::Result<()> {
    let mut done = 0usize;
    while let Some(rest) = data.get(done..).filter(|r| !r.is_empty()) {
        match direct.write_at(rest, pos + done as u64) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::StorageFull, "a direct write wrote nothing")),
            Ok(n) if n < rest.len() && n % BLOCK != 0 => {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!("a direct write stopped after {n} of {} bytes", rest.len()),
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn io_loop(
    direct: &File,
    path: &Path,
    jobs: &mpsc::Receiver<Job>,
    back: &mpsc::Sender<Aligned>,
    link: &WorkerLink,
    delay: std::time::Duration,
) -> io::Result<()> {
    for job in jobs {
        match job {
            Job::Write { buf, len, pos } => {
                // A newer attempt may own the file (see `WorkerLink::abandoned`).
                if link.is_abandoned() {
                    return Err(super::report::abandoned());
                }
                let began = Instant::now();
                write_blocks(direct, buf.slice(len), pos)?;
                Timing::add(&link.timing().disk, began);
                let _ = back.send(buf);
            }
            Job::Sync { upto } => {
                let began = Instant::now();
                super::checkpoint::sync_data(direct, path)?;
                Timing::add(&link.timing().sync, began);
                std::thread::sleep(delay);
                tracing::debug!(task = link.task(), offset = upto, "synced");
                super::checkpoint::report_checkpoint(link, upto);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_huge_page_and_hold_a_whole_buffer() {
        for _ in 0..3 {
            let mut b = Aligned::new();
            assert_eq!(b.slice(BUF).as_ptr() as usize % HUGE, 0, "the usable part starts on a huge page");
            assert_eq!(b.slice(BUF).len(), BUF);
            b.slice_mut(BUF - 1, BUF).copy_from_slice(&[7]);
            assert_eq!(b.slice(BUF).last(), Some(&7));
            let flags = vm_flags_at(b.slice(BUF).as_ptr() as usize).expect("the buffer is in a mapping");
            assert!(flags.split_whitespace().any(|f| f == "hg"), "no huge-page advice: {flags}");
        }
    }

    /// The `VmFlags` of this process's mapping that holds `addr` (`/proc/self/smaps`).
    fn vm_flags_at(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
            if let Some((lo, hi)) = range
                && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.to_owned());
            }
        }
        None
    }
}
