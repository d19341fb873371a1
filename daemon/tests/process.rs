//! The daemon as a process: private socket and directories, one instance, stale socket
//! reclaimed, clean SIGTERM, refusing databases it does not understand.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Output;
use std::time::Duration;

use dlsession_testkit::host::mode;
use dlsession_testkit::{TestDaemon, TestEnv, bin_path};

/// Runs the daemon expecting it to refuse to start.
fn run_expecting_failure(env: &TestEnv) -> Output {
    let mut child = env
        .command(bin_path("dlsessiond"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    panic!("dlsessiond kept running; it should have refused to start");
}

#[test]
fn socket_and_directories_are_private() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let meta = std::fs::metadata(&env.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(mode(&env.socket), 0o600, "socket is 0600");
    assert_eq!(mode(env.socket.parent().unwrap()), 0o700, "socket directory is 0700");
    assert_eq!(mode(&env.state_dir.join("dlsessiond")), 0o700, "state directory is 0700");
    assert!(env.database().exists(), "database at the XDG state path");
}

#[test]
fn a_second_instance_is_refused_and_the_first_keeps_serving() {
    let env = TestEnv::new();
    let daemon = TestDaemon::start(&env);
    let out = run_expecting_failure(&env);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already running"), "{stderr}");
    assert!(stderr.contains(&daemon.pid().to_string()), "names the running pid: {stderr}");
    assert!(std::os::unix::net::UnixStream::connect(&env.socket).is_ok(), "the first still listens");
}

#[test]
fn a_stale_socket_is_reclaimed() {
    let env = TestEnv::new();
    std::fs::create_dir_all(env.socket.parent().unwrap()).unwrap();
    std::fs::set_permissions(env.socket.parent().unwrap(), std::fs::Permissions::from_mode(0o700)).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&env.socket).unwrap()); // leaves the file behind
    assert!(env.socket.exists());
    let _daemon = TestDaemon::start(&env);
    assert!(std::os::unix::net::UnixStream::connect(&env.socket).is_ok());
}

/// A socket something listens on (systemd's activation socket while the service is
/// stopped: the locks are free) is left alone: replacing it broke activation until the
/// socket unit was restarted.
#[test]
fn a_socket_something_listens_on_is_left_alone() {
    use std::os::unix::fs::MetadataExt;
    let env = TestEnv::new();
    std::fs::create_dir_all(env.socket.parent().unwrap()).unwrap();
    std::fs::set_permissions(env.socket.parent().unwrap(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&env.socket).unwrap();
    let inode = std::fs::metadata(&env.socket).unwrap().ino();
    let out = run_expecting_failure(&env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("something listens on"), "{stderr}");
    assert_eq!(std::fs::metadata(&env.socket).unwrap().ino(), inode, "the socket is the listener's still");
    let _ = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
    assert!(listener.accept().is_ok(), "and it still gets the connections");
}

#[test]
fn a_non_socket_at_the_socket_path_is_left_alone() {
    let env = TestEnv::new();
    std::fs::create_dir_all(env.socket.parent().unwrap()).unwrap();
    std::fs::write(&env.socket, b"precious").unwrap();
    let out = run_expecting_failure(&env);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"));
    assert_eq!(std::fs::read(&env.socket).unwrap(), b"precious");
}

#[test]
fn sigterm_exits_cleanly() {
    let env = TestEnv::new();
    let mut daemon = TestDaemon::start(&env);
    let status = daemon.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(daemon.log().contains("stopped cleanly"));
    assert!(!env.socket.exists(), "the socket is removed on a clean exit");
}

#[test]
fn a_corrupt_database_is_refused_and_untouched() {
    let env = TestEnv::new();
    std::fs::create_dir_all(env.database().parent().unwrap()).unwrap();
    let garbage = b"garbage, not a database ".repeat(400);
    std::fs::write(env.database(), &garbage).unwrap();
    let out = run_expecting_failure(&env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("corrupt") && stderr.contains("refusing to start"), "{stderr}");
    assert_eq!(std::fs::read(env.database()).unwrap(), garbage);
}

#[test]
fn a_newer_database_is_refused() {
    let env = TestEnv::new();
    std::fs::create_dir_all(env.database().parent().unwrap()).unwrap();
    {
        let c = rusqlite::Connection::open(env.database()).unwrap();
        c.execute_batch("PRAGMA application_id = 1145852740; CREATE TABLE x(y); PRAGMA user_version = 42;").unwrap();
    }
    let out = run_expecting_failure(&env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("schema version 42"), "{stderr}");
}

#[test]
fn an_invalid_config_file_is_reported() {
    let env = TestEnv::with_config("max_concurrent_downloads = \"lots\"\n");
    let out = run_expecting_failure(&env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid config file"), "{stderr}");
    let env = TestEnv::with_config("no_such_setting = 1\n");
    let out = run_expecting_failure(&env);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_setting"));
    // Values that would refuse every client or time out at once are refused by name.
    // A start above the default cap, the cap unset: the cap follows (as before caps were
    // checked), the daemon starts.
    let env = TestEnv::with_config("wake_initial_ms = 7200000\nretry_initial_ms = 1200000\n");
    let mut daemon = TestDaemon::start(&env);
    daemon.terminate();
    for line in [
        "max_connections = 0",
        "max_tasks_per_batch = 0",
        "handshake_timeout_ms = 0",
        "extra_ca_file = \"ca.pem\"",
        "wake_max_ms = 0",
        "retry_max_ms = 10",
    ] {
        let env = TestEnv::with_config(&format!("{line}\n"));
        let out = run_expecting_failure(&env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let key = line.split(' ').next().unwrap();
        assert!(stderr.contains(key), "{line}: {stderr}");
    }
}

/// A log filter that does not parse is said, not silently replaced.
#[test]
fn an_invalid_log_filter_is_reported() {
    let env = TestEnv::new();
    let mut daemon =
        TestDaemon::start_with_env(&env, &[("DLSESSIOND_LOG", std::ffi::OsStr::new("dlsessiond=nonsense[["))]);
    dlsession_testkit::wait_for("the warning", Duration::from_secs(10), || {
        daemon.log().contains("is not a valid log filter").then_some(())
    });
    daemon.terminate();
}

/// A socket directory the daemon did not create keeps its mode (it may be shared on
/// purpose); one that other users can write to without the sticky bit is refused.
#[test]
fn an_existing_socket_directory_keeps_its_mode() {
    let env = TestEnv::new();
    let shared = env.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = shared.join("x.sock");
    let mut child = env
        .command(bin_path("dlsessiond"))
        .arg("--socket")
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    dlsession_testkit::wait_for("the socket", Duration::from_secs(20), || socket.exists().then_some(()));
    assert_eq!(mode(&shared), 0o755, "an existing directory is never chmodded");
    assert_eq!(mode(&socket), 0o600);
    let _ = child.kill();
    let _ = child.wait();

    let open = env.path().join("open");
    std::fs::create_dir_all(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = env.command(bin_path("dlsessiond")).arg("--socket").arg(open.join("x.sock")).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("can be written by other users (mode 777)"), "{stderr}");
    assert_eq!(mode(&open), 0o777);
}

/// Under a low open-file limit the daemon lowers its download and connection limits to
/// what the descriptors allow, says so, and `status` shows the limit in force; under a
/// low soft limit it raises the soft limit to the hard one instead.
#[test]
fn limits_follow_the_descriptors_there_are() {
    // A hard limit above the soft one, within what this process may set.
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum.unwrap_or(8192).min(8192);
    // 288 kept for the database, sockets, file work and finishing writers.
    let raised = (hard - 288 - 512.min((hard - 288) / 2)) / 4;
    assert!(raised > 92, "the hard limit {hard} is too low for this test");
    let second = format!("1024:{hard}");
    for (nofile, expected) in [("1024:1024", 92), (second.as_str(), raised)] {
        let env = TestEnv::new();
        env.set_config("max_concurrent_downloads", "10000");
        let mut child = env
            .command("prlimit")
            .arg(format!("--nofile={nofile}"))
            .arg("--")
            .arg(bin_path("dlsessiond"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(env.path().join("daemon.log")).unwrap())
            .spawn()
            .expect("prlimit (util-linux)");
        for _ in 0..500 {
            if std::os::unix::net::UnixStream::connect(&env.socket).is_ok() {
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(env.path().join("daemon.log")).unwrap_or_default();
                panic!("dlsessiond exited ({status}): {log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = env.ctl(&["--json", "status"]);
        let _ = child.kill();
        let _ = child.wait();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["max_concurrent_downloads"], expected, "nofile {nofile}: {status}");
        let log = std::fs::read_to_string(env.path().join("daemon.log")).unwrap();
        let said = log.contains("1024 descriptors allowed (RLIMIT_NOFILE): max_connections 512 → 368");
        assert_eq!(said, expected == 92, "nofile {nofile}: {log}");
    }
}
