//! The daemon's side of the ladder: it takes the proxy's strikes and the
//! strict budget's overruns to the [`Ladder`], writes what the ladder
//! decides into the XDP maps (the strict map, the deny list with a TTL),
//! logs each escalation and de-escalation once with its reason, counts
//! them, and records the ladder in a state file (`escalation.json` under
//! the versioned run directory) that a restarted daemon resumes from and
//! `guard deny list` and `guard xdp status` read.
//!
//! Every time is `CLOCK_MONOTONIC`, the program's clock: entries written
//! before a restart mean the same after it. The file names the boot it was
//! written in, and a file from another boot (whose pins are gone anyway)
//! is ignored.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use guard_common::RateLimit;
use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::{
    Counters, Signal, Strike,
    ladder::{Change, Ladder, LadderSettings, Rung, Shield, Step},
    signals::Reporter,
};
use crate::{
    cidr::Cidr,
    config::{Config, tenant_id},
    ebpf::maps::{CidrList, GuardMaps, monotonic_ns},
    paths::Paths,
};

/// A strike saves the state file at once unless it was saved more
/// recently than this; the tick saves what is left. The file holds up to
/// `STRICT_CAPACITY` sources, so it is never written more often.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// A full ladder is said at most this often.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// The state file: the ladder and what it did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscalationState {
    /// The boot it was written in (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// Unix time it was written.
    pub updated_unix: u64,
    /// The monotonic clock when it was written, to turn the rungs' times
    /// into seconds left.
    pub now_ns: u64,
    /// Whether escalation was on.
    pub enabled: bool,
    /// The strict budget in force.
    pub strict_rate: u64,
    /// Its burst.
    pub strict_burst: u64,
    /// The IPv6 prefix escalated sources are masked to.
    pub ipv6_prefix: u8,
    /// Every source the ladder remembers.
    pub rungs: Vec<Rung>,
    /// What the ladder did since the daemon started.
    pub counters: BTreeMap<String, u64>,
}

impl EscalationState {
    /// The record of this boot, if a daemon wrote one (a corrupt file is
    /// an error).
    pub fn load(paths: &Paths) -> anyhow::Result<Option<Self>> {
        let state: Option<Self> = crate::paths::read_state(&paths.escalation_file())?;
        Ok(state.filter(|s| s.boot_id == boot_id()))
    }

    /// The deny list prefix escalation uses for `source`.
    pub fn cidr(&self, source: IpAddr) -> Cidr {
        source_cidr(source, self.ipv6_prefix)
    }

    /// The rung whose deny entry `cidr` expiring at `expires_ns` is, if
    /// escalation made it (an entry replaced by an operator since is not).
    pub fn deny_entry(&self, cidr: Cidr, expires_ns: u64) -> Option<&Rung> {
        self.rungs.iter().find(|r| {
            r.deny_entry_ns != 0 && r.deny_entry_ns == expires_ns && self.cidr(r.source) == cidr
        })
    }
}

/// The deny list prefix for a source: the address, or its IPv6 prefix.
pub fn source_cidr(source: IpAddr, ipv6_prefix: u8) -> Cidr {
    let len = if source.is_ipv4() { 32 } else { ipv6_prefix };
    Cidr::new(source, len).expect("a host or a validated IPv6 prefix")
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Applies the ladder to the maps; see the module docs.
pub struct Enforcer {
    enabled: bool,
    churn_lifetime_ms: u64,
    settings: LadderSettings,
    strict: RateLimit,
    ipv6_prefix: u8,
    tenant_names: HashMap<u32, String>,
    ladder: Ladder,
    /// The proxy's reporter, for live logins; `None` without a proxy.
    reporter: Option<Arc<Reporter>>,
    counters: Arc<Counters>,
    paths: Paths,
    dirty: bool,
    saved_at: Option<Instant>,
    full_said: Option<Instant>,
    save_failed: bool,
}

impl Enforcer {
    /// Resumes the ladder the previous daemon recorded (or clears what it
    /// left, if escalation is now off) and brings the maps in line with
    /// it.
    pub fn start(
        paths: &Paths,
        config: &Config,
        reporter: Option<Arc<Reporter>>,
        counters: Arc<Counters>,
        maps: &mut GuardMaps,
    ) -> Self {
        let state = EscalationState::load(paths).unwrap_or_else(|e| {
            warn!("escalation: ignoring {e:#}; starting the ladder afresh");
            None
        });
        let mut e = Self {
            enabled: false,
            churn_lifetime_ms: 0,
            settings: LadderSettings::from_config(&config.escalation),
            strict: RateLimit::UNLIMITED,
            ipv6_prefix: config.xdp.ipv6_prefix,
            tenant_names: HashMap::new(),
            ladder: Ladder::from_rungs(state.map(|s| s.rungs).unwrap_or_default()),
            reporter,
            counters,
            paths: paths.clone(),
            dirty: true,
            saved_at: None,
            full_said: None,
            save_failed: false,
        };
        e.configure(config);
        if e.enabled {
            e.resume(maps);
        } else {
            e.clear(maps);
        }
        e.save();
        e
    }

    fn configure(&mut self, config: &Config) {
        let c = &config.escalation;
        self.enabled = c.enabled;
        self.churn_lifetime_ms = c.churn_lifetime_ms;
        self.settings = LadderSettings::from_config(c);
        let (rate, burst) = c.strict_limit(&config.xdp);
        self.strict = RateLimit::per_second(rate, burst);
        self.ipv6_prefix = config.xdp.ipv6_prefix;
        self.tenant_names = config
            .tenants
            .iter()
            .map(|t| (tenant_id(&t.name), t.name.clone()))
            .collect();
    }

    /// Applies a reloaded configuration: turning escalation off removes
    /// everything it put in the maps; a new strict budget applies to the
    /// sources already on it.
    pub fn reload(&mut self, config: &Config, maps: &mut GuardMaps) {
        let (was_enabled, was_strict) = (self.enabled, self.strict);
        self.configure(config);
        if was_enabled && !self.enabled {
            self.clear(maps);
        } else if self.enabled && self.strict != was_strict {
            let now = monotonic_ns();
            for r in self.ladder.rungs() {
                if r.strict(now) {
                    set_strict(maps, r.source, self.strict, r.strict_until_ns);
                }
            }
        }
        self.dirty = true;
    }

    /// Brings the maps in line with the resumed ladder: its strict entries
    /// with the budget in force, and no strict entry it does not know.
    fn resume(&mut self, maps: &mut GuardMaps) {
        let now = monotonic_ns();
        let (mut strict, mut denied) = (0, 0);
        for r in self.ladder.rungs() {
            if r.strict(now) {
                set_strict(maps, r.source, self.strict, r.strict_until_ns);
                strict += 1;
            }
            if r.denied(now) {
                denied += 1;
            }
        }
        match maps.strict_entries() {
            Ok(entries) => {
                for (source, _) in entries {
                    if !self.ladder.get(source).is_some_and(|r| r.strict(now)) {
                        remove_strict(maps, source);
                    }
                }
            }
            Err(e) => warn!("escalation: cannot read the strict map: {e:#}"),
        }
        if !self.ladder.is_empty() {
            info!(
                "escalation: resumed {} source{} from the previous run ({strict} on the strict \
                 SYN budget, {denied} of them denied)",
                self.ladder.len(),
                plural(self.ladder.len()),
            );
        }
        self.update_gauges(now);
    }

    /// Removes every strict entry and every deny entry escalation made,
    /// and forgets the ladder.
    fn clear(&mut self, maps: &mut GuardMaps) {
        let mut strict = 0;
        if let Ok(entries) = maps.strict_entries() {
            for (source, _) in entries {
                if remove_strict(maps, source) {
                    strict += 1;
                }
            }
        }
        let deny = deny_entries(maps);
        let mut denied = 0;
        for r in self.ladder.rungs() {
            let cidr = source_cidr(r.source, self.ipv6_prefix);
            if r.deny_entry_ns != 0 && deny.get(&cidr) == Some(&r.deny_entry_ns) {
                match maps.remove_cidr(CidrList::Deny, cidr) {
                    Ok(_) => denied += 1,
                    Err(e) => warn!("escalation: cannot remove {cidr} from the deny list: {e:#}"),
                }
            }
        }
        self.ladder = Ladder::default();
        self.dirty = true;
        if strict + denied > 0 {
            info!(
                "escalation is off: removed {strict} strict SYN budget{} and {denied} deny \
                 entr{} it had set",
                plural(strict),
                if denied == 1 { "y" } else { "ies" }
            );
        }
        self.update_gauges(monotonic_ns());
    }

    /// A source crossed a threshold in the proxy.
    pub fn strike(&mut self, strike: Strike, maps: &mut GuardMaps) {
        if !self.enabled {
            return;
        }
        let reason = strike.reason(self.churn_lifetime_ms);
        self.offence(strike.source, &reason, maps, monotonic_ns());
        if self.saved_at.is_none_or(|t| t.elapsed() >= SAVE_EVERY) {
            self.save();
        }
    }

    fn offence(&mut self, source: IpAddr, reason: &str, maps: &mut GuardMaps, now: u64) {
        let shield = self.shield(source, maps);
        let step = self
            .ladder
            .offence(&self.settings, source, reason, shield, now);
        let rate = format!("{}/s, burst {}", self.strict.rate(), self.strict.burst());
        match step {
            Step::Strict { until, repeat } => {
                set_strict(maps, source, self.strict, until);
                Counters::add(&self.counters.strict, 1);
                warn!(
                    "escalation: {source} on the strict SYN budget ({rate}) for {} ({} strict \
                     step): {reason}",
                    secs(until - now),
                    ordinal(repeat + 1),
                );
            }
            Step::Deny {
                until,
                strict_until,
                repeat,
            } => {
                let cidr = source_cidr(source, self.ipv6_prefix);
                if maps.covers(CidrList::Deny, source).unwrap_or(false) {
                    // Denied by an entry of the config or an operator:
                    // escalation adds none of its own.
                    if let Some(r) = self.ladder.get_mut(source) {
                        r.deny_entry_ns = 0;
                    }
                } else if let Err(e) = maps.add_cidr_until(CidrList::Deny, cidr, until) {
                    warn!("escalation: cannot add {cidr} to the deny list: {e:#}");
                }
                set_strict(maps, source, self.strict, strict_until);
                Counters::add(&self.counters.denied, 1);
                warn!(
                    "escalation: {source} denied for {}, then on the strict SYN budget ({rate}) \
                     for {} ({} deny): {reason}",
                    secs(until - now),
                    secs(strict_until - until),
                    ordinal(repeat + 1),
                );
            }
            Step::Held {
                until,
                sessions,
                tenant,
                ..
            } => {
                set_strict(maps, source, self.strict, until);
                Counters::add(&self.counters.held, 1);
                let name = self
                    .tenant_names
                    .get(&tenant)
                    .cloned()
                    .unwrap_or_else(|| format!("{tenant:#x}"));
                warn!(
                    "escalation: {source} held at the strict SYN budget ({rate}) for {} rather \
                     than denied: {sessions} live session{} authenticated as tenant {name} come \
                     from it, and an address a tenant's client is logged in from is never \
                     denied: {reason}",
                    secs(until - now),
                    plural(sessions as usize),
                );
            }
            Step::Spared { first } => {
                Counters::add(&self.counters.spared, 1);
                if first {
                    info!("escalation: {source} not escalated, the allow list covers it: {reason}");
                }
            }
            Step::AlreadyDenied | Step::Settling => {}
            Step::Full => {
                Counters::add(&self.counters.full, 1);
                if self
                    .full_said
                    .is_none_or(|t| t.elapsed() >= FULL_WARNING_EVERY)
                {
                    self.full_said = Some(Instant::now());
                    warn!(
                        "escalation: {} sources have steps in force, the most it holds; {source} \
                         is not escalated: {reason}",
                        self.settings.capacity
                    );
                }
            }
        }
        self.dirty = true;
        self.update_gauges(now);
    }

    /// What keeps `source` from being escalated in full.
    fn shield(&self, source: IpAddr, maps: &GuardMaps) -> Shield {
        if maps.covers(CidrList::Allow, source).unwrap_or(false) {
            return Shield::AllowListed;
        }
        match self.reporter.as_ref().and_then(|r| r.live_logins(source)) {
            Some(l) => Shield::LiveLogins {
                sessions: l.sessions,
                tenant: l.tenant,
            },
            None => Shield::None,
        }
    }

    /// Once a second: overruns of the strict budget, deny entries removed
    /// by hand, steps that ended, sources forgotten; then the state file.
    pub fn tick(&mut self, maps: &mut GuardMaps) {
        let now = monotonic_ns();
        if self.enabled && self.settings.overrun_secs > 0 {
            let watched: Vec<IpAddr> = self
                .ladder
                .rungs()
                .iter()
                .filter(|r| r.strict(now) && !r.denied(now))
                .map(|r| r.source)
                .collect();
            for source in watched {
                let Ok(Some(crossing)) = maps.last_crossing(source) else {
                    continue;
                };
                if self.ladder.overrun(&self.settings, source, crossing) {
                    let reason = Strike {
                        source,
                        signal: Signal::StrictOverrun,
                        count: self.settings.overrun_secs,
                        window_secs: 0,
                    }
                    .reason(self.churn_lifetime_ms);
                    self.offence(source, &reason, maps, now);
                }
            }
        }
        self.notice_hand_edits(maps, now);
        for change in self.ladder.expire(&self.settings, now) {
            self.dirty = true;
            match change {
                Change::DenyEnded {
                    source,
                    strict_until,
                    reason,
                } => {
                    Counters::add(&self.counters.deescalated, 1);
                    info!(
                        "de-escalation: {source}'s deny ended; on the strict SYN budget for {} \
                         more (escalated for: {reason})",
                        secs(strict_until.saturating_sub(now))
                    );
                }
                Change::StrictEnded { source, reason } => {
                    remove_strict(maps, source);
                    Counters::add(&self.counters.deescalated, 1);
                    info!(
                        "de-escalation: {source} back on the normal SYN budget (escalated for: \
                         {reason})"
                    );
                }
                Change::Forgotten { source, reason } => {
                    Counters::add(&self.counters.forgotten, 1);
                    info!(
                        "de-escalation: {source} forgotten after behaving; its next offence \
                         starts the ladder again (last escalated for: {reason})"
                    );
                }
            }
        }
        self.update_gauges(now);
        if self.dirty {
            self.save();
        }
    }

    /// A deny entry of escalation's that an operator removed (`guard deny
    /// del`) or replaced (`guard deny add`, the config) ends its deny: the
    /// ladder goes on from the probation that follows it.
    fn notice_hand_edits(&mut self, maps: &mut GuardMaps, now: u64) {
        let ours: Vec<(IpAddr, u64)> = self
            .ladder
            .rungs()
            .iter()
            .filter(|r| r.denied(now) && r.deny_entry_ns != 0)
            .map(|r| (r.source, r.deny_entry_ns))
            .collect();
        if ours.is_empty() {
            return;
        }
        let deny = deny_entries(maps);
        for (source, expires) in ours {
            let cidr = source_cidr(source, self.ipv6_prefix);
            if deny.get(&cidr) == Some(&expires) {
                continue;
            }
            self.ladder.end_deny(source, now);
            let until = self.ladder.get(source).map_or(now, |r| r.strict_until_ns);
            set_strict(maps, source, self.strict, until);
            self.dirty = true;
            info!(
                "de-escalation: {source}'s deny entry was removed or replaced by hand: its \
                 escalation deny ends; on the strict SYN budget for {}",
                secs(until.saturating_sub(now))
            );
        }
    }

    fn update_gauges(&self, now: u64) {
        let rungs = self.ladder.rungs();
        let strict = rungs
            .iter()
            .filter(|r| r.strict(now) && !r.denied(now))
            .count();
        let denied = rungs.iter().filter(|r| r.denied(now)).count();
        let set = |c: &std::sync::atomic::AtomicU64, v: usize| {
            c.store(v as u64, std::sync::atomic::Ordering::Relaxed);
        };
        set(&self.counters.sources_strict, strict);
        set(&self.counters.sources_denied, denied);
    }

    /// Writes the state file.
    pub fn save(&mut self) {
        let state = EscalationState {
            boot_id: boot_id(),
            updated_unix: crate::ebpf::unix_now(),
            now_ns: monotonic_ns(),
            enabled: self.enabled,
            strict_rate: self.strict.rate(),
            strict_burst: self.strict.burst(),
            ipv6_prefix: self.ipv6_prefix,
            rungs: self.ladder.rungs().into_iter().cloned().collect(),
            counters: self
                .counters
                .rows()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        };
        match crate::paths::write_state(&self.paths.escalation_file(), &state) {
            Ok(()) => {
                self.dirty = false;
                self.save_failed = false;
                self.saved_at = Some(Instant::now());
            }
            Err(e) => {
                if !self.save_failed {
                    warn!(
                        "escalation: cannot record the ladder (a restart would forget it): {e:#}"
                    );
                }
                self.save_failed = true;
            }
        }
    }
}

fn set_strict(maps: &mut GuardMaps, source: IpAddr, limit: RateLimit, until: u64) {
    if let Err(e) = maps.set_strict(source, limit, until) {
        warn!("escalation: cannot put {source} on the strict SYN budget: {e:#}");
    }
}

fn remove_strict(maps: &mut GuardMaps, source: IpAddr) -> bool {
    maps.remove_strict(source).unwrap_or_else(|e| {
        warn!("escalation: cannot take {source} off the strict SYN budget: {e:#}");
        false
    })
}

/// The deny list's entries and their expiries.
fn deny_entries(maps: &GuardMaps) -> HashMap<Cidr, u64> {
    match maps.list_cidrs(CidrList::Deny) {
        Ok(entries) => entries
            .into_iter()
            .map(|e| (e.cidr, e.expires_ns))
            .collect(),
        Err(e) => {
            warn!("escalation: cannot read the deny list: {e:#}");
            HashMap::new()
        }
    }
}

/// Nanoseconds as whole seconds, rounded up: "60 s".
fn secs(ns: u64) -> String {
    format!("{} s", ns.div_ceil(1_000_000_000))
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// 1 → "first", 2 → "second", 3 → "third", 4 → "4th".
pub fn ordinal(n: u32) -> String {
    match n {
        1 => "first".into(),
        2 => "second".into(),
        3 => "third".into(),
        n => format!("{n}th"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_words() {
        let strike = |signal, count| Strike {
            source: "10.0.0.1".parse().unwrap(),
            signal,
            count,
            window_secs: 10,
        };
        assert_eq!(
            strike(Signal::Churn, 100).reason(1_000),
            "connection churn: 100 connections closed within 1000 ms of opening in 10 s"
        );
        assert_eq!(
            strike(Signal::AuthFailure, 10).reason(0),
            "10 failed authentications in 10 s"
        );
        assert_eq!(
            strike(Signal::StrictOverrun, 3).reason(0),
            "kept opening connections over its strict SYN budget: SYNs dropped in 3 seconds \
             of its strict step"
        );
        assert_eq!(secs(1), "1 s");
        assert_eq!(secs(60_000_000_000), "60 s");
        assert_eq!(
            [1, 2, 3, 4, 11].map(ordinal),
            ["first", "second", "third", "4th", "11th"]
        );
        assert_eq!(
            source_cidr("2001:db8:1:2::7".parse().unwrap(), 64).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            source_cidr("10.1.2.3".parse().unwrap(), 64).to_string(),
            "10.1.2.3/32"
        );
    }

    #[test]
    fn the_state_file_tells_escalations_deny_entries_from_others() {
        let mut rung = Rung {
            deny_entry_ns: 42,
            ..serde_json::from_value::<Rung>(serde_json::json!({
                "source": "10.0.0.1", "strict_repeats": 1, "deny_repeats": 1,
                "strict_until_ns": 50, "strict_since_ns": 42, "deny_until_ns": 42,
                "deny_entry_ns": 0, "calm_since_ns": 50, "reason": "churn",
                "overruns": 0, "last_overrun_ns": 0, "spared": false
            }))
            .unwrap()
        };
        let state = EscalationState {
            ipv6_prefix: 64,
            rungs: vec![rung.clone()],
            ..Default::default()
        };
        let cidr: Cidr = "10.0.0.1/32".parse().unwrap();
        assert_eq!(state.deny_entry(cidr, 42), Some(&rung));
        assert_eq!(state.deny_entry(cidr, 43), None, "replaced by hand");
        assert_eq!(state.deny_entry("10.0.0.2/32".parse().unwrap(), 42), None);
        rung.deny_entry_ns = 0;
        let state = EscalationState {
            rungs: vec![rung],
            ..state
        };
        assert_eq!(state.deny_entry(cidr, 0), None, "never a permanent entry");
    }
}
