//! Fitting the client connection cap to the process's descriptor limit.
//!
//! Every client costs a descriptor. If the cap allowed more clients than
//! the limit has descriptors, `accept` would fail with EMFILE, and the
//! listener would back off while the backlog filled. Instead the daemon
//! raises its soft limit to the hard one and, if that is still short,
//! lowers the cap: the semaphore taken before `accept` then holds excess
//! clients in the kernel's backlog, where they cost nothing.

use anyhow::Context as _;
use log::{info, warn};

use crate::config::ProxyConfig;

/// Descriptors kept for everything but clients: listeners, the runtime,
/// signals, logs, config reloads and the XDP maps, links and ring buffer.
const RESERVED: u64 = 128;

/// The most clients a descriptor limit of `limit` leaves room for, with
/// `backend_fds` descriptors for backend connections.
pub fn client_capacity(limit: u64, backend_fds: u64) -> u64 {
    limit.saturating_sub(RESERVED + backend_fds)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (no privilege needed)
/// and returns the soft limit now in force.
pub fn raise_soft_limit() -> anyhow::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot read the descriptor limit");
    }
    if r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: setrlimit reads a valid struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            info!(
                "raised the descriptor limit from {} to {}",
                r.rlim_cur, r.rlim_max
            );
            r.rlim_cur = r.rlim_max;
        } else {
            warn!(
                "cannot raise the descriptor limit from {}: {}",
                r.rlim_cur,
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(r.rlim_cur)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and lowers
/// `config.max_connections` to what the limit can hold, saying so.
pub fn fit(config: &mut ProxyConfig) -> anyhow::Result<()> {
    let limit = raise_soft_limit()?;
    // Each backend connection may briefly have a replacement connecting.
    let backend_fds = (config.backends.len() * config.backend_connections * 2) as u64;
    let room = client_capacity(limit, backend_fds);
    if (config.max_connections as u64) > room {
        anyhow::ensure!(
            room > 0,
            "the descriptor limit ({}) leaves no room for clients; raise it (LimitNOFILE=, ulimit -n)",
            limit
        );
        warn!(
            "capping max_connections at {room}: the descriptor limit ({}) cannot hold {} clients; \
             raise it (LimitNOFILE=, ulimit -n) to allow more",
            limit, config.max_connections
        );
        config.max_connections = room as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_leaves_the_reserve_and_backends() {
        assert_eq!(client_capacity(1024, 8), 1024 - RESERVED - 8);
        assert_eq!(client_capacity(100, 8), 0);
        assert_eq!(client_capacity(u64::MAX, 8), u64::MAX - RESERVED - 8);
    }
}
