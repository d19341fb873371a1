//! Cookies (docs/behaviour.md, "Cookies"): a session keeps what servers set and sends it
//! back, across redirects, retries and daemon restarts; never shows or logs the values;
//! keeps none when told.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use dlsession::{DownloadRequest, Session};
use dlsession_testkit::app::config;
use dlsession_testkit::cli::stdout;
use dlsession_testkit::{
    Fault, Hits, LONG, Recorder, Resource, Seen, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex,
    wait_until,
};

const SECRET: &str = "sid=s3cr3t-v4lue";

/// A login that sets a session cookie and redirects to the file, which wants the cookie.
async fn server() -> TestServer {
    let s = TestServer::start().await.unwrap();
    s.add(
        "/login",
        Resource::bytes("")
            .set_cookie(&format!("{SECRET}; Path=/; HttpOnly"))
            .fault(Hits::All, Fault::Redirect { status: 302, location: "/file".into() }),
    );
    s.add("/file", Resource::generated(200_000, 41).require_cookie(SECRET));
    // Cut off the first time: the retry must carry the cookie too.
    s.add(
        "/flaky",
        Resource::generated(300_000, 42).require_cookie(SECRET).fault(Hits::First(1), Fault::ResetAfter(100_000)),
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_cookie_is_kept_sent_back_and_survives_a_crash() {
    let env = TestEnv::new();
    // Every level logged: no cookie value may reach the log at any.
    let mut d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_LOG", std::ffi::OsStr::new("trace"))]);
    let s = server().await;
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.cookies"), delegate).await.unwrap();
    let login = session.download_tasks(vec![DownloadRequest::new(s.url("/login"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(login.id(), LONG).await, None, "the redirect carried the cookie set with it");
    let file = events.moved_to(login.id()).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(41, 200_000)));

    // Shown as a count, never the value; never logged.
    let out = env.ctl(&["policy", "t.cookies"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("keeps cookies (1 stored)"), "{text}");
    let json: serde_json::Value = serde_json::from_slice(&env.ctl(&["--json", "policy", "t.cookies"]).stdout).unwrap();
    assert_eq!((json["cookies"].clone(), json["cookies_stored"].clone()), (true.into(), 1.into()), "{json}");
    assert!(!text.contains("s3cr3t") && !json.to_string().contains("s3cr3t"));

    // SIGKILL: the cookie was stored before the download it came with completed.
    drop(session);
    d.kill9();
    d.restart();
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let session = Session::attach(config(&env, "t.cookies"), delegate).await.unwrap();
    let tasks = vec![DownloadRequest::new(s.url("/file")), DownloadRequest::new(s.url("/flaky"))];
    let tasks = session.download_tasks(tasks, true).await.unwrap();
    assert_eq!(events.completion(tasks[0].id(), LONG).await, None, "the stored cookie after a restart");
    assert_eq!(events.completion(tasks[1].id(), LONG).await, None, "and on the retry");
    assert_eq!(sha256_file(&events.moved_to(tasks[1].id()).unwrap()).unwrap(), to_hex(&pattern_sha256(42, 300_000)));
    let flaky = s.requests_for("/flaky");
    assert!(flaky.len() >= 2, "{flaky:?}");
    assert!(flaky.iter().all(|r| r.header("cookie").is_some_and(|c| c.contains(SECRET))), "{flaky:?}");
    assert!(!d.log().contains("s3cr3t"), "a cookie value reached the log");

    // Switched off: the cookies go, and the file is refused again.
    let out = env.ctl(&["policy", "t.cookies", "--cookies", "off"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no cookies"), "{out:?}");
    let again = session.download_tasks(vec![DownloadRequest::new(s.url("/file"))], true).await.unwrap().remove(0);
    let error = events.completion(again.id(), LONG).await.expect("refused without the cookie");
    assert_eq!(error.http_status, Some(403), "{error:?}");
    assert!(s.requests_for("/file").last().unwrap().header("cookie").is_none());
}

/// A session configured without cookies sends and keeps none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_may_keep_no_cookies() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = server().await;
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.nocookies").cookies(false), delegate).await.unwrap();
    let login = session.download_tasks(vec![DownloadRequest::new(s.url("/login"))], true).await.unwrap().remove(0);
    let error = events.completion(login.id(), LONG).await.expect("the file wants the cookie");
    assert_eq!(error.http_status, Some(403), "{error:?}");
    let json: serde_json::Value =
        serde_json::from_slice(&env.ctl(&["--json", "policy", "t.nocookies"]).stdout).unwrap();
    assert_eq!((json["cookies"].clone(), json["cookies_stored"].clone()), (false.into(), 0.into()), "{json}");
}

/// A session's cookies go with it, from the database too: a new session of the same
/// identifier, after a restart, has none and sends none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_go_with_their_session() {
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let s = server().await;
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(config(&env, "t.gone"), delegate).await.unwrap();
    let login = session.download_tasks(vec![DownloadRequest::new(s.url("/login"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(login.id(), LONG).await, None);
    assert!(stdout(&env.ctl(&["policy", "t.gone"])).contains("keeps cookies (1 stored)"));
    session.invalidate_and_cancel().await.unwrap();
    events.wait("did_become_invalid", LONG, |e| *e == Seen::Invalid).await;
    // Gone once the app has acknowledged that.
    wait_until(|| !stdout(&env.ctl(&["sessions"])).contains("t.gone")).await;
    drop(session);
    d.kill9();
    d.restart();

    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let session = Session::attach(config(&env, "t.gone"), delegate).await.unwrap();
    let file = session.download_tasks(vec![DownloadRequest::new(s.url("/file"))], true).await.unwrap().remove(0);
    let error = events.completion(file.id(), LONG).await.expect("refused without the cookie");
    let out = env.ctl(&["policy", "t.gone"]);
    assert!(stdout(&out).contains("keeps cookies (0 stored)"), "{out:?}");
    // Nothing of the old jar is left on disk either.
    let db = rusqlite::Connection::open_with_flags(env.database(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let jars: i64 = db.query_row("SELECT count(*) FROM cookie_jars", [], |r| r.get(0)).unwrap();
    assert_eq!(jars, 0, "the invalidated session's jar was deleted");
    assert_eq!(error.http_status, Some(403), "{error:?}");
    assert!(s.requests_for("/file").last().unwrap().header("cookie").is_none());
}
