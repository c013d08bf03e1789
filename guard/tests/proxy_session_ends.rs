//! Every session ends for one reason, and `stats` counts each reason
//! (`session_end_<reason>`): a client's EOF, `quit`, an idle timeout, a
//! protocol error that loses the stream, and a request too slow to arrive.

mod common;

use std::{
    collections::HashMap,
    io::Write,
    net::TcpStream,
    time::{Duration, Instant},
};

use common::{Client, GuardProxy, Memcached, PeerState, config, peer_state};

fn session_ends(guard: &GuardProxy) -> HashMap<String, u64> {
    let mut c = Client::connect(guard.addr);
    c.send(b"stats\r\n");
    let text = String::from_utf8(c.read_until_suffix(b"END\r\n")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("STAT session_end_"))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Waits up to `within` for the server to close `s` (EOF or reset),
/// passing over what it replies first (a protocol error's message).
#[track_caller]
fn wait_closed(s: &TcpStream, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match peer_state(s, deadline.saturating_duration_since(Instant::now())) {
            PeerState::Sent(_) => {}
            PeerState::Open => panic!("not closed within {within:?}"),
            _ => return,
        }
    }
}

#[test]
fn each_way_a_session_ends_is_counted() {
    let mc = Memcached::start();
    let mut cfg = config(&[&mc]);
    cfg.idle_timeout_secs = 1;
    cfg.request_read_timeout_ms = 500;
    let guard = GuardProxy::start(cfg);
    let before = session_ends(&guard);
    for reason in [
        "client_closed",
        "quit",
        "idle",
        "protocol_error",
        "slow_request",
        "drained",
    ] {
        assert!(
            before.contains_key(reason),
            "stats lists {reason}: {before:?}"
        );
    }

    let mut quit = TcpStream::connect(guard.addr).unwrap();
    quit.write_all(b"quit\r\n").unwrap();
    wait_closed(&quit, Duration::from_secs(3));

    drop(TcpStream::connect(guard.addr).unwrap());

    // A command line past memcached's length limit loses the stream.
    let mut garbage = TcpStream::connect(guard.addr).unwrap();
    garbage.write_all(&[b'x'; 4096]).unwrap();
    wait_closed(&garbage, Duration::from_secs(3));

    let mut slow = TcpStream::connect(guard.addr).unwrap();
    slow.write_all(b"set k 0 0 10\r\n0123").unwrap();
    wait_closed(&slow, Duration::from_secs(3));

    let idle = TcpStream::connect(guard.addr).unwrap();
    wait_closed(&idle, Duration::from_secs(3));

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let after = session_ends(&guard);
        let grew = |k: &str| after[k] - before[k];
        // The stats clients themselves end by EOF too.
        if grew("quit") == 1
            && grew("client_closed") >= 1
            && grew("protocol_error") == 1
            && grew("slow_request") == 1
            && grew("idle") == 1
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "session ends not counted: before {before:?}, after {after:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
