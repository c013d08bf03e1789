//! Per-tenant connection caps.
//!
//! One [`TenantConnections`] lives as long as the daemon (not per
//! registry), so connections opened under an old configuration still count
//! after a reload; the cap applied is the one of the [`Tenant`] passed in,
//! i.e. the newest configuration the session has seen.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use super::Tenant;

/// Connections held, by tenant id.
#[derive(Debug, Default)]
pub struct TenantConnections {
    counts: Mutex<HashMap<u32, Arc<AtomicU64>>>,
}

/// One connection counted against its tenant; released on drop.
#[derive(Debug)]
#[must_use = "the connection is released when the permit is dropped"]
pub struct ConnectionPermit {
    count: Arc<AtomicU64>,
    tenant: u32,
}

impl ConnectionPermit {
    /// The tenant id the connection is counted against.
    pub fn tenant_id(&self) -> u32 {
        self.tenant
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TenantConnections {
    /// An empty set of counters.
    pub fn new() -> Self {
        Self::default()
    }

    fn counter(&self, id: u32) -> Arc<AtomicU64> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.entry(id).or_default().clone()
    }

    /// Counts one more connection for `tenant`, unless it already holds
    /// `limits.max_connections` (0 = unlimited): then `None`, and the
    /// session should refuse at once (`SERVER_ERROR too many connections`)
    /// and close.
    pub fn try_acquire(&self, tenant: &Tenant) -> Option<ConnectionPermit> {
        let count = self.counter(tenant.id);
        let max = tenant.limits.max_connections;
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .ok()?;
        Some(ConnectionPermit {
            count,
            tenant: tenant.id,
        })
    }

    /// Connections `tenant` holds now.
    pub fn count(&self, tenant: &Tenant) -> u64 {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .get(&tenant.id)
            .map_or(0, |c| c.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::{KeyNamespace, TenantLimits};

    fn tenant(name: &str, max_connections: u64) -> Tenant {
        Tenant {
            name: name.into(),
            id: crate::config::tenant_id(name),
            namespace: KeyNamespace::new(name),
            limits: TenantLimits {
                max_connections,
                ..Default::default()
            },
        }
    }

    #[test]
    fn caps_per_tenant_and_releases_on_drop() {
        let conns = TenantConnections::new();
        let a = tenant("a", 2);
        let b = tenant("b", 1);
        let p1 = conns.try_acquire(&a).unwrap();
        let p2 = conns.try_acquire(&a).unwrap();
        assert!(conns.try_acquire(&a).is_none());
        assert_eq!(conns.count(&a), 2);
        // Another tenant's cap is its own.
        let q = conns.try_acquire(&b).unwrap();
        assert!(conns.try_acquire(&b).is_none());
        drop(p1);
        assert_eq!(conns.count(&a), 1);
        let p3 = conns.try_acquire(&a).unwrap();
        assert_eq!(p3.tenant_id(), a.id);
        drop((p2, p3, q));
        assert_eq!(conns.count(&a), 0);
        assert_eq!(conns.count(&b), 0);
    }

    #[test]
    fn zero_is_unlimited_and_reload_keeps_counts() {
        let conns = TenantConnections::new();
        let open = tenant("a", 0);
        let permits: Vec<_> = (0..1000)
            .map(|_| conns.try_acquire(&open).unwrap())
            .collect();
        assert_eq!(conns.count(&open), 1000);
        // A reload lowers the cap: held connections count against it.
        let lowered = tenant("a", 10);
        assert!(conns.try_acquire(&lowered).is_none());
        drop(permits);
        assert!(conns.try_acquire(&lowered).is_some());
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_cap() {
        let conns = Arc::new(TenantConnections::new());
        let t = Arc::new(tenant("a", 50));
        let held: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (conns, t) = (conns.clone(), t.clone());
                    s.spawn(move || {
                        (0..100)
                            .filter_map(|_| conns.try_acquire(&t))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(held.len(), 50);
        assert_eq!(conns.count(&t), 50);
    }
}
