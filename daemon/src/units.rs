//! `dlsessiond install-user-units`: writes the systemd user units with the real path.

use std::io;
use std::path::{Path, PathBuf};

/// The unit files as shipped in `systemd/`.
pub const SERVICE: &str = include_str!("../../systemd/dlsessiond.service");
pub const SOCKET: &str = include_str!("../../systemd/dlsessiond.socket");

/// The service unit with `ExecStart=` pointing at `exec`.
pub fn service_for(exec: &Path) -> io::Result<String> {
    let path = exec.to_str().ok_or_else(|| io::Error::other("the daemon's path is not valid UTF-8"))?;
    if path.contains(['\n', '"', '\\']) {
        return Err(io::Error::other(format!("cannot put {path:?} in a unit file")));
    }
    // systemd expands `%` specifiers and `$` variables in `ExecStart=`: doubled, they are
    // themselves (a daemon under `/opt/100%/` or `/srv/$X/` runs from there, not elsewhere).
    let escaped = path.replace('%', "%%").replace('$', "$$");
    let quoted = if path.contains(' ') { format!("\"{escaped}\"") } else { escaped };
    let mut out = String::with_capacity(SERVICE.len() + path.len());
    for line in SERVICE.lines() {
        if line.starts_with("ExecStart=") {
            out.push_str(&format!("ExecStart={quoted}"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    Ok(out)
}

/// Writes both units into `dir` (default `$XDG_CONFIG_HOME/systemd/user`), the service
/// starting `exec` (default: this executable). Returns the files written.
pub fn install(dir: Option<PathBuf>, exec: Option<PathBuf>) -> io::Result<Vec<PathBuf>> {
    let dir = match dir {
        Some(d) => d,
        None => directories::BaseDirs::new()
            .ok_or_else(|| io::Error::other("cannot determine the home directory"))?
            .config_dir()
            .join("systemd/user"),
    };
    let exec = match exec {
        Some(e) => e,
        None => std::env::current_exe()?,
    };
    let exec = std::fs::canonicalize(&exec)?;
    std::fs::create_dir_all(&dir)?;
    let mut written = Vec::new();
    for (name, text) in [("dlsessiond.service", service_for(&exec)?), ("dlsessiond.socket", SOCKET.to_owned())] {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_start_is_replaced() {
        let text = service_for(Path::new("/home/u/.cargo/bin/dlsessiond")).unwrap();
        assert!(text.contains("\nExecStart=/home/u/.cargo/bin/dlsessiond\n"));
        assert!(!text.contains("/usr/bin/dlsessiond"));
        assert!(text.contains("Type=notify"));
        let spaced = service_for(Path::new("/opt/my apps/dlsessiond")).unwrap();
        assert!(spaced.contains("ExecStart=\"/opt/my apps/dlsessiond\""));
        assert!(service_for(Path::new("/bad\npath")).is_err());
        let odd = service_for(Path::new("/opt/100%/$HOME/dlsessiond")).unwrap();
        assert!(odd.contains("\nExecStart=/opt/100%%/$$HOME/dlsessiond\n"), "{odd}");
    }
}
