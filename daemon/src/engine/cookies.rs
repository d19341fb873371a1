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

use cookie_store::{CookieStore, RawCookie};
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
        let (store, error) = match stored {
            None => (CookieStore::new(), None),
            Some(json) => match cookie_store::serde::json::load_all(json.as_bytes()) {
                Ok(store) => (store, None),
                Err(e) => (CookieStore::new(), Some(e.to_string())),
            },
        };
        let jar = CookieJar { store: Mutex::new(store), dirty: AtomicBool::new(false), on_change: Box::new(on_change) };
        (jar, error)
    }

    /// The value of the `Cookie` header for a request to `url`, if any cookie matches.
    pub fn header_for(&self, url: &Url) -> Option<String> {
        let store = self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let pairs: Vec<String> = store.get_request_values(url).map(|(n, v)| format!("{n}={v}")).collect();
        (!pairs.is_empty()).then(|| pairs.join("; "))
    }

    /// Takes the `Set-Cookie` headers of a response from `url`.
    pub fn take_from(&self, url: &Url, headers: &HeaderMap) {
        let cookies: Vec<RawCookie<'static>> = headers
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| RawCookie::parse(v.to_owned()).ok())
            .filter(|c| c.domain().is_none_or(|d| d.trim_start_matches('.').contains('.')))
            .collect();
        if cookies.is_empty() {
            return;
        }
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .store_response_cookies(cookies.into_iter(), url);
        if !self.dirty.swap(true, Ordering::AcqRel) {
            (self.on_change)();
        }
    }

    /// Everything in the jar (session cookies too: the session here is the dlsession's,
    /// which outlives a daemon restart), as JSON; marks it stored.
    pub fn to_json(&self) -> String {
        self.dirty.store(false, Ordering::Release);
        let store = self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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
}
