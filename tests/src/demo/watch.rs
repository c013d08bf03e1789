//! What is sampled while a run goes on: the proxy port's sockets (every
//! [`SAMPLE_EVERY`]), the proxy's ejections, and a live progress line.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Read as _, Write as _},
    time::Duration,
};

use super::{
    load::{Outcome, Recorder, lock},
    world::{PORT, Proxy, World},
};
use crate::connect_in;

/// How often the sockets are counted.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The proxy port's sockets at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Milliseconds from the run's start.
    pub t_ms: u32,
    /// Established connections.
    pub established: u32,
    /// Connections the client closed and the proxy has not.
    pub close_wait: u32,
}

impl Sample {
    /// Connections open on the proxy's side: established or waiting for
    /// the proxy to close.
    pub fn open(&self) -> u32 {
        self.established + self.close_wait
    }
}

/// A backend ejected, re-admitted or probed, as the proxy reported it.
#[derive(Clone, Debug)]
pub struct Event {
    /// Milliseconds from the run's start (when it was seen).
    pub t_ms: u32,
    /// What happened, naming the node.
    pub text: String,
}

/// Counts the proxy port's established and CLOSE_WAIT sockets with `ss`
/// in the server namespace.
pub fn count_sockets(world: &World) -> (u32, u32) {
    let filter = format!("( sport = :{PORT} )");
    let Ok(out) = world.topo.server.exec(
        "ss",
        [
            "-Htan",
            "state",
            "established",
            "state",
            "close-wait",
            &filter,
        ],
    ) else {
        return (0, 0);
    };
    let (mut est, mut cw) = (0, 0);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        match line.split_whitespace().next() {
            Some("ESTAB") => est += 1,
            Some("CLOSE-WAIT") => cw += 1,
            _ => {}
        }
    }
    (est, cw)
}

/// Follows the proxy's reports of backends coming and going.
pub struct EjectionWatch {
    /// guard: how much of the log was read.
    log_seen: usize,
    /// nutcracker: each server's last `server_ejected_at`.
    ejected_at: BTreeMap<String, u64>,
}

impl EjectionWatch {
    /// Starts with nothing seen.
    pub fn new() -> Self {
        Self {
            log_seen: 0,
            ejected_at: BTreeMap::new(),
        }
    }

    /// What the proxy reported since the last poll.
    pub fn poll(&mut self, world: &World, proxy: &Proxy) -> Vec<String> {
        match proxy {
            Proxy::Guard(g) => {
                let log = g.log_text();
                let new = log.get(self.log_seen..).unwrap_or_default().to_owned();
                self.log_seen = log.len();
                new.lines().filter_map(|l| guard_event(world, l)).collect()
            }
            Proxy::Nutcracker { stats, .. } => self.nutcracker_events(world, *stats),
        }
    }

    /// nutcracker's stats port: each server's `server_ejected_at` moves
    /// when it is ejected (it says nothing when it is retried).
    fn nutcracker_events(&mut self, world: &World, stats: std::net::SocketAddr) -> Vec<String> {
        let Ok(mut s) = connect_in(&world.topo.server, stats, Duration::from_millis(200)) else {
            return Vec::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for pool in json.as_object().into_iter().flat_map(|o| o.values()) {
            for (server, fig) in pool.as_object().into_iter().flatten() {
                let Some(at) = fig.get("server_ejected_at").and_then(|v| v.as_u64()) else {
                    continue;
                };
                let before = self.ejected_at.insert(server.clone(), at).unwrap_or(0);
                if at != 0 && at != before {
                    let node = world.node_name(server).unwrap_or("a node");
                    out.push(format!(
                        "{node} ejected (auto_eject_hosts: failures in a row)"
                    ));
                }
            }
        }
        out
    }
}

impl Default for EjectionWatch {
    fn default() -> Self {
        Self::new()
    }
}

/// A guard log line about a backend, shortened to the node and the
/// decision with its figures.
fn guard_event(world: &World, line: &str) -> Option<String> {
    let (_, rest) = line.split_once("backend ")?;
    let (addr, what) = rest.split_once(' ')?;
    let keep = [" ejected: ", " re-admitted: ", " failed its probe: "];
    if !keep.iter().any(|k| line.contains(k)) {
        return None;
    }
    let node = world.node_name(addr)?;
    // The decision and its figures, up to the first clause after them.
    let short = what.split("; ").next().unwrap_or(what);
    Some(format!("{node} {short}"))
}

/// The live one-line display on stderr, when stderr is a terminal.
pub struct Progress {
    on: bool,
}

impl Progress {
    /// On only when stderr is a terminal.
    pub fn new() -> Self {
        Self {
            on: std::io::stderr().is_terminal(),
        }
    }

    /// Replaces the line.
    pub fn show(&self, line: &str) {
        if self.on {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[2K{line}");
            let _ = e.flush();
        }
    }

    /// Clears the line, so a normal line can follow.
    pub fn clear(&self) {
        if self.on {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[2K");
            let _ = e.flush();
        }
    }

    /// Prints a line of its own above the progress line.
    pub fn say(&self, line: &str) {
        self.clear();
        eprintln!("{line}");
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// The current numbers in one line: each tenant's p99 and errors over
/// the last second, the sockets, the storm's attempts so far.
pub fn progress_line(
    side: &str,
    phase: &str,
    rec: &Recorder,
    tenants: &[&str],
    sample: Sample,
    storm_target: usize,
) -> String {
    let now = rec.now_ms();
    let mut parts = Vec::new();
    for (i, name) in tenants.iter().enumerate() {
        let reqs = lock(&rec.steady[i]);
        let mut lat: Vec<u32> = Vec::new();
        let mut errors = 0;
        for r in reqs.iter().rev().take_while(|r| r.t_ms + 1_000 >= now) {
            lat.push(r.lat_us);
            errors += u32::from(r.outcome != Outcome::Served);
        }
        lat.sort_unstable();
        let p99 = lat
            .get((lat.len() * 99).div_ceil(100).saturating_sub(1))
            .map_or(0.0, |v| f64::from(*v) / 1e3);
        parts.push(format!("{name} p99 {p99:.1} ms, {errors} err"));
    }
    let storm = lock(&rec.storm).len();
    let storm = if storm > 0 {
        format!(" │ storm {storm}/{storm_target}")
    } else {
        String::new()
    };
    format!(
        "[{side}] {phase} {:.1} s │ {} │ open {} │ CLOSE_WAIT {}{storm}",
        f64::from(now) / 1e3,
        parts.join(" · "),
        sample.open(),
        sample.close_wait
    )
}
