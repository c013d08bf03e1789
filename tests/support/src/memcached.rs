//! A real memcached for tests.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{ChildGuard, free_port, process::accepts};

/// Where memcached is expected to be installed (Debian package).
pub const MEMCACHED_BIN: &str = "/usr/bin/memcached";

/// A memcached (`memcached -u root -l ADDR -p PORT -U 0`) that accepts
/// connections by the time `start*` returns; SIGKILLed and reaped on drop,
/// so dropping one is how a test makes a backend fail.
#[derive(Debug)]
pub struct Memcached {
    addr: SocketAddr,
    child: ChildGuard,
}

impl Memcached {
    /// Starts memcached on 127.0.0.1 and a [`free_port`].
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts memcached on 127.0.0.1:`port`, e.g. again on the port of
    /// one a test killed.
    pub fn start_on(port: u16) -> Self {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Self::start_with(&mut Command::new(MEMCACHED_BIN), addr, accepts)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts `memcached`, a command that runs [`MEMCACHED_BIN`] with any
    /// options of the caller's wherever the caller puts it (in a network
    /// namespace, say), listening on `addr`; returns once
    /// `reachable(addr)`, a probe from where its clients will be.
    pub fn start_with(
        memcached: &mut Command,
        addr: SocketAddr,
        mut reachable: impl FnMut(SocketAddr) -> bool,
    ) -> Result<Self> {
        if !std::path::Path::new(MEMCACHED_BIN).exists() {
            bail!("{MEMCACHED_BIN} not found (apt-get install memcached)");
        }
        let ip = addr.ip().to_string();
        let port = addr.port().to_string();
        memcached
            .args(["-u", "root", "-l", &ip, "-p", &port, "-U", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut child = ChildGuard::spawn(memcached)?.with_grace(Duration::ZERO);
        child
            .wait_until(
                Duration::from_secs(10),
                &format!("accepting on {addr}"),
                || reachable(addr),
            )
            .with_context(|| format!("memcached on {addr}"))?;
        Ok(Self { addr, child })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The process guard.
    pub fn child(&mut self) -> &mut ChildGuard {
        &mut self.child
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_until_dropped() {
        let mc = Memcached::start();
        let (addr, pid) = (mc.addr(), mc.pid());
        assert!(accepts(addr));
        drop(mc);
        // SAFETY: signal 0 only asks whether the pid exists.
        assert_ne!(unsafe { libc::kill(pid as i32, 0) }, 0, "still running");
        assert!(!accepts(addr));
    }

    #[test]
    fn a_port_taken_fails_with_memcached_exiting() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e =
            Memcached::start_with(&mut Command::new(MEMCACHED_BIN), addr, |_| false).unwrap_err();
        assert!(
            format!("{e:#}").contains("exited before accepting"),
            "{e:#}"
        );
    }
}
