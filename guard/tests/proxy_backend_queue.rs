//! A backend that stops answering holds at most `backend_max_in_flight`
//! requests per connection; the rest are refused at once
//! (`SERVER_ERROR backend overloaded`), never queued behind it, and the
//! places come back when it answers again. The backend is a real
//! memcached, stopped with SIGSTOP.

mod common;

use std::time::Duration;

use common::{Client, GuardProxy, Memcached, config};

const MAX_IN_FLIGHT: usize = 8;
const OVERLOADED: &str = "SERVER_ERROR backend overloaded";

#[test]
fn a_stopped_backend_holds_its_bound_and_refuses_the_rest_at_once() {
    let mut mc = Memcached::start();
    let mut cfg = config(&[&mc]);
    cfg.backend_connections = 1;
    cfg.backend_max_in_flight = MAX_IN_FLIGHT;
    // Far longer than the client below waits for its refusal.
    cfg.request_timeout_ms = 4_000;
    let guard = GuardProxy::start(cfg);
    let mut warm = Client::connect(guard.addr);
    warm.send(b"get warm\r\n");
    assert_eq!(warm.read_line(), "END");

    mc.child().signal(libc::SIGSTOP).unwrap();
    // One client pipelines more gets than the connection may hold.
    let mut a = Client::connect(guard.addr);
    let mut pipeline = Vec::new();
    for i in 0..20 {
        pipeline.extend_from_slice(format!("get k{i}\r\n").as_bytes());
    }
    a.send(&pipeline);
    // Once its pipeline was dispatched (the gets beyond the bound were
    // refused), the connection is full.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while common::stat(guard.addr, "backend_overloaded") < 20 - MAX_IN_FLIGHT as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pipeline was never dispatched"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Another client's get is refused at once, not held until the
    // request timeout (the client's read timeout is 5 s; the refusal must
    // come well before the 4 s timeout would answer it).
    let mut b = Client::connect(guard.addr);
    b.stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let start = std::time::Instant::now();
    b.send(b"get x\r\n");
    assert_eq!(b.read_line(), OVERLOADED);
    assert!(start.elapsed() < Duration::from_secs(2));

    mc.child().signal(libc::SIGCONT).unwrap();
    // The first client's replies, in order: the gets that were sent are
    // answered now that memcached runs again, then the refused ones.
    let mut answered = 0;
    let mut refused = 0;
    for i in 0..20 {
        match a.read_line().as_str() {
            "END" => {
                assert_eq!(refused, 0, "reply {i}: answered after a refusal");
                answered += 1;
            }
            OVERLOADED => refused += 1,
            other => panic!("reply {i}: {other:?}"),
        }
    }
    // The daemon's own generation pass may hold places too.
    assert!(
        (1..=MAX_IN_FLIGHT).contains(&answered),
        "{answered} gets sent to the stopped backend, at most {MAX_IN_FLIGHT} may be"
    );
    // The places came back: the refused client is served again.
    b.send(b"get x\r\n");
    assert_eq!(b.read_line(), "END");
    b.send(b"stats\r\n");
    let stats = String::from_utf8(b.read_until_suffix(b"END\r\n")).unwrap();
    let overloaded: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("STAT backend_overloaded "))
        .expect("stats lists backend_overloaded")
        .trim()
        .parse()
        .unwrap();
    assert!(
        overloaded > refused as u64,
        "{overloaded} counted, {refused} + 1 refused"
    );
}
