//! The desktop's word on the machine (docs/behaviour.md, "Metered networks and battery"):
//! NetworkManager and UPower on a private bus standing in for the system bus, played by
//! python3-dbusmock, switched while downloads run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use dlsession::{DownloadRequest, Session, TaskState, WaitReason};
use dlsession_testkit::app::config;
use dlsession_testkit::dbus::PrivateBus;
use dlsession_testkit::{
    LONG, Recorder, Resource, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex,
};

const NM: (&str, &str, &str) =
    ("org.freedesktop.NetworkManager", "/org/freedesktop/NetworkManager", "org.freedesktop.NetworkManager");
const UPOWER: (&str, &str, &str) = ("org.freedesktop.UPower", "/org/freedesktop/UPower", "org.freedesktop.UPower");
const DISPLAY: (&str, &str, &str) =
    ("org.freedesktop.UPower", "/org/freedesktop/UPower/devices/DisplayDevice", "org.freedesktop.UPower.Device");

fn set(bus: &PrivateBus, (dest, path, iface): (&str, &str, &str), name: &str, value: &str) {
    bus.set_property(dest, path, iface, name, value);
}

fn desktop() -> (TestEnv, PrivateBus) {
    let env = TestEnv::new();
    let mut bus = PrivateBus::start(env.path());
    bus.mock("networkmanager", NM.0);
    // The template has no `Metered`: NetworkManager's "guess no" to start with.
    set(&bus, NM, "Metered", "dbus.UInt32(4)");
    bus.mock("upower", UPOWER.0);
    (env, bus)
}

/// NetworkManager says "metered"; UPower owns its name and never answers.
fn metered_with_upower_hung() -> (TestEnv, PrivateBus) {
    let env = TestEnv::new();
    let mut bus = PrivateBus::start(env.path());
    bus.mock("networkmanager", NM.0);
    set(&bus, NM, "Metered", "dbus.UInt32(1)");
    bus.hang(UPOWER.0);
    (env, bus)
}

fn start(env: &TestEnv, bus: &PrivateBus) -> TestDaemon {
    TestDaemon::start_with_env(env, &[("DBUS_SYSTEM_BUS_ADDRESS", std::ffi::OsStr::new(&bus.address))])
}

fn status(env: &TestEnv) -> serde_json::Value {
    let out = env.ctl(&["--json", "status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait_status(env: &TestEnv, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(env);
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the file at `path` holds `needle` (or fails after [`LONG`]); its text then.
async fn file_with(path: &std::path::Path, needle: &str, what: &str) -> String {
    let deadline = Instant::now() + LONG;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {text:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the task until `pred` holds (or fails after [`LONG`]).
async fn poll(
    task: &dlsession::DownloadTask,
    what: &str,
    pred: &dyn Fn(&dlsession::TaskInfo) -> bool,
) -> dlsession::TaskInfo {
    let deadline = Instant::now() + LONG;
    loop {
        let info = task.info().await.unwrap();
        if pred(&info) {
            return info;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn status_shows_the_network_and_power_the_desktop_reports() {
    let (env, bus) = desktop();
    let _d = start(&env, &bus);
    let s = wait_status(&env, "UPower read", |s| s["power"]["source"] == "UPower");
    assert_eq!(s["network"]["metered"], false, "{s}");
    assert_eq!(s["network"]["online"], true, "{s}");
    assert_eq!(s["power"]["on_battery"], false, "{s}");
    assert!(s["network"]["source"].as_str().unwrap().contains("NetworkManager"), "{s}");

    // Behind a captive portal NetworkManager says so: not online, whatever the routes.
    set(&bus, NM, "Connectivity", "dbus.UInt32(2)");
    wait_status(&env, "portal: offline", |s| s["network"]["online"] == false);
    set(&bus, NM, "Connectivity", "dbus.UInt32(4)");
    wait_status(&env, "full connectivity: online", |s| s["network"]["online"] == true);
    set(&bus, NM, "Metered", "dbus.UInt32(3)");
    set(&bus, DISPLAY, "Percentage", "dbus.Double(42.4)");
    set(&bus, UPOWER, "OnBattery", "dbus.Boolean(True)");
    let s = wait_status(&env, "metered, on battery", |s| {
        s["network"]["metered"] == true && s["power"]["on_battery"] == true
    });
    assert_eq!(s["power"]["battery_percent"], 42, "{s}");
    let human = String::from_utf8_lossy(&env.ctl(&["status"]).stdout).into_owned();
    assert!(
        human.contains("network:      online, metered") && human.contains("power:        on battery (42 %)"),
        "{human}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_refuses_metered_networks_waits_and_goes_on() {
    let (env, bus) = desktop();
    let _d = start(&env, &bus);
    let server = TestServer::start().await.unwrap();
    let len = 3 << 20;
    server.add("/m", Resource::generated(len, 12).throttle(1 << 20));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session =
        Session::attach(config(&env, "t.metered").allows_metered(false).allows_battery(false), delegate).await.unwrap();
    let policy = String::from_utf8_lossy(&env.ctl(&["policy", "t.metered"]).stdout).into_owned();
    assert!(policy.contains("metered networks not allowed, battery not allowed"), "{policy}");
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/m"))], true).await.unwrap().remove(0);
    let poll = async |what: &str, pred: &dyn Fn(&dlsession::TaskInfo) -> bool| poll(&task, what, pred).await;
    poll("bytes", &|i| i.bytes_received > 0).await;

    // The network becomes metered: the task stops and waits, its data kept.
    set(&bus, NM, "Metered", "dbus.UInt32(1)");
    let held = poll("metered_network", &|i| i.wait == Some(WaitReason::MeteredNetwork)).await;
    assert_eq!(held.state, TaskState::Queued);
    let shown = String::from_utf8_lossy(&env.ctl(&["show", &task.id().to_string()]).stdout).into_owned();
    assert!(shown.contains("the network is metered and its policy does not allow it"), "{shown}");

    // Unmetered but on battery: it waits for that instead.
    set(&bus, UPOWER, "OnBattery", "dbus.Boolean(True)");
    set(&bus, NM, "Metered", "dbus.UInt32(2)");
    poll("on_battery", &|i| i.wait == Some(WaitReason::OnBattery)).await;

    // The policy changed from the command line: the task goes on, from where it was.
    let out = env.ctl(&["policy", "t.metered", "--battery", "allow"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(12, len)));
    let detail = env.ctl(&["--json", "show", &task.id().to_string()]);
    let detail: serde_json::Value = serde_json::from_slice(&detail.stdout).unwrap();
    assert_eq!(detail["attempts"], 2, "stopped once, resumed once: {detail}");
}

/// Behind a captive portal (NetworkManager's `Connectivity`: portal) nothing starts, whatever
/// the policy: an HTTPS download would fail on the portal's certificate, an HTTP one save
/// its sign-in page as the file. Tasks wait (`no_network`) and go on once through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_starts_behind_a_captive_portal() {
    let (env, bus) = desktop();
    set(&bus, NM, "Connectivity", "dbus.UInt32(2)");
    let _d = start(&env, &bus);
    let s = wait_status(&env, "the portal", |s| {
        s["network"]["source"].as_str().is_some_and(|src| src.contains("captive portal"))
    });
    assert_eq!(s["network"]["online"], false, "{s}");
    let server = TestServer::start().await.unwrap();
    let len = 200_000;
    server.add("/p", Resource::generated(len, 21));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.portal"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/p"))], true).await.unwrap().remove(0);
    let held =
        poll(&task, "no_network", &|i| matches!(i.wait, Some(WaitReason::NoNetwork { since }) if since > 0)).await;
    assert_eq!(held.state, TaskState::Queued, "{held:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.hits("/p"), 0, "nothing went to the server behind the portal");

    // Signed in: the portal lets traffic through.
    set(&bus, NM, "Connectivity", "dbus.UInt32(4)");
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(21, len)));
}

/// NetworkManager connecting again counts as the network returning even where no default
/// route went away (a full-tunnel VPN keeps its own): a task backing off after a network
/// error goes at once, not after its backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_manager_connecting_again_retries_what_backs_off() {
    let (env, bus) = desktop();
    env.set_config("retry_initial_ms", "120000");
    env.set_config("retry_max_ms", "120000");
    let _d = start(&env, &bus);
    wait_status(&env, "NetworkManager heard", |s| {
        s["network"]["source"].as_str().is_some_and(|src| src.contains("NetworkManager"))
    });
    // Nothing listens there yet: refused, the task backs off for two minutes.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.nm-back"), delegate).await.unwrap();
    let url = format!("http://{addr}/back");
    let task = session.download_tasks(vec![DownloadRequest::new(url)], true).await.unwrap().remove(0);
    poll(&task, "backoff", &|i| matches!(i.wait, Some(WaitReason::Backoff { .. }))).await;
    let server = TestServer::start_at(addr).await.unwrap();
    server.add("/back", Resource::generated(50_000, 22));
    // The wifi under the tunnel drops and comes back: NetworkManager says so.
    set(&bus, NM, "State", "dbus.UInt32(20)");
    wait_status(&env, "offline", |s| s["network"]["online"] == false);
    set(&bus, NM, "State", "dbus.UInt32(70)");
    let done = tokio::time::timeout(Duration::from_secs(20), events.completion(task.id(), LONG)).await;
    assert_eq!(done.expect("retried when the network came back, not after the backoff"), None);
}

/// A watcher hears why a held task waits when the reason changes while it stays held
/// (metered, then on battery): before, only holding and releasing told it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_hears_when_a_held_task_waits_for_another_reason() {
    use dlsession::proto::{Event, Request, WatchFilter};
    let (env, bus) = desktop();
    set(&bus, NM, "Metered", "dbus.UInt32(1)");
    let _d = start(&env, &bus);
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session =
        Session::attach(config(&env, "t.reason").allows_metered(false).allows_battery(false), delegate).await.unwrap();
    let task =
        session.download_tasks(vec![DownloadRequest::new("http://127.0.0.1:9/r")], true).await.unwrap().remove(0);
    poll(&task, "metered_network", &|i| i.wait == Some(WaitReason::MeteredNetwork)).await;
    let watcher = dlsession_testkit::app::client(&env).await;
    let mut updates = watcher.events();
    watcher.request(Request::Watch(WatchFilter { session: None, tasks: vec![task.id()] })).await.unwrap();
    // Unmetered, but on battery: still held, for another reason.
    set(&bus, UPOWER, "OnBattery", "dbus.Boolean(True)");
    set(&bus, NM, "Metered", "dbus.UInt32(2)");
    let heard = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(event) = updates.recv().await {
            if let Event::TaskUpdate(info) = event
                && info.wait == Some(WaitReason::OnBattery)
            {
                return info;
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("the watcher heard the task now waits for AC power");
    assert_eq!(heard.state, TaskState::Queued);
}

/// A task its policy holds (a metered network that stays metered) still has a resource
/// budget: when it runs out, the task completes `timed_out`, saying why it waited, without
/// an attempt. Before, it waited for ever, and the app was never told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_held_by_its_policy_past_its_resource_deadline_times_out() {
    let (env, bus) = desktop();
    let _d = start(&env, &bus);
    set(&bus, NM, "Metered", "dbus.UInt32(1)");
    wait_status(&env, "metered", |s| s["network"]["metered"] == true);
    let server = TestServer::start().await.unwrap();
    server.add("/never", Resource::generated(1000, 13));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let config = config(&env, "t.held-too-long").allows_metered(false).timeout_for_resource(Duration::from_secs(2));
    let session = Session::attach(config, delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/never"))], true).await.unwrap().remove(0);
    let error = events.completion(task.id(), Duration::from_secs(15)).await.expect("timed out");
    assert_eq!(error.code, dlsession::ErrorCode::TimedOut, "{error}");
    assert!(error.message.contains("metered"), "says why it waited: {error}");
    assert_eq!(server.hits("/never"), 0, "never asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_desktop_services_the_daemon_assumes_online_unmetered_on_ac() {
    let env = TestEnv::new();
    let bus = PrivateBus::start(env.path());
    let d = start(&env, &bus);
    let s = wait_status(&env, "the services found missing", |s| s["power"]["source"] != "not asked yet");
    assert_eq!((s["network"]["online"].clone(), s["network"]["metered"].clone()), (true.into(), false.into()), "{s}");
    assert_eq!(s["power"]["on_battery"], false, "{s}");
    assert!(s["power"]["source"].as_str().unwrap().contains("UPower not available"), "{s}");
    let server = TestServer::start().await.unwrap();
    server.add("/x", Resource::generated(100_000, 2));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session =
        Session::attach(config(&env, "t.none").allows_metered(false).discretionary(true), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/x"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None, "nothing says metered or on battery");
    assert_eq!(d.log().matches("assuming online, unmetered and on AC power").count(), 1, "said once");
}

/// A session that names a desktop application: when its events wait and no app is attached,
/// the daemon calls the app's `ActivateAction("dlsession-events", [identifier])`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desktop_application_is_relaunched_by_activate_action() {
    let env = TestEnv::new();
    let mut bus = PrivateBus::start(env.path());
    let log = env.path().join("app-calls.log");
    let app = ("org.example.App", "/org/example/App", "org.freedesktop.Application");
    bus.mock_object(app.0, app.1, app.2, &log);
    bus.add_method(app.0, app.1, app.2, "ActivateAction", "sava{sv}");
    let _d = TestDaemon::start_with_env(&env, &[("DBUS_SESSION_BUS_ADDRESS", std::ffi::OsStr::new(&bus.address))]);
    let server = TestServer::start().await.unwrap();
    server.add("/a", Resource::generated(10_000, 1));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.app").desktop_app("org.example.App"), delegate).await.unwrap();
    session.detach().await.unwrap();
    drop(session);
    let c = dlsession_testkit::app::client(&env).await;
    let created = c
        .request(dlsession::proto::Request::CreateTasks {
            identifier: "t.app".into(),
            tasks: vec![dlsession::proto::TaskSpec::get(server.url("/a"))],
            resume: true,
        })
        .await
        .unwrap();
    assert!(matches!(created, dlsession::proto::Response::TasksCreated(_)), "{created:?}");
    let text = file_with(&log, "ActivateAction", "the app's activation (its calls)").await;
    assert!(text.contains("dlsession-events") && text.contains("t.app"), "the action and the session: {text}");
    let out = env.ctl(&["wake", "t.app"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("activated desktop application org.example.App over D-Bus"), "{said}");
    events.drain();
}

/// No such service on the bus: the `.desktop` file's `Exec` line runs instead, with the
/// `DLSESSION_*` environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_service_the_desktop_files_exec_line_runs() {
    let env = TestEnv::new();
    let bus = PrivateBus::start(env.path());
    let marker = env.path().join("ran");
    let apps = env.data_dir.join("applications");
    std::fs::create_dir_all(&apps).unwrap();
    std::fs::write(
        apps.join("org.example.Fallback.desktop"),
        format!(
            "[Desktop Entry]\nType=Application\nName=Fallback\nDBusActivatable=true\n\
             Exec=/bin/sh -c \"echo $DLSESSION_IDENTIFIER $DLSESSION_WAKE_REASON >> {}\" %U\n",
            marker.display()
        ),
    )
    .unwrap();
    let _d = TestDaemon::start_with_env(&env, &[("DBUS_SESSION_BUS_ADDRESS", std::ffi::OsStr::new(&bus.address))]);
    let c = dlsession_testkit::app::client(&env).await;
    let config = dlsession::proto::SessionConfig {
        launch: Some(dlsession::proto::LaunchSpec::DesktopApp { app_id: "org.example.Fallback".into() }),
        ..Default::default()
    };
    c.request(dlsession::proto::Request::OpenSession { identifier: "t.fallback".into(), config: Some(config) })
        .await
        .unwrap();
    let out = env.ctl(&["wake", "t.fallback"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    file_with(&marker, "t.fallback requested", "the Exec line to run").await;
    let bad = c
        .request(dlsession::proto::Request::OpenSession {
            identifier: "t.bad".into(),
            config: Some(dlsession::proto::SessionConfig {
                launch: Some(dlsession::proto::LaunchSpec::DesktopApp { app_id: "not an id".into() }),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), dlsession::ErrorCode::InvalidRequest, "{bad}");
}

/// A session that asks for notifications, with a launch command that appends its wake
/// reason to the returned marker file, finishes a download while its app is away. The
/// server must live as long as the test.
async fn done_while_its_app_is_away(env: &TestEnv, identifier: &str, seed: u64) -> (TestServer, std::path::PathBuf) {
    let server = TestServer::start().await.unwrap();
    server.add("/ok", Resource::generated(10_000, seed));
    let marker = env.path().join("relaunched");
    let script = env.path().join("app.sh");
    std::fs::write(&script, format!("#!/bin/sh\necho \"$DLSESSION_WAKE_REASON\" >> {}\n", marker.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let config = config(env, identifier).notify(true).launch_command([script.display().to_string()]);
    let session = Session::attach(config, delegate).await.unwrap();
    session.detach().await.unwrap();
    drop(session);
    let c = dlsession_testkit::app::client(env).await;
    c.request(dlsession::proto::Request::CreateTasks {
        identifier: identifier.into(),
        tasks: vec![dlsession::proto::TaskSpec::get(server.url("/ok"))],
        resume: true,
    })
    .await
    .unwrap();
    (server, marker)
}

/// A session that asks for it gets one desktop notification when its downloads are done and
/// its app is not running; clicking it relaunches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_tells_the_user_and_its_action_relaunches_the_app() {
    let env = TestEnv::new();
    let mut bus = PrivateBus::start(env.path());
    let log = env.path().join("notifications.log");
    bus.mock_session_template("notification_daemon", "org.freedesktop.Notifications", &log);
    let _d = TestDaemon::start_with_env(&env, &[("DBUS_SESSION_BUS_ADDRESS", std::ffi::OsStr::new(&bus.address))]);
    let (_server, marker) = done_while_its_app_is_away(&env, "t.notify", 1).await;
    let shown = file_with(&log, "Notify", "a notification (the log)").await;
    assert!(shown.contains("1 download finished") && shown.contains("t.notify"), "{shown}");
    file_with(&marker, "finished_events", "the app's relaunch").await;
    // The user clicks it: the app comes again, now (the wake backoff would wait 30 s).
    bus.emit_signal(
        "org.freedesktop.Notifications",
        "/org/freedesktop/Notifications",
        "org.freedesktop.Notifications",
        "ActionInvoked",
        "us",
        "[dbus.UInt32(1), 'default']",
    );
    file_with(&marker, "requested", "the click to relaunch the app").await;
    // The click's relaunch does not show the notification again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = std::fs::read_to_string(&log).unwrap();
    assert_eq!(calls.lines().filter(|l| l.contains(" Notify ")).count(), 1, "{calls}");
    let policy = String::from_utf8_lossy(&env.ctl(&["policy", "t.notify"]).stdout).into_owned();
    assert!(policy.contains("notifies when done"), "{policy}");
}

/// A notification server that comes after the daemon (a user service started before the
/// desktop's) still shows the notices that come later: the service is looked for again at the
/// next notice (the first failure ended notifications for the daemon's whole life).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_show_once_their_server_comes() {
    let env = TestEnv::new();
    env.set_config("wake_initial_ms", "500");
    env.set_config("wake_answer_ms", "300");
    let mut bus = PrivateBus::start(env.path());
    let d = TestDaemon::start_with_env(&env, &[("DBUS_SESSION_BUS_ADDRESS", std::ffi::OsStr::new(&bus.address))]);
    let (_server, marker) = done_while_its_app_is_away(&env, "t.late", 2).await;
    file_with(&marker, "finished_events", "the first relaunch").await;
    d.wait_logged("session notifications cannot be shown", LONG);
    let log = env.path().join("notifications.log");
    bus.mock_session_template("notification_daemon", "org.freedesktop.Notifications", &log);
    // The app never attaches: the next wake (the backoff) tells the user.
    let shown = file_with(&log, "Notify", "a notification once the server is there").await;
    assert!(shown.contains("t.late"), "{shown}");
}

/// A system service that hangs counts as absent for that read only: the other service's
/// facts are kept (a hung UPower lost NetworkManager's "metered" too).
#[test]
fn a_hung_upower_does_not_hide_a_metered_network() {
    let (env, bus) = metered_with_upower_hung();
    let _d = start(&env, &bus);
    let s = wait_status(&env, "metered, with UPower silent", |s| s["network"]["metered"] == true);
    assert!(s["power"]["source"].as_str().unwrap_or_default().contains("no answer"), "{s}");
}

/// A desktop service still on the bus that does not answer a read (NetworkManager busy
/// after a resume) keeps its last word: a metered network stays metered, and a task that
/// refuses metered networks stays held. Before, the failed read counted as "unmetered" and
/// released it until NetworkManager next spoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_network_manager_does_not_make_a_metered_network_unmetered() {
    let (env, mut bus) = desktop();
    set(&bus, NM, "Metered", "dbus.UInt32(1)");
    let _d = start(&env, &bus);
    let server = TestServer::start().await.unwrap();
    server.add("/held", Resource::generated(100_000, 14));
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.busy").allows_metered(false), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/held"))], true).await.unwrap().remove(0);
    poll(&task, "metered_network", &|i| i.wait == Some(WaitReason::MeteredNetwork)).await;
    // NetworkManager stops answering for 15 s; UPower's change makes the daemon read both.
    bus.freeze(NM.0, NM.1, 15);
    set(&bus, UPOWER, "OnBattery", "dbus.Boolean(True)");
    let until = Instant::now() + Duration::from_secs(14);
    while Instant::now() < until {
        assert_eq!(server.hits("/held"), 0, "the task started while NetworkManager was busy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = status(&env);
    // UPower's change was read, so NetworkManager was asked while it could not answer.
    assert_eq!(s["power"]["on_battery"], true, "{s}");
    assert_eq!(s["network"]["metered"], true, "{s}");
    assert_eq!(task.info().await.unwrap().wait, Some(WaitReason::MeteredNetwork));
}

/// Before the desktop services first answer, a session that refuses metered networks does
/// not download: its task waits until NetworkManager's word is in (here "metered", and
/// UPower's silence makes that take 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_refused_on_a_metered_link_starts_before_the_desktop_answers() {
    let (env, bus) = metered_with_upower_hung();
    let _d = start(&env, &bus);
    let server = TestServer::start().await.unwrap();
    server.add("/m", Resource::generated(100_000, 13));
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.early").allows_metered(false), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(server.url("/m"))], true).await.unwrap().remove(0);
    let info = poll(&task, "held by its policy", &|i| i.wait == Some(WaitReason::MeteredNetwork)).await;
    assert_eq!(info.state, TaskState::Queued);
    assert_eq!(status(&env)["power"]["source"], "not asked yet", "created before the desktop answered");
    // The answer comes (metered): the task goes on waiting, and never reached the server.
    wait_status(&env, "the desktop's answer", |s| s["network"]["metered"] == true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(task.info().await.unwrap().wait, Some(WaitReason::MeteredNetwork));
    assert_eq!(server.requests().len(), 0, "the task downloaded before the desktop answered");
}

/// A task's own policy overrides its session's either way, is followed live (a running
/// task stops for it and goes on when it is lifted), and is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_own_policy_overrides_its_sessions() {
    let (env, bus) = desktop();
    let mut daemon = start(&env, &bus);
    let server = TestServer::start().await.unwrap();
    let len = 2 << 20;
    for (path, seed) in [("/a", 31), ("/b", 32), ("/e", 33)] {
        server.add(path, Resource::generated(len, seed).throttle(1 << 20));
    }
    set(&bus, NM, "Metered", "dbus.UInt32(1)");
    wait_status(&env, "metered", |s| s["network"]["metered"] == true);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.own").allows_metered(false), delegate).await.unwrap();
    let check = |events: &dlsession_testkit::app::Events, task: &dlsession::DownloadTask, seed: u64| {
        let file = events.moved_to(task.id()).unwrap();
        assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(seed, len)), "task {}", task.id());
    };

    // The session refuses the metered network; the task that allows it goes anyway.
    let requests =
        vec![DownloadRequest::new(server.url("/a")), DownloadRequest::new(server.url("/b")).allows_metered(true)];
    let mut tasks = session.download_tasks(requests, true).await.unwrap();
    let (b, a) = (tasks.pop().unwrap(), tasks.pop().unwrap());
    assert_eq!(events.completion(b.id(), LONG).await, None);
    check(&events, &b, 32);
    let waiting = poll(&a, "a waits", &|i| i.wait == Some(WaitReason::MeteredNetwork)).await;
    assert_eq!((waiting.state, waiting.bytes_received), (TaskState::Queued, 0), "a never started: {waiting:?}");
    let shown = String::from_utf8_lossy(&env.ctl(&["show", &a.id().to_string()]).stdout).into_owned();
    assert!(shown.contains("its own policy:    nothing (all as its session says)"), "{shown}");

    // A task that refuses the battery in a session that allows it stops when the
    // machine goes on battery, and goes on from where it was when its policy is lifted.
    let e = session.download_task(DownloadRequest::new(server.url("/e")).allows_battery(false)).await.unwrap();
    assert_eq!(e.policy().await.unwrap().own.allows_battery, Some(false));
    let out = env.ctl(&["policy", "--task", &e.id().to_string(), "--metered", "allow"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let human = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(human.contains("its own: --metered allow, --battery deny"), "{human}");
    e.resume().await.unwrap();
    poll(&e, "e downloads", &|i| i.bytes_received > 0).await;
    set(&bus, UPOWER, "OnBattery", "dbus.Boolean(True)");
    let held = poll(&e, "e waits for AC", &|i| i.wait == Some(WaitReason::OnBattery)).await;
    assert!(held.bytes_received > 0 && held.bytes_received < len, "{held:?}");
    let out = env.ctl(&["--json", "policy", "--task", &e.id().to_string(), "--battery", "inherit"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (json["allows_battery"].clone(), json["own"]["allows_battery"].clone()),
        (true.into(), serde_json::Value::Null),
        "{json}"
    );
    assert_eq!(events.completion(e.id(), LONG).await, None);
    check(&events, &e, 33);
    let detail: serde_json::Value =
        serde_json::from_slice(&env.ctl(&["--json", "show", &e.id().to_string()]).stdout).unwrap();
    assert_eq!(detail["attempts"], 2, "stopped once, resumed once: {detail}");

    // Given its own leave while it waits, the first task goes too.
    let out = env.ctl(&["policy", "--task", &a.id().to_string(), "--metered", "allow"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(events.completion(a.id(), LONG).await, None);
    check(&events, &a, 31);

    // Stored: a suspended task's policy survives a crash of the daemon.
    let f = session.download_task(DownloadRequest::new(server.url("/a")).discretionary(true)).await.unwrap();
    daemon.kill9();
    daemon.restart();
    let out = env.ctl(&["--json", "policy", "--task", &f.id().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["own"]["discretionary"], true, "{json}");
    assert_eq!(json["allows_metered"], false, "the session's, inherited: {json}");
    // Bad input: an unknown task, and `inherit` for a session.
    let out = env.ctl(&["policy", "--task", "999999", "--metered", "deny"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no live task 999999"));
    let out = env.ctl(&["policy", "t.own", "--metered", "inherit"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

/// An upload whose whole body went out is not stopped by a policy while its answer is
/// awaited (here the network turns metered): stopped, a POST's answer was thrown away and
/// the task failed with "may have reached the server" when it could go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_does_not_stop_an_upload_awaiting_its_answer() {
    use dlsession::{UploadMethod, UploadRequest};
    use dlsession_testkit::{UploadFaults, UploadServer};
    let (env, bus) = desktop();
    let _d = start(&env, &bus);
    let server = UploadServer::start(false).await.unwrap();
    server.set_faults(UploadFaults { answer_after: Some(Duration::from_secs(5)), ..UploadFaults::default() });
    let file = env.path().join("form.bin");
    std::fs::write(&file, vec![7u8; 100_000]).unwrap();
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.answer").allows_metered(false), delegate).await.unwrap();
    let request = UploadRequest::new(server.url("/files/form"), &file).method(UploadMethod::Post);
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
    let sent =
        poll(&task, "the whole body sent", &|i| i.upload.as_ref().is_some_and(|u| u.bytes_sent == 100_000)).await;
    assert_eq!(sent.state, TaskState::Running, "the answer is awaited");

    set(&bus, NM, "Metered", "dbus.UInt32(1)");
    wait_status(&env, "metered", |s| s["network"]["metered"] == true);
    assert_eq!(task.info().await.unwrap().state, TaskState::Running, "the daemon knew it metered before the answer");
    tokio::time::sleep(Duration::from_secs(5)).await;
    set(&bus, NM, "Metered", "dbus.UInt32(2)");
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(events.response(task.id()).map(|r| r.0), Some(201));
    assert_eq!(server.records().len(), 1);
}

/// The same upload, answered with a `307`: its body goes again, so the policy it was spared
/// while it waited applies now, and it waits for an unmetered network (before, it went on
/// uploading over the metered one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_sent_again_by_a_redirect_follows_the_policy_it_was_spared() {
    use dlsession::{UploadMethod, UploadRequest, WaitReason};
    use dlsession_testkit::{UploadFaults, UploadServer};
    let (env, bus) = desktop();
    let _d = start(&env, &bus);
    let server = UploadServer::start(false).await.unwrap();
    // Each body takes 2 s to read (far more than socket buffers hold: the second is still
    // being sent when the policy is looked at); the first is answered 307 two seconds later.
    server.set_faults(UploadFaults {
        rate: Some(8 << 20),
        answer_after: Some(Duration::from_secs(2)),
        redirect: Some((1, 307, "/files/moved".into())),
        ..UploadFaults::default()
    });
    let file = env.path().join("again.bin");
    let len = 16u64 << 20;
    std::fs::write(&file, vec![9u8; len as usize]).unwrap();
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.again").allows_metered(false), delegate).await.unwrap();
    let request = UploadRequest::new(server.url("/files/form"), &file).method(UploadMethod::Put);
    let task = session.upload_tasks(vec![request], true).await.unwrap().remove(0);
    poll(&task, "the whole body sent", &|i| i.upload.as_ref().is_some_and(|u| u.bytes_sent == len)).await;
    set(&bus, NM, "Metered", "dbus.UInt32(1)");
    wait_status(&env, "metered", |s| s["network"]["metered"] == true);
    assert_eq!(task.info().await.unwrap().state, TaskState::Running, "spared while it awaits the answer");
    let held = poll(&task, "held for an unmetered network after the 307", &|i| {
        i.state == TaskState::Queued && i.wait == Some(WaitReason::MeteredNetwork)
    })
    .await;
    assert!(held.upload.as_ref().is_some_and(|u| u.bytes_sent < len), "stopped while sending again: {held:?}");
    set(&bus, NM, "Metered", "dbus.UInt32(2)");
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(events.response(task.id()).map(|r| r.0), Some(201));
}
