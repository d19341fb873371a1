//! Bringing the app back when its session has finished events: a `wake` to its running
//! process if one handles wakes, else a relaunch; with backoff, and a relaunch when a
//! woken process does not rejoin in time (docs/behaviour.md, "Waking the app").

use std::time::Duration;

use tracing::{info, warn};

use super::backoff::Backoff;
use super::launches::LaunchNo;
use super::timers::{Timer, wall_after};
use super::{ConnId, Core};
use crate::launcher;
use crate::model::{SessionKey, now_ms};
use dlsession_proto::{ErrorCode, ErrorInfo, WakeOutcome, WakeReason};

impl Core {
    fn has_finished_events(&self, key: SessionKey) -> bool {
        self.sessions.get(&key).is_some_and(|s| s.has_finished_events())
    }

    fn can_wake(&self, key: SessionKey) -> bool {
        let Some(s) = self.sessions.get(&key) else { return false };
        s.rec.config.launch.is_some()
            || s.rec.config.app_id.as_ref().is_some_and(|a| self.conns.wake_targets(a).next().is_some())
    }

    /// The wait before the next wake of a session woken `attempts` times without an
    /// acknowledgement: nothing before the first, then `wake_initial` doubling up to
    /// `wake_max`. Attaching does not reset it (an app that crashes on every relaunch is
    /// relaunched less and less often); acknowledging every event does.
    fn wake_backoff(&self, attempts: u32) -> Duration {
        if attempts == 0 {
            return Duration::ZERO;
        }
        Backoff { initial: self.cfg.timing.wake_initial, max: self.cfg.timing.wake_max }.base(attempts)
    }

    /// Schedules a wake if the session has finished events and none is due: at the
    /// backoff, or `at_least` from now if that is later.
    pub(super) fn check_wake(&mut self, key: SessionKey, at_least: Duration) {
        // Before the database passed its start check, no wake is planned: the start plans
        // every session's then (`recovery::on_checked`), waiting `wake_initial`. Nor while
        // stopping: an app woken now would meet a daemon about to go (the next start plans
        // the wakes again).
        if !self.life.checked || self.life.shutting_down {
            return;
        }
        if !self.has_finished_events(key) {
            self.cancel_wakes(key);
            return;
        }
        let Some(s) = self.sessions.get(&key) else { return };
        if s.wake_timer.is_some() || !self.can_wake(key) {
            return;
        }
        // Also for a session whose tasks were still running at the start (planned only
        // once they are done): its first wake waits `wake_initial` after the start.
        let since_start = self.life.checked_at.map_or(Duration::ZERO, |t| t.elapsed());
        let at_least = if s.waited_at_start {
            at_least.max(self.cfg.timing.wake_initial.saturating_sub(since_start))
        } else {
            at_least
        };
        let delay = self.wake_backoff(s.wake.attempts).max(at_least);
        let at = self.timers.after(delay);
        if let Some(s) = self.sessions.get_mut(&key) {
            s.wake_timer = Some(at);
            s.wake.next_wake = Some(wall_after(delay));
        }
        self.set_timer(at, Timer::Wake(key));
    }

    /// A process of `app_id` that took wakes is gone: a session of that app with no other
    /// way to be woken (no other such process, no launch spec) forgets its planned wakes,
    /// which would only find nobody and keep an idle daemon from exiting. A process of the
    /// app that comes back is told at once (`wake_for_new_app`).
    pub(super) fn wake_target_gone(&mut self, app_id: &str) {
        let keys: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.rec.config.app_id.as_deref() == Some(app_id))
            .filter(|(_, s)| s.wake_timer.is_some() || s.wake_unanswered.is_some())
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if !self.can_wake(key) {
                self.cancel_wakes(key);
            }
        }
    }

    /// Forgets the wakes due for a session (it is attached, or has nothing to deliver).
    pub(super) fn cancel_wakes(&mut self, key: SessionKey) {
        let Some(s) = self.sessions.get_mut(&key) else { return };
        let (timer, unanswered) = (s.wake_timer.take(), s.wake_unanswered.take());
        s.wake.next_wake = None;
        self.clear_timer(timer, Timer::Wake(key));
        self.clear_timer(unanswered, Timer::WakeUnanswered(key));
    }

    pub(super) fn on_wake_timer(&mut self, key: SessionKey) {
        if let Some(s) = self.sessions.get_mut(&key) {
            s.wake_timer = None;
            s.wake.next_wake = None;
        }
        if self.life.shutting_down {
            return;
        }
        // Its app is being relaunched (started, not yet attached or exited): a second one
        // is not started; the next wake is scheduled when that launch is over.
        if self.launches.holds(key) {
            tracing::debug!(session = %self.sessions.identifier(key), "a relaunch is under way; the wake waits for it");
            return;
        }
        if self.has_finished_events(key)
            && let Err(e) = self.wake_now(key, WakeReason::FinishedEvents, None)
        {
            warn!(session = %self.sessions.identifier(key), error = %e, "wake failed");
        }
    }

    /// A running app was sent `wake` and has not rejoined the session: relaunch it.
    pub(super) fn on_wake_unanswered(&mut self, key: SessionKey) {
        let Some(s) = self.sessions.get_mut(&key) else { return };
        s.wake_unanswered = None;
        if !self.has_finished_events(key) || self.life.shutting_down {
            return;
        }
        let answer = self.cfg.timing.wake_answer;
        // The relaunch is logged once, by `woke`.
        tracing::debug!(session = %self.sessions.identifier(key), ?answer, "the running app did not rejoin after wake; relaunching it");
        if let Err(e) = self.relaunch(key, WakeReason::FinishedEvents, None) {
            warn!(session = %self.sessions.identifier(key), error = %e, "relaunch failed");
        }
    }

    /// Wakes or relaunches the session's app now and schedules the next try with backoff.
    /// A relaunch starts off this thread: its outcome comes later (`None`), and is sent to
    /// `reply` then, if given.
    pub(super) fn wake_now(
        &mut self,
        key: SessionKey,
        reason: WakeReason,
        reply: Option<(ConnId, u64)>,
    ) -> Result<Option<WakeOutcome>, ErrorInfo> {
        self.wake_with(key, reason, reply, Unanswered::Relaunch)
    }

    fn wake_with(
        &mut self,
        key: SessionKey,
        reason: WakeReason,
        reply: Option<(ConnId, u64)>,
        unanswered: Unanswered,
    ) -> Result<Option<WakeOutcome>, ErrorInfo> {
        let s = self.sessions.get(&key).ok_or_else(|| ErrorInfo::new(ErrorCode::NoSuchSession, "no such session"))?;
        if s.attached.is_some() {
            return Ok(Some(WakeOutcome::Attached));
        }
        // Not while stopping (a notification clicked, a `wake` request): the app would meet
        // a daemon about to go.
        if self.life.shutting_down {
            return Err(super::life::shutting_down());
        }
        let identifier = s.rec.identifier.clone();
        let targets: Vec<ConnId> = match &s.rec.config.app_id {
            Some(app) => self.conns.wake_targets(app).collect(),
            None => Vec::new(),
        };
        if targets.is_empty() {
            // The app is not running: a session that asks for it tells the user too, unless
            // the user asked for the app (a click on that notification, `dlsessionctl wake`).
            if reason != WakeReason::Requested {
                self.notify(key);
            }
            return self.relaunch(key, reason, reply);
        }
        for conn in &targets {
            if let Some(c) = self.conns.get(conn) {
                c.handle.mailbox.put_wake(&identifier, reason);
            }
        }
        let outcome = WakeOutcome::Woken { connections: u32::try_from(targets.len()).unwrap_or(u32::MAX) };
        // If nobody rejoins in time, the app's running process cannot or will not: relaunch.
        if unanswered == Unanswered::Relaunch
            && self.sessions.get(&key).is_some_and(|s| s.rec.config.launch.is_some() && s.wake_unanswered.is_none())
        {
            let at = self.timers.after(self.cfg.timing.wake_answer);
            if let Some(s) = self.sessions.get_mut(&key) {
                s.wake_unanswered = Some(at);
            }
            self.set_timer(at, Timer::WakeUnanswered(key));
        }
        self.woke(key, &Ok(outcome.clone()));
        Ok(Some(outcome))
    }

    /// Relaunches the session's app (if it has a launch spec) on a blocking thread (it
    /// prepares a log file and forks); `on_launched` records the outcome and schedules the
    /// next try. A relaunch already under way is not started twice: `reply` waits for it.
    fn relaunch(
        &mut self,
        key: SessionKey,
        reason: WakeReason,
        reply: Option<(ConnId, u64)>,
    ) -> Result<Option<WakeOutcome>, ErrorInfo> {
        let no_session = || ErrorInfo::new(ErrorCode::NoSuchSession, "no such session");
        let s = self.sessions.get(&key).ok_or_else(no_session)?;
        let Some(spec) = s.rec.config.launch.clone() else {
            return Ok(Some(WakeOutcome::NoTarget));
        };
        // The app launched before still runs and has not attached (hung at a prompt, say):
        // another would pile up beside it at every backoff, never reaped, holding the
        // daemon from idle exit. The wake counts as failed (its backoff grows) and says why.
        if let Some((_, pid)) = s.launched_process
            && s.attached.is_none()
        {
            let still = ErrorInfo::new(
                ErrorCode::Internal,
                format!("the app relaunched before (pid {pid}) still runs and has not attached; not starting another"),
            );
            self.woke(key, &Err(still.clone()));
            if let Some((conn, id)) = reply {
                self.reply(conn, id, Err(still));
            }
            return Ok(None);
        }
        let s = self.sessions.get_mut(&key).ok_or_else(no_session)?;
        s.launch_replies.extend(reply);
        if std::mem::replace(&mut s.launching, true) {
            return Ok(None);
        }
        let Some(launch) = self.launches.take_or_wait(key, reason) else {
            info!(
                session = %self.sessions.identifier(key),
                waiting = self.launches.waiting(),
                max = self.cfg.limits.max_concurrent_launches,
                "relaunch waits for a launch slot (max_concurrent_launches)"
            );
            return Ok(None);
        };
        self.start_launch(key, spec, reason, launch);
        Ok(None)
    }

    /// Starts the relaunch of a session that holds a launch slot, on a blocking thread.
    fn start_launch(
        &mut self,
        key: SessionKey,
        spec: dlsession_proto::LaunchSpec,
        reason: WakeReason,
        launch: LaunchNo,
    ) {
        let at = self.timers.after(self.cfg.timing.wake_answer);
        let Some(s) = self.sessions.get_mut(&key) else { return };
        let old = s.launch_slot_timer.replace(at);
        self.clear_timer(old, Timer::LaunchSlot(key));
        self.set_timer(at, Timer::LaunchSlot(key));
        let Some(s) = self.sessions.get(&key) else { return };
        let identifier = s.rec.identifier.clone();
        let (socket, log_dir, scope) = (self.cfg.socket.clone(), self.cfg.launch_log_dir(), self.launch_scope);
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let ctx = launcher::Context {
                identifier: &identifier,
                socket: &socket,
                log_dir: &log_dir,
                reason: reason.as_str(),
                scope,
            };
            // `LaunchFinished` must reach the core after `Launched`, which counts the launch
            // (a D-Bus activation finishes before `launch` returns): an early finish waits
            // here until `Launched` is sent.
            let gate = std::sync::Arc::new(std::sync::Mutex::new((false, None)));
            let (exited, on_exit_gate) = (tx.clone(), gate.clone());
            let launched = crate::panics::contained("a relaunch", || {
                launcher::launch(&spec, &ctx, move |result| {
                    let mut g = on_exit_gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if g.0 {
                        let _ = exited.send(super::CoreMsg::LaunchFinished { session: key, launch, result });
                    } else {
                        g.1 = Some(result);
                    }
                })
            })
            // Else the session stayed "launching" and was never relaunched again.
            .unwrap_or_else(|why| Err(format!("the relaunch failed: {why}")));
            let mut g = gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = tx.send(super::CoreMsg::Launched { session: key, launch, launched });
            g.0 = true;
            if let Some(result) = g.1.take() {
                let _ = tx.send(super::CoreMsg::LaunchFinished { session: key, launch, result });
            }
        });
    }

    /// The session's launch is over (its app attached, or `wake_answer` passed: `launch` is
    /// `None`; or launch number `launch` exited or failed): its slot, if that launch held
    /// it, goes to the next in line.
    pub(super) fn release_launch_slot(&mut self, key: SessionKey, launch: Option<LaunchNo>) {
        if !self.launches.release(key, launch) {
            return;
        }
        if let Some(s) = self.sessions.get_mut(&key) {
            let timer = s.launch_slot_timer.take();
            self.clear_timer(timer, Timer::LaunchSlot(key));
        }
        // A wake that came due meanwhile was held back: schedule it (if events still wait
        // and nobody is attached to collect them).
        if self.sessions.get(&key).is_some_and(|s| s.attached.is_none()) {
            self.check_wake(key, Duration::ZERO);
        }
        self.start_waiting_launches();
    }

    pub(super) fn on_launch_slot_timer(&mut self, key: SessionKey) {
        if let Some(s) = self.sessions.get_mut(&key) {
            s.launch_slot_timer = None;
        }
        if self.launches.holds(key) {
            tracing::debug!(session = %self.sessions.identifier(key), "the relaunched app has not attached yet; its launch slot goes to the next");
        }
        self.release_launch_slot(key, None);
    }

    /// Starts the relaunches waiting in line while slots are free. One that is no longer
    /// needed (its app attached meanwhile, or its events were collected) gives its slot on.
    pub(super) fn start_waiting_launches(&mut self) {
        if self.life.shutting_down {
            return;
        }
        while let Some((key, reason, launch)) = self.launches.next() {
            // Still wanted: events wait, or a `wake` request waits for this launch.
            let wanted =
                self.has_finished_events(key) || self.sessions.get(&key).is_some_and(|s| !s.launch_replies.is_empty());
            let spec = self
                .sessions
                .get(&key)
                .filter(|s| s.attached.is_none())
                .and_then(|s| s.rec.config.launch.clone())
                .filter(|_| wanted);
            match spec {
                Some(spec) => self.start_launch(key, spec, reason, launch),
                None => {
                    self.launches.release(key, Some(launch));
                    let outcome = match self.sessions.get(&key) {
                        Some(s) if s.attached.is_some() => WakeOutcome::Attached,
                        _ => WakeOutcome::NoTarget,
                    };
                    let replies = self.sessions.get_mut(&key).map(|s| s.launch_over()).unwrap_or_default();
                    for (conn, id) in replies {
                        self.reply(conn, id, Ok(dlsession_proto::Response::Wake(outcome.clone())));
                    }
                }
            }
        }
    }

    /// A relaunch was started (or could not be): record it, answer who asked.
    pub(super) fn on_launched(
        &mut self,
        key: SessionKey,
        launch: LaunchNo,
        launched: Result<launcher::Launched, String>,
    ) {
        if launched.is_ok() {
            self.life.launches_running += 1;
        }
        if let (Ok(launcher::Launched::Process(pid)), Some(s)) = (&launched, self.sessions.get_mut(&key)) {
            s.launched_process = Some((launch, *pid));
        }
        let outcome = launched
            .map(|l| match l {
                launcher::Launched::Process(pid) => WakeOutcome::Launched { pid },
                launcher::Launched::Unit(unit) => WakeOutcome::UnitStarted { unit },
                launcher::Launched::Activated(app_id) => WakeOutcome::Activated { app_id },
            })
            .map_err(|e| ErrorInfo::new(ErrorCode::Internal, format!("cannot relaunch the app: {e}")));
        let replies = self.sessions.get_mut(&key).map(|s| s.launch_over()).unwrap_or_default();
        self.woke(key, &outcome);
        for (conn, id) in replies {
            self.reply(conn, id, outcome.clone().map(dlsession_proto::Response::Wake));
        }
        if outcome.is_err() {
            self.release_launch_slot(key, Some(launch));
        }
    }

    /// Records a wake or relaunch (one log line) and schedules the next with backoff.
    fn woke(&mut self, key: SessionKey, outcome: &Result<WakeOutcome, ErrorInfo>) {
        let again = self.has_finished_events(key);
        let Some(s) = self.sessions.get_mut(&key) else { return };
        s.wake.attempts = s.wake.attempts.saturating_add(1);
        s.wake.last_wake = Some(now_ms());
        s.wake.last_error = outcome.as_ref().err().cloned();
        let attempts = s.wake.attempts;
        match outcome {
            Ok(o) => info!(session = %s.rec.identifier, outcome = ?o, attempt = attempts, "wake"),
            Err(e) => warn!(session = %s.rec.identifier, error = %e, attempt = attempts, "wake failed"),
        }
        let old = s.wake_timer.take();
        s.wake.next_wake = None;
        self.clear_timer(old, Timer::Wake(key));
        if again {
            self.check_wake(key, Duration::ZERO);
        }
    }

    /// Shows (or updates) the session's notification, if its policy asks for one.
    fn notify(&self, key: SessionKey) {
        let Some(s) = self.sessions.get(&key).filter(|s| s.rec.policy.notify) else { return };
        let (mut done, mut failed) = (0u64, 0u64);
        for ev in s.events.values() {
            if let dlsession_proto::DurableEvent::Completed { error, .. } = &ev.event {
                match error {
                    None => done += 1,
                    Some(_) => failed += 1,
                }
            }
        }
        if done + failed == 0 {
            return;
        }
        let plural = |n: u64| if n == 1 { "" } else { "s" };
        let summary = match (done, failed) {
            (d, 0) => format!("{d} download{} finished", plural(d)),
            (0, f) => format!("{f} download{} failed", plural(f)),
            (d, f) => format!("{d} download{} finished, {f} failed", plural(d)),
        };
        let body = format!("{}: open the app to collect them", s.rec.identifier);
        self.notifier.show(crate::notify::Notice { identifier: s.rec.identifier.clone(), summary, body });
    }

    /// The user clicked the session's notification: bring the app now.
    pub(super) fn on_notification_clicked(&mut self, identifier: &str) {
        let Some(key) = self.sessions.find(identifier) else { return };
        info!(session = %identifier, "notification clicked");
        if let Err(e) = self.wake_now(key, WakeReason::Requested, None) {
            warn!(session = %identifier, error = %e, "wake failed");
        }
    }

    /// A process announced `app_id`: wake its sessions that wait for it, if it rejoins.
    pub(super) fn wake_for_new_app(&mut self, app_id: &str, conn: ConnId) {
        if !self.conns.get(&conn).is_some_and(|c| c.rejoins_on_wake()) {
            return;
        }
        let keys: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.rec.config.app_id.as_deref() == Some(app_id))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if self.has_finished_events(key) {
                // Told at once, out of its backoff, since it just came up; if it does not
                // rejoin, the next try is the backoff's, not a relaunch `wake_answer_ms`
                // later (an app that exits before rejoining would be relaunched in a loop).
                let _ = self.wake_with(key, WakeReason::FinishedEvents, None, Unanswered::Wait);
            }
        }
    }

    pub(super) fn on_launch_finished(&mut self, key: SessionKey, launch: LaunchNo, result: Result<(), String>) {
        self.life.launches_running = self.life.launches_running.saturating_sub(1);
        if let Some(s) = self.sessions.get_mut(&key)
            && s.launched_process.is_some_and(|(no, _)| no == launch)
        {
            s.launched_process = None;
        }
        // A launcher that succeeds at once (a unit started, a D-Bus activation, a command
        // that puts the app in the background) has not brought the app yet: the slot stays
        // until the app attaches or `wake_answer_ms` passes, or a storm of such launches
        // would get past the cap.
        let app_awaited = result.is_ok()
            && self.has_finished_events(key)
            && self.sessions.get(&key).is_some_and(|s| s.attached.is_none());
        if !app_awaited {
            self.release_launch_slot(key, Some(launch));
        }
        let Err(e) = result else { return };
        // An app that collected everything and then exited with an error is not a failed
        // wake: nothing waits for it any more.
        if !self.has_finished_events(key) {
            tracing::debug!(session = %self.sessions.identifier(key), error = %e, "the relaunched app exited with an error after collecting its events");
            return;
        }
        if let Some(s) = self.sessions.get_mut(&key) {
            warn!(session = %s.rec.identifier, error = %e, "the relaunched app failed; it is relaunched again with backoff while events wait");
            s.wake.last_error = Some(ErrorInfo::new(ErrorCode::Internal, format!("relaunch failed: {e}")));
        }
    }
}

/// What a wake sent to running processes leads to if none rejoins in `wake_answer_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unanswered {
    /// A relaunch (the session has a launch spec).
    Relaunch,
    /// Nothing until the next wake at its backoff.
    Wait,
}
