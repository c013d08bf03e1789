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
    BucketState, CIDR_CAPACITY, CONFIG_HAS_ALLOW_V4, CONFIG_HAS_ALLOW_V6, CONFIG_HAS_DENY_V4,
    CONFIG_HAS_DENY_V6, CONFIG_HAS_MASK, CONFIG_HAS_SOURCE_TENANTS, CONFIG_HAS_VERIFIED,
    COOKIE_REFRESH_CAPACITY, COUNTER_COUNT, CidrRule, Counter, CounterBlock, FAMILY_V4,
    GuardConfig, LISTENERS_CAPACITY, ListenerKey, ListenerValue, PORT_COUNT, PORT_SPECIFIC_V4,
    PORT_SPECIFIC_V6, PORT_WILDCARD_V4, PORT_WILDCARD_V6, PortEntry, RateLimit,
    SOURCE_BUCKETS_CAPACITY, SOURCE_TENANT_CAPACITY, SourceKey, TENANTS_CAPACITY, TenantBucket,
    VERIFIED_CAPACITY, VerifiedSource, maps,
};
use guard_common::{
    CONFIG_HAS_STRICT, CONFIG_HAS_TRACE_V4, CONFIG_HAS_TRACE_V6, IFACE_SLOTS, STRICT_CAPACITY,
    StrictEntry, TRACE_CAPACITY, TenantDrops, TraceRule,
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
    /// The config flag announcing entries of this list for a family.
    fn flag(self, v4: bool) -> u32 {
        match (self, v4) {
            (Self::Deny, true) => CONFIG_HAS_DENY_V4,
            (Self::Deny, false) => CONFIG_HAS_DENY_V6,
            (Self::Allow, true) => CONFIG_HAS_ALLOW_V4,
            (Self::Allow, false) => CONFIG_HAS_ALLOW_V6,
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
pub fn expected_layout() -> [(&'static str, u32, u32, u32); 20] {
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
        (maps::PORTS, 4, s(size_of::<PortEntry>()), PORT_COUNT),
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
            maps::TENANT_BUCKETS,
            4,
            s(size_of::<TenantBucket>()),
            TENANTS_CAPACITY,
        ),
        (maps::GLOBAL_BUCKET, 4, s(size_of::<BucketState>()), 1),
        (maps::COUNTERS, 4, s(size_of::<CounterBlock>()), IFACE_SLOTS),
        (maps::EVENT_BUCKET, 4, s(size_of::<BucketState>()), 1),
        (
            maps::VERIFIED,
            s(size_of::<SourceKey>()),
            s(size_of::<VerifiedSource>()),
            VERIFIED_CAPACITY,
        ),
        (
            maps::COOKIE_REFRESH,
            s(size_of::<ListenerKey>()),
            8,
            COOKIE_REFRESH_CAPACITY,
        ),
        (maps::COOKIE_CLOCK, 4, 8, 1),
        (
            maps::STRICT,
            s(size_of::<SourceKey>()),
            s(size_of::<StrictEntry>()),
            STRICT_CAPACITY,
        ),
        (
            maps::TENANT_DROPS,
            4,
            s(size_of::<TenantDrops>()),
            TENANTS_CAPACITY,
        ),
        (maps::TRACE_V4, 8, s(size_of::<TraceRule>()), TRACE_CAPACITY),
        (
            maps::TRACE_V6,
            20,
            s(size_of::<TraceRule>()),
            TRACE_CAPACITY,
        ),
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
    ports: Array<MapData, PortEntry>,
    deny_v4: LpmTrie<MapData, [u8; 4], CidrRule>,
    deny_v6: LpmTrie<MapData, [u8; 16], CidrRule>,
    allow_v4: LpmTrie<MapData, [u8; 4], CidrRule>,
    allow_v6: LpmTrie<MapData, [u8; 16], CidrRule>,
    source_tenant: HashMap<MapData, SourceKey, u32>,
    tenant_buckets: HashMap<MapData, u32, TenantBucket>,
    counters: PerCpuArray<MapData, CounterBlock>,
    verified: HashMap<MapData, SourceKey, VerifiedSource>,
    source_buckets: HashMap<MapData, SourceKey, BucketState>,
    strict: HashMap<MapData, SourceKey, StrictEntry>,
    tenant_drops: PerCpuArray<MapData, TenantDrops>,
    trace_v4: LpmTrie<MapData, [u8; 4], TraceRule>,
    trace_v6: LpmTrie<MapData, [u8; 16], TraceRule>,
}

impl GuardMaps {
    /// Opens every map from its pin.
    pub fn open(paths: &Paths) -> anyhow::Result<Self> {
        check_pinned_layout(paths)?;
        Ok(Self {
            config: open(paths, maps::CONFIG)?.try_into()?,
            listeners: open(paths, maps::LISTENERS)?.try_into()?,
            ports: open(paths, maps::PORTS)?.try_into()?,
            deny_v4: open(paths, maps::DENY_V4)?.try_into()?,
            deny_v6: open(paths, maps::DENY_V6)?.try_into()?,
            allow_v4: open(paths, maps::ALLOW_V4)?.try_into()?,
            allow_v6: open(paths, maps::ALLOW_V6)?.try_into()?,
            source_tenant: open(paths, maps::SOURCE_TENANT)?.try_into()?,
            tenant_buckets: open(paths, maps::TENANT_BUCKETS)?.try_into()?,
            counters: open(paths, maps::COUNTERS)?.try_into()?,
            verified: open(paths, maps::VERIFIED)?.try_into()?,
            source_buckets: open(paths, maps::SOURCE_BUCKETS)?.try_into()?,
            strict: open(paths, maps::STRICT)?.try_into()?,
            tenant_drops: open(paths, maps::TENANT_DROPS)?.try_into()?,
            trace_v4: open(paths, maps::TRACE_V4)?.try_into()?,
            trace_v6: open(paths, maps::TRACE_V6)?.try_into()?,
        })
    }

    /// The host-wide settings in force.
    pub fn config(&self) -> anyhow::Result<GuardConfig> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Replaces the host-wide settings. The `CONFIG_HAS_*` flags describe
    /// the maps rather than the configuration, so they are kept as they are.
    pub fn set_config(&mut self, config: &GuardConfig) -> anyhow::Result<()> {
        let has = self.config()?.flags & CONFIG_HAS_MASK;
        let mut config = *config;
        config.flags = (config.flags & !CONFIG_HAS_MASK) | has;
        self.config.set(0, config, 0)?;
        Ok(())
    }

    /// Announces entries in a map before they are added, so the program
    /// never skips a map that holds something.
    fn raise_flag(&mut self, flag: u32) -> anyhow::Result<()> {
        let mut c = self.config()?;
        if c.flags & flag != flag {
            c.flags |= flag;
            self.config.set(0, c, 0)?;
        }
        Ok(())
    }

    /// Clears the `CONFIG_HAS_*` flag of every map found empty, so the
    /// program stops searching it.
    pub fn refresh_flags(&mut self) -> anyhow::Result<()> {
        let has = self.maps_holding();
        let mut c = self.config()?;
        // Only clear: a flag raised meanwhile by another writer stays.
        let cleared = c.flags & CONFIG_HAS_MASK & !has;
        if cleared != 0 {
            c.flags &= !cleared;
            self.config.set(0, c, 0)?;
            // Another process (an operator command, the admin endpoint's
            // trace) may have added an entry and raised its flag between
            // the look at the maps and the write, which then cleared it:
            // an entry added before the write is seen now, and its flag
            // raised again.
            let again = self.maps_holding() & cleared;
            if again != 0 {
                self.raise_flag(again)?;
            }
        }
        Ok(())
    }

    /// The `CONFIG_HAS_*` flags of the maps that hold anything.
    fn maps_holding(&self) -> u32 {
        let mut has = 0;
        if self.deny_v4.keys().next().is_some() {
            has |= CONFIG_HAS_DENY_V4;
        }
        if self.deny_v6.keys().next().is_some() {
            has |= CONFIG_HAS_DENY_V6;
        }
        if self.allow_v4.keys().next().is_some() {
            has |= CONFIG_HAS_ALLOW_V4;
        }
        if self.allow_v6.keys().next().is_some() {
            has |= CONFIG_HAS_ALLOW_V6;
        }
        if self.source_tenant.keys().next().is_some() {
            has |= CONFIG_HAS_SOURCE_TENANTS;
        }
        if self.verified.keys().next().is_some() {
            has |= CONFIG_HAS_VERIFIED;
        }
        if self.strict.keys().next().is_some() {
            has |= CONFIG_HAS_STRICT;
        }
        if self.trace_v4.keys().next().is_some() {
            has |= CONFIG_HAS_TRACE_V4;
        }
        if self.trace_v6.keys().next().is_some() {
            has |= CONFIG_HAS_TRACE_V6;
        }
        has
    }

    /// Makes the protected-listener map and the port table hold exactly
    /// `wanted`.
    pub fn sync_listeners(
        &mut self,
        wanted: &[(ListenerKey, ListenerValue)],
    ) -> anyhow::Result<()> {
        let old: Vec<ListenerKey> = self.listeners.keys().filter_map(Result::ok).collect();
        let mut ports: BTreeMap<u16, PortEntry> = BTreeMap::new();
        for k in &old {
            ports.entry(k.port as u16).or_default();
        }
        for (k, v) in wanted {
            let e = ports.entry(k.port as u16).or_default();
            let v4 = k.family == FAMILY_V4;
            if k.addr == [0; 16] {
                if v4 {
                    e.flags |= PORT_WILDCARD_V4;
                    e.tenant_v4 = v.tenant;
                } else {
                    e.flags |= PORT_WILDCARD_V6;
                    e.tenant_v6 = v.tenant;
                }
            } else {
                e.flags |= if v4 {
                    PORT_SPECIFIC_V4
                } else {
                    PORT_SPECIFIC_V6
                };
            }
        }
        // Listeners first, then the table that points at them.
        for (k, v) in wanted {
            self.listeners.insert(k, v, 0)?;
        }
        for (port, entry) in &ports {
            self.ports.set(u32::from(*port), entry, 0)?;
        }
        let keep: HashSet<ListenerKey> = wanted.iter().map(|(k, _)| *k).collect();
        for k in old.into_iter().filter(|k| !keep.contains(k)) {
            self.listeners.remove(&k)?;
        }
        Ok(())
    }

    /// The protected listeners in force.
    pub fn listeners(&self) -> anyhow::Result<Vec<(ListenerKey, ListenerValue)>> {
        Ok(self.listeners.iter().collect::<Result<_, _>>()?)
    }

    /// Makes the tenant budgets exactly `wanted`. An unchanged budget is
    /// left alone, so its bucket keeps its state across reloads and restarts;
    /// a changed one keeps it too, but starts no deeper in debt than its
    /// own burst allows (a bucket left by a budget that admitted nothing
    /// would otherwise refuse every SYN for years). Each tenant keeps its
    /// drop-counter slot; a new one gets the lowest free slot, zeroed, so
    /// it never inherits the counts of a tenant removed before it.
    pub fn sync_tenant_limits(&mut self, wanted: &[(u32, RateLimit)]) -> anyhow::Result<()> {
        let keep: HashSet<u32> = wanted.iter().map(|(k, _)| *k).collect();
        let stale: Vec<u32> = self
            .tenant_buckets
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        // Removed first, so their slots are free for newcomers.
        for k in stale {
            self.tenant_buckets.remove(&k)?;
        }
        let mut used: HashSet<u32> = self
            .tenant_buckets
            .iter()
            .filter_map(Result::ok)
            .map(|(_, b)| b.slot)
            .collect();
        for (id, limit) in wanted {
            let (state, slot) = match self.tenant_buckets.get(id, 0) {
                Ok(b) if b.limit == *limit => continue,
                Ok(b) => (
                    BucketState {
                        tat_ns: b
                            .state
                            .tat_ns
                            .min(monotonic_ns().saturating_add(limit.burst_ns)),
                        ..b.state
                    },
                    b.slot,
                ),
                Err(_) => {
                    let slot = (0..TENANTS_CAPACITY)
                        .find(|s| !used.contains(s))
                        .context("no free tenant slot: more tenants than the maps hold")?;
                    used.insert(slot);
                    self.clear_tenant_drops(slot)?;
                    (BucketState::default(), slot)
                }
            };
            self.tenant_buckets.insert(
                id,
                TenantBucket {
                    limit: *limit,
                    state,
                    slot,
                    reserved: 0,
                },
                0,
            )?;
        }
        Ok(())
    }

    fn clear_tenant_drops(&mut self, slot: u32) -> anyhow::Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zero = aya::maps::PerCpuValues::try_from(vec![TenantDrops::default(); cpus])?;
        self.tenant_drops.set(slot, zero, 0)?;
        Ok(())
    }

    /// SYNs refused per tenant id, summed over CPUs (see [`TenantDrops`]).
    pub fn tenant_drops(&self) -> anyhow::Result<BTreeMap<u32, TenantDrops>> {
        let mut out = BTreeMap::new();
        for item in self.tenant_buckets.iter() {
            let (id, bucket) = item?;
            let per_cpu = self.tenant_drops.get(&bucket.slot, 0)?;
            let mut sum = TenantDrops::default();
            for d in per_cpu.iter() {
                sum.tenant = sum.tenant.wrapping_add(d.tenant);
                sum.global = sum.global.wrapping_add(d.global);
            }
            out.insert(id, sum);
        }
        Ok(out)
    }

    /// A tenant's SYN budget in force ([`guard_common::DEFAULT_TENANT`]:
    /// the shared budget of sources with no tenant).
    pub fn tenant_limit(&self, tenant: u32) -> anyhow::Result<Option<RateLimit>> {
        match self.tenant_buckets.get(&tenant, 0) {
            Ok(b) => Ok(Some(b.limit)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The tenant a source's SYNs are charged to, if the proxy learnt it.
    pub fn source_tenant(&self, source: IpAddr) -> anyhow::Result<Option<u32>> {
        let prefix = self.config()?.ipv6_prefix_len as u8;
        match self.source_tenant.get(&source_key(source, prefix), 0) {
            Ok(t) => Ok(Some(t)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Records that `source` belongs to `tenant`, so its SYNs charge that
    /// tenant's budget.
    pub fn set_source_tenant(&mut self, source: IpAddr, tenant: u32) -> anyhow::Result<()> {
        let prefix = self.config()?.ipv6_prefix_len as u8;
        self.raise_flag(CONFIG_HAS_SOURCE_TENANTS)?;
        self.source_tenant
            .insert(source_key(source, prefix), tenant, 0)?;
        Ok(())
    }

    /// Forgets which tenant `source` belongs to; its SYNs charge the
    /// default budget until it logs in again.
    pub fn remove_source_tenant(&mut self, source: IpAddr) -> anyhow::Result<()> {
        let prefix = self.config()?.ipv6_prefix_len as u8;
        match self.source_tenant.remove(&source_key(source, prefix)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Records `source` as verified for `tenant` until `valid_for` from
    /// now; `credential` names what proved it (0 for the open tenant), so
    /// a reload that revokes the credential can take the status back.
    /// When the map is full, expired entries go first, then the one that
    /// would expire soonest.
    pub fn set_verified(
        &mut self,
        source: IpAddr,
        tenant: u32,
        credential: u32,
        valid_for: std::time::Duration,
    ) -> anyhow::Result<()> {
        let prefix = self.config()?.ipv6_prefix_len as u8;
        let key = source_key(source, prefix);
        let now = monotonic_ns();
        let entry = VerifiedSource {
            tenant,
            reserved: credential,
            expires_ns: now.saturating_add(u64::try_from(valid_for.as_nanos()).unwrap_or(u64::MAX)),
        };
        self.raise_flag(CONFIG_HAS_VERIFIED)?;
        if self.verified.insert(key, entry, 0).is_ok() {
            return Ok(());
        }
        // Full (the only way an insert fails here): make room.
        if self.sweep_verified(now)? == 0 {
            let soonest = self
                .verified
                .iter()
                .filter_map(Result::ok)
                .min_by_key(|(_, v)| v.expires_ns)
                .map(|(k, _)| k);
            if let Some(k) = soonest {
                let _ = self.verified.remove(&k);
            }
        }
        self.verified
            .insert(key, entry, 0)
            .context("cannot record a verified source")
    }

    /// Removes verified sources whose status lapsed by `now`; returns how
    /// many.
    pub fn sweep_verified(&mut self, now: u64) -> anyhow::Result<usize> {
        self.remove_verified_where(|v| !v.active(now))
    }

    /// Removes verified sources that `revoked` says lost their proof
    /// (given their tenant and credential); returns how many.
    pub fn remove_verified_where(
        &mut self,
        mut revoked: impl FnMut(&VerifiedSource) -> bool,
    ) -> anyhow::Result<usize> {
        let gone: Vec<SourceKey> = self
            .verified
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| revoked(v))
            .map(|(k, _)| k)
            .collect();
        for k in &gone {
            let _ = self.verified.remove(k);
        }
        Ok(gone.len())
    }

    /// Forgets that `source` (or its IPv6 prefix) was verified; `false` if
    /// it was not.
    pub fn remove_verified(&mut self, source: IpAddr) -> anyhow::Result<bool> {
        let prefix = self.config()?.ipv6_prefix_len as u8;
        match self.verified.remove(&source_key(source, prefix)) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The verified entry of `source` (or its IPv6 prefix), lapsed or not.
    pub fn verified_entry(&self, source: IpAddr) -> anyhow::Result<Option<VerifiedSource>> {
        let prefix = self.config()?.ipv6_prefix_len as u8;
        match self.verified.get(&source_key(source, prefix), 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every verified source: its address (an IPv6 prefix's first address)
    /// and entry, lapsed ones included until they are swept.
    pub fn verified(&self) -> anyhow::Result<Vec<(IpAddr, VerifiedSource)>> {
        Ok(self
            .verified
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (source_addr(&k), v))
            .collect())
    }

    /// Adds or replaces a CIDR rule; `ttl_secs` of `None` never expires.
    pub fn add_cidr(
        &mut self,
        list: CidrList,
        cidr: Cidr,
        ttl_secs: Option<u64>,
    ) -> anyhow::Result<()> {
        let expires_ns = ttl_secs.map_or(0, |t| {
            monotonic_ns().saturating_add(t.saturating_mul(1_000_000_000))
        });
        self.add_cidr_until(list, cidr, expires_ns)
    }

    /// Adds or replaces a CIDR rule that expires at `expires_ns`
    /// (monotonic; 0 never).
    pub fn add_cidr_until(
        &mut self,
        list: CidrList,
        cidr: Cidr,
        expires_ns: u64,
    ) -> anyhow::Result<()> {
        let rule = CidrRule { expires_ns };
        let len = u32::from(cidr.prefix_len());
        self.raise_flag(list.flag(cidr.addr().is_ipv4()))?;
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
        self.refresh_flags()?;
        Ok(removed)
    }

    /// Whether an active rule of `list` covers `source` (longest prefix).
    pub fn covers(&self, list: CidrList, source: IpAddr) -> anyhow::Result<bool> {
        let now = monotonic_ns();
        let found = match (source.to_canonical(), list) {
            (IpAddr::V4(a), CidrList::Deny) => self.deny_v4.get(&LpmKey::new(32, a.octets()), 0),
            (IpAddr::V4(a), CidrList::Allow) => self.allow_v4.get(&LpmKey::new(32, a.octets()), 0),
            (IpAddr::V6(a), CidrList::Deny) => self.deny_v6.get(&LpmKey::new(128, a.octets()), 0),
            (IpAddr::V6(a), CidrList::Allow) => self.allow_v6.get(&LpmKey::new(128, a.octets()), 0),
        };
        match found {
            Ok(rule) => Ok(rule.active(now)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Puts `source` (IPv6 by the configured prefix) on a stricter SYN
    /// budget until `expires_ns` (monotonic), replacing any entry it had.
    pub fn set_strict(
        &mut self,
        source: IpAddr,
        limit: RateLimit,
        expires_ns: u64,
    ) -> anyhow::Result<()> {
        let prefix = self.config()?.ipv6_prefix_len as u8;
        self.raise_flag(CONFIG_HAS_STRICT)?;
        self.strict.insert(
            source_key(source, prefix),
            StrictEntry { limit, expires_ns },
            0,
        )?;
        Ok(())
    }

    /// Takes `source` off its stricter SYN budget; `Ok(false)` when it had
    /// none.
    pub fn remove_strict(&mut self, source: IpAddr) -> anyhow::Result<bool> {
        let prefix = self.config()?.ipv6_prefix_len as u8;
        match self.strict.remove(&source_key(source, prefix)) {
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

    /// Every stricter SYN budget in the map, expired ones included.
    pub fn strict_entries(&self) -> anyhow::Result<Vec<(IpAddr, StrictEntry)>> {
        let mut out = Vec::new();
        for item in self.strict.iter() {
            let (k, e) = item?;
            out.push((source_addr(&k), e));
        }
        Ok(out)
    }

    /// When `source` last had a SYN dropped by a budget (monotonic ns; the
    /// program records it at most once a second, whether or not it
    /// described the crossing), if its bucket is still in the map.
    pub fn last_crossing(&self, source: IpAddr) -> anyhow::Result<Option<u64>> {
        let prefix = self.config()?.ipv6_prefix_len as u8;
        match self.source_buckets.get(&source_key(source, prefix), 0) {
            Ok(b) => Ok((b.last_event_ns != 0).then_some(b.last_event_ns)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        let totals = self.counter_totals()?;
        Ok(Counter::ALL
            .iter()
            .map(|c| (c.label(), totals[*c as usize]))
            .collect())
    }

    /// Every counter summed over CPUs and interface slots, indexed by
    /// [`Counter`].
    pub fn counter_totals(&self) -> anyhow::Result<[u64; COUNTER_COUNT as usize]> {
        let mut out = [0u64; COUNTER_COUNT as usize];
        for (_, slot) in self.counter_slots()? {
            for (total, v) in out.iter_mut().zip(slot) {
                *total = total.wrapping_add(v);
            }
        }
        Ok(out)
    }

    /// The counters of each interface slot that counted anything (see
    /// [`guard_common::IFACE_SLOTS`]), summed over CPUs: `(slot, counters
    /// indexed by [`Counter`])`.
    pub fn counter_slots(&self) -> anyhow::Result<Vec<(u32, [u64; COUNTER_COUNT as usize])>> {
        let mut out = Vec::new();
        for slot in 0..IFACE_SLOTS {
            let per_cpu = self.counters.get(&slot, 0)?;
            let mut sum = [0u64; COUNTER_COUNT as usize];
            for block in per_cpu.iter() {
                for (total, v) in sum.iter_mut().zip(block.values) {
                    *total = total.wrapping_add(v);
                }
            }
            if sum.iter().any(|v| *v != 0) {
                out.push((slot, sum));
            }
        }
        Ok(out)
    }

    /// Adds or replaces a trace rule: SYN verdicts of sources in `cidr`
    /// are logged, at most `lines_per_sec` a second (bursts of as many),
    /// until `expires_ns` (monotonic). At most
    /// [`guard_common::TRACE_CAPACITY`] rules per family.
    pub fn add_trace(
        &mut self,
        cidr: Cidr,
        id: u32,
        lines_per_sec: u64,
        expires_ns: u64,
    ) -> anyhow::Result<()> {
        let rule = TraceRule {
            limit: RateLimit::per_second(lines_per_sec.max(1), lines_per_sec.max(1)),
            state: BucketState::default(),
            expires_ns,
            id,
            reserved: 0,
        };
        let len = u32::from(cidr.prefix_len());
        let full = || format!("the trace map is full ({TRACE_CAPACITY} traces of a family)");
        match cidr.addr() {
            IpAddr::V4(a) => {
                self.raise_flag(CONFIG_HAS_TRACE_V4)?;
                self.trace_v4
                    .insert(&LpmKey::new(len, a.octets()), rule, 0)
                    .with_context(full)?
            }
            IpAddr::V6(a) => {
                self.raise_flag(CONFIG_HAS_TRACE_V6)?;
                self.trace_v6
                    .insert(&LpmKey::new(len, a.octets()), rule, 0)
                    .with_context(full)?
            }
        }
        Ok(())
    }

    /// Removes a trace rule if it is the one with `id` (a later trace of
    /// the same prefix replaced it otherwise); clears the family's flag
    /// once its trie is empty.
    pub fn remove_trace(&mut self, cidr: Cidr, id: u32) -> anyhow::Result<()> {
        let len = u32::from(cidr.prefix_len());
        let gone = |r: Result<(), aya::maps::MapError>| match r {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        };
        match cidr.addr() {
            IpAddr::V4(a) => {
                let key = LpmKey::new(len, a.octets());
                if self.trace_v4.get(&key, 0).is_ok_and(|r| r.id == id) {
                    gone(self.trace_v4.remove(&key))?;
                }
            }
            IpAddr::V6(a) => {
                let key = LpmKey::new(len, a.octets());
                if self.trace_v6.get(&key, 0).is_ok_and(|r| r.id == id) {
                    gone(self.trace_v6.remove(&key))?;
                }
            }
        }
        self.refresh_flags()
    }

    /// Every trace rule: its prefix and rule, expired ones included.
    pub fn trace_rules(&self) -> anyhow::Result<Vec<(Cidr, TraceRule)>> {
        let mut out = Vec::new();
        for item in self.trace_v4.iter() {
            let (k, r) = item?;
            out.push((
                Cidr::new(Ipv4Addr::from(k.data()).into(), k.prefix_len() as u8)?,
                r,
            ));
        }
        for item in self.trace_v6.iter() {
            let (k, r) = item?;
            out.push((
                Cidr::new(Ipv6Addr::from(k.data()).into(), k.prefix_len() as u8)?,
                r,
            ));
        }
        Ok(out)
    }
}

/// The address a [`SourceKey`] stands for.
pub fn source_addr(k: &SourceKey) -> IpAddr {
    if k.family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(k.addr[0], k.addr[1], k.addr[2], k.addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(k.addr))
    }
}

/// The key the XDP program charges a source to (IPv6 masked to `prefix`).
pub fn source_key(ip: IpAddr, ipv6_prefix: u8) -> SourceKey {
    let ip = ip.to_canonical();
    match ip {
        IpAddr::V4(a) => {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&a.octets());
            SourceKey {
                addr,
                family: FAMILY_V4,
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
