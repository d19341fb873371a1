//! Length-prefixed framing: `| len: u32 big-endian | payload: len bytes |`.

use serde::{Serialize, de::DeserializeOwned};

use crate::{MAX_FRAME, ProtoError, codec};

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Validates a frame header and returns the payload length it announces.
///
/// This is the check that runs before any buffer is allocated for the payload.
pub fn payload_len(header: [u8; HEADER_LEN]) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge { len, max: MAX_FRAME });
    }
    Ok(len)
}

/// Encodes `value` as one complete frame (header and payload).
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, ProtoError> {
    let payload = codec::encode(value)?;
    let len =
        u32::try_from(payload.len()).map_err(|_| ProtoError::FrameTooLarge { len: payload.len(), max: MAX_FRAME })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Encodes a daemon's message as one frame in the shapes of protocol `version` (the
/// version negotiated with the client it goes to; see [`crate::v1`]).
pub fn encode_server_frame(version: u16, msg: crate::ServerMessage) -> Result<Vec<u8>, ProtoError> {
    match version {
        ..=1 => encode_frame(&crate::v1::downgrade(msg)),
        2 => encode_frame(&crate::v3::downgrade(crate::v2::downgrade(crate::v6::downgrade(msg)))),
        3 => encode_frame(&crate::v3::downgrade(crate::v6::downgrade(msg))),
        4..=6 => encode_frame(&crate::v6::downgrade(msg)),
        _ => encode_frame(&msg),
    }
}

/// Splits the first complete frame off the front of `buf`.
///
/// Returns `Ok(None)` if `buf` does not yet hold a whole frame, and otherwise the
/// payload and the number of bytes the frame occupied.
pub fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, ProtoError> {
    let Some((header, rest)) = buf.split_first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = payload_len(*header)?;
    match rest.get(..len) {
        Some(payload) => Ok(Some((payload, HEADER_LEN + len))),
        None => Ok(None),
    }
}

/// Decodes every frame in `buf` as `T`; a partial frame at the end is [`ProtoError::Truncated`].
pub fn decode_frames<T: DeserializeOwned>(mut buf: &[u8]) -> Result<Vec<T>, ProtoError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Some((payload, used)) = split_frame(buf)? else {
            return Err(ProtoError::Truncated);
        };
        out.push(codec::decode(payload)?);
        buf = buf.get(used..).unwrap_or_default();
    }
    Ok(out)
}
