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
use tokio::sync::watch;

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
    /// Where the ejection controller has it, for operators.
    pub state: BackendStateCell,
}

/// A backend's state as operators see it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// In the ring, taking its keys.
    Healthy,
    /// Out of the ring, waiting for its next probe.
    Ejected,
    /// Out of the ring, its probe running.
    Probing,
    /// Added by a reload, not yet probed in.
    Joining,
}

impl BackendState {
    /// Every state, in the order of their numbers.
    pub const ALL: [Self; 4] = [Self::Healthy, Self::Ejected, Self::Probing, Self::Joining];

    /// The state's name in metrics and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Ejected => "ejected",
            Self::Probing => "probing",
            Self::Joining => "joining",
        }
    }
}

/// [`BackendState`] and ejection count, written by the controller only.
#[derive(Debug, Default)]
pub struct BackendStateCell {
    state: std::sync::atomic::AtomicU8,
    ejections: std::sync::atomic::AtomicU64,
}

impl BackendStateCell {
    /// The state now.
    pub fn get(&self) -> BackendState {
        BackendState::ALL[usize::from(self.state.load(Ordering::Relaxed)).min(3)]
    }

    /// Sets the state.
    pub fn set(&self, state: BackendState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Times this backend was ejected since it was added.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Counts one ejection.
    pub fn ejected(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }
}

impl Backend {
    /// A backend at `addr`, served by `pool`.
    pub fn new(pool: BackendPool) -> Self {
        let addr = pool.addr();
        Self {
            addr,
            identity: server_identity(&addr.ip().to_string(), addr.port(), None),
            pool,
            state: BackendStateCell::default(),
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
/// `<tag>#<md5 of bkey in hex>`. Every name starts with `~`, as no
/// tenant's namespaced key does (raw keys may; see the README).
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

/// Who sends a request: the session's connection affinity (see
/// [`Router::affinity`]) and its tenant, whose queue the request waits
/// in to be written (see [`super::fair`]).
#[derive(Copy, Clone, Debug)]
pub struct Caller {
    pub affinity: usize,
    pub tenant: u32,
}

/// The ring in force and what changes it.
pub struct Router {
    topology: ArcSwap<Topology>,
    next_affinity: AtomicUsize,
    /// Counts the rings published, so flush generations reach a backend
    /// that rejoined at once (a watch, so no change is missed while the
    /// marker pass is busy).
    changed: watch::Sender<u64>,
    /// Every backend the controller tracks, joining ones included, in
    /// configuration order: what operators are shown.
    tracked: ArcSwap<Vec<Arc<Backend>>>,
}

impl Router {
    /// A router over `topology`.
    pub fn new(topology: Topology) -> Self {
        Self {
            topology: ArcSwap::from_pointee(topology),
            next_affinity: AtomicUsize::new(0),
            changed: watch::channel(0).0,
            tracked: ArcSwap::default(),
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
        self.changed.send_modify(|n| *n += 1);
    }

    /// Every backend tracked, joining ones included (see
    /// [`Backend::state`]).
    pub fn tracked(&self) -> Arc<Vec<Arc<Backend>>> {
        self.tracked.load_full()
    }

    /// Replaces what [`Self::tracked`] returns.
    pub fn set_tracked(&self, backends: Vec<Arc<Backend>>) {
        self.tracked.store(Arc::new(backends));
    }

    /// Changes at every [`Self::publish`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
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
        caller: Caller,
    ) -> Call {
        let topology = self.topology.load();
        let Caller { affinity, tenant } = caller;
        match topology.target(bkey) {
            Target::Home(b) => b.pool.call(encode(bkey).freeze(), 1, affinity, tenant),
            Target::Gutter(b, tag) => {
                let request = encode(&gutter_key(tag, bkey)).freeze();
                b.pool.call(request, 1, affinity, tenant)
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
        caller: Caller,
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
            let call = b
                .pool
                .call(bytes.freeze(), idx.len(), caller.affinity, caller.tenant);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{backend::BackendSettings, stats::ProxyStats};
    use std::time::Duration;

    /// A backend nobody listens for: its connections fail in the
    /// background, which routing does not look at.
    fn backend(port: u16) -> Arc<Backend> {
        let settings = BackendSettings {
            connect_timeout: Duration::from_millis(50),
            request_timeout: Duration::from_millis(50),
            connections: 1,
            max_in_flight: 16,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let pool = BackendPool::start(
            addr,
            &settings,
            Arc::<ProxyStats>::default(),
            Arc::default(),
        );
        Arc::new(Backend::new(pool))
    }

    fn ring(ejected: &[usize], policy: EjectPolicy) -> Topology {
        let members = (0..3)
            .map(|i| Member {
                backend: backend(9 + i as u16),
                weight: 1,
                gutter: ejected.contains(&i).then(|| gutter_tag(40 + i as u64)),
            })
            .collect();
        Topology::new(members, policy)
    }

    /// Where a key goes: the backend's index and the name it has there,
    /// or `None` when refused.
    fn place(t: &Topology, key: &[u8]) -> Option<(usize, Bytes)> {
        let index = |b: &Backend| t.members.iter().position(|m| std::ptr::eq(&*m.backend, b));
        match t.target(key) {
            Target::Home(b) => Some((index(b)?, Bytes::copy_from_slice(key))),
            Target::Gutter(b, tag) => Some((index(b)?, gutter_key(tag, key))),
            Target::Refused(_) => None,
        }
    }

    #[test]
    fn gutter_names_start_with_the_ejection_and_fit_memcached() {
        assert_eq!(&gutter_tag(0)[..], b"~0000000000000");
        assert_eq!(&gutter_tag(35)[..], b"~000000000000z");
        assert_eq!(gutter_tag(u64::MAX).len(), 14);
        let tag = gutter_tag(7);
        assert_eq!(
            &gutter_key(&tag, b"_:0000000:k")[..],
            b"~0000000000007:_:0000000:k"
        );
        // 235 bytes still fit with the tag; 236 take the hashed form.
        let fits = vec![b'a'; 235];
        assert_eq!(gutter_key(&tag, &fits).len(), 250);
        let long = vec![b'a'; 236];
        let hashed = gutter_key(&tag, &long);
        assert_eq!(hashed.len(), 14 + 1 + 32);
        assert_eq!(hashed[14], b'#');
        assert_ne!(hashed, gutter_key(&tag, &vec![b'b'; 236]));
    }

    #[tokio::test]
    async fn an_ejected_homes_keys_go_elsewhere_under_gutter_names_and_nothing_else_moves() {
        let all = ring(&[], EjectPolicy::Redistribute);
        let out = ring(&[1], EjectPolicy::Redistribute);
        let mut moved = 0;
        for i in 0..2_000 {
            let key = format!("key:{i}");
            let (home, name) = place(&all, key.as_bytes()).unwrap();
            assert_eq!(&name[..], key.as_bytes());
            let (now, name) = place(&out, key.as_bytes()).unwrap();
            if home == 1 {
                moved += 1;
                assert_ne!(now, 1, "{key}");
                assert_eq!(name, gutter_key(&gutter_tag(41), key.as_bytes()));
            } else {
                assert_eq!((now, &name[..]), (home, key.as_bytes()), "{key}");
            }
        }
        assert!(moved > 400, "{moved}");
    }

    #[tokio::test]
    async fn fail_fast_and_an_all_ejected_ring_refuse_the_ejected_homes_keys() {
        let ff = ring(&[1], EjectPolicy::FailFast);
        let all = ring(&[], EjectPolicy::FailFast);
        for i in 0..500 {
            let key = format!("key:{i}");
            let home = place(&all, key.as_bytes()).unwrap().0;
            assert_eq!(place(&ff, key.as_bytes()).is_none(), home == 1, "{key}");
        }
        let none = ring(&[0, 1, 2], EjectPolicy::Redistribute);
        assert!(place(&none, b"any").is_none());
        let router = Router::new(none);
        let e = router
            .call_one(
                b"any",
                |k| BytesMut::from(k),
                Caller {
                    affinity: 0,
                    tenant: 0,
                },
            )
            .wait()
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Ejected);
        assert_eq!(e.reply_text(), "backend unavailable");
    }
}
