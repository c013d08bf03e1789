//! Per-tenant request budgets, enforced: requests per second, bytes per
//! second, and backend requests in flight.
//!
//! One [`TenantBudgets`] lives as long as the daemon, like
//! [`super::TenantConnections`]: a tenant's buckets, in-flight count and
//! counters survive reloads, while the limits applied are those of the
//! [`Tenant`] passed in, i.e. the newest configuration the session has
//! seen. A SIGHUP that changes a budget so applies to live sessions at
//! their next request, and nobody is disconnected.
//!
//! The proxy charges every request that goes to the backends once, as it
//! dispatches it (`proxy::command::dispatch`), before anything is sent:
//! one request per backend request it makes (a multi-get of N keys costs
//! N), its bytes as read from the client, and as many in-flight slots as
//! backend requests. A request that does not fit is refused whole, at
//! once ([`OverBudget`]); nothing is queued. The reply's bytes are charged
//! when the reply is ready ([`Charge::reply`]), after the fact: the byte
//! bucket can go into debt, and later requests are refused until time
//! has repaid it. The in-flight slots are held until then, or until the
//! request is dropped (the client left).
//!
//! The buckets use the generic cell rate algorithm, as the XDP program's
//! do: the whole state is one theoretical arrival time on the monotonic
//! clock, in nanoseconds, updated with compare-and-swap, so sessions on
//! every runtime thread charge one tenant without a lock. A request of
//! cost `n` is admitted iff it fits in the burst: one costing more than
//! the whole burst is never admitted.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use log::warn;

use super::{Tenant, TenantLimits};
use crate::ebpf::events::thousands;

/// Nanoseconds on the monotonic clock since this process first asked.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Longest span a bucket accounts in one step (about 146 years): keeps
/// the arithmetic far from overflow whatever rate and burst say.
const MAX_SPAN_NS: u64 = 1 << 62;

/// How often, at most, a tenant's refusals are logged.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A bucket's rate and burst; a rate of 0 is unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    per_sec: u64,
    burst: u64,
}

impl Rate {
    /// `per_sec` units a second, `burst` at once from a full bucket.
    pub const fn new(per_sec: u64, burst: u64) -> Self {
        Self { per_sec, burst }
    }

    fn is_unlimited(self) -> bool {
        self.per_sec == 0
    }

    /// How long `units` take to earn at this rate.
    fn span_ns(self, units: u64) -> u64 {
        let ns = u128::from(units) * 1_000_000_000 / u128::from(self.per_sec.max(1));
        u64::try_from(ns).map_or(MAX_SPAN_NS, |ns| ns.min(MAX_SPAN_NS))
    }
}

/// A token bucket as GCRA keeps it: when it will be full again.
#[derive(Debug, Default)]
pub struct Bucket {
    tat_ns: AtomicU64,
}

impl Bucket {
    /// Takes `units` at `now` if they fit in the burst; `false` takes
    /// nothing.
    pub fn try_take(&self, rate: Rate, units: u64, now: u64) -> bool {
        if rate.is_unlimited() {
            return true;
        }
        let (cost, tolerance) = (rate.span_ns(units), rate.span_ns(rate.burst));
        self.tat_ns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                // An idle bucket's arrival time lies in the past: it is full.
                let next = tat.max(now).saturating_add(cost);
                (next - now <= tolerance).then_some(next)
            })
            .is_ok()
    }

    /// Takes `units` at `now` whether they fit or not: what was spent
    /// before it could be asked (a reply's bytes). The bucket may go into
    /// debt; [`Self::try_take`] refuses until time has repaid it.
    pub fn charge(&self, rate: Rate, units: u64, now: u64) {
        if rate.is_unlimited() {
            return;
        }
        let cost = rate.span_ns(units);
        let _ = self
            .tat_ns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.max(now).saturating_add(cost))
            });
    }

    /// Gives back `units` a [`Self::try_take`] at the same rate took.
    pub fn refund(&self, rate: Rate, units: u64) {
        if rate.is_unlimited() {
            return;
        }
        let cost = rate.span_ns(units);
        let _ = self
            .tat_ns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(cost))
            });
    }
}

/// Which budget refused a request.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum OverBudget {
    /// The requests-per-second bucket had no room for it.
    RequestsPerSec,
    /// The bytes-per-second bucket had no room for it (or is in debt).
    BytesPerSec,
    /// The tenant already had `max_in_flight` backend requests out.
    InFlight,
}

impl OverBudget {
    /// Every kind, in the order `stats` lists them.
    pub const ALL: [OverBudget; 3] = [Self::RequestsPerSec, Self::BytesPerSec, Self::InFlight];

    /// What the client is told: the words after `SERVER_ERROR ` in text
    /// and meta, the value of binary status 0x0086.
    pub const fn reply_text(self) -> &'static str {
        match self {
            Self::RequestsPerSec => "tenant over budget: requests/s",
            Self::BytesPerSec => "tenant over budget: bytes/s",
            Self::InFlight => "tenant over budget: in flight",
        }
    }

    /// The `stats` row counting this kind's refusals.
    pub const fn stat_name(self) -> &'static str {
        match self {
            Self::RequestsPerSec => "tenant_refused_requests_per_sec",
            Self::BytesPerSec => "tenant_refused_bytes_per_sec",
            Self::InFlight => "tenant_refused_in_flight",
        }
    }

    /// The budget's name in metrics and JSON.
    pub const fn metric_label(self) -> &'static str {
        match self {
            Self::RequestsPerSec => "requests_per_sec",
            Self::BytesPerSec => "bytes_per_sec",
            Self::InFlight => "in_flight",
        }
    }

    const fn label(self) -> &'static str {
        match self {
            Self::RequestsPerSec => "requests/s",
            Self::BytesPerSec => "bytes/s",
            Self::InFlight => "in flight",
        }
    }
}

/// What one client request costs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Cost {
    /// Backend requests it makes (a multi-get: one per key); also its
    /// in-flight slots.
    pub requests: u64,
    /// Its bytes as the client sent them.
    pub bytes: u64,
}

/// One tenant's buckets, in-flight count and counters.
#[derive(Debug, Default)]
pub struct TenantBudget {
    requests: Bucket,
    bytes: Bucket,
    in_flight: AtomicU64,
    /// Backend requests admitted.
    served: AtomicU64,
    /// Request and reply bytes charged.
    bytes_charged: AtomicU64,
    refused: [AtomicU64; 3],
    log: RefusalLog,
    /// The counters as the tenant's last `stats reset` saw them.
    reset: ResetMarks,
    /// Requests, errors and latency by command class, for operators.
    pub traffic: crate::proxy::stats::Traffic,
}

/// The counters' values at a tenant's last `stats reset`: its `stats`
/// show what happened since, while the counters themselves, which the log
/// and the operator read (`/metrics` among them), only ever grow (a
/// tenant cannot make the operator's counters go back, nor another
/// tenant's).
#[derive(Debug, Default)]
struct ResetMarks {
    served: AtomicU64,
    bytes: AtomicU64,
    refused: [AtomicU64; 3],
}

/// When the tenant's refusals were last logged, and how many since.
#[derive(Debug, Default)]
struct RefusalLog {
    /// `now_ns() + 1` at the last line; 0 before the first.
    last: AtomicU64,
    unlogged: [AtomicU64; 3],
}

impl TenantBudget {
    /// Admits `cost` for `tenant` under its limits now, or says which
    /// budget refuses it (nothing is then charged).
    pub fn admit(self: &Arc<Self>, tenant: &Tenant, cost: Cost) -> Result<Charge, OverBudget> {
        self.admit_at(tenant, cost, now_ns())
    }

    /// [`Self::admit`] at `now` (nanoseconds of [`now_ns`]'s clock).
    pub fn admit_at(
        self: &Arc<Self>,
        tenant: &Tenant,
        cost: Cost,
        now: u64,
    ) -> Result<Charge, OverBudget> {
        let l = &tenant.limits;
        let max = l.max_in_flight;
        // In flight first: the cheapest to give back.
        let taken = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                let next = n.saturating_add(cost.requests);
                (max == 0 || next <= max).then_some(next)
            });
        if taken.is_err() {
            return Err(self.refuse(tenant, OverBudget::InFlight, now));
        }
        // From here a refusal drops the charge, which releases the slots.
        let charge = Charge {
            budget: self.clone(),
            cost,
            requests_rate: Rate::new(l.max_requests_per_sec, l.requests_burst),
            bytes_rate: Rate::new(l.max_bytes_per_sec, l.bytes_burst),
        };
        if !self
            .requests
            .try_take(charge.requests_rate, cost.requests, now)
        {
            return Err(self.refuse(tenant, OverBudget::RequestsPerSec, now));
        }
        if !self.bytes.try_take(charge.bytes_rate, cost.bytes, now) {
            self.requests.refund(charge.requests_rate, cost.requests);
            return Err(self.refuse(tenant, OverBudget::BytesPerSec, now));
        }
        self.served.fetch_add(cost.requests, Ordering::Relaxed);
        self.bytes_charged.fetch_add(cost.bytes, Ordering::Relaxed);
        Ok(charge)
    }

    /// Counts a refusal, and logs the tenant's refusals when the last line
    /// is [`LOG_INTERVAL`] old: a tenant hammering its budget costs a line
    /// per interval, never one per request.
    fn refuse(&self, tenant: &Tenant, why: OverBudget, now: u64) -> OverBudget {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
        self.log.unlogged[why as usize].fetch_add(1, Ordering::Relaxed);
        let last = self.log.last.load(Ordering::Acquire);
        let interval = LOG_INTERVAL.as_nanos() as u64;
        let due = last == 0 || now.saturating_add(1).saturating_sub(last) >= interval;
        if due
            && self
                .log
                .last
                .compare_exchange(
                    last,
                    now.saturating_add(1),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            let counts = self
                .log
                .unlogged
                .each_ref()
                .map(|n| n.swap(0, Ordering::Relaxed));
            let since = (last != 0)
                .then(|| Duration::from_nanos(now.saturating_add(1).saturating_sub(last)));
            warn!("{}", refusal_line(tenant, counts, since));
        }
        why
    }

    /// Backend requests in flight now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Backend requests admitted since start.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Request and reply bytes charged since start.
    pub fn bytes(&self) -> u64 {
        self.bytes_charged.load(Ordering::Relaxed)
    }

    /// Requests refused since start for `why`.
    pub fn refused(&self, why: OverBudget) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }

    /// `stats reset` from one of the tenant's clients: its `stats` count
    /// from zero again, while the counters behind them (what
    /// [`Self::served`], [`Self::bytes`] and [`Self::refused`] return)
    /// keep counting; the budget, its buckets and what is in flight are
    /// untouched.
    pub fn reset_stats(&self) {
        let r = &self.reset;
        r.served.store(self.served(), Ordering::Relaxed);
        r.bytes.store(self.bytes(), Ordering::Relaxed);
        for why in OverBudget::ALL {
            r.refused[why as usize].store(self.refused(why), Ordering::Relaxed);
        }
    }

    /// `stats` rows: the budget in force on this host (`limits`, 0 =
    /// unlimited), what was spent, and what was refused, since the
    /// tenant's last `stats reset`.
    pub fn stat_rows(&self, limits: &TenantLimits) -> Vec<(&'static str, u64)> {
        let r = &self.reset;
        // A counter read just before a concurrent reset stored a newer
        // mark shows 0, never a wrapped-around number.
        let since = |now: u64, mark: &AtomicU64| now.saturating_sub(mark.load(Ordering::Relaxed));
        let mut rows = vec![
            ("tenant_max_connections", limits.max_connections),
            ("tenant_max_requests_per_sec", limits.max_requests_per_sec),
            ("tenant_requests_burst", limits.requests_burst),
            ("tenant_max_bytes_per_sec", limits.max_bytes_per_sec),
            ("tenant_bytes_burst", limits.bytes_burst),
            ("tenant_max_in_flight", limits.max_in_flight),
            ("tenant_requests", since(self.served(), &r.served)),
            ("tenant_bytes", since(self.bytes(), &r.bytes)),
            ("tenant_curr_in_flight", self.in_flight()),
        ];
        rows.extend(OverBudget::ALL.map(|why| {
            let n = since(self.refused(why), &r.refused[why as usize]);
            (why.stat_name(), n)
        }));
        rows
    }
}

/// One log line for a tenant's refusals since the last (`since` ago;
/// `None` for its first).
fn refusal_line(tenant: &Tenant, counts: [u64; 3], since: Option<Duration>) -> String {
    let total: u64 = counts.iter().sum();
    let kinds: Vec<String> = OverBudget::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .map(|(why, n)| format!("{} over {}", thousands(n), why.label()))
        .collect();
    let when = match since {
        Some(d) => format!("in the last {:.1} s", d.as_secs_f64()),
        None => "since start".to_owned(),
    };
    format!(
        "tenant {} over its budget on this host: {} request{} refused {when} ({}); budget {}",
        tenant.name,
        thousands(total),
        if total == 1 { "" } else { "s" },
        kinds.join(", "),
        describe(&tenant.limits),
    )
}

/// A tenant's request budgets in words, for the log.
pub fn describe(l: &TenantLimits) -> String {
    let rate = |rate: u64, burst: u64, unit: &str| match rate {
        0 => format!("{unit}/s unlimited"),
        r => format!("{} {unit}/s (burst {})", thousands(r), thousands(burst)),
    };
    let in_flight = match l.max_in_flight {
        0 => "in flight unlimited".to_owned(),
        n => format!("{} in flight", thousands(n)),
    };
    format!(
        "{}, {}, {in_flight}",
        rate(l.max_requests_per_sec, l.requests_burst, "requests"),
        rate(l.max_bytes_per_sec, l.bytes_burst, "bytes"),
    )
}

/// Why `tenant`'s byte budget on this host can never admit the largest
/// store the proxy takes (a `max_value_size` value and its command line):
/// a cost above the whole burst is always refused. `None` when it can.
pub fn burst_below_largest_store(tenant: &Tenant, max_value_size: usize) -> Option<String> {
    let l = &tenant.limits;
    let largest = (max_value_size + crate::protocol::Limits::default().max_line_len) as u64;
    (l.max_bytes_per_sec > 0 && l.bytes_burst < largest).then(|| {
        format!(
            "tenant {}: its byte burst on this host ({} bytes) is below the largest store a \
             client may send ({} bytes: max_value_size and a command line), and such stores are \
             always refused: raise bytes_burst (it is divided by hosts)",
            tenant.name,
            thousands(l.bytes_burst),
            thousands(largest)
        )
    })
}

/// An admitted request: holds its in-flight slots until dropped.
#[derive(Debug)]
#[must_use = "the in-flight slots are released when the charge is dropped"]
pub struct Charge {
    budget: Arc<TenantBudget>,
    cost: Cost,
    requests_rate: Rate,
    bytes_rate: Rate,
}

impl Charge {
    /// The reply is ready: charges its `bytes` (after the fact, so the
    /// byte bucket may go into debt) and releases the in-flight slots.
    pub fn reply(self, bytes: usize) {
        let bytes = bytes as u64;
        let b = &self.budget;
        b.bytes.charge(self.bytes_rate, bytes, now_ns());
        b.bytes_charged.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The request was answered without reaching a backend (a key too
    /// long for the namespace, say): everything it was charged is given
    /// back.
    pub fn unsent(self) {
        let b = &self.budget;
        b.requests.refund(self.requests_rate, self.cost.requests);
        b.bytes.refund(self.bytes_rate, self.cost.bytes);
        b.served.fetch_sub(self.cost.requests, Ordering::Relaxed);
        b.bytes_charged
            .fetch_sub(self.cost.bytes, Ordering::Relaxed);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget
            .in_flight
            .fetch_sub(self.cost.requests, Ordering::AcqRel);
    }
}

/// Budget state by tenant id, for the daemon's lifetime.
#[derive(Debug, Default)]
pub struct TenantBudgets {
    budgets: Mutex<HashMap<u32, Arc<TenantBudget>>>,
}

impl TenantBudgets {
    /// No tenant charged yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `tenant`'s budget state, created on first use. Sessions keep it for
    /// their lifetime: a reload keeps a session's tenant, so its state.
    pub fn get(&self, tenant: &Tenant) -> Arc<TenantBudget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        budgets.entry(tenant.id).or_default().clone()
    }

    /// The state of tenant `id`, if it was ever charged.
    pub fn by_id(&self, id: u32) -> Option<Arc<TenantBudget>> {
        let budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        budgets.get(&id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::KeyNamespace;

    const SEC: u64 = 1_000_000_000;

    fn tenant(limits: TenantLimits) -> Tenant {
        Tenant {
            name: "acme".into(),
            id: crate::config::tenant_id("acme"),
            namespace: KeyNamespace::new("acme"),
            limits,
        }
    }

    fn requests(rate: u64, burst: u64) -> TenantLimits {
        TenantLimits {
            max_requests_per_sec: rate,
            requests_burst: burst,
            ..Default::default()
        }
    }

    fn one(bytes: u64) -> Cost {
        Cost { requests: 1, bytes }
    }

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let b = Bucket::default();
        let rate = Rate::new(10, 5);
        let now = 100 * SEC;
        assert_eq!((0..20).filter(|_| b.try_take(rate, 1, now)).count(), 5);
        // One token every 100 ms.
        assert!(!b.try_take(rate, 1, now + SEC / 10 - 1));
        assert!(b.try_take(rate, 1, now + SEC / 10));
        assert!(!b.try_take(rate, 1, now + SEC / 10));
        // Over ten idle seconds it fills to its burst, not beyond.
        let later = now + 10 * SEC;
        assert_eq!((0..20).filter(|_| b.try_take(rate, 1, later)).count(), 5);
    }

    #[test]
    fn a_cost_is_admitted_whole_or_not_at_all() {
        let b = Bucket::default();
        let rate = Rate::new(10, 10);
        let now = 100 * SEC;
        assert!(b.try_take(rate, 7, now));
        // Three left: four do not fit, and take nothing.
        assert!(!b.try_take(rate, 4, now));
        assert!(b.try_take(rate, 3, now));
        assert!(!b.try_take(rate, 1, now));
        // More than the whole burst never fits.
        assert!(!Bucket::default().try_take(rate, 11, now));
    }

    #[test]
    fn charges_after_the_fact_go_into_debt() {
        let b = Bucket::default();
        let rate = Rate::new(1000, 1000);
        let now = 100 * SEC;
        assert!(b.try_take(rate, 10, now));
        // A 3000-byte reply: two seconds of debt beyond the burst.
        b.charge(rate, 3000, now);
        assert!(!b.try_take(rate, 1, now + SEC));
        assert!(!b.try_take(rate, 1, now + 2 * SEC));
        // Repaid (3010 units: 3.01 s to be full, 2.01 s to have 1000).
        assert!(b.try_take(rate, 1, now + 2 * SEC + SEC / 50));
    }

    #[test]
    fn a_refund_restores_what_was_taken() {
        let b = Bucket::default();
        let rate = Rate::new(10, 10);
        let now = 100 * SEC;
        assert!(b.try_take(rate, 10, now));
        b.refund(rate, 4);
        assert!(b.try_take(rate, 4, now));
        assert!(!b.try_take(rate, 1, now));
    }

    #[test]
    fn unlimited_buckets_admit_anything() {
        let b = Bucket::default();
        let rate = Rate::new(0, 0);
        assert!((0..1000).all(|_| b.try_take(rate, u64::MAX, 0)));
    }

    #[test]
    fn the_long_run_rate_is_the_budget() {
        // 1 MiB/s in 100 KiB steps, offered every millisecond for 10 s:
        // a burst of 10, then 10.24 a second.
        let b = Bucket::default();
        let rate = Rate::new(1 << 20, 1 << 20);
        let admitted = (0..10_000u64)
            .filter(|ms| b.try_take(rate, 100 << 10, 100 * SEC + ms * SEC / 1000))
            .count() as f64;
        let wanted = 10.0 + 10.0 * 10.24;
        assert!((admitted - wanted).abs() <= 1.0, "{admitted} vs {wanted}");
    }

    #[test]
    fn concurrent_takes_never_exceed_the_burst() {
        let b = Arc::new(Bucket::default());
        let rate = Rate::new(1, 1000);
        let now = 100 * SEC;
        let taken: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let b = b.clone();
                    s.spawn(move || (0..1000).filter(|_| b.try_take(rate, 1, now)).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken, 1000);
    }

    #[test]
    fn a_refusal_names_its_budget_and_charges_nothing() {
        let budget = Arc::new(TenantBudget::default());
        let t = tenant(TenantLimits {
            max_bytes_per_sec: 100,
            bytes_burst: 100,
            ..requests(10, 10)
        });
        let now = 100 * SEC;
        let c = budget.admit_at(&t, one(60), now).unwrap();
        // The bytes refuse: the request is not charged either.
        assert_eq!(
            budget.admit_at(&t, one(60), now).unwrap_err(),
            OverBudget::BytesPerSec
        );
        drop(c);
        let ok: Vec<_> = (0..9)
            .map(|_| budget.admit_at(&t, one(1), now).unwrap())
            .collect();
        assert_eq!(
            budget.admit_at(&t, one(1), now).unwrap_err(),
            OverBudget::RequestsPerSec
        );
        assert_eq!(budget.served(), 10);
        assert_eq!(budget.bytes(), 69);
        assert_eq!(budget.refused(OverBudget::BytesPerSec), 1);
        assert_eq!(budget.refused(OverBudget::RequestsPerSec), 1);
        drop(ok);
        assert_eq!(budget.in_flight(), 0);
    }

    #[test]
    fn in_flight_slots_are_held_until_the_reply_or_a_drop() {
        let budget = Arc::new(TenantBudget::default());
        let t = tenant(TenantLimits {
            max_in_flight: 8,
            ..Default::default()
        });
        let multi = Cost {
            requests: 5,
            bytes: 0,
        };
        let a = budget.admit_at(&t, multi, 0).unwrap();
        // Five more do not fit in the three left: refused whole.
        assert_eq!(
            budget.admit_at(&t, multi, 0).unwrap_err(),
            OverBudget::InFlight
        );
        assert_eq!(budget.in_flight(), 5);
        let b: Vec<_> = (0..3)
            .map(|_| budget.admit_at(&t, one(0), 0).unwrap())
            .collect();
        assert_eq!(
            budget.admit_at(&t, one(0), 0).unwrap_err(),
            OverBudget::InFlight
        );
        a.reply(10);
        assert_eq!(budget.in_flight(), 3);
        drop(b);
        assert_eq!(budget.in_flight(), 0);
        assert_eq!(budget.refused(OverBudget::InFlight), 2);
        // More than the whole cap never fits.
        let nine = Cost {
            requests: 9,
            bytes: 0,
        };
        assert_eq!(
            budget.admit_at(&t, nine, 0).unwrap_err(),
            OverBudget::InFlight
        );
    }

    #[test]
    fn reply_bytes_are_charged_when_the_reply_is_ready() {
        let budget = Arc::new(TenantBudget::default());
        let t = tenant(TenantLimits {
            max_bytes_per_sec: 1000,
            bytes_burst: 1000,
            ..Default::default()
        });
        let now = now_ns();
        budget.admit_at(&t, one(10), now).unwrap().reply(5000);
        assert_eq!(budget.bytes(), 5010);
        // In debt for about four seconds: even a tiny request waits.
        assert_eq!(
            budget.admit_at(&t, one(1), now).unwrap_err(),
            OverBudget::BytesPerSec
        );
    }

    #[test]
    fn an_unsent_request_costs_nothing() {
        let budget = Arc::new(TenantBudget::default());
        let t = tenant(requests(10, 10));
        let now = 100 * SEC;
        for _ in 0..20 {
            budget.admit_at(&t, one(10), now).unwrap().unsent();
        }
        assert_eq!(
            (budget.served(), budget.bytes(), budget.in_flight()),
            (0, 0, 0)
        );
        // The whole burst is still there, and no more.
        let held: Vec<_> = (0..10)
            .map(|_| budget.admit_at(&t, one(0), now).unwrap())
            .collect();
        assert_eq!(
            budget.admit_at(&t, one(0), now).unwrap_err(),
            OverBudget::RequestsPerSec
        );
        assert_eq!(budget.in_flight(), held.len() as u64);
    }

    /// `stats reset` zeroes what the tenant's `stats` show, not the
    /// counters, nor its budget or what it has in flight.
    #[test]
    fn stats_reset_zeroes_the_view_not_the_counters() {
        let budget = Arc::new(TenantBudget::default());
        let t = tenant(TenantLimits {
            max_in_flight: 3,
            ..requests(10, 10)
        });
        let now = 100 * SEC;
        let held: Vec<_> = (0..3)
            .map(|_| budget.admit_at(&t, one(7), now).unwrap())
            .collect();
        assert!(budget.admit_at(&t, one(7), now).is_err());
        let row = |b: &TenantBudget, name: &str| {
            b.stat_rows(&t.limits)
                .into_iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("no row {name}"))
                .1
        };
        assert_eq!(row(&budget, "tenant_requests"), 3);
        budget.reset_stats();
        for name in [
            "tenant_requests",
            "tenant_bytes",
            "tenant_refused_in_flight",
            "tenant_refused_requests_per_sec",
        ] {
            assert_eq!(row(&budget, name), 0, "{name}");
        }
        // Gauges and budgets are what they are, reset or not.
        assert_eq!(row(&budget, "tenant_curr_in_flight"), 3);
        assert_eq!(row(&budget, "tenant_max_requests_per_sec"), 10);
        assert_eq!(
            (
                budget.served(),
                budget.bytes(),
                budget.refused(OverBudget::InFlight)
            ),
            (3, 21, 1)
        );
        drop(held);
        budget.admit_at(&t, one(5), now).unwrap().reply(2);
        assert_eq!(row(&budget, "tenant_requests"), 1);
        assert_eq!(row(&budget, "tenant_bytes"), 7);
        assert_eq!(budget.served(), 4);
    }

    #[test]
    fn a_reload_applies_new_limits_to_the_same_state() {
        let budgets = TenantBudgets::new();
        let before = tenant(requests(10, 10));
        let budget = budgets.get(&before);
        let now = 100 * SEC;
        assert_eq!(
            (0..20)
                .filter(|_| budget.admit_at(&before, one(0), now).is_ok())
                .count(),
            10
        );
        // The same tenant after a reload: same state, higher budget. The
        // bucket's one second of debt at 10/s is one second at 100/s.
        let after = tenant(requests(100, 100));
        let again = budgets.get(&after);
        assert!(Arc::ptr_eq(&budget, &again));
        assert_eq!(
            (0..200)
                .filter(|_| again.admit_at(&after, one(0), now).is_ok())
                .count(),
            0
        );
        assert_eq!(
            (0..200)
                .filter(|_| again.admit_at(&after, one(0), now + SEC / 2).is_ok())
                .count(),
            50
        );
        assert_eq!(again.served(), 60);
    }

    #[test]
    fn a_burst_below_the_largest_store_is_named() {
        let bytes = |burst| {
            tenant(TenantLimits {
                max_bytes_per_sec: 1 << 20,
                bytes_burst: burst,
                ..Default::default()
            })
        };
        let e = burst_below_largest_store(&bytes(1 << 20), 1 << 20).unwrap();
        assert!(
            e.starts_with("tenant acme: its byte burst on this host (1,048,576 bytes)"),
            "{e}"
        );
        assert!(e.contains("(1,050,624 bytes:"), "{e}");
        assert_eq!(burst_below_largest_store(&bytes(2 << 20), 1 << 20), None);
        assert_eq!(
            burst_below_largest_store(&tenant(TenantLimits::default()), 1 << 20),
            None
        );
    }

    #[test]
    fn log_lines_sum_refusals_once_per_interval() {
        let t = tenant(TenantLimits {
            max_in_flight: 1,
            ..requests(1000, 1000)
        });
        let first = refusal_line(&t, [3, 0, 1], None);
        assert_eq!(
            first,
            "tenant acme over its budget on this host: 4 requests refused since start (3 over requests/s, 1 over in flight); budget 1,000 requests/s (burst 1,000), \
             bytes/s unlimited, 1 in flight"
        );
        let later = refusal_line(&t, [0, 1, 0], Some(Duration::from_millis(10_250)));
        assert!(
            later.contains("1 request refused in the last 10.2 s (1 over bytes/s)"),
            "{later}"
        );
        // The interval: a line at the first refusal, none until it is over,
        // and the next counts every refusal in between.
        let budget = Arc::new(TenantBudget::default());
        let _held = budget.admit_at(&t, one(0), SEC).unwrap();
        let interval = LOG_INTERVAL.as_nanos() as u64;
        for i in 0..100 {
            let _ = budget.admit_at(&t, one(0), SEC + i * interval / 100);
        }
        let log = &budget.log;
        // The first was logged; 99 wait for the next line.
        let pending: u64 = log.unlogged.iter().map(|n| n.load(Ordering::Relaxed)).sum();
        assert_eq!(pending, 99);
        let _ = budget.admit_at(&t, one(0), SEC + interval);
        let pending: u64 = log.unlogged.iter().map(|n| n.load(Ordering::Relaxed)).sum();
        assert_eq!(pending, 0);
    }
}
