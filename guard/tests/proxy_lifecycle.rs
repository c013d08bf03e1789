//! Descriptors are released the moment clients leave: 2,000 clients that
//! vanish (half with a reset, half with requests in flight) leave no
//! CLOSE_WAIT socket and no extra descriptor behind. Alone in its file so
//! no other test's sockets blur the descriptor count.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::fd::AsRawFd,
    time::Duration,
};

use common::{GuardProxy, Memcached, config};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// TCP sockets on local port `port` in `state` (`/proc/net/tcp`'s hex
/// code: `08` CLOSE_WAIT, `0A` LISTEN). /proc/net/tcp must be readable:
/// a count of none from a file never read would pass for a clean one.
fn sockets_on(port: u16, state: &str) -> usize {
    let mut tables = vec![std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp")];
    // Absent when IPv6 is disabled.
    tables.extend(std::fs::read_to_string("/proc/net/tcp6").ok());
    tables
        .iter()
        .flat_map(|t| t.lines().skip(1))
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f[1].rsplit(':').next().unwrap();
            u16::from_str_radix(local_port, 16) == Ok(port) && f[3] == state
        })
        .count()
}

fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
}

#[test]
fn abrupt_clients_leave_no_close_wait_and_no_descriptors() {
    let mc = Memcached::start();
    let mut cfg = config(&[&mc]);
    cfg.max_connections = 4096;
    cfg.max_connections_per_source = 0;
    let guard = GuardProxy::start(cfg);
    let baseline = open_fds();

    for wave in 0..10 {
        let mut clients = Vec::new();
        for i in 0..200 {
            let mut s = TcpStream::connect(guard.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if i % 2 == 0 {
                reset_on_close(&s);
            }
            s.write_all(format!("set k{wave}-{i} 0 0 1\r\nv\r\nget k{wave}-{i}\r\n").as_bytes())
                .unwrap();
            clients.push((i, s));
        }
        for (i, mut s) in clients {
            // Odd clients leave with their replies still in flight.
            if i % 4 == 1 {
                continue;
            }
            let mut got = Vec::new();
            let mut chunk = [0u8; 256];
            while !got.ends_with(b"END\r\n") {
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0);
                got.extend_from_slice(&chunk[..n]);
            }
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    // The same reading finds guard's listener: the count below is of
    // guard's sockets, not of a table that lists none.
    assert_eq!(sockets_on(guard.addr.port(), "0A"), 1, "LISTEN sockets");
    assert_eq!(sockets_on(guard.addr.port(), "08"), 0, "CLOSE_WAIT sockets");
    let now = open_fds();
    assert!(
        now <= baseline + 4,
        "descriptors: baseline {baseline}, now {now}"
    );

    // And the proxy still serves.
    let mut c = common::Client::connect(guard.addr);
    c.send(b"get k0-0\r\n");
    assert_eq!(
        c.read_until_suffix(b"END\r\n"),
        b"VALUE k0-0 0 1\r\nv\r\nEND\r\n"
    );
}
