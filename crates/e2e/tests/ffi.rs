//! The C API from C: ffi/examples/c/download.c, compiled with the system's C compiler
//! against ffi/include/dlsession.h and the static library cargo built (dlsession-ffi is a
//! dev-dependency of this crate, so `cargo test` builds it), downloads from a real daemon.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
// One test calls the C ABI from Rust, raw pointers and all, as a C program would.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use dlsession_ffi::{dls_code, dls_event, dls_event_kind, dls_session};
use dlsession_testkit::{Resource, TestDaemon, TestEnv, TestServer, pattern_sha256, sha256_file, to_hex};

/// What the static library needs from the system (`cargo rustc -p dlsession-ffi
/// --crate-type staticlib -- --print native-static-libs`, less the implicit `-lc`).
const NATIVE_LIBS: [&str; 6] = ["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl"];

/// `target/<profile>`: test executables run from `target/<profile>/deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

/// The newest `libdlsession_ffi.a`: in `deps/` when dlsession-ffi was built as a dependency,
/// also one level up when it was built as a package of its own.
fn static_library(profile: &Path) -> PathBuf {
    let candidates = [profile.join("deps/libdlsession_ffi.a"), profile.join("libdlsession_ffi.a")];
    candidates
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!(
                "libdlsession_ffi.a is not in {0}/deps or {0}: it is built with this test as a dev-dependency \
                 (`cargo test -p dlsession-e2e --test ffi`) or by `cargo build -p dlsession-ffi`",
                profile.display()
            )
        })
}

/// The C compiler: `$CC`, else `cc`. Missing is a failure, not a skip: CI has gcc.
fn c_compiler() -> String {
    let cc = std::env::var("CC").ok().filter(|c| !c.is_empty()).unwrap_or_else(|| "cc".into());
    match Command::new(&cc).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => cc,
        other => panic!(
            "no C compiler: `{cc} --version` gave {other:?}. This test compiles ffi/examples/c/download.c: \
             install one (`apt-get install gcc`) or point CC at it"
        ),
    }
}

/// ffi/examples/c/download.c, compiled once per test run into `target/<profile>/ffi-c/`.
fn c_program() -> &'static Path {
    static PROGRAM: OnceLock<PathBuf> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let ffi = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ffi");
        let profile = profile_dir();
        let library = static_library(&profile);
        let out_dir = profile.join("ffi-c");
        std::fs::create_dir_all(&out_dir).unwrap();
        let program = out_dir.join("download");
        let output = Command::new(c_compiler())
            .args(["-std=c11", "-Wall", "-Wextra", "-I"])
            .arg(ffi.join("include"))
            .arg("-o")
            .arg(&program)
            .arg(ffi.join("examples/c/download.c"))
            .arg(&library)
            .args(NATIVE_LIBS)
            .output()
            .expect("run the C compiler");
        assert!(
            output.status.success(),
            "compiling download.c against {} failed:\n{}",
            library.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        program
    })
}

/// Runs the C program in `env` (it never starts a daemon itself) with a deadline.
async fn run_download(env: &TestEnv, url: &str, dest: &Path) -> Output {
    let mut command = env.command(c_program());
    command.env("DLSESSION_NO_AUTOSTART", "1").arg(&env.socket).arg(url).arg(dest).stdin(Stdio::null());
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    // The program gives up after 60 s of waiting itself; this only catches a hang.
    tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("download.c finished within 120 s")
        .expect("run download.c")
}

fn show(output: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_program_downloads_a_file() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let len = (3 << 20) + 12_345;
    server.add("/file.bin", Resource::generated(len, 41));
    let dest = env.path().join("file.bin");

    let output = run_download(&env, &server.url("/file.bin"), &dest).await;

    assert!(output.status.success(), "download.c failed:\n{}", show(&output));
    assert_eq!(sha256_file(&dest).unwrap(), to_hex(&pattern_sha256(41, len)), "byte-exact file at DEST");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let completed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("completed task=")).collect();
    assert_eq!(completed.len(), 1, "one completed event:\n{}", show(&output));
    assert!(completed[0].contains("code=0 (ok)"), "completed without error:\n{}", show(&output));
    let finished = format!("location={}", dest.display());
    assert!(
        stdout.lines().any(|l| l.starts_with("finished task=") && l.ends_with(&finished)),
        "finished_downloading names DEST:\n{}",
        show(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_program_reports_the_daemons_error_code() {
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    let dest = env.path().join("never.bin");

    let output = run_download(&env, &server.url("/missing"), &dest).await;

    assert_eq!(output.status.code(), Some(1), "a failed task exits 1:\n{}", show(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with("completed task=")
            && l.contains("code=9 (http_status)")
            && l.contains("http_status=404")),
        "the completed event carries http_status (DLS_HTTP_STATUS = 9) and 404:\n{}",
        show(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("failed: code=9 (http_status)"), "{}", show(&output));
    assert!(!dest.exists(), "no file for a 404");
}

/// Attaches to session `identifier` of `env`'s daemon through the C ABI, with `callback`
/// and the `T` it gets as user data, after `configure` has had the configuration (its
/// socket already set).
///
/// # Safety
///
/// `user_data` must outlive the session.
unsafe fn attach<T>(
    env: &TestEnv,
    identifier: &CStr,
    callback: unsafe extern "C" fn(*const dls_event, *mut c_void),
    user_data: &T,
    configure: impl FnOnce(*mut dlsession_ffi::dls_config),
) -> *mut dls_session {
    use dlsession_ffi::*;
    let socket = CString::new(env.socket.as_os_str().as_bytes()).unwrap();
    // SAFETY: live strings and a live configuration; `user_data` outlives the session (the
    // caller's promise).
    unsafe {
        let config = dls_config_new(identifier.as_ptr(), ptr::null_mut());
        assert!(!config.is_null());
        assert_eq!(dls_config_set_socket(config, socket.as_ptr(), ptr::null_mut()), dls_code::DLS_OK);
        configure(config);
        let mut err = ptr::null_mut();
        let session = dls_session_attach(config, Some(callback), user_data as *const T as *mut c_void, &mut err);
        dls_config_free(config);
        assert!(!session.is_null(), "attach: {:?}", CStr::from_ptr(dls_error_message(err)));
        session
    }
}

/// What the Rust-side callback below saw.
#[derive(Default)]
struct Probe {
    /// (kind, task, error code) of every event.
    events: Mutex<Vec<(dls_event_kind, u64, c_int)>>,
    /// The session, for calls made from inside the callback.
    session: AtomicPtr<dls_session>,
    /// What `dls_session_wait_idle` answered when the callback called it.
    wait_from_callback: Mutex<Option<dls_code>>,
}

unsafe extern "C" fn probe(event: *const dls_event, user_data: *mut c_void) {
    // SAFETY: the library passes a live event, and the test's `Probe` as user_data.
    let (event, probe) = unsafe { (&*event, &*(user_data as *const Probe)) };
    if let Ok(mut events) = probe.events.lock() {
        events.push((event.kind, event.task_id, event.error_code));
    }
    if event.kind == dls_event_kind::DLS_EVENT_COMPLETED {
        let mut idle = false;
        // SAFETY: the session outlives its callbacks; `idle` is writable.
        let code = unsafe {
            dlsession_ffi::dls_session_wait_idle(
                probe.session.load(Ordering::Acquire),
                1000,
                &mut idle,
                ptr::null_mut(),
            )
        };
        if let Ok(mut answer) = probe.wait_from_callback.lock() {
            *answer = Some(code);
        }
    }
}

/// The task functions, called from Rust through the C ABI: suspend, resume, cancel, an
/// unknown task, and what the callback may not do.
#[test]
fn the_c_api_controls_tasks() {
    use dlsession_ffi::*;

    let env = TestEnv::new();
    let daemon = TestDaemon::start(&env);
    // The test server needs a runtime; the library under test brings its own.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(TestServer::start()).unwrap();
    server.add("/slow.bin", Resource::generated(8 << 20, 45).throttle(1 << 20));
    let url = CString::new(server.url("/slow.bin")).unwrap();
    let probe_data = Probe::default();

    // SAFETY: every pointer is live or NULL where the API allows NULL; `probe_data`
    // outlives the session.
    let task = unsafe {
        let session = attach(&env, c"org.example.ffi-control", probe, &probe_data, |_| {});
        probe_data.session.store(session, Ordering::Release);

        let mut task = 0;
        assert_eq!(dls_download(session, url.as_ptr(), ptr::null(), 0, &mut task, ptr::null_mut()), dls_code::DLS_OK);
        assert_ne!(task, 0);
        assert_eq!(dls_task_suspend(session, task, ptr::null_mut()), dls_code::DLS_OK);
        let mut idle = false;
        assert_eq!(dls_session_wait_idle(session, 30_000, &mut idle, ptr::null_mut()), dls_code::DLS_OK);
        assert!(idle, "a suspended task leaves the session idle");
        assert_eq!(dls_task_resume(session, task, ptr::null_mut()), dls_code::DLS_OK);
        assert_eq!(dls_task_cancel(session, task, ptr::null_mut()), dls_code::DLS_OK);
        idle = false;
        assert_eq!(dls_session_wait_idle(session, 60_000, &mut idle, ptr::null_mut()), dls_code::DLS_OK);
        assert!(idle, "idle once the cancellation is delivered");
        // A zero timeout asks whether it is idle now: it is, even with a daemon slow to
        // answer (stopped for 300 ms): the look is not cut short.
        let pid = daemon.pid();
        dlsession_testkit::host::signal(pid, rustix::process::Signal::STOP);
        let resume = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            dlsession_testkit::host::signal(pid, rustix::process::Signal::CONT);
        });
        idle = false;
        assert_eq!(dls_session_wait_idle(session, 0, &mut idle, ptr::null_mut()), dls_code::DLS_OK);
        resume.join().unwrap();
        assert!(idle, "idle, asked with a zero timeout");

        let mut err = ptr::null_mut();
        assert_eq!(dls_task_resume(session, 999_999, &mut err), dls_code::DLS_NO_SUCH_TASK);
        assert_eq!(dls_error_code(err), dls_code::DLS_NO_SUCH_TASK as c_int);
        dls_error_free(err);
        // Another session's task is not this session's to control.
        let theirs = rt.block_on(another_sessions_task(&env, &server.url("/slow.bin")));
        let mut err = ptr::null_mut();
        assert_eq!(dls_task_cancel(session, theirs, &mut err), dls_code::DLS_NO_SUCH_TASK);
        dls_error_free(err);
        let state = rt.block_on(async {
            let client = dlsession_testkit::app::client(&env).await;
            match client.request(dlsession::proto::Request::GetTask { task: theirs }).await.unwrap() {
                dlsession::proto::Response::Task(detail) => detail.info.state,
                other => panic!("{other:?}"),
            }
        });
        assert_eq!(state, dlsession::proto::TaskState::Suspended, "the other session's task is left alone");
        dls_session_free(session);
        task
    };

    // After dls_session_free no callback runs: the probe is ours to read.
    let events = probe_data.events.into_inner().unwrap();
    let cancelled = (dls_event_kind::DLS_EVENT_COMPLETED, task, dls_code::DLS_CANCELLED as c_int);
    assert!(events.contains(&cancelled), "completed with DLS_CANCELLED: {events:?}");
    assert_eq!(
        probe_data.wait_from_callback.into_inner().unwrap(),
        Some(dls_code::DLS_INVALID_ARGUMENT),
        "waiting for idle from the session's own callback is refused, not a deadlock"
    );
}

/// A suspended task of a session of its own.
async fn another_sessions_task(env: &TestEnv, url: &str) -> u64 {
    use dlsession::proto::{Request, Response, TaskSpec};
    let client = dlsession_testkit::app::client(env).await;
    client.request(Request::OpenSession { identifier: "org.example.other".into(), config: None }).await.unwrap();
    let r =
        Request::CreateTasks { identifier: "org.example.other".into(), tasks: vec![TaskSpec::get(url)], resume: false };
    match client.request(r).await.unwrap() {
        Response::TasksCreated(ids) => ids[0],
        other => panic!("{other:?}"),
    }
}

/// What a callback that keeps finished files saw.
#[derive(Default)]
struct Keeper {
    /// Whether it keeps the files it is handed (it could not move them).
    keep: bool,
    /// (task, location, whether the file was there) of every FINISHED_DOWNLOADING and
    /// UPLOAD_RESPONSE (its body).
    finished: Mutex<Vec<(u64, String, bool)>>,
    /// What `dls_event_keep` answered in a COMPLETED callback.
    keep_elsewhere: Mutex<Option<dls_code>>,
}

unsafe extern "C" fn keeper(event: *const dls_event, user_data: *mut c_void) {
    // SAFETY: the library passes a live event, and the test's `Keeper` as user_data.
    let (e, keeper) = unsafe { (&*event, &*(user_data as *const Keeper)) };
    match e.kind {
        dls_event_kind::DLS_EVENT_FINISHED_DOWNLOADING | dls_event_kind::DLS_EVENT_UPLOAD_RESPONSE => {
            // SAFETY: `location` is a live string during the call.
            let location = unsafe { CStr::from_ptr(e.location) }.to_string_lossy().into_owned();
            let there = std::path::Path::new(&location).exists();
            keeper.finished.lock().unwrap().push((e.task_id, location, there));
            if keeper.keep {
                // SAFETY: the event being delivered.
                assert_eq!(unsafe { dlsession_ffi::dls_event_keep(event, ptr::null_mut()) }, dls_code::DLS_OK);
            }
        }
        dls_event_kind::DLS_EVENT_COMPLETED => {
            // SAFETY: the event being delivered (not one that may be kept).
            let code = unsafe { dlsession_ffi::dls_event_keep(event, ptr::null_mut()) };
            *keeper.keep_elsewhere.lock().unwrap() = Some(code);
        }
        _ => {}
    }
}

/// Attaches the session again with a keeper that keeps nothing, until it is idle: what it
/// was handed.
fn attach_again(env: &TestEnv, identifier: &CStr) -> Keeper {
    use dlsession_ffi::*;
    let second = Keeper::default();
    // SAFETY: live pointers or NULL where allowed; `second` outlives the session.
    unsafe {
        let session = attach(env, identifier, keeper, &second, |_| {});
        let mut idle = false;
        assert_eq!(dls_session_wait_idle(session, 60_000, &mut idle, ptr::null_mut()), dls_code::DLS_OK);
        assert!(idle);
        dls_session_free(session);
    }
    second
}

/// A callback that could not move a finished file keeps it with `dls_event_keep`: the file
/// stays in the cache and comes again on the next attach (before, the event was
/// acknowledged and the daemon deleted the download).
#[test]
fn the_c_api_keeps_a_file_the_app_could_not_move() {
    use dlsession_ffi::*;

    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(TestServer::start()).unwrap();
    server.add("/kept.bin", Resource::generated(10_000, 46));
    let url = CString::new(server.url("/kept.bin")).unwrap();
    let first = Keeper { keep: true, ..Keeper::default() };
    // SAFETY: live pointers or NULL where allowed; `first` outlives the session.
    let task = unsafe {
        let session = attach(&env, c"org.example.ffi-keep", keeper, &first, |_| {});
        let mut task = 0;
        assert_eq!(dls_download(session, url.as_ptr(), ptr::null(), 0, &mut task, ptr::null_mut()), dls_code::DLS_OK);
        let mut idle = false;
        assert_eq!(dls_session_wait_idle(session, 60_000, &mut idle, ptr::null_mut()), dls_code::DLS_OK);
        assert!(idle, "idle with its finished file kept");
        dls_session_free(session);
        task
    };
    let seen = first.finished.into_inner().unwrap();
    assert!(matches!(seen.as_slice(), [(t, _, true)] if *t == task), "{seen:?}");

    let second = attach_again(&env, c"org.example.ffi-keep");
    let again = second.finished.into_inner().unwrap();
    assert!(matches!(again.as_slice(), [(t, _, true)] if *t == task), "handed over again, file there: {again:?}");
    assert_eq!(
        second.keep_elsewhere.into_inner().unwrap(),
        Some(dls_code::DLS_INVALID_ARGUMENT),
        "only a finished download may be kept"
    );
}

/// An upload's response body the callback could not move is kept the same way.
#[test]
fn the_c_api_keeps_an_upload_response_the_app_could_not_move() {
    use dlsession_ffi::*;

    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(dlsession_testkit::UploadServer::start(false)).unwrap();
    let file = env.path().join("form.bin");
    std::fs::write(&file, vec![7u8; 5_000]).unwrap();
    let (url, path) = (CString::new(server.url("/files/form")).unwrap(), CString::new(file.to_str().unwrap()).unwrap());
    let first = Keeper { keep: true, ..Keeper::default() };
    // SAFETY: live pointers or NULL where allowed; `first` outlives the session.
    let task = unsafe {
        let session = attach(&env, c"org.example.ffi-keep-upload", keeper, &first, |_| {});
        let mut task = 0;
        let code = dls_upload(
            session,
            url.as_ptr(),
            path.as_ptr(),
            c"PUT".as_ptr(),
            ptr::null(),
            0,
            &mut task,
            ptr::null_mut(),
        );
        assert_eq!(code, dls_code::DLS_OK);
        let mut idle = false;
        assert_eq!(dls_session_wait_idle(session, 60_000, &mut idle, ptr::null_mut()), dls_code::DLS_OK);
        dls_session_free(session);
        task
    };
    let seen = first.finished.into_inner().unwrap();
    assert!(matches!(seen.as_slice(), [(t, _, true)] if *t == task), "{seen:?}");
    let second = attach_again(&env, c"org.example.ffi-keep-upload");
    let again = second.finished.into_inner().unwrap();
    assert!(matches!(again.as_slice(), [(t, _, true)] if *t == task), "handed over again, body there: {again:?}");
}

/// A callback that is still using its session when the app frees it, from another thread.
#[derive(Default)]
struct FreeProbe {
    session: AtomicPtr<dls_session>,
    /// Set once the callback runs (it then waits for the free to begin).
    inside: std::sync::atomic::AtomicBool,
    /// What the session answered the callback after that.
    code: Mutex<Option<dls_code>>,
}

unsafe extern "C" fn free_probe(event: *const dls_event, user_data: *mut c_void) {
    // SAFETY: the library passes a live event, and the test's `FreeProbe` as user_data.
    let (event, probe) = unsafe { (&*event, &*(user_data as *const FreeProbe)) };
    if event.kind != dls_event_kind::DLS_EVENT_COMPLETED || probe.inside.swap(true, Ordering::AcqRel) {
        return;
    }
    // The app's main thread calls dls_session_free meanwhile; it must wait for this call.
    std::thread::sleep(Duration::from_millis(300));
    let mut err = ptr::null_mut();
    // SAFETY: the session lives until its running callback returns (the header's promise).
    let code = unsafe { dlsession_ffi::dls_task_suspend(probe.session.load(Ordering::Acquire), 999_999, &mut err) };
    // SAFETY: an error the call stored, freed once.
    unsafe { dlsession_ffi::dls_error_free(err) };
    if let Ok(mut seen) = probe.code.lock() {
        *seen = Some(code);
    }
}

/// `dls_session_free` while the session's callback runs and calls it: the free waits, and
/// the session is whole until the callback returns (it was freed first, then waited for).
#[test]
fn a_session_freed_while_its_callback_uses_it_stays_whole_until_the_callback_returns() {
    use dlsession_ffi::*;

    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(TestServer::start()).unwrap();
    server.add("/small.bin", Resource::generated(1000, 46));
    let url = CString::new(server.url("/small.bin")).unwrap();
    let probe = FreeProbe::default();
    // SAFETY: every pointer is live or NULL where the API allows NULL; `probe` outlives
    // the session.
    unsafe {
        let session = attach(&env, c"org.example.ffi-free", free_probe, &probe, |_| {});
        probe.session.store(session, Ordering::Release);
        let mut task = 0;
        assert_eq!(dls_download(session, url.as_ptr(), ptr::null(), 0, &mut task, ptr::null_mut()), dls_code::DLS_OK);
        dlsession_testkit::wait_for("the callback", Duration::from_secs(30), || {
            probe.inside.load(Ordering::Acquire).then_some(())
        });
        dls_session_free(session);
    }
    assert_eq!(
        probe.code.into_inner().unwrap(),
        Some(dls_code::DLS_NO_SUCH_TASK),
        "the callback's call on its session, made while the session was being freed"
    );
}

/// An upload's response as the callback saw it: status, body read in the callback,
/// headers, truncated, the body file's path.
type SeenResponse = (c_int, Vec<u8>, String, c_int, PathBuf);

/// What the upload callback saw: every (kind, task, code, total bytes), and the response.
#[derive(Default)]
struct UploadProbe {
    events: Mutex<Vec<(dls_event_kind, u64, c_int, i64)>>,
    response: Mutex<Option<SeenResponse>>,
}

unsafe extern "C" fn upload_probe(event: *const dls_event, user_data: *mut c_void) {
    // SAFETY: the library passes a live event, and the test's `UploadProbe` as user_data.
    let (event, probe) = unsafe { (&*event, &*(user_data as *const UploadProbe)) };
    if let Ok(mut events) = probe.events.lock() {
        events.push((event.kind, event.task_id, event.error_code, event.total_bytes_written));
    }
    if event.kind == dls_event_kind::DLS_EVENT_UPLOAD_RESPONSE {
        // SAFETY: the strings of an UPLOAD_RESPONSE are NUL-terminated during the call.
        let (path, headers) = unsafe {
            (
                PathBuf::from(CStr::from_ptr(event.location).to_string_lossy().into_owned()),
                CStr::from_ptr(event.response_headers).to_string_lossy().into_owned(),
            )
        };
        let body = std::fs::read(&path).unwrap_or_default();
        if let Ok(mut response) = probe.response.lock() {
            *response = Some((event.http_status, body, headers, event.body_truncated, path));
        }
    }
}

/// `dls_upload` from Rust through the C ABI: a POST of a file, its SENT progress, the
/// server's response read in the callback, and bad arguments refused.
#[test]
fn the_c_api_uploads_a_file() {
    use dlsession_ffi::*;

    const SIZE: usize = 3 << 20;
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(dlsession_testkit::UploadServer::start(false)).unwrap();
    let mut data = vec![0u8; SIZE];
    dlsession_testkit::fill_pattern(46, 0, &mut data);
    let file = env.path().join("photo.jpg");
    std::fs::write(&file, &data).unwrap();
    let path = CString::new(file.as_os_str().as_bytes()).unwrap();
    let url = CString::new(server.url("/files/photo.jpg")).unwrap();
    let probe_data = UploadProbe::default();

    // SAFETY: every pointer is live or NULL where the API allows NULL; `probe_data`
    // outlives the session.
    let task = unsafe {
        let session = attach(&env, c"org.example.ffi-upload", upload_probe, &probe_data, |_| {});

        let refused = |method: &CStr, path: &CStr, flags: u32| {
            let mut err = ptr::null_mut();
            let code = dls_upload(
                session,
                url.as_ptr(),
                path.as_ptr(),
                method.as_ptr(),
                ptr::null(),
                flags,
                ptr::null_mut(),
                &mut err,
            );
            let message = CStr::from_ptr(dls_error_message(err)).to_string_lossy().into_owned();
            dls_error_free(err);
            (code, message)
        };
        let (code, message) = refused(c"GET", &path, 0);
        assert_eq!(code, dls_code::DLS_INVALID_ARGUMENT, "{message}");
        assert!(message.contains("PUT or POST"), "{message}");
        assert_eq!(refused(c"POST", &path, 2).0, dls_code::DLS_INVALID_ARGUMENT);
        assert_eq!(refused(c"POST", c"/nonexistent/file", 0).0, dls_code::DLS_FILE_ERROR);

        let mut task = 0;
        let code = dls_upload(
            session,
            url.as_ptr(),
            path.as_ptr(),
            c"post".as_ptr(),
            c"image/jpeg".as_ptr(),
            0,
            &mut task,
            ptr::null_mut(),
        );
        assert_eq!(code, dls_code::DLS_OK);
        let mut idle = false;
        assert_eq!(dls_session_wait_idle(session, 60_000, &mut idle, ptr::null_mut()), dls_code::DLS_OK);
        assert!(idle);
        dls_session_free(session);
        task
    };

    assert_eq!(server.file("photo.jpg").as_deref(), Some(&data[..]), "byte-exact on the server");
    let record = server.records().into_iter().last().unwrap();
    assert_eq!((record.method.as_str(), record.header("content-type")), ("POST", Some("image/jpeg")));
    let events = probe_data.events.into_inner().unwrap();
    let sent: Vec<i64> =
        events.iter().filter(|e| e.0 == dls_event_kind::DLS_EVENT_SENT && e.1 == task).map(|e| e.3).collect();
    assert_eq!(sent.last(), Some(&(SIZE as i64)), "SENT ends at the whole file: {events:?}");
    let kinds: Vec<dls_event_kind> = events.iter().filter(|e| e.1 == task).map(|e| e.0).collect();
    let response_at = kinds.iter().position(|k| *k == dls_event_kind::DLS_EVENT_UPLOAD_RESPONSE);
    let completed_at = kinds.iter().position(|k| *k == dls_event_kind::DLS_EVENT_COMPLETED);
    assert!(response_at.is_some() && response_at < completed_at, "the response, then COMPLETED: {kinds:?}");
    assert!(events.contains(&(dls_event_kind::DLS_EVENT_COMPLETED, task, dls_code::DLS_OK as c_int, 0)));
    let (status, body, headers, truncated, path) = probe_data.response.into_inner().unwrap().expect("a response");
    assert!(!path.exists(), "the body's file is deleted once its event is acknowledged: {}", path.display());
    assert_eq!((status, truncated), (201, 0));
    assert!(String::from_utf8_lossy(&body).contains(&dlsession_testkit::sha256_hex(&data)), "read in the callback");
    assert!(headers.lines().any(|l| l == "location: /files/photo.jpg"), "{headers}");
}

/// A challenge as the callback saw it: task, scheme, realm, origin, proxy, round.
type SeenChallenge = (u64, String, Option<String>, String, c_int, u32);

/// What the challenge callback saw.
#[derive(Default)]
struct ChallengeProbe {
    session: AtomicPtr<dls_session>,
    /// Answer challenges from the callback itself (while true).
    answer_inside: std::sync::atomic::AtomicBool,
    challenges: Mutex<Vec<SeenChallenge>>,
    /// (task, code) of every completion, and what answering from the callback gave.
    completed: Mutex<Vec<(u64, c_int)>>,
    answered_inside: Mutex<Option<dls_code>>,
}

unsafe extern "C" fn challenge_probe(event: *const dls_event, user_data: *mut c_void) {
    // SAFETY: the library passes a live event, and the test's `ChallengeProbe` as user_data.
    let (event, probe) = unsafe { (&*event, &*(user_data as *const ChallengeProbe)) };
    match event.kind {
        dls_event_kind::DLS_EVENT_CHALLENGE => {
            // SAFETY: a CHALLENGE's strings are NUL-terminated during the call, the realm NULL or so.
            let text = |p: *const std::ffi::c_char| unsafe {
                p.as_ref().map(|p| CStr::from_ptr(p).to_string_lossy().into_owned())
            };
            let seen = (
                event.task_id,
                text(event.challenge_scheme).unwrap_or_default(),
                text(event.challenge_realm),
                text(event.challenge_origin).unwrap_or_default(),
                event.challenge_proxy,
                event.challenge_round,
            );
            probe.challenges.lock().unwrap().push(seen);
            if probe.answer_inside.load(Ordering::Acquire) {
                // SAFETY: the session outlives its callbacks; the strings are literals.
                let code = unsafe {
                    dlsession_ffi::dls_task_answer_challenge(
                        probe.session.load(Ordering::Acquire),
                        event.task_id,
                        event.challenge_round,
                        dlsession_ffi::DLS_ANSWER_BASIC,
                        c"u".as_ptr(),
                        c"s3cret-pw".as_ptr(),
                        0,
                        ptr::null_mut(),
                    )
                };
                *probe.answered_inside.lock().unwrap() = Some(code);
            }
        }
        dls_event_kind::DLS_EVENT_COMPLETED => probe.completed.lock().unwrap().push((event.task_id, event.error_code)),
        _ => {}
    }
}

/// Challenges through the C ABI: a session that answers them gets DLS_EVENT_CHALLENGE;
/// answered Basic from the callback, the download goes on with the credential; left
/// unanswered, the task waits until `dls_task_answer_challenge` from elsewhere (here FAIL:
/// the server's 401); bad answers are refused.
#[test]
fn the_c_api_answers_challenges() {
    use dlsession_ffi::*;

    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(TestServer::start()).unwrap();
    let good = "Basic dTpzM2NyZXQtcHc="; // u:s3cret-pw
    server.add("/private", Resource::generated(100_000, 47).require_auth(good, "Basic realm=\"files\""));
    server.add("/other", Resource::generated(1_000, 48).require_auth(good, "Basic realm=\"files\""));
    let (private, other) = (CString::new(server.url("/private")).unwrap(), CString::new(server.url("/other")).unwrap());
    let probe_data = ChallengeProbe::default();

    // SAFETY: every pointer is live or NULL where the API allows NULL; `probe_data`
    // outlives the session.
    let (first, second) = unsafe {
        let session = attach(&env, c"org.example.ffi-auth", challenge_probe, &probe_data, |config| {
            assert_eq!(dls_config_set_answers_challenges(config, 1, ptr::null_mut()), dls_code::DLS_OK);
        });
        probe_data.session.store(session, Ordering::Release);

        probe_data.answer_inside.store(true, Ordering::Release);
        let mut first = 0;
        assert_eq!(
            dls_download(session, private.as_ptr(), ptr::null(), 0, &mut first, ptr::null_mut()),
            dls_code::DLS_OK
        );
        let mut idle = false;
        assert_eq!(dls_session_wait_idle(session, 60_000, &mut idle, ptr::null_mut()), dls_code::DLS_OK);
        assert!(idle, "idle once the answered download completed");
        probe_data.answer_inside.store(false, Ordering::Release);

        let mut second = 0;
        assert_eq!(
            dls_download(session, other.as_ptr(), ptr::null(), 0, &mut second, ptr::null_mut()),
            dls_code::DLS_OK
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !probe_data.challenges.lock().unwrap().iter().any(|c| c.0 == second) {
            assert!(std::time::Instant::now() < deadline, "no challenge for the second task");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut err = ptr::null_mut();
        assert_eq!(
            dls_task_answer_challenge(session, second, 1, 9, ptr::null(), ptr::null(), 0, &mut err),
            dls_code::DLS_INVALID_ARGUMENT
        );
        dls_error_free(err);
        let mut err = ptr::null_mut();
        let code =
            dls_task_answer_challenge(session, second, 1, DLS_ANSWER_BASIC, c"u".as_ptr(), ptr::null(), 0, &mut err);
        assert_eq!(code, dls_code::DLS_INVALID_ARGUMENT, "Basic without a password");
        dls_error_free(err);
        let mut err = ptr::null_mut();
        let code =
            dls_task_answer_challenge(session, second, 2, DLS_ANSWER_FAIL, ptr::null(), ptr::null(), 0, &mut err);
        assert_eq!(code, dls_code::DLS_INVALID_REQUEST, "another round than the task's");
        dls_error_free(err);
        let code = dls_task_answer_challenge(
            session,
            second,
            1,
            DLS_ANSWER_FAIL,
            ptr::null(),
            ptr::null(),
            0,
            ptr::null_mut(),
        );
        assert_eq!(code, dls_code::DLS_OK);
        idle = false;
        assert_eq!(dls_session_wait_idle(session, 60_000, &mut idle, ptr::null_mut()), dls_code::DLS_OK);
        assert!(idle);
        dls_session_free(session);
        (first, second)
    };

    // Everything was acknowledged, the answered tasks' later events too: attaching again
    // (as an app that does not hear challenges) brings nothing back. And a challenge in
    // the session, which still asks, is answered FAIL for such an app, unseen.
    let again = ChallengeProbe::default();
    // SAFETY: as above, `again` outlives the session.
    let third = unsafe {
        let session = attach(&env, c"org.example.ffi-auth", challenge_probe, &again, |_| {});
        let mut idle = false;
        assert_eq!(dls_session_wait_idle(session, 60_000, &mut idle, ptr::null_mut()), dls_code::DLS_OK);
        assert!(again.completed.lock().unwrap().is_empty(), "nothing comes again");
        let mut third = 0;
        assert_eq!(
            dls_download(session, other.as_ptr(), ptr::null(), 0, &mut third, ptr::null_mut()),
            dls_code::DLS_OK
        );
        assert_eq!(dls_session_wait_idle(session, 60_000, &mut idle, ptr::null_mut()), dls_code::DLS_OK);
        dls_session_free(session);
        third
    };
    assert!(again.challenges.lock().unwrap().is_empty(), "an app that does not hear challenges sees none");
    assert_eq!(*again.completed.lock().unwrap(), vec![(third, dls_code::DLS_HTTP_STATUS as c_int)]);

    assert_eq!(*probe_data.answered_inside.lock().unwrap(), Some(dls_code::DLS_OK), "answered from the callback");
    let challenges = probe_data.challenges.into_inner().unwrap();
    let origin = format!("http://{}", server.addr());
    assert_eq!(
        challenges,
        vec![
            (first, "Basic".into(), Some("files".into()), origin.clone(), 0, 1),
            (second, "Basic".into(), Some("files".into()), origin, 0, 1)
        ]
    );
    let completed = probe_data.completed.into_inner().unwrap();
    assert!(completed.contains(&(first, dls_code::DLS_OK as c_int)), "{completed:?}");
    assert!(completed.contains(&(second, dls_code::DLS_HTTP_STATUS as c_int)), "{completed:?}");
    let sent = server.requests_for("/private");
    assert_eq!(sent.last().and_then(|r| r.header("authorization")), Some(good));
}

/// A client certificate set through the C ABI is presented to a server that wants one;
/// half a pair is refused.
#[test]
fn the_c_api_presents_a_client_certificate() {
    use dlsession_ffi::*;

    let ca = dlsession_testkit::TestCa::new().unwrap();
    let env = TestEnv::new();
    env.add_config(&format!("extra_ca_file = {:?}", ca.ca_pem_path()));
    let _daemon = TestDaemon::start(&env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(TestServer::start_mutual_tls(&ca)).unwrap();
    server.add("/doc", Resource::generated(10_000, 49));
    let url = CString::new(server.url("/doc")).unwrap();
    let (cert, key) = ca.client_identity();
    let (cert, key) =
        (CString::new(cert.as_os_str().as_bytes()).unwrap(), CString::new(key.as_os_str().as_bytes()).unwrap());
    let dest = env.path().join("doc");
    let dest_c = CString::new(dest.as_os_str().as_bytes()).unwrap();
    let probe_data = Probe::default();

    // SAFETY: every pointer is live or NULL where the API allows NULL; `probe_data`
    // outlives the session.
    let task = unsafe {
        let session = attach(&env, c"org.example.ffi-cert", probe, &probe_data, |config| {
            let mut err = ptr::null_mut();
            assert_eq!(
                dls_config_set_client_certificate(config, cert.as_ptr(), ptr::null(), &mut err),
                dls_code::DLS_INVALID_ARGUMENT
            );
            dls_error_free(err);
            assert_eq!(
                dls_config_set_client_certificate(config, cert.as_ptr(), key.as_ptr(), ptr::null_mut()),
                dls_code::DLS_OK
            );
        });
        probe_data.session.store(session, Ordering::Release);
        let mut task = 0;
        assert_eq!(
            dls_download(session, url.as_ptr(), dest_c.as_ptr(), 0, &mut task, ptr::null_mut()),
            dls_code::DLS_OK
        );
        let mut idle = false;
        assert_eq!(dls_session_wait_idle(session, 60_000, &mut idle, ptr::null_mut()), dls_code::DLS_OK);
        dls_session_free(session);
        task
    };
    let events = probe_data.events.into_inner().unwrap();
    assert!(events.contains(&(dls_event_kind::DLS_EVENT_COMPLETED, task, dls_code::DLS_OK as c_int)), "{events:?}");
    assert_eq!(sha256_file(&dest).unwrap(), to_hex(&pattern_sha256(49, 10_000)));
}

/// The ctypes snippet of ffi/README.md, run as written (with this build's library, a
/// local URL and a destination of the test's own) by the system's Python.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_snippet_in_the_ffi_readme_downloads_a_file() {
    let python = Path::new("/usr/bin/python3");
    assert!(python.exists(), "/usr/bin/python3 is needed (apt-get install python3)");
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ffi/README.md")).unwrap();
    let snippet = readme
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a ```python block in ffi/README.md");
    let env = TestEnv::new();
    let _daemon = TestDaemon::start(&env);
    let server = TestServer::start().await.unwrap();
    server.add("/py.bin", Resource::generated(1 << 20, 43));
    let dest = env.path().join("py.bin");
    let library = profile_dir().join("deps/libdlsession_ffi.so");
    assert!(library.exists(), "{} is built with this test (a dev-dependency)", library.display());
    let script = snippet
        .replace("target/release/libdlsession_ffi.so", &library.display().to_string())
        .replace("https://example.org/f.iso", &server.url("/py.bin"))
        .replace("/tmp/f.iso", &dest.display().to_string());
    assert_ne!(script, snippet, "the snippet names the library, a URL and a destination");
    let mut cmd = env.command(python);
    cmd.arg("-c").arg(&script);
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "python failed:\n{}", show(&output));
    assert_eq!(sha256_file(&dest).unwrap(), to_hex(&pattern_sha256(43, 1 << 20)), "byte-exact file");
    // kind 4 is DLS_EVENT_COMPLETED; error_code 0 is DLS_OK.
    assert!(stdout.lines().any(|l| l.starts_with("4 ") && l.contains(" 0 None")), "a completed event:\n{stdout}");
}
