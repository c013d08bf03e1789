//! Processes started by tests: stopped and reaped on drop.

use std::{
    ffi::OsString,
    net::{SocketAddr, TcpStream},
    ops::{Deref, DerefMut},
    os::unix::process::CommandExt,
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Owns a child process; on drop sends SIGTERM, waits up to the grace period
/// (default 5 s), then SIGKILLs and reaps it. With a zero grace period it
/// is SIGKILLed at once.
///
/// Children spawned through [`ChildGuard::spawn`] also get SIGKILL from the
/// kernel if the *thread* that spawned them exits (`PR_SET_PDEATHSIG`), which
/// covers a test process killed outright; so spawn from the test's own thread.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    program: OsString,
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
        let mut guard = Self::new(child);
        guard.program = cmd.get_program().to_owned();
        Ok(guard)
    }

    /// Guards an already spawned child.
    pub fn new(child: Child) -> Self {
        ChildGuard {
            program: format!("child {}", child.id()).into(),
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

    /// Waits up to `within` until `ready()` holds; fails as soon as the
    /// process exits instead, since then it never will. `what` says what
    /// is awaited, for the error ("accepting on 127.0.0.1:11211").
    pub fn wait_until(
        &mut self,
        within: Duration,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.try_wait()? {
                bail!("{:?} exited before {what}: {s}", self.program);
            }
            if ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{:?} not {what} after {within:?}", self.program);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to 10 s until `addr` accepts connections from here (see
    /// [`wait_until`](Self::wait_until)).
    pub fn wait_accepting(&mut self, addr: SocketAddr) -> Result<()> {
        self.wait_until(
            Duration::from_secs(10),
            &format!("accepting on {addr}"),
            || accepts(addr),
        )
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
        if !self.grace.is_zero() {
            self.signal(libc::SIGTERM)?;
            if let Some(s) = self.wait_timeout(self.grace)? {
                return Ok(s);
            }
        }
        self.signal(libc::SIGKILL)?;
        if let Some(s) = self.done {
            return Ok(s);
        }
        let s = self.child.wait()?;
        self.done = Some(s);
        Ok(s)
    }
}

/// Whether `addr` accepts a TCP connection from here within 200 ms.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_exits_is_reported_before_the_deadline() {
        let mut c =
            ChildGuard::spawn(Command::new("true").stdin(std::process::Stdio::null())).unwrap();
        let started = Instant::now();
        let e = c
            .wait_until(Duration::from_secs(10), "ready", || false)
            .unwrap_err();
        assert!(e.to_string().contains("exited before ready"), "{e:#}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn zero_grace_kills_at_once() {
        let mut c = ChildGuard::spawn(Command::new("sleep").arg("60"))
            .unwrap()
            .with_grace(Duration::ZERO);
        let started = Instant::now();
        use std::os::unix::process::ExitStatusExt;
        // Killed, not asked: SIGTERM would have ended `sleep` too.
        assert_eq!(c.terminate().unwrap().signal(), Some(libc::SIGKILL));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
