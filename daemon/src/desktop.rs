//! What the desktop says about the machine, over the system D-Bus (`zbus` on tokio; never
//! on the core's thread): NetworkManager's `State` and `Metered`, UPower's `OnBattery` and
//! the display device's `Percentage`. Each change is reported to the core whole. A service
//! that is not on the bus (or no bus at all) leaves its facts unknown: the daemon then
//! assumes online, unmetered and on AC, and says so once in the log. One on the bus that
//! fails a read keeps its last facts until it answers again.
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
// NMConnectivityState: a captive portal (its check got a sign-in page, not its answer).
const NM_CONNECTIVITY_PORTAL: u32 = 2;

/// What NetworkManager and UPower said last (`None`: they did not say).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desktop {
    /// NetworkManager thinks the machine is connected (to something).
    pub nm_connected: Option<bool>,
    /// NetworkManager's `Connectivity`: full (true), or none, behind a portal or limited
    /// (false); unknown: `None`.
    pub nm_internet: Option<bool>,
    /// NetworkManager found a captive portal (a sign-in page answers in place of servers):
    /// nothing should start until it lets traffic through.
    pub portal: Option<bool>,
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
    // After a read a service on the bus did not answer: when to read again.
    let mut again: Option<std::time::Duration> = None;
    loop {
        let (now, failed) = read(&conn, last.as_ref()).await;
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
        again = failed.then(|| again.map_or(REREAD_FAILED_FIRST, |a| (a * 2).min(REREAD_FAILED_MOST)));
        if !subscribed {
            tokio::time::sleep(again.unwrap_or(REREAD_UNSUBSCRIBED).min(REREAD_UNSUBSCRIBED)).await;
            continue;
        }
        tokio::select! {
            changed = any.next() => {
                if changed.is_none() {
                    // Facts nobody can update any more are dropped rather than kept forever
                    // (a stale "on battery" would hold sessions back).
                    let why = "the system bus went away".to_owned();
                    info!("{why}: assuming online, unmetered and on AC power");
                    report(Desktop { network_source: why.clone(), power_source: why, ..Desktop::default() });
                    return;
                }
            }
            () = tokio::time::sleep(again.unwrap_or_default()), if again.is_some() => {}
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
/// A service on the bus that did not answer is read again after this, doubling up to the
/// most (its last facts are kept meanwhile).
const REREAD_FAILED_FIRST: std::time::Duration = std::time::Duration::from_secs(2);
const REREAD_FAILED_MOST: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a service said nothing.
#[derive(Debug)]
enum Silent {
    /// Not on the bus: its facts are unknown.
    Absent(String),
    /// On the bus but it failed or did not answer in time: its last facts still hold.
    Failed(String),
}

/// One property of a service, without starting the service if it is not running (an admin
/// who stopped NetworkManager does not want it started again by a download daemon).
/// `Ok(None)`: the service has no such property.
async fn get<T>((dest, path, iface): (&str, &str, &str), conn: &Connection, name: &str) -> Result<Option<T>, Silent>
where
    T: TryFrom<zbus::zvariant::OwnedValue>,
{
    let failed = |e: zbus::Error| Silent::Failed(format!("{dest}: {e}"));
    let props = zbus::proxy::Builder::<Proxy>::new(conn)
        .destination(dest)
        .and_then(|b| b.path(path))
        .and_then(|b| b.interface("org.freedesktop.DBus.Properties"))
        .map_err(failed)?
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(failed)?;
    let flags = zbus::proxy::MethodFlags::NoAutoStart.into();
    match props.call_with_flags::<_, _, zbus::zvariant::OwnedValue>("Get", flags, &(iface, name)).await {
        Ok(Some(value)) => T::try_from(value)
            .map(Some)
            .map_err(|_| Silent::Failed(format!("{dest}: {name} is not of the expected type"))),
        Ok(None) => Err(Silent::Failed(format!("{dest}: no answer to reading {name}"))),
        Err(zbus::Error::MethodError(error, detail, _)) => {
            let why = || format!("{dest} not available ({error}: {})", detail.as_deref().unwrap_or("no details"));
            match error.as_str() {
                // Not there, or never to be asked (a sandbox refusing it): no facts, and no
                // read again every minute for ever.
                "org.freedesktop.DBus.Error.ServiceUnknown"
                | "org.freedesktop.DBus.Error.NameHasNoOwner"
                | "org.freedesktop.DBus.Error.AccessDenied"
                | "org.freedesktop.DBus.Error.UnknownObject"
                | "org.freedesktop.DBus.Error.UnknownMethod" => Err(Silent::Absent(why())),
                "org.freedesktop.DBus.Error.UnknownProperty"
                | "org.freedesktop.DBus.Error.InvalidArgs"
                | "org.freedesktop.DBus.Error.UnknownInterface" => Ok(None),
                _ => Err(Silent::Failed(why())),
            }
        }
        Err(e) => Err(failed(e)),
    }
}

/// Reads every fact now, each service on its own time. A service not on the bus leaves its
/// facts unknown; one on the bus that fails or hangs keeps what it said last (a busy
/// NetworkManager after a resume did not make a metered network unmetered), and says
/// whether a read failed so that it is read again soon.
async fn read(conn: &Connection, last: Option<&Desktop>) -> (Desktop, bool) {
    let timeout = || Silent::Failed(format!("no answer within {} s", READ_TIMEOUT.as_secs()));
    let (network, power) = tokio::join!(
        tokio::time::timeout(READ_TIMEOUT, read_network(conn)),
        tokio::time::timeout(READ_TIMEOUT, read_power(conn)),
    );
    // Each answer fills only its own service's fields of the result: a whole `Desktop`
    // (the last one kept, or one of unknown facts) serves for either.
    let mut failed = false;
    let mut heard = |got: Result<Result<Desktop, Silent>, _>| match got.unwrap_or_else(|_| Err(timeout())) {
        Ok(d) => d,
        Err(Silent::Absent(why)) => unknown(why),
        Err(Silent::Failed(why)) => {
            failed = true;
            debug!(%why, "a desktop service did not answer; its last word holds");
            last.map_or_else(|| unknown(why), Desktop::clone)
        }
    };
    let (network, power) = (heard(network), heard(power));
    let now = Desktop {
        nm_connected: network.nm_connected,
        nm_internet: network.nm_internet,
        portal: network.portal,
        metered: network.metered,
        network_source: network.network_source,
        on_battery: power.on_battery,
        battery_percent: power.battery_percent,
        power_source: power.power_source,
    };
    (now, failed)
}

/// Nothing known, for the reason `why` (shown as either service's source).
fn unknown(why: String) -> Desktop {
    Desktop { network_source: why.clone(), power_source: why, ..Desktop::default() }
}

/// NetworkManager's facts (the network fields of a `Desktop`).
async fn read_network(conn: &Connection) -> Result<Desktop, Silent> {
    let Some(state) = get::<u32>(NM, conn, "State").await? else {
        return Err(Silent::Absent("NetworkManager not available (it has no State)".into()));
    };
    // NMConnectivityState: 1 none, 2 portal, 3 limited, 4 full (0: unknown).
    let connectivity = get::<u32>(NM, conn, "Connectivity").await?;
    let nm_internet = match connectivity {
        Some(4) => Some(true),
        Some(1..=3) => Some(false),
        _ => None,
    };
    let portal = connectivity.filter(|&c| c != 0).map(|c| c == NM_CONNECTIVITY_PORTAL);
    // An older NetworkManager may lack `Metered`: then unknown.
    let metered = get::<u32>(NM, conn, "Metered").await?.map(|m| m == NM_METERED_YES || m == NM_METERED_GUESS_YES);
    Ok(Desktop {
        nm_connected: Some(state >= NM_STATE_CONNECTED_LOCAL),
        nm_internet,
        portal,
        metered,
        network_source: "NetworkManager".into(),
        ..Desktop::default()
    })
}

/// UPower's facts (the power fields of a `Desktop`).
async fn read_power(conn: &Connection) -> Result<Desktop, Silent> {
    let Some(on_battery) = get::<bool>(UPOWER, conn, "OnBattery").await? else {
        return Err(Silent::Absent("UPower not available (it has no OnBattery)".into()));
    };
    // The display device's charge is only shown; a read that fails leaves it out.
    let battery_percent = match get::<f64>(DISPLAY, conn, "Percentage").await {
        Ok(Some(p)) if p > 0.0 => Some(p.clamp(0.0, 100.0).round() as u8),
        _ => None,
    };
    Ok(Desktop { on_battery: Some(on_battery), battery_percent, power_source: "UPower".into(), ..Desktop::default() })
}
