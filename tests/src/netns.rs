//! Network namespaces: an owning RAII [`NetNs`] and a cheap [`NsHandle`].

use std::ffi::OsStr;
use std::fs::File;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::counters::{Counters, LinkStats};
use crate::sys;
use crate::{ChildGuard, MEMCACHED_BIN, Memcached};

const NETNS_DIR: &str = "/run/netns";

/// A non-owning reference to a named network namespace.
///
/// Cloneable and `Send`, so it can be handed to threads; it does not keep the
/// namespace alive, the owning [`NetNs`] does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsHandle {
    name: String,
    path: PathBuf,
}

impl NsHandle {
    /// The namespace name as listed by `ip netns list`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, `/run/netns/<name>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A `Command` running `program` inside the namespace.
    ///
    /// Uses `nsenter --net=` rather than `ip netns exec`: the latter remounts
    /// /sys in a private mount namespace, which hides bpffs pins from the child.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program args…` inside the namespace and returns its output, whatever its status.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in netns {}", self.name))
    }

    /// Like [`exec`](Self::exec) but fails on a non-zero exit; returns stdout.
    pub fn exec_ok<I, S>(&self, program: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<S> = args.into_iter().collect();
        let shown: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        let out = self.exec(program, args)?;
        if !out.status.success() {
            bail!(
                "`{program} {}` in netns {} failed ({}): {}",
                shown.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a [`Memcached`] listening on `addr` inside the namespace;
    /// returns once it accepts connections made from inside it.
    pub fn start_memcached(&self, addr: SocketAddr) -> Result<Memcached> {
        Memcached::start_with(&mut self.command(MEMCACHED_BIN), addr, |addr| {
            crate::net::connect_in(self, addr, Duration::from_millis(200)).is_ok()
        })
    }

    /// Spawns `program args…` inside the namespace, killed when the guard drops.
    ///
    /// stdin is null; stdout/stderr are inherited. Use [`command`](Self::command)
    /// with [`ChildGuard::spawn`] for other settings.
    pub fn spawn<I, S>(&self, program: &str, args: I) -> Result<ChildGuard>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args).stdin(Stdio::null());
        ChildGuard::spawn(&mut cmd)
    }

    /// Sets a sysctl of this namespace (`net.ipv4.tcp_syncookies` or `net/ipv4/…` form).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key);
        let value = value.to_owned();
        // /proc/sys/net resolves against the writing thread's namespace, so a
        // setns'd thread is enough; no process has to be spawned.
        self.run_in(move || {
            std::fs::write(&path, value.as_bytes())
                .with_context(|| format!("writing {}", path.display()))
        })?
        .with_context(|| format!("sysctl {key} in netns {}", self.name))
    }

    /// Reads a sysctl of this namespace, trimmed.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        let v = self.run_in(move || std::fs::read_to_string(&path))??;
        Ok(v.trim().to_owned())
    }

    /// Runs `f` on a fresh thread that has entered this namespace and returns its result.
    ///
    /// Sockets created by `f` belong to the namespace and stay there when used
    /// from other threads afterwards. A panic in `f` is propagated.
    pub fn run_in<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let file = self.open()?;
        std::thread::scope(|s| {
            let h = std::thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(s, move || -> Result<T> {
                    sys::enter_netns_fd(&file).context("setns")?;
                    Ok(f())
                })
                .context("spawning netns thread")?;
            match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Spawns a detached-style thread inside this namespace; join it to get `f`'s result.
    pub fn spawn_thread<F, T>(&self, f: F) -> Result<JoinHandle<Result<T>>>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let file = self.open()?;
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                sys::enter_netns_fd(&file).context("setns")?;
                drop(file);
                f()
            })
            .context("spawning netns thread")
    }

    /// Kernel SNMP counters of this namespace (see [`Counters::read`]).
    pub fn counters(&self) -> Result<Counters> {
        Counters::read(self)
    }

    /// Counters as reported by `nstat -asz` run inside the namespace.
    pub fn nstat(&self) -> Result<Counters> {
        Counters::nstat(self)
    }

    /// Packet/byte counters of one interface of this namespace.
    pub fn link_stats(&self, ifname: &str) -> Result<LinkStats> {
        LinkStats::read(self, ifname)
    }

    /// Flushes the TCP metrics cache (`ip tcp_metrics flush all`).
    pub fn flush_tcp_metrics(&self) -> Result<()> {
        let out = self.exec("ip", ["tcp_metrics", "flush", "all"])?;
        // An empty cache makes some iproute2 versions exit non-zero.
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !err.is_empty() && !err.contains("No such") {
            bail!("ip tcp_metrics flush all in {}: {}", self.name, err.trim());
        }
        Ok(())
    }

    fn open(&self) -> Result<File> {
        File::open(&self.path).with_context(|| format!("opening netns {}", self.path.display()))
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    let rel = if key.contains('/') {
        key.to_owned()
    } else {
        key.replace('.', "/")
    };
    Path::new("/proc/sys").join(rel)
}

/// An owned network namespace `/run/netns/<name>`, deleted on drop.
///
/// Dereferences to [`NsHandle`] for running commands and code inside it.
#[derive(Debug)]
pub struct NetNs {
    handle: NsHandle,
}

impl NetNs {
    /// Creates a namespace named `gt-<tag>-<pid>-<n>` and brings its loopback up.
    pub fn new(tag: &str) -> Result<Self> {
        let name = crate::unique_name(tag);
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .stdin(Stdio::null())
            .output()
            .context("running `ip netns add`")?;
        if !out.status.success() {
            bail!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // Constructed before the remaining setup so that a failure below still
        // deletes the namespace.
        let ns = NetNs {
            handle: NsHandle {
                path: Path::new(NETNS_DIR).join(&name),
                name,
            },
        };
        ns.exec_ok("ip", ["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A non-owning handle, e.g. to move into a thread.
    pub fn handle(&self) -> NsHandle {
        self.handle.clone()
    }
}

impl Deref for NetNs {
    type Target = NsHandle;
    fn deref(&self) -> &NsHandle {
        &self.handle
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let res = Command::new("ip")
            .args(["netns", "delete", &self.handle.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output();
        match res {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "harness: ip netns delete {}: {}",
                self.handle.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("harness: ip netns delete {}: {e}", self.handle.name),
        }
    }
}

/// Names of all namespaces in `/run/netns` (for leak checks).
pub fn list_netns() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
