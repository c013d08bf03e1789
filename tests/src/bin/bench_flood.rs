//! `cargo xtask bench flood`: how much CPU a SYN flood costs the receiving
//! host, and whether real clients still get in, with guard against the two
//! things a user would run instead: nothing but the kernel's SYN cookies,
//! and an nftables per-source limit.
//!
//! One generator for every case: trafgen (netsniff-ng) in the client
//! namespace with a SYN template, from one spoofed source or from random
//! ones (10.0.0.0/8, 16 M addresses), bounded by a frame count and killed
//! at a deadline. The receivers, each on a fresh veth pair between two
//! namespaces named with the process id:
//!
//! - *floor*: no listener's work at all: the frames carry a destination
//!   MAC that is not the server's, so the server's kernel drops each at IP
//!   input (`PACKET_OTHERHOST`) after the veth delivered it: what the
//!   generator and the veth cost by themselves. (A downed peer would be
//!   cheaper still, but trafgen's ring then never drains.)
//! - *syncookies*: a listener, `tcp_syncookies=1`, no filter;
//! - *nftables*: the per-source limit a user would write (a dynamic set
//!   with a limit per element, guard's default 50/s, burst 100), in an
//!   `input` filter chain;
//! - *guard*: the real daemon with its defaults, XDP in driver mode.
//!
//! Per case: SYNs offered (trafgen's count), SYNs that reached TCP (the
//! server namespace's `TcpInSegs`), host-wide softirq time and the
//! daemon's CPU per million SYNs offered, the generator's own CPU, and
//! whether a new client and a known (for guard: verified) one connect
//! during the flood. Softirq time is host-wide and tick-sampled (this
//! kernel has no `CONFIG_IRQ_TIME_ACCOUNTING`): ticks that land in a
//! softirq the generator's send ran inline are counted both there and in
//! the generator's system time.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    os::unix::process::CommandExt as _,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use guard_tests::{
    AcceptCounter, TempDir, Topology, connect_from, daemon::GuardDaemon, procstat::cpu_time,
    xdp::XdpUnderTest,
};

const PORT: u16 = 11211;
/// SYNs per flood: a few seconds at trafgen's rate here (`--quick`: a
/// tenth, one run of each case, to check the benchmark still works).
const FLOOD_SYNS: u64 = 600_000;
/// The generator is killed if it has not finished by then (on a busy
/// machine it may not): the frames the client's veth sent are what count.
const FLOOD_DEADLINE: Duration = Duration::from_secs(10);
/// Runs of every case.
const ROUNDS: usize = 3;
/// Connection attempts of each legitimate client during one flood.
const CLIENT_TRIES: usize = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    One,
    Random,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Receiver {
    GeneratorAlone,
    Syncookies,
    Nftables,
    Guard,
    /// guard with `--syn-cookies off`: what its XDP drop alone costs, and
    /// what new clients lose without cookies.
    GuardNoCookies,
}

impl Receiver {
    fn name(self) -> &'static str {
        match self {
            Receiver::GeneratorAlone => "floor: dropped at IP input",
            Receiver::Syncookies => "no filter, syncookies",
            Receiver::Nftables => "nftables per-source limit",
            Receiver::Guard => "guard",
            Receiver::GuardNoCookies => "guard, cookies off",
        }
    }
}

/// What one flood cost and let through.
struct Run {
    /// Frames the generator sent (or, killed at the deadline, the
    /// client's veth did).
    offered: u64,
    /// Of those, what the veth delivered to the server's end.
    delivered: u64,
    /// The generator gave up early: the receiver pushed back.
    gave_up: bool,
    seconds: f64,
    reached_tcp: u64,
    /// On the generator's CPU, where the veth delivers what it sends.
    softirq: Duration,
    /// On every CPU: also what else the machine was doing.
    softirq_host: Duration,
    generator: Duration,
    daemon: Option<Duration>,
    /// (connected, tried) for a client never seen before.
    new_client: (usize, usize),
    /// (connected, tried) for a client the receiver knows (guard: verified).
    known_client: (usize, usize),
}

impl Run {
    fn per_million(&self, d: Duration) -> f64 {
        d.as_secs_f64() * 1e3 / (self.offered.max(1) as f64 / 1e6)
    }
}

/// Softirq time from `/proc/stat`: all CPUs first, then each CPU.
fn softirq_times() -> Vec<Duration> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .take_while(|l| l.starts_with("cpu"))
        // cpu user nice system idle iowait irq softirq …
        .map(|l| {
            let jiffies: u64 = l
                .split_whitespace()
                .nth(7)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Duration::from_nanos(jiffies * 1_000_000_000 / hz)
        })
        .collect()
}

fn mac_bytes(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("0x{b:02x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// trafgen's packet configuration: an Ethernet/IPv4/TCP SYN with no
/// options (54 bytes), random IP id, source port and sequence number, the
/// checksums recomputed per frame. Random sources come from 10.0.0.0/8:
/// the topology's own 10.77.X.0/24 is one address in 256 of them.
fn trafgen_config(topo: &Topology, source: Source, dst_mac: [u8; 6]) -> String {
    let dst = topo.server_v4().octets();
    let src = match source {
        Source::One => "10, 128, 0, 7".to_string(),
        Source::Random => "10, drnd(3)".to_string(),
    };
    format!(
        "{{\n  {dst_mac}, {src_mac}, c16(0x0800),\n  \
         0x45, 0x00, c16(40), drnd(2), c16(0x4000), 64, 6, csumip(14, 33),\n  \
         {src}, {d0}, {d1}, {d2}, {d3},\n  \
         drnd(2), c16({PORT}), drnd(4), c32(0), 0x50, 0x02, c16(65535), csumtcp(14, 34), c16(0)\n}}\n",
        dst_mac = mac_bytes(dst_mac),
        src_mac = mac_bytes(topo.client_if().mac),
        d0 = dst[0],
        d1 = dst[1],
        d2 = dst[2],
        d3 = dst[3],
    )
}

/// The rule a user would write instead of guard: per source, 50 SYNs a
/// second with a burst of 100 (guard's defaults), sources kept in a
/// dynamic set as big as guard's per-source map.
fn nft_ruleset(table: &str) -> String {
    format!(
        "table inet {table} {{\n  \
           set syn_sources {{ type ipv4_addr; size 65536; flags dynamic,timeout; timeout 10s; }}\n  \
           chain input {{\n    \
             type filter hook input priority filter; policy accept;\n    \
             tcp dport {PORT} tcp flags & (syn | ack) == syn \
             update @syn_sources {{ ip saddr limit rate over 50/second burst 100 packets }} drop\n  \
           }}\n\
         }}\n"
    )
}

/// A table in a namespace, deleted on drop (the namespace's own deletion
/// would take it too; this keeps a failed run from depending on that).
struct NftTable<'a> {
    topo: &'a Topology,
    name: String,
}

impl Drop for NftTable<'_> {
    fn drop(&mut self) {
        let _ = self
            .topo
            .server
            .exec("nft", ["delete", "table", "inet", &self.name]);
    }
}

/// The generator's own CPU time, how long it ran, and the CPU it was
/// pinned to (from its report; `None` if it was killed first).
struct Generated {
    /// Frames it reports sending; `None` if it was killed first or gave up.
    sent: Option<u64>,
    /// It gave up before the deadline: trafgen treats a full transmit
    /// path (EAGAIN, the receiving veth's ring full) as fatal.
    gave_up: bool,
    cpu: Duration,
    elapsed: Duration,
    on_cpu: Option<usize>,
}

/// Runs trafgen in the client namespace: one process, `syns` frames, killed at `FLOOD_DEADLINE`; reaped with `wait4` for its CPU.
fn generate(
    topo: &Topology,
    config: &std::path::Path,
    out: &std::path::Path,
    syns: u64,
) -> Result<Generated> {
    let stdout = std::fs::File::create(out)?;
    let mut cmd = topo.client.command("trafgen");
    cmd.args(["--no-sock-mem", "--cpus", "1", "--dev"])
        .arg(&topo.client_if().ifname)
        .arg("--conf")
        .arg(config)
        .args(["--num", &syns.to_string()])
        .stdin(Stdio::null())
        .stdout(stdout.try_clone()?)
        .stderr(stdout);
    // nsenter execs trafgen in place, so this pid is trafgen's; trafgen
    // forks its sender, so the whole group is what a deadline kills.
    cmd.process_group(0);
    let child = cmd
        .spawn()
        .context("starting trafgen (Debian: netsniff-ng)")?;
    let pid = child.id() as libc::pid_t;
    let started = Instant::now();
    let deadline = started + FLOOD_DEADLINE;
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our own unreaped child; the out-pointers are valid.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if r < 0 {
            bail!("wait4 on trafgen: {}", std::io::Error::last_os_error());
        }
        if Instant::now() >= deadline {
            // SAFETY: signalling the process group of our own unreaped
            // child, which it leads.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            // Its sender, orphaned, is reparented to this process (a
            // subreaper, see `main`): reap the whole group, adding up what
            // each used. Bounded: the group holds two processes.
            let mut total = Duration::ZERO;
            for _ in 0..16 {
                // SAFETY: waits only for members of that group; the
                // out-pointers are valid.
                if unsafe { libc::wait4(-pid, &mut status, 0, &mut usage) } <= 0 {
                    break;
                }
                total += tv(usage.ru_utime) + tv(usage.ru_stime);
            }
            return Ok(Generated {
                sent: None,
                gave_up: false,
                cpu: total,
                elapsed: started.elapsed(),
                on_cpu: None,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let elapsed = started.elapsed();
    let text = std::fs::read_to_string(out).unwrap_or_default();
    // "  0 sec, 6809 usec on CPU0 (2000 packets)"; a killed trafgen
    // prints nothing.
    let on_cpu = text
        .split("on CPU")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    // "   1000000 packets outgoing".
    let sent = text
        .lines()
        .find(|l| l.trim_end().ends_with("packets outgoing"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    Ok(Generated {
        sent,
        gave_up: sent.is_none(),
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        elapsed,
        on_cpu,
    })
}

/// Connects `tries` times from `src` during the flood; (connected, tried).
fn clients(topo: &Topology, src: IpAddr, dst: SocketAddr, tries: usize) -> (usize, usize) {
    let ok = (0..tries)
        .filter(|_| connect_from(&topo.client, src, dst, CONNECT_TIMEOUT).is_ok())
        .count();
    (ok, tries)
}

fn one_run(source: Source, receiver: Receiver, scratch: &TempDir, syns: u64) -> Result<Run> {
    let topo = Topology::new()?;
    let dst: SocketAddr = (IpAddr::V4(topo.server_v4()), PORT).into();
    let _listener = AcceptCounter::start(&topo.server, dst, 4096)?;
    // SYN-ACKs guard sends back with XDP_TX in driver mode reach a veth
    // only if it has an XDP program; every case gets one, so the client's
    // side costs the same in all of them.
    let mut peer = XdpUnderTest::load();
    peer.attach_pass(&topo.client, &topo.client_if().ifname)?;
    let new_client = IpAddr::V4(topo.client2_v4);
    let known_client = IpAddr::V4(topo.client_v4());
    // The known client connects once before the flood, as a real one has.
    let warm = connect_from(&topo.client, known_client, dst, CONNECT_TIMEOUT).is_ok();

    let table = format!("gt_flood_{}", std::process::id());
    let _nft = match receiver {
        Receiver::Nftables => {
            let rules = scratch.join("rules.nft");
            std::fs::write(&rules, nft_ruleset(&table))?;
            topo.server
                .exec_ok("nft", [std::ffi::OsStr::new("-f"), rules.as_os_str()])
                .context("loading the nftables rules (Debian: nftables)")?;
            Some(NftTable {
                topo: &topo,
                name: table,
            })
        }
        _ => None,
    };
    let guard = match receiver {
        Receiver::Guard | Receiver::GuardNoCookies => {
            let cookies = if receiver == Receiver::Guard {
                "auto"
            } else {
                "off"
            };
            let g = GuardDaemon::start(
                &topo.server,
                &[
                    "--iface",
                    &topo.server_if().ifname,
                    "--xdp-mode",
                    "drv",
                    "--protect",
                    &format!("*:{PORT}"),
                    "--syn-cookies",
                    cookies,
                ],
            )?;
            // What a login through guard's proxy records: the source is
            // verified for the open tenant for an hour.
            g.maps()?.set_verified(
                known_client,
                guard_common::DEFAULT_TENANT,
                0,
                Duration::from_secs(3600),
            )?;
            Some(g)
        }
        _ => None,
    };
    let dst_mac = if receiver == Receiver::GeneratorAlone {
        // Locally administered, and no interface here has it.
        [0x02, 0, 0, 0, 0, 0x99]
    } else {
        topo.server_if().mac
    };

    let config = scratch.join("syn.trafgen");
    let mut f = std::fs::File::create(&config)?;
    f.write_all(trafgen_config(&topo, source, dst_mac).as_bytes())?;
    drop(f);
    let out = scratch.join("trafgen.out");

    let pid = guard.as_ref().and_then(GuardDaemon::pid);
    let daemon_before = pid.map(cpu_time);
    let tcp_before = topo.server.counters()?.get("TcpInSegs");
    let link_before = topo.client.link_stats(&topo.client_if().ifname)?;
    let soft_before = softirq_times();
    let (generated, (new, known)) = std::thread::scope(|s| {
        let gen_thread = s.spawn(|| generate(&topo, &config, &out, syns));
        // Clients try while the flood runs (it lasts seconds; they start
        // once it is under way). The generator alone has no server.
        let tried = if receiver == Receiver::GeneratorAlone {
            ((0, 0), (0, 0))
        } else {
            std::thread::sleep(Duration::from_millis(500));
            (
                clients(&topo, new_client, dst, CLIENT_TRIES),
                clients(&topo, known_client, dst, CLIENT_TRIES),
            )
        };
        (gen_thread.join().expect("generator thread"), tried)
    });
    let generated = generated?;
    // The receiving softirqs finish what is queued.
    std::thread::sleep(Duration::from_millis(200));
    let soft_after = softirq_times();
    let link_after = topo.client.link_stats(&topo.client_if().ifname)?;
    let soft = |i: usize| {
        soft_after.get(i).copied().unwrap_or_default()
            - soft_before.get(i).copied().unwrap_or_default()
    };
    // Line 0 is all CPUs, line 1 + n is CPU n.
    let softirq = generated.on_cpu.map_or_else(|| soft(0), |c| soft(c + 1));
    let reached_tcp = topo.server.counters()?.get("TcpInSegs") - tcp_before;
    let daemon = pid.zip(daemon_before).map(|(p, b)| cpu_time(p) - b);
    if !warm && receiver != Receiver::GeneratorAlone {
        eprintln!("note: the known client could not connect before the flood");
    }
    // What the client's veth handed to the server's: less than was sent
    // when the receiving ring was full.
    let delivered = link_after.tx_packets.saturating_sub(link_before.tx_packets);
    Ok(Run {
        offered: generated.sent.unwrap_or(delivered),
        delivered,
        gave_up: generated.gave_up,
        seconds: generated.elapsed.as_secs_f64(),
        reached_tcp,
        softirq,
        softirq_host: soft(0),
        generator: generated.cpu,
        daemon,
        new_client: new,
        known_client: known,
    })
}

/// Receiver CPU per million SYNs offered: softirq on the generator's CPU
/// plus the daemon's.
fn receiver_cost(r: &Run) -> f64 {
    r.per_million(r.softirq) + r.daemon.map_or(0.0, |d| r.per_million(d))
}

fn main() -> Result<()> {
    guard_tests::require_root();
    // A generator killed at its deadline leaves its forked sender to be
    // reaped here, with the CPU it used, rather than by init.
    // SAFETY: prctl with an integer argument; affects only this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only TEXT`: the cases whose "flood, receiver" name holds TEXT.
    let only: Option<String> = std::env::args().skip_while(|a| a != "--only").nth(1);
    let (syns, rounds) = if quick {
        (FLOOD_SYNS / 10, 1)
    } else {
        (FLOOD_SYNS, ROUNDS)
    };
    let scratch = TempDir::new("flood")?;
    println!("machine: {}", guard_tests::machine());
    println!(
        "method: trafgen (one process, pinned) sends at most {syns} SYNs per run ({} s \
         deadline) from the client namespace over a veth pair to a listener (backlog 4096, \
         tcp_syncookies=1); every case once per round, {rounds} rounds; offered = frames trafgen \
         sent; delivered = what the client's veth handed on (the rest it dropped, the \
         receiver's ring full); reached TCP = the server's TcpInSegs; CPU figures are ms per \
         million SYNs offered, tick-sampled; softirq is the generator's CPU's (where the veth \
         delivers), host = all CPUs (includes whatever else the machine ran); generator = \
         trafgen's own user + system time, which also holds softirq ticks that landed in its \
         sends; the floor row is the generator and the veth by themselves; † = trafgen gave \
         up early (EAGAIN: the receiving veth's ring was full and pushed back); during each flood \
         a new client and a known one (guard: verified) try {CLIENT_TRIES} connects each \
         ({} ms timeout)\n",
        FLOOD_DEADLINE.as_secs(),
        CONNECT_TIMEOUT.as_millis(),
    );
    println!(
        "| flood | receiver | round | SYNs offered | SYNs/s | delivered | reached TCP | softirq ms/M | \
         host softirq ms/M | daemon ms/M | softirq + daemon ms/M | generator ms/M | new client | \
         known / verified client |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
    let cases = [
        (
            Source::One,
            "one source",
            &[
                Receiver::GeneratorAlone,
                Receiver::Syncookies,
                Receiver::Nftables,
                Receiver::Guard,
            ][..],
        ),
        (
            Source::Random,
            "random sources",
            &[
                Receiver::GeneratorAlone,
                Receiver::Syncookies,
                Receiver::Nftables,
                Receiver::Guard,
                Receiver::GuardNoCookies,
            ][..],
        ),
    ];
    // (round, source, receiver) → receiver CPU per million SYNs.
    let mut cost: Vec<(usize, Source, Receiver, f64)> = Vec::new();
    for round in 1..=rounds {
        for (source, name, receivers) in cases {
            for &receiver in receivers {
                if only
                    .as_ref()
                    .is_some_and(|o| !format!("{name}, {}", receiver.name()).contains(o.as_str()))
                {
                    continue;
                }
                let r = one_run(source, receiver, &scratch, syns)
                    .with_context(|| format!("{name}, {}, round {round}", receiver.name()))?;
                let daemon = r.daemon.map(|d| r.per_million(d));
                let clients = |(ok, tried): (usize, usize)| {
                    if tried == 0 {
                        "-".to_string()
                    } else {
                        format!("{ok}/{tried}")
                    }
                };
                println!(
                    "| {name} | {} | {round} | {}{} | {:.0} | {:.1} % | {} ({:.1} %) | {:.0} | {:.0} | {} | \
                     {:.0} | {:.0} | {} | {} |",
                    receiver.name(),
                    r.offered,
                    if r.gave_up { " †" } else { "" },
                    r.offered as f64 / r.seconds.max(1e-3),
                    r.delivered as f64 * 100.0 / r.offered.max(1) as f64,
                    r.reached_tcp,
                    r.reached_tcp as f64 * 100.0 / r.offered.max(1) as f64,
                    r.per_million(r.softirq),
                    r.per_million(r.softirq_host),
                    daemon.map_or("-".into(), |d| format!("{d:.0}")),
                    receiver_cost(&r),
                    r.per_million(r.generator),
                    clients(r.new_client),
                    clients(r.known_client),
                );
                cost.push((round, source, receiver, receiver_cost(&r)));
            }
        }
    }

    // The targets, each a ratio of receiver CPU per million SYNs
    // within one round.
    let of = |round: usize, source: Source, receiver: Receiver| {
        cost.iter()
            .find(|c| c.0 == round && c.1 == source && c.2 == receiver)
            .map(|c| c.3)
    };
    println!();
    println!(
        "| round | random: guard / syncookies (≤ 0.5) | random: guard / nftables (≤ 0.5) | \
         one source: guard / nftables (≤ 1.0) |"
    );
    println!("|---:|---:|---:|---:|");
    for round in 1..=rounds {
        let ratio = |source, other| {
            of(round, source, Receiver::Guard)
                .zip(of(round, source, other))
                .map_or("-".to_string(), |(g, o)| format!("{:.2}×", g / o.max(1e-9)))
        };
        println!(
            "| {round} | {} | {} | {} |",
            ratio(Source::Random, Receiver::Syncookies),
            ratio(Source::Random, Receiver::Nftables),
            ratio(Source::One, Receiver::Nftables),
        );
    }
    Ok(())
}
