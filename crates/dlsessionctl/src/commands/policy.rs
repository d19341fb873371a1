//! `dlsessionctl policy SESSION [--metered allow|deny] [--battery allow|deny] [--discretionary on|off]`

use std::io::Write;

use dlsession_proto::{Request, Response, SessionPolicy};
use serde::Serialize;

use crate::cli::PolicyArgs;
use crate::commands::ctx::{Ctx, request_ok};
use crate::error::{CliError, Exit, Result};
use crate::json;

pub async fn run(ctx: &Ctx, args: PolicyArgs) -> Result<Exit> {
    let client = ctx.connect().await?;
    let mut policy = match client.request(Request::GetSessionPolicy { identifier: args.session.clone() }).await? {
        Response::SessionPolicy(p) => p,
        other => return Err(CliError::unexpected("session_policy", &other)),
    };
    let before = policy;
    if let Some(m) = &args.metered {
        policy.allows_metered = m == "allow";
    }
    if let Some(b) = &args.battery {
        policy.allows_battery = b == "allow";
    }
    if let Some(d) = &args.discretionary {
        policy.discretionary = d == "on";
    }
    if let Some(w) = &args.wait_for_network {
        policy.waits_for_connectivity = w == "on";
    }
    if let Some(n) = &args.notify {
        policy.notify = n == "on";
    }
    if policy != before {
        let request = Request::SetSessionPolicy { identifier: args.session.clone(), policy };
        request_ok(&client, request).await?;
    }
    if ctx.json {
        json::print(&PolicyJson {
            session: &args.session,
            allows_metered: policy.allows_metered,
            allows_battery: policy.allows_battery,
            discretionary: policy.discretionary,
            waits_for_connectivity: policy.waits_for_connectivity,
            notify: policy.notify,
        })?;
    } else {
        writeln!(std::io::stdout().lock(), "{}: {}", args.session, describe(policy))?;
    }
    Ok(Exit::Success)
}

fn describe(p: SessionPolicy) -> String {
    let allowed = |yes: bool| if yes { "allowed" } else { "not allowed" };
    format!(
        "metered networks {}, battery {}, {}, {}, {}",
        allowed(p.allows_metered),
        allowed(p.allows_battery),
        if p.discretionary { "discretionary (waits for good conditions)" } else { "not discretionary" },
        if p.waits_for_connectivity { "waits for the network" } else { "fails at once without a network" },
        if p.notify { "notifies when done" } else { "no notification" }
    )
}

#[derive(Serialize)]
struct PolicyJson<'a> {
    session: &'a str,
    allows_metered: bool,
    allows_battery: bool,
    discretionary: bool,
    waits_for_connectivity: bool,
    notify: bool,
}
