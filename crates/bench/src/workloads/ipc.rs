//! `ipc`: round trips of `Request::Status` over one connection.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use dlsession_proto::{Request, Response};

use crate::ctx::Ctx;
use crate::env::{BenchEnv, Daemon};
use crate::report::{Outcome, Row};
use crate::stats::{Summary, percentile, sorted, thousands};

const NAME: &str = "ipc";
const WARMUP: usize = 1_000;

pub async fn run(ctx: &Ctx) -> Result<Outcome> {
    let env = BenchEnv::new(&ctx.work, NAME, "")?;
    let daemon = Daemon::start(&ctx.daemon_bin, &env).await?;
    let n = ctx.sizes.ipc_requests;
    let (mut p50s, mut p99s, mut maxes) = (Vec::new(), Vec::new(), Vec::new());
    // Every run's samples together: the summary's percentiles.
    let mut all = Vec::with_capacity(n * ctx.runs);
    for r in 0..ctx.runs {
        let client = daemon.client().await?;
        for _ in 0..WARMUP {
            client.request(Request::Status).await?;
        }
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            let resp = client.request(Request::Status).await?;
            lat.push(t0.elapsed().as_secs_f64() * 1e6);
            if !matches!(resp, Response::Status(_)) {
                bail!("unexpected response {}", resp.kind());
            }
        }
        all.extend_from_slice(&lat);
        let lat = sorted(&lat);
        let p50 = percentile(&lat, 50.0).context("no samples")?;
        let p99 = percentile(&lat, 99.0).context("no samples")?;
        let max = lat.last().copied().unwrap_or_default();
        println!("[{NAME}] run {}/{}  p50 {p50:.1} µs  p99 {p99:.1} µs  max {max:.1} µs", r + 1, ctx.runs);
        p50s.push(p50);
        p99s.push(p99);
        maxes.push(max);
    }
    let p50 = Summary::of(&p50s).context("no runs")?;
    let p99 = Summary::of(&p99s).context("no runs")?;
    let max = Summary::of(&maxes).context("no runs")?;
    let all = sorted(&all);
    let pooled = |p| percentile(&all, p).context("no samples");
    let (all50, all99) = (pooled(50.0)?, pooled(99.0)?);
    let mut outcome = Outcome::default();
    outcome.rows.push(
        Row::new(NAME, format!("`Status` round trip p50 of {}, µs", thousands(all.len() as u64)))
            .ours(format!("{all50:.1}"))
            .target("≤ 100 µs", all50 <= 100.0),
    );
    outcome.rows.push(
        Row::new(NAME, "`Status` round trip p99, µs").ours(format!("{all99:.1}")).target("≤ 1,000 µs", all99 <= 1000.0),
    );
    let _ = writeln!(
        outcome.details,
        "{} sequential `Client::request(Request::Status)` calls over one connection (the `dlsession` library, \
         in this process, on a tokio runtime with one worker per core) after {} warm-up calls, per run; a fresh \
         connection each run, one daemon. The summary's percentiles are over every run's calls together; below, \
         the median over {} runs of each run's percentile (min–max across runs):\n\n\
         | p50 µs | p99 µs | max µs |\n|---|---|---|\n| {} | {} | {} |\n",
        thousands(n as u64),
        thousands(WARMUP as u64),
        ctx.runs,
        p50.fmt(1),
        p99.fmt(1),
        max.fmt(0)
    );
    Ok(outcome)
}
