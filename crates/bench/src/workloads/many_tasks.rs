//! `many-tasks`: 100,000 suspended tasks in 1,000 sessions: enqueue rate, memory,
//! `dlsessionctl tasks --json` time, idle CPU, and how the costs grow.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dlsession::Client;
use dlsession_proto::{ErrorInfo, Request, Response, TaskSpec};
use tokio::sync::oneshot;

use crate::ctx::Ctx;
use crate::env::{BenchEnv, Daemon};
use crate::report::{Outcome, Row};
use crate::run;
use crate::stats::{Summary, thousands};

const NAME: &str = "many-tasks";
pub(super) const PER_SESSION: usize = 100;
/// Requests in flight at once on the connection: 10 × 100 tasks = 1,000 tasks per wave.
const WINDOW: usize = 10;

type Reply = oneshot::Receiver<std::result::Result<Response, ErrorInfo>>;

async fn await_reply(rx: Reply, expect_tasks: Option<usize>) -> Result<()> {
    match rx.await.context("connection closed")? {
        Ok(Response::TasksCreated(ids)) if Some(ids.len()) == expect_tasks => Ok(()),
        Ok(Response::Session(_)) if expect_tasks.is_none() => Ok(()),
        Ok(other) => bail!("unexpected response {}", other.kind()),
        Err(e) => bail!("daemon error: {e}"),
    }
}

/// Sends `requests` keeping up to `window` unanswered; errors on any failure.
async fn pipelined(client: &Client, requests: Vec<(Request, Option<usize>)>, window: usize) -> Result<()> {
    let mut inflight: VecDeque<(Reply, Option<usize>)> = VecDeque::new();
    for (req, expect) in requests {
        if inflight.len() >= window
            && let Some((rx, e)) = inflight.pop_front()
        {
            await_reply(rx, e).await?;
        }
        inflight.push_back((client.send_request(req)?, expect));
    }
    while let Some((rx, e)) = inflight.pop_front() {
        await_reply(rx, e).await?;
    }
    Ok(())
}

/// Opens `n / 100` sessions and creates 100 suspended tasks in each; returns the wall time.
pub(super) async fn enqueue(client: &Client, n: usize, window: usize) -> Result<f64> {
    let sessions = n / PER_SESSION;
    let opens: Vec<(Request, Option<usize>)> = (0..sessions)
        .map(|s| (Request::OpenSession { identifier: format!("bench.s{s}"), config: None }, None))
        .collect();
    let creates: Vec<(Request, Option<usize>)> = (0..sessions)
        .map(|s| {
            let tasks = (0..PER_SESSION).map(|i| TaskSpec::get(format!("http://127.0.0.1:9/s{s}/t{i}"))).collect();
            (Request::CreateTasks { identifier: format!("bench.s{s}"), tasks, resume: false }, Some(PER_SESSION))
        })
        .collect();
    let t0 = Instant::now();
    pipelined(client, opens, window).await?;
    pipelined(client, creates, window).await?;
    Ok(t0.elapsed().as_secs_f64())
}

async fn suspended(client: &Client) -> Result<u64> {
    match client.request(Request::Status).await? {
        Response::Status(s) => Ok(s.tasks.suspended),
        other => bail!("unexpected response {}", other.kind()),
    }
}

#[derive(Debug, Default, Clone)]
struct SizeSamples {
    enqueue: Vec<f64>,
    enqueue_seq: Vec<f64>,
    enqueue_cpu: Vec<f64>,
    list: Vec<f64>,
    rss_after_enqueue: Vec<f64>,
    rss_after_list: Vec<f64>,
}

pub async fn run(ctx: &Ctx) -> Result<Outcome> {
    let sizes = ctx.sizes.many_tasks.clone();
    let headline = *sizes.last().context("no sizes")?;
    let mut per_size: Vec<SizeSamples> = vec![SizeSamples::default(); sizes.len()];
    let mut idle: Option<(u64, f64, u64, String)> = None;
    for r in 0..ctx.runs {
        for (si, &n) in sizes.iter().enumerate() {
            let slot = per_size.get_mut(si).context("slot")?;
            // Pipelined, fresh daemon.
            let env = BenchEnv::new(&ctx.work, NAME, "")?;
            let mut daemon = Daemon::start(&ctx.daemon_bin, &env).await?;
            let client = daemon.client().await?;
            let cpu0 = daemon.cpu_ticks()?;
            let secs = enqueue(&client, n, WINDOW).await.with_context(|| format!("enqueueing {n} tasks"))?;
            let cpu = daemon.cpu_ticks()?.saturating_sub(cpu0) as f64 / ctx.clk_tck;
            let count = suspended(&client).await?;
            if count != n as u64 {
                bail!("the daemon reports {count} suspended tasks after enqueueing {n}");
            }
            let rss1 = daemon.rss_kib()? as f64 / 1024.0;
            // The listing: timed with stdout to /dev/null; checked once per size.
            let cmd = env.ctl(&ctx.ctl_bin).arg("tasks").arg("--json");
            if r == 0 {
                let file = env.path().join("tasks.json");
                run::run_timed(&ctx.time_bin, &cmd, Some(&file), Duration::from_secs(300))
                    .await?
                    .check("tasks --json")?;
                let text = std::fs::read_to_string(&file)?;
                let parsed: serde_json::Value = serde_json::from_str(&text).context("tasks --json is not JSON")?;
                let listed = parsed.as_array().map_or(0, Vec::len);
                if listed != n {
                    bail!("dlsessionctl tasks --json listed {listed} tasks, expected {n}");
                }
            }
            let timed = run::run_timed(&ctx.time_bin, &cmd, None, Duration::from_secs(300)).await?;
            timed.check("dlsessionctl tasks --json")?;
            let rss2 = daemon.rss_kib()? as f64 / 1024.0;
            println!(
                "[{NAME}] run {}/{}  {:>7} tasks: enqueue {:.3} s ({:.0} tasks/s, daemon cpu {:.2} s), RSS {:.1} MiB, \
                 tasks --json {:.3} s, RSS after {:.1} MiB",
                r + 1,
                ctx.runs,
                thousands(n as u64),
                secs,
                n as f64 / secs,
                cpu,
                rss1,
                timed.wall,
                rss2
            );
            slot.enqueue.push(secs);
            slot.enqueue_cpu.push(cpu);
            slot.rss_after_enqueue.push(rss1);
            slot.list.push(timed.wall);
            slot.rss_after_list.push(rss2);
            if n == headline && r + 1 == ctx.runs {
                tokio::time::sleep(Duration::from_secs(2)).await;
                println!(
                    "[{NAME}] measuring idle CPU for {} s with {} suspended tasks …",
                    ctx.sizes.idle_secs,
                    thousands(n as u64)
                );
                let t0 = daemon.cpu_ticks()?;
                let s0 = run::thread_switches(daemon.pid()?)?;
                tokio::time::sleep(Duration::from_secs(ctx.sizes.idle_secs)).await;
                daemon.check_alive()?;
                let s1 = run::thread_switches(daemon.pid()?)?;
                let ticks = daemon.cpu_ticks()?.saturating_sub(t0);
                let (wakeups, who) = run::wakeups_between(&s0, &s1);
                println!(
                    "[{NAME}] idle: {ticks} ticks = {:.2} s; {wakeups} wakeups of {} threads ({})",
                    ticks as f64 / ctx.clk_tck,
                    s0.len(),
                    who.join(", ")
                );
                idle = Some((ticks, ticks as f64 / ctx.clk_tck, wakeups, who.join(", ")));
            }
            drop(client);
            daemon.kill9();
            drop(env);

            // One request at a time, fresh daemon.
            let env = BenchEnv::new(&ctx.work, NAME, "")?;
            let daemon = Daemon::start(&ctx.daemon_bin, &env).await?;
            let client = daemon.client().await?;
            let secs = enqueue(&client, n, 1).await.with_context(|| format!("enqueueing {n} tasks one by one"))?;
            println!(
                "[{NAME}] run {}/{}  {:>7} tasks, one request at a time: enqueue {:.3} s ({:.0} tasks/s)",
                r + 1,
                ctx.runs,
                thousands(n as u64),
                secs,
                n as f64 / secs
            );
            slot.enqueue_seq.push(secs);
        }
    }

    let mut outcome = Outcome::default();
    let head = per_size.last().context("no samples")?;
    let s = |v: &[f64]| Summary::of(v).context("no samples");
    let enq = s(&head.enqueue)?;
    let rate = headline as f64 / enq.median;
    let big = thousands(headline as u64);
    outcome.rows.push(
        Row::new(
            NAME,
            format!("enqueue {big} suspended tasks (1,000 sessions × 100, {WINDOW} requests in flight), tasks/s"),
        )
        .ours(format!("{rate:.0}"))
        .target("≥ 10,000", rate >= 10_000.0),
    );
    let seq = s(&head.enqueue_seq)?;
    let seq_rate = headline as f64 / seq.median;
    outcome.rows.push(
        Row::new(NAME, "the same, one request at a time (reported only), tasks/s").ours(format!("{seq_rate:.0}")),
    );
    let rss = s(&head.rss_after_enqueue)?;
    outcome.rows.push(
        Row::new(NAME, format!("daemon RSS with {big} tasks, MiB"))
            .ours(format!("{:.1}", rss.median))
            .target("≤ 150 MiB", rss.median <= 150.0),
    );
    let list = s(&head.list)?;
    outcome.rows.push(
        Row::new(NAME, format!("`dlsessionctl tasks --json > /dev/null` with {big} tasks, s"))
            .ours(format!("{:.3}", list.median))
            .target("≤ 2 s", list.median <= 2.0),
    );
    if let Some((ticks, secs, wakeups, who)) = idle {
        // "≈ 0": at most 0.1 % of one core.
        let limit = ctx.sizes.idle_secs as f64 * 0.001;
        outcome.rows.push(
            Row::new(NAME, format!("daemon CPU while idle for {} s with {big} suspended tasks", ctx.sizes.idle_secs))
                .ours(format!("{ticks} ticks = {secs:.2} s"))
                .target(format!("≈ 0 (≤ 0.1 % of a core = {limit:.2} s)"), secs <= limit),
        );
        let ran = if who.is_empty() { String::new() } else { format!(" ({who})") };
        outcome.rows.push(
            Row::new(
                NAME,
                format!(
                    "daemon thread wakeups while idle for {} s with {big} suspended tasks in {} sessions",
                    ctx.sizes.idle_secs,
                    thousands((headline / PER_SESSION) as u64)
                ),
            )
            .ours(format!("{wakeups}{ran}"))
            .target("0", wakeups == 0),
        );
    }

    let _ = writeln!(
        outcome.details,
        "Tasks are created through the client library over one connection: `Request::OpenSession` for each \
         session, then one `Request::CreateTasks {{ identifier, tasks, resume: false }}` of 100 tasks per session \
         (`CreateTasks` names one session, so a request cannot carry 1,000 tasks of 100 sessions; instead \
         {WINDOW} requests — 1,000 tasks — are kept in flight, which lets the daemon group-commit them). The \
         rate counts opening the sessions too. URLs are `http://127.0.0.1:9/s{{n}}/t{{i}}` and are never \
         fetched. Each size runs on a fresh daemon; the one-request-at-a-time numbers come from another fresh \
         daemon. RSS is VmRSS from `/proc/PID/status` right after enqueueing; the listing is \
         `dlsessionctl tasks --json` with stdout on `/dev/null` (its output was parsed and counted once per \
         size). Idle CPU is utime+stime from `/proc/PID/stat` over {} s after the last listing (clock ticks of \
         1/{:.0} s). Wakeups over the same window are the context switches (voluntary and involuntary) of every \
         thread, from `/proc/PID/task/TID/status`, plus one per thread that ended: a thread that is never woken \
         adds nothing.\n",
        ctx.sizes.idle_secs, ctx.clk_tck
    );
    let _ = writeln!(
        outcome.details,
        "How the costs grow ({} runs each; medians, min–max):\n\n\
         | tasks | enqueue s ({WINDOW} in flight) | tasks/s | daemon CPU s while enqueueing | enqueue s (1 in flight) | \
         `tasks --json` s | RSS after enqueue MiB | RSS after listing MiB |\n|---|---|---|---|---|---|---|---|",
        ctx.runs
    );
    for (&n, smp) in sizes.iter().zip(&per_size) {
        let (Ok(e), Ok(c), Ok(q), Ok(l), Ok(r1), Ok(r2)) = (
            s(&smp.enqueue),
            s(&smp.enqueue_cpu),
            s(&smp.enqueue_seq),
            s(&smp.list),
            s(&smp.rss_after_enqueue),
            s(&smp.rss_after_list),
        ) else {
            continue;
        };
        let _ = writeln!(
            outcome.details,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} |",
            thousands(n as u64),
            e.fmt(3),
            n as f64 / e.median,
            c.fmt(2),
            q.fmt(3),
            l.fmt(3),
            r1.fmt(1),
            r2.fmt(1)
        );
    }
    let _ = writeln!(outcome.details);
    Ok(outcome)
}
