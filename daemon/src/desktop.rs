//! What the desktop says about the machine, over the system D-Bus (`zbus` on tokio; never
//! on the core's thread): NetworkManager's `State` and `Metered`, UPower's `OnBattery` and
//! the display device's `Percentage`. Each change is reported to the core whole. A service
//! that is not on the bus (or no bus at all) leaves its facts unknown: the daemon then
//! assumes online, unmetered and on AC, and says so once in the log.
//!
//! The bus is the one `DBUS_SYSTEM_BUS_ADDRESS` names, else the system's.

use futures_util::StreamExt;
use tracing::{debug, info};
use zbus::proxy::CacheProperties;
use zbus::{Connection, Proxy};

const NM: (&str, &str, &str) =
    ("org.freedesktop.NetworkManager", "/org/freedesktop/NetworkManager", "org.freedesktop.NetworkManager");
const UPOWER: (&str, &str, &str) = ("org.freedesktop.UPower", "/org/freedesktop/UPower", "org.freedesktop.UPower");
const DISPLAY: (&str, &str, &str) =
    ("org.freedesktop.UPower", "/org/freedesktop/UPower/devices/DisplayDevice", "org.freedesktop.UPower.Device");

// NetworkManager's NMState: below "connected (local)" there is no network to speak of.
const NM_STATE_CONNECTED_LOCAL: u32 = 50;
// NMMetered: yes and guess-yes count as metered.
const NM_METERED_YES: u32 = 1;
const NM_METERED_GUESS_YES: u32 = 3;

/// What NetworkManager and UPower said last (`None`: they did not say).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desktop {
    /// NetworkManager thinks the machine is connected (to something).
    pub nm_connected: Option<bool>,
    /// NetworkManager's `Connectivity`: full (true), or none, behind a portal or limited
    /// (false); unknown: `None`.
    pub nm_internet: Option<bool>,
    pub metered: Option<bool>,
    pub on_battery: Option<bool>,
    pub battery_percent: Option<u8>,
    /// `NetworkManager`, or why it could not be asked.
    pub network_source: String,
    /// `UPower`, or why it could not be asked.
    pub power_source: String,
}

/// Follows the desktop services until the process ends, reporting each change.
pub async fn watch(report: impl Fn(Desktop) + Send + 'static) {
    // A bus that never answers counts as none: tasks whose policy cares wait for this.
    let conn = match tokio::time::timeout(READ_TIMEOUT, Connection::system()).await {
        Ok(Ok(c)) => c,
        Err(_) => {
            let why = format!("no answer from the system bus within {} s", READ_TIMEOUT.as_secs());
            info!("{why}: assuming online, unmetered and on AC power");
            report(Desktop { network_source: why.clone(), power_source: why, ..Desktop::default() });
            return;
        }
        Ok(Err(e)) => {
            let why = format!("no system bus ({e})");
            info!("{why}: assuming online, unmetered and on AC power");
            report(Desktop { network_source: why.clone(), power_source: why, ..Desktop::default() });
            return;
        }
    };
    let mut last: Option<Desktop> = None;
    let mut said_missing = false;
    // Subscribed once, before the first read: no change slips between a read and the
    // subscription.
    // Bounded like the reads: a bus that stalls here must not keep the first word back
    // (tasks whose policy cares wait for it); without its subscriptions, changes are missed.
    let changes = match tokio::time::timeout(READ_TIMEOUT, subscribe(&conn)).await {
        Ok(changes) => changes,
        Err(_) => {
            info!(
                "the system bus did not take the subscriptions in time; its services are read again every {} s",
                REREAD_UNSUBSCRIBED.as_secs()
            );
            Vec::new()
        }
    };
    // Without subscriptions, the stream of changes ends at once: that is no bus going away.
    let subscribed = !changes.is_empty();
    let mut any = futures_util::stream::select_all(changes);
    loop {
        let now = read(&conn).await;
        if (now.nm_connected.is_none() || now.on_battery.is_none()) && !said_missing {
            info!(
                network = %now.network_source,
                power = %now.power_source,
                "a desktop service is not on the system bus: assuming online, unmetered and on AC power where it is silent"
            );
            said_missing = true;
        }
        if last.as_ref() != Some(&now) {
            debug!(?now, "desktop conditions");
            report(now.clone());
            last = Some(now);
        }
        if !subscribed {
            tokio::time::sleep(REREAD_UNSUBSCRIBED).await;
            continue;
        }
        if any.next().await.is_none() {
            // Facts nobody can update any more are dropped rather than kept forever (a
            // stale "on battery" would hold sessions back).
            let why = "the system bus went away".to_owned();
            info!("{why}: assuming online, unmetered and on AC power");
            report(Desktop { network_source: why.clone(), power_source: why, ..Desktop::default() });
            return;
        }
    }
}

/// Subscribes to what says the desktop's facts changed: the services' properties, and
/// their names appearing or going.
async fn subscribe(conn: &Connection) -> Vec<futures_util::stream::BoxStream<'static, ()>> {
    let mut changes = Vec::new();
    for (dest, path, _) in [NM, UPOWER, DISPLAY] {
        let builder = zbus::fdo::PropertiesProxy::builder(conn)
            .destination(dest)
            .and_then(|b| b.path(path))
            .map(|b| b.cache_properties(CacheProperties::No));
        if let Ok(builder) = builder
            && let Ok(p) = builder.build().await
            && let Ok(s) = p.receive_properties_changed().await
        {
            changes.push(s.map(|_| ()).boxed());
        }
    }
    // A service that starts (or stops) later is heard of by its name's owner changing.
    if let Ok(bus) = zbus::fdo::DBusProxy::new(conn).await {
        for name in [NM.0, UPOWER.0] {
            if let Ok(s) = bus.receive_name_owner_changed_with_args(&[(0, name)]).await {
                changes.push(s.map(|_| ()).boxed());
            }
        }
    }
    changes
}

/// How long reading the services' properties may take.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often the services are read when their changes could not be subscribed to.
const REREAD_UNSUBSCRIBED: std::time::Duration = std::time::Duration::from_secs(30);

async fn proxy<'a>(conn: &Connection, (dest, path, iface): (&'a str, &'a str, &'a str)) -> zbus::Result<Proxy<'a>> {
    zbus::proxy::Builder::new(conn)
        .destination(dest)?
        .path(path)?
        .interface(iface)?
        .cache_properties(CacheProperties::No)
        .build()
        .await
}

/// Reads every fact now, each service on its own time: one that hangs counts as absent
/// for this read, and the other's facts are kept (a hung UPower must not lose
/// NetworkManager's "metered").
async fn read(conn: &Connection) -> Desktop {
    let why = || format!("no answer within {} s", READ_TIMEOUT.as_secs());
    let (network, power) = tokio::join!(
        tokio::time::timeout(READ_TIMEOUT, read_network(conn)),
        tokio::time::timeout(READ_TIMEOUT, read_power(conn)),
    );
    let network = network.unwrap_or_else(|_| Desktop { network_source: why(), ..Desktop::default() });
    let power = power.unwrap_or_else(|_| Desktop { power_source: why(), ..Desktop::default() });
    Desktop {
        nm_connected: network.nm_connected,
        nm_internet: network.nm_internet,
        metered: network.metered,
        network_source: network.network_source,
        on_battery: power.on_battery,
        battery_percent: power.battery_percent,
        power_source: power.power_source,
    }
}

/// NetworkManager's facts (the network fields of a `Desktop`).
async fn read_network(conn: &Connection) -> Desktop {
    let mut d = Desktop::default();
    match proxy(conn, NM).await {
        Ok(nm) => match nm.get_property::<u32>("State").await {
            Ok(state) => {
                d.nm_connected = Some(state >= NM_STATE_CONNECTED_LOCAL);
                // NMConnectivityState: 1 none, 2 portal, 3 limited, 4 full (0: unknown).
                d.nm_internet = match nm.get_property::<u32>("Connectivity").await {
                    Ok(4) => Some(true),
                    Ok(1..=3) => Some(false),
                    _ => None,
                };
                // An older NetworkManager may lack `Metered`: then unknown.
                d.metered = nm
                    .get_property::<u32>("Metered")
                    .await
                    .ok()
                    .map(|m| m == NM_METERED_YES || m == NM_METERED_GUESS_YES);
                d.network_source = "NetworkManager".into();
            }
            Err(e) => d.network_source = format!("NetworkManager not available ({e})"),
        },
        Err(e) => d.network_source = format!("NetworkManager not available ({e})"),
    }
    d
}

/// UPower's facts (the power fields of a `Desktop`).
async fn read_power(conn: &Connection) -> Desktop {
    let mut d = Desktop::default();
    match proxy(conn, UPOWER).await {
        Ok(up) => match up.get_property::<bool>("OnBattery").await {
            Ok(on_battery) => {
                d.on_battery = Some(on_battery);
                d.power_source = "UPower".into();
                if let Ok(display) = proxy(conn, DISPLAY).await
                    && let Ok(p) = display.get_property::<f64>("Percentage").await
                    && p > 0.0
                {
                    d.battery_percent = Some(p.clamp(0.0, 100.0).round() as u8);
                }
            }
            Err(e) => d.power_source = format!("UPower not available ({e})"),
        },
        Err(e) => d.power_source = format!("UPower not available ({e})"),
    }
    d
}
