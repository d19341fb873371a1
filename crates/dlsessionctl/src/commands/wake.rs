//! `dlsessionctl wake SESSION`

use std::io::Write;

use dlsession_proto::{Request, Response, WakeOutcome};

use crate::cli::WakeArgs;
use crate::commands::ctx::Ctx;
use crate::error::{CliError, Exit, Result};
use crate::json::{self, WakeJson};

pub async fn run(ctx: &Ctx, args: WakeArgs) -> Result<Exit> {
    let client = ctx.connect().await?;
    let outcome = match client.request(Request::Wake { identifier: args.session.clone() }).await? {
        Response::Wake(o) => o,
        other => return Err(CliError::unexpected("wake", &other)),
    };
    if ctx.json {
        let mut j =
            WakeJson { session: &args.session, outcome: "", pid: None, connections: None, unit: None, app_id: None };
        match &outcome {
            WakeOutcome::Attached => j.outcome = "attached",
            WakeOutcome::Woken { connections } => {
                j.outcome = "woken";
                j.connections = Some(*connections);
            }
            WakeOutcome::Launched { pid } => {
                j.outcome = "launched";
                j.pid = Some(*pid);
            }
            WakeOutcome::UnitStarted { unit } => {
                j.outcome = "unit_started";
                j.unit = Some(unit.clone());
            }
            WakeOutcome::NoTarget => j.outcome = "no_target",
            WakeOutcome::Activated { app_id } => {
                j.outcome = "activated";
                j.app_id = Some(app_id.clone());
            }
        }
        json::print(&j)?;
        return Ok(Exit::Success);
    }
    let text = match outcome {
        WakeOutcome::Attached => "attached: events are delivered live".to_owned(),
        WakeOutcome::Woken { connections: 1 } => "woke 1 connection".to_owned(),
        WakeOutcome::Woken { connections } => format!("woke {connections} connections"),
        WakeOutcome::Launched { pid } => format!("relaunched the app (pid {pid})"),
        WakeOutcome::UnitStarted { unit } => format!("started unit {unit}"),
        WakeOutcome::Activated { app_id } => format!("activated desktop application {app_id} over D-Bus"),
        WakeOutcome::NoTarget => {
            "nothing to wake: no process announced the session's app_id and it has no launch command".to_owned()
        }
    };
    writeln!(std::io::stdout().lock(), "{}: {text}", args.session)?;
    Ok(Exit::Success)
}
