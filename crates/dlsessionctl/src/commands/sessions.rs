//! `dlsessionctl sessions`

use std::io::{IsTerminal, Write};

use comfy_table::{Cell, CellAlignment, Color, ContentArrangement, Table, presets};
use dlsession_proto::SessionInfo;

use crate::commands::ctx::Ctx;
use crate::error::{Exit, Result};
use crate::json::{self, SessionJson};
use crate::output;

pub async fn run(ctx: &Ctx) -> Result<Exit> {
    let client = ctx.connect().await?;
    // In identifier order, a page at a time.
    let sessions = client.list_sessions().await?;
    if ctx.json {
        let list: Vec<SessionJson> = sessions.iter().map(SessionJson::from).collect();
        json::print(&list)?;
        return Ok(Exit::Success);
    }
    let mut out = std::io::stdout().lock();
    if sessions.is_empty() {
        writeln!(out, "no sessions")?;
        return Ok(Exit::Success);
    }
    writeln!(out, "{}", table(&sessions, output::now_ms(), output::color_stdout()))?;
    Ok(Exit::Success)
}

/// When the app is woken next, in words.
fn next_wake(s: &SessionInfo, now: u64) -> String {
    if s.attached {
        return "- (attached)".into();
    }
    let mut text = match s.wake.next_wake {
        Some(at) => format!("{} (attempt {})", output::relative(at, now), s.wake.attempts.saturating_add(1)),
        None => "-".into(),
    };
    if let Some(e) = &s.wake.last_error {
        text.push_str(&format!("; last failed: {}", output::error(e)));
    }
    text
}

fn table(sessions: &[SessionInfo], now: u64, color: bool) -> Table {
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED).set_content_arrangement(ContentArrangement::Dynamic);
    // Without a terminal: no width to fit and no styling at all. On a terminal the table
    // fits its width; colour only if `color` (NO_COLOR unset).
    if !std::io::stdout().is_terminal() {
        table.force_no_tty();
    }
    table.set_header(["SESSION", "APP ID", "ATTACHED", "TASKS", "PENDING EVENTS", "NEXT WAKE"]);
    for s in sessions {
        let mut id = s.identifier.clone();
        if s.invalidating {
            id.push_str(" (invalidating)");
        }
        let attached = match (s.attached, color) {
            (true, true) => Cell::new("yes").fg(Color::Green),
            (true, false) => Cell::new("yes"),
            (false, _) => Cell::new("no"),
        };
        table.add_row([
            Cell::new(id),
            Cell::new(s.config.app_id.as_deref().unwrap_or("-")),
            attached,
            Cell::new(output::task_counts(&s.tasks)),
            Cell::new(s.pending_events).set_alignment(CellAlignment::Right),
            Cell::new(next_wake(s, now)),
        ]);
    }
    table
}
