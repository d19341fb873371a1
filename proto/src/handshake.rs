//! The handshake.
//!
//! Both sides open with a fixed 8-byte [`Preamble`] (`"DLSD"`, protocol version, status)
//! whose layout never changes, so peers of different versions can always tell each other
//! apart and report [`ProtoError::VersionMismatch`] instead of a garbled decode. After the
//! client's preamble comes a [`ClientHello`] frame; after the daemon's preamble with
//! [`HandshakeStatus::Ok`] comes a [`Welcome`] frame.

use serde::{Deserialize, Serialize};

use crate::{MAGIC, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ProtoError};

pub const PREAMBLE_LEN: usize = 8;

/// Why the daemon accepted or refused a connection. Sent in the daemon's preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeStatus {
    Ok,
    /// The daemon speaks another protocol version (given in the preamble); it closes next.
    VersionMismatch,
    /// The daemon is at its connection limit; try again later.
    TooManyConnections,
    /// The peer's uid is not the daemon's.
    PermissionDenied,
    /// The hello frame was malformed or the handshake timed out.
    BadHello,
    /// A status this build does not know (from a newer peer).
    Unknown(u16),
}

impl HandshakeStatus {
    pub fn to_u16(self) -> u16 {
        match self {
            HandshakeStatus::Ok => 0,
            HandshakeStatus::VersionMismatch => 1,
            HandshakeStatus::TooManyConnections => 2,
            HandshakeStatus::PermissionDenied => 3,
            HandshakeStatus::BadHello => 4,
            HandshakeStatus::Unknown(n) => n,
        }
    }

    pub fn from_u16(n: u16) -> HandshakeStatus {
        match n {
            0 => HandshakeStatus::Ok,
            1 => HandshakeStatus::VersionMismatch,
            2 => HandshakeStatus::TooManyConnections,
            3 => HandshakeStatus::PermissionDenied,
            4 => HandshakeStatus::BadHello,
            n => HandshakeStatus::Unknown(n),
        }
    }
}

/// The fixed 8-byte opening of each side: `| "DLSD" | version: u16 BE | status: u16 BE |`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    pub version: u16,
    pub status: HandshakeStatus,
}

impl Preamble {
    /// The preamble this build sends with the given status.
    pub fn ours(status: HandshakeStatus) -> Preamble {
        Preamble { version: PROTOCOL_VERSION, status }
    }

    pub fn to_bytes(self) -> [u8; PREAMBLE_LEN] {
        let mut out = [0u8; PREAMBLE_LEN];
        let (magic, rest) = out.split_at_mut(4);
        magic.copy_from_slice(&MAGIC);
        let (version, status) = rest.split_at_mut(2);
        version.copy_from_slice(&self.version.to_be_bytes());
        status.copy_from_slice(&self.status.to_u16().to_be_bytes());
        out
    }

    /// Parses a preamble; only the magic is checked here, the version is the caller's call.
    pub fn parse(bytes: [u8; PREAMBLE_LEN]) -> Result<Preamble, ProtoError> {
        let [m0, m1, m2, m3, v0, v1, s0, s1] = bytes;
        if [m0, m1, m2, m3] != MAGIC {
            return Err(ProtoError::BadMagic);
        }
        Ok(Preamble {
            version: u16::from_be_bytes([v0, v1]),
            status: HandshakeStatus::from_u16(u16::from_be_bytes([s0, s1])),
        })
    }

    /// Errors with [`ProtoError::VersionMismatch`] unless the peer speaks our version
    /// (what a client checks in the daemon's answer: the daemon answers in the client's
    /// own version when it supports it).
    pub fn check_version(self) -> Result<(), ProtoError> {
        if self.version != PROTOCOL_VERSION {
            return Err(ProtoError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: self.version });
        }
        Ok(())
    }

    /// The version a daemon speaks with this client: the client's own, if this build
    /// supports it ([`MIN_PROTOCOL_VERSION`]..=[`PROTOCOL_VERSION`]).
    pub fn negotiate(self) -> Result<u16, ProtoError> {
        if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&self.version) {
            Ok(self.version)
        } else {
            Err(ProtoError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: self.version })
        }
    }
}

/// Who is connecting. Sent by the client right after its preamble.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    /// A short name for logs and `dlsessionctl status`, e.g. `dlsessionctl` or the app's name.
    pub client_name: String,
    /// The client library's version string.
    pub client_version: String,
    /// The app this process speaks for: the daemon sends it `wake` messages for sessions
    /// registered with the same `app_id`.
    pub app_id: Option<String>,
    /// The client's file-creation mask: files the daemon hands over (at a task's
    /// destination) get mode `0o666 & !umask`, as if the app had created them. `None`:
    /// 0o644. (Protocol 2.)
    pub umask: Option<u32>,
}

impl ClientHello {
    /// The mode of the files the daemon hands this client.
    pub fn file_mode(&self) -> u32 {
        0o666 & !self.umask.unwrap_or(0o022) & 0o777
    }
}

/// The daemon's answer to a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub daemon_version: String,
    pub pid: u32,
    /// Identifies this connection in the daemon's logs.
    pub connection_id: u64,
}
