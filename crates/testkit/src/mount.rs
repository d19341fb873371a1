//! Mounts made by root-only tests, undone on drop; and the check that such a test runs as
//! root.
//!
//! A root-only test is marked `#[cfg_attr(not(dlsession_root), ignore = "...")]`: the
//! `tests` crate's build script sets `dlsession_root` when it is built by root (as in CI),
//! so elsewhere `cargo test` lists the test as ignored, with its reason, never as passed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Panics unless this process is root (a root-only test built by root but run by another
/// user must fail loudly, not pass).
pub fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it was built by root, so it is not marked ignored): run it as root"
    );
}

/// A filesystem mounted for a test, unmounted (lazily) on drop.
#[derive(Debug)]
pub struct Mount(PathBuf);

impl Mount {
    /// A tmpfs at `at` (created if missing) with mount `options`, e.g. `size=2m`.
    pub fn tmpfs(at: &Path, options: &str) -> Mount {
        Mount::in_memory("tmpfs", at, options)
    }

    /// A ramfs at `at` (created if missing): a filesystem that keeps no user extended
    /// attributes.
    pub fn ramfs(at: &Path) -> Mount {
        Mount::in_memory("ramfs", at, "mode=0700")
    }

    /// A memory filesystem of `kind` at `at` (created if missing) with mount `options`.
    fn in_memory(kind: &str, at: &Path, options: &str) -> Mount {
        std::fs::create_dir_all(at).expect("mount point");
        let st = Command::new("mount").args(["-t", kind, "-o", options, kind]).arg(at).status().expect("mount");
        assert!(st.success(), "mount {kind} at {}", at.display());
        Mount(at.to_path_buf())
    }

    /// `src` shown at `at` (created if missing) through `bindfs`, a FUSE filesystem that,
    /// like NFS, refuses rename flags (`RENAME_NOREPLACE` fails with `EINVAL`) but keeps
    /// hard links and user extended attributes. Needs the `bindfs` program and `/dev/fuse`.
    pub fn bindfs(src: &Path, at: &Path) -> Mount {
        std::fs::create_dir_all(src).expect("bindfs source");
        std::fs::create_dir_all(at).expect("mount point");
        let st = Command::new("bindfs").arg(src).arg(at).status().expect("bindfs (Debian: apt-get install bindfs)");
        assert!(st.success(), "bindfs {} at {}", src.display(), at.display());
        Mount(at.to_path_buf())
    }

    /// `dir` bound onto itself (so its mount options can change), read-only.
    pub fn read_only_bind(dir: &Path) -> Mount {
        let st = Command::new("mount").arg("--bind").arg(dir).arg(dir).status().expect("mount");
        assert!(st.success(), "bind {}", dir.display());
        let m = Mount(dir.to_path_buf());
        m.remount("bind,ro");
        m
    }

    /// Changes the mount's options (`rw`, `ro`, `size=64m`…).
    pub fn remount(&self, options: &str) {
        let st =
            Command::new("mount").args(["-o", &format!("remount,{options}")]).arg(&self.0).status().expect("mount");
        assert!(st.success(), "remount {} with {options}", self.0.display());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
