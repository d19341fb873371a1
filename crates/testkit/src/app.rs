//! An app for tests: a client library delegate that records what it is told
//! ([`Recorder`], [`Events`]) and moves finished files aside, and plain clients of a test
//! daemon.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dlsession::{
    Client, ClientOptions, DetachReason, DownloadTask, Session, SessionConfiguration, SessionDelegate, TaskError,
    TaskId,
};
use tokio::sync::mpsc;

use crate::TestEnv;

/// What a delegate saw, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Progress {
        task: TaskId,
        total: u64,
    },
    /// An upload's body going out.
    Sent {
        task: TaskId,
        total: u64,
        expected: u64,
    },
    /// A challenge the delegate was asked about.
    Challenge {
        task: TaskId,
        challenge: dlsession::Challenge,
    },
    /// An upload's response, its body read during the callback.
    Response {
        task: TaskId,
        status: u16,
        body: Vec<u8>,
        truncated: bool,
        /// Its headers (name, value).
        headers: Vec<(String, String)>,
    },
    Resumed {
        task: TaskId,
        offset: u64,
    },
    Finished {
        task: TaskId,
        location: PathBuf,
        moved_to: PathBuf,
    },
    Completed {
        task: TaskId,
        error: Option<TaskError>,
    },
    FinishedEvents,
    Invalid,
    Detached(DetachReason),
    ConnectionLost,
    Reconnected,
}

/// A wake handler that tells which sessions it was woken for, and rejoins none (an app
/// that ignores its wakes).
#[derive(Debug)]
pub struct IgnoredWakes(mpsc::UnboundedSender<String>);

impl IgnoredWakes {
    /// The handler, and where the identifiers it was woken for come.
    pub fn new() -> (IgnoredWakes, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (IgnoredWakes(tx), rx)
    }
}

impl dlsession::WakeHandler for IgnoredWakes {
    fn rejoin(&self, identifier: &str) -> Option<(SessionConfiguration, std::sync::Arc<dyn SessionDelegate>)> {
        let _ = self.0.send(identifier.to_owned());
        None
    }
}

/// A delegate that moves finished files into `dir/<task id>` and reports everything.
#[derive(Debug)]
pub struct Recorder {
    dir: PathBuf,
    tx: mpsc::UnboundedSender<Seen>,
    /// What it answers challenges with (else `Fail`).
    answer: Option<dlsession::ChallengeAnswer>,
}

impl Recorder {
    pub fn new(dir: &Path) -> (Recorder, Events) {
        std::fs::create_dir_all(dir).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        (Recorder { dir: dir.to_path_buf(), tx, answer: None }, Events { rx, seen: Vec::new() })
    }

    /// One that answers every challenge with `answer`.
    pub fn answering(dir: &Path, answer: dlsession::ChallengeAnswer) -> (Recorder, Events) {
        let (r, events) = Recorder::new(dir);
        (Recorder { answer: Some(answer), ..r }, events)
    }
}

impl SessionDelegate for Recorder {
    fn did_write_data(&self, _: &Session, task: &DownloadTask, _: u64, total: u64, _: Option<u64>) {
        let _ = self.tx.send(Seen::Progress { task: task.id(), total });
    }
    fn did_send_body_data(&self, _: &Session, task: &DownloadTask, _: u64, total: u64, expected: u64) {
        let _ = self.tx.send(Seen::Sent { task: task.id(), total, expected });
    }
    fn did_receive_upload_response(&self, _: &Session, task: &DownloadTask, r: &dlsession::UploadResponse) {
        // A body cut short may have no file at all (it could not be written: the completion
        // says why); any other must be there.
        let body = match std::fs::read(&r.body) {
            Err(_) if r.body_truncated => Vec::new(),
            read => read.unwrap_or_else(|e| panic!("read {}: {e}", r.body.display())),
        };
        let headers = r.headers.iter().map(|h| (h.name.clone(), h.value.clone())).collect();
        let seen = Seen::Response { task: task.id(), status: r.status, body, truncated: r.body_truncated, headers };
        let _ = self.tx.send(seen);
    }
    fn did_receive_challenge(
        &self,
        _: &Session,
        task: &DownloadTask,
        challenge: &dlsession::Challenge,
    ) -> Option<dlsession::ChallengeAnswer> {
        let _ = self.tx.send(Seen::Challenge { task: task.id(), challenge: challenge.clone() });
        Some(self.answer.clone().unwrap_or(dlsession::ChallengeAnswer::Fail))
    }
    fn did_resume_at_offset(&self, _: &Session, task: &DownloadTask, offset: u64, _: Option<u64>) {
        let _ = self.tx.send(Seen::Resumed { task: task.id(), offset });
    }
    fn did_finish_downloading_to(&self, _: &Session, task: &DownloadTask, location: &Path) {
        let to = self.dir.join(task.id().to_string());
        // Across filesystems (a cache on its own mount) a rename fails: copy instead.
        std::fs::rename(location, &to)
            .or_else(|_| std::fs::copy(location, &to).and_then(|_| std::fs::remove_file(location)))
            .unwrap_or_else(|e| panic!("move {}: {e}", location.display()));
        let _ = self.tx.send(Seen::Finished { task: task.id(), location: location.to_path_buf(), moved_to: to });
    }
    fn did_complete_with_error(&self, _: &Session, task: &DownloadTask, error: Option<&TaskError>) {
        let _ = self.tx.send(Seen::Completed { task: task.id(), error: error.cloned() });
    }
    fn did_finish_events_for_background_session(&self, _: &Session) {
        let _ = self.tx.send(Seen::FinishedEvents);
    }
    fn did_become_invalid(&self, _: &Session, _: Option<&TaskError>) {
        let _ = self.tx.send(Seen::Invalid);
    }
    fn did_detach(&self, _: &Session, reason: DetachReason) {
        let _ = self.tx.send(Seen::Detached(reason));
    }
    fn did_lose_connection(&self, _: &Session, _: &str) {
        let _ = self.tx.send(Seen::ConnectionLost);
    }
    fn did_reconnect(&self, _: &Session) {
        let _ = self.tx.send(Seen::Reconnected);
    }
}

#[derive(Debug)]
pub struct Events {
    rx: mpsc::UnboundedReceiver<Seen>,
    /// Everything received so far.
    pub seen: Vec<Seen>,
}

impl Events {
    /// Waits for the first event matching `pred` and returns it.
    pub async fn wait(&mut self, what: &str, timeout: Duration, mut pred: impl FnMut(&Seen) -> bool) -> Seen {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => {
                    self.seen.push(ev.clone());
                    if pred(&ev) {
                        return ev;
                    }
                }
                Ok(None) => panic!("delegate gone while waiting for {what}; saw {:?}", self.seen),
                Err(_) => panic!("timed out waiting for {what}; saw {:?}", self.seen),
            }
        }
    }

    /// Waits for the completion of `task` and returns its error.
    pub async fn completion(&mut self, task: TaskId, timeout: Duration) -> Option<TaskError> {
        let seen = self.seen.iter().find_map(|e| match e {
            Seen::Completed { task: t, error } if *t == task => Some(error.clone()),
            _ => None,
        });
        if let Some(error) = seen {
            return error;
        }
        match self
            .wait(
                &format!("completion of task {task}"),
                timeout,
                |e| matches!(e, Seen::Completed { task: t, .. } if *t == task),
            )
            .await
        {
            Seen::Completed { error, .. } => error,
            _ => unreachable!(),
        }
    }

    /// The path the finished file of `task` was moved to (must have been seen already).
    pub fn moved_to(&self, task: TaskId) -> Option<PathBuf> {
        self.seen.iter().find_map(|e| match e {
            Seen::Finished { task: t, moved_to, .. } if *t == task => Some(moved_to.clone()),
            _ => None,
        })
    }

    /// Where the daemon said the finished file of `task` was.
    pub fn location(&self, task: TaskId) -> Option<PathBuf> {
        self.seen.iter().find_map(|e| match e {
            Seen::Finished { task: t, location, .. } if *t == task => Some(location.clone()),
            _ => None,
        })
    }

    /// The response of upload `task` (must have been seen already): status, body, truncated.
    pub fn response(&self, task: TaskId) -> Option<(u16, Vec<u8>, bool)> {
        self.seen.iter().find_map(|e| match e {
            Seen::Response { task: t, status, body, truncated, .. } if *t == task => {
                Some((*status, body.clone(), *truncated))
            }
            _ => None,
        })
    }

    /// The first header `name` (any case) of upload `task`'s response.
    pub fn response_header(&self, task: TaskId, name: &str) -> Option<String> {
        self.seen.iter().find_map(|e| match e {
            Seen::Response { task: t, headers, .. } if *t == task => {
                headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
            }
            _ => None,
        })
    }

    /// Drains what has arrived without waiting.
    pub fn drain(&mut self) {
        while let Ok(ev) = self.rx.try_recv() {
            self.seen.push(ev);
        }
    }
}

/// A plain client of the test daemon (it never starts one).
pub async fn client(env: &TestEnv) -> Client {
    let options = ClientOptions { socket: Some(env.socket.clone()), autostart: false, ..ClientOptions::default() };
    Client::connect(options).await.expect("connect to the test daemon")
}

/// Waits (up to `LONG`) until the daemon has committed at least `at_least` bytes of a
/// task, asking it over `client`; returns the committed offset.
pub async fn wait_for_checkpoint(client: &Client, task: dlsession::proto::TaskId, at_least: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + crate::LONG;
    loop {
        let r = client.request(dlsession::proto::Request::GetTask { task }).await;
        let Ok(dlsession::proto::Response::Task(detail)) = r else { panic!("task {task}: {r:?}") };
        if detail.committed_offset >= at_least.max(1) {
            return detail.committed_offset;
        }
        assert!(tokio::time::Instant::now() < deadline, "task {task}: no checkpoint of {at_least} bytes within LONG");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A background session configuration that talks to the test daemon.
pub fn config(env: &TestEnv, identifier: &str) -> SessionConfiguration {
    SessionConfiguration::background(identifier).socket(&env.socket)
}

/// Attaches to a session of the test daemon with a [`Recorder`] that moves finished files
/// into `out-<identifier>` under the environment's directory.
pub async fn attach(env: &TestEnv, config: SessionConfiguration) -> (Session, Events) {
    let (delegate, events) = Recorder::new(&env.path().join(format!("out-{}", config.identifier())));
    let session = Session::attach(config.socket(&env.socket), delegate).await.expect("attach to the test daemon");
    (session, events)
}
