//! A raw SYN flood generator: crafted frames through an AF_PACKET socket on
//! the client veth, sent in `sendmmsg` batches, bounded by count and time.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::frames::{self, SynSpec};
use crate::netns::NsHandle;
use crate::sys;

/// Where the spoofed source addresses come from.
#[derive(Clone, Copy, Debug)]
pub enum SourceAddr {
    /// Always this address.
    Fixed(IpAddr),
    /// Uniformly random host bits under `base/prefix_len` (never all-zero or
    /// all-one host bits, which the kernel treats as martians).
    Random {
        /// The network.
        base: IpAddr,
        /// Prefix length.
        prefix_len: u8,
    },
}

impl SourceAddr {
    fn is_ipv4(&self) -> bool {
        match self {
            SourceAddr::Fixed(a) | SourceAddr::Random { base: a, .. } => a.is_ipv4(),
        }
    }
}

/// Parameters of a [`SynFlood`]. Both `count` and `max_duration` bound it.
#[derive(Clone, Debug)]
pub struct SynFloodConfig {
    /// ifindex of the sending interface (in the flood's namespace).
    pub ifindex: u32,
    /// Source MAC put in the frames.
    pub src_mac: [u8; 6],
    /// Destination MAC (the receiving interface's).
    pub dst_mac: [u8; 6],
    /// Source addresses.
    pub source: SourceAddr,
    /// Fixed source port; random (1024..=65535) when `None`.
    pub src_port: Option<u16>,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// Frames to send at most.
    pub count: u64,
    /// Time to spend at most.
    pub max_duration: Duration,
    /// Target rate in frames per second; as fast as possible when `None`.
    pub rate_pps: Option<u64>,
    /// Frames per `sendmmsg` call.
    pub batch: usize,
    /// PRNG seed, for reproducible floods; time-based when `None`.
    pub seed: Option<u64>,
}

impl SynFloodConfig {
    /// 10,000 frames, at most 10 s, unpaced, batches of 64, random ports.
    pub fn new(
        ifindex: u32,
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        source: SourceAddr,
        dst: SocketAddr,
    ) -> Self {
        SynFloodConfig {
            ifindex,
            src_mac,
            dst_mac,
            source,
            src_port: None,
            dst,
            count: 10_000,
            max_duration: Duration::from_secs(10),
            rate_pps: None,
            batch: 64,
            seed: None,
        }
    }
}

/// What a finished flood did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodStats {
    /// Frames the kernel accepted for transmission.
    pub sent: u64,
    /// Wall time from first to last send.
    pub elapsed: Duration,
    /// Send attempts refused with ENOBUFS/EAGAIN (then retried).
    pub retries: u64,
    /// Whether `max_duration` ended the flood before `count` was reached.
    pub timed_out: bool,
}

impl FloodStats {
    /// Achieved rate in frames per second.
    pub fn pps(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A running flood on its own thread inside a namespace. Dropping it stops
/// and joins the thread.
pub struct SynFlood {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<FloodStats>>>,
}

impl SynFlood {
    /// Starts flooding from inside `ns`.
    pub fn start(ns: &NsHandle, cfg: SynFloodConfig) -> Result<Self> {
        validate(&cfg)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = ns.spawn_thread(move || run_flood(&cfg, &stop2))?;
        Ok(SynFlood {
            stop,
            handle: Some(handle),
        })
    }

    /// Floods from inside `ns` and waits for the result.
    pub fn run(ns: &NsHandle, cfg: SynFloodConfig) -> Result<FloodStats> {
        Self::start(ns, cfg)?.join()
    }

    /// Asks the flood to stop early.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether the flood thread has ended.
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the flood to end.
    pub fn join(mut self) -> Result<FloodStats> {
        let h = self.handle.take().context("flood already joined")?;
        match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for SynFlood {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.stop();
            let _ = h.join();
        }
    }
}

fn validate(cfg: &SynFloodConfig) -> Result<()> {
    if cfg.source.is_ipv4() != cfg.dst.is_ipv4() {
        bail!(
            "flood source {:?} and destination {} differ in family",
            cfg.source,
            cfg.dst
        );
    }
    if let SourceAddr::Random { prefix_len, base } = cfg.source {
        let max = if base.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            bail!("prefix length {prefix_len} too long for {base}");
        }
    }
    if cfg.batch == 0 || cfg.batch > 1024 {
        bail!("batch must be 1..=1024, got {}", cfg.batch);
    }
    if cfg.rate_pps == Some(0) {
        bail!("rate_pps must be positive");
    }
    Ok(())
}

/// xorshift64*: fast, dependency-free and good enough for spoofed headers.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: Option<u64>) -> Self {
        let s = seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        });
        Rng(s | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn random_source(src: &SourceAddr, rng: &mut Rng) -> IpAddr {
    match *src {
        SourceAddr::Fixed(a) => a,
        SourceAddr::Random {
            base: IpAddr::V4(b),
            prefix_len,
        } => {
            let host_mask = u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
            let net = u32::from(b) & !host_mask;
            for _ in 0..16 {
                let host = rng.next_u64() as u32 & host_mask;
                if host_mask < 3 || (host != 0 && host != host_mask) {
                    return IpAddr::V4(Ipv4Addr::from(net | host));
                }
            }
            IpAddr::V4(Ipv4Addr::from(net | 1))
        }
        SourceAddr::Random {
            base: IpAddr::V6(b),
            prefix_len,
        } => {
            let host_mask = u128::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
            let net = u128::from(b) & !host_mask;
            let r = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
            let host = match r & host_mask {
                0 if host_mask != 0 => 1,
                h => h,
            };
            IpAddr::V6(Ipv6Addr::from(net | host))
        }
    }
}

fn run_flood(cfg: &SynFloodConfig, stop: &AtomicBool) -> Result<FloodStats> {
    // Protocol 0: this socket only transmits, so the kernel never queues
    // received frames on it.
    let fd = sys::socket(libc::AF_PACKET, libc::SOCK_RAW, 0).context("AF_PACKET socket")?;
    let sndbuf: libc::c_int = 4 << 20;
    let _ = sys::setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &sndbuf);
    let ethertype = if cfg.dst.is_ipv4() {
        frames::ETHERTYPE_IPV4
    } else {
        frames::ETHERTYPE_IPV6
    };
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ethertype.to_be();
    sll.sll_ifindex = cfg.ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&cfg.dst_mac);

    let mut rng = Rng::new(cfg.seed);
    let template = frames::syn_frame(&SynSpec {
        dst_mac: cfg.dst_mac,
        src_mac: cfg.src_mac,
        src: random_source(&cfg.source, &mut rng),
        dst: cfg.dst.ip(),
        src_port: 1024,
        dst_port: cfg.dst.port(),
        seq: 0,
    });
    let batch = match cfg.rate_pps {
        // Keep bursts near a millisecond so pacing stays smooth.
        Some(r) => cfg.batch.min((r / 1000).max(1) as usize),
        None => cfg.batch,
    };
    let mut bufs: Vec<Vec<u8>> = vec![template; batch];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
    let mut msgs: Vec<libc::mmsghdr> = (0..batch).map(|_| unsafe { mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
        m.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }

    let start = Instant::now();
    let deadline = start + cfg.max_duration;
    let mut stats = FloodStats::default();
    'outer: while stats.sent < cfg.count {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if Instant::now() >= deadline {
            stats.timed_out = true;
            break;
        }
        if let Some(rate) = cfg.rate_pps {
            let due = start
                + Duration::from_nanos(
                    (stats.sent as u128 * 1_000_000_000 / u128::from(rate)) as u64,
                );
            let now = Instant::now();
            if due > now {
                std::thread::sleep((due - now).min(deadline.saturating_duration_since(now)));
                continue;
            }
        }
        let n = batch.min((cfg.count - stats.sent) as usize);
        for b in &mut bufs[..n] {
            let src = random_source(&cfg.source, &mut rng);
            let port = cfg
                .src_port
                .unwrap_or_else(|| 1024 + (rng.next_u64() % (65536 - 1024)) as u16);
            rewrite_syn(b, src, port, rng.next_u64());
        }
        let mut off = 0;
        while off < n {
            // SAFETY: msgs[off..n] are initialised headers whose pointers
            // (sll, iovs, bufs) outlive this call.
            let r = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    msgs[off..].as_mut_ptr(),
                    (n - off) as u32,
                    0,
                )
            };
            if r > 0 {
                off += r as usize;
                stats.sent += r as u64;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // The receiving veth's queue is full: back off briefly, resend.
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => {
                    stats.retries += 1;
                    if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                        stats.timed_out = !stop.load(Ordering::Relaxed);
                        break 'outer;
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                _ => return Err(e).context("sendmmsg on AF_PACKET socket"),
            }
        }
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}

/// Rewrites source address, source port, sequence number and timestamp of a
/// SYN frame built by [`frames::syn_frame`] and recomputes its checksums.
fn rewrite_syn(f: &mut [u8], src: IpAddr, port: u16, r: u64) {
    let (l4, dst) = match src {
        IpAddr::V4(s) => {
            f[26..30].copy_from_slice(&s.octets());
            f[24..26].fill(0);
            let c = frames::checksum(&f[14..34]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
            (
                34,
                IpAddr::V4(Ipv4Addr::from(
                    <[u8; 4]>::try_from(&f[30..34]).expect("4 bytes"),
                )),
            )
        }
        IpAddr::V6(s) => {
            f[22..38].copy_from_slice(&s.octets());
            (
                54,
                IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(&f[38..54]).expect("16 bytes"),
                )),
            )
        }
    };
    let seg = &mut f[l4..];
    seg[0..2].copy_from_slice(&port.to_be_bytes());
    seg[4..8].copy_from_slice(&(r as u32).to_be_bytes());
    // Timestamp value (options start at 20: MSS 4, SACK-perm 2, TS kind/len 2).
    seg[28..32].copy_from_slice(&((r >> 32) as u32).to_be_bytes());
    seg[16..18].fill(0);
    let c = frames::l4_checksum(src, dst, frames::proto::TCP, seg);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
}

/// Sends prebuilt Ethernet frames out of interface `ifindex` of `ns`, one
/// `sendto` each (ENOBUFS is retried for up to a second per frame). Returns
/// how many were sent. Useful for single crafted packets in XDP tests.
pub fn send_frames(ns: &NsHandle, ifindex: u32, frames: &[Vec<u8>]) -> Result<u64> {
    let frames = frames.to_vec();
    ns.run_in(move || -> Result<u64> {
        let fd = sys::socket(libc::AF_PACKET, libc::SOCK_RAW, 0).context("AF_PACKET socket")?;
        let mut sent = 0;
        for f in &frames {
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            if f.len() >= 14 {
                sll.sll_addr[..6].copy_from_slice(&f[..6]);
                sll.sll_protocol = u16::from_be_bytes([f[12], f[13]]).to_be();
            }
            let deadline = Instant::now() + Duration::from_secs(1);
            loop {
                // SAFETY: f and sll are valid for the lengths given.
                let r = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        f.as_ptr().cast(),
                        f.len(),
                        0,
                        (&sll as *const libc::sockaddr_ll).cast(),
                        mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                };
                if r >= 0 {
                    sent += 1;
                    break;
                }
                let e = io::Error::last_os_error();
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR)
                ) && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
                return Err(e).context("sendto on AF_PACKET socket");
            }
        }
        Ok(sent)
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewritten_frames_verify() {
        let mut rng = Rng::new(Some(7));
        for (src, dst) in [
            (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])),
            ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap()),
        ] {
            let mut f = frames::syn_frame(&SynSpec {
                dst_mac: [2; 6],
                src_mac: [4; 6],
                src,
                dst,
                src_port: 1,
                dst_port: 80,
                seq: 0,
            });
            let base = if src.is_ipv4() {
                "10.1.2.0/24"
            } else {
                "fd01::/64"
            };
            let (b, p) = base.split_once('/').unwrap();
            let source = SourceAddr::Random {
                base: b.parse().unwrap(),
                prefix_len: p.parse().unwrap(),
            };
            for _ in 0..100 {
                let s = random_source(&source, &mut rng);
                rewrite_syn(&mut f, s, 4242, rng.next_u64());
                let t = frames::parse_tcp(&f).unwrap();
                assert!(t.checksums_ok);
                assert_eq!((t.src, t.src_port, t.dst, t.dst_port), (s, 4242, dst, 80));
            }
        }
    }
}
