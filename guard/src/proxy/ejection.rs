//! The ejection controller: which backends are in the ring, and which of
//! those take traffic.
//!
//! One task owns every decision and publishes each new ring to the
//! [`Router`]; requests never wait for it.
//!
//! - **Errors.** A backend whose connects, connections or requests fail
//!   `eject_after_errors` times in a row (no reply in between) is ejected
//!   as soon as the last failure is reported.
//! - **Latency.** Every `outlier_interval_ms` each live backend's 90th
//!   percentile over the interval is compared with the median of its live
//!   peers' ([`OutlierRule`]: `outlier_ratio` times and `outlier_min_gap_ms`
//!   above); an outlier in two intervals in a row is ejected. A backend
//!   needs [`MIN_SAMPLES`] answers in an interval to be judged or to count
//!   as a peer, and with no peer nothing is judged: one backend is never
//!   ejected for latency.
//! - **The cap.** At most `max_ejected_percent` of the ring is ejected at
//!   once; past it a backend stays in, however bad, and its failures reach
//!   its own keys' clients at once (connections down, bounded queues).
//! - **Re-admission.** An ejection lasts `eject_time_ms`, doubled by every
//!   ejection or failed probe in a row up to `max_eject_time_ms`, and is
//!   forgotten once the backend has stayed in that long. Then the backend
//!   is probed ([`probe`]: real set/get/delete round trips and a burst,
//!   beside the same probe of its live peers) and rejoins only if the
//!   probe passes. Under `redistribute` it is flushed first: while it was
//!   out its keys were written elsewhere, and what it still holds is
//!   older; flushing it is what keeps a returning backend from serving
//!   stale values (a miss is a cache's answer, a stale value is not).
//! - **Reloads.** Backends gone from the configuration leave the ring at
//!   once (what was already sent to them is answered); new ones are
//!   probed and flushed before they join, and probed again with backoff
//!   until they pass.
//!
//! Every ejection, failed probe and re-admission is logged once with its
//! reason and figures, and counted in `stats`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use log::{info, warn};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
    sync::{Notify, watch},
    task::JoinSet,
    time::{Instant, MissedTickBehavior, sleep_until, timeout},
};

use super::{
    backend::{BackendPool, BackendSettings},
    health::{BackendHealth, LatencySnapshot, OutlierRule, human, median},
    probe::{self, ProbeSettings, Verdict},
    router::{Backend, BackendState, Member, Router, Topology, gutter_tag},
    stats::ProxyStats,
};
use crate::config::{BackendConfig, EjectPolicy, ProxyConfig};

/// Answers a backend needs in an interval to be judged on latency, or to
/// count as a peer.
pub const MIN_SAMPLES: u64 = 5;

/// The longest ejection the config allows: a day.
const MAX_EJECT_TIME_MS: u64 = 86_400_000;

/// Intervals in a row an outlier must stay one to be ejected.
const STRIKES: u32 = 2;

/// How the controller decides; from `[proxy]`.
#[derive(Clone, Debug)]
pub struct EjectionSettings {
    pub policy: EjectPolicy,
    /// 0: never for errors.
    pub after_errors: u32,
    pub rule: OutlierRule,
    pub interval: Duration,
    pub max_percent: u32,
    pub eject_time: Duration,
    pub max_eject_time: Duration,
    pub probe: ProbeSettings,
}

impl EjectionSettings {
    /// The settings `config` gives.
    pub fn from_config(config: &ProxyConfig) -> Self {
        Self {
            policy: config.eject,
            after_errors: config.eject_after_errors,
            rule: OutlierRule {
                ratio: config.outlier_ratio,
                min_gap: Duration::from_millis(config.outlier_min_gap_ms),
            },
            interval: Duration::from_millis(config.outlier_interval_ms.max(1)),
            max_percent: config.max_ejected_percent.min(100),
            // Within what `validate` allows, whoever builds the config.
            eject_time: Duration::from_millis(config.eject_time_ms.clamp(10, MAX_EJECT_TIME_MS)),
            max_eject_time: Duration::from_millis(
                config.max_eject_time_ms.clamp(10, MAX_EJECT_TIME_MS),
            ),
            probe: ProbeSettings {
                connect_timeout: Duration::from_millis(config.connect_timeout_ms),
                request_timeout: Duration::from_millis(config.request_timeout_ms),
                ..ProbeSettings::default()
            },
        }
    }

    /// How long the `n`th ejection in a row lasts (`n` from 1).
    pub fn eject_time(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(31);
        self.eject_time
            .saturating_mul(1 << doublings)
            .min(self.max_eject_time)
    }
}

/// What a backend is doing, as the controller sees it.
#[derive(Debug)]
enum State {
    /// In the ring, taking its keys.
    Live { since: Instant },
    /// In the ring, its keys elsewhere (or refused) until it passes a
    /// probe, which is due at `probe_at`.
    Ejected {
        probe_at: Instant,
        /// Names this ejection's gutter keys; drawn again whenever the
        /// live set changes (see `Controller::publish`).
        episode: u64,
        probe: Option<ProbeTask>,
    },
    /// Added by a reload; joins the ring once it passes a probe.
    Joining {
        probe_at: Instant,
        probe: Option<ProbeTask>,
    },
}

/// A probe running for one backend: only its own result counts, and it
/// is stopped if the backend is removed meanwhile.
#[derive(Debug)]
struct ProbeTask {
    id: tokio::task::Id,
    abort: tokio::task::AbortHandle,
}

/// One backend the controller knows.
struct Tracked {
    backend: Arc<Backend>,
    weight: u32,
    state: State,
    /// Intervals in a row it was a latency outlier.
    strikes: u32,
    /// Ejections and failed probes in a row: each doubles the next wait.
    backoff_steps: u32,
    /// The cap kept it in while it was a candidate: said once per spell.
    cap_warned: bool,
}

impl Tracked {
    fn health(&self) -> &BackendHealth {
        self.backend.pool.health()
    }

    fn addr(&self) -> SocketAddr {
        self.backend.addr
    }

    fn in_ring(&self) -> bool {
        !matches!(self.state, State::Joining { .. })
    }

    fn is_live(&self) -> bool {
        matches!(self.state, State::Live { .. })
    }

    /// The probe running for it, if any.
    fn probe(&self) -> Option<&ProbeTask> {
        match &self.state {
            State::Ejected { probe, .. } | State::Joining { probe, .. } => probe.as_ref(),
            State::Live { .. } => None,
        }
    }
}

impl Drop for Tracked {
    /// A removed backend's probe must not go on to flush it.
    fn drop(&mut self) {
        if let Some(p) = self.probe() {
            p.abort.abort();
        }
    }
}

/// Why a backend is being ejected, with the figures for the log.
#[derive(Clone, Debug)]
enum Reason {
    Errors {
        count: u32,
        last: Option<super::error::ErrorKind>,
    },
    Latency {
        p90: Duration,
        peers: Duration,
    },
}

impl Reason {
    /// Worse first: errors, then by how far above its peers.
    fn severity(&self) -> f64 {
        match self {
            Reason::Errors { count, .. } => 1e12 + f64::from(*count),
            Reason::Latency { p90, peers } => p90.as_secs_f64() / peers.as_secs_f64().max(1e-9),
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Errors { count, last } => {
                write!(f, "{count} failures in a row")?;
                if let Some(k) = last {
                    write!(f, " (the last: {k})")?;
                }
                Ok(())
            }
            Reason::Latency { p90, peers } => write!(
                f,
                "90th-percentile latency {} vs its peers' {} ({:.0}×)",
                human(*p90),
                human(*peers),
                self.severity()
            ),
        }
    }
}

/// `first ejection`, `ejection 3 in a row`.
fn in_a_row(n: u32) -> String {
    if n <= 1 {
        "first ejection".to_owned()
    } else {
        format!("ejection {n} in a row")
    }
}

/// The controller; run it with [`Controller::run`].
pub struct Controller {
    router: Arc<Router>,
    settings: EjectionSettings,
    backend_settings: BackendSettings,
    stats: Arc<ProxyStats>,
    alarm: Arc<Notify>,
    tracked: Vec<Tracked>,
    probes: JoinSet<Verdict>,
    /// The live backends and weights the last published ring had: when
    /// they change, the continuum of live backends changes, and with it
    /// where an ejected backend's keys go.
    live_set: Vec<(SocketAddr, u32)>,
}

impl Controller {
    /// Starts a pool per backend in `config` and the ring over them, all
    /// live; returns the router requests use and the controller that
    /// keeps it.
    pub fn start(
        config: &ProxyConfig,
        backend_settings: BackendSettings,
        stats: Arc<ProxyStats>,
    ) -> (Arc<Router>, Self) {
        let settings = EjectionSettings::from_config(config);
        let alarm = Arc::new(Notify::new());
        let now = Instant::now();
        let mut c = Self {
            router: Arc::new(Router::new(Topology::new(Vec::new(), settings.policy))),
            settings,
            backend_settings,
            stats,
            alarm,
            tracked: Vec::new(),
            probes: JoinSet::new(),
            live_set: Vec::new(),
        };
        for b in &config.backends {
            let backend = c.new_backend(b.addr);
            c.tracked.push(Tracked {
                backend,
                weight: b.weight,
                state: State::Live { since: now },
                strikes: 0,
                backoff_steps: 0,
                cap_warned: false,
            });
        }
        c.publish();
        c.show();
        (c.router.clone(), c)
    }

    fn new_backend(&self, addr: SocketAddr) -> Arc<Backend> {
        let health = Arc::new(BackendHealth::new(self.alarm.clone()));
        let pool = BackendPool::start(addr, &self.backend_settings, self.stats.clone(), health);
        Arc::new(Backend::new(pool))
    }

    /// Judges, ejects, probes and re-admits until the task is aborted.
    /// `reloads` carries the backend lists of reloaded configurations.
    pub async fn run(mut self, mut reloads: Option<watch::Receiver<Vec<BackendConfig>>>) {
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let due = self.next_probe_due();
            tokio::select! {
                _ = tick.tick() => {
                    self.judge_latency();
                    self.judge_errors();
                    self.forget_old_backoff();
                }
                () = self.alarm.notified() => self.judge_errors(),
                r = async {
                    match &mut reloads {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => match r {
                    Ok(()) => {
                        let list = reloads.as_mut().map(|rx| rx.borrow_and_update().clone());
                        self.reload(&list.unwrap_or_default());
                    }
                    // The daemon is gone; keep judging what is here.
                    Err(_) => reloads = None,
                },
                () = async {
                    match due {
                        Some(at) => sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => self.start_due_probes(),
                Some(done) = self.probes.join_next_with_id() => match done {
                    Ok((id, verdict)) => self.probe_done(id, verdict),
                    // A probe aborted with its backend's removal has no
                    // one to report to; one that failed otherwise counts
                    // as failed, so the backend is tried again.
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => self.probe_done(e.id(), Verdict {
                        pass: false,
                        reason: format!("the probe's task failed: {e}"),
                    }),
                },
            }
            self.show();
        }
    }

    /// Shows operators each backend's state (a few stores per backend,
    /// after every event the loop handles).
    fn show(&self) {
        for t in &self.tracked {
            t.backend.state.set(match &t.state {
                State::Live { .. } => BackendState::Healthy,
                State::Ejected { probe: None, .. } => BackendState::Ejected,
                State::Ejected { probe: Some(_), .. } | State::Joining { probe: Some(_), .. } => {
                    BackendState::Probing
                }
                State::Joining { probe: None, .. } => BackendState::Joining,
            });
        }
        let now = self.router.tracked();
        let same = now.len() == self.tracked.len()
            && now
                .iter()
                .zip(&self.tracked)
                .all(|(a, b)| Arc::ptr_eq(a, &b.backend));
        if !same {
            self.router
                .set_tracked(self.tracked.iter().map(|t| t.backend.clone()).collect());
        }
    }

    /// Backends in the ring now.
    fn members(&self) -> usize {
        self.tracked.iter().filter(|t| t.in_ring()).count()
    }

    fn ejected(&self) -> usize {
        self.tracked
            .iter()
            .filter(|t| matches!(t.state, State::Ejected { .. }))
            .count()
    }

    /// Most backends that may be ejected at once.
    fn max_ejected(&self) -> usize {
        self.members() * self.settings.max_percent as usize / 100
    }

    fn judge_errors(&mut self) {
        let n = self.settings.after_errors;
        if n == 0 {
            return;
        }
        let mut candidates = Vec::new();
        for (i, t) in self.tracked.iter_mut().enumerate() {
            if !t.is_live() {
                continue;
            }
            let count = t.health().consecutive_failures();
            if count >= n {
                let last = t.health().last_failure();
                candidates.push((i, Reason::Errors { count, last }));
            } else if t.strikes < STRIKES {
                // No longer a candidate for anything: the next spell
                // the cap keeps it in is news again.
                t.cap_warned = false;
            }
        }
        self.eject(candidates);
    }

    fn judge_latency(&mut self) {
        let snapshots: Vec<LatencySnapshot> = self
            .tracked
            .iter()
            .map(|t| t.health().take_interval())
            .collect();
        if self.settings.rule.ratio == 0.0 {
            return;
        }
        let judged: Vec<Option<Duration>> = self
            .tracked
            .iter()
            .zip(&snapshots)
            .map(|(t, s)| (t.is_live() && s.count >= MIN_SAMPLES).then_some(s.p90))
            .collect();
        let mut candidates = Vec::new();
        for (i, t) in self.tracked.iter_mut().enumerate() {
            let Some(p90) = judged[i] else {
                t.strikes = 0;
                continue;
            };
            let peers: Vec<Duration> = judged
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .filter_map(|(_, p)| *p)
                .collect();
            let Some(peers) = median(&peers) else {
                t.strikes = 0;
                continue;
            };
            if self.settings.rule.is_outlier(p90, peers) {
                t.strikes = t.strikes.saturating_add(1);
                if t.strikes >= STRIKES {
                    candidates.push((i, Reason::Latency { p90, peers }));
                }
            } else {
                t.strikes = 0;
            }
        }
        self.eject(candidates);
    }

    fn eject(&mut self, mut candidates: Vec<(usize, Reason)>) {
        if candidates.is_empty() {
            return;
        }
        candidates.sort_by(|a, b| b.1.severity().total_cmp(&a.1.severity()));
        let now = Instant::now();
        let mut changed = false;
        for (i, reason) in candidates {
            let (ejected, max, members) = (self.ejected(), self.max_ejected(), self.members());
            let t = &mut self.tracked[i];
            if ejected >= max {
                if !t.cap_warned {
                    t.cap_warned = true;
                    warn!(
                        "backend {}: {reason}, but it stays in: {ejected} of {members} backend(s) \
                         ejected already, and max_ejected_percent = {} allows {max}",
                        t.addr(),
                        self.settings.max_percent
                    );
                }
                continue;
            }
            t.backoff_steps = t.backoff_steps.saturating_add(1);
            let lasts = self.settings.eject_time(t.backoff_steps);
            t.state = State::Ejected {
                probe_at: now + lasts,
                episode: new_episode(),
                probe: None,
            };
            t.strikes = 0;
            t.cap_warned = false;
            t.health().clear_failures();
            ProxyStats::add(&self.stats.backend_ejections, 1);
            t.backend.state.ejected();
            let keys = match self.settings.policy {
                EjectPolicy::Redistribute => "its keys go to the next live backend",
                EjectPolicy::FailFast => "its keys are refused (eject = fail-fast)",
            };
            warn!(
                "backend {} ejected: {reason}; {}, probed in {}; {keys}",
                t.addr(),
                in_a_row(t.backoff_steps),
                human(lasts)
            );
            changed = true;
        }
        if changed {
            self.publish();
        }
    }

    /// A backend that has stayed in for the longest ejection time starts
    /// again from the shortest.
    fn forget_old_backoff(&mut self) {
        let max = self.settings.max_eject_time;
        for t in &mut self.tracked {
            if let State::Live { since } = t.state
                && t.backoff_steps > 0
                && since.elapsed() >= max
            {
                t.backoff_steps = 0;
            }
        }
    }

    fn next_probe_due(&self) -> Option<Instant> {
        self.tracked
            .iter()
            .filter_map(|t| match &t.state {
                State::Ejected {
                    probe_at,
                    probe: None,
                    ..
                }
                | State::Joining {
                    probe_at,
                    probe: None,
                } => Some(*probe_at),
                _ => None,
            })
            .min()
    }

    fn start_due_probes(&mut self) {
        let now = Instant::now();
        let peers: Vec<SocketAddr> = self
            .tracked
            .iter()
            .filter(|t| t.is_live())
            .map(Tracked::addr)
            .collect();
        for t in &mut self.tracked {
            // A joining backend may hold anything from an earlier life; a
            // returning one holds values older than those written
            // elsewhere while it was out. Under fail-fast nothing was
            // written elsewhere.
            let flush = matches!(t.state, State::Joining { .. })
                || self.settings.policy == EjectPolicy::Redistribute;
            let (State::Ejected {
                probe_at, probe, ..
            }
            | State::Joining { probe_at, probe }) = &mut t.state
            else {
                continue;
            };
            if probe.is_some() || *probe_at > now {
                continue;
            }
            let peers: Vec<SocketAddr> = peers
                .iter()
                .copied()
                .filter(|&p| p != t.backend.addr)
                .collect();
            let task = self.probes.spawn(probe_backend(
                t.backend.clone(),
                peers,
                self.settings.clone(),
                flush,
            ));
            *probe = Some(ProbeTask {
                id: task.id(),
                abort: task,
            });
        }
    }

    fn probe_done(&mut self, id: tokio::task::Id, verdict: Verdict) {
        let now = Instant::now();
        // Only the probe the backend is waiting for counts: a backend
        // removed meanwhile is gone (its probe was aborted).
        let Some(i) = self
            .tracked
            .iter()
            .position(|t| t.probe().is_some_and(|p| p.id == id))
        else {
            return;
        };
        let settings = &self.settings;
        let t = &mut self.tracked[i];
        let joining = matches!(t.state, State::Joining { .. });
        if verdict.pass {
            t.state = State::Live { since: now };
            t.strikes = 0;
            t.health().clear_failures();
            // Latencies from before it left say nothing of it now.
            t.health().take_interval();
            let (counter, was) = if joining {
                (&self.stats.backends_added, "joined the ring")
            } else {
                (&self.stats.backend_readmissions, "re-admitted")
            };
            ProxyStats::add(counter, 1);
            info!("backend {} {was}: {}", t.addr(), verdict.reason);
            self.publish();
            return;
        }
        ProxyStats::add(&self.stats.backend_probe_failures, 1);
        t.backoff_steps = t.backoff_steps.saturating_add(1);
        let lasts = settings.eject_time(t.backoff_steps);
        if let State::Ejected {
            probe_at, probe, ..
        }
        | State::Joining { probe_at, probe } = &mut t.state
        {
            *probe_at = now + lasts;
            *probe = None;
        }
        let what = if joining {
            "new backend refused"
        } else {
            "still ejected"
        };
        warn!(
            "backend {} failed its probe: {}; {what}, probed again in {}",
            t.addr(),
            verdict.reason,
            human(lasts)
        );
    }

    /// Applies a reloaded backend list: gone ones leave at once, new ones
    /// are probed before they join, weights change in place.
    fn reload(&mut self, list: &[BackendConfig]) {
        let now = Instant::now();
        let mut next = Vec::with_capacity(list.len());
        for b in list {
            match self.tracked.iter().position(|t| t.addr() == b.addr) {
                Some(i) => {
                    let mut t = self.tracked.swap_remove(i);
                    if t.weight != b.weight {
                        info!("backend {}: weight {} → {}", b.addr, t.weight, b.weight);
                        t.weight = b.weight;
                    }
                    next.push(t);
                }
                None => {
                    info!(
                        "backend {} added: probing it before it joins the ring",
                        b.addr
                    );
                    next.push(Tracked {
                        backend: self.new_backend(b.addr),
                        weight: b.weight,
                        state: State::Joining {
                            probe_at: now,
                            probe: None,
                        },
                        strikes: 0,
                        backoff_steps: 0,
                        cap_warned: false,
                    });
                }
            }
        }
        for gone in self.tracked.drain(..) {
            ProxyStats::add(&self.stats.backends_removed, 1);
            if gone.in_ring() {
                info!(
                    "backend {} removed: its keys move to the others; what was sent to it is \
                     still answered",
                    gone.addr()
                );
            } else {
                info!("backend {} removed before it joined the ring", gone.addr());
            }
        }
        self.tracked = next;
        if !self.tracked.iter().any(Tracked::is_live) {
            // A ring with no live backend refuses every key: rather than
            // wait for probes, serve with what is configured, as at start.
            for t in &mut self.tracked {
                if matches!(t.state, State::Joining { .. }) {
                    warn!(
                        "backend {}: no live backend is left, so it joins without a probe",
                        t.addr()
                    );
                    t.state = State::Live { since: now };
                }
            }
        }
        // Fewer backends may allow fewer ejected: the excess is probed now.
        let mut excess = self.ejected().saturating_sub(self.max_ejected());
        for t in &mut self.tracked {
            if excess == 0 {
                break;
            }
            if let State::Ejected {
                probe_at,
                probe: None,
                ..
            } = &mut t.state
            {
                *probe_at = now;
                excess -= 1;
            }
        }
        self.publish();
    }

    /// Puts the ring the tracked states describe in force. When the live
    /// backends (or their weights) changed, every ejected backend's
    /// gutter gets a new name: its keys now go to other backends, and
    /// one of those may hold copies from an earlier spell of this same
    /// ejection (before a peer left and came back), older than what was
    /// written since.
    fn publish(&mut self) {
        let live_set: Vec<(SocketAddr, u32)> = self
            .tracked
            .iter()
            .filter(|t| t.is_live())
            .map(|t| (t.addr(), t.weight))
            .collect();
        if live_set != self.live_set {
            self.live_set = live_set;
            for t in &mut self.tracked {
                if let State::Ejected { episode, .. } = &mut t.state {
                    *episode = new_episode();
                }
            }
        }
        let members = self
            .tracked
            .iter()
            .filter_map(|t| {
                let gutter = match t.state {
                    State::Live { .. } => None,
                    State::Ejected { episode, .. } => Some(gutter_tag(episode)),
                    State::Joining { .. } => return None,
                };
                Some(Member {
                    backend: t.backend.clone(),
                    weight: t.weight,
                    gutter,
                })
            })
            .collect();
        self.router
            .publish(Topology::new(members, self.settings.policy));
        let ejected = self.ejected() as u64;
        let joining = (self.tracked.len() - self.members()) as u64;
        self.stats
            .backends_ejected
            .store(ejected, std::sync::atomic::Ordering::Relaxed);
        self.stats
            .backends_joining
            .store(joining, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A name for one ejection's gutter keys, different from every other
/// ejection's, in this process or any other.
fn new_episode() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // Unreachable on Linux; the clock still tells ejections apart.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return now.as_nanos() as u64;
    }
    u64::from_le_bytes(b)
}

/// Probes `backend` beside its live `peers` and, if it passes and
/// `flush`, flushes it; then waits for its pooled connections to come up.
/// Any step that fails fails the probe.
async fn probe_backend(
    backend: Arc<Backend>,
    peers: Vec<SocketAddr>,
    settings: EjectionSettings,
    flush: bool,
) -> Verdict {
    let mut verdict = probe_and_judge(&backend, &peers, &settings).await;
    if verdict.pass
        && let Err(reason) = take_back(&backend, &settings.probe, flush).await
    {
        verdict = Verdict {
            pass: false,
            reason: format!("{}; but {reason}", verdict.reason),
        };
    } else if verdict.pass && flush {
        verdict
            .reason
            .push_str("; flushed before it takes its keys back");
    }
    verdict
}

async fn probe_and_judge(
    backend: &Backend,
    peers: &[SocketAddr],
    settings: &EjectionSettings,
) -> Verdict {
    let addr = backend.addr;
    let s = &settings.probe;
    // A backend still down is told so without probing every peer again.
    if let Err(e) = timeout(s.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("no connection within {}", human(s.connect_timeout)))
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        return Verdict {
            pass: false,
            reason: e,
        };
    }
    // The peers first: what they take now sets the bar the candidate
    // must clear, and a candidate far above it is given up on early.
    let peers: Vec<_> = probe::probe_all(peers, s)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    let p90s: Vec<Duration> = peers.iter().map(|p| p.round_trip_p90).collect();
    let rule = settings.rule;
    let slow_above = median(&p90s)
        .filter(|_| rule.ratio > 0.0)
        .map(|p| p.mul_f64(rule.ratio).max(p + rule.min_gap));
    let candidate = probe::probe(
        addr,
        &ProbeSettings {
            slow_above,
            ..s.clone()
        },
    )
    .await;
    let mut verdict = probe::judge(&candidate, &peers, &settings.rule);
    // The log line names the backend already.
    if let Some(rest) = verdict.reason.strip_prefix(&format!("{addr}: ")) {
        verdict.reason = rest.to_owned();
    }
    verdict
}

/// Readies a backend that passed its probe to take its keys: nothing it
/// was sent before it left is still outstanding, it is flushed (if
/// `flush`), and every pooled connection is up.
async fn take_back(backend: &Backend, s: &ProbeSettings, flush: bool) -> Result<(), String> {
    let pool = &backend.pool;
    // What it was sent before it left is answered or failed within the
    // request timeout (a connection discarded on a timeout resets, so
    // what it had not sent is dropped, not delivered after the flush).
    let deadline = Instant::now() + s.request_timeout + Duration::from_millis(100);
    while pool.in_flight() > 0 {
        if Instant::now() >= deadline {
            return Err("requests sent before its ejection are still outstanding".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if flush {
        flush_all(backend.addr, s)
            .await
            .map_err(|e| format!("it could not be flushed: {e}"))?;
    }
    // Its pooled connections may be waiting out a reconnect backoff; a
    // session pinned to one still down would be refused.
    pool.passed_probe();
    let deadline = Instant::now() + s.connect_timeout + Duration::from_millis(100);
    while !pool.all_up() {
        if Instant::now() >= deadline {
            return Err("its pooled connections did not come up".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// `flush_all` on its own connection, within the probe's timeouts.
async fn flush_all(addr: SocketAddr, s: &ProbeSettings) -> Result<(), String> {
    let stream = timeout(s.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("no connection within {}", human(s.connect_timeout)))?
        .map_err(|e| e.to_string())?;
    let mut stream = BufReader::new(stream);
    let exchange = async {
        stream.get_mut().write_all(b"flush_all\r\n").await?;
        let mut line = String::new();
        // `OK`, or an error line; never more than a short line.
        (&mut stream).take(256).read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line)
    };
    let line = timeout(s.request_timeout, exchange)
        .await
        .map_err(|_| format!("no reply within {}", human(s.request_timeout)))?
        .map_err(|e| e.to_string())?;
    if line == "OK\r\n" {
        Ok(())
    } else {
        Err(format!(
            "flush_all answered {:?}",
            Bytes::from(line.into_bytes())
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejections_in_a_row_last_longer_up_to_the_cap() {
        let mut c = ProxyConfig {
            eject_time_ms: 100,
            max_eject_time_ms: 700,
            ..ProxyConfig::default()
        };
        let s = EjectionSettings::from_config(&c);
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            (1..=5).map(|n| s.eject_time(n)).collect::<Vec<_>>(),
            [ms(100), ms(200), ms(400), ms(700), ms(700)]
        );
        assert_eq!(s.eject_time(u32::MAX), ms(700));
        c.max_eject_time_ms = u64::MAX / 2;
        assert!(EjectionSettings::from_config(&c).eject_time(200) > ms(1_000_000));
    }

    #[test]
    fn reasons_read_as_figures() {
        let r = Reason::Latency {
            p90: Duration::from_millis(212),
            peers: Duration::from_micros(400),
        };
        assert_eq!(
            r.to_string(),
            "90th-percentile latency 212.0 ms vs its peers' 0.40 ms (530×)"
        );
        let r = Reason::Errors {
            count: 3,
            last: Some(super::super::error::ErrorKind::ConnectRefused),
        };
        assert_eq!(
            r.to_string(),
            "3 failures in a row (the last: connection refused)"
        );
        assert!(
            r.severity()
                > Reason::Latency {
                    p90: Duration::from_secs(100),
                    peers: Duration::from_nanos(1)
                }
                .severity()
        );
    }

    #[test]
    fn episodes_differ() {
        let a: std::collections::HashSet<u64> = (0..1000).map(|_| new_episode()).collect();
        assert_eq!(a.len(), 1000);
    }
}
