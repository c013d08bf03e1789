//! Accepting clients: listeners with a configured backlog, a global
//! connection cap taken before `accept`, a per-source cap, and backoff on
//! accept errors.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use log::{error, warn};
use tokio::{
    net::{TcpListener, TcpSocket},
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

/// Accepts until the proxy leaves [`Phase::Running`]; the listener is
/// closed on return.
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
        // The permit comes first: at the cap, connections wait in the
        // kernel's backlog instead of costing us a descriptor each.
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
        let Some(slot) = sources.admit(peer.ip()) else {
            ProxyStats::add(&sh.stats.rejected_connections, 1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        ProxyStats::add(&sh.stats.total_connections, 1);
        ProxyStats::add(&sh.stats.curr_connections, 1);
        let sh = sh.clone();
        let phase = phase.clone();
        tokio::spawn(async move {
            session::serve(stream, sh.clone(), phase).await;
            sh.stats
                .curr_connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            drop(slot);
            drop(permit);
        });
    }
}
