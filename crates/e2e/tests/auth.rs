//! Authentication challenges (docs/behaviour.md, "Authentication"): in a session that
//! answers them, a 401 stops the task and asks the app (waking or relaunching it); the
//! answer's credential goes to that origin only, kept in memory or, asked to, on disk;
//! `dlsessionctl auth` can answer instead; an endless 401 gives up; no secret is logged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::Write;
use std::process::Stdio;

use dlsession::{
    ChallengeAnswer, Credential, CredentialScope, DownloadRequest, ErrorCode, Session, UploadMethod, UploadRequest,
};
use dlsession_testkit::app::config;
use dlsession_testkit::cli::{show_field, stdout};
use dlsession_testkit::{
    Fault, Hits, LONG, Recorder, Resource, Seen, TestCa, TestDaemon, TestEnv, TestProxy, TestServer, UploadFaults,
    UploadServer, bin_path, pattern_sha256, sha256_file, to_hex, wait_until,
};

const PASSWORD: &str = "s3cret-pw";
/// `Basic` of `u:s3cret-pw`.
const GOOD: &str = "Basic dTpzM2NyZXQtcHc=";

async fn server() -> TestServer {
    let s = TestServer::start().await.unwrap();
    s.add("/private", Resource::generated(200_000, 51).require_auth(GOOD, "Basic realm=\"files\""));
    s.add("/other", Resource::generated(100_000, 52).require_auth(GOOD, "Basic realm=\"files\""));
    s
}

fn basic(scope: CredentialScope, keep: bool) -> ChallengeAnswer {
    let credential = Credential::Basic { user: "u".into(), password: PASSWORD.into() };
    ChallengeAnswer::Use { credential, scope, keep }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_answers_and_its_credential_serves_the_protection_space_across_a_restart() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_LOG", std::ffi::OsStr::new("trace"))]);
    let s = server().await;
    let (delegate, mut events) =
        Recorder::answering(&env.path().join("out"), basic(CredentialScope::ProtectionSpace, true));
    let session = Session::attach(config(&env, "t.auth").answers_challenges(true), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/private"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(51, 200_000)));
    let asked: Vec<_> = events.seen.iter().filter(|e| matches!(e, Seen::Challenge { .. })).cloned().collect();
    match asked.as_slice() {
        [Seen::Challenge { challenge, .. }] => {
            assert_eq!((challenge.scheme.as_str(), challenge.realm.as_deref()), ("Basic", Some("files")));
            assert_eq!(challenge.origin, format!("http://{}", s.addr()));
            assert_eq!(challenge.round, 1);
        }
        other => panic!("one challenge expected: {other:?}"),
    }
    let private = s.requests_for("/private");
    assert_eq!(private.len(), 2, "{private:?}");
    assert_eq!((private[0].header("authorization"), private[1].header("authorization")), (None, Some(GOOD)));

    // Kept: after SIGKILL the session's next task to that origin carries it from its first request.
    session.wait_idle().await.unwrap();
    drop(session);
    d.kill9();
    d.restart();
    let text = stdout(&env.ctl(&["policy", "t.auth"]));
    assert!(text.contains("asks its app for credentials (1 held, 1 kept)"), "{text}");
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let session = Session::attach(config(&env, "t.auth"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/other"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let other = s.requests_for("/other");
    assert_eq!(other.len(), 1, "no 401 round trip: {other:?}");
    assert_eq!(other[0].header("authorization"), Some(GOOD));
    let log = d.log();
    assert!(!log.contains(PASSWORD) && !log.contains("dTpzM2NyZXQtcHc="), "a credential reached the log");
}

/// No app attached: the challenge relaunches the session's app at once (its other task
/// still running), `tasks` and `show` say what it waits for, and `dlsessionctl auth`
/// answers with a password read from stdin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_challenge_relaunches_the_app_and_dlsessionctl_can_answer() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = server().await;
    s.add("/slow", Resource::generated(2_000_000, 53).throttle(200_000));
    let marker = env.path().join("launched");
    let launch = format!("touch {}", marker.display());
    let out = env.ctl(&["policy", "t.ctl", "--challenges", "ask"]);
    assert!(!out.status.success(), "no such session yet: {out:?}");
    let dir = env.path().join("files");
    let get = |url: String| {
        let dir = dir.to_str().unwrap().to_owned();
        env.ctl(&["get", "--session", "t.ctl", "--app-id", "org.example.T", "--launch-cmd", &launch, "-d", &dir, &url])
    };
    assert!(get(s.url("/slow")).status.success());
    let out = env.ctl(&["policy", "t.ctl", "--challenges", "ask"]);
    assert!(stdout(&out).contains("asks its app for credentials (0 held, 0 kept)"), "{out:?}");
    assert!(get(s.url("/private")).status.success());
    wait_until(|| stdout(&env.ctl(&["tasks", "--session", "t.ctl"])).contains("credentials wanted (Basic at http://"))
        .await;
    // Relaunched while the slow download still runs.
    wait_until(|| marker.exists()).await;
    let json: serde_json::Value =
        serde_json::from_slice(&env.ctl(&["--json", "tasks", "--session", "t.ctl"]).stdout).unwrap();
    let waiting = json
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["wait"]["reason"] == "auth_required")
        .unwrap_or_else(|| panic!("{json}"))
        .clone();
    assert_eq!(waiting["wait"]["realm"], "files");
    let task = waiting["id"].as_u64().unwrap().to_string();
    let text = stdout(&env.ctl(&["show", &task]));
    assert!(show_field(&text, "why").starts_with("waiting for credentials: the server http://"), "{text}");

    // An answer to another challenge than the one it waits on is refused (its credential
    // could belong to another origin).
    let client = dlsession_testkit::app::client(&env).await;
    let stale = dlsession::proto::Request::AnswerChallenge {
        task: task.parse().unwrap(),
        round: Some(2),
        answer: ChallengeAnswer::Fail,
    };
    let error = client.request(stale).await.expect_err("a stale answer");
    assert!(error.to_string().contains("now waits on challenge 1"), "{error}");

    // No secret on the command line: an empty stdin is refused.
    let out = env.ctl(&["auth", &task, "--basic", "u"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("stdin"), "{out:?}");
    let mut child = env
        .command(bin_path("dlsessionctl"))
        .args(["auth", &task, "--basic", "u"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{PASSWORD}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let file = dir.join("private");
    wait_until(|| file.exists()).await;
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(51, 200_000)));
    assert_eq!(s.requests_for("/private").last().unwrap().header("authorization"), Some(GOOD));
    // Answering a task that waits for nothing is refused.
    let mut child = env
        .command(bin_path("dlsessionctl"))
        .args(["auth", &task, "--bearer"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"token\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not waiting for credentials"), "{out:?}");
    // The answered challenge was withdrawn: collecting the session's events asks nothing.
    let out = env.ctl(&["attach", "t.ctl"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("waits for credentials"), "{out:?}");
}

/// Wrong credentials, answered again and again: the task gives up after three answers
/// with the server's 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_401_gives_up_after_three_answers() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = server().await;
    let wrong = ChallengeAnswer::Use {
        credential: Credential::Bearer { token: "nope".into() },
        scope: CredentialScope::Task,
        keep: false,
    };
    let (delegate, mut events) = Recorder::answering(&env.path().join("out"), wrong);
    let session = Session::attach(config(&env, "t.loop").answers_challenges(true), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/private"))], true).await.unwrap().remove(0);
    let error = events.completion(task.id(), LONG).await.expect("gave up");
    assert_eq!((error.code, error.http_status), (ErrorCode::HttpStatus, Some(401)), "{error:?}");
    assert!(error.message.contains("refused 3 times"), "{error:?}");
    let rounds: Vec<u32> = events
        .seen
        .iter()
        .filter_map(|e| match e {
            Seen::Challenge { challenge, .. } => Some(challenge.round),
            _ => None,
        })
        .collect();
    assert_eq!(rounds, [1, 2, 3]);
    let sent = s.requests_for("/private");
    assert_eq!(sent.len(), 4, "{sent:?}");
    assert!(sent[1..].iter().all(|r| r.header("authorization") == Some("Bearer nope")), "{sent:?}");

    // A session that does not answer fails at the first 401, as before.
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let session = Session::attach(config(&env, "t.plain"), delegate).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/other"))], true).await.unwrap().remove(0);
    let error = events.completion(task.id(), LONG).await.expect("401");
    assert_eq!(error.http_status, Some(401));
    assert!(!events.seen.iter().any(|e| matches!(e, Seen::Challenge { .. })));
}

/// A proxy that wants credentials: its 407 to the `CONNECT` of an https download, like its
/// 407 to a plain-http request, is a challenge the app answers; the credential goes to the
/// proxy only (on the `CONNECT`, never inside the tunnel to the server). A session that
/// does not answer fails the task with the proxy's 407 at once, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_asking_for_credentials_is_answered_on_its_tunnel() {
    let env = TestEnv::new();
    let ca = TestCa::new().unwrap();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let proxy = TestProxy::start().await.unwrap();
    proxy.require_auth(GOOD, "Basic realm=\"corp\"");
    let proxy_url = proxy.url();
    let via = std::ffi::OsStr::new(&proxy_url);
    let _d = TestDaemon::start_with_env(
        &env,
        &[("HTTP_PROXY", via), ("HTTPS_PROXY", via), ("NO_PROXY", std::ffi::OsStr::new(""))],
    );
    let plain = TestServer::start().await.unwrap();
    plain.add("/p", Resource::generated(300_000, 61));
    let tls = TestServer::start_tls(&ca).await.unwrap();
    tls.add("/t", Resource::generated(300_000, 62));

    let (delegate, mut events) = Recorder::answering(&env.path().join("out"), basic(CredentialScope::Task, false));
    let session = Session::attach(config(&env, "t.proxyauth").answers_challenges(true), delegate).await.unwrap();
    let requests = vec![DownloadRequest::new(tls.url("/t")), DownloadRequest::new(plain.url("/p"))];
    let tasks = session.download_tasks(requests, true).await.unwrap();
    for (t, seed) in tasks.iter().zip([62, 61]) {
        assert_eq!(events.completion(t.id(), LONG).await, None);
        assert_eq!(sha256_file(&events.moved_to(t.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(seed, 300_000)));
    }
    let asked: Vec<_> = events
        .seen
        .iter()
        .filter_map(|e| match e {
            Seen::Challenge { task, challenge } => Some((*task, challenge.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(asked.len(), 2, "one challenge per task: {asked:?}");
    for (_, c) in &asked {
        assert_eq!((c.scheme.as_str(), c.realm.as_deref(), c.proxy), ("Basic", Some("corp"), true), "{c:?}");
        assert_eq!(c.origin, proxy_url, "the proxy asks, not the server");
    }
    let records = proxy.records();
    let connects: Vec<_> = records.iter().filter(|r| r.method == "CONNECT").collect();
    assert_eq!(connects.first().and_then(|r| r.proxy_authorization.as_deref()), None, "{records:?}");
    assert_eq!(connects.last().and_then(|r| r.proxy_authorization.as_deref()), Some(GOOD), "{records:?}");
    let gets: Vec<_> = records.iter().filter(|r| r.method == "GET").collect();
    assert_eq!(gets.first().and_then(|r| r.proxy_authorization.as_deref()), None, "{records:?}");
    assert_eq!(gets.last().and_then(|r| r.proxy_authorization.as_deref()), Some(GOOD), "{records:?}");
    let inside = tls.requests_for("/t");
    assert!(inside.iter().all(|r| r.header("proxy-authorization").is_none()), "through the tunnel: {inside:?}");

    // Not answered: the proxy's 407 is the task's error, at the first refusal.
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let session = Session::attach(config(&env, "t.proxyplain"), delegate).await.unwrap();
    let before = proxy.records().len();
    let task = session.download_tasks(vec![DownloadRequest::new(tls.url("/t"))], true).await.unwrap().remove(0);
    let error = events.completion(task.id(), LONG).await.expect("407");
    assert_eq!((error.code, error.http_status), (ErrorCode::HttpStatus, Some(407)), "{error:?}");
    assert!(error.message.contains("proxy answered 407"), "{error:?}");
    assert_eq!(proxy.records().len(), before + 1, "not retried");

    // Answered from dlsessionctl: a plain header is refused for a proxy (the proxy would
    // pass it on to servers), Basic goes.
    let dir = env.path().join("ctl");
    let get = || env.ctl(&["get", "--session", "t.ctlproxy", "-d", dir.to_str().unwrap(), &tls.url("/t")]);
    assert!(get().status.success());
    assert!(env.ctl(&["policy", "t.ctlproxy", "--challenges", "ask"]).status.success());
    assert!(get().status.success());
    let waiting = || {
        let json: serde_json::Value =
            serde_json::from_slice(&env.ctl(&["--json", "tasks", "--session", "t.ctlproxy"]).stdout).unwrap();
        json.as_array().unwrap().iter().find(|t| t["wait"]["reason"] == "auth_required").cloned()
    };
    wait_until(|| waiting().is_some()).await;
    let task = waiting().unwrap()["id"].as_u64().unwrap();
    let client = dlsession_testkit::app::client(&env).await;
    let header = ChallengeAnswer::Use {
        credential: Credential::Header { name: "X-Api-Key".into(), value: "k".into() },
        scope: CredentialScope::Task,
        keep: false,
    };
    let error = client
        .request(dlsession::proto::Request::AnswerChallenge { task, round: None, answer: header })
        .await
        .expect_err("a plain header for a proxy");
    assert!(error.to_string().contains("Proxy-* header"), "{error}");
    let mut child = env
        .command(bin_path("dlsessionctl"))
        .args(["auth", &task.to_string(), "--basic", "u"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{PASSWORD}\n").as_bytes()).unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    let file = dir.join("t");
    wait_until(|| file.exists()).await;
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(62, 300_000)));
}

/// An upload answered 401 in a session that answers: the app's `Header` credential goes
/// with the POST sent again whole (a 401 takes no request). Held in memory only, it is gone
/// after a restart, so the next upload is asked again; answered `Cancel`, that one
/// completes `cancelled`, sends nothing more, and the app's file is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_asked_for_credentials_goes_again_with_the_apps_header() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let server = UploadServer::start(false).await.unwrap();
    let wants = ("x-api-key".to_owned(), "k-123".to_owned(), "ApiKey realm=\"uploads\"".to_owned());
    server.set_faults(UploadFaults { wants: Some(wants), ..UploadFaults::default() });
    let file = env.path().join("doc.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let header = ChallengeAnswer::Use {
        credential: Credential::Header { name: "X-Api-Key".into(), value: "k-123".into() },
        scope: CredentialScope::ProtectionSpace,
        keep: false,
    };
    let (delegate, mut events) = Recorder::answering(&env.path().join("out"), header);
    let session = Session::attach(config(&env, "t.upauth").answers_challenges(true), delegate).await.unwrap();
    let post = |name: &str| UploadRequest::new(server.url(&format!("/files/{name}")), &file).method(UploadMethod::Post);
    let task = session.upload_tasks(vec![post("doc")], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None, "{:?}", server.records());
    assert_eq!(server.file("doc").as_deref(), Some(&data[..]), "byte-exact");
    let sent: Vec<_> =
        server.records().into_iter().map(|r| (r.status, r.header("x-api-key").map(str::to_owned))).collect();
    assert_eq!(sent, [(401, None), (201, Some("k-123".to_owned()))]);
    match events.seen.iter().find(|e| matches!(e, Seen::Challenge { .. })) {
        Some(Seen::Challenge { challenge, .. }) => {
            assert_eq!((challenge.scheme.as_str(), challenge.realm.as_deref()), ("ApiKey", Some("uploads")));
        }
        other => panic!("a challenge expected: {other:?}"),
    }

    session.wait_idle().await.unwrap();
    drop(session);
    d.kill9();
    d.restart();
    let (delegate, mut events) = Recorder::answering(&env.path().join("out2"), ChallengeAnswer::Cancel);
    let session = Session::attach(config(&env, "t.upauth").answers_challenges(true), delegate).await.unwrap();
    let task = session.upload_tasks(vec![post("doc2")], true).await.unwrap().remove(0);
    let error = events.completion(task.id(), LONG).await.expect("cancelled");
    assert_eq!(error.code, ErrorCode::Cancelled, "{error:?}");
    let to_doc2: Vec<_> = server.records().into_iter().filter(|r| r.path == "/files/doc2").collect();
    assert_eq!(to_doc2.len(), 1, "asked again, then nothing more: {to_doc2:?}");
    assert_eq!((to_doc2[0].status, to_doc2[0].header("x-api-key")), (401, None), "the credential was forgotten");
    assert!(server.file("doc2").is_none());
    assert_eq!(std::fs::read(&file).unwrap(), data, "the app's file is untouched");
}

/// A resumable upload whose resource asks for credentials when the daemon asks it how much
/// it holds (an expired token) is not taken for gone: the app is asked, and the upload goes
/// on from the server's offset with the credential (a POST was failed `cannot_resume`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_resource_that_asks_for_credentials_is_not_forgotten() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let server = UploadServer::start(true).await.unwrap();
    // Big and paced enough that the cut comes while the body is still going out, after the
    // client has read the server's offer (a small body is all in the socket's buffers first).
    let faults = UploadFaults {
        statuses: vec![(2, 401)],
        cut_after: Some(1 << 20),
        rate: Some(3 << 20),
        ..UploadFaults::default()
    };
    server.set_faults(faults);
    let file = env.path().join("doc.bin");
    let data: Vec<u8> = (0..(6u32 << 20)).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let header = ChallengeAnswer::Use {
        credential: Credential::Header { name: "X-Api-Key".into(), value: "k-9".into() },
        scope: CredentialScope::Task,
        keep: false,
    };
    let (delegate, mut events) = Recorder::answering(&env.path().join("out"), header);
    let session = Session::attach(config(&env, "t.headauth").answers_challenges(true), delegate).await.unwrap();
    let post = UploadRequest::new(server.url("/files/doc"), &file).method(UploadMethod::Post);
    let task = session.upload_tasks(vec![post], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None, "{:?}", server.records());
    assert_eq!(server.file("doc").as_deref(), Some(&data[..]), "byte-exact");
    let sent: Vec<_> = server
        .records()
        .into_iter()
        .map(|r| (r.method.clone(), r.status, r.header("x-api-key").map(str::to_owned)))
        .collect();
    let key = || Some("k-9".to_owned());
    assert_eq!(sent[1..], [("HEAD".into(), 401, None), ("HEAD".into(), 204, key()), ("PATCH".into(), 201, key())]);
}

/// A POST answered `303 See Other` was taken by the server: a 401 on the GET that follows
/// is its answer, and the app is not asked (its answer would send the POST again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_after_a_posts_303_does_not_send_the_post_again() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = server().await;
    s.add(
        "/submit",
        Resource::bytes("").fault(Hits::All, Fault::Redirect { status: 303, location: "/private".into() }),
    );
    let file = env.path().join("form.bin");
    std::fs::write(&file, b"name=value").unwrap();
    let (delegate, mut events) = Recorder::answering(&env.path().join("out"), basic(CredentialScope::Task, false));
    let session = Session::attach(config(&env, "t.see-other").answers_challenges(true), delegate).await.unwrap();
    let post = UploadRequest::new(s.url("/submit"), &file).method(UploadMethod::Post);
    let task = session.upload_tasks(vec![post], true).await.unwrap().remove(0);
    let error = events.completion(task.id(), LONG).await.expect("the 401 is the answer");
    assert_eq!((error.code, error.http_status), (ErrorCode::HttpStatus, Some(401)), "{error:?}");
    let posts: Vec<_> = s.requests_for("/submit").into_iter().map(|r| r.method).collect();
    assert_eq!(posts, ["POST"], "the POST went once");
    assert!(!events.seen.iter().any(|e| matches!(e, Seen::Challenge { .. })), "the app was not asked");
}

/// The same when the GET after a POST's 303 goes through a proxy that asks for credentials
/// on its tunnel: the 407 is the answer, the app is not asked, the POST goes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_challenge_after_a_posts_303_does_not_send_the_post_again() {
    let env = TestEnv::new();
    let ca = TestCa::new().unwrap();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let form = TestServer::start_tls(&ca).await.unwrap();
    let results = TestServer::start_tls(&ca).await.unwrap();
    results.add("/result", Resource::generated(100, 63));
    let location = results.url("/result");
    form.add("/submit", Resource::bytes("").fault(Hits::All, Fault::Redirect { status: 303, location }));
    let proxy = TestProxy::start().await.unwrap();
    proxy.require_auth(GOOD, "Basic realm=\"corp\"");
    let proxy_url = proxy.url();
    // The form's server is reached directly, where its 303 points only through the proxy.
    let direct = form.url("/").trim_start_matches("https://").trim_end_matches('/').to_owned();
    let _d = TestDaemon::start_with_env(
        &env,
        &[("HTTPS_PROXY", std::ffi::OsStr::new(&proxy_url)), ("NO_PROXY", std::ffi::OsStr::new(&direct))],
    );
    let file = env.path().join("form.bin");
    std::fs::write(&file, b"name=value").unwrap();
    let (delegate, mut events) = Recorder::answering(&env.path().join("out"), basic(CredentialScope::Task, false));
    let session = Session::attach(config(&env, "t.see-other-proxy").answers_challenges(true), delegate).await.unwrap();
    let post = UploadRequest::new(form.url("/submit"), &file).method(UploadMethod::Post);
    let task = session.upload_tasks(vec![post], true).await.unwrap().remove(0);
    let error = events.completion(task.id(), LONG).await.expect("the 407 is the answer");
    assert_eq!(error.http_status, Some(407), "{error:?}");
    assert_eq!(form.requests_for("/submit").len(), 1, "the POST went once: {:?}", proxy.records());
    assert!(!events.seen.iter().any(|e| matches!(e, Seen::Challenge { .. })), "the app was not asked");
}

/// A delegate that leaves every challenge for later, noting the round of the last one.
#[derive(Default)]
struct Defer(std::sync::Arc<std::sync::atomic::AtomicU32>);

impl dlsession::SessionDelegate for Defer {
    fn did_receive_challenge(
        &self,
        _: &Session,
        _: &dlsession::DownloadTask,
        challenge: &dlsession::Challenge,
    ) -> Option<ChallengeAnswer> {
        self.0.store(challenge.round, std::sync::atomic::Ordering::SeqCst);
        None
    }
}

/// An app whose delegate leaves a challenge for later can still wait for its session to be
/// idle: the task waits for the app, not for time (it waited until the resource deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_idle_returns_when_only_deferred_challenges_remain() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = server().await;
    s.add("/open", Resource::generated(1000, 64));
    let config = config(&env, "t.later").answers_challenges(true);
    let session = Session::attach(config, Defer::default()).await.unwrap();
    let requests = vec![DownloadRequest::new(s.url("/private")), DownloadRequest::new(s.url("/open"))];
    session.download_tasks(requests, true).await.unwrap();
    let idle = tokio::time::timeout(std::time::Duration::from_secs(20), session.wait_idle()).await;
    idle.expect("idle with only a deferred challenge left").unwrap();
    let info = session.info().await.unwrap();
    assert_eq!(info.tasks.active(), 1, "the challenged task still waits for the app: {info:?}");
}

/// A challenge the delegate left for later and the app then answered no longer counts as
/// waiting for the app: `wait_idle` waits for that task's download to finish (before, it
/// returned while the download still ran, and an app that then exits lost its file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_idle_waits_for_a_download_whose_challenge_was_answered_later() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    s.add("/slow", Resource::generated(6 << 20, 53).throttle(2 << 20).require_auth(GOOD, "Basic realm=\"files\""));
    let config = config(&env, "t.answered-later").answers_challenges(true);
    let seen = std::sync::Arc::new(AtomicU32::new(0));
    let session = Session::attach(config, Defer(seen.clone())).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/slow"))], true).await.unwrap().remove(0);
    // Left for later by the delegate first, then answered.
    wait_until(|| seen.load(Ordering::SeqCst) > 0).await;
    let round = seen.load(Ordering::SeqCst);
    task.answer_challenge_round(round, basic(CredentialScope::Task, false)).await.unwrap();
    let idle = tokio::time::timeout(std::time::Duration::from_secs(30), session.wait_idle()).await;
    idle.expect("idle once the download is done").unwrap();
    let info = task.info().await.unwrap();
    assert_eq!(info.state, dlsession::proto::TaskState::Completed, "idle while it still ran: {info:?}");
}

/// A credential cannot go in a header that frames a body (`Upload-Offset`, `Content-Length`,
/// `Content-Type`): it would replace the daemon's own on a resumed upload's `PATCH`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_cannot_take_a_header_that_frames_a_body() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = server().await;
    let seen = std::sync::Arc::new(AtomicU32::new(0));
    let session =
        Session::attach(config(&env, "t.framing").answers_challenges(true), Defer(seen.clone())).await.unwrap();
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/private"))], true).await.unwrap().remove(0);
    wait_until(|| seen.load(Ordering::SeqCst) > 0).await;
    let round = seen.load(Ordering::SeqCst);
    for name in ["Upload-Offset", "upload-complete", "Content-Type"] {
        let credential = Credential::Header { name: name.into(), value: "0".into() };
        let answer = ChallengeAnswer::Use { credential, scope: CredentialScope::Task, keep: false };
        let err = task.answer_challenge_round(round, answer).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest, "{name}: {err}");
    }
    // The task still waits for a usable answer.
    task.answer_challenge_round(round, basic(CredentialScope::Task, false)).await.unwrap();
    let info = tokio::time::timeout(LONG, async {
        loop {
            let info = task.info().await.unwrap();
            if info.state == dlsession::proto::TaskState::Completed {
                return info;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(info.error, None);
}

/// A task waiting for credentials nobody gives completes `timed_out` (with the server's
/// 401) when its `timeout_for_resource` runs out, as a retry would: it waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_credentials_ends_with_the_resource_deadline() {
    use dlsession::proto::{Request, Response, SessionConfig, TaskSpec};
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = server().await;
    let client = dlsession_testkit::app::client(&env).await;
    let id = || "t.deadline".to_owned();
    let config = SessionConfig { timeout_for_resource_ms: 1500, ..SessionConfig::default() };
    client.request(Request::OpenSession { identifier: id(), config: Some(config) }).await.unwrap();
    client.request(Request::SetSessionChallenges { identifier: id(), answers: true }).await.unwrap();
    let create = Request::CreateTasks { identifier: id(), tasks: vec![TaskSpec::get(s.url("/private"))], resume: true };
    let Response::TasksCreated(ids) = client.request(create).await.unwrap() else { panic!() };
    let info = || async {
        match client.request(Request::GetTask { task: ids[0] }).await.unwrap() {
            Response::Task(detail) => detail.info,
            other => panic!("{other:?}"),
        }
    };
    let started = std::time::Instant::now();
    loop {
        let t = info().await;
        if t.state == dlsession::TaskState::Completed {
            let error = t.error.expect("an error");
            assert_eq!((error.code, error.http_status), (ErrorCode::TimedOut, Some(401)), "{error:?}");
            assert!(error.message.contains("waiting for the app's credentials"), "{error:?}");
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(15), "still {:?} after 15 s", t.state);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A task waiting for credentials keeps waiting across SIGKILL (the same challenge, the
/// same round), and `--challenges fail` then fails it with the server's 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_challenge_survives_a_crash_and_fails_when_the_session_stops_asking() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let s = server().await;
    s.add("/public", Resource::generated(1_000, 54));
    let dir = env.path().join("files");
    let get = |url: String| env.ctl(&["get", "--session", "t.crash", "-d", dir.to_str().unwrap(), &url]);
    assert!(get(s.url("/public")).status.success());
    assert!(env.ctl(&["policy", "t.crash", "--challenges", "ask"]).status.success());
    assert!(get(s.url("/private")).status.success());
    let waiting = || {
        let json: serde_json::Value =
            serde_json::from_slice(&env.ctl(&["--json", "tasks", "--session", "t.crash"]).stdout).unwrap();
        json.as_array().unwrap().iter().find(|t| t["wait"]["reason"] == "auth_required").cloned()
    };
    wait_until(|| waiting().is_some()).await;
    let before = waiting().unwrap();
    d.kill9();
    d.restart();
    let after = waiting().unwrap_or_else(|| panic!("still waiting after the crash"));
    assert_eq!((&after["id"], &after["wait"]), (&before["id"], &before["wait"]), "the same challenge");
    assert_eq!(s.requests_for("/private").len(), 1, "not sent again by the restart");

    assert!(env.ctl(&["policy", "t.crash", "--challenges", "fail"]).status.success());
    let task = after["id"].as_u64().unwrap().to_string();
    wait_until(|| show_field(&stdout(&env.ctl(&["show", &task])), "state") == "completed").await;
    let text = stdout(&env.ctl(&["show", &task]));
    assert!(show_field(&text, "error").starts_with("http_status: server answered 401"), "{text}");
}
