//! The real binary: `guard run --listen … --backend …` serves without XDP
//! or root, and SIGTERM drains it.

mod common;

use std::{
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{ChildGuard, Client, Memcached, free_port};

#[test]
fn binary_serves_and_drains_on_sigterm() {
    let mc = Memcached::start();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut guard = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_guard"))
            .args([
                "run",
                "--listen",
                &addr.to_string(),
                "--backend",
                &mc.addr().to_string(),
                "--drain-grace-secs",
                "2",
            ])
            .env("GUARD_PIN_ROOT", "/nonexistent/guard-proxy-test")
            .env("GUARD_STATE_ROOT", "/nonexistent/guard-proxy-test")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    guard.wait_accepting(addr).unwrap();
    let mut c = Client::connect(addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        c.send(b"set k 0 0 2\r\nhi\r\n");
        if c.read_line() == "STORED" {
            break;
        }
        assert!(Instant::now() < deadline, "backend never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.send(b"get k\r\n");
    assert_eq!(
        c.read_until_suffix(b"END\r\n"),
        b"VALUE k 0 2\r\nhi\r\nEND\r\n"
    );

    // A request sent just before SIGTERM is still answered.
    c.send(b"get k\r\n");
    guard.signal(libc::SIGTERM).unwrap();
    assert_eq!(
        c.read_until_suffix(b"END\r\n"),
        b"VALUE k 0 2\r\nhi\r\nEND\r\n"
    );
    // Drained sessions are closed, well before the 2 s grace runs out.
    c.expect_closed(Duration::from_secs(1));

    let status = guard
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("guard did not exit after SIGTERM");
    assert!(status.success(), "{status}");
    // Refused, not merely failed: nothing listens any more.
    let e = TcpStream::connect(addr).expect_err("listener closed");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
}
