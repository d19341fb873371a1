//! `dls_config`: a session's configuration ([`SessionConfiguration`]) built from C.

use std::ffi::{c_char, c_int};

use dlsession::SessionConfiguration;

use crate::args;
use crate::error::{Failure, call, call_new, dls_code, dls_error, guard};

/// How to attach to a background session: its identifier, the daemon's socket, the app to
/// wake and the command to relaunch it with. Create with `dls_config_new`, free with
/// `dls_config_free` (attaching copies it: it may be freed right after).
#[derive(Debug)]
pub struct dls_config {
    pub(crate) inner: SessionConfiguration,
    /// The app said it answers challenges (`dls_config_set_answers_challenges`, nonzero):
    /// only then does its callback see them (an older app would leave its tasks waiting).
    pub(crate) hears_challenges: bool,
}

/// A configuration for the background session `identifier` (reverse-DNS recommended, e.g.
/// "org.example.photos.background"; 1 to 255 bytes of UTF-8 without control characters).
/// NULL on failure (`*err` says why: `DLS_INVALID_ARGUMENT`, `DLS_INVALID_IDENTIFIER`).
///
/// # Safety
///
/// `identifier` is NULL or a NUL-terminated string; `err` is NULL or points to a
/// `dls_error*` to set on failure.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_config_new(identifier: *const c_char, err: *mut *mut dls_error) -> *mut dls_config {
    call_new(err, || {
        // SAFETY: the caller's contract above.
        let identifier = unsafe { args::string(identifier, "identifier") }?;
        dlsession::proto::validate::identifier(identifier)
            .map_err(|e| Failure { code: dls_code::from_error_code(e.code), message: e.to_string() })?;
        Ok(Box::new(dls_config { inner: SessionConfiguration::background(identifier), hears_challenges: false }))
    })
}

/// Connect to the daemon's socket at `path` instead of the default (`DLSESSION_SOCKET`,
/// else `DLSESSIOND_SOCKET`, else `$XDG_RUNTIME_DIR/dlsessiond/dlsessiond.sock`). A
/// relative `path` is taken from the current directory at this call.
///
/// # Safety
///
/// `config` is NULL or a live configuration not used by another thread during the call;
/// `path` is NULL or a NUL-terminated string; `err` as for `dls_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_config_set_socket(
    config: *mut dls_config,
    path: *const c_char,
    err: *mut *mut dls_error,
) -> dls_code {
    call(err, || {
        // SAFETY: the caller's contract above.
        let (config, path) = unsafe { (args::object_mut(config, "config")?, args::string(path, "path")?) };
        config.inner = config.inner.clone().socket(path);
        Ok(())
    })
}

/// The app the daemon wakes when the session has finished events (its `app_id`); NULL
/// clears a stored one.
///
/// # Safety
///
/// As `dls_config_set_socket`, with `app_id` for `path`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_config_set_app_id(
    config: *mut dls_config,
    app_id: *const c_char,
    err: *mut *mut dls_error,
) -> dls_code {
    call(err, || {
        // SAFETY: the caller's contract above.
        let (config, app_id) =
            unsafe { (args::object_mut(config, "config")?, args::optional_string(app_id, "app_id")?) };
        let current = config.inner.clone();
        config.inner = match app_id {
            Some(app_id) => current.app_id(app_id),
            None => current.no_app_id(),
        };
        Ok(())
    })
}

/// Relaunch the app with this command (`argc` strings, run directly without a shell, in
/// the user's home directory) when the session has finished events and the app is not
/// running. The program (`argv[0]`) is an absolute path or a bare name looked up in `PATH`:
/// an empty or relative one (`./app`) is refused here with `DLS_INVALID_ARGUMENT`. `argc` 0
/// means never relaunch (clears a stored command). The strings are copied.
///
/// # Safety
///
/// `config` as for `dls_config_set_socket`; `argv` is NULL (only with `argc` 0) or points
/// to `argc` pointers, each NULL or a NUL-terminated string; `err` as for `dls_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_config_set_launch_command(
    config: *mut dls_config,
    argv: *const *const c_char,
    argc: usize,
    err: *mut *mut dls_error,
) -> dls_code {
    call(err, || {
        // SAFETY: the caller's contract above.
        let config = unsafe { args::object_mut(config, "config") }?;
        if argc == 0 {
            config.inner = config.inner.clone().no_launch();
            return Ok(());
        }
        if argv.is_null() {
            return Err(Failure::invalid(format!("argv is NULL but argc is {argc}")));
        }
        // SAFETY: not NULL, and the caller promises `argc` readable pointers there.
        let pointers = unsafe { std::slice::from_raw_parts(argv, argc) };
        let mut command = Vec::with_capacity(argc);
        for (i, arg) in pointers.iter().enumerate() {
            // SAFETY: each pointer is NULL or a NUL-terminated string (the contract).
            command.push(unsafe { args::string(*arg, &format!("argv[{i}]")) }?.to_owned());
        }
        // The daemon's rule, said before anything is sent (it would refuse the attach).
        let program = command.first().map_or("", String::as_str);
        if program.is_empty() || (program.contains('/') && !program.starts_with('/')) {
            return Err(Failure::invalid(format!(
                "argv[0] {program:?} is empty or a relative path: give an absolute one (or a bare name, looked up in PATH)"
            )));
        }
        config.inner = config.inner.clone().launch_command(command);
        Ok(())
    })
}

/// Whether the session asks its app for credentials when a server (or proxy) answers 401
/// (407) with a challenge: nonzero, the task waits and the callback gets
/// `DLS_EVENT_CHALLENGE`, answered with `dls_task_answer_challenge`; 0 turns asking off
/// (tasks waiting for an answer then fail with the status, and held credentials are
/// forgotten). Not called: the session keeps its stored setting (new sessions do not ask),
/// and this app's callback never sees a challenge: the library answers `DLS_ANSWER_FAIL`
/// for it.
///
/// # Safety
///
/// `config` as for `dls_config_set_socket`; `err` as for `dls_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_config_set_answers_challenges(
    config: *mut dls_config,
    answers: c_int,
    err: *mut *mut dls_error,
) -> dls_code {
    call(err, || {
        // SAFETY: the caller's contract above.
        let config = unsafe { args::object_mut(config, "config") }?;
        config.inner = config.inner.clone().answers_challenges(answers != 0);
        config.hears_challenges = answers != 0;
        Ok(())
    })
}

/// The client certificate (PEM: the certificate, then any intermediates) and private key
/// files the session's tasks present to servers that ask (mutual TLS); relative paths are
/// taken from the current directory. The daemon reads and checks them at attach (a bad
/// pair fails `dls_session_attach`). Both NULL: the session presents none (a stored one is
/// dropped). Not called: the session keeps what it has.
///
/// # Safety
///
/// `config` as for `dls_config_set_socket`; `cert_file` and `key_file` are NULL or
/// NUL-terminated strings; `err` as for `dls_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_config_set_client_certificate(
    config: *mut dls_config,
    cert_file: *const c_char,
    key_file: *const c_char,
    err: *mut *mut dls_error,
) -> dls_code {
    call(err, || {
        // SAFETY: the caller's contract above.
        let (config, cert, key) = unsafe {
            (
                args::object_mut(config, "config")?,
                args::optional_string(cert_file, "cert_file")?,
                args::optional_string(key_file, "key_file")?,
            )
        };
        config.inner = match (cert, key) {
            (Some(cert), Some(key)) => config.inner.clone().client_certificate(cert, key),
            (None, None) => config.inner.clone().no_client_certificate(),
            _ => return Err(Failure::invalid("cert_file and key_file go together: both or neither")),
        };
        Ok(())
    })
}

/// Frees a configuration (NULL is fine).
///
/// # Safety
///
/// `config` is NULL or a configuration from `dls_config_new`, freed only once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dls_config_free(config: *mut dls_config) {
    if config.is_null() {
        return;
    }
    guard((), || {
        // SAFETY: a pointer from `Box::into_raw` in `dls_config_new`, given back once.
        drop(unsafe { Box::from_raw(config) });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{dls_error_code, dls_error_free, dls_error_message};
    use dlsession::LaunchSpec;
    use std::ffi::{CStr, c_int};
    use std::ptr;

    /// The code and message of `err`, which is then freed.
    fn take(err: *mut dls_error) -> (c_int, String) {
        assert!(!err.is_null(), "an error was reported");
        // SAFETY: a live error from this library, freed once here.
        unsafe {
            let out = (dls_error_code(err), CStr::from_ptr(dls_error_message(err)).to_string_lossy().into_owned());
            dls_error_free(err);
            out
        }
    }

    #[test]
    fn bad_input_is_invalid_argument() {
        let mut err = ptr::null_mut();
        // SAFETY: NULL and NUL-terminated strings, as the contract allows.
        unsafe {
            assert!(dls_config_new(ptr::null(), &mut err).is_null());
            assert_eq!(take(err), (dls_code::DLS_INVALID_ARGUMENT as c_int, "identifier is NULL".into()));
            err = ptr::null_mut();
            assert!(dls_config_new(c"bad\xff".as_ptr(), &mut err).is_null());
            assert_eq!(take(err), (dls_code::DLS_INVALID_ARGUMENT as c_int, "identifier is not valid UTF-8".into()));
            err = ptr::null_mut();
            assert!(dls_config_new(c"".as_ptr(), &mut err).is_null());
            assert_eq!(take(err).0, dls_code::DLS_INVALID_IDENTIFIER as c_int);
            // No `err`: still no crash, just NULL.
            assert!(dls_config_new(ptr::null(), ptr::null_mut()).is_null());

            let code = dls_config_set_socket(ptr::null_mut(), c"/tmp/x".as_ptr(), ptr::null_mut());
            assert_eq!(code, dls_code::DLS_INVALID_ARGUMENT);
            let config = dls_config_new(c"org.example.test".as_ptr(), ptr::null_mut());
            assert!(!config.is_null());
            assert_eq!(dls_config_set_socket(config, ptr::null(), ptr::null_mut()), dls_code::DLS_INVALID_ARGUMENT);
            err = ptr::null_mut();
            assert_eq!(dls_config_set_launch_command(config, ptr::null(), 2, &mut err), dls_code::DLS_INVALID_ARGUMENT);
            assert_eq!(take(err).1, "argv is NULL but argc is 2");
            let argv = [c"/bin/app".as_ptr(), ptr::null()];
            err = ptr::null_mut();
            assert_eq!(
                dls_config_set_launch_command(config, argv.as_ptr(), 2, &mut err),
                dls_code::DLS_INVALID_ARGUMENT
            );
            assert_eq!(take(err).1, "argv[1] is NULL");
            for program in [c"./app", c""] {
                let argv = [program.as_ptr()];
                err = ptr::null_mut();
                let code = dls_config_set_launch_command(config, argv.as_ptr(), 1, &mut err);
                assert_eq!(code, dls_code::DLS_INVALID_ARGUMENT);
                assert!(take(err).1.contains("relative path"));
            }
            dls_config_free(config);
            dls_config_free(ptr::null_mut());
        }
    }

    #[test]
    fn setters_reach_the_configuration() {
        // SAFETY: live configuration, NUL-terminated strings.
        unsafe {
            let config = dls_config_new(c"org.example.test".as_ptr(), ptr::null_mut());
            let argv = [c"/bin/app".as_ptr(), c"--background".as_ptr()];
            assert_eq!(dls_config_set_launch_command(config, argv.as_ptr(), 2, ptr::null_mut()), dls_code::DLS_OK);
            assert_eq!(dls_config_set_app_id(config, c"org.example".as_ptr(), ptr::null_mut()), dls_code::DLS_OK);
            assert_eq!(dls_config_set_socket(config, c"/run/x.sock".as_ptr(), ptr::null_mut()), dls_code::DLS_OK);
            let inner = &(*config).inner;
            assert_eq!(inner.identifier(), "org.example.test");
            assert_eq!(inner.config().app_id.as_deref(), Some("org.example"));
            let argv = vec!["/bin/app".to_owned(), "--background".to_owned()];
            assert_eq!(inner.config().launch, Some(LaunchSpec::Command { argv }));
            assert_eq!(dls_config_set_launch_command(config, ptr::null(), 0, ptr::null_mut()), dls_code::DLS_OK);
            assert_eq!(dls_config_set_app_id(config, ptr::null(), ptr::null_mut()), dls_code::DLS_OK);
            assert_eq!(
                ((*config).inner.config().launch.as_ref(), (*config).inner.config().app_id.as_ref()),
                (None, None)
            );
            dls_config_free(config);
        }
    }
}
