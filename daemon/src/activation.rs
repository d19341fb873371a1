//! Relaunching a desktop application the Linux-native way: `ActivateAction` of
//! `org.freedesktop.Application` on the session bus (which starts the app by D-Bus
//! activation from its `.desktop` file), or else the `Exec` line of that file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dlsession_proto::DESKTOP_ACTION;
use zbus::zvariant::{OwnedValue, Value};

/// How long an activation may take (D-Bus starts the app and waits for it to answer).
const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(25);

/// Whether `id` is a desktop application id: a D-Bus well-known name of two or more
/// elements of `[A-Za-z0-9_-]`, none starting with a digit, at most 255 bytes.
pub fn is_application_id(id: &str) -> bool {
    let mut parts = 0;
    for part in id.split('.') {
        parts += 1;
        let mut chars = part.chars();
        let Some(first) = chars.next() else { return false };
        if first.is_ascii_digit() || !part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return false;
        }
    }
    parts >= 2 && id.len() <= 255
}

/// The object path of an application id (`org.example.App` → `/org/example/App`; `-`
/// becomes `_`, as the Desktop Entry specification says).
pub fn object_path(app_id: &str) -> String {
    format!("/{}", app_id.replace('.', "/").replace('-', "_"))
}

/// Calls `ActivateAction("dlsession-events", [identifier], {})` on the app, on the session
/// bus (`DBUS_SESSION_BUS_ADDRESS`). D-Bus starts the app if it is not running.
pub async fn activate(app_id: &str, identifier: &str) -> Result<(), String> {
    let conn = zbus::Connection::session().await.map_err(|e| format!("no session bus: {e}"))?;
    let path = object_path(app_id);
    let parameter = vec![OwnedValue::try_from(Value::from(identifier)).map_err(|e| e.to_string())?];
    let platform_data: std::collections::HashMap<&str, Value<'_>> = std::collections::HashMap::new();
    let body = (DESKTOP_ACTION, parameter, platform_data);
    let call =
        conn.call_method(Some(app_id), path.as_str(), Some("org.freedesktop.Application"), "ActivateAction", &body);
    match tokio::time::timeout(ACTIVATION_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("ActivateAction on {app_id}: {e}")),
        Err(_) => Err(format!("ActivateAction on {app_id}: no answer within {} s", ACTIVATION_TIMEOUT.as_secs())),
    }
}

/// The argv of the `Exec` line of `<app_id>.desktop` (looked for in `$XDG_DATA_HOME` and
/// `$XDG_DATA_DIRS`, under `applications/`), field codes removed.
pub fn desktop_exec(app_id: &str) -> Result<Vec<String>, String> {
    let file = desktop_file(app_id).ok_or_else(|| format!("no {app_id}.desktop in the applications directories"))?;
    let text = std::fs::read_to_string(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let exec = exec_line(&text).ok_or_else(|| format!("{} has no Exec line", file.display()))?;
    let words = shell_words::split(exec).map_err(|e| format!("{}: Exec: {e}", file.display()))?;
    // Field codes (%f, %U, %i, …) stand for what the launcher passes; there is nothing to
    // pass, so they go (and `%%` is a literal `%`).
    let argv: Vec<String> = words
        .into_iter()
        .filter(|w| !(w.len() == 2 && w.starts_with('%') && w != "%%"))
        .map(|w| w.replace("%%", "%"))
        .collect();
    if argv.is_empty() {
        return Err(format!("{}: the Exec line is empty", file.display()));
    }
    Ok(argv)
}

fn desktop_file(app_id: &str) -> Option<PathBuf> {
    let home = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")));
    let dirs = std::env::var("XDG_DATA_DIRS")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "/usr/local/share:/usr/share".into());
    home.into_iter()
        .chain(dirs.split(':').filter(|d| !d.is_empty()).map(PathBuf::from))
        .map(|d| d.join("applications").join(format!("{app_id}.desktop")))
        .find(|p| p.is_file())
}

/// The `Exec` value of the `[Desktop Entry]` group.
fn exec_line(text: &str) -> Option<&str> {
    let mut in_entry = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_entry = line == "[Desktop Entry]";
        } else if in_entry
            && let Some(v) = line.strip_prefix("Exec")
            && let Some(v) = v.trim_start().strip_prefix('=')
        {
            return Some(v.trim());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_ids_and_their_paths() {
        assert!(is_application_id("org.example.App"));
        assert!(is_application_id("org.example.my-app"));
        assert!(!is_application_id("App"), "one element");
        assert!(!is_application_id("org.2fast.App"), "an element starts with a digit");
        assert!(!is_application_id("org..App"));
        assert!(!is_application_id("org.example.App;rm"));
        assert_eq!(object_path("org.example.my-app"), "/org/example/my_app");
    }

    #[test]
    fn the_exec_line_of_the_desktop_entry() {
        let text = "[Desktop Entry]\nName=App\nExec=/usr/bin/app --gapplication-service %U\n[Desktop Action new]\nExec=/usr/bin/app --new\n";
        assert_eq!(exec_line(text), Some("/usr/bin/app --gapplication-service %U"));
        assert_eq!(exec_line("[Other]\nExec=x\n"), None);
    }
}
