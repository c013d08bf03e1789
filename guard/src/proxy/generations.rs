//! Flush generations kept on the backends, so a tenant's `flush_all`
//! survives a restart of guard and reaches every proxy in front of the same
//! backends.
//!
//! Every backend holds each namespace's generation, as decimal text under
//! `<namespace>:gen`; memcached matches keys whole, and every client key is
//! longer (`<namespace>:<7 digits>:<key>`), so none maps there.
//!
//! - A `flush_all` reads the namespace's markers from every backend, picks
//!   a generation past the newest, writes it to every backend, and only
//!   then moves to it and answers `OK` (a write that lost a race with
//!   another proxy's flush sends it round again): once a client has its
//!   `OK`, no restart of any proxy brings the flushed keys back.
//! - Every [`SYNC_INTERVAL`], and at once after a reload, a pass reads all
//!   markers, moves each local generation forward to the newest found
//!   (generations never move back), and writes the local generation where a
//!   backend holds an older one or none: that publishes delayed flushes once
//!   they fire and restores the markers of a backend that restarted empty.
//!   A flush on one proxy reaches the others within about one interval.
//! - Before the proxy accepts its first client it retries a pass until
//!   every backend answers (for at most [`INITIAL_SYNC_LIMIT`]).
//!
//! A raw namespace (`keys = "raw"`) has no generation, so it has no marker:
//! nothing is read or written for it, and a proxy with only that namespace
//! asks the backends nothing at all.
//!
//! Writes are compare-and-swap (`ms … C<cas>`, or add mode where there was
//! no marker), so a proxy holding an older generation can never overwrite a
//! newer one that landed since it read. Markers are read every interval and
//! stay hot in memcached's LRU.

use std::{sync::Arc, time::Duration};

use bytes::{BufMut as _, Bytes, BytesMut};
use log::{info, warn};
use tokio::{sync::watch, time::Instant};

use super::{Phase, Shared, router::Backend};
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
    /// Namespaces with markers: none means nothing was asked.
    pub namespaces: usize,
    pub moved: usize,
    pub answered: usize,
}

impl Pass {
    /// Whether the start-up sync is done: every one of `pools` backends
    /// answered, or there was nothing to ask them.
    fn complete(&self, pools: usize) -> bool {
        self.namespaces == 0 || self.answered == pools
    }

    /// Whether the next pass should come soon: markers to read and
    /// backends to read them from, but none answered.
    fn retry_soon(&self, pools: usize) -> bool {
        self.namespaces > 0 && pools > 0 && self.answered == 0
    }
}

/// Passes until the proxy stops: every interval, after every reload, and
/// quickly again while no backend answers.
pub async fn run(sh: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let mut reloads = sh.tenants.subscribe();
    let mut ring = sh.router.subscribe();
    let mut wait = SYNC_INTERVAL;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            // A backend rejoined (flushed, or with older markers): give it
            // the generations now.
            r = ring.changed() => if r.is_err() {
                return;
            },
            r = reloads.changed() => if r.is_err() {
                return;
            },
            r = phase.changed() => if r.is_err() || *phase.borrow() == Phase::Stopped {
                return;
            },
        }
        let pass = sync(&sh).await;
        wait = if pass.retry_soon(sh.router.live_backends().len()) {
            RETRY_INTERVAL
        } else {
            SYNC_INTERVAL
        };
    }
}

/// The pass before the first client: retried until every backend answers
/// or `limit` (at most [`INITIAL_SYNC_LIMIT`]) has passed.
pub async fn initial_sync(sh: &Shared, limit: Duration) {
    let limit = limit.min(INITIAL_SYNC_LIMIT);
    let deadline = Instant::now() + limit;
    loop {
        let pass = sync(sh).await;
        if pass.moved > 0 {
            info!(
                "restored {} flush generation(s) from the backends",
                pass.moved
            );
        }
        // Every backend: the one holding the newest marker may be the last
        // to connect, and one that restarted empty knows nothing.
        let pools = sh.router.live_backends().len();
        if pass.complete(pools) {
            return;
        }
        if Instant::now() >= deadline {
            warn!(
                "{} of {pools} backends answered within {limit:?}: serving with the flush \
                 generations known so far; the rest are synced as they answer",
                pass.answered
            );
            return;
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
}

/// One pass over every namespace of the registry in force that has a
/// generation (every one but a raw namespace), on the backends live now
/// (an ejected one gets its markers when it rejoins).
pub async fn sync(sh: &Shared) -> Pass {
    let namespaces: Vec<KeyNamespace> = sh
        .tenants
        .load()
        .served_tenants()
        .iter()
        .map(|t| t.namespace.clone())
        .filter(|ns| !ns.is_raw())
        .collect();
    let pools = sh.router.live_backends();
    let reads = read(&pools, &namespaces).await;
    let moved = observe(&namespaces, &reads);
    let targets: Vec<u64> = namespaces.iter().map(KeyNamespace::generation).collect();
    write(&pools, &namespaces, &targets, &reads).await;
    Pass {
        namespaces: namespaces.len(),
        moved,
        answered: reads.iter().flatten().count(),
    }
}

/// Rounds of read and compare-and-swap a flush makes while other proxies
/// keep writing the same marker.
const FLUSH_ROUNDS: usize = 5;

/// An immediate `flush_all` of `ns`: a generation past every one the
/// backends know, recorded on all that answer before this process moves
/// to it. A marker that changed between the read and the write (another
/// proxy flushing too) sends it round again, so two concurrent flushes
/// never land on the same generation.
pub async fn flush(sh: Arc<Shared>, ns: KeyNamespace) {
    if ns.is_raw() {
        return;
    }
    let namespaces = [ns];
    let mut target = 0;
    for _ in 0..FLUSH_ROUNDS {
        let pools = sh.router.live_backends();
        let reads = read(&pools, &namespaces).await;
        let newest = newest(&reads, 0).max(namespaces[0].generation());
        target = target.max(KeyNamespace::generation_after(newest));
        if write(&pools, &namespaces, &[target], &reads).await == 0 {
            break;
        }
    }
    namespaces[0].flush_to(target);
}

/// Each of `pools`' markers for `namespaces`; `None` for a backend that
/// did not answer.
async fn read(pools: &[Arc<Backend>], namespaces: &[KeyNamespace]) -> Vec<Option<Vec<Marker>>> {
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
    let calls: Vec<_> = pools
        .iter()
        .map(|b| b.pool.call_any(req.clone(), namespaces.len()))
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

/// The newest generation any backend holds for namespace `i`.
fn newest(reads: &[Option<Vec<Marker>>], i: usize) -> u64 {
    reads
        .iter()
        .flatten()
        .filter_map(|markers| match &markers[i] {
            Marker::Found { value, .. } => *value,
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Moves each namespace forward to the newest marker; returns how many
/// moved.
fn observe(namespaces: &[KeyNamespace], reads: &[Option<Vec<Marker>>]) -> usize {
    let mut moved = 0;
    for (i, ns) in namespaces.iter().enumerate() {
        let before = ns.generation();
        ns.observe_generation(newest(reads, i));
        if ns.generation() != before {
            moved += 1;
        }
    }
    moved
}

/// Writes each namespace's target generation where a backend read older,
/// nothing, or nonsense. Compare-and-swap: a marker that changed since it
/// was read is left as it is. Returns how many writes lost such a race.
async fn write(
    pools: &[Arc<Backend>],
    namespaces: &[KeyNamespace],
    targets: &[u64],
    reads: &[Option<Vec<Marker>>],
) -> usize {
    let mut calls = Vec::new();
    for (b, markers) in reads.iter().enumerate() {
        let Some(markers) = markers else { continue };
        let mut req = BytesMut::new();
        let mut count = 0;
        for ((ns, marker), &now) in namespaces.iter().zip(markers).zip(targets) {
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
            calls.push((b, pools[b].pool.call_any(req.freeze(), count)));
        }
    }
    let mut lost = 0;
    for (b, call) in calls {
        match call.wait().await {
            Ok(replies) => {
                for r in &replies {
                    match r {
                        Response::Meta(m) if m.code == MetaCode::Hd => {}
                        // Another proxy wrote first; what it wrote is read
                        // next time.
                        Response::Meta(m)
                            if matches!(m.code, MetaCode::Ns | MetaCode::Ex | MetaCode::Nf) =>
                        {
                            lost += 1;
                        }
                        _ => warn!("{} refused a flush generation marker: {r:?}", pools[b].addr),
                    }
                }
            }
            Err(e) => warn!("cannot record flush generations on {}: {e}", pools[b].addr),
        }
    }
    lost
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
    fn nothing_to_ask_is_a_finished_pass() {
        let pass = |namespaces, answered| Pass {
            namespaces,
            moved: 0,
            answered,
        };
        // A raw open tenant alone: no marker to wait for, nothing to retry,
        // whether or not the backends are up.
        assert!(pass(0, 0).complete(3));
        assert!(!pass(0, 0).retry_soon(3));
        // With markers, start-up waits for every backend and retries soon
        // while none answers.
        assert!(!pass(1, 2).complete(3));
        assert!(pass(1, 3).complete(3));
        assert!(pass(1, 0).retry_soon(3));
        assert!(!pass(1, 1).retry_soon(3));
        assert!(!pass(1, 0).retry_soon(0));
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
