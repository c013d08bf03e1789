//! A byte stream turned into frames: the one loop of "skip what a refused
//! frame left, parse, advance" that the proxy's sessions, the property
//! tests and the fuzz targets all drive.
//!
//! A [`FrameReader`] owns the read buffer, the limits, the bytes still to
//! discard after a refused frame, and its parser. For client requests the
//! parser is a [`RequestParser`], which picks the protocol from the
//! connection's first byte and keeps it, as memcached does. The reader does
//! no I/O: its owner reads into [`FrameReader::buffer`] and asks for
//! [`FrameReader::next_frame`] until it says more bytes are needed.

use bytes::{Buf as _, BytesMut};

use super::{Limits, Protocol, ProtocolError, Request, Response, binary, text};

/// A parser the reader drives. It must keep the contract in
/// [`super`]: incomplete and errors leave the buffer untouched, a frame
/// consumes its bytes.
pub trait Parse {
    /// What it parses.
    type Item;

    /// Parses one frame from the front of `buf`.
    fn parse(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Option<Self::Item>, ProtocolError>;
}

/// Client requests, in the protocol the connection's first byte chose.
#[derive(Debug, Default, Clone)]
pub struct RequestParser {
    protocol: Option<Protocol>,
}

impl RequestParser {
    /// A parser for a connection whose first byte has not arrived.
    pub const fn new() -> Self {
        Self { protocol: None }
    }

    /// The connection's protocol, once its first byte arrived.
    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol
    }
}

impl Parse for RequestParser {
    type Item = Request;

    fn parse(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Option<Request>, ProtocolError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        match *self.protocol.get_or_insert_with(|| Protocol::detect(first)) {
            Protocol::Binary => Ok(binary::parse_request(buf, limits)?.map(Request::Binary)),
            Protocol::Text | Protocol::Meta => text::parse_request(buf, limits),
        }
    }
}

/// Backend replies, each unit in the protocol its first byte names.
#[derive(Debug, Default, Clone, Copy)]
pub struct ResponseParser;

impl Parse for ResponseParser {
    type Item = Response;

    fn parse(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Option<Response>, ProtocolError> {
        super::parse_response(buf, limits)
    }
}

/// What the reader found at the front of its buffer.
#[derive(Debug)]
pub enum Next<T> {
    /// A whole frame, removed from the buffer.
    Frame(T),
    /// A refused frame: reply with [`ProtocolError::write_reply`]; unless
    /// it closes the stream, its bytes are being discarded and reading
    /// goes on.
    Error(ProtocolError),
    /// Nothing buffered.
    Empty,
    /// Part of a frame, or of a refused frame's bytes, is still to arrive.
    Partial,
}

/// A stream's read buffer, its limits and its discard state; see the
/// module docs.
#[derive(Debug)]
pub struct FrameReader<P> {
    buf: BytesMut,
    limits: Limits,
    parser: P,
    /// Bytes of a refused frame (e.g. an oversized value) still to arrive.
    skip: usize,
}

/// The reader of a client connection.
pub type RequestReader = FrameReader<RequestParser>;

impl<P: Parse> FrameReader<P> {
    /// An empty reader. The buffer allocates when the first bytes arrive,
    /// so thousands of idle clients cost little more than their sockets.
    pub fn new(parser: P, limits: Limits) -> Self {
        Self {
            buf: BytesMut::new(),
            limits,
            parser,
            skip: 0,
        }
    }

    /// The limits frames are parsed with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Changes the limits for the frames still to come (a session learns
    /// its tenant's key limit after authenticating).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The parser, e.g. to ask a [`RequestParser`] for the protocol.
    pub fn parser(&self) -> &P {
        &self.parser
    }

    /// The buffer to read new bytes into.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes buffered and not yet parsed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forgets everything buffered (what arrives while draining is not
    /// served).
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// Gives the buffer's memory back when nothing is buffered: between
    /// requests a client holds no buffer. Returns the buffer given back
    /// (empty, with its room), for the caller to reuse elsewhere.
    pub fn release_if_empty(&mut self) -> Option<BytesMut> {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            Some(std::mem::take(&mut self.buf))
        } else {
            None
        }
    }

    /// The next frame, or why there is none yet.
    pub fn next_frame(&mut self) -> Next<P::Item> {
        match self.step(false) {
            Ok(next) => next,
            Err(unchecked) => unreachable!("contract checks are off: {unchecked}"),
        }
    }

    /// As [`Self::next_frame`], checking the parser's contract on the way (for
    /// the property tests and the fuzz targets): `Err` names a breach.
    pub fn next_frame_checked(&mut self) -> Result<Next<P::Item>, String> {
        self.step(true)
    }

    fn step(&mut self, check: bool) -> Result<Next<P::Item>, String> {
        if self.skip > 0 {
            let n = self.skip.min(self.buf.len());
            self.buf.advance(n);
            self.skip -= n;
            if self.skip > 0 {
                return Ok(Next::Partial);
            }
        }
        if self.buf.is_empty() {
            return Ok(Next::Empty);
        }
        let before = check.then(|| self.buf.clone());
        let result = self.parser.parse(&mut self.buf, &self.limits);
        if let Some(before) = before {
            match &result {
                Ok(None) if self.buf != before => {
                    return Err("incomplete input was consumed".into());
                }
                Ok(Some(_))
                    if self.buf.len() >= before.len()
                        || before[before.len() - self.buf.len()..] != self.buf[..] =>
                {
                    return Err("a parsed frame did not consume exactly its bytes".into());
                }
                Err(e) if self.buf != before => return Err(format!("error {e:?} consumed input")),
                Err(e) if e.discard == 0 => return Err(format!("error {e:?} discards nothing")),
                _ => {}
            }
        }
        Ok(match result {
            Ok(Some(frame)) => Next::Frame(frame),
            Ok(None) => Next::Partial,
            Err(e) => {
                self.skip = e.discard_from(&mut self.buf);
                Next::Error(e)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(input: &[u8], chunk: usize) -> Vec<String> {
        let mut r = RequestReader::new(RequestParser::default(), Limits::default());
        let mut seen = Vec::new();
        for piece in input.chunks(chunk) {
            r.buffer().extend_from_slice(piece);
            loop {
                match r.next_frame_checked().expect("contract") {
                    Next::Frame(req) => seen.push(format!("{:?}", req.protocol())),
                    Next::Error(e) => seen.push(format!("error {:?}", e.kind)),
                    Next::Empty | Next::Partial => break,
                }
            }
        }
        seen
    }

    #[test]
    fn the_first_byte_fixes_the_protocol() {
        // A text connection: a later binary frame is read as text lines
        // (0x0a ends the first), not as a binary request.
        let text = requests(b"get a\r\n\x80\x0a\x00\x00\r\n", 64);
        assert_eq!(
            text,
            ["Text", "error UnknownCommand", "error UnknownCommand"]
        );
        let mut r = RequestReader::new(RequestParser::default(), Limits::default());
        assert_eq!(r.parser().protocol(), None);
        r.buffer().extend_from_slice(b"mn\r\n");
        assert!(matches!(r.next_frame(), Next::Frame(Request::Meta(_))));
        assert_eq!(r.parser().protocol(), Some(Protocol::Text));
        assert!(matches!(r.next_frame(), Next::Empty));
    }

    #[test]
    fn a_refused_value_is_discarded_as_it_arrives() {
        let limits = Limits {
            max_value_len: 4,
            ..Limits::default()
        };
        let mut r = RequestReader::new(RequestParser::default(), limits);
        r.buffer().extend_from_slice(b"set k 0 0 10\r\n0123");
        assert!(matches!(r.next_frame(), Next::Error(e) if !e.close));
        assert!(
            matches!(r.next_frame(), Next::Partial),
            "value still arriving"
        );
        r.buffer().extend_from_slice(b"456789\r\nget k\r\n");
        assert!(matches!(r.next_frame(), Next::Frame(Request::Text(_))));
        assert!(matches!(r.next_frame(), Next::Empty));
        assert!(r.release_if_empty().is_some_and(|b| b.capacity() > 0));
        assert_eq!(r.buffer().capacity(), 0);
        assert!(r.release_if_empty().is_none());
    }

    #[test]
    fn every_chunking_yields_the_same_frames() {
        let input = b"set a 0 0 1\r\nx\r\nget a b\r\nmg a v\r\nbogus\r\ndelete a\r\n";
        let whole = requests(input, input.len());
        assert_eq!(whole.len(), 5);
        for chunk in 1..input.len() {
            assert_eq!(requests(input, chunk), whole, "chunk {chunk}");
        }
    }
}
