//! The sessions: their records, who is attached, their undelivered durable events.
//!
//! Invariants kept here and nowhere else:
//! - every session is reachable by key and by identifier, and the two maps agree;
//! - a session's `by_task` holds exactly its unacknowledged events' (task, seq) pairs;
//! - sequence numbers only grow, across invalidation too: a session created later under
//!   an old identifier numbers its events after the old one's (`seq_floor`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

use dlsession_proto::{ErrorCode, ErrorInfo, SessionConfig, TaskCounts, TaskId, WakeStatus};

use super::timers::Mono;
use crate::conn::ConnId;
use crate::engine::limiter::RateLimiter;
use crate::model::{EventRecord, SessionKey, SessionRecord};

#[derive(Debug)]
pub(super) struct Session {
    pub rec: SessionRecord,
    pub attached: Option<ConnId>,
    /// Replaying undelivered events to a new attachment: live delivery waits.
    pub replaying: bool,
    /// Highest seq sent to the attached connection.
    pub delivered: u64,
    /// A replay's `finished_events` is owed, once every event is out (a slow reader gets
    /// them a window at a time).
    pub replay_tail: bool,
    /// How many more durable events the attached client has room for, once it has asked
    /// for a paced replay (`ReplayEvents`); `None`: as many as come.
    pub credit: Option<u64>,
    /// Highest seq known committed.
    pub committed: u64,
    /// Unacknowledged durable events (change them through `push_event` / `take_event`).
    pub events: BTreeMap<u64, EventRecord>,
    /// Their (task, seq) pairs: a task's events without looking over the session's (an
    /// acknowledgement by task, a challenge withdrawn, "has this task events pending?").
    by_task: BTreeSet<(TaskId, u64)>,
    /// How many of them are challenges (they wake the app even while other tasks run).
    pending_challenges: u32,
    /// Its tasks held in memory (not its dormant ones).
    pub tasks: BTreeSet<TaskId>,
    /// Its tasks' states, dormant ones included (as suspended).
    pub counts: TaskCounts,
    /// Its suspended tasks still on disk since the start (`core::dormant`).
    pub dormant: u64,
    /// When its app last left, or the daemon started (wall-clock ms): its events expire no
    /// sooner than `wake_initial` after, so an app that comes back after a restart or a
    /// broken connection finds what it kept (`core::retention`).
    pub left_at: u64,
    /// Its tasks that left memory (retired) while some of its tasks are dormant: a read of
    /// its dormant rows may still find one suspended (the retirement not yet committed),
    /// and must not bring it back. Emptied when its rows are taken.
    pub left: HashSet<TaskId>,
    /// Its tasks with a worker.
    pub running: u32,
    pub wake: WakeStatus,
    /// Its events were waiting when the daemon started: until they are all acknowledged,
    /// no wake comes sooner than `wake_initial` after the start (the wake backoff lives in
    /// memory: a daemon restarting in a loop would relaunch the app at each start).
    pub waited_at_start: bool,
    /// When the next wake is due (`wake.next_wake` is the same on the wall clock).
    pub wake_timer: Option<Mono>,
    /// A `wake` went to a running app: when it counts as unanswered (then: relaunch).
    pub wake_unanswered: Option<Mono>,
    /// The session's bandwidth limit (rate 0 when it has none), shared by its downloads.
    pub limiter: Arc<RateLimiter>,
    /// A relaunch is being started (off the core's thread), or waits for a launch slot.
    pub launching: bool,
    /// While the session holds a launch slot: when the slot is given up anyway.
    pub launch_slot_timer: Option<Mono>,
    /// `Wake` requests answered once it has started.
    pub launch_replies: Vec<(ConnId, u64)>,
    /// The process of the latest relaunch by command while it runs and has not attached
    /// (its launch's number and pid): no second one starts beside it (`Core::relaunch`).
    pub launched_process: Option<(u64, u32)>,
    /// Its cookies, shared with its running downloads; `None`: it keeps none. Set by the
    /// core (the jar tells the core when it changed).
    pub cookies: Option<Arc<crate::engine::cookies::CookieJar>>,
    /// Its own proxy (`None`: the daemon's environment).
    pub proxy: Option<dlsession_proto::SessionProxy>,
    /// Its client certificate: the files, and what was read from them (or why not).
    pub client_cert: Option<ClientCert>,
}

/// A session's client certificate as the core holds it.
#[derive(Debug, Clone)]
pub(super) struct ClientCert {
    pub files: dlsession_proto::ClientCertificate,
    pub identity: crate::engine::http::CertState,
}

impl Session {
    fn new(rec: SessionRecord) -> Session {
        let limiter = Arc::new(RateLimiter::new(rec.config.bandwidth_limit));
        Session {
            rec,
            attached: None,
            replaying: false,
            delivered: 0,
            replay_tail: false,
            credit: None,
            committed: 0,
            events: BTreeMap::new(),
            by_task: BTreeSet::new(),
            pending_challenges: 0,
            tasks: BTreeSet::new(),
            counts: TaskCounts::default(),
            dormant: 0,
            left_at: crate::model::now_ms(),
            left: HashSet::new(),
            running: 0,
            wake: WakeStatus::default(),
            waited_at_start: false,
            wake_timer: None,
            wake_unanswered: None,
            limiter,
            launching: false,
            launch_slot_timer: None,
            launch_replies: Vec::new(),
            launched_process: None,
            cookies: None,
            proxy: None,
            client_cert: None,
        }
    }

    /// Takes a new configuration; true if it changed (and must be stored). An invalid
    /// session keeps the one it had.
    pub fn reconfigure(&mut self, config: SessionConfig) -> bool {
        if self.rec.invalid || self.rec.config == config {
            return false;
        }
        // Running downloads hold the same bucket: the new rate applies to them at once
        // (set only when it changed: setting it starts its schedule over).
        if self.limiter.rate() != config.bandwidth_limit {
            self.limiter.set_rate(config.bandwidth_limit);
        }
        self.rec.config = config;
        true
    }

    /// Committed events not yet sent to the attached connection.
    pub fn undelivered(&self) -> impl Iterator<Item = (&u64, &EventRecord)> {
        // (A `BTreeMap` range whose start is past its end panics.)
        let from = self.delivered.saturating_add(1);
        let range = (from <= self.committed).then(|| self.events.range(from..=self.committed));
        range.into_iter().flatten()
    }

    /// Its launch is over (or will not happen): the `wake` requests that waited for it, to
    /// answer.
    pub fn launch_over(&mut self) -> Vec<(ConnId, u64)> {
        self.launching = false;
        std::mem::take(&mut self.launch_replies)
    }

    /// Forgets `conn` as the attached connection, if it is.
    pub fn detach(&mut self, conn: ConnId) {
        if self.attached == Some(conn) {
            self.attached = None;
            self.replaying = false;
            self.replay_tail = false;
            self.credit = None;
        }
    }

    /// The next sequence number, taken.
    pub fn next_seq(&mut self) -> u64 {
        let seq = self.rec.next_seq;
        self.rec.next_seq += 1;
        seq
    }

    /// Adds an unacknowledged event.
    pub fn push_event(&mut self, rec: EventRecord) {
        if let Some(task) = rec.task() {
            self.by_task.insert((task, rec.seq));
        }
        if matches!(rec.event, dlsession_proto::DurableEvent::Challenge { .. }) {
            self.pending_challenges += 1;
        }
        self.events.insert(rec.seq, rec);
    }

    /// Removes an acknowledged event (`None` if it was acknowledged before).
    pub fn take_event(&mut self, seq: u64) -> Option<EventRecord> {
        let ev = self.events.remove(&seq)?;
        if matches!(ev.event, dlsession_proto::DurableEvent::Challenge { .. }) {
            self.pending_challenges = self.pending_challenges.saturating_sub(1);
        }
        if let Some(task) = ev.task() {
            self.by_task.remove(&(task, seq));
        }
        Some(ev)
    }

    /// The task has events nobody acknowledged yet.
    pub fn has_pending(&self, task: TaskId) -> bool {
        self.pending_of(task).next().is_some()
    }

    /// The task's unacknowledged events, in order.
    pub fn pending_of(&self, task: TaskId) -> impl Iterator<Item = (u64, &EventRecord)> {
        self.by_task.range((task, 0)..=(task, u64::MAX)).filter_map(|&(_, seq)| self.events.get(&seq).map(|e| (seq, e)))
    }

    /// Undelivered events, nothing active (or a challenge to answer), nobody attached: the
    /// app should come back (docs/behaviour.md, "Waking the app").
    pub fn has_finished_events(&self) -> bool {
        self.attached.is_none()
            && self.events.range(..=self.committed).next().is_some()
            && (self.counts.active() == 0 || self.pending_challenges > 0)
    }
}

/// Every session, by key and by identifier.
#[derive(Debug)]
pub(super) struct Sessions {
    by_key: HashMap<SessionKey, Session>,
    /// Ordered: sessions are listed (and paged) by identifier.
    by_identifier: BTreeMap<String, SessionKey>,
    next_key: SessionKey,
    /// A new session's first event sequence number (see `store::Op::SetSeqFloor`).
    seq_floor: u64,
}

impl Sessions {
    pub fn new(seq_floor: u64) -> Sessions {
        Sessions { by_key: HashMap::new(), by_identifier: BTreeMap::new(), next_key: 1, seq_floor }
    }

    /// New keys start at `next` or above (ended sessions' rows keep theirs in the history).
    pub fn keys_from(&mut self, next: SessionKey) {
        self.next_key = self.next_key.max(next);
    }

    /// Puts back a session read from the database.
    pub fn restore(&mut self, rec: SessionRecord) {
        self.next_key = self.next_key.max(rec.key + 1);
        self.by_identifier.insert(rec.identifier.clone(), rec.key);
        self.by_key.insert(rec.key, Session::new(rec));
    }

    /// Creates a session; the record returned is what the store must insert.
    pub fn create(&mut self, identifier: String, config: SessionConfig, now: u64) -> SessionRecord {
        let key = self.next_key;
        self.next_key += 1;
        let rec = SessionRecord {
            key,
            identifier: identifier.clone(),
            config,
            next_seq: self.seq_floor.max(1),
            invalidating: false,
            cancelling: false,
            invalid: false,
            created_at: now,
            policy: dlsession_proto::SessionPolicy::default(),
        };
        self.by_key.insert(key, Session::new(rec.clone()));
        self.by_identifier.insert(identifier, key);
        rec
    }

    /// Removes a session; returns it and the new sequence floor (to be stored).
    pub fn remove(&mut self, key: SessionKey) -> Option<(Session, u64)> {
        let s = self.by_key.remove(&key)?;
        self.by_identifier.remove(&s.rec.identifier);
        self.seq_floor = self.seq_floor.max(s.rec.next_seq);
        Some((s, self.seq_floor))
    }

    /// The key the next session gets (keys are never reused).
    pub fn next_key(&self) -> SessionKey {
        self.next_key
    }

    pub fn get(&self, key: &SessionKey) -> Option<&Session> {
        self.by_key.get(key)
    }

    pub fn get_mut(&mut self, key: &SessionKey) -> Option<&mut Session> {
        self.by_key.get_mut(key)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&SessionKey, &Session)> {
        self.by_key.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &Session> {
        self.by_key.values()
    }

    pub fn keys(&self) -> impl Iterator<Item = SessionKey> + '_ {
        self.by_key.keys().copied()
    }

    /// The session named `identifier`, if there is one.
    pub fn find(&self, identifier: &str) -> Option<SessionKey> {
        self.by_identifier.get(identifier).copied()
    }

    /// The session named `identifier`, or `no_such_session`.
    pub fn key_of(&self, identifier: &str) -> Result<SessionKey, ErrorInfo> {
        self.find(identifier)
            .ok_or_else(|| ErrorInfo::new(ErrorCode::NoSuchSession, format!("no session named {identifier:?}")))
    }

    /// The identifier of a session, for logs.
    pub fn identifier(&self, key: SessionKey) -> &str {
        self.by_key.get(&key).map_or("?", |s| s.rec.identifier.as_str())
    }

    /// Sessions in identifier order, from just after `after`.
    pub fn keys_after<'a>(&'a self, after: Option<&'a str>) -> impl Iterator<Item = SessionKey> + 'a {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.by_identifier.range::<str, _>((from, Bound::Unbounded)).map(|(_, key)| *key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlsession_proto::DurableEvent;

    #[test]
    fn identifiers_and_sequence_numbers_stay_consistent() {
        let mut s = Sessions::new(0);
        let a = s.create("a".into(), SessionConfig::default(), 0);
        assert_eq!(s.key_of("a"), Ok(a.key));
        let session = s.get_mut(&a.key).unwrap();
        let seq = session.next_seq();
        session.push_event(EventRecord {
            session: a.key,
            seq,
            event: DurableEvent::Completed { task: 7, error: None },
            created_at: 0,
        });
        assert!(session.has_pending(7));
        assert!(session.take_event(seq).is_some());
        assert!(!session.has_pending(7));
        assert!(session.take_event(seq).is_none(), "acknowledged twice");
        let (_, floor) = s.remove(a.key).unwrap();
        assert!(s.key_of("a").is_err());
        let again = s.create("a".into(), SessionConfig::default(), 0);
        assert_ne!(again.key, a.key);
        assert!(again.next_seq >= floor && floor > seq, "a new session never reuses the old one's numbers");
    }
}
