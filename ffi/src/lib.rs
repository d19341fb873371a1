//! The C ABI of the `dlsession` client library: `libdlsession_ffi.so` / `.a` (installed as `libdlsession`) and
//! `include/dlsession.h` (generated from this crate by cbindgen; `tests/header.rs` keeps
//! it in step).
//!
//! Built on [`dlsession::blocking::Session`], which owns its own small runtime: a
//! C program needs no event loop, every call blocks until the daemon has answered, and
//! events arrive on the session's own thread through one callback.
//!
//! Rules every `extern "C"` function here keeps:
//! - no panic unwinds into C: each body runs under `catch_unwind` and a panic becomes
//!   `DLS_INTERNAL`;
//! - nothing from C is trusted: a NULL pointer or a string that is not UTF-8 is
//!   `DLS_INVALID_ARGUMENT` with a message, never a crash;
//! - a failure sets `*err` (when `err` is not NULL) to an error the caller frees.

// This crate is an FFI boundary: it must dereference the raw pointers C hands it and export
// unmangled symbols, which the workspace's `unsafe_code = "deny"` forbids elsewhere. Every
// `unsafe` block says why it is sound (`// SAFETY:`).
#![allow(unsafe_code)]
// The exported types keep their C names (`dls_session`, `DLS_OK`) so the header and the
// Rust source read the same.
#![allow(non_camel_case_types)]

mod args;
mod config;
mod error;
mod event;
mod session;

pub use config::{
    dls_config, dls_config_free, dls_config_new, dls_config_set_answers_challenges, dls_config_set_app_id,
    dls_config_set_client_certificate, dls_config_set_launch_command, dls_config_set_socket,
};
pub use error::{dls_code, dls_code_name, dls_error, dls_error_code, dls_error_free, dls_error_message};
pub use event::{dls_event, dls_event_fn, dls_event_keep, dls_event_kind};
pub use session::{
    DLS_ANSWER_BASIC, DLS_ANSWER_BEARER, DLS_ANSWER_CANCEL, DLS_ANSWER_FAIL, DLS_ANSWER_HEADER, DLS_ANSWER_KEEP,
    DLS_ANSWER_PROTECTION_SPACE, DLS_DOWNLOAD_OVERWRITE, DLS_UPLOAD_IDEMPOTENT, dls_download, dls_session,
    dls_session_attach, dls_session_free, dls_session_wait_idle, dls_task_answer_challenge, dls_task_cancel,
    dls_task_resume, dls_task_suspend, dls_upload, dls_version,
};
