//! The backend probe: the check a data node should pass before it joins
//! the hash ring (first added, or back from an ejection), and that an
//! operator runs by hand (`guard probe`). A node that answers, but slowly,
//! hurts every client whose keys hash to it; memcached itself has nothing
//! to say about that, so the probe asks the node's peers.
//!
//! [`probe`] opens its own connection, independent of the proxy's pools,
//! and checks that the node stores, returns and deletes what it is given
//! (a wrong answer fails at once), timing every request: the single
//! round trips show the network and the node's latency, a burst of
//! pipelined sets and gets of larger values shows its throughput.
//! [`judge`] then compares a candidate's figures with its peers' under
//! the same [`OutlierRule`] the proxy ejects backends by, and
//! [`command`] is `guard probe`.
//!
//! Probe keys start with [`INTERNAL_KEY_PREFIX`], where no client key can
//! be, carry the process id and a random part, so probes running at once
//! never meet, and live 30 s, so a probe cut short leaves nothing for
//! long.

use std::{io, net::SocketAddr, time::Duration};

use bytes::BytesMut;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    time::{Instant, timeout},
};

use super::{
    error::excerpt,
    health::{OutlierRule, human, median},
};
use crate::{
    cli::ProbeArgs,
    config::INTERNAL_KEY_PREFIX,
    protocol::{self, Limits, MetaCode, Response},
};

/// How a probe runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    /// Longest wait for the connection.
    pub connect_timeout: Duration,
    /// Longest wait for a request's reply (in the burst, for each reply
    /// after the one before).
    pub request_timeout: Duration,
    /// Set/get/delete/get cycles, each request a latency sample.
    pub round_trips: usize,
    /// Sets, then gets, pipelined in the burst.
    pub burst: usize,
    /// Size of each value in the burst, in bytes.
    pub burst_value_size: usize,
    /// Give up as soon as so many round trips took longer than this that
    /// their 90th percentile must too ([`ProbeError::Slow`]): a node at
    /// 300 ms fails after nine requests instead of eighty. The proxy sets
    /// it from the peers it probed first; `None` runs every round trip.
    pub slow_above: Option<Duration>,
    /// The longest the whole probe may take: a node answering each
    /// request just within the timeout cannot hold it for minutes.
    pub deadline: Duration,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            // The proxy's own backend timeouts (`ProxyConfig`): a node
            // that cannot meet them would be failed by the proxy anyway.
            connect_timeout: Duration::from_millis(200),
            request_timeout: Duration::from_millis(250),
            // 80 samples: enough for a p90 to mean something, little
            // enough to take milliseconds on a healthy node.
            round_trips: 20,
            burst: 32,
            burst_value_size: 4096,
            slow_above: None,
            deadline: Duration::from_secs(30),
        }
    }
}

/// How many times the burst runs; its figure is their median.
const BURST_RUNS: usize = 3;

/// What a probe measured.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeFigures {
    pub addr: SocketAddr,
    /// Time to connect.
    pub connect: Duration,
    /// Percentiles (nearest rank) and maximum over every single request.
    pub round_trip_p50: Duration,
    pub round_trip_p90: Duration,
    pub round_trip_max: Duration,
    /// From writing the burst to its last reply (the median of
    /// three runs).
    pub burst: Duration,
}

/// A step of the probe, named in its errors.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ProbeOp {
    Set,
    Get,
    Delete,
    /// The get after the delete, which must miss.
    GetDeleted,
    BurstSet,
    BurstGet,
    /// The deletes that clear the burst's keys.
    BurstDelete,
}

impl std::fmt::Display for ProbeOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProbeOp::Set => "set",
            ProbeOp::Get => "get",
            ProbeOp::Delete => "delete",
            ProbeOp::GetDeleted => "get after the delete",
            ProbeOp::BurstSet => "burst's sets",
            ProbeOp::BurstGet => "burst's gets",
            ProbeOp::BurstDelete => "burst's deletes",
        })
    }
}

/// Why a probe failed. Each message is one sentence naming the node and,
/// for an I/O failure, the system's error: it stands alone as a verdict's
/// reason, so the cause is in the message rather than behind `source`.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{addr}: connection refused")]
    ConnectRefused { addr: SocketAddr },
    #[error("{addr}: cannot connect: {error}")]
    ConnectFailed { addr: SocketAddr, error: io::Error },
    #[error("{addr}: no connection within {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("{addr}: no reply to the {op} within {after:?}")]
    Timeout {
        addr: SocketAddr,
        op: ProbeOp,
        after: Duration,
    },
    /// `got` is the start of what came back, escaped.
    #[error("{addr}: the {op} got \"{got}\" instead of {expected}")]
    WrongReply {
        addr: SocketAddr,
        op: ProbeOp,
        expected: &'static str,
        got: String,
    },
    #[error("{addr}: closed the connection during the {op}")]
    Closed { addr: SocketAddr, op: ProbeOp },
    #[error("{addr}: the probe took longer than {}", human(*after))]
    Deadline { addr: SocketAddr, after: Duration },
    #[error(
        "{addr}: {count} of its first {of} requests took longer than {} \
         (the slowest {}), so its round-trip p90 will too",
        human(*limit),
        human(*slowest)
    )]
    Slow {
        addr: SocketAddr,
        count: usize,
        of: usize,
        limit: Duration,
        slowest: Duration,
    },
    #[error("{addr}: the {op} failed: {error}")]
    Io {
        addr: SocketAddr,
        op: ProbeOp,
        error: io::Error,
    },
}

/// Probes the memcached at `addr`: connects, runs
/// [`ProbeSettings::round_trips`] set/get/delete/get cycles one request
/// at a time, then the burst, and deletes what it stored. Any wrong,
/// missing or late reply fails it, and so does taking longer than
/// [`ProbeSettings::deadline`] in all.
pub async fn probe(addr: SocketAddr, settings: &ProbeSettings) -> Result<ProbeFigures, ProbeError> {
    timeout(settings.deadline, probe_within(addr, settings))
        .await
        .unwrap_or(Err(ProbeError::Deadline {
            addr,
            after: settings.deadline,
        }))
}

async fn probe_within(
    addr: SocketAddr,
    settings: &ProbeSettings,
) -> Result<ProbeFigures, ProbeError> {
    let started = Instant::now();
    let stream = match timeout(settings.connect_timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(ProbeError::ConnectTimeout {
                addr,
                after: settings.connect_timeout,
            });
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(ProbeError::ConnectRefused { addr });
        }
        Ok(Err(error)) => return Err(ProbeError::ConnectFailed { addr, error }),
        Ok(Ok(s)) => s,
    };
    let connect = started.elapsed();
    // A request must leave when written, not when the last one is acked.
    stream
        .set_nodelay(true)
        .map_err(|error| ProbeError::ConnectFailed { addr, error })?;
    let mut link = Link::new(addr, stream, settings);
    let prefix = key_prefix();

    let mut samples = Vec::with_capacity(settings.round_trips * 4);
    // More samples above the limit than this and the nearest-rank p90 is
    // above it too.
    let total = settings.round_trips * 4;
    let tolerated = total - ((total as f64) * 0.9).ceil() as usize;
    let mut over = 0;
    for n in 0..settings.round_trips {
        let key = format!("{prefix}{n}");
        // The key itself is the value: a reply meant for another round
        // trip does not pass for this one.
        let value = key.as_bytes();
        let (mut set, mut get, mut delete) = (Vec::new(), Vec::new(), Vec::new());
        put_set(&mut set, &key, value);
        put_get(&mut get, &key);
        put_delete(&mut delete, &key);
        for (request, op, expect) in [
            (&set, ProbeOp::Set, Expect::Stored),
            (&get, ProbeOp::Get, Expect::Value(value)),
            (&delete, ProbeOp::Delete, Expect::Stored),
            (&get, ProbeOp::GetDeleted, Expect::Miss),
        ] {
            let took = link.pipeline(request, &[(op, expect)]).await?;
            samples.push(took);
            if let Some(limit) = settings.slow_above.filter(|&l| took > l) {
                over += 1;
                if over > tolerated {
                    return Err(ProbeError::Slow {
                        addr,
                        count: over,
                        of: samples.len(),
                        limit,
                        slowest: samples.iter().copied().max().unwrap_or(took),
                    });
                }
            }
        }
    }

    let keys: Vec<String> = (settings.round_trips..settings.round_trips + settings.burst)
        .map(|n| format!("{prefix}{n}"))
        .collect();
    let values: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| k.bytes().cycle().take(settings.burst_value_size).collect())
        .collect();
    let mut burst = Vec::new();
    let mut replies = Vec::with_capacity(keys.len() * 2);
    for (k, v) in keys.iter().zip(&values) {
        put_set(&mut burst, k, v);
        replies.push((ProbeOp::BurstSet, Expect::Stored));
    }
    for (k, v) in keys.iter().zip(&values) {
        put_get(&mut burst, k);
        replies.push((ProbeOp::BurstGet, Expect::Value(v)));
    }
    // The median of a few: one stall of the proxy host's own scheduler
    // must not fail a healthy node, while a narrow link is slow every
    // time.
    let mut bursts = Vec::with_capacity(BURST_RUNS);
    for _ in 0..BURST_RUNS {
        bursts.push(link.pipeline(&burst, &replies).await?);
    }
    bursts.sort_unstable();
    let burst = bursts[BURST_RUNS / 2];
    let mut deletes = Vec::new();
    for k in &keys {
        put_delete(&mut deletes, k);
    }
    link.pipeline(
        &deletes,
        &vec![(ProbeOp::BurstDelete, Expect::Stored); keys.len()],
    )
    .await?;

    samples.sort_unstable();
    Ok(ProbeFigures {
        addr,
        connect,
        round_trip_p50: percentile(&samples, 0.5),
        round_trip_p90: percentile(&samples, 0.9),
        round_trip_max: samples.last().copied().unwrap_or_default(),
        burst,
    })
}

/// Probes every address at once; the results in the same order.
pub async fn probe_all(
    addrs: &[SocketAddr],
    settings: &ProbeSettings,
) -> Vec<Result<ProbeFigures, ProbeError>> {
    let tasks: Vec<_> = addrs
        .iter()
        .map(|&addr| {
            let settings = settings.clone();
            tokio::spawn(async move { probe(addr, &settings).await })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        // A probe only panics on a bug; carry the panic on.
        results.push(
            t.await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
        );
    }
    results
}

/// Whether a candidate may join, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub pass: bool,
    /// One line naming the figures compared, or the probe's error.
    pub reason: String,
}

/// Judges a candidate's probe against its peers' figures: it fails if
/// its probe failed, or if its round-trip p90 or its burst time is an
/// outlier (`rule`) against the median of the peers'. With no peers only
/// correctness counts.
pub fn judge(
    candidate: &Result<ProbeFigures, ProbeError>,
    peers: &[ProbeFigures],
    rule: &OutlierRule,
) -> Verdict {
    let c = match candidate {
        Ok(c) => c,
        Err(e) => {
            return Verdict {
                pass: false,
                reason: e.to_string(),
            };
        }
    };
    let p90s: Vec<Duration> = peers.iter().map(|p| p.round_trip_p90).collect();
    let bursts: Vec<Duration> = peers.iter().map(|p| p.burst).collect();
    let (Some(peer_p90), Some(peer_burst)) = (median(&p90s), median(&bursts)) else {
        return Verdict {
            pass: true,
            reason: format!(
                "answered correctly; no peers to compare with (round-trip p90 {}, burst {})",
                human(c.round_trip_p90),
                human(c.burst)
            ),
        };
    };
    let compared = [
        ("round-trip p90", c.round_trip_p90, peer_p90),
        ("burst", c.burst, peer_burst),
    ];
    let outliers: Vec<String> = compared
        .iter()
        .filter(|(_, value, peers)| rule.is_outlier(*value, *peers))
        .map(|&(name, value, peers)| comparison(name, value, peers))
        .collect();
    if !outliers.is_empty() {
        return Verdict {
            pass: false,
            reason: format!("slower than its peers: {}", outliers.join("; ")),
        };
    }
    let all: Vec<String> = compared
        .iter()
        .map(|&(name, value, peers)| comparison(name, value, peers))
        .collect();
    let head = if rule.ratio > 0.0 {
        "not an outlier"
    } else {
        "latency not judged (outlier ratio 0)"
    };
    Verdict {
        pass: true,
        reason: format!("{head}: {}", all.join("; ")),
    }
}

/// `round-trip p90 201.3 ms vs peers' 0.40 ms (503×)`.
fn comparison(name: &str, value: Duration, peers: Duration) -> String {
    let times = if peers.is_zero() {
        "peers at zero".to_owned()
    } else {
        let r = value.as_secs_f64() / peers.as_secs_f64();
        if r >= 10.0 {
            format!("{r:.0}×")
        } else {
            format!("{r:.1}×")
        }
    };
    format!(
        "{name} {} vs peers' {} ({times})",
        human(value),
        human(peers)
    )
}

/// The nearest-rank percentile `q` of `sorted`; zero when empty.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1))
        .copied()
        .unwrap_or_default()
}

/// `~probe:<pid>-<random>:`, the start of this probe's keys.
fn key_prefix() -> String {
    // Without randomness, the clock still tells this probe from others
    // of the same process.
    let random = getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    format!(
        "{INTERNAL_KEY_PREFIX}probe:{}-{random:016x}:",
        std::process::id()
    )
}

fn put_set(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    out.extend_from_slice(format!("ms {key} {} T30\r\n", value.len()).as_bytes());
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn put_get(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(format!("mg {key} v\r\n").as_bytes());
}

fn put_delete(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(format!("md {key}\r\n").as_bytes());
}

/// The one right reply to a request.
#[derive(Copy, Clone, Debug)]
enum Expect<'a> {
    /// `HD`: stored, or deleted.
    Stored,
    /// `VA` with exactly this value.
    Value(&'a [u8]),
    /// `EN`: a miss.
    Miss,
}

impl Expect<'_> {
    fn met_by(&self, r: &Response) -> bool {
        let Response::Meta(m) = r else { return false };
        match self {
            Expect::Stored => m.code == MetaCode::Hd,
            Expect::Value(v) => m.code == MetaCode::Va && m.value.as_deref() == Some(*v),
            Expect::Miss => m.code == MetaCode::En,
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Expect::Stored => "HD",
            Expect::Value(_) => "VA with the value set",
            Expect::Miss => "EN",
        }
    }
}

/// The probe's connection, split so a pipeline's replies are read while
/// it is still being written: whatever the sizes, neither side waits for
/// buffers the other is not emptying.
struct Link {
    addr: SocketAddr,
    request_timeout: Duration,
    wr: OwnedWriteHalf,
    replies: Replies,
}

struct Replies {
    addr: SocketAddr,
    rd: OwnedReadHalf,
    buf: BytesMut,
    limits: Limits,
}

impl Link {
    fn new(addr: SocketAddr, stream: TcpStream, settings: &ProbeSettings) -> Self {
        let (rd, wr) = stream.into_split();
        Self {
            addr,
            request_timeout: settings.request_timeout,
            wr,
            replies: Replies {
                addr,
                rd,
                buf: BytesMut::with_capacity(16 * 1024),
                limits: Limits {
                    // A longer value than the probe stored is a wrong
                    // reply, not one to wait for.
                    max_value_len: settings.burst_value_size.max(1024),
                    max_line_len: 8 * 1024,
                    ..Limits::default()
                },
            },
        }
    }

    /// Writes `requests` and checks one reply per entry of `expected`,
    /// each within the request timeout of the one before (of the start,
    /// for the first); returns the time from the start to the last reply.
    async fn pipeline(
        &mut self,
        requests: &[u8],
        expected: &[(ProbeOp, Expect<'_>)],
    ) -> Result<Duration, ProbeError> {
        let (addr, limit) = (self.addr, self.request_timeout);
        let first = expected.first().map_or(ProbeOp::Set, |e| e.0);
        let started = Instant::now();
        let wr = &mut self.wr;
        let write = async {
            wr.write_all(requests)
                .await
                .map_err(|error| ProbeError::Io {
                    addr,
                    op: first,
                    error,
                })
        };
        let replies = &mut self.replies;
        let read = async {
            for (op, expect) in expected {
                timeout(limit, replies.next(*op, expect))
                    .await
                    .map_err(|_| ProbeError::Timeout {
                        addr,
                        op: *op,
                        after: limit,
                    })??;
            }
            Ok(())
        };
        tokio::try_join!(write, read)?;
        Ok(started.elapsed())
    }
}

impl Replies {
    /// Reads the next reply and checks it is `expect`.
    async fn next(&mut self, op: ProbeOp, expect: &Expect<'_>) -> Result<(), ProbeError> {
        let addr = self.addr;
        let wrong = |got: &[u8]| ProbeError::WrongReply {
            addr,
            op,
            expected: expect.describe(),
            got: excerpt(got),
        };
        loop {
            match protocol::parse_response(&mut self.buf, &self.limits) {
                Ok(Some(r)) if expect.met_by(&r) => return Ok(()),
                Ok(Some(r)) => {
                    let mut wire = BytesMut::new();
                    r.encode(&mut wire);
                    return Err(wrong(&wire));
                }
                Ok(None) => {}
                Err(_) => return Err(wrong(&self.buf)),
            }
            match self.rd.read_buf(&mut self.buf).await {
                Ok(0) => return Err(ProbeError::Closed { addr, op }),
                Ok(_) => {}
                Err(error) => return Err(ProbeError::Io { addr, op, error }),
            }
        }
    }
}

/// `guard probe`: probes the candidates and the peers at once, judges
/// each candidate against the peers that answered, prints a table (or
/// JSON) and fails when any candidate did.
pub async fn command(args: &ProbeArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let settings = ProbeSettings {
        connect_timeout: timeout,
        request_timeout: timeout,
        round_trips: args.round_trips as usize,
        ..ProbeSettings::default()
    };
    let rule = OutlierRule {
        ratio: args.outlier_ratio,
        min_gap: Duration::from_millis(args.outlier_min_gap_ms),
    };
    let addrs: Vec<SocketAddr> = args
        .candidates
        .iter()
        .chain(&args.against)
        .copied()
        .collect();
    let mut outcomes = probe_all(&addrs, &settings).await;
    let peers = outcomes.split_off(args.candidates.len());
    let answered: Vec<ProbeFigures> = peers
        .iter()
        .filter_map(|p| p.as_ref().ok())
        .cloned()
        .collect();
    let mut nodes = Vec::with_capacity(addrs.len());
    for (&addr, outcome) in args.candidates.iter().zip(outcomes) {
        let verdict = judge(&outcome, &answered, &rule);
        nodes.push(Node {
            addr,
            outcome,
            verdict: Some(verdict),
        });
    }
    for (&addr, outcome) in args.against.iter().zip(peers) {
        nodes.push(Node {
            addr,
            outcome,
            verdict: None,
        });
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report_json(&nodes, &rule))?
        );
    } else {
        print!("{}", report_table(&nodes));
    }
    let judged = nodes.iter().filter_map(|n| n.verdict.as_ref());
    let failed = judged.clone().filter(|v| !v.pass).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} candidates failed the probe", judged.count());
    }
    Ok(())
}

/// A node `guard probe` reports on: a candidate has a verdict, a peer
/// none.
struct Node {
    addr: SocketAddr,
    outcome: Result<ProbeFigures, ProbeError>,
    verdict: Option<Verdict>,
}

/// One row per node: address, role, figures, verdict.
fn report_table(nodes: &[Node]) -> String {
    let header = [
        "node", "role", "connect", "p50", "p90", "max", "burst", "verdict",
    ];
    let mut rows = vec![header.map(str::to_owned)];
    for n in nodes {
        let [connect, p50, p90, max, burst] = match &n.outcome {
            Ok(f) => [
                f.connect,
                f.round_trip_p50,
                f.round_trip_p90,
                f.round_trip_max,
                f.burst,
            ]
            .map(human),
            Err(_) => std::array::from_fn(|_| "-".to_owned()),
        };
        let (role, verdict) = match (&n.verdict, &n.outcome) {
            (Some(v), _) => (
                "candidate",
                format!("{}: {}", if v.pass { "pass" } else { "fail" }, v.reason),
            ),
            (None, Ok(_)) => ("peer", "-".to_owned()),
            (None, Err(e)) => ("peer", format!("left out of the comparison: {e}")),
        };
        rows.push([
            n.addr.to_string(),
            role.to_owned(),
            connect,
            p50,
            p90,
            max,
            burst,
            verdict,
        ]);
    }
    let mut widths = [0; 8];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            match i {
                0 | 1 => out.push_str(&format!("{cell:<w$}  ")),
                // Figures line up on their units.
                2..=6 => out.push_str(&format!("{cell:>w$}  ")),
                _ => out.push_str(cell),
            }
        }
        out.push('\n');
    }
    out
}

/// `{outlier_ratio, outlier_min_gap_ms, candidates: [...], peers: [...]}`;
/// every node has `addr`, `figures` (milliseconds, or null) and `error`
/// (null, or why its probe failed); candidates also `pass` and `reason`.
fn report_json(nodes: &[Node], rule: &OutlierRule) -> serde_json::Value {
    let msf = |d: Duration| d.as_secs_f64() * 1e3;
    let (mut candidates, mut peers) = (Vec::new(), Vec::new());
    for n in nodes {
        let mut node = match &n.outcome {
            Ok(f) => json!({
                "addr": n.addr.to_string(),
                "figures": {
                    "connect_ms": msf(f.connect),
                    "round_trip_p50_ms": msf(f.round_trip_p50),
                    "round_trip_p90_ms": msf(f.round_trip_p90),
                    "round_trip_max_ms": msf(f.round_trip_max),
                    "burst_ms": msf(f.burst),
                },
                "error": null,
            }),
            Err(e) => {
                json!({ "addr": n.addr.to_string(), "figures": null, "error": e.to_string() })
            }
        };
        match &n.verdict {
            Some(v) => {
                node["pass"] = json!(v.pass);
                node["reason"] = json!(v.reason);
                candidates.push(node);
            }
            None => peers.push(node),
        }
    }
    json!({
        "outlier_ratio": rule.ratio,
        "outlier_min_gap_ms": msf(rule.min_gap),
        "candidates": candidates,
        "peers": peers,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use guard_test_support::{DelayRelay, Memcached, free_port};
    use tokio::{
        io::{AsyncBufReadExt as _, BufReader},
        net::TcpListener,
    };

    use super::*;

    const RULE: OutlierRule = OutlierRule {
        ratio: 3.0,
        min_gap: Duration::from_millis(10),
    };

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn figures(p90: Duration, burst: Duration) -> ProbeFigures {
        ProbeFigures {
            addr: "127.0.0.1:11211".parse().unwrap(),
            connect: us(50),
            round_trip_p50: p90 / 2,
            round_trip_p90: p90,
            round_trip_max: p90 * 2,
            burst,
        }
    }

    fn peers() -> Vec<ProbeFigures> {
        vec![
            figures(us(300), us(1_100)),
            figures(us(500), us(900)),
            figures(us(400), us(1_000)),
        ]
    }

    #[test]
    fn a_failed_probe_fails_with_its_error() {
        let addr = "127.0.0.1:1".parse().unwrap();
        let v = judge(&Err(ProbeError::ConnectRefused { addr }), &peers(), &RULE);
        assert!(!v.pass);
        assert_eq!(v.reason, "127.0.0.1:1: connection refused");
    }

    #[test]
    fn without_peers_only_correctness_counts() {
        let v = judge(&Ok(figures(us(201_300), us(1_000))), &[], &RULE);
        assert!(v.pass, "{v:?}");
        assert_eq!(
            v.reason,
            "answered correctly; no peers to compare with (round-trip p90 201.3 ms, burst 1.0 ms)"
        );
    }

    #[test]
    fn a_slow_round_trip_fails_naming_the_figures() {
        let v = judge(&Ok(figures(us(201_300), us(1_000))), &peers(), &RULE);
        assert!(!v.pass);
        assert_eq!(
            v.reason,
            "slower than its peers: round-trip p90 201.3 ms vs peers' 0.40 ms (503×)"
        );
    }

    #[test]
    fn a_slow_burst_fails_naming_the_figures() {
        let v = judge(&Ok(figures(us(400), us(250_000))), &peers(), &RULE);
        assert!(!v.pass);
        assert_eq!(
            v.reason,
            "slower than its peers: burst 250.0 ms vs peers' 1.0 ms (250×)"
        );
    }

    #[test]
    fn a_node_like_its_peers_passes_with_the_numbers() {
        let v = judge(&Ok(figures(us(450), us(1_200))), &peers(), &RULE);
        assert!(v.pass, "{v:?}");
        assert_eq!(
            v.reason,
            "not an outlier: round-trip p90 0.45 ms vs peers' 0.40 ms (1.1×); \
             burst 1.2 ms vs peers' 1.0 ms (1.2×)"
        );
        // Ten times slower, but by less than the gap: a fast pool's noise.
        let v = judge(&Ok(figures(us(4_000), us(9_000))), &peers(), &RULE);
        assert!(v.pass, "{v:?}");
        // With the ratio at 0 latency is not judged at all.
        let off = OutlierRule { ratio: 0.0, ..RULE };
        let v = judge(&Ok(figures(us(201_300), us(250_000))), &peers(), &off);
        assert!(v.pass, "{v:?}");
        assert!(
            v.reason
                .starts_with("latency not judged (outlier ratio 0): "),
            "{v:?}"
        );
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let ms: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 0.5), Duration::from_millis(5));
        assert_eq!(percentile(&ms, 0.9), Duration::from_millis(9));
        assert_eq!(percentile(&ms[..1], 0.9), Duration::from_millis(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    /// Keys memcached holds, from `lru_crawler metadump all`.
    async fn stored_keys(addr: SocketAddr) -> Vec<String> {
        let s = TcpStream::connect(addr).await.unwrap();
        let (rd, mut wr) = s.into_split();
        wr.write_all(b"lru_crawler metadump all\r\n").await.unwrap();
        let mut rd = BufReader::new(rd);
        let mut keys = Vec::new();
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            line.clear();
            let n = timeout(Duration::from_secs(10), rd.read_line(&mut line))
                .await
                .expect("metadump ends")
                .unwrap();
            assert!(n > 0 && Instant::now() < deadline, "metadump cut short");
            if line == "END\r\n" {
                return keys;
            }
            keys.push(line.trim_end().to_owned());
        }
    }

    /// Every reply within its timeout, yet the whole probe too long.
    #[tokio::test]
    async fn a_probe_past_its_deadline_fails() {
        let mc = Memcached::start();
        let relay = DelayRelay::start(mc.addr());
        relay.set_delay(Duration::from_millis(20));
        let settings = ProbeSettings {
            deadline: Duration::from_millis(300),
            ..ProbeSettings::default()
        };
        match probe(relay.addr(), &settings).await {
            Err(e @ ProbeError::Deadline { .. }) => {
                assert!(e.to_string().ends_with("took longer than 300.0 ms"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// Given a limit, a slow node fails as soon as its p90 can no longer
    /// come in under it: the ninth slow request of eighty, not the last.
    #[tokio::test]
    async fn a_node_slower_than_the_limit_is_given_up_on_early() {
        let mc = Memcached::start();
        let relay = DelayRelay::start(mc.addr());
        relay.set_delay(Duration::from_millis(30));
        let settings = ProbeSettings {
            slow_above: Some(Duration::from_millis(10)),
            ..ProbeSettings::default()
        };
        match probe(relay.addr(), &settings).await {
            Err(ProbeError::Slow {
                count, of, limit, ..
            }) => {
                assert_eq!((count, of), (9, 9));
                assert_eq!(limit, Duration::from_millis(10));
            }
            other => panic!("{other:?}"),
        }
        // Under the limit it runs to the end.
        relay.set_delay(Duration::ZERO);
        let loose = ProbeSettings {
            slow_above: Some(Duration::from_secs(1)),
            ..ProbeSettings::default()
        };
        probe(relay.addr(), &loose).await.unwrap();
    }

    #[tokio::test]
    async fn a_healthy_memcached_passes_and_keeps_none_of_the_keys() {
        let mc = Memcached::start();
        let settings = ProbeSettings::default();
        let f = probe(mc.addr(), &settings).await.unwrap();
        assert_eq!(f.addr, mc.addr());
        assert!(f.round_trip_p50 <= f.round_trip_p90, "{f:?}");
        assert!(f.round_trip_p90 <= f.round_trip_max, "{f:?}");
        assert!(f.round_trip_max < settings.request_timeout, "{f:?}");
        assert!(!f.burst.is_zero() && !f.connect.is_zero(), "{f:?}");
        let keys = stored_keys(mc.addr()).await;
        assert!(keys.is_empty(), "left behind: {keys:?}");
    }

    /// What the fake memcached gets wrong.
    #[derive(Copy, Clone)]
    enum Fault {
        None,
        /// A get of a value this picks answers as many `x` instead.
        Corrupt(fn(&[u8]) -> bool),
        /// A delete answers `HD` and keeps the key.
        KeepDeleted,
    }

    /// A memcached of a few lines for one connection: `ms`, `mg` (`v`)
    /// and `md` on a map, with `fault`.
    async fn fake_memcached(fault: Fault) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd);
            let mut store: HashMap<String, Vec<u8>> = HashMap::new();
            let mut line = String::new();
            loop {
                line.clear();
                if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let words: Vec<&str> = line.split_whitespace().collect();
                let reply = match words[..] {
                    ["ms", key, len, ..] => {
                        let mut v = vec![0; len.parse::<usize>().unwrap() + 2];
                        rd.read_exact(&mut v).await.unwrap();
                        v.truncate(v.len() - 2);
                        store.insert(key.to_owned(), v);
                        b"HD\r\n".to_vec()
                    }
                    ["mg", key, ..] => match store.get(key) {
                        Some(v) => {
                            let v = if matches!(fault, Fault::Corrupt(c) if c(v)) {
                                vec![b'x'; v.len()]
                            } else {
                                v.clone()
                            };
                            let mut r = format!("VA {}\r\n", v.len()).into_bytes();
                            r.extend_from_slice(&v);
                            r.extend_from_slice(b"\r\n");
                            r
                        }
                        None => b"EN\r\n".to_vec(),
                    },
                    ["md", _] if matches!(fault, Fault::KeepDeleted) => b"HD\r\n".to_vec(),
                    ["md", key] => match store.remove(key) {
                        Some(_) => b"HD\r\n".to_vec(),
                        None => b"NF\r\n".to_vec(),
                    },
                    _ => b"ERROR\r\n".to_vec(),
                };
                if wr.write_all(&reply).await.is_err() {
                    return;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_fake_answers_right_when_it_corrupts_nothing() {
        // So the failures below are the corruption's, not the fake's.
        let addr = fake_memcached(Fault::None).await;
        probe(addr, &ProbeSettings::default()).await.unwrap();
    }

    #[tokio::test]
    async fn a_wrong_value_fails_the_get_showing_what_came_back() {
        let addr = fake_memcached(Fault::Corrupt(|_| true)).await;
        let e = probe(addr, &ProbeSettings::default()).await.unwrap_err();
        assert!(
            matches!(
                e,
                ProbeError::WrongReply {
                    op: ProbeOp::Get,
                    ..
                }
            ),
            "{e:?}"
        );
        // The value set was the first key (`…:0`; its length varies with
        // the pid); as many `x` came back.
        let n = key_prefix().len() + 1;
        assert_eq!(
            e.to_string(),
            format!(
                "{addr}: the get got \"VA {n}\\r\\n{}\\r\\n\" instead of VA with the value set",
                "x".repeat(n)
            )
        );
    }

    #[tokio::test]
    async fn a_wrong_value_in_the_burst_fails_the_burst() {
        let addr = fake_memcached(Fault::Corrupt(|v| v.len() > 1_000)).await;
        let e = probe(addr, &ProbeSettings::default()).await.unwrap_err();
        assert!(
            matches!(
                e,
                ProbeError::WrongReply {
                    op: ProbeOp::BurstGet,
                    ..
                }
            ),
            "{e:?}"
        );
        // 4 KiB of value, escaped and cut at 64 bytes of the wire form.
        let text = e.to_string();
        let shown = format!(
            "the burst's gets got \"VA 4096\\r\\n{}…\"",
            "x".repeat(64 - "VA 4096\r\n".len())
        );
        assert!(text.contains(&shown), "{text}");
    }

    #[tokio::test]
    async fn a_delete_that_keeps_the_key_fails_the_get_after_it() {
        let addr = fake_memcached(Fault::KeepDeleted).await;
        let e = probe(addr, &ProbeSettings::default()).await.unwrap_err();
        assert!(
            matches!(
                e,
                ProbeError::WrongReply {
                    op: ProbeOp::GetDeleted,
                    expected: "EN",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_silent_node_times_out_naming_the_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut sink = Vec::new();
            // Reads everything, answers nothing.
            while s.read_buf(&mut sink).await.unwrap_or(0) > 0 {}
        });
        let settings = ProbeSettings {
            request_timeout: Duration::from_millis(100),
            ..ProbeSettings::default()
        };
        // The test's own bound, so a probe that waits for ever fails it.
        let e = timeout(Duration::from_secs(2), probe(addr, &settings))
            .await
            .expect("the probe gave up within 2 s")
            .unwrap_err();
        assert!(
            matches!(e, ProbeError::Timeout { op: ProbeOp::Set, after, .. } if after == Duration::from_millis(100)),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("{addr}: no reply to the set within 100ms")
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let e = probe(addr, &ProbeSettings::default()).await.unwrap_err();
        assert!(matches!(e, ProbeError::ConnectRefused { .. }), "{e:?}");
        assert_eq!(e.to_string(), format!("{addr}: connection refused"));
    }
}
