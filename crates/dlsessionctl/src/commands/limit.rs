//! `dlsessionctl limit [--global | --session ID | --task ID] [RATE|off]`

use std::collections::BTreeMap;
use std::io::Write;

use bytesize::ByteSize;
use dlsession_proto::{BandwidthLimits, LimitTarget, Request, Response};
use serde::Serialize;

use crate::cli::LimitArgs;
use crate::commands::ctx::{Ctx, request_ok};
use crate::error::{CliError, Exit, Result};
use crate::json;
use crate::output;

pub async fn run(ctx: &Ctx, args: LimitArgs) -> Result<Exit> {
    let target = match (&args.session, args.task, args.global) {
        (Some(identifier), _, _) => Some(LimitTarget::Session { identifier: identifier.clone() }),
        (_, Some(task), _) => Some(LimitTarget::Task { task }),
        (_, _, true) => Some(LimitTarget::Global),
        _ => None,
    };
    let rate = args.rate.as_deref().map(parse_rate).transpose()?;
    // A usage error whether the daemon runs or not.
    if target.is_none() && rate.is_some() {
        return Err(CliError::usage("say which limit to set: --global, --session ID or --task ID"));
    }
    let client = ctx.connect().await?;
    let (Some(target), Some(rate)) = (target.clone(), rate) else {
        // A session or task that does not exist has no limit to show: `no_such_*`, as when
        // setting one (it read "none", exit 0).
        match &target {
            Some(LimitTarget::Session { identifier }) => {
                client.request(Request::GetSession { identifier: identifier.clone() }).await?;
            }
            Some(LimitTarget::Task { task }) => {
                // A retired task (still in the history) has no limit either: as when setting.
                if let Response::Task(t) = client.request(Request::GetTask { task: *task }).await?
                    && t.retired
                {
                    return Err(CliError::local(
                        dlsession_proto::ErrorCode::NoSuchTask,
                        format!("no live task {task} (it is in the history only)"),
                    ));
                }
            }
            Some(LimitTarget::Global) | None => {}
        }
        let limits = match client.request(Request::GetBandwidthLimits).await? {
            Response::BandwidthLimits(l) => l,
            other => return Err(CliError::unexpected("bandwidth_limits", &other)),
        };
        show(ctx, &limits, target.as_ref())?;
        return Ok(Exit::Success);
    };
    request_ok(&client, Request::SetBandwidthLimit { target: target.clone(), bytes_per_second: rate }).await?;
    let what = describe(&target);
    if ctx.json {
        json::print(&SetJson { limit: &what, bytes_per_second: rate, ok: true })?;
    } else {
        let value = rate.map_or_else(|| "none".to_owned(), |r| format!("{}/s", output::size(r)));
        writeln!(std::io::stdout().lock(), "{what} limit: {value} (running downloads follow at once)")?;
    }
    Ok(Exit::Success)
}

/// `2MiB`, `500k`, `1.5 MB` (per second), a plain number of bytes, or `off`/`none`.
fn parse_rate(text: &str) -> Result<Option<u64>> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let t = t.strip_suffix("/s").unwrap_or(t);
    let bytes = t
        .parse::<ByteSize>()
        .map_err(|e| CliError::usage(format!("RATE {text:?}: {e} (e.g. 500k, 2MiB, or off)")))?
        .as_u64();
    let min = dlsession_proto::validate::MIN_BANDWIDTH_LIMIT;
    if bytes < min {
        return Err(CliError::usage(format!("RATE {text:?} is below the lowest limit, {min} bytes per second")));
    }
    Ok(Some(bytes))
}

fn describe(target: &LimitTarget) -> String {
    match target {
        LimitTarget::Global => "daemon-wide".to_owned(),
        LimitTarget::Session { identifier } => format!("session {identifier}"),
        LimitTarget::Task { task } => format!("task {task}"),
    }
}

#[derive(Serialize)]
struct SetJson<'a> {
    limit: &'a str,
    bytes_per_second: Option<u64>,
    ok: bool,
}

#[derive(Serialize)]
struct LimitsJson {
    global: Option<u64>,
    sessions: BTreeMap<String, u64>,
    tasks: BTreeMap<String, u64>,
}

fn show(ctx: &Ctx, limits: &BandwidthLimits, only: Option<&LimitTarget>) -> Result<()> {
    let keep_session = |id: &str| match only {
        None => true,
        Some(LimitTarget::Session { identifier }) => identifier == id,
        Some(_) => false,
    };
    let keep_task = |task: u64| match only {
        None => true,
        Some(LimitTarget::Task { task: t }) => *t == task,
        Some(_) => false,
    };
    let show_global = matches!(only, None | Some(LimitTarget::Global));
    if ctx.json {
        return json::print(&LimitsJson {
            global: limits.global.filter(|_| show_global),
            sessions: limits.sessions.iter().filter(|(id, _)| keep_session(id)).cloned().collect(),
            tasks: limits.tasks.iter().filter(|(t, _)| keep_task(*t)).map(|(t, r)| (t.to_string(), *r)).collect(),
        });
    }
    let per_second = |r: u64| format!("{}/s", output::size(r));
    let mut out = std::io::stdout().lock();
    if show_global {
        writeln!(out, "daemon-wide: {}", limits.global.map_or_else(|| "none".to_owned(), per_second))?;
    }
    for (identifier, rate) in limits.sessions.iter().filter(|(id, _)| keep_session(id)) {
        writeln!(out, "session {identifier}: {}", per_second(*rate))?;
    }
    for (task, rate) in limits.tasks.iter().filter(|(t, _)| keep_task(*t)) {
        writeln!(out, "task {task}: {}", per_second(*rate))?;
    }
    if !show_global && only.is_some() && limits.sessions.iter().all(|(id, _)| !keep_session(id)) {
        let none = limits.tasks.iter().all(|(t, _)| !keep_task(*t));
        if none {
            writeln!(out, "{}: none", only.map(describe).unwrap_or_default())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates_with_units_and_off() {
        assert_eq!(parse_rate("2MiB").unwrap(), Some(2 << 20));
        assert_eq!(parse_rate("500k").unwrap(), Some(500_000));
        assert_eq!(parse_rate("1.5 MB/s").unwrap(), Some(1_500_000));
        assert_eq!(parse_rate("4096").unwrap(), Some(4096));
        assert_eq!(parse_rate("off").unwrap(), None);
        assert!(parse_rate("12").is_err(), "below the lowest limit");
        assert!(parse_rate("fast").is_err());
    }
}
