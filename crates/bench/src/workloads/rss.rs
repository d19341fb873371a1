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

pub async fn run(ctx: &Ctx) -> Result<Outcome> {
    let n = ctx.sizes.rss_downloads;
    let out = out_dir(ctx, NAME)?;
    let (mut idle_v, mut busy_v, mut per_v) = (Vec::new(), Vec::new(), Vec::new());
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
        let idle = daemon.rss_kib()?;
        let tasks = (0..n)
            .map(|i| {
                let mut spec = TaskSpec::get(server.url(&format!("/r/{i}")));
                spec.destination = out.join(format!("r{r}-{i}.bin")).to_str().map(str::to_owned);
                spec
            })
            .collect();
        client.request(Request::CreateTasks { identifier: "bench.rss".into(), tasks, resume: true }).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let all_sending = (0..n).all(|i| server.bytes_sent(&format!("/r/{i}")) > 0);
            if all_sending && running(&client).await? == n as u64 {
                break;
            }
            if Instant::now() > deadline {
                daemon.check_alive()?;
                bail!("{n} downloads were not all running within 60 s ({} running)", running(&client).await?);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(SETTLE).await;
        let busy = daemon.rss_kib()?;
        if running(&client).await? != n as u64 {
            bail!("not all {n} downloads were still running when measured");
        }
        let per = (busy as f64 - idle as f64) / n as f64;
        println!(
            "[{NAME}] run {}/{}  idle {:.1} MiB, {n} running {:.1} MiB → {per:.0} KiB per download",
            r + 1,
            ctx.runs,
            idle as f64 / 1024.0,
            busy as f64 / 1024.0
        );
        idle_v.push(idle as f64 / 1024.0);
        busy_v.push(busy as f64 / 1024.0);
        per_v.push(per);
        let _ = client.request(Request::InvalidateAndCancel { identifier: "bench.rss".into() }).await;
        drop(client);
        daemon.kill9();
        drop(env);
        drop(server);
        super::data::remove(&out)?;
        std::fs::create_dir_all(&out)?;
    }
    let s = |v: &[f64]| Summary::of(v).context("no runs");
    let (idle, busy, per) = (s(&idle_v)?, s(&busy_v)?, s(&per_v)?);
    let mut outcome = Outcome::default();
    outcome.rows.push(
        Row::new(NAME, format!("daemon RSS per running download ({n} at once), KiB"))
            .ours(format!("{:.0}", per.median))
            .target("≤ 128 KiB", per.median <= 128.0),
    );
    let _ = writeln!(
        outcome.details,
        "{n} downloads started at once (one session, `max_connections_per_host` {}, daemon \
         `max_concurrent_downloads = {}`) from the in-process `TestServer`, each paced at {} KiB/s so none \
         finishes; VmRSS is read {} s after all {n} are running and compared with the idle daemon's (after \
         start-up and one request). Per download = (RSS with {n} running − idle RSS) / {n}.\n\n\
         | idle RSS MiB | RSS with {n} running MiB | per download KiB |\n|---|---|---|\n| {} | {} | {} |\n",
        n.clamp(6, 256),
        n.max(16),
        RATE >> 10,
        SETTLE.as_secs(),
        idle.fmt(1),
        busy.fmt(1),
        per.fmt(0)
    );
    Ok(outcome)
}
