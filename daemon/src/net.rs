//! What the daemon knows of the network: whether a route to an address exists, and a
//! watcher that says when the kernel's links, addresses or routes change.
//!
//! A route check is a UDP `connect`: the kernel looks the route up and sends nothing. No
//! route (`ENETUNREACH`, `EHOSTUNREACH`, no source address) means the network is gone for
//! that peer; any other answer counts as reachable, so a doubtful check never holds a task.
//! The watcher is an rtnetlink socket subscribed to link, address and route changes, read
//! on its own thread; bursts are coalesced into one report.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

// `None` as the protocol is NETLINK_ROUTE.
use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SocketFlags, SocketType};

/// Changes arriving within this long of each other are reported once.
const COALESCE: Duration = Duration::from_millis(50);

// rtnetlink multicast groups (linux/rtnetlink.h): link, IPv4/IPv6 addresses and routes.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

/// Whether the kernel has a route to `ip` (see the module documentation). In doubt (no
/// socket of that family to ask with), yes: a peer is never held back on a guess.
pub fn route_to(ip: IpAddr) -> bool {
    route_in_family(ip).unwrap_or(true)
}

/// Whether the kernel has a route to `ip`; `None` if it cannot be asked (no socket of that
/// family: IPv6 turned off at boot, a sandbox).
fn route_in_family(ip: IpAddr) -> Option<bool> {
    let local = match ip {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(local).ok()?;
    Some(match socket.connect(SocketAddr::new(ip, 9)) {
        Ok(()) => true,
        Err(e) => !no_route(&e),
    })
}

/// Whether there is a route to the internet at large (a default route, IPv4 or IPv6):
/// what a peer not yet resolved needs.
pub fn default_route() -> bool {
    // Public anycast resolvers, as any address beyond the local networks; nothing is sent.
    either_route(
        route_in_family(IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1))),
        route_in_family(IpAddr::V6(Ipv6Addr::new(0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1111))),
    )
}

/// A family that cannot be asked does not count: with IPv6 off, the IPv4 route decides
/// (counting the missing family as a route made the daemon online for ever). Only when
/// neither can be asked is the answer "yes", in doubt.
fn either_route(v4: Option<bool>, v6: Option<bool>) -> bool {
    match (v4, v6) {
        (None, None) => true,
        (a, b) => a.unwrap_or(false) || b.unwrap_or(false),
    }
}

fn no_route(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EADDRNOTAVAIL))
}

/// What the watcher reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Links, addresses or routes changed (a burst of them).
    Changed,
    /// The watcher stopped for good: from now on nothing says when the network returns.
    Stopped,
}

/// A burst is reported after at most this long, however long it goes on.
const LONGEST_BURST: Duration = Duration::from_secs(1);

/// Starts the watcher: `report` runs (on the watcher's thread) once per burst of link,
/// address or route changes, and once if the watcher stops. Fails if netlink cannot be
/// opened (then the daemon assumes every peer reachable, as before it knew better).
pub fn watch(report: impl Fn(Watch) + Send + 'static) -> io::Result<()> {
    // Close-on-exec: apps the daemon launches must not inherit it.
    let fd = rustix::net::socket_with(AddressFamily::NETLINK, SocketType::RAW, SocketFlags::CLOEXEC, None)?;
    let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE;
    rustix::net::bind(&fd, &SocketAddrNetlink::new(0, groups))?;
    std::thread::Builder::new().name("netlink".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // Wait for a change, however long; then drain what follows closely.
            let _ = rustix::net::sockopt::set_socket_timeout(&fd, rustix::net::sockopt::Timeout::Recv, None);
            match rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty()) {
                Ok(_) => {}
                // The socket's buffer overflowed: changes were lost, which is a change too.
                Err(rustix::io::Errno::NOBUFS) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "the network watcher stopped; peers are assumed reachable");
                    report(Watch::Stopped);
                    return;
                }
            }
            let _ = rustix::net::sockopt::set_socket_timeout(&fd, rustix::net::sockopt::Timeout::Recv, Some(COALESCE));
            let burst = std::time::Instant::now();
            while burst.elapsed() < LONGEST_BURST && rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty()).is_ok() {}
            report(Watch::Changed);
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_always_has_a_route() {
        assert!(route_to(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }

    #[test]
    fn a_family_that_cannot_be_asked_is_no_route() {
        // IPv6 off at boot: IPv4 decides either way.
        assert!(!either_route(Some(false), None));
        assert!(either_route(Some(true), None));
        assert!(!either_route(None, Some(false)));
        assert!(!either_route(Some(false), Some(false)));
        assert!(either_route(Some(false), Some(true)));
        // Nothing to ask with at all: in doubt, online.
        assert!(either_route(None, None));
    }
}
