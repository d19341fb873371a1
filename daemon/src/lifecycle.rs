//! Start-up plumbing: private directories, the single-instance locks, the socket.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use interprocess::local_socket::tokio::Listener;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use tracing::{info, warn};

use crate::config::Config;
use dlsession_proto::paths::NotPrivate;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("cannot create directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("{path} is owned by uid {owner}, not by us (uid {us}); refusing to use it")]
    NotOurs { path: PathBuf, owner: u32, us: u32 },
    #[error(
        "{path} can be written by other users (mode {mode:o}); refusing to keep the daemon's files there \
         (make it 0700, or choose another path)"
    )]
    Unsafe { path: PathBuf, mode: u32 },
    #[error("another dlsessiond is already running{pid} (lock {path} is held)")]
    AlreadyRunning { path: PathBuf, pid: String },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error(
        "something listens on {path} (systemd's dlsessiond.socket, or a daemon of another lock directory); \
         refusing to take it over (stop it first: systemctl --user stop dlsessiond.socket, or pass --socket)"
    )]
    Listened { path: PathBuf },
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("cannot use the socket passed by systemd: {0}")]
    Activation(std::io::Error),
}

/// Holds the instance locks for as long as the daemon runs.
#[derive(Debug)]
pub struct Instance {
    _locks: Vec<File>,
}

/// Creates the private directories and takes the locks that make this the only daemon
/// for its state directory and for its socket.
pub fn prepare(cfg: &Config) -> Result<Instance, LifecycleError> {
    private_dir(&cfg.state_dir)?;
    private_dir(&cfg.downloads_dir())?;
    let socket_dir = cfg.socket.parent().unwrap_or(Path::new("/"));
    private_dir(socket_dir)?;
    let state_lock = lock(&cfg.state_dir.join("dlsessiond.lock"))?;
    let socket_lock = lock(&cfg.socket_lock_path())?;
    Ok(Instance { _locks: vec![state_lock, socket_lock] })
}

/// Creates `dir` (and missing parents) with mode 0700, or checks that an existing one is
/// ours and safe. The mode of a directory the daemon did not create is never changed (it
/// may be shared on purpose): one that other users can write to without the sticky bit
/// (so they could replace the daemon's files) is refused; one they can only read is used,
/// since everything the daemon puts there is created private (0600 files, 0700 dirs).
pub fn private_dir(dir: &Path) -> Result<(), LifecycleError> {
    let err = |source| LifecycleError::Dir { path: dir.to_path_buf(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    let path = dir.to_path_buf();
    match dlsession_proto::paths::not_private(dir).map_err(err)? {
        None => Ok(()),
        Some(NotPrivate::Owner { owner, us }) => Err(LifecycleError::NotOurs { path, owner, us }),
        Some(NotPrivate::Writable { mode }) => Err(LifecycleError::Unsafe { path, mode }),
    }
}

fn lock(path: &Path) -> Result<File, LifecycleError> {
    let err = |source| LifecycleError::Lock { path: path.to_path_buf(), source };
    let mut file =
        OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path).map_err(err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            let pid = if pid.is_empty() { String::new() } else { format!(" as pid {pid}") };
            return Err(LifecycleError::AlreadyRunning { path: path.to_path_buf(), pid });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
    }
    file.set_len(0).map_err(err)?;
    file.rewind().map_err(err)?;
    writeln!(file, "{}", std::process::id()).map_err(err)?;
    Ok(file)
}

/// Binds the socket (mode 0600, set before `bind`: no umask race). A socket file left by
/// a crashed daemon is removed: we hold the lock, so no daemon is listening on it. One that
/// something listens on is left alone: systemd's activation socket holds it while the
/// service is stopped (its locks free), and replacing it would break activation.
pub fn bind(socket: &Path) -> Result<Listener, LifecycleError> {
    match std::fs::symlink_metadata(socket) {
        // (Where the table cannot be read, the lock alone decides.)
        Ok(m) if m.file_type().is_socket() && listening(socket) == Some(true) => {
            return Err(LifecycleError::Listened { path: socket.to_path_buf() });
        }
        Ok(m) if m.file_type().is_socket() => {
            info!(path = %socket.display(), "removing stale socket");
            std::fs::remove_file(socket)
                .map_err(|source| LifecycleError::Bind { path: socket.to_path_buf(), source })?;
        }
        Ok(_) => return Err(LifecycleError::NotASocket { path: socket.to_path_buf() }),
        Err(_) => {}
    }
    let bind_err = |source| LifecycleError::Bind { path: socket.to_path_buf(), source };
    let name = socket.to_fs_name::<GenericFilePath>().map_err(bind_err)?;
    // Not reclaimed on drop: removed at exit only while it is still ours (`OwnSocket`).
    ListenerOptions::new().name(name).mode(0o600).reclaim_name(false).create_tokio().map_err(bind_err)
}

/// The socket file this daemon bound, by device and inode: what it watches, and what it
/// removes at exit, only if the path still names it (a socket unit or another daemon may
/// have taken the path meanwhile: theirs is never removed).
#[derive(Debug, Clone)]
pub struct OwnSocket {
    path: PathBuf,
    id: (u64, u64),
}

impl OwnSocket {
    /// The socket at `path` as it is now (right after binding it).
    pub fn of(path: &Path) -> Option<OwnSocket> {
        Some(OwnSocket { path: path.to_path_buf(), id: file_id(path)? })
    }

    /// Whether the path still names our socket.
    fn is_there(&self) -> bool {
        file_id(&self.path) == Some(self.id)
    }

    /// Removes the socket file if it is still ours.
    pub fn remove(&self) {
        if self.is_there() {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Resolves once the path no longer names our socket: removed (a logout emptied the
    /// runtime directory, a clean-up of `/tmp`) or replaced (systemd's socket unit took the
    /// path, another daemon). Clients could no longer reach this daemon, and the locks it
    /// holds would keep one they can reach from starting: it should stop. Woken only by
    /// changes in the socket's directory (inotify), never by a timer. `None` where the
    /// socket cannot be watched (then it is not).
    pub fn lost(&self) -> Option<impl Future<Output = ()> + use<>> {
        use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
        let dir = self.path.parent()?;
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).ok()?;
        let changes = WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO
            | WatchFlags::DELETE_SELF
            | WatchFlags::MOVE_SELF;
        inotify::add_watch(&fd, dir, changes).ok()?;
        let fd = watched(fd)?;
        let own = self.clone();
        Some(async move {
            let mut buf = [std::mem::MaybeUninit::uninit(); 1024];
            loop {
                let Ok(mut ready) = fd.readable().await else { return std::future::pending().await };
                // What changed matters less than what is there now: read every event, then look.
                let mut events = inotify::Reader::new(fd.get_ref(), &mut buf);
                while events.next().is_ok() {}
                ready.clear_ready();
                if !own.is_there() {
                    warn!(
                        socket = %own.path.display(),
                        "the socket was removed or replaced (a logout, systemd's socket unit, another daemon); \
                         stopping, so that a daemon clients can reach may start"
                    );
                    return;
                }
            }
        })
    }
}

/// The device and inode `path` names (not following a link).
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The inotify descriptor, registered with the runtime for reading.
#[allow(unsafe_code)]
fn watched(fd: std::os::fd::OwnedFd) -> Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the `AsyncFd` owns the `OwnedFd`, which stays open and the same descriptor
    // until the `AsyncFd` is dropped (nothing else has it).
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
}

/// Whether a Unix socket listens at `path`, without connecting to it (a connection to
/// systemd's activation socket would start a daemon): its row in `/proc/net/unix` has the
/// `__SO_ACCEPTCON` flag. `None` if that table cannot be read.
pub fn listening(path: &Path) -> Option<bool> {
    const ACCEPTING: u32 = 0x0001_0000;
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    Some(table.lines().skip(1).any(|row| {
        // Num RefCount Protocol Flags Type St Inode Path (the path may hold spaces).
        let mut fields = row.splitn(8, ' ').filter(|f| !f.is_empty());
        let flags = fields.nth(3).and_then(|f| u32::from_str_radix(f, 16).ok());
        let bound = fields.nth(3).map(str::trim);
        flags.is_some_and(|f| f & ACCEPTING != 0) && bound.is_some_and(|b| Path::new(b) == path)
    }))
}

/// Raises the soft limit on open descriptors to the hard one (systemd starts services,
/// and desktops start programs, at 1,024 soft with a far higher hard limit: a program
/// that needs more is expected to raise it, and never to use `select`). Returns the
/// limit in force afterwards.
pub fn raise_descriptor_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // "Unlimited" is not a number the kernel takes for descriptors; its own ceiling is
    // `fs.nr_open`, 1,048,576 by default.
    const CEILING: u64 = 1 << 20;
    let limit = getrlimit(Resource::Nofile);
    let _ = STARTED_WITH.set(limit.current);
    let target = limit.maximum.unwrap_or(CEILING).min(CEILING);
    if limit.current.is_some_and(|c| c < target)
        && let Err(e) = setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: limit.maximum })
    {
        warn!(error = %e, "cannot raise the open-file limit");
    }
    getrlimit(Resource::Nofile).current.unwrap_or(CEILING)
}

/// The soft descriptor limit the daemon was started with (`None`: unlimited), before
/// `raise_descriptor_limit`.
static STARTED_WITH: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

/// The soft descriptor limit the daemon was started with, if it raised its own: what the
/// apps it relaunches get back (an app started from a desktop or a shell would have it,
/// and one that uses `select` breaks on descriptors above 1,024).
pub fn started_descriptor_limit() -> Option<u64> {
    let started = (*STARTED_WITH.get()?)?;
    let now = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    (now != Some(started)).then_some(started)
}

/// The listening socket systemd passed (`LISTEN_FDS`/`LISTEN_PID`), if any.
///
/// Must run inside the tokio runtime (the socket is registered with it). Children the
/// daemon starts never inherit the descriptor (it is made close-on-exec) nor the
/// variables (the launcher removes them).
pub fn activated_listener(configured: &Path) -> Result<Option<Listener>, LifecycleError> {
    let mut fds = sd_notify::listen_fds().map_err(LifecycleError::Activation)?;
    let Some(fd) = fds.next() else { return Ok(None) };
    if fds.len() > 0 {
        warn!(count = fds.len() + 1, "systemd passed several sockets; using the first");
    }
    let std_listener = std::os::unix::net::UnixListener::from(adopt(fd));
    let passed = std_listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf));
    if passed.as_deref() != Some(configured) {
        warn!(
            passed = ?passed,
            configured = %configured.display(),
            "systemd passed a socket at another path than clients look for"
        );
    }
    std_listener.set_nonblocking(true).map_err(LifecycleError::Activation)?;
    let listener =
        interprocess::os::unix::uds_local_socket::tokio::Listener::try_from(std::os::fd::OwnedFd::from(std_listener))
            .map_err(LifecycleError::Activation)?;
    info!(fd = 3, "listening on the socket passed by systemd");
    Ok(Some(Listener::from(listener)))
}

/// Closes every descriptor the daemon was started with but stdio and the sockets systemd
/// passed (`LISTEN_FDS`, when `LISTEN_PID` is this process). An app that starts the daemon
/// (the library's autostart) may hold a listening socket, a lock or a pipe without
/// close-on-exec: kept here, the port stayed bound and the pipe never ended for as long as
/// the daemon ran. Must run first, before anything of the daemon's own is open.
#[allow(unsafe_code)]
pub fn close_inherited() {
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let passed =
        if ours { std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0) } else { 0 };
    let first = 3u32.saturating_add(passed);
    // SAFETY: called at the top of `main`, before any thread exists and before the daemon
    // opened anything: every descriptor from `first` up was inherited, and nothing in
    // this process owns it or will use it.
    if unsafe { libc::close_range(first, u32::MAX, 0) } == 0 {
        return;
    }
    // Kernels before 5.9: the descriptors /proc lists (read whole first: the listing's
    // own descriptor is among them while it is open).
    let open: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(entries) => entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect(),
        Err(_) => return,
    };
    for fd in open.into_iter().filter(|&fd| u32::try_from(fd).is_ok_and(|fd| fd >= first)) {
        // SAFETY: as above; the listing's own descriptor is closed already (EBADF, ignored).
        unsafe { libc::close(fd) };
    }
}

/// Takes ownership of a descriptor passed by systemd.
#[allow(unsafe_code)]
fn adopt(fd: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `listen_fds` returned it only because LISTEN_PID names this process, so the
    // descriptor was passed to us by the service manager; nothing else in the process
    // owns or closes it, and it is adopted exactly once, at start-up.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}
