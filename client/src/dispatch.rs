//! Running the app's delegate: attaching a session starts a thread that hands each event
//! to the delegate in order and acknowledges it once handled; rejoining sessions when the
//! daemon wakes the app.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::SessionConfiguration;
use crate::connection::{Client, ClientOptions, Routed};
use crate::delegate::{Handled, SessionDelegate, WakeHandler};
use crate::error::{Error, Result};
use crate::session::{DownloadTask, Ended, Session, SessionShared, Signals};
use crate::stream::SessionEvent;
use dlsession_proto::{DetachReason, DurableEvent, ErrorCode, ErrorInfo, Event, Request, Response, TaskId};

impl Client {
    /// Rejoins sessions whenever the daemon sends `wake`, using `handler` for each
    /// session's configuration and delegate. Rejoined sessions stay attached for as long
    /// as this connection is open. Registered at once if the daemon is away (every new
    /// connection registers again). It reads this client's [`Client::events`]: a later
    /// `events()` on the same client takes them over and the wakes go unheard (watch tasks
    /// with another client). A session the app attaches itself on this client is not
    /// rejoined; if the app attaches it while a wake rejoins it, the first to attach keeps
    /// it and the app's attach may fail with `invalid_request` ("already attached"): attach
    /// such sessions before calling this, or have the handler decline them.
    pub fn handle_wakes(&self, handler: impl WakeHandler) {
        let mut events = self.events();
        // The daemon wakes only connections that say they rejoin; the others' apps it
        // relaunches instead. Remembered first: with the connection down now, the next
        // one registers it (each new connection registers again).
        self.remember_wake_handler();
        if let Err(e) = self.send_request(Request::HandleWakes) {
            warn!(error = %e, "cannot register for wakes now; the next connection will");
        }
        let client = self.clone();
        tokio::spawn(async move {
            let mut joined: HashMap<String, Session> = HashMap::new();
            while let Some(event) = events.recv().await {
                let Event::Wake { identifier, .. } = event else { continue };
                // A session routed here is attached here already (by the app, or by an
                // earlier wake), or being rejoined after a reconnect: the app has it.
                if client.is_routed(&identifier) {
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
                    // The app attached it itself meanwhile: it has it.
                    Err(e) if client.is_routed(&identifier) => {
                        debug!(%identifier, error = %e, "wake's rejoin stood down")
                    }
                    Err(e) => warn!(%identifier, error = %e, "rejoining after a wake failed"),
                }
            }
        });
    }
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
        let already_attached = || {
            Error::Invalid(ErrorInfo::new(
                ErrorCode::InvalidRequest,
                format!(
                    "session {} is already attached on this connection (by the app or by a wake's \
                     rejoin); drop that Session first",
                    config.identifier
                ),
            ))
        };
        // Checked again when routing: another attach may route it while this one asks.
        if client.is_routed(&config.identifier) {
            return Err(already_attached());
        }
        // What the app did not set keeps its stored value (its launch command, say).
        let stored = if config.sets_everything() {
            None
        } else {
            match client.request(Request::GetSession { identifier: config.identifier.clone() }).await {
                Ok(Response::Session(info)) => Some(info.config),
                Ok(other) => return Err(Error::UnexpectedResponse { expected: "session", got: other.kind() }),
                Err(e) if e.code() == ErrorCode::NoSuchSession => None,
                Err(e) => return Err(e),
            }
        };
        let request = Request::Attach {
            identifier: config.identifier.clone(),
            config: stored.map_or_else(|| config.config.clone(), |stored| config.merged_with(&stored)),
            takeover: config.takeover,
        };
        // Route first: the replay follows the attach response immediately.
        let handle = client.route(&config.identifier, request.clone()).ok_or_else(already_attached)?;
        let route = handle.token;
        let session = Session {
            shared: Arc::new(SessionShared {
                client: client.clone(),
                identifier: config.identifier.clone(),
                route,
                tasks: Mutex::new(HashMap::new()),
                forgotten: Mutex::default(),
                signals: Signals::default(),
                detach: Arc::default(),
            }),
        };
        match client.request(request).await {
            Ok(Response::Session(_)) => {
                // Attached: dropping `session` unroutes it and detaches it in the daemon too
                // (else the daemon would go on sending this connection its events).
                apply_policy(client, &config).await?;
            }
            Ok(other) => {
                client.unroute(&config.identifier, route);
                return Err(Error::UnexpectedResponse { expected: "session", got: other.kind() });
            }
            Err(e) => {
                client.unroute(&config.identifier, route);
                return Err(e);
            }
        }
        let (runtime_alive, watching) = watch_runtime();
        session.shared.detach.thread_runs();
        let dispatcher = Dispatcher {
            session: Arc::downgrade(&session.shared),
            detach: session.shared.detach.clone(),
            client: client.clone(),
            identifier: config.identifier.clone(),
            delegate,
            runtime: tokio::runtime::Handle::current(),
            runtime_alive,
            _watching: watching,
            pending_acks: Vec::new(),
            acks_in_flight: Vec::new(),
            handled: std::collections::BTreeSet::new(),
            acks_failing: false,
            finish_owed: false,
            kept: HashSet::new(),
            kept_challenges: HashSet::new(),
            overflowed: handle.overflowed,
            ask_again_at: None,
            delivered: false,
        };
        let events = handle.events;
        let (done, done_rx) = std::sync::mpsc::channel::<()>();
        if let Ok(mut slot) = session.shared.signals.dispatcher_done.lock() {
            *slot = Some(done_rx);
        }
        let thread = std::thread::Builder::new()
            .name(format!("dlsession-{}", config.identifier.chars().take(20).collect::<String>()))
            .spawn(move || {
                // Dropped when the thread ends: `blocking::Session` waits for that.
                let _done = done;
                dispatcher.run(events)
            })
            .map_err(|e| {
                Error::Invalid(ErrorInfo::new(ErrorCode::Internal, format!("cannot start delegate thread: {e}")))
            })?;
        let _ = session.shared.signals.dispatcher.set(thread.thread().id());
        Ok(session)
    }
}

/// Stores the policy parts the app set (the rest keep their stored values), and whether
/// the session keeps cookies and its proxy if the app said. What the app's input can make
/// fail goes first (certificate files read by the daemon, then the proxy's URL), so a
/// refusal leaves the other settings as they were.
async fn apply_policy(client: &Client, config: &SessionConfiguration) -> Result<()> {
    let identifier = || config.identifier.clone();
    if let Some(cert) = &config.client_cert {
        client.request_ok(Request::SetSessionClientCert { identifier: identifier(), cert: cert.clone() }).await?;
    }
    if let Some(proxy) = &config.proxy {
        client.request_ok(Request::SetSessionProxy { identifier: identifier(), proxy: proxy.clone() }).await?;
    }
    if let Some(enabled) = config.cookies {
        client.request_ok(Request::SetSessionCookies { identifier: identifier(), enabled }).await?;
    }
    if let Some(answers) = config.challenges {
        client.request_ok(Request::SetSessionChallenges { identifier: identifier(), answers }).await?;
    }
    if config.policy_over(dlsession_proto::SessionPolicy::default()).is_none() {
        return Ok(());
    }
    let identifier = config.identifier.clone();
    let stored = match client.request(Request::GetSessionPolicy { identifier: identifier.clone() }).await? {
        Response::SessionPolicy(p) => p,
        other => return Err(Error::UnexpectedResponse { expected: "session_policy", got: other.kind() }),
    };
    let Some(policy) = config.policy_over(stored).filter(|p| *p != stored) else { return Ok(()) };
    client.request_ok(Request::SetSessionPolicy { identifier, policy }).await
}

/// Runs the delegate on its own thread, in event order, acknowledging after each call.
///
/// It holds the session weakly: when the app drops its last handle, the session detaches
/// and this thread ends.
struct Dispatcher {
    session: std::sync::Weak<SessionShared>,
    /// Its own handle on the connection: what the app handled is acknowledged even after the
    /// app dropped its session (else those events came again, their files gone).
    client: crate::connection::Client,
    identifier: String,
    /// Whether this thread sends the `Detach` of a session the app dropped.
    detach: Arc<crate::session::DetachDuty>,
    delegate: Arc<dyn SessionDelegate>,
    runtime: tokio::runtime::Handle,
    /// Cleared when the app's runtime shuts down (the process is exiting): then nothing
    /// is run on it any more (its timers would panic).
    runtime_alive: Arc<AtomicBool>,
    /// Dropped with the dispatcher: ends the task that watches the runtime.
    _watching: tokio::sync::oneshot::Sender<()>,
    pending_acks: Vec<u64>,
    /// Acknowledgements sent without waiting (in order, at once), with their answers to come.
    acks_in_flight: Vec<(Vec<u64>, AckAnswer)>,
    /// Events the delegate handled whose acknowledgement is not known durable yet: one that
    /// comes again (a replay after a reconnect) is acknowledged again, not handed to the
    /// delegate a second time (it would move a file it moved already).
    handled: std::collections::BTreeSet<u64>,
    /// Acknowledgements have been failing since the last one that worked: said once at
    /// warn (they are sent again every second), the rest at debug.
    acks_failing: bool,
    /// `finished_events` came while acknowledgements failed or went unanswered: the app
    /// hears it only once they are durable (sent again every `ASK_AGAIN_RETRY` until then).
    finish_owed: bool,
    /// Tasks whose file the app kept for later (`Handled::Later`): none of their events is
    /// acknowledged in this attachment.
    kept: HashSet<TaskId>,
    /// Tasks whose challenge the app left for later: that one event is not acknowledged
    /// (counted in `kept_events`). The task's next event means an answer (or a stop) came
    /// and the daemon withdrew the challenge: it no longer counts, and later events are
    /// acknowledged as usual.
    kept_challenges: HashSet<TaskId>,
    /// The queue overflowed and events were dropped: ask for them again once caught up.
    overflowed: Arc<crate::connection::Overflow>,
    /// Asking again failed: not before then (it is tried until it works).
    ask_again_at: Option<std::time::Instant>,
    /// Durable events were handed to the delegate since it last heard "finished events":
    /// only then does it hear it again (an attach with nothing to deliver says nothing).
    delivered: bool,
}

/// A flag cleared when the current runtime shuts down (its tasks are dropped then), and
/// the sender whose drop ends the watching task earlier.
fn watch_runtime() -> (Arc<AtomicBool>, tokio::sync::oneshot::Sender<()>) {
    struct Clear(Arc<AtomicBool>);
    impl Drop for Clear {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let alive = Arc::new(AtomicBool::new(true));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let clear = Clear(alive.clone());
    tokio::spawn(async move {
        let _clear = clear;
        let _ = rx.await;
    });
    (alive, tx)
}

type AckAnswer = tokio::sync::oneshot::Receiver<std::result::Result<Response, ErrorInfo>>;

/// How long after a failed attempt the dropped events are asked for again (and failed
/// acknowledgements sent again).
const ASK_AGAIN_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Acknowledgements are sent in batches of at most this many.
const ACK_BATCH: usize = 64;

impl Drop for Dispatcher {
    /// Whichever way the thread ends (a panicking delegate, a thread that never started), a
    /// detach it owes is sent.
    fn drop(&mut self) {
        self.detach_if_owed();
    }
}

impl Dispatcher {
    fn run(mut self, mut events: mpsc::Receiver<Routed>) {
        loop {
            let routed = match events.try_recv() {
                Ok(e) => e,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Idle: acknowledge what has been handled, catch up on what did not fit
                    // the queue, then wait.
                    self.flush_acks(false);
                    let due = self.ask_again_at.is_none_or(|at| at <= std::time::Instant::now());
                    if self.overflowed.is_set() && due {
                        self.ask_again();
                    }
                    if self.finish_owed && due && !self.finish_events() {
                        break;
                    }
                    // Acknowledgements refused, or not answered yet, are looked at again (and
                    // sent again) every `ASK_AGAIN_RETRY` even when no event comes; not while
                    // there is no connection (the next one sends them, after its replay).
                    let acking = (!self.pending_acks.is_empty() || !self.acks_in_flight.is_empty())
                        && self.client.is_connected();
                    if acking && self.ask_again_at.is_none_or(|at| at <= std::time::Instant::now()) {
                        self.ask_again_at = Some(std::time::Instant::now() + ASK_AGAIN_RETRY);
                    }
                    let retrying = self.overflowed.is_set() || self.finish_owed || acking;
                    let next = match self.ask_again_at {
                        // Asking again waits: for an event, or until it is due.
                        Some(at) if retrying => {
                            let wait = at.saturating_duration_since(std::time::Instant::now());
                            // The timer is made on the runtime: outside it, making one panics.
                            match self.block_on(async { tokio::time::timeout(wait, events.recv()).await }) {
                                Some(Ok(e)) => e,
                                Some(Err(_)) => continue,
                                None => events.blocking_recv(),
                            }
                        }
                        _ => events.blocking_recv(),
                    };
                    match next {
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
                    // What it handled before is acknowledged durably before the session ends:
                    // its process may exit as soon as it hears (a file it moved already
                    // would come again, from a cache that no longer has it).
                    self.flush_acks(true);
                    if let Some(shared) = self.session.upgrade() {
                        if shared.client.unroute(&shared.identifier, shared.route) {
                            let _ =
                                shared.client.send_request(Request::Detach { identifier: shared.identifier.clone() });
                        }
                        shared.signals.end(Ended::Here("the session delegate panicked"));
                    }
                    return;
                }
            }
        }
        // What was handled is acknowledged before the thread ends, the app's handle gone or
        // not (its process may exit next: those files must not come again). A dropped
        // session's detach goes behind the acknowledgements, which the daemon applies first.
        self.flush_acks(false);
        self.detach_if_owed();
        self.flush_acks(true);
        if let Some(shared) = self.session.upgrade() {
            // A `Detached` from the daemon was recorded first; else this process detached.
            shared.signals.end(Ended::Here("this process detached it"));
        }
        debug!(session = %self.identifier, "delegate thread exiting");
    }

    /// Sends the detach of a session the app dropped, if this thread owes it.
    fn detach_if_owed(&self) {
        if self.detach.thread_ends() {
            self.client.detach_unless_routed(&self.identifier);
        }
    }

    /// Returns false when the session is over for this process.
    fn handle(&mut self, event: Event) -> bool {
        let Some(shared) = self.session.upgrade() else { return false };
        let session = Session { shared };
        let d = self.delegate.clone();
        match event {
            Event::Durable { seq, event, .. }
                if event.task().is_some_and(|t| session.shared.client.was_withdrawn(t)) =>
            {
                // A task of a batch that was refused: never the app's.
                self.pending_acks.push(seq);
            }
            Event::Durable { seq, .. } if self.handled.contains(&seq) => {
                // Handled before, its acknowledgement lost with a connection: acknowledged
                // again, not handed over again.
                let sent = self.acks_in_flight.iter().any(|(seqs, _)| seqs.contains(&seq));
                if !sent && !self.pending_acks.contains(&seq) {
                    self.pending_acks.push(seq);
                }
            }
            Event::Durable { seq, event, .. } => {
                self.delivered = true;
                session.shared.signals.unsettled.store(true, Ordering::Release);
                if event.task().is_some_and(|t| self.kept_challenges.remove(&t)) {
                    session.shared.signals.kept_events.fetch_sub(1, Ordering::AcqRel);
                    session.shared.signals.kept_challenges.fetch_sub(1, Ordering::AcqRel);
                }
                let mut keep_this = false;
                let seen = match &event {
                    DurableEvent::ResumedAtOffset { task, offset, expected_total } => {
                        let t = self.task(&session, *task);
                        d.did_resume_at_offset(&session, &t, *offset, *expected_total);
                        SessionEvent::ResumedAtOffset { task: *task, offset: *offset, expected_total: *expected_total }
                    }
                    DurableEvent::FinishedDownloading { task, location } => {
                        let t = self.task(&session, *task);
                        let handled = d.finish_downloading(&session, &t, Path::new(location));
                        if handled == Handled::Later {
                            self.kept.insert(*task);
                        }
                        let kept = handled == Handled::Later;
                        SessionEvent::FinishedDownloading { task: *task, location: location.into(), kept }
                    }
                    DurableEvent::Completed { task, error } => {
                        let t = self.task(&session, *task);
                        d.did_complete_with_error(&session, &t, error.as_ref());
                        // Its last event: the handle is not kept for ever (an app that made a
                        // million tasks held a million handles). The app's own clones stay.
                        session.forget_task(*task);
                        SessionEvent::Completed { task: *task, error: error.clone() }
                    }
                    DurableEvent::DidBecomeInvalid { error } => {
                        d.did_become_invalid(&session, error.as_ref());
                        SessionEvent::BecameInvalid { error: error.clone() }
                    }
                    DurableEvent::Challenge { task, challenge } => {
                        let t = self.task(&session, *task);
                        let answer = d.did_receive_challenge(&session, &t, challenge);
                        let answered = answer.is_some();
                        match answer {
                            Some(answer) => self.answer(&session, *task, challenge.round, answer),
                            // Left for later: unacknowledged, it comes again on the next attach
                            // unless answered meanwhile (an answer withdraws it).
                            None => {
                                if self.kept_challenges.insert(*task) {
                                    session.shared.signals.kept_challenges.fetch_add(1, Ordering::AcqRel);
                                }
                                keep_this = true;
                            }
                        }
                        SessionEvent::Challenge { task: *task, challenge: challenge.clone(), answered }
                    }
                    DurableEvent::UploadResponse { task, status, headers, body, body_truncated } => {
                        let t = self.task(&session, *task);
                        let response = crate::UploadResponse {
                            status: *status,
                            headers: headers.clone(),
                            body: body.into(),
                            body_truncated: *body_truncated,
                        };
                        if d.upload_response(&session, &t, &response) == Handled::Later {
                            self.kept.insert(*task);
                        }
                        SessionEvent::UploadResponse { task: *task, response }
                    }
                };
                session.shared.signals.streams.offer(&seen);
                if keep_this || event.task().is_some_and(|t| self.kept.contains(&t)) {
                    session.shared.signals.kept_events.fetch_add(1, Ordering::AcqRel);
                    return true;
                }
                self.pending_acks.push(seq);
                self.handled.insert(seq);
                if self.pending_acks.len() >= ACK_BATCH {
                    self.flush_acks(false);
                }
            }
            Event::Progress { task, bytes_written, total_bytes_written, total_bytes_expected, .. } => {
                let t = self.task(&session, task);
                d.did_write_data(&session, &t, bytes_written, total_bytes_written, total_bytes_expected);
                let seen = SessionEvent::Progress { task, bytes_written, total_bytes_written, total_bytes_expected };
                session.shared.signals.streams.offer(&seen);
            }
            Event::SendProgress { task, bytes_sent, total_bytes_sent, total_bytes_expected_to_send, .. } => {
                let t = self.task(&session, task);
                d.did_send_body_data(&session, &t, bytes_sent, total_bytes_sent, total_bytes_expected_to_send);
                let seen =
                    SessionEvent::SendProgress { task, bytes_sent, total_bytes_sent, total_bytes_expected_to_send };
                session.shared.signals.streams.offer(&seen);
            }
            Event::FinishedEvents { .. } => {
                self.finish_owed = true;
                return self.finish_events();
            }
            Event::Detached { reason, .. } => {
                self.flush_acks(false);
                // Unrouted first, so the delegate may attach again from the callback.
                session.shared.client.unroute(session.identifier(), session.shared.route);
                d.did_detach(&session, reason);
                session.shared.signals.streams.offer(&SessionEvent::Detached(reason));
                session.shared.signals.end(Ended::Daemon(reason));
                return false;
            }
            Event::Wake { .. } | Event::TaskUpdate(_) => {}
        }
        true
    }

    /// Tells the app every event is delivered, once every acknowledgement is durable
    /// (else it would rest, and be woken for the same events again); until then, tried
    /// again every `ASK_AGAIN_RETRY`. Returns false when the session is over here.
    fn finish_events(&mut self) -> bool {
        if !self.flush_acks(true) {
            self.ask_again_at = Some(std::time::Instant::now() + ASK_AGAIN_RETRY);
            return true;
        }
        self.finish_owed = false;
        let Some(shared) = self.session.upgrade() else { return false };
        let session = Session { shared };
        if std::mem::take(&mut self.delivered) {
            self.delegate.did_finish_events_for_background_session(&session);
            session.shared.signals.streams.offer(&SessionEvent::FinishedEvents);
        }
        session.shared.signals.unsettled.store(false, Ordering::Release);
        session.shared.signals.poke();
        true
    }

    /// The connection broke: what was sent on it is lost (it comes again), the app hears.
    fn connection_lost(&mut self, reason: &str) {
        // Answers that cannot come now: sent again on the next connection (their events,
        // replayed by the rejoin, are not handed to the delegate again: `handled`).
        for (seqs, _) in std::mem::take(&mut self.acks_in_flight) {
            self.pending_acks.extend(seqs);
        }
        self.finish_owed = false;
        if let Some(shared) = self.session.upgrade() {
            self.delegate.did_lose_connection(&Session { shared: shared.clone() }, reason);
            shared.signals.streams.offer(&SessionEvent::ConnectionLost { reason: reason.to_owned() });
        }
    }

    fn reconnected(&mut self) {
        // The rejoin replays every unacknowledged event: a kept file comes again too.
        let Some(shared) = self.session.upgrade() else {
            self.kept.clear();
            self.kept_challenges.clear();
            return;
        };
        self.replay_coming(&shared);
        self.delegate.did_reconnect(&Session { shared: shared.clone() });
        shared.signals.streams.offer(&SessionEvent::Reconnected);
    }

    /// A replay of every unacknowledged event is on its way, kept ones too: nothing counts
    /// as kept until it comes again, and the session is not at rest before its
    /// `finished_events`.
    fn replay_coming(&mut self, shared: &SessionShared) {
        self.kept.clear();
        self.kept_challenges.clear();
        shared.signals.unsettled.store(true, Ordering::Release);
        shared.signals.kept_events.store(0, Ordering::Release);
        shared.signals.kept_challenges.store(0, Ordering::Release);
    }

    /// The daemon ended this attachment (`reason`), found out when asking for events.
    fn ended_by_daemon(&self, shared: &Arc<SessionShared>, reason: DetachReason) {
        if shared.client.unroute(&shared.identifier, shared.route) {
            self.delegate.did_detach(&Session { shared: shared.clone() }, reason);
            shared.signals.streams.offer(&SessionEvent::Detached(reason));
            shared.signals.end(Ended::Daemon(reason));
        }
    }

    /// Events were dropped because the queue was full, or a paced delivery sent all it may:
    /// now that the queue is empty, ask for what comes after the last event it took, as
    /// many as half the queue holds (handled ones are acknowledged first).
    fn ask_again(&mut self) {
        self.flush_acks(true);
        // The connection broke: the rejoin's attach replays everything, and its answer ends
        // the asking (looked at again meanwhile, in case it never comes).
        if self.overflowed.rejoining() {
            self.ask_again_at = Some(std::time::Instant::now() + ASK_AGAIN_RETRY);
            return;
        }
        let Some(shared) = self.session.upgrade() else { return };
        let (from_seq, room) = self.overflowed.ask();
        debug!(session = %self.identifier, from_seq, room, "asking for the events the queue could not take");
        // Not at rest before the replay's `finished_events`. (What it kept stays kept: the
        // replay starts after it.)
        shared.signals.unsettled.store(true, Ordering::Release);
        // Events stay dropped until the answer, in its place among them: what came before it
        // is in the replay that follows it; let through earlier, a live event reached the
        // delegate ahead of the older ones the replay brings.
        let reopen = crate::connection::reopen_on_answer(self.overflowed.clone(), true);
        let request = Request::ReplayEvents { identifier: shared.identifier.clone(), from_seq, room };
        // Only on the connection up now: a new one is not attached until its rejoin is answered.
        let Some(answer) = self.block_on(shared.client.request_in_order_here(request, reopen)) else { return };
        match answer {
            Ok(_) => {
                self.ask_again_at = None;
                // The replay asked for ends with its own `finished_events`.
                self.finish_owed = false;
            }
            // Gone (invalidated and removed meanwhile): over, as a rejoin finds it.
            Err(e) if e.code() == ErrorCode::NoSuchSession => self.ended_by_daemon(&shared, DetachReason::Invalidated),
            // Someone else has it now: this attachment is over.
            Err(e) if e.code() == ErrorCode::SessionInUse => self.ended_by_daemon(&shared, DetachReason::TakenOver),
            Err(e) => {
                // The dropped events are still to fetch: asked for again, later.
                warn!(session = %self.identifier, error = %e, "asking for the events again failed; trying again in 1 s");
                self.overflowed.set();
                self.ask_again_at = Some(std::time::Instant::now() + ASK_AGAIN_RETRY);
            }
        }
    }

    /// Sends the pending acknowledgements. With `wait`, returns only once every
    /// acknowledgement sent so far is answered, including earlier batches, or the request
    /// timeout passed (one deadline for them all). True when every one sent so far is
    /// durable; the events of one refused or unanswered are acknowledged again later
    /// (an event acknowledged twice is answered, the second time doing nothing).
    fn flush_acks(&mut self, wait: bool) -> bool {
        let mut durable = true;
        // Answers already in.
        let (mut again, mut failed_seqs) = (Vec::<String>::new(), Vec::new());
        let handled = &mut self.handled;
        self.acks_in_flight.retain_mut(|(seqs, rx)| match rx.try_recv() {
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => true,
            Ok(Err(e)) => {
                again.push(format!("acknowledging events failed ({e}); sending it again"));
                failed_seqs.append(seqs);
                false
            }
            Ok(Ok(_)) => {
                for seq in seqs.iter() {
                    handled.remove(seq);
                }
                false
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                failed_seqs.append(seqs);
                false
            }
        });
        durable &= failed_seqs.is_empty();
        self.pending_acks.append(&mut failed_seqs);
        for failed in again {
            self.ack_failed(&failed);
        }
        // At most `ACK_BATCH` a request (a connection lost with several in flight hands
        // them all back at once).
        while !self.pending_acks.is_empty() {
            let rest = self.pending_acks.split_off(self.pending_acks.len().min(ACK_BATCH));
            let seqs = std::mem::replace(&mut self.pending_acks, rest);
            let request = Request::AckEvents { identifier: self.identifier.clone(), seqs: seqs.clone() };
            match self.client.send_request(request) {
                Ok(rx) => self.acks_in_flight.push((seqs, rx)),
                Err(e) => {
                    self.ack_failed(&format!("acknowledging events failed ({e}); sending it again"));
                    let rest = std::mem::replace(&mut self.pending_acks, seqs);
                    self.pending_acks.extend(rest);
                    durable = false;
                    break;
                }
            }
        }
        if !wait {
            let all = durable && self.acks_in_flight.is_empty();
            self.acks_worked(all);
            return all;
        }
        // A daemon that stopped answering must not freeze the session for long.
        let limit = self.client.request_timeout();
        let deadline = crate::deadline::after_tokio(limit);
        for (seqs, rx) in std::mem::take(&mut self.acks_in_flight) {
            // The app's runtime is gone (it is exiting): the events come again.
            let Some(answer) = self.block_on(async { tokio::time::timeout_at(deadline, rx).await }) else {
                return false;
            };
            let failed = match answer {
                Ok(Ok(Ok(_))) => {
                    for seq in &seqs {
                        self.handled.remove(seq);
                    }
                    continue;
                }
                Ok(Ok(Err(e))) => format!("acknowledging events failed ({e}); sending it again"),
                Ok(Err(_)) => {
                    "the connection closed before an acknowledgement was answered; sending it again".to_owned()
                }
                Err(_) => "dlsessiond did not answer an acknowledgement in time; sending it again".to_owned(),
            };
            self.ack_failed(&failed);
            self.pending_acks.extend(seqs);
            durable = false;
        }
        self.acks_worked(durable);
        durable
    }

    /// Says an acknowledgement failed: at warn the first time since one last worked.
    fn ack_failed(&mut self, what: &str) {
        if std::mem::replace(&mut self.acks_failing, true) {
            debug!(session = %self.identifier, "{what}");
        } else {
            warn!(session = %self.identifier, "{what} (said once until one works again)");
        }
    }

    /// Every acknowledgement so far is durable (`all`): if they had been failing, says so.
    fn acks_worked(&mut self, all: bool) {
        if all && std::mem::take(&mut self.acks_failing) {
            info!(session = %self.identifier, "acknowledging events works again");
        }
    }

    /// Runs `f` on the app's runtime, unless that is shutting down (`None`).
    fn block_on<F: std::future::Future>(&self, f: F) -> Option<F::Output> {
        self.runtime_alive.load(Ordering::Acquire).then(|| self.runtime.block_on(f))
    }

    /// The task handle for an event, fetching its details once if this process has not
    /// seen the task (created by another process, or before a relaunch).
    /// Sends the delegate's answer to a challenge before the event is acknowledged (an
    /// acknowledged challenge without an answer fails its task).
    fn answer(&self, session: &Session, task: TaskId, round: u32, answer: dlsession_proto::ChallengeAnswer) {
        let limit = session.shared.client.request_timeout();
        let request = Request::AnswerChallenge { task, round: Some(round), answer };
        let sent = self.block_on(async { tokio::time::timeout(limit, session.shared.client.request(request)).await });
        match sent {
            Some(Ok(Ok(_))) => {}
            Some(Ok(Err(e))) => warn!(task, error = %e, "answering the challenge failed"),
            Some(Err(_)) => warn!(task, "answering the challenge timed out"),
            None => warn!(task, "answering the challenge: the runtime is gone"),
        }
    }

    fn task(&self, session: &Session, id: TaskId) -> DownloadTask {
        if let Some(t) = session.known_task(id) {
            return t;
        }
        // Only while a link is up: disconnected, the request would wait its whole timeout for
        // each task this process does not know, holding every later event (the notice of
        // the lost connection too).
        let fetched = if session.shared.client.is_connected() {
            self.block_on(session.task_info(id)).and_then(Result::ok)
        } else {
            None
        };
        let found = fetched.is_some();
        let (url, description) = fetched.map(|i| (i.url, i.description)).unwrap_or_default();
        let task = session.task_handle(id, url, description);
        // A handle made without its URL is not remembered: the task's next event asks again.
        if found && let Ok(mut known) = session.shared.tasks.lock() {
            known.insert(id, task.clone());
        }
        task
    }
}
