//! One client connection: read, parse, dispatch, reply in order.
//!
//! The protocol is chosen from the first byte (0x80: binary, else text and
//! meta) and kept for the connection's life, as memcached does. Requests
//! are dispatched as soon as they are parsed, so a pipeline's requests run
//! on their backends concurrently; replies are written strictly in request
//! order. The client's side is read all along, even while replies are
//! pending, so an EOF or reset ends the session and frees its socket at
//! once; replies still in flight are dropped by the backend connections.
//!
//! With tenants configured a session starts unauthenticated
//! ([`super::auth`]): until the client authenticates it is served one
//! request at a time and only authentication gets anywhere. After that its
//! requests run as its identity: its tenant's namespace and key limit, and
//! read-only if its credential is. After a reload the session serves on as
//! its credential is now configured, and is closed if it no longer is.

use std::{collections::VecDeque, sync::Arc};

use bytes::{Buf as _, BytesMut};
use log::info;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, tcp::OwnedReadHalf},
    sync::watch,
    time::{Instant, sleep_until},
};

use super::{
    Phase, Shared,
    command::{self, Client, Reply, Slot},
    stats::ProxyStats,
};
use crate::protocol::{self, Protocol, ProtocolError, Request};

pub(super) fn parse(
    protocol: Protocol,
    buf: &mut BytesMut,
    limits: &protocol::Limits,
) -> Result<Option<Request>, ProtocolError> {
    match protocol {
        Protocol::Binary => Ok(protocol::binary::parse_request(buf, limits)?.map(Request::Binary)),
        Protocol::Text | Protocol::Meta => protocol::text::parse_request(buf, limits),
    }
}

/// Serves one client until it leaves, misbehaves beyond repair, idles out,
/// or the proxy stops.
pub async fn serve(stream: TcpStream, sh: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let peer = stream.peer_addr().ok().map(|a| a.ip().to_canonical());
    let (mut rd, mut wr) = stream.into_split();
    // Allocated when the first bytes arrive: thousands of idle clients
    // cost little more than their sockets.
    let mut rbuf = BytesMut::new();
    let mut protocol = None;
    if *phase.borrow() != Phase::Running {
        return;
    }
    // Subscribed before the registry is loaded: a reload in between only
    // costs a refresh.
    let mut reloads = sh.tenants.subscribe();
    // The registry version this session's identity reflects.
    let mut seen = *reloads.borrow();
    let registry = sh.tenants.load();
    let authenticated = registry.requires_auth();
    let (identity, _permit) = match registry.open_identity() {
        Some(open) => match sh.connections.try_acquire(&open.tenant) {
            Some(permit) => (open, permit),
            None => return,
        },
        None => {
            let login = super::auth::authenticate(
                &mut rd,
                &mut wr,
                &mut rbuf,
                &mut protocol,
                &sh,
                registry,
                &mut phase,
                peer,
            );
            match login.await {
                Some(done) => done,
                None => return,
            }
        }
    };
    let mut limits = sh.limits.clone();
    limits.max_key_len = identity.tenant.namespace.max_client_key_len();
    let mut client = Client {
        identity,
        affinity: sh.router.affinity(),
        authenticated,
    };

    let mut out = BytesMut::new();
    let mut queue: VecDeque<Slot> = VecDeque::new();
    // Bytes of a refused frame (e.g. an oversized value) still to arrive.
    let mut skip = 0usize;
    // No new requests: the client quit, the stream is lost, or we drain.
    let mut closing = *phase.borrow() != Phase::Running;
    let mut close_after_flush = false;
    // Draining began: parse what is buffered once more, then stop.
    let mut drain_pending = false;
    let mut last_read = Instant::now();
    // When the request at the head of the buffer started to arrive.
    let mut partial_since: Option<Instant> = None;
    let depth = sh.max_pipeline_depth;
    // Long-lived, so a request costs no timer registration nor watch
    // subscription: both are re-armed only when they fire.
    let idle = sh.idle_timeout.map(|t| t.min(NEVER));
    let idle_timer = sleep_until(last_read + idle.unwrap_or(NEVER));
    tokio::pin!(idle_timer);
    let mut control = Box::pin(next_control(phase.clone(), reloads.clone()));
    // A dispatched barrier (see `command::is_barrier`) is unanswered: it
    // is the queue's last entry, and nothing more is dispatched until it
    // is answered.
    let mut barrier = false;

    loop {
        // Set when parsing stops for want of bytes, not for want of room.
        let mut incomplete = false;
        if !closing {
            while queue.len() < depth && !closing && !barrier {
                if skip > 0 {
                    let n = skip.min(rbuf.len());
                    rbuf.advance(n);
                    skip -= n;
                    if skip > 0 {
                        incomplete = true;
                        break;
                    }
                }
                let Some(&first) = rbuf.first() else { break };
                // A reload not yet seen by the select below: no request
                // runs under a revoked credential. One atomic load when
                // nothing was reloaded.
                if reloads.has_changed().unwrap_or(false) {
                    reloads.mark_unchanged();
                    if !refresh(&sh, &mut client, &mut limits, &mut seen, peer) {
                        return;
                    }
                }
                let p = *protocol.get_or_insert_with(|| Protocol::detect(first));
                match parse(p, &mut rbuf, &limits) {
                    Ok(None) => {
                        incomplete = true;
                        break;
                    }
                    Ok(Some(req)) => {
                        partial_since = None;
                        let is_barrier = command::is_barrier(&req);
                        let slot = command::dispatch(req, &sh, &client);
                        barrier = is_barrier && matches!(slot, Slot::Waiting(_));
                        if let Slot::Ready(Reply { close: true, .. }) = slot {
                            closing = true;
                        }
                        queue.push_back(slot);
                    }
                    Err(e) => {
                        ProxyStats::add(&sh.stats.protocol_errors, 1);
                        let mut reply = Reply {
                            out: BytesMut::new(),
                            close: e.close,
                        };
                        e.write_reply(&mut reply.out);
                        skip = e.discard_from(&mut rbuf);
                        closing |= e.close;
                        queue.push_back(Slot::Ready(reply));
                    }
                }
            }
        }

        // Draining: once everything that arrived before the drain has been
        // dispatched (not merely held back by a flush or the depth cap).
        if drain_pending && !barrier && queue.len() < depth {
            closing = true;
            drain_pending = false;
        }

        while let Some(Slot::Ready(_)) = queue.front() {
            let Some(Slot::Ready(reply)) = queue.pop_front() else {
                unreachable!()
            };
            out.unsplit(reply.out);
            if reply.close {
                close_after_flush = true;
                queue.clear();
                break;
            }
        }
        if !out.is_empty() {
            if wr.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close_after_flush || (closing && queue.is_empty()) {
            return;
        }

        let waiting = matches!(queue.front(), Some(Slot::Waiting(_)));
        // Keep reading while replies are pending, to notice the client
        // leaving; the cap bounds what one client can make us buffer.
        // While a drain waits to dispatch what was buffered, nothing new is
        // read: it would not be served.
        let can_read = !close_after_flush && !drain_pending && rbuf.len() < sh.read_cap;
        if !incomplete {
            partial_since = None;
        } else if partial_since.is_none() {
            partial_since = Some(Instant::now());
        }
        if rbuf.is_empty() && queue.is_empty() && rbuf.capacity() > 0 {
            // Between requests a client holds no buffer: idle connections
            // are what a reconnect storm leaves behind by the thousand.
            rbuf = BytesMut::new();
        }
        let request_deadline = sh
            .request_read_timeout
            .zip(partial_since)
            .map(|(t, since)| since + t);
        tokio::select! {
            r = read_some(&mut rd, &mut rbuf), if can_read => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    last_read = Instant::now();
                    if closing {
                        // Draining: what arrives now is not served.
                        rbuf.clear();
                    }
                }
            },
            reply = async {
                match queue.front_mut() {
                    Some(Slot::Waiting(f)) => f.await,
                    _ => std::future::pending().await,
                }
            }, if waiting => {
                queue[0] = Slot::Ready(reply);
                barrier &= queue.iter().any(|s| matches!(s, Slot::Waiting(_)));
            },
            () = &mut idle_timer, if idle.is_some() => {
                // Fires once per idle period, not re-armed per request:
                // idle only once nothing is pending and nothing arrived.
                let (t, now) = (idle.unwrap_or(NEVER), Instant::now());
                let due = last_read + t;
                if queue.is_empty() && now >= due {
                    return;
                }
                // Replies pending: look again shortly after they are out.
                idle_timer.as_mut().reset(if now >= due { now + t.min(IDLE_RECHECK) } else { due });
            },
            () = async {
                match request_deadline {
                    Some(d) => sleep_until(d).await,
                    None => std::future::pending().await,
                }
            }, if request_deadline.is_some() => {
                ProxyStats::add(&sh.stats.request_read_timeouts, 1);
                return;
            }
            (event, p, r) = &mut control => {
                control = Box::pin(next_control(p, r));
                match event {
                    Control::Phase(Phase::Running) => {}
                    Control::Phase(Phase::Draining) => {
                        // What the client sent before the drain began is in
                        // flight from its side: serve what already arrived.
                        drain_socket(&rd, &mut rbuf, sh.read_cap);
                        drain_pending = true;
                    }
                    Control::Phase(Phase::Stopped) | Control::Gone => return,
                    // Idle sessions of a revoked credential are closed too.
                    Control::Reload => {
                        if !refresh(&sh, &mut client, &mut limits, &mut seen, peer) {
                            return;
                        }
                    }
                }
            },
        }
    }
}

/// How soon an idle timer that fired with replies pending looks again.
const IDLE_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Far enough to never fire: the idle timer without an idle timeout.
const NEVER: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

/// What a session hears from the proxy between requests.
enum Control {
    Phase(Phase),
    Reload,
    /// The proxy is gone.
    Gone,
}

/// The next phase change or reload; gives the receivers back for the next
/// wait.
async fn next_control(
    mut phase: watch::Receiver<Phase>,
    mut reloads: watch::Receiver<u64>,
) -> (Control, watch::Receiver<Phase>, watch::Receiver<u64>) {
    let event = tokio::select! {
        r = phase.changed() => match r {
            Ok(()) => Control::Phase(*phase.borrow_and_update()),
            Err(_) => Control::Gone,
        },
        r = reloads.changed() => match r {
            Ok(()) => Control::Reload,
            Err(_) => Control::Gone,
        },
    };
    (event, phase, reloads)
}

/// After a reload not yet `seen`: serves on as the session's credential
/// now stands (rights, namespace), or returns `false` if it was revoked.
/// The parse loop and the control wait both notice a reload; `seen` makes
/// the second a no-op.
fn refresh(
    sh: &Shared,
    client: &mut Client,
    limits: &mut protocol::Limits,
    seen: &mut u64,
    peer: Option<std::net::IpAddr>,
) -> bool {
    let version = sh.tenants.version();
    if version == *seen {
        return true;
    }
    *seen = version;
    match sh.tenants.load().refresh(&client.identity) {
        Some(identity) => {
            limits.max_key_len = identity.tenant.namespace.max_client_key_len();
            client.identity = identity;
            true
        }
        None => {
            info!(
                "closing {} ({}): its credential is no longer configured",
                peer.map_or_else(|| "a client".into(), |p| p.to_string()),
                client.identity.username.as_deref().unwrap_or("open tenant")
            );
            false
        }
    }
}

/// Reads what the client sent, growing the buffer only once there is
/// something to read.
///
/// The read itself goes through `AsyncRead`, not `try_read_buf`: a read
/// that leaves room in the buffer has drained the socket, and tokio then
/// forgets the readiness instead of finding out with a second `recv` that
/// fails with `EAGAIN` (one wasted syscall per request otherwise).
async fn read_some(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> std::io::Result<usize> {
    rd.readable().await?;
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    rd.read_buf(buf).await
}

/// How much the read buffer grows by.
const READ_CHUNK: usize = 4 * 1024;

/// Takes whatever the socket already holds, without waiting.
fn drain_socket(rd: &OwnedReadHalf, buf: &mut BytesMut, cap: usize) {
    while buf.len() < cap {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match rd.try_read_buf(buf) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}
