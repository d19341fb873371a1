//! What an app sets up: a session's configuration and a download's request (builders
//! over the wire types `SessionConfig` and `TaskSpec`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use dlsession_proto::{Header, LaunchSpec, SessionConfig, TaskSpec};

/// How a background session is set up. The configuration is stored with the session
/// and replaced each time an app attaches with a new one.
///
/// ```
/// use std::time::Duration;
/// use dlsession::SessionConfiguration;
///
/// let config = SessionConfiguration::background("org.example.photos.background")
///     .app_id("org.example.photos")
///     .launch_command(["/usr/bin/photos", "--collect-downloads"])
///     .header("User-Agent", "photos/2.1")
///     .timeout_for_request(Duration::from_secs(30))
///     .max_connections_per_host(4);
/// assert_eq!(config.identifier(), "org.example.photos.background");
/// assert_eq!(config.config().max_connections_per_host, 4);
/// assert_eq!(config.config().timeout_for_request_ms, 30_000);
/// ```
#[derive(Debug, Clone)]
pub struct SessionConfiguration {
    pub(crate) identifier: String,
    pub(crate) config: SessionConfig,
    pub(crate) socket: Option<PathBuf>,
    pub(crate) takeover: bool,
    pub(crate) client_name: Option<String>,
}

impl SessionConfiguration {
    /// A background session named `identifier` (reverse-DNS recommended, e.g.
    /// `org.example.photos.background`), with the defaults of docs/behaviour.md, "Sessions".
    pub fn background(identifier: impl Into<String>) -> SessionConfiguration {
        SessionConfiguration {
            identifier: identifier.into(),
            config: SessionConfig::default(),
            socket: None,
            takeover: false,
            client_name: None,
        }
    }

    pub fn identifier(&self) -> &str {
        &self.identifier
    }

    /// The app the daemon wakes when this session has finished events.
    pub fn app_id(mut self, app_id: impl Into<String>) -> Self {
        self.config.app_id = Some(app_id.into());
        self
    }

    /// Relaunch the app with this argv (run directly, no shell) when it is not running.
    pub fn launch_command<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.launch = Some(LaunchSpec::Command { argv: argv.into_iter().map(Into::into).collect() });
        self
    }

    /// Relaunch the app with `systemctl --user start UNIT` (a template gets the identifier).
    pub fn systemd_unit(mut self, unit: impl Into<String>) -> Self {
        self.config.launch = Some(LaunchSpec::SystemdUnit { unit: unit.into() });
        self
    }

    /// A header added to every request of the session.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.http_headers.push(Header::new(name, value));
        self
    }

    /// Idle timeout: an attempt fails (and is retried) after this long without data.
    pub fn timeout_for_request(mut self, timeout: Duration) -> Self {
        self.config.timeout_for_request_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// The whole budget of a task, retries included.
    pub fn timeout_for_resource(mut self, timeout: Duration) -> Self {
        self.config.timeout_for_resource_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }

    pub fn max_connections_per_host(mut self, n: u32) -> Self {
        self.config.max_connections_per_host = n;
        self
    }

    pub fn max_concurrent_tasks(mut self, n: u32) -> Self {
        self.config.max_concurrent_tasks = Some(n);
        self
    }

    /// Bytes per second for the whole session.
    pub fn bandwidth_limit(mut self, bytes_per_second: u64) -> Self {
        self.config.bandwidth_limit = Some(bytes_per_second);
        self
    }

    /// Connect to this socket instead of the default.
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// Take the session over if another process is attached (it gets `detached`).
    pub fn takeover(mut self, takeover: bool) -> Self {
        self.takeover = takeover;
        self
    }

    /// The name shown for this client in the daemon's logs and `dlsessionctl`.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = Some(name.into());
        self
    }

    /// The wire form of the stored configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }
}

/// One download to create.
///
/// ```
/// use dlsession::DownloadRequest;
///
/// let request = DownloadRequest::new("https://example.org/big.iso")
///     .description("big.iso for the photo library")
///     .priority(0.9)
///     .expected_sha256_hex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")?
///     .destination("/tmp/big.iso");
/// assert_eq!(request.spec().priority, 0.9);
/// assert!(DownloadRequest::new("x").expected_sha256_hex("not hex").is_err());
/// # Ok::<(), dlsession::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct DownloadRequest {
    pub(crate) spec: TaskSpec,
}

impl DownloadRequest {
    pub fn new(url: impl Into<String>) -> DownloadRequest {
        DownloadRequest { spec: TaskSpec::get(url) }
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.headers.push(Header::new(name, value));
        self
    }

    /// Free text kept with the task (like `taskDescription`): a key to find it again.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.spec.description = Some(text.into());
        self
    }

    /// 0.0 (lowest) to 1.0 (highest).
    pub fn priority(mut self, priority: f32) -> Self {
        self.spec.priority = priority;
        self
    }

    /// Do not start before this time.
    pub fn earliest_begin(mut self, at: SystemTime) -> Self {
        self.spec.earliest_begin =
            at.duration_since(UNIX_EPOCH).ok().map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// The SHA-256 the finished file must have (else it completes with `checksum_mismatch`).
    pub fn expected_sha256(mut self, digest: [u8; 32]) -> Self {
        self.spec.expected_sha256 = Some(digest);
        self
    }

    /// The same, as 64 hex digits.
    pub fn expected_sha256_hex(self, hex: &str) -> Result<Self> {
        let digest = dlsession_proto::validate::parse_sha256_hex(hex).map_err(Error::Invalid)?;
        Ok(self.expected_sha256(digest))
    }

    /// Move the finished file here (an absolute path) instead of leaving it in the cache.
    pub fn destination(mut self, path: impl AsRef<Path>) -> Self {
        self.spec.destination = Some(path.as_ref().to_string_lossy().into_owned());
        self
    }

    /// Replace an existing file at the destination.
    pub fn overwrite(mut self, overwrite: bool) -> Self {
        self.spec.overwrite = overwrite;
        self
    }

    pub fn expected_size(mut self, bytes: u64) -> Self {
        self.spec.expected_size = Some(bytes);
        self
    }

    pub fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    pub fn into_spec(self) -> TaskSpec {
        self.spec
    }
}
