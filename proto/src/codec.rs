//! The only module that names bincode: one pinned, size-limited configuration.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::{Serialize, de::DeserializeOwned};

use crate::{MAX_FRAME, ProtoError};

type Config = Configuration<LittleEndian, Varint, Limit<MAX_FRAME>>;

// The limit makes a hostile length field (e.g. a String claiming 2^40 bytes) an error
// instead of an allocation that aborts the process.
const CONFIG: Config = bincode::config::standard().with_limit::<MAX_FRAME>();

/// Encodes a message body (without the frame length).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ProtoError> {
    let bytes = bincode::serde::encode_to_vec(value, CONFIG).map_err(|e| ProtoError::Encode(e.to_string()))?;
    if bytes.len() > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge { len: bytes.len(), max: MAX_FRAME });
    }
    Ok(bytes)
}

/// Decodes a whole message body; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtoError> {
    if bytes.len() > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge { len: bytes.len(), max: MAX_FRAME });
    }
    let (value, used): (T, usize) =
        bincode::serde::decode_from_slice(bytes, CONFIG).map_err(|e| ProtoError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(ProtoError::TrailingBytes { trailing: bytes.len().saturating_sub(used) });
    }
    Ok(value)
}
