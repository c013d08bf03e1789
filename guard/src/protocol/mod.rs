//! memcache wire protocols: classic text, meta, and binary.
//!
//! Parsers work in place on a `BytesMut` read buffer and never copy keys or
//! values: a complete frame is split off and frozen, and every field is a
//! `Bytes` slice of it. Each `parse_*` function returns
//!
//! * `Ok(None)`: not enough bytes yet; the buffer is untouched.
//! * `Ok(Some(frame))`: the frame's bytes were removed from the buffer.
//! * `Err(e)`: the buffer is untouched; `e.discard` bytes belong to the bad
//!   frame (possibly more than are buffered, see
//!   [`ProtocolError::discard_from`]), `e.close` says the stream is lost,
//!   and [`ProtocolError::write_reply`] produces memcached's reply.
//!
//! Completeness is decided from bounded prefixes only, so the outcome never
//! depends on how the stream was chunked.

pub mod admin;
pub mod binary;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
pub mod invariants;
pub mod meta;
pub mod reader;
pub mod text;
mod wire;

#[cfg(test)]
mod tests;

use bytes::BytesMut;

pub use admin::{AdminCommand, AdminRequest, DetailAction, StatsGroup};
pub use binary::{BinaryRequest, BinaryResponse, Extras, Opcode, Status};
pub use error::{ErrorKind, ProtocolError};
pub use meta::{ArithMode, MetaCode, MetaCommand, MetaFlag, MetaRequest, MetaResponse, StoreMode};
pub use reader::{FrameReader, Next, RequestParser, RequestReader};
pub use text::{
    ErrorReplyKind, GetKind, GetRequest, StoreCommand, StoreRequest, TextRequest, TextResponse,
};
pub use wire::is_valid_text_key;

/// Size limits enforced while parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest key, in bytes (memcached: 250).
    pub max_key_len: usize,
    /// Largest value (data block / binary value) accepted.
    pub max_value_len: usize,
    /// Longest command or reply line, terminator included.
    pub max_line_len: usize,
    /// Longest `get`/`gets`/`gat`/`gats` line, terminator included.
    pub max_retrieval_line_len: usize,
    /// Most keys in one multi-get.
    pub max_keys_per_get: usize,
    /// Most requests in flight per client connection. Not enforced by the
    /// parser; the proxy stops reading past it.
    pub max_pipeline_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_len: 250,
            max_value_len: 1024 * 1024,
            max_line_len: 2048,
            max_retrieval_line_len: 64 * 1024,
            max_keys_per_get: 4096,
            max_pipeline_depth: 1024,
        }
    }
}

/// Wire protocol family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Text,
    Meta,
    Binary,
}

impl Protocol {
    /// memcached picks the protocol of a connection from its first byte.
    pub fn detect(first_byte: u8) -> Protocol {
        if first_byte == binary::REQUEST_MAGIC {
            Protocol::Binary
        } else {
            Protocol::Text
        }
    }
}

/// How the reply to a request is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyShape {
    /// No reply (`noreply`, `quit`, binary QuitQ).
    None,
    /// Exactly one reply unit.
    One,
    /// Zero or one unit: a nominal outcome is suppressed (meta `q`, binary
    /// quiet opcodes; see `MetaCommand::quiet_suppresses` and
    /// `Opcode::quiet_suppresses`). Requests still unanswered when the reply
    /// to a later barrier (`mn`, binary noop) arrives got no reply.
    Quiet,
    /// Zero or more units, then a terminator: `END` (text get/stats) or an
    /// empty-key response (binary stat); errors also terminate.
    Multi,
}

/// A request in any protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Text(TextRequest),
    Meta(MetaRequest),
    Binary(BinaryRequest),
}

impl Request {
    /// The protocol the request arrived in.
    pub fn protocol(&self) -> Protocol {
        match self {
            Request::Text(_) => Protocol::Text,
            Request::Meta(_) => Protocol::Meta,
            Request::Binary(_) => Protocol::Binary,
        }
    }

    /// Writes the request in its own wire form.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Request::Text(r) => r.encode(out),
            Request::Meta(r) => r.encode(out),
            Request::Binary(r) => r.encode(out),
        }
    }

    /// How the reply to this request is delimited.
    pub fn reply_shape(&self) -> ReplyShape {
        match self {
            Request::Text(r) => r.reply_shape(),
            Request::Meta(r) => r.reply_shape(),
            Request::Binary(r) => r.reply_shape(),
        }
    }

    /// Whether its reply proves every earlier request has been answered.
    pub fn is_barrier(&self) -> bool {
        match self {
            Request::Text(_) => false,
            Request::Meta(r) => r.is_barrier(),
            Request::Binary(r) => r.is_barrier(),
        }
    }
}

/// A reply unit in any protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Text(TextResponse),
    Meta(MetaResponse),
    Binary(BinaryResponse),
}

impl Response {
    /// Writes the reply in its own wire form.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Response::Text(r) => r.encode(out),
            Response::Meta(r) => r.encode(out),
            Response::Binary(r) => r.encode(out),
        }
    }

    /// Whether this unit ends a [`ReplyShape::Multi`] reply.
    pub fn ends_multi(&self) -> bool {
        match self {
            Response::Text(r) => r.ends_multi(),
            Response::Meta(_) => true,
            Response::Binary(r) => r.ends_multi(),
        }
    }
}

/// Parses one request of any protocol, chosen per frame by its first byte
/// (0x80 = binary). A connection keeps the protocol of its first byte, as
/// memcached does: read it with a [`RequestReader`].
pub fn parse_request(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<Request>, ProtocolError> {
    match buf.first() {
        None => Ok(None),
        Some(&binary::REQUEST_MAGIC) => {
            Ok(binary::parse_request(buf, limits)?.map(Request::Binary))
        }
        Some(_) => text::parse_request(buf, limits),
    }
}

/// Parses one backend reply unit of any protocol (0x81 = binary).
pub fn parse_response(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<Response>, ProtocolError> {
    match buf.first() {
        None => Ok(None),
        Some(&binary::RESPONSE_MAGIC) => {
            Ok(binary::parse_response(buf, limits)?.map(Response::Binary))
        }
        Some(_) => text::parse_response(buf, limits),
    }
}
