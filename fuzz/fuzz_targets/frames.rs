//! Everything a peer can send, fed to the decoders: frame splitting, every message type,
//! and the handshake preamble. Any panic or abort is a bug.

#![no_main]

use dlsession_proto::handshake::Preamble;
use dlsession_proto::{ClientHello, RequestFrame, ServerMessage, Welcome, codec, frame, v1};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a stream of frames, in both directions.
    let _ = frame::decode_frames::<RequestFrame>(data);
    let _ = frame::decode_frames::<ServerMessage>(data);
    // As a single payload of each type.
    let _ = codec::decode::<RequestFrame>(data);
    let _ = codec::decode::<ServerMessage>(data);
    let _ = codec::decode::<ClientHello>(data);
    let _ = codec::decode::<v1::ClientHello>(data);
    let _ = codec::decode::<v1::ServerMessage>(data);
    let _ = codec::decode::<Welcome>(data);
    // As an opening.
    if let Some(bytes) = data.first_chunk::<8>() {
        let _ = Preamble::parse(*bytes).map(|p| p.check_version());
    }
    // Whatever a daemon could send reaches a protocol-1 client.
    if let Ok(msg) = codec::decode::<ServerMessage>(data) {
        let old = frame::encode_server_frame(1, msg).expect("a decoded message encodes for protocol 1");
        let _ = frame::decode_frames::<v1::ServerMessage>(&old).expect("and decodes as protocol 1");
    }
    // Whatever decodes must encode again.
    if let Ok(msg) = codec::decode::<RequestFrame>(data) {
        let again = codec::encode(&msg).expect("a decoded request encodes");
        let _ = codec::decode::<RequestFrame>(&again).expect("and decodes again");
    }
});
