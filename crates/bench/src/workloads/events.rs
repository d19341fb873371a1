//! `event-latency`: from the end of a download to the app's delegate being called.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dlsession::{DownloadRequest, DownloadTask, Session, SessionConfiguration, SessionDelegate, TaskError, TaskId};
use tokio::sync::mpsc;

use super::data::{out_dir, remove, verify};
use crate::ctx::Ctx;
use crate::env::{BenchEnv, Daemon};
use crate::report::{Outcome, Row};
use crate::responder::Responder;
use crate::stats::{Summary, percentile, size, sorted};

const NAME: &str = "event-latency";
const WARMUP: usize = 10;

type Completion = (TaskId, Instant, Option<String>);

#[derive(Debug)]
struct Delegate {
    tx: mpsc::UnboundedSender<Completion>,
}

impl SessionDelegate for Delegate {
    fn did_complete_with_error(&self, _: &Session, task: &DownloadTask, error: Option<&TaskError>) {
        let now = Instant::now();
        let _ = self.tx.send((task.id(), now, error.map(ToString::to_string)));
    }
}

#[derive(Debug, Default)]
struct RunStats {
    after_send: Vec<f64>,
    end_to_end: Vec<f64>,
}

pub async fn run(ctx: &Ctx) -> Result<Outcome> {
    let n = ctx.sizes.event_downloads;
    let body_size = ctx.sizes.event_size;
    let mut bodies: HashMap<String, Vec<u8>> = HashMap::new();
    let mut shas: HashMap<String, String> = HashMap::new();
    for r in 0..ctx.runs {
        for i in 0..n + WARMUP {
            let path = format!("/e/{r}/{i}");
            let mut body = vec![0u8; body_size];
            dlsession_testkit::fill_pattern((r * 100_000 + i) as u64, 0, &mut body);
            shas.insert(path.clone(), dlsession_testkit::sha256_hex(&body));
            bodies.insert(path, body);
        }
    }
    let responder = Responder::start(bodies).await?;
    let env = BenchEnv::new(&ctx.work, NAME, "")?;
    let mut daemon = Daemon::start(&ctx.daemon_bin, &env).await?;
    let out = out_dir(ctx, NAME)?;

    let (mut p50a, mut p99a, mut p50b, mut p99b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..ctx.runs {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let config = SessionConfiguration::background(format!("bench.events{r}")).socket(env.socket.clone());
        let session = Session::attach(config, Delegate { tx }).await.context("attaching the session")?;
        let mut stats = RunStats::default();
        for i in 0..n + WARMUP {
            let path = format!("/e/{r}/{i}");
            let dest = out.join(format!("e-{r}-{i}.bin"));
            let request = DownloadRequest::new(responder.url(&path)).destination(&dest);
            let t0 = Instant::now();
            let tasks = session.download_tasks(vec![request], true).await?;
            let id = tasks.first().map(DownloadTask::id).context("no task created")?;
            let (done_id, at, error) = loop {
                let got = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                    .await
                    .with_context(|| format!("no completion for task {id} within 60 s"))?
                    .context("the delegate went away")?;
                if got.0 == id {
                    break got;
                }
            };
            if let Some(e) = error {
                daemon.check_alive()?;
                bail!("task {done_id} ({path}) failed: {e}");
            }
            let sent = responder.finished(&path).with_context(|| format!("the responder did not finish {path}"))?;
            let sha = shas.get(&path).context("sha")?;
            verify(&dest, sha)?;
            remove(&dest)?;
            if i >= WARMUP {
                stats.after_send.push(at.saturating_duration_since(sent).as_secs_f64() * 1e3);
                stats.end_to_end.push(at.saturating_duration_since(t0).as_secs_f64() * 1e3);
            }
        }
        drop(session);
        let a = sorted(&stats.after_send);
        let b = sorted(&stats.end_to_end);
        let (Some(a50), Some(a99), Some(b50), Some(b99)) =
            (percentile(&a, 50.0), percentile(&a, 99.0), percentile(&b, 50.0), percentile(&b, 99.0))
        else {
            bail!("no samples");
        };
        println!(
            "[{NAME}] run {}/{}  last byte sent → delegate: p50 {a50:.2} ms  p99 {a99:.2} ms;  \
             create+resume → delegate: p50 {b50:.2} ms  p99 {b99:.2} ms",
            r + 1,
            ctx.runs
        );
        p50a.push(a50);
        p99a.push(a99);
        p50b.push(b50);
        p99b.push(b99);
    }
    let s = |v: &[f64]| Summary::of(v).context("no runs");
    let (a50, a99, b50, b99) = (s(&p50a)?, s(&p99a)?, s(&p50b)?, s(&p99b)?);
    let mut outcome = Outcome::default();
    outcome.rows.push(
        Row::new(NAME, "last byte sent by the server → `did_complete_with_error`, p99, ms")
            .ours(format!("{:.2}", a99.median))
            .target("≤ 1 ms", a99.median <= 1.0),
    );
    outcome.rows.push(Row::new(NAME, "the same, p50, ms").ours(format!("{:.2}", a50.median)));
    outcome.rows.push(
        Row::new(NAME, "create+resume → `did_complete_with_error` (includes the fetch), p50 / p99, ms")
            .ours(format!("{:.2} / {:.2}", b50.median, b99.median)),
    );
    let _ = writeln!(
        outcome.details,
        "{n} downloads of {} per run, one at a time (after {WARMUP} warm-up downloads), through the `dlsession` \
         library in this process: `Session::attach` with a delegate whose `did_complete_with_error` records \
         `Instant::now()`; each task is created with a destination and resumed in one `download_tasks(…, true)` \
         call. The server is a minimal HTTP/1.1 responder in this process that records the instant its \
         `write_all` of the whole response (head and body, one write) returned — \"last byte sent\"; the interval \
         from there to the delegate call covers the daemon reading the body, syncing the file, verifying and \
         committing, renaming it into place, committing completion and delivering the events over IPC to the \
         delegate thread. Every file's SHA-256 is checked. Median over {} runs of each run's percentile \
         (min–max across runs):\n\n\
         | interval | p50 ms | p99 ms |\n|---|---|---|\n\
         | last byte sent → delegate | {} | {} |\n\
         | create+resume → delegate | {} | {} |\n",
        size(body_size as u64),
        ctx.runs,
        a50.fmt(2),
        a99.fmt(2),
        b50.fmt(2),
        b99.fmt(2)
    );
    Ok(outcome)
}
