//! Limit events from the XDP program, summarised for operators.
//!
//! The program counts every source that crosses a SYN budget (once per
//! source per second) and describes only a sample of those crossings on
//! the ring buffer: as many as the host's event budget allows. A spoofed
//! flood of millions of new sources therefore reaches the daemon as a few
//! hundred events a second. The daemon never logs per event: each report
//! interval it logs at most one line per budget that dropped SYNs, built
//! from the exact counters (drops, crossings, suppressed and lost events)
//! and from the sample (distinct sources, tenants, the heaviest sources by
//! a space-saving sketch), and it writes the heaviest sources to a state
//! file that `guard xdp status` shows. Single events appear at debug level,
//! at most [`DEBUG_EVENTS_PER_SEC`] a second.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{Map, MapData, RingBuf};
use guard_common::{
    COUNTER_COUNT, Counter, DEFAULT_TENANT, EVENT_GLOBAL_LIMIT, EVENT_SOURCE_LIMIT,
    EVENT_TENANT_LIMIT, FAMILY_V4, LimitEvent, maps,
};
use log::{debug, info, log_enabled, warn};
use serde::{Deserialize, Serialize};
use tokio::{io::unix::AsyncFd, sync::watch};

use super::maps::GuardMaps;
use crate::paths::Paths;

/// Single events logged at debug level per second, at most.
pub const DEBUG_EVENTS_PER_SEC: u32 = 10;
/// Sources the sketch of each budget's heaviest sources tracks.
const TOP_CAPACITY: usize = 64;
/// Sources named in a log line.
const TOP_IN_LOG: usize = 5;
/// Sources written to the state file for `guard xdp status`.
const TOP_IN_STATUS: usize = 20;
/// Distinct sources remembered per budget and interval; beyond it the
/// count is a lower bound.
const DISTINCT_CAPACITY: usize = 16_384;
/// Tenants told apart per budget and interval; the rest are "others".
const TENANT_CAPACITY: usize = 256;
/// Tenants named in a log line.
const TENANTS_IN_LOG: usize = 3;

/// What the reporter needs from the configuration; replaced on reload.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportSettings {
    /// Time between summaries.
    pub interval: Duration,
    /// Tenant names by XDP tenant id.
    pub tenant_names: HashMap<u32, String>,
}

/// The heaviest hitters of a stream, in bounded memory: Metwally et al.'s
/// space-saving algorithm. Any source sent more than `total / capacity`
/// times is present; each count overestimates by at most its `error`.
#[derive(Clone, Debug)]
pub struct TopSources {
    capacity: usize,
    counts: HashMap<IpAddr, Tally>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Tally {
    count: u64,
    error: u64,
}

/// One row of [`TopSources::top`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offender {
    /// The source (IPv6 masked to the configured prefix).
    pub source: IpAddr,
    /// Limit events seen from it (an upper bound).
    pub events: u64,
    /// How much of `events` may belong to sources it displaced.
    pub error: u64,
}

impl TopSources {
    /// A sketch tracking `capacity` sources.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            counts: HashMap::with_capacity(capacity.max(1)),
        }
    }

    /// Counts one event from `source`.
    pub fn add(&mut self, source: IpAddr) {
        if let Some(t) = self.counts.get_mut(&source) {
            t.count += 1;
            return;
        }
        if self.counts.len() < self.capacity {
            self.counts.insert(source, Tally { count: 1, error: 0 });
            return;
        }
        // A linear scan: the capacity is small and events arrive at the
        // event budget's rate at most.
        let Some((&evicted, &min)) = self.counts.iter().min_by_key(|(ip, t)| (t.count, **ip))
        else {
            return;
        };
        self.counts.remove(&evicted);
        self.counts.insert(
            source,
            Tally {
                count: min.count + 1,
                error: min.count,
            },
        );
    }

    /// The `n` heaviest sources, heaviest first (ties by address).
    pub fn top(&self, n: usize) -> Vec<Offender> {
        let mut rows: Vec<Offender> = self
            .counts
            .iter()
            .map(|(ip, t)| Offender {
                source: *ip,
                events: t.count,
                error: t.error,
            })
            .collect();
        rows.sort_by(|a, b| b.events.cmp(&a.events).then(a.source.cmp(&b.source)));
        rows.truncate(n);
        rows
    }

    fn clear(&mut self) {
        self.counts.clear();
    }
}

/// The SYN budgets a source can exhaust, in the order the program charges
/// them.
const BUDGETS: [Budget; 3] = [
    Budget {
        reason: EVENT_SOURCE_LIMIT,
        name: "per-source SYN budgets",
        dropped: Counter::DropSource,
        crossed: Counter::CrossedSource,
    },
    Budget {
        reason: EVENT_TENANT_LIMIT,
        name: "tenant SYN budgets",
        dropped: Counter::DropTenant,
        crossed: Counter::CrossedTenant,
    },
    Budget {
        reason: EVENT_GLOBAL_LIMIT,
        name: "the host's SYN budget",
        dropped: Counter::DropGlobal,
        crossed: Counter::CrossedGlobal,
    },
];

struct Budget {
    reason: u32,
    name: &'static str,
    dropped: Counter,
    crossed: Counter,
}

/// What one interval's events said about one budget.
#[derive(Debug)]
struct Window {
    events: u64,
    distinct: HashSet<IpAddr>,
    distinct_overflow: bool,
    tenants: HashMap<u32, u64>,
    other_tenants: u64,
    top: TopSources,
}

impl Window {
    fn new() -> Self {
        Self {
            events: 0,
            distinct: HashSet::new(),
            distinct_overflow: false,
            tenants: HashMap::new(),
            other_tenants: 0,
            top: TopSources::new(TOP_CAPACITY),
        }
    }

    fn add(&mut self, source: IpAddr, tenant: u32) {
        self.events += 1;
        if self.distinct.len() < DISTINCT_CAPACITY {
            self.distinct.insert(source);
        } else if !self.distinct.contains(&source) {
            self.distinct_overflow = true;
        }
        if let Some(n) = self.tenants.get_mut(&tenant) {
            *n += 1;
        } else if self.tenants.len() < TENANT_CAPACITY {
            self.tenants.insert(tenant, 1);
        } else {
            self.other_tenants += 1;
        }
        self.top.add(source);
    }
}

/// The state file `guard xdp status` reads: the heaviest sources, written
/// by the daemon after each interval that saw limit events.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffenderReport {
    /// Unix time of the report.
    pub updated_unix: u64,
    /// Length of the interval `last_interval` covers, in seconds.
    pub interval_secs: u64,
    /// The heaviest sources of the last interval that had events.
    pub last_interval: Vec<Offender>,
    /// The heaviest sources since the daemon started.
    pub since_start: Vec<Offender>,
}

impl OffenderReport {
    /// Reads the state file; `None` if no daemon has written one.
    pub fn load(paths: &Paths) -> anyhow::Result<Option<Self>> {
        crate::paths::read_state(&paths.offenders_file())
    }
}

/// Aggregates events between summaries.
pub struct EventReport {
    /// Events received since the daemon started, shared with the proxy's
    /// `stats`.
    received: Arc<AtomicU64>,
    windows: [Window; 3],
    interval_top: TopSources,
    since_start: TopSources,
    last_totals: [u64; COUNTER_COUNT as usize],
    debug_second: Option<Instant>,
    debug_shown: u32,
    debug_hidden: u64,
}

impl EventReport {
    /// Starts from the counters as they are now, so that only what happens
    /// from here on is reported.
    pub fn new(totals: [u64; COUNTER_COUNT as usize], received: Arc<AtomicU64>) -> Self {
        Self {
            received,
            windows: [Window::new(), Window::new(), Window::new()],
            interval_top: TopSources::new(TOP_CAPACITY),
            since_start: TopSources::new(TOP_CAPACITY),
            last_totals: totals,
            debug_second: None,
            debug_shown: 0,
            debug_hidden: 0,
        }
    }

    /// Takes one event into the current interval.
    pub fn add(&mut self, event: &LimitEvent, names: &HashMap<u32, String>) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let source = source_ip(event);
        if let Some(i) = BUDGETS.iter().position(|b| b.reason == event.reason) {
            self.windows[i].add(source, event.tenant);
        }
        self.interval_top.add(source);
        self.since_start.add(source);
        if log_enabled!(log::Level::Debug) {
            let now = Instant::now();
            if self
                .debug_second
                .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1))
            {
                self.debug_second = Some(now);
                self.debug_shown = 0;
            }
            if self.debug_shown < DEBUG_EVENTS_PER_SEC {
                self.debug_shown += 1;
                debug!("{}", describe(event, names));
            } else {
                self.debug_hidden += 1;
            }
        }
    }

    /// Ends the interval: returns its summary lines (none if nothing was
    /// dropped) and, when it saw events, the report for the state file.
    pub fn close(
        &mut self,
        totals: &[u64; COUNTER_COUNT as usize],
        settings: &ReportSettings,
        now_unix: u64,
    ) -> (Vec<String>, Option<OffenderReport>) {
        let delta = |c: Counter| totals[c as usize].wrapping_sub(self.last_totals[c as usize]);
        let secs = settings.interval.as_secs().max(1);
        let mut lines = Vec::new();
        let mut any_events = false;
        for (budget, window) in BUDGETS.iter().zip(&self.windows) {
            let dropped = delta(budget.dropped);
            let crossed = delta(budget.crossed);
            any_events |= window.events > 0;
            if dropped == 0 && crossed == 0 && window.events == 0 {
                continue;
            }
            lines.push(budget_line(
                budget,
                window,
                dropped,
                crossed,
                secs,
                &settings.tenant_names,
            ));
        }
        if let Some(line) = cookie_line(&delta, secs) {
            lines.push(line);
        }
        let suppressed = delta(Counter::EventsSuppressed);
        let lost = delta(Counter::EventsLost);
        if suppressed > 0 || lost > 0 {
            lines.push(format!(
                "XDP limit events in the last {secs} s: {} described, {} counted only \
                 (over the event budget), {} lost (ring buffer full)",
                thousands(delta(Counter::EventsSent)),
                thousands(suppressed),
                thousands(lost),
            ));
        }
        if self.debug_hidden > 0 {
            debug!(
                "{} further limit events not shown at debug level",
                thousands(self.debug_hidden)
            );
            self.debug_hidden = 0;
        }
        let report = any_events.then(|| OffenderReport {
            updated_unix: now_unix,
            interval_secs: secs,
            last_interval: self.interval_top.top(TOP_IN_STATUS),
            since_start: self.since_start.top(TOP_IN_STATUS),
        });
        self.last_totals = *totals;
        self.windows = [Window::new(), Window::new(), Window::new()];
        self.interval_top.clear();
        (lines, report)
    }
}

/// "XDP SYN cookies in the last 10 s: 40,000 of the refused SYNs answered
/// with a cookie, …": what SYN cookies did instead of drops, when they did
/// anything.
fn cookie_line(delta: &dyn Fn(Counter) -> u64, secs: u64) -> Option<String> {
    let sent = delta(Counter::CookiesSent);
    let acks = delta(Counter::CookieAcks);
    let refresh = delta(Counter::CookieRefresh);
    let unanswerable = delta(Counter::CookieUnanswerable);
    if sent + acks + refresh + unanswerable == 0 {
        return None;
    }
    let mut line = format!(
        "XDP SYN cookies in the last {secs} s: {} of the refused SYNs answered with a cookie, \
         {} ACK{} with a valid cookie passed to the kernel, {} SYN{} let through so that it keeps \
         accepting them",
        thousands(sent),
        thousands(acks),
        if acks == 1 { "" } else { "s" },
        thousands(refresh),
        if refresh == 1 { "" } else { "s" },
    );
    if unanswerable > 0 {
        line.push_str(&format!(
            ", {} not answerable (IP options or IPv6 extension headers) and dropped",
            thousands(unanswerable)
        ));
    }
    Some(line)
}

/// "XDP per-source SYN budgets: 41,233 SYNs dropped in the last 10 s from
/// 40,901 sources; by tenant: acme 40,000; top sources: …". The source
/// count is exact when every crossing was described, else a range from
/// the sources described to the crossings counted.
fn budget_line(
    budget: &Budget,
    window: &Window,
    dropped: u64,
    crossed: u64,
    secs: u64,
    names: &HashMap<u32, String>,
) -> String {
    let distinct = window.distinct.len() as u64;
    let unreported = crossed.saturating_sub(window.events);
    let sources = if unreported == 0 && !window.distinct_overflow {
        thousands(distinct)
    } else {
        // Past the distinct set's capacity every described event may be
        // another source; every undescribed crossing is one.
        let described = if window.distinct_overflow {
            window.events
        } else {
            distinct
        };
        format!(
            "{}–{}",
            thousands(distinct),
            thousands(described + unreported)
        )
    };
    let mut line = format!(
        "XDP {}: {} SYNs dropped in the last {secs} s from {sources} source{}",
        budget.name,
        thousands(dropped),
        if sources == "1" { "" } else { "s" },
    );
    if !window.tenants.is_empty() {
        let mut tenants: Vec<(&u32, &u64)> = window.tenants.iter().collect();
        tenants.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let mut parts: Vec<String> = tenants
            .iter()
            .take(TENANTS_IN_LOG)
            .map(|(id, n)| format!("{} {}", tenant_name(**id, names), thousands(**n)))
            .collect();
        let rest: u64 = tenants
            .iter()
            .skip(TENANTS_IN_LOG)
            .map(|(_, n)| **n)
            .sum::<u64>()
            + window.other_tenants;
        if rest > 0 {
            parts.push(format!("others {}", thousands(rest)));
        }
        line.push_str("; by tenant: ");
        line.push_str(&parts.join(", "));
    }
    // Only sources the sketch vouches for: in a spoofed flood its counts
    // are mostly the error inherited from evicted sources.
    let top: Vec<String> = window
        .top
        .top(TOP_CAPACITY)
        .into_iter()
        .filter(|o| o.error == 0 || o.events - o.error >= 2)
        .take(TOP_IN_LOG)
        .map(|o| {
            if o.error == 0 {
                format!("{} ({})", o.source, thousands(o.events))
            } else {
                format!("{} (≥{})", o.source, thousands(o.events - o.error))
            }
        })
        .collect();
    if !top.is_empty() {
        line.push_str("; top sources: ");
        line.push_str(&top.join(", "));
    } else if window.events > 0 {
        line.push_str("; no source stands out");
    }
    line
}

fn tenant_name(id: u32, names: &HashMap<u32, String>) -> String {
    if id == DEFAULT_TENANT {
        return "unattributed".into();
    }
    names
        .get(&id)
        .cloned()
        .unwrap_or_else(|| format!("tenant {id:#x}"))
}

/// 41233 → "41,233".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn source_ip(e: &LimitEvent) -> IpAddr {
    if e.source.family == FAMILY_V4 {
        Ipv4Addr::new(
            e.source.addr[0],
            e.source.addr[1],
            e.source.addr[2],
            e.source.addr[3],
        )
        .into()
    } else {
        Ipv6Addr::from(e.source.addr).into()
    }
}

/// One event, for the debug log.
pub fn describe(e: &LimitEvent, names: &HashMap<u32, String>) -> String {
    let what = match e.reason {
        EVENT_SOURCE_LIMIT => "its own SYN budget",
        EVENT_TENANT_LIMIT => "its tenant's SYN budget",
        EVENT_GLOBAL_LIMIT => "the host's SYN budget",
        _ => "a SYN budget",
    };
    format!(
        "source {} exceeded {what} on port {} ({}); dropping its SYNs",
        source_ip(e),
        e.port,
        tenant_name(e.tenant, names),
    )
}

/// Reads limit events until the ring buffer fails, and logs a summary
/// every interval.
pub async fn watch_events(
    paths: Paths,
    mut settings: watch::Receiver<ReportSettings>,
    received: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let path = paths.map_pin(maps::EVENTS);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("cannot open pinned ring buffer {}", path.display()))?;
    let ring: RingBuf<MapData> = Map::from_map_data(data)?.try_into()?;
    // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd
    // owns the ring buffer, and always reports that same fd.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot poll the event ring buffer: {e}"))?;
    let maps = GuardMaps::open(&paths)?;
    let mut report = EventReport::new(maps.counter_totals()?, received);
    let mut interval = settings.borrow().interval;
    let mut tick = new_tick(interval);
    loop {
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut guard = ready?;
                let names = settings.borrow();
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() < std::mem::size_of::<LimitEvent>() {
                        continue;
                    }
                    // SAFETY: the kernel wrote a whole LimitEvent; read it unaligned.
                    let event: LimitEvent =
                        unsafe { item.as_ptr().cast::<LimitEvent>().read_unaligned() };
                    report.add(&event, &names.tenant_names);
                }
                guard.clear_ready();
            }
            _ = tick.tick() => {
                let totals = match maps.counter_totals() {
                    Ok(t) => t,
                    Err(e) => {
                        warn!("cannot read the XDP counters for the drop summary: {e:#}");
                        continue;
                    }
                };
                let current = settings.borrow().clone();
                let (lines, offenders) = report.close(&totals, &current, super::unix_now());
                for line in lines {
                    info!("{line}");
                }
                if let Some(offenders) = offenders
                    && let Err(e) = crate::paths::write_state(&paths.offenders_file(), &offenders)
                {
                    warn!("cannot record the heaviest sources: {e:#}");
                }
                if current.interval != interval {
                    interval = current.interval;
                    tick = new_tick(interval);
                }
            }
            changed = settings.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

fn new_tick(interval: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

#[cfg(test)]
mod tests {
    use guard_common::SourceKey;

    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        Ipv4Addr::new(a, b, c, d).into()
    }

    fn event(ip: [u8; 4], reason: u32, tenant: u32) -> LimitEvent {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&ip);
        LimitEvent {
            source: SourceKey {
                addr,
                family: FAMILY_V4,
            },
            reason,
            tenant,
            port: 11211,
            time_ns: 1,
        }
    }

    fn settings() -> ReportSettings {
        ReportSettings {
            interval: Duration::from_secs(10),
            tenant_names: HashMap::from([(7, "acme".to_string())]),
        }
    }

    fn totals(pairs: &[(Counter, u64)]) -> [u64; COUNTER_COUNT as usize] {
        let mut t = [0; COUNTER_COUNT as usize];
        for (c, v) in pairs {
            t[*c as usize] = *v;
        }
        t
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(41_233), "41,233");
        assert_eq!(thousands(7_012_345), "7,012,345");
    }

    #[test]
    fn space_saving_keeps_heavy_hitters_in_bounded_memory() {
        let mut top = TopSources::new(TOP_CAPACITY);
        // Three heavy sources among 10,000 sources seen once each: each
        // above total / capacity, so each is guaranteed a place.
        for i in 0..10_000u32 {
            top.add(v4(10, (i >> 16) as u8, (i >> 8) as u8, i as u8));
            if i % 10 == 0 {
                top.add(v4(192, 0, 2, 1));
            }
            if i % 20 == 0 {
                top.add(v4(192, 0, 2, 2));
            }
            if i % 40 == 0 {
                top.add(v4(192, 0, 2, 3));
            }
        }
        assert_eq!(top.counts.len(), TOP_CAPACITY);
        let rows = top.top(3);
        let sources: Vec<IpAddr> = rows.iter().map(|o| o.source).collect();
        assert_eq!(
            sources,
            [v4(192, 0, 2, 1), v4(192, 0, 2, 2), v4(192, 0, 2, 3)]
        );
        // Counts never undercount, and overcount by at most their error.
        for (o, truth) in rows.iter().zip([1_000, 500, 250]) {
            assert!(o.events >= truth && o.events - o.error <= truth, "{o:?}");
        }
    }

    #[test]
    fn summary_is_exact_when_every_crossing_was_described() {
        let mut r = EventReport::new(totals(&[]), Arc::default());
        let names = settings().tenant_names;
        for i in 0..3u8 {
            r.add(&event([10, 0, 0, i], EVENT_SOURCE_LIMIT, 7), &names);
        }
        r.add(&event([10, 0, 0, 0], EVENT_SOURCE_LIMIT, 7), &names);
        let t = totals(&[(Counter::DropSource, 41_233), (Counter::CrossedSource, 4)]);
        let (lines, report) = r.close(&t, &settings(), 100);
        assert_eq!(
            lines,
            [
                "XDP per-source SYN budgets: 41,233 SYNs dropped in the last 10 s from 3 sources; \
              by tenant: acme 4; top sources: 10.0.0.0 (2), 10.0.0.1 (1), 10.0.0.2 (1)"
            ]
        );
        let report = report.expect("events seen");
        assert_eq!(report.last_interval[0].source, v4(10, 0, 0, 0));
        assert_eq!(report.since_start.len(), 3);
        // The next interval starts from these counters: nothing new, no line.
        let (lines, report) = r.close(&t, &settings(), 110);
        assert!(lines.is_empty(), "{lines:?}");
        assert!(report.is_none());
    }

    #[test]
    fn suppressed_crossings_make_the_source_count_a_range() {
        let mut r = EventReport::new(totals(&[(Counter::DropGlobal, 5)]), Arc::default());
        let names = settings().tenant_names;
        // One heavy source among 200 seen once.
        for i in 0..200u8 {
            r.add(&event([203, 0, 113, i], EVENT_GLOBAL_LIMIT, 0), &names);
            if i % 10 == 0 {
                r.add(&event([198, 51, 100, 1], EVENT_GLOBAL_LIMIT, 0), &names);
            }
        }
        let t = totals(&[
            (Counter::DropGlobal, 5 + 7_000_000),
            (Counter::CrossedGlobal, 40_901),
            (Counter::EventsSent, 220),
            (Counter::EventsSuppressed, 40_681),
        ]);
        let (lines, _) = r.close(&t, &settings(), 100);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with(
                "XDP the host's SYN budget: 7,000,000 SYNs dropped in the last 10 s \
                 from 201–40,882 sources; by tenant: unattributed 220; \
                 top sources: 198.51.100.1 (20)"
            ),
            "{}",
            lines[0]
        );
        // Sources the sketch cannot vouch for are not named.
        assert!(!lines[0].contains("(1)"), "{}", lines[0]);
        assert_eq!(
            lines[1],
            "XDP limit events in the last 10 s: 220 described, 40,681 counted only \
             (over the event budget), 0 lost (ring buffer full)"
        );
    }

    #[test]
    fn what_syn_cookies_did_is_one_more_line() {
        let mut r = EventReport::new(totals(&[]), Arc::default());
        let t = totals(&[
            (Counter::DropGlobal, 50_000),
            (Counter::CookiesSent, 49_999),
            (Counter::CookieRefresh, 1),
            (Counter::CookieAcks, 20),
        ]);
        let (lines, _) = r.close(&t, &settings(), 100);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("50,000 SYNs dropped"), "{}", lines[0]);
        assert_eq!(
            lines[1],
            "XDP SYN cookies in the last 10 s: 49,999 of the refused SYNs answered with a \
             cookie, 20 ACKs with a valid cookie passed to the kernel, 1 SYN let through so \
             that it keeps accepting them"
        );
        let t2 = totals(&[
            (Counter::DropGlobal, 50_003),
            (Counter::CookiesSent, 50_001),
            (Counter::CookieRefresh, 1),
            (Counter::CookieAcks, 21),
            (Counter::CookieUnanswerable, 1),
        ]);
        let (lines, _) = r.close(&t2, &settings(), 110);
        assert!(
            lines[1].ends_with(
                "2 of the refused SYNs answered with a cookie, 1 ACK with a valid cookie passed \
                 to the kernel, 0 SYNs let through so that it keeps accepting them, 1 not \
                 answerable (IP options or IPv6 extension headers) and dropped"
            ),
            "{}",
            lines[1]
        );
        // Nothing moved: no line.
        let (lines, _) = r.close(&t2, &settings(), 120);
        assert!(lines.is_empty(), "{lines:?}");
    }

    #[test]
    fn a_flood_of_events_still_makes_a_bounded_summary() {
        let mut r = EventReport::new(totals(&[]), Arc::default());
        let names = HashMap::new();
        for i in 0..100_000u32 {
            let b = i.to_be_bytes();
            r.add(
                &event([10, b[1], b[2], b[3]], EVENT_TENANT_LIMIT, i),
                &names,
            );
        }
        let t = totals(&[
            (Counter::DropTenant, 100_000),
            (Counter::CrossedTenant, 100_000),
        ]);
        let (lines, report) = r.close(&t, &settings(), 1);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].len() < 600, "{}", lines[0]);
        assert!(
            lines[0].contains("from 16,384–100,000 sources"),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("others "), "{}", lines[0]);
        assert_eq!(report.expect("events").last_interval.len(), TOP_IN_STATUS);
    }
}
