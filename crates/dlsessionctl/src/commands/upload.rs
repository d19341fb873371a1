//! `dlsessionctl upload FILE URL [-X PUT|POST] [--idempotent] [-H …] [--wait]`
//!
//! The file is checked here first (so a typo fails before the daemon is asked), then by
//! the daemon, which records its size and modification time; one `CreateUploads` request
//! (sent `Once`, see `Client::create_uploads`) creates and starts the task.

use std::io::Write;

use dlsession_proto::{Header, TaskSpec, UploadMethod, UploadSpec, redact};

use super::get::{
    DEFAULT_SESSION, collect_earlier, collected_by_the_next_get, interrupt_signal, interrupted_after_making,
    interrupted_meanwhile, open_session, undo_open, wait,
};
use crate::cli::UploadArgs;
use crate::commands::ctx::Ctx;
use crate::error::{CliError, Exit, Result};
use crate::output;

pub async fn run(ctx: &Ctx, args: UploadArgs) -> Result<Exit> {
    let method = UploadMethod::from_name(&args.method)
        .ok_or_else(|| CliError::usage(format!("--method must be PUT or POST, not {:?}", args.method)))?;
    let file = std::path::absolute(&args.file).map_err(|e| CliError::file("cannot find", &args.file, &e))?;
    let meta = std::fs::metadata(&file).map_err(|e| CliError::file("cannot upload", &file, &e))?;
    if !meta.is_file() {
        return Err(CliError::usage(format!("cannot upload {}: it is not a regular file", file.display())));
    }
    let file =
        file.to_str().ok_or_else(|| CliError::usage(format!("{} is not valid UTF-8", file.display())))?.to_owned();
    let mut request = TaskSpec::get(args.url.clone());
    request.priority = args.priority;
    request.headers = args
        .headers
        .iter()
        .map(|h| output::parse_header(h).map(|(n, v)| Header::new(n, v)).map_err(CliError::usage))
        .collect::<Result<Vec<_>>>()?;
    if let Some(t) = &args.content_type {
        request.headers.push(Header::new("Content-Type", t.clone()));
    }
    // Refused by the daemon too; said here before a session is made for nothing.
    if let Some(h) = request.headers.iter().find(|h| dlsession_proto::validate::is_upload_framing_header(&h.name)) {
        return Err(CliError::usage(format!(
            "-H {}: the daemon sets that header for an upload (it frames the body)",
            h.name
        )));
    }
    if args.session == DEFAULT_SESSION {
        request.description = Some(collected_by_the_next_get(args.wait));
    }

    let client = ctx.connect_or_start(None).await?;
    let opened = open_session(&client, &args.session, None, None, None).await?;
    if args.session == DEFAULT_SESSION {
        collect_earlier(&client, &args.session).await;
    }
    // Heard from here on (see `get`).
    let mut interrupt = interrupt_signal()?;
    let upload = UploadSpec { request, method, file: file.clone(), idempotent: args.idempotent };
    // Through the library: sent again under its creation key if the answer is lost, so the
    // upload is never made twice.
    let ids = match client.create_uploads(&args.session, vec![upload], true).await {
        Ok(ids) => ids,
        Err(e) => {
            undo_open(&client, &args.session, opened).await;
            return Err(e.into());
        }
    };
    {
        let mut out = std::io::stdout().lock();
        for id in &ids {
            if ctx.json {
                let line = serde_json::json!({
                    "task": id, "session": args.session, "url": redact::url(&args.url), "file": file,
                    "method": method.as_str(),
                });
                writeln!(out, "{line}")?;
            } else if args.wait {
                eprintln!("task {id}: {} {file} -> {}", method.as_str(), redact::url(&args.url));
            } else {
                writeln!(out, "task {id}: {} {file} -> {}", method.as_str(), redact::url(&args.url))?;
            }
        }
        out.flush()?;
    }
    if !args.wait {
        if interrupted_meanwhile(&mut interrupt).await {
            return Ok(interrupted_after_making(&args.session));
        }
        if !ctx.json {
            eprintln!(
                "uploading in the background (dlsessiond goes on after this command): follow with \
                 `dlsessionctl watch`, see it with `dlsessionctl show ID`; --wait waits here instead"
            );
        }
        return Ok(Exit::Success);
    }
    wait(ctx, &client, &args.session, &ids, Some(interrupt)).await
}
