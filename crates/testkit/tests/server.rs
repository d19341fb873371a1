#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Tests of the scripted server over real sockets on 127.0.0.1.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dlsession_testkit::{Fault, Hits, Resource, TestCa, TestServer, pattern_sha256, sha256_hex, to_hex};
use http_body_util::{BodyExt, Empty};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A parsed HTTP/1.1 response, read until the server closed the connection.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The error that ended reading, if the connection did not end with a clean EOF.
    read_error: Option<std::io::ErrorKind>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    fn content_length(&self) -> Option<u64> {
        self.header("content-length").map(|v| v.parse().unwrap())
    }
}

fn request_text(method: &str, path: &str, extra: &[(&str, &str)]) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (n, v) in extra {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> Resp {
    stream.write_all(request_text(method, path, extra).as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut read_error = None;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => {
                read_error = Some(e.kind());
                break;
            }
        }
    }
    parse_response(&raw, method == "HEAD", read_error)
}

fn parse_response(raw: &[u8], head_only: bool, read_error: Option<std::io::ErrorKind>) -> Resp {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!("no complete response head in {} bytes: {:?}", raw.len(), String::from_utf8_lossy(raw))
    });
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if chunked && !head_only {
        body = dechunk(&body);
    }
    Resp { status, headers, body, read_error }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

async fn get(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> Resp {
    exchange(TcpStream::connect(addr).await.unwrap(), "GET", path, extra).await
}

#[tokio::test]
async fn full_get_and_head() {
    let server = TestServer::start().await.unwrap();
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let res = Resource::bytes(body.clone());
    let etag = res.etag_value().unwrap().to_owned();
    assert_eq!(res.sha256_hex(), sha256_hex(&body));
    server.add("/a.bin", res);

    assert!(server.base_url().starts_with("http://127.0.0.1:"));
    assert_eq!(server.url("/a.bin"), format!("http://127.0.0.1:{}/a.bin", server.addr().port()));

    let r = get(server.addr(), "/a.bin", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), Some(100_000));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert!(etag.starts_with('"') && etag.ends_with('"'));
    assert_eq!(r.header("last-modified"), Some("Wed, 21 Oct 2015 07:28:00 GMT"));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(sha256_hex(&r.body), sha256_hex(&body));
    assert!(r.read_error.is_none());

    let h = exchange(TcpStream::connect(server.addr()).await.unwrap(), "HEAD", "/a.bin", &[]).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.content_length(), Some(100_000));
    assert_eq!(h.header("etag"), Some(etag.as_str()));
    assert!(h.body.is_empty());

    assert_eq!(server.hits("/a.bin"), 2);
    assert_eq!(server.bytes_sent("/a.bin"), 100_000);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(reqs[1].method, "HEAD");
    assert_eq!(reqs[0].version, http::Version::HTTP_11);
    assert_eq!(reqs[0].header("HOST"), Some("localhost"));

    let missing = get(server.addr(), "/nope", &[]).await;
    assert_eq!(missing.status, 404);
    assert_eq!(server.hits("/nope"), 1);
}

#[tokio::test]
async fn range_requests() {
    let server = TestServer::start().await.unwrap();
    let body: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
    server.add("/r", Resource::bytes(body.clone()).etag("\"v1\""));

    let r = get(server.addr(), "/r", &[("Range", "bytes=100-199")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 100-199/1000"));
    assert_eq!(r.content_length(), Some(100));
    assert_eq!(r.body, body[100..200]);

    let r = get(server.addr(), "/r", &[("Range", "bytes=900-")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 900-999/1000"));
    assert_eq!(r.body, body[900..]);

    // If-Range matching the ETag: range honoured.
    let r = get(server.addr(), "/r", &[("Range", "bytes=10-"), ("If-Range", "\"v1\"")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, body[10..]);
    // If-Range matching Last-Modified exactly: range honoured.
    let r = get(server.addr(), "/r", &[("Range", "bytes=10-"), ("If-Range", "Wed, 21 Oct 2015 07:28:00 GMT")]).await;
    assert_eq!(r.status, 206);
    // If-Range mismatch: full 200.
    let r = get(server.addr(), "/r", &[("Range", "bytes=10-"), ("If-Range", "\"v0\"")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-range"), None);
    assert_eq!(r.body, body);

    // Start beyond the end: 416.
    let r = get(server.addr(), "/r", &[("Range", "bytes=1000-")]).await;
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */1000"));

    // The log records Range and If-Range.
    let reqs = server.requests_for("/r");
    assert_eq!(reqs.len(), 6);
    assert_eq!(reqs[0].range.as_deref(), Some("bytes=100-199"));
    assert_eq!(reqs[0].if_range, None);
    assert_eq!(reqs[2].if_range.as_deref(), Some("\"v1\""));
    assert_eq!(reqs[4].range.as_deref(), Some("bytes=10-"));
    assert_eq!(reqs[4].if_range.as_deref(), Some("\"v0\""));
    assert!(server.requests_for("/other").is_empty());
}

#[tokio::test]
async fn status_fault_then_success() {
    let server = TestServer::start().await.unwrap();
    server.add(
        "/s",
        Resource::bytes("hello").fault(Hits::First(1), Fault::Status { code: 503, retry_after: Some("2".into()) }),
    );
    let r = get(server.addr(), "/s", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("2"));
    assert!(String::from_utf8_lossy(&r.body).contains("503"));
    let r = get(server.addr(), "/s", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello");
    assert_eq!(server.hits("/s"), 2);
}

#[tokio::test]
async fn reset_short_and_long_bodies() {
    let server = TestServer::start().await.unwrap();
    server.add("/reset", Resource::generated(1 << 20, 5).fault(Hits::All, Fault::ResetAfter(100_000)));
    let r = get(server.addr(), "/reset", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), Some(1 << 20));
    assert!((r.body.len() as u64) < (1 << 20), "got {} bytes", r.body.len());
    assert!(r.body.len() <= 100_000);
    assert_eq!(r.read_error, Some(std::io::ErrorKind::ConnectionReset), "ResetAfter must end in a TCP reset");
    assert_eq!(server.bytes_sent("/reset"), 100_000);

    // Range + reset: the bytes before the reset are the right slice.
    let r = get(server.addr(), "/reset", &[("Range", "bytes=1000-")]).await;
    assert_eq!(r.status, 206);
    assert!(r.body.len() <= 100_000);
    let mut expect = vec![0u8; r.body.len()];
    dlsession_testkit::fill_pattern(5, 1000, &mut expect);
    assert_eq!(r.body, expect);

    server.add("/short", Resource::generated(500_000, 6).fault(Hits::Nth(1), Fault::ShortBody(1234)));
    let r = get(server.addr(), "/short", &[]).await;
    assert_eq!(r.content_length(), Some(500_000));
    assert_eq!(r.body.len(), 1234);
    assert_eq!(r.read_error, None, "ShortBody must end in a clean close");
    let r = get(server.addr(), "/short", &[]).await;
    assert_eq!(r.body.len(), 500_000);

    server.add("/long", Resource::bytes(vec![7u8; 1000]).fault(Hits::All, Fault::LongContentLength(10)));
    let r = get(server.addr(), "/long", &[]).await;
    assert_eq!(r.content_length(), Some(1010));
    assert_eq!(r.body, vec![7u8; 1000]);
}

#[tokio::test]
async fn stall_and_close_before_headers() {
    let server = TestServer::start().await.unwrap();
    server.add("/stall", Resource::generated(1_000_000, 1).fault(Hits::All, Fault::StallAfter(5000)));
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream.write_all(request_text("GET", "/stall", &[]).as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_millis(700);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await {
        assert!(n > 0, "connection closed during stall");
        got.extend_from_slice(&buf[..n]);
    }
    let split = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert_eq!(got.len() - split - 4, 5000);

    server.add("/close", Resource::bytes("x").fault(Hits::First(1), Fault::CloseBeforeHeaders));
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream.write_all(request_text("GET", "/close", &[]).as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    assert!(raw.is_empty(), "expected no response, got {:?}", String::from_utf8_lossy(&raw));
    assert_eq!(get(server.addr(), "/close", &[]).await.body, b"x");
    assert_eq!(server.hits("/close"), 2);
}

#[tokio::test]
async fn redirect_and_header_faults() {
    let server = TestServer::start().await.unwrap();
    server.add("/old", Resource::bytes("x").fault(Hits::All, Fault::Redirect { status: 302, location: "/new".into() }));
    server.add("/new", Resource::bytes("new body"));
    let r = get(server.addr(), "/old", &[]).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("/new"));
    let r = get(server.addr(), "/new", &[]).await;
    assert_eq!(r.body, b"new body");

    server.add("/slow", Resource::bytes("s").fault(Hits::Nth(1), Fault::SlowHeaders(Duration::from_millis(400))));
    let t = Instant::now();
    let r = get(server.addr(), "/slow", &[]).await;
    assert!(t.elapsed() >= Duration::from_millis(390));
    assert_eq!(r.body, b"s");

    server.add("/huge", Resource::bytes("h").fault(Hits::All, Fault::HugeHeaders(20_000)));
    let r = get(server.addr(), "/huge", &[]).await;
    assert_eq!(r.header("x-padding").map(str::len), Some(20_000));
    assert_eq!(r.body, b"h");
}

#[tokio::test]
async fn range_faults_and_validators() {
    let server = TestServer::start().await.unwrap();
    let body: Vec<u8> = (0..=255u8).collect();
    server.add(
        "/f",
        Resource::bytes(body.clone())
            .fault(Hits::Nth(1), Fault::IgnoreRange)
            .fault(Hits::Nth(2), Fault::WrongContentRange)
            .fault(Hits::Nth(3), Fault::ChangeEtag("\"changed\"".into())),
    );
    let r = get(server.addr(), "/f", &[("Range", "bytes=10-19")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body);
    let r = get(server.addr(), "/f", &[("Range", "bytes=10-19")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 11-19/256"));
    assert_eq!(r.body, body[11..20]);
    let default_etag = Resource::bytes(body.clone()).etag_value().unwrap().to_owned();
    let r = get(server.addr(), "/f", &[("Range", "bytes=10-19"), ("If-Range", &default_etag)]).await;
    assert_eq!(r.status, 200, "If-Range must be compared with the changed ETag");
    assert_eq!(r.header("etag"), Some("\"changed\""));
    let r = get(server.addr(), "/f", &[("Range", "bytes=10-19"), ("If-Range", &default_etag)]).await;
    assert_eq!(r.status, 206);

    server.add("/plain", Resource::bytes(body.clone()).no_validators().no_ranges().no_content_length());
    let r = get(server.addr(), "/plain", &[("Range", "bytes=10-19")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("etag"), None);
    assert_eq!(r.header("last-modified"), None);
    assert_eq!(r.header("accept-ranges"), None);
    assert_eq!(r.header("content-length"), None);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.body, body);

    // A weak ETag never satisfies If-Range.
    server.add("/weak", Resource::bytes(body.clone()).etag("W/\"w\""));
    let r = get(server.addr(), "/weak", &[("Range", "bytes=10-19"), ("If-Range", "W/\"w\"")]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn generated_body_hash() {
    let server = TestServer::start().await.unwrap();
    let len = 3 * 1024 * 1024;
    let res = Resource::generated(len, 1234);
    assert_eq!(res.len(), len);
    assert_eq!(res.sha256_hex(), to_hex(&pattern_sha256(1234, len)));
    server.add("/g", res);
    let r = get(server.addr(), "/g", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), Some(len));
    assert_eq!(sha256_hex(&r.body), to_hex(&pattern_sha256(1234, len)));
    assert_eq!(server.bytes_sent("/g"), len);
}

#[tokio::test]
async fn throttle_paces_body() {
    let server = TestServer::start().await.unwrap();
    server.add("/t", Resource::generated(1 << 20, 3).throttle(2 << 20));
    let t = Instant::now();
    let r = get(server.addr(), "/t", &[]).await;
    let took = t.elapsed();
    assert_eq!(r.body.len(), 1 << 20);
    assert!(took >= Duration::from_millis(300) && took <= Duration::from_secs(2), "took {took:?}");
}

#[tokio::test]
async fn drop_stops_server() {
    let server = TestServer::start().await.unwrap();
    server.add("/stall", Resource::generated(1_000_000, 1).fault(Hits::All, Fault::StallAfter(10)));
    let addr = server.addr();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request_text("GET", "/stall", &[]).as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(n > 0);
    drop(server);
    // The stalled connection is closed...
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "connection still open after drop");
    // ...and nothing accepts any more.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());
}

async fn tls_connect(
    ca: &TestCa,
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(ca.client_config_with_alpn(alpn).unwrap());
    let tcp = TcpStream::connect(addr).await?;
    connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

#[tokio::test]
async fn tls_h2_and_http11() {
    let ca = TestCa::new().unwrap();
    assert!(std::fs::read_to_string(ca.ca_pem_path()).unwrap().contains("BEGIN CERTIFICATE"));
    assert_eq!(std::fs::read_to_string(ca.ca_pem_path()).unwrap(), ca.ca_pem());
    let server = TestServer::start_tls(&ca).await.unwrap();
    assert_eq!(server.base_url(), format!("https://localhost:{}", server.addr().port()));
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    server.add("/s.bin", Resource::bytes(body.clone()));

    // ALPN h2 negotiated; a real HTTP/2 request over it.
    let tls = tls_connect(&ca, server.addr(), &[b"h2", b"http/1.1"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(server.url("/s.bin"))
        .header("range", "bytes=10-")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.headers()["content-range"], "bytes 10-199999/200000");
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got[..], body[10..]);
    let rec = &server.requests_for("/s.bin")[0];
    assert_eq!(rec.version, http::Version::HTTP_2);
    assert_eq!(rec.range.as_deref(), Some("bytes=10-"));
    assert!(rec.header("host").is_some_and(|h| h.starts_with("localhost:")));

    // HTTP/1.1 when only that is offered.
    let tls = tls_connect(&ca, server.addr(), &[b"http/1.1"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let r = exchange(tls, "GET", "/s.bin", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(sha256_hex(&r.body), sha256_hex(&body));
    assert_eq!(server.requests_for("/s.bin")[1].version, http::Version::HTTP_11);
    assert_eq!(server.hits("/s.bin"), 2);
}

#[tokio::test]
async fn tls_h2_faults() {
    let ca = TestCa::new().unwrap();
    let server = TestServer::start_tls(&ca).await.unwrap();
    server.add("/x", Resource::generated(1 << 20, 2).fault(Hits::First(1), Fault::ResetAfter(1000)));
    let tls = tls_connect(&ca, server.addr(), &[b"h2"]).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = || http::Request::builder().uri(server.url("/x")).body(Empty::<Bytes>::new()).unwrap();
    let resp = sender.send_request(req()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.into_body().collect().await.is_err(), "stream must be reset");
    // The connection survives a stream reset; the second request succeeds on it.
    let resp = sender.send_request(req()).await.unwrap();
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(sha256_hex(&got), to_hex(&pattern_sha256(2, 1 << 20)));
}

/// `GracefulResetAfter` over HTTP/2 is what it says: the stream's data stops short and the
/// stream is reset with `NO_ERROR`, not ended (which hyper's client cannot tell apart).
#[tokio::test]
async fn tls_h2_graceful_reset_is_a_no_error_reset() {
    let ca = TestCa::new().unwrap();
    let server = TestServer::start_tls(&ca).await.unwrap();
    let cut = Fault::GracefulResetAfter(100_000);
    server.add("/g", Resource::generated(1 << 20, 3).no_content_length().fault(Hits::All, cut));
    let tls = tls_connect(&ca, server.addr(), &[b"h2"]).await.unwrap();
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move { conn.await.ok() });
    let mut client = client.ready().await.unwrap();
    let (response, _) = client.send_request(http::Request::get(server.url("/g")).body(()).unwrap(), true).unwrap();
    let mut body = response.await.unwrap().into_body();
    let mut got = 0;
    let reset = loop {
        match body.data().await {
            Some(Ok(chunk)) => {
                got += chunk.len();
                body.flow_control().release_capacity(chunk.len()).unwrap();
            }
            Some(Err(e)) => break e,
            None => panic!("the stream ended (END_STREAM) after {got} bytes instead of being reset"),
        }
    };
    assert_eq!(reset.reason(), Some(h2::Reason::NO_ERROR), "{reset}");
    assert_eq!(got, 100_000);
}

#[tokio::test]
async fn tls_expired_leaf_fails_verification() {
    let ca = TestCa::expired().unwrap();
    let server = TestServer::start_tls(&ca).await.unwrap();
    let err = tls_connect(&ca, server.addr(), &[b"h2", b"http/1.1"]).await.unwrap_err();
    assert!(err.to_string().to_lowercase().contains("expired"), "unexpected error: {err}");

    // A different CA is not trusted either.
    let good = TestCa::new().unwrap();
    let server2 = TestServer::start_tls(&good).await.unwrap();
    let other = TestCa::new().unwrap();
    assert!(tls_connect(&other, server2.addr(), &[b"http/1.1"]).await.is_err());
    // While the right CA works.
    assert!(tls_connect(&good, server2.addr(), &[b"http/1.1"]).await.is_ok());
}
