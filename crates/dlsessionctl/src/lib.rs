//! `dlsessionctl`, the command-line tool of dlsessiond (docs/cli.md).
//!
//! `main` parses the command line ([`cli`]), runs one command from [`commands`] on a
//! current-thread tokio runtime and maps its outcome to the exit status: 0 success, 1 the
//! operation or a task failed, 2 usage error, 3 dlsessiond unreachable. Human output is
//! formatted by [`output`]; `--json` output comes from the structs in [`json`].

pub mod cli;
pub mod commands;
pub mod error;
pub mod json;
pub mod output;
pub mod progress;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::error::CliError;

/// Runs `dlsessionctl` with the process's arguments.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            return CliError::local(dlsession_proto::ErrorCode::Internal, format!("cannot start the runtime: {e}"))
                .report()
                .into();
        }
    };
    let exit = match runtime.block_on(commands::run(cli)) {
        Ok(exit) => exit,
        Err(e) => e.report(),
    };
    // Do not wait for threads still blocked on the connection (the delegate's).
    runtime.shutdown_background();
    exit.into()
}
