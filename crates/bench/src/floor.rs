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
}
