//! The store: records survive a reopen; databases it does not understand are refused and
//! left untouched.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::Path;

use dlsession_proto::{DurableEvent, ErrorCode, ErrorInfo, Header, LaunchSpec, SessionConfig, TaskSpec, TaskState};
use dlsessiond::model::{EventRecord, SessionRecord, TaskRecord};
use dlsessiond::store::{Op, Store, StoreError};

fn session() -> SessionRecord {
    SessionRecord {
        key: 7,
        identifier: "org.example.store".into(),
        config: SessionConfig {
            app_id: Some("org.example".into()),
            launch: Some(LaunchSpec::Command { argv: vec!["/bin/app".into(), "--bg".into(), "".into()] }),
            http_headers: vec![Header::new("X-A", "1"), Header::new("Authorization", "Bearer t")],
            bandwidth_limit: Some(4096),
            max_concurrent_tasks: Some(3),
            ..SessionConfig::default()
        },
        next_seq: 1,
        invalidating: false,
        cancelling: false,
        invalid: false,
        created_at: 1000,
        policy: dlsession_proto::SessionPolicy { allows_metered: false, ..Default::default() },
    }
}

fn task(id: u64) -> TaskRecord {
    let spec = TaskSpec {
        url: format!("https://example.org/{id}"),
        headers: vec![Header::new("Accept", "*/*")],
        description: Some("desc".into()),
        priority: 0.25,
        earliest_begin: Some(5),
        expected_sha256: Some([9; 32]),
        destination: Some("/tmp/x".into()),
        overwrite: true,
        expected_size: Some(10),
    };
    let mut rec = TaskRecord::new(id, 7, spec, dlsessiond::model::now_ms(), 0o640);
    rec.state = TaskState::Running;
    rec.bytes_expected = None;
    rec
}

/// Prunes the history; returns how many tasks went.
async fn prune(store: &Store, before: u64, keep: u64) -> u64 {
    let (tx, rx) = tokio::sync::oneshot::channel();
    store.prune_history(before, keep, move |result| {
        let _ = tx.send(result);
    });
    tokio::time::timeout(std::time::Duration::from_secs(60), rx).await.expect("the prune ended").unwrap().unwrap()
}

fn open(path: &Path) -> (Store, dlsessiond::store::Snapshot) {
    Store::open(path, |e| panic!("store failed: {e:?}")).unwrap()
}

#[tokio::test]
async fn records_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    {
        let (store, snap) = open(&db);
        assert!(snap.sessions.is_empty() && snap.tasks.is_empty());
        assert_eq!(snap.next_task_id, 1);
        assert_eq!(snap.seq_floor, 1, "a new database numbers events from 1");
        let mut t2 = task(2);
        let t3 = task(3);
        store.write(
            vec![
                Op::InsertSession(session()),
                Op::InsertTask(Box::new(task(1))),
                Op::InsertTask(Box::new(t2.clone())),
                Op::InsertTask(Box::new(t3)),
                Op::SetNextTaskId(10),
            ],
            None,
        );
        t2.state = TaskState::Waiting;
        t2.committed_offset = 77;
        t2.etag = Some("\"e\"".into());
        t2.last_error = Some(ErrorInfo::http(503, "busy"));
        t2.retry_at = Some(9999);
        // Downloaded again from zero after a spliced file failed its checksum (schema 16).
        t2.refetched = true;
        store.write(
            vec![
                Op::UpdateTask(Box::new(t2)),
                Op::Checkpoint { task: 1, offset: 55 },
                Op::InsertEvent(EventRecord {
                    session: 7,
                    seq: 1,
                    event: DurableEvent::FinishedDownloading { task: 3, location: "/c/3.download".into() },
                    created_at: 1,
                }),
                Op::InsertEvent(EventRecord {
                    session: 7,
                    seq: 2,
                    event: DurableEvent::Completed { task: 3, error: Some(ErrorInfo::new(ErrorCode::Cancelled, "c")) },
                    created_at: 2,
                }),
                Op::RetireTasks(vec![1]),
                // `invalidate_and_cancel` (schema 13).
                Op::UpdateSession(SessionRecord { invalidating: true, cancelling: true, ..session() }),
            ],
            None,
        );
        assert!(store.flush(std::time::Duration::from_secs(30)).await);
    }
    let (store, snap) = open(&db);
    let ending = SessionRecord { next_seq: 3, invalidating: true, cancelling: true, ..session() };
    assert_eq!(snap.sessions, vec![ending]);
    assert_eq!(snap.next_task_id, 10);
    let ids: Vec<u64> = snap.tasks.iter().map(|t| t.id).collect();
    assert_eq!(ids, vec![2, 3], "retired task 1 is not live");
    let t2 = &snap.tasks[0];
    assert_eq!(t2.state, TaskState::Waiting);
    assert_eq!(t2.committed_offset, 77);
    assert_eq!(t2.last_error, Some(ErrorInfo::http(503, "busy")));
    assert!(t2.refetched && !snap.tasks[1].refetched);
    assert_eq!(snap.tasks[1].state, TaskState::Queued, "running is stored as queued");
    assert_eq!(snap.tasks[1].expected_sha256, Some([9; 32]));
    assert_eq!(snap.events.len(), 2);
    let (retired, _) = store.load_task(1).await.unwrap().unwrap();
    assert!(retired.retired);
    assert_eq!(retired.committed_offset, 55);
    store
        .write(vec![Op::DeleteEvents { session: 7, seqs: vec![1, 2] }, Op::DeleteSession(7), Op::SetSeqFloor(3)], None);
    store.write(vec![Op::SetSeqFloor(2)], None);
    assert!(store.flush(std::time::Duration::from_secs(30)).await);
    drop(store);
    let (store, snap) = open(&db);
    assert!(snap.sessions.is_empty() && snap.tasks.is_empty() && snap.events.is_empty());
    assert_eq!(snap.next_task_id, 10, "task ids are never reused");
    assert_eq!(snap.seq_floor, 3, "sequence numbers of a deleted session are never reused (nor lowered)");
    // The deleted session's tasks stay in the history under its name; its key stays taken
    // and its identifier is free.
    let (kept, name) = store.load_task(1).await.unwrap().unwrap();
    assert_eq!((kept.id, name.as_str()), (1, "org.example.store (invalidated)"));
    assert_eq!(snap.next_session_key, 8, "the tombstone's key is not reused");
    store.write(vec![Op::InsertSession(SessionRecord { key: 8, ..session() })], None);
    // Pruning the history removes the tombstone with its last task.
    assert_eq!(prune(&store, u64::MAX, 0).await, 1);
    assert!(store.load_task(1).await.unwrap().is_none());
    drop(store);
    let (_, snap) = open(&db);
    assert_eq!(snap.sessions.iter().map(|s| s.key).collect::<Vec<_>>(), [8], "the new session under the old name");
    assert_eq!(snap.next_session_key, 9);
}

fn digest(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn refuses_a_newer_schema_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("CREATE TABLE future(x); PRAGMA user_version = 99;").unwrap();
    }
    let before = digest(&db);
    let err = Store::open(&db, |_| {}).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    assert!(err.to_string().contains("newer than this dlsessiond understands"), "{err}");
    assert_eq!(digest(&db), before);
}

#[test]
fn refuses_a_corrupt_file_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    std::fs::write(&db, b"this is not an SQLite database, just some bytes that look nothing like one".repeat(100))
        .unwrap();
    let before = digest(&db);
    let err = Store::open(&db, |_| {}).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("refusing to start"), "{err}");
    assert_eq!(digest(&db), before);
}

#[test]
fn refuses_another_applications_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("CREATE TABLE t(x); PRAGMA application_id = 1234;").unwrap();
    }
    let err = Store::open(&db, |_| {}).unwrap_err();
    assert!(matches!(err, StoreError::Foreign { found: 1234, .. }), "{err}");
}

#[tokio::test]
async fn a_burst_of_batches_commits_in_groups() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir.path().join("d.db"));
    store.write(vec![Op::InsertSession(session())], None);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for id in 1..=500u64 {
        let tx = tx.clone();
        store.write(vec![Op::InsertTask(Box::new(task(id)))], Some(Box::new(move |r| tx.send(r).unwrap())));
    }
    for _ in 0..500 {
        assert_eq!(rx.recv().await.unwrap(), Ok(()));
    }
    let (task, _) = store.load_task(500).await.unwrap().unwrap();
    assert_eq!(task.url, "https://example.org/500");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_deletes_only_retired_tasks_older_than_the_horizon() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    let (store, _) = open(&db);
    let day = 24 * 3600 * 1000;
    let now = dlsessiond::model::now_ms();
    let at = |id: u64, finished: Option<u64>, created: u64, retired: bool| TaskRecord {
        finished_at: finished,
        created_at: created,
        retired,
        ..task(id)
    };
    store.write(
        vec![
            Op::InsertSession(session()),
            // Retired long ago: goes.
            Op::InsertTask(Box::new(at(1, Some(now - 40 * day), now - 41 * day, true))),
            // Retired, created long ago but finished recently: stays.
            Op::InsertTask(Box::new(at(2, Some(now - day), now - 41 * day, true))),
            // Never finished (cancelled before starting), created long ago: goes.
            Op::InsertTask(Box::new(at(3, None, now - 40 * day, true))),
            // Old but live: never pruned.
            Op::InsertTask(Box::new(at(4, Some(now - 40 * day), now - 41 * day, false))),
        ],
        None,
    );
    assert_eq!(prune(&store, now - 30 * day, u64::MAX).await, 2);
    for (id, kept) in [(1, false), (2, true), (3, false), (4, true)] {
        assert_eq!(store.load_task(id).await.unwrap().is_some(), kept, "task {id}");
    }
}

/// The daemon deletes history older than `retired_history_days` when it starts.
#[test]
fn the_daemon_prunes_old_history_when_it_starts() {
    let env = dlsession_testkit::TestEnv::new();
    let db = env.database();
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    let day = 24 * 3600 * 1000;
    let now = dlsessiond::model::now_ms();
    let retired = |id: u64, finished: u64| TaskRecord {
        state: TaskState::Completed,
        finished_at: Some(finished),
        retired: true,
        ..task(id)
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (store, _) = open(&db);
        store.write(
            vec![
                Op::InsertSession(session()),
                Op::InsertTask(Box::new(retired(1, now - 40 * day))),
                Op::InsertTask(Box::new(retired(2, now - day))),
                Op::SetNextTaskId(3),
            ],
            None,
        );
        assert!(store.flush(std::time::Duration::from_secs(30)).await);
    });
    let daemon = dlsession_testkit::TestDaemon::start(&env);
    let shown = |id: u64| env.ctl(&["show", &id.to_string()]).status.code();
    dlsession_testkit::wait_for("the old task pruned", std::time::Duration::from_secs(10), || {
        (shown(1) == Some(1)).then_some(())
    });
    assert_eq!(shown(2), Some(0), "a task retired yesterday stays");
    drop(daemon);
}

/// History is also capped by count, newest kept; live tasks are never pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_pruned_by_count() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir.path().join("db"));
    let now = dlsessiond::model::now_ms();
    let mut ops = vec![Op::InsertSession(session())];
    for id in 1..=10u64 {
        let retired = id != 5;
        ops.push(Op::InsertTask(Box::new(TaskRecord {
            state: TaskState::Completed,
            finished_at: Some(now),
            retired,
            ..task(id)
        })));
    }
    store.write(ops, None);
    assert_eq!(prune(&store, 0, 3).await, 6);
    let mut kept = Vec::new();
    for id in 1..=10 {
        if store.load_task(id).await.unwrap().is_some() {
            kept.push(id);
        }
    }
    assert_eq!(kept, [5, 8, 9, 10], "the three newest retired tasks and the live one");
}

/// A big prune goes a chunk at a time: what is queued while it runs goes between its
/// chunks, not after the whole history went in one transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_prune_lets_writes_through_between_its_chunks() {
    let n = 50_000u64;
    let (_dir, store) = with_history(n).await;
    let (pruned_tx, mut pruned) = tokio::sync::oneshot::channel();
    store.prune_history(0, 10, move |result| {
        let _ = pruned_tx.send(result);
    });
    // Reads (which commit what was written before them) go between its chunks: one sees
    // the oldest task gone while the prune is still under way.
    let mut between = false;
    while !between {
        let gone = store.load_task(1).await.unwrap().is_none();
        match pruned.try_recv() {
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => between = gone,
            _ => break,
        }
    }
    assert!(between, "nothing went between the prune's chunks: it ran as one transaction");
    let deleted = tokio::time::timeout(std::time::Duration::from_secs(60), pruned).await.unwrap().unwrap().unwrap();
    assert_eq!(deleted, n - 10);
    for (id, kept) in [(1, false), (n - 10, false), (n - 9, true), (n, true)] {
        assert_eq!(store.load_task(id).await.unwrap().is_some(), kept, "task {id}");
    }
}

/// The session, and retired tasks `(id, finished_at)`.
fn history(tasks: impl Iterator<Item = (u64, u64)>) -> Vec<Op> {
    let mut ops = vec![Op::InsertSession(session())];
    ops.extend(tasks.map(|(id, finished)| {
        Op::InsertTask(Box::new(TaskRecord {
            state: TaskState::Completed,
            finished_at: Some(finished),
            retired: true,
            ..task(id)
        }))
    }));
    ops
}

/// A store holding `n` tasks retired now, ids 1 to `n`.
async fn with_history(n: u64) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir.path().join("db"));
    store.write(history((1..=n).map(|id| (id, dlsessiond::model::now_ms()))), None);
    assert!(store.flush(std::time::Duration::from_secs(60)).await);
    (dir, store)
}

/// The newest `keep` are counted among what the age limit leaves: a task finished today
/// stays when older ones with higher ids go by age (counted first, it went with them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_counts_what_the_age_limit_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir.path().join("db"));
    let (now, day) = (dlsessiond::model::now_ms(), 24 * 3600 * 1000);
    store.write(history([(1, now), (2, now - 40 * day), (3, now - 40 * day), (4, now - 40 * day)].into_iter()), None);
    assert_eq!(prune(&store, now - 30 * day, 3).await, 3);
    assert!(store.load_task(1).await.unwrap().is_some(), "the one task within both limits stays");
}

/// A prune goes on while writes keep coming (it ran only when nothing was queued, so a busy
/// daemon never pruned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_goes_on_while_writes_keep_coming() {
    let n = 10_000u64;
    let (_dir, store) = with_history(n).await;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    // About a thousand writes queued at all times: the queue is never empty.
    let queued = std::sync::Arc::new(AtomicU64::new(0));
    let busy = std::thread::spawn({
        let (store, stop, queued) = (store.clone(), std::sync::Arc::clone(&stop), std::sync::Arc::clone(&queued));
        move || {
            while !stop.load(Ordering::Relaxed) {
                if queued.load(Ordering::Relaxed) >= 1000 {
                    std::thread::yield_now();
                    continue;
                }
                queued.fetch_add(1, Ordering::Relaxed);
                let queued = std::sync::Arc::clone(&queued);
                store.write(
                    vec![Op::SetSeqFloor(1)],
                    Some(Box::new(move |_| {
                        queued.fetch_sub(1, Ordering::Relaxed);
                    })),
                );
            }
        }
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    store.prune_history(0, 10, move |result| {
        let _ = tx.send(result);
    });
    let pruned = tokio::time::timeout(std::time::Duration::from_secs(10), rx).await;
    stop.store(true, Ordering::Relaxed);
    busy.join().unwrap();
    assert_eq!(pruned.expect("the prune ended while writes kept coming").unwrap().unwrap(), n - 10);
}

/// Values a client or server chose are stored saturated, never wrapped: a timeout of
/// `u64::MAX` ms must not come back as 0 after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_values_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let mut s = session();
    s.config.timeout_for_request_ms = u64::MAX;
    s.config.timeout_for_resource_ms = u64::MAX - 1;
    s.config.bandwidth_limit = Some(u64::MAX);
    let t = TaskRecord {
        expected_size: Some(u64::MAX),
        bytes_expected: Some(u64::MAX),
        earliest_begin: Some(u64::MAX),
        resource_deadline: Some(u64::MAX),
        ..task(1)
    };
    {
        let (store, _) = open(&path);
        store.write(vec![Op::InsertSession(s), Op::InsertTask(Box::new(t))], None);
        assert!(store.flush(std::time::Duration::from_secs(30)).await);
    }
    let (_, snap) = open(&path);
    let c = &snap.sessions[0].config;
    assert_eq!(c.timeout_for_request_ms, i64::MAX as u64);
    assert_eq!(c.timeout_for_resource_ms, i64::MAX as u64);
    assert_eq!(c.bandwidth_limit, Some(i64::MAX as u64));
    let t = &snap.tasks[0];
    assert_eq!(t.expected_size, Some(i64::MAX as u64));
    assert_eq!(t.earliest_begin, Some(i64::MAX as u64));
    assert_eq!(t.resource_deadline, Some(i64::MAX as u64));
    assert_eq!(t.file_mode, 0o640);
}

/// Session keys are never reused: deleting the session with the highest key does not free
/// it for the next one (whose directory could be the old one's, had its removal been cut
/// short by a crash).
#[tokio::test]
async fn a_deleted_sessions_key_is_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let (store, snap) = open(&path);
        assert_eq!(snap.next_session_key, 1);
        store.write(vec![Op::InsertSession(session())], None);
        store.write(vec![Op::DeleteSession(7)], None);
        assert!(store.flush(std::time::Duration::from_secs(30)).await);
    }
    let (_, snap) = open(&path);
    assert!(snap.sessions.is_empty());
    assert_eq!(snap.next_session_key, 8, "after the deleted session's key");
}

/// A row holding a value this daemon does not know (an event kind, a task state, an upload
/// method, a negative id) stops the start with an error naming it: before, an unknown event
/// became `did_become_invalid` (telling the app its session ended), an unknown state
/// `suspended`, an unknown method a download.
#[tokio::test]
async fn a_row_with_an_unknown_value_is_refused_not_guessed() {
    let cases = [
        "UPDATE events SET kind = 'from_the_future'",
        "UPDATE tasks SET state = 'sleeping'",
        "UPDATE tasks SET upload_method = 'PATCH'",
        "UPDATE tasks SET id = -5",
        // Never replaced by a guess: a checksum check silently skipped, a finishing task
        // downloaded again, a mode wider than one, an error of another kind, a relaunch
        // dropped, an event of task 0.
        "UPDATE tasks SET expected_sha256 = x'00'",
        "UPDATE tasks SET phase = 'x'",
        "UPDATE tasks SET file_mode = 4095",
        "UPDATE tasks SET error_code = 'from_the_future', error_msg = 'x'",
        "UPDATE sessions SET launch_kind = 'teleport', launch_value = 'x'",
        "UPDATE events SET task_id = NULL",
    ];
    for change in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        stored_with_events(&path, vec![completed(1, None)]).await;
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(&format!("PRAGMA foreign_keys = OFF; {change};")).unwrap();
        drop(conn);
        match Store::open(&path, |_| {}) {
            Err(e) => assert!(e.to_string().contains("unknown"), "{change}: {e}"),
            Ok((_, snap)) => panic!("{change}: read as {:?} / {:?}", snap.tasks, snap.events),
        }
    }
}

/// Task 1's `completed` as event `seq` of session 7.
fn completed(seq: u64, error: Option<ErrorInfo>) -> EventRecord {
    EventRecord { session: 7, seq, event: DurableEvent::Completed { task: 1, error }, created_at: 1 }
}

/// A database at `path` holding session 7, its task 1 and `events`, durable (for tests that
/// then change it by hand).
async fn stored_with_events(path: &Path, events: Vec<EventRecord>) {
    let (store, _) = open(path);
    let mut ops = vec![Op::InsertSession(session()), Op::InsertTask(Box::new(task(1)))];
    ops.extend(events.into_iter().map(Op::InsertEvent));
    store.write(ops, None);
    assert!(store.flush(std::time::Duration::from_secs(30)).await);
}

/// A session whose stored next event number is not above its stored events (a database
/// edited by hand, or restored in part) gets it raised at load: the next event would
/// otherwise collide with a stored one, and its commit fail for ever, holding every write.
#[tokio::test]
async fn a_next_event_number_below_the_stored_events_is_raised() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    stored_with_events(&path, vec![completed(4, None), completed(5, None)]).await;
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("UPDATE sessions SET next_seq = 1").unwrap();
    drop(conn);
    let (store, snap) = Store::open(&path, |_| {}).unwrap();
    let s = snap.sessions.iter().find(|s| s.key == 7).unwrap();
    assert_eq!(s.next_seq, 6, "above the stored events");
    store.write(vec![Op::InsertEvent(completed(s.next_seq, None))], None);
    assert!(store.flush(std::time::Duration::from_secs(30)).await, "the next event is stored");
}

/// Event numbers are never reused: the events of a commit raise their session's next number,
/// each session once, so acknowledged (deleted) events leave it above them after a restart.
#[tokio::test]
async fn deleted_events_leave_the_next_event_number_above_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    stored_with_events(&path, vec![completed(1, None), completed(3, None), completed(2, None)]).await;
    let (store, snap) = open(&path);
    assert_eq!(snap.sessions[0].next_seq, 4);
    store.write(
        vec![Op::InsertEvent(completed(4, None)), Op::DeleteEvents { session: 7, seqs: vec![1, 2, 3, 4] }],
        None,
    );
    assert!(store.flush(std::time::Duration::from_secs(30)).await);
    drop(store);
    let (_, snap) = open(&path);
    assert!(snap.events.is_empty());
    assert_eq!(snap.sessions[0].next_seq, 5, "above every event the session ever had");
}

/// An error message stored before messages were bounded is cut like a new one when read:
/// whole, it could outgrow a frame and make its event undeliverable.
#[tokio::test]
async fn a_stored_error_message_is_bounded_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    stored_with_events(&path, vec![completed(1, Some(ErrorInfo::new(ErrorCode::InvalidUrl, "x")))]).await;
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE events SET error_msg = ?1", ["é".repeat(450_000)]).unwrap();
    drop(conn);
    let (_, snap) = Store::open(&path, |_| {}).unwrap();
    let DurableEvent::Completed { error: Some(e), .. } = &snap.events[0].event else { panic!("{:?}", snap.events) };
    assert!(e.message.len() <= dlsession_proto::MAX_ERROR_MESSAGE, "{} bytes", e.message.len());
}

/// Suspended tasks are not in the snapshot: it counts them per session, and they are read
/// by session, by task or all at once.
#[tokio::test]
async fn suspended_tasks_stay_on_disk_until_read() {
    use dlsessiond::store::Dormant;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    {
        let (store, _) = open(&db);
        let other = SessionRecord { key: 8, identifier: "org.example.other".into(), ..session() };
        let mut ops = vec![Op::InsertSession(session()), Op::InsertSession(other)];
        for id in 1..=5 {
            let mut t = task(id);
            t.session = if id <= 3 { 7 } else { 8 };
            t.state = if id == 2 { TaskState::Queued } else { TaskState::Suspended };
            ops.push(Op::InsertTask(Box::new(t)));
        }
        let mut retired = task(6);
        retired.state = TaskState::Suspended;
        ops.push(Op::InsertTask(Box::new(retired)));
        ops.push(Op::RetireTasks(vec![6]));
        store.write(ops, None);
        assert!(store.flush(std::time::Duration::from_secs(30)).await);
    }
    let (store, snap) = open(&db);
    let ids: Vec<u64> = snap.tasks.iter().map(|t| t.id).collect();
    assert_eq!(ids, vec![2], "only the task that is not suspended is read at start");
    let mut dormant = snap.dormant.clone();
    dormant.sort();
    assert_eq!(dormant, vec![(7, 2), (8, 2)], "the retired one is not counted");

    let read = |which: Dormant| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.load_dormant(which, move |r| {
            let _ = tx.send(r);
        });
        rx
    };
    let woken = read(Dormant::Sessions(vec![8])).await.unwrap().unwrap();
    assert_eq!(woken.sessions, Some(vec![8]));
    assert_eq!(woken.tasks.iter().map(|t| t.id).collect::<Vec<_>>(), vec![4, 5]);
    assert!(woken.tasks.iter().all(|t| t.state == TaskState::Suspended && t.url.ends_with(&t.id.to_string())));
    // By task: the task's session, all of its suspended tasks; a task that is not dormant
    // (queued, retired, unknown) names none.
    let woken = read(Dormant::OfTasks(vec![3, 2, 6, 99])).await.unwrap().unwrap();
    assert_eq!(woken.sessions, Some(vec![7]));
    assert_eq!(woken.tasks.iter().map(|t| t.id).collect::<Vec<_>>(), vec![1, 3]);
    let woken = read(Dormant::OfTasks(vec![2, 6, 99])).await.unwrap().unwrap();
    assert_eq!(woken.sessions, Some(vec![]));
    assert!(woken.tasks.is_empty());
    let woken = read(Dormant::All).await.unwrap().unwrap();
    assert_eq!(woken.sessions, None);
    let mut all: Vec<u64> = woken.tasks.iter().map(|t| t.id).collect();
    all.sort();
    assert_eq!(all, vec![1, 3, 4, 5]);
    let (tx, rx) = tokio::sync::oneshot::channel();
    store.dormant_ids(move |r| {
        let _ = tx.send(r);
    });
    let mut ids = rx.await.unwrap().unwrap();
    ids.sort();
    assert_eq!(ids, vec![(1, 7), (3, 7), (4, 8), (5, 8)]);
}

/// Damage `quick_check` finds but the start's reads do not touch: the store opens, then
/// its check fails before anything is written: the file stays as it was.
#[tokio::test]
async fn a_file_failing_the_check_after_opening_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    {
        let (store, _) = open(&db);
        let mut ops = vec![Op::InsertSession(session())];
        for id in 1..=400 {
            let mut t = task(id);
            t.state = TaskState::Completed;
            t.finished_at = Some(id);
            ops.push(Op::InsertTask(Box::new(t)));
        }
        store.write(ops, None);
        assert!(store.flush(std::time::Duration::from_secs(30)).await);
    }
    corrupt_index(&db, "tasks_retired_age");
    let before = digest(&db);
    let (health_tx, health_rx) = std::sync::mpsc::channel();
    let (store, snap) = Store::open(&db, move |h| {
        let _ = health_tx.send(h);
    })
    .unwrap();
    assert_eq!(snap.tasks.len(), 400, "the start's reads do not touch the damaged index");
    store.write(vec![Op::RetireTasks(vec![1])], None);
    // A read that waits for the check: answered "closed" when the check fails, not never.
    let (answers_tx, answers) = std::sync::mpsc::channel();
    let tx = answers_tx.clone();
    store.dormant_ids(move |r| {
        let _ = tx.send(matches!(r, Err(dlsessiond::store::StoreError::Closed)));
    });
    let health = health_rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
    let dlsessiond::store::Health::Corrupt(message) = health else { panic!("{health:?}") };
    assert!(message.contains("corrupt") && message.contains("refusing to start"), "{message}");
    assert!(!store.flush(std::time::Duration::from_secs(5)).await, "nothing is written after a failed check");
    // A read sent after the database thread stopped: the same.
    store.load_dormant(dlsessiond::store::Dormant::All, move |r| {
        let _ = answers_tx.send(matches!(r, Err(dlsessiond::store::StoreError::Closed)));
    });
    for which in ["the read waiting for the check", "the read after the thread stopped"] {
        let closed = answers.recv_timeout(std::time::Duration::from_secs(5));
        assert_eq!(closed, Ok(true), "{which} is answered Closed");
    }
    drop(store);
    assert_eq!(digest(&db), before);
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Overwrites the b-tree header of `index`'s root page, as a bad sector would.
fn corrupt_index(db: &Path, index: &str) {
    let (page, size): (i64, i64) = {
        let c = rusqlite::Connection::open(db).unwrap();
        // Everything into the main file first: a page left in the WAL would hide the damage,
        // and the store that wrote it may still be closing (and checkpointing) on its thread.
        for _ in 0..100 {
            let busy: i64 = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).unwrap();
            if busy == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let page = c.query_row("SELECT rootpage FROM sqlite_schema WHERE name = ?1", [index], |r| r.get(0)).unwrap();
        let size = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        (page, size)
    };
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    f.seek(SeekFrom::Start(((page - 1) * size) as u64)).unwrap();
    f.write_all(&[0x42; 16]).unwrap();
    f.sync_all().unwrap();
}

/// Runs dlsessiond in `env` with `failpoint` and waits (20 s at most) for it to exit
/// unsuccessfully; its stderr. `why` says what it would have kept running despite.
fn refused(env: &dlsession_testkit::TestEnv, failpoint: &str, why: &str) -> String {
    // A file, not a pipe nobody reads while it runs (a full pipe would block the logging).
    let log = env.path().join("refused.log");
    let mut child = env
        .command(dlsession_testkit::bin_path("dlsessiond"))
        .env("DLSESSIOND_FAILPOINT", failpoint)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("dlsessiond kept running {why}:\n{}", read(&log));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!child.wait().unwrap().success());
    read(&log)
}

/// The daemon on a file whose damage only `quick_check` finds: it exits with the refusal,
/// the file untouched, and the queued task it read never started.
#[test]
fn the_daemon_refuses_a_file_failing_the_check_without_touching_anything() {
    let env = dlsession_testkit::TestEnv::new();
    let db = env.database();
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    server.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (store, _) = open(&db);
        let mut ops = vec![Op::InsertSession(session())];
        for id in 1..=400 {
            ops.push(Op::InsertTask(Box::new(TaskRecord {
                state: TaskState::Completed,
                finished_at: Some(id),
                ..task(id)
            })));
        }
        let mut queued = task(401);
        queued.state = TaskState::Queued;
        queued.url = format!("http://{}/never", server.local_addr().unwrap());
        queued.destination = None;
        queued.expected_sha256 = None;
        ops.push(Op::InsertTask(Box::new(queued)));
        ops.push(Op::SetNextTaskId(402));
        store.write(ops, None);
        assert!(store.flush(std::time::Duration::from_secs(30)).await);
    });
    corrupt_index(&db, "tasks_retired_age");
    let before = digest(&db);
    // The check takes a second: time enough for the queued task to start, were it not held.
    let stderr = refused(&env, "database-check:1:sleep-ms=1000", "on a file that fails quick_check");
    assert!(stderr.contains("stopping: the database failed its check"), "refused after the start: {stderr}");
    assert!(stderr.contains("corrupt") && stderr.contains("refusing to start"), "{stderr}");
    assert_eq!(digest(&db), before, "not written");
    assert!(server.accept().is_err(), "the queued task never started");
}

/// A check that ends without an answer (here its thread panics at a failpoint) stops the
/// daemon with a refusal: it never goes on to write to a file it could not check.
#[test]
fn the_daemon_refuses_to_go_on_when_the_check_cannot_finish() {
    let env = dlsession_testkit::TestEnv::new();
    let db = env.database();
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (store, _) = open(&db);
        store.write(vec![Op::InsertSession(session())], None);
        assert!(store.flush(std::time::Duration::from_secs(30)).await);
    });
    let stderr = refused(&env, "database-check:1:panic", "after its check ended without an answer");
    assert!(stderr.contains("the check ended without an answer") && stderr.contains("refusing to start"), "{stderr}");
}

/// A resumed task is stored by its state, deadline and retry alone; the rest of its row
/// stays as it was.
#[tokio::test]
async fn a_resumed_task_is_stored_queued() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    let mut t = task(4);
    t.state = TaskState::Suspended;
    t.retry_at = Some(123);
    {
        let (store, _) = open(&db);
        store.write(vec![Op::InsertSession(session()), Op::InsertTask(Box::new(t.clone()))], None);
        store.write(vec![Op::Queued { task: 4, resource_deadline: Some(77) }], None);
        assert!(store.flush(std::time::Duration::from_secs(30)).await);
    }
    let (_, snap) = open(&db);
    let stored = snap.tasks.iter().find(|r| r.id == 4).expect("live, not dormant");
    assert_eq!((stored.state, stored.resource_deadline, stored.retry_at), (TaskState::Queued, Some(77), None));
    let expected =
        dlsessiond::model::TaskRecord { state: TaskState::Queued, resource_deadline: Some(77), retry_at: None, ..t };
    assert_eq!(*stored, expected, "nothing else changed");
}

/// Creation keys (`Request::Once`) survive a reopen for a day: older ones are dropped by
/// the next save and never loaded; a deleted session's go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_keys_are_kept_a_day() {
    use dlsessiond::model::{CREATION_KEPT_MS, Creation, now_ms};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    let now = now_ms();
    let c = |session, key, first, created_at| Creation { session, key, first, count: 3, created_at };
    {
        let (store, _) = open(&db);
        let other = SessionRecord { key: 8, identifier: "org.example.other".into(), ..session() };
        store.write(vec![Op::InsertSession(session()), Op::InsertSession(other)], None);
        store.write(vec![Op::SaveCreation(c(7, 1, 10, now - CREATION_KEPT_MS - 1))], None);
        store.write(vec![Op::SaveCreation(c(7, u128::MAX, 20, now)), Op::SaveCreation(c(8, 2, 30, now))], None);
        store.write(vec![Op::DeleteSession(8)], None);
        assert!(store.flush(std::time::Duration::from_secs(30)).await);
    }
    let (_, snap) = open(&db);
    assert_eq!(snap.creations, vec![c(7, u128::MAX, 20, now)]);
    let rows: i64 =
        rusqlite::Connection::open(&db).unwrap().query_row("SELECT count(*) FROM creations", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 1, "the old key and the deleted session's are gone from the file");
}
