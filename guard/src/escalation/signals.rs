//! Misbehaviour counted per source by the proxy, in memory fixed at start
//! whatever the number of sources, and reported to the daemon's ladder
//! when a source crosses a threshold.
//!
//! [`SignalTable`] is a set-associative table: a source hashes (with a
//! key drawn at start, so nobody can aim at one set) to a set of
//! [`WAYS`] slots, and a source not in its set takes an empty slot, else
//! one whose window expired, else the slot of the lightest source (fewest
//! events in its window), the newest among equals. A source already
//! counted therefore keeps its slot against newcomers: a flood of new
//! addresses churns through the newest light slot of each set instead of
//! pushing out the sources being counted. Counts never overstate what a
//! source did:
//! a newcomer starts from zero, it never inherits the count of the source
//! it replaced, so an innocent address is never escalated for another's
//! events; under pressure a light source may be forgotten instead.
//!
//! [`Reporter`] is what the proxy holds: the table, the settings in force
//! (replaced on reload), the channel to the daemon (best effort: a full
//! channel drops the report, never blocks a session), and the sources with
//! live authenticated sessions, which the ladder never denies.

use std::{
    collections::HashMap,
    hash::BuildHasher as _,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use super::{Counters, Signal, Strike};
use crate::config::Config;

/// Slots per set.
pub const WAYS: usize = 4;

/// The signals a [`SignalTable`] counts (the ladder's own, strict-budget
/// overruns, are counted from the XDP maps).
pub const COUNTED: usize = 5;

/// What the table needs from the configuration; replaced on reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalSettings {
    /// Whether anything is counted.
    pub enabled: bool,
    /// The window each threshold is counted in.
    pub window: Duration,
    /// Threshold per counted [`Signal`] (by its index); 0 is off.
    pub thresholds: [u16; COUNTED],
    /// A connection its client closes younger than this is churn.
    pub churn_lifetime: Duration,
    /// IPv6 sources are counted by this prefix, as XDP buckets them.
    pub ipv6_prefix: u8,
}

impl SignalSettings {
    /// The settings `config` stands for.
    pub fn from_config(config: &Config) -> Self {
        let e = &config.escalation;
        // Validation bounds every threshold to 16 bits.
        let t = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        Self {
            enabled: e.enabled,
            window: Duration::from_secs(e.window_secs),
            thresholds: [
                t(e.churn_connections),
                t(e.auth_failures),
                t(e.protocol_errors),
                t(e.refused_connections),
                t(e.silent_connections),
            ],
            churn_lifetime: Duration::from_millis(e.churn_lifetime_ms),
            ipv6_prefix: config.xdp.ipv6_prefix,
        }
    }
}

/// One source's counts in its current window.
#[derive(Copy, Clone, Debug, Default)]
struct Slot {
    source: Option<IpAddr>,
    /// Milliseconds since the table's epoch at which the window began.
    window_start_ms: u64,
    counts: [u16; COUNTED],
}

impl Slot {
    fn weight(&self) -> u32 {
        self.counts.iter().map(|&c| u32::from(c)).sum()
    }
}

/// Per-source signal counts in fixed memory (see the module docs).
pub struct SignalTable {
    sets: Box<[Mutex<[Slot; WAYS]>]>,
    hasher: std::collections::hash_map::RandomState,
    epoch: Instant,
}

impl SignalTable {
    /// A table holding at least `capacity` sources (rounded up to whole
    /// sets).
    pub fn new(capacity: usize) -> Self {
        let sets = capacity.div_ceil(WAYS).max(1);
        Self {
            sets: (0..sets)
                .map(|_| Mutex::new([Slot::default(); WAYS]))
                .collect(),
            hasher: Default::default(),
            epoch: Instant::now(),
        }
    }

    /// How many sources the table holds at most.
    pub fn capacity(&self) -> usize {
        self.sets.len() * WAYS
    }

    /// How many sources it holds now.
    pub fn len(&self) -> usize {
        self.sets
            .iter()
            .map(|s| {
                s.lock()
                    .expect("signal set")
                    .iter()
                    .filter(|slot| slot.source.is_some())
                    .count()
            })
            .sum()
    }

    /// Whether it holds no source.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The time `record_at` takes for now.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Counts one `signal` from `source` at `now` (time since the table
    /// began). Returns the count when it reaches the signal's threshold
    /// within the window; the count then starts again from zero, so a
    /// source that goes on crosses again after another threshold's worth.
    pub fn record_at(
        &self,
        source: IpAddr,
        signal: Signal,
        now: Duration,
        settings: &SignalSettings,
    ) -> Option<u32> {
        let kind = signal as usize;
        let threshold = *settings.thresholds.get(kind)?;
        if threshold == 0 {
            return None;
        }
        let now_ms = now.as_millis() as u64;
        let window_ms = settings.window.as_millis() as u64;
        let set = &self.sets[(self.hasher.hash_one(source) % self.sets.len() as u64) as usize];
        let mut set = set.lock().expect("signal set");
        let expired = |s: &Slot| now_ms.saturating_sub(s.window_start_ms) >= window_ms;
        let i = match set.iter().position(|s| s.source == Some(source)) {
            Some(i) => i,
            None => {
                // Empty first, then expired windows, then the lightest,
                // the newest among equals.
                let i = set
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| {
                        (
                            s.source.is_some(),
                            !expired(s),
                            s.weight(),
                            std::cmp::Reverse(s.window_start_ms),
                        )
                    })
                    .map_or(0, |(i, _)| i);
                set[i] = Slot {
                    source: Some(source),
                    window_start_ms: now_ms,
                    counts: [0; COUNTED],
                };
                i
            }
        };
        let slot = &mut set[i];
        if expired(slot) {
            slot.window_start_ms = now_ms;
            slot.counts = [0; COUNTED];
        }
        let count = &mut slot.counts[kind];
        *count = count.saturating_add(1);
        if *count < threshold {
            return None;
        }
        let reached = u32::from(*count);
        *count = 0;
        Some(reached)
    }
}

/// Live sessions authenticated with a tenant's credential, from one source.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LiveLogins {
    /// How many.
    pub sessions: u32,
    /// The tenant of the latest.
    pub tenant: u32,
}

/// The proxy's end of the ladder: counts signals, reports crossings, and
/// knows which sources have live authenticated sessions.
pub struct Reporter {
    table: SignalTable,
    settings: ArcSwap<SignalSettings>,
    strikes: mpsc::Sender<Strike>,
    /// Bounded by the live sessions, which `max_connections` bounds.
    logins: Mutex<HashMap<IpAddr, LiveLogins>>,
    counters: Arc<Counters>,
}

impl Reporter {
    /// A reporter sending crossings to `strikes`, counting into `counters`.
    pub fn new(config: &Config, strikes: mpsc::Sender<Strike>, counters: Arc<Counters>) -> Self {
        Self {
            table: SignalTable::new(config.escalation.tracked_sources),
            settings: ArcSwap::from_pointee(SignalSettings::from_config(config)),
            strikes,
            logins: Mutex::default(),
            counters,
        }
    }

    /// Applies a reloaded configuration (thresholds, window, on/off); the
    /// table keeps its counts and its size.
    pub fn reload(&self, config: &Config) {
        self.settings
            .store(Arc::new(SignalSettings::from_config(config)));
    }

    /// What the ladder counted, for the proxy's `stats`.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// How young a connection closed by its client must be to be churn.
    pub fn churn_lifetime(&self) -> Duration {
        self.settings.load().churn_lifetime
    }

    /// Counts one `signal` from `source`, and reports the source to the
    /// ladder if that makes it cross the signal's threshold.
    pub fn record(&self, source: IpAddr, signal: Signal) {
        let settings = self.settings.load();
        if !settings.enabled {
            return;
        }
        let source = crate::cidr::mask(source.to_canonical(), v6_prefix(source, &settings));
        let Some(count) = self
            .table
            .record_at(source, signal, self.table.now(), &settings)
        else {
            return;
        };
        let strike = Strike {
            source,
            signal,
            count,
            window_secs: settings.window.as_secs(),
        };
        if self.strikes.try_send(strike).is_ok() {
            Counters::add(&self.counters.signals_reported, 1);
        } else {
            Counters::add(&self.counters.signals_dropped, 1);
        }
    }

    /// Records a session from `source` authenticated as `tenant`, until
    /// the returned guard is dropped (when the session ends).
    pub fn logged_in(self: &Arc<Self>, source: IpAddr, tenant: u32) -> LoginGuard {
        let source = self.key(source);
        let mut logins = self.logins.lock().expect("logins");
        let live = logins.entry(source).or_insert(LiveLogins {
            sessions: 0,
            tenant,
        });
        live.sessions += 1;
        live.tenant = tenant;
        LoginGuard {
            reporter: self.clone(),
            source,
        }
    }

    /// The live authenticated sessions from `source` (masked as XDP
    /// buckets it), if any.
    pub fn live_logins(&self, source: IpAddr) -> Option<LiveLogins> {
        let source = self.key(source);
        self.logins.lock().expect("logins").get(&source).copied()
    }

    fn key(&self, source: IpAddr) -> IpAddr {
        let settings = self.settings.load();
        crate::cidr::mask(source.to_canonical(), v6_prefix(source, &settings))
    }
}

fn v6_prefix(source: IpAddr, settings: &SignalSettings) -> u8 {
    match source.to_canonical() {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => settings.ipv6_prefix,
    }
}

/// A live authenticated session; see [`Reporter::logged_in`].
pub struct LoginGuard {
    reporter: Arc<Reporter>,
    source: IpAddr,
}

impl Drop for LoginGuard {
    fn drop(&mut self) {
        let mut logins = self.reporter.logins.lock().expect("logins");
        if let Some(live) = logins.get_mut(&self.source) {
            live.sessions -= 1;
            if live.sessions == 0 {
                logins.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn settings() -> SignalSettings {
        SignalSettings {
            enabled: true,
            window: Duration::from_secs(10),
            thresholds: [5, 3, 0, 2, 2],
            churn_lifetime: Duration::from_secs(1),
            ipv6_prefix: 64,
        }
    }

    fn v4(i: u32) -> IpAddr {
        Ipv4Addr::from(0x0a00_0000 | i).into()
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_threshold_is_reached_within_the_window_then_counted_again() {
        let t = SignalTable::new(64);
        let s = settings();
        for i in 0..4 {
            assert_eq!(t.record_at(v4(1), Signal::Churn, secs(i as f64), &s), None);
        }
        assert_eq!(t.record_at(v4(1), Signal::Churn, secs(4.0), &s), Some(5));
        // Counted again from zero: four more are not enough.
        for _ in 0..4 {
            assert_eq!(t.record_at(v4(1), Signal::Churn, secs(5.0), &s), None);
        }
        assert_eq!(t.record_at(v4(1), Signal::Churn, secs(5.0), &s), Some(5));
        // Signals are counted apart.
        assert_eq!(t.record_at(v4(1), Signal::AuthFailure, secs(5.0), &s), None);
        assert_eq!(t.record_at(v4(1), Signal::AuthFailure, secs(5.0), &s), None);
        assert_eq!(
            t.record_at(v4(1), Signal::AuthFailure, secs(5.0), &s),
            Some(3)
        );
        // A threshold of zero turns the signal off.
        for _ in 0..100 {
            assert_eq!(
                t.record_at(v4(1), Signal::ProtocolError, secs(6.0), &s),
                None
            );
        }
        // Sources are counted apart.
        assert_eq!(t.record_at(v4(2), Signal::Refused, secs(6.0), &s), None);
        assert_eq!(t.record_at(v4(3), Signal::Refused, secs(6.0), &s), None);
        assert_eq!(t.record_at(v4(2), Signal::Refused, secs(6.0), &s), Some(2));
    }

    #[test]
    fn events_spread_wider_than_the_window_never_cross() {
        let t = SignalTable::new(64);
        let s = settings();
        // Four events per window, for a minute: under the threshold of 5.
        for i in 0..24 {
            let at = secs(f64::from(i) * 2.5);
            assert_eq!(t.record_at(v4(1), Signal::Churn, at, &s), None, "event {i}");
        }
        // The same rate squeezed into one window crosses.
        let t = SignalTable::new(64);
        let crossed = (0..24)
            .filter_map(|i| t.record_at(v4(1), Signal::Churn, secs(f64::from(i) * 0.4), &s))
            .count();
        assert_eq!(crossed, 4);
    }

    #[test]
    fn memory_is_bounded_whatever_the_number_of_sources() {
        let t = SignalTable::new(1_000);
        assert_eq!(t.capacity(), 1_000);
        let s = settings();
        for i in 0..200_000 {
            t.record_at(v4(i), Signal::Churn, secs(0.0), &s);
        }
        assert_eq!(t.len(), t.capacity());
        assert_eq!(std::mem::size_of::<Slot>(), 40, "about 40 bytes a source");
    }

    #[test]
    fn a_heavy_source_survives_a_flood_of_new_ones_and_nobody_inherits_its_count() {
        let t = SignalTable::new(1_024);
        let s = SignalSettings {
            thresholds: [50, 0, 0, 0, 0],
            ..settings()
        };
        let heavy = v4(0xffff);
        let mut crossed = 0;
        for i in 0..100_000u32 {
            // Within one window (a second in all).
            let at = secs(f64::from(i) * 1e-5);
            // One event from the heavy source per 2,000 newcomers: 50 in
            // the run.
            if i % 2_000 == 0 && t.record_at(heavy, Signal::Churn, at, &s).is_some() {
                crossed += 1;
            }
            // Each newcomer sends one event: it replaces a light source,
            // never the heavy one, and never reaches the threshold. A
            // millisecond after the heavy one's first: with the same weight
            // and the same start, the heavy source would be the newest
            // among equals by chance of its slot's position.
            let at = at + Duration::from_millis(1);
            assert_eq!(
                t.record_at(v4(i), Signal::Churn, at, &s),
                None,
                "newcomer {i} inherited a count"
            );
        }
        assert_eq!(crossed, 1, "the heavy source was counted throughout");
    }

    #[test]
    fn expired_windows_are_replaced_before_live_ones() {
        let t = SignalTable::new(WAYS);
        let s = settings();
        // One set: fill it, then let one slot's window expire.
        let old = v4(1);
        t.record_at(old, Signal::Churn, secs(0.0), &s);
        for i in 2..=WAYS as u32 {
            for _ in 0..3 {
                t.record_at(v4(i), Signal::Churn, secs(9.0), &s);
            }
        }
        t.record_at(v4(99), Signal::Churn, secs(12.0), &s);
        // The expired source went; the live ones kept their counts.
        for i in 2..=WAYS as u32 {
            assert_eq!(t.record_at(v4(i), Signal::Churn, secs(12.0), &s), None);
            assert_eq!(t.record_at(v4(i), Signal::Churn, secs(12.0), &s), Some(5));
        }
    }

    #[tokio::test]
    async fn the_reporter_reports_crossings_by_xdp_source_and_drops_when_full() {
        let mut config = Config::default();
        config.escalation.auth_failures = 2;
        let (tx, mut rx) = mpsc::channel(1);
        let counters = Arc::new(Counters::default());
        let r = Arc::new(Reporter::new(&config, tx, counters.clone()));
        // Two hosts of one /64 are one source, as XDP buckets them.
        let a: IpAddr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().into();
        let b: IpAddr = "2001:db8::2".parse::<Ipv6Addr>().unwrap().into();
        r.record(a, Signal::AuthFailure);
        r.record(b, Signal::AuthFailure);
        let strike = rx.try_recv().expect("reported");
        assert_eq!(strike.source, "2001:db8::".parse::<IpAddr>().unwrap());
        assert_eq!((strike.signal, strike.count), (Signal::AuthFailure, 2));
        // An IPv4-mapped peer is its IPv4 address.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        r.record(mapped, Signal::AuthFailure);
        r.record(mapped, Signal::AuthFailure);
        // The channel holds one: the next crossing is dropped, not waited for.
        r.record(v4(1), Signal::AuthFailure);
        r.record(v4(1), Signal::AuthFailure);
        assert_eq!(rx.try_recv().unwrap().source, v4(1));
        assert!(rx.try_recv().is_err());
        let reported = counters
            .signals_reported
            .load(std::sync::atomic::Ordering::Relaxed);
        let dropped = counters
            .signals_dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!((reported, dropped), (2, 1));
        // Turned off by a reload: nothing is counted.
        config.escalation.enabled = false;
        r.reload(&config);
        for _ in 0..10 {
            r.record(v4(2), Signal::AuthFailure);
        }
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn live_logins_last_as_long_as_their_sessions() {
        let (tx, _rx) = mpsc::channel(1);
        let r = Arc::new(Reporter::new(
            &Config::default(),
            tx,
            Arc::new(Counters::default()),
        ));
        assert_eq!(r.live_logins(v4(1)), None);
        let first = r.logged_in(v4(1), 7);
        let second = r.logged_in(v4(1), 7);
        assert_eq!(
            r.live_logins(v4(1)),
            Some(LiveLogins {
                sessions: 2,
                tenant: 7
            })
        );
        drop(first);
        assert_eq!(r.live_logins(v4(1)).map(|l| l.sessions), Some(1));
        drop(second);
        assert_eq!(r.live_logins(v4(1)), None);
        assert!(r.logins.lock().unwrap().is_empty(), "nothing left behind");
    }
}
