//! `cargo xtask bench xdp`: nanoseconds per frame through the guard, beside
//! an empty `XDP_PASS` program measured in the same run, with
//! `BPF_PROG_TEST_RUN`; then live SYN floods (one source, and spoofed
//! random sources) through the real daemon on a veth pair, beside the same
//! floods with no filter. Prints the machine, then Markdown tables;
//! `--charts DIR` also draws them as SVG into DIR and links them;
//! `--quick` is a reduced run (CI) that only shows it still works;
//! `--runs N` takes each figure's median over N rounds (default 9).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use guard_common::{
    CONFIG_SYN_COOKIES, DEFAULT_TENANT, FLOOR_CAS, FLOOR_CLOCK, FLOOR_COARSE_CLOCK, FLOOR_LOOKUP,
    GuardConfig, PROGRAM_FLOOR, PROGRAM_GUARD, PROGRAM_PASS, RateLimit,
};
use guard_tests::{
    SourceAddr, SynFlood, Topology,
    daemon::GuardDaemon,
    frames::{ETHERTYPE_IPV4, Ethernet, Ipv4, Tcp, proto, tcp_flags},
    listen_in,
    procstat::cpu_time,
    report::{BarChart, BenchOptions, Samples, Section},
    xdp::{XdpUnderTest, verdict},
};

/// How much one run measures, full or quick.
struct Plan {
    /// `BPF_PROG_TEST_RUN` repeats per measurement.
    repeat: u32,
    /// Measurements per figure (odd by default: the median is one of
    /// them).
    rounds: usize,
    /// Most SYNs one live flood sends, and its longest time.
    live_flood: u64,
    live_seconds: u64,
    /// Runs of the ratio comparison, each reported on its own line.
    ratio_runs: usize,
}

impl Plan {
    fn new(o: &BenchOptions) -> Self {
        if o.quick {
            Self {
                repeat: 100_000,
                rounds: o.runs.unwrap_or(3),
                live_flood: 200_000,
                live_seconds: 1,
                ratio_runs: 1,
            }
        } else {
            Self {
                repeat: 2_000_000,
                rounds: o.runs.unwrap_or(9),
                live_flood: 3_000_000,
                live_seconds: 5,
                ratio_runs: 7,
            }
        }
    }
}

/// Timed single runs per case in each ratio run: enough for a stable
/// median of whole-nanosecond durations.
const SINGLES: usize = 5_000;

fn frame(src: Ipv4Addr, protocol: u8, l4: Vec<u8>) -> Vec<u8> {
    let dst = Ipv4Addr::new(203, 0, 113, 1);
    Ethernet::new([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], ETHERTYPE_IPV4)
        .build(&Ipv4::new(src, dst, protocol).build(&l4))
}

fn tcp(src: Ipv4Addr, syn: bool) -> Vec<u8> {
    let dst: IpAddr = Ipv4Addr::new(203, 0, 113, 1).into();
    let seg = if syn {
        Tcp::syn(40000, 11211, 1)
    } else {
        Tcp::new(40000, 11211, tcp_flags::ACK | tcp_flags::PSH)
    }
    .build(src.into(), dst, b"get k\r\n");
    frame(src, proto::TCP, seg)
}

/// The median of whole-ns figures.
fn median_of(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The `plan.rounds` figures (ns per frame) of `run` and of the empty
/// program on the same frame, interleaved so both see the same machine.
fn beside_empty(
    plan: &Plan,
    x: &mut XdpUnderTest,
    frame: &[u8],
    mut run: impl FnMut(&mut XdpUnderTest) -> u64,
) -> (Samples, Samples) {
    let (mut measured, mut empty) = (Samples::default(), Samples::default());
    for _ in 0..plan.rounds {
        measured.push(run(x) as f64);
        empty.push(x.run_program(PROGRAM_PASS, frame, plan.repeat).1 as f64);
    }
    (measured, empty)
}

/// The median of an odd number of whole-ns figures.
fn median(s: &Samples) -> u64 {
    s.summary().map_or(0, |(_, m, _)| m as u64)
}

fn main() {
    let opts = BenchOptions::from_args();
    let plan = Plan::new(&opts);
    let (repeat, rounds) = (plan.repeat, plan.rounds);
    let mut charts = Section::with_charts(opts.get("charts").map(Into::into));
    let mut x = XdpUnderTest::protecting(11211);
    // Limits high enough never to drop, so every bucket is charged.
    let huge = RateLimit::per_second(1_000_000_000, 1_000_000_000);
    x.maps
        .set_config(&GuardConfig {
            source: huge,
            global: huge,
            // The daemon's default event budget.
            events: RateLimit::per_second(200, 400),
            ipv6_prefix_len: 64,
            flags: 0,
        })
        .unwrap();
    x.maps
        .sync_tenant_limits(&[(DEFAULT_TENANT, huge)])
        .unwrap();

    let admitted = tcp(Ipv4Addr::new(198, 51, 100, 1), true);
    let dropped = tcp(Ipv4Addr::new(198, 51, 100, 2), true);
    let non_syn = tcp(Ipv4Addr::new(198, 51, 100, 3), false);
    let non_tcp = frame(
        Ipv4Addr::new(198, 51, 100, 4),
        proto::ICMP,
        vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0],
    );
    let cases: [(&str, &[u8], u32); 4] = [
        ("SYN, charged and passed", &admitted, verdict::PASS),
        ("SYN, dropped by its bucket", &dropped, verdict::DROP),
        ("non-SYN TCP", &non_syn, verdict::PASS),
        ("non-TCP (ICMP)", &non_tcp, verdict::PASS),
    ];

    println!("machine: {}", guard_tests::machine());
    println!(
        "method: BPF_PROG_TEST_RUN, {repeat} repeats per run, median of {rounds} runs, \
         guard and an empty XDP_PASS program interleaved in the same rounds\n"
    );
    println!("| frame | guard ns/frame | empty ns/frame | ratio |");
    println!("|---|---:|---:|---:|");
    let mut frames = BarChart::new(
        &format!("ns per frame, BPF_PROG_TEST_RUN, each of {rounds} rounds"),
        "ns per frame",
        ["guard", "empty program"],
    );
    let short = ["SYN passed", "SYN dropped", "non-SYN TCP", "ICMP"];
    for ((name, frame, want), label) in cases.into_iter().zip(short) {
        let (g, e) = beside_empty(&plan, &mut x, frame, |x| {
            // The dropped case needs the 1/s source limit; the others must
            // not be limited at all.
            let mut cfg = x.maps.config().unwrap();
            cfg.source = if want == verdict::DROP {
                RateLimit::per_second(1, 1)
            } else {
                huge
            };
            x.maps.set_config(&cfg).unwrap();
            let (v, ns) = x.run_program(PROGRAM_GUARD, frame, repeat);
            // The first run of a round may admit one refilled SYN; the
            // verdict reported is the last run's.
            assert_eq!(v, want, "{name}: unexpected verdict");
            ns
        });
        frames.group(label, vec![g.clone(), e.clone()]);
        let (g, e) = (median(&g), median(&e));
        println!(
            "| {name} | {g} | {e} | {:.2}× |",
            g as f64 / e.max(1) as f64
        );
    }
    let (g, e) = cookie_cost(&mut x, &dropped);
    println!(
        "| SYN answered with a SYN cookie (single runs) | {g} | {e} | {:.2}× |",
        g as f64 / e.max(1) as f64
    );

    // What any limiter built on these maps pays per judged SYN on this
    // machine, whatever its parsing and bookkeeping: the floor under the
    // charged-SYN row above.
    println!();
    println!("| irreducible step (guard_floor) | ns/frame | empty ns/frame | above empty |");
    println!("|---|---:|---:|---:|");
    let mut floor = BarChart::new(
        &format!("guard_floor: each step alone, each of {rounds} rounds"),
        "ns per frame",
        ["step", "empty program"],
    );
    let short = [
        "clock",
        "coarse clock",
        "LRU lookup",
        "lookup + CAS",
        "clock + lookup + CAS",
        "coarse + lookup + CAS",
    ];
    for ((name, steps), label) in [
        ("clock read (bpf_ktime_get_ns)", FLOOR_CLOCK),
        (
            "tick-grained clock read (bpf_ktime_get_coarse_ns)",
            FLOOR_COARSE_CLOCK,
        ),
        ("per-source LRU lookup", FLOOR_LOOKUP),
        ("LRU lookup + compare-and-swap", FLOOR_CAS),
        (
            "clock + LRU lookup + compare-and-swap",
            FLOOR_CLOCK | FLOOR_CAS,
        ),
        (
            "tick-grained clock + LRU lookup + compare-and-swap",
            FLOOR_COARSE_CLOCK | FLOOR_CAS,
        ),
    ]
    .into_iter()
    .zip(short)
    {
        let mut frame = admitted.clone();
        frame[0] = steps;
        let (f, e) = beside_empty(&plan, &mut x, &frame, |x| {
            x.run_program(PROGRAM_FLOOR, &frame, repeat).1
        });
        floor.group(label, vec![f.clone(), e.clone()]);
        let (f, e) = (median(&f), median(&e));
        println!("| {name} | {f} | {e} | +{} |", f.saturating_sub(e));
    }
    println!();
    charts.chart("xdp-frames", &frames);
    charts.chart("xdp-floor", &floor);
    print!("{}", charts.markdown());

    ratio_runs(&plan, &mut x, &admitted, &non_syn);
    // `cargo xtask bench flood` measures live floods against references;
    // these are guard's own figures (XDP time per SYN, events, cookies).
    if !std::env::args().any(|a| a == "--no-live") {
        live_floods(&plan);
    }
}

/// Single runs per program for [`cookie_cost`].
const SINGLE_RUNS: usize = 20_001;

/// Medians of single runs of the guard answering `syn` with a cookie (the
/// host budget spent, cookies on) and of the empty program. A repeated run
/// would see the SYN-ACK the first one left, so each is a run of its own,
/// and the empty program's single runs carry the same timer overhead.
fn cookie_cost(x: &mut XdpUnderTest, syn: &[u8]) -> (u64, u64) {
    let mut cfg = x.maps.config().unwrap();
    cfg.source = RateLimit::UNLIMITED;
    cfg.global = RateLimit::per_second(1, 1);
    cfg.flags |= CONFIG_SYN_COOKIES;
    x.maps.set_config(&cfg).unwrap();
    // The token, then the listener's refresh.
    x.run(syn);
    x.run(syn);
    let (mut measured, mut empty) = (Vec::new(), Vec::new());
    for _ in 0..SINGLE_RUNS {
        let (v, ns) = x.run_program(PROGRAM_GUARD, syn, 1);
        assert_eq!(v, verdict::TX, "the SYN is answered with a cookie");
        measured.push(ns as f64);
        empty.push(x.run_program(PROGRAM_PASS, syn, 1).1 as f64);
    }
    cfg.flags &= !CONFIG_SYN_COOKIES;
    cfg.global = RateLimit::UNLIMITED;
    x.maps.set_config(&cfg).unwrap();
    (median(&Samples(measured)), median(&Samples(empty)))
}

/// Frames per live flood, and the longest it may run.
const LIVE_PORT: u16 = 11211;

/// What one live flood cost.
struct LiveRun {
    sent: u64,
    pps: f64,
    /// XDP program time per frame it ran on (`kernel.bpf_stats_enabled`).
    xdp_ns: Option<f64>,
    /// Host-wide softirq time per SYN sent (`/proc/stat`).
    softirq_ns: f64,
    /// Daemon CPU time per second of flood.
    daemon_ms_per_s: Option<f64>,
    /// Lines the daemon logged during the flood.
    log_lines: Option<usize>,
    /// SYNs guard's budgets refused.
    dropped: Option<u64>,
    /// Of those, answered with a SYN cookie.
    cookies: Option<u64>,
}

/// Host-wide softirq time, from the first line of `/proc/stat`.
fn softirq_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let first = stat.lines().next().unwrap_or_default();
    // cpu user nice system idle iowait irq softirq …
    let jiffies: u64 = first
        .split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(jiffies * 1_000_000_000 / hz)
}

/// (run time, run count) of a loaded program.
fn prog_stats(id: u32) -> Option<(Duration, u64)> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .map(|p| (p.run_time(), p.run_count()))
}

/// One flood against a fresh topology whose server listens on
/// [`LIVE_PORT`] with kernel SYN cookies on, through guard (its defaults,
/// driver mode, SYN cookies as `cookies` says) or, with `None`, through
/// nothing at all. With cookies, the client's end of the veth runs an empty
/// XDP program, without which the SYN-ACKs XDP sends back in driver mode
/// would be dropped at the veth rather than delivered.
fn live_run(
    plan: &Plan,
    source: impl Fn(&Topology) -> SourceAddr,
    cookies: Option<&str>,
) -> LiveRun {
    let topo = Topology::new().expect("topology");
    let server: SocketAddr = (IpAddr::V4(topo.server_v4()), LIVE_PORT).into();
    let _listener = listen_in(&topo.server, server, 4096).expect("listen");
    let _peer = cookies.filter(|c| *c != "off").map(|_| {
        let mut peer = XdpUnderTest::load();
        peer.attach_pass(&topo.client, &topo.client_if().ifname)
            .expect("XDP_PASS on the client's veth");
        peer
    });
    let guard = cookies.map(|cookies| {
        GuardDaemon::start(
            &topo.server,
            &[
                "--iface",
                &topo.server_if().ifname,
                "--xdp-mode",
                "drv",
                "--protect",
                &format!("*:{LIVE_PORT}"),
                "--report-interval-secs",
                "1",
                "--syn-cookies",
                cookies,
            ],
        )
        .expect("start guard")
    });
    let prog = guard.as_ref().and_then(|_| topo.server_xdp_prog_id());
    let pid = guard.as_ref().and_then(GuardDaemon::pid);
    let lines = guard.as_ref().map(|g| g.log_text().lines().count());
    let counters = guard.as_ref().map(|g| g.counters().expect("counters"));
    let stats_before = prog.and_then(prog_stats);
    let cpu_before = pid.map(cpu_time);
    let soft_before = softirq_time();
    let mut cfg = topo.syn_flood(source(&topo), server, plan.live_flood);
    cfg.max_duration = Duration::from_secs(plan.live_seconds);
    let start = Instant::now();
    let flood = SynFlood::run(&topo.client, cfg).expect("flood");
    // The receive path and the daemon's summary catch up.
    std::thread::sleep(Duration::from_millis(1200));
    let wall = start.elapsed();
    let softirq = softirq_time() - soft_before;
    let xdp_ns = match (stats_before, prog.and_then(prog_stats)) {
        (Some((t0, n0)), Some((t1, n1))) if n1 > n0 => {
            Some((t1 - t0).as_nanos() as f64 / (n1 - n0) as f64)
        }
        _ => None,
    };
    let moved = guard.as_ref().zip(counters).map(|(g, before)| {
        let after = g.counters().expect("counters");
        let d = |k: &str| after[k] - before[k];
        (
            d("drop_source") + d("drop_tenant") + d("drop_global"),
            d("cookies_sent"),
        )
    });
    LiveRun {
        sent: flood.sent,
        pps: flood.pps(),
        xdp_ns,
        softirq_ns: softirq.as_nanos() as f64 / flood.sent.max(1) as f64,
        daemon_ms_per_s: pid
            .zip(cpu_before)
            .map(|(p, c)| (cpu_time(p) - c).as_secs_f64() * 1000.0 / wall.as_secs_f64()),
        log_lines: guard
            .as_ref()
            .zip(lines)
            .map(|(g, l)| g.log_text().lines().count() - l),
        dropped: moved.map(|m| m.0),
        cookies: moved.map(|m| m.1),
    }
}

fn live_floods(plan: &Plan) {
    let (live_flood, live_seconds) = (plan.live_flood, plan.live_seconds);
    // Program run time is only accounted while this fd is open.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF stats");
    println!();
    println!(
        "live floods: {live_flood} SYNs at most, {live_seconds} s at most, from an AF_PACKET \
         sender in the client namespace over a veth pair to a listener (backlog 4096, \
         tcp_syncookies=1); guard with its defaults in driver mode, SYN cookies on (auto) or \
         off; softirq is host-wide time per SYN sent, sender and receiver sharing the machine"
    );
    println!();
    println!(
        "| flood | receiver | SYNs/s offered | refused by XDP | answered with cookies | \
         XDP ns/SYN | softirq ns/SYN | daemon CPU ms/s | daemon log lines |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let fixed = |t: &Topology| SourceAddr::Fixed(t.client_v4().into());
    let spoofed = |t: &Topology| t.spoofed_sources_v4();
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let percent = |n: Option<u64>, of: u64| {
        n.map_or("-".to_string(), |n| {
            format!("{:.1} %", n as f64 * 100.0 / of.max(1) as f64)
        })
    };
    for (name, source, receivers) in [
        (
            "one source",
            &fixed as &dyn Fn(&Topology) -> SourceAddr,
            &[Some("auto"), None][..],
        ),
        (
            "random sources (10.128.0.0/9)",
            &spoofed,
            &[Some("auto"), Some("off"), None][..],
        ),
    ] {
        for cookies in receivers {
            let r = live_run(plan, source, *cookies);
            println!(
                "| {name} | {} | {:.0} | {} | {} | {} | {:.0} | {} | {} |",
                match cookies {
                    Some("off") => "guard, cookies off",
                    Some(_) => "guard",
                    None => "no filter",
                },
                r.pps,
                percent(r.dropped, r.sent),
                percent(r.cookies, r.sent),
                opt(r.xdp_ns),
                r.softirq_ns,
                opt(r.daemon_ms_per_s),
                r.log_lines.map_or("-".to_string(), |l| l.to_string()),
            );
        }
    }
}

/// One run of the three ratios, each against a reference measured
/// in the same run on the same machine.
struct RatioRun {
    /// A judged SYN from a known source, charged and passed (ns, 2 M repeats).
    known: u64,
    /// `guard_floor` reading the clock, finding an LRU bucket and swapping it.
    floor: u64,
    /// A non-SYN TCP frame through the guard.
    non_syn: u64,
    /// The empty program over a frame of the same size.
    empty: u64,
    /// Median single run: a SYN from a source never seen before, during a
    /// flood that has emptied the shared budget.
    new_source: u64,
    /// Median single run: a SYN from a hot source its own bucket drops.
    hot: u64,
    /// Median single run of the empty program.
    empty_single: u64,
    /// Of the new-source SYNs, the share dropped (the rest refilled tokens).
    new_dropped: f64,
    /// Of the hot source's SYNs, the share dropped.
    hot_dropped: f64,
}

/// Sources never used before in this process: 10.128.0.0 upwards, so each
/// frame makes the guard look up (and today insert) a per-source bucket.
struct FreshSources(u32);

impl FreshSources {
    fn next_syn(&mut self) -> Vec<u8> {
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + self.0);
        self.0 += 1;
        tcp(addr, true)
    }
}

/// The daemon's default budgets (`[xdp]` in guard.example.toml), cookies
/// off so that a refused SYN is dropped (a cookie-answered one has its own
/// row above).
fn defaults_config(x: &mut XdpUnderTest) {
    x.maps
        .set_config(&GuardConfig {
            source: RateLimit::per_second(50, 100),
            global: RateLimit::per_second(20_000, 40_000),
            events: RateLimit::per_second(200, 400),
            ipv6_prefix_len: 64,
            flags: 0,
        })
        .unwrap();
    x.maps
        .sync_tenant_limits(&[(DEFAULT_TENANT, RateLimit::per_second(2_000, 4_000))])
        .unwrap();
}

/// Limits that never drop, so every bucket of a known source is charged.
fn charge_everything(x: &mut XdpUnderTest) {
    let huge = RateLimit::per_second(1_000_000_000, 1_000_000_000);
    x.maps
        .set_config(&GuardConfig {
            source: huge,
            global: huge,
            events: RateLimit::per_second(200, 400),
            ipv6_prefix_len: 64,
            flags: 0,
        })
        .unwrap();
    x.maps
        .sync_tenant_limits(&[(DEFAULT_TENANT, huge)])
        .unwrap();
}

/// The new-source case cannot repeat one frame (the second run would find
/// the source known), so it is timed one `BPF_PROG_TEST_RUN` per frame.
/// The kernel times only the program run inside the syscall, but a single
/// run carries the timer's own reads and a cache the syscall path has
/// stirred: the hot-source SYN and the empty program are therefore timed
/// the same way, interleaved frame by frame, and compared with it.
fn ratio_run(
    plan: &Plan,
    x: &mut XdpUnderTest,
    fresh: &mut FreshSources,
    known_syn: &[u8],
    non_syn: &[u8],
) -> RatioRun {
    charge_everything(x);
    let mut floor_frame = known_syn.to_vec();
    floor_frame[0] = FLOOR_CLOCK | FLOOR_CAS;
    let (v, known) = x.run_program(PROGRAM_GUARD, known_syn, plan.repeat);
    assert_eq!(v, verdict::PASS, "the known source is admitted");
    let floor = x.run_program(PROGRAM_FLOOR, &floor_frame, plan.repeat).1;
    let non_syn_ns = x.run_program(PROGRAM_GUARD, non_syn, plan.repeat).1;
    let empty = x.run_program(PROGRAM_PASS, known_syn, plan.repeat).1;

    // A flood of new sources with the daemon's defaults: it spends the
    // shared budget of sources with no tenant and the event budget, then
    // every further new source is dropped by the shared budget.
    defaults_config(x);
    for _ in 0..SINGLES {
        x.run(&fresh.next_syn());
    }
    let hot_syn = tcp(Ipv4Addr::new(198, 51, 100, 9), true);
    for _ in 0..200 {
        x.run(&hot_syn);
    }
    let (mut new, mut hot, mut empty_single) = (Vec::new(), Vec::new(), Vec::new());
    let (mut dropped, mut hot_dropped) = (0, 0);
    for _ in 0..SINGLES {
        let (v, ns) = x.run_program(PROGRAM_GUARD, &fresh.next_syn(), 1);
        dropped += usize::from(v == verdict::DROP);
        new.push(ns);
        // Its bucket refills 50 tokens a second, so a rare one passes.
        let (v, ns) = x.run_program(PROGRAM_GUARD, &hot_syn, 1);
        hot_dropped += usize::from(v == verdict::DROP);
        hot.push(ns);
        empty_single.push(x.run_program(PROGRAM_PASS, &hot_syn, 1).1);
    }
    RatioRun {
        known,
        floor,
        non_syn: non_syn_ns,
        empty,
        new_source: median_of(new),
        hot: median_of(hot),
        empty_single: median_of(empty_single),
        new_dropped: dropped as f64 / SINGLES as f64,
        hot_dropped: hot_dropped as f64 / SINGLES as f64,
    }
}

/// The targets as ratios, one line per run, then their ranges.
fn ratio_runs(plan: &Plan, x: &mut XdpUnderTest, known_syn: &[u8], non_syn: &[u8]) {
    let mut fresh = FreshSources(0);
    // Fill the per-source map first, so every new source below evicts one,
    // as it does in a long random-source flood.
    defaults_config(x);
    for _ in 0..guard_common::SOURCE_BUCKETS_CAPACITY as usize + SINGLES {
        x.run(&fresh.next_syn());
    }
    println!();
    println!(
        "ratios, each against a reference from the same run: known SYN (charged, passed) / \
         floor \"clock + LRU lookup + CAS\" and non-SYN / empty program at {} repeats; \
         new-source SYN (the daemon's default budgets, the shared one emptied, the per-source \
         map full, cookies off) / hot source's dropped SYN as medians of {SINGLES} single runs \
         each, interleaved with the empty program's single runs",
        plan.repeat
    );
    println!();
    println!(
        "| run | known SYN ns | floor ns | known / floor (≤ 1.0) | non-SYN ns | empty ns | \
         non-SYN / empty (≤ 1.3) | new source ns (dropped) | hot source ns (dropped) | empty single ns | \
         new / hot (≤ 1.5) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    let mut got: [Vec<f64>; 3] = Default::default();
    for run in 1..=plan.ratio_runs {
        let r = ratio_run(plan, x, &mut fresh, known_syn, non_syn);
        let rs = [
            ratio(r.known, r.floor),
            ratio(r.non_syn, r.empty),
            ratio(r.new_source, r.hot),
        ];
        println!(
            "| {run} | {} | {} | {:.2}× | {} | {} | {:.2}× | {} ({:.1} %) | {} ({:.1} %) | {} | {:.2}× |",
            r.known,
            r.floor,
            rs[0],
            r.non_syn,
            r.empty,
            rs[1],
            r.new_source,
            r.new_dropped * 100.0,
            r.hot,
            r.hot_dropped * 100.0,
            r.empty_single,
            rs[2],
        );
        for (g, v) in got.iter_mut().zip(rs) {
            g.push(v);
        }
    }
    println!();
    for ((name, target), v) in [
        ("known SYN / floor", 1.0),
        ("non-SYN / empty", 1.3),
        ("new source / hot dropped", 1.5),
    ]
    .into_iter()
    .zip(&got)
    {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        let held = v.iter().filter(|r| **r <= target).count();
        println!(
            "{name}: {lo:.2}–{hi:.2}× over {} runs, target ≤ {target}× held in {held}",
            v.len()
        );
    }
}
