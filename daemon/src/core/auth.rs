//! Authentication challenges in the core (docs/behaviour.md, "Authentication"): which
//! sessions ask their app, the credentials held for protection spaces and for tasks, a task
//! waiting for its app's answer, and the answer.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tracing::info;

use super::requests::{Answer, Handled};
use super::{After, Core};
use crate::conn::ConnId;
use crate::engine::auth::AuthHeader;
use crate::model::{HeldCredential, SessionKey};
use crate::store::Op;
use dlsession_proto::{
    Challenge, ChallengeAnswer, Credential, CredentialScope, DurableEvent, ErrorCode, ErrorInfo, Header,
    MAX_AUTH_ROUNDS, Response, SessionChallenges, TaskId, TaskState,
};

impl Core {
    pub(super) fn restore_auth(&mut self, answering: Vec<(SessionKey, bool)>, kept: Vec<(SessionKey, HeldCredential)>) {
        self.auth.answering = answering.into_iter().filter(|(_, a)| *a).map(|(k, _)| k).collect();
        for (key, credential) in kept {
            match credential.task {
                Some(task) => self.auth.tasks.entry(task).or_default().push(credential),
                None => self.auth.spaces.entry(key).or_default().push(credential),
            }
        }
    }

    /// The credential headers a task's requests carry: its own, and its session's for
    /// other origins.
    pub(super) fn auth_headers(&self, id: TaskId, key: SessionKey) -> Vec<AuthHeader> {
        let own: &[HeldCredential] = self.auth.tasks.get(&id).map_or(&[], Vec::as_slice);
        let spaces = self.auth.spaces.get(&key).into_iter().flatten();
        let mut held: Vec<&HeldCredential> = own.iter().collect();
        held.extend(spaces.filter(|c| !own.iter().any(|o| o.origin == c.origin && o.proxy == c.proxy)));
        held.into_iter().filter_map(|c| AuthHeader::new(c.origin.clone(), c.proxy, &c.name, &c.value)).collect()
    }

    pub(super) fn answers_challenges(&self, key: SessionKey) -> bool {
        self.auth.answering.contains(&key)
    }

    pub(super) fn set_session_challenges(&mut self, conn: ConnId, id: u64, identifier: &str, answers: bool) -> Handled {
        let key = self.sessions.key_of(identifier)?;
        // Already so: nothing to store, answered even while the database refuses writes.
        if self.answers_challenges(key) == answers {
            return self.ok_unchanged(conn, id);
        }
        if let Some(e) = &self.life.storage {
            return Err(e.clone());
        }
        let mut ops = vec![Op::SaveChallenges { session: key, answers }];
        let mut after = Vec::new();
        if answers {
            self.auth.answering.insert(key);
        } else {
            self.auth.answering.remove(&key);
            self.auth.spaces.remove(&key);
            let tasks: Vec<TaskId> =
                self.sessions.get(&key).map(|s| s.tasks.iter().copied().collect()).unwrap_or_default();
            for task in tasks {
                self.auth.tasks.remove(&task);
                // Nobody will answer what it waits on.
                if self.tasks.get(&task).is_some_and(|t| t.rec.challenge.is_some() && t.state == TaskState::Waiting) {
                    let error = unanswered(self.tasks.get(&task).and_then(|t| t.rec.challenge.as_ref()));
                    self.complete(task, Some(error), &mut ops, &mut after);
                }
            }
            ops.push(Op::DeleteCredentials { session: key, task: None });
        }
        info!(session = %identifier, answers, "session challenges switched");
        after.push(After::Reply { conn, id, response: Response::Ok });
        self.commit(ops, after);
        Ok(Answer::Later)
    }

    pub(super) fn session_challenges(&self, identifier: &str) -> Result<SessionChallenges, ErrorInfo> {
        let key = self.sessions.key_of(identifier)?;
        let tasks: Vec<&HeldCredential> = self
            .sessions
            .get(&key)
            .map(|s| s.tasks.iter().filter_map(|t| self.auth.tasks.get(t)).flatten().collect())
            .unwrap_or_default();
        let held: Vec<&HeldCredential> = self.auth.spaces.get(&key).into_iter().flatten().chain(tasks).collect();
        Ok(SessionChallenges {
            answers: self.answers_challenges(key),
            credentials: u32::try_from(held.len()).unwrap_or(u32::MAX),
            kept: u32::try_from(held.iter().filter(|c| c.kept).count()).unwrap_or(u32::MAX),
        })
    }

    /// An attempt ended with a challenge. In a session that answers them the task now
    /// waits for its app (a `challenge` event), or fails after `MAX_AUTH_ROUNDS` answers;
    /// false: the session does not answer, the failure goes on as any other.
    pub(super) fn on_challenge(&mut self, id: TaskId, challenge: Challenge, error: ErrorInfo) -> bool {
        let Some(key) = self.tasks.get(&id).map(|t| t.rec.session) else { return false };
        if !self.answers_challenges(key) {
            return false;
        }
        let round = {
            let n = self.auth.rounds.entry(id).or_default();
            *n += 1;
            *n
        };
        let (mut ops, mut after) = (Vec::new(), Vec::new());
        if round > MAX_AUTH_ROUNDS {
            let error = ErrorInfo {
                message: format!("{}; the credentials were refused {MAX_AUTH_ROUNDS} times, giving up", error.message),
                ..error
            };
            self.complete(id, Some(error), &mut ops, &mut after);
            self.commit(ops, after);
            return true;
        }
        let challenge = Challenge { round, ..challenge };
        let Some(t) = self.tasks.get_mut(&id) else { return true };
        t.rec.challenge = Some(challenge.clone());
        t.rec.retry_at = None;
        if let Some(up) = t.rec.upload.as_mut() {
            // A 401 is no request taken: sending it again with credentials repeats nothing.
            up.in_flight = false;
        }
        self.set_state(id, TaskState::Waiting);
        self.arm_challenge_deadline(id);
        info!(session = %self.sessions.identifier(key), task = id, scheme = %challenge.scheme, round, "waiting for the app's credentials");
        let seq = self.emit(key, DurableEvent::Challenge { task: id, challenge }, &mut ops);
        if let Some(t) = self.tasks.get(&id) {
            ops.push(Op::UpdateTask(Box::new(t.rec.clone())));
        }
        after.push(After::Events { session: key, seq });
        self.commit(ops, after);
        true
    }

    /// A task waiting for its app's credentials still has its resource deadline: a timer
    /// then completes it (`on_task_timer`), as a retry that would come after it does.
    pub(super) fn arm_challenge_deadline(&mut self, id: TaskId) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        let Some(deadline) = t.rec.resource_deadline else { return };
        let at = self.timers.at_wall(deadline);
        t.timer = Some(at);
        self.timers.set(at, super::Timer::Retry(id));
    }

    /// A wait for credentials outlived the task's resource deadline: it completes (unless
    /// the wall clock was set back meanwhile: then its timer is armed again).
    pub(super) fn on_challenge_deadline(&mut self, id: TaskId) {
        let deadline = self.tasks.get(&id).and_then(|t| t.rec.resource_deadline);
        if deadline.is_some_and(|d| crate::model::now_ms() < d) {
            return self.arm_challenge_deadline(id);
        }
        let error = out_of_time(self.tasks.get(&id).and_then(|t| t.rec.challenge.as_ref()));
        let (mut ops, mut after) = (Vec::new(), Vec::new());
        self.complete(id, Some(error), &mut ops, &mut after);
        self.commit(ops, after);
    }

    pub(super) fn answer_challenge(
        &mut self,
        conn: ConnId,
        id: u64,
        task: TaskId,
        round: Option<u32>,
        answer: ChallengeAnswer,
    ) -> Handled {
        let Some(t) = self.tasks.get(&task) else { return Err(super::requests::no_such_task(task)) };
        let Some(challenge) = t.rec.challenge.clone().filter(|_| t.state == TaskState::Waiting) else {
            return Err(ErrorInfo::new(
                ErrorCode::InvalidRequest,
                format!("task {task} is not waiting for credentials (it is {})", t.state),
            ));
        };
        // An answer meant for an earlier challenge (perhaps from another origin) would send
        // its credential where it does not belong.
        if let Some(round) = round.filter(|r| *r != challenge.round) {
            return Err(ErrorInfo::new(
                ErrorCode::InvalidRequest,
                format!(
                    "the answer is to challenge {round} of task {task}, which now waits on challenge {} ({} at {})",
                    challenge.round, challenge.scheme, challenge.origin
                ),
            ));
        }
        if let ChallengeAnswer::Use { credential: Credential::Basic { user, .. }, .. } = &answer
            && user.contains(':')
        {
            return Err(ErrorInfo::new(ErrorCode::InvalidRequest, "a Basic user name cannot contain ':' (RFC 7617)"));
        }
        // A proxy forwards other headers to the servers behind it: its credential would go
        // with them.
        if let ChallengeAnswer::Use { credential: Credential::Header { name, .. }, .. } = &answer
            && challenge.proxy
            && !name.to_ascii_lowercase().starts_with("proxy-")
        {
            return Err(ErrorInfo::new(
                ErrorCode::InvalidRequest,
                format!(
                    "a proxy's credential goes in a Proxy-* header, not {name:?}, which the proxy would pass on to servers"
                ),
            ));
        }
        // Nor may it be a header that frames an upload's body (it would replace the daemon's
        // own on a resumed upload's `PATCH`).
        if let ChallengeAnswer::Use { credential: Credential::Header { name, .. }, .. } = &answer
            && (dlsession_proto::validate::is_upload_framing_header(name) || name.eq_ignore_ascii_case("content-type"))
        {
            return Err(ErrorInfo::new(
                ErrorCode::InvalidRequest,
                format!("{name:?} cannot carry a credential: it describes the request's body"),
            ));
        }
        let key = t.rec.session;
        let (mut ops, mut after) = (Vec::new(), vec![After::Reply { conn, id, response: Response::Ok }]);
        match answer {
            ChallengeAnswer::Cancel => {
                let by = self.conns.describe(conn);
                self.complete(task, Some(super::transitions::cancelled(&by)), &mut ops, &mut after);
            }
            ChallengeAnswer::Fail => self.complete(task, Some(unanswered(Some(&challenge))), &mut ops, &mut after),
            ChallengeAnswer::Use { credential, scope, keep } => {
                let (name, value) = header_of(&credential, challenge.proxy);
                crate::validate::headers(&[Header::new(name.clone(), value.clone())], &self.cfg.limits)?;
                let held = HeldCredential {
                    task: (scope == CredentialScope::Task).then_some(task),
                    origin: challenge.origin.clone(),
                    proxy: challenge.proxy,
                    name,
                    value,
                    kept: keep,
                };
                let same = |c: &HeldCredential| c.origin == held.origin && c.proxy == held.proxy;
                let slot = match scope {
                    CredentialScope::Task => self.auth.tasks.entry(task).or_default(),
                    CredentialScope::ProtectionSpace => {
                        // The space's credential is the one to send now, not an older one of
                        // the task's own.
                        if let Some(own) = self.auth.tasks.get_mut(&task) {
                            if own.iter().any(|c| same(c) && c.kept) {
                                ops.push(forget(key, Some(task), &held));
                            }
                            own.retain(|c| !same(c));
                        }
                        self.auth.spaces.entry(key).or_default()
                    }
                };
                // Replacing a kept one: the stored one goes too, even if this one is not kept.
                if slot.iter().any(|c| same(c) && c.kept) && !keep {
                    ops.push(forget(key, held.task, &held));
                }
                slot.retain(|c| !same(c));
                if keep {
                    ops.push(Op::SaveCredential { session: key, credential: held.clone() });
                }
                slot.push(held);
                ops.extend(self.drop_challenge(task));
                self.commit(ops, Vec::new());
                self.retry_now(task, true, after);
                self.schedule();
                return Ok(Answer::Later);
            }
        }
        self.commit(ops, after);
        Ok(Answer::Later)
    }

    /// A challenge event was acknowledged: if its task still waits on that very challenge,
    /// nobody answered it, and it fails as `Fail` would.
    pub(super) fn challenge_acknowledged(
        &mut self,
        task: TaskId,
        round: u32,
        ops: &mut Vec<Op>,
        after: &mut Vec<After>,
    ) {
        let waits = self
            .tasks
            .get(&task)
            .filter(|t| t.state == TaskState::Waiting)
            .and_then(|t| t.rec.challenge.as_ref())
            .filter(|c| c.round == round)
            .cloned();
        if let Some(challenge) = waits {
            self.complete(task, Some(unanswered(Some(&challenge))), ops, after);
        }
    }

    /// The task no longer waits on its challenge (answered, requeued, suspended,
    /// completed): it is forgotten, and its unacknowledged challenge events are withdrawn (the
    /// ops returned), as if acknowledged, so an app (or `dlsessionctl attach`) is not asked
    /// again about a question nobody waits on.
    pub(super) fn drop_challenge(&mut self, task: TaskId) -> Vec<Op> {
        let mut ops = Vec::new();
        if self.tasks.get_mut(&task).and_then(|t| t.rec.challenge.take()).is_none() {
            return ops;
        }
        self.withdraw_challenges(task, &mut ops);
        ops
    }

    fn withdraw_challenges(&mut self, task: TaskId, ops: &mut Vec<Op>) {
        let Some(key) = self.tasks.get(&task).map(|t| t.rec.session) else { return };
        let Some(s) = self.sessions.get_mut(&key) else { return };
        let seqs: Vec<u64> = s
            .pending_of(task)
            .filter(|(_, e)| matches!(e.event, DurableEvent::Challenge { .. }))
            .map(|(seq, _)| seq)
            .collect();
        if seqs.is_empty() {
            return;
        }
        for seq in &seqs {
            s.take_event(*seq);
        }
        ops.push(Op::DeleteEvents { session: key, seqs });
    }

    /// A task restored waiting on challenge `round`.
    pub(super) fn seed_auth_rounds(&mut self, task: TaskId, round: u32) {
        self.auth.rounds.insert(task, round);
    }

    /// A session is gone (its rows go with `DeleteSession`).
    pub(super) fn forget_session_auth(&mut self, key: SessionKey) {
        self.auth.answering.remove(&key);
        self.auth.spaces.remove(&key);
    }

    /// A task is done: its own credential and rounds go.
    pub(super) fn forget_task_auth(&mut self, task: TaskId, key: SessionKey, ops: &mut Vec<Op>) {
        self.auth.rounds.remove(&task);
        if self.auth.tasks.remove(&task).is_some_and(|own| own.iter().any(|c| c.kept)) {
            ops.push(Op::DeleteCredentials { session: key, task: Some(task) });
        }
    }
}

/// The store op that forgets the kept credential of `task` (or the space) for `held`'s slot.
fn forget(session: SessionKey, task: Option<TaskId>, held: &HeldCredential) -> Op {
    Op::ForgetCredential { session, task, origin: held.origin.clone(), proxy: held.proxy }
}

/// The header a credential is sent as.
fn header_of(credential: &Credential, proxy: bool) -> (String, String) {
    let authorization = if proxy { "Proxy-Authorization" } else { "Authorization" };
    match credential {
        Credential::Basic { user, password } => {
            (authorization.into(), format!("Basic {}", STANDARD.encode(format!("{user}:{password}"))))
        }
        Credential::Bearer { token } => (authorization.into(), format!("Bearer {token}")),
        Credential::Header { name, value } => (name.clone(), value.clone()),
    }
}

/// A wait for credentials that outlived the task's `timeout_for_resource`.
fn out_of_time(challenge: Option<&Challenge>) -> ErrorInfo {
    let unanswered = unanswered(challenge);
    ErrorInfo {
        code: ErrorCode::TimedOut,
        message: format!(
            "timeout_for_resource ran out while waiting for the app's credentials: {}",
            unanswered.message
        ),
        ..unanswered
    }
}

/// How a task fails when its challenge goes unanswered: with the server's status.
fn unanswered(challenge: Option<&Challenge>) -> ErrorInfo {
    let proxy = challenge.is_some_and(|c| c.proxy);
    let (status, who, text) = if proxy {
        (407, "the proxy", "407 Proxy Authentication Required")
    } else {
        (401, "server", "401 Unauthorized")
    };
    let scheme = challenge.map_or_else(String::new, |c| format!(" ({} at {})", c.scheme, c.origin));
    ErrorInfo::http(status, format!("{who} answered {text}{scheme}; no credentials were given"))
}
