//! Proxy errors: which side caused a failure, what kind it is, whether
//! retrying may help, and what caused it.
//!
//! As pingora's errors do, a failure keeps its origin and its cause, so a
//! log line can say `backend 10.0.0.5:11211: reply parse error: …` rather
//! than `connection lost`. None of that reaches clients: they are answered
//! with [`ProxyError::reply_text`] (`backend unavailable`, `backend
//! timeout` or `backend connection lost`), the words guard has always used,
//! because clients and the conformance tests match on them.

use std::{error::Error as _, fmt, io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::BytesMut;

use crate::protocol::{ProtocolError, Response};

/// Which side of the proxy a failure came from.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client (downstream).
    Client,
    /// A memcached backend (upstream).
    Backend,
    /// guard itself: a broken invariant or a task that stopped.
    Internal,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "backend",
            Side::Internal => "internal",
        })
    }
}

/// What went wrong.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No connection to the backend is up; the request was not sent.
    Unavailable,
    /// The backend refused the connection: nothing listens there.
    ConnectRefused,
    /// Connecting failed for another reason (unreachable, reset, …).
    ConnectFailed,
    /// The connection was not established within the connect timeout.
    ConnectTimeout,
    /// A reply did not arrive within the request timeout.
    Timeout,
    /// The peer closed the connection.
    ConnectionClosed,
    /// Reading from or writing to the connection failed.
    ConnectionLost,
    /// The backend sent bytes that are not a reply.
    ReplyParse,
    /// The backend sent a reply while no request awaited one.
    UnexpectedReply,
    /// The connection's task stopped before the reply arrived (the proxy
    /// is stopping, or the task was aborted).
    Abandoned,
    /// A batch came back with a different number of replies than it had
    /// requests.
    ReplyCount,
    /// The connection already held `backend_max_in_flight` requests; this
    /// one was refused without being sent.
    Overloaded,
    /// The key's backend is ejected and the policy is `fail-fast` (or no
    /// backend is live): refused without being sent.
    Ejected,
}

impl ErrorKind {
    /// The kind in words, as log lines show it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::ConnectRefused => "connection refused",
            ErrorKind::ConnectFailed => "connect failed",
            ErrorKind::ConnectTimeout => "connect timeout",
            ErrorKind::Timeout => "timeout",
            ErrorKind::ConnectionClosed => "connection closed",
            ErrorKind::ConnectionLost => "connection lost",
            ErrorKind::ReplyParse => "reply parse error",
            ErrorKind::UnexpectedReply => "reply to no request",
            ErrorKind::Abandoned => "request abandoned",
            ErrorKind::ReplyCount => "reply count mismatch",
            ErrorKind::Overloaded => "too many requests in flight",
            ErrorKind::Ejected => "ejected",
        }
    }

    /// Whether retrying may help: the request never reached the backend,
    /// so sending it again cannot apply it twice, and the backend may be
    /// back by then. Every other kind may have been executed (or the
    /// backend is misbehaving), so a retry is the client's call.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Unavailable
                | ErrorKind::ConnectRefused
                | ErrorKind::ConnectFailed
                | ErrorKind::ConnectTimeout
                | ErrorKind::Overloaded
                | ErrorKind::Ejected
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The underlying cause of a [`ProxyError`].
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// A socket operation failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A backend reply could not be parsed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A deadline of this length passed without an answer.
    #[error("nothing within {0:?}")]
    Elapsed(Duration),
    /// The start of a reply nobody asked for, escaped for a log line
    /// (memcached at its connection limit says why in one).
    #[error("sent \"{0}\"")]
    Unrequested(String),
}

impl Cause {
    /// A [`Cause::Unrequested`] showing the start of `reply`'s wire form.
    pub fn unrequested(reply: &Response) -> Self {
        let mut wire = BytesMut::new();
        reply.encode(&mut wire);
        Cause::Unrequested(excerpt(&wire))
    }
}

/// Longest excerpt of a reply kept by [`excerpt`].
const EXCERPT: usize = 64;

/// The start of `wire`, escaped for one log line (CR, LF and control
/// bytes spelled out) and marked `…` where cut short.
pub fn excerpt(wire: &[u8]) -> String {
    let cut = wire.len().min(EXCERPT);
    let mut text: String = String::from_utf8_lossy(&wire[..cut])
        .escape_debug()
        .collect();
    if cut < wire.len() {
        text.push('…');
    }
    text
}

/// A failure of the proxy: its side, kind, backend and cause.
///
/// Cheap to clone: one connection failure fails every request queued on
/// it, and each gets the same error (the cause is shared).
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}: {kind}", Origin(.side, .backend))]
pub struct ProxyError {
    side: Side,
    kind: ErrorKind,
    backend: Option<SocketAddr>,
    #[source]
    cause: Option<Arc<Cause>>,
}

/// `backend <addr>`, or the side with the backend in parentheses.
struct Origin<'a>(&'a Side, &'a Option<SocketAddr>);

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Side::Backend, Some(addr)) => write!(f, "backend {addr}"),
            (side, Some(addr)) => write!(f, "{side} (backend {addr})"),
            (side, None) => write!(f, "{side}"),
        }
    }
}

impl ProxyError {
    /// A failure of `kind` on `side`, with no backend or cause yet.
    pub fn new(side: Side, kind: ErrorKind) -> Self {
        Self {
            side,
            kind,
            backend: None,
            cause: None,
        }
    }

    /// A failure of `kind` caused by the backend at `addr`.
    pub fn backend(addr: SocketAddr, kind: ErrorKind) -> Self {
        Self::new(Side::Backend, kind).at(addr)
    }

    /// The same failure, recorded against the backend at `addr`.
    #[must_use]
    pub fn at(mut self, addr: SocketAddr) -> Self {
        self.backend = Some(addr);
        self
    }

    /// The same failure, with its cause.
    #[must_use]
    pub fn because(mut self, cause: impl Into<Cause>) -> Self {
        self.cause = Some(Arc::new(cause.into()));
        self
    }

    /// Which side caused it.
    pub fn side(&self) -> Side {
        self.side
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The backend involved, if any.
    pub fn backend_addr(&self) -> Option<SocketAddr> {
        self.backend
    }

    /// The underlying cause, if known.
    pub fn cause(&self) -> Option<&Cause> {
        self.cause.as_deref()
    }

    /// See [`ErrorKind::retryable`].
    pub fn retryable(&self) -> bool {
        self.kind.retryable()
    }

    /// What a client is told after `SERVER_ERROR` (text, meta) or in the
    /// value of a 0x0086 response (binary). Deliberately coarse and fixed:
    /// a request that never left is `unavailable`, one whose reply is late
    /// is `timeout`, and anything that broke the connection under it is
    /// `connection lost`; the cause stays in guard's log.
    pub fn reply_text(&self) -> &'static str {
        match self.kind {
            ErrorKind::Unavailable
            | ErrorKind::ConnectRefused
            | ErrorKind::ConnectFailed
            | ErrorKind::ConnectTimeout
            | ErrorKind::Ejected => "backend unavailable",
            ErrorKind::Timeout => "backend timeout",
            ErrorKind::Overloaded => "backend overloaded",
            ErrorKind::ConnectionClosed
            | ErrorKind::ConnectionLost
            | ErrorKind::ReplyParse
            | ErrorKind::UnexpectedReply
            | ErrorKind::Abandoned
            | ErrorKind::ReplyCount => "backend connection lost",
        }
    }

    /// The error followed by each of its causes, `: `-separated: for log
    /// lines. (`Display` shows the error alone, as the cause is its
    /// `source`, so that reporters walking the chain do not repeat it.)
    pub fn report(&self) -> Report<'_> {
        Report(self)
    }
}

/// A [`ProxyError`] with its chain of causes; see [`ProxyError::report`].
pub struct Report<'a>(&'a ProxyError);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ErrorKind as ParseKind, Limits, TextResponse, parse_response};
    use bytes::Bytes;

    const ALL: [ErrorKind; 13] = [
        ErrorKind::Unavailable,
        ErrorKind::ConnectRefused,
        ErrorKind::ConnectFailed,
        ErrorKind::ConnectTimeout,
        ErrorKind::Timeout,
        ErrorKind::ConnectionClosed,
        ErrorKind::ConnectionLost,
        ErrorKind::ReplyParse,
        ErrorKind::UnexpectedReply,
        ErrorKind::Abandoned,
        ErrorKind::ReplyCount,
        ErrorKind::Overloaded,
        ErrorKind::Ejected,
    ];

    fn addr() -> SocketAddr {
        "10.0.0.5:11211".parse().unwrap()
    }

    #[test]
    fn each_kind_says_what_it_is_whether_retrying_helps_and_what_clients_hear() {
        use ErrorKind::*;
        let expected = [
            (Unavailable, "unavailable", true, "backend unavailable"),
            (
                ConnectRefused,
                "connection refused",
                true,
                "backend unavailable",
            ),
            (ConnectFailed, "connect failed", true, "backend unavailable"),
            (
                ConnectTimeout,
                "connect timeout",
                true,
                "backend unavailable",
            ),
            (Timeout, "timeout", false, "backend timeout"),
            (
                ConnectionClosed,
                "connection closed",
                false,
                "backend connection lost",
            ),
            (
                ConnectionLost,
                "connection lost",
                false,
                "backend connection lost",
            ),
            (
                ReplyParse,
                "reply parse error",
                false,
                "backend connection lost",
            ),
            (
                UnexpectedReply,
                "reply to no request",
                false,
                "backend connection lost",
            ),
            (
                Abandoned,
                "request abandoned",
                false,
                "backend connection lost",
            ),
            (
                ReplyCount,
                "reply count mismatch",
                false,
                "backend connection lost",
            ),
            (
                Overloaded,
                "too many requests in flight",
                true,
                "backend overloaded",
            ),
            (Ejected, "ejected", true, "backend unavailable"),
        ];
        assert_eq!(expected.len(), ALL.len());
        for ((kind, text, retry, reply), listed) in expected.into_iter().zip(ALL) {
            assert_eq!(kind, listed);
            assert_eq!(kind.to_string(), text);
            assert_eq!(kind.retryable(), retry, "{kind:?}");
            let e = ProxyError::backend(addr(), kind);
            assert_eq!(e.retryable(), retry, "{kind:?}");
            assert_eq!(e.reply_text(), reply, "{kind:?}");
            assert_eq!(e.to_string(), format!("backend 10.0.0.5:11211: {text}"));
        }
    }

    #[test]
    fn the_side_is_named_and_a_backend_kept_beside_it() {
        let e = ProxyError::new(Side::Internal, ErrorKind::Abandoned);
        assert_eq!(e.side(), Side::Internal);
        assert_eq!(e.backend_addr(), None);
        assert_eq!(e.to_string(), "internal: request abandoned");
        let e = e.at(addr());
        assert_eq!(e.backend_addr(), Some(addr()));
        assert_eq!(
            e.to_string(),
            "internal (backend 10.0.0.5:11211): request abandoned"
        );
        let e = ProxyError::new(Side::Client, ErrorKind::ConnectionClosed);
        assert_eq!(e.side(), Side::Client);
        assert_eq!(e.to_string(), "client: connection closed");
        assert_eq!(
            ProxyError::backend(addr(), ErrorKind::Timeout).side(),
            Side::Backend
        );
    }

    #[test]
    fn the_cause_is_the_source_and_the_report_shows_it() {
        let io = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        let e = ProxyError::backend(addr(), ErrorKind::ConnectRefused).because(io);
        assert!(matches!(e.cause(), Some(Cause::Io(_))));
        assert_eq!(e.source().unwrap().to_string(), "refused");
        // Display leaves the cause to `source`; the report has both.
        assert_eq!(e.to_string(), "backend 10.0.0.5:11211: connection refused");
        assert_eq!(
            e.report().to_string(),
            "backend 10.0.0.5:11211: connection refused: refused"
        );

        let e = ProxyError::backend(addr(), ErrorKind::Timeout)
            .because(Cause::Elapsed(Duration::from_millis(250)));
        assert_eq!(
            e.report().to_string(),
            "backend 10.0.0.5:11211: timeout: nothing within 250ms"
        );

        let mut buf = BytesMut::from(&b"VA x\r\n"[..]);
        let parse = parse_response(&mut buf, &Limits::default()).unwrap_err();
        assert_eq!(parse.kind, ParseKind::BadResponse);
        let e = ProxyError::backend(addr(), ErrorKind::ReplyParse).because(parse.clone());
        assert_eq!(
            e.report().to_string(),
            format!("backend 10.0.0.5:11211: reply parse error: {parse}")
        );
        assert!(matches!(e.cause(), Some(Cause::Protocol(p)) if *p == parse));

        let e = ProxyError::backend(addr(), ErrorKind::ConnectionClosed);
        assert!(e.source().is_none());
        assert_eq!(e.report().to_string(), e.to_string());
    }

    #[test]
    fn an_unrequested_reply_is_quoted_escaped_and_cut() {
        let busy = Response::Text(TextResponse::Other(Bytes::from_static(
            b"ERROR Too many open connections",
        )));
        let e = ProxyError::backend(addr(), ErrorKind::UnexpectedReply)
            .because(Cause::unrequested(&busy));
        assert_eq!(
            e.report().to_string(),
            r#"backend 10.0.0.5:11211: reply to no request: sent "ERROR Too many open connections\r\n""#
        );
        let long = Response::Text(TextResponse::Other(Bytes::from(vec![b'x'; 100])));
        let Cause::Unrequested(text) = Cause::unrequested(&long) else {
            unreachable!()
        };
        assert_eq!(text, format!("{}…", "x".repeat(64)));
    }

    #[test]
    fn clones_share_the_cause() {
        let e = ProxyError::backend(addr(), ErrorKind::ConnectionLost)
            .because(io::Error::from(io::ErrorKind::BrokenPipe));
        let copy = e.clone();
        assert!(std::ptr::eq(e.cause().unwrap(), copy.cause().unwrap()));
        assert_eq!(copy.report().to_string(), e.report().to_string());
    }
}
