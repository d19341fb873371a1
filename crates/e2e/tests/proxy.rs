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
