//! Typed handles on the XDP program's pinned maps, shared by the daemon and
//! the CLI commands (`guard xdp status`, `guard deny …`) that work on a
//! running guard from outside.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, bail};
use aya::maps::{
    Array, HashMap, LpmTrie, Map, MapData, MapInfo, PerCpuArray, lpm_trie::Key as LpmKey,
};
use guard_common::{
    BucketState, CIDR_CAPACITY, COUNTER_COUNT, CidrRule, Counter, GuardConfig, LISTENERS_CAPACITY,
    ListenerKey, ListenerValue, RateLimit, SOURCE_BUCKETS_CAPACITY, SOURCE_TENANT_CAPACITY,
    SourceKey, TENANTS_CAPACITY, maps,
};

use crate::{cidr::Cidr, paths::Paths};

/// Which CIDR list.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CidrList {
    /// SYNs from these sources are dropped.
    Deny,
    /// SYNs from these sources pass uncharged.
    Allow,
}

impl CidrList {
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Self::Deny => (maps::DENY_V4, maps::DENY_V6),
            Self::Allow => (maps::ALLOW_V4, maps::ALLOW_V6),
        }
    }
}

/// One entry of a deny or allow list.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CidrEntry {
    /// The prefix.
    pub cidr: Cidr,
    /// Monotonic expiry in nanoseconds, 0 for never.
    #[serde(skip)]
    pub expires_ns: u64,
    /// Seconds left before it expires, `None` for never.
    pub expires_in_secs: Option<u64>,
}

/// The layout every pinned map must have: (name, key size, value size,
/// capacity). Checked before adopting pins, since aya reuses a pinned map
/// by name without comparing layouts.
pub fn expected_layout() -> [(&'static str, u32, u32, u32); 12] {
    use std::mem::size_of;
    let s = |n: usize| n as u32;
    [
        (maps::CONFIG, 4, s(size_of::<GuardConfig>()), 1),
        (
            maps::LISTENERS,
            s(size_of::<ListenerKey>()),
            s(size_of::<ListenerValue>()),
            LISTENERS_CAPACITY,
        ),
        (maps::DENY_V4, 8, s(size_of::<CidrRule>()), CIDR_CAPACITY),
        (maps::DENY_V6, 20, s(size_of::<CidrRule>()), CIDR_CAPACITY),
        (maps::ALLOW_V4, 8, s(size_of::<CidrRule>()), CIDR_CAPACITY),
        (maps::ALLOW_V6, 20, s(size_of::<CidrRule>()), CIDR_CAPACITY),
        (
            maps::SOURCE_BUCKETS,
            s(size_of::<SourceKey>()),
            s(size_of::<BucketState>()),
            SOURCE_BUCKETS_CAPACITY,
        ),
        (
            maps::SOURCE_TENANT,
            s(size_of::<SourceKey>()),
            4,
            SOURCE_TENANT_CAPACITY,
        ),
        (
            maps::TENANT_LIMITS,
            4,
            s(size_of::<RateLimit>()),
            TENANTS_CAPACITY,
        ),
        (
            maps::TENANT_BUCKETS,
            4,
            s(size_of::<BucketState>()),
            TENANTS_CAPACITY,
        ),
        (maps::GLOBAL_BUCKET, 4, s(size_of::<BucketState>()), 1),
        (maps::COUNTERS, 4, 8, COUNTER_COUNT),
    ]
}

/// Fails if any existing pin has a layout this build would misread.
pub fn check_pinned_layout(paths: &Paths) -> anyhow::Result<()> {
    for (name, key, value, capacity) in expected_layout() {
        let path = paths.map_pin(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("cannot inspect pinned map {}", path.display()))?;
        if (info.key_size(), info.value_size(), info.max_entries()) != (key, value, capacity) {
            bail!(
                "pinned map {} has another layout (key {} value {} entries {}, expected {key}/{value}/{capacity}): \
                 run `guard xdp detach` to remove the old pins",
                path.display(),
                info.key_size(),
                info.value_size(),
                info.max_entries()
            );
        }
    }
    Ok(())
}

fn open(paths: &Paths, name: &str) -> anyhow::Result<Map> {
    let path = paths.map_pin(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "cannot open pinned map {}: is guard attached? (`guard run --iface …`)",
            path.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("bad pinned map {}", path.display()))
}

/// Current `CLOCK_MONOTONIC` time in nanoseconds: the clock the XDP program
/// reads with `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The pinned maps, opened for reading and writing.
pub struct GuardMaps {
    config: Array<MapData, GuardConfig>,
    listeners: HashMap<MapData, ListenerKey, ListenerValue>,
    deny_v4: LpmTrie<MapData, [u8; 4], CidrRule>,
    deny_v6: LpmTrie<MapData, [u8; 16], CidrRule>,
    allow_v4: LpmTrie<MapData, [u8; 4], CidrRule>,
    allow_v6: LpmTrie<MapData, [u8; 16], CidrRule>,
    source_tenant: HashMap<MapData, SourceKey, u32>,
    tenant_limits: HashMap<MapData, u32, RateLimit>,
    counters: PerCpuArray<MapData, u64>,
}

impl GuardMaps {
    /// Opens every map from its pin.
    pub fn open(paths: &Paths) -> anyhow::Result<Self> {
        check_pinned_layout(paths)?;
        Ok(Self {
            config: open(paths, maps::CONFIG)?.try_into()?,
            listeners: open(paths, maps::LISTENERS)?.try_into()?,
            deny_v4: open(paths, maps::DENY_V4)?.try_into()?,
            deny_v6: open(paths, maps::DENY_V6)?.try_into()?,
            allow_v4: open(paths, maps::ALLOW_V4)?.try_into()?,
            allow_v6: open(paths, maps::ALLOW_V6)?.try_into()?,
            source_tenant: open(paths, maps::SOURCE_TENANT)?.try_into()?,
            tenant_limits: open(paths, maps::TENANT_LIMITS)?.try_into()?,
            counters: open(paths, maps::COUNTERS)?.try_into()?,
        })
    }

    /// The host-wide settings in force.
    pub fn config(&self) -> anyhow::Result<GuardConfig> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Replaces the host-wide settings.
    pub fn set_config(&mut self, config: &GuardConfig) -> anyhow::Result<()> {
        self.config.set(0, config, 0)?;
        Ok(())
    }

    /// Makes the protected-listener map hold exactly `wanted`.
    pub fn sync_listeners(
        &mut self,
        wanted: &[(ListenerKey, ListenerValue)],
    ) -> anyhow::Result<()> {
        for (k, v) in wanted {
            self.listeners.insert(k, v, 0)?;
        }
        let keep: HashSet<ListenerKey> = wanted.iter().map(|(k, _)| *k).collect();
        let stale: Vec<ListenerKey> = self
            .listeners
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for k in stale {
            self.listeners.remove(&k)?;
        }
        Ok(())
    }

    /// The protected listeners in force.
    pub fn listeners(&self) -> anyhow::Result<Vec<(ListenerKey, ListenerValue)>> {
        Ok(self.listeners.iter().collect::<Result<_, _>>()?)
    }

    /// Makes the tenant-limit map hold exactly `wanted`.
    pub fn sync_tenant_limits(&mut self, wanted: &[(u32, RateLimit)]) -> anyhow::Result<()> {
        for (k, v) in wanted {
            self.tenant_limits.insert(k, v, 0)?;
        }
        let keep: HashSet<u32> = wanted.iter().map(|(k, _)| *k).collect();
        let stale: Vec<u32> = self
            .tenant_limits
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for k in stale {
            self.tenant_limits.remove(&k)?;
        }
        Ok(())
    }

    /// Records that `source` belongs to `tenant`, so its SYNs charge that
    /// tenant's budget.
    pub fn set_source_tenant(&mut self, source: IpAddr, tenant: u32) -> anyhow::Result<()> {
        let prefix = self.config()?.ipv6_prefix_len as u8;
        self.source_tenant
            .insert(source_key(source, prefix), tenant, 0)?;
        Ok(())
    }

    /// Adds or replaces a CIDR rule; `ttl_secs` of `None` never expires.
    pub fn add_cidr(
        &mut self,
        list: CidrList,
        cidr: Cidr,
        ttl_secs: Option<u64>,
    ) -> anyhow::Result<()> {
        let rule = CidrRule {
            expires_ns: ttl_secs.map_or(0, |t| {
                monotonic_ns().saturating_add(t.saturating_mul(1_000_000_000))
            }),
        };
        let len = u32::from(cidr.prefix_len());
        match (cidr.addr(), list) {
            (IpAddr::V4(a), CidrList::Deny) => {
                self.deny_v4
                    .insert(&LpmKey::new(len, a.octets()), rule, 0)?
            }
            (IpAddr::V4(a), CidrList::Allow) => {
                self.allow_v4
                    .insert(&LpmKey::new(len, a.octets()), rule, 0)?
            }
            (IpAddr::V6(a), CidrList::Deny) => {
                self.deny_v6
                    .insert(&LpmKey::new(len, a.octets()), rule, 0)?
            }
            (IpAddr::V6(a), CidrList::Allow) => {
                self.allow_v6
                    .insert(&LpmKey::new(len, a.octets()), rule, 0)?
            }
        }
        Ok(())
    }

    /// Removes a CIDR rule; `Ok(false)` when it was not there.
    pub fn remove_cidr(&mut self, list: CidrList, cidr: Cidr) -> anyhow::Result<bool> {
        let len = u32::from(cidr.prefix_len());
        let r = match (cidr.addr(), list) {
            (IpAddr::V4(a), CidrList::Deny) => self.deny_v4.remove(&LpmKey::new(len, a.octets())),
            (IpAddr::V4(a), CidrList::Allow) => self.allow_v4.remove(&LpmKey::new(len, a.octets())),
            (IpAddr::V6(a), CidrList::Deny) => self.deny_v6.remove(&LpmKey::new(len, a.octets())),
            (IpAddr::V6(a), CidrList::Allow) => self.allow_v6.remove(&LpmKey::new(len, a.octets())),
        };
        match r {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every rule of a list, expired ones included.
    pub fn list_cidrs(&self, list: CidrList) -> anyhow::Result<Vec<CidrEntry>> {
        let now = monotonic_ns();
        let entry = |ip: IpAddr, len: u32, rule: CidrRule| -> anyhow::Result<CidrEntry> {
            Ok(CidrEntry {
                cidr: Cidr::new(ip, len as u8)?,
                expires_ns: rule.expires_ns,
                expires_in_secs: (rule.expires_ns != 0)
                    .then(|| rule.expires_ns.saturating_sub(now).div_ceil(1_000_000_000)),
            })
        };
        let (v4, v6) = match list {
            CidrList::Deny => (&self.deny_v4, &self.deny_v6),
            CidrList::Allow => (&self.allow_v4, &self.allow_v6),
        };
        let mut out = Vec::new();
        for item in v4.iter() {
            let (k, rule) = item?;
            out.push(entry(
                Ipv4Addr::from(k.data()).into(),
                k.prefix_len(),
                rule,
            )?);
        }
        for item in v6.iter() {
            let (k, rule) = item?;
            out.push(entry(
                Ipv6Addr::from(k.data()).into(),
                k.prefix_len(),
                rule,
            )?);
        }
        out.sort_by_key(|e| e.cidr);
        Ok(out)
    }

    /// Removes every expired rule of both lists; returns how many.
    pub fn remove_expired(&mut self) -> anyhow::Result<usize> {
        let now = monotonic_ns();
        let mut removed = 0;
        for list in [CidrList::Deny, CidrList::Allow] {
            for e in self.list_cidrs(list)? {
                if !(CidrRule {
                    expires_ns: e.expires_ns,
                })
                .active(now)
                    && self.remove_cidr(list, e.cidr)?
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        let mut out = BTreeMap::new();
        for c in Counter::ALL {
            let values = self.counters.get(&(*c as u32), 0)?;
            out.insert(c.label(), values.iter().sum());
        }
        Ok(out)
    }

    /// Names of the maps of one list, for messages.
    pub fn list_maps(list: CidrList) -> (&'static str, &'static str) {
        list.names()
    }
}

/// The key the XDP program charges a source to (IPv6 masked to `prefix`).
pub fn source_key(ip: IpAddr, ipv6_prefix: u8) -> SourceKey {
    match ip {
        IpAddr::V4(a) => {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&a.octets());
            SourceKey {
                addr,
                family: guard_common::FAMILY_V4,
            }
        }
        IpAddr::V6(_) => {
            let IpAddr::V6(m) = crate::cidr::mask(ip, ipv6_prefix.min(128)) else {
                unreachable!("masking keeps the family")
            };
            SourceKey {
                addr: m.octets(),
                family: guard_common::FAMILY_V6,
            }
        }
    }
}
