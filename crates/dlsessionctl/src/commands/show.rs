//! `dlsessionctl show TASK`

use dlsession_proto::redact;
use std::io::Write;

use dlsession_proto::{ErrorCode, Header, Request, Response, TaskDetail, TaskPolicyInfo, TaskState};

use crate::cli::ShowArgs;
use crate::commands::ctx::Ctx;
use crate::error::{CliError, Exit, Result};
use crate::json::{self, TaskDetailJson};
use crate::output;

pub async fn run(ctx: &Ctx, args: ShowArgs) -> Result<Exit> {
    let client = ctx.connect().await?;
    let detail = match client.request(Request::GetTask { task: args.task }).await? {
        Response::Task(d) => d,
        other => return Err(CliError::unexpected("task", &other)),
    };
    // A live task's own settings: its policy and bandwidth limit.
    let live = if detail.info.state == TaskState::Completed { None } else { live_settings(&client, args.task).await? };
    if ctx.json {
        let mut json = TaskDetailJson::from(&detail);
        if let Some((policy, limit)) = live {
            json.own_policy = Some(policy.own.into());
            json.bandwidth_limit = limit;
        }
        json::print(&json)?;
    } else {
        let mut out = std::io::stdout().lock();
        let mut lines = describe(&detail, output::now_ms());
        if let Some((policy, limit)) = live {
            lines.push(("policy", super::policy::describe(policy.effective)));
            lines.push(("its own policy", super::policy::describe_own(policy.own)));
            lines.push(("bandwidth limit", limit.map_or_else(|| "-".into(), output::speed)));
        }
        for (key, value) in lines {
            writeln!(out, "{:<18} {value}", format!("{key}:"))?;
        }
    }
    Ok(Exit::Success)
}

/// The task's policy and own bandwidth limit; `None` once it is no longer live (it may
/// complete between the two requests).
async fn live_settings(client: &dlsession::Client, task: u64) -> Result<Option<(TaskPolicyInfo, Option<u64>)>> {
    let policy = match client.request(Request::GetTaskPolicy { task }).await {
        Ok(Response::TaskPolicy(p)) => p,
        Ok(other) => return Err(CliError::unexpected("task_policy", &other)),
        Err(e) if e.code() == ErrorCode::NoSuchTask => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let limit = match client.request(Request::GetBandwidthLimits).await? {
        Response::BandwidthLimits(l) => l.tasks.iter().find(|(id, _)| *id == task).map(|(_, rate)| *rate),
        other => return Err(CliError::unexpected("bandwidth_limits", &other)),
    };
    Ok(Some((policy, limit)))
}

fn or_dash(v: Option<impl ToString>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn headers(h: &[Header]) -> String {
    if h.is_empty() {
        return "-".into();
    }
    h.iter().map(|h| format!("{}: {}", h.name, h.display_value())).collect::<Vec<_>>().join("\n                   ")
}

/// The lines of `show`, as (label, value).
fn describe(d: &TaskDetail, now: u64) -> Vec<(&'static str, String)> {
    let t = &d.info;
    let url = redact::url(&t.url);
    let mut lines = vec![
        ("task", t.id.to_string()),
        ("session", t.session.clone()),
        ("state", t.state.to_string()),
        ("url", url.clone()),
    ];
    // A final URL differing only in what redaction hides says nothing new.
    if let Some(f) = d.final_url.as_deref().map(redact::url).filter(|f| *f != url) {
        lines.push(("final url", f));
    }
    lines.push(("description", or_dash(t.description.as_deref())));
    lines.push(("priority", t.priority.to_string()));
    if let Some(u) = &t.upload {
        let idempotent = if u.idempotent { ", idempotent" } else { "" };
        lines.push(("upload", format!("{} of {}{idempotent}", u.method.as_str(), u.file)));
        lines.push(("sent", output::progress(u.bytes_sent, Some(u.bytes_total))));
        let resumable = if u.resumable { "yes (the server offered it)" } else { "no (the server offered none)" };
        lines.push(("resumable upload", resumable.into()));
        lines.push(("response body", output::size(t.bytes_received)));
    } else {
        lines.push(("bytes", output::progress(t.bytes_received, t.bytes_expected)));
    }
    lines.push((
        "committed",
        format!("{} ({} bytes on disk, synced)", output::size(d.committed_offset), d.committed_offset),
    ));
    if t.speed > 0 || t.state == dlsession_proto::TaskState::Running {
        let eta = output::eta(t.bytes_received, t.bytes_expected, t.speed).unwrap_or_else(|| "-".into());
        lines.push(("speed", format!("{} (ETA {eta})", output::speed(t.speed))));
    }
    if let Some(w) = &t.wait {
        lines.push(("why", output::wait_sentence(w, t.id, now)));
    }
    lines.push(("error", t.error.as_ref().map(output::error).unwrap_or_else(|| "-".into())));
    lines.push(("attempts", d.attempts.to_string()));
    if let Some(e) = d.last_error.as_ref().filter(|e| Some(*e) != t.error.as_ref()) {
        lines.push(("last error", output::error(e)));
    }
    // A status that failed the task came with no file: the error's is the one to show.
    let status = t.error.as_ref().and_then(|e| e.http_status).or(d.response_status);
    lines.push(("response status", or_dash(status)));
    lines.push(("response headers", headers(&d.response_headers)));
    lines.push(("request headers", headers(&d.request_headers)));
    lines.push(("etag", or_dash(d.etag.as_deref())));
    lines.push(("last-modified", or_dash(d.last_modified.as_deref())));
    if t.upload.is_none() {
        lines.push(("resumable", if d.resumable { "yes".into() } else { "no (no strong validator)".into() }));
    }
    if let Some(h) = d.expected_sha256 {
        lines.push(("expected sha256", dlsession_proto::validate::to_hex(&h)));
    }
    lines.push(("partial file", or_dash(d.partial_path.as_deref())));
    lines.push(("destination", or_dash(d.destination.as_deref())));
    lines.push(("location", or_dash(t.location.as_deref())));
    lines.push(("created", output::when(t.created_at, now)));
    lines.push(("started", or_dash(d.started_at.map(|at| output::when(at, now)))));
    lines.push(("finished", or_dash(d.finished_at.map(|at| output::when(at, now)))));
    // A completed task's deadline no longer holds anything ("in 6 d" read as a wait).
    let deadline = d.resource_deadline.filter(|_| t.state != dlsession_proto::TaskState::Completed);
    lines.push(("resource deadline", or_dash(deadline.map(|at| output::when(at, now)))));
    lines.push(("retired", if d.retired { "yes (its events were acknowledged)".into() } else { "no".into() }));
    lines
}
