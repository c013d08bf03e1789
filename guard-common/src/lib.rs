//! Map keys, values and constants shared by the XDP program (`guard-ebpf`)
//! and the daemon (`guard`).
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (sizes are
//! asserted at compile time) and uses `u32`/`u64` instead of `bool`, because
//! the kernel and user space read the same bytes. With the `user` feature the
//! types implement `aya::Pod` so the daemon can put them in maps.
#![no_std]

/// Layout version of the maps below. Pins live under a directory named after
/// it, so a daemon with a different layout never adopts maps it would misread.
pub const LAYOUT_VERSION: u32 = 6;

/// Names of the maps, as the XDP object declares them and as they are pinned.
pub mod maps {
    /// `Array<GuardConfig>`, one entry.
    pub const CONFIG: &str = "GUARD_CONFIG";
    /// `HashMap<ListenerKey, ListenerValue>`: the protected listeners.
    pub const LISTENERS: &str = "GUARD_LISTENERS";
    /// `Array<PortEntry>` indexed by port: which ports have protected
    /// listeners, so most frames need no hash lookup.
    pub const PORTS: &str = "GUARD_PORTS";
    /// `LpmTrie<[u8; 4], CidrRule>`: IPv4 sources whose SYNs are dropped.
    pub const DENY_V4: &str = "GUARD_DENY_V4";
    /// `LpmTrie<[u8; 16], CidrRule>`: IPv6 sources whose SYNs are dropped.
    pub const DENY_V6: &str = "GUARD_DENY_V6";
    /// `LpmTrie<[u8; 4], CidrRule>`: IPv4 sources passed without charge.
    pub const ALLOW_V4: &str = "GUARD_ALLOW_V4";
    /// `LpmTrie<[u8; 16], CidrRule>`: IPv6 sources passed without charge.
    pub const ALLOW_V6: &str = "GUARD_ALLOW_V6";
    /// `LruHashMap<SourceKey, BucketState>`: one SYN bucket per source.
    pub const SOURCE_BUCKETS: &str = "GUARD_SRC_BUCKETS";
    /// `LruHashMap<SourceKey, u32>`: tenant of a source, learnt by the proxy.
    pub const SOURCE_TENANT: &str = "GUARD_SRC_TENANT";
    /// `HashMap<u32, TenantBucket>`: SYN budget and bucket per tenant id
    /// (0 = sources with no tenant).
    pub const TENANT_BUCKETS: &str = "GUARD_TENANT_BUCKETS";
    /// `Array<BucketState>`, one entry: the host-wide SYN bucket.
    pub const GLOBAL_BUCKET: &str = "GUARD_GLOBAL_BUCKET";
    /// `PerCpuArray<CounterBlock>`, [`super::IFACE_SLOTS`] entries: every
    /// counter of a CPU in one value, so a frame costs one lookup however
    /// many counters it moves, in the slot of the interface it came in on
    /// (`ingress_ifindex % IFACE_SLOTS`). The host's totals are the sum of
    /// the slots.
    pub const COUNTERS: &str = "GUARD_COUNTERS";
    /// `PerCpuArray<TenantDrops>`, [`super::TENANTS_CAPACITY`] entries:
    /// SYNs each tenant's budget (or the host's, charged after it) refused,
    /// at the slot the daemon gave the tenant in its
    /// [`super::TenantBucket::slot`].
    pub const TENANT_DROPS: &str = "GUARD_TENANT_DROPS";
    /// `LpmTrie<[u8; 4], TraceRule>`: IPv4 sources whose SYN verdicts are
    /// logged (`guard xdp trace`).
    pub const TRACE_V4: &str = "GUARD_TRACE_V4";
    /// `LpmTrie<[u8; 16], TraceRule>`: as [`TRACE_V4`], for IPv6.
    pub const TRACE_V6: &str = "GUARD_TRACE_V6";
    /// `RingBuf` of [`super::LimitEvent`].
    pub const EVENTS: &str = "GUARD_EVENTS";
    /// `Array<BucketState>`, one entry: the host-wide budget of limit
    /// events, spent before ring-buffer space is reserved.
    pub const EVENT_BUCKET: &str = "GUARD_EVENT_BUCKET";
    /// `HashMap<SourceKey, VerifiedSource>`: sources that proved who they
    /// are (a login, a valid request). Written only by the daemon, so a
    /// spoofed flood can never add or evict an entry.
    pub const VERIFIED: &str = "GUARD_VERIFIED";
    /// `LruHashMap<ListenerKey, u64>`: per protected listener (the entry a
    /// SYN matched: a specific address, or the family's wildcard), when a
    /// SYN its cookies would have answered was last let through to the
    /// kernel instead (monotonic ns). See
    /// [`super::COOKIE_REFRESH_INTERVAL_NS`].
    pub const COOKIE_REFRESH: &str = "GUARD_COOKIE_REFRESH";
    /// `Array<u64>`, one entry: when the program last answered a SYN with
    /// a cookie (monotonic ns, at [`super::COOKIE_CLOCK_STEP_NS`]
    /// granularity); ACKs are checked for cookies only shortly after.
    pub const COOKIE_CLOCK: &str = "GUARD_COOKIE_CLOCK";
    /// `HashMap<SourceKey, StrictEntry>`: the escalation ladder's stricter
    /// SYN budgets, written only by the daemon.
    pub const STRICT: &str = "GUARD_STRICT";
    /// Every map, for pin management.
    pub const ALL: [&str; 21] = [
        CONFIG,
        LISTENERS,
        PORTS,
        DENY_V4,
        DENY_V6,
        ALLOW_V4,
        ALLOW_V6,
        SOURCE_BUCKETS,
        SOURCE_TENANT,
        TENANT_BUCKETS,
        GLOBAL_BUCKET,
        COUNTERS,
        EVENTS,
        EVENT_BUCKET,
        VERIFIED,
        COOKIE_REFRESH,
        COOKIE_CLOCK,
        STRICT,
        TENANT_DROPS,
        TRACE_V4,
        TRACE_V6,
    ];
}

/// Slots of [`maps::COUNTERS`]: a frame is counted at
/// `ingress_ifindex % IFACE_SLOTS`. Interfaces whose indexes share a slot
/// share its counters; the daemon reports them together.
pub const IFACE_SLOTS: u32 = 256;

/// Name of the XDP program that guards SYNs.
pub const PROGRAM_GUARD: &str = "guard";
/// Name of an empty `XDP_PASS` program, the baseline for benchmarks (in the
/// object only with guard's `bench-programs` feature, as is the next).
pub const PROGRAM_PASS: &str = "guard_pass";
/// Name of the program that times the irreducible steps of judging a SYN.
pub const PROGRAM_FLOOR: &str = "guard_floor";
/// [`PROGRAM_FLOOR`] step, chosen by a frame's first byte: read the clock.
pub const FLOOR_CLOCK: u8 = 1;
/// [`PROGRAM_FLOOR`] step: read the tick-grained clock instead.
pub const FLOOR_COARSE_CLOCK: u8 = 8;
/// [`PROGRAM_FLOOR`] step: look up (or insert) a per-source bucket.
pub const FLOOR_LOOKUP: u8 = 2;
/// [`PROGRAM_FLOOR`] step: look up a bucket and compare-and-swap it.
pub const FLOOR_CAS: u8 = 4;

/// Capacity of the per-source bucket map: a spoofed flood recycles the least
/// recently used entries instead of growing memory.
pub const SOURCE_BUCKETS_CAPACITY: u32 = 65_536;
/// Capacity of the source → tenant map.
pub const SOURCE_TENANT_CAPACITY: u32 = 65_536;
/// Capacity of each deny/allow trie.
pub const CIDR_CAPACITY: u32 = 16_384;
/// Capacity of the verified-source map: the daemon keeps it below this
/// (expired entries go first, then the oldest).
pub const VERIFIED_CAPACITY: u32 = 65_536;
/// Capacity of the protected-listener map.
pub const LISTENERS_CAPACITY: u32 = 256;
/// Capacity of the tenant maps.
pub const TENANTS_CAPACITY: u32 = 4_096;
/// Size of the event ring buffer in bytes (a power of two, page multiple).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Tenant id for sources no tenant claims: they share one default budget.
pub const DEFAULT_TENANT: u32 = 0;

/// Address family tags used in keys (values of `AF_INET`/`AF_INET6`).
pub const FAMILY_V4: u32 = 2;
/// See [`FAMILY_V4`].
pub const FAMILY_V6: u32 = 10;

/// Minimum interval between two [`LimitEvent`]s for one source: a source
/// *crosses* a budget at most once per interval.
pub const EVENT_INTERVAL_NS: u64 = 1_000_000_000;

/// `GuardConfig::flags`: pass UDP to protected ports instead of dropping it.
pub const CONFIG_ALLOW_UDP: u32 = 1;
/// `GuardConfig::flags`: the IPv4 deny trie may hold entries. The `HAS_*`
/// flags let the program skip tries that are empty; they are set before an
/// entry is added and cleared only after the trie is seen empty.
pub const CONFIG_HAS_DENY_V4: u32 = 1 << 1;
/// See [`CONFIG_HAS_DENY_V4`].
pub const CONFIG_HAS_DENY_V6: u32 = 1 << 2;
/// See [`CONFIG_HAS_DENY_V4`].
pub const CONFIG_HAS_ALLOW_V4: u32 = 1 << 3;
/// See [`CONFIG_HAS_DENY_V4`].
pub const CONFIG_HAS_ALLOW_V6: u32 = 1 << 4;
/// See [`CONFIG_HAS_DENY_V4`]: the source → tenant map may hold entries.
pub const CONFIG_HAS_SOURCE_TENANTS: u32 = 1 << 5;
/// See [`CONFIG_HAS_DENY_V4`]: the verified-source map may hold entries.
pub const CONFIG_HAS_VERIFIED: u32 = 1 << 6;
/// `GuardConfig::flags`: a SYN of a source with no tenant that the shared
/// budget of such sources or the host's budget refuses is answered from
/// XDP with a SYN-ACK carrying a kernel SYN cookie instead of being
/// dropped. It sits apart from the `HAS_*` bits, which describe the maps.
/// (Mode `on` is this flag with a shared budget that admits nothing,
/// [`RateLimit::NOTHING`].)
pub const CONFIG_SYN_COOKIES: u32 = 1 << 16;
/// The `HAS_*` flags together.
pub const CONFIG_HAS_MASK: u32 = CONFIG_HAS_DENY_V4
    | CONFIG_HAS_DENY_V6
    | CONFIG_HAS_ALLOW_V4
    | CONFIG_HAS_ALLOW_V6
    | CONFIG_HAS_SOURCE_TENANTS
    | CONFIG_HAS_VERIFIED
    | CONFIG_HAS_STRICT
    | CONFIG_HAS_TRACE_V4
    | CONFIG_HAS_TRACE_V6;

/// A protected listener whose SYNs XDP answers with cookies still gets one
/// of them through to the kernel this often: with
/// `net.ipv4.tcp_syncookies = 2` the kernel answers that SYN with a cookie
/// of its own, which makes the listener accept cookie ACKs for the next two
/// minutes (`tcp_synq_no_recent_overflow`). Without it the kernel resets
/// the ACKs that answer XDP's cookies. Once a minute would keep a listener
/// accepting them; once a second also gives a listening socket the
/// application just opened (a restart) that record within a second, and
/// costs the kernel no more than it records (one a second).
pub const COOKIE_REFRESH_INTERVAL_NS: u64 = 1_000_000_000;
/// Capacity of [`maps::COOKIE_REFRESH`]: room for every protected listener
/// twice over, so entries of listeners no longer protected age out.
pub const COOKIE_REFRESH_CAPACITY: u32 = 2 * LISTENERS_CAPACITY;
/// ACKs to protected listeners are checked for a valid cookie (and counted)
/// only this long after a cookie was last sent, so established traffic
/// pays no helper call per ACK when no cookies are being answered.
pub const COOKIE_ACK_WINDOW_NS: u64 = 10_000_000_000;
/// [`maps::COOKIE_CLOCK`] is written at most this often, so that CPUs
/// answering a flood with cookies rarely write the shared line.
pub const COOKIE_CLOCK_STEP_NS: u64 = 100_000_000;

/// Number of entries of [`maps::PORTS`].
pub const PORT_COUNT: u32 = 65_536;
/// `PortEntry::flags`: every IPv4 address of the port is protected.
pub const PORT_WILDCARD_V4: u32 = 1;
/// `PortEntry::flags`: every IPv6 address of the port is protected.
pub const PORT_WILDCARD_V6: u32 = 1 << 1;
/// `PortEntry::flags`: some IPv4 addresses of the port are protected
/// (look them up in [`maps::LISTENERS`]).
pub const PORT_SPECIFIC_V4: u32 = 1 << 2;
/// `PortEntry::flags`: as [`PORT_SPECIFIC_V4`], for IPv6.
pub const PORT_SPECIFIC_V6: u32 = 1 << 3;

/// One port's protection, the value of [`maps::PORTS`].
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PortEntry {
    /// `PORT_*` bits.
    pub flags: u32,
    /// Tenant of the IPv4 wildcard listener.
    pub tenant_v4: u32,
    /// Tenant of the IPv6 wildcard listener.
    pub tenant_v6: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// A tenant's SYN budget and its bucket, the value of
/// [`maps::TENANT_BUCKETS`]: one lookup serves both.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantBucket {
    /// The budget (written by the daemon).
    pub limit: RateLimit,
    /// The bucket (written by the program).
    pub state: BucketState,
    /// The tenant's index in [`maps::TENANT_DROPS`] (below
    /// [`TENANTS_CAPACITY`]), given by the daemon and kept across reloads.
    pub slot: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// SYNs refused for one tenant on one CPU, the value of
/// [`maps::TENANT_DROPS`]. Source-budget drops are not attributed: telling
/// them apart would cost a tenant lookup on the path of a single-source
/// flood, which the per-source counters already describe.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantDrops {
    /// Refused by the tenant's budget (`drop_tenant`, whether dropped or
    /// answered with a cookie).
    pub tenant: u64,
    /// Refused by the host's budget after the tenant's admitted them
    /// (`drop_global`).
    pub global: u64,
}

/// Every counter of one CPU: the value of [`maps::COUNTERS`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CounterBlock {
    /// Indexed by [`Counter`].
    pub values: [u64; COUNTER_COUNT as usize],
}

/// Host-wide settings, the single entry of [`maps::CONFIG`].
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// SYN budget of each source.
    pub source: RateLimit,
    /// SYN budget of the whole host.
    pub global: RateLimit,
    /// Budget of [`LimitEvent`]s the whole host sends. Unlike the SYN
    /// budgets, [`RateLimit::UNLIMITED`] here means *no* events: a flood of
    /// new sources must never cost a ring-buffer reservation per SYN.
    pub events: RateLimit,
    /// IPv6 sources are bucketed by this prefix length (0..=128).
    pub ipv6_prefix_len: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
}

/// A token bucket's parameters, in the form the generic cell rate algorithm
/// (GCRA) uses: one token every `interval_ns`, and a burst of
/// `burst_ns / interval_ns + 1` tokens. `interval_ns == 0` means unlimited.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Nanoseconds per admitted SYN (1e9 / rate), 0 for no limit.
    pub interval_ns: u64,
    /// How far ahead of now the bucket may run: `(burst - 1) * interval_ns`.
    pub burst_ns: u64,
}

impl RateLimit {
    /// No limit at all.
    pub const UNLIMITED: Self = Self {
        interval_ns: 0,
        burst_ns: 0,
    };

    /// A budget that admits nothing: one SYN, then one every 146 years.
    /// The shared budget of sources with no tenant when SYN cookies are
    /// `on`, so that all their SYNs are answered with cookies.
    pub const NOTHING: Self = Self {
        interval_ns: 1 << 62,
        burst_ns: 0,
    };

    /// A limit of `rate` SYNs per second with bursts of `burst` SYNs. A rate
    /// of 0 means unlimited; a burst below 1 is taken as 1.
    pub const fn per_second(rate: u64, burst: u64) -> Self {
        if rate == 0 {
            return Self::UNLIMITED;
        }
        let interval_ns = if rate >= 1_000_000_000 {
            1
        } else {
            1_000_000_000 / rate
        };
        let burst = if burst == 0 { 1 } else { burst };
        Self {
            interval_ns,
            burst_ns: (burst - 1).saturating_mul(interval_ns),
        }
    }

    /// Whether this limit admits everything.
    pub const fn is_unlimited(&self) -> bool {
        self.interval_ns == 0
    }

    /// The rate in SYNs per second this limit admits (0 = unlimited).
    pub const fn rate(&self) -> u64 {
        match 1_000_000_000u64.checked_div(self.interval_ns) {
            Some(r) => r,
            None => 0,
        }
    }

    /// The burst in SYNs this limit admits.
    pub const fn burst(&self) -> u64 {
        match self.burst_ns.checked_div(self.interval_ns) {
            Some(b) => b + 1,
            None => 0,
        }
    }
}

/// State of one token bucket, shared by every CPU and updated with
/// compare-and-swap.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketState {
    /// GCRA's theoretical arrival time: when the bucket will be full again.
    pub tat_ns: u64,
    /// When the last [`LimitEvent`] for this bucket was sent.
    pub last_event_ns: u64,
}

/// The GCRA decision: given the stored arrival time `tat` and `now`, returns
/// the new arrival time if the SYN is admitted, `None` if it must be dropped.
/// The kernel and the tests share this arithmetic.
#[inline(always)]
pub const fn gcra_admit(limit: &RateLimit, tat: u64, now: u64) -> Option<u64> {
    // An idle bucket's arrival time lies in the past: it refills to full.
    let start = if tat > now { tat } else { now };
    if start - now > limit.burst_ns {
        return None;
    }
    Some(start + limit.interval_ns)
}

/// Key of [`maps::LISTENERS`]: a protected destination. A zero address is the
/// family's wildcard.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// IPv4 (first 4 bytes) or IPv6 address, network byte order.
    pub addr: [u8; 16],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u32,
    /// Destination port, host byte order.
    pub port: u32,
}

/// Value of [`maps::LISTENERS`].
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerValue {
    /// Tenant that owns this listener, or [`DEFAULT_TENANT`].
    pub tenant: u32,
    /// Reserved, zero.
    pub flags: u32,
}

/// Key of the per-source maps: the address a SYN came from (IPv6 masked to
/// the configured prefix).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// IPv4 (first 4 bytes) or masked IPv6 address, network byte order.
    pub addr: [u8; 16],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u32,
}

/// A verified source, the value of [`maps::VERIFIED`]: its SYNs are
/// charged to its own bucket and its tenant's only, never to the shared
/// budget of sources with no tenant or to the host's, so exhausting those
/// (a spoofed flood) cannot lock it out.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifiedSource {
    /// The tenant it proved to be ([`DEFAULT_TENANT`] for the open one).
    pub tenant: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// `CLOCK_MONOTONIC` nanoseconds after which it no longer counts as
    /// verified (each new proof moves it on).
    pub expires_ns: u64,
}

impl VerifiedSource {
    /// Whether it still counts at `now` (monotonic nanoseconds).
    #[inline(always)]
    pub const fn active(&self, now: u64) -> bool {
        now < self.expires_ns
    }
}

/// Value of the deny and allow tries.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrRule {
    /// `CLOCK_MONOTONIC` nanoseconds after which the rule no longer applies;
    /// 0 for a rule that never expires.
    pub expires_ns: u64,
}

impl CidrRule {
    /// Whether the rule is in force at `now` (monotonic nanoseconds).
    #[inline(always)]
    pub const fn active(&self, now: u64) -> bool {
        self.expires_ns == 0 || now < self.expires_ns
    }
}

/// Why a [`LimitEvent`] was sent: which budget the source exhausted.
pub const EVENT_SOURCE_LIMIT: u32 = 1;
/// See [`EVENT_SOURCE_LIMIT`].
pub const EVENT_TENANT_LIMIT: u32 = 2;
/// See [`EVENT_SOURCE_LIMIT`].
pub const EVENT_GLOBAL_LIMIT: u32 = 3;

/// Sent on [`maps::EVENTS`] when a source first crosses a limit, at most once
/// per source per [`EVENT_INTERVAL_NS`], and only while the host's event
/// budget ([`GuardConfig::events`]) lasts: every crossing is counted, a
/// sample of them is described.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitEvent {
    /// The source (see [`SourceKey`]).
    pub source: SourceKey,
    /// One of the `EVENT_*_LIMIT` constants.
    pub reason: u32,
    /// Tenant the SYN was charged to.
    pub tenant: u32,
    /// Destination port, host byte order.
    pub port: u32,
    /// Monotonic time of the drop.
    pub time_ns: u64,
}

// The escalation ladder's part of the program: a source the daemon put on
// a stricter SYN budget is charged with it while the entry lasts.

/// See [`CONFIG_HAS_DENY_V4`]: the strict-budget map may hold entries.
pub const CONFIG_HAS_STRICT: u32 = 1 << 7;
/// Capacity of [`maps::STRICT`]: the daemon never escalates more sources
/// at once.
pub const STRICT_CAPACITY: u32 = 16_384;

/// Value of [`maps::STRICT`]: a source's stricter SYN budget, in force
/// until `expires_ns`. Written only by the daemon; the program charges the
/// source's own bucket with `limit` instead of the host-wide per-source
/// budget while the entry is active.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct StrictEntry {
    /// The stricter budget.
    pub limit: RateLimit,
    /// `CLOCK_MONOTONIC` nanoseconds at which the entry stops applying.
    pub expires_ns: u64,
}

impl StrictEntry {
    /// Whether the entry applies at `now` (monotonic nanoseconds).
    #[inline(always)]
    pub const fn active(&self, now: u64) -> bool {
        now < self.expires_ns
    }
}

// `guard xdp trace`: the verdicts on SYNs of traced prefixes are logged
// through aya-log while a rule lasts, within its lines-per-second budget.

/// See [`CONFIG_HAS_DENY_V4`]: the IPv4 trace trie may hold entries. With
/// both trace flags clear (no trace running) a SYN costs one flag test.
pub const CONFIG_HAS_TRACE_V4: u32 = 1 << 8;
/// See [`CONFIG_HAS_TRACE_V4`].
pub const CONFIG_HAS_TRACE_V6: u32 = 1 << 9;
/// The `action` of a trace line for a SYN let through to the kernel to
/// keep its listener accepting cookie ACKs; otherwise it is the XDP action
/// (1 drop, 2 pass, 3 a SYN-ACK with a cookie).
pub const TRACE_ACTION_REFRESH: u32 = 100;
/// Capacity of each trace trie: the daemon runs at most this many traces.
pub const TRACE_CAPACITY: u32 = 16;

/// Value of the trace tries: while `now < expires_ns`, each verdict on a
/// SYN from the prefix is logged if `limit` (lines per second) has a token.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceRule {
    /// The lines-per-second budget.
    pub limit: RateLimit,
    /// Its bucket (written by the program).
    pub state: BucketState,
    /// `CLOCK_MONOTONIC` nanoseconds at which the rule stops applying.
    pub expires_ns: u64,
    /// Names the trace in its lines, so a terminal shows its own.
    pub id: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

impl TraceRule {
    /// Whether the rule applies at `now` (monotonic nanoseconds).
    #[inline(always)]
    pub const fn active(&self, now: u64) -> bool {
        now < self.expires_ns
    }
}

/// Tokens a GCRA bucket holds at `now` given its arrival time `tat`: what a
/// trace line shows as "tokens left". 0 for a spent bucket; `u64::MAX` for
/// an unlimited one.
#[inline(always)]
pub const fn gcra_tokens(limit: &RateLimit, tat: u64, now: u64) -> u64 {
    if limit.interval_ns == 0 {
        return u64::MAX;
    }
    let ahead = tat.saturating_sub(now);
    if ahead > limit.burst_ns {
        return 0;
    }
    (limit.burst_ns - ahead) / limit.interval_ns + 1
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident = $label:literal, )*) => {
        /// Index of a per-CPU counter in [`maps::COUNTERS`].
        #[repr(u32)]
        #[derive(Copy, Clone, Debug, PartialEq, Eq)]
        pub enum Counter {
            $( $(#[$doc])* $name, )*
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];

            /// A stable snake-case name for tables, JSON and metrics.
            pub const fn label(self) -> &'static str {
                match self { $(Counter::$name => $label,)* }
            }
        }
    };
}

counters! {
    /// Frames seen.
    Frames = "frames",
    /// Frames passed without judgement (not a SYN to a protected listener).
    Passed = "passed",
    /// SYNs to a protected listener that were judged.
    Judged = "judged",
    /// Judged SYNs admitted after charging every bucket.
    Admitted = "admitted",
    /// Judged SYNs passed uncharged because the source is allowed.
    Allowed = "allowed",
    /// SYNs dropped because the source is denied.
    DropDeny = "drop_deny",
    /// SYNs dropped by the source's bucket.
    DropSource = "drop_source",
    /// SYNs refused by the tenant's bucket: dropped, or (a source with no
    /// tenant, SYN cookies on or auto) answered with a cookie, see
    /// [`Counter::CookiesSent`] and [`Counter::CookieRefresh`].
    DropTenant = "drop_tenant",
    /// SYNs refused by the host-wide bucket; as [`Counter::DropTenant`].
    DropGlobal = "drop_global",
    /// UDP datagrams to a protected port dropped.
    DropUdp = "drop_udp",
    /// Non-IP frames (ARP, LLDP…), passed.
    NotIp = "not_ip",
    /// Non-first IP fragments, passed: they carry no TCP header.
    Fragment = "fragment",
    /// Frames shorter than an Ethernet header, passed.
    ParseEthernet = "parse_ethernet",
    /// Truncated or over-deep VLAN tags, passed.
    ParseVlan = "parse_vlan",
    /// Truncated IPv4 header or bad IHL, passed.
    ParseIpv4 = "parse_ipv4",
    /// Truncated IPv6 header, passed.
    ParseIpv6 = "parse_ipv6",
    /// Truncated or too many IPv6 extension headers, passed.
    ParseIpv6Ext = "parse_ipv6_ext",
    /// Truncated TCP header, passed.
    ParseTcp = "parse_tcp",
    /// Truncated UDP header, passed.
    ParseUdp = "parse_udp",
    /// Sources that crossed their own budget (once per source per
    /// [`EVENT_INTERVAL_NS`]): each crossing is sent, suppressed or lost.
    CrossedSource = "crossed_source",
    /// Sources that crossed their tenant's budget; see [`Counter::CrossedSource`].
    CrossedTenant = "crossed_tenant",
    /// Sources that crossed the host's budget; see [`Counter::CrossedSource`].
    CrossedGlobal = "crossed_global",
    /// Limit events sent on the ring buffer.
    EventsSent = "events_sent",
    /// Crossings not sent because the host's event budget was spent.
    EventsSuppressed = "events_suppressed",
    /// Limit events lost because the ring buffer was full.
    EventsLost = "events_lost",
    /// Judged SYNs from verified sources, charged to their own and their
    /// tenant's buckets only (whatever their verdict).
    Verified = "verified",
    /// SYN-ACKs carrying a kernel SYN cookie sent back from XDP
    /// (`XDP_TX`) for SYNs counted as `drop_tenant` or `drop_global`.
    CookiesSent = "cookies_sent",
    /// SYNs counted as `drop_tenant` or `drop_global` that a cookie would
    /// have answered, passed to the kernel instead: one per protected
    /// listener per [`COOKIE_REFRESH_INTERVAL_NS`], so that it keeps
    /// accepting cookie ACKs.
    CookieRefresh = "cookie_refresh",
    /// SYNs a cookie should have answered but could not (IPv4 options,
    /// IPv6 extension headers, a malformed TCP header), dropped.
    CookieUnanswerable = "cookie_unanswerable",
    /// ACKs to protected listeners carrying a valid SYN cookie, passed to
    /// the kernel, which completes the connection from it. Counted only
    /// within [`COOKIE_ACK_WINDOW_NS`] of a cookie sent.
    CookieAcks = "cookie_acks",
}

/// Number of counters.
pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

const _: () = {
    assert!(core::mem::size_of::<RateLimit>() == 16);
    assert!(core::mem::size_of::<GuardConfig>() == 56);
    assert!(core::mem::size_of::<BucketState>() == 16);
    assert!(core::mem::size_of::<ListenerKey>() == 24);
    assert!(core::mem::size_of::<ListenerValue>() == 8);
    assert!(core::mem::size_of::<SourceKey>() == 20);
    assert!(core::mem::size_of::<CidrRule>() == 8);
    assert!(core::mem::size_of::<LimitEvent>() == 40);
    assert!(core::mem::size_of::<PortEntry>() == 16);
    assert!(core::mem::size_of::<TenantBucket>() == 40);
    assert!(core::mem::size_of::<TenantDrops>() == 16);
    assert!(core::mem::size_of::<TraceRule>() == 48);
    assert!(core::mem::size_of::<VerifiedSource>() == 16);
    assert!(core::mem::size_of::<CounterBlock>() == 8 * COUNTER_COUNT as usize);
    assert!(core::mem::size_of::<StrictEntry>() == 24);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: all of these are `repr(C)`, contain only integers and arrays of
    // integers, and have no padding (sizes asserted above).
    unsafe impl aya::Pod for GuardConfig {}
    unsafe impl aya::Pod for RateLimit {}
    unsafe impl aya::Pod for BucketState {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for ListenerValue {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for CidrRule {}
    unsafe impl aya::Pod for LimitEvent {}
    unsafe impl aya::Pod for PortEntry {}
    unsafe impl aya::Pod for TenantBucket {}
    unsafe impl aya::Pod for CounterBlock {}
    unsafe impl aya::Pod for VerifiedSource {}
    unsafe impl aya::Pod for StrictEntry {}
    unsafe impl aya::Pod for TenantDrops {}
    unsafe impl aya::Pod for TraceRule {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_second_computes_interval_and_burst() {
        let l = RateLimit::per_second(100, 10);
        assert_eq!(l.interval_ns, 10_000_000);
        assert_eq!(l.burst_ns, 90_000_000);
        assert_eq!(l.rate(), 100);
        assert_eq!(l.burst(), 10);
        assert!(RateLimit::per_second(0, 5).is_unlimited());
        assert_eq!(RateLimit::per_second(10, 0).burst(), 1);
    }

    #[test]
    fn gcra_admits_burst_then_drops_then_refills() {
        let l = RateLimit::per_second(10, 3);
        let mut tat = 0;
        let now = 5_000_000_000;
        for _ in 0..3 {
            tat = gcra_admit(&l, tat, now).expect("burst admitted");
        }
        assert_eq!(gcra_admit(&l, tat, now), None, "fourth SYN dropped");
        // One interval later exactly one more token has arrived.
        let later = now + l.interval_ns;
        tat = gcra_admit(&l, tat, later).expect("refilled one");
        assert_eq!(gcra_admit(&l, tat, later), None);
        // Long idle: back to a full burst, never more.
        let idle = later + 60_000_000_000;
        let mut admitted = 0;
        while let Some(t) = gcra_admit(&l, tat, idle) {
            tat = t;
            admitted += 1;
        }
        assert_eq!(admitted, 3);
    }

    #[test]
    fn gcra_long_run_rate_is_exact() {
        // Offer 1,000 SYNs per second for 10 s to a 100/s bucket with burst 20.
        let l = RateLimit::per_second(100, 20);
        let (mut tat, mut admitted) = (0u64, 0u64);
        for i in 0..10_000u64 {
            let now = 1_000_000_000 + i * 1_000_000;
            if let Some(t) = gcra_admit(&l, tat, now) {
                tat = t;
                admitted += 1;
            }
        }
        assert!((1000..=1020).contains(&admitted), "admitted {admitted}");
    }

    #[test]
    fn a_verified_source_lapses_at_its_expiry() {
        let v = VerifiedSource {
            tenant: 7,
            reserved: 0,
            expires_ns: 10,
        };
        assert!(v.active(9));
        assert!(!v.active(10));
        assert!(!VerifiedSource::default().active(0));
    }

    #[test]
    fn nothing_admits_one_then_none_for_a_century() {
        let l = RateLimit::NOTHING;
        assert!(!l.is_unlimited());
        let now = 5_000_000_000_000;
        let tat = gcra_admit(&l, 0, now).expect("the first is admitted");
        let century = 100 * 365 * 24 * 3_600 * 1_000_000_000u64;
        for later in [now, now + 1, now + 60_000_000_000, now + century] {
            assert_eq!(gcra_admit(&l, tat, later), None, "at {later}");
        }
    }

    #[test]
    fn cidr_rule_expiry() {
        assert!(CidrRule { expires_ns: 0 }.active(u64::MAX));
        assert!(CidrRule { expires_ns: 10 }.active(9));
        assert!(!CidrRule { expires_ns: 10 }.active(10));
    }

    #[test]
    fn strict_entry_expiry() {
        let e = StrictEntry {
            limit: RateLimit::per_second(1, 1),
            expires_ns: 10,
        };
        assert!(e.active(9));
        assert!(!e.active(10));
        assert!(
            !StrictEntry::default().active(0),
            "a zero entry never applies"
        );
    }

    #[test]
    fn gcra_tokens_counts_what_admit_would_admit() {
        let l = RateLimit::per_second(10, 3);
        let now = 5_000_000_000;
        let mut tat = 0;
        assert_eq!(gcra_tokens(&l, tat, now), 3);
        for left in [2, 1, 0] {
            tat = gcra_admit(&l, tat, now).unwrap();
            assert_eq!(gcra_tokens(&l, tat, now), left);
        }
        assert_eq!(gcra_admit(&l, tat, now), None);
        assert_eq!(gcra_tokens(&RateLimit::UNLIMITED, 0, now), u64::MAX);
    }

    #[test]
    fn counter_labels_are_unique_and_indexed() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            for d in &Counter::ALL[i + 1..] {
                assert_ne!(c.label(), d.label());
            }
        }
    }
}
