//! One side's run through the script: its proxy started, its clients
//! run phase by phase, everything sampled, then stopped and joined.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{
    Mechanism, PhaseKind, Script, Side,
    load::{self, ClientSetup, Recorder},
    stopped,
    watch::{self, EjectionWatch, Event, Progress, SAMPLE_EVERY, Sample},
    world::{Proxy, World},
};
use crate::{FloodStats, SynFlood};

/// What was measured at a phase's edges.
#[derive(Clone, Debug, Default)]
pub struct PhaseMark {
    /// When it started and ended, in milliseconds from the run's start.
    pub start_ms: u32,
    /// See `start_ms`.
    pub end_ms: u32,
    /// The XDP counters' change over the phase; `None` without XDP.
    pub xdp: Option<BTreeMap<&'static str, u64>>,
    /// SYN cookies the server's kernel sent over the phase (its SYN queue
    /// was full).
    pub syn_cookies: u64,
    /// SYNs the server's kernel dropped for a full listen queue.
    pub listen_drops: u64,
    /// The spoofed flood, in the storm.
    pub flood: Option<FloodStats>,
}

/// Everything one run recorded.
pub struct RunData {
    /// Which side.
    pub side: Side,
    /// The proxy's name.
    pub proxy: String,
    /// The clients' records.
    pub rec: Arc<Recorder>,
    /// The proxy port's sockets over time.
    pub samples: Vec<Sample>,
    /// Ejections and re-admissions.
    pub events: Vec<Event>,
    /// Per phase.
    pub marks: Vec<PhaseMark>,
    /// Sources that connected (and logged in) before the run.
    pub warmed_up: (usize, usize),
}

/// A client thread in the client namespace.
type Client = JoinHandle<Result<()>>;

fn join_all(threads: Vec<Client>) {
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("demo: a client failed: {e:#}"),
            Err(_) => eprintln!("demo: a client panicked"),
        }
    }
}

fn xdp_counters(proxy: &Proxy) -> Option<BTreeMap<&'static str, u64>> {
    match proxy {
        Proxy::Guard(g) => g.counters().ok(),
        Proxy::Nutcracker { .. } => None,
    }
}

fn kernel(world: &World) -> (u64, u64) {
    world.topo.server.counters().map_or((0, 0), |c| {
        (c.get("TcpExtSyncookiesSent"), c.get("TcpExtListenDrops"))
    })
}

/// Runs `script` against the side's proxy.
pub fn run_side(
    world: &World,
    side: Side,
    script: &Script,
    without: Option<Mechanism>,
    progress: &Progress,
) -> Result<RunData> {
    world.flush_backends().context("emptying the backends")?;
    let proxy = Proxy::start(world, side, script, without)?;
    let label = proxy.label();
    progress.say(&format!(
        "demo: [{}] {label} is up on {}",
        side.name(),
        world.listen
    ));
    let setup = ClientSetup {
        dst: world.listen,
        logins: (side == Side::After).then(|| {
            script
                .tenants
                .iter()
                .map(|t| World::credentials(t))
                .collect()
        }),
        tenants: script.tenants.iter().map(|t| t.to_string()).collect(),
        timeout: script.client_timeout,
        hard_deadline: Instant::now() + script.length() + Duration::from_secs(30),
    };

    // Every client address has been a client before: guard verified it.
    let mut sources: Vec<(usize, Ipv4Addr)> =
        world.tenant_sources.iter().copied().enumerate().collect();
    sources.push((0, world.spike_source));
    sources.extend(
        world
            .storm_sources
            .iter()
            .enumerate()
            .map(|(i, a)| (i % 3, *a)),
    );
    let warm = {
        let (setup, sources) = (setup.clone(), sources.clone());
        world
            .topo
            .client
            .run_in(move || load::warm_up(&setup, &sources))?
    };
    if warm < sources.len() {
        progress.say(&format!(
            "demo: [{}] only {warm} of {} client addresses could connect before the run",
            side.name(),
            sources.len()
        ));
    }
    // A login's verification reaches XDP off the session's path.
    std::thread::sleep(Duration::from_millis(500));

    let stored = {
        let (setup, src) = (setup.clone(), world.spike_source);
        let (keys, len) = (script.spike_keys, script.spike_value);
        world
            .topo
            .client
            .run_in(move || load::preload_spike(&setup, src, keys, len))?
    };
    if stored < script.spike_keys {
        progress.say(&format!(
            "demo: [{}] only {stored} of the spike's {} values could be stored",
            side.name(),
            script.spike_keys
        ));
    }
    // The first phase's counters start before its clients do.
    let mut xdp_start = xdp_counters(&proxy);
    let mut kernel_start = Some(kernel(world));
    let rec = Arc::new(Recorder::new(script.tenants.len()));
    let mut steady = Vec::new();
    let every =
        Duration::from_secs_f64(script.steady_connections as f64 / f64::from(script.steady_rate));
    for (t, src) in world.tenant_sources.iter().copied().enumerate() {
        for c in 0..script.steady_connections {
            let (rec, setup) = (rec.clone(), setup.clone());
            let seed = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul((t * 100 + c + 1) as u64);
            steady.push(world.topo.client.spawn_thread(move || {
                load::steady(&rec, &setup, t, src, every, seed);
                Ok(())
            })?);
        }
    }

    let mut samples = Vec::new();
    let mut events = Vec::new();
    let mut marks = Vec::new();
    let mut ejections = EjectionWatch::new();
    let bounds = script.bounds();
    let tenants: Vec<&str> = script.tenants.to_vec();
    for (phase, &(from, to)) in script.phases.iter().zip(&bounds) {
        if stopped() {
            break;
        }
        let (start, end) = (rec.t0 + from, rec.t0 + to);
        // A phase starts on time even if the last one overran.
        while Instant::now() < start && !stopped() {
            std::thread::sleep(Duration::from_millis(10));
        }
        progress.say(&format!(
            "demo: [{}] {:>5.1} s  {}: {}",
            side.name(),
            from.as_secs_f64(),
            phase.name,
            script.describe(phase.kind)
        ));
        let mut mark = PhaseMark {
            // The first phase holds the clients' first connects, made as
            // their threads started.
            start_ms: if marks.is_empty() { 0 } else { rec.now_ms() },
            ..PhaseMark::default()
        };
        let xdp_before = xdp_start.take().or_else(|| xdp_counters(&proxy));
        let kernel_before = kernel_start.take().unwrap_or_else(|| kernel(world));
        let stop_spike = Arc::new(AtomicBool::new(false));
        let mut phase_clients: Vec<Client> = Vec::new();
        let mut flood = None;
        match phase.kind {
            PhaseKind::Noisy => {
                let every = Duration::from_secs_f64(
                    (script.spike_connections * script.spike_depth) as f64
                        / f64::from(script.budget * script.spike_factor),
                );
                for n in 0..script.spike_connections {
                    let (rec, setup, stop) = (rec.clone(), setup.clone(), stop_spike.clone());
                    let (src, depth, keys) =
                        (world.spike_source, script.spike_depth, script.spike_keys);
                    phase_clients.push(world.topo.client.spawn_thread(move || {
                        load::spike(&rec, &setup, src, n, depth, keys, every, &stop);
                        Ok(())
                    })?);
                }
            }
            PhaseKind::Slow => world.relay.set_delay(script.slow_delay),
            PhaseKind::Storm => {
                world.relay.set_delay(script.slow_delay);
                let sources = world.storm_sources.len();
                for (i, src) in world.storm_sources.iter().copied().enumerate() {
                    let attempts = script.storm_attempts / sources
                        + usize::from(i < script.storm_attempts % sources);
                    let (rec, setup) = (rec.clone(), setup.clone());
                    let timeout = script.storm_connect_timeout;
                    let seed = 0x2545_F491_4F6C_DD1Du64.wrapping_mul(i as u64 + 1);
                    phase_clients.push(world.topo.client.spawn_thread(move || {
                        load::storm(&rec, &setup, i % 3, src, attempts, timeout, end, seed);
                        Ok(())
                    })?);
                }
                let mut cfg = world.topo.syn_flood(
                    world.topo.spoofed_sources_v4(),
                    world.listen,
                    (script.flood_rate as f64 * phase.length.as_secs_f64()) as u64,
                );
                cfg.rate_pps = Some(script.flood_rate);
                cfg.max_duration = phase.length;
                flood = Some(SynFlood::start(&world.topo.client, cfg)?);
            }
            PhaseKind::Calm | PhaseKind::Recovery => {}
        }
        let mut healed = false;
        let mut next_sample = Instant::now();
        while Instant::now() < end && !stopped() {
            if phase.kind == PhaseKind::Slow
                && !healed
                && Instant::now() >= start + script.heal_after
            {
                world.relay.set_delay(Duration::ZERO);
                healed = true;
            }
            if Instant::now() >= next_sample {
                next_sample += SAMPLE_EVERY;
                let (established, close_wait) = watch::count_sockets(world);
                let s = Sample {
                    t_ms: rec.now_ms(),
                    established,
                    close_wait,
                };
                samples.push(s);
                for text in ejections.poll(world, &proxy) {
                    let t_ms = rec.now_ms();
                    progress.say(&format!(
                        "demo: [{}] {:>5.1} s  {text}",
                        side.name(),
                        f64::from(t_ms) / 1e3
                    ));
                    events.push(Event { t_ms, text });
                }
                progress.show(&watch::progress_line(
                    side.name(),
                    phase.name,
                    &rec,
                    &tenants,
                    s,
                    script.storm_attempts,
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        mark.end_ms = rec.now_ms();
        stop_spike.store(true, Ordering::Relaxed);
        if matches!(phase.kind, PhaseKind::Slow | PhaseKind::Storm) {
            world.relay.set_delay(Duration::ZERO);
        }
        if let Some(f) = flood.take() {
            mark.flood = Some(f.join()?);
        }
        join_all(phase_clients);
        mark.xdp = match (xdp_before, xdp_counters(&proxy)) {
            (Some(a), Some(b)) => Some(
                b.iter()
                    .map(|(k, v)| (*k, v.saturating_sub(a.get(k).copied().unwrap_or(0))))
                    .collect(),
            ),
            _ => None,
        };
        let kernel_after = kernel(world);
        mark.syn_cookies = kernel_after.0.saturating_sub(kernel_before.0);
        mark.listen_drops = kernel_after.1.saturating_sub(kernel_before.1);
        marks.push(mark);
    }
    rec.end.store(true, Ordering::Relaxed);
    join_all(steady);
    progress.clear();
    for text in ejections.poll(world, &proxy) {
        events.push(Event {
            t_ms: rec.now_ms(),
            text,
        });
    }
    drop(proxy);
    Ok(RunData {
        side,
        proxy: label,
        rec,
        samples,
        events,
        marks,
        warmed_up: (warm, sources.len()),
    })
}
