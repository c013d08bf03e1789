//! Operator commands that act on the pinned state of a running (or
//! stopped) guard: they need no daemon, only the pins.

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use guard_common::{DEFAULT_TENANT, ListenerKey, ListenerValue, RateLimit};
use serde_json::json;

use crate::{
    cli::{CidrCommand, VerifiedCommand, XdpCommand},
    config::SynCookies,
    ebpf::{
        self, AttachState, cookies,
        events::OffenderReport,
        maps::{CidrList, GuardMaps},
        settings,
    },
    escalation::{EscalationState, enforcer::ordinal},
    paths::Paths,
};

/// `guard xdp status|detach|trace`.
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
        XdpCommand::Trace(args) => crate::admin::client::trace(&args),
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
            let (deny, allow) = ebpf::control::configured(paths);
            let configured = match list {
                CidrList::Deny => deny,
                CidrList::Allow => allow,
            };
            // Unreadable: every entry not the config's is shown as an
            // operator's.
            let escalation = EscalationState::load(paths).ok().flatten();
            let origins: Vec<(Origin, Option<String>)> = entries
                .iter()
                .map(|e| {
                    if configured.contains(&e.cidr) {
                        return (Origin::Config, None);
                    }
                    match escalation
                        .as_ref()
                        .filter(|_| list == CidrList::Deny)
                        .and_then(|s| s.deny_entry(e.cidr, e.expires_ns))
                    {
                        Some(r) => (
                            Origin::Escalation,
                            Some(format!("{} deny: {}", ordinal(r.deny_repeats), r.reason)),
                        ),
                        None => (Origin::Operator, None),
                    }
                })
                .collect();
            if json {
                let rows: Vec<serde_json::Value> = entries
                    .iter()
                    .zip(&origins)
                    .map(|(e, (origin, reason))| {
                        json!({
                            "cidr": e.cidr,
                            "expires_in_secs": e.expires_in_secs,
                            "origin": origin.name(),
                            "reason": reason,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if entries.is_empty() {
                println!("the {name} list is empty");
            } else {
                for (e, (origin, reason)) in entries.iter().zip(&origins) {
                    let expiry = match e.expires_in_secs {
                        Some(0) => "expired".to_string(),
                        Some(s) => format!("expires in {s}s"),
                        None => "permanent".to_string(),
                    };
                    let why = match reason {
                        Some(r) => format!("{}: {r}", origin.name()),
                        None => origin.name().to_string(),
                    };
                    println!("{:<44} {expiry:<20} {why}", e.cidr.to_string());
                }
            }
        }
    }
    Ok(())
}

/// Who put an entry on a list.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Origin {
    /// The config file (`deny`/`allow`, or the flags).
    Config,
    /// The escalation ladder (deny only).
    Escalation,
    /// `guard deny|allow add`.
    Operator,
}

impl Origin {
    fn name(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Escalation => "escalation",
            Self::Operator => "operator",
        }
    }
}

/// What the escalation ladder holds, for `guard xdp status --json`.
fn escalation_json(state: Option<&EscalationState>) -> serde_json::Value {
    let Some(s) = state else {
        return json!(null);
    };
    let sources: Vec<serde_json::Value> = s
        .rungs
        .iter()
        .map(|r| {
            let left =
                |until: u64| (until > s.now_ns).then(|| (until - s.now_ns).div_ceil(1_000_000_000));
            json!({
                "source": r.source,
                "step": rung_step(r, s.now_ns),
                "denied_secs_left": left(r.deny_until_ns),
                "strict_secs_left": left(r.strict_until_ns),
                "strict_repeats": r.strict_repeats,
                "deny_repeats": r.deny_repeats,
                "reason": r.reason,
            })
        })
        .collect();
    json!({
        "enabled": s.enabled,
        "updated_unix": s.updated_unix,
        "strict_limit": { "rate": s.strict_rate, "burst": s.strict_burst },
        "counters": s.counters,
        "sources": sources,
    })
}

/// "denied", "strict", or "remembered" (no step in force).
fn rung_step(r: &crate::escalation::ladder::Rung, now: u64) -> &'static str {
    if r.denied(now) {
        "denied"
    } else if r.strict(now) {
        "strict"
    } else if r.spared {
        "spared"
    } else {
        "remembered"
    }
}

/// Escalated sources shown by `guard xdp status`.
const ESCALATED_IN_STATUS: usize = 20;

fn escalation_table(out: &mut String, s: &EscalationState) -> anyhow::Result<()> {
    writeln!(out)?;
    let age = ebpf::unix_now().saturating_sub(s.updated_unix);
    writeln!(
        out,
        "escalation {} (strict SYN budget {}/s burst {}; recorded {age} s ago)",
        if s.enabled { "on" } else { "off" },
        s.strict_rate,
        s.strict_burst
    )?;
    let counter = |k: &str| s.counters.get(k).copied().unwrap_or(0);
    writeln!(
        out,
        "now: {} sources on the strict budget, {} denied; since the daemon started: {} put on \
         the strict budget, {} denied, {} held at it (live logins), {} spared (allow list), \
         {} de-escalated, {} forgotten",
        counter("escalation_sources_strict"),
        counter("escalation_sources_denied"),
        counter("escalation_strict"),
        counter("escalation_denied"),
        counter("escalation_held"),
        counter("escalation_spared"),
        counter("escalation_deescalated"),
        counter("escalation_forgotten"),
    )?;
    let mut rungs: Vec<_> = s.rungs.iter().collect();
    // Denied first, then strict, each with the longest left first.
    rungs.sort_by_key(|r| {
        (
            std::cmp::Reverse(r.denied(s.now_ns)),
            std::cmp::Reverse(r.strict(s.now_ns)),
            std::cmp::Reverse(r.strict_until_ns),
        )
    });
    if rungs.is_empty() {
        return Ok(());
    }
    writeln!(out, "{:<40} {:<11} {:>8}  reason", "source", "step", "left")?;
    for r in rungs.iter().take(ESCALATED_IN_STATUS) {
        let until = if r.denied(s.now_ns) {
            r.deny_until_ns
        } else {
            r.strict_until_ns
        };
        let left = if until > s.now_ns {
            format!("{} s", (until - s.now_ns).div_ceil(1_000_000_000))
        } else {
            "-".to_string()
        };
        writeln!(
            out,
            "{:<40} {:<11} {left:>8}  {}",
            r.source.to_string(),
            rung_step(r, s.now_ns),
            r.reason
        )?;
    }
    if rungs.len() > ESCALATED_IN_STATUS {
        writeln!(out, "… and {} more", rungs.len() - ESCALATED_IN_STATUS)?;
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
        "syn_cookies": settings::syn_cookies(&config, maps.tenant_limit(DEFAULT_TENANT)?).to_string(),
        // Of the namespace this command runs in: run it in guard's.
        "tcp_syncookies": cookies::kernel_syncookies().ok(),
        "counters": maps.counters()?,
        "verified_sources": verified_now(maps)?,
        "offenders": OffenderReport::load(paths)?,
        "escalation": escalation_json(EscalationState::load(paths)?.as_ref()),
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
    let mode = settings::syn_cookies(&config, maps.tenant_limit(DEFAULT_TENANT)?);
    let kernel = match cookies::kernel_syncookies() {
        _ if mode == SynCookies::Off => String::new(),
        Ok(v) if v == cookies::NEEDED => {
            format!(" (net.ipv4.tcp_syncookies here: {v}, as they need)")
        }
        Ok(v) => format!(
            " (net.ipv4.tcp_syncookies here: {v}, they need {})",
            cookies::NEEDED
        ),
        Err(e) => format!(" (net.ipv4.tcp_syncookies unreadable: {e})"),
    };
    writeln!(out, "SYN cookies           {mode}{kernel}")?;
    writeln!(out)?;
    writeln!(out, "{:<20} {:>16}", "counter", "value")?;
    for (name, value) in maps.counters()? {
        writeln!(out, "{name:<20} {value:>16}")?;
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
    if let Some(s) = EscalationState::load(paths)? {
        escalation_table(&mut out, &s)?;
    }
    Ok(out.trim_end().to_string())
}
