//! `big-lists`: 100,000 URLs in one `dlsessionctl get -i`, and `dlsessionctl tasks --json`
//! over 100,000 finished tasks whose events wait for an app (the costs that grew with the
//! square of the count before they were indexed).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dlsession_proto::{Request, Response};

use crate::ctx::Ctx;
use crate::env::{BenchEnv, Daemon};
use crate::report::{Outcome, Row};
use crate::run;
use crate::stats::{Summary, thousands};

const NAME: &str = "big-lists";

pub async fn run(ctx: &Ctx) -> Result<Outcome> {
    let n = ctx.sizes.big_lists;
    let big = thousands(n as u64);
    let (mut get_secs, mut list_secs, mut finish_secs) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..ctx.runs {
        // Missing files: every task completes at once with `http_status` 404, one commit
        // each, so the listing sees 100,000 completed tasks with pending events.
        let env = BenchEnv::new(&ctx.work, NAME, "max_concurrent_downloads = 64\n")?;
        let mut daemon = Daemon::start(&ctx.daemon_bin, &env).await?;
        let list: String = (0..n).map(|i| format!("{}\n", ctx.nginx.http_url(&format!("/missing/{i}.bin")))).collect();
        let input = env.path().join("urls.txt");
        std::fs::write(&input, list)?;
        let dir = env.path().join("out");
        let cmd = env.ctl(&ctx.ctl_bin).arg("get").arg("-i").arg(&input).arg("-d").arg(&dir);
        let timed = run::run_timed(&ctx.time_bin, &cmd, None, Duration::from_secs(600)).await?;
        timed.check("dlsessionctl get -i")?;
        let client = daemon.client().await?;
        let t0 = Instant::now();
        loop {
            let status = match client.request(Request::Status).await? {
                Response::Status(s) => s,
                other => bail!("unexpected response {}", other.kind()),
            };
            if status.tasks.completed == n as u64 {
                break;
            }
            if t0.elapsed() > Duration::from_secs(900) {
                bail!("only {} of {n} tasks completed after 15 min", status.tasks.completed);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let finished = t0.elapsed().as_secs_f64();
        let cmd = env.ctl(&ctx.ctl_bin).arg("tasks").arg("--json");
        if r == 0 {
            let file = env.path().join("tasks.json");
            run::run_timed(&ctx.time_bin, &cmd, Some(&file), Duration::from_secs(300)).await?.check("tasks --json")?;
            let parsed: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&file)?).context("tasks --json is not JSON")?;
            let listed = parsed.as_array().map_or(0, Vec::len);
            if listed != n {
                bail!("dlsessionctl tasks --json listed {listed} tasks, expected {n}");
            }
        }
        let listed = run::run_timed(&ctx.time_bin, &cmd, None, Duration::from_secs(300)).await?;
        listed.check("dlsessionctl tasks --json")?;
        println!(
            "[{NAME}] run {}/{}  get -i {big} URLs {:.3} s; all completed {:.1} s later; tasks --json {:.3} s",
            r + 1,
            ctx.runs,
            timed.wall,
            finished,
            listed.wall
        );
        get_secs.push(timed.wall);
        list_secs.push(listed.wall);
        finish_secs.push(finished);
        drop(client);
        daemon.kill9();
    }
    let s = |v: &[f64]| Summary::of(v).context("no samples");
    let (get, list, finish) = (s(&get_secs)?, s(&list_secs)?, s(&finish_secs)?);
    let mut outcome = Outcome::default();
    outcome.rows.push(
        Row::new(NAME, format!("`dlsessionctl get -i` with {big} URLs (created and started), s"))
            .ours(format!("{:.3}", get.median))
            .target("< 5 s", get.median < 5.0),
    );
    outcome.rows.push(
        Row::new(
            NAME,
            format!("`dlsessionctl tasks --json > /dev/null` with {big} completed tasks, events pending, s"),
        )
        .ours(format!("{:.3}", list.median))
        .target("< 1 s", list.median < 1.0),
    );
    let _ = writeln!(
        outcome.details,
        "`dlsessionctl get -i FILE -d DIR` with {big} URLs of nginx files that do not exist (the command \
         returns once every task is created and started: in requests of at most 1,000 tasks, each one \
         transaction). Every task then completes with `http_status` 404, leaving its `completed` event for \
         an app; that took {} s (reported only; `max_concurrent_downloads = 64`). Then `dlsessionctl tasks \
         --json` with stdout on `/dev/null` (its output parsed and counted once). {} runs, fresh daemon each; \
         medians (min–max): get -i {} s, tasks --json {} s.\n",
        finish.fmt(1),
        ctx.runs,
        get.fmt(3),
        list.fmt(3)
    );
    Ok(outcome)
}
