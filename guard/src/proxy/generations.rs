//! Flush generations kept on the backends, so a tenant's `flush_all`
//! survives a restart of guard and reaches every proxy in front of the same
//! backends.
//!
//! Every backend holds each namespace's generation, as decimal text under
//! `<namespace>:gen`; memcached matches keys whole, and every client key is
//! longer (`<namespace>:<7 digits>:<key>`), so none maps there.
//!
//! - A `flush_all` reads the namespace's markers from every backend, moves
//!   past the newest, and writes the new generation to every backend before
//!   it answers `OK`: once a client has its `OK`, no restart of any proxy
//!   brings the flushed keys back.
//! - Every [`SYNC_INTERVAL`], and at once after a reload, a pass reads all
//!   markers, moves each local generation forward to the newest found
//!   (generations never move back), and writes the local generation where a
//!   backend holds an older one or none: that publishes delayed flushes once
//!   they fire and restores the markers of a backend that restarted empty.
//!   A flush on one proxy reaches the others within about one interval.
//! - Before the proxy accepts its first client it retries a pass until a
//!   backend answers (for at most [`INITIAL_SYNC_LIMIT`]).
//!
//! Writes are compare-and-swap (`ms … C<cas>`, or add mode where there was
//! no marker), so a proxy holding an older generation can never overwrite a
//! newer one that landed since it read. Markers are read every interval and
//! stay hot in memcached's LRU.

use std::{sync::Arc, time::Duration};

use bytes::{BufMut as _, Bytes, BytesMut};
use log::{info, warn};
use tokio::{sync::watch, time::Instant};

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

/// The longest the proxy waits at start for a backend to answer.
pub const INITIAL_SYNC_LIMIT: Duration = Duration::from_secs(2);

/// How soon a pass is retried when no backend answered the last one.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// Suffix of a namespace's marker key.
const MARKER_SUFFIX: &[u8] = b":gen";

/// The marker key of `ns`.
pub fn marker_key(ns: &KeyNamespace) -> Bytes {
    let mut k = BytesMut::with_capacity(ns.name().len() + MARKER_SUFFIX.len());
    k.put_slice(ns.name());
    k.put_slice(MARKER_SUFFIX);
    k.freeze()
}

/// One marker as a backend holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Marker {
    Absent,
    /// `value` is `None` when the stored text is not a generation; the
    /// marker is then rewritten.
    Found {
        value: Option<u64>,
        cas: Bytes,
    },
    /// The backend answered something else: leave that marker alone.
    Unknown,
}

/// What a pass saw: local generations moved, backends that answered.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pass {
    pub moved: usize,
    pub answered: usize,
}

/// Passes until the proxy stops: every interval, after every reload, and
/// quickly again while no backend answers.
pub async fn run(sh: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let mut reloads = sh.tenants.subscribe();
    let mut wait = SYNC_INTERVAL;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            r = reloads.changed() => if r.is_err() {
                return;
            },
            r = phase.changed() => if r.is_err() || *phase.borrow() == Phase::Stopped {
                return;
            },
        }
        let pass = sync(&sh).await;
        wait = if pass.answered > 0 || sh.router.pools().is_empty() {
            SYNC_INTERVAL
        } else {
            RETRY_INTERVAL
        };
    }
}

/// The pass before the first client: retried until a backend answers or
/// `limit` (at most [`INITIAL_SYNC_LIMIT`]) has passed.
pub async fn initial_sync(sh: &Shared, limit: Duration) {
    let deadline = Instant::now() + limit.min(INITIAL_SYNC_LIMIT);
    loop {
        let pass = sync(sh).await;
        if pass.moved > 0 {
            info!(
                "restored {} flush generation(s) from the backends",
                pass.moved
            );
        }
        if pass.answered > 0 || sh.router.pools().is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            warn!(
                "no backend answered within {limit:?}: serving with the flush generations \
                 this process knows until one does"
            );
            return;
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
}

/// One pass over every namespace of the registry in force.
pub async fn sync(sh: &Shared) -> Pass {
    let registry = sh.tenants.load();
    let namespaces: Vec<KeyNamespace> = registry
        .tenants()
        .iter()
        .map(|t| t.namespace.clone())
        .collect();
    let reads = read(sh, &namespaces).await;
    let moved = observe(&namespaces, &reads);
    write(sh, &namespaces, &reads).await;
    Pass {
        moved,
        answered: reads.iter().flatten().count(),
    }
}

/// An immediate `flush_all` of `ns`: past every generation the backends
/// know, recorded on all that answer before it returns.
pub async fn flush(sh: Arc<Shared>, ns: KeyNamespace) {
    let namespaces = [ns];
    let reads = read(&sh, &namespaces).await;
    observe(&namespaces, &reads);
    namespaces[0].flush(None);
    write(&sh, &namespaces, &reads).await;
}

/// Every backend's markers for `namespaces`; `None` for a backend that did
/// not answer.
async fn read(sh: &Shared, namespaces: &[KeyNamespace]) -> Vec<Option<Vec<Marker>>> {
    if namespaces.is_empty() {
        return Vec::new();
    }
    let mut req = BytesMut::new();
    for ns in namespaces {
        req.put_slice(b"mg ");
        req.put_slice(&marker_key(ns));
        req.put_slice(b" v c\r\n");
    }
    let req = req.freeze();
    let calls: Vec<_> = sh
        .router
        .pools()
        .iter()
        .map(|p| p.call_any(req.clone(), namespaces.len()))
        .collect();
    let mut reads = Vec::with_capacity(calls.len());
    for call in calls {
        reads.push(
            call.wait()
                .await
                .ok()
                .filter(|replies| replies.len() == namespaces.len())
                .map(|replies| replies.iter().map(marker).collect()),
        );
    }
    reads
}

/// Moves each namespace forward to the newest marker; returns how many
/// moved.
fn observe(namespaces: &[KeyNamespace], reads: &[Option<Vec<Marker>>]) -> usize {
    let mut moved = 0;
    for (i, ns) in namespaces.iter().enumerate() {
        let newest = reads
            .iter()
            .flatten()
            .filter_map(|markers| match &markers[i] {
                Marker::Found { value, .. } => *value,
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let before = ns.generation();
        ns.observe_generation(newest);
        if ns.generation() != before {
            moved += 1;
        }
    }
    moved
}

/// Writes each local generation where a backend read older, nothing, or
/// nonsense. Compare-and-swap: a marker that changed since it was read is
/// left to the next pass.
async fn write(sh: &Shared, namespaces: &[KeyNamespace], reads: &[Option<Vec<Marker>>]) {
    let pools = sh.router.pools();
    let mut calls = Vec::new();
    for (b, markers) in reads.iter().enumerate() {
        let Some(markers) = markers else { continue };
        let mut req = BytesMut::new();
        let mut count = 0;
        for (ns, marker) in namespaces.iter().zip(markers) {
            let now = ns.generation();
            if now == 0 {
                continue;
            }
            let mode = match marker {
                Marker::Absent => Bytes::from_static(b"ME"),
                Marker::Found { value, cas } if value.is_none_or(|g| g < now) => {
                    let mut m = BytesMut::with_capacity(cas.len() + 1);
                    m.put_u8(b'C');
                    m.put_slice(cas);
                    m.freeze()
                }
                _ => continue,
            };
            let value = now.to_string();
            req.put_slice(b"ms ");
            req.put_slice(&marker_key(ns));
            req.put_slice(format!(" {} ", value.len()).as_bytes());
            req.put_slice(&mode);
            req.put_slice(b"\r\n");
            req.put_slice(value.as_bytes());
            req.put_slice(b"\r\n");
            count += 1;
        }
        if count > 0 {
            calls.push((b, pools[b].call_any(req.freeze(), count)));
        }
    }
    for (b, call) in calls {
        match call.wait().await {
            Ok(replies) => {
                for r in &replies {
                    // NS, EX, NF: another proxy wrote first; the next pass
                    // reads what it wrote.
                    if let Response::Meta(m) = r
                        && matches!(
                            m.code,
                            MetaCode::Hd | MetaCode::Ns | MetaCode::Ex | MetaCode::Nf
                        )
                    {
                        continue;
                    }
                    warn!(
                        "{} refused a flush generation marker: {r:?}",
                        pools[b].addr()
                    );
                }
            }
            Err(e) => warn!(
                "cannot record flush generations on {}: {e}",
                pools[b].addr()
            ),
        }
    }
}

fn marker(r: &Response) -> Marker {
    match r {
        Response::Meta(
            m @ MetaResponse {
                code: MetaCode::Va, ..
            },
        ) => match m.flag(b'c') {
            Some(cas) => Marker::Found {
                value: m
                    .value
                    .as_ref()
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()),
                cas: cas.token.clone(),
            },
            None => Marker::Unknown,
        },
        Response::Meta(MetaResponse {
            code: MetaCode::En, ..
        }) => Marker::Absent,
        _ => Marker::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::meta::MetaFlag;

    fn meta(code: MetaCode, value: Option<&'static [u8]>, cas: Option<&'static [u8]>) -> Response {
        let mut r = MetaResponse::new(code);
        r.value = value.map(Bytes::from_static);
        if let Some(c) = cas {
            r.flags.push(MetaFlag::new(b'c', Bytes::from_static(c)));
        }
        Response::Meta(r)
    }

    #[test]
    fn markers_read_as_generations() {
        assert_eq!(
            marker(&meta(MetaCode::Va, Some(b"1764241234"), Some(b"7"))),
            Marker::Found {
                value: Some(1_764_241_234),
                cas: Bytes::from_static(b"7")
            }
        );
        assert_eq!(marker(&meta(MetaCode::En, None, None)), Marker::Absent);
        // Nonsense is rewritten, over its cas.
        assert_eq!(
            marker(&meta(MetaCode::Va, Some(b"x1"), Some(b"9"))),
            Marker::Found {
                value: None,
                cas: Bytes::from_static(b"9")
            }
        );
        assert_eq!(
            marker(&meta(MetaCode::Va, Some(b"1"), None)),
            Marker::Unknown
        );
        assert_eq!(marker(&meta(MetaCode::Hd, None, None)), Marker::Unknown);
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

    #[test]
    fn observe_moves_forward_only() {
        let ns = KeyNamespace::new("acme");
        let found = |v: u64| Marker::Found {
            value: Some(v),
            cas: Bytes::from_static(b"1"),
        };
        let reads = vec![
            Some(vec![found(5)]),
            None,
            Some(vec![found(9)]),
            Some(vec![Marker::Unknown]),
        ];
        assert_eq!(observe(std::slice::from_ref(&ns), &reads), 1);
        assert_eq!(ns.generation(), 9);
        assert_eq!(
            observe(std::slice::from_ref(&ns), &[Some(vec![found(3)])]),
            0
        );
        assert_eq!(ns.generation(), 9);
    }
}
