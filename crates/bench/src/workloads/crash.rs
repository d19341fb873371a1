//! `crash-cost`: SIGKILL the daemon at ~40 % of a throttled download, restart it, let it
//! finish, and count the bytes the server sent twice.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dlsession::Client;
use dlsession_proto::{Request, Response, SessionConfig, TaskDetail, TaskId, TaskSpec, TaskState};
use dlsession_testkit::{Resource, TestServer};

use super::data::{out_dir, remove, verify};
use crate::ctx::Ctx;
use crate::env::{BenchEnv, Daemon};
use crate::report::{Outcome, Row};
use crate::stats::{Summary, mib, size};

const NAME: &str = "crash-cost";
const SEED: u64 = 0xc4a5;
/// Default checkpoint window of the daemon (README): a crash loses at most 64 MiB of what
/// arrived; a sync starts every half window (32 MiB) or 2 s.
const CHECKPOINT_BYTES: u64 = 64 << 20;

async fn task(client: &Client, id: TaskId) -> Result<TaskDetail> {
    match client.request(Request::GetTask { task: id }).await? {
        Response::Task(d) => Ok(d),
        other => bail!("unexpected response {}", other.kind()),
    }
}

#[derive(Debug, Clone, Copy)]
struct CrashRun {
    sent_at_kill: u64,
    resumed_from: u64,
    redownloaded: u64,
    finish_secs: f64,
}

pub async fn run(ctx: &Ctx) -> Result<Outcome> {
    let size_bytes = ctx.sizes.crash_size;
    let rate = ctx.sizes.crash_rate;
    println!("[{NAME}] hashing the {} generated body …", size(size_bytes));
    let sha = dlsession_testkit::to_hex(&dlsession_testkit::pattern_sha256(SEED, size_bytes));
    let out = out_dir(ctx, NAME)?;
    let mut runs = Vec::new();
    for r in 0..ctx.runs {
        let server = TestServer::start().await?;
        let path = "/crash.bin";
        server.add(path, Resource::generated(size_bytes, SEED).throttle(rate));
        let env = BenchEnv::new(&ctx.work, NAME, "")?;
        let mut daemon = Daemon::start(&ctx.daemon_bin, &env).await?;
        let client = daemon.client().await?;
        client
            .request(Request::OpenSession { identifier: "bench.crash".into(), config: Some(SessionConfig::default()) })
            .await?;
        let dest = out.join("crash.bin");
        remove(&dest)?;
        let mut spec = TaskSpec::get(server.url(path));
        spec.destination = Some(dest.to_str().context("UTF-8 path")?.to_owned());
        let id = match client
            .request(Request::CreateTasks { identifier: "bench.crash".into(), tasks: vec![spec], resume: true })
            .await?
        {
            Response::TasksCreated(ids) => *ids.first().context("no task id")?,
            other => bail!("unexpected response {}", other.kind()),
        };
        // From run to run the kill moves across one sync period, so the runs do not all
        // land at the same distance from a checkpoint.
        let step = (CHECKPOINT_BYTES / 2) * r as u64 / ctx.runs.max(1) as u64;
        let kill_at = size_bytes * 2 / 5 + step;
        let deadline = Instant::now() + Duration::from_secs(120);
        while server.bytes_sent(path) < kill_at {
            if Instant::now() > deadline {
                bail!("the download did not reach the kill point within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(client);
        daemon.kill9();
        let sent_at_kill = server.bytes_sent(path);
        let t0 = Instant::now();
        daemon.restart().await?;
        let client = daemon.client().await?;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let d = task(&client, id).await?;
            if d.info.state == TaskState::Completed {
                if let Some(e) = d.info.error {
                    bail!("the download failed after the restart: {e}");
                }
                break;
            }
            if Instant::now() > deadline {
                bail!("the download did not finish within 300 s of the restart");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let finish_secs = t0.elapsed().as_secs_f64();
        verify(&dest, &sha)?;
        remove(&dest)?;
        let total = server.bytes_sent(path);
        let requests = server.requests_for(path);
        let resumed_from = requests
            .get(1)
            .and_then(|r| r.range.as_deref())
            .and_then(|v| v.strip_prefix("bytes="))
            .and_then(|v| v.trim_end_matches('-').parse::<u64>().ok())
            .unwrap_or(0);
        let redownloaded = total.saturating_sub(size_bytes);
        println!(
            "[{NAME}] run {}/{}  killed with {} MiB sent; resumed from {} MiB ({} requests); re-downloaded {} MiB; \
             finished {:.1} s after the restart",
            r + 1,
            ctx.runs,
            mib(sent_at_kill as f64),
            mib(resumed_from as f64),
            requests.len(),
            mib(redownloaded as f64),
            finish_secs
        );
        runs.push(CrashRun { sent_at_kill, resumed_from, redownloaded, finish_secs });
    }

    let red = Summary::of(&runs.iter().map(|r| r.redownloaded as f64 / f64::from(1 << 20)).collect::<Vec<_>>())
        .context("no runs")?;
    let mut outcome = Outcome::default();
    outcome.rows.push(
        Row::new(NAME, format!("bytes re-downloaded after SIGKILL at 40 % of {} (+0–32 MiB), MiB", size(size_bytes)))
            .ours(format!("{:.1} (max {:.1})", red.median, red.max))
            .target("≤ one checkpoint window (64 MiB)", red.max <= (CHECKPOINT_BYTES as f64) / f64::from(1 << 20)),
    );
    let _ = writeln!(
        outcome.details,
        "A {} body generated by the in-process `dlsession_testkit::TestServer`, throttled to {} MiB/s, downloaded \
         by the daemon (default config: a crash may cost at most 64 MiB of what arrived, so a sync starts every \
         32 MiB or 2 s, whichever first — at this rate every {:.2} s — and the download waits for a sync that \
         falls behind). When the server has sent 40 % of the body plus a step that moves the kill across one \
         sync period from run to run (0, 1/N, … of 32 MiB for N runs), the daemon is SIGKILLed, \
         restarted at once, and the download finishes; re-downloaded = bytes the server sent in total − the \
         body size (this includes whatever sat in socket buffers when the daemon died). The file's SHA-256 is \
         checked every run.\n\n\
         | run | sent at kill MiB | resumed from (Range) MiB | re-downloaded MiB | restart → completed s |\n\
         |---|---|---|---|---|",
        size(size_bytes),
        rate >> 20,
        (CHECKPOINT_BYTES / 2) as f64 / rate as f64
    );
    for (i, r) in runs.iter().enumerate() {
        let _ = writeln!(
            outcome.details,
            "| {} | {} | {} | {} | {:.1} |",
            i + 1,
            mib(r.sent_at_kill as f64),
            mib(r.resumed_from as f64),
            mib(r.redownloaded as f64),
            r.finish_secs
        );
    }
    let _ = writeln!(outcome.details);
    Ok(outcome)
}
