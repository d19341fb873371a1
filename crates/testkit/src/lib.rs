#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Test fixtures for dlsessiond: a scripted HTTP/HTTPS server with fault injection
//! ([`server`]), a throw-away certificate authority ([`tls`]) and deterministic, never
//! materialised content with hashes ([`content`]).

pub mod content;
pub mod daemon;
pub mod mount;
pub mod nginx;
pub mod proxy;
pub mod server;
pub mod tls;

pub use content::{fill_pattern, pattern_byte, pattern_sha256, sha256_file, sha256_hex, to_hex};
pub use daemon::{TestDaemon, TestEnv, bin_path, wait_for};
pub use mount::{Mount, require_root};
pub use nginx::Nginx;
pub use proxy::{ProxyFault, ProxyRecord, TestProxy};
pub use server::{Fault, Hits, RequestRecord, Resource, TestServer};
pub use tls::TestCa;
