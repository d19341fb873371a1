//! The client: requests and answers, event routing, and riding out daemon restarts.
//!
//! A [`Client`] owns one [`Link`] at a time. When it breaks (the daemon restarted,
//! crashed or was upgraded), requests waiting for an answer fail with
//! [`Error::Disconnected`] (those that create tasks go again under their creation key
//! first, see `Client::request_once`), every attached session hears `ConnectionLost`, and
//! the client connects again with backoff (starting the daemon where autostart is
//! allowed). It then registers again for wakes and watches, rejoins every attached session
//! (whose undelivered events the daemon sends again: delivery is at least once) and tells
//! each session `Reconnected`. Requests made while it is away wait for the new link, up to their timeout;
//! so do requests the daemon refused with `shutting_down` (not run), sent again on the new link.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::config::SessionConfiguration;
use crate::error::{Error, Result};
use crate::events::{EventReceiver, Mailbox};
use crate::link::{Answer, Incoming, Link};
use dlsession_proto::{
    ClientHello, DetachReason, ErrorCode, ErrorInfo, Event, Request, Response, ServerMessage, TaskId, WatchFilter,
    Welcome,
};

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The daemon's socket; `None` uses `DLSESSION_SOCKET`, `DLSESSIOND_SOCKET`, then the XDG default.
    pub socket: Option<PathBuf>,
    /// Shown in the daemon's logs and status.
    pub client_name: String,
    /// Announce this app: the daemon sends it `wake` for sessions registered with it.
    pub app_id: Option<String>,
    /// Deadline for connecting and the handshake.
    pub timeout: Duration,
    /// Deadline for each request's answer ([`Error::TimedOut`] after it), waiting for a
    /// connection and, for a request refused while the daemon stopped, for it to come back.
    /// `Duration::MAX`: none (as for `timeout`).
    pub request_timeout: Duration,
    /// Start `dlsessiond` if nothing listens on the socket (unless `DLSESSION_NO_AUTOSTART=1`).
    pub autostart: bool,
    /// Connect again when the connection breaks (see the module documentation). Without
    /// it, a broken connection stays broken ([`Client::is_closed`]).
    pub reconnect: bool,
    /// Events queued per attached session (durable events that do not fit are not lost:
    /// the daemon keeps them, and the session asks for them again once it caught up; until
    /// that answer, later ones are held back too, so the delegate hears them in order).
    pub event_queue: usize,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            socket: None,
            // `args_os`: `args` panics when the program's name is not UTF-8.
            client_name: std::env::args_os()
                .next()
                .and_then(|a| Path::new(&a).file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "dlsession".into()),
            app_id: None,
            timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            autostart: true,
            reconnect: true,
            event_queue: ROUTE_QUEUE,
        }
    }
}

/// What a session's dispatcher receives.
#[derive(Debug)]
pub(crate) enum Routed {
    Event(Event),
    /// The connection broke (why); a new one is being made.
    ConnectionLost(String),
    /// Connected again; the session's events follow (again).
    Reconnected,
}

/// Events for one attached session, in a bounded queue.
#[derive(Debug)]
struct Route {
    token: u64,
    tx: mpsc::Sender<Routed>,
    /// How this session attached, to rejoin after a reconnect.
    attach: Request,
    /// The queue was full and events were dropped: the session must ask for them again.
    overflowed: Arc<Overflow>,
    /// Messages that must not be missed, waiting for room in order (see `hand_over`).
    late: Arc<std::sync::Mutex<Late>>,
}

/// A route's messages waiting for room in its queue, in the order they came.
#[derive(Debug, Default)]
struct Late {
    waiting: std::collections::VecDeque<Routed>,
    /// A task is putting them in the queue: later ones go behind them.
    draining: bool,
}

/// A session's end of its route.
#[derive(Debug)]
pub(crate) struct RouteHandle {
    pub token: u64,
    pub events: mpsc::Receiver<Routed>,
    pub overflowed: Arc<Overflow>,
}

/// A route's queue overflowed: events were dropped, and the session asks for them again
/// once it has caught up with the rest. From the first one dropped until the answer every
/// event is dropped, so what the session lacks is exactly what came after the last durable
/// event its queue took: the daemon sends again from there, paced: `room` events at a time,
/// the next ones when the session has caught up and asks again (a replay of the whole
/// backlog overflowed the queue again, and came again, for every queue a slow app took).
#[derive(Debug)]
pub(crate) struct Overflow {
    dropped: AtomicBool,
    /// The last durable event the queue took.
    last_taken: std::sync::atomic::AtomicU64,
    /// Delivery is paced (since the first overflow of this attachment).
    paced: AtomicBool,
    /// Durable events the queue took since the last answer.
    taken: std::sync::atomic::AtomicU64,
    /// How many events a paced delivery sends at a time: half the queue (notices take room too).
    room: u32,
    /// The connection was lost and the session's rejoin not answered yet: its replay brings
    /// everything (a `ReplayEvents` sent on the new connection ahead of the rejoin's attach
    /// found the session unattached there and took it for taken over).
    rejoining: AtomicBool,
}

impl Overflow {
    fn new(queue: usize) -> Overflow {
        Overflow {
            dropped: AtomicBool::new(false),
            last_taken: Default::default(),
            paced: AtomicBool::new(false),
            taken: Default::default(),
            room: u32::try_from(queue / 2).unwrap_or(u32::MAX).max(1),
            rejoining: AtomicBool::new(false),
        }
    }

    /// Events were dropped (or a notice waits for room): ask again.
    pub(crate) fn set(&self) {
        self.dropped.store(true, Ordering::Release);
    }

    /// Events were dropped, or a paced delivery has sent all it may: ask (again), once the
    /// queue is drained.
    pub(crate) fn is_set(&self) -> bool {
        self.dropped.load(Ordering::Acquire)
            || (self.paced.load(Ordering::Acquire) && self.taken.load(Ordering::Acquire) >= u64::from(self.room))
    }

    fn took(&self, seq: u64) {
        self.last_taken.store(seq, Ordering::Release);
        self.taken.fetch_add(1, Ordering::AcqRel);
    }

    /// Waiting for the rejoin's replay: nothing to ask for meanwhile.
    pub(crate) fn rejoining(&self) -> bool {
        self.rejoining.load(Ordering::Acquire)
    }

    /// What to ask for: from the event after the last taken, `room` of them.
    pub(crate) fn ask(&self) -> (u64, u32) {
        (self.last_taken.load(Ordering::Acquire).saturating_add(1), self.room)
    }

    /// The answer to an attach (`paced` false) or to asking again (true) came, in its
    /// place among the events: those after it flow, counted against the new room.
    fn reopen(&self, paced: bool) {
        if !paced {
            self.rejoining.store(false, Ordering::Release);
        }
        self.paced.store(paced, Ordering::Release);
        self.taken.store(0, Ordering::Release);
        self.dropped.store(false, Ordering::Release);
    }
}

/// Events queued per attached session by default (see `ClientOptions::event_queue`).
const ROUTE_QUEUE: usize = 4096;

#[derive(Debug)]
enum LinkState {
    Up(Arc<Link>),
    /// Connecting again; why the last link broke.
    Down(Option<String>),
    /// Broken for good (reconnecting is off).
    Closed(Option<String>),
}

#[derive(Debug)]
struct Shared {
    options: ClientOptions,
    socket: PathBuf,
    link: Mutex<LinkState>,
    /// Signalled whenever `link` changes.
    link_changed: Notify,
    /// Generation of the current link: messages of an older one are ignored.
    generation: AtomicU64,
    incoming: mpsc::UnboundedSender<(u64, Incoming)>,
    next_id: AtomicU64,
    routes: Mutex<HashMap<String, Route>>,
    next_route: AtomicU64,
    /// Everything else (watch updates, progress of watched tasks, wakes).
    other: Arc<Mailbox>,
    /// Registrations repeated on every new link.
    watch: Mutex<Option<WatchFilter>>,
    handles_wakes: AtomicBool,
    welcome: Mutex<Welcome>,
    /// Tasks a batch created and took back because a later part of it was refused: the
    /// app never had them, so their events are acknowledged unseen. Ids are never reused.
    withdrawn: Mutex<HashSet<TaskId>>,
    /// Connecting again found a daemon of another protocol version (ours, its): requests
    /// that time out waiting for a connection say so. Cleared once connected.
    mismatch: Mutex<Option<(u16, u16)>>,
}

/// A connection to `dlsessiond`. Cheap to clone; closes when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
    _guard: Arc<DropGuard>,
}

#[derive(Debug)]
struct DropGuard {
    supervisor: tokio::task::JoinHandle<()>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

impl Client {
    /// Connects and performs the handshake.
    pub async fn connect(options: ClientOptions) -> Result<Client> {
        let socket = match options.socket.clone() {
            Some(s) => s,
            None => dlsession_proto::paths::client_socket()?,
        };
        let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
        let link = open(&socket, &options, &incoming_tx, 1, true).await?;
        let welcome = link.welcome.clone();
        let shared = Arc::new(Shared {
            options,
            socket,
            link: Mutex::new(LinkState::Up(link)),
            link_changed: Notify::new(),
            generation: AtomicU64::new(1),
            incoming: incoming_tx,
            next_id: AtomicU64::new(1),
            routes: Mutex::new(HashMap::new()),
            next_route: AtomicU64::new(1),
            other: Arc::default(),
            watch: Mutex::new(None),
            handles_wakes: AtomicBool::new(false),
            welcome: Mutex::new(welcome),
            withdrawn: Mutex::default(),
            mismatch: Mutex::default(),
        });
        let supervisor = tokio::spawn(supervise(shared.clone(), incoming_rx));
        Ok(Client { shared, _guard: Arc::new(DropGuard { supervisor }) })
    }

    /// Sends a request that is answered `Ok`, and waits for that.
    pub(crate) async fn request_ok(&self, request: Request) -> Result<()> {
        match self.request(request).await? {
            Response::Ok => Ok(()),
            other => Err(Error::UnexpectedResponse { expected: "ok", got: other.kind() }),
        }
    }

    /// Sends a request and waits for its response (at most the request timeout). While
    /// the client is connecting again, the request waits for the new connection.
    ///
    /// A request the daemon refused because it was stopping (`shutting_down`: not run) goes
    /// again on the next connection, once the daemon is back, within the same timeout;
    /// after it, the refusal is the answer (a timeout once it went again is a timeout: it may
    /// have run). Not an attach or a registration (the reconnect itself attaches and
    /// registers again), nor on a client that does not reconnect.
    pub async fn request(&self, request: Request) -> Result<Response> {
        let name = request.name();
        let after = self.shared.options.request_timeout;
        let again = self.shared.options.reconnect
            && !matches!(request, Request::Attach { .. } | Request::Watch(_) | Request::Unwatch | Request::HandleWakes);
        // Refused while the daemon stopped, and not sent again yet.
        let mut refused: Option<ErrorInfo> = None;
        // One timer for the whole request: waiting for a connection, then for the answer.
        let answer = async {
            // Kept only where it may go again (a batch of thousands is not copied for nothing).
            let mut request = Some(request);
            let mut stopping: Option<Arc<Link>> = None;
            loop {
                let link = match (stopping.take(), &refused) {
                    (Some(old), Some(e)) => {
                        self.live_link_after(Some(&old)).await.map_err(|_| Error::Daemon(e.clone()))?
                    }
                    _ => match self.current_link() {
                        Some(link) => link,
                        None => {
                            // A daemon of another version answers: waiting would not help.
                            if let Some(e) = self.mismatched() {
                                return Err(e);
                            }
                            self.live_link().await?
                        }
                    },
                };
                refused = None;
                let this = if again { request.clone() } else { request.take() };
                let Some(this) = this else { return Err(Error::Disconnected { reason: None }) };
                let rx = self.send_with(&link, this, None)?;
                match rx.await {
                    Ok(Ok(response)) => return Ok(response),
                    Ok(Err(e)) if again && e.code == ErrorCode::ShuttingDown => {
                        debug!(request = name, "dlsessiond is stopping; the request goes again once it is back");
                        refused = Some(e);
                        stopping = Some(link);
                    }
                    Ok(Err(e)) => return Err(Error::Daemon(e)),
                    Err(_) => return Err(link.disconnected()),
                }
            }
        };
        let result = tokio::time::timeout(after, answer).await;
        match (result, refused) {
            (Ok(answer), _) => answer,
            (Err(_), Some(e)) => Err(Error::Daemon(e)),
            (Err(_), None) => Err(self.timed_out(name, after)),
        }
    }

    /// Sends a request whose answer is handled in its place among the events (`in_order`
    /// runs on it after every event read before it was routed, and before any read after),
    /// on the connection up now only: with none, or when it breaks, [`Error::Disconnected`]
    /// (never sent on the next one, ahead of its rejoins).
    pub(crate) async fn request_in_order_here(
        &self,
        request: Request,
        in_order: crate::link::InOrder,
    ) -> Result<Response> {
        let name = request.name();
        let link = self.current_link().ok_or(Error::Disconnected { reason: None })?;
        let rx = self.send_with(&link, request, Some(in_order))?;
        let after = self.shared.options.request_timeout;
        match tokio::time::timeout(after, rx).await {
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(e))) => Err(Error::Daemon(e)),
            Ok(Err(_)) => Err(link.disconnected()),
            Err(_) => Err(self.timed_out(name, after)),
        }
    }

    /// The daemon that came back speaks another protocol version, and no link is up.
    fn mismatched(&self) -> Option<Error> {
        let (ours, theirs) = self.shared.mismatch.lock().ok().and_then(|m| *m)?;
        self.current_link().is_none().then_some(Error::VersionMismatch { ours, theirs })
    }

    /// A request unanswered within `after`: timed out, or never sent because the daemon
    /// that came back speaks another protocol version (say, after a downgrade).
    fn timed_out(&self, request: &'static str, after: Duration) -> Error {
        self.mismatched().unwrap_or(Error::TimedOut { request, after })
    }

    /// Sends a request that creates tasks under a new creation key, and again under the
    /// same key if the connection broke before the answer came (the daemon may have
    /// created them: then it answers their ids instead of creating them twice): at most
    /// `RESENDS` times, each try with its own request timeout (a daemon coming back checks
    /// its database first), a pause growing from 50 ms between them. A request that timed
    /// out is not sent again (the daemon may still create its tasks, if it was only slow).
    pub(crate) async fn request_once(&self, request: Request) -> Result<Response> {
        let name = request.name();
        let keyed = match dlsession_proto::CreateRequest::from_request(request) {
            Ok(create) => Request::Once { key: creation_key(), request: create },
            Err(other) => return self.request(*other).await,
        };
        let mut pause = Duration::from_millis(50);
        for resend in 0..=RESENDS {
            match self.request(keyed.clone()).await {
                Err(Error::Disconnected { reason }) if resend < RESENDS => {
                    debug!(?reason, request = name, "the answer was lost; sending the request again under its key");
                    // Never a tight loop: a link that broke may still look up for a moment.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    // A client closed for good fails here at once.
                    self.connected().await.map_err(|_| Error::Disconnected { reason })?;
                }
                other => return other,
            }
        }
        Err(Error::Disconnected { reason: None })
    }

    /// Waits until a link is up (at most the request timeout), for requests sent without
    /// waiting ([`Client::send_request`]) after the link may have broken.
    pub(crate) async fn connected(&self) -> Result<()> {
        let after = self.shared.options.request_timeout;
        match tokio::time::timeout(after, self.live_link()).await {
            Ok(link) => link.map(|_| ()),
            Err(_) => Err(self.timed_out("connect", after)),
        }
    }

    /// The current link, if one is up.
    fn current_link(&self) -> Option<Arc<Link>> {
        match &*self.shared.link.lock().ok()? {
            // A link that broke is still `Up` until the supervisor has seen it break: a
            // request sent on it would fail instead of waiting for the next one.
            LinkState::Up(link) if !link.is_closed() => Some(link.clone()),
            _ => None,
        }
    }

    /// Sends a request without waiting for the answer (used for acknowledgements). Fails
    /// with [`Error::Disconnected`] while there is no connection.
    pub fn send_request(&self, request: Request) -> Result<oneshot::Receiver<Answer>> {
        let link = match &*self.shared.link.lock().map_err(|_| Error::Disconnected { reason: None })? {
            LinkState::Up(link) => link.clone(),
            LinkState::Down(reason) | LinkState::Closed(reason) => {
                return Err(Error::Disconnected { reason: reason.clone() });
            }
        };
        self.send_on(&link, request)
    }

    fn send_on(&self, link: &Link, request: Request) -> Result<oneshot::Receiver<Answer>> {
        self.send_with(link, request, None)
    }

    fn send_with(
        &self,
        link: &Link,
        request: Request,
        in_order: Option<crate::link::InOrder>,
    ) -> Result<oneshot::Receiver<Answer>> {
        // Registrations are repeated on every new connection.
        match &request {
            Request::Watch(filter) => self.remember_watch(Some(filter.clone())),
            Request::Unwatch => self.remember_watch(None),
            Request::HandleWakes => self.shared.handles_wakes.store(true, Ordering::Release),
            _ => {}
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        link.send(id, request, in_order)
    }

    /// Marks tasks as taken back (see `Shared::withdrawn`) before they are cancelled.
    pub(crate) fn mark_withdrawn(&self, tasks: &[TaskId]) {
        if let Ok(mut w) = self.shared.withdrawn.lock() {
            w.extend(tasks);
        }
    }

    /// Undoes [`Client::mark_withdrawn`] for tasks that could not be taken back after all.
    pub(crate) fn unmark_withdrawn(&self, tasks: &[TaskId]) {
        if let Ok(mut w) = self.shared.withdrawn.lock() {
            for t in tasks {
                w.remove(t);
            }
        }
    }

    /// Whether a batch took this task back: its events are not the app's.
    pub(crate) fn was_withdrawn(&self, task: TaskId) -> bool {
        self.shared.withdrawn.lock().is_ok_and(|w| w.contains(&task))
    }

    /// Every new connection registers for wakes (`Client::handle_wakes`).
    pub(crate) fn remember_wake_handler(&self) {
        self.shared.handles_wakes.store(true, Ordering::Release);
    }

    fn remember_watch(&self, filter: Option<WatchFilter>) {
        if let Ok(mut w) = self.shared.watch.lock() {
            *w = filter;
        }
    }

    /// The current link, waiting for one while the client connects again.
    async fn live_link(&self) -> Result<Arc<Link>> {
        self.live_link_after(None).await
    }

    /// The next live link other than `old`.
    async fn live_link_after(&self, old: Option<&Arc<Link>>) -> Result<Arc<Link>> {
        loop {
            let changed = self.shared.link_changed.notified();
            match &*self.shared.link.lock().map_err(|_| Error::Disconnected { reason: None })? {
                LinkState::Up(link) if !link.is_closed() && !old.is_some_and(|old| Arc::ptr_eq(old, link)) => {
                    return Ok(link.clone());
                }
                LinkState::Closed(reason) => return Err(Error::Disconnected { reason: reason.clone() }),
                // Broken, not yet marked down (see `current_link`), or down: the next one.
                LinkState::Up(_) | LinkState::Down(_) => {}
            }
            changed.await;
        }
    }

    /// Events not routed to an attached [`crate::Session`]: task updates and progress for
    /// `Watch`, and `Wake`, coalesced per task (a slow reader gets each task's latest state
    /// and its progress summed up). Only one receiver exists at a time; a new call replaces
    /// it.
    pub fn events(&self) -> EventReceiver {
        self.shared.other.receiver()
    }

    /// Routes the identifier's events to a new queue; the token proves ownership. `attach`
    /// is how to rejoin the session on a new connection. `None` if the identifier is routed
    /// already: checked and taken under one lock, so two attaches racing (the app's own and
    /// a wake's rejoin) cannot both think they own it.
    pub(crate) fn route(&self, identifier: &str, attach: Request) -> Option<RouteHandle> {
        let mut routes = self.shared.routes.lock().ok()?;
        if routes.contains_key(identifier) {
            return None;
        }
        let (tx, events) = mpsc::channel(self.shared.options.event_queue.max(1));
        let token = self.shared.next_route.fetch_add(1, Ordering::Relaxed);
        let overflowed = Arc::new(Overflow::new(self.shared.options.event_queue.max(1)));
        let late = Arc::default();
        routes.insert(identifier.to_owned(), Route { token, tx, attach, overflowed: overflowed.clone(), late });
        Some(RouteHandle { token, events, overflowed })
    }

    pub(crate) fn is_routed(&self, identifier: &str) -> bool {
        self.shared.routes.lock().map(|r| r.contains_key(identifier)).unwrap_or(false)
    }

    /// Removes the route if `token` still owns it; says whether it did.
    pub(crate) fn unroute(&self, identifier: &str, token: u64) -> bool {
        let Ok(mut routes) = self.shared.routes.lock() else { return false };
        if routes.get(identifier).is_some_and(|r| r.token == token) {
            routes.remove(identifier);
            return true;
        }
        false
    }

    /// Detaches `identifier` unless a session routes it again: checked and sent under the
    /// routes lock, so a new attach of it on this connection goes after this detach.
    pub(crate) fn detach_unless_routed(&self, identifier: &str) {
        let Ok(routes) = self.shared.routes.lock() else { return };
        if !routes.contains_key(identifier) {
            let _ = self.send_request(Request::Detach { identifier: identifier.to_owned() });
        }
    }

    /// What the daemon said about itself in the last handshake.
    pub fn welcome(&self) -> Welcome {
        self.shared.welcome.lock().map(|w| w.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }

    /// The socket this client connects to.
    pub fn socket(&self) -> &Path {
        &self.shared.socket
    }

    /// True once the connection has closed for good (it broke and reconnecting is off).
    pub fn is_closed(&self) -> bool {
        matches!(&*self.shared.link.lock().unwrap_or_else(|e| e.into_inner()), LinkState::Closed(_))
    }

    /// How long a request waits for its answer.
    pub fn request_timeout(&self) -> Duration {
        self.shared.options.request_timeout
    }

    /// True while connected (false while connecting again, and once closed).
    pub fn is_connected(&self) -> bool {
        matches!(&*self.shared.link.lock().unwrap_or_else(|e| e.into_inner()), LinkState::Up(l) if !l.is_closed())
    }
}

/// Opens a link, starting the daemon on demand if nothing listens.
async fn open(
    socket: &Path,
    options: &ClientOptions,
    incoming: &mpsc::UnboundedSender<(u64, Incoming)>,
    generation: u64,
    start_daemon: bool,
) -> Result<Arc<Link>> {
    let timeout = options.timeout;
    let attempt = || async {
        let hello = ClientHello {
            client_name: options.client_name.clone(),
            client_version: env!("CARGO_PKG_VERSION").into(),
            app_id: options.app_id.clone(),
            umask: process_umask(),
        };
        tokio::time::timeout(timeout, Link::open(socket, hello, incoming.clone(), generation)).await.map_err(|_| {
            Error::NotRunning {
                path: socket.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
            }
        })?
    };
    match attempt().await {
        // Nothing listens (no socket, or a stale one): start the daemon and try again.
        Err(Error::NotRunning { source, .. })
            if start_daemon
                && options.autostart
                && crate::autostart::enabled()
                && matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
        {
            crate::autostart::start(socket, timeout).await?;
            attempt().await
        }
        other => other,
    }
}

/// The first wait before connecting again, doubled per failed try up to `RECONNECT_MAX`.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Routes what the links receive, and connects again when one breaks.
async fn supervise(shared: Arc<Shared>, mut incoming: mpsc::UnboundedReceiver<(u64, Incoming)>) {
    while let Some((generation, item)) = incoming.recv().await {
        if generation != shared.generation.load(Ordering::Acquire) {
            continue;
        }
        match item {
            Incoming::Message(msg) => dispatch(&shared, msg),
            Incoming::Answer(tx, hook, answer) => {
                (hook.0)(&answer);
                let _ = tx.send(answer);
            }
            Incoming::Closed(reason) => {
                let text = reason.clone().unwrap_or_else(|| "dlsessiond closed the connection".into());
                // The link's state first: an app that hears of the loss and asks something
                // right away waits for the next connection instead of using the broken one.
                if !shared.options.reconnect {
                    set_link(&shared, LinkState::Closed(reason));
                    notify_routes(&shared, |_| Routed::ConnectionLost(text.clone()));
                    shared.other.close();
                    continue;
                }
                set_link(&shared, LinkState::Down(reason));
                if let Ok(routes) = shared.routes.lock() {
                    for route in routes.values() {
                        route.overflowed.rejoining.store(true, Ordering::Release);
                    }
                }
                notify_routes(&shared, |_| Routed::ConnectionLost(text.clone()));
                warn!(reason = %text, "lost the connection to dlsessiond; connecting again");
                reconnect(&shared).await;
            }
        }
    }
}

fn set_link(shared: &Shared, state: LinkState) {
    if let Ok(mut link) = shared.link.lock() {
        *link = state;
    }
    shared.link_changed.notify_waiters();
}

/// Connects again (with backoff, for as long as the client lives), then repeats every
/// registration and rejoins every attached session.
async fn reconnect(shared: &Arc<Shared>) {
    let mut wait = RECONNECT_MIN;
    let generation = shared.generation.load(Ordering::Acquire) + 1;
    let link = loop {
        tokio::time::sleep(wait).await;
        match open(&shared.socket, &shared.options, &shared.incoming, generation, true).await {
            Ok(link) => break link,
            Err(Error::VersionMismatch { ours, theirs }) => {
                // Said once: it stays so until the daemon is replaced again.
                let new = shared.mismatch.lock().map(|mut m| m.replace((ours, theirs)) != Some((ours, theirs)));
                if new.unwrap_or(false) {
                    warn!(
                        ours,
                        theirs,
                        "dlsessiond came back speaking another protocol version (downgraded?); requests fail with \
                         protocol_version until one that speaks ours is back"
                    );
                }
                wait = (wait * 2).min(RECONNECT_MAX);
            }
            Err(e) => {
                debug!(error = %e, "connecting to dlsessiond again failed");
                wait = (wait * 2).min(RECONNECT_MAX);
            }
        }
    };
    info!("connected to dlsessiond again");
    if let Ok(mut m) = shared.mismatch.lock() {
        *m = None;
    }
    shared.generation.store(generation, Ordering::Release);
    if let Ok(mut w) = shared.welcome.lock() {
        *w = link.welcome.clone();
    }
    let mut again: Vec<Request> = Vec::new();
    if let Some(filter) = shared.watch.lock().ok().and_then(|w| w.clone()) {
        again.push(Request::Watch(filter));
    }
    // Sessions hear of the reconnect before the events their rejoin brings.
    notify_routes(shared, |_| Routed::Reconnected);
    let rejoins: Vec<Rejoin> = shared
        .routes
        .lock()
        .map(|r| {
            r.iter()
                .map(|(id, route)| Rejoin { identifier: id.clone(), token: route.token, attach: route.attach.clone() })
                .collect()
        })
        .unwrap_or_default();
    let mut registrations = Vec::new();
    for request in again {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        match link.send(id, request, None) {
            Ok(rx) => registrations.push(rx),
            Err(e) => warn!(error = %e, "cannot register again with dlsessiond"),
        }
    }
    set_link(shared, LinkState::Up(link.clone()));
    // Answers come on the link's own reader. Each session rejoins on its own, so one that
    // cannot rejoin yet does not hold up the others.
    tokio::spawn(async move {
        for rx in registrations {
            if let Ok(Err(e)) = rx.await {
                warn!(error = %e, "registering again with dlsessiond failed");
            }
        }
    });
    let rejoining: Vec<_> =
        rejoins.into_iter().map(|r| tokio::spawn(rejoin(shared.clone(), link.clone(), r))).collect();
    // Wakes are handled again only once the sessions are rejoined (or a request timeout
    // passed): else the daemon, seeing them unattached with events waiting, woke this very
    // app for them, or another process of it, which could attach first and take them over.
    if shared.handles_wakes.load(Ordering::Acquire) {
        let (shared, link) = (shared.clone(), link.clone());
        tokio::spawn(async move {
            let deadline = crate::deadline::after_tokio(shared.options.request_timeout);
            for r in rejoining {
                let _ = tokio::time::timeout_at(deadline, r).await;
            }
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            match link.send(id, Request::HandleWakes, None) {
                Ok(rx) => {
                    if let Ok(Err(e)) = rx.await {
                        warn!(error = %e, "registering for wakes again failed");
                    }
                }
                Err(e) => warn!(error = %e, "cannot register for wakes again"),
            }
        });
    }
}

/// A session to attach again on a new link, as its route was when the link came up.
struct Rejoin {
    identifier: String,
    /// The route's owner then: a session dropped since is not attached again.
    token: u64,
    attach: Request,
}

/// Holds every rejoin this long before it starts, for tests of what happens meanwhile
/// (`test_hooks::pause_rejoins`). Zero: no pause.
static REJOIN_PAUSE_MS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn pause_rejoins(pause: Duration) {
    REJOIN_PAUSE_MS.store(u64::try_from(pause.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Attaches a session again on a new link. Our own earlier attachment may not be gone
/// from the daemon yet (it notices the old connection closing in its own time), so
/// `session_in_use` is retried for a moment; after that another process has the session,
/// and the session hears it was taken over. A session that no longer exists hears it was
/// invalidated. Other errors are retried with backoff while the link lives. A session the
/// app dropped meanwhile is not attached again (nobody would get its events, and its app
/// could not attach it elsewhere).
async fn rejoin(shared: Arc<Shared>, link: Arc<Link>, r: Rejoin) {
    let Rejoin { identifier, token, attach } = r;
    let pause = REJOIN_PAUSE_MS.load(Ordering::Relaxed);
    if pause > 0 {
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    // The stored configuration as it is now, not as it was at the first attach. A session
    // that is gone (invalidated and removed while the app was away) is over: an attach would
    // make a new, empty one behind the app's back.
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let stored = match link.send(id, Request::GetSession { identifier: identifier.clone() }, None) {
        Ok(rx) => match rx.await {
            Ok(Ok(Response::Session(info))) => Some(info.config),
            Ok(Err(e)) if e.code == ErrorCode::NoSuchSession => {
                warn!(session = %identifier, "the session was removed while the connection was down");
                let reason = DetachReason::Invalidated;
                deliver_to_route(&shared, &identifier, Event::Detached { identifier: identifier.clone(), reason });
                return;
            }
            _ => None,
        },
        Err(_) => None,
    };
    let attach = SessionConfiguration::reattach(attach, stored);
    let mut wait = RECONNECT_MIN;
    let mut in_use_since: Option<tokio::time::Instant> = None;
    loop {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Sent while the routes are held: a session dropped before this is not attached,
        // and one dropped after sends its detach behind this attach, on the same link.
        let sent = {
            let Ok(routes) = shared.routes.lock() else { return };
            let Some(route) = routes.get(&identifier).filter(|route| route.token == token) else {
                debug!(session = %identifier, "the session was dropped; not rejoining it");
                return;
            };
            // The replay that follows the answer brings whatever an overflow dropped before:
            // events are let through again from there (see `Dispatcher::ask_again`).
            link.send(id, attach.clone(), Some(reopen_on_answer(route.overflowed.clone(), false)))
        };
        let answer = match sent {
            Ok(rx) => rx.await,
            Err(_) => return,
        };
        let error = match answer {
            Ok(Ok(_)) => return,
            // The link broke again: the next reconnect rejoins.
            Err(_) => return,
            Ok(Err(e)) => e,
        };
        let ending = match error.code {
            ErrorCode::SessionInUse
                if in_use_since.get_or_insert_with(tokio::time::Instant::now).elapsed() > IN_USE_GRACE =>
            {
                Some(DetachReason::TakenOver)
            }
            ErrorCode::NoSuchSession | ErrorCode::SessionInvalidated => Some(DetachReason::Invalidated),
            _ => None,
        };
        if let Some(reason) = ending {
            warn!(session = %identifier, error = %error, "cannot rejoin the session");
            deliver_to_route(&shared, &identifier, Event::Detached { identifier: identifier.clone(), reason });
            return;
        }
        debug!(session = %identifier, error = %error, "rejoining the session failed; trying again");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RECONNECT_MAX);
        if link.is_closed() {
            return;
        }
    }
}

/// Lets a session's events through again when the answer to its attach is read, in its
/// place among them: every event after it is the replay's, or newer.
pub(crate) fn reopen_on_answer(overflowed: Arc<Overflow>, paced: bool) -> crate::link::InOrder {
    crate::link::InOrder(Box::new(move |answer| {
        if answer.is_ok() {
            overflowed.reopen(paced);
        }
    }))
}

/// How long `session_in_use` is taken for our own attachment the daemon has not dropped yet.
const IN_USE_GRACE: Duration = Duration::from_secs(3);

/// Puts an event in a session's queue (a detach must not be lost: it ends the session).
fn deliver_to_route(shared: &Shared, identifier: &str, event: Event) {
    let Ok(routes) = shared.routes.lock() else { return };
    if let Some(route) = routes.get(identifier) {
        hand_over(route, Routed::Event(event));
    }
}

fn notify_routes(shared: &Shared, what: impl Fn(&str) -> Routed) {
    let Ok(routes) = shared.routes.lock() else { return };
    for (identifier, route) in routes.iter() {
        hand_over(route, what(identifier));
    }
}

/// Hands a message the session must not miss (a detach, a lost or regained connection) to
/// its queue: when the queue is full, the session is told to ask for its events again and
/// the message goes in as soon as there is room (the dispatcher drains the queue), after
/// those that waited before it ("lost" before "back"). Dropped, a lost detach left the
/// session rejoining one that was gone.
fn hand_over(route: &Route, routed: Routed) {
    let Ok(mut late) = route.late.lock() else { return };
    let routed = if late.draining {
        routed
    } else {
        match route.tx.try_send(routed) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(routed)) => routed,
        }
    };
    route.overflowed.set();
    if late.draining {
        late.waiting.push_back(routed);
        return;
    }
    // Without a runtime to wait for room on, it cannot go (and must not wait where a later
    // message would overtake it).
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    late.waiting.push_back(routed);
    late.draining = true;
    let (tx, queue) = (route.tx.clone(), route.late.clone());
    runtime.spawn(async move {
        loop {
            let next = match queue.lock() {
                Ok(mut late) => match late.waiting.pop_front() {
                    Some(next) => next,
                    None => {
                        late.draining = false;
                        return;
                    }
                },
                Err(_) => return,
            };
            if tx.send(next).await.is_err() {
                return;
            }
        }
    });
}

/// Hands an event to its session's queue, or to `events()`.
fn dispatch(shared: &Shared, msg: ServerMessage) {
    let ServerMessage::Event(event) = msg else { return };
    let identifier = match &event {
        Event::Durable { identifier, .. }
        | Event::FinishedEvents { identifier }
        | Event::Detached { identifier, .. }
        | Event::Progress { identifier, .. }
        | Event::SendProgress { identifier, .. } => Some(identifier.as_str()),
        Event::Wake { .. } | Event::TaskUpdate(_) => None,
    };
    // The daemon is stopping (a restart, an upgrade): the connection closes next, and a
    // client that reconnects rejoins its sessions then. The session is not over.
    if shared.options.reconnect && matches!(event, Event::Detached { reason: DetachReason::DaemonShutdown, .. }) {
        debug!("dlsessiond is shutting down; its sessions are rejoined once it is back");
        return;
    }
    if let Some(identifier) = identifier
        && let Ok(routes) = shared.routes.lock()
        && let Some(route) = routes.get(identifier)
    {
        // Never blocks: the reader must go on reading answers. An event that does not fit
        // is dropped; a durable one comes again when the session asks (see `Routed`). A
        // detach is never dropped: it ends the session (the asking again would take the
        // session back from whoever took it over).
        let progress = matches!(event, Event::Progress { .. } | Event::SendProgress { .. });
        let detach = matches!(event, Event::Detached { .. });
        if detach {
            hand_over(route, Routed::Event(event));
            return;
        }
        // Notices still waiting for room go first (`hand_over`): an event now would
        // overtake them. A durable one comes again when the session asks.
        if route.late.lock().is_ok_and(|late| late.draining) {
            if !progress {
                route.overflowed.set();
            }
            return;
        }
        if route.overflowed.is_set() && !progress {
            return;
        }
        let seq = match &event {
            Event::Durable { seq, .. } => Some(*seq),
            _ => None,
        };
        match route.tx.try_send(Routed::Event(event)) {
            Ok(()) => {
                if let Some(seq) = seq {
                    route.overflowed.took(seq);
                }
            }
            Err(_) if !progress => route.overflowed.set(),
            Err(_) => {}
        }
        return;
    }
    shared.other.put(event);
}

/// This process's file-creation mask, read without changing it (`umask(2)` can only set
/// it, which would race with other threads creating files): the daemon gives the files
/// it hands over the mode this process would give files it creates.
fn process_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(line.trim(), 8).ok().filter(|m| *m <= 0o777)
}

/// How many times a creating request goes again after its answer was lost (a request
/// that made the daemon crash is not sent for ever).
const RESENDS: u32 = 3;

/// A key no other creation request of this session has: 128 random bits (the kernel's),
/// or, if those cannot be read, this process, the time and a counter.
fn creation_key() -> u128 {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_ok() {
        return u128::from_ne_bytes(bytes);
    }
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (u128::from(std::process::id()) << 96) ^ (nanos << 32) ^ u128::from(count)
}
