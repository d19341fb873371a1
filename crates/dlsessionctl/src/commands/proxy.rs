//! `dlsessionctl proxy SESSION [URL|direct|env] [--no-proxy LIST]`: a session's own proxy.

use std::io::Write;

use dlsession_proto::{Request, Response, SessionProxy, redact};
use serde::Serialize;

use crate::cli::ProxyArgs;
use crate::commands::ctx::{Ctx, request_ok};
use crate::error::{CliError, Exit, Result};
use crate::json;

pub async fn run(ctx: &Ctx, args: ProxyArgs) -> Result<Exit> {
    // Usage errors whether the daemon runs or not.
    match (args.proxy.as_deref(), &args.no_proxy) {
        // The stored URL comes back redacted: it cannot be sent back as it is.
        (None, Some(_)) => {
            return Err(CliError::usage("--no-proxy goes with the proxy: give its URL again, or `direct`"));
        }
        (Some("env"), Some(_)) => {
            return Err(CliError::usage(
                "`env` uses the environment's NO_PROXY; --no-proxy goes with a URL or `direct`",
            ));
        }
        _ => {}
    }
    let client = ctx.connect().await?;
    let get = async || match client.request(Request::GetSessionProxy { identifier: args.session.clone() }).await? {
        Response::SessionProxy(p) => Ok::<Option<SessionProxy>, CliError>(p),
        other => Err(CliError::unexpected("session_proxy", &other)),
    };
    let current = get().await?;
    let no_proxy =
        || args.no_proxy.clone().or_else(|| current.as_ref().map(|p| p.no_proxy.clone())).unwrap_or_default();
    let wanted = match args.proxy.as_deref() {
        None => None,
        Some("env") => Some(None),
        Some("direct") => Some(Some(SessionProxy { url: None, no_proxy: no_proxy() })),
        Some(url) => Some(Some(SessionProxy { url: Some(url.to_owned()), no_proxy: no_proxy() })),
    };
    let shown = match wanted {
        Some(proxy) => {
            request_ok(&client, Request::SetSessionProxy { identifier: args.session.clone(), proxy }).await?;
            get().await?
        }
        None => current,
    };
    if ctx.json {
        json::print(&ProxyJson {
            session: &args.session,
            proxy: shown.as_ref().map(|p| ProxyValue { url: p.url.as_deref().map(redact::url), no_proxy: &p.no_proxy }),
        })?;
    } else {
        let text = match &shown {
            None => "the daemon's environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY)".to_owned(),
            Some(p) => {
                let via =
                    p.url.as_deref().map_or_else(|| "direct".to_owned(), |u| format!("through {}", redact::url(u)));
                if p.no_proxy.is_empty() { via } else { format!("{via}, except {}", p.no_proxy) }
            }
        };
        writeln!(std::io::stdout().lock(), "{}: {text}", args.session)?;
    }
    Ok(Exit::Success)
}

#[derive(Serialize)]
struct ProxyJson<'a> {
    session: &'a str,
    /// `null`: the daemon's environment.
    proxy: Option<ProxyValue<'a>>,
}

#[derive(Serialize)]
struct ProxyValue<'a> {
    /// `null`: direct. Passwords redacted.
    url: Option<String>,
    no_proxy: &'a str,
}
