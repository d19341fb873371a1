//! The test data the workloads share (made once per invocation), and their small
//! helpers: checking and removing outputs, run orders.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::ctx::Ctx;

/// A file nginx serves, with its SHA-256.
#[derive(Debug, Clone)]
pub struct Served {
    /// URL path, e.g. `/big.bin`.
    pub url_path: String,
    pub size: u64,
    pub sha256: String,
}

/// Test data made on first use.
#[derive(Debug, Default)]
pub struct Data {
    big: Option<Served>,
    small: Option<Vec<Served>>,
    tiny: Option<Vec<Served>>,
}

impl Data {
    /// The big random file (1 GiB; 256 MiB with `--quick`), written once and read once so
    /// every run is served from the page cache alike.
    pub fn big(&mut self, ctx: &Ctx) -> Result<Served> {
        if let Some(b) = &self.big {
            return Ok(b.clone());
        }
        let size = ctx.sizes.big;
        let path = ctx.www.join("big.bin");
        let t0 = Instant::now();
        println!("making {} of random data at {} …", crate::stats::size(size), path.display());
        write_random(&path, size)?;
        let sha256 = dlsession_testkit::sha256_file(&path)?;
        println!(
            "  done in {:.1} s (SHA-256 {sha256}; the hashing read it into the page cache)",
            t0.elapsed().as_secs_f64()
        );
        let served = Served { url_path: "/big.bin".into(), size, sha256 };
        self.big = Some(served.clone());
        Ok(served)
    }

    /// The small random files (1,000 × 100 KiB; 200 with `--quick`) under `/small/`.
    pub fn small(&mut self, ctx: &Ctx) -> Result<Vec<Served>> {
        if self.small.is_none() {
            self.small = Some(random_files(ctx, "small", ctx.sizes.small_count, ctx.sizes.small_size)?);
        }
        self.small.clone().context("small files")
    }

    /// The tiny random files (10,000 × 10 KiB; 2,000 with `--quick`) under `/tiny/`.
    pub fn tiny(&mut self, ctx: &Ctx) -> Result<Vec<Served>> {
        if self.tiny.is_none() {
            let count = if ctx.quick { 2_000 } else { 10_000 };
            self.tiny = Some(random_files(ctx, "tiny", count, 10 << 10)?);
        }
        self.tiny.clone().context("tiny files")
    }
}

/// `count` files of `size` random bytes under nginx's `/SUBDIR/`.
fn random_files(ctx: &Ctx, subdir: &str, count: usize, size: usize) -> Result<Vec<Served>> {
    let dir = ctx.www.join(subdir);
    std::fs::create_dir_all(&dir)?;
    let mut urandom = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    let mut buf = vec![0u8; size];
    let mut files = Vec::with_capacity(count);
    for i in 0..count {
        urandom.read_exact(&mut buf)?;
        let name = format!("f{i:05}.bin");
        std::fs::write(dir.join(&name), &buf)?;
        files.push(Served {
            url_path: format!("/{subdir}/{name}"),
            size: buf.len() as u64,
            sha256: dlsession_testkit::sha256_hex(&buf),
        });
    }
    Ok(files)
}

fn write_random(path: &Path, size: u64) -> Result<()> {
    let mut urandom = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    let mut out = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64))?;
        let chunk = buf.get_mut(..n).context("chunk")?;
        urandom.read_exact(chunk)?;
        out.write_all(chunk)?;
        left -= n as u64;
    }
    out.sync_all()?;
    Ok(())
}

/// Fails unless `path` has the SHA-256 `expected`.
pub fn verify(path: &Path, expected: &str) -> Result<()> {
    let got = dlsession_testkit::sha256_file(path).with_context(|| format!("hashing {}", path.display()))?;
    if got != expected {
        bail!("wrong data in {}: SHA-256 {got}, expected {expected}", path.display());
    }
    Ok(())
}

/// Removes a file or directory if it exists.
pub fn remove(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display())),
        Ok(_) => std::fs::remove_file(path).with_context(|| format!("removing {}", path.display())),
        Err(_) => Ok(()),
    }
}

/// The order contenders run in during run `r`: runs come in pairs, forward then backward,
/// and each pair starts one contender later, so over 2 × n runs every contender runs twice
/// in every position and after more than one other contender. A fixed order was not fair
/// here: a 1 GiB run right after another tool's file was deleted could be slower, whoever
/// ran it; plain rotation keeps the cyclic order (the same tool always before dlsessiond).
pub fn rotation(n: usize, r: usize) -> impl Iterator<Item = usize> {
    let shift = r / 2;
    let backward = r % 2 == 1;
    (0..n).map(move |k| {
        let k = if backward { n - 1 - k } else { k };
        (k + shift) % n
    })
}

/// Where a workload writes its downloads (emptied first).
pub fn out_dir(ctx: &Ctx, name: &str) -> Result<PathBuf> {
    let dir = ctx.work.join("out").join(name);
    remove(&dir)?;
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rotation_varies_positions_and_predecessors() {
        let n = 4;
        let mut positions = vec![std::collections::BTreeSet::new(); n];
        let mut before = vec![std::collections::BTreeSet::new(); n];
        for r in 0..2 * n {
            let order: Vec<usize> = super::rotation(n, r).collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "each contender runs once per run");
            for (pos, &c) in order.iter().enumerate() {
                positions[c].insert(pos);
                if pos > 0 {
                    before[c].insert(order[pos - 1]);
                }
            }
        }
        for c in 0..n {
            assert_eq!(positions[c].len(), n, "contender {c} ran only in positions {:?}", positions[c]);
            assert!(before[c].len() >= 2, "contender {c} only ever ran after {:?}", before[c]);
        }
    }
}
