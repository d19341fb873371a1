//! A SOCKS5 proxy for tests (RFC 1928, `CONNECT` only; RFC 1929 user/password when asked
//! for). It records what each connection asked for, names as names (a client that
//! resolves nothing itself sends the host name), and relays the bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// What a client asked the SOCKS proxy for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocksRecord {
    /// `host:port` as sent: a name stays a name (remote DNS), an address an address.
    pub target: String,
    /// The client sent a name, not an address.
    pub by_name: bool,
    /// The user it authenticated as, if it did.
    pub user: Option<String>,
}

#[derive(Debug)]
pub struct TestSocks {
    addr: SocketAddr,
    records: Arc<Mutex<Vec<SocksRecord>>>,
    _tasks: JoinSet<()>,
}

impl TestSocks {
    /// A proxy that takes anyone (no authentication).
    pub async fn start() -> anyhow::Result<TestSocks> {
        TestSocks::start_with(None).await
    }

    /// A proxy that wants this user and password.
    pub async fn start_with_auth(user: &str, pass: &str) -> anyhow::Result<TestSocks> {
        TestSocks::start_with(Some((user.to_owned(), pass.to_owned()))).await
    }

    async fn start_with(auth: Option<(String, String)>) -> anyhow::Result<TestSocks> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        let r = records.clone();
        tasks.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, auth) = (r.clone(), auth.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, auth, r).await;
                });
            }
        });
        Ok(TestSocks { addr, records, _tasks: tasks })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `socks5h://[user:pass@]127.0.0.1:PORT` (the proxy resolves names).
    pub fn url(&self, scheme: &str, auth: Option<(&str, &str)>) -> String {
        match auth {
            Some((u, p)) => format!("{scheme}://{u}:{p}@{}", self.addr),
            None => format!("{scheme}://{}", self.addr),
        }
    }

    pub fn records(&self) -> Vec<SocksRecord> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

async fn serve(
    mut c: TcpStream,
    auth: Option<(String, String)>,
    records: Arc<Mutex<Vec<SocksRecord>>>,
) -> std::io::Result<()> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut head = [0u8; 2];
    c.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(bad("not SOCKS5"));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    c.read_exact(&mut methods).await?;
    let want = if auth.is_some() { 2 } else { 0 };
    if !methods.contains(&want) {
        c.write_all(&[5, 0xff]).await?;
        return Err(bad("no acceptable method"));
    }
    c.write_all(&[5, want]).await?;
    let mut user = None;
    if let Some((u, p)) = &auth {
        let mut ver_len = [0u8; 2];
        c.read_exact(&mut ver_len).await?;
        let mut name = vec![0u8; usize::from(ver_len[1])];
        c.read_exact(&mut name).await?;
        let mut plen = [0u8; 1];
        c.read_exact(&mut plen).await?;
        let mut pass = vec![0u8; usize::from(plen[0])];
        c.read_exact(&mut pass).await?;
        let ok = name == u.as_bytes() && pass == p.as_bytes();
        c.write_all(&[1, if ok { 0 } else { 1 }]).await?;
        if !ok {
            return Err(bad("wrong credentials"));
        }
        user = Some(u.clone());
    }
    let mut req = [0u8; 4];
    c.read_exact(&mut req).await?;
    if req[1] != 1 {
        c.write_all(&[5, 7, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
        return Err(bad("only CONNECT"));
    }
    let (host, by_name) = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            c.read_exact(&mut a).await?;
            (IpAddr::V4(Ipv4Addr::from(a)).to_string(), false)
        }
        4 => {
            let mut a = [0u8; 16];
            c.read_exact(&mut a).await?;
            (format!("[{}]", Ipv6Addr::from(a)), false)
        }
        3 => {
            let mut len = [0u8; 1];
            c.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0])];
            c.read_exact(&mut name).await?;
            (String::from_utf8_lossy(&name).into_owned(), true)
        }
        _ => return Err(bad("address type")),
    };
    let mut port = [0u8; 2];
    c.read_exact(&mut port).await?;
    let target = format!("{host}:{}", u16::from_be_bytes(port));
    if let Ok(mut r) = records.lock() {
        r.push(SocksRecord { target: target.clone(), by_name, user });
    }
    // `host:port`, `[v6]:port` or `name:port` (resolved here: the proxy's DNS).
    let Ok(mut upstream) = TcpStream::connect(target.as_str()).await else {
        c.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
        return Err(bad("connection refused"));
    };
    c.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    tokio::io::copy_bidirectional(&mut c, &mut upstream).await?;
    Ok(())
}
