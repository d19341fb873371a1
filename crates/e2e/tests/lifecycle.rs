//! The background lifecycle with real processes (docs/behaviour.md, "Sessions",
//! "Events and delivery", "Waking the app"): the app leaves, the
//! daemon finishes, wakes or relaunches the app, and the app rejoins and collects.
//!
//! The app is `client/examples/fetcher.rs`, run as a separate process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dlsession::proto::{Request, Response, SessionInfo};
use dlsession::{Client, ClientOptions};
use dlsession_testkit::host::{kill, walk};
use dlsession_testkit::{
    Resource, TestDaemon, TestEnv, TestServer, bin_path, pattern_sha256, sha256_file, to_hex, wait_for,
};

const SESSION: &str = "org.example.fetcher";
const LONG: Duration = Duration::from_secs(60);

struct App<'a> {
    env: &'a TestEnv,
    out: PathBuf,
    log: PathBuf,
}

impl<'a> App<'a> {
    fn new(env: &'a TestEnv) -> App<'a> {
        App { env, out: env.path().join("collected"), log: env.path().join("fetcher.log") }
    }

    fn command(&self, verb: &str, extra: &[&str]) -> Command {
        let mut cmd = self.env.command(bin_path("examples/fetcher"));
        cmd.arg(verb).arg("--dir").arg(&self.out).arg("--log").arg(&self.log).args(extra);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        cmd
    }

    /// Runs `fetcher start` and waits for it to exit: the app really leaves.
    fn start(&self, urls: &[String], extra: &[&str]) {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(urls.iter().map(String::as_str));
        let status = self.command("start", &args).status().unwrap();
        assert!(status.success(), "fetcher start failed; log:\n{}", self.log_text());
    }

    fn spawn(&self, verb: &str, extra: &[&str]) -> Child {
        self.command(verb, extra).spawn().unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn lines(&self) -> Vec<String> {
        self.log_text().lines().map(str::to_owned).collect()
    }

    fn wait_log(&self, what: &str, pred: impl Fn(&[String]) -> bool) {
        let deadline = std::time::Instant::now() + LONG;
        while !pred(&self.lines()) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; app log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// pid → the lines that process logged.
    fn by_pid(&self) -> BTreeMap<u32, Vec<String>> {
        let mut map: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for line in self.lines() {
            if let Some(pid) = line.strip_prefix("pid=").and_then(|r| r.split(' ').next()).and_then(|p| p.parse().ok())
            {
                map.entry(pid).or_default().push(line);
            }
        }
        map
    }
}

fn files(server: &TestServer, n: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            server.add(&format!("/f{i}.bin"), Resource::generated(1 << 20, 100 + i).throttle(2 << 20));
            server.url(&format!("/f{i}.bin"))
        })
        .collect()
}

/// Every collected file is byte-exact.
fn check_collected(out: &Path, n: u64) {
    for i in 0..n {
        let name = format!("f{i}.bin");
        let file = std::fs::read_dir(out)
            .unwrap_or_else(|e| panic!("{}: {e}", out.display()))
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().unwrap().to_string_lossy().ends_with(&format!("-{name}")))
            .unwrap_or_else(|| panic!("{name} not collected into {}", out.display()));
        assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(100 + i, 1 << 20)), "{name}");
    }
}

async fn session_info(env: &TestEnv, identifier: &str) -> Option<SessionInfo> {
    let client =
        Client::connect(ClientOptions { socket: Some(env.socket.clone()), ..ClientOptions::default() }).await.unwrap();
    match client.request(Request::GetSession { identifier: identifier.into() }).await {
        Ok(Response::Session(s)) => Some(s),
        _ => None,
    }
}

/// Nothing is left pending and no finished file lingers in the cache.
async fn assert_drained(env: &TestEnv) {
    let info = session_info(env, SESSION).await.unwrap();
    assert_eq!(info.pending_events, 0, "{info:?}");
    assert_eq!(info.tasks.total(), 0, "all tasks acknowledged and retired: {info:?}");
    let leftovers: Vec<_> = walk(&env.downloads_dir());
    assert!(leftovers.is_empty(), "files left in the cache: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_exits_and_is_relaunched_to_collect() {
    let env = TestEnv::new();
    let daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let app = App::new(&env);
    let urls = files(&server, 3);
    app.start(&urls, &[]);

    app.wait_log("the relaunched app to finish", |lines| {
        lines.iter().any(|l| l.contains("finished_events session="))
            && lines.iter().filter(|l| l.contains("completed task=")).count() == 3
    });
    check_collected(&app.out, 3);
    let procs = app.by_pid();
    assert_eq!(procs.len(), 2, "start, then one relaunch: {procs:#?}");
    let relaunched = procs.values().find(|l| l.iter().any(|x| x.contains("collect "))).unwrap();
    assert!(relaunched[0].contains("collect reason=finished_events identifier=org.example.fetcher"), "{relaunched:?}");
    assert!(relaunched.iter().any(|l| l.contains("rejoined tasks=3")), "rebuilt its view with get_all_tasks");
    // Per task: finished_downloading before completed; finished_events last.
    for id in 1..=3 {
        let f = relaunched.iter().position(|l| l.contains(&format!("finished task={id} "))).unwrap();
        let c = relaunched.iter().position(|l| l.contains(&format!("completed task={id} ok"))).unwrap();
        assert!(f < c, "{relaunched:?}");
    }
    let last_event = relaunched.iter().rposition(|l| l.contains("finished_events session=")).unwrap();
    assert!(relaunched.iter().rposition(|l| l.contains("completed task=")).unwrap() < last_event, "{relaunched:#?}");
    wait_for("events acknowledged", LONG, || {
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(session_info(&env, SESSION)))
            .filter(|s| s.pending_events == 0 && s.tasks.total() == 0)
    });
    assert_drained(&env).await;
    assert!(daemon.log().contains("relaunched app"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_app_is_woken_instead_of_relaunched() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let app = App::new(&env);
    let mut serving = app.spawn("serve", &[]);
    app.wait_log("the app to serve", |l| l.iter().any(|x| x.contains("serving")));
    let urls = files(&server, 2);
    app.start(&urls, &[]);
    let status = wait_for("the serving app to collect and exit", LONG, || serving.try_wait().unwrap());
    assert!(status.success(), "log:\n{}", app.log_text());
    check_collected(&app.out, 2);
    let text = app.log_text();
    assert!(text.contains("woken identifier=org.example.fetcher"), "{text}");
    assert!(!text.contains("collect reason="), "no relaunch happened:\n{text}");
    assert_drained(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_acknowledging_redelivers_the_same_events_and_files() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let app = App::new(&env);
    let marker = env.path().join("crashed-once");
    let urls = files(&server, 2);
    app.start(&urls, &["--crash-once", marker.to_str().unwrap()]);
    app.wait_log("the second relaunch to collect everything", |lines| {
        lines.iter().any(|l| l.contains("finished_events session="))
            && lines.iter().filter(|l| l.contains("completed task=")).count() == 2
    });
    let lines = app.lines();
    let crashed = lines.iter().find(|l| l.contains("crashing task=")).expect("the first relaunch crashed");
    let task = crashed.split("task=").nth(1).unwrap().split(' ').next().unwrap();
    let location = crashed.split("location=").nth(1).unwrap();
    assert!(lines.iter().any(|l| l.contains(&format!("finished task={task} "))), "the same event came again");
    assert_eq!(app.by_pid().len(), 3, "start, crashed relaunch, second relaunch");
    assert!(!Path::new(location).exists(), "the file moved on redelivery (it was still there after the crash)");
    check_collected(&app.out, 2);
    wait_for("drained", LONG, || {
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(session_info(&env, SESSION)))
            .filter(|s| s.pending_events == 0)
    });
    assert_drained(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_events_wait_for_the_app_still_ends_in_a_relaunch() {
    let env = TestEnv::new();
    let mut daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let app = App::new(&env);
    let hold = env.path().join("hold");
    let urls = files(&server, 2);
    app.start(&urls, &["--hold", hold.to_str().unwrap()]);
    // The first relaunch happens and waits before rejoining: events stay pending.
    app.wait_log("a relaunch", |l| l.iter().any(|x| x.contains("collect reason=")));
    let first = *app.by_pid().iter().find(|(_, l)| l.iter().any(|x| x.contains("collect "))).unwrap().0;
    daemon.kill9();
    kill(first);
    daemon.restart();
    // After the restart the daemon relaunches the app again, by itself.
    app.wait_log("a relaunch after the restart", |l| l.iter().filter(|x| x.contains("collect reason=")).count() == 2);
    std::fs::write(&hold, b"go").unwrap();
    // (Its "rejoined" line may come before or after the events: they are delivered while
    // it lists its tasks.)
    app.wait_log("the collection", |l| {
        let done = l.iter().filter(|x| x.contains("completed task=")).count() == 2;
        done && l.iter().any(|x| x.contains("finished_events session="))
    });
    check_collected(&app.out, 2);
    wait_for("drained", LONG, || {
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(session_info(&env, SESSION)))
            .filter(|s| s.pending_events == 0)
    });
    assert_drained(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_systemd_unit_is_started_with_the_escaped_identifier() {
    let env = TestEnv::new();
    let bin = env.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = env.path().join("systemctl.calls");
    let app = App::new(&env);
    // A stand-in for `systemctl`: records its arguments and runs what the unit would run.
    let script = format!(
        "#!/bin/sh\necho \"$@\" >> {calls}\nexec {fetcher} collect --dir {out} --log {log} --session t.unit\n",
        calls = calls.display(),
        fetcher = bin_path("examples/fetcher").display(),
        out = app.out.display(),
        log = app.log.display(),
    );
    std::fs::write(bin.join("systemctl"), script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("systemctl"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let _daemon = TestDaemon::start_with_env(&env, &[("PATH", std::ffi::OsStr::new(&path))]);
    let server = TestServer::start().await.unwrap();
    let urls = files(&server, 1);

    let (delegate, _events) = dlsession_testkit::Recorder::new(&env.path().join("unused"));
    let config = dlsession::SessionConfiguration::background("t.unit")
        .app_id("org.example.unit")
        .systemd_unit("fetch@.service")
        .socket(&env.socket);
    let session = dlsession::Session::attach(config, delegate).await.unwrap();
    session.download_tasks(vec![dlsession::DownloadRequest::new(urls[0].as_str())], true).await.unwrap();
    drop(session);
    app.wait_log("the unit's app to collect", |l| l.iter().any(|x| x.contains("finished_events session=")));
    let recorded = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(recorded.lines().next(), Some("--user start fetch@t.unit.service"), "{recorded}");
    check_collected(&app.out, 1);
}

/// `client/examples/quickstart.rs`, the short version of the story: the app hands off the
/// downloads and exits; relaunched, it moves the files where it was first run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_example_hands_off_exits_and_collects_when_relaunched() {
    let source =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../client/examples/quickstart.rs"))
            .unwrap();
    let logic = source
        .lines()
        .skip_while(|l| !l.starts_with("struct Collect"))
        .filter(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with("//") && !t.chars().all(|c| matches!(c, '}' | ')' | ';'))
        })
        .count();
    assert!(logic <= 30, "the quickstart's app logic stays within 30 lines: {logic}");

    let env = TestEnv::new();
    let daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let urls = files(&server, 2);
    let cwd = env.path().join("where-i-ran-it");
    std::fs::create_dir_all(&cwd).unwrap();
    let out = env.command(bin_path("examples/quickstart")).args(&urls).current_dir(&cwd).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("dlsessiond has 2 download(s)"), "{stdout}");

    // The daemon finishes, relaunches it with `--collect DIR`, and it moves the files.
    for (i, id) in (1..=2u64).enumerate() {
        let file = cwd.join(format!("download-{id}"));
        wait_for("the relaunched quickstart to collect", LONG, || file.exists().then_some(()));
        let seed = 100 + u64::try_from(i).unwrap();
        let ok = |f: &Path| sha256_file(f).is_ok_and(|h| h == to_hex(&pattern_sha256(seed, 1 << 20)));
        assert!(ok(&file) || ok(&cwd.join(format!("download-{}", 3 - id))), "download-{id} is one of the files");
    }
    wait_for("events acknowledged", LONG, || {
        let info = dlsession_testkit::block(session_info(&env, "org.example.quickstart"))?;
        (info.pending_events == 0 && info.tasks.total() == 0).then_some(())
    });
    // One relaunch, one log line for it (a second completion during the relaunch only
    // waits for it, which the log says at debug).
    let log = daemon.log();
    let wakes: Vec<&str> =
        log.lines().filter(|l| l.contains(": wake session=org.example.quickstart outcome=")).collect();
    assert_eq!(wakes.len(), 1, "{wakes:#?}");
}
