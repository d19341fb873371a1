//! The systemd user service: units that verify, socket activation with readiness and
//! watchdog pings on a NOTIFY_SOCKET we read, STOPPING on SIGTERM; and on-demand start
//! without systemd, race-free.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlsession::proto::{Request, Response};
use dlsession::{Client, ClientOptions};
use dlsession_testkit::{Fault, Hits, Resource, TestDaemon, TestEnv, TestServer, bin_path, sha256_file, wait_for};

/// A NOTIFY_SOCKET the test reads.
struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl Notify {
    fn new(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        Notify { socket, path, seen: Vec::new() }
    }

    /// Reads datagrams for `duration`.
    fn collect(&mut self, duration: Duration) {
        let deadline = Instant::now() + duration;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.extend(text.lines().map(str::to_owned));
            }
        }
    }

    /// Reads until a line equal to (or starting with) `want` arrives.
    fn wait(&mut self, want: &str, timeout: Duration) {
        self.wait_after(0, want, timeout);
    }

    /// Reads until a line starting with `want` is seen at index `from` or later; returns
    /// its index.
    fn wait_after(&mut self, from: usize, want: &str, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.seen.iter().skip(from).position(|l| l.starts_with(want)) {
                return from + i;
            }
            assert!(Instant::now() < deadline, "no {want} on NOTIFY_SOCKET; got {:?}", self.seen);
            self.collect(Duration::from_millis(50));
        }
    }
}

/// `systemd-socket-activate -l SOCKET … dlsessiond`, with the env's XDG variables.
fn socket_activate(env: &TestEnv, notify: &Path, extra: &[&str]) -> (Child, PathBuf) {
    std::fs::create_dir_all(env.socket.parent().unwrap()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.socket.parent().unwrap(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let log = env.path().join("activated.log");
    let mut cmd = env.command("systemd-socket-activate");
    cmd.arg("-l").arg(&env.socket);
    for (k, v) in env.vars() {
        cmd.arg("-E").arg(format!("{k}={}", v.to_string_lossy()));
    }
    cmd.arg("-E").arg(format!("NOTIFY_SOCKET={}", notify.display()));
    cmd.arg("-E").arg("DLSESSIOND_LOG=info,dlsessiond=debug");
    for e in extra {
        cmd.arg("-E").arg(e);
    }
    cmd.arg(bin_path("dlsessiond"));
    let log_file = std::fs::File::create(&log).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("systemd-socket-activate");
    wait_for("the activation socket", Duration::from_secs(10), || env.socket.exists().then_some(()));
    (child, log)
}

/// A client of the daemon in `env` that never starts one itself. The activation socket's
/// file appears at `bind`, a moment before `listen`: a connection in between is refused.
async fn connect(env: &TestEnv) -> Client {
    let began = Instant::now();
    loop {
        let options = ClientOptions { socket: Some(env.socket.clone()), autostart: false, ..ClientOptions::default() };
        match Client::connect(options).await {
            Ok(client) => return client,
            Err(dlsession::Error::NotRunning { .. }) if began.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("connecting to {}: {e}", env.socket.display()),
        }
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_installed_units_pass_systemd_analyze_verify() {
    let env = TestEnv::new();
    let dir = env.path().join("units");
    let out = env.command(bin_path("dlsessiond")).args(["install-user-units", "--dir"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let service = std::fs::read_to_string(dir.join("dlsessiond.service")).unwrap();
    let exe = std::fs::canonicalize(bin_path("dlsessiond")).unwrap();
    assert!(service.contains(&format!("ExecStart={}\n", exe.display())), "{service}");
    for key in ["Type=notify", "WatchdogSec=", "Restart=on-failure"] {
        assert!(service.contains(key), "{key} in\n{service}");
    }
    // Nothing a relaunched app would inherit and could not undo (see the unit's comment).
    let settings: Vec<&str> = service.lines().filter(|l| !l.starts_with('#')).collect();
    for key in [
        "NoNewPrivileges",
        "RestrictSUIDSGID",
        "RestrictRealtime",
        "LockPersonality",
        "SystemCall",
        "RestrictAddressFamilies",
        "UMask",
    ] {
        assert!(!settings.iter().any(|l| l.starts_with(key)), "{key} in\n{service}");
    }
    let socket = std::fs::read_to_string(dir.join("dlsessiond.socket")).unwrap();
    for key in ["ListenStream=%t/dlsessiond/dlsessiond.sock", "SocketMode=0600", "DirectoryMode=0700"] {
        assert!(socket.contains(key), "{key} in\n{socket}");
    }
    let verify = env
        .command("systemd-analyze")
        .args(["--user", "verify"])
        .arg(dir.join("dlsessiond.socket"))
        .arg(dir.join("dlsessiond.service"))
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed");
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{stderr}");
    assert_eq!(stderr.trim(), "", "no warnings");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_adopts_the_socket_and_reports_readiness() {
    let env = TestEnv::new();
    let mut notify = Notify::new(env.path());
    let (child, log) = socket_activate(&env, &notify.path, &[]);
    // The first connection starts the daemon on the passed socket.
    let client = connect(&env).await;
    let Response::Status(status) = client.request(Request::Status).await.unwrap() else { panic!() };
    assert_eq!(status.socket, env.socket.display().to_string());
    notify.wait("READY=1", Duration::from_secs(10));
    notify.wait("STATUS=", Duration::from_secs(5));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("listening on the socket passed by systemd"), "{text}");
    assert!(!text.contains("another path"), "{text}");
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_arrive_at_half_the_interval() {
    let env = TestEnv::new();
    let mut notify = Notify::new(env.path());
    let (child, _log) = socket_activate(&env, &notify.path, &["WATCHDOG_USEC=200000"]);
    let _client = connect(&env).await;
    notify.wait("READY=1", Duration::from_secs(10));
    notify.seen.clear();
    notify.collect(Duration::from_millis(1000));
    let pings = notify.seen.iter().filter(|l| *l == "WATCHDOG=1").count();
    // Every 100 ms for a 200 ms watchdog: about ten in a second.
    assert!((6..=14).contains(&pings), "{pings} pings: {:?}", notify.seen);
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_downloads_reports_stopping_and_resumes_after_restart() {
    let env = TestEnv::new();
    env.set_config("shutdown_grace_ms", "7000");
    let mut notify = Notify::new(env.path());
    let notify_path = notify.path.clone();
    let mut daemon = TestDaemon::start_with_env(&env, &[("NOTIFY_SOCKET", notify_path.as_os_str())]);
    notify.wait("READY=1", Duration::from_secs(10));
    let server = TestServer::start().await.unwrap();
    let len = 24u64 << 20;
    server.add("/big", Resource::generated(len, 9).throttle(8 << 20));
    let client = connect(&env).await;
    client.request(Request::OpenSession { identifier: "t.term".into(), config: None }).await.unwrap();
    let dest = env.path().join("big.bin");
    let mut spec = dlsession::proto::TaskSpec::get(server.url("/big"));
    spec.destination = Some(dest.to_string_lossy().into_owned());
    client
        .request(Request::CreateTasks { identifier: "t.term".into(), tasks: vec![spec], resume: true })
        .await
        .unwrap();
    wait_for("a third downloaded", Duration::from_secs(30), || (server.bytes_sent("/big") > len / 3).then_some(()));
    notify.wait("STATUS=1 running", Duration::from_secs(5));
    drop(client);
    let status = daemon.terminate();
    assert!(status.success(), "clean exit: {status}");
    notify.wait("STOPPING=1", Duration::from_secs(5));
    // The stop's whole budget (3 × the 7 s grace, and 3 s), so TimeoutStopSec cannot cut it.
    notify.wait("EXTEND_TIMEOUT_USEC=24000000", Duration::from_secs(5));
    let sent = server.bytes_sent("/big");
    daemon.restart();
    wait_for("the download to finish", Duration::from_secs(60), || dest.exists().then_some(()));
    assert_eq!(sha256_file(&dest).unwrap(), Resource::generated(len, 9).sha256_hex());
    let last = server.requests_for("/big").pop().unwrap();
    let offset: u64 =
        last.range.as_deref().unwrap().trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    assert!(offset + (2 << 20) >= sent, "resumed at {offset} after {sent} were sent");
}

/// With `idle_exit_ms` a socket-activated daemon exits once nothing is left to do (a
/// retry waiting on `Retry-After` keeps it up), and the next activation finds everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_activated_daemon_exits_when_idle_and_comes_back() {
    let env = TestEnv::new();
    env.set_config("idle_exit_ms", "1000");
    let mut notify = Notify::new(env.path());
    let (mut child, log) = socket_activate(&env, &notify.path, &[]);
    let server = TestServer::start().await.unwrap();
    server.add("/now", Resource::generated(50_000, 1));
    server.add(
        "/later",
        Resource::generated(50_000, 2)
            .fault(Hits::First(1), Fault::Status { code: 503, retry_after: Some("3".into()) }),
    );
    let client = connect(&env).await;
    notify.wait("READY=1", Duration::from_secs(10));
    client.request(Request::OpenSession { identifier: "t.idle".into(), config: None }).await.unwrap();
    let specs = ["/now", "/later"]
        .iter()
        .map(|p| {
            let mut spec = dlsession::proto::TaskSpec::get(server.url(p));
            spec.destination = Some(env.path().join(&p[1..]).to_string_lossy().into_owned());
            spec
        })
        .collect();
    client.request(Request::CreateTasks { identifier: "t.idle".into(), tasks: specs, resume: true }).await.unwrap();
    drop(client);
    let left = Instant::now();

    // Nobody is connected, but /later waits 3 s to retry: the daemon must stay for that.
    wait_for("the retry of /later", Duration::from_secs(15), || (server.hits("/later") >= 2).then_some(()));
    assert!(left.elapsed() >= Duration::from_millis(2500), "retried after {:?}", left.elapsed());
    assert!(child.try_wait().unwrap().is_none(), "the daemon left while a retry was pending");
    // Then nothing is left to do, and it goes.
    let status = wait_for("the idle exit", Duration::from_secs(15), || child.try_wait().unwrap());
    assert!(status.success(), "clean exit: {status}");
    notify.wait("STOPPING=1", Duration::from_secs(5));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("idle with nothing to do; exiting"), "{text}");
    for (name, seed) in [("now", 1), ("later", 2)] {
        let got = sha256_file(&env.path().join(name)).unwrap();
        assert_eq!(got, Resource::generated(50_000, seed).sha256_hex(), "{name}");
    }

    // The next connection activates it again and finds both tasks completed.
    let _ = std::fs::remove_file(&env.socket);
    let (child, _log) = socket_activate(&env, &notify.path, &[]);
    let client = connect(&env).await;
    let query = dlsession::proto::TaskQuery {
        session: Some("t.idle".into()),
        states: vec![dlsession::proto::TaskState::Completed],
        after: None,
        limit: 10,
    };
    let Response::Tasks(page) = client.request(Request::ListTasks(query)).await.unwrap() else { panic!() };
    assert_eq!(page.tasks.len(), 2, "{:?}", page.tasks);
    assert!(page.tasks.iter().all(|t| t.error.is_none()), "{:?}", page.tasks);
    // A connected client keeps it up past the idle time.
    std::thread::sleep(Duration::from_millis(1800));
    let Response::Status(_) = client.request(Request::Status).await.unwrap() else { panic!() };
    stop(child);
}

/// Under systemd's watchdog the daemon pings every half period while it has work or
/// clients, and while idle stretches the period (`WATCHDOG_USEC`) to the longest it can
/// say instead of waking every few seconds; the next client brings the period back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_daemon_stretches_its_watchdog_instead_of_pinging() {
    let env = TestEnv::new();
    let mut notify = Notify::new(env.path());
    let (child, _log) = socket_activate(&env, &notify.path, &["WATCHDOG_USEC=1000000"]);
    let client = connect(&env).await;
    notify.wait("READY=1", Duration::from_secs(10));
    let pings = |seen: &[String]| seen.iter().filter(|l| *l == "WATCHDOG=1").count();
    let connected = notify.seen.len();
    notify.collect(Duration::from_millis(1600));
    assert!(pings(&notify.seen[connected..]) >= 2, "pinged every 0.5 s with a client: {:?}", notify.seen);
    let before = notify.seen.len();
    drop(client);
    let stretched = notify.wait_after(before, "WATCHDOG_USEC=4294967295", Duration::from_secs(5));
    notify.collect(Duration::from_secs(3));
    let after = pings(&notify.seen[stretched..]);
    assert!(after <= 1, "idle, pinged {after} times in 3 s (one comes with the stretch): {:?}", notify.seen);
    let idle = notify.seen.len();
    let client = connect(&env).await;
    let Response::Status(_) = client.request(Request::Status).await.unwrap() else { panic!() };
    notify.wait_after(idle, "WATCHDOG_USEC=1000000", Duration::from_secs(5));
    stop(child);
}

/// A session woken through a running process of its app (no launch spec) plans its next
/// wake; when that process goes and no other can take wakes, the plan is dropped, and a
/// socket-activated daemon with nothing else to do exits. Before, the wake (10 s away
/// here) kept it up only to find nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_with_nobody_left_to_wake_does_not_keep_an_idle_daemon_up() {
    let env = TestEnv::new();
    env.set_config("idle_exit_ms", "500");
    env.set_config("wake_initial_ms", "10000");
    env.set_config("wake_max_ms", "10000");
    env.set_config("wake_answer_ms", "200");
    let mut notify = Notify::new(env.path());
    let (mut child, log) = socket_activate(&env, &notify.path, &[]);
    let server = TestServer::start().await.unwrap();
    server.add("/f", Resource::generated(10_000, 4));
    let options = ClientOptions {
        socket: Some(env.socket.clone()),
        autostart: false,
        app_id: Some("org.example.Sleepy".into()),
        ..ClientOptions::default()
    };
    let app = Client::connect(options).await.unwrap();
    notify.wait("READY=1", Duration::from_secs(10));
    app.request(Request::HandleWakes).await.unwrap();
    let config = dlsession::proto::SessionConfig {
        app_id: Some("org.example.Sleepy".into()),
        ..dlsession::proto::SessionConfig::default()
    };
    app.request(Request::OpenSession { identifier: "t.sleepy".into(), config: Some(config) }).await.unwrap();
    let spec = dlsession::proto::TaskSpec::get(server.url("/f"));
    app.request(Request::CreateTasks { identifier: "t.sleepy".into(), tasks: vec![spec], resume: true }).await.unwrap();
    // The app is told to wake, does not rejoin: the next wake is planned 10 s away.
    wait_for("the wake", Duration::from_secs(10), || {
        std::fs::read_to_string(&log).unwrap().contains("outcome=Woken").then_some(())
    });
    drop(app);
    let left = Instant::now();
    let status = wait_for("the idle exit", Duration::from_secs(8), || child.try_wait().unwrap());
    assert!(status.success(), "clean exit: {status}");
    assert!(left.elapsed() < Duration::from_secs(5), "stayed {:?} for a wake with nobody to wake", left.elapsed());
}

/// Under systemd an app the daemon relaunched lives in the daemon's cgroup, so an idle
/// daemon waits for it to exit before leaving (leaving would have it killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_daemon_waits_for_the_app_it_relaunched() {
    let env = TestEnv::new();
    env.set_config("idle_exit_ms", "500");
    let mut notify = Notify::new(env.path());
    let (mut child, log) = socket_activate(&env, &notify.path, &[]);
    let server = TestServer::start().await.unwrap();
    server.add("/f", Resource::generated(10_000, 3));
    let started = env.path().join("app-started");
    let done = env.path().join("app-done");
    // The "app" collects its events at once, then keeps running for 3 s.
    let script = format!(
        "'{}' --socket '{}' attach t.app >/dev/null && touch '{}' && sleep 3 && touch '{}'",
        bin_path("dlsessionctl").display(),
        env.socket.display(),
        started.display(),
        done.display()
    );
    let config = dlsession::proto::SessionConfig {
        launch: Some(dlsession::proto::LaunchSpec::Command { argv: vec!["sh".into(), "-c".into(), script] }),
        ..dlsession::proto::SessionConfig::default()
    };
    let client = connect(&env).await;
    notify.wait("READY=1", Duration::from_secs(10));
    client.request(Request::OpenSession { identifier: "t.app".into(), config: Some(config) }).await.unwrap();
    let spec = dlsession::proto::TaskSpec::get(server.url("/f"));
    client.request(Request::CreateTasks { identifier: "t.app".into(), tasks: vec![spec], resume: true }).await.unwrap();
    drop(client);
    wait_for("the relaunched app to collect", Duration::from_secs(20), || started.exists().then_some(()));
    // Its events are acknowledged: only the running app is left, for 3 s.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon left while its app ran:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    wait_for("the app to end", Duration::from_secs(10), || done.exists().then_some(()));
    let status = wait_for("the idle exit", Duration::from_secs(10), || child.try_wait().unwrap());
    assert!(status.success(), "clean exit: {status}");
}

/// The pid in the daemon's state-directory lock file.
fn daemon_pid(env: &TestEnv) -> Option<u32> {
    std::fs::read_to_string(env.state_dir.join("dlsessiond/dlsessiond.lock")).ok()?.trim().parse().ok()
}

/// Stops a daemon that a client started in `env`, even when the test fails.
struct StopAutostarted(Arc<TestEnv>);

impl Drop for StopAutostarted {
    fn drop(&mut self) {
        if let Some(p) = daemon_pid(&self.0).and_then(|pid| rustix::process::Pid::from_raw(pid as i32)) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
        }
    }
}

async fn ctl(
    env: &Arc<TestEnv>,
    args: Vec<String>,
    extra_env: &'static [(&'static str, &'static str)],
) -> std::process::Output {
    let env = env.clone();
    tokio::task::spawn_blocking(move || {
        let mut cmd = env.command(bin_path("dlsessionctl"));
        cmd.env_remove("DLSESSION_NO_AUTOSTART");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.args(args).stdin(Stdio::null()).output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_starts_the_daemon_when_none_runs() {
    let env = Arc::new(TestEnv::new());
    let _stop = StopAutostarted(env.clone());
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(100_000, 1));
    let out = env.path().join("a.bin");
    let args =
        vec!["get".to_owned(), server.url("/a"), "-o".into(), out.to_string_lossy().into_owned(), "--wait".into()];

    // Turned off: a clear "not running" and exit 3.
    let o = ctl(&env, args.clone(), &[("DLSESSION_NO_AUTOSTART", "1")]).await;
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("dlsessiond is not running"));

    // Started from inside a systemd service (the app's): the daemon takes none of its
    // variables (it would log to that unit's journal stream, and take itself for a service).
    let o =
        ctl(&env, args, &[("INVOCATION_ID", "0123456789abcdef0123456789abcdef"), ("JOURNAL_STREAM", "8:12345")]).await;
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha256_file(&out).unwrap(), Resource::generated(100_000, 1).sha256_hex());
    let pid = daemon_pid(&env).expect("a daemon runs now");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    for var in environ.split(|b| *b == 0).map(String::from_utf8_lossy) {
        assert!(!var.starts_with("INVOCATION_ID=") && !var.starts_with("JOURNAL_STREAM="), "{var}");
    }
    let log = std::fs::read_to_string(env.state_dir.join("dlsessiond/dlsessiond.log")).unwrap();
    assert!(log.contains("dlsessiond ready"), "{log}");
    // Inspection commands never start one, but see this one.
    let o = ctl(&env, vec!["status".into()], &[]).await;
    assert_eq!(o.status.code(), Some(0));
}

/// A daemon started by an app keeps none of the app's descriptors: one the app left open
/// without close-on-exec (a listening socket, a lock, a pipe) stayed open in the daemon
/// for as long as it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_an_app_started_keeps_none_of_its_descriptors() {
    let env = Arc::new(TestEnv::new());
    let _stop = StopAutostarted(env.clone());
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(1_000, 2));
    let held = env.path().join("held-by-the-app");
    let out = env.path().join("a.bin");
    let o = {
        let (env, held, out, url) = (env.clone(), held.clone(), out.clone(), server.url("/a"));
        tokio::task::spawn_blocking(move || {
            // The shell opens descriptor 7 without close-on-exec, as C code often does.
            let script = r#"exec 7>>"$1"; exec "$2" get "$3" -o "$4""#;
            let mut cmd = env.command("/bin/sh");
            cmd.env_remove("DLSESSION_NO_AUTOSTART").arg("-c").arg(script).arg("sh").arg(&held);
            cmd.arg(bin_path("dlsessionctl")).arg(url).arg(&out);
            cmd.stdin(Stdio::null()).output().unwrap()
        })
        .await
        .unwrap()
    };
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let pid = daemon_pid(&env).expect("a daemon runs now");
    let open: Vec<std::path::PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect();
    assert!(!open.contains(&held), "the daemon holds the app's descriptor: {open:?}");
}

/// A starter that holds the start-up lock and never starts a daemon (stopped, say) does
/// not hang every other client: each gives up after its connect timeout, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_up_lock_held_for_ever_is_an_error_not_a_hang() {
    let env = Arc::new(TestEnv::new());
    let _stop = StopAutostarted(env.clone());
    let dir = env.socket.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let lock = std::fs::File::create(dir.join("dlsessiond.startup.lock")).unwrap();
    lock.lock().unwrap();
    let began = std::time::Instant::now();
    let o = tokio::task::spawn_blocking({
        let env = env.clone();
        move || {
            // `timeout` ends a client that hangs, so a regression fails instead of hanging.
            let mut cmd = env.command("timeout");
            cmd.env_remove("DLSESSION_NO_AUTOSTART");
            cmd.args(["60", bin_path("dlsessionctl").to_str().unwrap(), "get", "http://127.0.0.1:9/x", "-o"]);
            cmd.arg(env.path().join("x.bin")).stdin(Stdio::null()).output().unwrap()
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(124), "the client hung on the lock for 60 s");
    assert_ne!(o.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("startup.lock") && stderr.contains("without a daemon starting"), "{stderr}");
    assert!(began.elapsed() < Duration::from_secs(30), "gave up after {:?}", began.elapsed());
    assert!(daemon_pid(&env).is_none(), "no daemon was started behind the lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_racing_start_exactly_one_daemon() {
    let env = Arc::new(TestEnv::new());
    let _stop = StopAutostarted(env.clone());
    let server = TestServer::start().await.unwrap();
    let mut runs = Vec::new();
    for i in 0..10 {
        server.add(&format!("/f{i}"), Resource::generated(50_000, i));
        let out = env.path().join(format!("f{i}.bin"));
        let args = vec![
            "get".to_owned(),
            server.url(&format!("/f{i}")),
            "-o".into(),
            out.to_string_lossy().into_owned(),
            "--wait".into(),
        ];
        runs.push(tokio::spawn({
            let env = env.clone();
            async move { ctl(&env, args, &[]).await }
        }));
    }
    for (i, r) in runs.into_iter().enumerate() {
        let o = r.await.unwrap();
        assert_eq!(o.status.code(), Some(0), "client {i}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            sha256_file(&env.path().join(format!("f{i}.bin"))).unwrap(),
            Resource::generated(50_000, i as u64).sha256_hex()
        );
    }
    let log = std::fs::read_to_string(env.state_dir.join("dlsessiond/dlsessiond.log")).unwrap();
    assert_eq!(log.matches("dlsessiond ready").count(), 1, "exactly one daemon started:\n{log}");
    assert!(!log.contains("already running"), "no second daemon was even tried:\n{log}");
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name: utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_daemon_uses_no_cpu() {
    let env = TestEnv::new();
    let daemon = TestDaemon::start(&env);
    let client = connect(&env).await;
    // Suspended tasks and a connected client: still nothing to do.
    client.request(Request::OpenSession { identifier: "t.idle".into(), config: None }).await.unwrap();
    let specs = (0..500).map(|i| dlsession::proto::TaskSpec::get(format!("http://127.0.0.1:9/{i}"))).collect();
    client.request(Request::CreateTasks { identifier: "t.idle".into(), tasks: specs, resume: false }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_ticks(daemon.pid());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_ticks(daemon.pid()) - before;
    assert!(used <= 1, "an idle daemon used {used} clock ticks in 3 s");
}

/// With `JOURNAL_STREAM` naming the daemon's stderr (as systemd sets it for a service),
/// logs go to the journal when one runs, else stay on stderr (plain, without colour):
/// whichever this machine has is checked. Naming another stream (inherited from a service
/// by a shell, say), they stay on stderr either way.
#[test]
fn logs_go_to_the_journal_or_stay_on_stderr() {
    use std::os::unix::fs::MetadataExt;
    let journal = Path::new("/run/systemd/journal/socket").exists();
    let on_stderr = |daemon: &TestDaemon| {
        wait_for("the ready line on stderr", Duration::from_secs(10), || {
            daemon.log().contains("dlsessiond ready").then_some(())
        });
        assert!(!daemon.log().contains("\u{1b}["), "no colour codes when stderr is not a terminal");
    };
    let env = TestEnv::new();
    let inherited = TestDaemon::start_with_env(&env, &[("JOURNAL_STREAM", std::ffi::OsStr::new("8:12345"))]);
    on_stderr(&inherited);

    let env = TestEnv::new();
    // The daemon's stderr is this file (opened to append): the stream systemd would name.
    let log = env.path().join("daemon.log");
    std::fs::write(&log, "").unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    let named = format!("{}:{}", meta.dev(), meta.ino());
    let daemon = TestDaemon::start_with_env(&env, &[("JOURNAL_STREAM", std::ffi::OsStr::new(&named))]);
    if journal {
        // Ready (it answered), and nothing of it on stderr: the lines went to the journal.
        assert!(!daemon.log().contains("dlsessiond ready"), "{}", daemon.log());
    } else {
        on_stderr(&daemon);
    }
}

/// A daemon whose socket file is removed (a logout emptying the runtime directory) or
/// taken (systemd's socket unit enabled while it ran) stops: unreachable, it held the
/// locks that kept a reachable daemon from starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_whose_socket_is_taken_stops() {
    for take in [false, true] {
        let env = TestEnv::new();
        let mut d = TestDaemon::start(&env);
        std::fs::remove_file(&env.socket).unwrap();
        let _taker = take.then(|| std::os::unix::net::UnixListener::bind(&env.socket).unwrap());
        let status = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(20)));
        assert!(status.success(), "{status:?}");
        assert!(d.log().contains("the socket was removed or replaced"), "{}", d.log());
        // The one that took the path keeps it: reachable there still.
        if take {
            assert!(std::os::unix::net::UnixStream::connect(&env.socket).is_ok(), "the taker's socket was removed");
        }
        // Its locks are free: a daemon clients can reach starts.
        if !take {
            let d = TestDaemon::start(&env);
            assert_eq!(d.log().matches("dlsessiond ready").count(), 2, "{}", d.log());
        }
    }
}
