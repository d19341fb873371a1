#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! The one home of test helpers, used by every test crate: a scripted HTTP/HTTPS server
//! with fault injection ([`server`]), a faulty proxy ([`proxy`]), an upload server that
//! speaks the resumable uploads draft ([`upload`]), nginx ([`nginx`]), a
//! throw-away certificate authority ([`tls`]), deterministic content with hashes
//! ([`content`]), an isolated daemon ([`daemon`]), an app that records what it is told
//! ([`app`]), the CLI on pipes and terminals ([`cli`]), tmpfs mounts ([`mount`]), waiting
//! ([`wait`]), what the system says about files and processes ([`host`]), a private D-Bus
//! ([`dbus`]), network namespaces ([`netns`]), the wire protocol by hand ([`raw`]) and a
//! SOCKS5 proxy ([`socks`]).

pub mod app;
pub mod cli;
pub mod content;
pub mod daemon;
pub mod dbus;
pub mod host;
pub mod mount;
pub mod netns;
pub mod nginx;
pub mod proxy;
pub mod raw;
pub mod server;
pub mod socks;
pub mod tls;
pub mod upload;
pub mod wait;

pub use app::{Events, Recorder, Seen};
pub use content::{fill_pattern, pattern_byte, pattern_sha256, sha256_file, sha256_hex, to_hex};
pub use daemon::{TestDaemon, TestEnv, bin_path};
pub use mount::{Mount, require_root};
pub use nginx::Nginx;
pub use proxy::{ProxyFault, ProxyRecord, TestProxy};
pub use server::{DEFAULT_LAST_MODIFIED, Fault, Hits, RequestRecord, Resource, TestServer};
pub use socks::{SocksRecord, TestSocks};
pub use tls::TestCa;
pub use upload::{UploadFaults, UploadRecord, UploadServer};
pub use wait::{LONG, block, wait_for, wait_until};
