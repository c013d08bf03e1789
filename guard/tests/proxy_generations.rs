//! Flush generations kept on the backends: a `flush_all` reaches another
//! proxy over the same backends, survives a restart of guard, and is
//! restored on a backend that restarted empty.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use common::{Client, GuardProxy, Memcached, config};

fn set(c: &mut Client, key: &str, value: &str) {
    c.send(format!("set {key} 0 0 {}\r\n{value}\r\n", value.len()).as_bytes());
    assert_eq!(c.read_line(), "STORED");
}

fn get(c: &mut Client, key: &str) -> Option<String> {
    c.send(format!("get {key}\r\n").as_bytes());
    let line = c.read_line();
    if line == "END" {
        return None;
    }
    let value = c.read_line();
    assert_eq!(c.read_line(), "END");
    Some(value)
}

fn flush(c: &mut Client) {
    c.send(b"flush_all\r\n");
    assert_eq!(c.read_line(), "OK");
}

const KEYS: usize = 20;

#[test]
fn a_flush_reaches_another_proxy_over_the_same_backends() {
    let (m1, m2) = (Memcached::start(), Memcached::start());
    let a = GuardProxy::start(config(&[&m1, &m2]));
    let b = GuardProxy::start(config(&[&m1, &m2]));
    let (mut ca, mut cb) = (Client::connect(a.addr), Client::connect(b.addr));
    for i in 0..KEYS {
        set(&mut ca, &format!("k{i}"), "before");
    }
    assert_eq!(get(&mut cb, "k0").as_deref(), Some("before"));

    flush(&mut ca);
    for i in 0..KEYS {
        assert_eq!(get(&mut ca, &format!("k{i}")), None, "flushed here");
    }
    // The other proxy learns it from the backends within about a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&mut cb, "k0").is_some() {
        assert!(
            Instant::now() < deadline,
            "the flush never reached the other proxy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..KEYS {
        assert_eq!(get(&mut cb, &format!("k{i}")), None, "k{i} survived");
    }
    // Both now write and read the same generation.
    set(&mut cb, "k0", "after");
    assert_eq!(get(&mut ca, "k0").as_deref(), Some("after"));
}

#[test]
fn flushes_in_the_same_second_on_two_proxies_both_take_effect() {
    let mc = Memcached::start();
    let a = GuardProxy::start(config(&[&mc]));
    let b = GuardProxy::start(config(&[&mc]));
    let (mut ca, mut cb) = (Client::connect(a.addr), Client::connect(b.addr));
    // b has not heard of a's flush when it flushes: it must still move past
    // it, or the key written in between would survive b's flush.
    flush(&mut ca);
    set(&mut ca, "k", "between");
    flush(&mut cb);
    assert_eq!(get(&mut cb, "k"), None, "b's flush missed a key");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&mut ca, "k").is_some() {
        assert!(Instant::now() < deadline, "a never saw b's flush");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_set_pipelined_behind_a_flush_lands_after_it() {
    let mc = Memcached::start();
    let p = GuardProxy::start(config(&[&mc]));
    let mut c = Client::connect(p.addr);
    set(&mut c, "k", "old");
    c.send(b"flush_all\r\nset k 0 0 3\r\nnew\r\nget k\r\n");
    assert_eq!(c.read_line(), "OK");
    assert_eq!(c.read_line(), "STORED");
    assert_eq!(c.read_line(), "VALUE k 0 3");
    assert_eq!(c.read_line(), "new");
    assert_eq!(c.read_line(), "END");
    // Not just within the pipeline: the key is in the new generation.
    assert_eq!(get(&mut c, "k").as_deref(), Some("new"));
    // A negative delay is immediate too.
    c.send(b"flush_all -1\r\nset k 0 0 5\r\nnewer\r\n");
    assert_eq!(c.read_line(), "OK");
    assert_eq!(c.read_line(), "STORED");
    assert_eq!(get(&mut c, "k").as_deref(), Some("newer"));
    // Binary too: Flush then Set then Get in one write.
    let mut b = Client::connect(p.addr);
    let mut frames = common::bin(0x08, b"", &[], b"", 0, 1);
    frames.extend(common::bin(0x01, b"bk", &[0; 8], b"v", 0, 2));
    frames.extend(common::bin(0x00, b"bk", &[], b"", 0, 3));
    b.send(&frames);
    let reply = b.read_binary_until(3);
    assert!(
        reply.ends_with(b"v"),
        "binary get after flush+set: {reply:?}"
    );
    b.send(&common::bin(0x00, b"bk", &[], b"", 0, 4));
    let reply = b.read_binary_until(4);
    assert!(reply.ends_with(b"v"), "binary get once flushed: {reply:?}");
}

#[test]
fn a_flush_sent_by_a_client_that_leaves_at_once_still_happens() {
    let mc = Memcached::start();
    let p = GuardProxy::start(config(&[&mc]));
    let mut c = Client::connect(p.addr);
    set(&mut c, "k", "v");
    c.send(b"flush_all noreply\r\n");
    drop(c);
    let mut other = Client::connect(p.addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&mut other, "k").is_some() {
        assert!(
            Instant::now() < deadline,
            "the flush was dropped with its client"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_restarted_proxy_keeps_the_flushes_it_made() {
    let mc = Memcached::start();
    let mut c;
    {
        let p = GuardProxy::start(config(&[&mc]));
        c = Client::connect(p.addr);
        set(&mut c, "old", "1");
        flush(&mut c);
        set(&mut c, "new", "2");
        drop(c);
    }
    // From its very first request, the new process serves the generation
    // the old one had moved to: the flushed key stays gone.
    let p = GuardProxy::start(config(&[&mc]));
    c = Client::connect(p.addr);
    assert_eq!(get(&mut c, "old"), None, "a flushed key came back");
    assert_eq!(get(&mut c, "new").as_deref(), Some("2"));
}

/// The marker a backend holds for the open namespace, read directly.
fn marker_on(mc: &Memcached) -> Option<String> {
    let mut s = TcpStream::connect(mc.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"mg _:gen v\r\n").unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 256];
    while !(got.starts_with(b"EN\r\n")
        || (got.starts_with(b"VA ")
            && got.ends_with(b"\r\n")
            && got.iter().filter(|&&b| b == b'\n').count() == 2))
    {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "memcached closed the connection");
        got.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8(got).unwrap();
    text.strip_prefix("VA ")
        .and_then(|r| r.split("\r\n").nth(1))
        .map(str::to_owned)
}

#[test]
fn a_backend_restarted_empty_gets_its_markers_back() {
    let m1 = Memcached::start();
    let port = m1.addr().port();
    let m2 = Memcached::start();
    let p = GuardProxy::start(config(&[&m1, &m2]));
    let mut c = Client::connect(p.addr);
    flush(&mut c);
    let deadline = Instant::now() + Duration::from_secs(10);
    while marker_on(&m1).is_none() || marker_on(&m2).is_none() {
        assert!(Instant::now() < deadline, "markers never written");
        std::thread::sleep(Duration::from_millis(50));
    }
    let generation = marker_on(&m2).unwrap();
    assert_eq!(marker_on(&m1).as_deref(), Some(generation.as_str()));

    drop(m1);
    let m1 = Memcached::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while marker_on(&m1).is_none() {
        assert!(Instant::now() < deadline, "marker never restored");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(marker_on(&m1), Some(generation));
}
