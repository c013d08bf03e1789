//! Tier 3: the incident's connection burst against the real binary.
//! 16,000 clients connect at once to guard's proxy, each sending a `get`
//! to a backend that has stopped answering (SIGSTOP), and stay; 2,500
//! more arrive while the first send 48,000 more gets; then all of them
//! leave, half with a FIN and half with a reset, their requests still in
//! flight. Every client must get in without a SYN retransmit (a listen
//! backlog of 128 overflows within milliseconds and costs each
//! overflowing client a second), the burst in a time of the same order as
//! the kernel needs for a plain listener, and guard must release every
//! socket at once: no CLOSE_WAIT a second later. The test prints how long
//! connections waited in guard's accept queue.
//!
//! `GUARD_STORM_BACKLOG=128` runs guard with that backlog instead of its
//! default, to see the test fail as the incident did. Needs root; run with
//! `--test-threads=1`.

use std::{
    io::{ErrorKind, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use guard_tests::{
    AcceptCounter, BurstConfig, NsHandle, Topology, burst, close_with_reset, connect_in,
    daemon::GuardDaemon, net::memcache_stats, procstat::cpu_time, require_root,
};

const CLIENTS: usize = 16_000;
/// Clients that arrive while the first ones are busy.
const LATE: usize = 2_500;
const PORT: u16 = 11311;
const KERNEL_PORT: u16 = 11411;
/// A connect this slow waited for at least one SYN retransmit.
const RETRANSMITTED: Duration = Duration::from_millis(900);

#[test]
fn burst_of_16000_clients_is_accepted_at_once_and_released_at_once() {
    require_root();
    // Every client socket lives here, plus the harness's own.
    let limit = guard::descriptors::raise_soft_limit().expect("descriptor limit");
    assert!(
        limit >= (CLIENTS + LATE) as u64 + 1_000,
        "the descriptor limit ({limit}) cannot hold {} clients: raise the hard limit",
        CLIENTS + LATE
    );
    let topo = Topology::new().expect("topology");
    topo.flush_tcp_metrics().unwrap();
    let mut mc = topo
        .server
        .start_memcached("127.0.0.1:11211".parse().unwrap())
        .expect("memcached");
    let listen = SocketAddr::new(IpAddr::V4(topo.server_v4()), PORT);
    let backlog = std::env::var("GUARD_STORM_BACKLOG").unwrap_or_else(|_| "4096".into());
    let guard = GuardDaemon::start_proxy(
        &topo.server,
        &[
            "--listen",
            &listen.to_string(),
            "--backend",
            &mc.addr().to_string(),
            "--backlog",
            &backlog,
            // One client host opens them all.
            "--max-connections-per-source",
            "0",
            // The gets stay in flight for the whole test, never timed out
            // nor refused for filling the backend connections.
            "--request-timeout-ms",
            "60000",
            "--backend-max-in-flight",
            "1000000",
            "--drain-grace-secs",
            "1",
        ],
    )
    .expect("guard");
    // The backend connections are up before the backend stops.
    let mut warm = connect_in(&topo.client, listen, Duration::from_secs(2)).expect("connect");
    warm.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(memcache_stats(&mut warm).unwrap()["curr_connections"], "1");
    drop(warm);
    mc.child().signal(libc::SIGSTOP).unwrap();

    // Sixteen clients at a time, each connecting again as soon as it is
    // in. They run niced: on these shared cores the load generator would
    // otherwise take the CPU the listener needs, which clients on other
    // hosts never do (even a plain listener then overflows now and then).
    let config = BurstConfig {
        clients: CLIENTS,
        threads: 16,
        nice: 10,
        ..BurstConfig::default()
    };

    // What the kernel needs: a listener with guard's default backlog whose
    // thread accepts and closes, the same burst from the same namespace.
    let kernel = {
        let counter = AcceptCounter::start(
            &topo.server,
            SocketAddr::new(IpAddr::V4(topo.server_v4()), KERNEL_PORT),
            4096,
        )
        .expect("plain listener");
        let before = topo.server.counters().unwrap();
        let b = burst(Some(&topo.client), counter.local_addr(), &config).expect("kernel burst");
        wait_for("the plain listener to accept every client", || {
            counter.count() as usize >= b.streams.len()
        });
        println!(
            "kernel (plain listener, backlog 4096): {}; {} listen queue overflows",
            b.summary(),
            overflows(&topo.server, &before)
        );
        assert_eq!(b.failed, 0, "the plain listener: {:?}", b.first_error);
        b
    };
    let (kernel_elapsed, kernel_retransmitted) =
        (kernel.elapsed, kernel.slower_than(RETRANSMITTED));
    drop(kernel);

    let before = topo.server.counters().unwrap();
    let pid = guard.pid().expect("guard runs");
    let cpu_before = cpu_time(pid);
    let b = burst(Some(&topo.client), listen, &config).expect("guard burst");
    let overflows = overflows(&topo.server, &before);
    let cpu = cpu_time(pid).saturating_sub(cpu_before);
    println!(
        "guard (backlog {backlog}): {}; {overflows} listen queue overflows; guard used {:.0} ms \
         of CPU ({:.1} µs per client)",
        b.summary(),
        cpu.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e6 / CLIENTS as f64,
    );
    assert_eq!(
        b.failed, 0,
        "clients failed to connect: {:?}",
        b.first_error
    );
    // What the plain listener could not avoid on this machine is not
    // guard's fault; beyond that, next to none (0.1%: a backlog of 128
    // costs 35-90 here, 4096 none on a quiet machine).
    let allowed = kernel_retransmitted + CLIENTS / 1_000;
    let retransmitted = b.slower_than(RETRANSMITTED);
    assert!(
        retransmitted <= allowed,
        "{retransmitted} of {CLIENTS} connects took >= {RETRANSMITTED:?} (allowed {allowed}): \
         their SYNs were dropped ({overflows} listen queue overflows)"
    );
    let bound = kernel_elapsed * 4 + Duration::from_secs(2);
    assert!(
        b.elapsed <= bound,
        "guard took {:?} for what the kernel alone does in {kernel_elapsed:?} (bound {bound:?})",
        b.elapsed
    );

    // Every client is established, and guard has accepted each one.
    wait_for("every client to be established", || {
        sockets(&topo.server, "established", PORT) == CLIENTS
    });
    let mut probe = connect_in(&topo.client, listen, Duration::from_secs(5)).expect("connect");
    probe
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    wait_for("guard to accept every client", || {
        stat(&mut probe, "curr_connections") == CLIENTS as u64 + 1
    });
    let after_burst = AcceptWait::read(&mut probe);
    println!(
        "guard's accept queue wait during the burst: {}",
        after_burst.since(&AcceptWait::default())
    );

    // Under load: every client sends three more gets at once (48,000
    // requests for the sessions to read and forward) while more clients
    // arrive. The accept loop must not wait behind the busy sessions.
    let mut streams = b.streams;
    let herd = std::thread::spawn(move || {
        for _ in 0..3 {
            for mut s in &streams {
                let _ = s.write_all(b"get k\r\n");
            }
        }
        streams
    });
    let late_config = BurstConfig {
        clients: LATE,
        ..config.clone()
    };
    let late = burst(Some(&topo.client), listen, &late_config).expect("late burst");
    streams = herd.join().expect("herd writer");
    println!(
        "{LATE} more clients while 16,000 send 48,000 gets: {}",
        late.summary()
    );
    assert_eq!(late.failed, 0, "late clients: {:?}", late.first_error);
    let allowed = kernel_retransmitted + LATE / 1_000;
    let retransmitted = late.slower_than(RETRANSMITTED);
    assert!(
        retransmitted <= allowed,
        "{retransmitted} of {LATE} late connects took >= {RETRANSMITTED:?} (allowed {allowed})"
    );
    streams.extend(late.streams);
    let total = CLIENTS + LATE;
    wait_for("guard to accept the late clients", || {
        stat(&mut probe, "curr_connections") == total as u64 + 1
    });
    println!(
        "guard's accept queue wait for the late clients: {}",
        AcceptWait::read(&mut probe).since(&after_burst)
    );

    // The backend is stopped: no get has been answered.
    let mut answered = 0;
    for s in &streams {
        s.set_nonblocking(true).unwrap();
        match s.peek(&mut [0u8; 1]) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            _ => answered += 1,
        }
    }
    assert_eq!(answered, 0, "gets answered (or connections closed) early");

    // Everyone leaves with requests in flight; guard must let go at once.
    let left = Instant::now();
    for (i, s) in streams.into_iter().enumerate() {
        if i % 2 == 0 {
            drop(s);
        } else {
            close_with_reset(s);
        }
    }
    // Asking guard is cheap; listing 18,500 sockets with `ss` every few
    // milliseconds would take the CPU guard needs to close them.
    let mut ended_after = None;
    while left.elapsed() < Duration::from_secs(1) {
        if stat(&mut probe, "curr_connections") == 1 {
            ended_after = Some(left.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1).saturating_sub(left.elapsed()));
    let close_wait = sockets(&topo.server, "close-wait", PORT);
    println!(
        "{total} clients left: {close_wait} CLOSE_WAIT 1 s later; guard had ended every session {}",
        ended_after.map_or("not yet".into(), |t| format!(
            "after {:.0} ms",
            t.as_secs_f64() * 1e3
        ))
    );
    assert_eq!(close_wait, 0, "guard still holds sockets its clients left");
    wait_for("guard to end every session", || {
        stat(&mut probe, "curr_connections") == 1
    });
    drop(probe);
    mc.child().signal(libc::SIGCONT).unwrap();
    drop(guard);
}

/// guard's accept-queue counters (`stats`).
#[derive(Default)]
struct AcceptWait {
    samples: u64,
    total_ms: u64,
    max_ms: u64,
    accepted: u64,
    batches: u64,
}

impl AcceptWait {
    fn read(probe: &mut TcpStream) -> Self {
        let stats = memcache_stats(probe).unwrap();
        let n = |k: &str| {
            stats
                .get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Self {
            samples: n("accept_wait_samples"),
            total_ms: n("accept_wait_ms_total"),
            max_ms: n("accept_wait_ms_max"),
            accepted: n("total_connections"),
            batches: n("accept_batches"),
        }
    }

    /// What happened between `earlier` and `self`, for the report.
    fn since(&self, earlier: &Self) -> String {
        let samples = self.samples - earlier.samples;
        format!(
            "mean {:.1} ms over {samples} batches of {:.1} accepts on average (TCP_INFO of the \
             first, which waited longest); longest since start {} ms",
            (self.total_ms - earlier.total_ms) as f64 / samples.max(1) as f64,
            (self.accepted - earlier.accepted) as f64
                / (self.batches - earlier.batches).max(1) as f64,
            self.max_ms,
        )
    }
}

/// SYNs the kernel dropped for a full accept queue since `before`.
fn overflows(ns: &NsHandle, before: &guard_tests::Counters) -> u64 {
    ns.counters()
        .unwrap()
        .delta(before)
        .get("TcpExtListenOverflows")
}

/// TCP sockets in `state` with local port `port` in `ns`, as `ss` lists
/// them.
fn sockets(ns: &NsHandle, state: &str, port: u16) -> usize {
    ns.exec_ok(
        "ss",
        ["-Htan", "state", state, &format!("( sport = :{port} )")],
    )
    .unwrap()
    .lines()
    .filter(|l| !l.trim().is_empty())
    .count()
}

fn stat(s: &mut TcpStream, name: &str) -> u64 {
    memcache_stats(s).unwrap()[name].parse().unwrap()
}

/// Waits up to 10 s for `done`, checking every 50 ms.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
