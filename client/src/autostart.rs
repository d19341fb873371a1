//! Starting `dlsessiond` on demand, when nothing listens on its socket.
//!
//! Under systemd the socket unit answers every connection, so this only runs where no
//! service manager provides the daemon. Racing clients serialise on a lock file next to
//! the socket: the first starts the daemon, the others find it listening.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::Error;
use dlsession_proto::paths::NotPrivate;

/// Set to `1` to never start the daemon from a client.
pub const NO_AUTOSTART_ENV: &str = "DLSESSION_NO_AUTOSTART";
/// The daemon binary to start (else next to this program, else on `PATH`).
pub const DAEMON_PATH_ENV: &str = "DLSESSIOND_PATH";

/// False when `DLSESSION_NO_AUTOSTART` is set to a true value.
pub fn enabled() -> bool {
    !matches!(
        std::env::var(NO_AUTOSTART_ENV).map(|v| v.to_ascii_lowercase()).as_deref(),
        Ok("1" | "true" | "yes" | "on")
    )
}

/// Starts a daemon listening on `socket` unless one already is, and waits until it
/// accepts connections.
///
/// On a thread of its own, not the runtime's blocking pool: a runtime being dropped waits
/// for every job of its pool, and this one may wait up to twice `timeout` (for the lock,
/// then for the socket), so an app dropping its session would wait for it too.
pub async fn start(socket: &Path, timeout: Duration) -> Result<(), Error> {
    let socket = socket.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("dlsession-start".into())
        .spawn(move || {
            let _ = tx.send(start_blocking(&socket, timeout));
        })
        .map_err(|e| Error::StartFailed { reason: format!("cannot start the starter thread: {e}") })?;
    rx.await.map_err(|_| Error::StartFailed { reason: "the starter thread failed".into() })?
}

/// As the daemon checks its socket's directory (`paths::not_private`): another user's (made
/// first under `/tmp`) would hold our lock file and the socket a daemon of theirs listens on.
fn ours_alone(dir: &Path) -> Result<(), String> {
    match dlsession_proto::paths::not_private(dir).map_err(|e| format!("cannot look at {}: {e}", dir.display()))? {
        None => Ok(()),
        Some(NotPrivate::Owner { owner, us }) => Err(format!(
            "{} belongs to uid {owner}, not to this user (uid {us}); not starting a daemon there \
             (set XDG_RUNTIME_DIR or DLSESSIOND_SOCKET)",
            dir.display()
        )),
        Some(NotPrivate::Writable { mode }) => Err(format!(
            "{} can be written by other users (mode {mode:o}); not starting a daemon there (make it 0700)",
            dir.display()
        )),
    }
}

/// The last line written to the log at `path` from byte `from` on (of its last 64 KiB),
/// at most 512 bytes of it: why a daemon that exited during its start did.
fn last_line_since(path: &Path, from: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let end = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(from.max(end.saturating_sub(64 << 10)))).ok()?;
    let mut text = Vec::new();
    file.take(64 << 10).read_to_end(&mut text).ok()?;
    let text = String::from_utf8_lossy(&text);
    let line = text.lines().map(str::trim).rfind(|l| !l.is_empty())?;
    let mut cut = line.len().min(512);
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    Some(line.get(..cut)?.to_owned())
}

fn start_blocking(socket: &Path, timeout: Duration) -> Result<(), Error> {
    let fail = |reason: String| Error::StartFailed { reason };
    let dir = socket.parent().ok_or_else(|| fail(format!("{} has no parent directory", socket.display())))?;
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    ours_alone(dir).map_err(fail)?;
    let lock_path = dir.join("dlsessiond.startup.lock");
    let lock = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| fail(format!("cannot open {}: {e}", lock_path.display())))?;
    // Whoever holds the lock is starting a daemon: wait for it, but not for ever (a
    // starter stopped in a debugger or by SIGSTOP holds it as long as it likes).
    let deadline = crate::deadline::after(timeout);
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(fail(format!("cannot lock {}: {e}", lock_path.display())));
            }
        }
        // It may have started one already, lock still held.
        if UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "another client has held {} for {timeout:?} without a daemon starting; \
                 is a stopped dlsession client holding it?",
                lock_path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Whoever held the lock before us may have started it already.
    if UnixStream::connect(socket).is_ok() {
        return Ok(());
    }
    let exe = find_daemon().ok_or_else(|| {
        fail(format!(
            "cannot find the dlsessiond binary (set {DAEMON_PATH_ENV}, or put it next to this program or on PATH)"
        ))
    })?;
    let log_path = log_path();
    let log = log_path.as_deref().and_then(|p| {
        if let Some(parent) = p.parent() {
            let _ = DirBuilder::new().recursive(true).mode(0o700).create(parent);
        }
        rotate(p);
        OpenOptions::new().create(true).append(true).mode(0o600).open(p).ok()
    });
    // Where this start's own lines begin: what it said last is the reason it gives.
    let log_from = log.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
    let (out, err) = match &log {
        Some(f) => (stdio(f), stdio(f)),
        None => (Stdio::null(), Stdio::null()),
    };
    let mut command = Command::new(&exe);
    // What systemd gave the starting app (when it runs as a service) is not the daemon's:
    // it would log to that unit's journal stream, and take itself for a service.
    for var in dlsession_proto::paths::SYSTEMD_SERVICE_VARIABLES {
        command.env_remove(var);
    }
    let mut child = command
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: ^C in the client's terminal does not stop it.
        .process_group(0)
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", exe.display())))?;
    let see_log = log_path.as_ref().map(|p| format!("; see {}", p.display())).unwrap_or_default();
    let deadline = crate::deadline::after(timeout);
    loop {
        if UnixStream::connect(socket).is_ok() {
            reap_when_it_exits(child);
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Only from a log this start wrote to (one it could not open holds an older run's).
            let said = log_path
                .as_deref()
                .filter(|_| log.is_some())
                .and_then(|p| last_line_since(p, log_from))
                .map(|l| format!(": {l}"));
            return Err(fail(format!(
                "{} exited during start-up ({status}){}{see_log}",
                exe.display(),
                said.unwrap_or_default()
            )));
        }
        if Instant::now() >= deadline {
            // It may still come up (a slow disk): it runs on, and is reaped all the same.
            reap_when_it_exits(child);
            return Err(fail(format!("{} did not start listening within {timeout:?}{see_log}", exe.display())));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reaps the started daemon when it exits, while this process lives on: else a zombie
/// until then.
fn reap_when_it_exits(mut child: std::process::Child) {
    let reaper = std::thread::Builder::new().name("dlsessiond-reaper".into());
    if let Err(e) = reaper.spawn(move || child.wait()) {
        tracing::debug!(error = %e, "cannot start a thread to reap the started daemon when it exits");
    }
}

/// The log of an autostarted daemon grows to this size; then it becomes `NAME.1`
/// (replacing the one before) and a new one starts.
const LOG_CAP: u64 = 4 << 20;

fn rotate(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= LOG_CAP) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        let _ = std::fs::rename(path, old);
    }
}

fn stdio(f: &File) -> Stdio {
    f.try_clone().map(Stdio::from).unwrap_or_else(|_| Stdio::null())
}

/// Where an autostarted daemon logs: `$XDG_STATE_HOME/dlsessiond/dlsessiond.log`.
fn log_path() -> Option<PathBuf> {
    dlsession_proto::paths::defaults().ok().map(|d| d.state_dir.join("dlsessiond.log"))
}

fn find_daemon() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(DAEMON_PATH_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("dlsessiond")));
    if let Some(p) = beside.filter(|p| p.is_file()) {
        return Some(p);
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|d| d.join("dlsessiond")).collect::<Vec<_>>())
        .and_then(|candidates| candidates.into_iter().find(|p| p.is_file()))
}
