//! `relaunch-storm`: 1,000 sessions, each with a relaunch command and no app attached,
//! whose downloads all finish within about a second. Every app must be relaunched (at
//! most `max_concurrent_launches` launches under way at once) and collect its events;
//! reported: the time to the last acknowledgement, the daemon's peak RSS and open
//! descriptors, and how many relaunched apps were alive at once.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dlsession::Client;
use dlsession_proto::{LaunchSpec, Request, Response, SessionConfig, TaskCounts, TaskSpec};

use crate::ctx::Ctx;
use crate::env::{BenchEnv, Daemon};
use crate::report::{Outcome, Row};
use crate::responder::Responder;
use crate::run;
use crate::stats::{Summary, thousands};

const NAME: &str = "relaunch-storm";
/// The daemon's default `max_concurrent_launches` (docs/configuration.md).
const LAUNCH_CAP: usize = 8;
const BODY: usize = 10 << 10;

#[derive(Debug, Default)]
struct Sample {
    /// Creation of the first task → the last download completed, s.
    downloads: f64,
    /// Creation of the first task → every event acknowledged, s.
    acked: f64,
    launches: usize,
    /// Relaunches under way at once (launched, not yet attached), from the daemon's log.
    peak_launching: usize,
    peak_alive: usize,
    peak_fds: usize,
    peak_rss_mib: f64,
}

pub async fn run(ctx: &Ctx) -> Result<Outcome> {
    let n = ctx.sizes.storm_sessions;
    let responder = Responder::start(HashMap::from([("/f".to_owned(), vec![b'x'; BODY])])).await?;
    let mut samples = Vec::new();
    for r in 0..ctx.runs {
        let s = once(ctx, &responder, n).await.with_context(|| format!("run {}", r + 1))?;
        println!(
            "[{NAME}] run {}/{}: {} sessions, downloads done {:.2} s, all acknowledged {:.2} s, {} launches, \
             ≤ {} launches under way and {} apps alive at once, peak {} descriptors, peak RSS {:.1} MiB",
            r + 1,
            ctx.runs,
            thousands(n as u64),
            s.downloads,
            s.acked,
            s.launches,
            s.peak_launching,
            s.peak_alive,
            s.peak_fds,
            s.peak_rss_mib
        );
        samples.push(s);
    }
    let sum = |f: fn(&Sample) -> f64| Summary::of(&samples.iter().map(f).collect::<Vec<_>>()).context("no runs");
    let (downloads, acked) = (sum(|s| s.downloads)?, sum(|s| s.acked)?);
    let (alive, fds, rss) = (sum(|s| s.peak_alive as f64)?, sum(|s| s.peak_fds as f64)?, sum(|s| s.peak_rss_mib)?);
    let launching = sum(|s| s.peak_launching as f64)?;
    let all_launched = samples.iter().all(|s| s.launches == n);
    let big = thousands(n as u64);
    let mut outcome = Outcome::default();
    outcome.rows.push(
        Row::new(
            NAME,
            format!("{big} sessions relaunching their apps: first task created → every event acknowledged, s"),
        )
        .ours(format!("{:.2}", acked.median))
        .target(format!("every app relaunched once, every event acknowledged ({big} launches)"), all_launched),
    );
    outcome.rows.push(
        Row::new(NAME, "the same: relaunches under way at once (started, app not yet attached), peak")
            .ours(format!("{:.0}", launching.median))
            .target(
                format!("≤ max_concurrent_launches = {LAUNCH_CAP} in every run"),
                launching.max <= LAUNCH_CAP as f64,
            ),
    );
    outcome.rows.push(
        Row::new(NAME, "the same: relaunched apps alive at once, peak (attached ones finishing included)")
            .ours(format!("{:.0}", alive.median)),
    );
    outcome.rows.push(
        Row::new(NAME, "the same: daemon peak open descriptors / peak RSS MiB")
            .ours(format!("{:.0} / {:.1}", fds.median, rss.median)),
    );
    let _ = writeln!(
        outcome.details,
        "{big} sessions are opened over one connection, each with `launch: Command [app.sh, ID]` and no app \
         attached; then one task each (`GET` of {} KiB from a loopback responder, `resume: true`) is created, \
         all in flight at once. `app.sh` appends a line with the time (`date`, a process of its own) to a log and execs `dlsessionctl attach ID`, which \
         attaches as the session's app, takes the events that waited, acknowledges them and exits. The clock \
         starts at the first `CreateTasks` and stops when `Status` (polled every 20 ms) shows no live task: \
         every task completed and its events acknowledged. While it runs, the daemon's open descriptors \
         (`/proc/PID/fd`) and its children (relaunched apps alive, from `/proc/*/stat`) are sampled every \
         20 ms; peak RSS is `VmHWM`. Launches are counted from the log. {} runs, a fresh daemon each \
         (medians, min–max). Relaunches under way are counted from the earlier of a session's `wake … \
         outcome=Launched` line in the daemon's log and the line its `app.sh` wrote first thing, to its \
         `attached` line.\n\n| downloads done s | all acknowledged s | launches | \
         launches under way, peak | apps alive at once, peak | peak descriptors | peak RSS MiB |\n\
         |---|---|---|---|---|---|---|\n| {} | {} | {} | {} | {} | {} | {} |\n",
        BODY >> 10,
        ctx.runs,
        downloads.fmt(2),
        acked.fmt(2),
        samples.iter().map(|s| s.launches.to_string()).collect::<Vec<_>>().join(", "),
        launching.fmt(0),
        alive.fmt(0),
        fds.fmt(0),
        rss.fmt(1)
    );
    Ok(outcome)
}

async fn once(ctx: &Ctx, responder: &Responder, n: usize) -> Result<Sample> {
    let env = BenchEnv::new(&ctx.work, NAME, "")?;
    let mut daemon = Daemon::start(&ctx.daemon_bin, &env).await?;
    let log = env.path().join("launches.log");
    let app = env.path().join("app.sh");
    std::fs::write(
        &app,
        format!(
            "#!/bin/sh\necho \"$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ) $1\" >> '{}'\nexec '{}' --socket '{}' attach \"$1\" > /dev/null\n",
            log.display(),
            ctx.ctl_bin.display(),
            env.socket.display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755))?;
    let client = daemon.client().await?;
    for i in 0..n {
        let launch = LaunchSpec::Command { argv: vec![app.to_string_lossy().into_owned(), format!("bench.storm{i}")] };
        let config = SessionConfig { launch: Some(launch), ..SessionConfig::default() };
        expect(&client, Request::OpenSession { identifier: format!("bench.storm{i}"), config: Some(config) }).await?;
    }
    let pid = daemon.pid()?;
    let t0 = Instant::now();
    let mut replies = Vec::with_capacity(n);
    for i in 0..n {
        let tasks = vec![TaskSpec::get(responder.url("/f"))];
        replies.push(client.send_request(Request::CreateTasks {
            identifier: format!("bench.storm{i}"),
            tasks,
            resume: true,
        })?);
    }
    for rx in replies {
        match rx.await.context("connection closed")? {
            Ok(Response::TasksCreated(_)) => {}
            Ok(other) => bail!("unexpected response {}", other.kind()),
            Err(e) => bail!("daemon error: {e}"),
        }
    }
    let mut s = Sample::default();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let counts = status(&client).await?;
        s.peak_fds = s.peak_fds.max(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count());
        s.peak_alive = s.peak_alive.max(children(pid));
        let unfinished = counts.queued + counts.running + counts.waiting + counts.suspended;
        if unfinished == 0 && s.downloads == 0.0 {
            s.downloads = t0.elapsed().as_secs_f64();
        }
        if unfinished + counts.completed == 0 {
            s.acked = t0.elapsed().as_secs_f64();
            break;
        }
        if Instant::now() > deadline {
            bail!("not every event was acknowledged within 600 s: {counts:?}; log:\n{}", daemon.log_tail());
        }
        daemon.check_alive()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.peak_rss_mib = run::status_kib(pid, "VmHWM")? as f64 / 1024.0;
    s.launches = count_lines(&log);
    s.peak_launching = launches_under_way(
        &std::fs::read_to_string(env.path().join("daemon.log")).unwrap_or_default(),
        &std::fs::read_to_string(&log).unwrap_or_default(),
    );
    drop(client);
    daemon.kill9();
    Ok(s)
}

/// The most relaunches under way at once: each runs from its start to its session's
/// `attached` line in the daemon's log (logged before the slot is given on, on the same
/// thread, so the span lies within the slot the launch held). Its start is the earlier of the daemon's `wake … outcome=Launched` line (logged
/// once the process has started) and the line the app itself wrote first thing (`apps`:
/// `TIMESTAMP SESSION`), so a launch whose app attached before the daemon logged it is
/// counted all the same. Timestamps are RFC 3339 UTC with microseconds, so they sort as text.
fn launches_under_way(log: &str, apps: &str) -> usize {
    let session = |l: &str| l.split_whitespace().find_map(|f| f.strip_prefix("session=")).map(str::to_owned);
    let (mut launched, mut attached) = (HashMap::new(), HashMap::<String, String>::new());
    let mut earliest = |s: String, ts: &str| {
        let start = launched.entry(s).or_insert_with(|| ts.to_owned());
        if ts < start.as_str() {
            *start = ts.to_owned();
        }
    };
    for line in apps.lines() {
        if let Some((ts, s)) = line.split_once(' ') {
            earliest(s.to_owned(), ts);
        }
    }
    for line in log.lines() {
        let Some(ts) = line.split_whitespace().next() else { continue };
        if line.contains(": wake session=") && line.contains("outcome=Launched") {
            if let Some(s) = session(line) {
                earliest(s, ts);
            }
        } else if line.contains(": attached conn=")
            && let Some(s) = session(line)
        {
            attached.entry(s).or_insert_with(|| ts.to_owned());
        }
    }
    let mut edges: Vec<(String, i64)> = Vec::new();
    for (s, from) in launched {
        if let Some(to) = attached.get(&s).filter(|to| **to > from) {
            edges.push((from, 1));
            edges.push((to.clone(), -1));
        }
    }
    // At one instant an end comes before a start.
    edges.sort();
    let (mut now, mut most) = (0i64, 0i64);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
}

async fn expect(client: &Client, request: Request) -> Result<()> {
    match client.request(request).await? {
        Response::Session(_) | Response::Ok => Ok(()),
        other => bail!("unexpected response {}", other.kind()),
    }
}

async fn status(client: &Client) -> Result<TaskCounts> {
    match client.request(Request::Status).await? {
        Response::Status(s) => Ok(s.tasks),
        other => bail!("unexpected response {}", other.kind()),
    }
}

/// Processes whose parent is `pid` (the relaunched apps still alive).
fn children(pid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // Fields 3 (state) and 4 (ppid) come after the command name, which may hold
            // spaces. An exited child not yet reaped (a zombie) is not alive.
            let mut rest = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace();
            let (state, ppid) = (rest.next(), rest.next().and_then(|p| p.parse::<u32>().ok()));
            state != Some("Z") && ppid == Some(pid)
        })
        .count()
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[cfg(test)]
mod tests {
    use super::launches_under_way;

    #[test]
    fn launches_are_counted_from_the_earlier_of_the_log_and_the_app() {
        let log = "\
2026-12-07T10:00:00.000100Z  INFO dlsessiond::core::wake: wake session=a outcome=Launched
2026-12-07T10:00:00.000200Z  INFO dlsessiond::core::wake: wake session=b outcome=Launched
2026-12-07T10:00:00.000300Z  INFO dlsessiond::core::requests: attached conn=1 session=a
2026-12-07T10:00:00.000400Z  INFO dlsessiond::core::requests: attached conn=2 session=c
2026-12-07T10:00:00.000500Z  INFO dlsessiond::core::wake: wake session=c outcome=Launched
2026-12-07T10:00:00.000600Z  INFO dlsessiond::core::requests: attached conn=3 session=b
";
        // From the log alone, c attached before its launch was logged and is not counted: a
        // and b overlap, so 2 at most.
        assert_eq!(launches_under_way(log, ""), 2);
        // c's app wrote its line before a's attach: three under way at once.
        assert_eq!(launches_under_way(log, "2026-12-07T10:00:00.000250Z c\n"), 3);
    }
}
