//! Whether the other end of a connection closed it.
//!
//! A read that fails is not a close: a read timeout fails too, and a test
//! that counted it as one would pass against a server that never closes.
//! Here a close is only an end of stream or a reset, and how long to wait
//! for it is the caller's explicit deadline, whatever read timeout or
//! blocking mode the stream has.

use std::{
    io,
    net::TcpStream,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

/// What the other end of a connection did within a deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    /// It closed: end of stream.
    Eof,
    /// It reset the connection (see [`is_reset`]).
    Reset(io::ErrorKind),
    /// Nothing arrived and the connection stayed open to the deadline.
    Open,
    /// It sent these bytes (what one read returned) instead of closing.
    Sent(Vec<u8>),
}

impl PeerState {
    /// End of stream or reset.
    pub fn is_closed(&self) -> bool {
        matches!(self, PeerState::Eof | PeerState::Reset(_))
    }
}

/// Whether `e` says the other end reset or is gone (ECONNRESET,
/// ECONNABORTED, EPIPE), as opposed to a timeout or a local failure.
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// Waits up to `within` (zero: just looks) for the other end of `stream`
/// to close it, send something, or neither. The stream's own read timeout
/// and blocking mode are left as they are and play no part. Panics on a
/// failure that is none of these (a local error).
pub fn peer_state(stream: &TcpStream, within: Duration) -> PeerState {
    let deadline = Instant::now() + within;
    let fd = stream.as_raw_fd();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Rounded up, so a deadline under a millisecond is still waited for.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on a descriptor `stream` keeps open.
        let ready = unsafe { libc::poll(&mut p, 1, ms) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            assert_eq!(e.kind(), io::ErrorKind::Interrupted, "poll: {e}");
            continue;
        }
        if ready == 0 {
            if Instant::now() >= deadline {
                return PeerState::Open;
            }
            continue;
        }
        // Readable, hung up or in error: a read that cannot block says which.
        let mut buf = [0u8; 4096];
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        match n {
            0 => return PeerState::Eof,
            n if n > 0 => return PeerState::Sent(buf[..n as usize].to_vec()),
            _ => {
                let e = io::Error::last_os_error();
                if is_reset(&e) {
                    return PeerState::Reset(e.kind());
                }
                assert!(
                    matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ),
                    "reading from {:?}: {e}",
                    stream.peer_addr()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write as _,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A connected pair: (ours, theirs).
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (theirs, _) = l.accept().unwrap();
        (ours, theirs)
    }

    #[test]
    fn a_silent_peer_is_open_at_the_deadline_whatever_the_read_timeout() {
        let (ours, _theirs) = pair();
        // A read timeout shorter than the deadline must not end the wait.
        ours.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let t = Instant::now();
        assert_eq!(
            peer_state(&ours, Duration::from_millis(300)),
            PeerState::Open
        );
        assert!(t.elapsed() >= Duration::from_millis(300));
        ours.set_nonblocking(true).unwrap();
        assert_eq!(peer_state(&ours, Duration::ZERO), PeerState::Open);
    }

    #[test]
    fn a_close_is_seen_within_the_deadline() {
        let (ours, theirs) = pair();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(theirs);
        });
        let t = Instant::now();
        assert_eq!(peer_state(&ours, Duration::from_secs(5)), PeerState::Eof);
        assert!(t.elapsed() < Duration::from_secs(2));
        closer.join().unwrap();
    }

    #[test]
    fn a_reset_is_a_close() {
        let (ours, theirs) = pair();
        // Unread data at close makes the kernel send a reset.
        (&ours).write_all(b"unread").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(theirs);
        let s = peer_state(&ours, Duration::from_secs(5));
        assert_eq!(s, PeerState::Reset(io::ErrorKind::ConnectionReset));
        assert!(s.is_closed());
    }

    #[test]
    fn bytes_are_not_a_close() {
        let (ours, mut theirs) = pair();
        theirs.write_all(b"hello").unwrap();
        let s = peer_state(&ours, Duration::from_secs(5));
        assert_eq!(s, PeerState::Sent(b"hello".to_vec()));
        assert!(!s.is_closed());
    }
}
