//! `dlsessionctl policy SESSION [--metered allow|deny] [--battery allow|deny] [--discretionary on|off] …`
//! and `dlsessionctl policy --task ID […|inherit]`: shows a policy, after changing what
//! the flags name. A session's also says whether it keeps cookies (`--cookies on|off`).

use std::io::Write;

use dlsession_proto::{Request, Response, SessionPolicy, TaskPolicy, TaskPolicyInfo};
use serde::Serialize;

use crate::cli::PolicyArgs;
use crate::commands::ctx::{Ctx, request_ok};
use crate::error::{CliError, Exit, Result};
use crate::json::{self, TaskPolicyJson};

pub async fn run(ctx: &Ctx, args: PolicyArgs) -> Result<Exit> {
    match (args.task, args.session.clone()) {
        (Some(task), _) => run_task(ctx, task, &args).await,
        (None, Some(session)) => run_session(ctx, &session, &args).await,
        (None, None) => Err(CliError::usage("name a SESSION or a --task")),
    }
}

async fn run_session(ctx: &Ctx, session: &str, args: &PolicyArgs) -> Result<Exit> {
    let inherit = [&args.metered, &args.battery, &args.discretionary, &args.wait_for_network];
    if inherit.iter().any(|v| v.as_deref() == Some("inherit")) {
        return Err(CliError::usage("`inherit` is for a task's policy (--task ID): a session has nothing to inherit"));
    }
    let client = ctx.connect().await?;
    let mut policy = match client.request(Request::GetSessionPolicy { identifier: session.to_owned() }).await? {
        Response::SessionPolicy(p) => p,
        other => return Err(CliError::unexpected("session_policy", &other)),
    };
    // The certificate first: it is the change the daemon may refuse (files it cannot read,
    // a key that does not match), and a refusal must leave everything else as it was.
    let cert = match (&args.client_cert, &args.client_key, args.no_client_cert) {
        (_, _, true) => Some(None),
        (Some(c), Some(k), false) => {
            let abs = |p: &std::path::Path| {
                std::path::absolute(p)
                    .map(|p| p.to_string_lossy().into_owned())
                    .map_err(|e| CliError::file("cannot find", p, &e))
            };
            Some(Some(dlsession_proto::ClientCertificate { cert_file: abs(c)?, key_file: abs(k)? }))
        }
        _ => None,
    };
    if let Some(cert) = cert {
        request_ok(&client, Request::SetSessionClientCert { identifier: session.to_owned(), cert }).await?;
    }
    let before = policy;
    let on = |v: &Option<String>, yes: &str, current: bool| v.as_deref().map_or(current, |v| v == yes);
    policy.allows_metered = on(&args.metered, "allow", policy.allows_metered);
    policy.allows_battery = on(&args.battery, "allow", policy.allows_battery);
    policy.discretionary = on(&args.discretionary, "on", policy.discretionary);
    policy.waits_for_connectivity = on(&args.wait_for_network, "on", policy.waits_for_connectivity);
    policy.notify = on(&args.notify, "on", policy.notify);
    if policy != before {
        let request = Request::SetSessionPolicy { identifier: session.to_owned(), policy };
        request_ok(&client, request).await?;
    }
    if let Some(c) = &args.cookies {
        let request = Request::SetSessionCookies { identifier: session.to_owned(), enabled: c == "on" };
        request_ok(&client, request).await?;
    }
    let cookies = match client.request(Request::GetSessionCookies { identifier: session.to_owned() }).await? {
        Response::SessionCookies(c) => c,
        other => return Err(CliError::unexpected("session_cookies", &other)),
    };
    if let Some(c) = &args.challenges {
        let request = Request::SetSessionChallenges { identifier: session.to_owned(), answers: c == "ask" };
        request_ok(&client, request).await?;
    }
    let cert = match client.request(Request::GetSessionClientCert { identifier: session.to_owned() }).await? {
        Response::SessionClientCert(c) => c,
        other => return Err(CliError::unexpected("session_client_cert", &other)),
    };
    let challenges = match client.request(Request::GetSessionChallenges { identifier: session.to_owned() }).await? {
        Response::SessionChallenges(c) => c,
        other => return Err(CliError::unexpected("session_challenges", &other)),
    };
    if ctx.json {
        let mut json = PolicyJson::of(policy, Some(session), None, None);
        json.cookies = Some(cookies.enabled);
        json.cookies_stored = Some(cookies.stored);
        json.challenges = Some(if challenges.answers { "ask" } else { "fail" });
        json.credentials = Some(challenges.credentials);
        json.credentials_kept = Some(challenges.kept);
        json.client_cert = cert.as_ref().map(|c| c.cert_file.as_str());
        json::print(&json)?;
    } else {
        let kept =
            if cookies.enabled { format!("keeps cookies ({} stored)", cookies.stored) } else { "no cookies".into() };
        let asks = if challenges.answers {
            format!("asks its app for credentials ({} held, {} kept)", challenges.credentials, challenges.kept)
        } else {
            "fails tasks a server asks credentials of".into()
        };
        let cert = cert.map(|c| format!(", client certificate {}", c.cert_file)).unwrap_or_default();
        writeln!(std::io::stdout().lock(), "{session}: {}, {kept}, {asks}{cert}", describe(policy))?;
    }
    Ok(Exit::Success)
}

async fn run_task(ctx: &Ctx, task: u64, args: &PolicyArgs) -> Result<Exit> {
    let client = ctx.connect().await?;
    let get = || async {
        match client.request(Request::GetTaskPolicy { task }).await? {
            Response::TaskPolicy(p) => Ok::<TaskPolicyInfo, CliError>(p),
            other => Err(CliError::unexpected("task_policy", &other)),
        }
    };
    let mut info = get().await?;
    let mut own = info.own;
    // allow/on → Some(true), deny/off → Some(false), inherit → None, absent → unchanged.
    let set = |v: &Option<String>, yes: &str, current: Option<bool>| match v.as_deref() {
        None => current,
        Some("inherit") => None,
        Some(v) => Some(v == yes),
    };
    own.allows_metered = set(&args.metered, "allow", own.allows_metered);
    own.allows_battery = set(&args.battery, "allow", own.allows_battery);
    own.discretionary = set(&args.discretionary, "on", own.discretionary);
    own.waits_for_connectivity = set(&args.wait_for_network, "on", own.waits_for_connectivity);
    if own != info.own {
        request_ok(&client, Request::SetTaskPolicy { tasks: vec![task], policy: own }).await?;
        info = get().await?;
    }
    if ctx.json {
        json::print(&PolicyJson::of(info.effective, None, Some(task), Some(info.own)))?;
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "task {task}: {}", describe(info.effective))?;
        writeln!(out, "  its own: {}", describe_own(info.own))?;
    }
    Ok(Exit::Success)
}

pub(crate) fn describe(p: SessionPolicy) -> String {
    let allowed = |yes: bool| if yes { "allowed" } else { "not allowed" };
    format!(
        "metered networks {}, battery {}, {}, {}, {}",
        allowed(p.allows_metered),
        allowed(p.allows_battery),
        if p.discretionary { "discretionary (waits for good conditions)" } else { "not discretionary" },
        if p.waits_for_connectivity { "waits for the network" } else { "fails at once without a network" },
        if p.notify { "notifies when done" } else { "no notification" }
    )
}

/// What a task sets itself, in the flags' words.
pub(crate) fn describe_own(p: TaskPolicy) -> String {
    let mut parts = Vec::new();
    let mut name = |flag: &str, v: Option<bool>, yes: &str, no: &str| {
        if let Some(v) = v {
            parts.push(format!("--{flag} {}", if v { yes } else { no }));
        }
    };
    name("metered", p.allows_metered, "allow", "deny");
    name("battery", p.allows_battery, "allow", "deny");
    name("discretionary", p.discretionary, "on", "off");
    name("wait-for-network", p.waits_for_connectivity, "on", "off");
    if parts.is_empty() { "nothing (all as its session says)".to_owned() } else { parts.join(", ") }
}

#[derive(Serialize)]
struct PolicyJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<u64>,
    allows_metered: bool,
    allows_battery: bool,
    discretionary: bool,
    waits_for_connectivity: bool,
    notify: bool,
    /// A task's own settings (`null`: as its session says).
    #[serde(skip_serializing_if = "Option::is_none")]
    own: Option<TaskPolicyJson>,
    /// A session's: whether it keeps cookies, and how many it holds (never their values).
    #[serde(skip_serializing_if = "Option::is_none")]
    cookies: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cookies_stored: Option<u32>,
    /// A session's: `ask` or `fail`, and how many credentials it holds and keeps.
    #[serde(skip_serializing_if = "Option::is_none")]
    challenges: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credentials: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credentials_kept: Option<u32>,
    /// A session's client certificate file, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    client_cert: Option<&'a str>,
}

impl<'a> PolicyJson<'a> {
    fn of(p: SessionPolicy, session: Option<&'a str>, task: Option<u64>, own: Option<TaskPolicy>) -> PolicyJson<'a> {
        PolicyJson {
            session,
            task,
            allows_metered: p.allows_metered,
            allows_battery: p.allows_battery,
            discretionary: p.discretionary,
            waits_for_connectivity: p.waits_for_connectivity,
            notify: p.notify,
            own: own.map(TaskPolicyJson::from),
            cookies: None,
            cookies_stored: None,
            challenges: None,
            credentials: None,
            credentials_kept: None,
            client_cert: None,
        }
    }
}
