//! Desktop notifications for sessions that ask for them: `org.freedesktop.Notifications`
//! on the session bus, from a task of its own (the core only sends it what to say). One
//! notification per session, replaced rather than repeated; its default action asks the
//! core to relaunch the app. Without a notification server nothing is shown, and the log
//! says so once; the service is looked for again at the next notice (it may come later).

use std::collections::HashMap;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info};
use zbus::zvariant::Value;
use zbus::{Connection, Proxy};

const NOTIFICATIONS: (&str, &str, &str) =
    ("org.freedesktop.Notifications", "/org/freedesktop/Notifications", "org.freedesktop.Notifications");

/// What to show for a session.
#[derive(Debug, Clone)]
pub struct Notice {
    pub identifier: String,
    pub summary: String,
    pub body: String,
}

/// The notifier's end: `show` never waits.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: mpsc::UnboundedSender<Notice>,
}

impl Notifier {
    /// Starts the notifier task; `activated` runs with the session identifier when the
    /// user clicks a notification.
    pub fn start(activated: impl Fn(String) + Send + 'static) -> Notifier {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, activated));
        Notifier { tx }
    }

    pub fn show(&self, notice: Notice) {
        let _ = self.tx.send(notice);
    }
}

/// The notification service, once reached.
struct Service {
    proxy: Proxy<'static>,
    /// Clicks on our notifications, when they can be followed.
    actions: Option<zbus::proxy::SignalStream<'static>>,
}

/// Reaches the notification service on the session bus.
async fn reach() -> Result<Service, String> {
    let conn = Connection::session().await.map_err(|e| format!("no session bus: {e}"))?;
    let proxy = Proxy::new(&conn, NOTIFICATIONS.0, NOTIFICATIONS.1, NOTIFICATIONS.2)
        .await
        .map_err(|e| format!("no notification service: {e}"))?;
    let actions = match proxy.receive_signal("ActionInvoked").await {
        Ok(s) => Some(s),
        Err(e) => {
            debug!(error = %e, "cannot follow notification actions");
            None
        }
    };
    Ok(Service { proxy, actions })
}

async fn run(mut rx: mpsc::UnboundedReceiver<Notice>, activated: impl Fn(String) + Send + 'static) {
    // Reached on the first notice only (most daemons never show one), and again on the next
    // one after it failed: a daemon started before the desktop's session bus, or whose
    // notification server went away, shows the notices that come once they are back.
    let mut service: Option<Service> = None;
    // The notification id shown for each session (replaced on the next notice) and back.
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut sessions: HashMap<u32, String> = HashMap::new();
    // Said once until notices can be shown again.
    let mut said_missing = false;
    let mut next = rx.recv().await;
    loop {
        if let Some(notice) = next.take() {
            if service.is_none() {
                match reach().await {
                    Ok(reached) => service = Some(reached),
                    Err(e) if !said_missing => {
                        info!(error = %e, "session notifications are not shown (tried again at the next one)");
                        said_missing = true;
                    }
                    Err(_) => {}
                }
            }
            if let Some(reached) = &service {
                let replaces = ids.get(&notice.identifier).copied().unwrap_or(0);
                let hints: HashMap<&str, Value<'_>> = HashMap::new();
                let body = (
                    "dlsessiond",
                    replaces,
                    "folder-download",
                    notice.summary.as_str(),
                    notice.body.as_str(),
                    vec!["default", "Open"],
                    hints,
                    -1i32,
                );
                match reached.proxy.call::<_, _, u32>("Notify", &body).await {
                    Ok(id) => {
                        if std::mem::take(&mut said_missing) {
                            info!("session notifications are shown again");
                        }
                        ids.insert(notice.identifier.clone(), id);
                        sessions.insert(id, notice.identifier);
                    }
                    Err(e) => {
                        if !said_missing {
                            info!(error = %e, "session notifications cannot be shown (no notification server?)");
                            said_missing = true;
                        }
                        // Reached again at the next notice (the server may come back).
                        service = None;
                    }
                }
            }
        }
        let actions = service.as_mut().and_then(|s| s.actions.as_mut());
        tokio::select! {
            notice = rx.recv() => match notice {
                Some(n) => next = Some(n),
                None => return,
            },
            Some(msg) = async { match actions { Some(a) => a.next().await, None => std::future::pending().await } } => {
                if let Ok((id, _action)) = msg.body().deserialize::<(u32, String)>()
                    && let Some(identifier) = sessions.get(&id)
                {
                    activated(identifier.clone());
                }
            }
        }
    }
}
