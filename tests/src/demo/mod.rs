//! `cargo xtask demo`: the incident of `DESIGN.md`, replayed on one
//! machine, before and after.
//!
//! One [`World`](world::World) — a server and a client network namespace
//! joined by a veth pair, three memcached in the server namespace (the
//! third behind a [`DelayRelay`](crate::DelayRelay), the node whose
//! network can turn slow), and the client source addresses — serves two
//! runs of the same [`Script`]:
//!
//! - **before**: nutcracker (twemproxy) in front of the three memcached,
//!   configured as the provider likely ran it (ketama over md5,
//!   `auto_eject_hosts`), no XDP;
//! - **after**: guard, its XDP program on the server's veth and its proxy
//!   with three tenants (credentials and budgets), defaults otherwise.
//!
//! The same clients ([`load`]) run the same phases against each: calm,
//! a noisy tenant at ten times its budget, a slow node that later heals,
//! a reconnect storm beside a spoofed SYN flood, recovery. [`watch`]
//! samples the proxy port's sockets and the proxy's ejections while they
//! run, [`report`] turns what was recorded into per-phase figures, a
//! table and JSON, [`chart`] draws them with plotters, and [`checks`]
//! says where "after" must beat "before" by a wide margin.
//!
//! nutcracker has no authentication: "before" clients skip the login and
//! their tenants are told apart by key prefix only. Everything else they
//! send is the same bytes, at the same pace, from the same addresses.

pub mod chart;
pub mod checks;
pub mod load;
pub mod report;
pub mod run;
pub mod watch;
pub mod world;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// Set by SIGINT/SIGTERM: every phase and client loop ends soon after,
/// and what was started is removed by its owner's drop.
static STOP: AtomicBool = AtomicBool::new(false);

/// Whether the demo was asked to stop.
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM set [`stopped`] instead of killing the
/// process, so its drops remove namespaces, interfaces and processes.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Which side of the comparison a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// nutcracker, no XDP.
    Before,
    /// guard: XDP and proxy.
    After,
}

impl Side {
    /// `before` or `after`.
    pub fn name(self) -> &'static str {
        match self {
            Side::Before => "before",
            Side::After => "after",
        }
    }
}

/// A guard mechanism "after" can run without, to show which check
/// catches its absence (`--after-without`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// No tenant request, byte or in-flight budgets.
    Budgets,
    /// No ejection of slow or failing backends.
    Ejection,
    /// The proxy alone, no XDP program.
    Xdp,
}

impl Mechanism {
    /// Parses `budgets`, `ejection` or `xdp`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "budgets" => Some(Self::Budgets),
            "ejection" => Some(Self::Ejection),
            "xdp" => Some(Self::Xdp),
            _ => None,
        }
    }

    /// The name `parse` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Budgets => "budgets",
            Self::Ejection => "ejection",
            Self::Xdp => "xdp",
        }
    }
}

/// What the command line asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// The short script (CI).
    pub quick: bool,
    /// Where the SVG goes; the JSON (and HTML) go beside it.
    pub out: PathBuf,
    /// Also write an HTML page.
    pub html: bool,
    /// Exit non-zero when a check fails.
    pub check: bool,
    /// Run "after" without this mechanism.
    pub without: Option<Mechanism>,
}

/// The phases, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseKind {
    /// Three tenants at steady load.
    Calm,
    /// One tenant offers ten times its budget.
    Noisy,
    /// One backend's replies are delayed, then heal.
    Slow,
    /// The slow node again; clients with short timeouts reconnect in a
    /// loop beside a spoofed SYN flood.
    Storm,
    /// Back to calm.
    Recovery,
}

/// One phase of the script.
#[derive(Clone, Debug)]
pub struct Phase {
    /// Which.
    pub kind: PhaseKind,
    /// Shown in tables and charts.
    pub name: &'static str,
    /// How long it lasts.
    pub length: Duration,
}

/// The numbers of a run. The full script and `--quick` differ only in
/// phase lengths and in the size of the storm and the flood.
#[derive(Clone, Debug)]
pub struct Script {
    /// In order.
    pub phases: Vec<Phase>,
    /// Tenant names; the first is the noisy one.
    pub tenants: [&'static str; 3],
    /// Each tenant's steady requests a second, through the whole run.
    pub steady_rate: u32,
    /// Connections each tenant's steady load uses.
    pub steady_connections: usize,
    /// How long a client waits for a reply before it gives up, closes
    /// the connection and reconnects (the incident's clients did).
    pub client_timeout: Duration,
    /// Each tenant's request budget in guard (requests a second).
    pub budget: u32,
    /// Each tenant's byte budget in guard (bytes a second).
    pub byte_budget: u64,
    /// Each tenant's in-flight budget in guard (backend requests).
    pub in_flight_budget: u32,
    /// The noisy tenant offers this many times its budget.
    pub spike_factor: u32,
    /// Its spike's connections.
    pub spike_connections: usize,
    /// Gets written at once on each spike connection.
    pub spike_depth: usize,
    /// Large values the spike reads (stored before the run).
    pub spike_keys: usize,
    /// Bytes of each.
    pub spike_value: usize,
    /// The slow node's added reply delay.
    pub slow_delay: Duration,
    /// When in the slow-node phase it heals.
    pub heal_after: Duration,
    /// Connection attempts of the reconnect storm, in all.
    pub storm_attempts: usize,
    /// Storm clients, each from its own source address.
    pub storm_sources: usize,
    /// How long a storm client waits for its connect.
    pub storm_connect_timeout: Duration,
    /// Spoofed SYNs a second beside the storm.
    pub flood_rate: u64,
}

impl Script {
    /// The full script: about a minute per side.
    pub fn full() -> Self {
        Self::with(
            [8.0, 10.0, 14.0, 12.0, 8.0],
            Duration::from_secs(8),
            16_000,
            96,
            100_000,
        )
    }

    /// The short script for CI: smaller storm and flood, short phases.
    pub fn quick() -> Self {
        Self::with(
            [2.0, 3.0, 6.0, 4.0, 2.0],
            Duration::from_secs(5),
            3_000,
            48,
            50_000,
        )
    }

    fn with(
        secs: [f64; 5],
        heal_after: Duration,
        storm_attempts: usize,
        storm_sources: usize,
        flood_rate: u64,
    ) -> Self {
        let kinds = [
            (PhaseKind::Calm, "calm"),
            (PhaseKind::Noisy, "noisy tenant"),
            (PhaseKind::Slow, "slow node"),
            (PhaseKind::Storm, "reconnect storm"),
            (PhaseKind::Recovery, "recovery"),
        ];
        Script {
            phases: kinds
                .iter()
                .zip(secs)
                .map(|(&(kind, name), s)| Phase {
                    kind,
                    name,
                    length: Duration::from_secs_f64(s),
                })
                .collect(),
            tenants: ["acme", "globex", "initech"],
            steady_rate: 200,
            steady_connections: 4,
            client_timeout: Duration::from_millis(100),
            budget: 1_000,
            byte_budget: 16 << 20,
            in_flight_budget: 64,
            spike_factor: 10,
            spike_connections: 32,
            spike_depth: 64,
            spike_keys: 128,
            spike_value: 64 * 1024,
            slow_delay: Duration::from_millis(200),
            heal_after,
            storm_attempts,
            storm_sources,
            storm_connect_timeout: Duration::from_millis(300),
            flood_rate,
        }
    }

    /// The whole run's length.
    pub fn length(&self) -> Duration {
        self.phases.iter().map(|p| p.length).sum()
    }

    /// When each phase starts and ends, from the run's start.
    pub fn bounds(&self) -> Vec<(Duration, Duration)> {
        let mut at = Duration::ZERO;
        self.phases
            .iter()
            .map(|p| {
                let b = (at, at + p.length);
                at += p.length;
                b
            })
            .collect()
    }

    /// One line saying what happens in a phase.
    pub fn describe(&self, kind: PhaseKind) -> String {
        let [noisy, ..] = self.tenants;
        let t = self.client_timeout.as_millis();
        match kind {
            PhaseKind::Calm => format!(
                "three tenants, {} requests/s each on {} connections (80% gets, 20% sets of \
                 100 bytes); clients give up after {t} ms and reconnect",
                self.steady_rate, self.steady_connections
            ),
            PhaseKind::Noisy => format!(
                "{noisy} also offers {} requests/s, {}× its budget of {}/s: pipelined gets of \
                 {} KiB values on {} connections ({} MiB/s, {}× its byte budget)",
                self.budget * self.spike_factor,
                self.spike_factor,
                self.budget,
                self.spike_value / 1024,
                self.spike_connections,
                (u64::from(self.budget * self.spike_factor) * self.spike_value as u64) >> 20,
                u64::from(self.budget * self.spike_factor) * self.spike_value as u64
                    / self.byte_budget
            ),
            PhaseKind::Slow => format!(
                "node-c's network turns slow (replies {} ms late), healed after {} s",
                self.slow_delay.as_millis(),
                self.heal_after.as_secs()
            ),
            PhaseKind::Storm => format!(
                "node-c slow again; {} clients from {} addresses with {t} ms timeouts reconnect \
                 in a loop ({} connection attempts), beside a spoofed SYN flood of {}/s from \
                 10.128.0.0/9",
                self.storm_sources, self.storm_sources, self.storm_attempts, self.flood_rate
            ),
            PhaseKind::Recovery => "node-c healed, the steady load alone".to_string(),
        }
    }
}
