//! An upload server for tests: HTTP/1.1 on loopback (plain, or over TLS offering `h2` and
//! `http/1.1` as real servers do, and speaking only the latter), written on raw TCP so it
//! can send the informational `104 Upload Resumption Supported` that the resumable uploads
//! draft (interop version 6) announces an upload resource with.
//!
//! - `PUT`/`POST /files/NAME`: the body becomes file `NAME`; answered `201` with a small JSON
//!   body (`{"name":…,"size":…,"sha256":…}`). With resumption on and the client speaking
//!   interop version 6, a `104` with `Location: /uploads/ID` goes out before the body is
//!   read, and the bytes that arrive are kept even if the connection breaks.
//! - `HEAD /uploads/ID`: `204` with `Upload-Offset` and `Upload-Complete`.
//! - `PATCH /uploads/ID`: appends at `Upload-Offset` (`409` with the right offset if it is
//!   not the server's), `application/partial-upload` only.
//! - `DELETE /uploads/ID`: forgets the upload.
//!
//! Faults: answer a status instead (some requests), break the connection after some body
//! bytes (once), read slowly. Every request and every body byte is counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::content::sha256_hex;

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body bytes read from this request.
    pub body_bytes: u64,
    /// The status answered (0: the connection was cut).
    pub status: u16,
}

impl UploadRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What the server is told to do.
#[derive(Debug, Clone, Default)]
pub struct UploadFaults {
    /// Answer this status (after reading the body) to request number `n` (1-based, of
    /// every request) for each `(n, status)`; a `HEAD` answered 401 carries a challenge.
    pub statuses: Vec<(usize, u16)>,
    /// Break the connection once, after this many body bytes of one request.
    pub cut_after: Option<u64>,
    /// Read bodies at about this many bytes per second.
    pub rate: Option<u64>,
    /// Uploads must carry this header (name, value): others are answered `401` with
    /// `WWW-Authenticate` set to the third, after their body is read and dropped, and the
    /// connection is closed.
    pub wants: Option<(String, String, String)>,
    /// Pad the `201`'s JSON body with spaces to this many bytes.
    pub response_size: Option<usize>,
    /// Send the `201`'s body one byte at a time, this long apart.
    pub response_trickle: Option<std::time::Duration>,
    /// Send the `201`'s head and this many bytes of its body, then close the connection.
    pub response_cut_after: Option<usize>,
    /// `(n, after, status)`: answer request number `n` (as in `statuses`) with `status`
    /// once `after` bytes of its body are read, then read what else comes slowly (64 KiB
    /// every 20 ms) until the client closes.
    pub answer_early: Option<(usize, u64, u16)>,
    /// Answer a PUT or POST this long after its whole body was read.
    pub answer_after: Option<std::time::Duration>,
    /// `(n, status, location)`: answer request number `n` (as in `statuses`) with this
    /// redirect once its whole body was read (after `answer_after`).
    pub redirect: Option<(usize, u16, String)>,
    /// Pad the `104`'s `Location` with a query of this many bytes.
    pub offer_padding: Option<usize>,
}

#[derive(Debug, Default)]
struct State {
    resumable: bool,
    faults: UploadFaults,
    records: Vec<UploadRecord>,
    files: HashMap<String, Vec<u8>>,
    /// Upload resources: the file they become and the bytes so far, and whether complete.
    uploads: HashMap<u64, (String, Vec<u8>, bool)>,
    /// Bumped for an upload resource by each request to it: an older request still
    /// reading (its client gone, its bytes still in the socket) stops appending, as the
    /// draft asks of servers.
    generations: HashMap<u64, u64>,
    next_id: u64,
    /// Body bytes read, over all requests.
    received: u64,
    /// Over TLS: the protocol each connection negotiated (ALPN; empty for none).
    protocols: Vec<String>,
}

/// A connection, plain or TLS.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}
type Stream = Box<dyn Conn>;

#[derive(Debug)]
pub struct UploadServer {
    addr: SocketAddr,
    tls: bool,
    state: Arc<Mutex<State>>,
    _tasks: JoinSet<()>,
}

impl UploadServer {
    /// A server that offers resumption (`104`) when `resumable`.
    pub async fn start(resumable: bool) -> anyhow::Result<UploadServer> {
        UploadServer::start_with(resumable, None).await
    }

    /// The same over TLS with `ca`'s server certificate (`https://localhost:PORT`). A
    /// connection that negotiates `h2` is recorded and closed: this server speaks HTTP/1.1.
    pub async fn start_tls(resumable: bool, ca: &crate::TestCa) -> anyhow::Result<UploadServer> {
        UploadServer::start_with(resumable, Some(tokio_rustls::TlsAcceptor::from(ca.server_config()))).await
    }

    async fn start_with(resumable: bool, tls: Option<tokio_rustls::TlsAcceptor>) -> anyhow::Result<UploadServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State { resumable, next_id: 1, ..State::default() }));
        let mut tasks = JoinSet::new();
        let (s, secure) = (state.clone(), tls.is_some());
        tasks.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, tls) = (s.clone(), tls.clone());
                tokio::spawn(async move {
                    let stream: Stream = match tls {
                        None => Box::new(stream),
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(stream).await else { return };
                            let protocol = tls.get_ref().1.alpn_protocol().unwrap_or_default();
                            let protocol = String::from_utf8_lossy(protocol).into_owned();
                            s.lock().unwrap().protocols.push(protocol.clone());
                            if protocol == "h2" {
                                return;
                            }
                            Box::new(tls)
                        }
                    };
                    let _ = serve(stream, s).await;
                });
            }
        });
        Ok(UploadServer { addr, tls: secure, state, _tasks: tasks })
    }

    pub fn url(&self, path: &str) -> String {
        if self.tls {
            format!("https://localhost:{}{path}", self.addr.port())
        } else {
            format!("http://{}{path}", self.addr)
        }
    }

    /// Over TLS: the protocol each connection negotiated, in order.
    pub fn protocols(&self) -> Vec<String> {
        self.state.lock().unwrap().protocols.clone()
    }

    pub fn set_faults(&self, faults: UploadFaults) {
        self.state.lock().unwrap().faults = faults;
    }

    /// The content of a finished file.
    pub fn file(&self, name: &str) -> Option<Vec<u8>> {
        self.state.lock().unwrap().files.get(name).cloned()
    }

    pub fn records(&self) -> Vec<UploadRecord> {
        self.state.lock().unwrap().records.clone()
    }

    /// Body bytes read over all requests (what the client sent, resends included).
    pub fn received(&self) -> u64 {
        self.state.lock().unwrap().received
    }

    /// Bytes held by the upload resource the server handed out last.
    pub fn partial(&self) -> u64 {
        let s = self.state.lock().unwrap();
        s.uploads.iter().max_by_key(|(id, _)| **id).map_or(0, |(_, (_, data, _))| data.len() as u64)
    }
}

struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

async fn read_head(stream: &mut Stream, buf: &mut Vec<u8>) -> anyhow::Result<Option<Head>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(len) = req.parse(buf)? {
            let head = Head {
                method: req.method.unwrap_or("").to_owned(),
                path: req.path.unwrap_or("").to_owned(),
                headers: req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect(),
            };
            buf.drain(..len);
            return Ok(Some(head));
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn respond(stream: &mut Stream, status: u16, headers: &[(&str, String)], body: &[u8]) -> anyhow::Result<()> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(out.as_bytes()).await?;
    stream.write_all(body).await?;
    Ok(())
}

fn reason(status: u16) -> &'static str {
    match status {
        104 => "Upload Resumption Supported",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        411 => "Length Required",
        415 => "Unsupported Media Type",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

async fn serve(mut stream: Stream, state: Arc<Mutex<State>>) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut stream, &mut buf).await? {
        let number = {
            let mut s = state.lock().unwrap();
            s.records.push(UploadRecord {
                method: head.method.clone(),
                path: head.path.clone(),
                headers: head.headers.clone(),
                body_bytes: 0,
                status: 0,
            });
            s.records.len()
        };
        let status = handle(&mut stream, &mut buf, &head, number, &state).await?;
        state.lock().unwrap().records[number - 1].status = status;
        // Cut on purpose, refused before its body was read, or answered early.
        let early = state.lock().unwrap().faults.answer_early.is_some_and(|(n, _, _)| n == number);
        if status == 0 || status == 401 || early {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads and drops a body of `length` bytes (`buf` holds its start).
async fn discard(stream: &mut Stream, buf: &mut Vec<u8>, length: u64) -> anyhow::Result<()> {
    let mut left = length.saturating_sub(buf.len() as u64);
    buf.drain(..usize::try_from(length).unwrap_or(usize::MAX).min(buf.len()));
    let mut chunk = vec![0u8; 64 << 10];
    while left > 0 {
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "the client closed before its body was read");
        left = left.saturating_sub(n as u64);
    }
    Ok(())
}

/// Serves one request; the status answered, or 0 when the connection was cut on purpose.
async fn handle(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    head: &Head,
    number: usize,
    state: &Arc<Mutex<State>>,
) -> anyhow::Result<u16> {
    let interop = head.header("upload-draft-interop-version") == Some("6");
    // No length and no chunking: no body (RFC 9112, 6.3); chunked bodies are not spoken here.
    let length = match (head.header("content-length"), head.header("transfer-encoding")) {
        (Some(v), _) => v.trim().parse::<u64>().ok(),
        (None, None) => Some(0),
        (None, Some(_)) => None,
    };
    let forced = state.lock().unwrap().faults.statuses.iter().find(|(n, _)| *n == number).map(|(_, s)| *s);
    let upload_id = head.path.strip_prefix("/uploads/").and_then(|id| id.parse::<u64>().ok());
    match (head.method.as_str(), head.path.strip_prefix("/files/"), upload_id) {
        ("PUT" | "POST", Some(name), _) => {
            let Some(length) = length else {
                respond(stream, 411, &[], b"").await?;
                return Ok(411);
            };
            let wants = state.lock().unwrap().faults.wants.clone();
            if let Some((header, value, challenge)) = wants
                && head.header(&header) != Some(value.as_str())
            {
                // Read first: closing with unread bytes would reset the connection, and
                // the reset could overtake the answer.
                discard(stream, buf, length).await?;
                respond(stream, 401, &[("WWW-Authenticate", challenge), ("Connection", "close".into())], b"").await?;
                return Ok(401);
            }
            let early = state.lock().unwrap().faults.answer_early.filter(|(n, _, _)| *n == number);
            if let Some((_, after, status)) = early {
                let after = after.min(length);
                discard(stream, buf, after).await?;
                respond(stream, status, &[("Connection", "close".into())], b"").await?;
                // The rest is read only as the client sends it before it closes (it cannot
                // all fit the socket buffers): the answer is in long before the body is out.
                let mut chunk = vec![0u8; 64 << 10];
                while matches!(stream.read(&mut chunk).await, Ok(n) if n > 0) {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                return Ok(status);
            }
            let resumable = state.lock().unwrap().resumable && interop;
            let id = if resumable {
                let id = {
                    let mut s = state.lock().unwrap();
                    let id = s.next_id;
                    s.next_id += 1;
                    s.uploads.insert(id, (name.to_owned(), Vec::new(), false));
                    id
                };
                let padding = state.lock().unwrap().faults.offer_padding.map(|n| format!("?p={}", "x".repeat(n)));
                let interim = format!(
                    "HTTP/1.1 104 Upload Resumption Supported\r\nUpload-Draft-Interop-Version: 6\r\nLocation: /uploads/{id}{}\r\n\r\n",
                    padding.unwrap_or_default()
                );
                stream.write_all(interim.as_bytes()).await?;
                Some(id)
            } else {
                None
            };
            let Some(body) = read_body(stream, buf, length, number, id, state).await? else { return Ok(0) };
            let answer_after = state.lock().unwrap().faults.answer_after;
            if let Some(after) = answer_after {
                tokio::time::sleep(after).await;
            }
            let redirect = state.lock().unwrap().faults.redirect.clone().filter(|(n, _, _)| *n == number);
            if let Some((_, status, location)) = redirect {
                respond(stream, status, &[("Location", location)], b"").await?;
                return Ok(status);
            }
            finish(stream, name, id, body, forced, state).await
        }
        ("HEAD", _, Some(id)) => {
            *state.lock().unwrap().generations.entry(id).or_default() += 1;
            if let Some(status) = forced {
                // A 401 asks as a server would (an expired token on the upload resource).
                let challenge = [("WWW-Authenticate", "ApiKey realm=\"uploads\"".to_owned())];
                respond(stream, status, if status == 401 { &challenge[..] } else { &[] }, b"").await?;
                return Ok(status);
            }
            let held = state.lock().unwrap().uploads.get(&id).map(|(_, d, done)| (d.len(), *done));
            let Some((offset, done)) = held else {
                respond(stream, 404, &[], b"").await?;
                return Ok(404);
            };
            let complete = if done { "?1" } else { "?0" };
            // A HEAD answer has no body; its headers say nothing about one.
            let out = format!(
                "HTTP/1.1 204 No Content\r\nUpload-Offset: {offset}\r\nUpload-Complete: {complete}\r\nCache-Control: no-store\r\nUpload-Draft-Interop-Version: 6\r\n\r\n"
            );
            stream.write_all(out.as_bytes()).await?;
            Ok(204)
        }
        ("PATCH", _, Some(id)) => {
            *state.lock().unwrap().generations.entry(id).or_default() += 1;
            let Some(length) = length else {
                respond(stream, 411, &[], b"").await?;
                return Ok(411);
            };
            let held = state.lock().unwrap().uploads.get(&id).map(|(name, d, _)| (name.clone(), d.len() as u64));
            let Some((name, offset)) = held else {
                respond(stream, 404, &[], b"").await?;
                return Ok(404);
            };
            let asked = head.header("upload-offset").and_then(|v| v.trim().parse::<u64>().ok());
            if asked != Some(offset) {
                respond(stream, 409, &[("Upload-Offset", offset.to_string())], b"").await?;
                return Ok(409);
            }
            if head.header("content-type") != Some("application/partial-upload") {
                respond(stream, 415, &[], b"").await?;
                return Ok(415);
            }
            let Some(body) = read_body(stream, buf, length, number, Some(id), state).await? else { return Ok(0) };
            finish(stream, &name, Some(id), body, forced, state).await
        }
        ("DELETE", _, Some(id)) => {
            let gone = state.lock().unwrap().uploads.remove(&id).is_some();
            let status = if gone { 204 } else { 404 };
            respond(stream, status, &[], b"").await?;
            Ok(status)
        }
        _ => {
            respond(stream, 404, &[], b"").await?;
            Ok(404)
        }
    }
}

/// Reads `length` body bytes (into the upload resource `id` as they come, if any). `None`
/// when the connection broke, or was cut on purpose.
async fn read_body(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    length: u64,
    number: usize,
    id: Option<u64>,
    state: &Arc<Mutex<State>>,
) -> anyhow::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    let (cut_after, rate) = {
        let s = state.lock().unwrap();
        (s.faults.cut_after, s.faults.rate)
    };
    let generation = id.map(|id| state.lock().unwrap().generations.get(&id).copied().unwrap_or(0));
    let started = tokio::time::Instant::now();
    while (body.len() as u64) < length {
        if buf.is_empty() {
            let mut chunk = vec![0u8; 16 << 10];
            let n = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
        }
        let take = buf.len().min(usize::try_from(length - body.len() as u64).unwrap_or(usize::MAX));
        let data: Vec<u8> = buf.drain(..take).collect();
        {
            let mut s = state.lock().unwrap();
            if let Some(id) = id
                && s.generations.get(&id).copied().unwrap_or(0) != generation.unwrap_or(0)
            {
                // A newer request took the upload over.
                return Ok(None);
            }
            s.received += data.len() as u64;
            s.records[number - 1].body_bytes += data.len() as u64;
            if let Some((_, held, _)) = id.and_then(|id| s.uploads.get_mut(&id)) {
                held.extend_from_slice(&data);
            }
        }
        body.extend_from_slice(&data);
        if let Some(cut) = cut_after
            && body.len() as u64 >= cut
        {
            state.lock().unwrap().faults.cut_after = None;
            return Ok(None);
        }
        if let Some(rate) = rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(body.len() as f64 / rate as f64);
            tokio::time::sleep_until(started + due).await;
        }
    }
    Ok(Some(body))
}

/// The whole body arrived: the file is stored (for an upload resource, all of its bytes),
/// and the answer goes out.
async fn finish(
    stream: &mut Stream,
    name: &str,
    id: Option<u64>,
    body: Vec<u8>,
    forced: Option<u16>,
    state: &Arc<Mutex<State>>,
) -> anyhow::Result<u16> {
    if let Some(status) = forced {
        respond(stream, status, &[], format!("error {status}").as_bytes()).await?;
        return Ok(status);
    }
    let data = {
        let mut s = state.lock().unwrap();
        let data = match id.and_then(|id| s.uploads.get_mut(&id)) {
            Some((_, held, done)) => {
                *done = true;
                held.clone()
            }
            None => body,
        };
        s.files.insert(name.to_owned(), data.clone());
        data
    };
    let mut json = format!(r#"{{"name":"{name}","size":{},"sha256":"{}"}}"#, data.len(), sha256_hex(&data));
    if let Some(size) = state.lock().unwrap().faults.response_size {
        json.extend(std::iter::repeat_n(' ', size.saturating_sub(json.len())));
    }
    let headers = [
        ("Content-Type", "application/json".to_owned()),
        ("Upload-Complete", "?1".to_owned()),
        ("Upload-Offset", data.len().to_string()),
        ("Location", format!("/files/{name}")),
    ];
    let (trickle, cut) = {
        let f = &state.lock().unwrap().faults;
        (f.response_trickle, f.response_cut_after)
    };
    if let Some(cut) = cut {
        let mut out = format!("HTTP/1.1 201 {}\r\n", reason(201));
        for (n, v) in &headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\n\r\n", json.len()));
        stream.write_all(out.as_bytes()).await?;
        stream.write_all(json.as_bytes().get(..cut).unwrap_or(json.as_bytes())).await?;
        stream.flush().await?;
        anyhow::bail!("testkit fault: the answer's body cut after {cut} bytes");
    }
    match trickle {
        Some(every) => respond_trickling(stream, 201, &headers, json.as_bytes(), every).await?,
        None => respond(stream, 201, &headers, json.as_bytes()).await?,
    }
    Ok(201)
}

/// `respond`, with the body sent one byte at a time, `every` apart.
async fn respond_trickling(
    stream: &mut Stream,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
    every: std::time::Duration,
) -> anyhow::Result<()> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(out.as_bytes()).await?;
    stream.flush().await?;
    for byte in body {
        tokio::time::sleep(every).await;
        stream.write_all(std::slice::from_ref(byte)).await?;
        stream.flush().await?;
    }
    Ok(())
}
