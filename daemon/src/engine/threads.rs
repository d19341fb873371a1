//! The threads download writers run on (and, named apart, `core::disk`'s destination checks).
//!
//! A download's writer is a blocking job for as long as its body lasts (see `writer`). On
//! tokio's blocking pool, starting one signals a condvar under the pool's mutex, which the
//! woken thread must then take again, and every thread done with a job takes it too: with
//! sixteen small files finishing at once, `strace -c -f` counted 7,900 futex calls per
//! 1,000 files. Here a job is handed to one parked thread, which alone is woken: 3,000
//! futex calls, and a tenth fewer context switches (BENCHMARKS.md). Writers no longer
//! share a pool with the other blocking file work either.
//!
//! Threads stay parked between jobs (an idle daemon is never woken). There are at most
//! `cap` of them, as many as the blocking pool this replaces for writers allowed; a job
//! beyond that waits, in order, for the first thread done.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

type Job = Box<dyn FnOnce() + Send>;

/// A pool of parked threads for blocking jobs (see the module): the download writers',
/// or another named one. Cheap to share behind the engine's `Arc`.
#[derive(Debug)]
pub struct JobThreads {
    state: Arc<Mutex<State>>,
    cap: usize,
    /// The threads' name (`dl-writer` for download writers).
    name: &'static str,
}

#[derive(Default)]
struct State {
    /// Threads parked for a job, the last parked first (its stack is warm).
    idle: Vec<Arc<Parked>>,
    /// Jobs waiting for a thread (all `cap` are busy).
    queued: VecDeque<Job>,
    threads: usize,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("idle", &self.idle.len())
            .field("queued", &self.queued.len())
            .field("threads", &self.threads)
            .finish()
    }
}

/// A parked thread and the slot its next job is handed over in.
struct Parked {
    job: Mutex<Option<Job>>,
    thread: std::thread::Thread,
}

/// Jobs run outside every lock and their panics are caught, so a poisoned lock only means
/// a panic in this module's few lines; the state it guards is still whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl JobThreads {
    /// No thread starts before the first job; at most `cap` (at least one) ever run.
    pub fn new(cap: usize) -> JobThreads {
        JobThreads::named("dl-writer", cap)
    }

    /// The same for other blocking jobs, on threads called `name`.
    pub fn named(name: &'static str, cap: usize) -> JobThreads {
        JobThreads { state: Arc::default(), cap: cap.max(1), name }
    }

    /// Runs `f` on a writer thread. The answer is its result, or what its panic said.
    pub fn run<T, F>(&self, f: F) -> impl Future<Output = Result<T, String>> + use<T, F>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .map_err(|panic| format!("the writer failed: {}", crate::panics::message(panic.as_ref())));
            let _ = tx.send(out);
        });
        self.start(job);
        async move { rx.await.unwrap_or_else(|_| Err("the writer thread went away".to_owned())) }
    }

    fn start(&self, job: Job) {
        let mut state = lock(&self.state);
        if let Some(parked) = state.idle.pop() {
            drop(state);
            *lock(&parked.job) = Some(job);
            parked.thread.unpark();
            return;
        }
        if state.threads >= self.cap {
            state.queued.push_back(job);
            return;
        }
        state.threads += 1;
        drop(state);
        // The job comes back if the thread cannot start.
        let first = Arc::new(Mutex::new(Some(job)));
        let theirs = first.clone();
        let shared = self.state.clone();
        let spawned = std::thread::Builder::new().name(self.name.into()).spawn(move || {
            if let Some(job) = lock(&theirs).take() {
                work(&shared, job);
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a writer thread; writing on the runtime's pool");
            // Never lost: this job, and any queued meanwhile (which might otherwise wait for
            // a thread that never comes), go to the runtime's blocking pool; outside a
            // runtime dropping them answers "went away", and their attempts are retried.
            let mut stranded: Vec<Job> = lock(&first).take().into_iter().collect();
            {
                let mut state = lock(&self.state);
                state.threads -= 1;
                stranded.extend(state.queued.drain(..));
            }
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                for job in stranded {
                    runtime.spawn_blocking(job);
                }
            }
        }
    }
}

/// A writer thread's life: its job, then each queued one, then parked until handed more.
/// Never joined: a thread stuck in a write or sync must not hold up the daemon's exit, and
/// what it has not synced was never committed (a crash costs the same).
fn work(state: &Mutex<State>, mut job: Job) {
    let me = Arc::new(Parked { job: Mutex::new(None), thread: std::thread::current() });
    loop {
        job();
        let queued = {
            let mut state = lock(state);
            let next = state.queued.pop_front();
            if next.is_none() {
                state.idle.push(me.clone());
            }
            next
        };
        job = match queued {
            Some(next) => next,
            // An unpark that came before the park makes it return at once; any other
            // wake-up finds no job and parks again.
            None => loop {
                std::thread::park();
                if let Some(next) = lock(&me.job).take() {
                    break next;
                }
            },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A lost wake-up fails the test instead of hanging the suite.
    async fn answer<T>(job: impl Future<Output = Result<T, String>>) -> Result<T, String> {
        tokio::time::timeout(Duration::from_secs(10), job).await.expect("the job never answered")
    }

    /// Waits until every thread is parked (a job answers just before its thread parks).
    fn settle(threads: &JobThreads) {
        for _ in 0..1000 {
            let state = lock(&threads.state);
            if state.idle.len() == state.threads {
                return;
            }
            drop(state);
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("threads never parked: {:?}", lock(&threads.state));
    }

    #[tokio::test]
    async fn jobs_run_on_parked_threads_and_answer() {
        let threads = JobThreads::new(4);
        assert_eq!(answer(threads.run(|| 6 * 7)).await, Ok(42));
        settle(&threads);
        let name = answer(threads.run(|| std::thread::current().name().map(str::to_owned))).await.unwrap();
        assert_eq!(name.as_deref(), Some("dl-writer"));
        // One job at a time: the same parked thread takes every one.
        for _ in 0..20 {
            settle(&threads);
            answer(threads.run(|| ())).await.unwrap();
        }
        settle(&threads);
        assert_eq!(lock(&threads.state).threads, 1);
    }

    #[tokio::test]
    async fn no_more_than_cap_threads_run_and_queued_jobs_wait_their_turn() {
        let threads = JobThreads::new(2);
        let (started_tx, started) = std::sync::mpsc::channel();
        let mut release = Vec::new();
        let mut jobs = Vec::new();
        for i in 0..6 {
            let (go, wait) = std::sync::mpsc::channel::<()>();
            release.push(go);
            let started_tx = started_tx.clone();
            jobs.push(threads.run(move || {
                let _ = started_tx.send(i);
                let _ = wait.recv();
                i
            }));
        }
        let next = || started.recv_timeout(Duration::from_secs(10)).expect("a job should have started");
        let mut first = [next(), next()];
        first.sort_unstable();
        assert_eq!(first, [0, 1], "the first two got the two threads");
        assert_eq!(started.recv_timeout(Duration::from_millis(100)).ok(), None, "no third thread");
        let (running, queued) = {
            let state = lock(&threads.state);
            (state.threads, state.queued.len())
        };
        assert_eq!((running, queued), (2, 4));
        // Each thread set free takes the oldest waiting job.
        let mut release = release.into_iter().map(Some).collect::<Vec<_>>();
        for (free, expected) in [(0, 2), (1, 3), (2, 4), (3, 5)] {
            drop(release.get_mut(free).and_then(Option::take));
            assert_eq!(next(), expected);
        }
        drop(release);
        for (i, job) in jobs.into_iter().enumerate() {
            assert_eq!(answer(job).await, Ok(i));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_jobs_at_once_all_answer() {
        let threads = std::sync::Arc::new(JobThreads::new(3));
        let mut started = Vec::new();
        for _ in 0..4 {
            let threads = threads.clone();
            started.push(tokio::spawn(async move {
                let jobs: Vec<_> = (0..500u64).map(|i| threads.run(move || i * 2)).collect();
                let mut sum = 0;
                for job in jobs {
                    sum += answer(job).await.unwrap();
                }
                sum
            }));
        }
        for s in started {
            assert_eq!(s.await.unwrap(), 499 * 500);
        }
        assert!(lock(&threads.state).threads <= 3);
    }

    #[tokio::test]
    async fn a_panicking_job_answers_with_its_message_and_the_thread_goes_on() {
        let threads = JobThreads::new(1);
        let said = answer(threads.run(|| -> u32 { panic!("disk on fire") })).await;
        assert_eq!(said, Err("the writer failed: disk on fire".to_owned()));
        assert_eq!(answer(threads.run(|| 1)).await, Ok(1), "the one thread still works");
        assert_eq!(lock(&threads.state).threads, 1);
    }
}
