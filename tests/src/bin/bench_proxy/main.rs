//! `cargo xtask bench proxy`: guard beside Debian's nutcracker (twemproxy)
//! and memcached itself (the floor), the same backends, the same load, in
//! the same run, repeated over several runs:
//!
//! - **paced load**: 32 clients together offering one request rate (half
//!   of what the slower proxy can do on this machine, found at the start),
//!   one request at a time and pipelined 16 deep: the CPU each process
//!   spends per request (user + system, from `/proc/PID/stat`), the user
//!   part, and p50/p99 latency;
//! - **connection churn**: connect, one get, close, as fast as the
//!   generator goes: connections per second and CPU per connection;
//! - **idle memory**: 16,000 idle clients on fresh processes, the
//!   resident memory each costs;
//! - once, the **connection burst** of the incident (see `burst`).
//!
//! Each run measures every target in turn, in an order that rotates from
//! run to run; ratios are taken within a run, and the report shows each
//! run's and their range. Prints the report section (Markdown) on stdout
//! and progress on stderr; measures only, asserts nothing.
//!
//! `--quick` is a reduced run (CI); `--runs N` repeats N times (default
//! 5); `--rate R` fixes the offered load at R requests per second;
//! `--charts DIR` writes SVG charts into DIR and links them; `--only
//! load,churn,idle,burst` measures only the parts named (to try a change
//! quickly; a report for `BENCHMARKS.md` measures them all).
//! Everything runs on 127.0.0.1, and every process it starts is killed
//! when it exits, panics included. `GUARD_BIN` overrides the guard binary
//! (default: the workspace's `target/release/guard`).

mod burst;
mod procs;

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use guard_tests::{
    MEMCACHED_BIN, Memcached, accepts, free_port,
    loadgen::{self, ChurnResult, LoadResult, PacedLoad},
    procstat::{cpu_split, rss_kib},
    report::{BarChart, BenchOptions, Samples, Section, Table},
};
use procs::{start_guard, start_nutcracker};

const BACKENDS: usize = 2;
const CONNECTIONS: usize = 32;
/// The pipelined case's depth.
const DEPTH: usize = 16;
/// The share of the slower proxy's closed-loop rate offered to all.
const LOAD_SHARE: f64 = 0.5;
/// Threads making churn connections.
const CHURN_THREADS: usize = 4;
/// Most connections one churn measurement makes.
const CHURN_MAX: u64 = 200_000;
/// memcached's connection limit: room for the idle clients.
const MEMCACHED_MAX_CONNS: usize = 18_000;

/// What one benchmark run covers, full or quick.
struct Plan {
    runs: usize,
    warmup: Duration,
    measure: Duration,
    calibrate: Duration,
    churn: Duration,
    idle_clients: usize,
    burst_clients: usize,
}

impl Plan {
    fn new(o: &BenchOptions) -> Self {
        if o.quick {
            Self {
                runs: o.runs.unwrap_or(1),
                warmup: Duration::from_millis(200),
                measure: Duration::from_millis(500),
                calibrate: Duration::from_millis(300),
                churn: Duration::from_millis(300),
                idle_clients: 500,
                burst_clients: 500,
            }
        } else {
            Self {
                runs: o.runs.unwrap_or(5),
                warmup: Duration::from_secs(1),
                measure: Duration::from_secs(4),
                calibrate: Duration::from_secs(2),
                churn: Duration::from_secs(3),
                idle_clients: 16_000,
                burst_clients: 16_000,
            }
        }
    }
}

/// The parts of a run, each on or off (`--only`).
#[derive(Copy, Clone, Debug)]
struct Parts {
    load: bool,
    churn: bool,
    idle: bool,
    burst: bool,
}

impl Parts {
    fn new(o: &BenchOptions) -> Self {
        let Some(only) = o.get("only") else {
            return Self {
                load: true,
                churn: true,
                idle: true,
                burst: true,
            };
        };
        let names: Vec<&str> = only.split(',').map(str::trim).collect();
        for n in &names {
            assert!(
                ["load", "churn", "idle", "burst"].contains(n),
                "--only takes load, churn, idle, burst; not `{n}`"
            );
        }
        Self {
            load: names.contains(&"load"),
            churn: names.contains(&"churn"),
            idle: names.contains(&"idle"),
            burst: names.contains(&"burst"),
        }
    }
}

/// The three targets, in the report's order.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Who {
    Direct,
    Nutcracker,
    Guard,
}

const ALL: [Who; 3] = [Who::Direct, Who::Nutcracker, Who::Guard];

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Direct => "memcached (direct)",
            Who::Nutcracker => "nutcracker",
            Who::Guard => "guard",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// User and system CPU of some processes, summed.
#[derive(Copy, Clone, Debug, Default)]
struct Cpu {
    user: Duration,
    sys: Duration,
}

impl Cpu {
    fn of(pids: &[u32]) -> Self {
        pids.iter().fold(Self::default(), |acc, p| {
            let (user, sys) = cpu_split(*p);
            Self {
                user: acc.user + user,
                sys: acc.sys + sys,
            }
        })
    }

    fn since(self, before: Self) -> Self {
        Self {
            user: self.user.saturating_sub(before.user),
            sys: self.sys.saturating_sub(before.sys),
        }
    }

    /// µs per `n` of the total, and of user space alone.
    fn per(self, n: u64) -> (f64, f64) {
        let n = n.max(1) as f64;
        (
            (self.user + self.sys).as_secs_f64() * 1e6 / n,
            self.user.as_secs_f64() * 1e6 / n,
        )
    }
}

/// One target measured once under one load.
#[derive(Clone, Debug)]
struct LoadRow {
    ops_per_sec: f64,
    p50: f64,
    p99: f64,
    errors: u64,
    /// µs per request: the proxy's total and user CPU (NaN direct), the
    /// backends', the generator's.
    proxy: (f64, f64),
    backends: f64,
    generator: f64,
}

/// One target's connection churn, once.
#[derive(Clone, Debug)]
struct ChurnRow {
    per_sec: f64,
    /// µs per connection: the proxy's total and user CPU (for direct:
    /// memcached's), and the backends' (NaN direct).
    proxy: (f64, f64),
    backends: f64,
    failed: u64,
    first_error: Option<String>,
}

/// One target's idle clients, once.
#[derive(Clone, Debug)]
struct IdleRow {
    before_kib: u64,
    after_kib: u64,
    per_conn_bytes: f64,
    error: Option<String>,
}

/// Everything measured, per case, per target, one entry per run.
#[derive(Default)]
struct Results {
    loads: Vec<(String, [Vec<LoadRow>; 3])>,
    churn: [Vec<ChurnRow>; 3],
    idle: [Vec<IdleRow>; 3],
}

/// The load cases: name, get share, depth.
const CASES: [(&str, u64, usize); 3] = [
    ("90% get / 10% set, one request at a time", 90, 1),
    ("10% get / 90% set, one request at a time", 10, 1),
    ("90% get / 10% set, pipelined 16 deep", 90, DEPTH),
];
/// The cases' names in charts, in the same order.
const CASE_LABELS: [&str; 3] = ["90% get", "90% set", "90% get, 16 deep"];

/// The processes the load goes to.
struct Under {
    backend_pids: Vec<u32>,
    backend_addrs: Vec<SocketAddr>,
    nutcracker: (u32, SocketAddr),
    guard: (u32, SocketAddr),
}

impl Under {
    /// Where `who`'s clients connect, and the pid charged as its proxy.
    fn target(&self, who: Who) -> (Vec<SocketAddr>, Option<u32>) {
        match who {
            Who::Direct => (self.backend_addrs.clone(), None),
            Who::Nutcracker => (vec![self.nutcracker.1], Some(self.nutcracker.0)),
            Who::Guard => (vec![self.guard.1], Some(self.guard.0)),
        }
    }
}

fn measure_load(
    rt: &tokio::runtime::Runtime,
    under: &Under,
    who: Who,
    load: &PacedLoad,
) -> LoadRow {
    let (addrs, proxy) = under.target(who);
    let me = [std::process::id()];
    let proxy_pids: Vec<u32> = proxy.into_iter().collect();
    let mut marks = Vec::new();
    let r: LoadResult = loadgen::paced(rt, &addrs, load, || {
        marks.push((
            Cpu::of(&proxy_pids),
            Cpu::of(&under.backend_pids),
            Cpu::of(&me),
        ));
    });
    let (b, a) = (marks[0], marks[1]);
    let proxy_cpu = a.0.since(b.0).per(r.requests);
    LoadRow {
        ops_per_sec: r.ops_per_sec,
        p50: r.hist.percentile(0.50),
        p99: r.hist.percentile(0.99),
        errors: r.errors,
        proxy: if proxy.is_some() {
            proxy_cpu
        } else {
            (f64::NAN, f64::NAN)
        },
        backends: a.1.since(b.1).per(r.requests).0,
        generator: a.2.since(b.2).per(r.requests).0,
    }
}

fn measure_churn(under: &Under, who: Who, plan: &Plan) -> ChurnRow {
    let (addrs, proxy) = under.target(who);
    // Direct, memcached is the process that serves the connections.
    let served_by: Vec<u32> = proxy.map_or(under.backend_pids.clone(), |p| vec![p]);
    let (before, backends_before) = (Cpu::of(&served_by), Cpu::of(&under.backend_pids));
    let c: ChurnResult = loadgen::churn(&addrs, CHURN_THREADS, plan.churn, CHURN_MAX);
    let (after, backends_after) = (Cpu::of(&served_by), Cpu::of(&under.backend_pids));
    ChurnRow {
        per_sec: c.connections as f64 / c.elapsed.as_secs_f64(),
        proxy: after.since(before).per(c.connections),
        backends: if proxy.is_some() {
            backends_after.since(backends_before).per(c.connections).0
        } else {
            f64::NAN
        },
        failed: c.failed,
        first_error: c.first_error,
    }
}

/// Resident memory of `pid` before and with `count` idle clients.
fn measure_idle(pid: u32, addr: SocketAddr, count: usize) -> IdleRow {
    std::thread::sleep(Duration::from_millis(200));
    let before_kib = rss_kib(pid);
    let conns = loadgen::idle_clients(addr, count);
    std::thread::sleep(Duration::from_millis(300));
    let after_kib = rss_kib(pid);
    let (n, error) = match &conns {
        Ok(c) => (c.len(), None),
        Err(e) => (0, Some(e.clone())),
    };
    drop(conns);
    IdleRow {
        before_kib,
        after_kib,
        per_conn_bytes: if n == 0 {
            f64::NAN
        } else {
            after_kib.saturating_sub(before_kib) as f64 * 1024.0 / n as f64
        },
        error,
    }
}

fn start_memcached() -> Memcached {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    Memcached::start_with(
        Command::new(MEMCACHED_BIN).args(["-c", &MEMCACHED_MAX_CONNS.to_string()]),
        addr,
        accepts,
    )
    .expect("memcached")
}

/// Idle memory on fresh processes, as a reconnect storm finds them.
fn idle_case(tmp: &Path, backend_addrs: &[SocketAddr], who: Who, clients: usize) -> IdleRow {
    eprintln!("bench-proxy: {clients} idle clients on {}", who.name());
    match who {
        Who::Direct => {
            let mc = start_memcached();
            measure_idle(mc.pid(), mc.addr(), clients)
        }
        Who::Nutcracker => {
            let (n, addr) = start_nutcracker(tmp, "nutcracker-idle", backend_addrs, "");
            measure_idle(n.pid(), addr, clients)
        }
        Who::Guard => {
            let (g, addr) = start_guard(tmp, backend_addrs, &[]);
            measure_idle(g.pid(), addr, clients)
        }
    }
}

/// The offered rate: `--rate`, or a share of the slower proxy's
/// closed-loop rate, one request at a time.
fn offered_rate(
    o: &BenchOptions,
    plan: &Plan,
    rt: &tokio::runtime::Runtime,
    under: &Under,
) -> (f64, Vec<(Who, f64)>) {
    if let Some(r) = o.get("rate") {
        return (r.parse().expect("--rate takes requests per second"), vec![]);
    }
    let closed = PacedLoad {
        connections: CONNECTIONS,
        depth: 1,
        rate: 0.0,
        get_pct: 90,
        warmup: plan.calibrate / 4,
        measure: plan.calibrate,
    };
    let seen: Vec<(Who, f64)> = ALL
        .iter()
        .map(|&who| {
            let (addrs, _) = under.target(who);
            let r = loadgen::paced(rt, &addrs, &closed, || {});
            eprintln!(
                "bench-proxy: {} closed loop: {:.0} ops/s",
                who.name(),
                r.ops_per_sec
            );
            (who, r.ops_per_sec)
        })
        .collect();
    let slower = seen
        .iter()
        .filter(|(w, _)| *w != Who::Direct)
        .map(|(_, r)| *r)
        .fold(f64::INFINITY, f64::min);
    // Round to a figure a reader can reuse with --rate.
    let rate = ((slower * LOAD_SHARE / 1000.0).floor() * 1000.0).max(1000.0);
    (rate, seen)
}

fn main() {
    let opts = BenchOptions::from_args();
    let plan = Plan::new(&opts);
    let parts = Parts::new(&opts);
    // Children (memcached, the proxies) inherit it; the idle clients and
    // the burst need one descriptor per client here and in the target.
    let nofile = guard::descriptors::raise_soft_limit().expect("descriptor limit");
    let tmp = std::env::temp_dir().join(format!("guard-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();

    let mut backends: Vec<Memcached> = (0..BACKENDS).map(|_| start_memcached()).collect();
    let backend_addrs: Vec<SocketAddr> = backends.iter().map(Memcached::addr).collect();
    // nutcracker: ketama over md5, the same backends.
    let (nutcracker, nut_addr) =
        start_nutcracker(&tmp, "nutcracker", &backend_addrs, "  timeout: 1000\n");
    let (guard, guard_addr) = start_guard(&tmp, &backend_addrs, &[]);
    for a in &backend_addrs {
        loadgen::store_all(*a);
    }
    loadgen::store_all(nut_addr);
    loadgen::store_all(guard_addr);
    let under = Under {
        backend_pids: backends.iter().map(Memcached::pid).collect(),
        backend_addrs: backend_addrs.clone(),
        nutcracker: (nutcracker.pid(), nut_addr),
        guard: (guard.pid(), guard_addr),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let (rate, closed_loop) = offered_rate(&opts, &plan, &rt, &under);
    eprintln!("bench-proxy: offering {rate:.0} requests/s to each target");
    let idle_clients = plan.idle_clients.min(nofile.saturating_sub(1_024) as usize);
    let mut res = Results {
        loads: CASES
            .iter()
            .map(|(name, _, _)| (name.to_string(), Default::default()))
            .collect(),
        ..Default::default()
    };
    for run in 0..plan.runs {
        // Rotated, so no target always goes first (or last).
        let order: Vec<Who> = (0..3).map(|i| ALL[(run + i) % 3]).collect();
        eprintln!("bench-proxy: run {} of {}", run + 1, plan.runs);
        for (c, (name, get_pct, depth)) in CASES.iter().enumerate().filter(|_| parts.load) {
            let load = PacedLoad {
                connections: CONNECTIONS,
                depth: *depth,
                rate,
                get_pct: *get_pct,
                warmup: plan.warmup,
                measure: plan.measure,
            };
            for &who in &order {
                let row = measure_load(&rt, &under, who, &load);
                eprintln!(
                    "bench-proxy: {} ({name}): {:.0} ops/s, p99 {} µs, proxy {:.1} µs/req",
                    who.name(),
                    row.ops_per_sec,
                    row.p99,
                    row.proxy.0
                );
                res.loads[c].1[who.index()].push(row);
            }
        }
        for &who in order.iter().filter(|_| parts.churn) {
            let row = measure_churn(&under, who, &plan);
            eprintln!(
                "bench-proxy: churn on {}: {:.0} connections/s, {:.1} µs CPU each",
                who.name(),
                row.per_sec,
                row.proxy.0
            );
            res.churn[who.index()].push(row);
        }
        for &who in order.iter().filter(|_| parts.idle) {
            let row = idle_case(&tmp, &backend_addrs, who, idle_clients);
            res.idle[who.index()].push(row);
        }
    }
    drop(guard);
    drop(nutcracker);

    let burst_clients = plan
        .burst_clients
        .min(nofile.saturating_sub(1_024) as usize);
    let burst = parts
        .burst
        .then(|| burst::run(&tmp, &mut backends, burst_clients));

    let mut out = Section::with_charts(opts.get("charts").map(Into::into));
    describe(&mut out, &plan, rate, &closed_loop, idle_clients);
    summary_chart(&mut out, &res);
    if parts.load {
        load_tables(&mut out, &res, rate);
        load_charts(&mut out, &res);
    }
    if parts.churn {
        churn_tables(&mut out, &res);
    }
    if parts.idle {
        idle_tables(&mut out, &res, idle_clients);
    }
    if let Some(burst) = burst {
        out.para(burst.markdown().trim_end());
    }
    print!("{}", out.markdown());

    drop(backends);
    let _ = std::fs::remove_dir_all(&tmp);
}

fn describe(out: &mut Section, plan: &Plan, rate: f64, closed: &[(Who, f64)], idle: usize) {
    out.para(&format!("machine: {}", guard_tests::machine()));
    out.para(&format!(
        "Setup: {BACKENDS} memcached backends (4 threads each), nutcracker 0.5.0 (ketama, md5, \
         one server connection) and guard (ketama, 2 pipelined connections per backend) in \
         front of the same backends; memcached direct is the floor (each client talks to one \
         backend). The load generator (Rust, one thread), the proxies and memcached share this \
         machine's cores, and so does whatever else runs on it: compare figures within a run. \
         {} runs; each run measures every target in turn, in an order that rotates from run to \
         run. CPU is user + system time of the process from `/proc/PID/stat` (10 ms ticks) \
         over the measured window.",
        plan.runs
    ));
    let closed: Vec<String> = closed
        .iter()
        .map(|(w, r)| format!("{} {r:.0} ops/s", w.name()))
        .collect();
    let how = if closed.is_empty() {
        "set with --rate".to_string()
    } else {
        format!(
            "{:.0}% of the slower proxy's closed-loop rate measured at the start ({})",
            LOAD_SHARE * 100.0,
            closed.join(", ")
        )
    };
    out.para(&format!(
        "Offered load: {rate:.0} requests/s from {CONNECTIONS} connections, {} keys, {}-byte \
         values, {:?} warm-up then {:?} measured; {how}. Pipelined: each connection writes \
         {DEPTH} requests at once and reads their replies before the next batch, the same \
         request rate; its latency is the batch's. Churn: {CHURN_THREADS} threads connect, \
         send one get, read the reply and close, for {:?} per target. Idle: {idle} clients, \
         each after one get, on fresh processes.",
        loadgen::KEYS,
        loadgen::VALUE_LEN,
        plan.warmup,
        plan.measure,
        plan.churn,
    ));
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

/// Each run's guard ÷ nutcracker of `f`, over paired runs.
fn ratios<T>(g: &[T], n: &[T], f: impl Fn(&T) -> f64) -> Samples {
    let mut s = Samples::default();
    for (g, n) in g.iter().zip(n) {
        s.push(ratio(f(g), f(n)));
    }
    s
}

/// One chart of every guard ÷ nutcracker ratio the targets are about.
fn summary_chart(out: &mut Section, res: &Results) {
    let (g, n) = (Who::Guard.index(), Who::Nutcracker.index());
    let mut c = BarChart::new(
        "guard ÷ nutcracker, each run (below 1: guard spends less)",
        "ratio",
        ["CPU per request", "user CPU per request", "p99 latency"],
    );
    for ((_, rows), label) in res.loads.iter().zip(CASE_LABELS) {
        c.group(
            label,
            vec![
                ratios(&rows[g], &rows[n], |r| r.proxy.0),
                ratios(&rows[g], &rows[n], |r| r.proxy.1),
                ratios(&rows[g], &rows[n], |r| r.p99),
            ],
        );
    }
    c.group(
        "churn, per connection",
        vec![
            ratios(&res.churn[g], &res.churn[n], |r| r.proxy.0),
            ratios(&res.churn[g], &res.churn[n], |r| r.proxy.1),
            Samples::default(),
        ],
    );
    c.reference(1.0, "parity");
    out.chart("proxy-ratios", &c);
}

/// The proxies' CPU per request and every target's p99, per case.
fn load_charts(out: &mut Section, res: &Results) {
    let mut cpu = BarChart::new(
        "Proxy CPU per request (user + system, and user alone)",
        "µs per request",
        ["nutcracker", "nutcracker user", "guard", "guard user"],
    );
    let mut p99 = BarChart::new(
        "p99 latency at the same offered load",
        "µs",
        ALL.map(Who::name),
    );
    for ((_, rows), label) in res.loads.iter().zip(CASE_LABELS) {
        let s = |who: Who, f: fn(&LoadRow) -> f64| {
            Samples(
                rows[who.index()]
                    .iter()
                    .map(f)
                    .filter(|v| !v.is_nan())
                    .collect(),
            )
        };
        cpu.group(
            label,
            vec![
                s(Who::Nutcracker, |r| r.proxy.0),
                s(Who::Nutcracker, |r| r.proxy.1),
                s(Who::Guard, |r| r.proxy.0),
                s(Who::Guard, |r| r.proxy.1),
            ],
        );
        p99.group(label, ALL.map(|who| s(who, |r| r.p99)).to_vec());
    }
    out.chart("proxy-cpu-per-request", &cpu);
    out.chart("proxy-p99", &p99);
}

fn load_tables(out: &mut Section, res: &Results, rate: f64) {
    for (name, rows) in &res.loads {
        out.heading(3, &format!("Paced load: {name}"));
        let mut t = Table::new([
            "target",
            "ops/s",
            "p50 µs",
            "p99 µs",
            "proxy CPU µs/req",
            "of which user",
            "memcached CPU µs/req",
            "generator CPU µs/req",
            "errors",
        ]);
        for who in ALL {
            let r = &rows[who.index()];
            let s =
                |f: fn(&LoadRow) -> f64| Samples(r.iter().map(f).filter(|v| !v.is_nan()).collect());
            t.row([
                who.name().to_string(),
                s(|r| r.ops_per_sec).range(0, ""),
                s(|r| r.p50).range(0, ""),
                s(|r| r.p99).range(0, ""),
                s(|r| r.proxy.0).range(1, ""),
                s(|r| r.proxy.1).range(1, ""),
                s(|r| r.backends).range(1, ""),
                s(|r| r.generator).range(1, ""),
                r.iter().map(|r| r.errors).sum::<u64>().to_string(),
            ]);
        }
        out.table(&t);
        let (g, n) = (&rows[Who::Guard.index()], &rows[Who::Nutcracker.index()]);
        let mut cpu = Samples::default();
        let mut user = Samples::default();
        let mut p99 = Samples::default();
        for (g, n) in g.iter().zip(n) {
            cpu.push(ratio(g.proxy.0, n.proxy.0));
            user.push(ratio(g.proxy.1, n.proxy.1));
            p99.push(ratio(g.p99, n.p99));
        }
        let mut t = Table::new(["guard ÷ nutcracker, same run", "each run", "range"]);
        t.row([
            "CPU per request (target ≤ 0.75)".to_string(),
            cpu.each(2),
            cpu.range(2, "×"),
        ]);
        t.row([
            "user CPU per request (target ≤ 1)".to_string(),
            user.each(2),
            user.range(2, "×"),
        ]);
        t.row([
            "p99 latency (target ≤ 1)".to_string(),
            p99.each(2),
            p99.range(2, "×"),
        ]);
        out.table(&t);
        let kept_up = g.iter().chain(n).all(|r| r.ops_per_sec >= rate * 0.95);
        if !kept_up {
            out.para(
                "NOTE: a proxy answered less than 95% of the offered rate in some run: its \
                 figures there are for the load it could take, not the offered one.",
            );
        }
    }
}

fn churn_tables(out: &mut Section, res: &Results) {
    out.heading(3, "Connection churn: connect, one get, close");
    let mut t = Table::new([
        "target",
        "connections/s",
        "CPU µs per connection",
        "of which user",
        "memcached CPU µs per connection",
        "failed",
    ]);
    for who in ALL {
        let r = &res.churn[who.index()];
        let s =
            |f: fn(&ChurnRow) -> f64| Samples(r.iter().map(f).filter(|v| !v.is_nan()).collect());
        let failed: u64 = r.iter().map(|r| r.failed).sum();
        let first = r.iter().find_map(|r| r.first_error.clone());
        t.row([
            who.name().to_string(),
            s(|r| r.per_sec).range(0, ""),
            s(|r| r.proxy.0).range(1, ""),
            s(|r| r.proxy.1).range(1, ""),
            s(|r| r.backends).range(1, ""),
            match first {
                Some(e) if failed > 0 => format!("{failed} ({e})"),
                _ => failed.to_string(),
            },
        ]);
    }
    out.table(&t);
    out.para(
        "CPU per connection is the serving process's: the proxy's, or for direct memcached's \
         (both backends); the memcached column is what the backends spent behind a proxy.",
    );
    let (g, n) = (
        &res.churn[Who::Guard.index()],
        &res.churn[Who::Nutcracker.index()],
    );
    let mut cpu = Samples::default();
    let mut rate = Samples::default();
    for (g, n) in g.iter().zip(n) {
        cpu.push(ratio(g.proxy.0, n.proxy.0));
        rate.push(ratio(g.per_sec, n.per_sec));
    }
    let mut t = Table::new(["guard ÷ nutcracker, same run", "each run", "range"]);
    t.row([
        "CPU per connection (target ≤ 1)".to_string(),
        cpu.each(2),
        cpu.range(2, "×"),
    ]);
    t.row([
        "connections per second".to_string(),
        rate.each(2),
        rate.range(2, "×"),
    ]);
    out.table(&t);
    let mut c = BarChart::new(
        "Connection churn: CPU of the serving process per connection",
        "µs per connection",
        ALL.map(Who::name),
    );
    let each = |f: fn(&ChurnRow) -> f64| -> Vec<Samples> {
        ALL.map(|who| Samples(res.churn[who.index()].iter().map(f).collect()))
            .to_vec()
    };
    c.group("user + system", each(|r| r.proxy.0));
    c.group("user", each(|r| r.proxy.1));
    out.chart("proxy-churn", &c);
}

fn idle_tables(out: &mut Section, res: &Results, clients: usize) {
    out.heading(3, &format!("Memory per idle connection, {clients} clients"));
    let mut t = Table::new([
        "process",
        "VmRSS before",
        &format!("VmRSS with {clients} idle clients"),
        "per idle client (bytes)",
    ]);
    for who in ALL {
        let r = &res.idle[who.index()];
        let s = |f: fn(&IdleRow) -> f64| Samples(r.iter().map(f).filter(|v| !v.is_nan()).collect());
        let mut per = s(|r| r.per_conn_bytes).range(0, "");
        if let Some(e) = r.iter().find_map(|r| r.error.clone()) {
            per = format!("{per} (failed: {e})");
        }
        let name = if who == Who::Direct {
            "memcached (one backend)"
        } else {
            who.name()
        };
        t.row([
            name.to_string(),
            s(|r| r.before_kib as f64).range(0, " KiB"),
            s(|r| r.after_kib as f64).range(0, " KiB"),
            per,
        ]);
    }
    out.table(&t);
    out.para(
        "Resident memory only: the kernel's socket buffers are not in it, and are the same \
         for every process. Target for guard: at most 1 KiB (1024 bytes) per idle client.",
    );
    let mut c = BarChart::new(
        &format!("Resident memory per idle connection, {clients} clients"),
        "bytes per connection",
        ALL.map(Who::name),
    );
    c.group(
        "VmRSS delta ÷ clients",
        ALL.map(|who| {
            Samples(
                res.idle[who.index()]
                    .iter()
                    .map(|r| r.per_conn_bytes)
                    .filter(|v| !v.is_nan())
                    .collect(),
            )
        })
        .to_vec(),
    );
    c.reference(1024.0, "guard's target, 1 KiB");
    out.chart("proxy-idle-memory", &c);
}
