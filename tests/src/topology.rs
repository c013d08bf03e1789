//! The standard two-namespace test topology.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Result;

use crate::flood::{SourceAddr, SynFloodConfig};
use crate::netns::NetNs;
use crate::veth::{EndAddrs, VethEnd, VethPair};

/// Knobs for [`Topology::with_options`].
#[derive(Clone, Debug)]
pub struct TopologyOptions {
    /// Server `net.ipv4.tcp_syncookies` (0 off, 1 on overflow, 2 always).
    pub syncookies: u8,
    /// Server `net.core.somaxconn`.
    pub somaxconn: u32,
    /// Server `net.ipv4.tcp_max_syn_backlog`.
    pub max_syn_backlog: u32,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        TopologyOptions {
            syncookies: 1,
            somaxconn: 65535,
            max_syn_backlog: 65535,
        }
    }
}

/// A "server" and a "client" namespace joined by one veth pair.
///
/// Addresses (X = pid % 250, P = pid as two 16-bit groups):
/// server 10.77.X.1 / fd77:P::1, client 10.77.X.2 / fd77:P::2 and a second
/// client address 10.77.X.3 / fd77:P::3. The server routes everything else
/// via the client, so SYN-ACKs to spoofed off-link sources (see
/// [`random_source_v4`](Self::random_source_v4)) leave through the veth
/// instead of waiting on ARP/ND.
#[derive(Debug)]
pub struct Topology {
    // Field order is drop order: the pair goes before its namespaces.
    /// The pair; `veth.a` is the server end, `veth.b` the client end.
    pub veth: VethPair,
    /// The server namespace.
    pub server: NetNs,
    /// The client namespace.
    pub client: NetNs,
    /// Second client IPv4 address (.3).
    pub client2_v4: Ipv4Addr,
    /// Second client IPv6 address (::3).
    pub client2_v6: Ipv6Addr,
}

impl Topology {
    /// Builds the topology with default options (syncookies = 1).
    pub fn new() -> Result<Self> {
        Self::with_options(TopologyOptions::default())
    }

    /// Builds the topology with the given server options.
    pub fn with_options(opts: TopologyOptions) -> Result<Self> {
        let server = NetNs::new("srv")?;
        let client = NetNs::new("cli")?;
        let pid = std::process::id();
        let x = (pid % 250) as u8;
        let v4 = |h: u8| Ipv4Addr::new(10, 77, x, h);
        let v6 = |h: u16| Ipv6Addr::new(0xfd77, (pid >> 16) as u16, pid as u16, 0, 0, 0, 0, h);
        let veth = VethPair::new(
            &server,
            EndAddrs {
                v4: v4(1),
                v6: v6(1),
            },
            &client,
            EndAddrs {
                v4: v4(2),
                v6: v6(2),
            },
        )?;
        let topo = Topology {
            veth,
            server,
            client,
            client2_v4: v4(3),
            client2_v6: v6(3),
        };

        let c = topo.client_if();
        c.add_addr(IpAddr::V4(topo.client2_v4))?;
        c.add_addr(IpAddr::V6(topo.client2_v6))?;
        // Many short connections from one client must not run out of ports.
        topo.client
            .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        topo.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;

        let s = topo.server_if();
        // Cached RTT/cwnd from one test must not shape the next.
        topo.server.sysctl("net.ipv4.tcp_no_metrics_save", "1")?;
        topo.server.sysctl(
            "net.ipv4.tcp_max_syn_backlog",
            &opts.max_syn_backlog.to_string(),
        )?;
        topo.server
            .sysctl("net.core.somaxconn", &opts.somaxconn.to_string())?;
        topo.set_syncookies(opts.syncookies)?;
        let (gw4, gw6) = (c.v4.to_string(), c.v6.to_string());
        topo.server.exec_ok(
            "ip",
            ["route", "add", "default", "via", &gw4, "dev", &s.ifname],
        )?;
        topo.server.exec_ok(
            "ip",
            [
                "-6", "route", "add", "default", "via", &gw6, "dev", &s.ifname,
            ],
        )?;
        Ok(topo)
    }

    /// The server end of the pair.
    pub fn server_if(&self) -> &VethEnd {
        &self.veth.a
    }

    /// The client end of the pair.
    pub fn client_if(&self) -> &VethEnd {
        &self.veth.b
    }

    /// Server IPv4 address.
    pub fn server_v4(&self) -> Ipv4Addr {
        self.veth.a.v4
    }

    /// Server IPv6 address.
    pub fn server_v6(&self) -> Ipv6Addr {
        self.veth.a.v6
    }

    /// Primary client IPv4 address.
    pub fn client_v4(&self) -> Ipv4Addr {
        self.veth.b.v4
    }

    /// Primary client IPv6 address.
    pub fn client_v6(&self) -> Ipv6Addr {
        self.veth.b.v6
    }

    /// Sets the server's `net.ipv4.tcp_syncookies` (also governs IPv6).
    pub fn set_syncookies(&self, mode: u8) -> Result<()> {
        self.server
            .sysctl("net.ipv4.tcp_syncookies", &mode.to_string())
    }

    /// Flushes the server's TCP metrics cache.
    pub fn flush_tcp_metrics(&self) -> Result<()> {
        self.server.flush_tcp_metrics()
    }

    /// An off-link IPv4 /24 (10.78.X.0/24) to spoof random sources from.
    pub fn random_source_v4(&self) -> SourceAddr {
        let x = (std::process::id() % 250) as u8;
        SourceAddr::Random {
            base: IpAddr::V4(Ipv4Addr::new(10, 78, x, 0)),
            prefix_len: 24,
        }
    }

    /// The id of the XDP program on the server interface, as `ip` reports
    /// it; `None` when nothing is attached.
    pub fn server_xdp_prog_id(&self) -> Option<u32> {
        let out = self
            .server
            .exec("ip", ["-d", "link", "show", &self.server_if().ifname])
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (_, rest) = text.split_once("prog/xdp id ")?;
        rest.split_whitespace().next()?.parse().ok()
    }

    /// An off-link IPv4 /9 (10.128.0.0/9, eight million addresses) to spoof
    /// sources from: a flood from it is nearly all sources never seen
    /// before, the case per-source state pays most for.
    pub fn spoofed_sources_v4(&self) -> SourceAddr {
        SourceAddr::Random {
            base: IpAddr::V4(Ipv4Addr::new(10, 128, 0, 0)),
            prefix_len: 9,
        }
    }

    /// An off-link IPv6 /64 (fd77:P:1::/64) to spoof random sources from.
    pub fn random_source_v6(&self) -> SourceAddr {
        let s = self.server_v6().segments();
        SourceAddr::Random {
            base: IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], 1, 0, 0, 0, 0)),
            prefix_len: 64,
        }
    }

    /// A flood config from the client veth to `dst` on the server: `count`
    /// SYNs, at most 30 s, unpaced.
    pub fn syn_flood(&self, source: SourceAddr, dst: SocketAddr, count: u64) -> SynFloodConfig {
        let c = self.client_if();
        SynFloodConfig {
            count,
            max_duration: Duration::from_secs(30),
            ..SynFloodConfig::new(c.ifindex, c.mac, self.server_if().mac, source, dst)
        }
    }
}
