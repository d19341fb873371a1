//! Requests held back, per connection in the order they came: while dormant tasks they may
//! touch are read, until the start's database check passed (see `core::dormant`), or while
//! an earlier request of the connection is in its disk phase (`core::requests`), so that
//! requests act in the order sent.
//!
//! Invariant kept here: a connection has an entry only while it holds a request, so "does
//! this connection hold anything?" is whether it has one, or a request on the disk.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;

use crate::conn::ConnId;
use dlsession_proto::Request;

/// The ticket of requests waiting for the start's database check.
pub(super) const CHECK: u64 = u64::MAX;

#[derive(Debug, Default)]
pub(super) struct Held {
    by_conn: HashMap<ConnId, VecDeque<HeldRequest>>,
    /// Connections with a request in its disk phase (at most one each): its id and the
    /// phase's token (client ids need not be unique). Their later requests wait in
    /// `by_conn` until it comes back or times out.
    on_disk: HashMap<ConnId, OnDisk>,
    /// Disk phases that timed out and still hang, per connection (token → the mounts they
    /// touch): the connection's next one on those mounts is refused at once.
    stuck: HashMap<ConnId, HashMap<u64, Vec<PathBuf>>>,
    /// Disk phases (their tokens) whose connection closed before they came back: what one
    /// did (a resume file moved into a new task's place) is undone when it comes back, so a
    /// shutdown waits for them too.
    orphaned: HashSet<u64>,
    next_ticket: u64,
}

/// A request in its disk phase.
#[derive(Debug)]
struct OnDisk {
    id: u64,
    token: u64,
    /// The paths it checks (their mounts count as hung if it times out).
    paths: Vec<PathBuf>,
    /// Its timeout, stopped when it comes back (an idle daemon has no timer left).
    timer: Option<tokio::task::AbortHandle>,
}

#[derive(Debug)]
pub(super) struct HeldRequest {
    pub id: u64,
    pub request: Request,
    /// The read it waits for; `None`: it waits behind an earlier request of its connection.
    pub ticket: Option<u64>,
}

impl Held {
    /// A fresh ticket for a read (never [`CHECK`]).
    pub fn ticket(&mut self) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        ticket
    }

    /// Whether a request of the connection waits (so a new one must wait behind it).
    pub fn holds(&self, conn: ConnId) -> bool {
        self.by_conn.contains_key(&conn) || self.on_disk.contains_key(&conn)
    }

    /// Request `id` of the connection went to its disk phase, checking `paths`; the
    /// phase's token.
    pub fn went_to_disk(&mut self, conn: ConnId, id: u64, paths: Vec<PathBuf>) -> u64 {
        let token = self.ticket();
        self.on_disk.insert(conn, OnDisk { id, token, paths, timer: None });
        token
    }

    /// The timeout of disk phase `token`.
    pub fn set_disk_timer(&mut self, conn: ConnId, token: u64, timer: tokio::task::AbortHandle) {
        match self.on_disk.get_mut(&conn).filter(|d| d.token == token) {
            Some(d) => d.timer = Some(timer),
            None => timer.abort(),
        }
    }

    /// The disk phase `token` came back: its request's id if it was still awaited, `None`
    /// if it was given up already (timed out, or its connection closed).
    pub fn back_from_disk(&mut self, conn: ConnId, token: u64) -> Option<u64> {
        self.orphaned.remove(&token);
        if let Some(hung) = self.stuck.get_mut(&conn) {
            hung.remove(&token);
            if hung.is_empty() {
                self.stuck.remove(&conn);
            }
        }
        self.on_disk.get(&conn).filter(|d| d.token == token)?;
        let d = self.on_disk.remove(&conn)?;
        if let Some(timer) = d.timer {
            timer.abort();
        }
        Some(d.id)
    }

    /// The disk phase `token` timed out: its request's id and the paths it checks, if it
    /// was still awaited (see [`Held::hangs_on`]).
    pub fn timed_out(&mut self, conn: ConnId, token: u64) -> Option<(u64, Vec<PathBuf>)> {
        // An orphan that hangs is given up like any other: a shutdown does not wait for it.
        self.orphaned.remove(&token);
        if self.on_disk.get(&conn).is_none_or(|d| d.token != token) {
            return None;
        }
        let d = self.on_disk.remove(&conn)?;
        Some((d.id, d.paths))
    }

    /// The timed-out disk phase `token` hangs on `mounts` until it comes back.
    pub fn hangs_on(&mut self, conn: ConnId, token: u64, mounts: Vec<PathBuf>) {
        self.stuck.entry(conn).or_default().insert(token, mounts);
    }

    /// Whether a timed-out disk phase of the connection still hangs.
    pub fn stuck(&self, conn: ConnId) -> bool {
        self.stuck.contains_key(&conn)
    }

    /// Whether any request is in its disk phase (shutdown waits for them, within its grace).
    pub fn any_on_disk(&self) -> bool {
        !self.on_disk.is_empty() || !self.orphaned.is_empty()
    }

    /// Gives up every disk phase (the shutdown's grace is over): their requests' ids.
    pub fn give_up_disk(&mut self) -> Vec<(ConnId, u64)> {
        self.orphaned.clear();
        self.on_disk.drain().map(|(conn, d)| (conn, d.id)).collect()
    }

    /// A mount among `mounts` on which a timed-out disk phase of the connection hangs.
    pub fn stuck_on(&self, conn: ConnId, mounts: &[PathBuf]) -> Option<&PathBuf> {
        self.stuck.get(&conn)?.values().flatten().find(|m| mounts.contains(m))
    }

    /// Whether the connection's request is in its disk phase.
    pub fn on_disk(&self, conn: ConnId) -> bool {
        self.on_disk.contains_key(&conn)
    }

    pub fn push_back(&mut self, conn: ConnId, held: HeldRequest) {
        self.by_conn.entry(conn).or_default().push_back(held);
    }

    pub fn push_front(&mut self, conn: ConnId, held: HeldRequest) {
        self.by_conn.entry(conn).or_default().push_front(held);
    }

    /// The connection's first held request, if any.
    pub fn pop_front(&mut self, conn: ConnId) -> Option<HeldRequest> {
        let queue = self.by_conn.get_mut(&conn)?;
        let first = queue.pop_front();
        if queue.is_empty() {
            self.by_conn.remove(&conn);
        }
        first
    }

    /// The connections whose first held request waits for `ticket`.
    pub fn waiting_for(&self, ticket: u64) -> Vec<ConnId> {
        let first_waits = |q: &VecDeque<HeldRequest>| q.front().is_some_and(|h| h.ticket == Some(ticket));
        self.by_conn.iter().filter(|(_, q)| first_waits(q)).map(|(conn, _)| *conn).collect()
    }

    /// Every held request, gone from here.
    pub fn take_all(&mut self) -> Vec<(ConnId, HeldRequest)> {
        std::mem::take(&mut self.by_conn)
            .into_iter()
            .flat_map(|(conn, q)| q.into_iter().map(move |h| (conn, h)))
            .collect()
    }

    pub fn forget(&mut self, conn: ConnId) {
        self.by_conn.remove(&conn);
        // Its timer stays: an orphan that hangs (a dead mount) is not waited for past it.
        if let Some(d) = self.on_disk.remove(&conn) {
            self.orphaned.insert(d.token);
        }
        self.stuck.remove(&conn);
    }
}

#[cfg(test)]
mod tests {
    use super::Held;

    /// A disk phase whose connection closed is still waited for (by a shutdown) until it
    /// comes back: what it did to a resume file is undone then.
    #[test]
    fn a_disk_phase_of_a_closed_connection_is_awaited_until_it_comes_back() {
        let mut held = Held::default();
        let token = held.went_to_disk(7, 1, Vec::new());
        held.forget(7);
        assert!(held.any_on_disk(), "forgotten with its connection");
        assert_eq!(held.back_from_disk(7, token), None, "nobody to answer");
        assert!(!held.any_on_disk());
        let token = held.went_to_disk(8, 1, Vec::new());
        held.forget(8);
        assert_eq!(held.give_up_disk(), Vec::new());
        assert!(!held.any_on_disk(), "the grace is over: given up");
        assert_eq!(held.back_from_disk(8, token), None);
        let token = held.went_to_disk(9, 1, Vec::new());
        held.forget(9);
        assert_eq!(held.timed_out(9, token), None, "nobody to answer");
        assert!(!held.any_on_disk(), "one that hangs past its timeout is not waited for");
    }
}
