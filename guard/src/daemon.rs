//! `guard run`: the daemon. It runs the memcache proxy, the XDP guard, or
//! both in one process, keeps the XDP maps in step with the configuration
//! (at start, on SIGHUP, as entries expire and as clients log in) and
//! drains on SIGINT/SIGTERM.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use log::{error, info, warn};

use crate::{
    admin::{self, collect::ConfigTracker},
    cli::RunArgs,
    config::{self, Config},
    descriptors, ebpf,
    ebpf::{XdpGuard, control::XdpControl},
    escalation,
    paths::Paths,
    proxy,
    shutdown::{Signal, Signals},
    tenant::{SharedRegistry, TenantRegistry},
};

/// How often expired deny/allow entries are removed.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

/// Lapsed verified sources are removed every this many expiry ticks.
const VERIFIED_SWEEP_TICKS: u64 = 10;

/// Authentications waiting to reach the XDP source→tenant map; beyond
/// this, reports are dropped rather than slow a session.
const LEARNED_QUEUE: usize = 4096;

/// Misbehaving sources waiting for the escalation ladder; beyond this,
/// reports are dropped rather than slow a session.
const STRIKE_QUEUE: usize = 4096;

/// The running proxy, polled by `run` itself.
type ProxyFuture = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// `guard run`: the memcache proxy when `--listen` is given, the XDP guard
/// when `--iface` is given, both in one process when both are. SIGINT or
/// SIGTERM drains the proxy; the XDP program stays attached after exit.
pub async fn run(paths: Paths, args: RunArgs) -> anyhow::Result<()> {
    let mut config = args.resolve()?;
    if args.check {
        let mut shown = config.clone();
        // A secret on a terminal ends up in scrollback and pasted logs.
        if !shown.admin.token.is_empty() {
            shown.admin.token = "<redacted>".into();
        }
        println!("{}", toml::to_string_pretty(&shown)?);
        return Ok(());
    }
    if config.xdp.interfaces.is_empty() && config.proxy.listen.is_empty() {
        bail!(
            "nothing to run: give --listen ADDR:PORT and --backend ADDR:PORT for the proxy, \
             or --iface IF (and --protect ADDR:PORT) to attach the XDP guard"
        );
    }
    // Installed first, so a signal during start-up is not lost.
    let mut signals = Signals::new().context("cannot install signal handlers")?;

    let tenants = Arc::new(SharedRegistry::new(TenantRegistry::from_config(&config)?));
    warn_small_bursts(&tenants, &config);
    // XDP limit events the reporter receives, shown in the proxy's `stats`.
    let limit_events = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // With XDP in this process, authentications tell it which tenant a
    // source belongs to.
    let (learned_tx, mut learned_rx) = if config.xdp.interfaces.is_empty() {
        (None, None)
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel::<proxy::Learned>(LEARNED_QUEUE);
        (Some(tx), Some(rx))
    };

    // What the admin endpoint shows of the proxy, once it runs.
    let proxy_shared = Arc::new(std::sync::OnceLock::new());
    let config_tracker = Arc::new(ConfigTracker::new(
        args.config.as_ref().map(|p| p.display().to_string()),
        config.xdp.interfaces.clone(),
    ));

    // With XDP and the proxy in this process, the proxy's misbehaving
    // sources climb the escalation ladder.
    let escalation_counters = Arc::new(escalation::Counters::default());
    let (reporter, mut strikes) =
        if config.xdp.interfaces.is_empty() || config.proxy.listen.is_empty() {
            (None, None)
        } else {
            let (tx, rx) = tokio::sync::mpsc::channel::<escalation::Strike>(STRIKE_QUEUE);
            let reporter = escalation::Reporter::new(&config, tx, escalation_counters.clone());
            (Some(Arc::new(reporter)), Some(rx))
        };

    let mut proxy = None;
    // Reloaded backend lists reach the proxy's ejection controller.
    let (backends_tx, backends_rx) = tokio::sync::watch::channel(config.proxy.backends.clone());
    if !config.proxy.listen.is_empty() {
        descriptors::fit(&mut config.proxy)?;
        let backlog = config.proxy.backlog;
        // listen(2) silently truncates the backlog to somaxconn.
        if let Some(max) = proxy::listener::somaxconn()
            && max < backlog
        {
            warn!(
                "the kernel caps the listen backlog at net.core.somaxconn = {max}, below the \
                 configured {backlog}: when more than {max} connections queue at once, the \
                 rest wait for a SYN retransmit (1 s); raise it with \
                 `sysctl net.core.somaxconn={backlog}` and restart guard"
            );
        }
        let mut listeners = Vec::new();
        for addr in &config.proxy.listen {
            listeners.push(
                proxy::listener::bind(*addr, backlog)
                    .with_context(|| format!("cannot listen on {addr}"))?,
            );
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        if tenants.load().requires_auth() {
            info!(
                "proxy tenants: {} (clients authenticate)",
                describe_tenants(&tenants)
            );
        }
        let cx = proxy::ProxyContext {
            tenants: tenants.clone(),
            learned: learned_tx,
            limit_events: limit_events.clone(),
            backends: Some(backends_rx),
            shared: proxy_shared.clone(),
            escalation: reporter.clone(),
        };
        // Polled here, in the runtime's main future, not spawned: its
        // accept loops then take their turn before every round of tasks
        // (see `Proxy::run_with`), so a burst of busy sessions cannot keep
        // new clients waiting in the backlog.
        let serving: ProxyFuture = Box::pin(proxy::Proxy::run_with(
            listeners,
            config.proxy.clone(),
            cx,
            async move {
                let _ = stopped.await;
            },
        ));
        proxy = Some((stop, serving));
    }

    let mut xdp: Option<XdpRun> = None;
    let mut enforcer: Option<escalation::Enforcer> = None;
    // `guard xdp trace` lines, filled by the program's logger, read by
    // the admin endpoint.
    let trace_ring = Arc::new(ebpf::trace::TraceRing::default());
    if !config.xdp.interfaces.is_empty() {
        let mut guard = XdpGuard::attach(&paths, &config.xdp.interfaces, config.xdp.mode)?;
        let trace_logger = start_trace_logger(&mut guard, &trace_ring);
        let mut control = XdpControl::open(&paths)?;
        control.apply(&config)?;
        info!(
            "guarding {} listener(s) on {}; per-source {}/s burst {}, per-tenant {}/s, host {}/s, \
             SYN cookies {}",
            ebpf::settings::protected(&config).len(),
            describe_interfaces(&guard),
            config.xdp.syn_rate,
            config.xdp.syn_burst,
            config.xdp.tenant_syn_rate,
            config.xdp.global_syn_rate,
            config.xdp.syn_cookies,
        );
        ebpf::cookies::check_kernel(config.xdp.syn_cookies);
        warn_shared_slots(&config.xdp.interfaces);
        let (report_tx, report_rx) = tokio::sync::watch::channel(report_settings(&config));
        let events = tokio::spawn(ebpf::events::watch_events(
            paths.clone(),
            report_rx,
            limit_events.clone(),
        ));
        // Resumed even without the proxy, so that what an earlier run
        // escalated still ends, is logged and is recorded.
        enforcer = Some(escalation::Enforcer::start(
            &paths,
            &config,
            reporter.clone(),
            escalation_counters.clone(),
            control.maps(),
        ));
        xdp = Some((guard, control, events, report_tx, trace_logger));
    }

    config_tracker.set_tenants(&config);
    let admin = start_admin(
        &config,
        &paths,
        &proxy_shared,
        &config_tracker,
        &escalation_counters,
        &trace_ring,
    )
    .await;

    let mut expiry = tokio::time::interval(EXPIRY_INTERVAL);
    let mut sweeps: u64 = 0;
    loop {
        tokio::select! {
            signal = signals.recv() => match signal {
                Signal::Stop => break,
                Signal::Reload => match reload(&paths, &args, &config, &mut xdp, &tenants, &trace_ring) {
                    Ok(new) => {
                        backends_tx.send_if_modified(|b| {
                            let changed = *b != new.proxy.backends;
                            b.clone_from(&new.proxy.backends);
                            changed
                        });
                        config_tracker.reloaded(new.xdp.interfaces.clone());
                        config_tracker.set_tenants(&new);
                        warn_shared_slots(&new.xdp.interfaces);
                        if new.admin != config.admin {
                            warn!("[admin] settings apply at restart");
                        }
                        config = new;
                        if let Some(r) = &reporter {
                            r.reload(&config);
                        }
                        if let (Some(e), Some((_, control, ..))) = (&mut enforcer, &mut xdp) {
                            e.reload(&config, control.maps());
                        }
                        info!(
                            "configuration reloaded: tenants and their budgets ({}), backends{}; other proxy settings apply at restart",
                            describe_tenants(&tenants),
                            if xdp.is_some() { " and XDP settings" } else { "" },
                        );
                    }
                    Err(e) => {
                        error!("reload failed, keeping the running configuration: {e:#}");
                        config_tracker.failed(format!("{e:#}"));
                    }
                },
            },
            learned = async {
                match &mut learned_rx {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let (Some(learned), Some((_, control, ..))) = (learned, &mut xdp) else { continue };
                // Asking the maps, not a memory of past writes: the
                // kernel's LRU may have evicted the source since, and the
                // maps outlive this process.
                let window = Duration::from_secs(config.xdp.verified_secs);
                if let Err(e) = control.learn(learned, window) {
                    warn!("XDP maps: {e:#}");
                }
            },
            strike = async {
                match &mut strikes {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let (Some(strike), Some((_, control, ..)), Some(e)) = (strike, &mut xdp, &mut enforcer) else { continue };
                e.strike(strike, control.maps());
            },
            _ = expiry.tick(), if xdp.is_some() => {
                let Some((_, control, ..)) = &mut xdp else { continue };
                if let Some(e) = &mut enforcer {
                    e.tick(control.maps());
                }
                match control.expire() {
                    Ok(0) => {}
                    Ok(n) => info!("removed {n} expired deny/allow entr{}", if n == 1 { "y" } else { "ies" }),
                    Err(e) => error!("cannot remove expired entries: {e:#}"),
                }
                // The program already ignores a lapsed trace; removing it
                // clears the trace flag, so a SYN costs a flag test again.
                match ebpf::trace::remove_expired(control.maps()) {
                    Ok(0) => {}
                    Ok(n) => info!("{n} trace(s) ended"),
                    Err(e) => error!("cannot remove ended traces: {e:#}"),
                }
                // The program already ignores a lapsed entry; removing it
                // makes room for new ones.
                sweeps += 1;
                if sweeps.is_multiple_of(VERIFIED_SWEEP_TICKS)
                    && let Err(e) = control.sweep_verified()
                {
                    error!("cannot remove lapsed verified sources: {e:#}");
                }
            },
            r = async {
                match &mut proxy {
                    Some((_, serving)) => serving.await,
                    None => std::future::pending().await,
                }
            } => {
                // The proxy only ends on its own when something broke.
                match r {
                    Ok(()) => bail!("the proxy stopped unexpectedly"),
                    Err(e) => return Err(e.context("the proxy failed")),
                }
            },
        }
    }
    if let Some((stop, serving)) = proxy {
        let _ = stop.send(());
        serving.await?;
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    if let Some(e) = &mut enforcer {
        e.save();
    }
    if let Some((guard, _, events, _, trace_logger)) = xdp {
        events.abort();
        if let Some(t) = trace_logger {
            t.abort();
        }
        info!(
            "stopping; the XDP guard stays attached on {} (`guard xdp detach` removes it)",
            describe_interfaces(&guard)
        );
    }
    Ok(())
}

/// Starts the admin endpoint when configured. A port it cannot have
/// costs the endpoint, not the guard: the proxy and XDP go on, and the
/// log says why there is no endpoint.
/// Says when attached interfaces share a counter slot (their indexes are
/// equal modulo [`guard_common::IFACE_SLOTS`]): their frames are counted
/// and labelled together.
fn warn_shared_slots(interfaces: &[String]) {
    let slots = admin::collect::interface_slots(&admin::collect::interface_indexes(interfaces));
    for label in slots.values().filter(|l| l.contains('+')) {
        warn!(
            "interfaces {label} share an XDP counter slot (their indexes are equal modulo {}): \
             /metrics and guard status count them together, as interface=\"{label}\"",
            guard_common::IFACE_SLOTS
        );
    }
}

async fn start_admin(
    config: &Config,
    paths: &Paths,
    proxy_shared: &Arc<std::sync::OnceLock<Arc<proxy::Shared>>>,
    tracker: &Arc<ConfigTracker>,
    escalation: &Arc<escalation::Counters>,
    trace_ring: &Arc<ebpf::trace::TraceRing>,
) -> Option<tokio::task::JoinHandle<()>> {
    let addr = config.admin.listen?;
    let listener = match admin::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            error!(
                "no admin endpoint: {e:#}; choose another with --admin ADDR:PORT or [admin] listen"
            );
            return None;
        }
    };
    let sources = admin::collect::Sources {
        proxy: (!config.proxy.listen.is_empty()).then(|| proxy_shared.clone()),
        listen: config.proxy.listen.clone(),
        xdp: (!config.xdp.interfaces.is_empty())
            .then(|| admin::collect::XdpSource::new(paths.clone())),
        config: tracker.clone(),
        started: std::time::Instant::now(),
        escalation: Some(escalation.clone()),
        trace: (!config.xdp.interfaces.is_empty()).then(|| {
            Arc::new(admin::trace::TraceSource::new(
                trace_ring.clone(),
                paths.clone(),
            ))
        }),
    };
    let token = Some(config.admin.token.clone());
    Some(tokio::spawn(admin::serve(listener, sources, token)))
}

/// SIGHUP: re-reads the configuration; applies it to the XDP maps (when
/// XDP runs here), then swaps the tenant registry in place (credentials
/// and budgets for new authentications; flush generations are kept).
fn reload(
    paths: &Paths,
    args: &RunArgs,
    old: &Config,
    xdp: &mut Option<XdpRun>,
    tenants: &SharedRegistry,
    trace_ring: &Arc<ebpf::trace::TraceRing>,
) -> anyhow::Result<Config> {
    let new = args.resolve()?;
    // Built before anything is applied: a configuration the registry
    // refuses leaves the XDP side as it was, not half reloaded.
    let registry = tenants.load().reload(&new)?;
    if let Some((guard, control, _, report, trace_logger)) = xdp {
        if new.xdp.interfaces.is_empty() {
            bail!("the new configuration has no interfaces");
        }
        if new.xdp.interfaces != old.xdp.interfaces || new.xdp.mode != old.xdp.mode {
            *guard = XdpGuard::attach(paths, &new.xdp.interfaces, new.xdp.mode)?;
            // A new program logs into its own ring buffer: follow it.
            if let Some(t) = trace_logger.take() {
                t.abort();
            }
            *trace_logger = start_trace_logger(guard, trace_ring);
        }
        control.apply(&new)?;
        report.send_replace(report_settings(&new));
        ebpf::cookies::check_kernel(new.xdp.syn_cookies);
    }
    tenants.store(registry);
    warn_small_bursts(tenants, &new);
    let registry = tenants.load();
    // Warned about on its own, beyond the reload line's "other proxy
    // settings apply at restart": this setting decides where every key
    // lives, and an operator who edited it must not believe it took.
    if !registry.requires_auth() && registry.key_mode() != new.proxy.keys {
        let name = |k| match k {
            config::KeyMode::Namespaced => "namespaced",
            config::KeyMode::Raw => "raw",
        };
        warn!(
            "keys = \"{}\" applies at restart: the open tenant's keys stay {} until then",
            name(new.proxy.keys),
            name(registry.key_mode())
        );
    }
    Ok(new)
}

/// The XDP side of a running daemon: the attachment, the map control, the
/// event reporter and its settings, the trace logger.
type XdpRun = (
    XdpGuard,
    XdpControl,
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tokio::sync::watch::Sender<ebpf::events::ReportSettings>,
    Option<tokio::task::JoinHandle<()>>,
);

/// Forwards the trace lines of the program `guard` loaded. Without it the
/// guard still guards; only `guard xdp trace` shows nothing, so that is
/// said rather than fatal.
fn start_trace_logger(
    guard: &mut XdpGuard,
    ring: &Arc<ebpf::trace::TraceRing>,
) -> Option<tokio::task::JoinHandle<()>> {
    match guard.spawn_trace_logger(ring.clone()) {
        Ok(t) => Some(t),
        Err(e) => {
            warn!("guard xdp trace will show nothing: {e:#}");
            None
        }
    }
}

fn report_settings(config: &Config) -> ebpf::events::ReportSettings {
    ebpf::events::ReportSettings {
        interval: Duration::from_secs(config.xdp.report_interval_secs),
        tenant_names: config
            .tenants
            .iter()
            .map(|t| (config::tenant_id(&t.name), t.name.to_string()))
            .collect(),
    }
}

/// One warning per served tenant whose byte budget can never admit the
/// largest store: a budget that silently refuses every big value would
/// look like a broken cache.
fn warn_small_bursts(tenants: &SharedRegistry, config: &Config) {
    for t in tenants.load().served_tenants() {
        if let Some(why) =
            crate::tenant::budget::burst_below_largest_store(&t, config.proxy.max_value_size)
        {
            warn!("{why}");
        }
    }
}

fn describe_tenants(tenants: &SharedRegistry) -> String {
    let registry = tenants.load();
    if !registry.requires_auth() {
        return "one open tenant".into();
    }
    registry
        .tenants()
        .iter()
        .map(|t| t.name.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_interfaces(guard: &XdpGuard) -> String {
    guard
        .state()
        .interfaces
        .iter()
        .map(|i| format!("{} ({})", i.name, i.mode))
        .collect::<Vec<_>>()
        .join(", ")
}
