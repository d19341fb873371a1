//! The real `dlsessionctl` binary against a real `dlsessiond` and a local HTTP server.
//!
//! `dlsessiond` must be built (`cargo build -p dlsessiond`; `cargo test --workspace`
//! builds it). The HTTP server runs in this process, so every blocking run of the CLI
//! goes through `spawn_blocking` to keep the server's runtime free.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlsession_testkit::{Resource, TestDaemon, TestEnv, TestServer, sha256_file};
use serde_json::Value;

struct Fixture {
    env: Arc<TestEnv>,
    _daemon: TestDaemon,
    server: TestServer,
}

async fn fixture() -> Fixture {
    let server = TestServer::start().await.expect("test server");
    let env = Arc::new(TestEnv::new());
    let daemon = tokio::task::block_in_place(|| TestDaemon::start(&env));
    Fixture { env, _daemon: daemon, server }
}

async fn ctl(env: &Arc<TestEnv>, args: &[&str]) -> Output {
    let env = Arc::clone(env);
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        env.ctl(&refs)
    })
    .await
    .expect("dlsessionctl run")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_exit(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "stdout:\n{}\nstderr:\n{}", stdout(o), stderr(o));
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

fn json_lines(o: &Output) -> Vec<Value> {
    stdout(o).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

#[track_caller]
fn assert_keys(v: &Value, keys: &[&str]) {
    for k in keys {
        assert!(v.get(k).is_some(), "missing {k:?} in {v}");
    }
}

/// Polls `show --json` until the task is completed; returns its JSON.
async fn wait_completed(env: &Arc<TestEnv>, id: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = ctl(env, &["--json", "show", &id.to_string()]).await;
        assert_exit(&o, 0);
        let v = json(&o);
        if v["state"] == "completed" {
            return v;
        }
        assert!(Instant::now() < deadline, "task {id} did not complete: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_wait_downloads_the_file() {
    let f = fixture().await;
    let resource = Resource::generated(300_000, 7);
    f.server.add("/data/a.bin", resource.clone());
    let dest = f.env.path().join("out.bin");
    let o = ctl(&f.env, &["get", &f.server.url("/data/a.bin"), "-o", dest.to_str().unwrap(), "--wait"]).await;
    assert_exit(&o, 0);
    assert_eq!(sha256_file(&dest).unwrap(), resource.sha256_hex());
    let out = stdout(&o);
    assert!(out.contains(&format!("-> {}", dest.display())), "{out}");
    assert!(out.contains("completed"), "{out}");
    // No escape codes when stderr is not a terminal.
    assert!(!o.stderr.contains(&0x1b), "{}", stderr(&o));

    // Its events were acknowledged: the session has nothing pending.
    let o = ctl(&f.env, &["--json", "sessions"]).await;
    assert_exit(&o, 0);
    let sessions = json(&o);
    let s = sessions.as_array().unwrap().iter().find(|s| s["identifier"] == "dlsessionctl").expect("session");
    assert_eq!(s["pending_events"], 0, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_json_lines_for_several_urls() {
    let f = fixture().await;
    let a = Resource::generated(10_000, 1);
    let b = Resource::bytes(&b"hello"[..]);
    f.server.add("/a.bin", a.clone());
    f.server.add("/dir/b%20c.txt", b.clone());
    let dir = f.env.path().join("dl");
    let o = ctl(
        &f.env,
        &[
            "--json",
            "get",
            &f.server.url("/a.bin"),
            &f.server.url("/dir/b%20c.txt"),
            "-d",
            dir.to_str().unwrap(),
            "--session",
            "org.example.cli",
            "--wait",
        ],
    )
    .await;
    assert_exit(&o, 0);
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 4, "{}", stdout(&o));
    for created in &lines[..2] {
        assert_keys(created, &["task", "session"]);
        assert_eq!(created["session"], "org.example.cli");
    }
    for done in &lines[2..] {
        assert_keys(done, &["task", "session", "state", "location", "error"]);
        assert_eq!(done["state"], "completed");
        assert_eq!(done["error"], Value::Null);
    }
    assert_eq!(sha256_file(&dir.join("a.bin")).unwrap(), a.sha256_hex());
    assert_eq!(sha256_file(&dir.join("b c.txt")).unwrap(), b.sha256_hex());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_of_a_missing_file_fails_with_http_status() {
    let f = fixture().await;
    let dest = f.env.path().join("missing.bin");
    let o = ctl(&f.env, &["get", &f.server.url("/nothing-here"), "-o", dest.to_str().unwrap(), "--wait"]).await;
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("http_status"), "{}", stderr(&o));
    assert!(!dest.exists());

    let o =
        ctl(&f.env, &["--json", "get", &f.server.url("/gone"), "-d", f.env.path().to_str().unwrap(), "--wait"]).await;
    assert_exit(&o, 1);
    let lines = json_lines(&o);
    let done = lines.last().unwrap();
    assert_eq!(done["error"]["code"], "http_status", "{done}");
    assert_eq!(done["error"]["http_status"], 404, "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_and_usage_errors() {
    let f = fixture().await;
    let o = ctl(&f.env, &["get", "file:///etc/passwd", "-o", f.env.path().join("p").to_str().unwrap()]).await;
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("error: unsupported_scheme: "), "{}", stderr(&o));

    let o = ctl(&f.env, &["get", "-o", "x", &f.server.url("/a"), &f.server.url("/b")]).await;
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("-o"), "{}", stderr(&o));

    for args in [
        &["status", "--no-such-flag"][..],
        &["tasks", "--state", "sleeping"],
        &["frobnicate"],
        &["get", "--header", "NoColon", "http://h/a"],
        &["get", "--launch-cmd", "app 'unbalanced", "http://h/a"],
        &["get", "--priority", "2", "http://h/a"],
        &["get"],
    ] {
        let o = ctl(&f.env, args).await;
        assert_exit(&o, 2);
    }

    let o = ctl(&f.env, &["show", "987654"]).await;
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("no_such_task"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_daemon_exits_3() {
    let env = Arc::new(TestEnv::new());
    let socket = env.path().join("nobody-listens.sock");
    let o = ctl(&env, &["--socket", socket.to_str().unwrap(), "status"]).await;
    assert_exit(&o, 3);
    let err = stderr(&o);
    assert!(err.contains("dlsessiond is not running"), "{err}");
    assert!(err.contains(socket.to_str().unwrap()), "{err}");
    assert!(err.contains("hint: start it with"), "{err}");

    // The default socket of an environment without a daemon.
    let o = ctl(&env, &["tasks"]).await;
    assert_exit(&o, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tasks_show_and_sessions_as_json() {
    let f = fixture().await;
    f.server.add("/s.bin", Resource::generated(50_000, 3));
    let dest = f.env.path().join("s.bin");
    let o = ctl(&f.env, &["--json", "get", &f.server.url("/s.bin"), "-o", dest.to_str().unwrap()]).await;
    assert_exit(&o, 0);
    let id = json_lines(&o)[0]["task"].as_u64().unwrap();
    wait_completed(&f.env, id).await;

    let o = ctl(&f.env, &["--json", "status"]).await;
    assert_exit(&o, 0);
    let status = json(&o);
    assert_keys(
        &status,
        &[
            "daemon_version",
            "protocol_version",
            "pid",
            "uptime_ms",
            "socket",
            "state_dir",
            "cache_dir",
            "database",
            "tasks",
            "sessions",
            "connections",
            "download_rate",
            "bytes_downloaded",
        ],
    );
    assert_keys(&status["tasks"], &["suspended", "queued", "running", "waiting", "completed"]);

    let o = ctl(&f.env, &["--json", "tasks", "--state", "completed"]).await;
    assert_exit(&o, 0);
    let tasks = json(&o);
    let t = tasks.as_array().unwrap().iter().find(|t| t["id"] == id).expect("task listed");
    assert_keys(t, &["id", "session", "state", "url", "bytes_received", "bytes_expected", "location", "error"]);
    assert_eq!(t["session"], "dlsessionctl");
    assert_eq!(t["bytes_received"], 50_000);
    assert_eq!(t["location"], dest.to_str().unwrap());
    assert_eq!(t["error"], Value::Null);

    let o = ctl(&f.env, &["--json", "tasks", "--state", "running"]).await;
    assert_exit(&o, 0);
    assert!(json(&o).as_array().unwrap().iter().all(|t| t["id"] != id));

    let o = ctl(&f.env, &["--json", "show", &id.to_string()]).await;
    assert_exit(&o, 0);
    let detail = json(&o);
    assert_keys(&detail, &["id", "state", "url", "response_status", "response_headers", "attempts", "destination"]);
    assert_eq!(detail["response_status"], 200);

    let o = ctl(&f.env, &["--json", "sessions"]).await;
    assert_exit(&o, 0);
    let sessions = json(&o);
    let s = sessions.as_array().unwrap().iter().find(|s| s["identifier"] == "dlsessionctl").expect("session");
    assert_keys(s, &["identifier", "app_id", "attached", "pending_events", "tasks", "next_wake"]);
    assert_eq!(s["attached"], false);
    assert_eq!(s["pending_events"], 2, "finished_downloading and completed wait: {s}");

    // The human forms work too.
    for args in [&["status"][..], &["tasks"], &["sessions"], &["show", &id.to_string()]] {
        let o = ctl(&f.env, args).await;
        assert_exit(&o, 0);
        assert!(!o.stdout.is_empty());
    }
    let o = ctl(&f.env, &["tasks"]).await;
    assert!(stdout(&o).starts_with("ID"), "{}", stdout(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_cancel() {
    let f = fixture().await;
    f.server.add("/slow.bin", Resource::generated(2_000_000, 5).throttle(100_000));
    let dest = f.env.path().join("slow.bin");
    let o = ctl(&f.env, &["--json", "get", &f.server.url("/slow.bin"), "-o", dest.to_str().unwrap()]).await;
    assert_exit(&o, 0);
    let id = json_lines(&o)[0]["task"].as_u64().unwrap().to_string();

    let o = ctl(&f.env, &["pause", &id]).await;
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).trim(), format!("task {id} paused"));
    let o = ctl(&f.env, &["--json", "show", &id]).await;
    assert_eq!(json(&o)["state"], "suspended");
    assert_eq!(json(&o)["wait"]["reason"], "suspended");

    let o = ctl(&f.env, &["--json", "resume", &id]).await;
    assert_exit(&o, 0);
    assert_eq!(json(&o), serde_json::json!({"task": id.parse::<u64>().unwrap(), "action": "resume", "ok": true}));

    let o = ctl(&f.env, &["cancel", &id]).await;
    assert_exit(&o, 0);
    let done = wait_completed(&f.env, id.parse().unwrap()).await;
    assert_eq!(done["error"]["code"], "cancelled", "{done}");

    // Nothing is active any more: watch returns at once.
    let started = Instant::now();
    let o = ctl(&f.env, &["watch"]).await;
    assert_exit(&o, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_a_download_to_its_end() {
    let f = fixture().await;
    f.server.add("/w.bin", Resource::generated(400_000, 9).throttle(400_000));
    let dest = f.env.path().join("w.bin");
    let o = ctl(&f.env, &["get", &f.server.url("/w.bin"), "-o", dest.to_str().unwrap()]).await;
    assert_exit(&o, 0);
    let o = ctl(&f.env, &["--json", "watch"]).await;
    assert_exit(&o, 0);
    let lines = json_lines(&o);
    assert!(lines.iter().all(|l| l["event"] == "task" || l["event"] == "progress"), "{}", stdout(&o));
    let last_task = lines.iter().rev().find(|l| l["event"] == "task").expect("a task update");
    assert_eq!(last_task["state"], "completed", "{}", stdout(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_delivers_and_moves_files() {
    let f = fixture().await;
    let resource = Resource::generated(20_000, 11);
    f.server.add("/files/report.pdf", resource.clone());
    let o = ctl(
        &f.env,
        &[
            "--json",
            "get",
            &f.server.url("/files/report.pdf"),
            "-d",
            f.env.path().join("first").to_str().unwrap(),
            "--session",
            "org.example.attach",
            "--app-id",
            "org.example.app",
            "--launch-cmd",
            "/bin/true --flag 'two words'",
        ],
    )
    .await;
    assert_exit(&o, 0);
    let id = json_lines(&o)[0]["task"].as_u64().unwrap();
    wait_completed(&f.env, id).await;

    // A file of the same name is already there: the moved one gets a suffix.
    let keep = f.env.path().join("keep");
    std::fs::create_dir_all(&keep).unwrap();
    std::fs::write(keep.join("report.pdf"), b"older").unwrap();
    let o = ctl(&f.env, &["--json", "attach", "org.example.attach", "--move-to", keep.to_str().unwrap()]).await;
    assert_exit(&o, 0);
    let lines = json_lines(&o);
    let names: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(names, ["finished_downloading", "completed", "finished_events"], "{}", stdout(&o));
    assert_eq!(lines[0]["task"], id);
    let moved = keep.join("report (1).pdf");
    assert_eq!(lines[0]["location"], moved.to_str().unwrap());
    assert_eq!(sha256_file(&moved).unwrap(), resource.sha256_hex());
    assert_eq!(std::fs::read(keep.join("report.pdf")).unwrap(), b"older");
    assert_eq!(lines[1]["error"], Value::Null);

    // The configuration set by `get` survived the attach.
    let o = ctl(&f.env, &["--json", "sessions"]).await;
    let sessions = json(&o);
    let s = sessions.as_array().unwrap().iter().find(|s| s["identifier"] == "org.example.attach").unwrap();
    assert_eq!(s["app_id"], "org.example.app");
    assert_eq!(s["launch"]["argv"], serde_json::json!(["/bin/true", "--flag", "two words"]));
    assert_eq!(s["pending_events"], 0);

    // Everything was acknowledged: a second attach has nothing to deliver.
    let o = ctl(&f.env, &["attach", "org.example.attach"]).await;
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).lines().collect::<Vec<_>>(), ["finished_events: every event was delivered"]);

    let o = ctl(&f.env, &["--json", "wake", "org.example.attach"]).await;
    assert_exit(&o, 0);
    assert_keys(&json(&o), &["session", "outcome"]);
}

#[test]
fn help_is_there_for_every_command() {
    let exe = Path::new(env!("CARGO_BIN_EXE_dlsessionctl"));
    for cmd in ["status", "sessions", "tasks", "show", "get", "watch", "pause", "resume", "cancel", "attach", "wake"] {
        let o = std::process::Command::new(exe).args([cmd, "--help"]).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{cmd}");
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage: dlsessionctl"), "{cmd}");
    }
}
