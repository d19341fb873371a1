//! Following the network and the power (docs/behaviour.md, "The network", "Metered
//! networks and battery"): a task whose peer has no route waits with `no_network` and
//! spends no attempts; a running one whose route goes away stops at once (its data kept);
//! when routes come back, those tasks, and tasks backing off after network errors, go again
//! at once with their backoff reset. Tasks whose policy (their own over their session's)
//! refuses the metered network or the battery stop and wait; they go on when conditions
//! allow.

use std::collections::HashMap;
use std::net::IpAddr;

use tracing::{debug, info, warn};

use super::Core;
use super::admission::admit_policy;
use super::task::{AfterStop, Task};
use crate::engine::Failure;
use crate::model::now_ms;
use crate::net;
use dlsession_proto::{Conditions, ErrorCode, SessionPolicy, TaskId, TaskState};

/// Whether `failure` may mean the network is gone (rather than the server refusing).
fn network_class(failure: &Failure) -> bool {
    matches!(failure.error.code, ErrorCode::Network | ErrorCode::TimedOut) && !failure.discard_partial
}

/// An IP address written into the URL (no name to resolve).
fn literal_peer(url: &str) -> Option<IpAddr> {
    let host = url::Url::parse(url).ok()?.host_str()?.trim_start_matches('[').trim_end_matches(']').to_owned();
    host.parse().ok()
}

impl Core {
    /// The network watcher runs: from now on tasks may wait for the network (without it,
    /// nothing would tell them it came back).
    pub(super) fn on_network_watched(&mut self) {
        self.life.network_watched = true;
        self.life.online = net::default_route();
        self.life.way_out = Some(net::way_out());
        info!(online = self.life.online, "following the network (rtnetlink)");
    }

    /// Whether `t`'s peer can be reached: the route of its last peer (this attempt's, else
    /// an earlier one's: a name that fails to resolve on a LAN without a default route
    /// does not make its server unreachable) or of the URL's address; a name never resolved
    /// counts as reachable when a default route exists, and a known peer too when one does
    /// (it may have moved to another address). `routes`
    /// memoises checks within one pass.
    fn reachable(t: &Task, default_route: bool, routes: &mut HashMap<IpAddr, bool>) -> bool {
        let mut route = |ip: IpAddr| *routes.entry(ip).or_insert_with(|| net::route_to(ip));
        match (t.peer.or(t.earlier_peer), literal_peer(&t.rec.url)) {
            // Where the last attempt went (a proxy, a server a redirect named) comes first.
            (Some(ip), literal) => route(ip) || (literal.is_none() && default_route),
            (None, Some(ip)) => route(ip),
            (None, None) => default_route,
        }
    }

    /// Called for a failed attempt: true if the task should wait for the network instead
    /// of backing off (its peer has no route).
    pub(super) fn offline_for(&self, id: TaskId, failure: &Failure) -> bool {
        if !self.life.network_watched || !network_class(failure) {
            return false;
        }
        self.tasks.get(&id).is_some_and(|t| !Self::reachable(t, net::default_route(), &mut HashMap::new()))
    }

    /// Whether the task waits for connectivity (else it completes with `not_connected` when
    /// there is no route).
    pub(super) fn waits_for_network(&self, id: TaskId) -> bool {
        self.tasks.get(&id).is_none_or(|t| self.policy_of(t).waits_for_connectivity)
    }

    /// The policy `t` runs under: its own over its session's.
    pub(super) fn policy_of(&self, t: &Task) -> SessionPolicy {
        t.rec.policy.over(self.sessions.get(&t.rec.session).map(|s| s.rec.policy).unwrap_or_default())
    }

    /// Whether `t`'s policy keeps it from running in today's conditions.
    pub(super) fn policy_refuses(&self, t: &Task) -> bool {
        admit_policy(self.policy_of(t), self.limits()).is_err()
    }

    /// Puts the task in `waiting` with `no_network`: no timer, no attempt, until a route
    /// to its peer appears.
    pub(super) fn wait_for_network(&mut self, id: TaskId) {
        // The route may be back already (it came back while the worker was stopping), or
        // the watcher may have stopped meanwhile: then nothing would say it came back.
        if !self.life.network_watched
            || self.tasks.get(&id).is_some_and(|t| Self::reachable(t, net::default_route(), &mut HashMap::new()))
        {
            self.set_state(id, TaskState::Queued);
            self.enqueue(id);
            return;
        }
        // Set before the state change, which tells watchers: they see the reason.
        if let Some(t) = self.tasks.get_mut(&id) {
            t.no_network_since.get_or_insert_with(now_ms);
            t.rec.retry_at = None;
            info!(task = id, "no route to the server: waiting for the network");
        }
        self.set_state(id, TaskState::Waiting);
    }

    /// The watcher stopped: nothing will say when the network returns, so tasks waiting
    /// for it go now, and none waits for it again.
    pub(super) fn on_network_unwatched(&mut self) {
        self.life.network_watched = false;
        let waiting: Vec<TaskId> =
            self.tasks.values().filter(|t| t.no_network_since.is_some()).map(|t| t.rec.id).collect();
        for id in waiting {
            self.retry_now(id, false, Vec::new());
        }
        self.schedule();
    }

    /// Links, addresses or routes changed.
    pub(super) fn on_network_changed(&mut self) {
        self.network_changed(false);
    }

    /// Looks at every task again; `internet_back`: NetworkManager says the internet is
    /// reachable again (as when a default route returns).
    fn network_changed(&mut self, internet_back: bool) {
        if !self.life.network_watched {
            return;
        }
        // Pooled connections go when the way out moved (a dock, a VPN, a new lease), not on
        // every message (a refreshed address lifetime).
        let way_out = net::way_out();
        if self.life.way_out.replace(way_out).is_some_and(|before| before != way_out) {
            info!(?way_out, "the way out changed: pooled connections are forgotten");
            self.engine.forget_connections();
        }
        let was_online = self.life.online;
        self.life.online = net::default_route();
        let (online, mut came_back) = (self.life.online, (self.life.online && !was_online) || internet_back);
        // A link that flaps (Wi-Fi dropping every half minute, a connectivity check that
        // toggles) must not retry every backing-off task on each return: at most once per
        // `COME_BACK_DAMPING`; in between they follow their backoff.
        if came_back {
            let recent = self.life.came_back_at.is_some_and(|at| at.elapsed() < COME_BACK_DAMPING);
            if recent {
                debug!("the network came back again soon: tasks backing off keep their backoff");
                came_back = false;
            } else {
                self.life.came_back_at = Some(std::time::Instant::now());
            }
        }
        // One check per address per pass: thousands of tasks share few servers.
        let mut routes: HashMap<IpAddr, bool> = HashMap::new();
        let mut stop = Vec::new();
        // Waiting for the network (their backoff starts afresh), and backing off after
        // network errors (they keep their backoff: a retry that fails again waits longer).
        let (mut go, mut again) = (Vec::new(), Vec::new());
        for t in self.tasks.values() {
            let id = &t.rec.id;
            let transfer = t.rec.phase == crate::model::Phase::Transfer;
            match t.state {
                // A connection whose route is gone would otherwise sit until the stall
                // timeout. A task finishing its file is never stopped.
                TaskState::Running
                    if transfer
                        && t.run.as_ref().is_some_and(|r| r.holds_slot)
                        && t.peer.is_some_and(|ip| !*routes.entry(ip).or_insert_with(|| net::route_to(ip))) =>
                {
                    stop.push(*id)
                }
                TaskState::Waiting if t.no_network_since.is_some() && Self::reachable(t, online, &mut routes) => {
                    go.push(*id)
                }
                TaskState::Waiting
                    if came_back
                        && t.no_network_since.is_none()
                        && transfer
                        && t.rec
                            .last_error
                            .as_ref()
                            .is_some_and(|e| matches!(e.code, ErrorCode::Network | ErrorCode::TimedOut)) =>
                {
                    again.push(*id)
                }
                _ => {}
            }
        }
        if !stop.is_empty() || !go.is_empty() || !again.is_empty() {
            info!(
                online = self.life.online,
                stopped = stop.len(),
                retried = go.len() + again.len(),
                "the network changed"
            );
        }
        for id in stop {
            self.stop_worker(id, AfterStop::NoNetwork);
        }
        for id in go {
            self.retry_now(id, true, Vec::new());
        }
        for id in again {
            self.retry_now(id, false, Vec::new());
        }
        self.schedule();
    }

    /// NetworkManager or UPower said something new.
    pub(super) fn on_desktop(&mut self, facts: crate::desktop::Desktop) {
        let reconnected = facts.nm_connected == Some(true) && self.life.desktop.nm_connected == Some(false);
        // Out of a captive portal (or limited connectivity) to the internet: the network is
        // back even if no route changed.
        let internet_back = facts.nm_internet == Some(true) && self.life.desktop.nm_internet == Some(false);
        match (facts.portal == Some(true), self.life.portal_since) {
            (true, None) => {
                warn!("the network is behind a captive portal: nothing starts until it lets traffic through");
                self.life.portal_since = Some(crate::model::now_ms());
            }
            (false, Some(_)) => {
                info!("out of the captive portal: tasks go on");
                self.life.portal_since = None;
            }
            _ => {}
        }
        info!(
            connected = ?facts.nm_connected,
            internet = ?facts.nm_internet,
            portal = ?facts.portal,
            metered = ?facts.metered,
            on_battery = ?facts.on_battery,
            battery_percent = ?facts.battery_percent,
            "network and power"
        );
        let facts_internet = facts.nm_internet;
        self.life.desktop = facts;
        self.life.desktop_heard = true;
        // NetworkManager connecting again is news about routes too, and the network coming
        // back even where no default route went (a full-tunnel VPN keeps its own while the
        // wifi under it is gone: tasks backing off would wait out their backoff).
        // (Not while NetworkManager says the internet is still missing: the return of
        // `Connectivity` to full says so later, and the 30 s damping would swallow it.)
        let back = internet_back || (reconnected && facts_internet != Some(false));
        if reconnected || internet_back {
            self.network_changed(back);
        }
        self.enforce_policies();
    }

    /// Makes every task follow its policy (its own over its session's) in today's
    /// conditions: running tasks it refuses stop and wait, queued ones it refuses are held
    /// off the lanes, held ones it allows again go back to them, and what may start starts.
    pub(super) fn enforce_policies(&mut self) {
        let limits = self.limits();
        let (mut refused, mut hold, mut release, mut deferred) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // Held still, for another reason now (metered, then on battery): watchers hear it.
        let mut reheld = Vec::new();
        for t in self.tasks.values() {
            // Only running tasks and queued ones in a lane (or held) are weighed: on a timer
            // (`earliest_begin`) a task is in no lane, and `enqueue` weighs its policy when
            // the timer fires. Suspended ones (most, with many tasks) cost nothing here.
            let weighed = match t.state {
                TaskState::Running => true,
                TaskState::Queued => t.timer.is_none() && t.off_lanes.is_none(),
                _ => false,
            };
            if !weighed || t.rec.phase != crate::model::Phase::Transfer {
                continue;
            }
            let refusal = admit_policy(self.policy_of(t), limits).err();
            let allowed = refusal.is_none();
            let id = t.rec.id;
            match t.state {
                TaskState::Running if !allowed && !t.awaits_answer() => refused.push(id),
                TaskState::Running if !allowed => deferred.push(id),
                TaskState::Queued => {
                    let held = self.slots.is_held(id);
                    if held && allowed {
                        release.push((t.lane(), t.rec.priority, id));
                    } else if !held && !allowed {
                        hold.push((t.lane(), t.rec.priority, id, refusal));
                    } else if held && t.held_for != refusal {
                        reheld.push((id, refusal));
                    }
                }
                _ => {}
            }
        }
        if !refused.is_empty() || !hold.is_empty() || !release.is_empty() {
            info!(
                stopped = refused.len(),
                held = hold.len(),
                released = release.len(),
                "conditions or policies changed: tasks follow their policies"
            );
        }
        for (lane, prio, id, why) in hold {
            self.hold_queued(&lane, prio, id, why);
        }
        for (lane, prio, id) in release {
            self.release_held_task(&lane, prio, id);
        }
        for (id, why) in reheld {
            self.note_held_for(id, why);
        }
        for id in refused {
            self.stop_worker(id, AfterStop::Requeue);
        }
        for id in deferred {
            if let Some(t) = self.tasks.get_mut(&id) {
                t.policy_deferred = true;
            }
        }
        // Tasks waiting for a route in sessions that no longer wait for one give up now.
        let given_up: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Waiting && t.no_network_since.is_some())
            .filter(|t| !self.policy_of(t).waits_for_connectivity)
            .map(|t| t.rec.id)
            .collect();
        if !given_up.is_empty() {
            let (mut ops, mut after) = (Vec::new(), Vec::new());
            for id in given_up {
                self.unqueue(id);
                self.complete(id, Some(not_connected()), &mut ops, &mut after);
            }
            self.commit(ops, after);
        }
        self.schedule();
    }

    /// The network and power as the daemon sees them.
    pub(super) fn conditions(&self) -> Conditions {
        let d = &self.life.desktop;
        let network_source = match (self.life.network_watched, d.nm_connected.is_some()) {
            (true, true) if self.life.portal_since.is_some() => {
                "rtnetlink+NetworkManager (behind a captive portal: sign in to it)".to_owned()
            }
            (true, true) => "rtnetlink+NetworkManager".to_owned(),
            (true, false) => format!("rtnetlink; {}", d.network_source),
            (false, _) => format!("no rtnetlink; {}", d.network_source),
        };
        Conditions {
            online: (!self.life.network_watched || self.life.online)
                && d.nm_connected != Some(false)
                && d.nm_internet != Some(false),
            metered: d.metered.unwrap_or(false),
            on_battery: d.on_battery.unwrap_or(false),
            battery_percent: d.battery_percent,
            network_source,
            power_source: if d.power_source.is_empty() { "not asked yet".into() } else { d.power_source.clone() },
        }
    }
}

/// The completion error of a task with no route to its server, in a session that does not
/// wait for connectivity.
pub(super) fn not_connected() -> dlsession_proto::ErrorInfo {
    dlsession_proto::ErrorInfo::new(
        ErrorCode::NotConnected,
        "no route to the server, and the session does not wait for connectivity (waits_for_connectivity is off)",
    )
}

/// The network coming back retries tasks backing off after network errors at most once
/// in this long.
const COME_BACK_DAMPING: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::IpAddr;

    use super::super::task::Tasks;
    use super::Core;
    use crate::model::TaskRecord;
    use dlsession_proto::TaskSpec;

    /// A LAN server whose name stopped resolving (its DNS restarted) on a network without a
    /// default route is still reachable through the address an earlier attempt learnt: it
    /// waited for a route change that never comes.
    #[test]
    fn an_earlier_attempts_address_serves_when_this_one_learnt_none() {
        let mut tasks = Tasks::new(1);
        tasks.insert(TaskRecord::new(1, 1, TaskSpec::get("http://nas.lan/f"), 0, 0o644), "nas.lan:80".into());
        let Some(t) = tasks.get_mut(&1) else { unreachable!() };
        let lan: IpAddr = [192, 168, 1, 5].into();
        let mut routes = HashMap::from([(lan, true)]);
        t.earlier_peer = Some(lan);
        assert!(Core::reachable(t, false, &mut routes));
        t.earlier_peer = None;
        assert!(!Core::reachable(t, false, &mut routes), "a name never resolved, and no default route");
        t.peer = Some(lan);
        assert!(Core::reachable(t, false, &mut routes));
    }
}
