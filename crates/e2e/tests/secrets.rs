//! Credentials never reach the logs, `dlsessionctl` output or error messages: header
//! values of Authorization, Cookie and Proxy-Authorization, and passwords in URLs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use dlsession::{DownloadRequest, Session, SessionConfiguration};
use dlsession_testkit::{Fault, Hits, Resource, TestDaemon, TestEnv, TestServer};
use dlsession_testkit::{LONG, Recorder};

const SECRETS: [&str; 5] =
    ["SESSION-BEARER-9f3a", "TASK-BEARER-71c2", "COOKIE-VALUE-55e1", "PROXY-AUTH-a0b9", "URL-PASSWORD-3d7e"];

fn assert_clean(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what} contains the secret {s}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_logs_and_cli_output() {
    let env = TestEnv::new();
    let daemon = TestDaemon::start_with_env(&env, &[("DLSESSIOND_LOG", std::ffi::OsStr::new("trace"))]);
    let server = TestServer::start().await.unwrap();
    server.add("/ok", Resource::generated(5000, 1));
    server.add("/denied", Resource::generated(10, 2).fault(Hits::All, Fault::Status { code: 401, retry_after: None }));
    server.add(
        "/later",
        Resource::generated(10, 3).fault(Hits::All, Fault::Status { code: 503, retry_after: Some("60".into()) }),
    );
    let with_password = server.url("/ok").replace("http://", &format!("http://alice:{}@", SECRETS[4]));

    let config = SessionConfiguration::background("t.secrets")
        .socket(&env.socket)
        .header("Authorization", format!("Bearer {}", SECRETS[0]));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config, delegate).await.unwrap();
    let secret_headers = |r: DownloadRequest| {
        r.header("Authorization", format!("Bearer {}", SECRETS[1]))
            .header("Cookie", format!("id={}", SECRETS[2]))
            .header("Proxy-Authorization", format!("Basic {}", SECRETS[3]))
    };
    let tasks = session
        .download_tasks(
            vec![
                secret_headers(DownloadRequest::new(with_password.as_str())),
                secret_headers(DownloadRequest::new(server.url("/denied"))),
                secret_headers(DownloadRequest::new(server.url("/later"))),
            ],
            true,
        )
        .await
        .unwrap();
    assert_eq!(events.completion(tasks[0].id(), LONG).await, None);
    let denied = events.completion(tasks[1].id(), LONG).await.unwrap();
    assert_clean("the error of a failed task", &denied.to_string());
    // The server did get the credentials (they are the app's to send).
    let got = server.requests_for("/ok");
    assert!(got[0].header("authorization").is_some_and(|v| v.contains(SECRETS[1])));
    // A refused header's value is not echoed in the error.
    let bad = session
        .download_task(
            DownloadRequest::new(server.url("/ok")).header("Authorization", format!("{}\r\nX: y", SECRETS[1])),
        )
        .await
        .unwrap_err();
    assert_clean("a validation error", &bad.to_string());

    let env_ctl = |args: &[&str]| {
        let out = env.ctl(args);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    for args in [
        vec!["tasks"],
        vec!["tasks", "--json"],
        vec!["sessions"],
        vec!["sessions", "--json"],
        vec!["status"],
        vec!["show", &tasks[0].id().to_string()],
        vec!["show", &tasks[0].id().to_string(), "--json"],
        vec!["show", &tasks[1].id().to_string(), "--json"],
        vec!["show", &tasks[2].id().to_string()],
    ] {
        let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        assert_clean(&format!("dlsessionctl {}", refs.join(" ")), &env_ctl(&refs));
    }
    let shown = env_ctl(&["show", &tasks[0].id().to_string()]);
    assert!(shown.contains("alice") || shown.contains("127.0.0.1"), "show still says what it fetched:\n{shown}");
    let log = daemon.log();
    assert!(log.contains("TRACE"), "the daemon logged at trace level");
    assert_clean("the daemon log", &log);
}
