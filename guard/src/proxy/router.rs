//! Routing: which backend owns a key (ketama, as twemproxy), where its
//! requests go while that backend is ejected, and fan-out of multi-key
//! requests.
//!
//! The ring is a [`Topology`]: the backends in it, each live or ejected,
//! and two continua, one over all of them and one over the live ones.
//! Requests read it lock-free; only the ejection controller
//! (`proxy::ejection`) publishes a new one. A key goes to its *home*, the
//! owner on the full continuum, while that backend is live. While it is
//! ejected:
//!
//! - `redistribute`: to the backend twemproxy (`auto_eject_hosts`) would
//!   pick, the owner on the continuum of the live backends, under a
//!   *gutter key* named for that ejection ([`gutter_key`]). Keys whose
//!   home is live never move, so they never go stale; and the gutter
//!   copies of one ejection are never read in another, so a backend that
//!   flaps cannot bring back what an earlier ejection wrote.
//! - `fail-fast`: nowhere; the request is refused at once.
//!
//! What the ejected backend itself still holds is flushed before it
//! rejoins (see `proxy::ejection`), so no value written elsewhere during
//! its ejection is shadowed by an older one when its keys come home.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use arc_swap::ArcSwap;
use bytes::{BufMut as _, Bytes, BytesMut};
use md5::{Digest as _, Md5};
use tokio::sync::Notify;

use super::{
    backend::{BackendPool, Call},
    error::{ErrorKind, ProxyError, Side},
    ketama::{Ketama, server_identity},
};
use crate::{
    config::{EjectPolicy, INTERNAL_KEY_PREFIX},
    tenant::namespace::MAX_BACKEND_KEY_LEN,
};

/// A memcached server the proxy sends to: its address, the identity
/// twemproxy would hash it by, and its connections.
pub struct Backend {
    pub addr: SocketAddr,
    pub identity: String,
    pub pool: BackendPool,
}

impl Backend {
    /// A backend at `addr`, served by `pool`.
    pub fn new(pool: BackendPool) -> Self {
        let addr = pool.addr();
        Self {
            addr,
            identity: server_identity(&addr.ip().to_string(), addr.port(), None),
            pool,
        }
    }
}

/// One backend in the ring.
#[derive(Clone)]
pub struct Member {
    pub backend: Arc<Backend>,
    pub weight: u32,
    /// While ejected: the prefix of its keys' gutter names for this
    /// ejection.
    pub gutter: Option<Bytes>,
}

impl Member {
    /// A live member.
    pub fn live(backend: Arc<Backend>, weight: u32) -> Self {
        Self {
            backend,
            weight,
            gutter: None,
        }
    }

    /// Whether it is ejected.
    pub fn is_ejected(&self) -> bool {
        self.gutter.is_some()
    }
}

/// The ring at one moment.
pub struct Topology {
    members: Vec<Member>,
    /// Over every member: a key's home.
    full: Ketama,
    /// Over the live members: where an ejected home's keys go.
    live: Ketama,
    policy: EjectPolicy,
}

/// Where one key's request goes.
enum Target<'a> {
    /// Its home, under its own name.
    Home(&'a Backend),
    /// Another backend, under the gutter name with this prefix.
    Gutter(&'a Backend, &'a Bytes),
    /// Nowhere: its home (this address) is ejected and the policy is
    /// fail-fast, or no backend is live.
    Refused(Option<SocketAddr>),
}

impl Topology {
    /// The ring over `members`.
    pub fn new(members: Vec<Member>, policy: EjectPolicy) -> Self {
        let list: Vec<(&str, u32)> = members
            .iter()
            .map(|m| (m.backend.identity.as_str(), m.weight))
            .collect();
        let full = Ketama::new(&list);
        let live = if members.iter().any(Member::is_ejected) {
            Ketama::with_live(&list, |i| !members[i].is_ejected())
        } else {
            full.clone()
        };
        Self {
            members,
            full,
            live,
            policy,
        }
    }

    /// The members, in configuration order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The live members' backends.
    pub fn live(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.members
            .iter()
            .filter(|m| !m.is_ejected())
            .map(|m| &m.backend)
    }

    /// The ejection policy in force.
    pub fn policy(&self) -> EjectPolicy {
        self.policy
    }

    fn target(&self, bkey: &[u8]) -> Target<'_> {
        let Some(home) = self.full.server_for(bkey) else {
            return Target::Refused(None);
        };
        let m = &self.members[home];
        let Some(gutter) = &m.gutter else {
            return Target::Home(&m.backend);
        };
        if self.policy == EjectPolicy::FailFast {
            return Target::Refused(Some(m.backend.addr));
        }
        match self.live.server_for(bkey) {
            Some(i) => Target::Gutter(&self.members[i].backend, gutter),
            None => Target::Refused(Some(m.backend.addr)),
        }
    }

    /// The backend a key's requests go to now and the name they use
    /// there; `None` when they are refused.
    pub fn route(&self, bkey: &[u8]) -> Option<(SocketAddr, Bytes)> {
        match self.target(bkey) {
            Target::Home(b) => Some((b.addr, Bytes::copy_from_slice(bkey))),
            Target::Gutter(b, tag) => Some((b.addr, gutter_key(tag, bkey))),
            Target::Refused(_) => None,
        }
    }
}

/// The prefix of one ejection's gutter names: `~` and `episode` in 13
/// base-36 digits. Episodes differ between ejections and processes (see
/// `proxy::ejection`), so no two ejections share a name.
pub fn gutter_tag(episode: u64) -> Bytes {
    let mut digits = [b'0'; 13];
    let mut n = episode;
    for d in digits.iter_mut().rev() {
        *d = b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize];
        n /= 36;
    }
    let mut tag = BytesMut::with_capacity(14);
    tag.put_u8(INTERNAL_KEY_PREFIX as u8);
    tag.put_slice(&digits);
    tag.freeze()
}

/// The name `bkey` has on another backend while its home is ejected:
/// `<tag>:<bkey>`, or, when that would pass memcached's 250 bytes,
/// `<tag>#<md5 of bkey in hex>`. Every name starts with `~`, which no
/// tenant's keys do.
pub fn gutter_key(tag: &[u8], bkey: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(MAX_BACKEND_KEY_LEN);
    out.put_slice(tag);
    if tag.len() + 1 + bkey.len() <= MAX_BACKEND_KEY_LEN {
        out.put_u8(b':');
        out.put_slice(bkey);
    } else {
        out.put_u8(b'#');
        for b in Md5::digest(bkey) {
            out.put_slice(format!("{b:02x}").as_bytes());
        }
    }
    out.freeze()
}

/// The ring in force and what changes it.
pub struct Router {
    topology: ArcSwap<Topology>,
    next_affinity: AtomicUsize,
    /// Woken whenever a backend joins or leaves the live set, so flush
    /// generations reach it at once.
    changed: Notify,
}

impl Router {
    /// A router over `topology`.
    pub fn new(topology: Topology) -> Self {
        Self {
            topology: ArcSwap::from_pointee(topology),
            next_affinity: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }

    /// The ring now.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    /// Puts a new ring in force; requests already routed finish where
    /// they went.
    pub fn publish(&self, topology: Topology) {
        self.topology.store(Arc::new(topology));
        self.changed.notify_waiters();
    }

    /// Woken at every [`Self::publish`].
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    /// The live backends now.
    pub fn live_backends(&self) -> Vec<Arc<Backend>> {
        self.topology.load().live().cloned().collect()
    }

    /// A connection choice for one client session. A session sends all
    /// its requests to a backend over the same connection, so memcached
    /// executes them in the order the client sent them.
    pub fn affinity(&self) -> usize {
        self.next_affinity.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends one request for `bkey`, encoded by `encode` with the name
    /// the key has where it goes.
    pub fn call_one(
        &self,
        bkey: &[u8],
        encode: impl FnOnce(&[u8]) -> BytesMut,
        affinity: usize,
    ) -> Call {
        let topology = self.topology.load();
        match topology.target(bkey) {
            Target::Home(b) => b.pool.call(encode(bkey).freeze(), 1, affinity),
            Target::Gutter(b, tag) => {
                b.pool
                    .call(encode(&gutter_key(tag, bkey)).freeze(), 1, affinity)
            }
            Target::Refused(addr) => refused(addr),
        }
    }

    /// Sends one request per key (each encoded by `encode` with the name
    /// it has where it goes), grouped into one batch per backend so the
    /// backends work concurrently, and returns each key's reply in the
    /// caller's order.
    pub fn fan_out(
        &self,
        bkeys: &[Bytes],
        encode: impl Fn(&[u8], &mut BytesMut),
        affinity: usize,
    ) -> FanOut {
        let topology = self.topology.load();
        let slots = bkeys.len();
        let mut groups: Vec<(&Backend, BytesMut, Vec<usize>)> = Vec::new();
        let mut calls = Vec::new();
        for (i, bkey) in bkeys.iter().enumerate() {
            let (b, gutter) = match topology.target(bkey) {
                Target::Home(b) => (b, None),
                Target::Gutter(b, tag) => (b, Some(gutter_key(tag, bkey))),
                Target::Refused(addr) => {
                    calls.push((refused(addr), vec![i]));
                    continue;
                }
            };
            let g = match groups.iter().position(|g| std::ptr::eq(g.0, b)) {
                Some(g) => g,
                None => {
                    groups.push((b, BytesMut::new(), Vec::new()));
                    groups.len() - 1
                }
            };
            encode(gutter.as_deref().unwrap_or(bkey), &mut groups[g].1);
            groups[g].2.push(i);
        }
        calls.extend(groups.into_iter().map(|(b, bytes, idx)| {
            let call = b.pool.call(bytes.freeze(), idx.len(), affinity);
            (call, idx)
        }));
        FanOut { calls, slots }
    }
}

/// The failure of a request whose home is ejected and has nowhere to go.
fn refused(addr: Option<SocketAddr>) -> Call {
    let addr = addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    Call::failed(addr, ErrorKind::Ejected)
}

/// A multi-key request in flight on several backends.
pub struct FanOut {
    calls: Vec<(Call, Vec<usize>)>,
    slots: usize,
}

impl FanOut {
    /// Each key's reply (or its backend's failure), in request order.
    pub async fn wait(self) -> Vec<Result<crate::protocol::Response, ProxyError>> {
        let mut out: Vec<Option<Result<_, _>>> = (0..self.slots).map(|_| None).collect();
        // Every batch is already on the wire; awaiting them in turn costs
        // only the slowest one.
        for (call, idx) in self.calls {
            let backend = call.backend();
            match call.wait().await {
                Ok(replies) => {
                    // A connection completes a batch only with one reply
                    // per request; should that ever break, the keys left
                    // without a reply fail, naming the backend.
                    let mut replies = replies.into_iter();
                    for i in idx {
                        out[i] = Some(replies.next().ok_or_else(|| {
                            ProxyError::new(Side::Internal, ErrorKind::ReplyCount).at(backend)
                        }));
                    }
                }
                Err(e) => {
                    for i in idx {
                        out[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        // Every slot belongs to exactly one call, so none is left empty.
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(ProxyError::new(Side::Internal, ErrorKind::ReplyCount)))
            })
            .collect()
    }
}
