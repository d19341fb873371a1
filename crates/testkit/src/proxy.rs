//! A forwarding HTTP proxy for tests: `CONNECT host:port` tunnels, and absolute-form
//! requests (`GET http://host:port/path`) are relayed to their origin. It records the
//! first request of every connection. Asked to, it wants a `Proxy-Authorization` and
//! answers `407` with `Proxy-Authenticate` to requests without it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// What a client asked the proxy for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRecord {
    pub method: String,
    /// `host:port` for CONNECT, the absolute URL otherwise.
    pub target: String,
    pub proxy_authorization: Option<String>,
}

/// A fault the proxy injects into the first `times` connections it relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyFault {
    /// Relay faithfully.
    None,
    /// Close both sides after relaying this many bytes from the server.
    CutAfter { bytes: u64, times: usize },
    /// Stop relaying (but keep the connections open) after this many bytes.
    StallAfter { bytes: u64, times: usize },
}

#[derive(Debug)]
pub struct TestProxy {
    addr: SocketAddr,
    records: Arc<Mutex<Vec<ProxyRecord>>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    /// Clients speak TLS to the proxy itself (an `https://` proxy).
    tls: bool,
    /// The `Proxy-Authorization` wanted, and the `Proxy-Authenticate` of the 407 otherwise;
    /// statuses to answer the next requests with instead of serving them.
    wanted: Wanted,
}

#[derive(Debug, Default)]
struct Asks {
    auth: Option<(String, String)>,
    refusals: std::collections::VecDeque<u16>,
    /// Every request for one of these targets (`host:port` of a CONNECT) gets its status.
    refused_targets: std::collections::HashMap<String, u16>,
}

type Wanted = Arc<Mutex<Asks>>;

impl TestProxy {
    pub async fn start() -> anyhow::Result<TestProxy> {
        TestProxy::start_faulty(ProxyFault::None).await
    }

    /// A proxy clients reach over TLS (`https://127.0.0.1:PORT`), with `ca`'s server
    /// certificate.
    pub async fn start_tls(ca: &crate::TestCa) -> anyhow::Result<TestProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let wanted = Wanted::default();
        let (r, t, w) = (records.clone(), tasks.clone(), wanted.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config());
        tasks.lock().unwrap().spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, w, acceptor) = (r.clone(), w.clone(), acceptor.clone());
                t.lock().unwrap().spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let _ = serve(tls, r, w, ProxyFault::None).await;
                    }
                });
            }
        });
        Ok(TestProxy { addr, records, tasks, tls: true, wanted })
    }

    /// A proxy that injects `fault` into its first connections.
    pub async fn start_faulty(fault: ProxyFault) -> anyhow::Result<TestProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let wanted = Wanted::default();
        let (r, t, w) = (records.clone(), tasks.clone(), wanted.clone());
        tasks.lock().unwrap().spawn(async move {
            let mut n = 0usize;
            while let Ok((stream, _)) = listener.accept().await {
                let (r, w) = (r.clone(), w.clone());
                let f = match fault {
                    ProxyFault::CutAfter { times, .. } | ProxyFault::StallAfter { times, .. } if n >= times => {
                        ProxyFault::None
                    }
                    f => f,
                };
                n += 1;
                t.lock().unwrap().spawn(async move {
                    let _ = serve(stream, r, w, f).await;
                });
            }
        });
        Ok(TestProxy { addr, records, tasks, tls: false, wanted })
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// `http://127.0.0.1:PORT` (`https://` for a TLS proxy)
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.addr)
    }

    /// `http://USER:PASS@127.0.0.1:PORT` (`https://` for a TLS proxy)
    pub fn url_with_auth(&self, user: &str, pass: &str) -> String {
        format!("{}://{user}:{pass}@{}", self.scheme(), self.addr)
    }

    /// From now on, requests whose `Proxy-Authorization` is not `value` get `407 Proxy
    /// Authentication Required` with `Proxy-Authenticate: challenge` (and are recorded).
    pub fn require_auth(&self, value: &str, challenge: &str) {
        self.wanted.lock().unwrap().auth = Some((value.to_owned(), challenge.to_owned()));
    }

    /// The next requests (one per status) are answered with these statuses (and
    /// `Retry-After: 0`), and recorded.
    pub fn refuse_next(&self, statuses: &[u16]) {
        self.wanted.lock().unwrap().refusals.extend(statuses);
    }

    /// Every request for `target` (a CONNECT's `host:port`) is answered with `status`.
    pub fn refuse_target(&self, target: &str, status: u16) {
        self.wanted.lock().unwrap().refused_targets.insert(target.to_owned(), status);
    }

    pub fn records(&self) -> Vec<ProxyRecord> {
        self.records.lock().unwrap().clone()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Ok(mut t) = self.tasks.lock() {
            t.abort_all();
        }
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut client: S,
    records: Arc<Mutex<Vec<ProxyRecord>>>,
    wanted: Wanted,
    fault: ProxyFault,
) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(head.len() < 64 << 10, "request head too large");
        if client.read(&mut byte).await? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned());
    let proxy_authorization = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("proxy-authorization").then(|| v.trim().to_owned())
    });
    let (refused, refusal) = {
        let mut asks = wanted.lock().unwrap();
        let refused = match &asks.auth {
            Some((value, challenge)) if proxy_authorization.as_deref() != Some(value) => Some(challenge.clone()),
            _ => None,
        };
        let refusal = asks.refusals.pop_front().or_else(|| asks.refused_targets.get(&target).copied());
        (refused, refusal)
    };
    records.lock().unwrap().push(ProxyRecord { method: method.clone(), target: target.clone(), proxy_authorization });
    if let Some(status) = refusal {
        let answer =
            format!("HTTP/1.1 {status} Refused\r\nRetry-After: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        client.write_all(answer.as_bytes()).await?;
        return Ok(());
    }
    if let Some(challenge) = refused {
        let body = "credentials wanted";
        let answer = format!(
            "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: {challenge}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        client.write_all(answer.as_bytes()).await?;
        return Ok(());
    }
    if method == "CONNECT" {
        let upstream = TcpStream::connect(resolve(&target)).await?;
        client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await?;
        relay(client, upstream, fault).await?;
    } else {
        let authority = target.strip_prefix("http://").and_then(|r| r.split('/').next()).unwrap_or("");
        let mut upstream = TcpStream::connect(resolve(authority)).await?;
        // HTTP/1.1 origin servers accept absolute-form, so the head goes on unchanged.
        upstream.write_all(&head).await?;
        relay(client, upstream, fault).await?;
    }
    Ok(())
}

/// Copies both ways; the server-to-client direction counts bytes for the fault.
async fn relay<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    client: S,
    upstream: TcpStream,
    fault: ProxyFault,
) -> anyhow::Result<()> {
    if fault == ProxyFault::None {
        let (mut c, mut u) = (client, upstream);
        tokio::io::copy_bidirectional(&mut c, &mut u).await?;
        return Ok(());
    }
    let (mut c_rd, mut c_wr) = tokio::io::split(client);
    let (mut u_rd, mut u_wr) = upstream.into_split();
    let up = tokio::spawn(async move { tokio::io::copy(&mut c_rd, &mut u_wr).await });
    let limit = match fault {
        ProxyFault::CutAfter { bytes, .. } | ProxyFault::StallAfter { bytes, .. } => bytes,
        ProxyFault::None => u64::MAX,
    };
    let mut sent = 0u64;
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = u_rd.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let allowed = usize::try_from(limit.saturating_sub(sent)).unwrap_or(usize::MAX).min(n);
        c_wr.write_all(&buf[..allowed]).await?;
        sent += allowed as u64;
        if sent >= limit {
            match fault {
                ProxyFault::StallAfter { .. } => std::future::pending::<()>().await,
                _ => break,
            }
        }
    }
    up.abort();
    Ok(())
}

/// `localhost:PORT` → `127.0.0.1:PORT` (the test servers listen there).
fn resolve(authority: &str) -> String {
    authority.replace("localhost", "127.0.0.1")
}
