//! Relaunching an app (docs/behaviour.md, "Waking the app"): an argv run directly, detached, or a systemd user unit.

use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::process::Stdio;

use tracing::{debug, warn};

use dlsession_proto::LaunchSpec;
use dlsession_proto::paths::{RELAUNCH_IDENTIFIER_ENV, RELAUNCH_REASON_ENV, RELAUNCH_SOCKET_ENV};

#[derive(Debug)]
pub struct Context<'a> {
    pub identifier: &'a str,
    pub socket: &'a Path,
    pub log_dir: &'a Path,
    pub reason: &'a str,
    pub scope: Scope,
}

/// Where a relaunched app runs, so that it outlives the daemon.
///
/// Under systemd the daemon's service owns a cgroup, and stopping or restarting the
/// service kills everything in it: a relaunched app goes into a transient scope unit of
/// its own instead (`systemd-run --user --scope`). Elsewhere it runs in a process group
/// and session of its own, and nothing the daemon does on exit reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Direct,
    SystemdScope,
}

impl Scope {
    /// A systemd scope when the daemon runs as a systemd service and `systemd-run` exists.
    pub fn detect() -> Scope {
        let in_service = std::env::var_os("INVOCATION_ID").is_some()
            && std::fs::read_to_string("/proc/self/cgroup")
                .is_ok_and(|c| c.lines().any(|l| l.trim_end().ends_with(".service")));
        if in_service && find_on_path("systemd-run").is_some() { Scope::SystemdScope } else { Scope::Direct }
    }
}

fn find_on_path(program: &str) -> Option<std::path::PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths).map(|d| d.join(program)).find(|p| p.is_file())
}

/// The argv that runs `argv` in `scope`.
pub fn scoped_argv(argv: &[String], scope: Scope, identifier: &str) -> Vec<String> {
    match scope {
        Scope::Direct => argv.to_vec(),
        Scope::SystemdScope => {
            let mut wrapped = vec![
                "systemd-run".to_owned(),
                "--user".to_owned(),
                "--scope".to_owned(),
                "--quiet".to_owned(),
                "--collect".to_owned(),
                format!("--description=App relaunched by dlsessiond for session {}", file_safe(identifier)),
                "--".to_owned(),
            ];
            wrapped.extend(argv.iter().cloned());
            wrapped
        }
    }
}

#[derive(Debug)]
pub enum Launched {
    Process(u32),
    Unit(String),
    /// A desktop application activated over D-Bus.
    Activated(String),
}

/// Starts the app. `on_exit` is told later whether the launch really worked (the exit
/// status of `systemctl`; for a command, whether it could be waited for).
pub fn launch(
    spec: &LaunchSpec,
    ctx: &Context<'_>,
    on_exit: impl FnOnce(Result<(), String>) + Send + 'static,
) -> Result<Launched, String> {
    match spec {
        LaunchSpec::Command { argv } => launch_command(argv, ctx, on_exit),
        LaunchSpec::SystemdUnit { unit } => start_unit(unit, ctx, on_exit),
        LaunchSpec::DesktopApp { app_id } => launch_app(app_id, ctx, on_exit),
    }
}

/// `ActivateAction` over D-Bus (blocking this thread: `launch` runs on a blocking one),
/// else the `.desktop` file's `Exec` line as a command.
fn launch_app(
    app_id: &str,
    ctx: &Context<'_>,
    on_exit: impl FnOnce(Result<(), String>) + Send + 'static,
) -> Result<Launched, String> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|e| format!("no runtime to activate {app_id}: {e}"))?;
    match runtime.block_on(crate::activation::activate(app_id, ctx.identifier)) {
        Ok(()) => {
            on_exit(Ok(()));
            Ok(Launched::Activated(app_id.to_owned()))
        }
        Err(why) => {
            let argv = crate::activation::desktop_exec(app_id).map_err(|e| format!("{why}; {e}"))?;
            tracing::info!(app = app_id, reason = %why, "D-Bus activation failed; running the Exec line of its .desktop file");
            launch_command(&argv, ctx, on_exit)
        }
    }
}

fn launch_command(
    argv: &[String],
    ctx: &Context<'_>,
    on_exit: impl FnOnce(Result<(), String>) + Send + 'static,
) -> Result<Launched, String> {
    if argv.is_empty() {
        return Err("empty launch command".into());
    }
    let argv = scoped_argv(argv, ctx.scope, ctx.identifier);
    let (program, args) = argv.split_first().ok_or("empty launch command")?;
    let log = open_log(ctx);
    let log_path = log.is_some().then(|| log_paths(ctx.log_dir, ctx.identifier)[0].clone());
    let (out, err) = match &log {
        Some(f) => (
            f.try_clone().map(Stdio::from).unwrap_or_else(|_| Stdio::null()),
            f.try_clone().map(Stdio::from).unwrap_or_else(|_| Stdio::null()),
        ),
        None => (Stdio::null(), Stdio::null()),
    };
    let mut command = tokio::process::Command::new(program);
    for var in dlsession_proto::paths::SYSTEMD_SERVICE_VARIABLES {
        command.env_remove(var);
    }
    if let Some(soft) = crate::lifecycle::started_descriptor_limit() {
        restore_descriptor_limit(&mut command, soft);
    }
    // In the user's home, as a desktop starts apps, whatever directory the daemon was
    // started from (the autostarting client's, which may be gone).
    let home = std::env::var_os("HOME").filter(|h| Path::new(h).is_absolute()).unwrap_or_else(|| "/".into());
    let mut child = command
        .args(args)
        .current_dir(home)
        .env(RELAUNCH_IDENTIFIER_ENV, ctx.identifier)
        .env(RELAUNCH_SOCKET_ENV, ctx.socket)
        .env(RELAUNCH_REASON_ENV, ctx.reason)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: a signal to the daemon's group does not reach it.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| format!("cannot run {program:?}: {e}"))?;
    let pid = child.id().unwrap_or(0);
    debug!(pid, program = %program, "relaunched app");
    // Reap it when it exits so it never lingers as a zombie.
    // The core logs the outcome (one line per wake) and records a failure in the session's
    // wake status, where `dlsessionctl show` finds it.
    let name = program.clone();
    tokio::spawn(async move {
        // While it runs, its log is kept to two generations too (an app that talks for
        // days would otherwise fill the disk the database lives on).
        let mut check = tokio::time::interval_at(tokio::time::Instant::now() + LOG_CHECK, LOG_CHECK);
        let exited = loop {
            tokio::select! {
                exited = child.wait() => break exited,
                _ = check.tick(), if log_path.is_some() => {
                    if let Some(path) = &log_path {
                        look_at_log(path).await;
                    }
                }
            }
        };
        let result = match exited {
            Ok(status) if !status.success() => Err(format!("{name} (pid {pid}) exited with {status}")),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("cannot wait for {name} (pid {pid}): {e}")),
        };
        on_exit(result);
        // What it started may outlive it and still write there (a launcher that puts the app
        // in the background and exits): while the log grows, it is looked at until it has
        // been quiet for `LOG_QUIET` (most apps exit for good: one more look).
        let Some(path) = log_path else { return };
        let (mut last, mut quiet_since, mut grew) = (look_at_log(&path).await, tokio::time::Instant::now(), false);
        check.reset();
        loop {
            check.tick().await;
            let now = look_at_log(&path).await;
            if now != last {
                (last, quiet_since, grew) = (now, tokio::time::Instant::now(), true);
            } else if !grew || quiet_since.elapsed() >= LOG_QUIET {
                // Quiet from the first look on, or for long: nobody writes there.
                break;
            }
        }
    });
    Ok(Launched::Process(pid))
}

/// Gives the app the soft descriptor limit the daemon was started with, not the one the
/// daemon raised for itself (see `lifecycle::raise_descriptor_limit`).
#[allow(unsafe_code)]
fn restore_descriptor_limit(command: &mut tokio::process::Command, soft: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let hard = getrlimit(Resource::Nofile).maximum;
    // SAFETY: the closure runs in the forked child before exec; it only makes one
    // system call (no allocation, no lock), which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // Lowering a soft limit cannot fail for want of rights; if it did, the app
            // would merely keep the daemon's limit.
            let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(soft), maximum: hard });
            Ok(())
        });
    }
}

fn start_unit(
    unit: &str,
    ctx: &Context<'_>,
    on_exit: impl FnOnce(Result<(), String>) + Send + 'static,
) -> Result<Launched, String> {
    let unit = instantiate(unit, ctx.identifier);
    let mut command = tokio::process::Command::new("systemctl");
    for var in dlsession_proto::paths::SYSTEMD_SERVICE_VARIABLES {
        command.env_remove(var);
    }
    let child = command
        .args(["--user", "start", &unit])
        .env(RELAUNCH_IDENTIFIER_ENV, ctx.identifier)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    let name = unit.clone();
    tokio::spawn(async move {
        let result = match child.wait_with_output().await {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!(
                "systemctl --user start {name} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!("cannot wait for systemctl: {e}")),
        };
        on_exit(result);
    });
    debug!(unit = %unit, "starting app unit");
    Ok(Launched::Unit(unit))
}

/// `app@.service` + identifier → `app@<escaped identifier>.service`; other units as given.
pub fn instantiate(unit: &str, identifier: &str) -> String {
    match unit.split_once("@.") {
        Some((prefix, suffix)) => format!("{prefix}@{}.{suffix}", systemd_escape(identifier)),
        None => unit.to_owned(),
    }
}

/// Escapes a string the way `systemd-escape` does for unit instance names.
pub fn systemd_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || b == b':' || b == b'_' || b == b'.' => out.push(b as char),
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// A launch log grows to this size; then it becomes `NAME.log.1` (replacing the one
/// before) and a new one starts, so two generations are kept.
pub const LOG_CAP: u64 = 1 << 20;

/// A session's launch log and the generation before it.
pub fn log_paths(log_dir: &Path, identifier: &str) -> [std::path::PathBuf; 2] {
    let name = file_safe(identifier);
    [log_dir.join(format!("{name}.log")), log_dir.join(format!("{name}.log.1"))]
}

fn open_log(ctx: &Context<'_>) -> Option<std::fs::File> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(ctx.log_dir).ok()?;
    let [path, _] = log_paths(ctx.log_dir, ctx.identifier);
    // Copied and emptied in place, not renamed: an earlier launch still writing there would
    // go on writing to `.log.1`, which nothing looks at.
    cap_log(&path, LOG_CAP);
    OpenOptions::new().create(true).append(true).mode(0o600).open(path).ok()
}

/// How often the log of a relaunched app that still runs is looked at.
const LOG_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// After the launched process exits, its log is looked at until it stops growing this long.
const LOG_QUIET: std::time::Duration = std::time::Duration::from_secs(600);

/// Caps a launch log (`cap_log`) off the runtime's threads; its size after, if it is there.
async fn look_at_log(path: &Path) -> Option<u64> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || cap_log(&path, LOG_CAP)).await.ok().flatten()
}

/// A log still written by a running app that has grown to `cap` bytes: copied to `path.1`
/// and emptied in place (the app appends to the same file; a rename would leave it writing
/// to `path.1`). What the app writes between the copy and the emptying is lost. Returns its
/// size after, if it is there.
fn cap_log(path: &Path, cap: u64) -> Option<u64> {
    let len = std::fs::metadata(path).ok()?.len();
    if len < cap {
        return Some(len);
    }
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    match std::fs::copy(path, &old).and_then(|_| OpenOptions::new().write(true).open(path)?.set_len(0)) {
        Ok(()) => Some(0),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot cap a launch log");
            Some(len)
        }
    }
}

/// A file name for an identifier: a readable prefix plus a hash, never the raw string.
pub fn file_safe(identifier: &str) -> String {
    let prefix: String =
        identifier.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-').take(48).collect();
    // FNV-1a: stable across runs and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in identifier.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{}-{h:016x}", prefix.trim_start_matches('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_matches_systemd_escape() {
        assert_eq!(systemd_escape("org.example.fetcher"), "org.example.fetcher");
        assert_eq!(systemd_escape("a/b c"), "a-b\\x20c");
        assert_eq!(systemd_escape(".hidden"), "\\x2ehidden");
        assert_eq!(systemd_escape("ü"), "\\xc3\\xbc");
        assert_eq!(instantiate("fetch@.service", "org.ex/a"), "fetch@org.ex-a.service");
        assert_eq!(instantiate("fetch.service", "x"), "fetch.service");
    }

    #[test]
    fn apps_run_in_a_scope_of_their_own_under_systemd() {
        let argv = vec!["/usr/bin/app".to_owned(), "--bg".to_owned()];
        assert_eq!(scoped_argv(&argv, Scope::Direct, "s"), argv);
        let wrapped = scoped_argv(&argv, Scope::SystemdScope, "org.example/x");
        assert_eq!(&wrapped[..3], ["systemd-run", "--user", "--scope"]);
        let sep = wrapped.iter().position(|a| a == "--").unwrap();
        assert_eq!(&wrapped[sep + 1..], &argv[..], "the app's argv is passed untouched");
        assert!(!wrapped[..sep].iter().any(|a| a.contains('/')), "the identifier is made safe: {wrapped:?}");
    }

    #[test]
    fn launch_logs_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        std::fs::write(&log, vec![b'x'; 10]).unwrap();
        cap_log(&log, 100);
        assert_eq!(std::fs::read(&log).unwrap().len(), 10, "under the cap: kept");
        std::fs::write(&log, vec![b'y'; 100]).unwrap();
        let writer = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        cap_log(&log, 100);
        assert_eq!(std::fs::read(dir.path().join("a.log.1")).unwrap(), vec![b'y'; 100]);
        // Emptied in place: a writer that still has it open goes on writing to it.
        std::io::Write::write_all(&mut &writer, b"z").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"z");
    }

    #[test]
    fn file_names_are_safe() {
        let n = file_safe("../../etc/passwd\n");
        assert!(!n.contains('/') && !n.contains('\n') && !n.starts_with('.'), "{n}");
        assert_ne!(file_safe("a b"), file_safe("a_b"));
    }
}
