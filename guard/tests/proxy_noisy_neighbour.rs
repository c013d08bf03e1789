//! The first outage's cause: one customer's spike hurting every customer.
//! The real binary, two tenants on the same memcached (so on the same
//! backend connections): tenant A floods — many connections, pipelined,
//! large values, ten times and more its budget — while tenant B runs a
//! steady load. B must see no error and keep its rate; its latency is
//! measured beside a calm run of the same load in the same test, and both
//! are printed. Only a generous bound is asserted: the two runs share two
//! cores with the flood, the proxy and memcached.

mod common;
mod tenant_common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Client, Memcached};
use tenant_common::{GuardProcess, hash, text_auth};

/// A's budget: requests a second (one second of burst), and bytes.
const A_RATE: u64 = 1_000;
const A_BYTES: u64 = 16 * 1024 * 1024;
/// A's values.
const A_VALUE: usize = 16 * 1024;
/// A's connections, each with this many requests in flight.
const A_CONNECTIONS: usize = 8;
const A_DEPTH: usize = 32;
/// A offers this many times its budget.
const A_OFFER: u64 = 10;
/// B's steady load: requests a second over its connections.
const B_RATE: u64 = 400;
const B_CONNECTIONS: usize = 4;
/// How long each run measures.
const RUN: Duration = Duration::from_secs(3);

fn config(hashes: &[String; 2]) -> String {
    format!(
        r#"
[[tenant]]
name = "a"
max_requests_per_sec = {A_RATE}
max_bytes_per_sec = {A_BYTES}
credentials = [{{ username = "a", password_hash = "{}" }}]

[[tenant]]
name = "b"
credentials = [{{ username = "b", password_hash = "{}" }}]
"#,
        hashes[0], hashes[1],
    )
}

/// What B saw in one run.
#[derive(Debug)]
struct Steady {
    latencies: Vec<Duration>,
    errors: u64,
    rate: f64,
}

impl Steady {
    fn quantile(&self, q: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort_unstable();
        l[((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1]
    }
}

/// B's load: each connection a get or a set of a small value, one at a
/// time, paced to its share of [`B_RATE`], for [`RUN`].
fn steady(guard: &GuardProcess) -> Steady {
    let handles: Vec<_> = (0..B_CONNECTIONS)
        .map(|n| {
            let mut c = guard.text_client("b", "b-pw");
            std::thread::spawn(move || {
                let every = Duration::from_secs_f64(B_CONNECTIONS as f64 / B_RATE as f64);
                let (mut lat, mut errors) = (Vec::new(), 0);
                let start = Instant::now();
                let mut next = start;
                let mut i = 0u64;
                while start.elapsed() < RUN {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep(next - now);
                    }
                    next += every;
                    let key = format!("b{n}-{}", i % 100);
                    let t = Instant::now();
                    if i.is_multiple_of(5) {
                        c.send(format!("set {key} 0 0 5\r\nhello\r\n").as_bytes());
                        let line = c.read_line();
                        errors += u64::from(line != "STORED");
                    } else {
                        c.send(format!("get {key}\r\n").as_bytes());
                        let line = c.read_line();
                        if line.starts_with("VALUE") {
                            c.read_line();
                            assert_eq!(c.read_line(), "END");
                        } else {
                            errors += u64::from(line != "END");
                        }
                    }
                    lat.push(t.elapsed());
                    i += 1;
                }
                (lat, errors, start.elapsed())
            })
        })
        .collect();
    let mut s = Steady {
        latencies: Vec::new(),
        errors: 0,
        rate: 0.0,
    };
    for h in handles {
        let (lat, errors, took) = h.join().unwrap();
        s.rate += lat.len() as f64 / took.as_secs_f64();
        s.latencies.extend(lat);
        s.errors += errors;
    }
    s
}

/// A's flood: pipelined sets of large values on many connections,
/// [`A_OFFER`] times its budget in all, until `stop`; counts what was
/// stored and what was refused.
fn flood(
    guard: &GuardProcess,
    stop: Arc<AtomicBool>,
) -> (Vec<std::thread::JoinHandle<()>>, Arc<[AtomicU64; 2]>) {
    let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let handles = (0..A_CONNECTIONS)
        .map(|n| {
            let mut c = Client::connect(guard.addr);
            assert_eq!(text_auth(&mut c, "a", "a-pw"), "STORED");
            let (stop, counts) = (stop.clone(), counts.clone());
            std::thread::spawn(move || {
                let mut stream: TcpStream = c.stream;
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let value = vec![b'x'; A_VALUE];
                let deadline = Instant::now() + Duration::from_secs(30);
                let every = Duration::from_secs_f64(
                    (A_DEPTH * A_CONNECTIONS) as f64 / (A_RATE * A_OFFER) as f64,
                );
                let mut next = Instant::now();
                let mut buf = Vec::new();
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep(next - now);
                    }
                    next += every;
                    let mut out = Vec::with_capacity(A_DEPTH * (A_VALUE + 64));
                    for i in 0..A_DEPTH {
                        out.extend_from_slice(format!("set a{n}-{i} 0 0 {A_VALUE}\r\n").as_bytes());
                        out.extend_from_slice(&value);
                        out.extend_from_slice(b"\r\n");
                    }
                    stream.write_all(&out).unwrap();
                    let mut lines = 0;
                    while lines < A_DEPTH {
                        match buf.windows(2).position(|w| w == b"\r\n") {
                            Some(at) => {
                                let stored = buf.starts_with(b"STORED");
                                let refused = buf.starts_with(b"SERVER_ERROR tenant over budget");
                                assert!(
                                    stored || refused,
                                    "{:?}",
                                    String::from_utf8_lossy(&buf[..at])
                                );
                                counts[usize::from(refused)].fetch_add(1, Ordering::Relaxed);
                                buf.drain(..at + 2);
                                lines += 1;
                            }
                            None => {
                                let mut chunk = [0u8; 4096];
                                let n = stream.read(&mut chunk).expect("a reply");
                                assert!(n > 0, "the flood's connection was closed");
                                buf.extend_from_slice(&chunk[..n]);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    (handles, counts)
}

#[test]
fn a_flooding_tenant_costs_another_no_error_and_no_rate() {
    let mc = Memcached::start();
    let hashes = [hash("a-pw"), hash("b-pw")];
    let guard = GuardProcess::start(&mc, "", &config(&hashes));

    let calm = steady(&guard);
    let stop = Arc::new(AtomicBool::new(false));
    let (flooders, counts) = flood(&guard, stop.clone());
    // The flood at full pelt before B starts measuring.
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let before = counts[0].load(Ordering::Relaxed);
    let noisy = steady(&guard);
    let a_stored = counts[0].load(Ordering::Relaxed) - before;
    let a_window = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    let a_refused = counts[1].load(Ordering::Relaxed);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    eprintln!(
        "B calm: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
        calm.rate,
        ms(calm.quantile(0.5)),
        ms(calm.quantile(0.99)),
        calm.errors
    );
    eprintln!(
        "B beside A's flood: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors; \
         A stored {:.0}/s (budget {A_RATE}/s) and was refused {a_refused} times",
        noisy.rate,
        ms(noisy.quantile(0.5)),
        ms(noisy.quantile(0.99)),
        noisy.errors,
        a_stored as f64 / a_window.as_secs_f64(),
    );
    // A was flooding: held to its budget, far more refused than served.
    assert!(
        a_refused > 10 * A_RATE,
        "A was not refused enough to be a flood: {a_refused}"
    );
    let a_rate = a_stored as f64 / a_window.as_secs_f64();
    assert!(a_rate < A_RATE as f64 * 1.5, "A stored {a_rate:.0}/s");
    // B: no error, its rate kept, and its worst latencies well under any
    // client timeout.
    assert_eq!(calm.errors + noisy.errors, 0);
    assert!(
        noisy.rate > B_RATE as f64 * 0.9,
        "B fell to {:.0}/s",
        noisy.rate
    );
    assert!(
        noisy.quantile(0.99) < Duration::from_millis(100),
        "B's p99 beside the flood: {:?}",
        noisy.quantile(0.99)
    );
}
