//! Routing across backends, backend failure and recovery, and bad input.

mod common;

use std::time::{Duration, Instant};

use common::{Client, GuardProxy, Memcached, bin, config, free_port};

#[test]
fn multi_get_across_three_backends_keeps_client_order() {
    let mcs = [Memcached::start(), Memcached::start(), Memcached::start()];
    let guard = GuardProxy::start(config(&[&mcs[0], &mcs[1], &mcs[2]]));
    let mut c = Client::connect(guard.addr);
    let keys: Vec<String> = (0..40).map(|i| format!("key{i}")).collect();
    for k in keys.iter().step_by(2) {
        c.send(format!("set {k} 0 0 {}\r\n{k}\r\n", k.len()).as_bytes());
        assert_eq!(c.read_line(), "STORED");
    }
    // Every backend holds some of the keys, under the namespace prefix.
    for mc in &mcs {
        let mut d = Client::connect(mc.addr());
        let line: Vec<String> = keys.iter().map(|k| format!("_:0000000:{k}")).collect();
        d.send(format!("get {}\r\n", line.join(" ")).as_bytes());
        let reply = d.read_until_suffix(b"END\r\n");
        assert!(
            reply.windows(5).any(|w| w == b"VALUE"),
            "backend {} holds no key",
            mc.addr()
        );
    }
    c.send(format!("get {}\r\n", keys.join(" ")).as_bytes());
    let reply = String::from_utf8(c.read_until_suffix(b"END\r\n")).unwrap();
    let expected: String = keys
        .iter()
        .step_by(2)
        .map(|k| format!("VALUE {k} 0 {}\r\n{k}\r\n", k.len()))
        .chain(std::iter::once("END\r\n".to_string()))
        .collect();
    assert_eq!(reply, expected);
    assert_eq!(reply.matches("END").count(), 1);

    // Binary getkq pipeline ending in noop: hits in order, misses silent.
    let mut b = Client::connect(guard.addr);
    let mut frames = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        frames.extend(bin(0x0d, k.as_bytes(), b"", b"", 0, i as u32));
    }
    frames.extend(bin(0x0a, b"", b"", b"", 0, 9999));
    b.send(&frames);
    let reply = b.read_binary_until(9999);
    let mut at = 0;
    let mut got = Vec::new();
    while at < reply.len() {
        let key_len = u16::from_be_bytes([reply[at + 2], reply[at + 3]]) as usize;
        let extras = reply[at + 4] as usize;
        let body = u32::from_be_bytes(reply[at + 8..at + 12].try_into().unwrap()) as usize;
        if reply[at + 1] == 0x0d {
            got.push(
                String::from_utf8(reply[at + 24 + extras..at + 24 + extras + key_len].to_vec())
                    .unwrap(),
            );
        }
        at += 24 + body;
    }
    let hits: Vec<String> = keys.iter().step_by(2).cloned().collect();
    assert_eq!(got, hits);
}

#[test]
fn dead_backend_fails_fast_and_recovers() {
    let port = free_port();
    let mc = Memcached::start_on(port);
    let mut cfg = config(&[&mc]);
    cfg.request_timeout_ms = 250;
    let guard = GuardProxy::start(cfg);
    let mut c = Client::connect(guard.addr);
    c.send(b"set k 0 0 1\r\nv\r\n");
    assert_eq!(c.read_line(), "STORED");

    drop(mc);
    for _ in 0..5 {
        let t = Instant::now();
        c.send(b"get k\r\n");
        let line = c.read_line();
        let took = t.elapsed();
        assert!(line.starts_with("SERVER_ERROR"), "{line}");
        assert!(took < Duration::from_millis(250), "took {took:?}");
        c.send(b"set k 0 0 1\r\nv\r\n");
        assert!(c.read_line().starts_with("SERVER_ERROR"));
    }
    // Still connected.
    c.send(b"version\r\n");
    assert!(c.read_line().starts_with("VERSION guard-"));

    let _mc = Memcached::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        c.send(b"set k 0 0 1\r\nw\r\n");
        if c.read_line() == "STORED" {
            break;
        }
        assert!(Instant::now() < deadline, "backend never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    c.send(b"get k\r\n");
    assert_eq!(
        c.read_until_suffix(b"END\r\n"),
        b"VALUE k 0 1\r\nw\r\nEND\r\n"
    );
}

#[test]
fn reads_can_miss_instead_of_failing() {
    let mc = Memcached::start();
    let mut cfg = config(&[&mc]);
    cfg.miss_on_backend_error = true;
    let guard = GuardProxy::start(cfg);
    drop(mc);
    let mut c = Client::connect(guard.addr);
    c.send(b"get a b\r\n");
    assert_eq!(c.read_line(), "END");
    c.send(b"mg a v\r\n");
    assert_eq!(c.read_line(), "EN");
    c.send(b"mg a v q\r\nmn\r\n");
    assert_eq!(c.read_line(), "MN");
    c.send(b"set a 0 0 1\r\nv\r\n");
    assert!(c.read_line().starts_with("SERVER_ERROR"));
}

#[test]
fn bad_input_gets_its_error_and_spares_others() {
    let mc = Memcached::start();
    let mut cfg = config(&[&mc]);
    cfg.max_value_size = 1000;
    let guard = GuardProxy::start(cfg);
    let mut good = Client::connect(guard.addr);
    good.send(b"set g 0 0 2\r\nok\r\n");
    assert_eq!(good.read_line(), "STORED");

    let mut bad = Client::connect(guard.addr);
    bad.send(b"garbage in\r\n");
    assert_eq!(bad.read_line(), "ERROR");
    bad.send(b"set big 0 0 5000\r\n");
    bad.send(&vec![b'x'; 5000]);
    bad.send(b"\r\n");
    assert_eq!(bad.read_line(), "SERVER_ERROR object too large for cache");
    bad.send(b"get g\r\n");
    assert_eq!(
        bad.read_until_suffix(b"END\r\n"),
        b"VALUE g 0 2\r\nok\r\nEND\r\n"
    );
    let mut long = b"get ".to_vec();
    long.extend(vec![b'a'; 70_000]);
    long.extend(b"\r\n");
    bad.send(&long);
    assert_eq!(bad.read_line(), "CLIENT_ERROR line too long");
    bad.expect_closed(Duration::from_secs(2));

    let mut bin_bad = Client::connect(guard.addr);
    // A binary frame whose header contradicts its opcode desyncs the stream.
    bin_bad.send(&bin(0x00, b"", b"", b"", 0, 7));
    let mut header = [0u8; 24];
    std::io::Read::read_exact(&mut bin_bad.stream, &mut header).unwrap();
    assert_eq!(u16::from_be_bytes([header[6], header[7]]), 0x0004);
    let mut body = vec![0u8; u32::from_be_bytes(header[8..12].try_into().unwrap()) as usize];
    std::io::Read::read_exact(&mut bin_bad.stream, &mut body).unwrap();
    bin_bad.expect_closed(Duration::from_secs(2));

    good.send(b"get g\r\n");
    assert_eq!(
        good.read_until_suffix(b"END\r\n"),
        b"VALUE g 0 2\r\nok\r\nEND\r\n"
    );
}

#[test]
fn hung_backend_times_out_within_the_request_timeout() {
    // Accepts (the kernel completes the handshake) but never answers.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = guard::config::ProxyConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        backends: vec![guard::config::BackendConfig {
            addr: hung.local_addr().unwrap(),
            weight: 1,
        }],
        request_timeout_ms: 200,
        ..Default::default()
    };
    let guard = GuardProxy::start_unchecked(cfg);
    let mut c = Client::connect(guard.addr);
    for _ in 0..3 {
        let t = Instant::now();
        c.send(b"get k\r\n");
        let line = c.read_line();
        assert!(line.starts_with("SERVER_ERROR"), "{line}");
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
    }
}

#[test]
fn per_source_cap_closes_extra_connections() {
    let mc = Memcached::start();
    let mut cfg = config(&[&mc]);
    cfg.max_connections_per_source = 2;
    let guard = GuardProxy::start(cfg);
    // The start-up probe's connection may still be closing.
    std::thread::sleep(Duration::from_millis(200));
    let mut a = Client::connect(guard.addr);
    let mut b = Client::connect(guard.addr);
    let mut extra = Client::connect(guard.addr);
    extra.expect_closed(Duration::from_secs(2));
    for c in [&mut a, &mut b] {
        c.send(b"version\r\n");
        assert!(c.read_line().starts_with("VERSION"));
    }
    drop(a);
    std::thread::sleep(Duration::from_millis(200));
    let mut again = Client::connect(guard.addr);
    again.send(b"version\r\n");
    assert!(again.read_line().starts_with("VERSION"));
}

/// More requests than `max_pipeline_depth` arrive in one read and all are
/// answered by guard itself (no backend reply wakes the session): the
/// ones beyond the cap are dispatched once the first are written, not
/// left in the buffer until the client sends more.
#[test]
fn a_pipeline_deeper_than_the_cap_is_answered_whole_without_a_backend() {
    let mc = Memcached::start();
    let mut cfg = config(&[&mc]);
    cfg.max_pipeline_depth = 16;
    let guard = GuardProxy::start(cfg);
    let mut c = Client::connect(guard.addr);
    c.send(&b"mn\r\nversion\r\n".repeat(100));
    for _ in 0..100 {
        assert_eq!(c.read_line(), "MN");
        assert!(c.read_line().starts_with("VERSION "));
    }
}
