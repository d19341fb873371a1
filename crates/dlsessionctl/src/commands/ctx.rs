//! What every command gets: the global flags, and the ways to reach the daemon.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use dlsession::{Client, ClientOptions};
use dlsession_proto::{Request, Response};

use crate::error::{CliError, Result};

/// What every command gets: the global flags.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub json: bool,
    pub socket: Option<PathBuf>,
    /// What the daemon calls this connection in messages to others.
    pub client_name: String,
}

impl Ctx {
    /// Connects to a running daemon for one request or a few. Inspection and control
    /// never start a daemon: a missing one is reported (exit 3), and a connection that
    /// breaks is an error, not something to wait out.
    pub async fn connect(&self) -> Result<Client> {
        self.connect_with(None, false, false).await
    }

    /// Connects for as long as a command follows something (`watch`): a daemon restart
    /// is ridden out (the command connects again), but none is started.
    pub async fn connect_lasting(&self) -> Result<Client> {
        self.connect_with(None, false, true).await
    }

    /// Connects, starting the daemon on demand if nothing listens (`get`, `attach`),
    /// unless `DLSESSION_NO_AUTOSTART=1`, and rides out daemon restarts.
    pub async fn connect_or_start(&self, app_id: Option<String>) -> Result<Client> {
        self.connect_with(app_id, true, true).await
    }

    async fn connect_with(&self, app_id: Option<String>, autostart: bool, reconnect: bool) -> Result<Client> {
        let options = ClientOptions {
            socket: self.socket.clone(),
            client_name: self.client_name.clone(),
            app_id,
            autostart,
            reconnect,
            ..ClientOptions::default()
        };
        Ok(Client::connect(options).await?)
    }
}

/// How long a command that follows something (`get --wait`, `upload --wait`, `watch`,
/// `attach`) waits for a lost daemon to come back: `DLSESSIONCTL_RECONNECT_TIMEOUT`
/// seconds (0: for ever), else a minute. A restart takes well under that; a daemon that
/// cannot start again would otherwise hold a script for ever.
pub fn reconnect_limit() -> Option<Duration> {
    let secs = std::env::var(RECONNECT_TIMEOUT_ENV).ok().and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(60);
    (secs > 0).then(|| Duration::from_secs(secs))
}

pub const RECONNECT_TIMEOUT_ENV: &str = "DLSESSIONCTL_RECONNECT_TIMEOUT";

/// Resolves once `client` has been without a connection for longer than
/// [`reconnect_limit`], with the error to end on (exit 3). With `say`, tells on stderr (above
/// any progress bars) when the connection is lost and when it is back (`attach`'s delegate
/// says so itself).
pub async fn lost_for_good(client: &Client, say: Option<crate::progress::Notes>) -> CliError {
    let limit = reconnect_limit();
    let mut lost_at: Option<Instant> = None;
    let mut look = tokio::time::interval(Duration::from_millis(250));
    // Which connection the last look saw: one lost and made again between two looks (a
    // restart within 250 ms) is said too, or a daemon stopped on purpose and started again
    // by this command's reconnect went unsaid.
    let which = |w: &dlsession_proto::Welcome| (w.pid, w.connection_id);
    let mut seen = which(&client.welcome());
    loop {
        look.tick().await;
        if client.is_connected() {
            let welcome = client.welcome();
            let changed = which(&welcome) != seen;
            seen = which(&welcome);
            if (lost_at.take().is_some() || changed)
                && let Some(say) = &say
            {
                say.err(&format!("note: connected to dlsessiond again (pid {})", welcome.pid));
            }
            continue;
        }
        let since = *lost_at.get_or_insert_with(|| {
            if let Some(say) = &say {
                let until = limit.map_or("for ever".to_owned(), |l| format!("for {} s", l.as_secs()));
                say.err(&format!("note: lost the connection to dlsessiond; connecting again ({until})"));
            }
            Instant::now()
        });
        if let Some(limit) = limit
            && since.elapsed() >= limit
        {
            let reason = format!("not back within {} s ({RECONNECT_TIMEOUT_ENV} sets how long)", limit.as_secs());
            return CliError::Client(dlsession::Error::Disconnected { reason: Some(reason) });
        }
    }
}

/// Sends a request that must be answered with `Response::Ok`.
pub async fn request_ok(client: &Client, request: Request) -> Result<()> {
    match client.request(request).await? {
        Response::Ok => Ok(()),
        other => Err(CliError::unexpected("ok", &other)),
    }
}
