//! Name resolution that remembers what each host name last resolved to, so that the core
//! can tell a server it cannot reach (no route to the address) from one that refused or
//! timed out on a network that has a route to it (a LAN without a default route, or
//! `localhost`), for tasks whose attempts failed before any response told it an address.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use tower_service::Service;

/// The connector every direct connection (and every connection to a proxy) goes through.
pub type TcpConnector = HttpConnector<Recording>;

/// Names remembered at most: past it the memory starts again (a batch naming many hosts
/// must not grow the daemon without bound; a name forgotten is only resolved again).
const MOST: usize = 4096;

/// Each host name's first address at its last successful resolution.
#[derive(Debug, Clone, Default)]
pub struct Resolved(Arc<Mutex<HashMap<Box<str>, IpAddr>>>);

impl Resolved {
    /// What `host` (as written in a URL, IPv6 without brackets) last resolved to.
    pub fn of(&self, host: &str) -> Option<IpAddr> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(host).copied()
    }

    fn forget(&self, host: &str) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).remove(host);
    }

    fn remember(&self, host: &str, ip: IpAddr) {
        let mut names = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if names.len() >= MOST && !names.contains_key(host) {
            names.clear();
        }
        names.insert(host.into(), ip);
    }
}

/// The system's resolver (`getaddrinfo` on a blocking thread), noting each answer.
#[derive(Debug, Clone)]
pub struct Recording {
    gai: GaiResolver,
    resolved: Resolved,
}

impl Recording {
    pub fn new(resolved: Resolved) -> Recording {
        Recording { gai: GaiResolver::new(), resolved }
    }
}

impl Service<Name> for Recording {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.gai.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().to_owned();
        let resolving = self.gai.call(name);
        let resolved = self.resolved.clone();
        Box::pin(async move {
            // A name that does not resolve now has no address to check: an old answer may
            // be from another network.
            let addrs: Vec<SocketAddr> = match resolving.await {
                Ok(addrs) => addrs.collect(),
                Err(e) => {
                    resolved.forget(&host);
                    return Err(e);
                }
            };
            match addrs.first() {
                Some(first) => resolved.remember(&host, first.ip()),
                None => resolved.forget(&host),
            }
            Ok(addrs.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_bounded_and_keeps_the_last_answer() {
        let r = Resolved::default();
        let ip = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(n));
        r.remember("a", ip(1));
        r.remember("a", ip(2));
        assert_eq!(r.of("a"), Some(ip(2)));
        for n in 0..MOST as u32 {
            r.remember(&format!("h{n}"), ip(n));
        }
        assert!(r.0.lock().unwrap().len() <= MOST);
        assert_eq!(r.of("missing"), None);
    }

    #[tokio::test]
    async fn a_resolution_is_remembered() {
        let r = Resolved::default();
        let mut resolver = Recording::new(r.clone());
        let name: Name = "localhost".parse().unwrap();
        let addrs: Vec<SocketAddr> = resolver.call(name).await.unwrap().collect();
        assert!(!addrs.is_empty());
        assert_eq!(r.of("localhost"), Some(addrs[0].ip()));
    }
}
