//! Protocols 2 to 6: protocol 7 appended the error code `shutting_down`, which only ever
//! answers a request (a refusal while the daemon stops). Older clients get it as
//! `internal`, the message unchanged ("the daemon is shutting down; try again when it is
//! back"), as they always did. Protocol 1 maps it in [`crate::v1`].

use crate::{ErrorCode, ErrorInfo, ServerMessage};

/// A message of the current protocol in protocol 6's variants.
pub fn downgrade(msg: ServerMessage) -> ServerMessage {
    match msg {
        ServerMessage::Response { id, result: Err(e) } if e.code == ErrorCode::ShuttingDown => {
            ServerMessage::Response { id, result: Err(ErrorInfo { code: ErrorCode::Internal, ..e }) }
        }
        other => other,
    }
}
