//! The XDP maps' values a configuration stands for: the protected
//! listeners, the host-wide settings and the tenants' SYN budgets. Built
//! here, next to the maps, so that `config` knows nothing of their layout.

use std::collections::BTreeMap;

use guard_common::{
    CONFIG_ALLOW_UDP, DEFAULT_TENANT, GuardConfig, ListenerKey, ListenerValue, RateLimit,
};

use crate::config::{Config, tenant_id};

/// Every protected listener with its owning tenant: `protect` entries
/// belong to no tenant, tenants' own listeners are protected too.
pub fn protected(config: &Config) -> Vec<(ListenerKey, ListenerValue)> {
    let mut out: BTreeMap<ListenerKeyOrd, ListenerValue> = BTreeMap::new();
    for l in &config.xdp.protect {
        for key in l.keys() {
            out.insert(ListenerKeyOrd(key), ListenerValue::default());
        }
    }
    for t in &config.tenants {
        for l in &t.listen {
            for key in l.keys() {
                out.insert(
                    ListenerKeyOrd(key),
                    ListenerValue {
                        tenant: tenant_id(&t.name),
                        flags: 0,
                    },
                );
            }
        }
    }
    out.into_iter().map(|(k, v)| (k.0, v)).collect()
}

/// The host-wide entry of the XDP config map.
pub fn guard_config(config: &Config) -> GuardConfig {
    let x = &config.xdp;
    GuardConfig {
        source: RateLimit::per_second(x.syn_rate, x.syn_burst),
        global: RateLimit::per_second(x.global_syn_rate, x.global_syn_burst),
        events: RateLimit::per_second(x.event_rate, x.event_burst),
        ipv6_prefix_len: u32::from(x.ipv6_prefix),
        flags: if x.allow_udp { CONFIG_ALLOW_UDP } else { 0 },
    }
}

/// SYN budgets by tenant id, the default tenant's included.
pub fn tenant_limits(config: &Config) -> Vec<(u32, RateLimit)> {
    let x = &config.xdp;
    let mut out = vec![(
        DEFAULT_TENANT,
        RateLimit::per_second(x.tenant_syn_rate, x.tenant_syn_burst),
    )];
    for t in &config.tenants {
        out.push((
            tenant_id(&t.name),
            RateLimit::per_second(
                t.syn_rate.unwrap_or(x.tenant_syn_rate),
                t.syn_burst.unwrap_or(x.tenant_syn_burst),
            ),
        ));
    }
    out
}

/// Orders listener keys so the protected set is deterministic.
#[derive(PartialEq, Eq)]
struct ListenerKeyOrd(ListenerKey);

impl PartialOrd for ListenerKeyOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ListenerKeyOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0.family, self.0.addr, self.0.port).cmp(&(other.0.family, other.0.addr, other.0.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_becomes_map_values() {
        let c = Config::parse(crate::config::EXAMPLE).unwrap();
        c.validate().unwrap();
        // 2 explicit + 2 for the wildcard + 1 tenant listener.
        let protected = protected(&c);
        assert_eq!(protected.len(), 5);
        let acme = protected
            .iter()
            .find(|(k, _)| k.port == 11212)
            .expect("tenant listener protected");
        assert_eq!(acme.1.tenant, tenant_id("acme"));
        assert!(
            protected
                .iter()
                .filter(|(k, _)| k.port != 11212)
                .all(|(_, v)| v.tenant == DEFAULT_TENANT)
        );
        let limits = tenant_limits(&c);
        assert_eq!(limits[0].0, DEFAULT_TENANT);
        assert_eq!(limits[1].1, RateLimit::per_second(500, 600));
        assert_eq!(limits[2].1, RateLimit::per_second(2_000, 4_000));
        let g = guard_config(&c);
        assert_eq!(g.source, RateLimit::per_second(10, 20));
        assert_eq!(g.events, RateLimit::per_second(200, 400));
        assert_eq!(g.ipv6_prefix_len, 56);
        assert_eq!(g.flags, CONFIG_ALLOW_UDP);
    }
}
