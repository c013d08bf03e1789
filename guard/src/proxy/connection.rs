//! The client's side of a session: its socket's read half and the
//! [`RequestReader`] its bytes go into. Authentication and serving both
//! read through it, so a connection keeps one buffer, one protocol and one
//! discard state from its first byte to its last.

use std::cell::RefCell;

use bytes::BytesMut;
use tokio::{io::AsyncReadExt as _, net::tcp::OwnedReadHalf};

use crate::protocol::{Limits, Next, Request, RequestParser, RequestReader};

/// How much the read buffer grows by.
const READ_CHUNK: usize = 4 * 1024;
/// Most read buffers kept for reuse on one thread.
const SPARE_BUFFERS: usize = 64;

thread_local! {
    /// Read buffers sessions gave back between requests, for the next
    /// session on this thread that has something to read. A client that
    /// sends one request at a time gives its buffer back after each (an
    /// idle connection holds none); without this each request cost a
    /// 4 KiB allocation and free. Bounded, so however many connections
    /// are idle, this holds at most `SPARE_BUFFERS` buffers.
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

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

    /// Gives the read buffer back when nothing is buffered, for reuse by
    /// the next session on this thread with something to read.
    pub fn release_buffer(&mut self) {
        let Some(buf) = self.reader.release_if_empty() else {
            return;
        };
        // Room left for a whole chunk's worth of reading: worth keeping.
        if buf.capacity() >= READ_CHUNK / 4 {
            SPARE.with_borrow_mut(|spare| {
                if spare.len() < SPARE_BUFFERS {
                    spare.push(buf);
                }
            });
        }
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
    if buf.capacity() == 0
        && let Some(spare) = SPARE.with_borrow_mut(Vec::pop)
    {
        *buf = spare;
    }
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::AsyncWriteExt as _,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A client connection to a fresh loopback listener: guard's side and
    /// the client's.
    async fn connected(listener: &TcpListener) -> (ClientConnection, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (rd, _wr) = server.into_split();
        (ClientConnection::new(rd, Limits::default()), client)
    }

    #[tokio::test]
    async fn a_buffer_given_back_is_the_next_reader_s() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut one, mut c1) = connected(&listener).await;
        let (mut two, mut c2) = connected(&listener).await;
        c1.write_all(b"get a\r\n").await.unwrap();
        assert_eq!(one.read_some().await.unwrap(), 7);
        assert!(matches!(one.next_request(), Next::Frame(_)));
        // What is left of the buffer once its request is parsed off.
        let left = one.reader().buffer().as_ptr();
        one.release_buffer();
        assert_eq!(one.reader().buffer().capacity(), 0, "idle: no buffer");
        c2.write_all(b"get b\r\n").await.unwrap();
        assert_eq!(two.read_some().await.unwrap(), 7);
        assert_eq!(two.reader().buffer().as_ptr(), left, "not reused");
    }

    #[tokio::test]
    async fn the_spare_buffers_are_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut conn, _client) = connected(&listener).await;
        for _ in 0..SPARE_BUFFERS + 5 {
            *conn.reader().buffer() = BytesMut::with_capacity(READ_CHUNK);
            conn.release_buffer();
        }
        assert_eq!(SPARE.with_borrow(Vec::len), SPARE_BUFFERS);
    }
}
