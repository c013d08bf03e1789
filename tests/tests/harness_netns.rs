//! Harness self-tests; need root. Run with `--test-threads=1`.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use guard_tests::frames::{self, SynSpec, Tcp, proto};
use guard_tests::net::connect_error_kind;
use guard_tests::netns::list_netns;
use guard_tests::*;

const T: Duration = Duration::from_secs(3);

fn names_of(t: &Topology) -> Vec<String> {
    vec![t.server.name().to_owned(), t.client.name().to_owned()]
}

fn assert_gone(names: &[String]) {
    let live = list_netns();
    for n in names {
        assert!(!live.contains(n), "namespace {n} still listed: {live:?}");
        assert!(
            !std::path::Path::new("/run/netns").join(n).exists(),
            "{n} still pinned"
        );
    }
}

#[test]
fn names_are_unique_and_short() {
    let pid = std::process::id().to_string();
    let a = unique_name("x");
    assert!(a.contains(&pid) && a != unique_name("x"));
    for tag in ["", "v", "averyveryverylongtag"] {
        let n = unique_ifname(tag);
        assert!(n.len() <= IFNAME_MAX && n.contains(&pid), "{n}");
    }
}

#[test]
fn topology_connects_and_cleans_up() {
    require_root();
    let t = Topology::new().unwrap();
    let names = names_of(&t);
    for n in &names {
        assert!(list_netns().contains(n));
    }
    for end in [t.server_if(), t.client_if()] {
        assert!(end.ifname.len() <= IFNAME_MAX);
        assert!(end.ifindex > 0 && end.mac != [0; 6]);
    }
    assert_eq!(
        t.client
            .sysctl_get("net.ipv4.ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["1024", "65535"]
    );
    assert_eq!(t.client.sysctl_get("net.ipv4.tcp_tw_reuse").unwrap(), "1");
    assert_eq!(
        t.server.sysctl_get("net.ipv4.tcp_no_metrics_save").unwrap(),
        "1"
    );
    assert_eq!(t.server.sysctl_get("net.core.somaxconn").unwrap(), "65535");
    t.set_syncookies(2).unwrap();
    assert_eq!(t.server.sysctl_get("net.ipv4.tcp_syncookies").unwrap(), "2");
    // The root namespace's view must be untouched by the namespaced write.
    assert_ne!(
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_syncookies")
            .unwrap()
            .trim(),
        "2"
    );
    t.set_syncookies(1).unwrap();

    let acc4 =
        AcceptCounter::start(&t.server, SocketAddr::new(t.server_v4().into(), 0), 128).unwrap();
    let acc6 =
        AcceptCounter::start(&t.server, SocketAddr::new(t.server_v6().into(), 0), 128).unwrap();
    let pairs: [(IpAddr, SocketAddr); 4] = [
        (t.client_v4().into(), acc4.local_addr()),
        (t.client2_v4.into(), acc4.local_addr()),
        (t.client_v6().into(), acc6.local_addr()),
        (t.client2_v6.into(), acc6.local_addr()),
    ];
    for (src, dst) in pairs {
        let s = connect_from(&t.client, src, dst, T).unwrap();
        assert_eq!(s.local_addr().unwrap().ip(), src);
    }
    let deadline = Instant::now() + T;
    while acc4.count() + acc6.count() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!((acc4.count(), acc6.count()), (2, 2));
    assert_eq!(acc4.stop().unwrap(), 2);
    drop(acc6);

    // Traffic must not leak out of the namespaces: the root namespace has no route to them.
    let e = connect_in(&t.client, SocketAddr::new(t.server_v4().into(), 1), T)
        .expect_err("nothing listens on port 1");
    // Refused by the server namespace's kernel, not lost on the way.
    assert_eq!(
        connect_error_kind(&e),
        Some(std::io::ErrorKind::ConnectionRefused),
        "{e:#}"
    );
    let c = t.server.counters().unwrap();
    assert!(c.get("TcpPassiveOpens") >= 4, "{:?}", c.nonzero());
    t.flush_tcp_metrics().unwrap();
    drop(t);
    assert_gone(&names);
}

#[test]
fn ping_across_when_available() {
    require_root();
    let t = Topology::new().unwrap();
    let has_ping = std::process::Command::new("sh")
        .args(["-c", "command -v ping"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_ping {
        t.client
            .exec_ok("ping", ["-c", "1", "-W", "2", &t.server_v4().to_string()])
            .unwrap();
        t.client
            .exec_ok(
                "ping",
                ["-6", "-c", "1", "-W", "2", &t.server_v6().to_string()],
            )
            .unwrap();
    } else {
        // No ping installed: a TCP connect proves reachability instead.
        let l = listen_in(&t.server, SocketAddr::new(t.server_v4().into(), 0), 16).unwrap();
        connect_in(&t.client, l.local_addr().unwrap(), T).unwrap();
    }
}

#[test]
fn drop_cleans_up_after_panic() {
    require_root();
    let seen = Mutex::new(Vec::new());
    let r = catch_unwind(AssertUnwindSafe(|| {
        let t = Topology::new().unwrap();
        seen.lock().unwrap().extend(names_of(&t));
        let _lone = NetNs::new("lone").unwrap();
        seen.lock().unwrap().push(_lone.name().to_owned());
        let _sleeper = t.server.spawn("sleep", ["60"]).unwrap();
        panic!("deliberate");
    }));
    assert!(r.is_err());
    let ns = NetNs::new("pp").unwrap();
    seen.lock().unwrap().push(ns.name().to_owned());
    let r = catch_unwind(AssertUnwindSafe(|| ns.run_in(|| panic!("inside run_in"))));
    assert!(r.is_err(), "a panic in run_in must reach the caller");
    drop(ns);
    let names = seen.into_inner().unwrap();
    assert_eq!(names.len(), 4);
    assert_gone(&names);
}

/// Floods `count` SYNs and checks the server's kernel saw and answered them.
fn flood_and_check(t: &Topology, source: SourceAddr, dst: SocketAddr, count: u64) -> Counters {
    let before = t.server.counters().unwrap();
    let link_before = t.server.link_stats(&t.server_if().ifname).unwrap();
    let synacks = FrameCounter::syn_acks(&t.client, &t.client_if().ifname).unwrap();
    let stats = SynFlood::run(&t.client, t.syn_flood(source, dst, count)).unwrap();
    assert_eq!(stats.sent, count, "{stats:?}");
    assert!(!stats.timed_out);
    let seen = synacks.wait_for(count * 9 / 10, Duration::from_secs(5));
    let sa = synacks.stop().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let d = t.server.counters().unwrap().delta(&before);
    let link = t.server.link_stats(&t.server_if().ifname).unwrap();
    eprintln!(
        "{source:?} -> {dst}: {stats:?} ({:.0} pps), syn-acks {seen} {sa:?}, server {:?}",
        stats.pps(),
        d.nonzero()
    );
    let inbound = if dst.is_ipv4() {
        d.get("IpInReceives")
    } else {
        d.get("Ip6InReceives")
    };
    assert!(inbound >= count, "server IP layer saw {inbound} of {count}");
    assert!(link.rx_packets - link_before.rx_packets >= count);
    assert!(d.get("TcpInSegs") >= count);
    assert_eq!(
        d.get("TcpInCsumErrors") + d.get("TcpInErrs"),
        0,
        "crafted checksums rejected"
    );
    // Every SYN is answered, from the request queue or with a cookie.
    assert!(d.get("TcpOutSegs") >= count * 9 / 10, "{:?}", d.nonzero());
    assert!(seen >= count * 9 / 10, "client saw {seen} SYN-ACKs");
    d
}

#[test]
fn syn_flood_v4_fixed_and_random() {
    require_root();
    let t = Topology::new().unwrap();
    let l = listen_in(&t.server, SocketAddr::new(t.server_v4().into(), 8080), 256).unwrap();
    let dst = l.local_addr().unwrap();
    // A fixed real source: the client kernel answers each SYN-ACK with RST.
    flood_and_check(&t, SourceAddr::Fixed(t.client_v4().into()), dst, 20_000);
    // Spoofed sources never complete, so the 256-entry queue overflows into cookies.
    let d = flood_and_check(&t, t.random_source_v4(), dst, 20_000);
    assert!(d.get("TcpExtSyncookiesSent") > 10_000, "{:?}", d.nonzero());
    drop(l);
}

#[test]
fn syn_flood_v6_is_answered() {
    require_root();
    let t = Topology::new().unwrap();
    let l = listen_in(&t.server, SocketAddr::new(t.server_v6().into(), 8443), 256).unwrap();
    let dst = l.local_addr().unwrap();
    flood_and_check(&t, SourceAddr::Fixed(t.client_v6().into()), dst, 5_000);
    flood_and_check(&t, t.random_source_v6(), dst, 5_000);
    // The NAPI receive path (what an XDP program also forces) accepts them too.
    t.server_if().set_offload("gro", true).unwrap();
    flood_and_check(&t, t.random_source_v6(), dst, 5_000);
}

#[test]
fn flood_respects_time_and_rate_bounds() {
    require_root();
    let t = Topology::new().unwrap();
    let _l = listen_in(&t.server, SocketAddr::new(t.server_v4().into(), 80), 256).unwrap();
    let dst = SocketAddr::new(t.server_v4().into(), 80);
    let mut cfg = t.syn_flood(t.random_source_v4(), dst, 1_000_000);
    cfg.rate_pps = Some(5_000);
    cfg.max_duration = Duration::from_millis(400);
    let s = SynFlood::run(&t.client, cfg).unwrap();
    assert!(s.timed_out, "{s:?}");
    assert!(s.elapsed < Duration::from_secs(1), "{s:?}");
    assert!(
        (1_000..=3_000).contains(&s.sent),
        "paced ~2000 in 0.4 s, got {s:?}"
    );

    // Early stop through the handle, and drop of a running flood.
    let mut cfg = t.syn_flood(t.random_source_v4(), dst, 1_000_000);
    cfg.rate_pps = Some(1_000);
    let f = SynFlood::start(&t.client, cfg.clone()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    f.stop();
    let s = f.join().unwrap();
    assert!(!s.timed_out && s.sent < 1_000_000);
    let started = Instant::now();
    drop(SynFlood::start(&t.client, cfg).unwrap());
    assert!(started.elapsed() < Duration::from_secs(2));

    // Mismatched families are refused up front.
    assert!(
        SynFlood::start(
            &t.client,
            t.syn_flood(SourceAddr::Fixed(t.client_v6().into()), dst, 1)
        )
        .is_err()
    );
}

#[test]
fn single_crafted_frames_bad_checksum_counted() {
    require_root();
    let t = Topology::new().unwrap();
    let l = listen_in(&t.server, SocketAddr::new(t.server_v4().into(), 9000), 16).unwrap();
    let (c, s) = (t.client_if(), t.server_if());
    let spec = SynSpec {
        dst_mac: s.mac,
        src_mac: c.mac,
        src: t.client2_v4.into(),
        dst: t.server_v4().into(),
        src_port: 40000,
        dst_port: 9000,
        seq: 1,
    };
    let good = frames::syn_frame(&spec);
    let seg = Tcp {
        checksum: Some(0xbad0),
        ..Tcp::syn(40001, 9000, 1)
    }
    .build(spec.src, spec.dst, &[]);
    let bad = frames::eth_frame(
        s.mac,
        c.mac,
        &frames::ip_packet(spec.src, spec.dst, proto::TCP, &seg),
    );
    let synacks = FrameCounter::syn_acks(&t.client, &c.ifname).unwrap();
    let before = t.server.counters().unwrap();
    assert_eq!(send_frames(&t.client, c.ifindex, &[good, bad]).unwrap(), 2);
    assert_eq!(synacks.wait_for(1, T), 1);
    std::thread::sleep(Duration::from_millis(100));
    let d = t.server.counters().unwrap().delta(&before);
    assert_eq!(d.get("TcpInCsumErrors"), 1, "{:?}", d.nonzero());
    assert_eq!(synacks.stop().unwrap().matched, 1);
    drop(l);
}

#[test]
fn nstat_agrees_with_proc() {
    require_root();
    let t = Topology::new().unwrap();
    let l = listen_in(&t.server, SocketAddr::new(t.server_v4().into(), 0), 16).unwrap();
    connect_in(&t.client, l.local_addr().unwrap(), T).unwrap();
    let a = t.server.counters().unwrap();
    let n = t.server.nstat().unwrap();
    for k in [
        "TcpPassiveOpens",
        "TcpExtSyncookiesSent",
        "TcpExtListenDrops",
        "TcpOutSegs",
    ] {
        assert!(n.try_get(k).is_some() && a.try_get(k).is_some(), "{k}");
    }
    assert_eq!(n.get("TcpPassiveOpens"), 1);
    assert_eq!(a.get("TcpPassiveOpens"), 1);
    // Counters are per namespace: the client saw no passive opens.
    assert_eq!(t.client.counters().unwrap().get("TcpPassiveOpens"), 0);
}

#[test]
fn child_guard_terminates_and_kills() {
    require_root();
    let ns = NetNs::new("child").unwrap();
    let gone = |pid: u32| unsafe { libc::kill(pid as i32, 0) } != 0;
    let c = ns.spawn("sleep", ["60"]).unwrap();
    let pid = c.pid();
    assert!(!gone(pid));
    drop(c);
    assert!(gone(pid));

    // A child ignoring SIGTERM is SIGKILLed after the grace period.
    let mut cmd = ns.command("sh");
    cmd.args(["-c", "trap '' TERM; exec sleep 60"]);
    let mut c = ChildGuard::spawn(&mut cmd)
        .unwrap()
        .with_grace(Duration::from_millis(300));
    std::thread::sleep(Duration::from_millis(100));
    let pid = c.pid();
    let started = Instant::now();
    let status = c.terminate().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    drop(c);
    assert!(gone(pid));

    // The command runs inside the namespace: it sees only its own interfaces.
    let out = ns.exec_ok("ip", ["-o", "link"]).unwrap();
    assert_eq!(out.lines().count(), 1, "{out}");
}

fn memcached_version(ns: Option<&NsHandle>, addr: SocketAddr) -> String {
    let mut s = match ns {
        Some(ns) => connect_in(ns, addr, T).unwrap(),
        None => std::net::TcpStream::connect_timeout(&addr, T).unwrap(),
    };
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"version\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn memcached_in_namespace_and_loopback() {
    require_root();
    let t = Topology::new().unwrap();
    let m4 = t
        .server
        .start_memcached(SocketAddr::new(t.server_v4().into(), 11211))
        .unwrap();
    let m6 = t
        .server
        .start_memcached(SocketAddr::new(t.server_v6().into(), 11212))
        .unwrap();
    assert!(memcached_version(Some(&t.client), m4.addr()).starts_with("VERSION"));
    assert!(memcached_version(Some(&t.client), m6.addr()).starts_with("VERSION"));
    let lo = Memcached::start();
    assert!(memcached_version(None, lo.addr()).starts_with("VERSION"));
    let pids = [m4.pid(), m6.pid(), lo.pid()];
    drop((lo, m6, m4));
    for p in pids {
        assert!(
            unsafe { libc::kill(p as i32, 0) } != 0,
            "memcached {p} survived"
        );
    }
}
