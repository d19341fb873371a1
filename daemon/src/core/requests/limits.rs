//! Bandwidth limits at every level, changed while downloads run (docs/behaviour.md,
//! "Bandwidth limits"): the daemon's, a session's, a task's. Each is one token bucket that
//! running downloads hold, so a new rate applies to them at once; each is stored. And the
//! policies of sessions and tasks ("Metered networks and battery"), which running tasks
//! follow at once too.

use tracing::info;

use super::{Answer, Handled};
use crate::conn::ConnId;
use crate::core::{After, Core};
use crate::store::Op;
use dlsession_proto::{
    BandwidthLimits, ErrorCode, ErrorInfo, LimitTarget, Response, TaskId, TaskPolicy, TaskPolicyInfo, TaskState,
};

impl Core {
    pub(super) fn set_bandwidth_limit(
        &mut self,
        conn: ConnId,
        id: u64,
        target: LimitTarget,
        rate: Option<u64>,
    ) -> Handled {
        dlsession_proto::validate::bandwidth_limit(rate)?;
        let shown = rate.map_or_else(|| "none".to_owned(), |r| format!("{r} B/s"));
        let op = match target {
            LimitTarget::Global => {
                self.bandwidth.set_rate(rate);
                info!(limit = %shown, "daemon-wide bandwidth limit set");
                Op::SetGlobalLimit(rate)
            }
            LimitTarget::Session { identifier } => {
                let key = self.sessions.key_of(&identifier)?;
                let Some(s) = self.sessions.get_mut(&key) else {
                    return Err(ErrorInfo::new(ErrorCode::NoSuchSession, format!("no session {identifier:?}")));
                };
                let config = dlsession_proto::SessionConfig { bandwidth_limit: rate, ..s.rec.config.clone() };
                if !s.reconfigure(config) && s.rec.config.bandwidth_limit != rate {
                    return Err(ErrorInfo::new(
                        ErrorCode::SessionInvalidated,
                        format!("session {identifier:?} is invalid: its limit no longer matters"),
                    ));
                }
                info!(session = %identifier, limit = %shown, "session bandwidth limit set");
                Op::UpdateSession(s.rec.clone())
            }
            LimitTarget::Task { task } => {
                let Some(t) = self.tasks.get_mut(&task) else {
                    return Err(ErrorInfo::new(ErrorCode::NoSuchTask, format!("no live task {task}")));
                };
                if t.state == TaskState::Completed {
                    return Err(ErrorInfo::new(
                        ErrorCode::InvalidRequest,
                        format!("task {task} is completed: a limit no longer matters"),
                    ));
                }
                t.rec.bandwidth_limit = rate;
                t.limiter.set_rate(rate);
                info!(task, limit = %shown, "task bandwidth limit set");
                Op::UpdateTask(Box::new(t.rec.clone()))
            }
        };
        self.commit(vec![op], vec![After::Reply { conn, id, response: Response::Ok }]);
        Ok(Answer::Later)
    }

    /// Stores the session's policy; its running tasks that the policy now refuses stop,
    /// and waiting ones it now allows start.
    pub(super) fn set_session_policy(
        &mut self,
        conn: ConnId,
        id: u64,
        identifier: &str,
        policy: dlsession_proto::SessionPolicy,
    ) -> Handled {
        let key = self.sessions.key_of(identifier)?;
        let Some(s) = self.sessions.get_mut(&key) else {
            return Err(ErrorInfo::new(ErrorCode::NoSuchSession, format!("no session {identifier:?}")));
        };
        s.rec.policy = policy;
        let op = Op::UpdateSession(s.rec.clone());
        info!(session = %identifier, ?policy, "session policy set");
        self.commit(vec![op], vec![After::Reply { conn, id, response: Response::Ok }]);
        self.enforce_policies();
        Ok(Answer::Later)
    }

    /// Gives tasks their own policy, all or none: an unknown or completed task refuses the
    /// request. Running tasks the policy now refuses stop; held ones it allows start.
    pub(super) fn set_task_policy(&mut self, conn: ConnId, id: u64, tasks: &[TaskId], policy: TaskPolicy) -> Handled {
        // Once each: a task named a million times (it fits a frame) is one update, not a
        // million copies of its record.
        let tasks: std::collections::BTreeSet<TaskId> = tasks.iter().copied().collect();
        self.within_batch_limit(tasks.len(), "tasks")?;
        for task in &tasks {
            match self.tasks.get(task) {
                None => return Err(ErrorInfo::new(ErrorCode::NoSuchTask, format!("no live task {task}"))),
                Some(t) if t.state == TaskState::Completed => {
                    return Err(ErrorInfo::new(
                        ErrorCode::InvalidRequest,
                        format!("task {task} is completed: a policy no longer matters"),
                    ));
                }
                Some(_) => {}
            }
        }
        let mut ops = Vec::with_capacity(tasks.len());
        for task in &tasks {
            if let Some(t) = self.tasks.get_mut(task) {
                t.rec.policy = policy;
                ops.push(Op::UpdateTask(Box::new(t.rec.clone())));
            }
        }
        info!(tasks = tasks.len(), ?policy, "task policy set");
        self.commit(ops, vec![After::Reply { conn, id, response: Response::Ok }]);
        self.enforce_policies();
        Ok(Answer::Later)
    }

    /// Stores the session's own proxy (or drops it: the environment's again); attempts
    /// that start from now on use it.
    pub(super) fn set_session_proxy(
        &mut self,
        conn: ConnId,
        id: u64,
        identifier: &str,
        proxy: Option<dlsession_proto::SessionProxy>,
    ) -> Handled {
        let proxy = proxy.as_ref().map(crate::validate::session_proxy).transpose()?;
        let key = self.sessions.key_of(identifier)?;
        let Some(s) = self.sessions.get_mut(&key) else {
            return Err(ErrorInfo::new(ErrorCode::NoSuchSession, format!("no session {identifier:?}")));
        };
        // Unchanged (an app attaching with the proxy it set before): nothing to write, so
        // it is answered even while the database refuses writes.
        if s.proxy == proxy {
            return self.ok_unchanged(conn, id);
        }
        if let Some(e) = &self.life.storage {
            return Err(e.clone());
        }
        info!(session = %identifier, proxy = ?proxy, "session proxy set");
        s.proxy = proxy.clone();
        self.commit(
            vec![Op::SaveProxy { session: key, proxy }],
            vec![After::Reply { conn, id, response: Response::Ok }],
        );
        Ok(Answer::Later)
    }

    /// A live task's own policy and the one it runs under.
    pub(super) fn task_policy(&self, task: TaskId) -> Result<TaskPolicyInfo, ErrorInfo> {
        let t = self
            .tasks
            .get(&task)
            .ok_or_else(|| ErrorInfo::new(ErrorCode::NoSuchTask, format!("no live task {task}")))?;
        Ok(TaskPolicyInfo { own: t.rec.policy, effective: self.policy_of(t) })
    }

    pub(super) fn bandwidth_limits(&self) -> BandwidthLimits {
        BandwidthLimits {
            global: self.bandwidth.rate(),
            sessions: self
                .sessions
                .iter()
                .filter_map(|(_, s)| Some((s.rec.identifier.clone(), s.rec.config.bandwidth_limit?)))
                .collect(),
            tasks: self.tasks.values().filter_map(|t| Some((t.rec.id, t.rec.bandwidth_limit?))).collect(),
        }
    }
}
