//! The real `dlsessionctl` binary against a real `dlsessiond` and a local HTTP server.
//!
//! `dlsessiond` must be built (`cargo build -p dlsessiond`; `cargo test --workspace`
//! builds it). The HTTP server runs in this process, so every blocking run of the CLI
//! goes through `spawn_blocking` to keep the server's runtime free.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlsession::Client;
use dlsession_proto::{Request, Response, TaskSpec};
use dlsession_testkit::app::client;
use dlsession_testkit::cli::{
    assert_exit, assert_keys, ctl, ctl_env, ctl_pty, json, json_lines, sh_quote, show_field, stderr, stdout,
    table_cells, task_row,
};
use dlsession_testkit::{Fault, Hits, Resource, TestDaemon, TestEnv, TestServer, bin_path, sha256_file};
use serde_json::Value;

struct Fixture {
    env: Arc<TestEnv>,
    daemon: TestDaemon,
    server: TestServer,
}

async fn fixture() -> Fixture {
    fixture_with(|_| {}).await
}

/// A fixture whose environment is adjusted (e.g. its config) before the daemon starts.
async fn fixture_with(setup: impl FnOnce(&TestEnv)) -> Fixture {
    let server = TestServer::start().await.expect("test server");
    let env = TestEnv::new();
    setup(&env);
    let env = Arc::new(env);
    let daemon = tokio::task::block_in_place(|| TestDaemon::start(&env));
    Fixture { env, daemon, server }
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

/// With `retired_history_days = 0` a task's record goes when it retires; by default
/// `show` still finds it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_history_is_pruned_as_configured() {
    for (days, kept) in [(None, true), (Some("0"), false)] {
        let f = fixture_with(|env| {
            if let Some(days) = days {
                env.set_config("retired_history_days", days);
            }
        })
        .await;
        f.server.add("/h.bin", Resource::generated(1000, 3));
        let dest = f.env.path().join("h.bin");
        let o = ctl(&f.env, &["--json", "get", &f.server.url("/h.bin"), "-o", dest.to_str().unwrap(), "--wait"]).await;
        assert_exit(&o, 0);
        let id = json_lines(&o)[0]["task"].as_u64().expect("task id");
        // Retirement is committed with the acknowledgement `get --wait` sends before it exits.
        let o = ctl(&f.env, &["--json", "show", &id.to_string()]).await;
        if kept {
            assert_exit(&o, 0);
            assert_eq!(json(&o)["state"], "completed");
        } else {
            assert_exit(&o, 1);
            assert!(stderr(&o).contains("no_such_task"), "{}", stderr(&o));
        }
    }
}

/// A daemon that exits while `get` starts it: the error says what the daemon said last,
/// not only that its log has the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_fails_to_start_says_why_in_the_error() {
    let env = Arc::new(TestEnv::new());
    let fake = env.path().join("fake-dlsessiond");
    std::fs::write(&fake, "#!/bin/sh\necho 'starting'\necho 'error: the reason it cannot start' >&2\nexit 1\n")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dest = env.path().join("never-written");
    let args = ["get", "http://127.0.0.1:9/a.bin", "-o", dest.to_str().unwrap()];
    let o = ctl_env(&env, &args, &[("DLSESSIOND_PATH", fake.to_str().unwrap())]).await;
    assert_exit(&o, 3);
    let err = stderr(&o);
    assert!(err.contains("exited during start-up (exit status: 1): error: the reason it cannot start; see "), "{err}");
}

/// `show` of a task a 404 failed: its response status is the 404, and a completed task has
/// no resource deadline left (it showed `-` and "in 6 d 23 h").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_of_a_failed_task_says_its_status_and_no_deadline() {
    let f = fixture().await;
    let dest = f.env.path().join("gone.bin");
    let o = ctl(&f.env, &["--json", "get", &f.server.url("/gone.bin"), "-o", dest.to_str().unwrap(), "--wait"]).await;
    assert_exit(&o, 1);
    let id = json_lines(&o)[0]["task"].as_u64().expect("task id");
    let o = ctl(&f.env, &["show", &id.to_string()]).await;
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert_eq!(show_field(&out, "response status"), "404", "{out}");
    assert_eq!(show_field(&out, "resource deadline"), "-", "{out}");
}

/// A session or task that does not exist is an error with nothing on stdout, not an empty
/// answer: `tasks --json` printed `[]` before failing, `limit` read "none" with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_does_not_exist_is_an_error_not_an_empty_answer() {
    let f = fixture().await;
    let asks: [&[&str]; 4] = [
        &["--json", "tasks", "--session", "nosuch"],
        &["limit", "--session", "nosuch"],
        &["--json", "limit", "--session", "nosuch"],
        &["limit", "--task", "999999"],
    ];
    for args in asks {
        let o = ctl(&f.env, args).await;
        assert_exit(&o, 1);
        assert_eq!(stdout(&o), "", "{args:?}");
        assert!(stderr(&o).contains("no_such_"), "{args:?}: {}", stderr(&o));
    }
    // A task in the history only has no limit to show, as it has none to set.
    f.server.add("/done.bin", Resource::generated(100, 2));
    let dest = f.env.path().join("done.bin");
    let o = ctl(&f.env, &["--json", "get", &f.server.url("/done.bin"), "-o", dest.to_str().unwrap(), "--wait"]).await;
    assert_exit(&o, 0);
    let id = json_lines(&o)[0]["task"].as_u64().expect("task id").to_string();
    for set in [None, Some("1MiB")] {
        let o = ctl(&f.env, &["limit", "--task", &id].into_iter().chain(set).collect::<Vec<_>>()).await;
        assert_exit(&o, 1);
        assert!(stderr(&o).contains("no_such_task"), "{set:?}: {}", stderr(&o));
    }
}

/// An operator removes a session: one `attach` made by mistake, and one with tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_has_a_session_removed() {
    let f = fixture().await;
    let o = ctl(&f.env, &["invalidate", "nosuch"]).await;
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("no_such_session"), "{}", stderr(&o));
    let sessions = |o: &Output| json(o).as_array().unwrap().iter().map(|s| s["identifier"].clone()).collect::<Vec<_>>();

    // A typo in `attach` made an empty session; invalidating it and collecting its last
    // event removes it.
    let o = ctl(&f.env, &["attach", "com.exmaple.typo"]).await;
    assert_exit(&o, 0);
    let o = ctl(&f.env, &["invalidate", "com.exmaple.typo"]).await;
    assert_exit(&o, 0);
    assert_eq!(
        stdout(&o).trim(),
        "com.exmaple.typo: is invalid: `dlsessionctl attach com.exmaple.typo` collects its events \
         (add --move-to DIR to keep files left in the cache), then the daemon removes it"
    );
    let o = ctl(&f.env, &["attach", "com.exmaple.typo"]).await;
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("did_become_invalid"), "{}", stdout(&o));
    assert!(!sessions(&ctl(&f.env, &["--json", "sessions"]).await).contains(&"com.exmaple.typo".into()));

    // Suspended tasks hold the session back, and it takes no new task; --cancel ends them.
    let c = client(&f.env).await;
    let ids = create_suspended(&c, "s.gone", [f.server.url("/a"), f.server.url("/b")]).await;
    let o = ctl(&f.env, &["invalidate", "s.gone"]).await;
    assert_exit(&o, 0);
    assert!(
        stdout(&o).starts_with(
            "s.gone: invalidating, takes no new task; 2 unfinished tasks (2 suspended: resume or cancel them, \
             or invalidate with --cancel); once they complete, `dlsessionctl attach s.gone` collects"
        ),
        "{}",
        stdout(&o)
    );
    let o = ctl(&f.env, &["get", "--session", "s.gone", &f.server.url("/c")]).await;
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("session_invalidated"), "{}", stderr(&o));
    let o = ctl(&f.env, &["invalidate", "--cancel", "s.gone"]).await;
    assert_exit(&o, 0);
    assert!(stdout(&o).starts_with("s.gone: is invalid: "), "{}", stdout(&o));
    for id in &ids {
        let v = wait_completed(&f.env, *id).await;
        assert!(v["error"]["message"].as_str().unwrap().contains("invalidate_and_cancel"), "{v}");
    }
    // Asking again is no failure; --json gives the session as `sessions --json` does.
    let o = ctl(&f.env, &["--json", "invalidate", "s.gone"]).await;
    assert_exit(&o, 0);
    let v = json(&o);
    assert_eq!((v["identifier"].as_str(), v["invalidating"].as_bool()), (Some("s.gone"), Some(true)), "{v}");
    assert_eq!(v["pending_events"], 3, "two completions and did_become_invalid: {v}");
    let o = ctl(&f.env, &["attach", "s.gone"]).await;
    assert_exit(&o, 0);
    assert!(!sessions(&ctl(&f.env, &["--json", "sessions"]).await).contains(&"s.gone".into()));
    let v = json(&ctl(&f.env, &["--json", "show", &ids[0].to_string()]).await);
    assert_eq!(v["session"], "s.gone (invalidated)", "{v}");
    assert_eq!(f.server.hits("/a") + f.server.hits("/b") + f.server.hits("/c"), 0);
}

/// A destination whose directory does not exist, or cannot be written, is refused before a
/// task is made (exit 1, `file_error`): the unwritable one was taken, downloaded, and its
/// file waited in the cache for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_refuses_a_directory_it_cannot_save_in() {
    let f = fixture().await;
    f.server.add("/a.bin", Resource::generated(1000, 5));
    let dir = f.env.path().join("readonly");
    // Root writes through modes: a read-only mount stops it too.
    let _mount = if dlsession_testkit::host::is_root() {
        Some(dlsession_testkit::Mount::tmpfs(&dir, "size=1m,ro"))
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).unwrap();
        None
    };
    let missing = f.env.path().join("missing");
    for (dir, why) in [(&dir, "cannot write in"), (&missing, "does not exist")] {
        let dest = dir.join("a.bin");
        let o = ctl(&f.env, &["get", &f.server.url("/a.bin"), "-o", dest.to_str().unwrap()]).await;
        assert_exit(&o, 1);
        let err = stderr(&o);
        assert!(err.contains("file_error") && err.contains(why), "{err}");
    }
    assert_eq!(f.server.hits("/a.bin"), 0, "no task was made");
}

/// `get --wait` on a pipe says why a task waits, once per reason: two failures with the
/// same error give one line. Before, a pipe heard nothing until the task ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_wait_says_why_a_task_waits() {
    let f = fixture_with(|env| env.set_config("retry_initial_ms", "100")).await;
    let busy = Fault::Status { code: 500, retry_after: None };
    f.server.add("/busy.bin", Resource::generated(1000, 4).fault(Hits::First(2), busy));
    let dest = f.env.path().join("busy.bin");
    let o = ctl(&f.env, &["get", &f.server.url("/busy.bin"), "-o", dest.to_str().unwrap(), "--wait"]).await;
    assert_exit(&o, 0);
    let err = stderr(&o);
    let said: Vec<&str> = err.lines().filter(|l| l.contains(" waits: backing off after attempt")).collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(said[0].contains("last error: http_status: server answered 500"), "{err}");
    assert_eq!(f.server.hits("/busy.bin"), 3);
}

/// `retired_history_max` holds while the daemon runs, not only at its next start or hour:
/// the history is pruned as tasks retire once a tenth of the cap retired since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_history_is_capped_while_the_daemon_runs() {
    let f = fixture_with(|env| env.set_config("retired_history_max", "1")).await;
    f.server.add("/h.bin", Resource::generated(1000, 3));
    let mut ids = Vec::new();
    for name in ["a.bin", "b.bin"] {
        let dest = f.env.path().join(name);
        let o = ctl(&f.env, &["--json", "get", &f.server.url("/h.bin"), "-o", dest.to_str().unwrap(), "--wait"]).await;
        assert_exit(&o, 0);
        ids.push(json_lines(&o)[0]["task"].as_u64().expect("task id"));
    }
    // The prune runs beside the acknowledgement's commit: give it a moment.
    let shown = |id: u64| {
        let env = &f.env;
        async move { ctl(env, &["show", &id.to_string()]).await.status.code() }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while shown(ids[0]).await != Some(1) {
        assert!(std::time::Instant::now() < deadline, "the older task is still in the history past its cap");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(shown(ids[1]).await, Some(0), "the newest retired task stays");
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

    // Both tasks' events were acknowledged together and the tasks retired.
    let o = ctl(&f.env, &["--json", "sessions"]).await;
    assert_exit(&o, 0);
    let sessions = json(&o);
    let s = sessions.as_array().unwrap().iter().find(|s| s["identifier"] == "org.example.cli").expect("session");
    assert_eq!(s["pending_events"], 0, "{s}");
    let o = ctl(&f.env, &["--json", "tasks", "--session", "org.example.cli"]).await;
    assert_exit(&o, 0);
    assert_eq!(json(&o).as_array().map(Vec::len), Some(0), "{}", stdout(&o));
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

    // Mistakes said as what they are, before the daemon is asked.
    let bare = f.server.url("/a").replacen("http://", "", 1);
    let file = f.env.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let new_dir = format!("{}/", f.env.path().join("new-dir").display());
    let cases: [(&[&str], i32, &str); 5] = [
        (&["get", &bare], 2, "is not a URL: write http://"),
        (&["get", "localhost:1/x"], 2, "is not a URL: write http://"),
        // Not a host: the daemon's refusal, no suggestion.
        (&["get", "/tmp/x"], 1, "error: "),
        (&["get", &f.server.url("/a"), "-d", file.to_str().unwrap()], 1, "is not a directory"),
        (&["get", &f.server.url("/a"), "-o", &new_dir], 2, "names a directory that does not exist"),
    ];
    for (args, code, says) in cases {
        let o = ctl(&f.env, args).await;
        assert_exit(&o, code);
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }

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

    // A refused get leaves an existing session's configuration as it was.
    let dest = f.env.path().join("kept.bin");
    let o = ctl(
        &f.env,
        &["get", &f.server.url("/a"), "-o", dest.to_str().unwrap(), "--session", "s.kept", "--launch-cmd", "/bin/true"],
    )
    .await;
    assert_exit(&o, 0);
    let o = ctl(
        &f.env,
        &[
            "get",
            "file:///etc/passwd",
            "--session",
            "s.kept",
            "--launch-cmd",
            "/bin/false",
            "-o",
            dest.to_str().unwrap(),
        ],
    )
    .await;
    assert_exit(&o, 1);
    let o = ctl(&f.env, &["--json", "sessions"]).await;
    let sessions = json(&o);
    let kept = sessions.as_array().unwrap().iter().find(|s| s["identifier"] == "s.kept").unwrap();
    assert_eq!(kept["launch"]["argv"], serde_json::json!(["/bin/true"]), "{kept}");

    // A URL too long for any request is refused as a bad URL, not as an internal error.
    let list = f.env.path().join("long-url.txt");
    std::fs::write(&list, format!("{}\n{}/{}\n", f.server.url("/a"), f.server.url("/b"), "x".repeat(1 << 20))).unwrap();
    let dir = f.env.path().join("long-url");
    let o = ctl(&f.env, &["get", "-i", list.to_str().unwrap(), "-d", dir.to_str().unwrap()]).await;
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("error: invalid_url: task 2 of the batch is too large"), "{}", stderr(&o));

    // A destination that is not UTF-8 is a usage error, not a panic before clap (exit 101).
    use std::os::unix::ffi::OsStrExt;
    let env = Arc::clone(&f.env);
    let url = f.server.url("/a");
    let o = tokio::task::spawn_blocking(move || {
        let mut dest = env.path().as_os_str().to_owned();
        dest.push(std::ffi::OsStr::from_bytes(b"/\xff.bin"));
        env.command(bin_path("dlsessionctl")).arg("get").arg(&url).arg("-o").arg(dest).output().unwrap()
    })
    .await
    .unwrap();
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("not valid UTF-8"), "{}", stderr(&o));
    // Nor is a program name that is not UTF-8 (the library's default client name reads it).
    let env = Arc::clone(&f.env);
    let o = tokio::task::spawn_blocking(move || {
        use std::os::unix::process::CommandExt;
        env.command(bin_path("dlsessionctl"))
            .arg0(std::ffi::OsStr::from_bytes(b"ctl\xff"))
            .arg("status")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_exit(&o, 0);
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
    // A daemon started bare would listen elsewhere: the hint names this socket.
    let hint = format!("hint: start one there with 'dlsessiond --socket {} &'", socket.display());
    assert!(err.contains(&hint), "{err}");

    // The default socket of an environment without a daemon: every command that needs
    // one says so and exits 3 (inspection and control never start a daemon).
    for args in [
        &["tasks"][..],
        &["sessions"],
        &["show", "1"],
        &["watch"],
        &["pause", "1"],
        &["resume", "1"],
        &["cancel", "1"],
        &["wake", "org.example"],
        &["--json", "status"],
    ] {
        let o = ctl(&env, args).await;
        assert_exit(&o, 3);
        assert!(stderr(&o).starts_with("error: dlsessiond is not running (no socket at "), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("hint: start it with 'dlsessiond &'"), "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{args:?}: {}", stdout(&o));
    }
    // `get` and `attach` would start one, unless told not to.
    let dest = env.path().join("never-written");
    for args in [&["get", "http://127.0.0.1:9/a.bin", "-o", dest.to_str().unwrap()][..], &["attach", "org.example"]] {
        let o = ctl_env(&env, args, &[("DLSESSION_NO_AUTOSTART", "1")]).await;
        assert_exit(&o, 3);
        assert!(stderr(&o).contains("dlsessiond is not running"), "{}", stderr(&o));
    }
    assert!(!env.socket.exists(), "no daemon was started");

    // Usage errors are usage errors (exit 2) whether a daemon runs or not.
    for args in [
        &["limit", "2MiB"][..],
        &["proxy", "org.example", "--no-proxy", "localhost"],
        &["proxy", "org.example", "env", "--no-proxy", "localhost"],
        &["auth", "1", "--cancel", "--keep"],
        &["auth", "1", "--fail", "--space"],
    ] {
        let o = ctl(&env, args).await;
        assert_exit(&o, 2);
        assert!(!stderr(&o).contains("not running"), "{args:?}: {}", stderr(&o));
    }
    // `auth` reads its secret from stdin: at a terminal it would echo it (and seem to hang).
    let ctl_path = bin_path("dlsessionctl");
    let env2 = Arc::clone(&env);
    let o = tokio::task::spawn_blocking(move || {
        env2.command("timeout")
            .args(["10", "script", "-qec", &format!("{} auth 1 --bearer", ctl_path.display()), "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_exit(&o, 2);
    assert!(stdout(&o).contains("stdin, which is a terminal"), "{}", stdout(&o));
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

    let o = ctl(&f.env, &["--json", "pause", &id]).await;
    assert_exit(&o, 0);
    assert_eq!(json(&o), serde_json::json!({"task": id.parse::<u64>().unwrap(), "action": "pause", "ok": true}));
    let o = ctl(&f.env, &["resume", &id]).await;
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).trim(), format!("task {id} resumed"));
    let o = ctl(&f.env, &["--json", "show", &id]).await;
    assert_ne!(json(&o)["state"], "suspended");

    let o = ctl(&f.env, &["cancel", &id]).await;
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).trim(), format!("task {id} cancelled"));
    let done = wait_completed(&f.env, id.parse().unwrap()).await;
    assert_eq!(done["error"]["code"], "cancelled", "{done}");
    let said = done["error"]["message"].as_str().unwrap();
    assert!(said.starts_with(&format!("cancelled by dlsessionctl cancel {id} (pid ")), "says who and how: {said}");

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

/// A finished file an earlier `attach --move-to` moved before its acknowledgement was
/// durable (stopped by Ctrl-C, say) comes again, its cache file gone: the next attach says
/// so and acknowledges it. Before, every later attach failed on it and the session never
/// drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_acknowledges_a_file_an_earlier_attach_moved() {
    let f = fixture().await;
    f.server.add("/files/moved.bin", Resource::generated(20_000, 12));
    let url = f.server.url("/files/moved.bin");
    let o = ctl(
        &f.env,
        &["--json", "get", &url, "-d", f.env.path().join("first").to_str().unwrap(), "--session", "org.example.moved"],
    )
    .await;
    assert_exit(&o, 0);
    let id = json_lines(&o)[0]["task"].as_u64().unwrap();
    wait_completed(&f.env, id).await;
    let shown = json(&ctl(&f.env, &["--json", "show", &id.to_string()]).await);
    let location = std::path::PathBuf::from(shown["location"].as_str().expect("a location in the cache"));
    let keep = f.env.path().join("keep");
    std::fs::create_dir_all(&keep).unwrap();
    std::fs::rename(&location, keep.join("moved.bin")).unwrap();
    let o = ctl(&f.env, &["attach", "org.example.moved", "--move-to", keep.to_str().unwrap()]).await;
    assert_exit(&o, 0);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no longer in dlsessiond's cache"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let sessions = json(&ctl(&f.env, &["--json", "sessions"]).await);
    let s = sessions.as_array().unwrap().iter().find(|s| s["identifier"] == "org.example.moved").unwrap();
    assert_eq!(s["pending_events"], 0, "{s}");
}

/// `attach` acknowledges only what it printed: with stdout full or closed, the events stay
/// for the next attach (the cache file of a task without destination would be deleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_acknowledges_only_what_it_could_print() {
    let f = fixture().await;
    f.server.add("/f.bin", Resource::generated(20_000, 12));
    let dir = f.env.path().join("out");
    let o = ctl(&f.env, &["--json", "get", &f.server.url("/f.bin"), "-d", dir.to_str().unwrap(), "--session", "s.out"])
        .await;
    assert_exit(&o, 0);
    wait_completed(&f.env, json_lines(&o)[0]["task"].as_u64().unwrap()).await;
    let pending = |env: Arc<TestEnv>| async move {
        let o = ctl(&env, &["--json", "sessions"]).await;
        let sessions = json(&o);
        sessions.as_array().unwrap().iter().find(|s| s["identifier"] == "s.out").unwrap()["pending_events"].clone()
    };
    let before = pending(Arc::clone(&f.env)).await;
    assert!(before.as_u64().unwrap() >= 2, "{before}");

    let attach_into = |stdout: Stdio| {
        let env = Arc::clone(&f.env);
        tokio::task::spawn_blocking(move || {
            env.command(bin_path("dlsessionctl")).args(["attach", "s.out"]).stdout(stdout).output().unwrap()
        })
    };
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let o = attach_into(Stdio::from(full)).await.unwrap();
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("error: internal: cannot write output"), "{}", stderr(&o));
    assert_eq!(pending(Arc::clone(&f.env)).await, before);

    // A closed pipe is not an error (exit 0, nothing said), and acknowledges nothing either.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = attach_into(Stdio::from(writer)).await.unwrap();
    assert_exit(&o, 0);
    assert!(!stderr(&o).contains("error"), "{}", stderr(&o));
    assert_eq!(pending(Arc::clone(&f.env)).await, before);

    let o = ctl(&f.env, &["--json", "attach", "s.out"]).await;
    assert_exit(&o, 0);
    let names: Vec<String> = json_lines(&o).iter().map(|l| l["event"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names, ["finished_downloading", "completed", "finished_events"], "{}", stdout(&o));
    assert_eq!(pending(Arc::clone(&f.env)).await, 0);
}

#[test]
fn help_is_there_for_every_command() {
    let exe = Path::new(env!("CARGO_BIN_EXE_dlsessionctl"));
    let commands = [
        "status",
        "sessions",
        "tasks",
        "show",
        "get",
        "watch",
        "pause",
        "resume",
        "cancel",
        "attach",
        "wake",
        "invalidate",
    ];
    for cmd in commands {
        let o = std::process::Command::new(exe).args([cmd, "--help"]).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{cmd}");
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage: dlsessionctl"), "{cmd}");
    }
}

// ---------------------------------------------------------------------------------------------
// Completions, human output, why tasks wait, paging, and progress on terminals and pipes
// ---------------------------------------------------------------------------------------------

/// Creates suspended tasks in `session` (never resumed, so their URLs are never fetched).
async fn create_suspended(client: &Client, session: &str, urls: impl IntoIterator<Item = String>) -> Vec<u64> {
    client.request(Request::OpenSession { identifier: session.into(), config: None }).await.expect("open session");
    let tasks: Vec<TaskSpec> = urls.into_iter().map(TaskSpec::get).collect();
    let request = Request::CreateTasks { identifier: session.into(), tasks, resume: false };
    match client.request(request).await.expect("create tasks") {
        Response::TasksCreated(ids) => ids,
        other => panic!("expected task ids, got {other:?}"),
    }
}

/// Polls `show --json` until `ready` accepts the task's JSON.
async fn wait_task(env: &Arc<TestEnv>, id: u64, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let o = ctl(env, &["--json", "show", &id.to_string()]).await;
        assert_exit(&o, 0);
        let v = json(&o);
        if ready(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "task {id} is not {what}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let exe = Path::new(env!("CARGO_BIN_EXE_dlsessionctl"));
    let run = |args: &[&str]| {
        // No daemon is needed (nor contacted) for completions.
        std::process::Command::new(exe)
            .args(args)
            .env("DLSESSIOND_SOCKET", "/nonexistent/dlsessiond.sock")
            .output()
            .unwrap()
    };
    let commands =
        ["status", "sessions", "tasks", "show", "get", "watch", "pause", "resume", "cancel", "attach", "wake"];

    let o = run(&["completions", "bash"]);
    assert_exit(&o, 0);
    let bash = stdout(&o);
    assert!(bash.contains("_dlsessionctl"), "{bash}");
    for cmd in commands.iter().chain(&["completions"]) {
        assert!(bash.contains(cmd), "bash completion lacks {cmd}");
    }
    for flag in ["--socket", "--json", "--wait", "--move-to", "--state"] {
        assert!(bash.contains(flag), "bash completion lacks {flag}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dlsessionctl.bash");
    std::fs::write(&file, &bash).unwrap();
    let check = std::process::Command::new("bash").arg("-n").arg(&file).output().expect("run bash");
    assert!(check.status.success(), "bash -n refused the script: {}", stderr(&check));
    // And it completes: `dlsessionctl sta<TAB>` offers status; `tasks --state <TAB>` the states.
    let complete = |words: &str| {
        let script = format!(
            "source {}; COMP_LINE={line}; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=({words}); \
             COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _dlsessionctl dlsessionctl \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            sh_quote(file.to_str().unwrap()),
            line = sh_quote(&words.replace('\'', "")),
        );
        let o = std::process::Command::new("bash").args(["-c", &script]).output().expect("run bash");
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o).lines().map(str::to_owned).collect::<Vec<_>>()
    };
    assert_eq!(complete("dlsessionctl sta"), ["status"]);
    let states = complete("dlsessionctl tasks --state ''");
    for s in ["suspended", "queued", "running", "waiting", "completed"] {
        assert!(states.iter().any(|x| x == s), "{s} not offered: {states:?}");
    }

    let o = run(&["completions", "zsh"]);
    assert_exit(&o, 0);
    assert!(stdout(&o).starts_with("#compdef dlsessionctl"), "{}", stdout(&o));
    for cmd in commands {
        assert!(stdout(&o).contains(cmd), "zsh completion lacks {cmd}");
    }

    let o = run(&["completions", "fish"]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("complete -c dlsessionctl"), "{}", stdout(&o));
    for cmd in commands {
        assert!(stdout(&o).contains(cmd), "fish completion lacks {cmd}");
    }

    for shell in ["elvish", "powershell"] {
        let o = run(&["completions", shell]);
        assert_exit(&o, 0);
        assert!(stdout(&o).contains("dlsessionctl"));
    }
    let o = run(&["completions", "tcsh"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("possible values"), "{}", stderr(&o));
    let o = run(&["completions"]);
    assert_exit(&o, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_output_of_every_command() {
    let f = fixture().await;
    f.server.add("/h/report.bin", Resource::generated(50_000, 21));
    let port = f.server.addr().port();
    let secret_url = format!("http://user:s3cret@127.0.0.1:{port}/h/report.bin?access_token=t0ken");
    let shown_url = format!("http://127.0.0.1:{port}/h/report.bin?access_token=REDACTED");
    let dest = f.env.path().join("report.bin");

    // get: one line per task, with the redacted URL and the destination.
    let o = ctl(&f.env, &["get", &secret_url, "-o", dest.to_str().unwrap()]).await;
    assert_exit(&o, 0);
    let out = stdout(&o);
    let id: u64 = out
        .strip_prefix("task ")
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no task id in {out:?}"));
    assert_eq!(out.trim(), format!("task {id}: {shown_url} -> {}", dest.display()));
    wait_completed(&f.env, id).await;

    // status: version, protocol, pid, paths, counts.
    let o = ctl(&f.env, &["--json", "status"]).await;
    assert_exit(&o, 0);
    let status = json(&o);
    let o = ctl(&f.env, &["status"]).await;
    assert_exit(&o, 0);
    let out = stdout(&o);
    let first = out.lines().next().unwrap();
    assert!(
        first.starts_with(&format!(
            "dlsessiond {} (protocol {}), pid {}, up ",
            status["daemon_version"].as_str().unwrap(),
            status["protocol_version"],
            f.daemon.pid()
        )),
        "{out}"
    );
    assert_eq!(show_field(&out, "socket"), f.env.socket.to_str().unwrap(), "{out}");
    assert_eq!(show_field(&out, "database"), f.env.database().to_str().unwrap(), "{out}");
    assert_eq!(show_field(&out, "tasks"), "1 completed (1 total)", "{out}");
    assert_eq!(show_field(&out, "sessions"), "1", "{out}");
    assert!(show_field(&out, "download").contains("48.8 KiB since start"), "{out}");

    // tasks: a header, aligned columns, the redacted URL.
    let o = ctl(&f.env, &["tasks"]).await;
    assert_exit(&o, 0);
    let out = stdout(&o);
    let header = out.lines().next().unwrap();
    let columns: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(columns, ["ID", "SESSION", "STATE", "PROGRESS", "SPEED", "ETA", "URL", "WHY"], "{out}");
    let row = task_row(&out, id);
    assert_eq!(header.find("SESSION"), row.find("dlsessionctl"), "columns are aligned:\n{out}");
    assert_eq!(header.find("STATE"), row.find("completed"), "columns are aligned:\n{out}");
    assert_eq!(header.find("URL"), row.find(&shown_url), "columns are aligned:\n{out}");
    assert!(row.contains("100% 48.8 KiB / 48.8 KiB"), "{row}");
    assert!(!out.contains("s3cret") && !out.contains("t0ken"), "{out}");
    assert!(!o.stdout.contains(&0x1b), "no colour on a pipe: {out}");

    // show: every field, the URL redacted.
    let o = ctl(&f.env, &["show", &id.to_string()]).await;
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert_eq!(show_field(&out, "task"), id.to_string());
    assert_eq!(show_field(&out, "session"), "dlsessionctl");
    assert_eq!(show_field(&out, "state"), "completed");
    assert_eq!(show_field(&out, "url"), shown_url);
    assert_eq!(show_field(&out, "bytes"), "100% 48.8 KiB / 48.8 KiB");
    assert_eq!(show_field(&out, "error"), "-");
    assert_eq!(show_field(&out, "response status"), "200");
    assert!(out.contains("content-length: 50000"), "{out}");
    assert!(!out.contains("final url:"), "the same URL once redacted: {out}");
    assert_eq!(show_field(&out, "destination"), dest.to_str().unwrap());
    assert_eq!(show_field(&out, "location"), dest.to_str().unwrap());
    assert!(show_field(&out, "why").starts_with("completed; its events wait for the app"), "{out}");
    assert!(!out.contains("s3cret") && !out.contains("t0ken"), "{out}");

    // sessions: the identifier, attachment, counts and pending events.
    let o = ctl(&f.env, &["sessions"]).await;
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert_eq!(
        table_cells(&out, "SESSION"),
        ["SESSION", "APP ID", "ATTACHED", "TASKS", "PENDING EVENTS", "NEXT WAKE"],
        "{out}"
    );
    let cells = table_cells(&out, "dlsessionctl");
    assert_eq!(cells[..5], ["dlsessionctl", "-", "no", "1 completed", "2"], "{out}");
    assert!(!o.stdout.contains(&0x1b), "no colour on a pipe: {out}");

    // wake: nobody to wake in a session without app id or launch command.
    let o = ctl(&f.env, &["wake", "dlsessionctl"]).await;
    assert_exit(&o, 0);
    assert!(stdout(&o).starts_with("dlsessionctl: nothing to wake"), "{}", stdout(&o));
    let o = ctl(&f.env, &["--json", "wake", "dlsessionctl"]).await;
    assert_exit(&o, 0);
    assert_eq!(json(&o)["outcome"], "no_target");

    // attach: each event, then the end of the backlog.
    let keep = f.env.path().join("keep");
    let o = ctl(&f.env, &["attach", "dlsessionctl", "--move-to", keep.to_str().unwrap()]).await;
    assert_exit(&o, 0);
    let lines: Vec<String> = stdout(&o).lines().map(str::to_owned).collect();
    assert_eq!(
        lines,
        [
            format!("finished_downloading task {id}: {}", keep.join("report.bin").display()),
            format!("completed task {id}"),
            "finished_events: every event was delivered".to_owned(),
        ],
        "{}",
        stderr(&o)
    );
    assert!(keep.join("report.bin").exists());
    let o = ctl(&f.env, &["sessions"]).await;
    assert_eq!(table_cells(&stdout(&o), "dlsessionctl")[4], "0", "{}", stdout(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_and_tasks_say_why_a_task_waits() {
    let f = fixture_with(|env| {
        // The first retry is far away, so the task is seen backing off.
        env.set_config("retry_initial_ms", "30000");
        env.set_config("retry_max_ms", "60000");
    })
    .await;
    f.server.add(
        "/busy.bin",
        Resource::generated(10_000, 4).fault(Hits::All, Fault::Status { code: 503, retry_after: None }),
    );
    let client = client(&f.env).await;
    let suspended =
        create_suspended(&client, "t.why", ["http://user:s3cret@127.0.0.1:9/never.bin".to_owned()]).await[0];

    let dest = f.env.path().join("busy.bin");
    let o = ctl(&f.env, &["--json", "get", &f.server.url("/busy.bin"), "-o", dest.to_str().unwrap()]).await;
    assert_exit(&o, 0);
    let busy = json_lines(&o)[0]["task"].as_u64().unwrap();
    wait_task(&f.env, busy, "backing off", |v| v["state"] == "waiting" && v["wait"]["reason"] == "backoff").await;

    // show: the sentence, and until when.
    let o = ctl(&f.env, &["show", &suspended.to_string()]).await;
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert_eq!(show_field(&out, "state"), "suspended");
    assert_eq!(
        show_field(&out, "why"),
        format!("suspended: created or paused and not resumed (`dlsessionctl resume {suspended}` starts it)")
    );
    assert_eq!(show_field(&out, "url"), "http://127.0.0.1:9/never.bin");
    assert!(!out.contains("s3cret"), "{out}");

    let o = ctl(&f.env, &["show", &busy.to_string()]).await;
    assert_exit(&o, 0);
    let out = stdout(&o);
    assert_eq!(show_field(&out, "state"), "waiting");
    let why = show_field(&out, "why");
    assert!(why.starts_with("backing off after attempt 1 until "), "{out}");
    assert!(why.contains(" (in "), "says how long: {out}");
    assert!(why.contains("; last error: http_status: ") && why.contains("503"), "{out}");
    assert_eq!(show_field(&out, "attempts"), "1", "{out}");

    // tasks: the short form in the WHY column.
    let o = ctl(&f.env, &["tasks"]).await;
    assert_exit(&o, 0);
    let out = stdout(&o);
    let row = task_row(&out, suspended);
    assert!(row.contains("t.why") && row.contains("suspended"), "{out}");
    let words: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(words[words.len() - 2..], ["http://127.0.0.1:9/never.bin", "suspended"], "{out}");
    let row = task_row(&out, busy);
    assert!(row.contains(" waiting "), "{out}");
    let why = &row[out.lines().next().unwrap().find("WHY").unwrap()..];
    assert!(why.starts_with("backoff until ") && why.contains("(attempt 1: http_status: "), "{out}");

    let o = ctl(&f.env, &["tasks", "--state", "waiting"]).await;
    assert_exit(&o, 0);
    let out = stdout(&o);
    task_row(&out, busy);
    assert!(out.lines().all(|l| l.split_whitespace().next() != Some(suspended.to_string().as_str())), "{out}");

    let o = ctl(&f.env, &["--json", "tasks"]).await;
    assert_exit(&o, 0);
    let tasks = json(&o);
    let by_id = |id: u64| tasks.as_array().unwrap().iter().find(|t| t["id"] == id).unwrap().clone();
    assert_eq!(by_id(suspended)["wait"], serde_json::json!({"reason": "suspended"}));
    assert_eq!(by_id(suspended)["url"], "http://127.0.0.1:9/never.bin");
    let wait = &by_id(busy)["wait"];
    assert_eq!(wait["reason"], "backoff", "{wait}");
    assert_eq!(wait["attempt"], 1, "{wait}");
    assert_eq!(wait["last_error"]["code"], "http_status", "{wait}");
    assert!(wait["until"].as_u64().unwrap() > 0, "{wait}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_pages_through_thousands_of_tasks_in_order() {
    let f = fixture().await;
    let client = client(&f.env).await;
    let mut ids = Vec::new();
    for batch in 0..5 {
        let urls = (0..500).map(|i| format!("http://127.0.0.1:9/many/{}.bin", batch * 500 + i));
        ids.extend(create_suspended(&client, "t.many", urls).await);
    }
    assert_eq!(ids.len(), 2_500);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase");

    // More than two pages of 1000, all of them, in order.
    for args in [&["--json", "tasks"][..], &["--json", "tasks", "--session", "t.many", "--state", "suspended"]] {
        let o = ctl(&f.env, args).await;
        assert_exit(&o, 0);
        let tasks = json(&o);
        let tasks = tasks.as_array().unwrap();
        let listed: Vec<u64> = tasks.iter().map(|t| t["id"].as_u64().unwrap()).collect();
        assert_eq!(listed, ids, "{args:?}");
        for (n, t) in tasks.iter().enumerate() {
            assert_eq!(t["url"], format!("http://127.0.0.1:9/many/{n}.bin"));
            assert_eq!(t["state"], "suspended");
        }
    }

    let o = ctl(&f.env, &["tasks", "--session", "t.many"]).await;
    assert_exit(&o, 0);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2_501, "a header and one row per task");
    assert!(lines[0].trim_start().starts_with("ID  SESSION"), "{}", lines[0]);
    let listed: Vec<u64> = lines[1..].iter().map(|l| l.split_whitespace().next().unwrap().parse().unwrap()).collect();
    assert_eq!(listed, ids);
    // Widths grow across pages but rows stay aligned with the header.
    let at = lines[0].find("SESSION").unwrap();
    assert!(lines[1..].iter().all(|l| l.find("t.many") == Some(at)), "misaligned rows");

    let o = ctl(&f.env, &["tasks", "--state", "running"]).await;
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "no tasks\n");
    let o = ctl(&f.env, &["--json", "tasks", "--state", "running"]).await;
    assert_eq!(json(&o), serde_json::json!([]));

    let o = ctl(&f.env, &["--json", "status"]).await;
    assert_eq!(json(&o)["tasks"]["suspended"], 2_500);
}

/// The terminal output holds drawn progress bars: escape codes, the bar, bytes, speed, ETA.
#[track_caller]
fn assert_bars(o: &Output) {
    let text = stdout(o);
    assert!(text.contains("\x1b["), "no escape codes: {text:?}");
    assert!(text.contains("=>"), "no bar drawn: {text:?}");
    assert!(text.contains("ETA"), "no ETA: {text:?}");
    assert!(text.contains("MiB/s") || text.contains("KiB/s"), "no speed: {text:?}");
    assert!(text.contains(" MiB / 3.0 MiB ") || text.contains(" KiB / 3.0 MiB "), "no bytes: {text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_wait_draws_bars_on_a_terminal_and_plain_lines_on_a_pipe() {
    let f = fixture().await;
    // About 1.5 s each.
    let resource = Resource::generated(3 << 20, 1).throttle(2 << 20);
    f.server.add("/tty.bin", resource.clone());
    f.server.add("/pipe.bin", resource.clone());

    let dest = f.env.path().join("tty.bin");
    let o = ctl_pty(&f.env, &["get", &f.server.url("/tty.bin"), "-o", dest.to_str().unwrap(), "--wait"], &[]).await;
    assert_exit(&o, 0);
    assert_bars(&o);
    let text = stdout(&o);
    assert!(text.contains(&format!("completed: {} (3.0 MiB)", dest.display())), "{text:?}");
    assert_eq!(sha256_file(&dest).unwrap(), resource.sha256_hex());

    let dest = f.env.path().join("pipe.bin");
    let o = ctl(&f.env, &["get", &f.server.url("/pipe.bin"), "-o", dest.to_str().unwrap(), "--wait"]).await;
    assert_exit(&o, 0);
    assert!(!o.stdout.contains(&0x1b) && !o.stderr.contains(&0x1b), "{}\n{}", stdout(&o), stderr(&o));
    assert!(!stderr(&o).contains("ETA"), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.lines().last().unwrap().ends_with(&format!("completed: {} (3.0 MiB)", dest.display())), "{out}");
    assert_eq!(sha256_file(&dest).unwrap(), resource.sha256_hex());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_draws_bars_on_a_terminal_and_plain_lines_on_a_pipe() {
    let f = fixture().await;
    // About 1.5 s each, started before `watch` runs.
    let resource = Resource::generated(3 << 20, 2).throttle(2 << 20);
    f.server.add("/w-tty.bin", resource.clone());
    f.server.add("/w-pipe.bin", resource.clone());

    let start = |path: &'static str| {
        let env = Arc::clone(&f.env);
        let url = f.server.url(path);
        async move {
            let dest = env.path().join(path.trim_start_matches('/'));
            let o = ctl(&env, &["--json", "get", &url, "-o", dest.to_str().unwrap()]).await;
            assert_exit(&o, 0);
            json_lines(&o)[0]["task"].as_u64().unwrap()
        }
    };

    let id = start("/w-tty.bin").await;
    let o = ctl_pty(&f.env, &["watch"], &[]).await;
    assert_exit(&o, 0);
    assert_bars(&o);
    let text = stdout(&o);
    assert!(text.contains(&format!("task {id} completed: ")), "{text:?}");
    assert!(!text.contains("no active tasks"), "watch started too late: {text:?}");

    let id = start("/w-pipe.bin").await;
    let o = ctl(&f.env, &["watch"]).await;
    assert_exit(&o, 0);
    assert!(!o.stdout.contains(&0x1b) && !o.stderr.contains(&0x1b), "{}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(!out.contains("no active tasks"), "watch started too late: {out}");
    let first = out.lines().next().unwrap();
    assert!(
        first.starts_with(&format!("task {id} running: ")) || first.starts_with(&format!("task {id} queued: ")),
        "{out}"
    );
    assert!(
        out.lines()
            .last()
            .unwrap()
            .starts_with(&format!("task {id} completed: {}", f.env.path().join("w-pipe.bin").display())),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colour_only_on_a_terminal_and_never_with_no_color() {
    let f = fixture().await;
    let client = client(&f.env).await;
    let id = create_suspended(&client, "t.colour", ["http://127.0.0.1:9/c.bin".to_owned()]).await[0];

    let o = ctl_pty(&f.env, &["tasks"], &[]).await;
    assert_exit(&o, 0);
    let text = stdout(&o);
    assert!(text.contains("\x1b[2msuspended"), "the state is coloured on a terminal: {text:?}");
    assert!(text.contains(&format!("{id}  t.colour")), "{text:?}");

    for no_color in ["1", "yes"] {
        let o = ctl_pty(&f.env, &["tasks"], &[("NO_COLOR", no_color)]).await;
        assert_exit(&o, 0);
        assert!(!o.stdout.contains(&0x1b), "NO_COLOR={no_color}: {:?}", stdout(&o));
        assert!(stdout(&o).contains("suspended"));
    }
    let o = ctl_pty(&f.env, &["tasks"], &[("TERM", "dumb")]).await;
    assert!(!o.stdout.contains(&0x1b), "TERM=dumb: {:?}", stdout(&o));

    let o = ctl(&f.env, &["tasks"]).await;
    assert!(!o.stdout.contains(&0x1b), "a pipe: {:?}", stdout(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_without_wait_says_how_results_are_collected_and_the_next_get_collects_them() {
    let f = fixture().await;
    f.server.add("/ok.bin", Resource::generated(50_000, 1).throttle(100_000));
    let (ok, missing) = (f.env.path().join("ok.bin"), f.env.path().join("missing.bin"));
    let o = ctl(&f.env, &["get", &f.server.url("/ok.bin"), "-o", ok.to_str().unwrap()]).await;
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("the next `dlsessionctl get` collects their results"), "{}", stderr(&o));
    let first = task_id(&stdout(&o));
    let o = ctl(&f.env, &["get", &f.server.url("/nothing-here"), "-o", missing.to_str().unwrap()]).await;
    assert_exit(&o, 0);
    let failed = task_id(&stdout(&o));
    wait_completed(&f.env, first).await;
    wait_completed(&f.env, failed).await;

    // The next get collects both; the failure is named, not dropped silently.
    f.server.add("/third.bin", Resource::generated(1_000, 2));
    let third = f.env.path().join("third.bin");
    let o = ctl(&f.env, &["get", &f.server.url("/third.bin"), "-o", third.to_str().unwrap()]).await;
    assert_exit(&o, 0);
    let said = stderr(&o);
    assert!(said.contains("collected 2 earlier task(s); 1 failed"), "{said}");
    assert!(said.contains(&format!("task {failed}")), "{said}");
    for id in [first, failed] {
        let shown = json(&ctl(&f.env, &["--json", "show", &id.to_string()]).await);
        assert_eq!(shown["retired"], true, "collected, and still in the history: {shown}");
    }
    let o = ctl(&f.env, &["--json", "sessions"]).await;
    let pending = json(&o).as_array().unwrap().iter().find(|s| s["identifier"] == "dlsessionctl").unwrap().clone();
    assert!(pending["pending_events"].as_u64().unwrap() <= 2, "only the newest get's events wait: {pending}");
}

/// The id in `task N: URL -> PATH`.
fn task_id(line: &str) -> u64 {
    line.trim().strip_prefix("task ").and_then(|r| r.split(':').next()).and_then(|n| n.parse().ok()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_get_never_collects_what_a_get_wait_is_waiting_for() {
    let f = fixture().await;
    f.server.add("/slow.bin", Resource::generated(300_000, 5).throttle(200_000));
    f.server.add("/quick.bin", Resource::generated(1_000, 6));
    let slow = f.env.path().join("slow.bin");
    let waiting = {
        let env = f.env.clone();
        let args =
            ["get".to_owned(), f.server.url("/slow.bin"), "-o".into(), slow.display().to_string(), "--wait".into()];
        tokio::task::spawn_blocking(move || env.ctl(&args.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    // Gets without --wait run meanwhile; each collects what the earlier ones left.
    for i in 0..3 {
        let dest = f.env.path().join(format!("quick-{i}.bin"));
        let o = ctl(&f.env, &["get", &f.server.url("/quick.bin"), "-o", dest.to_str().unwrap()]).await;
        assert_exit(&o, 0);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let o = waiting.await.unwrap();
    assert_exit(&o, 0);
    assert!(!stderr(&o).contains("warning"), "the waiting get acknowledged its own task: {}", stderr(&o));
    assert_eq!(std::fs::metadata(&slow).unwrap().len(), 300_000);
}

/// A command that follows downloads gives up on a daemon that does not come back, after
/// `DLSESSIONCTL_RECONNECT_TIMEOUT` seconds, saying so (exit 3); before, it waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_commands_give_up_on_a_daemon_that_does_not_come_back() {
    let mut f = fixture().await;
    f.server.add("/slow.bin", Resource::generated(4 << 20, 21).throttle(64 << 10));
    let dest = f.env.path().join("slow.bin");
    let follow = |args: Vec<String>| {
        f.env
            .command(bin_path("dlsessionctl"))
            .args(args)
            .env("DLSESSION_NO_AUTOSTART", "1")
            .env("DLSESSIONCTL_RECONNECT_TIMEOUT", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let get =
        follow(vec!["get".into(), f.server.url("/slow.bin"), "-o".into(), dest.display().to_string(), "--wait".into()]);
    // `attach --wait` with nothing running would be done at once.
    wait_running(&f.env);
    let watch = follow(vec!["watch".into()]);
    let attach = follow(vec!["attach".into(), "dlsessionctl".into(), "--wait".into()]);
    // Every one of them is connected and following before the daemon goes.
    dlsession_testkit::wait_for("three followers", Duration::from_secs(10), || {
        let o = f.env.ctl(&["--json", "status"]);
        (json(&o)["connections"].as_u64() >= Some(4)).then_some(())
    });
    // Past their first requests, into their waits (the usual case this test is about).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    f.daemon.kill9();
    for (name, child) in [("get", get), ("watch", watch), ("attach", attach)] {
        let o = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
        assert_exit(&o, 3);
        let err = stderr(&o);
        // Given up after 2 s; or, killed during one of its requests (its first look at the
        // session, its watch), failed by that request at once: exit 3 either way.
        let gave_up = err.contains("error: lost the connection to dlsessiond: not back within 2 s");
        assert!(gave_up || err.contains("error: lost the connection to dlsessiond: i/o error"), "{name}: {err}");
        if gave_up && name != "attach" {
            assert!(
                err.contains("note: lost the connection to dlsessiond; connecting again (for 2 s)"),
                "{name}: {err}"
            );
        }
    }
    assert!(killed.elapsed() < Duration::from_secs(10), "{:?}", killed.elapsed());
}

/// A `get --wait` interrupted with Ctrl-C leaves its downloads going on, and the next `get`
/// collects their results once they are done (before, nothing ever did: their events
/// waited in the session until they expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_get_collects_what_an_interrupted_get_wait_left() {
    let f = fixture().await;
    f.server.add("/slow.bin", Resource::generated(300_000, 8).throttle(200_000));
    f.server.add("/quick.bin", Resource::generated(1_000, 9));
    let slow = f.env.path().join("slow.bin");
    let child = f
        .env
        .command(bin_path("dlsessionctl"))
        .args(["get", &f.server.url("/slow.bin"), "-o", slow.to_str().unwrap(), "--wait"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_running(&f.env);
    let interrupted = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(interrupted.success());
    let o = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert_exit(&o, 130);
    assert!(stderr(&o).contains("the next `dlsessionctl get` collects their results"), "{}", stderr(&o));
    let id = task_id(&stdout(&o));
    wait_completed(&f.env, id).await;

    let quick = f.env.path().join("quick.bin");
    let o = ctl(&f.env, &["get", &f.server.url("/quick.bin"), "-o", quick.to_str().unwrap()]).await;
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("collected 1 earlier task(s), all succeeded"), "{}", stderr(&o));
    let shown = json(&ctl(&f.env, &["--json", "show", &id.to_string()]).await);
    assert_eq!(shown["retired"], true, "{shown}");
}

/// A Ctrl-C while a `get -i` without `--wait` is making a batch in several requests lets
/// the batch be made whole and started (killed half-way, the parts made so far stayed
/// suspended for ever), says so, and exits 130.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_interrupted_while_making_its_batch_makes_it_whole() {
    let server = TestServer::start().await.expect("test server");
    let env = Arc::new(TestEnv::new());
    // The second part's commit is held: the Ctrl-C comes meanwhile.
    let slow = std::ffi::OsStr::new("tasks-before-commit:2:sleep-ms=3000");
    let _daemon = tokio::task::block_in_place(|| TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", slow)]));
    let urls: Vec<String> = (0..1_500)
        .map(|i| {
            let path = format!("/f{i}");
            server.add(&path, Resource::generated(100, 5));
            server.url(&path)
        })
        .collect();
    let list = env.path().join("list.txt");
    std::fs::write(&list, urls.join("\n")).unwrap();
    let dir = env.path().join("out");
    let child = env
        .command(bin_path("dlsessionctl"))
        .args(["get", "-i", list.to_str().unwrap(), "-d", dir.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let interrupted = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(interrupted.success());
    let o = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert_exit(&o, 130);
    assert!(stderr(&o).contains("interrupted: the tasks above were made"), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().filter(|l| l.starts_with("task ")).count(), 1_500, "{}", stdout(&o));
    let fetched = || (0..1_500).map(|i| server.hits(&format!("/f{i}"))).sum::<usize>();
    let deadline = Instant::now() + Duration::from_secs(60);
    while fetched() < 1_500 {
        assert!(Instant::now() < deadline, "{} of 1,500 fetched: the rest were left suspended", fetched());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until some task is running.
fn wait_running(env: &TestEnv) {
    dlsession_testkit::wait_for("a download running", Duration::from_secs(10), || {
        let o = env.ctl(&["--json", "tasks", "--state", "running"]);
        (!json(&o).as_array().unwrap().is_empty()).then_some(())
    });
}
