//! Server-side observation: kernel SNMP counters, interface statistics, an
//! accepting listener that counts connections and a frame sniffer.

use std::collections::BTreeMap;
use std::io;
use std::mem;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::NsHandle;
use crate::sys;

/// Upper bound on the lifetime of any observer thread, so a forgotten stop
/// cannot leave one running.
pub const OBSERVER_MAX_LIFETIME: Duration = Duration::from_secs(600);

/// A snapshot of kernel SNMP counters keyed like `nstat` does:
/// `TcpOutSegs`, `TcpPassiveOpens`, `TcpExtSyncookiesSent`,
/// `TcpExtListenDrops`, `TcpExtListenOverflows`, `IpInReceives`,
/// `Ip6InReceives`, `TcpInCsumErrors`, …
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub BTreeMap<String, u64>);

impl Counters {
    /// Reads /proc/net/{snmp,netstat,snmp6} of the namespace.
    ///
    /// The files are read through `/proc/thread-self/net` from a thread inside
    /// the namespace: `/proc/self/net` would show the namespace of the
    /// process's main thread instead.
    pub fn read(ns: &NsHandle) -> Result<Self> {
        ns.run_in(|| -> Result<Self> {
            let mut c = Counters::default();
            for f in ["snmp", "netstat"] {
                let p = format!("/proc/thread-self/net/{f}");
                c.parse_proc_pairs(&std::fs::read_to_string(&p).with_context(|| p.clone())?);
            }
            // Absent when IPv6 is disabled.
            if let Ok(s) = std::fs::read_to_string("/proc/thread-self/net/snmp6") {
                c.parse_flat(&s);
            }
            Ok(c)
        })?
    }

    /// Runs `nstat -asz` in the namespace (`-s` keeps nstat's history file untouched).
    pub fn nstat(ns: &NsHandle) -> Result<Self> {
        let out = ns.exec_ok("nstat", ["-asz"])?;
        let mut c = Counters::default();
        c.parse_flat(&out);
        Ok(c)
    }

    /// The counter; panics when absent, since a misspelt or missing
    /// counter read as 0 would pass every "nothing of this happened" check.
    pub fn get(&self, key: &str) -> u64 {
        self.try_get(key)
            .unwrap_or_else(|| panic!("no counter {key:?} among {} read", self.0.len()))
    }

    /// The counter, `None` when absent.
    pub fn try_get(&self, key: &str) -> Option<u64> {
        self.0.get(key).copied()
    }

    /// `self - earlier` per counter (saturating).
    pub fn delta(&self, earlier: &Counters) -> Counters {
        Counters(
            self.0
                .iter()
                // snmp6 lists a per-type ICMPv6 counter only once one
                // such message was seen: absent earlier means 0 then.
                .map(|(k, v)| (k.clone(), v.saturating_sub(earlier.try_get(k).unwrap_or(0))))
                .collect(),
        )
    }

    /// Non-zero counters only, for readable diagnostics.
    pub fn nonzero(&self) -> BTreeMap<&str, u64> {
        self.0
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| (k.as_str(), *v))
            .collect()
    }

    /// Parses `/proc/net/snmp`-style header/value line pairs (`Tcp: A B` / `Tcp: 1 2`).
    pub fn parse_proc_pairs(&mut self, text: &str) {
        let mut lines = text.lines();
        while let (Some(h), Some(v)) = (lines.next(), lines.next()) {
            let (Some((hp, hs)), Some((_, vs))) = (h.split_once(':'), v.split_once(':')) else {
                continue;
            };
            for (k, val) in hs.split_whitespace().zip(vs.split_whitespace()) {
                // Negative values (Tcp MaxConn = -1) are not counters.
                if let Ok(n) = val.parse::<u64>() {
                    self.0.insert(format!("{hp}{k}"), n);
                }
            }
        }
    }

    /// Parses `name value …` lines (snmp6, nstat output).
    pub fn parse_flat(&mut self, text: &str) {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut w = line.split_whitespace();
            if let (Some(k), Some(Ok(v))) = (w.next(), w.next().map(str::parse::<u64>)) {
                self.0.insert(k.to_owned(), v);
            }
        }
    }
}

/// Per-interface counters from /proc/net/dev (what `ip -s link` shows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Received bytes.
    pub rx_bytes: u64,
    /// Received packets.
    pub rx_packets: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Received packets dropped.
    pub rx_dropped: u64,
    /// Transmitted bytes.
    pub tx_bytes: u64,
    /// Transmitted packets.
    pub tx_packets: u64,
    /// Transmit errors.
    pub tx_errors: u64,
    /// Transmit drops.
    pub tx_dropped: u64,
}

impl LinkStats {
    /// Reads the counters of `ifname` inside `ns`.
    pub fn read(ns: &NsHandle, ifname: &str) -> Result<Self> {
        let text = ns.run_in(|| std::fs::read_to_string("/proc/thread-self/net/dev"))??;
        for line in text.lines() {
            let Some((name, rest)) = line.split_once(':') else {
                continue;
            };
            if name.trim() != ifname {
                continue;
            }
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if v.len() < 16 {
                bail!("short /proc/net/dev line {line:?}");
            }
            return Ok(LinkStats {
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errors: v[2],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errors: v[10],
                tx_dropped: v[11],
            });
        }
        bail!("no interface {ifname} in netns {}", ns.name())
    }
}

/// A listener inside a namespace whose thread accepts, counts and
/// immediately closes connections. Dropping it stops and joins the thread.
pub struct AcceptCounter {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl AcceptCounter {
    /// Listens on `addr` (port 0 picks one) with the given backlog.
    pub fn start(ns: &NsHandle, addr: SocketAddr, backlog: i32) -> Result<Self> {
        let listener = crate::net::listen_in(ns, addr, backlog)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (acc, st) = (accepted.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("accept-counter".into())
            .spawn(move || accept_loop(&listener, &acc, &st))?;
        Ok(AcceptCounter {
            addr,
            accepted,
            stop,
            handle: Some(handle),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn count(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Stops accepting (the listener closes) and returns the final count.
    pub fn stop(mut self) -> Result<u64> {
        self.stop_inner()?;
        Ok(self.count())
    }

    fn stop_inner(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(p)) => std::panic::resume_unwind(p),
            None => Ok(()),
        }
    }
}

impl Drop for AcceptCounter {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("harness: accept counter: {e:#}");
        }
    }
}

fn accept_loop(l: &TcpListener, accepted: &AtomicU64, stop: &AtomicBool) -> Result<()> {
    let fd = l.as_raw_fd();
    let deadline = Instant::now() + OBSERVER_MAX_LIFETIME;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match l.accept() {
            Ok((s, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                drop(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; the listener outlives the call.
                unsafe { libc::poll(&mut p, 1, 20) };
            }
            // Aborted handshakes and fd pressure are transient under load.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNABORTED | libc::EMFILE | libc::ENFILE | libc::EINTR)
                ) =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
    Ok(())
}

/// Result of a [`FrameCounter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameCounterStats {
    /// Incoming frames that matched the filter.
    pub matched: u64,
    /// Frames the kernel dropped because the socket buffer was full
    /// (they were neither matched nor rejected).
    pub kernel_drops: u64,
}

/// Counts incoming frames on one interface matching a predicate, with an
/// AF_PACKET socket (no tcpdump). On the client veth with
/// [`frames::is_syn_ack`](crate::frames::is_syn_ack) it counts the SYN-ACKs
/// the server actually put on the wire.
pub struct FrameCounter {
    matched: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<u64>>>,
}

impl FrameCounter {
    /// Starts counting; frames arriving after this returns are seen.
    pub fn start<F>(ns: &NsHandle, ifname: &str, filter: F) -> Result<Self>
    where
        F: Fn(&[u8]) -> bool + Send + 'static,
    {
        let ifname = ifname.to_owned();
        let fd = ns.run_in(move || open_sniffer(&ifname))??;
        let matched = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, st) = (matched.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("frame-counter".into())
            .spawn(move || sniff_loop(&fd, &filter, &m, &st))?;
        Ok(FrameCounter {
            matched,
            stop,
            handle: Some(handle),
        })
    }

    /// Counts incoming TCP SYN-ACKs on `ifname`.
    pub fn syn_acks(ns: &NsHandle, ifname: &str) -> Result<Self> {
        Self::start(ns, ifname, crate::frames::is_syn_ack)
    }

    /// Matches so far.
    pub fn count(&self) -> u64 {
        self.matched.load(Ordering::Relaxed)
    }

    /// Waits until `count() >= n` or `timeout` passes; returns the count.
    pub fn wait_for(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        while self.count() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.count()
    }

    /// Stops and returns the totals.
    pub fn stop(mut self) -> Result<FrameCounterStats> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<FrameCounterStats> {
        self.stop.store(true, Ordering::Relaxed);
        let kernel_drops = match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r?,
            Some(Err(p)) => std::panic::resume_unwind(p),
            None => 0,
        };
        Ok(FrameCounterStats {
            matched: self.count(),
            kernel_drops,
        })
    }
}

impl Drop for FrameCounter {
    fn drop(&mut self) {
        if self.handle.is_some()
            && let Err(e) = self.stop_inner()
        {
            eprintln!("harness: frame counter: {e:#}");
        }
    }
}

fn open_sniffer(ifname: &str) -> Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    let fd = sys::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto))
        .context("AF_PACKET socket")?;
    let rcvbuf: libc::c_int = 32 << 20;
    let _ = sys::setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &rcvbuf);
    sys::set_timeout(&fd, libc::SO_RCVTIMEO, Duration::from_millis(20))?;
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex =
        sys::if_nametoindex(ifname).with_context(|| format!("no interface {ifname}"))? as i32;
    // SAFETY: sll is a valid sockaddr_ll of the given size.
    sys::cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })
    .context("binding AF_PACKET socket")?;
    // Frames queued between socket() and bind() may come from any interface.
    let mut buf = [0u8; 64];
    // SAFETY: buf is writable for its length.
    while unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    } >= 0
    {}
    let _ = sys::getsockopt(
        &fd,
        libc::SOL_PACKET,
        libc::PACKET_STATISTICS,
        libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        },
    );
    Ok(fd)
}

fn sniff_loop(
    fd: &OwnedFd,
    filter: &dyn Fn(&[u8]) -> bool,
    matched: &AtomicU64,
    stop: &AtomicBool,
) -> Result<u64> {
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + OBSERVER_MAX_LIFETIME;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buf and sll are writable for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut sll as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => continue,
                _ => return Err(e).context("recvfrom on AF_PACKET socket"),
            }
        }
        if sll.sll_pkttype != libc::PACKET_OUTGOING && filter(&buf[..n as usize]) {
            matched.fetch_add(1, Ordering::Relaxed);
        }
    }
    let st = sys::getsockopt(
        fd,
        libc::SOL_PACKET,
        libc::PACKET_STATISTICS,
        libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        },
    )?;
    Ok(u64::from(st.tp_drops))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "no counter \"TcpPasiveOpens\"")]
    fn an_absent_counter_is_not_zero() {
        let mut c = Counters::default();
        c.parse_proc_pairs("Tcp: PassiveOpens\nTcp: 0\n");
        assert_eq!(c.get("TcpPassiveOpens"), 0);
        // Misspelt: would read as "no passive opens" if absent were 0.
        c.get("TcpPasiveOpens");
    }
}
