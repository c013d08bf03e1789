//! What guard knows of each backend's health: its recent latency (an
//! EWMA and a small histogram per interval), its consecutive failures and
//! its requests in flight; and the rule that calls a latency an outlier
//! against the backend's peers.
//!
//! Connections record every answered batch and every failure here, with
//! relaxed atomics and no lock, so the data path pays a few uncontended
//! additions per batch. The outlier detector (`proxy::ejection`) takes
//! each interval's histogram and compares the backends with each other.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

use super::error::ErrorKind;

/// When a latency is an outlier against its peers': above `ratio` times
/// their median and also `min_gap` above it, so a pool answering in
/// microseconds does not eject a member over a few more of them.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct OutlierRule {
    /// 0 turns latency judgement off.
    pub ratio: f64,
    pub min_gap: Duration,
}

impl OutlierRule {
    /// Whether `value` is an outlier against `peers`, the median of the
    /// peers' values.
    pub fn is_outlier(&self, value: Duration, peers: Duration) -> bool {
        self.ratio > 0.0
            && value.as_secs_f64() > peers.as_secs_f64() * self.ratio
            && value.saturating_sub(peers) >= self.min_gap
            && value > peers
    }
}

/// A duration as an operator reads it in a log line or a table: two
/// decimals of a millisecond below one (where a healthy node's figures
/// are), one decimal below a second, then seconds: `0.40 ms`, `201.3 ms`,
/// `1.5 s`, `10 s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 1.0 {
        format!("{ms:.2} ms")
    } else if ms < 1_000.0 {
        format!("{ms:.1} ms")
    } else if (ms / 1e3).fract() < 0.05 {
        format!("{:.0} s", ms / 1e3)
    } else {
        format!("{:.1} s", ms / 1e3)
    }
}

/// The median of `values` (the lower of the middle two for an even
/// count), or `None` when there are none.
pub fn median(values: &[Duration]) -> Option<Duration> {
    let mut v = values.to_vec();
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) / 2).copied()
}

/// Histogram buckets: four per power of two from 16 µs, so a percentile
/// is known to within 19 %; the last bucket holds everything from ~34 s.
const SUB_BUCKETS: u32 = 4;
const FIRST_US: u64 = 16;
const BUCKETS: usize = 88;

fn bucket_of(us: u64) -> usize {
    if us < FIRST_US {
        return 0;
    }
    let octave = 63 - (us / FIRST_US).leading_zeros();
    let base = FIRST_US << octave;
    let sub = ((us - base) * u64::from(SUB_BUCKETS) / base) as u32;
    ((octave * SUB_BUCKETS + sub + 1) as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, in microseconds: what a percentile that
/// falls in it reports (never less than the truth).
fn bucket_ceiling(i: usize) -> u64 {
    if i == 0 {
        return FIRST_US;
    }
    let i = (i - 1) as u32;
    let (octave, sub) = (i / SUB_BUCKETS, i % SUB_BUCKETS);
    let base = FIRST_US << octave;
    base + base * u64::from(sub + 1) / u64::from(SUB_BUCKETS)
}

/// Upper bounds of [`Histogram`]'s buckets, in seconds: from a loopback
/// memcached's tenth of a millisecond to past any request timeout.
pub const HISTOGRAM_BOUNDS: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A latency histogram since start, as Prometheus reads one: cumulative
/// counts per bound, a count and a sum. Recording is a few relaxed
/// additions, no lock: the data path pays that, the scrape does the rest.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative here: the
    /// scrape adds them up), and above the last.
    buckets: [AtomicU64; HISTOGRAM_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Counts one latency.
    pub fn record(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        let i = HISTOGRAM_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(HISTOGRAM_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// `(sum in seconds, count, [(bound, cumulative count)])`, the `+Inf`
    /// bucket last, as the exposition wants them.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0;
        let mut out = Vec::with_capacity(HISTOGRAM_BOUNDS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.load(Ordering::Relaxed);
            let bound = HISTOGRAM_BOUNDS.get(i).copied().unwrap_or(f64::INFINITY);
            out.push((bound, total));
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, total, out)
    }

    /// The `q` quantile, as the bound of the bucket it falls in (`None`
    /// before any observation): for the status page, not for alerting.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let (_, count, buckets) = self.snapshot();
        if count == 0 {
            return None;
        }
        let rank = ((count as f64) * q).ceil().max(1.0) as u64;
        let (bound, _) = buckets.iter().find(|(_, c)| *c >= rank)?;
        Some(Duration::from_secs_f64(
            bound.min(HISTOGRAM_BOUNDS[HISTOGRAM_BOUNDS.len() - 1] * 2.0),
        ))
    }
}

/// One interval's latencies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencySnapshot {
    /// Batches answered in the interval.
    pub count: u64,
    /// Their 50th and 90th percentiles (bucket ceilings).
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
}

/// Latencies of the current interval, taken and reset by
/// [`Self::take`].
#[derive(Debug)]
struct LatencyWindow {
    buckets: [AtomicU32; BUCKETS],
}

impl Default for LatencyWindow {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

impl LatencyWindow {
    fn record(&self, us: u64) {
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// The interval's percentiles; starts the next interval. Latencies
    /// recorded while this runs land in one interval or the other.
    fn take(&self) -> LatencySnapshot {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| u64::from(b.swap(0, Ordering::Relaxed)))
            .collect();
        let count: u64 = counts.iter().sum();
        let at = |q: f64| {
            if count == 0 {
                return Duration::ZERO;
            }
            let rank = ((count as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Duration::from_micros(bucket_ceiling(i));
                }
            }
            Duration::from_micros(bucket_ceiling(BUCKETS - 1))
        };
        LatencySnapshot {
            count,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        }
    }
}

/// One backend's health, shared by its connections and the detector.
#[derive(Debug, Default)]
pub struct BackendHealth {
    window: LatencyWindow,
    /// Every answered batch's latency since start, for `/metrics`.
    since_start: Histogram,
    /// Exponentially weighted latency in nanoseconds (weight 1/16).
    ewma_ns: AtomicU64,
    /// Connects, requests and connections that failed since the last
    /// reply.
    consecutive_failures: AtomicU32,
    /// Failures since start.
    failures: AtomicU64,
    /// The kind of the last failure, for the line that reports an
    /// ejection.
    last_failure: std::sync::Mutex<Option<ErrorKind>>,
    /// Woken at every failure, so errors eject without waiting for the
    /// next latency interval.
    alarm: Option<Arc<Notify>>,
}

impl BackendHealth {
    /// Health that wakes `alarm` at every failure.
    pub fn new(alarm: Arc<Notify>) -> Self {
        Self {
            alarm: Some(alarm),
            ..Self::default()
        }
    }

    /// A batch was answered `latency` after it was written.
    pub fn answered(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.window.record(ns / 1_000);
        self.since_start.record(latency);
        // A lost update between two connections only skips one sample.
        let old = self.ewma_ns.load(Ordering::Relaxed);
        let new = if old == 0 {
            ns
        } else {
            old - old / 16 + ns / 16
        };
        self.ewma_ns.store(new, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// A connect, a connection or a request failed; returns the failures
    /// in a row so far.
    pub fn failed(&self, kind: ErrorKind) -> u32 {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_failure.lock().expect("last failure lock") = Some(kind);
        let n = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if let Some(a) = &self.alarm {
            a.notify_one();
        }
        n
    }

    /// Failures since the last answer.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// What the last failure was.
    pub fn last_failure(&self) -> Option<ErrorKind> {
        *self.last_failure.lock().expect("last failure lock")
    }

    /// Failures since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Forgets the failures in a row (the backend was ejected for them, or
    /// passed a probe).
    pub fn clear_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// The latency estimate over recent batches.
    pub fn ewma(&self) -> Duration {
        Duration::from_nanos(self.ewma_ns.load(Ordering::Relaxed))
    }

    /// Every answered batch's latency since start.
    pub fn histogram(&self) -> &Histogram {
        &self.since_start
    }

    /// The interval's latencies; starts the next interval.
    pub fn take_interval(&self) -> LatencySnapshot {
        self.window.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn an_outlier_is_both_a_multiple_and_a_gap_above_its_peers() {
        let rule = OutlierRule {
            ratio: 3.0,
            min_gap: ms(10),
        };
        // The mc6 case: 200 ms against a pool at 0.3 ms.
        assert!(rule.is_outlier(ms(200), Duration::from_micros(300)));
        // Ten times slower, but only by microseconds: a fast pool's noise.
        assert!(!rule.is_outlier(Duration::from_micros(900), Duration::from_micros(90)));
        // Well above, but not three times: a busy pool.
        assert!(!rule.is_outlier(ms(50), ms(20)));
        assert!(rule.is_outlier(ms(61), ms(20)));
        assert!(!rule.is_outlier(ms(1), ms(200)));
        let off = OutlierRule { ratio: 0.0, ..rule };
        assert!(!off.is_outlier(ms(10_000), ms(1)));
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(Duration::from_micros(400)), "0.40 ms");
        assert_eq!(human(Duration::from_micros(201_349)), "201.3 ms");
        assert_eq!(human(ms(1_500)), "1.5 s");
        assert_eq!(human(ms(10_000)), "10 s");
    }

    #[test]
    fn median_takes_the_lower_middle() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[ms(5)]), Some(ms(5)));
        assert_eq!(median(&[ms(9), ms(1)]), Some(ms(1)));
        assert_eq!(median(&[ms(9), ms(1), ms(4)]), Some(ms(4)));
    }

    #[test]
    fn buckets_are_monotonic_and_bound_their_values() {
        let mut last = 0;
        for us in [
            0, 1, 15, 16, 17, 20, 31, 32, 100, 1_000, 250_000, 10_000_000,
        ] {
            let b = bucket_of(us);
            assert!(b >= last, "{us}");
            last = b;
            assert!(bucket_ceiling(b) >= us, "{us} µs in bucket {b}");
            // Within a quarter octave, above the first bucket.
            if us >= FIRST_US {
                assert!(
                    bucket_ceiling(b) <= us + us / 4 + 1,
                    "{us}: {}",
                    bucket_ceiling(b)
                );
            }
        }
        assert_eq!(bucket_of(u64::MAX / 2), BUCKETS - 1);
    }

    #[test]
    fn an_interval_reports_its_percentiles_and_starts_over() {
        let h = BackendHealth::default();
        for _ in 0..89 {
            h.answered(Duration::from_micros(200));
        }
        for _ in 0..11 {
            h.answered(ms(200));
        }
        let s = h.take_interval();
        assert_eq!(s.count, 100);
        assert!(s.p50 >= Duration::from_micros(200) && s.p50 < Duration::from_micros(250));
        assert!(s.p90 >= ms(200) && s.p90 < ms(250), "{s:?}");
        assert_eq!(h.take_interval(), LatencySnapshot::default());
        assert!(h.ewma() > Duration::from_micros(200));
    }

    #[test]
    fn a_histogram_counts_cumulatively_with_an_infinite_bucket_last() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for us in [50, 90, 300, 300, 2_000_000, 9_000_000] {
            h.record(Duration::from_micros(us));
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 6);
        assert!((sum - 11.00074).abs() < 1e-6, "{sum}");
        assert_eq!(buckets[0], (0.000_1, 2));
        assert_eq!(buckets[2], (0.000_5, 4));
        assert_eq!(buckets[HISTOGRAM_BOUNDS.len() - 1], (2.5, 5));
        assert_eq!(*buckets.last().unwrap(), (f64::INFINITY, 6));
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1));
        assert_eq!(h.quantile(0.5), Some(Duration::from_micros(500)));
    }

    #[test]
    fn failures_count_in_a_row_until_an_answer() {
        let h = BackendHealth::default();
        assert_eq!(h.failed(ErrorKind::ConnectRefused), 1);
        assert_eq!(h.failed(ErrorKind::Timeout), 2);
        assert_eq!(h.last_failure(), Some(ErrorKind::Timeout));
        h.answered(ms(1));
        assert_eq!(h.consecutive_failures(), 0);
        assert_eq!(h.failed(ErrorKind::Timeout), 1);
        assert_eq!(h.failures(), 3);
    }
}
