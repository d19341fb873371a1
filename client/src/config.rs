//! What an app sets up: a session's configuration and a download's request (builders
//! over the wire types `SessionConfig` and `TaskSpec`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use dlsession_proto::{Header, LaunchSpec, Request, SessionConfig, TaskPolicy, TaskSpec, UploadMethod, UploadSpec};

/// How a background session is set up. The configuration is stored with the session.
/// Attaching again changes only what the app sets on it: a part left unset keeps its
/// stored value (an app relaunched to collect may attach with just the identifier and keep
/// its launch command), and the `no_…` setters clear one.
///
/// A launch command (or systemd unit) is all a relaunch needs; `app_id` matters only for
/// waking an app that is already running ([`crate::Client::handle_wakes`]).
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
    /// Which parts of `config` the app set (or cleared): only those replace what the
    /// session has stored.
    set: Fields,
    /// Policy parts the app set (`None`: keep the stored one).
    pub(crate) allows_metered: Option<bool>,
    pub(crate) allows_battery: Option<bool>,
    pub(crate) discretionary: Option<bool>,
    pub(crate) waits_for_connectivity: Option<bool>,
    pub(crate) notify: Option<bool>,
    /// Whether the session keeps cookies (`None`: as stored).
    pub(crate) cookies: Option<bool>,
    /// Whether the session asks the app about challenges (`None`: as stored).
    pub(crate) challenges: Option<bool>,
    /// The session's client certificate (`None`: as stored; `Some(None)`: none).
    pub(crate) client_cert: Option<Option<dlsession_proto::ClientCertificate>>,
    /// The session's own proxy (`None`: as stored; `Some(None)`: the environment's).
    pub(crate) proxy: Option<Option<dlsession_proto::SessionProxy>>,
    pub(crate) socket: Option<PathBuf>,
    pub(crate) takeover: bool,
    pub(crate) client_name: Option<String>,
}

/// The parts of a session's configuration an app may set, each on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Fields {
    app_id: bool,
    launch: bool,
    headers: bool,
    timeout_for_request: bool,
    timeout_for_resource: bool,
    max_connections_per_host: bool,
    max_concurrent_tasks: bool,
    bandwidth_limit: bool,
}

impl SessionConfiguration {
    /// A background session named `identifier` (reverse-DNS recommended, e.g.
    /// `org.example.photos.background`), with the defaults of docs/behaviour.md, "Sessions".
    pub fn background(identifier: impl Into<String>) -> SessionConfiguration {
        SessionConfiguration {
            identifier: identifier.into(),
            config: SessionConfig::default(),
            set: Fields::default(),
            allows_metered: None,
            allows_battery: None,
            discretionary: None,
            waits_for_connectivity: None,
            notify: None,
            cookies: None,
            challenges: None,
            client_cert: None,
            proxy: None,
            socket: None,
            takeover: false,
            client_name: None,
        }
    }

    /// The session's identifier.
    pub fn identifier(&self) -> &str {
        &self.identifier
    }

    /// The app the daemon wakes when this session has finished events.
    pub fn app_id(mut self, app_id: impl Into<String>) -> Self {
        self.config.app_id = Some(app_id.into());
        self.set.app_id = true;
        self
    }

    /// No app to wake (clears a stored `app_id`).
    pub fn no_app_id(mut self) -> Self {
        self.config.app_id = None;
        self.set.app_id = true;
        self
    }

    /// Relaunch the app with this argv (run directly, no shell, in the user's home
    /// directory) when it is not running. The program is an absolute path or a bare name
    /// looked up in `PATH`; a relative path (`./app`) is refused when attaching
    /// (`invalid_request`).
    pub fn launch_command<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.launch = Some(LaunchSpec::Command { argv: argv.into_iter().map(Into::into).collect() });
        self.set.launch = true;
        self
    }

    /// Relaunch the app with `systemctl --user start UNIT` (a template gets the identifier).
    pub fn systemd_unit(mut self, unit: impl Into<String>) -> Self {
        self.config.launch = Some(LaunchSpec::SystemdUnit { unit: unit.into() });
        self.set.launch = true;
        self
    }

    /// Relaunch the app as a desktop application: `ActivateAction("dlsession-events",
    /// [identifier])` of `org.freedesktop.Application` on the session bus, which D-Bus
    /// activation starts from its `.desktop` file (`DBusActivatable=true`), else the file's
    /// `Exec` line. `app_id` is the application id (`org.example.App`). The app tells the
    /// action from others with [`crate::session_of_action`].
    pub fn desktop_app(mut self, app_id: impl Into<String>) -> Self {
        self.config.launch = Some(LaunchSpec::DesktopApp { app_id: app_id.into() });
        self.set.launch = true;
        self
    }

    /// Never relaunch the app (clears a stored launch command or unit).
    pub fn no_launch(mut self) -> Self {
        self.config.launch = None;
        self.set.launch = true;
        self
    }

    /// A header added to every request of the session. The headers given replace the
    /// stored ones as a whole.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.http_headers.push(Header::new(name, value));
        self.set.headers = true;
        self
    }

    /// No session headers (clears the stored ones).
    pub fn no_headers(mut self) -> Self {
        self.config.http_headers.clear();
        self.set.headers = true;
        self
    }

    /// Idle timeout: an attempt fails (and is retried) after this long without data.
    pub fn timeout_for_request(mut self, timeout: Duration) -> Self {
        self.config.timeout_for_request_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.set.timeout_for_request = true;
        self
    }

    /// The whole budget of a task, retries included.
    pub fn timeout_for_resource(mut self, timeout: Duration) -> Self {
        self.config.timeout_for_resource_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.set.timeout_for_resource = true;
        self
    }

    /// Connections to one host (and port) at once, across the session's tasks (1–256).
    pub fn max_connections_per_host(mut self, n: u32) -> Self {
        self.config.max_connections_per_host = n;
        self.set.max_connections_per_host = true;
        self
    }

    /// Tasks of the session running at once (unlimited by default).
    pub fn max_concurrent_tasks(mut self, n: u32) -> Self {
        self.config.max_concurrent_tasks = Some(n);
        self.set.max_concurrent_tasks = true;
        self
    }

    /// No limit on the session's tasks running at once (clears the stored one).
    pub fn no_max_concurrent_tasks(mut self) -> Self {
        self.config.max_concurrent_tasks = None;
        self.set.max_concurrent_tasks = true;
        self
    }

    /// Bytes per second for the whole session.
    pub fn bandwidth_limit(mut self, bytes_per_second: u64) -> Self {
        self.config.bandwidth_limit = Some(bytes_per_second);
        self.set.bandwidth_limit = true;
        self
    }

    /// Whether the session's tasks may download over a metered network (default: yes).
    /// With `false` they wait (`metered_network`) while NetworkManager says the network is
    /// metered, like `URLSession`'s `allowsExpensiveNetworkAccess`.
    pub fn allows_metered(mut self, allowed: bool) -> Self {
        self.allows_metered = Some(allowed);
        self
    }

    /// Whether the session's tasks may download on battery power (default: yes). With
    /// `false` they wait (`on_battery`) while UPower says the machine runs on battery.
    pub fn allows_battery(mut self, allowed: bool) -> Self {
        self.allows_battery = Some(allowed);
        self
    }

    /// Only in good conditions (default: no): an unmetered network, and AC power or a
    /// battery at 50 % or more; like `URLSession`'s `isDiscretionary`.
    pub fn discretionary(mut self, discretionary: bool) -> Self {
        self.discretionary = Some(discretionary);
        self
    }

    /// Whether a task with no route to its server waits for one (default: yes, with
    /// `no_network`, spending no attempts). With `false` it completes with `not_connected`
    /// instead, like `URLSession` with `waitsForConnectivity` off.
    pub fn waits_for_connectivity(mut self, waits: bool) -> Self {
        self.waits_for_connectivity = Some(waits);
        self
    }

    /// Show a desktop notification when the session's downloads are done and the app is
    /// not running (default: no); its action relaunches the app. Bursts update one
    /// notification per session; nothing is shown without a notification server.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = Some(notify);
        self
    }

    /// Whether the session keeps the cookies servers set and sends them back, per RFC
    /// 6265, across redirects, retries and daemon restarts (default: yes, like
    /// `httpShouldSetCookies`). `false` deletes the ones it kept. The cookies are
    /// stored in the daemon's database (0600) and never shown or logged.
    pub fn cookies(mut self, keep: bool) -> Self {
        self.cookies = Some(keep);
        self
    }

    /// Whether a server's request for credentials (a 401 with `WWW-Authenticate`, a 407
    /// with `Proxy-Authenticate`) stops the task and asks the app
    /// ([`crate::SessionDelegate::did_receive_challenge`], waking or relaunching it), instead of
    /// failing the task with the 401 (the default). `false` also forgets the credentials the
    /// session holds.
    pub fn answers_challenges(mut self, answers: bool) -> Self {
        self.challenges = Some(answers);
        self
    }

    /// The client certificate (PEM: the certificate followed by any intermediates) and
    /// private key files the session's downloads present to servers that ask for one
    /// (mutual TLS). The daemon reads them when the session attaches (a file it cannot read
    /// or a key that does not match refuses the attach) and again at each start.
    pub fn client_certificate(mut self, cert_file: impl AsRef<Path>, key_file: impl AsRef<Path>) -> Self {
        let absolute =
            |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).to_string_lossy().into_owned();
        self.client_cert = Some(Some(dlsession_proto::ClientCertificate {
            cert_file: absolute(cert_file.as_ref()),
            key_file: absolute(key_file.as_ref()),
        }));
        self
    }

    /// No client certificate (the one stored is forgotten).
    pub fn no_client_certificate(mut self) -> Self {
        self.client_cert = Some(None);
        self
    }

    /// The session's own proxy, replacing the daemon's environment for its downloads
    /// (stored; `url: None` means direct). See [`SessionProxy`](dlsession_proto::SessionProxy).
    pub fn proxy(mut self, proxy: dlsession_proto::SessionProxy) -> Self {
        self.proxy = Some(Some(proxy));
        self
    }

    /// The session's downloads follow the daemon's environment (`HTTP_PROXY`, …) again.
    pub fn environment_proxy(mut self) -> Self {
        self.proxy = Some(None);
        self
    }

    /// The policy with what this configuration sets applied to `stored`; `None` if it sets
    /// nothing (the stored policy stays).
    pub(crate) fn policy_over(&self, stored: dlsession_proto::SessionPolicy) -> Option<dlsession_proto::SessionPolicy> {
        if self.allows_metered.is_none()
            && self.allows_battery.is_none()
            && self.discretionary.is_none()
            && self.waits_for_connectivity.is_none()
            && self.notify.is_none()
        {
            return None;
        }
        Some(dlsession_proto::SessionPolicy {
            allows_metered: self.allows_metered.unwrap_or(stored.allows_metered),
            allows_battery: self.allows_battery.unwrap_or(stored.allows_battery),
            discretionary: self.discretionary.unwrap_or(stored.discretionary),
            waits_for_connectivity: self.waits_for_connectivity.unwrap_or(stored.waits_for_connectivity),
            notify: self.notify.unwrap_or(stored.notify),
        })
    }

    /// No bandwidth limit (clears a stored one).
    pub fn no_bandwidth_limit(mut self) -> Self {
        self.config.bandwidth_limit = None;
        self.set.bandwidth_limit = true;
        self
    }

    /// Connect to this socket instead of the default. A relative path is taken from the
    /// current directory now: reconnects and daemon starts come later, after a `chdir`.
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        // Only an empty path (or no current directory) fails: connecting then says why. A
        // socket's address holds 107 bytes: one too long made absolute stays as given.
        self.socket = Some(match std::path::absolute(&path) {
            Ok(absolute) if absolute.as_os_str().len() < SOCKET_PATH_MAX => absolute,
            _ => path,
        });
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

    /// The wire form of this configuration (parts not set have their defaults).
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Whether every part was set (then nothing stored needs to be read to attach).
    pub(crate) fn sets_everything(&self) -> bool {
        let f = self.set;
        f.app_id
            && f.launch
            && f.headers
            && f.timeout_for_request
            && f.timeout_for_resource
            && f.max_connections_per_host
            && f.max_concurrent_tasks
            && f.bandwidth_limit
    }

    /// An attach sent again (after a reconnect): never a
    /// takeover (another process that took the session meanwhile keeps it), and with
    /// `stored`, the session's configuration as it is now, when it could be read: a change
    /// another client made meanwhile (`dlsessionctl limit`) stays; only the app's own attach
    /// applies what it set. Else the configuration sent the first time.
    pub(crate) fn reattach(request: Request, stored: Option<SessionConfig>) -> Request {
        match request {
            Request::Attach { identifier, config: sent, .. } => {
                Request::Attach { identifier, config: stored.unwrap_or(sent), takeover: false }
            }
            other => other,
        }
    }

    /// The configuration an attach stores: what the app set, and for the rest what
    /// `stored` (the session's configuration so far) has. An app that attaches without
    /// naming its launch command keeps the one it registered earlier.
    pub fn merged_with(&self, stored: &SessionConfig) -> SessionConfig {
        let (f, mine) = (self.set, &self.config);
        SessionConfig {
            app_id: if f.app_id { mine.app_id.clone() } else { stored.app_id.clone() },
            launch: if f.launch { mine.launch.clone() } else { stored.launch.clone() },
            http_headers: if f.headers { mine.http_headers.clone() } else { stored.http_headers.clone() },
            timeout_for_request_ms: if f.timeout_for_request {
                mine.timeout_for_request_ms
            } else {
                stored.timeout_for_request_ms
            },
            timeout_for_resource_ms: if f.timeout_for_resource {
                mine.timeout_for_resource_ms
            } else {
                stored.timeout_for_resource_ms
            },
            max_connections_per_host: if f.max_connections_per_host {
                mine.max_connections_per_host
            } else {
                stored.max_connections_per_host
            },
            max_concurrent_tasks: if f.max_concurrent_tasks {
                mine.max_concurrent_tasks
            } else {
                stored.max_concurrent_tasks
            },
            bandwidth_limit: if f.bandwidth_limit { mine.bandwidth_limit } else { stored.bandwidth_limit },
        }
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
    pub(crate) policy: TaskPolicy,
    /// Why the daemon cannot be given this request (see [`path_text`]): creating it fails.
    pub(crate) refused: Option<String>,
}

impl DownloadRequest {
    /// A GET of `url` (http or https).
    pub fn new(url: impl Into<String>) -> DownloadRequest {
        DownloadRequest { spec: TaskSpec::get(url), policy: TaskPolicy::default(), refused: None }
    }

    /// A header added to this task's requests (after the session's headers).
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
    /// A path that is not UTF-8 makes creating the task fail (`invalid_request`).
    pub fn destination(mut self, path: impl AsRef<Path>) -> Self {
        match path_text(path.as_ref(), "destination") {
            Ok(text) => self.spec.destination = Some(text),
            Err(why) => self.refused = Some(why),
        }
        self
    }

    /// Replace an existing file at the destination.
    pub fn overwrite(mut self, overwrite: bool) -> Self {
        self.spec.overwrite = overwrite;
        self
    }

    /// A hint of the file's size: shown as `bytes_expected` until the server says.
    pub fn expected_size(mut self, bytes: u64) -> Self {
        self.spec.expected_size = Some(bytes);
        self
    }

    /// Whether this task may download over a metered network, whatever its session says
    /// (like `URLRequest`'s `allowsExpensiveNetworkAccess`). Unset, it follows the session.
    pub fn allows_metered(mut self, allowed: bool) -> Self {
        self.policy.allows_metered = Some(allowed);
        self
    }

    /// Whether this task may download on battery power, whatever its session says.
    pub fn allows_battery(mut self, allowed: bool) -> Self {
        self.policy.allows_battery = Some(allowed);
        self
    }

    /// Whether this task waits for good conditions (an unmetered network, and AC power or
    /// a battery at 50 % or more), whatever its session says.
    pub fn discretionary(mut self, discretionary: bool) -> Self {
        self.policy.discretionary = Some(discretionary);
        self
    }

    /// Whether this task waits for a route to its server (`no_network`) or completes with
    /// `not_connected`, whatever its session says.
    pub fn waits_for_connectivity(mut self, waits: bool) -> Self {
        self.policy.waits_for_connectivity = Some(waits);
        self
    }

    /// The task's own policy (fields left unset follow the session's).
    pub fn policy(&self) -> TaskPolicy {
        self.policy
    }

    /// The wire form of the request.
    pub fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    /// The wire form of the request, taken.
    pub fn into_spec(self) -> TaskSpec {
        self.spec
    }
}

/// An upload of a file (like `URLSession`'s `uploadTask(with:fromFile:)`): a PUT by
/// default. The daemon records the file's size and modification time when the task is
/// created; a file changed afterwards fails the upload instead of sending a mix. The
/// server's response reaches [`crate::SessionDelegate::did_receive_upload_response`].
#[derive(Debug, Clone)]
pub struct UploadRequest {
    pub(crate) spec: UploadSpec,
    /// As [`DownloadRequest::refused`].
    pub(crate) refused: Option<String>,
}

impl UploadRequest {
    /// A PUT of `file` to `url` (http or https). A relative path is taken from the current
    /// directory.
    pub fn new(url: impl Into<String>, file: impl AsRef<Path>) -> UploadRequest {
        let file = std::path::absolute(file.as_ref()).unwrap_or_else(|_| file.as_ref().to_path_buf());
        let (text, refused) = match path_text(&file, "file") {
            Ok(text) => (text, None),
            Err(why) => (String::new(), Some(why)),
        };
        UploadRequest {
            spec: UploadSpec { request: TaskSpec::get(url), method: UploadMethod::Put, file: text, idempotent: false },
            refused,
        }
    }

    /// PUT (the default) or POST. A POST is sent again after a failure only when
    /// [`UploadRequest::idempotent`] says it may be, when the server offered to resume it,
    /// or when its body had not gone out whole.
    pub fn method(mut self, method: UploadMethod) -> Self {
        self.spec.method = method;
        self
    }

    /// The server treats this POST as one however often it arrives: retry it like a PUT.
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.spec.idempotent = idempotent;
        self
    }

    /// A header added to this task's requests (after the session's headers).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.request.headers.push(Header::new(name, value));
        self
    }

    /// The body's `Content-Type`.
    pub fn content_type(self, value: impl Into<String>) -> Self {
        self.header("Content-Type", value)
    }

    /// Free text kept with the task: a key to find it again.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.spec.request.description = Some(text.into());
        self
    }

    /// 0.0 (lowest) to 1.0 (highest).
    pub fn priority(mut self, priority: f32) -> Self {
        self.spec.request.priority = priority;
        self
    }

    /// Do not start before this time.
    pub fn earliest_begin(mut self, at: SystemTime) -> Self {
        self.spec.request.earliest_begin =
            at.duration_since(UNIX_EPOCH).ok().map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// The wire form of the request.
    pub fn spec(&self) -> &UploadSpec {
        &self.spec
    }
}

/// A path as the daemon takes it (text, on the wire), or why it cannot be: one that is
/// not UTF-8 would, made text, name another file.
pub(crate) fn path_text(path: &Path, what: &str) -> std::result::Result<String, String> {
    path.to_str().map(str::to_owned).ok_or_else(|| {
        format!(
            "{what} {} is not UTF-8: paths go to the daemon as text, and this one would name another file",
            path.display()
        )
    })
}

/// The longest path a Unix socket's address holds (`sun_path` is 108 bytes with its NUL).
const SOCKET_PATH_MAX: usize = 108;

#[cfg(test)]
mod tests {
    use super::SessionConfiguration;

    /// A relative socket path names the same socket after the app changes directory.
    #[test]
    fn a_relative_socket_is_taken_from_the_directory_at_the_call() {
        let config = SessionConfiguration::background("org.example.relative").socket("run/dls.sock");
        let here = std::env::current_dir().expect("a current directory");
        assert_eq!(config.socket.as_deref(), Some(here.join("run/dls.sock").as_path()));
    }
}
