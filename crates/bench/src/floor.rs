//! `dlsession-bench durable-copy SRC OUT THREADS`: what per-file durability alone costs on
//! this machine, with no network, no database and no IPC.
//!
//! Copies every file of SRC into OUT the way a finished download lands (docs/behaviour.md, "Durability"):
//! write it to a partial file (in `OUT/.partial`, the same filesystem), `fdatasync`, rename
//! into place, `fsync` the directory. THREADS workers take files from a shared counter. No
//! step is shared between files (dlsessiond shares concurrent directory syncs), so this is
//! the plain way to do it, not a clever one; the small-files workload runs it beside the
//! downloaders as a reference point.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context as _, Result, bail};

/// Runs the subcommand with the arguments after `durable-copy`.
pub fn main(args: &[String]) -> Result<()> {
    let [src, out, threads] = args else { bail!("usage: dlsession-bench durable-copy SRC OUT THREADS") };
    let threads: usize = threads.parse().context("THREADS: not a number")?;
    if threads == 0 {
        bail!("THREADS must be at least 1");
    }
    copy_all(Path::new(src), Path::new(out), threads)
}

fn copy_all(src: &Path, out: &Path, threads: usize) -> Result<()> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(src)
        .with_context(|| format!("reading {}", src.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| PathBuf::from(e.file_name()))
        .collect();
    names.sort();
    let partial = out.join(".partial");
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let next = AtomicUsize::new(0);
    let worker = || -> Result<()> {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(name) = names.get(i) else { return Ok(()) };
            copy_one(&src.join(name), &partial.join(name), &out.join(name), out)
                .with_context(|| format!("copying {}", name.display()))?;
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(worker)).collect();
        handles.into_iter().try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("a copy thread panicked"))?)
    })?;
    std::fs::remove_dir(&partial).with_context(|| format!("removing {}", partial.display()))
}

fn copy_one(src: &Path, part: &Path, dest: &Path, dir: &Path) -> Result<()> {
    let data = std::fs::read(src)?;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(part)?;
    f.write_all(&data)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(part, dest)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// `dlsession-bench durable-write SRC OUT`: the least landing one big file durably costs
/// here, with no network. SRC, already in the page cache (nginx served it), is read in
/// 4 MiB pieces by one thread — a copy from memory, as a download's bytes are copied from
/// socket buffers — while another writes the piece before with `O_DIRECT` (as dlsessiond
/// writes a fast download, its network reads overlapping its disk writes: buffered writes
/// of 1 GiB cost 2.5–3.7 s of CPU here, in page reclaim, in most runs) to `OUT.partial`,
/// the unaligned tail through a plain descriptor; then one `fdatasync`, the rename to OUT,
/// and an `fsync` of OUT's directory. No checkpoint while writing (dlsessiond syncs every
/// 32 MiB so a crash costs little), so it is a floor, not a twin.
pub fn durable_write(args: &[String]) -> Result<()> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    use std::sync::mpsc;
    const BLOCK: usize = 4096;
    const BUF: usize = 4 << 20;
    // One being read, one being written, one ready between them.
    const BUFFERS: usize = 3;
    let [src, out] = args else { bail!("usage: dlsession-bench durable-write SRC OUT") };
    let out = Path::new(out);
    let part = out.with_extension("partial");
    let dir = out.parent().context("OUT has no directory")?;
    let mut input = File::open(src).with_context(|| format!("opening {src}"))?;
    let mut direct =
        match std::fs::OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_DIRECT).open(&part) {
            // A file system without direct I/O: buffered, then.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                std::fs::OpenOptions::new().write(true).create_new(true).open(&part)?
            }
            other => other?,
        };
    // A buffer's aligned 4 MiB start where its allocation (which moving it keeps) allows.
    let aligned = |mem: &Vec<u8>| (BLOCK - mem.as_ptr() as usize % BLOCK) % BLOCK;
    let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(BUFFERS);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        empty_tx.send(vec![0u8; BUF + BLOCK]).context("buffer")?;
    }
    let reader = std::thread::spawn(move || -> Result<()> {
        while let Ok(mut mem) = empty_rx.recv() {
            let at = aligned(&mem);
            let buf = mem.get_mut(at..at + BUF).context("aligned buffer")?;
            let mut filled = 0;
            while filled < BUF {
                let n = input.read(buf.get_mut(filled..).context("buffer")?)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            // The writer gone (it failed) ends the reading too.
            if full_tx.send((mem, filled)).is_err() || filled < BUF {
                break;
            }
        }
        Ok(())
    });
    let mut tail = Vec::new();
    // Ends when the reader is done and has dropped its sender.
    for (mem, filled) in full_rx {
        let at = aligned(&mem);
        let buf = mem.get(at..at + filled).context("aligned buffer")?;
        let whole = filled / BLOCK * BLOCK;
        direct.write_all(buf.get(..whole).context("buffer")?)?;
        tail.extend_from_slice(buf.get(whole..).context("buffer")?);
        // The reader may have ended already.
        let _ = empty_tx.send(mem);
    }
    reader.join().map_err(|_| anyhow::anyhow!("the reading thread panicked"))??;
    drop(direct);
    let mut f = std::fs::OpenOptions::new().append(true).open(&part)?;
    f.write_all(&tail)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&part, out)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_file_byte_exact_and_leaves_no_partial() {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        for i in 0..20u8 {
            std::fs::write(src.path().join(format!("f{i}")), vec![i; 1000 + usize::from(i)]).unwrap();
        }
        main(&[src.path().display().to_string(), out.path().display().to_string(), "4".into()]).unwrap();
        for i in 0..20u8 {
            assert_eq!(std::fs::read(out.path().join(format!("f{i}"))).unwrap(), vec![i; 1000 + usize::from(i)]);
        }
        assert!(!out.path().join(".partial").exists());
        assert!(main(&["a".into(), "b".into(), "0".into()]).is_err(), "zero threads refused");
        assert!(main(&["a".into()]).is_err(), "missing arguments refused");
    }

    #[test]
    fn durable_write_lands_the_file_and_no_partial() {
        let dir = tempfile::tempdir().unwrap();
        let (src, out) = (dir.path().join("src.bin"), dir.path().join("big.bin"));
        let data: Vec<u8> = (0..(40u32 << 20) + 123).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        durable_write(&[src.display().to_string(), out.display().to_string()]).unwrap();
        assert!(std::fs::read(&out).unwrap() == data, "byte-exact");
        assert!(!out.with_extension("partial").exists());
        let again = durable_write(&[src.display().to_string(), out.display().to_string()]);
        assert!(again.is_ok(), "OUT exists: the rename replaces it");
        assert!(durable_write(&[src.display().to_string()]).is_err(), "missing arguments refused");
        // A whole number of pieces: the last read finds nothing, and no tail is written.
        let exact: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
        std::fs::write(&src, &exact).unwrap();
        std::fs::remove_file(&out).unwrap();
        durable_write(&[src.display().to_string(), out.display().to_string()]).unwrap();
        assert!(std::fs::read(&out).unwrap() == exact, "byte-exact");
    }
}
