//! Validation of everything a client asks for (docs/behaviour.md, "Security and bad
//! input"). Each refusal carries its error code and a message a developer can act on.

use std::path::{Path, PathBuf};

use dlsession_proto::redact;
use dlsession_proto::{ErrorCode, ErrorInfo, Header, LaunchSpec, SessionConfig, SessionProxy, TaskSpec, UploadSpec};
use url::Url;

use crate::config::{Config, Limits};

fn err(code: ErrorCode, message: impl Into<String>) -> ErrorInfo {
    ErrorInfo::new(code, message)
}

const MAX_DESCRIPTION: usize = 4096;

/// Checks a session's own proxy (a URL the daemon can use, a `NO_PROXY` list of sane size)
/// and returns it normalised: the URL as the `url` crate writes it (scheme in lower case,
/// credentials percent-encoded), which the proxy matcher then takes as it is.
pub fn session_proxy(p: &SessionProxy) -> Result<SessionProxy, ErrorInfo> {
    check_session_proxy(p)?;
    let url = p.url.as_deref().and_then(|raw| Url::parse(raw).ok()).map(|u| u.as_str().to_owned());
    let normal = SessionProxy { url, no_proxy: p.no_proxy.clone() };
    // What the matcher cannot read it would drop without a word, and downloads would go
    // direct: refused here instead.
    if normal.url.as_deref().is_some_and(|u| !crate::engine::proxy::Proxies::new(u, "", "", "").proxies_all()) {
        return Err(err(
            ErrorCode::InvalidRequest,
            format!("the proxy URL {:?} cannot be used", p.url.as_deref().map(redact::url).unwrap_or_default()),
        ));
    }
    Ok(normal)
}

fn check_session_proxy(p: &SessionProxy) -> Result<(), ErrorInfo> {
    const MAX: usize = 4096;
    let invalid = |m: String| err(ErrorCode::InvalidRequest, m);
    if p.no_proxy.len() > MAX || p.no_proxy.chars().any(char::is_control) {
        return Err(invalid(format!("no_proxy must be at most {MAX} bytes without control characters")));
    }
    let Some(raw) = &p.url else { return Ok(()) };
    if raw.len() > MAX {
        return Err(invalid(format!("the proxy URL is {} bytes long; the limit is {MAX}", raw.len())));
    }
    // The URL may hold a password: never echoed, not even redacted (a `#` or `/` in it would
    // make redaction miss).
    let url = Url::parse(raw).map_err(|e| invalid(format!("invalid proxy URL: {e}")))?;
    match url.scheme() {
        "http" | "https" | "socks5h" | "socks5" | "socks4a" | "socks4" => {}
        other => {
            return Err(invalid(format!(
                "unsupported proxy scheme {other:?} (http, https, socks5h, socks5, socks4a, socks4)"
            )));
        }
    }
    if url.host_str().is_none_or(str::is_empty) || url.port_or_known_default().is_none() {
        return Err(invalid("the proxy URL needs a host and a port".into()));
    }
    Ok(())
}

/// Parses and checks a download URL; returns the parsed form.
pub fn url(raw: &str, limits: &Limits) -> Result<Url, ErrorInfo> {
    if raw.len() > limits.max_url_len {
        return Err(err(
            ErrorCode::InvalidUrl,
            format!("URL is {} bytes long; the limit is {}", raw.len(), limits.max_url_len),
        ));
    }
    let scheme = raw.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
    let parsed = Url::parse(raw);
    let scheme = parsed.as_ref().map(|u| u.scheme().to_owned()).ok().or(scheme);
    if let Some(s) = &scheme
        && s != "http"
        && s != "https"
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return Err(err(ErrorCode::UnsupportedScheme, format!("only http and https URLs are supported (got {s:?})")));
    }
    let url = parsed.map_err(|e| err(ErrorCode::InvalidUrl, format!("invalid URL {:?}: {e}", redact::url(raw))))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(err(ErrorCode::InvalidUrl, format!("URL {:?} has no host", redact::url(raw))));
    }
    Ok(url)
}

pub fn headers(headers: &[Header], limits: &Limits) -> Result<(), ErrorInfo> {
    if headers.len() > limits.max_headers_per_task as usize {
        return Err(err(
            ErrorCode::InvalidRequest,
            format!("{} headers given; the limit is {}", headers.len(), limits.max_headers_per_task),
        ));
    }
    for h in headers {
        dlsession_proto::validate::header(&h.name, &h.value)?;
    }
    Ok(())
}

/// The daemon's own places, never a task's destination: its cache directory (partial and
/// finished files), its state directory (the database, launch logs), its socket and the
/// socket's lock. Replacing the database by a download lost every session.
#[derive(Debug, Clone)]
pub struct OwnPlaces {
    /// As configured, and as resolved when the daemon started (symlinks followed).
    dirs: Vec<(PathBuf, &'static str)>,
    files: Vec<(PathBuf, &'static str)>,
}

impl OwnPlaces {
    /// Resolved now: call once the directories exist.
    pub fn of(cfg: &Config) -> OwnPlaces {
        OwnPlaces::resolved(
            vec![
                (cfg.cache_dir.clone(), "dlsessiond's cache directory"),
                (cfg.state_dir.clone(), "dlsessiond's state directory"),
            ],
            vec![(cfg.socket.clone(), "dlsessiond's socket"), (cfg.socket_lock_path(), "dlsessiond's socket lock")],
        )
    }

    pub(crate) fn resolved(dirs: Vec<(PathBuf, &'static str)>, files: Vec<(PathBuf, &'static str)>) -> OwnPlaces {
        let both = |places: Vec<(PathBuf, &'static str)>| {
            let resolved: Vec<_> = places
                .iter()
                .filter_map(|(p, what)| Some((resolve(p).ok()?, *what)))
                .filter(|r| !places.contains(r))
                .collect();
            places.into_iter().chain(resolved).collect()
        };
        OwnPlaces { dirs: both(dirs), files: both(files) }
    }

    /// Refuses a destination that names one of these places as written (no disk access).
    fn refuse_as_written(&self, dest: &str) -> Result<(), ErrorInfo> {
        self.refuse(dest, Path::new(dest))
    }

    /// Refuses a destination that is one of these places once the symlinks of its
    /// directories are resolved (as far as they exist): reads the disk. Its own name is
    /// not followed: the move replaces a link there, not what it points to.
    pub fn refuse_on_disk(&self, dest: &str) -> Result<(), ErrorInfo> {
        let path = Path::new(dest);
        let resolved = match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) => resolve(dir).map(|dir| dir.join(name)),
            _ => resolve(path),
        };
        match resolved {
            Ok(resolved) => self.refuse(dest, &resolved),
            // What cannot be resolved is checked as written (the move fails on it anyway).
            Err(_) => self.refuse_as_written(dest),
        }
    }

    fn refuse(&self, dest: &str, path: &Path) -> Result<(), ErrorInfo> {
        let inside = self.dirs.iter().find(|(dir, _)| path.starts_with(dir)).map(|(_, what)| *what);
        let same = || self.files.iter().find(|(file, _)| path == file).map(|(_, what)| *what);
        match inside.or_else(same) {
            Some(what) => Err(err(
                ErrorCode::InvalidRequest,
                format!(
                    "destination {dest:?} is {what} or inside it; leave the destination unset to keep the file in the cache"
                ),
            )),
            None => Ok(()),
        }
    }
}

/// `path` with the symlinks of its longest existing part resolved and the rest appended.
fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let mut rest = Vec::new();
    let mut existing = path;
    loop {
        match std::fs::canonicalize(existing) {
            Ok(resolved) => return Ok(rest.iter().rev().fold(resolved, |p, name| p.join(name))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else { return Err(e) };
                rest.push(name);
                existing = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Checks one task; `own` are the daemon's own places (never a destination).
pub fn task(spec: &TaskSpec, limits: &Limits, own: &OwnPlaces) -> Result<Url, ErrorInfo> {
    let parsed = url(&spec.url, limits)?;
    headers(&spec.headers, limits)?;
    if !spec.priority.is_finite() || !(0.0..=1.0).contains(&spec.priority) {
        return Err(err(
            ErrorCode::InvalidRequest,
            format!("priority must be between 0.0 and 1.0, got {}", spec.priority),
        ));
    }
    if spec.description.as_ref().is_some_and(|d| d.len() > MAX_DESCRIPTION) {
        return Err(err(ErrorCode::InvalidRequest, format!("description exceeds {MAX_DESCRIPTION} bytes")));
    }
    if let Some(dest) = &spec.destination {
        destination(dest)?;
        own.refuse_as_written(dest)?;
    }
    Ok(parsed)
}

/// An upload's request and the shape of its file's path (the file itself is checked on a
/// blocking thread: `disk::upload_file`).
pub fn upload(spec: &UploadSpec, limits: &Limits, own: &OwnPlaces) -> Result<Url, ErrorInfo> {
    let parsed = task(&spec.request, limits, own)?;
    let r = &spec.request;
    let download_only = [
        ("expected_sha256", r.expected_sha256.is_some()),
        ("destination", r.destination.is_some()),
        ("overwrite", r.overwrite),
        ("expected_size", r.expected_size.is_some()),
    ];
    if let Some((name, _)) = download_only.iter().find(|(_, set)| *set) {
        return Err(err(ErrorCode::InvalidRequest, format!("{name} is for downloads; an upload cannot have it")));
    }
    let path = Path::new(&spec.file);
    if !path.is_absolute() || spec.file.contains('\0') {
        return Err(err(
            ErrorCode::InvalidRequest,
            format!("the file to upload must be an absolute path, got {:?}", spec.file),
        ));
    }
    if let Some(h) = r.headers.iter().find(|h| dlsession_proto::validate::is_upload_framing_header(&h.name)) {
        return Err(err(
            ErrorCode::InvalidRequest,
            format!("header {:?} is the daemon's to set for an upload (it frames the body)", h.name),
        ));
    }
    Ok(parsed)
}

/// Linux's limits on a path and on one of its names, in bytes.
const PATH_MAX: usize = libc::PATH_MAX as usize;
const NAME_MAX: usize = libc::NAME_MAX as usize;

/// The shape of a destination path (no disk access; see `destination_on_disk`).
fn destination(dest: &str) -> Result<(), ErrorInfo> {
    let path = Path::new(dest);
    if !path.is_absolute() {
        return Err(err(ErrorCode::InvalidRequest, format!("destination must be an absolute path, got {dest:?}")));
    }
    // (`file_name` forgives a trailing `/` or `/.`, which the move would not.)
    if dest.contains('\0') || path.file_name().is_none() || dest.ends_with('/') || dest.ends_with("/.") {
        return Err(err(ErrorCode::InvalidRequest, format!("destination {dest:?} does not name a file")));
    }
    // What no filesystem here takes fails at the move, after the whole download.
    if dest.len() >= PATH_MAX || path.components().any(|c| c.as_os_str().len() > NAME_MAX) {
        return Err(err(
            ErrorCode::InvalidRequest,
            format!("destination {dest:?} is too long ({PATH_MAX} bytes, {NAME_MAX} per name at most)"),
        ));
    }
    if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(err(ErrorCode::InvalidRequest, format!("destination {dest:?} must not contain '..'")));
    }
    Ok(())
}

pub fn session_config(c: &SessionConfig, limits: &Limits) -> Result<(), ErrorInfo> {
    let bad = |m: String| Err(err(ErrorCode::InvalidRequest, m));
    if let Some(app_id) = &c.app_id
        && (app_id.is_empty() || app_id.len() > 255 || app_id.chars().any(char::is_control))
    {
        return bad(format!("invalid app_id {app_id:?}: 1-255 bytes without control characters"));
    }
    match &c.launch {
        None => {}
        Some(LaunchSpec::Command { argv }) => {
            let Some(program) = argv.first() else { return bad("launch command is empty".into()) };
            if program.is_empty() {
                return bad("launch command has an empty program name".into());
            }
            // The app starts in the user's home: a path relative to wherever it was given
            // would name another file, or none.
            if program.contains('/') && !program.starts_with('/') {
                return bad(format!(
                    "launch command's program {program:?} is a relative path: give an absolute one (or a bare name, looked up in PATH)"
                ));
            }
            if argv.len() > 256 || argv.iter().map(String::len).sum::<usize>() > 65536 {
                return bad("launch command is too long (256 arguments, 64 KiB at most)".into());
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return bad("launch command arguments must not contain NUL".into());
            }
        }
        Some(LaunchSpec::SystemdUnit { unit }) => {
            let ok = |ch: char| ch.is_ascii_alphanumeric() || ":_.@-\\".contains(ch);
            if unit.is_empty() || unit.len() > 255 || !unit.chars().all(ok) || !unit.contains('.') {
                return bad(format!("invalid systemd unit name {unit:?}"));
            }
        }
        Some(LaunchSpec::DesktopApp { app_id }) if !crate::activation::is_application_id(app_id) => {
            return bad(format!(
                "invalid desktop application id {app_id:?}: a D-Bus name like org.example.App \
                 (two or more elements of letters, digits, '_' and '-', none starting with a digit)"
            ));
        }
        Some(LaunchSpec::DesktopApp { .. }) => {}
    }
    headers(&c.http_headers, limits)?;
    if c.timeout_for_request_ms < 100 {
        return bad("timeout_for_request must be at least 100 ms".into());
    }
    if c.timeout_for_resource_ms < 1000 {
        return bad("timeout_for_resource must be at least 1 s".into());
    }
    if !(1..=256).contains(&c.max_connections_per_host) {
        return bad(format!("max_connections_per_host must be 1-256, got {}", c.max_connections_per_host));
    }
    if c.max_concurrent_tasks == Some(0) {
        return bad("max_concurrent_tasks must be at least 1 (or unset)".into());
    }
    if c.bandwidth_limit.is_some_and(|b| b < dlsession_proto::validate::MIN_BANDWIDTH_LIMIT) {
        return bad("bandwidth_limit must be at least 1024 bytes per second (or unset)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::for_tests(4, 8)
    }

    #[test]
    fn urls() {
        let l = limits();
        assert!(url("http://127.0.0.1:8080/a", &l).is_ok());
        assert!(url("https://example.org/a?b=c", &l).is_ok());
        for (raw, code) in [
            ("file:///etc/passwd", ErrorCode::UnsupportedScheme),
            ("ftp://example.org/x", ErrorCode::UnsupportedScheme),
            ("data:text/plain,hi", ErrorCode::UnsupportedScheme),
            ("FILE:///etc/passwd", ErrorCode::UnsupportedScheme),
            ("not a url", ErrorCode::InvalidUrl),
            ("http://", ErrorCode::InvalidUrl),
            ("", ErrorCode::InvalidUrl),
        ] {
            assert_eq!(url(raw, &l).unwrap_err().code, code, "{raw}");
        }
        let long = format!("http://example.org/{}", "a".repeat(200));
        assert_eq!(url(&long, &l).unwrap_err().code, ErrorCode::InvalidUrl);
        let msg = url("http://user:hunter2@[bad/x", &l).unwrap_err().message;
        assert!(!msg.contains("hunter2"), "{msg}");
        let msg = url("file:///x", &l).unwrap_err().message;
        assert!(msg.contains("only http and https URLs are supported (got \"file\")"), "{msg}");
    }

    #[test]
    fn header_injection_is_refused() {
        let l = limits();
        assert!(headers(&[Header::new("X-Ok", "fine\tvalue")], &l).is_ok());
        for h in [
            Header::new("X-Evil", "a\r\nInjected: yes"),
            Header::new("X-Evil", "a\nb"),
            Header::new("X-Nul", "a\0b"),
            Header::new("Bad Name", "v"),
            Header::new("", "v"),
            Header::new("Host", "evil.example"),
            Header::new("Transfer-Encoding", "chunked"),
            Header::new("connection", "close"),
            Header::new("Range", "bytes=0-"),
        ] {
            assert_eq!(headers(std::slice::from_ref(&h), &l).unwrap_err().code, ErrorCode::InvalidRequest, "{h:?}");
        }
        let secret = Header::new("Authorization", "Bearer s3cret\r\n");
        let msg = headers(&[secret], &l).unwrap_err().message;
        assert!(!msg.contains("s3cret"), "the value is never echoed: {msg}");
        let many: Vec<Header> = (0..5).map(|i| Header::new(format!("X-{i}"), "v")).collect();
        assert!(headers(&many, &l).is_err());
    }

    #[test]
    fn destinations() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let existing = dir.path().join("exists");
        std::fs::write(&existing, b"x").unwrap();
        let ok = dir.path().join("new");
        assert!(destination(ok.to_str().unwrap()).is_ok());
        assert_eq!(destination("relative/path").unwrap_err().code, ErrorCode::InvalidRequest);
        assert!(destination(existing.to_str().unwrap()).is_ok(), "no disk access here");
        assert_eq!(destination("/tmp/../etc/passwd").unwrap_err().code, ErrorCode::InvalidRequest);
        let own = OwnPlaces::resolved(vec![(cache.clone(), "the cache")], Vec::new());
        let inside = cache.join("downloads/s1/1.part");
        assert_eq!(own.refuse_as_written(inside.to_str().unwrap()).unwrap_err().code, ErrorCode::InvalidRequest);
    }

    /// The daemon's own places are refused as destinations also through a symlink, and its
    /// socket and lock by name (their directory is the user's runtime directory).
    #[test]
    fn own_places_are_never_destinations() {
        let dir = tempfile::tempdir().unwrap();
        let (state, run) = (dir.path().join("state"), dir.path().join("run"));
        std::fs::create_dir_all(&state).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&state, &link).unwrap();
        let socket = run.join("dlsessiond.sock");
        let own =
            OwnPlaces::resolved(vec![(state.clone(), "the state directory")], vec![(socket.clone(), "the socket")]);
        let refused = |dest: &Path| own.refuse_on_disk(dest.to_str().unwrap()).map_err(|e| e.code);
        assert_eq!(refused(&state.join("dlsessiond.db")), Err(ErrorCode::InvalidRequest));
        let through_link = link.join("dlsessiond.db");
        assert!(own.refuse_as_written(through_link.to_str().unwrap()).is_ok(), "as written it is elsewhere");
        assert_eq!(refused(&through_link), Err(ErrorCode::InvalidRequest), "resolved it is the database");
        assert_eq!(refused(&link.join("new/dir/file")), Err(ErrorCode::InvalidRequest), "missing directories too");
        assert_eq!(refused(&socket), Err(ErrorCode::InvalidRequest));
        assert_eq!(refused(&run.join("other.bin")), Ok(()), "the socket's directory is the user's");
        assert_eq!(refused(&dir.path().join("elsewhere/file")), Ok(()));
        // A destination that is itself a link into the state directory is replaced by the
        // move, not written through: allowed.
        let pointing = dir.path().join("pointing");
        std::os::unix::fs::symlink(state.join("dlsessiond.db"), &pointing).unwrap();
        assert_eq!(refused(&pointing), Ok(()));
        let message = own.refuse_on_disk(through_link.to_str().unwrap()).unwrap_err().message;
        assert!(message.contains("the state directory"), "{message}");
    }

    #[test]
    fn configs() {
        let l = limits();
        assert!(session_config(&SessionConfig::default(), &l).is_ok());
        let mut c = SessionConfig { launch: Some(LaunchSpec::Command { argv: vec![] }), ..SessionConfig::default() };
        assert!(session_config(&c, &l).is_err());
        c.launch = Some(LaunchSpec::SystemdUnit { unit: "app@.service".into() });
        assert!(session_config(&c, &l).is_ok());
        c.launch = Some(LaunchSpec::SystemdUnit { unit: "app;rm -rf".into() });
        assert!(session_config(&c, &l).is_err());
        let c = SessionConfig { max_connections_per_host: 0, ..SessionConfig::default() };
        assert!(session_config(&c, &l).is_err());
    }
}
