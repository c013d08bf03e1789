//! Operator commands that act on the pinned state of a running (or
//! stopped) guard: they need no daemon, only the pins.

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use guard_common::{ListenerKey, ListenerValue, RateLimit};
use serde_json::json;

use crate::{
    cli::{CidrCommand, VerifiedCommand, XdpCommand},
    ebpf::{
        self, AttachState,
        events::OffenderReport,
        maps::{CidrList, GuardMaps},
    },
    paths::Paths,
};

/// `guard xdp status|detach`.
pub fn xdp(paths: &Paths, cmd: XdpCommand) -> anyhow::Result<()> {
    match cmd {
        XdpCommand::Status { json } => {
            let state = AttachState::load(paths)?;
            let maps = GuardMaps::open(paths)?;
            let out = if json {
                serde_json::to_string_pretty(&status_json(paths, &state, &maps)?)?
            } else {
                status_table(paths, &state, &maps)?
            };
            println!("{out}");
            Ok(())
        }
        XdpCommand::Detach => {
            let detached = ebpf::detach_all(paths)?;
            if detached.is_empty() {
                println!("nothing was attached; pins removed");
            } else {
                println!("detached from {}; pins removed", detached.join(", "));
            }
            Ok(())
        }
    }
}

/// `guard deny|allow add|del|list`.
pub fn cidr(paths: &Paths, list: CidrList, cmd: CidrCommand) -> anyhow::Result<()> {
    let name = match list {
        CidrList::Deny => "deny",
        CidrList::Allow => "allow",
    };
    let mut maps = GuardMaps::open(paths)?;
    match cmd {
        CidrCommand::Add { cidr, ttl } => {
            maps.add_cidr(list, cidr, ttl)
                .with_context(|| format!("cannot add {cidr} to the {name} list"))?;
            match ttl {
                Some(t) => println!("{name} {cidr} for {t}s"),
                None => println!("{name} {cidr}"),
            }
        }
        CidrCommand::Del { cidr } => {
            if maps.remove_cidr(list, cidr)? {
                println!("removed {cidr} from the {name} list");
            } else {
                anyhow::bail!("{cidr} is not on the {name} list");
            }
        }
        CidrCommand::List { json } => {
            let entries = maps.list_cidrs(list)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else if entries.is_empty() {
                println!("the {name} list is empty");
            } else {
                for e in entries {
                    match e.expires_in_secs {
                        Some(0) => println!("{:<44} expired", e.cidr),
                        Some(s) => println!("{:<44} expires in {s}s", e.cidr.to_string()),
                        None => println!("{}", e.cidr),
                    }
                }
            }
        }
    }
    Ok(())
}

fn limit_json(l: &RateLimit) -> serde_json::Value {
    if l.is_unlimited() {
        json!(null)
    } else {
        json!({ "rate": l.rate(), "burst": l.burst() })
    }
}

fn listener_string(k: &ListenerKey, v: &ListenerValue) -> String {
    let ip: std::net::IpAddr = if k.family == guard_common::FAMILY_V4 {
        std::net::Ipv4Addr::new(k.addr[0], k.addr[1], k.addr[2], k.addr[3]).into()
    } else {
        std::net::Ipv6Addr::from(k.addr).into()
    };
    let addr = std::net::SocketAddr::new(ip, k.port as u16);
    if v.tenant == guard_common::DEFAULT_TENANT {
        addr.to_string()
    } else {
        format!("{addr} (tenant {})", v.tenant)
    }
}

pub(crate) fn status_json(
    paths: &Paths,
    state: &AttachState,
    maps: &GuardMaps,
) -> anyhow::Result<serde_json::Value> {
    let config = maps.config()?;
    let listeners: Vec<String> = maps
        .listeners()?
        .iter()
        .map(|(k, v)| listener_string(k, v))
        .collect();
    Ok(json!({
        "interfaces": state.interfaces,
        "listeners": listeners,
        "source_limit": limit_json(&config.source),
        "global_limit": limit_json(&config.global),
        "event_limit": limit_json(&config.events),
        "ipv6_prefix": config.ipv6_prefix_len,
        "allow_udp": config.flags & guard_common::CONFIG_ALLOW_UDP != 0,
        "counters": maps.counters()?,
        "verified_sources": verified_now(maps)?,
        "offenders": OffenderReport::load(paths)?,
    }))
}

/// Sources verified now (lapsed entries not yet swept left out).
fn verified_now(maps: &GuardMaps) -> anyhow::Result<usize> {
    let now = ebpf::maps::monotonic_ns();
    Ok(maps
        .verified()?
        .iter()
        .filter(|(_, v)| v.active(now))
        .count())
}

/// `guard verified …`.
pub fn verified(paths: &Paths, cmd: VerifiedCommand) -> anyhow::Result<()> {
    let mut maps = GuardMaps::open(paths)?;
    match cmd {
        VerifiedCommand::List { json } => {
            let now = ebpf::maps::monotonic_ns();
            let mut rows: Vec<(std::net::IpAddr, u32, u64)> = maps
                .verified()?
                .into_iter()
                .filter(|(_, v)| v.active(now))
                .map(|(a, v)| (a, v.tenant, (v.expires_ns - now) / 1_000_000_000))
                .collect();
            rows.sort();
            if json {
                let rows: Vec<serde_json::Value> = rows
                    .iter()
                    .map(
                        |(a, t, secs)| json!({ "source": a, "tenant": t, "expires_in_secs": secs }),
                    )
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no verified sources");
            } else {
                println!("{:<40} {:>10} {:>12}", "source", "tenant", "expires in");
                for (a, t, secs) in rows {
                    println!("{:<40} {t:>#10x} {secs:>11}s", a.to_string());
                }
            }
        }
        VerifiedCommand::Del { source } => {
            if maps.remove_verified(source)? {
                println!("{source} is no longer verified");
            } else {
                bail!("{source} is not verified");
            }
        }
    }
    Ok(())
}

pub(crate) fn status_table(
    paths: &Paths,
    state: &AttachState,
    maps: &GuardMaps,
) -> anyhow::Result<String> {
    let config = maps.config()?;
    let mut out = String::new();
    if state.interfaces.is_empty() {
        writeln!(out, "interfaces: none recorded")?;
    }
    for i in &state.interfaces {
        writeln!(out, "interface {:<16} mode {}", i.name, i.mode)?;
    }
    for (k, v) in maps.listeners()? {
        writeln!(out, "protecting {}", listener_string(&k, &v))?;
    }
    let limit = |l: &RateLimit| {
        if l.is_unlimited() {
            "unlimited".to_string()
        } else {
            format!("{}/s burst {}", l.rate(), l.burst())
        }
    };
    writeln!(out, "per-source SYN limit  {}", limit(&config.source))?;
    writeln!(out, "host SYN limit        {}", limit(&config.global))?;
    let events = if config.events.is_unlimited() {
        "none (counted only)".to_string()
    } else {
        limit(&config.events)
    };
    writeln!(out, "limit events          {events}")?;
    writeln!(out, "IPv6 source prefix    /{}", config.ipv6_prefix_len)?;
    writeln!(out, "verified sources      {}", verified_now(maps)?)?;
    writeln!(out)?;
    writeln!(out, "{:<18} {:>16}", "counter", "value")?;
    for (name, value) in maps.counters()? {
        writeln!(out, "{name:<18} {value:>16}")?;
    }
    if let Some(report) = OffenderReport::load(paths)? {
        let age = ebpf::unix_now().saturating_sub(report.updated_unix);
        for (title, rows) in [
            (
                format!(
                    "heaviest sources, last {} s with limit events ({age} s ago)",
                    report.interval_secs
                ),
                &report.last_interval,
            ),
            (
                "heaviest sources since the daemon started".to_string(),
                &report.since_start,
            ),
        ] {
            writeln!(out)?;
            writeln!(out, "{title}")?;
            writeln!(out, "{:<40} {:>10}", "source", "events")?;
            for o in rows {
                let events = if o.error == 0 {
                    o.events.to_string()
                } else {
                    format!("≤{}", o.events)
                };
                writeln!(out, "{:<40} {events:>10}", o.source.to_string())?;
            }
        }
    }
    Ok(out.trim_end().to_string())
}
