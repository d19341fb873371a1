//! Hostile peers: another uid is refused before a byte is read; garbage, truncated and
//! oversized frames close only their own connection; everyone else carries on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use dlsession::{Client, ClientOptions, ErrorCode};
use dlsession_proto::handshake::{HandshakeStatus, Preamble};
use dlsession_proto::{ClientHello, PROTOCOL_VERSION, Request, RequestFrame, Response, frame};
use dlsession_testkit::{TestDaemon, TestEnv};

fn hello_bytes() -> Vec<u8> {
    let mut v = Preamble::ours(HandshakeStatus::Ok).to_bytes().to_vec();
    v.extend(
        frame::encode_frame(&ClientHello {
            client_name: "raw".into(),
            client_version: "0".into(),
            app_id: None,
            umask: None,
        })
        .unwrap(),
    );
    v
}

/// A raw connection that has completed the handshake.
fn raw_connected(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello_bytes()).unwrap();
    let mut pre = [0u8; 8];
    s.read_exact(&mut pre).unwrap();
    assert_eq!(Preamble::parse(pre).unwrap().status, HandshakeStatus::Ok);
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut welcome = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut welcome).unwrap();
    s
}

/// Reads until the daemon closes the connection; returns everything it sent.
fn read_to_close(s: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("the daemon closes the connection");
    out
}

async fn healthy(env: &TestEnv) {
    let client =
        Client::connect(ClientOptions { socket: Some(env.socket.clone()), ..ClientOptions::default() }).await.unwrap();
    assert!(matches!(client.request(Request::Status).await.unwrap(), Response::Status(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_their_connection() {
    let env = TestEnv::new();
    let daemon = TestDaemon::start(&env);
    // A well-behaved client stays connected throughout.
    let bystander =
        Client::connect(ClientOptions { socket: Some(env.socket.clone()), ..ClientOptions::default() }).await.unwrap();

    // A probe that connects and says nothing (autostart's "is anyone there?") is not a bad
    // handshake: nothing to log above debug.
    drop(UnixStream::connect(&env.socket).unwrap());
    dlsession_testkit::wait_for("the probe's close", Duration::from_secs(10), || {
        daemon.log().contains("connection closed before its handshake").then_some(())
    });
    assert!(!daemon.log().contains("bad handshake"), "a probe is not a bad handshake");

    // Garbage after the handshake.
    let mut s = raw_connected(&env.socket);
    s.write_all(&[0, 0, 0, 5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb]).unwrap();
    let reply = read_to_close(&mut s);
    let msgs: Vec<dlsession_proto::ServerMessage> = frame::decode_frames(&reply).unwrap();
    assert!(
        matches!(&msgs[..], [dlsession_proto::ServerMessage::Response { id: 0, result: Err(e) }] if e.code == ErrorCode::InvalidRequest)
    );

    // An oversized frame header: refused before anything is allocated.
    let mut s = raw_connected(&env.socket);
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    let reply = read_to_close(&mut s);
    assert!(String::from_utf8_lossy(&reply).contains("exceeds the limit"));

    // A truncated frame: header says 100 bytes, 10 arrive, then EOF.
    let mut s = raw_connected(&env.socket);
    s.write_all(&100u32.to_be_bytes()).unwrap();
    s.write_all(&[1; 10]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = read_to_close(&mut s);

    // A frame that decodes to the wrong type (a hello where a request is expected).
    let mut s = raw_connected(&env.socket);
    s.write_all(&hello_bytes()[8..]).unwrap();
    let _ = read_to_close(&mut s);

    // Not our protocol at all: refused at the preamble (the unread rest of the request
    // may turn the close into a reset, which is fine).
    let mut s = UnixStream::connect(&env.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    match s.read_to_end(&mut reply) {
        Ok(_) => assert_eq!(Preamble::parse(reply[..8].try_into().unwrap()).unwrap().status, HandshakeStatus::BadHello),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }

    // A valid request still works on a fresh connection and on the old one.
    let mut s = raw_connected(&env.socket);
    s.write_all(&frame::encode_frame(&RequestFrame { id: 9, request: Request::Status }).unwrap()).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    assert!(matches!(bystander.request(Request::Status).await.unwrap(), Response::Status(_)));
    healthy(&env).await;
    assert!(daemon.log().contains("closing connection after a bad frame"));
    assert!(daemon.log().contains("bad handshake"), "the HTTP request is one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_mismatch_is_a_typed_error_on_both_sides() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let mut s = UnixStream::connect(&env.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&Preamble { version: PROTOCOL_VERSION + 1, status: HandshakeStatus::Ok }.to_bytes()).unwrap();
    let reply = read_to_close(&mut s);
    let pre = Preamble::parse(reply[..8].try_into().unwrap()).unwrap();
    assert_eq!(pre.status, HandshakeStatus::VersionMismatch);
    assert_eq!(pre.version, PROTOCOL_VERSION);
    healthy(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let started = std::time::Instant::now();
    let mut s = UnixStream::connect(&env.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let reply = read_to_close(&mut s); // sends nothing
    assert_eq!(Preamble::parse(reply[..8].try_into().unwrap()).unwrap().status, HandshakeStatus::BadHello);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1500) && waited < Duration::from_secs(15), "{waited:?}");
    healthy(&env).await;
}

/// Connects as uid/gid 65534 (via `setpriv`) and reports what the daemon sent.
fn connect_as_nobody(socket: &Path) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_peer_probe")])
        .arg(socket)
        .output()
        .expect("setpriv (util-linux) is needed for this test")
}

#[cfg_attr(not(dlsession_root), ignore = "needs root to connect as another uid; CI runs it as root")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_is_refused_even_through_a_loosened_socket() {
    dlsession_testkit::require_root();
    let env = TestEnv::new();
    let daemon = TestDaemon::start(&env);
    // With the modes as the daemon made them, the kernel already stops another user.
    let out = connect_as_nobody(&env.socket);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("connect-error"),
        "0700/0600 keep other users out: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Loosen every mode on the way: the daemon's SO_PEERCRED check still refuses.
    let mut dir = env.socket.parent().unwrap().to_path_buf();
    std::fs::set_permissions(&env.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    loop {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        if dir == env.path() {
            break;
        }
        dir = dir.parent().unwrap().to_path_buf();
    }
    std::fs::set_permissions(env.socket.parent().unwrap(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = connect_as_nobody(&env.socket);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = dlsession_proto::validate::to_hex(&Preamble::ours(HandshakeStatus::PermissionDenied).to_bytes());
    assert!(
        stdout.contains(&format!("reply {want}")),
        "refused with permission_denied: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(daemon.log().contains("refused a connection from another user"));
    healthy(&env).await;
}

/// A socket directory owned by another user is refused, never taken over.
#[cfg_attr(not(dlsession_root), ignore = "needs root to make a directory owned by another uid; CI runs it as root")]
#[test]
fn a_socket_directory_owned_by_someone_else_is_refused() {
    dlsession_testkit::require_root();
    let env = TestEnv::new();
    let dir = env.socket.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
    let out = env.command(dlsession_testkit::bin_path("dlsessiond")).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("owned by uid 65534"), "{stderr}");
}

/// TLS randomness comes from the kernel (with the CPU's RDRAND mixed in), as with ring and
/// BoringSSL: aws-lc's CPU-jitter source is not built (`.cargo/config.toml`), since collecting
/// jitter cost every daemon process 40 ms of CPU before its first handshake (SECURITY.md).
#[test]
fn the_daemon_is_built_without_cpu_jitter_entropy() {
    let daemon = std::fs::read(dlsession_testkit::bin_path("dlsessiond")).unwrap();
    let marker: &[u8] = b"jent_entropy_collector_alloc";
    let built_in = daemon.windows(marker.len()).any(|w| w == marker);
    assert!(
        !built_in,
        "aws-lc's jitter entropy is built in: is AWS_LC_SYS_NO_JITTER_ENTROPY set (.cargo/config.toml)?"
    );
}

/// A socket another user listens on (a directory of theirs made first under `/tmp`, where
/// the socket goes without `XDG_RUNTIME_DIR`) is never talked to: the client refuses before
/// sending a byte (its requests carry credentials), and autostart starts no daemon there.
#[cfg_attr(not(dlsession_root), ignore = "needs root to listen as another uid; CI runs it as root")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_of_another_user_is_not_talked_to() {
    dlsession_testkit::require_root();
    let env = TestEnv::new();
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let planted = env.path().join("planted");
    std::fs::create_dir(&planted).unwrap();
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
    let socket = planted.join("dlsessiond.sock");
    // The impostor: takes one connection and says how many bytes came before it closed.
    let listen = "import socket, sys\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  s.bind(sys.argv[1]); s.listen(1)\n\
                  print('ready', flush=True)\n\
                  c, _ = s.accept(); c.settimeout(10)\n\
                  got = b''\n\
                  while True:\n\
                  \x20   b = c.recv(4096)\n\
                  \x20   if not b: break\n\
                  \x20   got += b\n\
                  print('got', len(got), flush=True)\n";
    let mut impostor = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", listen])
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) and /usr/bin/python3 are needed for this test");
    let mut out = std::io::BufReader::new(impostor.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let options = ClientOptions { socket: Some(socket.clone()), autostart: false, ..ClientOptions::default() };
    let err = Client::connect(options).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err}");
    assert!(err.to_string().contains("runs as uid 65534"), "{err}");
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "got 0", "nothing was sent to it");
    assert!(impostor.wait().unwrap().success());

    // Nobody listening: autostart starts no daemon in their directory, nor locks in it.
    std::fs::remove_file(&socket).unwrap();
    let options = ClientOptions { socket: Some(socket.clone()), autostart: true, ..ClientOptions::default() };
    let err = Client::connect(options).await.unwrap_err();
    assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
    assert_eq!(std::fs::read_dir(&planted).unwrap().count(), 0, "nothing made in their directory");
}
