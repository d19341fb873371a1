//! A network namespace joined to this one by a veth pair, for tests that take a server's
//! link away and give it back (root only; see `mount::require_root`).
//!
//! ```text
//! this namespace  <host_if> 10.231.N.1/24  ──veth──  10.231.N.2/24 <ns_if>  namespace
//! ```
//! Taking `host_if` down removes the route to 10.231.N.0/24 here; bringing it up puts it back.
//! An `unreachable` route of lower priority stands behind it, so that with the link down the
//! namespace is unreachable rather than sent to this machine's default gateway (as a laptop
//! whose Wi-Fi is off has no route at all).

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};

/// A namespace with one veth link to this one, deleted (with the link) on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    host_if: String,
    net: String,
    /// The namespace's address on the link.
    pub ns_ip: IpAddr,
    /// This side's address on the link (reachable from inside the namespace).
    pub host_ip: IpAddr,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl NetNs {
    /// Makes the namespace and the link (names from this process's id and `tag`, 0–255).
    pub fn new(tag: u8) -> NetNs {
        let id = std::process::id() % 10_000;
        let name = format!("dls{id}n{tag}");
        let (host_if, ns_if) = (format!("dlh{id}n{tag}"), format!("dlp{id}n{tag}"));
        let net = format!("10.231.{tag}");
        ip(&["netns", "add", &name]);
        let ns = NetNs {
            name,
            host_if,
            net: net.clone(),
            ns_ip: IpAddr::V4(Ipv4Addr::new(10, 231, tag, 2)),
            host_ip: IpAddr::V4(Ipv4Addr::new(10, 231, tag, 1)),
        };
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ip(&["-n", &ns.name, "addr", "add", &format!("{net}.2/24"), "dev", &ns_if]);
        ip(&["-n", &ns.name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ip(&["route", "add", "unreachable", &format!("{net}.0/24"), "metric", "4000"]);
        ns
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `program` inside the namespace (stdout piped, stderr inherited).
    pub fn spawn(&self, program: &std::path::Path, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("ip netns exec")
    }

    /// Takes this side of the link down: the route to the namespace is gone.
    pub fn link_down(&self) {
        ip(&["link", "set", &self.host_if, "down"]);
    }

    /// Brings it up again: the route comes back.
    pub fn link_up(&self) {
        ip(&["link", "set", &self.host_if, "up"]);
    }

    /// Inside the namespace, a default route through this side of the link: a process
    /// there is online.
    pub fn add_default_route(&self) {
        ip(&["-n", &self.name, "route", "add", "default", "via", &self.host_ip.to_string()]);
    }

    /// Takes the namespace's default route away again.
    pub fn del_default_route(&self) {
        ip(&["-n", &self.name, "route", "del", "default"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it ours.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).stderr(Stdio::null()).status();
        let unreachable = format!("{}.0/24", self.net);
        let _ = Command::new("ip").args(["route", "del", "unreachable", &unreachable, "metric", "4000"]).status();
    }
}
