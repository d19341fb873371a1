//! `dlsessionctl status`

use std::io::Write;

use dlsession_proto::{Request, Response};

use crate::commands::ctx::Ctx;
use crate::error::{CliError, Exit, Result};
use crate::json::{self, StatusJson};
use crate::output;

pub async fn run(ctx: &Ctx) -> Result<Exit> {
    let client = ctx.connect().await?;
    let status = match client.request(Request::Status).await? {
        Response::Status(s) => s,
        other => return Err(CliError::unexpected("status", &other)),
    };
    // An older daemon cannot say: then the network and power are unknown, not an error.
    let conditions = match client.request(Request::GetConditions).await {
        Ok(Response::Conditions(c)) => c,
        _ => dlsession_proto::Conditions {
            online: true,
            network_source: "unknown (the daemon does not say)".into(),
            power_source: "unknown (the daemon does not say)".into(),
            ..Default::default()
        },
    };
    if ctx.json {
        json::print(&StatusJson::new(&status, &conditions))?;
        return Ok(Exit::Success);
    }
    let t = &status.tasks;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "dlsessiond {} (protocol {}), pid {}, up {} (since {})",
        status.daemon_version,
        status.protocol_version,
        status.pid,
        output::duration_ms(status.uptime_ms),
        output::timestamp_zoned(status.started_at),
    )?;
    writeln!(out, "socket:       {}", status.socket)?;
    writeln!(out, "state dir:    {}", status.state_dir)?;
    writeln!(out, "cache dir:    {}", status.cache_dir)?;
    writeln!(out, "database:     {}", status.database)?;
    if let Some(e) = &status.storage {
        writeln!(out, "storage:      FAILING: {} (downloads held, changes refused until it works)", output::error(e))?;
    }
    writeln!(out, "tasks:        {} ({} total)", output::task_counts(t), t.total())?;
    writeln!(out, "sessions:     {}", status.sessions)?;
    writeln!(out, "connections:  {}", status.connections)?;
    let c = &conditions;
    writeln!(
        out,
        "network:      {}{} ({})",
        if c.online { "online" } else { "OFFLINE" },
        if c.metered { ", metered" } else { "" },
        c.network_source
    )?;
    let battery = c.battery_percent.map(|p| format!(" ({p} %)")).unwrap_or_default();
    let power = if c.on_battery { format!("on battery{battery}") } else { format!("on AC{battery}") };
    writeln!(out, "power:        {power} ({})", c.power_source)?;
    writeln!(
        out,
        "download:     {} now, {} since start (at most {} downloads at once)",
        output::speed(status.download_rate),
        output::size(status.bytes_downloaded),
        status.max_concurrent_downloads,
    )?;
    Ok(Exit::Success)
}
