//! Protocol 2: the shapes are today's, less what protocol 3 appended. A protocol-2 client
//! cannot decode a variant it does not know, so what it is sent is mapped onto the
//! variants it has (docs/protocol.md, "Protocol 2 clients"):
//!
//! - wait reasons `NoNetwork` → `Backoff` with a `network` error, `MeteredNetwork`,
//!   `OnBattery`, `Discretionary` → `GlobalLimit { limit: 0 }`;
//! - error code `not_connected` → `network`, the name leading the message;
//! - launch spec `DesktopApp` → none; wake outcome `Activated` → `UnitStarted`;
//! - the answers to protocol-3 requests (which a protocol-2 client cannot send) → `Ok`.

use crate::{
    DurableEvent, ErrorCode, ErrorInfo, Event, LaunchSpec, Response, ServerMessage, SessionInfo, TaskInfo, WaitReason,
    WakeOutcome,
};

/// A message of the current protocol in protocol 2's variants.
pub fn downgrade(msg: ServerMessage) -> ServerMessage {
    match msg {
        ServerMessage::Response { id, result } => {
            ServerMessage::Response { id, result: result.map(response).map_err(error) }
        }
        ServerMessage::Event(e) => ServerMessage::Event(event(e)),
    }
}

/// An error in protocol 2: a code it lacks keeps its name in the message.
pub fn error(e: ErrorInfo) -> ErrorInfo {
    match e.code {
        ErrorCode::NotConnected => {
            ErrorInfo { code: ErrorCode::Network, message: format!("not_connected: {}", e.message), ..e }
        }
        _ => e,
    }
}

fn wait(w: WaitReason) -> WaitReason {
    match w {
        WaitReason::NoNetwork { .. } => WaitReason::Backoff {
            until: 0,
            attempt: 0,
            last_error: ErrorInfo::new(ErrorCode::Network, "no route to the server"),
        },
        WaitReason::MeteredNetwork | WaitReason::OnBattery | WaitReason::Discretionary => {
            WaitReason::GlobalLimit { limit: 0 }
        }
        WaitReason::Backoff { until, attempt, last_error } => {
            WaitReason::Backoff { until, attempt, last_error: error(last_error) }
        }
        other => other,
    }
}

fn task(t: TaskInfo) -> TaskInfo {
    TaskInfo { wait: t.wait.map(wait), error: t.error.map(error), ..t }
}

fn session(mut s: SessionInfo) -> SessionInfo {
    if matches!(s.config.launch, Some(LaunchSpec::DesktopApp { .. })) {
        s.config.launch = None;
    }
    s.wake.last_error = s.wake.last_error.map(error);
    s
}

fn response(r: Response) -> Response {
    match r {
        Response::Session(s) => Response::Session(session(s)),
        Response::Sessions(v) => Response::Sessions(v.into_iter().map(session).collect()),
        Response::SessionsPage(mut p) => {
            p.sessions = p.sessions.into_iter().map(session).collect();
            Response::SessionsPage(p)
        }
        Response::Task(mut d) => {
            d.info = task(d.info);
            Response::Task(d)
        }
        Response::Tasks(mut p) => {
            p.tasks = p.tasks.into_iter().map(task).collect();
            Response::Tasks(p)
        }
        Response::Status(mut s) => {
            s.storage = s.storage.map(error);
            Response::Status(s)
        }
        Response::Wake(WakeOutcome::Activated { app_id }) => Response::Wake(WakeOutcome::UnitStarted { unit: app_id }),
        Response::BandwidthLimits(_)
        | Response::Conditions(_)
        | Response::SessionPolicy(_)
        | Response::TaskPolicy(_)
        | Response::SessionCookies(_)
        | Response::SessionProxy(_) => Response::Ok,
        other => other,
    }
}

fn event(e: Event) -> Event {
    match e {
        Event::Durable { identifier, seq, event } => {
            let event = match event {
                DurableEvent::Completed { task, error: e } => DurableEvent::Completed { task, error: e.map(error) },
                DurableEvent::DidBecomeInvalid { error: e } => DurableEvent::DidBecomeInvalid { error: e.map(error) },
                other => other,
            };
            Event::Durable { identifier, seq, event }
        }
        Event::TaskUpdate(t) => Event::TaskUpdate(task(t)),
        other => other,
    }
}
