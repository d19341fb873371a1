//! Proxies from `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` (curl semantics).
//!
//! The connector below sits under the TLS connector: for an https destination behind a
//! proxy it opens a `CONNECT` tunnel (TLS then runs end to end inside it); for http
//! behind a proxy it connects to the proxy and marks the connection as proxied, so the
//! client sends absolute-form requests. Everything else connects directly.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which proxy (if any) serves which destination, read once from the environment.
#[derive(Debug, Clone)]
pub struct Proxies {
    matcher: Arc<Matcher>,
}

impl Proxies {
    pub fn from_env() -> Proxies {
        Proxies { matcher: Arc::new(Matcher::from_env()) }
    }

    /// The `Proxy-Authorization` value to send with a plain-http request to `url`, if
    /// it goes through a proxy with credentials.
    pub fn http_auth(&self, url: &url::Url) -> Option<http::HeaderValue> {
        if url.scheme() != "http" {
            return None;
        }
        let uri: Uri = url.as_str().parse().ok()?;
        self.matcher.intercept(&uri)?.basic_auth().cloned()
    }

    /// A description for the logs (credentials are not included).
    pub fn describe(&self) -> String {
        let probe = |u: &str| -> Option<String> {
            let uri: Uri = u.parse().ok()?;
            let i = self.matcher.intercept(&uri)?;
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

/// A TCP connection, directly or through a proxy.
#[derive(Debug)]
pub struct ProxyStream {
    io: TokioIo<TcpStream>,
    /// Connected to an http proxy for a plain-http destination.
    proxied: bool,
}

impl Connection for ProxyStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl Read for ProxyStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for ProxyStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// Connects directly, through a `CONNECT` tunnel, or to an http proxy.
#[derive(Debug, Clone)]
pub struct ProxyConnector {
    proxies: Proxies,
    direct: HttpConnector,
}

impl ProxyConnector {
    pub fn new(proxies: Proxies, direct: HttpConnector) -> ProxyConnector {
        ProxyConnector { proxies, direct }
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
        let intercept = self.proxies.matcher.intercept(&dst);
        let mut direct = self.direct.clone();
        Box::pin(async move {
            match intercept {
                None => Ok(ProxyStream { io: direct.call(dst).await?, proxied: false }),
                Some(proxy) if dst.scheme_str() == Some("https") => {
                    let mut tunnel = Tunnel::new(proxy.uri().clone(), direct);
                    if let Some(auth) = proxy.basic_auth() {
                        tunnel = tunnel.with_auth(auth.clone());
                    }
                    Ok(ProxyStream { io: tunnel.call(dst).await?, proxied: false })
                }
                Some(proxy) => Ok(ProxyStream { io: direct.call(proxy.uri().clone()).await?, proxied: true }),
            }
        })
    }
}
