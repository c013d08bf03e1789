//! Memcache load for the proxy benchmark, on loopback: paced text
//! requests (one at a time or pipelined) with their latency, connection
//! churn (connect, one get, close), and idle clients held open. Every
//! loop is bounded in time and in count.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Keys the load spreads over (each preloaded with [`store_all`]).
pub const KEYS: usize = 10_000;
/// Bytes in every stored value.
pub const VALUE_LEN: usize = 100;

/// The name of key `n`.
pub fn key(n: usize) -> String {
    format!("key:{n:05}")
}

/// A small xorshift generator: the same requests for every target.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Appends the next request of a mix to `req`: a get `get_pct`% of the
/// time, else a set, each for a random key.
pub fn push_request(rng: &mut Rng, get_pct: u64, req: &mut Vec<u8>) {
    let r = rng.next();
    let k = key((r >> 8) as usize % KEYS);
    if r % 100 < get_pct {
        let _ = write!(req, "get {k}\r\n");
    } else {
        let _ = write!(req, "set {k} 0 0 {VALUE_LEN}\r\n");
        req.extend_from_slice(&[b'v'; VALUE_LEN]);
        req.extend_from_slice(b"\r\n");
    }
}

/// Length of the whole text reply at the start of `buf`, if it is all
/// there.
pub fn reply_len(buf: &[u8]) -> Option<usize> {
    let eol = buf.windows(2).position(|w| w == b"\r\n")? + 2;
    if let Some(header) = buf.strip_prefix(b"VALUE ") {
        let line = std::str::from_utf8(&header[..eol - 8]).ok()?;
        let len: usize = line.split(' ').nth(2)?.parse().ok()?;
        let end = eol + len + 2 + 5;
        return (buf.len() >= end).then_some(end);
    }
    Some(eol)
}

/// Whether a reply is a successful one: a hit (`VALUE … END`) or `STORED`.
fn reply_ok(r: &[u8]) -> bool {
    (r.starts_with(b"VALUE ") && r.ends_with(b"\r\nEND\r\n")) || r == b"STORED\r\n"
}

/// Sends `req` and reads until `done` says the reply is whole.
pub fn exchange(s: &mut TcpStream, req: &[u8], done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    s.write_all(req).expect("send");
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while !done(&got) {
        let n = s.read(&mut chunk).expect("reply within the timeout");
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&chunk[..n]);
    }
    got
}

/// Stores every key through `addr`, pipelined in chunks.
pub fn store_all(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).expect("connect to preload");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(500) {
        let mut req = Vec::new();
        for &n in chunk {
            let _ = write!(req, "set {} 0 0 {VALUE_LEN}\r\n", key(n));
            req.extend_from_slice(&[b'v'; VALUE_LEN]);
            req.extend_from_slice(b"\r\n");
        }
        let want = chunk.len();
        let got = exchange(&mut s, &req, |b| {
            b.ends_with(b"\r\n") && b.windows(2).filter(|w| *w == b"\r\n").count() >= want
        });
        let stored = got.windows(8).filter(|w| *w == b"STORED\r\n").count();
        assert_eq!(stored, want, "preload through {addr}");
    }
}

/// Latencies in 1 µs buckets up to [`Histogram::MAX_US`].
#[derive(Clone)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: vec![0; Self::MAX_US + 1],
            count: 0,
        }
    }
}

impl Histogram {
    /// Latencies above this many µs share the last bucket.
    pub const MAX_US: usize = 200_000;

    /// Counts one latency.
    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as usize).min(Self::MAX_US);
        self.buckets[us] += 1;
        self.count += 1;
    }

    /// Adds `o`'s counts.
    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.count += o.count;
    }

    /// The `p`-quantile in µs (NaN when empty).
    pub fn percentile(&self, p: f64) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        let want = ((self.count as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (us, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return us as f64;
            }
        }
        Self::MAX_US as f64
    }
}

/// A paced load: `connections` clients, each sending `depth` requests in
/// one write and reading their replies before the next batch, batches
/// spaced so that all together offer `rate` requests per second.
#[derive(Clone, Debug)]
pub struct PacedLoad {
    pub connections: usize,
    pub depth: usize,
    /// Requests per second offered; 0: as fast as replies come (closed
    /// loop).
    pub rate: f64,
    pub get_pct: u64,
    pub warmup: Duration,
    pub measure: Duration,
}

/// What a paced load measured over its measured window.
pub struct LoadResult {
    /// Requests answered in the window, per second.
    pub ops_per_sec: f64,
    /// Requests answered in the window.
    pub requests: u64,
    /// Latency of each batch, from its write to its last reply.
    pub hist: Histogram,
    /// Replies that were not a hit or `STORED`.
    pub errors: u64,
}

/// Runs `load` against `addrs` (connection `i` to `addrs[i % len]`) on
/// the current-thread `rt`. `at_window` is called once when the measured
/// window opens and once when it closes (to read CPU counters).
pub fn paced(
    rt: &tokio::runtime::Runtime,
    addrs: &[SocketAddr],
    load: &PacedLoad,
    mut at_window: impl FnMut(),
) -> LoadResult {
    rt.block_on(async {
        let start = tokio::time::Instant::now();
        let measure_from = start + load.warmup;
        let end = measure_from + load.measure;
        let answered = Arc::new(AtomicU64::new(0));
        let counting = Arc::new(AtomicBool::new(false));
        let interval = if load.rate > 0.0 {
            Duration::from_secs_f64(load.connections as f64 * load.depth as f64 / load.rate)
        } else {
            Duration::ZERO
        };
        let tasks: Vec<_> = (0..load.connections)
            .map(|i| {
                let client = Client {
                    addr: addrs[i % addrs.len()],
                    depth: load.depth,
                    get_pct: load.get_pct,
                    rng: Rng::new(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1)),
                    // Spread over one interval, not all at once.
                    first: start + interval.mul_f64(i as f64 / load.connections as f64),
                    interval,
                    end,
                    answered: answered.clone(),
                    counting: counting.clone(),
                };
                tokio::spawn(client.run())
            })
            .collect();
        tokio::time::sleep_until(measure_from).await;
        at_window();
        let before = answered.load(Ordering::Relaxed);
        counting.store(true, Ordering::Relaxed);
        tokio::time::sleep_until(end).await;
        counting.store(false, Ordering::Relaxed);
        let requests = answered.load(Ordering::Relaxed) - before;
        at_window();
        let mut hist = Histogram::default();
        let mut errors = 0;
        for t in tasks {
            let (h, e) = t.await.expect("load connection");
            hist.merge(&h);
            errors += e;
        }
        LoadResult {
            ops_per_sec: requests as f64 / load.measure.as_secs_f64(),
            requests,
            hist,
            errors,
        }
    })
}

struct Client {
    addr: SocketAddr,
    depth: usize,
    get_pct: u64,
    rng: Rng,
    first: tokio::time::Instant,
    interval: Duration,
    end: tokio::time::Instant,
    /// Requests answered by every client, counted as they come.
    answered: Arc<AtomicU64>,
    /// The measured window is open: latencies and errors count.
    counting: Arc<AtomicBool>,
}

impl Client {
    async fn run(mut self) -> (Histogram, u64) {
        let mut s = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        s.set_nodelay(true).unwrap();
        let mut req = Vec::with_capacity(self.depth * 160);
        let mut buf = Vec::with_capacity(16 * 1024);
        let (mut hist, mut errors) = (Histogram::default(), 0);
        let mut next = self.first;
        loop {
            let now = tokio::time::Instant::now();
            if now >= self.end {
                return (hist, errors);
            }
            if next > now {
                tokio::time::sleep_until(next.min(self.end)).await;
                continue;
            }
            // Behind schedule (the target is slower than the offered
            // rate): send at once, and do not make up for lost time.
            next = (next + self.interval).max(now);
            req.clear();
            for _ in 0..self.depth {
                push_request(&mut self.rng, self.get_pct, &mut req);
            }
            let t = Instant::now();
            s.write_all(&req).await.expect("send");
            let mut bad = 0;
            for _ in 0..self.depth {
                let len = loop {
                    if let Some(n) = reply_len(&buf) {
                        break n;
                    }
                    let n = s.read_buf(&mut buf).await.expect("receive");
                    assert!(n > 0, "{} closed the connection", self.addr);
                };
                bad += u64::from(!reply_ok(&buf[..len]));
                buf.drain(..len);
            }
            self.answered
                .fetch_add(self.depth as u64, Ordering::Relaxed);
            if self.counting.load(Ordering::Relaxed) {
                hist.record(t.elapsed());
                errors += bad;
            }
        }
    }
}

/// What a churn run did.
#[derive(Clone, Debug)]
pub struct ChurnResult {
    /// Connections that connected, got their reply and closed.
    pub connections: u64,
    pub elapsed: Duration,
    /// Connections that failed (connect, send or reply).
    pub failed: u64,
    pub first_error: Option<String>,
}

/// `threads` threads each connect to `addrs` (in turn), send one get for
/// a stored key, read the reply and close, again and again, until
/// `duration` has passed or `max` connections were made.
pub fn churn(addrs: &[SocketAddr], threads: usize, duration: Duration, max: u64) -> ChurnResult {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let addrs = addrs.to_vec();
            let done = done.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
                let mut i = t;
                let req = format!("get {}\r\n", key(t));
                let mut buf = [0u8; 1024];
                while Instant::now() < deadline && done.fetch_add(1, Ordering::Relaxed) < max {
                    i += 1;
                    let r = (|| -> std::io::Result<()> {
                        let addr = addrs[i % addrs.len()];
                        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        s.write_all(req.as_bytes())?;
                        let mut got = 0;
                        while !buf[..got].ends_with(b"END\r\n") {
                            let n = s.read(&mut buf[got..])?;
                            if n == 0 || got + n == buf.len() {
                                return Err(std::io::ErrorKind::UnexpectedEof.into());
                            }
                            got += n;
                        }
                        Ok(())
                    })();
                    match r {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            failed += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                            // Out of ports or refused: do not spin.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                (ok, failed, first_error)
            })
        })
        .collect();
    let mut out = ChurnResult {
        connections: 0,
        elapsed: Duration::ZERO,
        failed: 0,
        first_error: None,
    };
    for h in handles {
        let (ok, failed, e) = h.join().expect("churn thread");
        out.connections += ok;
        out.failed += failed;
        out.first_error = out.first_error.or(e);
    }
    out.elapsed = start.elapsed();
    out
}

/// Opens `count` connections to `addr`, each completing one get so the
/// server has set it up, and holds them open. `None` if one fails (the
/// descriptors they would need are not there, say), with why.
pub fn idle_clients(addr: SocketAddr, count: usize) -> Result<Vec<TcpStream>, String> {
    let mut conns = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 0..count {
        if Instant::now() > deadline {
            return Err(format!("only {i} connections within 120 s"));
        }
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connection {i}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"get idle-probe\r\n")
            .map_err(|e| format!("connection {i}: {e}"))?;
        let mut got = Vec::new();
        let mut chunk = [0u8; 64];
        while !got.ends_with(b"END\r\n") {
            match s.read(&mut chunk) {
                Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
                Ok(_) => return Err(format!("connection {i} closed")),
                Err(e) => return Err(format!("connection {i}: {e}")),
            }
        }
        conns.push(s);
    }
    Ok(conns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_measured_whole() {
        assert_eq!(reply_len(b"STORED\r\n"), Some(8));
        assert_eq!(reply_len(b"STOR"), None);
        let hit = b"VALUE k 0 3\r\nabc\r\nEND\r\n";
        assert_eq!(reply_len(hit), Some(hit.len()));
        assert_eq!(reply_len(&hit[..hit.len() - 1]), None);
        assert!(reply_ok(hit) && reply_ok(b"STORED\r\n"));
        assert!(!reply_ok(b"END\r\n") && !reply_ok(b"SERVER_ERROR x\r\n"));
    }

    #[test]
    fn a_mix_has_its_share_of_gets() {
        let mut rng = Rng::new(7);
        let mut gets = 0;
        for _ in 0..1000 {
            let mut req = Vec::new();
            push_request(&mut rng, 90, &mut req);
            gets += usize::from(req.starts_with(b"get "));
        }
        assert!((850..=950).contains(&gets), "{gets}");
    }
}
