//! Reading arguments from C: every pointer may be NULL and every string may not be UTF-8,
//! and both are the caller's mistake to report, never a crash.

use std::ffi::{CStr, c_char};

use crate::error::Failure;

/// The string at `p`, which must not be NULL.
///
/// # Safety
///
/// `p` is NULL or points to a NUL-terminated string that stays unchanged for `'a`.
pub(crate) unsafe fn string<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    // SAFETY: passed on from the caller.
    unsafe { optional_string(p, what) }?.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

/// The string at `p`, or `None` if `p` is NULL.
///
/// # Safety
///
/// As [`string`].
pub(crate) unsafe fn optional_string<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: not NULL, and the caller promises a NUL-terminated string living for `'a`.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(Some).map_err(|_| Failure::invalid(format!("{what} is not valid UTF-8")))
}

/// The object at `p`, which must not be NULL.
///
/// # Safety
///
/// `p` is NULL or points to a live `T` that nothing mutates for `'a`.
pub(crate) unsafe fn object<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: passed on from the caller.
    unsafe { p.as_ref() }.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

/// The object at `p` for changing, which must not be NULL.
///
/// # Safety
///
/// `p` is NULL or points to a live `T` that nothing else uses for `'a`.
pub(crate) unsafe fn object_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: passed on from the caller.
    unsafe { p.as_mut() }.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

/// `path` made absolute: the daemon runs elsewhere, where a relative path means nothing.
/// Leading `..` of a relative path climb from the current directory (which the kernel
/// reports with its symlinks resolved, so this is where the kernel would go); a `..` after
/// a name stays (it may follow a symlink) and the daemon refuses it. The rest is kept as
/// written (a trailing `/` too, which the daemon refuses as naming no file).
pub(crate) fn absolute(path: &str, what: &str) -> Result<std::path::PathBuf, Failure> {
    let invalid = |e: std::io::Error| Failure::invalid(format!("{what} {path:?}: {e}"));
    if path.is_empty() || path.starts_with('/') {
        return std::path::absolute(path).map_err(invalid);
    }
    let mut base = std::env::current_dir().map_err(invalid)?;
    let mut rest = path;
    loop {
        if let Some(after) = rest.strip_prefix("../") {
            base.pop();
            rest = after.trim_start_matches('/');
        } else if rest == ".." {
            base.pop();
            rest = "";
        } else if let Some(after) = rest.strip_prefix("./") {
            rest = after.trim_start_matches('/');
        } else {
            break;
        }
    }
    Ok(if rest.is_empty() { base } else { base.join(rest) })
}

/// Writes `value` to `out` unless it is NULL (out-parameters are optional).
///
/// # Safety
///
/// `out` is NULL or valid for writing a `T`.
pub(crate) unsafe fn put<T>(out: *mut T, value: T) {
    if !out.is_null() {
        // SAFETY: not NULL, and the caller promises it is writable.
        unsafe { out.write(value) };
    }
}

#[cfg(test)]
mod tests {
    use super::absolute;

    #[test]
    fn relative_paths_climb_from_the_current_directory() {
        let cwd = std::env::current_dir().unwrap();
        let up = cwd.parent().unwrap().to_path_buf();
        assert_eq!(absolute("../out/f.iso", "destination").unwrap(), up.join("out/f.iso"));
        assert_eq!(absolute("./../f", "destination").unwrap(), up.join("f"));
        assert_eq!(absolute("f", "destination").unwrap(), cwd.join("f"));
        // After a name, `..` may follow a symlink: left for the daemon to refuse.
        assert_eq!(absolute("a/../f", "destination").unwrap(), cwd.join("a/../f"));
        assert_eq!(absolute("/abs/f", "destination").unwrap(), std::path::PathBuf::from("/abs/f"));
        // Kept as written: a trailing slash still names no file (the daemon says so).
        assert!(absolute("../downloads/", "destination").unwrap().to_str().unwrap().ends_with("/downloads/"));
        assert!(absolute("downloads/", "destination").unwrap().to_str().unwrap().ends_with("/downloads/"));
        assert!(absolute("", "destination").is_err(), "an empty path is a bad argument");
    }
}
