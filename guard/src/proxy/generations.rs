//! Flush generations kept on the backends, so a tenant's `flush_all`
//! survives a restart of guard and reaches every proxy in front of the same
//! backends.
//!
//! A flush moves the namespace's generation on in this process at once
//! ([`crate::tenant::KeyNamespace::flush`]). Every backend also holds each
//! namespace's generation, as decimal text under `<namespace>:gen`; no
//! client key maps there, since those are `<namespace>:<7 digits>:<key>`.
//! Once per [`SYNC_INTERVAL`], and at once after a flush here, a task reads
//! the markers from every backend, moves each local generation forward to
//! the newest found (generations never move back), and writes the local
//! generation to every backend holding an older one or none, which also
//! restores the markers of a backend that restarted empty. A flush on one
//! proxy so reaches the others within about one interval. Before the proxy
//! accepts its first client it syncs once, so a restarted guard never
//! serves keys flushed before it stopped.
//!
//! Markers are read every interval and so stay hot in memcached's LRU; one
//! lost on a backend is rewritten from the others or from this process.

use std::{sync::Arc, time::Duration};

use bytes::{BufMut as _, Bytes, BytesMut};
use log::{info, warn};
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use super::{Phase, Shared};
use crate::{
    protocol::{
        Response,
        meta::{MetaCode, MetaResponse},
    },
    tenant::KeyNamespace,
};

/// How often markers are read and repaired.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Suffix of a namespace's marker key.
const MARKER_SUFFIX: &[u8] = b":gen";

/// The marker key of `ns`.
pub fn marker_key(ns: &KeyNamespace) -> Bytes {
    let mut k = BytesMut::with_capacity(ns.name().len() + MARKER_SUFFIX.len());
    k.put_slice(ns.name());
    k.put_slice(MARKER_SUFFIX);
    k.freeze()
}

/// Syncs until the proxy stops: every interval, and whenever `flushed` is
/// notified.
pub async fn run(sh: Arc<Shared>, flushed: Arc<Notify>, mut phase: watch::Receiver<Phase>) {
    let mut next = Instant::now() + SYNC_INTERVAL;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = flushed.notified() => {}
            r = phase.changed() => if r.is_err() || *phase.borrow() == Phase::Stopped {
                return;
            },
        }
        sync(&sh).await;
        next = Instant::now() + SYNC_INTERVAL;
    }
}

/// The sync before the first client: waits (at most `wait`) for the
/// backend connections to come up, then syncs with those that did.
pub async fn initial_sync(sh: &Shared, wait: Duration) {
    let deadline = Instant::now() + wait;
    while !sh.router.pools().iter().all(|p| p.is_up()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let moved = sync(sh).await;
    if moved > 0 {
        info!("restored {moved} flush generation(s) from the backends");
    }
}

/// One pass: read every marker from every backend, move local generations
/// forward, write back where a backend is behind. Returns how many local
/// generations moved.
pub async fn sync(sh: &Shared) -> usize {
    let registry = sh.tenants.load();
    let namespaces: Vec<&KeyNamespace> = registry.tenants().iter().map(|t| &t.namespace).collect();
    if namespaces.is_empty() {
        return 0;
    }
    let mut read = BytesMut::new();
    for ns in &namespaces {
        read.put_slice(b"mg ");
        read.put_slice(&marker_key(ns));
        read.put_slice(b" v\r\n");
    }
    let read = read.freeze();
    let calls: Vec<_> = sh
        .router
        .pools()
        .iter()
        .map(|p| p.call(read.clone(), namespaces.len(), 0))
        .collect();
    // Per backend, each namespace's marker: `Some(None)` when it has none.
    let mut found: Vec<Option<Vec<Option<u64>>>> = Vec::with_capacity(calls.len());
    for call in calls {
        found.push(call.wait().await.ok().and_then(|replies| {
            (replies.len() == namespaces.len())
                .then(|| replies.iter().map(marker_value).collect::<Option<Vec<_>>>())
                .flatten()
        }));
    }

    let mut moved = 0;
    let mut writes: Vec<BytesMut> = vec![BytesMut::new(); found.len()];
    let mut counts = vec![0usize; found.len()];
    for (i, ns) in namespaces.iter().enumerate() {
        let before = ns.generation();
        let newest = found
            .iter()
            .flatten()
            .filter_map(|markers| markers[i])
            .max()
            .unwrap_or(0);
        ns.observe_generation(newest);
        let now = ns.generation();
        if now != before {
            moved += 1;
        }
        if now == 0 {
            continue;
        }
        let value = now.to_string();
        for (b, markers) in found.iter().enumerate() {
            let Some(markers) = markers else { continue };
            if markers[i].is_none_or(|g| g < now) {
                let w = &mut writes[b];
                w.put_slice(b"ms ");
                w.put_slice(&marker_key(ns));
                w.put_slice(format!(" {}\r\n{value}\r\n", value.len()).as_bytes());
                counts[b] += 1;
            }
        }
    }
    let pools = sh.router.pools();
    let calls: Vec<_> = writes
        .into_iter()
        .zip(&counts)
        .enumerate()
        .filter(|(_, (_, n))| **n > 0)
        .map(|(b, (w, n))| (b, pools[b].call(w.freeze(), *n, 0)))
        .collect();
    for (b, call) in calls {
        if let Err(e) = call.wait().await {
            warn!(
                "cannot record flush generations on {}: {e}",
                pools[b].addr()
            );
        }
    }
    moved
}

/// A marker read: `Some(Some(g))` found, `Some(None)` absent, `None` when
/// the reply makes no sense (that backend is then left out of this pass).
fn marker_value(r: &Response) -> Option<Option<u64>> {
    match r {
        Response::Meta(MetaResponse {
            code: MetaCode::Va,
            value: Some(v),
            ..
        }) => std::str::from_utf8(v).ok()?.parse().ok().map(Some),
        Response::Meta(MetaResponse {
            code: MetaCode::En, ..
        }) => Some(None),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(code: MetaCode, value: Option<&'static [u8]>) -> Response {
        let mut r = MetaResponse::new(code);
        r.value = value.map(Bytes::from_static);
        Response::Meta(r)
    }

    #[test]
    fn markers_read_as_generations() {
        assert_eq!(
            marker_value(&meta(MetaCode::Va, Some(b"1764241234"))),
            Some(Some(1_764_241_234))
        );
        assert_eq!(marker_value(&meta(MetaCode::En, None)), Some(None));
        assert_eq!(marker_value(&meta(MetaCode::Va, Some(b"x1"))), None);
        assert_eq!(marker_value(&meta(MetaCode::Hd, None)), None);
    }

    #[test]
    fn marker_keys_never_meet_client_keys() {
        let ns = KeyNamespace::new("acme");
        let marker = marker_key(&ns);
        assert_eq!(&marker[..], b"acme:gen");
        // Memcached matches keys whole, and the shortest client key in the
        // namespace is longer.
        assert!(ns.backend_key(b"k").unwrap().len() > marker.len());
    }
}
