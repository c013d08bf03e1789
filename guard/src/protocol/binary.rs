//! Binary protocol: 24-byte header, magic 0x80 (request) / 0x81 (response).
//!
//! Validation follows memcached 1.6's `dispatch_bin_command`: malformed
//! headers get 0x0004 and a close, unknown opcodes get 0x0081 with the body
//! swallowed, oversized values get 0x0003 with the value swallowed.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::{ErrorKind, ProtocolError};
use super::{Limits, Protocol, ReplyShape};

/// First byte of every binary request.
pub const REQUEST_MAGIC: u8 = 0x80;
/// First byte of every binary response.
pub const RESPONSE_MAGIC: u8 = 0x81;
/// Size of the fixed binary header.
pub const HEADER_LEN: usize = 24;

/// Opcodes memcached 1.6 answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Get = 0x00,
    Set = 0x01,
    Add = 0x02,
    Replace = 0x03,
    Delete = 0x04,
    Increment = 0x05,
    Decrement = 0x06,
    Quit = 0x07,
    Flush = 0x08,
    GetQ = 0x09,
    Noop = 0x0a,
    Version = 0x0b,
    GetK = 0x0c,
    GetKQ = 0x0d,
    Append = 0x0e,
    Prepend = 0x0f,
    Stat = 0x10,
    SetQ = 0x11,
    AddQ = 0x12,
    ReplaceQ = 0x13,
    DeleteQ = 0x14,
    IncrementQ = 0x15,
    DecrementQ = 0x16,
    QuitQ = 0x17,
    FlushQ = 0x18,
    AppendQ = 0x19,
    PrependQ = 0x1a,
    // 0x1b, VERBOSITY, is not here: memcached 1.6 no longer knows it and
    // answers it "Unknown command" whatever its shape, as guard does for
    // every opcode it does not know.
    Touch = 0x1c,
    Gat = 0x1d,
    GatQ = 0x1e,
    SaslListMechs = 0x20,
    SaslAuth = 0x21,
    SaslStep = 0x22,
    GatK = 0x23,
    GatKQ = 0x24,
}

impl Opcode {
    /// Every opcode, for tests and tables.
    pub const ALL: [Opcode; 35] = [
        Opcode::Get,
        Opcode::Set,
        Opcode::Add,
        Opcode::Replace,
        Opcode::Delete,
        Opcode::Increment,
        Opcode::Decrement,
        Opcode::Quit,
        Opcode::Flush,
        Opcode::GetQ,
        Opcode::Noop,
        Opcode::Version,
        Opcode::GetK,
        Opcode::GetKQ,
        Opcode::Append,
        Opcode::Prepend,
        Opcode::Stat,
        Opcode::SetQ,
        Opcode::AddQ,
        Opcode::ReplaceQ,
        Opcode::DeleteQ,
        Opcode::IncrementQ,
        Opcode::DecrementQ,
        Opcode::QuitQ,
        Opcode::FlushQ,
        Opcode::AppendQ,
        Opcode::PrependQ,
        Opcode::Touch,
        Opcode::Gat,
        Opcode::GatQ,
        Opcode::SaslListMechs,
        Opcode::SaslAuth,
        Opcode::SaslStep,
        Opcode::GatK,
        Opcode::GatKQ,
    ];

    /// Decodes a known opcode.
    pub fn from_u8(b: u8) -> Option<Self> {
        Opcode::ALL.iter().copied().find(|o| *o as u8 == b)
    }

    /// Quiet variants reply only when there is something to say.
    pub fn is_quiet(self) -> bool {
        use Opcode::*;
        matches!(
            self,
            GetQ | GetKQ
                | GatQ
                | GatKQ
                | SetQ
                | AddQ
                | ReplaceQ
                | DeleteQ
                | IncrementQ
                | DecrementQ
                | QuitQ
                | FlushQ
                | AppendQ
                | PrependQ
        )
    }

    /// Whether memcached omits the response with `status` for this opcode:
    /// quiet gets omit misses, other quiet commands omit success.
    pub fn quiet_suppresses(self, status: Status) -> bool {
        use Opcode::*;
        match self {
            GetQ | GetKQ | GatQ | GatKQ => status == Status::KEY_NOT_FOUND,
            o if o.is_quiet() => status == Status::SUCCESS,
            _ => false,
        }
    }

    /// Whether requests carry a value section.
    pub fn has_value(self) -> bool {
        use Opcode::*;
        matches!(
            self,
            Set | Add
                | Replace
                | SetQ
                | AddQ
                | ReplaceQ
                | Append
                | Prepend
                | AppendQ
                | PrependQ
                | SaslAuth
                | SaslStep
        )
    }
}

/// Binary response status (a newtype so unknown codes survive re-encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u16);

impl Status {
    pub const SUCCESS: Status = Status(0x0000);
    pub const KEY_NOT_FOUND: Status = Status(0x0001);
    pub const KEY_EXISTS: Status = Status(0x0002);
    pub const VALUE_TOO_LARGE: Status = Status(0x0003);
    pub const INVALID_ARGUMENTS: Status = Status(0x0004);
    pub const NOT_STORED: Status = Status(0x0005);
    pub const NON_NUMERIC: Status = Status(0x0006);
    pub const NOT_MY_VBUCKET: Status = Status(0x0007);
    pub const AUTH_ERROR: Status = Status(0x0020);
    pub const AUTH_CONTINUE: Status = Status(0x0021);
    /// memcached's `EACCESS`: the authenticated user may not do this.
    pub const ACCESS_DENIED: Status = Status(0x0024);
    pub const UNKNOWN_COMMAND: Status = Status(0x0081);
    pub const OUT_OF_MEMORY: Status = Status(0x0082);
    pub const NOT_SUPPORTED: Status = Status(0x0083);
    pub const INTERNAL_ERROR: Status = Status(0x0084);
    pub const BUSY: Status = Status(0x0085);
    pub const TEMPORARY_FAILURE: Status = Status(0x0086);

    /// The body text memcached's `write_bin_error` sends with this status.
    pub fn message(self) -> &'static str {
        match self {
            Status::OUT_OF_MEMORY => "Out of memory",
            Status::UNKNOWN_COMMAND => "Unknown command",
            Status::KEY_NOT_FOUND => "Not found",
            Status::INVALID_ARGUMENTS => "Invalid arguments",
            Status::KEY_EXISTS => "Data exists for key.",
            Status::VALUE_TOO_LARGE => "Too large.",
            Status::NON_NUMERIC => "Non-numeric server-side value for incr or decr",
            Status::NOT_STORED => "Not stored.",
            Status::AUTH_ERROR => "Auth failure.",
            Status::ACCESS_DENIED => "Permission denied",
            _ => "UNHANDLED ERROR",
        }
    }
}

/// The fixed header, fields as on the wire (`status` is the vbucket id in
/// requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub magic: u8,
    pub opcode: u8,
    pub key_len: u16,
    pub extras_len: u8,
    pub data_type: u8,
    pub status: u16,
    pub body_len: u32,
    pub opaque: u32,
    pub cas: u64,
}

impl Header {
    /// Reads a header from at least [`HEADER_LEN`] bytes.
    pub fn read(b: &[u8]) -> Header {
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            magic: b[0],
            opcode: b[1],
            key_len: u16_at(2),
            extras_len: b[4],
            data_type: b[5],
            status: u16_at(6),
            body_len: u32_at(8),
            opaque: u32_at(12),
            cas: (u64::from(u32_at(16)) << 32) | u64::from(u32_at(20)),
        }
    }

    /// Writes the header.
    pub fn write(&self, out: &mut BytesMut) {
        out.put_u8(self.magic);
        out.put_u8(self.opcode);
        out.put_u16(self.key_len);
        out.put_u8(self.extras_len);
        out.put_u8(self.data_type);
        out.put_u16(self.status);
        out.put_u32(self.body_len);
        out.put_u32(self.opaque);
        out.put_u64(self.cas);
    }
}

/// Extras decoded per opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extras {
    None,
    /// set/add/replace.
    Store {
        flags: u32,
        exptime: u32,
    },
    /// incr/decr; `exptime` 0xffffffff means "don't create on miss".
    Arith {
        delta: u64,
        initial: u64,
        exptime: u32,
    },
    /// touch/gat*/flush (flush's extras are optional).
    Exptime(u32),
    /// get-family responses.
    Flags(u32),
}

impl Extras {
    fn be32(b: &[u8], i: usize) -> u32 {
        u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
    }

    fn be64(b: &[u8], i: usize) -> u64 {
        (u64::from(Self::be32(b, i)) << 32) | u64::from(Self::be32(b, i + 4))
    }

    /// Serialises back to raw extras.
    pub fn to_bytes(self) -> Bytes {
        let mut b = BytesMut::new();
        match self {
            Extras::None => {}
            Extras::Store { flags, exptime } => {
                b.put_u32(flags);
                b.put_u32(exptime);
            }
            Extras::Arith {
                delta,
                initial,
                exptime,
            } => {
                b.put_u64(delta);
                b.put_u64(initial);
                b.put_u32(exptime);
            }
            Extras::Exptime(v) | Extras::Flags(v) => b.put_u32(v),
        }
        b.freeze()
    }
}

/// A parsed binary request. Extras are kept raw so re-encoding is exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryRequest {
    pub opcode: Opcode,
    pub data_type: u8,
    pub vbucket: u16,
    pub opaque: u32,
    pub cas: u64,
    pub extras: Bytes,
    pub key: Bytes,
    pub value: Bytes,
}

impl BinaryRequest {
    /// A request with empty sections.
    pub fn new(opcode: Opcode) -> Self {
        BinaryRequest {
            opcode,
            data_type: 0,
            vbucket: 0,
            opaque: 0,
            cas: 0,
            extras: Bytes::new(),
            key: Bytes::new(),
            value: Bytes::new(),
        }
    }

    /// Extras interpreted for this opcode (lengths were validated on parse).
    pub fn decoded_extras(&self) -> Extras {
        use Opcode::*;
        let e = &self.extras;
        match (self.opcode, e.len()) {
            (Set | Add | Replace | SetQ | AddQ | ReplaceQ, 8) => Extras::Store {
                flags: Extras::be32(e, 0),
                exptime: Extras::be32(e, 4),
            },
            (Increment | Decrement | IncrementQ | DecrementQ, 20) => Extras::Arith {
                delta: Extras::be64(e, 0),
                initial: Extras::be64(e, 8),
                exptime: Extras::be32(e, 16),
            },
            (Touch | Gat | GatQ | GatK | GatKQ | Flush | FlushQ, 4) => {
                Extras::Exptime(Extras::be32(e, 0))
            }
            _ => Extras::None,
        }
    }

    /// Noop replies only after every earlier request, like `mn`.
    pub fn is_barrier(&self) -> bool {
        self.opcode == Opcode::Noop
    }

    /// How the reply to this request is delimited.
    pub fn reply_shape(&self) -> ReplyShape {
        match self.opcode {
            Opcode::QuitQ => ReplyShape::None,
            Opcode::Stat => ReplyShape::Multi,
            o if o.is_quiet() => ReplyShape::Quiet,
            _ => ReplyShape::One,
        }
    }

    /// Writes the request; lengths are recomputed from the sections, so a
    /// replaced key re-encodes correctly.
    pub fn encode(&self, out: &mut BytesMut) {
        let head = (
            REQUEST_MAGIC,
            self.opcode as u8,
            self.data_type,
            self.vbucket,
        );
        write_frame(
            out,
            head,
            self.opaque,
            self.cas,
            [&self.extras, &self.key, &self.value],
        );
    }
}

/// Writes one frame: the header (magic, opcode, data type, and the field
/// that is the vbucket in requests and the status in responses), lengths
/// derived from the parts, then extras, key and value.
fn write_frame(
    out: &mut BytesMut,
    (magic, opcode, data_type, status): (u8, u8, u8, u16),
    opaque: u32,
    cas: u64,
    [extras, key, value]: [&Bytes; 3],
) {
    let body = extras.len() + key.len() + value.len();
    out.reserve(HEADER_LEN + body);
    Header {
        magic,
        opcode,
        key_len: key.len() as u16,
        extras_len: extras.len() as u8,
        data_type,
        status,
        body_len: body as u32,
        opaque,
        cas,
    }
    .write(out);
    out.put_slice(extras);
    out.put_slice(key);
    out.put_slice(value);
}

fn shape_ok(op: Opcode, ext: usize, key: usize, value: usize) -> bool {
    use Opcode::*;
    match op {
        Get | GetQ | GetK | GetKQ | Delete | DeleteQ => ext == 0 && key > 0 && value == 0,
        Set | Add | Replace | SetQ | AddQ | ReplaceQ => ext == 8 && key > 0,
        Increment | Decrement | IncrementQ | DecrementQ => ext == 20 && key > 0 && value == 0,
        Quit | QuitQ | Noop | Version | SaslListMechs => ext == 0 && key == 0 && value == 0,
        Flush | FlushQ => key == 0 && value == 0 && (ext == 0 || ext == 4),
        Append | Prepend | AppendQ | PrependQ | SaslAuth | SaslStep => ext == 0 && key > 0,
        Stat => ext == 0 && value == 0,
        Touch | Gat | GatQ | GatK | GatKQ => ext == 4 && key > 0 && value == 0,
    }
}

/// Parses one binary request from the front of `buf` (same buffer contract
/// as the text parser).
pub fn parse_request(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<BinaryRequest>, ProtocolError> {
    let Some(&magic) = buf.first() else {
        return Ok(None);
    };
    let err = |kind, discard: usize, close: bool, binary| ProtocolError {
        kind,
        protocol: Protocol::Binary,
        discard: discard.max(1),
        close,
        noreply: false,
        binary,
    };
    if magic != REQUEST_MAGIC {
        return Err(err(ErrorKind::BadMagic, buf.len(), true, None));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let h = Header::read(buf);
    let ctx = Some((h.opcode, h.opaque));
    let (ext, key, body) = (
        h.extras_len as usize,
        h.key_len as usize,
        h.body_len as usize,
    );
    let frame = HEADER_LEN + body;
    let Some(op) = Opcode::from_u8(h.opcode) else {
        return Err(err(ErrorKind::UnknownCommand, frame, false, ctx));
    };
    let invalid = || err(ErrorKind::InvalidArguments, buf.len(), true, ctx);
    if key > limits.max_key_len || ext + key > body {
        return Err(invalid());
    }
    let value = body - ext - key;
    if !shape_ok(op, ext, key, value) {
        return Err(invalid());
    }
    if value > limits.max_value_len {
        return Err(err(ErrorKind::TooLarge, frame, false, ctx));
    }
    if buf.len() < frame {
        return Ok(None);
    }
    let f = buf.split_to(frame).freeze();
    let (k0, v0) = (HEADER_LEN + ext, HEADER_LEN + ext + key);
    Ok(Some(BinaryRequest {
        opcode: op,
        data_type: h.data_type,
        vbucket: h.status,
        opaque: h.opaque,
        cas: h.cas,
        extras: f.slice(HEADER_LEN..k0),
        key: f.slice(k0..v0),
        value: f.slice(v0..),
    }))
}

/// A parsed binary response. `opcode` stays raw: error replies echo
/// opcodes memcached does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryResponse {
    pub opcode: u8,
    pub data_type: u8,
    pub status: Status,
    pub opaque: u32,
    pub cas: u64,
    pub extras: Bytes,
    pub key: Bytes,
    pub value: Bytes,
}

impl BinaryResponse {
    /// A successful, empty response.
    pub fn new(opcode: u8, opaque: u32) -> Self {
        BinaryResponse {
            opcode,
            data_type: 0,
            status: Status::SUCCESS,
            opaque,
            cas: 0,
            extras: Bytes::new(),
            key: Bytes::new(),
            value: Bytes::new(),
        }
    }

    /// The error response memcached sends: status plus its message as body.
    pub fn error(opcode: u8, opaque: u32, status: Status) -> Self {
        BinaryResponse {
            status,
            value: Bytes::from_static(status.message().as_bytes()),
            ..BinaryResponse::new(opcode, opaque)
        }
    }

    /// Client flags of a get-family response.
    pub fn flags(&self) -> Option<u32> {
        (self.extras.len() == 4).then(|| Extras::be32(&self.extras, 0))
    }

    /// The empty-key response that ends a `Stat` reply (or any error).
    pub fn ends_multi(&self) -> bool {
        self.status != Status::SUCCESS || (self.key.is_empty() && self.value.is_empty())
    }

    /// Writes the response.
    pub fn encode(&self, out: &mut BytesMut) {
        let head = (RESPONSE_MAGIC, self.opcode, self.data_type, self.status.0);
        write_frame(
            out,
            head,
            self.opaque,
            self.cas,
            [&self.extras, &self.key, &self.value],
        );
    }
}

/// Parses one binary response from a backend stream.
pub fn parse_response(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<BinaryResponse>, ProtocolError> {
    let Some(&magic) = buf.first() else {
        return Ok(None);
    };
    let err = |kind, discard: usize, close| ProtocolError {
        kind,
        protocol: Protocol::Binary,
        discard: discard.max(1),
        close,
        noreply: false,
        binary: None,
    };
    if magic != RESPONSE_MAGIC {
        return Err(err(ErrorKind::BadResponse, buf.len(), true));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let h = Header::read(buf);
    let (ext, key, body) = (
        h.extras_len as usize,
        h.key_len as usize,
        h.body_len as usize,
    );
    if ext + key > body || key > limits.max_key_len {
        return Err(err(ErrorKind::BadResponse, buf.len(), true));
    }
    let frame = HEADER_LEN + body;
    // Error bodies are short messages; only the value is bounded here.
    if body - ext - key > limits.max_value_len {
        return Err(err(ErrorKind::TooLarge, frame, false));
    }
    if buf.len() < frame {
        return Ok(None);
    }
    let f = buf.split_to(frame).freeze();
    let (k0, v0) = (HEADER_LEN + ext, HEADER_LEN + ext + key);
    Ok(Some(BinaryResponse {
        opcode: h.opcode,
        data_type: h.data_type,
        status: Status(h.status),
        opaque: h.opaque,
        cas: h.cas,
        extras: f.slice(HEADER_LEN..k0),
        key: f.slice(k0..v0),
        value: f.slice(v0..),
    }))
}
