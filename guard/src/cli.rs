//! Command-line interface: `guard run`, `guard xdp …`, `guard deny|allow …`,
//! `guard probe …`.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::{
    cidr::Cidr,
    config::{
        BackendConfig, Config, EjectPolicy, KeyMode, Listener, OUTLIER_RATIOS, ProxyConfig,
        SynCookies, XdpModeSetting,
    },
    paths::{DEFAULT_PIN_ROOT, DEFAULT_STATE_ROOT, Paths},
    proxy::probe::ProbeSettings,
};

/// guard: an XDP connection guard in front of a multi-tenant memcache proxy.
#[derive(Debug, Parser)]
#[command(
    name = "guard",
    version,
    about,
    long_about = "guard: an XDP program that drops connection storms before the kernel \
        allocates anything for them, and the daemon that loads it and runs a multi-tenant \
        memcache proxy behind it. `guard run` is the daemon; the other commands work on \
        its pinned state whether it runs or not.",
    after_long_help = "Logging: RUST_LOG (e.g. info, debug). Every option of the config file: \
        guard.example.toml. Running it in production: docs/operations.md (several hosts: \
        docs/fleet.md).",
    propagate_version = true
)]
pub struct Cli {
    /// Root of guard's pins in bpffs.
    #[arg(long, global = true, env = "GUARD_PIN_ROOT", default_value = DEFAULT_PIN_ROOT, hide_short_help = true)]
    pub pin_root: PathBuf,
    /// Directory for guard's runtime state.
    #[arg(long, global = true, env = "GUARD_STATE_ROOT", default_value = DEFAULT_STATE_ROOT, hide_short_help = true)]
    pub state_root: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The pin and state locations chosen.
    pub fn paths(&self) -> Paths {
        Paths::new(&self.pin_root, &self.state_root)
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: the XDP guard on --iface and the memcache proxy on
    /// --listen, until SIGINT or SIGTERM (the proxy drains; the XDP
    /// program stays attached). SIGHUP re-reads the config file.
    Run(Box<RunArgs>),
    /// Inspect or remove the pinned XDP program (with or without the
    /// daemon).
    #[command(subcommand)]
    Xdp(XdpCommand),
    /// Sources whose SYNs are dropped, in the pinned maps (the daemon
    /// need not run).
    #[command(subcommand)]
    Deny(CidrCommand),
    /// Sources whose SYNs pass without being charged, in the pinned maps
    /// (the daemon need not run).
    #[command(subcommand)]
    Allow(CidrCommand),
    /// Sources that proved who they are: their SYNs skip the shared and
    /// host budgets.
    #[command(subcommand)]
    Verified(VerifiedCommand),
    /// Tenant credentials.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// What the running daemon does: tenants, backends, the XDP guard.
    /// Asks its admin endpoint; when the daemon is down, reads the pinned
    /// XDP state instead.
    Status(StatusArgs),
    /// Check memcached nodes before they serve: each must store, return
    /// and delete correctly, and answer about as fast as its peers. Fails
    /// if any candidate does not.
    Probe(ProbeArgs),
}

/// `guard status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the admin endpoint's JSON (or, with the daemon down, the
    /// pinned state's) instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// The daemon's config file: where its admin endpoint listens and
    /// the token it wants.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The admin endpoint, if not the config file's (or the default
    /// 127.0.0.1:9311).
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin: Option<SocketAddr>,
}

/// `guard probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Nodes to check.
    #[arg(required = true, value_name = "ADDR:PORT")]
    pub candidates: Vec<SocketAddr>,
    /// Healthy nodes to compare them with (one or more).
    #[arg(long, value_name = "ADDR:PORT", num_args = 1..)]
    pub against: Vec<SocketAddr>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Slower than this many times the peers' median fails (0 = latency
    /// not judged).
    #[arg(long, value_parser = outlier_ratio, default_value_t = ProxyConfig::default().outlier_ratio)]
    pub outlier_ratio: f64,
    /// ... when also at least this many milliseconds above it.
    #[arg(long, default_value_t = ProxyConfig::default().outlier_min_gap_ms)]
    pub outlier_min_gap_ms: u64,
    /// Connect timeout and each request's timeout, in milliseconds.
    #[arg(
        long,
        default_value_t = ProbeSettings::default().request_timeout.as_millis() as u64,
        value_parser = clap::value_parser!(u64).range(1..=60_000)
    )]
    pub timeout_ms: u64,
    /// Set/get/delete/get cycles per node, each request timed.
    #[arg(
        long,
        default_value_t = ProbeSettings::default().round_trips as u32,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub round_trips: u32,
}

fn outlier_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if r == 0.0 || OUTLIER_RATIOS.contains(&r) {
        Ok(r)
    } else {
        Err(format!(
            "must be 0 (latency not judged) or {}..={}",
            OUTLIER_RATIOS.start(),
            OUTLIER_RATIOS.end()
        ))
    }
}

/// `guard tenant …`.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Read a password from standard input and print its stored form for a
    /// tenant's `password_hash` (PBKDF2-HMAC-SHA256, random salt).
    HashPassword {
        /// PBKDF2 iterations.
        #[arg(long, default_value_t = crate::tenant::password::DEFAULT_ITERATIONS)]
        iterations: u32,
    },
}

/// `guard xdp …`.
#[derive(Debug, Subcommand)]
pub enum XdpCommand {
    /// Counters, mode and interfaces of the pinned guard.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Detach from every interface and remove every pin.
    Detach,
    /// Why was my client dropped? Logs the verdict on each SYN from
    /// sources in CIDR (listener, budget that decided, tokens left) for a
    /// while, through the running daemon's admin endpoint; at most 50
    /// lines a second per trace. The trace ends by itself.
    Trace(TraceArgs),
}

/// `guard xdp trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The sources to trace: an address or prefix, e.g. 192.0.2.7 or
    /// 2001:db8::/64.
    pub cidr: Cidr,
    /// How long: seconds, or with a unit (`30s`, `5m`); at most 10m.
    #[arg(long = "for", value_name = "DURATION", default_value = "30s", value_parser = trace_duration)]
    pub duration: u64,
    /// The daemon's config file: where its admin endpoint listens and
    /// the token it wants.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The admin endpoint, if not the config file's (or the default
    /// 127.0.0.1:9311).
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin: Option<SocketAddr>,
}

/// `30`, `30s`, `5m`: whole seconds, 1 to
/// [`crate::ebpf::trace::MAX_TRACE_SECS`].
fn trace_duration(s: &str) -> Result<u64, String> {
    let (n, unit) = match s.strip_suffix('m') {
        Some(n) => (n, 60),
        None => (s.strip_suffix('s').unwrap_or(s), 1),
    };
    let max = crate::ebpf::trace::MAX_TRACE_SECS;
    n.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|secs| (1..=max).contains(secs))
        .ok_or_else(|| format!("`{s}` is not a duration of 1s to {max}s (e.g. 30s, 5m)"))
}

/// `guard verified …`.
#[derive(Debug, Subcommand)]
pub enum VerifiedCommand {
    /// The verified sources, their tenants and when they lapse.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Take a source's verified status away (it regains it at its next
    /// login).
    Del {
        /// The address (an IPv6 address stands for its prefix).
        source: std::net::IpAddr,
    },
}

/// `guard deny|allow …`.
#[derive(Debug, Subcommand)]
pub enum CidrCommand {
    /// Add (or replace) a prefix.
    Add {
        /// An address or prefix, e.g. 192.0.2.0/24 or 2001:db8::/48.
        cidr: Cidr,
        /// Remove the entry after this many seconds.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        ttl: Option<u64>,
    },
    /// Remove a prefix.
    Del {
        /// The prefix as added.
        cidr: Cidr,
    },
    /// List the prefixes.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `--admin ADDR:PORT`, or `off`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AdminListen(pub Option<std::net::SocketAddr>);

impl std::str::FromStr for AdminListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|_| format!("`{s}` is not ADDR:PORT or off (e.g. 127.0.0.1:9311)"))
    }
}

/// Flags of `guard run`. Each overrides the config file's value.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// TOML config file; SIGHUP re-reads it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Check the configuration (the file and the flags), print it, and
    /// exit: nothing is attached or bound.
    #[arg(long)]
    pub check: bool,
    /// Interface to attach the XDP guard to (repeatable).
    #[arg(long = "iface", value_name = "IF")]
    pub interfaces: Vec<String>,
    /// XDP mode: auto (driver, else skb), drv, or skb (default auto).
    #[arg(long)]
    pub xdp_mode: Option<XdpModeSetting>,
    /// Protected listener, ADDR:PORT or *:PORT (repeatable).
    #[arg(long, value_name = "ADDR:PORT")]
    pub protect: Vec<Listener>,
    /// SYNs per second per source (default 50; 0 = unlimited).
    #[arg(long)]
    pub syn_rate: Option<u64>,
    /// SYN burst per source (default 100).
    #[arg(long)]
    pub syn_burst: Option<u64>,
    /// SYNs per second per tenant, and for sources with no tenant together
    /// (default 2000).
    #[arg(long)]
    pub tenant_syn_rate: Option<u64>,
    /// SYN burst per tenant (default 4000).
    #[arg(long)]
    pub tenant_syn_burst: Option<u64>,
    /// SYNs per second for the whole host (default 20000; 0 = unlimited).
    #[arg(long)]
    pub global_syn_rate: Option<u64>,
    /// SYN burst for the whole host (default 40000).
    #[arg(long)]
    pub global_syn_burst: Option<u64>,
    /// Limit events per second XDP describes to the daemon, host-wide
    /// (default 200; 0 = none; every crossing is still counted).
    #[arg(long)]
    pub event_rate: Option<u64>,
    /// Burst of limit events (default 400).
    #[arg(long)]
    pub event_burst: Option<u64>,
    /// Seconds between the log's summaries of what XDP dropped (default 10).
    #[arg(long)]
    pub report_interval_secs: Option<u64>,
    /// IPv6 sources share a bucket per prefix of this length (default 64).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=128))]
    pub ipv6_prefix: Option<u8>,
    /// Pass UDP to protected ports instead of dropping it (memcached's UDP
    /// is a reflection vector).
    #[arg(long)]
    pub allow_udp: bool,
    /// Seconds a source stays verified after a login (default 3600; 0 =
    /// never verify).
    #[arg(long)]
    pub verified_secs: Option<u64>,
    /// Admin endpoint (/metrics, /status, the status page), ADDR:PORT or
    /// `off`.
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin: Option<AdminListen>,
    /// Let the admin endpoint listen on a non-loopback address (needs
    /// `[admin] token` in the config file).
    #[arg(long)]
    pub admin_allow_remote: bool,
    /// SYN cookies from XDP for sources with no tenant: auto (default;
    /// when the shared budgets are spent), on (always) or off.
    #[arg(long)]
    pub syn_cookies: Option<SynCookies>,
    /// Deny a source prefix (repeatable; added to the config file's).
    #[arg(long, value_name = "CIDR")]
    pub deny: Vec<Cidr>,
    /// Allow a source prefix (repeatable; added to the config file's).
    #[arg(long, value_name = "CIDR")]
    pub allow: Vec<Cidr>,
    /// Address the memcache proxy listens on (repeatable).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<std::net::SocketAddr>,
    /// Accept queue length of each listener (default 4096; capped by
    /// net.core.somaxconn).
    #[arg(long)]
    pub backlog: Option<u32>,
    /// memcached backend: its address and port, and optionally its ketama
    /// weight (default 1) (repeatable).
    #[arg(long, value_name = "ADDR:PORT[:WEIGHT]")]
    pub backend: Vec<BackendConfig>,
    /// Backend connect timeout in milliseconds (default 200).
    #[arg(long)]
    pub connect_timeout_ms: Option<u64>,
    /// Backend request timeout in milliseconds (default 250).
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// Persistent, pipelined connections per backend (default 2).
    #[arg(long)]
    pub backend_connections: Option<usize>,
    /// Most requests outstanding on one backend connection; more are
    /// refused at once (default 1024).
    #[arg(long)]
    pub backend_max_in_flight: Option<usize>,
    /// Runtime threads (default 0: one on up to two CPUs, else one per
    /// CPU; 1: everything on one thread).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Most client connections at once (default 50000; lowered to what the
    /// descriptor limit holds).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Most client connections per source address (default 1000; 0 =
    /// unlimited).
    #[arg(long)]
    pub max_connections_per_source: Option<usize>,
    /// Close idle client connections after this many seconds (default 300;
    /// 0 = never).
    #[arg(long)]
    pub idle_timeout_secs: Option<u64>,
    /// Close a client whose request stays incomplete this many
    /// milliseconds (default 5000; 0 = never).
    #[arg(long)]
    pub request_read_timeout_ms: Option<u64>,
    /// Largest value a client may store, in bytes (default 1048576).
    #[arg(long)]
    pub max_value_size: Option<usize>,
    /// Most requests in flight per client connection (default 256).
    #[arg(long)]
    pub max_pipeline_depth: Option<usize>,
    /// Answer reads with a miss instead of an error when a backend fails.
    #[arg(long)]
    pub miss_on_backend_error: bool,
    /// Seconds in-flight requests get to finish after SIGTERM (default 5).
    #[arg(long)]
    pub drain_grace_secs: Option<u64>,
    /// With tenants, milliseconds a client has to authenticate (default
    /// 2000).
    #[arg(long)]
    pub auth_timeout_ms: Option<u64>,
    /// The open tenant's keys: namespaced (default), or raw (stored and
    /// hashed as the client sent them, as twemproxy does).
    #[arg(long)]
    pub keys: Option<KeyMode>,
    /// An ejected backend's keys: redistribute (default; to the next live
    /// backend) or fail-fast (answered with an error at once).
    #[arg(long)]
    pub eject: Option<EjectPolicy>,
    /// Consecutive backend failures that eject it (default 3; 0 = never).
    #[arg(long)]
    pub eject_after_errors: Option<u32>,
    /// Latency outlier: a p90 this many times its peers' median (default
    /// 3; 0 = never).
    #[arg(long)]
    pub outlier_ratio: Option<f64>,
    /// Latency outlier: and at least this many milliseconds above it
    /// (default 10).
    #[arg(long)]
    pub outlier_min_gap_ms: Option<u64>,
    /// Milliseconds between latency comparisons; an outlier two in a row
    /// is ejected (default 500).
    #[arg(long)]
    pub outlier_interval_ms: Option<u64>,
    /// Most backends ejected at once, percent of the pool (default 50).
    #[arg(long)]
    pub max_ejected_percent: Option<u32>,
    /// First ejection's length in milliseconds; doubles on each repeat
    /// (default 10000).
    #[arg(long)]
    pub eject_time_ms: Option<u64>,
    /// Longest ejection in milliseconds (default 300000).
    #[arg(long)]
    pub max_eject_time_ms: Option<u64>,
    /// Each tenant's requests per second, service-wide, unless it sets its
    /// own; also the open tenant's (default 0 = unlimited).
    #[arg(long)]
    pub max_requests_per_sec: Option<u64>,
    /// Burst for --max-requests-per-sec (default: one second of it).
    #[arg(long)]
    pub requests_burst: Option<u64>,
    /// Each tenant's request and reply bytes per second, service-wide
    /// (default 0 = unlimited).
    #[arg(long)]
    pub max_bytes_per_sec: Option<u64>,
    /// Burst for --max-bytes-per-sec (default: one second of it).
    #[arg(long)]
    pub bytes_burst: Option<u64>,
    /// Each tenant's backend requests in flight, service-wide (default 0 =
    /// unlimited).
    #[arg(long)]
    pub max_in_flight: Option<u64>,
    /// Proxy hosts sharing the budgets: each enforces 1/N of them (default
    /// 1).
    #[arg(long)]
    pub hosts: Option<u64>,
    /// The escalation ladder: on or off.
    #[arg(long, value_name = "on|off", value_parser = clap::builder::BoolishValueParser::new())]
    pub escalation: Option<bool>,
    /// Seconds each escalation threshold is counted in.
    #[arg(long)]
    pub escalation_window_secs: Option<u64>,
    /// Escalate a source after this many connections it closed young (0 = off).
    #[arg(long)]
    pub churn_connections: Option<u32>,
    /// How young, in milliseconds, a closed connection counts as churn.
    #[arg(long)]
    pub churn_lifetime_ms: Option<u64>,
    /// Escalate a source after this many failed authentications (0 = off).
    #[arg(long)]
    pub auth_failures: Option<u32>,
    /// Escalate a source after this many stream-losing protocol errors (0 = off).
    #[arg(long)]
    pub protocol_errors: Option<u32>,
    /// Escalate a source after this many connections refused at a cap (0 = off).
    #[arg(long)]
    pub refused_connections: Option<u32>,
    /// Escalate a source after this many connections closed without a request (0 = off).
    #[arg(long)]
    pub silent_connections: Option<u32>,
    /// Deny a source on the strict budget after this many seconds of SYNs it drops (0 = off).
    #[arg(long)]
    pub strict_overrun_secs: Option<u32>,
    /// The strict SYN budget, per second.
    #[arg(long)]
    pub strict_syn_rate: Option<u64>,
    /// The strict SYN budget's burst.
    #[arg(long)]
    pub strict_syn_burst: Option<u64>,
    /// First strict step, in seconds; doubles on each repeat.
    #[arg(long)]
    pub strict_secs: Option<u64>,
    /// First deny, in seconds; doubles on each repeat.
    #[arg(long)]
    pub deny_secs: Option<u64>,
    /// Seconds of good behaviour that forget one repeat of each step.
    #[arg(long)]
    pub forget_secs: Option<u64>,
}

impl RunArgs {
    /// Reads the config file (if any), applies the flags, validates.
    pub fn resolve(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        self.apply(&mut config);
        config.validate()?;
        Ok(config)
    }

    fn apply(&self, c: &mut Config) {
        let x = &mut c.xdp;
        if !self.interfaces.is_empty() {
            x.interfaces = self.interfaces.clone();
        }
        if let Some(m) = self.xdp_mode {
            x.mode = m;
        }
        if !self.protect.is_empty() {
            x.protect = self.protect.clone();
        }
        let set = |dst: &mut u64, v: Option<u64>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        set(&mut x.syn_rate, self.syn_rate);
        set(&mut x.syn_burst, self.syn_burst);
        set(&mut x.tenant_syn_rate, self.tenant_syn_rate);
        set(&mut x.tenant_syn_burst, self.tenant_syn_burst);
        set(&mut x.global_syn_rate, self.global_syn_rate);
        set(&mut x.global_syn_burst, self.global_syn_burst);
        set(&mut x.event_rate, self.event_rate);
        set(&mut x.event_burst, self.event_burst);
        set(&mut x.report_interval_secs, self.report_interval_secs);
        set(&mut x.verified_secs, self.verified_secs);
        if let Some(p) = self.ipv6_prefix {
            x.ipv6_prefix = p;
        }
        if self.allow_udp {
            x.allow_udp = true;
        }
        if let Some(m) = self.syn_cookies {
            x.syn_cookies = m;
        }
        x.deny.extend(self.deny.iter().copied());
        x.allow.extend(self.allow.iter().copied());

        if let Some(AdminListen(a)) = self.admin {
            c.admin.listen = a;
        }
        if self.admin_allow_remote {
            c.admin.allow_remote = true;
        }
        let p = &mut c.proxy;
        if !self.listen.is_empty() {
            p.listen = self.listen.clone();
        }
        if !self.backend.is_empty() {
            p.backends = self.backend.clone();
        }
        set(&mut p.connect_timeout_ms, self.connect_timeout_ms);
        set(&mut p.request_timeout_ms, self.request_timeout_ms);
        set(&mut p.idle_timeout_secs, self.idle_timeout_secs);
        set(&mut p.request_read_timeout_ms, self.request_read_timeout_ms);
        set(&mut p.drain_grace_secs, self.drain_grace_secs);
        if let Some(b) = self.backlog {
            p.backlog = b;
        }
        set(&mut p.auth_timeout_ms, self.auth_timeout_ms);
        set(&mut p.outlier_min_gap_ms, self.outlier_min_gap_ms);
        set(&mut p.outlier_interval_ms, self.outlier_interval_ms);
        set(&mut p.eject_time_ms, self.eject_time_ms);
        set(&mut p.max_eject_time_ms, self.max_eject_time_ms);
        set(&mut p.max_requests_per_sec, self.max_requests_per_sec);
        set(&mut p.max_bytes_per_sec, self.max_bytes_per_sec);
        set(&mut p.max_in_flight, self.max_in_flight);
        set(&mut p.hosts, self.hosts);
        if self.requests_burst.is_some() {
            p.requests_burst = self.requests_burst;
        }
        if self.bytes_burst.is_some() {
            p.bytes_burst = self.bytes_burst;
        }
        if let Some(k) = self.keys {
            p.keys = k;
        }
        if let Some(e) = self.eject {
            p.eject = e;
        }
        if let Some(n) = self.eject_after_errors {
            p.eject_after_errors = n;
        }
        if let Some(r) = self.outlier_ratio {
            p.outlier_ratio = r;
        }
        if let Some(n) = self.max_ejected_percent {
            p.max_ejected_percent = n;
        }
        let set = |dst: &mut usize, v: Option<usize>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        set(&mut p.backend_connections, self.backend_connections);
        set(&mut p.backend_max_in_flight, self.backend_max_in_flight);
        set(&mut p.threads, self.threads);
        set(&mut p.max_connections, self.max_connections);
        set(
            &mut p.max_connections_per_source,
            self.max_connections_per_source,
        );
        set(&mut p.max_value_size, self.max_value_size);
        set(&mut p.max_pipeline_depth, self.max_pipeline_depth);
        if self.miss_on_backend_error {
            p.miss_on_backend_error = true;
        }
        self.apply_escalation(&mut c.escalation);
    }

    fn apply_escalation(&self, e: &mut crate::config::EscalationConfig) {
        fn set<T: Copy>(dst: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *dst = v;
            }
        }
        set(&mut e.enabled, self.escalation);
        set(&mut e.window_secs, self.escalation_window_secs);
        set(&mut e.churn_connections, self.churn_connections);
        set(&mut e.churn_lifetime_ms, self.churn_lifetime_ms);
        set(&mut e.auth_failures, self.auth_failures);
        set(&mut e.protocol_errors, self.protocol_errors);
        set(&mut e.refused_connections, self.refused_connections);
        set(&mut e.silent_connections, self.silent_connections);
        set(&mut e.strict_overrun_secs, self.strict_overrun_secs);
        set(&mut e.strict_syn_rate, self.strict_syn_rate);
        set(&mut e.strict_syn_burst, self.strict_syn_burst);
        set(&mut e.strict_secs, self.strict_secs);
        set(&mut e.deny_secs, self.deny_secs);
        set(&mut e.forget_secs, self.forget_secs);
        // A first step longer than the default longest one raises the cap
        // with it, rather than making the flag fail validation.
        e.max_strict_secs = e.max_strict_secs.max(e.strict_secs);
        e.max_deny_secs = e.max_deny_secs.max(e.deny_secs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("guard").chain(args.iter().copied()))
    }

    #[test]
    fn run_flags_override_defaults() {
        let cli = parse(&[
            "run",
            "--iface",
            "eth0",
            "--iface",
            "eth1",
            "--xdp-mode",
            "skb",
            "--protect",
            "*:11211",
            "--syn-rate",
            "7",
            "--syn-burst",
            "9",
            "--ipv6-prefix",
            "48",
            "--syn-cookies",
            "off",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.xdp.interfaces, ["eth0", "eth1"]);
        assert_eq!(c.xdp.mode, XdpModeSetting::Skb);
        assert_eq!(c.xdp.syn_rate, 7);
        assert_eq!(c.xdp.syn_burst, 9);
        assert_eq!(c.xdp.ipv6_prefix, 48);
        assert_eq!(c.xdp.syn_cookies, SynCookies::Off);
        let e = parse(&["run", "--syn-cookies", "always"]).unwrap_err();
        assert!(e.to_string().contains("use auto, on or off"), "{e}");
    }

    #[test]
    fn trace_durations_are_bounded() {
        assert_eq!(trace_duration("30"), Ok(30));
        assert_eq!(trace_duration("30s"), Ok(30));
        assert_eq!(trace_duration("5m"), Ok(300));
        assert_eq!(trace_duration("10m"), Ok(600));
        for bad in [
            "0",
            "0s",
            "11m",
            "601s",
            "",
            "s",
            "-1",
            "1h",
            "99999999999999999999m",
        ] {
            assert!(trace_duration(bad).is_err(), "{bad:?}");
        }
        let cli = parse(&["xdp", "trace", "192.0.2.7/32", "--for", "5s"]).unwrap();
        let Command::Xdp(XdpCommand::Trace(t)) = cli.command else {
            panic!("not a trace: {:?}", cli.command)
        };
        assert_eq!(
            (t.cidr.to_string().as_str(), t.duration),
            ("192.0.2.7/32", 5)
        );
    }

    #[test]
    fn proxy_flags_override_the_file() {
        let cli = parse(&[
            "run",
            "--listen",
            "127.0.0.1:11311",
            "--backend",
            "127.0.0.1:11211:2",
            "--backend",
            "127.0.0.1:11212",
            "--request-timeout-ms",
            "50",
            "--backlog",
            "128",
            "--miss-on-backend-error",
            "--eject",
            "fail-fast",
            "--keys",
            "raw",
            "--eject-after-errors",
            "5",
            "--outlier-ratio",
            "4.5",
            "--outlier-min-gap-ms",
            "7",
            "--outlier-interval-ms",
            "250",
            "--max-ejected-percent",
            "25",
            "--eject-time-ms",
            "100",
            "--max-eject-time-ms",
            "800",
            "--max-requests-per-sec",
            "500",
            "--requests-burst",
            "50",
            "--max-bytes-per-sec",
            "1048576",
            "--bytes-burst",
            "2097152",
            "--max-in-flight",
            "8",
            "--hosts",
            "4",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.proxy.listen.len(), 1);
        assert_eq!(c.proxy.backends[0].weight, 2);
        assert_eq!(c.proxy.request_timeout_ms, 50);
        assert_eq!(c.proxy.backlog, 128);
        assert!(c.proxy.miss_on_backend_error);
        assert_eq!(c.proxy.eject, EjectPolicy::FailFast);
        assert_eq!(c.proxy.keys, KeyMode::Raw);
        assert_eq!(c.proxy.eject_after_errors, 5);
        assert_eq!(c.proxy.outlier_ratio, 4.5);
        assert_eq!(c.proxy.outlier_min_gap_ms, 7);
        assert_eq!(c.proxy.outlier_interval_ms, 250);
        assert_eq!(c.proxy.max_ejected_percent, 25);
        assert_eq!(
            (c.proxy.eject_time_ms, c.proxy.max_eject_time_ms),
            (100, 800)
        );
        let p = &c.proxy;
        assert_eq!((p.max_requests_per_sec, p.requests_burst), (500, Some(50)));
        assert_eq!(
            (p.max_bytes_per_sec, p.bytes_burst),
            (1 << 20, Some(2 << 20))
        );
        assert_eq!((p.max_in_flight, p.hosts), (8, 4));
        assert!(parse(&["run", "--backend", "nohost"]).is_err());
        let e = parse(&["run", "--eject", "drop"]).unwrap_err().to_string();
        assert!(e.contains("unknown eject policy `drop`"), "{e}");
        let e = parse(&["run", "--keys", "plain"]).unwrap_err().to_string();
        assert!(e.contains("unknown key mode `plain`"), "{e}");
    }

    #[test]
    fn escalation_flags_override_the_file() {
        let cli = parse(&[
            "run",
            "--escalation",
            "off",
            "--escalation-window-secs",
            "2",
            "--churn-connections",
            "20",
            "--churn-lifetime-ms",
            "500",
            "--auth-failures",
            "3",
            "--protocol-errors",
            "0",
            "--refused-connections",
            "7",
            "--silent-connections",
            "8",
            "--strict-overrun-secs",
            "2",
            "--strict-syn-rate",
            "5",
            "--strict-syn-burst",
            "6",
            "--strict-secs",
            "4",
            "--deny-secs",
            "100000",
            "--forget-secs",
            "9",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let e = args.resolve().unwrap().escalation;
        assert!(!e.enabled);
        assert_eq!((e.window_secs, e.churn_connections), (2, 20));
        assert_eq!((e.churn_lifetime_ms, e.auth_failures), (500, 3));
        assert_eq!((e.protocol_errors, e.refused_connections), (0, 7));
        assert_eq!((e.silent_connections, e.strict_overrun_secs), (8, 2));
        assert_eq!((e.strict_syn_rate, e.strict_syn_burst), (5, 6));
        assert_eq!((e.strict_secs, e.max_strict_secs), (4, 3_600));
        assert_eq!((e.deny_secs, e.max_deny_secs), (100_000, 100_000));
        assert_eq!(e.forget_secs, 9);
        let on = parse(&["run", "--escalation", "on"]).unwrap();
        let Command::Run(args) = on.command else {
            panic!("not run")
        };
        assert!(args.resolve().unwrap().escalation.enabled);
        assert!(parse(&["run", "--escalation", "maybe"]).is_err());
    }

    #[test]
    fn bad_flags_are_rejected_with_the_reason() {
        let e = parse(&["run", "--xdp-mode", "turbo"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown XDP mode"), "{e}");
        let e = parse(&["run", "--protect", "11211"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ADDR:PORT"), "{e}");
        let e = parse(&["run", "--ipv6-prefix", "200"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("200"), "{e}");
        let e = parse(&["deny", "add", "10.0.0.0/99"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefix length"), "{e}");
        let e = parse(&["deny", "add", "10.0.0.1", "--ttl", "0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("0"), "{e}");
        let cli = parse(&["run", "--iface", "eth0"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let e = args.resolve().unwrap_err().to_string();
        assert!(e.contains("--protect"), "{e}");
        let cli = parse(&[
            "run",
            "--listen",
            "127.0.0.1:11311",
            "--backend",
            "127.0.0.1:11211",
            "--backlog",
            "0",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let e = args.resolve().unwrap_err().to_string();
        assert_eq!(e, "backlog must be 1..=65535, got 0");
        for (flag, value, wanted) in [
            ("--hosts", "0", "hosts must be 1..=10000, got 0"),
            (
                "--requests-burst",
                "0",
                "requests-burst must be 1..=1000000000 (leave it out for one second of the rate), got 0",
            ),
            (
                "--max-in-flight",
                "20000000",
                "max-in-flight must be 0..=10000000 (0 means unlimited), got 20000000",
            ),
        ] {
            let cli = parse(&["run", flag, value]).unwrap();
            let Command::Run(args) = cli.command else {
                panic!("not run")
            };
            assert_eq!(args.resolve().unwrap_err().to_string(), wanted);
        }
        let e = parse(&["run", "--max-bytes-per-sec", "lots"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-bytes-per-sec"), "{e}");
    }

    #[test]
    fn probe_flags_take_the_proxy_defaults_and_several_peers() {
        let cli = parse(&[
            "probe",
            "127.0.0.1:1",
            "[::1]:2",
            "--against",
            "127.0.0.1:3",
            "127.0.0.1:4",
        ])
        .unwrap();
        let Command::Probe(args) = cli.command else {
            panic!("not probe")
        };
        assert_eq!(args.candidates.len(), 2);
        assert_eq!(args.against.len(), 2);
        let proxy = ProxyConfig::default();
        assert_eq!(args.outlier_ratio, proxy.outlier_ratio);
        assert_eq!(args.outlier_min_gap_ms, proxy.outlier_min_gap_ms);
        assert_eq!((args.timeout_ms, args.round_trips), (250, 20));
        let cli = parse(&[
            "probe",
            "127.0.0.1:1",
            "--outlier-ratio",
            "0",
            "--against",
            "127.0.0.1:3",
            "--against",
            "127.0.0.1:4",
        ])
        .unwrap();
        let Command::Probe(args) = cli.command else {
            panic!("not probe")
        };
        assert_eq!(args.outlier_ratio, 0.0);
        assert_eq!(args.against.len(), 2);
        assert!(parse(&["probe", "127.0.0.1:1", "--outlier-ratio", "1000.5"]).is_err());
    }

    /// Every `guard run` flag that overrides a setting with a single
    /// default names that default, as `Config::default()` has it: the
    /// help cannot drift from the code.
    #[test]
    fn run_flags_name_their_defaults() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let run = cli.find_subcommand("run").expect("run");
        let toml::Value::Table(defaults) = toml::Value::try_from(Config::default()).unwrap() else {
            panic!("the config is a table")
        };
        let mut checked = 0;
        for arg in run.get_arguments() {
            let Some(long) = arg.get_long() else {
                continue;
            };
            let key = match long {
                "xdp-mode" => "mode".to_owned(),
                l => l.replace('-', "_"),
            };
            let Some(value) = ["xdp", "proxy"]
                .iter()
                .find_map(|t| defaults.get(*t).and_then(|t| t.get(&key)))
            else {
                continue;
            };
            let wanted = match value {
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::String(s) => s.clone(),
                // Lists (empty by default) and switches (off).
                _ => continue,
            };
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(
                help.contains(&format!("default {wanted}"))
                    || help.contains(&format!("{wanted} (default")),
                "--{long}: {help:?} does not name its default {wanted}"
            );
            checked += 1;
        }
        assert!(checked >= 35, "only {checked} flags checked");
    }

    #[test]
    fn config_file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("guard-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[xdp]\nsyn_rate = \"fast\"\n").unwrap();
        let args = RunArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let e = format!("{:#}", args.resolve().unwrap_err());
        assert!(e.contains("bad.toml"), "{e}");
        assert!(e.contains("syn_rate"), "{e}");
        let missing = RunArgs {
            config: Some(dir.join("missing.toml")),
            ..Default::default()
        };
        assert!(format!("{:#}", missing.resolve().unwrap_err()).contains("cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
