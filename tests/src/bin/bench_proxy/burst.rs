//! The connection burst: 16,000 clients connecting at once, each with a
//! get pending on backends stopped with SIGSTOP. How long each proxy takes
//! to accept them all (beside a plain listener that only accepts), what
//! each connection costs it, and how soon it lets go once they leave.

use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use guard_tests::{
    BurstConfig, Counters, Memcached, close_with_reset,
    loadgen::exchange,
    procstat::rss_kib,
    report::{Section, Table},
};

use crate::procs::{start_guard, start_nutcracker};

/// The listen backlog both proxies get for the burst (guard's default).
const BURST_BACKLOG: u32 = 4096;
/// Longest wait for a proxy to accept a whole burst.
const BURST_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for a proxy to close a burst's connections once the
/// clients have left: guard must do it at once; a proxy that holds them
/// until their requests time out is reported as not done.
const BURST_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// `TcpExtListenOverflows` of this network namespace: SYNs dropped
/// because a listener's accept queue was full.
fn listen_overflows() -> u64 {
    let mut c = Counters::default();
    c.parse_proc_pairs(&std::fs::read_to_string("/proc/net/netstat").unwrap_or_default());
    c.get("TcpExtListenOverflows")
}

/// Descriptors `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Waits up to `limit` until `pid` has `want` descriptors open, or at
/// most `want` with `down`; returns when that was.
fn wait_fds(pid: u32, want: usize, down: bool, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        let n = open_fds(pid);
        if (down && n <= want) || (!down && n >= want) {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        // Listing 16,000 descriptors costs the machine the proxy runs on.
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct BurstRow {
    proxy: &'static str,
    connected: Duration,
    accepted: Option<Duration>,
    retransmitted: usize,
    /// SYNs the kernel dropped for a full accept queue (host-wide).
    overflows: u64,
    failed: usize,
    /// None for the plain listener.
    rss_per_conn_kib: Option<f64>,
    released: Option<Duration>,
    /// Burst connections still open when the wait for their release ended.
    still_open: usize,
}

/// `clients` connect to `addr` at once: the burst, and the listen queue
/// overflows the kernel counted meanwhile.
fn run_burst(addr: SocketAddr, clients: usize) -> (guard_tests::Burst, u64) {
    let config = BurstConfig {
        clients,
        ..BurstConfig::default()
    };
    let overflows_before = listen_overflows();
    let b = guard_tests::burst(None, addr, &config).expect("burst");
    (b, listen_overflows().saturating_sub(overflows_before))
}

/// The same burst against a listener with the same backlog whose thread
/// accepts and closes: what the kernel and the load generator need, with
/// no proxy work at all.
fn burst_on_plain_listener(clients: usize) -> BurstRow {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(BURST_BACKLOG as i32).unwrap();
    let listener: std::net::TcpListener = socket.into();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    // Ends with the process: a blocking accept has no other way out.
    std::thread::spawn(move || {
        for s in listener.incoming() {
            if s.is_ok() {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let (b, overflows) = run_burst(addr, clients);
    let deadline = Instant::now() + BURST_WAIT;
    let mut all_accepted = None;
    while Instant::now() < deadline {
        if accepted.load(std::sync::atomic::Ordering::Relaxed) >= b.streams.len() {
            all_accepted = Some(b.started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("bench-proxy: burst on a plain listener: {}", b.summary());
    let retransmitted = b.slower_than(Duration::from_millis(900));
    for s in b.streams {
        close_with_reset(s);
    }
    BurstRow {
        proxy: "plain listener (accepts and closes)",
        connected: b.elapsed,
        accepted: all_accepted,
        retransmitted,
        overflows,
        failed: b.failed,
        rss_per_conn_kib: None,
        released: None,
        still_open: 0,
    }
}

/// `clients` connect to `addr` at once, each sending a get the stopped
/// backends will not answer: when has `pid` accepted them all, what do
/// they cost it in memory, and how soon after they all leave (half with a
/// reset) has it closed them.
fn burst_on(proxy: &'static str, pid: u32, addr: SocketAddr, clients: usize) -> BurstRow {
    std::thread::sleep(Duration::from_millis(200));
    let (rss_before, fds_before) = (rss_kib(pid), open_fds(pid));
    let (b, overflows) = run_burst(addr, clients);
    let accepted = wait_fds(pid, fds_before + b.streams.len(), false, BURST_WAIT);
    // The gets are read and forwarded by now; the backends hold them.
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = rss_kib(pid);
    eprintln!("bench-proxy: burst on {proxy}: {}", b.summary());
    let row = BurstRow {
        proxy,
        connected: b.elapsed,
        accepted: accepted.map(|t| t - b.started),
        retransmitted: b.slower_than(Duration::from_millis(900)),
        overflows,
        failed: b.failed,
        rss_per_conn_kib: Some(
            rss_after.saturating_sub(rss_before) as f64 / b.streams.len().max(1) as f64,
        ),
        released: None,
        still_open: 0,
    };
    let left = Instant::now();
    for (i, s) in b.streams.into_iter().enumerate() {
        if i % 2 == 0 {
            drop(s);
        } else {
            close_with_reset(s);
        }
    }
    let released = wait_fds(pid, fds_before, true, BURST_RELEASE_WAIT).map(|t| t - left);
    BurstRow {
        released,
        still_open: open_fds(pid).saturating_sub(fds_before),
        ..row
    }
}

/// Runs the burst with `clients` clients on fresh proxies in front of
/// `backends` (stopped meanwhile, continued after) and describes it.
pub fn run(tmp: &Path, backends: &mut [Memcached], clients: usize) -> Section {
    let backend_addrs: Vec<SocketAddr> = backends.iter().map(Memcached::addr).collect();
    // Fresh proxies, whose requests may wait a minute on backends that
    // stop answering.
    let (nutcracker, nut_addr) = start_nutcracker(
        tmp,
        "nutcracker-burst",
        &backend_addrs,
        &format!("  timeout: 60000\n  backlog: {BURST_BACKLOG}\n"),
    );
    let (guard, guard_addr) = start_guard(
        tmp,
        &backend_addrs,
        &[
            "--backlog",
            &BURST_BACKLOG.to_string(),
            "--request-timeout-ms",
            "60000",
            // Every get stays pending, as it does in nutcracker, rather
            // than being refused once a backend connection holds 1024.
            "--backend-max-in-flight",
            "1000000",
        ],
    );
    // Each proxy's backend connections are up before the backends stop.
    for addr in [nut_addr, guard_addr] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        exchange(&mut s, b"get warm-up\r\n", |b| b.ends_with(b"END\r\n"));
    }
    for b in backends.iter_mut() {
        b.child().signal(libc::SIGSTOP).expect("stop memcached");
    }
    let mut bursts = Vec::new();
    eprintln!("bench-proxy: a burst of {clients} clients on each proxy");
    bursts.push(burst_on_plain_listener(clients));
    bursts.push(burst_on("nutcracker", nutcracker.pid(), nut_addr, clients));
    drop(nutcracker);
    bursts.push(burst_on("guard", guard.pid(), guard_addr, clients));
    drop(guard);
    for b in backends.iter_mut() {
        b.child().signal(libc::SIGCONT).expect("continue memcached");
    }
    let threads = BurstConfig::default().threads;
    let mut sec = Section::new();
    sec.heading(3, "Connection burst");
    sec.para(&format!(
        "{clients} clients connecting at once ({threads} niced threads, each connecting again \
         as soon as it is in), each sending one get to backends stopped with SIGSTOP, then all \
         leaving (half with a reset); both proxies listen with a backlog of {BURST_BACKLOG} \
         (nutcracker: `backlog: {BURST_BACKLOG}` in its pool) and wait up to 60 s for a backend \
         reply; a plain listener with the same backlog that only accepts and closes shows what \
         the kernel and the load generator need. One run."
    ));
    let mut t = Table::new([
        "proxy",
        "all connected",
        "all accepted",
        "connects >= 900 ms",
        "listen queue overflows",
        "failed",
        "VmRSS per connection, get pending",
        "all closed after they left",
    ]);
    let ms = |d: Option<Duration>| {
        d.map_or(format!("> {} s", BURST_WAIT.as_secs()), |d| {
            format!("{:.0} ms", d.as_secs_f64() * 1e3)
        })
    };
    for r in &bursts {
        let released = match (r.rss_per_conn_kib, r.released) {
            (None, _) => "-".into(),
            (_, Some(d)) => format!("{:.0} ms", d.as_secs_f64() * 1e3),
            (_, None) => format!(
                "{} still open after {} s",
                r.still_open,
                BURST_RELEASE_WAIT.as_secs()
            ),
        };
        let rss = r
            .rss_per_conn_kib
            .map_or("-".into(), |k| format!("{k:.1} KiB"));
        t.row([
            r.proxy.to_string(),
            format!("{:.0} ms", r.connected.as_secs_f64() * 1e3),
            ms(r.accepted),
            r.retransmitted.to_string(),
            r.overflows.to_string(),
            r.failed.to_string(),
            rss,
            released,
        ]);
    }
    sec.table(&t);
    sec
}
