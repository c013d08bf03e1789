//! veth pairs spanning two namespaces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::{NetNs, NsHandle};

/// The addresses given to one end of a pair: an IPv4 /24 and an IPv6 /64.
#[derive(Clone, Copy, Debug)]
pub struct EndAddrs {
    /// Configured as `<v4>/24`.
    pub v4: Ipv4Addr,
    /// Configured as `<v6>/64 nodad`.
    pub v6: Ipv6Addr,
}

/// One end of a [`VethPair`].
#[derive(Clone, Debug)]
pub struct VethEnd {
    /// Interface name (≤ 15 chars, contains the pid).
    pub ifname: String,
    /// Interface index inside its namespace.
    pub ifindex: u32,
    /// Hardware address.
    pub mac: [u8; 6],
    /// Primary IPv4 address (/24).
    pub v4: Ipv4Addr,
    /// Primary IPv6 address (/64).
    pub v6: Ipv6Addr,
    /// The namespace the end lives in.
    pub ns: NsHandle,
}

impl VethEnd {
    /// Adds an address: IPv4 as /24, IPv6 as /64 with `nodad` so it is usable at once.
    pub fn add_addr(&self, addr: IpAddr) -> Result<()> {
        match addr {
            IpAddr::V4(_) => self.add_addr_prefix(addr, 24),
            IpAddr::V6(_) => self.add_addr_prefix(addr, 64),
        }
    }

    /// Adds an address with an explicit prefix length.
    pub fn add_addr_prefix(&self, addr: IpAddr, prefix: u8) -> Result<()> {
        let cidr = format!("{addr}/{prefix}");
        match addr {
            IpAddr::V4(_) => self
                .ns
                .exec_ok("ip", ["addr", "add", &cidr, "dev", &self.ifname])?,
            IpAddr::V6(_) => self.ns.exec_ok(
                "ip",
                ["-6", "addr", "add", &cidr, "dev", &self.ifname, "nodad"],
            )?,
        };
        Ok(())
    }

    /// Toggles an offload with `ethtool -K` (e.g. `"gro"`). GRO on a veth
    /// switches its receive side to the NAPI path that XDP also uses.
    pub fn set_offload(&self, feature: &str, on: bool) -> Result<()> {
        self.ns.exec_ok(
            "ethtool",
            ["-K", &self.ifname, feature, if on { "on" } else { "off" }],
        )?;
        Ok(())
    }

    /// The MAC as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }

    fn is_up(&self) -> Result<bool> {
        let out = self
            .ns
            .exec_ok("ip", ["-o", "link", "show", "dev", &self.ifname])?;
        Ok(out.contains("LOWER_UP") && out.contains("state UP"))
    }
}

/// A veth pair with end `a` in one namespace and end `b` in another, both up.
///
/// Drop deletes the pair (deleting one end removes both).
#[derive(Debug)]
pub struct VethPair {
    /// The end in the first namespace.
    pub a: VethEnd,
    /// The end in the second namespace.
    pub b: VethEnd,
}

impl VethPair {
    /// Creates the pair directly inside the two namespaces (it never appears
    /// in the root namespace), addresses both ends and waits for carrier.
    pub fn new(a_ns: &NetNs, a: EndAddrs, b_ns: &NetNs, b: EndAddrs) -> Result<Self> {
        let base = crate::ifname_with_reserve("v", 1);
        let (a_name, b_name) = (format!("{base}a"), format!("{base}b"));
        let out = Command::new("ip")
            .args([
                "link",
                "add",
                &a_name,
                "netns",
                a_ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &b_name,
            ])
            .args(["netns", b_ns.name()])
            .stdin(Stdio::null())
            .output()
            .context("running `ip link add … type veth`")?;
        if !out.status.success() {
            bail!(
                "creating veth {a_name}/{b_name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // From here on the pair is owned by a guard so errors still clean up.
        let mut pair = VethPair {
            a: placeholder(a_name, a, a_ns),
            b: placeholder(b_name, b, b_ns),
        };
        for end in [&mut pair.a, &mut pair.b] {
            let (ifindex, mac) = link_info(&end.ns, &end.ifname)?;
            end.ifindex = ifindex;
            end.mac = mac;
            end.add_addr(IpAddr::V4(end.v4))?;
            end.add_addr(IpAddr::V6(end.v6))?;
            end.ns
                .exec_ok("ip", ["link", "set", "dev", &end.ifname, "up"])?;
        }
        pair.wait_up(Duration::from_secs(5))?;
        Ok(pair)
    }

    /// Waits until both ends report carrier; frames sent earlier are dropped.
    pub fn wait_up(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.a.is_up()? && self.b.is_up()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "veth {}/{} not up after {timeout:?}",
                    self.a.ifname,
                    self.b.ifname
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // If a namespace is already gone, so is the pair; anything else is reported.
        for end in [&self.a, &self.b] {
            if !end.ns.path().exists() {
                continue;
            }
            match end.ns.exec("ip", ["link", "del", "dev", &end.ifname]) {
                Ok(o) if o.status.success() => return,
                Ok(o) => {
                    let err = String::from_utf8_lossy(&o.stderr);
                    if !err.contains("Cannot find device") && !err.contains("does not exist") {
                        eprintln!("harness: deleting veth {}: {}", end.ifname, err.trim());
                    }
                }
                Err(e) => eprintln!("harness: deleting veth {}: {e:#}", end.ifname),
            }
        }
    }
}

fn placeholder(ifname: String, addrs: EndAddrs, ns: &NetNs) -> VethEnd {
    VethEnd {
        ifname,
        ifindex: 0,
        mac: [0; 6],
        v4: addrs.v4,
        v6: addrs.v6,
        ns: ns.handle(),
    }
}

/// Reads ifindex and MAC of `ifname` inside `ns` from `ip -o link show`.
pub fn link_info(ns: &NsHandle, ifname: &str) -> Result<(u32, [u8; 6])> {
    let out = ns.exec_ok("ip", ["-o", "link", "show", "dev", ifname])?;
    let ifindex = out
        .split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("no ifindex in {out:?}"))?;
    let mac = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .and_then(parse_mac)
        .with_context(|| format!("no MAC in {out:?}"))?;
    Ok((ifindex, mac))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
