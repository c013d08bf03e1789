//! guard: an XDP connection guard and the daemon that runs it.
//!
//! Where things happen, following a SYN from the wire:
//!
//! - `guard-ebpf` (a separate crate) is the XDP program: it parses each
//!   frame and judges SYNs to protected listeners against the deny/allow
//!   tries and the source, tenant and global token buckets.
//! - [`ebpf`] loads that program, attaches and pins it ([`ebpf::XdpGuard`]),
//!   and holds typed handles on its maps ([`ebpf::maps::GuardMaps`]);
//!   [`ebpf::control`] keeps the maps in step with the configuration, and
//!   [`ebpf::events`] turns the program's limit events and counters into a
//!   few summary lines per interval and the heaviest sources.
//! - [`config`] is the TOML file and its validation, [`cli`] the flags that
//!   override it, [`cidr`] the prefixes both use, [`paths`] every pin and
//!   state location, [`shutdown`] the signals.
//! - [`ctl`] holds the operator commands that act on a running guard's
//!   pinned state (`guard xdp status`, `guard deny add`, …).
//!
//! Following a memcache request:
//!
//! - [`protocol`] parses and encodes the text, meta and binary protocols,
//!   zero-copy, with limits set up front; [`protocol::reader`] is the one
//!   loop that turns a byte stream into requests, for the proxy, the
//!   property tests and the fuzz targets alike.
//! - [`proxy`] is the memcache proxy: [`proxy::listener`] accepts under
//!   connection caps, [`proxy::session`] serves one client (after
//!   [`proxy::auth`] when tenants are configured) as a state machine that
//!   ends with a counted reason, reading it through
//!   [`proxy::connection`]; [`descriptors`] fits the
//!   connection cap to the descriptor limit, [`proxy::command`]
//!   translates requests to backend meta requests in the client's tenant
//!   namespace, [`proxy::router`] routes with [`proxy::ketama`] (as
//!   twemproxy does), and [`proxy::backend`] pipelines over pooled backend
//!   connections.
//! - [`tenant`] knows who a client is and what it may touch: credentials
//!   and their verification, SASL and text authentication, per-tenant key
//!   namespaces with their own `flush_all`, connection caps and budgets.

pub mod cidr;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod descriptors;
pub mod ebpf;
pub mod paths;
pub mod protocol;
pub mod proxy;
pub mod shutdown;
pub mod tenant;

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use log::{error, info, warn};

use crate::{
    cli::{Cli, Command, RunArgs},
    config::Config,
    ebpf::{XdpGuard, control::XdpControl},
    paths::Paths,
    shutdown::{Signal, Signals},
    tenant::{SharedRegistry, TenantRegistry},
};

/// How often expired deny/allow entries are removed.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

/// Authentications waiting to reach the XDP source→tenant map; beyond
/// this, reports are dropped rather than slow a session.
const LEARNED_QUEUE: usize = 4096;

/// The running proxy, polled by `run_daemon` itself.
type ProxyFuture = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// Runs the command the CLI names.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let paths = cli.paths();
    match cli.command {
        Command::Run(args) => {
            // The config decides the runtime's shape; run_daemon reports
            // a bad config the same way again.
            let threads = args.resolve().map_or(0, |c| c.proxy.runtime_threads());
            let mut builder = if threads == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                tokio::runtime::Builder::new_multi_thread()
            };
            if threads > 1 {
                builder.worker_threads(threads);
            }
            let runtime = builder
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(run_daemon(paths, *args))
        }
        Command::Xdp(cmd) => ctl::xdp(&paths, cmd),
        Command::Deny(cmd) => ctl::cidr(&paths, ebpf::maps::CidrList::Deny, cmd),
        Command::Allow(cmd) => ctl::cidr(&paths, ebpf::maps::CidrList::Allow, cmd),
        Command::Tenant(cli::TenantCommand::HashPassword { iterations }) => {
            let hash = tenant::hash_password_from(&mut std::io::stdin().lock(), iterations)?;
            println!("{hash}");
            Ok(())
        }
    }
}

/// `guard run`: the memcache proxy when `--listen` is given, the XDP guard
/// when `--iface` is given, both in one process when both are. SIGINT or
/// SIGTERM drains the proxy; the XDP program stays attached after exit.
pub async fn run_daemon(paths: Paths, args: RunArgs) -> anyhow::Result<()> {
    let mut config = args.resolve()?;
    if args.check {
        println!("{}", toml::to_string_pretty(&config)?);
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
    // With XDP in this process, authentications tell it which tenant a
    // source belongs to.
    let (learned_tx, mut learned_rx) = if config.xdp.interfaces.is_empty() {
        (None, None)
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel::<proxy::SourceTenant>(LEARNED_QUEUE);
        (Some(tx), Some(rx))
    };

    let mut proxy = None;
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
    if !config.xdp.interfaces.is_empty() {
        let guard = XdpGuard::attach(&paths, &config.xdp.interfaces, config.xdp.mode)?;
        let mut control = XdpControl::open(&paths)?;
        control.apply(&config)?;
        info!(
            "guarding {} listener(s) on {}; per-source {}/s burst {}, per-tenant {}/s, host {}/s",
            config.protected().len(),
            describe_interfaces(&guard),
            config.xdp.syn_rate,
            config.xdp.syn_burst,
            config.xdp.tenant_syn_rate,
            config.xdp.global_syn_rate,
        );
        let (report_tx, report_rx) = tokio::sync::watch::channel(report_settings(&config));
        let events = tokio::spawn(ebpf::events::watch_events(paths.clone(), report_rx));
        xdp = Some((guard, control, events, report_tx));
    }

    let mut expiry = tokio::time::interval(EXPIRY_INTERVAL);
    loop {
        tokio::select! {
            signal = signals.recv() => match signal {
                Signal::Stop => break,
                Signal::Reload => match reload(&paths, &args, &config, &mut xdp, &tenants) {
                    Ok(new) => {
                        config = new;
                        info!(
                            "configuration reloaded: tenants ({}){}; other proxy settings apply at restart",
                            describe_tenants(&tenants),
                            if xdp.is_some() { " and XDP settings" } else { "" },
                        );
                    }
                    Err(e) => error!("reload failed, keeping the running configuration: {e:#}"),
                },
            },
            learned = async {
                match &mut learned_rx {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let (Some((ip, tenant)), Some((_, control, ..))) = (learned, &mut xdp) else { continue };
                // Asking the map, not a memory of past writes: the kernel's
                // LRU may have evicted the source since. A reconnect storm
                // costs two map reads per login (bounded by the queue)
                // instead of a write.
                let maps = control.maps();
                if matches!(maps.source_tenant(ip), Ok(Some(t)) if t == tenant) {
                    continue;
                }
                if let Err(e) = maps.set_source_tenant(ip, tenant) {
                    warn!("cannot record {ip} as tenant {tenant:#x} in the XDP map: {e:#}");
                }
            },
            _ = expiry.tick(), if xdp.is_some() => {
                let Some((_, control, ..)) = &mut xdp else { continue };
                match control.expire() {
                    Ok(0) => {}
                    Ok(n) => info!("removed {n} expired deny/allow entr{}", if n == 1 { "y" } else { "ies" }),
                    Err(e) => error!("cannot remove expired entries: {e:#}"),
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
    if let Some((guard, _, events, _)) = xdp {
        events.abort();
        info!(
            "stopping; the XDP guard stays attached on {} (`guard xdp detach` removes it)",
            describe_interfaces(&guard)
        );
    }
    Ok(())
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
) -> anyhow::Result<Config> {
    let new = args.resolve()?;
    if let Some((guard, control, _, report)) = xdp {
        if new.xdp.interfaces.is_empty() {
            bail!("the new configuration has no interfaces");
        }
        if new.xdp.interfaces != old.xdp.interfaces || new.xdp.mode != old.xdp.mode {
            *guard = XdpGuard::attach(paths, &new.xdp.interfaces, new.xdp.mode)?;
        }
        control.apply(&new)?;
        report.send_replace(report_settings(&new));
    }
    tenants.reload(&new)?;
    Ok(new)
}

/// The XDP side of a running daemon: the attachment, the map control, the
/// event reporter and its settings.
type XdpRun = (
    XdpGuard,
    XdpControl,
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tokio::sync::watch::Sender<ebpf::events::ReportSettings>,
);

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
