//! guard's XDP program: judges every TCP SYN to a protected listener before
//! the kernel allocates anything for it, and drops UDP to protected ports.
//!
//! Per frame: parse Ethernet (up to two VLAN tags), IPv4 or IPv6 (extension
//! headers skipped), then TCP or UDP. A pure SYN (SYN set, ACK clear) to a
//! protected listener is checked against the deny and allow tries, then
//! charged to its source's, its tenant's and the host's token buckets, in
//! that order; any empty bucket drops it. A source with no bucket yet is
//! charged to the shared budgets first and gets one only when admitted,
//! so a flood of spoofed sources is dropped without touching the
//! per-source map. Everything else passes untouched.
//! Counters are per CPU; nothing is logged per packet. A source crossing a
//! budget is counted, and described on a ring buffer only while the host's
//! event budget lasts, so a flood of new sources costs one compare per SYN
//! rather than a reservation.
//!
//! With SYN cookies on (the default), a SYN of a source with no tenant
//! that the shared or the host's budget refuses is answered from here with
//! a SYN-ACK carrying a kernel SYN cookie instead (see [`cookies`]).
#![no_std]
#![no_main]
// The BPF target has no `AtomicU64::compare_exchange` (it declares no CAS),
// but the kernel has BPF_CMPXCHG: reach it through the intrinsic.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    mem::size_of,
};

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{
        Array, HashMap, LruHashMap, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::XdpContext,
};
use guard_common::{
    BucketState, CIDR_CAPACITY, CONFIG_ALLOW_UDP, CONFIG_HAS_ALLOW_V4, CONFIG_HAS_ALLOW_V6,
    CONFIG_HAS_DENY_V4, CONFIG_HAS_DENY_V6, CONFIG_HAS_SOURCE_TENANTS, CONFIG_HAS_VERIFIED,
    CONFIG_SYN_COOKIES, CidrRule, Counter, CounterBlock, DEFAULT_TENANT, EVENT_GLOBAL_LIMIT,
    EVENT_INTERVAL_NS, EVENT_SOURCE_LIMIT, EVENT_TENANT_LIMIT, EVENTS_BYTES, FAMILY_V4, FAMILY_V6,
    GuardConfig, LISTENERS_CAPACITY, LimitEvent, ListenerKey, ListenerValue, PORT_COUNT,
    PORT_SPECIFIC_V4, PORT_SPECIFIC_V6, PORT_WILDCARD_V4, PORT_WILDCARD_V6, PortEntry, RateLimit,
    SOURCE_BUCKETS_CAPACITY, SOURCE_TENANT_CAPACITY, SourceKey, TENANTS_CAPACITY, TenantBucket,
    VERIFIED_CAPACITY, VerifiedSource, gcra_admit,
};
use guard_common::{
    CONFIG_HAS_STRICT, CONFIG_HAS_TRACE_V4, CONFIG_HAS_TRACE_V6, IFACE_SLOTS, STRICT_CAPACITY,
    StrictEntry, TenantDrops,
};

#[map(name = "GUARD_CONFIG")]
static CONFIG: Array<GuardConfig> = Array::pinned(1, 0);
#[map(name = "GUARD_LISTENERS")]
static LISTENERS: HashMap<ListenerKey, ListenerValue> = HashMap::pinned(LISTENERS_CAPACITY, 0);
#[map(name = "GUARD_PORTS")]
static PORTS: Array<PortEntry> = Array::pinned(PORT_COUNT, 0);
#[map(name = "GUARD_DENY_V4")]
static DENY_V4: LpmTrie<[u8; 4], CidrRule> = LpmTrie::pinned(CIDR_CAPACITY, 0);
#[map(name = "GUARD_DENY_V6")]
static DENY_V6: LpmTrie<[u8; 16], CidrRule> = LpmTrie::pinned(CIDR_CAPACITY, 0);
#[map(name = "GUARD_ALLOW_V4")]
static ALLOW_V4: LpmTrie<[u8; 4], CidrRule> = LpmTrie::pinned(CIDR_CAPACITY, 0);
#[map(name = "GUARD_ALLOW_V6")]
static ALLOW_V6: LpmTrie<[u8; 16], CidrRule> = LpmTrie::pinned(CIDR_CAPACITY, 0);
#[map(name = "GUARD_SRC_BUCKETS")]
static SOURCE_BUCKETS: LruHashMap<SourceKey, BucketState> =
    LruHashMap::pinned(SOURCE_BUCKETS_CAPACITY, 0);
#[map(name = "GUARD_SRC_TENANT")]
static SOURCE_TENANT: LruHashMap<SourceKey, u32> = LruHashMap::pinned(SOURCE_TENANT_CAPACITY, 0);
#[map(name = "GUARD_TENANT_BUCKETS")]
static TENANT_BUCKETS: HashMap<u32, TenantBucket> = HashMap::pinned(TENANTS_CAPACITY, 0);
#[map(name = "GUARD_GLOBAL_BUCKET")]
static GLOBAL_BUCKET: Array<BucketState> = Array::pinned(1, 0);
#[map(name = "GUARD_COUNTERS")]
static COUNTERS: PerCpuArray<CounterBlock> = PerCpuArray::pinned(IFACE_SLOTS, 0);
#[map(name = "GUARD_TENANT_DROPS")]
static TENANT_DROPS: PerCpuArray<TenantDrops> = PerCpuArray::pinned(TENANTS_CAPACITY, 0);
#[map(name = "GUARD_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);
#[map(name = "GUARD_VERIFIED")]
static VERIFIED: HashMap<SourceKey, VerifiedSource> = HashMap::pinned(VERIFIED_CAPACITY, 0);
#[map(name = "GUARD_EVENT_BUCKET")]
static EVENT_BUCKET: Array<BucketState> = Array::pinned(1, 0);

mod cookies;
mod trace;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const VLAN_HLEN: usize = 4;
const IPV6_HLEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// Extension headers walked before giving up: real traffic has one or two.
const IPV6_MAX_EXT: usize = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Compare-and-swap attempts on a contended bucket before the SYN is dropped.
/// Losing that many races means the bucket is being hammered from every CPU.
const CAS_RETRIES: usize = 8;
const BPF_NOEXIST: u64 = 1;

/// What became of a source crossing a budget.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Notice {
    /// No crossing: the source already crossed within the interval, or the
    /// SYN was admitted.
    None,
    /// Described on the ring buffer.
    Sent,
    /// Counted only: the host's event budget was spent.
    Suppressed,
    /// The ring buffer was full.
    Lost,
}

/// A frame's fate: the action, the counter that names the verdict,
/// whether a limit crossing was reported, and one more counter the frame
/// moves, if any (what SYN cookies did about it).
struct Judged {
    action: u32,
    verdict: Counter,
    notice: Notice,
    also: Option<Counter>,
}

impl Judged {
    #[inline(always)]
    fn pass(verdict: Counter) -> Self {
        Self {
            action: xdp_action::XDP_PASS,
            verdict,
            notice: Notice::None,
            also: None,
        }
    }
}

/// The guard. Errors never escape: a frame it cannot read is passed.
#[xdp]
pub fn guard(ctx: XdpContext) -> u32 {
    let judged = match try_guard(&ctx) {
        Ok(judged) => judged,
        Err(reason) => Judged::pass(reason),
    };
    // The interface's slot: one lookup either way, and the host's totals
    // are the daemon's sum of the slots.
    let slot = (ctx.ingress_ifindex() as u32) % IFACE_SLOTS;
    if let Some(block) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU value is only written by this CPU, and every
        // counter index is within the block.
        let values = unsafe { &mut (*block).values };
        bump(values, Counter::Frames);
        bump(values, judged.verdict);
        if is_judgement(judged.verdict) {
            bump(values, Counter::Judged);
        }
        if let Some(also) = judged.also {
            bump(values, also);
        }
        // One counter block per frame: the crossing is counted here rather
        // than with a second lookup where it happened.
        let outcome = match judged.notice {
            Notice::None => None,
            Notice::Sent => Some(Counter::EventsSent),
            Notice::Suppressed => Some(Counter::EventsSuppressed),
            Notice::Lost => Some(Counter::EventsLost),
        };
        if let Some(outcome) = outcome {
            bump(values, outcome);
            bump(
                values,
                match judged.verdict {
                    Counter::DropSource => Counter::CrossedSource,
                    Counter::DropTenant => Counter::CrossedTenant,
                    _ => Counter::CrossedGlobal,
                },
            );
        }
    }
    judged.action
}

/// Verdicts given to SYNs that reached judgement.
#[inline(always)]
fn is_judgement(verdict: Counter) -> bool {
    matches!(
        verdict,
        Counter::Admitted
            | Counter::Allowed
            | Counter::DropDeny
            | Counter::DropSource
            | Counter::DropTenant
            | Counter::DropGlobal
    )
}

/// An empty program: the baseline the benchmarks compare the guard against.
#[cfg(feature = "bench")]
#[xdp]
pub fn guard_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The irreducible parts of judging a SYN, for the benchmark's breakdown;
/// never attached. The first byte of the frame picks the steps:
/// [`FLOOR_CLOCK`] reads the clock ([`FLOOR_COARSE_CLOCK`] the tick-grained
/// one), [`FLOOR_LOOKUP`] finds a bucket in the
/// per-source LRU map, [`FLOOR_CAS`] also swaps its arrival time. The
/// bucket's key has family 0, which no real source has.
#[cfg(feature = "bench")]
#[xdp]
pub fn guard_floor(ctx: XdpContext) -> u32 {
    use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
    use guard_common::{FLOOR_CAS, FLOOR_CLOCK, FLOOR_COARSE_CLOCK, FLOOR_LOOKUP};

    let Some(h) = ptr_at::<[u8; ETH_HLEN]>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    let steps = byte(h, 0);
    // SAFETY: the clock helpers have no preconditions.
    let now = if steps & FLOOR_CLOCK != 0 {
        unsafe { bpf_ktime_get_ns() }
    } else if steps & FLOOR_COARSE_CLOCK != 0 {
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        0
    };
    if steps & (FLOOR_LOOKUP | FLOOR_CAS) != 0 {
        let key = SourceKey {
            addr: [0; 16],
            family: 0,
        };
        if let Some(bucket) = bucket_for(&key) {
            if steps & FLOOR_CAS != 0 {
                // SAFETY: as in `charge`.
                let tat = unsafe { &raw mut (*bucket).tat_ns };
                let current = unsafe { tat.read_volatile() };
                let _ = cas(tat, current, current.wrapping_add(now | 1));
            }
        }
    }
    xdp_action::XDP_PASS
}

/// `get_mut` rather than indexing: a panicking bounds check would leave the
/// verifier an unterminated path.
#[inline(always)]
fn bump(values: &mut [u64], counter: Counter) {
    if let Some(v) = values.get_mut(counter as usize) {
        *v += 1;
    }
}

/// Returns a pointer to a `T` at `offset` if the whole `T` lies in the frame.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// One byte at `i` of a bounds-checked header.
#[inline(always)]
fn byte<const N: usize>(h: *const [u8; N], i: usize) -> u8 {
    // SAFETY: callers pass constant indices below N into a header whose
    // N bytes `ptr_at` proved to be inside the frame.
    unsafe { *h.cast::<u8>().add(i) }
}

/// A big-endian u16 at `i` of a bounds-checked header.
#[inline(always)]
fn be16<const N: usize>(h: *const [u8; N], i: usize) -> u16 {
    (u16::from(byte(h, i)) << 8) | u16::from(byte(h, i + 1))
}

/// What the network layer said about the transport header. Addresses are
/// read from the frame only when a SYN needs judging.
struct L3 {
    family: u32,
    /// Where the IP header starts in the frame.
    off: usize,
    /// The IP header: 20 (IPv4) or 40 (IPv6) bytes proven inside the frame.
    ip: *const [u8; IPV6_HLEN],
    protocol: u8,
    l4: usize,
}

impl L3 {
    #[inline(always)]
    fn addr(&self, v4_at: usize, v6_at: usize) -> [u8; 16] {
        let mut a = [0u8; 16];
        if self.family == FAMILY_V4 {
            a[0] = byte(self.ip, v4_at);
            a[1] = byte(self.ip, v4_at + 1);
            a[2] = byte(self.ip, v4_at + 2);
            a[3] = byte(self.ip, v4_at + 3);
        } else {
            let mut i = 0;
            while i < 16 {
                a[i] = byte(self.ip, v6_at + i);
                i += 1;
            }
        }
        a
    }

    #[inline(always)]
    fn src(&self) -> [u8; 16] {
        self.addr(12, 8)
    }

    #[inline(always)]
    fn dst(&self) -> [u8; 16] {
        self.addr(16, 24)
    }
}

/// Judges a frame; `Err` carries the reason a frame could not be parsed
/// (it is passed).
#[inline(always)]
fn try_guard(ctx: &XdpContext) -> Result<Judged, Counter> {
    let eth = ptr_at::<[u8; ETH_HLEN]>(ctx, 0).ok_or(Counter::ParseEthernet)?;
    let mut ethertype = be16(eth, 12);
    let mut l3 = ETH_HLEN;
    // 802.1Q, and QinQ's outer 802.1ad tag: at most two tags.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let tag = ptr_at::<[u8; VLAN_HLEN]>(ctx, l3).ok_or(Counter::ParseVlan)?;
        ethertype = be16(tag, 2);
        l3 += VLAN_HLEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let tag = ptr_at::<[u8; VLAN_HLEN]>(ctx, l3).ok_or(Counter::ParseVlan)?;
            ethertype = be16(tag, 2);
            l3 += VLAN_HLEN;
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                return Err(Counter::ParseVlan);
            }
        }
    }

    let l3 = match ethertype {
        ETH_P_IP => parse_ipv4(ctx, l3)?,
        ETH_P_IPV6 => parse_ipv6(ctx, l3)?,
        _ => return Err(Counter::NotIp),
    };

    match l3.protocol {
        IPPROTO_TCP => judge_tcp(ctx, &l3),
        IPPROTO_UDP => judge_udp(ctx, &l3),
        _ => Ok(Judged::pass(Counter::Passed)),
    }
}

// Each header is bounds-checked once as a whole and its fields read through
// that pointer: the verifier tracks proven ranges per pointer, and single
// field loads are cheaper than copying whole headers out.

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, off: usize) -> Result<L3, Counter> {
    let h = ptr_at::<[u8; 20]>(ctx, off).ok_or(Counter::ParseIpv4)?;
    let first = byte(h, 0);
    let ihl = (first & 0x0f) as usize * 4;
    if first >> 4 != 4 || ihl < 20 {
        return Err(Counter::ParseIpv4);
    }
    // The whole header, options included, must be in the frame.
    ptr_at::<u8>(ctx, off + ihl - 1).ok_or(Counter::ParseIpv4)?;
    if be16(h, 6) & 0x1fff != 0 {
        return Err(Counter::Fragment);
    }
    Ok(L3 {
        family: FAMILY_V4,
        off,
        ip: h.cast(),
        protocol: byte(h, 9),
        l4: off + ihl,
    })
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, off: usize) -> Result<L3, Counter> {
    let h = ptr_at::<[u8; IPV6_HLEN]>(ctx, off).ok_or(Counter::ParseIpv6)?;
    if byte(h, 0) >> 4 != 6 {
        return Err(Counter::ParseIpv6);
    }
    let mut next = byte(h, 6);
    let mut l4 = off + IPV6_HLEN;
    for _ in 0..IPV6_MAX_EXT {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let e = ptr_at::<[u8; 8]>(ctx, l4).ok_or(Counter::ParseIpv6Ext)?;
                next = byte(e, 0);
                l4 += (byte(e, 1) as usize + 1) * 8;
            }
            IPV6_AH => {
                let e = ptr_at::<[u8; 8]>(ctx, l4).ok_or(Counter::ParseIpv6Ext)?;
                next = byte(e, 0);
                l4 += (byte(e, 1) as usize + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let e = ptr_at::<[u8; 8]>(ctx, l4).ok_or(Counter::ParseIpv6Ext)?;
                if be16(e, 2) & 0xfff8 != 0 {
                    return Err(Counter::Fragment);
                }
                next = byte(e, 0);
                l4 += 8;
            }
            _ => break,
        }
    }
    if matches!(
        next,
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT
    ) {
        return Err(Counter::ParseIpv6Ext);
    }
    Ok(L3 {
        family: FAMILY_V6,
        off,
        ip: h,
        protocol: next,
        l4,
    })
}

/// The protected listener a packet is addressed to: exact address first,
/// then the family's wildcard. The port table answers for most frames
/// without touching the hash map.
#[inline(always)]
fn protected(l3: &L3, port: u16) -> Option<ListenerValue> {
    let entry = PORTS.get(port as u32)?;
    let (wildcard, specific, tenant) = if l3.family == FAMILY_V4 {
        (PORT_WILDCARD_V4, PORT_SPECIFIC_V4, entry.tenant_v4)
    } else {
        (PORT_WILDCARD_V6, PORT_SPECIFIC_V6, entry.tenant_v6)
    };
    if entry.flags & specific != 0 {
        let key = ListenerKey {
            addr: l3.dst(),
            family: l3.family,
            port: port as u32,
        };
        // SAFETY: values are plain data copied out at once.
        if let Some(v) = unsafe { LISTENERS.get(&key) } {
            return Some(*v);
        }
    }
    (entry.flags & wildcard != 0).then_some(ListenerValue { tenant, flags: 0 })
}

#[inline(always)]
fn judge_udp(ctx: &XdpContext, l3: &L3) -> Result<Judged, Counter> {
    let h = ptr_at::<[u8; 8]>(ctx, l3.l4).ok_or(Counter::ParseUdp)?;
    let port = be16(h, 2);
    let allow_udp = CONFIG
        .get(0)
        .is_some_and(|c| c.flags & CONFIG_ALLOW_UDP != 0);
    if !allow_udp && protected(l3, port).is_some() {
        return Ok(Judged {
            action: xdp_action::XDP_DROP,
            ..Judged::pass(Counter::DropUdp)
        });
    }
    Ok(Judged::pass(Counter::Passed))
}

#[inline(always)]
fn judge_tcp(ctx: &XdpContext, l3: &L3) -> Result<Judged, Counter> {
    let h = ptr_at::<[u8; 20]>(ctx, l3.l4).ok_or(Counter::ParseTcp)?;
    let port = be16(h, 2);
    let flags = byte(h, 13);
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Ok(cookies::check_ack(ctx, l3, flags));
    }
    let Some(listener) = protected(l3, port) else {
        return Ok(Judged::pass(Counter::Passed));
    };
    let syn = judge_syn(l3, port, listener);
    let action = match syn.verdict {
        Counter::Admitted | Counter::Allowed => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    };
    let judged = Judged {
        action,
        verdict: syn.verdict,
        notice: syn.notice,
        also: syn.verified.then_some(Counter::Verified),
    };
    // Off unless a trace runs: one test of flags already in a register.
    let tracing = syn.flags & (CONFIG_HAS_TRACE_V4 | CONFIG_HAS_TRACE_V6) != 0;
    if tracing {
        trace::prepare(ctx, l3, port, &syn);
    }
    let judged = cookies::answer(ctx, l3, judged, syn.tenant);
    if tracing {
        trace::emit(&judged);
    }
    Ok(judged)
}

/// What became of a judged SYN, as [`judge_syn`] decided it.
struct Syn {
    /// Names the verdict.
    verdict: Counter,
    /// What became of a limit crossing.
    notice: Notice,
    /// The tenant the SYN was charged to ([`DEFAULT_TENANT`] if none, or
    /// if judged before the tenant).
    tenant: u32,
    /// Whether the source is verified.
    verified: bool,
    /// The config's flags (0 without a config).
    flags: u32,
    /// When it was judged.
    now: u64,
    /// The source's bucket after the SYN (arrival time, budget), for a
    /// trace line's "tokens left"; unlimited when no bucket was charged.
    source_tat: u64,
    source_limit: RateLimit,
}

impl Syn {
    #[inline(always)]
    fn early(verdict: Counter, flags: u32, now: u64) -> Self {
        Self {
            verdict,
            notice: Notice::None,
            tenant: DEFAULT_TENANT,
            verified: false,
            flags,
            now,
            source_tat: 0,
            source_limit: RateLimit::UNLIMITED,
        }
    }
}

/// Decides a SYN's fate (see [`Syn`]) and counts a refusal by a tenant's
/// or the host's budget against the tenant.
#[inline(always)]
fn judge_syn(l3: &L3, port: u16, listener: ListenerValue) -> Syn {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(config) = CONFIG.get(0) else {
        return Syn::early(Counter::Admitted, 0, now);
    };

    let src = l3.src();
    // Tries are slow to search; the flags say which may hold anything.
    let flags = config.flags;
    if l3.family == FAMILY_V4 {
        let key = Key::new(32, [src[0], src[1], src[2], src[3]]);
        if flags & CONFIG_HAS_DENY_V4 != 0 && DENY_V4.get(&key).is_some_and(|r| r.active(now)) {
            return Syn::early(Counter::DropDeny, flags, now);
        }
        if flags & CONFIG_HAS_ALLOW_V4 != 0 && ALLOW_V4.get(&key).is_some_and(|r| r.active(now)) {
            return Syn::early(Counter::Allowed, flags, now);
        }
    } else {
        let key = Key::new(128, src);
        if flags & CONFIG_HAS_DENY_V6 != 0 && DENY_V6.get(&key).is_some_and(|r| r.active(now)) {
            return Syn::early(Counter::DropDeny, flags, now);
        }
        if flags & CONFIG_HAS_ALLOW_V6 != 0 && ALLOW_V6.get(&key).is_some_and(|r| r.active(now)) {
            return Syn::early(Counter::Allowed, flags, now);
        }
    }

    let source = SourceKey {
        addr: if l3.family == FAMILY_V6 {
            mask_v6(src, config.ipv6_prefix_len)
        } else {
            src
        },
        family: l3.family,
    };
    // Looked up, not inserted: a source gets a bucket only once admitted
    // (or reported), so a random-source flood never churns the LRU map.
    let known = SOURCE_BUCKETS.get_ptr_mut(&source);

    // Only the daemon writes verified sources: a SYN alone never makes
    // one, so a spoofed flood cannot buy its way past the shared budgets.
    let verified = if flags & CONFIG_HAS_VERIFIED != 0 {
        // SAFETY: plain data copied out at once.
        unsafe { VERIFIED.get(&source) }
            .copied()
            .filter(|v| v.active(now))
    } else {
        None
    };
    let tenant = if listener.tenant != DEFAULT_TENANT {
        listener.tenant
    } else if let Some(v) = verified {
        v.tenant
    } else if flags & CONFIG_HAS_SOURCE_TENANTS == 0 {
        DEFAULT_TENANT
    } else {
        // SAFETY: plain data copied out at once.
        unsafe { SOURCE_TENANT.get(&source) }
            .copied()
            .unwrap_or(DEFAULT_TENANT)
    };
    // A verified source pays its own bucket and its tenant's; the shared
    // budget of sources with no tenant and the host's are what a flood of
    // unknown sources exhausts, so it skips them.
    let shared = verified.is_none() || tenant != DEFAULT_TENANT;
    let source_limit = source_limit(&source, config, now);
    // The tenant's drop-counter slot, known once its bucket was looked up.
    let mut slot = None;
    let Some(bucket) = known else {
        let (verdict, notice, source_tat) = judge_unknown(
            &source,
            &source_limit,
            config,
            shared,
            verified.is_some(),
            tenant,
            port,
            now,
            &mut slot,
        );
        if let Some(slot) = slot
            && verdict != Counter::Admitted
        {
            count_tenant_drop(slot, verdict);
        }
        return Syn {
            verdict,
            notice,
            tenant,
            verified: verified.is_some(),
            flags,
            now,
            source_tat,
            source_limit,
        };
    };

    let verdict = if !charge(bucket, &source_limit, now) {
        Some((Counter::DropSource, EVENT_SOURCE_LIMIT))
    } else if shared && !charge_tenant(tenant, now, &mut slot) {
        Some((Counter::DropTenant, EVENT_TENANT_LIMIT))
    } else if verified.is_none() && !charge_global(&config.global, now) {
        Some((Counter::DropGlobal, EVENT_GLOBAL_LIMIT))
    } else {
        None
    };
    // SAFETY: as in `charge`.
    let source_tat = unsafe { (&raw const (*bucket).tat_ns).read_volatile() };
    let mut syn = Syn {
        verdict: Counter::Admitted,
        notice: Notice::None,
        tenant,
        verified: verified.is_some(),
        flags,
        now,
        source_tat,
        source_limit,
    };
    if let Some((counter, reason)) = verdict {
        if let Some(slot) = slot {
            count_tenant_drop(slot, counter);
        }
        syn.verdict = counter;
        syn.notice = notify(&config.events, bucket, &source, reason, tenant, port, now);
    }
    syn
}

/// Counts a SYN a tenant's (or, after it, the host's) budget refused at
/// the tenant's slot: one per-CPU array lookup, on refusals only.
#[inline(always)]
fn count_tenant_drop(slot: u32, verdict: Counter) {
    if let Some(drops) = TENANT_DROPS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU value is only written by this CPU.
        unsafe {
            match verdict {
                Counter::DropTenant => (*drops).tenant += 1,
                Counter::DropGlobal => (*drops).global += 1,
                _ => {}
            }
        }
    }
}

/// Judges a SYN from a source with no bucket, in the order that makes a
/// flood of new sources cheap: its own (fresh, so full) bucket would
/// admit it unless its limit admits nothing, so the shared budgets are
/// charged first, and the bucket is inserted, already charged, only when
/// the SYN is admitted. A refused SYN costs a lookup and a compare or
/// two; it leaves state behind only when it is reported, so that the
/// source's next crossings within the interval are not reported again.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn judge_unknown(
    source: &SourceKey,
    limit: &RateLimit,
    config: &GuardConfig,
    shared: bool,
    verified: bool,
    tenant: u32,
    port: u16,
    now: u64,
    slot: &mut Option<u32>,
) -> (Counter, Notice, u64) {
    let fresh = if limit.is_unlimited() {
        Some(BucketState::default())
    } else {
        gcra_admit(limit, 0, now).map(|tat_ns| BucketState {
            tat_ns,
            last_event_ns: 0,
        })
    };
    let Some(fresh) = fresh else {
        // A limit that admits nothing is a strict budget the daemon set for
        // this very source: its bucket records the crossing for the
        // daemon's escalation ladder, reported or not, as a known one's.
        let _ = SOURCE_BUCKETS.insert(source, BucketState::default(), BPF_NOEXIST);
        let notice = match SOURCE_BUCKETS.get_ptr_mut(source) {
            Some(bucket) => notify(
                &config.events,
                bucket,
                source,
                EVENT_SOURCE_LIMIT,
                tenant,
                port,
                now,
            ),
            None => Notice::None,
        };
        return (Counter::DropSource, notice, 0);
    };
    let refused = if shared && !charge_tenant(tenant, now, slot) {
        Some((Counter::DropTenant, EVENT_TENANT_LIMIT))
    } else if !verified && !charge_global(&config.global, now) {
        Some((Counter::DropGlobal, EVENT_GLOBAL_LIMIT))
    } else {
        None
    };
    if let Some((counter, reason)) = refused {
        // With cookies on, this SYN is about to be answered (see
        // `cookies::answer`): its source is charged as a known one's
        // would be, so that no source is sent more SYN-ACKs than its own
        // budget allows, whoever it spoofs. With cookies off, a refused
        // SYN leaves nothing behind.
        if config.flags & CONFIG_SYN_COOKIES != 0 && tenant == DEFAULT_TENANT && !verified {
            // Another CPU may have inserted the source meanwhile: its
            // bucket is charged as a known source's would be, and a spent
            // one gets no cookie (`cookies::answer` skips `drop_source`).
            if SOURCE_BUCKETS.insert(source, fresh, BPF_NOEXIST).is_err()
                && let Some(bucket) = SOURCE_BUCKETS.get_ptr_mut(source)
                && !charge(bucket, limit, now)
            {
                let notice = notify(
                    &config.events,
                    bucket,
                    source,
                    EVENT_SOURCE_LIMIT,
                    tenant,
                    port,
                    now,
                );
                return (Counter::DropSource, notice, 0);
            }
            if let Some(bucket) = SOURCE_BUCKETS.get_ptr_mut(source) {
                let notice = notify(&config.events, bucket, source, reason, tenant, port, now);
                return (counter, notice, fresh.tat_ns);
            }
        }
        let notice = notify_unknown(&config.events, fresh, source, reason, tenant, port, now);
        return (counter, notice, fresh.tat_ns);
    }
    // Another CPU may have inserted the source meanwhile: NOEXIST keeps
    // its state, and this SYN is charged to it like any known source's.
    if SOURCE_BUCKETS.insert(source, fresh, BPF_NOEXIST).is_err()
        && let Some(bucket) = SOURCE_BUCKETS.get_ptr_mut(source)
        && !charge(bucket, limit, now)
    {
        return (
            Counter::DropSource,
            notify(
                &config.events,
                bucket,
                source,
                EVENT_SOURCE_LIMIT,
                tenant,
                port,
                now,
            ),
            0,
        );
    }
    (Counter::Admitted, Notice::None, fresh.tat_ns)
}

/// [`notify`] for a source with no bucket: the host's event budget is
/// checked first, so a flood of new sources that spent it costs a
/// compare; a source that is reported gets a bucket (`fresh`, charged for
/// this SYN) that remembers when.
#[inline(always)]
fn notify_unknown(
    events: &RateLimit,
    fresh: BucketState,
    source: &SourceKey,
    reason: u32,
    tenant: u32,
    port: u16,
    now: u64,
) -> Notice {
    if !charge_event(events, now) {
        return Notice::Suppressed;
    }
    // Charged for this SYN, as a known source's bucket would have been.
    let reported = BucketState {
        last_event_ns: now,
        ..fresh
    };
    let _ = SOURCE_BUCKETS.insert(source, reported, BPF_NOEXIST);
    let event = LimitEvent {
        source: *source,
        reason,
        tenant,
        port: port as u32,
        time_ns: now,
    };
    if EVENTS.output::<LimitEvent>(&event, 0).is_err() {
        return Notice::Lost;
    }
    Notice::Sent
}

#[inline(always)]
fn mask_v6(addr: [u8; 16], prefix_len: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        let bits = prefix_len as i64 - (i as i64) * 8;
        out[i] = if bits >= 8 {
            addr[i]
        } else if bits <= 0 {
            0
        } else {
            addr[i] & (0xffu8 << (8 - bits as u32))
        };
        i += 1;
    }
    out
}

/// A source's bucket, inserted if missing: only the floor program wants
/// that; the guard inserts buckets for admitted sources only.
#[cfg(feature = "bench")]
#[inline(always)]
fn bucket_for(source: &SourceKey) -> Option<*mut BucketState> {
    if let Some(p) = SOURCE_BUCKETS.get_ptr_mut(source) {
        return Some(p);
    }
    // Another CPU may insert the same source first; NOEXIST keeps its state.
    let _ = SOURCE_BUCKETS.insert(source, BucketState::default(), BPF_NOEXIST);
    SOURCE_BUCKETS.get_ptr_mut(source)
}

/// A tenant without an entry has no SYN budget of its own (nor a drop
/// counter). `slot` receives the tenant's drop-counter slot.
#[inline(always)]
fn charge_tenant(tenant: u32, now: u64, slot: &mut Option<u32>) -> bool {
    let Some(bucket) = TENANT_BUCKETS.get_ptr_mut(tenant) else {
        return true;
    };
    // SAFETY: `bucket` points into a live map value; the limit and slot
    // are plain data the daemon replaces whole.
    let limit = unsafe { (*bucket).limit };
    *slot = Some(unsafe { (*bucket).slot });
    charge(unsafe { &raw mut (*bucket).state }, &limit, now)
}

#[inline(always)]
fn charge_global(limit: &RateLimit, now: u64) -> bool {
    if limit.is_unlimited() {
        return true;
    }
    match GLOBAL_BUCKET.get_ptr_mut(0) {
        Some(state) => charge(state, limit, now),
        None => true,
    }
}

/// Takes one token from a bucket shared by every CPU. The arrival time is
/// advanced with compare-and-swap, so concurrent SYNs from several CPUs can
/// never both spend the same token.
#[inline(always)]
fn charge(state: *mut BucketState, limit: &RateLimit, now: u64) -> bool {
    if limit.is_unlimited() {
        return true;
    }
    // SAFETY: `state` points into a map value that lives as long as the
    // program runs; u64 fields of map values are 8-byte aligned.
    let tat = unsafe { &raw mut (*state).tat_ns };
    let mut current = unsafe { tat.read_volatile() };
    for _ in 0..CAS_RETRIES {
        let Some(next) = gcra_admit(limit, current, now) else {
            return false;
        };
        match cas(tat, current, next) {
            Ok(()) => return true,
            Err(actual) => current = actual,
        }
    }
    false
}

/// Compare-and-swap on a u64 in a map value: `Err` carries the value found.
#[inline(always)]
fn cas(dst: *mut u64, old: u64, new: u64) -> Result<(), u64> {
    // SAFETY: callers pass pointers to aligned u64 fields of live map values.
    let (found, ok) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::Relaxed }>(dst, old, new)
    };
    if ok { Ok(()) } else { Err(found) }
}

/// Reports a source crossing a budget, unless it crossed one within the
/// last interval. The crossing is always counted; it is described on the
/// ring buffer only while the host's event budget lasts, which is checked
/// first so that a spent budget costs a compare, not a reservation.
#[inline(always)]
fn notify(
    events: &RateLimit,
    bucket: *mut BucketState,
    source: &SourceKey,
    reason: u32,
    tenant: u32,
    port: u16,
    now: u64,
) -> Notice {
    // SAFETY: as in `charge`.
    let last = unsafe { &raw mut (*bucket).last_event_ns };
    // SAFETY: as in `charge`.
    let seen = unsafe { last.read_volatile() };
    if now.wrapping_sub(seen) < EVENT_INTERVAL_NS && seen != 0 {
        return Notice::None;
    }
    // Only the CPU that wins the swap reports: one crossing per interval.
    if cas(last, seen, now).is_err() {
        return Notice::None;
    }
    if !charge_event(events, now) {
        return Notice::Suppressed;
    }
    let event = LimitEvent {
        source: *source,
        reason,
        tenant,
        port: port as u32,
        time_ns: now,
    };
    if EVENTS.output::<LimitEvent>(&event, 0).is_err() {
        return Notice::Lost;
    }
    Notice::Sent
}

/// Takes one event from the host's event budget; an unlimited budget
/// means events are off.
#[inline(always)]
fn charge_event(limit: &RateLimit, now: u64) -> bool {
    if limit.is_unlimited() {
        return false;
    }
    match EVENT_BUCKET.get_ptr_mut(0) {
        Some(state) => charge(state, limit, now),
        None => false,
    }
}

// The escalation ladder (see the daemon's `escalation` module): sources the
// daemon put on a stricter SYN budget for a while are charged with it, to
// their own bucket, instead of the per-source budget. Only the daemon
// writes this map; a SYN costs a lookup here only while it holds anything.

#[map(name = "GUARD_STRICT")]
static STRICT: HashMap<SourceKey, StrictEntry> = HashMap::pinned(STRICT_CAPACITY, 0);

/// The budget a source's own bucket is charged with: the ladder's stricter
/// one while the daemon's entry for the source lasts, else the host-wide
/// per-source budget.
#[inline(always)]
fn source_limit(source: &SourceKey, config: &GuardConfig, now: u64) -> RateLimit {
    if config.flags & CONFIG_HAS_STRICT != 0 {
        // SAFETY: plain data copied out at once.
        if let Some(entry) = unsafe { STRICT.get(source) }
            && entry.active(now)
        {
            return entry.limit;
        }
    }
    config.source
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
