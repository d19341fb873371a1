//! The open client connections, as the core sees them: what each is attached to, what
//! it watches, and whether it handles wakes.
//!
//! Invariant kept with `sessions`: a connection lists a session as attached exactly when
//! that session names the connection as its attachment (the core changes both together).

use std::collections::{HashMap, HashSet};

use dlsession_proto::{ErrorInfo, Response, ServerMessage, TaskId};

use crate::conn::{ConnHandle, ConnId};
use crate::model::{DEFAULT_FILE_MODE, SessionKey};

#[derive(Debug)]
pub(super) struct Conn {
    pub handle: ConnHandle,
    pub attached: HashSet<SessionKey>,
    pub watch: Option<Watch>,
    /// Asked for `Wake`s with a handler that rejoins (`Request::HandleWakes`).
    pub handles_wakes: bool,
}

impl Conn {
    /// Whether this connection watches task `id` of session `key`.
    pub fn watches(&self, key: SessionKey, id: TaskId) -> bool {
        let Some(w) = &self.watch else { return false };
        w.session.is_none_or(|s| s == key) && (w.tasks.is_empty() || w.tasks.contains(&id))
    }

    /// Rejoins a session of its app when told to: it registered a wake handler, or it is
    /// a protocol-1 client that announced the app (those cannot say).
    pub fn rejoins_on_wake(&self) -> bool {
        self.handles_wakes || self.handle.protocol == 1
    }
}

/// What a connection watches (`Request::Watch`), indexed.
#[derive(Debug)]
pub(super) struct Watch {
    pub session: Option<SessionKey>,
    /// Empty: every task (of the session).
    pub tasks: HashSet<TaskId>,
}

#[derive(Debug, Default)]
pub(super) struct Conns {
    by_id: HashMap<ConnId, Conn>,
}

impl Conns {
    pub fn open(&mut self, handle: ConnHandle) {
        self.by_id.insert(handle.id, Conn { handle, attached: HashSet::new(), watch: None, handles_wakes: false });
    }

    pub fn close(&mut self, id: ConnId) -> Option<Conn> {
        self.by_id.remove(&id)
    }

    pub fn get(&self, id: &ConnId) -> Option<&Conn> {
        self.by_id.get(id)
    }

    pub fn get_mut(&mut self, id: &ConnId) -> Option<&mut Conn> {
        self.by_id.get_mut(id)
    }

    pub fn values(&self) -> impl Iterator<Item = &Conn> {
        self.by_id.values()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Answers request `id` of connection `conn` (if it is still open).
    pub fn reply(&self, conn: ConnId, id: u64, result: Result<Response, ErrorInfo>) {
        if let Some(c) = self.by_id.get(&conn) {
            c.handle.send(ServerMessage::Response { id, result });
        }
    }

    /// The mode files created for this connection's client get.
    pub fn file_mode(&self, conn: ConnId) -> u32 {
        self.by_id.get(&conn).map_or(DEFAULT_FILE_MODE, |c| c.handle.file_mode)
    }

    /// "name (pid N)", for messages that tell a user who holds something.
    pub fn describe(&self, conn: ConnId) -> String {
        self.by_id
            .get(&conn)
            .map(|c| match c.handle.pid {
                Some(pid) => format!("{} (pid {pid})", c.handle.client_name),
                None => c.handle.client_name.clone(),
            })
            .unwrap_or_else(|| "another client".into())
    }

    /// Connections of `app_id` that rejoin its sessions when woken.
    pub fn wake_targets<'a>(&'a self, app_id: &'a str) -> impl Iterator<Item = ConnId> + 'a {
        self.by_id
            .values()
            .filter(move |c| c.handle.app_id.as_deref() == Some(app_id) && c.rejoins_on_wake())
            .map(|c| c.handle.id)
    }
}
