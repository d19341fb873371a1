//! `dlsessionctl invalidate SESSION [--cancel]`: have a session removed (an app that is
//! gone for good, or an identifier made by a typo in `attach`).

use std::io::Write;

use dlsession_proto::{ErrorCode, Request, Response, SessionInfo};

use crate::cli::InvalidateArgs;
use crate::commands::ctx::Ctx;
use crate::error::{CliError, Exit, Result};
use crate::json::{self, RemovedJson, SessionJson};

pub async fn run(ctx: &Ctx, args: InvalidateArgs) -> Result<Exit> {
    let client = ctx.connect().await?;
    let identifier = args.session.clone();
    let request = if args.cancel {
        Request::InvalidateAndCancel { identifier: identifier.clone() }
    } else {
        Request::FinishTasksAndInvalidate { identifier: identifier.clone() }
    };
    // Asking again for what is done already is no failure: the state is shown all the same.
    let already = match client.request(request).await {
        Ok(Response::Ok) => false,
        Ok(other) => return Err(CliError::unexpected("invalidate", &other)),
        Err(dlsession::Error::Daemon(e)) if e.code == ErrorCode::SessionInvalidated => true,
        Err(e) => return Err(e.into()),
    };
    let info = match client.request(Request::GetSession { identifier: identifier.clone() }).await {
        Ok(Response::Session(info)) => info,
        Ok(other) => return Err(CliError::unexpected("session", &other)),
        // Its attached app collected the last events in the meantime: the daemon removed it.
        Err(dlsession::Error::Daemon(e)) if e.code == ErrorCode::NoSuchSession => {
            if ctx.json {
                json::print(&RemovedJson { identifier: &identifier, removed: true })?;
            } else {
                writeln!(std::io::stdout().lock(), "{identifier}: removed (its app collected its last events)")?;
            }
            return Ok(Exit::Success);
        }
        Err(e) => return Err(e.into()),
    };
    if ctx.json {
        json::print(&SessionJson::from(&info))?;
    } else {
        writeln!(std::io::stdout().lock(), "{}", state_line(&info, already, args.cancel))?;
    }
    Ok(Exit::Success)
}

/// Where the session stands after the request, and what removes it.
fn state_line(info: &SessionInfo, already: bool, cancel: bool) -> String {
    let id = &info.identifier;
    let unfinished = info.tasks.total().saturating_sub(info.tasks.completed);
    let collect = if info.attached {
        "its attached app collects its events, then the daemon removes it".to_owned()
    } else {
        format!(
            "`dlsessionctl attach {id}` collects its events (add --move-to DIR to keep files left in the cache), then the daemon removes it"
        )
    };
    if unfinished == 0 {
        let was = if already { "was already invalid" } else { "is invalid" };
        return format!("{id}: {was}: {collect}");
    }
    let mut held = format!("{unfinished} unfinished task{}", if unfinished == 1 { "" } else { "s" });
    if cancel {
        held.push_str(" still stopping (cancelled)");
    } else if info.tasks.suspended > 0 {
        held.push_str(&format!(
            " ({} suspended: resume or cancel them, or invalidate with --cancel)",
            info.tasks.suspended
        ));
    }
    format!("{id}: invalidating, takes no new task; {held}; once they complete, {collect}")
}
