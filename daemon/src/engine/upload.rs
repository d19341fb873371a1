//! One upload attempt (docs/behaviour.md, "Uploads"): the file streamed as the body of a PUT
//! or POST; or, when the server offered resumption (the resumable uploads draft at interop
//! version 6, the one `URLSession` sends), a `HEAD` for the server's offset and a `PATCH`
//! with the rest. Then the final response: status and headers, and the body kept (up to
//! `UPLOAD_RESPONSE_BODY_LIMIT`) in a synced file for the app.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use tokio::sync::mpsc;
use url::Url;

use super::attempt::{
    build_request, host_of, invalid_redirect, no_response, request_failure, response_headers, status_failure,
    status_text, stopped_at_proxy,
};
use super::http::{Failure, ReqBody, Retry, empty_body, is_transient_status, location};
use super::limiter::RateLimiter;
use super::progress::Progress;
use super::report::UploadResponse;
use super::{Engine, Job, Outcome, UploadJob, WorkerEvent, auth, deadline, file_failure, resource_timeout};
use dlsession_proto::{ErrorCode, ErrorInfo, Header, UPLOAD_RESPONSE_BODY_LIMIT, UploadMethod, redact};

/// The draft's interop version spoken here (`Upload-Draft-Interop-Version`).
pub const INTEROP_VERSION: &str = "6";
const INTEROP: &str = "upload-draft-interop-version";
const UPLOAD_COMPLETE: &str = "upload-complete";
const UPLOAD_OFFSET: &str = "upload-offset";
/// The file is read and handed to the connection this many bytes at a time.
const CHUNK: usize = 256 << 10;
/// Reads queued ahead of the connection.
const READ_AHEAD: usize = 4;
/// A response body longer than this is not read to its end (what is kept is far less).
const DRAIN_LIMIT: u64 = 64 << 20;

/// Where the server stands on an upload it offered to resume.
enum ServerOffset {
    /// It holds this many bytes.
    At(u64),
    /// It holds all it will take (`offset` bytes): the final response was lost with the
    /// last attempt.
    Complete { offset: u64, status: u16, headers: Vec<Header> },
    /// It no longer knows the upload.
    Gone,
}

impl Engine {
    pub(super) async fn upload(&self, job: &mut Job) -> Outcome {
        let Some(mut up) = job.upload.take() else {
            return Outcome::Failed(Failure::permanent(ErrorCode::Internal, "an upload worker without an upload"));
        };
        let mut stop = job.stop.clone();
        if let Some(go) = up.go.take() {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return Outcome::Stopped(0),
                recorded = go => if recorded.is_err() {
                    return Outcome::Failed(Failure::transient(
                        ErrorCode::Internal,
                        "the attempt could not be recorded before sending",
                    ));
                },
            }
        }
        job.progress.expected.store(up.size, Ordering::Relaxed);
        let mut offered = false;
        let reached = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return Outcome::Stopped(0),
            _ = deadline(job.deadline) => return Outcome::Failed(resource_timeout()),
            r = self.reach(job, &up, &mut offered) => r,
        };
        // The server answered: its answer is read and kept whatever a stop says now (a
        // POST's answer must not be lost to a pause).
        let received = match reached {
            Ok(Reached::Known(r)) => Ok(r),
            Ok(Reached::Response { resp, final_url }) => read_response(job, final_url, resp).await,
            Err(f) => Err(f),
        };
        match received {
            Ok(r) => self.keep_response(job, &up, r).await,
            Err(f) => Outcome::Failed(once_only(f, &up, offered, job)),
        }
    }

    /// Sends the body (all of it, or the rest after asking the server for its offset) up
    /// to the final response's head. `offered`: the server offered resumption meanwhile.
    async fn reach(&self, job: &Job, up: &UploadJob, offered: &mut bool) -> Result<Reached, Failure> {
        let (file, size, mtime_ns) = (up.file.clone(), up.size, up.mtime_ns);
        match tokio::task::spawn_blocking(move || unchanged(&file, size, mtime_ns)).await {
            Ok(Ok(())) => {}
            Ok(Err(f)) => return Err(f),
            Err(e) => return Err(Failure::transient(ErrorCode::Internal, format!("worker: {e}"))),
        }
        let origin =
            Url::parse(&job.url).map_err(|e| Failure::permanent(ErrorCode::InvalidUrl, format!("invalid URL: {e}")))?;
        // Continue at the server's offset when it offered resumption.
        let mut append = None;
        if let Some(resume) = up.resume_url.as_deref() {
            let Ok(resume) = Url::parse(resume) else { return Err(gone(job, up)) };
            match self.server_offset(job, &origin, &resume).await? {
                ServerOffset::At(offset) if offset <= up.size => append = Some((resume, offset)),
                ServerOffset::At(offset) => {
                    return Err(Failure::permanent(
                        ErrorCode::CannotResume,
                        format!("the server says it holds {offset} bytes of a {}-byte upload", up.size),
                    ));
                }
                ServerOffset::Complete { offset, .. } if offset != up.size => {
                    return Err(Failure::permanent(
                        ErrorCode::CannotResume,
                        format!("the server closed the upload at {offset} of {} bytes", up.size),
                    ));
                }
                ServerOffset::Complete { status, headers, .. } => {
                    job.progress.received.store(up.size, Ordering::Relaxed);
                    job.progress.sent_whole.store(true, Ordering::Relaxed);
                    // The resource's URL is a capability: the response names the task's.
                    let r = Received { status, final_url: origin, headers, body: Vec::new(), truncated: false };
                    return Ok(Reached::Known(r));
                }
                ServerOffset::Gone => return Err(gone(job, up)),
            }
        }
        self.send(job, up, &origin, append, offered).await
    }

    /// Asks the upload resource how much it holds (`HEAD`).
    async fn server_offset(&self, job: &Job, origin: &Url, resume: &Url) -> Result<ServerOffset, Failure> {
        let (client, proxies) = self.route(job, super::http::Versions::Http1)?;
        let same_origin = resume.origin() == origin.origin();
        let mut req = build_request(resume, job, 0, same_origin, hyper::Method::HEAD, empty_body())?;
        req.headers_mut().insert(INTEROP, HeaderValue::from_static(INTEROP_VERSION));
        if let Some(auth) = proxies.http_auth(resume) {
            req.headers_mut().insert(hyper::header::PROXY_AUTHORIZATION, auth);
        }
        auth::apply(&mut req, resume, &job.auth, &proxies);
        let resp = match tokio::time::timeout(job.idle_timeout, client.request(req)).await {
            Err(_) => return Err(self.unanswered(no_response(resume, job), resume, &proxies)),
            Ok(Err(e)) => {
                let what = format!("asking {} for the upload's offset", host_of(resume));
                return Err(self.unanswered(request_failure(&e, resume, &proxies, &what), resume, &proxies));
            }
            Ok(Ok(r)) => r,
        };
        job.progress.beat();
        let status = resp.status().as_u16();
        // Asked for credentials (an expired token): the upload is not gone, the app is asked
        // as for any request of the task.
        if let Some(challenge) = auth::challenge(status, resp.headers(), resume, &proxies) {
            return Err(auth::failure(status, &status_text(status), challenge));
        }
        let get = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        if matches!(status, 404 | 410) {
            return Ok(ServerOffset::Gone);
        }
        if is_transient_status(status) {
            return Err(status_failure(status, resp.headers()));
        }
        if !(200..300).contains(&status) {
            return Ok(ServerOffset::Gone);
        }
        let Some(offset) = get(UPLOAD_OFFSET).and_then(|v| v.parse::<u64>().ok()) else {
            return Err(Failure::transient(
                ErrorCode::CannotResume,
                format!("the server answered {} without a valid Upload-Offset", status_text(status)),
            ));
        };
        if get(UPLOAD_COMPLETE) == Some("?1") {
            return Ok(ServerOffset::Complete { offset, status, headers: response_headers(resp.headers()) });
        }
        Ok(ServerOffset::At(offset))
    }

    /// Sends the body (all of it, or from `append`'s offset to its upload resource),
    /// following redirects of the first request, and reads the final response.
    async fn send(
        &self,
        job: &Job,
        up: &UploadJob,
        origin: &Url,
        append: Option<(Url, u64)>,
        offered: &mut bool,
    ) -> Result<Reached, Failure> {
        let (client, proxies) = self.route(job, super::http::Versions::Http1)?;
        let appending = append.is_some();
        let (mut url, from) = append.unwrap_or_else(|| (origin.clone(), 0));
        let mut method = if appending {
            hyper::Method::PATCH
        } else {
            match up.method {
                UploadMethod::Put => hyper::Method::PUT,
                UploadMethod::Post => hyper::Method::POST,
            }
        };
        let mut with_body = true;
        let mut hops = 0;
        loop {
            // Credentials may be asked for only while the answer sends nothing the server
            // has taken already: the body still goes with this request, or it may repeat.
            let may_ask = with_body || up.retry_safe;
            let body = if with_body { file_body(up, from, job) } else { empty_body() };
            let same_origin = url.origin() == origin.origin();
            let mut req = build_request(&url, job, 0, same_origin, method.clone(), body)?;
            let headers = req.headers_mut();
            headers.insert(INTEROP, HeaderValue::from_static(INTEROP_VERSION));
            if with_body {
                headers.insert(UPLOAD_COMPLETE, HeaderValue::from_static("?1"));
            }
            if with_body && from >= up.size {
                // hyper leaves out the length of an empty body; an upload says it.
                headers.insert(hyper::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            }
            if appending {
                headers.insert(UPLOAD_OFFSET, HeaderValue::from(from));
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/partial-upload"));
            }
            if let Some(auth) = proxies.http_auth(&url) {
                req.headers_mut().insert(hyper::header::PROXY_AUTHORIZATION, auth);
            }
            auth::apply(&mut req, &url, &job.auth, &proxies);
            // The server offers resumption in an informational response while the body goes.
            let (offers_tx, mut offers) = mpsc::unbounded_channel::<String>();
            if with_body && !appending {
                // One offer at most is passed on, no longer than a task's URL may be: a server
                // sending thousands of 104s with megabyte locations queues nothing.
                let (passed, max_len) = (std::sync::atomic::AtomicBool::new(false), self.settings.max_url_len);
                hyper::ext::on_informational(&mut req, move |res| {
                    let offered = res.status().as_u16() == 104
                        && res.headers().get(INTEROP).and_then(|v| v.to_str().ok()) == Some(INTEROP_VERSION);
                    if let Some(location) = location(res.headers())
                        && offered
                        && location.len() <= max_len
                        && !passed.swap(true, Ordering::AcqRel)
                    {
                        let _ = offers_tx.send(location);
                    }
                });
            }
            let mut request = std::pin::pin!(client.request(req));
            // The idle timeout counts from the last byte sent: a long body keeps it alive.
            let mut tick = tokio::time::interval(job.idle_timeout.min(std::time::Duration::from_secs(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut seen, mut quiet_since) = (job.progress.received(), tokio::time::Instant::now());
            // Only the first offer counts, and only for the origin that made it (never
            // another host, never from https to http), and no longer than a task's URL may be
            // (it is stored and asked again).
            let max_url_len = self.settings.max_url_len;
            let take_offer = |location: String, offered: &mut bool| {
                if let Ok(u) = url.join(&location)
                    && u.origin() == url.origin()
                    && u.as_str().len() <= max_url_len
                    && !*offered
                {
                    *offered = true;
                    job.link.send(WorkerEvent::ResumeUrl { url: Some(u.to_string()) });
                }
            };
            let resp = loop {
                tokio::select! {
                    biased;
                    Some(location) = offers.recv() => take_offer(location, offered),
                    r = &mut request => break Some(r),
                    _ = tick.tick() => {
                        let sent = job.progress.received();
                        // Waiting for its turn under a bandwidth limit is not silence: a
                        // paced download's idle timeout does not count that wait either.
                        if sent != seen || job.progress.paced.load(Ordering::Relaxed) > 0 {
                            (seen, quiet_since) = (sent, tokio::time::Instant::now());
                        } else if quiet_since.elapsed() >= job.idle_timeout {
                            break None;
                        }
                    }
                }
            };
            // An offer that came just before the answer still counts.
            while let Ok(location) = offers.try_recv() {
                take_offer(location, offered);
            }
            let resp = match resp {
                None => return Err(self.unanswered(no_response(&url, job), &url, &proxies)),
                Some(Err(e)) => {
                    if let Some(f) = changed_failure(&e) {
                        return Err(f);
                    }
                    // Stopped at the proxy: nothing of it reached the server (an empty body
                    // counts as out once the request goes). Not so for a GET after a 303: the
                    // server took the body before it sent us there.
                    if stopped_at_proxy(&e) && with_body {
                        job.progress.sent_whole.store(false, Ordering::Relaxed);
                    }
                    let mut f = request_failure(&e, &url, &proxies, &format!("sending to {}", host_of(&url)));
                    // A proxy asking for credentials for the GET after a 303: as a 401 to it,
                    // the answer (the app's credentials would send the POST again).
                    if !may_ask {
                        f.challenge = None;
                    }
                    return Err(self.unanswered(f, &url, &proxies));
                }
                Some(Ok(r)) => r,
            };
            // A response is a sign of life (a chain of slow redirects is no stuck worker).
            job.progress.beat();
            // Answered before its whole body went out: the server did not take it as a
            // request, and the rest the connection may still send after the answer does not
            // count (its body is no longer the task's: `FileBody::sent`).
            if !job.progress.sent_whole.load(Ordering::Relaxed) {
                job.progress.body.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(jar) = &job.cookies {
                jar.take_from(&url, resp.headers());
            }
            let status = resp.status().as_u16();
            // Asked for credentials: the app answers, and the request goes again with them
            // (a 401 is no sign the request was taken, so even a POST may). Not a GET after a
            // 303 (or a 301/302 after a POST): the server took the body before it sent us
            // there, and asking would send it again; that 401 is the answer.
            if job.answers_challenges
                && may_ask
                && let Some(challenge) = auth::challenge(status, resp.headers(), &url, &proxies)
            {
                return Err(auth::failure(status, &status_text(status), challenge));
            }
            if matches!(status, 301 | 302 | 303 | 307 | 308)
                && !appending
                && let Some(location) = location(resp.headers())
            {
                // As for a download: an invalid location fails the task, never passes for
                // the server's answer.
                let next = url.join(&location).map_err(|e| invalid_redirect(&location, e))?;
                hops += 1;
                self.may_redirect(&url, &next, hops)?;
                // 307 and 308 repeat the request; 303 (and 301/302 after a POST) fetch the
                // result with a GET, as browsers do.
                if status == 303 || (matches!(status, 301 | 302) && method == hyper::Method::POST) {
                    method = hyper::Method::GET;
                    with_body = false;
                }
                url = next;
                job.progress.received.store(0, Ordering::Relaxed);
                continue;
            }
            if appending && matches!(status, 404 | 410) {
                return Err(gone(job, up));
            }
            if appending && status == 409 {
                // Our offset is not the server's: the next attempt asks again.
                return Err(Failure::transient(
                    ErrorCode::CannotResume,
                    "the server holds a different offset than it said; asking it again",
                ));
            }
            if is_transient_status(status) {
                let f = status_failure(status, resp.headers());
                if up.retry_safe || *offered || appending || !job.progress.sent_whole.load(Ordering::Relaxed) {
                    return Err(f);
                }
            }
            // The resource's URL is a capability: the response names the task's own.
            let final_url = if appending { origin.clone() } else { url };
            return Ok(Reached::Response { resp, final_url });
        }
    }

    /// Puts the response body in its file (synced) and reports the response. The server
    /// has answered, so a body that cannot be written never sends the upload again: it is
    /// tried again (the reason shown as the task's last error) until it is written, or a
    /// stop or the resource deadline comes and `ANSWER_GRACE` passes; then the response is
    /// reported without its body, and the task fails with why it could not be kept.
    async fn keep_response(&self, job: &Job, up: &UploadJob, response: Received) -> Outcome {
        let Received { status, final_url, headers, body, truncated } = response;
        let size = body.len() as u64;
        let status_error = (!(200..300).contains(&status)).then(|| {
            let mut e = ErrorInfo::new(ErrorCode::HttpStatus, format!("server answered {}", status_text(status)));
            e.http_status = Some(status);
            e
        });
        let (size, truncated, error) = match keep_body(job, up, Arc::new(body)).await {
            Ok(()) => (size, truncated, status_error),
            Err(e) => {
                let mut error = file_failure(&e, "").error;
                error.message = format!(
                    "the server answered {}, but its {size}-byte body could not be kept: {e} (the upload is not sent \
                     again)",
                    status_text(status)
                );
                error.http_status = Some(status);
                (0, true, Some(error))
            }
        };
        Outcome::Uploaded(UploadResponse {
            status,
            final_url: redact::url(final_url.as_str()),
            headers,
            location: up.body_to.to_string_lossy().into_owned(),
            size,
            truncated,
            error,
        })
    }
}

/// Writes an upload's answer body to its file, trying again while it fails: a full disk
/// (or quota) until a stop or the resource deadline comes and `ANSWER_GRACE` passes, any
/// other error for `KEEP_OTHER_ERRORS` at most (a directory that became read-only seldom
/// comes back by itself). Once stopped (or past the deadline) before it begins, the answer
/// has had its grace while it was read: one try.
async fn keep_body(job: &Job, up: &UploadJob, body: Arc<Vec<u8>>) -> io::Result<()> {
    let mut stop = job.stop.clone();
    let late = *stop.borrow() || job.deadline.is_some_and(|at| at <= tokio::time::Instant::now());
    let give_up = async {
        if late {
            return;
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {}
            () = deadline(job.deadline) => {}
        }
        tokio::time::sleep(ANSWER_GRACE).await;
    };
    tokio::pin!(give_up);
    let began = tokio::time::Instant::now();
    let mut wait = KEEP_RETRY_FIRST;
    let mut told = false;
    loop {
        let Err(e) = write_answer(job, up, Arc::clone(&body)).await else { return Ok(()) };
        // Trying is a sign of life for the supervisor, not a stuck worker.
        job.progress.beat();
        let mut error = file_failure(&e, "").error;
        if late || (error.code != ErrorCode::InsufficientSpace && began.elapsed() >= KEEP_OTHER_ERRORS) {
            return Err(keep_nothing(job, up, e).await);
        }
        if !told {
            told = true;
            tracing::warn!(error = %e, "cannot keep the upload's answer; trying again");
            error.message = format!("cannot keep the server's answer yet: {e}; trying again");
            job.link.send(WorkerEvent::AnswerHeld { error });
        }
        tokio::select! {
            biased;
            () = &mut give_up => return Err(keep_nothing(job, up, e).await),
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(KEEP_RETRY_MAX);
    }
}

/// Writes `data` as the answer's body file, synced, on a blocking thread.
async fn write_answer(job: &Job, up: &UploadJob, data: Arc<Vec<u8>>) -> io::Result<()> {
    let (part, to, mode) = (job.part_path.clone(), up.body_to.clone(), job.file_mode);
    match tokio::task::spawn_blocking(move || write_synced(&part, &to, &data, mode)).await {
        Ok(written) => written,
        Err(e) => Err(io::Error::other(format!("worker: {e}"))),
    }
}

/// Gives up keeping an answer's body: the location the event names is made to exist,
/// empty, where that can be done. Returns why the body was not kept.
async fn keep_nothing(job: &Job, up: &UploadJob, e: io::Error) -> io::Error {
    let _ = write_answer(job, up, Arc::new(Vec::new())).await;
    e
}

/// How soon an answer's body that could not be written is tried again, doubling up to
/// `KEEP_RETRY_MAX` (a full disk usually frees up in seconds or not at all soon).
const KEEP_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(250);
const KEEP_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(10);
/// How long an error other than a full disk is tried again.
const KEEP_OTHER_ERRORS: std::time::Duration = std::time::Duration::from_secs(60);

/// How far an attempt got.
enum Reached {
    /// The final response's head; its body is still to read.
    Response { resp: hyper::Response<Incoming>, final_url: Url },
    /// The answer is known without one (the server had it all).
    Known(Received),
}

/// The server no longer knows the upload resource: forgotten, and the upload starts over
/// if that cannot repeat a request, else fails.
fn gone(job: &Job, up: &UploadJob) -> Failure {
    job.link.send(WorkerEvent::ResumeUrl { url: None });
    if !up.safe_alone {
        return Failure::permanent(
            ErrorCode::CannotResume,
            "the server no longer knows this upload, and sending it again from the start could repeat it \
             (mark it idempotent to allow that)",
        );
    }
    Failure::transient(ErrorCode::CannotResume, "the server no longer knows this upload; starting it over")
}

/// A failure of a request that must not go twice is final once the server may have had
/// all of it (its whole body went out, and it offered no resumption).
fn once_only(mut f: Failure, up: &UploadJob, offered: bool, job: &Job) -> Failure {
    if !up.retry_safe && !offered && job.progress.sent_whole.load(Ordering::Relaxed) && f.retry != Retry::Never {
        f.retry = Retry::Never;
        f.error.message = format!(
            "{}; the whole {} body had gone out, so it may have reached the server and is not sent again (mark \
             it idempotent to allow that)",
            f.error.message,
            up.method.as_str()
        );
    }
    f
}

/// A final response as read.
struct Received {
    status: u16,
    final_url: Url,
    headers: Vec<Header>,
    body: Vec<u8>,
    truncated: bool,
}

/// How long an upload's answer is still read after a stop or the resource deadline.
const ANSWER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

async fn read_response(job: &Job, url: Url, resp: hyper::Response<Incoming>) -> Result<Received, Failure> {
    let status = resp.status().as_u16();
    let headers = response_headers(resp.headers());
    let limit = usize::try_from(UPLOAD_RESPONSE_BODY_LIMIT).unwrap_or(usize::MAX);
    let mut body = Vec::new();
    let mut truncated = false;
    let mut drained = 0u64;
    // Its bytes are never held back by a download's low-water mark on a shared connection.
    let _reading = resp.extensions().get::<super::reads::BodyAhead>().map(super::reads::BodyAhead::track_unsized);
    let mut incoming = resp.into_body();
    // The answer is read whatever a stop says, but not for ever: a server trickling it
    // would otherwise hold a cancel, a suspend or the resource deadline off indefinitely.
    // Once one of them comes, the rest gets ANSWER_GRACE; then the answer is kept cut.
    let mut stop = job.stop.clone();
    let cut = async {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {}
            () = deadline(job.deadline) => {}
        }
        tokio::time::sleep(ANSWER_GRACE).await;
    };
    tokio::pin!(cut);
    loop {
        let next = tokio::select! {
            biased;
            () = &mut cut => {
                truncated = true;
                break;
            }
            next = tokio::time::timeout(job.idle_timeout, incoming.frame()) => next,
        };
        // The final head is in: the server has answered, and says how (a PUT sent again now
        // would repeat what it took; a POST would be reported as "may have reached the
        // server"). A body that stops or breaks off is kept as far as it came, cut.
        let frame = match next {
            Err(_) => {
                tracing::info!(status, "the upload's answer went quiet; keeping it as far as it came");
                truncated = true;
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                tracing::info!(status, error = %e, "the upload's answer broke off; keeping it as far as it came");
                truncated = true;
                break;
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else { continue };
        // Reading the answer is a sign of life for the supervisor.
        job.progress.beat();
        drained = drained.saturating_add(data.len() as u64);
        let room = limit.saturating_sub(body.len());
        if data.len() > room {
            truncated = true;
        }
        if drained > DRAIN_LIMIT {
            // Past this the rest is not waited for: the connection goes with it.
            truncated = true;
            break;
        }
        body.extend_from_slice(data.get(..data.len().min(room)).unwrap_or_default());
    }
    Ok(Received { status, final_url: url, headers, body, truncated })
}

/// A file's modification time in nanoseconds since the epoch: what an upload's snapshot
/// records and checks.
pub fn mtime_ns_of(meta: &std::fs::Metadata) -> i64 {
    meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec())
}

/// The file is still what was submitted.
fn unchanged(path: &Path, size: u64, mtime_ns: i64) -> Result<(), Failure> {
    let meta = std::fs::metadata(path).map_err(|e| {
        Failure::permanent(ErrorCode::FileError, format!("cannot read the file to upload {}: {e}", path.display()))
    })?;
    if meta.len() != size || mtime_ns_of(&meta) != mtime_ns {
        return Err(Failure::permanent(ErrorCode::FileError, changed_message(path, size, meta.len())));
    }
    Ok(())
}

fn changed_message(path: &Path, was: u64, now: u64) -> String {
    let sizes = if was == now { format!("{now} bytes, modified") } else { format!("{was} bytes then, {now} now") };
    format!("{} changed since the upload was submitted ({sizes}); nothing more of it is sent", path.display())
}

/// The error a body stream ends with when the file changed under it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct FileChanged(String);

/// A send that failed because the file changed (or could not be read) is the file's
/// fault, not the network's: it fails for good.
fn changed_failure(e: &(dyn std::error::Error + 'static)) -> Option<Failure> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(c) = err.downcast_ref::<FileChanged>() {
            return Some(Failure::permanent(ErrorCode::FileError, c.0.clone()));
        }
        cur = err.source();
    }
    None
}

/// The body: the file from `from` to its recorded size, read on a blocking thread and
/// paced by the task's bandwidth limits (its own, its session's, the daemon's).
fn file_body(up: &UploadJob, from: u64, job: &Job) -> ReqBody {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    let (path, size, mtime_ns) = (up.file.clone(), up.size, up.mtime_ns);
    let progress = job.progress.clone();
    let body = progress.body.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    progress.received.store(from, Ordering::Relaxed);
    progress.body_from.store(from, Ordering::Relaxed);
    // An empty body is whole as soon as the request goes.
    progress.sent_whole.store(from >= size, Ordering::Relaxed);
    tokio::spawn(read_file(path, from, size, mtime_ns, tx));
    let limiters = job.limiters.clone();
    FileBody { rx, remaining: size.saturating_sub(from), progress, limiters, unpaced: Bytes::new(), paced: None, body }
        .boxed_unsync()
}

/// Reads the file a piece at a time into `tx`, each read a short job on a blocking thread:
/// an upload waiting for its connection to take the next piece holds no thread (a thread
/// each, many slow uploads took every one the daemon's file work has).
async fn read_file(
    path: std::path::PathBuf,
    mut at: u64,
    size: u64,
    mtime_ns: i64,
    tx: mpsc::Sender<Result<Bytes, FileChanged>>,
) {
    let opened = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || open_regular(&path)).await
    };
    let file = match opened {
        Ok(Ok(f)) => Arc::new(f),
        Ok(Err(e)) => {
            let _ = tx.send(Err(FileChanged(format!("cannot read the file to upload {}: {e}", path.display())))).await;
            return;
        }
        Err(e) => {
            let _ = tx.send(Err(FileChanged(format!("reading the file to upload: worker: {e}")))).await;
            return;
        }
    };
    while at < size {
        let (file, path) = (Arc::clone(&file), path.clone());
        let piece = tokio::task::spawn_blocking(move || read_piece(&file, &path, at, size, mtime_ns)).await;
        let piece = match piece {
            Ok(Ok(piece)) => piece,
            Ok(Err(message)) => {
                let _ = tx.send(Err(FileChanged(message))).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(FileChanged(format!("reading the file to upload: worker: {e}")))).await;
                return;
            }
        };
        at += piece.len() as u64;
        if tx.send(Ok(piece)).await.is_err() {
            // The request is gone (failed, stopped): nobody reads on.
            return;
        }
    }
}

/// Opens a file to upload for reading without blocking on what is not a regular file: the
/// path may have been replaced by a FIFO since it was checked (an open would wait for a
/// writer for ever, holding a thread of the daemon's shared file work).
pub fn open_regular(path: &Path) -> io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("it is not a regular file"));
    }
    Ok(file)
}

/// The next piece of the file from `at` (at most `CHUNK` bytes), or why it cannot be sent.
fn read_piece(file: &std::fs::File, path: &Path, at: u64, size: u64, mtime_ns: i64) -> Result<Bytes, String> {
    let want = usize::try_from((size - at).min(CHUNK as u64)).unwrap_or(CHUNK);
    let mut buf = vec![0; want];
    let n = loop {
        match file.read_at(&mut buf, at) {
            Ok(0) => return Err(changed_message(path, size, at)),
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the file to upload {}: {e}", path.display())),
        }
    };
    buf.truncate(n);
    // The last bytes go only if the file is still the one submitted: a file rewritten
    // while it was read fails instead of arriving whole as a mix.
    if at + n as u64 == size {
        unchanged(path, size, mtime_ns).map_err(|f| f.error.message)?;
    }
    Ok(Bytes::from(buf))
}

struct FileBody {
    rx: mpsc::Receiver<Result<Bytes, FileChanged>>,
    remaining: u64,
    progress: Arc<Progress>,
    limiters: Vec<Arc<RateLimiter>>,
    /// What is left of the chunk being paced.
    unpaced: Bytes,
    /// A slice waiting for its turn under the limits, and the wait (counted in
    /// `Progress::paced` while it is here: see `wait_turn` and `take_turn`).
    paced: Option<(Bytes, Turn)>,
    /// Its number (see `Progress::body`).
    body: u64,
}

/// Waiting for a slice's turn under the bandwidth limits.
type Turn = Pin<Box<dyn Future<Output = ()> + Send>>;

impl FileBody {
    /// `slice` waits for its turn under the limits.
    fn wait_turn(&mut self, slice: Bytes, wait: Turn) {
        if self.paced.replace((slice, wait)).is_none() {
            self.progress.paced.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The slice that waited, no longer waiting.
    fn take_turn(&mut self) -> Option<Bytes> {
        let (slice, _) = self.paced.take()?;
        self.progress.paced.fetch_sub(1, Ordering::Relaxed);
        Some(slice)
    }

    /// `data` goes out now: counted as sent.
    fn sent(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let n = data.len() as u64;
        self.remaining = self.remaining.saturating_sub(n);
        // A newer request's body counts for the task now.
        if self.progress.body.load(Ordering::Relaxed) == self.body {
            self.progress.received.fetch_add(n, Ordering::Relaxed);
            if self.remaining == 0 {
                self.progress.sent_whole.store(true, Ordering::Relaxed);
            }
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

impl Drop for FileBody {
    fn drop(&mut self) {
        // A body given up while waiting its turn leaves no wait behind for the next attempt.
        self.take_turn();
    }
}

type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Body for FileBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // No longer the task's body (its request was answered, or another one went since):
        // the rest is not sent, and the connection ends with it.
        if self.progress.body.load(Ordering::Relaxed) != self.body {
            return Poll::Ready(Some(Err("the request was answered; the rest of its body is not sent".into())));
        }
        loop {
            if let Some((_, wait)) = self.paced.as_mut() {
                if wait.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if let Some(slice) = self.take_turn() {
                    return self.sent(slice);
                }
            }
            let data = if self.unpaced.is_empty() {
                match self.rx.poll_recv(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(data))) => data,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
                    Poll::Ready(None) => return Poll::Ready(None),
                }
            } else {
                std::mem::take(&mut self.unpaced)
            };
            // Paced like a download's body (see `Engine::pump_body`), each slice taken from
            // every bucket.
            let Some(size) = super::paced_slice(&self.limiters) else {
                return self.sent(data);
            };
            let mut data = data;
            let slice = data.split_to(data.len().min(size));
            self.unpaced = data;
            let (limiters, n) = (self.limiters.clone(), slice.len());
            let wait = Box::pin(async move {
                for l in &limiters {
                    l.acquire(n).await;
                }
            });
            self.wait_turn(slice, wait);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0 && self.rx.is_closed() && self.rx.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Writes `data` to `part`, syncs it, and renames it to `to` (synced directory): the app
/// finds the whole response body or none.
fn write_synced(part: &Path, to: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    if let Some(dir) = part.parent() {
        // Private, as every directory of the cache (whatever the daemon's umask).
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    // Never through a link planted in its place, and the app's mode whatever our umask.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(part)?;
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    f.write_all(data)?;
    f.sync_data()?;
    std::fs::rename(part, to)?;
    if let Some(dir) = to.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A FIFO put where the file was is refused at once, not waited on for a writer.
    #[test]
    fn a_fifo_in_place_of_the_file_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let opening = fifo.clone();
        std::thread::spawn(move || tx.send(super::open_regular(&opening).map(drop).map_err(|e| e.to_string())));
        let got = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("opening a FIFO blocked");
        assert_eq!(got, Err("it is not a regular file".to_owned()));
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(super::open_regular(&file).is_ok());
    }

    use super::*;

    /// A body as `file_body` makes it, fed from `rx` instead of a file.
    fn body(progress: &Arc<Progress>, rx: mpsc::Receiver<Result<Bytes, FileChanged>>, size: u64) -> FileBody {
        let body = progress.body.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        progress.received.store(0, Ordering::Relaxed);
        progress.sent_whole.store(false, Ordering::Relaxed);
        FileBody {
            rx,
            remaining: size,
            progress: progress.clone(),
            limiters: Vec::new(),
            unpaced: Bytes::new(),
            paced: None,
            body,
        }
    }

    /// Uploads whose connections do not take their next piece hold no blocking thread: with
    /// one in the pool, other file work still runs (before, each upload's reader held one
    /// for the whole upload). The pieces that are read are the file's, and a file that
    /// changed fails at its end.
    #[test]
    fn a_stalled_upload_holds_no_blocking_thread() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.bin");
        let data: Vec<u8> = (0..CHUNK * 3 + 10).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let mtime_ns = mtime_ns_of(&std::fs::metadata(&path).unwrap());
        let size = data.len() as u64;
        runtime.block_on(async {
            // Three uploads whose connections take nothing after the first piece.
            let mut stalled = Vec::new();
            for _ in 0..3 {
                let (tx, mut rx) = mpsc::channel(1);
                tokio::spawn(read_file(path.clone(), 0, size, mtime_ns, tx));
                let first = rx.recv().await.unwrap().unwrap();
                assert_eq!(&first[..], &data[..CHUNK]);
                stalled.push(rx);
            }
            let other = tokio::task::spawn_blocking(|| 42);
            let done = tokio::time::timeout(std::time::Duration::from_secs(5), other).await;
            assert_eq!(done.expect("other file work is not held up").unwrap(), 42);

            // One read to its end: the file as it is.
            let mut whole = Vec::new();
            let mut rx = stalled.remove(0);
            while let Some(piece) = rx.recv().await {
                whole.extend_from_slice(&piece.unwrap());
            }
            assert_eq!(whole.len(), data.len() - CHUNK);
            assert_eq!(&whole[..], &data[CHUNK..]);

            // Changed since it was submitted (the size recorded is not the file's): no end.
            let (tx, mut rx) = mpsc::channel(8);
            tokio::spawn(read_file(path.clone(), 0, size, mtime_ns + 1, tx));
            let mut last = None;
            while let Some(piece) = rx.recv().await {
                last = Some(piece.is_ok());
            }
            assert_eq!(last, Some(false), "the last piece is the change");
        });
    }

    #[tokio::test]
    async fn only_the_newest_request_body_counts_what_it_sends() {
        let progress = Arc::new(Progress::new(0, None));
        let (old_tx, old_rx) = mpsc::channel(4);
        let mut old = body(&progress, old_rx, 8);
        let (new_tx, new_rx) = mpsc::channel(4);
        let mut new = body(&progress, new_rx, 8);
        // The earlier request's body sends no more once the newer one started.
        old_tx.send(Ok(Bytes::from_static(b"12345678"))).await.unwrap();
        assert!(old.frame().await.unwrap().is_err(), "the old body ends");
        assert_eq!(progress.received(), 0, "the old body's bytes are not the new request's");
        assert!(!progress.sent_whole.load(Ordering::Relaxed), "nor is its end");
        new_tx.send(Ok(Bytes::from_static(b"abcd"))).await.unwrap();
        assert!(new.frame().await.unwrap().unwrap().is_data());
        assert_eq!(progress.received(), 4);
        new_tx.send(Ok(Bytes::from_static(b"efgh"))).await.unwrap();
        assert!(new.frame().await.unwrap().unwrap().is_data());
        assert_eq!(progress.received(), 8);
        assert!(progress.sent_whole.load(Ordering::Relaxed));
    }
}
