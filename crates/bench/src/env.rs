//! A private `HOME`/`XDG_*` environment and a real `dlsessiond` running in it (like
//! `dlsession_testkit::TestEnv`/`TestDaemon`, but returning errors instead of panicking and
//! leaving the daemon's logging at its default level).

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dlsession::{Client, ClientOptions};

use crate::run::{self, Cmd};

/// A temporary home with every XDG directory inside it, removed on drop.
#[derive(Debug)]
pub struct BenchEnv {
    root: PathBuf,
    pub home: PathBuf,
    runtime_dir: PathBuf,
    state_dir: PathBuf,
    cache_dir: PathBuf,
    config_dir: PathBuf,
    data_dir: PathBuf,
    pub socket: PathBuf,
}

impl BenchEnv {
    /// A fresh environment under `parent` whose daemon config file holds `config` (TOML).
    pub fn new(parent: &Path, name: &str, config: &str) -> Result<BenchEnv> {
        let root = parent.join(format!("env-{name}"));
        if root.exists() {
            std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
        }
        let home = root.join("home");
        let runtime_dir = root.join("run");
        let state_dir = home.join(".local/state");
        let cache_dir = home.join(".cache");
        let config_dir = home.join(".config");
        let data_dir = home.join(".local/share");
        for d in [&home, &runtime_dir, &state_dir, &cache_dir, &config_dir, &data_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o700))?;
        std::fs::create_dir_all(config_dir.join("dlsessiond"))?;
        std::fs::write(config_dir.join("dlsessiond/config.toml"), config).context("writing the daemon config")?;
        let socket = runtime_dir.join("dlsessiond/dlsessiond.sock");
        Ok(BenchEnv { root, home, runtime_dir, state_dir, cache_dir, config_dir, data_dir, socket })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The variables that point a process at this environment.
    pub fn vars(&self) -> Vec<(OsString, OsString)> {
        vec![
            ("HOME".into(), self.home.clone().into()),
            ("XDG_RUNTIME_DIR".into(), self.runtime_dir.clone().into()),
            ("XDG_STATE_HOME".into(), self.state_dir.clone().into()),
            ("XDG_CACHE_HOME".into(), self.cache_dir.clone().into()),
            ("XDG_CONFIG_HOME".into(), self.config_dir.clone().into()),
            ("XDG_DATA_HOME".into(), self.data_dir.clone().into()),
            ("DLSESSION_NO_AUTOSTART".into(), "1".into()),
            ("NO_COLOR".into(), "1".into()),
        ]
    }

    /// `dlsessionctl --socket SOCKET ARGS…` in this environment.
    pub fn ctl(&self, dlsessionctl: &Path) -> Cmd {
        Cmd::new(dlsessionctl).arg("--socket").arg(self.socket.clone()).envs(self.vars())
    }
}

impl Drop for BenchEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A running `dlsessiond`, SIGKILLed on drop.
#[derive(Debug)]
pub struct Daemon {
    bin: PathBuf,
    /// A command the daemon runs under (e.g. `prlimit --nofile=…`), which execs it.
    wrapper: Vec<OsString>,
    vars: Vec<(OsString, OsString)>,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts `bin` in `env` and waits until its socket accepts connections.
    pub async fn start(bin: &Path, env: &BenchEnv) -> Result<Daemon> {
        Daemon::start_wrapped(bin, env, &[]).await
    }

    /// Starts `bin` under `wrapper` (a command that execs it, so the pid stays the
    /// daemon's), e.g. `["prlimit", "--nofile=1024:1024", "--"]`.
    pub async fn start_wrapped(bin: &Path, env: &BenchEnv, wrapper: &[&str]) -> Result<Daemon> {
        let mut d = Daemon {
            wrapper: wrapper.iter().map(OsString::from).collect(),
            bin: bin.to_owned(),
            vars: env.vars(),
            socket: env.socket.clone(),
            log: env.path().join("daemon.log"),
            child: None,
        };
        d.spawn().await?;
        Ok(d)
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).context("daemon log")?;
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        for var in
            ["DLSESSIOND_SOCKET", "DLSESSION_SOCKET", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM"]
        {
            cmd.env_remove(var);
        }
        cmd.envs(self.vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("daemon log")?)
            .stderr(log);
        self.child = Some(cmd.spawn().with_context(|| format!("starting {}", self.bin.display()))?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                bail!("dlsessiond exited during start-up ({status}); log:\n{}", self.log_tail());
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("dlsessiond not ready after 30 s; log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn pid(&self) -> Result<u32> {
        self.child.as_ref().map(Child::id).context("dlsessiond is not running")
    }

    /// Errors if the daemon has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(status))) => bail!("dlsessiond exited ({status}); log:\n{}", self.log_tail()),
            Some(Err(e)) => Err(e.into()),
            None => bail!("dlsessiond is not running"),
        }
    }

    /// utime + stime so far, clock ticks.
    pub fn cpu_ticks(&self) -> Result<u64> {
        run::cpu_ticks(self.pid()?)
    }

    /// VmRSS, KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        run::rss_kib(self.pid()?)
    }

    /// A KiB line of `/proc/PID/status` (`RssAnon`, `VmHWM`, …).
    pub fn status_kib(&self, field: &str) -> Result<u64> {
        run::status_kib(self.pid()?, field)
    }

    /// SIGKILL: no chance to checkpoint.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits for the exit (a clean stop: checkpoints, the database closed).
    pub async fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
        if !status.success() {
            bail!("kill -TERM failed: {status}");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("dlsessiond exited with {status} after SIGTERM; log:\n{}", self.log_tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("dlsessiond still running 30 s after SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts the daemon again after [`Daemon::kill9`].
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("dlsessiond is still running");
        }
        self.spawn().await
    }

    /// A library connection to this daemon (never starts another one).
    pub async fn client(&self) -> Result<Client> {
        let options = ClientOptions {
            socket: Some(self.socket.clone()),
            client_name: "dlsession-bench".into(),
            app_id: None,
            timeout: Duration::from_secs(10),
            autostart: false,
            reconnect: false,
            ..ClientOptions::default()
        };
        Client::connect(options).await.context("connecting to dlsessiond")
    }

    /// The daemon's whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines.iter().skip(lines.len().saturating_sub(30)).copied().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}
