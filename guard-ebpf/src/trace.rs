//! `guard xdp trace`: the verdict on each SYN from a traced prefix, logged
//! through aya-log for the daemon to forward ("why was my client
//! dropped?").
//!
//! Off unless the daemon wrote a rule: the program tests two config flags
//! it already holds and calls nothing. With a rule for the source's prefix
//! in force, a line costs a token of the rule's lines-per-second bucket
//! (so a traced flood cannot flood the log ring), and the rule ends by
//! itself at its expiry even if the daemon that wrote it is gone.
//!
//! The work is in global functions ([`guard_trace_note`],
//! [`guard_trace`]), verified once rather than once per path through the
//! budgets; what they need is handed over in a per-CPU scratch value,
//! since a BPF call takes five arguments at most. aya-log writes to its
//! ring buffer without the context (its macros take one and ignore it), so
//! [`guard_trace`] takes none: an argument a function never reads is
//! dropped by the linker, and the verifier would then see a call without
//! the context it was declared with.

use aya_ebpf::{
    bindings::xdp_md,
    macros::map,
    maps::{
        PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::XdpContext,
};
use aya_log_ebpf::info;
use guard_common::{
    CONFIG_HAS_TRACE_V4, CONFIG_HAS_TRACE_V6, Counter, FAMILY_V4, RateLimit, TRACE_CAPACITY,
    TraceRule, gcra_tokens,
};

use crate::{Judged, L3, Syn, byte, charge, cookies::MAX_IP_OFF, ptr_at};

#[map(name = "GUARD_TRACE_V4")]
static TRACE_V4: LpmTrie<[u8; 4], TraceRule> = LpmTrie::pinned(TRACE_CAPACITY, 0);
#[map(name = "GUARD_TRACE_V6")]
static TRACE_V6: LpmTrie<[u8; 16], TraceRule> = LpmTrie::pinned(TRACE_CAPACITY, 0);

/// What a trace line says, handed to [`guard_trace`].
#[repr(C)]
struct Facts {
    /// The source, unmasked (IPv4 in the first four bytes).
    addr: [u8; 16],
    family: u32,
    port: u32,
    /// A [`Counter`] naming the verdict.
    verdict: u32,
    tenant: u32,
    verified: u32,
    /// The config's flags.
    flags: u32,
    /// Tokens left in the source's bucket, `u64::MAX` if none was charged
    /// or it is unlimited; counted from the next two.
    tokens: u64,
    tat: u64,
    limit: RateLimit,
    now: u64,
}

/// Scratch memory for [`Facts`] (not pinned: nothing to keep).
#[map(name = "GUARD_TRACE_SCRATCH")]
static SCRATCH: PerCpuArray<Facts> = PerCpuArray::with_max_entries(1, 0);

/// Notes what a trace line would say of a judged SYN; called only while
/// a trace flag is set, and before SYN cookies may rewrite the frame. Only
/// plain stores here: the address is copied and the tokens are counted in
/// [`guard_trace_note`], so the verifier walks no extra branch per path.
#[inline(always)]
pub(crate) fn prepare(ctx: &XdpContext, l3: &L3, port: u16, syn: &Syn) {
    let Some(f) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU value is only used by this CPU, and nothing else
    // runs on it between these writes and `guard_trace`'s read.
    unsafe {
        (*f).family = l3.family;
        (*f).port = u32::from(port);
        (*f).verdict = syn.verdict as u32;
        (*f).tenant = syn.tenant;
        (*f).verified = u32::from(syn.verified);
        (*f).flags = syn.flags;
        (*f).tat = syn.source_tat;
        (*f).limit = syn.source_limit;
        (*f).now = syn.now;
    }
    guard_trace_note(ctx.ctx, l3.off as u32, l3.family);
}

/// Logs the SYN [`prepare`] noted, with what was done with it, if a trace
/// rule covers its source.
#[inline(always)]
pub(crate) fn emit(judged: &Judged) {
    let action = if judged.also == Some(Counter::CookieRefresh) {
        ACTION_REFRESH
    } else {
        judged.action
    };
    guard_trace(action);
}

/// Copies the source address of the IP header at `ip_off` into the
/// scratch value and counts the source bucket's tokens; 0 if the header
/// is not in the frame (the line then shows no address).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn guard_trace_note(ctx: *mut xdp_md, ip_off: u32, family: u32) -> u32 {
    let Some(f) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let ctx = XdpContext::new(ctx);
    // SAFETY: see `prepare`.
    let f = unsafe { &mut *f };
    f.tokens = gcra_tokens(&f.limit, f.tat, f.now);
    f.addr = [0; 16];
    let off = ip_off as usize;
    // Bounded for the verifier, which must prove the read inside the frame.
    if off > MAX_IP_OFF {
        return 0;
    }
    if family == FAMILY_V4 {
        let Some(h) = ptr_at::<[u8; 20]>(&ctx, off) else {
            return 0;
        };
        f.addr[..4].copy_from_slice(&[byte(h, 12), byte(h, 13), byte(h, 14), byte(h, 15)]);
    } else {
        let Some(h) = ptr_at::<[u8; 40]>(&ctx, off) else {
            return 0;
        };
        let mut i = 0;
        while i < 16 {
            f.addr[i] = byte(h, 8 + i);
            i += 1;
        }
    }
    1
}

/// The action a trace line shows for a SYN let through to refresh its
/// listener's cookies.
const ACTION_REFRESH: u32 = guard_common::TRACE_ACTION_REFRESH;

/// Logs the SYN described in the scratch value if a rule in force covers
/// its source and the rule's bucket has a token; 1 if it logged.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn guard_trace(action: u32) -> u32 {
    let Some(f) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: see `prepare`.
    let f = unsafe { &*f };
    let v4 = f.family == FAMILY_V4;
    let rule = if v4 {
        if f.flags & CONFIG_HAS_TRACE_V4 == 0 {
            return 0;
        }
        TRACE_V4.get(Key::new(32, [f.addr[0], f.addr[1], f.addr[2], f.addr[3]]))
    } else {
        if f.flags & CONFIG_HAS_TRACE_V6 == 0 {
            return 0;
        }
        TRACE_V6.get(Key::new(128, f.addr))
    };
    let Some(rule) = rule else {
        return 0;
    };
    if !rule.active(f.now) {
        return 0;
    }
    let limit = rule.limit;
    let id = rule.id;
    // The bucket is the rule's own: every CPU tracing the prefix spends it
    // with compare-and-swap, as a SYN bucket is spent.
    let rule = (rule as *const TraceRule).cast_mut();
    // SAFETY: `rule` points into a live map value.
    if !charge(unsafe { &raw mut (*rule).state }, &limit, f.now) {
        return 0;
    }
    // Numbers only, in one record: every string or enum argument costs
    // the verifier a branch per path. The daemon names them (see its
    // `ebpf::trace`); an IPv4 address is in the first four bytes.
    let (family, addr, port, verdict) = (f.family, f.addr, f.port, f.verdict);
    let (tenant, verified, tokens) = (f.tenant, f.verified, f.tokens);
    info!(
        &(),
        target: "guard::trace",
        "trace={} family={} src={:i} port={} verdict={} action={} tenant={} verified={} tokens={}",
        id, family, addr, port, verdict, action, tenant, verified, tokens
    );
    1
}
