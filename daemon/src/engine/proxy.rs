//! Proxies from `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` (curl semantics),
//! docs/behaviour.md, "Proxies".
//!
//! The connector below sits under the TLS connector: for an https destination behind an
//! http proxy it opens a `CONNECT` tunnel (TLS then runs end to end inside it); for http
//! behind an http proxy it connects to the proxy and marks the connection as proxied, so
//! the client sends absolute-form requests; behind a SOCKS proxy (`socks5h://`: the proxy
//! resolves names, `socks5://`: the daemon does; `socks4a://`, `socks4://` alike) both
//! go through a SOCKS tunnel. Everything else connects directly.
//!
//! `NO_PROXY` takes names (a name matches itself and its subdomains), addresses, CIDR
//! blocks, `*`, and any of these with a `:port`, which then bypass only that port.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, RETRY_AFTER};
use http::{HeaderMap, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::{SocksV4, SocksV5};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use super::names::TcpConnector;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which proxy (if any) serves which destination, read once from the environment.
#[derive(Debug, Clone)]
pub struct Proxies {
    matcher: Arc<Matcher>,
    /// `NO_PROXY` entries with a port: (host, CIDR or address; port).
    bypass_ports: Arc<Vec<(String, u16)>>,
}

impl Proxies {
    pub fn from_env() -> Proxies {
        // Run as a CGI program, `HTTP_PROXY` may be a request's `Proxy:` header ("httpoxy"):
        // then no proxy variable is trusted (configuration.md).
        if std::env::var_os("REQUEST_METHOD").is_some() {
            return Proxies::new("", "", "", "");
        }
        let var = |names: [&str; 2]| names.iter().find_map(|n| std::env::var(n).ok()).unwrap_or_default();
        Proxies::new(
            &var(["ALL_PROXY", "all_proxy"]),
            &var(["HTTP_PROXY", "http_proxy"]),
            &var(["HTTPS_PROXY", "https_proxy"]),
            &var(["NO_PROXY", "no_proxy"]),
        )
    }

    /// Proxies from values in the environment variables' format (empty: none).
    pub fn new(all: &str, http: &str, https: &str, no: &str) -> Proxies {
        let (bypass_ports, rest) = split_no_proxy(no);
        let matcher =
            Matcher::builder().all(all.to_owned()).http(http.to_owned()).https(https.to_owned()).no(rest).build();
        Proxies { matcher: Arc::new(matcher), bypass_ports: Arc::new(bypass_ports) }
    }

    /// Whether a destination that `NO_PROXY` does not name goes through a proxy (for
    /// checking a session's proxy URL: one the matcher cannot read would mean direct).
    pub fn proxies_all(&self) -> bool {
        ["http://example.invalid/", "https://example.invalid/"]
            .iter()
            .all(|u| u.parse::<Uri>().ok().is_some_and(|uri| self.matcher.intercept(&uri).is_some()))
    }

    /// The proxy for `dst`, if it goes through one.
    fn intercept(&self, dst: &Uri) -> Option<Intercept> {
        let host = dst.host()?;
        let port = dst.port_u16().unwrap_or(if dst.scheme_str() == Some("https") { 443 } else { 80 });
        if self.bypass_ports.iter().any(|(h, p)| *p == port && host_matches(h, host)) {
            return None;
        }
        self.matcher.intercept(dst)
    }

    /// The `Proxy-Authorization` value to send with a plain-http request to `url`, if
    /// it goes through an http proxy with credentials.
    pub fn http_auth(&self, url: &url::Url) -> Option<http::HeaderValue> {
        if url.scheme() != "http" {
            return None;
        }
        let uri: Uri = url.as_str().parse().ok()?;
        self.intercept(&uri)?.basic_auth().cloned()
    }

    /// The origin (`http://host:port`, `https://…` for a TLS proxy) of the HTTP proxy a
    /// plain-`http` request to `url` goes through, if any (a 407 comes from it; its answer
    /// goes to it, on the request itself).
    pub fn http_proxy_origin(&self, url: &url::Url) -> Option<String> {
        if url.scheme() != "http" {
            return None;
        }
        self.proxy_origin(url)
    }

    /// The origin of the HTTP(S) proxy a request to `url` goes through, if any: for an
    /// `https` URL the proxy of its `CONNECT` tunnel (a 407 to the `CONNECT` comes from
    /// it). None for SOCKS proxies, which ask no HTTP questions.
    pub fn proxy_origin(&self, url: &url::Url) -> Option<String> {
        let uri: Uri = url.as_str().parse().ok()?;
        origin_of_proxy(self.intercept(&uri)?.uri())
    }

    /// The host a request to `url` connects to first: its proxy's (of any kind), else its
    /// own; IPv6 without brackets.
    pub fn first_hop(&self, url: &url::Url) -> Option<String> {
        let uri: Uri = url.as_str().parse().ok()?;
        let host = match self.intercept(&uri) {
            Some(proxy) => proxy.uri().host()?.to_owned(),
            None => url.host_str()?.to_owned(),
        };
        Some(host.trim_start_matches('[').trim_end_matches(']').to_owned())
    }

    /// A description for the logs (credentials are not included).
    pub fn describe(&self) -> String {
        let probe = |u: &str| -> Option<String> {
            let uri: Uri = u.parse().ok()?;
            let i = self.intercept(&uri)?;
            Some(format!(
                "{}://{}",
                i.uri().scheme_str().unwrap_or("http"),
                i.uri().authority()?.as_str().rsplit('@').next()?
            ))
        };
        format!(
            "http: {}, https: {}",
            probe("http://example.invalid/").unwrap_or_else(|| "direct".into()),
            probe("https://example.invalid/").unwrap_or_else(|| "direct".into())
        )
    }
}

/// `scheme://host:port` of an http(s) proxy (none for other schemes).
fn origin_of_proxy(proxy: &Uri) -> Option<String> {
    let scheme = proxy.scheme_str().filter(|s| matches!(*s, "http" | "https"))?;
    let authority = proxy.authority()?;
    let port = authority.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    Some(format!("{scheme}://{}:{port}", authority.host()))
}

/// Splits `NO_PROXY` into the entries with a port (`host:port`, `[v6]:port`) and the
/// rest (comma-separated, for hyper-util's matcher: names, addresses, CIDR blocks, `*`).
fn split_no_proxy(no: &str) -> (Vec<(String, u16)>, String) {
    let (mut ported, mut rest) = (Vec::new(), Vec::new());
    for entry in no.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let split = match entry.strip_prefix('[') {
            Some(v6) => v6.split_once("]:"),
            // One colon only: a bare IPv6 address has several.
            None if entry.matches(':').count() == 1 => entry.split_once(':'),
            None => None,
        };
        match split.and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?))) {
            Some((host, port)) if !host.is_empty() => ported.push((host.to_owned(), port)),
            // `[::1]` or `[fd00::/8]` without a port: the matcher takes addresses unbracketed.
            _ => match entry.strip_prefix('[').and_then(|v6| v6.strip_suffix(']')) {
                Some(bare) if !bare.is_empty() => rest.push(bare),
                _ => rest.push(entry),
            },
        }
    }
    (ported, rest.join(","))
}

/// Whether `host` (from a URL) is what a `NO_PROXY` entry names: the same address, an
/// address in its block, or the name itself or one of its subdomains; `*` is every host.
fn host_matches(entry: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if entry == "*" {
        return true;
    }
    match (host.parse::<IpAddr>(), entry.parse::<ipnet::IpNet>(), entry.parse::<IpAddr>()) {
        (Ok(ip), Ok(net), _) => net.contains(&ip),
        (Ok(ip), _, Ok(addr)) => ip == addr,
        (Ok(_), _, _) => false,
        (Err(_), _, _) => {
            let name = entry.trim_start_matches('.');
            host.eq_ignore_ascii_case(name)
                || host.len() > name.len()
                    && host.get(host.len() - name.len()..).is_some_and(|tail| tail.eq_ignore_ascii_case(name))
                    && host.as_bytes().get(host.len() - name.len() - 1) == Some(&b'.')
        }
    }
}

/// A TCP connection, directly or through a proxy (over TLS to an https:// proxy).
#[derive(Debug)]
pub struct ProxyStream {
    io: Io,
    /// Connected to an http(s) proxy for a plain-http destination.
    proxied: bool,
}

#[derive(Debug)]
enum Io {
    Plain(TokioIo<TcpStream>),
    /// To an https:// proxy (and, for an https destination, through its tunnel).
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

/// One expression for both kinds of stream.
macro_rules! io {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.io {
            Io::Plain($io) => $e,
            Io::Tls(boxed) => {
                let $io = &mut **boxed;
                $e
            }
        }
    };
}

impl Connection for ProxyStream {
    fn connected(&self) -> Connected {
        match &self.io {
            Io::Plain(io) => io.connected().proxy(self.proxied),
            Io::Tls(io) => io.inner().get_ref().0.connected().proxy(self.proxied),
        }
    }
}

impl super::reads::TcpSocket for ProxyStream {
    fn tcp_socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        Some(match &self.io {
            Io::Plain(io) => io.inner().as_fd(),
            Io::Tls(io) => io.inner().get_ref().0.as_fd(),
        })
    }
}

impl Read for ProxyStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        io!(self, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl Write for ProxyStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        io!(self, io => Pin::new(io).poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io!(self, io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io!(self, io => Pin::new(io).poll_shutdown(cx))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        io!(self, io => Pin::new(io).poll_write_vectored(cx, bufs))
    }
}

/// Opens TLS to an https:// proxy (verified like any server: the system's roots and the
/// extra CA file).
async fn tls_to_proxy(
    mut direct: TcpConnector,
    proxy: &Uri,
    tls: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BoxError> {
    let host = proxy.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_owned();
    let name = rustls_pki_types::ServerName::try_from(host)?;
    let tcp = direct.call(proxy.clone()).await?.into_inner();
    Ok(tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?)
}

/// Credentials the app gave for HTTP(S) proxies (`origin`, header): they go on the
/// `CONNECT` to that proxy, replacing a header of the same name from the proxy's URL.
pub type TunnelAuth = Arc<[(String, HeaderName, HeaderValue)]>;

/// A proxy answered `CONNECT` with something other than 2xx: a 407 with
/// `Proxy-Authenticate` is a challenge the app may answer (docs/behaviour.md,
/// "Authentication"); the status is the task's error otherwise.
#[derive(Debug)]
pub struct TunnelRefused {
    pub status: u16,
    /// The answer's `Proxy-Authenticate` and `Retry-After`, if any.
    pub headers: HeaderMap,
}

impl std::fmt::Display for TunnelRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the proxy refused the tunnel with status {}", self.status)
    }
}

impl std::error::Error for TunnelRefused {}

/// A proxy's answer to `CONNECT` is not HTTP (or is overlong): retrying will not change it.
#[derive(Debug)]
pub struct TunnelGarbled(&'static str);

impl std::fmt::Display for TunnelGarbled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for TunnelGarbled {}

/// The longest `CONNECT` answer head read.
const MAX_CONNECT_ANSWER: usize = 16 << 10;
/// The most header lines read in it.
const MAX_CONNECT_HEADERS: usize = 100;

/// Asks the proxy on `stream` for a tunnel to `dst` (`CONNECT`) with `auth`'s headers, and
/// reads its answer's head, all within `limit`.
async fn connect_through<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    dst: &Uri,
    auth: &[(HeaderName, HeaderValue)],
    limit: std::time::Duration,
) -> Result<(), BoxError> {
    match tokio::time::timeout(limit, exchange(stream, dst, auth)).await {
        Ok(done) => done,
        Err(_) => Err(Box::new(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the proxy did not answer CONNECT within {} s", limit.as_secs_f64()),
        ))),
    }
}

async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    dst: &Uri,
    auth: &[(HeaderName, HeaderValue)],
) -> Result<(), BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = dst.host().unwrap_or("");
    let port = dst.port_u16().unwrap_or(if dst.scheme_str() == Some("https") { 443 } else { 80 });
    let mut head = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n").into_bytes();
    for (name, value) in auth {
        // A `HeaderValue` holds no CR or LF: nothing can be smuggled into the head.
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).await?;
    // Byte by byte: what follows the head is the tunnel's, not ours to read. Lines may end
    // in a bare LF.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !(answer.ends_with(b"\n\n") || answer.ends_with(b"\n\r\n")) {
        if answer.len() > MAX_CONNECT_ANSWER {
            return Err(Box::new(TunnelGarbled("the proxy's answer to CONNECT is over 16 KiB")));
        }
        if stream.read(&mut byte).await? == 0 {
            return Err("the proxy closed the connection before answering CONNECT".into());
        }
        answer.extend_from_slice(&byte);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_CONNECT_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let status = match parsed.parse(&answer) {
        Ok(httparse::Status::Complete(_)) => parsed.code.unwrap_or(0),
        _ => return Err(Box::new(TunnelGarbled("the proxy's answer to CONNECT is not HTTP"))),
    };
    if (200..300).contains(&status) {
        return Ok(());
    }
    let mut kept = HeaderMap::new();
    for h in parsed.headers.iter() {
        let name = if h.name.eq_ignore_ascii_case("proxy-authenticate") {
            PROXY_AUTHENTICATE
        } else if h.name.eq_ignore_ascii_case("retry-after") {
            RETRY_AFTER
        } else {
            continue;
        };
        if let Ok(value) = HeaderValue::from_bytes(h.value) {
            kept.append(name, value);
        }
    }
    Err(Box::new(TunnelRefused { status, headers: kept }))
}

/// The headers for a `CONNECT` to `proxy`: the app's credentials for it, else the proxy
/// URL's own.
fn tunnel_headers(proxy: &Intercept, auth: &TunnelAuth) -> Vec<(HeaderName, HeaderValue)> {
    let origin = origin_of_proxy(proxy.uri());
    let mut headers: Vec<(HeaderName, HeaderValue)> = auth
        .iter()
        .filter(|(o, _, _)| Some(o) == origin.as_ref())
        .map(|(_, name, value)| (name.clone(), value.clone()))
        .collect();
    if let Some(url_auth) = proxy.basic_auth()
        && !headers.iter().any(|(name, _)| name == PROXY_AUTHORIZATION)
    {
        headers.push((PROXY_AUTHORIZATION, url_auth.clone()));
    }
    headers
}

/// Connects directly, through a `CONNECT` tunnel, or to an http(s) proxy.
#[derive(Clone)]
pub struct ProxyConnector {
    proxies: Proxies,
    direct: TcpConnector,
    /// For https:// proxies: TLS to the proxy itself.
    tls: Arc<rustls::ClientConfig>,
    /// The app's credentials for proxies, sent with `CONNECT`.
    tunnel_auth: TunnelAuth,
    /// How long a proxy may take to answer `CONNECT`.
    answer_limit: std::time::Duration,
}

impl std::fmt::Debug for ProxyConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConnector").field("proxies", &self.proxies).finish_non_exhaustive()
    }
}

impl ProxyConnector {
    pub fn new(
        proxies: Proxies,
        direct: TcpConnector,
        tls: Arc<rustls::ClientConfig>,
        tunnel_auth: TunnelAuth,
        answer_limit: std::time::Duration,
    ) -> ProxyConnector {
        ProxyConnector { proxies, direct, tls, tunnel_auth, answer_limit }
    }
}

impl Service<Uri> for ProxyConnector {
    type Response = ProxyStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let intercept = self.proxies.intercept(&dst);
        let mut direct = self.direct.clone();
        let tls = self.tls.clone();
        let (tunnel_auth, limit) = (self.tunnel_auth.clone(), self.answer_limit);
        Box::pin(async move {
            let scheme = intercept.as_ref().and_then(|p| p.uri().scheme_str().map(str::to_owned));
            match (intercept, scheme.as_deref()) {
                (None, _) => Ok(ProxyStream { io: Io::Plain(direct.call(dst).await?), proxied: false }),
                // `socks5h`/`socks4a`: the proxy resolves the name (no DNS leak).
                (Some(proxy), Some(s @ ("socks5" | "socks5h"))) => {
                    let mut socks = SocksV5::new(proxy.uri().clone(), direct).local_dns(s == "socks5");
                    if let Some((user, pass)) = proxy.raw_auth() {
                        socks = socks.with_auth(user.to_owned(), pass.to_owned());
                    }
                    Ok(ProxyStream { io: Io::Plain(socks.call(dst).await?), proxied: false })
                }
                (Some(proxy), Some(s @ ("socks4" | "socks4a"))) => {
                    let mut socks = SocksV4::new(proxy.uri().clone(), direct).local_dns(s == "socks4");
                    Ok(ProxyStream { io: Io::Plain(socks.call(dst).await?), proxied: false })
                }
                // TLS to the proxy; an https destination's own TLS then runs inside it.
                (Some(proxy), Some("https")) => {
                    let mut stream = tls_to_proxy(direct, proxy.uri(), tls).await?;
                    let tunnel = dst.scheme_str() == Some("https");
                    if tunnel {
                        connect_through(&mut stream, &dst, &tunnel_headers(&proxy, &tunnel_auth), limit).await?;
                    }
                    Ok(ProxyStream { io: Io::Tls(Box::new(TokioIo::new(stream))), proxied: !tunnel })
                }
                (Some(proxy), _) if dst.scheme_str() == Some("https") => {
                    let mut tcp = direct.call(proxy.uri().clone()).await?.into_inner();
                    connect_through(&mut tcp, &dst, &tunnel_headers(&proxy, &tunnel_auth), limit).await?;
                    Ok(ProxyStream { io: Io::Plain(TokioIo::new(tcp)), proxied: false })
                }
                (Some(proxy), _) => {
                    Ok(ProxyStream { io: Io::Plain(direct.call(proxy.uri().clone()).await?), proxied: true })
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Runs `connect_through` against a proxy that answers `answer` (then `after`), and
    /// returns its result and what the tunnel then reads.
    async fn through(answer: &'static [u8], after: &'static [u8]) -> (Result<(), BoxError>, Vec<u8>) {
        let (mut ours, mut proxy) = tokio::io::duplex(64 << 10);
        let proxy = tokio::spawn(async move {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && proxy.read(&mut byte).await.unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            proxy.write_all(answer).await.unwrap_or_else(|_| unreachable!());
            proxy.write_all(after).await.unwrap_or_else(|_| unreachable!());
            // Kept open: a proxy that says nothing more.
            std::future::pending::<()>().await;
            drop(proxy);
        });
        let auth = [(PROXY_AUTHORIZATION, HeaderValue::from_static("Basic YTpi"))];
        let dst: Uri = "https://files.example:8443/a".parse().unwrap_or_else(|_| unreachable!());
        let done = connect_through(&mut ours, &dst, &auth, std::time::Duration::from_millis(300)).await;
        let mut rest = vec![0u8; after.len()];
        if done.is_ok() {
            ours.read_exact(&mut rest).await.unwrap_or_else(|_| unreachable!());
        }
        proxy.abort();
        (done, rest)
    }

    #[tokio::test]
    async fn connect_answers_are_read_to_their_end_and_classified() {
        // A 2xx with bare LFs, HTTP/1.0: the tunnel's first bytes stay for the tunnel.
        let (done, rest) = through(b"HTTP/1.0 200 Connection established\n\n", b"\x16\x03\x01").await;
        assert!(done.is_ok(), "{done:?}");
        assert_eq!(rest, b"\x16\x03\x01");
        // A 407 carries its challenge.
        let (done, _) =
            through(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n", b"").await;
        let err = done.err().unwrap_or_else(|| unreachable!());
        let refused = err.downcast_ref::<TunnelRefused>().unwrap_or_else(|| unreachable!());
        assert_eq!(refused.status, 407);
        assert_eq!(refused.headers.get(PROXY_AUTHENTICATE).and_then(|v| v.to_str().ok()), Some("Basic realm=\"corp\""));
        // Not HTTP: garbled, for good.
        let (done, _) = through(b"SSH-2.0-OpenSSH\r\n\r\n", b"").await;
        assert!(done.err().is_some_and(|e| e.downcast_ref::<TunnelGarbled>().is_some()));
        // A proxy that never finishes its answer: timed out, not waited on for ever.
        let (done, _) = through(b"HTTP/1.1 200 OK\r\n", b"").await;
        let err = done.err().unwrap_or_else(|| unreachable!());
        assert_eq!(err.downcast_ref::<io::Error>().map(io::Error::kind), Some(io::ErrorKind::TimedOut), "{err}");
    }

    #[tokio::test]
    async fn connect_sends_the_credentials_it_is_given() {
        let (mut ours, mut proxy) = tokio::io::duplex(64 << 10);
        let dst: Uri = "https://files.example/a".parse().unwrap_or_else(|_| unreachable!());
        let auth = [(PROXY_AUTHORIZATION, HeaderValue::from_static("Basic YTpi"))];
        let answer = tokio::spawn(async move {
            let mut head = vec![0u8; 4096];
            let n = proxy.read(&mut head).await.unwrap_or(0);
            proxy.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap_or_else(|_| unreachable!());
            String::from_utf8_lossy(&head[..n]).into_owned()
        });
        let done = connect_through(&mut ours, &dst, &auth, std::time::Duration::from_secs(5)).await;
        assert!(done.is_ok(), "{done:?}");
        let head = answer.await.unwrap_or_default();
        assert_eq!(
            head,
            "CONNECT files.example:443 HTTP/1.1\r\nHost: files.example:443\r\nproxy-authorization: Basic YTpi\r\n\r\n"
        );
    }

    fn via(p: &Proxies, url: &str) -> Option<String> {
        p.intercept(&url.parse().unwrap()).map(|i| i.uri().to_string())
    }

    #[test]
    fn no_proxy_takes_names_blocks_and_ports() {
        let p = Proxies::new(
            "socks5h://u:p@127.0.0.1:1080",
            "",
            "",
            "internal.example, 10.0.0.0/8, 127.0.0.1:8080, [::1]:9000, files.test:443",
        );
        assert_eq!(via(&p, "http://internal.example/a"), None);
        assert_eq!(via(&p, "https://cdn.internal.example/a"), None, "a subdomain");
        assert!(via(&p, "https://notinternal.example/a").is_some());
        assert_eq!(via(&p, "http://10.1.2.3/a"), None, "in the block");
        assert!(via(&p, "http://11.1.2.3/a").is_some());
        assert_eq!(via(&p, "http://127.0.0.1:8080/a"), None, "that port");
        assert!(via(&p, "http://127.0.0.1:8081/a").is_some(), "another port");
        assert_eq!(via(&p, "http://[::1]:9000/a"), None);
        assert_eq!(via(&p, "https://files.test/a"), None, "443 by default for https");
        assert!(via(&p, "http://files.test/a").is_some(), "80 is not 443");
        assert_eq!(via(&p, "http://elsewhere.test/").as_deref(), Some("socks5h://127.0.0.1:1080/"));
        let everything = Proxies::new("http://127.0.0.1:3128", "", "", "*");
        assert_eq!(via(&everything, "http://a.test/"), None);
        // IPv6 as URLs write it, without a port: an address and a block.
        let v6 = Proxies::new("http://127.0.0.1:3128", "", "", "[::1], [fd00::/8]");
        assert_eq!(via(&v6, "http://[::1]/a"), None);
        assert_eq!(via(&v6, "http://[fd00::5]:8080/a"), None, "in the block");
        assert!(via(&v6, "http://[2001:db8::1]/a").is_some());
    }
}
