//! Running timed commands, and reading a process's CPU time and memory from `/proc`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// A command line to run (program, arguments, extra environment).
#[derive(Debug, Clone)]
pub struct Cmd {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub envs: Vec<(OsString, OsString)>,
}

impl Cmd {
    pub fn new(program: impl Into<PathBuf>) -> Cmd {
        Cmd { program: program.into(), args: Vec::new(), envs: Vec::new() }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Cmd {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn envs<I, K, V>(mut self, envs: I) -> Cmd
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        self.envs.extend(envs.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// The command as a shell-like string, for messages.
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

/// What one timed run took.
#[derive(Debug, Clone)]
pub struct Timed {
    /// From spawning the command until it exited, seconds.
    pub wall: f64,
    /// User and system CPU seconds of the command (from `/usr/bin/time`).
    pub user: f64,
    pub sys: f64,
    pub status: ExitStatus,
    pub stderr: String,
}

impl Timed {
    pub fn cpu(&self) -> f64 {
        self.user + self.sys
    }

    /// An error (with the command's stderr) unless it exited 0.
    pub fn check(&self, what: &str) -> Result<()> {
        if !self.status.success() {
            bail!("{what} failed ({}): {}", self.status, self.stderr.trim());
        }
        Ok(())
    }
}

/// Runs `cmd` under `/usr/bin/time -f "%U %S"` (so its CPU time is known), measuring wall
/// time from spawning until it exits. `stdout` goes to `/dev/null` unless a file is given.
/// The command runs in its own process group, killed as a whole if `timeout` passes.
pub async fn run_timed(time_bin: &Path, cmd: &Cmd, stdout: Option<&Path>, timeout: Duration) -> Result<Timed> {
    let time_file = std::env::temp_dir().join(format!("dlsession-bench-time-{}", std::process::id()));
    let mut command = tokio::process::Command::new(time_bin);
    command
        .arg("-f")
        .arg("%U %S")
        .arg("-o")
        .arg(&time_file)
        .arg(&cmd.program)
        .args(&cmd.args)
        .envs(cmd.envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    match stdout {
        Some(path) => {
            let file =
                std::fs::File::create(path).with_context(|| format!("creating {} for stdout", path.display()))?;
            command.stdout(file);
        }
        None => {
            command.stdout(Stdio::null());
        }
    }
    let start = Instant::now();
    let child = command.spawn().with_context(|| format!("starting {}", cmd.display()))?;
    let pid = child.id();
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(output) => output.with_context(|| format!("waiting for {}", cmd.display()))?,
        Err(_) => {
            if let Some(pid) = pid {
                kill_group(pid);
            }
            bail!("{} did not finish within {timeout:?}", cmd.display());
        }
    };
    let wall = start.elapsed().as_secs_f64();
    let times = std::fs::read_to_string(&time_file).unwrap_or_default();
    let _ = std::fs::remove_file(&time_file);
    // On failure `time` writes "Command exited with non-zero status N" before the format.
    let last = times.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    let mut parts = last.split_whitespace().map(str::parse::<f64>);
    let (user, sys) = match (parts.next(), parts.next()) {
        (Some(Ok(u)), Some(Ok(s))) => (u, s),
        _ => bail!("cannot read the CPU times of {} from /usr/bin/time: {times:?}", cmd.display()),
    };
    Ok(Timed { wall, user, sys, status: output.status, stderr: String::from_utf8_lossy(&output.stderr).into_owned() })
}

/// SIGKILL to the process group `pgid` (a command this program started with `process_group(0)`).
fn kill_group(pgid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs a short command and returns its stdout (stderr appended when stdout is empty).
pub fn capture(program: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text.trim().is_empty() {
        text = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    Ok(text)
}

/// `sync`: flush dirty data so one run's writeback does not slow the next (caches are
/// not dropped).
pub fn sync_disks() {
    let _ = std::process::Command::new("sync").status();
}

/// Clock ticks per second of `/proc/PID/stat` times.
pub fn clock_ticks() -> f64 {
    capture("getconf", &["CLK_TCK"]).ok().and_then(|s| s.trim().parse::<f64>().ok()).unwrap_or(100.0)
}

/// utime + stime of process `pid` (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (1-based) of the whole line; `rest` starts at field 3.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// A `kB` line of `/proc/PID/status` (e.g. `VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
            let n = rest.split_whitespace().next().context("empty status line")?;
            return Ok(n.parse()?);
        }
    }
    bail!("no {key} in /proc/{pid}/status")
}

/// Context switches of each thread of `pid` (voluntary + involuntary, from
/// `/proc/PID/task/TID/status`), with its name: a thread that sleeps and is woken counts
/// one.
pub fn thread_switches(pid: u32) -> Result<std::collections::BTreeMap<u32, (u64, String)>> {
    let mut all = std::collections::BTreeMap::new();
    let dir = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(tid) = entry?.file_name().to_string_lossy().parse::<u32>() else { continue };
        // A thread may end between the listing and the read: it is simply not counted.
        let Ok(status) = std::fs::read_to_string(format!("{dir}/{tid}/status")) else { continue };
        let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or("");
        let count = |key: &str| field(key).parse::<u64>().unwrap_or(0);
        let switches = count("voluntary_ctxt_switches:") + count("nonvoluntary_ctxt_switches:");
        all.insert(tid, (switches, field("Name:").to_owned()));
    }
    Ok(all)
}

/// How often the threads of a process ran between two [`thread_switches`] samples: the
/// switches of the threads in both, all of those of new threads, and one for each thread
/// that ended (ending is a wakeup too); with the names of the threads that ran.
pub fn wakeups_between(
    before: &std::collections::BTreeMap<u32, (u64, String)>,
    after: &std::collections::BTreeMap<u32, (u64, String)>,
) -> (u64, Vec<String>) {
    let mut total = 0;
    let mut who = Vec::new();
    for (tid, (n, name)) in after {
        let delta = n.saturating_sub(before.get(tid).map_or(0, |b| b.0));
        if delta > 0 {
            total += delta;
            who.push(format!("{name} ran {delta}×"));
        }
    }
    for (tid, (_, name)) in before {
        if !after.contains_key(tid) {
            total += 1;
            who.push(format!("{name} ended"));
        }
    }
    (total, who)
}

/// Resident memory of `pid`, KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS")
}

/// Finds an executable on `PATH` (or in `/usr/sbin`, `/usr/bin`).
pub fn which(name: &str) -> Option<PathBuf> {
    let path: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    let fixed = [PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin"), PathBuf::from("/sbin")];
    path.into_iter().chain(fixed).map(|d| d.join(name)).find(|p| p.is_file())
}
