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
    Some(match toward(ip)? {
        Ok(_) => true,
        Err(e) => !no_route(&e),
    })
}

/// A UDP socket of `ip`'s family connected toward it (the kernel picks route and source
/// address; nothing is sent); `None` if no socket of that family can be made.
fn toward(ip: IpAddr) -> Option<io::Result<UdpSocket>> {
    let local = match ip {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(local).ok()?;
    Some(socket.connect(SocketAddr::new(ip, 9)).map(|()| socket))
}

/// Public anycast resolvers, as any address beyond the local networks (IPv4, IPv6).
const INTERNET: [IpAddr; 2] =
    [IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)), IpAddr::V6(Ipv6Addr::new(0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1111))];

/// Whether there is a route to the internet at large (a default route, IPv4 or IPv6):
/// what a peer not yet resolved needs.
pub fn default_route() -> bool {
    let [v4, v6] = INTERNET.map(route_in_family);
    either_route(v4, v6)
}

/// The local addresses traffic to the internet at large leaves from (IPv4, IPv6): what
/// changes when a dock, a VPN or a new lease moves the way out, while a refreshed address
/// lifetime changes nothing. Nothing is sent.
pub fn way_out() -> (Option<IpAddr>, Option<IpAddr>) {
    let [v4, v6] = INTERNET.map(|peer| toward(peer)?.ok()?.local_addr().ok().map(|a| a.ip()));
    (v4, v6)
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
            let mut changed = match rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty()) {
                Ok((n, _)) => news(buf.get(..n).unwrap_or_default()),
                // The socket's buffer overflowed: changes were lost, which is a change too.
                Err(rustix::io::Errno::NOBUFS) => true,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "the network watcher stopped; peers are assumed reachable");
                    report(Watch::Stopped);
                    return;
                }
            };
            let _ = rustix::net::sockopt::set_socket_timeout(&fd, rustix::net::sockopt::Timeout::Recv, Some(COALESCE));
            let burst = std::time::Instant::now();
            while burst.elapsed() < LONGEST_BURST {
                match rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty()) {
                    Ok((n, _)) => changed |= news(buf.get(..n).unwrap_or_default()),
                    Err(rustix::io::Errno::NOBUFS) => changed = true,
                    Err(_) => break,
                }
            }
            // A laptop's wifi reports each scan and roam; nothing there moves a route.
            if changed {
                report(Watch::Changed);
            }
        }
    })?;
    Ok(())
}

const RTM_NEWLINK: u16 = 16;
const IFLA_WIRELESS: u16 = 11;
/// `struct nlmsghdr`, then `struct ifinfomsg` of a link message.
const NLMSG_HEADER: usize = 16;
const IFINFOMSG: usize = 16;

/// Whether the netlink messages in `buf` may tell of a change to links, addresses or
/// routes: all but a link message carrying wireless events only (a scan done, a roam within
/// one network), which wifi sends every minute or so. What cannot be read counts as news.
fn news(buf: &[u8]) -> bool {
    let mut rest = buf;
    while rest.len() >= NLMSG_HEADER {
        let word = |at: usize| rest.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_ne_bytes);
        let half = |at: usize| rest.get(at..at + 2).and_then(|b| b.try_into().ok()).map(u16::from_ne_bytes);
        let (Some(len), Some(kind)) = (word(0), half(4)) else { return true };
        let len = len as usize;
        let Some(msg) = rest.get(..len).filter(|_| len >= NLMSG_HEADER) else { return true };
        if kind != RTM_NEWLINK || !wireless_only(msg.get(NLMSG_HEADER + IFINFOMSG..).unwrap_or_default()) {
            return true;
        }
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    false
}

/// Whether a link message's attributes hold a wireless event (`IFLA_WIRELESS`).
fn wireless_only(mut attrs: &[u8]) -> bool {
    while attrs.len() >= 4 {
        let len = attrs.get(..2).and_then(|b| b.try_into().ok()).map(u16::from_ne_bytes).unwrap_or(0) as usize;
        let kind = attrs.get(2..4).and_then(|b| b.try_into().ok()).map(u16::from_ne_bytes).unwrap_or(0);
        if kind == IFLA_WIRELESS {
            return true;
        }
        if len < 4 {
            return false;
        }
        attrs = attrs.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link message with one attribute of `kind`.
    fn link_message(kind: u16) -> Vec<u8> {
        let mut m = Vec::new();
        let len = (NLMSG_HEADER + IFINFOMSG + 8) as u32;
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        m.extend_from_slice(&[0; 10]); // flags, seq, pid
        m.extend_from_slice(&[0; IFINFOMSG]);
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 4]);
        m
    }

    #[test]
    fn wifi_scans_are_no_news() {
        let scan = link_message(IFLA_WIRELESS);
        assert!(!news(&scan));
        assert!(!news(&[scan.clone(), scan.clone()].concat()));
        // IFLA_OPERSTATE (16): the link went up or down.
        let state = link_message(16);
        assert!(news(&state));
        assert!(news(&[scan.clone(), state].concat()), "one real change among scans");
        // Another kind (a route: RTM_NEWROUTE 24), and what cannot be read, is news.
        let mut route = scan.clone();
        route[4..6].copy_from_slice(&24u16.to_ne_bytes());
        assert!(news(&route));
        let mut bad = scan;
        bad[0..4].copy_from_slice(&5u32.to_ne_bytes());
        assert!(news(&bad), "a length shorter than a header");
    }

    #[test]
    fn the_way_out_is_a_local_address_or_none() {
        let (v4, v6) = way_out();
        assert!(v4.is_none_or(|a| a.is_ipv4() && !a.is_unspecified()), "{v4:?}");
        assert!(v6.is_none_or(|a| a.is_ipv6() && !a.is_unspecified()), "{v6:?}");
        assert_eq!(way_out(), (v4, v6), "the same while nothing changes");
    }

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
