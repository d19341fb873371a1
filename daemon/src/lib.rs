//! dlsessiond: a per-user background download daemon.
//!
//! Layout:
//! - [`config`]: flags, TOML file and defaults → [`config::Config`].
//! - [`lifecycle`]: private directories, single-instance locks, the socket.
//! - [`ipc`]: the socket server; peer checks, handshake, framing.
//! - `core`: the one owner of session, task and connection state.
//! - [`engine`]: one tokio task per running download (HTTP, files, checkpoints).
//! - [`store`]: SQLite, on its own thread; the only module with SQL.
//! - [`launcher`]: relaunching apps.
//!
//! [`run`] is the entry point that tests and `main` share.

pub mod activation;
pub mod config;
pub mod conn;
mod core;
pub mod desktop;
pub mod engine;
pub mod failpoint;
pub mod ipc;
pub mod launcher;
pub mod lifecycle;
pub mod model;
pub mod net;
pub mod notify;
pub mod panics;
pub mod store;
pub mod units;
pub mod validate;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

use interprocess::local_socket::tokio::Listener;
use tokio::sync::{mpsc, watch};
use tracing::{error, info};

use config::{Config, Overrides};
use core::{Core, CoreMsg};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Lifecycle(#[from] lifecycle::LifecycleError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Tls(#[from] engine::http::TlsSetupError),
    #[error("{0}")]
    Fatal(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signals(std::io::Error),
}

/// Serves `listener` until `shutdown` resolves, then checkpoints and returns. `activated`:
/// the listener came from systemd, which starts the daemon again on the next connection,
/// so `idle_exit_ms` applies.
pub async fn run(
    cfg: Config,
    listener: Listener,
    activated: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let cfg = Arc::new(cfg);
    let (core_tx, core_rx) = mpsc::unbounded_channel();
    let started = std::time::Instant::now();
    tokio::pin!(shutdown);
    let Some((store, snapshot)) = open_store(&cfg, &core_tx, &mut shutdown).await? else {
        info!("stopped before the database opened");
        return Ok(());
    };
    // Start-up time matters under socket activation: the first client waits for it.
    let opened = started.elapsed();
    let (sessions, tasks) = (snapshot.sessions.len(), snapshot.tasks.len());
    let dormant: u64 = snapshot.dormant.iter().map(|(_, n)| n).sum();
    let proxies = engine::proxy::Proxies::from_env();
    let factory = engine::http::ClientFactory::new(
        cfg.extra_ca_file.as_deref(),
        cfg.timing.connect_timeout,
        cfg.limits.max_concurrent_downloads,
    )?;
    let engine = Arc::new(
        engine::Engine::new(
            factory,
            proxies,
            engine::EngineSettings {
                max_redirects: cfg.limits.max_redirects,
                max_url_len: cfg.limits.max_url_len,
                checkpoint_bytes: cfg.timing.checkpoint_bytes,
                checkpoint_interval: cfg.timing.checkpoint_interval,
                writer_threads: cfg.limits.writer_threads(),
            },
        )
        .map_err(|e| DaemonError::Fatal(format!("cannot start the file mover thread: {e}")))?,
    );
    let mut core =
        Core::new(cfg.clone(), store, snapshot, engine, core_tx.clone(), core_rx).map_err(DaemonError::Fatal)?;
    info!(
        sessions,
        live_tasks = tasks,
        dormant,
        database_ms = opened.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "state loaded"
    );
    let (idle_tx, idle_rx) = mpsc::channel(1);
    match cfg.timing.idle_exit {
        Some(after) if activated => core.exit_when_idle(core::IdleExit { after, ask: idle_tx }),
        Some(_) => info!("idle_exit_ms applies only when systemd passes the socket; staying up"),
        None => {}
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let settings = ipc::IpcSettings {
        handshake_timeout: cfg.timing.handshake_timeout,
        max_connections: cfg.limits.max_connections as usize,
    };
    // NetworkManager and UPower, on a task of their own.
    let desktop_tx = core_tx.clone();
    tokio::spawn(desktop::watch(move |facts| {
        let _ = desktop_tx.send(CoreMsg::Desktop(facts));
    }));
    // Following the network: without the watcher, every peer counts as reachable.
    let net_tx = core_tx.clone();
    match net::watch(move |w| {
        let _ = net_tx.send(match w {
            net::Watch::Changed => CoreMsg::NetworkChanged,
            net::Watch::Stopped => CoreMsg::NetworkUnwatched,
        });
    }) {
        Ok(()) => {
            let _ = core_tx.send(CoreMsg::NetworkWatched);
        }
        Err(e) => tracing::warn!(error = %e, "cannot follow the network (rtnetlink); servers are assumed reachable"),
    }
    let server = tokio::spawn(ipc::serve(listener, core_tx.clone(), settings, stop_rx, idle_rx));
    let mut core_task = tokio::spawn(core.run());
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    info!(socket = %cfg.socket.display(), pid = std::process::id(), "dlsessiond ready");

    let result = tokio::select! {
        r = &mut core_task => r,
        _ = &mut shutdown => {
            // The whole stop may take the grace period three times (checkpoints, the last
            // commits, queued file work) and the connections' last writes: systemd is told,
            // so that a longer `shutdown_grace_ms` is not cut short by `TimeoutStopSec=`.
            let budget = cfg.timing.shutdown_grace.saturating_mul(3).saturating_add(std::time::Duration::from_secs(3));
            let budget = u32::try_from(budget.as_micros()).unwrap_or(u32::MAX);
            let _ = sd_notify::notify(&[
                sd_notify::NotifyState::Stopping,
                sd_notify::NotifyState::ExtendTimeoutUsec(budget),
            ]);
            let _ = stop_tx.send(true);
            let _ = core_tx.send(CoreMsg::Shutdown);
            (&mut core_task).await
        }
    };
    let _ = stop_tx.send(true);
    let _ = server.await;
    match result {
        Ok(Ok(())) => {
            info!("stopped cleanly");
            Ok(())
        }
        Ok(Err(e)) => Err(DaemonError::Fatal(e)),
        Err(e) => Err(DaemonError::Fatal(format!("core task failed: {e}"))),
    }
}

/// Opens the database. A state directory that refuses writes for now (full, an I/O error)
/// is waited out, with a log line and a `STATUS=` for systemd, instead of exiting: under
/// systemd an exit would become a restart loop until someone frees space. `None`: asked to
/// stop meanwhile (`shutdown` resolved; nothing was opened, nothing is lost).
async fn open_store(
    cfg: &Config,
    core_tx: &mpsc::UnboundedSender<CoreMsg>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<(store::Store, store::Snapshot)>, DaemonError> {
    let db = cfg.database_path();
    let mut wait = std::time::Duration::from_secs(1);
    let mut told = false;
    loop {
        let health_tx = core_tx.clone();
        let opened = tokio::task::block_in_place(|| {
            store::Store::open(&db, move |health| {
                let _ = health_tx.send(CoreMsg::Storage(health));
            })
        });
        match opened {
            Ok(opened) => {
                if told {
                    info!("the database opens again; starting");
                }
                return Ok(Some(opened));
            }
            Err(e) if e.is_weather() => {
                if !told {
                    error!(error = %e, "cannot open the database: its file system refuses writes; waiting until it works");
                    told = true;
                }
                let status = format!("waiting for the state directory to accept writes: {e}");
                let extend = u32::try_from((wait * 3).as_micros()).unwrap_or(u32::MAX);
                let _ = sd_notify::notify(&[
                    sd_notify::NotifyState::Status(&status),
                    sd_notify::NotifyState::ExtendTimeoutUsec(extend),
                ]);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.as_mut() => {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                        return Ok(None);
                    }
                }
                wait = (wait * 2).min(std::time::Duration::from_secs(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How long an unused blocking thread is kept parked before it ends.
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Command-line arguments of `dlsessiond`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "dlsessiond",
    version,
    about = "Per-user background download daemon",
    long_about = "Per-user background download daemon.\n\nRuns in the foreground until SIGTERM or SIGINT. \
                  Under systemd it adopts the socket from dlsessiond.socket and reports readiness; \
                  `dlsessiond install-user-units` installs those units."
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Socket path [default: $XDG_RUNTIME_DIR/dlsessiond/dlsessiond.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<std::path::PathBuf>,
    /// Where the database lives [default: $XDG_STATE_HOME/dlsessiond]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// Where partial and finished files live [default: $XDG_CACHE_HOME/dlsessiond]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<std::path::PathBuf>,
    /// Configuration file [default: $XDG_CONFIG_HOME/dlsessiond/config.toml]
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Write dlsessiond.service and dlsessiond.socket into ~/.config/systemd/user
    /// (ExecStart pointing at this binary), then print how to enable them.
    InstallUserUnits {
        /// Write the units here instead
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
        /// The daemon binary the service starts [default: this one]
        #[arg(long, value_name = "PATH")]
        exec: Option<std::path::PathBuf>,
    },
}

/// The `dlsessiond` binary: parse flags, set up logging, run until SIGTERM or SIGINT.
pub fn main_entry() -> ExitCode {
    use clap::Parser;
    lifecycle::close_inherited();
    let args = Args::parse();
    if let Some(Command::InstallUserUnits { dir, exec }) = args.command {
        return match units::install(dir, exec) {
            Ok(files) => {
                for f in &files {
                    println!("wrote {}", f.display());
                }
                println!("now run: systemctl --user daemon-reload && systemctl --user enable --now dlsessiond.socket");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dlsessiond: cannot install the units: {e}");
                ExitCode::FAILURE
            }
        };
    }
    init_logging();
    match start(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("dlsessiond: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Keeps freed body buffers in the heap for the next ones instead of handing them back to
/// the kernel: glibc's defaults returned them (trimmed or unmapped), so a 1 GiB download
/// page-faulted on about 100,000 fresh pages (400 MiB of buffers touched anew), which cost
/// 15-25 % of the daemon's CPU, more when the VM host is slow to fault pages in. With these
/// settings the same download faults on almost none (measured: 97,000-127,000 minor faults
/// -> 4-3,900; CPU 0.88-1.13 s -> 0.63-0.87 s), for about 10 MiB more resident memory.
/// Runs before any thread exists; left alone when the user tunes malloc themselves.
#[allow(unsafe_code)]
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    {
        if std::env::var_os("GLIBC_TUNABLES").is_some_and(|t| t.to_string_lossy().contains("glibc.malloc.")) {
            return;
        }
        // Buffers up to 4 MiB come from the heap; the heap keeps up to 16 MiB free.
        // SAFETY: mallopt only sets allocator parameters; no other thread is running yet.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
        }
    }
}

fn start(args: Args) -> Result<(), DaemonError> {
    tune_malloc();
    let absolute = |p: Option<std::path::PathBuf>| {
        p.map(|p| if p.is_absolute() { p } else { std::env::current_dir().unwrap_or_default().join(p) })
    };
    let mut cfg = Config::load(Overrides {
        socket: absolute(args.socket),
        state_dir: absolute(args.state_dir),
        cache_dir: absolute(args.cache_dir),
        config_file: absolute(args.config),
    })?;
    // A full load must never meet EMFILE: limits beyond what the descriptors allow are
    // lowered, and the log says so.
    let descriptors = lifecycle::raise_descriptor_limit();
    match cfg.limits.fit_descriptors(descriptors) {
        Some(lowered) => tracing::warn!("{lowered}"),
        None => tracing::debug!(descriptors, "open-file limit"),
    }
    let _instance = lifecycle::prepare(&cfg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("dlsessiond")
        // An idle daemon is never woken (BENCHMARKS.md, "many-tasks"): a blocking thread
        // that retires after tokio's default 10 s is a timer firing after every burst of
        // file work. Parked threads cost no CPU and a few pages each. Download writers run
        // on the engine's own threads (`engine::threads`), not here.
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .max_blocking_threads(config::FILE_WORK_THREADS)
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(async {
        // Handlers first: once the socket accepts connections, SIGTERM must checkpoint.
        let signal = shutdown_signal()?;
        let (listener, activated) = match lifecycle::activated_listener(&cfg.socket)? {
            Some(passed) => (passed, true),
            None => (lifecycle::bind(&cfg.socket)?, false),
        };
        // systemd owns an activation socket; one of our own is watched, and removed at exit.
        let own = if activated { None } else { lifecycle::OwnSocket::of(&cfg.socket) };
        let lost = own.as_ref().and_then(lifecycle::OwnSocket::lost);
        let shutdown = async move {
            let Some(lost) = lost else { return signal.await };
            let mut signal = Box::pin(signal);
            tokio::select! {
                () = &mut signal => {}
                () = lost => {
                    // Stopping already: a signal now ends the process at once.
                    tokio::spawn(async move {
                        signal.await;
                        tracing::warn!("a stop signal while stopping: exiting at once");
                        std::process::exit(1);
                    });
                }
            }
        };
        let result = run(cfg, listener, activated, shutdown).await;
        if let Some(own) = own {
            own.remove();
        }
        result
    })
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on either signal. A
/// second signal ends the process at once, as a second Ctrl-C is meant to: what was
/// committed is safe (the next start recovers from it, as after a crash), only the running
/// downloads' last bytes since their checkpoint are fetched again.
fn shutdown_signal() -> Result<impl Future<Output = ()>, DaemonError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("a second stop signal: exiting at once (the next start recovers from the last commit)");
            std::process::exit(1);
        });
    })
}

/// Whether systemd connected our stderr to the journal: `JOURNAL_STREAM` names the stream's
/// device and inode, and is inherited by processes started from a service (a terminal's
/// shell, say) whose stderr is elsewhere, so it must name our stderr (systemd.exec(5)).
fn stderr_is_the_journal() -> bool {
    let Some(named) = std::env::var("JOURNAL_STREAM").ok() else { return false };
    rustix::fs::fstat(std::io::stderr()).is_ok_and(|st| names_stream(&named, st.st_dev, st.st_ino))
}

/// `JOURNAL_STREAM`'s `DEVICE:INODE` (decimal) is this device and inode.
fn names_stream(named: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = named.trim().split_once(':') else { return false };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

/// Logs to journald (with `SESSION=` and `TASK=` fields) when systemd connected our
/// stderr to the journal, else readable lines on stderr (coloured only on a terminal).
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // `DLSESSIOND_LOG`, else `RUST_LOG` (empty counts as unset); one that does not parse
    // is said once logging works, and `info` is used.
    let asked = ["DLSESSIOND_LOG", "RUST_LOG"]
        .into_iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()).map(|v| (var, v)));
    let mut refused = None;
    let filter = match asked {
        Some((var, spec)) => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            refused = Some(format!("{var}={spec:?} is not a valid log filter ({e}); logging at info"));
            EnvFilter::new("info")
        }),
        None => EnvFilter::new("info"),
    };
    // cookie_store logs cookie values at debug level: credentials never reach a log,
    // whatever level was asked for.
    let filter = match "cookie_store=warn".parse() {
        Ok(quiet) => filter.add_directive(quiet),
        Err(_) => filter,
    };
    if stderr_is_the_journal()
        && let Ok(journal) = tracing_journald::layer()
    {
        let journal = journal.with_field_prefix(None).with_syslog_identifier("dlsessiond".into());
        let _ = tracing_subscriber::registry().with(filter).with(journal).try_init();
    } else {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init();
    }
    if let Some(message) = refused {
        tracing::warn!("{message}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_journal_is_ours_only_where_it_names_our_stderr() {
        assert!(super::names_stream("2049:123456", 2049, 123456));
        assert!(!super::names_stream("2049:123456", 2049, 7), "another stream (inherited from a service)");
        assert!(!super::names_stream("2049", 2049, 123456));
        assert!(!super::names_stream("x:y", 0, 0));
    }
}
