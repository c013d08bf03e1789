//! Protocol errors and the reply each one maps to.

use bytes::{Buf, BytesMut};

use super::Protocol;
use super::binary::{BinaryResponse, Status};

/// What went wrong; each kind maps to memcached's own reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Unknown command or wrong token count: `ERROR` / binary 0x0081.
    UnknownCommand,
    /// No line terminator within the limit: `CLIENT_ERROR line too long`.
    LineTooLong,
    /// `CLIENT_ERROR bad command line format`.
    BadCommandLine,
    /// `CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]`.
    BadDeleteFormat,
    /// `CLIENT_ERROR invalid numeric delta argument` (incr/decr).
    InvalidDelta,
    /// `CLIENT_ERROR invalid exptime argument` (touch, gat, flush_all).
    InvalidExptime,
    /// `CLIENT_ERROR usage: stats detail on|off|dump`.
    StatsDetailUsage,
    /// `SERVER_ERROR object too large for cache` / binary 0x0003.
    TooLarge,
    /// `CLIENT_ERROR bad data chunk`: the data block was not followed by CRLF.
    BadDataChunk,
    /// `CLIENT_ERROR invalid flag` (meta).
    InvalidFlag,
    /// `CLIENT_ERROR duplicate flag` (meta).
    DuplicateFlag,
    /// `CLIENT_ERROR bad token in command line format` (meta numeric token).
    BadFlagToken,
    /// `CLIENT_ERROR options flags are too long` (meta).
    FlagsTooLong,
    /// `CLIENT_ERROR opaque token too long` (meta).
    OpaqueTooLong,
    /// `CLIENT_ERROR error decoding key` (meta `b`).
    KeyDecode,
    /// `CLIENT_ERROR invalid mode for ms M token`.
    InvalidMsMode,
    /// `CLIENT_ERROR invalid mode for ma M token`.
    InvalidMaMode,
    /// `CLIENT_ERROR invalid numeric initial value` (ma `J`).
    InvalidInitial,
    /// `CLIENT_ERROR invalid numeric delta value` (ma `D`).
    InvalidDeltaValue,
    /// Binary header fields inconsistent with the opcode: 0x0004, then close.
    InvalidArguments,
    /// First byte of a binary frame is not 0x80: memcached closes silently.
    BadMagic,
    /// A backend reply that cannot be parsed; the backend stream is lost.
    BadResponse,
}

impl ErrorKind {
    /// The text/meta reply line, without CRLF; `None` where memcached sends
    /// nothing (bad magic, backend-side errors).
    pub fn text_reply(self) -> Option<&'static str> {
        use ErrorKind::*;
        Some(match self {
            UnknownCommand => "ERROR",
            LineTooLong => "CLIENT_ERROR line too long",
            BadCommandLine => "CLIENT_ERROR bad command line format",
            BadDeleteFormat => {
                "CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]"
            }
            InvalidDelta => "CLIENT_ERROR invalid numeric delta argument",
            InvalidExptime => "CLIENT_ERROR invalid exptime argument",
            StatsDetailUsage => "CLIENT_ERROR usage: stats detail on|off|dump",
            TooLarge => "SERVER_ERROR object too large for cache",
            BadDataChunk => "CLIENT_ERROR bad data chunk",
            InvalidFlag => "CLIENT_ERROR invalid flag",
            DuplicateFlag => "CLIENT_ERROR duplicate flag",
            BadFlagToken => "CLIENT_ERROR bad token in command line format",
            FlagsTooLong => "CLIENT_ERROR options flags are too long",
            OpaqueTooLong => "CLIENT_ERROR opaque token too long",
            KeyDecode => "CLIENT_ERROR error decoding key",
            InvalidMsMode => "CLIENT_ERROR invalid mode for ms M token",
            InvalidMaMode => "CLIENT_ERROR invalid mode for ma M token",
            InvalidInitial => "CLIENT_ERROR invalid numeric initial value",
            InvalidDeltaValue => "CLIENT_ERROR invalid numeric delta value",
            InvalidArguments => "CLIENT_ERROR bad command line format",
            BadMagic | BadResponse => return None,
        })
    }

    /// The binary status for this error.
    pub fn binary_status(self) -> Status {
        match self {
            ErrorKind::UnknownCommand => Status::UNKNOWN_COMMAND,
            ErrorKind::TooLarge => Status::VALUE_TOO_LARGE,
            _ => Status::INVALID_ARGUMENTS,
        }
    }
}

/// A request or reply that could not be parsed.
///
/// The parser never consumes bytes when it fails: `discard` says how many
/// bytes from the front of the buffer belong to the failed frame. It may be
/// larger than what is buffered (an oversized value is never buffered
/// whole); [`ProtocolError::discard_from`] drops what is there and returns
/// how much more incoming data must be skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{protocol:?} protocol error {kind:?} (discard {discard}, close {close})")]
pub struct ProtocolError {
    pub kind: ErrorKind,
    /// Protocol whose reply form applies.
    pub protocol: Protocol,
    /// Bytes to drop from the front of the stream (always > 0).
    pub discard: usize,
    /// The stream is desynchronised: reply (if any), then close.
    pub close: bool,
    /// memcached would stay silent because the request carried `noreply`.
    pub noreply: bool,
    /// Opcode and opaque of a binary request, to address the reply.
    pub binary: Option<(u8, u32)>,
}

impl ProtocolError {
    pub(super) fn text(kind: ErrorKind, discard: usize) -> Self {
        ProtocolError {
            kind,
            protocol: Protocol::Text,
            discard,
            close: false,
            noreply: false,
            binary: None,
        }
    }

    pub(super) fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    pub(super) fn with_protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Drops up to `discard` bytes from `buf`; returns how many further
    /// incoming bytes must still be skipped.
    pub fn discard_from(&self, buf: &mut BytesMut) -> usize {
        let now = self.discard.min(buf.len());
        buf.advance(now);
        self.discard - now
    }

    /// Appends the reply memcached would send for this error, if any.
    pub fn write_reply(&self, out: &mut BytesMut) {
        if self.noreply {
            return;
        }
        match self.protocol {
            Protocol::Binary => {
                if let Some((opcode, opaque)) = self.binary {
                    BinaryResponse::error(opcode, opaque, self.kind.binary_status()).encode(out);
                }
            }
            Protocol::Text | Protocol::Meta => {
                if let Some(line) = self.kind.text_reply() {
                    out.extend_from_slice(line.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_spans_future_bytes() {
        let e = ProtocolError::text(ErrorKind::TooLarge, 10);
        let mut b = BytesMut::from(&b"0123"[..]);
        assert_eq!(e.discard_from(&mut b), 6);
        assert!(b.is_empty());
        let mut b = BytesMut::from(&b"0123456789abc"[..]);
        assert_eq!(e.discard_from(&mut b), 0);
        assert_eq!(&b[..], b"abc");
    }

    #[test]
    fn text_replies() {
        let mut out = BytesMut::new();
        ProtocolError::text(ErrorKind::UnknownCommand, 1).write_reply(&mut out);
        ProtocolError::text(ErrorKind::LineTooLong, 1).write_reply(&mut out);
        ProtocolError::text(ErrorKind::BadDeleteFormat, 1).write_reply(&mut out);
        let mut quiet = ProtocolError::text(ErrorKind::TooLarge, 1);
        quiet.noreply = true;
        quiet.write_reply(&mut out);
        ProtocolError::text(ErrorKind::BadMagic, 1).write_reply(&mut out);
        assert_eq!(
            &out[..],
            &b"ERROR\r\nCLIENT_ERROR line too long\r\nCLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"[..]
        );
    }

    #[test]
    fn binary_reply() {
        let e = ProtocolError {
            kind: ErrorKind::TooLarge,
            protocol: Protocol::Binary,
            discard: 30,
            close: false,
            noreply: false,
            binary: Some((0x01, 0xdeadbeef)),
        };
        let mut out = BytesMut::new();
        e.write_reply(&mut out);
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x01);
        assert_eq!(&out[6..8], &[0x00, 0x03]);
        assert_eq!(&out[12..16], &0xdeadbeefu32.to_be_bytes());
        assert_eq!(&out[24..], b"Too large.");
    }
}
