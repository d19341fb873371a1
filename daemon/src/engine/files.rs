//! Moving a finished file into place, crash-safely (SPEC §8).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

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
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    match rename(from, to, overwrite) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
            copy_then_rename(from, to, overwrite)?;
            std::fs::remove_file(from).map_err(io_err)?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(MoveError::Exists(to.to_path_buf())),
        Err(e) => return Err(io_err(e)),
    }
    sync_parent(to).map_err(io_err)
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
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
