//! `dlsessionctl get URL... [-i FILE] [-o PATH | -d DIR] [--wait] …`
//!
//! Everything that can be checked locally (flag combinations, headers, checksum,
//! launch command, destinations) is checked before the daemon is contacted, so a usage
//! error never leaves half a batch behind. The tasks are then created and started in
//! one `CreateTasks` request.

use dlsession_proto::redact;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use dlsession::Client;
use dlsession_proto::{
    ErrorCode, Event, Header, LaunchSpec, Request, Response, SessionConfig, TaskId, TaskInfo, TaskQuery, TaskSpec,
    TaskState, WatchFilter,
};

use crate::cli::GetArgs;
use crate::commands::ctx::{Ctx, request_ok};
use crate::error::{CliError, Exit, Result};
use crate::json::{self, CreatedJson, FinishedJson};
use crate::output;
use crate::progress::{self, Progress};

/// One download to create.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    url: String,
    destination: PathBuf,
}

/// What the command line asks for, checked.
#[derive(Debug)]
struct Plan {
    items: Vec<Item>,
    headers: Vec<Header>,
    sha256: Option<[u8; 32]>,
    launch: Option<Vec<String>>,
    /// A `-d` directory to create before the downloads finish.
    make_dir: Option<PathBuf>,
}

pub async fn run(ctx: &Ctx, args: GetArgs) -> Result<Exit> {
    let mut urls = args.urls.clone();
    if let Some(list) = &args.input {
        urls.extend(read_url_list(list)?);
    } else if urls.is_empty() {
        return Err(CliError::usage("no URL given: pass URLs as arguments or in a file with -i FILE"));
    }
    if urls.is_empty() {
        eprintln!("nothing to download: the URL list is empty");
        return Ok(Exit::Success);
    }
    let cwd = std::env::current_dir().map_err(|e| CliError::file("cannot determine", Path::new("."), &e))?;
    let plan = plan(&args, urls, &cwd)?;
    prepare_files(&plan, args.overwrite)?;

    let client = ctx.connect_or_start(None).await?;
    let opened = open_session(&client, &args.session, args.app_id.clone(), plan.launch.clone(), args.per_host).await?;
    if args.session == DEFAULT_SESSION {
        collect_earlier(&client, &args.session).await;
    }
    let specs: Vec<TaskSpec> = plan
        .items
        .iter()
        .map(|item| {
            let mut spec = TaskSpec::get(item.url.clone());
            spec.headers = plan.headers.clone();
            spec.priority = args.priority;
            spec.expected_sha256 = plan.sha256;
            spec.destination = item.destination.to_str().map(str::to_owned);
            spec.overwrite = args.overwrite;
            if args.session == DEFAULT_SESSION {
                spec.description = Some(collected_by_the_next_get(args.wait));
            }
            spec
        })
        .collect();
    // Heard from here on: a Ctrl-C while the tasks are being made is never the default
    // exit (before, it still is: nothing is made yet).
    let mut interrupt = interrupt_signal()?;
    // In batches of at most 1,000 (each one transaction): any number of URLs fits.
    let ids = match client.create_tasks(&args.session, specs, true).await {
        Ok(ids) => ids,
        Err(e) => {
            undo_open(&client, &args.session, opened).await;
            return Err(e.into());
        }
    };
    {
        let mut out = std::io::stdout().lock();
        for (id, item) in ids.iter().zip(&plan.items) {
            let destination = item.destination.display().to_string();
            if ctx.json {
                let line = CreatedJson {
                    task: *id,
                    session: &args.session,
                    url: redact::url(&item.url),
                    destination: &destination,
                };
                serde_json::to_writer(&mut out, &line).map_err(std::io::Error::from)?;
                writeln!(out)?;
            } else {
                writeln!(out, "task {id}: {} -> {destination}", redact::url(&item.url))?;
            }
        }
        out.flush()?;
    }
    if !args.wait {
        if interrupted_meanwhile(&mut interrupt).await {
            return Ok(interrupted_after_making(&args.session));
        }
        if !ctx.json {
            let collect = if args.session == DEFAULT_SESSION {
                "the next `dlsessionctl get` collects their results".to_owned()
            } else {
                format!(
                    "their results wait in session {} for `dlsessionctl attach {}` or its app",
                    args.session,
                    shell_words::quote(&args.session)
                )
            };
            eprintln!(
                "downloading in the background (dlsessiond goes on after this command): follow with \
                 `dlsessionctl watch`, see one with `dlsessionctl show ID`; {collect}; --wait waits here instead"
            );
        }
        return Ok(Exit::Success);
    }
    wait(ctx, &client, &args.session, &ids, Some(interrupt)).await
}

/// SIGINT, listened to from now on: a Ctrl-C while the tasks are being made lets the batch
/// be made whole (killed half-way, its parts made so far would stay suspended, unknown).
pub(super) fn interrupt_signal() -> Result<tokio::signal::unix::Signal> {
    let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
    signal.map_err(|e| CliError::local(dlsession_proto::ErrorCode::Internal, format!("cannot listen for Ctrl-C: {e}")))
}

/// Whether a Ctrl-C came since `signal` was last asked (a moment is given for one the
/// runtime has not handed over yet).
pub(super) async fn interrupted_meanwhile(signal: &mut tokio::signal::unix::Signal) -> bool {
    tokio::time::timeout(std::time::Duration::from_millis(20), signal.recv()).await.is_ok()
}

/// What a Ctrl-C heard while the tasks were being made ends with, without `--wait`.
pub(super) fn interrupted_after_making(session: &str) -> Exit {
    eprintln!(
        "interrupted: the tasks above were made and go on in dlsessiond (see `dlsessionctl tasks --session {session}`)"
    );
    Exit::Interrupted
}

/// The session `get` uses unless told otherwise: the command line's own.
pub(super) const DEFAULT_SESSION: &str = "dlsessionctl";

/// The description of a task a `get` without `--wait` leaves behind: the next `get`
/// collects exactly these, and those of a `get --wait` that is gone (interrupted, or given
/// up on the daemon), never those of one still waiting.
pub(super) const COLLECTED_LATER: &str = "dlsessionctl get (its result is collected by the next get)";
const WAITED_FOR_BY: &str = "dlsessionctl get --wait, pid ";

/// The description of a task made in the command line's own session.
pub(super) fn collected_by_the_next_get(wait: bool) -> String {
    let pid = std::process::id();
    match start_time(pid) {
        Some(start) if wait => format!("{WAITED_FOR_BY}{pid} started {start}"),
        _ => COLLECTED_LATER.to_owned(),
    }
}

/// Whether the next `get` collects a task of this description: left for it, or waited for
/// by a `get --wait` that is no longer running (no process has its pid and start time).
fn collected_now(description: Option<&str>) -> bool {
    let Some(description) = description else { return false };
    if description == COLLECTED_LATER {
        return true;
    }
    let Some((pid, start)) = description.strip_prefix(WAITED_FOR_BY).and_then(|r| r.split_once(" started ")) else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else { return false };
    start_time(pid) != Some(start)
}

/// When process `pid` started (clock ticks after boot: `/proc/PID/stat`, field 22), which
/// tells a process from a later one given the same pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces and parentheses: field 3 on.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Acknowledges the tasks of the command line's own session that an earlier `get`
/// without `--wait` created and that have completed: their files are at their destinations, and without
/// this their events would pile up with no app to collect them. Each result stays in the
/// history (`show ID`); failures are named on stderr so none passes silently.
pub(super) async fn collect_earlier(client: &Client, session: &str) {
    let Some(done) = completed_in(client, session, |t| collected_now(t.description.as_deref())).await else {
        return;
    };
    if done.is_empty() {
        return;
    }
    let ids: Vec<TaskId> = done.iter().map(|t| t.id).collect();
    if let Err(e) = acknowledge(client, &ids).await {
        eprintln!("warning: could not collect the results of earlier tasks: {e}");
        return;
    }
    let failed: Vec<String> = done.iter().filter(|t| t.error.is_some()).map(|t| t.id.to_string()).collect();
    if failed.is_empty() {
        eprintln!("collected {} earlier task(s), all succeeded", done.len());
    } else {
        eprintln!(
            "collected {} earlier task(s); {} failed: see `dlsessionctl show ID` for task {}",
            done.len(),
            failed.len(),
            failed.join(", ")
        );
    }
}

/// Reads URLs, one per line; blank lines and `#` comments are skipped. `-` is stdin.
fn read_url_list(path: &Path) -> Result<Vec<String>> {
    let text = if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| CliError::file("cannot read URLs from", path, &e))?;
        s
    } else {
        std::fs::read_to_string(path).map_err(|e| CliError::file("cannot read the URL list", path, &e))?
    };
    Ok(parse_url_list(&text))
}

fn parse_url_list(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
}

/// Checks the flags and works out each URL's destination.
fn plan(args: &GetArgs, urls: Vec<String>, cwd: &Path) -> Result<Plan> {
    // `host:port/path` was refused as the unsupported scheme `host`: say what is missing
    // (`file:/x` and the like keep the daemon's refusal).
    let bare = |u: &&String| {
        let host = u.split('/').next().unwrap_or_default();
        let looks_like_a_host = host.contains('.') || host.contains(':') || host == "localhost";
        !u.contains("://")
            && looks_like_a_host
            && url::Url::parse(u).map_or(true, |p| p.scheme() == "localhost" || p.scheme().contains('.'))
    };
    if let Some(bare) = urls.iter().find(bare) {
        return Err(CliError::usage(format!("{bare:?} is not a URL: write http://{bare} or https://{bare}")));
    }
    if args.output.is_some() && urls.len() != 1 {
        return Err(CliError::usage(format!(
            "-o names the file of a single URL, but {} URLs were given; use -d DIR for several",
            urls.len()
        )));
    }
    let sha256 = match &args.sha256 {
        Some(_) if urls.len() != 1 => {
            return Err(CliError::usage(format!(
                "--sha256 checks a single download, but {} URLs were given",
                urls.len()
            )));
        }
        Some(hex) => Some(
            dlsession_proto::validate::parse_sha256_hex(hex.trim())
                .map_err(|e| CliError::usage(format!("--sha256: {}", e.message)))?,
        ),
        None => None,
    };
    let headers = args
        .headers
        .iter()
        .map(|h| output::parse_header(h).map(|(n, v)| Header::new(n, v)).map_err(CliError::usage))
        .collect::<Result<Vec<_>>>()?;
    let launch = match &args.launch_cmd {
        Some(cmd) => {
            let mut argv = shell_words::split(cmd).map_err(|e| CliError::usage(format!("--launch-cmd: {e}")))?;
            if argv.is_empty() {
                return Err(CliError::usage("--launch-cmd is empty"));
            }
            // `./myapp` means this directory's: the daemon starts apps in the home directory.
            if let Some(program) = argv.first_mut()
                && program.contains('/')
                && !program.starts_with('/')
            {
                *program = cwd.join(&*program).to_string_lossy().into_owned();
            }
            Some(argv)
        }
        None => None,
    };
    let items = destinations(urls, args.output.as_deref(), args.dir.as_deref(), cwd)?;
    Ok(Plan { items, headers, sha256, launch, make_dir: args.dir.as_ref().map(|d| cwd.join(d)) })
}

/// Each URL's absolute destination; two URLs may not share one.
fn destinations(urls: Vec<String>, output: Option<&Path>, dir: Option<&Path>, cwd: &Path) -> Result<Vec<Item>> {
    let mut items = Vec::with_capacity(urls.len());
    let mut taken: HashMap<PathBuf, String> = HashMap::new();
    for url in urls {
        let name = output::file_name_from_url(&url);
        let destination = match (output, dir) {
            (Some(o), _) => {
                // `-o new/` names a directory that is not there (the daemon would refuse
                // it as no file name, after starting).
                if o.as_os_str().as_encoded_bytes().ends_with(b"/") && !cwd.join(o).is_dir() {
                    return Err(CliError::usage(format!(
                        "-o {} names a directory that does not exist; create it, or give a file name",
                        o.display()
                    )));
                }
                let o = cwd.join(o);
                if o.is_dir() { o.join(name.as_deref().unwrap_or(output::FALLBACK_FILE_NAME)) } else { o }
            }
            (None, Some(d)) => cwd.join(d).join(name.as_deref().unwrap_or(output::FALLBACK_FILE_NAME)),
            (None, None) => cwd.join(name.as_deref().unwrap_or(output::FALLBACK_FILE_NAME)),
        };
        if destination.to_str().is_none() {
            return Err(CliError::usage(format!("destination {} is not valid UTF-8", destination.display())));
        }
        // A string that is not a URL is refused by the daemon with `invalid_url`; its
        // placeholder name says nothing about a clash.
        if name.is_some() {
            if let Some(other) = taken.get(&destination) {
                return Err(CliError::usage(format!(
                    "{} and {} would both be saved as {}; download them separately with -o",
                    redact::url(other),
                    redact::url(&url),
                    destination.display()
                )));
            }
            taken.insert(destination.clone(), url.clone());
        }
        items.push(Item { url, destination });
    }
    Ok(items)
}

/// Creates the `-d` directory and checks that every destination can be written.
fn prepare_files(plan: &Plan, overwrite: bool) -> Result<()> {
    if let Some(dir) = &plan.make_dir {
        if dir.exists() && !dir.is_dir() {
            return Err(CliError::local(ErrorCode::FileError, format!("-d {} is not a directory", dir.display())));
        }
        std::fs::create_dir_all(dir).map_err(|e| CliError::file("cannot create the directory", dir, &e))?;
    }
    // Each directory once: 100,000 URLs into one directory looked at it 200,000 times.
    let mut usable: HashSet<&Path> = HashSet::new();
    for item in &plan.items {
        if let Some(parent) = item.destination.parent()
            && !usable.contains(parent)
        {
            let cannot = |why: String| {
                CliError::local(ErrorCode::FileError, format!("cannot save to {}: {why}", item.destination.display()))
            };
            let dir = parent.display();
            match parent.metadata() {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(cannot(format!("{dir} does not exist")));
                }
                Err(e) => return Err(cannot(format!("cannot look at {dir}: {e}"))),
                Ok(m) if !m.is_dir() => return Err(cannot(format!("{dir} is not a directory"))),
                Ok(_) => {}
            }
            // The daemon runs as this user: where it cannot write, the finished file would
            // wait in its cache until someone makes room (`destination_unavailable`).
            if let Err(e) = rustix::fs::access(parent, rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK) {
                return Err(cannot(format!("cannot write in {dir}: {}", std::io::Error::from(e))));
            }
            usable.insert(parent);
        }
        if !overwrite && item.destination.symlink_metadata().is_ok() {
            return Err(CliError::local(
                ErrorCode::FileError,
                format!("{} already exists (--overwrite replaces it)", item.destination.display()),
            ));
        }
    }
    Ok(())
}

/// Creates the session if needed; sets its app id and relaunch command if asked to,
/// keeping the rest of an existing configuration. Says what it did (see [`undo_open`]).
/// Connections per host of a session `get` creates: a bulk download tool fetches many
/// files from one server at once (like aria2c's `-j16`); app sessions keep the
/// default, 6. Measured on 1,000 files of 100 KiB: 0.41 s with 16, 0.57 s with 6.
const NEW_SESSION_PER_HOST: u32 = 16;

/// What [`open_session`] did, so a command refused afterwards can undo it.
pub(super) enum Opened {
    /// Made the session.
    Made,
    /// Changed an existing session's configuration; this was the one before.
    Changed(SessionConfig),
    /// Left an existing session as it was.
    Kept,
}

/// Undoes [`open_session`] for a command the daemon then refused: a session it made goes
/// (see [`drop_new_session`]), one it reconfigured gets its configuration back.
pub(super) async fn undo_open(client: &Client, identifier: &str, opened: Opened) {
    match opened {
        Opened::Made => drop_new_session(client, identifier).await,
        Opened::Changed(before) => {
            let request = Request::OpenSession { identifier: identifier.to_owned(), config: Some(before) };
            if let Err(e) = client.request(request).await {
                eprintln!("warning: could not put session {identifier}'s configuration back: {e}");
            }
        }
        Opened::Kept => {}
    }
}

pub(super) async fn open_session(
    client: &Client,
    identifier: &str,
    app_id: Option<String>,
    launch: Option<Vec<String>>,
    per_host: Option<u32>,
) -> Result<Opened> {
    let (mut config, exists) = match client.request(Request::GetSession { identifier: identifier.to_owned() }).await {
        Ok(Response::Session(info)) => (info.config, true),
        Ok(other) => return Err(CliError::unexpected("session", &other)),
        Err(dlsession::Error::Daemon(e)) if e.code == ErrorCode::NoSuchSession => {
            (SessionConfig { max_connections_per_host: NEW_SESSION_PER_HOST, ..SessionConfig::default() }, false)
        }
        Err(e) => return Err(e.into()),
    };
    let changed = app_id.is_some() || launch.is_some() || per_host.is_some();
    let before = config.clone();
    if let Some(n) = per_host {
        config.max_connections_per_host = n;
    }
    if let Some(app_id) = app_id {
        config.app_id = Some(app_id);
    }
    if let Some(argv) = launch {
        config.launch = Some(LaunchSpec::Command { argv });
    }
    // An existing session keeps its configuration unless asked to change it.
    let opened = match (exists, changed && config != before) {
        (false, _) => Opened::Made,
        (true, true) => Opened::Changed(before),
        (true, false) => Opened::Kept,
    };
    let config = (changed || !exists).then_some(config);
    match client.request(Request::OpenSession { identifier: identifier.to_owned(), config }).await? {
        Response::Session(_) => Ok(opened),
        other => Err(CliError::unexpected("session", &other)),
    }
}

/// Removes a session this command made when the daemon refused what it was made for, so a
/// failed command leaves no empty session behind. Only a session nobody else uses goes:
/// none attached (the attach below does not take over) and no task in it (another command
/// may have put some there meanwhile, or an earlier batch of this one did). Invalidating
/// leaves a `did_become_invalid` event for the session's app: attached as that app, the
/// command collects it, and the session is gone.
pub(super) async fn drop_new_session(client: &Client, identifier: &str) {
    struct Gone(tokio::sync::Notify);
    impl dlsession::SessionDelegate for Gone {
        fn did_become_invalid(&self, _: &dlsession::Session, _: Option<&dlsession::TaskError>) {
            self.0.notify_one();
        }
    }
    // Looked at before attaching: attaching sets the session's configuration.
    match client.request(Request::GetSession { identifier: identifier.to_owned() }).await {
        Ok(Response::Session(i)) if i.tasks.total() == 0 && i.pending_events == 0 => {}
        _ => return,
    }
    let gone = std::sync::Arc::new(Gone(tokio::sync::Notify::new()));
    let configuration = dlsession::SessionConfiguration::background(identifier);
    let Ok(session) = dlsession::Session::attach_with(client, configuration, gone.clone()).await else { return };
    if session.invalidate_and_cancel().await.is_err() {
        return;
    }
    let patience = std::time::Duration::from_secs(5);
    let _ = tokio::time::timeout(patience, async {
        gone.0.notified().await;
        // The event is acknowledged after the callback returns: wait until the session is gone.
        while client.request(Request::GetSession { identifier: identifier.to_owned() }).await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// How long `wait` hears nothing before it asks for its tasks (then doubling, up to
/// `QUIET_MOST`).
const QUIET_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const QUIET_MOST: std::time::Duration = std::time::Duration::from_secs(60);

/// The session's completed tasks that `keep` keeps, listed a page at a time; `None` if a
/// page could not be had (what came before it is dropped too).
async fn completed_in(client: &Client, session: &str, keep: impl Fn(&TaskInfo) -> bool) -> Option<Vec<TaskInfo>> {
    let mut done = Vec::new();
    let mut query =
        TaskQuery { session: Some(session.to_owned()), states: vec![TaskState::Completed], after: None, limit: 1000 };
    loop {
        let Ok(Response::Tasks(page)) = client.request(Request::ListTasks(query.clone())).await else { return None };
        done.extend(page.tasks.into_iter().filter(|t| keep(t)));
        match page.next_after {
            // A cursor that does not advance would loop for ever.
            Some(next) if query.after.is_none_or(|prev| next > prev) => query.after = Some(next),
            _ => return Some(done),
        }
    }
}

/// Up to this many tasks are watched by id, more by watching their session (a `Watch`
/// naming 210,000 ids does not fit in a frame); its other tasks' news is passed over.
const WATCH_IDS_MAX: usize = 10_000;

/// The tasks of `ids` that are completed, as the daemon says (unknown ones left out). Only
/// while connected, and no further than the first request that fails: a daemon that went
/// away is the watch's to notice, not a wait of a request timeout per task.
async fn completed_among(client: &Client, ids: &HashSet<TaskId>) -> Vec<TaskInfo> {
    let mut done = Vec::new();
    for id in ids {
        if !client.is_connected() {
            break;
        }
        match client.request(Request::GetTask { task: *id }).await {
            Ok(Response::Task(detail)) if detail.info.state == TaskState::Completed => done.push(detail.info),
            Ok(_) => {}
            Err(e) if e.code() == dlsession_proto::ErrorCode::NoSuchTask => {}
            Err(_) => break,
        }
    }
    done
}

/// What `--wait` says on stderr when a task starts waiting for a reason someone may want to
/// act on (a backoff once per error code), with its key: said again only when the key
/// changes, so a log (stderr on a pipe has no progress bars) says why a wait goes on.
/// Queues behind limits, dates and the like are ordinary and go unsaid.
fn wait_note(info: &TaskInfo, now: u64) -> Option<(String, String)> {
    use dlsession_proto::WaitReason as W;
    let (id, w) = (info.id, info.wait.as_ref()?);
    let said = |why: String| Some((why, format!("task {id} waits: {}", crate::output::wait_sentence(w, id, now))));
    match w {
        W::AuthRequired { challenge: c } => Some((
            "credentials".into(),
            format!(
                "task {id} waits for credentials ({} at {}); answer with `dlsessionctl auth {id} --basic USER` (or \
                 --bearer, --header NAME, --fail)",
                c.scheme, c.origin
            ),
        )),
        W::Suspended => Some((
            "paused".into(),
            format!("task {id} is paused; waiting until it is resumed (`dlsessionctl resume {id}`)"),
        )),
        W::Backoff { last_error: e, .. } => said(format!("backoff {}", e.code.as_str())),
        W::DestinationUnavailable { error: e, .. } => said(format!("destination {}", e.code.as_str())),
        W::StorageFull { .. } => said("storage".into()),
        W::NoNetwork { .. } => said("no network".into()),
        W::MeteredNetwork => said("metered".into()),
        W::OnBattery => said("battery".into()),
        W::GlobalLimit { .. }
        | W::HostLimit { .. }
        | W::SessionLimit { .. }
        | W::EarliestBegin { .. }
        | W::EventsPending { .. }
        | W::Discretionary => None,
    }
}

/// Follows the tasks until all are completed, then acknowledges their events.
pub(super) async fn wait(
    ctx: &Ctx,
    client: &Client,
    session: &str,
    ids: &[TaskId],
    interrupt: Option<tokio::signal::unix::Signal>,
) -> Result<Exit> {
    // Subscribe before asking, so nothing sent right after the Watch answer is lost.
    let mut events = client.events();
    let filter = if ids.len() > WATCH_IDS_MAX {
        WatchFilter { session: Some(session.to_owned()), tasks: Vec::new() }
    } else {
        WatchFilter { session: None, tasks: ids.to_vec() }
    };
    request_ok(client, Request::Watch(filter)).await?;
    let mut caught_up = Vec::new();
    let mut quiet = QUIET_FIRST;
    let mut progress = Progress::new(progress::terminal(), false);
    let mut pending: HashSet<TaskId> = ids.iter().copied().collect();
    // Why each task was last said to wait (see `wait_note`).
    let mut noted: HashMap<TaskId, String> = HashMap::new();
    let mut failed = 0usize;
    let mut interrupt = interrupt;
    let interrupted = async {
        match interrupt.as_mut() {
            Some(signal) => signal.recv().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(interrupted);
    let lost = super::ctx::lost_for_good(client, Some(progress.notes()));
    tokio::pin!(lost);
    // Pushed back by news of these tasks only (a session watched whole brings others' too).
    let mut quiet_until = tokio::time::Instant::now() + quiet;
    while !pending.is_empty() {
        let event = tokio::select! {
            biased;
            Some(info) = std::future::ready(caught_up.pop()) => Some(Event::TaskUpdate(info)),
            event = events.recv() => event,
            () = tokio::time::sleep_until(quiet_until) => {
                // Nothing heard for a while: a task that completed before the watch took
                // effect (collected even, by an app attached to the session) sends nothing
                // more. Asked for, less and less often (most waits hear progress instead).
                caught_up = completed_among(client, &pending).await;
                quiet = (quiet * 2).min(QUIET_MOST);
                quiet_until = tokio::time::Instant::now() + quiet;
                continue;
            }
            e = &mut lost => {
                progress.clear();
                return Err(e);
            }
            _ = &mut interrupted => {
                progress.clear();
                let collect = if session == DEFAULT_SESSION { "; the next `dlsessionctl get` collects their results" } else { "" };
                eprintln!(
                    "interrupted: the downloads go on in dlsessiond (see `dlsessionctl tasks --session {session}`){collect}"
                );
                return Ok(Exit::Interrupted);
            }
        };
        let ours = match &event {
            Some(Event::TaskUpdate(info)) => pending.contains(&info.id),
            Some(Event::Progress { task, .. } | Event::SendProgress { task, .. }) => pending.contains(task),
            _ => false,
        };
        if ours {
            quiet_until = tokio::time::Instant::now() + quiet;
        }
        match event {
            None => {
                progress.clear();
                return Err(CliError::Client(dlsession::Error::Disconnected {
                    reason: Some("while waiting for the downloads".into()),
                }));
            }
            Some(Event::TaskUpdate(info)) if pending.contains(&info.id) => {
                if info.state == TaskState::Completed {
                    pending.remove(&info.id);
                    progress.remove(info.id);
                    if info.error.is_some() {
                        failed += 1;
                    }
                    report_finished(ctx, &progress, session, &info)?;
                } else {
                    if let Some((why, note)) = wait_note(&info, crate::output::now_ms())
                        && noted.insert(info.id, why.clone()) != Some(why)
                    {
                        progress.err(&note);
                    }
                    progress.update(&info);
                }
            }
            Some(Event::Progress { task, total_bytes_written, total_bytes_expected, .. })
                if pending.contains(&task) =>
            {
                progress.progress(task, total_bytes_written, total_bytes_expected);
            }
            Some(Event::SendProgress { task, total_bytes_sent, total_bytes_expected_to_send, .. })
                if pending.contains(&task) =>
            {
                progress.progress(task, total_bytes_sent, Some(total_bytes_expected_to_send));
            }
            Some(_) => {}
        }
    }
    progress.clear();
    // The events of these tasks would otherwise wait in the session for an app.
    if let Err(e) = acknowledge(client, ids).await {
        eprintln!("warning: could not acknowledge the tasks' events: {e}");
    }
    Ok(if failed == 0 { Exit::Success } else { Exit::Failed })
}

/// Acknowledges the tasks' events, so they do not wait in the session for an app.
///
/// The daemon emits a task's durable events in the same step that tells watchers it
/// completed, so one request after the last completion covers them all.
async fn acknowledge(client: &Client, ids: &[TaskId]) -> Result<()> {
    match client.acknowledge_tasks(ids).await {
        Ok(()) => Ok(()),
        // An app attached to the session acknowledged some of these already (they are ours:
        // unknown means retired), which refuses a request naming them whole: one by one.
        Err(e) if e.code() == ErrorCode::NoSuchTask => {
            for id in ids {
                match client.acknowledge_tasks(&[*id]).await {
                    Err(e) if e.code() != ErrorCode::NoSuchTask => return Err(e.into()),
                    _ => {}
                }
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn report_finished(ctx: &Ctx, progress: &Progress, session: &str, info: &TaskInfo) -> Result<()> {
    if ctx.json {
        let line = FinishedJson {
            task: info.id,
            session,
            state: info.state.as_str(),
            location: info.location.as_deref(),
            bytes_received: info.bytes_received,
            error: json::error(info.error.as_ref()),
            response_body: info
                .upload
                .as_ref()
                .and(info.location.as_deref())
                .and_then(|at| std::fs::read(at).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
        };
        progress.out(&serde_json::to_string(&line).map_err(std::io::Error::from)?)?;
        return Ok(());
    }
    if let Some(up) = &info.upload {
        // The server's answer, like curl prints it: the body to stdout, a line to stderr.
        let body = info.location.as_deref().map(std::fs::read).transpose();
        match (&info.error, body) {
            (None, Ok(body)) => {
                progress.err(&format!("task {} uploaded {} ({})", info.id, up.file, output::size(up.bytes_total)));
                progress.out_bytes(&body.unwrap_or_default())?;
            }
            // The server's own explanation goes to stdout too, as curl shows it.
            (Some(e), body) => {
                progress.err(&format!("task {} failed: {}", info.id, output::error(e)));
                progress.out_bytes(&body.ok().flatten().unwrap_or_default())?;
            }
            (None, Err(e)) => {
                progress.err(&format!("task {} uploaded {}; its response body is unreadable: {e}", info.id, up.file))
            }
        }
        return Ok(());
    }
    match &info.error {
        None => progress.out(&format!(
            "task {} completed: {} ({})",
            info.id,
            info.location.as_deref().unwrap_or("-"),
            output::size(info.bytes_received)
        ))?,
        Some(e) => progress.err(&format!("task {} failed: {}", info.id, output::error(e))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_waited_for_task_is_collected_once_its_process_is_gone() {
        let own = collected_by_the_next_get(true);
        assert!(own.starts_with(WAITED_FOR_BY), "{own}");
        assert!(!collected_now(Some(&own)), "this process still waits: {own}");
        let start = start_time(std::process::id()).unwrap();
        let gone = format!("{WAITED_FOR_BY}{} started {}", std::process::id(), start + 1);
        assert!(collected_now(Some(&gone)), "the same pid, another process");
        assert!(collected_now(Some(COLLECTED_LATER)));
        assert!(collected_now(Some(&collected_by_the_next_get(false))));
        assert!(!collected_now(Some("an app's own description")));
        assert!(!collected_now(None));
    }

    fn args(argv: &[&str]) -> GetArgs {
        let mut full = vec!["dlsessionctl", "get"];
        full.extend_from_slice(argv);
        match crate::cli::Cli::try_parse_from(full).unwrap().command {
            crate::cli::Command::Get(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn plan_of(argv: &[&str]) -> Result<Plan> {
        let a = args(argv);
        let urls = a.urls.clone();
        plan(&a, urls, Path::new("/work"))
    }

    #[test]
    fn url_lists() {
        assert_eq!(parse_url_list("# c\n\n  http://a/x  \n#http://no\nhttp://b/y\n"), ["http://a/x", "http://b/y"]);
    }

    #[test]
    fn destinations_follow_the_flags() {
        let p = plan_of(&["http://h/a.bin"]).unwrap();
        assert_eq!(p.items[0].destination, Path::new("/work/a.bin"));
        let p = plan_of(&["http://h/a.bin", "-o", "out/b.bin"]).unwrap();
        assert_eq!(p.items[0].destination, Path::new("/work/out/b.bin"));
        let p = plan_of(&["http://h/a.bin", "http://h/x/c%20d", "-d", "/tmp/dl"]).unwrap();
        assert_eq!(p.items[1].destination, Path::new("/tmp/dl/c d"));
        assert_eq!(p.make_dir.as_deref(), Some(Path::new("/tmp/dl")));
        let p = plan_of(&["http://h/"]).unwrap();
        assert_eq!(p.items[0].destination, Path::new("/work/download"));
    }

    #[test]
    fn usage_errors() {
        for argv in [
            &["http://h/a", "http://h/b", "-o", "x"][..],
            &["http://h/a", "http://g/a"],
            &["http://h/a", "http://h/b", "--sha256", &"0".repeat(64)],
            &["http://h/a", "--sha256", "abc"],
            &["http://h/a", "--header", "NoColon"],
            &["http://h/a", "--launch-cmd", "app 'open"],
            &["http://h/a", "--launch-cmd", "  "],
        ] {
            let e = plan_of(argv).unwrap_err();
            assert_eq!(e.exit(), Exit::Usage, "{argv:?}: {e}");
        }
    }

    /// `--launch-cmd` is split as a POSIX shell would, without expansions.
    #[test]
    fn launch_commands_split_like_a_shell() {
        let launch = |cmd: &str| plan_of(&["http://h/a", "--launch-cmd", cmd]).map(|p| p.launch.unwrap_or_default());
        for (cmd, want) in [
            ("  /usr/bin/app   --background\t-v ", &["/usr/bin/app", "--background", "-v"][..]),
            ("app 'a b' \"c d\"", &["app", "a b", "c d"]),
            ("a'b'\"c\"d", &["abcd"]),
            ("x '' \"\"", &["x", "", ""]),
            (r#"'it'\''s'"#, &["it's"]),
            (r"'\n$HOME'", &[r"\n$HOME"]),
            (r"a\ b c", &["a b", "c"]),
            (r#""a\"b\\c\$d\e""#, &[r#"a"b\c$d\e"#]),
            ("a\\\nb", &["ab"]),
        ] {
            assert_eq!(launch(cmd).unwrap(), want, "{cmd:?}");
        }
        for bad in ["app 'oops", "app \"oops", "app \"oops\\"] {
            assert!(launch(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn options_are_carried() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let p = plan_of(&["http://h/a", "--sha256", hex, "-H", "X-A: 1:2", "--launch-cmd", "/usr/bin/app --bg 'a b'"])
            .unwrap();
        assert!(p.sha256.is_some());
        assert_eq!(p.headers, [Header::new("X-A", "1:2")]);
        assert_eq!(p.launch.unwrap(), ["/usr/bin/app", "--bg", "a b"]);
    }
}
