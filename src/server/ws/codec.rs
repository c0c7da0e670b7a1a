//! Sans-IO RFC 6455 WebSocket codec, server side.
//!
//! The [`Decoder`] turns bytes read from a client socket into [`Incoming`]
//! events and never performs I/O itself, so the connection task decides when
//! to read, how big its read buffer is and what to do with each event. The
//! encoder half ([`FrameHead`], [`close_payload`]) produces unmasked
//! server-to-client frames.
//!
//! The design goal is that an idle connection costs (almost) nothing: the
//! decoder keeps no heap allocation between frames, and everything needed only
//! while a frame or a fragmented message is half-received lives in a single
//! boxed value that is freed as soon as that frame or message completes.
//!
//! No extensions are supported (in particular no permessage-deflate), so all
//! RSV bits must be zero.

use bytes::Bytes;
use bytestring::ByteString;

/// WebSocket close status codes (RFC 6455 §7.4.1) that the server sends or
/// reports.
pub(crate) mod close_code {
    /// 1000: normal closure; the purpose of the connection was fulfilled.
    pub(crate) const NORMAL: u16 = 1000;
    /// 1001: an endpoint is going away (server shutdown, browser navigating
    /// away).
    pub(crate) const GOING_AWAY: u16 = 1001;
    /// 1002: the peer violated the WebSocket protocol.
    pub(crate) const PROTOCOL: u16 = 1002;
    /// 1003: the endpoint received a data type it cannot accept.
    #[allow(dead_code)] // for the connection memory budget and tests
    pub(crate) const UNSUPPORTED: u16 = 1003;
    /// 1005: no status code was present. Reserved: must never be sent on the
    /// wire, only used locally to report an empty close frame.
    pub(crate) const NO_STATUS: u16 = 1005;
    /// 1006: the connection closed without a close frame. Reserved: must never
    /// be sent on the wire, only used locally.
    pub(crate) const ABNORMAL: u16 = 1006;
    /// 1007: a message contained data inconsistent with its type (e.g.
    /// invalid UTF-8 in a text message).
    pub(crate) const INVALID_PAYLOAD: u16 = 1007;
    /// 1008: a message violated the endpoint's policy.
    pub(crate) const POLICY: u16 = 1008;
    /// 1009: a frame or message is too big to process.
    pub(crate) const TOO_BIG: u16 = 1009;
    /// 1011: the server hit an unexpected condition.
    pub(crate) const INTERNAL: u16 = 1011;
}

/// Whether `code` may appear in a close frame on the wire.
///
/// Valid: 1000–1003, 1007–1014 (the IANA-registered codes, including 1012
/// "service restart", 1013 "try again later" and 1014 "bad gateway") and
/// 3000–4999 (registered libraries/frameworks and private use). Everything
/// else is invalid: 0–999 are unused, 1004 is reserved, 1005/1006/1015 are
/// local-only pseudo codes, 1016–2999 are reserved for future protocol use,
/// and 5000+ are undefined. The server uses this both for codes received from
/// clients and for codes the application asks it to send.
pub(crate) fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Size limits enforced by the [`Decoder`], in payload bytes.
///
/// Both are checked as soon as a frame header announces a length, before any
/// buffer for that payload is allocated, so a client cannot make the server
/// allocate more than these limits by lying in a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Largest payload accepted in a single frame (data or control).
    pub(crate) max_frame_size: usize,
    /// Largest data message accepted after reassembling its fragments.
    pub(crate) max_message_size: usize,
}

impl Default for Limits {
    /// 1 MiB for both limits.
    fn default() -> Self {
        Self {
            max_frame_size: 1 << 20,
            max_message_size: 1 << 20,
        }
    }
}

/// A complete event decoded from the client's byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A complete (reassembled) text message; always valid UTF-8.
    Text(ByteString),
    /// A complete (reassembled) binary message.
    Binary(Bytes),
    /// A ping with its application data (at most 125 bytes); the server should
    /// answer with a pong carrying the same data.
    Ping(Bytes),
    /// A pong with its application data (at most 125 bytes).
    Pong(Bytes),
    /// A close frame: `None` when its payload was empty, otherwise the
    /// (already validated) status code and UTF-8 reason. The decoder ignores
    /// all input after this event.
    Close(Option<(u16, String)>),
}

/// A violation of RFC 6455 (or of the configured [`Limits`]) by the client.
///
/// Every error is fatal: the server should send a close frame with
/// [`ProtocolError::close_code`] and drop the connection. The [`Decoder`]
/// ignores all input after returning one.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProtocolError {
    /// The client sent a frame without the MASK bit (RFC 6455 §5.1).
    #[error("client frame is not masked")]
    UnmaskedFrame,
    /// An RSV bit is set although no extension was negotiated. The field holds
    /// the three RSV bits (RSV1 is the most significant).
    #[error("reserved bits {0:#05b} set without a negotiated extension")]
    ReservedBits(u8),
    /// The opcode is one of the reserved values 3–7 or 11–15.
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A control frame (close/ping/pong) had FIN clear; control frames must
    /// not be fragmented.
    #[error("fragmented control frame")]
    FragmentedControlFrame,
    /// A control frame announced more than 125 payload bytes.
    #[error("control frame payload longer than 125 bytes")]
    ControlFrameTooLong,
    /// A continuation frame arrived while no fragmented message was in
    /// progress.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// A new text or binary frame arrived while a fragmented message was still
    /// waiting for its continuation frames.
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    /// A 64-bit payload length had its most significant bit set.
    #[error("64-bit payload length with the most significant bit set")]
    InvalidLength,
    /// A frame header announced a payload larger than
    /// [`Limits::max_frame_size`].
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooBig {
        /// Announced payload length.
        len: u64,
        /// Configured limit.
        max: usize,
    },
    /// A message (sum of its fragments so far) would exceed
    /// [`Limits::max_message_size`].
    #[error("message of at least {len} bytes exceeds the limit of {max} bytes")]
    MessageTooBig {
        /// Message length including the fragment just announced.
        len: u64,
        /// Configured limit.
        max: usize,
    },
    /// The buffer for an announced payload could not be allocated (only
    /// possible with very large configured limits).
    #[error("could not allocate a buffer of {0} bytes")]
    AllocationFailed(usize),
    /// A text message (or a prefix of it) is not valid UTF-8.
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// A close frame carried exactly one payload byte (a code needs two).
    #[error("close frame payload of 1 byte")]
    CloseFrameTooShort,
    /// A close frame carried a status code that may not be sent on the wire
    /// (see [`is_valid_close_code`]).
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// A close frame's reason is not valid UTF-8.
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
}

impl ProtocolError {
    /// The close code the server should send when failing the connection
    /// because of this error: 1007 for invalid UTF-8, 1009 for exceeded
    /// limits, 1002 for everything else.
    pub(crate) fn close_code(&self) -> u16 {
        match self {
            Self::InvalidUtf8 | Self::InvalidCloseReason => close_code::INVALID_PAYLOAD,
            Self::FrameTooBig { .. } | Self::MessageTooBig { .. } | Self::AllocationFailed(_) => {
                close_code::TOO_BIG
            }
            Self::UnmaskedFrame
            | Self::ReservedBits(_)
            | Self::ReservedOpcode(_)
            | Self::FragmentedControlFrame
            | Self::ControlFrameTooLong
            | Self::UnexpectedContinuation
            | Self::ExpectedContinuation
            | Self::InvalidLength
            | Self::CloseFrameTooShort
            | Self::InvalidCloseCode(_) => close_code::PROTOCOL,
        }
    }
}

/// A WebSocket frame opcode (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpCode {
    /// 0x0: continues a fragmented message.
    Continuation,
    /// 0x1: first (or only) frame of a text message.
    Text,
    /// 0x2: first (or only) frame of a binary message.
    Binary,
    /// 0x8: close the connection.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    /// The 4-bit wire value of this opcode.
    pub(crate) const fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Parses a 4-bit wire value; `None` for the reserved opcodes.
    pub(crate) const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0x0 => Some(Self::Continuation),
            0x1 => Some(Self::Text),
            0x2 => Some(Self::Binary),
            0x8 => Some(Self::Close),
            0x9 => Some(Self::Ping),
            0xA => Some(Self::Pong),
            _ => None,
        }
    }

    /// Whether this is a control opcode (close, ping, pong): such frames must
    /// not be fragmented and carry at most 125 payload bytes.
    #[allow(dead_code)] // for the connection memory budget and tests
    pub(crate) const fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// An encoded frame header kept inline (2, 4 or 10 bytes) so a broadcast
/// payload (`Bytes`) can be shared by reference between many connections and
/// written with vectored I/O (header slice + payload slice), with no per-frame
/// allocation.
///
/// Server frames are never masked, so the header is the same for every
/// recipient of a broadcast and can even be computed once and copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHead {
    /// Header bytes; only the first `len` are meaningful.
    bytes: [u8; 10],
    /// Number of meaningful bytes in `bytes` (2, 4 or 10; 0 for [`FrameHead::none`]).
    len: u8,
}

impl FrameHead {
    /// Header of a final (FIN set), unmasked frame with RSV bits clear,
    /// using the shortest length encoding.
    ///
    /// The caller is responsible for keeping control frame payloads within
    /// 125 bytes (see [`close_payload`] for close frames).
    pub(crate) fn new(opcode: OpCode, payload_len: usize) -> Self {
        let b0 = 0x80 | opcode.as_u8();
        let mut bytes = [0u8; 10];
        bytes[0] = b0;
        let len = if let Ok(n) = u8::try_from(payload_len)
            && n <= 125
        {
            bytes[1] = n;
            2
        } else if let Ok(n) = u16::try_from(payload_len) {
            let [hi, lo] = n.to_be_bytes();
            bytes[1] = 126;
            bytes[2] = hi;
            bytes[3] = lo;
            4
        } else {
            // usize is at most 64 bits on every supported target.
            let n = u64::try_from(payload_len).unwrap_or(u64::MAX);
            let [a, b, c, d, e, f, g, h] = n.to_be_bytes();
            bytes = [b0, 127, a, b, c, d, e, f, g, h];
            10
        };
        Self { bytes, len }
    }

    /// No header: the bytes that go with it are the rest of frames already started on the
    /// wire (a write the socket took only in part), written as they are.
    pub(crate) fn none() -> Self {
        Self {
            bytes: [0; 10],
            len: 0,
        }
    }

    /// True for [`FrameHead::none`].
    pub(crate) fn is_none(&self) -> bool {
        self.len == 0
    }

    /// The encoded header bytes, to be written right before the payload.
    pub(crate) fn as_slice(&self) -> &[u8] {
        self.bytes
            .get(..usize::from(self.len))
            .unwrap_or(&self.bytes)
    }
}

/// Close frame payload: code + reason truncated to fit 125 bytes in total, cut
/// at a UTF-8 char boundary.
///
/// The code is written as given; check it with [`is_valid_close_code`] first
/// (1005 and 1006 in particular must never be sent).
pub(crate) fn close_payload(code: u16, reason: &str) -> Bytes {
    /// Room left for the reason after the 2-byte code in a 125-byte payload.
    const MAX_REASON: usize = 125 - 2;
    let end = reason.floor_char_boundary(MAX_REASON);
    let reason = reason.get(..end).unwrap_or_default();
    let mut buf = Vec::with_capacity(2 + reason.len());
    buf.extend_from_slice(&code.to_be_bytes());
    buf.extend_from_slice(reason.as_bytes());
    Bytes::from(buf)
}

/// Longest possible client frame header: 2 fixed bytes, 8 bytes of extended
/// length and a 4-byte masking key.
const MAX_HEAD: usize = 14;

/// Outcome of a successful [`run`] over one input chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// All input was consumed; more may follow.
    Continue,
    /// A close frame was decoded; the rest of the input must be ignored.
    Closed,
}

/// Incremental RFC 6455 decoder for one client connection.
///
/// Feed it whatever the socket returned, in any chunking; it emits the same
/// events whether a stream arrives one byte at a time or all at once.
///
/// Memory: `size_of::<Decoder>()` is one pointer (the limits come with each
/// [`feed`](Self::feed), from the server's configuration). Between frames it
/// owns no heap memory at all. While a frame or fragmented message is
/// incomplete at the end of a `feed` call, the partial state (header bytes,
/// masking key, payload buffer, fragmented message) is kept in one `Box` which
/// is freed as soon as the connection is idle again; a frame that arrives
/// within a single `feed` call never touches that box. After a close frame or
/// an error the box holds only the terminal mark (a closing connection is not
/// idle, and this keeps the flag out of every open connection's state).
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    /// State of a frame or message that is incomplete, or the terminal mark; `None` when idle.
    partial: Option<Box<Partial>>,
}

impl Decoder {
    /// A decoder waiting for the first frame. Does not allocate.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Consume ALL of `input` (bytes read from the client socket, any
    /// chunking: 1 byte at a time, many frames at once, split anywhere),
    /// pushing every completed event to `out`, checking each frame against
    /// `limits`. After an error or after a Close event, further input is
    /// ignored (returns Ok and pushes nothing).
    ///
    /// On error, the events completed before the offending frame have already
    /// been pushed to `out`; the caller should still deliver them (or not)
    /// before failing the connection with [`ProtocolError::close_code`].
    /// Errors are reported as early as they are certain: header violations and
    /// limit violations as soon as the relevant header bytes arrive (before
    /// the payload buffer is allocated), invalid UTF-8 as soon as the received
    /// prefix of a text message cannot be completed to valid UTF-8.
    pub(crate) fn feed(
        &mut self,
        limits: &Limits,
        input: &[u8],
        out: &mut Vec<Incoming>,
    ) -> Result<(), ProtocolError> {
        if self.is_finished() || input.is_empty() {
            return Ok(());
        }
        let result = match self.partial.as_deref_mut() {
            Some(partial) => run(limits, partial, input, out),
            None => {
                // Fast path: work on a stack value and only box it if
                // something is left incomplete at the end of this chunk.
                let mut partial = Partial::default();
                let result = run(limits, &mut partial, input, out);
                if result == Ok(Flow::Continue) && !partial.is_idle() {
                    self.partial = Some(Box::new(partial));
                }
                result
            }
        };
        match result {
            Ok(Flow::Continue) => {
                if self.partial.as_deref().is_some_and(Partial::is_idle) {
                    self.partial = None;
                }
                Ok(())
            }
            Ok(Flow::Closed) => {
                self.finish();
                Ok(())
            }
            Err(err) => {
                self.finish();
                Err(err)
            }
        }
    }

    /// True after an error or a close frame: input is ignored from then on.
    pub(crate) fn is_finished(&self) -> bool {
        self.partial.as_deref().is_some_and(|p| p.finished)
    }

    /// True when no partial frame or partial message is held (so the
    /// connection holds no buffer while idle, or after the decoder finished).
    #[allow(dead_code)] // for the connection memory budget and tests
    pub(crate) fn is_idle(&self) -> bool {
        self.partial.as_deref().is_none_or(|p| p.finished)
    }

    /// Bytes currently buffered (partial frame payload + partial fragmented
    /// message), for memory accounting.
    ///
    /// This counts reserved capacity rather than received bytes, because the
    /// payload buffer is allocated at the announced frame length as soon as a
    /// header arrives: a header announcing 1 MiB costs 1 MiB before its
    /// payload does. Partial header bytes are counted too; the fixed-size box
    /// holding the partial state is not.
    #[allow(dead_code)] // for the connection memory budget and tests
    pub(crate) fn buffered(&self) -> usize {
        self.partial.as_deref().map_or(0, Partial::buffered)
    }

    /// Stops decoding for good and frees any partial frame or message (the connection is
    /// being closed for a reason of its own).
    pub(crate) fn abandon(&mut self) {
        self.finish();
    }

    /// Enters the terminal state, freeing any partial frame or message.
    fn finish(&mut self) {
        if !self.is_finished() {
            self.partial = Some(Box::new(Partial {
                finished: true,
                ..Partial::default()
            }));
        }
    }
}

/// Everything the decoder needs only while a frame or message is incomplete.
#[derive(Debug, Default)]
struct Partial {
    /// Header bytes received so far for the next frame.
    head: [u8; MAX_HEAD],
    /// Number of valid bytes in `head`.
    head_len: usize,
    /// The frame whose payload is being received, once its header is complete.
    frame: Option<Frame>,
    /// A fragmented message waiting for its next continuation frame. While a
    /// continuation frame's payload streams in, the message is moved into that
    /// [`Frame`] instead.
    msg: Option<Message>,
    /// The decoder's terminal mark (see [`Decoder`]): nothing else is held then.
    finished: bool,
}

impl Partial {
    /// No header bytes, no frame and no message: nothing worth keeping.
    fn is_idle(&self) -> bool {
        self.head_len == 0 && self.frame.is_none() && self.msg.is_none() && !self.finished
    }

    /// See [`Decoder::buffered`].
    #[allow(dead_code)] // for the connection memory budget and tests
    fn buffered(&self) -> usize {
        let frame = self.frame.as_ref().map_or(0, |frame| match &frame.body {
            Body::Control { buf, .. } => buf.capacity(),
            Body::Data(msg) => msg.buf.capacity(),
        });
        let msg = self.msg.as_ref().map_or(0, |msg| msg.buf.capacity());
        self.head_len + frame + msg
    }

    /// Copies header bytes from `input` until the header is complete (then
    /// sets `self.frame`) or `input` is exhausted. Returns the unread input.
    ///
    /// Checks run at three points so that errors surface as early as possible:
    /// after the first 2 bytes (flags, opcode, mask bit, 7-bit length), after
    /// the extended length (limits) and after the masking key.
    fn read_head<'a>(
        &mut self,
        mut input: &'a [u8],
        limits: &Limits,
    ) -> Result<&'a [u8], ProtocolError> {
        loop {
            let [_, b1, ..] = self.head;
            let have = self.head_len;
            let len_end = 2 + ext_len_size(b1);
            let need = if have < 2 {
                2
            } else if have < len_end {
                len_end
            } else {
                len_end + 4
            };
            let take = need.saturating_sub(have).min(input.len());
            let (src, rest) = input.split_at(take);
            for (dst, src) in self.head.iter_mut().skip(have).zip(src) {
                *dst = *src;
            }
            input = rest;
            self.head_len = have + take;
            if self.head_len < need {
                return Ok(input);
            }
            // Re-read: the bytes may have just arrived.
            let [b0, b1, ..] = self.head;
            let len_end = 2 + ext_len_size(b1);
            if need == 2 {
                check_first_bytes(b0, b1, self.msg.is_some())?;
            }
            if need == len_end {
                self.check_len(limits)?;
            }
            if need == len_end + 4 {
                self.start_frame(limits)?;
                self.head_len = 0;
                return Ok(input);
            }
        }
    }

    /// Checks the announced payload length against the limits. Runs as soon as
    /// the length bytes are complete, before the masking key and before any
    /// allocation.
    fn check_len(&self, limits: &Limits) -> Result<u64, ProtocolError> {
        let len = payload_len(&self.head)?;
        let max_frame = u64::try_from(limits.max_frame_size).unwrap_or(u64::MAX);
        if len > max_frame {
            return Err(ProtocolError::FrameTooBig {
                len,
                max: limits.max_frame_size,
            });
        }
        let [b0, ..] = self.head;
        if b0 & 0x08 == 0 {
            // Data frame (control opcodes all have bit 3 set).
            let so_far = self.msg.as_ref().map_or(0, |msg| msg.buf.len());
            let total = u64::try_from(so_far)
                .unwrap_or(u64::MAX)
                .saturating_add(len);
            if total > u64::try_from(limits.max_message_size).unwrap_or(u64::MAX) {
                return Err(ProtocolError::MessageTooBig {
                    len: total,
                    max: limits.max_message_size,
                });
            }
        }
        Ok(len)
    }

    /// Turns the complete header into a [`Frame`], allocating the payload
    /// buffer (all checks have passed by now).
    fn start_frame(&mut self, limits: &Limits) -> Result<(), ProtocolError> {
        let len64 = self.check_len(limits)?;
        let len = usize::try_from(len64).map_err(|_| ProtocolError::FrameTooBig {
            len: len64,
            max: limits.max_frame_size,
        })?;
        let [b0, b1, ..] = self.head;
        let key_at = 2 + ext_len_size(b1);
        let mut mask = [0u8; 4];
        for (dst, src) in mask.iter_mut().zip(self.head.iter().skip(key_at)) {
            *dst = *src;
        }
        let fin = b0 & 0x80 != 0;
        let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(ProtocolError::ReservedOpcode(b0 & 0x0F))?;
        let body = match opcode {
            OpCode::Close | OpCode::Ping | OpCode::Pong => Body::Control {
                opcode,
                buf: alloc_exact(len)?,
            },
            OpCode::Text | OpCode::Binary => Body::Data(Message {
                text: opcode == OpCode::Text,
                buf: alloc_exact(len)?,
                validated: 0,
            }),
            OpCode::Continuation => {
                let mut msg = self
                    .msg
                    .take()
                    .ok_or(ProtocolError::UnexpectedContinuation)?;
                grow_message(&mut msg.buf, len, fin, limits.max_message_size)?;
                Body::Data(msg)
            }
        };
        self.frame = Some(Frame {
            fin,
            mask,
            remaining: len,
            body,
        });
        Ok(())
    }
}

/// A frame whose header is complete and whose payload is being received.
#[derive(Debug)]
struct Frame {
    /// FIN bit: this frame ends its message.
    fin: bool,
    /// Masking key, rotated so that `mask[0]` applies to the next payload byte
    /// (this is how the key offset survives chunk boundaries).
    mask: [u8; 4],
    /// Payload bytes still to receive.
    remaining: usize,
    /// Where the unmasked payload goes.
    body: Body,
}

/// Destination of a frame's unmasked payload.
#[derive(Debug)]
enum Body {
    /// A control frame; its payload (≤ 125 bytes) is buffered on its own so
    /// that it can arrive between the fragments of a data message.
    Control {
        /// Close, Ping or Pong.
        opcode: OpCode,
        /// Payload received so far.
        buf: Vec<u8>,
    },
    /// A data frame; its payload is appended straight to the message, so
    /// neither an unfragmented message nor a continuation is ever copied
    /// again after unmasking.
    Data(Message),
}

/// A text or binary message being assembled.
///
/// The buffer is a `Vec<u8>` rather than a `BytesMut` because `Vec` offers
/// `try_reserve_exact`, which lets us control growth precisely (and fail
/// instead of aborting); `Bytes::from(Vec)` is zero-copy, just like
/// `BytesMut::freeze`.
#[derive(Debug)]
struct Message {
    /// Text (UTF-8 validated) or binary.
    text: bool,
    /// Unmasked payload of all fragments so far.
    buf: Vec<u8>,
    /// For text: length of the prefix of `buf` known to be valid UTF-8, so
    /// each byte is checked by the incremental validation only once (plus at
    /// most 3 bytes of an incomplete trailing character).
    validated: usize,
}

impl Message {
    /// Validates the not-yet-validated tail of a text message that is not yet
    /// complete. An incomplete character at the very end is fine (the rest
    /// may follow); anything else that is invalid fails the message now.
    fn validate_partial(&mut self) -> Result<(), ProtocolError> {
        let tail = self.buf.get(self.validated..).unwrap_or_default();
        match std::str::from_utf8(tail) {
            Ok(_) => self.validated = self.buf.len(),
            Err(err) if err.error_len().is_none() => self.validated += err.valid_up_to(),
            Err(_) => return Err(ProtocolError::InvalidUtf8),
        }
        Ok(())
    }

    /// Converts the complete message into an event (zero-copy).
    ///
    /// The final UTF-8 check re-validates the whole text (through
    /// `ByteString::try_from`): safe code has no way to build a `ByteString`
    /// without validating, and UTF-8 validation runs at several GB/s, so this
    /// is cheaper than keeping a separate code path. A message that arrives
    /// within one `feed` call is validated only here, once.
    fn into_event(self) -> Result<Incoming, ProtocolError> {
        let bytes = Bytes::from(self.buf);
        if self.text {
            ByteString::try_from(bytes)
                .map(Incoming::Text)
                .map_err(|_| ProtocolError::InvalidUtf8)
        } else {
            Ok(Incoming::Binary(bytes))
        }
    }
}

/// Decodes as much of `input` as possible into `partial`, pushing completed
/// events to `out`.
fn run(
    limits: &Limits,
    partial: &mut Partial,
    mut input: &[u8],
    out: &mut Vec<Incoming>,
) -> Result<Flow, ProtocolError> {
    loop {
        let Some(frame) = partial.frame.as_mut() else {
            if input.is_empty() {
                return Ok(Flow::Continue);
            }
            input = partial.read_head(input, limits)?;
            if partial.frame.is_none() {
                return Ok(Flow::Continue);
            }
            continue;
        };
        if frame.remaining > 0 {
            if input.is_empty() {
                return Ok(Flow::Continue);
            }
            let n = frame.remaining.min(input.len());
            let (chunk, rest) = input.split_at(n);
            input = rest;
            frame.remaining -= n;
            match &mut frame.body {
                Body::Control { buf, .. } => unmask_extend(buf, chunk, &mut frame.mask),
                Body::Data(msg) => {
                    unmask_extend(&mut msg.buf, chunk, &mut frame.mask);
                    // Fail fast on invalid UTF-8 while the message is still
                    // incomplete; the chunk that completes the message is left
                    // to the final (full) check in `Message::into_event`.
                    let completes_message = frame.fin && frame.remaining == 0;
                    if msg.text && !completes_message {
                        msg.validate_partial()?;
                    }
                }
            }
            if frame.remaining > 0 {
                return Ok(Flow::Continue);
            }
        }
        // The frame is complete.
        let Some(frame) = partial.frame.take() else {
            return Ok(Flow::Continue);
        };
        match frame.body {
            Body::Control { opcode, buf } => match opcode {
                OpCode::Ping => out.push(Incoming::Ping(Bytes::from(buf))),
                OpCode::Pong => out.push(Incoming::Pong(Bytes::from(buf))),
                _ => {
                    out.push(Incoming::Close(parse_close(&buf)?));
                    return Ok(Flow::Closed);
                }
            },
            Body::Data(msg) => {
                if frame.fin {
                    out.push(msg.into_event()?);
                } else {
                    partial.msg = Some(msg);
                }
            }
        }
    }
}

/// Number of extended payload length bytes implied by the 7-bit length field
/// in the second header byte.
fn ext_len_size(b1: u8) -> usize {
    match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    }
}

/// Checks everything that the first two header bytes determine.
fn check_first_bytes(b0: u8, b1: u8, msg_in_progress: bool) -> Result<(), ProtocolError> {
    let rsv = (b0 >> 4) & 0x07;
    if rsv != 0 {
        return Err(ProtocolError::ReservedBits(rsv));
    }
    let raw_opcode = b0 & 0x0F;
    let opcode = OpCode::from_u8(raw_opcode).ok_or(ProtocolError::ReservedOpcode(raw_opcode))?;
    if b1 & 0x80 == 0 {
        return Err(ProtocolError::UnmaskedFrame);
    }
    let fin = b0 & 0x80 != 0;
    match opcode {
        OpCode::Close | OpCode::Ping | OpCode::Pong => {
            if !fin {
                return Err(ProtocolError::FragmentedControlFrame);
            }
            if b1 & 0x7F > 125 {
                return Err(ProtocolError::ControlFrameTooLong);
            }
        }
        OpCode::Continuation => {
            if !msg_in_progress {
                return Err(ProtocolError::UnexpectedContinuation);
            }
        }
        OpCode::Text | OpCode::Binary => {
            if msg_in_progress {
                return Err(ProtocolError::ExpectedContinuation);
            }
        }
    }
    Ok(())
}

/// Decodes the payload length from a header whose length bytes are complete.
/// Non-minimal encodings are accepted (RFC 6455 only requires senders to be
/// minimal, and Autobahn does not test for it).
fn payload_len(head: &[u8; MAX_HEAD]) -> Result<u64, ProtocolError> {
    let [_, b1, x0, x1, x2, x3, x4, x5, x6, x7, ..] = *head;
    match b1 & 0x7F {
        126 => Ok(u64::from(u16::from_be_bytes([x0, x1]))),
        127 => {
            let len = u64::from_be_bytes([x0, x1, x2, x3, x4, x5, x6, x7]);
            if len >> 63 != 0 {
                Err(ProtocolError::InvalidLength)
            } else {
                Ok(len)
            }
        }
        n => Ok(u64::from(n)),
    }
}

/// Allocates a buffer for exactly `len` bytes, failing (instead of aborting)
/// if the allocator refuses.
fn alloc_exact(len: usize) -> Result<Vec<u8>, ProtocolError> {
    let mut buf = Vec::new();
    buf.try_reserve_exact(len)
        .map_err(|_| ProtocolError::AllocationFailed(len))?;
    Ok(buf)
}

/// Makes room in a fragmented message for a continuation of `extra` bytes.
///
/// The final fragment grows the buffer to exactly the message length. For
/// other fragments the capacity at least doubles (so many tiny fragments cost
/// amortised O(n) copying, not O(n²)) but never beyond `max`, which the
/// caller has already checked the new length against.
fn grow_message(
    buf: &mut Vec<u8>,
    extra: usize,
    fin: bool,
    max: usize,
) -> Result<(), ProtocolError> {
    let needed = buf.len().saturating_add(extra);
    if needed <= buf.capacity() {
        return Ok(());
    }
    let target = if fin {
        needed
    } else {
        buf.capacity()
            .saturating_mul(2)
            .clamp(needed, max.max(needed))
    };
    buf.try_reserve_exact(target.saturating_sub(buf.len()))
        .map_err(|_| ProtocolError::AllocationFailed(target))
}

/// Appends `src` to `dst`, unmasking it with `mask`, and rotates `mask` so it
/// lines up with the byte after `src`.
fn unmask_extend(dst: &mut Vec<u8>, src: &[u8], mask: &mut [u8; 4]) {
    let start = dst.len();
    dst.extend_from_slice(src);
    if let Some(tail) = dst.get_mut(start..) {
        apply_mask(tail, *mask);
    }
    mask.rotate_left(src.len() % 4);
}

/// XORs `buf` with the repeating 4-byte `mask`, starting at `mask[0]`.
///
/// Works on 8-byte words (the compiler vectorises the word loop further);
/// byte order does not matter because the mask word is built from the same
/// byte sequence the data word is loaded from.
fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let [m0, m1, m2, m3] = mask;
    let word = u64::from_ne_bytes([m0, m1, m2, m3, m0, m1, m2, m3]);
    let (words, rest) = buf.as_chunks_mut::<8>();
    for chunk in words {
        *chunk = (u64::from_ne_bytes(*chunk) ^ word).to_ne_bytes();
    }
    // `rest` starts at a multiple of 8, so the key is still aligned.
    for (byte, key) in rest.iter_mut().zip(mask.iter().cycle()) {
        *byte ^= key;
    }
}

/// Parses and validates a close frame payload.
fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::CloseFrameTooShort),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            let reason =
                std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidCloseReason)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The masking key from the examples in RFC 6455 §5.7.
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// How a test frame encodes its payload length.
    #[derive(Clone, Copy)]
    enum Len {
        /// Shortest encoding.
        Minimal,
        /// Always the 16-bit form (non-minimal for < 126).
        Ext16,
        /// Always the 64-bit form (non-minimal for < 65536).
        Ext64,
        /// 64-bit form announcing this length regardless of the payload.
        Raw64(u64),
    }

    /// Builds a client frame with full control over every header field.
    fn frame_with(b0: u8, len: Len, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![b0];
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        let n = payload.len();
        match len {
            Len::Minimal if n <= 125 => out.push(mask_bit | n as u8),
            Len::Minimal if n <= 0xFFFF => {
                out.push(mask_bit | 126);
                out.extend((n as u16).to_be_bytes());
            }
            Len::Minimal | Len::Ext64 => {
                out.push(mask_bit | 127);
                out.extend((n as u64).to_be_bytes());
            }
            Len::Ext16 => {
                out.push(mask_bit | 126);
                out.extend((n as u16).to_be_bytes());
            }
            Len::Raw64(announced) => {
                out.push(mask_bit | 127);
                out.extend(announced.to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                out.extend(key);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => out.extend(payload),
        }
        out
    }

    /// Builds a client frame: FIN flag, RSV bits (0–7), raw opcode, payload,
    /// optional masking key (None = unmasked, a protocol violation).
    fn client_frame(
        fin: bool,
        rsv: u8,
        opcode: u8,
        payload: &[u8],
        mask: Option<[u8; 4]>,
    ) -> Vec<u8> {
        let b0 = (u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0x0F);
        frame_with(b0, Len::Minimal, payload, mask)
    }

    /// A valid masked frame with the standard test key.
    fn masked(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        client_frame(fin, 0, opcode.as_u8(), payload, Some(MASK))
    }

    /// A decoder with its limits, so the tests can feed it as a connection does.
    struct TestDecoder {
        dec: Decoder,
        limits: Limits,
    }

    impl TestDecoder {
        fn new(limits: Limits) -> Self {
            TestDecoder {
                dec: Decoder::new(),
                limits,
            }
        }

        fn feed(&mut self, input: &[u8], out: &mut Vec<Incoming>) -> Result<(), ProtocolError> {
            self.dec.feed(&self.limits, input, out)
        }
    }

    impl std::ops::Deref for TestDecoder {
        type Target = Decoder;
        fn deref(&self) -> &Decoder {
            &self.dec
        }
    }

    impl std::ops::DerefMut for TestDecoder {
        fn deref_mut(&mut self) -> &mut Decoder {
            &mut self.dec
        }
    }

    /// Feeds `input` in one call to a fresh decoder with default limits.
    fn decode(input: &[u8]) -> (Vec<Incoming>, Result<(), ProtocolError>) {
        decode_with(Limits::default(), input)
    }

    /// Feeds `input` in one call to a fresh decoder.
    fn decode_with(limits: Limits, input: &[u8]) -> (Vec<Incoming>, Result<(), ProtocolError>) {
        let mut dec = TestDecoder::new(limits);
        let mut out = Vec::new();
        let res = dec.feed(input, &mut out);
        (out, res)
    }

    /// Feeds `input` split at the given ascending cut points; returns the
    /// events and the first error. Also checks that nothing is emitted after
    /// the first error.
    fn decode_split(
        limits: Limits,
        input: &[u8],
        cuts: &[usize],
    ) -> (Vec<Incoming>, Result<(), ProtocolError>) {
        let mut dec = TestDecoder::new(limits);
        let mut out = Vec::new();
        let mut res = Ok(());
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let r = dec.feed(&input[start..cut], &mut out);
            if res.is_ok() {
                res = r;
            } else {
                assert_eq!(r, Ok(()), "feed after error must be ignored");
            }
            start = cut;
        }
        (out, res)
    }

    /// Feeds one byte at a time.
    fn decode_bytewise(limits: Limits, input: &[u8]) -> (Vec<Incoming>, Result<(), ProtocolError>) {
        let cuts: Vec<usize> = (1..input.len()).collect();
        decode_split(limits, input, &cuts)
    }

    /// Random ascending cut points.
    fn random_cuts(rng: &mut fastrand::Rng, len: usize) -> Vec<usize> {
        if len < 2 {
            return Vec::new();
        }
        let count = rng.usize(0..=len.min(12));
        let mut cuts: Vec<usize> = (0..count).map(|_| rng.usize(0..=len)).collect();
        cuts.sort_unstable();
        cuts
    }

    /// Text event helper.
    fn text(s: &str) -> Incoming {
        Incoming::Text(ByteString::from(s))
    }

    /// Binary event helper.
    fn binary(b: &[u8]) -> Incoming {
        Incoming::Binary(Bytes::copy_from_slice(b))
    }

    /// The error code of a decode result.
    fn code(res: Result<(), ProtocolError>) -> u16 {
        res.unwrap_err().close_code()
    }

    #[test]
    fn rfc_example_hello() {
        let input = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(masked(true, OpCode::Text, b"Hello"), input);
        assert_eq!(decode(&input), (vec![text("Hello")], Ok(())));
    }

    #[test]
    fn simple_messages() {
        let mut input = masked(true, OpCode::Text, "héllo wörld".as_bytes());
        input.extend(masked(true, OpCode::Binary, &[0, 1, 2, 255]));
        input.extend(masked(true, OpCode::Text, b""));
        input.extend(masked(true, OpCode::Binary, b""));
        input.extend(masked(true, OpCode::Ping, b"p"));
        input.extend(masked(true, OpCode::Pong, b""));
        let (out, res) = decode(&input);
        res.unwrap();
        assert_eq!(
            out,
            vec![
                text("héllo wörld"),
                binary(&[0, 1, 2, 255]),
                text(""),
                binary(b""),
                Incoming::Ping(Bytes::from_static(b"p")),
                Incoming::Pong(Bytes::new()),
            ]
        );
    }

    #[test]
    fn length_encodings() {
        for n in [0usize, 1, 125, 126, 127, 65535, 65536, 100_000] {
            let payload: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            let frame = masked(true, OpCode::Binary, &payload);
            let expected_head = match n {
                0..=125 => 6,
                126..=65535 => 8,
                _ => 14,
            };
            assert_eq!(frame.len(), expected_head + n);
            assert_eq!(decode(&frame), (vec![binary(&payload)], Ok(())), "len {n}");
        }
    }

    #[test]
    fn non_minimal_lengths_accepted() {
        for form in [Len::Ext16, Len::Ext64] {
            for n in [0usize, 5, 125, 126] {
                let payload = vec![b'a'; n];
                let frame = frame_with(0x81, form, &payload, Some(MASK));
                let (out, res) = decode(&frame);
                res.unwrap();
                assert_eq!(out, vec![text(&"a".repeat(n))]);
            }
        }
    }

    #[test]
    fn unmasked_frame_rejected() {
        for opcode in [OpCode::Text, OpCode::Binary, OpCode::Ping, OpCode::Close] {
            let frame = client_frame(true, 0, opcode.as_u8(), b"hi", None);
            let (out, res) = decode(&frame);
            assert!(out.is_empty());
            assert_eq!(res, Err(ProtocolError::UnmaskedFrame));
            assert_eq!(code(res), 1002);
        }
    }

    #[test]
    fn reserved_bits_rejected() {
        for rsv in 1..8u8 {
            for opcode in [OpCode::Text, OpCode::Ping] {
                let frame = client_frame(true, rsv, opcode.as_u8(), b"x", Some(MASK));
                let res = decode(&frame).1;
                assert_eq!(res, Err(ProtocolError::ReservedBits(rsv)));
                assert_eq!(code(res), 1002);
            }
        }
    }

    #[test]
    fn opcodes() {
        for raw in 0..16u8 {
            let parsed = OpCode::from_u8(raw);
            if let Some(op) = parsed {
                assert_eq!(op.as_u8(), raw);
                assert_eq!(op.is_control(), raw >= 8);
            } else {
                assert!(matches!(raw, 3..=7 | 11..=15));
                let frame = client_frame(true, 0, raw, b"", Some(MASK));
                let res = decode(&frame).1;
                assert_eq!(res, Err(ProtocolError::ReservedOpcode(raw)));
                assert_eq!(code(res), 1002);
            }
        }
    }

    #[test]
    fn control_frame_rules() {
        // 125 bytes is fine.
        let payload = [b'x'; 125];
        let (out, res) = decode(&masked(true, OpCode::Ping, &payload));
        res.unwrap();
        assert_eq!(out, vec![Incoming::Ping(Bytes::copy_from_slice(&payload))]);
        // 126 bytes is not, for every control opcode, and the error comes
        // from the first two header bytes alone.
        for op in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
            let frame = masked(true, op, &[b'x'; 126]);
            let res = decode(&frame[..2]).1;
            assert_eq!(res, Err(ProtocolError::ControlFrameTooLong));
            assert_eq!(code(res), 1002);
            // Fragmented control frames.
            let res = decode(&masked(false, op, b"")).1;
            assert_eq!(res, Err(ProtocolError::FragmentedControlFrame));
            assert_eq!(code(res), 1002);
        }
    }

    #[test]
    fn continuation_rules() {
        let res = decode(&masked(true, OpCode::Continuation, b"x")).1;
        assert_eq!(res, Err(ProtocolError::UnexpectedContinuation));
        assert_eq!(code(res), 1002);
        let res = decode(&masked(false, OpCode::Continuation, b"x")).1;
        assert_eq!(res, Err(ProtocolError::UnexpectedContinuation));

        for second in [OpCode::Text, OpCode::Binary] {
            let mut input = masked(false, OpCode::Text, b"a");
            input.extend(masked(true, second, b"b"));
            let (out, res) = decode(&input);
            assert!(out.is_empty());
            assert_eq!(res, Err(ProtocolError::ExpectedContinuation));
            assert_eq!(code(res), 1002);
        }

        // A continuation after a complete message is unexpected again.
        let mut input = masked(false, OpCode::Text, b"a");
        input.extend(masked(true, OpCode::Continuation, b"b"));
        input.extend(masked(true, OpCode::Continuation, b"c"));
        let (out, res) = decode(&input);
        assert_eq!(out, vec![text("ab")]);
        assert_eq!(res, Err(ProtocolError::UnexpectedContinuation));
    }

    #[test]
    fn length_msb_rejected() {
        let frame = frame_with(0x82, Len::Raw64(1 << 63), b"", Some(MASK));
        // Error as soon as the 8 length bytes are in.
        let res = decode(&frame[..10]).1;
        assert_eq!(res, Err(ProtocolError::InvalidLength));
        assert_eq!(code(res), 1002);
        let res = decode(&frame_with(0x82, Len::Raw64(u64::MAX), b"", Some(MASK))).1;
        assert_eq!(res, Err(ProtocolError::InvalidLength));
    }

    #[test]
    fn frame_limit() {
        let limits = Limits {
            max_frame_size: 100,
            max_message_size: 1000,
        };
        let res = decode_with(limits, &masked(true, OpCode::Binary, &[0; 100])).1;
        res.unwrap();
        let res = decode_with(limits, &masked(true, OpCode::Binary, &[0; 101])).1;
        assert_eq!(res, Err(ProtocolError::FrameTooBig { len: 101, max: 100 }));
        assert_eq!(code(res), 1009);
        // Control frames are frames too.
        let small = Limits {
            max_frame_size: 10,
            max_message_size: 10,
        };
        let res = decode_with(small, &masked(true, OpCode::Ping, &[0; 11])).1;
        assert_eq!(code(res), 1009);
        // A frame exceeding only the message limit.
        let res = decode_with(small, &masked(true, OpCode::Text, &[b'a'; 10])).1;
        res.unwrap();
        let limits = Limits {
            max_frame_size: 100,
            max_message_size: 50,
        };
        let res = decode_with(limits, &masked(true, OpCode::Text, &[b'a'; 51])).1;
        assert_eq!(res, Err(ProtocolError::MessageTooBig { len: 51, max: 50 }));
        assert_eq!(code(res), 1009);
    }

    #[test]
    fn huge_header_fails_before_allocation() {
        // Announces 2^40 bytes; only the 10 header bytes up to the length are
        // fed (no mask key, no payload). Must fail right there.
        let frame = frame_with(0x82, Len::Raw64(1 << 40), b"", Some(MASK));
        let mut dec = TestDecoder::new(Limits::default());
        let mut out = Vec::new();
        for (i, byte) in frame[..10].iter().enumerate() {
            let res = dec.feed(&[*byte], &mut out);
            if i < 9 {
                res.unwrap();
                assert!(dec.buffered() <= MAX_HEAD);
            } else {
                assert_eq!(
                    res,
                    Err(ProtocolError::FrameTooBig {
                        len: 1 << 40,
                        max: 1 << 20
                    })
                );
            }
        }
        assert!(dec.is_idle());
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn message_limit_checked_at_continuation_header() {
        let limits = Limits {
            max_frame_size: 100,
            max_message_size: 150,
        };
        let mut dec = TestDecoder::new(limits);
        let mut out = Vec::new();
        dec.feed(&masked(false, OpCode::Binary, &[1; 100]), &mut out)
            .unwrap();
        dec.feed(&masked(false, OpCode::Continuation, &[2; 50]), &mut out)
            .unwrap();
        // The next continuation announces 1 byte: 151 > 150. Only its first
        // two header bytes are fed.
        let next = masked(true, OpCode::Continuation, &[3]);
        let res = dec.feed(&next[..2], &mut out);
        assert_eq!(
            res,
            Err(ProtocolError::MessageTooBig { len: 151, max: 150 })
        );
        assert!(out.is_empty());
        assert!(dec.is_idle());
        // Exactly at the limit is fine.
        let mut dec = TestDecoder::new(limits);
        dec.feed(&masked(false, OpCode::Binary, &[1; 100]), &mut out)
            .unwrap();
        dec.feed(&masked(true, OpCode::Continuation, &[2; 50]), &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn fragmentation_with_interleaved_control_frames() {
        let mut input = masked(false, OpCode::Text, b"Hel");
        input.extend(masked(true, OpCode::Ping, b"ping1"));
        input.extend(masked(false, OpCode::Continuation, b"lo, "));
        input.extend(masked(true, OpCode::Pong, b""));
        input.extend(masked(false, OpCode::Continuation, b""));
        input.extend(masked(true, OpCode::Ping, b""));
        input.extend(masked(true, OpCode::Continuation, b"world"));
        input.extend(masked(false, OpCode::Binary, &[1, 2]));
        input.extend(masked(true, OpCode::Continuation, &[3]));
        let (out, res) = decode(&input);
        res.unwrap();
        assert_eq!(
            out,
            vec![
                Incoming::Ping(Bytes::from_static(b"ping1")),
                Incoming::Pong(Bytes::new()),
                Incoming::Ping(Bytes::new()),
                text("Hello, world"),
                binary(&[1, 2, 3]),
            ]
        );
    }

    #[test]
    fn close_in_the_middle_of_a_fragmented_message() {
        let mut input = masked(false, OpCode::Text, b"abc");
        input.extend(masked(true, OpCode::Close, &1000u16.to_be_bytes()));
        input.extend(masked(true, OpCode::Continuation, b"def"));
        let (out, res) = decode(&input);
        res.unwrap();
        assert_eq!(out, vec![Incoming::Close(Some((1000, String::new())))]);
    }

    #[test]
    fn utf8_split_inside_char_across_fragments() {
        // "€" is E2 82 AC; "𝄞" is F0 9D 84 9E.
        let whole = "a€b𝄞c".as_bytes();
        for cut1 in 0..=whole.len() {
            for cut2 in cut1..=whole.len() {
                let mut input = masked(false, OpCode::Text, &whole[..cut1]);
                input.extend(masked(false, OpCode::Continuation, &whole[cut1..cut2]));
                input.extend(masked(true, OpCode::Continuation, &whole[cut2..]));
                assert_eq!(decode(&input), (vec![text("a€b𝄞c")], Ok(())));
                let (out, res) = decode_bytewise(Limits::default(), &input);
                assert_eq!((out, res), (vec![text("a€b𝄞c")], Ok(())));
            }
        }
    }

    #[test]
    fn utf8_fails_fast_on_the_fragment_where_the_error_is_certain() {
        let mut dec = TestDecoder::new(Limits::default());
        let mut out = Vec::new();
        // F4 is a valid lead byte (U+100000..U+10FFFF): incomplete, not invalid.
        dec.feed(&masked(false, OpCode::Text, b"ok\xF4"), &mut out)
            .unwrap();
        // F4 90 would be above U+10FFFF: certain error on this fragment,
        // although it is not the final one.
        let res = dec.feed(
            &masked(false, OpCode::Continuation, b"\x90\x80\x80"),
            &mut out,
        );
        assert_eq!(res, Err(ProtocolError::InvalidUtf8));
        assert_eq!(code(res), 1007);
        assert!(out.is_empty());
        // Ignored afterwards.
        dec.feed(&masked(true, OpCode::Continuation, b"z"), &mut out)
            .unwrap();
        assert!(out.is_empty());

        // Invalid in the first fragment.
        let res = decode(&masked(false, OpCode::Text, b"a\xFFb")).1;
        assert_eq!(res, Err(ProtocolError::InvalidUtf8));
        // Overlong encoding, surrogate.
        for bad in [&b"\xC0\xAF"[..], b"\xED\xA0\x80", b"\xF5", b"\x80"] {
            let res = decode(&masked(false, OpCode::Text, bad)).1;
            assert_eq!(res, Err(ProtocolError::InvalidUtf8), "{bad:?}");
            let res = decode(&masked(true, OpCode::Text, bad)).1;
            assert_eq!(res, Err(ProtocolError::InvalidUtf8), "{bad:?}");
        }
    }

    #[test]
    fn utf8_incomplete_at_end_of_final_fragment() {
        let mut input = masked(false, OpCode::Text, b"a\xE2");
        input.extend(masked(true, OpCode::Continuation, b"\x82"));
        assert_eq!(decode(&input).1, Err(ProtocolError::InvalidUtf8));
        // Also with an empty final fragment, and unfragmented.
        let mut input = masked(false, OpCode::Text, b"a\xE2\x82");
        input.extend(masked(true, OpCode::Continuation, b""));
        assert_eq!(decode(&input).1, Err(ProtocolError::InvalidUtf8));
        assert_eq!(
            decode(&masked(true, OpCode::Text, b"a\xE2\x82")).1,
            Err(ProtocolError::InvalidUtf8)
        );
    }

    #[test]
    fn utf8_fails_fast_mid_frame() {
        let mut payload = b"valid start ".to_vec();
        payload.push(0xFF);
        payload.extend([b'x'; 1000]);
        let frame = masked(true, OpCode::Text, &payload);
        let mut dec = TestDecoder::new(Limits::default());
        let mut out = Vec::new();
        // Header (8 bytes) plus the first 13 payload bytes, which include 0xFF.
        let res = dec.feed(&frame[..8 + 13], &mut out);
        assert_eq!(res, Err(ProtocolError::InvalidUtf8));
        // Binary frames are not validated.
        let (out, res) = decode(&masked(true, OpCode::Binary, &payload));
        res.unwrap();
        assert_eq!(out, vec![binary(&payload)]);
    }

    /// Close codes that must be accepted (Autobahn 7.7.x plus the rest of the
    /// registered range).
    const VALID_CODES: &[u16] = &[
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000,
        4999,
    ];

    /// Close codes that must be rejected (Autobahn 7.9.x and more).
    const INVALID_CODES: &[u16] = &[
        0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ];

    #[test]
    fn close_codes() {
        for &c in VALID_CODES {
            assert!(is_valid_close_code(c), "{c}");
            let mut payload = c.to_be_bytes().to_vec();
            payload.extend("bye ✓".as_bytes());
            let (out, res) = decode(&masked(true, OpCode::Close, &payload));
            res.unwrap();
            assert_eq!(out, vec![Incoming::Close(Some((c, "bye ✓".to_owned())))]);
            let (out, res) = decode(&masked(true, OpCode::Close, &c.to_be_bytes()));
            res.unwrap();
            assert_eq!(out, vec![Incoming::Close(Some((c, String::new())))]);
        }
        for &c in INVALID_CODES {
            assert!(!is_valid_close_code(c), "{c}");
            let res = decode(&masked(true, OpCode::Close, &c.to_be_bytes())).1;
            assert_eq!(res, Err(ProtocolError::InvalidCloseCode(c)));
            assert_eq!(code(res), 1002);
        }
        // Whole ranges.
        for c in 0..=u16::MAX {
            let expected = matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999);
            assert_eq!(is_valid_close_code(c), expected, "{c}");
        }
    }

    #[test]
    fn close_payload_rules() {
        let (out, res) = decode(&masked(true, OpCode::Close, b""));
        res.unwrap();
        assert_eq!(out, vec![Incoming::Close(None)]);

        let res = decode(&masked(true, OpCode::Close, &[0x03])).1;
        assert_eq!(res, Err(ProtocolError::CloseFrameTooShort));
        assert_eq!(code(res), 1002);

        let res = decode(&masked(true, OpCode::Close, b"\x03\xe8ab\xFFcd")).1;
        assert_eq!(res, Err(ProtocolError::InvalidCloseReason));
        assert_eq!(code(res), 1007);

        // Max size reason.
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend([b'r'; 123]);
        let (out, res) = decode(&masked(true, OpCode::Close, &payload));
        res.unwrap();
        assert_eq!(out, vec![Incoming::Close(Some((1000, "r".repeat(123))))]);
    }

    #[test]
    fn input_after_close_is_ignored() {
        let mut input = masked(true, OpCode::Text, b"before");
        input.extend(masked(true, OpCode::Close, b""));
        input.extend(masked(true, OpCode::Text, b"after"));
        input.extend([0xFF; 20]); // garbage
        let mut dec = TestDecoder::new(Limits::default());
        let mut out = Vec::new();
        dec.feed(&input, &mut out).unwrap();
        assert_eq!(out, vec![text("before"), Incoming::Close(None)]);
        assert!(dec.is_idle());
        dec.feed(&masked(true, OpCode::Text, b"later"), &mut out)
            .unwrap();
        dec.feed(&[0xFF; 20], &mut out).unwrap();
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn input_after_error_is_ignored() {
        let mut input = masked(true, OpCode::Text, b"first");
        input.extend(client_frame(true, 0, 1, b"unmasked", None));
        input.extend(masked(true, OpCode::Text, b"after"));
        let mut dec = TestDecoder::new(Limits::default());
        let mut out = Vec::new();
        assert_eq!(
            dec.feed(&input, &mut out),
            Err(ProtocolError::UnmaskedFrame)
        );
        assert_eq!(out, vec![text("first")]);
        assert!(dec.is_idle());
        assert_eq!(dec.buffered(), 0);
        dec.feed(&masked(true, OpCode::Text, b"later"), &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn idle_and_buffered() {
        let mut dec = TestDecoder::new(Limits::default());
        let mut out = Vec::new();
        assert!(dec.is_idle());
        assert_eq!(dec.buffered(), 0);
        dec.feed(&[], &mut out).unwrap();
        assert!(dec.is_idle());

        let frame = masked(true, OpCode::Binary, &[7; 300]);
        // Partial header.
        dec.feed(&frame[..1], &mut out).unwrap();
        assert!(!dec.is_idle());
        assert_eq!(dec.buffered(), 1);
        dec.feed(&frame[1..4], &mut out).unwrap();
        assert_eq!(dec.buffered(), 4);
        // Header complete: the payload buffer is reserved in full.
        dec.feed(&frame[4..8], &mut out).unwrap();
        assert!(!dec.is_idle());
        assert_eq!(dec.buffered(), 300);
        // Mid-payload.
        dec.feed(&frame[8..100], &mut out).unwrap();
        assert!(!dec.is_idle());
        assert_eq!(dec.buffered(), 300);
        dec.feed(&frame[100..], &mut out).unwrap();
        assert!(dec.is_idle());
        assert_eq!(dec.buffered(), 0);
        assert_eq!(out, vec![binary(&[7; 300])]);

        // Between fragments the decoder is not idle.
        dec.feed(&masked(false, OpCode::Text, b"abc"), &mut out)
            .unwrap();
        assert!(!dec.is_idle());
        assert_eq!(dec.buffered(), 3);
        dec.feed(&masked(true, OpCode::Ping, b""), &mut out)
            .unwrap();
        assert!(!dec.is_idle());
        dec.feed(&masked(true, OpCode::Continuation, b"d"), &mut out)
            .unwrap();
        assert!(dec.is_idle());
        assert_eq!(dec.buffered(), 0);

        // Many frames in one chunk ending at a boundary: idle.
        let mut input = Vec::new();
        for _ in 0..10 {
            input.extend(masked(true, OpCode::Text, b"x"));
        }
        dec.feed(&input, &mut out).unwrap();
        assert!(dec.is_idle());
    }

    #[test]
    fn fragmented_message_capacity_stays_within_limit() {
        let limits = Limits {
            max_frame_size: 1 << 20,
            max_message_size: 1000,
        };
        let mut dec = TestDecoder::new(limits);
        let mut out = Vec::new();
        dec.feed(&masked(false, OpCode::Binary, &[0; 1]), &mut out)
            .unwrap();
        for _ in 0..998 {
            dec.feed(&masked(false, OpCode::Continuation, &[1]), &mut out)
                .unwrap();
            assert!(dec.buffered() <= 1000);
        }
        dec.feed(&masked(true, OpCode::Continuation, &[2]), &mut out)
            .unwrap();
        let [Incoming::Binary(msg)] = out.as_slice() else {
            panic!("{out:?}");
        };
        assert_eq!(msg.len(), 1000);
    }

    #[test]
    fn decoder_is_small() {
        // One pointer: every open connection holds one.
        assert_eq!(std::mem::size_of::<Decoder>(), std::mem::size_of::<usize>());
    }

    #[test]
    fn apply_mask_matches_naive() {
        let mut rng = fastrand::Rng::with_seed(7);
        for len in 0..70 {
            let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let key = [rng.u8(..), rng.u8(..), rng.u8(..), rng.u8(..)];
            let mut fast = data.clone();
            apply_mask(&mut fast, key);
            let naive: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            assert_eq!(fast, naive);
        }
    }

    /// A varied valid stream and the events it must produce.
    fn sample_stream() -> (Vec<u8>, Vec<Incoming>) {
        let mut input = Vec::new();
        let mut events = Vec::new();
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
        input.extend(client_frame(true, 0, 2, &big, Some([1, 2, 3, 4])));
        events.push(binary(&big));
        input.extend(masked(true, OpCode::Text, "ünïcödé".as_bytes()));
        events.push(text("ünïcödé"));
        let medium = "€".repeat(100);
        input.extend(frame_with(
            0x81,
            Len::Ext64,
            medium.as_bytes(),
            Some([9, 8, 7, 6]),
        ));
        events.push(text(&medium));
        input.extend(masked(false, OpCode::Text, &"a€".as_bytes()[..2]));
        input.extend(masked(true, OpCode::Ping, b"mid"));
        events.push(Incoming::Ping(Bytes::from_static(b"mid")));
        input.extend(masked(false, OpCode::Continuation, &"a€".as_bytes()[2..]));
        input.extend(masked(
            true,
            OpCode::Continuation,
            "𝄞".repeat(40).as_bytes(),
        ));
        events.push(text(&format!("a€{}", "𝄞".repeat(40))));
        input.extend(masked(true, OpCode::Binary, b""));
        events.push(binary(b""));
        input.extend(masked(true, OpCode::Pong, &[0xAB; 125]));
        events.push(Incoming::Pong(Bytes::from_static(&[0xAB; 125])));
        input.extend(masked(false, OpCode::Binary, &[1; 300]));
        input.extend(masked(true, OpCode::Continuation, &[2; 3]));
        let mut msg = vec![1; 300];
        msg.extend([2; 3]);
        events.push(binary(&msg));
        let mut close = 4000u16.to_be_bytes().to_vec();
        close.extend(b"done");
        input.extend(masked(true, OpCode::Close, &close));
        events.push(Incoming::Close(Some((4000, "done".to_owned()))));
        (input, events)
    }

    #[test]
    fn any_split_gives_the_same_events() {
        let (input, events) = sample_stream();
        let limits = Limits::default();
        assert_eq!(decode_with(limits, &input), (events.clone(), Ok(())));
        assert_eq!(decode_bytewise(limits, &input), (events.clone(), Ok(())));
        // Every single split point in the small-frame tail, and a sample of
        // split points in the big first frame.
        let tail_start = 14 + 70_000;
        for cut in (0..tail_start).step_by(997).chain(tail_start..=input.len()) {
            assert_eq!(
                decode_split(limits, &input, &[cut]),
                (events.clone(), Ok(())),
                "cut {cut}"
            );
        }
        let mut rng = fastrand::Rng::with_seed(42);
        for _ in 0..300 {
            let cuts = random_cuts(&mut rng, input.len());
            assert_eq!(
                decode_split(limits, &input, &cuts),
                (events.clone(), Ok(())),
                "{cuts:?}"
            );
        }
    }

    #[test]
    fn random_input_never_panics() {
        let limits = Limits {
            max_frame_size: 4096,
            max_message_size: 8192,
        };
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for _ in 0..3000 {
            let len = rng.usize(0..64);
            let mut input: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            // Bias towards plausible headers so parsing goes deeper.
            if let Some(b1) = input.get_mut(1) {
                *b1 |= 0x80;
            }
            let whole = decode_with(limits, &input);
            let cuts = random_cuts(&mut rng, input.len());
            assert_eq!(decode_split(limits, &input, &cuts), whole);
        }
    }

    #[test]
    fn mutated_streams_never_panic_and_are_split_invariant() {
        let limits = Limits {
            max_frame_size: 100_000,
            max_message_size: 200_000,
        };
        // Use the stream without its big first frame to keep iterations fast.
        let (full, _) = sample_stream();
        let base = full[14 + 70_000..].to_vec();
        let mut rng = fastrand::Rng::with_seed(1234);
        let mut errors = 0;
        for _ in 0..2000 {
            let mut input = base.clone();
            for _ in 0..rng.usize(1..4) {
                match rng.u8(0..4) {
                    0 => {
                        let i = rng.usize(..input.len());
                        input[i] ^= 1 << rng.u8(0..8);
                    }
                    1 => {
                        let i = rng.usize(..input.len());
                        input[i] = rng.u8(..);
                    }
                    2 => {
                        let i = rng.usize(..=input.len());
                        input.insert(i, rng.u8(..));
                    }
                    _ => {
                        let i = rng.usize(..input.len());
                        input.remove(i);
                    }
                }
                if input.is_empty() {
                    break;
                }
            }
            let whole = decode_with(limits, &input);
            errors += usize::from(whole.1.is_err());
            let cuts = random_cuts(&mut rng, input.len());
            assert_eq!(decode_split(limits, &input, &cuts), whole);
        }
        // The mutations must actually exercise error paths.
        assert!(errors > 100, "{errors}");
    }

    #[test]
    fn frame_head_encodings() {
        let cases: &[(usize, &[u8])] = &[
            (0, &[0x81, 0]),
            (125, &[0x81, 125]),
            (126, &[0x81, 126, 0, 126]),
            (65535, &[0x81, 126, 0xFF, 0xFF]),
            (65536, &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ];
        for &(len, expected) in cases {
            assert_eq!(
                FrameHead::new(OpCode::Text, len).as_slice(),
                expected,
                "{len}"
            );
        }
        assert_eq!(FrameHead::new(OpCode::Binary, 3).as_slice(), &[0x82, 3]);
        assert_eq!(FrameHead::new(OpCode::Close, 2).as_slice(), &[0x88, 2]);
        assert_eq!(FrameHead::new(OpCode::Ping, 0).as_slice(), &[0x89, 0]);
        assert_eq!(FrameHead::new(OpCode::Pong, 0).as_slice(), &[0x8A, 0]);
        assert_eq!(
            FrameHead::new(OpCode::Continuation, 1).as_slice(),
            &[0x80, 1]
        );
        assert_eq!(
            FrameHead::new(OpCode::Binary, usize::MAX).as_slice()[..3],
            [0x82, 127, 0xFF]
        );
    }

    #[test]
    fn server_frames_round_trip_once_masked() {
        // Re-mask a server frame the way a client would and decode it.
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 256) as u8).collect();
            let head = FrameHead::new(OpCode::Binary, len);
            let mut input = head.as_slice().to_vec();
            input[1] |= 0x80;
            input.extend(MASK);
            input.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
            assert_eq!(decode(&input), (vec![binary(&payload)], Ok(())));
        }
    }

    #[test]
    fn close_payload_truncation() {
        assert_eq!(&close_payload(1000, "")[..], &[0x03, 0xE8]);
        assert_eq!(&close_payload(4001, "bye")[..], b"\x0F\xA1bye");
        let long = "x".repeat(200);
        let p = close_payload(1001, &long);
        assert_eq!(p.len(), 125);
        assert_eq!(&p[2..], "x".repeat(123).as_bytes());
        // 122 ASCII bytes then a 3-byte char: it would end at 125 > 123, so it
        // is dropped entirely.
        let reason = format!("{}€tail", "y".repeat(122));
        let p = close_payload(1000, &reason);
        assert_eq!(p.len(), 2 + 122);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        // Exactly fits.
        let reason = format!("{}€", "y".repeat(120));
        assert_eq!(close_payload(1000, &reason).len(), 125);
        // All multi-byte.
        let p = close_payload(1000, &"𝄞".repeat(50));
        assert_eq!(p.len(), 2 + 120);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        // The decoder accepts what the encoder produces.
        let (out, res) = decode(&masked(true, OpCode::Close, &p));
        res.unwrap();
        assert_eq!(out, vec![Incoming::Close(Some((1000, "𝄞".repeat(30))))]);
    }

    #[test]
    fn error_close_codes_and_messages() {
        let cases = [
            (ProtocolError::UnmaskedFrame, 1002),
            (ProtocolError::ReservedBits(4), 1002),
            (ProtocolError::ReservedOpcode(3), 1002),
            (ProtocolError::FragmentedControlFrame, 1002),
            (ProtocolError::ControlFrameTooLong, 1002),
            (ProtocolError::UnexpectedContinuation, 1002),
            (ProtocolError::ExpectedContinuation, 1002),
            (ProtocolError::InvalidLength, 1002),
            (ProtocolError::FrameTooBig { len: 2, max: 1 }, 1009),
            (ProtocolError::MessageTooBig { len: 2, max: 1 }, 1009),
            (ProtocolError::AllocationFailed(1), 1009),
            (ProtocolError::InvalidUtf8, 1007),
            (ProtocolError::CloseFrameTooShort, 1002),
            (ProtocolError::InvalidCloseCode(5), 1002),
            (ProtocolError::InvalidCloseReason, 1007),
        ];
        for (err, expected) in cases {
            assert_eq!(err.close_code(), expected, "{err:?}");
            assert!(!err.to_string().is_empty());
        }
        assert_eq!(
            ProtocolError::ReservedBits(4).to_string(),
            "reserved bits 0b100 set without a negotiated extension"
        );
        assert_eq!(
            ProtocolError::FrameTooBig { len: 2, max: 1 }.to_string(),
            "frame payload of 2 bytes exceeds the limit of 1 bytes"
        );
    }

    #[test]
    fn default_limits() {
        let limits = Limits::default();
        assert_eq!(limits.max_frame_size, 1 << 20);
        assert_eq!(limits.max_message_size, 1 << 20);
    }
}
