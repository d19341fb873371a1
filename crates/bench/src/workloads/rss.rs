//! `rss-per-download`: the daemon's resident memory per running download.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dlsession::Client;
use dlsession_proto::{Request, Response, SessionConfig, TaskSpec};
use dlsession_testkit::{Resource, TestServer};

use super::data::out_dir;
use crate::ctx::Ctx;
use crate::env::{BenchEnv, Daemon};
use crate::report::{Outcome, Row};
use crate::stats::Summary;

const NAME: &str = "rss-per-download";
/// Each download's pace: slow enough never to finish while measured.
const RATE: u64 = 1 << 20;
const SETTLE: Duration = Duration::from_secs(3);

async fn running(client: &Client) -> Result<u64> {
    match client.request(Request::Status).await? {
        Response::Status(s) => Ok(s.tasks.running),
        other => bail!("unexpected response {}", other.kind()),
    }
}

/// Creates the downloads `from..to` and waits until all of them are running.
async fn start_downloads(
    client: &Client,
    server: &TestServer,
    out: &std::path::Path,
    run: usize,
    from: usize,
    to: usize,
    daemon: &mut Daemon,
) -> Result<()> {
    let tasks = (from..to)
        .map(|i| {
            let mut spec = TaskSpec::get(server.url(&format!("/r/{i}")));
            spec.destination = out.join(format!("r{run}-{i}.bin")).to_str().map(str::to_owned);
            spec
        })
        .collect();
    client.request(Request::CreateTasks { identifier: "bench.rss".into(), tasks, resume: true }).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all_sending = (from..to).all(|i| server.bytes_sent(&format!("/r/{i}")) > 0);
        if all_sending && running(client).await? == to as u64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            daemon.check_alive()?;
            bail!("{to} downloads were not all running within 60 s ({} running)", running(client).await?);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// VmRSS and its anonymous part, KiB.
fn rss(daemon: &Daemon) -> Result<(f64, f64)> {
    Ok((daemon.rss_kib()? as f64, daemon.status_kib("RssAnon")? as f64))
}

pub async fn run(ctx: &Ctx) -> Result<Outcome> {
    let n = ctx.sizes.rss_downloads;
    // The first downloads also page in the code every download runs (file-backed, once per
    // daemon); the cost of one more download is measured from there to `n`.
    let first = (n / 5).max(1);
    let out = out_dir(ctx, NAME)?;
    let (mut idle_v, mut busy_v, mut once_v, mut per_v, mut anon_v) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut once_anon_v = Vec::new();
    for r in 0..ctx.runs {
        let server = TestServer::start().await?;
        for i in 0..n {
            server.add(&format!("/r/{i}"), Resource::generated(1 << 30, i as u64).throttle(RATE));
        }
        let config = format!("max_concurrent_downloads = {}\n", n.max(16));
        let env = BenchEnv::new(&ctx.work, NAME, &config)?;
        let mut daemon = Daemon::start(&ctx.daemon_bin, &env).await?;
        let client = daemon.client().await?;
        let session_config =
            SessionConfig { max_connections_per_host: u32::try_from(n.clamp(6, 256))?, ..SessionConfig::default() };
        client.request(Request::OpenSession { identifier: "bench.rss".into(), config: Some(session_config) }).await?;
        client.request(Request::Status).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle = rss(&daemon)?;
        start_downloads(&client, &server, &out, r, 0, first, &mut daemon).await?;
        tokio::time::sleep(SETTLE).await;
        let some = rss(&daemon)?;
        start_downloads(&client, &server, &out, r, first, n, &mut daemon).await?;
        tokio::time::sleep(SETTLE).await;
        let busy = rss(&daemon)?;
        if running(&client).await? != n as u64 {
            bail!("not all {n} downloads were still running when measured");
        }
        let more = (n - first) as f64;
        let per = (busy.0 - some.0) / more;
        let anon = (busy.1 - some.1) / more;
        let once = (busy.0 - idle.0) / n as f64;
        // What the claim that the rest is code paged in once rests on: counted from idle, the
        // anonymous memory (never file-backed code) per download.
        let once_anon = (busy.1 - idle.1) / n as f64;
        println!(
            "[{NAME}] run {}/{}  idle {:.1} MiB, {first} running {:.1} MiB, {n} running {:.1} MiB → {per:.0} KiB per \
             further download ({anon:.0} KiB anonymous; {once:.0} KiB per download counted from idle, \
             {once_anon:.0} KiB of it anonymous)",
            r + 1,
            ctx.runs,
            idle.0 / 1024.0,
            some.0 / 1024.0,
            busy.0 / 1024.0
        );
        idle_v.push(idle.0 / 1024.0);
        busy_v.push(busy.0 / 1024.0);
        once_v.push(once);
        per_v.push(per);
        anon_v.push(anon);
        once_anon_v.push(once_anon);
        let _ = client.request(Request::InvalidateAndCancel { identifier: "bench.rss".into() }).await;
        drop(client);
        daemon.kill9();
        drop(env);
        drop(server);
        super::data::remove(&out)?;
        std::fs::create_dir_all(&out)?;
    }
    let s = |v: &[f64]| Summary::of(v).context("no runs");
    let (idle, busy, once, per, anon) = (s(&idle_v)?, s(&busy_v)?, s(&once_v)?, s(&per_v)?, s(&anon_v)?);
    let once_anon = s(&once_anon_v)?;
    let mut outcome = Outcome::default();
    outcome.rows.push(
        Row::new(
            NAME,
            format!("daemon RSS per running download ({first} → {n} at once, each paced at {} KiB/s), KiB", RATE >> 10),
        )
        .ours(format!("{:.0}", per.median))
        .target("≤ 128 KiB", per.median <= 128.0),
    );
    outcome.rows.push(
        Row::new(
            NAME,
            format!("the same counted from the idle daemon ({n} at once), KiB; of it anonymous (not code paged in)"),
        )
        .ours(format!("{:.0}; {:.0}", once.median, once_anon.median)),
    );
    let _ = writeln!(
        outcome.details,
        "{n} downloads (one session, `max_connections_per_host` {}, daemon `max_concurrent_downloads = {}`) from \
         the in-process `TestServer`, each paced at {} KiB/s so none finishes. VmRSS is read on the idle daemon \
         (after start-up and one request), {s} s after the first {first} downloads are running, and {s} s after \
         all {n} are. Per download = (RSS with {n} running − RSS with {first} running) / {more}: the first \
         downloads also page in the daemon's code (file-backed, once per daemon), \
         which no further download costs. Counted from the idle daemon instead, (RSS with {n} − idle) / {n}, \
         that one-time cost is spread over the {n}; its anonymous part (`RssAnon`, which no file-backed code is) \
         says how much of it is memory the downloads themselves hold. Paced, no download takes the \
         direct-write path of fast ones, whose buffers (up to 12 MiB per download that qualifies) are not in \
         these figures. \
         The anonymous part (`RssAnon`) of the per-download figure is given beside it.\n\n\
         | idle RSS MiB | RSS with {n} running MiB | per further download KiB | of it anonymous KiB | per download from idle KiB | of it anonymous KiB |\n\
         |---|---|---|---|---|---|\n| {} | {} | {} | {} | {} | {} |\n",
        n.clamp(6, 256),
        n.max(16),
        RATE >> 10,
        idle.fmt(1),
        busy.fmt(1),
        per.fmt(0),
        anon.fmt(0),
        once.fmt(0),
        once_anon.fmt(0),
        s = SETTLE.as_secs(),
        more = n - first,
    );
    Ok(outcome)
}
