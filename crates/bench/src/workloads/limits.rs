//! `bandwidth-limit`: how close downloads under a bandwidth limit run to it, over 10 s, at
//! each level: the daemon's (one download), a session's (two downloads sharing it), and a
//! task's changed while it runs.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dlsession::proto::{LimitTarget, Request, Response};
use dlsession::{Client, ClientOptions, DownloadRequest, DownloadTask, Session, SessionConfiguration, SessionDelegate};

use crate::ctx::Ctx;
use crate::env::{BenchEnv, Daemon};
use crate::report::{Outcome, Row};
use crate::responder::Responder;
use crate::stats::Summary;

const NAME: &str = "bandwidth-limit";
/// Measured after the downloads have run this long under the limit.
const SETTLE: Duration = Duration::from_secs(1);
const WINDOW: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;

#[derive(Debug)]
struct Quiet;
impl SessionDelegate for Quiet {}

/// Bytes per second each task received over `WINDOW`.
async fn rates(tasks: &[DownloadTask]) -> Result<Vec<f64>> {
    let mut before = Vec::new();
    for t in tasks {
        before.push(t.info().await?.bytes_received);
    }
    let start = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let secs = start.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for (t, b) in tasks.iter().zip(before) {
        out.push(t.info().await?.bytes_received.saturating_sub(b) as f64 / secs);
    }
    Ok(out)
}

fn first(rates: Vec<f64>) -> Result<f64> {
    rates.first().copied().context("no task measured")
}

async fn set(client: &Client, target: LimitTarget, rate: u64) -> Result<()> {
    match client.request(Request::SetBandwidthLimit { target, bytes_per_second: Some(rate) }).await? {
        Response::Ok => Ok(()),
        other => bail!("unexpected answer {other:?}"),
    }
}

pub async fn run(ctx: &Ctx) -> Result<Outcome> {
    // Bodies longer than any download runs here: every window sees a download in progress.
    let long = ((SETTLE + WINDOW).as_secs() + 4) * 8 * MIB;
    let mut bodies = HashMap::new();
    for path in ["/global", "/a", "/b", "/task"] {
        let mut body = vec![0u8; usize::try_from(long)?];
        dlsession_testkit::fill_pattern(7, 0, &mut body);
        bodies.insert(path.to_owned(), body);
    }
    let responder = Responder::start(bodies).await?;
    let (mut global, mut session, mut spread, mut task) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..ctx.runs {
        let env = BenchEnv::new(&ctx.work, NAME, "")?;
        let daemon = Daemon::start(&ctx.daemon_bin, &env).await?;
        let options = ClientOptions { socket: Some(env.socket.clone()), autostart: false, ..ClientOptions::default() };
        let client = Client::connect(options).await.context("connecting")?;
        let attach = |id: &str| SessionConfiguration::background(id).socket(env.socket.clone());

        // The daemon's limit, one download: 8 MiB/s.
        set(&client, LimitTarget::Global, 8 * MIB).await?;
        let s = Session::attach(attach("bench.global"), Quiet).await?;
        let t = s.download_tasks(vec![DownloadRequest::new(responder.url("/global"))], true).await?;
        tokio::time::sleep(SETTLE).await;
        let g = first(rates(&t).await?)? / (8 * MIB) as f64;
        s.invalidate_and_cancel().await?;
        client.request(Request::SetBandwidthLimit { target: LimitTarget::Global, bytes_per_second: None }).await?;

        // A session's limit, two downloads: 4 MiB/s together.
        let s = Session::attach(attach("bench.session").bandwidth_limit(4 * MIB), Quiet).await?;
        let requests = vec![DownloadRequest::new(responder.url("/a")), DownloadRequest::new(responder.url("/b"))];
        let t = s.download_tasks(requests, true).await?;
        tokio::time::sleep(SETTLE).await;
        let both = rates(&t).await?;
        let total: f64 = both.iter().sum();
        let (lo, hi) = (both.iter().copied().fold(f64::MAX, f64::min), both.iter().copied().fold(0.0, f64::max));
        s.invalidate_and_cancel().await?;

        // A task's limit, changed from 2 to 6 MiB/s while it runs.
        let s = Session::attach(attach("bench.task"), Quiet).await?;
        let t = s.download_task(DownloadRequest::new(responder.url("/task"))).await?;
        set(&client, LimitTarget::Task { task: t.id() }, 2 * MIB).await?;
        t.resume().await?;
        tokio::time::sleep(SETTLE * 2).await;
        set(&client, LimitTarget::Task { task: t.id() }, 6 * MIB).await?;
        tokio::time::sleep(SETTLE).await;
        let k = first(rates(std::slice::from_ref(&t)).await?)? / (6 * MIB) as f64;
        s.invalidate_and_cancel().await?;
        drop(daemon);

        println!(
            "[{NAME}] run {}/{}  global {:+.2} %  session {:+.2} % (spread {:.1} %)  task after a change {:+.2} %",
            r + 1,
            ctx.runs,
            (g - 1.0) * 100.0,
            (total / (4 * MIB) as f64 - 1.0) * 100.0,
            (hi - lo) / total * 100.0,
            (k - 1.0) * 100.0
        );
        global.push((g - 1.0) * 100.0);
        session.push((total / (4 * MIB) as f64 - 1.0) * 100.0);
        spread.push((hi - lo) / total * 100.0);
        task.push((k - 1.0) * 100.0);
    }
    let s = |v: &[f64]| Summary::of(v).context("no runs");
    let (g, se, sp, k) = (s(&global)?, s(&session)?, s(&spread)?, s(&task)?);
    let within = |x: &Summary| x.min >= -5.0 && x.max <= 5.0;
    let mut outcome = Outcome::default();
    outcome.rows.push(
        Row::new(NAME, "daemon-wide 8 MiB/s, one download: measured − limit, % (10 s)")
            .ours(format!("{:+.2}", g.median))
            .target("±5 % in every run", within(&g)),
    );
    outcome.rows.push(
        Row::new(NAME, "session 4 MiB/s, two downloads together: measured − limit, % (10 s)")
            .ours(format!("{:+.2}", se.median))
            .target("±5 % in every run", within(&se)),
    );
    outcome.rows.push(
        Row::new(NAME, "the same: difference between the two downloads, % of the total")
            .ours(format!("{:.2}", sp.median)),
    );
    outcome.rows.push(
        Row::new(NAME, "task limit raised 2 → 6 MiB/s while running: measured − new limit, % (10 s)")
            .ours(format!("{:+.2}", k.median))
            .target("±5 % in every run", within(&k)),
    );
    let _ = writeln!(
        outcome.details,
        "Downloads from a minimal HTTP/1.1 responder in this process (bodies in memory, sent as fast as the \
         socket takes them), through a daemon with the default configuration and the `dlsession` library. \
         Each limit is set over the socket (`SetBandwidthLimit`, what `dlsessionctl limit` sends) or, for \
         the session, in its configuration; after {} s under it, the bytes each task received \
         (`bytes_received`) are read before and after a {} s window. {} runs, fresh daemon each; medians \
         (min–max) of measured/limit − 1: daemon-wide {} %, session (two downloads) {} %, task after a live \
         change {} %; the two downloads of the session differed by {} % of their total.\n",
        SETTLE.as_secs(),
        WINDOW.as_secs(),
        ctx.runs,
        g.fmt(2),
        se.fmt(2),
        k.fmt(2),
        sp.fmt(2),
    );
    Ok(outcome)
}
