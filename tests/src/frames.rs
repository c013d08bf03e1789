//! Builders for crafted frames: Ethernet/802.1Q/QinQ, IPv4 (options,
//! fragments), IPv6 (extension headers, fragments), TCP, UDP; plus checksum
//! helpers and a minimal parser. Every builder returns plain bytes, and
//! fields that are normally computed (lengths, checksums) can be overridden
//! to craft malformed packets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// TPID of an 802.1Q (customer) VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// TPID of an 802.1ad (service, QinQ outer) VLAN tag.
pub const ETHERTYPE_QINQ: u16 = 0x88a8;

/// IP protocol numbers.
pub mod proto {
    /// IPv6 hop-by-hop options.
    pub const HOPOPTS: u8 = 0;
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6 routing header.
    pub const ROUTING: u8 = 43;
    /// IPv6 fragment header.
    pub const FRAGMENT: u8 = 44;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// IPv6 "no next header".
    pub const NONE: u8 = 59;
    /// IPv6 destination options.
    pub const DSTOPTS: u8 = 60;
}

/// TCP flag bits.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
    /// URG.
    pub const URG: u8 = 0x20;
    /// ECE.
    pub const ECE: u8 = 0x40;
    /// CWR.
    pub const CWR: u8 = 0x80;
}

// ---------------------------------------------------------------- checksums

/// Adds `data` to a running one's-complement sum. Only the last chunk of a
/// sum may have odd length (it is padded with a zero byte).
pub fn checksum_add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

/// Folds a running sum into the final (complemented) 16-bit checksum.
pub fn checksum_fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    checksum_fold(checksum_add(0, data))
}

/// Running sum of the IPv4 or IPv6 pseudo-header for an upper-layer segment.
///
/// Panics if `src` and `dst` are of different families.
pub fn pseudo_header_sum(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> u64 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut sum = checksum_add(0, &s.octets());
            sum = checksum_add(sum, &d.octets());
            sum + u64::from(protocol) + len as u64
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut sum = checksum_add(0, &s.octets());
            sum = checksum_add(sum, &d.octets());
            sum = checksum_add(sum, &(len as u32).to_be_bytes());
            sum + u64::from(protocol)
        }
        _ => panic!("pseudo header with mixed address families: {src} / {dst}"),
    }
}

/// TCP/UDP checksum of `segment` (its checksum field must be zero or the
/// value to verify: a correct segment then yields 0).
pub fn l4_checksum(src: IpAddr, dst: IpAddr, protocol: u8, segment: &[u8]) -> u16 {
    checksum_fold(checksum_add(
        pseudo_header_sum(src, dst, protocol, segment.len()),
        segment,
    ))
}

// ---------------------------------------------------------------- Ethernet

/// One VLAN tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vlan {
    /// Tag protocol identifier (0x8100 or 0x88a8).
    pub tpid: u16,
    /// Priority code point (3 bits).
    pub pcp: u8,
    /// Drop eligible indicator.
    pub dei: bool,
    /// VLAN id (12 bits).
    pub vid: u16,
}

impl Vlan {
    /// An 802.1Q tag.
    pub fn dot1q(vid: u16) -> Self {
        Vlan {
            tpid: ETHERTYPE_VLAN,
            pcp: 0,
            dei: false,
            vid,
        }
    }

    /// An 802.1ad (QinQ outer) tag.
    pub fn dot1ad(vid: u16) -> Self {
        Vlan {
            tpid: ETHERTYPE_QINQ,
            pcp: 0,
            dei: false,
            vid,
        }
    }

    fn tci(&self) -> u16 {
        (u16::from(self.pcp & 7) << 13) | (u16::from(self.dei) << 12) | (self.vid & 0x0fff)
    }
}

/// An Ethernet II header with optional VLAN tags (outermost first).
#[derive(Clone, Debug)]
pub struct Ethernet {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// Tags, outermost first: `[dot1ad(o), dot1q(i)]` is QinQ.
    pub vlans: Vec<Vlan>,
    /// EtherType of the payload.
    pub ethertype: u16,
}

impl Ethernet {
    /// An untagged header.
    pub fn new(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Self {
        Ethernet {
            dst,
            src,
            vlans: Vec::new(),
            ethertype,
        }
    }

    /// Appends a VLAN tag (inside the ones already present).
    pub fn vlan(mut self, tag: Vlan) -> Self {
        self.vlans.push(tag);
        self
    }

    /// Adds QinQ tags: 802.1ad `outer`, then 802.1Q `inner`.
    pub fn qinq(self, outer: u16, inner: u16) -> Self {
        self.vlan(Vlan::dot1ad(outer)).vlan(Vlan::dot1q(inner))
    }

    /// Header length in bytes.
    pub fn header_len(&self) -> usize {
        14 + 4 * self.vlans.len()
    }

    /// The frame: header followed by `payload` (no FCS, no padding).
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(self.header_len() + payload.len());
        f.extend_from_slice(&self.dst);
        f.extend_from_slice(&self.src);
        for v in &self.vlans {
            f.extend_from_slice(&v.tpid.to_be_bytes());
            f.extend_from_slice(&v.tci().to_be_bytes());
        }
        f.extend_from_slice(&self.ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
}

/// An untagged Ethernet frame around an IP packet; the EtherType follows
/// the packet's version nibble.
pub fn eth_frame(dst: [u8; 6], src: [u8; 6], ip_packet: &[u8]) -> Vec<u8> {
    let et = if ip_packet.first().map(|b| b >> 4) == Some(6) {
        ETHERTYPE_IPV6
    } else {
        ETHERTYPE_IPV4
    };
    Ethernet::new(dst, src, et).build(ip_packet)
}

// ---------------------------------------------------------------- IPv4

/// IPv4 option builders (raw bytes for [`Ipv4::options`]).
pub mod ipv4_opt {
    /// End of option list.
    pub fn eol() -> Vec<u8> {
        vec![0]
    }
    /// No-operation.
    pub fn nop() -> Vec<u8> {
        vec![1]
    }
    /// Router alert (RFC 2113).
    pub fn router_alert() -> Vec<u8> {
        vec![148, 4, 0, 0]
    }
    /// Record route with room for `slots` addresses.
    pub fn record_route(slots: u8) -> Vec<u8> {
        let mut o = vec![7, 3 + 4 * slots, 4];
        o.resize(3 + 4 * slots as usize, 0);
        o
    }
    /// Any option: `kind`, length byte, `data`.
    pub fn raw(kind: u8, data: &[u8]) -> Vec<u8> {
        let mut o = vec![kind, 2 + data.len() as u8];
        o.extend_from_slice(data);
        o
    }
}

/// An IPv4 header.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Payload protocol.
    pub protocol: u8,
    /// Time to live.
    pub ttl: u8,
    /// DSCP/ECN byte.
    pub tos: u8,
    /// Identification.
    pub id: u16,
    /// DF flag.
    pub dont_fragment: bool,
    /// MF flag.
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units.
    pub fragment_offset: u16,
    /// Raw options; padded with EOL to a multiple of 4.
    pub options: Vec<u8>,
    /// Overrides the IHL nibble (header words) for malformed headers.
    pub ihl: Option<u8>,
    /// Overrides the total length field.
    pub total_len: Option<u16>,
    /// Overrides the header checksum.
    pub checksum: Option<u16>,
}

impl Ipv4 {
    /// A header with TTL 64, DF set, no options.
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8) -> Self {
        Ipv4 {
            src,
            dst,
            protocol,
            ttl: 64,
            tos: 0,
            id: 0,
            dont_fragment: true,
            more_fragments: false,
            fragment_offset: 0,
            options: Vec::new(),
            ihl: None,
            total_len: None,
            checksum: None,
        }
    }

    /// The header alone, for a payload of `payload_len` bytes.
    pub fn header(&self, payload_len: usize) -> Vec<u8> {
        let mut opts = self.options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0);
        }
        let hlen = 20 + opts.len();
        let ihl = self.ihl.unwrap_or((hlen / 4) as u8);
        let total = self.total_len.unwrap_or((hlen + payload_len) as u16);
        let frag = (u16::from(self.dont_fragment) << 14)
            | (u16::from(self.more_fragments) << 13)
            | (self.fragment_offset & 0x1fff);
        let mut h = Vec::with_capacity(hlen);
        h.push(0x40 | (ihl & 0x0f));
        h.push(self.tos);
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        h.extend_from_slice(&frag.to_be_bytes());
        h.push(self.ttl);
        h.push(self.protocol);
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&opts);
        let csum = self.checksum.unwrap_or_else(|| checksum(&h));
        h[10..12].copy_from_slice(&csum.to_be_bytes());
        h
    }

    /// Header plus payload.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut p = self.header(payload.len());
        p.extend_from_slice(payload);
        p
    }

    /// Splits `payload` into fragments of `chunk` bytes (rounded down to a
    /// multiple of 8, at least 8), each a complete IPv4 packet. DF is cleared;
    /// `id` should be set by the caller.
    pub fn fragments(&self, payload: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let chunk = (chunk / 8 * 8).max(8);
        let n = payload.len().div_ceil(chunk).max(1);
        (0..n)
            .map(|i| {
                let part = &payload[i * chunk..((i + 1) * chunk).min(payload.len())];
                let mut h = self.clone();
                h.dont_fragment = false;
                h.fragment_offset = self.fragment_offset + (i * chunk / 8) as u16;
                h.more_fragments = i + 1 < n || self.more_fragments;
                h.build(part)
            })
            .collect()
    }
}

// ---------------------------------------------------------------- IPv6

/// An IPv6 extension header.
#[derive(Clone, Debug)]
pub enum Ipv6Ext {
    /// Hop-by-hop options: raw TLV options, padded with Pad1/PadN.
    HopByHop(Vec<u8>),
    /// Destination options: raw TLV options, padded with Pad1/PadN.
    DestOpts(Vec<u8>),
    /// Routing header: type, segments left and the type-specific data
    /// (zero-padded to a multiple of 8 bytes overall).
    Routing {
        /// Routing type (0, 2, 4 = SRH, …).
        routing_type: u8,
        /// Segments left.
        segments_left: u8,
        /// Type-specific data following the first 4 bytes.
        data: Vec<u8>,
    },
    /// Fragment header.
    Fragment {
        /// Offset in 8-byte units.
        offset: u16,
        /// M flag.
        more: bool,
        /// Identification.
        id: u32,
    },
    /// Any other header with the given protocol number; `body` follows the
    /// next-header byte as is (it must make the header a multiple of 8 and
    /// contain a correct length byte).
    Raw {
        /// Protocol number identifying this header.
        code: u8,
        /// Bytes after the next-header byte.
        body: Vec<u8>,
    },
}

impl Ipv6Ext {
    /// A type-0 style routing header listing `addrs` (4 reserved bytes, then the addresses).
    pub fn routing_addrs(routing_type: u8, segments_left: u8, addrs: &[Ipv6Addr]) -> Self {
        let mut data = vec![0; 4];
        for a in addrs {
            data.extend_from_slice(&a.octets());
        }
        Ipv6Ext::Routing {
            routing_type,
            segments_left,
            data,
        }
    }

    /// Protocol number identifying this header.
    pub fn code(&self) -> u8 {
        match self {
            Ipv6Ext::HopByHop(_) => proto::HOPOPTS,
            Ipv6Ext::DestOpts(_) => proto::DSTOPTS,
            Ipv6Ext::Routing { .. } => proto::ROUTING,
            Ipv6Ext::Fragment { .. } => proto::FRAGMENT,
            Ipv6Ext::Raw { code, .. } => *code,
        }
    }

    /// Serialises the header with the given next-header value.
    pub fn build(&self, next: u8) -> Vec<u8> {
        let mut h = vec![next];
        match self {
            Ipv6Ext::HopByHop(opts) | Ipv6Ext::DestOpts(opts) => {
                h.push(0);
                h.extend_from_slice(opts);
                pad_tlv(&mut h);
                h[1] = (h.len() / 8 - 1) as u8;
            }
            Ipv6Ext::Routing {
                routing_type,
                segments_left,
                data,
            } => {
                h.extend_from_slice(&[0, *routing_type, *segments_left]);
                h.extend_from_slice(data);
                h.resize(h.len().div_ceil(8).max(1) * 8, 0);
                h[1] = (h.len() / 8 - 1) as u8;
            }
            Ipv6Ext::Fragment { offset, more, id } => {
                h.push(0);
                h.extend_from_slice(&((offset << 3) | u16::from(*more)).to_be_bytes());
                h.extend_from_slice(&id.to_be_bytes());
            }
            Ipv6Ext::Raw { body, .. } => h.extend_from_slice(body),
        }
        h
    }
}

/// Pads an options header to a multiple of 8 with Pad1 or PadN.
fn pad_tlv(h: &mut Vec<u8>) {
    let pad = (8 - h.len() % 8) % 8;
    match pad {
        0 => {}
        1 => h.push(0),
        n => {
            h.push(1);
            h.push((n - 2) as u8);
            h.resize(h.len() + n - 2, 0);
        }
    }
}

/// IPv6 option builders (raw TLVs for hop-by-hop / destination options).
pub mod ipv6_opt {
    /// Router alert (RFC 2711) with value `v`.
    pub fn router_alert(v: u16) -> Vec<u8> {
        let b = v.to_be_bytes();
        vec![5, 2, b[0], b[1]]
    }
    /// A PadN option of `n` total bytes (n ≥ 2).
    pub fn padn(n: u8) -> Vec<u8> {
        let mut o = vec![1, n - 2];
        o.resize(n as usize, 0);
        o
    }
    /// Any option.
    pub fn raw(kind: u8, data: &[u8]) -> Vec<u8> {
        let mut o = vec![kind, data.len() as u8];
        o.extend_from_slice(data);
        o
    }
}

/// An IPv6 header with an extension header chain.
#[derive(Clone, Debug)]
pub struct Ipv6 {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// Upper-layer protocol after the last extension header.
    pub next_header: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub traffic_class: u8,
    /// Flow label (20 bits).
    pub flow_label: u32,
    /// Extension headers in order.
    pub ext: Vec<Ipv6Ext>,
    /// Overrides the payload length field.
    pub payload_len: Option<u16>,
}

impl Ipv6 {
    /// A header with hop limit 64 and no extension headers.
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8) -> Self {
        Ipv6 {
            src,
            dst,
            next_header,
            hop_limit: 64,
            traffic_class: 0,
            flow_label: 0,
            ext: Vec::new(),
            payload_len: None,
        }
    }

    /// Appends an extension header.
    pub fn with_ext(mut self, ext: Ipv6Ext) -> Self {
        self.ext.push(ext);
        self
    }

    /// Fixed header plus extension headers plus payload.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut exts = Vec::new();
        for (i, e) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(self.next_header, Ipv6Ext::code);
            exts.extend_from_slice(&e.build(next));
        }
        let first = self.ext.first().map_or(self.next_header, Ipv6Ext::code);
        let plen = self
            .payload_len
            .unwrap_or((exts.len() + payload.len()) as u16);
        let vtf =
            (6u32 << 28) | (u32::from(self.traffic_class) << 20) | (self.flow_label & 0xfffff);
        let mut p = Vec::with_capacity(40 + exts.len() + payload.len());
        p.extend_from_slice(&vtf.to_be_bytes());
        p.extend_from_slice(&plen.to_be_bytes());
        p.push(first);
        p.push(self.hop_limit);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&exts);
        p.extend_from_slice(payload);
        p
    }

    /// Splits `payload` into fragments of `chunk` bytes (multiple of 8):
    /// each packet carries `self.ext` (the unfragmentable part) followed by a
    /// fragment header with identification `id`.
    pub fn fragments(&self, payload: &[u8], chunk: usize, id: u32) -> Vec<Vec<u8>> {
        let chunk = (chunk / 8 * 8).max(8);
        let n = payload.len().div_ceil(chunk).max(1);
        (0..n)
            .map(|i| {
                let part = &payload[i * chunk..((i + 1) * chunk).min(payload.len())];
                let frag = Ipv6Ext::Fragment {
                    offset: (i * chunk / 8) as u16,
                    more: i + 1 < n,
                    id,
                };
                self.clone().with_ext(frag).build(part)
            })
            .collect()
    }
}

/// An IPv4 or IPv6 packet with default headers around `payload`.
///
/// Panics on mixed address families.
pub fn ip_packet(src: IpAddr, dst: IpAddr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ipv4::new(s, d, protocol).build(payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => Ipv6::new(s, d, protocol).build(payload),
        _ => panic!("mixed address families: {src} / {dst}"),
    }
}

// ---------------------------------------------------------------- TCP / UDP

/// TCP option builders (raw bytes for [`Tcp::options`]).
pub mod tcp_opt {
    /// End of option list.
    pub fn eol() -> Vec<u8> {
        vec![0]
    }
    /// No-operation.
    pub fn nop() -> Vec<u8> {
        vec![1]
    }
    /// Maximum segment size.
    pub fn mss(mss: u16) -> Vec<u8> {
        let b = mss.to_be_bytes();
        vec![2, 4, b[0], b[1]]
    }
    /// Window scale.
    pub fn window_scale(shift: u8) -> Vec<u8> {
        vec![3, 3, shift]
    }
    /// SACK permitted.
    pub fn sack_permitted() -> Vec<u8> {
        vec![4, 2]
    }
    /// Timestamps.
    pub fn timestamps(tsval: u32, tsecr: u32) -> Vec<u8> {
        let mut o = vec![8, 10];
        o.extend_from_slice(&tsval.to_be_bytes());
        o.extend_from_slice(&tsecr.to_be_bytes());
        o
    }
    /// Any option: kind, length, data.
    pub fn raw(kind: u8, data: &[u8]) -> Vec<u8> {
        let mut o = vec![kind, 2 + data.len() as u8];
        o.extend_from_slice(data);
        o
    }
    /// The options Linux puts in a SYN: MSS, SACK-permitted, timestamps, NOP, window scale.
    pub fn linux_syn(mss_val: u16, tsval: u32) -> Vec<u8> {
        [
            mss(mss_val),
            sack_permitted(),
            timestamps(tsval, 0),
            nop(),
            window_scale(7),
        ]
        .concat()
    }
}

/// A TCP header.
#[derive(Clone, Debug)]
pub struct Tcp {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flags, see [`tcp_flags`].
    pub flags: u8,
    /// Receive window.
    pub window: u16,
    /// Urgent pointer.
    pub urgent: u16,
    /// Raw options; padded with EOL to a multiple of 4.
    pub options: Vec<u8>,
    /// Overrides the data offset nibble (header words).
    pub data_offset: Option<u8>,
    /// Overrides the checksum.
    pub checksum: Option<u16>,
}

impl Tcp {
    /// A header with the given flags, window 64240 and no options.
    pub fn new(src_port: u16, dst_port: u16, flags: u8) -> Self {
        Tcp {
            src_port,
            dst_port,
            seq: 0,
            ack: 0,
            flags,
            window: 64240,
            urgent: 0,
            options: Vec::new(),
            data_offset: None,
            checksum: None,
        }
    }

    /// A SYN with Linux-like options (MSS 1460, SACK, timestamps, wscale 7).
    pub fn syn(src_port: u16, dst_port: u16, seq: u32) -> Self {
        Tcp {
            seq,
            options: tcp_opt::linux_syn(1460, 1),
            ..Tcp::new(src_port, dst_port, tcp_flags::SYN)
        }
    }

    /// The segment (header + payload) with its checksum computed over the
    /// pseudo-header of `src`/`dst` (with an IPv6 routing header, pass the
    /// final destination, as RFC 8200 requires).
    pub fn build(&self, src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
        let mut opts = self.options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0);
        }
        let doff = self.data_offset.unwrap_or(((20 + opts.len()) / 4) as u8);
        let mut s = Vec::with_capacity(20 + opts.len() + payload.len());
        s.extend_from_slice(&self.src_port.to_be_bytes());
        s.extend_from_slice(&self.dst_port.to_be_bytes());
        s.extend_from_slice(&self.seq.to_be_bytes());
        s.extend_from_slice(&self.ack.to_be_bytes());
        s.push(doff << 4);
        s.push(self.flags);
        s.extend_from_slice(&self.window.to_be_bytes());
        s.extend_from_slice(&[0, 0]);
        s.extend_from_slice(&self.urgent.to_be_bytes());
        s.extend_from_slice(&opts);
        s.extend_from_slice(payload);
        let csum = self
            .checksum
            .unwrap_or_else(|| l4_checksum(src, dst, proto::TCP, &s));
        s[16..18].copy_from_slice(&csum.to_be_bytes());
        s
    }
}

/// A UDP header.
#[derive(Clone, Debug)]
pub struct Udp {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Overrides the length field.
    pub length: Option<u16>,
    /// Overrides the checksum (0 = none, legal for IPv4 only).
    pub checksum: Option<u16>,
}

impl Udp {
    /// A header with computed length and checksum.
    pub fn new(src_port: u16, dst_port: u16) -> Self {
        Udp {
            src_port,
            dst_port,
            length: None,
            checksum: None,
        }
    }

    /// The datagram (header + payload) with its checksum.
    pub fn build(&self, src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
        let len = 8 + payload.len();
        let mut d = Vec::with_capacity(len);
        d.extend_from_slice(&self.src_port.to_be_bytes());
        d.extend_from_slice(&self.dst_port.to_be_bytes());
        d.extend_from_slice(&self.length.unwrap_or(len as u16).to_be_bytes());
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(payload);
        let csum = self
            .checksum
            .unwrap_or_else(|| match l4_checksum(src, dst, proto::UDP, &d) {
                // 0 means "no checksum" in UDP, so a computed 0 is sent as all ones.
                0 => 0xffff,
                c => c,
            });
        d[6..8].copy_from_slice(&csum.to_be_bytes());
        d
    }
}

// ---------------------------------------------------------------- SYN frames

/// Everything that varies between SYN frames.
#[derive(Clone, Copy, Debug)]
pub struct SynSpec {
    /// Destination MAC (the receiving interface's).
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Source address (family must match `dst`).
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Initial sequence number.
    pub seq: u32,
}

/// A complete Ethernet + IPv4/IPv6 + TCP SYN frame with Linux-like options
/// and correct checksums.
pub fn syn_frame(s: &SynSpec) -> Vec<u8> {
    let seg = Tcp::syn(s.src_port, s.dst_port, s.seq).build(s.src, s.dst, &[]);
    eth_frame(
        s.dst_mac,
        s.src_mac,
        &ip_packet(s.src, s.dst, proto::TCP, &seg),
    )
}

// ---------------------------------------------------------------- parsing

/// The interesting fields of a TCP segment found in a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpInfo {
    /// IP source.
    pub src: IpAddr,
    /// IP destination.
    pub dst: IpAddr,
    /// TCP source port.
    pub src_port: u16,
    /// TCP destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flags.
    pub flags: u8,
    /// Whether the IP header (v4) and TCP checksums verify.
    pub checksums_ok: bool,
}

/// Finds the TCP segment in an Ethernet frame (skipping VLAN tags and the
/// common IPv6 extension headers). Non-first fragments and non-TCP yield `None`.
pub fn parse_tcp(frame: &[u8]) -> Option<TcpInfo> {
    let mut off = 12;
    let mut et = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
    while et == ETHERTYPE_VLAN || et == ETHERTYPE_QINQ {
        off += 4;
        et = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
    }
    let ip = frame.get(off + 2..)?;
    let (src, dst, l4, ip_ok) = match et {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]);
            if ip[9] != proto::TCP
                || frag & 0x1fff != 0
                || ihl < 20
                || total > ip.len()
                || total < ihl
            {
                return None;
            }
            let src = IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&ip[12..16]).ok()?));
            let dst = IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&ip[16..20]).ok()?));
            (src, dst, &ip[ihl..total], checksum(&ip[..ihl]) == 0)
        }
        ETHERTYPE_IPV6 => {
            if ip.len() < 40 {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let end = (40 + plen).min(ip.len());
            let src = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?));
            let dst = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?));
            let (mut nh, mut p) = (ip[6], 40);
            while matches!(
                nh,
                proto::HOPOPTS | proto::ROUTING | proto::DSTOPTS | proto::FRAGMENT
            ) {
                let h = ip.get(p..p + 8)?;
                if nh == proto::FRAGMENT && u16::from_be_bytes([h[2], h[3]]) >> 3 != 0 {
                    return None;
                }
                let len = if nh == proto::FRAGMENT {
                    8
                } else {
                    (usize::from(h[1]) + 1) * 8
                };
                nh = h[0];
                p += len;
            }
            if nh != proto::TCP || p > end {
                return None;
            }
            (src, dst, &ip[p..end], true)
        }
        _ => return None,
    };
    if l4.len() < 20 {
        return None;
    }
    Some(TcpInfo {
        src,
        dst,
        src_port: u16::from_be_bytes([l4[0], l4[1]]),
        dst_port: u16::from_be_bytes([l4[2], l4[3]]),
        seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
        ack: u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]),
        flags: l4[13],
        checksums_ok: ip_ok && l4_checksum(src, dst, proto::TCP, l4) == 0,
    })
}

/// Whether `frame` carries a TCP SYN-ACK.
pub fn is_syn_ack(frame: &[u8]) -> bool {
    parse_tcp(frame).is_some_and(|t| {
        t.flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST)
            == tcp_flags::SYN | tcp_flags::ACK
    })
}
