//! `cargo xtask bench proxy`: the same load, the same backends, the same
//! run, against memcached directly, Debian's nutcracker (twemproxy) and
//! guard. Prints the machine, a Markdown table of ops/s and p50/p99
//! latency for a get-heavy and a set-heavy mix, and the memory each proxy
//! spends per idle client connection. Measures only; asserts nothing.
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

use guard_tests::{ChildGuard, Memcached, net::free_loopback_port};
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

fn wait_accepting(addr: SocketAddr, child: &mut ChildGuard, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("{what} exited during startup: {s}");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "{what} never accepted on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User and system CPU time `pid` has used, all threads.
fn cpu_split(pid: u32) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let at = |i: usize| Duration::from_nanos(f.get(i).copied().unwrap_or(0) * 1_000_000_000 / hz);
    (at(11), at(12))
}

/// User plus system CPU time `pid` has used, all threads.
fn cpu_time(pid: u32) -> Duration {
    let (user, sys) = cpu_split(pid);
    user + sys
}

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

fn guard_bin() -> PathBuf {
    std::env::var_os("GUARD_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/guard"),
        PathBuf::from,
    )
}

fn main() {
    // Children (memcached, the proxies) inherit it.
    guard::descriptors::raise_soft_limit().expect("descriptor limit");
    let tmp = std::env::temp_dir().join(format!("guard-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();

    let backends: Vec<Memcached> = (0..BACKENDS)
        .map(|_| {
            let port = free_loopback_port().unwrap();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            // Room for the idle-connection measurement.
            Memcached::start_with(None, addr, &["-c", "8192"]).expect("memcached")
        })
        .collect();
    let backend_addrs: Vec<SocketAddr> = backends.iter().map(Memcached::addr).collect();

    // nutcracker: ketama over md5, the same backends.
    let nut_addr: SocketAddr = format!("127.0.0.1:{}", free_loopback_port().unwrap())
        .parse()
        .unwrap();
    let servers: String = backend_addrs
        .iter()
        .map(|a| format!("    - {a}:1\n"))
        .collect();
    let conf = tmp.join("nutcracker.yml");
    std::fs::write(
        &conf,
        format!(
            "bench:\n  listen: {nut_addr}\n  hash: md5\n  distribution: ketama\n  \
             timeout: 1000\n  auto_eject_hosts: false\n  servers:\n{servers}"
        ),
    )
    .unwrap();
    let mut nutcracker = ChildGuard::spawn(
        Command::new("/usr/sbin/nutcracker")
            .arg("-c")
            .arg(&conf)
            .arg("-o")
            .arg(tmp.join("nutcracker.log"))
            .args(["-a", "127.0.0.1", "-s"])
            .arg(free_loopback_port().unwrap().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("nutcracker (apt-get install nutcracker)")
    .with_grace(Duration::from_secs(1));
    wait_accepting(nut_addr, &mut nutcracker, "nutcracker");

    let guard_addr: SocketAddr = format!("127.0.0.1:{}", free_loopback_port().unwrap())
        .parse()
        .unwrap();
    let mut cmd = Command::new(guard_bin());
    cmd.args(["run", "--listen", &guard_addr.to_string()]);
    for a in &backend_addrs {
        cmd.args(["--backend", &a.to_string()]);
    }
    cmd.args(["--max-connections-per-source", "0"])
        .env("GUARD_PIN_ROOT", tmp.join("pins"))
        .env("GUARD_STATE_ROOT", tmp.join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut guard = ChildGuard::spawn(&mut cmd)
        .expect("target/release/guard (cargo build --release -p guard)")
        .with_grace(Duration::from_secs(3));
    wait_accepting(guard_addr, &mut guard, "guard");

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
            backends[0].child_pid(),
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
    let backend_pids: Vec<u32> = backends.iter().map(Memcached::child_pid).collect();
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
    drop(backends);
    let _ = std::fs::remove_dir_all(&tmp);
}
