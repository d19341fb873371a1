//! What every command gets: the global flags, and the ways to reach the daemon.

use std::path::PathBuf;

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

/// Sends a request that must be answered with `Response::Ok`.
pub async fn request_ok(client: &Client, request: Request) -> Result<()> {
    match client.request(request).await? {
        Response::Ok => Ok(()),
        other => Err(CliError::unexpected("ok", &other)),
    }
}
