//! One redaction policy for everything that shows a URL or a header to a person: the
//! daemon's logs and error messages, `dlsessionctl`'s output, and `Debug` of the wire
//! types. Described in `docs/behaviour.md` ("What is never shown").
//!
//! Credentials travel in three places: the URL's userinfo (`https://user:pass@host/`), its
//! query string or fragment (signed URLs: `?X-Amz-Signature=…`, `?token=…`, `#access_token=…`),
//! and headers (`Authorization`, `Cookie`…). Each value is replaced by `REDACTED`; names and
//! everything else stay, so a person can still tell which URL it was.
//!
//! Works on strings, not parsed URLs, so what is shown is what the user gave (no
//! normalisation) and a string that does not parse is still cleaned.

/// What replaces a secret.
pub const REDACTED: &str = "REDACTED";

/// Header names whose values are credentials.
pub fn is_sensitive_header(name: &str) -> bool {
    ["authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "x-auth-token"]
        .iter()
        .any(|s| name.eq_ignore_ascii_case(s))
}

/// A URL that shows itself redacted, in `Debug` (quoted) and `Display`: for `Debug`
/// impls and log fields of types that carry a URL.
pub struct Shown<'a>(pub &'a str);

impl std::fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&url(self.0), f)
    }
}

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&url(self.0))
    }
}

/// A header's value fit to show.
pub fn header_value<'a>(name: &str, value: &'a str) -> &'a str {
    if is_sensitive_header(name) { REDACTED } else { value }
}

/// Words that mark a query parameter as a secret when its name (lower-cased, percent-decoded,
/// punctuation removed) contains one: `token` covers `access_token` and
/// `X-Amz-Security-Token`, `sig` covers `signature` and `X-Goog-Signature`, `key` covers
/// `api_key` and `AWSAccessKeyId`, `credential` covers `X-Amz-Credential`. Hiding a
/// harmless parameter now and then (`monkey=`) is the price of never showing a secret.
const SECRET_WORDS: &[&str] = &["token", "sig", "key", "password", "passwd", "secret", "auth", "credential"];

fn is_secret_param(raw_name: &str) -> bool {
    let decoded = percent_decode(&raw_name.replace('+', " "));
    let name: String =
        String::from_utf8_lossy(&decoded).chars().filter(char::is_ascii_alphanumeric).collect::<String>();
    let name = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| name.contains(w))
}

/// A URL fit to show: userinfo removed, values of secret-looking query and fragment
/// parameters replaced by `REDACTED`.
pub fn url(raw: &str) -> String {
    let (before_fragment, fragment) = match raw.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (raw, None),
    };
    let (before_query, query) = match before_fragment.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (before_fragment, None),
    };
    let mut out = String::with_capacity(raw.len());
    match before_query.split_once("://") {
        Some((scheme, rest)) => {
            out.push_str(scheme);
            out.push_str("://");
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            out.push_str(authority.rsplit_once('@').map_or(authority, |(_, host)| host));
            out.push_str(path);
        }
        None => out.push_str(before_query),
    }
    if let Some(q) = query {
        out.push('?');
        push_pairs(&mut out, q);
    }
    if let Some(f) = fragment {
        out.push('#');
        push_pairs(&mut out, f);
    }
    out
}

fn push_pairs(out: &mut String, pairs: &str) {
    for (i, pair) in pairs.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((name, _)) if is_secret_param(name) => {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
    }
}

/// Decodes `%XX` escapes; invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> Vec<u8> {
    percent_encoding::percent_decode_str(s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_and_the_rest_stays() {
        assert_eq!(url("https://alice:secret@example.org/x?y=1"), "https://example.org/x?y=1");
        assert_eq!(url("https://tok@example.org/a"), "https://example.org/a");
        assert_eq!(
            url(
                "https://b.s3.amazonaws.com/f.iso?X-Amz-Algorithm=AWS4&X-Amz-Credential=c&X-Amz-Signature=abc&X-Amz-Security-Token=t&part=2"
            ),
            "https://b.s3.amazonaws.com/f.iso?X-Amz-Algorithm=AWS4&X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED&X-Amz-Security-Token=REDACTED&part=2"
        );
        assert_eq!(
            url("http://h/p?token=t0k&sig=s&Key=k&api_key=a&AWSAccessKeyId=i&page=3"),
            "http://h/p?token=REDACTED&sig=REDACTED&Key=REDACTED&api_key=REDACTED&AWSAccessKeyId=REDACTED&page=3"
        );
        assert_eq!(url("https://h/cb#access_token=abc&state=1"), "https://h/cb#access_token=REDACTED&state=1");
        assert_eq!(url("https://h/f?acc%65ss_tok%65n=x"), "https://h/f?acc%65ss_tok%65n=REDACTED", "escaped names");
        assert_eq!(url("https://h/f?page=2&q=a%20b"), "https://h/f?page=2&q=a%20b");
        assert_eq!(url("http://h/a@b/c"), "http://h/a@b/c", "an @ in the path is not userinfo");
        assert_eq!(url("http://u:p@bad host/x"), "http://bad host/x", "unparsable, still cleaned");
        assert_eq!(url("not a url"), "not a url");
        assert_eq!(url(""), "");
    }

    #[test]
    fn credential_headers_are_hidden() {
        assert_eq!(header_value("Authorization", "Bearer x"), REDACTED);
        assert_eq!(header_value("cookie", "a=b"), REDACTED);
        assert_eq!(header_value("Accept", "*/*"), "*/*");
    }

    #[test]
    fn debug_of_wire_types_shows_no_secret() {
        let mut spec = crate::TaskSpec::get("https://u:pw@h/f?sig=SECRET1&n=1");
        spec.headers.push(crate::Header::new("Authorization", "Bearer SECRET2"));
        let shown = format!("{spec:?}");
        assert!(!shown.contains("SECRET") && !shown.contains("pw@"), "{shown}");
        assert!(shown.contains("https://h/f?sig=REDACTED&n=1"), "{shown}");
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes() {
        assert_eq!(percent_decode("a%20b%zz%4"), b"a b%zz%4");
    }
}
