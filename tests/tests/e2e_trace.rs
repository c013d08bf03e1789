//! Tier 3: `guard xdp trace` ("why was my client dropped?") against the
//! real binary: the XDP program logs the verdicts on a traced source's
//! SYNs through aya-log, the daemon forwards them to its log and its
//! admin endpoint, and the CLI prints them; an untraced flood running at
//! the same time logs nothing. Needs root; run with `--test-threads=1`.

use std::{
    net::{IpAddr, SocketAddr},
    process::Output,
    time::{Duration, Instant},
};

use guard_tests::{
    SourceAddr, SynFlood, Topology,
    daemon::{GuardDaemon, guard_bin},
};

const PORT: u16 = 11211;
const ADMIN: &str = "127.0.0.1:9311";
/// A small per-source budget, so the traced client's SYNs go over it.
const RATE: u64 = 20;
const BURST: u64 = 5;
const TRACE_SECS: u64 = 5;

/// The source a trace line (as the CLI and the daemon print it) names.
fn traced_source(line: &str) -> Option<&str> {
    line.split_once("SYN from ")?.1.split_whitespace().next()
}

#[test]
fn a_traced_sources_drops_are_shown_and_an_untraced_flood_logs_nothing() {
    let topo = Topology::new().expect("topology");
    let server: SocketAddr = (IpAddr::V4(topo.server_v4()), PORT).into();
    let guard = GuardDaemon::start(
        &topo.server,
        &[
            "--iface",
            &topo.server_if().ifname,
            "--xdp-mode",
            "skb",
            "--protect",
            &format!("*:{PORT}"),
            "--syn-rate",
            &RATE.to_string(),
            "--syn-burst",
            &BURST.to_string(),
            "--tenant-syn-rate",
            "0",
            "--global-syn-rate",
            "0",
            "--admin",
            ADMIN,
        ],
    )
    .expect("start guard");
    let client = topo.client_v4();
    let log_before = guard.log_text().len();

    // The CLI runs where the daemon's loopback admin endpoint is.
    let mut cli = topo.server.command(guard_bin());
    cli.args([
        "xdp",
        "trace",
        &format!("{client}/32"),
        "--for",
        &format!("{TRACE_SECS}s"),
        "--admin",
        ADMIN,
    ]);
    let started = Instant::now();
    let tracing = std::thread::spawn(move || cli.output());

    // The rule is in the kernel's trie once the CLI's POST is answered.
    let maps = guard.maps().expect("maps");
    while maps.trace_rules().expect("trace rules").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the trace never started:\n{}",
            guard.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // (a) the traced client, ten times over its budget; (b) an untraced
    // spoofed flood from 10.128.0.0/9 at the same time.
    let mut traced = topo.syn_flood(SourceAddr::Fixed(client.into()), server, 600);
    traced.rate_pps = Some(RATE * 10);
    traced.max_duration = Duration::from_secs(3);
    let mut untraced = topo.syn_flood(topo.spoofed_sources_v4(), server, 30_000);
    untraced.rate_pps = Some(10_000);
    untraced.max_duration = Duration::from_secs(3);
    let before = guard.counters().unwrap();
    let traced = SynFlood::start(&topo.client, traced).expect("traced flood");
    let untraced = SynFlood::start(&topo.client, untraced).expect("untraced flood");
    let traced = traced.join().expect("traced flood");
    let untraced = untraced.join().expect("untraced flood");
    let after = guard.counters().unwrap();

    let Output {
        status,
        stdout,
        stderr,
    } = tracing.join().expect("cli thread").expect("run the cli");
    let stdout = String::from_utf8_lossy(&stdout);
    let stderr = String::from_utf8_lossy(&stderr);
    let took = started.elapsed();
    println!(
        "traced {} SYNs, untraced {}; drop_source {}; the CLI ran {:.1}s and printed:\n{stdout}{stderr}",
        traced.sent,
        untraced.sent,
        after["drop_source"] - before["drop_source"],
        took.as_secs_f64()
    );
    assert!(status.success(), "the CLI failed: {stderr}");
    assert!(
        took >= Duration::from_secs(TRACE_SECS) && took < Duration::from_secs(TRACE_SECS + 5),
        "the CLI follows the trace for its length, then ends: {took:?}"
    );
    assert!(untraced.sent >= 10_000, "the untraced flood must run");

    let lines: Vec<&str> = stdout.lines().filter(|l| l.contains("SYN from ")).collect();
    let drops = lines
        .iter()
        .filter(|l| traced_source(l) == Some(&client.to_string()) && l.contains(": drop_source ("))
        .count();
    assert!(
        drops >= 10,
        "the traced client's drops are shown ({drops} drop_source lines):\n{stdout}"
    );
    // The program's budget bounds the lines, however hard the source tries.
    let cap = guard::ebpf::trace::LINES_PER_SEC * (TRACE_SECS + 1);
    assert!(
        lines.len() as u64 <= cap,
        "{} lines, more than the trace's budget allows ({cap})",
        lines.len()
    );
    for l in &lines {
        assert_eq!(
            traced_source(l),
            Some(client.to_string().as_str()),
            "only the traced source appears: {l}"
        );
    }

    // The daemon's log: the traced client's lines, none for the flood.
    let log = guard.log_text();
    let log = &log[log_before..];
    let logged: Vec<&str> = log.lines().filter(|l| l.contains("SYN from ")).collect();
    assert!(
        logged
            .iter()
            .any(|l| l.contains("guard::trace") && traced_source(l) == Some(&client.to_string())),
        "the daemon logs the trace lines:\n{log}"
    );
    for l in &logged {
        assert_eq!(
            traced_source(l),
            Some(client.to_string().as_str()),
            "the daemon logged a line for an untraced source: {l}"
        );
    }

    // The CLI removed its trace: the trie is empty and, with it, the
    // program's trace flags are clear (a SYN costs one flag test again).
    assert!(
        maps.trace_rules().unwrap().is_empty(),
        "the trace is removed"
    );
    let flags = maps.config().unwrap().flags;
    assert_eq!(
        flags & (guard_common::CONFIG_HAS_TRACE_V4 | guard_common::CONFIG_HAS_TRACE_V6),
        0,
        "the trace flags are cleared"
    );
}

/// The CLI says plainly that no daemon runs, rather than hanging or
/// printing nothing.
#[test]
fn trace_without_a_daemon_says_so() {
    let topo = Topology::new().expect("topology");
    let out = topo
        .server
        .command(guard_bin())
        .args(["xdp", "trace", "192.0.2.7", "--for", "1s", "--admin", ADMIN])
        .output()
        .expect("run the cli");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no guard daemon answers at 127.0.0.1:9311"),
        "{stderr}"
    );
}
