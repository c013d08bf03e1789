//! Meta commands (`mg`, `ms`, `md`, `ma`, `mn`, `me`) and meta replies.
//!
//! Flags are kept as an ordered list of `(flag byte, token)` so a proxy can
//! read or rewrite individual flags and re-encode the rest verbatim.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{BufMut, Bytes, BytesMut};

use super::error::{ErrorKind, ProtocolError};
use super::wire::{
    Span, Toks, is_valid_text_key, parse_i32, parse_u32, parse_u64, put_u64, tokens,
};
use super::{Limits, Protocol, ReplyShape};

/// memcached refuses meta lines with more tokens than this
/// (MFLAG_MAX_OPT_LENGTH).
pub const MAX_META_TOKENS: usize = 20;
/// memcached's limit on an `O` token, flag byte included.
pub const MAX_OPAQUE_LEN: usize = 32;

/// Which meta command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaCommand {
    Get,
    Set,
    Delete,
    Arithmetic,
    Noop,
    Debug,
}

impl MetaCommand {
    /// Recognises the two-letter command word.
    pub fn from_name(name: &[u8]) -> Option<Self> {
        Some(match name {
            b"mg" => MetaCommand::Get,
            b"ms" => MetaCommand::Set,
            b"md" => MetaCommand::Delete,
            b"ma" => MetaCommand::Arithmetic,
            b"mn" => MetaCommand::Noop,
            b"me" => MetaCommand::Debug,
            _ => return None,
        })
    }

    /// The command word on the wire.
    pub fn name(self) -> &'static str {
        match self {
            MetaCommand::Get => "mg",
            MetaCommand::Set => "ms",
            MetaCommand::Delete => "md",
            MetaCommand::Arithmetic => "ma",
            MetaCommand::Noop => "mn",
            MetaCommand::Debug => "me",
        }
    }

    /// Whether memcached omits a reply with this code when the request had
    /// the `q` flag. Errors and value-bearing replies are never omitted.
    /// memcached 1.6.18 (Debian's) still sends `NF` for a quiet `md`/`ma`;
    /// checked against it by the proxy conformance tests.
    pub fn quiet_suppresses(self, code: MetaCode) -> bool {
        matches!(
            (self, code),
            (MetaCommand::Get, MetaCode::En)
                | (MetaCommand::Set, MetaCode::Hd)
                | (MetaCommand::Delete, MetaCode::Hd)
                | (MetaCommand::Arithmetic, MetaCode::Hd)
        )
    }
}

/// One flag: its letter and the token glued to it (`T30` → `T`, `30`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaFlag {
    pub flag: u8,
    pub token: Bytes,
}

impl MetaFlag {
    /// A flag with a token.
    pub fn new(flag: u8, token: impl Into<Bytes>) -> Self {
        MetaFlag {
            flag,
            token: token.into(),
        }
    }
}

/// `ms` mode (`M` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    Set,
    Add,
    Append,
    Prepend,
    Replace,
}

/// `ma` mode (`M` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArithMode {
    Incr,
    Decr,
}

/// A parsed meta request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub command: MetaCommand,
    /// The key token as sent: base64 text when the `b` flag is present,
    /// empty for `mn`.
    pub key: Bytes,
    pub flags: Vec<MetaFlag>,
    /// `ms` data block without its CRLF; `None` for other commands.
    pub value: Option<Bytes>,
}

fn flag_list(flags: &[MetaFlag], f: u8) -> Option<&MetaFlag> {
    flags.iter().find(|x| x.flag == f)
}

fn set_flag_in(flags: &mut Vec<MetaFlag>, f: u8, token: Bytes) {
    match flags.iter_mut().find(|x| x.flag == f) {
        Some(x) => x.token = token,
        None => flags.push(MetaFlag { flag: f, token }),
    }
}

fn decode_key(key: &[u8]) -> Option<Bytes> {
    match BASE64.decode(key) {
        Ok(v) if !v.is_empty() => Some(Bytes::from(v)),
        _ => None,
    }
}

fn put_flags(out: &mut BytesMut, flags: &[MetaFlag]) {
    for f in flags {
        out.put_u8(b' ');
        out.put_u8(f.flag);
        out.put_slice(&f.token);
    }
}

impl MetaRequest {
    /// The flag with letter `f`, if present.
    pub fn flag(&self, f: u8) -> Option<&MetaFlag> {
        flag_list(&self.flags, f)
    }

    /// Whether flag `f` is present.
    pub fn has_flag(&self, f: u8) -> bool {
        self.flag(f).is_some()
    }

    /// `q`: nominal replies are omitted (see [`MetaCommand::quiet_suppresses`]).
    pub fn quiet(&self) -> bool {
        self.has_flag(b'q')
    }

    /// `b`: the key token is base64.
    pub fn base64_key(&self) -> bool {
        self.has_flag(b'b')
    }

    /// `O` opaque token, echoed back in the reply.
    pub fn opaque(&self) -> Option<&Bytes> {
        self.flag(b'O').map(|f| &f.token)
    }

    /// Sets (or replaces) flag `f` with `token`.
    pub fn set_flag(&mut self, f: u8, token: impl Into<Bytes>) {
        set_flag_in(&mut self.flags, f, token.into());
    }

    /// Removes flag `f`, returning it.
    pub fn remove_flag(&mut self, f: u8) -> Option<MetaFlag> {
        let i = self.flags.iter().position(|x| x.flag == f)?;
        Some(self.flags.remove(i))
    }

    /// The key as memcached stores it: base64-decoded under `b`. `None`
    /// only if a hand-built request carries an undecodable `b` key.
    pub fn decoded_key(&self) -> Option<Bytes> {
        if self.base64_key() {
            decode_key(&self.key)
        } else {
            Some(self.key.clone())
        }
    }

    /// Replaces the key given its stored (decoded) form, re-encoding it as
    /// base64 under `b`. The caller checks the result against the key limit.
    pub fn set_decoded_key(&mut self, key: &[u8]) {
        self.key = if self.base64_key() {
            Bytes::from(BASE64.encode(key))
        } else {
            Bytes::copy_from_slice(key)
        };
    }

    /// `ms` mode; `None` for other commands.
    pub fn store_mode(&self) -> Option<StoreMode> {
        if self.command != MetaCommand::Set {
            return None;
        }
        Some(match self.flag(b'M').and_then(|f| f.token.first()) {
            Some(b'E') => StoreMode::Add,
            Some(b'A') => StoreMode::Append,
            Some(b'P') => StoreMode::Prepend,
            Some(b'R') => StoreMode::Replace,
            _ => StoreMode::Set,
        })
    }

    /// `ma` mode; `None` for other commands.
    pub fn arith_mode(&self) -> Option<ArithMode> {
        if self.command != MetaCommand::Arithmetic {
            return None;
        }
        Some(match self.flag(b'M').and_then(|f| f.token.first()) {
            Some(b'D' | b'-') => ArithMode::Decr,
            _ => ArithMode::Incr,
        })
    }

    /// `mn` replies only after every earlier request has replied, so it
    /// marks where unanswered quiet requests are known to be suppressed.
    pub fn is_barrier(&self) -> bool {
        self.command == MetaCommand::Noop
    }

    /// How the reply to this request is delimited.
    pub fn reply_shape(&self) -> ReplyShape {
        if self.quiet() && self.command != MetaCommand::Noop {
            ReplyShape::Quiet
        } else {
            ReplyShape::One
        }
    }

    /// Writes the request in wire form.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_slice(self.command.name().as_bytes());
        if self.command != MetaCommand::Noop {
            out.put_u8(b' ');
            out.put_slice(&self.key);
        }
        put_tail(out, self.value.as_ref(), &self.flags);
    }
}

fn meta_err(kind: ErrorKind, discard: usize) -> ProtocolError {
    ProtocolError::text(kind, discard).with_protocol(Protocol::Meta)
}

/// Validates flag tokens the way memcached's `_meta_flag_preparse` does.
fn check_flags(
    line: &[u8],
    start: usize,
    command: MetaCommand,
    key: &[u8],
) -> Result<(), ErrorKind> {
    let mut seen = [false; 128];
    for span in tokens(line).skip(start) {
        let tok = span.of(line);
        let f = tok[0];
        let arg = &tok[1..];
        if f >= 127 || seen[f as usize] {
            return Err(ErrorKind::DuplicateFlag);
        }
        seen[f as usize] = true;
        match f {
            b'b' => {
                // Stack buffer: a key token within the limit decodes to less.
                let mut out = [0u8; 256];
                match BASE64.decode_slice(key, &mut out) {
                    Ok(n) if n > 0 => {}
                    _ => return Err(ErrorKind::KeyDecode),
                }
            }
            b'N' | b'T' | b'R' => {
                parse_i32(arg).ok_or(ErrorKind::BadFlagToken)?;
            }
            b'F' => {
                parse_u32(arg).ok_or(ErrorKind::BadCommandLine)?;
            }
            b'C' | b'E' => {
                parse_u64(arg).ok_or(ErrorKind::BadFlagToken)?;
            }
            b'J' => {
                parse_u64(arg).ok_or(ErrorKind::InvalidInitial)?;
            }
            b'D' => {
                parse_u64(arg).ok_or(ErrorKind::InvalidDeltaValue)?;
            }
            b'O' => {
                if tok.len() > MAX_OPAQUE_LEN {
                    return Err(ErrorKind::OpaqueTooLong);
                }
            }
            b'M' => match (command, arg.first()) {
                (MetaCommand::Set, None | Some(b'E' | b'A' | b'P' | b'R' | b'S')) => {}
                (MetaCommand::Set, _) => return Err(ErrorKind::InvalidMsMode),
                (MetaCommand::Arithmetic, None | Some(b'I' | b'+' | b'D' | b'-')) => {}
                (MetaCommand::Arithmetic, _) => return Err(ErrorKind::InvalidMaMode),
                _ => {}
            },
            b'l' | b'P' | b'L' | b'k' | b's' | b't' | b'c' | b'f' | b'v' | b'h' | b'u' | b'q'
            | b'x' | b'I' => {}
            _ => return Err(ErrorKind::InvalidFlag),
        }
    }
    Ok(())
}

fn collect_flags(frame: &Bytes, line_len: usize, start: usize) -> Vec<MetaFlag> {
    tokens(&frame[..line_len])
        .skip(start)
        .map(|s| MetaFlag {
            flag: frame[s.start],
            token: frame.slice(s.start + 1..s.end),
        })
        .collect()
}

/// Parses a meta request whose complete line (`content` bytes, `total` with
/// terminator) is at the front of `buf`.
pub(super) fn parse_request(
    buf: &mut BytesMut,
    content: usize,
    total: usize,
    limits: &Limits,
) -> Result<Option<MetaRequest>, ProtocolError> {
    let line = &buf[..content];
    let toks = Toks::<3>::new(line);
    let Some(command) = MetaCommand::from_name(toks.get(0).of(line)) else {
        return Err(meta_err(ErrorKind::UnknownCommand, total));
    };
    if command == MetaCommand::Noop {
        // memcached ignores anything after `mn`.
        bytes::Buf::advance(buf, total);
        return Ok(Some(MetaRequest {
            command,
            key: Bytes::new(),
            flags: Vec::new(),
            value: None,
        }));
    }
    if toks.count < 2 {
        return Err(meta_err(ErrorKind::UnknownCommand, total));
    }
    let key: Span = toks.get(1);
    if !is_valid_text_key(key.of(line), limits.max_key_len) {
        return Err(meta_err(ErrorKind::BadCommandLine, total));
    }
    let (start, len) = if command == MetaCommand::Set {
        if toks.count < 3 {
            return Err(meta_err(ErrorKind::BadCommandLine, total));
        }
        match parse_i32(toks.get(2).of(line)) {
            Some(n) if n >= 0 => (3, Some(n as usize)),
            _ => return Err(meta_err(ErrorKind::BadCommandLine, total)),
        }
    } else {
        (2, None)
    };
    if toks.count > MAX_META_TOKENS {
        return Err(meta_err(ErrorKind::FlagsTooLong, total));
    }
    // Once an `ms` line's length is known memcached swallows the data block
    // on any later error, so the discard covers it.
    let frame_len = total + len.map_or(0, |n| n + 2);
    check_flags(line, start, command, key.of(line)).map_err(|k| meta_err(k, frame_len))?;
    if let Some(n) = len {
        if n > limits.max_value_len {
            return Err(meta_err(ErrorKind::TooLarge, frame_len));
        }
        if buf.len() < frame_len {
            return Ok(None);
        }
        if &buf[total + n..frame_len] != b"\r\n" {
            return Err(meta_err(ErrorKind::BadDataChunk, frame_len).closing());
        }
    }
    let frame = buf.split_to(frame_len).freeze();
    Ok(Some(MetaRequest {
        command,
        key: frame.slice(key.start..key.end),
        flags: collect_flags(&frame, content, start),
        value: len.map(|n| frame.slice(total..total + n)),
    }))
}

/// Meta reply code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaCode {
    /// Value follows.
    Va,
    /// Success, no value.
    Hd,
    /// Miss (`mg`).
    En,
    /// Not found.
    Nf,
    /// Not stored.
    Ns,
    /// CAS mismatch.
    Ex,
    /// `mn` reply.
    Mn,
    /// `me` reply.
    Me,
}

impl MetaCode {
    /// Recognises the two-letter reply code.
    pub fn from_name(name: &[u8]) -> Option<Self> {
        Some(match name {
            b"VA" => MetaCode::Va,
            b"HD" => MetaCode::Hd,
            b"EN" => MetaCode::En,
            b"NF" => MetaCode::Nf,
            b"NS" => MetaCode::Ns,
            b"EX" => MetaCode::Ex,
            b"MN" => MetaCode::Mn,
            b"ME" => MetaCode::Me,
            _ => return None,
        })
    }

    /// The code on the wire.
    pub fn name(self) -> &'static str {
        match self {
            MetaCode::Va => "VA",
            MetaCode::Hd => "HD",
            MetaCode::En => "EN",
            MetaCode::Nf => "NF",
            MetaCode::Ns => "NS",
            MetaCode::Ex => "EX",
            MetaCode::Mn => "MN",
            MetaCode::Me => "ME",
        }
    }
}

/// A meta reply. For `ME` the key is in `key` and the `name=value` tokens
/// stay in `flags`, split at their first byte so they re-encode verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaResponse {
    pub code: MetaCode,
    pub flags: Vec<MetaFlag>,
    /// `VA` data block without its CRLF.
    pub value: Option<Bytes>,
    /// `ME` key.
    pub key: Option<Bytes>,
}

impl MetaResponse {
    /// A reply with no flags.
    pub fn new(code: MetaCode) -> Self {
        MetaResponse {
            code,
            flags: Vec::new(),
            value: None,
            key: None,
        }
    }

    /// The flag with letter `f`, if present.
    pub fn flag(&self, f: u8) -> Option<&MetaFlag> {
        flag_list(&self.flags, f)
    }

    /// Sets (or replaces) flag `f`.
    pub fn set_flag(&mut self, f: u8, token: impl Into<Bytes>) {
        set_flag_in(&mut self.flags, f, token.into());
    }

    /// Echoed `O` opaque token.
    pub fn opaque(&self) -> Option<&Bytes> {
        self.flag(b'O').map(|f| &f.token)
    }

    /// The key returned by a `k` flag, base64-decoded when the reply also
    /// carries `b`.
    pub fn returned_key(&self) -> Option<Bytes> {
        let k = &self.flag(b'k')?.token;
        if self.flag(b'b').is_some() {
            decode_key(k)
        } else {
            Some(k.clone())
        }
    }

    /// Replaces the `k` token given the stored key (re-encoded under `b`),
    /// e.g. to strip a tenant prefix before replying to the client.
    pub fn set_returned_key(&mut self, key: &[u8]) {
        let token = if self.flag(b'b').is_some() {
            Bytes::from(BASE64.encode(key))
        } else {
            Bytes::copy_from_slice(key)
        };
        self.set_flag(b'k', token);
    }

    /// Writes the reply in wire form.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_slice(self.code.name().as_bytes());
        if let Some(k) = &self.key {
            out.put_u8(b' ');
            out.put_slice(k);
        }
        put_tail(out, self.value.as_ref(), &self.flags);
    }
}

/// Parses a meta reply whose complete line is at the front of `buf`.
pub(super) fn parse_response(
    buf: &mut BytesMut,
    content: usize,
    total: usize,
    limits: &Limits,
) -> Result<Option<MetaResponse>, ProtocolError> {
    let bad = |buf: &BytesMut| {
        ProtocolError::text(ErrorKind::BadResponse, buf.len().max(1))
            .with_protocol(Protocol::Meta)
            .closing()
    };
    let line = &buf[..content];
    let toks = Toks::<2>::new(line);
    let Some(code) = MetaCode::from_name(toks.get(0).of(line)) else {
        return Err(bad(buf));
    };
    let mut start = 1;
    let mut key = None;
    let mut len = None;
    match code {
        MetaCode::Va => {
            let Some(n) = (toks.count >= 2)
                .then(|| parse_u32(toks.get(1).of(line)))
                .flatten()
            else {
                return Err(bad(buf));
            };
            len = Some(n as usize);
            start = 2;
        }
        MetaCode::Me => {
            if toks.count < 2 {
                return Err(bad(buf));
            }
            key = Some(toks.get(1));
            start = 2;
        }
        _ => {}
    }
    let frame_len = total + len.map_or(0, |n| n + 2);
    if let Some(n) = len {
        if n > limits.max_value_len {
            return Err(meta_err(ErrorKind::TooLarge, frame_len));
        }
        if buf.len() < frame_len {
            return Ok(None);
        }
        if &buf[total + n..frame_len] != b"\r\n" {
            return Err(bad(buf));
        }
    }
    let frame = buf.split_to(frame_len).freeze();
    Ok(Some(MetaResponse {
        code,
        flags: collect_flags(&frame, content, start),
        value: len.map(|n| frame.slice(total..total + n)),
        key: key.map(|s| frame.slice(s.start..s.end)),
    }))
}

/// The part requests and replies share: ` <datalen>`, flags, CRLF, then the
/// data block if there is one.
fn put_tail(out: &mut BytesMut, value: Option<&Bytes>, flags: &[MetaFlag]) {
    if let Some(v) = value {
        out.reserve(v.len() + 64);
        out.put_u8(b' ');
        put_u64(out, v.len() as u64);
    }
    put_flags(out, flags);
    out.put_slice(b"\r\n");
    if let Some(v) = value {
        out.put_slice(v);
        out.put_slice(b"\r\n");
    }
}
