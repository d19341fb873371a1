//! A scripted HTTP/1.1 and HTTPS (HTTP/2 + HTTP/1.1) server with fault injection.
//!
//! Register [`Resource`]s on paths with [`TestServer::add`]; every request is logged as a
//! [`RequestRecord`] and per-path hit counts and body bytes are tracked, so tests can assert on
//! what a client actually asked for and how much it re-downloaded.
//!
//! Paths are matched on the URI path only; any query string is ignored (and not recorded).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::content::{fill_pattern, pattern_sha256, sha256_hex, to_hex};
use crate::tls::TestCa;

/// Body chunk size for streamed bodies.
const CHUNK: u64 = 64 * 1024;
/// How long a body waits, after its last data frame, before failing on purpose. This gives hyper
/// the chance to flush the bytes already handed to it, so the client really receives them.
const FLUSH_GRACE: Duration = Duration::from_millis(50);
/// Default `Last-Modified` of every resource.
pub const DEFAULT_LAST_MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";

type RespBody = BoxBody<Bytes, io::Error>;

// ---------------------------------------------------------------------------------------------
// Public scripting types
// ---------------------------------------------------------------------------------------------

/// Which requests to a path a [`Fault`] applies to, by 1-based request number for that path
/// (every request to the path counts, whatever its method).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hits {
    /// Every request.
    All,
    /// Requests `1..=n`.
    First(usize),
    /// Only request `n`.
    Nth(usize),
    /// Requests `n..`.
    From(usize),
}

impl Hits {
    /// Whether request number `n` (1-based) is covered.
    pub fn matches(self, n: usize) -> bool {
        match self {
            Hits::All => true,
            Hits::First(k) => n <= k,
            Hits::Nth(k) => n == k,
            Hits::From(k) => n >= k,
        }
    }
}

/// A misbehaviour to inject into a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Respond with this status, a small HTML body (`<html>error CODE</html>`) and, if given, a
    /// `Retry-After` header.
    Status { code: u16, retry_after: Option<String> },
    /// Send a normal head (200/206 with the correct `Content-Length`), then abort after this many
    /// body bytes. On HTTP/1.x the TCP connection is reset (RST); on HTTP/2 the stream is reset.
    ResetAfter(u64),
    /// Send this many body bytes, then end: HTTP/2 resets the stream with `NO_ERROR` (which
    /// RFC 9113 allows only after a complete response, and hyper's client reads as the
    /// body's end); HTTP/1.x aborts the body as `ShortBody` does.
    GracefulResetAfter(u64),
    /// Send this many body bytes, then send nothing more, keeping the connection open.
    StallAfter(u64),
    /// Read the request, then drop the connection without any response (HTTP/2: reset the stream).
    CloseBeforeHeaders,
    /// Serve 200 with the full body even if a `Range` was sent.
    IgnoreRange,
    /// On a range request answer 206, but with a `Content-Range` whose start is one too high, and
    /// the body taken from that wrong offset.
    WrongContentRange,
    /// Leave `Last-Modified` out of this response (it still decides `If-Range`), as a
    /// server may in a 206 (RFC 9110 15.3.7 asks only for the `ETag` there).
    NoLastModified,
    /// On a range request answer 206 with an unknown total (`bytes N-M/*`), and a
    /// `Content-Length` and body this many bytes shorter than that range, ending cleanly.
    ShortRangeOfUnknownTotal(u64),
    /// On a range request answer 206 with an unknown total and a `Content-Range` that ends
    /// this many bytes before the resource does, no `Content-Length`, and the body to the
    /// resource's end: more than the range announced.
    LongRangeOfUnknownTotal(u64),
    /// On a range request answer 206 with at most this many bytes of it (`bytes N-M/T`, or
    /// `/*` with `unknown_total`), exactly those bytes: a server that caps its ranges.
    CappedRange { most: u64, unknown_total: bool },
    /// On a range request answer `416` with `bytes */N`, N where the range starts: a server
    /// (or a cache) whose copy ends exactly where the client's partial data does.
    EndsWhereTheRangeStarts,
    /// Serve the same body but with this `ETag` (also used for the `If-Range` comparison).
    ChangeEtag(String),
    /// Serve the same body but with this `Last-Modified` (also used for the `If-Range`
    /// comparison).
    ChangeLastModified(String),
    /// Declare the correct `Content-Length` but stop after this many body bytes: HTTP/1.x closes
    /// the connection (FIN, no reset), HTTP/2 resets the stream.
    ShortBody(u64),
    /// Declare a `Content-Length` this many bytes larger than the body, send the body, then close
    /// the connection (HTTP/2: reset the stream).
    LongContentLength(u64),
    /// Answer with this redirect status and `Location` (used verbatim, byte for byte:
    /// absolute or relative, raw UTF-8 included).
    Redirect { status: u16, location: String },
    /// Wait this long before sending the response head (then respond normally).
    SlowHeaders(Duration),
    /// Wait this long, then answer `302 Found` to `location`.
    SlowRedirect { after: Duration, location: String },
    /// Add one `X-Padding` header of this many bytes (then respond normally).
    HugeHeaders(usize),
    /// Add `Content-Encoding` with this value to the response (the body stays as it is).
    ContentEncoding(String),
    /// Leave `ETag` out of this response.
    NoEtag,
}

#[derive(Clone)]
enum Content {
    Bytes(Bytes),
    Generated { len: u64, seed: u64 },
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::Bytes(b) => b.len() as u64,
            Content::Generated { len, .. } => *len,
        }
    }
}

/// What a path serves: a body (in memory or generated on the fly) plus behaviour knobs.
#[derive(Clone)]
pub struct Resource {
    content: Content,
    etag: Option<String>,
    last_modified: Option<String>,
    ranges: bool,
    /// Answer a request without `Range` with 206 and a `Content-Range` of the whole body.
    whole_as_206: bool,
    content_length: bool,
    throttle: Option<u64>,
    faults: Vec<(Hits, Fault)>,
    /// `Set-Cookie` values sent with every response of this path (redirects and errors too).
    set_cookies: Vec<String>,
    /// A `name=value` the request's `Cookie` header must hold, else 403.
    required_cookie: Option<String>,
    /// (`Authorization` value wanted, `WWW-Authenticate` sent without it).
    required_auth: Option<(String, String)>,
    /// More headers sent with every response of its body (200, 206).
    headers: Vec<(String, String)>,
    sha: Arc<OnceLock<String>>,
}

impl fmt::Debug for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.content {
            Content::Bytes(_) => "bytes".to_owned(),
            Content::Generated { seed, .. } => format!("generated(seed={seed})"),
        };
        f.debug_struct("Resource")
            .field("content", &kind)
            .field("len", &self.len())
            .field("etag", &self.etag)
            .field("last_modified", &self.last_modified)
            .field("ranges", &self.ranges)
            .field("content_length", &self.content_length)
            .field("throttle", &self.throttle)
            .field("faults", &self.faults)
            .finish()
    }
}

impl Resource {
    fn with_content(content: Content, etag: String, sha: Option<String>) -> Resource {
        let cell = OnceLock::new();
        if let Some(sha) = sha {
            let _ = cell.set(sha);
        }
        Resource {
            content,
            etag: Some(etag),
            last_modified: Some(DEFAULT_LAST_MODIFIED.to_owned()),
            ranges: true,
            whole_as_206: false,
            content_length: true,
            throttle: None,
            faults: Vec::new(),
            set_cookies: Vec::new(),
            required_cookie: None,
            required_auth: None,
            headers: Vec::new(),
            sha: Arc::new(cell),
        }
    }

    /// An in-memory body. Default ETag: `"` + the first 16 hex digits of its SHA-256 + `"`.
    pub fn bytes(body: impl Into<Bytes>) -> Resource {
        let body: Bytes = body.into();
        let sha = sha256_hex(&body);
        let etag = format!("\"{}\"", &sha[..16]);
        Resource::with_content(Content::Bytes(body), etag, Some(sha))
    }

    /// A body of `len` pattern bytes for `seed` (see [`crate::content`]), generated while streaming.
    /// Default ETag: `"g<seed hex>-<len hex>"`.
    pub fn generated(len: u64, seed: u64) -> Resource {
        Resource::with_content(Content::Generated { len, seed }, format!("\"g{seed:x}-{len:x}\""), None)
    }

    /// Lowercase hex SHA-256 of the full body (computed once, then cached).
    pub fn sha256_hex(&self) -> String {
        self.sha
            .get_or_init(|| match &self.content {
                Content::Bytes(b) => sha256_hex(b),
                Content::Generated { len, seed } => to_hex(&pattern_sha256(*seed, *len)),
            })
            .clone()
    }

    /// Length of the full body.
    pub fn len(&self) -> u64 {
        self.content.len()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The full body as bytes (materialises generated bodies: only for small ones).
    pub fn body(&self) -> Bytes {
        match &self.content {
            Content::Bytes(b) => b.clone(),
            Content::Generated { len, seed } => {
                let mut buf = BytesMut::zeroed(usize::try_from(*len).expect("body too large to materialise"));
                fill_pattern(*seed, 0, &mut buf);
                buf.freeze()
            }
        }
    }

    /// The ETag sent (if any), quotes included.
    pub fn etag_value(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// The `Last-Modified` sent (if any).
    pub fn last_modified_value(&self) -> Option<&str> {
        self.last_modified.as_deref()
    }

    /// Use this ETag (give it with its quotes, e.g. `"\"v2\""`, or `W/"..."` for a weak one).
    pub fn etag(mut self, etag: &str) -> Self {
        self.etag = Some(etag.to_owned());
        self
    }

    /// Use this `Last-Modified` (an HTTP date string, sent and compared verbatim).
    pub fn last_modified(mut self, http_date: &str) -> Self {
        self.last_modified = Some(http_date.to_owned());
        self
    }

    /// Send neither `ETag` nor `Last-Modified`.
    pub fn no_validators(mut self) -> Self {
        self.etag = None;
        self.last_modified = None;
        self
    }

    /// Ignore `Range`: always 200 with the full body, and no `Accept-Ranges`.
    pub fn no_ranges(mut self) -> Self {
        self.ranges = false;
        self
    }

    /// Send no `Content-Length` (HTTP/1.1: chunked transfer encoding).
    pub fn no_content_length(mut self) -> Self {
        self.content_length = false;
        self
    }

    /// Pace the body at about `bytes_per_sec` (0 = unthrottled).
    /// Sends `Set-Cookie: value` with every response of this path (redirects included).
    pub fn set_cookie(mut self, value: &str) -> Self {
        self.set_cookies.push(value.to_owned());
        self
    }

    /// Answers 403 unless the request's `Cookie` header holds `pair` (`name=value`).
    pub fn require_cookie(mut self, pair: &str) -> Self {
        self.required_cookie = Some(pair.to_owned());
        self
    }

    /// Answers 401 with `WWW-Authenticate: challenge` unless the request's
    /// `Authorization` is exactly `authorization`.
    pub fn require_auth(mut self, authorization: &str, challenge: &str) -> Self {
        self.required_auth = Some((authorization.to_owned(), challenge.to_owned()));
        self
    }

    pub fn throttle(mut self, bytes_per_sec: u64) -> Self {
        self.throttle = (bytes_per_sec > 0).then_some(bytes_per_sec);
        self
    }

    /// Answer a request without `Range` with 206 and a `Content-Range` of the whole body, as
    /// some servers do.
    pub fn whole_as_206(mut self) -> Self {
        self.whole_as_206 = true;
        self
    }

    /// Send this header with every response of the body (200, 206), as it is.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Add a fault. Several are allowed; the first whose `on` matches the request number applies.
    pub fn fault(mut self, on: Hits, fault: Fault) -> Self {
        self.faults.push((on, fault));
        self
    }
}

/// One request as received (recorded before any fault applies).
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    /// URI path, without query.
    pub path: String,
    pub version: Version,
    /// Header names are lowercase. For HTTP/2 a `host` header is synthesised from `:authority`
    /// when the request has none.
    pub headers: Vec<(String, String)>,
    pub range: Option<String>,
    pub if_range: Option<String>,
}

impl RequestRecord {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct State {
    resources: HashMap<String, Resource>,
    requests: Vec<RequestRecord>,
    hits: HashMap<String, usize>,
    sent: HashMap<String, Arc<AtomicU64>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    connections: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A scripted server on 127.0.0.1. Dropping it stops accepting and ends every connection.
pub struct TestServer {
    addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    accept_tasks: Vec<JoinHandle<()>>,
    // Dropping the sender tells every connection and stream task to stop.
    _shutdown: watch::Sender<()>,
}

impl fmt::Debug for TestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestServer").field("addr", &self.addr).field("tls", &self.tls).finish_non_exhaustive()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        for t in &self.accept_tasks {
            t.abort();
        }
    }
}

impl TestServer {
    /// Plain HTTP/1.1 on `127.0.0.1:<ephemeral>`.
    pub async fn start() -> anyhow::Result<TestServer> {
        Self::start_inner(None, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)).await
    }

    /// Plain HTTP/1.1 on `ip:<ephemeral>` (say, an address inside a network namespace).
    pub async fn start_on(ip: IpAddr) -> anyhow::Result<TestServer> {
        Self::start_inner(None, SocketAddr::new(ip, 0)).await
    }

    /// Plain HTTP/1.1 on `addr` (say, the port a server had before it was stopped).
    pub async fn start_at(addr: SocketAddr) -> anyhow::Result<TestServer> {
        Self::start_inner(None, addr).await
    }

    /// HTTPS on `127.0.0.1:<ephemeral>` (and, best effort, the same port on `[::1]`, since
    /// `localhost` may resolve there first) presenting `ca`'s leaf certificate. Serves HTTP/2
    /// when ALPN negotiates `h2`, else HTTP/1.1.
    pub async fn start_tls(ca: &TestCa) -> anyhow::Result<TestServer> {
        Self::start_inner(
            Some(tokio_rustls::TlsAcceptor::from(ca.server_config())),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        )
        .await
    }

    /// HTTPS that wants a client certificate `ca` issued (see `TestCa::client_identity`).
    pub async fn start_mutual_tls(ca: &TestCa) -> anyhow::Result<TestServer> {
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.mutual_server_config());
        Self::start_inner(Some(acceptor), SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)).await
    }

    async fn start_inner(tls: Option<tokio_rustls::TlsAcceptor>, addr: SocketAddr) -> anyhow::Result<TestServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = watch::channel(());
        let exec = Exec { shutdown: rx };
        let mut accept_tasks =
            vec![tokio::spawn(accept_loop(listener, Arc::clone(&shared), tls.clone(), exec.clone()))];
        if tls.is_some() {
            match TcpListener::bind((Ipv6Addr::LOCALHOST, addr.port())).await {
                Ok(l6) => accept_tasks.push(tokio::spawn(accept_loop(l6, Arc::clone(&shared), tls.clone(), exec))),
                Err(e) => tracing::debug!("testkit: no [::1]:{} listener: {e}", addr.port()),
            }
        }
        Ok(TestServer { addr, tls: tls.is_some(), shared, accept_tasks, _shutdown: tx })
    }

    /// The listening address (127.0.0.1 unless started with [`TestServer::start_on`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether this is the HTTPS server.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// `http://127.0.0.1:PORT` or `https://localhost:PORT`.
    pub fn base_url(&self) -> String {
        if self.tls { format!("https://localhost:{}", self.addr.port()) } else { format!("http://{}", self.addr) }
    }

    /// `base_url() + path` (`path` starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url(), path)
    }

    /// Register (or replace) what `path` serves.
    pub fn add(&self, path: &str, resource: Resource) {
        self.shared.lock().resources.insert(path.to_owned(), resource);
    }

    /// Unregister `path` (it then answers 404).
    pub fn remove(&self, path: &str) {
        self.shared.lock().resources.remove(path);
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }

    /// The requests for `path`, in arrival order.
    pub fn requests_for(&self, path: &str) -> Vec<RequestRecord> {
        self.shared.lock().requests.iter().filter(|r| r.path == path).cloned().collect()
    }

    /// Number of requests received for `path`.
    pub fn hits(&self, path: &str) -> usize {
        self.shared.lock().hits.get(path).copied().unwrap_or(0)
    }

    /// Body bytes handed to the HTTP layer for `path`, summed over all requests.
    pub fn bytes_sent(&self, path: &str) -> u64 {
        self.shared.lock().sent.get(path).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Number of TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }
}

/// Spawns tasks that end when the server is dropped. Also hyper's executor for HTTP/2 streams.
#[derive(Clone)]
struct Exec {
    shutdown: watch::Receiver<()>,
}

impl<F> hyper::rt::Executor<F> for Exec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = shutdown.changed() => {}
            }
        });
    }
}

/// Per-connection control shared between the socket wrapper and response bodies.
#[derive(Default)]
struct ConnCtl {
    /// When set, the socket is closed with SO_LINGER=0 (an RST) instead of a FIN.
    reset: AtomicBool,
}

/// The accepted socket, able to end in an RST on request.
struct ConnIo {
    inner: TcpStream,
    ctl: Arc<ConnCtl>,
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if self.ctl.reset.load(Ordering::SeqCst) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<tokio_rustls::TlsAcceptor>, exec: Exec) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                tracing::warn!("testkit: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let ctl = Arc::new(ConnCtl::default());
        let io = ConnIo { inner: stream, ctl: Arc::clone(&ctl) };
        hyper::rt::Executor::execute(&exec, serve_connection(io, ctl, Arc::clone(&shared), tls.clone(), exec.clone()));
    }
}

async fn serve_connection(
    io: ConnIo,
    ctl: Arc<ConnCtl>,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    exec: Exec,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let shared = Arc::clone(&shared);
        let ctl = Arc::clone(&ctl);
        async move { handle(&shared, &ctl, req).await }
    });
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match tls {
        None => hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), service)
            .await
            .map_err(Into::into),
        Some(acceptor) => {
            let stream = match acceptor.accept(io).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("testkit: TLS handshake failed: {e}");
                    return;
                }
            };
            hyper_util::server::conn::auto::Builder::new(exec).serve_connection(TokioIo::new(stream), service).await
        }
    };
    if let Err(e) = result {
        tracing::debug!("testkit: connection ended with error: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------------

enum RangeReq {
    /// No usable Range header: serve the full body.
    Full,
    /// Inclusive byte range.
    Range(u64, u64),
    /// 416.
    Unsatisfiable,
}

/// Parse a `Range` header value against a body of `len` bytes. Multiple ranges and malformed
/// values are ignored (full body), as RFC 9110 allows.
fn parse_range(value: &str, len: u64) -> RangeReq {
    let value = value.trim();
    let Some((unit, spec)) = value.split_once('=') else { return RangeReq::Full };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return RangeReq::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeReq::Full };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix range: the last N bytes.
        let Ok(n) = last.parse::<u64>() else { return RangeReq::Full };
        if n == 0 || len == 0 {
            return RangeReq::Unsatisfiable;
        }
        return RangeReq::Range(len.saturating_sub(n), len - 1);
    }
    let Ok(start) = first.parse::<u64>() else { return RangeReq::Full };
    let end = if last.is_empty() {
        None
    } else {
        match last.parse::<u64>() {
            Ok(e) if e >= start => Some(e),
            _ => return RangeReq::Full,
        }
    };
    if start >= len {
        return RangeReq::Unsatisfiable;
    }
    RangeReq::Range(start, end.map_or(len - 1, |e| e.min(len - 1)))
}

fn header_str<B>(req: &Request<B>, name: header::HeaderName) -> Option<String> {
    req.headers().get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn small_response(status: StatusCode, content_type: &str, body: String) -> Response<RespBody> {
    let len = body.len();
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("text/html")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

fn empty_body() -> RespBody {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

async fn handle(shared: &Shared, ctl: &Arc<ConnCtl>, req: Request<Incoming>) -> Result<Response<RespBody>, io::Error> {
    let path = req.uri().path().to_owned();
    let req = drain_body(req).await;
    let mut resp = respond(shared, ctl, req).await?;
    let cookies = shared.lock().resources.get(&path).map(|r| r.set_cookies.clone()).unwrap_or_default();
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(&c) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    Ok(resp)
}

/// Reads a request's body (a POST's, here answered as any resource) and drops it, before
/// the answer: a server that answers and closes while the client still writes makes the
/// client's write fail (`EPIPE`) before it reads the answer, which a real server reading
/// its request does not do. At most `DRAIN_LIMIT` bytes, for at most 5 s.
async fn drain_body(req: Request<Incoming>) -> Request<()> {
    let (parts, mut body) = req.into_parts();
    if !body.is_end_stream() {
        let drain = async {
            let mut read = 0u64;
            while read < DRAIN_LIMIT
                && let Some(Ok(frame)) = body.frame().await
            {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    }
    Request::from_parts(parts, ())
}

/// The most of a request's body the server reads before answering.
const DRAIN_LIMIT: u64 = 16 << 20;

async fn respond(shared: &Shared, ctl: &Arc<ConnCtl>, req: Request<()>) -> Result<Response<RespBody>, io::Error> {
    let path = req.uri().path().to_owned();
    let mut headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    if req.version() == Version::HTTP_2
        && !headers.iter().any(|(n, _)| n == "host")
        && let Some(auth) = req.uri().authority()
    {
        headers.push(("host".to_owned(), auth.as_str().to_owned()));
    }
    let record = RequestRecord {
        method: req.method().as_str().to_owned(),
        path: path.clone(),
        version: req.version(),
        headers,
        range: header_str(&req, header::RANGE),
        if_range: header_str(&req, header::IF_RANGE),
    };

    let (resource, hit, counter) = {
        let mut st = shared.lock();
        st.requests.push(record.clone());
        let hit = {
            let h = st.hits.entry(path.clone()).or_insert(0);
            *h += 1;
            *h
        };
        let counter = Arc::clone(st.sent.entry(path.clone()).or_default());
        (st.resources.get(&path).cloned(), hit, counter)
    };
    tracing::debug!(
        "testkit: {} {} {:?} (hit {hit}) range={:?} if-range={:?}",
        record.method,
        path,
        record.version,
        record.range,
        record.if_range
    );

    let Some(res) = resource else {
        return Ok(small_response(StatusCode::NOT_FOUND, "text/html", "<html>404 not found</html>".to_owned()));
    };
    if let Some(want) = &res.required_cookie {
        let sent = header_str(&req, header::COOKIE).unwrap_or_default();
        if !sent.split(';').any(|c| c.trim() == want) {
            return Ok(small_response(StatusCode::FORBIDDEN, "text/html", "<html>403 log in first</html>".into()));
        }
    }
    if let Some((want, challenge)) = &res.required_auth
        && header_str(&req, header::AUTHORIZATION).as_deref() != Some(want.as_str())
    {
        let mut resp = small_response(StatusCode::UNAUTHORIZED, "text/html", "<html>401 who are you</html>".into());
        if let Ok(v) = HeaderValue::from_str(challenge) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        return Ok(resp);
    }
    let is_head = req.method() == Method::HEAD;
    let fault = res.faults.iter().find(|(on, _)| on.matches(hit)).map(|(_, f)| f.clone());
    // A redirect answers any method (an upload's POST answered `303 See Other`).
    let redirect = matches!(fault, Some(Fault::Redirect { .. } | Fault::SlowRedirect { .. }));
    if !is_head && req.method() != Method::GET && !redirect {
        let mut resp =
            small_response(StatusCode::METHOD_NOT_ALLOWED, "text/html", "<html>405 method not allowed</html>".into());
        resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }

    let mut etag = res.etag.clone();
    let mut last_modified = res.last_modified.clone();
    let mut honour_range = res.ranges;
    let mut wrong_content_range = false;
    let mut short_unknown: Option<u64> = None;
    let mut capped: Option<(u64, bool)> = None;
    let mut ends_at_range = false;
    let mut long_unknown: Option<u64> = None;
    let mut hide_last_modified = false;
    let mut padding: Option<usize> = None;
    let mut encoding: Option<String> = None;
    let mut body_fault: Option<Fault> = None;
    match fault {
        None => {}
        Some(Fault::Status { code, retry_after }) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = small_response(status, "text/html", format!("<html>error {code}</html>"));
            if let Some(ra) = retry_after.and_then(|ra| HeaderValue::from_str(&ra).ok()) {
                resp.headers_mut().insert(header::RETRY_AFTER, ra);
            }
            return Ok(resp);
        }
        Some(Fault::SlowRedirect { after, location }) => {
            tokio::time::sleep(after).await;
            let mut resp =
                small_response(StatusCode::FOUND, "text/html", format!("<html>redirect to {location}</html>"));
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            return Ok(resp);
        }
        Some(Fault::Redirect { status, location }) => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND);
            let mut resp = small_response(code, "text/html", format!("<html>redirect to {location}</html>"));
            // As bytes: a location with raw UTF-8 goes out as it is, as some servers send it.
            match HeaderValue::from_bytes(location.as_bytes()) {
                Ok(v) => {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                Err(_) => *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
            }
            return Ok(resp);
        }
        Some(Fault::CloseBeforeHeaders) => {
            // A service error makes hyper drop the HTTP/1 connection without writing anything
            // (HTTP/2: reset the stream).
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "testkit fault: close before headers"));
        }
        Some(Fault::SlowHeaders(d)) => tokio::time::sleep(d).await,
        Some(Fault::HugeHeaders(n)) => padding = Some(n),
        Some(Fault::ContentEncoding(e)) => encoding = Some(e),
        Some(Fault::NoEtag) => etag = None,
        Some(Fault::ChangeEtag(e)) => etag = Some(e),
        Some(Fault::ChangeLastModified(lm)) => last_modified = Some(lm),
        Some(Fault::IgnoreRange) => honour_range = false,
        Some(Fault::WrongContentRange) => wrong_content_range = true,
        Some(Fault::ShortRangeOfUnknownTotal(k)) => short_unknown = Some(k),
        Some(Fault::CappedRange { most, unknown_total }) => capped = Some((most.max(1), unknown_total)),
        Some(Fault::EndsWhereTheRangeStarts) => ends_at_range = true,
        Some(Fault::LongRangeOfUnknownTotal(k)) => long_unknown = Some(k),
        Some(Fault::NoLastModified) => hide_last_modified = true,
        Some(
            f @ (Fault::ResetAfter(_)
            | Fault::GracefulResetAfter(_)
            | Fault::StallAfter(_)
            | Fault::ShortBody(_)
            | Fault::LongContentLength(_)),
        ) => body_fault = Some(f),
    }

    let total = res.len();
    let mut range = match (&record.range, honour_range) {
        (Some(r), true) => parse_range(r, total),
        _ => RangeReq::Full,
    };
    if res.whole_as_206 && matches!(range, RangeReq::Full) && total > 0 {
        range = RangeReq::Range(0, total - 1);
    }
    if let (Some(cond), RangeReq::Range(..) | RangeReq::Unsatisfiable) = (&record.if_range, &range) {
        let cond = cond.trim();
        let etag_match = etag.as_deref().is_some_and(|e| !e.starts_with("W/") && !cond.starts_with("W/") && e == cond);
        let date_match = last_modified.as_deref().is_some_and(|lm| lm == cond);
        if !etag_match && !date_match {
            range = RangeReq::Full;
        }
    }

    // A resource's own `Content-Type` (`with_header`) replaces the default.
    let mut builder = Response::builder();
    if !res.headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-type")) {
        builder = builder.header(header::CONTENT_TYPE, "application/octet-stream");
    }
    if res.ranges {
        builder = builder.header(header::ACCEPT_RANGES, "bytes");
    }
    if let Some(e) = &etag {
        builder = builder.header(header::ETAG, e.as_str());
    }
    if let Some(lm) = last_modified.as_ref().filter(|_| !hide_last_modified) {
        builder = builder.header(header::LAST_MODIFIED, lm.as_str());
    }
    if let Some(n) = padding {
        builder = builder.header("x-padding", "a".repeat(n));
    }
    for (name, value) in &res.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    if let Some(e) = encoding {
        builder = builder.header(header::CONTENT_ENCODING, e);
    }

    let (status, start, end) = match range {
        RangeReq::Full => (StatusCode::OK, 0, total),
        // A 416 saying the resource is that long: its real length, or (a shorter copy) the
        // length the client already has.
        RangeReq::Unsatisfiable => return not_satisfiable(builder, total),
        RangeReq::Range(first, _) if ends_at_range => return not_satisfiable(builder, first),
        RangeReq::Range(first, last) => {
            let first = if wrong_content_range { first + 1 } else { first };
            let last = capped.map_or(last, |(most, _)| last.min(first + most - 1));
            let unknown = short_unknown.is_some() || long_unknown.is_some() || capped.is_some_and(|(_, u)| u);
            let of = if unknown { "*".to_owned() } else { total.to_string() };
            let announced = last.saturating_sub(long_unknown.unwrap_or(0)).max(first);
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {first}-{announced}/{of}"));
            (StatusCode::PARTIAL_CONTENT, first.min(last + 1), last + 1)
        }
    };
    let body_len = end - start;

    // Decide how the body ends.
    let (send_len, tail, declared_len) = match body_fault {
        Some(Fault::ResetAfter(n)) if n < body_len => {
            (n, Tail::Fail { reset: req.version() < Version::HTTP_2 }, body_len)
        }
        Some(Fault::GracefulResetAfter(n)) if n < body_len => (n, Tail::FailGracefully, body_len),
        Some(Fault::StallAfter(n)) if n < body_len => (n, Tail::Stall, body_len),
        Some(Fault::ShortBody(n)) if n < body_len => (n, Tail::Fail { reset: false }, body_len),
        Some(Fault::LongContentLength(k)) if k > 0 => (body_len, Tail::Fail { reset: false }, body_len + k),
        _ => match short_unknown.filter(|_| status == StatusCode::PARTIAL_CONTENT) {
            Some(k) => (body_len.saturating_sub(k), Tail::End, body_len.saturating_sub(k)),
            None => (body_len, Tail::End, body_len),
        },
    };
    let chunked = long_unknown.is_some() && status == StatusCode::PARTIAL_CONTENT;
    if (res.content_length && !chunked) || matches!(body_fault, Some(Fault::LongContentLength(_))) {
        builder = builder.header(header::CONTENT_LENGTH, declared_len);
    }

    let body = if is_head {
        empty_body()
    } else {
        ServedBody {
            content: res.content.clone(),
            pos: start,
            end: start + send_len,
            tail,
            rate: res.throttle,
            chunk: res.throttle.map_or(CHUNK, |r| (r / 20).clamp(1024, CHUNK)),
            started: None,
            sent: 0,
            sleep: None,
            tail_armed: false,
            done: false,
            counter,
            ctl: Arc::clone(ctl),
        }
        .boxed()
    };
    builder.status(status).body(body).map_err(io::Error::other)
}

/// `416 Range Not Satisfiable` for a resource of `len` bytes.
fn not_satisfiable(builder: http::response::Builder, len: u64) -> io::Result<Response<RespBody>> {
    builder
        .status(StatusCode::RANGE_NOT_SATISFIABLE)
        .header(header::CONTENT_RANGE, format!("bytes */{len}"))
        .header(header::CONTENT_LENGTH, "0")
        .body(empty_body())
        .map_err(io::Error::other)
}

// ---------------------------------------------------------------------------------------------
// Streamed body
// ---------------------------------------------------------------------------------------------

/// An error hyper's server finds an HTTP/2 reason in (it looks through the sources; an
/// `io::Error` shows its payload's source, not the payload).
#[derive(Debug)]
struct GracefulReset(h2::Error);

impl fmt::Display for GracefulReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("testkit fault: stream reset with NO_ERROR")
    }
}

impl std::error::Error for GracefulReset {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// What happens once the body's bytes have been sent.
enum Tail {
    /// End normally.
    End,
    /// Fail the body (hyper then aborts the connection / resets the stream). With `reset`, the
    /// TCP connection ends with an RST.
    Fail { reset: bool },
    /// Fail the body with an HTTP/2 `NO_ERROR` among its error's sources: hyper resets the
    /// stream with that reason.
    FailGracefully,
    /// Never send anything again.
    Stall,
}

struct ServedBody {
    content: Content,
    /// Absolute offset of the next byte to send.
    pos: u64,
    /// Absolute offset where sending data stops.
    end: u64,
    tail: Tail,
    rate: Option<u64>,
    chunk: u64,
    started: Option<Instant>,
    sent: u64,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    tail_armed: bool,
    done: bool,
    counter: Arc<AtomicU64>,
    ctl: Arc<ConnCtl>,
}

impl ServedBody {
    fn chunk_at(&self, pos: u64, n: u64) -> Bytes {
        match &self.content {
            Content::Bytes(b) => {
                let from = usize::try_from(pos).unwrap_or(usize::MAX);
                let to = usize::try_from(pos + n).unwrap_or(usize::MAX);
                b.slice(from..to)
            }
            Content::Generated { seed, .. } => {
                let mut buf = BytesMut::zeroed(usize::try_from(n).unwrap_or(0));
                fill_pattern(*seed, pos, &mut buf);
                buf.freeze()
            }
        }
    }
}

impl Body for ServedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(sleep) = this.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            if this.pos < this.end {
                let n = this.chunk.min(this.end - this.pos);
                if let Some(rate) = this.rate {
                    let started = *this.started.get_or_insert_with(Instant::now);
                    // Send each chunk no earlier than the time the bytes up to its end are due.
                    #[allow(clippy::cast_precision_loss)]
                    let due = started + Duration::from_secs_f64((this.sent + n) as f64 / rate as f64);
                    if due > Instant::now() {
                        this.sleep = Some(Box::pin(tokio::time::sleep_until(due)));
                        continue;
                    }
                }
                let data = this.chunk_at(this.pos, n);
                this.pos += n;
                this.sent += n;
                this.counter.fetch_add(n, Ordering::Relaxed);
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            match this.tail {
                Tail::End => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Tail::Stall => return Poll::Pending,
                Tail::Fail { .. } | Tail::FailGracefully => {
                    if !this.tail_armed {
                        // Let hyper flush what it has before we break the connection.
                        this.tail_armed = true;
                        this.sleep = Some(Box::pin(tokio::time::sleep(FLUSH_GRACE)));
                        continue;
                    }
                    this.done = true;
                    let error = if let Tail::Fail { reset } = this.tail {
                        if reset {
                            this.ctl.reset.store(true, Ordering::SeqCst);
                        }
                        io::Error::new(io::ErrorKind::ConnectionAborted, "testkit fault: body aborted")
                    } else {
                        io::Error::other(GracefulReset(h2::Reason::NO_ERROR.into()))
                    };
                    return Poll::Ready(Some(Err(error)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.pos >= self.end && matches!(self.tail, Tail::End))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(v: &str, len: u64) -> Option<(u64, u64)> {
        match parse_range(v, len) {
            RangeReq::Range(a, b) => Some((a, b)),
            RangeReq::Full => None,
            RangeReq::Unsatisfiable => Some((u64::MAX, u64::MAX)),
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(r("bytes=0-", 10), Some((0, 9)));
        assert_eq!(r("bytes=3-5", 10), Some((3, 5)));
        assert_eq!(r("bytes=3-50", 10), Some((3, 9)));
        assert_eq!(r("bytes=-4", 10), Some((6, 9)));
        assert_eq!(r("bytes=-40", 10), Some((0, 9)));
        assert_eq!(r("bytes=10-", 10), Some((u64::MAX, u64::MAX)));
        assert_eq!(r("bytes=0-", 0), Some((u64::MAX, u64::MAX)));
        assert_eq!(r("bytes=5-3", 10), None);
        assert_eq!(r("bytes=0-1,3-4", 10), None);
        assert_eq!(r("items=0-1", 10), None);
        assert_eq!(r("bytes=x-", 10), None);
    }

    #[test]
    fn hits() {
        assert!(Hits::All.matches(7));
        assert!(Hits::First(2).matches(2) && !Hits::First(2).matches(3));
        assert!(Hits::Nth(3).matches(3) && !Hits::Nth(3).matches(2));
        assert!(Hits::From(2).matches(5) && !Hits::From(2).matches(1));
    }
}
