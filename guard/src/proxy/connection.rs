//! The client's side of a session: its socket's read half and the
//! [`RequestReader`] its bytes go into. Authentication and serving both
//! read through it, so a connection keeps one buffer, one protocol and one
//! discard state from its first byte to its last.

use bytes::BytesMut;
use tokio::{io::AsyncReadExt as _, net::tcp::OwnedReadHalf};

use crate::protocol::{Limits, Next, Request, RequestParser, RequestReader};

/// How much the read buffer grows by.
const READ_CHUNK: usize = 4 * 1024;

/// A client connection's read side, yielding requests.
pub struct ClientConnection {
    rd: OwnedReadHalf,
    reader: RequestReader,
    /// Whole requests parsed so far (authentication included).
    requests: u64,
}

impl ClientConnection {
    /// Reads from `rd`, parsing with `limits`.
    pub fn new(rd: OwnedReadHalf, limits: Limits) -> Self {
        Self {
            rd,
            reader: RequestReader::new(RequestParser::new(), limits),
            requests: 0,
        }
    }

    /// The next request buffered, or why there is none.
    pub fn next_request(&mut self) -> Next<Request> {
        let next = self.reader.next_frame();
        if matches!(next, Next::Frame(_)) {
            self.requests += 1;
        }
        next
    }

    /// Whole requests parsed so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The reader, for its limits and buffer.
    pub fn reader(&mut self) -> &mut RequestReader {
        &mut self.reader
    }

    /// Bytes buffered and not yet parsed.
    pub fn buffered(&self) -> usize {
        self.reader.buffered()
    }

    /// Reads what the client sent, growing the buffer only once there is
    /// something to read. `Ok(0)` is the client's EOF.
    ///
    /// The read itself goes through `AsyncRead`, not `try_read_buf`: a read
    /// that leaves room in the buffer has drained the socket, and tokio
    /// then forgets the readiness instead of finding out with a second
    /// `recv` that fails with `EAGAIN` (one wasted syscall per request
    /// otherwise).
    pub async fn read_some(&mut self) -> std::io::Result<usize> {
        self.rd.readable().await?;
        let buf = self.reader.buffer();
        reserve(buf);
        self.rd.read_buf(buf).await
    }

    /// Takes whatever the socket already holds, up to `cap` buffered bytes,
    /// without waiting.
    pub fn drain_socket(&mut self, cap: usize) {
        let buf = self.reader.buffer();
        while buf.len() < cap {
            reserve(buf);
            match self.rd.try_read_buf(buf) {
                Ok(n) if n > 0 => continue,
                _ => break,
            }
        }
    }
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}
