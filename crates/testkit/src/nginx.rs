//! A real static file server for tests and benchmarks: nginx on 127.0.0.1, serving a
//! directory, stopped on drop. (`apt-get install nginx-light` provides it.)

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Serves `root` over HTTP/1.1 with sendfile, `ETag`, `Last-Modified` and ranges.
    pub fn serve(root: &Path) -> anyhow::Result<Nginx> {
        let dir = tempfile::tempdir()?;
        // Pick a free port (a small race with other processes; fine for tests).
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\npid {pid};\nerror_log {err};\ndaemon off;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{ access_log off; sendfile on; tcp_nopush on;\n\
                   client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};\n\
                   uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n\
                   server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n",
                pid = dir.path().join("nginx.pid").display(),
                err = dir.path().join("error.log").display(),
                tmp = dir.path().display(),
                root = root.display(),
            ),
        )?;
        let nginx =
            which("nginx").ok_or_else(|| anyhow::anyhow!("nginx is not installed (apt-get install nginx-light)"))?;
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "nginx did not start listening on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Nginx { child, addr, _dir: dir })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Nginx {
    /// SIGTERM, not SIGKILL: the master stops its worker on the way out (a killed master
    /// leaves the worker behind, still listening).
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let fixed = [PathBuf::from("/usr/sbin").join(name), PathBuf::from("/usr/bin").join(name)];
    let path: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    path.into_iter().map(|d| d.join(name)).chain(fixed).find(|p| p.is_file())
}
