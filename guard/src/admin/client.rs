//! `guard status`: the admin endpoint's picture in the terminal, or the
//! pinned XDP state when no daemon answers.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use http_body_util::BodyExt as _;

use super::status::Status;
use crate::{
    cli::StatusArgs,
    config::Config,
    ebpf::{AttachState, events::thousands, maps::GuardMaps},
    paths::Paths,
};

/// How long the daemon has to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `guard status [--json]`.
pub fn command(paths: &Paths, args: &StatusArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let addr = args.admin.or(config.admin.listen);
    let token = Some(config.admin.token.clone()).filter(|t| !t.is_empty());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let asked = match addr {
        Some(addr) => runtime
            .block_on(fetch(addr, "/status", token.as_deref()))
            .with_context(|| format!("no answer from the admin endpoint at {addr}")),
        None => Err(anyhow::anyhow!(
            "the admin endpoint is off in the configuration"
        )),
    };
    match asked {
        Ok(body) => {
            if args.json {
                println!("{}", String::from_utf8_lossy(&body));
            } else {
                let status: Status = serde_json::from_slice(&body)
                    .context("the admin endpoint's /status is not guard's")?;
                print!("{}", summary(&status));
            }
            Ok(())
        }
        Err(e) => {
            let maps = GuardMaps::open(paths)
                .map_err(|m| anyhow::anyhow!("{e:#}; and no pinned XDP state either: {m:#}"))?;
            eprintln!("guard: {e:#}; showing the pinned XDP state");
            let state = AttachState::load(paths)?;
            if args.json {
                let v = crate::ctl::status_json(paths, &state, &maps)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", crate::ctl::status_table(paths, &state, &maps)?);
            }
            Ok(())
        }
    }
}

/// GETs `path` from the admin endpoint at `addr`; the body of a 200.
pub async fn fetch(addr: SocketAddr, path: &str, token: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let driving = tokio::spawn(conn);
        let mut req = hyper::Request::get(path).header(hyper::header::HOST, addr.to_string());
        if let Some(t) = token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = sender
            .send_request(req.body(http_body_util::Empty::<bytes::Bytes>::new())?)
            .await?;
        let code = resp.status();
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        driving.abort();
        if !code.is_success() {
            bail!(
                "{path} answered {code}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        anyhow::Ok(body)
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {TIMEOUT:?}"))?
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".to_owned(),
        Some(v) if v < 1.0 => format!("{v:.2}ms"),
        Some(v) => format!("{v:.1}ms"),
    }
}

fn rate(v: f64) -> String {
    if v >= 100.0 {
        thousands(v.round() as u64)
    } else {
        format!("{v:.1}")
    }
}

fn human_secs(s: u64) -> String {
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

/// The terminal summary.
pub fn summary(s: &Status) -> String {
    let mut out = String::new();
    let ready = if s.ready {
        "ready".to_owned()
    } else {
        format!("NOT READY: {}", s.not_ready.join("; "))
    };
    let _ = writeln!(
        out,
        "guard {} (pid {}), up {}: {ready}",
        s.version,
        s.pid,
        human_secs(s.uptime_secs)
    );
    let c = &s.config;
    let _ = writeln!(
        out,
        "config {}; reloads {} ok, {} failed{}",
        c.path.as_deref().unwrap_or("(flags only)"),
        c.reloads_ok,
        c.reloads_failed,
        c.last_reload_error
            .as_deref()
            .map(|e| format!(" (last: {e})"))
            .unwrap_or_default()
    );
    if let Some(p) = &s.proxy {
        let refused: Vec<String> = p
            .connections_refused
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("{} {}", r.replace('_', " "), thousands(*n)))
            .collect();
        let _ = writeln!(
            out,
            "\nproxy on {}: {} connections open, {} accepted{}",
            p.listen.join(", "),
            thousands(p.connections),
            thousands(p.connections_accepted),
            if refused.is_empty() {
                String::new()
            } else {
                format!("; refused: {}", refused.join(", "))
            }
        );
        let _ = writeln!(
            out,
            "{:<20} {:>7} {:>9} {:>8} {:>9} {:>9} {:>7} {:>9} {:>9}",
            "tenant", "conns", "req/s", "err/s", "p50", "p99", "budget", "refused", "in flight"
        );
        for t in &p.tenants {
            let _ = writeln!(
                out,
                "{:<20} {:>7} {:>9} {:>8} {:>9} {:>9} {:>7} {:>9} {:>9}",
                t.name,
                thousands(t.connections),
                rate(t.requests_per_sec),
                rate(t.errors_per_sec),
                ms(t.p50_ms),
                ms(t.p99_ms),
                t.budget_use
                    .map_or_else(|| "-".to_owned(), |u| format!("{:.0}%", u * 100.0)),
                thousands(t.refused.values().sum()),
                thousands(t.in_flight),
            );
        }
        let _ = writeln!(
            out,
            "\n{:<24} {:<8} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "backend", "state", "connected", "latency", "p99", "in flight", "ejections"
        );
        for b in &p.backends {
            let _ = writeln!(
                out,
                "{:<24} {:<8} {:>9} {:>9} {:>9} {:>9} {:>9}",
                b.addr,
                b.state.label(),
                if b.connected { "yes" } else { "no" },
                ms(Some(b.latency_ms)),
                ms(b.p99_ms),
                thousands(b.in_flight),
                thousands(b.ejections),
            );
        }
    }
    if let Some(x) = &s.xdp {
        let ifaces: Vec<String> = x
            .interfaces
            .iter()
            .map(|i| {
                format!(
                    "{} ({}, {})",
                    i.name,
                    if i.mode.is_empty() { "-" } else { &i.mode },
                    if i.attached {
                        "attached"
                    } else {
                        "NOT ATTACHED"
                    }
                )
            })
            .collect();
        let _ = writeln!(out, "\nXDP on {}", ifaces.join(", "));
        let _ = writeln!(
            out,
            "SYNs judged {}/s, dropped {}/s; verified sources {}; deny entries {}",
            rate(x.syns_per_sec),
            rate(x.drops_per_sec),
            thousands(x.verified_sources),
            thousands(x.deny_entries)
        );
        for d in &x.deny {
            let _ = writeln!(
                out,
                "  deny {:<43} {}",
                d.cidr,
                d.expires_in_secs.map_or_else(
                    || "until removed".to_owned(),
                    |s| format!("expires in {}", human_secs(s))
                )
            );
        }
        if !x.top_offenders.is_empty() {
            let top: Vec<String> = x
                .top_offenders
                .iter()
                .map(|o| format!("{} ({})", o.source, thousands(o.events)))
                .collect();
            let _ = writeln!(out, "top offending sources: {}", top.join(", "));
        }
    }
    out
}
