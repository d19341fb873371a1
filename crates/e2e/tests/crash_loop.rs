//! The crash loop (issue: "nothing is lost"): a mixed workload while the daemon is killed
//! with SIGKILL at random moments and restarted. Seeded and reproducible:
//!
//! - `DLSESSION_CRASH_SEED` (default 20261125)
//! - `DLSESSION_CRASH_KILLS` (default 20; the long profile uses more)
//!
//! At the end every task completed exactly once with a byte-exact file, every durable
//! event arrived exactly once (nobody had attached before), nothing is left in the cache,
//! and the bytes fetched again after each kill are bounded by the checkpoint window.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dlsession::proto::{Request, Response, TaskQuery, TaskSpec, TaskState};
use dlsession::{Client, Session, SessionConfiguration};
use dlsession_testkit::app::client;
use dlsession_testkit::{
    Fault, Hits, Resource, TestCa, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex,
};
use dlsession_testkit::{Recorder, Seen};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Planned {
    session: &'static str,
    url: String,
    /// The path on the server that actually serves the bytes.
    served: (bool, String),
    len: u64,
    seed: u64,
    destination: Option<std::path::PathBuf>,
}

const SESSIONS: [&str; 4] = ["crash.a", "crash.b", "crash.c", "crash.d"];
const CHECKPOINT: u64 = 1 << 20;

async fn completed(client: &Client) -> usize {
    let mut n = 0;
    for s in SESSIONS {
        let q = TaskQuery { session: Some(s.into()), states: vec![TaskState::Completed], after: None, limit: 1000 };
        if let Ok(Response::Tasks(page)) = client.request(Request::ListTasks(q)).await {
            n += page.tasks.len();
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twenty_times_and_nothing_is_lost() {
    let seed = env_u64("DLSESSION_CRASH_SEED", 20_261_125);
    let kills = env_u64("DLSESSION_CRASH_KILLS", 20);
    eprintln!("crash loop: seed {seed}, {kills} kills (DLSESSION_CRASH_SEED / DLSESSION_CRASH_KILLS to change)");
    let mut rng = Rng(seed | 1);

    let env = TestEnv::new();
    env.set_config("checkpoint_bytes", &CHECKPOINT.to_string());
    env.set_config("checkpoint_interval_ms", "200");
    env.set_config("retry_max_ms", "1000");
    let ca = TestCa::new().unwrap();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let mut daemon = TestDaemon::start(&env);
    let plain = TestServer::start().await.unwrap();
    let tls = TestServer::start_tls(&ca).await.unwrap();

    // The workload: 52 tasks, 0 bytes to 200 MiB; a quarter over HTTPS, some redirected.
    let mut sizes: Vec<u64> = vec![0, 0, 0, 1, 100, 4096];
    sizes.extend((0..16).map(|_| rng.range(1 << 10, 512 << 10)));
    sizes.extend((0..20).map(|_| rng.range(1 << 20, 8 << 20)));
    sizes.extend((0..9).map(|_| rng.range(12 << 20, 32 << 20)));
    sizes.push(200 << 20);
    let mut plan = Vec::new();
    for (i, len) in sizes.into_iter().enumerate() {
        let seed = 1000 + i as u64;
        let rate = if len > 64 << 20 { 40 << 20 } else { 6 << 20 };
        let resource = Resource::generated(len, seed).throttle(rate);
        let path = format!("/f{i}");
        let https = i % 4 == 1;
        let (server, served) = if https { (&tls, (true, path.clone())) } else { (&plain, (false, path.clone())) };
        server.add(&path, resource);
        let url = if i % 5 == 2 {
            let r = format!("/r{i}");
            let src = if https { &tls } else { &plain };
            src.add(
                &r,
                Resource::bytes("").fault(Hits::All, Fault::Redirect { status: 302, location: server.url(&path) }),
            );
            src.url(&r)
        } else {
            server.url(&path)
        };
        let destination = (i % 3 == 0).then(|| env.path().join("saved").join(format!("f{i}.bin")));
        plan.push(Planned { session: SESSIONS[i % SESSIONS.len()], url, served, len, seed, destination });
    }
    let total: u64 = plan.iter().map(|p| p.len).sum();

    let c = client(&env).await;
    let mut ids: BTreeMap<u64, usize> = BTreeMap::new();
    for s in SESSIONS {
        c.request(Request::OpenSession { identifier: s.into(), config: None }).await.unwrap();
        let mine: Vec<usize> = (0..plan.len()).filter(|&i| plan[i].session == s).collect();
        let specs = mine
            .iter()
            .map(|&i| {
                let mut spec = TaskSpec::get(plan[i].url.clone());
                spec.destination = plan[i].destination.as_ref().map(|d| d.to_string_lossy().into_owned());
                spec
            })
            .collect();
        let Response::TasksCreated(created) =
            c.request(Request::CreateTasks { identifier: s.into(), tasks: specs, resume: true }).await.unwrap()
        else {
            panic!()
        };
        for (id, i) in created.into_iter().zip(mine) {
            ids.insert(id, i);
        }
    }
    drop(c);

    // Kill at random moments, restarting at once.
    let started = Instant::now();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.range(50, 600))).await;
        daemon.kill9();
        daemon.restart();
    }
    eprintln!("{kills} kills in {:?}; {total} bytes in {} tasks", started.elapsed(), plan.len());

    // Let it finish.
    let c = client(&env).await;
    let deadline = Instant::now() + Duration::from_secs(240);
    while completed(&c).await < plan.len() {
        assert!(Instant::now() < deadline, "only {} of {} tasks completed", completed(&c).await, plan.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Collect every session as its app would, verifying files and events.
    let mut verified = 0;
    for s in SESSIONS {
        let (delegate, mut events) = Recorder::new(&env.path().join(format!("collected-{s}")));
        let session = Session::attach(SessionConfiguration::background(s).socket(&env.socket), delegate).await.unwrap();
        events.wait("finished events", Duration::from_secs(60), |e| *e == Seen::FinishedEvents).await;
        events.drain();
        for (&id, &i) in ids.iter().filter(|(_, i)| plan[**i].session == s) {
            let p = &plan[i];
            let finished: Vec<&Seen> =
                events.seen.iter().filter(|e| matches!(e, Seen::Finished { task, .. } if *task == id)).collect();
            let done: Vec<&Seen> =
                events.seen.iter().filter(|e| matches!(e, Seen::Completed { task, .. } if *task == id)).collect();
            assert_eq!((finished.len(), done.len()), (1, 1), "task {id} ({}): {finished:?} {done:?}", p.url);
            assert_eq!(*done[0], Seen::Completed { task: id, error: None }, "task {id} ({}) succeeded", p.url);
            if let Some(dest) = &p.destination {
                assert_eq!(events.location(id).as_ref(), Some(dest), "delivered at its destination");
            }
            let file = events.moved_to(id).unwrap();
            assert_eq!(
                sha256_file(&file).unwrap(),
                to_hex(&pattern_sha256(p.seed, p.len)),
                "task {id} ({}) byte-exact",
                p.url
            );
            verified += 1;
        }
        let unknown: Vec<&Seen> = events
            .seen
            .iter()
            .filter(|e| match e {
                Seen::Finished { task, .. } | Seen::Completed { task, .. } => !ids.contains_key(task),
                _ => false,
            })
            .collect();
        assert!(unknown.is_empty(), "events for tasks nobody created: {unknown:?}");
        dlsession_testkit::wait_until(|| {
            let info = dlsession_testkit::block(session.info()).unwrap();
            info.pending_events == 0 && info.tasks.total() == 0
        })
        .await;
    }
    assert_eq!(verified, plan.len());

    // Nothing stray in the cache.
    let mut stray = Vec::new();
    let mut stack = vec![env.downloads_dir()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.path().is_dir() { stack.push(e.path()) } else { stray.push(e.path()) }
        }
    }
    assert!(stray.is_empty(), "stray files: {stray:?}");

    // What the kills cost.
    let sent: u64 =
        plan.iter().map(|p| if p.served.0 { tls.bytes_sent(&p.served.1) } else { plain.bytes_sent(&p.served.1) }).sum();
    let again = sent.saturating_sub(total);
    let per_kill = again / kills.max(1);
    eprintln!(
        "verified {verified} tasks, {total} bytes; re-downloaded {again} bytes after {kills} kills = {per_kill} bytes per kill \
         (checkpoint window {CHECKPOINT} bytes or 200 ms per running download, at most 16 running)"
    );
    // Each kill loses at most one checkpoint window per running download (16 at most),
    // plus what was in flight in socket and writer buffers.
    assert!(per_kill <= 16 * (CHECKPOINT + (2 << 20)), "{per_kill} bytes re-downloaded per kill");
}
