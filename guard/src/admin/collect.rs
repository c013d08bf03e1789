//! Takes the picture: reads the proxy's counters (relaxed atomics and two
//! short-held maps, never a lock a request waits on) and the XDP maps.
//! Runs on a blocking thread, once per [`super::SAMPLE_INTERVAL`],
//! whoever asks.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use super::status::{
    BackendStatus, Buckets, ConfigStatus, DenyRow, InterfaceCounters, InterfaceStatus, Point,
    ProxyStatus, Status, TenantLimitsStatus, TenantStatus, TenantSynDrops, XdpStatus,
};
use crate::{
    ebpf::{
        self, AttachState,
        events::OffenderReport,
        maps::{CidrList, GuardMaps, monotonic_ns},
    },
    paths::Paths,
    proxy::{Shared, health::Histogram, router::BackendState, stats::CommandClass},
    tenant::OverBudget,
};

/// The tenant label of sources with no tenant.
pub const NO_TENANT: &str = "(none)";

/// The interface label of frames counted in a slot no configured
/// interface maps to.
pub const OTHER_INTERFACE: &str = "other";

/// Deny entries listed in `/status` and on the page; the count covers
/// the rest.
pub const DENY_ROWS: usize = 50;

/// Sources listed as top offenders.
const OFFENDER_ROWS: usize = 10;

/// Points of history kept: five minutes at [`super::SAMPLE_INTERVAL`].
pub const HISTORY_POINTS: usize = 150;

/// How often the lists that take one system call per entry (verified
/// sources, deny entries) are read again: up to tens of thousands of
/// entries, so not at every sample.
const SLOW_LISTS_EVERY: Duration = Duration::from_secs(10);

/// The configuration in force, as the daemon reports it.
#[derive(Debug, Default)]
pub struct ConfigTracker {
    inner: Mutex<ConfigStatus>,
    /// The XDP interfaces the configuration in force names.
    interfaces: Mutex<Vec<String>>,
    /// Tenant names by their XDP id, for per-tenant SYN drops.
    tenants: Mutex<BTreeMap<u32, String>>,
}

impl ConfigTracker {
    /// A configuration loaded from `path` (if any) with these interfaces.
    pub fn new(path: Option<String>, interfaces: Vec<String>) -> Self {
        Self {
            inner: Mutex::new(ConfigStatus {
                path,
                loaded_unix: ebpf::unix_now(),
                ..ConfigStatus::default()
            }),
            interfaces: Mutex::new(interfaces),
            tenants: Mutex::new(BTreeMap::new()),
        }
    }

    /// The tenants of the configuration in force (at start and after
    /// each reload).
    pub fn set_tenants(&self, config: &crate::config::Config) {
        *lock(&self.tenants) = config
            .tenants
            .iter()
            .map(|t| (crate::config::tenant_id(&t.name), t.name.to_string()))
            .collect();
    }

    fn tenant_name(&self, id: u32) -> String {
        if id == guard_common::DEFAULT_TENANT {
            return NO_TENANT.to_owned();
        }
        lock(&self.tenants)
            .get(&id)
            .cloned()
            // A tenant a reload just removed, or one of another
            // configuration's: its id, never an unbounded label.
            .unwrap_or_else(|| format!("id:{id}"))
    }

    /// A reload took; its configuration names `interfaces`.
    pub fn reloaded(&self, interfaces: Vec<String>) {
        let mut c = lock(&self.inner);
        c.reloads_ok += 1;
        c.loaded_unix = ebpf::unix_now();
        c.last_reload_error = None;
        *lock(&self.interfaces) = interfaces;
    }

    /// A reload failed: the running configuration stays.
    pub fn failed(&self, why: String) {
        let mut c = lock(&self.inner);
        c.reloads_failed += 1;
        c.last_reload_error = Some(why);
    }

    /// The configuration's status now.
    pub fn status(&self) -> ConfigStatus {
        lock(&self.inner).clone()
    }

    fn interfaces(&self) -> Vec<String> {
        lock(&self.interfaces).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the picture comes from.
pub struct Sources {
    /// Set once the proxy runs; `None`: this daemon runs no proxy.
    pub proxy: Option<Arc<OnceLock<Arc<Shared>>>>,
    pub listen: Vec<SocketAddr>,
    /// `None`: this daemon runs no XDP guard.
    pub xdp: Option<XdpSource>,
    pub config: Arc<ConfigTracker>,
    pub started: Instant,
    /// The escalation ladder's counters.
    pub escalation: Option<Arc<crate::escalation::Counters>>,
    /// `/trace`; `None`: this daemon runs no XDP guard.
    pub trace: Option<Arc<super::trace::TraceSource>>,
}

/// The XDP side's pins, opened once and kept.
pub struct XdpSource {
    paths: Paths,
    maps: Mutex<Option<GuardMaps>>,
    slow: Mutex<Option<SlowLists>>,
}

struct SlowLists {
    at: Instant,
    verified: u64,
    deny_entries: u64,
    deny: Vec<DenyRow>,
}

impl XdpSource {
    /// The guard pinned under `paths`.
    pub fn new(paths: Paths) -> Self {
        Self {
            paths,
            maps: Mutex::new(None),
            slow: Mutex::new(None),
        }
    }
}

/// Totals at one sample, for rates.
#[derive(Clone, Debug)]
struct Totals {
    at: Instant,
    unix: u64,
    requests: u64,
    errors: u64,
    syns: u64,
    drops: u64,
    tenants: BTreeMap<String, (u64, u64)>,
}

/// The last minutes, in points.
#[derive(Debug, Default)]
pub struct History {
    last: Option<Totals>,
    points: VecDeque<Point>,
}

impl History {
    /// Rates since the last sample.
    fn push(&mut self, now: Totals) -> Point {
        let mut p = Point {
            unix: now.unix,
            ..Point::default()
        };
        if let Some(last) = &self.last {
            let secs = now.at.duration_since(last.at).as_secs_f64().max(1e-3);
            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
            p.requests_per_sec = rate(now.requests, last.requests);
            p.errors_per_sec = rate(now.errors, last.errors);
            p.syns_per_sec = rate(now.syns, last.syns);
            p.drops_per_sec = rate(now.drops, last.drops);
            for (name, (req, _)) in &now.tenants {
                let before = last.tenants.get(name).map_or(0, |t| t.0);
                p.tenants.insert(name.clone(), rate(*req, before));
            }
        }
        self.last = Some(now);
        if self.points.len() == HISTORY_POINTS {
            self.points.pop_front();
        }
        self.points.push_back(p.clone());
        p
    }

    /// Errors a second of `tenant` since the last sample.
    fn tenant_errors_per_sec(&self, before: Option<&Totals>, now: &Totals, tenant: &str) -> f64 {
        let Some(before) = before else { return 0.0 };
        let secs = now.at.duration_since(before.at).as_secs_f64().max(1e-3);
        let now_err = now.tenants.get(tenant).map_or(0, |t| t.1);
        let then = before.tenants.get(tenant).map_or(0, |t| t.1);
        now_err.saturating_sub(then) as f64 / secs
    }
}

/// Takes the picture and adds its point to `history`.
pub fn collect(sources: &Sources, history: &mut History) -> Status {
    let mut status = Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        uptime_secs: sources.started.elapsed().as_secs(),
        updated_unix: ebpf::unix_now(),
        config: sources.config.status(),
        ..Status::default()
    };
    let mut totals = Totals {
        at: Instant::now(),
        unix: status.updated_unix,
        requests: 0,
        errors: 0,
        syns: 0,
        drops: 0,
        tenants: BTreeMap::new(),
    };
    let mut not_ready = Vec::new();
    if let Some(cell) = &sources.proxy {
        match cell.get() {
            Some(shared) => {
                let p = proxy_status(shared, &sources.listen, &mut totals);
                if !p.backends.iter().any(|b| {
                    b.state == BackendState::Healthy && b.connected && b.failures_in_a_row == 0
                }) {
                    not_ready.push("no healthy backend".to_owned());
                }
                status.proxy = Some(p);
            }
            None => not_ready.push("the proxy is starting".to_owned()),
        }
    }
    if let Some(x) = &sources.xdp {
        match xdp_status(x, &sources.config, &mut totals) {
            Ok(mut s) => {
                if let Some(e) = &sources.escalation {
                    s.escalation = e
                        .rows()
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect();
                }
                for i in s.interfaces.iter().filter(|i| !i.attached) {
                    not_ready.push(format!("XDP is not attached to {}", i.name));
                }
                status.xdp = Some(s);
            }
            Err(e) => {
                // Pins replaced under us (a detach, a re-attach): open
                // them again next time.
                *lock(&x.maps) = None;
                not_ready.push(format!("cannot read the XDP maps: {e:#}"));
            }
        }
    }
    let before = history.last.clone();
    let point = history.push(totals.clone());
    if let Some(p) = &mut status.proxy {
        for t in &mut p.tenants {
            t.requests_per_sec = point.tenants.get(&t.name).copied().unwrap_or(0.0);
            t.errors_per_sec = history.tenant_errors_per_sec(before.as_ref(), &totals, &t.name);
            t.budget_use = (t.limits.max_requests_per_sec > 0)
                .then(|| t.requests_per_sec / t.limits.max_requests_per_sec as f64);
        }
    }
    if let Some(x) = &mut status.xdp {
        x.syns_per_sec = point.syns_per_sec;
        x.drops_per_sec = point.drops_per_sec;
    }
    status.history = history.points.iter().cloned().collect();
    status.ready = not_ready.is_empty();
    status.not_ready = not_ready;
    status
}

fn buckets(h: &Histogram) -> Buckets {
    let (sum_secs, count, b) = h.snapshot();
    Buckets {
        sum_secs,
        count,
        cumulative: b.into_iter().map(|(_, c)| c).collect(),
    }
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1e3)
}

fn proxy_status(sh: &Shared, listen: &[SocketAddr], totals: &mut Totals) -> ProxyStatus {
    let stats: BTreeMap<String, u64> = sh
        .stats
        .rows()
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect();
    let stat = |k: &str| stats.get(k).copied().unwrap_or(0);
    let mut refused = BTreeMap::new();
    refused.insert("source_cap".to_owned(), stat("rejected_connections"));
    refused.insert("tenant_cap".to_owned(), stat("tenant_rejected_connections"));
    refused.insert("auth_timeout".to_owned(), stat("auth_timeouts"));
    refused.insert("read_timeout".to_owned(), stat("request_read_timeouts"));
    let mut tenants = Vec::new();
    for t in sh.tenants.load().served_tenants() {
        let budget = sh.budgets.by_id(t.id);
        let mut s = TenantStatus {
            name: t.name.to_string(),
            connections: sh.connections.count(&t),
            limits: TenantLimitsStatus {
                max_connections: t.limits.max_connections,
                max_requests_per_sec: t.limits.max_requests_per_sec,
                max_bytes_per_sec: t.limits.max_bytes_per_sec,
                max_in_flight: t.limits.max_in_flight,
            },
            ..TenantStatus::default()
        };
        let mut req_total = 0;
        let mut err_total = 0;
        for class in CommandClass::ALL {
            let (r, e) = budget.as_ref().map_or((0, 0), |b| {
                (b.traffic.requests(class), b.traffic.errors(class))
            });
            req_total += r;
            err_total += e;
            s.requests.insert(class.label().to_owned(), r);
            s.errors.insert(class.label().to_owned(), e);
        }
        for why in OverBudget::ALL {
            s.refused.insert(
                why.metric_label().to_owned(),
                budget.as_ref().map_or(0, |b| b.refused(why)),
            );
        }
        if let Some(b) = &budget {
            s.in_flight = b.in_flight();
            s.bytes = b.bytes();
            let h = b.traffic.latency();
            s.p50_ms = ms(h.quantile(0.5));
            s.p99_ms = ms(h.quantile(0.99));
            s.latency = buckets(h);
        } else {
            s.latency = buckets(&Histogram::default());
        }
        totals.requests += req_total;
        totals.errors += err_total;
        totals
            .tenants
            .insert(s.name.clone(), (req_total, err_total));
        tenants.push(s);
    }
    let backends = sh
        .router
        .tracked()
        .iter()
        .map(|b| {
            let health = b.pool.health();
            BackendStatus {
                addr: b.addr.to_string(),
                state: b.state.get(),
                connected: b.pool.is_up(),
                in_flight: b.pool.in_flight() as u64,
                latency_ms: health.ewma().as_secs_f64() * 1e3,
                p99_ms: ms(health.histogram().quantile(0.99)),
                ejections: b.state.ejections(),
                failures_in_a_row: u64::from(health.consecutive_failures()),
                latency: buckets(health.histogram()),
            }
        })
        .collect();
    ProxyStatus {
        listen: listen.iter().map(ToString::to_string).collect(),
        connections: stat("curr_connections"),
        connections_accepted: stat("total_connections"),
        connections_refused: refused,
        backend_errors: stat("backend_errors"),
        backend_timeouts: stat("backend_timeouts"),
        flushes: stat("cmd_flush"),
        protocol_errors: stat("protocol_errors"),
        auth_failures: stat("auth_errors"),
        tenants,
        backends,
        stats,
    }
}

/// The label of each interface counter slot the configured interfaces
/// map to (`(name, ifindex)`; an index of 0, an interface that does not
/// exist now, maps to none): names whose indexes share a slot are joined
/// by `+`, since their frames are counted together.
pub fn interface_slots(interfaces: &[(String, u32)]) -> BTreeMap<u32, String> {
    let mut out: BTreeMap<u32, String> = BTreeMap::new();
    for (name, index) in interfaces.iter().filter(|(_, i)| *i != 0) {
        let label = out.entry(index % guard_common::IFACE_SLOTS).or_default();
        if !label.is_empty() {
            label.push('+');
        }
        label.push_str(name);
    }
    out
}

/// The configured interfaces with their indexes now (0: not present).
pub fn interface_indexes(names: &[String]) -> Vec<(String, u32)> {
    names
        .iter()
        .map(|n| {
            let index = std::ffi::CString::new(n.as_str())
                // SAFETY: a valid NUL-terminated string.
                .map_or(0, |c| unsafe { libc::if_nametoindex(c.as_ptr()) });
            (n.clone(), index)
        })
        .collect()
}

fn named_counters(values: &[u64]) -> BTreeMap<String, u64> {
    guard_common::Counter::ALL
        .iter()
        .map(|c| {
            (
                c.label().to_owned(),
                values.get(*c as usize).copied().unwrap_or(0),
            )
        })
        .collect()
}

fn xdp_status(
    x: &XdpSource,
    config: &ConfigTracker,
    totals: &mut Totals,
) -> anyhow::Result<XdpStatus> {
    let configured = config.interfaces();
    let mut guard = lock(&x.maps);
    if guard.is_none() {
        *guard = Some(GuardMaps::open(&x.paths)?);
    }
    let maps = guard.as_ref().expect("opened above");
    // One read of every slot: the totals are their sum.
    let slots = maps.counter_slots()?;
    let labels = interface_slots(&interface_indexes(&configured));
    let mut all = [0u64; guard_common::COUNTER_COUNT as usize];
    let mut by_label: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (slot, values) in &slots {
        for (t, v) in all.iter_mut().zip(values) {
            *t = t.wrapping_add(*v);
        }
        let label = labels
            .get(slot)
            .cloned()
            .unwrap_or_else(|| OTHER_INTERFACE.to_owned());
        let sum = by_label
            .entry(label)
            .or_insert_with(|| vec![0; values.len()]);
        for (t, v) in sum.iter_mut().zip(values) {
            *t = t.wrapping_add(*v);
        }
    }
    // Every configured interface is listed, counted or not yet.
    for label in labels.values() {
        by_label
            .entry(label.clone())
            .or_insert_with(|| vec![0; all.len()]);
    }
    let by_interface = by_label
        .into_iter()
        .map(|(interface, values)| InterfaceCounters {
            interface,
            counters: named_counters(&values),
        })
        .collect();
    let tenant_syn_drops = maps
        .tenant_drops()?
        .into_iter()
        .map(|(id, d)| TenantSynDrops {
            tenant: config.tenant_name(id),
            tenant_budget: d.tenant,
            host_budget: d.global,
        })
        .collect();
    let counters = named_counters(&all);
    let c = |k: &str| counters.get(k).copied().unwrap_or(0);
    totals.syns = c("judged");
    totals.drops = c("drop_deny") + c("drop_source") + c("drop_tenant") + c("drop_global");

    let state = AttachState::load(&x.paths)?;
    let interfaces = configured
        .iter()
        .map(|name| {
            let recorded = state.interfaces.iter().find(|i| &i.name == name);
            InterfaceStatus {
                name: name.clone(),
                mode: recorded.map_or_else(String::new, |i| i.mode.to_string()),
                attached: recorded.is_some() && x.paths.link_pin(name).exists(),
            }
        })
        .collect();

    let mut slow = lock(&x.slow);
    if slow
        .as_ref()
        .is_none_or(|s| s.at.elapsed() >= SLOW_LISTS_EVERY)
    {
        let now = monotonic_ns();
        let verified = maps
            .verified()?
            .iter()
            .filter(|(_, v)| v.active(now))
            .count() as u64;
        let mut deny: Vec<_> = maps
            .list_cidrs(CidrList::Deny)?
            .into_iter()
            .filter(|e| e.expires_ns == 0 || e.expires_ns > now)
            .collect();
        let deny_entries = deny.len() as u64;
        // Those that lapse soonest first: what an operator watches.
        deny.sort_by_key(|e| (e.expires_in_secs.unwrap_or(u64::MAX), e.cidr));
        deny.truncate(DENY_ROWS);
        *slow = Some(SlowLists {
            at: Instant::now(),
            verified,
            deny_entries,
            deny: deny
                .into_iter()
                .map(|e| DenyRow {
                    cidr: e.cidr.to_string(),
                    expires_in_secs: e.expires_in_secs,
                })
                .collect(),
        });
    }
    let lists = slow.as_ref().expect("read above");
    let offenders = OffenderReport::load(&x.paths)?.unwrap_or_default();
    let mut top = offenders.last_interval;
    top.truncate(OFFENDER_ROWS);
    Ok(XdpStatus {
        interfaces,
        counters,
        syns_per_sec: 0.0,
        drops_per_sec: 0.0,
        verified_sources: lists.verified,
        deny_entries: lists.deny_entries,
        deny: lists.deny.clone(),
        top_offenders: top,
        offenders_unix: offenders.updated_unix,
        by_interface,
        tenant_syn_drops,
        escalation: BTreeMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_sharing_a_slot_are_labelled_together() {
        let slots = interface_slots(&[
            ("eth0".into(), 2),
            ("eth1".into(), 3),
            ("veth9".into(), 258),
            ("gone".into(), 0),
        ]);
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[&2], "eth0+veth9");
        assert_eq!(slots[&3], "eth1");
    }

    fn totals(at: Instant, requests: u64, acme: u64) -> Totals {
        Totals {
            at,
            unix: 0,
            requests,
            errors: 0,
            syns: 0,
            drops: 0,
            tenants: [("acme".to_owned(), (acme, 0))].into(),
        }
    }

    #[test]
    fn history_gives_rates_between_samples_and_keeps_the_last_minutes() {
        let mut h = History::default();
        let t0 = Instant::now();
        assert_eq!(h.push(totals(t0, 0, 0)).requests_per_sec, 0.0);
        let p = h.push(totals(t0 + Duration::from_secs(2), 200, 50));
        assert_eq!(p.requests_per_sec, 100.0);
        assert_eq!(p.tenants["acme"], 25.0);
        for i in 0..HISTORY_POINTS as u64 * 2 {
            h.push(totals(t0 + Duration::from_secs(4 + i), 200, 50));
        }
        assert_eq!(h.points.len(), HISTORY_POINTS);
        assert_eq!(h.points.back().unwrap().requests_per_sec, 0.0);
    }
}
