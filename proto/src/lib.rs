//! The wire contract between `dlsessiond` and its clients.
//!
//! Everything that crosses the daemon's Unix socket is defined here and nowhere else:
//! the handshake, the framing, the request/response/event types and the stable error
//! codes. This crate does no I/O of its own (the optional `tokio` feature adds async
//! frame helpers over any `AsyncRead`/`AsyncWrite`), knows nothing about SQLite or
//! HTTP, and its types only ever change by appending.
//!
//! # Connection
//!
//! ```text
//! client                                   daemon
//!   |-- preamble "DLSD" ver:u16 0:u16 ------->|  (daemon checks SO_PEERCRED first)
//!   |-- frame ClientHello ------------------->|
//!   |<------------- preamble "DLSD" ver:u16 status:u16
//!   |<------------- frame Welcome (status 0 only)
//!   |-- frame RequestFrame{id, Request} ----->|
//!   |<------------- frame ServerMessage::Response{id, result}
//!   |<------------- frame ServerMessage::Event(..)   (any time after attach/watch)
//! ```
//!
//! The preambles are fixed-size and never change, so two different protocol versions
//! always understand each other well enough to report the mismatch (see [`handshake`]).
//! A daemon serves every version from [`MIN_PROTOCOL_VERSION`] to [`PROTOCOL_VERSION`]: it
//! answers in the client's version and sends it messages in that version's shapes
//! ([`v1`] holds the frozen shapes of protocol 1 and the conversions; [`v2`] maps what
//! protocol 3 appended onto protocol 2's variants; [`v3`] holds protocol 3's shapes of what
//! protocol 4 changed; [`v6`] maps the error code protocol 7 appended; protocol 8 appended a
//! request only, so its clients' messages need no mapping).
//!
//! A frame is a big-endian `u32` payload length followed by that many bytes of bincode
//! (standard config: varint integers, little endian). The length is checked against
//! [`MAX_FRAME`] before anything is allocated, and decoding is bounded by the same limit.

pub mod codec;
pub mod error;
pub mod frame;
pub mod handshake;
#[cfg(feature = "tokio")]
pub mod io;
pub mod message;
pub mod paths;
pub mod redact;
pub mod session;
pub mod task;
pub mod v1;
pub mod v2;
pub mod v3;
pub mod v6;
pub mod validate;

pub use error::{ErrorCode, ErrorInfo, MAX_ERROR_MESSAGE, ProtoError};
pub use handshake::{ClientHello, HandshakeStatus, Preamble, Welcome};
pub use message::*;
pub use session::*;
pub use task::*;

/// The first four bytes of every preamble.
pub const MAGIC: [u8; 4] = *b"DLSD";

/// Bumped whenever a message type changes in a way an older peer cannot decode.
pub const PROTOCOL_VERSION: u16 = 8;

/// The oldest protocol version a daemon of this build still serves (see [`v1`]).
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The largest frame payload either side will accept or send, in bytes.
pub const MAX_FRAME: usize = 1 << 20;
