//! A tiny HTTP/1.1 server (keep-alive, GET only) that serves fixed bodies and records, per
//! path, the moment just before it wrote the last byte of the response to the socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

type Done = Arc<Mutex<HashMap<String, Instant>>>;

/// The end of a response written on its own, after the instant is taken.
const LAST_WRITE: usize = 64 << 10;

#[derive(Debug)]
pub struct Responder {
    addr: SocketAddr,
    done: Done,
    task: JoinHandle<()>,
}

impl Responder {
    /// Serves `bodies` (path → body) on 127.0.0.1.
    pub async fn start(bodies: HashMap<String, Vec<u8>>) -> Result<Responder> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the responder")?;
        let addr = listener.local_addr()?;
        let done: Done = Arc::default();
        let bodies = Arc::new(bodies);
        let task = tokio::spawn({
            let done = Arc::clone(&done);
            async move {
                while let Ok((sock, _)) = listener.accept().await {
                    let _ = sock.set_nodelay(true);
                    tokio::spawn(serve(sock, Arc::clone(&bodies), Arc::clone(&done)));
                }
            }
        });
        Ok(Responder { addr, done, task })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// When the write of the last byte of `path`'s response began, if it completed.
    pub fn finished(&self, path: &str) -> Option<Instant> {
        self.done.lock().ok()?.get(path).copied()
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut sock: TcpStream, bodies: Arc<HashMap<String, Vec<u8>>>, done: Done) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Read one request head.
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match sock.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        let head = String::from_utf8_lossy(&head);
        let mut first = head.lines().next().unwrap_or_default().split_whitespace();
        let method = first.next().unwrap_or_default().to_owned();
        let path = first.next().unwrap_or_default().to_owned();
        let mut response = Vec::new();
        match bodies.get(&path) {
            Some(body) => {
                response.extend_from_slice(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\
                         ETag: \"{}\"\r\nLast-Modified: Wed, 21 Oct 2015 07:28:00 GMT\r\n\r\n",
                        body.len(),
                        path.trim_start_matches('/').replace('/', "-"),
                    )
                    .as_bytes(),
                );
                if method != "HEAD" {
                    response.extend_from_slice(body);
                }
            }
            None => response.extend_from_slice(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
        }
        // "Last byte sent" is the instant before the write that carries it (the last 64 KiB,
        // one system call into a loopback socket's buffer): an interval measured from it may
        // be a few µs too long, never too short, as one taken after the write was whenever a
        // preempted thread got round to it.
        let (most, last) = response.split_at(response.len().saturating_sub(LAST_WRITE));
        if !most.is_empty() && (sock.write_all(most).await.is_err() || sock.flush().await.is_err()) {
            return;
        }
        let now = Instant::now();
        if sock.write_all(last).await.is_err() || sock.flush().await.is_err() {
            return;
        }
        if let Ok(mut d) = done.lock() {
            d.insert(path, now);
        }
    }
}
