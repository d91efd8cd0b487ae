//! Counts the recipients of every `SendBatchRequest` on the wire, while the request is still
//! arriving, and refuses one that holds far more than a batch may before tonic decodes it.
//!
//! Why: decoding amplifies. An empty `Recipient` is 2 bytes on the wire and a few hundred once
//! decoded, so a request at the decode limit (`pipeline.max_request_bytes`, ~21 MB by default)
//! could cost gigabytes before ingest looked at `max_batch_recipients`. The guard counts the
//! `recipients` fields (tag 5) of each gRPC message as its bytes pass and ends the request with
//! INVALID_ARGUMENT once the count passes `refuse_above`, so decoding never materializes more
//! than that many recipients. Batches between the cap and `refuse_above` still reach ingest,
//! which answers them as before (SendBatch: INVALID_ARGUMENT naming `recipients`; StreamSend:
//! one short REJECTED receipt per recipient).
//!
//! Only top-level fields are read (a tag, then a length or a varint to skip): no allocation, no
//! copy. A message the scanner cannot follow (compressed, or not well-formed protobuf) is passed
//! on unscanned; tonic then refuses it as it would have.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower_service::Service;

use crate::domain::FieldError;

/// The `recipients` field of `SendBatchRequest`, length-delimited.
const RECIPIENTS_FIELD: u64 = 5;
const WIRE_VARINT: u64 = 0;
const WIRE_FIXED64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_FIXED32: u64 = 5;

/// Recipients one request may carry on the wire before it is refused undecoded: twice the batch
/// cap, so a batch a little over it still gets ingest's answer naming the field, and decoding
/// never builds more than this many.
pub fn refuse_above(max_batch_recipients: usize) -> usize {
    max_batch_recipients.saturating_mul(2).max(1)
}

/// Wraps the `PushGateway` tonic service: the bodies of `SendBatch` and `StreamSend` are
/// scanned, every other call passes untouched.
#[derive(Clone)]
pub struct BatchGuard<S> {
    inner: S,
    refuse_above: usize,
}

impl<S> BatchGuard<S> {
    /// Refuses a request message with more than `refuse_above` recipients.
    pub fn new(inner: S, refuse_above: usize) -> Self {
        BatchGuard {
            inner,
            refuse_above,
        }
    }
}

impl<S: NamedService> NamedService for BatchGuard<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for BatchGuard<S>
where
    S: Service<http::Request<Body>, Error = Infallible>,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if path.ends_with("/SendBatch") || path.ends_with("/StreamSend") {
            let refuse_above = self.refuse_above;
            let request =
                request.map(|body| Body::new(GuardedBody::new(body, Scanner::new(refuse_above))));
            return self.inner.call(request);
        }
        self.inner.call(request)
    }
}

/// A request body whose data frames pass through a [`Scanner`].
struct GuardedBody {
    inner: Body,
    scanner: Scanner,
}

impl GuardedBody {
    fn new(inner: Body, scanner: Scanner) -> Self {
        GuardedBody { inner, scanner }
    }
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(too_many) = this.scanner.feed(data)
                {
                    return Poll::Ready(Some(Err(too_many.into_status())));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request message held more recipients than the guard lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyRecipients {
    pub refuse_above: usize,
}

impl TooManyRecipients {
    /// INVALID_ARGUMENT naming `recipients`, with the field in the details as ingest gives it.
    pub fn into_status(self) -> Status {
        super::convert::invalid_argument(vec![FieldError::new(
            "recipients",
            format!(
                "more than {} recipients in one request (refused before decoding; a batch \
                 holds at most pipeline.max_batch_recipients)",
                self.refuse_above
            ),
        )])
    }
}

/// Where the scanner is inside the gRPC framing and the protobuf of the current message.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Reading the 5-byte message prefix (compressed flag, big-endian length).
    Prefix { got: usize, bytes: [u8; 5] },
    /// Inside a message, reading a field's tag.
    Tag { varint: Varint },
    /// Reading the length of a length-delimited field.
    Length { varint: Varint },
    /// Skipping a varint field's value.
    VarintValue,
    /// Skipping `n` bytes (a field's value, or a whole message not scanned).
    Skip { n: u64, then_fields: bool },
}

/// A varint being read a byte at a time.
#[derive(Debug, Clone, Copy, Default)]
struct Varint {
    value: u64,
    shift: u32,
}

impl Varint {
    /// Adds a byte; `Some(value)` when it was the last, `None` to go on. `Err` on overflow.
    fn push(&mut self, byte: u8) -> Result<Option<u64>, ()> {
        if self.shift >= 64 {
            return Err(());
        }
        self.value |= u64::from(byte & 0x7f) << self.shift;
        self.shift += 7;
        Ok((byte & 0x80 == 0).then_some(self.value))
    }
}

/// Follows the gRPC length-prefixed messages of one request body and counts each message's
/// top-level `recipients` fields.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// Bytes of the current message not yet consumed (after its prefix).
    left_in_message: u64,
    recipients: usize,
    refuse_above: usize,
}

impl Scanner {
    pub fn new(refuse_above: usize) -> Self {
        Scanner {
            state: State::Prefix {
                got: 0,
                bytes: [0; 5],
            },
            left_in_message: 0,
            recipients: 0,
            refuse_above,
        }
    }

    /// Consumes the next bytes of the body.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), TooManyRecipients> {
        while let Some((&byte, rest)) = data.split_first() {
            let in_message = matches!(
                self.state,
                State::Tag { .. }
                    | State::Length { .. }
                    | State::VarintValue
                    | State::Skip {
                        then_fields: true,
                        ..
                    }
            );
            if in_message && self.left_in_message == 0 {
                // The message is used up (a value cut short by its end is prost's to refuse):
                // what follows is the next message's prefix.
                self.state = Self::prefix();
            }
            match self.state {
                State::Prefix { mut got, mut bytes } => {
                    bytes[got] = byte;
                    got += 1;
                    data = rest;
                    self.state = State::Prefix { got, bytes };
                    if got == 5 {
                        let compressed = bytes[0] != 0;
                        let len =
                            u64::from(u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]));
                        self.recipients = 0;
                        self.left_in_message = if compressed { 0 } else { len };
                        self.state = if compressed {
                            State::Skip {
                                n: len,
                                then_fields: false,
                            }
                        } else {
                            State::Tag {
                                varint: Varint::default(),
                            }
                        };
                    }
                }
                State::Skip { n, then_fields } => {
                    let take = n.min(data.len() as u64);
                    // `take` fits in usize: it is at most `data.len()`.
                    data = &data[take as usize..];
                    if then_fields {
                        self.left_in_message = self.left_in_message.saturating_sub(take);
                    }
                    self.state = match (n - take, then_fields) {
                        (0, true) => State::Tag {
                            varint: Varint::default(),
                        },
                        (0, false) => Self::prefix(),
                        (n, then_fields) => State::Skip { n, then_fields },
                    };
                }
                State::Tag { mut varint } => {
                    data = rest;
                    self.left_in_message -= 1;
                    match varint.push(byte) {
                        Err(()) => self.give_up_on_message(),
                        Ok(None) => self.state = State::Tag { varint },
                        Ok(Some(tag)) => self.on_tag(tag)?,
                    }
                }
                State::Length { mut varint } => {
                    data = rest;
                    self.left_in_message -= 1;
                    match varint.push(byte) {
                        Err(()) => self.give_up_on_message(),
                        Ok(None) => self.state = State::Length { varint },
                        Ok(Some(len)) if len > self.left_in_message => self.give_up_on_message(),
                        Ok(Some(len)) => {
                            self.state = State::Skip {
                                n: len,
                                then_fields: true,
                            }
                        }
                    }
                }
                State::VarintValue => {
                    data = rest;
                    self.left_in_message -= 1;
                    if byte & 0x80 == 0 {
                        self.state = State::Tag {
                            varint: Varint::default(),
                        };
                    }
                }
            }
        }
        Ok(())
    }

    fn prefix() -> State {
        State::Prefix {
            got: 0,
            bytes: [0; 5],
        }
    }

    fn on_tag(&mut self, tag: u64) -> Result<(), TooManyRecipients> {
        let (field, wire_type) = (tag >> 3, tag & 7);
        self.state = match wire_type {
            WIRE_VARINT => State::VarintValue,
            WIRE_FIXED64 => State::Skip {
                n: 8,
                then_fields: true,
            },
            WIRE_FIXED32 => State::Skip {
                n: 4,
                then_fields: true,
            },
            WIRE_LEN => {
                if field == RECIPIENTS_FIELD {
                    self.recipients += 1;
                    if self.recipients > self.refuse_above {
                        return Err(TooManyRecipients {
                            refuse_above: self.refuse_above,
                        });
                    }
                }
                State::Length {
                    varint: Varint::default(),
                }
            }
            // Groups (3, 4) and invalid types: not a message we can follow.
            _ => {
                self.give_up_on_message();
                return Ok(());
            }
        };
        Ok(())
    }

    /// Skips the rest of the current message unscanned (prost will judge it).
    fn give_up_on_message(&mut self) {
        self.state = State::Skip {
            n: self.left_in_message,
            then_fields: false,
        };
        self.left_in_message = 0;
    }
}

/// The HTTP/JSON door's form of the guard: counts the elements of the body's top-level
/// `recipients` array without building them (serde's `IgnoredAny`), so a body of `{}`s (3
/// bytes each) costs no decoded recipients before it is refused. A body that is not a JSON
/// object passes: the real decode names what is wrong with it.
pub fn check_json(body: &[u8], refuse_above: usize) -> Result<(), TooManyRecipients> {
    let over = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let _ = serde::de::DeserializeSeed::deserialize(
        json::Top {
            refuse_above,
            over: &over,
        },
        &mut de,
    );
    if over.get() {
        Err(TooManyRecipients { refuse_above })
    } else {
        Ok(())
    }
}

mod json {
    use std::cell::Cell;
    use std::fmt;

    use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};

    /// The top-level object: `recipients` counted, every other value skipped.
    pub(super) struct Top<'a> {
        pub(super) refuse_above: usize,
        pub(super) over: &'a Cell<bool>,
    }

    impl<'de> DeserializeSeed<'de> for Top<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Top<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a SendBatchRequest object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                if key == "recipients" {
                    map.next_value_seed(Count {
                        refuse_above: self.refuse_above,
                        over: self.over,
                    })?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        }
    }

    /// The `recipients` array, counted; stops (with an error that `over` explains) past the cap.
    struct Count<'a> {
        refuse_above: usize,
        over: &'a Cell<bool>,
    }

    impl<'de> DeserializeSeed<'de> for Count<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Count<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array of recipients")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut n = 0usize;
            while seq.next_element::<IgnoredAny>()?.is_some() {
                n += 1;
                if n > self.refuse_above {
                    self.over.set(true);
                    return Err(A::Error::custom("too many recipients"));
                }
            }
            Ok(())
        }
        // Anything else (null, a string, ...) is the real decode's to refuse.
        fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::proto;

    fn framed(messages: &[proto::SendBatchRequest]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            let body = m.encode_to_vec();
            out.push(0);
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            out.extend_from_slice(&body);
        }
        out
    }

    fn request(recipients: usize) -> proto::SendBatchRequest {
        proto::SendBatchRequest {
            app_id: "shop".into(),
            batch_id: "b".repeat(300),
            campaign_id: "c".into(),
            template: Some(proto::Template {
                title: "Hi {{ name }}".into(),
                body: "x".repeat(200),
                ..Default::default()
            }),
            recipients: (0..recipients)
                .map(|i| proto::Recipient {
                    device_token: format!("{i:064x}"),
                    platform: proto::Platform::Apns as i32,
                    vars: [("name".to_string(), "Ada".to_string())].into(),
                    ..Default::default()
                })
                .collect(),
            wait_for_receipts: true,
            campaign_rate_per_minute: 70_000,
            ..Default::default()
        }
    }

    /// Feeds `bytes` in chunks of `chunk` bytes.
    fn scan(bytes: &[u8], chunk: usize, refuse_above: usize) -> Result<(), TooManyRecipients> {
        let mut s = Scanner::new(refuse_above);
        for part in bytes.chunks(chunk) {
            s.feed(part)?;
        }
        Ok(())
    }

    #[test]
    fn counts_recipients_per_message_in_any_chunking() {
        let bytes = framed(&[request(5), request(5), request(3)]);
        for chunk in [1, 2, 3, 7, 64, 1000, bytes.len()] {
            assert_eq!(scan(&bytes, chunk, 5), Ok(()), "chunk {chunk}");
            assert_eq!(
                scan(&bytes, chunk, 4),
                Err(TooManyRecipients { refuse_above: 4 }),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn empty_recipients_are_counted_before_the_message_ends() {
        // 2 bytes per recipient on the wire: the amplification the guard exists for.
        let mut body = Vec::new();
        for _ in 0..1000 {
            body.extend_from_slice(&[(5 << 3) | 2, 0]);
        }
        let mut bytes = vec![0];
        bytes.extend_from_slice(&(10_000_000u32).to_be_bytes());
        bytes.extend_from_slice(&body);
        let mut s = Scanner::new(999);
        assert!(
            s.feed(&bytes).is_err(),
            "refused with the message still arriving"
        );
    }

    #[test]
    fn malformed_or_compressed_messages_pass_unscanned_and_the_next_is_scanned() {
        let good = framed(&[request(3)]);
        // A compressed message of 10 bytes of anything, then a good one.
        let mut bytes = vec![1, 0, 0, 0, 10];
        bytes.extend_from_slice(&[0xff; 10]);
        bytes.extend_from_slice(&good);
        assert_eq!(scan(&bytes, 3, 3), Ok(()));
        assert!(scan(&bytes, 3, 2).is_err());
        // A message whose field claims more bytes than the message has.
        let mut bytes = vec![0, 0, 0, 0, 4, (1 << 3) | 2, 100, b'a', b'b'];
        bytes.extend_from_slice(&good);
        assert!(
            scan(&bytes, 1, 2).is_err(),
            "the next message is still scanned"
        );
        // An endless varint.
        let mut bytes = vec![0, 0, 0, 0, 12];
        bytes.extend_from_slice(&[0x80; 12]);
        bytes.extend_from_slice(&good);
        assert!(scan(&bytes, 5, 2).is_err());
    }

    #[test]
    fn json_recipients_are_counted_without_decoding_them() {
        let body = |n: usize| {
            let items = vec!["{}"; n].join(",");
            format!(
                r#"{{"appId":"shop","template":{{"title":"t"}},"recipients":[{items}],"x":[1]}}"#
            )
        };
        assert_eq!(check_json(body(3).as_bytes(), 3), Ok(()));
        assert_eq!(
            check_json(body(4).as_bytes(), 3),
            Err(TooManyRecipients { refuse_above: 3 })
        );
        for not_ours in [&b"[1,2]"[..], b"nonsense", br#"{"recipients":null}"#, b""] {
            assert_eq!(check_json(not_ours, 0), Ok(()), "{not_ours:?}");
        }
    }

    #[test]
    fn other_field_types_are_skipped() {
        // fixed32 / fixed64 fields are not in SendBatchRequest, but a newer client may send
        // unknown ones; the scan must stay aligned.
        let mut body = vec![(14 << 3) | 5, 1, 2, 3, 4];
        body.extend_from_slice(&[(15 << 3) | 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        // A two-byte tag (field 300, varint) with a two-byte value.
        body.extend_from_slice(&[0xe0, 0x12, 0x80, 0x01]);
        body.extend_from_slice(&request(2).encode_to_vec());
        let mut bytes = vec![0];
        bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&body);
        assert_eq!(scan(&bytes, 1, 2), Ok(()));
        assert!(scan(&bytes, 1, 1).is_err());
    }
}
