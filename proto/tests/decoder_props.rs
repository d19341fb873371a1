//! Property tests: the decoder never panics, whatever the bytes, and what we encode we
//! decode back unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use dlsession_proto::*;
use proptest::prelude::*;

fn arb_header() -> impl Strategy<Value = Header> {
    ("[A-Za-z-]{1,16}", "[ -~]{0,32}").prop_map(|(n, v)| Header::new(n, v))
}

fn arb_spec() -> impl Strategy<Value = TaskSpec> {
    (
        "https?://[a-z]{1,10}\\.test/[a-z0-9/]{0,20}",
        proptest::collection::vec(arb_header(), 0..4),
        proptest::option::of(".{0,20}"),
        0.0f32..=1.0,
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<[u8; 32]>()),
        proptest::option::of("/[a-z/]{1,20}"),
        any::<bool>(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(url, headers, description, priority, earliest_begin, sha, dest, overwrite, size)| TaskSpec {
            url,
            headers,
            description,
            priority,
            earliest_begin,
            expected_sha256: sha,
            destination: dest,
            overwrite,
            expected_size: size,
        })
}

fn arb_error() -> impl Strategy<Value = ErrorInfo> {
    (0..ErrorCode::ALL.len(), ".{0,40}", proptest::option::of(any::<u16>())).prop_map(|(i, m, s)| ErrorInfo {
        code: ErrorCode::ALL.get(i).copied().unwrap_or(ErrorCode::Internal),
        message: m,
        http_status: s,
    })
}

fn arb_durable() -> impl Strategy<Value = DurableEvent> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), proptest::option::of(any::<u64>()))
            .prop_map(|(task, offset, expected_total)| DurableEvent::ResumedAtOffset { task, offset, expected_total }),
        (any::<u64>(), ".{0,40}").prop_map(|(task, location)| DurableEvent::FinishedDownloading { task, location }),
        (any::<u64>(), proptest::option::of(arb_error()))
            .prop_map(|(task, error)| DurableEvent::Completed { task, error }),
        proptest::option::of(arb_error()).prop_map(|error| DurableEvent::DidBecomeInvalid { error }),
    ]
}

/// `PROPTEST_CASES` raises the count for the long profile (`scripts/long-tests.sh`).
fn cases(default: u32) -> ProptestConfig {
    ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default))
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = codec::decode::<RequestFrame>(&bytes);
        let _ = frame::decode_frames::<RequestFrame>(&bytes);
    }

    #[test]
    fn server_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = codec::decode::<ServerMessage>(&bytes);
        let _ = codec::decode::<ClientHello>(&bytes);
        let _ = codec::decode::<v1::ClientHello>(&bytes);
        let _ = codec::decode::<v1::ServerMessage>(&bytes);
        let _ = frame::decode_frames::<ServerMessage>(&bytes);
    }

    #[test]
    fn mutated_valid_frames_never_panic(spec in arb_spec(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let frame = RequestFrame { id: 1, request: Request::CreateTasks { identifier: "s".into(), tasks: vec![spec], resume: true } };
        let mut bytes = codec::encode(&frame).unwrap();
        for (pos, val) in flips {
            let len = bytes.len();
            if let Some(b) = bytes.get_mut(pos % len) { *b = val; }
        }
        let _ = codec::decode::<RequestFrame>(&bytes);
    }

    #[test]
    fn create_tasks_round_trips(id in any::<u64>(), specs in proptest::collection::vec(arb_spec(), 0..5), resume in any::<bool>()) {
        let frame = RequestFrame { id, request: Request::CreateTasks { identifier: "org.example".into(), tasks: specs, resume } };
        let bytes = frame::encode_frame(&frame).unwrap();
        let back: Vec<RequestFrame> = frame::decode_frames(&bytes).unwrap();
        prop_assert_eq!(back, vec![frame]);
    }

    #[test]
    fn durable_events_round_trip(identifier in ".{1,30}", seq in any::<u64>(), event in arb_durable()) {
        let msg = ServerMessage::Event(Event::Durable { identifier, seq, event });
        let back: ServerMessage = codec::decode(&codec::encode(&msg).unwrap()).unwrap();
        prop_assert_eq!(back, msg);
    }
}

#[test]
fn hostile_lengths_are_refused_before_allocation() {
    // A String claiming 2^40 bytes: must be an error, not an abort.
    let mut bytes = vec![0u8, 253];
    bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(codec::decode::<RequestFrame>(&bytes).is_err());
    // A frame header announcing more than MAX_FRAME.
    let header = ((MAX_FRAME + 1) as u32).to_be_bytes();
    assert!(matches!(frame::payload_len(header), Err(ProtoError::FrameTooLarge { .. })));
    assert!(matches!(frame::split_frame(&header), Err(ProtoError::FrameTooLarge { .. })));
}

#[test]
fn trailing_bytes_and_truncation_are_errors() {
    let mut bytes = codec::encode(&RequestFrame { id: 1, request: Request::Status }).unwrap();
    bytes.push(0);
    assert!(matches!(codec::decode::<RequestFrame>(&bytes), Err(ProtoError::TrailingBytes { trailing: 1 })));
    let framed = frame::encode_frame(&RequestFrame { id: 1, request: Request::Status }).unwrap();
    let cut = framed.get(..framed.len() - 1).unwrap();
    assert!(matches!(frame::decode_frames::<RequestFrame>(cut), Err(ProtoError::Truncated)));
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn async_reader_reports_eof_and_truncation() {
    let framed = frame::encode_frame(&RequestFrame { id: 5, request: Request::Status }).unwrap();
    let mut buf = Vec::new();
    let mut whole: &[u8] = &framed;
    let got: Option<RequestFrame> = io::read_frame(&mut whole, &mut buf).await.unwrap();
    assert_eq!(got, Some(RequestFrame { id: 5, request: Request::Status }));
    let got: Option<RequestFrame> = io::read_frame(&mut whole, &mut buf).await.unwrap();
    assert_eq!(got, None, "clean EOF at a frame boundary");
    let mut cut: &[u8] = framed.get(..framed.len() - 1).unwrap();
    assert!(matches!(io::read_frame::<_, RequestFrame>(&mut cut, &mut buf).await, Err(ProtoError::Truncated)));
    let mut half_header: &[u8] = framed.get(..2).unwrap();
    assert!(matches!(io::read_frame::<_, RequestFrame>(&mut half_header, &mut buf).await, Err(ProtoError::Truncated)));
}
