//! The memcache proxy that runs behind the XDP guard.
//!
//! Following a request: [`listener`] accepts the client (global and
//! per-source caps), [`session`] authenticates it when tenants are
//! configured ([`auth`], [`crate::tenant`]), reads its requests in
//! whichever protocol it speaks through its [`connection`] and writes
//! replies in order, [`command`] translates
//! each request into meta requests for the backends (keys in the tenant's
//! [`crate::tenant::KeyNamespace`]) and the replies back, after charging
//! it to the tenant's budgets ([`crate::tenant::budget`]), [`router`] picks
//! the backend with [`ketama`] and fans multi-key gets out, and [`backend`]
//! pipelines everything over a few persistent connections per memcached.
//! A failure on the way is an [`error::ProxyError`]: its side, kind and
//! cause go to the log, fixed words to the client. Apart from the data
//! path, [`probe`] checks a backend on a connection of its own (is it
//! correct, is it as fast as its peers) before it may serve.

pub mod auth;
pub mod backend;
pub mod command;
pub mod connection;
pub mod ejection;
pub mod error;
pub mod fair;
pub mod generations;
pub mod health;
pub mod ketama;
pub mod listener;
pub mod probe;
pub mod router;
pub mod session;
pub mod stats;

use std::{
    future::Future,
    net::IpAddr,
    sync::{Arc, OnceLock, atomic::AtomicU64},
    time::Duration,
};

use log::{info, warn};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc, watch},
};

pub use error::ProxyError;

use crate::{
    config::{KeyMode, ProxyConfig},
    protocol::Limits,
    tenant::{SharedRegistry, TenantBudgets, TenantConnections, TenantRegistry},
};
use backend::BackendSettings;
use listener::SourceLimits;
use router::Router;
use stats::ProxyStats;

/// What `version` answers.
pub fn version() -> String {
    format!("guard-{}", env!("CARGO_PKG_VERSION"))
}

/// Lifecycle of the proxy, as seen by listeners and sessions.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Serving.
    Running,
    /// No new connections or requests; in-flight requests finish.
    Draining,
    /// The grace period is over: close everything now.
    Stopped,
}

/// What the proxy tells the XDP side of a client that proved who it is:
/// a login, or on the open tenant a first valid request. Its source's
/// SYNs then charge its tenant, and it is verified (see `ebpf::maps`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    pub source: IpAddr,
    /// The tenant's id (`DEFAULT_TENANT` for the open tenant).
    pub tenant: u32,
    /// Which credential proved it ([`crate::tenant::Identity::credential_id`]),
    /// 0 on the open tenant: a reload that revokes it takes the source's
    /// verified status back.
    pub credential: u32,
}

/// What the proxy shares with the daemon around it.
#[derive(Clone)]
pub struct ProxyContext {
    /// The tenants in force; the daemon swaps them on SIGHUP.
    pub tenants: Arc<SharedRegistry>,
    /// Where successful authentications are reported (best effort: a full
    /// channel drops the report, never blocks a session).
    pub learned: Option<mpsc::Sender<Learned>>,
    /// XDP limit events the daemon has received, for `stats`; zero
    /// without XDP.
    pub limit_events: Arc<AtomicU64>,
    /// The backend lists of reloaded configurations; `None`: the
    /// backends never change.
    pub backends: Option<watch::Receiver<Vec<crate::config::BackendConfig>>>,
    /// Set once the proxy runs: what operators are shown (the admin
    /// endpoint reads its counters, never takes part in a request).
    pub shared: Arc<OnceLock<Arc<Shared>>>,
    /// Where misbehaviour is counted per source and reported to the
    /// escalation ladder (best effort, like `learned`); `None` without
    /// XDP in this process.
    pub escalation: Option<Arc<crate::escalation::Reporter>>,
}

impl ProxyContext {
    /// One open tenant whose keys are stored as `keys` says, with no
    /// budgets, nobody listening for authentications.
    pub fn open(keys: KeyMode) -> Self {
        Self::with_registry(TenantRegistry::open_with_keys(keys))
    }

    /// One open tenant as `config` has it (its keys, its `[proxy]`
    /// budgets), nobody listening for authentications.
    pub fn open_for(config: &ProxyConfig) -> Self {
        Self::with_registry(TenantRegistry::open_for(config))
    }

    fn with_registry(registry: TenantRegistry) -> Self {
        Self {
            tenants: Arc::new(SharedRegistry::new(registry)),
            learned: None,
            limit_events: Arc::default(),
            backends: None,
            shared: Arc::default(),
            escalation: None,
        }
    }
}

impl Default for ProxyContext {
    /// One open tenant with namespaced keys, nobody listening for
    /// authentications.
    fn default() -> Self {
        Self::open(KeyMode::Namespaced)
    }
}

/// State every session shares.
pub struct Shared {
    pub router: Arc<Router>,
    pub stats: Arc<ProxyStats>,
    /// The tenants in force (loaded by each session as it starts).
    pub tenants: Arc<SharedRegistry>,
    /// Connections per tenant, across reloads.
    pub connections: TenantConnections,
    /// Request, byte and in-flight budget state per tenant, across
    /// reloads.
    pub budgets: TenantBudgets,
    /// See [`ProxyContext::learned`].
    pub learned: Option<mpsc::Sender<Learned>>,
    /// See [`ProxyContext::escalation`].
    pub escalation: Option<Arc<crate::escalation::Reporter>>,
    /// How long a client has to authenticate.
    pub auth_timeout: Duration,
    pub limits: Limits,
    pub miss_on_backend_error: bool,
    pub idle_timeout: Option<Duration>,
    /// How long one request may take to arrive whole.
    pub request_read_timeout: Option<Duration>,
    pub max_pipeline_depth: usize,
    /// Most bytes buffered from one client before reading pauses.
    pub read_cap: usize,
    /// What `stats settings` shows of the configuration it started with.
    pub settings: command::admin::SettingsRows,
}

/// The memcache proxy.
pub struct Proxy;

impl Proxy {
    /// Serves clients on `listeners` as one open tenant, its keys and
    /// budgets as `config` says, until `shutdown` completes, then drains
    /// (see [`Self::run_with`]).
    pub async fn run(
        listeners: Vec<TcpListener>,
        config: ProxyConfig,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let cx = ProxyContext::open_for(&config);
        Self::run_with(listeners, config, cx, shutdown).await
    }

    /// Serves clients on `listeners`, with the tenants of `cx` (whose
    /// registry, not `config`, decides how the open tenant's keys are
    /// stored), until `shutdown` completes, then drains: stops accepting,
    /// lets in-flight requests finish within `drain_grace_secs`, and closes
    /// what is left.
    ///
    /// The accept loops run inside this future, not as tasks of their
    /// own, so whoever polls it sets their priority. `guard run` polls it
    /// from the future it gives `block_on`, which tokio's current-thread
    /// scheduler polls, when woken, before each round of at most
    /// `event_interval` (61) tasks; and which a multi-threaded runtime
    /// runs on its own thread. A spawned accept loop instead waits behind
    /// every session woken before it: a measured herd of 48,000 requests
    /// on 16,000 connections kept new clients in the backlog for up to a
    /// second.
    pub async fn run_with(
        listeners: Vec<TcpListener>,
        config: ProxyConfig,
        cx: ProxyContext,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let mut stats = ProxyStats::new(cx.limit_events.clone());
        if let Some(r) = &cx.escalation {
            stats = stats.with_escalation(r.counters());
        }
        let stats = Arc::new(stats);
        let settings = BackendSettings {
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            connections: config.backend_connections,
            max_in_flight: config.backend_max_in_flight,
        };
        let (router, controller) =
            ejection::Controller::start(&config, settings.clone(), stats.clone());
        let limits = Limits {
            max_value_len: config.max_value_size,
            max_pipeline_depth: config.max_pipeline_depth,
            ..Limits::default()
        };
        let shared = Arc::new(Shared {
            router,
            stats,
            tenants: cx.tenants,
            connections: TenantConnections::new(),
            budgets: TenantBudgets::new(),
            learned: cx.learned,
            escalation: cx.escalation,
            auth_timeout: Duration::from_millis(config.auth_timeout_ms),
            read_cap: limits.max_value_len + limits.max_retrieval_line_len + 4096,
            limits,
            miss_on_backend_error: config.miss_on_backend_error,
            idle_timeout: (config.idle_timeout_secs > 0)
                .then(|| Duration::from_secs(config.idle_timeout_secs)),
            request_read_timeout: (config.request_read_timeout_ms > 0)
                .then(|| Duration::from_millis(config.request_read_timeout_ms)),
            max_pipeline_depth: config.max_pipeline_depth,
            settings: command::admin::SettingsRows::new(&config),
        });
        let _ = cx.shared.set(shared.clone());
        let (phase_tx, phase_rx) = watch::channel(Phase::Running);
        // Flushes from before a restart, or from other proxies, apply
        // before the first client is served.
        generations::initial_sync(&shared, settings.connect_timeout + settings.request_timeout)
            .await;
        let syncing = tokio::spawn(generations::run(shared.clone(), phase_rx.clone()));
        let mut controlling = tokio::spawn(controller.run(cx.backends));
        let permits = Arc::new(Semaphore::new(config.max_connections));
        let sources = Arc::new(SourceLimits::new(config.max_connections_per_source));
        for l in &listeners {
            if let Ok(addr) = l.local_addr() {
                info!("proxy listening on {addr}");
            }
        }
        let accepting = listener::accept_all(
            listeners,
            shared.clone(),
            permits.clone(),
            sources,
            phase_rx.clone(),
        );
        tokio::pin!(accepting);
        // The loops end only once the phase changes (or the semaphore is
        // closed, which nothing does): normally `shutdown` comes first.
        let accepted_all = tokio::select! {
            () = shutdown => false,
            () = &mut accepting => true,
            // It runs until aborted: ending means it panicked, and a
            // proxy that can no longer eject or take back a backend must
            // not go on as if it could.
            r = &mut controlling => {
                let why = match r {
                    Err(e) => e.to_string(),
                    Ok(()) => "it returned".to_owned(),
                };
                anyhow::bail!("the backend ejection controller stopped: {why}");
            }
        };
        info!("proxy draining");
        let _ = phase_tx.send(Phase::Draining);
        if !accepted_all {
            accepting.await;
        }
        // Every session holds a permit: having them all back means every
        // session has ended.
        let all = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
        let grace = Duration::from_secs(config.drain_grace_secs);
        if tokio::time::timeout(grace, permits.acquire_many(all))
            .await
            .is_err()
        {
            warn!("drain grace period of {grace:?} is over; closing remaining connections");
            let _ = phase_tx.send(Phase::Stopped);
            let _ = tokio::time::timeout(Duration::from_secs(1), permits.acquire_many(all)).await;
        }
        // One last pass, so a flush just before the stop is recorded.
        generations::sync(&shared).await;
        syncing.abort();
        controlling.abort();
        for m in shared.router.topology().members() {
            m.backend.pool.abort();
        }
        info!("proxy stopped");
        Ok(())
    }
}
