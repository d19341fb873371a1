//! `dlsessionctl attach SESSION [--move-to DIR] [--takeover]`: stand in for the app.
//!
//! Attaching replaces the session's stored configuration, so the existing one is read
//! first and sent back unchanged. The client library's delegate runs on its own thread;
//! it prints each event and tells the main task through a channel when the session's
//! events are all delivered (or the attachment ended).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dlsession::{DownloadTask, Handled, Session, SessionConfiguration, SessionDelegate, TaskError};
use dlsession_proto::{DetachReason, ErrorCode, LaunchSpec, Request, Response, SessionConfig};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::cli::AttachArgs;
use crate::commands::ctx::Ctx;
use crate::error::{CliError, Exit, Result};
use crate::json::{self, AttachEventJson, ErrorJson};
use crate::output;

/// What the delegate tells the main task.
#[derive(Debug)]
enum Note {
    FinishedEvents,
    /// A task completed (with `--wait`: maybe the session is done now).
    Completed,
    /// Connected again after the daemon restarted.
    Reconnected,
    Detached(DetachReason),
    /// A line could not be written: the event it told of was left unacknowledged.
    OutputFailed(io::Error),
}

pub async fn run(ctx: &Ctx, args: AttachArgs) -> Result<Exit> {
    let move_to = match &args.move_to {
        Some(dir) => Some(prepare_dir(dir)?),
        None => None,
    };
    let client = ctx.connect_or_start(args.app_id.clone()).await?;
    let existing = match client.request(Request::GetSession { identifier: args.session.clone() }).await {
        Ok(Response::Session(info)) => Some(info.config),
        Ok(other) => return Err(CliError::unexpected("session", &other)),
        Err(dlsession::Error::Daemon(e)) if e.code == ErrorCode::NoSuchSession => None,
        Err(e) => return Err(e.into()),
    };
    let existed = existing.is_some();
    let configuration = configuration(&args.session, existing.unwrap_or_default())
        .takeover(args.takeover)
        .client_name(ctx.client_name.clone());

    let (tx, mut rx) = mpsc::unbounded_channel();
    let printer = Printer {
        json: ctx.json,
        move_to,
        notes: tx,
        failed: Arc::new(AtomicBool::new(false)),
        output_failed: AtomicBool::new(false),
        cache_note: AtomicBool::new(false),
        finished_said: AtomicBool::new(false),
    };
    let failed = printer.failed.clone();
    let printer = Arc::new(printer);
    let session = Session::attach_with(&client, configuration, printer.clone()).await?;
    if !existed {
        eprintln!("note: session {} did not exist; it was created (with no tasks)", args.session);
    }
    // Nothing to deliver (and, with --wait, nothing running): the library says nothing of
    // an attach without events, so the command says it is done itself.
    let info = session.info().await?;
    if info.pending_events == 0 && (!args.wait || info.tasks.active() == 0) {
        printer.did_finish_events_for_background_session(&session);
    }
    // The dispatcher holds the other handle; `rx` closes when both are gone.
    drop(printer);
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    // The delegate says when the connection is lost and back.
    let lost = super::ctx::lost_for_good(&client, None);
    tokio::pin!(lost);
    let note = loop {
        let note = tokio::select! {
            note = rx.recv() => note,
            e = &mut lost => return Err(e),
            _ = &mut interrupt => return Ok(Exit::Interrupted),
        };
        match note {
            // Left before the end only when a file could not be moved (it stays pending).
            Some(Note::FinishedEvents | Note::Completed | Note::Reconnected)
                if args.wait && !failed.load(Ordering::Relaxed) =>
            {
                if drained(&client, &args.session).await? {
                    break Some(Note::FinishedEvents);
                }
            }
            Some(Note::Completed | Note::Reconnected) => {}
            other => break other,
        }
    };
    let outcome = match note {
        Some(Note::FinishedEvents | Note::Detached(DetachReason::Invalidated)) => Ok(Exit::Success),
        Some(Note::Detached(DetachReason::TakenOver)) => {
            Err(CliError::local(ErrorCode::SessionInUse, format!("another process took session {} over", args.session)))
        }
        // Only a client that does not reconnect hears this; `attach` reconnects.
        Some(Note::Detached(DetachReason::DaemonShutdown)) => {
            Err(CliError::Client(dlsession::Error::Disconnected { reason: Some("dlsessiond is shutting down".into()) }))
        }
        Some(Note::Completed | Note::Reconnected) | None => {
            Err(CliError::Client(dlsession::Error::Disconnected { reason: None }))
        }
        // Silent (exit 0) for a closed pipe; what was not printed stays for the next attach.
        Some(Note::OutputFailed(e)) => {
            // The library acknowledges what was printed before it ends the session (the
            // printer's channel closes with it); this process must not exit before that.
            let _ = tokio::time::timeout(Duration::from_secs(10), async { while rx.recv().await.is_some() {} }).await;
            Err(CliError::Output(e))
        }
    };
    if matches!(outcome, Ok(Exit::Success)) {
        // Tasks go on; this only ends the attachment politely.
        let _ = tokio::time::timeout(Duration::from_secs(2), session.detach()).await;
    }
    match outcome {
        Ok(Exit::Success) if failed.load(Ordering::Relaxed) => Ok(Exit::Failed),
        other => other,
    }
}

/// Whether the session has no unfinished task and every event was acknowledged. The last
/// acknowledgements may still be on their way: asked again for a moment.
async fn drained(client: &dlsession::Client, identifier: &str) -> Result<bool> {
    for _ in 0..50 {
        let info = match client.request(Request::GetSession { identifier: identifier.to_owned() }).await {
            Ok(Response::Session(info)) => info,
            Ok(other) => return Err(CliError::unexpected("session", &other)),
            // The daemon went away: the reconnect tells again when it is back.
            Err(dlsession::Error::Disconnected { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if info.tasks.active() > 0 {
            return Ok(false);
        }
        if info.pending_events == 0 {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(false)
}

/// Creates `dir` if needed and makes sure files can be created in it, before any
/// event is acknowledged.
fn prepare_dir(dir: &Path) -> Result<PathBuf> {
    let dir = std::path::absolute(dir).map_err(|e| CliError::file("cannot use", dir, &e))?;
    std::fs::create_dir_all(&dir).map_err(|e| CliError::file("cannot create the directory", &dir, &e))?;
    let probe = dir.join(format!(".dlsessionctl-probe-{}", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| CliError::file("cannot create files in", &dir, &e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(dir)
}

/// The stored configuration as a `SessionConfiguration`, so attaching keeps it.
fn configuration(identifier: &str, c: SessionConfig) -> SessionConfiguration {
    let mut s = SessionConfiguration::background(identifier)
        .timeout_for_request(Duration::from_millis(c.timeout_for_request_ms))
        .timeout_for_resource(Duration::from_millis(c.timeout_for_resource_ms))
        .max_connections_per_host(c.max_connections_per_host);
    if let Some(app_id) = c.app_id {
        s = s.app_id(app_id);
    }
    match c.launch {
        Some(LaunchSpec::Command { argv }) => s = s.launch_command(argv),
        Some(LaunchSpec::SystemdUnit { unit }) => s = s.systemd_unit(unit),
        Some(LaunchSpec::DesktopApp { app_id }) => s = s.desktop_app(app_id),
        None => {}
    }
    for h in c.http_headers {
        s = s.header(h.name, h.value);
    }
    if let Some(n) = c.max_concurrent_tasks {
        s = s.max_concurrent_tasks(n);
    }
    if let Some(b) = c.bandwidth_limit {
        s = s.bandwidth_limit(b);
    }
    s
}

/// Prints every event; moves finished files with `--move-to`.
struct Printer {
    json: bool,
    move_to: Option<PathBuf>,
    notes: mpsc::UnboundedSender<Note>,
    /// A file could not be moved.
    failed: Arc<AtomicBool>,
    /// Writing to stdout failed: nothing more is printed or acknowledged.
    output_failed: AtomicBool,
    /// The note about the cache was printed.
    cache_note: AtomicBool,
    /// The last line printed was `finished_events` (it is said once, whether the library
    /// or the command noticed first).
    finished_said: AtomicBool,
}

impl Printer {
    /// Prints one event's line. False when it could not be written (the main task is told
    /// once): an event nobody saw must not be acknowledged, see [`Printer::durable`].
    fn line(&self, human: &str, json: &AttachEventJson) -> bool {
        if self.output_failed.load(Ordering::Acquire) {
            return false;
        }
        let finished = matches!(json, AttachEventJson::FinishedEvents { .. });
        if self.finished_said.swap(finished, Ordering::AcqRel) && finished {
            return true;
        }
        let mut out = io::stdout().lock();
        let written = if self.json { write_json(&mut out, json) } else { writeln!(out, "{human}") };
        match written.and_then(|()| out.flush()) {
            Ok(()) => true,
            Err(e) => {
                if !self.output_failed.swap(true, Ordering::AcqRel) {
                    let _ = self.notes.send(Note::OutputFailed(e));
                }
                false
            }
        }
    }

    /// Prints the line of a durable event, or leaves the event unacknowledged when it could
    /// not be printed: unwinding out of a delegate callback makes the library keep it (and
    /// what follows) for the next attach, and detach. `resume_unwind` runs no panic hook.
    fn durable(&self, human: &str, json: &AttachEventJson) {
        if !self.line(human, json) {
            std::panic::resume_unwind(Box::new("dlsessionctl cannot write its output"));
        }
    }

    /// Reports a finished file that is not moved (no `--move-to`, or gone from the cache:
    /// `note` says so after its path), as a durable event: it is acknowledged.
    fn left_in_place(&self, task: &DownloadTask, location: &Path, note: &str) -> Handled {
        self.durable(
            &format!("finished_downloading task {}: {}{note}", task.id(), location.display()),
            &AttachEventJson::FinishedDownloading {
                task: task.id(),
                location: location.display().to_string(),
                moved_from: None,
                move_error: None,
            },
        );
        Handled::Done
    }
}

fn write_json(out: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value).map_err(io::Error::from)?;
    writeln!(out)
}

impl SessionDelegate for Printer {
    fn did_resume_at_offset(&self, _: &Session, task: &DownloadTask, offset: u64, expected_total: Option<u64>) {
        self.durable(
            &format!("resumed_at_offset task {} at {offset}", task.id()),
            &AttachEventJson::ResumedAtOffset { task: task.id(), offset, expected_total },
        );
    }

    fn finish_downloading(&self, _: &Session, task: &DownloadTask, location: &Path) -> Handled {
        let Some(dir) = &self.move_to else {
            if !self.json && !self.cache_note.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "note: files left in dlsessiond's cache are deleted once acknowledged; --move-to DIR keeps them"
                );
            }
            return self.left_in_place(task, location, "");
        };
        let name = output::file_name_from_url(task.url())
            .or_else(|| location.file_name().map(|n| output::sanitize_file_name(&n.to_string_lossy())))
            .unwrap_or_else(|| output::FALLBACK_FILE_NAME.into());
        match move_into(location, dir, &name) {
            Ok(to) => {
                // The file is safe in DIR whether or not its line is printed: acknowledged.
                self.line(
                    &format!("finished_downloading task {}: {}", task.id(), to.display()),
                    &AttachEventJson::FinishedDownloading {
                        task: task.id(),
                        location: to.display().to_string(),
                        moved_from: Some(location.display().to_string()),
                        move_error: None,
                    },
                );
                Handled::Done
            }
            // Gone from the cache: an earlier attach moved it and was stopped (Ctrl-C, a
            // daemon restart) before its acknowledgement was durable, or it was removed.
            // Held back, the event would fail every attach for ever; nothing is left to keep.
            Err(e) if e.kind() == io::ErrorKind::NotFound && !location.exists() => {
                eprintln!(
                    "note: task {}: its file is no longer in dlsessiond's cache ({}): moved by an earlier attach, or removed",
                    task.id(),
                    location.display()
                );
                self.left_in_place(task, location, " (gone)")
            }
            Err(e) => {
                self.failed.store(true, Ordering::Relaxed);
                let error = CliError::file("cannot move the download to", dir, &e);
                eprintln!("error: task {}: {error}", task.id());
                let info = match &error {
                    CliError::Local(info) => Some(ErrorJson::from(info)),
                    _ => None,
                };
                self.line(
                    &format!("finished_downloading task {}: {}", task.id(), location.display()),
                    &AttachEventJson::FinishedDownloading {
                        task: task.id(),
                        location: location.display().to_string(),
                        moved_from: None,
                        move_error: info,
                    },
                );
                // Not acknowledged: the file stays in dlsessiond's cache and the event comes
                // again on the next attach.
                eprintln!("note: task {} stays in dlsessiond's cache until it is collected (attach again)", task.id());
                Handled::Later
            }
        }
    }

    fn upload_response(&self, _: &Session, task: &DownloadTask, response: &dlsession::UploadResponse) -> Handled {
        // The body is deleted once acknowledged: with --move-to it is kept there.
        let (body, move_error) = match &self.move_to {
            None => (response.body.clone(), None),
            Some(dir) => match move_into(&response.body, dir, &format!("upload-{}-response", task.id())) {
                Ok(to) => (to, None),
                // Gone from the cache (moved by an earlier attach that was stopped before
                // its acknowledgement, or removed): nothing is left to keep (see downloads).
                Err(e) if e.kind() == io::ErrorKind::NotFound && !response.body.exists() => {
                    eprintln!(
                        "note: task {}: its response body is no longer in dlsessiond's cache ({}): moved by an earlier attach, or removed",
                        task.id(),
                        response.body.display()
                    );
                    (response.body.clone(), None)
                }
                Err(e) => {
                    self.failed.store(true, Ordering::Relaxed);
                    let error = CliError::file("cannot move the upload's response to", dir, &e);
                    eprintln!("error: task {}: {error}", task.id());
                    let info = match &error {
                        CliError::Local(info) => Some(ErrorJson::from(info)),
                        _ => None,
                    };
                    (response.body.clone(), info)
                }
            },
        };
        let truncated = if response.body_truncated { ", truncated" } else { "" };
        // Moved into DIR, the body is safe whether or not its line is printed.
        let safe = self.move_to.is_some() && move_error.is_none();
        let move_failed = move_error.is_some();
        let human =
            format!("upload_response task {}: {} (body{truncated}: {})", task.id(), response.status, body.display());
        let json = AttachEventJson::UploadResponse {
            task: task.id(),
            status: response.status,
            body: body.display().to_string(),
            body_truncated: response.body_truncated,
            move_error,
        };
        if safe {
            self.line(&human, &json);
        } else {
            self.durable(&human, &json);
        }
        if move_failed {
            // Not acknowledged, as a download whose move failed: the body stays in
            // dlsessiond's cache and the event comes again on the next attach.
            eprintln!("note: task {} stays in dlsessiond's cache until it is collected (attach again)", task.id());
            return Handled::Later;
        }
        Handled::Done
    }

    fn did_receive_challenge(
        &self,
        _: &Session,
        task: &DownloadTask,
        c: &dlsession::Challenge,
    ) -> Option<dlsession::ChallengeAnswer> {
        // A stand-in never guesses credentials: the challenge stays for the app, or for
        // `dlsessionctl auth`.
        eprintln!(
            "note: task {} waits for credentials ({} at {}); answer with `dlsessionctl auth {} --basic USER` \
             (or --bearer, --header NAME, --fail, --cancel)",
            task.id(),
            c.scheme,
            c.origin,
            task.id()
        );
        None
    }

    fn did_complete_with_error(&self, _: &Session, task: &DownloadTask, error: Option<&TaskError>) {
        let human = match error {
            None => format!("completed task {}", task.id()),
            Some(e) => format!("completed task {}: {}", task.id(), output::error(e)),
        };
        self.durable(&human, &AttachEventJson::Completed { task: task.id(), error: json::error(error) });
        let _ = self.notes.send(Note::Completed);
    }

    fn did_lose_connection(&self, _: &Session, reason: &str) {
        eprintln!("note: lost the connection to dlsessiond ({reason}); connecting again");
    }

    fn did_reconnect(&self, _: &Session) {
        eprintln!("note: connected to dlsessiond again");
        let _ = self.notes.send(Note::Reconnected);
    }

    fn did_finish_events_for_background_session(&self, session: &Session) {
        self.line(
            "finished_events: every event was delivered",
            &AttachEventJson::FinishedEvents { session: session.identifier().to_owned() },
        );
        let _ = self.notes.send(Note::FinishedEvents);
    }

    fn did_become_invalid(&self, _: &Session, error: Option<&TaskError>) {
        let human = match error {
            None => "did_become_invalid".to_owned(),
            Some(e) => format!("did_become_invalid: {}", output::error(e)),
        };
        self.durable(&human, &AttachEventJson::DidBecomeInvalid { error: json::error(error) });
    }

    fn did_detach(&self, _: &Session, reason: DetachReason) {
        self.line(&format!("detached: {}", reason.as_str()), &AttachEventJson::Detached { reason: reason.as_str() });
        let _ = self.notes.send(Note::Detached(reason));
    }
}

/// `name`, then `stem (1).ext`, `stem (2).ext`…
fn numbered(name: &str, n: u32) -> String {
    if n == 0 {
        return name.to_owned();
    }
    match name.rfind('.') {
        Some(dot) if dot > 0 => {
            let (stem, ext) = name.split_at(dot);
            format!("{stem} ({n}){ext}")
        }
        _ => format!("{name} ({n})"),
    }
}

/// Moves `from` into `dir` as `name` (numbered if taken); never replaces a file.
fn move_into(from: &Path, dir: &Path, name: &str) -> io::Result<PathBuf> {
    for n in 0..1000 {
        let to = dir.join(numbered(name, n));
        match place(from, &to) {
            Ok(()) => return Ok(to),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("too many files named like {name}")))
}

/// A rename that fails if `to` exists: a hard link then unlink, or (across file systems,
/// or where links are not supported) a copy into a new file then unlink.
fn place(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::hard_link(from, to) {
        Ok(()) => {
            // The new name durable before the old goes (and before the event is
            // acknowledged, which lets the daemon forget the file).
            sync_dir_of(to);
            let _ = std::fs::remove_file(from);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(e),
        Err(_) => copy_new(from, to),
    }
}

/// Copies `from` to a temporary name beside `to`, then gives it the name `to` (never
/// replacing a file there): stopped midway (Ctrl-C), it leaves no half file named `to`.
fn copy_new(from: &Path, to: &Path) -> io::Result<()> {
    let name = to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = to.with_file_name(format!(".{name}.dlsessionctl-{}.tmp", std::process::id()));
    let mut src = File::open(from)?;
    let mut dst = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    let copied =
        io::copy(&mut src, &mut dst).and_then(|_| dst.sync_all()).and_then(|()| match std::fs::hard_link(&tmp, to) {
            // Where links are not kept, a rename after a look (a file made there in that
            // instant would be replaced).
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists && !to.exists() => std::fs::rename(&tmp, to),
            other => other,
        });
    let _ = std::fs::remove_file(&tmp);
    copied?;
    sync_dir_of(to);
    let _ = std::fs::remove_file(from);
    Ok(())
}

/// Makes the directory entry of `path` durable (after a power cut the file is there). Best
/// effort: the file is in place already, and a directory that cannot be read (a drop box,
/// mode 0333) or synced must not make a move that worked count as failed.
fn sync_dir_of(path: &Path) {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        eprintln!("warning: cannot sync {} after moving a file there: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlsession_proto::Header;

    #[test]
    fn configuration_is_carried_over() {
        let c = SessionConfig {
            app_id: Some("org.example.app".into()),
            launch: Some(LaunchSpec::Command { argv: vec!["/bin/app".into(), "--bg".into()] }),
            http_headers: vec![Header::new("X-A", "1")],
            timeout_for_request_ms: 1234,
            timeout_for_resource_ms: 99_999,
            max_connections_per_host: 2,
            max_concurrent_tasks: Some(3),
            bandwidth_limit: Some(4096),
        };
        assert_eq!(configuration("s", c.clone()).config(), &c);
        let d = SessionConfig::default();
        assert_eq!(configuration("s", d.clone()).config(), &d);
        let unit = SessionConfig { launch: Some(LaunchSpec::SystemdUnit { unit: "app@.service".into() }), ..d };
        assert_eq!(configuration("s", unit.clone()).config(), &unit);
    }

    #[test]
    fn numbered_names() {
        assert_eq!(numbered("a.bin", 0), "a.bin");
        assert_eq!(numbered("a.bin", 1), "a (1).bin");
        assert_eq!(numbered("README", 2), "README (2)");
        assert_eq!(numbered(".hidden", 1), ".hidden (1)");
    }

    #[test]
    fn moves_never_replace() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("a.bin"), b"old").unwrap();
        std::fs::write(&src, b"new").unwrap();
        let to = move_into(&src, &out, "a.bin").unwrap();
        assert_eq!(to, out.join("a (1).bin"));
        assert_eq!(std::fs::read(&to).unwrap(), b"new");
        assert_eq!(std::fs::read(out.join("a.bin")).unwrap(), b"old");
        assert!(!src.exists());
        assert_eq!(move_into(&src, &out, "b").unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn copies_into_new_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"data").unwrap();
        let taken = dir.path().join("taken");
        std::fs::write(&taken, b"x").unwrap();
        assert_eq!(copy_new(&src, &taken).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        let to = dir.path().join("new");
        copy_new(&src, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"data");
        assert!(!src.exists());
    }
}
