//! guard's own counters, reported by `stats` in memcached's format.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;

use super::{health::Histogram, session::SessionEnd};
use crate::protocol::Request;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Proxy-wide counters; every field is a relaxed atomic.
        #[derive(Debug)]
        pub struct ProxyStats {
            started: Instant,
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// Sessions ended, by [`SessionEnd`] (indexed by its value).
            pub session_ends: [AtomicU64; SessionEnd::ALL.len()],
            /// Counted by the daemon's ring-buffer reader.
            limit_events: Arc<AtomicU64>,
            /// Counted by the escalation ladder.
            escalation: Arc<crate::escalation::Counters>,
        }

        impl Default for ProxyStats {
            fn default() -> Self {
                Self::new(Arc::default())
            }
        }

        impl ProxyStats {
            /// Zeroed counters; `limit_events` is the daemon's count of
            /// XDP limit events (zero without XDP).
            pub fn new(limit_events: Arc<AtomicU64>) -> Self {
                Self {
                    started: Instant::now(),
                    $($name: AtomicU64::new(0),)*
                    session_ends: std::array::from_fn(|_| AtomicU64::new(0)),
                    limit_events,
                    escalation: Arc::default(),
                }
            }

            /// Reports the escalation ladder's counters too (zeros
            /// without it).
            pub fn with_escalation(mut self, counters: Arc<crate::escalation::Counters>) -> Self {
                self.escalation = counters;
                self
            }
        }

        impl ProxyStats {
            /// `(name, value)` rows in a stable order, memcached's names
            /// where memcached has the same counter.
            pub fn rows(&self) -> Vec<(&'static str, String)> {
                let mut rows = vec![
                    ("pid", std::process::id().to_string()),
                    ("uptime", self.started.elapsed().as_secs().to_string()),
                    ("version", crate::proxy::version().to_string()),
                ];
                $(rows.push((stringify!($name), self.$name.load(Ordering::Relaxed).to_string()));)*
                for (end, n) in SessionEnd::ALL.iter().zip(&self.session_ends) {
                    rows.push((end.stat_name(), n.load(Ordering::Relaxed).to_string()));
                }
                // Counted by the daemon's ring-buffer reader; zero without XDP.
                rows.push((
                    "xdp_limit_events",
                    self.limit_events.load(Ordering::Relaxed).to_string(),
                ));
                // The escalation ladder's; zero without XDP.
                for (name, v) in self.escalation.rows() {
                    rows.push((name, v.to_string()));
                }
                rows
            }
        }
    };
}

counters! {
    /// Client connections open now.
    curr_connections,
    /// Client connections accepted since start.
    total_connections,
    /// Connections closed at once because their source was at its cap.
    rejected_connections,
    /// Wake-ups of the accept loops, each accepting one connection and
    /// as many more as were queued (see `listener::ACCEPT_BATCH`).
    accept_batches,
    /// Accepted connections whose time in the accept queue was measured:
    /// the first of every batch, which waited longest.
    accept_wait_samples,
    /// Their time in the accept queue, summed, in milliseconds.
    accept_wait_ms_total,
    /// The longest time a measured connection spent in the accept queue,
    /// in milliseconds.
    accept_wait_ms_max,
    /// Keys looked up.
    cmd_get,
    /// Storage requests.
    cmd_set,
    /// Touch requests (including gat).
    cmd_touch,
    /// flush_all requests.
    cmd_flush,
    /// Keys found.
    get_hits,
    /// Keys not found.
    get_misses,
    /// Requests that could not be parsed.
    protocol_errors,
    /// Clients closed because a request took too long to arrive whole.
    request_read_timeouts,
    /// Requests answered with an error because their backend failed.
    backend_errors,
    /// Backend connections discarded after a request timed out.
    backend_timeouts,
    /// Requests refused unsent because their backend connection already
    /// held `backend_max_in_flight` requests.
    backend_overloaded,
    /// Backend connections (re)established.
    backend_connects,
    /// Authentication attempts (SASL or text), as memcached counts them.
    auth_cmds,
    /// Failed authentication attempts.
    auth_errors,
    /// Clients closed for not authenticating in time.
    auth_timeouts,
    /// Authenticated clients closed because their tenant was at its
    /// connection cap.
    tenant_rejected_connections,
    /// Writes refused to read-only identities.
    permission_denied,
    /// Requests refused at once because their tenant was over a budget
    /// (requests/s, bytes/s or in flight; each tenant's `stats` says which).
    budget_refusals,
    /// Backends ejected (for errors or latency) since start.
    backend_ejections,
    /// Ejected backends that passed a probe and rejoined.
    backend_readmissions,
    /// Probes of ejected or new backends that failed.
    backend_probe_failures,
    /// Backends added by a reload that passed their probe and joined.
    backends_added,
    /// Backends removed by a reload.
    backends_removed,
    /// Backends ejected now (a gauge).
    backends_ejected,
    /// Backends added by a reload and not yet joined (a gauge).
    backends_joining,
}

impl ProxyStats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Rows as `Bytes` pairs, for encoders.
    pub fn byte_rows(&self) -> Vec<(Bytes, Bytes)> {
        self.rows()
            .into_iter()
            .map(|(k, v)| (Bytes::from_static(k.as_bytes()), Bytes::from(v)))
            .collect()
    }
}

/// What a client request does, for per-tenant counts: a handful of
/// classes, whatever the protocol, so a metric's labels stay few.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CommandClass {
    /// get, gets, gat, gats, meta `mg`, binary get and gat.
    Get,
    /// set, add, replace, append, prepend, cas, meta `ms`.
    Store,
    /// delete, meta `md`.
    Delete,
    /// incr, decr, meta `ma`.
    Arith,
    /// touch.
    Touch,
    /// flush_all.
    Flush,
    /// Everything else: version, stats, verbosity, noop, quit, `me`,
    /// authentication.
    Other,
}

impl CommandClass {
    /// Every class, in the order of their numbers.
    pub const ALL: [Self; 7] = [
        Self::Get,
        Self::Store,
        Self::Delete,
        Self::Arith,
        Self::Touch,
        Self::Flush,
        Self::Other,
    ];

    /// The class's name in metrics and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Store => "store",
            Self::Delete => "delete",
            Self::Arith => "arith",
            Self::Touch => "touch",
            Self::Flush => "flush",
            Self::Other => "other",
        }
    }

    /// The class of `req`.
    pub fn of(req: &Request) -> Self {
        use crate::protocol::{MetaCommand as M, Opcode::*, TextRequest as T};
        match req {
            Request::Text(t) => match t {
                T::Get(_) => Self::Get,
                T::Store(_) => Self::Store,
                T::Incr { .. } | T::Decr { .. } => Self::Arith,
                T::Delete { .. } => Self::Delete,
                T::Touch { .. } => Self::Touch,
                T::FlushAll { .. } => Self::Flush,
                T::Version | T::Verbosity { .. } | T::Stats(_) | T::Admin(_) | T::Quit => {
                    Self::Other
                }
            },
            Request::Meta(m) => match m.command {
                M::Get => Self::Get,
                M::Set => Self::Store,
                M::Delete => Self::Delete,
                M::Arithmetic => Self::Arith,
                M::Noop | M::Debug => Self::Other,
            },
            Request::Binary(b) => match b.opcode {
                Get | GetQ | GetK | GetKQ | Gat | GatQ | GatK | GatKQ => Self::Get,
                Set | Add | Replace | SetQ | AddQ | ReplaceQ | Append | Prepend | AppendQ
                | PrependQ => Self::Store,
                Delete | DeleteQ => Self::Delete,
                Increment | Decrement | IncrementQ | DecrementQ => Self::Arith,
                Touch => Self::Touch,
                Flush | FlushQ => Self::Flush,
                Noop | Version | Quit | QuitQ | Stat | SaslListMechs | SaslAuth | SaslStep => {
                    Self::Other
                }
            },
        }
    }
}

/// One tenant's requests, backend errors and latency by class, since
/// start: relaxed atomics the data path adds to, the admin endpoint reads.
#[derive(Debug, Default)]
pub struct Traffic {
    requests: [AtomicU64; CommandClass::ALL.len()],
    errors: [AtomicU64; CommandClass::ALL.len()],
    latency: Histogram,
}

impl Traffic {
    /// Counts one request of `class`, answered or refused.
    pub fn request(&self, class: CommandClass) {
        self.requests[class as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one request of `class` answered with a backend error.
    pub fn error(&self, class: CommandClass) {
        self.errors[class as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Records the time a request that went to the backends took, from
    /// its dispatch to its reply.
    pub fn answered(&self, latency: std::time::Duration) {
        self.latency.record(latency);
    }

    /// Requests of `class` since start.
    pub fn requests(&self, class: CommandClass) -> u64 {
        self.requests[class as usize].load(Ordering::Relaxed)
    }

    /// Requests of `class` answered with a backend error since start.
    pub fn errors(&self, class: CommandClass) -> u64 {
        self.errors[class as usize].load(Ordering::Relaxed)
    }

    /// Latency of requests that went to the backends.
    pub fn latency(&self) -> &Histogram {
        &self.latency
    }
}
