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
            let existing = store.get_any(&domain, &path, cookie.name());
            // "Leave Secure cookies alone": only an https answer sets or replaces one.
            if !secure_origin && (cookie.secure() == Some(true) || existing.is_some_and(|c| c.secure() == Some(true))) {
                continue;
            }
            // Full: a new name waits until expiries or deletions make room.
            if existing.is_none() && !cookie.is_expired() && !room_for(&store, &domain) {
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

/// Whether a new cookie for `domain` fits.
fn room_for(store: &CookieStore, domain: &str) -> bool {
    let mut total = 0;
    let mut here = 0;
    for c in store.iter_any() {
        total += 1;
        if c.domain.as_cow().is_some_and(|d| d == domain) {
            here += 1;
        }
    }
    total < MAX_PER_JAR && here < MAX_PER_DOMAIN
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
        // A deletion frees room for a new name.
        jar.take_from(&url, &set_cookies(&["c0x0=; Max-Age=0; Path=/"]));
        jar.take_from(&url, &set_cookies(&["fresh=1; Path=/"]));
        assert!(jar.header_for(&url).unwrap().contains("fresh=1"));
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

    /// A plain http answer neither sets nor replaces a `Secure` cookie; the name prefixes
    /// hold.
    #[test]
    fn secure_cookies_are_left_alone_by_plain_http() {
        let (jar, _) = CookieJar::load(None, || {});
        let https = Url::parse("https://shop.example.org/").unwrap();
        let http = Url::parse("http://shop.example.org/").unwrap();
        jar.take_from(&https, &set_cookies(&["sid=good; Secure; Path=/"]));
        jar.take_from(&http, &set_cookies(&["sid=attacker; Path=/", "other=1; Secure; Path=/"]));
        assert_eq!(jar.header_for(&https).as_deref(), Some("sid=good"));
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
