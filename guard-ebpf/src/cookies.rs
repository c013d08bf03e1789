//! SYN cookies answered from XDP.
//!
//! A SYN of a source with no tenant that the shared budget of such sources
//! or the host's budget refuses is answered here when cookies are on: the
//! frame is turned into a SYN-ACK whose sequence number is a SYN cookie
//! made with the kernel's own secret (`bpf_tcp_raw_gen_syncookie_ipv4/6`)
//! and sent back out of the interface it came in on (`XDP_TX`). A spoofed
//! source never answers, so it cost one transmit; a real client's ACK
//! reaches the kernel, which rebuilds the connection from the cookie,
//! provided its listener sent a cookie itself within two minutes
//! (`tcp_synq_no_recent_overflow`): with `net.ipv4.tcp_syncookies = 2` the
//! kernel answers every SYN it receives with one, so one SYN per protected
//! listener a second is let through to it ([`refresh_due`]).
//!
//! The SYN-ACK carries only an MSS option, the one the cookie encodes, and
//! a window of 65,535: without timestamps a cookie cannot carry window
//! scaling or SACK, so the connection does without both. Frames with IPv4
//! options or IPv6 extension headers are not answered (no client sends a
//! SYN like that); they stay dropped and are counted.
//!
//! ACKs to protected ports are checked for a valid cookie and counted only
//! for a while after a cookie was sent, so established traffic pays
//! nothing otherwise; they are passed either way.
//!
//! The work is done in global functions ([`guard_cookie_refresh`],
//! [`guard_syn_ack`], [`guard_cookie_ack`]), which the verifier checks once
//! each rather than once per path through the parser and the budgets. The
//! program calls them with the context and the headers' offsets; they find
//! the headers again and return what they did. Each is called from the
//! program itself, never from another, so the stack the program leaves
//! needs to hold only one of them; what they need beyond a few registers
//! lives in a per-CPU scratch map.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::{
        bpf_ktime_get_coarse_ns,
        generated::{
            bpf_tcp_raw_check_syncookie_ipv4, bpf_tcp_raw_check_syncookie_ipv6,
            bpf_tcp_raw_gen_syncookie_ipv4, bpf_tcp_raw_gen_syncookie_ipv6, bpf_xdp_adjust_tail,
            bpf_xdp_get_buff_len, bpf_xdp_load_bytes,
        },
    },
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use guard_common::{
    CONFIG_SYN_COOKIES, COOKIE_ACK_WINDOW_NS, COOKIE_CLOCK_STEP_NS, COOKIE_REFRESH_CAPACITY,
    COOKIE_REFRESH_INTERVAL_NS, Counter, DEFAULT_TENANT, FAMILY_V4, FAMILY_V6, ListenerKey,
    PORT_SPECIFIC_V4, PORT_SPECIFIC_V6,
};

use crate::{
    BPF_NOEXIST, CONFIG, ETH_HLEN, IPPROTO_TCP, IPV6_HLEN, Judged, L3, LISTENERS, PORTS, TCP_ACK,
    TCP_SYN, VLAN_HLEN, be16, byte, cas, ptr_at,
};

#[map(name = "GUARD_COOKIE_REFRESH")]
static COOKIE_REFRESH: LruHashMap<ListenerKey, u64> =
    LruHashMap::pinned(COOKIE_REFRESH_CAPACITY, 0);
#[map(name = "GUARD_COOKIE_CLOCK")]
static COOKIE_CLOCK: Array<u64> = Array::pinned(1, 0);
/// Scratch memory of the functions below (not pinned: nothing to keep).
#[map(name = "GUARD_COOKIE_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// What the functions below would otherwise put on the stack.
#[repr(C)]
struct Scratch {
    /// A SYN's TCP header, for the cookie helper.
    th: [u8; 64],
    /// The listener a SYN is for, for [`COOKIE_REFRESH`].
    key: ListenerKey,
}

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_URG: u8 = 0x20;
const IPV4_HLEN: usize = 20;
/// The SYN-ACK's TCP header: 20 bytes and an MSS option.
const SYNACK_HLEN: usize = 24;
/// What the SYN-ACK's IP header says.
const TTL: u8 = 64;
/// The SYN-ACK's window, unscaled: the cookie carries no window scaling.
const WINDOW: u16 = 0xffff;
/// Farthest an IP header can start: behind two VLAN tags.
pub(crate) const MAX_IP_OFF: usize = ETH_HLEN + 2 * VLAN_HLEN;
/// Farthest a TCP header is looked for by [`guard_cookie_ack`].
const MAX_L4_OFF: usize = 1024;

/// What [`guard_cookie_refresh`] says of a SYN a cookie would answer.
const COOKIES_OFF: u32 = 0;
const REFRESH: u32 = 1;
const ANSWER: u32 = 2;

/// Answers a judged SYN with a cookie when its verdict calls for one: a
/// source with no tenant refused by the shared or the host's budget, while
/// cookies are on. The SYN keeps its verdict, notice and crossing; what
/// became of it instead of a drop is counted besides.
#[inline(always)]
pub(crate) fn answer(ctx: &XdpContext, l3: &L3, judged: Judged, tenant: u32) -> Judged {
    // A verified source (counted in `also`) never meets the budgets that
    // cookies stand in for.
    if tenant != DEFAULT_TENANT
        || judged.also.is_some()
        || !matches!(judged.verdict, Counter::DropTenant | Counter::DropGlobal)
    {
        return judged;
    }
    let (off, l4) = (l3.off as u32, l3.l4 as u32);
    let (action, also) = match guard_cookie_refresh(ctx.ctx, off, l4, l3.family) {
        REFRESH => (xdp_action::XDP_PASS, Counter::CookieRefresh),
        ANSWER if guard_syn_ack(ctx.ctx, off, l4, l3.family) != 0 => {
            (xdp_action::XDP_TX, Counter::CookiesSent)
        }
        ANSWER => (xdp_action::XDP_DROP, Counter::CookieUnanswerable),
        _ => return judged,
    };
    Judged {
        action,
        also: Some(also),
        ..judged
    }
}

/// Counts an ACK that carries a valid cookie (see [`guard_cookie_ack`]);
/// every non-SYN TCP frame comes here, and only ACKs with no other flag
/// (but ECN's) go further: a handshake's last segment, not data.
#[inline(always)]
pub(crate) fn check_ack(ctx: &XdpContext, l3: &L3, flags: u8) -> Judged {
    let passed = Judged::pass(Counter::Passed);
    if flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_PSH | TCP_ACK | TCP_URG) != TCP_ACK
        || guard_cookie_ack(ctx.ctx, l3.off as u32, l3.l4 as u32, l3.family) == 0
    {
        return passed;
    }
    Judged {
        also: Some(Counter::CookieAcks),
        ..passed
    }
}

/// Whether a SYN a cookie would answer goes to the kernel instead, to keep
/// its listener accepting cookie ACKs ([`REFRESH`]), or is to be answered
/// ([`ANSWER`]); [`COOKIES_OFF`] when cookies are off.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn guard_cookie_refresh(
    ctx: *mut xdp_md,
    ip_off: u32,
    l4_off: u32,
    family: u32,
) -> u32 {
    if CONFIG
        .get(0)
        .is_none_or(|c| c.flags & CONFIG_SYN_COOKIES == 0)
    {
        return COOKIES_OFF;
    }
    let ctx = XdpContext::new(ctx);
    match headers(&ctx, ip_off, l4_off, family) {
        Some((ip, tcp)) if refresh_due(ip, tcp, family) => REFRESH,
        _ => ANSWER,
    }
}

/// Turns the SYN at `ip_off`/`l4_off` into a SYN-ACK carrying a cookie
/// (see [`synack`]): 1 if it did, 0 if the frame cannot be answered.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn guard_syn_ack(ctx: *mut xdp_md, ip_off: u32, l4_off: u32, family: u32) -> u32 {
    let ctx = XdpContext::new(ctx);
    if synack(&ctx, ip_off, l4_off, family).is_none() {
        return 0;
    }
    note_sent();
    1
}

/// 1 if the pure ACK at `ip_off`/`l4_off` is addressed to a protected port
/// and carries a valid cookie, else 0. Checked only within
/// [`COOKIE_ACK_WINDOW_NS`] of a cookie sent.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn guard_cookie_ack(ctx: *mut xdp_md, ip_off: u32, l4_off: u32, family: u32) -> u32 {
    let last = match COOKIE_CLOCK.get(0) {
        Some(last) if *last != 0 => *last,
        _ => return 0,
    };
    // SAFETY: the clock helper has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(last) > COOKIE_ACK_WINDOW_NS {
        return 0;
    }
    let ctx = XdpContext::new(ctx);
    let Some((ip, tcp)) = headers(&ctx, ip_off, l4_off, family) else {
        return 0;
    };
    // Any protected listener on the port will do: a cookie is checked, not
    // trusted, and the port table is one array read.
    if PORTS
        .get(u32::from(be16(tcp, 2)))
        .is_none_or(|e| e.flags == 0)
    {
        return 0;
    }
    // SAFETY: `ip` points at 40 bytes (a whole IPv6 header, or an IPv4
    // header and more) and `tcp` at 20, both proven inside the frame; the
    // helpers only read them.
    let rc = unsafe {
        if family == FAMILY_V4 {
            bpf_tcp_raw_check_syncookie_ipv4(ip.cast_mut().cast(), tcp.cast_mut().cast())
        } else {
            bpf_tcp_raw_check_syncookie_ipv6(ip.cast_mut().cast(), tcp.cast_mut().cast())
        }
    };
    u32::from(rc == 0)
}

/// The IP and TCP headers at the caller's offsets. A global function is
/// checked without knowing its arguments, so they are bounded here before
/// any header is read. The IP header is proven 40 bytes long in either
/// family (an IPv4 header is followed by at least 20 of TCP): proving it
/// per family would not do, as the verifier loses which family a copy of
/// the argument holds.
#[inline(always)]
fn headers(
    ctx: &XdpContext,
    ip_off: u32,
    l4_off: u32,
    family: u32,
) -> Option<(*const [u8; IPV6_HLEN], *const [u8; 20])> {
    let (off, l4) = (ip_off as usize, l4_off as usize);
    if off > MAX_IP_OFF || l4 > MAX_L4_OFF || (family != FAMILY_V4 && family != FAMILY_V6) {
        return None;
    }
    Some((ptr_at(ctx, off)?, ptr_at(ctx, l4)?))
}

/// Whether this SYN goes to the kernel to keep its listener accepting
/// cookie ACKs: the first for the listener, or the first after the
/// interval. Only the CPU that wins the swap passes its SYN.
#[inline(always)]
fn refresh_due(ip: *const [u8; IPV6_HLEN], tcp: *const [u8; 20], family: u32) -> bool {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: the scratch value lives as long as the program runs and
    // only this CPU uses it.
    let key = unsafe { &mut (*scratch).key };
    listener_key(key, ip, be16(tcp, 2), family);
    // SAFETY: nothing else holds the scratch key while it is read.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    match COOKIE_REFRESH.get_ptr_mut(&*key) {
        Some(last) => {
            // SAFETY: a u64 map value, 8-byte aligned, alive while the
            // program runs.
            let seen = unsafe { last.read_volatile() };
            now.wrapping_sub(seen) >= COOKIE_REFRESH_INTERVAL_NS && cas(last, seen, now).is_ok()
        }
        None => COOKIE_REFRESH.insert(&*key, &now, BPF_NOEXIST).is_ok(),
    }
}

/// Writes into `key` the protected listener entry a SYN matched, as
/// `protected` finds it: its own address when that is protected, else the
/// family's wildcard.
#[inline(always)]
fn listener_key(key: &mut ListenerKey, ip: *const [u8; IPV6_HLEN], port: u16, family: u32) {
    key.family = family;
    key.port = u32::from(port);
    let (flag, at, len) = if family == FAMILY_V4 {
        (PORT_SPECIFIC_V4, 16, 4)
    } else {
        (PORT_SPECIFIC_V6, 24, 16)
    };
    let mut i = 0;
    while i < 16 {
        key.addr[i] = if i < len { byte(ip, at + i) } else { 0 };
        i += 1;
    }
    // SAFETY: plain data, only tested for presence.
    let specific = PORTS
        .get(u32::from(port))
        .is_some_and(|e| e.flags & flag != 0)
        && unsafe { LISTENERS.get(&*key) }.is_some();
    if !specific {
        key.addr = [0; 16];
    }
}

/// Remembers that a cookie was sent, for [`guard_cookie_ack`]: written
/// only when the stored time is a step old, so a flood rarely writes the
/// shared line.
#[inline(always)]
fn note_sent() {
    // SAFETY: the clock helper has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(last) = COOKIE_CLOCK.get_ptr_mut(0) {
        // SAFETY: a u64 array value, 8-byte aligned, alive while the
        // program runs; a lost race only delays the time by a step.
        unsafe {
            if now.wrapping_sub(last.read_volatile()) >= COOKIE_CLOCK_STEP_NS {
                last.write_volatile(now);
            }
        }
    }
}

/// Turns the SYN in the frame into a SYN-ACK carrying a cookie: MACs,
/// addresses and ports swapped, a fresh IP header, a 24-byte TCP header,
/// both checksums computed. `None` when the frame cannot be answered (it
/// may then be half rewritten: it is dropped).
#[inline(always)]
fn synack(ctx: &XdpContext, ip_off: u32, l4_off: u32, family: u32) -> Option<()> {
    let (ip, tcp) = headers(ctx, ip_off, l4_off, family)?;
    let v4 = family == FAMILY_V4;
    let l4 = l4_off as usize;
    // IPv4 without options, IPv6 without extension headers: the TCP header
    // follows the IP header's fixed part.
    let answerable = if v4 {
        l4 == ip_off as usize + IPV4_HLEN && byte(ip, 0) == 0x45
    } else {
        l4 == ip_off as usize + IPV6_HLEN && byte(ip, 6) == IPPROTO_TCP
    };
    if !answerable {
        return None;
    }
    // A data offset below 5 is malformed: the helper refuses the header,
    // whose length then differs from the offset's.
    let th_len = (u32::from(byte(tcp, 12) >> 4) * 4).max(20);
    // The helper reads `th_len` bytes, a length the verifier only accepts
    // for memory it can bound: a copy, in a per-CPU map rather than on the
    // stack, which the caller's frame leaves little of.
    // SAFETY: only this CPU uses its scratch value.
    let th = unsafe { &raw mut (*SCRATCH.get_ptr_mut(0)?).th }.cast::<u8>();
    // SAFETY: the scratch value holds 64 ≥ th_len bytes; the helper checks
    // the frame's bounds itself.
    if unsafe { bpf_xdp_load_bytes(ctx.ctx, l4 as u32, th.cast(), th_len) } != 0 {
        return None;
    }
    // SAFETY: `ip` points at the whole IP header, proven inside the frame;
    // `th` at th_len bytes of TCP header. Both are only read.
    let made = unsafe {
        if v4 {
            bpf_tcp_raw_gen_syncookie_ipv4(ip.cast_mut().cast(), th.cast(), th_len)
        } else {
            bpf_tcp_raw_gen_syncookie_ipv6(ip.cast_mut().cast(), th.cast(), th_len)
        }
    };
    if made < 0 {
        return None;
    }
    let cookie = made as u32;
    let mss = (made >> 32) as u16;

    // The headers are rewritten in place; only the MSS option may lie past
    // the SYN's end, so it is written after the frame is resized (which
    // invalidates every pointer into it). Sums of the addresses do not
    // depend on their order: taken before they are swapped.
    let addr_sum = if v4 {
        sum16(ip, 12, 4)
    } else {
        sum16(ip, 8, 16)
    };
    let eth = ptr_at::<[u8; 12]>(ctx, 0)?.cast_mut();
    swap(eth, 0, 6, 6);
    let ip = ip.cast_mut();
    if v4 {
        let total = (IPV4_HLEN + SYNACK_HLEN) as u16;
        put16(ip, 0, 0x4500);
        put16(ip, 2, total);
        put16(ip, 4, 0);
        put16(ip, 6, 0x4000); // don't fragment
        put16(ip, 8, (u16::from(TTL) << 8) | u16::from(IPPROTO_TCP));
        let sum = addr_sum
            + 0x4500
            + u64::from(total)
            + 0x4000
            + ((u64::from(TTL) << 8) | u64::from(IPPROTO_TCP));
        put16(ip, 10, fold(sum));
        swap(ip, 12, 16, 4);
    } else {
        put16(ip, 0, 0x6000);
        put16(ip, 2, 0);
        put16(ip, 4, SYNACK_HLEN as u16);
        put16(ip, 6, (u16::from(IPPROTO_TCP) << 8) | u16::from(TTL));
        swap(ip, 8, 24, 16);
    }

    let client_port = be16(tcp, 0);
    let server_port = be16(tcp, 2);
    let ack = be32(tcp, 4).wrapping_add(1);
    // Data offset 6 words; SYN and ACK.
    let offset_flags: u16 = ((SYNACK_HLEN as u16 / 4) << 12) | 0x12;
    let mss_option: u16 = 0x0204;
    // The pseudo-header (addresses, protocol, TCP length), then the segment.
    let sum = addr_sum
        + u64::from(IPPROTO_TCP)
        + SYNACK_HLEN as u64
        + u64::from(server_port)
        + u64::from(client_port)
        + u64::from(cookie >> 16)
        + u64::from(cookie & 0xffff)
        + u64::from(ack >> 16)
        + u64::from(ack & 0xffff)
        + u64::from(offset_flags)
        + u64::from(WINDOW)
        + u64::from(mss_option)
        + u64::from(mss);
    let seg = tcp.cast_mut();
    put16(seg, 0, server_port);
    put16(seg, 2, client_port);
    put16(seg, 4, (cookie >> 16) as u16);
    put16(seg, 6, cookie as u16);
    put16(seg, 8, (ack >> 16) as u16);
    put16(seg, 10, ack as u16);
    put16(seg, 12, offset_flags);
    put16(seg, 14, WINDOW);
    put16(seg, 16, fold(sum));
    put16(seg, 18, 0);

    // The verifier allows no arithmetic on the frame's end: ask its length.
    // SAFETY: the helper only reads the context.
    let old_len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as usize;
    let new_len = l4 + SYNACK_HLEN;
    // SAFETY: resizing the frame is what the helper is for; the pointer to
    // the option is derived afresh below.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, new_len as i32 - old_len as i32) } != 0 {
        return None;
    }
    let option = ptr_at::<[u8; 4]>(ctx, l4 + 20)?.cast_mut();
    put16(option, 0, mss_option);
    put16(option, 2, mss);
    Some(())
}

/// Sum of `words` big-endian 16-bit words from byte `at` of a header
/// (callers pass constants, so the verifier sees every read bounded).
#[inline(always)]
fn sum16<const N: usize>(h: *const [u8; N], at: usize, words: usize) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < words {
        sum += u64::from(be16(h, at + 2 * i));
        i += 1;
    }
    sum
}

/// Swaps `len` bytes at `a` with as many at `b` of a bounds-checked header.
#[inline(always)]
fn swap<const N: usize>(h: *mut [u8; N], a: usize, b: usize, len: usize) {
    let mut i = 0;
    while i < len {
        let x = byte(h.cast_const(), a + i);
        set(h, a + i, byte(h.cast_const(), b + i));
        set(h, b + i, x);
        i += 1;
    }
}

/// Writes a big-endian u16 at `i` of a bounds-checked header.
#[inline(always)]
fn put16<const N: usize>(h: *mut [u8; N], i: usize, v: u16) {
    set(h, i, (v >> 8) as u8);
    set(h, i + 1, v as u8);
}

/// Folds a one's-complement sum to 16 bits and complements it. Four
/// folds cover any sum of fewer than 2^32 words.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    let mut i = 0;
    while i < 4 {
        sum = (sum & 0xffff) + (sum >> 16);
        i += 1;
    }
    !(sum as u16)
}

/// Writes one byte at `i` of a bounds-checked header.
#[inline(always)]
fn set<const N: usize>(h: *mut [u8; N], i: usize, v: u8) {
    // SAFETY: callers pass indices below N into a header whose N bytes
    // `ptr_at` proved to be inside the frame, which XDP may write.
    unsafe { *h.cast::<u8>().add(i) = v }
}

/// A big-endian u32 at `i` of a bounds-checked header.
#[inline(always)]
fn be32<const N: usize>(h: *const [u8; N], i: usize) -> u32 {
    (u32::from(be16(h, i)) << 16) | u32::from(be16(h, i + 2))
}
