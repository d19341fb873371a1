//! A session's cookies (docs/behaviour.md, "Cookies"): the `Cookie` header of every
//! request and the `Set-Cookie` of every response, redirects and retries included, under
//! RFC 6265's matching rules (the `cookie_store` crate). Shared by the session's running
//! downloads; the core stores a jar whenever it changed.
//!
//! With no public-suffix list, a cookie whose `Domain` attribute is a single label
//! (`Domain=com`) is refused: it would reach every host under that top-level domain.
//! Longer public suffixes (`co.uk`) are not known here; a jar belongs to one app's
//! session, so such a cookie can only travel between that app's own downloads.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use cookie_store::{Cookie, CookieStore, RawCookie};
use hyper::header::{HeaderMap, SET_COOKIE};
use url::Url;

/// Cookies one session keeps.
pub struct CookieJar {
    store: Mutex<CookieStore>,
    /// Changed since the core last stored it.
    dirty: AtomicBool,
    /// Told once when a clean jar changes (the core then stores it).
    on_change: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for CookieJar {
    /// Never the cookies: they are credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieJar").field("cookies", &self.unexpired()).finish_non_exhaustive()
    }
}

impl CookieJar {
    /// A jar holding what `stored` holds (JSON from [`CookieJar::to_json`]); an empty one
    /// if there is nothing or it cannot be read (the error says why).
    pub fn load(stored: Option<&str>, on_change: impl Fn() + Send + Sync + 'static) -> (CookieJar, Option<String>) {
        let (mut store, error) = match stored {
            None => (CookieStore::new(), None),
            Some(json) => match cookie_store::serde::json::load_all(json.as_bytes()) {
                Ok(store) => (store, None),
                Err(e) => (CookieStore::new(), Some(e.to_string())),
            },
        };
        // Taken before attributes were bounded: dropped as they would be refused now.
        let oversized: Vec<(String, String, String)> = store
            .iter_any()
            .filter_map(|c| Some((c.domain.as_cow()?.into_owned(), String::from(&c.path), c.name().to_owned())))
            .filter(|(domain, path, _)| domain.len() > MAX_ATTRIBUTE_BYTES || path.len() > MAX_ATTRIBUTE_BYTES)
            .collect();
        for (domain, path, name) in oversized {
            store.remove(&domain, &path, &name);
        }
        let jar = CookieJar { store: Mutex::new(store), dirty: AtomicBool::new(false), on_change: Box::new(on_change) };
        (jar, error)
    }

    /// The value of the `Cookie` header for a request to `url`, if any cookie matches.
    pub fn header_for(&self, url: &Url) -> Option<String> {
        let store = self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let pairs: Vec<String> = store.get_request_values(url).map(|(n, v)| format!("{n}={v}")).collect();
        (!pairs.is_empty()).then(|| pairs.join("; "))
    }

    /// Takes the `Set-Cookie` headers of a response from `url`, under the rules browsers
    /// add to RFC 6265 (a hostile server must not grow the jar without bound, nor a plain
    /// http answer replace what an https one set).
    pub fn take_from(&self, url: &Url, headers: &HeaderMap) {
        let cookies: Vec<RawCookie<'static>> = headers
            .get_all(SET_COOKIE)
            .iter()
            // No more than a domain holds: HTTP/2's compressed headers carry tens of thousands
            // of short lines in a megabyte, and each new cookie looks over the whole jar.
            .take(MAX_PER_DOMAIN)
            // The whole line is kept with the cookie: one longer than a cookie and its
            // attributes need (a megabyte of unknown attributes) is refused.
            .filter(|v| v.len() <= MAX_SET_COOKIE_BYTES)
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| RawCookie::parse(v.to_owned()).ok())
            .filter(|c| c.domain().is_none_or(|d| d.trim_start_matches('.').contains('.')))
            .filter(|c| c.name().len() + c.value().len() <= MAX_COOKIE_BYTES && prefix_allows(c, url))
            // An attribute longer than a browser keeps (RFC 6265bis: 1 KiB) refuses the
            // cookie: kept whole, a few thousand such cookies would be gigabytes.
            .filter(|c| [c.path(), c.domain()].into_iter().flatten().all(|a| a.len() <= MAX_ATTRIBUTE_BYTES))
            .collect();
        if cookies.is_empty() {
            return;
        }
        let mut store = self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // What expired since makes room first.
        prune_expired(&mut store);
        let secure_origin = url.scheme() == "https";
        let mut changed = false;
        for raw in cookies {
            let Ok(cookie) = Cookie::try_from_raw_cookie(&raw, url) else { continue };
            let Some(domain) = cookie.domain.as_cow().map(std::borrow::Cow::into_owned) else { continue };
            let path = String::from(&cookie.path);
            let existing = store.get_any(&domain, &path, cookie.name()).is_some();
            // "Leave Secure cookies alone": only an https answer sets one, or one that a
            // Secure cookie of the same name would be sent beside (RFC 6265bis 5.7).
            if !secure_origin
                && (cookie.secure() == Some(true) || shadows_a_secure_one(&store, &domain, &path, cookie.name()))
            {
                continue;
            }
            // Full: a new name takes the place of the cookie that expires first, in its
            // domain if that is full, else in the domain holding the most (a server that
            // filled the jar loses its own, never another site's).
            if !existing && !cookie.is_expired() && !make_room(&mut store, &domain, secure_origin) {
                continue;
            }
            changed |= store.insert(cookie.into_owned(), url).is_ok();
        }
        prune_expired(&mut store);
        drop(store);
        if changed && !self.dirty.swap(true, Ordering::AcqRel) {
            (self.on_change)();
        }
    }

    /// Everything in the jar (session cookies too: the session here is the dlsession's,
    /// which outlives a daemon restart), as JSON; marks it stored.
    pub fn to_json(&self) -> String {
        self.dirty.store(false, Ordering::Release);
        let mut store = self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // What expired since is not stored.
        prune_expired(&mut store);
        let mut out = Vec::new();
        // Writing to a Vec cannot fail; an empty jar is the fallback all the same.
        if cookie_store::serde::json::save_incl_expired_and_nonpersistent(&store, &mut out).is_err() {
            return "[]".to_owned();
        }
        String::from_utf8(out).unwrap_or_else(|_| "[]".to_owned())
    }

    /// Cookies held that have not expired.
    pub fn unexpired(&self) -> usize {
        self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter_unexpired().count()
    }
}

/// A cookie's name and value at most (as browsers: larger ones are ignored).
const MAX_COOKIE_BYTES: usize = 4096;
/// The longest `Path` or `Domain` a cookie may carry.
const MAX_ATTRIBUTE_BYTES: usize = 1024;
/// Cookies per domain at most, and in one jar.
const MAX_PER_DOMAIN: usize = 180;
const MAX_PER_JAR: usize = 3000;

/// A whole `Set-Cookie` value at most: a cookie, and attributes up to their bound.
const MAX_SET_COOKIE_BYTES: usize = 8192;

/// Makes room for a new cookie of `domain`: drops one when its domain or the jar is full;
/// false if none may go (a plain http answer never pushes out a `Secure` cookie).
fn make_room(store: &mut CookieStore, domain: &str, secure_origin: bool) -> bool {
    let mut per_domain: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for c in store.iter_any() {
        *per_domain.entry(c.domain.as_cow().map(std::borrow::Cow::into_owned).unwrap_or_default()).or_default() += 1;
    }
    let total: usize = per_domain.values().sum();
    let from = if per_domain.get(domain).copied().unwrap_or(0) >= MAX_PER_DOMAIN {
        domain.to_owned()
    } else if total >= MAX_PER_JAR {
        match per_domain.into_iter().max_by_key(|(_, n)| *n) {
            Some((most, _)) => most,
            None => return true,
        }
    } else {
        return true;
    };
    // Not `Secure` first (RFC 6265bis), and never one for a plain http answer; then one
    // kept until the session ends (a browser drops those when it closes); then the one
    // that expires first.
    let victim = store
        .iter_any()
        .filter(|c| c.domain.as_cow().is_some_and(|d| d == from))
        .filter(|c| secure_origin || c.secure() != Some(true))
        .min_by_key(|c| {
            let secure = c.secure() == Some(true);
            match &c.expires {
                cookie_store::CookieExpiration::SessionEnd => (secure, 0, 0),
                cookie_store::CookieExpiration::AtUtc(at) => (secure, 1, at.unix_timestamp()),
            }
        })
        .map(|c| (String::from(&c.path), c.name().to_owned()));
    match victim {
        Some((path, name)) => store.remove(&from, &path, &name).is_some(),
        None => false,
    }
}

/// Whether a Secure cookie named `name` exists whose domain domain-matches `domain` (or
/// the other way round) and whose path `path` path-matches: a non-secure cookie so made
/// would be sent beside it, and could be taken for it.
fn shadows_a_secure_one(store: &CookieStore, domain: &str, path: &str, name: &str) -> bool {
    let domain_match = |a: &str, b: &str| a == b || a.strip_suffix(b).is_some_and(|rest| rest.ends_with('.'));
    let path_match = |p: &str, of: &str| {
        p == of || (p.starts_with(of) && (of.ends_with('/') || p.as_bytes().get(of.len()) == Some(&b'/')))
    };
    store.iter_any().any(|c| {
        c.name() == name
            && c.secure() == Some(true)
            && c.domain.as_cow().is_some_and(|d| domain_match(&d, domain) || domain_match(domain, &d))
            && path_match(path, &String::from(&c.path))
    })
}

/// Drops expired cookies (the store only marks them).
fn prune_expired(store: &mut CookieStore) {
    let expired: Vec<(String, String, String)> = store
        .iter_any()
        .filter(|c| c.is_expired())
        .filter_map(|c| Some((c.domain.as_cow()?.into_owned(), String::from(&c.path), c.name().to_owned())))
        .collect();
    for (domain, path, name) in expired {
        store.remove(&domain, &path, &name);
    }
}

/// The `__Secure-` and `__Host-` name prefixes: such a cookie is set only by an https
/// answer, with `Secure`; a `__Host-` one also without `Domain` and with `Path=/`.
fn prefix_allows(c: &RawCookie<'_>, url: &Url) -> bool {
    let secure = url.scheme() == "https" && c.secure() == Some(true);
    if c.name().starts_with("__Host-") {
        return secure && c.domain().is_none() && c.path() == Some("/");
    }
    !c.name().starts_with("__Secure-") || secure
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    fn set_cookies(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(SET_COOKIE, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn cookies_match_travel_and_survive_a_reload() {
        let told = Arc::new(AtomicUsize::new(0));
        let t = told.clone();
        let (jar, error) = CookieJar::load(None, move || {
            t.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(error, None);
        let login = Url::parse("http://files.example.org/login").unwrap();
        jar.take_from(
            &login,
            &set_cookies(&[
                "sid=abc; Path=/",
                "pref=1; Path=/login",
                "super=1; Domain=org",
                "wide=2; Domain=example.org",
            ]),
        );
        jar.take_from(&login, &set_cookies(&["again=1"]));
        assert_eq!(told.load(Ordering::SeqCst), 1, "told once until stored");
        let file = Url::parse("http://files.example.org/data/a.bin").unwrap();
        let header = jar.header_for(&file).unwrap();
        assert!(header.contains("sid=abc") && header.contains("wide=2"), "{header}");
        assert!(!header.contains("pref=") && !header.contains("super="), "path and single-label domain: {header}");
        assert_eq!(jar.header_for(&Url::parse("http://elsewhere.test/").unwrap()), None);
        assert_eq!(jar.header_for(&Url::parse("http://www.example.org/").unwrap()).as_deref(), Some("wide=2"));

        // Session cookies (no expiry) are kept across a restart.
        let json = jar.to_json();
        let (again, error) = CookieJar::load(Some(&json), || {});
        assert_eq!(error, None);
        let sorted = |h: Option<String>| {
            let mut v: Vec<String> = h.unwrap_or_default().split("; ").map(str::to_owned).collect();
            v.sort();
            v
        };
        assert_eq!(sorted(again.header_for(&file)), sorted(jar.header_for(&file)));
        assert_eq!(again.unexpired(), jar.unexpired());
        let (empty, error) = CookieJar::load(Some("not json"), || {});
        assert!(error.is_some() && empty.unexpired() == 0);
    }

    /// A server that sets new cookies on every answer fills its domain's share and no
    /// more; what expires goes; deletions free room.
    #[test]
    fn a_greedy_server_cannot_grow_the_jar_without_bound() {
        let (jar, _) = CookieJar::load(None, || {});
        let url = Url::parse("https://greedy.example.org/").unwrap();
        let big = "v".repeat(3000);
        for round in 0..20 {
            let values: Vec<String> = (0..100).map(|i| format!("c{round}x{i}={big}; Path=/")).collect();
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            jar.take_from(&url, &set_cookies(&refs));
        }
        assert_eq!(jar.unexpired(), MAX_PER_DOMAIN);
        assert!(jar.to_json().len() < MAX_PER_DOMAIN * 4 * 1024, "stored size bounded");
        let huge = format!("huge={}", "x".repeat(5000));
        jar.take_from(&url, &set_cookies(&[huge.as_str()]));
        assert!(!jar.header_for(&url).unwrap().contains("huge="), "larger than 4 KiB: ignored");
        // A line of unknown attributes past what a cookie needs is refused whole: the jar
        // keeps each line, and a few thousand of a megabyte each were gigabytes.
        let padded = format!("padded=1; Path=/; X-Junk={}", "j".repeat(1 << 20));
        jar.take_from(&url, &set_cookies(&[padded.as_str()]));
        assert!(!jar.header_for(&url).unwrap().contains("padded="), "a 1 MiB line: ignored");
        // A deletion frees room for a new name.
        jar.take_from(&url, &set_cookies(&["c0x0=; Max-Age=0; Path=/"]));
        jar.take_from(&url, &set_cookies(&["fresh=1; Path=/"]));
        assert!(jar.header_for(&url).unwrap().contains("fresh=1"));
        assert_eq!(jar.unexpired(), MAX_PER_DOMAIN);
        // Full, a new name takes the place of a session's cookie, else of the one that
        // expires first: the domain's own cookies never lock it out for good.
        jar.take_from(&url, &set_cookies(&["soon=1; Path=/; Max-Age=60", "later=1; Path=/; Max-Age=600"]));
        jar.take_from(&url, &set_cookies(&["newest=1; Path=/"]));
        let has = |name: &str| jar.header_for(&url).unwrap().split("; ").any(|c| c.starts_with(name));
        assert!(has("soon=") && has("later=") && has("newest="), "the new names are in");
        assert_eq!(jar.unexpired(), MAX_PER_DOMAIN);
        assert!(!jar.to_json().contains("\"c0x0\""), "an expired cookie is not stored");
        // With room made, a cookie with an attribute over 1 KiB is still not taken.
        let long_path = format!("longpath=1; Path=/{}", "a".repeat(300_000));
        jar.take_from(&url, &set_cookies(&["c0x1=; Max-Age=0; Path=/"]));
        jar.take_from(&url, &set_cookies(&[long_path.as_str()]));
        let stored = jar.to_json();
        assert!(!stored.contains("\"longpath\"") && stored.len() < 1 << 20, "{} bytes", stored.len());
        // One kept before the bound (stored by an older daemon) is dropped when loaded.
        let mut older: serde_json::Value = serde_json::from_str(&stored).unwrap();
        let first = older.as_array().and_then(|a| a.first()).cloned().unwrap();
        let mut long = first.clone();
        long["raw_cookie"] = serde_json::Value::String(format!("old=1; Path=/{}", "b".repeat(5000)));
        long["path"] = serde_json::json!([format!("/{}", "b".repeat(5000)), true]);
        older.as_array_mut().unwrap().push(long);
        let (reloaded, error) = CookieJar::load(Some(&older.to_string()), || {});
        assert_eq!(error, None);
        assert!(!reloaded.to_json().contains(&"b".repeat(5000)), "dropped at load");
    }

    /// A jar filled by many hosts of one server makes room for another site's cookie from
    /// the fullest domain.
    #[test]
    fn one_response_sets_no_more_cookies_than_a_domain_holds() {
        let (jar, _) = CookieJar::load(None, || {});
        let url = Url::parse("https://flood.example.org/").unwrap();
        let values: Vec<String> = (0..20_000).map(|i| format!("c{i}=1; Path=/")).collect();
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        jar.take_from(&url, &set_cookies(&refs));
        assert_eq!(jar.unexpired(), MAX_PER_DOMAIN);
        let sent = jar.header_for(&url).unwrap();
        // The first lines were taken; the rest were never looked at (before, each one pushed
        // out an earlier one, the whole jar counted for every line).
        assert!(sent.contains("c0=1") && !sent.contains("c19999=1"), "{sent}");
    }

    #[test]
    fn a_full_jar_makes_room_from_the_fullest_domain() {
        let (jar, _) = CookieJar::load(None, || {});
        for host in 0..17 {
            let url = Url::parse(&format!("https://h{host}.greedy.example/")).unwrap();
            let values: Vec<String> = (0..MAX_PER_DOMAIN).map(|i| format!("c{i}=1; Path=/")).collect();
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            jar.take_from(&url, &set_cookies(&refs));
        }
        assert_eq!(jar.unexpired(), MAX_PER_JAR);
        let victim = Url::parse("https://victim.example/").unwrap();
        jar.take_from(&victim, &set_cookies(&["login=1; Path=/"]));
        assert_eq!(jar.header_for(&victim).as_deref(), Some("login=1"));
        assert_eq!(jar.unexpired(), MAX_PER_JAR);
    }

    /// A plain http answer that fills the domain never pushes its `Secure` cookie out (and
    /// then replaces it): new names from it evict only cookies that are not `Secure`.
    #[test]
    fn plain_http_cannot_evict_a_secure_cookie() {
        let (jar, _) = CookieJar::load(None, || {});
        let https = Url::parse("https://shop.example.org/").unwrap();
        let http = Url::parse("http://shop.example.org/").unwrap();
        jar.take_from(&https, &set_cookies(&["sid=good; Secure; Path=/"]));
        let filler: Vec<String> = (0..MAX_PER_DOMAIN).map(|i| format!("f{i}=1; Path=/; Max-Age=1000000")).collect();
        jar.take_from(&http, &set_cookies(&filler.iter().map(String::as_str).collect::<Vec<_>>()));
        jar.take_from(&http, &set_cookies(&["sid=attacker; Path=/"]));
        let header = jar.header_for(&https).unwrap();
        assert!(header.split("; ").any(|c| c == "sid=good"), "the Secure cookie stays");
        assert!(!header.contains("sid=attacker"));
        assert_eq!(jar.unexpired(), MAX_PER_DOMAIN);
        // A domain full of Secure cookies refuses a plain http answer's new name.
        let (jar, _) = CookieJar::load(None, || {});
        let secure: Vec<String> = (0..MAX_PER_DOMAIN).map(|i| format!("s{i}=1; Secure; Path=/")).collect();
        jar.take_from(&https, &set_cookies(&secure.iter().map(String::as_str).collect::<Vec<_>>()));
        jar.take_from(&http, &set_cookies(&["intruder=1; Path=/"]));
        assert!(!jar.header_for(&https).unwrap().contains("intruder="), "refused, nothing evicted");
        assert_eq!(jar.unexpired(), MAX_PER_DOMAIN);
    }

    /// A plain http answer neither sets nor replaces a `Secure` cookie, nor shadows one
    /// (same name, on a path or domain it would be sent with); the name prefixes hold.
    #[test]
    fn secure_cookies_are_left_alone_by_plain_http() {
        let (jar, _) = CookieJar::load(None, || {});
        let https = Url::parse("https://shop.example.org/").unwrap();
        let http = Url::parse("http://shop.example.org/").unwrap();
        jar.take_from(&https, &set_cookies(&["sid=good; Secure; Path=/"]));
        jar.take_from(&http, &set_cookies(&["sid=attacker; Path=/", "other=1; Secure; Path=/"]));
        assert_eq!(jar.header_for(&https).as_deref(), Some("sid=good"));
        jar.take_from(&http, &set_cookies(&["sid=evil; Path=/data", "sid=evil; Domain=example.org"]));
        let data = Url::parse("https://shop.example.org/data/x").unwrap();
        assert_eq!(jar.header_for(&data).as_deref(), Some("sid=good"), "not shadowed");
        jar.take_from(&http, &set_cookies(&["plain=1; Path=/plain"]));
        let plain = Url::parse("http://shop.example.org/plain/a").unwrap();
        assert_eq!(jar.header_for(&plain).as_deref(), Some("plain=1"), "other names are set");
        jar.take_from(
            &https,
            &set_cookies(&[
                "__Host-a=1; Secure; Path=/",
                "__Host-b=1; Secure; Path=/x",
                "__Host-c=1; Secure; Path=/; Domain=example.org",
                "__Secure-d=1; Secure",
                "__Secure-e=1",
            ]),
        );
        jar.take_from(&http, &set_cookies(&["__Secure-f=1; Secure", "__Host-g=1; Path=/"]));
        let header = jar.header_for(&https).unwrap();
        let mut names: Vec<&str> = header.split("; ").filter_map(|c| c.split('=').next()).collect();
        names.sort();
        assert_eq!(names, ["__Host-a", "__Secure-d", "sid"]);
    }
}
