//! One HTTP exchange of an attempt: the request (headers, range and validators, basic
//! authentication from the URL), redirects within their limits, and the decision whether
//! the response can be written to the partial file and from which offset
//! (docs/behaviour.md, "HTTP", "Retries and resume").

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use std::time::SystemTime;

use hyper::body::Incoming;
use url::Url;

use super::http::{
    Failure, ReqBody, Retry, classify, empty_body, find, if_range, is_encoded, is_strong_etag, is_transient_status,
    kept_last_modified, parse_content_range, parse_retry_after,
};
use super::proxy::{Proxies, TunnelGarbled, TunnelRefused};
use super::{Engine, Job, ResponseMeta, USER_AGENT, auth};
use dlsession_proto::redact::{self, is_sensitive_header};
use dlsession_proto::{ErrorCode, Header};

impl Engine {
    pub(super) async fn send_following_redirects(
        &self,
        job: &Job,
        offset: u64,
    ) -> Result<(hyper::Response<Incoming>, Url), Failure> {
        let mut url =
            Url::parse(&job.url).map_err(|e| Failure::permanent(ErrorCode::InvalidUrl, format!("invalid URL: {e}")))?;
        let origin = url.origin();
        let (client, proxies) = self.route(job, super::http::Versions::Http1And2)?;
        let mut hops = 0;
        loop {
            let same_origin = url.origin() == origin;
            let mut req = build_request(&url, job, offset, same_origin, hyper::Method::GET, empty_body())?;
            if let Some(auth) = proxies.http_auth(&url) {
                req.headers_mut().insert(hyper::header::PROXY_AUTHORIZATION, auth);
            }
            auth::apply(&mut req, &url, &job.auth, &proxies);
            let resp = match tokio::time::timeout(job.idle_timeout, client.request(req)).await {
                Err(_) => return Err(self.unanswered(no_response(&url, job), &url, &proxies)),
                Ok(Err(e)) => {
                    let f = request_failure(&e, &url, &proxies, &format!("requesting {}", host_of(&url)));
                    return Err(self.unanswered(f, &url, &proxies));
                }
                Ok(Ok(r)) => r,
            };
            // A response is a sign of life: a chain of slow redirects, each within the
            // request timeout, is not a stuck worker (the supervisor stopped and requeued it
            // for ever, without a backoff).
            job.progress.beat();
            // Every response's cookies count, a redirect's too (a login that sets one and
            // sends on to the file).
            if let Some(jar) = &job.cookies {
                jar.take_from(&url, resp.headers());
            }
            let status = resp.status().as_u16();
            if let Some(challenge) = auth::challenge(status, resp.headers(), &url, &proxies) {
                return Err(auth::failure(status, &status_text(status), challenge));
            }
            if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                return Ok((resp, url));
            }
            let Some(location) = super::http::location(resp.headers()) else {
                return Ok((resp, url));
            };
            let next = url.join(&location).map_err(|e| invalid_redirect(&location, e))?;
            hops += 1;
            self.may_redirect(&url, &next, hops)?;
            url = next;
        }
    }

    /// A redirect from `url` to `next`, the `hops`-th, may be followed (downloads and
    /// uploads alike): http(s) only, never from https to http, within the limit.
    pub(super) fn may_redirect(&self, url: &Url, next: &Url, hops: u32) -> Result<(), Failure> {
        if !matches!(next.scheme(), "http" | "https") {
            return Err(Failure::permanent(
                ErrorCode::UnsupportedScheme,
                format!("redirect to unsupported scheme {:?}", next.scheme()),
            ));
        }
        if url.scheme() == "https" && next.scheme() == "http" {
            return Err(Failure::permanent(
                ErrorCode::UnsupportedScheme,
                format!("refusing redirect from https to insecure http ({})", host_of(next)),
            ));
        }
        // Kept as the task's final URL and quoted back: never longer than a task's own.
        if next.as_str().len() > self.settings.max_url_len {
            return Err(Failure::permanent(
                ErrorCode::InvalidUrl,
                format!(
                    "redirect to a URL of {} bytes; the limit is {} ({})",
                    next.as_str().len(),
                    self.settings.max_url_len,
                    host_of(next)
                ),
            ));
        }
        if hops > self.settings.max_redirects {
            return Err(Failure::permanent(
                ErrorCode::TooManyRedirects,
                format!("more than {} redirects", self.settings.max_redirects),
            ));
        }
        Ok(())
    }

    /// Decides whether the response can be written to the file, and from where.
    pub(super) fn accept_response(
        &self,
        job: &Job,
        resp: &hyper::Response<Incoming>,
        final_url: Url,
        offset: u64,
    ) -> Result<ResponseMeta, Failure> {
        let status = resp.status().as_u16();
        let peer =
            resp.extensions().get::<hyper_util::client::legacy::connect::HttpInfo>().map(|i| i.remote_addr().ip());
        let headers = resp.headers();
        let get = |name: hyper::header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        if is_transient_status(status) {
            return Err(status_failure(status, headers));
        }
        if status == 416 && offset > 0 {
            // `bytes */N` with N the offset asked for: the partial file already holds the
            // whole resource (a stop came after the last byte, before the finish).
            // Never against a length known from before: a copy that ends early (a cache
            // holding a truncated one under the same validators) is not the whole file.
            let complete = get(hyper::header::CONTENT_RANGE)
                .and_then(|v| v.trim().strip_prefix("bytes */").and_then(|n| n.trim().parse::<u64>().ok()))
                .is_some_and(|n| n == offset && job.total.is_none_or(|t| t == n));
            let sent = (get(hyper::header::ETAG), get(hyper::header::LAST_MODIFIED));
            if complete && !kept_changed_416(Kept::of(job), sent.0.as_deref(), sent.1.as_deref()) {
                return Ok(ResponseMeta {
                    status,
                    final_url: redact::url(final_url.as_str()),
                    headers: Vec::new(),
                    etag: job.etag.clone(),
                    last_modified: job.last_modified.clone(),
                    total: Some(offset),
                    total_stated: true,
                    ends_at: Some(offset),
                    offset,
                    restarted: false,
                    complete: true,
                    peer,
                });
            }
            return Err(Failure::restart(
                ErrorCode::CannotResume,
                "server refused the range request (416); restarting",
            ));
        }
        // The file comes only in a 200, a 203 (a transforming proxy's copy) or a 206: the
        // body of another 2xx (a 202's "still being made" page, a 204's nothing) is not it,
        // and taken as it, replaced the bytes kept and completed the task.
        if !matches!(status, 200 | 203 | 206) {
            let not_the_file =
                if (200..300).contains(&status) { " with no file (only 200, 203 and 206 carry it)" } else { "" };
            let mut f = Failure::permanent(
                ErrorCode::HttpStatus,
                format!("server answered {}{not_the_file}", status_text(status)),
            );
            f.error.http_status = Some(status);
            return Err(f);
        }
        // A validator is sent back in `If-Range` and carried in resume data: one too long
        // for either is not kept (the download can then only start over), never cut.
        let validator = |name| get(name).filter(|v| v.len() <= MAX_VALIDATOR_LEN);
        // A body in a transfer coding hyper does not undo (only `chunked` is) would be
        // written as the file, and one framed by both a coding and a length is the
        // request-smuggling shape RFC 9112 (6.3) says to treat as an error.
        let codings: Vec<String> = headers
            .get_all(hyper::header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .split(',')
                    .map(|c| c.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .filter(|c| !c.is_empty())
            .collect();
        if let Some(other) = codings.iter().find(|c| *c != "chunked") {
            return Err(Failure::permanent(
                ErrorCode::Network,
                format!("the response is sent in transfer coding {other:?}, which is not supported"),
            ));
        }
        if !codings.is_empty() && headers.contains_key(hyper::header::CONTENT_LENGTH) {
            return Err(Failure::permanent(
                ErrorCode::Network,
                "malformed response: both Transfer-Encoding and Content-Length",
            ));
        }
        let (mut etag, sent_last_modified) = (validator(hyper::header::ETAG), validator(hyper::header::LAST_MODIFIED));
        // Every line counts, and one that is not text counts as an encoding.
        let encoded = headers
            .get_all(hyper::header::CONTENT_ENCODING)
            .iter()
            .any(|v| v.to_str().map_or(true, |v| is_encoded(Some(v))));
        let mut last_modified =
            kept_last_modified(sent_last_modified.clone(), get(hyper::header::DATE).as_deref(), encoded);
        let content_length = get(hyper::header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok());
        let (start, total, total_stated, ends_at, restarted) = if status == 206 {
            // A resume the server got wrong starts over; a 206 that cannot describe the whole
            // file to a request without `Range` would do the same again at every attempt, for
            // the resource's whole budget: a malformed response, which no retry mends.
            let unusable = |why: String| {
                if offset > 0 {
                    Failure::restart(ErrorCode::CannotResume, why)
                } else {
                    Failure::permanent(
                        ErrorCode::Network,
                        format!("malformed response to a request for the whole file: {why}"),
                    )
                }
            };
            // One range was asked for: a multipart answer (RFC 9110 14.6 forbids it then) would
            // have its boundaries and part headers written into the file as data.
            if get(hyper::header::CONTENT_TYPE)
                .is_some_and(|t| t.trim_start().to_ascii_lowercase().starts_with("multipart/byteranges"))
            {
                return Err(unusable("a multipart/byteranges answer to a request for one range".into()));
            }
            let range = get(hyper::header::CONTENT_RANGE).and_then(|v| parse_content_range(&v));
            let Some((start, end, total)) = range else {
                return Err(unusable("206 response without a valid Content-Range".into()));
            };
            if start != offset {
                return Err(unusable(format!(
                    "asked for bytes from {offset}, server sent a range starting at {start}"
                )));
            }
            // A 206 to a request without `Range` (the whole body as a range) continues nothing:
            // none of the checks and carried validators below that concern earlier data apply.
            let resumed = offset > 0;
            if resumed && kept_changed_206(Kept::of(job), etag.as_deref(), sent_last_modified.as_deref(), encoded) {
                return Err(Failure::restart(
                    ErrorCode::CannotResume,
                    "the resource changed since the partial data was downloaded",
                ));
            }
            // A validator the 206 leaves out (it need not repeat `Last-Modified`) still
            // describes the data: kept, or the next interruption could not resume.
            if resumed {
                etag = etag.or_else(|| job.etag.clone());
                last_modified = last_modified.or_else(|| job.last_modified.clone());
            }
            // A range that ends before the file does is not an error: servers cap their
            // ranges, and the rest is asked for within the attempt (see `ends_at`).
            // Validators that stayed the same (a date within its second) do not prove the
            // same version when the length changed.
            if let (true, Some(now), Some(before)) = (resumed, total, job.total)
                && now != before
            {
                return Err(Failure::restart(
                    ErrorCode::CannotResume,
                    format!(
                        "the resource's length changed ({before} → {now} bytes) since the partial data was downloaded"
                    ),
                ));
            }
            // The range and the length must describe the same bytes (with an unknown total
            // the length would otherwise set where the file ends).
            if let Some(len) = content_length
                && end - start + 1 != len
            {
                return Err(unusable(format!("Content-Length ({len}) disagrees with Content-Range ({start}-{end})")));
            }
            // With an unknown total (`/*`) the length known from before still holds (the
            // validators matched): a shorter range is part of the file, never its end.
            // Nothing known either, the range's end is the best guess.
            let known = job.total.filter(|_| resumed);
            if let Some(before) = known
                && end >= before
            {
                return Err(Failure::restart(
                    ErrorCode::CannotResume,
                    format!("the server sent bytes up to {} of a resource of {before} bytes", end + 1),
                ));
            }
            let stated = total.is_some() || known.is_some();
            (offset, total.or(known).or(Some(end + 1)), stated, Some(end + 1), false)
        } else {
            (0, content_length, content_length.is_some(), content_length, offset > 0)
        };
        let headers = response_headers(headers);
        Ok(ResponseMeta {
            status,
            final_url: redact::url(final_url.as_str()),
            headers,
            etag,
            last_modified,
            total,
            total_stated,
            ends_at,
            offset: start,
            restarted,
            complete: false,
            peer,
        })
    }
}

/// A redirect whose location does not parse (downloads and uploads alike): permanent.
pub(super) fn invalid_redirect(location: &str, e: url::ParseError) -> Failure {
    let location = redact::url(location);
    Failure::permanent(ErrorCode::InvalidUrl, format!("redirect to an invalid location {location:?}: {e}"))
}

/// The longest `ETag` or `Last-Modified` kept to resume with (real ones are tens of bytes).
const MAX_VALIDATOR_LEN: usize = 1024;

/// A response's headers as a task keeps them.
pub(super) fn response_headers(map: &hyper::HeaderMap) -> Vec<Header> {
    map.iter().map(|(k, v)| Header::new(k.as_str(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect()
}

/// A transient status (408, 429, 5xx): retried, not before its `Retry-After`.
pub(super) fn status_failure(status: u16, headers: &hyper::HeaderMap) -> Failure {
    let retry_after = headers
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let mut f = Failure::transient(ErrorCode::HttpStatus, format!("server answered {}", status_text(status)));
    f.error.http_status = Some(status);
    f.retry = Retry::After(retry_after);
    f
}

/// A request to `url` that got no response: a proxy that refused its tunnel is answered
/// as a response of that status would be (a 407 with `Proxy-Authenticate` is a challenge
/// the app may answer), one whose answer is not HTTP fails for good, anything else is a
/// connection error.
pub(super) fn request_failure(
    err: &(dyn std::error::Error + 'static),
    url: &Url,
    proxies: &Proxies,
    what: &str,
) -> Failure {
    if let Some(garbled) = find::<TunnelGarbled>(err) {
        return Failure::permanent(ErrorCode::Network, format!("{what}: {garbled}"));
    }
    // A response head our side of an HTTP/2 connection refused, resetting its stream (over
    // 1 MiB, or not valid HTTP/2): malformed, as over HTTP/1.1, and no retry will change
    // it. Only before the head (in a body, the same resets are a body shorter or longer
    // than announced: transient), only our reset (a stream the server refused asks for a
    // retry), and only the stream's (a connection-wide GOAWAY reaches every request
    // waiting on that connection, most of them blameless).
    if let Some(h2) = find::<h2::Error>(err)
        && h2.is_library()
        && h2.is_reset()
        && matches!(h2.reason(), Some(h2::Reason::PROTOCOL_ERROR | h2::Reason::REFUSED_STREAM))
    {
        return Failure::permanent(
            ErrorCode::Network,
            format!("{what}: malformed response head (HTTP/2): {}", super::http::error_chain(err)),
        );
    }
    let Some(refused) = find::<TunnelRefused>(err) else { return classify(err, what) };
    let status = refused.status;
    let message = format!("the proxy answered {} to CONNECT {}", status_text(status), host_of(url));
    let mut f = match auth::tunnel_challenge(status, &refused.headers, url, proxies) {
        Some(challenge) => auth::failure(status, &status_text(status), challenge),
        None if is_transient_status(status) => status_failure(status, &refused.headers),
        None => {
            let mut f = Failure::permanent(ErrorCode::HttpStatus, String::new());
            f.error.http_status = Some(status);
            f
        }
    };
    f.error.message = message;
    f
}

/// The request failed at the proxy, which refused or garbled its tunnel: the server never
/// saw it.
pub(super) fn stopped_at_proxy(err: &(dyn std::error::Error + 'static)) -> bool {
    find::<TunnelRefused>(err).is_some() || find::<TunnelGarbled>(err).is_some()
}

/// Nothing came back from `url` within the idle timeout.
pub(super) fn no_response(url: &Url, job: &Job) -> Failure {
    Failure::transient(
        ErrorCode::TimedOut,
        format!("no response from {} within {} s", host_of(url), job.idle_timeout.as_secs_f64()),
    )
}

pub(super) fn status_text(status: u16) -> String {
    match hyper::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()) {
        Some(reason) => format!("{status} {reason}"),
        None => status.to_string(),
    }
}

pub(super) fn host_of(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => "(no host)".into(),
    }
}

/// A request to `url` with the task's headers, the session's cookies for it, and basic
/// authentication from the URL; `offset` asks a GET for the rest of a partial file.
pub(super) fn build_request(
    url: &Url,
    job: &Job,
    offset: u64,
    same_origin: bool,
    method: hyper::Method,
    body: ReqBody,
) -> Result<hyper::Request<ReqBody>, Failure> {
    let mut target = url.clone();
    let _ = target.set_username("");
    let _ = target.set_password(None);
    target.set_fragment(None);
    let mut b = hyper::Request::builder().method(method).uri(target.as_str());
    let has = |name: &str| job.headers.iter().any(|h| h.name.eq_ignore_ascii_case(name));
    let (has_ua, has_ae, has_auth) = (has("user-agent"), has("accept-encoding"), has("authorization"));
    let mut cookie: Option<String> = None;
    for h in &job.headers {
        // Credentials never travel to another origin after a redirect.
        if !same_origin && is_sensitive_header(&h.name) {
            continue;
        }
        // The app's own cookies go first, in the one `Cookie` header (below).
        if h.name.eq_ignore_ascii_case("cookie") {
            cookie = Some(cookie.map_or_else(|| h.value.clone(), |c| format!("{c}; {}", h.value)));
            continue;
        }
        b = b.header(h.name.as_str(), h.value.as_str());
    }
    // Then the session's, for this URL (each cookie to the hosts it was set for, so a
    // redirect to another origin carries only that origin's).
    if let Some(stored) = job.cookies.as_ref().and_then(|jar| jar.header_for(url)) {
        cookie = Some(cookie.map_or_else(|| stored.clone(), |c| format!("{c}; {stored}")));
    }
    if let Some(cookie) = cookie {
        b = b.header(hyper::header::COOKIE, cookie);
    }
    if !has_ua {
        b = b.header(hyper::header::USER_AGENT, USER_AGENT);
    }
    if !has_ae {
        // Ranges and sizes refer to the bytes on the wire: ask for them unencoded.
        b = b.header(hyper::header::ACCEPT_ENCODING, "identity");
    }
    if same_origin && !has_auth && !url.username().is_empty() {
        let user = percent_decode(url.username());
        let pass = url.password().map(percent_decode).unwrap_or_default();
        b = b.header(hyper::header::AUTHORIZATION, format!("Basic {}", STANDARD.encode(format!("{user}:{pass}"))));
    }
    if offset > 0 {
        b = b.header(hyper::header::RANGE, format!("bytes={offset}-"));
        if let Some(validator) = if_range(job.etag.as_deref(), job.last_modified.as_deref()) {
            b = b.header(hyper::header::IF_RANGE, validator);
        }
    }
    b.body(body).map_err(|e| Failure::permanent(ErrorCode::InvalidRequest, format!("cannot build the request: {e}")))
}

/// The validators of the data kept for a resume (those a `Range` request continues).
#[derive(Clone, Copy)]
struct Kept<'a> {
    etag: Option<&'a str>,
    last_modified: Option<&'a str>,
}

impl<'a> Kept<'a> {
    fn of(job: &'a Job) -> Kept<'a> {
        Kept { etag: job.etag.as_deref(), last_modified: job.last_modified.as_deref() }
    }
}

fn differs(old: Option<&str>, new: Option<&str>) -> bool {
    matches!((old, new), (Some(o), Some(n)) if o != n)
}

/// A 206 continuing `kept` data, with these validators, may come from another version: the
/// validators must still be the ones the data came from (a strong `ETag` alone decides;
/// beside a weak one the date counts too), and the one that decides must come back. That
/// is a strong `ETag` that `If-Range` carried (a 206 carries the `ETag` a 200 would, RFC 9110
/// 15.3.7; not `Last-Modified`), or the date when no `If-Range` could be sent. Without it, a
/// server that ignored `If-Range` for a changed resource would have its new bytes spliced
/// onto the old. Data resumed by a date alone was not encoded (`kept_last_modified`).
fn kept_changed_206(kept: Kept<'_>, etag: Option<&str>, last_modified: Option<&str>, encoded: bool) -> bool {
    if kept.etag.is_some_and(is_strong_etag) {
        return differs(kept.etag, etag) || etag.is_none();
    }
    let unchecked = if_range(kept.etag, kept.last_modified).is_none() && last_modified.is_none();
    differs(kept.etag, etag) || differs(kept.last_modified, last_modified) || unchecked || encoded
}

/// A 416 saying the `kept` data is the whole resource may be about another version: with
/// `If-Range` the server checked the validator; without one (beside a weak `ETag`) the 416
/// must bring the date back, unchanged.
fn kept_changed_416(kept: Kept<'_>, etag: Option<&str>, last_modified: Option<&str>) -> bool {
    let checked = if_range(kept.etag, kept.last_modified).is_some()
        || kept.last_modified.is_some() && kept.last_modified == last_modified;
    differs(kept.etag, etag) || !checked
}

/// A userinfo part as the user meant it (`p%40ss` is `p@ss`).
fn percent_decode(s: &str) -> String {
    String::from_utf8_lossy(&redact::percent_decode(s)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_data_is_continued_only_with_the_validators_it_came_with() {
        let (strong, weak, date, later) = (Some("\"a\""), Some("W/\"a\""), Some("d1"), Some("d2"));
        let kept = |etag, last_modified| Kept { etag, last_modified };
        // A strong ETag decides alone, and must come back.
        assert!(!kept_changed_206(kept(strong, date), strong, later, false));
        assert!(kept_changed_206(kept(strong, date), Some("\"b\""), date, false));
        assert!(kept_changed_206(kept(strong, date), None, date, false));
        // By a date (If-Range sent): the date need not come back; encoded bytes never fit.
        assert!(!kept_changed_206(kept(None, date), None, None, false));
        assert!(kept_changed_206(kept(None, date), None, later, false));
        assert!(kept_changed_206(kept(None, date), None, date, true));
        // Beside a weak ETag (no If-Range): both compared, the date must come back.
        assert!(!kept_changed_206(kept(weak, date), weak, date, false));
        assert!(kept_changed_206(kept(weak, date), weak, later, false));
        assert!(kept_changed_206(kept(weak, date), weak, None, false));
        // A 416 "complete": with If-Range the server checked; without, the date must match.
        assert!(!kept_changed_416(kept(strong, None), None, None));
        assert!(kept_changed_416(kept(strong, None), Some("\"b\""), None));
        assert!(!kept_changed_416(kept(None, date), None, None));
        assert!(!kept_changed_416(kept(weak, date), None, date));
        assert!(kept_changed_416(kept(weak, date), None, None));
        assert!(kept_changed_416(kept(weak, date), None, later));
    }

    #[test]
    fn userinfo_is_decoded_for_basic_authentication() {
        assert_eq!(percent_decode("p%40ss"), "p@ss");
        assert_eq!(STANDARD.encode("user:p@ss"), "dXNlcjpwQHNz");
    }
}
