//! One module per subcommand; [`run`] dispatches.

mod attach;
mod auth;
mod completions;
mod control;
mod ctx;
mod get;
mod invalidate;
mod limit;
mod policy;
mod proxy;
mod sessions;
mod show;
mod status;
mod tasks;
mod upload;
mod wake;
mod watch;

use crate::cli::{Cli, Command};
use crate::error::{Exit, Result};
use ctx::Ctx;

/// Runs the command and returns the exit status.
pub async fn run(cli: Cli) -> Result<Exit> {
    let ctx = Ctx {
        json: cli.json,
        socket: cli.socket,
        client_name: client_name(std::env::args_os().skip(1).filter_map(|a| a.into_string().ok())),
    };
    match cli.command {
        Command::Status => status::run(&ctx).await,
        Command::Sessions => sessions::run(&ctx).await,
        Command::Tasks(args) => tasks::run(&ctx, args).await,
        Command::Show(args) => show::run(&ctx, args).await,
        Command::Get(args) => get::run(&ctx, args).await,
        Command::Upload(args) => upload::run(&ctx, args).await,
        Command::Auth(args) => auth::run(&ctx, args).await,
        Command::Watch(args) => watch::run(&ctx, args).await,
        Command::Pause(t) => control::run(&ctx, t.task, control::Action::Pause).await,
        Command::Resume(t) => control::run(&ctx, t.task, control::Action::Resume).await,
        Command::Cancel(t) => control::run(&ctx, t.task, control::Action::Cancel).await,
        Command::Attach(args) => attach::run(&ctx, args).await,
        Command::Wake(args) => wake::run(&ctx, args).await,
        Command::Invalidate(args) => invalidate::run(&ctx, args).await,
        Command::Limit(args) => limit::run(&ctx, args).await,
        Command::Policy(args) => policy::run(&ctx, args).await,
        Command::Proxy(args) => proxy::run(&ctx, args).await,
        Command::Completions(args) => completions::run(&args),
    }
}

/// How the daemon names this invocation to others ("cancelled by dlsessionctl cancel 12"):
/// the subcommand and its first plain words, never a URL, path or option value. Words that
/// are not UTF-8 are left out (`std::env::args` would panic on them before clap could say so).
fn client_name(args: impl Iterator<Item = String>) -> String {
    let words: Vec<String> =
        args.filter(|a| !a.starts_with('-') && !a.contains('/') && !a.contains(':') && a.len() <= 40).take(3).collect();
    std::iter::once("dlsessionctl".to_owned()).chain(words).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_client_name_says_the_command_without_urls_or_paths() {
        let args = ["--socket", "/run/x.sock", "cancel", "12"].map(String::from);
        assert_eq!(super::client_name(args.into_iter()), "dlsessionctl cancel 12");
        let args = ["get", "https://h/x?token=s", "-o", "/tmp/out"].map(String::from);
        assert_eq!(super::client_name(args.into_iter()), "dlsessionctl get");
    }
}
