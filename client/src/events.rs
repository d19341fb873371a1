//! Events not routed to an attached session (watch updates, progress of watched tasks,
//! wakes), kept in a bounded mailbox.
//!
//! The connection's reader never waits for the app: a task's state update replaces the
//! one not yet taken, its progress adds up with what is not yet taken, and wakes are kept
//! once per session. However slowly the app reads, this holds at most one update and one
//! progress entry per watched task, and one wake per session.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use dlsession_proto::{Event, TaskId, TaskInfo};

#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    state: Mutex<State>,
    notify: Notify,
    /// Which receiver is current (a new `Client::events` call replaces the old one).
    generation: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    wakes: VecDeque<Event>,
    updates: BTreeMap<TaskId, TaskInfo>,
    progress: BTreeMap<TaskId, Event>,
    /// The connection is gone for good: receivers end once they have taken everything.
    closed: bool,
}

impl Mailbox {
    pub fn put(&self, event: Event) {
        let Ok(mut st) = self.state.lock() else { return };
        match event {
            Event::TaskUpdate(info) => {
                st.updates.insert(info.id, info);
            }
            // A download's bytes arriving or an upload's going out: one per task.
            mut event @ (Event::Progress { task, .. } | Event::SendProgress { task, .. }) => {
                add_earlier_delta(st.progress.get(&task), &mut event);
                st.progress.insert(task, event);
            }
            wake @ Event::Wake { .. } => {
                let same = |e: &Event| matches!((e, &wake), (Event::Wake { identifier: a, .. }, Event::Wake { identifier: b, .. }) if a == b);
                if !st.wakes.iter().any(same) {
                    st.wakes.push_back(wake);
                }
            }
            // Anything else belongs to an attached session; one that is not (any more)
            // routed has no one to hear it.
            _ => return,
        }
        drop(st);
        self.notify.notify_one();
    }

    pub fn close(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.closed = true;
        }
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// A new receiver; earlier ones end.
    pub fn receiver(self: &std::sync::Arc<Self>) -> EventReceiver {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.notify.notify_waiters();
        EventReceiver { mailbox: self.clone(), generation }
    }

    fn take(&self) -> Option<Event> {
        let mut st = self.state.lock().ok()?;
        if let Some(e) = st.wakes.pop_front() {
            return Some(e);
        }
        if let Some((_, info)) = st.updates.pop_first() {
            return Some(Event::TaskUpdate(info));
        }
        st.progress.pop_first().map(|(_, e)| e)
    }

    fn is_closed(&self) -> bool {
        self.state.lock().map(|st| st.closed).unwrap_or(true)
    }
}

/// Adds the bytes of `earlier`, a progress event of the same kind not yet taken, to the one
/// that replaces it.
fn add_earlier_delta(earlier: Option<&Event>, event: &mut Event) {
    match (earlier, event) {
        (Some(Event::Progress { bytes_written: before, .. }), Event::Progress { bytes_written, .. }) => {
            *bytes_written = bytes_written.saturating_add(*before);
        }
        (Some(Event::SendProgress { bytes_sent: before, .. }), Event::SendProgress { bytes_sent, .. }) => {
            *bytes_sent = bytes_sent.saturating_add(*before);
        }
        _ => {}
    }
}

/// Receives the events of [`crate::Client::events`].
#[derive(Debug)]
pub struct EventReceiver {
    mailbox: std::sync::Arc<Mailbox>,
    generation: u64,
}

impl EventReceiver {
    /// The next event; `None` once the connection is closed for good (and everything was
    /// taken), or once a newer receiver replaced this one.
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            if self.mailbox.generation.load(Ordering::Acquire) != self.generation {
                return None;
            }
            let notified = self.mailbox.notify.notified();
            if let Some(e) = self.mailbox.take() {
                return Some(e);
            }
            if self.mailbox.is_closed() {
                return None;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: TaskId, received: u64) -> TaskInfo {
        TaskInfo {
            id,
            session: "s".into(),
            state: dlsession_proto::TaskState::Running,
            url: "http://x/".into(),
            description: None,
            priority: 0.5,
            bytes_received: received,
            bytes_expected: None,
            speed: 0,
            location: None,
            error: None,
            created_at: 0,
            wait: None,
            upload: None,
        }
    }

    #[tokio::test]
    async fn a_slow_reader_costs_one_entry_per_task() {
        let m = std::sync::Arc::new(Mailbox::default());
        let mut rx = m.receiver();
        for round in 0..10_000u64 {
            for task in 0..3 {
                m.put(Event::TaskUpdate(info(task, round)));
                let progress = Event::Progress {
                    identifier: "s".into(),
                    task,
                    bytes_written: 1,
                    total_bytes_written: round,
                    total_bytes_expected: None,
                };
                m.put(progress);
            }
            m.put(Event::Wake { identifier: "s".into(), reason: dlsession_proto::WakeReason::FinishedEvents });
        }
        let mut got = Vec::new();
        m.close();
        while let Some(e) = rx.recv().await {
            got.push(e);
        }
        assert_eq!(got.len(), 1 + 3 + 3, "one wake, one update and one progress per task: {}", got.len());
        let latest = got.iter().filter_map(|e| match e {
            Event::TaskUpdate(i) => Some(i.bytes_received),
            _ => None,
        });
        assert!(latest.into_iter().all(|r| r == 9_999), "the newest state of each task");
        let written: u64 = got
            .iter()
            .filter_map(|e| match e {
                Event::Progress { bytes_written, .. } => Some(*bytes_written),
                _ => None,
            })
            .sum();
        assert_eq!(written, 30_000, "no progress lost in coalescing");
    }

    #[tokio::test]
    async fn an_uploads_send_progress_adds_up_too() {
        let m = std::sync::Arc::new(Mailbox::default());
        let mut rx = m.receiver();
        for round in 1..=100u64 {
            m.put(Event::SendProgress {
                identifier: "s".into(),
                task: 7,
                bytes_sent: 10,
                total_bytes_sent: round * 10,
                total_bytes_expected_to_send: 1000,
            });
        }
        m.close();
        let mut got = Vec::new();
        while let Some(e) = rx.recv().await {
            got.push(e);
        }
        match got.as_slice() {
            [Event::SendProgress { bytes_sent: 1000, total_bytes_sent: 1000, .. }] => {}
            other => panic!("one entry with every byte: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_new_receiver_ends_the_old_one() {
        let m = std::sync::Arc::new(Mailbox::default());
        let mut old = m.receiver();
        let mut new = m.receiver();
        assert!(old.recv().await.is_none());
        m.put(Event::TaskUpdate(info(1, 1)));
        assert!(matches!(new.recv().await, Some(Event::TaskUpdate(_))));
    }
}
