//! Authentication challenges on the wire (docs/behaviour.md, "Authentication"): reading a
//! 401's `WWW-Authenticate` (a 407's `Proxy-Authenticate`) into a [`Challenge`], and
//! putting the credentials the app gave on the requests they belong to.

use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue, PROXY_AUTHENTICATE, WWW_AUTHENTICATE};
use url::Url;

use super::http::{Failure, ReqBody};
use super::proxy::Proxies;
use dlsession_proto::validate::is_token_char as is_tchar;
use dlsession_proto::{Challenge, ErrorCode};

/// A credential header for the requests to one origin (a proxy's, for `proxy`). `Debug`
/// never shows the value.
#[derive(Clone)]
pub struct AuthHeader {
    pub origin: String,
    pub proxy: bool,
    pub name: HeaderName,
    pub value: HeaderValue,
}

impl AuthHeader {
    /// A credential header from its text; the value is marked sensitive, so that no `Debug`
    /// of what holds it (a connection pool's key, a request) shows it, and HTTP/2 never
    /// indexes it.
    pub fn new(origin: String, proxy: bool, name: &str, value: &str) -> Option<AuthHeader> {
        let mut value: HeaderValue = value.parse().ok()?;
        value.set_sensitive(true);
        Some(AuthHeader { origin, proxy, name: name.parse().ok()?, value })
    }
}

impl std::fmt::Debug for AuthHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} for {}{}", self.name, self.origin, if self.proxy { " (proxy)" } else { "" })
    }
}

/// `scheme://host:port`, the port always written.
pub fn origin_of(url: &Url) -> String {
    format!("{}://{}:{}", url.scheme(), url.host_str().unwrap_or(""), url.port_or_known_default().unwrap_or(0))
}

/// The challenge a 401 or 407 response carries (none without its header): the first
/// scheme and its `realm`. A 407 response comes from the proxy a plain-`http` request
/// goes through.
pub fn challenge(status: u16, headers: &HeaderMap, url: &Url, proxies: &Proxies) -> Option<Challenge> {
    match status {
        401 => read(headers, WWW_AUTHENTICATE, origin_of(url), false),
        407 => read(headers, PROXY_AUTHENTICATE, proxies.http_proxy_origin(url)?, true),
        _ => None,
    }
}

/// The challenge of a 407 a proxy answered a `CONNECT` for `url` with.
pub fn tunnel_challenge(status: u16, headers: &HeaderMap, url: &Url, proxies: &Proxies) -> Option<Challenge> {
    if status != 407 {
        return None;
    }
    read(headers, PROXY_AUTHENTICATE, proxies.proxy_origin(url)?, true)
}

fn read(headers: &HeaderMap, header: HeaderName, origin: String, proxy: bool) -> Option<Challenge> {
    // Several header lines are one list; bytes beyond ASCII (a realm in another language)
    // are read leniently, not taken for no challenge at all.
    let value: Vec<String> =
        headers.get_all(header).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
    let value = value.join(", ");
    let offered = challenges(&value);
    // The first the app can answer with a credential of its own kind, else the first.
    let (scheme, params) = offered
        .iter()
        .find(|(scheme, _)| ANSWERABLE.iter().any(|a| scheme.eq_ignore_ascii_case(a)))
        .or_else(|| offered.first())?;
    Some(Challenge { scheme: (*scheme).to_owned(), realm: realm(params), origin, proxy, round: 1 })
}

/// Schemes a credential answers by name (`Basic`, `Bearer`); any other gets a `Header`.
const ANSWERABLE: [&str; 2] = ["Basic", "Bearer"];

/// The longest scheme name kept; a longer one is not a challenge (the scheme travels in an
/// event and a task's wait reason).
const MAX_SCHEME: usize = 64;

/// Each challenge of a header's value, its scheme and its parameters (`Negotiate, Basic
/// realm="x", charset=UTF-8`: two). Schemes that are not tokens, or too long, are skipped.
fn challenges(value: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut rest = value.trim_start_matches([',', ' ', '\t']);
    while !rest.is_empty() {
        let end = rest.find([' ', '\t', ',']).unwrap_or(rest.len());
        let (scheme, after) = rest.split_at(end);
        let (params, next) = match after.strip_prefix(',') {
            // `Negotiate, Basic …`: a scheme without parameters.
            Some(next) => ("", next),
            None => split_challenge(after.trim_start()),
        };
        let token = scheme.chars().all(is_tchar);
        if !scheme.is_empty() && scheme.len() <= MAX_SCHEME && token {
            out.push((scheme, params));
        }
        rest = next.trim_start_matches([',', ' ', '\t']);
    }
    out
}

/// Splits a challenge's parameters from what follows: up to an unquoted comma that starts
/// another challenge (`, Scheme param=…`), quoted commas and parameter lists kept.
fn split_challenge(params: &str) -> (&str, &str) {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in params.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                let next = params.get(i + 1..).unwrap_or("").trim_start();
                let token_end = next.find(|c: char| !is_tchar(c)).unwrap_or(next.len());
                // A token followed by a space, a comma or the end, not by `=`: a new scheme.
                let after = next.get(token_end..).unwrap_or("");
                if token_end > 0 && !after.trim_start().starts_with('=') {
                    return (params.get(..i).unwrap_or(params), params.get(i + 1..).unwrap_or(""));
                }
            }
            _ => {}
        }
    }
    (params, "")
}

/// The `realm` parameter (quoted, with `\"` escapes, or a token), cut at 256 bytes: named
/// as a parameter of its own, not found inside another's value.
fn realm(params: &str) -> Option<String> {
    let mut rest = params;
    loop {
        rest = rest.trim_start_matches([',', ' ', '\t']);
        let name_end = rest.find(|c: char| !is_tchar(c))?;
        let (name, after) = rest.split_at(name_end);
        let after = after.trim_start().strip_prefix('=')?.trim_start();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => unquote(quoted),
            None => {
                let end = after.find([',', ' ', '\t']).unwrap_or(after.len());
                (after.get(..end).unwrap_or("").to_owned(), after.get(end..).unwrap_or(""))
            }
        };
        if name.eq_ignore_ascii_case("realm") {
            let mut value = value;
            value.truncate(value.floor_char_boundary(256));
            return Some(value);
        }
        rest = next;
    }
}

/// A quoted string's value (after its opening quote) and what follows its closing quote.
fn unquote(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            }
            '"' => return (value, s.get(i + 1..).unwrap_or("")),
            c => value.push(c),
        }
    }
    (value, "")
}

/// The failure a challenge ends an attempt with: the server's status, which completes the
/// task unless the core asks the app.
pub fn failure(status: u16, status_text: &str, challenge: Challenge) -> Failure {
    let mut f = Failure::permanent(ErrorCode::HttpStatus, format!("server answered {status_text}"));
    f.error.http_status = Some(status);
    f.challenge = Some(Box::new(challenge));
    f
}

/// Puts on `req` (going to `url`) the credentials that belong to its origin, or to the
/// HTTP proxy it goes through; they replace the app's own header of the same name.
pub fn apply(req: &mut hyper::Request<ReqBody>, url: &Url, auth: &[AuthHeader], proxies: &Proxies) {
    if auth.is_empty() {
        return;
    }
    let origin = origin_of(url);
    let proxy = proxies.http_proxy_origin(url);
    for a in auth {
        let matches = if a.proxy { proxy.as_deref() == Some(a.origin.as_str()) } else { a.origin == origin };
        if matches {
            req.headers_mut().insert(a.name.clone(), a.value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credential_values_never_show() {
        let h = super::AuthHeader::new("http://proxy.test:3128".into(), true, "Proxy-Authorization", "Basic czNjcmV0")
            .unwrap();
        let pool_key = (Some("a"), vec![(h.origin.clone(), h.name.clone(), h.value.clone())]);
        assert!(!format!("{pool_key:?} {h:?}").contains("czNjcmV0"), "{pool_key:?}");
    }

    use super::*;

    #[test]
    fn challenges_are_read_from_their_header() {
        let url = Url::parse("https://files.example.org/a").unwrap_or_else(|_| unreachable!());
        let none = Proxies::new("", "", "", "");
        let mut h = HeaderMap::new();
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"Files, Inc\", charset=\"UTF-8\""));
        let c = challenge(401, &h, &url, &none).unwrap_or_else(|| unreachable!());
        assert_eq!((c.scheme.as_str(), c.realm.as_deref()), ("Basic", Some("Files, Inc")));
        assert_eq!((c.origin.as_str(), c.proxy), ("https://files.example.org:443", false));
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=api, error=\"invalid_token\""));
        assert_eq!(challenge(401, &h, &url, &none).and_then(|c| c.realm), Some("api".into()));
        // Of several, the first the app can answer by name.
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Negotiate, Basic realm=\"x\""));
        assert_eq!(
            challenge(401, &h, &url, &none).map(|c| (c.scheme, c.realm)),
            Some(("Basic".into(), Some("x".into())))
        );
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Digest nonce=\"a,b\", qop=auth, Basic realm=\"y\""));
        assert_eq!(
            challenge(401, &h, &url, &none).map(|c| (c.scheme, c.realm)),
            Some(("Basic".into(), Some("y".into())))
        );
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Digest nonce=\"a,b\", realm=\"d\", NTLM"));
        assert_eq!(
            challenge(401, &h, &url, &none).map(|c| (c.scheme, c.realm)),
            Some(("Digest".into(), Some("d".into())))
        );
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Negotiate"));
        assert_eq!(challenge(401, &h, &url, &none).map(|c| (c.scheme, c.realm)), Some(("Negotiate".into(), None)));
        assert!(challenge(403, &h, &url, &none).is_none(), "only 401 and 407");
        // Several header lines are one list.
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Negotiate"));
        h.append(WWW_AUTHENTICATE, HeaderValue::from_static("NTLM"));
        h.append(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"corp\""));
        assert_eq!(challenge(401, &h, &url, &none).and_then(|c| c.realm), Some("corp".into()));
        // A realm in another language (obs-text, not UTF-8 here) still makes a challenge.
        let latin1 =
            HeaderValue::from_bytes(b"Basic realm=\"Zugang f\xfcr Kunden\"").unwrap_or_else(|_| unreachable!());
        h.insert(WWW_AUTHENTICATE, latin1);
        assert_eq!(challenge(401, &h, &url, &none).and_then(|c| c.realm), Some("Zugang f\u{fffd}r Kunden".into()));
        // `realm=` inside another parameter's value, or as the end of another name, is not it;
        // escapes are honoured.
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error_description=\"bad realm=evil\", xrealm=no"));
        assert_eq!(challenge(401, &h, &url, &none).map(|c| (c.scheme, c.realm)), Some(("Bearer".into(), None)));
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"say \\\"hi\\\", ok\""));
        assert_eq!(challenge(401, &h, &url, &none).and_then(|c| c.realm), Some("say \"hi\", ok".into()));
        // A scheme too long to be one is no challenge.
        let long = format!("{} realm=x", "A".repeat(100_000));
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_str(&long).unwrap_or_else(|_| unreachable!()));
        assert!(challenge(401, &h, &url, &none).is_none());
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Negotiate"));
        assert!(challenge(401, &HeaderMap::new(), &url, &none).is_none(), "a 401 without a challenge");
        // A 407 names the proxy; through none, there is nothing to answer.
        h.insert(PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=proxy"));
        assert!(challenge(407, &h, &url, &none).is_none());
        let plain = Url::parse("http://files.example.org/a").unwrap_or_else(|_| unreachable!());
        let through = Proxies::new("http://proxy.lan:3128", "", "", "");
        let c = challenge(407, &h, &plain, &through).unwrap_or_else(|| unreachable!());
        assert_eq!((c.origin.as_str(), c.proxy), ("http://proxy.lan:3128", true));
        // An https request's 407 comes from its tunnel's proxy, to the `CONNECT`; a 407
        // response inside the tunnel is the server's and names no proxy.
        assert!(challenge(407, &h, &url, &through).is_none());
        let c = tunnel_challenge(407, &h, &url, &through).unwrap_or_else(|| unreachable!());
        assert_eq!((c.origin.as_str(), c.proxy, c.realm.as_deref()), ("http://proxy.lan:3128", true, Some("proxy")));
        assert!(tunnel_challenge(407, &h, &url, &none).is_none(), "no proxy, no tunnel");
        assert!(tunnel_challenge(403, &h, &url, &through).is_none());
        let socks = Proxies::new("socks5h://127.0.0.1:1080", "", "", "");
        assert!(tunnel_challenge(407, &h, &url, &socks).is_none(), "SOCKS asks no HTTP question");
    }
}
