//! Async frame and preamble I/O over tokio's `AsyncRead`/`AsyncWrite`.

use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{self, HEADER_LEN};
use crate::handshake::{PREAMBLE_LEN, Preamble};
use crate::{ProtoError, codec};

/// Reads one frame and decodes it.
///
/// Returns `Ok(None)` on a clean end of stream before the first header byte; an end of
/// stream anywhere else is [`ProtoError::Truncated`]. The payload length is checked
/// against [`crate::MAX_FRAME`] before the buffer grows, and the buffer grows only with
/// the bytes that arrive.
pub async fn read_frame<R, T>(reader: &mut R, buf: &mut Vec<u8>) -> Result<Option<T>, ProtoError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = reader.read(header.get_mut(filled..).unwrap_or_default()).await?;
        if n == 0 {
            return if filled == 0 { Ok(None) } else { Err(ProtoError::Truncated) };
        }
        filled += n;
    }
    let len = frame::payload_len(header)?;
    buf.clear();
    // Grown as the bytes come, not to the announced length at once: a peer that announces
    // 1 MiB and sends nothing more holds no megabyte. Room for a usual frame is made first,
    // so that it takes one read.
    buf.reserve(len.min(64 << 10));
    let got = reader.take(len as u64).read_to_end(buf).await?;
    if got < len {
        return Err(ProtoError::Truncated);
    }
    codec::decode(buf).map(Some)
}

/// Encodes `value` as a frame and writes it (without flushing).
pub async fn write_frame<W, T>(writer: &mut W, value: &T) -> Result<(), ProtoError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = frame::encode_frame(value)?;
    writer.write_all(&bytes).await?;
    Ok(())
}

/// Reads an 8-byte preamble; an early end of stream is [`ProtoError::Truncated`].
pub async fn read_preamble<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Preamble, ProtoError> {
    let mut bytes = [0u8; PREAMBLE_LEN];
    reader.read_exact(&mut bytes).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtoError::Truncated,
        _ => ProtoError::Io(e),
    })?;
    Preamble::parse(bytes)
}
