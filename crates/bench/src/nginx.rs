//! nginx on 127.0.0.1 serving one directory three ways: plain HTTP/1.1 (sendfile), HTTPS
//! with TLS 1.3 and HTTP/1.1 only, and HTTPS with TLS 1.3 and HTTP/2 (ALPN `h2`, then
//! `http/1.1`). Modelled on `dlsession_testkit::Nginx`, which has no TLS.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dlsession_testkit::TestCa;

use crate::run;

#[derive(Debug)]
pub struct Nginx {
    child: Child,
    dir: PathBuf,
    pub http_port: u16,
    pub h1_port: u16,
    pub h2_port: u16,
    pub version: String,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Nginx {
    /// Serves `root`; the TLS servers present `ca`'s leaf certificate. `dir` holds the
    /// configuration, logs and key material.
    pub fn start(root: &Path, dir: &Path, ca: &TestCa) -> Result<Nginx> {
        let bin = run::which("nginx").context("nginx is not installed (apt-get install nginx-light)")?;
        let version = run::capture(bin.to_str().unwrap_or("nginx"), &["-v"])
            .map(|v| v.trim().trim_start_matches("nginx version: ").to_owned())
            .unwrap_or_else(|_| "nginx".into());
        std::fs::create_dir_all(dir)?;
        let cert = dir.join("leaf.pem");
        let key = dir.join("leaf.key");
        std::fs::write(&cert, ca.leaf_pem())?;
        std::fs::write(&key, ca.leaf_key_pem())?;
        let http_port = free_port()?;
        let h1_port = free_port()?;
        let h2_port = free_port()?;
        let tls = format!(
            "ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.3;",
            cert = cert.display(),
            key = key.display()
        );
        let conf = dir.join("nginx.conf");
        // nginx 1.22 enables HTTP/2 with `listen … ssl http2` (the `http2 on;` directive
        // only exists from 1.25.1).
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\npid {pid};\nerror_log {err};\ndaemon off;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n\
                   log_format bench '$server_port $server_protocol $status $connection \"$http_user_agent\"';\n\
                   access_log {access} bench;\n\
                   sendfile on; tcp_nopush on; keepalive_requests 100000; default_type application/octet-stream;\n\
                   client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};\n\
                   uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n\
                   server {{ listen 127.0.0.1:{http_port}; root {root}; }}\n\
                   server {{ listen 127.0.0.1:{h1_port} ssl; root {root}; {tls} }}\n\
                   server {{ listen 127.0.0.1:{h2_port} ssl http2; root {root}; {tls} }}\n\
                 }}\n",
                pid = dir.join("nginx.pid").display(),
                err = dir.join("error.log").display(),
                access = dir.join("access.log").display(),
                tmp = dir.display(),
                root = root.display(),
            ),
        )?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .context("starting nginx")?;
        let mut nginx = Nginx { child, dir: dir.to_owned(), http_port, h1_port, h2_port, version };
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in [http_port, h1_port, h2_port] {
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            while TcpStream::connect(addr).is_err() {
                if let Ok(Some(status)) = nginx.child.try_wait() {
                    bail!(
                        "nginx exited ({status}): {}",
                        std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default().trim()
                    );
                }
                if Instant::now() > deadline {
                    bail!("nginx did not start listening on {addr}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(nginx)
    }

    /// utime+stime (clock ticks) of nginx's worker process (there is one): the server's
    /// own CPU, which no download can finish faster than when it is the bottleneck (TLS).
    pub fn worker_cpu_ticks(&self) -> Option<u64> {
        let master = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")).ok()?;
        children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()).filter_map(|p| run::cpu_ticks(p).ok()).max()
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub fn h1_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.h1_port)
    }

    pub fn h2_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.h2_port)
    }

    /// Lines logged so far (one per request).
    pub fn access_log_len(&self) -> usize {
        std::fs::read_to_string(self.dir.join("access.log")).map(|t| t.lines().count()).unwrap_or(0)
    }

    /// Requests logged after line `from`, by `port protocol status client` (the user agent
    /// cut at its first `/`): how many requests, on how many distinct connections.
    pub fn protocols_since(&self, from: usize) -> BTreeMap<String, (usize, usize)> {
        let text = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        let mut seen: BTreeMap<String, (usize, BTreeSet<String>)> = BTreeMap::new();
        for line in text.lines().skip(from) {
            let mut parts = line.splitn(5, ' ');
            let (Some(port), Some(proto), Some(status), Some(conn), Some(ua)) =
                (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let ua = ua.trim_matches('"');
            let agent = ua.split(['/', ' ']).next().unwrap_or(ua);
            let entry = seen.entry(format!(":{port} {proto} {status} {agent}")).or_default();
            entry.0 += 1;
            entry.1.insert(conn.to_owned());
        }
        seen.into_iter().map(|(k, (n, conns))| (k, (n, conns.len()))).collect()
    }
}

impl Drop for Nginx {
    /// SIGTERM to the master, which stops its worker too (a SIGKILLed master leaves the
    /// worker running, still listening); SIGKILL if it has not exited after 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
