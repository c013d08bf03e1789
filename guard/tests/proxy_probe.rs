//! `guard probe`, the real binary, against real memcached: a healthy node
//! passes, a node behind a 200 ms network fails on its round trips, a
//! closed port fails as refused, and `--json` carries the same verdicts.
//! Needs no privileges.

use std::{
    net::SocketAddr,
    process::{Command, Output},
    time::Duration,
};

use guard_test_support::{DelayRelay, Memcached, free_port};

fn guard_probe(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guard"))
        .arg("probe")
        .args(args)
        .output()
        .expect("run guard probe")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `[candidates…] --against [peers…]` as arguments.
fn args(candidates: &[SocketAddr], peers: &[&Memcached], more: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = candidates.iter().map(SocketAddr::to_string).collect();
    a.push("--against".into());
    a.extend(peers.iter().map(|p| p.addr().to_string()));
    a.extend(more.iter().map(|s| s.to_string()));
    a
}

/// For the nodes that should pass: a busy test machine may stall one
/// node's single burst for a few milliseconds, more than the default gap
/// (10 ms) above peers' bursts of about one; what this tells apart
/// (200 ms) stays far above it.
const CALM_GAP: [&str; 2] = ["--outlier-min-gap-ms", "50"];

/// The table row of `addr`.
fn row(stdout: &str, addr: SocketAddr) -> String {
    stdout
        .lines()
        .find(|l| l.starts_with(&format!("{addr} ")))
        .unwrap_or_else(|| panic!("no row for {addr}:\n{stdout}"))
        .to_owned()
}

#[test]
fn a_healthy_node_passes_showing_its_figures() {
    let (candidate, p1, p2) = (Memcached::start(), Memcached::start(), Memcached::start());
    let out = guard_probe(&args(&[candidate.addr()], &[&p1, &p2], &CALM_GAP));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let c = row(&stdout, candidate.addr());
    assert!(c.contains(" candidate "), "{c}");
    assert!(c.contains("pass: not an outlier: round-trip p90 "), "{c}");
    assert!(c.contains(" vs peers' ") && c.contains(" ms"), "{c}");
    for p in [&p1, &p2] {
        let r = row(&stdout, p.addr());
        assert!(r.contains(" peer ") && r.contains(" ms"), "{r}");
    }
}

#[test]
fn a_node_200ms_away_fails_on_its_round_trips() {
    let (slow, p1, p2) = (Memcached::start(), Memcached::start(), Memcached::start());
    let relay = DelayRelay::start(slow.addr());
    relay.set_delay(Duration::from_millis(200));
    // A timeout well above the delay, so the verdict is the comparison's
    // and not a timeout; few round trips, as each takes 200 ms.
    let out = guard_probe(&args(
        &[relay.addr()],
        &[&p1, &p2],
        &["--timeout-ms", "2000", "--round-trips", "3"],
    ));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{stdout}");
    assert_eq!(stderr, "guard: 1 of 1 candidates failed the probe\n");
    let c = row(&stdout, relay.addr());
    let p90 = c
        .split("fail: slower than its peers: round-trip p90 ")
        .nth(1)
        .unwrap_or_else(|| panic!("{c}"));
    let ms: f64 = p90.split(" ms").next().unwrap().parse().unwrap();
    assert!(ms >= 200.0, "{c}");
    assert!(p90.contains(" vs peers' "), "{c}");
}

#[test]
fn a_closed_port_fails_as_refused() {
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let out = guard_probe(&[closed.to_string()]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{stdout}");
    assert_eq!(stderr, "guard: 1 of 1 candidates failed the probe\n");
    let c = row(&stdout, closed);
    assert!(
        c.ends_with(&format!("fail: {closed}: connection refused")),
        "{c}"
    );
}

#[test]
fn json_carries_figures_and_verdicts() {
    let (good, p1, p2) = (Memcached::start(), Memcached::start(), Memcached::start());
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let more = [&CALM_GAP[..], &["--json"]].concat();
    let out = guard_probe(&args(&[good.addr(), closed], &[&p1, &p2], &more));
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr),
        "guard: 1 of 2 candidates failed the probe\n"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
    assert_eq!(v["outlier_ratio"], 3.0);
    assert_eq!(v["outlier_min_gap_ms"], 50.0);
    let figures = |n: &serde_json::Value| {
        for f in [
            "connect_ms",
            "round_trip_p50_ms",
            "round_trip_p90_ms",
            "round_trip_max_ms",
            "burst_ms",
        ] {
            let ms = n["figures"][f]
                .as_f64()
                .unwrap_or_else(|| panic!("{f}: {n}"));
            assert!(ms > 0.0, "{f}: {n}");
        }
        assert!(n["error"].is_null(), "{n}");
    };
    let c = &v["candidates"];
    assert_eq!(c.as_array().unwrap().len(), 2, "{v}");
    assert_eq!(c[0]["addr"], good.addr().to_string());
    assert_eq!(c[0]["pass"], true, "{v}");
    let reason = c[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("not an outlier: round-trip p90 "),
        "{reason}"
    );
    figures(&c[0]);
    assert_eq!(c[1]["addr"], closed.to_string());
    assert_eq!(c[1]["pass"], false);
    let refused = format!("{closed}: connection refused");
    assert_eq!(c[1]["reason"], refused);
    assert_eq!(c[1]["error"], refused);
    assert!(c[1]["figures"].is_null());
    let peers = v["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{v}");
    for (p, mc) in peers.iter().zip([&p1, &p2]) {
        assert_eq!(p["addr"], mc.addr().to_string());
        figures(p);
        assert!(p.get("pass").is_none(), "{p}");
    }
}
