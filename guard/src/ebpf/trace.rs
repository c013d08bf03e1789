//! `guard xdp trace`, the daemon's side: trace rules written into the
//! pinned tries, and the lines the XDP program logs for them read back
//! through aya-log, named, and kept for the admin endpoint.
//!
//! The program logs numbers only (`trace= family= src= port= verdict=
//! action= tenant= verified= tokens=`, see `guard-ebpf/src/trace.rs`):
//! names would cost the verifier a branch per path. [`TraceLog`] turns
//! them into a readable line, sends it to the daemon's log (target
//! `guard::trace`) and into a [`TraceRing`] of the last [`RING_LINES`]
//! lines, which `GET /trace?since=SEQ` pages through.
//!
//! Everything is bounded: at most [`TRACE_CAPACITY`] rules per family, each
//! for at most [`MAX_TRACE_SECS`] and [`LINES_PER_SEC`] lines a second (the
//! program enforces both, so a trace ends even if the daemon is gone), and
//! a ring of fixed length.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use aya::Ebpf;
use guard_common::{Counter, FAMILY_V4, TRACE_ACTION_REFRESH, TRACE_CAPACITY};
use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::maps::{GuardMaps, monotonic_ns};
use crate::{cidr::Cidr, paths::Paths};

/// Lines kept for `GET /trace`: at the program's rate limit, many seconds
/// of every trace together, far more than a client polling every 250 ms
/// needs.
pub const RING_LINES: usize = 1000;

/// Lines a second the program logs per trace rule (bursts of as many).
pub const LINES_PER_SEC: u64 = 50;

/// Longest trace, in seconds.
pub const MAX_TRACE_SECS: u64 = 600;

/// A trace's length when none is asked for, in seconds.
pub const DEFAULT_TRACE_SECS: u64 = 30;

/// Lines one `GET /trace` returns at most.
pub const MAX_LINES_PER_ANSWER: usize = 500;

/// A trace line, as the admin endpoint serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceLine {
    /// Position in the daemon's ring, from 1, increasing.
    pub seq: u64,
    /// When the daemon read it (Unix milliseconds).
    pub unix_ms: u64,
    /// The trace rule that matched (its id, as `POST /trace` answered).
    pub trace: u32,
    /// The SYN's source.
    pub source: IpAddr,
    /// The listener's port.
    pub port: u16,
    /// The decision, a counter label (`admitted`, `drop_source`, …).
    pub verdict: String,
    /// What was done with the SYN: `pass`, `drop`, `cookie` (a SYN-ACK
    /// sent from XDP), `refresh` (passed to keep the listener's cookies
    /// fresh).
    pub action: String,
    /// The tenant whose budget applied (0 for the shared budget).
    pub tenant: u32,
    /// Whether the source is verified (skips the shared and host budgets).
    pub verified: bool,
    /// Tokens left in the source's bucket; `None` when no source bucket
    /// was charged or it is unlimited.
    pub tokens: Option<u64>,
    /// The whole line, as the daemon logs it.
    pub text: String,
}

/// The numbers one record of the program carries.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fields {
    trace: u32,
    source: IpAddr,
    port: u16,
    verdict: u32,
    action: u32,
    tenant: u32,
    verified: bool,
    tokens: u64,
}

/// Parses a record's message; `None` if it is not a trace line (or is
/// malformed: the record crossed a kernel boundary, so it is input).
fn parse(msg: &str) -> Option<Fields> {
    let mut trace = None;
    let mut family = None;
    let mut src = None;
    let mut port = None;
    let mut verdict = None;
    let mut action = None;
    let mut tenant = None;
    let mut verified = None;
    let mut tokens = None;
    for pair in msg.split_ascii_whitespace() {
        let (k, v) = pair.split_once('=')?;
        match k {
            "trace" => trace = Some(v.parse::<u32>().ok()?),
            "family" => family = Some(v.parse::<u32>().ok()?),
            "src" => src = Some(v),
            "port" => port = Some(v.parse::<u16>().ok()?),
            "verdict" => verdict = Some(v.parse::<u32>().ok()?),
            "action" => action = Some(v.parse::<u32>().ok()?),
            "tenant" => tenant = Some(v.parse::<u32>().ok()?),
            "verified" => verified = Some(v.parse::<u32>().ok()? != 0),
            "tokens" => tokens = Some(v.parse::<u64>().ok()?),
            _ => return None,
        }
    }
    // The program hands over 16 bytes whatever the family (one argument
    // type is one verifier path), which aya-log prints as IPv6; an IPv4
    // source is in the first four.
    let raw: Ipv6Addr = src?.parse().ok()?;
    let source = if family? == FAMILY_V4 {
        let o = raw.octets();
        IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3]))
    } else {
        IpAddr::V6(raw)
    };
    Some(Fields {
        trace: trace?,
        source,
        port: port?,
        verdict: verdict?,
        action: action?,
        tenant: tenant?,
        verified: verified?,
        tokens: tokens?,
    })
}

fn verdict_label(v: u32) -> String {
    Counter::ALL
        .get(v as usize)
        .map_or_else(|| format!("verdict#{v}"), |c| c.label().to_owned())
}

fn action_label(a: u32) -> String {
    match a {
        1 => "drop".into(),
        2 => "pass".into(),
        3 => "cookie".into(),
        TRACE_ACTION_REFRESH => "refresh".into(),
        other => format!("action#{other}"),
    }
}

fn describe(f: &Fields) -> TraceLine {
    let verdict = verdict_label(f.verdict);
    let action = action_label(f.action);
    let tokens = (f.tokens != u64::MAX).then_some(f.tokens);
    let text = format!(
        "trace {}: SYN from {} to port {}: {} ({}), tenant {:#x}, {}, source tokens left {}",
        f.trace,
        f.source,
        f.port,
        verdict,
        action,
        f.tenant,
        if f.verified { "verified" } else { "unverified" },
        tokens.map_or_else(|| "-".to_owned(), |t| t.to_string()),
    );
    TraceLine {
        seq: 0,
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        trace: f.trace,
        source: f.source,
        port: f.port,
        verdict,
        action,
        tenant: f.tenant,
        verified: f.verified,
        tokens,
        text,
    }
}

/// The last [`RING_LINES`] trace lines, numbered.
#[derive(Debug, Default)]
pub struct TraceRing {
    inner: Mutex<RingInner>,
}

#[derive(Debug, Default)]
struct RingInner {
    lines: VecDeque<TraceLine>,
    last_seq: u64,
}

impl TraceRing {
    /// Appends a line, numbering it; the oldest goes when the ring is full.
    pub fn push(&self, mut line: TraceLine) {
        let mut r = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        r.last_seq += 1;
        line.seq = r.last_seq;
        if r.lines.len() == RING_LINES {
            r.lines.pop_front();
        }
        r.lines.push_back(line);
    }

    /// Lines after `seq` (at most [`MAX_LINES_PER_ANSWER`], oldest first)
    /// and the last sequence number given so far.
    pub fn since(&self, seq: u64) -> (Vec<TraceLine>, u64) {
        let r = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let lines = r
            .lines
            .iter()
            .filter(|l| l.seq > seq)
            .take(MAX_LINES_PER_ANSWER)
            .cloned()
            .collect();
        (lines, r.last_seq)
    }
}

/// The `log::Log` aya-log hands the program's records to.
struct TraceLog {
    ring: Arc<TraceRing>,
}

impl log::Log for TraceLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args().to_string();
        match parse(&msg) {
            Some(f) => {
                let line = describe(&f);
                info!(target: "guard::trace", "{}", line.text);
                self.ring.push(line);
            }
            // Only trace lines are expected; anything else is said as is,
            // never interpreted.
            None => warn!(target: "guard::trace", "unexpected XDP log record: {msg:?}"),
        }
    }

    fn flush(&self) {}
}

/// Reads the log records of the program loaded into `ebpf` (its own
/// `AYA_LOGS` ring buffer: each load creates one, it is not pinned, so
/// this follows exactly the program this process put on the interfaces)
/// until the returned task is aborted. Needs a tokio runtime.
pub fn spawn_logger(
    ebpf: &mut Ebpf,
    ring: Arc<TraceRing>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, TraceLog { ring })
        .context("the XDP object has no aya-log ring buffer")?;
    let fd = logger.as_raw_fd();
    // SAFETY: the logger owns the ring buffer's map and so its descriptor,
    // open until the logger is dropped, and `as_raw_fd` always returns it.
    let mut logger = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("cannot poll the aya-log ring buffer (fd {fd}): {e}"))?;
    Ok(tokio::spawn(async move {
        let mut last_warning: Option<std::time::Instant> = None;
        loop {
            let Ok(mut ready) = logger.readable_mut().await else {
                warn!("the XDP trace log cannot be read any more; traces go unseen");
                return;
            };
            // aya-log 0.3.0 unwraps its parse of each record: a record it
            // cannot read would end the daemon. The record is consumed as
            // the panic unwinds (its ring item is dropped), so flushing
            // again resumes after it; bounded, in case every record fails.
            for _ in 0..64 {
                let flushed = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    ready.get_inner_mut().flush();
                }));
                if flushed.is_ok() {
                    break;
                }
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    warn!("skipped an XDP log record aya-log could not parse");
                    last_warning = Some(std::time::Instant::now());
                }
            }
            ready.clear_ready();
        }
    }))
}

/// A trace started by [`start`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// The rule's id, in its lines.
    pub id: u32,
    /// The prefix traced.
    pub cidr: Cidr,
    /// Seconds it lasts (0: a trace of the prefix was stopped).
    pub secs: u64,
    /// The last line's sequence number when it started: lines after it
    /// are this trace's (or others').
    pub since: u64,
}

/// Starts a trace of `cidr` for `secs` seconds (replacing one of the same
/// prefix), or with `secs == 0` stops the prefix's trace (only if its id
/// is `only_id`, when given: a client ending its own trace leaves a later
/// one of the same prefix alone). At most [`MAX_TRACE_SECS`] and
/// [`TRACE_CAPACITY`] traces per family.
pub fn start(
    maps: &mut GuardMaps,
    cidr: Cidr,
    secs: u64,
    only_id: Option<u32>,
) -> anyhow::Result<Started> {
    if secs > MAX_TRACE_SECS {
        bail!("a trace lasts at most {MAX_TRACE_SECS} s (asked for {secs} s)");
    }
    let rules = maps.trace_rules()?;
    let existing = rules.iter().find(|(c, _)| *c == cidr).map(|(_, r)| r.id);
    if secs == 0 {
        if let Some(id) = existing.filter(|id| only_id.is_none_or(|o| o == *id)) {
            maps.remove_trace(cidr, id)?;
        }
        return Ok(Started {
            id: existing.unwrap_or(0),
            cidr,
            secs: 0,
            since: 0,
        });
    }
    let now = monotonic_ns();
    let same_family = rules
        .iter()
        .filter(|(c, r)| c.addr().is_ipv4() == cidr.addr().is_ipv4() && r.active(now))
        .count();
    if existing.is_none() && same_family >= TRACE_CAPACITY as usize {
        bail!("{TRACE_CAPACITY} traces of this address family run already; wait for one to end");
    }
    // Ids come from the rules in the maps, not from memory: they outlive
    // this process, and a restarted daemon must not reuse a live id.
    let id = rules
        .iter()
        .map(|(_, r)| r.id)
        .max()
        .unwrap_or(0)
        .wrapping_add(1)
        .max(1);
    let expires = now.saturating_add(secs.saturating_mul(1_000_000_000));
    maps.add_trace(cidr, id, LINES_PER_SEC, expires)?;
    Ok(Started {
        id,
        cidr,
        secs,
        since: 0,
    })
}

/// Removes trace rules past their expiry (the program already ignores
/// them) and clears a family's flag once none is left, so a SYN costs a
/// flag test again; returns how many it removed.
pub fn remove_expired(maps: &mut GuardMaps) -> anyhow::Result<usize> {
    let now = monotonic_ns();
    let mut removed = 0;
    for (cidr, rule) in maps.trace_rules()? {
        if !rule.active(now) {
            maps.remove_trace(cidr, rule.id)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Opens the pinned maps for the admin endpoint's `POST /trace`.
pub fn open_maps(paths: &Paths) -> anyhow::Result<GuardMaps> {
    GuardMaps::open(paths).context("the XDP guard's pinned maps cannot be opened")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_ipv4_line() {
        // 10.0.0.2 in the first four of sixteen bytes, as aya-log prints
        // them (an IPv6 address).
        let f = parse(
            "trace=7 family=2 src=a00:2:: port=11211 verdict=6 action=1 tenant=0 verified=0 \
             tokens=0",
        )
        .expect("parsed");
        assert_eq!(f.source, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        let line = describe(&f);
        assert_eq!(line.verdict, Counter::ALL[6].label());
        assert_eq!(line.action, "drop");
        assert_eq!(line.tokens, Some(0));
        assert!(line.text.contains("10.0.0.2"), "{}", line.text);
    }

    #[test]
    fn parses_an_ipv6_line_and_unlimited_tokens() {
        let f = parse(&format!(
            "trace=1 family=10 src=2001:db8::1 port=80 verdict=3 action=2 tenant=5 verified=1 \
             tokens={}",
            u64::MAX
        ))
        .expect("parsed");
        assert_eq!(f.source, "2001:db8::1".parse::<IpAddr>().unwrap());
        let line = describe(&f);
        assert_eq!(line.tokens, None);
        assert!(line.verified);
    }

    #[test]
    fn rejects_what_is_not_a_trace_line() {
        for bad in [
            "",
            "hello",
            "trace=1",
            "trace=x family=2 src=::1 port=1 verdict=1 action=1 tenant=0 verified=0 tokens=0",
            "trace=1 family=2 src=nope port=1 verdict=1 action=1 tenant=0 verified=0 tokens=0",
            "trace=1 family=2 src=::1 port=70000 verdict=1 action=1 tenant=0 verified=0 tokens=0",
            "trace=1 family=2 src=::1 port=1 verdict=1 action=1 tenant=0 verified=0 tokens=0 x=1",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unknown_numbers_are_named_not_trusted() {
        assert_eq!(verdict_label(u32::MAX), format!("verdict#{}", u32::MAX));
        assert_eq!(action_label(42), "action#42");
        assert_eq!(action_label(TRACE_ACTION_REFRESH), "refresh");
    }

    #[test]
    fn the_ring_is_bounded_and_numbered() {
        let ring = TraceRing::default();
        let f = parse(
            "trace=1 family=10 src=::1 port=1 verdict=1 action=2 tenant=0 verified=0 tokens=3",
        )
        .unwrap();
        for _ in 0..RING_LINES + 10 {
            ring.push(describe(&f));
        }
        let (lines, last) = ring.since(0);
        assert_eq!(last, (RING_LINES + 10) as u64);
        assert_eq!(lines.len(), MAX_LINES_PER_ANSWER);
        assert_eq!(lines[0].seq, 11, "the oldest ten were dropped");
        let (lines, _) = ring.since(last - 2);
        assert_eq!(
            lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
            [last - 1, last]
        );
    }
}
