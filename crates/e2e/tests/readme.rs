//! What the README promises a newcomer: `./scripts/quickstart.sh` runs a real transfer
//! on a fresh machine, from a server it starts itself on loopback, and checks the bytes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::PathBuf;

use dlsession_testkit::{TestEnv, bin_path};

/// The workspace's root and target directory (this test runs from `target/debug/deps`).
fn workspace() -> (PathBuf, PathBuf) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap();
    let target = bin_path("dlsessiond").parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    (root, target)
}

#[test]
fn the_quick_start_downloads_from_its_own_loopback_server() {
    let env = TestEnv::new();
    let (root, target) = workspace();
    // The private HOME would hide cargo's and rustup's own homes: name them.
    let real_home = PathBuf::from(std::env::var_os("HOME").unwrap());
    let cargo_home = std::env::var_os("CARGO_HOME").map_or_else(|| real_home.join(".cargo"), PathBuf::from);
    let rustup_home = std::env::var_os("RUSTUP_HOME").map_or_else(|| real_home.join(".rustup"), PathBuf::from);
    let work = env.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = env
        .command(root.join("scripts/quickstart.sh"))
        .current_dir(&work)
        .env("CARGO_HOME", cargo_home)
        .env("RUSTUP_HOME", rustup_home)
        .env("CARGO_TARGET_DIR", &target)
        .env("DLSESSION_PROFILE", "dev")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The daemon it started in the background goes with the test.
    let status = env.ctl(&["--json", "status"]);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&status.stdout)
        && let Some(pid) = v["pid"].as_u64()
    {
        dlsession_testkit::host::kill(u32::try_from(pid).unwrap());
    }
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("the file is byte-exact"), "{stdout}");
    assert_eq!(std::fs::metadata(work.join("sample.bin")).unwrap().len(), 64 << 20);
}
