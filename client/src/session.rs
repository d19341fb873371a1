//! Sessions, tasks and the delegate.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::connection::{Client, ClientOptions, Routed};
use crate::error::{Error, Result};
use dlsession_proto::{
    DetachReason, DurableEvent, ErrorCode, ErrorInfo, Event, Header, LaunchSpec, Request, Response, SessionConfig,
    SessionInfo, TaskAction, TaskId, TaskInfo, TaskQuery, TaskSpec,
};

/// An error a task completed with (its [`ErrorInfo::code`] is one of the SPEC codes).
pub type TaskError = ErrorInfo;

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
    identifier: String,
    config: SessionConfig,
    socket: Option<PathBuf>,
    takeover: bool,
    client_name: Option<String>,
}

impl SessionConfiguration {
    /// A background session named `identifier` (reverse-DNS recommended, e.g.
    /// `org.example.photos.background`), with SPEC defaults.
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
    spec: TaskSpec,
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

/// What an app learns about its downloads. Every method has a default that does nothing.
///
/// Callbacks run one at a time, in event order, on a thread owned by the session; they
/// may block (moving a large file is fine). A durable event is acknowledged only after
/// its callback returns, so an app that crashes mid-callback gets it again on its next
/// attach: handle events idempotently (the pair task id + callback identifies each one).
pub trait SessionDelegate: Send + Sync + 'static {
    /// Progress, coalesced (at most one per task per progress interval, plus one at the end).
    fn did_write_data(
        &self,
        session: &Session,
        task: &DownloadTask,
        bytes_written: u64,
        total_bytes_written: u64,
        total_bytes_expected: Option<u64>,
    ) {
        let _ = (session, task, bytes_written, total_bytes_written, total_bytes_expected);
    }

    /// A transfer (re)started at `offset`; 0 means it had to start over. Comes before any
    /// `did_write_data` of the attempt it announces.
    fn did_resume_at_offset(&self, session: &Session, task: &DownloadTask, offset: u64, expected_total: Option<u64>) {
        let _ = (session, task, offset, expected_total);
    }

    /// The file is complete at `location`. Move it before returning; whatever is left in
    /// dlsessiond's cache afterwards is deleted.
    fn did_finish_downloading_to(&self, session: &Session, task: &DownloadTask, location: &Path) {
        let _ = (session, task, location);
    }

    /// Always the last callback of a task: `None` on success.
    fn did_complete_with_error(&self, session: &Session, task: &DownloadTask, error: Option<&TaskError>) {
        let _ = (session, task, error);
    }

    /// Every event queued while the app was away has been delivered and acknowledged.
    fn did_finish_events_for_background_session(&self, session: &Session) {
        let _ = session;
    }

    /// The session was invalidated; its identifier may be reused.
    fn did_become_invalid(&self, session: &Session, error: Option<&TaskError>) {
        let _ = (session, error);
    }

    /// This process is no longer attached (taken over by another, invalidated, or the
    /// daemon shut down).
    fn did_detach(&self, session: &Session, reason: DetachReason) {
        let _ = (session, reason);
    }

    /// The connection to the daemon broke (`reason` says why: it restarted, crashed or was
    /// upgraded). The library connects again by itself; requests made meanwhile wait for
    /// it, up to their timeout. Nothing is lost: events not yet acknowledged come again.
    fn did_lose_connection(&self, session: &Session, reason: &str) {
        let _ = (session, reason);
    }

    /// Connected again and rejoined: the session's undelivered events follow (some may be
    /// ones this process already saw, if their acknowledgement was lost with the
    /// connection: handle events idempotently).
    fn did_reconnect(&self, session: &Session) {
        let _ = session;
    }

    /// Like [`SessionDelegate::did_finish_downloading_to`], but the app says whether it
    /// handled the file: [`Handled::Later`] leaves the event (and the task's later events)
    /// unacknowledged, so the file stays in the daemon's cache and the event comes again
    /// on the next attach (say, when moving it failed). The default calls
    /// `did_finish_downloading_to` and answers [`Handled::Done`].
    fn finish_downloading(&self, session: &Session, task: &DownloadTask, location: &Path) -> Handled {
        self.did_finish_downloading_to(session, task, location);
        Handled::Done
    }
}

/// What became of a delivered file (see [`SessionDelegate::finish_downloading`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Taken care of: acknowledge it (the daemon deletes what is left in its cache).
    Done,
    /// Not yet: keep it, and deliver it again on the next attach.
    Later,
}

/// What an app tells the library so it can rejoin sessions when the daemon wakes it.
///
/// Register with [`Client::handle_wakes`] on a connection that announced the app's
/// `app_id` ([`ClientOptions::app_id`]).
pub trait WakeHandler: Send + Sync + 'static {
    /// The daemon has events for session `identifier`: return its configuration and
    /// delegate to rejoin it, or `None` to ignore the wake.
    fn rejoin(&self, identifier: &str) -> Option<(SessionConfiguration, Arc<dyn SessionDelegate>)>;
}

impl Client {
    /// Rejoins sessions whenever the daemon sends `wake`, using `handler` for each
    /// session's configuration and delegate. Rejoined sessions stay attached for as long
    /// as this connection is open.
    pub fn handle_wakes(&self, handler: impl WakeHandler) {
        let mut events = self.events();
        // The daemon wakes only connections that say they rejoin; the others' apps it
        // relaunches instead.
        if let Err(e) = self.send_request(Request::HandleWakes) {
            warn!(error = %e, "cannot register for wakes");
        }
        let client = self.clone();
        tokio::spawn(async move {
            let mut joined: HashMap<String, Session> = HashMap::new();
            while let Some(event) = events.recv().await {
                let Event::Wake { identifier, .. } = event else { continue };
                // A session whose connection still routes to us is attached already.
                if joined.contains_key(&identifier) && client.is_routed(&identifier) {
                    continue;
                }
                let Some((config, delegate)) = handler.rejoin(&identifier) else {
                    debug!(%identifier, "wake ignored by the app");
                    continue;
                };
                // An earlier, detached attachment goes first, so that dropping it later
                // cannot detach the new one.
                joined.remove(&identifier);
                match Session::attach_with(&client, config, delegate).await {
                    Ok(session) => {
                        joined.insert(identifier, session);
                    }
                    Err(e) => warn!(%identifier, error = %e, "rejoining after a wake failed"),
                }
            }
        });
    }
}

#[derive(Debug)]
struct SessionShared {
    client: Client,
    identifier: String,
    /// Ownership of the client's route for `identifier`.
    route: u64,
    tasks: Mutex<HashMap<TaskId, DownloadTask>>,
}

impl Drop for SessionShared {
    /// Dropping the last handle detaches: the daemon keeps the tasks going and keeps
    /// undelivered events for the next attach.
    fn drop(&mut self) {
        // Only while still attached: a later session of the same identifier on this
        // connection owns the route (and the attachment) now.
        if self.client.unroute(&self.identifier, self.route) {
            let _ = self.client.send_request(Request::Detach { identifier: self.identifier.clone() });
        }
    }
}

/// An attached background session.
#[derive(Debug, Clone)]
pub struct Session {
    shared: Arc<SessionShared>,
}

impl Session {
    /// Connects to the daemon and attaches to (creating or rejoining) the session.
    pub async fn attach(config: SessionConfiguration, delegate: impl SessionDelegate) -> Result<Session> {
        let options = ClientOptions {
            socket: config.socket.clone(),
            app_id: config.config.app_id.clone(),
            client_name: config.client_name.clone().unwrap_or_else(|| ClientOptions::default().client_name),
            ..ClientOptions::default()
        };
        let client = Client::connect(options).await?;
        Session::attach_with(&client, config, Arc::new(delegate)).await
    }

    /// Attaches over an existing connection (several sessions may share one).
    pub async fn attach_with(
        client: &Client,
        config: SessionConfiguration,
        delegate: Arc<dyn SessionDelegate>,
    ) -> Result<Session> {
        dlsession_proto::validate::identifier(&config.identifier).map_err(Error::Invalid)?;
        if client.is_routed(&config.identifier) {
            return Err(Error::Invalid(ErrorInfo::new(
                ErrorCode::InvalidRequest,
                format!(
                    "session {} is already attached on this connection; drop that Session first",
                    config.identifier
                ),
            )));
        }
        let request = Request::Attach {
            identifier: config.identifier.clone(),
            config: config.config.clone(),
            takeover: config.takeover,
        };
        // Route first: the replay follows the attach response immediately.
        let handle = client.route(&config.identifier, request.clone());
        let route = handle.token;
        let session = Session {
            shared: Arc::new(SessionShared {
                client: client.clone(),
                identifier: config.identifier.clone(),
                route,
                tasks: Mutex::new(HashMap::new()),
            }),
        };
        match client.request(request).await {
            Ok(Response::Session(_)) => {}
            Ok(other) => {
                client.unroute(&config.identifier, route);
                return Err(Error::UnexpectedResponse { expected: "session", got: other.kind() });
            }
            Err(e) => {
                client.unroute(&config.identifier, route);
                return Err(e);
            }
        }
        let dispatcher = Dispatcher {
            session: Arc::downgrade(&session.shared),
            identifier: config.identifier.clone(),
            delegate,
            runtime: tokio::runtime::Handle::current(),
            pending_acks: Vec::new(),
            acks_in_flight: Vec::new(),
            kept: HashSet::new(),
            overflowed: handle.overflowed,
        };
        let events = handle.events;
        std::thread::Builder::new()
            .name(format!("dlsession-{}", config.identifier.chars().take(20).collect::<String>()))
            .spawn(move || dispatcher.run(events))
            .map_err(|e| {
                Error::Invalid(ErrorInfo::new(ErrorCode::Internal, format!("cannot start delegate thread: {e}")))
            })?;
        Ok(session)
    }

    pub fn identifier(&self) -> &str {
        &self.shared.identifier
    }

    /// The connection this session uses.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Creates a task (suspended, as in `URLSession`: call [`DownloadTask::resume`]).
    pub async fn download_task(&self, request: DownloadRequest) -> Result<DownloadTask> {
        let mut tasks = self.create(vec![request], false).await?;
        tasks.pop().ok_or(Error::UnexpectedResponse { expected: "one task id", got: "none" })
    }

    /// Creates many tasks (in requests of up to 1,000 tasks, each one transaction in the
    /// daemon); `resume` starts them.
    pub async fn download_tasks(&self, requests: Vec<DownloadRequest>, resume: bool) -> Result<Vec<DownloadTask>> {
        self.create(requests, resume).await
    }

    async fn create(&self, requests: Vec<DownloadRequest>, resume: bool) -> Result<Vec<DownloadTask>> {
        let specs: Vec<TaskSpec> = requests.into_iter().map(DownloadRequest::into_spec).collect();
        let metas: Vec<(String, Option<String>)> =
            specs.iter().map(|s| (s.url.clone(), s.description.clone())).collect();
        let ids = self.shared.client.create_tasks(&self.shared.identifier, specs, resume).await?;
        let tasks: Vec<DownloadTask> =
            ids.into_iter().zip(metas).map(|(id, (url, description))| self.task_handle(id, url, description)).collect();
        if let Ok(mut known) = self.shared.tasks.lock() {
            for t in &tasks {
                known.insert(t.id, t.clone());
            }
        }
        Ok(tasks)
    }

    /// Creates a task continuing a download cancelled with
    /// [`DownloadTask::cancel_producing_resume_data`].
    pub async fn download_task_with_resume_data(&self, resume_data: &[u8]) -> Result<DownloadTask> {
        let response = self
            .shared
            .client
            .request(Request::CreateTaskFromResumeData {
                identifier: self.shared.identifier.clone(),
                resume_data: resume_data.to_vec(),
                resume: false,
            })
            .await?;
        let Response::TasksCreated(ids) = response else {
            return Err(Error::UnexpectedResponse { expected: "tasks_created", got: response.kind() });
        };
        let id = ids.first().copied().ok_or(Error::UnexpectedResponse { expected: "one task id", got: "none" })?;
        let info = self.task_info(id).await?;
        let task = self.task_handle(id, info.url, info.description);
        if let Ok(mut known) = self.shared.tasks.lock() {
            known.insert(id, task.clone());
        }
        Ok(task)
    }

    /// Every task of the session not yet acknowledged as completed, with state and
    /// counters: what a relaunched app rebuilds its view from.
    pub async fn get_all_tasks(&self) -> Result<Vec<TaskInfo>> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let response = self
                .shared
                .client
                .request(Request::ListTasks(TaskQuery {
                    session: Some(self.shared.identifier.clone()),
                    states: Vec::new(),
                    after,
                    limit: 1000,
                }))
                .await?;
            let Response::Tasks(page) = response else {
                return Err(Error::UnexpectedResponse { expected: "tasks", got: response.kind() });
            };
            all.extend(page.tasks);
            match page.next_after {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        if let Ok(mut known) = self.shared.tasks.lock() {
            for info in &all {
                known
                    .entry(info.id)
                    .or_insert_with(|| self.task_handle(info.id, info.url.clone(), info.description.clone()));
            }
        }
        Ok(all)
    }

    /// The session as the daemon sees it (configuration, counts, pending events).
    pub async fn info(&self) -> Result<SessionInfo> {
        let response =
            self.shared.client.request(Request::GetSession { identifier: self.shared.identifier.clone() }).await?;
        match response {
            Response::Session(info) => Ok(info),
            other => Err(Error::UnexpectedResponse { expected: "session", got: other.kind() }),
        }
    }

    /// No new tasks; the session becomes invalid when its last task completes.
    pub async fn finish_tasks_and_invalidate(&self) -> Result<()> {
        self.ok(Request::FinishTasksAndInvalidate { identifier: self.shared.identifier.clone() }).await
    }

    /// Cancels every task and invalidates the session.
    pub async fn invalidate_and_cancel(&self) -> Result<()> {
        self.ok(Request::InvalidateAndCancel { identifier: self.shared.identifier.clone() }).await
    }

    /// Stops receiving events; tasks go on.
    pub async fn detach(&self) -> Result<()> {
        let r = self.ok(Request::Detach { identifier: self.shared.identifier.clone() }).await;
        self.shared.client.unroute(&self.shared.identifier, self.shared.route);
        r
    }

    async fn ok(&self, request: Request) -> Result<()> {
        match self.shared.client.request(request).await? {
            Response::Ok => Ok(()),
            other => Err(Error::UnexpectedResponse { expected: "ok", got: other.kind() }),
        }
    }

    async fn task_info(&self, id: TaskId) -> Result<TaskInfo> {
        match self.shared.client.request(Request::GetTask { task: id }).await? {
            Response::Task(detail) => Ok(detail.info),
            other => Err(Error::UnexpectedResponse { expected: "task", got: other.kind() }),
        }
    }

    fn task_handle(&self, id: TaskId, url: String, description: Option<String>) -> DownloadTask {
        DownloadTask { id, url, description, client: self.shared.client.clone() }
    }

    fn known_task(&self, id: TaskId) -> Option<DownloadTask> {
        self.shared.tasks.lock().ok()?.get(&id).cloned()
    }
}

/// A download task of a session.
#[derive(Debug, Clone)]
pub struct DownloadTask {
    id: TaskId,
    url: String,
    description: Option<String>,
    client: Client,
}

impl DownloadTask {
    /// Unique across the daemon, never reused.
    pub fn id(&self) -> TaskId {
        self.id
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    pub async fn resume(&self) -> Result<()> {
        self.control(TaskAction::Resume).await.map(|_| ())
    }

    pub async fn suspend(&self) -> Result<()> {
        self.control(TaskAction::Suspend).await.map(|_| ())
    }

    pub async fn cancel(&self) -> Result<()> {
        self.control(TaskAction::Cancel).await.map(|_| ())
    }

    /// Cancels and returns an opaque blob for [`Session::download_task_with_resume_data`].
    pub async fn cancel_producing_resume_data(&self) -> Result<Vec<u8>> {
        match self.control(TaskAction::CancelProducingResumeData).await? {
            Response::ResumeData(data) => Ok(data),
            other => Err(Error::UnexpectedResponse { expected: "resume_data", got: other.kind() }),
        }
    }

    /// State and counters, now.
    pub async fn info(&self) -> Result<TaskInfo> {
        match self.client.request(Request::GetTask { task: self.id }).await? {
            Response::Task(detail) => Ok(detail.info),
            other => Err(Error::UnexpectedResponse { expected: "task", got: other.kind() }),
        }
    }

    async fn control(&self, action: TaskAction) -> Result<Response> {
        self.client.request(Request::ControlTask { task: self.id, action }).await
    }
}

/// Runs the delegate on its own thread, in event order, acknowledging after each call.
///
/// It holds the session weakly: when the app drops its last handle, the session detaches
/// and this thread ends.
struct Dispatcher {
    session: std::sync::Weak<SessionShared>,
    identifier: String,
    delegate: Arc<dyn SessionDelegate>,
    runtime: tokio::runtime::Handle,
    pending_acks: Vec<u64>,
    /// Answers to acknowledgements sent without waiting (sent in order, at once).
    acks_in_flight: Vec<tokio::sync::oneshot::Receiver<std::result::Result<Response, ErrorInfo>>>,
    /// Tasks whose file the app kept for later (`Handled::Later`): none of their events is
    /// acknowledged in this attachment.
    kept: HashSet<TaskId>,
    /// The queue overflowed and events were dropped: ask for them again once caught up.
    overflowed: Arc<AtomicBool>,
}

/// Acknowledgements are sent in batches of at most this many.
const ACK_BATCH: usize = 64;

impl Dispatcher {
    fn run(mut self, mut events: mpsc::Receiver<Routed>) {
        loop {
            let routed = match events.try_recv() {
                Ok(e) => e,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Idle: acknowledge what has been handled, catch up on what did not fit
                    // the queue, then wait.
                    self.flush_acks(false);
                    if self.overflowed.load(Ordering::Acquire) {
                        self.ask_again();
                    }
                    match events.blocking_recv() {
                        Some(e) => e,
                        None => break,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            };
            let event = match routed {
                Routed::Event(e) => e,
                Routed::ConnectionLost(reason) => {
                    self.connection_lost(&reason);
                    continue;
                }
                Routed::Reconnected => {
                    self.reconnected();
                    continue;
                }
            };
            // A panicking delegate must not leave the session attached but deaf: the
            // daemon would never wake the app again. Its event stays unacknowledged.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(event))) {
                Ok(true) => {}
                Ok(false) => break,
                Err(_) => {
                    tracing::error!(session = %self.identifier, "the session delegate panicked; detaching (the events come again)");
                    self.flush_acks(false);
                    if let Some(shared) = self.session.upgrade()
                        && shared.client.unroute(&shared.identifier, shared.route)
                    {
                        let _ = shared.client.send_request(Request::Detach { identifier: shared.identifier.clone() });
                    }
                    return;
                }
            }
        }
        self.flush_acks(false);
        debug!(session = %self.identifier, "delegate thread exiting");
    }

    /// Returns false when the session is over for this process.
    fn handle(&mut self, event: Event) -> bool {
        let Some(shared) = self.session.upgrade() else { return false };
        let session = Session { shared };
        let d = self.delegate.clone();
        match event {
            Event::Durable { seq, event, .. } => {
                match &event {
                    DurableEvent::ResumedAtOffset { task, offset, expected_total } => {
                        let t = self.task(&session, *task);
                        d.did_resume_at_offset(&session, &t, *offset, *expected_total);
                    }
                    DurableEvent::FinishedDownloading { task, location } => {
                        let t = self.task(&session, *task);
                        if d.finish_downloading(&session, &t, Path::new(location)) == Handled::Later {
                            self.kept.insert(*task);
                        }
                    }
                    DurableEvent::Completed { task, error } => {
                        let t = self.task(&session, *task);
                        d.did_complete_with_error(&session, &t, error.as_ref());
                    }
                    DurableEvent::DidBecomeInvalid { error } => d.did_become_invalid(&session, error.as_ref()),
                }
                if event.task().is_some_and(|t| self.kept.contains(&t)) {
                    return true;
                }
                self.pending_acks.push(seq);
                if self.pending_acks.len() >= ACK_BATCH {
                    self.flush_acks(false);
                }
            }
            Event::Progress { task, bytes_written, total_bytes_written, total_bytes_expected, .. } => {
                let t = self.task(&session, task);
                d.did_write_data(&session, &t, bytes_written, total_bytes_written, total_bytes_expected);
            }
            Event::FinishedEvents { .. } => {
                // Everything is acknowledged (and durable) before the app is told it is done.
                self.flush_acks(true);
                d.did_finish_events_for_background_session(&session);
            }
            Event::Detached { reason, .. } => {
                self.flush_acks(false);
                // Unrouted first, so the delegate may attach again from the callback.
                session.shared.client.unroute(session.identifier(), session.shared.route);
                d.did_detach(&session, reason);
                return false;
            }
            Event::Wake { .. } | Event::TaskUpdate(_) => {}
        }
        true
    }

    /// The connection broke: what was sent on it is lost (it comes again), the app hears.
    fn connection_lost(&mut self, reason: &str) {
        self.acks_in_flight.clear();
        if let Some(shared) = self.session.upgrade() {
            self.delegate.did_lose_connection(&Session { shared }, reason);
        }
    }

    fn reconnected(&mut self) {
        // The rejoin replays every unacknowledged event: a kept file comes again too.
        self.kept.clear();
        if let Some(shared) = self.session.upgrade() {
            self.delegate.did_reconnect(&Session { shared });
        }
    }

    /// Events were dropped because the queue was full: now that it is empty, attach again
    /// so the daemon sends every unacknowledged event again (handled ones are acknowledged
    /// first, so they do not come twice).
    fn ask_again(&mut self) {
        self.flush_acks(true);
        self.overflowed.store(false, Ordering::Release);
        let Some(shared) = self.session.upgrade() else { return };
        let Some(request) = shared.client.attach_request(&shared.identifier, shared.route) else { return };
        // Attached on this very connection: no takeover (that could take the session back
        // from a process that took it over meanwhile).
        let request = match request {
            Request::Attach { identifier, config, .. } => Request::Attach { identifier, config, takeover: false },
            other => other,
        };
        debug!(session = %self.identifier, "the event queue overflowed; asking for the events again");
        self.kept.clear();
        match self.runtime.block_on(shared.client.request(request)) {
            Ok(_) => {}
            Err(e) if e.code() == ErrorCode::SessionInUse => {
                // Someone else has it now: this attachment is over.
                if shared.client.unroute(&shared.identifier, shared.route) {
                    self.delegate.did_detach(&Session { shared: shared.clone() }, DetachReason::TakenOver);
                }
            }
            Err(e) => warn!(session = %self.identifier, error = %e, "asking for the events again failed"),
        }
    }

    /// Sends the pending acknowledgements. With `wait`, returns only once every
    /// acknowledgement sent so far is durable (answered), including earlier batches.
    fn flush_acks(&mut self, wait: bool) {
        // Forget answers already in (a failed one is logged).
        self.acks_in_flight.retain_mut(|rx| match rx.try_recv() {
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => true,
            Ok(Err(e)) => {
                warn!(error = %e, "acknowledging events failed; they will be delivered again");
                false
            }
            _ => false,
        });
        if !self.pending_acks.is_empty() {
            let seqs = std::mem::take(&mut self.pending_acks);
            // The app dropped the session: the events stay unacknowledged and come again.
            let Some(shared) = self.session.upgrade() else { return };
            let client = shared.client.clone();
            drop(shared);
            let request = Request::AckEvents { identifier: self.identifier.clone(), seqs };
            match client.send_request(request) {
                Ok(rx) => self.acks_in_flight.push(rx),
                Err(e) => warn!(error = %e, "acknowledging events failed; they will be delivered again"),
            }
        }
        if wait {
            // A daemon that stopped answering must not freeze the session: each answer is
            // waited for at most the request timeout (unanswered ones come again).
            let limit = self.session.upgrade().map_or(Duration::from_secs(60), |s| s.client.request_timeout());
            for rx in std::mem::take(&mut self.acks_in_flight) {
                match self.runtime.block_on(async { tokio::time::timeout(limit, rx).await }) {
                    Ok(Ok(Ok(_))) => {}
                    Ok(Ok(Err(e))) => warn!(error = %e, "acknowledging events failed; they will be delivered again"),
                    Ok(Err(_)) => warn!("the connection closed before an acknowledgement was answered"),
                    Err(_) => warn!("dlsessiond did not answer an acknowledgement in time; the events come again"),
                }
            }
        }
    }

    /// The task handle for an event, fetching its details once if this process has not
    /// seen the task (created by another process, or before a relaunch).
    fn task(&self, session: &Session, id: TaskId) -> DownloadTask {
        if let Some(t) = session.known_task(id) {
            return t;
        }
        let fetched = self.runtime.block_on(session.task_info(id)).ok();
        let (url, description) = fetched.map(|i| (i.url, i.description)).unwrap_or_default();
        let task = session.task_handle(id, url, description);
        if let Ok(mut known) = session.shared.tasks.lock() {
            known.insert(id, task.clone());
        }
        task
    }
}
