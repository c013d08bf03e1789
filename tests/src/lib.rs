//! Privileged end-to-end test harness for guard.
//!
//! Everything here needs root: it creates network namespaces, veth pairs and
//! raw sockets. All traffic stays inside namespaces the harness creates (or on
//! loopback), every resource is removed on `Drop` (including during a panic's
//! unwinding), and every load loop is bounded both in count and in time.
//!
//! Tests using it must run one at a time (`--test-threads=1`): floods and
//! kernel counters are only meaningful when nothing else runs beside them.
//!
//! Drop order matters: declare guards of processes (`ChildGuard`, `Memcached`)
//! *after* the `Topology`/`NetNs` they run in, so they are dropped first.

pub mod burst;
pub mod counters;
pub mod daemon;
pub mod demo;
pub mod flood;
pub mod frames;
pub mod loadgen;
pub mod net;
pub mod netns;
pub mod procstat;
pub mod report;
mod sys;
pub mod topology;
pub mod veth;
pub mod xdp;

use std::sync::atomic::{AtomicU32, Ordering};

pub use burst::{Burst, BurstConfig, burst, close_with_reset};
pub use counters::{AcceptCounter, Counters, FrameCounter, FrameCounterStats, LinkStats};
pub use flood::{FloodStats, SourceAddr, SynFlood, SynFloodConfig, send_frames};
pub use net::{connect_from, connect_in, listen_in};
pub use netns::{NetNs, NsHandle};
// Processes and ports come from the crate `guard`'s own tests share too.
pub use guard_test_support::{
    ChildGuard, DelayRelay, MEMCACHED_BIN, Memcached, accepts, free_port,
};
pub use topology::{Topology, TopologyOptions};
pub use veth::{EndAddrs, VethEnd, VethPair};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next_counter() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Panics with an explanation unless the process runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "guard end-to-end tests need root (euid 0, got {euid}): they create network \
         namespaces, veth pairs, raw AF_PACKET sockets and attach XDP programs; \
         run them as root, one at a time (`cargo test -- --test-threads=1`)"
    );
}

/// A process-unique name `gt-<tag>-<pid>-<n>` for namespaces and other objects.
///
/// The pid keeps concurrent test processes apart; the counter keeps objects of
/// one process apart. The `gt-` prefix makes leftovers recognisable.
pub fn unique_name(tag: &str) -> String {
    format!("gt-{tag}-{}-{}", std::process::id(), next_counter())
}

/// A directory under the system temp dir, removed on drop (panics
/// included).
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// Creates `<tmp>/<unique name for tag>`.
    pub fn new(tag: &str) -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    /// `name` inside the directory.
    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process-unique interface name `<tag><pid>_<n>` of at most [`IFNAME_MAX`] chars.
///
/// The tag is shortened as needed; the pid and counter never are, since they
/// are what makes the name unique.
pub fn unique_ifname(tag: &str) -> String {
    ifname_with_reserve(tag, 0)
}

/// Like [`unique_ifname`] but leaves `reserve` characters free for a suffix.
pub(crate) fn ifname_with_reserve(tag: &str, reserve: usize) -> String {
    let unique = format!("{}_{}", std::process::id(), next_counter());
    let room = IFNAME_MAX
        .checked_sub(unique.len() + reserve)
        .unwrap_or_else(|| panic!("interface name {unique:?} leaves no room for a tag"));
    let tag: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(room)
        .collect();
    format!("{tag}{unique}")
}

/// The machine benchmarks ran on: CPU model, vCPUs and kernel, one line.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cpus} vCPUs, Linux {}", kernel.trim())
}
