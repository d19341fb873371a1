//! `event-latency`: from the end of a download to the app's delegate being called.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
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
const FLOOR: &str = "syncs alone, no network";

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
    floor: Vec<f64>,
}

/// The least the contract's syncs cost one finished download here, done one after another
/// as the daemon must (docs/behaviour.md, "Durability"): the body written to a partial file
/// and `fsync`ed (a full sync, as the daemon's for the file's mark and mode), renamed into
/// place, the directory `fsync`ed, then one commit to a SQLite database in WAL mode with
/// `synchronous=FULL` (the daemon's settings). No network, no IPC, no hand-off between
/// threads. Returns milliseconds.
fn durable_floor(dir: &Path, db: &rusqlite::Connection, body: &[u8], i: usize) -> Result<f64> {
    let (part, dest) = (dir.join(format!(".floor-{i}.part")), dir.join(format!("floor-{i}.bin")));
    let began = Instant::now();
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&part)?;
    f.write_all(body)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&part, &dest)?;
    std::fs::File::open(dir)?.sync_all()?;
    db.execute("INSERT INTO done (name, size) VALUES (?1, ?2)", rusqlite::params![i as i64, body.len() as i64])?;
    let ms = began.elapsed().as_secs_f64() * 1e3;
    remove(&dest)?;
    Ok(ms)
}

fn floor_db(path: &Path) -> Result<rusqlite::Connection> {
    // A run killed earlier may have left its journal: it must not be replayed.
    for leftover in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(leftover);
        let _ = std::fs::remove_file(name);
    }
    let db = rusqlite::Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mode: String = db.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("{}: SQLite refused WAL mode ({mode})", path.display());
    }
    db.pragma_update(None, "synchronous", "FULL")?;
    db.execute_batch("CREATE TABLE done (name INTEGER NOT NULL, size INTEGER NOT NULL)")?;
    Ok(db)
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

    let db = floor_db(&ctx.work.join("event-floor.db"))?;
    let floor_body = vec![0x5a; body_size];
    let (mut p50a, mut p99a, mut p50b, mut p99b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut p50f, mut p99f) = (Vec::new(), Vec::new());
    // Every run's samples together: the summary's percentiles (a median of each run's p99
    // would let two bad runs of five vanish).
    let mut all = RunStats::default();
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
                // An event before the last byte went out would be a broken clock or
                // responder: an error, not a latency of 0.
                let after_send = at
                    .checked_duration_since(sent)
                    .with_context(|| format!("task {id} ({path}) completed before the responder sent its last byte"))?;
                stats.after_send.push(after_send.as_secs_f64() * 1e3);
                stats.end_to_end.push(at.saturating_duration_since(t0).as_secs_f64() * 1e3);
            }
        }
        drop(session);
        // The floor right after, on the same disk, as many times.
        for i in 0..n + WARMUP {
            let ms = durable_floor(&out, &db, &floor_body, i).context("the durable floor")?;
            if i >= WARMUP {
                stats.floor.push(ms);
            }
        }
        all.after_send.extend_from_slice(&stats.after_send);
        all.end_to_end.extend_from_slice(&stats.end_to_end);
        all.floor.extend_from_slice(&stats.floor);
        let (a, b, f) = (sorted(&stats.after_send), sorted(&stats.end_to_end), sorted(&stats.floor));
        let pair = |v: &[f64]| percentile(v, 50.0).zip(percentile(v, 99.0)).context("no samples");
        let ((a50, a99), (b50, b99), (f50, f99)) = (pair(&a)?, pair(&b)?, pair(&f)?);
        println!(
            "[{NAME}] run {}/{}  last byte sent → delegate: p50 {a50:.2} ms  p99 {a99:.2} ms;  \
             create+resume → delegate: p50 {b50:.2} ms  p99 {b99:.2} ms;  durable floor: p50 {f50:.2} ms  \
             p99 {f99:.2} ms",
            r + 1,
            ctx.runs
        );
        p50a.push(a50);
        p99a.push(a99);
        p50b.push(b50);
        p99b.push(b99);
        p50f.push(f50);
        p99f.push(f99);
    }
    let s = |v: &[f64]| Summary::of(v).context("no runs");
    let (a50, a99, b50, b99, f50, f99) = (s(&p50a)?, s(&p99a)?, s(&p50b)?, s(&p99b)?, s(&p50f)?, s(&p99f)?);
    let pooled = |v: &[f64], p| percentile(&sorted(v), p).context("no samples");
    let (pa50, pa99) = (pooled(&all.after_send, 50.0)?, pooled(&all.after_send, 99.0)?);
    let (pb50, pb99) = (pooled(&all.end_to_end, 50.0)?, pooled(&all.end_to_end, 99.0)?);
    let (pf50, pf99) = (pooled(&all.floor, 50.0)?, pooled(&all.floor, 99.0)?);
    let samples = all.after_send.len();
    let mut outcome = Outcome::default();
    outcome.rows.push(
        Row::new(NAME, format!("last byte sent by the server → `did_complete_with_error`, p99 of {samples}, ms"))
            .ours(format!("{pa99:.2}"))
            .target("≤ 1 ms", pa99 <= 1.0),
    );
    outcome.rows.push(Row::new(NAME, "the same, p50, ms").ours(format!("{pa50:.2}")));
    outcome.rows.push(
        Row::new(
            NAME,
            "the same vs the syncs alone (write, fsync, rename, directory fsync, SQLite commit), p50 / p99, ms",
        )
        .ours(format!("{pa50:.2} / {pa99:.2}"))
        .peers(format!("{FLOOR} {pf50:.2} / {pf99:.2}"))
        .ratio(pa99 / pf99),
    );
    outcome.rows.push(
        Row::new(NAME, "create+resume → `did_complete_with_error` (includes the fetch), p50 / p99, ms")
            .ours(format!("{pb50:.2} / {pb99:.2}")),
    );
    let _ = writeln!(
        outcome.details,
        "{n} downloads of {} per run, one at a time (after {WARMUP} warm-up downloads), through the `dlsession` \
         library in this process: `Session::attach` with a delegate whose `did_complete_with_error` records \
         `Instant::now()`; each task is created with a destination and resumed in one `download_tasks(…, true)` \
         call. The server is a minimal HTTP/1.1 responder in this process that records the instant just before \
         its write of the response's last 64 KiB (here the whole response, head and body: one system call) — \
         \"last byte sent\", so an interval may be a few µs too long, never too short; the interval from there to \
         the delegate call covers the daemon reading the body, syncing the file, committing, renaming it into \
         place, committing completion and delivering the events over IPC to the delegate thread. The bench \
         checks every file's SHA-256 afterwards (the daemon is given none to check). The summary's percentiles \
         are over every run's samples together ({samples}: p50 / p99 {pa50:.2} / {pa99:.2} ms after the last \
         byte, {pb50:.2} / {pb99:.2} from create+resume, {pf50:.2} / {pf99:.2} for the floor); below, the median \
         over {} runs of each run's percentile (min–max across runs):\n\n\
         | interval | p50 ms | p99 ms |\n|---|---|---|\n\
         | last byte sent → delegate | {} | {} |\n\
         | create+resume → delegate | {} | {} |\n\
         | {FLOOR} | {} | {} |\n\n\
         The last row is the floor: the same number of {} bodies landed by this process right after each run, \
         one after another, with the syncs the contract asks for and nothing else: written to a partial file and \
         `fsync`ed (a full sync, as the daemon's for the file's mark and mode), renamed into place, the directory `fsync`ed, then one commit to a SQLite database in WAL \
         mode with `synchronous=FULL` (the daemon's settings; the daemon commits a finished download's \
         completion and its two events in one transaction). Each step must finish before the next may start, \
         so their spread adds up: the target of 1 ms at p99 is compared with the floor's p99 in the summary.\n",
        size(body_size as u64),
        ctx.runs,
        a50.fmt(2),
        a99.fmt(2),
        b50.fmt(2),
        b99.fmt(2),
        f50.fmt(2),
        f99.fmt(2),
        size(body_size as u64)
    );
    Ok(outcome)
}
