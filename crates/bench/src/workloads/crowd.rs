//! `crowd`: 10,000 tasks started at once against one host (100 sessions × 100), with
//! `max_concurrent_downloads = 10000` asked for and the daemon held to 1,024 open
//! descriptors (soft and hard, as a strict desktop would): nothing may fail for want of
//! descriptors, and the sessions, each under its per-host limit, must progress fairly.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dlsession::Client;
use dlsession_proto::{Request, Response, SessionConfig, TaskSpec, TaskState};

use crate::ctx::Ctx;
use crate::env::{BenchEnv, Daemon};
use crate::report::{Outcome, Row};
use crate::responder::Responder;
use crate::stats::{Summary, percentile, sorted, thousands};

const NAME: &str = "crowd";
const PER_SESSION: usize = 100;
const BODY: usize = 64 << 10;
const NOFILE: u64 = 1024;

#[derive(Debug, Default)]
struct Sample {
    total: f64,
    failed: u64,
    peak_fds: usize,
    /// When each session's last task completed, s after the start, sorted.
    sessions_done: Vec<f64>,
    lowered: String,
}

pub async fn run(ctx: &Ctx) -> Result<Outcome> {
    let tasks = ctx.sizes.crowd_tasks;
    let responder = Responder::start(HashMap::from([("/c".to_owned(), vec![b'c'; BODY])])).await?;
    let mut samples = Vec::new();
    for r in 0..ctx.runs {
        let s = once(ctx, &responder, tasks).await.with_context(|| format!("run {}", r + 1))?;
        let (first, last) =
            (s.sessions_done.first().copied().unwrap_or(0.0), s.sessions_done.last().copied().unwrap_or(0.0));
        println!(
            "[{NAME}] run {}/{}: {} tasks in {:.2} s, {} failed, peak {} descriptors; sessions done {first:.2}–{last:.2} s",
            r + 1,
            ctx.runs,
            thousands(tasks as u64),
            s.total,
            s.failed,
            s.peak_fds
        );
        samples.push(s);
    }
    let sum = |f: &dyn Fn(&Sample) -> f64| Summary::of(&samples.iter().map(f).collect::<Vec<_>>()).context("no runs");
    let total = sum(&|s| s.total)?;
    let fds = sum(&|s| s.peak_fds as f64)?;
    let at = |p: f64| move |s: &Sample| percentile(&s.sessions_done, p).unwrap_or(0.0);
    let (first, median, last) = (sum(&at(0.0))?, sum(&at(50.0))?, sum(&at(100.0))?);
    // Fairness in every run: each run's last session against that run's median one.
    // A run in which no session was seen done cannot show fairness: infinitely unfair.
    let spread =
        samples
            .iter()
            .map(|s| {
                if s.sessions_done.is_empty() {
                    f64::INFINITY
                } else {
                    at(100.0)(s) / at(50.0)(s).max(f64::MIN_POSITIVE)
                }
            })
            .max_by(f64::total_cmp)
            .context("no runs")?;
    let failed: u64 = samples.iter().map(|s| s.failed).sum();
    let big = thousands(tasks as u64);
    let mut outcome = Outcome::default();
    outcome.rows.push(
        Row::new(NAME, format!("{big} tasks at once against one host, 1,024 descriptors: tasks failed"))
            .ours(failed.to_string())
            .target("0 in every run", failed == 0),
    );
    outcome.rows.push(
        Row::new(NAME, "the same: daemon peak open descriptors")
            .ours(format!("{:.0}", fds.median))
            .target(format!("< {NOFILE} in every run"), fds.max < NOFILE as f64),
    );
    outcome.rows.push(
        Row::new(NAME, "the same: sessions' completion times, first / median / last, s (fairness)")
            .ours(format!("{:.2} / {:.2} / {:.2}", first.median, median.median, last.median))
            .ratio(spread)
            .target("last ≤ 1.5 × median in every run (ratio: the worst run's)", spread <= 1.5),
    );
    outcome.rows.push(Row::new(NAME, "the same: all done, s").ours(format!("{:.2}", total.median)));
    let _ = writeln!(
        outcome.details,
        "{} sessions × {PER_SESSION} tasks, every task a `GET` of the same {} KiB body from one loopback \
         responder, created with `resume: true` over one connection, {} requests in flight. The daemon runs \
         under `prlimit --nofile={NOFILE}:{NOFILE}` with `max_concurrent_downloads = 10000` in its \
         configuration; sessions keep the default per-host limit (6 connections). Its log said: \"{}\". \
         Descriptors (`/proc/PID/fd`) are sampled every 20 ms; a session is done when `ListSessionsPage` \
         (polled every 50 ms) shows all its tasks completed. A failed task is one completed with an error \
         (`ListTasks`). {} runs, a fresh daemon each (medians, min–max): all done {} s; peak descriptors \
         {}; sessions done first {} s, median {} s, last {} s.\n",
        tasks / PER_SESSION,
        BODY >> 10,
        WINDOW,
        samples.first().map_or("", |s| s.lowered.as_str()),
        ctx.runs,
        total.fmt(2),
        fds.fmt(0),
        first.fmt(2),
        median.fmt(2),
        last.fmt(2)
    );
    Ok(outcome)
}

/// `CreateTasks` requests in flight at once.
const WINDOW: usize = 10;

async fn once(ctx: &Ctx, responder: &Responder, tasks: usize) -> Result<Sample> {
    let env = BenchEnv::new(&ctx.work, NAME, "max_concurrent_downloads = 10000\n")?;
    let nofile = format!("--nofile={NOFILE}:{NOFILE}");
    let mut daemon = Daemon::start_wrapped(&ctx.daemon_bin, &env, &["prlimit", &nofile, "--"]).await?;
    let pid = daemon.pid()?;
    let client = daemon.client().await?;
    let sessions = tasks / PER_SESSION;
    for s in 0..sessions {
        let open =
            Request::OpenSession { identifier: format!("bench.crowd{s:03}"), config: Some(SessionConfig::default()) };
        match client.request(open).await? {
            Response::Session(_) => {}
            other => bail!("unexpected response {}", other.kind()),
        }
    }
    let t0 = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    for s in 0..sessions {
        let specs = (0..PER_SESSION).map(|_| TaskSpec::get(responder.url("/c"))).collect();
        let create = Request::CreateTasks { identifier: format!("bench.crowd{s:03}"), tasks: specs, resume: true };
        if inflight.len() >= WINDOW
            && let Some(rx) = inflight.pop_front()
        {
            created(rx).await?;
        }
        inflight.push_back(client.send_request(create)?);
    }
    while let Some(rx) = inflight.pop_front() {
        created(rx).await?;
    }
    let mut sample = Sample::default();
    let mut done: HashMap<String, f64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut last_poll = Instant::now() - Duration::from_secs(1);
    while done.len() < sessions {
        sample.peak_fds = sample.peak_fds.max(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count());
        if last_poll.elapsed() >= Duration::from_millis(50) {
            last_poll = Instant::now();
            for s in list_sessions(&client).await? {
                let c = &s.tasks;
                if c.completed == PER_SESSION as u64 && !done.contains_key(&s.identifier) {
                    done.insert(s.identifier.clone(), t0.elapsed().as_secs_f64());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{} of {sessions} sessions done after 900 s; log:\n{}", done.len(), daemon.log_tail());
        }
        daemon.check_alive()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sample.total = t0.elapsed().as_secs_f64();
    sample.sessions_done = sorted(&done.into_values().collect::<Vec<_>>());
    sample.failed = failed(&client).await?;
    let log = std::fs::read_to_string(env.path().join("daemon.log")).unwrap_or_default();
    sample.lowered = log
        .lines()
        .find(|l| l.contains("descriptors allowed"))
        .and_then(|l| l.split_once("WARN").map(|(_, r)| r.trim().trim_start_matches("dlsessiond:").trim().to_owned()))
        .unwrap_or_else(|| "(nothing lowered)".into());
    drop(client);
    daemon.kill9();
    Ok(sample)
}

async fn created(rx: tokio::sync::oneshot::Receiver<Result<Response, dlsession_proto::ErrorInfo>>) -> Result<()> {
    match rx.await.context("connection closed")? {
        Ok(Response::TasksCreated(ids)) if ids.len() == PER_SESSION => Ok(()),
        Ok(other) => bail!("unexpected response {}", other.kind()),
        Err(e) => bail!("daemon error: {e}"),
    }
}

async fn list_sessions(client: &Client) -> Result<Vec<dlsession_proto::SessionInfo>> {
    let mut sessions = client.list_sessions().await?;
    sessions.retain(|s| s.identifier.starts_with("bench.crowd"));
    Ok(sessions)
}

/// Tasks completed with an error.
async fn failed(client: &Client) -> Result<u64> {
    let mut failed = 0;
    let mut after = None;
    loop {
        let query =
            dlsession_proto::TaskQuery { session: None, states: vec![TaskState::Completed], after, limit: 1000 };
        let page = match client.request(Request::ListTasks(query)).await? {
            Response::Tasks(p) => p,
            other => bail!("unexpected response {}", other.kind()),
        };
        failed += page.tasks.iter().filter(|t| t.error.is_some()).count() as u64;
        match page.next_after {
            Some(next) => after = Some(next),
            None => return Ok(failed),
        }
    }
}
