//! A session's events as a [`Stream`], beside the delegate: the dispatcher offers each
//! event to every stream after the delegate has handled it, without ever waiting for a
//! stream's reader.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::mpsc;

use dlsession_proto::{DetachReason, ErrorInfo as TaskError, TaskId};

/// Events a stream holds before it starts losing them ([`SessionEvent::Lagged`]).
const STREAM_QUEUE: usize = 1024;

/// One event of a session, as [`crate::Session::events`] yields it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// Bytes arrived (coalesced: at most one per task per progress interval).
    Progress {
        /// The task.
        task: TaskId,
        /// Bytes since the last progress event of this task.
        bytes_written: u64,
        /// Bytes of the file so far.
        total_bytes_written: u64,
        /// The file's size, when the server said.
        total_bytes_expected: Option<u64>,
    },
    /// An upload's body went out (coalesced).
    SendProgress {
        /// The task.
        task: TaskId,
        /// Bytes since the last send progress event of this task.
        bytes_sent: u64,
        /// Bytes of the body sent so far.
        total_bytes_sent: u64,
        /// The body's length.
        total_bytes_expected_to_send: u64,
    },
    /// An upload's final response; the delegate was handed it first, and the body file is
    /// deleted once it returned.
    UploadResponse {
        /// The task.
        task: TaskId,
        /// The response.
        response: crate::UploadResponse,
    },
    /// The server asked for credentials; the delegate answered (`answered`) or left it
    /// for later.
    Challenge {
        /// The task.
        task: TaskId,
        /// What was asked (never a credential).
        challenge: dlsession_proto::Challenge,
        /// The delegate gave an answer.
        answered: bool,
    },
    /// A transfer (re)started at `offset` (0: it had to start over).
    ResumedAtOffset {
        /// The task.
        task: TaskId,
        /// Where the attempt continues.
        offset: u64,
        /// The file's size, when known.
        expected_total: Option<u64>,
    },
    /// The delegate was handed the finished file at `location`. Unless it kept the file
    /// for later (`kept`: it answered [`crate::Handled::Later`]), the daemon deletes
    /// whatever is left there.
    FinishedDownloading {
        /// The task.
        task: TaskId,
        /// Where the daemon put the file.
        location: PathBuf,
        /// The delegate answered [`crate::Handled::Later`].
        kept: bool,
    },
    /// The task's last event: `error` is `None` on success.
    Completed {
        /// The task.
        task: TaskId,
        /// Why it failed, if it did.
        error: Option<TaskError>,
    },
    /// Every event delivered in this attachment is handled and acknowledged.
    FinishedEvents,
    /// The session was invalidated.
    BecameInvalid {
        /// Why, if it was not the app's own request.
        error: Option<TaskError>,
    },
    /// This attachment ended; the stream ends after this.
    Detached(DetachReason),
    /// The connection to the daemon broke; the library connects again.
    ConnectionLost {
        /// Why it broke.
        reason: String,
    },
    /// Connected again; unacknowledged events come again.
    Reconnected,
    /// This stream was not read fast enough and `missed` events were dropped from it
    /// (the delegate still had every one of them).
    Lagged {
        /// How many.
        missed: u64,
    },
}

/// The receiving end of [`crate::Session::events`].
#[derive(Debug)]
pub struct SessionEvents {
    rx: mpsc::Receiver<SessionEvent>,
    /// Dropped since the last event that got through, shared with the sending side.
    missed: Arc<AtomicU64>,
}

impl SessionEvents {
    /// The next event, or `None` once the attachment is over (same as the `Stream`).
    pub async fn recv(&mut self) -> Option<SessionEvent> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for SessionEvents {
    type Item = SessionEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<SessionEvent>> {
        // Read to the end with events dropped after the last one queued (the last of a
        // burst, then quiet; or the end): said now, not only at a next event that may never
        // come. (`try_recv` tells an empty queue from a task out of its polling budget.)
        match self.rx.try_recv() {
            Ok(event) => return Poll::Ready(Some(event)),
            Err(mpsc::error::TryRecvError::Empty | mpsc::error::TryRecvError::Disconnected) => {}
        }
        match self.missed.swap(0, Ordering::AcqRel) {
            0 => self.rx.poll_recv(cx),
            missed => Poll::Ready(Some(SessionEvent::Lagged { missed })),
        }
    }
}

/// The open streams of one session.
#[derive(Debug, Default)]
pub(crate) struct Subscribers {
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    streams: Vec<Subscriber>,
    /// The attachment is over: new streams end at once.
    closed: bool,
}

#[derive(Debug)]
struct Subscriber {
    tx: mpsc::Sender<SessionEvent>,
    /// Dropped since the last event that got through (the stream reads it too).
    missed: Arc<AtomicU64>,
}

impl Subscribers {
    pub(crate) fn subscribe(&self) -> SessionEvents {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let missed = Arc::new(AtomicU64::new(0));
        if let Ok(mut open) = self.open.lock()
            && !open.closed
        {
            open.streams.push(Subscriber { tx, missed: missed.clone() });
        }
        SessionEvents { rx, missed }
    }

    /// Offers `event` to every stream without waiting; streams whose receiver is gone are
    /// forgotten.
    pub(crate) fn offer(&self, event: &SessionEvent) {
        let Ok(mut open) = self.open.lock() else { return };
        open.streams.retain_mut(|s| {
            let missed = s.missed.swap(0, Ordering::AcqRel);
            if missed > 0 {
                match s.tx.try_send(SessionEvent::Lagged { missed }) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        // Still no room: this event is missed too.
                        s.missed.fetch_add(missed.saturating_add(1), Ordering::AcqRel);
                        return true;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            match s.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.missed.fetch_add(1, Ordering::AcqRel);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// The attachment is over: streams end once read to the end.
    pub(crate) fn close(&self) {
        if let Ok(mut open) = self.open.lock() {
            open.closed = true;
            open.streams.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slow_stream_is_told_what_it_missed() {
        let subs = Subscribers::default();
        let mut events = subs.subscribe();
        let total = STREAM_QUEUE as u64 + 10;
        for n in 0..total {
            subs.offer(&SessionEvent::ResumedAtOffset { task: 1, offset: n, expected_total: None });
        }
        // The queue is full: the next offer after reading makes room for the lag notice.
        let mut got = 0u64;
        while let Ok(e) = events.rx.try_recv() {
            assert!(matches!(e, SessionEvent::ResumedAtOffset { .. }));
            got += 1;
        }
        assert_eq!(got, STREAM_QUEUE as u64);
        subs.offer(&SessionEvent::FinishedEvents);
        assert_eq!(events.recv().await, Some(SessionEvent::Lagged { missed: 10 }));
        assert_eq!(events.recv().await, Some(SessionEvent::FinishedEvents));
        subs.close();
        assert_eq!(events.recv().await, None, "the stream ends with the attachment");
        assert_eq!(subs.subscribe().recv().await, None, "a stream asked for later ends at once");
    }

    /// The last events of a burst dropped, then nothing more: the stream still says so once
    /// it is read to the end (it waited for ever for an event to carry the notice).
    #[tokio::test]
    async fn a_lag_at_the_end_of_a_burst_is_told_without_another_event() {
        let subs = Subscribers::default();
        let mut events = subs.subscribe();
        for n in 0..STREAM_QUEUE as u64 {
            subs.offer(&SessionEvent::ResumedAtOffset { task: 1, offset: n, expected_total: None });
        }
        subs.offer(&SessionEvent::FinishedEvents);
        for _ in 0..STREAM_QUEUE {
            assert!(matches!(events.recv().await, Some(SessionEvent::ResumedAtOffset { .. })));
        }
        let next = tokio::time::timeout(std::time::Duration::from_secs(1), events.recv()).await;
        assert_eq!(next.expect("not a wait"), Some(SessionEvent::Lagged { missed: 1 }));
        // And at the end of the stream too.
        subs.offer(&SessionEvent::FinishedEvents);
        subs.close();
        subs.offer(&SessionEvent::FinishedEvents);
        assert_eq!(events.recv().await, Some(SessionEvent::FinishedEvents));
        assert_eq!(events.recv().await, None);
    }
}
