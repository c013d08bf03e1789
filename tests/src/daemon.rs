//! The real `guard` binary, run as a daemon inside a test namespace with
//! its own pin and state directories, detached and cleaned up on drop.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use guard::{ebpf::maps::GuardMaps, paths::Paths};

use crate::{ChildGuard, NsHandle, unique_name};

/// Path of the `guard` binary under test: `$GUARD_BIN`, else the workspace's
/// build of the same profile as these tests (`cargo xtask test` builds it).
pub fn guard_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GUARD_BIN") {
        return p.into();
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(profile)
        .join("guard");
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build {}-p guard`) or set GUARD_BIN",
        p.display(),
        if profile == "release" {
            "--release "
        } else {
            ""
        }
    );
    p
}

/// A running `guard run` and the locations it uses.
pub struct GuardDaemon {
    ns: NsHandle,
    args: Vec<String>,
    /// The log line that says start-up is over.
    ready: &'static str,
    pin_root: PathBuf,
    state_root: PathBuf,
    child: Option<ChildGuard>,
    log: PathBuf,
}

impl GuardDaemon {
    /// Starts `guard run ARGS` inside `ns` and waits until its XDP program
    /// is attached and configured.
    pub fn start(ns: &NsHandle, args: &[&str]) -> Result<Self> {
        Self::start_until(ns, args, "guarding ")
    }

    /// Starts `guard run ARGS` (a proxy without XDP) inside `ns` and waits
    /// until it is listening.
    pub fn start_proxy(ns: &NsHandle, args: &[&str]) -> Result<Self> {
        Self::start_until(ns, args, "proxy listening on ")
    }

    fn start_until(ns: &NsHandle, args: &[&str], ready: &'static str) -> Result<Self> {
        let name = unique_name("guard");
        let mut d = Self {
            ns: ns.clone(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ready,
            pin_root: PathBuf::from("/sys/fs/bpf").join(&name),
            state_root: std::env::temp_dir().join(&name),
            child: None,
            log: std::env::temp_dir().join(format!("{name}.log")),
        };
        d.spawn()?;
        Ok(d)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = self.ns.command(guard_bin());
        cmd.arg("--pin-root")
            .arg(&self.pin_root)
            .arg("--state-root")
            .arg(&self.state_root)
            .arg("run")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // The log is appended across restarts: only what this process
        // writes counts as its start-up.
        let seen = self.log_text().len();
        let mut child = ChildGuard::spawn(&mut cmd)?;
        let what = format!("logging {:?}", self.ready.trim());
        let started = child.wait_until(Duration::from_secs(20), &what, || {
            self.log_text()
                .get(seen..)
                .is_some_and(|t| t.contains(self.ready))
        });
        if let Err(e) = started {
            bail!("{e:#}:\n{}", self.log_text());
        }
        self.child = Some(child);
        Ok(())
    }

    /// Stops the daemon (SIGTERM) and starts it again with the same flags.
    /// The XDP program stays attached in between.
    pub fn restart(&mut self) -> Result<Duration> {
        let start = Instant::now();
        self.stop()?;
        self.spawn()?;
        Ok(start.elapsed())
    }

    /// Stops the daemon without detaching.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.terminate()?;
        }
        Ok(())
    }

    /// Sends a signal to the daemon.
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        let child = self.child.as_mut().context("guard is not running")?;
        child.signal(sig)
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }

    /// Everything the daemon has logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The pin and state locations of this daemon.
    pub fn paths(&self) -> Paths {
        Paths::new(&self.pin_root, &self.state_root)
    }

    /// The daemon's maps, opened from its pins.
    pub fn maps(&self) -> Result<GuardMaps> {
        GuardMaps::open(&self.paths())
    }

    /// The XDP counters, summed over CPUs.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        self.maps()?.counters()
    }

    /// Runs a `guard` CLI command (e.g. `xdp status --json`) against this
    /// daemon's pins.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(guard_bin())
            .arg("--pin-root")
            .arg(&self.pin_root)
            .arg("--state-root")
            .arg(&self.state_root)
            .args(args)
            .output()?)
    }
}

impl Drop for GuardDaemon {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = self.cli(&["xdp", "detach"]);
        let _ = std::fs::remove_dir_all(&self.state_root);
        let _ = std::fs::remove_dir_all(&self.pin_root);
        if std::thread::panicking() {
            eprintln!("guard log:\n{}", self.log_text());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
