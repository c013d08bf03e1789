//! Authentication on the wire: what a session reads and answers before
//! (and instead of) proxying, as memcached 1.6 does.
//!
//! **Binary protocol, SASL** (memcached `-S`): `SASL_LIST_MECHS` (0x20) is
//! answered with the mechanism list, [`SASL_MECHANISMS`] (`PLAIN`).
//! `SASL_AUTH` (0x21) carries the mechanism in the key and the PLAIN
//! message (RFC 4616: `[authzid] NUL username NUL password`) in the value;
//! success is status 0 with the body `Authenticated`, failure status 0x20
//! `Auth failure.`. PLAIN has one step, so `SASL_STEP` (0x22) always fails.
//! Before authenticating, every opcode but those and `VERSION` gets 0x20
//! ([`binary_allowed_before_auth`]).
//!
//! **Text protocol** (memcached `-Y`, proto_text.c
//! `try_read_command_asciiauth`): the first command must be
//! `set <any key> <flags> <exptime> <bytes>` whose data block is
//! `username password` — split at the first space, so the password may
//! hold spaces; key, flags and exptime are ignored. Replies: `STORED` on
//! success, `CLIENT_ERROR authentication failure` on a wrong credential,
//! `CLIENT_ERROR bad authentication token format` when the block has no
//! space, and `CLIENT_ERROR unauthenticated` for any other command (the
//! line is consumed, the connection stays open and may try again).
//! memcached answers a data block without CRLF with `CLIENT_ERROR bad
//! command line termination`; our parser answers it first, with `bad data
//! chunk`.
//!
//! A verification that is refused for load ([`super::AuthError::Busy`]) is
//! answered `SERVER_ERROR authentication busy, retry` (text) or status
//! 0x0085 (binary) — memcached has no such case; clients treat both as
//! retryable server errors.

use std::fmt;

use bytes::Bytes;

use super::AuthError;
use crate::protocol::{
    BinaryRequest, BinaryResponse, Opcode, Request, Status, StoreCommand, TextRequest,
};

/// The mechanisms offered, as `SASL_LIST_MECHS` returns them.
pub const SASL_MECHANISMS: &[u8] = b"PLAIN";
/// Longest SASL username or password (RFC 4616: 255 octets each).
pub const MAX_SASL_FIELD: usize = 255;

/// Text reply: authenticated.
pub const TEXT_AUTH_OK: &[u8] = b"STORED\r\n";
/// Text reply: wrong username or password.
pub const TEXT_AUTH_FAILED: &[u8] = b"CLIENT_ERROR authentication failure\r\n";
/// Text reply: any command but the auth `set` before authenticating.
pub const TEXT_UNAUTHENTICATED: &[u8] = b"CLIENT_ERROR unauthenticated\r\n";
/// Text reply: the auth `set`'s data block is not `username password`.
pub const TEXT_AUTH_BAD_FORMAT: &[u8] = b"CLIENT_ERROR bad authentication token format\r\n";
/// Text reply: too many verifications in progress; retry.
pub const TEXT_AUTH_BUSY: &[u8] = b"SERVER_ERROR authentication busy, retry\r\n";

/// A username and password as a client sent them. `Debug` hides the
/// password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: Bytes,
    pub password: Bytes,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &String::from_utf8_lossy(&self.username))
            .field("password", &"<hidden>")
            .finish()
    }
}

/// Why a SASL request is refused before any password is checked. Each is
/// answered like a wrong password (status 0x20).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("unsupported SASL mechanism (only PLAIN)")]
    UnknownMechanism,
    #[error("malformed SASL PLAIN message")]
    Malformed,
    #[error("SASL PLAIN authorization identity differs from the username")]
    AuthzidMismatch,
    #[error("SASL PLAIN field longer than 255 bytes")]
    TooLong,
    #[error("PLAIN has no second step")]
    UnexpectedStep,
}

/// Parses a SASL PLAIN message: `NUL user NUL pass` or
/// `authzid NUL user NUL pass`. An authorization identity other than the
/// username itself is refused: a client cannot act as another user.
pub fn parse_sasl_plain(message: &Bytes) -> Result<Credentials, SaslError> {
    let mut nuls = message
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == 0)
        .map(|(i, _)| i);
    let (Some(a), Some(b), None) = (nuls.next(), nuls.next(), nuls.next()) else {
        return Err(SaslError::Malformed);
    };
    let authzid = &message[..a];
    let username = message.slice(a + 1..b);
    let password = message.slice(b + 1..);
    if username.is_empty() || password.is_empty() {
        return Err(SaslError::Malformed);
    }
    if authzid.len() > MAX_SASL_FIELD
        || username.len() > MAX_SASL_FIELD
        || password.len() > MAX_SASL_FIELD
    {
        return Err(SaslError::TooLong);
    }
    if !authzid.is_empty() && authzid != &username[..] {
        return Err(SaslError::AuthzidMismatch);
    }
    Ok(Credentials { username, password })
}

/// The credentials of a binary `SASL_AUTH` (or the error for
/// `SASL_STEP`, or a mechanism other than PLAIN).
pub fn sasl_auth_credentials(req: &BinaryRequest) -> Result<Credentials, SaslError> {
    match req.opcode {
        Opcode::SaslAuth if &req.key[..] == SASL_MECHANISMS => parse_sasl_plain(&req.value),
        Opcode::SaslAuth => Err(SaslError::UnknownMechanism),
        _ => Err(SaslError::UnexpectedStep),
    }
}

/// The reply to `SASL_LIST_MECHS`.
pub fn sasl_list_mechs_response(req: &BinaryRequest) -> BinaryResponse {
    BinaryResponse {
        value: Bytes::from_static(SASL_MECHANISMS),
        ..BinaryResponse::new(req.opcode as u8, req.opaque)
    }
}

/// The reply to a successful `SASL_AUTH`.
pub fn sasl_auth_ok(req: &BinaryRequest) -> BinaryResponse {
    BinaryResponse {
        value: Bytes::from_static(b"Authenticated"),
        ..BinaryResponse::new(req.opcode as u8, req.opaque)
    }
}

/// The reply to a failed `SASL_AUTH`/`SASL_STEP`: 0x20, or 0x85 when the
/// verifier was busy.
pub fn sasl_auth_failed(req: &BinaryRequest, error: AuthError) -> BinaryResponse {
    match error {
        AuthError::InvalidCredentials => {
            BinaryResponse::error(req.opcode as u8, req.opaque, Status::AUTH_ERROR)
        }
        AuthError::Busy => BinaryResponse {
            status: Status::BUSY,
            value: Bytes::from_static(b"Authentication busy, retry"),
            ..BinaryResponse::new(req.opcode as u8, req.opaque)
        },
    }
}

/// Whether a binary opcode is served before authentication.
pub fn binary_allowed_before_auth(opcode: Opcode) -> bool {
    matches!(
        opcode,
        Opcode::SaslListMechs | Opcode::SaslAuth | Opcode::SaslStep | Opcode::Version
    )
}

/// The reply to any other binary request before authentication (0x20).
pub fn binary_unauthenticated(req: &BinaryRequest) -> BinaryResponse {
    BinaryResponse::error(req.opcode as u8, req.opaque, Status::AUTH_ERROR)
}

/// Why a text command is not a valid authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TextAuthError {
    /// Not a `set`: answer [`TEXT_UNAUTHENTICATED`].
    #[error("unauthenticated")]
    NotAuthCommand,
    /// The data block has no space: answer [`TEXT_AUTH_BAD_FORMAT`].
    #[error("bad authentication token format")]
    BadFormat,
}

impl TextAuthError {
    /// The line memcached answers with.
    pub fn reply(self) -> &'static [u8] {
        match self {
            TextAuthError::NotAuthCommand => TEXT_UNAUTHENTICATED,
            TextAuthError::BadFormat => TEXT_AUTH_BAD_FORMAT,
        }
    }
}

/// The credentials of a text-protocol authentication: the first command
/// must be a `set` (any key, flags, exptime, `noreply` ignored).
pub fn text_auth_credentials(req: &TextRequest) -> Result<Credentials, TextAuthError> {
    match req {
        TextRequest::Store(s) if s.command == StoreCommand::Set => parse_text_auth_value(&s.value),
        _ => Err(TextAuthError::NotAuthCommand),
    }
}

/// [`text_auth_credentials`] for a request of any text-side protocol: a
/// meta command (`mg`, `ms`, …) before authenticating is answered
/// [`TEXT_UNAUTHENTICATED`] too. Binary requests authenticate with SASL
/// instead ([`sasl_auth_credentials`]) and are refused here.
pub fn request_auth_credentials(req: &Request) -> Result<Credentials, TextAuthError> {
    match req {
        Request::Text(t) => text_auth_credentials(t),
        Request::Meta(_) | Request::Binary(_) => Err(TextAuthError::NotAuthCommand),
    }
}

/// Splits an auth data block (without its CRLF) at the first space:
/// `username password`.
pub fn parse_text_auth_value(value: &Bytes) -> Result<Credentials, TextAuthError> {
    let space = value
        .iter()
        .position(|&b| b == b' ')
        .ok_or(TextAuthError::BadFormat)?;
    Ok(Credentials {
        username: value.slice(..space),
        password: value.slice(space + 1..),
    })
}

/// The text reply for an authentication outcome.
pub fn text_auth_reply<T>(result: &Result<T, AuthError>) -> &'static [u8] {
    match result {
        Ok(_) => TEXT_AUTH_OK,
        Err(AuthError::InvalidCredentials) => TEXT_AUTH_FAILED,
        Err(AuthError::Busy) => TEXT_AUTH_BUSY,
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::protocol::{Limits, text};

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    #[test]
    fn sasl_plain_forms() {
        let c = parse_sasl_plain(&b(b"\0alice\0s3cret")).unwrap();
        assert_eq!(c.username, &b"alice"[..]);
        assert_eq!(c.password, &b"s3cret"[..]);
        let c = parse_sasl_plain(&b(b"alice\0alice\0pass word")).unwrap();
        assert_eq!(c.password, &b"pass word"[..]);
        assert!(!format!("{c:?}").contains("pass word"));
    }

    #[test]
    fn sasl_plain_rejects_malformed() {
        for (msg, want) in [
            (&b""[..], SaslError::Malformed),
            (b"alice", SaslError::Malformed),
            (b"\0alice", SaslError::Malformed),
            (b"\0alice\0", SaslError::Malformed),
            (b"\0\0pass", SaslError::Malformed),
            (b"\0alice\0pa\0ss", SaslError::Malformed),
            (b"bob\0alice\0pass", SaslError::AuthzidMismatch),
        ] {
            assert_eq!(parse_sasl_plain(&b(msg)), Err(want), "{msg:?}");
        }
        let mut long = b"\0".to_vec();
        long.extend([b'u'; 256]);
        long.extend(b"\0p");
        assert_eq!(parse_sasl_plain(&b(&long)), Err(SaslError::TooLong));
    }

    #[test]
    fn binary_sasl_requests_and_replies() {
        let mut req = BinaryRequest::new(Opcode::SaslListMechs);
        req.opaque = 7;
        let r = sasl_list_mechs_response(&req);
        assert_eq!(r.status, Status::SUCCESS);
        assert_eq!(&r.value[..], b"PLAIN");
        assert_eq!(r.opaque, 7);

        let mut auth = BinaryRequest::new(Opcode::SaslAuth);
        auth.key = b(b"PLAIN");
        auth.value = b(b"\0alice\0pw");
        assert_eq!(
            sasl_auth_credentials(&auth).unwrap().username,
            &b"alice"[..]
        );
        auth.key = b(b"CRAM-MD5");
        assert_eq!(
            sasl_auth_credentials(&auth),
            Err(SaslError::UnknownMechanism)
        );
        let step = BinaryRequest::new(Opcode::SaslStep);
        assert_eq!(sasl_auth_credentials(&step), Err(SaslError::UnexpectedStep));

        let ok = sasl_auth_ok(&auth);
        assert_eq!(
            (ok.status, &ok.value[..]),
            (Status::SUCCESS, &b"Authenticated"[..])
        );
        let failed = sasl_auth_failed(&auth, AuthError::InvalidCredentials);
        assert_eq!(failed.status, Status(0x20));
        assert_eq!(&failed.value[..], b"Auth failure.");
        assert_eq!(
            sasl_auth_failed(&auth, AuthError::Busy).status,
            Status::BUSY
        );

        assert!(binary_allowed_before_auth(Opcode::SaslAuth));
        assert!(binary_allowed_before_auth(Opcode::Version));
        assert!(!binary_allowed_before_auth(Opcode::Get));
        assert!(!binary_allowed_before_auth(Opcode::Flush));
        let get = BinaryRequest::new(Opcode::Get);
        assert_eq!(binary_unauthenticated(&get).status, Status::AUTH_ERROR);
    }

    fn parse_text(wire: &[u8]) -> TextRequest {
        let mut buf = BytesMut::from(wire);
        match text::parse_request(&mut buf, &Limits::default()) {
            Ok(Some(crate::protocol::Request::Text(r))) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn text_auth_from_a_set() {
        let req = parse_text(b"set anykey 0 0 15\r\nalice s3cret pw\r\n");
        let c = text_auth_credentials(&req).unwrap();
        assert_eq!(c.username, &b"alice"[..]);
        assert_eq!(c.password, &b"s3cret pw"[..]);
        // Key, flags, exptime and noreply do not matter.
        let req = parse_text(b"set x 5 100 7 noreply\r\nbob pw1\r\n");
        assert_eq!(text_auth_credentials(&req).unwrap().username, &b"bob"[..]);
    }

    #[test]
    fn text_auth_rejects_other_commands_and_bad_blocks() {
        let req = parse_text(b"set k 0 0 5\r\nalice\r\n");
        assert_eq!(text_auth_credentials(&req), Err(TextAuthError::BadFormat));
        assert_eq!(
            TextAuthError::BadFormat.reply(),
            b"CLIENT_ERROR bad authentication token format\r\n"
        );
        for wire in [
            &b"get k\r\n"[..],
            b"add k 0 0 4\r\na bc\r\n",
            b"delete k\r\n",
            b"version\r\n",
        ] {
            let req = parse_text(wire);
            assert_eq!(
                text_auth_credentials(&req),
                Err(TextAuthError::NotAuthCommand),
                "{wire:?}"
            );
        }
        assert_eq!(
            TextAuthError::NotAuthCommand.reply(),
            b"CLIENT_ERROR unauthenticated\r\n"
        );
        // Meta commands are not the auth command either.
        let mut buf = BytesMut::from(&b"mg foo v\r\n"[..]);
        let req = crate::protocol::parse_request(&mut buf, &Limits::default())
            .unwrap()
            .unwrap();
        assert!(matches!(req, Request::Meta(_)));
        assert_eq!(
            request_auth_credentials(&req),
            Err(TextAuthError::NotAuthCommand)
        );
        let mut buf = BytesMut::from(&b"set k 0 0 4\r\na bc\r\n"[..]);
        let req = crate::protocol::parse_request(&mut buf, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(request_auth_credentials(&req).unwrap().password, &b"bc"[..]);
        // An empty username is well-formed and simply fails to match.
        let c = parse_text_auth_value(&b(b" pw")).unwrap();
        assert!(c.username.is_empty());
    }

    #[test]
    fn text_replies() {
        assert_eq!(text_auth_reply(&Ok::<(), _>(())), b"STORED\r\n");
        assert_eq!(
            text_auth_reply::<()>(&Err(AuthError::InvalidCredentials)),
            b"CLIENT_ERROR authentication failure\r\n"
        );
        assert!(text_auth_reply::<()>(&Err(AuthError::Busy)).starts_with(b"SERVER_ERROR"));
    }
}
