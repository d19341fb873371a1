//! Connects to a Unix socket, sends nothing, and prints what comes back as hex (or the
//! connect error). The security tests run it as another user with `setpriv`.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: peer_probe SOCKET");
        std::process::exit(2);
    };
    let mut s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            println!("connect-error {}", e.raw_os_error().unwrap_or(0));
            return;
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut data = Vec::new();
    let _ = s.read_to_end(&mut data);
    let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
    println!("reply {hex}");
}
