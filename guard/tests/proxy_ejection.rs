//! Slow, dead, flapping, capped and returning backends, against real
//! memcached; a slow network is a [`DelayRelay`] in front of one.
//!
//! The proxy runs with raw keys (`keys = "raw"`), so a key's name on a
//! backend is the client's key and its home is what twemproxy's ketama
//! says: each test knows which keys live on the node it slows down, and
//! looks them up on that memcached directly. Whether a request reached
//! the slow node is told by what it answers, not by how long it took: an
//! ejected node's keys miss (their gutter names are new) while the node
//! itself still holds them.
//!
//! The tests in this file run one at a time: each is about latency, and
//! two at once on a small machine would be each other's slow node.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use common::{Client, GuardProxy, Memcached, stat, stats};
use guard::{
    config::{BackendConfig, EjectPolicy, KeyMode, ProxyConfig},
    proxy::ketama::{Ketama, server_identity},
};
use guard_test_support::DelayRelay;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a slow node takes to answer.
const SLOW: Duration = Duration::from_millis(200);

/// Raw keys, latency judged every 200 ms, first ejection 1 s, a request
/// timeout well above `SLOW`, so only latency can eject a slow node, and
/// a gap (50 ms) no healthy node on a busy test machine comes near.
fn ejection_config(backends: &[SocketAddr]) -> ProxyConfig {
    ProxyConfig {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        backends: backends
            .iter()
            .map(|&addr| BackendConfig { addr, weight: 1 })
            .collect(),
        keys: KeyMode::Raw,
        outlier_interval_ms: 200,
        outlier_min_gap_ms: 50,
        eject_time_ms: 1_000,
        max_eject_time_ms: 60_000,
        request_timeout_ms: 2_000,
        ..ProxyConfig::default()
    }
}

/// Which of `backends` twemproxy's ketama makes `key`'s home.
fn home(backends: &[SocketAddr], key: &str) -> usize {
    let list: Vec<(String, u32)> = backends
        .iter()
        .map(|a| (server_identity(&a.ip().to_string(), a.port(), None), 1))
        .collect();
    Ketama::new(&list).server_for(key.as_bytes()).unwrap()
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Waits until `stat(name)` satisfies `ok`, for at most `within`; returns
/// how long it took.
#[track_caller]
fn wait_stat(addr: SocketAddr, name: &str, ok: impl Fn(u64) -> bool, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let v = stat(addr, name);
        if ok(v) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{name} = {v} after {within:?}; stats: {:?}",
            stats(addr)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn set(c: &mut Client, key: &str, value: &str) -> String {
    c.send(format!("set {key} 0 0 {}\r\n{value}\r\n", value.len()).as_bytes());
    c.read_line()
}

/// The value of `key`, `None` on a miss; panics on anything else.
#[track_caller]
fn get(c: &mut Client, key: &str) -> Option<String> {
    c.send(format!("get {key}\r\n").as_bytes());
    let first = c.read_line();
    if first == "END" {
        return None;
    }
    assert!(
        first.starts_with(&format!("VALUE {key} ")),
        "get {key}: {first}"
    );
    let v = c.read_line();
    assert_eq!(c.read_line(), "END");
    Some(v)
}

/// A key's value read from a memcached directly.
fn direct_get(addr: SocketAddr, key: &str) -> Option<String> {
    get(&mut Client::connect(addr), key)
}

/// Sets every key to `<tag>-<key>` through the proxy.
fn set_all(addr: SocketAddr, keys: &[String], tag: &str) {
    let mut c = Client::connect(addr);
    for k in keys {
        assert_eq!(set(&mut c, k, &format!("{tag}-{k}")), "STORED", "set {k}");
    }
}

/// A client that keeps a pipeline of gets and sets going over `keys`
/// until stopped (at most a minute), checking that every reply answers
/// its own request: a `VALUE` names the key asked for and holds a value
/// written for it. Counts `SERVER_ERROR`s; any other surprise fails it.
struct Load {
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    batches: Arc<AtomicU64>,
    handles: Vec<JoinHandle<Result<(), String>>>,
}

/// Connections a [`Load`] keeps busy: enough that a slow node gets a
/// latency sample every few milliseconds, as it would from real clients.
const LOAD_CONNECTIONS: usize = 4;

impl Load {
    /// Gets `reads`, and sets `writes` (if any) to `<tag><n>-<key>`.
    fn start(addr: SocketAddr, reads: Vec<String>, writes: Vec<String>, tag: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let batches = Arc::new(AtomicU64::new(0));
        let handles = (0..LOAD_CONNECTIONS)
            .map(|c| {
                let (s, e, b) = (stop.clone(), errors.clone(), batches.clone());
                let (reads, writes) = (reads.clone(), writes.clone());
                std::thread::spawn(move || {
                    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let mut n: u64 = c as u64 * 1_000_003;
                    let mut buf = Vec::new();
                    while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let mut out = Vec::new();
                        let mut expect = Vec::new();
                        for i in 0..16 {
                            n += 1;
                            let pick = |keys: &[String]| {
                                keys[(n as usize * 7919 + i) % keys.len()].clone()
                            };
                            if n.is_multiple_of(4) && !writes.is_empty() {
                                let k = &pick(&writes);
                                let v = format!("{tag}{n}-{k}");
                                out.extend_from_slice(
                                    format!("set {k} 0 0 {}\r\n{v}\r\n", v.len()).as_bytes(),
                                );
                                expect.push((true, k.clone()));
                            } else {
                                let k = pick(&reads);
                                out.extend_from_slice(format!("get {k}\r\n").as_bytes());
                                expect.push((false, k));
                            }
                        }
                        stream.write_all(&out).map_err(|e| e.to_string())?;
                        for (is_set, k) in expect {
                            let line = read_line(&mut stream, &mut buf)?;
                            if line.starts_with("SERVER_ERROR") {
                                e.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            if is_set {
                                if line != "STORED" {
                                    return Err(format!("set {k}: {line}"));
                                }
                                continue;
                            }
                            if line == "END" {
                                continue;
                            }
                            if !line.starts_with(&format!("VALUE {k} ")) {
                                return Err(format!("get {k} answered {line}"));
                            }
                            let value = read_line(&mut stream, &mut buf)?;
                            if !value.ends_with(&format!("-{k}")) {
                                return Err(format!("get {k} returned {value}"));
                            }
                            let end = read_line(&mut stream, &mut buf)?;
                            if end != "END" {
                                return Err(format!("get {k}: {end} instead of END"));
                            }
                        }
                        b.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        Self {
            stop,
            errors,
            batches,
            handles,
        }
    }

    fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Stops it; panics if a reply did not answer its request.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for h in std::mem::take(&mut self.handles) {
            if let Err(e) = h.join().unwrap() {
                panic!("load: {e}");
            }
        }
        let batches = self.batches.load(Ordering::Relaxed);
        assert!(batches > 0, "the load never completed a batch");
        self.errors()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Slows `relay`'s node down under a reading load on `reads` (latency
/// needs answers to be judged) until guard has ejected `n` backends in
/// all; returns the errors the load saw (under `fail-fast`, the ejected
/// node's keys are refused once it is out).
fn slow_until_ejected(proxy: SocketAddr, relay: &DelayRelay, reads: &[String], n: u64) -> u64 {
    let load = Load::start(proxy, reads.to_vec(), Vec::new(), "load");
    relay.set_delay(SLOW);
    wait_stat(
        proxy,
        "backend_ejections",
        |v| v == n,
        Duration::from_secs(10),
    );
    load.finish()
}

fn read_line(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<String, String> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.drain(..i + 2);
            return Ok(line);
        }
        let mut chunk = [0u8; 16384];
        match s.read(&mut chunk) {
            Ok(0) => return Err("connection closed".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Three memcached, the third behind a relay that can make it slow.
struct ThreeWithSlow {
    mcs: Vec<Memcached>,
    relay: DelayRelay,
}

impl ThreeWithSlow {
    fn start() -> Self {
        let mcs: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
        let relay = DelayRelay::start(mcs[2].addr());
        Self { mcs, relay }
    }

    /// The addresses guard uses: the third is the relay's.
    fn backends(&self) -> Vec<SocketAddr> {
        vec![self.mcs[0].addr(), self.mcs[1].addr(), self.relay.addr()]
    }

    /// The keys whose home is the slow node, and the others.
    fn split(&self, keys: &[String]) -> (Vec<String>, Vec<String>) {
        let b = self.backends();
        let (slow, rest): (Vec<_>, Vec<_>) = keys.iter().cloned().partition(|k| home(&b, k) == 2);
        assert!(
            slow.len() > 30 && rest.len() > 60,
            "{} / {}",
            slow.len(),
            rest.len()
        );
        (slow, rest)
    }
}

/// The mc6 case, then its recovery: a node that answers, only slowly, is
/// ejected for latency; its keys are served by the others at once (as
/// misses first: their gutter names are new); it is probed when healed,
/// flushed and re-admitted, and its keys go home without a stale value.
/// A client pipelining through it all gets every reply for its own
/// request, in order, and no error.
#[test]
fn a_slow_node_is_ejected_then_probed_and_readmitted_without_stale_reads() {
    let _one = serial();
    let pool = ThreeWithSlow::start();
    let proxy = GuardProxy::start(ejection_config(&pool.backends()));
    let all = keys("k", 300);
    let (slow, rest) = pool.split(&all);
    set_all(proxy.addr, &all, "v1");
    // Its sets go to the other nodes' keys only, so what the checks below
    // read of the slow node's keys is theirs alone.
    let load = Load::start(proxy.addr, all.clone(), rest.clone(), "early");

    pool.relay.set_delay(SLOW);
    let took = wait_stat(
        proxy.addr,
        "backends_ejected",
        |v| v == 1,
        Duration::from_secs(10),
    );
    eprintln!("slow node ejected {took:?} after it turned slow");
    assert_eq!(stat(proxy.addr, "backend_ejections"), 1);
    // Requests already on their way there finish first.
    std::thread::sleep(SLOW * 2);
    assert_eq!(
        load.finish(),
        0,
        "a client saw an error while the node was slow"
    );

    let mut c = Client::connect(proxy.addr);
    for k in &slow {
        assert_eq!(get(&mut c, k), None, "{k} was read from the ejected node");
        // The node itself still holds it: only the flush at its return
        // keeps that value from being served again.
        assert!(direct_get(pool.mcs[2].addr(), k).is_some(), "{k}");
    }
    for k in &rest {
        let v = get(&mut c, k).unwrap_or_else(|| panic!("{k} lost"));
        assert!(v.ends_with(&format!("-{k}")), "{k}: {v}");
    }
    // Written while the node is out, its keys are served by the others.
    for k in &slow {
        assert_eq!(set(&mut c, k, &format!("v2-{k}")), "STORED");
        assert_eq!(get(&mut c, k), Some(format!("v2-{k}")));
    }
    // A meta client asking for the key back gets its own, not the name
    // it has in the gutter.
    let k = &slow[0];
    c.send(format!("mg {k} k v\r\n").as_bytes());
    let head = c.read_line();
    assert!(
        head.starts_with("VA ") && head.ends_with(&format!(" k{k}")),
        "{head}"
    );
    assert_eq!(c.read_line(), format!("v2-{k}"));

    let load = Load::start(proxy.addr, all.clone(), all.clone(), "late");
    pool.relay.set_delay(Duration::ZERO);
    let took = wait_stat(
        proxy.addr,
        "backend_readmissions",
        |v| v == 1,
        Duration::from_secs(15),
    );
    eprintln!("healed node re-admitted {took:?} after it healed");
    assert_eq!(stat(proxy.addr, "backends_ejected"), 0);
    assert_eq!(
        load.finish(),
        0,
        "a client saw an error while the node came back"
    );
    for k in &slow {
        // Neither the value it held (v1) nor the gutter's (v2): it came
        // back empty.
        let got = get(&mut c, k);
        assert!(
            got.is_none() || got.as_deref().is_some_and(|v| v.starts_with("late")),
            "{k} read {got:?} after the node came back"
        );
    }
    for k in &slow {
        assert_eq!(set(&mut c, k, &format!("v3-{k}")), "STORED");
        assert_eq!(
            direct_get(pool.mcs[2].addr(), k),
            Some(format!("v3-{k}")),
            "{k} went home"
        );
    }
    assert_eq!(
        stat(proxy.addr, "backend_ejections"),
        1,
        "ejected more than once"
    );

    // Slow again: a second ejection's gutter names are new, so the values
    // the first one left on the other nodes (v2) are never read again.
    let load = Load::start(proxy.addr, all.clone(), rest.clone(), "again");
    pool.relay.set_delay(SLOW);
    wait_stat(
        proxy.addr,
        "backend_ejections",
        |v| v == 2,
        Duration::from_secs(10),
    );
    assert_eq!(load.finish(), 0);
    std::thread::sleep(SLOW * 2);
    for k in &slow {
        assert_eq!(
            get(&mut c, k),
            None,
            "{k} read from an earlier ejection's gutter"
        );
    }
}

/// A node that stops answering (killed) is ejected for its errors; its
/// keys are served by the others without a single error once it is out;
/// restarted, it is probed and taken back.
#[test]
fn a_dead_node_is_ejected_for_errors_and_taken_back_when_it_returns() {
    let _one = serial();
    let mut mcs: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let addrs: Vec<SocketAddr> = mcs.iter().map(Memcached::addr).collect();
    let proxy = GuardProxy::start(ejection_config(&addrs));
    let all = keys("d", 300);
    let dead: Vec<String> = all
        .iter()
        .filter(|k| home(&addrs, k) == 2)
        .cloned()
        .collect();
    set_all(proxy.addr, &all, "v1");

    let port = addrs[2].port();
    drop(mcs.pop());
    wait_stat(
        proxy.addr,
        "backends_ejected",
        |v| v == 1,
        Duration::from_secs(5),
    );
    let mut c = Client::connect(proxy.addr);
    for k in &dead {
        assert_eq!(get(&mut c, k), None, "{k}");
        assert_eq!(set(&mut c, k, &format!("v2-{k}")), "STORED", "{k}");
        assert_eq!(get(&mut c, k), Some(format!("v2-{k}")), "{k}");
    }
    let errors = stat(proxy.addr, "backend_errors");
    let load = Load::start(proxy.addr, all.clone(), all.clone(), "load");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(load.errors(), 0, "errors after the dead node was ejected");

    mcs.push(Memcached::start_on(port));
    wait_stat(
        proxy.addr,
        "backend_readmissions",
        |v| v == 1,
        Duration::from_secs(15),
    );
    assert_eq!(load.finish(), 0);
    assert_eq!(stat(proxy.addr, "backend_errors"), errors);
    for k in dead.iter().take(20) {
        assert_eq!(set(&mut c, k, &format!("v3-{k}")), "STORED");
        assert_eq!(
            direct_get(mcs[2].addr(), k),
            Some(format!("v3-{k}")),
            "{k} went home"
        );
    }
}

/// Under `eject = "fail-fast"` an ejected node's keys are refused at once,
/// unsent (a miss with `miss_on_backend_error`), and the others' served.
#[test]
fn fail_fast_refuses_an_ejected_nodes_keys_at_once() {
    let _one = serial();
    for miss in [false, true] {
        let pool = ThreeWithSlow::start();
        let mut cfg = ejection_config(&pool.backends());
        cfg.eject = EjectPolicy::FailFast;
        cfg.miss_on_backend_error = miss;
        let proxy = GuardProxy::start(cfg);
        let all = keys("f", 300);
        let (slow, rest) = pool.split(&all);
        set_all(proxy.addr, &all, "v1");
        slow_until_ejected(proxy.addr, &pool.relay, &all, 1);
        std::thread::sleep(SLOW * 2);
        let mut c = Client::connect(proxy.addr);
        for k in slow.iter().take(20) {
            c.send(format!("get {k}\r\n").as_bytes());
            // "unavailable", not "timeout": refused before it was sent.
            let want = if miss {
                "END"
            } else {
                "SERVER_ERROR backend unavailable"
            };
            assert_eq!(c.read_line(), want, "{k}");
            c.send(format!("set {k} 0 0 1\r\nx\r\n").as_bytes());
            assert_eq!(c.read_line(), "SERVER_ERROR backend unavailable", "{k}");
        }
        for k in rest.iter().take(50) {
            assert_eq!(get(&mut c, k), Some(format!("v1-{k}")), "{k}");
        }
    }
}

/// A node that turns slow, heals and turns slow again is ejected for
/// longer the second time (1 s, then 2 s).
#[test]
fn a_flapping_node_is_ejected_for_longer_each_time() {
    let _one = serial();
    let pool = ThreeWithSlow::start();
    let proxy = GuardProxy::start(ejection_config(&pool.backends()));
    let all = keys("p", 300);
    set_all(proxy.addr, &all, "v1");
    let mut lasted = Vec::new();
    for round in 1..=2 {
        let load = Load::start(proxy.addr, all.clone(), all.clone(), "load");
        pool.relay.set_delay(SLOW);
        wait_stat(
            proxy.addr,
            "backend_ejections",
            |v| v == round,
            Duration::from_secs(10),
        );
        let out = Instant::now();
        pool.relay.set_delay(Duration::ZERO);
        wait_stat(
            proxy.addr,
            "backend_readmissions",
            |v| v == round,
            Duration::from_secs(15),
        );
        lasted.push(out.elapsed());
        load.finish();
    }
    eprintln!("ejections lasted {lasted:?}");
    assert!(lasted[0] >= Duration::from_millis(900), "{lasted:?}");
    assert!(lasted[1] >= Duration::from_millis(1_900), "{lasted:?}");
}

/// With one backend nothing is ejected for latency (it has no peers) nor
/// for errors (half of one is none); with four, at most two are ejected
/// at once, whatever happens to the rest.
#[test]
fn the_pool_is_never_ejected_below_half() {
    let _one = serial();
    let mc = Memcached::start();
    let relay = DelayRelay::start(mc.addr());
    let proxy = GuardProxy::start(ejection_config(&[relay.addr()]));
    let all = keys("o", 50);
    set_all(proxy.addr, &all, "v1");
    let load = Load::start(proxy.addr, all.clone(), all.clone(), "load");
    relay.set_delay(SLOW);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(load.finish(), 0);
    assert_eq!(
        stat(proxy.addr, "backend_ejections"),
        0,
        "one slow backend ejected"
    );
    drop(relay);
    drop(mc);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        stat(proxy.addr, "backend_ejections"),
        0,
        "one dead backend ejected"
    );
    drop(proxy);

    let mut mcs: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let addrs: Vec<SocketAddr> = mcs.iter().map(Memcached::addr).collect();
    let proxy = GuardProxy::start(ejection_config(&addrs));
    let all = keys("q", 400);
    set_all(proxy.addr, &all, "v1");
    // Three of four die.
    mcs.truncate(1);
    let start = Instant::now();
    let mut most = 0;
    while start.elapsed() < Duration::from_secs(3) {
        most = most.max(stat(proxy.addr, "backends_ejected"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(most, 2, "at most two of four may be out, and two were dead");
    assert_eq!(stat(proxy.addr, "backends_ejected"), 2);
    // The one kept in answers for its own keys, at once.
    let mut c = Client::connect(proxy.addr);
    let mut refused = 0;
    for k in &all {
        c.send(format!("get {k}\r\n").as_bytes());
        match c.read_line().as_str() {
            "SERVER_ERROR backend unavailable" => refused += 1,
            "END" => {}
            l if l.starts_with("VALUE") => {
                c.read_line();
                c.read_line();
            }
            l => panic!("{k}: {l}"),
        }
    }
    assert!(
        refused > 0,
        "the dead node kept in the ring answered nothing"
    );
}

/// The open tenant's flush-generation marker as a memcached holds it.
fn marker(addr: SocketAddr) -> Option<u64> {
    direct_get(addr, "_:gen").map(|v| v.parse().unwrap())
}

/// Flush generations stay right across an ejection. Under fail-fast an
/// ejected node keeps its data and misses a flush made meanwhile: it
/// comes back holding an older marker, which is brought up to date
/// (never the other way). Under redistribute it comes back flushed,
/// without markers, and gets them back.
#[test]
fn flush_generation_markers_survive_an_ejection() {
    let _one = serial();
    for policy in [EjectPolicy::FailFast, EjectPolicy::Redistribute] {
        let pool = ThreeWithSlow::start();
        let mut cfg = ejection_config(&pool.backends());
        cfg.keys = KeyMode::Namespaced;
        cfg.eject = policy;
        let proxy = GuardProxy::start(cfg);
        let mut c = Client::connect(proxy.addr);
        c.send(b"flush_all\r\n");
        assert_eq!(c.read_line(), "OK");
        let first: Vec<Option<u64>> = pool.mcs.iter().map(|m| marker(m.addr())).collect();
        let g1 = first[0].expect("a marker after flush_all");
        assert_eq!(first, [Some(g1); 3], "{policy}");

        let all = keys("g", 300);
        set_all(proxy.addr, &all, "v1");
        slow_until_ejected(proxy.addr, &pool.relay, &all, 1);
        // Generations are whole seconds: the next flush must land on a
        // later one.
        std::thread::sleep(Duration::from_millis(1_100));
        c.send(b"flush_all\r\n");
        assert_eq!(c.read_line(), "OK");
        let g2 = marker(pool.mcs[0].addr()).unwrap();
        assert!(g2 > g1, "{policy}: {g2} after {g1}");
        assert_eq!(marker(pool.mcs[1].addr()), Some(g2), "{policy}");
        // The ejected node was not asked (it would have cost the flush
        // its slowness).
        assert_eq!(marker(pool.mcs[2].addr()), Some(g1), "{policy}");

        pool.relay.set_delay(Duration::ZERO);
        wait_stat(
            proxy.addr,
            "backend_readmissions",
            |v| v == 1,
            Duration::from_secs(15),
        );
        // At once, not at the next marker pass a second later.
        let start = Instant::now();
        while marker(pool.mcs[2].addr()) != Some(g2) {
            assert!(
                start.elapsed() < Duration::from_millis(600),
                "{policy}: the returning node holds {:?}, not {g2}",
                marker(pool.mcs[2].addr())
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Keys from before the second flush are gone everywhere.
        for k in all.iter().take(50) {
            assert_eq!(get(&mut c, k), None, "{policy}: {k}");
        }
    }
}

/// `guard run --config FILE` with its log in a file; SIGTERM on drop.
struct GuardBinary {
    child: guard_test_support::ChildGuard,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

/// Writes guard's config: raw keys, `backends`, quick ejections.
fn write_config(path: &std::path::Path, listen: SocketAddr, backends: &[SocketAddr]) {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ addr = \"{a}\" }}"))
        .collect();
    let text = format!(
        "[proxy]\nlisten = [\"{listen}\"]\nkeys = \"raw\"\nbackends = [{}]\n\
         outlier_interval_ms = 200\neject_time_ms = 500\nmax_eject_time_ms = 2000\n\
         request_timeout_ms = 2000\n",
        list.join(", ")
    );
    std::fs::write(path, text).unwrap();
}

impl GuardBinary {
    fn start(backends: &[SocketAddr]) -> Self {
        let port = common::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let dir = std::env::temp_dir().join(format!("gt-eject-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("guard.toml");
        write_config(&config, addr, backends);
        let log = std::fs::File::create(dir.join("guard.log")).unwrap();
        let mut child = guard_test_support::ChildGuard::spawn(
            std::process::Command::new(env!("CARGO_BIN_EXE_guard"))
                .args(["run", "--config"])
                .arg(&config)
                .env("GUARD_PIN_ROOT", dir.join("pins"))
                .env("RUST_LOG", "info")
                .stdout(std::process::Stdio::null())
                .stderr(log),
        )
        .unwrap()
        .with_grace(Duration::from_secs(10));
        child.wait_accepting(addr).unwrap();
        Self { child, addr, dir }
    }

    /// Rewrites the backend list and sends SIGHUP.
    fn reload(&mut self, backends: &[SocketAddr]) {
        write_config(&self.dir.join("guard.toml"), self.addr, backends);
        self.child.signal(libc::SIGHUP).unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("guard.log")).unwrap_or_default()
    }
}

impl Drop for GuardBinary {
    fn drop(&mut self) {
        let _ = self.child.terminate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SIGHUP reloads the backends: a slow node added is probed, refused and
/// logged, and the ring does not change; a healthy one is probed and
/// joins, and keys move to it as twemproxy's ring places them; a node
/// removed under load takes its keys elsewhere without a client seeing
/// an error.
#[test]
fn reloads_probe_new_backends_and_remove_old_ones_without_errors() {
    let _one = serial();
    let mcs: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let a = |i: usize| mcs[i].addr();
    let relay = DelayRelay::start(a(3));
    let mut guard = GuardBinary::start(&[a(0), a(1)]);
    let all = keys("r", 300);
    set_all(guard.addr, &all, "v1");

    relay.set_delay(Duration::from_millis(300));
    guard.reload(&[a(0), a(1), relay.addr()]);
    wait_stat(
        guard.addr,
        "backend_probe_failures",
        |v| v >= 1,
        Duration::from_secs(10),
    );
    assert_eq!(stat(guard.addr, "backends_joining"), 1);
    assert_eq!(stat(guard.addr, "backends_added"), 0);
    let log = guard.log();
    assert!(
        log.contains(&format!("backend {} failed its probe", relay.addr()))
            && log.contains("new backend refused"),
        "{log}"
    );
    // The ring is as it was: every key still where it was written.
    let mut c = Client::connect(guard.addr);
    for k in &all {
        assert_eq!(get(&mut c, k), Some(format!("v1-{k}")), "{k}");
    }

    guard.reload(&[a(0), a(1), a(2)]);
    wait_stat(
        guard.addr,
        "backends_added",
        |v| v == 1,
        Duration::from_secs(10),
    );
    assert_eq!(stat(guard.addr, "backends_joining"), 0);
    assert!(
        guard
            .log()
            .contains(&format!("backend {} joined the ring", a(2)))
    );
    let three = [a(0), a(1), a(2)];
    let mut moved = 0;
    for k in &all {
        let (before, after) = (home(&three[..2], k), home(&three, k));
        if after == 2 {
            // Its new home joined empty.
            moved += 1;
            assert_eq!(get(&mut c, k), None, "{k}");
        } else {
            // Only keys the new node takes move.
            assert_eq!(before, after, "{k}");
            assert_eq!(get(&mut c, k), Some(format!("v1-{k}")), "{k}");
        }
    }
    assert!(moved > 50, "{moved} keys moved to the new node");
    set_all(guard.addr, &all, "v2");
    for k in &all {
        let on = three[home(&three, k)];
        assert_eq!(direct_get(on, k), Some(format!("v2-{k}")), "{k} on {on}");
    }

    let load = Load::start(guard.addr, all.clone(), all.clone(), "load");
    std::thread::sleep(Duration::from_millis(300));
    guard.reload(&[a(0), a(2)]);
    wait_stat(
        guard.addr,
        "backends_removed",
        |v| v == 2,
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        load.finish(),
        0,
        "a client saw an error as a backend was removed"
    );
    let two = [a(0), a(2)];
    set_all(guard.addr, &all, "v3");
    for k in &all {
        let on = two[home(&two, k)];
        assert_eq!(direct_get(on, k), Some(format!("v3-{k}")), "{k} on {on}");
    }
    drop(relay);
}

/// Two backends out at once: while X is ejected its key K goes to C's
/// gutter, then (C out too) to B's, then (C back) to C's again; when C
/// leaves again K must not read what B's gutter held from before C came
/// back. Gutter names are drawn again whenever the live set changes.
#[test]
fn an_ejected_nodes_gutter_never_serves_what_an_earlier_live_set_left() {
    let _one = serial();
    let mcs: Vec<Memcached> = (0..4).map(|_| Memcached::start()).collect();
    let x = DelayRelay::start(mcs[0].addr());
    let c = DelayRelay::start(mcs[1].addr());
    let backends = [x.addr(), c.addr(), mcs[2].addr(), mcs[3].addr()];
    let proxy = GuardProxy::start(ejection_config(&backends));
    let list: Vec<(String, u32)> = backends
        .iter()
        .map(|a| (server_identity(&a.ip().to_string(), a.port(), None), 1))
        .collect();
    let without = |out: &'static [usize]| Ketama::with_live(&list, |i| !out.contains(&i));
    // A key at home on X, whose gutter is on C while X alone is out.
    let k = (0..)
        .map(|i| format!("flap{i}"))
        .find(|k| home(&backends, k) == 0 && without(&[0]).server_for(k.as_bytes()) == Some(1))
        .unwrap();
    let others: Vec<String> = keys("o", 200).into_iter().filter(|o| *o != k).collect();
    let mut cl = Client::connect(proxy.addr);
    assert_eq!(slow_until_ejected(proxy.addr, &x, &others, 1), 0);
    assert_eq!(set(&mut cl, &k, "v1"), "STORED"); // C's gutter
    assert_eq!(slow_until_ejected(proxy.addr, &c, &others, 2), 0);
    assert_eq!(get(&mut cl, &k), None, "a fresh gutter on B");
    assert_eq!(set(&mut cl, &k, "v2"), "STORED"); // B's gutter
    c.set_delay(Duration::ZERO);
    wait_stat(
        proxy.addr,
        "backend_readmissions",
        |v| v == 1,
        Duration::from_secs(15),
    );
    assert_eq!(get(&mut cl, &k), None, "C came back flushed");
    assert_eq!(set(&mut cl, &k, "v3"), "STORED"); // C's gutter again
    assert_eq!(get(&mut cl, &k).as_deref(), Some("v3"));
    assert_eq!(slow_until_ejected(proxy.addr, &c, &others, 3), 0);
    assert_eq!(
        get(&mut cl, &k),
        None,
        "B's gutter served v2, older than v3, once C left again"
    );
    assert_eq!(stat(proxy.addr, "backends_ejected"), 2);
}

/// A reload that leaves no live backend lets the new ones in at once,
/// as at start, rather than refuse every key until they pass a probe.
#[test]
fn a_reload_that_replaces_every_backend_serves_at_once() {
    let _one = serial();
    let (a, b) = (Memcached::start(), Memcached::start());
    let (tx, rx) = tokio::sync::watch::channel(vec![BackendConfig {
        addr: a.addr(),
        weight: 1,
    }]);
    let cx = guard::proxy::ProxyContext {
        backends: Some(rx),
        ..guard::proxy::ProxyContext::open(KeyMode::Raw)
    };
    let proxy = GuardProxy::start_with(ejection_config(&[a.addr()]), cx);
    let mut c = Client::connect(proxy.addr);
    tx.send(vec![BackendConfig {
        addr: b.addr(),
        weight: 1,
    }])
    .unwrap();
    wait_stat(
        proxy.addr,
        "backends_removed",
        |v| v == 1,
        Duration::from_secs(5),
    );
    // In the ring at once, without a probe; served as soon as its
    // connections are up (moments: a probe would take far longer).
    assert_eq!(stat(proxy.addr, "backends_joining"), 0);
    let start = Instant::now();
    while set(&mut c, "k", "v") != "STORED" {
        assert!(start.elapsed() < Duration::from_secs(2), "never served");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(direct_get(b.addr(), "k").as_deref(), Some("v"));
}
