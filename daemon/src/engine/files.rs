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
}

/// Moves `from` (synced) to `to`, then syncs `to`'s directory.
///
/// Without `overwrite` an existing `to` is never replaced (`RENAME_NOREPLACE`). Across
/// filesystems the data is copied to a temporary file beside `to`, synced, and renamed.
/// Idempotent for crash recovery: if `from` is gone and `to` exists, it was moved.
pub fn move_into_place(from: &Path, to: &Path, overwrite: bool) -> Result<(), MoveError> {
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
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
            copy_then_rename(from, to, overwrite)?;
            // The copy's name must be durable before the only other copy goes.
            sync_parent(to).map_err(io_err)?;
            std::fs::remove_file(from).map_err(io_err)?;
            return Ok(());
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(MoveError::Exists(to.to_path_buf())),
        Err(e) => return Err(io_err(e)),
    }
    sync_parent(to).map_err(io_err)
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

fn copy_then_rename(from: &Path, to: &Path, overwrite: bool) -> Result<(), MoveError> {
    let io_err = |source: io::Error| MoveError::Io { path: to.to_path_buf(), source };
    let name = to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = to.with_file_name(format!(".{name}.dlsessiond-{}.tmp", std::process::id()));
    let result = (|| {
        let mut src = File::open(from)?;
        let mut dst = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        io::copy(&mut src, &mut dst)?;
        dst.sync_all()?;
        rename(&tmp, to, overwrite)
    })();
    if let Err(e) = result {
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
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    DIR_SYNCS.sync(dir)
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
