//! `dlsessionctl watch [--session ID]`
//!
//! On `Watch` the daemon sends the current state of every task that is not completed,
//! then an update on every change. This command follows them until none is queued,
//! running or waiting.

use dlsession_proto::redact;
use std::collections::HashMap;
use std::time::Duration;

use dlsession_proto::{Event, Request, TaskId, TaskInfo, TaskState, WatchFilter};

use crate::cli::WatchArgs;
use crate::commands::ctx::{Ctx, request_ok};
use crate::error::{CliError, Exit, Result};
use crate::json::{TaskJson, WatchJson};
use crate::output;
use crate::progress::{self, Progress};

/// How long to collect the initial burst of task states before deciding that nothing is active.
const INITIAL_BURST: Duration = Duration::from_millis(200);

pub async fn run(ctx: &Ctx, args: WatchArgs) -> Result<Exit> {
    let client = ctx.connect_lasting().await?;
    let mut events = client.events();
    request_ok(&client, Request::Watch(WatchFilter { session: args.session.clone(), tasks: Vec::new() })).await?;
    let bars = !ctx.json && progress::terminal();
    let mut progress = Progress::new(bars, !ctx.json);
    let mut states: HashMap<TaskId, TaskState> = HashMap::new();
    let initial = tokio::time::sleep(INITIAL_BURST);
    tokio::pin!(initial);
    let mut settled = false;
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    let lost = super::ctx::lost_for_good(&client, Some(progress.notes()));
    tokio::pin!(lost);
    // After a reconnect the daemon sends only tasks not completed: one that completed while
    // this was away is asked for, else the watch would wait for it for ever.
    // (A restarted daemon numbers its connections from 1 again: its pid tells them apart.)
    let which = || {
        let w = client.welcome();
        (w.pid, w.connection_id)
    };
    let mut connection = which();
    let mut look = tokio::time::interval(Duration::from_millis(500));
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut queued: std::collections::VecDeque<Event> = std::collections::VecDeque::new();
    loop {
        if settled && !states.values().any(|s| s.is_active()) {
            break;
        }
        let event = tokio::select! {
            biased;
            Some(event) = async { queued.pop_front() } => Some(event),
            event = events.recv() => event,
            e = &mut lost => {
                progress.clear();
                return Err(e);
            }
            _ = look.tick() => {
                let now = which();
                if now != connection && client.is_connected() {
                    connection = now;
                    let active: Vec<TaskId> = states.iter().filter(|(_, s)| s.is_active()).map(|(id, _)| *id).collect();
                    for task in active {
                        match client.request(Request::GetTask { task }).await {
                            Ok(dlsession_proto::Response::Task(detail)) => queued.push_back(Event::TaskUpdate(detail.info)),
                            Err(e) if e.code() == dlsession_proto::ErrorCode::NoSuchTask => {
                                states.remove(&task);
                            }
                            _ => {}
                        }
                    }
                }
                continue;
            }
            _ = &mut initial, if !settled => {
                settled = true;
                if !states.values().any(|s| s.is_active()) && !ctx.json {
                    progress.out("no active tasks")?;
                }
                continue;
            }
            _ = &mut interrupt => {
                progress.clear();
                return Ok(Exit::Interrupted);
            }
        };
        match event {
            None => {
                progress.clear();
                return Err(CliError::Client(dlsession::Error::Disconnected { reason: None }));
            }
            // An update older than the completion already seen (the answer to a look after
            // a reconnect and the live updates come by different ways): completed stays.
            Some(Event::TaskUpdate(info))
                if info.state != TaskState::Completed && states.get(&info.id) == Some(&TaskState::Completed) => {}
            Some(Event::TaskUpdate(info)) => {
                let before = states.insert(info.id, info.state);
                if ctx.json {
                    let line = WatchJson::Task(TaskJson::from(&info));
                    progress.out(&serde_json::to_string(&line).map_err(std::io::Error::from)?)?;
                } else if before != Some(info.state) && (!bars || info.state == TaskState::Completed) {
                    // With bars, the bar shows the state; only the outcome gets a line.
                    progress.out(&describe(&info))?;
                }
                progress.update(&info);
            }
            Some(Event::Progress { identifier, task, bytes_written, total_bytes_written, total_bytes_expected }) => {
                if ctx.json {
                    let line = WatchJson::Progress {
                        task,
                        session: &identifier,
                        bytes_written,
                        total_bytes_written,
                        total_bytes_expected,
                    };
                    progress.out(&serde_json::to_string(&line).map_err(std::io::Error::from)?)?;
                } else if states.get(&task).is_some_and(|s| s.is_active()) {
                    progress.progress(task, total_bytes_written, total_bytes_expected);
                }
            }
            Some(Event::SendProgress {
                identifier,
                task,
                bytes_sent,
                total_bytes_sent,
                total_bytes_expected_to_send,
            }) => {
                if ctx.json {
                    let line = WatchJson::SendProgress {
                        task,
                        session: &identifier,
                        bytes_sent,
                        total_bytes_sent,
                        total_bytes_expected_to_send,
                    };
                    progress.out(&serde_json::to_string(&line).map_err(std::io::Error::from)?)?;
                } else if states.get(&task).is_some_and(|s| s.is_active()) {
                    progress.progress(task, total_bytes_sent, Some(total_bytes_expected_to_send));
                }
            }
            Some(_) => {}
        }
    }
    progress.clear();
    Ok(Exit::Success)
}

/// A line for a task's new state.
fn describe(info: &TaskInfo) -> String {
    let name = redact::url(&info.url);
    match (info.state, &info.error, &info.wait) {
        (TaskState::Completed, None, _) => format!(
            "task {} completed: {} ({})",
            info.id,
            info.location.as_deref().unwrap_or(&name),
            output::size(info.bytes_received)
        ),
        (TaskState::Completed, Some(e), _) => format!("task {} failed: {}: {name}", info.id, output::error(e)),
        (TaskState::Running, _, _) => {
            format!("task {} running: {name} ({})", info.id, output::progress(info.bytes_received, info.bytes_expected))
        }
        (TaskState::Suspended, _, _) => format!("task {} suspended: {name}", info.id),
        (state, _, Some(w)) => {
            format!("task {} {state}: {name} ({})", info.id, output::wait_short(w, output::now_ms()))
        }
        (state, _, None) => format!("task {} {state}: {name}", info.id),
    }
}
