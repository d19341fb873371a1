//! Client certificates (docs/behaviour.md, "HTTP"): a session presents the certificate it
//! was given to servers that ask for one (mutual TLS), from its first attach and again after
//! a restart; files that cannot be used are refused when set, with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use dlsession::{DownloadRequest, ErrorCode, Session};
use dlsession_testkit::app::config;
use dlsession_testkit::cli::{show_field, stdout};
use dlsession_testkit::{
    LONG, Recorder, Resource, TestCa, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex, wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_presents_its_client_certificate_across_a_restart() {
    let ca = TestCa::new().unwrap();
    let env = TestEnv::new();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start_mutual_tls(&ca).await.unwrap();
    s.add("/doc", Resource::generated(300_000, 61));
    let (cert, key) = ca.client_identity();

    // Without one, the server refuses the handshake: a tls error.
    let (delegate, mut events) = Recorder::new(&env.path().join("out0"));
    let plain = Session::attach(config(&env, "t.nocert"), delegate).await.unwrap();
    let task = plain.download_tasks(vec![DownloadRequest::new(s.url("/doc"))], true).await.unwrap().remove(0);
    let error = events.completion(task.id(), LONG).await.expect("no certificate, no download");
    assert_eq!(error.code, ErrorCode::Tls, "{error:?}");
    assert!(error.message.contains("wants a client certificate"), "{error:?}");

    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.cert").client_certificate(cert, key), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/doc"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(61, 300_000)));
    let text = stdout(&env.ctl(&["policy", "t.cert"]));
    assert!(text.contains(&format!("client certificate {}", cert.display())), "{text}");
    assert!(!text.contains("PRIVATE KEY"), "{text}");

    // Stored: after SIGKILL, read again and presented.
    session.wait_idle().await.unwrap();
    drop(session);
    d.kill9();
    d.restart();
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let session = Session::attach(config(&env, "t.cert"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/doc"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);

    // Bad files are refused when set, saying why; the one set stays, and so does every other
    // setting the same command named.
    let missing = env.path().join("missing.pem");
    let out = env.ctl(&[
        "policy",
        "t.cert",
        "--metered",
        "deny",
        "--cookies",
        "off",
        "--client-cert",
        missing.to_str().unwrap(),
        "--client-key",
        key.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("file_error: cannot read"), "{out:?}");
    let text = stdout(&env.ctl(&["policy", "t.cert"]));
    assert!(text.contains("metered networks allowed") && text.contains("keeps cookies"), "nothing changed: {text}");
    let out =
        env.ctl(&["policy", "t.cert", "--client-cert", key.to_str().unwrap(), "--client-key", key.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no PEM certificate"), "{out:?}");
    let (ca_cert, _) = (ca.ca_pem_path(), ());
    let out = env.ctl(&[
        "policy",
        "t.cert",
        "--client-cert",
        ca_cert.to_str().unwrap(),
        "--client-key",
        key.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("do not belong together"), "{out:?}");
    assert!(stdout(&env.ctl(&["policy", "t.cert"])).contains("client certificate"));
    let out = env.ctl(&["policy", "t.cert", "--no-client-cert"]);
    assert!(out.status.success() && !stdout(&out).contains("client certificate"), "{out:?}");
}

/// A certificate file that is a FIFO is refused (it used to hang the request for ever), and
/// stored files that cannot be read in time at start do not keep the daemon from starting:
/// the session's downloads wait, retried and saying why, and go once the files are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_certificate_files_never_hang_a_request_or_the_start() {
    let ca = TestCa::new().unwrap();
    let env = TestEnv::new();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    // Backoff long enough that a task going when the certificate is read is not its timer.
    env.set_config("retry_initial_ms", "4000");
    env.set_config("retry_max_ms", "60000");
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start_mutual_tls(&ca).await.unwrap();
    s.add("/doc", Resource::generated(1000, 62));
    let (cert, key) = ca.client_identity();
    let fifo = env.path().join("cert.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.slowcert"), delegate).await.unwrap();
    let out = env.ctl(&[
        "policy",
        "t.slowcert",
        "--client-cert",
        fifo.to_str().unwrap(),
        "--client-key",
        key.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a regular file"), "{out:?}");
    let out = env.ctl(&[
        "policy",
        "t.slowcert",
        "--client-cert",
        cert.to_str().unwrap(),
        "--client-key",
        key.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    drop(session);

    // At start the files take 10 s to read: the daemon starts anyway, after 5 s.
    d.kill9();
    d.set_env(&[("DLSESSIOND_FAILPOINT", std::ffi::OsStr::new("client-cert-read:1:sleep-ms=10000"))]);
    let began = std::time::Instant::now();
    d.restart();
    assert!(began.elapsed() < std::time::Duration::from_secs(9), "started in {:?}", began.elapsed());
    let (delegate, mut events) = Recorder::new(&env.path().join("out3"));
    let session = Session::attach(config(&env, "t.slowcert"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/doc"))], true).await.unwrap().remove(0);
    // It waits, retried with backoff, saying why; it does not fail.
    let id = task.id().to_string();
    wait_until(|| show_field(&stdout(&env.ctl(&["show", &id])), "last error").contains("still being read")).await;
    // Once read after all, the session presents it, with nothing set anew, and the task
    // goes at once rather than at the end of its backoff.
    dlsession_testkit::wait_for("the certificate read late", LONG, || {
        d.log().contains("client certificate was read after all").then_some(())
    });
    let read = std::time::Instant::now();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert!(read.elapsed() < std::time::Duration::from_secs(2), "went {:?} after the read", read.elapsed());
}

/// An attach whose certificate is refused leaves the session as it found it: not attached
/// to the refused connection (another app attaches at once, without taking over), and the
/// app's other settings not half applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_refused_for_its_certificate_leaves_the_session_free_and_unchanged() {
    use dlsession::proto::{Request, Response};
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let client = dlsession_testkit::app::client(&env).await;
    client.request(Request::OpenSession { identifier: "t.refused".into(), config: None }).await.unwrap();
    let missing = env.path().join("missing.pem");
    let refused = config(&env, "t.refused").cookies(false).client_certificate(&missing, &missing);
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let err = Session::attach_with(&client, refused, std::sync::Arc::new(delegate)).await.unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    match client.request(Request::GetSessionCookies { identifier: "t.refused".into() }).await.unwrap() {
        Response::SessionCookies(c) => assert!(c.enabled, "cookies were turned off by a refused attach"),
        other => panic!("{other:?}"),
    }
    // `client` stays connected: the daemon must not count it as attached.
    let (delegate, _events) = Recorder::new(&env.path().join("out2"));
    let other = dlsession_testkit::app::client(&env).await;
    let attached = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        Session::attach_with(&other, config(&env, "t.refused"), std::sync::Arc::new(delegate)),
    )
    .await
    .expect("attach answered");
    assert!(attached.is_ok(), "{:?}", attached.err());
}
