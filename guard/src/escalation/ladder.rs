//! The escalation ladder's timing, per source, on the monotonic clock the
//! XDP program reads (so an entry means the same to both, and to the next
//! daemon after a restart). Pure: every call takes the time, and the
//! caller ([`super::enforcer`]) applies what it returns to the maps.
//!
//! A source's first offence puts it on the strict SYN budget for
//! `strict_secs`. An offence while that step lasts denies it for
//! `deny_secs` — an offence counted at least a window after the step
//! began, so that connections the source made before the step took effect
//! (already accepted, still being served) cannot take it a second step up
//! — and a strict step of the same length as its last one
//! follows the deny (probation: an offence then denies it again). Each
//! repeat of a step doubles it, up to `max_strict_secs` and
//! `max_deny_secs`. Once no step is in force, every `forget_secs` without
//! an offence forgets one repeat of each step, and a source with nothing
//! left to remember is dropped: a source that behaves decays back to where
//! it started by itself.
//!
//! Sources are never denied by escalation alone when the allow list covers
//! them (nothing is done: their SYNs are not charged anyway) or while they
//! hold a live session authenticated with a tenant's credential: those are
//! held at the strict budget instead (its step renewed, and doubled on each
//! repeat), never denied, so a NAT gateway shared by good and bad clients
//! costs the good ones at most the strict budget.

use std::{collections::HashMap, net::IpAddr};

use serde::{Deserialize, Serialize};

const NS: u64 = 1_000_000_000;

/// The ladder's durations, in nanoseconds, and its bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LadderSettings {
    /// The first strict step.
    pub strict_ns: u64,
    /// The longest strict step.
    pub max_strict_ns: u64,
    /// The first deny.
    pub deny_ns: u64,
    /// The longest deny.
    pub max_deny_ns: u64,
    /// Calm time that forgets one repeat of each step.
    pub forget_ns: u64,
    /// How long after a step began an offence is still taken as the one
    /// that led to it (the signals' window).
    pub settle_ns: u64,
    /// Seconds with SYNs dropped by the strict budget that deny a source
    /// (0: never).
    pub overrun_secs: u32,
    /// Most sources remembered at once.
    pub capacity: usize,
}

impl LadderSettings {
    /// The settings of `config`.
    pub fn from_config(config: &crate::config::EscalationConfig) -> Self {
        Self {
            strict_ns: config.strict_secs.saturating_mul(NS),
            max_strict_ns: config.max_strict_secs.saturating_mul(NS),
            deny_ns: config.deny_secs.saturating_mul(NS),
            max_deny_ns: config.max_deny_secs.saturating_mul(NS),
            forget_ns: config.forget_secs.saturating_mul(NS),
            settle_ns: config.window_secs.saturating_mul(NS),
            overrun_secs: config.strict_overrun_secs,
            capacity: guard_common::STRICT_CAPACITY as usize,
        }
    }

    /// The `repeat`th strict step's length (0 is the first).
    pub fn strict_for(&self, repeat: u32) -> u64 {
        doubled(self.strict_ns, repeat, self.max_strict_ns)
    }

    /// The `repeat`th deny's length (0 is the first).
    pub fn deny_for(&self, repeat: u32) -> u64 {
        doubled(self.deny_ns, repeat, self.max_deny_ns)
    }
}

fn doubled(first: u64, repeat: u32, max: u64) -> u64 {
    first
        .saturating_mul(1u64.checked_shl(repeat.min(63)).unwrap_or(u64::MAX))
        .min(max)
}

/// What one source's ladder remembers: saved across restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rung {
    /// The source (IPv6 masked as XDP buckets it).
    pub source: IpAddr,
    /// Strict steps remembered: the next lasts `strict_for(strict_repeats)`.
    pub strict_repeats: u32,
    /// Denies remembered: the next lasts `deny_for(deny_repeats)`.
    pub deny_repeats: u32,
    /// When the strict step ends (monotonic ns); 0: none.
    pub strict_until_ns: u64,
    /// When the strict step began (after a deny: when the deny ended).
    pub strict_since_ns: u64,
    /// When the deny ends; 0: none.
    pub deny_until_ns: u64,
    /// The deny entry's expiry as written to the deny list (to tell it
    /// from one an operator put there since); 0: none.
    pub deny_entry_ns: u64,
    /// Decay counts from here: the end of the last step.
    pub calm_since_ns: u64,
    /// Why the last step was taken.
    pub reason: String,
    /// Seconds in this strict step whose SYNs the strict budget dropped.
    pub overruns: u32,
    /// The last such drop seen (monotonic ns).
    pub last_overrun_ns: u64,
    /// The allow list covered it at its last offence (logged once).
    pub spared: bool,
}

impl Rung {
    fn new(source: IpAddr) -> Self {
        Self {
            source,
            strict_repeats: 0,
            deny_repeats: 0,
            strict_until_ns: 0,
            strict_since_ns: 0,
            deny_until_ns: 0,
            deny_entry_ns: 0,
            calm_since_ns: 0,
            reason: String::new(),
            overruns: 0,
            last_overrun_ns: 0,
            spared: false,
        }
    }

    /// Whether it is denied at `now`.
    pub fn denied(&self, now: u64) -> bool {
        now < self.deny_until_ns
    }

    /// Whether it is on the strict budget at `now` (after a deny too).
    pub fn strict(&self, now: u64) -> bool {
        now < self.strict_until_ns
    }

    fn active(&self, now: u64) -> bool {
        self.denied(now) || self.strict(now)
    }

    /// Forgets one repeat of each step per `forget_ns` of calm.
    fn decay(&mut self, now: u64, forget_ns: u64) -> bool {
        if self.active(now) || forget_ns == 0 || (self.strict_repeats, self.deny_repeats) == (0, 0)
        {
            return false;
        }
        let periods = now.saturating_sub(self.calm_since_ns) / forget_ns;
        if periods == 0 {
            return false;
        }
        let n = u32::try_from(periods).unwrap_or(u32::MAX);
        self.strict_repeats = self.strict_repeats.saturating_sub(n);
        self.deny_repeats = self.deny_repeats.saturating_sub(n);
        self.calm_since_ns = self.calm_since_ns.saturating_add(periods * forget_ns);
        true
    }

    fn forgotten(&self, now: u64, forget_ns: u64) -> bool {
        // A spared source is remembered for a calm period, so that it is
        // logged once rather than at every offence.
        !self.active(now)
            && self.strict_repeats == 0
            && self.deny_repeats == 0
            && !(self.spared && now < self.calm_since_ns.saturating_add(forget_ns))
    }
}

/// Why a source is not escalated as far as its offence would take it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Shield {
    /// Nothing: the ladder applies in full.
    None,
    /// The allow list covers it: nothing is done.
    AllowListed,
    /// It has live sessions authenticated with a tenant's credential: the
    /// strict budget at most.
    LiveLogins {
        /// How many.
        sessions: u32,
        /// The tenant of the latest.
        tenant: u32,
    },
}

/// What an offence did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Put on the strict budget until `until` (its `repeat`th strict step,
    /// 0 the first).
    Strict { until: u64, repeat: u32 },
    /// Denied until `until`, then on the strict budget until
    /// `strict_until` (its `repeat`th deny).
    Deny {
        until: u64,
        strict_until: u64,
        repeat: u32,
    },
    /// Would have been denied, but its live authenticated sessions hold it
    /// at the strict budget, renewed until `until`.
    Held {
        until: u64,
        repeat: u32,
        sessions: u32,
        tenant: u32,
    },
    /// Allow-listed: nothing done (`first`: the first time since it was
    /// last forgotten, which is logged).
    Spared { first: bool },
    /// Already denied: nothing more to do.
    AlreadyDenied,
    /// Within a window of its last step's start: counted before that step
    /// could take effect, so nothing more is done.
    Settling,
    /// The ladder is full of sources with steps in force.
    Full,
}

/// A step ending by itself, or a source forgotten; `reason` is why it
/// was last escalated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Its deny ended; it stays on the strict budget until `strict_until`.
    DenyEnded {
        source: IpAddr,
        strict_until: u64,
        reason: String,
    },
    /// Its strict step ended: back to the normal budget.
    StrictEnded { source: IpAddr, reason: String },
    /// Nothing left to remember about it.
    Forgotten { source: IpAddr, reason: String },
}

/// Every escalated source's rung, bounded.
#[derive(Clone, Debug, Default)]
pub struct Ladder {
    rungs: HashMap<IpAddr, Rung>,
}

impl Ladder {
    /// A ladder resuming from saved rungs.
    pub fn from_rungs(rungs: impl IntoIterator<Item = Rung>) -> Self {
        Self {
            rungs: rungs.into_iter().map(|r| (r.source, r)).collect(),
        }
    }

    /// Every rung, in address order.
    pub fn rungs(&self) -> Vec<&Rung> {
        let mut v: Vec<&Rung> = self.rungs.values().collect();
        v.sort_by_key(|r| r.source);
        v
    }

    /// A source's rung.
    pub fn get(&self, source: IpAddr) -> Option<&Rung> {
        self.rungs.get(&source)
    }

    /// A source's rung, to change.
    pub fn get_mut(&mut self, source: IpAddr) -> Option<&mut Rung> {
        self.rungs.get_mut(&source)
    }

    /// How many sources it remembers.
    pub fn len(&self) -> usize {
        self.rungs.len()
    }

    /// Whether it remembers nobody.
    pub fn is_empty(&self) -> bool {
        self.rungs.is_empty()
    }

    /// Removes a source.
    pub fn remove(&mut self, source: IpAddr) -> Option<Rung> {
        self.rungs.remove(&source)
    }

    /// An offence by `source` at `now`, for `reason`: takes it one step up
    /// as far as `shield` lets it, and returns what that step is.
    pub fn offence(
        &mut self,
        s: &LadderSettings,
        source: IpAddr,
        reason: &str,
        shield: Shield,
        now: u64,
    ) -> Step {
        if !self.rungs.contains_key(&source) {
            if self.rungs.len() >= s.capacity && !self.make_room(now) {
                return Step::Full;
            }
            self.rungs.insert(source, Rung::new(source));
        }
        let r = self.rungs.get_mut(&source).expect("inserted above");
        r.decay(now, s.forget_ns);
        if r.denied(now) {
            return Step::AlreadyDenied;
        }
        if shield == Shield::AllowListed {
            let first = !r.spared;
            r.spared = true;
            r.calm_since_ns = now;
            r.reason = reason.to_string();
            return Step::Spared { first };
        }
        r.spared = false;
        if r.strict(now) && now < r.strict_since_ns.saturating_add(s.settle_ns) {
            return Step::Settling;
        }
        r.reason = reason.to_string();
        r.overruns = 0;
        if !r.strict(now) {
            let repeat = r.strict_repeats;
            let until = now.saturating_add(s.strict_for(repeat));
            r.strict_repeats = repeat.saturating_add(1);
            r.strict_until_ns = until;
            r.strict_since_ns = now;
            r.calm_since_ns = until;
            return Step::Strict { until, repeat };
        }
        if let Shield::LiveLogins { sessions, tenant } = shield {
            let repeat = r.strict_repeats;
            let until = now.saturating_add(s.strict_for(repeat));
            r.strict_repeats = repeat.saturating_add(1);
            r.strict_until_ns = r.strict_until_ns.max(until);
            r.strict_since_ns = now;
            r.calm_since_ns = r.strict_until_ns;
            return Step::Held {
                until: r.strict_until_ns,
                repeat,
                sessions,
                tenant,
            };
        }
        let repeat = r.deny_repeats;
        let until = now.saturating_add(s.deny_for(repeat));
        // Probation after the deny: as long as its last strict step.
        let strict_until = until.saturating_add(s.strict_for(r.strict_repeats.saturating_sub(1)));
        r.deny_repeats = repeat.saturating_add(1);
        r.deny_until_ns = until;
        r.deny_entry_ns = until;
        r.strict_until_ns = strict_until;
        r.strict_since_ns = until;
        r.calm_since_ns = strict_until;
        Step::Deny {
            until,
            strict_until,
            repeat,
        }
    }

    /// A second in which the strict budget dropped SYNs of `source`
    /// (`crossing_ns`, as the program recorded it): returns `true` when
    /// that makes `overrun_secs` of them in its strict step, which is an
    /// offence for the caller to take to [`Self::offence`].
    pub fn overrun(&mut self, s: &LadderSettings, source: IpAddr, crossing_ns: u64) -> bool {
        let Some(r) = self.rungs.get_mut(&source) else {
            return false;
        };
        if s.overrun_secs == 0
            || r.denied(crossing_ns)
            || !r.strict(crossing_ns)
            || crossing_ns <= r.strict_since_ns
            || crossing_ns <= r.last_overrun_ns
        {
            return false;
        }
        r.last_overrun_ns = crossing_ns;
        r.overruns += 1;
        r.overruns >= s.overrun_secs
    }

    /// Steps that ended by `now` and sources forgotten, each once.
    pub fn expire(&mut self, s: &LadderSettings, now: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        for r in self.rungs.values_mut() {
            if r.deny_until_ns != 0 && !r.denied(now) {
                r.deny_until_ns = 0;
                r.deny_entry_ns = 0;
                r.overruns = 0;
                if r.strict(now) {
                    changes.push(Change::DenyEnded {
                        source: r.source,
                        strict_until: r.strict_until_ns,
                        reason: r.reason.clone(),
                    });
                }
            }
            if r.strict_until_ns != 0 && !r.strict(now) {
                r.calm_since_ns = r.strict_until_ns;
                r.strict_until_ns = 0;
                r.overruns = 0;
                changes.push(Change::StrictEnded {
                    source: r.source,
                    reason: r.reason.clone(),
                });
            }
            r.decay(now, s.forget_ns);
        }
        let gone: Vec<IpAddr> = self
            .rungs
            .values()
            .filter(|r| r.forgotten(now, s.forget_ns))
            .map(|r| r.source)
            .collect();
        for source in gone {
            let r = self.rungs.remove(&source).expect("listed above");
            // Sources spared or remembered only briefly leave quietly.
            if !r.spared {
                changes.push(Change::Forgotten {
                    source,
                    reason: r.reason,
                });
            }
        }
        changes
    }

    /// Ends a deny early (its entry was removed or replaced by hand): the
    /// probation that follows it starts now.
    pub fn end_deny(&mut self, source: IpAddr, now: u64) {
        if let Some(r) = self.rungs.get_mut(&source) {
            let probation = r.strict_until_ns.saturating_sub(r.deny_until_ns);
            r.deny_until_ns = 0;
            r.deny_entry_ns = 0;
            r.strict_since_ns = now;
            r.strict_until_ns = now.saturating_add(probation);
            r.calm_since_ns = r.strict_until_ns;
        }
    }

    /// Frees one place by forgetting the least remembered source with no
    /// step in force; `false` if every source has one.
    fn make_room(&mut self, now: u64) -> bool {
        let victim = self
            .rungs
            .values()
            .filter(|r| !r.active(now))
            .min_by_key(|r| {
                (
                    r.strict_repeats.saturating_add(r.deny_repeats),
                    r.calm_since_ns,
                )
            })
            .map(|r| r.source);
        match victim {
            Some(v) => {
                self.rungs.remove(&v);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const S: u64 = NS;

    fn settings() -> LadderSettings {
        LadderSettings {
            strict_ns: 60 * S,
            max_strict_ns: 600 * S,
            deny_ns: 300 * S,
            max_deny_ns: 1_000 * S,
            forget_ns: 600 * S,
            settle_ns: 0,
            overrun_secs: 3,
            capacity: 4,
        }
    }

    fn ip(i: u8) -> IpAddr {
        Ipv4Addr::new(10, 0, 0, i).into()
    }

    const T0: u64 = 1_000 * S;

    #[test]
    fn strict_first_then_deny_then_probation_then_nothing() {
        let s = settings();
        let mut l = Ladder::default();
        let a = ip(1);
        assert_eq!(
            l.offence(&s, a, "churn", Shield::None, T0),
            Step::Strict {
                until: T0 + 60 * S,
                repeat: 0
            }
        );
        // An offence within the strict step: denied, then probation as
        // long as the strict step.
        let t = T0 + 10 * S;
        assert_eq!(
            l.offence(&s, a, "churn", Shield::None, t),
            Step::Deny {
                until: t + 300 * S,
                strict_until: t + 360 * S,
                repeat: 0
            }
        );
        assert_eq!(
            l.offence(&s, a, "auth", Shield::None, t + S),
            Step::AlreadyDenied
        );
        assert!(l.expire(&s, t + 299 * S).is_empty());
        assert_eq!(
            l.expire(&s, t + 300 * S),
            [Change::DenyEnded {
                source: a,
                strict_until: t + 360 * S,
                reason: "churn".into()
            }]
        );
        assert!(l.expire(&s, t + 301 * S).is_empty(), "each change once");
        assert_eq!(
            l.expire(&s, t + 360 * S),
            [Change::StrictEnded {
                source: a,
                reason: "churn".into()
            }]
        );
        // Remembered, then forgotten after one calm period per repeat.
        assert!(l.expire(&s, t + 360 * S + 599 * S).is_empty());
        assert_eq!(
            l.expire(&s, t + 360 * S + 600 * S),
            [Change::Forgotten {
                source: a,
                reason: "churn".into()
            }]
        );
        assert!(l.is_empty());
    }

    #[test]
    fn each_step_doubles_on_repeat_up_to_its_cap() {
        let s = settings();
        let mut l = Ladder::default();
        let a = ip(1);
        let mut t = T0;
        let mut strict = Vec::new();
        let mut deny = Vec::new();
        for _ in 0..5 {
            // Offend, wait out the strict step (it ends by itself), offend
            // again right away: each strict step is a repeat.
            match l.offence(&s, a, "x", Shield::None, t) {
                Step::Strict { until, .. } => {
                    strict.push((until - t) / S);
                    t = until;
                }
                Step::Deny { strict_until, .. } => {
                    t = strict_until;
                }
                other => panic!("{other:?}"),
            }
            l.expire(&s, t);
        }
        assert_eq!(strict, [60, 120, 240, 480, 600], "doubled, capped");
        let mut l = Ladder::default();
        let mut t = T0;
        for _ in 0..4 {
            let Step::Strict { .. } = l.offence(&s, a, "x", Shield::None, t) else {
                panic!("strict first");
            };
            // An offence on probation denies again, longer each time.
            loop {
                t += S;
                match l.offence(&s, a, "x", Shield::None, t) {
                    Step::Deny {
                        until,
                        strict_until,
                        ..
                    } => {
                        deny.push((until - t) / S);
                        // Offend during the probation that follows.
                        t = until;
                        l.expire(&s, t);
                        assert!(l.get(a).unwrap().strict(t));
                        t = strict_until;
                        l.expire(&s, t);
                        break;
                    }
                    Step::AlreadyDenied => {}
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(deny, [300, 600, 1_000, 1_000], "doubled, capped");
    }

    #[test]
    fn an_offence_on_probation_denies_again_at_once() {
        let s = settings();
        let mut l = Ladder::default();
        let a = ip(1);
        l.offence(&s, a, "x", Shield::None, T0);
        let Step::Deny { until, .. } = l.offence(&s, a, "x", Shield::None, T0 + S) else {
            panic!("deny")
        };
        l.expire(&s, until);
        assert_eq!(
            l.offence(&s, a, "x", Shield::None, until + S),
            Step::Deny {
                until: until + S + 600 * S,
                strict_until: until + S + 660 * S,
                repeat: 1
            }
        );
    }

    #[test]
    fn good_behaviour_decays_the_ladder_back_to_its_start() {
        let s = settings();
        let mut l = Ladder::default();
        let a = ip(1);
        // Two strict steps and a deny remembered.
        l.offence(&s, a, "x", Shield::None, T0);
        let Step::Deny { strict_until, .. } = l.offence(&s, a, "x", Shield::None, T0 + S) else {
            panic!("deny")
        };
        l.expire(&s, strict_until);
        let r = l.get(a).unwrap();
        assert_eq!((r.strict_repeats, r.deny_repeats), (1, 1));
        // One calm period later: one repeat of each forgotten, and the
        // source is forgotten, so the next offence starts from the bottom.
        let later = strict_until + 600 * S;
        assert_eq!(
            l.expire(&s, later),
            [Change::Forgotten {
                source: a,
                reason: "x".into()
            }]
        );
        assert_eq!(
            l.offence(&s, a, "x", Shield::None, later),
            Step::Strict {
                until: later + 60 * S,
                repeat: 0
            }
        );
        // Three strict steps remembered take three calm periods.
        let mut l = Ladder::default();
        let mut t = T0;
        for _ in 0..3 {
            let Step::Strict { until, .. } = l.offence(&s, a, "x", Shield::None, t) else {
                panic!()
            };
            t = until;
            l.expire(&s, t);
        }
        assert_eq!(l.get(a).unwrap().strict_repeats, 3);
        l.expire(&s, t + 1_200 * S);
        assert_eq!(l.get(a).unwrap().strict_repeats, 1);
        // Half-way through a period nothing more is forgotten; an offence
        // then lasts as a second strict step does.
        let t2 = t + 1_500 * S;
        assert_eq!(
            l.offence(&s, a, "x", Shield::None, t2),
            Step::Strict {
                until: t2 + 120 * S,
                repeat: 1
            }
        );
    }

    #[test]
    fn live_logins_hold_a_source_at_the_strict_budget() {
        let s = settings();
        let mut l = Ladder::default();
        let nat = ip(1);
        let logins = Shield::LiveLogins {
            sessions: 3,
            tenant: 7,
        };
        assert!(matches!(
            l.offence(&s, nat, "auth", logins, T0),
            Step::Strict { .. }
        ));
        // Never denied while its logins last; each hold renews the step,
        // doubled.
        assert_eq!(
            l.offence(&s, nat, "auth", logins, T0 + S),
            Step::Held {
                until: T0 + S + 120 * S,
                repeat: 1,
                sessions: 3,
                tenant: 7
            }
        );
        assert!(matches!(
            l.offence(&s, nat, "auth", logins, T0 + 2 * S),
            Step::Held { repeat: 2, .. }
        ));
        assert!(!l.get(nat).unwrap().denied(T0 + 2 * S));
        // Its logins gone, the next offence denies it.
        assert!(matches!(
            l.offence(&s, nat, "auth", Shield::None, T0 + 3 * S),
            Step::Deny { .. }
        ));
    }

    #[test]
    fn allow_listed_sources_are_spared_and_logged_once() {
        let s = settings();
        let mut l = Ladder::default();
        let a = ip(1);
        assert_eq!(
            l.offence(&s, a, "x", Shield::AllowListed, T0),
            Step::Spared { first: true }
        );
        assert_eq!(
            l.offence(&s, a, "x", Shield::AllowListed, T0 + S),
            Step::Spared { first: false }
        );
        let r = l.get(a).unwrap();
        assert!(!r.strict(T0 + S) && !r.denied(T0 + S));
        // Remembered for a calm period, then left quietly.
        assert!(l.expire(&s, T0 + 2 * S).is_empty());
        assert_eq!(l.len(), 1);
        assert!(l.expire(&s, T0 + S + 600 * S).is_empty());
        assert!(l.is_empty());
    }

    #[test]
    fn overruns_in_the_strict_step_count_once_a_second() {
        let s = settings();
        let mut l = Ladder::default();
        let a = ip(1);
        // Crossings before the step or of unknown sources do not count.
        assert!(!l.overrun(&s, a, T0));
        l.offence(&s, a, "x", Shield::None, T0);
        assert!(!l.overrun(&s, a, T0 - S), "before the step");
        assert!(!l.overrun(&s, a, T0 + S));
        assert!(!l.overrun(&s, a, T0 + S), "the same crossing seen twice");
        assert!(!l.overrun(&s, a, T0 + 2 * S));
        assert!(l.overrun(&s, a, T0 + 3 * S), "the third second");
        // The offence that follows starts the count again.
        let Step::Deny { until, .. } = l.offence(&s, a, "overrun", Shield::None, T0 + 3 * S) else {
            panic!("deny")
        };
        assert_eq!(l.get(a).unwrap().overruns, 0);
        assert!(
            !l.overrun(&s, a, T0 + 4 * S),
            "denied: not the strict budget"
        );
        l.expire(&s, until);
        // On probation, only crossings after the deny count.
        assert!(!l.overrun(&s, a, until - S));
        assert!(!l.overrun(&s, a, until + S));
        // Off: never.
        let off = LadderSettings {
            overrun_secs: 0,
            ..settings()
        };
        assert!(!l.overrun(&off, a, until + 2 * S));
    }

    #[test]
    fn the_ladder_is_bounded_and_forgets_the_calm_first() {
        let s = settings();
        let mut l = Ladder::default();
        // Four sources on the strict budget fill it.
        for i in 0..4 {
            assert!(matches!(
                l.offence(&s, ip(i), "x", Shield::None, T0),
                Step::Strict { .. }
            ));
        }
        assert_eq!(l.offence(&s, ip(9), "x", Shield::None, T0), Step::Full);
        // Once one step has ended, its source makes room.
        l.get_mut(ip(2)).unwrap().strict_until_ns = T0;
        assert!(matches!(
            l.offence(&s, ip(9), "x", Shield::None, T0 + S),
            Step::Strict { .. }
        ));
        assert_eq!(l.len(), 4);
        assert!(l.get(ip(2)).is_none());
    }

    #[test]
    fn a_deny_ended_by_hand_starts_its_probation() {
        let s = settings();
        let mut l = Ladder::default();
        let a = ip(1);
        l.offence(&s, a, "x", Shield::None, T0);
        l.offence(&s, a, "x", Shield::None, T0 + S);
        l.end_deny(a, T0 + 2 * S);
        let r = l.get(a).unwrap();
        assert!(!r.denied(T0 + 2 * S));
        assert_eq!(r.strict_until_ns, T0 + 2 * S + 60 * S);
    }

    #[test]
    fn an_offence_within_a_window_of_its_step_takes_it_no_further() {
        let s = LadderSettings {
            settle_ns: 10 * S,
            ..settings()
        };
        let mut l = Ladder::default();
        let a = ip(1);
        l.offence(&s, a, "churn", Shield::None, T0);
        // Connections made before the strict budget applied, counted just
        // after: the step stands.
        assert_eq!(
            l.offence(&s, a, "churn", Shield::None, T0 + 9 * S),
            Step::Settling
        );
        assert_eq!(l.get(a).unwrap().reason, "churn");
        assert!(matches!(
            l.offence(&s, a, "churn", Shield::None, T0 + 10 * S),
            Step::Deny { .. }
        ));
        // After a deny the probation starts when it ends: an offence a
        // moment into it is settling too.
        let until = l.get(a).unwrap().deny_until_ns;
        l.expire(&s, until);
        assert_eq!(
            l.offence(&s, a, "churn", Shield::None, until + S),
            Step::Settling
        );
        assert!(matches!(
            l.offence(&s, a, "churn", Shield::None, until + 10 * S),
            Step::Deny { repeat: 1, .. }
        ));
    }

    #[test]
    fn durations_never_overflow() {
        let s = settings();
        assert_eq!(s.strict_for(u32::MAX), 600 * S);
        assert_eq!(s.deny_for(64), 1_000 * S);
        assert_eq!(doubled(u64::MAX, 3, u64::MAX), u64::MAX);
    }
}
