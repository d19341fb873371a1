//! A client speaking the wire protocol by hand, blocking: for tests that need what the
//! library hides (a connection that stops reading, frames exactly as they come).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use dlsession::proto::handshake::{HandshakeStatus, Preamble};
use dlsession::proto::{ClientHello, Request, RequestFrame, ServerMessage, frame};

#[derive(Debug)]
pub struct RawClient {
    pub stream: UnixStream,
}

impl RawClient {
    /// Connects and completes the handshake (the daemon's preamble and welcome read).
    pub fn connect(socket: &Path) -> RawClient {
        let mut stream = UnixStream::connect(socket).expect("connect to the daemon's socket");
        let mut bytes = Preamble::ours(HandshakeStatus::Ok).to_bytes().to_vec();
        let hello = ClientHello { client_name: "raw".into(), client_version: "0".into(), app_id: None, umask: None };
        bytes.extend(frame::encode_frame(&hello).expect("encode hello"));
        stream.write_all(&bytes).expect("send hello");
        let mut preamble = [0u8; 8];
        stream.read_exact(&mut preamble).expect("the daemon's preamble");
        assert_eq!(Preamble::parse(preamble).ok().map(|p| p.status), Some(HandshakeStatus::Ok), "handshake");
        let mut client = RawClient { stream };
        client.frame();
        client
    }

    /// Sends requests (id, request) in one write, without waiting for answers.
    pub fn send(&mut self, requests: impl IntoIterator<Item = (u64, Request)>) {
        let mut bytes = Vec::new();
        for (id, request) in requests {
            bytes.extend(frame::encode_frame(&RequestFrame { id, request }).expect("encode request"));
        }
        self.stream.write_all(&bytes).expect("send requests");
    }

    /// The next message from the daemon.
    pub fn recv(&mut self) -> ServerMessage {
        let bytes = self.frame();
        frame::decode_frames::<ServerMessage>(&bytes).expect("decode").pop().expect("one message")
    }

    /// The next message, if one comes within `wait` (then the read timeout is left at `wait`).
    pub fn recv_within(&mut self, wait: std::time::Duration) -> Option<ServerMessage> {
        self.stream.set_read_timeout(Some(wait)).expect("set a read timeout");
        let mut header = [0u8; frame::HEADER_LEN];
        match self.stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return None,
            Err(e) => panic!("reading a frame's header: {e}"),
        }
        let len = frame::payload_len(header).expect("a frame's length");
        let mut bytes = header.to_vec();
        bytes.resize(frame::HEADER_LEN + len, 0);
        self.stream.read_exact(&mut bytes[frame::HEADER_LEN..]).expect("a frame's payload");
        frame::decode_frames::<ServerMessage>(&bytes).expect("decode").pop()
    }

    /// One whole frame (header and payload).
    fn frame(&mut self) -> Vec<u8> {
        let mut header = [0u8; frame::HEADER_LEN];
        self.stream.read_exact(&mut header).expect("a frame's header");
        let len = frame::payload_len(header).expect("a frame's length");
        let mut bytes = header.to_vec();
        bytes.resize(frame::HEADER_LEN + len, 0);
        self.stream.read_exact(&mut bytes[frame::HEADER_LEN..]).expect("a frame's payload");
        bytes
    }
}
