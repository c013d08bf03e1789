//! `cargo xtask bench xdp`: nanoseconds per frame through the guard, beside
//! an empty `XDP_PASS` program measured in the same run, with
//! `BPF_PROG_TEST_RUN`. Prints the machine, then a Markdown table.

use std::net::{IpAddr, Ipv4Addr};

use guard_common::{
    DEFAULT_TENANT, FLOOR_CAS, FLOOR_CLOCK, FLOOR_COARSE_CLOCK, FLOOR_LOOKUP, GuardConfig,
    PROGRAM_FLOOR, PROGRAM_GUARD, PROGRAM_PASS, RateLimit,
};
use guard_tests::{
    frames::{ETHERTYPE_IPV4, Ethernet, Ipv4, Tcp, proto, tcp_flags},
    xdp::{XdpUnderTest, verdict},
};

const REPEAT: u32 = 2_000_000;
const ROUNDS: usize = 9;

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

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Medians over [`ROUNDS`] of `run` (ns per frame) and of the empty
/// program on the same frame, interleaved so both see the same machine.
fn beside_empty(
    x: &mut XdpUnderTest,
    frame: &[u8],
    mut run: impl FnMut(&mut XdpUnderTest) -> u64,
) -> (u64, u64) {
    let (mut measured, mut empty) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        measured.push(run(x));
        empty.push(x.run_program(PROGRAM_PASS, frame, REPEAT).1);
    }
    (median(measured), median(empty))
}

fn main() {
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
        "method: BPF_PROG_TEST_RUN, {REPEAT} repeats per run, median of {ROUNDS} runs, \
         guard and an empty XDP_PASS program interleaved in the same rounds\n"
    );
    println!("| frame | guard ns/frame | empty ns/frame | ratio |");
    println!("|---|---:|---:|---:|");
    for (name, frame, want) in cases {
        let (g, e) = beside_empty(&mut x, frame, |x| {
            // The dropped case needs the 1/s source limit; the others must
            // not be limited at all.
            let mut cfg = x.maps.config().unwrap();
            cfg.source = if want == verdict::DROP {
                RateLimit::per_second(1, 1)
            } else {
                huge
            };
            x.maps.set_config(&cfg).unwrap();
            let (v, ns) = x.run_program(PROGRAM_GUARD, frame, REPEAT);
            // The first run of a round may admit one refilled SYN; the
            // verdict reported is the last run's.
            assert_eq!(v, want, "{name}: unexpected verdict");
            ns
        });
        println!(
            "| {name} | {g} | {e} | {:.2}× |",
            g as f64 / e.max(1) as f64
        );
    }

    // What any limiter built on these maps pays per judged SYN on this
    // machine, whatever its parsing and bookkeeping: the floor under the
    // charged-SYN row above.
    println!();
    println!("| irreducible step (guard_floor) | ns/frame | empty ns/frame | above empty |");
    println!("|---|---:|---:|---:|");
    for (name, steps) in [
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
    ] {
        let mut frame = admitted.clone();
        frame[0] = steps;
        let (f, e) = beside_empty(&mut x, &frame, |x| {
            x.run_program(PROGRAM_FLOOR, &frame, REPEAT).1
        });
        println!("| {name} | {f} | {e} | +{} |", f.saturating_sub(e));
    }
}
