//! Key namespaces: each tenant's keys live under its own prefix on the
//! shared backends, and `flush_all` only moves that prefix on.
//!
//! A backend key is `<namespace>:<generation>:<client key>`, where the
//! generation is [`GENERATION_WIDTH`] base-36 digits. The prefix has a fixed
//! length, so the key budget does not change when a tenant flushes:
//!
//! ```text
//! effective client key limit = 250 - (namespace length + 2 + GENERATION_WIDTH)
//! ```
//!
//! e.g. 236 bytes for a 5-byte namespace, 201 for the longest (40 bytes).
//! The open tenant (no credentials configured) is namespaced too, as
//! [`OPEN_NAMESPACE`] (`_:<generation>:<key>`, 240 bytes of client key), so
//! its `flush_all` never flushes a backend either; tenants cannot take that
//! namespace (see `config`). Unless it is raw (below).
//! The prefix holds no spaces or control characters (the config forbids
//! them in namespaces), so a backend key is a valid text key exactly when
//! the client key is. Keys are raw bytes: meta-protocol base64 keys (`b`
//! flag) must be decoded by the session before [`KeyNamespace::backend_key`]
//! and encoded again after [`KeyNamespace::client_key`].
//!
//! `flush_all` becomes [`KeyNamespace::flush`]: the generation moves on, the
//! old generation's keys are never asked for again and age out of the
//! backends by LRU and expiry; the backends themselves are never flushed.
//! A delayed flush (`flush_all 60`) is stored as a deadline and applied by
//! the first key operation after it, without threads or timers. As in
//! memcached, a later flush replaces a pending delayed one.
//!
//! A *raw* namespace ([`KeyNamespace::raw`], the open tenant with `[proxy]
//! keys = "raw"`) has no prefix and no generation: a backend key is the
//! client key itself, up to memcached's 250 bytes, so guard stores and
//! hashes keys exactly as twemproxy does and can take over its warm cache.
//! It has nothing to flush ([`KeyNamespace::flush`] refuses), and it shares
//! the backends' key space with everything else on them, guard's own keys
//! under `config::INTERNAL_KEY_PREFIX` included.
//!
//! A reload keeps generations (see `TenantRegistry::reload`); across
//! restarts and between proxy hosts that share backends the proxy carries
//! them on the backends (`proxy::generations`): it reads
//! [`KeyNamespace::generation`] and restores with
//! [`KeyNamespace::observe_generation`] (which only moves forward). A new
//! generation is at least the current Unix time in seconds, so generations
//! from different hosts order by when the flush happened.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::{BufMut, Bytes, BytesMut};

/// memcached's longest key.
pub const MAX_BACKEND_KEY_LEN: usize = 250;
/// The open tenant's namespace. No tenant may use it, nor start its own
/// with `_:`.
pub const OPEN_NAMESPACE: &str = crate::config::OPEN_NAMESPACE;
/// Digits of the generation marker.
pub const GENERATION_WIDTH: usize = 7;
/// Generations are kept modulo this (36^7: seconds until the year 4400).
const GENERATION_MODULUS: u64 = 36u64.pow(GENERATION_WIDTH as u32);

/// The client key is too long once prefixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("key of {len} bytes is longer than this tenant's limit of {max}")]
pub struct KeyTooLong {
    /// The client key's length.
    pub len: usize,
    /// The longest client key this namespace takes.
    pub max: usize,
}

/// One tenant's key space. Cheap to clone; clones share the generation.
#[derive(Debug, Clone)]
pub struct KeyNamespace {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Empty for a raw namespace.
    namespace: Box<[u8]>,
    /// Keys are stored as the client sent them: no prefix, no generation.
    raw: bool,
    generation: AtomicU64,
    /// Nanoseconds after `epoch` plus one at which a delayed flush is due;
    /// 0 when none is pending.
    flush_at: AtomicU64,
    epoch: Instant,
}

impl KeyNamespace {
    /// The namespace `name` (already validated by the config).
    pub fn new(name: &str) -> Self {
        Self::build(name.as_bytes(), false)
    }

    /// The open tenant's namespace, [`OPEN_NAMESPACE`].
    pub fn open() -> Self {
        Self::new(OPEN_NAMESPACE)
    }

    /// The raw key space: client keys are backend keys, unprefixed, and
    /// there is no generation to flush.
    pub fn raw() -> Self {
        Self::build(b"", true)
    }

    fn build(namespace: &[u8], raw: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace: namespace.into(),
                raw,
                generation: AtomicU64::new(0),
                flush_at: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    /// The namespace as configured; empty for a raw namespace.
    pub fn name(&self) -> &[u8] {
        &self.inner.namespace
    }

    /// Whether keys are stored as the client sent them ([`Self::raw`]).
    pub fn is_raw(&self) -> bool {
        self.inner.raw
    }

    /// Bytes the prefix adds to every key.
    pub fn prefix_len(&self) -> usize {
        if self.inner.raw {
            return 0;
        }
        self.inner.namespace.len() + 2 + GENERATION_WIDTH
    }

    /// Longest client key: 250 minus the prefix.
    pub fn max_client_key_len(&self) -> usize {
        MAX_BACKEND_KEY_LEN.saturating_sub(self.prefix_len())
    }

    /// The current generation (after any due delayed flush).
    pub fn generation(&self) -> u64 {
        self.apply_due(Instant::now());
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Moves the generation forward to `generation` if it is ahead (a
    /// restored or another host's generation); never moves it back. A raw
    /// namespace stays at 0: it has no generation.
    pub fn observe_generation(&self, generation: u64) {
        if self.inner.raw {
            return;
        }
        self.inner
            .generation
            .fetch_max(generation % GENERATION_MODULUS, Ordering::AcqRel);
    }

    /// Whether a delayed flush is pending.
    pub fn flush_pending(&self) -> bool {
        self.inner.flush_at.load(Ordering::Acquire) != 0
    }

    /// The backend key for a client key.
    pub fn backend_key(&self, client_key: &[u8]) -> Result<Bytes, KeyTooLong> {
        self.backend_key_at(client_key, Instant::now())
    }

    /// The client key for a backend key: `None` unless it is this tenant's
    /// and of the current generation. Copies; [`Self::strip`] slices.
    pub fn client_key(&self, backend_key: &[u8]) -> Option<Bytes> {
        let n = self.matching_prefix(backend_key, Instant::now())?;
        Some(Bytes::copy_from_slice(&backend_key[n..]))
    }

    /// [`Self::client_key`] without copying.
    pub fn strip(&self, backend_key: &Bytes) -> Option<Bytes> {
        let n = self.matching_prefix(backend_key, Instant::now())?;
        Some(backend_key.slice(n..))
    }

    /// `flush_all` for this tenant: now (`None` or zero), or after
    /// `delay`, replacing any pending delayed flush. False, and nothing
    /// done, for a raw namespace: it has no generation to move on, and its
    /// keys share the backends with everyone's.
    pub fn flush(&self, delay: Option<Duration>) -> bool {
        self.flush_at_time(delay, Instant::now())
    }

    pub(crate) fn backend_key_at(
        &self,
        client_key: &[u8],
        now: Instant,
    ) -> Result<Bytes, KeyTooLong> {
        let max = self.max_client_key_len();
        if client_key.len() > max {
            return Err(KeyTooLong {
                len: client_key.len(),
                max,
            });
        }
        if self.inner.raw {
            // Keys starting with `config::INTERNAL_KEY_PREFIX` pass too:
            // twemproxy takes them, and a drop-in that refused them would
            // break the clients that use them on the day of the switch.
            // Guard's own keys are few and named by guard, so meeting one
            // takes a client key of exactly that name; the README tells
            // raw-mode users to keep clear of the prefix.
            return Ok(Bytes::copy_from_slice(client_key));
        }
        self.apply_due(now);
        let mut out = BytesMut::with_capacity(self.prefix_len() + client_key.len());
        self.put_prefix(&mut out);
        out.put_slice(client_key);
        Ok(out.freeze())
    }

    fn matching_prefix(&self, backend_key: &[u8], now: Instant) -> Option<usize> {
        if self.inner.raw {
            return Some(0);
        }
        self.apply_due(now);
        let mut prefix = BytesMut::with_capacity(self.prefix_len());
        self.put_prefix(&mut prefix);
        backend_key.starts_with(&prefix).then_some(prefix.len())
    }

    pub(crate) fn flush_at_time(&self, delay: Option<Duration>, now: Instant) -> bool {
        if self.inner.raw {
            return false;
        }
        match delay.filter(|d| !d.is_zero()) {
            None => {
                self.inner.flush_at.store(0, Ordering::Release);
                self.bump();
            }
            Some(d) => {
                let at = self
                    .nanos(now)
                    .saturating_add(d.as_nanos().min(u64::MAX as u128) as u64);
                self.inner
                    .flush_at
                    .store(at.saturating_add(1), Ordering::Release);
            }
        }
        true
    }

    fn nanos(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.inner.epoch)
            .as_nanos()
            .min(u64::MAX as u128 - 1) as u64
    }

    /// Applies a delayed flush whose time has come (exactly once, whoever
    /// gets here first).
    fn apply_due(&self, now: Instant) {
        let at = self.inner.flush_at.load(Ordering::Acquire);
        if at != 0
            && self.nanos(now) + 1 >= at
            && self
                .inner
                .flush_at
                .compare_exchange(at, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.bump();
        }
    }

    fn bump(&self) {
        let _ = self
            .inner
            .generation
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                Some(Self::generation_after(g))
            });
    }

    /// The generation a flush moves to from `g`: past it, and at least the
    /// current Unix time in seconds.
    pub fn generation_after(g: u64) -> u64 {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        (g + 1).max(unix) % GENERATION_MODULUS
    }

    /// An immediate flush to `generation`, worked out elsewhere (from the
    /// backends' markers): replaces a pending delayed flush, as memcached
    /// does, and moves forward only.
    pub fn flush_to(&self, generation: u64) {
        self.inner.flush_at.store(0, Ordering::Release);
        self.observe_generation(generation);
    }

    fn put_prefix(&self, out: &mut BytesMut) {
        out.put_slice(&self.inner.namespace);
        out.put_u8(b':');
        let mut g = self.inner.generation.load(Ordering::Acquire);
        let mut digits = [b'0'; GENERATION_WIDTH];
        for d in digits.iter_mut().rev() {
            *d = b"0123456789abcdefghijklmnopqrstuvwxyz"[(g % 36) as usize];
            g /= 36;
        }
        out.put_slice(&digits);
        out.put_u8(b':');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_strips() {
        let ns = KeyNamespace::new("acme");
        let k = ns.backend_key(b"user:1").unwrap();
        assert_eq!(&k[..], b"acme:0000000:user:1");
        assert_eq!(ns.prefix_len(), 13);
        assert_eq!(ns.client_key(&k).unwrap(), &b"user:1"[..]);
        assert_eq!(ns.strip(&k).unwrap(), &b"user:1"[..]);
        assert!(!k.iter().any(|&b| b <= b' ' || b == 0x7f));
    }

    #[test]
    fn tenants_never_read_each_others_keys() {
        let a = KeyNamespace::new("acme");
        let b = KeyNamespace::new("acme2");
        let c = KeyNamespace::new("globex");
        for key in [&b"x"[..], b"2:0000000:x", b":", b"0000000:y"] {
            let ka = a.backend_key(key).unwrap();
            assert_eq!(a.client_key(&ka).unwrap(), key);
            assert_eq!(b.client_key(&ka), None, "{ka:?}");
            assert_eq!(c.client_key(&ka), None, "{ka:?}");
            let kb = b.backend_key(key).unwrap();
            assert_eq!(a.client_key(&kb), None, "{kb:?}");
        }
        assert_eq!(a.client_key(b"acme"), None);
        assert_eq!(a.client_key(b"acme:000000"), None);
        assert_eq!(a.client_key(b"other:0000000:x"), None);
        // The empty client key round-trips (the parser refuses it first).
        assert_eq!(a.client_key(b"acme:0000000:").unwrap(), &b""[..]);
    }

    #[test]
    fn key_length_is_accounted_at_the_boundary() {
        let ns = KeyNamespace::new("acme");
        let max = 250 - ns.prefix_len();
        assert_eq!(ns.max_client_key_len(), max);
        assert_eq!(max, 237);
        let fits = vec![b'k'; max];
        assert_eq!(ns.backend_key(&fits).unwrap().len(), 250);
        let over = vec![b'k'; max + 1];
        assert_eq!(ns.backend_key(&over), Err(KeyTooLong { len: max + 1, max }));
        // The longest namespace leaves 201 bytes.
        let long = KeyNamespace::new(&"n".repeat(40));
        assert_eq!(long.max_client_key_len(), 201);
        assert_eq!(long.backend_key(&[b'k'; 201]).unwrap().len(), 250);
        assert!(long.backend_key(&[b'k'; 202]).is_err());
        // A flush does not change the budget.
        ns.flush(None);
        assert_eq!(ns.backend_key(&fits).unwrap().len(), 250);
        assert!(ns.backend_key(&over).is_err());
        // The open namespace is a namespace like any other.
        let open = KeyNamespace::open();
        assert_eq!(open.max_client_key_len(), 240);
        assert_eq!(open.backend_key(&[b'k'; 240]).unwrap().len(), 250);
        assert!(open.backend_key(&[b'k'; 241]).is_err());
        let k = open.backend_key(b"abc").unwrap();
        assert_eq!(&k[..], b"_:0000000:abc");
        assert_eq!(open.client_key(&k).unwrap(), &b"abc"[..]);
    }

    #[test]
    fn flush_makes_old_keys_unreachable() {
        let ns = KeyNamespace::new("acme");
        let other = KeyNamespace::new("globex");
        let old = ns.backend_key(b"k").unwrap();
        let untouched = other.backend_key(b"k").unwrap();
        assert!(ns.flush(None));
        assert!(ns.generation() > 0);
        assert_eq!(ns.client_key(&old), None);
        let new = ns.backend_key(b"k").unwrap();
        assert_ne!(new, old);
        assert_eq!(new.len(), old.len());
        assert_eq!(ns.client_key(&new).unwrap(), &b"k"[..]);
        // Only this tenant moved.
        assert_eq!(other.client_key(&untouched).unwrap(), &b"k"[..]);
        // Each flush is a new generation, even within one second.
        let g = ns.generation();
        ns.flush(Some(Duration::ZERO));
        assert_eq!(ns.generation(), g + 1);
        assert_eq!(ns.client_key(&new), None);
        // The open namespace flushes the same way.
        let open = KeyNamespace::open();
        let k = open.backend_key(b"k").unwrap();
        assert!(open.flush(None));
        assert_eq!(open.client_key(&k), None);
    }

    #[test]
    fn delayed_flush_applies_after_its_time() {
        let ns = KeyNamespace::new("acme");
        let t0 = Instant::now();
        let key = ns.backend_key_at(b"k", t0).unwrap();
        assert!(ns.flush_at_time(Some(Duration::from_secs(60)), t0));
        assert!(ns.flush_pending());
        // Before the deadline the key is still the current generation.
        let before = t0 + Duration::from_secs(59);
        assert_eq!(ns.backend_key_at(b"k", before).unwrap(), key);
        assert_eq!(ns.matching_prefix(&key, before), Some(13));
        // After it, the first key operation applies the flush, once.
        let after = t0 + Duration::from_secs(61);
        assert_eq!(ns.matching_prefix(&key, after), None);
        assert!(!ns.flush_pending());
        let newer = ns.backend_key_at(b"k", after).unwrap();
        assert_ne!(newer, key);
        let g = ns.inner.generation.load(Ordering::Acquire);
        assert_eq!(
            ns.backend_key_at(b"k", after + Duration::from_secs(100))
                .unwrap(),
            newer
        );
        assert_eq!(ns.inner.generation.load(Ordering::Acquire), g);

        // A later flush replaces a pending delayed one.
        ns.flush_at_time(Some(Duration::from_secs(10)), after);
        ns.flush_at_time(Some(Duration::from_secs(1000)), after);
        let k2 = ns
            .backend_key_at(b"k", after + Duration::from_secs(20))
            .unwrap();
        assert_eq!(k2, newer);
        ns.flush_at_time(None, after + Duration::from_secs(20));
        assert!(!ns.flush_pending());
        let g2 = ns.inner.generation.load(Ordering::Acquire);
        ns.backend_key_at(b"k", after + Duration::from_secs(2000))
            .unwrap();
        assert_eq!(ns.inner.generation.load(Ordering::Acquire), g2);

        // And on the real clock.
        let ns = KeyNamespace::new("real");
        let key = ns.backend_key(b"k").unwrap();
        ns.flush(Some(Duration::from_millis(20)));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(ns.client_key(&key), None);
    }

    #[test]
    fn raw_keys_are_client_keys() {
        let raw = KeyNamespace::raw();
        assert!(raw.is_raw());
        assert!(!KeyNamespace::open().is_raw());
        assert_eq!(raw.prefix_len(), 0);
        assert_eq!(raw.max_client_key_len(), MAX_BACKEND_KEY_LEN);
        // Whatever the key looks like, including what a namespaced key
        // or guard's own keys look like: stored and read back as sent.
        for key in [&b"user:1"[..], b"_:0000000:x", b"acme:gen", b"~probe", b""] {
            let k = raw.backend_key(key).unwrap();
            assert_eq!(&k[..], key);
            assert_eq!(raw.client_key(key).unwrap(), key);
            assert_eq!(raw.strip(&Bytes::copy_from_slice(key)).unwrap(), key);
        }
        // memcached's own limit, and nothing less.
        assert_eq!(raw.backend_key(&[b'k'; 250]).unwrap().len(), 250);
        assert_eq!(
            raw.backend_key(&[b'k'; 251]),
            Err(KeyTooLong { len: 251, max: 250 })
        );
    }

    #[test]
    fn raw_namespace_has_no_generation() {
        let raw = KeyNamespace::raw();
        let k = raw.backend_key(b"k").unwrap();
        assert!(!raw.flush(None));
        assert!(!raw.flush(Some(Duration::from_secs(5))));
        assert!(!raw.flush_pending());
        raw.observe_generation(1_000);
        raw.flush_to(2_000);
        assert_eq!(raw.generation(), 0);
        assert_eq!(raw.backend_key(b"k").unwrap(), k);
        assert_eq!(raw.client_key(&k).unwrap(), &b"k"[..]);
    }

    #[test]
    fn observed_generations_only_move_forward() {
        let ns = KeyNamespace::new("acme");
        ns.observe_generation(1_000);
        assert_eq!(ns.generation(), 1_000);
        ns.observe_generation(5);
        assert_eq!(ns.generation(), 1_000);
        assert!(ns.backend_key(b"k").unwrap().starts_with(b"acme:00000rs:"));
        // Clones share the state.
        let clone = ns.clone();
        ns.flush(None);
        assert_eq!(clone.generation(), ns.generation());
    }
}
