//! Unprivileged checks of the frame builders.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use guard_tests::frames::*;

const A4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

fn a6() -> Ipv6Addr {
    "fd00::1".parse().unwrap()
}
fn b6() -> Ipv6Addr {
    "fd00::2".parse().unwrap()
}

#[test]
fn checksum_matches_rfc1071_example() {
    // RFC 1071 §3 example words sum to 0xddf2 (before complement).
    let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(checksum(&data), !0xddf2);
    assert_eq!(checksum(&[0xff]), !0xff00);
}

#[test]
fn syn_frames_verify_v4_and_v6() {
    for (src, dst) in [
        (IpAddr::V4(A4), IpAddr::V4(B4)),
        (IpAddr::V6(a6()), IpAddr::V6(b6())),
    ] {
        let f = syn_frame(&SynSpec {
            dst_mac: [2; 6],
            src_mac: [4; 6],
            src,
            dst,
            src_port: 1234,
            dst_port: 80,
            seq: 99,
        });
        let t = parse_tcp(&f).unwrap();
        assert!(t.checksums_ok);
        assert_eq!(
            (t.src, t.dst, t.src_port, t.dst_port, t.seq, t.flags),
            (src, dst, 1234, 80, 99, tcp_flags::SYN)
        );
        assert!(!is_syn_ack(&f));
        let expect = if src.is_ipv4() {
            14 + 20 + 40
        } else {
            14 + 40 + 40
        };
        assert_eq!(f.len(), expect);
    }
}

#[test]
fn bad_checksum_is_detected() {
    let seg = Tcp {
        checksum: Some(0x1234),
        ..Tcp::syn(1, 2, 3)
    }
    .build(A4.into(), B4.into(), &[]);
    let f = eth_frame(
        [2; 6],
        [4; 6],
        &ip_packet(A4.into(), B4.into(), proto::TCP, &seg),
    );
    assert!(!parse_tcp(&f).unwrap().checksums_ok);
}

#[test]
fn vlan_and_qinq_layout() {
    let seg = Tcp::new(1, 2, tcp_flags::SYN | tcp_flags::ACK).build(A4.into(), B4.into(), &[]);
    let ip = Ipv4::new(A4, B4, proto::TCP).build(&seg);
    let f = Ethernet::new([1; 6], [2; 6], ETHERTYPE_IPV4)
        .qinq(100, 200)
        .build(&ip);
    assert_eq!(&f[12..14], &ETHERTYPE_QINQ.to_be_bytes());
    assert_eq!(u16::from_be_bytes([f[14], f[15]]) & 0xfff, 100);
    assert_eq!(&f[16..18], &ETHERTYPE_VLAN.to_be_bytes());
    assert_eq!(u16::from_be_bytes([f[18], f[19]]) & 0xfff, 200);
    assert_eq!(&f[20..22], &ETHERTYPE_IPV4.to_be_bytes());
    assert!(is_syn_ack(&f));
    let p = Vlan {
        pcp: 5,
        dei: true,
        ..Vlan::dot1q(7)
    };
    let f = Ethernet::new([1; 6], [2; 6], ETHERTYPE_IPV4)
        .vlan(p)
        .build(&ip);
    assert_eq!(
        u16::from_be_bytes([f[14], f[15]]),
        (5 << 13) | (1 << 12) | 7
    );
}

#[test]
fn ipv4_options_and_fragments() {
    let mut h = Ipv4::new(A4, B4, proto::UDP);
    h.options = [ipv4_opt::router_alert(), ipv4_opt::nop()].concat();
    let p = h.build(&[0xab; 10]);
    assert_eq!(p[0], 0x46 + 1, "5 option bytes pad to 8: IHL 7");
    assert_eq!(p.len(), 28 + 10);
    assert_eq!(checksum(&p[..28]), 0);

    let payload: Vec<u8> = (0..90).collect();
    let frags = Ipv4 {
        id: 77,
        ..Ipv4::new(A4, B4, proto::UDP)
    }
    .fragments(&payload, 30);
    assert_eq!(frags.len(), 4, "24-byte chunks");
    let mut joined = Vec::new();
    for (i, f) in frags.iter().enumerate() {
        let fl = u16::from_be_bytes([f[6], f[7]]);
        assert_eq!(fl & 0x1fff, (i * 3) as u16);
        assert_eq!(fl & 0x2000 != 0, i < 3);
        assert_eq!(fl & 0x4000, 0);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]) as usize, f.len());
        assert_eq!(checksum(&f[..20]), 0);
        joined.extend_from_slice(&f[20..]);
    }
    assert_eq!(joined, payload);
}

#[test]
fn ipv6_extension_chain() {
    let seg = Udp::new(5, 6).build(a6().into(), b6().into(), b"hi");
    let p = Ipv6::new(a6(), b6(), proto::UDP)
        .with_ext(Ipv6Ext::HopByHop(ipv6_opt::router_alert(0)))
        .with_ext(Ipv6Ext::routing_addrs(0, 1, &[b6()]))
        .with_ext(Ipv6Ext::DestOpts(vec![]))
        .with_ext(Ipv6Ext::Fragment {
            offset: 0,
            more: false,
            id: 9,
        })
        .build(&seg);
    assert_eq!(p[6], proto::HOPOPTS);
    let mut off = 40;
    let mut chain = vec![];
    let mut nh = p[6];
    while nh != proto::UDP {
        chain.push(nh);
        let len = if nh == proto::FRAGMENT {
            8
        } else {
            (p[off + 1] as usize + 1) * 8
        };
        nh = p[off];
        off += len;
    }
    assert_eq!(
        chain,
        [
            proto::HOPOPTS,
            proto::ROUTING,
            proto::DSTOPTS,
            proto::FRAGMENT
        ]
    );
    assert_eq!(&p[off..], &seg[..]);
    assert_eq!(u16::from_be_bytes([p[4], p[5]]) as usize, p.len() - 40);
    assert_eq!(l4_checksum(a6().into(), b6().into(), proto::UDP, &seg), 0);

    // A TCP segment behind extension headers is still found.
    let tcp = Tcp::syn(1, 2, 3).build(a6().into(), b6().into(), &[]);
    let p = Ipv6::new(a6(), b6(), proto::TCP)
        .with_ext(Ipv6Ext::DestOpts(vec![]))
        .build(&tcp);
    let t = parse_tcp(&eth_frame([0; 6], [0; 6], &p)).unwrap();
    assert!(t.checksums_ok && t.flags == tcp_flags::SYN);
}

#[test]
fn ipv6_fragments() {
    let payload = vec![7u8; 50];
    let frags = Ipv6::new(a6(), b6(), proto::UDP).fragments(&payload, 16, 0xdead);
    assert_eq!(frags.len(), 4);
    for (i, f) in frags.iter().enumerate() {
        assert_eq!(f[6], proto::FRAGMENT);
        assert_eq!(f[40], proto::UDP);
        let om = u16::from_be_bytes([f[42], f[43]]);
        assert_eq!(om >> 3, (i * 2) as u16);
        assert_eq!(om & 1 == 1, i < 3);
        assert_eq!(u32::from_be_bytes([f[44], f[45], f[46], f[47]]), 0xdead);
    }
}

#[test]
fn udp_zero_checksum_is_sent_as_ones() {
    // With payload word w = checksum(payload 0), the one's-complement sum
    // becomes 0xffff, whose complement 0 must go out as 0xffff.
    let base = Udp::new(1, 2).build(A4.into(), B4.into(), &[0, 0]);
    let d = Udp::new(1, 2).build(A4.into(), B4.into(), &base[6..8]);
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 0xffff);
    assert_eq!(l4_checksum(A4.into(), B4.into(), proto::UDP, &d), 0);
}

#[test]
fn tcp_options_pad_and_data_offset() {
    let mut t = Tcp::new(1, 2, tcp_flags::SYN);
    t.options = tcp_opt::mss(1400);
    t.options.extend(tcp_opt::window_scale(3));
    let s = t.build(A4.into(), B4.into(), b"x");
    assert_eq!(s[12] >> 4, 7, "20 + 7 option bytes pad to 28");
    assert_eq!(s.len(), 29);
    assert_eq!(l4_checksum(A4.into(), B4.into(), proto::TCP, &s), 0);
}
