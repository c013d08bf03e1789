//! What `/status` answers and `guard status` prints: one picture of the
//! daemon, taken every [`super::SAMPLE_INTERVAL`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ebpf::events::Offender, proxy::router::BackendState};

/// The whole picture.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    /// Unix time the picture was taken.
    pub updated_unix: u64,
    /// What `/readyz` answers: 200 when true.
    pub ready: bool,
    /// Why it is not ready (empty when ready).
    pub not_ready: Vec<String>,
    pub config: ConfigStatus,
    /// `None` when this daemon runs no proxy.
    pub proxy: Option<ProxyStatus>,
    /// `None` when this daemon runs no XDP guard.
    pub xdp: Option<XdpStatus>,
    /// Rates over the last minutes, oldest first.
    pub history: Vec<Point>,
}

/// The configuration in force and its reloads.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// The config file, if one was given.
    pub path: Option<String>,
    /// Unix time it was last loaded (at start or by a reload).
    pub loaded_unix: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Why the last failed reload failed, if the last reload failed.
    pub last_reload_error: Option<String>,
}

/// The memcache proxy.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub listen: Vec<String>,
    /// Client connections open now.
    pub connections: u64,
    pub connections_accepted: u64,
    /// Connections refused or closed early, by reason.
    pub connections_refused: BTreeMap<String, u64>,
    /// Backend errors (requests answered with an error).
    pub backend_errors: u64,
    pub backend_timeouts: u64,
    /// `flush_all` requests.
    pub flushes: u64,
    pub protocol_errors: u64,
    pub auth_failures: u64,
    pub tenants: Vec<TenantStatus>,
    pub backends: Vec<BackendStatus>,
    /// Every `stats` counter, for what the rest leaves out.
    pub stats: BTreeMap<String, u64>,
}

/// One tenant on this host.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TenantStatus {
    pub name: String,
    pub connections: u64,
    /// Backend requests in flight now.
    pub in_flight: u64,
    pub limits: TenantLimitsStatus,
    /// Requests since start, by command class.
    pub requests: BTreeMap<String, u64>,
    /// Requests answered with a backend error, by command class.
    pub errors: BTreeMap<String, u64>,
    /// Requests refused over a budget, by budget.
    pub refused: BTreeMap<String, u64>,
    /// Request and reply bytes charged.
    pub bytes: u64,
    /// Over the last sample interval.
    pub requests_per_sec: f64,
    pub errors_per_sec: f64,
    /// Backend requests a second over its budget (`None`: unlimited).
    pub budget_use: Option<f64>,
    /// Of requests that went to the backends, since start, in
    /// milliseconds (the bound of the histogram bucket they fall in).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub latency: Buckets,
}

/// A tenant's budget on this host (0 = unlimited).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TenantLimitsStatus {
    pub max_connections: u64,
    pub max_requests_per_sec: u64,
    pub max_bytes_per_sec: u64,
    pub max_in_flight: u64,
}

/// One backend.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub addr: String,
    pub state: BackendState,
    /// Whether any of its connections is up.
    pub connected: bool,
    pub in_flight: u64,
    /// Exponentially weighted latency of its answers, in milliseconds.
    pub latency_ms: f64,
    pub p99_ms: Option<f64>,
    pub ejections: u64,
    pub failures_in_a_row: u64,
    pub latency: Buckets,
}

/// A latency histogram: cumulative counts per bound of
/// [`crate::proxy::health::HISTOGRAM_BOUNDS`], then the total.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Buckets {
    pub sum_secs: f64,
    pub count: u64,
    pub cumulative: Vec<u64>,
}

/// The XDP guard.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct XdpStatus {
    pub interfaces: Vec<InterfaceStatus>,
    /// Every counter, summed over CPUs and interfaces.
    pub counters: BTreeMap<String, u64>,
    /// Over the last sample interval.
    pub syns_per_sec: f64,
    pub drops_per_sec: f64,
    /// Sources verified now.
    pub verified_sources: u64,
    /// Deny entries in force (the first [`super::collect::DENY_ROWS`] of
    /// them in `deny`).
    pub deny_entries: u64,
    pub deny: Vec<DenyRow>,
    /// The sources that crossed a budget most often in the last
    /// interval that had any, heaviest first.
    pub top_offenders: Vec<Offender>,
    /// Unix time of that interval's report.
    pub offenders_unix: u64,
    /// The counters by interface, in the order of their slots.
    #[serde(default)]
    pub by_interface: Vec<InterfaceCounters>,
    /// SYNs refused per tenant by its budget or the host's.
    #[serde(default)]
    pub tenant_syn_drops: Vec<TenantSynDrops>,
    /// The escalation ladder's counters (its `stats` names).
    #[serde(default)]
    pub escalation: BTreeMap<String, u64>,
}

/// The XDP counters of one interface slot.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InterfaceCounters {
    /// The interface; several joined by `+` when their indexes share a
    /// counter slot (see [`guard_common::IFACE_SLOTS`]), `other` for
    /// frames of interfaces not configured.
    pub interface: String,
    pub counters: BTreeMap<String, u64>,
}

/// SYNs one tenant's budget refused, and the host's budget after it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TenantSynDrops {
    /// The tenant's name, `(none)` for sources with no tenant.
    pub tenant: String,
    pub tenant_budget: u64,
    pub host_budget: u64,
}

/// One interface the guard should be on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub mode: String,
    /// Whether its XDP link is pinned (the program is attached).
    pub attached: bool,
}

/// One deny entry.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DenyRow {
    pub cidr: String,
    /// `None`: until removed.
    pub expires_in_secs: Option<u64>,
}

/// Rates at one moment of the last minutes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Point {
    pub unix: u64,
    pub requests_per_sec: f64,
    pub errors_per_sec: f64,
    pub syns_per_sec: f64,
    pub drops_per_sec: f64,
    /// Requests a second per tenant.
    pub tenants: BTreeMap<String, f64>,
}
