//! The daemon's life as the core sees it: exiting when idle (under socket activation),
//! holding downloads while the database refuses writes, shutting down with checkpoints
//! (docs/behaviour.md, "The daemon's life", "Full disks and unavailable destinations").

use tokio::sync::oneshot;
use tracing::{info, warn};

use super::task::AfterStop;
use super::timers::Timer;
use super::{Core, CoreMsg, IdleExit};
use crate::conn::ConnEvent;
use crate::conn::PauseCheck;
use dlsession_proto::{DetachReason, ErrorCode, ErrorInfo, Event};

/// A request refused because the daemon stops: not run, so the client may send it again
/// once the daemon is back (the client library does).
pub(super) fn shutting_down() -> ErrorInfo {
    ErrorInfo::new(ErrorCode::ShuttingDown, "the daemon is shutting down; try again when it is back")
}

impl Core {
    /// Exit once nothing has happened for `idle.after` (see [`Core::has_nothing_to_do`]).
    pub fn exit_when_idle(&mut self, idle: IdleExit) {
        self.life.idle_exit = Some(idle);
    }

    /// No client, no download, nothing queued, no timer that must fire (a retry, a
    /// delayed begin, a wake), no task waiting for the network: everything is durable and
    /// nothing would happen until a client comes, so the process may go.
    pub(super) fn has_nothing_to_do(&self) -> bool {
        !self.life.shutting_down
            && self.life.checked
            && self.life.commits_in_flight == 0
            && self.life.launches_running == 0
            && self.conns.is_empty()
            && self.slots.is_idle()
            && self.timers.only_idle()
            // Nothing else would start the daemon again when the route returns, or finish
            // what waits off the lanes (looked at last: by then nothing runs and no client
            // is connected).
            && !self.tasks.values().any(|t| t.no_network_since.is_some() || t.off_lanes.is_some())
    }

    /// Asks the socket server to pause accepting if no connection is open (in any
    /// state). Paused, it returns the handle that resumes it (send) or stops it (drop).
    pub(super) async fn pause_accepting_if_idle(&self) -> Option<oneshot::Sender<()>> {
        let idle = self.life.idle_exit.as_ref()?;
        let (reply, answer) = oneshot::channel();
        let (resume_tx, resume) = oneshot::channel();
        idle.ask.send(PauseCheck { reply, resume }).await.ok()?;
        answer.await.unwrap_or(false).then_some(resume_tx)
    }

    /// The database stopped taking writes (a full disk, an I/O error), or takes them
    /// again. Meanwhile reads are answered, changes refused with `storage_full`, and
    /// downloads held at their last checkpoint (each would soon need a commit).
    pub(super) fn on_storage(&mut self, health: crate::store::Health) {
        match health {
            crate::store::Health::Failing(e) => {
                let dir = self.cfg.state_dir.display();
                let error = ErrorInfo::new(
                    ErrorCode::StorageFull,
                    format!(
                        "dlsessiond cannot write its database in {dir} ({e}); free space there, it retries by itself"
                    ),
                );
                warn!(
                    running = self.slots.running_count(),
                    "database refuses writes: holding downloads, refusing changes"
                );
                self.life.storage = Some(error);
                for id in self.slots.running() {
                    let t = self.tasks.get(&id);
                    if t.and_then(|t| t.run.as_ref()).is_some_and(|r| r.holds_slot)
                        && !t.is_some_and(super::task::Task::awaits_answer)
                    {
                        self.stop_worker(id, AfterStop::Requeue);
                    }
                }
            }
            crate::store::Health::Recovered => {
                info!("database takes writes again: downloads go on");
                self.life.storage = None;
                self.schedule();
            }
            // Nothing was written, moved, deleted or started yet (all of it waits for the
            // check): the daemon stops with the refusal, the file untouched.
            crate::store::Health::Corrupt(e) => {
                tracing::error!(error = %e, "stopping: the database failed its check");
                self.life.fatal = Some(e);
                self.begin_shutdown();
            }
            // Exits with an error: a service manager starts it again, from the last commit.
            crate::store::Health::Stopped(e) => {
                tracing::error!(error = %e, "stopping: nothing can be committed any more");
                self.life.fatal = Some(e);
                self.begin_shutdown();
            }
        }
    }

    pub(super) fn begin_shutdown(&mut self) {
        if self.life.shutting_down {
            return;
        }
        info!(running = self.slots.running_count(), "shutting down: checkpointing running downloads");
        self.life.shutting_down = true;
        self.refuse_held();
        // Relaunches still waiting for a slot will not start: a `wake` waiting for one hears
        // so (it went unanswered, its connection closed under it). One whose launch already
        // began is answered when the launch reports, if the daemon still runs then.
        for key in self.launches.give_up_waiting() {
            let replies = self.sessions.get_mut(&key).map(|s| s.launch_over()).unwrap_or_default();
            for (conn, id) in replies {
                self.reply(conn, id, Err(shutting_down()));
            }
        }
        for id in self.slots.running() {
            self.stop_worker(id, AfterStop::Shutdown);
        }
        let deadline = self.timers.after(self.cfg.timing.shutdown_grace);
        self.timers.set(deadline, Timer::ShutdownDeadline);
    }

    /// The core's loop has ended: nothing more is taken. Requests that came meanwhile are
    /// refused (not run, so a client sends them again to the next daemon), what else came is
    /// seen to, and the connections stop reading (`ToCore::stopped`).
    pub(super) fn take_nothing_more(&mut self) {
        self.rx.close();
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                CoreMsg::Conn(ConnEvent::Request { conn, id, .. }) => self.reply(conn, id, Err(shutting_down())),
                other => self.handle(other),
            }
        }
    }

    pub(super) fn notify_shutdown(&mut self) {
        for conn in self.conns.values() {
            for key in &conn.attached {
                if let Some(s) = self.sessions.get(key) {
                    conn.handle.event(Event::Detached {
                        identifier: s.rec.identifier.clone(),
                        reason: DetachReason::DaemonShutdown,
                    });
                }
            }
        }
    }
}
