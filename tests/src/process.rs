//! Processes started by tests: killed and reaped on drop.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::NsHandle;

/// Owns a child process; on drop sends SIGTERM, waits up to the grace period
/// (default 5 s), then SIGKILLs and reaps it.
///
/// Children spawned through [`ChildGuard::spawn`] also get SIGKILL from the
/// kernel if the *thread* that spawned them exits (`PR_SET_PDEATHSIG`), which
/// covers a test process killed outright; so spawn from the test's own thread.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    grace: Duration,
    done: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` under a guard.
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        // SAFETY: prctl is async-signal-safe; nothing else runs in the hook.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
        Ok(Self::new(child))
    }

    /// Guards an already spawned child.
    pub fn new(child: Child) -> Self {
        ChildGuard {
            child,
            grace: Duration::from_secs(5),
            done: None,
        }
    }

    /// Changes the SIGTERM→SIGKILL grace period.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Exit status if it has exited (reaping it), `None` if still running.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.done.is_none() {
            self.done = self.child.try_wait()?;
        }
        Ok(self.done)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `sig` unless the process was already reaped (so the pid cannot
    /// have been reused by someone else).
    pub fn signal(&mut self, sig: libc::c_int) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: the pid is our unreaped child.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, sig) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill");
        }
        Ok(())
    }

    /// SIGTERM, grace period, SIGKILL; returns the exit status.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        if let Some(s) = self.wait_timeout(self.grace)? {
            return Ok(s);
        }
        self.signal(libc::SIGKILL)?;
        let s = self.child.wait()?;
        self.done = Some(s);
        Ok(s)
    }
}

impl Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.terminate() {
            eprintln!("harness: stopping child {}: {e:#}", self.child.id());
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A memcached (`/usr/bin/memcached -u root -l ADDR -p PORT -U 0`) that
/// accepts connections by the time `start*` returns; stopped on drop.
#[derive(Debug)]
pub struct Memcached {
    addr: SocketAddr,
    ns: Option<NsHandle>,
    child: ChildGuard,
}

/// Where memcached is expected to be installed (Debian package).
pub const MEMCACHED_BIN: &str = "/usr/bin/memcached";

impl Memcached {
    /// Starts memcached on `addr` inside `ns`.
    pub fn start_in(ns: &NsHandle, addr: SocketAddr) -> Result<Self> {
        Self::start_with(Some(ns), addr, &[])
    }

    /// Starts memcached on 127.0.0.1 of the current namespace on a free port.
    pub fn start_loopback() -> Result<Self> {
        let port = crate::net::free_loopback_port()?;
        Self::start_with(
            None,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            &[],
        )
    }

    /// Starts memcached on `addr` (inside `ns` if given) with extra arguments.
    pub fn start_with(ns: Option<&NsHandle>, addr: SocketAddr, extra: &[&str]) -> Result<Self> {
        if !std::path::Path::new(MEMCACHED_BIN).exists() {
            bail!("{MEMCACHED_BIN} not found (apt-get install memcached)");
        }
        let mut cmd = match ns {
            Some(ns) => ns.command(MEMCACHED_BIN),
            None => Command::new(MEMCACHED_BIN),
        };
        let ip = addr.ip().to_string();
        let port = addr.port().to_string();
        cmd.args(["-u", "root", "-l", &ip, "-p", &port, "-U", "0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut child = ChildGuard::spawn(&mut cmd)?.with_grace(Duration::from_secs(2));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait()? {
                bail!("memcached on {addr} exited during startup: {s}");
            }
            let ok = match ns {
                Some(ns) => crate::net::connect_in(ns, addr, Duration::from_millis(200)).is_ok(),
                None => TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
            };
            if ok {
                return Ok(Memcached {
                    addr,
                    ns: ns.cloned(),
                    child,
                });
            }
            if Instant::now() >= deadline {
                bail!("memcached on {addr} not accepting after 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The namespace it runs in (`None`: the test's own).
    pub fn netns(&self) -> Option<&NsHandle> {
        self.ns.as_ref()
    }

    /// The process id.
    pub fn child_pid(&self) -> u32 {
        self.child.pid()
    }

    /// The process guard.
    pub fn child(&mut self) -> &mut ChildGuard {
        &mut self.child
    }
}
