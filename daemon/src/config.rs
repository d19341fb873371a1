//! Daemon configuration: command-line flags over an optional TOML file over defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Everything the daemon is configured with. Built once at start by [`Config::load`].
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// A PEM file of extra trusted CA certificates.
    pub extra_ca_file: Option<PathBuf>,
    pub limits: Limits,
    pub timing: Timing,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Downloads running at once, across all sessions.
    pub max_concurrent_downloads: u32,
    /// Client connections at once; more are refused at the handshake.
    pub max_connections: u32,
    /// Tasks in one `CreateTasks` request.
    pub max_tasks_per_batch: u32,
    pub max_headers_per_task: u32,
    pub max_url_len: usize,
    /// Redirects followed per attempt.
    pub max_redirects: u32,
    /// Apps being relaunched at once (started and not yet attached, exited or 10 s old);
    /// more relaunches wait their turn, so a burst of finished sessions is no fork storm.
    pub max_concurrent_launches: u32,
    /// Bytes per second for all downloads together, until `dlsessionctl limit --global`
    /// sets another (which is stored and wins from then on).
    pub bandwidth_limit: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Timing {
    pub handshake_timeout: Duration,
    /// A request's disk phase (destinations, a kept file, certificate files) that takes
    /// longer (a hung mount) is answered with `file_error`, and its connection goes on.
    pub disk_check_timeout: Duration,
    pub connect_timeout: Duration,
    /// Progress events: at most one per task per interval.
    pub progress_interval: Duration,
    /// The most received data a crash may cost a running download (it syncs and commits
    /// its offset every half of this)…
    pub checkpoint_bytes: u64,
    /// …or after this much time, whichever comes first.
    pub checkpoint_interval: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// A server's `Retry-After` is honoured up to this long.
    pub retry_after_max: Duration,
    pub wake_initial: Duration,
    pub wake_max: Duration,
    /// A running app sent `wake` has this long to rejoin the session before the daemon
    /// relaunches it instead.
    pub wake_answer: Duration,
    /// A download that reports nothing (no byte, no step) for this long beyond its
    /// session's `timeout_for_request` is stopped, and abandoned if it does not stop.
    pub stall_timeout: Duration,
    /// How long SIGTERM waits for downloads to checkpoint.
    pub shutdown_grace: Duration,
    /// Under socket activation: exit after this long with nothing to do (no client, no
    /// download, no timer). `None`: never.
    pub idle_exit: Option<Duration>,
    /// How long retired tasks stay in the database (for `dlsessionctl show`)…
    pub retired_history: Duration,
    /// …and at most how many of them.
    pub retired_history_max: u64,
    /// Durable events nobody collected expire after this long (their files are deleted).
    pub event_retention: Duration,
    /// Partial files kept for resume data are deleted this long after the cancel.
    pub resume_retention: Duration,
}

/// Command-line overrides (all optional).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    NoHome(#[from] dlsession_proto::paths::NoHomeDir),
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{what} must be an absolute path, got {path}")]
    Relative { what: &'static str, path: PathBuf },
    #[error("{what} is not valid UTF-8: {path}")]
    NotUtf8 { what: &'static str, path: PathBuf },
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The runtime's blocking threads, for short file work (preparing resumed partial files,
/// moves of finished ones, destination checks); more such work waits for one (the disk is
/// the bottleneck then anyway). Download writers have threads of their own
/// (`writer_threads`).
pub const FILE_WORK_THREADS: usize = 64;

/// Writer threads beyond one per running download: a download's slot goes to the next task
/// once its body is in, while its writer still makes its last writes and syncs.
pub const FINISHING_WRITERS: usize = 32;

impl Limits {
    /// The writer threads the engine may have: every running download's writer at once,
    /// plus [`FINISHING_WRITERS`]. (Fewer, and a download past the cap would not be written
    /// until another ended; past it, a writer waits for the first one done.)
    pub fn writer_threads(&self) -> usize {
        (self.max_concurrent_downloads as usize).saturating_add(FINISHING_WRITERS)
    }
}
/// Descriptors kept for everything but running downloads and clients: the database and
/// its journal, the listening socket, the netlink and D-Bus sockets, launch logs, standard
/// streams (64); two for each thread of file work (a move across file systems opens both
/// ends); and a finishing writer's three (as a running download's, less its connection).
const RESERVED_DESCRIPTORS: u64 = 64 + 2 * FILE_WORK_THREADS as u64 + 3 * FINISHING_WRITERS as u64;
/// Descriptors one running download may hold at once: its connection, its partial file,
/// the file's duplicate for the sync thread, and the `O_DIRECT` one for large bodies.
pub const DESCRIPTORS_PER_DOWNLOAD: u64 = 4;

impl Limits {
    /// Lowers `max_connections` and `max_concurrent_downloads` so that, together, they
    /// cannot use more than `available` descriptors (a full load must never meet
    /// `EMFILE`). Returns what it changed, for the log.
    pub fn fit_descriptors(&mut self, available: u64) -> Option<String> {
        let usable = available.saturating_sub(RESERVED_DESCRIPTORS);
        let connections = u64::from(self.max_connections).min(usable / 2).max(1);
        let downloads =
            u64::from(self.max_concurrent_downloads).min(usable.saturating_sub(connections) / DESCRIPTORS_PER_DOWNLOAD);
        let downloads = downloads.max(1);
        let (c, d) = (u32::try_from(connections).unwrap_or(u32::MAX), u32::try_from(downloads).unwrap_or(u32::MAX));
        if (c, d) == (self.max_connections, self.max_concurrent_downloads) {
            return None;
        }
        let message = format!(
            "{available} descriptors allowed (RLIMIT_NOFILE): max_connections {} → {c}, \
             max_concurrent_downloads {} → {d}",
            self.max_connections, self.max_concurrent_downloads
        );
        (self.max_connections, self.max_concurrent_downloads) = (c, d);
        Some(message)
    }
}

/// The TOML file: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    extra_ca_file: Option<PathBuf>,
    max_concurrent_downloads: Option<u32>,
    max_concurrent_launches: Option<u32>,
    bandwidth_limit: Option<u64>,
    max_connections: Option<u32>,
    max_tasks_per_batch: Option<u32>,
    handshake_timeout_ms: Option<u64>,
    disk_check_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    progress_interval_ms: Option<u64>,
    checkpoint_bytes: Option<u64>,
    checkpoint_interval_ms: Option<u64>,
    retry_initial_ms: Option<u64>,
    retry_max_ms: Option<u64>,
    retry_after_max_ms: Option<u64>,
    wake_initial_ms: Option<u64>,
    wake_max_ms: Option<u64>,
    wake_answer_ms: Option<u64>,
    stall_timeout_ms: Option<u64>,
    shutdown_grace_ms: Option<u64>,
    idle_exit_ms: Option<u64>,
    retired_history_days: Option<u32>,
    retired_history_max: Option<u64>,
    event_retention_days: Option<f64>,
    resume_retention_days: Option<f64>,
}

impl Config {
    /// Resolves the configuration: flags, then `DLSESSIOND_SOCKET`, then the config file,
    /// then XDG defaults. A missing default config file is fine; a missing named one is not.
    pub fn load(overrides: Overrides) -> Result<Config, ConfigError> {
        let defaults = dlsession_proto::paths::defaults()?;
        let (file_path, required) = match &overrides.config_file {
            Some(p) => (p.clone(), true),
            None => (defaults.config_file.clone(), false),
        };
        let file = read_file(&file_path, required)?;
        let env_socket =
            std::env::var_os(dlsession_proto::paths::SOCKET_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
        let ms = |v: Option<u64>, default: u64| Duration::from_millis(v.unwrap_or(default));
        let days = |d: u32| Duration::from_secs(u64::from(d) * 86_400);
        let config = Config {
            socket: overrides.socket.or(env_socket).or(file.socket).unwrap_or(defaults.socket),
            state_dir: overrides.state_dir.or(file.state_dir).unwrap_or(defaults.state_dir),
            cache_dir: overrides.cache_dir.or(file.cache_dir).unwrap_or(defaults.cache_dir),
            extra_ca_file: file.extra_ca_file,
            limits: Limits {
                max_concurrent_downloads: file.max_concurrent_downloads.unwrap_or(16),
                max_concurrent_launches: file.max_concurrent_launches.unwrap_or(8),
                max_connections: file.max_connections.unwrap_or(512),
                max_tasks_per_batch: file.max_tasks_per_batch.unwrap_or(10_000),
                max_headers_per_task: 64,
                max_url_len: 8192,
                max_redirects: 10,
                bandwidth_limit: file.bandwidth_limit,
            },
            timing: Timing {
                handshake_timeout: ms(file.handshake_timeout_ms, 5_000),
                disk_check_timeout: ms(file.disk_check_timeout_ms, 30_000),
                connect_timeout: ms(file.connect_timeout_ms, 30_000),
                progress_interval: ms(file.progress_interval_ms, 250),
                checkpoint_bytes: file.checkpoint_bytes.unwrap_or(64 << 20),
                checkpoint_interval: ms(file.checkpoint_interval_ms, 2_000),
                retry_initial: ms(file.retry_initial_ms, 1_000),
                // Unset, a cap is never below its start (a start set above the default cap
                // was taken before caps were checked); set, one below is refused.
                retry_max: ms(file.retry_max_ms, file.retry_initial_ms.unwrap_or(0).max(600_000)),
                retry_after_max: ms(file.retry_after_max_ms, 24 * 3_600_000),
                wake_initial: ms(file.wake_initial_ms, 30_000),
                wake_max: ms(file.wake_max_ms, file.wake_initial_ms.unwrap_or(0).max(3_600_000)),
                wake_answer: ms(file.wake_answer_ms, 10_000),
                stall_timeout: ms(file.stall_timeout_ms, 60_000),
                shutdown_grace: ms(file.shutdown_grace_ms, 10_000),
                idle_exit: file.idle_exit_ms.filter(|&ms| ms > 0).map(Duration::from_millis),
                retired_history: days(file.retired_history_days.unwrap_or(30)),
                retired_history_max: file.retired_history_max.unwrap_or(100_000),
                event_retention: fractional_days("event_retention_days", file.event_retention_days, 30.0)?,
                resume_retention: fractional_days("resume_retention_days", file.resume_retention_days, 7.0)?,
            },
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (what, path) in [("socket", &self.socket), ("state_dir", &self.state_dir), ("cache_dir", &self.cache_dir)] {
            if !path.is_absolute() {
                return Err(ConfigError::Relative { what, path: path.clone() });
            }
            // Paths travel to clients as UTF-8 strings.
            if path.to_str().is_none() {
                return Err(ConfigError::NotUtf8 { what, path: path.clone() });
            }
        }
        if let Some(ca) = &self.extra_ca_file
            && !ca.is_absolute()
        {
            return Err(ConfigError::Relative { what: "extra_ca_file", path: ca.clone() });
        }
        if let Some(rate) = self.limits.bandwidth_limit
            && rate < dlsession_proto::validate::MIN_BANDWIDTH_LIMIT
        {
            return Err(ConfigError::Invalid {
                key: "bandwidth_limit",
                message: format!(
                    "must be at least {} bytes per second",
                    dlsession_proto::validate::MIN_BANDWIDTH_LIMIT
                ),
            });
        }
        // Zero would refuse every client, every batch, or time out at once.
        for (key, n) in [
            ("max_concurrent_downloads", u64::from(self.limits.max_concurrent_downloads)),
            ("max_concurrent_launches", u64::from(self.limits.max_concurrent_launches)),
            ("max_connections", u64::from(self.limits.max_connections)),
            ("max_tasks_per_batch", u64::from(self.limits.max_tasks_per_batch)),
            ("checkpoint_bytes", self.timing.checkpoint_bytes),
        ] {
            if n == 0 {
                return Err(ConfigError::Invalid { key, message: "must be at least 1".into() });
            }
        }
        for (key, d) in [
            ("progress_interval_ms", self.timing.progress_interval),
            ("handshake_timeout_ms", self.timing.handshake_timeout),
            ("disk_check_timeout_ms", self.timing.disk_check_timeout),
            ("connect_timeout_ms", self.timing.connect_timeout),
            ("checkpoint_interval_ms", self.timing.checkpoint_interval),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid { key, message: "must be at least 1".into() });
            }
        }
        for (key, d) in [("retry_initial_ms", self.timing.retry_initial), ("wake_initial_ms", self.timing.wake_initial)]
        {
            if d.is_zero() {
                return Err(ConfigError::Invalid { key, message: "backoffs must be at least 1 ms".into() });
            }
        }
        // A cap below the start would hold the backoff there (at 0, a relaunch or retry as
        // fast as a process can be forked).
        for (key, cap, start, of) in [
            ("retry_max_ms", self.timing.retry_max, self.timing.retry_initial, "retry_initial_ms"),
            ("wake_max_ms", self.timing.wake_max, self.timing.wake_initial, "wake_initial_ms"),
        ] {
            if cap < start {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("must be at least {of} ({} ms)", start.as_millis()),
                });
            }
        }

        Ok(())
    }

    pub fn database_path(&self) -> PathBuf {
        self.state_dir.join("dlsessiond.db")
    }

    /// Partial and finished files live under here.
    pub fn downloads_dir(&self) -> PathBuf {
        self.cache_dir.join("downloads")
    }

    /// Logs of relaunched apps.
    pub fn launch_log_dir(&self) -> PathBuf {
        self.state_dir.join("launch-logs")
    }

    /// The lock held beside the socket while this daemon serves it.
    pub fn socket_lock_path(&self) -> PathBuf {
        let mut name = self.socket.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".lock");
        self.socket.with_file_name(name)
    }
}

/// A number of days (fractions allowed), positive.
fn fractional_days(key: &'static str, value: Option<f64>, default: f64) -> Result<Duration, ConfigError> {
    let days = value.unwrap_or(default);
    let invalid = || ConfigError::Invalid { key, message: format!("must be a positive number of days, got {days}") };
    if days.is_nan() || days <= 0.0 {
        return Err(invalid());
    }
    Duration::try_from_secs_f64(days * 86_400.0).map_err(|_| invalid())
}

fn read_file(path: &Path, required: bool) -> Result<FileConfig, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(FileConfig::default()),
        Err(source) => return Err(ConfigError::Read { path: path.to_path_buf(), source }),
    };
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })
}

#[cfg(test)]
impl Limits {
    /// Limits for tests: these two as given, small values for the rest.
    pub fn for_tests(downloads: u32, connections: u32) -> Limits {
        Limits {
            max_concurrent_downloads: downloads,
            max_concurrent_launches: 2,
            max_connections: connections,
            max_tasks_per_batch: 10,
            max_headers_per_task: 4,
            max_url_len: 100,
            max_redirects: 10,
            bandwidth_limit: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Downloads and clients together never need more descriptors than there are.
    #[test]
    fn limits_fit_the_descriptors() {
        let mut l = Limits::for_tests(16, 512);
        assert_eq!(l.fit_descriptors(524_288), None, "the defaults fit a usual hard limit");
        let mut l2 = Limits::for_tests(10_000, 512);
        let said = l2.fit_descriptors(1024).unwrap();
        assert_eq!((l2.max_connections, l2.max_concurrent_downloads), (368, 92), "{said}");
        let used = RESERVED_DESCRIPTORS
            + u64::from(l2.max_connections)
            + u64::from(l2.max_concurrent_downloads) * DESCRIPTORS_PER_DOWNLOAD;
        assert!(used <= 1024, "{used}");
        assert!(said.contains("max_concurrent_downloads 10000 → 92"), "{said}");
        // Absurdly few: one of each still, rather than nothing at all.
        l.fit_descriptors(10);
        assert_eq!((l.max_connections, l.max_concurrent_downloads), (1, 1));
    }
}
