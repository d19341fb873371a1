//! The download engine: one tokio task per running download.
//!
//! A worker is handed a [`Job`] by the core and reports back only through
//! [`WorkerEvent`]s to a [`Sink`] (`report`); it knows nothing about IPC, SQL or who
//! listens. It never
//! decides a task's fate: it reports what happened (a response started, a checkpoint is
//! durable, the data is complete, a failure and whether it is transient) and the core
//! decides.

mod attempt;
pub mod auth;
pub mod checkpoint;
pub mod cookies;
pub mod direct;
pub mod files;
pub mod http;
pub mod limiter;
pub mod names;
pub mod progress;
pub mod proxy;
pub mod reads;
mod report;
pub(crate) mod threads;
pub mod upload;
pub mod writer;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span};

use checkpoint::CheckpointPolicy;
use dlsession_proto::{ErrorCode, Header, SessionProxy, UploadMethod};
pub use http::{Failure, Retry};
use http::{HttpClient, can_resume, classify};
use limiter::RateLimiter;
pub use progress::Progress;
use report::Timing;
pub use report::{FinishPlan, ResponseMeta, Sink, UploadResponse, WorkerEvent, WorkerLink};
use writer::WriterMsg;

/// Body frames are handed to the writer thread in batches of at most about this many bytes.
const HANDOFF: usize = 256 << 10;
/// A batch takes frames (or a paced frame's slices) that are already there for at most this
/// long after its first one: a body paced by a bandwidth limit always has its next frame there
/// (hyper read ahead of the pace) and gathered a whole HANDOFF, four seconds at 64 KiB/s; a
/// frame paced in slices was held until its last slice. Waiting for frames not yet
/// there was tried and dropped: frames held while more arrive keep hyper's read buffers alive,
/// and 50 slow downloads took 216 KiB each instead of 106 (rss-per-download).
const GATHER: Duration = Duration::from_millis(4);
/// Batches queued for the writer thread per download.
const WRITER_QUEUE: usize = 4;
/// A body announced at this size or less (and within the checkpoint window) is gathered
/// in memory and handed to the writer whole, once it has all arrived: one hand-off per file
/// instead of one per batch plus the finish. A body still arriving after the checkpoint
/// interval is handed over as it stands and the rest streams, so it checkpoints on time.
const SMALL_BODY: u64 = 1 << 20;

/// Everything a worker needs for one attempt. `Debug` shows the URL redacted and no
/// header values.
pub struct Job {
    pub link: WorkerLink,
    /// The session's identifier, for logs.
    pub session: String,
    pub url: String,
    /// Session headers followed by task headers.
    pub headers: Vec<Header>,
    /// Committed offset of the partial file.
    pub offset: u64,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// The resource's length as the server gave it when the partial data was downloaded
    /// (`None`: unknown, or not told apart from the app's hint).
    pub total: Option<u64>,
    pub expected_sha256: Option<[u8; 32]>,
    pub part_path: PathBuf,
    /// The mode the file is created with (and handed over with).
    pub file_mode: u32,
    pub idle_timeout: Duration,
    /// `timeout_for_resource` runs out at this instant.
    pub deadline: Option<Instant>,
    pub progress: Arc<Progress>,
    /// The bandwidth limits the download is under (its own, its session's, the daemon's).
    pub limiters: Vec<Arc<RateLimiter>>,
    /// The session's cookies, unless it keeps none.
    pub cookies: Option<Arc<cookies::CookieJar>>,
    /// The session's own proxy (`None`: the daemon's environment).
    pub proxy: Option<SessionProxy>,
    pub stop: watch::Receiver<bool>,
    /// Set for an upload: what it sends (its response body is what it receives).
    pub upload: Option<UploadJob>,
    /// Credentials the app gave, each for the requests to its origin.
    pub auth: Vec<auth::AuthHeader>,
    /// The session asks its app about challenges: an upload reports a 401 as a challenge
    /// instead of as its final response.
    pub answers_challenges: bool,
    /// The session's client certificate (or why it cannot be read).
    pub client_cert: Option<http::CertState>,
    /// The task's mark, set on its finished file (see `files::MARK`); `None`: the file's
    /// mode lets others write it, so its finish is committed before its move.
    pub mark: Option<String>,
    /// The first attempt of a task read from the database: where its finished file goes,
    /// to look for it there (moved before a crash) before anything else.
    pub look_in_place: Option<PathBuf>,
}

/// What an upload attempt sends. `Debug` never shows the upload resource's URL.
pub struct UploadJob {
    pub method: UploadMethod,
    pub file: PathBuf,
    /// The file as it was submitted: anything else is not sent.
    pub size: u64,
    pub mtime_ns: i64,
    /// A failure may be retried even after the whole body went out.
    pub retry_safe: bool,
    /// Safe without the server's resumption too: a PUT or an idempotent POST.
    pub safe_alone: bool,
    /// The upload resource the server offered earlier: continue there.
    pub resume_url: Option<String>,
    /// Where the response body is put for the app.
    pub body_to: PathBuf,
    /// Nothing is sent before this fires: the attempt is recorded durably first (a request
    /// that must not go twice).
    pub go: Option<oneshot::Receiver<()>>,
}

impl std::fmt::Debug for UploadJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadJob")
            .field("method", &self.method)
            .field("file", &self.file)
            .field("size", &self.size)
            .field("resumable", &self.resume_url.is_some())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("task", &self.link.task())
            .field("session", &self.session)
            .field("url", &dlsession_proto::redact::Shown(&self.url))
            .field("offset", &self.offset)
            .field("part_path", &self.part_path)
            .finish_non_exhaustive()
    }
}

/// A session proxy, the id of a client certificate, the app's credentials for proxies
/// (`origin`, header) that go on `CONNECT`s, and the HTTP versions offered.
type RouteKey = (Option<SessionProxy>, Option<u64>, Vec<(String, HeaderName, HeaderValue)>, http::Versions);

/// Clients made for proxy credentials beyond this many: the one used longest ago is
/// dropped (its connections live on while in use); a credential that changes makes a new
/// one.
const MAX_CREDENTIAL_ROUTES: usize = 32;

/// A client made for a session proxy or client certificate.
#[derive(Debug)]
struct Route {
    client: HttpClient,
    proxies: proxy::Proxies,
    /// The certificate it presents: while someone holds it, the client is kept.
    identity: Option<std::sync::Weak<http::ClientIdentity>>,
    /// When a job last took it.
    used: std::time::Instant,
}

#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub max_redirects: u32,
    /// The longest URL a redirect may lead to (the same limit as a task's own URL).
    pub max_url_len: usize,
    pub checkpoint_bytes: u64,
    pub checkpoint_interval: Duration,
    /// Most download writers running at once (see `threads`).
    pub writer_threads: usize,
}

/// The shared HTTP clients and settings. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Engine {
    factory: http::ClientFactory,
    /// The clients going as the daemon's environment says: for downloads, and for uploads
    /// (HTTP/1.1 only, see `http::Versions`). Made again when the network changes.
    clients: std::sync::Mutex<(HttpClient, HttpClient)>,
    proxies: proxy::Proxies,
    /// One client per session proxy, client certificate and proxy credential in use (made
    /// when first needed; its connections are pooled apart from the others', so a tunnel
    /// one credential opened never serves another).
    by_route: std::sync::Mutex<std::collections::HashMap<RouteKey, Route>>,
    settings: EngineSettings,
    mover: files::Mover,
    writers: threads::JobThreads,
}

const USER_AGENT: &str = concat!("dlsessiond/", env!("CARGO_PKG_VERSION"));

impl Engine {
    /// Fails only if the thread that moves finished files cannot be started.
    pub fn new(
        factory: http::ClientFactory,
        proxies: proxy::Proxies,
        settings: EngineSettings,
    ) -> std::io::Result<Engine> {
        tracing::info!(proxies = %proxies.describe(), "proxy settings from the environment");
        let clients = Engine::environment_clients(&factory, &proxies).map_err(std::io::Error::other)?;
        Ok(Engine {
            clients: std::sync::Mutex::new(clients),
            factory,
            proxies,
            by_route: std::sync::Mutex::default(),
            writers: threads::JobThreads::new(settings.writer_threads),
            settings,
            mover: files::Mover::start()?,
        })
    }

    fn environment_clients(
        factory: &http::ClientFactory,
        proxies: &proxy::Proxies,
    ) -> Result<(HttpClient, HttpClient), rustls::Error> {
        let client = factory.client(proxies, None, Arc::from([]), http::Versions::Http1And2)?;
        let upload_client = factory.client(proxies, None, Arc::from([]), http::Versions::Http1)?;
        Ok((client, upload_client))
    }

    /// The network changed (links, addresses, routes): pooled connections may sit on an
    /// address that is gone, or go out the wrong way (a dock, a VPN, a new lease), and a
    /// shared HTTP/2 one would carry every new request until its ping gave up. New requests
    /// get fresh pools; connections in use go on until they end.
    pub fn forget_connections(&self) {
        match Engine::environment_clients(&self.factory, &self.proxies) {
            Ok(fresh) => *self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = fresh,
            Err(e) => tracing::warn!(error = %e, "cannot make fresh HTTP clients; the pooled connections stay"),
        }
        self.by_route.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }

    /// The client (and proxy rules) for a job: its session's proxy, else the environment's,
    /// presenting its session's client certificate if it has one, and the app's proxy
    /// credentials on `CONNECT`s, offering `versions` (uploads: HTTP/1.1 only).
    fn route(&self, job: &Job, versions: http::Versions) -> Result<(HttpClient, proxy::Proxies), Failure> {
        let identity = match &job.client_cert {
            None => None,
            Some(http::CertState::Ready(id)) => Some(id.as_ref()),
            Some(http::CertState::Reading) => {
                return Err(Failure::transient(
                    ErrorCode::Tls,
                    "the session's client certificate is still being read (its files did not answer at start)",
                ));
            }
            Some(http::CertState::Unusable(e)) => {
                return Err(Failure::permanent(
                    ErrorCode::Tls,
                    format!("the session's client certificate cannot be used: {e}"),
                ));
            }
        };
        let mut tunnel_auth: Vec<_> =
            job.auth.iter().filter(|a| a.proxy).map(|a| (a.origin.clone(), a.name.clone(), a.value.clone())).collect();
        // One key for one set, whatever the order it was gathered in.
        tunnel_auth.sort_by(|a, b| (&a.0, a.1.as_str(), a.2.as_bytes()).cmp(&(&b.0, b.1.as_str(), b.2.as_bytes())));
        if job.proxy.is_none() && identity.is_none() && tunnel_auth.is_empty() {
            let clients = self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let client = match versions {
                http::Versions::Http1And2 => clients.0.clone(),
                http::Versions::Http1 => clients.1.clone(),
            };
            return Ok((client, self.proxies.clone()));
        }
        let key = (job.proxy.clone(), identity.map(|i| i.id), tunnel_auth, versions);
        let mut clients = self.by_route.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(found) = clients.get_mut(&key) {
            found.used = std::time::Instant::now();
            return Ok((found.client.clone(), found.proxies.clone()));
        }
        // A certificate no session holds any more (replaced, dropped): its client and key go.
        clients.retain(|_, r| r.identity.as_ref().is_none_or(|w| w.strong_count() > 0));
        if clients.keys().filter(|k| !k.2.is_empty()).count() >= MAX_CREDENTIAL_ROUTES {
            let oldest =
                clients.iter().filter(|(k, _)| !k.2.is_empty()).min_by_key(|(_, r)| r.used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                clients.remove(&oldest);
            }
        }
        let proxies = match &job.proxy {
            Some(p) => proxy::Proxies::new(p.url.as_deref().unwrap_or(""), "", "", &p.no_proxy),
            None => self.proxies.clone(),
        };
        let client = self.factory.client(&proxies, identity, Arc::from(key.2.clone()), versions).map_err(|e| {
            Failure::permanent(ErrorCode::Tls, format!("the session's client certificate cannot be used: {e}"))
        })?;
        let identity = match &job.client_cert {
            Some(http::CertState::Ready(id)) => Some(Arc::downgrade(id)),
            _ => None,
        };
        let used = std::time::Instant::now();
        clients.insert(key, Route { client: client.clone(), proxies: proxies.clone(), identity, used });
        Ok((client, proxies))
    }

    /// `f`, a request to `url` that got no response, with the address its connection went
    /// to (see `Failure::first_hop`): an address written in the URL (or the proxy's), else
    /// what its name last resolved to.
    pub(super) fn unanswered(&self, mut f: Failure, url: &url::Url, proxies: &proxy::Proxies) -> Failure {
        f.first_hop =
            proxies.first_hop(url).and_then(|host| host.parse().ok().or_else(|| self.factory.resolved().of(&host)));
        f
    }

    /// Starts a worker for `job`.
    pub fn spawn(self: &Arc<Self>, job: Job) -> tokio::task::JoinHandle<()> {
        let engine = Arc::clone(self);
        // Debug: at the default level an enabled span cost every poll of every download an
        // enter and exit in the registry; what is logged at info names its task itself.
        let span = debug_span!("download", session = %job.session, task = job.link.task());
        tokio::spawn(
            async move {
                let link = job.link.clone();
                let _abandon = AbandonOnDrop(link.abandoned.clone());
                // A bug that panics a worker fails its attempt; it never leaves the task
                // "running" with nobody working on it.
                let work = async move {
                    let mut job = job;
                    if job.upload.is_some() { engine.upload(&mut job).await } else { engine.download(job).await }
                };
                let outcome = match AssertUnwindSafe(work).catch_unwind().await {
                    Ok(outcome) => outcome,
                    Err(panic) => Outcome::Failed(Failure::transient(
                        ErrorCode::Internal,
                        format!("the download worker failed: {}", crate::panics::message(panic.as_ref())),
                    )),
                };
                debug!(?outcome, "worker finished");
                outcome.report(&link);
            }
            .instrument(span),
        )
    }

    /// Puts a finished file (synced at `from`, `size` bytes) at `to` again, after an earlier
    /// try failed or was cut short by a restart; reports `Moved`, `MoveFailed`, or a
    /// failure that starts the download over if the data is gone.
    pub fn spawn_move(
        &self,
        link: WorkerLink,
        job: files::Finish,
        leftovers: files::Leftovers,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let target = job.to.clone();
            let done = tokio::task::spawn_blocking(move || files::complete_move(&job, leftovers)).await;
            let outcome = match done {
                Ok(Ok(())) => Outcome::Moved(target.to_string_lossy().into_owned()),
                Ok(Err(files::CompleteError::Lost)) => Outcome::Failed(Failure::restart(
                    ErrorCode::FileError,
                    "the finished file is gone from the cache and from its destination; downloading it again",
                )),
                Ok(Err(files::CompleteError::Move(e))) => Outcome::MoveFailed(move_error(&e)),
                Err(e) => Outcome::MoveFailed(dlsession_proto::ErrorInfo::new(
                    ErrorCode::DestinationUnavailable,
                    format!("the move failed: {e}"),
                )),
            };
            outcome.report(&link);
        })
    }

    async fn download(&self, mut job: Job) -> Outcome {
        if let Some(to) = job.look_in_place.take()
            && let Some(found) = self.look_in_place(&job, &to).await
        {
            return found_outcome(&to, found);
        }
        let resumable = job.offset > 0 && can_resume(job.etag.as_deref(), job.last_modified.as_deref());
        let want = if resumable { job.offset } else { 0 };
        let hash = job.expected_sha256.is_some();
        let path = job.part_path.clone();
        // A fresh transfer opens its file on the writer thread, while the request is out;
        // a resumed one must know how much data survived before it asks for the rest.
        let mut prepared = if want == 0 {
            None
        } else {
            let mode = job.file_mode;
            let progress = job.progress.clone();
            match tokio::task::spawn_blocking(move || writer::prepare(&path, want, hash, mode, &progress)).await {
                Ok(Ok(p)) => Some(p),
                Ok(Err(e)) => return Outcome::Failed(file_failure(&e, "preparing the partial file")),
                Err(e) => return Outcome::Failed(Failure::transient(ErrorCode::Internal, format!("worker: {e}"))),
            }
        };
        let offset = prepared.as_ref().map_or(0, |p| p.offset);
        let lost_data = job.offset > 0 && offset == 0;

        let (resp, meta) = match self.ask(&job, offset).await {
            Ok(answer) => answer,
            Err(None) => return Outcome::Stopped(offset),
            Err(Some(f)) => return Outcome::Failed(f),
        };
        let mut stop = job.stop.clone();
        if meta.offset != offset
            && let Some(p) = prepared.take()
        {
            // The server sent the whole resource: start the file over.
            let reset = tokio::task::spawn_blocking(move || -> std::io::Result<writer::Prepared> {
                use std::io::{Seek, SeekFrom};
                let mut p = p;
                p.file.set_len(0)?;
                p.file.seek(SeekFrom::Start(0))?;
                p.offset = 0;
                if hash {
                    p.hasher = Some(sha2::Digest::new());
                }
                Ok(p)
            })
            .await;
            prepared = Some(match reset {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => return Outcome::Failed(file_failure(&e, "truncating the partial file")),
                Err(e) => return Outcome::Failed(Failure::transient(ErrorCode::Internal, format!("worker: {e}"))),
            });
        }
        let meta = ResponseMeta { restarted: meta.restarted || lost_data, ..meta };
        let body_began = std::time::Instant::now();
        let complete = meta.complete;
        crate::failpoint::hit("worker-response");
        job.progress.received.store(meta.offset, Ordering::Relaxed);
        job.progress.expected.store(meta.total.unwrap_or(u64::MAX), Ordering::Relaxed);
        let (total, ends_at) = (meta.total, meta.ends_at);
        let meta_offset = meta.offset;
        // The file's bytes come from more than one response: kept ones joined by this one,
        // or the rest of a capped range asked for below.
        let mut spliced = meta_offset > 0;
        let body_len = ends_at.map(|e| e.saturating_sub(meta.offset));
        // Starting over while the store still holds an offset into the old data: that
        // offset must be gone before new bytes land, or a crash could leave the new
        // resource's first bytes to be resumed with the old one's rest (docs/behaviour.md, "Retries and resume").
        let (durable, committed) = if job.offset > 0 && meta.offset == 0 {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        // What the rest of a capped range is asked for with, in this attempt (`ask_for_the_rest`).
        let validators = (meta.etag.clone(), meta.last_modified.clone());
        job.link.send(WorkerEvent::Started { meta, durable });
        if let Some(committed) = committed {
            // A stop is heard meanwhile (the commit may wait long: the database refusing
            // writes, a shutdown): nothing new was written, and the reset is on its way.
            let landed = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return Outcome::Stopped(0),
                r = committed => r,
            };
            if landed.is_err() {
                return Outcome::Aborted;
            }
            // Abort only (never a pause): this runs on the async runtime.
            crate::failpoint::hit("restart-after-reset");
        }

        // Enough to keep the disk busy while the network delivers; bounds memory per
        // download to about HANDOFF × WRITER_QUEUE bytes (SMALL_BODY for a small one).
        let (tx, rx) = mpsc::channel::<WriterMsg>(WRITER_QUEUE);
        let policy =
            CheckpointPolicy { bytes: self.settings.checkpoint_bytes, interval: self.settings.checkpoint_interval };
        let link = job.link.clone();
        let path = job.part_path.clone();
        let mode = job.file_mode;
        let progress = job.progress.clone();
        let mark = job.mark.clone();
        let start_writer = move || {
            self.writers.run(move || {
                // A writer that waited for a thread may start after its attempt was given
                // up: it must not empty a partial file a newer attempt is writing.
                if link.is_abandoned() {
                    return Err((writer::abandoned(), "starting the writer"));
                }
                let prepared = match prepared {
                    Some(p) => p,
                    None => writer::prepare(&path, 0, hash, mode, &progress)
                        .map_err(|e| (e, "preparing the partial file"))?,
                };
                writer::run(prepared, &path, policy, link, rx, mark.as_deref())
                    .map_err(|e| (e, "writing the partial file"))
            })
        };
        // A small body is held (never more than the checkpoint window, never longer than
        // the checkpoint interval): past that the writer starts and the rest streams.
        let mut hold = body_len
            .filter(|&n| n <= SMALL_BODY.min(self.settings.checkpoint_bytes))
            .map(|limit| Hold { until: Instant::now() + self.settings.checkpoint_interval, limit });
        if let (Some(hold), Some(allowance)) = (&hold, resp.extensions().get::<reads::ReadAllowance>()) {
            allowance.grant(hold.limit);
        }
        // The connection may wait for bytes that are sure to come (see `reads`).
        let mut ahead = body_ahead(&resp, ends_at);
        let mut start_writer = Some(start_writer);
        let mut writer = None;
        let mut body = Body::of(resp);
        let mut ends_at = ends_at;
        let ended = loop {
            if complete {
                // The body of a 416 is an error page, never data.
                break BodyEnd::Complete;
            }
            if hold.is_none() && writer.is_none() {
                writer = start_writer.take().map(|start| start());
            }
            match self.pump_body(&mut job, &mut body, &tx, (hold.take(), ends_at), ahead.as_ref()).await {
                BodyEnd::Released => {}
                BodyEnd::Capped => {
                    // The server capped its range: the rest is asked for now, in this
                    // attempt, into the same file (no backoff, no new attempt or event).
                    if writer.is_none() {
                        writer = start_writer.take().map(|start| start());
                    }
                    (job.etag, job.last_modified, job.total) = (validators.0.clone(), validators.1.clone(), total);
                    spliced = true;
                    match self.ask_for_the_rest(&job).await {
                        Ok((rest, rest_ends_at, rest_ahead)) => {
                            (body, ends_at, ahead) = (rest, rest_ends_at, rest_ahead)
                        }
                        Err(end) => break end,
                    }
                }
                end => break end,
            }
        };
        drop(ahead);
        if writer.is_none() {
            writer = start_writer.take().map(|start| start());
        }
        let Some(writer) = writer else {
            return Outcome::Failed(Failure::transient(ErrorCode::Internal, "the file writer was not started"));
        };
        if matches!(ended, BodyEnd::Complete) {
            job.link.send(WorkerEvent::BodyReceived);
        }
        let last = match ended {
            BodyEnd::Complete => WriterMsg::Finish,
            BodyEnd::Stopped | BodyEnd::Failed(_) | BodyEnd::WriterGone | BodyEnd::Released | BodyEnd::Capped => {
                WriterMsg::Stop
            }
        };
        let body_ended = std::time::Instant::now();
        let _ = tx.send(last).await;
        drop(tx);
        let done = match writer.await {
            Ok(Ok(done)) => done,
            Ok(Err((e, what))) => return Outcome::Failed(file_failure(&e, what)),
            Err(e) => return Outcome::Failed(Failure::transient(ErrorCode::Internal, e)),
        };
        match ended {
            BodyEnd::Complete => {}
            BodyEnd::Stopped => return Outcome::Stopped(done.offset),
            BodyEnd::Failed(f) => return Outcome::Failed(f),
            BodyEnd::WriterGone | BodyEnd::Released | BodyEnd::Capped => {
                return Outcome::Failed(Failure::transient(ErrorCode::Internal, "the file writer stopped"));
            }
        }
        if let Some(total) = total
            && done.offset != total
        {
            return Outcome::Failed(Failure::transient(
                ErrorCode::Network,
                format!("the response ended after {} of {total} bytes", done.offset),
            ));
        }
        let phases = Phases { body_began, body_ended, written: std::time::Instant::now(), first_byte: meta_offset };
        self.finish(&job, done, phases, spliced).await
    }

    async fn finish(&self, job: &Job, done: writer::WriterDone, phases: Phases, spliced: bool) -> Outcome {
        let mut marked = done.marked;
        loop {
            let (reply, plan) = oneshot::channel();
            job.link.send(WorkerEvent::DataComplete { size: done.offset, sha256: done.sha256, marked, spliced, reply });
            let Ok(FinishPlan::Move { to, overwrite, recorded }) = plan.await else {
                return Outcome::Aborted;
            };
            let planned = std::time::Instant::now();
            let finish = files::Finish {
                from: job.part_path.clone(),
                to: to.clone(),
                overwrite,
                size: done.offset,
                mode: job.file_mode,
                progress: job.progress.clone(),
                recorded,
                mark: job.mark.clone(),
                sha256: job.expected_sha256,
            };
            let moved = self.mover.move_into_place(finish).await;
            if let Err(files::MoveError::Unrecorded(_)) = moved
                && !recorded
            {
                // Nothing was moved: the core records the finish, then the file is copied.
                marked = false;
                continue;
            }
            phases.log(job, done.offset, planned);
            return match moved {
                Ok(()) => Outcome::Moved(to.to_string_lossy().into_owned()),
                // The data is complete and synced: it stays, and the core tries again later.
                Err(e) => Outcome::MoveFailed(move_error(&e)),
            };
        }
    }

    /// Before the first attempt of a task read from the database: its file moved into
    /// place before a crash cut its finish short (`files::found_in_place`). Not stopped by
    /// a stop request: it is short, and its answer is needed whatever comes next.
    async fn look_in_place(&self, job: &Job, to: &std::path::Path) -> Option<files::Found> {
        let mark = job.mark.clone()?;
        let (part, to, sha256) = (job.part_path.clone(), to.to_path_buf(), job.expected_sha256);
        tokio::task::spawn_blocking(move || files::found_in_place(&part, &to, &mark, sha256)).await.ok().flatten()
    }

    /// Asks for the file from `offset` (redirects followed, within the resource deadline) and
    /// decides whether the answer can be written, and from where. `Err(None)`: a stop was
    /// asked for meanwhile.
    async fn ask(&self, job: &Job, offset: u64) -> Result<(hyper::Response<Incoming>, ResponseMeta), Option<Failure>> {
        let mut stop = job.stop.clone();
        let sent = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return Err(None),
            _ = deadline(job.deadline) => return Err(Some(resource_timeout())),
            r = self.send_following_redirects(job, offset) => r,
        };
        let (resp, final_url) = sent.map_err(Some)?;
        let meta = self.accept_response(job, &resp, final_url, offset).map_err(Some)?;
        Ok((resp, meta))
    }

    /// Asks for the rest of the file after a capped range, from where the body got to,
    /// with the validators the attempt's first answer gave (`job`'s, updated): only a
    /// `206` that continues exactly there is taken; anything else ends the attempt (its
    /// bytes are kept, and the next attempt sorts it out).
    async fn ask_for_the_rest(&self, job: &Job) -> Result<(Body, Option<u64>, Option<reads::AheadGuard>), BodyEnd> {
        let at = job.progress.received();
        let (resp, meta) = self.ask(job, at).await.map_err(|f| match f {
            None => BodyEnd::Stopped,
            // The resource's deadline passed: that ends the task, here as anywhere.
            Some(f) if f.error.code == ErrorCode::TimedOut && f.retry == Retry::Never => BodyEnd::Failed(f),
            // Anything else the answer says (a refused range, a 403) ends only this attempt:
            // the bytes of the capped range stay, and the next attempt asks afresh.
            Some(f) => BodyEnd::Failed(Failure::transient(
                ErrorCode::Network,
                format!("asked for the rest of the file from byte {at}: {}", f.error.message),
            )),
        })?;
        if meta.status != 206 || meta.offset != at || meta.complete || meta.total != job.total {
            return Err(BodyEnd::Failed(Failure::transient(
                ErrorCode::Network,
                format!("asked for the rest of the file from byte {at}, the server answered {}", meta.status),
            )));
        }
        let ahead = body_ahead(&resp, meta.ends_at);
        Ok((Body::of(resp), meta.ends_at, ahead))
    }

    /// Reads the body into `tx`. With `hold` (a small body, see SMALL_BODY) nothing is sent
    /// until the body has ended or the hold expired (`Released`: what arrived is sent, the
    /// caller starts the writer and pumps the rest), so the writer may start afterwards.
    /// The body ends where its answer does (`ends_at`), or before: short, or `Capped`.
    async fn pump_body(
        &self,
        job: &mut Job,
        body: &mut Body,
        tx: &mpsc::Sender<WriterMsg>,
        (hold, ends_at): (Option<Hold>, Option<u64>),
        ahead: Option<&reads::AheadGuard>,
    ) -> BodyEnd {
        let received = |job: &Job| job.progress.received();
        let held = hold.is_some();
        // Frames go to the writer thread in batches of whatever has already arrived, up to
        // HANDOFF bytes or GATHER: one wake-up per batch instead of one per frame (HTTP/2
        // DATA frames are often 8-16 KiB) and no copying, while a slow body is never held
        // back. A fast connection waits in the kernel for a worthwhile read (`reads`), so
        // what has arrived is then a large batch.
        let mut batch = Batch::default();
        let end = loop {
            let ready = if !held && !batch.is_empty() && batch.takes_more() {
                tokio::select! {
                    biased;
                    f = body.incoming.frame() => Some(Ok(f)),
                    () = std::future::ready(()) => None,
                }
            } else {
                None
            };
            let frame = match ready {
                Some(f) => f,
                None => {
                    if !held && !batch.is_empty() && !batch.hand_over(tx, &job.link).await {
                        return BodyEnd::WriterGone;
                    }
                    let began = std::time::Instant::now();
                    let frame = tokio::select! {
                        biased;
                        _ = job.stop.wait_for(|s| *s) => break BodyEnd::Stopped,
                        _ = deadline(job.deadline) => break BodyEnd::Failed(resource_timeout()),
                        _ = deadline(hold.map(|h| h.until)) => break BodyEnd::Released,
                        f = tokio::time::timeout(job.idle_timeout, body.incoming.frame()) => f,
                    };
                    Timing::add(&job.link.timing().network_wait, began);
                    frame
                }
            };
            let mut data: Bytes = match frame {
                Err(_) => {
                    break BodyEnd::Failed(Failure::transient(
                        ErrorCode::TimedOut,
                        format!("no data received for {} s", job.idle_timeout.as_secs_f64()),
                    ));
                }
                // A body that ends cleanly but short is a failure like any other (its bytes
                // are synced and committed, and the next attempt resumes after them); one
                // that ends where its range did, before the file's end, is `Capped` (a server
                // that caps its ranges: the rest is asked for in this attempt).
                Ok(None) => match (ends_at, job.progress.expected()) {
                    (Some(end), _) if received(job) < end => {
                        break BodyEnd::Failed(Failure::transient(
                            ErrorCode::Network,
                            format!("the response ended after {} of {end} bytes", received(job)),
                        ));
                    }
                    // Without an announced end, only the stream's own end says it is whole.
                    (None, _) if body.reset() => {
                        break BodyEnd::Failed(Failure::transient(
                            ErrorCode::Network,
                            format!("the server reset the stream after {} bytes", received(job)),
                        ));
                    }
                    (_, Some(total)) if received(job) < total => break BodyEnd::Capped,
                    _ => break BodyEnd::Complete,
                },
                Ok(Some(Err(e))) => break BodyEnd::Failed(classify(&e, "reading the response body")),
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) => d,
                    Err(_) => continue, // trailers
                },
            };
            if data.is_empty() {
                continue;
            }
            // hyper holds a body to its Content-Length, but a 206 may announce its length
            // only in Content-Range (a chunked or HTTP/2 body): no byte beyond the announced
            // end is kept, held or streamed (it would be written, and checkpointed, past it).
            let to_end = ends_at.map_or(u64::MAX, |end| end.saturating_sub(received(job)));
            let room = hold.map_or(u64::MAX, |h| h.limit.saturating_sub(batch.bytes as u64)).min(to_end);
            let overlong = data.len() as u64 > room;
            if overlong {
                data.truncate(usize::try_from(room).unwrap_or(0));
            }
            let paced = paced_slice(&job.limiters);
            if let Some(slice) = paced {
                // Paced in slices: a limited download moves smoothly, downloads under one
                // limit take turns, and a stop is heard while waiting (a slice not yet
                // paced for is dropped: it is downloaded again from the committed offset).
                let limiters = job.limiters.clone();
                let mut stopped = false;
                while !data.is_empty() {
                    let piece = data.split_to(data.len().min(slice));
                    let paced = async {
                        for l in &limiters {
                            l.acquire(piece.len()).await;
                        }
                    };
                    tokio::select! {
                        biased;
                        _ = job.stop.wait_for(|s| *s) => {
                            stopped = true;
                            break;
                        }
                        () = paced => {}
                    }
                    // Waiting for its turn is a sign of life, not a stall.
                    job.progress.beat();
                    job.progress.received.fetch_add(piece.len() as u64, Ordering::Relaxed);
                    batch.push(piece);
                    // A slow pace must not hold a frame's first slices until its last.
                    if !held && batch.overdue() && !batch.hand_over(tx, &job.link).await {
                        return BodyEnd::WriterGone;
                    }
                }
                if stopped {
                    break BodyEnd::Stopped;
                }
            } else {
                job.progress.received.fetch_add(data.len() as u64, Ordering::Relaxed);
                batch.push(data);
            }
            match (ahead, paced) {
                (Some(ahead), None) => ahead.at(job.progress.received.load(Ordering::Relaxed)),
                (Some(ahead), Some(_)) => ahead.unsure(),
                (None, _) => {}
            }
            if overlong {
                break BodyEnd::Failed(Failure::transient(
                    ErrorCode::Network,
                    "the response body is longer than announced",
                ));
            }
        };
        // Whatever arrived is written (and synced) whatever happens next.
        if !batch.is_empty() && tx.send(WriterMsg::Data(batch.frames)).await.is_err() {
            return BodyEnd::WriterGone;
        }
        end
    }
}

/// When a download's phases ended, for the one line that says where its time went.
struct Phases {
    /// The response's head was accepted.
    body_began: std::time::Instant,
    /// The body's last byte was handed on (or the body ended otherwise).
    body_ended: std::time::Instant,
    /// The writer had written and synced everything.
    written: std::time::Instant,
    /// Where this attempt's body started in the file.
    first_byte: u64,
}

/// Downloads of at least this many bytes in one attempt log where their time went (at
/// info; smaller ones at debug): one line per large file tells a user what limits it.
const TIMING_AT_INFO: u64 = 64 << 20;

impl Phases {
    /// Logs the attempt's phases, in order (`body`, `drain`: the writer's last writes and
    /// the file's sync, `finishing`: the core recording it, `move`: the rename and the
    /// directory's sync), and what the threads did meanwhile.
    fn log(&self, job: &Job, size: u64, planned: std::time::Instant) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let t = job.link.timing();
        let bytes = size.saturating_sub(self.first_byte);
        macro_rules! timing {
            ($level:ident) => {
                tracing::$level!(
                    task = job.link.task(),
                    bytes,
                    body_ms = format_args!("{:.1}", ms(self.body_ended - self.body_began)),
                    network_wait_ms = format_args!("{:.1}", Timing::ms(&t.network_wait)),
                    writer_wait_ms = format_args!("{:.1}", Timing::ms(&t.writer_wait)),
                    write_ms = format_args!("{:.1}", Timing::ms(&t.write)),
                    disk_ms = format_args!("{:.1}", Timing::ms(&t.disk)),
                    sync_ms = format_args!("{:.1}", Timing::ms(&t.sync)),
                    drain_ms = format_args!("{:.1}", ms(self.written - self.body_ended)),
                    finishing_ms = format_args!("{:.1}", ms(planned - self.written)),
                    move_ms = format_args!("{:.1}", ms(planned.elapsed())),
                    "download timing"
                )
            };
        }
        if bytes >= TIMING_AT_INFO {
            timing!(info);
        } else {
            timing!(debug);
        }
    }
}

/// A limited download is paced (and can stop) this many bytes at a time.
const PACED_SLICE: usize = 16 << 10;

/// The slice a transfer under `limiters` is paced in (`None`: none limits it): a quarter
/// second of the lowest rate, at most `PACED_SLICE`, so a slice never waits long, even with
/// many transfers under one low limit.
fn paced_slice(limiters: &[Arc<RateLimiter>]) -> Option<usize> {
    let lowest = limiters.iter().filter_map(|l| l.rate()).min()?;
    Some(usize::try_from(lowest / 4).unwrap_or(PACED_SLICE).clamp(256, PACED_SLICE))
}

/// The outcome of finding the task's file moved into place at `target`.
fn found_outcome(target: &std::path::Path, found: files::Found) -> Outcome {
    let (location, size, error) = found.outcome(target);
    Outcome::FoundInPlace { location, size, error }
}

#[derive(Debug)]
enum Outcome {
    Uploaded(UploadResponse),
    Moved(String),
    FoundInPlace { location: String, size: u64, error: Option<dlsession_proto::ErrorInfo> },
    MoveFailed(dlsession_proto::ErrorInfo),
    Failed(Failure),
    Stopped(u64),
    Aborted,
}

impl Outcome {
    fn report(self, link: &WorkerLink) {
        match self {
            Outcome::Uploaded(response) => link.send(WorkerEvent::UploadDone { response }),
            Outcome::Moved(location) => link.send(WorkerEvent::Moved { location }),
            Outcome::FoundInPlace { location, size, error } => {
                link.send(WorkerEvent::FoundInPlace { location, size, error })
            }
            Outcome::MoveFailed(error) => link.send(WorkerEvent::MoveFailed { error }),
            Outcome::Failed(f) => link.send(WorkerEvent::Failed(f)),
            Outcome::Stopped(offset) => link.send(WorkerEvent::Stopped { offset }),
            Outcome::Aborted => {}
        }
    }
}

/// Marks the attempt abandoned when the worker's future ends, however it ends (returning,
/// or dropped when the core aborts it).
struct AbandonOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Why a finished file could not be put in place, as the task's wait reason tells it.
fn move_error(e: &files::MoveError) -> dlsession_proto::ErrorInfo {
    let message = match e {
        files::MoveError::Exists(p) => {
            format!("{} already exists (remove it, or cancel the task); the download is kept", p.display())
        }
        e => format!("{e}; the download is kept"),
    };
    dlsession_proto::ErrorInfo::new(ErrorCode::DestinationUnavailable, message)
}

/// A response's body, and whether it comes over HTTP/2.
struct Body {
    incoming: Incoming,
    h2: bool,
}

impl Body {
    fn of(resp: hyper::Response<Incoming>) -> Body {
        let h2 = resp.version() == hyper::Version::HTTP_2;
        Body { incoming: resp.into_body(), h2 }
    }

    /// After its end: whether an HTTP/2 stream was reset before its end (hyper ends a body
    /// reset with `NO_ERROR` as if it were complete; h2 still tells the two apart).
    fn reset(&self) -> bool {
        use hyper::body::Body as _;
        self.h2 && !self.incoming.is_end_stream()
    }
}

enum BodyEnd {
    Complete,
    Stopped,
    Failed(Failure),
    WriterGone,
    /// A held body's hold expired (see `pump_body`).
    Released,
    /// The answer ended where its range did, before the file's end (a server that caps its
    /// ranges): the rest is asked for (`ask_for_the_rest`).
    Capped,
}

/// The connection's read-ahead for a response whose body ends at `ends_at` (see `reads`).
fn body_ahead(resp: &hyper::Response<Incoming>, ends_at: Option<u64>) -> Option<reads::AheadGuard> {
    resp.extensions().get::<reads::BodyAhead>().map(|a| match ends_at {
        Some(end) => a.track(end),
        None => a.track_unsized(),
    })
}

/// Holding a small body in memory until it has all arrived.
#[derive(Debug, Clone, Copy)]
struct Hold {
    /// Give up holding then (the checkpoint interval after the body started).
    until: Instant,
    /// The announced length: never more is kept.
    limit: u64,
}

/// Body frames gathered for the writer thread (see HANDOFF and GATHER).
#[derive(Default)]
struct Batch {
    frames: Vec<Bytes>,
    bytes: usize,
    /// When its first frame came.
    since: Option<Instant>,
}

impl Batch {
    fn push(&mut self, data: Bytes) {
        self.since.get_or_insert_with(Instant::now);
        self.bytes += data.len();
        self.frames.push(data);
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether it may still take frames that are already there: under HANDOFF bytes, and
    /// GATHER has not passed since its first.
    fn takes_more(&self) -> bool {
        self.bytes < HANDOFF && !self.overdue()
    }

    /// Whether GATHER has passed since its first frame.
    fn overdue(&self) -> bool {
        self.since.is_some_and(|at| Instant::now() >= at + GATHER)
    }

    /// Hands it to the writer thread and starts an empty one; false when the writer is gone.
    async fn hand_over(&mut self, tx: &mpsc::Sender<WriterMsg>, link: &WorkerLink) -> bool {
        let frames = std::mem::take(self).frames;
        let began = std::time::Instant::now();
        let sent = tx.send(WriterMsg::Data(frames)).await.is_ok();
        Timing::add(&link.timing().writer_wait, began);
        sent
    }
}

async fn deadline(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn resource_timeout() -> Failure {
    Failure::permanent(ErrorCode::TimedOut, "timeout_for_resource ran out")
}

fn file_failure(e: &std::io::Error, what: &str) -> Failure {
    let raw = e.raw_os_error();
    if raw == Some(rustix::io::Errno::NOSPC.raw_os_error())
        || raw == Some(rustix::io::Errno::DQUOT.raw_os_error())
        || e.kind() == std::io::ErrorKind::StorageFull
    {
        // Keep the partial data: the task waits and resumes when space is free.
        Failure::transient(ErrorCode::InsufficientSpace, format!("{what}: {e}"))
    } else if e.kind() == std::io::ErrorKind::NotFound {
        // The cache (or the partial file) was removed behind the daemon's back, say by
        // someone cleaning ~/.cache: nothing of it can be trusted, but nothing is wrong
        // with the download either. It starts over (the directory is made again).
        Failure::restart(
            ErrorCode::FileError,
            format!("{what}: {e} (the partial file or its directory was removed; downloading again)"),
        )
    } else if passing(e) {
        // Weather, not a verdict on the download (a disk or network filesystem failing for
        // a while, a filesystem remounted read-only after an error): the partial data is
        // kept and the attempt tried again with backoff, as for a full disk.
        Failure::transient(ErrorCode::FileError, format!("{what}: {e} (trying again later; the data is kept)"))
    } else {
        Failure::permanent(ErrorCode::FileError, format!("{what}: {e}"))
    }
}

/// I/O errors that may go away by themselves: `EIO`, `EROFS`, `ETIMEDOUT`, `EAGAIN`,
/// `ESTALE` (an NFS handle: the retry opens the file by its name again), `EINTR`.
fn passing(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    [Errno::IO, Errno::ROFS, Errno::TIMEDOUT, Errno::AGAIN, Errno::STALE, Errno::INTR]
        .iter()
        .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an error on the partial file does to the download: a full disk or a failing
    /// device waits with the data kept; a removed file starts over; anything else ends it.
    #[test]
    fn partial_file_errors_keep_the_data_unless_they_are_a_verdict() {
        let fail = |code| file_failure(&std::io::Error::from_raw_os_error(code), "writing");
        for code in [libc::ENOSPC, libc::EDQUOT, libc::EIO, libc::EROFS, libc::ETIMEDOUT, libc::ESTALE] {
            let f = fail(code);
            assert!(matches!(f.retry, Retry::After(_)) && !f.discard_partial, "{code}: {f:?}");
        }
        let removed = fail(libc::ENOENT);
        assert!(matches!(removed.retry, Retry::After(_)) && removed.discard_partial);
        for code in [libc::EFBIG, libc::EISDIR, libc::ENAMETOOLONG] {
            assert!(matches!(fail(code).retry, Retry::Never), "{code}");
        }
    }
}
