//! `dlsessionctl tasks [--session ID] [--state STATE]`
//!
//! Pages through the daemon's task list and prints each page as it arrives, so a daemon
//! with many tasks never needs one huge response or one huge table in memory.

use dlsession_proto::redact;
use std::io::Write;

use dlsession_proto::{Request, Response, TaskInfo, TaskQuery, TaskState};

use crate::cli::TasksArgs;
use crate::commands::ctx::Ctx;
use crate::error::{CliError, Exit, Result};
use crate::json::TaskJson;
use crate::output;

/// Tasks asked for per request.
const PAGE: u32 = 1000;
/// URLs longer than this are shortened in the table (`show` prints them in full).
const URL_WIDTH: usize = 60;

const HEADER: [&str; 8] = ["ID", "SESSION", "STATE", "PROGRESS", "SPEED", "ETA", "URL", "WHY"];

pub async fn run(ctx: &Ctx, args: TasksArgs) -> Result<Exit> {
    let client = ctx.connect().await?;
    let mut query = TaskQuery {
        session: args.session,
        states: args.state.map(TaskState::from).into_iter().collect(),
        after: None,
        limit: PAGE,
    };
    let mut sink: Box<dyn Sink> = if ctx.json { Box::new(JsonSink::default()) } else { Box::new(TableSink::new()) };
    loop {
        let page = match client.request(Request::ListTasks(query.clone())).await {
            Ok(Response::Tasks(page)) => page,
            // What was printed stays a whole document (a JSON array closed); stderr and the
            // exit code say the list is cut short.
            Ok(other) => return Err(sink.cut_short(CliError::unexpected("tasks", &other))),
            Err(e) => return Err(sink.cut_short(e.into())),
        };
        sink.page(&page.tasks)?;
        match page.next_after {
            // A cursor that does not advance would loop forever.
            Some(next) if query.after.is_none_or(|prev| next > prev) => query.after = Some(next),
            _ => break,
        }
    }
    sink.finish()?;
    Ok(Exit::Success)
}

trait Sink {
    fn page(&mut self, tasks: &[TaskInfo]) -> Result<()>;
    fn finish(&mut self) -> Result<()>;
    /// The list ends early with `error`: what was printed is closed as a document.
    fn cut_short(&mut self, error: CliError) -> CliError {
        error
    }
}

/// A JSON array written element by element.
#[derive(Default)]
struct JsonSink {
    started: bool,
}

impl Sink for JsonSink {
    fn page(&mut self, tasks: &[TaskInfo]) -> Result<()> {
        let mut out = std::io::stdout().lock();
        for t in tasks {
            out.write_all(if self.started { b",\n" } else { b"[\n" })?;
            self.started = true;
            serde_json::to_writer(&mut out, &TaskJson::from(t)).map_err(std::io::Error::from)?;
        }
        out.flush()?;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(if self.started { b"\n]\n" } else { b"[]\n" })?;
        out.flush()?;
        Ok(())
    }

    /// An array begun is closed; before any element, stdout stays empty (a failure before
    /// anything was listed is not an empty list).
    fn cut_short(&mut self, error: CliError) -> CliError {
        if !self.started {
            return error;
        }
        match self.finish() {
            Ok(()) => error,
            Err(write) => write,
        }
    }
}

/// Aligned columns; widths come from the first page and only grow afterwards.
struct TableSink {
    widths: [usize; 8],
    header_done: bool,
    rows: u64,
    color: bool,
    now: u64,
}

struct Row {
    cells: [String; 8],
    state: TaskState,
    failed: bool,
}

impl TableSink {
    fn new() -> TableSink {
        TableSink {
            widths: HEADER.map(|h| h.len()),
            header_done: false,
            rows: 0,
            color: output::color_stdout(),
            now: output::now_ms(),
        }
    }
}

fn row(t: &TaskInfo, now: u64) -> Row {
    let running = t.state == TaskState::Running;
    // An upload shows its body going out (marked "up"), a download its file coming in.
    let (done, total, mark) = match &t.upload {
        Some(u) => (u.bytes_sent, Some(u.bytes_total), "up "),
        None => (t.bytes_received, t.bytes_expected, ""),
    };
    let eta = if running { output::eta(done, total, t.speed) } else { None };
    let why = match (&t.wait, &t.error) {
        (_, Some(e)) => output::error(e),
        (Some(w), None) if !running => output::wait_short(w, now),
        _ => String::new(),
    };
    Row {
        cells: [
            t.id.to_string(),
            t.session.clone(),
            t.state.as_str().to_owned(),
            format!("{mark}{}", output::progress(done, total)),
            if running { output::speed(t.speed) } else { "-".into() },
            eta.unwrap_or_else(|| "-".into()),
            output::truncate_middle(&redact::url(&t.url), URL_WIDTH),
            why,
        ],
        state: t.state,
        failed: t.error.is_some(),
    }
}

impl Sink for TableSink {
    fn page(&mut self, tasks: &[TaskInfo]) -> Result<()> {
        let rows: Vec<Row> = tasks.iter().map(|t| row(t, self.now)).collect();
        for r in &rows {
            for (w, c) in self.widths.iter_mut().zip(&r.cells) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = std::io::stdout().lock();
        if !self.header_done && !rows.is_empty() {
            writeln!(out, "{}", self.line(&HEADER.map(str::to_owned), None))?;
            self.header_done = true;
        }
        for r in &rows {
            writeln!(out, "{}", self.line(&r.cells, Some((r.state, r.failed))))?;
        }
        self.rows += rows.len() as u64;
        out.flush()?;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if self.rows == 0 {
            writeln!(std::io::stdout().lock(), "no tasks")?;
        }
        Ok(())
    }
}

impl TableSink {
    fn line(&self, cells: &[String; 8], state: Option<(TaskState, bool)>) -> String {
        let mut line = String::new();
        let last = cells.len() - 1;
        for (i, (cell, width)) in cells.iter().zip(self.widths).enumerate() {
            let pad = width.saturating_sub(cell.chars().count());
            let text = match i {
                // Numbers right-aligned.
                0 | 4 | 5 => format!("{}{cell}", " ".repeat(pad)),
                _ if i == last => cell.clone(),
                _ => format!("{cell}{}", " ".repeat(pad)),
            };
            match (i, state) {
                (2, Some((s, failed))) => line.push_str(&output::paint_state(&text, s, failed, self.color)),
                _ => line.push_str(&text),
            }
            if i != last {
                line.push_str("  ");
            }
        }
        line.trim_end().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlsession_proto::{ErrorCode, ErrorInfo, WaitReason};

    fn task(id: u64, state: TaskState) -> TaskInfo {
        TaskInfo {
            id,
            session: "org.example".into(),
            state,
            url: "https://user:pw@example.org/files/a.bin?sig=abc".into(),
            description: None,
            priority: 0.5,
            bytes_received: 12 << 20,
            bytes_expected: Some(100 << 20),
            speed: 1 << 20,
            location: None,
            error: None,
            created_at: 0,
            wait: None,
            upload: None,
        }
    }

    #[test]
    fn rows() {
        let r = row(&task(7, TaskState::Running), 0);
        assert_eq!(r.cells[0], "7");
        assert_eq!(r.cells[3], "12% 12.0 MiB / 100.0 MiB");
        assert_eq!(r.cells[4], "1.0 MiB/s");
        assert_eq!(r.cells[5], "1 min 28 s");
        assert_eq!(r.cells[6], "https://example.org/files/a.bin?sig=REDACTED");
        assert_eq!(r.cells[7], "");

        let mut up = task(10, TaskState::Running);
        up.upload = Some(dlsession_proto::UploadInfo {
            method: dlsession_proto::UploadMethod::Put,
            file: "/home/u/a.bin".into(),
            bytes_total: 100 << 20,
            bytes_sent: 50 << 20,
            idempotent: false,
            resumable: true,
        });
        assert_eq!(row(&up, 0).cells[3], "up 50% 50.0 MiB / 100.0 MiB");

        let mut w = task(8, TaskState::Queued);
        w.wait = Some(WaitReason::GlobalLimit { limit: 16 });
        let r = row(&w, 0);
        assert_eq!(r.cells[4], "-");
        assert_eq!(r.cells[7], "global limit (16)");

        let mut f = task(9, TaskState::Completed);
        f.error = Some(ErrorInfo::http(404, "server answered 404 Not Found"));
        assert_eq!(row(&f, 0).cells[7], "http_status: server answered 404 Not Found");
        f.error = Some(ErrorInfo::new(ErrorCode::Cancelled, "cancelled"));
        assert_eq!(row(&f, 0).cells[7], "cancelled: cancelled");
    }

    #[test]
    fn lines_are_aligned() {
        let mut sink = TableSink::new();
        sink.color = false;
        let rows = [row(&task(7, TaskState::Running), 0), row(&task(1234, TaskState::Suspended), 0)];
        for r in &rows {
            for (w, c) in sink.widths.iter_mut().zip(&r.cells) {
                *w = (*w).max(c.chars().count());
            }
        }
        let header = sink.line(&HEADER.map(str::to_owned), None);
        let first = sink.line(&rows[0].cells, Some((rows[0].state, false)));
        assert_eq!(header.find("SESSION"), first.find("org.example"));
        assert!(first.starts_with("   7  "), "{first:?}");
    }
}
