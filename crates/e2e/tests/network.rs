//! Following the network (docs/behaviour.md, "The network"): the server sits in its own
//! network namespace behind a veth link; the tests take the link down and bring it back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::BufRead;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use dlsession::{DownloadRequest, Session, TaskState, WaitReason};
use dlsession_testkit::app::config;
use dlsession_testkit::mount::require_root;
use dlsession_testkit::netns::NetNs;
use dlsession_testkit::{LONG, Recorder, TestDaemon, TestEnv, bin_path, sha256_file};

/// `dlsession-serve` inside the namespace: its URL and the content's SHA-256.
struct Server {
    child: Child,
    url: String,
    sha256: String,
}

impl Server {
    fn start(ns: &NetNs, mib: u64, rate: u64) -> Server {
        Server::start_at(ns, &ns.ns_ip.to_string(), mib, rate)
    }

    /// On `bind` (`IP` or `IP:PORT`) inside the namespace.
    fn start_at(ns: &NetNs, bind: &str, mib: u64, rate: u64) -> Server {
        let mut child = ns.spawn(&bin_path("dlsession-serve"), &["--bind", bind, &mib.to_string(), &rate.to_string()]);
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let url = lines.next().unwrap().unwrap();
        let sha256 = lines.next().unwrap().unwrap();
        Server { child, url, sha256 }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The task's `attempts`, as `dlsessionctl show` reports them.
fn attempts(env: &TestEnv, task: u64) -> u64 {
    let out = env.ctl(&["--json", "show", &task.to_string()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["attempts"].as_u64().unwrap()
}

async fn poll<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(dlsession_root), ignore = "needs root to make a network namespace; CI runs it as root")]
async fn a_download_waits_for_the_network_and_goes_on_the_moment_it_returns() {
    require_root();
    let ns = NetNs::new(71);
    let server = Server::start(&ns, 12, 2 << 20);
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.net"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(&server.url)], true).await.unwrap().remove(0);
    poll("the download to get going", LONG, async || {
        (task.info().await.unwrap().bytes_received > 1 << 20).then_some(())
    })
    .await;

    // The route goes: the task stops at once (not after the 60 s stall timeout) and waits.
    ns.link_down();
    let gone = Instant::now();
    let held = poll("no_network", Duration::from_secs(10), async || {
        let info = task.info().await.unwrap();
        matches!(info.wait, Some(WaitReason::NoNetwork { .. })).then_some(info)
    })
    .await;
    let noticed = gone.elapsed();
    assert_eq!(held.state, TaskState::Waiting);
    let spent = attempts(&env, task.id());
    // A long outage spends nothing: no attempt, no backoff. (`DLSESSION_OUTAGE_SECS` makes
    // it longer, to measure by hand: 90 s, 600 s.)
    let outage = std::env::var("DLSESSION_OUTAGE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    tokio::time::sleep(Duration::from_secs(outage)).await;
    let still = task.info().await.unwrap();
    assert!(matches!(still.wait, Some(WaitReason::NoNetwork { .. })), "{still:?}");
    assert_eq!(attempts(&env, task.id()), spent, "no attempt while there is no route");

    // The route comes back: the download goes on from where it was.
    ns.link_up();
    let back = Instant::now();
    let before = still.bytes_received;
    poll("bytes after the network came back", Duration::from_secs(10), async || {
        (task.info().await.unwrap().bytes_received > before).then_some(())
    })
    .await;
    let resumed = back.elapsed();
    eprintln!(
        "route gone noticed in {noticed:?}; after {outage} s without it, moving again {resumed:?} after the link came back"
    );
    assert!(resumed < Duration::from_secs(5), "resumed {resumed:?} after the link came back");
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let file = events.moved_to(task.id()).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), server.sha256);
    assert_eq!(attempts(&env, task.id()), spent + 1, "one attempt after the outage, from the offset kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(dlsession_root), ignore = "needs root to make a network namespace; CI runs it as root")]
async fn a_task_started_without_a_route_waits_instead_of_backing_off() {
    require_root();
    let ns = NetNs::new(72);
    let server = Server::start(&ns, 1, 0);
    ns.link_down();
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.net2"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(&server.url)], true).await.unwrap().remove(0);
    poll("no_network", Duration::from_secs(10), async || {
        matches!(task.info().await.unwrap().wait, Some(WaitReason::NoNetwork { .. })).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(attempts(&env, task.id()), 1, "the one attempt that found no route, no retries");
    let shown = env.ctl(&["show", &task.id().to_string()]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("no route to the server since"), "{text}");
    ns.link_up();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), server.sha256);
}

/// A network without a default route (a LAN, or only loopback): a server named by a host
/// name that refuses the connection has an address with a route (what its name resolved
/// to), so the task backs off and tries again. Before, no response had told the daemon an
/// address, the name counted as unreachable, and the task waited for a route change that
/// never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(dlsession_root), ignore = "needs root to make a network namespace; CI runs it as root")]
async fn a_named_server_that_refuses_on_a_network_without_a_default_route_is_tried_again() {
    require_root();
    let ns = NetNs::new(75);
    let env = TestEnv::new();
    // The daemon inside the namespace: loopback and the link, no default route.
    let _d = TestDaemon::start_in(&env, &ns);
    // A port nothing listens on (a server's, stopped), named through `localhost`.
    let stopped = Server::start_at(&ns, "127.0.0.1:0", 1, 0).url.clone();
    let port: u16 = stopped.trim_start_matches("http://127.0.0.1:").split('/').next().unwrap().parse().unwrap();
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.lan"), delegate).await.unwrap();
    let url = format!("http://localhost:{port}/sample.bin");
    let task = session.download_tasks(vec![DownloadRequest::new(&url)], true).await.unwrap().remove(0);
    let wait = poll("the refused attempt to be retried", Duration::from_secs(10), async || {
        let info = task.info().await.unwrap();
        (info.wait.is_some() && attempts(&env, task.id()) >= 2).then_some(info.wait)
    })
    .await;
    assert!(!matches!(wait, Some(WaitReason::NoNetwork { .. })), "{wait:?}");
    let server = Server::start_at(&ns, &format!("127.0.0.1:{port}"), 1, 0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), server.sha256);
}

/// A network that flaps (a default route that goes and comes back again and again) retries
/// the tasks backing off after network errors once, not on every return, and keeps their
/// backoff: before, each return retried them all and started their backoff afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(dlsession_root), ignore = "needs root to make a network namespace; CI runs it as root")]
async fn a_flapping_network_does_not_retry_backing_off_tasks_on_every_return() {
    require_root();
    let ns = NetNs::new(77);
    ns.add_default_route();
    let env = TestEnv::new();
    // The daemon inside the namespace, online through the link.
    let d = TestDaemon::start_in(&env, &ns);
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.flap"), delegate).await.unwrap();
    // This side of the link, a port nothing listens on: refused, backed off from.
    let url = format!("http://{}:9/flap.bin", ns.host_ip);
    let task = session.download_tasks(vec![DownloadRequest::new(&url)], true).await.unwrap().remove(0);
    // Backed off far enough (100 ms doubling, in tests) that its own timer adds at most
    // one attempt while the network flaps.
    poll("refused attempts backing off", Duration::from_secs(30), async || {
        (attempts(&env, task.id()) >= 6).then_some(())
    })
    .await;
    let before = attempts(&env, task.id());
    for _ in 0..5 {
        ns.del_default_route();
        tokio::time::sleep(Duration::from_millis(200)).await;
        ns.add_default_route();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let during = attempts(&env, task.id()) - before;
    assert!(during <= 2, "{during} attempts while the network flapped five times in 2.5 s");
    // The returns were seen (else no retry would be no proof): the later ones held back.
    assert!(d.log().contains("the network came back again soon"), "{}", d.log());
}

/// A server on the LAN (an address with a route, no default route) redirects to one the
/// network cannot reach: the attempt that gets no answer went to the redirect's address,
/// which has no route, so the task waits for the network instead of backing off as if the
/// LAN server had failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(dlsession_root), ignore = "needs root to make a network namespace; CI runs it as root")]
async fn a_redirect_to_an_unreachable_server_waits_for_the_network() {
    require_root();
    let ns = NetNs::new(76);
    let env = TestEnv::new();
    let _d = TestDaemon::start_in(&env, &ns);
    // This side of the link is the LAN server; 203.0.113.0/24 (TEST-NET-3) has no route
    // inside the namespace.
    let lan = dlsession_testkit::TestServer::start_on(ns.host_ip).await.unwrap();
    let away = "http://203.0.113.7/file".to_owned();
    lan.add(
        "/r",
        dlsession_testkit::Resource::bytes("")
            .fault(dlsession_testkit::Hits::All, dlsession_testkit::Fault::Redirect { status: 302, location: away }),
    );
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.away"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(lan.url("/r"))], true).await.unwrap().remove(0);
    poll("no_network", Duration::from_secs(10), async || {
        matches!(task.info().await.unwrap().wait, Some(WaitReason::NoNetwork { .. })).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(attempts(&env, task.id()), 1, "waits, no retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(dlsession_root), ignore = "needs root to make a network namespace; CI runs it as root")]
async fn a_session_that_does_not_wait_for_connectivity_fails_fast() {
    require_root();
    let ns = NetNs::new(73);
    let server = Server::start(&ns, 1, 0);
    ns.link_down();
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.fast").waits_for_connectivity(false), delegate).await.unwrap();
    let started = Instant::now();
    let task = session.download_tasks(vec![DownloadRequest::new(&server.url)], true).await.unwrap().remove(0);
    let error = events.completion(task.id(), LONG).await.expect("completes with an error");
    assert_eq!(error.code, dlsession::ErrorCode::NotConnected, "{error}");
    assert!(started.elapsed() < Duration::from_secs(10), "at once, not after retries: {:?}", started.elapsed());
    assert_eq!(attempts(&env, task.id()), 1);
    let policy = String::from_utf8_lossy(&env.ctl(&["policy", "t.fast"]).stdout).into_owned();
    assert!(policy.contains("fails at once without a network"), "{policy}");
}

/// With `idle_exit_ms` a socket-activated daemon exits when it has nothing to do; a task
/// waiting for the network is something to do (no connection would start the daemon
/// again when the route returns): it stays, and the download ends when the link is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(dlsession_root), ignore = "needs root to make a network namespace; CI runs it as root")]
async fn a_task_waiting_for_the_network_keeps_an_idle_daemon_up() {
    require_root();
    // A tag no other test here uses: tests run at once, and a tag names the namespace,
    // its links and its subnet.
    let ns = NetNs::new(74);
    let server = Server::start(&ns, 1, 0);
    ns.link_down();
    let env = TestEnv::new();
    env.set_config("idle_exit_ms", "300");
    let log = env.path().join("activated.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut cmd = env.command("systemd-socket-activate");
    cmd.arg("-l").arg(&env.socket);
    for (k, v) in env.vars() {
        cmd.arg("-E").arg(format!("{k}={}", v.to_string_lossy()));
    }
    cmd.arg("-E").arg("DLSESSIOND_LOG=info,dlsessiond=debug").arg(bin_path("dlsessiond"));
    let mut child = cmd.stdin(Stdio::null()).stdout(log_file.try_clone().unwrap()).stderr(log_file).spawn().unwrap();
    // Listening a moment after the socket's file appears.
    poll("the activation socket", Duration::from_secs(10), async || env.socket.exists().then_some(())).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dest = env.path().join("later.bin");
    {
        let (delegate, _events) = Recorder::new(&env.path().join("out"));
        let session = Session::attach(config(&env, "t.net-idle"), delegate).await.unwrap();
        let task = session
            .download_tasks(vec![DownloadRequest::new(&server.url).destination(&dest)], true)
            .await
            .unwrap()
            .remove(0);
        poll("no_network", Duration::from_secs(10), async || {
            matches!(task.info().await.unwrap().wait, Some(WaitReason::NoNetwork { .. })).then_some(())
        })
        .await;
    }
    // No client, nothing running, no timer: only the task waiting for its route.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(child.try_wait().unwrap().is_none(), "the daemon left while a task waited for the network: {text}");
    ns.link_up();
    poll("the download, with nobody connected", Duration::from_secs(20), async || dest.exists().then_some(())).await;
    assert_eq!(sha256_file(&dest).unwrap(), server.sha256);
    // Then it has nothing left to do, and goes.
    let status = poll("the idle exit", Duration::from_secs(20), async || child.try_wait().unwrap()).await;
    assert!(status.success(), "{status}");
}
