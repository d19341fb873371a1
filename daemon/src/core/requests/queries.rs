//! Requests that only read: status, one task, pages of sessions and tasks, watching.
//! Pages stay well under a frame (`PAGE_BUDGET`), whatever the tasks carry.

use std::collections::HashMap;

use super::{Answer, Handled, no_such_task};
use crate::conn::ConnId;
use crate::core::Core;
use crate::core::conns::Watch;
use crate::model::{SessionKey, now_ms};
use dlsession_proto::{
    DaemonStatus, ErrorCode, ErrorInfo, LaunchSpec, PROTOCOL_VERSION, Response, ServerMessage, SessionInfo,
    SessionPage, SessionQuery, TaskId, TaskInfo, TaskPage, TaskQuery, TaskState, WaitReason, WatchFilter,
};

/// Largest page of `ListTasks`, and the byte budget that keeps it well under a frame.
const MAX_PAGE: usize = 1000;
const PAGE_BUDGET: usize = 512 << 10;

impl Core {
    pub(super) fn status(&self) -> DaemonStatus {
        let now = now_ms();
        DaemonStatus {
            daemon_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION,
            pid: std::process::id(),
            started_at: self.stats.started_at,
            uptime_ms: now.saturating_sub(self.stats.started_at),
            socket: self.cfg.socket.display().to_string(),
            state_dir: self.cfg.state_dir.display().to_string(),
            cache_dir: self.cfg.cache_dir.display().to_string(),
            database: self.cfg.database_path().display().to_string(),
            tasks: self.tasks.counts(),
            sessions: self.sessions.len() as u64,
            connections: self.conns.len() as u64,
            download_rate: self.stats.download_rate,
            bytes_downloaded: self.stats.bytes_downloaded,
            max_concurrent_downloads: self.cfg.limits.max_concurrent_downloads,
            storage: self.life.storage.clone(),
        }
    }

    pub(super) fn get_task(&mut self, conn: ConnId, id: u64, task: TaskId) -> Handled {
        if let Some(t) = self.tasks.get(&task) {
            return Ok(Answer::Now(Response::Task(self.task_detail(t))));
        }
        // Not live: it may be history in the database.
        let store = self.store.clone();
        let out = self.conns.get(&conn).map(|c| c.handle.clone());
        let names: HashMap<SessionKey, String> =
            self.sessions.iter().map(|(k, s)| (*k, s.rec.identifier.clone())).collect();
        tokio::spawn(async move {
            let result = match store.load_task(task).await {
                Ok(Some((rec, stored))) => {
                    let name = names.get(&rec.session).cloned().unwrap_or(stored);
                    Ok(Response::Task(crate::core::convert::history_detail(rec, name)))
                }
                Ok(None) => Err(no_such_task(task)),
                Err(e) => Err(ErrorInfo::new(ErrorCode::Internal, format!("cannot read task {task}: {e}"))),
            };
            if let Some(out) = out {
                out.send(ServerMessage::Response { id, result });
            }
        });
        Ok(Answer::Later)
    }

    /// Every session (protocol 1 has no pages: all, or an error if it does not fit a frame).
    pub(super) fn all_sessions(&self) -> Vec<SessionInfo> {
        self.sessions.keys_after(None).filter_map(|k| self.session_info(k).ok()).collect()
    }

    /// One page of sessions after `query.after`, in identifier order, within the byte budget.
    pub(super) fn list_sessions(&self, query: SessionQuery) -> SessionPage {
        let limit = page_limit(query.limit);
        let mut sessions = Vec::new();
        let mut budget = PAGE_BUDGET;
        let mut next_after = None;
        for key in self.sessions.keys_after(query.after.as_deref()) {
            let Ok(info) = self.session_info(key) else { continue };
            let cost = session_cost(&info);
            // A page holds at least one session, however large: else a session bigger than
            // the budget would end every listing before it.
            if sessions.len() == limit || (cost > budget && !sessions.is_empty()) {
                next_after = sessions.last().map(|i: &SessionInfo| i.identifier.clone());
                break;
            }
            budget = budget.saturating_sub(cost);
            sessions.push(info);
        }
        SessionPage { sessions, next_after }
    }

    pub(super) fn list_tasks(&self, query: TaskQuery) -> Handled {
        let limit = page_limit(query.limit);
        let after = query.after.map_or(0, |a| a.saturating_add(1));
        let ids: Box<dyn Iterator<Item = TaskId>> = match &query.session {
            Some(name) => {
                let key = self.sessions.key_of(name)?;
                let s = self
                    .sessions
                    .get(&key)
                    .ok_or_else(|| ErrorInfo::new(ErrorCode::NoSuchSession, format!("no session named {name:?}")))?;
                Box::new(s.tasks.range(after..).copied())
            }
            None => Box::new(self.tasks.ids_from(after)),
        };
        // Which states, once each: a filter repeating one state a million times (it fits a
        // frame) is not scanned for every task.
        let wanted: Vec<TaskState> = TaskState::ALL.into_iter().filter(|s| query.states.contains(s)).collect();
        let mut tasks = Vec::new();
        let mut budget = PAGE_BUDGET;
        let mut next_after = None;
        for id in ids {
            let Some(t) = self.tasks.get(&id) else { continue };
            if !wanted.is_empty() && !wanted.contains(&t.state) {
                continue;
            }
            let info = self.task_info(t);
            let cost = task_cost(&info);
            if tasks.len() == limit || (cost > budget && !tasks.is_empty()) {
                next_after = tasks.last().map(|i: &TaskInfo| i.id);
                break;
            }
            budget = budget.saturating_sub(cost);
            tasks.push(info);
        }
        Ok(Answer::Now(Response::Tasks(TaskPage { tasks, next_after })))
    }

    pub(super) fn watch(&mut self, conn: ConnId, filter: WatchFilter) -> Handled {
        let session = match &filter.session {
            Some(name) => Some(self.sessions.key_of(name)?),
            None => None,
        };
        // Start the watcher with the current state of what it asked about.
        let infos: Vec<TaskInfo> = if filter.tasks.is_empty() {
            self.tasks
                .values()
                .filter(|t| session.is_none_or(|k| t.rec.session == k) && t.state != TaskState::Completed)
                .map(|t| self.task_info(t))
                .collect()
        } else {
            // Once each, however often the request names one.
            let tasks: std::collections::BTreeSet<TaskId> = filter.tasks.iter().copied().collect();
            tasks.iter().filter_map(|id| self.tasks.get(id)).map(|t| self.task_info(t)).collect()
        };
        let c = self.conns.get_mut(&conn).ok_or_else(|| ErrorInfo::new(ErrorCode::Internal, "connection gone"))?;
        c.watch = Some(Watch { session, tasks: filter.tasks.into_iter().collect() });
        for info in infos {
            c.handle.mailbox.put_update(info);
        }
        Ok(Answer::Now(Response::Ok))
    }
}

/// A page size asked for (0: the largest), capped.
fn page_limit(asked: u32) -> usize {
    match asked as usize {
        0 => MAX_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// About how many bytes a task takes in a frame (an upper estimate: every string it
/// carries, plus room for its numbers).
fn task_cost(t: &TaskInfo) -> usize {
    let len = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let wait = match &t.wait {
        Some(WaitReason::HostLimit { host, .. }) => host.len(),
        Some(
            WaitReason::Backoff { last_error: e, .. }
            | WaitReason::DestinationUnavailable { error: e, .. }
            | WaitReason::StorageFull { error: e },
        ) => e.message.len(),
        Some(WaitReason::AuthRequired { challenge: c }) => c.scheme.len() + len(&c.realm) + c.origin.len() + 32,
        _ => 0,
    };
    let error = t.error.as_ref().map_or(0, |e| e.message.len());
    let upload = t.upload.as_ref().map_or(0, |u| u.file.len() + 48);
    160 + t.session.len() + t.url.len() + len(&t.description) + len(&t.location) + error + wait + upload
}

/// About how many bytes a session takes in a frame (an upper estimate).
fn session_cost(info: &SessionInfo) -> usize {
    let c = &info.config;
    let launch = match &c.launch {
        Some(LaunchSpec::Command { argv }) => argv.iter().map(|a| a.len() + 4).sum(),
        Some(LaunchSpec::SystemdUnit { unit }) => unit.len(),
        Some(LaunchSpec::DesktopApp { app_id }) => app_id.len(),
        None => 0,
    };
    let headers: usize = c.http_headers.iter().map(|h| h.name.len() + h.value.len() + 8).sum();
    let error = info.wake.last_error.as_ref().map_or(0, |e| e.message.len());
    256 + info.identifier.len() + c.app_id.as_ref().map_or(0, String::len) + launch + headers + error
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlsession_proto::{Challenge, TaskState, UploadInfo, UploadMethod};

    /// The estimate that sizes a page is never below what a task really takes in a frame,
    /// whatever long strings it carries (an upload's file path, a server's challenge).
    #[test]
    fn a_tasks_cost_covers_its_encoded_size() {
        let long = "x".repeat(4000);
        let base = TaskInfo {
            id: 1,
            session: "s".into(),
            state: TaskState::Waiting,
            url: "http://h/f".into(),
            description: None,
            priority: 0.5,
            bytes_received: u64::MAX,
            bytes_expected: Some(u64::MAX),
            speed: u64::MAX,
            location: None,
            error: None,
            created_at: u64::MAX,
            wait: None,
            upload: None,
        };
        let upload = TaskInfo {
            upload: Some(UploadInfo {
                method: UploadMethod::Put,
                file: long.clone(),
                bytes_total: u64::MAX,
                bytes_sent: u64::MAX,
                idempotent: true,
                resumable: true,
            }),
            ..base.clone()
        };
        let challenged = TaskInfo {
            wait: Some(WaitReason::AuthRequired {
                challenge: Challenge {
                    scheme: long.clone(),
                    realm: Some(long.clone()),
                    origin: long.clone(),
                    proxy: true,
                    round: u32::MAX,
                },
            }),
            ..base.clone()
        };
        for (what, t) in [("plain", base), ("upload", upload), ("challenge", challenged)] {
            let encoded = dlsession_proto::frame::encode_frame(&t).unwrap().len();
            assert!(task_cost(&t) >= encoded, "{what}: estimated {} for {encoded} bytes", task_cost(&t));
        }
    }
}
