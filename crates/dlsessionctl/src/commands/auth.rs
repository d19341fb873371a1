//! `dlsessionctl auth TASK (--basic USER | --bearer | --header NAME | --cancel | --fail)
//! [--space] [--keep]`: answers the challenge a task waits on, standing in for its app.
//! Secrets come from stdin, never from the command line (the process list shows that).

use std::io::{BufRead, Write};

use dlsession_proto::{ChallengeAnswer, Credential, CredentialScope, Request};

use crate::cli::AuthArgs;
use crate::commands::ctx::{Ctx, request_ok};
use crate::error::{CliError, Exit, Result};

pub async fn run(ctx: &Ctx, args: AuthArgs) -> Result<Exit> {
    let answer = if args.cancel {
        ChallengeAnswer::Cancel
    } else if args.fail {
        ChallengeAnswer::Fail
    } else {
        let secret = read_secret(args.basic.is_some())?;
        let credential = match (&args.basic, &args.header) {
            (Some(user), _) => Credential::Basic { user: user.clone(), password: secret },
            (None, Some(name)) => Credential::Header { name: name.clone(), value: secret },
            (None, None) => Credential::Bearer { token: secret },
        };
        let scope = if args.space { CredentialScope::ProtectionSpace } else { CredentialScope::Task };
        ChallengeAnswer::Use { credential, scope, keep: args.keep }
    };
    let what = match &answer {
        ChallengeAnswer::Use { .. } => "answered; it goes on with the credential",
        ChallengeAnswer::Cancel => "cancelled",
        ChallengeAnswer::Fail => "answered without credentials; it completes with the server's status",
    };
    let client = ctx.connect().await?;
    request_ok(&client, Request::AnswerChallenge { task: args.task, round: None, answer }).await?;
    if ctx.json {
        writeln!(std::io::stdout().lock(), "{}", serde_json::json!({ "task": args.task, "answered": true }))?;
    } else {
        writeln!(std::io::stdout().lock(), "task {}: {what}", args.task)?;
    }
    Ok(Exit::Success)
}

/// One line of stdin, without its line end. Nothing at all is refused; an empty line is an
/// empty secret, which only a Basic password may be.
fn read_secret(empty_ok: bool) -> Result<String> {
    use std::io::IsTerminal;
    // Typed at a terminal, a secret would be echoed (and the command would just wait).
    if std::io::stdin().is_terminal() {
        return Err(CliError::usage(
            "the secret is read from stdin, which is a terminal here: pipe it in (printf %s \"$SECRET\" | dlsessionctl auth …)",
        ));
    }
    let mut line = String::new();
    let n = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::usage(format!("cannot read the secret from stdin: {e}")))?;
    let secret = line.trim_end_matches(['\n', '\r']).to_owned();
    if n == 0 || (secret.is_empty() && !empty_ok) {
        return Err(CliError::usage("no secret on stdin (pipe it in: printf %s \"$SECRET\" | dlsessionctl auth …)"));
    }
    Ok(secret)
}
