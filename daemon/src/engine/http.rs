//! The shared HTTP client (HTTP/1.1 and HTTP/2 over rustls) and error classification.

use std::error::Error as StdError;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tracing::{info, warn};

use super::names::{Recording, Resolved};
use super::proxy::{Proxies, ProxyConnector, TunnelAuth};
use super::reads::{InFlight, SpeedSizedReads};

use dlsession_proto::{ErrorCode, ErrorInfo};

/// A request's body: empty for a download, a file for an upload.
pub type ReqBody = UnsyncBoxBody<Bytes, Box<dyn StdError + Send + Sync>>;

pub type HttpClient = Client<SpeedSizedReads<HttpsConnector<ProxyConnector>>, ReqBody>;

/// The body of a request that sends none.
pub fn empty_body() -> ReqBody {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync()
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read extra CA file {path}: {message}")]
    ExtraCa { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Makes HTTP clients that share one TLS setup: system roots (honouring
/// `SSL_CERT_FILE`/`SSL_CERT_DIR`) plus an optional extra CA file, ALPN h2 and http/1.1.
/// One client per proxy setting (the daemon's environment, and each session's own).
#[derive(Clone)]
pub struct ClientFactory {
    tls: rustls::ClientConfig,
    /// What `tls` was built from, for configurations that add a client certificate.
    roots: Arc<RootCertStore>,
    connect_timeout: Duration,
    /// What names resolved to, shared by every client made here.
    resolved: Resolved,
    /// An HTTP/2 connection's receive window (see `h2_connection_window`).
    h2_window: u32,
}

/// A session's client certificate as its downloads see it.
#[derive(Debug, Clone)]
pub enum CertState {
    Ready(Arc<ClientIdentity>),
    /// Its files are still being read (at start, on a slow file system): downloads wait,
    /// retried with backoff.
    Reading,
    /// It cannot be used, and why: downloads fail.
    Unusable(String),
}

impl From<Result<Arc<ClientIdentity>, String>> for CertState {
    fn from(read: Result<Arc<ClientIdentity>, String>) -> CertState {
        match read {
            Ok(identity) => CertState::Ready(identity),
            Err(why) => CertState::Unusable(why),
        }
    }
}

/// A client certificate chain and its key, read from the files a session named. `Debug`
/// shows only where they came from.
pub struct ClientIdentity {
    /// Distinguishes identities in the engine's client map.
    pub id: u64,
    pub cert_file: String,
    chain: Vec<CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
}

/// The most a certificate or key file may hold: PEM files are a few KiB.
const PEM_FILE_LIMIT: u64 = 1 << 20;

/// Reads a certificate or key file: a regular file only (a FIFO would block the reader
/// for ever, a device never end), and at most `PEM_FILE_LIMIT` bytes.
fn read_pem_file(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > PEM_FILE_LIMIT {
        return Err(std::io::Error::other(format!("{} bytes: too large for a PEM file", meta.len())));
    }
    // Only the open had to be non-blocking; a file system that honoured it would make the
    // read fail with `EAGAIN`.
    let flags = rustix::fs::fcntl_getfl(&file)?;
    rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK)?;
    let mut data = Vec::new();
    file.take(PEM_FILE_LIMIT).read_to_end(&mut data)?;
    Ok(data)
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("id", &self.id)
            .field("cert_file", &self.cert_file)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientIdentity {
    fn eq(&self, other: &ClientIdentity) -> bool {
        self.id == other.id
    }
}

impl Eq for ClientIdentity {}

impl ClientIdentity {
    /// Reads a PEM certificate chain and its private key; the error says what is wrong
    /// (blocking: call it off the core and the runtime).
    pub fn load(cert_file: &str, key_file: &str) -> Result<ClientIdentity, ClientCertError> {
        use rustls_pki_types::PrivateKeyDer;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        crate::failpoint::hit("client-cert-read");
        let read = |path: &str| read_pem_file(path).map_err(|e| ClientCertError::Read(format!("{path}: {e}")));
        let chain = CertificateDer::pem_slice_iter(&read(cert_file)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientCertError::Invalid(format!("{cert_file}: {e}")))?;
        if chain.is_empty() {
            return Err(ClientCertError::Invalid(format!("{cert_file}: no PEM certificate in it")));
        }
        let key = PrivateKeyDer::from_pem_slice(&read(key_file)?)
            .map_err(|e| ClientCertError::Invalid(format!("{key_file}: no usable PEM private key ({e})")))?;
        // The key must be one rustls can sign with, and belong to the certificate.
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let signer = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| ClientCertError::Invalid(format!("{key_file}: {e}")))?;
        rustls::sign::CertifiedKey::new(chain.clone(), signer)
            .keys_match()
            .map_err(|e| ClientCertError::Invalid(format!("{cert_file} and {key_file} do not belong together: {e}")))?;
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(ClientIdentity { id, cert_file: cert_file.to_owned(), chain, key })
    }
}

/// Why a client certificate cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientCertError {
    #[error("cannot read {0}")]
    Read(String),
    #[error("{0}")]
    Invalid(String),
}

impl std::fmt::Debug for ClientFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientFactory").field("connect_timeout", &self.connect_timeout).finish_non_exhaustive()
    }
}

impl ClientFactory {
    /// `streams`: the most downloads that run at once, each of which may be a stream of one
    /// HTTP/2 connection.
    pub fn new(
        extra_ca: Option<&Path>,
        connect_timeout: Duration,
        streams: u32,
    ) -> Result<ClientFactory, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            warn!(error = %e, "problem loading system CA certificates");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        if let Some(path) = extra_ca {
            let err = |message: String| TlsSetupError::ExtraCa { path: path.display().to_string(), message };
            let mut count = 0;
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))? {
                roots.add(cert.map_err(|e| err(e.to_string()))?).map_err(|e| err(e.to_string()))?;
                count += 1;
            }
            if count == 0 {
                return Err(err("no certificates found".into()));
            }
            info!(count, path = %path.display(), "loaded extra CA certificates");
        }
        info!(roots = added, ignored, "trust roots loaded");
        if roots.is_empty() {
            warn!("no trusted CA certificates: every https download will fail with a tls error");
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let roots = Arc::new(roots);
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let h2_window = h2_connection_window(streams);
        Ok(ClientFactory { tls, roots, connect_timeout, resolved: Resolved::default(), h2_window })
    }

    /// What every client's resolutions found (see `names`).
    pub fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    /// A client whose connections go as `proxies` say (with `tunnel_auth` on `CONNECT`s),
    /// presenting `identity` to servers that ask for a client certificate, offering
    /// `versions` over TLS; pooled connections.
    pub fn client(
        &self,
        proxies: &Proxies,
        identity: Option<&ClientIdentity>,
        tunnel_auth: TunnelAuth,
        versions: Versions,
    ) -> Result<HttpClient, rustls::Error> {
        let tls = match identity {
            None => self.tls.clone(),
            Some(id) => {
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(self.roots.clone())
                    .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?
            }
        };
        Ok(self.client_with(proxies, tls, tunnel_auth, versions))
    }

    fn client_with(
        &self,
        proxies: &Proxies,
        tls: rustls::ClientConfig,
        tunnel_auth: TunnelAuth,
        versions: Versions,
    ) -> HttpClient {
        let mut http = HttpConnector::new_with_resolver(Recording::new(self.resolved.clone()));
        http.enforce_http(false);
        http.set_connect_timeout(Some(self.connect_timeout));
        // A connection whose peer is gone without a word (a NAT or firewall that forgot it
        // while the machine slept, an address that changed) is found within about two
        // minutes, not the kernel's default of eleven (75 s × 9 probes).
        http.set_keepalive(Some(Duration::from_secs(60)));
        http.set_keepalive_interval(Some(Duration::from_secs(15)));
        http.set_keepalive_retries(Some(4));
        http.set_nodelay(true);
        let connector =
            ProxyConnector::new(proxies.clone(), http, Arc::new(self.tls.clone()), tunnel_auth, self.connect_timeout);
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1();
        let https = match versions {
            Versions::Http1And2 => builder.enable_http2().wrap_connector(connector),
            Versions::Http1 => builder.wrap_connector(connector),
        };
        Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(16)
            // Fixed, generous HTTP/2 windows: the adaptive window carried its estimate from
            // one download to the next and made throughput vary by 50 % between runs.
            .http2_initial_stream_window_size(H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(self.h2_window)
            .http1_max_buf_size(H1_MAX_BUF)
            // A response head is taken up to the same size over HTTP/2 (h2's default is
            // 16 KiB: a larger head reset the stream, and the task retried for days).
            .http2_max_header_list_size(H1_MAX_BUF as u32)
            // An HTTP/2 connection is shared by every download to its host: one that died
            // silently (after a suspend, say) is found by a ping unanswered for 20 s, while
            // pooled too, instead of each request on it waiting out its own timeout.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(20))
            .http2_keep_alive_while_idle(true)
            .build(SpeedSizedReads { connector: https, in_flight: IN_FLIGHT })
    }
}

/// hyper's read buffer for an HTTP/1.1 connection, at most.
const H1_MAX_BUF: usize = 1 << 20;
/// What an HTTP/2 server may send on one stream before the engine has taken it.
const H2_STREAM_WINDOW: u32 = 8 << 20;

/// What a server may send on a whole HTTP/2 connection before the engine has taken it: every
/// stream's window, for as many streams as downloads may run at once, and one more. Data a
/// stream received and its download has not taken counts against both windows: with 16 MiB
/// for the connection, three downloads paced by their bandwidth limits held it full and an
/// unlimited one beside them crawled at their pace. Never more than that: h2 lets a server
/// make it hold tiny DATA frames up to half this window's worth of framing overhead, so the
/// window also bounds what such frames may cost (half of what the streams may hold anyway;
/// each stream's window is counted with its download, `IN_FLIGHT`).
fn h2_connection_window(streams: u32) -> u32 {
    // HTTP/2's largest window.
    const MAX: u64 = (1 << 31) - 1;
    let all = u64::from(H2_STREAM_WINDOW).saturating_mul(u64::from(streams).saturating_add(1));
    u32::try_from(all.min(MAX)).unwrap_or(u32::MAX >> 1)
}

/// What may sit above a connection's socket, read but not yet counted by the engine. TLS:
/// rustls's records, at most two of 16 KiB + 256 bytes per layer, two layers through an
/// HTTPS proxy: about 65 KiB, counted twice. HTTP/1.1: hyper reads into its buffer's whole
/// spare room, which reserving may double past `H1_MAX_BUF`, and the frame it handed on may
/// be as large. HTTP/2: the stream's window and h2's frame buffer.
const IN_FLIGHT: InFlight = InFlight {
    http1: 4 * H1_MAX_BUF as u64 + (128 << 10),
    http2: H2_STREAM_WINDOW as u64 + H1_MAX_BUF as u64 + (128 << 10),
};

/// The HTTP versions a client offers a TLS server (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Versions {
    Http1And2,
    /// For uploads: hyper receives informational responses only over HTTP/1.1, and a
    /// server offers a resumable upload in a `104` (docs/behaviour.md, "Uploads").
    Http1,
}

/// Whether a failed attempt may be retried.
#[derive(Debug, Clone, PartialEq)]
pub enum Retry {
    Never,
    /// Transient: retry with backoff, but not before the server's `Retry-After`, if any.
    After(Option<Duration>),
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub error: ErrorInfo,
    pub retry: Retry,
    /// The partial data cannot be trusted or continued: the next attempt starts at zero.
    pub discard_partial: bool,
    /// A 401 or 407 that asked for credentials: the core may ask the app instead of failing.
    pub challenge: Option<Box<dlsession_proto::Challenge>>,
    /// For a request that got no response: where its connection went (its proxy, else its
    /// server, the one a redirect named included), as the name last resolved, so the core
    /// can tell whether that address has a route.
    pub first_hop: Option<std::net::IpAddr>,
}

impl Failure {
    pub fn transient(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            error: ErrorInfo::new(code, message),
            retry: Retry::After(None),
            discard_partial: false,
            challenge: None,
            first_hop: None,
        }
    }

    pub fn permanent(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            error: ErrorInfo::new(code, message),
            retry: Retry::Never,
            discard_partial: false,
            challenge: None,
            first_hop: None,
        }
    }

    pub fn restart(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            error: ErrorInfo::new(code, message),
            retry: Retry::After(None),
            discard_partial: true,
            challenge: None,
            first_hop: None,
        }
    }
}

/// TLS alerts by which a server says it wants a client certificate, or refuses ours: set (or
/// fix) the session's; retrying changes nothing.
const REFUSED_CERTIFICATE: [&str; 7] = [
    "CertificateRequired",
    "BadCertificate",
    "UnsupportedCertificate",
    "CertificateRevoked",
    "CertificateExpired",
    "CertificateUnknown",
    "UnknownCA",
];
const REFUSED_HINT: &str =
    " (the server wants a client certificate it accepts: see `dlsessionctl policy SESSION --client-cert`)";
/// TLS alerts by which a server refuses the handshake itself: no version or cipher both
/// sides accept, or (TLS 1.2 servers say it so) no client certificate; retrying changes
/// nothing.
const REFUSED_HANDSHAKE: [&str; 4] = ["HandshakeFailure", "ProtocolVersion", "InsufficientSecurity", "AccessDenied"];
const HANDSHAKE_HINT: &str = " (no TLS version or cipher both sides accept, or the server wants a client certificate: \
     see `dlsessionctl policy SESSION --client-cert`)";

/// The hint for a fatal alert the server sent (its name, then anything but a letter or
/// digit), if it is one retrying cannot mend.
fn refused_alert(alert: &str) -> Option<&'static str> {
    let name = alert.split(|c: char| !c.is_ascii_alphanumeric()).next().unwrap_or_default();
    if REFUSED_CERTIFICATE.contains(&name) {
        Some(REFUSED_HINT)
    } else if REFUSED_HANDSHAKE.contains(&name) {
        Some(HANDSHAKE_HINT)
    } else {
        None
    }
}

/// Classifies an error from sending a request or reading a body.
pub fn classify(err: &(dyn StdError + 'static), what: &str) -> Failure {
    let chain = error_chain(err);
    // A certificate problem is not transient: retrying for a week would only hide it.
    if let Some(tls) = find::<rustls::Error>(err) {
        let refused = match tls {
            rustls::Error::AlertReceived(a) => refused_alert(&format!("{a:?}")),
            _ => None,
        };
        let permanent = refused.is_some()
            || matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::UnsupportedNameType
                    | rustls::Error::PeerIncompatible(_)
            );
        let message = format!("{what}: TLS error: {tls}{}", refused.unwrap_or_default());
        return if permanent {
            Failure::permanent(ErrorCode::Tls, message)
        } else {
            Failure::transient(ErrorCode::Tls, message)
        };
    }
    // The same alert inside the connection's own error, of which hyper keeps only the text.
    if let Some(hint) = chain.split("received fatal alert: ").nth(1).and_then(refused_alert) {
        return Failure::permanent(ErrorCode::Tls, format!("{what}: TLS error: {chain}{hint}"));
    }
    if let Some(io) = find::<std::io::Error>(err)
        && io.kind() == std::io::ErrorKind::TimedOut
    {
        return Failure::transient(ErrorCode::TimedOut, format!("{what}: {chain}"));
    }
    // A server that does not speak HTTP (or sends a head larger than we accept) will
    // not start to on a retry.
    if let Some(h) = find::<hyper::Error>(err)
        && h.is_parse()
    {
        return Failure::permanent(ErrorCode::Network, format!("{what}: malformed response: {chain}"));
    }

    Failure::transient(ErrorCode::Network, format!("{what}: {chain}"))
}

pub(super) fn find<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    if let Some(t) = err.downcast_ref::<T>() {
        return Some(t);
    }
    // io::Error::source() skips the error it wraps: look inside explicitly.
    if let Some(inner) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
        let inner: &(dyn StdError + 'static) = inner;
        if let Some(t) = find::<T>(inner) {
            return Some(t);
        }
    }
    err.source().and_then(find::<T>)
}

/// "outer: inner: innermost", skipping repeats.
pub(super) fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    parts.join(": ")
}

/// A response's `Location`, as text `Url::join` takes. Bytes outside ASCII (raw UTF-8, which
/// some servers send) and controls are percent-encoded, as browsers do, instead of the
/// redirect being ignored.
pub fn location(headers: &hyper::HeaderMap) -> Option<String> {
    let raw = headers.get(hyper::header::LOCATION)?.as_bytes();
    Some(percent_encoding::percent_encode(raw, percent_encoding::CONTROLS).to_string())
}

/// Statuses that are worth retrying (docs/behaviour.md, "Retries and resume").
pub fn is_transient_status(status: u16) -> bool {
    // 511: a captive portal wants a sign-in (RFC 6585), not the server refusing.
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504 | 511)
}

/// Parses `Retry-After` as delta-seconds or an HTTP date; anything else is `None`.
///
/// The value comes from the server and is not bounded here (delta-seconds beyond
/// `u64::MAX` saturate): the core caps the wait (`retry_after_max_ms`).
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`).
pub fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    // (No file holds 2^64 bytes: an end there could not be counted past.)
    if end < start || end == u64::MAX {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    if let Some(t) = total
        && end >= t
    {
        return None;
    }
    Some((start, end, total))
}

/// A strong entity tag (usable in `If-Range`), as opposed to `W/"…"`.
pub fn is_strong_etag(etag: &str) -> bool {
    etag.starts_with('"')
}

/// Data already received can be continued with a range request: a strong validator
/// (`If-Range`, or the response's own, see [`if_range`]) makes sure the resource has not
/// changed meanwhile. A task keeps a `Last-Modified` only when it is strong
/// ([`kept_last_modified`]).
pub fn can_resume(etag: Option<&str>, last_modified: Option<&str>) -> bool {
    etag.is_some_and(is_strong_etag) || last_modified.is_some()
}

/// What a range request carries in `If-Range` (RFC 9110 13.1.5): a strong `ETag`, else the
/// date, but never a date when an `ETag` is known (a weak one): the 206 is then checked
/// against the validators by the client alone.
pub fn if_range<'a>(etag: Option<&'a str>, last_modified: Option<&'a str>) -> Option<&'a str> {
    match (etag, last_modified) {
        (Some(e), _) if is_strong_etag(e) => Some(e),
        (None, Some(lm)) => Some(lm),
        _ => None,
    }
}

/// The `Last-Modified` of a response worth keeping to resume with: a strong validator
/// (RFC 9110 8.8.2.2: the response's `Date` at least a second later, so a second change
/// within that second cannot hide behind it), for the bytes as they are (no
/// `Content-Encoding`: a date does not tell encodings apart, a strong `ETag` does).
pub fn kept_last_modified(last_modified: Option<String>, date: Option<&str>, encoded: bool) -> Option<String> {
    let lm = last_modified?;
    let modified = httpdate::parse_http_date(&lm).ok()?;
    let served = httpdate::parse_http_date(date?).ok()?;
    let strong = served.duration_since(modified).is_ok_and(|d| d >= Duration::from_secs(1));
    (strong && !encoded).then_some(lm)
}

/// A response's bytes are encoded (`Content-Encoding` other than `identity`).
pub fn is_encoded(content_encoding: Option<&str>) -> bool {
    content_encoding
        .is_some_and(|e| e.split(',').any(|c| !c.trim().is_empty() && !c.trim().eq_ignore_ascii_case("identity")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Room for every stream a connection can have, one more, and never past HTTP/2's most.
    #[test]
    fn an_h2_connection_window_holds_every_streams_window() {
        assert_eq!(h2_connection_window(16), 17 * H2_STREAM_WINDOW);
        assert_eq!(h2_connection_window(0), H2_STREAM_WINDOW);
        assert_eq!(h2_connection_window(u32::MAX), (1 << 31) - 1);
    }

    /// A server's fatal alert that retrying cannot mend fails the task at once; others
    /// (an internal error, a connection closed) are retried.
    #[test]
    fn refused_handshakes_are_permanent() {
        use rustls::AlertDescription as A;
        for (alert, permanent, hint) in [
            (A::HandshakeFailure, true, "no TLS version or cipher"),
            (A::ProtocolVersion, true, "no TLS version or cipher"),
            (A::CertificateRequired, true, "wants a client certificate it accepts"),
            (A::InternalError, false, ""),
            (A::BadCertificateStatusResponse, false, ""),
        ] {
            let f = classify(&rustls::Error::AlertReceived(alert), "GET");
            assert_eq!(f.retry == Retry::Never, permanent, "{alert:?}: {f:?}");
            assert_eq!(f.error.code, ErrorCode::Tls);
            assert!(f.error.message.contains(hint), "{alert:?}: {}", f.error.message);
        }
        let wrapped = std::io::Error::other("received fatal alert: HandshakeFailure");
        assert_eq!(classify(&wrapped, "GET").retry, Retry::Never, "the alert as text, as hyper keeps it");
    }

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 0-99/100"), Some((0, 99, Some(100))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes 9-5/100"), None);
        assert_eq!(parse_content_range("bytes 0-100/100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("bytes 0-18446744073709551615/*"), None, "an end no length can follow");
    }

    #[test]
    fn validators_for_a_resume() {
        let (old, date) = ("Wed, 21 Oct 2015 07:28:00 GMT", "Wed, 21 Oct 2015 07:28:01 GMT");
        let kept = |lm: &str, date: Option<&str>, encoded| kept_last_modified(Some(lm.to_owned()), date, encoded);
        assert_eq!(kept(old, Some(date), false).as_deref(), Some(old), "a second later: strong");
        assert_eq!(kept(old, Some(old), false), None, "the same second: weak");
        assert_eq!(kept(date, Some(old), false), None, "modified after it was served");
        assert_eq!(kept(old, None, false), None, "no Date: not known to be strong");
        assert_eq!(kept(old, Some(date), true), None, "encoded bytes");
        assert_eq!(kept("yesterday", Some(date), false), None);
        assert!(is_encoded(Some("gzip")) && is_encoded(Some("identity, br")));
        assert!(!is_encoded(None) && !is_encoded(Some("identity")) && !is_encoded(Some(" Identity ")));
        assert_eq!(if_range(Some("\"a\""), Some(old)), Some("\"a\""));
        assert_eq!(if_range(None, Some(old)), Some(old));
        assert_eq!(if_range(Some("W/\"a\""), Some(old)), None, "no date beside a weak ETag");
        assert_eq!(if_range(Some("W/\"a\""), None), None);
    }

    #[test]
    fn retry_after() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("18446744073709551615", now), Some(Duration::from_secs(u64::MAX)));
        assert_eq!(parse_retry_after("99999999999999999999999", now), Some(Duration::from_secs(u64::MAX)));
    }

    proptest::proptest! {
        /// A Content-Range from a server never panics the parser, and what it accepts is
        /// consistent: start <= end < total.
        #[test]
        fn any_content_range_parses_consistently(value in ".{0,60}", a in proptest::prelude::any::<u64>(), b in proptest::prelude::any::<u64>(), t in proptest::prelude::any::<u64>()) {
            let _ = parse_content_range(&value);
            if let Some((start, end, total)) = parse_content_range(&format!("bytes {a}-{b}/{t}")) {
                proptest::prop_assert!(start <= end && total.is_none_or(|t| end < t));
            }
        }

        /// Any `Location` a header can hold becomes ASCII text (what `Url::join` takes).
        #[test]
        fn location_is_ascii(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let Ok(value) = hyper::header::HeaderValue::from_bytes(&raw) else { return Ok(()) };
            let mut headers = hyper::HeaderMap::new();
            headers.insert(hyper::header::LOCATION, value);
            let text = location(&headers).unwrap();
            proptest::prop_assert!(text.is_ascii());
            // (A `%` it held already is left as it is, escaping what follows it.)
            proptest::prop_assume!(!raw.contains(&b'%'));
            proptest::prop_assert_eq!(percent_encoding::percent_decode_str(&text).collect::<Vec<u8>>(), raw);
        }

        /// No header value panics or overflows, whatever it holds.
        #[test]
        fn any_retry_after_parses_without_panicking(value in ".{0,40}", digits in "[0-9]{1,40}", secs in proptest::prelude::any::<u64>()) {
            let now = std::time::SystemTime::now();
            let _ = parse_retry_after(&value, now);
            proptest::prop_assert!(parse_retry_after(&digits, now).is_some());
            let date = httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(secs % 253_402_300_799));
            let _ = parse_retry_after(&date, now);
        }
    }

    #[test]
    fn certificate_errors_are_found_inside_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let wrapped = std::io::Error::other(io);
        let boxed: Box<dyn StdError + Send + Sync> = Box::new(wrapped);
        let f = classify(boxed.as_ref(), "connecting");
        assert_eq!(f.error.code, ErrorCode::Tls);
        assert_eq!(f.retry, Retry::Never);
    }

    /// A response head larger than the client accepts is a permanent error.
    #[tokio::test]
    async fn an_oversized_response_head_is_not_retried() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let mut head = b"HTTP/1.1 200 OK\r\nX-Padding: ".to_vec();
            head.extend(std::iter::repeat_n(b'a', 2 << 20));
            head.extend(b"\r\nContent-Length: 0\r\n\r\n");
            let _ = s.write_all(&head).await;
        });
        let client = ClientFactory::new(None, Duration::from_secs(5), 16)
            .unwrap()
            .client(&super::super::proxy::Proxies::from_env(), None, Arc::from([]), Versions::Http1And2)
            .unwrap();
        let req = hyper::Request::get(format!("http://{addr}/")).body(empty_body()).unwrap();
        let err = client.request(req).await.unwrap_err();
        let f = classify(&err, "requesting");
        assert_eq!(f.retry, Retry::Never, "{f:?}");
        assert!(f.error.message.contains("malformed response"), "{f:?}");
    }

    #[test]
    fn transient_statuses() {
        for s in [408, 429, 500, 502, 503, 504, 511] {
            assert!(is_transient_status(s));
        }
        for s in [400, 401, 403, 404, 410, 501] {
            assert!(!is_transient_status(s));
        }
    }
}
