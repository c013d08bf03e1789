//! guard: an XDP connection guard and the daemon that runs it.
//!
//! Where things happen, following a SYN from the wire:
//!
//! - `guard-ebpf` (a separate crate) is the XDP program: it parses each
//!   frame and judges SYNs to protected listeners against the deny/allow
//!   tries and the source, tenant and global token buckets.
//! - [`ebpf`] loads that program, attaches and pins it ([`ebpf::XdpGuard`]),
//!   and holds typed handles on its maps ([`ebpf::maps::GuardMaps`]);
//!   [`ebpf::control`] keeps the maps in step with the configuration and
//!   reports limit events.
//! - [`config`] is the TOML file and its validation, [`cli`] the flags that
//!   override it, [`cidr`] the prefixes both use, [`paths`] every pin and
//!   state location, [`shutdown`] the signals.
//! - [`ctl`] holds the operator commands that act on a running guard's
//!   pinned state (`guard xdp status`, `guard deny add`, …).
//!
//! The memcache proxy's parts, built ahead of the proxy itself:
//!
//! - [`protocol`] parses and encodes the text, meta and binary protocols,
//!   zero-copy, with limits set up front.
//! - [`proxy::ketama`] routes keys to backends exactly as twemproxy's
//!   `distribution: ketama` with `hash: md5` does.
//! - [`tenant`] knows who a client is and what it may touch: credentials
//!   and their verification, SASL and text authentication, per-tenant key
//!   namespaces with their own `flush_all`, connection caps and budgets.

pub mod cidr;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod ebpf;
pub mod paths;
pub mod protocol;
pub mod proxy;
pub mod shutdown;
pub mod tenant;

use std::time::Duration;

use anyhow::{Context as _, bail};
use log::{error, info};

use crate::{
    cli::{Cli, Command, RunArgs},
    config::Config,
    ebpf::{XdpGuard, control::XdpControl},
    paths::Paths,
    shutdown::{Signal, Signals},
};

/// How often expired deny/allow entries are removed.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the command the CLI names.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let paths = cli.paths();
    match cli.command {
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(run_daemon(paths, args))
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

/// `guard run`: attach (or adopt) the guard, then keep it in step until a
/// stop signal. The XDP program stays attached after exit.
pub async fn run_daemon(paths: Paths, args: RunArgs) -> anyhow::Result<()> {
    let mut config = args.resolve()?;
    if args.check {
        println!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    if config.xdp.interfaces.is_empty() {
        bail!("nothing to run: give --iface IF (and --protect ADDR:PORT) to attach the XDP guard");
    }
    // Installed first, so a signal during start-up is not lost.
    let mut signals = Signals::new().context("cannot install signal handlers")?;

    let mut guard = XdpGuard::attach(&paths, &config.xdp.interfaces, config.xdp.mode)?;
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
    let events = tokio::spawn(ebpf::control::watch_events(paths.clone()));

    let mut expiry = tokio::time::interval(EXPIRY_INTERVAL);
    loop {
        tokio::select! {
            signal = signals.recv() => match signal {
                Signal::Stop => break,
                Signal::Reload => match reload(&paths, &args, &config, &mut guard, &mut control) {
                    Ok(new) => {
                        config = new;
                        info!("configuration reloaded");
                    }
                    Err(e) => error!("reload failed, keeping the running configuration: {e:#}"),
                },
            },
            _ = expiry.tick() => match control.expire() {
                Ok(0) => {}
                Ok(n) => info!("removed {n} expired deny/allow entr{}", if n == 1 { "y" } else { "ies" }),
                Err(e) => error!("cannot remove expired entries: {e:#}"),
            },
        }
    }
    events.abort();
    info!(
        "stopping; the XDP guard stays attached on {} (`guard xdp detach` removes it)",
        describe_interfaces(&guard)
    );
    Ok(())
}

fn reload(
    paths: &Paths,
    args: &RunArgs,
    old: &Config,
    guard: &mut XdpGuard,
    control: &mut XdpControl,
) -> anyhow::Result<Config> {
    let new = args.resolve()?;
    if new.xdp.interfaces.is_empty() {
        bail!("the new configuration has no interfaces");
    }
    if new.xdp.interfaces != old.xdp.interfaces || new.xdp.mode != old.xdp.mode {
        *guard = XdpGuard::attach(paths, &new.xdp.interfaces, new.xdp.mode)?;
    }
    control.apply(&new)?;
    Ok(new)
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
