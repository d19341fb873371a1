//! Proxies from the environment (docs/behaviour.md, "HTTP"; curl semantics): https through a CONNECT
//! tunnel, http in absolute form with Proxy-Authorization, NO_PROXY bypassing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::ffi::OsStr;

use dlsession::{DownloadRequest, Session, SessionConfiguration};
use dlsession_testkit::{LONG, Recorder};
use dlsession_testkit::{
    Resource, TestCa, TestDaemon, TestEnv, TestProxy, TestServer, pattern_sha256, sha256_file, to_hex,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_go_through_the_proxy_from_the_environment() {
    let env = TestEnv::new();
    let ca = TestCa::new().unwrap();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let proxy = TestProxy::start().await.unwrap();
    let proxy_url = proxy.url_with_auth("alice", "s3cret");
    let _d = TestDaemon::start_with_env(
        &env,
        &[
            ("HTTP_PROXY", OsStr::new(&proxy_url)),
            ("HTTPS_PROXY", OsStr::new(&proxy_url)),
            ("NO_PROXY", OsStr::new("")),
        ],
    );
    let plain = TestServer::start().await.unwrap();
    plain.add("/p", Resource::generated(300_000, 1));
    let tls = TestServer::start_tls(&ca).await.unwrap();
    tls.add("/t", Resource::generated(300_000, 2));

    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session =
        Session::attach(SessionConfiguration::background("t.proxy").socket(&env.socket), delegate).await.unwrap();
    let tasks = session
        .download_tasks(vec![DownloadRequest::new(plain.url("/p")), DownloadRequest::new(tls.url("/t"))], true)
        .await
        .unwrap();
    for (t, seed) in tasks.iter().zip([1, 2]) {
        assert_eq!(events.completion(t.id(), LONG).await, None);
        assert_eq!(sha256_file(&events.moved_to(t.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(seed, 300_000)));
    }
    let records = proxy.records();
    let basic = "Basic YWxpY2U6czNjcmV0"; // alice:s3cret
    let http = records.iter().find(|r| r.method == "GET").expect("http went through the proxy");
    assert_eq!(http.target, plain.url("/p"), "absolute-form request");
    assert_eq!(http.proxy_authorization.as_deref(), Some(basic));
    let connect = records.iter().find(|r| r.method == "CONNECT").expect("https tunnelled");
    assert_eq!(connect.target, format!("localhost:{}", tls.addr().port()));
    assert_eq!(connect.proxy_authorization.as_deref(), Some(basic));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_hosts_are_reached_directly() {
    let env = TestEnv::new();
    let proxy = TestProxy::start().await.unwrap();
    let _d = TestDaemon::start_with_env(
        &env,
        &[("HTTP_PROXY", OsStr::new(&proxy.url())), ("NO_PROXY", OsStr::new("127.0.0.1,localhost"))],
    );
    let plain = TestServer::start().await.unwrap();
    plain.add("/p", Resource::generated(1000, 3));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session =
        Session::attach(SessionConfiguration::background("t.noproxy").socket(&env.socket), delegate).await.unwrap();
    let t = session.download_tasks(vec![DownloadRequest::new(plain.url("/p"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(t.id(), LONG).await, None);
    assert!(proxy.records().is_empty(), "bypassed: {:?}", proxy.records());
}

/// Started as a CGI program (`REQUEST_METHOD` set), the daemon trusts no proxy variable:
/// there `HTTP_PROXY` may be a request's `Proxy:` header ("httpoxy").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_cgi_the_proxy_variables_are_not_trusted() {
    let env = TestEnv::new();
    let proxy = TestProxy::start().await.unwrap();
    let _d = TestDaemon::start_with_env(
        &env,
        &[
            ("HTTP_PROXY", OsStr::new(&proxy.url())),
            ("NO_PROXY", OsStr::new("")),
            ("REQUEST_METHOD", OsStr::new("GET")),
        ],
    );
    let plain = TestServer::start().await.unwrap();
    plain.add("/p", Resource::generated(1000, 4));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session =
        Session::attach(SessionConfiguration::background("t.cgi").socket(&env.socket), delegate).await.unwrap();
    let t = session.download_tasks(vec![DownloadRequest::new(plain.url("/p"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(t.id(), LONG).await, None);
    assert!(proxy.records().is_empty(), "went through the proxy: {:?}", proxy.records());
}

/// Through a SOCKS5 proxy with a password: `socks5h` hands the proxy the name (no DNS
/// lookup here), TLS runs end to end inside the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_go_through_a_socks5_proxy_with_remote_dns() {
    let env = TestEnv::new();
    let ca = TestCa::new().unwrap();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let socks = dlsession_testkit::TestSocks::start_with_auth("alice", "s3cret").await.unwrap();
    let url = socks.url("socks5h", Some(("alice", "s3cret")));
    let _d = TestDaemon::start_with_env(&env, &[("ALL_PROXY", OsStr::new(&url)), ("NO_PROXY", OsStr::new(""))]);
    let plain = TestServer::start().await.unwrap();
    plain.add("/p", Resource::generated(300_000, 5));
    let tls = TestServer::start_tls(&ca).await.unwrap();
    tls.add("/t", Resource::generated(300_000, 6));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session =
        Session::attach(SessionConfiguration::background("t.socks").socket(&env.socket), delegate).await.unwrap();
    let requests = vec![DownloadRequest::new(plain.url("/p")), DownloadRequest::new(tls.url("/t"))];
    let tasks = session.download_tasks(requests, true).await.unwrap();
    for (t, seed) in tasks.iter().zip([5, 6]) {
        assert_eq!(events.completion(t.id(), LONG).await, None);
        assert_eq!(sha256_file(&events.moved_to(t.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(seed, 300_000)));
    }
    let records = socks.records();
    let named = records.iter().find(|r| r.target == format!("localhost:{}", tls.addr().port()));
    let named = named.unwrap_or_else(|| panic!("the https download went through the proxy: {records:?}"));
    assert!(named.by_name, "the proxy resolved the name: {named:?}");
    assert_eq!(named.user.as_deref(), Some("alice"));
    assert!(records.iter().any(|r| r.target == format!("127.0.0.1:{}", plain.addr().port())), "{records:?}");
    // A plain-http download through SOCKS is a tunnel, not an http proxy: origin-form.
    assert_eq!(plain.requests_for("/p")[0].method, "GET");
}

/// `NO_PROXY` entries with a port (and a CIDR block) bypass the proxy for that port only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_entries_with_a_port_bypass_only_that_port() {
    let env = TestEnv::new();
    let socks = dlsession_testkit::TestSocks::start().await.unwrap();
    let direct = TestServer::start().await.unwrap();
    direct.add("/d", Resource::generated(10_000, 7));
    let proxied = TestServer::start().await.unwrap();
    proxied.add("/x", Resource::generated(10_000, 8));
    let no_proxy = format!("example.invalid, 127.0.0.0/8:{}", direct.addr().port());
    let _d = TestDaemon::start_with_env(
        &env,
        &[("ALL_PROXY", OsStr::new(&socks.url("socks5", None))), ("NO_PROXY", OsStr::new(&no_proxy))],
    );
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session =
        Session::attach(SessionConfiguration::background("t.noport").socket(&env.socket), delegate).await.unwrap();
    let requests = vec![DownloadRequest::new(direct.url("/d")), DownloadRequest::new(proxied.url("/x"))];
    let tasks = session.download_tasks(requests, true).await.unwrap();
    for t in &tasks {
        assert_eq!(events.completion(t.id(), LONG).await, None);
    }
    let targets: Vec<String> = socks.records().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, vec![format!("127.0.0.1:{}", proxied.addr().port())], "only the other port went through");
}

/// An `https://` proxy: TLS to the proxy itself (verified with the extra CA), plain-http
/// downloads in absolute form and https ones through a `CONNECT` tunnel inside it, with
/// the proxy's credentials; one it cannot verify fails with `tls`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_proxy_carries_http_and_https() {
    let ca = TestCa::new().unwrap();
    let env = TestEnv::new();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let proxy = TestProxy::start_tls(&ca).await.unwrap();
    let url = proxy.url_with_auth("bob", "pw");
    let _d = TestDaemon::start_with_env(
        &env,
        &[("HTTP_PROXY", OsStr::new(&url)), ("HTTPS_PROXY", OsStr::new(&url)), ("NO_PROXY", OsStr::new(""))],
    );
    let plain = TestServer::start().await.unwrap();
    plain.add("/p", Resource::generated(100_000, 9));
    let tls = TestServer::start_tls(&ca).await.unwrap();
    tls.add("/s", Resource::generated(200_000, 10));
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let session =
        Session::attach(SessionConfiguration::background("t.httpsproxy").socket(&env.socket), delegate).await.unwrap();
    let requests = vec![DownloadRequest::new(plain.url("/p")), DownloadRequest::new(tls.url("/s"))];
    let tasks = session.download_tasks(requests, true).await.unwrap();
    for t in &tasks {
        assert_eq!(events.completion(t.id(), LONG).await, None);
    }
    assert_eq!(sha256_file(&events.moved_to(tasks[1].id()).unwrap()).unwrap(), to_hex(&pattern_sha256(10, 200_000)));
    let records = proxy.records();
    let basic = format!("Basic {}", "Ym9iOnB3");
    assert!(records.iter().any(|r| r.method == "GET" && r.target == plain.url("/p")), "{records:?}");
    assert!(records.iter().any(|r| r.method == "CONNECT"), "{records:?}");
    assert!(records.iter().all(|r| r.proxy_authorization.as_deref() == Some(basic.as_str())), "{records:?}");

    // A proxy whose certificate is not trusted: tls, at once.
    let other = TestCa::new().unwrap();
    let untrusted = TestProxy::start_tls(&other).await.unwrap();
    let proxy = dlsession::SessionProxy { url: Some(untrusted.url()), no_proxy: String::new() };
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let config = SessionConfiguration::background("t.untrusted").socket(&env.socket).proxy(proxy);
    let session = Session::attach(config, delegate).await.unwrap();
    let t = session.download_tasks(vec![DownloadRequest::new(plain.url("/p"))], true).await.unwrap().remove(0);
    let error = events.completion(t.id(), LONG).await.expect("untrusted proxy");
    assert_eq!(error.code, dlsession::ErrorCode::Tls, "{error:?}");
}

/// A session's own proxy replaces the environment's for its downloads, is stored, and is
/// shown without its password; `direct` bypasses every proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_may_have_its_own_proxy() {
    let env = TestEnv::new();
    let http_proxy = TestProxy::start().await.unwrap();
    let socks = dlsession_testkit::TestSocks::start_with_auth("alice", "s3cret").await.unwrap();
    let mut d = TestDaemon::start_with_env(
        &env,
        &[("HTTP_PROXY", OsStr::new(&http_proxy.url())), ("NO_PROXY", OsStr::new(""))],
    );
    let server = TestServer::start().await.unwrap();
    for (path, seed) in [("/env", 11), ("/socks", 12), ("/direct", 13)] {
        server.add(path, Resource::generated(20_000, seed));
    }
    let socks_url = socks.url("socks5h", Some(("alice", "s3cret")));
    let own = |id: &str, url: Option<&str>| {
        let proxy = dlsession::SessionProxy { url: url.map(str::to_owned), no_proxy: String::new() };
        SessionConfiguration::background(id).socket(&env.socket).proxy(proxy)
    };
    let configs = [
        ("/env", SessionConfiguration::background("t.envproxy").socket(&env.socket)),
        // An upper-case scheme is taken as it is meant (the matcher below reads lower case).
        ("/socks", own("t.ownproxy", Some(&socks_url.replace("socks5h", "SOCKS5H")))),
        ("/direct", own("t.direct", None)),
    ];
    for (path, config) in configs {
        let (delegate, mut events) = Recorder::new(&env.path().join(&path[1..]));
        let session = Session::attach(config, delegate).await.unwrap();
        let t = session.download_tasks(vec![DownloadRequest::new(server.url(path))], true).await.unwrap().remove(0);
        assert_eq!(events.completion(t.id(), LONG).await, None, "{path}");
        // Acknowledged, so that the attach below gets nothing again.
        session.wait_idle().await.unwrap();
    }
    let via_http: Vec<String> = http_proxy.records().into_iter().map(|r| r.target).collect();
    assert_eq!(via_http, vec![server.url("/env")], "only the session without its own proxy used the environment's");
    let via_socks: Vec<String> = socks.records().into_iter().map(|r| r.target).collect();
    assert_eq!(via_socks, vec![format!("127.0.0.1:{}", server.addr().port())]);

    // Stored, and shown without the password.
    d.kill9();
    d.restart();
    let out = env.ctl(&["proxy", "t.ownproxy"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("through socks5h://") && !text.contains("s3cret"), "{text}");
    let out = env.ctl(&["--json", "proxy", "t.direct"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["proxy"]["url"], serde_json::Value::Null, "{json}");
    let out = env.ctl(&["proxy", "t.direct", "env"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("the daemon's environment"), "{out:?}");
    // The session's own NO_PROXY: that server's port goes direct, another server still
    // through the session's SOCKS proxy.
    let other = TestServer::start().await.unwrap();
    other.add("/o", Resource::generated(20_000, 14));
    server.add("/bypass", Resource::generated(20_000, 15));
    let bypass = format!("127.0.0.1:{}", server.addr().port());
    let out = env.ctl(&["proxy", "t.ownproxy", &socks_url, "--no-proxy", &bypass]);
    assert!(out.status.success(), "{out:?}");
    let (delegate, mut events) = Recorder::new(&env.path().join("bypass"));
    let session =
        Session::attach(SessionConfiguration::background("t.ownproxy").socket(&env.socket), delegate).await.unwrap();
    let requests = vec![DownloadRequest::new(server.url("/bypass")), DownloadRequest::new(other.url("/o"))];
    for t in session.download_tasks(requests, true).await.unwrap() {
        assert_eq!(events.completion(t.id(), LONG).await, None);
    }
    let via_socks: Vec<String> = socks.records().into_iter().map(|r| r.target).collect();
    assert_eq!(via_socks[1..], [format!("127.0.0.1:{}", other.addr().port())], "{via_socks:?}");
    assert_eq!(server.requests_for("/bypass").len(), 1, "reached directly");

    // Bad input is refused with the reason.
    for (bad, why) in [("ftp://127.0.0.1:21", "unsupported proxy scheme"), ("http://", "invalid proxy URL")] {
        let out = env.ctl(&["proxy", "t.direct", bad]);
        assert_eq!(out.status.code(), Some(1), "{bad}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{bad}: {out:?}");
    }
}
