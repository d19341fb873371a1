//! Upload tasks in the core (docs/behaviour.md, "Uploads"): what a worker is given, the
//! resumption a server offered, the final response; and a request that must not go twice,
//! found under way after a crash.

use tokio::sync::oneshot;
use tracing::warn;

use super::transitions::kept_headers;
use super::{After, Core};
use crate::engine::{UploadJob, UploadResponse};
use dlsession_proto::{DurableEvent, ErrorCode, ErrorInfo, TaskId};

impl Core {
    /// What an upload's worker sends (`None` for a download). For a request that must not
    /// go twice the attempt is committed as under way first: the worker sends nothing
    /// before that is durable.
    pub(super) fn upload_job(&mut self, id: TaskId) -> Option<UploadJob> {
        let body_to = self.tasks.get(&id).map(|t| self.cache_location(&t.rec))?;
        let t = self.tasks.get_mut(&id)?;
        // A fresh attempt: its bytes sent count from where it starts.
        t.progress.received.store(0, std::sync::atomic::Ordering::Relaxed);
        t.progress.body_from.store(0, std::sync::atomic::Ordering::Relaxed);
        t.progress.sent_whole.store(false, std::sync::atomic::Ordering::Relaxed);
        let up = t.rec.upload.as_mut()?;
        let retry_safe = up.retry_safe();
        let job = UploadJob {
            method: up.method,
            file: up.file.clone().into(),
            size: up.size,
            mtime_ns: up.mtime_ns,
            retry_safe,
            safe_alone: up.method == dlsession_proto::UploadMethod::Put || up.idempotent,
            resume_url: up.resume_url.clone(),
            body_to,
            go: None,
        };
        if retry_safe {
            return Some(job);
        }
        up.in_flight = true;
        let (tx, rx) = oneshot::channel();
        self.save_task(id, vec![After::Signal(tx)]);
        Some(UploadJob { go: Some(rx), ..job })
    }

    /// A request that must not go twice was under way with its whole body out when the
    /// daemon stopped (or it was stopped then): it may have reached the server, so the task
    /// completes with an error instead of sending it again. True if it did.
    pub(super) fn upload_interrupted(&mut self, id: TaskId) -> bool {
        let Some(up) = self.tasks.get(&id).and_then(|t| t.rec.upload.as_ref()) else { return false };
        if !up.in_flight || up.retry_safe() {
            return false;
        }
        let error = ErrorInfo::new(
            ErrorCode::Network,
            format!(
                "an earlier attempt of this {} was under way when the daemon stopped, or was stopped after \
                 its whole body went out; it may have reached the server, so it is not sent again (mark it \
                 idempotent to allow that)",
                up.method.as_str()
            ),
        );
        warn!(task = id, "not repeating an interrupted upload that may have reached its server");
        let (mut ops, mut after) = (Vec::new(), Vec::new());
        self.complete(id, Some(error), &mut ops, &mut after);
        self.commit(ops, after);
        true
    }

    /// The server offered to resume the upload at `url` (or withdrew the offer): stored, so
    /// a retry after a crash continues there.
    pub(super) fn on_resume_url(&mut self, id: TaskId, url: Option<String>) {
        let Some(up) = self.tasks.get_mut(&id).and_then(|t| t.rec.upload.as_mut()) else { return };
        if up.resume_url == url {
            return;
        }
        up.resume_url = url;
        self.save_task(id, Vec::new());
    }

    /// The answer is in and its body waits to be written: why, for `show` (not committed
    /// by itself; cleared once the body is kept, see `on_upload_done`).
    pub(super) fn on_answer_held(&mut self, id: TaskId, error: ErrorInfo) {
        let Some(t) = self.tasks.get_mut(&id) else { return };
        t.rec.last_error = Some(error);
        t.answer_held = true;
        self.notify_watchers(id);
    }

    /// The final response: `upload_response` with its body's file, then `completed` (with
    /// an error when the status is not a success), in one commit.
    pub(super) fn on_upload_done(&mut self, id: TaskId, response: UploadResponse) {
        self.flush_progress(id);
        self.release(id);
        self.refuse_waiting_stops(id, "received its response");
        let Some(t) = self.tasks.get_mut(&id) else { return };
        let UploadResponse { status, final_url, headers, location, size, truncated, error } = response;
        if std::mem::take(&mut t.answer_held) {
            // It said the body was not kept yet: the completion says how it ended.
            t.rec.last_error = error.clone();
        }
        let rec = &mut t.rec;
        rec.response_status = Some(status);
        rec.final_url = Some(final_url);
        rec.response_headers = kept_headers(headers);
        rec.committed_offset = size;
        rec.bytes_expected = Some(size);
        rec.location = Some(location.clone());
        if let Some(up) = rec.upload.as_mut() {
            up.truncated = truncated;
        }
        let event = DurableEvent::UploadResponse {
            task: id,
            status,
            headers: rec.response_headers.clone(),
            body: location,
            body_truncated: truncated,
        };
        let key = rec.session;
        let (mut ops, mut after) = (Vec::new(), Vec::new());
        self.emit(key, event, &mut ops);
        self.complete(id, error, &mut ops, &mut after);
        self.commit(ops, after);
    }
}
