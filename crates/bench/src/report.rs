//! Result rows, the machine description and the Markdown written to `BENCHMARKS.md`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};

use crate::run;

/// One line of the summary table.
#[derive(Debug, Clone)]
pub struct Row {
    pub workload: String,
    pub metric: String,
    pub ours: String,
    pub peers: String,
    pub ratio: String,
    pub target: String,
    /// `None`: reported only, no target.
    pub met: Option<bool>,
}

impl Row {
    pub fn new(workload: &str, metric: impl Into<String>) -> Row {
        Row {
            workload: workload.to_owned(),
            metric: metric.into(),
            ours: String::new(),
            peers: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
            met: None,
        }
    }

    pub fn ours(mut self, v: impl Into<String>) -> Row {
        self.ours = v.into();
        self
    }

    pub fn peers(mut self, v: impl Into<String>) -> Row {
        self.peers = v.into();
        self
    }

    pub fn ratio(mut self, r: f64) -> Row {
        self.ratio = format!("{r:.2}");
        self
    }

    pub fn target(mut self, t: impl Into<String>, met: bool) -> Row {
        self.target = t.into();
        self.met = Some(met);
        self
    }

    pub fn met_str(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "**MISSED**",
            None => "—",
        }
    }
}

/// What one workload produced.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    /// Markdown: detail tables and notes.
    pub details: String,
}

/// The facts about this machine and run that go at the top of the results.
#[derive(Debug, Clone)]
pub struct Machine {
    pub date: String,
    pub cpu: String,
    pub cores: usize,
    pub memory: String,
    pub kernel: String,
    pub tmp_dir: String,
    pub tmp_fs: String,
    pub commit: String,
    pub tools: Vec<String>,
}

impl Machine {
    pub fn probe(tmp: &Path, repo: &Path) -> Machine {
        let date =
            run::capture("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).map(|s| s.trim().to_owned()).unwrap_or_default();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| format!("{:.1} GiB", kb / (1024.0 * 1024.0)))
            .unwrap_or_else(|| "unknown".into());
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default();
        let tmp_str = tmp.display().to_string();
        let tmp_fs = run::capture("df", &["--output=fstype,source", &tmp_str])
            .ok()
            .and_then(|s| s.lines().nth(1).map(|l| l.split_whitespace().collect::<Vec<_>>().join(" on ")))
            .unwrap_or_else(|| "unknown".into());
        let repo_str = repo.display().to_string();
        let head = run::capture("git", &["-C", &repo_str, "rev-parse", "--short", "HEAD"]).unwrap_or_default();
        // Tracked files changed since HEAD, by top-level path (what the numbers were taken with).
        let changed: std::collections::BTreeSet<String> =
            run::capture("git", &["-C", &repo_str, "status", "--porcelain", "--untracked-files=no"])
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.get(3..))
                .filter_map(|p| p.split('/').next().map(str::to_owned))
                .collect();
        let commit = match head.trim() {
            "" => "unknown".to_owned(),
            h if changed.is_empty() => h.to_owned(),
            h => format!("{h} + uncommitted changes in {}", changed.into_iter().collect::<Vec<_>>().join(", ")),
        };
        let mut tools = Vec::new();
        for (name, args) in
            [("curl", &["--version"][..]), ("wget2", &["--version"][..]), ("aria2c", &["--version"][..])]
        {
            if let Ok(v) = run::capture(name, args)
                && let Some(first) = v.lines().next()
            {
                tools.push(first.split(['(', '-']).next().unwrap_or(first).trim().to_owned());
            }
        }
        Machine { date, cpu, cores, memory, kernel, tmp_dir: tmp_str, tmp_fs, commit, tools }
    }
}

pub const BEGIN: &str = "<!-- bench:results:begin -->";
pub const END: &str = "<!-- bench:results:end -->";

/// The results section (between the markers).
pub fn results_markdown(
    machine: &Machine,
    command: &str,
    runs: usize,
    quick: bool,
    server: &str,
    workloads: &[(String, Outcome)],
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## Results\n");
    let _ = writeln!(md, "- **Date:** {}", machine.date);
    let _ = writeln!(
        md,
        "- **Machine:** {} cores ({}), {} memory, Linux {}; temporary directory `{}` ({})",
        machine.cores, machine.cpu, machine.memory, machine.kernel, machine.tmp_dir, machine.tmp_fs
    );
    let _ = writeln!(md, "- **Command:** `{command}`");
    let _ = writeln!(md, "- **Commit:** {}", machine.commit);
    let _ = writeln!(
        md,
        "- **Runs:** {runs} per contender{}, alternating in an order that changes every run (forward, then backward, then forward from the next contender, …), so each runs early and late and after different tools (every position only with twice as many runs as contenders); \
         values are medians, min–max in parentheses",
        if quick { " (`--quick`: smaller sizes)" } else { "" }
    );
    let _ = writeln!(md, "- **Server:** {server}");
    if !machine.tools.is_empty() {
        let _ = writeln!(md, "- **Peers:** {}", machine.tools.join("; "));
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "### Summary\n");
    let _ = writeln!(md, "| workload | metric | dlsessiond | peer(s) | ratio | target | met? |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    let rows: Vec<&Row> = workloads.iter().flat_map(|(_, o)| o.rows.iter()).collect();
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.workload,
            r.metric,
            r.ours,
            r.peers,
            r.ratio,
            r.target,
            r.met_str()
        );
    }
    let _ = writeln!(md);
    let missed: Vec<&&Row> = rows.iter().filter(|r| r.met == Some(false)).collect();
    let _ = writeln!(md, "### Targets missed\n");
    if missed.is_empty() {
        let _ = writeln!(md, "None.");
    } else {
        for r in missed {
            let _ = writeln!(
                md,
                "- **{}** — {}: {} (target {}, ratio {})",
                r.workload, r.metric, r.ours, r.target, r.ratio
            );
        }
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "### Details\n");
    for (name, outcome) in workloads {
        let _ = writeln!(md, "#### {name}\n");
        let _ = writeln!(md, "{}", outcome.details.trim_end());
        let _ = writeln!(md);
    }
    md
}

/// The whole document for a first run.
fn skeleton(results: &str) -> String {
    format!(
        "# Benchmarks\n\n\
         dlsessiond measured against curl, wget2 and aria2c on loopback, plus its own costs (enqueueing,\n\
         memory, IPC, event delivery, crash recovery). The suite is `crates/bench` (`dlsession-bench`);\n\
         each run rewrites only the part between the `bench:results` markers below.\n\n\
         ## How to run\n\n\
         ```sh\n\
         scripts/bench.sh                 # the full suite (5 runs each; about 6 minutes on 2 cores)\n\
         scripts/bench.sh --quick         # smoke run: 3 runs, smaller sizes (writes target/bench-results.md)\n\
         scripts/bench.sh --only ipc      # one workload (1gib-http, 1gib-https, small-files, many-tasks,\n\
         \x20                                # ipc, event-latency, crash-cost, rss-per-download)\n\
         scripts/bench.sh --runs 9        # more runs per contender\n\
         ```\n\n\
         The script installs what is missing (`nginx-light`, `curl`, `wget2`, `aria2`, `time`) with apt-get,\n\
         builds the release binaries and runs `target/release/dlsession-bench` with the same arguments\n\
         (`--help` lists them). A full run writes `BENCHMARKS.md`; `--quick` and `--only` write\n\
         `target/bench-results.md` unless `--output PATH` says otherwise. Temporary files go to `$TMPDIR`\n\
         (default `/tmp`); it needs about 3 GiB free.\n\n\
         {BEGIN}\n{results}{END}\n\n\
         ## Changes and before/after\n\n\
         _To be filled in by the lead: what was changed, and the numbers before and after._\n"
    )
}

/// Writes `results` into `path`: replaces the part between the markers if the file has
/// them, else writes the whole document.
pub fn write(path: &Path, results: &str) -> Result<()> {
    let existing = std::fs::read_to_string(path).ok();
    let text = match existing.as_deref().and_then(|t| {
        let (before, rest) = t.split_once(BEGIN)?;
        let (_, after) = rest.split_once(END)?;
        Some((before.to_owned(), after.to_owned()))
    }) {
        Some((before, after)) => format!("{before}{BEGIN}\n{results}{END}{after}"),
        None => skeleton(results),
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).ok();
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
