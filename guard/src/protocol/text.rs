//! Classic text protocol: requests, replies, and their encoders.
//!
//! Meta commands share the line framing, so [`parse_request`] and
//! [`parse_response`] hand `m*` lines and meta reply codes to `super::meta`.

use bytes::{BufMut, Bytes, BytesMut};

use super::admin::{AdminCommand, AdminRequest, StatsGroup, StatsLineError};
use super::error::{ErrorKind, ProtocolError};
use super::wire::{
    Dry, LineStatus, Slicer, Span, Toks, find_line, is_valid_text_key, parse_i32, parse_u32,
    parse_u64, put_i64, put_u64, strtoul_u32, tokens,
};
use super::{Limits, ReplyShape, Request, Response, meta};

/// Which retrieval command, with the exptime for the touching variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetKind {
    Get,
    Gets,
    Gat(i32),
    Gats(i32),
}

impl GetKind {
    /// Whether `VALUE` lines in the reply carry a CAS unique.
    pub fn returns_cas(self) -> bool {
        matches!(self, GetKind::Gets | GetKind::Gats(_))
    }
}

/// Storage command; `Cas` carries the compare-and-swap unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreCommand {
    Set,
    Add,
    Replace,
    Append,
    Prepend,
    Cas(u64),
}

impl StoreCommand {
    /// The command word on the wire.
    pub fn name(self) -> &'static str {
        match self {
            StoreCommand::Set => "set",
            StoreCommand::Add => "add",
            StoreCommand::Replace => "replace",
            StoreCommand::Append => "append",
            StoreCommand::Prepend => "prepend",
            StoreCommand::Cas(_) => "cas",
        }
    }
}

/// `get`/`gets`/`gat`/`gats` with their keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetRequest {
    pub kind: GetKind,
    pub keys: Vec<Bytes>,
}

/// `set`/`add`/`replace`/`append`/`prepend`/`cas` with the data block
/// (without its trailing CRLF).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRequest {
    pub command: StoreCommand,
    pub key: Bytes,
    pub flags: u32,
    pub exptime: i32,
    pub value: Bytes,
    pub noreply: bool,
}

/// A parsed classic text-protocol request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextRequest {
    Get(GetRequest),
    Store(StoreRequest),
    Incr {
        key: Bytes,
        delta: u64,
        noreply: bool,
    },
    Decr {
        key: Bytes,
        delta: u64,
        noreply: bool,
    },
    Delete {
        key: Bytes,
        noreply: bool,
    },
    Touch {
        key: Bytes,
        exptime: i32,
        noreply: bool,
    },
    FlushAll {
        delay: Option<i32>,
        noreply: bool,
    },
    Version,
    /// `verbosity <level> [noreply]`; the level as memcached reads it
    /// (`strtoul`, kept to 32 bits).
    Verbosity {
        level: u32,
        noreply: bool,
    },
    /// `stats [group …]`: which group memcached would answer.
    Stats(StatsGroup),
    /// One of memcached's administrative commands (`cache_memlimit`,
    /// `slabs`, `lru_crawler`, `lru`, `watch`, `extstore`, `shutdown`,
    /// `refresh_certs`).
    Admin(AdminRequest),
    Quit,
}

fn is_retrieval_line(buf: &[u8]) -> bool {
    [&b"get "[..], b"gets ", b"gat ", b"gats "]
        .iter()
        .any(|p| buf.starts_with(p))
}

/// Parses one text or meta request from the front of `buf`.
///
/// `Ok(None)`: incomplete, `buf` untouched. `Ok(Some(_))`: the frame was
/// split off `buf`. `Err(_)`: `buf` untouched, see [`ProtocolError`].
pub fn parse_request(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<Request>, ProtocolError> {
    let (content, total) = match find_line(
        buf,
        limits.max_line_len,
        limits.max_retrieval_line_len,
        is_retrieval_line,
    ) {
        LineStatus::Incomplete => return Ok(None),
        LineStatus::TooLong => {
            return Err(ProtocolError::text(ErrorKind::LineTooLong, buf.len()).closing());
        }
        LineStatus::Line { content, total } => (content, total),
    };
    let line = &buf[..content];
    let toks = Toks::<8>::new(line);
    if toks.count == 0 {
        return Err(ProtocolError::text(ErrorKind::UnknownCommand, total));
    }
    let cmd = toks.get(0).of(line);
    if meta::MetaCommand::from_name(cmd).is_some() {
        return meta::parse_request(buf, content, total, limits).map(|r| r.map(Request::Meta));
    }
    if let Some(mk) = store_command(cmd) {
        return parse_store(buf, content, total, &toks, mk, limits)
            .map(|r| r.map(|s| Request::Text(TextRequest::Store(s))));
    }
    let line = &buf[..content];
    let failed = |e: SimpleError| {
        let mut p = ProtocolError::text(e.kind, total);
        p.noreply = e.noreply;
        p
    };
    parse_simple(line, &Dry, limits).map_err(failed)?;
    let frame = buf.split_to(total).freeze();
    parse_simple(&frame[..content], &frame, limits)
        .map(|r| Some(Request::Text(r)))
        .map_err(failed)
}

/// Why a non-storage line failed, and whether memcached, having read a
/// last `noreply` before it found the fault (`set_noreply_maybe`), keeps
/// the error to itself.
#[derive(Debug, Clone, Copy)]
struct SimpleError {
    kind: ErrorKind,
    noreply: bool,
}

impl From<ErrorKind> for SimpleError {
    fn from(kind: ErrorKind) -> Self {
        Self {
            kind,
            noreply: false,
        }
    }
}

impl ErrorKind {
    /// This error, silenced when `noreply` was asked for.
    fn quiet_if(self, noreply: bool) -> SimpleError {
        SimpleError {
            kind: self,
            noreply,
        }
    }
}

#[derive(Clone, Copy)]
enum StoreKind {
    Plain(StoreCommand),
    Cas,
}

fn store_command(cmd: &[u8]) -> Option<StoreKind> {
    Some(StoreKind::Plain(match cmd {
        b"set" => StoreCommand::Set,
        b"add" => StoreCommand::Add,
        b"replace" => StoreCommand::Replace,
        b"append" => StoreCommand::Append,
        b"prepend" => StoreCommand::Prepend,
        b"cas" => return Some(StoreKind::Cas),
        _ => return None,
    }))
}

fn parse_store(
    buf: &mut BytesMut,
    content: usize,
    total: usize,
    toks: &Toks<8>,
    kind: StoreKind,
    limits: &Limits,
) -> Result<Option<StoreRequest>, ProtocolError> {
    let line = &buf[..content];
    let base = if matches!(kind, StoreKind::Cas) { 6 } else { 5 };
    if toks.count != base && toks.count != base + 1 {
        return Err(ProtocolError::text(ErrorKind::UnknownCommand, total));
    }
    // memcached only honours `noreply` as the optional last token; any other
    // extra token is ignored, which we mirror so data blocks stay in sync.
    let noreply = toks.count == base + 1 && toks.get(base).of(line) == b"noreply";
    let bad = |kind| {
        let mut e = ProtocolError::text(kind, total);
        e.noreply = noreply;
        e
    };
    let key = toks.get(1);
    if !is_valid_text_key(key.of(line), limits.max_key_len) {
        return Err(bad(ErrorKind::BadCommandLine));
    }
    let (Some(flags), Some(exptime), Some(len)) = (
        parse_u32(toks.get(2).of(line)),
        parse_i32(toks.get(3).of(line)),
        parse_i32(toks.get(4).of(line)),
    ) else {
        return Err(bad(ErrorKind::BadCommandLine));
    };
    let command = match kind {
        StoreKind::Plain(c) => c,
        StoreKind::Cas => match parse_u64(toks.get(5).of(line)) {
            Some(cas) => StoreCommand::Cas(cas),
            None => return Err(bad(ErrorKind::BadCommandLine)),
        },
    };
    if len < 0 {
        return Err(bad(ErrorKind::BadCommandLine));
    }
    let len = len as usize;
    let need = total + len + 2;
    if len > limits.max_value_len {
        // memcached swallows the data block, then answers: the caller skips
        // `need` bytes without ever buffering the value.
        let mut e = bad(ErrorKind::TooLarge);
        e.discard = need;
        return Err(e);
    }
    if buf.len() < need {
        return Ok(None);
    }
    if &buf[total + len..need] != b"\r\n" {
        let mut e = bad(ErrorKind::BadDataChunk).closing();
        e.discard = need;
        return Err(e);
    }
    let frame = buf.split_to(need).freeze();
    Ok(Some(StoreRequest {
        command,
        key: frame.slice(key.start..key.end),
        flags,
        exptime,
        value: frame.slice(total..total + len),
        noreply,
    }))
}

/// Every non-storage command: validated on a dry run, then rebuilt on the
/// frozen frame with the same code so both runs agree.
///
/// Where memcached reads a last `noreply` before it validates the rest
/// (its `set_noreply_maybe`: incr, decr, touch, delete, flush_all,
/// verbosity), an error found after it is silenced as memcached silences
/// it; token-count errors (`ERROR`) come first and never are.
fn parse_simple<S: Slicer>(
    line: &[u8],
    src: &S,
    limits: &Limits,
) -> Result<TextRequest, SimpleError> {
    use ErrorKind::*;
    let toks = Toks::<5>::new(line);
    let n = toks.count;
    let tok = |i: usize| toks.get(i).of(line);
    // memcached looks at the last token whatever the count; every caller
    // has bounded the count to what `toks` holds first.
    let last_is_noreply = || tok(n - 1) == b"noreply";
    let key = |i: usize, noreply: bool| -> Result<Bytes, SimpleError> {
        let span = toks.get(i);
        if is_valid_text_key(span.of(line), limits.max_key_len) {
            Ok(src.slice(span))
        } else {
            Err(BadCommandLine.quiet_if(noreply))
        }
    };
    Ok(match tok(0) {
        b"get" | b"gets" | b"gat" | b"gats" | b"bget" => {
            let kind = match tok(0) {
                // memcached still answers the ancient `bget` as `get`.
                b"get" | b"bget" => GetKind::Get,
                b"gets" => GetKind::Gets,
                cmd => {
                    if n < 3 {
                        return Err(UnknownCommand.into());
                    }
                    let exptime = parse_i32(tok(1)).ok_or(InvalidExptime)?;
                    if cmd == b"gat" {
                        GetKind::Gat(exptime)
                    } else {
                        GetKind::Gats(exptime)
                    }
                }
            };
            let skip = if matches!(kind, GetKind::Get | GetKind::Gets) {
                1
            } else {
                2
            };
            if n <= skip {
                return Err(UnknownCommand.into());
            }
            if n - skip > limits.max_keys_per_get {
                return Err(BadCommandLine.into());
            }
            let mut keys = Vec::with_capacity(if S::REAL { n - skip } else { 0 });
            for span in tokens(line).skip(skip) {
                if !is_valid_text_key(span.of(line), limits.max_key_len) {
                    return Err(BadCommandLine.into());
                }
                if S::REAL {
                    keys.push(src.slice(span));
                }
            }
            TextRequest::Get(GetRequest { kind, keys })
        }
        cmd @ (b"incr" | b"decr") => {
            if n != 3 && n != 4 {
                return Err(UnknownCommand.into());
            }
            let noreply = last_is_noreply();
            let key = key(1, noreply)?;
            let delta = parse_u64(tok(2)).ok_or(InvalidDelta.quiet_if(noreply))?;
            if cmd == b"incr" {
                TextRequest::Incr {
                    key,
                    delta,
                    noreply,
                }
            } else {
                TextRequest::Decr {
                    key,
                    delta,
                    noreply,
                }
            }
        }
        b"delete" => {
            if !(2..=4).contains(&n) {
                return Err(UnknownCommand.into());
            }
            // Ancient clients send a "0" hold time; memcached still takes it.
            let noreply = n > 2 && last_is_noreply();
            if n > 2 {
                let zero = tok(2) == b"0";
                let valid = (n == 3 && (zero || noreply)) || (n == 4 && zero && noreply);
                if !valid {
                    return Err(BadDeleteFormat.quiet_if(noreply));
                }
            }
            TextRequest::Delete {
                key: key(1, noreply)?,
                noreply,
            }
        }
        b"touch" => {
            if n != 3 && n != 4 {
                return Err(UnknownCommand.into());
            }
            let noreply = last_is_noreply();
            let key = key(1, noreply)?;
            let exptime = parse_i32(tok(2)).ok_or(InvalidExptime.quiet_if(noreply))?;
            TextRequest::Touch {
                key,
                exptime,
                noreply,
            }
        }
        b"flush_all" => {
            if n > 3 {
                return Err(UnknownCommand.into());
            }
            let noreply = n > 1 && last_is_noreply();
            let delay = if n != if noreply { 2 } else { 1 } {
                Some(parse_i32(tok(1)).ok_or(InvalidExptime.quiet_if(noreply))?)
            } else {
                None
            };
            TextRequest::FlushAll { delay, noreply }
        }
        b"version" => TextRequest::Version,
        b"quit" => TextRequest::Quit,
        b"verbosity" => {
            if n != 2 && n != 3 {
                return Err(UnknownCommand.into());
            }
            let noreply = last_is_noreply();
            let level = strtoul_u32(tok(1)).ok_or(BadCommandLine.quiet_if(noreply))?;
            TextRequest::Verbosity { level, noreply }
        }
        b"stats" => {
            let args: Vec<&[u8]> = tokens(line).skip(1).take(2).map(|s| s.of(line)).collect();
            match StatsGroup::from_text_args(&args) {
                Ok(group) => TextRequest::Stats(group),
                Err(StatsLineError::Unknown) => return Err(UnknownCommand.into()),
                Err(StatsLineError::DetailUsage) => return Err(StatsDetailUsage.into()),
            }
        }
        _ => admin(line, src)?,
    })
}

/// memcached's administrative commands, or `ERROR` for any other word.
fn admin<S: Slicer>(line: &[u8], src: &S) -> Result<TextRequest, SimpleError> {
    let spans: Vec<Span> = tokens(line).collect();
    let words: Vec<&[u8]> = spans.iter().map(|s| s.of(line)).collect();
    let command = match AdminCommand::from_tokens(&words) {
        Ok(Some(command)) => command,
        Ok(None) | Err(_) => return Err(ErrorKind::UnknownCommand.into()),
    };
    let noreply = command.honours_noreply() && words.last() == Some(&&b"noreply"[..]);
    let end = spans.len() - usize::from(noreply);
    let args = if S::REAL {
        spans[command.word_count().min(end)..end]
            .iter()
            .map(|s| src.slice(*s))
            .collect()
    } else {
        Vec::new()
    };
    Ok(TextRequest::Admin(AdminRequest {
        command,
        args,
        noreply,
    }))
}

fn put_key_list(out: &mut BytesMut, keys: &[Bytes]) {
    for k in keys {
        out.put_u8(b' ');
        out.put_slice(k);
    }
}

fn put_noreply(out: &mut BytesMut, noreply: bool) {
    if noreply {
        out.put_slice(b" noreply");
    }
}

impl TextRequest {
    /// Writes the request in wire form.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            TextRequest::Get(g) => g.encode(out),
            TextRequest::Store(s) => s.encode(out),
            TextRequest::Incr {
                key,
                delta,
                noreply,
            }
            | TextRequest::Decr {
                key,
                delta,
                noreply,
            } => {
                out.put_slice(if matches!(self, TextRequest::Incr { .. }) {
                    b"incr "
                } else {
                    b"decr "
                });
                out.put_slice(key);
                out.put_u8(b' ');
                put_u64(out, *delta);
                put_noreply(out, *noreply);
                out.put_slice(b"\r\n");
            }
            TextRequest::Delete { key, noreply } => {
                out.put_slice(b"delete ");
                out.put_slice(key);
                put_noreply(out, *noreply);
                out.put_slice(b"\r\n");
            }
            TextRequest::Touch {
                key,
                exptime,
                noreply,
            } => {
                out.put_slice(b"touch ");
                out.put_slice(key);
                out.put_u8(b' ');
                put_i64(out, i64::from(*exptime));
                put_noreply(out, *noreply);
                out.put_slice(b"\r\n");
            }
            TextRequest::FlushAll { delay, noreply } => {
                out.put_slice(b"flush_all");
                if let Some(d) = delay {
                    out.put_u8(b' ');
                    put_i64(out, i64::from(*d));
                }
                put_noreply(out, *noreply);
                out.put_slice(b"\r\n");
            }
            TextRequest::Version => out.put_slice(b"version\r\n"),
            TextRequest::Verbosity { level, noreply } => {
                out.put_slice(b"verbosity ");
                put_u64(out, u64::from(*level));
                put_noreply(out, *noreply);
                out.put_slice(b"\r\n");
            }
            TextRequest::Stats(group) => {
                out.put_slice(b"stats");
                if *group != StatsGroup::General {
                    out.put_u8(b' ');
                    out.put_slice(group.words().as_bytes());
                }
                out.put_slice(b"\r\n");
            }
            TextRequest::Admin(a) => {
                out.put_slice(a.command.words().as_bytes());
                put_key_list(out, &a.args);
                put_noreply(out, a.noreply);
                out.put_slice(b"\r\n");
            }
            TextRequest::Quit => out.put_slice(b"quit\r\n"),
        }
    }

    /// The keys this request addresses (empty for keyless commands).
    pub fn keys(&self) -> Vec<&Bytes> {
        match self {
            TextRequest::Get(g) => g.keys.iter().collect(),
            TextRequest::Store(s) => vec![&s.key],
            TextRequest::Incr { key, .. }
            | TextRequest::Decr { key, .. }
            | TextRequest::Delete { key, .. }
            | TextRequest::Touch { key, .. } => vec![key],
            _ => Vec::new(),
        }
    }

    /// Rewrites every key in place, e.g. to add a tenant prefix; the
    /// value block and other fields are shared, not copied.
    pub fn map_keys(&mut self, mut f: impl FnMut(&Bytes) -> Bytes) {
        match self {
            TextRequest::Get(g) => g.keys.iter_mut().for_each(|k| *k = f(k)),
            TextRequest::Store(s) => s.key = f(&s.key),
            TextRequest::Incr { key, .. }
            | TextRequest::Decr { key, .. }
            | TextRequest::Delete { key, .. }
            | TextRequest::Touch { key, .. } => *key = f(key),
            _ => {}
        }
    }

    /// Whether the client asked for no reply.
    pub fn noreply(&self) -> bool {
        match self {
            TextRequest::Store(s) => s.noreply,
            TextRequest::Incr { noreply, .. }
            | TextRequest::Decr { noreply, .. }
            | TextRequest::Delete { noreply, .. }
            | TextRequest::Touch { noreply, .. }
            | TextRequest::FlushAll { noreply, .. }
            | TextRequest::Verbosity { noreply, .. } => *noreply,
            TextRequest::Admin(a) => a.noreply,
            _ => false,
        }
    }

    /// How the server's reply to this request is delimited.
    pub fn reply_shape(&self) -> ReplyShape {
        match self {
            // `stats reset`, `stats detail on|off` and the refusals end
            // with a single line, which ends a multi-line reply too.
            TextRequest::Get(_) | TextRequest::Stats(_) => ReplyShape::Multi,
            TextRequest::Quit => ReplyShape::None,
            _ if self.noreply() => ReplyShape::None,
            _ => ReplyShape::One,
        }
    }
}

impl GetRequest {
    /// Writes `get|gets|gat|gats [exptime] key...\r\n`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self.kind {
            GetKind::Get => out.put_slice(b"get"),
            GetKind::Gets => out.put_slice(b"gets"),
            GetKind::Gat(e) | GetKind::Gats(e) => {
                out.put_slice(if matches!(self.kind, GetKind::Gat(_)) {
                    b"gat "
                } else {
                    b"gats "
                });
                put_i64(out, i64::from(e));
            }
        }
        put_key_list(out, &self.keys);
        out.put_slice(b"\r\n");
    }
}

impl StoreRequest {
    /// Writes the command line and the data block.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(self.key.len() + self.value.len() + 64);
        out.put_slice(self.command.name().as_bytes());
        out.put_u8(b' ');
        out.put_slice(&self.key);
        out.put_u8(b' ');
        put_u64(out, u64::from(self.flags));
        out.put_u8(b' ');
        put_i64(out, i64::from(self.exptime));
        out.put_u8(b' ');
        put_u64(out, self.value.len() as u64);
        if let StoreCommand::Cas(c) = self.command {
            out.put_u8(b' ');
            put_u64(out, c);
        }
        put_noreply(out, self.noreply);
        out.put_slice(b"\r\n");
        out.put_slice(&self.value);
        out.put_slice(b"\r\n");
    }
}

/// One unit of a text-protocol reply. A `get` reply is zero or more
/// `Value`s then `End`; `stats` is `Stat`s (or `Other` rows) then `End`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextResponse {
    Value {
        key: Bytes,
        flags: u32,
        cas: Option<u64>,
        data: Bytes,
    },
    End,
    Stored,
    NotStored,
    Exists,
    NotFound,
    Deleted,
    Touched,
    Ok,
    /// Reply to `stats reset`.
    Reset,
    /// incr/decr result.
    Number(u64),
    Version(Bytes),
    Stat {
        name: Bytes,
        value: Bytes,
    },
    Error,
    /// `CLIENT_ERROR <message>`: memcached refused the request.
    ClientError {
        /// What the message reports, read from it when parsed.
        kind: ErrorReplyKind,
        message: Bytes,
    },
    /// `SERVER_ERROR <message>`: memcached could not carry the request out.
    ServerError {
        /// What the message reports, read from it when parsed.
        kind: ErrorReplyKind,
        message: Bytes,
    },
    /// Any other line, e.g. `ITEM`/`PREFIX` rows of stats sub-commands.
    Other(Bytes),
}

/// What a memcached error line reports, as far as a proxy tells failures
/// apart: the ones the binary protocol has a status of its own for.
///
/// memcached's messages are fixed strings (`proto_text.c`), so they are
/// recognised whole, or by the prefix memcached's out-of-memory messages
/// share, never by searching the text for a word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorReplyKind {
    /// `object too large for cache`: larger than memcached's item size
    /// limit (`-I`).
    TooLarge,
    /// `out of memory …` (memcached says after it what it was doing):
    /// no memory for the item or the reply. memcached's one capitalised
    /// message, `Out of memory allocating new item`, is not this kind but
    /// [`Self::Other`], as it has always been answered.
    OutOfMemory,
    /// `cannot increment or decrement non-numeric value`.
    NonNumeric,
    /// Any other message: the line's class (client or server) is all
    /// there is to go on.
    Other,
}

impl ErrorReplyKind {
    /// Reads the kind from an error line's message (the text after
    /// `CLIENT_ERROR ` or `SERVER_ERROR `).
    pub fn of(message: &[u8]) -> Self {
        match message {
            b"object too large for cache" => ErrorReplyKind::TooLarge,
            b"cannot increment or decrement non-numeric value" => ErrorReplyKind::NonNumeric,
            m if m.starts_with(b"out of memory") => ErrorReplyKind::OutOfMemory,
            _ => ErrorReplyKind::Other,
        }
    }
}

impl TextResponse {
    /// `CLIENT_ERROR <message>`, its kind read from the message.
    pub fn client_error(message: impl Into<Bytes>) -> Self {
        let message = message.into();
        TextResponse::ClientError {
            kind: ErrorReplyKind::of(&message),
            message,
        }
    }

    /// `SERVER_ERROR <message>`, its kind read from the message.
    pub fn server_error(message: impl Into<Bytes>) -> Self {
        let message = message.into();
        TextResponse::ServerError {
            kind: ErrorReplyKind::of(&message),
            message,
        }
    }

    /// Writes the reply in wire form.
    pub fn encode(&self, out: &mut BytesMut) {
        let word: &[u8] = match self {
            TextResponse::Value {
                key,
                flags,
                cas,
                data,
            } => {
                out.reserve(key.len() + data.len() + 48);
                out.put_slice(b"VALUE ");
                out.put_slice(key);
                out.put_u8(b' ');
                put_u64(out, u64::from(*flags));
                out.put_u8(b' ');
                put_u64(out, data.len() as u64);
                if let Some(c) = cas {
                    out.put_u8(b' ');
                    put_u64(out, *c);
                }
                out.put_slice(b"\r\n");
                out.put_slice(data);
                out.put_slice(b"\r\n");
                return;
            }
            TextResponse::End => b"END",
            TextResponse::Stored => b"STORED",
            TextResponse::NotStored => b"NOT_STORED",
            TextResponse::Exists => b"EXISTS",
            TextResponse::NotFound => b"NOT_FOUND",
            TextResponse::Deleted => b"DELETED",
            TextResponse::Touched => b"TOUCHED",
            TextResponse::Ok => b"OK",
            TextResponse::Reset => b"RESET",
            TextResponse::Error => b"ERROR",
            TextResponse::Number(n) => {
                put_u64(out, *n);
                out.put_slice(b"\r\n");
                return;
            }
            TextResponse::Version(v) => {
                out.put_slice(b"VERSION ");
                out.put_slice(v);
                out.put_slice(b"\r\n");
                return;
            }
            TextResponse::Stat { name, value } => {
                out.put_slice(b"STAT ");
                out.put_slice(name);
                out.put_u8(b' ');
                out.put_slice(value);
                out.put_slice(b"\r\n");
                return;
            }
            TextResponse::ClientError { message: m, .. }
            | TextResponse::ServerError { message: m, .. } => {
                out.put_slice(if matches!(self, TextResponse::ClientError { .. }) {
                    b"CLIENT_ERROR "
                } else {
                    b"SERVER_ERROR "
                });
                out.put_slice(m);
                out.put_slice(b"\r\n");
                return;
            }
            TextResponse::Other(line) => line,
        };
        out.put_slice(word);
        out.put_slice(b"\r\n");
    }

    /// Whether this unit ends a multi-unit (`get`/`stats`) reply.
    pub fn ends_multi(&self) -> bool {
        matches!(
            self,
            TextResponse::End
                | TextResponse::Error
                | TextResponse::ClientError { .. }
                | TextResponse::ServerError { .. }
                | TextResponse::Reset
                | TextResponse::Ok
        )
    }
}

fn bad_response(buf: &BytesMut) -> ProtocolError {
    ProtocolError::text(ErrorKind::BadResponse, buf.len().max(1)).closing()
}

/// Parses one text or meta reply unit from the front of `buf` (a backend
/// stream). Same buffer contract as [`parse_request`]; a malformed reply is
/// [`ErrorKind::BadResponse`] with `close` set, an oversized value is
/// [`ErrorKind::TooLarge`] with `discard` covering it.
pub fn parse_response(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<Response>, ProtocolError> {
    let (content, total) = match find_line(buf, limits.max_line_len, 0, |_| false) {
        LineStatus::Incomplete => return Ok(None),
        LineStatus::TooLong => return Err(bad_response(buf)),
        LineStatus::Line { content, total } => (content, total),
    };
    let line = &buf[..content];
    let word_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    if meta::MetaCode::from_name(&line[..word_end]).is_some() {
        return meta::parse_response(buf, content, total, limits).map(|r| r.map(Response::Meta));
    }
    if &line[..word_end] == b"VALUE" {
        return parse_value(buf, content, total, limits).map(|r| r.map(Response::Text));
    }
    let frame = buf.split_to(total).freeze();
    let line = frame.slice(..content);
    let word = &frame[..word_end];
    let rest = || line.slice((word_end + 1).min(line.len())..);
    let exact = word_end == line.len();
    let r = match word {
        b"END" if exact => TextResponse::End,
        b"STORED" if exact => TextResponse::Stored,
        b"NOT_STORED" if exact => TextResponse::NotStored,
        b"EXISTS" if exact => TextResponse::Exists,
        b"NOT_FOUND" if exact => TextResponse::NotFound,
        b"DELETED" if exact => TextResponse::Deleted,
        b"TOUCHED" if exact => TextResponse::Touched,
        b"OK" if exact => TextResponse::Ok,
        b"RESET" if exact => TextResponse::Reset,
        b"ERROR" if exact => TextResponse::Error,
        b"VERSION" => TextResponse::Version(rest()),
        b"CLIENT_ERROR" => TextResponse::client_error(rest()),
        b"SERVER_ERROR" => TextResponse::server_error(rest()),
        b"STAT" => {
            let rest = rest();
            let sp = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
            TextResponse::Stat {
                name: rest.slice(..sp),
                value: rest.slice((sp + 1).min(rest.len())..),
            }
        }
        _ => match parse_u64(&line) {
            Some(n) => TextResponse::Number(n),
            None => TextResponse::Other(line),
        },
    };
    Ok(Some(Response::Text(r)))
}

fn parse_value(
    buf: &mut BytesMut,
    content: usize,
    total: usize,
    limits: &Limits,
) -> Result<Option<TextResponse>, ProtocolError> {
    let line = &buf[..content];
    let toks = Toks::<5>::new(line);
    if toks.count != 4 && toks.count != 5 {
        return Err(bad_response(buf));
    }
    let key: Span = toks.get(1);
    let flags = parse_u32(toks.get(2).of(line));
    let len = parse_u32(toks.get(3).of(line));
    let cas = if toks.count == 5 {
        parse_u64(toks.get(4).of(line)).map(Some)
    } else {
        Some(None)
    };
    let (Some(flags), Some(len), Some(cas)) = (flags, len, cas) else {
        return Err(bad_response(buf));
    };
    if !is_valid_text_key(key.of(line), limits.max_key_len) {
        return Err(bad_response(buf));
    }
    let len = len as usize;
    let need = total + len + 2;
    if len > limits.max_value_len {
        return Err(ProtocolError::text(ErrorKind::TooLarge, need));
    }
    if buf.len() < need {
        return Ok(None);
    }
    if &buf[total + len..need] != b"\r\n" {
        return Err(bad_response(buf));
    }
    let frame = buf.split_to(need).freeze();
    Ok(Some(TextResponse::Value {
        key: frame.slice(key.start..key.end),
        flags,
        cas,
        data: frame.slice(total..total + len),
    }))
}
