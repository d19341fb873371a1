//! Domain → wire: the only place that builds `TaskInfo`, `TaskDetail` and `SessionInfo`.

use super::Core;
use super::admission::Refusal;
use super::task::Task;
use crate::model::{Phase, SessionKey, TaskRecord};
use dlsession_proto::{ErrorCode, ErrorInfo, SessionInfo, TaskDetail, TaskInfo, TaskState, UploadInfo, WaitReason};

impl Core {
    pub(super) fn task_info(&self, t: &Task) -> TaskInfo {
        let identifier = self.sessions.get(&t.rec.session).map(|s| s.rec.identifier.clone()).unwrap_or_default();
        if t.rec.upload.is_some() {
            // An upload's live counter is the body going out; what it received is its response.
            let sent = (t.state == TaskState::Running).then(|| t.progress.received());
            let mut info =
                info_from(&t.rec, identifier, t.state, t.rec.committed_offset, None, t.speed, self.wait_reason(t));
            info.upload = upload_info(&t.rec, sent);
            return info;
        }
        let received = if t.state == TaskState::Running { t.progress.received() } else { t.rec.committed_offset };
        info_from(&t.rec, identifier, t.state, received, t.progress.expected(), t.speed, self.wait_reason(t))
    }

    pub(super) fn task_detail(&self, t: &Task) -> TaskDetail {
        let info = self.task_info(t);
        let partial = (t.state != TaskState::Completed).then(|| self.part_path(&t.rec).display().to_string());
        detail_from(&t.rec, info, partial)
    }

    /// Why a task that is not running is not running.
    fn wait_reason(&self, t: &Task) -> Option<WaitReason> {
        let s = self.sessions.get(&t.rec.session)?;
        match t.state {
            TaskState::Running => None,
            TaskState::Suspended => Some(WaitReason::Suspended),
            TaskState::Waiting if t.rec.phase == Phase::Finishing => Some(WaitReason::DestinationUnavailable {
                error: t
                    .rec
                    .last_error
                    .clone()
                    .unwrap_or_else(|| ErrorInfo::new(ErrorCode::DestinationUnavailable, "unknown")),
                attempt: t.move_failures.max(1),
                next_try: t.rec.retry_at,
            }),
            TaskState::Waiting if t.rec.challenge.is_some() => {
                t.rec.challenge.clone().map(|challenge| WaitReason::AuthRequired { challenge })
            }
            TaskState::Waiting if t.no_network_since.is_some() => {
                Some(WaitReason::NoNetwork { since: t.no_network_since.unwrap_or(0) })
            }
            TaskState::Waiting => Some(WaitReason::Backoff {
                until: t.rec.retry_at.unwrap_or(0),
                attempt: t.rec.attempts,
                last_error: t.rec.last_error.clone().unwrap_or_else(|| ErrorInfo::new(ErrorCode::Internal, "unknown")),
            }),
            TaskState::Completed => {
                s.has_pending(t.rec.id).then_some(WaitReason::EventsPending { next_wake: s.wake.next_wake })
            }
            TaskState::Queued => {
                // On its `Begin` timer (not in a lane yet): waiting for `earliest_begin`.
                if let Some(at) = t.rec.earliest_begin.filter(|_| t.timer.is_some()) {
                    return Some(WaitReason::EarliestBegin { at });
                }
                // The scheduler's own answer (see `admission`).
                let refusal = self.slots.admit(self.limits(), s, &t.lane(), self.policy_of(t)).err()?;
                Some(match refusal {
                    // Stopping: nothing to explain, the daemon is going away.
                    Refusal::ShuttingDown => return None,
                    Refusal::StorageFull => WaitReason::StorageFull {
                        error: self.life.storage.clone().unwrap_or_else(|| ErrorInfo::new(ErrorCode::StorageFull, "")),
                    },
                    Refusal::Daemon { limit } => WaitReason::GlobalLimit { limit },
                    Refusal::Session { limit } => WaitReason::SessionLimit { limit },
                    Refusal::Host { limit } => WaitReason::HostLimit { host: t.host.clone(), limit },
                    Refusal::Metered => WaitReason::MeteredNetwork,
                    Refusal::OnBattery => WaitReason::OnBattery,
                    Refusal::Discretionary => WaitReason::Discretionary,
                    // No reason of its own in the protocol: the internet is not there yet.
                    Refusal::Portal => WaitReason::NoNetwork { since: self.life.portal_since.unwrap_or(0) },
                })
            }
        }
    }

    pub(super) fn session_info(&self, key: SessionKey) -> Result<SessionInfo, ErrorInfo> {
        let s = self
            .sessions
            .get(&key)
            .ok_or_else(|| ErrorInfo::new(ErrorCode::NoSuchSession, "the session no longer exists"))?;
        Ok(SessionInfo {
            identifier: s.rec.identifier.clone(),
            config: s.rec.config.clone(),
            attached: s.attached.is_some(),
            tasks: s.counts,
            pending_events: s.events.len() as u64,
            wake: s.wake.clone(),
            invalidating: s.rec.invalidating,
            created_at: s.rec.created_at,
        })
    }
}

fn info_from(
    rec: &TaskRecord,
    session: String,
    state: TaskState,
    received: u64,
    expected: Option<u64>,
    speed: u64,
    wait: Option<WaitReason>,
) -> TaskInfo {
    TaskInfo {
        id: rec.id,
        session,
        state,
        url: rec.url.clone(),
        description: rec.description.clone(),
        priority: rec.priority,
        bytes_received: received,
        bytes_expected: expected.or(rec.bytes_expected),
        speed,
        location: rec.location.clone(),
        error: rec.error.clone(),
        created_at: rec.created_at,
        wait,
        upload: upload_info(rec, None),
    }
}

/// An upload's facts on the wire; `sent` while it runs, else what is known: all of it once
/// a response came, nothing before.
fn upload_info(rec: &TaskRecord, sent: Option<u64>) -> Option<UploadInfo> {
    let u = rec.upload.as_ref()?;
    // A final response came: the whole body had gone out.
    let done = rec.response_status.is_some() && rec.state == TaskState::Completed;
    Some(UploadInfo {
        method: u.method,
        file: u.file.clone(),
        bytes_total: u.size,
        bytes_sent: sent.unwrap_or(if done { u.size } else { 0 }),
        idempotent: u.idempotent,
        resumable: u.resume_url.is_some(),
    })
}

fn detail_from(rec: &TaskRecord, info: TaskInfo, partial_path: Option<String>) -> TaskDetail {
    TaskDetail {
        info,
        request_headers: rec.headers.clone(),
        expected_sha256: rec.expected_sha256,
        destination: rec.destination.clone(),
        partial_path,
        final_url: rec.final_url.clone(),
        response_status: rec.response_status,
        response_headers: rec.response_headers.clone(),
        etag: rec.etag.clone(),
        last_modified: rec.last_modified.clone(),
        committed_offset: rec.committed_offset,
        resumable: crate::engine::http::can_resume(rec.etag.as_deref(), rec.last_modified.as_deref()),
        attempts: rec.attempts,
        last_error: rec.last_error.clone(),
        started_at: rec.started_at,
        finished_at: rec.finished_at,
        resource_deadline: rec.resource_deadline,
        retired: rec.retired,
    }
}

/// A task that is no longer live (retired, or its session gone), read from the database.
pub(super) fn history_detail(rec: TaskRecord, session: String) -> TaskDetail {
    let info = info_from(&rec, session, rec.state, rec.committed_offset, rec.bytes_expected, 0, None);
    detail_from(&rec, info, None)
}
