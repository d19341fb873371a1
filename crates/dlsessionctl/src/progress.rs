//! Live progress for `get --wait` and `watch`: indicatif bars on stderr when it is a
//! terminal; otherwise no escape codes at all, only plain lines.

use dlsession_proto::redact;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

use dlsession_proto::{TaskId, TaskInfo, TaskState};

use crate::output;

/// At most this many bars at once; further tasks are summed up in one line.
const MAX_BARS: usize = 20;
/// Plain progress lines per task at most this often.
const PLAIN_INTERVAL: Duration = Duration::from_secs(2);

/// A bar for a task of known size: `⠙ task 7     a.iso   [====>     ] 1.2 MiB / 3.0 MiB 1.9 MiB/s ETA 1 s`.
const KNOWN: &str = "{spinner} {prefix} [{bar:30}] {dl_size} / {dl_total} {dl_speed} ETA {dl_eta} {msg}";
/// Without a size: no bar, no ETA.
const UNKNOWN: &str = "{spinner} {prefix} {dl_size} {dl_speed} {msg}";

struct Bar {
    bar: ProgressBar,
    has_length: bool,
}

/// Where progress goes.
pub struct Progress {
    multi: Option<MultiProgress>,
    bars: HashMap<TaskId, Bar>,
    /// Active tasks without a bar (over [`MAX_BARS`]).
    hidden: HashSet<TaskId>,
    summary: Option<ProgressBar>,
    /// Print throttled plain progress lines (for `watch` without a terminal).
    plain_progress: bool,
    last_plain: HashMap<TaskId, Instant>,
    names: HashMap<TaskId, String>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress").field("bars", &self.bars.len()).finish_non_exhaustive()
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .map(|s| {
            s.progress_chars("=> ")
                .with_key("dl_size", |st: &ProgressState, w: &mut dyn fmt::Write| {
                    let _ = w.write_str(&output::size(st.pos()));
                })
                .with_key("dl_total", |st: &ProgressState, w: &mut dyn fmt::Write| {
                    let _ = w.write_str(&st.len().map_or_else(|| "?".into(), output::size));
                })
                .with_key("dl_speed", |st: &ProgressState, w: &mut dyn fmt::Write| {
                    let _ = w.write_str(&output::speed(bytes_per_sec(st)));
                })
                .with_key("dl_eta", |st: &ProgressState, w: &mut dyn fmt::Write| {
                    let eta = output::eta(st.pos(), st.len(), bytes_per_sec(st));
                    let _ = w.write_str(eta.as_deref().unwrap_or("-"));
                })
        })
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// The bar's estimate of the current speed (0 until it has seen bytes move).
fn bytes_per_sec(state: &ProgressState) -> u64 {
    let rate = state.per_sec();
    // Saturating float-to-int conversion; NaN becomes 0.
    if rate.is_finite() && rate > 0.0 { rate as u64 } else { 0 }
}

/// Whether bars can be drawn: stderr is a terminal (and not a dumb one).
pub fn terminal() -> bool {
    std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

impl Progress {
    /// Bars on stderr if `bars`; else nothing but the lines callers print, plus throttled
    /// progress lines if `plain_progress`.
    pub fn new(bars: bool, plain_progress: bool) -> Progress {
        Progress {
            multi: bars.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            bars: HashMap::new(),
            hidden: HashSet::new(),
            summary: None,
            plain_progress: plain_progress && !bars,
            last_plain: HashMap::new(),
            names: HashMap::new(),
        }
    }

    fn prefix(&self, id: TaskId) -> String {
        let name = self.names.get(&id).map(String::as_str).unwrap_or("");
        format!("task {id:<5} {:<24}", output::truncate_middle(name, 24))
    }

    /// A task's state or counters changed.
    pub fn update(&mut self, info: &TaskInfo) {
        self.names
            .entry(info.id)
            .or_insert_with(|| output::file_name_from_url(&info.url).unwrap_or_else(|| redact::url(&info.url)));
        if self.multi.is_none() {
            return;
        }
        if !info.state.is_active() {
            self.remove(info.id);
            return;
        }
        let message = match (&info.wait, info.state) {
            (_, TaskState::Running) => String::new(),
            (Some(w), _) => output::wait_short(w, output::now_ms()),
            (None, s) => s.as_str().to_owned(),
        };
        if let Some(bar) = self.bar(info.id) {
            set_counters(bar, info.bytes_received, info.bytes_expected);
            bar.bar.set_message(message);
        }
        self.refresh_summary();
    }

    /// Progress of a task (from `Event::Progress`).
    pub fn progress(&mut self, task: TaskId, written: u64, expected: Option<u64>) {
        if self.multi.is_some() {
            if let Some(bar) = self.bar(task) {
                set_counters(bar, written, expected);
                bar.bar.set_message("");
            }
            return;
        }
        if self.plain_progress {
            let now = Instant::now();
            if self.last_plain.get(&task).is_some_and(|at| now.duration_since(*at) < PLAIN_INTERVAL) {
                return;
            }
            self.last_plain.insert(task, now);
            let name = self.names.get(&task).cloned().unwrap_or_default();
            let _ = self.out(&format!("task {task} {name}: {}", output::progress(written, expected)));
        }
    }

    /// The bar of a task, created if there is room.
    fn bar(&mut self, task: TaskId) -> Option<&mut Bar> {
        let multi = self.multi.as_ref()?;
        if !self.bars.contains_key(&task) {
            if self.bars.len() >= MAX_BARS {
                self.hidden.insert(task);
                return None;
            }
            self.hidden.remove(&task);
            let bar = ProgressBar::no_length().with_style(style(UNKNOWN)).with_prefix(self.prefix(task));
            let bar = match &self.summary {
                Some(summary) => multi.insert_before(summary, bar),
                None => multi.add(bar),
            };
            self.bars.insert(task, Bar { bar, has_length: false });
        }
        self.bars.get_mut(&task)
    }

    fn refresh_summary(&mut self) {
        let Some(multi) = &self.multi else { return };
        match (self.hidden.len(), &self.summary) {
            (0, Some(summary)) => {
                summary.finish_and_clear();
                multi.remove(summary);
                self.summary = None;
            }
            (0, None) => {}
            (n, Some(summary)) => summary.set_message(format!("… and {n} more active tasks")),
            (n, None) => {
                let s = ProgressBar::no_length()
                    .with_style(style("{msg}"))
                    .with_message(format!("… and {n} more active tasks"));
                self.summary = Some(multi.add(s));
            }
        }
    }

    /// The task is no longer active: its bar goes away.
    pub fn remove(&mut self, task: TaskId) {
        self.hidden.remove(&task);
        self.last_plain.remove(&task);
        if let (Some(multi), Some(bar)) = (&self.multi, self.bars.remove(&task)) {
            bar.bar.finish_and_clear();
            multi.remove(&bar.bar);
        }
        self.refresh_summary();
    }

    /// Prints a line on stdout (above the bars).
    pub fn out(&self, line: &str) -> std::io::Result<()> {
        self.print(line, false)
    }

    /// Writes bytes as they are on stdout (an upload's response body), above the bars.
    pub fn out_bytes(&self, bytes: &[u8]) -> std::io::Result<()> {
        let write = || {
            let mut out = std::io::stdout().lock();
            out.write_all(bytes)?;
            out.flush()
        };
        match &self.multi {
            Some(multi) => multi.suspend(write),
            None => write(),
        }
    }

    /// Prints a line on stderr (above the bars).
    pub fn err(&self, line: &str) {
        let _ = print(self.multi.as_ref(), line, true);
    }

    /// Where others (a task of their own) print notes above the bars.
    pub fn notes(&self) -> Notes {
        Notes(self.multi.clone())
    }

    fn print(&self, line: &str, stderr: bool) -> std::io::Result<()> {
        print(self.multi.as_ref(), line, stderr)
    }

    /// Removes every bar (before exiting).
    pub fn clear(&mut self) {
        let tasks: Vec<TaskId> = self.bars.keys().copied().collect();
        for t in tasks {
            self.remove(t);
        }
        if let (Some(multi), Some(summary)) = (&self.multi, self.summary.take()) {
            summary.finish_and_clear();
            multi.remove(&summary);
        }
    }
}

fn set_counters(bar: &mut Bar, position: u64, length: Option<u64>) {
    match length {
        Some(len) => {
            if !bar.has_length {
                bar.bar.set_style(style(KNOWN));
                bar.has_length = true;
            }
            bar.bar.set_length(len);
        }
        None => {
            if bar.has_length {
                bar.bar.set_style(style(UNKNOWN));
                bar.bar.unset_length();
                bar.has_length = false;
            }
        }
    }
    let first = bar.bar.position() == 0 && position > 0;
    bar.bar.set_position(position);
    if first {
        // Bytes from before we started watching are not this second's speed.
        bar.bar.reset_eta();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_valid() {
        for t in [KNOWN, UNKNOWN] {
            assert!(ProgressStyle::with_template(t).is_ok(), "{t}");
        }
    }

    /// A terminal that keeps everything written to it.
    #[derive(Debug, Clone, Default)]
    struct Screen(std::sync::Arc<std::sync::Mutex<String>>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(s)
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bars_use_the_tables_units() {
        let screen = Screen::default();
        let drawn = |position: u64, length: Option<u64>| {
            screen.0.lock().unwrap().clear();
            let target = ProgressDrawTarget::term_like(Box::new(screen.clone()));
            let bar = ProgressBar::with_draw_target(None, target).with_style(style(UNKNOWN)).with_prefix("task 7");
            // As for a task already under way when watched.
            let mut bar = Bar { bar, has_length: false };
            set_counters(&mut bar, position, length);
            bar.bar.tick();
            screen.0.lock().unwrap().clone()
        };
        let text = drawn(3 << 19, Some(3 << 20));
        assert!(text.contains("task 7 [===============>"), "{text:?}");
        // Nothing measured yet: no speed and no ETA rather than "0 B/s ETA 0s" or a huge speed.
        assert!(text.contains("] 1.5 MiB / 3.0 MiB - ETA -"), "{text:?}");
        let text = drawn(2048, None);
        assert!(text.contains("task 7 2.0 KiB -"), "{text:?}");
    }
}

/// Prints notes on stderr above a [`Progress`]'s bars, from anywhere.
#[derive(Debug, Clone, Default)]
pub struct Notes(Option<MultiProgress>);

impl Notes {
    pub fn err(&self, line: &str) {
        let _ = print(self.0.as_ref(), line, true);
    }
}

/// Prints a line (on stderr or stdout) above `multi`'s bars, if there are any.
fn print(multi: Option<&MultiProgress>, line: &str, stderr: bool) -> std::io::Result<()> {
    let write = || {
        if stderr {
            writeln!(std::io::stderr().lock(), "{line}")
        } else {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}")?;
            out.flush()
        }
    };
    match multi {
        Some(multi) => multi.suspend(write),
        None => write(),
    }
}
