//! `1gib-http` and `1gib-https`: one big file, end to end, dlsessiond against curl, wget2
//! and aria2c (one connection each).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::data::{Data, Served, out_dir, remove, verify};
use crate::ctx::Ctx;
use crate::env::{BenchEnv, Daemon};
use crate::report::{Outcome, Row};
use crate::run::{self, Cmd};
use crate::stats::{Summary, size};

/// How the file is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http,
    /// HTTPS, HTTP/1.1 only (the server offers no h2).
    H1,
    /// HTTPS, server offers h2 (and http/1.1).
    H2,
}

impl Proto {
    fn label(self) -> &'static str {
        match self {
            Proto::Http => "HTTP",
            Proto::H1 => "HTTPS h1",
            Proto::H2 => "HTTPS h2",
        }
    }
}

#[derive(Debug, Clone)]
enum Tool {
    Daemon,
    /// `dlsession-bench durable-write`: the same bytes landed durably from memory, no network.
    Floor(PathBuf),
    Curl(PathBuf),
    Wget2(PathBuf),
    Aria2c(PathBuf),
}

#[derive(Debug, Clone)]
pub(super) struct Contender {
    name: String,
    tool: Tool,
}

fn contenders(ctx: &Ctx, proto: Proto) -> Vec<Contender> {
    let mut v = vec![Contender {
        name: if proto == Proto::H2 { "dlsessiond (ALPN h2)".into() } else { "dlsessiond".into() },
        tool: Tool::Daemon,
    }];
    if let Some(curl) = &ctx.curl {
        let name = match proto {
            Proto::Http => "curl",
            Proto::H1 => "curl --http1.1",
            Proto::H2 => "curl --http2",
        };
        v.push(Contender { name: name.into(), tool: Tool::Curl(curl.clone()) });
    }
    if let Some(wget2) = &ctx.wget2 {
        let name = if proto == Proto::H1 { "wget2 --no-http2" } else { "wget2" };
        v.push(Contender { name: name.into(), tool: Tool::Wget2(wget2.clone()) });
    }
    // aria2c speaks no HTTP/2.
    if let Some(aria2c) = &ctx.aria2c
        && proto != Proto::H2
    {
        v.push(Contender { name: "aria2c -x1 -s1".into(), tool: Tool::Aria2c(aria2c.clone()) });
    }
    if proto == Proto::Http
        && let Ok(exe) = std::env::current_exe()
    {
        v.push(Contender { name: FLOOR.into(), tool: Tool::Floor(exe) });
    }
    v
}

/// The no-network reference of 1gib-http.
const FLOOR: &str = "durable write from memory, no network";

/// The command that downloads `url` to `out`.
fn command(ctx: &Ctx, env: &BenchEnv, c: &Contender, url: &str, out: &Path, proto: Proto) -> Result<Cmd> {
    let ca = ctx.ca.ca_pem_path().to_owned();
    let https = proto != Proto::Http;
    Ok(match &c.tool {
        Tool::Daemon => env.ctl(&ctx.ctl_bin).arg("get").arg(url).arg("-o").arg(out).arg("--wait"),
        Tool::Floor(exe) => {
            let src = ctx.www.join(url.rsplit('/').next().unwrap_or_default());
            Cmd::new(exe).arg("durable-write").arg(src).arg(out)
        }
        Tool::Curl(bin) => {
            let mut cmd = Cmd::new(bin).args(["-q", "-s", "-S", "--fail"]).envs(ctx.peer_env());
            match proto {
                Proto::Http => {}
                Proto::H1 => cmd = cmd.arg("--http1.1"),
                Proto::H2 => cmd = cmd.arg("--http2"),
            }
            if https {
                cmd = cmd.arg("--cacert").arg(&ca);
            }
            cmd.arg("-o").arg(out).arg(url)
        }
        Tool::Wget2(bin) => {
            let mut cmd = Cmd::new(bin).arg("-q").envs(ctx.peer_env());
            if proto == Proto::H1 {
                cmd = cmd.arg("--no-http2");
            }
            if https {
                cmd = cmd.arg(format!("--ca-certificate={}", ca.display()));
            }
            cmd.arg("-O").arg(out).arg(url)
        }
        Tool::Aria2c(bin) => {
            let dir = out.parent().context("output directory")?;
            let name = out.file_name().context("output name")?;
            let mut cmd = Cmd::new(bin)
                .args(["-q", "-x1", "-s1", "--file-allocation=none", "--allow-overwrite=true"])
                .envs(ctx.peer_env());
            if https {
                cmd = cmd.arg(format!("--ca-certificate={}", ca.display()));
            }
            cmd.arg("-d").arg(dir).arg("-o").arg(name).arg(url)
        }
    })
}

/// One measured run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    pub wall: f64,
    /// CPU of the command (dlsessionctl or the peer).
    pub client_cpu: f64,
    /// CPU of dlsessiond during the run (for a peer's run, what the idle daemon beside it
    /// spent: not the peer's, but work deferred into its time would show there).
    pub daemon_cpu: f64,
    /// The run was dlsessiond's: its CPU is the daemon's and the command's together.
    pub ours: bool,
    /// CPU of nginx's worker during the run (the sender's own work).
    pub server_cpu: f64,
}

impl Sample {
    pub fn cpu(&self) -> f64 {
        self.client_cpu + if self.ours { self.daemon_cpu } else { 0.0 }
    }
}

/// Runs `cmd`, measuring the daemon's CPU alongside (`ours`: the run is the daemon's).
pub(super) async fn measure(ctx: &Ctx, cmd: &Cmd, daemon: &Daemon, ours: bool, timeout: Duration) -> Result<Sample> {
    let before = Some(daemon.cpu_ticks()?);
    let server_before = ctx.nginx.worker_cpu_ticks();
    let timed = run::run_timed(&ctx.time_bin, cmd, None, timeout).await?;
    let server_after = ctx.nginx.worker_cpu_ticks();
    let after = Some(daemon.cpu_ticks()?);
    timed.check(&cmd.display())?;
    let ticks = |b: Option<u64>, a: Option<u64>| match (b, a) {
        (Some(b), Some(a)) => a.saturating_sub(b) as f64 / ctx.clk_tck,
        _ => 0.0,
    };
    let daemon_cpu = ticks(before, after);
    let server_cpu = ticks(server_before, server_after);
    Ok(Sample { wall: timed.wall, client_cpu: timed.cpu(), daemon_cpu, server_cpu, ours })
}

pub async fn http(ctx: &Ctx, data: &mut Data) -> Result<Outcome> {
    let big = data.big(ctx)?;
    let env = BenchEnv::new(&ctx.work, "1gib-http", "")?;
    let daemon = Daemon::start(&ctx.daemon_bin, &env).await?;
    let mut outcome = Outcome::default();
    let _ = writeln!(
        outcome.details,
        "One {} file of random data from nginx, `dlsessionctl get URL -o PATH --wait` (wall time from launching \
         the command until it exits; the daemon was already running) against `curl -s -o`, `wget2 -q -O` and \
         `aria2c -q -x1 -s1 --file-allocation=none` (one connection, no preallocation, for fairness). The file \
         was read once before measuring, so every run is served from the page cache; outputs are deleted and \
         `sync` runs between runs (outside the timing; caches are not dropped); the contenders' order changes \
         every run (see Runs above). CPU: user+system of the command \
         from `/usr/bin/time`, plus the daemon's utime+stime delta from `/proc/PID/stat` for dlsessiond; for a \
         peer, the daemon column gives in parentheses what the idle daemon spent beside it (not counted: work \
         put off into a peer's run would show there). Note \
         that dlsessiond `fdatasync`s the file (every 32 MiB and at the end) and renames it into place; the \
         peers never sync.\n",
        size(big.size)
    );
    one_proto(ctx, &env, &daemon, &big, Proto::Http, "1gib-http", &mut outcome).await?;
    Ok(outcome)
}

pub async fn https(ctx: &Ctx, data: &mut Data) -> Result<Outcome> {
    let big = data.big(ctx)?;
    let config = format!("extra_ca_file = \"{}\"\n", ctx.ca.ca_pem_path().display());
    let env = BenchEnv::new(&ctx.work, "1gib-https", &config)?;
    let daemon = Daemon::start(&ctx.daemon_bin, &env).await?;
    let mut outcome = Outcome::default();
    let _ = writeln!(
        outcome.details,
        "The same {} file over HTTPS with TLS 1.3 (nginx `ssl_protocols TLSv1.3`, certificate from \
         `dlsession_testkit::TestCa`; the daemon trusts it through `extra_ca_file`, the peers through \
         `--cacert`/`--ca-certificate`). HTTP/1.1: a server block without h2, so ALPN can only pick \
         http/1.1. HTTP/2: a server block with `listen … ssl http2`; the daemon offers h2 first, curl gets \
         `--http2`, wget2 uses its default (h2); aria2c has no HTTP/2 and is left out there. `nginx CPU s`: \
         the nginx worker's utime+stime delta over the run (`/proc/PID/stat`), what encrypting and sending \
         the file cost the server: on 2 cores, client and server share the machine, so no client's wall \
         time can fall far below it.\n",
        size(big.size)
    );
    let mark = ctx.nginx.access_log_len();
    one_proto(ctx, &env, &daemon, &big, Proto::H1, "1gib-https", &mut outcome).await?;
    one_proto(ctx, &env, &daemon, &big, Proto::H2, "1gib-https", &mut outcome).await?;
    let _ = writeln!(
        outcome.details,
        "Requests nginx logged in this workload (port, protocol, status, client): requests, distinct TCP \
         connections (the daemon keeps its connections pooled between runs; each peer run is a new process):\n"
    );
    for (k, (n, conns)) in ctx.nginx.protocols_since(mark) {
        let _ = writeln!(outcome.details, "- `{k}`: {n} requests on {conns} connection(s)");
    }
    let _ = writeln!(outcome.details);
    Ok(outcome)
}

#[allow(clippy::too_many_arguments)]
async fn one_proto(
    ctx: &Ctx,
    env: &BenchEnv,
    daemon: &Daemon,
    big: &Served,
    proto: Proto,
    workload: &str,
    outcome: &mut Outcome,
) -> Result<()> {
    let url = match proto {
        Proto::Http => ctx.nginx.http_url(&big.url_path),
        Proto::H1 => ctx.nginx.h1_url(&big.url_path),
        Proto::H2 => ctx.nginx.h2_url(&big.url_path),
    };
    let dir = out_dir(ctx, workload)?;
    let contenders = contenders(ctx, proto);
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); contenders.len()];
    // The daemon's own account of each of its runs (its "download timing" log line).
    let mut phases: Vec<Phases> = Vec::new();
    let timeout = Duration::from_secs(600);
    for r in 0..ctx.runs {
        for i in super::data::rotation(contenders.len(), r) {
            let Some(c) = contenders.get(i) else { continue };
            let out = dir.join(format!("big-{i}.bin"));
            remove(&out)?;
            let cmd = command(ctx, env, c, &url, &out, proto)?;
            let ours = matches!(c.tool, Tool::Daemon);
            let s = measure(ctx, &cmd, daemon, ours, timeout)
                .await
                .with_context(|| format!("{} ({})", c.name, proto.label()))?;
            verify(&out, &big.sha256).with_context(|| format!("{} ({})", c.name, proto.label()))?;
            remove(&out)?;
            run::sync_disks();
            println!(
                "[{workload}] {} run {}/{}  {:<22} {:>7.3} s  {:>7.1} MiB/s  cpu {:.2} s{}",
                proto.label(),
                r + 1,
                ctx.runs,
                c.name,
                s.wall,
                big.size as f64 / s.wall / f64::from(1 << 20),
                s.cpu(),
                if ours {
                    format!(" (daemon {:.2} s + ctl {:.2} s)", s.daemon_cpu, s.client_cpu)
                } else {
                    format!(" (idle daemon beside it {:.2} s)", s.daemon_cpu)
                }
            );
            if ours && let Some(fields) = daemon.log_text().lines().rev().find_map(timing_fields) {
                phases.push((s.wall, fields));
            }
            if let Some(v) = samples.get_mut(i) {
                v.push(s);
            }
        }
    }
    summarize(workload, proto, big.size, &contenders, &samples, outcome)?;
    where_the_time_went(proto, &phases, outcome);
    Ok(())
}

/// One dlsessiond run: its wall time (s) and the `*_ms` fields of its "download timing"
/// log line (without `_ms`).
type Phases = (f64, Vec<(String, f64)>);

/// The `*_ms` fields of a "download timing" log line.
fn timing_fields(line: &str) -> Option<Vec<(String, f64)>> {
    let (_, rest) = line.split_once("download timing")?;
    let fields: Vec<(String, f64)> = rest
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| k.ends_with("_ms"))
        .filter_map(|(k, v)| Some((k.trim_end_matches("_ms").to_owned(), v.parse().ok()?)))
        .collect();
    (!fields.is_empty()).then_some(fields)
}

/// Where dlsessiond's wall time went, from its own log, medians over the runs.
fn where_the_time_went(proto: Proto, phases: &[Phases], outcome: &mut Outcome) {
    let Some((_, first)) = phases.first() else { return };
    let median = |f: &dyn Fn(&Phases) -> Option<f64>| {
        Summary::of(&phases.iter().filter_map(f).collect::<Vec<_>>()).map(|s| s.fmt(0))
    };
    let field = |name: &str| {
        let name = name.to_owned();
        move |p: &Phases| p.1.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    };
    let in_order = ["body", "drain", "finishing", "move"];
    let rest = |p: &Phases| Some(p.0 * 1000.0 - in_order.iter().filter_map(|k| field(k)(p)).sum::<f64>());
    let _ = writeln!(
        outcome.details,
        "Where dlsessiond's time went ({}, from its `download timing` log line, ms, medians over {} runs; \
         min–max in parentheses). In order: `body` (response head accepted → last byte handed on), `drain` (the \
         writer's last writes and the file's `fdatasync`), `finishing` (the core records the finished data), \
         `move` (rename into place and the directory's `fsync`), and the rest of the wall time (`dlsessionctl` \
         starting, the request and response head, the completion committed and its event delivered). Beside \
         the body, and overlapping it: the reader waiting for the network and for the writer, the writer's \
         writes (page cache, or copies into direct-write buffers), direct writes to the disk, and checkpoint \
         syncs.\n",
        proto.label(),
        phases.len()
    );
    let mut head = String::from("| wall |");
    let mut cells = format!("| {} |", median(&|p| Some(p.0 * 1000.0)).unwrap_or_default());
    for k in in_order
        .iter()
        .copied()
        .chain(["rest"])
        .chain(first.iter().map(|(k, _)| k.as_str()).filter(|k| !in_order.contains(k)))
    {
        head.push_str(&format!(" {k} |"));
        let v = if k == "rest" { median(&rest) } else { median(&field(k)) };
        cells.push_str(&format!(" {} |", v.unwrap_or_default()));
    }
    let sep = "|---".repeat(head.matches('|').count() - 1) + "|";
    let _ = writeln!(outcome.details, "{head}\n{sep}\n{cells}\n");
}

fn summarize(
    workload: &str,
    proto: Proto,
    bytes: u64,
    contenders: &[Contender],
    samples: &[Vec<Sample>],
    outcome: &mut Outcome,
) -> Result<()> {
    let gib = bytes as f64 / f64::from(1 << 30);
    let stat = |i: usize, f: &dyn Fn(&Sample) -> f64| -> Option<Summary> {
        Summary::of(&samples.get(i)?.iter().map(f).collect::<Vec<_>>())
    };
    let ours_wall = stat(0, &|s| s.wall).context("no dlsessiond samples")?;
    let ours_cpu = stat(0, &|s| s.cpu() / gib).context("no dlsessiond samples")?;
    let peers: Vec<(String, Summary, Summary)> = contenders
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, c)| !matches!(c.tool, Tool::Floor(_)))
        .filter_map(|(i, c)| Some((c.name.clone(), stat(i, &|s| s.wall)?, stat(i, &|s| s.cpu() / gib)?)))
        .collect();
    let floor = contenders.iter().position(|c| matches!(c.tool, Tool::Floor(_))).and_then(|i| stat(i, &|s| s.wall));

    let label = proto.label();
    // Issue 20: plain HTTP as fast as the fastest peer; HTTPS clearly faster, on less CPU.
    let (wall_limit, cpu_limit) = if proto == Proto::Http { (1.0, 1.2) } else { (0.75, 0.6) };
    let mut wall_row = Row::new(workload, format!("{label}: wall time, s")).ours(format!("{:.3}", ours_wall.median));
    if let Some((fastest, fw, _)) = peers.iter().min_by(|a, b| a.1.median.total_cmp(&b.1.median)) {
        let ratio = ours_wall.median / fw.median;
        wall_row = wall_row
            .peers(peers.iter().map(|(n, w, _)| format!("{n} {:.3}", w.median)).collect::<Vec<_>>().join("; "))
            .ratio(ratio)
            .target(format!("≤ {wall_limit} × fastest peer ({fastest})"), ratio <= wall_limit);
    } else {
        // No peer ran (none installed): the target is not met by default.
        wall_row =
            wall_row.peers("not measured: no peer installed").target(format!("≤ {wall_limit} × fastest peer"), false);
    }
    outcome.rows.push(wall_row);
    if let Some(floor) = floor {
        let ratio = ours_wall.median / floor.median;
        outcome.rows.push(
            Row::new(workload, format!("{label}: wall time vs durably writing the same bytes, no network, s"))
                .ours(format!("{:.3}", ours_wall.median))
                .peers(format!("{FLOOR} {:.3}", floor.median))
                .ratio(ratio)
                .target("≤ 1.15 × the floor", ratio <= 1.15),
        );
    }
    // In every run, not only in the median: each run's dlsessiond time against the fastest
    // peer of that same run (the contenders of a run follow one another).
    let peer_runs: Vec<&Vec<Sample>> = contenders
        .iter()
        .zip(samples)
        .skip(1)
        .filter(|(c, _)| !matches!(c.tool, Tool::Floor(_)))
        .map(|(_, v)| v)
        .collect();
    let worst = samples
        .first()
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(r, ours)| {
            let best = peer_runs.iter().filter_map(|v| v.get(r)).map(|s| s.wall).min_by(f64::total_cmp)?;
            Some(ours.wall / best)
        })
        .max_by(f64::total_cmp);
    let worst_row = Row::new(workload, format!("{label}: worst run, dlsessiond vs the fastest peer of the same run"));
    outcome.rows.push(match worst {
        Some(worst) => worst_row.ours(format!("{worst:.2}")).ratio(worst).target("≤ 1.0 in every run", worst <= 1.0),
        None => worst_row.ours("not measured: no peer installed").target("≤ 1.0 in every run", false),
    });

    // What the sender itself spends: over TLS, nginx encrypting on one core sets a pace no
    // client can beat, whatever the target says.
    if proto != Proto::Http
        && let Some(server) = stat(0, &|s| s.server_cpu).filter(|s| s.median > 0.0)
    {
        outcome.rows.push(
            Row::new(workload, format!("{label}: wall time vs nginx's own CPU time sending it to dlsessiond, s"))
                .ours(format!("{:.3}", ours_wall.median))
                .peers(format!("nginx worker {:.3}", server.median))
                .ratio(ours_wall.median / server.median),
        );
    }
    let mut cpu_row = Row::new(workload, format!("{label}: CPU s per GiB (daemon + dlsessionctl)"))
        .ours(format!("{:.2}", ours_cpu.median));
    if let Some((curl, _, cc)) = peers.iter().find(|(n, _, _)| n.starts_with("curl")) {
        let ratio = ours_cpu.median / cc.median;
        let others: Vec<String> = peers
            .iter()
            .filter(|(n, _, _)| !n.starts_with("curl"))
            .map(|(n, _, c)| format!("{n} {:.2}", c.median))
            .collect();
        let peers_text = if others.is_empty() {
            format!("{curl} {:.2}", cc.median)
        } else {
            format!("{curl} {:.2} (others: {})", cc.median, others.join("; "))
        };
        cpu_row = cpu_row.peers(peers_text).ratio(ratio).target(format!("≤ {cpu_limit} × curl"), ratio <= cpu_limit);
    } else {
        cpu_row = cpu_row.peers("not measured: curl not installed").target(format!("≤ {cpu_limit} × curl"), false);
    }
    outcome.rows.push(cpu_row);

    let _ = writeln!(
        outcome.details,
        "{label} ({} file, {} runs each):\n",
        size(bytes),
        samples.first().map_or(0, Vec::len)
    );
    let _ = writeln!(
        outcome.details,
        "| contender | wall s | MiB/s (median) | client CPU s | daemon CPU s | CPU s/GiB | nginx CPU s |\n|---|---|---|---|---|---|---|"
    );
    for (i, c) in contenders.iter().enumerate() {
        let (Some(w), Some(cl), Some(dm), Some(cg), Some(sv)) = (
            stat(i, &|s| s.wall),
            stat(i, &|s| s.client_cpu),
            stat(i, &|s| s.daemon_cpu),
            stat(i, &|s| s.cpu() / gib),
            stat(i, &|s| s.server_cpu),
        ) else {
            continue;
        };
        let daemon = if matches!(c.tool, Tool::Daemon) { dm.fmt(2) } else { format!("({})", dm.fmt(2)) };
        let server = if matches!(c.tool, Tool::Floor(_)) { "—".into() } else { sv.fmt(2) };
        let _ = writeln!(
            outcome.details,
            "| {} | {} | {:.0} | {} | {} | {} | {} |",
            c.name,
            w.fmt(3),
            bytes as f64 / w.median / f64::from(1 << 20),
            cl.fmt(2),
            daemon,
            cg.fmt(2),
            server
        );
    }
    let _ = writeln!(outcome.details);
    Ok(())
}
