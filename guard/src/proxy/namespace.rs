//! Key namespaces: how one tenant's keys are kept apart on shared backends,
//! and how `flush_all` empties a tenant without touching anyone else.
//!
//! Every key is sent to the backends as `<prefix><generation>:<key>`.
//! `flush_all` bumps the generation, so every earlier key becomes
//! unreachable at once; memcached's LRU reclaims the orphans. A real
//! `flush_all` on a backend would empty every tenant's data.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, Bytes, BytesMut};

/// One tenant's key namespace.
#[derive(Debug)]
pub struct KeyNamespace {
    prefix: Bytes,
    generation: AtomicU64,
    max_key_len: usize,
}

impl KeyNamespace {
    /// A namespace whose backend keys start with `prefix` and, prefix
    /// included, are at most `max_key_len` bytes (memcached: 250).
    ///
    /// The generation starts at 0 and lives in this process, so every
    /// proxy in front of the same backends shares the namespace until one
    /// of them flushes; a restart forgets flushes.
    pub fn new(prefix: impl Into<Bytes>, max_key_len: usize) -> Self {
        Self {
            prefix: prefix.into(),
            generation: AtomicU64::new(0),
            max_key_len,
        }
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Makes every key stored so far unreachable.
    pub fn flush(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn current_prefix(&self) -> BytesMut {
        let generation = self.generation().to_string();
        let mut out = BytesMut::with_capacity(self.prefix.len() + generation.len() + 1);
        out.put_slice(&self.prefix);
        out.put_slice(generation.as_bytes());
        out.put_u8(b':');
        out
    }

    /// The longest client key that still fits once prefixed.
    pub fn max_client_key_len(&self) -> usize {
        self.max_key_len.saturating_sub(self.current_prefix().len())
    }

    /// The key as stored on the backends.
    pub fn backend_key(&self, client_key: &[u8]) -> Bytes {
        let mut out = self.current_prefix();
        out.reserve(client_key.len());
        out.put_slice(client_key);
        out.freeze()
    }

    /// The client's key for a backend key of the current generation;
    /// `None` for a key outside it (another tenant's, or flushed).
    pub fn client_key(&self, backend_key: &[u8]) -> Option<Bytes> {
        let prefix = self.current_prefix();
        backend_key
            .strip_prefix(&prefix[..])
            .map(Bytes::copy_from_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_flush_hides_them() {
        let ns = KeyNamespace::new("t.", 250);
        let b = ns.backend_key(b"user:1");
        assert_eq!(&b[..], b"t.0:user:1");
        assert_eq!(ns.client_key(&b).as_deref(), Some(&b"user:1"[..]));
        assert_eq!(ns.max_client_key_len(), 250 - 4);
        ns.flush();
        assert_eq!(ns.client_key(&b), None);
        assert_eq!(&ns.backend_key(b"user:1")[..], b"t.1:user:1");
        assert_eq!(ns.client_key(b"other:user:1"), None);
    }
}
