//! What an app implements to hear about its downloads: the session delegate, and the
//! wake handler that rejoins sessions when the daemon wakes the app.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::SessionConfiguration;
use crate::session::{DownloadTask, Session, TaskError};
use dlsession_proto::{Challenge, ChallengeAnswer, DetachReason, Header};

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

    /// An upload's body went out (coalesced, like `did_write_data`; `URLSession`'s
    /// `didSendBodyData`). A resumed upload starts from the bytes the server already had.
    fn did_send_body_data(
        &self,
        session: &Session,
        task: &DownloadTask,
        bytes_sent: u64,
        total_bytes_sent: u64,
        total_bytes_expected_to_send: u64,
    ) {
        let _ = (session, task, bytes_sent, total_bytes_sent, total_bytes_expected_to_send);
    }

    /// An upload's final response, before `did_complete_with_error` (which carries an
    /// `http_status` error when the status is not a success). Read or move the body file
    /// before returning; whatever is left in dlsessiond's cache afterwards is deleted.
    fn did_receive_upload_response(&self, session: &Session, task: &DownloadTask, response: &UploadResponse) {
        let _ = (session, task, response);
    }

    /// The server asked for credentials (in a session that
    /// [answers challenges](crate::SessionConfiguration::answers_challenges)); the task
    /// waits for the answer returned here (`URLSession`'s challenge completion handler).
    /// `None` leaves it unanswered for now: the event stays unacknowledged and comes again on
    /// the next attach, unless answered meanwhile with [`DownloadTask::answer_challenge`]
    /// (which withdraws it; the task's later events are acknowledged as usual). The default answers `Fail`: the task completes
    /// with the server's 401.
    fn did_receive_challenge(
        &self,
        session: &Session,
        task: &DownloadTask,
        challenge: &Challenge,
    ) -> Option<ChallengeAnswer> {
        let _ = (session, task, challenge);
        Some(ChallengeAnswer::Fail)
    }

    /// Always the last callback of a task: `None` on success.
    fn did_complete_with_error(&self, session: &Session, task: &DownloadTask, error: Option<&TaskError>) {
        let _ = (session, task, error);
    }

    /// Events were delivered in this attachment and every one is now acknowledged: after
    /// rejoining, once the events queued while the app was away are handled; while
    /// attached, once the session's last active task has completed. Not called for an
    /// attach with nothing to deliver. The app may rest (or exit) when it hears this.
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

    /// Like [`SessionDelegate::did_receive_upload_response`], but the app says whether it
    /// took the response: [`Handled::Later`] keeps it (its body file stays in the daemon's
    /// cache, the event comes again on the next attach), say when moving the body failed.
    /// The default calls `did_receive_upload_response` and answers [`Handled::Done`].
    fn upload_response(&self, session: &Session, task: &DownloadTask, response: &UploadResponse) -> Handled {
        self.did_receive_upload_response(session, task, response);
        Handled::Done
    }
}

/// An upload's final response (see [`SessionDelegate::did_receive_upload_response`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadResponse {
    /// The final status (a redirect's target's, when the upload was redirected).
    pub status: u16,
    /// The response's headers (at most 64 of them, each value cut at 1 KiB).
    pub headers: Vec<Header>,
    /// The response body, in dlsessiond's cache (at most
    /// [`dlsession_proto::UPLOAD_RESPONSE_BODY_LIMIT`] bytes of it).
    pub body: PathBuf,
    /// The body was longer: the file holds its start.
    pub body_truncated: bool,
}

impl UploadResponse {
    /// The first header of this name, in any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.as_str())
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
