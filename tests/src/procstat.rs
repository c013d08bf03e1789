//! What `/proc/PID` says about a process the tests started: CPU time and
//! resident memory.

use std::time::Duration;

/// User and system CPU time `pid` has used, all threads.
pub fn cpu_split(pid: u32) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name (which may hold spaces);
    // utime and stime are the 14th and 15th fields of the line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let at = |i: usize| Duration::from_nanos(f.get(i).copied().unwrap_or(0) * 1_000_000_000 / hz);
    (at(11), at(12))
}

/// User plus system CPU time `pid` has used, all threads.
pub fn cpu_time(pid: u32) -> Duration {
    let (user, sys) = cpu_split(pid);
    user + sys
}

/// Resident memory of `pid` in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
