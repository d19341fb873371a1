//! The start's work that waits for the database's check (`recovery::on_checked`): what it
//! is, and what was asked for meanwhile.

use super::disk::Garbage;
use crate::conn::ConnId;
use crate::engine::files::Leftovers;
use dlsession_proto::TaskId;

/// What the start does once the database passed its check.
#[derive(Debug)]
pub(super) struct StartWork {
    /// Tasks cut short while finishing (and moves due meanwhile): their moves run again.
    /// Before this process moved anything, copies named by its own pid are leftovers too.
    pub finishing: Vec<(TaskId, Leftovers)>,
    /// What the sweep of the cache keeps (dormant tasks are added when they are listed).
    pub garbage: Garbage,
    /// Apps that connected meanwhile: their sessions' wakes (after the start's own).
    pub new_apps: Vec<(ConnId, String)>,
}
