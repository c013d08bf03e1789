//! Per-tenant budgets against a real memcached: requests per second
//! served to within 10 % of the budget with the rest refused at once, at
//! most `max_in_flight` backend requests out at once (seen from the
//! memcached behind a delaying relay), bytes charged for requests and,
//! after the fact, for replies, multi-gets charged and refused whole,
//! each protocol's refusal, and, with the real binary, budgets changed
//! by SIGHUP under load while nobody is disconnected and each tenant
//! sees only its own budget.

mod common;
mod tenant_common;

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use common::{Client, GuardProxy, Memcached, bin, config, stat, stats};
use guard::config::{BackendConfig, KeyMode, ProxyConfig};
use guard_test_support::DelayRelay;
use tenant_common::{GuardProcess, hash, status, value};

const OVER_REQUESTS: &str = "SERVER_ERROR tenant over budget: requests/s";
const OVER_BYTES: &str = "SERVER_ERROR tenant over budget: bytes/s";
const OVER_IN_FLIGHT: &str = "SERVER_ERROR tenant over budget: in flight";

/// These tests measure rates and hold requests behind a slow relay: one
/// at a time, so they do not share the two cores with each other.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A numeric row of `stats` rows.
fn num(rows: &HashMap<String, String>, name: &str) -> u64 {
    rows.get(name)
        .unwrap_or_else(|| panic!("no stat {name}"))
        .parse()
        .unwrap_or_else(|e| panic!("stat {name}: {e}"))
}

/// `stats` on an open connection (a tenant's rows are its own).
fn stats_on(c: &mut Client) -> HashMap<String, String> {
    c.send(b"stats\r\n");
    let raw = c.read_until_suffix(b"END\r\n");
    String::from_utf8_lossy(&raw)
        .lines()
        .filter_map(|l| {
            let mut p = l.strip_prefix("STAT ")?.splitn(2, ' ');
            Some((p.next()?.to_string(), p.next()?.to_string()))
        })
        .collect()
}

/// One pipelined batch of the offered load: when it was sent, what came
/// back, and how long the whole batch took to be answered.
struct Batch {
    sent: Instant,
    served: u64,
    refused: u64,
    took: Duration,
}

/// Requests per batch, and batches per second (every 10 ms): 5,000
/// requests a second offered, ten times the budgets below.
const PER_BATCH: usize = 50;
const TICK: Duration = Duration::from_millis(10);

/// Offers `PER_BATCH` pipelined `mg` requests every `TICK` for `run`
/// (falling behind when the proxy is slower, never catching up in
/// bursts). Each reply is a miss (served) or `refusal`; anything else
/// fails the test.
fn offer(c: &mut Client, run: Duration, refusal: &str) -> Vec<Batch> {
    let batch = b"mg budget-key v\r\n".repeat(PER_BATCH);
    let start = Instant::now();
    let mut batches = Vec::new();
    let mut next = start;
    while next < start + run {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let sent = Instant::now();
        c.send(&batch);
        let (mut served, mut refused) = (0, 0);
        for _ in 0..PER_BATCH {
            match c.read_line() {
                l if l == "EN" => served += 1,
                l if l == refusal => refused += 1,
                other => panic!("unexpected reply {other:?}"),
            }
        }
        batches.push(Batch {
            sent,
            served,
            refused,
            took: sent.elapsed(),
        });
        next = (next + TICK).max(Instant::now() - TICK);
    }
    batches
}

/// Requests served by the batches sent within `[from, to)` of the first.
fn served_between(batches: &[Batch], from: Duration, to: Duration) -> u64 {
    let start = batches[0].sent;
    batches
        .iter()
        .filter(|b| (from..to).contains(&(b.sent - start)))
        .map(|b| b.served)
        .sum()
}

/// `mc` behind `relay` as the only backend, with a request timeout far
/// above the relay's delays.
fn behind(relay: &DelayRelay) -> ProxyConfig {
    ProxyConfig {
        backends: vec![BackendConfig {
            addr: relay.addr(),
            weight: 1,
        }],
        request_timeout_ms: 5_000,
        ..config(&[])
    }
}

#[test]
fn a_tenant_offered_ten_times_its_budget_gets_its_budget_and_the_rest_is_refused_at_once() {
    let _one = serial();
    let mc = Memcached::start();
    let proxy = GuardProxy::start(ProxyConfig {
        max_requests_per_sec: 500,
        ..config(&[&mc])
    });
    let before = stats(proxy.addr);
    let mut c = Client::connect(proxy.addr);
    let batches = offer(&mut c, Duration::from_secs(3), OVER_REQUESTS);
    let after = stats(proxy.addr);

    let served: u64 = batches.iter().map(|b| b.served).sum();
    let refused: u64 = batches.iter().map(|b| b.refused).sum();
    let last = batches.last().unwrap();
    let window = (last.sent - batches[0].sent).as_secs_f64();
    let offered = (served + refused) as f64 / window;
    assert!(
        offered > 2_500.0,
        "the load generator offered only {offered:.0} requests/s: too slow to judge the budget"
    );
    // The burst (one second of the budget, full after the warm-up) and
    // then the budget itself.
    let budget = 500.0 + 500.0 * window;
    let error = (served as f64 - budget) / budget;
    let refusal_wait: f64 = batches
        .iter()
        .map(|b| b.took.as_secs_f64() * b.refused as f64)
        .sum::<f64>()
        / refused as f64;
    eprintln!(
        "offered {offered:.0}/s for {window:.2} s: served {served} (budget {budget:.0}, \
         {:+.1} %), refused {refused}, answered in {:.2} ms on average",
        error * 100.0,
        refusal_wait * 1e3
    );
    assert!(
        error.abs() <= 0.10,
        "served {served} in {window:.2} s against a budget of {budget:.0} ({:+.1} %)",
        error * 100.0
    );
    // Refused at once: every batch, refusals and all, is answered in
    // milliseconds (queueing them for the budget would take seconds).
    assert!(
        refusal_wait < 0.050,
        "refusals waited {:.1} ms on average",
        refusal_wait * 1e3
    );
    // Counted, for the tenant and guard-wide.
    let delta = |name: &str| num(&after, name) - num(&before, name);
    assert_eq!(delta("tenant_requests"), served);
    assert_eq!(delta("tenant_refused_requests_per_sec"), refused);
    assert_eq!(delta("budget_refusals"), refused);
    assert_eq!(delta("tenant_refused_in_flight"), 0);
    assert_eq!(num(&after, "tenant_max_requests_per_sec"), 500);
    assert_eq!(num(&after, "tenant_requests_burst"), 500);
    // The connection is still open and served once the budget allows.
    std::thread::sleep(Duration::from_millis(50));
    c.send(b"mg budget-key v\r\n");
    assert_eq!(c.read_line(), "EN");
}

#[test]
fn at_most_max_in_flight_requests_reach_the_backend_and_the_rest_are_refused_at_once() {
    let _one = serial();
    let mc = Memcached::start();
    let relay = DelayRelay::start(mc.addr());
    let proxy = GuardProxy::start(ProxyConfig {
        max_in_flight: 8,
        // No flush-generation markers: every get memcached counts
        // (`cmd_get`) is one of this test's.
        keys: KeyMode::Raw,
        ..behind(&relay)
    });
    relay.set_delay(Duration::from_millis(200));
    let reached = || stat(mc.addr(), "cmd_get");
    let before = reached();

    // 100 requests pipelined at once over four connections.
    let mut clients: Vec<Client> = (0..4).map(|_| Client::connect(proxy.addr)).collect();
    let start = Instant::now();
    for (i, c) in clients.iter_mut().enumerate() {
        let batch: Vec<u8> = (0..25)
            .flat_map(|j| format!("get k{i}-{j}\r\n").into_bytes())
            .collect();
        c.send(&batch);
    }
    std::thread::sleep(Duration::from_millis(100));
    // Half-way through the relay's delay: exactly the budget is out.
    assert_eq!(reached() - before, 8);
    // Another connection is refused at once, not held for a slot.
    let mut late = Client::connect(proxy.addr);
    let asked = Instant::now();
    late.send(b"get late\r\n");
    assert_eq!(late.read_line(), OVER_IN_FLIGHT);
    assert!(
        asked.elapsed() < Duration::from_millis(100),
        "refused after {:?}",
        asked.elapsed()
    );
    let (mut served, mut refused) = (0, 0);
    for c in &mut clients {
        for _ in 0..25 {
            match c.read_line().as_str() {
                "END" => served += 1,
                OVER_IN_FLIGHT => refused += 1,
                other => panic!("unexpected reply {other:?}"),
            }
        }
    }
    assert_eq!((served, refused), (8, 92));
    // One round trip of the relay, not one per eight requests (2.5 s).
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(reached() - before, 8);
    let rows = stats(proxy.addr);
    assert_eq!(num(&rows, "tenant_refused_in_flight"), 93);
    assert_eq!(num(&rows, "tenant_curr_in_flight"), 0);
    assert_eq!(num(&rows, "tenant_max_in_flight"), 8);

    // The slots came back: a full pipeline of 8 is served again.
    let c = &mut clients[0];
    let batch: Vec<u8> = (0..8)
        .flat_map(|j| format!("get again-{j}\r\n").into_bytes())
        .collect();
    c.send(&batch);
    for _ in 0..8 {
        assert_eq!(c.read_line(), "END");
    }

    // A client that leaves with requests out gives their slots back at
    // once, before the backend answers them.
    relay.set_delay(Duration::from_secs(1));
    let mut leaving = Client::connect(proxy.addr);
    leaving.send(&b"get gone\r\n".repeat(8));
    std::thread::sleep(Duration::from_millis(100));
    late.send(b"get late\r\n");
    assert_eq!(late.read_line(), OVER_IN_FLIGHT);
    drop(leaving);
    let deadline = Instant::now() + Duration::from_secs(1);
    while stat(proxy.addr, "tenant_curr_in_flight") > 0 {
        assert!(
            Instant::now() < deadline,
            "slots still held after the client left"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    relay.set_delay(Duration::ZERO);
    late.send(b"get late\r\n");
    assert_eq!(late.read_line(), "END");
}

/// 100 KiB values, as memcached's text protocol returns them.
const VALUE: usize = 100 << 10;

#[test]
fn large_values_spend_the_byte_budget_and_replies_are_charged_after_the_fact() {
    let _one = serial();
    let mc = Memcached::start();
    let proxy = GuardProxy::start(ProxyConfig {
        // Raw keys: the values are written straight to memcached, under
        // the names clients use, without spending the budget.
        keys: KeyMode::Raw,
        max_bytes_per_sec: 1 << 20,
        ..config(&[&mc])
    });
    let mut direct = Client::connect(mc.addr());
    let value = vec![b'v'; VALUE];
    for i in 0..10 {
        direct.send(format!("set big{i} 0 0 {VALUE}\r\n").as_bytes());
        direct.send(&value);
        direct.send(b"\r\n");
        assert_eq!(direct.read_line(), "STORED");
    }
    let keys: String = (0..10).map(|i| format!(" big{i}")).collect();
    let multi_get = format!("get{keys}\r\n");
    let before = stats(proxy.addr);
    let mut c = Client::connect(proxy.addr);

    // A store's bytes are charged up front: a value of the whole burst
    // (1 MiB, plus its command line) never fits, and is refused unsent.
    c.send(format!("set huge 0 0 {}\r\n", 1 << 20).as_bytes());
    c.send(&vec![b'h'; 1 << 20]);
    c.send(b"\r\n");
    assert_eq!(c.read_line(), OVER_BYTES);
    direct.send(b"get huge\r\n");
    assert_eq!(direct.read_line(), "END", "the refused set was stored");

    // 10-key gets of about 1 MB each: their requests fit (the refusal
    // took nothing), so they are served whole, and their replies are
    // charged once ready, after the fact: the bucket goes into debt, and
    // soon even a tiny request is refused, whole and at once. (How many
    // are served first depends on how fast this machine moves a
    // megabyte; at least the first.)
    let mut got = 0;
    let mut served = 0;
    let refused_at = loop {
        c.send(multi_get.as_bytes());
        c.send(b"mn\r\n");
        let reply = c.read_until_suffix(b"MN\r\n");
        if reply.starts_with(OVER_BYTES.as_bytes()) {
            assert_eq!(reply, format!("{OVER_BYTES}\r\nMN\r\n").as_bytes());
            break Instant::now();
        }
        assert_eq!(reply.windows(6).filter(|w| w == b"VALUE ").count(), 10);
        got += reply.len() - b"MN\r\n".len();
        served += 1;
        assert!(served < 10, "replies never put the byte bucket in debt");
    };
    assert!(served >= 1);
    // A request of a few bytes refused on bytes: only the replies charged
    // after the fact can have spent the budget. Once time has repaid the
    // debt, the same connection is served.
    loop {
        c.send(b"get big0\r\n");
        let line = c.read_line();
        if line == "VALUE big0 0 102400" {
            let rest = c.read_until_suffix(b"END\r\n");
            got += line.len() + 2 + rest.len();
            break;
        }
        assert_eq!(line, OVER_BYTES);
        assert!(
            refused_at.elapsed() < Duration::from_secs(10),
            "never repaid"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let after = stats(proxy.addr);
    let delta = |name: &str| num(&after, name) - num(&before, name);
    assert!(delta("tenant_refused_bytes_per_sec") >= 2);
    assert_eq!(delta("tenant_requests"), 10 * served + 1);
    // Replies and requests, the stats requests aside.
    let charged = delta("tenant_bytes");
    assert!(
        charged >= got as u64 && charged < got as u64 + 4096,
        "charged {charged} for {got} bytes of replies"
    );
    assert_eq!(num(&after, "tenant_max_bytes_per_sec"), 1 << 20);
}

#[test]
fn a_multi_get_is_charged_per_key_and_refused_whole() {
    let _one = serial();
    let mc = Memcached::start();
    // Unlimited while the proxy warms up (its warm-up requests, as many as
    // the backend takes to come up, would spend the budget), then twenty
    // at once and two a second: what a refused get left would still be
    // there a moment later.
    let unlimited = ProxyConfig {
        keys: KeyMode::Raw,
        ..config(&[&mc])
    };
    let cx = guard::proxy::ProxyContext::open_for(&unlimited);
    let tenants = cx.tenants.clone();
    let proxy = GuardProxy::start_with(unlimited.clone(), cx);
    let mut warm = Client::connect(proxy.addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        warm.send(b"mg __warmup__ v\r\n");
        if warm.read_line() == "EN" {
            break;
        }
        assert!(Instant::now() < deadline, "backend never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    tenants
        .reload(&guard::config::Config {
            proxy: ProxyConfig {
                max_requests_per_sec: 2,
                requests_burst: Some(20),
                ..unlimited
            },
            ..Default::default()
        })
        .unwrap();
    let mut direct = Client::connect(mc.addr());
    for i in 0..15 {
        direct.send(format!("set k{i} 0 0 2\r\nv{}\r\n", i % 10).as_bytes());
        assert_eq!(direct.read_line(), "STORED");
    }
    let before = stats(proxy.addr);
    let mut c = Client::connect(proxy.addr);
    let get = |c: &mut Client, n: usize| {
        let keys: String = (0..n).map(|i| format!(" k{i}")).collect();
        c.send(format!("get{keys}\r\nmn\r\n").as_bytes());
        let reply = c.read_until_suffix(b"MN\r\n");
        String::from_utf8(reply).unwrap()
    };
    // Fifteen keys cost fifteen requests: served whole.
    let reply = get(&mut c, 15);
    assert_eq!(reply.matches("VALUE ").count(), 15, "{reply}");
    assert!(reply.ends_with("END\r\nMN\r\n"));
    // Fifteen more do not fit in the five left: one line, no value.
    assert_eq!(get(&mut c, 15), format!("{OVER_REQUESTS}\r\nMN\r\n"));
    // The refusal took nothing: five keys still fit.
    let reply = get(&mut c, 5);
    assert_eq!(reply.matches("VALUE ").count(), 5, "{reply}");
    let after = stats(proxy.addr);
    let delta = |name: &str| num(&after, name) - num(&before, name);
    assert_eq!(delta("tenant_requests"), 20);
    assert_eq!(delta("tenant_refused_requests_per_sec"), 1);
}

/// Spends the budget of 1 request a second: `mn`-fenced `mg`s until one
/// is refused (the bucket then stays empty for about a second).
fn exhaust(c: &mut Client) {
    for _ in 0..10 {
        c.send(b"mg spend v\r\n");
        if c.read_line() == OVER_REQUESTS {
            return;
        }
    }
    panic!("never refused");
}

#[test]
fn each_protocol_gets_its_own_refusal_and_free_commands_stay_free() {
    let _one = serial();
    let mc = Memcached::start();
    let proxy = GuardProxy::start(ProxyConfig {
        max_requests_per_sec: 1,
        ..config(&[&mc])
    });

    // Meta: the same line as text, quiet mode or not (quiet hides
    // successes, not errors).
    let mut m = Client::connect(proxy.addr);
    exhaust(&mut m);
    m.send(b"mg k v q\r\nms k 1 q\r\nx\r\nmd k q\r\nma k q\r\nmn\r\n");
    for _ in 0..4 {
        assert_eq!(m.read_line(), OVER_REQUESTS);
    }
    assert_eq!(m.read_line(), "MN");
    // Text: `noreply` hides the refusal as it hides a backend error.
    m.send(b"set k 0 0 1 noreply\r\nx\r\nincr k 1 noreply\r\ndelete k\r\nmn\r\n");
    assert_eq!(m.read_line(), OVER_REQUESTS);
    assert_eq!(m.read_line(), "MN");
    // What never reaches a backend is free.
    m.send(b"version\r\nverbosity 1\r\nflush_all\r\nmn\r\n");
    assert!(m.read_line().starts_with("VERSION "));
    assert_eq!(m.read_line(), "OK");
    assert_eq!(m.read_line(), "OK");
    assert_eq!(m.read_line(), "MN");
    let rows = stats_on(&mut m);
    assert_eq!(num(&rows, "tenant_refused_requests_per_sec"), 8);

    // Binary: status 0x0086 with the words as the value, quiet opcodes
    // included; noop, version and stat stay free.
    let mut b = Client::connect(proxy.addr);
    let mut spend = Vec::new();
    for opaque in 1..=5 {
        spend.extend(bin(0x00, b"spend", b"", b"", 0, opaque));
    }
    b.send(&spend);
    let spent = frames(&b.read_binary_until(5));
    assert!(spent.iter().any(|f| status(f) == 0x0086), "never refused");
    let mut req = bin(0x00, b"k", b"", b"", 0, 10);
    req.extend(bin(0x09, b"k", b"", b"", 0, 11)); // GETQ
    req.extend(bin(0x11, b"k", &[0; 8], b"x", 0, 12)); // SETQ
    req.extend(bin(0x0b, b"", b"", b"", 0, 13)); // VERSION
    req.extend(bin(0x0a, b"", b"", b"", 0, 14)); // NOOP
    b.send(&req);
    let answers = frames(&b.read_binary_until(14));
    let got: Vec<(u32, u16)> = answers.iter().map(|f| (opaque(f), status(f))).collect();
    assert_eq!(
        got,
        [(10, 0x0086), (11, 0x0086), (12, 0x0086), (13, 0), (14, 0)]
    );
    for f in &answers[..3] {
        assert_eq!(value(f), b"tenant over budget: requests/s");
    }

    // Every connection stayed open, and is served once the budget allows.
    std::thread::sleep(Duration::from_millis(1100));
    m.send(b"mg k v\r\n");
    assert_eq!(m.read_line(), "EN");
}

/// Binary response frames, one by one.
fn frames(mut raw: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while raw.len() >= 24 {
        let body = u32::from_be_bytes(raw[8..12].try_into().unwrap()) as usize;
        out.push(raw[..24 + body].to_vec());
        raw = &raw[24 + body..];
    }
    out
}

fn opaque(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[12..16].try_into().unwrap())
}

/// acme with a budget of `rate` requests a second service-wide, globex
/// with none; `hashes` are their password hashes, the same across
/// reloads (a re-hashed credential ends its sessions).
fn tenants(rate: u64, hashes: &[String; 2]) -> String {
    format!(
        r#"
[[tenant]]
name = "acme"
max_requests_per_sec = {rate}
credentials = [{{ username = "acme", password_hash = "{}" }}]

[[tenant]]
name = "globex"
credentials = [{{ username = "globex", password_hash = "{}" }}]
"#,
        hashes[0], hashes[1],
    )
}

#[test]
fn a_reload_raises_and_lowers_a_budget_under_load_and_nobody_is_disconnected() {
    let _one = serial();
    let mc = Memcached::start();
    // Two hosts share the file's budgets: this one enforces half.
    let proxy_extra = "auth_timeout_ms = 10000\nhosts = 2";
    let hashes = [hash("acme-pw"), hash("globex-pw")];
    let mut guard = GuardProcess::start(&mc, proxy_extra, &tenants(400, &hashes));
    let mut load = guard.text_client("acme", "acme-pw");
    let mut watch = guard.text_client("acme", "acme-pw");
    let mut other = guard.text_client("globex", "globex-pw");
    let ended = |rows: &HashMap<String, String>| -> u64 {
        rows.keys()
            .filter(|k| k.starts_with("session_end_"))
            .map(|k| num(rows, k))
            .sum()
    };
    let ended_before = ended(&stats_on(&mut other));
    let started = Instant::now();

    // Served per second once the burst is spent, with `rate` service-wide
    // (half of it here).
    let mut phase = |guard: &mut GuardProcess, load: &mut Client, rate: u64| {
        if rate != 400 {
            guard.reload(&mc, proxy_extra, &tenants(rate, &hashes));
            let deadline = Instant::now() + Duration::from_secs(10);
            while num(&stats_on(&mut watch), "tenant_max_requests_per_sec") != rate / 2 {
                assert!(Instant::now() < deadline, "the reload never applied");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let batches = offer(load, Duration::from_millis(1600), OVER_REQUESTS);
        served_between(
            &batches,
            Duration::from_millis(500),
            Duration::from_millis(1500),
        ) as f64
    };
    let first = phase(&mut guard, &mut load, 400);
    let raised = phase(&mut guard, &mut load, 2000);
    let lowered = phase(&mut guard, &mut load, 200);
    eprintln!("served a second on this host: {first} (200), {raised} (1000), {lowered} (100)");
    for (got, budget) in [(first, 200.0), (raised, 1000.0), (lowered, 100.0)] {
        let error = (got - budget) / budget;
        assert!(
            error.abs() <= 0.2,
            "served {got} in a second against {budget} on this host ({:+.0} %): \
             {first}, then {raised}, then {lowered}",
            error * 100.0
        );
    }

    // The tenant sees its own budget and refusals, the other its own.
    let acme = stats_on(&mut watch);
    assert_eq!(acme["tenant"], "acme");
    assert_eq!(num(&acme, "tenant_max_requests_per_sec"), 100);
    assert_eq!(num(&acme, "tenant_requests_burst"), 100);
    assert!(num(&acme, "tenant_refused_requests_per_sec") > 5_000);
    let globex = stats_on(&mut other);
    assert_eq!(globex["tenant"], "globex");
    assert_eq!(num(&globex, "tenant_max_requests_per_sec"), 0);
    assert_eq!(num(&globex, "tenant_refused_requests_per_sec"), 0);
    assert!(num(&globex, "tenant_requests") < 10);
    // globex is served while acme is refused.
    load.send(&b"mg k v\r\n".repeat(300));
    other.send(&b"mg k v\r\n".repeat(300));
    let mut refused = 0;
    for _ in 0..300 {
        refused += u32::from(load.read_line() == OVER_REQUESTS);
        assert_eq!(other.read_line(), "EN");
    }
    assert!(refused > 100, "{refused}");

    // Nobody was disconnected: every session is still there and served.
    for c in [&mut load, &mut watch, &mut other] {
        c.send(b"version\r\n");
        assert!(c.read_line().starts_with("VERSION "));
    }
    assert_eq!(ended(&stats_on(&mut other)), ended_before);
    // Thousands of refusals, a line per 10 s at most.
    let log = guard.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("over its budget"))
        .collect();
    let allowed = 1 + started.elapsed().as_secs() as usize / 10;
    assert!(
        !lines.is_empty() && lines.len() <= allowed,
        "{} lines in {:?}: {lines:#?}",
        lines.len(),
        started.elapsed()
    );
    assert!(
        lines[0].contains("tenant acme over its budget on this host")
            && lines[0].contains("200 requests/s (burst 200)"),
        "{}",
        lines[0]
    );
}
