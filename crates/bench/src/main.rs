//! `dlsession-bench`: the benchmark suite of dlsessiond (run it through `scripts/bench.sh`).
//!
//! It starts nginx on loopback (plain HTTP, HTTPS with HTTP/1.1, HTTPS with HTTP/2) and
//! its own `dlsessiond` processes in private `HOME`/`XDG_*` directories, runs each workload
//! with dlsessiond and with the peer tools (curl, wget2, aria2c), alternating runs, verifies
//! every download's SHA-256, and writes a Markdown report.

mod ctx;
mod env;
mod floor;
mod nginx;
mod report;
mod responder;
mod run;
mod stats;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use dlsession_testkit::TestCa;

use crate::ctx::{Ctx, Sizes};
use crate::nginx::Nginx;
use crate::report::{Outcome, Row};

/// Every workload, in the order they run.
pub const WORKLOADS: [&str; 13] = [
    "1gib-http",
    "1gib-https",
    "small-files",
    "many-tasks",
    "big-lists",
    "ipc",
    "event-latency",
    "crash-cost",
    "rss-per-download",
    "bandwidth-limit",
    "activation",
    "relaunch-storm",
    "crowd",
];

const USAGE: &str = "\
usage: dlsession-bench [--runs N] [--quick] [--only NAME] [--idle-secs S] [--output PATH]

  --runs N        runs per contender (default 5; --quick: 3)
  --quick         smoke run: 3 runs and smaller sizes (256 MiB instead of 1 GiB, …)
  --only NAME     run one workload: 1gib-http, 1gib-https, small-files, many-tasks,
                  big-lists, ipc, event-latency, crash-cost, rss-per-download,
                  bandwidth-limit, activation, relaunch-storm, crowd (repeatable)
  --idle-secs S   idle period of many-tasks (default 60; --quick: 10)
  --output PATH   where to write the Markdown (default: BENCHMARKS.md at the repository root
                  for a full run, target/bench-results.md with --quick or --only)
  --bin-dir DIR   where dlsessiond and dlsessionctl are (default: next to this binary)

Temporary files go to $TMPDIR (default /tmp). Run it through scripts/bench.sh.";

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            big: 1 << 30,
            small_count: 1000,
            small_size: 100 << 10,
            many_tasks: vec![1_000, 10_000, 100_000],
            big_lists: 100_000,
            ipc_requests: 10_000,
            event_downloads: 200,
            event_size: 16 << 10,
            crash_size: 1 << 30,
            crash_rate: 100 << 20,
            rss_downloads: 50,
            idle_secs: 60,
            storm_sessions: 1_000,
            crowd_tasks: 10_000,
        }
    }

    fn quick() -> Sizes {
        Sizes {
            big: 256 << 20,
            small_count: 200,
            many_tasks: vec![1_000, 10_000],
            big_lists: 10_000,
            ipc_requests: 2_000,
            event_downloads: 50,
            crash_size: 256 << 20,
            idle_secs: 10,
            storm_sessions: 200,
            crowd_tasks: 2_000,
            ..Sizes::full()
        }
    }
}

#[derive(Debug, Clone)]
struct Opts {
    runs: usize,
    quick: bool,
    only: Vec<String>,
    idle_secs: Option<u64>,
    output: Option<PathBuf>,
    bin_dir: Option<PathBuf>,
}

fn parse_args() -> Result<Option<Opts>> {
    let mut opts = Opts { runs: 0, quick: false, only: Vec::new(), idle_secs: None, output: None, bin_dir: None };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            inline.clone().or_else(|| args.next()).with_context(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--quick" => opts.quick = true,
            "--runs" => opts.runs = value("--runs")?.parse().context("--runs: not a number")?,
            "--only" => {
                let name = value("--only")?;
                if !WORKLOADS.contains(&name.as_str()) {
                    bail!("--only: unknown workload {name:?} (one of {})", WORKLOADS.join(", "));
                }
                opts.only.push(name);
            }
            "--idle-secs" => opts.idle_secs = Some(value("--idle-secs")?.parse().context("--idle-secs: not a number")?),
            "--output" => opts.output = Some(PathBuf::from(value("--output")?)),
            "--bin-dir" => opts.bin_dir = Some(PathBuf::from(value("--bin-dir")?)),
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    if opts.runs == 0 {
        opts.runs = if opts.quick { 3 } else { 5 };
    }
    Ok(Some(opts))
}

/// Removes the scratch directory on exit.
#[derive(Debug)]
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> ExitCode {
    // Helpers the small-files and 1gib-http workloads run as one of their contenders.
    let argv: Vec<String> = std::env::args().skip(1).collect();
    type Helper = fn(&[String]) -> anyhow::Result<()>;
    let helper: Option<Helper> = match argv.first().map(String::as_str) {
        Some("durable-copy") => Some(floor::main),
        Some("durable-write") => Some(floor::durable_write),
        _ => None,
    };
    if let (Some(helper), Some(name)) = (helper, argv.first()) {
        return match helper(argv.get(1..).unwrap_or_default()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dlsession-bench {name}: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let opts = match parse_args() {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("dlsession-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dlsession-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(real_main(opts)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("dlsession-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Removes what an interrupted earlier run left in `tmp` (`dlsession-bench-PID…` of a
/// process that no longer exists).
fn remove_stale(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("dlsession-bench-") else { continue };
        let pid = rest.strip_prefix("time-").unwrap_or(rest);
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let path = entry.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap_or_else(|_| PathBuf::from("."))
}

/// Runs the selected workloads; `Ok(false)` if any of them failed outright.
async fn real_main(opts: Opts) -> Result<bool> {
    let started = Instant::now();
    let mut sizes = if opts.quick { Sizes::quick() } else { Sizes::full() };
    if let Some(s) = opts.idle_secs {
        sizes.idle_secs = s;
    }
    let bin_dir = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("no directory of the executable")?.to_owned(),
    };
    let daemon_bin = bin_dir.join("dlsessiond");
    let ctl_bin = bin_dir.join("dlsessionctl");
    for b in [&daemon_bin, &ctl_bin] {
        if !b.is_file() {
            bail!("{} is missing: cargo build --release -p dlsessiond -p dlsessionctl", b.display());
        }
    }
    let time_bin = PathBuf::from("/usr/bin/time");
    if !time_bin.is_file() {
        bail!("/usr/bin/time is missing (apt-get install time)");
    }
    let curl = run::which("curl");
    let wget2 = run::which("wget2");
    let aria2c = run::which("aria2c");
    for (name, found) in [("curl", &curl), ("wget2", &wget2), ("aria2c", &aria2c)] {
        if found.is_none() {
            eprintln!("warning: {name} is not installed: its comparisons are skipped");
        }
    }

    let tmp = std::env::temp_dir();
    remove_stale(&tmp);
    let work = tmp.join(format!("dlsession-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let _scratch = Scratch(work.clone());
    // nginx's worker may run as `nobody`: everything it serves must be world-readable.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755))?;
    }
    let www = work.join("www");
    let peer_home = work.join("peer-home");
    std::fs::create_dir_all(&www)?;
    std::fs::create_dir_all(&peer_home)?;

    let ca = TestCa::new().context("creating the test CA")?;
    let nginx = Nginx::start(&www, &work.join("nginx"), &ca)?;
    let server = format!(
        "{} on 127.0.0.1 (1 worker process; `sendfile on` for plain HTTP; TLS 1.3 for HTTPS): \
         HTTP/1.1 on port {}, HTTPS HTTP/1.1-only on port {}, HTTPS with HTTP/2 (`listen … ssl http2`) on port {}. \
         crash-cost and rss-per-download use the in-process `dlsession_testkit::TestServer` (it counts the bytes \
         it sends); event-latency uses a minimal in-process HTTP/1.1 responder that timestamps the end of each \
         response",
        nginx.version, nginx.http_port, nginx.h1_port, nginx.h2_port
    );
    println!("server: {server}");

    let repo = repo_root();
    let machine = report::Machine::probe(&tmp, &repo);
    println!(
        "machine: {} cores ({}), {}, Linux {}, {} ({}); commit {}",
        machine.cores, machine.cpu, machine.memory, machine.kernel, machine.tmp_dir, machine.tmp_fs, machine.commit
    );

    let ctx = Ctx {
        runs: opts.runs,
        quick: opts.quick,
        sizes,
        daemon_bin,
        ctl_bin,
        time_bin,
        curl,
        wget2,
        aria2c,
        work: work.clone(),
        www,
        peer_home,
        clk_tck: run::clock_ticks(),
        ca,
        nginx,
    };

    let selected: Vec<&str> =
        WORKLOADS.iter().copied().filter(|w| opts.only.is_empty() || opts.only.iter().any(|o| o == w)).collect();
    let mut outcomes: Vec<(String, Outcome)> = Vec::new();
    let mut all_ok = true;
    let mut data = workloads::Data::default();
    for name in selected {
        println!("\n=== {name} ===");
        let t0 = Instant::now();
        let result = workloads::run(name, &ctx, &mut data).await;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                all_ok = false;
                eprintln!("[{name}] FAILED: {e:#}");
                let mut row = Row::new(name, "(workload failed)").target("completes with correct data", false);
                row.ours = format!("FAILED: {}", format!("{e:#}").replace('\n', " ").replace('|', "/"));
                Outcome { rows: vec![row], details: format!("Failed: `{}`\n", format!("{e:#}").replace('`', "'")) }
            }
        };
        println!("[{name}] done in {:.0} s", t0.elapsed().as_secs_f64());
        outcomes.push((name.to_owned(), outcome));
    }

    let command = std::env::var("DLSESSION_BENCH_COMMAND").unwrap_or_else(|_| {
        let args: Vec<String> = std::env::args().collect();
        args.join(" ")
    });
    let results = report::results_markdown(&machine, &command, ctx.runs, ctx.quick, &server, &outcomes);
    let output = match &opts.output {
        Some(p) => p.clone(),
        None if opts.quick || !opts.only.is_empty() => repo.join("target/bench-results.md"),
        None => repo.join("BENCHMARKS.md"),
    };
    report::write(&output, &results)?;
    println!("\n{results}");
    println!("wrote {} (total {:.1} min)", output.display(), started.elapsed().as_secs_f64() / 60.0);
    Ok(all_ok)
}
