//! Accepting clients: listeners with a configured backlog, a global
//! connection cap taken before `accept`, a per-source cap, batched
//! accepts, and backoff on accept errors.

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use log::{error, warn};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
};

use super::{Phase, Shared, session, stats::ProxyStats};

/// A listener on `addr` whose accept queue holds `backlog` connections
/// (the kernel caps it at `net.core.somaxconn`). Like tokio's own `bind`
/// it sets `SO_REUSEADDR`, so a restart rebinds at once; an IPv6 address
/// gets a dual-stack socket as the system default gives it. Needs a tokio
/// runtime.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Where the kernel's cap on every listen backlog is set.
pub const SOMAXCONN: &str = "/proc/sys/net/core/somaxconn";

/// The kernel's cap on listen backlogs in this network namespace, if it
/// can be read.
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string(SOMAXCONN).ok()?.trim().parse().ok()
}

/// Open connections per source address, with a cap.
#[derive(Debug, Default)]
pub struct SourceLimits {
    cap: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl SourceLimits {
    /// `cap` connections per source; 0 is unlimited.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            open: Mutex::default(),
        }
    }

    /// Counts a connection from `ip`, or `None` when `ip` is at its cap.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        if self.cap == 0 {
            return Some(SourceSlot { limits: None, ip });
        }
        let mut open = self.open.lock().expect("source lock");
        let n = open.entry(ip).or_default();
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            limits: Some(self.clone()),
            ip,
        })
    }
}

/// One admitted connection; releases its count on drop.
pub struct SourceSlot {
    limits: Option<Arc<SourceLimits>>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Some(l) = &self.limits {
            let mut open = l.open.lock().expect("source lock");
            if let Some(n) = open.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&self.ip);
                }
            }
        }
    }
}

const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Connections accepted per wake-up of the accept task: enough to empty a
/// burst's queue in few trips through the scheduler, few enough that the
/// sessions just accepted get their first turn before the next batch.
pub const ACCEPT_BATCH: usize = 64;

/// Runs [`accept_loop`] for every listener, all within the calling task,
/// until each has returned.
pub async fn accept_all(
    listeners: Vec<TcpListener>,
    sh: Arc<Shared>,
    permits: Arc<Semaphore>,
    sources: Arc<SourceLimits>,
    phase: watch::Receiver<Phase>,
) {
    let mut loops: Vec<Pin<Box<dyn Future<Output = ()> + Send>>> = listeners
        .into_iter()
        .map(|l| {
            Box::pin(accept_loop(
                l,
                sh.clone(),
                permits.clone(),
                sources.clone(),
                phase.clone(),
            )) as Pin<Box<dyn Future<Output = ()> + Send>>
        })
        .collect();
    // One or two listeners: polling each on every wake-up costs nothing.
    std::future::poll_fn(|cx| {
        loops.retain_mut(|l| l.as_mut().poll(cx).is_pending());
        if loops.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// Accepts until the proxy leaves [`Phase::Running`]; the listener is
/// closed on return.
///
/// Each wake-up accepts one connection, then up to [`ACCEPT_BATCH`] - 1
/// more that are already queued, without waiting. Every accept, in a
/// batch or not, first takes a permit: at the cap, connections wait in
/// the kernel's backlog instead of costing us a descriptor each. The
/// batch also stops where tokio's cooperative budget runs out (each
/// accept spends some), so the loop yields after a bounded amount of
/// work; when it is polled again depends on where it runs (see
/// [`super::Proxy::run_with`]).
pub async fn accept_loop(
    listener: TcpListener,
    sh: Arc<Shared>,
    permits: Arc<Semaphore>,
    sources: Arc<SourceLimits>,
    mut phase: watch::Receiver<Phase>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        if *phase.borrow() != Phase::Running {
            return;
        }
        let permit: OwnedSemaphorePermit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = phase.changed() => continue,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = phase.changed() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // EMFILE and friends: retrying at once would spin.
                if backoff >= MAX_ACCEPT_BACKOFF {
                    error!("accept failed: {e}; retrying every {backoff:?}");
                } else {
                    warn!("accept failed: {e}; retrying in {backoff:?}");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = phase.changed() => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };
        // The queue is FIFO: the first of a batch waited longest.
        record_queue_wait(&sh.stats, &stream);
        start(stream, peer, permit, &sh, &sources, &phase);
        // Polls for connections already queued, never waiting: a pending
        // poll leaves this waker with the listener, and the awaited accept
        // above registers its own.
        let mut drain = Context::from_waker(Waker::noop());
        let mut accepted = 1;
        while accepted < ACCEPT_BATCH {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            match listener.poll_accept(&mut drain) {
                Poll::Ready(Ok((stream, peer))) => {
                    start(stream, peer, permit, &sh, &sources, &phase);
                    accepted += 1;
                }
                // An error (EMFILE…) comes back from the awaited accept,
                // which backs off.
                Poll::Ready(Err(_)) | Poll::Pending => break,
            }
        }
        ProxyStats::add(&sh.stats.accept_batches, 1);
    }
}

/// Starts the session of an accepted client, unless its source is at its
/// cap.
fn start(
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    sh: &Arc<Shared>,
    sources: &Arc<SourceLimits>,
    phase: &watch::Receiver<Phase>,
) {
    let Some(slot) = sources.admit(peer.ip()) else {
        ProxyStats::add(&sh.stats.rejected_connections, 1);
        if let Some(e) = &sh.escalation {
            e.record(peer.ip(), crate::escalation::Signal::Refused);
        }
        return;
    };
    let _ = stream.set_nodelay(true);
    ProxyStats::add(&sh.stats.total_connections, 1);
    ProxyStats::add(&sh.stats.curr_connections, 1);
    let sh = sh.clone();
    let phase = phase.clone();
    tokio::spawn(async move {
        session::serve(stream, peer, sh.clone(), phase).await;
        sh.stats
            .curr_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        drop(slot);
        drop(permit);
    });
}

/// Records how long `stream` waited in the accept queue, as the kernel
/// knows it: the time since the client's last segment (`TCP_INFO`, in
/// milliseconds at the kernel's tick, 4 ms at HZ 250). A client's
/// handshake ACK and its first request arrive back to back, so for a
/// connection just accepted that is its time in the queue.
fn record_queue_wait(stats: &ProxyStats, stream: &TcpStream) {
    // SAFETY: all-zero is a valid tcp_info.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: info and len describe a writable buffer of len bytes; the
    // descriptor is the stream's, open for the whole call.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return;
    }
    let ms = u64::from(info.tcpi_last_ack_recv);
    ProxyStats::add(&stats.accept_wait_samples, 1);
    ProxyStats::add(&stats.accept_wait_ms_total, ms);
    stats
        .accept_wait_ms_max
        .fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
}
