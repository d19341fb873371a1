//! Running `dlsessionctl` in tests, on a pipe or on a pseudo-terminal, and reading
//! what it printed.

use std::process::{Output, Stdio};
use std::sync::Arc;

use serde_json::Value;

use crate::{TestEnv, bin_path};

/// Runs `dlsessionctl args` against the environment's daemon on a blocking thread (so an
/// HTTP server in the test's own runtime keeps serving).
pub async fn ctl(env: &Arc<TestEnv>, args: &[&str]) -> Output {
    let env = Arc::clone(env);
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        env.ctl(&refs)
    })
    .await
    .expect("dlsessionctl run")
}

/// As [`ctl`], with extra environment variables.
pub async fn ctl_env(env: &Arc<TestEnv>, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let env = Arc::clone(env);
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    tokio::task::spawn_blocking(move || {
        env.command(bin_path("dlsessionctl"))
            .args(&args)
            .envs(vars)
            .stdin(Stdio::null())
            .output()
            .expect("run dlsessionctl")
    })
    .await
    .expect("dlsessionctl run")
}

/// Runs `dlsessionctl args` under a pseudo-terminal of 120 columns (util-linux `script`),
/// with extra environment variables. The returned stdout is everything drawn on the
/// terminal (stdout and stderr merged, `\r\n` line ends); the exit status is the command's.
pub async fn ctl_pty(env: &Arc<TestEnv>, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let mut line = String::from("stty cols 120 rows 40 2>/dev/null; exec");
    let exe = bin_path("dlsessionctl");
    for arg in std::iter::once(exe.to_string_lossy().as_ref()).chain(args.iter().copied()) {
        line.push(' ');
        line.push_str(&sh_quote(arg));
    }
    let env = Arc::clone(env);
    tokio::task::spawn_blocking(move || {
        env.command("script")
            .args(["-qfec", &line, "/dev/null"])
            .env("SHELL", "/bin/sh")
            .env("TERM", "xterm-256color")
            .env_remove("NO_COLOR")
            .envs(vars)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `script` ({e}): the pseudo-terminal tests need util-linux's `script` \
                     (Debian/Ubuntu: apt-get install bsdutils; Fedora: dnf install util-linux-script)"
                )
            })
    })
    .await
    .expect("script run")
}

/// A word for `sh -c`, quoted.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "stdout:\n{}\nstderr:\n{}", stdout(o), stderr(o));
}

/// Stdout as one JSON document.
pub fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

/// Every live task, as `dlsessionctl --json tasks` lists them (the command must succeed).
pub fn listed_tasks(env: &TestEnv) -> Vec<Value> {
    let out = env.ctl(&["--json", "tasks"]);
    assert_exit(&out, 0);
    match json(&out) {
        Value::Array(tasks) => tasks,
        other => panic!("not a list of tasks: {other}"),
    }
}

/// Stdout as JSON lines.
pub fn json_lines(o: &Output) -> Vec<Value> {
    stdout(o).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

#[track_caller]
pub fn assert_keys(v: &Value, keys: &[&str]) {
    for k in keys {
        assert!(v.get(k).is_some(), "missing {k:?} in {v}");
    }
}

/// The line of a `tasks` table whose first column is `id`.
#[track_caller]
pub fn task_row(table: &str, id: u64) -> String {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id.to_string().as_str()))
        .unwrap_or_else(|| panic!("no row for task {id} in:\n{table}"))
        .to_owned()
}

/// The value of a `show` line (`label:   value`).
#[track_caller]
pub fn show_field(text: &str, label: &str) -> String {
    let prefix = format!("{label}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{text}"))
        .trim()
        .to_owned()
}

/// The cells of a table row containing `needle`.
#[track_caller]
pub fn table_cells(table: &str, needle: &str) -> Vec<String> {
    let line = table.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?} in:\n{table}"));
    line.split(['│', '┆', '|']).map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect()
}

/// How many events session `identifier` holds unacknowledged, from `dlsessionctl sessions`
/// (`None`: no such session).
pub fn pending_events(env: &TestEnv, identifier: &str) -> Option<u64> {
    let o = env.ctl(&["--json", "sessions"]);
    let sessions: Value = serde_json::from_slice(&o.stdout).expect("sessions as JSON");
    let s = sessions.as_array().expect("an array").iter().find(|s| s["identifier"] == identifier).cloned();
    s.map(|s| s["pending_events"].as_u64().expect("pending_events"))
}
