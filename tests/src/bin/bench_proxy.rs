//! `cargo xtask bench proxy`: the same load, the same backends, the same
//! run, against memcached directly, Debian's nutcracker (twemproxy) and
//! guard. Prints the machine, a Markdown table of ops/s and p50/p99
//! latency for a get-heavy and a set-heavy mix, the memory each proxy
//! spends per idle client connection, and a connection burst (16,000
//! clients at once, each with a get pending on a stopped backend): how
//! long each proxy takes to accept them all (beside a plain listener that
//! only accepts), what each connection costs it, and how soon it lets go
//! once the clients leave. Measures only; asserts nothing.
//!
//! Everything runs on 127.0.0.1, and every process it starts is killed
//! when it exits, panics included (and by the kernel if it is killed).
//! `GUARD_BIN` overrides the guard binary (default: the workspace's
//! `target/release/guard`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use guard_tests::{
    BurstConfig, ChildGuard, Counters, MEMCACHED_BIN, Memcached, accepts, close_with_reset,
    free_port,
    procstat::{cpu_split, cpu_time, rss_kib},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const BACKENDS: usize = 2;
const CONNECTIONS: usize = 32;
const KEYS: usize = 10_000;
const VALUE_LEN: usize = 100;
const WARMUP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(5);
const IDLE_CONNECTIONS: usize = 2_000;
/// Sequential requests on one connection for the unloaded latency.
const UNLOADED_REQUESTS: usize = 20_000;
/// Upper bound on one unloaded run, whatever the target does.
const UNLOADED_LIMIT: Duration = Duration::from_secs(20);
/// Latency histogram: 1 µs buckets up to this, then one overflow bucket.
const HIST_US: usize = 100_000;
/// Clients in the connection burst: the incident's count, which fits the
/// default ephemeral port range (32768-60999) towards one port.
const BURST_CLIENTS: usize = 16_000;
/// The listen backlog both proxies get for the burst (guard's default).
const BURST_BACKLOG: u32 = 4096;
/// Longest wait for a proxy to accept a whole burst.
const BURST_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for a proxy to close a burst's connections once the
/// clients have left: guard must do it at once; a proxy that holds them
/// until their requests time out is reported as not done.
const BURST_RELEASE_WAIT: Duration = Duration::from_secs(5);

fn key(n: usize) -> String {
    format!("key:{n:05}")
}

/// The next request of the mix into `req` (a get `get_pct`% of the time,
/// else a set of `value`) for a random key; returns whether it is a get.
fn next_request(rng: &mut u64, get_pct: u64, value: &[u8], req: &mut Vec<u8>) -> bool {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let k = key((*rng >> 8) as usize % KEYS);
    let is_get = *rng % 100 < get_pct;
    req.clear();
    if is_get {
        req.extend_from_slice(format!("get {k}\r\n").as_bytes());
    } else {
        req.extend_from_slice(format!("set {k} 0 0 {VALUE_LEN}\r\n").as_bytes());
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
    }
    is_get
}

/// A blocking request/reply: reads until `done` says the reply is whole.
fn blocking_exchange(s: &mut TcpStream, req: &[u8], done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    s.write_all(req).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    while !done(&got) {
        let n = s.read(&mut chunk).expect("reply within the timeout");
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&chunk[..n]);
    }
    got
}

/// Stores every key through `addr`, pipelined in chunks.
fn preload(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let value = vec![b'v'; VALUE_LEN];
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(500) {
        let mut req = Vec::new();
        for &n in chunk {
            req.extend_from_slice(format!("set {} 0 0 {VALUE_LEN}\r\n", key(n)).as_bytes());
            req.extend_from_slice(&value);
            req.extend_from_slice(b"\r\n");
        }
        let want = chunk.len();
        let got = blocking_exchange(&mut s, &req, |b| {
            b.ends_with(b"\r\n") && b.windows(2).filter(|w| *w == b"\r\n").count() >= want
        });
        let stored = got.windows(8).filter(|w| *w == b"STORED\r\n").count();
        assert_eq!(stored, want, "preload through {addr}");
    }
}

/// Per-request latencies in 1 µs buckets.
struct Histogram {
    buckets: Vec<u64>,
    count: u64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: vec![0; HIST_US + 1],
            count: 0,
        }
    }

    fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as usize).min(HIST_US);
        self.buckets[us] += 1;
        self.count += 1;
    }

    fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.count += o.count;
    }

    fn percentile(&self, p: f64) -> String {
        let want = ((self.count as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (us, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return if us == HIST_US {
                    format!(">{HIST_US}")
                } else {
                    us.to_string()
                };
            }
        }
        "-".into()
    }
}

/// Length of the whole reply at the start of `buf`, if it is all there.
fn reply_len(buf: &[u8]) -> Option<usize> {
    let eol = buf.windows(2).position(|w| w == b"\r\n")? + 2;
    if let Some(header) = buf.strip_prefix(b"VALUE ") {
        let line = std::str::from_utf8(&header[..eol - 8]).ok()?;
        let len: usize = line.split(' ').nth(2)?.parse().ok()?;
        let end = eol + len + 2 + 5;
        return (buf.len() >= end).then_some(end);
    }
    Some(eol)
}

struct Outcome {
    hist: Histogram,
    ops: u64,
    errors: u64,
    /// Requests in the warm-up too: the denominator of CPU per request.
    all_ops: u64,
}

/// One closed-loop connection: a request, its whole reply, the next.
async fn connection(
    addr: SocketAddr,
    get_pct: u64,
    seed: u64,
    measure_from: tokio::time::Instant,
    end: tokio::time::Instant,
) -> Outcome {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut rng = seed | 1;
    let value = vec![b'v'; VALUE_LEN];
    let mut req = Vec::with_capacity(256);
    let mut buf = Vec::with_capacity(4096);
    let mut out = Outcome {
        hist: Histogram::new(),
        ops: 0,
        errors: 0,
        all_ops: 0,
    };
    loop {
        let now = tokio::time::Instant::now();
        if now >= end {
            return out;
        }
        let is_get = next_request(&mut rng, get_pct, &value, &mut req);
        let t = Instant::now();
        s.write_all(&req).await.unwrap();
        let len = loop {
            if let Some(n) = reply_len(&buf) {
                break n;
            }
            let n = s.read_buf(&mut buf).await.unwrap();
            assert!(n > 0, "{addr} closed the connection");
        };
        let took = t.elapsed();
        let ok = if is_get {
            buf.starts_with(b"VALUE ") && buf[..len].ends_with(b"\r\nEND\r\n")
        } else {
            &buf[..len] == b"STORED\r\n"
        };
        buf.drain(..len);
        out.all_ops += 1;
        if now >= measure_from {
            out.hist.record(took);
            out.ops += 1;
            if !ok {
                out.errors += 1;
            }
        }
    }
}

struct Row {
    target: &'static str,
    mix: &'static str,
    ops_per_sec: f64,
    p50: String,
    p99: String,
    errors: u64,
    /// CPU µs per request: the proxy (none for direct), memcached (all
    /// backends), the load generator.
    cpu_us: [Option<f64>; 3],
    /// Of the proxy's CPU per request, what the kernel spent.
    proxy_kernel_us: Option<f64>,
    /// p50 and p99 of one connection with one request at a time.
    unloaded: (String, String),
}

struct Load {
    ops_per_sec: f64,
    hist: Histogram,
    errors: u64,
    all_ops: u64,
}

fn load(rt: &tokio::runtime::Runtime, addrs: &[SocketAddr], get_pct: u64) -> Load {
    rt.block_on(async {
        let start = tokio::time::Instant::now();
        let measure_from = start + WARMUP;
        let end = measure_from + MEASURE;
        let tasks: Vec<_> = (0..CONNECTIONS)
            .map(|i| {
                tokio::spawn(connection(
                    addrs[i % addrs.len()],
                    get_pct,
                    0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1),
                    measure_from,
                    end,
                ))
            })
            .collect();
        let mut hist = Histogram::new();
        let (mut ops, mut errors, mut all_ops) = (0, 0, 0);
        for t in tasks {
            let o = t.await.unwrap();
            hist.merge(&o.hist);
            ops += o.ops;
            errors += o.errors;
            all_ops += o.all_ops;
        }
        Load {
            ops_per_sec: ops as f64 / MEASURE.as_secs_f64(),
            hist,
            errors,
            all_ops,
        }
    })
}

/// Latency with nothing queued: one connection, one request at a time, so
/// each request pays only the hops, never another request's turn.
fn unloaded(addr: SocketAddr, get_pct: u64) -> Histogram {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let value = vec![b'v'; VALUE_LEN];
    let mut hist = Histogram::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut buf = Vec::with_capacity(4096);
    let mut req = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + UNLOADED_LIMIT;
    for _ in 0..UNLOADED_REQUESTS {
        if Instant::now() >= deadline {
            break;
        }
        next_request(&mut rng, get_pct, &value, &mut req);
        let t = Instant::now();
        s.write_all(&req).unwrap();
        let len = loop {
            if let Some(n) = reply_len(&buf) {
                break n;
            }
            let n = s.read(&mut chunk).expect("reply within the timeout");
            assert!(n > 0, "{addr} closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        };
        hist.record(t.elapsed());
        buf.drain(..len);
    }
    hist
}

/// VmRSS of `pid` before and after `IDLE_CONNECTIONS` idle clients, each
/// having completed one get so its session is fully set up.
fn idle_memory(pid: u32, addr: SocketAddr) -> (u64, u64) {
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib(pid);
    let mut conns = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        blocking_exchange(&mut s, b"get idle-probe\r\n", |b| b.ends_with(b"END\r\n"));
        conns.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(pid);
    drop(conns);
    (before, after)
}

/// `TcpExtListenOverflows` of this network namespace: SYNs dropped
/// because a listener's accept queue was full.
fn listen_overflows() -> u64 {
    let mut c = Counters::default();
    c.parse_proc_pairs(&std::fs::read_to_string("/proc/net/netstat").unwrap_or_default());
    c.get("TcpExtListenOverflows")
}

/// Descriptors `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Waits up to `limit` until `pid` has `want` descriptors open, or at
/// most `want` with `down`; returns when that was.
fn wait_fds(pid: u32, want: usize, down: bool, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        let n = open_fds(pid);
        if (down && n <= want) || (!down && n >= want) {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        // Listing 16,000 descriptors costs the machine the proxy runs on.
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct BurstRow {
    proxy: &'static str,
    connected: Duration,
    accepted: Option<Duration>,
    retransmitted: usize,
    /// SYNs the kernel dropped for a full accept queue (host-wide).
    overflows: u64,
    failed: usize,
    /// None for the plain listener.
    rss_per_conn_kib: Option<f64>,
    released: Option<Duration>,
    /// Burst connections still open when the wait for their release ended.
    still_open: usize,
}

/// `clients` connect to `addr` at once: the burst, and the listen queue
/// overflows the kernel counted meanwhile.
fn run_burst(addr: SocketAddr, clients: usize) -> (guard_tests::Burst, u64) {
    let config = BurstConfig {
        clients,
        ..BurstConfig::default()
    };
    let overflows_before = listen_overflows();
    let b = guard_tests::burst(None, addr, &config).expect("burst");
    (b, listen_overflows().saturating_sub(overflows_before))
}

/// The same burst against a listener with the same backlog whose thread
/// accepts and closes: what the kernel and the load generator need, with
/// no proxy work at all.
fn burst_on_plain_listener(clients: usize) -> BurstRow {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(BURST_BACKLOG as i32).unwrap();
    let listener: std::net::TcpListener = socket.into();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    // Ends with the process: a blocking accept has no other way out.
    std::thread::spawn(move || {
        for s in listener.incoming() {
            if s.is_ok() {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let (b, overflows) = run_burst(addr, clients);
    let deadline = Instant::now() + BURST_WAIT;
    let mut all_accepted = None;
    while Instant::now() < deadline {
        if accepted.load(std::sync::atomic::Ordering::Relaxed) >= b.streams.len() {
            all_accepted = Some(b.started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("bench-proxy: burst on a plain listener: {}", b.summary());
    let retransmitted = b.slower_than(Duration::from_millis(900));
    for s in b.streams {
        close_with_reset(s);
    }
    BurstRow {
        proxy: "plain listener (accepts and closes)",
        connected: b.elapsed,
        accepted: all_accepted,
        retransmitted,
        overflows,
        failed: b.failed,
        rss_per_conn_kib: None,
        released: None,
        still_open: 0,
    }
}

/// `clients` connect to `addr` at once, each sending a get the stopped
/// backends will not answer: when has `pid` accepted them all, what do
/// they cost it in memory, and how soon after they all leave (half with a
/// reset) has it closed them.
fn burst_on(proxy: &'static str, pid: u32, addr: SocketAddr, clients: usize) -> BurstRow {
    std::thread::sleep(Duration::from_millis(200));
    let (rss_before, fds_before) = (rss_kib(pid), open_fds(pid));
    let (b, overflows) = run_burst(addr, clients);
    let accepted = wait_fds(pid, fds_before + b.streams.len(), false, BURST_WAIT);
    // The gets are read and forwarded by now; the backends hold them.
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = rss_kib(pid);
    eprintln!("bench-proxy: burst on {proxy}: {}", b.summary());
    let row = BurstRow {
        proxy,
        connected: b.elapsed,
        accepted: accepted.map(|t| t - b.started),
        retransmitted: b.slower_than(Duration::from_millis(900)),
        overflows,
        failed: b.failed,
        rss_per_conn_kib: Some(
            rss_after.saturating_sub(rss_before) as f64 / b.streams.len().max(1) as f64,
        ),
        released: None,
        still_open: 0,
    };
    let left = Instant::now();
    for (i, s) in b.streams.into_iter().enumerate() {
        if i % 2 == 0 {
            drop(s);
        } else {
            close_with_reset(s);
        }
    }
    let released = wait_fds(pid, fds_before, true, BURST_RELEASE_WAIT).map(|t| t - left);
    BurstRow {
        released,
        still_open: open_fds(pid).saturating_sub(fds_before),
        ..row
    }
}

/// nutcracker on a free loopback port in front of `backends`, with
/// `extra` lines added to its pool; its files live in `tmp` under `name`.
fn start_nutcracker(
    tmp: &std::path::Path,
    name: &str,
    backends: &[SocketAddr],
    extra: &str,
) -> (ChildGuard, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let servers: String = backends.iter().map(|a| format!("    - {a}:1\n")).collect();
    let conf = tmp.join(format!("{name}.yml"));
    std::fs::write(
        &conf,
        format!(
            "bench:\n  listen: {addr}\n  hash: md5\n  distribution: ketama\n  \
             auto_eject_hosts: false\n{extra}  servers:\n{servers}"
        ),
    )
    .unwrap();
    let mut child = ChildGuard::spawn(
        Command::new("/usr/sbin/nutcracker")
            .arg("-c")
            .arg(&conf)
            .arg("-o")
            .arg(tmp.join(format!("{name}.log")))
            .args(["-a", "127.0.0.1", "-s"])
            .arg(free_port().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("nutcracker (apt-get install nutcracker)")
    .with_grace(Duration::from_secs(1));
    child.wait_accepting(addr).expect("nutcracker");
    (child, addr)
}

/// guard's proxy on a free loopback port in front of `backends`, with
/// `extra` flags.
fn start_guard(
    tmp: &std::path::Path,
    backends: &[SocketAddr],
    extra: &[&str],
) -> (ChildGuard, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(guard_bin());
    cmd.args(["run", "--listen", &addr.to_string()]);
    for a in backends {
        cmd.args(["--backend", &a.to_string()]);
    }
    cmd.args(["--max-connections-per-source", "0"])
        .args(extra)
        .env("GUARD_PIN_ROOT", tmp.join("pins"))
        .env("GUARD_STATE_ROOT", tmp.join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = ChildGuard::spawn(&mut cmd)
        .expect("target/release/guard (cargo build --release -p guard)")
        .with_grace(Duration::from_secs(3));
    child.wait_accepting(addr).expect("guard");
    (child, addr)
}

fn guard_bin() -> PathBuf {
    std::env::var_os("GUARD_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/guard"),
        PathBuf::from,
    )
}

fn main() {
    // Children (memcached, the proxies) inherit it; the burst needs one
    // descriptor per client here and in the proxy.
    let nofile = guard::descriptors::raise_soft_limit().expect("descriptor limit");
    let tmp = std::env::temp_dir().join(format!("guard-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();

    let mut backends: Vec<Memcached> = (0..BACKENDS)
        .map(|_| {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            // Room for the idle-connection measurement.
            Memcached::start_with(
                Command::new(MEMCACHED_BIN).args(["-c", "8192"]),
                addr,
                accepts,
            )
            .expect("memcached")
        })
        .collect();
    let backend_addrs: Vec<SocketAddr> = backends.iter().map(Memcached::addr).collect();

    // nutcracker: ketama over md5, the same backends.
    let (nutcracker, nut_addr) =
        start_nutcracker(&tmp, "nutcracker", &backend_addrs, "  timeout: 1000\n");
    let (guard, guard_addr) = start_guard(&tmp, &backend_addrs, &[]);

    println!("machine: {}", guard_tests::machine());
    println!(
        "load: one Rust load generator (tokio, one thread), {CONNECTIONS} connections, closed \
         loop (one request in flight per connection), {KEYS} keys, {VALUE_LEN}-byte values, \
         {WARMUP:?} warm-up then {MEASURE:?} measured per row; {BACKENDS} memcached backends \
         (default 4 threads each, -c 8192); nutcracker 0.5.0 (ketama, md5, 1 server connection) and \
         guard (ketama, 2 pipelined connections per backend) in front of the same backends. \
         Direct: each connection talks to one backend. NOTE: the load generator, the proxies \
         and memcached all share this machine's cores, so every number includes contention."
    );
    println!();

    // Memory first, on fresh processes.
    let mut memory = Vec::new();
    for (name, pid, addr) in [
        (
            "memcached (one backend)",
            backends[0].pid(),
            backend_addrs[0],
        ),
        ("nutcracker", nutcracker.pid(), nut_addr),
        ("guard", guard.pid(), guard_addr),
    ] {
        eprintln!("bench-proxy: {IDLE_CONNECTIONS} idle clients on {name}");
        let (before, after) = idle_memory(pid, addr);
        memory.push((name, before, after));
    }
    // Let the proxies close the idle connections.
    std::thread::sleep(Duration::from_millis(500));

    for b in &backend_addrs {
        preload(*b);
    }
    preload(nut_addr);
    preload(guard_addr);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let backend_pids: Vec<u32> = backends.iter().map(Memcached::pid).collect();
    let cpu_of = |pids: &[u32]| pids.iter().map(|p| cpu_time(*p)).sum::<Duration>();
    let mut rows = Vec::new();
    for (mix, get_pct) in [("90% get / 10% set", 90), ("10% get / 90% set", 10)] {
        for (target, addrs, proxy) in [
            ("memcached (direct)", backend_addrs.clone(), None),
            ("nutcracker", vec![nut_addr], Some(nutcracker.pid())),
            ("guard", vec![guard_addr], Some(guard.pid())),
        ] {
            let me = std::process::id();
            let before = (proxy.map(cpu_time), cpu_of(&backend_pids), cpu_time(me));
            let sys_before = proxy.map(|p| cpu_split(p).1);
            let l = load(&rt, &addrs, get_pct);
            let after = (proxy.map(cpu_time), cpu_of(&backend_pids), cpu_time(me));
            let sys_after = proxy.map(|p| cpu_split(p).1);
            let per = |d: Duration| Some(d.as_secs_f64() * 1e6 / l.all_ops.max(1) as f64);
            let cpu_us = [
                proxy.and_then(|_| per(after.0?.saturating_sub(before.0?))),
                per(after.1.saturating_sub(before.1)),
                per(after.2.saturating_sub(before.2)),
            ];
            let proxy_kernel_us = per(sys_after
                .unwrap_or_default()
                .saturating_sub(sys_before.unwrap_or_default()))
            .filter(|_| proxy.is_some());
            eprintln!("bench-proxy: {target}, {mix}: {:.0} ops/s", l.ops_per_sec);
            let quiet = unloaded(addrs[0], get_pct);
            rows.push(Row {
                target,
                mix,
                ops_per_sec: l.ops_per_sec,
                p50: l.hist.percentile(0.50),
                p99: l.hist.percentile(0.99),
                errors: l.errors,
                cpu_us,
                proxy_kernel_us,
                unloaded: (quiet.percentile(0.50), quiet.percentile(0.99)),
            });
        }
    }

    let us = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    println!(
        "Under load ({CONNECTIONS} connections), with the CPU each process spent per request:"
    );
    println!();
    println!(
        "| target | mix | ops/s | p50 µs | p99 µs | errors | proxy CPU µs/req | of which \
         kernel | memcached CPU µs/req | generator CPU µs/req |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            r.mix,
            r.ops_per_sec,
            r.p50,
            r.p99,
            r.errors,
            us(r.cpu_us[0]),
            us(r.proxy_kernel_us),
            us(r.cpu_us[1]),
            us(r.cpu_us[2])
        );
    }
    println!();
    println!(
        "Unloaded (one connection, one request at a time, {UNLOADED_REQUESTS} requests; \
         direct goes to one backend):"
    );
    println!();
    println!("| target | mix | p50 µs | p99 µs |");
    println!("|---|---|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} |",
            r.target, r.mix, r.unloaded.0, r.unloaded.1
        );
    }
    println!();
    for mix in ["90% get / 10% set", "10% get / 90% set"] {
        let find = |t: &str| rows.iter().find(|r| r.target == t && r.mix == mix);
        if let (Some(d), Some(n), Some(g)) = (
            find("memcached (direct)"),
            find("nutcracker"),
            find("guard"),
        ) {
            let added = |g: &str, d: &str| match (g.parse::<i64>(), d.parse::<i64>()) {
                (Ok(g), Ok(d)) => format!("{} µs", g - d),
                _ => "-".into(),
            };
            let efficiency = match (n.cpu_us[0], g.cpu_us[0]) {
                (Some(n), Some(g)) if g > 0.0 => format!("{:.2}×", n / g),
                _ => "-".into(),
            };
            println!(
                "{mix}: guard/nutcracker ops/s = {:.2}×; guard p99 {} µs vs nutcracker {} µs; \
                 guard p50 added over direct: {} under load, {} unloaded; nutcracker/guard CPU \
                 per request = {efficiency} (targets: ≥ 1.5× ops/s, no worse p99, ≤ 50 µs)",
                g.ops_per_sec / n.ops_per_sec.max(1.0),
                g.p99,
                n.p99,
                added(&g.p50, &d.p50),
                added(&g.unloaded.0, &d.unloaded.0),
            );
        }
    }
    println!();
    println!(
        "| process | VmRSS before | VmRSS with {IDLE_CONNECTIONS} idle clients | per idle client |"
    );
    println!("|---|---:|---:|---:|");
    for (name, before, after) in memory {
        let per = (after.saturating_sub(before) * 1024) as f64 / IDLE_CONNECTIONS as f64;
        println!(
            "| {name} | {before} KiB | {after} KiB | {:.1} KiB |",
            per / 1024.0
        );
    }

    drop(guard);
    drop(nutcracker);

    // The burst last, on fresh proxies whose requests may wait a minute
    // on backends that stop answering.
    let clients = BURST_CLIENTS.min(nofile.saturating_sub(1_024) as usize);
    let (nutcracker, nut_addr) = start_nutcracker(
        &tmp,
        "nutcracker-burst",
        &backend_addrs,
        &format!("  timeout: 60000\n  backlog: {BURST_BACKLOG}\n"),
    );
    let (guard, guard_addr) = start_guard(
        &tmp,
        &backend_addrs,
        &[
            "--backlog",
            &BURST_BACKLOG.to_string(),
            "--request-timeout-ms",
            "60000",
            // Every get stays pending, as it does in nutcracker, rather
            // than being refused once a backend connection holds 1024.
            "--backend-max-in-flight",
            "1000000",
        ],
    );
    // Each proxy's backend connections are up before the backends stop.
    for addr in [nut_addr, guard_addr] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        blocking_exchange(&mut s, b"get warm-up\r\n", |b| b.ends_with(b"END\r\n"));
    }
    for b in &mut backends {
        b.child().signal(libc::SIGSTOP).expect("stop memcached");
    }
    let mut bursts = Vec::new();
    eprintln!("bench-proxy: a burst of {clients} clients on each proxy");
    bursts.push(burst_on_plain_listener(clients));
    bursts.push(burst_on("nutcracker", nutcracker.pid(), nut_addr, clients));
    drop(nutcracker);
    bursts.push(burst_on("guard", guard.pid(), guard_addr, clients));
    drop(guard);
    for b in &mut backends {
        b.child().signal(libc::SIGCONT).expect("continue memcached");
    }
    let threads = BurstConfig::default().threads;
    println!();
    println!(
        "Connection burst: {clients} clients connecting at once ({threads} niced threads, each \
         connecting again as soon as it is in), each sending one get to backends stopped with \
         SIGSTOP, then all leaving (half with a reset); both proxies listen with a backlog of \
         {BURST_BACKLOG} (nutcracker: `backlog: {BURST_BACKLOG}` in its pool) and wait up to \
         60 s for a backend reply; a plain listener with the same backlog that only accepts \
         and closes shows what the kernel and the load generator need:"
    );
    println!();
    println!(
        "| proxy | all connected | all accepted | connects >= 900 ms | listen queue overflows \
         | failed | VmRSS per connection, get pending | all closed after they left |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let ms = |d: Option<Duration>| {
        d.map_or(format!("> {} s", BURST_WAIT.as_secs()), |d| {
            format!("{:.0} ms", d.as_secs_f64() * 1e3)
        })
    };
    for r in &bursts {
        let released = match (r.rss_per_conn_kib, r.released) {
            (None, _) => "-".into(),
            (_, Some(d)) => format!("{:.0} ms", d.as_secs_f64() * 1e3),
            (_, None) => format!(
                "{} still open after {} s",
                r.still_open,
                BURST_RELEASE_WAIT.as_secs()
            ),
        };
        let rss = r
            .rss_per_conn_kib
            .map_or("-".into(), |k| format!("{k:.1} KiB"));
        println!(
            "| {} | {:.0} ms | {} | {} | {} | {} | {rss} | {released} |",
            r.proxy,
            r.connected.as_secs_f64() * 1e3,
            ms(r.accepted),
            r.retransmitted,
            r.overflows,
            r.failed,
        );
    }
    if clients < BURST_CLIENTS {
        println!();
        println!(
            "NOTE: {clients} clients, not {BURST_CLIENTS}: the descriptor limit ({nofile}) \
             holds no more; raise it (ulimit -Hn) for the full burst."
        );
    }

    drop(backends);
    let _ = std::fs::remove_dir_all(&tmp);
}
