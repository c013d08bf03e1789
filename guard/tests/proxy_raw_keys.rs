//! `keys = "raw"`: guard as a drop-in for twemproxy. The same memcached
//! servers sit behind the real nutcracker (ketama, md5) and behind guard;
//! keys written through either are read through the other and looked up
//! directly on each memcached, so both the stored names and the placement
//! are checked against twemproxy itself. Also: `flush_all` refused byte for
//! byte as by `memcached -F`, 250-byte keys, no flush-generation markers,
//! and a SIGHUP that leaves the key mode as the process started.

mod common;
mod tenant_common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{Client, GuardProxy, Memcached, PeerState, bin, free_port};
use guard::{
    config::{BackendConfig, KeyMode, ProxyConfig},
    proxy::ketama::md5_hash,
};
use guard_test_support::{MEMCACHED_BIN, Nutcracker, accepts};
use tenant_common::{GuardProcess, bin_call, hash};

const KEYS: usize = 2_000;

/// guard over `servers` with these weights, its open tenant's keys raw.
fn raw_guard(servers: &[Memcached], weights: &[u32]) -> GuardProxy {
    GuardProxy::start(ProxyConfig {
        backends: servers
            .iter()
            .zip(weights)
            .map(|(m, &weight)| BackendConfig {
                addr: m.addr(),
                weight,
            })
            .collect(),
        keys: KeyMode::Raw,
        ..common::config(&[])
    })
}

/// nutcracker over the same servers. Unnamed, as guard's backends are:
/// both then hash each server as `ip:port` (`server_identity`).
fn nutcracker(servers: &[Memcached], weights: &[u32]) -> Nutcracker {
    let lines: Vec<String> = servers
        .iter()
        .zip(weights)
        .map(|(m, w)| format!("{}:{w}", m.addr()))
        .collect();
    Nutcracker::start(&lines, "  auto_eject_hosts: false\n").unwrap_or_else(|e| panic!("{e:#}"))
}

fn set(c: &mut Client, key: &str, value: &str) -> String {
    c.send(format!("set {key} 0 0 {}\r\n{value}\r\n", value.len()).as_bytes());
    c.read_line()
}

fn get(c: &mut Client, key: &str) -> Option<String> {
    c.send(format!("get {key}\r\n").as_bytes());
    let first = c.read_line();
    if first == "END" {
        return None;
    }
    assert!(first.starts_with(&format!("VALUE {key} ")), "{first:?}");
    let value = c.read_line();
    assert_eq!(c.read_line(), "END");
    Some(value)
}

/// `stats` value `name`.
fn stat(c: &mut Client, name: &str) -> Option<String> {
    c.send(b"stats\r\n");
    let mut found = None;
    loop {
        let line = c.read_line();
        if line == "END" {
            return found;
        }
        let mut words = line.split(' ');
        if words.nth(1) == Some(name) {
            found = words.next().map(str::to_owned);
        }
    }
}

/// Keys of varied length and shape, deterministic across runs; among them
/// keys in guard's own prefix, keys shaped like namespaced backend keys,
/// and keys of memcached's longest.
fn keys(prefix: &str, n: usize) -> Vec<String> {
    let mut keys: Vec<String> = (0..n)
        .map(|i| {
            let pad = format!("{:08x}", md5_hash(format!("{prefix}{i}").as_bytes()));
            match i % 50 {
                0 => format!("~{prefix}{i}"),
                1 => format!("_:0000000:{prefix}{i}"),
                2 => format!("{prefix}{i}/{}", pad.repeat(40))[..250].to_owned(),
                _ => format!("{prefix}{i}/{}", &pad[..i % 9]),
            }
        })
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n);
    keys
}

/// For each key, the servers that hold it under exactly that name, with
/// the value `value(key)`.
fn holders(
    servers: &[Memcached],
    keys: &[String],
    value: impl Fn(&str) -> String,
) -> Vec<Vec<usize>> {
    let mut conns: Vec<Client> = servers.iter().map(|m| Client::connect(m.addr())).collect();
    keys.iter()
        .map(|k| {
            let mut found = Vec::new();
            for (i, c) in conns.iter_mut().enumerate() {
                if let Some(v) = get(c, k) {
                    assert_eq!(v, value(k), "{k} on server {i}");
                    found.push(i);
                }
            }
            found
        })
        .collect()
}

/// Writes through one proxy, reads through the other, both ways, then
/// finds every key on each memcached directly. A key is on exactly one
/// server and the other proxy found it, so both proxies route it to that
/// same server. Returns how many keys each server holds.
fn drop_in(weights: &[u32]) -> Vec<usize> {
    let servers: Vec<Memcached> = weights.iter().map(|_| Memcached::start()).collect();
    let nut = nutcracker(&servers, weights);
    let guard = raw_guard(&servers, weights);
    let mut via_nut = Client::connect(nut.addr());
    let mut via_guard = Client::connect(guard.addr);
    let value = |k: &str| format!("v{}", md5_hash(k.as_bytes()));

    let from_nut = keys("nut:", KEYS);
    for k in &from_nut {
        assert_eq!(
            set(&mut via_nut, k, &value(k)),
            "STORED",
            "{k}\n{}",
            nut.log()
        );
    }
    let missed: Vec<&String> = from_nut
        .iter()
        .filter(|k| get(&mut via_guard, k) != Some(value(k)))
        .collect();
    assert!(
        missed.is_empty(),
        "{} of {} keys set through twemproxy missed through guard, first: {:?}",
        missed.len(),
        from_nut.len(),
        &missed[..missed.len().min(5)]
    );

    let from_guard = keys("guard:", KEYS);
    for k in &from_guard {
        assert_eq!(set(&mut via_guard, k, &value(k)), "STORED", "{k}");
    }
    let missed: Vec<&String> = from_guard
        .iter()
        .filter(|k| get(&mut via_nut, k) != Some(value(k)))
        .collect();
    assert!(
        missed.is_empty(),
        "{} of {} keys set through guard missed through twemproxy, first: {:?}",
        missed.len(),
        from_guard.len(),
        &missed[..missed.len().min(5)]
    );

    let all: Vec<String> = from_nut.into_iter().chain(from_guard).collect();
    let mut counts = vec![0; servers.len()];
    for (k, on) in all.iter().zip(holders(&servers, &all, value)) {
        assert_eq!(on.len(), 1, "{k} stored as sent on servers {on:?}");
        counts[on[0]] += 1;
    }
    counts
}

#[test]
fn warm_cache_is_shared_with_twemproxy_weighted_1_2_1() {
    let counts = drop_in(&[1, 2, 1]);
    // The weights are in force, so the agreement covers them.
    assert!(counts[1] > counts[0] && counts[1] > counts[2], "{counts:?}");
}

#[test]
fn warm_cache_is_shared_with_twemproxy_equal_weights() {
    let counts = drop_in(&[1, 1, 1]);
    assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
}

/// Binary frames in `bytes`: (opcode, status).
fn frames(mut bytes: &[u8]) -> Vec<(u8, u16)> {
    let mut out = Vec::new();
    while bytes.len() >= 24 {
        let body = u32::from_be_bytes(bytes[8..12].try_into().unwrap()) as usize;
        out.push((bytes[1], u16::from_be_bytes([bytes[6], bytes[7]])));
        bytes = &bytes[24 + body..];
    }
    assert!(bytes.is_empty(), "trailing bytes {bytes:?}");
    out
}

/// The backends' own `cmd_flush`, summed.
fn backend_flushes(servers: &[Memcached]) -> u64 {
    servers
        .iter()
        .map(|m| {
            let v = stat(&mut Client::connect(m.addr()), "cmd_flush").unwrap();
            v.parse::<u64>().unwrap()
        })
        .sum()
}

#[test]
fn flush_all_is_refused_as_by_memcached_with_flush_disabled() {
    let servers: Vec<Memcached> = (0..2).map(|_| Memcached::start()).collect();
    let guard = raw_guard(&servers, &[1, 1]);
    // The reference: memcached with flush_all disabled.
    let reference = Memcached::start_with(
        Command::new(MEMCACHED_BIN).arg("-F"),
        ([127, 0, 0, 1], free_port()).into(),
        accepts,
    )
    .unwrap();
    let mut g = Client::connect(guard.addr);
    let mut r = Client::connect(reference.addr());
    for c in [&mut g, &mut r] {
        c.send(b"set k 5 0 1\r\nx\r\n");
        assert_eq!(c.read_line(), "STORED");
    }

    // Text: every form refused, noreply silent; then the key is still
    // there.
    let text = b"flush_all\r\nflush_all 0\r\nflush_all 1\r\nflush_all -1\r\n\
                 flush_all noreply\r\nflush_all 1 noreply\r\nget k\r\n";
    g.send(text);
    r.send(text);
    let ours = g.read_until_suffix(b"END\r\n");
    let theirs = r.read_until_suffix(b"END\r\n");
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&theirs)
    );
    let mut expected = b"CLIENT_ERROR flush_all not allowed\r\n".repeat(4);
    expected.extend_from_slice(b"VALUE k 5 1\r\nx\r\nEND\r\n");
    assert_eq!(ours, expected);

    // Binary: flush and its quiet form, immediate and delayed, each
    // answered with the auth error (0x20), then a noop.
    let mut binary = Vec::new();
    for (op, extras) in [
        (0x08, &[][..]),
        (0x08, &[0, 0, 0, 1][..]),
        (0x18, &[][..]),
        (0x18, &[0, 0, 0, 1][..]),
    ] {
        binary.extend(bin(op, b"", extras, b"", 0, 7));
    }
    binary.extend(bin(0x0a, b"", b"", b"", 0, 99));
    // A connection speaks the protocol of its first request.
    let mut gb = Client::connect(guard.addr);
    let mut rb = Client::connect(reference.addr());
    gb.send(&binary);
    rb.send(&binary);
    let ours = gb.read_binary_until(99);
    assert_eq!(ours, rb.read_binary_until(99));
    assert_eq!(
        frames(&ours),
        [
            (0x08, 0x20),
            (0x08, 0x20),
            (0x18, 0x20),
            (0x18, 0x20),
            (0x0a, 0)
        ]
    );

    // Nothing reached a backend, and nothing was held to fire later.
    assert_eq!(backend_flushes(&servers), 0);
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(get(&mut g, "k").as_deref(), Some("x"));
    let on = holders(&servers, &["k".to_owned()], |_| "x".to_owned());
    assert_eq!(on[0].len(), 1);
}

#[test]
fn keys_of_250_bytes_and_guards_prefix_are_stored_as_sent() {
    let servers: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let guard = raw_guard(&servers, &[1, 1, 1]);
    let mut c = Client::connect(guard.addr);
    assert_eq!(
        stat(&mut c, "tenant_max_key_length").as_deref(),
        Some("250")
    );

    let long = |tag: &str| format!("{tag}:{}", "k".repeat(250 - tag.len() - 1));
    let (text, meta, binary) = (long("text"), long("meta"), long("binary"));
    // Text.
    assert_eq!(set(&mut c, &text, "v"), "STORED");
    assert_eq!(get(&mut c, &text).as_deref(), Some("v"));
    // Meta, with the key returned as sent.
    c.send(format!("ms {meta} 1\r\nv\r\nmg {meta} v k\r\n").as_bytes());
    assert_eq!(c.read_line(), "HD");
    assert_eq!(c.read_line(), format!("VA 1 k{meta}"));
    assert_eq!(c.read_line(), "v");
    // Binary, on a connection of its own (a connection speaks the
    // protocol of its first request).
    let mut b = Client::connect(guard.addr);
    let (st, _) = bin_call(&mut b, 0x01, binary.as_bytes(), &[0; 8], b"v");
    assert_eq!(st, 0);
    assert_eq!(
        bin_call(&mut b, 0x00, binary.as_bytes(), b"", b""),
        (0, b"v".to_vec())
    );
    // Guard's own prefix: accepted, as twemproxy would (see `KeyNamespace`).
    assert_eq!(set(&mut c, "~probe", "v"), "STORED");

    let keys = [text, meta, binary, "~probe".to_owned()];
    for (k, on) in keys
        .iter()
        .zip(holders(&servers, &keys, |_| "v".to_owned()))
    {
        assert_eq!(on.len(), 1, "{k} stored as sent on servers {on:?}");
    }
    // One byte over memcached's limit is refused as memcached refuses it.
    c.send(format!("get {}\r\n", "k".repeat(251)).as_bytes());
    assert_eq!(c.read_line(), "CLIENT_ERROR bad command line format");
}

/// `cmd_get` and `cmd_set` of each backend: every read and write, so
/// nothing else guard sends on its own may touch keys while they are
/// compared (the markers were the only such traffic when this was written).
fn backend_requests(servers: &[Memcached]) -> Vec<(String, String)> {
    servers
        .iter()
        .map(|m| {
            let mut c = Client::connect(m.addr());
            (
                stat(&mut c, "cmd_get").unwrap(),
                stat(&mut c, "cmd_set").unwrap(),
            )
        })
        .collect()
}

#[test]
fn no_flush_generation_markers_for_raw_keys() {
    let servers: Vec<Memcached> = (0..2).map(|_| Memcached::start()).collect();
    let guard = GuardProxy::start_unchecked(ProxyConfig {
        keys: KeyMode::Raw,
        ..common::config(&servers.iter().collect::<Vec<_>>())
    });
    // The proxy accepts only after its start-up marker pass: an answer
    // means that pass is over.
    let mut c = Client::connect(guard.addr);
    c.send(b"version\r\n");
    assert!(c.read_line().starts_with("VERSION "));
    let idle = vec![("0".to_owned(), "0".to_owned()); servers.len()];
    assert_eq!(backend_requests(&servers), idle, "start-up pass");
    // Past a periodic pass, and a refused flush: still nothing asked.
    std::thread::sleep(guard::proxy::generations::SYNC_INTERVAL + Duration::from_millis(500));
    c.send(b"flush_all\r\n");
    assert_eq!(c.read_line(), "CLIENT_ERROR flush_all not allowed");
    assert_eq!(backend_requests(&servers), idle, "periodic pass");
}

#[test]
fn sighup_keeps_the_key_mode_the_process_started_with() {
    let mc = Memcached::start();
    let mut guard = GuardProcess::start(&mc, "keys = \"raw\"", "");
    // A connection opened just before a reload is served as the registry
    // it started under, and closed if the reload revokes that: ask again
    // on a new one until the answer shows the new registry.
    let first_reply = |guard: &GuardProcess, request: &[u8]| -> (Client, String) {
        let mut c = Client::connect(guard.addr);
        c.send(request);
        let reply = match c.peer_state(Duration::from_secs(2)) {
            PeerState::Sent(b) => String::from_utf8_lossy(&b).into_owned(),
            _ => String::new(),
        };
        (c, reply)
    };
    let open_client = |guard: &GuardProcess| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (c, reply) = first_reply(guard, b"mg __warmup__ v\r\n");
            if reply == "EN\r\n" {
                return c;
            }
            assert!(Instant::now() < deadline, "no open tenant: {reply:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut direct = Client::connect(mc.addr());
    let mut c = open_client(&guard);
    assert_eq!(set(&mut c, "before", "v"), "STORED");
    assert_eq!(get(&mut direct, "before").as_deref(), Some("v"));

    // Tenants come (the file must then say namespaced), and go again with
    // the file still saying namespaced: the open tenant that comes back
    // keeps raw keys until a restart.
    let tenant = format!(
        "[[tenant]]\nname = \"acme\"\ncredentials = [{{ username = \"u\", password_hash = \"{}\" }}]\n",
        hash("pw")
    );
    guard.reload(&mc, "keys = \"namespaced\"", &tenant);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, reply) = first_reply(&guard, b"mg x v\r\n");
        if reply == "CLIENT_ERROR unauthenticated\r\n" {
            break;
        }
        assert!(Instant::now() < deadline, "tenants never came: {reply:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    guard.reload(&mc, "keys = \"namespaced\"", "");
    let mut c = open_client(&guard);
    assert_eq!(set(&mut c, "after", "v"), "STORED");
    assert_eq!(get(&mut direct, "after").as_deref(), Some("v"));
}
