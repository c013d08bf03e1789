//! Slow and half-written clients: a trickled command line never stalls
//! other clients, an idle half-written line is closed at the idle timeout,
//! and many slow clients at once hold no more than their caps allow.

mod common;

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::FromRawFd,
    time::{Duration, Instant},
};

use common::{Client, GuardProxy, Memcached, PeerState, config, peer_state};
use guard_test_support::is_reset;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A connection to `to` from the loopback address `from` (any 127/8
/// address is ours), so tests can act as several sources.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let sin = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let local = sin(SocketAddrV4::new(from, 0));
    let remote = sin(to);
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor we own, with correctly
    // sized addresses; the descriptor is handed to TcpStream exactly once.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        assert_eq!(
            libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len),
            0,
            "bind {from}: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(
            libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len),
            0,
            "connect: {}",
            std::io::Error::last_os_error()
        );
        stream
    }
}

#[test]
fn trickled_command_never_stalls_other_clients() {
    let mc = Memcached::start();
    let guard = GuardProxy::start(config(&[&mc]));
    let mut setup = Client::connect(guard.addr);
    setup.send(b"set k 0 0 5\r\nhello\r\n");
    assert_eq!(setup.read_line(), "STORED");

    let request = b"set t 0 0 4\r\nslow\r\nget t k\r\n";
    let trickler = std::thread::spawn({
        let addr = guard.addr;
        move || {
            let mut c = Client::connect(addr);
            for b in request {
                c.send(&[*b]);
                std::thread::sleep(Duration::from_millis(100));
            }
            assert_eq!(c.read_line(), "STORED");
            assert_eq!(
                c.read_until_suffix(b"END\r\n"),
                b"VALUE t 0 4\r\nslow\r\nVALUE k 0 5\r\nhello\r\nEND\r\n"
            );
        }
    });

    // While the line trickles in (about 3 s), others are served: many
    // round trips complete before the trickler's request is even whole.
    std::thread::sleep(Duration::from_millis(300));
    let mut others: Vec<Client> = (0..4).map(|_| Client::connect(guard.addr)).collect();
    let mut round_trips = 0;
    while !trickler.is_finished() && round_trips < 200 {
        for c in &mut others {
            c.send(b"get k\r\n");
            assert_eq!(
                c.read_until_suffix(b"END\r\n"),
                b"VALUE k 0 5\r\nhello\r\nEND\r\n"
            );
            round_trips += 1;
        }
    }
    assert!(
        !trickler.is_finished(),
        "the trickled request finished before the others' 200 round trips"
    );
    trickler.join().unwrap();
}

#[test]
fn idle_half_written_line_is_closed_at_the_idle_timeout() {
    let mc = Memcached::start();
    let mut cfg = config(&[&mc]);
    cfg.idle_timeout_secs = 1;
    // Only the idle timer may close these: the request deadline (5 s by
    // default) would too, later.
    cfg.request_read_timeout_ms = 0;
    let guard = GuardProxy::start(cfg);

    for partial in [
        &b"get half-a-ke"[..],
        b"set k 0 0 100\r\nonly part of the va",
        // A binary header cut short.
        &[0x80, 0x00, 0x00, 0x05][..],
    ] {
        let mut c = Client::connect(guard.addr);
        let t = Instant::now();
        c.send(partial);
        match c.peer_state(Duration::from_secs(3)) {
            s if s.is_closed() => {}
            s => panic!(
                "{:?}: not closed within 3 s (idle timeout 1 s): {s:?}",
                partial.escape_ascii().to_string()
            ),
        }
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(900),
            "{partial:?}: closed after {took:?}, before the idle timeout"
        );
    }

    // A client that keeps talking is not idle.
    let mut busy = Client::connect(guard.addr);
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(400));
        busy.send(b"version\r\n");
        assert!(busy.read_line().starts_with("VERSION"));
    }
}

/// The idle timer restarts with every byte, so one byte per 100 ms would
/// hold a connection (and its read buffer) forever without the deadline on
/// a request still arriving.
#[test]
fn trickled_line_is_closed_at_a_request_deadline() {
    let mc = Memcached::start();
    let mut cfg = config(&[&mc]);
    cfg.idle_timeout_secs = 1;
    cfg.request_read_timeout_ms = 1_000;
    let guard = GuardProxy::start(cfg);
    let mut c = TcpStream::connect(guard.addr).unwrap();
    let line = format!("get {}\r\n", "k".repeat(200));
    let t = Instant::now();
    let mut closed = false;
    // 4 s of trickling: 40 bytes, still short of the line's end.
    for b in line.as_bytes().iter().take(40) {
        match peer_state(&c, Duration::ZERO) {
            PeerState::Open => {}
            s if s.is_closed() => {
                closed = true;
                break;
            }
            s => panic!("half a line answered: {s:?}"),
        }
        match c.write_all(&[*b]) {
            Ok(()) => {}
            // Closed between the look and the write.
            Err(e) if is_reset(&e) => {
                closed = true;
                break;
            }
            Err(e) => panic!("write: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        closed,
        "a line trickled for {:?} (request deadline 1 s) was never cut off",
        t.elapsed()
    );
}

#[test]
fn many_slow_clients_hold_no_more_than_their_caps() {
    let mc = Memcached::start();
    let mut cfg = config(&[&mc]);
    cfg.idle_timeout_secs = 2;
    cfg.max_connections = 400;
    cfg.max_connections_per_source = 100;
    let guard = GuardProxy::start(cfg);
    std::thread::sleep(Duration::from_millis(200));
    let baseline = open_fds();

    // 300 slow clients from one source, 100 from another; each sends part
    // of a request and stalls.
    let slow_a = Ipv4Addr::new(127, 0, 0, 2);
    let slow_b = Ipv4Addr::new(127, 0, 0, 3);
    let mut slow = Vec::new();
    for i in 0..400 {
        let from = if i < 300 { slow_a } else { slow_b };
        let mut s = connect_from(from, guard.addr);
        let _ = s.write_all(format!("set slow{i} 0 0 1000\r\npartial").as_bytes());
        slow.push((from, s));
    }
    std::thread::sleep(Duration::from_millis(300));
    // Beyond its per-source cap, a source's connections are closed at once.
    let mut open_a = 0;
    let mut open_b = 0;
    for (from, s) in &slow {
        match peer_state(s, Duration::ZERO) {
            PeerState::Open if *from == slow_a => open_a += 1,
            PeerState::Open => open_b += 1,
            s if s.is_closed() => {}
            s => panic!("a stalled client was answered: {s:?}"),
        }
    }
    assert_eq!((open_a, open_b), (100, 100), "open per source");
    // guard holds one descriptor per admitted client, no more.
    let held = open_fds().saturating_sub(baseline);
    assert!(held <= 400 + 200 + 8, "descriptors: {held} over baseline");

    // Another source is served normally meanwhile, with no wait.
    let mut good = Client::connect(guard.addr);
    good.send(b"set g 0 0 2\r\nok\r\nget g\r\n");
    assert_eq!(good.read_line(), "STORED");
    assert_eq!(
        good.read_until_suffix(b"END\r\n"),
        b"VALUE g 0 2\r\nok\r\nEND\r\n"
    );

    // At the idle timeout every stalled client is closed by guard, well
    // before the request deadline (5 s) would.
    std::thread::sleep(Duration::from_millis(2_500));
    let deadline = Instant::now() + Duration::from_secs(1);
    let still_open = slow
        .iter()
        .filter(|(_, s)| {
            let left = deadline.saturating_duration_since(Instant::now());
            !peer_state(s, left).is_closed()
        })
        .count();
    assert_eq!(
        still_open, 0,
        "stalled clients still open well past their 2 s idle timeout"
    );
    drop(slow);
    std::thread::sleep(Duration::from_millis(300));
    let now = open_fds();
    assert!(
        now <= baseline + 4,
        "descriptors: baseline {baseline}, now {now}"
    );
    let mut again = Client::connect(guard.addr);
    again.send(b"get g\r\n");
    assert_eq!(
        again.read_until_suffix(b"END\r\n"),
        b"VALUE g 0 2\r\nok\r\nEND\r\n"
    );
}
