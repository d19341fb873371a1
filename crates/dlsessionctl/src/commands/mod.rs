//! One module per subcommand; [`run`] dispatches.

mod attach;
mod completions;
mod control;
mod ctx;
mod get;
mod sessions;
mod show;
mod status;
mod tasks;
mod wake;
mod watch;

use crate::cli::{Cli, Command};
use crate::error::{Exit, Result};
use ctx::Ctx;

/// Runs the command and returns the exit status.
pub async fn run(cli: Cli) -> Result<Exit> {
    let ctx = Ctx { json: cli.json, socket: cli.socket };
    match cli.command {
        Command::Status => status::run(&ctx).await,
        Command::Sessions => sessions::run(&ctx).await,
        Command::Tasks(args) => tasks::run(&ctx, args).await,
        Command::Show(args) => show::run(&ctx, args).await,
        Command::Get(args) => get::run(&ctx, args).await,
        Command::Watch(args) => watch::run(&ctx, args).await,
        Command::Pause(t) => control::run(&ctx, t.task, control::Action::Pause).await,
        Command::Resume(t) => control::run(&ctx, t.task, control::Action::Resume).await,
        Command::Cancel(t) => control::run(&ctx, t.task, control::Action::Cancel).await,
        Command::Attach(args) => attach::run(&ctx, args).await,
        Command::Wake(args) => wake::run(&ctx, args).await,
        Command::Completions(args) => completions::run(&args),
    }
}
