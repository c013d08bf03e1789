//! `guard status`: the admin endpoint's picture in the terminal, or the
//! pinned XDP state when no daemon answers.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use http_body_util::BodyExt as _;

use super::{
    status::Status,
    trace::{TraceAnswer, TraceRequest},
};
use crate::{
    cidr::Cidr,
    cli::{StatusArgs, TraceArgs},
    config::Config,
    ebpf::trace::Started,
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
    request(addr, hyper::Method::GET, path, None, token).await
}

/// POSTs a JSON `body` to `path` of the admin endpoint at `addr`; the
/// body of a 200.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    body: Vec<u8>,
    token: Option<&str>,
) -> anyhow::Result<Vec<u8>> {
    request(addr, hyper::Method::POST, path, Some(body), token).await
}

async fn request(
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    body: Option<Vec<u8>>,
    token: Option<&str>,
) -> anyhow::Result<Vec<u8>> {
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let driving = tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string());
        if let Some(t) = token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let body = http_body_util::Full::new(bytes::Bytes::from(body.unwrap_or_default()));
        let resp = sender.send_request(req.body(body)?).await?;
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

/// How often `guard xdp trace` asks for new lines.
const TRACE_POLL: Duration = Duration::from_millis(250);

/// Polls that may fail in a row before `guard xdp trace` gives up.
const TRACE_POLL_FAILURES: u32 = 8;

/// `guard xdp trace CIDR [--for 30s]`: starts the trace through the
/// admin endpoint, prints the lines of sources in CIDR as they come, and
/// removes the trace when the time is up or on Ctrl-C.
pub fn trace(args: &TraceArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let Some(addr) = args.admin.or(config.admin.listen) else {
        bail!(
            "the admin endpoint is off in the configuration; guard xdp trace needs the running \
             daemon's admin endpoint (give --admin ADDR:PORT)"
        );
    };
    let token = Some(config.admin.token.clone()).filter(|t| !t.is_empty());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_trace(addr, token.as_deref(), args.cidr, args.duration))
}

async fn run_trace(
    addr: SocketAddr,
    token: Option<&str>,
    cidr: Cidr,
    secs: u64,
) -> anyhow::Result<()> {
    let ask = |secs: u64, id: Option<u32>| {
        let body = serde_json::to_vec(&TraceRequest {
            cidr: cidr.to_string(),
            secs: Some(secs),
            id,
        })
        .expect("a request serializes");
        post(addr, "/trace", body, token)
    };
    let started: Started = match ask(secs, None).await {
        Ok(body) => {
            serde_json::from_slice(&body).context("the admin endpoint's /trace is not guard's")?
        }
        Err(e) if is_unreachable(&e) => bail!(
            "no guard daemon answers at {addr} ({e:#}): guard xdp trace needs `guard run` with \
             its XDP guard and admin endpoint (--admin, or [admin] listen in --config)"
        ),
        Err(e) => return Err(e.context(format!("cannot start a trace at {addr}"))),
    };
    eprintln!(
        "tracing SYNs from {} for {} s (trace {}; at most {} lines/s); Ctrl-C ends it",
        started.cidr,
        started.secs,
        started.id,
        crate::ebpf::trace::LINES_PER_SEC
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut seq = started.since;
    let mut shown = 0u64;
    let mut failures = 0;
    let mut tick = tokio::time::interval(TRACE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut last_round = false;
    let outcome = loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => last_round = true,
        }
        if tokio::time::Instant::now() >= deadline {
            // One more read after the end, for the lines of its last moments.
            last_round = true;
        }
        match fetch(addr, &format!("/trace?since={seq}"), token).await {
            Ok(body) => {
                failures = 0;
                let answer: TraceAnswer = match serde_json::from_slice(&body) {
                    Ok(a) => a,
                    Err(e) => {
                        break Err(anyhow::anyhow!(
                            "the admin endpoint's /trace is not guard's: {e}"
                        ));
                    }
                };
                if let Some(first) = answer.lines.first()
                    && first.seq > seq + 1
                    && seq > 0
                {
                    println!(
                        "… {} lines were lost (the daemon keeps the last {})",
                        first.seq - seq - 1,
                        crate::ebpf::trace::RING_LINES
                    );
                }
                for line in &answer.lines {
                    seq = line.seq;
                    if cidr.contains(line.source) {
                        println!("{} {}", clock(line.unix_ms), line.text);
                        shown += 1;
                    }
                }
                // A full answer leaves more waiting: no pause before the next.
                if answer.lines.len() >= crate::ebpf::trace::MAX_LINES_PER_ANSWER {
                    tick.reset_immediately();
                }
                if !last_round && !answer.traces.iter().any(|t| t.id == started.id) {
                    // Its expiry, counted by the daemon from a moment
                    // before ours, is no news; an earlier end is.
                    if deadline.saturating_duration_since(tokio::time::Instant::now())
                        > Duration::from_secs(1)
                    {
                        eprintln!("the trace was replaced or removed before its end");
                    }
                    last_round = true;
                }
            }
            Err(e) => {
                failures += 1;
                if failures >= TRACE_POLL_FAILURES {
                    break Err(e.context(format!("the daemon at {addr} stopped answering")));
                }
            }
        }
        if last_round {
            break Ok(());
        }
    };
    // Ended here rather than left to its expiry, but only if it is still
    // this trace: a later one of the same prefix is someone else's.
    if let Err(e) = ask(0, Some(started.id)).await {
        eprintln!("guard: the trace could not be removed ({e:#}); it ends by itself");
    }
    eprintln!("trace {} ended: {shown} line(s)", started.id);
    outcome
}

/// Whether `e` says nothing listens at the address.
fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::TimedOut
            )
        })
    }) || e.to_string().starts_with("no answer within")
}

/// `HH:MM:SS.mmm` (UTC) of Unix milliseconds.
fn clock(unix_ms: u64) -> String {
    let s = unix_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        unix_ms % 1000
    )
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
