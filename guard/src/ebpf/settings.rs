//! The XDP maps' values a configuration stands for: the protected
//! listeners, the host-wide settings and the tenants' SYN budgets. Built
//! here, next to the maps, so that `config` knows nothing of their layout.

use std::collections::BTreeMap;

use guard_common::{
    CONFIG_ALLOW_UDP, CONFIG_SYN_COOKIES, DEFAULT_TENANT, GuardConfig, ListenerKey, ListenerValue,
    RateLimit,
};

use crate::config::{Config, SynCookies, tenant_id};

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
        flags: if x.allow_udp { CONFIG_ALLOW_UDP } else { 0 }
            | if x.syn_cookies == SynCookies::Off {
                0
            } else {
                CONFIG_SYN_COOKIES
            },
    }
}

/// The shared budget of sources with no tenant: with SYN cookies `on` it
/// admits nothing, so that every such SYN is answered with a cookie.
fn shared_limit(config: &Config) -> RateLimit {
    let x = &config.xdp;
    match x.syn_cookies {
        SynCookies::On => RateLimit::NOTHING,
        SynCookies::Auto | SynCookies::Off => {
            RateLimit::per_second(x.tenant_syn_rate, x.tenant_syn_burst)
        }
    }
}

/// The SYN cookie mode the maps say is in force: the config flag, and
/// whether the shared budget admits nothing.
pub fn syn_cookies(config: &GuardConfig, shared: Option<RateLimit>) -> SynCookies {
    if config.flags & CONFIG_SYN_COOKIES == 0 {
        SynCookies::Off
    } else if shared == Some(RateLimit::NOTHING) {
        SynCookies::On
    } else {
        SynCookies::Auto
    }
}

/// SYN budgets by tenant id, the default tenant's included.
pub fn tenant_limits(config: &Config) -> Vec<(u32, RateLimit)> {
    let x = &config.xdp;
    let mut out = vec![(DEFAULT_TENANT, shared_limit(config))];
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
        assert_eq!(g.flags, CONFIG_ALLOW_UDP | CONFIG_SYN_COOKIES);
        // `on`: the shared budget admits nothing, tenants keep theirs.
        assert_eq!(limits[0].1, RateLimit::NOTHING);
        assert_eq!(syn_cookies(&g, Some(limits[0].1)), SynCookies::On);
    }

    #[test]
    fn syn_cookie_modes_become_a_flag_and_a_shared_budget() {
        let mut c = Config::default();
        c.xdp.tenant_syn_rate = 300;
        c.xdp.tenant_syn_burst = 30;
        for (mode, flag, shared) in [
            (
                SynCookies::Auto,
                CONFIG_SYN_COOKIES,
                RateLimit::per_second(300, 30),
            ),
            (SynCookies::On, CONFIG_SYN_COOKIES, RateLimit::NOTHING),
            (SynCookies::Off, 0, RateLimit::per_second(300, 30)),
        ] {
            c.xdp.syn_cookies = mode;
            let g = guard_config(&c);
            assert_eq!(g.flags & CONFIG_SYN_COOKIES, flag, "{mode}");
            let limits = tenant_limits(&c);
            assert_eq!(limits[0], (DEFAULT_TENANT, shared), "{mode}");
            assert_eq!(syn_cookies(&g, Some(shared)), mode);
        }
    }
}
