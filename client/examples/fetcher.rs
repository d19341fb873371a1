//! `fetcher`: a small app that hands downloads to dlsessiond and goes away; the daemon
//! finishes them and brings the app back to collect the files.
//!
//! ```text
//! fetcher start --dir DIR URL...   create the downloads, register for relaunch, exit
//! fetcher collect --dir DIR        rejoin, move finished files into DIR, exit when done
//!                                  (the command the daemon runs when it relaunches the app)
//! fetcher serve --dir DIR          stay running; when the daemon wakes this app, rejoin and collect
//! ```
//!
//! Options: `--session ID` (default `org.example.fetcher`), `--log FILE` (append one line
//! per event). Test hooks: `--crash-once MARKER` (on a run where MARKER does not exist yet,
//! create it and abort while handling the first finished file, before acknowledging) and
//! `--hold FILE` (collect: wait until FILE exists before rejoining).
//!
//! Try it against a local server: `cargo run -p dlsession-testkit --bin dlsession-serve`
//! prints a URL on 127.0.0.1; then `cargo run -p dlsession --example fetcher -- start --dir
//! /tmp/got URL`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use dlsession::{
    Client, ClientOptions, DownloadRequest, DownloadTask, Session, SessionConfiguration, SessionDelegate, TaskError,
    WakeHandler,
};
use tokio::sync::mpsc;

const APP_ID: &str = "org.example.fetcher";

#[derive(Debug, Clone)]
struct Options {
    command: String,
    dir: PathBuf,
    session: String,
    log: Option<PathBuf>,
    crash_once: Option<PathBuf>,
    hold: Option<PathBuf>,
    urls: Vec<String>,
}

fn parse() -> anyhow::Result<Options> {
    let mut args = std::env::args().skip(1);
    let command = args.next().context("usage: fetcher start|collect|serve --dir DIR [URL...]")?;
    let mut o = Options {
        command,
        dir: PathBuf::new(),
        session: std::env::var("DLSESSION_IDENTIFIER").unwrap_or_else(|_| APP_ID.to_owned()),
        log: None,
        crash_once: None,
        hold: None,
        urls: Vec::new(),
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--dir" => o.dir = PathBuf::from(value()?),
            "--session" => o.session = value()?,
            "--log" => o.log = Some(PathBuf::from(value()?)),
            "--crash-once" => o.crash_once = Some(PathBuf::from(value()?)),
            "--hold" => o.hold = Some(PathBuf::from(value()?)),
            url => o.urls.push(url.to_owned()),
        }
    }
    if o.dir.as_os_str().is_empty() {
        bail!("--dir DIR is required");
    }
    o.dir = std::path::absolute(&o.dir)?;
    Ok(o)
}

/// The session configuration: the same every time the app runs, so rejoining keeps it.
fn configuration(o: &Options) -> anyhow::Result<SessionConfiguration> {
    let exe = std::env::current_exe()?.to_string_lossy().into_owned();
    let mut relaunch = vec![exe, "collect".into(), "--dir".into(), o.dir.to_string_lossy().into_owned()];
    relaunch.extend(["--session".into(), o.session.clone()]);
    for (flag, path) in [("--log", &o.log), ("--crash-once", &o.crash_once), ("--hold", &o.hold)] {
        if let Some(p) = path {
            relaunch.extend([flag.to_owned(), p.to_string_lossy().into_owned()]);
        }
    }
    Ok(SessionConfiguration::background(&o.session).app_id(APP_ID).launch_command(relaunch).client_name("fetcher"))
}

/// Appends a line to the log file (and prints it).
fn log(o: &Options, line: &str) {
    let line = format!("pid={} {line}", std::process::id());
    println!("{line}");
    if let Some(path) = &o.log
        && let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// What the delegate tells the main task.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Signal {
    Completed,
    /// Every event queued while the app was away has been handled.
    Drained,
}

/// Moves finished files into the output directory and reports progress to `done`.
struct Collector {
    options: Options,
    done: mpsc::UnboundedSender<Signal>,
}

impl SessionDelegate for Collector {
    fn did_resume_at_offset(&self, _: &Session, task: &DownloadTask, offset: u64, _: Option<u64>) {
        log(&self.options, &format!("resumed task={} offset={offset}", task.id()));
    }

    fn did_finish_downloading_to(&self, _: &Session, task: &DownloadTask, location: &Path) {
        if let Some(marker) = &self.options.crash_once
            && !marker.exists()
        {
            let _ = std::fs::write(marker, b"crashed once");
            log(&self.options, &format!("crashing task={} location={}", task.id(), location.display()));
            std::process::abort();
        }
        let name = file_name(task.url());
        let to = self.options.dir.join(format!("{}-{name}", task.id()));
        let moved = std::fs::create_dir_all(&self.options.dir)
            .and_then(|_| std::fs::rename(location, &to).or_else(|_| std::fs::copy(location, &to).map(|_| ())));
        match moved {
            Ok(()) => log(&self.options, &format!("finished task={} file={}", task.id(), to.display())),
            Err(e) => log(&self.options, &format!("finished task={} move-failed={e}", task.id())),
        }
    }

    fn did_complete_with_error(&self, _: &Session, task: &DownloadTask, error: Option<&TaskError>) {
        match error {
            None => log(&self.options, &format!("completed task={} ok", task.id())),
            Some(e) => log(&self.options, &format!("completed task={} error={}", task.id(), e.code)),
        }
        let _ = self.done.send(Signal::Completed);
    }

    fn did_finish_events_for_background_session(&self, session: &Session) {
        log(&self.options, &format!("finished_events session={}", session.identifier()));
        let _ = self.done.send(Signal::Drained);
    }
}

/// The last path segment of a URL, made safe as a file name.
fn file_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or("");
    let last = path.rsplit('/').next().unwrap_or("");
    let safe: String = last.chars().filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c)).collect();
    if safe.is_empty() || safe.starts_with('.') { "download".into() } else { safe }
}

async fn start(o: &Options) -> anyhow::Result<()> {
    if o.urls.is_empty() {
        bail!("start needs at least one URL");
    }
    let (done, _) = mpsc::unbounded_channel();
    let session = Session::attach(configuration(o)?, Collector { options: o.clone(), done }).await?;
    let requests = o.urls.iter().map(|u| DownloadRequest::new(u.as_str()).description(u.as_str())).collect();
    let tasks = session.download_tasks(requests, true).await?;
    for t in &tasks {
        log(o, &format!("created task={} url={}", t.id(), t.url()));
    }
    session.detach().await?;
    log(o, "exiting; the daemon will relaunch this app when the downloads are done");
    Ok(())
}

/// Rejoins and handles events until nothing of this session is left to do.
async fn collect(o: &Options) -> anyhow::Result<()> {
    log(
        o,
        &format!(
            "collect reason={} identifier={}",
            std::env::var("DLSESSION_WAKE_REASON").unwrap_or_else(|_| "manual".into()),
            std::env::var("DLSESSION_IDENTIFIER").unwrap_or_default()
        ),
    );
    if let Some(hold) = &o.hold {
        while !hold.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (done, mut signals) = mpsc::unbounded_channel();
    let session = Session::attach(configuration(o)?, Collector { options: o.clone(), done }).await?;
    let tasks = session.get_all_tasks().await?;
    log(o, &format!("rejoined tasks={}", tasks.len()));
    wait_until_idle(&session, &mut signals).await
}

/// Returns once every queued event was handled (`did_finish_events…`) and the daemon has
/// nothing left to do or deliver for this session.
async fn wait_until_idle(session: &Session, signals: &mut mpsc::UnboundedReceiver<Signal>) -> anyhow::Result<()> {
    let mut drained = false;
    loop {
        // Woken by the delegate, or every half second while acknowledgements land.
        match tokio::time::timeout(Duration::from_millis(500), signals.recv()).await {
            Ok(Some(Signal::Drained)) => drained = true,
            Ok(Some(Signal::Completed)) | Err(_) => {}
            Ok(None) => bail!("the session's event handling ended"),
        }
        let info = session.info().await?;
        if drained && info.tasks.active() == 0 && info.pending_events == 0 {
            return Ok(());
        }
    }
}

struct Rejoin {
    options: Options,
    done: mpsc::UnboundedSender<Signal>,
}

impl WakeHandler for Rejoin {
    fn rejoin(&self, identifier: &str) -> Option<(SessionConfiguration, Arc<dyn SessionDelegate>)> {
        let options = Options { session: identifier.to_owned(), ..self.options.clone() };
        log(&options, &format!("woken identifier={identifier}"));
        let config = configuration(&options).ok()?;
        Some((config, Arc::new(Collector { options, done: self.done.clone() })))
    }
}

/// Stays connected as the app; exits after the first woken session is collected.
async fn serve(o: &Options) -> anyhow::Result<()> {
    let client = Client::connect(ClientOptions {
        app_id: Some(APP_ID.into()),
        client_name: "fetcher".into(),
        ..ClientOptions::default()
    })
    .await?;
    let (done, mut signals) = mpsc::unbounded_channel();
    client.handle_wakes(Rejoin { options: o.clone(), done });
    log(o, "serving");
    let mut drained = false;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), signals.recv()).await {
            Ok(Some(Signal::Drained)) => drained = true,
            Ok(Some(Signal::Completed)) | Err(_) => {}
            Ok(None) => bail!("event handling ended"),
        }
        let info = client.request(dlsession::proto::Request::GetSession { identifier: o.session.clone() }).await;
        if let Ok(dlsession::proto::Response::Session(s)) = info
            && drained
            && s.tasks.active() == 0
            && s.pending_events == 0
        {
            log(o, "collected everything");
            return Ok(());
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let result = match parse() {
        Ok(o) => match o.command.as_str() {
            "start" => start(&o).await,
            "collect" => collect(&o).await,
            "serve" => serve(&o).await,
            other => Err(anyhow::anyhow!("unknown command {other:?}: use start, collect or serve")),
        },
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fetcher: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
