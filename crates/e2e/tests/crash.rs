//! Killing the daemon in the middle of a download loses nothing: the restart resumes
//! from the last durable checkpoint with a Range request, and the file is byte-exact.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use dlsession::{DownloadRequest, Session, SessionConfiguration};
use dlsession_testkit::{Fault, Hits, Resource, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex};
use dlsession_testkit::{LONG, Recorder, Seen};

const LEN: u64 = 48 << 20;
const RATE: u64 = 12 << 20;

async fn start_download(
    env: &TestEnv,
    server: &TestServer,
    id: &str,
) -> (Session, dlsession_testkit::Events, dlsession::DownloadTask) {
    let (delegate, events) = Recorder::new(&env.path().join("out"));
    let session = Session::attach(SessionConfiguration::background(id).socket(&env.socket), delegate).await.unwrap();
    let task = session.download_task(DownloadRequest::new(server.url("/big.bin"))).await.unwrap();
    task.resume().await.unwrap();
    (session, events, task)
}

/// Waits until the task has at least `bytes` on the daemon's side.
async fn wait_for_bytes(events: &mut dlsession_testkit::Events, task: u64, bytes: u64) {
    events
        .wait("progress", LONG, |e| matches!(e, Seen::Progress { task: t, total } if *t == task && *total >= bytes))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_download_resumes_from_the_checkpoint() {
    let env = TestEnv::new();
    let mut daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/big.bin", Resource::generated(LEN, 99).throttle(RATE));
    let (session, mut events, task) = start_download(&env, &server, "test.kill").await;
    wait_for_bytes(&mut events, task.id(), LEN / 3).await;
    let sent_before_kill = server.bytes_sent("/big.bin");
    daemon.kill9();
    drop(session);
    daemon.restart();

    // The app rejoins after the crash and sees the resume and the result.
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let _session =
        Session::attach(SessionConfiguration::background("test.kill").socket(&env.socket), delegate).await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let file = events.moved_to(task.id()).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(99, LEN)));

    let requests = server.requests_for("/big.bin");
    assert_eq!(requests.len(), 2, "{requests:?}");
    let range = requests[1].range.clone().expect("the restart sends Range");
    let offset: u64 = range.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    assert!(offset > 0 && offset <= sent_before_kill, "resumed at {offset}, {sent_before_kill} were sent");
    assert_eq!(requests[1].if_range.as_deref(), Resource::generated(LEN, 99).etag_value());
    let resumed = events.seen.iter().find_map(|e| match e {
        Seen::Resumed { task: t, offset } if *t == task.id() => Some(*offset),
        _ => None,
    });
    assert_eq!(resumed, Some(offset), "resumed_at_offset reports the same offset");
    // Re-downloaded bytes are bounded by the checkpoint window (200 ms at 12 MiB/s in
    // the test config, plus what was in flight in buffers).
    let redownloaded = server.bytes_sent("/big.bin") - LEN;
    eprintln!("SIGKILL at {sent_before_kill} bytes sent; resumed at {offset}; re-downloaded {redownloaded} bytes");
    assert!(redownloaded <= 8 << 20, "re-downloaded {redownloaded} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_checkpoints_and_the_restart_continues() {
    let env = TestEnv::new();
    let mut daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/big.bin", Resource::generated(LEN, 5).throttle(RATE));
    let (session, mut events, task) = start_download(&env, &server, "test.term").await;
    wait_for_bytes(&mut events, task.id(), LEN / 4).await;
    let status = daemon.terminate();
    assert!(status.success(), "clean exit: {status}");
    drop(session);
    let sent_before = server.bytes_sent("/big.bin");
    daemon.restart();
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let _session =
        Session::attach(SessionConfiguration::background("test.term").socket(&env.socket), delegate).await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(5, LEN)));
    let requests = server.requests_for("/big.bin");
    let range = requests.last().unwrap().range.clone().expect("Range after restart");
    let offset: u64 = range.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    // SIGTERM syncs everything received: at most what was in flight is fetched again.
    assert!(offset + (2 << 20) >= sent_before, "resumed at {offset}, {sent_before} had been sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_queued_at_a_crash_run_after_the_restart() {
    let env = TestEnv::new();
    let mut daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    for i in 0..5 {
        server.add(&format!("/f{i}"), Resource::generated(256 << 10, i).throttle(1 << 20));
    }
    let (delegate, _events) = Recorder::new(&env.path().join("out"));
    let session =
        Session::attach(SessionConfiguration::background("test.queue").socket(&env.socket), delegate).await.unwrap();
    let reqs = (0..5).map(|i| DownloadRequest::new(server.url(&format!("/f{i}")))).collect();
    let tasks = session.download_tasks(reqs, true).await.unwrap();
    // Acknowledged means durable: kill at once.
    daemon.kill9();
    drop(session);
    daemon.restart();
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let _session =
        Session::attach(SessionConfiguration::background("test.queue").socket(&env.socket), delegate).await.unwrap();
    for (i, t) in tasks.iter().enumerate() {
        assert_eq!(events.completion(t.id(), LONG).await, None);
        let file = events.moved_to(t.id()).unwrap();
        assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(i as u64, 256 << 10)));
    }
    let _ = Duration::ZERO;
}

/// A small body is held in memory until it has arrived, but never longer than the
/// checkpoint interval: a slow one is then written and synced like any other, so a crash
/// halfway keeps what had arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_small_download_checkpoints_on_time() {
    let env = TestEnv::new();
    env.set_config("checkpoint_interval_ms", "200");
    let mut daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = 300_000u64;
    server.add("/big.bin", Resource::generated(len, 72).throttle(60_000));
    let (session, mut events, task) = start_download(&env, &server, "test.slow-small").await;
    wait_for_bytes(&mut events, task.id(), 150_000).await;
    // Two intervals more: the hold ended and a checkpoint was committed meanwhile.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(server.bytes_sent("/big.bin") < len, "the body was complete before the kill: nothing tested");
    daemon.kill9();
    drop(session);
    daemon.restart();
    let (delegate, mut events) = Recorder::new(&env.path().join("out2"));
    let _session = Session::attach(SessionConfiguration::background("test.slow-small").socket(&env.socket), delegate)
        .await
        .unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(72, len)));
    let requests = server.requests_for("/big.bin");
    let range = requests.get(1).and_then(|r| r.range.clone()).expect("the restart sends Range");
    let offset: u64 = range.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    assert!(offset >= 100_000, "resumed at {offset}: what arrived before the crash was not kept");
}

/// Body frames go to the writer as they arrive (batched only with what is already there):
/// what arrived before the server fell silent is in the partial file at once, not held in
/// memory until more comes (or the idle timeout ends the attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_arrived_before_a_stall_is_written_at_once() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    // Larger than a small body (held whole), smaller than where direct writes begin.
    let sent = 1_500_000u64;
    server.add("/big.bin", Resource::generated(4 << 20, 73).fault(Hits::All, Fault::StallAfter(sent)));
    let (_session, mut events, task) = start_download(&env, &server, "test.stall-write").await;
    wait_for_bytes(&mut events, task.id(), sent).await;
    let part = env.downloads_dir().join("s1").join(format!("{}.part", task.id()));
    dlsession_testkit::wait_for("the bytes before the stall in the partial file", Duration::from_secs(10), || {
        (std::fs::metadata(&part).ok()?.len() >= sent).then_some(())
    });
}

/// A fast connection waits in the kernel until a worthwhile read has arrived (a low-water
/// mark, see `engine::reads`); a server that falls silent under the mark must not strand
/// what it sent: the mark is lifted and every byte sent reaches the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_download_whose_server_falls_silent_gets_every_byte_sent() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    // Fast enough for the largest mark; the stall leaves a piece smaller than it.
    let sent = (40 << 20) + 100_000;
    server.add(
        "/big.bin",
        Resource::generated(96 << 20, 74).throttle(200 << 20).fault(Hits::All, Fault::StallAfter(sent)),
    );
    let (_session, mut events, task) = start_download(&env, &server, "test.stall-mark").await;
    tokio::time::timeout(Duration::from_secs(20), wait_for_bytes(&mut events, task.id(), sent))
        .await
        .expect("the bytes sent before the server fell silent reached the daemon");
}

/// A finished file in the cache stays until its `finished_downloading` is acknowledged,
/// across a restart, even when the app acknowledged the task's `completed` first (which
/// retires the task): the start-up sweep deleted it, and the replayed event named nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_file_stays_for_its_unacknowledged_event_across_a_restart() {
    use dlsession::proto::{DurableEvent, Event, Request, ServerMessage, TaskSpec};
    let env = TestEnv::new();
    let mut d = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/c", Resource::generated(3000, 41));
    let attach =
        |n: u64| (n, Request::Attach { identifier: "t.cached".into(), config: Default::default(), takeover: false });
    let mut app = dlsession_testkit::raw::RawClient::connect(&env.socket);
    app.send([
        attach(1),
        (
            2,
            Request::CreateTasks {
                identifier: "t.cached".into(),
                tasks: vec![TaskSpec::get(server.url("/c"))],
                resume: true,
            },
        ),
    ]);
    let (mut location, mut completed) = (None, None);
    while location.is_none() || completed.is_none() {
        match app.recv() {
            ServerMessage::Event(Event::Durable {
                event: DurableEvent::FinishedDownloading { location: l, .. },
                ..
            }) => {
                location = Some(l);
            }
            ServerMessage::Event(Event::Durable { seq, event: DurableEvent::Completed { .. }, .. }) => {
                completed = Some(seq)
            }
            _ => {}
        }
    }
    let location = std::path::PathBuf::from(location.unwrap());
    app.send([(3, Request::AckEvents { identifier: "t.cached".into(), seqs: vec![completed.unwrap()] })]);
    loop {
        if let ServerMessage::Response { id: 3, .. } = app.recv() {
            break;
        }
    }
    drop(app);
    assert!(d.terminate().success());
    d.restart();
    let mut app = dlsession_testkit::raw::RawClient::connect(&env.socket);
    app.send([attach(1)]);
    loop {
        match app.recv() {
            ServerMessage::Event(Event::Durable {
                event: DurableEvent::FinishedDownloading { location: l, .. },
                ..
            }) => {
                assert_eq!(std::path::PathBuf::from(l), location);
                break;
            }
            ServerMessage::Event(Event::FinishedEvents { .. }) => panic!("the event was not replayed"),
            _ => {}
        }
    }
    // The sweep runs off the start path: give it time, then the file must still be there.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(sha256_file(&location).unwrap(), to_hex(&pattern_sha256(41, 3000)));
}

/// `invalidate_and_cancel` is answered before a running task has stopped (its last sync
/// held here for half a minute). A daemon killed in that window cancels the task at its
/// next start: it is not downloaded again, and the session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_cancel_holds_across_a_crash_before_the_task_stopped() {
    let env = TestEnv::new();
    // No checkpoint but the stop's: the failpoint holds exactly that one.
    env.set_config("checkpoint_bytes", "1073741824");
    env.set_config("checkpoint_interval_ms", "600000");
    let hold = std::ffi::OsStr::new("checkpoint-after-sync:1:sleep-ms=30000");
    let mut d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", hold)]);
    let server = TestServer::start().await.unwrap();
    server.add("/big.bin", Resource::generated(LEN, 12).throttle(RATE));
    let (session, mut events, task) = start_download(&env, &server, "t.cancel-crash").await;
    wait_for_bytes(&mut events, task.id(), 1 << 20).await;
    session.invalidate_and_cancel().await.unwrap();
    d.kill9();
    d.set_env(&[]);
    d.restart();
    let error = events.completion(task.id(), LONG).await.expect("completes with an error");
    assert_eq!(error.code, dlsession::ErrorCode::Cancelled, "{error}");
    events.wait("did_become_invalid", LONG, |e| matches!(e, Seen::Invalid)).await;
    assert_eq!(server.hits("/big.bin"), 1, "not downloaded again after the restart");
    assert!(d.log().contains("cancelling what invalidate_and_cancel left running"), "{}", d.log());
}

/// A download of 300,000 bytes of pattern `seed` to `name` in `env`'s directory, its file
/// moved into place (marked) while its completion is held back by a failpoint; then
/// `invalidate_and_cancel` is answered and the daemon killed (its failpoint dropped for the
/// next start).
async fn delivered_then_invalidated_and_killed(env: &TestEnv, name: &str, seed: u64) -> Delivered {
    let hold = std::ffi::OsStr::new("finish-after-move:1:sleep-ms=30000");
    let mut d = TestDaemon::start_with_env(env, &[("DLSESSIOND_FAILPOINT", hold)]);
    let server = TestServer::start().await.unwrap();
    let path = format!("/{name}");
    server.add(&path, Resource::generated(300_000, seed));
    let dest = env.path().join(name);
    let (delegate, events) = Recorder::new(&env.path().join("out"));
    let config = SessionConfiguration::background(format!("t.{name}")).socket(&env.socket);
    let session = Session::attach(config, delegate).await.unwrap();
    let request = DownloadRequest::new(server.url(&path)).destination(&dest);
    let task = session.download_tasks(vec![request], true).await.unwrap().remove(0);
    dlsession_testkit::wait_until(|| dest.exists()).await;
    session.invalidate_and_cancel().await.unwrap();
    d.kill9();
    d.set_env(&[]);
    Delivered { daemon: d, server, _session: session, events, task: task.id(), dest }
}

/// What `delivered_then_invalidated_and_killed` leaves: the app's session stays alive to
/// hear what the next start does.
struct Delivered {
    daemon: TestDaemon,
    server: TestServer,
    _session: Session,
    events: dlsession_testkit::Events,
    task: u64,
    dest: std::path::PathBuf,
}

/// `invalidate_and_cancel` reaches a task whose file is already at its destination (marked)
/// while its completion is not committed, and the daemon is killed then. At the next start
/// the file is found in place and the task completes with it, as it would have without the
/// stop: it is not cancelled with its file left there, owned by nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_delivered_before_a_crash_is_not_cancelled_by_invalidate_and_cancel() {
    let env = TestEnv::new();
    let Delivered { daemon: mut d, server, _session, mut events, task, dest: _ } =
        delivered_then_invalidated_and_killed(&env, "delivered.bin", 13).await;
    d.restart();
    assert_eq!(events.completion(task, LONG).await, None, "completed with its file");
    assert_eq!(sha256_file(&events.moved_to(task).unwrap()).unwrap(), to_hex(&pattern_sha256(13, 300_000)));
    events.wait("did_become_invalid", LONG, |e| matches!(e, Seen::Invalid)).await;
    assert_eq!(server.hits("/delivered.bin"), 1, "not downloaded again");
}

/// The same, but the start's look hangs (a hung mount, here a failpoint): the task held for
/// the look's answer is cancelled after `disk_check_timeout`, not held for ever, and the
/// session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_look_at_start_does_not_hold_invalidate_and_cancel_for_ever() {
    let env = TestEnv::new();
    let Delivered { daemon: mut d, server: _server, _session, mut events, task, dest } =
        delivered_then_invalidated_and_killed(&env, "hung.bin", 14).await;
    env.set_config("disk_check_timeout_ms", "1000");
    d.set_env(&[("DLSESSIOND_FAILPOINT", std::ffi::OsStr::new("look-in-place:1:sleep-ms=60000"))]);
    d.restart();
    let error = events.completion(task, Duration::from_secs(20)).await.expect("cancelled");
    assert_eq!(error.code, dlsession::ErrorCode::Cancelled, "{error}");
    events.wait("did_become_invalid", LONG, |e| matches!(e, Seen::Invalid)).await;
    assert!(dest.exists(), "the file found too late stays where it is");
}

/// A task recorded as finishing (its file goes to another filesystem, where a copy carries
/// no mark) when `invalidate_and_cancel` is answered and the daemon killed: at the next
/// start its move is started again, and if that move fails (a file now at the destination)
/// it completes `cancelled` and the session ends, as it would have without the stop.
/// Before, it waited to move again for ever and the session never ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finishing_task_of_a_cancelled_session_ends_if_its_move_fails_after_a_restart() {
    // A second filesystem for the destination (every Linux with a tmpfs has one): without
    // it the test could not run, and says so instead of passing.
    let shm = std::path::Path::new("/dev/shm");
    assert!(shm.is_dir(), "this test needs /dev/shm (a tmpfs) as a second filesystem for the destination");
    let env = TestEnv::new();
    // The second move: the first finds the destination on another filesystem before any
    // rename, and the finish is recorded; the second copies.
    let hold = std::ffi::OsStr::new("finish-before-move:2:sleep-ms=30000");
    let mut d = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", hold)]);
    let server = TestServer::start().await.unwrap();
    server.add("/f.bin", Resource::generated(300_000, 47));
    let elsewhere = tempfile::tempdir_in(shm).unwrap();
    let dest = elsewhere.path().join("f.bin");
    let (delegate, mut events) = Recorder::new(&env.path().join("out"));
    let config = SessionConfiguration::background("t.finishing-cancelled").socket(&env.socket);
    let session = Session::attach(config, delegate).await.unwrap();
    let request = DownloadRequest::new(server.url("/f.bin")).destination(&dest);
    let task = session.download_tasks(vec![request], true).await.unwrap().remove(0);
    dlsession_testkit::wait_for("the recorded move", LONG, || {
        d.log().contains("failpoint finish-before-move reached; pausing").then_some(())
    });
    session.invalidate_and_cancel().await.unwrap();
    d.kill9();
    std::fs::write(&dest, b"someone else's file").unwrap();
    d.set_env(&[]);
    d.restart();
    let error = events.completion(task.id(), LONG).await.expect("completes with an error");
    assert_eq!(error.code, dlsession::ErrorCode::Cancelled, "{error}");
    events.wait("did_become_invalid", LONG, |e| matches!(e, Seen::Invalid)).await;
    assert_eq!(std::fs::read(&dest).unwrap(), b"someone else's file", "left alone");
}
