//! The configuration file (TOML) and its validation.
//!
//! Flags given on the command line override the file (see `cli`); the result
//! is checked once by [`Config::validate`] before anything is attached.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    str::FromStr,
};

use anyhow::{Context as _, bail};
use guard_common::{DEFAULT_TENANT, FAMILY_V4, FAMILY_V6, ListenerKey};
use serde::{Deserialize, Serialize};

use crate::{cidr::Cidr, password::PasswordHash};

/// How long a client has to authenticate unless `[proxy] auth_timeout_ms`
/// says otherwise.
pub const DEFAULT_AUTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The open tenant's key namespace on the backends; `_` and `_:…` are
/// reserved for it, so no configured tenant can take them.
pub const OPEN_NAMESPACE: &str = "_";

/// The first byte of every key guard itself stores on the backends
/// (probe keys, keys of an ejected backend held by another): no tenant
/// namespace may start with it, so no namespaced client key can meet
/// them. Raw keys (`keys = "raw"`) are stored as sent, so a raw client key
/// starting with it shares that part of the key space with guard's own.
pub const INTERNAL_KEY_PREFIX: char = '~';

/// The values `outlier_ratio` may take besides 0 (never); `guard probe`
/// takes the same.
pub const OUTLIER_RATIOS: std::ops::RangeInclusive<f64> = 1.1..=1000.0;

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The XDP SYN guard.
    pub xdp: XdpConfig,
    /// The memcache proxy.
    pub proxy: ProxyConfig,
    /// The escalation ladder: misbehaviour the proxy sees, enforced by XDP.
    pub escalation: EscalationConfig,
    /// Tenants, each with its own budgets (`[[tenant]]` tables).
    #[serde(rename = "tenant")]
    pub tenants: Vec<TenantConfig>,
    /// The admin endpoint: `/metrics`, `/status`, the status page.
    pub admin: AdminConfig,
}

/// The admin endpoint's settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where it listens; `None` (`listen = ""`, `--admin off`) for nowhere.
    #[serde(with = "optional_addr")]
    pub listen: Option<SocketAddr>,
    /// Whether it may listen on an address other than loopback; then a
    /// `token` is required too.
    pub allow_remote: bool,
    /// Bearer token every request must carry (`Authorization: Bearer
    /// …`); empty for none (loopback only).
    pub token: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            // Loopback: what the host's own Prometheus agent and an
            // operator's `guard status` reach, and nothing else.
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9311))),
            allow_remote: false,
            token: String::new(),
        }
    }
}

impl AdminConfig {
    fn validate(&self) -> anyhow::Result<()> {
        let Some(addr) = self.listen else {
            return Ok(());
        };
        if !addr.ip().is_loopback() {
            if !self.allow_remote {
                bail!(
                    "the admin endpoint on {addr} would be reachable from other hosts: \
                     add --admin-allow-remote (allow_remote = true) and a token, or listen \
                     on 127.0.0.1"
                );
            }
            if self.token.len() < 16 {
                bail!(
                    "the admin endpoint on {addr} needs [admin] token of at least 16 \
                     characters: it is reachable from other hosts"
                );
            }
        }
        if self.token.bytes().any(|b| b <= b' ' || b == 0x7f) {
            bail!("[admin] token must not contain spaces or control characters");
        }
        Ok(())
    }
}

/// `listen = "ADDR:PORT"`, or `""` for none.
mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() || s == "off" {
            return Ok(None);
        }
        s.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!("`{s}` is not ADDR:PORT (or \"\" for none)"))
        })
    }
}

/// How to attach the XDP program.
#[derive(Copy, Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Driver mode where the driver supports it, else generic (skb) mode.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Drv,
    /// Generic (skb) mode, which every driver supports.
    Skb,
}

impl FromStr for XdpModeSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "drv" | "driver" | "native" => Ok(Self::Drv),
            "skb" | "generic" => Ok(Self::Skb),
            other => Err(format!("unknown XDP mode `{other}`: use auto, drv or skb")),
        }
    }
}

impl fmt::Display for XdpModeSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Drv => "drv",
            Self::Skb => "skb",
        })
    }
}

/// Whether the XDP program answers SYNs of sources with no tenant with
/// SYN cookies of its own (a SYN-ACK sent back from XDP; the client's ACK
/// completes the connection in the kernel) rather than dropping them.
/// Sources with a tenant, allowed sources and SYNs dropped by their own
/// source's bucket are never answered with cookies. Needs
/// `net.ipv4.tcp_syncookies = 2`; see the README.
#[derive(Copy, Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SynCookies {
    /// Only SYNs the shared budget of sources with no tenant, or the host's
    /// budget, refuses: in a spoofed flood, new clients still get in.
    #[default]
    Auto,
    /// Every SYN of a source with no tenant that its own bucket admits:
    /// the shared budget of such sources admits none (`tenant_syn_rate`
    /// then only applies to tenants), so they never reach the kernel
    /// before their ACK proves them, and never charge the host's budget.
    On,
    /// Refused SYNs are dropped.
    Off,
}

impl FromStr for SynCookies {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown SYN cookie mode `{other}`: use auto, on or off"
            )),
        }
    }
}

impl fmt::Display for SynCookies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        })
    }
}

/// The XDP SYN guard's settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct XdpConfig {
    /// Interfaces to attach to. Empty: no XDP (the proxy runs alone).
    pub interfaces: Vec<String>,
    /// Attachment mode.
    pub mode: XdpModeSetting,
    /// Protected listeners: only SYNs to these are judged.
    pub protect: Vec<Listener>,
    /// SYNs per second each source may open (0 = unlimited).
    pub syn_rate: u64,
    /// Burst of SYNs each source may open at once.
    pub syn_burst: u64,
    /// SYNs per second each tenant may receive, unless the tenant sets its
    /// own; also the shared budget of sources with no tenant.
    pub tenant_syn_rate: u64,
    /// Burst for [`Self::tenant_syn_rate`].
    pub tenant_syn_burst: u64,
    /// SYNs per second the whole host admits (0 = unlimited).
    pub global_syn_rate: u64,
    /// Burst for [`Self::global_syn_rate`].
    pub global_syn_burst: u64,
    /// Limit events per second the XDP program describes to the daemon, for
    /// the whole host (0 = none; every crossing is still counted).
    pub event_rate: u64,
    /// Burst for [`Self::event_rate`].
    pub event_burst: u64,
    /// Seconds between the daemon's summaries of what XDP dropped.
    pub report_interval_secs: u64,
    /// IPv6 sources share one bucket per prefix of this length.
    pub ipv6_prefix: u8,
    /// Pass UDP to protected ports (memcached's UDP is a reflection vector).
    pub allow_udp: bool,
    /// How long a source stays verified after it proved itself (a login,
    /// or on the open tenant a valid request): its SYNs then skip the
    /// shared budget of unknown sources and the host's. 0 = never.
    pub verified_secs: u64,
    /// SYN cookies from XDP for sources with no tenant.
    pub syn_cookies: SynCookies,
    /// Sources whose SYNs are always dropped.
    pub deny: Vec<Cidr>,
    /// Sources whose SYNs pass without being charged.
    pub allow: Vec<Cidr>,
}

impl Default for XdpConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            mode: XdpModeSetting::Auto,
            protect: Vec::new(),
            // A healthy client reconnects a handful of times a second at most;
            // a storm is hundreds.
            syn_rate: 50,
            syn_burst: 100,
            // Room for a tenant's whole fleet restarting at once.
            tenant_syn_rate: 2_000,
            tenant_syn_burst: 4_000,
            // Below what one host's accept path absorbs without queueing.
            global_syn_rate: 20_000,
            global_syn_burst: 40_000,
            // Enough to name the sources of any real storm; a spoofed flood
            // has millions and is summarised from the counters instead.
            event_rate: 200,
            event_burst: 400,
            // Short enough to follow a storm, long enough that its log
            // stays a few lines a minute.
            report_interval_secs: 10,
            // One customer site or host usually owns a /64.
            ipv6_prefix: 64,
            allow_udp: false,
            // A client that logged in within the hour is the one a storm
            // must not lock out; one gone longer proves itself again.
            verified_secs: 3_600,
            // Cookies only when the shared budgets run dry: a spoofed flood
            // must not lock out a client never seen before.
            syn_cookies: SynCookies::Auto,
            deny: Vec::new(),
            allow: Vec::new(),
        }
    }
}

/// The memcache proxy's settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Addresses the proxy accepts clients on. Empty: no proxy.
    pub listen: Vec<SocketAddr>,
    /// Length of each listener's accept queue (`listen(2)` backlog); the
    /// kernel caps it at `net.core.somaxconn`.
    pub backlog: u32,
    /// memcached servers, hashed with ketama by weight.
    pub backends: Vec<BackendConfig>,
    /// Longest wait for a backend TCP connect.
    pub connect_timeout_ms: u64,
    /// Longest wait for a backend reply before the request fails.
    pub request_timeout_ms: u64,
    /// Persistent connections per backend; requests are pipelined on them.
    pub backend_connections: usize,
    /// Most requests outstanding on one backend connection; beyond it a
    /// request is refused at once (`SERVER_ERROR backend overloaded`).
    pub backend_max_in_flight: usize,
    /// Threads serving the proxy (and the XDP side): 1 runs everything on
    /// one thread, 0 picks one by CPU count (see [`Self::runtime_threads`]).
    pub threads: usize,
    /// Most client connections at once (taken before `accept`).
    pub max_connections: usize,
    /// Most client connections from one source address (0 = unlimited).
    pub max_connections_per_source: usize,
    /// A client connection with nothing in flight is closed after this
    /// many seconds of silence (0 = never).
    pub idle_timeout_secs: u64,
    /// A request still incomplete this many milliseconds after its first
    /// byte arrived closes the connection (0 = never): a client trickling
    /// bytes never goes idle, yet holds a descriptor and a buffer.
    pub request_read_timeout_ms: u64,
    /// Largest value a client may store, in bytes.
    pub max_value_size: usize,
    /// Most requests a client may have in flight; reading pauses beyond it.
    pub max_pipeline_depth: usize,
    /// When a backend fails, reads answer a miss instead of an error.
    pub miss_on_backend_error: bool,
    /// On SIGTERM, in-flight requests get this long to finish.
    pub drain_grace_secs: u64,
    /// With tenants configured, a client that has not authenticated this
    /// many milliseconds after connecting is closed.
    pub auth_timeout_ms: u64,
    /// How the open tenant's keys are stored and hashed: in its namespace,
    /// or as the client sent them (a drop-in for twemproxy).
    pub keys: KeyMode,
    /// What happens to an ejected backend's keys.
    pub eject: EjectPolicy,
    /// Consecutive failures (connects, timeouts, lost connections) that
    /// eject a backend (0 = never for errors).
    pub eject_after_errors: u32,
    /// A backend whose recent 90th-percentile latency is this many times
    /// the median of its peers' is an outlier (0 = never for latency).
    pub outlier_ratio: f64,
    /// ... and only if it is also this many milliseconds above it, so a
    /// fast pool does not eject over microseconds.
    pub outlier_min_gap_ms: u64,
    /// How often latencies are compared; an outlier in two intervals in a
    /// row is ejected.
    pub outlier_interval_ms: u64,
    /// Most backends ejected at once, as a percentage of the pool.
    pub max_ejected_percent: u32,
    /// How long the first ejection lasts before the backend is probed;
    /// each repeat doubles it, up to `max_eject_time_ms`.
    pub eject_time_ms: u64,
    /// The longest an ejection lasts before the next probe.
    pub max_eject_time_ms: u64,
    /// Each tenant's requests per second, service-wide, unless the tenant
    /// sets its own; also the open tenant's (0 = unlimited). Like every
    /// budget in the file it is divided by [`Self::hosts`].
    pub max_requests_per_sec: u64,
    /// Burst for [`Self::max_requests_per_sec`] (unset: one second of it).
    pub requests_burst: Option<u64>,
    /// Each tenant's request and reply bytes per second, service-wide
    /// (0 = unlimited).
    pub max_bytes_per_sec: u64,
    /// Burst for [`Self::max_bytes_per_sec`] (unset: one second of it).
    pub bytes_burst: Option<u64>,
    /// Each tenant's backend requests in flight at once, service-wide
    /// (0 = unlimited).
    pub max_in_flight: u64,
    /// Proxy hosts sharing the tenants' budgets: each enforces 1/hosts of
    /// every budget in the file (rounded up).
    pub hosts: u64,
}

/// How the open tenant's keys reach the backends.
#[derive(Copy, Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeyMode {
    /// Under the open namespace and its flush generation
    /// (`_:<generation>:<key>`), hashed as stored.
    #[default]
    Namespaced,
    /// As the client sent them, hashed as twemproxy hashes them, so guard
    /// can replace twemproxy in front of a warm cache. Only without
    /// tenants; `flush_all` is refused.
    Raw,
}

impl FromStr for KeyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "namespaced" => Ok(Self::Namespaced),
            "raw" => Ok(Self::Raw),
            other => Err(format!("unknown key mode `{other}`: use namespaced or raw")),
        }
    }
}

/// Where an ejected backend's keys go.
#[derive(Copy, Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EjectPolicy {
    /// To the next live backend on the ring, as twemproxy's
    /// `auto_eject_hosts` places them.
    #[default]
    Redistribute,
    /// Nowhere: they are answered `SERVER_ERROR backend unavailable` (or a
    /// miss) at once.
    FailFast,
}

impl FromStr for EjectPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "redistribute" => Ok(Self::Redistribute),
            "fail-fast" => Ok(Self::FailFast),
            other => Err(format!(
                "unknown eject policy `{other}`: use redistribute or fail-fast"
            )),
        }
    }
}

impl fmt::Display for EjectPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Redistribute => "redistribute",
            Self::FailFast => "fail-fast",
        })
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            // A reconnect burst of thousands fills a queue of 128 within
            // milliseconds, and every SYN the kernel drops then costs its
            // client a 1 s retransmit; 4096 is the kernel's own default
            // somaxconn, so it needs no sysctl on a current kernel.
            backlog: 4096,
            backends: Vec::new(),
            // A healthy backend on the same network connects in well under a
            // millisecond; waiting longer only turns an outage into slowness.
            connect_timeout_ms: 200,
            // Far above a memcached round trip, below client timeouts, so
            // clients get an answer instead of timing out and reconnecting.
            request_timeout_ms: 250,
            // Pipelining keeps a few connections busy; more only spread load
            // over memcached's worker threads.
            backend_connections: 2,
            // A healthy memcached answers a few hundred pipelined requests
            // in well under the request timeout; a connection holding more
            // is on a backend that stopped keeping up, and queueing on it
            // only turns its slowness into everyone's.
            backend_max_in_flight: 1024,
            threads: 0,
            // Below a default 64k descriptor limit with room for backends.
            max_connections: 50_000,
            // One client host rarely needs more; a reconnect storm does.
            max_connections_per_source: 1_000,
            idle_timeout_secs: 300,
            // A whole 1 MiB value arrives in milliseconds inside a data
            // centre; seconds mean a stalled or hostile client.
            request_read_timeout_ms: 5_000,
            // memcached's default item size limit.
            max_value_size: 1024 * 1024,
            max_pipeline_depth: 256,
            miss_on_backend_error: false,
            drain_grace_secs: 5,
            auth_timeout_ms: DEFAULT_AUTH_TIMEOUT.as_millis() as u64,
            keys: KeyMode::Namespaced,
            eject: EjectPolicy::Redistribute,
            // twemproxy ejects after two; one more rides out a single
            // reset connection.
            eject_after_errors: 3,
            // A backend at three times its peers' latency is costing its
            // keys' clients far more than the others; below that, noise.
            outlier_ratio: 3.0,
            // memcached answers in well under a millisecond; 10 ms above
            // the pool is a backend clients notice, not scheduling jitter.
            outlier_min_gap_ms: 10,
            // Two intervals in a row: a slow backend is out within about
            // a second, a single stall is not enough.
            outlier_interval_ms: 500,
            // Half the pool serving everything beats no pool; ejecting
            // more would move the load of many onto few.
            max_ejected_percent: 50,
            // Long enough that a flapping node is not probed every
            // moment; doubling on every repeat.
            eject_time_ms: 10_000,
            max_eject_time_ms: 300_000,
            // Budgets are the operator's to set: a proxy that refused
            // traffic out of the box would be an outage on upgrade.
            max_requests_per_sec: 0,
            requests_burst: None,
            max_bytes_per_sec: 0,
            bytes_burst: None,
            max_in_flight: 0,
            hosts: 1,
        }
    }
}

impl ProxyConfig {
    /// The runtime's thread count: [`Self::threads`], or with 0 one thread
    /// on up to 2 CPUs, else one per CPU. On a small machine the proxy
    /// shares the cores with its clients and backends, and every request
    /// crossing between runtime threads (client session, backend
    /// connection) costs a wake-up: one thread measured 35-45% more
    /// requests per second than two on a 2-vCPU machine.
    pub fn runtime_threads(&self) -> usize {
        match self.threads {
            0 => match std::thread::available_parallelism().map_or(1, |n| n.get()) {
                n if n <= 2 => 1,
                n => n,
            },
            n => n,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        // Checked with or without a listener: the tenants' budgets are
        // divided by `hosts` either way.
        if !(1..=MAX_HOSTS).contains(&self.hosts) {
            bail!("hosts must be 1..={MAX_HOSTS}, got {}", self.hosts);
        }
        check_request_budgets(
            "",
            &Budgets {
                max_requests_per_sec: Some(self.max_requests_per_sec),
                requests_burst: self.requests_burst,
                max_bytes_per_sec: Some(self.max_bytes_per_sec),
                bytes_burst: self.bytes_burst,
                max_in_flight: Some(self.max_in_flight),
            },
        )?;
        if self.listen.is_empty() {
            return Ok(());
        }
        if self.backends.is_empty() {
            bail!("the proxy needs at least one backend: add --backend ADDR:PORT[:WEIGHT]");
        }
        let mut seen = BTreeSet::new();
        for b in &self.backends {
            if b.weight == 0 {
                bail!("backend {} has weight 0: use 1 or more", b.addr);
            }
            if !seen.insert(b.addr) {
                bail!("backend {} is listed twice", b.addr);
            }
        }
        let mut seen = BTreeSet::new();
        for l in &self.listen {
            if !seen.insert(l) {
                bail!("proxy listener {l} is listed twice");
            }
        }
        // 0 queues barely one connection; older kernels keep the length
        // in 16 bits, so more than 65535 would wrap there.
        if !(1..=65_535).contains(&self.backlog) {
            bail!("backlog must be 1..=65535, got {}", self.backlog);
        }
        if !(1..=60_000).contains(&self.connect_timeout_ms) {
            bail!(
                "connect-timeout-ms must be 1..=60000, got {}",
                self.connect_timeout_ms
            );
        }
        if !(1..=60_000).contains(&self.request_timeout_ms) {
            bail!(
                "request-timeout-ms must be 1..=60000, got {}",
                self.request_timeout_ms
            );
        }
        if !(1..=64).contains(&self.backend_connections) {
            bail!(
                "backend-connections must be 1..=64, got {}",
                self.backend_connections
            );
        }
        if !(1..=1_000_000).contains(&self.backend_max_in_flight) {
            bail!(
                "backend-max-in-flight must be 1..=1000000, got {}",
                self.backend_max_in_flight
            );
        }
        if self.threads > 1024 {
            bail!("threads must be 0..=1024, got {}", self.threads);
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            bail!(
                "max-connections must be 1..=1000000, got {}",
                self.max_connections
            );
        }
        if !(1..=128 * 1024 * 1024).contains(&self.max_value_size) {
            bail!(
                "max-value-size must be 1..=134217728 bytes, got {}",
                self.max_value_size
            );
        }
        if !(1..=65_536).contains(&self.max_pipeline_depth) {
            bail!(
                "max-pipeline-depth must be 1..=65536, got {}",
                self.max_pipeline_depth
            );
        }
        if !(1..=60_000).contains(&self.auth_timeout_ms) {
            bail!(
                "auth-timeout-ms must be 1..=60000, got {}",
                self.auth_timeout_ms
            );
        }
        if self.drain_grace_secs > 3_600 {
            bail!(
                "drain-grace-secs must be at most 3600, got {}",
                self.drain_grace_secs
            );
        }
        self.validate_ejection()
    }

    fn validate_ejection(&self) -> anyhow::Result<()> {
        if self.eject_after_errors > 1_000 {
            bail!(
                "eject-after-errors must be 0..=1000 (0 = never), got {}",
                self.eject_after_errors
            );
        }
        let r = self.outlier_ratio;
        if !(r == 0.0 || OUTLIER_RATIOS.contains(&r)) {
            bail!("outlier-ratio must be 0 (never) or 1.1..=1000, got {r}");
        }
        if self.outlier_min_gap_ms > 60_000 {
            bail!(
                "outlier-min-gap-ms must be at most 60000, got {}",
                self.outlier_min_gap_ms
            );
        }
        if !(50..=60_000).contains(&self.outlier_interval_ms) {
            bail!(
                "outlier-interval-ms must be 50..=60000, got {}",
                self.outlier_interval_ms
            );
        }
        if self.max_ejected_percent > 100 {
            bail!(
                "max-ejected-percent must be 0..=100, got {}",
                self.max_ejected_percent
            );
        }
        if !(10..=86_400_000).contains(&self.eject_time_ms) {
            bail!(
                "eject-time-ms must be 10..=86400000, got {}",
                self.eject_time_ms
            );
        }
        if !(self.eject_time_ms..=86_400_000).contains(&self.max_eject_time_ms) {
            bail!(
                "max-eject-time-ms must be eject-time-ms ({}) ..=86400000, got {}",
                self.eject_time_ms,
                self.max_eject_time_ms
            );
        }
        Ok(())
    }
}

/// One memcached backend: `ADDR:PORT[:WEIGHT]` on the command line.
#[derive(Copy, Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its share of the keys relative to the others.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl FromStr for BackendConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Self { addr, weight: 1 });
        }
        let bad = || format!("`{s}` is not ADDR:PORT[:WEIGHT] (e.g. 10.0.0.5:11211:2)");
        let (addr, weight) = s.rsplit_once(':').ok_or_else(bad)?;
        Ok(Self {
            addr: addr.parse().map_err(|_| bad())?,
            weight: weight.parse().map_err(|_| bad())?,
        })
    }
}

/// One tenant.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TenantConfig {
    /// Unique name: letters, digits, `-` and `_`.
    pub name: String,
    /// The tenant's own SYN rate (default: `xdp.tenant_syn_rate`).
    pub syn_rate: Option<u64>,
    /// The tenant's own SYN burst (default: `xdp.tenant_syn_burst`).
    pub syn_burst: Option<u64>,
    /// Listeners dedicated to this tenant: their SYNs charge its budget.
    pub listen: Vec<Listener>,
    /// Prefix of this tenant's keys on the backends (default: the name).
    /// No spaces or control characters, at most
    /// [`MAX_NAMESPACE_LEN`] bytes, and no tenant's namespace may be a
    /// prefix of another's. See `tenant::KeyNamespace`.
    pub namespace: Option<String>,
    /// Who may connect as this tenant. Several at once allow rotation: add
    /// the new credential, move the clients, remove the old one. A username
    /// may repeat within this tenant (old and new password of one user) but
    /// never across tenants.
    pub credentials: Vec<CredentialConfig>,
    /// Client connections this tenant may hold at once, service-wide
    /// (0 = unlimited); each host takes 1/`[proxy] hosts` of it.
    pub max_connections: u64,
    /// Requests per second, service-wide (0 = unlimited; unset: `[proxy]`'s).
    pub max_requests_per_sec: Option<u64>,
    /// Burst for [`Self::max_requests_per_sec`] (unset: one second of the
    /// rate; `[proxy]`'s only when the rate is `[proxy]`'s too).
    pub requests_burst: Option<u64>,
    /// Request and reply bytes per second, service-wide (0 = unlimited;
    /// unset: `[proxy]`'s).
    pub max_bytes_per_sec: Option<u64>,
    /// Burst for [`Self::max_bytes_per_sec`], as for requests.
    pub bytes_burst: Option<u64>,
    /// Backend requests in flight at once, service-wide (0 = unlimited;
    /// unset: `[proxy]`'s).
    pub max_in_flight: Option<u64>,
}

/// Longest tenant namespace, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 40;

/// Longest credential username, in bytes.
pub const MAX_USERNAME_LEN: usize = 255;

/// Most credentials one username may have at once (rotation needs two).
pub const MAX_CREDENTIALS_PER_USER: usize = 4;

/// One credential of a tenant (`[[tenant.credentials]]`, or inline tables).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// The name the client authenticates with.
    pub username: String,
    /// The stored password, as printed by `guard tenant hash-password`:
    /// `pbkdf2-sha256$<iterations>$<salt>$<hash>`, checked as it is read.
    pub password_hash: PasswordHash,
    /// Whether this credential may only read (get/gets/gat…).
    #[serde(default)]
    pub read_only: bool,
}

impl TenantConfig {
    /// The key namespace in force: the configured one, else the name.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(&self.name)
    }
}

/// A listening address: `IP:PORT`, `[IPv6]:PORT`, or `*:PORT` for every
/// address of both families.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Listener {
    /// `None` for the wildcard.
    pub ip: Option<IpAddr>,
    /// The port.
    pub port: u16,
}

impl FromStr for Listener {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not ADDR:PORT (e.g. 0.0.0.0:11211, [::]:11211, *:11211)");
        if let Some(port) = s.strip_prefix("*:") {
            let port = port.parse::<u16>().map_err(|_| bad())?;
            return Ok(Self { ip: None, port });
        }
        let addr: SocketAddr = s.parse().map_err(|_| bad())?;
        Ok(Self {
            ip: Some(addr.ip()),
            port: addr.port(),
        })
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            None => write!(f, "*:{}", self.port),
            Some(ip) => write!(f, "{}", SocketAddr::new(ip, self.port)),
        }
    }
}

impl Serialize for Listener {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Listener {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Listener {
    /// The listener-map keys this listener stands for (two for `*`).
    pub fn keys(&self) -> Vec<ListenerKey> {
        let port = u32::from(self.port);
        let key = |ip: IpAddr| match ip {
            IpAddr::V4(a) => {
                let mut addr = [0u8; 16];
                addr[..4].copy_from_slice(&a.octets());
                ListenerKey {
                    addr,
                    family: FAMILY_V4,
                    port,
                }
            }
            IpAddr::V6(a) => ListenerKey {
                addr: a.octets(),
                family: FAMILY_V6,
                port,
            },
        };
        match self.ip {
            Some(ip) => vec![key(ip)],
            None => vec![
                key(Ipv4Addr::UNSPECIFIED.into()),
                key(Ipv6Addr::UNSPECIFIED.into()),
            ],
        }
    }
}

impl Config {
    /// Reads and parses a config file; the error names the file and the
    /// offending line.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("bad config file {}", path.display()))
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|e| {
            // One line, for logs and terminals alike: where, then what.
            let message = e.message().trim_end().replace('\n', "; ");
            match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    let source = text.lines().nth(line - 1).unwrap_or("").trim();
                    anyhow::anyhow!("line {line}, column {column} (`{source}`): {message}")
                }
                None => anyhow::anyhow!("{message}"),
            }
        })
    }

    /// Checks every rule the file format cannot express. Called once, after
    /// command-line overrides, before anything is attached.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.proxy.validate()?;
        self.admin.validate()?;
        self.escalation.validate()?;
        let x = &self.xdp;
        let mut seen = BTreeSet::new();
        for iface in &x.interfaces {
            if iface.is_empty() || iface.len() > 15 || iface.contains(['/', ' ']) {
                bail!("bad interface name `{iface}`: 1 to 15 characters, no `/` or spaces");
            }
            if !seen.insert(iface) {
                bail!("interface `{iface}` is listed twice");
            }
        }
        let protects_any =
            !x.protect.is_empty() || self.tenants.iter().any(|t| !t.listen.is_empty());
        if !x.interfaces.is_empty() && !protects_any {
            bail!("XDP needs at least one protected listener: add --protect ADDR:PORT");
        }
        check_budget("syn", x.syn_rate, x.syn_burst)?;
        check_budget("tenant-syn", x.tenant_syn_rate, x.tenant_syn_burst)?;
        check_budget("global-syn", x.global_syn_rate, x.global_syn_burst)?;
        check_budget("event", x.event_rate, x.event_burst)?;
        // The daemon reads every event it is sent: keep it a sample.
        if x.event_rate > MAX_EVENT_RATE || x.event_burst > MAX_EVENT_RATE {
            bail!(
                "event-rate and event-burst must be at most {MAX_EVENT_RATE}, got {} and {}",
                x.event_rate,
                x.event_burst
            );
        }
        if !(1..=3600).contains(&x.report_interval_secs) {
            bail!(
                "report-interval-secs must be 1..=3600, got {}",
                x.report_interval_secs
            );
        }
        if x.verified_secs > 30 * 86_400 {
            bail!(
                "verified-secs must be at most 2592000 (30 days), got {}",
                x.verified_secs
            );
        }
        if !(1..=128).contains(&x.ipv6_prefix) {
            bail!("ipv6-prefix must be 1..=128, got {}", x.ipv6_prefix);
        }
        for protect in &x.protect {
            if protect.port == 0 {
                bail!("protected listener `{protect}` has port 0");
            }
        }
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        let mut owned = std::collections::HashSet::new();
        for t in &self.tenants {
            if t.name.is_empty()
                || t.name.len() > 64
                || !t
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                bail!(
                    "bad tenant name `{}`: 1 to 64 letters, digits, `-` or `_`",
                    t.name
                );
            }
            if !names.insert(&t.name) {
                bail!("tenant `{}` is defined twice", t.name);
            }
            if !ids.insert(tenant_id(&t.name)) {
                bail!(
                    "tenant `{}` collides with another tenant's id: rename it",
                    t.name
                );
            }
            check_budget(
                &format!("tenant `{}` syn", t.name),
                t.syn_rate.unwrap_or(x.tenant_syn_rate),
                t.syn_burst.unwrap_or(x.tenant_syn_burst),
            )?;
            for l in &t.listen {
                if l.port == 0 {
                    bail!("tenant `{}` listener `{l}` has port 0", t.name);
                }
                for key in l.keys() {
                    if !owned.insert(key) {
                        bail!("listener `{l}` belongs to more than one tenant");
                    }
                }
            }
            check_tenant_budgets(t)?;
        }
        if self.proxy.keys == KeyMode::Raw && !self.tenants.is_empty() {
            bail!(
                "keys = \"raw\" is for the open tenant only: tenants' keys always live in \
                 their namespaces"
            );
        }
        check_namespaces(&self.tenants)?;
        check_credentials(&self.tenants)?;
        Ok(())
    }
}

/// A file using most of the XDP settings and two tenants, for the tests of
/// the config and of what is built from it.
#[cfg(test)]
pub(crate) const EXAMPLE: &str = r#"
[xdp]
interfaces = ["eth0", "eth1"]
mode = "skb"
protect = ["0.0.0.0:11211", "[::]:11211", "*:11300"]
syn_rate = 10
syn_burst = 20
ipv6_prefix = 56
allow_udp = true
syn_cookies = "on"
deny = ["192.0.2.0/24"]
allow = ["10.0.0.0/8", "2001:db8::/32"]

[[tenant]]
name = "acme"
syn_rate = 500
syn_burst = 600
listen = ["10.0.0.1:11212"]

[[tenant]]
name = "globex"
"#;

/// Most limit events per second (and burst) the XDP program may send.
const MAX_EVENT_RATE: u64 = 100_000;

fn check_budget(what: &str, rate: u64, burst: u64) -> anyhow::Result<()> {
    if rate > 0 && burst == 0 {
        bail!("{what}-burst must be at least 1 when {what}-rate is {rate}");
    }
    if rate > 1_000_000_000 {
        bail!("{what}-rate {rate} is above one per nanosecond");
    }
    Ok(())
}

/// Most proxy hosts a budget can be divided over.
pub const MAX_HOSTS: u64 = 10_000;

/// Highest request rate or burst: one request per nanosecond.
const MAX_REQUESTS: u64 = 1_000_000_000;
/// Highest byte rate or burst: 1 TiB.
const MAX_BYTES: u64 = 1 << 40;
/// Most requests in flight or connections a budget may name.
const MAX_COUNT: u64 = 10_000_000;

/// A tenant's request budgets as written (in `[proxy]` as defaults, or
/// in a `[[tenant]]`); `None` is unset.
struct Budgets {
    max_requests_per_sec: Option<u64>,
    requests_burst: Option<u64>,
    max_bytes_per_sec: Option<u64>,
    bytes_burst: Option<u64>,
    max_in_flight: Option<u64>,
}

/// Request budgets: 0 means unlimited, a burst is at least 1, and
/// nothing is beyond what the buckets can count. `who` prefixes the
/// message (`tenant `acme` `), empty for `[proxy]`, whose names are the
/// flags'.
fn check_request_budgets(who: &str, b: &Budgets) -> anyhow::Result<()> {
    let name = |field: &str| {
        if who.is_empty() {
            field.replace('_', "-")
        } else {
            format!("{who}{field}")
        }
    };
    for (field, value, max) in [
        ("max_requests_per_sec", b.max_requests_per_sec, MAX_REQUESTS),
        ("max_bytes_per_sec", b.max_bytes_per_sec, MAX_BYTES),
        ("max_in_flight", b.max_in_flight, MAX_COUNT),
    ] {
        if let Some(v) = value.filter(|&v| v > max) {
            bail!(
                "{} must be 0..={max} (0 means unlimited), got {v}",
                name(field)
            );
        }
    }
    for (field, value, max) in [
        ("requests_burst", b.requests_burst, MAX_REQUESTS),
        ("bytes_burst", b.bytes_burst, MAX_BYTES),
    ] {
        if let Some(v) = value.filter(|v| !(1..=max).contains(v)) {
            bail!(
                "{} must be 1..={max} (leave it out for one second of the rate), got {v}",
                name(field)
            );
        }
    }
    Ok(())
}

/// Per-tenant proxy budgets: 0 means unlimited; anything else must be
/// sane.
fn check_tenant_budgets(t: &TenantConfig) -> anyhow::Result<()> {
    if t.max_connections > MAX_COUNT {
        bail!(
            "tenant `{}` max_connections must be 0..={MAX_COUNT} (0 means unlimited), got {}",
            t.name,
            t.max_connections
        );
    }
    check_request_budgets(
        &format!("tenant `{}` ", t.name),
        &Budgets {
            max_requests_per_sec: t.max_requests_per_sec,
            requests_burst: t.requests_burst,
            max_bytes_per_sec: t.max_bytes_per_sec,
            bytes_burst: t.bytes_burst,
            max_in_flight: t.max_in_flight,
        },
    )
}

/// A service-wide budget's share on one of `hosts` proxy hosts: rounded
/// up, so a non-zero budget never becomes 0 (unlimited) on a host, and
/// the hosts together never enforce less than the file says.
pub fn per_host(budget: u64, hosts: u64) -> u64 {
    budget.div_ceil(hosts.max(1))
}

/// Namespaces: valid key bytes, bounded, unique, and prefix-free, so no
/// tenant's backend key can ever be read as another's.
fn check_namespaces(tenants: &[TenantConfig]) -> anyhow::Result<()> {
    for t in tenants {
        let ns = t.namespace();
        if ns.is_empty() || ns.len() > MAX_NAMESPACE_LEN {
            bail!(
                "tenant `{}` namespace `{ns}` must be 1 to {MAX_NAMESPACE_LEN} bytes",
                t.name
            );
        }
        if ns.bytes().any(|b| b <= b' ' || b == 0x7f) {
            bail!(
                "tenant `{}` namespace `{}` has a space or control character",
                t.name,
                ns.escape_debug()
            );
        }
        if ns.starts_with(INTERNAL_KEY_PREFIX) {
            bail!(
                "tenant `{}` namespace `{ns}`: `{INTERNAL_KEY_PREFIX}` starts guard's own keys",
                t.name
            );
        }
        let open = OPEN_NAMESPACE;
        if ns == open || ns.strip_prefix(open).is_some_and(|r| r.starts_with(':')) {
            bail!(
                "tenant `{}` namespace `{ns}`: `{open}` and `{open}:…` are the open tenant's",
                t.name
            );
        }
    }
    for (i, a) in tenants.iter().enumerate() {
        for b in &tenants[i + 1..] {
            let (na, nb) = (a.namespace(), b.namespace());
            if na == nb {
                bail!(
                    "tenants `{}` and `{}` share the namespace `{na}`",
                    a.name,
                    b.name
                );
            }
            if nb.starts_with(na) || na.starts_with(nb) {
                bail!(
                    "tenant `{}` namespace `{na}` and tenant `{}` namespace `{nb}`: one is a prefix of the other",
                    a.name,
                    b.name
                );
            }
        }
    }
    Ok(())
}

/// Credentials: well-formed hashes, usernames owned by one tenant only.
fn check_credentials(tenants: &[TenantConfig]) -> anyhow::Result<()> {
    let mut owner: std::collections::HashMap<&str, (&str, usize)> = Default::default();
    let mut pairs = std::collections::HashSet::new();
    for t in tenants {
        for c in &t.credentials {
            let u = &c.username;
            if u.is_empty() || u.len() > MAX_USERNAME_LEN {
                bail!(
                    "tenant `{}` has a username of {} bytes: 1 to {MAX_USERNAME_LEN}",
                    t.name,
                    u.len()
                );
            }
            if u.bytes().any(|b| b <= b' ' || b == 0x7f) {
                bail!(
                    "tenant `{}` username `{}` has a space or control character",
                    t.name,
                    u.escape_debug()
                );
            }
            let entry = owner.entry(u.as_str()).or_insert((t.name.as_str(), 0));
            if entry.0 != t.name {
                bail!(
                    "username `{u}` belongs to tenants `{}` and `{}`: usernames are unique across tenants",
                    entry.0,
                    t.name
                );
            }
            entry.1 += 1;
            if entry.1 > MAX_CREDENTIALS_PER_USER {
                bail!("username `{u}` has more than {MAX_CREDENTIALS_PER_USER} credentials");
            }
            if !pairs.insert((u.as_str(), c.password_hash.to_string())) {
                bail!(
                    "tenant `{}` lists user `{u}` with the same password_hash twice",
                    t.name
                );
            }
        }
    }
    Ok(())
}

/// The escalation ladder (`[escalation]`): the proxy counts misbehaviour per
/// source address, and a source that crosses a threshold within a window
/// is put on a stricter XDP SYN budget for a while, then, if it goes on, on
/// the deny list for a while; each step lasts longer on repeat and is
/// forgotten by itself when the source behaves. Takes effect only where
/// the proxy and XDP run in one process. Every threshold counts events per
/// source within [`Self::window_secs`]; 0 turns that signal off.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EscalationConfig {
    /// Whether misbehaviour escalates at all.
    pub enabled: bool,
    /// The window every threshold below is counted in, in seconds.
    pub window_secs: u64,
    /// Connection churn: connections closed by their client within
    /// [`Self::churn_lifetime_ms`] of opening.
    pub churn_connections: u32,
    /// How young a connection must be when its client closes it to count
    /// as churn.
    pub churn_lifetime_ms: u64,
    /// Failed authentications (wrong credentials).
    pub auth_failures: u32,
    /// Connections closed for a protocol error that lost the stream.
    pub protocol_errors: u32,
    /// Connections refused at the per-source cap or their tenant's cap.
    pub refused_connections: u32,
    /// Connections closed by the idle, request-read or authentication
    /// deadline without having sent one whole request.
    pub silent_connections: u32,
    /// A source on the strict budget whose SYNs it drops in this many
    /// seconds (not necessarily in a row) of that step is denied.
    pub strict_overrun_secs: u32,
    /// The strict budget: SYNs per second (never above `[xdp] syn_rate`,
    /// which applies instead when lower; see [`Self::strict_limit`]).
    pub strict_syn_rate: u64,
    /// The strict budget's burst.
    pub strict_syn_burst: u64,
    /// How long the first strict step lasts; each repeat doubles it.
    pub strict_secs: u64,
    /// The longest a strict step lasts.
    pub max_strict_secs: u64,
    /// How long the first deny lasts; each repeat doubles it. A deny is
    /// followed by a strict step.
    pub deny_secs: u64,
    /// The longest a deny lasts.
    pub max_deny_secs: u64,
    /// Every this many seconds without an offence (counted from the end of
    /// the last step), one repeat of each step is forgotten.
    pub forget_secs: u64,
    /// Sources whose signals are counted at once (memory is fixed: about
    /// 64 bytes each); beyond it the lightest are forgotten.
    pub tracked_sources: usize,
}

impl Default for EscalationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            // Long enough to tell a pattern from an accident, short
            // enough that a burst of reconnects after a backend outage
            // spreads over several windows.
            window_secs: 10,
            // Ten short connections a second, sustained: far more than a
            // client that keeps its connections, and than a fleet behind
            // a NAT restarting.
            churn_connections: 100,
            churn_lifetime_ms: 1_000,
            // A mistyped password is one or two; ten in ten seconds is a
            // guesser (or a client stuck on an old credential, which the
            // strict budget only slows).
            auth_failures: 10,
            // A real client library never loses the stream; five in ten
            // seconds is a scanner or a fuzzer.
            protocol_errors: 5,
            // A source already at its cap that keeps dialling.
            refused_connections: 50,
            // Connections held open without a request: a slow-loris.
            silent_connections: 20,
            // Three seconds of SYNs dropped by the strict budget: the
            // source did not slow down.
            strict_overrun_secs: 3,
            // One new connection a second: a client that keeps its
            // connections barely notices, a churner is cut to nothing.
            strict_syn_rate: 1,
            strict_syn_burst: 5,
            strict_secs: 60,
            max_strict_secs: 3_600,
            deny_secs: 300,
            max_deny_secs: 86_400,
            forget_secs: 600,
            tracked_sources: 16_384,
        }
    }
}

/// The longest any escalation step or memory may last: 30 days.
const MAX_ESCALATION_SECS: u64 = 30 * 86_400;

impl EscalationConfig {
    /// The strict budget as it applies: never looser than the per-source
    /// budget it replaces (a per-source rate or burst below it wins).
    pub fn strict_limit(&self, xdp: &XdpConfig) -> (u64, u64) {
        if xdp.syn_rate == 0 {
            return (self.strict_syn_rate, self.strict_syn_burst);
        }
        (
            self.strict_syn_rate.min(xdp.syn_rate),
            self.strict_syn_burst.min(xdp.syn_burst.max(1)),
        )
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !(1..=3_600).contains(&self.window_secs) {
            bail!(
                "escalation window-secs must be 1..=3600, got {}",
                self.window_secs
            );
        }
        for (name, v) in [
            ("churn-connections", self.churn_connections),
            ("auth-failures", self.auth_failures),
            ("protocol-errors", self.protocol_errors),
            ("refused-connections", self.refused_connections),
            ("silent-connections", self.silent_connections),
            ("strict-overrun-secs", self.strict_overrun_secs),
        ] {
            // Counted in 16 bits per source.
            if v > 65_535 {
                bail!("{name} must be 0..=65535 (0 turns the signal off), got {v}");
            }
        }
        if !(1..=60_000).contains(&self.churn_lifetime_ms) {
            bail!(
                "churn-lifetime-ms must be 1..=60000, got {}",
                self.churn_lifetime_ms
            );
        }
        if !(1..=1_000_000).contains(&self.strict_syn_rate)
            || !(1..=1_000_000).contains(&self.strict_syn_burst)
        {
            bail!(
                "strict-syn-rate and strict-syn-burst must be 1..=1000000, got {} and {}",
                self.strict_syn_rate,
                self.strict_syn_burst
            );
        }
        for (name, first, max) in [
            ("strict", self.strict_secs, self.max_strict_secs),
            ("deny", self.deny_secs, self.max_deny_secs),
        ] {
            if !(1..=MAX_ESCALATION_SECS).contains(&first) {
                bail!("{name}-secs must be 1..={MAX_ESCALATION_SECS}, got {first}");
            }
            if !(first..=MAX_ESCALATION_SECS).contains(&max) {
                bail!(
                    "max-{name}-secs must be {name}-secs ({first})..={MAX_ESCALATION_SECS}, got {max}"
                );
            }
        }
        if !(1..=MAX_ESCALATION_SECS).contains(&self.forget_secs) {
            bail!(
                "forget-secs must be 1..={MAX_ESCALATION_SECS}, got {}",
                self.forget_secs
            );
        }
        if !(64..=1 << 20).contains(&self.tracked_sources) {
            bail!(
                "tracked-sources must be 64..=1048576, got {}",
                self.tracked_sources
            );
        }
        Ok(())
    }
}

/// A tenant's id in the XDP maps: a hash of its name, so it stays the same
/// across reloads and restarts however the config file is reordered. Never
/// [`DEFAULT_TENANT`].
pub fn tenant_id(name: &str) -> u32 {
    // FNV-1a: stable, tiny, and collisions are rejected by `validate`.
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    if h == DEFAULT_TENANT { 1 } else { h }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_without_interfaces() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn ejection_settings_parse_and_are_bounded() {
        let base =
            "[proxy]\nlisten = [\"127.0.0.1:11311\"]\nbackends = [{ addr = \"10.0.0.5:11211\" }]\n";
        let c = Config::parse(base).unwrap();
        c.validate().unwrap();
        assert_eq!(c.proxy.eject, EjectPolicy::Redistribute);
        assert_eq!(c.proxy.keys, KeyMode::Namespaced);
        assert_eq!(c.proxy.eject_after_errors, 3);
        assert_eq!(c.proxy.max_ejected_percent, 50);
        let c = Config::parse(&format!(
            "{base}eject = \"fail-fast\"\nkeys = \"raw\"\noutlier_ratio = 2.5\n\
             outlier_min_gap_ms = 0\neject_time_ms = 100\nmax_eject_time_ms = 100\n"
        ))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.proxy.eject, EjectPolicy::FailFast);
        assert_eq!(c.proxy.keys, KeyMode::Raw);
        assert_eq!(c.proxy.outlier_ratio, 2.5);
        let e = Config::parse(&format!("{base}eject = \"drop\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `drop`"), "{e}");
        type Change = fn(&mut ProxyConfig);
        let bad: [(Change, &str); 8] = [
            (
                |p| p.eject_after_errors = 1001,
                "eject-after-errors must be 0..=1000",
            ),
            (
                |p| p.outlier_ratio = 1.0,
                "outlier-ratio must be 0 (never) or 1.1..=1000",
            ),
            (|p| p.outlier_ratio = f64::NAN, "outlier-ratio"),
            (|p| p.outlier_min_gap_ms = 60_001, "outlier-min-gap-ms"),
            (
                |p| p.outlier_interval_ms = 10,
                "outlier-interval-ms must be 50..=60000",
            ),
            (
                |p| p.max_ejected_percent = 101,
                "max-ejected-percent must be 0..=100",
            ),
            (
                |p| p.eject_time_ms = 5,
                "eject-time-ms must be 10..=86400000",
            ),
            (
                |p| p.max_eject_time_ms = 50,
                "max-eject-time-ms must be eject-time-ms (10000)",
            ),
        ];
        for (break_it, wanted) in bad {
            let mut c = Config::parse(base).unwrap();
            break_it(&mut c.proxy);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(wanted), "{e} (wanted {wanted})");
        }
        // Raw keys have no namespace to keep tenants apart.
        let mut c = Config::parse(EXAMPLE).unwrap();
        c.proxy.keys = KeyMode::Raw;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("open tenant only"), "{e}");
        // `~` starts guard's own keys.
        let mut c = Config::parse(EXAMPLE).unwrap();
        c.tenants[0].namespace = Some("~acme".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("starts guard's own keys"), "{e}");
    }

    #[test]
    fn parses_full_file() {
        let c = Config::parse(EXAMPLE).unwrap();
        c.validate().unwrap();
        assert_eq!(c.xdp.mode, XdpModeSetting::Skb);
        assert_eq!(c.xdp.protect.len(), 3);
        assert_eq!(c.tenants.len(), 2);
        assert_eq!(c.tenants[0].syn_rate, Some(500));
        assert_eq!(c.xdp.ipv6_prefix, 56);
        assert_eq!(c.xdp.syn_cookies, SynCookies::On);
        assert_eq!(Config::default().xdp.syn_cookies, SynCookies::Auto);
        let off = Config::parse("[xdp]\nsyn_cookies = \"off\"\n").unwrap();
        assert_eq!(off.xdp.syn_cookies, SynCookies::Off);
        let e = Config::parse("[xdp]\nsyn_cookies = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant"), "{e}");
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let e = Config::parse("[xdp]\nsyn_rat = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `syn_rat`"), "{e}");
        let e = Config::parse("[xdp]\nprotect = [\"11211\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not ADDR:PORT"), "{e}");
        let e = Config::parse("[xdp]\ndeny = [\"10.0.0.0/40\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad prefix length"), "{e}");
        let e = Config::parse("[xdp]\nmode = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant"), "{e}");
        for (file, wanted) in [
            (
                "[xdp]\nevent_rate = 200000\n",
                "event-rate and event-burst must be at most",
            ),
            (
                "[xdp]\nevent_rate = 10\nevent_burst = 0\n",
                "event-burst must be at least 1",
            ),
            (
                "[xdp]\nreport_interval_secs = 0\n",
                "report-interval-secs must be 1..=3600",
            ),
        ] {
            let e = Config::parse(file)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.contains(wanted), "{file}: {e}");
        }
    }

    #[test]
    fn validate_names_the_problem() {
        let mut c = Config::default();
        c.xdp.interfaces = vec!["eth0".into()];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--protect"), "{e}");

        c.xdp.protect = vec!["*:11211".parse().unwrap()];
        c.validate().unwrap();

        c.xdp.syn_burst = 0;
        assert!(c.validate().unwrap_err().to_string().contains("syn-burst"));
        c.xdp.syn_burst = 1;

        c.xdp.ipv6_prefix = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("ipv6-prefix")
        );
        c.xdp.ipv6_prefix = 64;

        c.xdp.interfaces = vec!["a-very-long-interface-name".into()];
        assert!(c.validate().unwrap_err().to_string().contains("interface"));
        c.xdp.interfaces = vec!["eth0".into(), "eth0".into()];
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        c.xdp.interfaces = vec!["eth0".into()];

        c.tenants = vec![
            TenantConfig {
                name: "a".into(),
                listen: vec!["10.0.0.1:1".parse().unwrap()],
                ..Default::default()
            },
            TenantConfig {
                name: "b".into(),
                listen: vec!["10.0.0.1:1".parse().unwrap()],
                ..Default::default()
            },
        ];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("more than one tenant")
        );
        c.tenants[1].name = "a".into();
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        c.tenants[1].name = "bad name".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("bad tenant name")
        );
    }

    #[test]
    fn proxy_section() {
        let c = Config::parse(
            r#"
            [proxy]
            listen = ["127.0.0.1:11311"]
            backends = [{ addr = "10.0.0.5:11211", weight = 2 }, { addr = "[::1]:11211" }]
            request_timeout_ms = 100
            miss_on_backend_error = true
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.proxy.backends[1].weight, 1);
        assert_eq!(c.proxy.request_timeout_ms, 100);
        assert_eq!(c.proxy.connect_timeout_ms, 200);
        assert!(c.proxy.miss_on_backend_error);
        let e = Config::parse("[proxy]\nlisten_on = []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");

        let mut c = c;
        c.proxy.backends.clear();
        assert!(c.validate().unwrap_err().to_string().contains("--backend"));
        c.proxy.backends = vec!["10.0.0.5:11211:0".parse().unwrap()];
        assert!(c.validate().unwrap_err().to_string().contains("weight 0"));
        c.proxy.backends = vec!["10.0.0.5:11211".parse().unwrap()];
        c.proxy.max_pipeline_depth = 0;
        assert!(c.validate().unwrap_err().to_string().contains("pipeline"));
        c.proxy.max_pipeline_depth = 1;
        assert_eq!(c.proxy.auth_timeout_ms, 2_000);
        c.proxy.auth_timeout_ms = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("auth-timeout")
        );
        c.proxy.auth_timeout_ms = 100;
        c.validate().unwrap();

        for (ns, ok) in [("_", false), ("_:x", false), ("_x", true), ("x_", true)] {
            c.tenants = vec![TenantConfig {
                name: "t".into(),
                namespace: Some(ns.into()),
                ..Default::default()
            }];
            assert_eq!(c.validate().is_ok(), ok, "{ns}");
        }
    }

    #[test]
    fn backend_max_in_flight_defaults_and_bounds() {
        let mut c = Config::parse(
            "[proxy]\nlisten = [\"127.0.0.1:11311\"]\nbackends = [{ addr = \"10.0.0.5:11211\" }]\n\
             backend_max_in_flight = 64\n",
        )
        .unwrap();
        assert_eq!(c.proxy.backend_max_in_flight, 64);
        assert_eq!(ProxyConfig::default().backend_max_in_flight, 1024);
        for (max, ok) in [(0, false), (1, true), (1_000_000, true), (1_000_001, false)] {
            c.proxy.backend_max_in_flight = max;
            match c.validate() {
                Ok(()) => assert!(ok, "{max} accepted"),
                Err(e) => {
                    assert!(!ok, "{max} refused: {e}");
                    assert!(
                        e.to_string()
                            .contains("backend-max-in-flight must be 1..=1000000"),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn backlog_defaults_and_bounds() {
        let mut c = Config::parse(
            "[proxy]\nlisten = [\"127.0.0.1:11311\"]\nbackends = [{ addr = \"10.0.0.5:11211\" }]\n",
        )
        .unwrap();
        assert_eq!(c.proxy.backlog, 4096);
        c.validate().unwrap();
        for (backlog, ok) in [(0, false), (1, true), (65_535, true), (65_536, false)] {
            c.proxy.backlog = backlog;
            match c.validate() {
                Ok(()) => assert!(ok, "{backlog} accepted"),
                Err(e) => {
                    assert!(!ok, "{backlog} refused: {e}");
                    let e = e.to_string();
                    assert!(e.contains("backlog must be 1..=65535"), "{e}");
                    assert!(e.contains(&backlog.to_string()), "{e}");
                }
            }
        }
        let c = Config::parse("[proxy]\nbacklog = 128\n").unwrap();
        assert_eq!(c.proxy.backlog, 128);
        let e = Config::parse("[proxy]\nbacklog = -1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("backlog"), "{e}");
    }

    #[test]
    fn backend_parsing() {
        let b: BackendConfig = "10.0.0.5:11211:3".parse().unwrap();
        assert_eq!((b.addr.port(), b.weight), (11211, 3));
        let b: BackendConfig = "[::1]:11211:2".parse().unwrap();
        assert_eq!(b.weight, 2);
        let b: BackendConfig = "[::1]:11211".parse().unwrap();
        assert_eq!(b.weight, 1);
        assert!("10.0.0.5".parse::<BackendConfig>().is_err());
        assert!("10.0.0.5:1:x".parse::<BackendConfig>().is_err());
    }

    #[test]
    fn listener_parsing() {
        let l: Listener = "*:11211".parse().unwrap();
        assert_eq!(l.keys().len(), 2);
        let l: Listener = "[2001:db8::1]:11211".parse().unwrap();
        assert_eq!(l.keys()[0].family, FAMILY_V6);
        assert_eq!(l.to_string(), "[2001:db8::1]:11211");
        assert!("10.0.0.1".parse::<Listener>().is_err());
        assert!("10.0.0.1:99999".parse::<Listener>().is_err());
    }

    /// The names serde reads for `T`: its `deserialize_struct` call names
    /// every field (renames applied, `Option`s included), which a
    /// serialized default would leave out.
    fn fields_of<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
        use serde::de::{Error as _, Visitor, value::Error};
        struct Grab(Option<&'static [&'static str]>);
        impl<'de> serde::Deserializer<'de> for &mut Grab {
            type Error = Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
                Err(Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Error> {
                self.0 = Some(fields);
                Err(Error::custom("fields taken"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
                enum identifier ignored_any
            }
        }
        let mut grab = Grab(None);
        let _ = T::deserialize(&mut grab);
        grab.0.expect("a struct")
    }

    /// Every key in `wanted` that `have` lacks, named by `path`, and so on
    /// down every table `wanted` has.
    fn missing(path: &str, wanted: &toml::Table, have: &toml::Table, out: &mut Vec<String>) {
        for (key, value) in wanted {
            let at = format!("{path}{key}");
            match (value, have.get(key)) {
                (_, None) => out.push(at),
                (toml::Value::Table(w), Some(toml::Value::Table(h))) => {
                    missing(&format!("{at}."), w, h, out)
                }
                _ => {}
            }
        }
    }

    /// `guard.example.toml`, at the top of the repository, is a valid
    /// configuration (as `guard run --check` reads it) that sets every
    /// option there is, each under a comment that names its default: an
    /// option (or a table) added to the config without the example fails
    /// here.
    #[test]
    fn the_example_file_has_every_option_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guard.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config = Config::load(&path).unwrap();
        config.validate().unwrap();
        let example: toml::Table = toml::from_str(&text).unwrap();
        let mut absent = Vec::new();
        // Whatever tables the default has, however deep (a table added
        // later included).
        let toml::Value::Table(default) = toml::Value::try_from(Config::default()).unwrap() else {
            panic!("the config is a table")
        };
        missing("", &default, &example, &mut absent);
        // Every field serde reads, `Option`s and the entries of arrays of
        // tables included: the union over the example's entries.
        let keys_of = |v: Option<&toml::Value>| -> BTreeSet<String> {
            match v {
                Some(toml::Value::Table(t)) => t.keys().cloned().collect(),
                Some(toml::Value::Array(a)) => a
                    .iter()
                    .filter_map(|e| e.as_table())
                    .flat_map(|t| t.keys().cloned())
                    .collect(),
                _ => BTreeSet::new(),
            }
        };
        let tenants = example.get("tenant");
        let backends = example.get("proxy").and_then(|p| p.get("backends"));
        let credentials = toml::Value::Array(
            tenants
                .and_then(|t| t.as_array())
                .into_iter()
                .flatten()
                .filter_map(|t| t.get("credentials")?.as_array())
                .flatten()
                .cloned()
                .collect(),
        );
        for (what, have, fields) in [
            (
                "",
                keys_of(Some(&toml::Value::Table(example.clone()))),
                fields_of::<Config>(),
            ),
            (
                "xdp.",
                keys_of(example.get("xdp")),
                fields_of::<XdpConfig>(),
            ),
            (
                "proxy.",
                keys_of(example.get("proxy")),
                fields_of::<ProxyConfig>(),
            ),
            (
                "proxy.backends.",
                keys_of(backends),
                fields_of::<BackendConfig>(),
            ),
            ("tenant.", keys_of(tenants), fields_of::<TenantConfig>()),
            (
                "tenant.credentials.",
                keys_of(Some(&credentials)),
                fields_of::<CredentialConfig>(),
            ),
            (
                "escalation.",
                keys_of(example.get("escalation")),
                fields_of::<EscalationConfig>(),
            ),
        ] {
            absent.extend(
                fields
                    .iter()
                    .filter(|f| !have.contains(**f))
                    .map(|f| format!("{what}{f}")),
            );
        }
        absent.sort();
        absent.dedup();
        assert!(absent.is_empty(), "guard.example.toml lacks {absent:?}");

        // Each key of [xdp], [proxy], [admin] and the first [[tenant]] sits under a
        // comment (shared by a run of keys) that names its default.
        let mut comment = String::new();
        let mut after_key = false;
        let mut tenants_seen = 0;
        let mut keys_checked = 0;
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') {
                if after_key {
                    comment.clear();
                }
                comment.push_str(line);
                after_key = false;
            } else if line.is_empty() {
                comment.clear();
            } else if line == "[[tenant]]" {
                tenants_seen += 1;
            } else if let Some((key, _)) = line.split_once('=')
                && !line.starts_with('{')
                && tenants_seen <= 1
            {
                let key = key.trim();
                assert!(
                    comment.to_lowercase().contains("default"),
                    "guard.example.toml: `{key}` has no comment naming its default"
                );
                keys_checked += 1;
                after_key = true;
            }
        }
        assert!(keys_checked >= 60, "only {keys_checked} keys checked");
    }

    #[test]
    fn escalation_defaults_parse_and_are_bounded() {
        let c = Config::parse("").unwrap();
        assert!(c.escalation.enabled);
        assert_eq!(c.escalation, EscalationConfig::default());
        let c = Config::parse(
            "[escalation]\nenabled = false\nwindow_secs = 2\nauth_failures = 0\n\
             strict_syn_rate = 5\nstrict_syn_burst = 5\nstrict_secs = 3\nmax_strict_secs = 3\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert!(!c.escalation.enabled);
        assert_eq!(
            (c.escalation.window_secs, c.escalation.auth_failures),
            (2, 0)
        );
        let e = Config::parse("[escalation]\nchurn = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `churn`"), "{e}");
        type Change = fn(&mut Config);
        let bad: [(Change, &str); 8] = [
            (
                |c| c.escalation.window_secs = 0,
                "escalation window-secs must be 1..=3600, got 0",
            ),
            (
                |c| c.escalation.auth_failures = 70_000,
                "auth-failures must be 0..=65535",
            ),
            (
                |c| c.escalation.churn_lifetime_ms = 0,
                "churn-lifetime-ms must be 1..=60000",
            ),
            (|c| c.escalation.strict_syn_rate = 0, "strict-syn-rate"),
            (|c| c.escalation.strict_secs = 0, "strict-secs must be 1..="),
            (
                |c| c.escalation.max_deny_secs = 10,
                "max-deny-secs must be deny-secs (300)",
            ),
            (|c| c.escalation.forget_secs = 0, "forget-secs must be 1..="),
            (
                |c| c.escalation.tracked_sources = 10,
                "tracked-sources must be 64..=1048576",
            ),
        ];
        for (break_it, wanted) in bad {
            let mut c = Config::default();
            break_it(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(wanted), "{e} (wanted {wanted})");
        }
        // Never looser than the per-source budget it replaces; with
        // unlimited per-source SYNs any strict budget is stricter.
        let mut c = Config::default();
        assert_eq!(c.escalation.strict_limit(&c.xdp), (1, 5));
        c.escalation.strict_syn_rate = 1_000;
        c.escalation.strict_syn_burst = 1_000;
        c.validate().unwrap();
        assert_eq!(c.escalation.strict_limit(&c.xdp), (50, 100));
        c.xdp.syn_rate = 0;
        assert_eq!(c.escalation.strict_limit(&c.xdp), (1_000, 1_000));
    }

    #[test]
    fn tenant_ids_are_stable_and_nonzero() {
        assert_eq!(tenant_id("acme"), tenant_id("acme"));
        assert_ne!(tenant_id("acme"), tenant_id("globex"));
        assert_ne!(tenant_id(""), DEFAULT_TENANT);
    }
}
