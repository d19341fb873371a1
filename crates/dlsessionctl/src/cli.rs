//! The command line, as clap derive types. Doc comments are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use dlsession_proto::{TaskId, TaskState};

/// Inspect and control dlsessiond, the per-user background download daemon.
///
/// dlsessiond keeps downloads going after the app that started them exits, survives
/// crashes and reboots, and wakes or relaunches the app when its downloads are done.
/// This tool shows what the daemon is doing, starts downloads of its own (`get`), and
/// can stand in for an app (`attach`).
///
/// Exit status: 0 success, 1 the operation or a task failed, 2 usage error,
/// 3 dlsessiond unreachable (not running, could not be started, or stopping),
/// 130 interrupted by Ctrl-C (the downloads go on).
#[derive(Debug, Parser)]
#[command(name = "dlsessionctl", version, max_term_width = 100, after_long_help = EXAMPLES)]
pub struct Cli {
    /// The daemon's socket [default: $DLSESSION_SOCKET, else $DLSESSIOND_SOCKET, else
    /// $XDG_RUNTIME_DIR/dlsessiond/dlsessiond.sock; empty variables count as unset]
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Machine-readable output on stdout: one JSON document, or JSON lines for streams
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// The examples at the end of `dlsessionctl --help`.
const EXAMPLES: &str = "\
Examples:
  dlsessionctl get https://example.org/a.iso -o /tmp/a.iso --wait   download, showing progress
  dlsessionctl get -d /tmp/many -i urls.txt                         many URLs in one batch
  dlsessionctl tasks --state waiting                                what waits, and why
  dlsessionctl show 12                                              everything about task 12
  dlsessionctl watch                                                live progress of active tasks
  dlsessionctl attach org.example.app --move-to ~/Downloads         collect a session's events
  dlsessionctl limit --global 2MiB                                  cap all downloads, live
  dlsessionctl completions bash > ~/.local/share/bash-completion/completions/dlsessionctl

Each command has its own --help, e.g. `dlsessionctl get --help`.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the daemon's version, paths, task counts and throughput
    Status,

    /// List sessions: app, attachment, tasks by state, undelivered events, next wake
    Sessions,

    /// List tasks with their progress, speed, ETA and why they are not running
    Tasks(TasksArgs),

    /// Show everything about one task: URLs, response, validators, bytes, attempts,
    /// last error, why it waits and until when, file paths
    Show(ShowArgs),

    /// Download URLs through the daemon (like wget, but the daemon does the work)
    ///
    /// Creates and starts one task per URL in one batch, prints the task ids and exits;
    /// the downloads go on in dlsessiond. With --wait, shows progress until every task
    /// is done and exits 0 only if all of them succeeded.
    ///
    /// Files land in the current directory under the name from the URL, unless -o or -d
    /// says otherwise. Without --wait, the tasks' completion events stay in the session:
    /// in the default one the next `get` collects them (naming the failed ones); in one
    /// given with --session, `dlsessionctl attach SESSION` does.
    ///
    /// If no daemon is running (and none is provided by systemd's socket), `get` starts
    /// dlsessiond in the background (from DLSESSIOND_PATH, next to dlsessionctl, or on
    /// PATH; log in $XDG_STATE_HOME/dlsessiond/dlsessiond.log, by default
    /// ~/.local/state/…). DLSESSION_NO_AUTOSTART=1 turns that off.
    Get(GetArgs),

    /// Answer a task's request for credentials (a 401, or a proxy's 407, in a session that
    /// asks its app)
    ///
    /// The secret (password, token or header value) is read from stdin, one line, so it
    /// never shows in the process list: `printf %s "$TOKEN" | dlsessionctl auth 12 --bearer`.
    Auth(AuthArgs),

    /// Upload a file through the daemon (like curl -T, but the daemon does the work)
    ///
    /// Creates and starts an upload task (a PUT unless --method POST), prints its id and
    /// exits; the upload goes on in dlsessiond, resuming where the server allows. With
    /// --wait, shows progress until it is done, prints the server's response body to
    /// stdout, and exits 0 only if the server answered with a success.
    ///
    /// The file's size and modification time are recorded now: a file changed before the
    /// upload is done fails it instead of sending a mix.
    Upload(UploadArgs),

    /// Show live progress of active tasks until none is active
    Watch(WatchArgs),

    /// Pause (suspend) a task; it keeps its partial data and can be resumed
    Pause(TaskArg),

    /// Resume a suspended task
    Resume(TaskArg),

    /// Cancel a task; it completes with the error `cancelled`
    Cancel(TaskArg),

    /// Act as a session's app: rejoin it, print each delivered event, exit when all are delivered
    ///
    /// Events are acknowledged as they are printed. A finished file is reported at its
    /// location; once acknowledged, dlsessiond deletes files left in its cache, so use
    /// --move-to DIR to keep them. The session's stored configuration (app id, relaunch
    /// command, headers, limits) is kept.
    Attach(AttachArgs),

    /// Ask the daemon to wake or relaunch a session's app now
    Wake(WakeArgs),

    /// Invalidate a session, to have it removed: it takes no new task, and once its tasks
    /// are done and its events collected (by its app, or by `attach`), the daemon deletes it
    ///
    /// Suspended tasks hold the session back until they are resumed or cancelled; with
    /// --cancel every unfinished task is cancelled now. Finished files already moved to
    /// their destinations stay there; files left in the daemon's cache go with the
    /// session once its events are collected (`attach --move-to DIR` keeps them).
    Invalidate(InvalidateArgs),

    /// Show bandwidth limits, or set one: daemon-wide (--global), of a session (--session
    /// ID) or of a task (--task ID). A new limit applies to running downloads at once and
    /// is kept across restarts; `off` lifts it.
    Limit(LimitArgs),

    /// Show or set a session's policy (or a task's own): when its tasks may run (metered
    /// networks, battery, discretionary, without a network), notifications, and for a
    /// session its cookies, whether it asks its app for credentials, and its client
    /// certificate. Running tasks follow at once.
    Policy(PolicyArgs),

    /// Show or set a session's own proxy, which replaces the daemon's environment for its
    /// downloads: a URL (http://, https://, socks5h://, socks5://, socks4a://, socks4://), `direct`,
    /// or `env` (back to the environment). Passwords in the URL are never shown.
    Proxy(ProxyArgs),

    /// Print a shell completion script (bash, zsh, fish, elvish or powershell) on stdout
    ///
    /// Install it where your shell looks for completions, for example:
    ///
    ///   bash: dlsessionctl completions bash > ~/.local/share/bash-completion/completions/dlsessionctl
    ///   zsh:  dlsessionctl completions zsh > ~/.zfunc/_dlsessionctl   (with ~/.zfunc in $fpath)
    ///   fish: dlsessionctl completions fish > ~/.config/fish/completions/dlsessionctl.fish
    ///
    /// Does not contact dlsessiond.
    #[command(verbatim_doc_comment)]
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct TasksArgs {
    /// Only tasks of this session
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,

    /// Only tasks in this state
    #[arg(long, value_name = "STATE")]
    pub state: Option<StateArg>,
}

/// A task state, as the user types it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    /// Created or paused, not started
    Suspended,
    /// Waiting for a download slot or its start time
    Queued,
    /// Transferring (downloading, or sending an upload's body)
    Running,
    /// Backing off after a transient failure, or waiting (for the network, a destination,
    /// the app's credentials)
    Waiting,
    /// Finished: succeeded, failed or cancelled
    Completed,
}

impl From<StateArg> for TaskState {
    fn from(s: StateArg) -> TaskState {
        match s {
            StateArg::Suspended => TaskState::Suspended,
            StateArg::Queued => TaskState::Queued,
            StateArg::Running => TaskState::Running,
            StateArg::Waiting => TaskState::Waiting,
            StateArg::Completed => TaskState::Completed,
        }
    }
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The task id (see `dlsessionctl tasks`)
    #[arg(value_name = "TASK")]
    pub task: TaskId,
}

#[derive(Debug, Args)]
pub struct TaskArg {
    /// The task id (see `dlsessionctl tasks`)
    #[arg(value_name = "TASK")]
    pub task: TaskId,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// The URLs to download (http or https)
    #[arg(value_name = "URL")]
    pub urls: Vec<String>,

    /// Also read URLs from FILE, one per line ('-' reads stdin; blank lines and lines
    /// starting with '#' are skipped)
    #[arg(short = 'i', long = "input-file", value_name = "FILE")]
    pub input: Option<PathBuf>,

    /// Save the download as PATH (only with a single URL)
    #[arg(short = 'o', long = "output", value_name = "PATH", conflicts_with = "dir")]
    pub output: Option<PathBuf>,

    /// Save the downloads into DIR, named after the last part of each URL (DIR is created
    /// if needed)
    #[arg(short = 'd', long = "dir", value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// The session the tasks belong to
    #[arg(long, value_name = "ID", default_value = "dlsessionctl")]
    pub session: String,

    /// Set the session's app id: the app dlsessiond wakes when the downloads are done
    #[arg(long, value_name = "ID")]
    pub app_id: Option<String>,

    /// Set the session's relaunch command, run (without a shell) when the downloads are
    /// done and the app is not running; split into words like a POSIX shell would
    #[arg(long, value_name = "CMD")]
    pub launch_cmd: Option<String>,

    /// Add a request header, e.g. --header 'Authorization: Bearer …' (repeatable)
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,

    /// The SHA-256 the file must have, as 64 hex digits (only with a single URL); a
    /// mismatch fails the task with checksum_mismatch
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,

    /// Scheduling priority, from 0 (lowest) to 1 (highest)
    #[arg(long, value_name = "P", default_value_t = 0.5, value_parser = parse_priority)]
    pub priority: f32,

    /// Replace files that already exist at the destination
    #[arg(long)]
    pub overwrite: bool,

    /// Downloads from one host at once in the session (sets the session's
    /// max_connections_per_host; a session that get creates allows 16)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub per_host: Option<u32>,

    /// Show progress and wait until every task is done; exit 1 if any failed
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// The file to send
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Where to send it (http or https)
    #[arg(value_name = "URL")]
    pub url: String,

    /// PUT (retried after transient failures) or POST (retried only with --idempotent,
    /// when the server offers to resume it, or when its body did not go out whole)
    #[arg(short = 'X', long, value_name = "METHOD", default_value = "PUT", value_parser = ["PUT", "POST", "put", "post"])]
    pub method: String,

    /// The server treats a repeated POST as one: retry it like a PUT
    #[arg(long)]
    pub idempotent: bool,

    /// The body's Content-Type
    #[arg(long, value_name = "TYPE")]
    pub content_type: Option<String>,

    /// Add a request header, e.g. --header 'Authorization: Bearer …' (repeatable);
    /// Content-Length, Transfer-Encoding and Upload-* are the daemon's to set (refused)
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,

    /// The session the task belongs to
    #[arg(long, value_name = "ID", default_value = "dlsessionctl")]
    pub session: String,

    /// Scheduling priority, from 0 (lowest) to 1 (highest)
    #[arg(long, value_name = "P", default_value_t = 0.5, value_parser = parse_priority)]
    pub priority: f32,

    /// Show progress and wait until the upload is done; print the response body; exit 1
    /// if it failed
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only tasks of this session
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The session identifier
    #[arg(value_name = "SESSION")]
    pub session: String,

    /// Move each finished file into DIR, keeping the URL's file name (a name that is
    /// taken gets a suffix like " (1)")
    #[arg(long, value_name = "DIR")]
    pub move_to: Option<PathBuf>,

    /// Take the session over if another process is attached (it gets `detached`)
    #[arg(long)]
    pub takeover: bool,

    /// Announce this app id on the connection (as the app itself would)
    #[arg(long, value_name = "ID")]
    pub app_id: Option<String>,

    /// Stay attached until the session has no unfinished task and every event was
    /// delivered (riding out daemon restarts), instead of leaving after the events that
    /// waited
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// The session identifier
    #[arg(value_name = "SESSION", required_unless_present = "task", conflicts_with = "task")]
    pub session: Option<String>,

    /// One task's own policy instead: what it sets overrides the session's, `inherit`
    /// follows the session again
    #[arg(long, value_name = "ID")]
    pub task: Option<u64>,

    /// Download over metered networks (NetworkManager's Metered: yes or guess-yes)
    #[arg(long, value_name = "allow|deny", value_parser = ["allow", "deny", "inherit"])]
    pub metered: Option<String>,

    /// Download while the machine runs on battery
    #[arg(long, value_name = "allow|deny", value_parser = ["allow", "deny", "inherit"])]
    pub battery: Option<String>,

    /// Only in good conditions: an unmetered network, and AC power or a battery at 50 % or more
    #[arg(long, value_name = "on|off", value_parser = ["on", "off", "inherit"])]
    pub discretionary: Option<String>,

    /// With no route to the server, wait for one (on), or fail the task with not_connected (off)
    #[arg(long, value_name = "on|off", value_parser = ["on", "off", "inherit"])]
    pub wait_for_network: Option<String>,

    /// A desktop notification when the downloads are done and the app is not running
    /// (sessions only)
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"], conflicts_with = "task")]
    pub notify: Option<String>,

    /// Keep cookies the servers set and send them back (sessions only; off deletes the
    /// ones kept)
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"], conflicts_with = "task")]
    pub cookies: Option<String>,

    /// At a server's request for credentials, ask the app and wait (ask), or fail the task
    /// with the 401 (fail; forgets the credentials held) (sessions only)
    #[arg(long, value_name = "ask|fail", value_parser = ["ask", "fail"], conflicts_with = "task")]
    pub challenges: Option<String>,

    /// Present this client certificate (PEM) to servers that ask for one; needs
    /// --client-key (sessions only)
    #[arg(long, value_name = "FILE", requires = "client_key", conflicts_with_all = ["task", "no_client_cert"])]
    pub client_cert: Option<std::path::PathBuf>,

    /// The client certificate's private key (PEM)
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<std::path::PathBuf>,

    /// Present no client certificate (forgets the one set)
    #[arg(long, conflicts_with = "task")]
    pub no_client_cert: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("answer").required(true).args(["basic", "bearer", "header", "cancel", "fail"])))]
pub struct AuthArgs {
    /// The task waiting for credentials (`dlsessionctl tasks` says "credentials wanted")
    #[arg(value_name = "TASK")]
    pub task: TaskId,

    /// Answer with HTTP Basic credentials for USER; the password is read from stdin (one
    /// line), never from the command line
    #[arg(long, value_name = "USER")]
    pub basic: Option<String>,

    /// Answer with a bearer token, read from stdin (one line)
    #[arg(long)]
    pub bearer: bool,

    /// Answer with this header, its value read from stdin (one line), e.g. --header X-Api-Key
    #[arg(long, value_name = "NAME")]
    pub header: Option<String>,

    /// Give the credential to every task of the session for the same origin (its
    /// protection space), not this task only
    #[arg(long, conflicts_with_all = ["cancel", "fail"])]
    pub space: bool,

    /// Keep the credential in the daemon's database (else in its memory only)
    #[arg(long, conflicts_with_all = ["cancel", "fail"])]
    pub keep: bool,

    /// Cancel the task instead
    #[arg(long)]
    pub cancel: bool,

    /// Give no credentials: the task completes with the server's 401
    #[arg(long)]
    pub fail: bool,
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The session identifier
    #[arg(value_name = "SESSION")]
    pub session: String,

    /// A proxy URL, `direct`, or `env`
    #[arg(value_name = "URL|direct|env")]
    pub proxy: Option<String>,

    /// Hosts reached directly, as in NO_PROXY (names, addresses, CIDR blocks, `*`, with
    /// `:port` for one port only)
    #[arg(long, value_name = "LIST")]
    pub no_proxy: Option<String>,
}

#[derive(Debug, Args)]
pub struct LimitArgs {
    /// The daemon-wide limit (all downloads together)
    #[arg(long, conflicts_with_all = ["session", "task"])]
    pub global: bool,

    /// The limit of this session (its downloads together)
    #[arg(long, value_name = "ID", conflicts_with = "task")]
    pub session: Option<String>,

    /// The limit of this task
    #[arg(long, value_name = "TASK")]
    pub task: Option<dlsession_proto::TaskId>,

    /// Bytes per second, with an optional unit (500k, 2MiB, 1.5MB), or `off`; without it,
    /// the limits in force are shown
    #[arg(value_name = "RATE")]
    pub rate: Option<String>,
}

#[derive(Debug, Args)]
pub struct WakeArgs {
    /// The session identifier
    #[arg(value_name = "SESSION")]
    pub session: String,
}

#[derive(Debug, Args)]
pub struct InvalidateArgs {
    /// The session identifier
    #[arg(value_name = "SESSION")]
    pub session: String,

    /// Cancel its unfinished tasks too (each completes with `cancelled`)
    #[arg(long)]
    pub cancel: bool,
}

fn parse_priority(s: &str) -> Result<f32, String> {
    let p: f32 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if p.is_finite() && (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("priority must be between 0 and 1, got {s}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn priority_range() {
        assert_eq!(parse_priority("0.25"), Ok(0.25));
        assert_eq!(parse_priority("1"), Ok(1.0));
        assert!(parse_priority("1.5").is_err());
        assert!(parse_priority("-0.1").is_err());
        assert!(parse_priority("NaN").is_err());
        assert!(parse_priority("x").is_err());
    }

    #[test]
    fn bad_state_is_a_usage_error() {
        let e = Cli::try_parse_from(["dlsessionctl", "tasks", "--state", "sleeping"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let ok = Cli::try_parse_from(["dlsessionctl", "--json", "tasks", "--state", "running"]).unwrap();
        assert!(ok.json);
    }

    #[test]
    fn output_and_dir_conflict() {
        let e = Cli::try_parse_from(["dlsessionctl", "get", "http://a/x", "-o", "a", "-d", "b"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }
}
