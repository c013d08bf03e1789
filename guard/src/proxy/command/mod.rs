//! Client requests in, backend meta requests out, and the replies back in
//! the client's protocol.
//!
//! Every client request, whatever its protocol, becomes non-quiet meta
//! requests (one per key), so replies on shared backend connections match
//! by order. Quiet modes (meta `q`, binary quiet opcodes, text `noreply`)
//! are applied here, on the way back, by suppressing what the client's
//! protocol would have suppressed. Keys gain the tenant's namespace prefix
//! on the way out and lose it on the way back; `flush_all` moves only the
//! tenant's namespace on and never reaches a backend. Raw keys (the open
//! tenant with `keys = "raw"`) pass as they are, and their `flush_all` is
//! refused as memcached `-F` refuses it. A read-only identity
//! gets every write refused here, before anything is sent.
//!
//! Here too each request that goes to the backends is charged to its
//! tenant's budgets ([`crate::tenant::budget`]), once, in [`dispatch`]:
//! before it is sent (one request and one in-flight slot per backend
//! request, its bytes as read), and its reply's bytes when the reply is
//! ready. Over a budget it is refused at once, whole, never queued:
//! `SERVER_ERROR tenant over budget: requests/s` (or `bytes/s`, `in
//! flight`), binary status 0x0086 with the same words.

pub mod admin;
mod binary;
mod meta;
mod text;

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    Shared,
    error::{ErrorKind, ProxyError, Side},
    stats::{CommandClass, ProxyStats},
};
use crate::{
    protocol::{
        BinaryRequest, BinaryResponse, ErrorReplyKind, Extras, GetKind, GetRequest, MetaCode,
        MetaCommand, MetaFlag, MetaRequest, MetaResponse, Opcode, ReplyShape, Request, Response,
        Status, StoreCommand, StoreRequest, TextRequest, TextResponse, is_valid_text_key,
    },
    tenant::{Cost, Identity, KeyNamespace, OverBudget, Tenant, TenantBudget, auth},
};

/// Text reply to a write from a read-only identity.
pub const TEXT_PERMISSION_DENIED: &[u8] = b"CLIENT_ERROR permission denied\r\n";
/// Text reply to `flush_all` with raw keys: memcached `-F`'s, to the byte.
const TEXT_FLUSH_REFUSED: &[u8] = b"CLIENT_ERROR flush_all not allowed\r\n";
/// Text reply to a key that does not fit the tenant's namespace. The
/// parser refuses such keys first, with the same line.
const TEXT_BAD_KEY: &[u8] = b"CLIENT_ERROR bad command line format\r\n";

/// The bytes to send a client for one request, and whether to close after.
#[derive(Debug, Default)]
pub struct Reply {
    pub out: BytesMut,
    pub close: bool,
}

impl Reply {
    fn bytes(b: &[u8]) -> Self {
        Self {
            out: BytesMut::from(b),
            close: false,
        }
    }
}

/// A request's reply slot in the client's pipeline.
pub enum Slot {
    Ready(Reply),
    Waiting(Pin<Box<dyn Future<Output = Reply> + Send>>),
}

fn waiting(f: impl Future<Output = Reply> + Send + 'static) -> Slot {
    Slot::Waiting(Box::pin(f))
}

/// Who a session serves, as its requests need it.
#[derive(Debug, Clone)]
pub struct Client {
    /// The tenant and rights (the open identity without tenants).
    pub identity: Arc<Identity>,
    /// Backend connection affinity, so the client's requests stay in order.
    pub affinity: usize,
    /// Whether the client authenticated (tenants are configured): SASL
    /// opcodes are then answered as by memcached `-S`, not as unknown.
    pub authenticated: bool,
    /// Its tenant's budget state (the limits are the identity's tenant's).
    pub budget: Arc<TenantBudget>,
}

/// Starts a request of `size` bytes (as read) for `client`: backend calls
/// are on their way when this returns, charged to the client's tenant, or
/// it is refused at once if they do not fit its budgets.
pub fn dispatch(req: Request, size: usize, sh: &Arc<Shared>, client: &Client) -> Slot {
    let class = CommandClass::of(&req);
    client.budget.traffic.request(class);
    if client.identity.read_only && is_write(&req) {
        ProxyStats::add(&sh.stats.permission_denied, 1);
        return Slot::Ready(permission_denied(&req));
    }
    let charge = match backend_requests(&req) {
        None => None,
        Some(requests) => {
            let cost = Cost {
                requests,
                bytes: size as u64,
            };
            match client.budget.admit(&client.identity.tenant, cost) {
                Ok(charge) => Some(charge),
                Err(why) => {
                    ProxyStats::add(&sh.stats.budget_refusals, 1);
                    return Slot::Ready(over_budget(&req, why));
                }
            }
        }
    };
    let cx = Cx {
        sh: sh.clone(),
        affinity: client.affinity,
        ns: client.identity.tenant.namespace.clone(),
        tenant: client.identity.tenant.clone(),
        authenticated: client.authenticated,
        failures: Failures {
            budget: client.budget.clone(),
            class,
        },
    };
    let slot = match req {
        Request::Text(r) => text::dispatch(r, &cx),
        Request::Meta(r) => meta::dispatch(r, &cx),
        Request::Binary(r) => binary::dispatch(r, &cx),
    };
    match (charge, slot) {
        (None, slot) => slot,
        // A request that costs backend requests is answered at once only
        // when none was sent (a key too long for the namespace, say).
        (Some(charge), Slot::Ready(reply)) => {
            charge.unsent();
            Slot::Ready(reply)
        }
        (Some(charge), Slot::Waiting(reply)) => {
            let sent = std::time::Instant::now();
            let budget = client.budget.clone();
            waiting(async move {
                let reply = reply.await;
                budget.traffic.answered(sent.elapsed());
                charge.reply(reply.out.len());
                reply
            })
        }
    }
}

/// How many backend requests `req` makes, which is what it costs its
/// tenant in requests and in-flight slots; `None` for what never reaches
/// a backend and is free (`version`, `stats`, `verbosity`, `quit`, noop,
/// `flush_all`, which moves a generation, memcached's administrative
/// commands, which guard refuses, and authentication).
fn backend_requests(req: &Request) -> Option<u64> {
    use Opcode::*;
    match req {
        Request::Text(t) => match t {
            TextRequest::Get(g) => Some(g.keys.len() as u64),
            TextRequest::Store(_)
            | TextRequest::Incr { .. }
            | TextRequest::Decr { .. }
            | TextRequest::Delete { .. }
            | TextRequest::Touch { .. } => Some(1),
            TextRequest::FlushAll { .. }
            | TextRequest::Version
            | TextRequest::Verbosity { .. }
            | TextRequest::Stats(_)
            | TextRequest::Admin(_)
            | TextRequest::Quit => None,
        },
        Request::Meta(m) => match m.command {
            MetaCommand::Noop => None,
            MetaCommand::Get
            | MetaCommand::Set
            | MetaCommand::Delete
            | MetaCommand::Arithmetic
            | MetaCommand::Debug => Some(1),
        },
        Request::Binary(b) => match b.opcode {
            Get | GetQ | GetK | GetKQ | Gat | GatQ | GatK | GatKQ | Touch | Set | Add | Replace
            | SetQ | AddQ | ReplaceQ | Append | Prepend | AppendQ | PrependQ | Delete | DeleteQ
            | Increment | Decrement | IncrementQ | DecrementQ => Some(1),
            Flush | FlushQ | Noop | Version | Quit | QuitQ | Stat | SaslListMechs | SaslAuth
            | SaslStep => None,
        },
    }
}

/// The refusal of a request over its tenant's budget, as guard answers a
/// backend failure: `SERVER_ERROR tenant over budget: …` in text and meta
/// (meta `q` does not hide errors; text `noreply` hides everything, as
/// for memcached's own `noreply` errors), binary status 0x0086 with the
/// same words as its value (quiet opcodes hide successes only).
fn over_budget(req: &Request, why: OverBudget) -> Reply {
    match req {
        Request::Binary(b) => {
            let mut out = BytesMut::new();
            BinaryResponse {
                status: Status::TEMPORARY_FAILURE,
                value: Bytes::from_static(why.reply_text().as_bytes()),
                ..BinaryResponse::new(b.opcode as u8, b.opaque)
            }
            .encode(&mut out);
            Reply { out, close: false }
        }
        Request::Text(_) if req.reply_shape() == ReplyShape::None => Reply::default(),
        Request::Text(_) | Request::Meta(_) => {
            Reply::bytes(format!("SERVER_ERROR {}\r\n", why.reply_text()).as_bytes())
        }
    }
}

/// Whether a request changes data: stores, cas, arithmetic, deletes,
/// touches (gat and meta `T` set a TTL), meta `N` (creates on a miss), and
/// `flush_all`.
pub fn is_write(req: &Request) -> bool {
    use Opcode::*;
    match req {
        Request::Text(t) => match t {
            TextRequest::Get(g) => matches!(g.kind, GetKind::Gat(_) | GetKind::Gats(_)),
            TextRequest::Store(_)
            | TextRequest::Incr { .. }
            | TextRequest::Decr { .. }
            | TextRequest::Delete { .. }
            | TextRequest::Touch { .. }
            | TextRequest::FlushAll { .. } => true,
            // Administrative commands are refused, never carried out;
            // `stats reset` zeroes what the tenant's own `stats` show.
            TextRequest::Version
            | TextRequest::Verbosity { .. }
            | TextRequest::Stats(_)
            | TextRequest::Admin(_)
            | TextRequest::Quit => false,
        },
        Request::Meta(m) => match m.command {
            MetaCommand::Set | MetaCommand::Delete | MetaCommand::Arithmetic => true,
            MetaCommand::Get => m.has_flag(b'T') || m.has_flag(b'N'),
            MetaCommand::Noop | MetaCommand::Debug => false,
        },
        Request::Binary(b) => match b.opcode {
            Get | GetQ | GetK | GetKQ | Noop | Version | Quit | QuitQ | Stat | SaslListMechs
            | SaslAuth | SaslStep => false,
            Set | Add | Replace | SetQ | AddQ | ReplaceQ | Append | Prepend | AppendQ
            | PrependQ | Delete | DeleteQ | Increment | Decrement | IncrementQ | DecrementQ
            | Flush | FlushQ | Touch | Gat | GatQ | GatK | GatKQ => true,
        },
    }
}

/// Whether requests after `req` in a client's pipeline must wait until it
/// is answered: an immediate `flush_all` moves the generation only after
/// reading the backends' markers, and a `set` pipelined behind it must land
/// in the new generation, as it would on memcached.
pub fn is_barrier(req: &Request) -> bool {
    match req {
        // A delay of 0 or less is immediate, as for memcached.
        Request::Text(TextRequest::FlushAll { delay, .. }) => delay.unwrap_or(0) <= 0,
        Request::Binary(b) => {
            matches!(b.opcode, Opcode::Flush | Opcode::FlushQ)
                && !matches!(b.decoded_extras(), Extras::Exptime(d) if d > 0)
        }
        _ => false,
    }
}

/// The refusal of a write from a read-only identity: `CLIENT_ERROR
/// permission denied` (sent even for `noreply`, as memcached sends its
/// errors), binary status 0x24 (memcached's `EACCESS`).
fn permission_denied(req: &Request) -> Reply {
    match req {
        Request::Binary(b) => {
            let mut out = BytesMut::new();
            BinaryResponse::error(b.opcode as u8, b.opaque, Status::ACCESS_DENIED).encode(&mut out);
            Reply { out, close: false }
        }
        Request::Text(_) | Request::Meta(_) => Reply::bytes(TEXT_PERMISSION_DENIED),
    }
}

/// One request's context: the shared state, the session's affinity and
/// its tenant's namespace.
struct Cx {
    sh: Arc<Shared>,
    affinity: usize,
    ns: KeyNamespace,
    tenant: Arc<Tenant>,
    authenticated: bool,
    failures: Failures,
}

/// Where a request's backend failures are counted: guard's
/// `backend_errors` and its tenant's errors for its class.
#[derive(Clone)]
struct Failures {
    budget: Arc<TenantBudget>,
    class: CommandClass,
}

impl Failures {
    /// One backend failure of the request.
    fn count(&self, stats: &ProxyStats) {
        ProxyStats::add(&stats.backend_errors, 1);
        self.tenant();
    }

    /// The request failed, for its tenant (once per request, however
    /// many of its keys failed).
    fn tenant(&self) {
        self.budget.traffic.error(self.class);
    }
}

impl Cx {
    /// The backend key, or the text reply for a key too long once
    /// namespaced.
    fn text_key(&self, key: &[u8]) -> Result<Bytes, Slot> {
        self.ns
            .backend_key(key)
            .map_err(|_| Slot::Ready(Reply::bytes(TEXT_BAD_KEY)))
    }
}

impl Cx {
    /// Who the router is told sends this request.
    fn caller(&self) -> super::router::Caller {
        super::router::Caller {
            affinity: self.affinity,
            tenant: self.tenant.id,
        }
    }
}

impl std::ops::Deref for Cx {
    type Target = Arc<Shared>;

    fn deref(&self) -> &Arc<Shared> {
        &self.sh
    }
}

fn token(v: impl ToString) -> Bytes {
    Bytes::from(v.to_string())
}

/// A meta request for `bkey`, base64-keyed when the key is not a valid
/// text key (binary clients may use any bytes).
fn meta_req(
    command: MetaCommand,
    bkey: &[u8],
    flags: Vec<MetaFlag>,
    value: Option<Bytes>,
) -> BytesMut {
    let mut r = MetaRequest {
        command,
        key: Bytes::new(),
        flags,
        value,
    };
    if is_valid_text_key(bkey, usize::MAX) {
        r.key = Bytes::copy_from_slice(bkey);
    } else {
        r.flags.insert(0, MetaFlag::new(b'b', Bytes::new()));
        r.set_decoded_key(bkey);
    }
    let mut out = BytesMut::new();
    r.encode(&mut out);
    out
}

fn flag(f: u8) -> MetaFlag {
    MetaFlag::new(f, Bytes::new())
}

fn flag_u64(m: &MetaResponse, f: u8) -> Option<u64> {
    std::str::from_utf8(&m.flag(f)?.token).ok()?.parse().ok()
}

/// Sends one request for one key, `encode`d with the name the key has
/// where the router sends it (see [`super::router::gutter_key`]);
/// `render` turns the reply (or the backend's failure) into the client's
/// bytes.
fn forward(
    sh: &Cx,
    bkey: &[u8],
    encode: impl FnOnce(&[u8]) -> BytesMut,
    render: impl FnOnce(&Shared, Result<Response, ProxyError>) -> Reply + Send + 'static,
) -> Slot {
    let call = sh.router.call_one(bkey, encode, sh.caller());
    let backend = call.backend();
    let failures = sh.failures.clone();
    let sh = sh.sh.clone();
    waiting(async move {
        let r = match call.wait().await {
            Ok(mut v) if v.len() == 1 => Ok(v.pop().expect("one reply")),
            Ok(_) => Err(ProxyError::new(Side::Internal, ErrorKind::ReplyCount).at(backend)),
            Err(e) => Err(e),
        };
        if r.is_err() {
            failures.count(&sh.stats);
        }
        render(&sh, r)
    })
}

/// `flush_all [delay]`: the tenant's namespace moves on (now, or after
/// `delay` seconds); no backend is flushed. An immediate flush answers
/// `reply` once its generation is recorded on the backends. In a raw
/// namespace it is `refused` instead.
fn flush(cx: &Cx, delay: i64, reply: Reply, refused: Reply) -> Slot {
    // Counted either way, as memcached counts a flush it refuses.
    ProxyStats::add(&cx.stats.cmd_flush, 1);
    if cx.ns.is_raw() {
        // Raw keys have no generation to move on, and flushing the
        // backends would empty a cache other clients (other proxies, a
        // twemproxy still beside guard) share: refused as by memcached
        // started with `-F`, which clients already know how to take.
        return Slot::Ready(refused);
    }
    match u64::try_from(delay).ok().filter(|&d| d > 0) {
        Some(d) => {
            cx.ns.flush(Some(Duration::from_secs(d)));
            Slot::Ready(reply)
        }
        None => {
            // Spawned, not just awaited by the session: a client that
            // sends `flush_all noreply` and leaves still gets its flush.
            let done = tokio::spawn(super::generations::flush(cx.sh.clone(), cx.ns.clone()));
            waiting(async move {
                let _ = done.await;
                reply
            })
        }
    }
}

/// `stats`: guard's counters, then the client's own tenant (never
/// another's).
fn stat_rows(cx: &Cx) -> Vec<(Bytes, Bytes)> {
    let mut rows = cx.stats.byte_rows();
    let t = &cx.tenant;
    rows.push((
        Bytes::from_static(b"tenant"),
        Bytes::from(t.name.to_string()),
    ));
    rows.push((
        Bytes::from_static(b"tenant_curr_connections"),
        token(cx.connections.count(t)),
    ));
    rows.push((
        Bytes::from_static(b"tenant_max_key_length"),
        token(cx.ns.max_client_key_len()),
    ));
    for (name, value) in cx.budgets.get(t).stat_rows(&t.limits) {
        rows.push((Bytes::from_static(name.as_bytes()), token(value)));
    }
    rows
}

// ---------------------------------------------------------------- text

/// `SERVER_ERROR` and the fixed words for the failure; the cause is for
/// guard's log, not the client.
fn server_error(e: &ProxyError) -> Reply {
    Reply::bytes(format!("SERVER_ERROR {}\r\n", e.reply_text()).as_bytes())
}

const BAD_REPLY: &[u8] = b"SERVER_ERROR bad backend reply\r\n";
