//! Breaking things on purpose (docs/behaviour.md, "Retries and resume", "Durability"): hostile servers, a faulty proxy in front of
//! nginx, disk faults, and crashes between the durability steps. Every case ends in a
//! byte-exact file or a clear error, never a spliced file or a lost task.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::ffi::OsStr;
use std::time::Duration;

use dlsession::proto::WaitReason;
use dlsession::{DownloadRequest, ErrorCode, SessionConfiguration, TaskState};
use dlsession_testkit::app::attach;
use dlsession_testkit::host::is_root;
use dlsession_testkit::{
    Fault, Hits, Mount, Nginx, ProxyFault, Resource, TestCa, TestDaemon, TestEnv, TestProxy, TestServer,
    pattern_sha256, sha256_file, to_hex,
};
use dlsession_testkit::{LONG, Seen};

fn offset_of(range: Option<&str>) -> u64 {
    range.map_or(0, |r| r.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap())
}

// ---------------------------------------------------------------- hostile servers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_servers_end_in_exact_files_or_clear_errors() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 3u64 << 20;
    let r = |seed| Resource::generated(len, seed);
    // Stall: no byte for longer than timeout_for_request, then it works.
    s.add("/stall", r(1).fault(Hits::Nth(1), Fault::StallAfter(1 << 20)));
    // Content-Length longer than the body, then shorter bodies.
    s.add("/long-cl", r(2).fault(Hits::Nth(1), Fault::LongContentLength(1000)));
    s.add("/short", r(3).fault(Hits::Nth(1), Fault::ShortBody(1 << 20)));
    // A reset, then a 206 whose Content-Range starts elsewhere: must restart from zero.
    s.add(
        "/bad-range",
        r(4).fault(Hits::Nth(1), Fault::ResetAfter(1 << 20)).fault(Hits::Nth(2), Fault::WrongContentRange),
    );
    // A reset, then a multipart answer to the one range asked for: from zero again.
    s.add(
        "/multipart",
        r(12)
            .with_header("Content-Type", "multipart/byteranges; boundary=x")
            .fault(Hits::Nth(1), Fault::ResetAfter(1 << 20)),
    );
    // A reset, then 200 instead of 206: the whole body again from zero.
    s.add("/no-206", r(5).fault(Hits::Nth(1), Fault::ResetAfter(1 << 20)).fault(Hits::Nth(2), Fault::IgnoreRange));
    // The server closes before sending headers, then behaves.
    s.add("/close", r(6).fault(Hits::Nth(1), Fault::CloseBeforeHeaders));
    // A response head far larger than any real one: a clear error, not a retry loop.
    s.add("/huge", r(7).fault(Hits::All, Fault::HugeHeaders(2 << 20)));
    // A slow drip, never idle long enough to time out.
    s.add("/drip", Resource::generated(6000, 8).throttle(3000));
    // A 2xx that is not the file: a 202's page, and a 204 answering a resume.
    let not_the_file = |code| Fault::Status { code, retry_after: None };
    s.add("/accepted", r(9).fault(Hits::All, not_the_file(202)));
    s.add("/no-content", r(10).fault(Hits::Nth(1), Fault::ResetAfter(1 << 20)).fault(Hits::All, not_the_file(204)));
    // A 206 to a request for the whole file, starting elsewhere: no attempt would do better.
    s.add("/bad-whole", r(11).whole_as_206().fault(Hits::All, Fault::WrongContentRange));

    let config = SessionConfiguration::background("t.hostile").timeout_for_request(Duration::from_millis(700));
    let (session, mut events) = attach(&env, config).await;
    let paths = [
        "/stall",
        "/long-cl",
        "/short",
        "/bad-range",
        "/no-206",
        "/close",
        "/huge",
        "/drip",
        "/accepted",
        "/no-content",
        "/bad-whole",
        "/multipart",
    ];
    let reqs = paths.iter().map(|p| DownloadRequest::new(s.url(p))).collect();
    let tasks = session.download_tasks(reqs, true).await.unwrap();
    let by = |p: &str| tasks[paths.iter().position(|x| *x == p).unwrap()].id();
    let exact = [
        ("/stall", 1),
        ("/long-cl", 2),
        ("/short", 3),
        ("/bad-range", 4),
        ("/no-206", 5),
        ("/close", 6),
        ("/multipart", 12),
    ];
    for (p, seed) in exact {
        assert_eq!(events.completion(by(p), LONG).await, None, "{p}");
        let file = events.moved_to(by(p)).unwrap();
        assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(seed, len)), "{p} is byte-exact");
    }
    assert_eq!(events.completion(by("/drip"), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(by("/drip")).unwrap()).unwrap(), to_hex(&pattern_sha256(8, 6000)));

    let huge = events.completion(by("/huge"), LONG).await.unwrap();
    assert_eq!(huge.code, ErrorCode::Network, "{huge}");
    assert_eq!(s.hits("/huge"), 1, "not retried");
    let whole = events.completion(by("/bad-whole"), LONG).await.unwrap();
    assert_eq!(whole.code, ErrorCode::Network, "{whole}");
    assert!(whole.message.contains("malformed response to a request for the whole file"), "{whole}");
    assert_eq!(s.hits("/bad-whole"), 1, "not retried");
    for (p, code, hits) in [("/accepted", 202, 1), ("/no-content", 204, 2)] {
        let error = events.completion(by(p), LONG).await.expect("not the file: an error");
        assert_eq!((error.code, error.http_status), (ErrorCode::HttpStatus, Some(code)), "{p}: {error}");
        assert!(error.message.contains("with no file"), "{p}: {error}");
        assert_eq!(events.moved_to(by(p)), None, "{p}: no file handed over");
        assert_eq!(s.hits(p), hits, "{p}");
    }

    // The stall resumed where the synced data ended.
    let stall = s.requests_for("/stall");
    assert_eq!(stall.len(), 2);
    assert!(offset_of(stall[1].range.as_deref()) > 0, "{stall:?}");
    // After the wrong Content-Range the partial data was dropped: the third request
    // starts from zero.
    let bad = s.requests_for("/bad-range");
    assert_eq!(bad.len(), 3, "{bad:?}");
    assert!(offset_of(bad[1].range.as_deref()) > 0);
    assert_eq!(offset_of(bad[2].range.as_deref()), 0);
    // ... and the app was told its data was discarded (resumed at offset 0).
    assert!(
        events.seen.iter().any(|e| matches!(e, Seen::Resumed { task, offset: 0 } if *task == by("/bad-range"))),
        "{:?}",
        events.seen
    );
    // The multipart answer was not appended: the third request starts from zero.
    let multipart = s.requests_for("/multipart");
    assert_eq!(multipart.len(), 3, "{multipart:?}");
    assert!(offset_of(multipart[1].range.as_deref()) > 0);
    assert_eq!(offset_of(multipart[2].range.as_deref()), 0);
    // The 200-instead-of-206 restart is reported as resumed at offset 0.
    assert!(events.seen.iter().any(|e| matches!(e, Seen::Resumed { task, offset: 0 } if *task == by("/no-206"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_resource_is_never_spliced() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    s.add("/doc", Resource::generated(len, 10).etag("\"v1\"").fault(Hits::Nth(1), Fault::ResetAfter(2 << 20)));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.changed")).await;
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/doc"))], true).await.unwrap().remove(0);
    // Between the attempts the document changes (new content, new ETag).
    dlsession_testkit::wait_until(|| s.hits("/doc") >= 1).await;
    s.add("/doc", Resource::generated(len, 11).etag("\"v2\"").throttle(8 << 20));
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let file = events.moved_to(task.id()).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(11, len)), "entirely the new version");
    let second = &s.requests_for("/doc")[1];
    assert_eq!(second.if_range.as_deref(), Some("\"v1\""), "the resume was conditional on the old ETag");
    assert!(events.seen.iter().any(|e| matches!(e, Seen::Resumed { task: t, offset: 0 } if *t == task.id())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_splice_the_checksum_refuses_is_downloaded_again_once_from_zero() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    // The server changes the document but keeps its ETag: the resume's `If-Range` cannot
    // tell, and the bytes after the cut are the new version's.
    let lying = |path: &str, first_seed| {
        s.add(
            path,
            Resource::generated(len, first_seed).etag("\"v1\"").fault(Hits::Nth(1), Fault::ResetAfter(2 << 20)),
        );
    };
    lying("/doc", 20);
    lying("/other", 22);
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.splice")).await;
    // One expects the new version; one a file no response will ever give.
    let new_version = DownloadRequest::new(s.url("/doc")).expected_sha256(pattern_sha256(21, len));
    let never = DownloadRequest::new(s.url("/other")).expected_sha256([7; 32]);
    let tasks = session.download_tasks(vec![new_version, never], true).await.unwrap();
    dlsession_testkit::wait_until(|| s.hits("/doc") >= 1 && s.hits("/other") >= 1).await;
    s.add("/doc", Resource::generated(len, 21).etag("\"v1\""));
    // The download from zero is cut too, and its resume spliced again.
    s.add("/other", Resource::generated(len, 23).etag("\"v1\"").fault(Hits::Nth(3), Fault::ResetAfter(2 << 20)));

    // The spliced file failed its checksum; the download from zero gave the new version.
    assert_eq!(events.completion(tasks[0].id(), LONG).await, None);
    let file = events.moved_to(tasks[0].id()).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(21, len)));
    // A reset may lose what the server had queued: the resume starts somewhere after zero.
    let offsets = |path| s.requests_for(path).iter().map(|r| offset_of(r.range.as_deref())).collect::<Vec<_>>();
    let resumed = |at: u64| at > 0 && at < len;
    let doc = offsets("/doc");
    assert!(matches!(doc[..], [0, r, 0] if resumed(r)), "cut, resumed (spliced), then once from zero: {doc:?}");
    assert!(events.seen.iter().any(|e| matches!(e, Seen::Resumed { task, offset: 0 } if *task == tasks[0].id())));

    // A file that still does not match after that fails: one download from zero, no more.
    let err = events.completion(tasks[1].id(), LONG).await.unwrap();
    assert_eq!(err.code, ErrorCode::ChecksumMismatch);
    assert!(err.message.contains("after downloading it again from zero"), "{err}");
    let other = offsets("/other");
    assert!(matches!(other[..], [0, a, 0, b] if resumed(a) && resumed(b)), "{other:?}");
    assert!(events.moved_to(tasks[1].id()).is_none(), "a mismatching file is never delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_a_tls_error() {
    let env = TestEnv::new();
    let ca = TestCa::expired().unwrap();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let _d = TestDaemon::start(&env);
    let s = TestServer::start_tls(&ca).await.unwrap();
    s.add("/x", Resource::generated(10, 1));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.expired")).await;
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/x"))], true).await.unwrap().remove(0);
    let err = events.completion(task.id(), LONG).await.unwrap();
    assert_eq!(err.code, ErrorCode::Tls);
    assert!(err.message.to_lowercase().contains("expired"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_proxy_in_front_of_nginx() {
    let env = TestEnv::new();
    let www = env.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let body: Vec<u8> = (0..(6u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(www.join("big.bin"), &body).unwrap();
    let nginx = Nginx::serve(&www).expect("nginx");
    // Cuts the first three connections after 1 MiB of response.
    let proxy = TestProxy::start_faulty(ProxyFault::CutAfter { bytes: 1 << 20, times: 3 }).await.unwrap();
    let proxy_url = proxy.url();
    let _d = TestDaemon::start_with_env(&env, &[("HTTP_PROXY", OsStr::new(&proxy_url)), ("NO_PROXY", OsStr::new(""))]);
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.nginx")).await;
    let task = session.download_tasks(vec![DownloadRequest::new(nginx.url("/big.bin"))], true).await.unwrap().remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(std::fs::read(events.moved_to(task.id()).unwrap()).unwrap(), body);
    let records = proxy.records();
    assert!(records.len() >= 4, "three cut attempts and a good one: {records:?}");
    assert!(events.seen.iter().any(|e| matches!(e, Seen::Resumed { offset, .. } if *offset > 0)), "resumed with Range");
}

// ---------------------------------------------------------------- disk faults

#[cfg_attr(not(dlsession_root), ignore = "needs root to mount a small filesystem; CI runs it as root")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_disk_pauses_the_task_and_it_resumes_when_space_is_free() {
    dlsession_testkit::require_root();
    let env = TestEnv::new();
    env.set_config("checkpoint_bytes", "524288");
    let mount = Mount::tmpfs(&env.cache_dir, "size=6m,mode=0700");
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 10u64 << 20;
    s.add("/big", Resource::generated(len, 12).throttle(16 << 20));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.full")).await;
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/big"))], true).await.unwrap().remove(0);
    // The disk fills: the task waits with insufficient_space, keeping its partial data.
    let info = dlsession_testkit::wait_for("insufficient_space", LONG, || {
        let info = dlsession_testkit::block(task.info()).unwrap();
        match &info.wait {
            Some(WaitReason::Backoff { last_error, .. }) if last_error.code == ErrorCode::InsufficientSpace => {
                Some(info)
            }
            _ => None,
        }
    });
    assert_eq!(info.state, TaskState::Waiting);
    assert!(info.bytes_received > 0, "checkpointed data is kept: {info:?}");
    // Other requests are still served.
    assert!(session.get_all_tasks().await.is_ok());
    mount.remount("size=64m");
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(12, len)));
    let last = s.requests_for("/big").pop().unwrap();
    assert!(offset_of(last.range.as_deref()) > 0, "resumed from the kept partial data");
}

/// A task still waiting to move its file when the daemon restarts: its first move in the new
/// process removes a half-written copy named by the new process's own pid (pids repeat, in
/// containers at every start), as the start's own moves do.
#[cfg_attr(not(dlsession_root), ignore = "needs root to mount a tmpfs; CI runs it as root")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_move_removes_a_copy_named_by_a_repeated_pid() {
    dlsession_testkit::require_root();
    let env = TestEnv::new();
    let dir = env.path().join("readonly");
    let mount = Mount::tmpfs(&dir, "size=1m,ro");
    let mut d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    s.add("/a", Resource::generated(100_000, 3));
    let (session, _events) = attach(&env, SessionConfiguration::background("t.pid")).await;
    let req = DownloadRequest::new(s.url("/a")).destination(dir.join("a.bin"));
    let task = session.download_tasks(vec![req], true).await.unwrap().remove(0);
    dlsession_testkit::wait_for("destination_unavailable", LONG, || {
        let info = dlsession_testkit::block(task.info()).unwrap();
        matches!(info.wait, Some(WaitReason::DestinationUnavailable { .. })).then_some(())
    });
    drop(session);
    d.terminate();
    d.restart();
    // What a crashed earlier daemon with this pid left mid-copy.
    mount.remount("rw");
    let leftover = dir.join(format!(".a.bin.dlsessiond-{}-9.tmp", d.pid()));
    std::fs::write(&leftover, b"half a copy").unwrap();
    let (_session, mut events) = attach(&env, SessionConfiguration::background("t.pid")).await;
    let resumed = env.ctl(&["resume", &task.id().to_string()]);
    assert!(resumed.status.success(), "{resumed:?}");
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(3, 100_000)));
    assert!(!leftover.exists(), "the leftover copy is still there");
}

/// A file that was at the destination before (so the move failed) is never taken for the
/// download, even of the same size, once the cache copy is gone: the task downloads again
/// (and waits again for its destination), instead of completing with someone else's file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_was_there_is_not_taken_for_the_download() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    s.add("/a", Resource::generated(4096, 5).throttle(4096));
    let dest = env.path().join("taken.bin");
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.taken")).await;
    let task = session
        .download_tasks(vec![DownloadRequest::new(s.url("/a")).destination(&dest)], true)
        .await
        .unwrap()
        .remove(0);
    // Someone puts a file of the same size there while it downloads.
    std::fs::write(&dest, vec![b'u'; 4096]).unwrap();
    let waiting = || {
        dlsession_testkit::wait_for("destination_unavailable", LONG, || {
            let info = dlsession_testkit::block(task.info()).unwrap();
            matches!(info.wait, Some(WaitReason::DestinationUnavailable { .. })).then_some(())
        })
    };
    waiting();
    // The cache copy is cleaned away behind the daemon's back.
    let cached: Vec<_> = dlsession_testkit::host::walk(&env.downloads_dir())
        .into_iter()
        .filter(|p| p.metadata().unwrap().len() == 4096)
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    std::fs::remove_file(&cached[0]).unwrap();
    let resumed = env.ctl(&["resume", &task.id().to_string()]);
    assert!(resumed.status.success(), "{resumed:?}");
    dlsession_testkit::wait_for("a second download", LONG, || (s.hits("/a") == 2).then_some(()));
    waiting();
    events.drain();
    assert!(events.seen.iter().all(|e| !matches!(e, Seen::Completed { .. })), "{:?}", events.seen);
    assert_eq!(std::fs::read(&dest).unwrap(), vec![b'u'; 4096], "the file that was there is untouched");
}

/// The cache directory removed while a download runs (someone cleaning ~/.cache): the
/// download starts over and completes, instead of failing with `file_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_removed_under_a_download_is_made_again() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 3u64 << 20;
    s.add("/c", Resource::generated(len, 9).throttle(2 << 20));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.cleaned")).await;
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/c"))], true).await.unwrap().remove(0);
    dlsession_testkit::wait_for("bytes", LONG, || {
        (dlsession_testkit::block(task.info()).unwrap().bytes_received > 0).then_some(())
    });
    std::fs::remove_dir_all(env.downloads_dir()).unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None, "completed after starting over");
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(9, len)));
    assert!(s.hits("/c") >= 2, "downloaded again");
}

/// The same past the download's first checkpoint, when its partial file is open: the next
/// checkpoint finds the file gone and the download starts over then, instead of writing the
/// rest to a file without a name and failing to move it at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_removed_after_a_checkpoint_starts_over_at_the_next() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    s.add("/c", Resource::generated(len, 10).throttle(1 << 20));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.cleaned-later")).await;
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/c"))], true).await.unwrap().remove(0);
    let client = dlsession_testkit::app::client(&env).await;
    dlsession_testkit::app::wait_for_checkpoint(&client, task.id(), 1).await;
    std::fs::remove_dir_all(env.downloads_dir()).unwrap();
    dlsession_testkit::wait_until(|| s.hits("/c") >= 2).await;
    assert!(s.bytes_sent("/c") < len, "the first response was cut short, not sent whole before starting over");
    assert_eq!(events.completion(task.id(), LONG).await, None, "completed after starting over");
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(10, len)));
}

/// A finished download whose destination cannot be written is never destroyed: the task
/// waits (`destination_unavailable`, naming the OS error), keeps its data, and `resume`
/// puts it in place once the destination works, without downloading it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_destination_keeps_the_download_until_it_can_be_moved() {
    let env = TestEnv::new();
    let dir = env.path().join("readonly");
    let mount = if is_root() {
        Some(Mount::tmpfs(&dir, "size=1m,ro"))
    } else {
        std::fs::create_dir_all(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).unwrap();
        None
    };
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    s.add("/a", Resource::generated(100_000, 1));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.ro")).await;
    let req = DownloadRequest::new(s.url("/a")).destination(dir.join("a.bin"));
    let task = session.download_tasks(vec![req], true).await.unwrap().remove(0);
    let info = dlsession_testkit::wait_for("destination_unavailable", LONG, || {
        let info = dlsession_testkit::block(task.info()).unwrap();
        matches!(info.wait, Some(WaitReason::DestinationUnavailable { .. })).then_some(info)
    });
    assert_eq!(info.state, TaskState::Waiting);
    let Some(WaitReason::DestinationUnavailable { error, .. }) = &info.wait else { unreachable!() };
    assert_eq!(error.code, ErrorCode::DestinationUnavailable);
    assert!(error.message.contains("a.bin") && error.message.contains("os error"), "{error}");
    // `show` says what waits and what to do about it.
    let show = env.ctl(&["show", &task.id().to_string()]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("cannot be moved to its destination") && text.contains("dlsessionctl resume"), "{text}");
    // What the session was sent by now (a completion would have come with the wait).
    tokio::time::sleep(Duration::from_millis(300)).await;
    events.drain();
    assert!(events.seen.iter().all(|e| !matches!(e, Seen::Completed { .. })), "{:?}", events.seen);
    // The destination works again: resume puts the file there, from the kept data.
    match &mount {
        Some(m) => m.remount("rw"),
        None => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
    }
    let resumed = env.ctl(&["resume", &task.id().to_string()]);
    assert!(resumed.status.success(), "{resumed:?}");
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(events.location(task.id()), Some(dir.join("a.bin")), "delivered at its destination");
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(1, 100_000)));
    assert_eq!(s.hits("/a"), 1, "not downloaded again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_file_deleted_behind_the_daemons_back_restarts_from_zero() {
    let env = TestEnv::new();
    let _d = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 6u64 << 20;
    s.add("/big", Resource::generated(len, 13).throttle(4 << 20));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.deleted")).await;
    let task = session.download_tasks(vec![DownloadRequest::new(s.url("/big"))], true).await.unwrap().remove(0);
    events.wait("progress", LONG, |e| matches!(e, Seen::Progress { total, .. } if *total > 1 << 20)).await;
    task.suspend().await.unwrap();
    let part = env.downloads_dir().join("s1").join(format!("{}.part", task.id()));
    assert!(part.exists());
    std::fs::remove_file(&part).unwrap();
    task.resume().await.unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(13, len)));
    assert_eq!(offset_of(s.requests_for("/big").pop().unwrap().range.as_deref()), 0, "started over");
}

// ---------------------------------------------------------------- power loss and failpoints

/// Every checkpoint offset committed to SQLite had been fdatasync'ed first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_never_run_ahead_of_synced_bytes() {
    let env = TestEnv::new();
    env.set_config("checkpoint_bytes", "524288");
    let daemon = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 12u64 << 20;
    s.add("/a", Resource::generated(len, 14).throttle(24 << 20));
    s.add("/b", Resource::generated(len, 15).throttle(24 << 20));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.order")).await;
    let tasks = session
        .download_tasks(vec![DownloadRequest::new(s.url("/a")), DownloadRequest::new(s.url("/b"))], true)
        .await
        .unwrap();
    for t in &tasks {
        assert_eq!(events.completion(t.id(), LONG).await, None);
    }
    let log = daemon.log();
    let mut synced: std::collections::HashMap<u64, u64> = Default::default();
    let mut commits = 0;
    for line in log.lines() {
        let field = |name: &str| -> Option<u64> {
            line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))).and_then(|v| v.parse().ok())
        };
        if line.contains(" synced ") || line.ends_with(" synced") || line.contains(": synced") {
            let (task, offset) = (field("task").unwrap(), field("offset").unwrap());
            let e = synced.entry(task).or_default();
            *e = (*e).max(offset);
        } else if line.contains("checkpoint committed") {
            let (task, offset) = (field("task").unwrap(), field("offset").unwrap());
            let durable = synced.get(&task).copied().unwrap_or(0);
            assert!(offset <= durable, "task {task}: committed {offset} but only {durable} synced:\n{line}");
            commits += 1;
        }
    }
    assert!(commits >= 20, "enough checkpoints to mean something: {commits}");
}

/// Crashes between the steps of a checkpoint and of the finish protocol all end in one
/// correct outcome after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_every_step_ends_in_exactly_one_correct_outcome() {
    for failpoint in ["checkpoint-after-sync:3", "checkpoint-after-commit:3", "finish-before-move", "finish-after-move"]
    {
        let env = TestEnv::new();
        env.set_config("checkpoint_bytes", "524288");
        let mut daemon = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", OsStr::new(failpoint))]);
        let s = TestServer::start().await.unwrap();
        let len = 4u64 << 20;
        s.add("/f", Resource::generated(len, 16).throttle(8 << 20));
        let dest = env.path().join("f.bin");
        let (session, _events) = attach(&env, SessionConfiguration::background("t.fail")).await;
        let task = session
            .download_tasks(vec![DownloadRequest::new(s.url("/f")).destination(&dest)], true)
            .await
            .unwrap()
            .remove(0);
        let status = daemon.wait_exit(LONG);
        assert!(!status.success(), "{failpoint}: the daemon stopped at the failpoint");
        assert!(daemon.log().contains(&format!("failpoint {}", failpoint.split(':').next().unwrap())));
        let requests = s.hits("/f");
        drop(session);
        daemon.set_env(&[]);
        daemon.restart();
        let (_session, mut events) = attach(&env, SessionConfiguration::background("t.fail")).await;
        assert_eq!(events.completion(task.id(), LONG).await, None, "{failpoint}");
        if !events.seen.contains(&Seen::FinishedEvents) {
            events.wait("finished events", LONG, |e| *e == Seen::FinishedEvents).await;
        }
        // Exactly one finished_downloading and one completed for the task.
        events.drain();
        let finished =
            events.seen.iter().filter(|e| matches!(e, Seen::Finished { task: t, .. } if *t == task.id())).count();
        let completed =
            events.seen.iter().filter(|e| matches!(e, Seen::Completed { task: t, .. } if *t == task.id())).count();
        assert_eq!((finished, completed), (1, 1), "{failpoint}: {:?}", events.seen);
        let file = events.moved_to(task.id()).unwrap();
        assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(16, len)), "{failpoint}");
        assert!(marked(&file), "{failpoint}: the delivered file carries its task's mark");
        if failpoint == "finish-after-move" {
            // Moved, and only the completion's commit missing: found in place by its mark.
            assert_eq!(s.hits("/f"), requests, "{failpoint}: downloaded again");
        }
        let leftovers: Vec<_> = std::fs::read_dir(env.downloads_dir().join("s1"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "{failpoint}: stray files {leftovers:?}");
    }
}

/// A file of the same size that appeared at the destination is not taken for the finished
/// download when a crash interrupted the move, even with the task's mark on it: it is left
/// alone, the task waits with a clear reason, and the download goes there once the file is
/// gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_move_never_adopts_a_foreign_file_of_the_same_size() {
    // The partial file is still there: the rename never happened, whatever the mark says.
    crash_before_the_move_beside_a_planted_file(Planted::MarkedBesideThePartialFile).await;
}

/// Another user's file with the task's mark (which is guessable) is never taken for the
/// download, even with the partial file gone.
#[cfg_attr(not(dlsession_root), ignore = "needs root to give a file to another user; CI runs it as root")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_file_with_the_tasks_mark_is_never_adopted() {
    dlsession_testkit::require_root();
    crash_before_the_move_beside_a_planted_file(Planted::MarkedByAnotherUser).await;
}

/// What the planted file at the destination is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Planted {
    /// Ours, with the task's mark, while the partial file is still in the cache.
    MarkedBesideThePartialFile,
    /// Another user's, with the task's mark; the partial file is removed.
    MarkedByAnotherUser,
}

async fn crash_before_the_move_beside_a_planted_file(planted: Planted) {
    let env = TestEnv::new();
    let mut daemon = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", OsStr::new("finish-before-move"))]);
    let s = TestServer::start().await.unwrap();
    let len = 1u64 << 20;
    s.add("/f", Resource::generated(len, 21).throttle(2 << 20));
    let dest = env.path().join("f.bin");
    let (session, _events) = attach(&env, SessionConfiguration::background("t.foreign")).await;
    let task = session
        .download_tasks(vec![DownloadRequest::new(s.url("/f")).destination(&dest)], true)
        .await
        .unwrap()
        .remove(0);
    // Someone writes a different file of the same size there while the download runs.
    let foreign = vec![0x5au8; len as usize];
    std::fs::write(&dest, &foreign).unwrap();
    assert!(!daemon.wait_exit(LONG).success(), "stopped at the failpoint");
    drop(session);
    // The finished partial file carries the task's mark: the planted file gets it too.
    let part = env.downloads_dir().join("s1").join(format!("{}.part", task.id()));
    let mut mark = [0u8; 128];
    let n = rustix::fs::lgetxattr(&part, MARK, &mut mark[..]).expect("the partial file's mark");
    rustix::fs::lsetxattr(&dest, MARK, &mark[..n], rustix::fs::XattrFlags::empty()).unwrap();
    if planted == Planted::MarkedByAnotherUser {
        std::fs::remove_file(&part).unwrap();
        std::os::unix::fs::chown(&dest, Some(65534), Some(65534)).unwrap();
    }
    daemon.set_env(&[]);
    daemon.restart();
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.foreign")).await;
    // The download is kept and waits for its destination; the foreign file is untouched.
    let waiting = dlsession_testkit::wait_for("destination_unavailable", LONG, || {
        let tasks = dlsession_testkit::block(session.get_all_tasks()).unwrap();
        tasks
            .into_iter()
            .find(|t| t.id == task.id() && matches!(t.wait, Some(WaitReason::DestinationUnavailable { .. })))
    });
    let Some(WaitReason::DestinationUnavailable { error, .. }) = &waiting.wait else { unreachable!() };
    assert!(error.message.contains("already exists"), "{planted:?}: {error}");
    assert_eq!(std::fs::read(&dest).unwrap(), foreign, "{planted:?}: the foreign file is untouched");
    tokio::time::sleep(Duration::from_millis(300)).await;
    events.drain();
    assert!(!events.seen.iter().any(|e| matches!(e, Seen::Finished { .. })), "{:?}", events.seen);
    // Its owner moves it away: the next try puts the download there, without a new request.
    std::fs::remove_file(&dest).unwrap();
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(events.location(task.id()), Some(dest.clone()), "delivered at its destination");
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(21, len)));
    // The finish was not committed before the move (the file's mark proves a move, and
    // the crash came before it): the download resumed from its last checkpoint, here zero.
    assert_eq!(s.hits("/f"), 2, "{planted:?}: downloaded again once, then only moved");
}

/// NFS and FUSE filesystems without rename flags refuse `RENAME_NOREPLACE` (`EINVAL`):
/// the move then links the file into place (a link never replaces) and removes the old
/// name, after committing the finish (a crash in between leaves two names, which only a
/// recorded finish resolves). Here the cache is on that filesystem too (a rename there);
/// an existing file is still never replaced.
#[cfg_attr(not(dlsession_root), ignore = "needs root to mount a FUSE filesystem; CI runs it as root")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filesystem_without_rename_flags_gets_its_files_and_keeps_existing_ones() {
    dlsession_testkit::require_root();
    let env = TestEnv::new();
    // The cache and the destinations on FUSE filesystems.
    let fuse = env.path().join("fuse");
    let _cache = Mount::bindfs(&env.path().join("fuse-cache-src"), &env.cache_dir);
    let _dest = Mount::bindfs(&env.path().join("fuse-src"), &fuse);
    let probe = fuse.join("probe");
    std::fs::write(&probe, b"").unwrap();
    let refused = rustix::fs::renameat_with(
        rustix::fs::CWD,
        &probe,
        rustix::fs::CWD,
        fuse.join("probe2"),
        rustix::fs::RenameFlags::NOREPLACE,
    );
    assert_eq!(refused, Err(rustix::io::Errno::INVAL), "bindfs refuses rename flags, as NFS does");
    std::fs::remove_file(&probe).unwrap();
    let _daemon = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 3u64 << 20;
    s.add("/f", Resource::generated(len, 51).throttle(4 << 20));
    let existing = fuse.join("existing.bin");
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.noreplace")).await;
    let same_fs = fuse.join("renamed.bin");
    let tasks = session
        .download_tasks(
            vec![
                DownloadRequest::new(s.url("/f")).destination(&same_fs),
                DownloadRequest::new(s.url("/f")).destination(&existing),
            ],
            true,
        )
        .await
        .unwrap();
    // Someone writes a file there while the download runs.
    std::fs::write(&existing, b"the user's own file").unwrap();
    assert_eq!(events.completion(tasks[0].id(), LONG).await, None);
    assert_eq!(events.location(tasks[0].id()), Some(same_fs), "delivered at its destination");
    assert_eq!(sha256_file(&events.moved_to(tasks[0].id()).unwrap()).unwrap(), to_hex(&pattern_sha256(51, len)));
    // The second waits for its destination, which keeps the user's bytes.
    let waiting = dlsession_testkit::wait_for("destination_unavailable", LONG, || {
        let tasks = dlsession_testkit::block(session.get_all_tasks()).unwrap();
        tasks.into_iter().find(|t| matches!(t.wait, Some(WaitReason::DestinationUnavailable { .. })))
    });
    let Some(WaitReason::DestinationUnavailable { error, .. }) = &waiting.wait else { unreachable!() };
    assert!(error.message.contains("already exists"), "{error}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"the user's own file");
    // Moved, not copied: no partial file left in the cache.
    let part = env.downloads_dir().join("s1").join(format!("{}.part", tasks[0].id()));
    assert!(!part.exists(), "{} is gone", part.display());
}

/// A copy from a cache on an ordinary filesystem to a destination without rename flags.
#[cfg_attr(not(dlsession_root), ignore = "needs root to mount a FUSE filesystem; CI runs it as root")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_onto_a_filesystem_without_rename_flags_lands() {
    dlsession_testkit::require_root();
    let env = TestEnv::new();
    let fuse = env.path().join("fuse");
    let _dest = Mount::bindfs(&env.path().join("fuse-src"), &fuse);
    let _daemon = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 2u64 << 20;
    s.add("/f", Resource::generated(len, 52));
    let (session, mut events) = attach(&env, SessionConfiguration::background("t.copy-noreplace")).await;
    let dest = fuse.join("copied.bin");
    let task = session
        .download_tasks(vec![DownloadRequest::new(s.url("/f")).destination(&dest)], true)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(events.completion(task.id(), LONG).await, None);
    assert_eq!(events.location(task.id()), Some(dest), "delivered at its destination");
    assert_eq!(sha256_file(&events.moved_to(task.id()).unwrap()).unwrap(), to_hex(&pattern_sha256(52, len)));
    // The app took the file away: no temporary copy was left beside it.
    let names: Vec<_> = std::fs::read_dir(&fuse).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.is_empty(), "{names:?}");
}

/// The extended attribute a finished file carries (docs/behaviour.md, "Durability").
const MARK: &str = "user.dlsessiond.task";

/// Whether `path` carries a task's mark.
fn marked(path: &std::path::Path) -> bool {
    let mut buf = [0u8; 128];
    rustix::fs::lgetxattr(path, MARK, &mut buf[..]).is_ok_and(|n| n > 0)
}

/// Starts a daemon that stops (aborts) at `failpoint`, has it download `resource` (served at
/// `/f`) to `dest` in session `session`, and waits until it has stopped. Returns the
/// stopped daemon, the server and the task's id.
async fn download_until_the_failpoint(
    env: &TestEnv,
    failpoint: &str,
    resource: Resource,
    session: &str,
    dest: &std::path::Path,
) -> (TestDaemon, TestServer, u64) {
    let mut daemon = TestDaemon::start_with_env(env, &[("DLSESSIOND_FAILPOINT", OsStr::new(failpoint))]);
    let s = TestServer::start().await.unwrap();
    s.add("/f", resource);
    let (app, _events) = attach(env, SessionConfiguration::background(session)).await;
    let task =
        app.download_tasks(vec![DownloadRequest::new(s.url("/f")).destination(dest)], true).await.unwrap().remove(0);
    assert!(!daemon.wait_exit(LONG).success(), "stopped at the failpoint");
    (daemon, s, task.id())
}

/// Restarts `daemon` (stopped right after a move) without its failpoint: `task` of
/// `session` completes at `dest` with the file of `seed` (`len` bytes) it had moved,
/// without asking the server again. Returns the file the app took.
#[allow(clippy::too_many_arguments)]
async fn restart_and_expect_the_moved_file(
    env: &TestEnv,
    daemon: &mut TestDaemon,
    s: &TestServer,
    session: &str,
    task: u64,
    dest: &std::path::Path,
    seed: u64,
    len: u64,
) -> std::path::PathBuf {
    daemon.set_env(&[]);
    daemon.restart();
    let (_session, mut events) = attach(env, SessionConfiguration::background(session)).await;
    assert_eq!(events.completion(task, LONG).await, None, "{}", daemon.log());
    assert_eq!(events.location(task).as_deref(), Some(dest));
    // The app took the file (renamed it) in its callback.
    let file = events.moved_to(task).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(seed, len)), "the file it had moved");
    assert_eq!(s.hits("/f"), 1, "not downloaded again:\n{}", daemon.log());
    file
}

/// Downloads 1 MiB to `dest` with the daemon stopping (abort) right after the move, then
/// restarts it: the task completes at `dest` without a second request. Returns the file.
async fn crash_right_after_the_move(env: &TestEnv, dest: &std::path::Path, seed: u64) -> std::path::PathBuf {
    let len = 1u64 << 20;
    let resource = Resource::generated(len, seed);
    let (mut daemon, s, task) = download_until_the_failpoint(env, "finish-after-move", resource, "t.moved", dest).await;
    assert_eq!(s.hits("/f"), 1);
    restart_and_expect_the_moved_file(env, &mut daemon, &s, "t.moved", task, dest, seed, len).await
}

/// A small file (held whole, never checkpointed) moved into place just before a crash is
/// found there by its mark before the task asks the server again, and the task completes
/// with the file it had moved. (Downloading again could not deliver it: the resource changed
/// meanwhile, and the old file at the destination would block the move.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_file_moved_before_a_crash_is_found_in_place() {
    let env = TestEnv::new();
    let len = 64u64 << 10;
    let dest = env.path().join("f.bin");
    let resource = Resource::generated(len, 43);
    let (mut daemon, s, task) =
        download_until_the_failpoint(&env, "finish-after-move", resource, "t.found", &dest).await;
    assert!(marked(&dest), "moved, with its mark");
    s.add("/f", Resource::generated(len, 44));
    restart_and_expect_the_moved_file(&env, &mut daemon, &s, "t.found", task, &dest, 43, len).await;
}

/// A file moved into place just before a crash is found at start, not when its task's turn
/// for a download slot comes: behind a long download holding the only slot, it completes
/// at once, with the file it had moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_moved_before_a_crash_is_found_at_start_not_behind_the_queue() {
    let env = TestEnv::new();
    let mut daemon = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", OsStr::new("finish-after-move"))]);
    let s = TestServer::start().await.unwrap();
    // 4 MiB at 64 KiB/s: a minute, longer than the wait below.
    s.add("/slow", Resource::generated(4 << 20, 46).throttle(64 << 10));
    let len = 64u64 << 10;
    s.add("/f", Resource::generated(len, 47));
    let (app, _events) = attach(&env, SessionConfiguration::background("t.found-early")).await;
    let slow = DownloadRequest::new(s.url("/slow")).priority(1.0);
    let slow = app.download_tasks(vec![slow], true).await.unwrap().remove(0);
    dlsession_testkit::wait_until(|| s.hits("/slow") == 1).await;
    let dest = env.path().join("f.bin");
    let task = app.download_tasks(vec![DownloadRequest::new(s.url("/f")).destination(&dest)], true).await.unwrap();
    assert!(!daemon.wait_exit(LONG).success(), "stopped at the failpoint");
    assert!(marked(&dest), "moved, with its mark");
    drop(app);
    // One download at a time from now on: the slow one, first by priority, takes it.
    env.set_config("max_concurrent_downloads", "1");
    daemon.set_env(&[]);
    daemon.restart();
    let (_app, mut events) = attach(&env, SessionConfiguration::background("t.found-early")).await;
    let done = events.completion(task[0].id(), std::time::Duration::from_secs(15)).await;
    assert_eq!(done, None, "{}", daemon.log());
    assert_eq!(sha256_file(&events.moved_to(task[0].id()).unwrap()).unwrap(), to_hex(&pattern_sha256(47, len)));
    assert_eq!(s.hits("/f"), 1, "not downloaded again");
    assert!(s.hits("/slow") >= 2, "the slow download had the slot");
    assert!(
        !events.seen.iter().any(|e| matches!(e, Seen::Completed { task, .. } if *task == slow.id())),
        "still running"
    );
}

/// A file others may write (0664 here: an app with umask 002, the default for users on many
/// systems) carries no mark, since whoever may write it could mark it: its finish is
/// committed before its move, and a crash right after the move still ends in the
/// completion without asking the server again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_others_may_write_is_finished_the_committed_way() {
    let env = TestEnv::new();
    let mut daemon = TestDaemon::start_with_env(&env, &[("DLSESSIOND_FAILPOINT", OsStr::new("finish-after-move"))]);
    let s = TestServer::start().await.unwrap();
    let len = 64u64 << 10;
    s.add("/f", Resource::generated(len, 45));
    let dest = env.path().join("f.bin");
    let args = ["get", &s.url("/f"), "-o", dest.to_str().unwrap(), "--session", "t.mode"];
    let out = env.ctl_with_umask(0o002, &args);
    assert!(out.status.success(), "{out:?}");
    // "task ID: URL -> PATH"
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let id: u64 = stdout.split_whitespace().find_map(|w| w.trim_end_matches(':').parse().ok()).expect(&stdout);
    assert!(!daemon.wait_exit(LONG).success(), "stopped at the failpoint");
    assert_eq!(dlsession_testkit::host::mode(&dest), 0o664);
    assert!(!marked(&dest), "no mark on a file others may write");
    s.add("/f", Resource::generated(len, 46));
    restart_and_expect_the_moved_file(&env, &mut daemon, &s, "t.mode", id, &dest, 45, len).await;
}

/// Where a partial file cannot carry a mark (ramfs keeps no user extended attributes), the
/// finish is committed before the move: a crash right after the move ends in the
/// completion, without downloading again.
#[cfg_attr(not(dlsession_root), ignore = "needs root to mount a ramfs; CI runs it as root")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_mark_the_finish_is_committed_before_the_move() {
    dlsession_testkit::require_root();
    let env = TestEnv::new();
    let _mount = Mount::ramfs(&env.cache_dir);
    let file = crash_right_after_the_move(&env, &env.cache_dir.join("f.bin"), 41).await;
    assert!(!marked(&file));
}

/// A destination on another filesystem than the cache gets a copy: the finish is committed
/// before the copy, so a crash right after it ends in the completion, without downloading
/// again. The copy carries the task's mark too (which proves it the task's file once the
/// cache copy is gone).
#[cfg_attr(not(dlsession_root), ignore = "needs root to mount a tmpfs; CI runs it as root")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_to_another_filesystem_is_committed_before_it_starts() {
    dlsession_testkit::require_root();
    let env = TestEnv::new();
    let _mount = Mount::tmpfs(&env.cache_dir, "size=64m,mode=0700");
    // The partial file must be markable, or this would test the unmarked way instead.
    let probe = env.cache_dir.join("probe");
    std::fs::write(&probe, b"").unwrap();
    rustix::fs::lsetxattr(&probe, "user.probe", b"1", rustix::fs::XattrFlags::empty())
        .expect("a tmpfs that keeps user extended attributes (Linux 6.6 or later)");
    std::fs::remove_file(&probe).unwrap();
    let file = crash_right_after_the_move(&env, &env.path().join("f.bin"), 42).await;
    assert!(marked(&file), "the copy carries the mark");
}

/// A resource that changed while the daemon was down starts over from zero; a crash right
/// after the reset (committed before any new byte is written) resumes from zero, never at
/// the old offset, which with a stale server would splice two versions. (The truncated
/// partial file also forces zero here; the commit-before-write order itself is enforced by
/// the worker waiting for the core's answer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_zero_is_committed_before_new_bytes() {
    let env = TestEnv::new();
    env.set_config("checkpoint_bytes", "262144");
    let mut daemon = TestDaemon::start(&env);
    let s = TestServer::start().await.unwrap();
    let len = 4u64 << 20;
    s.add("/f", Resource::generated(len, 31).etag("\"v1\"").throttle(1 << 20));
    let dest = env.path().join("f.bin");
    let (session, _events) = attach(&env, SessionConfiguration::background("t.reset")).await;
    let task = session
        .download_tasks(vec![DownloadRequest::new(s.url("/f")).destination(&dest)], true)
        .await
        .unwrap()
        .remove(0);
    let client = dlsession_testkit::app::client(&env).await;
    dlsession_testkit::app::wait_for_checkpoint(&client, task.id(), 512 << 10).await;
    drop(client);
    drop(session);
    daemon.kill9();
    // The resource changes; the daemon comes back and dies right after starting over.
    // (Slow headers: the crash comes after the restart has been seen to succeed.)
    let v2 = Resource::generated(len, 32).etag("\"v2\"").throttle(1 << 20);
    s.add("/f", v2.fault(Hits::All, Fault::SlowHeaders(Duration::from_millis(700))));
    daemon.set_env(&[("DLSESSIOND_FAILPOINT", OsStr::new("restart-after-reset"))]);
    daemon.restart();
    assert!(!daemon.wait_exit(LONG).success(), "stopped at the failpoint");
    // What the daemon stopped with: the reset committed, the new version's validator with it.
    let db = rusqlite::Connection::open_with_flags(env.database(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let (offset, etag): (i64, Option<String>) = db
        .query_row("SELECT committed_offset, etag FROM tasks WHERE id = ?1", [task.id() as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    drop(db);
    assert_eq!((offset, etag.as_deref()), (0, Some("\"v2\"")), "the restart from zero was committed first");
    let before = s.requests_for("/f").len();
    daemon.set_env(&[]);
    daemon.restart();
    let (_session, mut events) = attach(&env, SessionConfiguration::background("t.reset")).await;
    assert_eq!(events.completion(task.id(), LONG).await, None);
    let after: Vec<_> = s.requests_for("/f").into_iter().skip(before).collect();
    assert!(after.first().is_some_and(|r| r.range.is_none()), "resumed from zero, not the old offset: {after:?}");
    let file = events.moved_to(task.id()).unwrap();
    assert_eq!(sha256_file(&file).unwrap(), to_hex(&pattern_sha256(32, len)), "the new version, whole");
}

// ---------------------------------------------------------------- database

#[cfg_attr(not(dlsession_root), ignore = "needs root to make a read-only mount; CI runs it as root")]
#[test]
fn a_read_only_state_directory_is_refused_with_a_clear_message() {
    dlsession_testkit::require_root();
    let env = TestEnv::new();
    {
        let mut d = TestDaemon::start(&env);
        assert!(d.terminate().success());
    }
    let state = env.state_dir.join("dlsessiond");
    let db_before = std::fs::read(env.database()).unwrap();
    let _read_only = Mount::read_only_bind(&state);
    let out = env.command(dlsession_testkit::bin_path("dlsessiond")).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lower = stderr.to_lowercase();
    assert!(lower.contains("dlsessiond") && (lower.contains("read-only") || lower.contains("readonly")), "{stderr}");
    assert_eq!(std::fs::read(env.database()).unwrap(), db_before, "untouched");
}
