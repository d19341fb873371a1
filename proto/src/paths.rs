//! Where the daemon and its clients meet (docs/behaviour.md, "Paths").
//!
//! Resolved from the environment when called, so a test isolates itself by pointing
//! `HOME` and every `XDG_*` variable at a temporary directory.

use std::path::PathBuf;

/// Overrides the socket path for the daemon and every client.
pub const SOCKET_ENV: &str = "DLSESSIOND_SOCKET";
/// Set by the daemon in the environment of an app it relaunches.
pub const RELAUNCH_SOCKET_ENV: &str = "DLSESSION_SOCKET";
pub const RELAUNCH_IDENTIFIER_ENV: &str = "DLSESSION_IDENTIFIER";
pub const RELAUNCH_REASON_ENV: &str = "DLSESSION_WAKE_REASON";

/// Variables systemd sets for a service's processes (systemd.exec(5), "Environment
/// variables in spawned processes"): neither a daemon an app autostarts nor an app the
/// daemon relaunches takes them from the one that started it (it would notify systemd or
/// log to the journal on the other's behalf, take its sockets or directories, or take
/// itself for a service).
pub const SYSTEMD_SERVICE_VARIABLES: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "SYSTEMD_EXEC_PID",
    "MAINPID",
    "MANAGERPID",
    "TRIGGER_UNIT",
    "TRIGGER_PATH",
    "TRIGGER_TIMER_REALTIME_USEC",
    "TRIGGER_TIMER_MONOTONIC_USEC",
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
    "CACHE_DIRECTORY",
    "LOGS_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "MEMORY_PRESSURE_WATCH",
    "MEMORY_PRESSURE_WRITE",
    "FDSTORE",
];

const APP: &str = "dlsessiond";
const SOCKET_NAME: &str = "dlsessiond.sock";

/// The default directories of a daemon, from the XDG environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultPaths {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub config_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot determine the home directory: set HOME or the XDG_* variables")]
pub struct NoHomeDir;

/// The XDG default paths, ignoring `DLSESSIOND_SOCKET`.
pub fn defaults() -> Result<DefaultPaths, NoHomeDir> {
    let dirs = directories::ProjectDirs::from("", "", APP).ok_or(NoHomeDir)?;
    let state_dir = dirs.state_dir().map(|p| p.to_path_buf()).unwrap_or_else(|| dirs.data_local_dir().to_path_buf());
    let runtime = match dirs.runtime_dir() {
        Some(dir) => dir.to_path_buf(),
        // No XDG_RUNTIME_DIR (e.g. a root shell without logind): a private directory in
        // /tmp named after the uid; the daemon insists it is ours and 0700.
        None => std::env::temp_dir().join(format!("{APP}-{}", rustix::process::getuid().as_raw())),
    };
    Ok(DefaultPaths {
        socket: runtime.join(SOCKET_NAME),
        state_dir,
        cache_dir: dirs.cache_dir().to_path_buf(),
        config_file: dirs.config_dir().join("config.toml"),
    })
}

/// This process's effective uid: the one owner a daemon (and its socket's directory) may
/// have for a client to use it.
pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Why a directory may not hold the daemon's files (its socket, lock, state): another
/// user's, or one others may write to without the sticky bit (they could replace them).
/// One readable by others is fine: everything put there is created private.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotPrivate {
    /// Owned by uid `owner`, not by `us`.
    Owner { owner: u32, us: u32 },
    /// Writable by others, mode `mode` (permission bits).
    Writable { mode: u32 },
}

/// The daemon's and its clients' one rule for a directory of theirs (followed through links).
pub fn not_private(dir: &std::path::Path) -> std::io::Result<Option<NotPrivate>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir)?;
    let us = effective_uid();
    let mode = meta.mode() & 0o7777;
    Ok(if meta.uid() != us {
        Some(NotPrivate::Owner { owner: meta.uid(), us })
    } else if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        Some(NotPrivate::Writable { mode: mode & 0o777 })
    } else {
        None
    })
}

/// The socket a client should connect to: `DLSESSION_SOCKET` (set for relaunched apps),
/// else `DLSESSIOND_SOCKET`, else the XDG default.
pub fn client_socket() -> Result<PathBuf, NoHomeDir> {
    for var in [RELAUNCH_SOCKET_ENV, SOCKET_ENV] {
        if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(path));
        }
    }
    Ok(defaults()?.socket)
}
