//! Routing: which backend owns a key (ketama, as twemproxy), and fan-out of
//! multi-key requests.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;

use super::{
    backend::{BackendPool, BackendSettings, Call},
    error::{ErrorKind, ProxyError, Side},
    ketama::{Ketama, server_identity},
    stats::ProxyStats,
};
use crate::config::BackendConfig;

/// The backends and the continuum that maps keys onto them.
pub struct Router {
    ring: Ketama,
    pools: Vec<BackendPool>,
}

impl Router {
    /// Starts a pool per backend.
    pub fn start(
        backends: &[BackendConfig],
        settings: &BackendSettings,
        stats: &Arc<ProxyStats>,
    ) -> (Self, Vec<JoinHandle<()>>) {
        let identities: Vec<(String, u32)> = backends
            .iter()
            .map(|b| {
                (
                    server_identity(&b.addr.ip().to_string(), b.addr.port(), None),
                    b.weight,
                )
            })
            .collect();
        let mut pools = Vec::new();
        let mut tasks = Vec::new();
        for b in backends {
            let (pool, t) = BackendPool::start(b.addr, settings, stats.clone());
            pools.push(pool);
            tasks.extend(t);
        }
        let router = Self {
            ring: Ketama::new(&identities),
            pools,
        };
        (router, tasks)
    }

    /// The index of the backend that owns `backend_key`.
    pub fn backend_for(&self, backend_key: &[u8]) -> usize {
        self.ring.server_for(backend_key).unwrap_or(0)
    }

    /// The pools, in configuration order.
    pub fn pools(&self) -> &[BackendPool] {
        &self.pools
    }

    /// A session's connection affinity (see [`BackendPool::affinity`]).
    pub fn affinity(&self) -> usize {
        self.pools.first().map_or(0, BackendPool::affinity)
    }

    /// Sends one encoded request to the owner of `backend_key`.
    pub fn call_one(&self, backend_key: &[u8], request: Bytes, affinity: usize) -> Call {
        self.pools[self.backend_for(backend_key)].call(request, 1, affinity)
    }

    /// Sends one request per key, grouped into one batch per backend so the
    /// backends work concurrently, and returns each key's reply in the
    /// caller's order.
    pub fn fan_out(&self, requests: Vec<(Bytes, BytesMut)>, affinity: usize) -> FanOut {
        let slots = requests.len();
        let mut groups: Vec<(usize, BytesMut, Vec<usize>)> = Vec::new();
        for (i, (key, encoded)) in requests.into_iter().enumerate() {
            let b = self.backend_for(&key);
            match groups.iter_mut().find(|g| g.0 == b) {
                Some(g) => {
                    g.1.extend_from_slice(&encoded);
                    g.2.push(i);
                }
                None => groups.push((b, encoded, vec![i])),
            }
        }
        let calls = groups
            .into_iter()
            .map(|(b, bytes, idx)| {
                let call = self.pools[b].call(bytes.freeze(), idx.len(), affinity);
                (call, idx)
            })
            .collect();
        FanOut { calls, slots }
    }
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
