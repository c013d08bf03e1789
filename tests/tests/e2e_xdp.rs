//! Tier 3: the real `guard` binary attached to a veth inside a network
//! namespace, real SYN floods from a client namespace, real connections.
//! Needs root; run with `--test-threads=1`.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use guard_tests::{
    FrameCounter, SourceAddr, SynFlood, Topology, connect_from,
    daemon::GuardDaemon,
    net::{connect_error_kind, echo_server, ping_pong},
};

const PORT: u16 = 11211;
const RATE: u64 = 200;
const BURST: u64 = 50;

fn start_guard(topo: &Topology, mode: &str) -> GuardDaemon {
    let rate = RATE.to_string();
    let burst = BURST.to_string();
    GuardDaemon::start(
        &topo.server,
        &[
            "--iface",
            &topo.server_if().ifname,
            "--xdp-mode",
            mode,
            "--protect",
            &format!("*:{PORT}"),
            "--syn-rate",
            &rate,
            "--syn-burst",
            &burst,
            "--tenant-syn-rate",
            "0",
            "--global-syn-rate",
            "0",
        ],
    )
    .expect("start guard")
}

/// Floods from the client's own address while a second address connects and
/// an established connection exchanges data; asserts what got through.
fn flood_is_cut_to_rate(mode: &str) {
    let topo = Topology::new().expect("topology");
    topo.flush_tcp_metrics().unwrap();
    let server: SocketAddr = (IpAddr::V4(topo.server_v4()), PORT).into();
    let _echo = echo_server(&topo.server, server);
    let guard = start_guard(&topo, mode);
    let status = guard.cli(&["xdp", "status", "--json"]).unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains(&format!("\"mode\": \"{mode}\"")),
        "mode in status: {status}"
    );

    // An established connection from the second address, before the flood.
    let mut established = connect_from(
        &topo.client,
        topo.client2_v4.into(),
        server,
        Duration::from_secs(2),
    )
    .expect("connect before the flood");
    ping_pong(&mut established, 0);

    let syn_acks = FrameCounter::syn_acks(&topo.client, &topo.client_if().ifname).unwrap();
    let before = guard.counters().unwrap();
    let mut cfg = topo.syn_flood(SourceAddr::Fixed(topo.client_v4().into()), server, 400_000);
    cfg.max_duration = Duration::from_secs(4);
    let flood = SynFlood::start(&topo.client, cfg).expect("flood");

    // During the flood: the other address connects, the old connection talks.
    let mut connects = 0;
    for i in 1..=10 {
        std::thread::sleep(Duration::from_millis(200));
        let mut s = connect_from(
            &topo.client,
            topo.client2_v4.into(),
            server,
            Duration::from_secs(2),
        )
        .unwrap_or_else(|e| panic!("connect {i} during the flood: {e:#}"));
        ping_pong(&mut s, i);
        ping_pong(&mut established, i);
        connects += 1;
    }
    let stats = flood.join().expect("flood ran");
    std::thread::sleep(Duration::from_millis(300));
    let after = guard.counters().unwrap();
    let acks = syn_acks.stop().unwrap();

    let d = |k: &str| after[k] - before[k];
    let secs = stats.elapsed.as_secs_f64();
    let allowed = RATE as f64 * secs * 1.10 + BURST as f64;
    println!(
        "{mode}: flood sent {} SYNs in {secs:.2}s ({:.0}/s); guard admitted {}, dropped {}; \
         client saw {} SYN-ACKs ({} kernel drops); {connects} clean connects",
        stats.sent,
        stats.pps(),
        d("admitted"),
        d("drop_source"),
        acks.matched,
        acks.kernel_drops
    );
    // Five times the budget is a flood; a busy machine may send no more.
    assert!(stats.sent > 5 * allowed as u64, "the flood must be a flood");
    assert!(
        d("drop_source") >= stats.sent - allowed as u64 - 20,
        "the flood was dropped"
    );
    // Admitted: the flood's share plus the second address's 10 connects.
    assert!(
        (d("admitted") as f64) <= allowed + 10.0,
        "admitted {} > {allowed:.0} + 10",
        d("admitted")
    );
    // What the server answered: no more than what was admitted.
    assert!(
        (acks.matched as f64) <= allowed + 10.0 + acks.kernel_drops as f64,
        "SYN-ACKs {} > {allowed:.0}",
        acks.matched
    );
    assert!(
        acks.matched >= (RATE as f64 * secs * 0.5) as u64,
        "the server answered the admitted SYNs ({} SYN-ACKs)",
        acks.matched
    );
}

#[test]
fn flood_is_cut_to_rate_in_skb_mode() {
    flood_is_cut_to_rate("skb");
}

#[test]
fn flood_is_cut_to_rate_in_drv_mode() {
    flood_is_cut_to_rate("drv");
}

/// Restarting the daemon mid-flood must not open a gap: the pinned program
/// keeps judging, and its buckets keep their state.
#[test]
fn restart_during_flood_lets_nothing_through() {
    let topo = Topology::new().expect("topology");
    topo.flush_tcp_metrics().unwrap();
    let server: SocketAddr = (IpAddr::V4(topo.server_v4()), PORT).into();
    let _echo = echo_server(&topo.server, server);
    let mut guard = start_guard(&topo, "skb");
    let syn_acks = FrameCounter::syn_acks(&topo.client, &topo.client_if().ifname).unwrap();
    let before = guard.counters().unwrap();
    let mut cfg = topo.syn_flood(SourceAddr::Fixed(topo.client_v4().into()), server, 600_000);
    cfg.max_duration = Duration::from_secs(5);
    let flood = SynFlood::start(&topo.client, cfg).expect("flood");
    std::thread::sleep(Duration::from_millis(1000));
    let mut downtime = Duration::ZERO;
    for _ in 0..3 {
        downtime += guard.restart().expect("restart");
        std::thread::sleep(Duration::from_millis(300));
    }
    let stats = flood.join().expect("flood ran");
    std::thread::sleep(Duration::from_millis(300));
    let after = guard.counters().unwrap();
    let acks = syn_acks.stop().unwrap();
    let log = guard.log_text();
    assert_eq!(
        log.matches("adopted the pinned XDP link").count(),
        3,
        "every restart adopted the pinned link:\n{log}"
    );
    let secs = stats.elapsed.as_secs_f64();
    let allowed = RATE as f64 * secs * 1.10 + BURST as f64;
    let admitted = after["admitted"] - before["admitted"];
    let dropped = after["drop_source"] - before["drop_source"];
    println!(
        "3 restarts ({:.0} ms total) during a {secs:.2}s flood of {} SYNs: admitted {admitted}, \
         dropped {dropped}, SYN-ACKs {}",
        downtime.as_secs_f64() * 1000.0,
        stats.sent,
        acks.matched
    );
    // Every SYN of the flood was judged: none slipped past while restarting.
    assert!(
        admitted + dropped >= stats.sent,
        "all {} SYNs judged",
        stats.sent
    );
    assert!(
        (admitted as f64) <= allowed,
        "admitted {admitted} > {allowed:.0}"
    );
    assert!(
        (acks.matched as f64) <= allowed + acks.kernel_drops as f64,
        "SYN-ACKs {} > {allowed:.0}",
        acks.matched
    );
}

#[test]
fn deny_and_allow_update_live_and_expire() {
    let topo = Topology::new().expect("topology");
    let server: SocketAddr = (IpAddr::V4(topo.server_v4()), PORT).into();
    let _echo = echo_server(&topo.server, server);
    let guard = start_guard(&topo, "skb");
    let connect = |src: IpAddr| connect_from(&topo.client, src, server, Duration::from_millis(700));
    connect(topo.client_v4().into()).expect("connects before deny");

    let deny = format!("{}/32", topo.client_v4());
    let out = guard.cli(&["deny", "add", &deny, "--ttl", "2"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed =
        String::from_utf8_lossy(&guard.cli(&["deny", "list"]).unwrap().stdout).into_owned();
    assert!(listed.contains(&deny), "{listed}");
    let before = guard.counters().unwrap();
    let denied = connect(topo.client_v4().into()).expect_err("denied source cannot connect");
    // Dropped, not refused: a refusal would mean the SYN reached the server.
    assert_eq!(
        connect_error_kind(&denied),
        Some(std::io::ErrorKind::TimedOut),
        "{denied:#}"
    );
    assert!(guard.counters().unwrap()["drop_deny"] > before["drop_deny"]);
    // The other address is unaffected.
    connect(topo.client2_v4.into()).expect("other source connects");

    // The daemon removes the entry once it expires.
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let out = guard.cli(&["deny", "list", "--json"]).unwrap();
        if String::from_utf8_lossy(&out.stdout).trim() == "[]" {
            break;
        }
        assert!(Instant::now() < deadline, "expired entry not removed");
        std::thread::sleep(Duration::from_millis(200));
    }
    connect(topo.client_v4().into()).expect("connects after expiry");

    // Allowed sources bypass the buckets entirely.
    let allow = format!("{}", topo.client2_v4);
    assert!(
        guard
            .cli(&["allow", "add", &allow])
            .unwrap()
            .status
            .success()
    );
    let before = guard.counters().unwrap();
    for _ in 0..5 {
        connect(topo.client2_v4.into()).expect("allowed source connects");
    }
    assert!(guard.counters().unwrap()["allowed"] >= before["allowed"] + 5);
    assert!(
        guard
            .cli(&["allow", "del", &allow])
            .unwrap()
            .status
            .success()
    );
    let out = guard.cli(&["allow", "del", &allow]).unwrap();
    assert!(!out.status.success(), "deleting twice is an error");
}

#[test]
fn sighup_reloads_the_config_file_in_place() {
    let topo = Topology::new().expect("topology");
    let dir = guard_tests::TempDir::new("conf").unwrap();
    let conf = dir.join("guard.toml");
    let write = |rate: u64| {
        std::fs::write(
            &conf,
            format!(
                "[xdp]\ninterfaces = [\"{}\"]\nmode = \"skb\"\nprotect = [\"*:{PORT}\"]\nsyn_rate = {rate}\nsyn_burst = 10\n",
                topo.server_if().ifname
            ),
        )
        .unwrap()
    };
    write(100);
    let mut guard =
        GuardDaemon::start(&topo.server, &["--config", conf.to_str().unwrap()]).unwrap();
    let rate = |g: &GuardDaemon| g.maps().unwrap().config().unwrap().source.rate();
    assert_eq!(rate(&guard), 100);
    write(7);
    guard.signal(libc::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rate(&guard) != 7 {
        assert!(
            Instant::now() < deadline,
            "reload not applied:\n{}",
            guard.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A broken file is refused and the running configuration kept.
    std::fs::write(&conf, "[xdp]\nsyn_rate = \"lots\"\n").unwrap();
    guard.signal(libc::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !guard.log_text().contains("reload failed") {
        assert!(Instant::now() < deadline, "bad reload not reported");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rate(&guard), 7);
    drop(guard);
}

#[test]
fn restart_with_an_edited_config_removes_only_what_the_config_dropped() {
    let topo = Topology::new().expect("topology");
    let dir = guard_tests::TempDir::new("conf").unwrap();
    let conf = dir.join("guard.toml");
    let write = |deny: &str| {
        std::fs::write(
            &conf,
            format!(
                "[xdp]\ninterfaces = [\"{}\"]\nmode = \"skb\"\nprotect = [\"*:{PORT}\"]\ndeny = [{deny}]\n",
                topo.server_if().ifname
            ),
        )
        .unwrap()
    };
    write("\"192.0.2.0/24\", \"2001:db8::/32\"");
    let mut guard =
        GuardDaemon::start(&topo.server, &["--config", conf.to_str().unwrap()]).unwrap();
    let live = "198.51.100.7/32";
    assert!(guard.cli(&["deny", "add", live]).unwrap().status.success());
    let listed = |g: &GuardDaemon| {
        String::from_utf8_lossy(&g.cli(&["deny", "list", "--json"]).unwrap().stdout).into_owned()
    };
    let before = listed(&guard);
    for cidr in ["192.0.2.0/24", "2001:db8::/32", live] {
        assert!(before.contains(cidr), "{cidr} missing: {before}");
    }

    // The maps outlive the daemon: the next one, started with a config
    // that no longer denies 192.0.2.0/24, must remove it, keep the entry
    // the config still has, and leave the live entry alone.
    write("\"2001:db8::/32\"");
    guard.restart().unwrap();
    let after = listed(&guard);
    assert!(
        !after.contains("192.0.2.0/24"),
        "stale config entry kept: {after}"
    );
    assert!(after.contains("2001:db8::/32"), "{after}");
    assert!(after.contains(live), "live entry lost: {after}");
    // Each says where it came from.
    let text = String::from_utf8_lossy(&guard.cli(&["deny", "list"]).unwrap().stdout).into_owned();
    let origin = |cidr: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{cidr} ")))
            .and_then(|l| l.split_whitespace().last())
            .map(str::to_string)
    };
    assert_eq!(origin("2001:db8::/32").as_deref(), Some("config"), "{text}");
    assert_eq!(origin(live).as_deref(), Some("operator"), "{text}");
    drop(guard);
}

#[test]
fn detach_removes_program_and_pins() {
    let topo = Topology::new().expect("topology");
    let mut guard = start_guard(&topo, "skb");
    guard.stop().unwrap();
    let link = |t: &Topology| {
        String::from_utf8_lossy(
            &t.server
                .exec("ip", ["link", "show", &t.server_if().ifname])
                .unwrap()
                .stdout,
        )
        .into_owned()
    };
    assert!(
        link(&topo).contains("xdp"),
        "stays attached after the daemon stops"
    );
    let out = guard.cli(&["xdp", "detach"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!link(&topo).contains("xdp"), "detached");
    assert!(!guard.paths().pin_dir().exists(), "pins removed");
}

/// An upgrade to a build with another map layout: the link the older
/// layout pinned is taken over in place (never detached), and the older
/// pins and state are removed.
#[test]
fn an_older_layouts_link_is_taken_over_in_place() {
    let topo = Topology::new().expect("topology");
    let mut guard = start_guard(&topo, "skb");
    guard.stop().unwrap();
    let paths = guard.paths();
    let older = guard_common::LAYOUT_VERSION - 1;
    // What a daemon of the older layout leaves behind, one version back.
    let older_pins = paths.pin_root().join(format!("v{older}"));
    std::fs::rename(paths.pin_dir(), &older_pins).expect("move the pins back a layout");
    let state_dir = paths.state_file().parent().unwrap().to_path_buf();
    let older_state = state_dir.with_file_name(format!("v{older}"));
    std::fs::rename(&state_dir, &older_state).expect("move the state back a layout");
    let before = topo
        .server_xdp_prog_id()
        .expect("attached while the daemon is stopped");

    guard.restart().expect("start the upgraded daemon");
    let log = guard.log_text();
    assert!(
        log.contains("taking over the XDP link pinned under"),
        "the older link is taken over:\n{log}"
    );
    assert!(
        log.contains("adopted the pinned XDP link (skb mode)"),
        "swapped in place, mode kept:\n{log}"
    );
    let after = topo.server_xdp_prog_id().expect("still attached");
    assert_ne!(before, after, "the new program runs");
    assert!(paths.link_pin(&topo.server_if().ifname).exists());
    assert!(!older_pins.exists(), "older pins removed");
    assert!(!older_state.exists(), "older state removed");
    // The new program judges with the new maps.
    let server: SocketAddr = (IpAddr::V4(topo.server_v4()), PORT).into();
    let judged = guard.counters().unwrap()["judged"];
    let cfg = topo.syn_flood(SourceAddr::Fixed(topo.client_v4().into()), server, 100);
    SynFlood::run(&topo.client, cfg).expect("flood");
    assert_eq!(guard.counters().unwrap()["judged"], judged + 100);
}

/// A spoofed flood in which nearly every SYN comes from a source never
/// seen before: the daemon summarises it in a few lines per interval at a
/// small CPU cost, while every SYN is still judged and counted.
#[test]
fn spoofed_flood_is_summarised_not_logged() {
    use guard_tests::procstat::cpu_time;
    const INTERVAL_SECS: u64 = 2;
    const EVENT_RATE: u64 = 200;
    const EVENT_BURST: u64 = 400;
    let topo = Topology::new().expect("topology");
    let server: SocketAddr = (IpAddr::V4(topo.server_v4()), PORT).into();
    // The defaults, except a short report interval.
    let guard = GuardDaemon::start(
        &topo.server,
        &[
            "--iface",
            &topo.server_if().ifname,
            "--xdp-mode",
            "skb",
            "--protect",
            &format!("*:{PORT}"),
            "--report-interval-secs",
            &INTERVAL_SECS.to_string(),
        ],
    )
    .expect("start guard");
    let pid = guard.pid().expect("running");
    let lines_before = guard.log_text().lines().count();
    let cpu_before = cpu_time(pid);
    let before = guard.counters().unwrap();
    let start = Instant::now();
    let mut cfg = topo.syn_flood(topo.spoofed_sources_v4(), server, 3_000_000);
    cfg.max_duration = Duration::from_secs(6);
    let stats = SynFlood::run(&topo.client, cfg).expect("flood");
    // Long enough for the interval that holds the flood's end to report.
    std::thread::sleep(Duration::from_secs(INTERVAL_SECS) + Duration::from_millis(700));
    let wall = start.elapsed();
    let cpu = cpu_time(pid) - cpu_before;
    let after = guard.counters().unwrap();
    let log = guard.log_text();
    let new_lines: Vec<&str> = log.lines().skip(lines_before).collect();
    let d = |k: &str| after[k] - before[k];
    let dropped = d("drop_source") + d("drop_tenant") + d("drop_global");
    let crossed = d("crossed_source") + d("crossed_tenant") + d("crossed_global");
    println!(
        "spoofed flood: {} SYNs in {:.2}s ({:.0}/s); judged {}, admitted {}, dropped {dropped}; \
         {crossed} crossings, {} events sent, {} suppressed, {} lost; daemon: {} log lines and \
         {:.1} ms CPU in {:.1}s",
        stats.sent,
        stats.elapsed.as_secs_f64(),
        stats.pps(),
        d("judged"),
        d("admitted"),
        d("events_sent"),
        d("events_suppressed"),
        d("events_lost"),
        new_lines.len(),
        cpu.as_secs_f64() * 1000.0,
        wall.as_secs_f64(),
    );
    for line in &new_lines {
        println!("  {line}");
    }
    assert!(stats.sent >= 500_000, "the flood must be a flood");
    // Every SYN that reached the program is judged and its fate counted.
    assert_eq!(d("judged"), d("admitted") + dropped);
    assert!(
        d("judged") >= stats.sent * 9 / 10,
        "the program judged {} of {} SYNs",
        d("judged"),
        stats.sent
    );
    assert!(dropped >= stats.sent / 2, "the flood was dropped");
    assert_eq!(
        crossed,
        d("events_sent") + d("events_suppressed") + d("events_lost"),
        "every crossing is described, suppressed or lost"
    );
    assert!(
        crossed > 100_000,
        "a spoofed flood crosses budgets from many sources"
    );
    let budget = EVENT_BURST + EVENT_RATE * (wall.as_secs() + 1);
    assert!(
        d("events_sent") <= budget,
        "{} events sent, budget {budget}",
        d("events_sent")
    );
    // A few summary lines per interval, whatever the flood.
    let intervals = wall.as_secs() / INTERVAL_SECS + 1;
    assert!(
        new_lines.len() as u64 <= 4 * intervals,
        "{} log lines in {intervals} intervals:\n{}",
        new_lines.len(),
        new_lines.join("\n")
    );
    assert!(
        new_lines
            .iter()
            .any(|l| l.contains("tenant SYN budgets: ") && l.contains("SYNs dropped")),
        "the drops are summarised:\n{}",
        new_lines.join("\n")
    );
    assert!(
        new_lines.iter().any(|l| l.contains("counted only")),
        "suppressed events are reported:\n{}",
        new_lines.join("\n")
    );
    // Generous: the flood itself is the kernel's work, not the daemon's.
    assert!(
        cpu.as_secs_f64() < 0.1 * wall.as_secs_f64(),
        "daemon used {:.0} ms of CPU in {:.1}s",
        cpu.as_secs_f64() * 1000.0,
        wall.as_secs_f64()
    );
    let status = guard.cli(&["xdp", "status"]).unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains("heaviest sources since the daemon started") && status.contains("10."),
        "status names the heaviest sources:\n{status}"
    );
}
