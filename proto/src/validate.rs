//! Validation rules both sides apply to values they exchange.

use crate::{ErrorCode, ErrorInfo};

/// Longest session identifier, in bytes.
pub const MAX_IDENTIFIER_LEN: usize = 255;

/// The lowest bandwidth limit, in bytes per second (below it a download would crawl
/// without making sense of a limit at all).
pub const MIN_BANDWIDTH_LIMIT: u64 = 1024;

/// A `tchar` of RFC 9110: what a token (a header's name, an auth scheme or parameter name)
/// is made of.
pub fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// Headers the daemon manages itself or that would let a client smuggle framing.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "range",
    "if-range",
];

/// Longest header value a task may carry, in bytes.
pub const MAX_HEADER_VALUE: usize = 8192;

/// A request header a task may carry: a token for a name, none the daemon manages, a
/// value of at most `MAX_HEADER_VALUE` bytes without control characters but tab. The
/// daemon checks every task; a command line checks its own before contacting it.
pub fn header(name: &str, value: &str) -> Result<(), ErrorInfo> {
    let refuse = |m: String| Err(ErrorInfo::new(ErrorCode::InvalidRequest, m));
    if name.is_empty() || name.len() > 256 || !name.chars().all(is_token_char) {
        return refuse(format!("invalid header name {name:?}"));
    }
    if RESERVED_HEADERS.iter().any(|r| name.eq_ignore_ascii_case(r)) {
        return refuse(format!("header {name:?} is managed by dlsessiond and cannot be set"));
    }
    if value.len() > MAX_HEADER_VALUE {
        return refuse(format!("header {name:?} value exceeds {MAX_HEADER_VALUE} bytes"));
    }
    if let Some(c) = value.chars().find(|&c| c.is_control() && c != '\t') {
        // The value itself is never echoed: it may be a credential.
        return refuse(format!(
            "header {name:?} value contains the control character {c:?} (CR, LF and NUL are refused)"
        ));
    }
    Ok(())
}

/// A header that frames an upload's body (`Content-Length`, `Transfer-Encoding`, any
/// `Upload-*` of the resumable uploads draft): the daemon sets it; an upload may not.
pub fn is_upload_framing_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "content-length" || name == "transfer-encoding" || name.starts_with("upload-")
}

/// No two of a batch's destinations name the same file, however each is spelled (`//`,
/// `/./`): the second could never be moved into place. The daemon checks each request;
/// the client library checks a batch it splits into several requests as a whole.
pub fn distinct_destinations<'a>(destinations: impl IntoIterator<Item = &'a str>) -> Result<(), ErrorInfo> {
    let mut seen = std::collections::HashSet::new();
    for d in destinations {
        let key: std::path::PathBuf = std::path::Path::new(d).components().collect();
        if !seen.insert(key) {
            return Err(ErrorInfo::new(
                ErrorCode::InvalidRequest,
                format!("destination {d:?} is given to more than one task of the batch"),
            ));
        }
    }
    Ok(())
}

/// A bandwidth limit as given: at least [`MIN_BANDWIDTH_LIMIT`] (`None` lifts it).
pub fn bandwidth_limit(rate: Option<u64>) -> Result<(), ErrorInfo> {
    match rate {
        Some(r) if r < MIN_BANDWIDTH_LIMIT => Err(ErrorInfo::new(
            ErrorCode::InvalidRequest,
            format!("a bandwidth limit must be at least {MIN_BANDWIDTH_LIMIT} bytes per second, got {r}"),
        )),
        _ => Ok(()),
    }
}

/// Checks a session identifier: 1–255 bytes of UTF-8 without control characters.
pub fn identifier(id: &str) -> Result<(), ErrorInfo> {
    if id.is_empty() {
        return Err(ErrorInfo::new(ErrorCode::InvalidIdentifier, "session identifier is empty"));
    }
    if id.len() > MAX_IDENTIFIER_LEN {
        return Err(ErrorInfo::new(
            ErrorCode::InvalidIdentifier,
            format!("session identifier is {} bytes long; the limit is {MAX_IDENTIFIER_LEN}", id.len()),
        ));
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Err(ErrorInfo::new(
            ErrorCode::InvalidIdentifier,
            format!("session identifier contains the control character {:?}", c),
        ));
    }
    Ok(())
}

/// Parses a SHA-256 digest written as 64 hexadecimal digits.
pub fn parse_sha256_hex(hex: &str) -> Result<[u8; 32], ErrorInfo> {
    let bad = || {
        ErrorInfo::new(ErrorCode::InvalidRequest, format!("expected a SHA-256 digest as 64 hex digits, got {hex:?}"))
    };
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let [hi, lo] = pair else { return Err(bad()) };
        let digit = |b: u8| (b as char).to_digit(16).ok_or_else(bad);
        *slot = u8::try_from(digit(*hi)? * 16 + digit(*lo)?).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Formats bytes as lowercase hexadecimal.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(identifier("org.example.photos.background").is_ok());
        assert!(identifier("ünïcødé session").is_ok());
        assert_eq!(identifier("").unwrap_err().code, ErrorCode::InvalidIdentifier);
        assert_eq!(identifier("a\nb").unwrap_err().code, ErrorCode::InvalidIdentifier);
        assert_eq!(identifier("a\u{7f}").unwrap_err().code, ErrorCode::InvalidIdentifier);
        assert!(identifier(&"x".repeat(255)).is_ok());
        assert_eq!(identifier(&"x".repeat(256)).unwrap_err().code, ErrorCode::InvalidIdentifier);
    }

    #[test]
    fn sha256_hex_round_trip() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let bytes = parse_sha256_hex(hex).unwrap();
        assert_eq!(to_hex(&bytes), hex);
        assert_eq!(parse_sha256_hex(&hex.to_uppercase()).unwrap(), bytes);
        assert!(parse_sha256_hex("abc").is_err());
        assert!(parse_sha256_hex(&"g".repeat(64)).is_err());
        assert!(parse_sha256_hex(&"é".repeat(32)).is_err());
    }
}
