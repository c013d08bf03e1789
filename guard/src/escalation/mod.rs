//! The escalation ladder: the proxy reports misbehaviour, XDP enforces it.
//!
//! - [`signals`] is the proxy's part: misbehaviour counted per source
//!   address in a fixed-size table ([`signals::SignalTable`]) — connection
//!   churn, failed authentications, protocol errors that lose the stream,
//!   connections refused at a cap, connections closed without a request —
//!   and a [`Strike`] sent to the daemon (best effort, never blocking a
//!   session) when a source crosses a threshold within the window.
//! - [`ladder`] is the timing, per source: first a stricter SYN budget for
//!   a while, then a timed deny; each step longer on repeat, forgotten by
//!   itself when the source behaves; allow-listed sources and sources with
//!   a live authenticated session never denied.
//! - [`enforcer`] is the daemon's part: it takes strikes (and notices
//!   sources that keep hammering their strict budget, from the XDP maps),
//!   asks the ladder, writes the strict map and the deny list, logs every
//!   escalation and de-escalation once, counts them, and keeps the ladder
//!   in a state file so that a restart resumes it.
//!
//! Tested in `ladder`'s and `signals`' unit tests, in
//! `tests/tests/xdp_kernel.rs` (the strict budget under the verifier) and
//! end to end in `tests/tests/e2e_escalation.rs`.

pub mod enforcer;
pub mod ladder;
pub mod signals;

use std::{
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
};

pub use enforcer::{Enforcer, EscalationState};
pub use signals::Reporter;

/// A kind of misbehaviour.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    /// A connection its client closed young.
    Churn = 0,
    /// A failed authentication.
    AuthFailure = 1,
    /// A connection closed for a protocol error that lost the stream.
    ProtocolError = 2,
    /// A connection refused at the per-source or tenant cap.
    Refused = 3,
    /// A connection closed by a deadline without a whole request.
    Silent = 4,
    /// A second in which the strict budget dropped the source's SYNs
    /// (counted by the daemon from the XDP maps, not by the proxy).
    StrictOverrun = 5,
}

/// A source crossing a signal's threshold, as the proxy reports it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Strike {
    /// The source (IPv6 masked as XDP buckets it).
    pub source: IpAddr,
    /// What it did.
    pub signal: Signal,
    /// How many times, within `window_secs`.
    pub count: u32,
    /// The window.
    pub window_secs: u64,
}

impl Strike {
    /// Why the source is escalated, for the log and `guard deny list`.
    /// `churn_lifetime_ms` says what churn meant when it was counted.
    pub fn reason(&self, churn_lifetime_ms: u64) -> String {
        let (n, w) = (self.count, self.window_secs);
        match self.signal {
            Signal::Churn => format!(
                "connection churn: {n} connections closed within {churn_lifetime_ms} ms of \
                 opening in {w} s"
            ),
            Signal::AuthFailure => format!("{n} failed authentications in {w} s"),
            Signal::ProtocolError => {
                format!("{n} connections closed for protocol errors in {w} s")
            }
            Signal::Refused => format!(
                "{n} connections refused at the per-source or tenant connection cap in {w} s"
            ),
            Signal::Silent => format!(
                "{n} connections closed by a deadline (idle, request read or \
                 authentication) without a whole request in {w} s"
            ),
            Signal::StrictOverrun => format!(
                "kept opening connections over its strict SYN budget: SYNs dropped in {n} \
                 seconds of its strict step"
            ),
        }
    }
}

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident = $stat:literal,)*) => {
        /// What the ladder did since the daemon started, shared with the
        /// proxy's `stats` and written to the state file for
        /// `guard xdp status`.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl Counters {
            /// `(stats name, value)` rows.
            pub fn rows(&self) -> Vec<(&'static str, u64)> {
                vec![$(($stat, self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Threshold crossings the proxy reported to the ladder.
    signals_reported = "escalation_signals",
    /// Crossings not reported: the daemon's queue was full.
    signals_dropped = "escalation_signals_dropped",
    /// Sources put on the strict SYN budget.
    strict = "escalation_strict",
    /// Sources denied.
    denied = "escalation_denied",
    /// Sources held at the strict budget instead of denied (live
    /// authenticated sessions).
    held = "escalation_held",
    /// Offences of allow-listed sources, not escalated.
    spared = "escalation_spared",
    /// Steps that ended (deny to strict, strict to normal).
    deescalated = "escalation_deescalated",
    /// Sources forgotten after behaving.
    forgotten = "escalation_forgotten",
    /// Offences not escalated because the ladder was full.
    full = "escalation_full",
    /// Sources on the strict budget now, not denied (a gauge).
    sources_strict = "escalation_sources_strict",
    /// Sources denied by escalation now (a gauge).
    sources_denied = "escalation_sources_denied",
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
