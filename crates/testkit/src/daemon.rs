//! Real `dlsessiond` processes in isolated environments.
//!
//! [`TestEnv`] is a temporary `HOME` with every `XDG_*` directory inside it, so the daemon
//! and clients resolve their default paths there. [`TestDaemon`] runs the real binary in
//! it, waits until it accepts connections, and kills it on drop (printing its log if the
//! test failed).

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Path of a binary built from this workspace (`target/<profile>/<name>`).
///
/// Test executables live in `target/<profile>/deps/`; the workspace's binaries sit one
/// level up. `cargo test --workspace` builds them before running any test.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace` or run tests with --workspace)",
        path.display()
    );
    path
}

/// Fast timings so tests of retries and wakes finish in seconds.
pub const FAST_CONFIG: &str = "
retry_initial_ms = 100
retry_max_ms = 2000
wake_initial_ms = 300
wake_max_ms = 5000
progress_interval_ms = 100
checkpoint_interval_ms = 200
handshake_timeout_ms = 2000
shutdown_grace_ms = 5000
";

/// A private home with XDG directories, a config file and a socket path.
#[derive(Debug)]
pub struct TestEnv {
    dir: Root,
    pub home: PathBuf,
    pub runtime_dir: PathBuf,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub config_dir: PathBuf,
    pub data_dir: PathBuf,
    /// Where the daemon's socket is expected (the XDG default inside this env).
    pub socket: PathBuf,
    /// The daemon's config file.
    pub config_file: PathBuf,
}

impl TestEnv {
    /// A fresh environment with [`FAST_CONFIG`].
    pub fn new() -> TestEnv {
        TestEnv::with_config(FAST_CONFIG)
    }

    pub fn with_config(config: &str) -> TestEnv {
        let dir = tempfile::Builder::new().prefix("dls").tempdir().expect("tempdir");
        TestEnv::build(Root::Temp(dir), config)
    }

    /// An environment at a fixed path (emptied first, removed on drop), for state that
    /// names its own paths, like a database made elsewhere.
    pub fn at(root: &Path, config: &str) -> TestEnv {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root).expect("mkdir");
        TestEnv::build(Root::Fixed(root.to_path_buf()), config)
    }

    fn build(dir: Root, config: &str) -> TestEnv {
        let home = dir.path().join("home");
        let runtime_dir = dir.path().join("run");
        let state_dir = home.join(".local/state");
        let cache_dir = home.join(".cache");
        let config_dir = home.join(".config");
        let data_dir = home.join(".local/share");
        for d in [&home, &runtime_dir, &state_dir, &cache_dir, &config_dir, &data_dir] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let config_file = config_dir.join("dlsessiond/config.toml");
        std::fs::create_dir_all(config_file.parent().expect("parent")).expect("mkdir");
        std::fs::write(&config_file, config).expect("write config");
        let socket = runtime_dir.join("dlsessiond/dlsessiond.sock");
        TestEnv { dir, home, runtime_dir, state_dir, cache_dir, config_dir, data_dir, socket, config_file }
    }

    /// The temporary directory everything lives in (also fine for test files).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Sets `key = value` in the daemon's config file, replacing an earlier value (takes
    /// effect at the next start). `value` is TOML (quote strings).
    pub fn set_config(&self, key: &str, value: &str) {
        let text = std::fs::read_to_string(&self.config_file).unwrap_or_default();
        let mut lines: Vec<String> =
            text.lines().filter(|l| l.split('=').next().map(str::trim) != Some(key)).map(str::to_owned).collect();
        lines.push(format!("{key} = {value}"));
        std::fs::write(&self.config_file, lines.join("\n") + "\n").expect("write config");
    }

    /// Appends a line to the daemon's config file (takes effect at the next start).
    pub fn add_config(&self, line: &str) {
        let mut text = std::fs::read_to_string(&self.config_file).unwrap_or_default();
        text.push_str(line);
        text.push('\n');
        std::fs::write(&self.config_file, text).expect("write config");
    }

    /// The environment variables that point a process at this env.
    pub fn vars(&self) -> Vec<(&'static str, OsString)> {
        vec![
            ("HOME", self.home.clone().into()),
            ("XDG_RUNTIME_DIR", self.runtime_dir.clone().into()),
            ("XDG_STATE_HOME", self.state_dir.clone().into()),
            ("XDG_CACHE_HOME", self.cache_dir.clone().into()),
            ("XDG_CONFIG_HOME", self.config_dir.clone().into()),
            ("XDG_DATA_HOME", self.data_dir.clone().into()),
        ]
    }

    /// A command for `program` inside this env (daemon-related variables cleared).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        for var in [
            "DLSESSIOND_SOCKET",
            "DLSESSION_SOCKET",
            "DLSESSION_IDENTIFIER",
            "DLSESSION_WAKE_REASON",
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(self.vars());
        cmd
    }

    /// Runs `dlsessionctl` with `args` in this env and returns its output.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.command(bin_path("dlsessionctl")).args(args).stdin(Stdio::null()).output().expect("run dlsessionctl")
    }

    /// Runs `dlsessionctl` with `args` and the file-creation mask `umask`.
    pub fn ctl_with_umask(&self, umask: u32, args: &[&str]) -> Output {
        self.command("/bin/sh")
            .arg("-c")
            .arg(format!("umask {umask:03o}; exec \"$0\" \"$@\""))
            .arg(bin_path("dlsessionctl"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run dlsessionctl")
    }

    /// Where the daemon keeps its database.
    pub fn database(&self) -> PathBuf {
        self.state_dir.join("dlsessiond/dlsessiond.db")
    }

    /// Where the daemon keeps partial and finished files.
    pub fn downloads_dir(&self) -> PathBuf {
        self.cache_dir.join("dlsessiond/downloads")
    }
}

/// Where a [`TestEnv`] lives.
#[derive(Debug)]
enum Root {
    Temp(TempDir),
    Fixed(PathBuf),
}

impl Root {
    fn path(&self) -> &Path {
        match self {
            Root::Temp(t) => t.path(),
            Root::Fixed(p) => p,
        }
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if let Root::Fixed(p) = self {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

impl Drop for TestEnv {
    /// A daemon a client started in this environment (autostart) goes with it: it would
    /// outlive the test, holding a deleted directory.
    fn drop(&mut self) {
        let lock = self.state_dir.join("dlsessiond/dlsessiond.lock");
        let Ok(text) = std::fs::read_to_string(&lock) else { return };
        let Some(pid) = text.trim().parse::<u32>().ok() else { return };
        // Only a daemon of this environment (a pid of a dead one may have been reused).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("dlsessiond") && cmdline.contains(&*self.socket.to_string_lossy()) {
            crate::host::kill(pid);
        }
    }
}

impl Default for TestEnv {
    fn default() -> TestEnv {
        TestEnv::new()
    }
}

/// A running `dlsessiond`.
#[derive(Debug)]
pub struct TestDaemon {
    child: Option<Child>,
    log: PathBuf,
    socket: PathBuf,
    command: Vec<(&'static str, OsString)>,
    extra_env: Vec<(String, OsString)>,
    /// Run the daemon with this file-creation mask (as a systemd unit's `UMask=` would).
    /// Shell commands run before the daemon is exec'd (its umask, its limits).
    prelude: Option<String>,
    runs: u32,
}

impl TestDaemon {
    /// Starts the daemon in `env` and waits until it accepts connections.
    pub fn start(env: &TestEnv) -> TestDaemon {
        TestDaemon::start_with_env(env, &[])
    }

    /// Like [`TestDaemon::start`] with extra environment variables (e.g. `SSL_CERT_FILE`).
    pub fn start_with_env(env: &TestEnv, extra: &[(&str, &std::ffi::OsStr)]) -> TestDaemon {
        let mut d = TestDaemon::unstarted(env, extra);
        d.spawn();
        d
    }

    /// Starts the daemon without waiting for it to serve (one that waits for its state
    /// directory, say): [`TestDaemon::wait_ready`] or [`TestDaemon::wait_logged`] next.
    pub fn start_unready(env: &TestEnv) -> TestDaemon {
        let mut d = TestDaemon::unstarted(env, &[]);
        d.spawn_process();
        d
    }

    fn unstarted(env: &TestEnv, extra: &[(&str, &std::ffi::OsStr)]) -> TestDaemon {
        TestDaemon {
            child: None,
            log: env.path().join("daemon.log"),
            socket: env.socket.clone(),
            command: env.vars(),
            extra_env: extra.iter().map(|(k, v)| (k.to_string(), v.to_os_string())).collect(),
            prelude: None,
            runs: 0,
        }
    }

    /// Like [`TestDaemon::start`], with the daemon's umask set to `umask`.
    pub fn start_with_umask(env: &TestEnv, umask: u32) -> TestDaemon {
        TestDaemon::start_after(env, &format!("umask {umask:03o}"))
    }

    /// Like [`TestDaemon::start`], the daemon running inside `ns` (its own links and routes:
    /// loopback and the namespace's end of the link, no default route). Root only.
    pub fn start_in(env: &TestEnv, ns: &crate::netns::NetNs) -> TestDaemon {
        // `ip netns exec` execs the daemon in turn: the child is still the daemon itself.
        TestDaemon::start_after(env, &format!("exec ip netns exec {} \"$0\" \"$@\"", ns.name()))
    }

    /// Like [`TestDaemon::start`], the daemon started by `/bin/sh` after `prelude` (e.g.
    /// `ulimit -Sn 256`), which sets what the daemon inherits.
    pub fn start_after(env: &TestEnv, prelude: &str) -> TestDaemon {
        let mut d = TestDaemon {
            child: None,
            log: env.path().join("daemon.log"),
            socket: env.socket.clone(),
            command: env.vars(),
            extra_env: Vec::new(),
            prelude: Some(prelude.to_owned()),
            runs: 0,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        self.spawn_process();
        self.wait_ready(Duration::from_secs(20));
    }

    fn spawn_process(&mut self) {
        self.runs += 1;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("daemon log");
        let mut cmd = match &self.prelude {
            // `exec` keeps the pid: the child is the daemon itself.
            Some(prelude) => {
                let mut c = Command::new("/bin/sh");
                c.arg("-c").arg(format!("{prelude}; exec \"$0\" \"$@\"")).arg(bin_path("dlsessiond"));
                c
            }
            None => Command::new(bin_path("dlsessiond")),
        };
        for var in ["DLSESSIOND_SOCKET", "DLSESSION_SOCKET", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID"] {
            cmd.env_remove(var);
        }
        cmd.env("DLSESSIOND_LOG", std::env::var("DLSESSIOND_LOG").unwrap_or_else(|_| "info,dlsessiond=debug".into()))
            .envs(self.command.iter().map(|(k, v)| (*k, v)))
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn dlsessiond");
        self.child = Some(child);
    }

    /// Waits until the daemon answers on its socket (or exits: then panics with its log).
    ///
    /// A connect alone is not enough: the socket is bound (and takes connections into its
    /// backlog) before the database is opened and recovered. The daemon answers a preamble
    /// only once it serves, so the probe sends one of a protocol version nobody speaks and
    /// waits for the refusal: everything the daemon logs while starting is logged by then.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("dlsessiond exited during start-up ({status}); log:\n{}", self.log());
            }
            if answers(&self.socket) {
                return;
            }
            assert!(Instant::now() < deadline, "dlsessiond not ready after {timeout:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Everything the daemon logged so far (all runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the daemon's log (all runs) holds `needle`.
    pub fn wait_logged(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(Instant::now() < deadline, "{needle:?} not logged within {timeout:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to checkpoint.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the daemon to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal_term();
        self.wait_exit(Duration::from_secs(30))
    }

    /// SIGTERM, without waiting: the daemon begins to shut down ([`TestDaemon::wait_exit`]).
    pub fn signal_term(&self) {
        let child = self.child.as_ref().expect("daemon not running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    }

    /// Waits for the daemon to exit by itself (e.g. at a failpoint) and returns how.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon not running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("dlsessiond did not exit within {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Replaces the extra environment used for the next (re)start.
    pub fn set_env(&mut self, extra: &[(&str, &std::ffi::OsStr)]) {
        self.extra_env = extra.iter().map(|(k, v)| (k.to_string(), v.to_os_string())).collect();
    }

    /// Starts the daemon again (after [`TestDaemon::kill9`] or [`TestDaemon::terminate`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "daemon still running");
        self.spawn();
    }

    /// How many times the daemon was started.
    pub fn runs(&self) -> u32 {
        self.runs
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- dlsessiond log ----\n{}\n---- end of log ----", self.log());
        }
    }
}

/// Whether a daemon answers a preamble on `socket` (see [`TestDaemon::wait_ready`]).
fn answers(socket: &Path) -> bool {
    use std::io::Write;
    let Ok(mut s) = UnixStream::connect(socket) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    // "DLSD", version 0xffff (never spoken), status 0.
    if s.write_all(b"DLSD\xff\xff\x00\x00").is_err() {
        return false;
    }
    let mut reply = [0u8; 8];
    s.read_exact(&mut reply).is_ok() && reply.starts_with(b"DLSD")
}

/// Reads a whole file, for comparisons in tests.
pub fn read(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    v
}
