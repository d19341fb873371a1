//! `dlsessionctl completions SHELL`: a completion script on stdout, from the clap
//! definition of the command line (so it never falls behind it).

use std::io::Write;

use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs};
use crate::error::{Exit, Result};

pub fn run(args: &CompletionsArgs) -> Result<Exit> {
    let mut script = Vec::new();
    write(args.shell, &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)?;
    out.flush()?;
    Ok(Exit::Success)
}

/// Writes the completion script for `shell`.
pub fn write(shell: clap_complete::Shell, out: &mut impl Write) {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "dlsessionctl", out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap_complete::Shell;

    fn script(shell: Shell) -> String {
        let mut v = Vec::new();
        write(shell, &mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn every_shell_gets_a_script_naming_the_commands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish, Shell::Elvish, Shell::PowerShell] {
            let s = script(shell);
            for cmd in ["status", "tasks", "show", "get", "watch", "attach", "wake", "completions"] {
                assert!(s.contains(cmd), "{shell}: {cmd} missing");
            }
        }
        assert!(script(Shell::Zsh).starts_with("#compdef dlsessionctl"));
    }
}
