//! The real binary at its descriptor limit: accept errors (EMFILE) back off
//! instead of spinning and recover when descriptors free up, and a
//! connection cap larger than the limit is lowered so clients wait in the
//! backlog instead of meeting EMFILE at all.

mod common;

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{ChildGuard, Client, Memcached, PeerState, free_port};

/// The daemon, killed on drop (a drain would only wait on the clients a
/// test left); its log goes to a file the test reads.
struct Guard {
    child: ChildGuard,
    log: PathBuf,
}

impl Guard {
    fn start(mc: &Memcached, nofile: Option<u64>) -> (Self, SocketAddr) {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::env::temp_dir().join(format!(
            "guard-descriptors-{}-{}.log",
            std::process::id(),
            addr.port()
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_guard"));
        cmd.args(["run", "--listen", &addr.to_string()])
            .args(["--backend", &mc.addr().to_string()])
            .env("RUST_LOG", "info")
            .env("GUARD_PIN_ROOT", "/nonexistent/guard-proxy-test")
            .env("GUARD_STATE_ROOT", "/nonexistent/guard-proxy-test")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(n) = nofile {
            // SAFETY: only async-signal-safe setrlimit between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut guard = Self {
            child: ChildGuard::spawn(&mut cmd)
                .unwrap()
                .with_grace(Duration::ZERO),
            log,
        };
        guard.child.wait_accepting(addr).unwrap();
        // One request through, so the backend connections are up and the
        // descriptor count is settled.
        let mut c = Client::connect(addr);
        c.send(b"version\r\n");
        assert!(c.read_line().starts_with("VERSION "));
        (guard, addr)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The log so far; a log that cannot be read fails the test rather
    /// than read as one with nothing in it.
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).expect("guard's log")
    }

    fn open_fds(&self) -> u64 {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count() as u64
    }

    /// User plus system CPU time, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let rest = stat.rsplit_once(')').unwrap().1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// Sets the daemon's soft descriptor limit from outside; returns the
    /// previous one.
    fn set_soft_nofile(&self, soft: u64) -> u64 {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit on our own child with valid structs.
        unsafe {
            assert_eq!(
                libc::prlimit(self.pid(), libc::RLIMIT_NOFILE, std::ptr::null(), &mut old),
                0
            );
            let new = libc::rlimit {
                rlim_cur: soft,
                rlim_max: old.rlim_max,
            };
            assert_eq!(
                libc::prlimit(self.pid(), libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()),
                0,
                "prlimit: {}",
                std::io::Error::last_os_error()
            );
        }
        old.rlim_cur
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.terminate();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[test]
fn accept_backs_off_on_emfile_and_recovers() {
    let mc = Memcached::start();
    let (guard, addr) = Guard::start(&mc, None);

    // No descriptor left: every accept fails with EMFILE while the
    // handshakes complete in the kernel's backlog.
    let limit = guard.set_soft_nofile(guard.open_fds());
    let mut waiting: Vec<Client> = (0..8).map(|_| Client::connect(addr)).collect();
    for c in &mut waiting {
        c.send(b"version\r\n");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !guard.log_text().contains("accept failed") {
        assert!(
            Instant::now() < deadline,
            "no accept error logged:\n{}",
            guard.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Retrying at once would burn a whole CPU: the pending connection
    // keeps the listener readable. Backing off costs next to nothing.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (t0, c0) = (Instant::now(), guard.cpu_ticks());
    std::thread::sleep(Duration::from_secs(2));
    let used = (guard.cpu_ticks() - c0) as f64 / hz;
    let share = used / t0.elapsed().as_secs_f64();
    assert!(
        share < 0.25,
        "guard used {:.0}% of a CPU while accept failed: it spins",
        share * 100.0
    );

    // Descriptors back: the waiting clients are served, none was lost.
    guard.set_soft_nofile(limit);
    for c in &mut waiting {
        assert!(
            c.read_line().starts_with("VERSION "),
            "a waiting client was not served"
        );
    }
    let log = guard.log_text();
    let errors = log.matches("accept failed").count();
    assert!(
        errors < 20,
        "{errors} accept errors logged in ~2 s: the backoff does not grow"
    );
}

#[test]
fn a_cap_above_the_descriptor_limit_is_lowered_so_clients_wait_instead() {
    let mc = Memcached::start();
    // Room for a few dozen clients after the reserve; the default cap is
    // 50,000.
    let (guard, addr) = Guard::start(&mc, Some(200));
    let log = guard.log_text();
    let room: usize = log
        .split("capping max_connections at ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no cap logged:\n{log}"));
    assert!((1..200).contains(&room), "{room}");

    // The probe client of start-up has gone; fill every slot.
    std::thread::sleep(Duration::from_millis(200));
    let mut served: Vec<Client> = (0..room).map(|_| Client::connect(addr)).collect();
    for c in &mut served {
        c.send(b"version\r\n");
        assert!(c.read_line().starts_with("VERSION "));
    }
    // More clients complete their handshake in the backlog and wait there.
    let mut waiting: Vec<Client> = (0..10).map(|_| Client::connect(addr)).collect();
    for c in &mut waiting {
        c.send(b"version\r\n");
    }
    // Held by the cap: without it they would fit in the descriptor limit
    // and be answered at once.
    for c in &mut waiting {
        assert_eq!(
            c.peer_state(Duration::from_millis(300)),
            PeerState::Open,
            "a client beyond the cap was served or closed"
        );
    }
    // Slots free up: the waiting clients are served in turn.
    served.truncate(room - 10);
    for c in &mut waiting {
        assert!(c.read_line().starts_with("VERSION "));
    }
    assert!(
        !guard.log_text().contains("accept failed"),
        "the cap must keep accept from meeting EMFILE:\n{}",
        guard.log_text()
    );
}
