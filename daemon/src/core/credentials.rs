//! What the core holds for authentication challenges (its handlers are `core::auth`'s).

use std::collections::{HashMap, HashSet};

use crate::model::{HeldCredential, SessionKey};
use dlsession_proto::TaskId;

/// What the core holds for authentication. Credentials live here (and, kept, in the
/// database), never in a task record or an event.
#[derive(Debug, Default)]
pub(super) struct Auth {
    /// Sessions that ask their app about challenges.
    pub answering: HashSet<SessionKey>,
    /// Sessions' protection-space credentials.
    pub spaces: HashMap<SessionKey, Vec<HeldCredential>>,
    /// Tasks' own credentials.
    pub tasks: HashMap<TaskId, Vec<HeldCredential>>,
    /// Challenges each task had (while the daemon runs).
    pub rounds: HashMap<TaskId, u32>,
}
