//! Tier 2: the XDP program under the real verifier, run with
//! `BPF_PROG_TEST_RUN` over crafted frames. Each case asserts the verdict and
//! exactly which counters moved. Needs root; run with `--test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use guard::{
    cidr::Cidr,
    config::Listener,
    ebpf::maps::{CidrList, monotonic_ns},
};
use guard_common::{
    CONFIG_ALLOW_UDP, CONFIG_SYN_COOKIES, COOKIE_ACK_WINDOW_NS, COOKIE_REFRESH_INTERVAL_NS,
    DEFAULT_TENANT, EVENT_SOURCE_LIMIT, GuardConfig, LimitEvent, ListenerKey, ListenerValue,
    RateLimit,
};
use guard_tests::{
    frames::{
        ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_QINQ, ETHERTYPE_VLAN, Ethernet,
        Ipv4, Ipv6, Ipv6Ext, Tcp, Udp, Vlan, eth_frame, ip_packet, ipv4_opt, ipv6_opt, parse_tcp,
        proto, tcp_flags, tcp_opt,
    },
    xdp::{XdpUnderTest, verdict},
};

const PORT: u16 = 11211;
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, last)
}
fn server4() -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 1)
}
fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}
fn server6() -> Ipv6Addr {
    v6("2001:db8:ffff::1")
}

fn tcp4(src: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let seg = Tcp::new(40000, dport, flags).build(src.into(), server4().into(), &[]);
    Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4)
        .build(&Ipv4::new(src, server4(), proto::TCP).build(&seg))
}
fn syn4(src: Ipv4Addr) -> Vec<u8> {
    let seg = Tcp::syn(40000, PORT, 1).build(src.into(), server4().into(), &[]);
    Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4)
        .build(&Ipv4::new(src, server4(), proto::TCP).build(&seg))
}
fn syn6_with(src: Ipv6Addr, ip: Ipv6) -> Vec<u8> {
    let seg = Tcp::syn(40000, PORT, 1).build(src.into(), server6().into(), &[]);
    Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV6).build(&ip.build(&seg))
}
fn syn6(src: Ipv6Addr) -> Vec<u8> {
    syn6_with(src, Ipv6::new(src, server6(), proto::TCP))
}
fn tagged(vlans: &[Vlan], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut e = Ethernet::new(MAC_B, MAC_A, ethertype);
    for v in vlans {
        e = e.vlan(*v);
    }
    e.build(payload)
}
fn ip4_syn_packet(src: Ipv4Addr) -> Vec<u8> {
    let seg = Tcp::syn(40000, PORT, 1).build(src.into(), server4().into(), &[]);
    Ipv4::new(src, server4(), proto::TCP).build(&seg)
}

fn moved(pairs: &[(&'static str, u64)]) -> BTreeMap<&'static str, u64> {
    pairs.iter().copied().collect()
}

/// A guard protecting *:11211 with no limits.
fn guard() -> XdpUnderTest {
    XdpUnderTest::protecting(PORT)
}

fn set_config(x: &mut XdpUnderTest, f: impl FnOnce(&mut GuardConfig)) {
    let mut c = x.maps.config().unwrap();
    f(&mut c);
    x.maps.set_config(&c).unwrap();
}

fn admitted() -> BTreeMap<&'static str, u64> {
    moved(&[("frames", 1), ("judged", 1), ("admitted", 1)])
}
fn passed() -> BTreeMap<&'static str, u64> {
    moved(&[("frames", 1), ("passed", 1)])
}
fn failed(reason: &'static str) -> BTreeMap<&'static str, u64> {
    moved(&[("frames", 1), (reason, 1)])
}
/// A SYN dropped by `budget` (`source`, `tenant` or `global`) from a
/// source that already crossed a budget within the last second.
fn dropped(budget: &str) -> BTreeMap<&'static str, u64> {
    let reason = match budget {
        "source" => "drop_source",
        "tenant" => "drop_tenant",
        _ => "drop_global",
    };
    moved(&[("frames", 1), ("judged", 1), (reason, 1)])
}
/// As [`dropped`], for a source crossing the budget: the crossing is
/// counted and described.
fn crossed(budget: &str) -> BTreeMap<&'static str, u64> {
    let mut m = dropped(budget);
    let label = match budget {
        "source" => "crossed_source",
        "tenant" => "crossed_tenant",
        _ => "crossed_global",
    };
    m.insert(label, 1);
    m.insert("events_sent", 1);
    m
}

#[track_caller]
fn expect(x: &XdpUnderTest, frame: &[u8], want_verdict: u32, want: BTreeMap<&'static str, u64>) {
    let (v, got) = x.judge(frame);
    assert_eq!(v, want_verdict, "verdict (counters moved: {got:?})");
    assert_eq!(got, want, "counters");
}

#[test]
fn ipv4_syn_to_protected_port_is_judged_and_admitted() {
    let x = guard();
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
}

#[test]
fn ipv4_syn_to_other_port_passes_unjudged() {
    let x = guard();
    expect(
        &x,
        &tcp4(v4(1), 22, tcp_flags::SYN),
        verdict::PASS,
        passed(),
    );
}

#[test]
fn non_syn_tcp_passes_unjudged() {
    let x = guard();
    for flags in [
        tcp_flags::SYN | tcp_flags::ACK,
        tcp_flags::ACK,
        tcp_flags::RST,
        tcp_flags::RST | tcp_flags::ACK,
        tcp_flags::FIN | tcp_flags::ACK,
        tcp_flags::PSH | tcp_flags::ACK,
    ] {
        expect(&x, &tcp4(v4(1), PORT, flags), verdict::PASS, passed());
    }
}

#[test]
fn ipv6_syn_to_protected_and_unprotected_ports() {
    let x = guard();
    expect(&x, &syn6(v6("2001:db8:1::1")), verdict::PASS, admitted());
    let seg = Tcp::syn(1, 80, 1).build(v6("2001:db8:1::1").into(), server6().into(), &[]);
    let f = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV6)
        .build(&Ipv6::new(v6("2001:db8:1::1"), server6(), proto::TCP).build(&seg));
    expect(&x, &f, verdict::PASS, passed());
}

#[test]
fn specific_listener_does_not_match_other_addresses() {
    let mut x = XdpUnderTest::load();
    let l: Listener = "203.0.113.1:11211".parse().unwrap();
    x.maps
        .sync_listeners(&[(l.keys()[0], ListenerValue::default())])
        .unwrap();
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    let seg = Tcp::syn(1, PORT, 1).build(v4(1).into(), Ipv4Addr::new(203, 0, 113, 2).into(), &[]);
    let f = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4)
        .build(&Ipv4::new(v4(1), Ipv4Addr::new(203, 0, 113, 2), proto::TCP).build(&seg));
    expect(&x, &f, verdict::PASS, passed());
}

#[test]
fn vlan_and_qinq_syns_are_judged() {
    let x = guard();
    let p4 = ip4_syn_packet(v4(1));
    expect(
        &x,
        &tagged(&[Vlan::dot1q(10)], ETHERTYPE_IPV4, &p4),
        verdict::PASS,
        admitted(),
    );
    expect(
        &x,
        &tagged(&[Vlan::dot1ad(100), Vlan::dot1q(10)], ETHERTYPE_IPV4, &p4),
        verdict::PASS,
        admitted(),
    );
    // Some switches use 0x8100 for both tags.
    expect(
        &x,
        &tagged(&[Vlan::dot1q(100), Vlan::dot1q(10)], ETHERTYPE_IPV4, &p4),
        verdict::PASS,
        admitted(),
    );
    let src = v6("2001:db8:1::1");
    let seg = Tcp::syn(1, PORT, 1).build(src.into(), server6().into(), &[]);
    let p6 = Ipv6::new(src, server6(), proto::TCP).build(&seg);
    expect(
        &x,
        &tagged(&[Vlan::dot1ad(100), Vlan::dot1q(10)], ETHERTYPE_IPV6, &p6),
        verdict::PASS,
        admitted(),
    );
}

#[test]
fn three_vlan_tags_are_passed_as_unparseable() {
    let x = guard();
    let p4 = ip4_syn_packet(v4(1));
    let f = tagged(
        &[Vlan::dot1ad(1), Vlan::dot1q(2), Vlan::dot1q(3)],
        ETHERTYPE_IPV4,
        &p4,
    );
    expect(&x, &f, verdict::PASS, failed("parse_vlan"));
}

#[test]
fn ipv4_options_are_skipped() {
    let x = guard();
    for options in [
        ipv4_opt::router_alert(),
        [ipv4_opt::nop(), ipv4_opt::router_alert()].concat(),
        // 40 bytes of options: IHL 15, the maximum.
        ipv4_opt::record_route(9),
    ] {
        let mut ip = Ipv4::new(v4(1), server4(), proto::TCP);
        ip.options = options;
        let seg = Tcp::syn(1, PORT, 1).build(v4(1).into(), server4().into(), &[]);
        let f = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4).build(&ip.build(&seg));
        expect(&x, &f, verdict::PASS, admitted());
    }
}

#[test]
fn ipv4_bad_ihl_is_a_parse_failure() {
    let x = guard();
    for ihl in [0u8, 4] {
        let mut ip = Ipv4::new(v4(1), server4(), proto::TCP);
        ip.ihl = Some(ihl);
        let seg = Tcp::syn(1, PORT, 1).build(v4(1).into(), server4().into(), &[]);
        let f = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4).build(&ip.build(&seg));
        expect(&x, &f, verdict::PASS, failed("parse_ipv4"));
    }
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let x = guard();
    let src = v6("2001:db8:1::1");
    let chains: Vec<Vec<Ipv6Ext>> = vec![
        vec![Ipv6Ext::HopByHop(ipv6_opt::router_alert(0))],
        vec![Ipv6Ext::DestOpts(ipv6_opt::padn(6))],
        vec![Ipv6Ext::routing_addrs(0, 0, &[v6("2001:db8::9")])],
        vec![
            Ipv6Ext::HopByHop(ipv6_opt::router_alert(0)),
            Ipv6Ext::DestOpts(ipv6_opt::padn(12)),
            Ipv6Ext::routing_addrs(0, 0, &[v6("2001:db8::9"), v6("2001:db8::a")]),
            Ipv6Ext::DestOpts(ipv6_opt::padn(4)),
        ],
        // A first fragment carries the TCP header.
        vec![Ipv6Ext::Fragment {
            offset: 0,
            more: true,
            id: 7,
        }],
    ];
    for chain in chains {
        let mut ip = Ipv6::new(src, server6(), proto::TCP);
        for e in chain {
            ip = ip.with_ext(e);
        }
        expect(&x, &syn6_with(src, ip), verdict::PASS, admitted());
    }
}

#[test]
fn too_many_ipv6_extension_headers_are_passed_as_unparseable() {
    let x = guard();
    let src = v6("2001:db8:1::1");
    let mut ip = Ipv6::new(src, server6(), proto::TCP);
    for _ in 0..7 {
        ip = ip.with_ext(Ipv6Ext::DestOpts(ipv6_opt::padn(6)));
    }
    expect(
        &x,
        &syn6_with(src, ip),
        verdict::PASS,
        failed("parse_ipv6_ext"),
    );
}

#[test]
fn non_first_fragments_pass() {
    let x = guard();
    let mut ip = Ipv4::new(v4(1), server4(), proto::TCP);
    ip.fragment_offset = 8;
    ip.dont_fragment = false;
    let f = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4).build(&ip.build(&[0u8; 32]));
    expect(&x, &f, verdict::PASS, failed("fragment"));

    let src = v6("2001:db8:1::1");
    let ip = Ipv6::new(src, server6(), proto::TCP).with_ext(Ipv6Ext::Fragment {
        offset: 4,
        more: false,
        id: 9,
    });
    let f = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV6).build(&ip.build(&[0u8; 32]));
    expect(&x, &f, verdict::PASS, failed("fragment"));
}

#[test]
fn ipv4_first_fragment_syn_is_judged() {
    let x = guard();
    let mut ip = Ipv4::new(v4(1), server4(), proto::TCP);
    ip.dont_fragment = false;
    ip.more_fragments = true;
    let seg = Tcp::syn(1, PORT, 1).build(v4(1).into(), server4().into(), &[]);
    let f = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4).build(&ip.build(&seg));
    expect(&x, &f, verdict::PASS, admitted());
}

#[test]
fn truncation_at_every_header_boundary_passes_with_its_reason() {
    let x = guard();
    // Untagged IPv4: Ethernet 14, IPv4 20, TCP 20 (+ options).
    // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header
    // (as do drivers), so `parse_ethernet` cannot be provoked from here.
    let f = syn4(v4(1));
    for len in 14..34 {
        expect(&x, &f[..len], verdict::PASS, failed("parse_ipv4"));
    }
    for len in 34..54 {
        expect(&x, &f[..len], verdict::PASS, failed("parse_tcp"));
    }
    // IPv4 options cut short.
    let mut ip = Ipv4::new(v4(1), server4(), proto::TCP);
    ip.options = ipv4_opt::record_route(9);
    let seg = Tcp::syn(1, PORT, 1).build(v4(1).into(), server4().into(), &[]);
    let f = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4).build(&ip.build(&seg));
    expect(&x, &f[..14 + 40], verdict::PASS, failed("parse_ipv4"));
    // VLAN tag cut short.
    let t = tagged(&[Vlan::dot1q(5)], ETHERTYPE_IPV4, &ip4_syn_packet(v4(1)));
    for len in 14..18 {
        expect(&x, &t[..len], verdict::PASS, failed("parse_vlan"));
    }
    // IPv6: header 40, then an extension header, then TCP.
    let src = v6("2001:db8:1::1");
    let ip6 = Ipv6::new(src, server6(), proto::TCP).with_ext(Ipv6Ext::DestOpts(ipv6_opt::padn(6)));
    let f6 = syn6_with(src, ip6);
    for len in 14..54 {
        expect(&x, &f6[..len], verdict::PASS, failed("parse_ipv6"));
    }
    for len in 54..62 {
        expect(&x, &f6[..len], verdict::PASS, failed("parse_ipv6_ext"));
    }
    for len in 62..82 {
        expect(&x, &f6[..len], verdict::PASS, failed("parse_tcp"));
    }
    // UDP header cut short.
    let d = Udp::new(1, PORT).build(v4(1).into(), server4().into(), b"stats\r\n");
    let f = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4)
        .build(&Ipv4::new(v4(1), server4(), proto::UDP).build(&d));
    for len in 34..42 {
        expect(&x, &f[..len], verdict::PASS, failed("parse_udp"));
    }
}

#[test]
fn udp_to_protected_port_is_dropped_unless_allowed() {
    let mut x = guard();
    let udp = |dport| {
        let d = Udp::new(1, dport).build(
            v4(1).into(),
            server4().into(),
            b"\0\0\0\0\0\x01\0\0stats\r\n",
        );
        Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4)
            .build(&Ipv4::new(v4(1), server4(), proto::UDP).build(&d))
    };
    expect(&x, &udp(PORT), verdict::DROP, failed("drop_udp"));
    expect(&x, &udp(53), verdict::PASS, passed());
    set_config(&mut x, |c| c.flags |= CONFIG_ALLOW_UDP);
    expect(&x, &udp(PORT), verdict::PASS, passed());
}

#[test]
fn non_ip_and_other_protocols_pass() {
    let x = guard();
    let arp = Ethernet::new([0xff; 6], MAC_A, ETHERTYPE_ARP).build(&[0u8; 28]);
    expect(&x, &arp, verdict::PASS, failed("not_ip"));
    let icmp = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4)
        .build(&Ipv4::new(v4(1), server4(), proto::ICMP).build(&[8, 0, 0, 0, 0, 0, 0, 0]));
    expect(&x, &icmp, verdict::PASS, passed());
}

#[test]
fn deny_list_drops_and_allow_list_bypasses_buckets() {
    let mut x = guard();
    set_config(&mut x, |c| c.source = RateLimit::per_second(1, 1));
    x.maps
        .add_cidr(CidrList::Deny, "198.51.100.0/28".parse().unwrap(), None)
        .unwrap();
    x.maps
        .add_cidr(CidrList::Allow, "198.51.100.64/26".parse().unwrap(), None)
        .unwrap();
    x.maps
        .add_cidr(CidrList::Deny, "2001:db8:dead::/48".parse().unwrap(), None)
        .unwrap();
    let deny = moved(&[("frames", 1), ("judged", 1), ("drop_deny", 1)]);
    expect(&x, &syn4(v4(5)), verdict::DROP, deny.clone());
    expect(&x, &syn6(v6("2001:db8:dead:1::7")), verdict::DROP, deny);
    // Allowed: never charged, so a burst-1 bucket never runs dry.
    let allow = moved(&[("frames", 1), ("judged", 1), ("allowed", 1)]);
    for _ in 0..5 {
        expect(&x, &syn4(v4(70)), verdict::PASS, allow.clone());
    }
    // Removing the rule restores normal judgement.
    assert!(
        x.maps
            .remove_cidr(CidrList::Deny, "198.51.100.0/28".parse().unwrap())
            .unwrap()
    );
    expect(&x, &syn4(v4(5)), verdict::PASS, admitted());
}

#[test]
fn expired_deny_entries_no_longer_apply_and_are_removed() {
    let mut x = guard();
    let cidr: Cidr = "198.51.100.9/32".parse().unwrap();
    x.maps.add_cidr(CidrList::Deny, cidr, Some(1)).unwrap();
    expect(
        &x,
        &syn4(v4(9)),
        verdict::DROP,
        moved(&[("frames", 1), ("judged", 1), ("drop_deny", 1)]),
    );
    std::thread::sleep(Duration::from_millis(1100));
    expect(&x, &syn4(v4(9)), verdict::PASS, admitted());
    assert_eq!(x.maps.remove_expired().unwrap(), 1);
    assert!(x.maps.list_cidrs(CidrList::Deny).unwrap().is_empty());
}

#[test]
fn source_bucket_exhausts_then_refills() {
    let mut x = guard();
    // 2/s, burst 3: three admitted at once, then one every 500 ms (slow
    // enough that a loaded machine's pause between two frames below does
    // not refill the bucket).
    set_config(&mut x, |c| c.source = RateLimit::per_second(2, 3));
    for _ in 0..3 {
        expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    }
    expect(&x, &syn4(v4(1)), verdict::DROP, crossed("source"));
    // Another source has its own bucket.
    expect(&x, &syn4(v4(2)), verdict::PASS, admitted());
    std::thread::sleep(Duration::from_millis(600));
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    // Crossed again within the second: dropped, not reported again.
    expect(&x, &syn4(v4(1)), verdict::DROP, dropped("source"));
}

#[test]
fn ipv6_sources_share_a_bucket_per_prefix() {
    let mut x = guard();
    set_config(&mut x, |c| {
        c.source = RateLimit::per_second(1, 1);
        c.ipv6_prefix_len = 64;
    });
    expect(&x, &syn6(v6("2001:db8:1:2::1")), verdict::PASS, admitted());
    // Same /64, other host: same bucket, already empty.
    expect(
        &x,
        &syn6(v6("2001:db8:1:2::ffff")),
        verdict::DROP,
        crossed("source"),
    );
    // Another /64: its own bucket.
    expect(&x, &syn6(v6("2001:db8:1:3::1")), verdict::PASS, admitted());
}

#[test]
fn tenant_bucket_by_listener_and_by_learnt_source() {
    let mut x = XdpUnderTest::load();
    let tenant = 77;
    let l: Listener = "*:11211".parse().unwrap();
    let wanted: Vec<_> = l
        .keys()
        .into_iter()
        .map(|k| (k, ListenerValue { tenant, flags: 0 }))
        .collect();
    x.maps.sync_listeners(&wanted).unwrap();
    x.maps
        .sync_tenant_limits(&[
            (tenant, RateLimit::per_second(1, 2)),
            (DEFAULT_TENANT, RateLimit::per_second(1, 1)),
        ])
        .unwrap();
    // Three sources, one tenant with burst 2: the third is dropped.
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(2)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(3)), verdict::DROP, crossed("tenant"));

    // A listener with no tenant: sources the proxy attributed to a tenant
    // charge it; others share the default budget.
    let mut y = guard();
    y.maps
        .sync_tenant_limits(&[
            (tenant, RateLimit::per_second(1, 2)),
            (DEFAULT_TENANT, RateLimit::per_second(1, 1)),
        ])
        .unwrap();
    y.maps
        .set_source_tenant(IpAddr::V4(v4(10)), tenant)
        .unwrap();
    y.maps
        .set_source_tenant(IpAddr::V4(v4(11)), tenant)
        .unwrap();
    expect(&y, &syn4(v4(10)), verdict::PASS, admitted());
    expect(&y, &syn4(v4(11)), verdict::PASS, admitted());
    expect(&y, &syn4(v4(10)), verdict::DROP, crossed("tenant"));
    expect(&y, &syn4(v4(10)), verdict::DROP, dropped("tenant"));
    // Unattributed sources: the default tenant's burst of 1.
    expect(&y, &syn4(v4(20)), verdict::PASS, admitted());
    expect(&y, &syn4(v4(21)), verdict::DROP, crossed("tenant"));
}

/// A verified source's SYNs skip the shared budget of sources with no
/// tenant and the host's: a flood that empties both locks out everyone
/// but the sources the daemon verified. Its own bucket still applies, a
/// verified source of a tenant is charged to that tenant, and a lapsed
/// entry counts for nothing.
#[test]
fn verified_sources_skip_the_shared_and_host_budgets() {
    let mut x = guard();
    set_config(&mut x, |c| {
        c.global = RateLimit::per_second(1, 1);
        c.source = RateLimit::per_second(1, 3);
    });
    let tenant = 77;
    x.maps
        .sync_tenant_limits(&[
            (DEFAULT_TENANT, RateLimit::per_second(1, 1)),
            (tenant, RateLimit::per_second(1, 1)),
        ])
        .unwrap();
    // The flood empties the shared budget, then the host's.
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(2)), verdict::DROP, crossed("tenant"));
    let hour = Duration::from_secs(3600);
    x.maps
        .set_verified(IpAddr::V4(v4(50)), DEFAULT_TENANT, 0, hour)
        .unwrap();
    let verified = |mut m: BTreeMap<&'static str, u64>| {
        m.insert("verified", 1);
        m
    };
    // Open-tenant verified source: neither budget is charged.
    expect(&x, &syn4(v4(50)), verdict::PASS, verified(admitted()));
    expect(&x, &syn4(v4(50)), verdict::PASS, verified(admitted()));
    expect(&x, &syn4(v4(50)), verdict::PASS, verified(admitted()));
    // Its own bucket (burst 3) still holds it.
    expect(
        &x,
        &syn4(v4(50)),
        verdict::DROP,
        verified(crossed("source")),
    );
    // A tenant's verified source is charged to its tenant (burst 1), not
    // to the shared budget or the host's.
    x.maps
        .set_verified(IpAddr::V4(v4(60)), tenant, 9, hour)
        .unwrap();
    expect(&x, &syn4(v4(60)), verdict::PASS, verified(admitted()));
    expect(
        &x,
        &syn4(v4(60)),
        verdict::DROP,
        verified(crossed("tenant")),
    );
    // A lapsed entry is no verification at all.
    x.maps
        .set_verified(IpAddr::V4(v4(70)), DEFAULT_TENANT, 0, Duration::ZERO)
        .unwrap();
    expect(&x, &syn4(v4(70)), verdict::DROP, crossed("tenant"));
    // Gone when removed, as a revoked credential's sources are.
    x.maps
        .set_verified(IpAddr::V4(v4(80)), DEFAULT_TENANT, 0, hour)
        .unwrap();
    expect(&x, &syn4(v4(80)), verdict::PASS, verified(admitted()));
    assert!(x.maps.remove_verified(IpAddr::V4(v4(80))).unwrap());
    expect(&x, &syn4(v4(80)), verdict::DROP, crossed("tenant"));
    // IPv6 by the configured prefix, like the per-source buckets.
    x.maps
        .set_verified(IpAddr::V6(v6("2001:db8:1:2::1")), DEFAULT_TENANT, 0, hour)
        .unwrap();
    expect(
        &x,
        &syn6(v6("2001:db8:1:2::99")),
        verdict::PASS,
        verified(admitted()),
    );
    expect(
        &x,
        &syn6(v6("2001:db8:1:3::1")),
        verdict::DROP,
        crossed("tenant"),
    );
}

#[test]
fn global_bucket_caps_the_host() {
    let mut x = guard();
    set_config(&mut x, |c| c.global = RateLimit::per_second(1, 2));
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(2)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(3)), verdict::DROP, crossed("global"));
    expect(&x, &syn4(v4(3)), verdict::DROP, dropped("global"));
}

#[test]
fn limit_events_are_sent_once_per_source_per_second() {
    use aya::maps::{Map, MapData, RingBuf};
    let mut x = guard();
    set_config(&mut x, |c| c.source = RateLimit::per_second(1, 1));
    let pin = x.paths().map_pin(guard_common::maps::EVENTS);
    let mut ring: RingBuf<MapData> = Map::from_map_data(MapData::from_pin(&pin).unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let drain = |ring: &mut RingBuf<MapData>| {
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), std::mem::size_of::<LimitEvent>());
            // SAFETY: the program wrote exactly one LimitEvent.
            events.push(unsafe { item.as_ptr().cast::<LimitEvent>().read_unaligned() });
        }
        events
    };
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    for _ in 0..50 {
        assert_eq!(x.run(&syn4(v4(1))), verdict::DROP);
    }
    assert_eq!(x.run(&syn4(v4(2))), verdict::PASS);
    for _ in 0..50 {
        assert_eq!(x.run(&syn4(v4(2))), verdict::DROP);
    }
    let events = drain(&mut ring);
    assert_eq!(events.len(), 2, "one event per source: {events:?}");
    let first = events
        .iter()
        .find(|e| e.source.addr[3] == 1)
        .expect("source 1 reported");
    assert_eq!(first.reason, EVENT_SOURCE_LIMIT);
    assert_eq!(first.port, u32::from(PORT));
    assert_eq!(first.source.family, guard_common::FAMILY_V4);
    std::thread::sleep(Duration::from_millis(1050));
    // The bucket refilled one token; the next SYN is admitted, the one after
    // dropped and reported again, a second later.
    assert_eq!(x.run(&syn4(v4(1))), verdict::PASS);
    assert_eq!(x.run(&syn4(v4(1))), verdict::DROP);
    assert_eq!(drain(&mut ring).len(), 1);
}

/// A flood of new sources is the expensive case for an event per
/// crossing: 100,000 distinct sources, each crossing the host's budget
/// once, produce no more events than the event budget allows, while every
/// drop and every crossing is still counted.
#[test]
fn a_spoofed_flood_costs_at_most_the_event_budget() {
    use aya::maps::{Map, MapData, RingBuf};
    const SOURCES: u32 = 100_000;
    const EVENT_RATE: u64 = 100;
    const EVENT_BURST: u64 = 50;
    let mut x = guard();
    set_config(&mut x, |c| {
        c.global = RateLimit::per_second(1, 1);
        c.events = RateLimit::per_second(EVENT_RATE, EVENT_BURST);
    });
    let pin = x.paths().map_pin(guard_common::maps::EVENTS);
    let mut ring: RingBuf<MapData> = Map::from_map_data(MapData::from_pin(&pin).unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    // Drained as the flood runs, so a full ring cannot stand in for the
    // budget.
    let mut received = 0u64;
    let mut drain = |ring: &mut RingBuf<MapData>| {
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), std::mem::size_of::<LimitEvent>());
            received += 1;
        }
    };
    let before = x.counters();
    let start = Instant::now();
    for i in 0..SOURCES {
        let b = i.to_be_bytes();
        x.run(&syn4(Ipv4Addr::new(10, b[1], b[2], b[3])));
        if i % 1_000 == 0 {
            drain(&mut ring);
        }
    }
    let elapsed = start.elapsed();
    drain(&mut ring);
    let after = x.counters();
    let d = |k: &str| after[k] - before[k];
    // The first SYN takes the host's one token; every other is dropped by
    // it, each from a source crossing it for the first time.
    assert_eq!(d("judged"), u64::from(SOURCES));
    assert_eq!(d("admitted") + d("drop_global"), u64::from(SOURCES));
    assert!(d("admitted") <= 1 + elapsed.as_secs(), "{after:?}");
    assert_eq!(d("crossed_global"), d("drop_global"));
    let allowed = EVENT_BURST + (EVENT_RATE as f64 * elapsed.as_secs_f64()).ceil() as u64 + 1;
    assert!(
        d("events_sent") <= allowed,
        "{} events sent in {elapsed:?}, budget {allowed}",
        d("events_sent")
    );
    assert!(d("events_sent") >= EVENT_BURST, "the burst is described");
    assert_eq!(received, d("events_sent"), "every sent event arrives");
    assert_eq!(d("events_lost"), 0);
    assert_eq!(
        d("events_sent") + d("events_suppressed"),
        d("crossed_global"),
        "every crossing is sent or counted"
    );
}

/// An event budget of zero describes nothing and still counts everything.
#[test]
fn events_can_be_turned_off() {
    let mut x = guard();
    set_config(&mut x, |c| {
        c.source = RateLimit::per_second(1, 1);
        c.events = RateLimit::UNLIMITED;
    });
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    let mut suppressed = dropped("source");
    suppressed.insert("crossed_source", 1);
    suppressed.insert("events_suppressed", 1);
    expect(&x, &syn4(v4(1)), verdict::DROP, suppressed);
    expect(&x, &syn4(v4(1)), verdict::DROP, dropped("source"));
}

/// The bucket is shared by every CPU: SYNs from one source judged on both
/// CPUs at once must not be admitted more often than the configured rate
/// allows (+10 %, plus the burst), nor be starved far below it.
#[test]
fn admitted_rate_holds_under_a_flood_on_every_cpu() {
    let mut x = guard();
    let rate = 20_000;
    let burst = 100;
    set_config(&mut x, |c| c.source = RateLimit::per_second(rate, burst));
    let frame = syn4(v4(1));
    let cpus = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let run_for = Duration::from_secs(2);
    let before = x.counters();
    let start = Instant::now();
    let xr = &x;
    let offered: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..cpus)
            .map(|cpu| {
                let frame = &frame;
                s.spawn(move || {
                    pin_to_cpu(cpu);
                    let mut offered = 0u64;
                    // Bounded by time and by count.
                    while start.elapsed() < run_for && offered < 500_000_000 {
                        xr.run_program(guard_common::PROGRAM_GUARD, frame, 100_000);
                        offered += 100_000;
                    }
                    offered
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let after = x.counters();
    let admitted = after["admitted"] - before["admitted"];
    let dropped = after["drop_source"] - before["drop_source"];
    assert_eq!(admitted + dropped, offered, "every SYN judged exactly once");
    let allowed = rate as f64 * elapsed;
    println!(
        "{cpus} CPUs offered {offered} SYNs in {elapsed:.3}s ({:.0}/s); admitted {admitted} \
         ({:.0}/s) against {rate}/s burst {burst}",
        offered as f64 / elapsed,
        admitted as f64 / elapsed,
    );
    assert!(
        offered as f64 > allowed * 5.0,
        "the flood must exceed the rate to test it"
    );
    assert!(
        (admitted as f64) <= allowed * 1.10 + burst as f64,
        "admitted {admitted} > {:.0} (+10% + burst)",
        allowed * 1.10 + burst as f64
    );
    assert!(
        (admitted as f64) >= allowed * 0.90,
        "admitted {admitted} < {:.0} (−10%): contention starves the bucket",
        allowed * 0.90
    );
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; the call only affects this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[test]
fn listener_changes_update_the_port_table() {
    let mut x = XdpUnderTest::load();
    let wild: Listener = "*:11211".parse().unwrap();
    let specific: Listener = "203.0.113.1:11300".parse().unwrap();
    let mut wanted: Vec<_> = wild
        .keys()
        .into_iter()
        .map(|k| (k, ListenerValue::default()))
        .collect();
    wanted.push((
        specific.keys()[0],
        ListenerValue {
            tenant: 5,
            flags: 0,
        },
    ));
    x.maps.sync_listeners(&wanted).unwrap();
    x.maps
        .sync_tenant_limits(&[(5, RateLimit::per_second(1, 1))])
        .unwrap();
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    // The specific listener charges its tenant: burst 1.
    expect(
        &x,
        &tcp4(v4(1), 11300, tcp_flags::SYN),
        verdict::PASS,
        admitted(),
    );
    expect(
        &x,
        &tcp4(v4(2), 11300, tcp_flags::SYN),
        verdict::DROP,
        crossed("tenant"),
    );
    // Unprotecting both ports: their SYNs pass unjudged again.
    x.maps.sync_listeners(&[]).unwrap();
    expect(&x, &syn4(v4(1)), verdict::PASS, passed());
    expect(
        &x,
        &tcp4(v4(3), 11300, tcp_flags::SYN),
        verdict::PASS,
        passed(),
    );
    assert!(x.maps.listeners().unwrap().is_empty());
}

// ------------------------------------------------------------ SYN cookies

/// The MSS values a kernel SYN cookie can encode, by family.
const COOKIE_MSS_V4: [u16; 4] = [536, 1300, 1440, 1460];
const COOKIE_MSS_V6: [u16; 4] = [1220, 1420, 1440, 8940];

fn cookies_on(x: &mut XdpUnderTest) {
    set_config(x, |c| c.flags |= CONFIG_SYN_COOKIES);
}

/// A guard with SYN cookies on whose shared budget of sources with no
/// tenant admits one SYN, which `first` spends.
fn spent_shared_budget(first: &[u8]) -> XdpUnderTest {
    let mut x = guard();
    cookies_on(&mut x);
    x.maps
        .sync_tenant_limits(&[(DEFAULT_TENANT, RateLimit::per_second(1, 1))])
        .unwrap();
    expect(&x, first, verdict::PASS, admitted());
    x
}

/// A SYN refused by `budget` and answered with a cookie; `crossing` when
/// the source crosses the budget here.
fn cookied(budget: &str, crossing: bool) -> BTreeMap<&'static str, u64> {
    let mut m = if crossing {
        crossed(budget)
    } else {
        dropped(budget)
    };
    m.insert("cookies_sent", 1);
    m
}

/// An ACK carrying a valid cookie: passed and counted.
fn acked() -> BTreeMap<&'static str, u64> {
    moved(&[("frames", 1), ("passed", 1), ("cookie_acks", 1)])
}

/// The first refused SYN of a listener: passed to the kernel, so that it
/// keeps accepting cookie ACKs.
fn refreshed(budget: &str) -> BTreeMap<&'static str, u64> {
    let mut m = crossed(budget);
    m.insert("cookie_refresh", 1);
    m
}

fn syn4_from(src: Ipv4Addr, sport: u16, seq: u32) -> Vec<u8> {
    let seg = Tcp::syn(sport, PORT, seq).build(src.into(), server4().into(), &[]);
    Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4)
        .build(&Ipv4::new(src, server4(), proto::TCP).build(&seg))
}

fn syn6_from(src: Ipv6Addr, sport: u16, seq: u32) -> Vec<u8> {
    let seg = Tcp::syn(sport, PORT, seq).build(src.into(), server6().into(), &[]);
    Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV6)
        .build(&Ipv6::new(src, server6(), proto::TCP).build(&seg))
}

/// The client's answer to a SYN-ACK: a pure ACK of `cookie`.
fn ack_of(syn: &[u8], cookie: u32) -> Vec<u8> {
    let t = parse_tcp(syn).expect("a TCP frame");
    let mut tcp = Tcp::new(t.src_port, t.dst_port, tcp_flags::ACK);
    tcp.seq = t.seq.wrapping_add(1);
    tcp.ack = cookie.wrapping_add(1);
    let seg = tcp.build(t.src, t.dst, &[]);
    eth_frame(MAC_B, MAC_A, &ip_packet(t.src, t.dst, proto::TCP, &seg))
}

/// Checks that `out` is the SYN-ACK answering `syn`, field by field, and
/// returns its cookie.
#[track_caller]
fn check_synack(syn: &[u8], out: &[u8]) -> u32 {
    let s = parse_tcp(syn).expect("the SYN parses");
    let a = parse_tcp(out).unwrap_or_else(|| panic!("the reply parses: {out:02x?}"));
    // Ethernet: addresses swapped, tags and type kept.
    assert_eq!(out[0..6], syn[6..12], "destination MAC is the SYN's source");
    assert_eq!(out[6..12], syn[0..6], "source MAC is the SYN's destination");
    let tags = tags_len(syn);
    assert_eq!(out[12..14 + tags], syn[12..14 + tags], "tags and type kept");
    let ip = &out[14 + tags..];
    let tcp = if s.src.is_ipv4() {
        assert_eq!(ip[0], 0x45, "IPv4, no options");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 44, "total length");
        assert_eq!(u16::from_be_bytes([ip[6], ip[7]]), 0x4000, "don't fragment");
        assert_eq!(ip[8], 64, "TTL");
        assert_eq!(ip[9], proto::TCP);
        &ip[20..]
    } else {
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 24, "payload length");
        assert_eq!(ip[6], proto::TCP, "no extension headers");
        assert_eq!(ip[7], 64, "hop limit");
        &ip[40..]
    };
    assert_eq!(tcp.len(), 24, "a 24-byte TCP header and nothing after it");
    assert_eq!((a.src, a.dst), (s.dst, s.src), "addresses swapped");
    assert_eq!(
        (a.src_port, a.dst_port),
        (s.dst_port, s.src_port),
        "ports swapped"
    );
    assert_eq!(
        a.flags,
        tcp_flags::SYN | tcp_flags::ACK,
        "SYN|ACK, nothing else"
    );
    assert_eq!(a.ack, s.seq.wrapping_add(1), "acknowledges the SYN");
    assert!(a.checksums_ok, "IP and TCP checksums verify");
    assert_eq!(tcp[12] >> 4, 6, "data offset");
    assert_eq!(u16::from_be_bytes([tcp[14], tcp[15]]), 0xffff, "window");
    assert_eq!(u16::from_be_bytes([tcp[18], tcp[19]]), 0, "urgent pointer");
    assert_eq!(tcp[20..22], [2, 4], "an MSS option");
    let mss = u16::from_be_bytes([tcp[22], tcp[23]]);
    let table = if s.src.is_ipv4() {
        COOKIE_MSS_V4
    } else {
        COOKIE_MSS_V6
    };
    assert!(table.contains(&mss), "MSS {mss} from the cookie's table");
    a.seq
}

fn tags_len(frame: &[u8]) -> usize {
    let mut n = 0;
    while matches!(
        u16::from_be_bytes([frame[12 + n], frame[13 + n]]),
        ETHERTYPE_VLAN | ETHERTYPE_QINQ
    ) {
        n += 4;
    }
    n
}

/// The SYN-ACK's MSS option.
fn synack_mss(out: &[u8]) -> u16 {
    let n = out.len();
    u16::from_be_bytes([out[n - 2], out[n - 1]])
}

#[test]
fn a_spent_shared_budget_answers_unknown_ipv4_sources_with_cookies() {
    let x = spent_shared_budget(&syn4(v4(1)));
    // The first refused SYN goes to the kernel instead.
    expect(&x, &syn4(v4(2)), verdict::PASS, refreshed("tenant"));
    let syn = syn4_from(v4(3), 40_123, 0x1234_5678);
    let (v, moved, out) = x.judge_out(&syn);
    assert_eq!(v, verdict::TX, "counters moved: {moved:?}");
    assert_eq!(moved, cookied("tenant", true));
    let cookie = check_synack(&syn, &out);
    assert_eq!(synack_mss(&out), 1460, "the client's MSS, from the table");
    // The client's ACK carries a cookie the kernel accepts.
    let ack = ack_of(&syn, cookie);
    expect(&x, &ack, verdict::PASS, acked());
    // Another cookie, another source port, another address: not valid.
    for bad in [
        ack_of(&syn, cookie.wrapping_add(1)),
        ack_of(&syn4_from(v4(3), 40_124, 0x1234_5678), cookie),
        ack_of(&syn4_from(v4(4), 40_123, 0x1234_5678), cookie),
    ] {
        expect(&x, &bad, verdict::PASS, passed());
    }
    // Data after the handshake, a FIN, a reset: never checked.
    for flags in [
        tcp_flags::PSH | tcp_flags::ACK,
        tcp_flags::FIN | tcp_flags::ACK,
        tcp_flags::RST | tcp_flags::ACK,
    ] {
        let mut f = ack.clone();
        let at = f.len() - 20 + 13;
        f[at] = flags;
        assert_eq!(x.judge(&f).1, passed(), "flags {flags:#x}");
    }
    // The same source again, while the budget is spent: another cookie,
    // its crossing already reported.
    let again = syn4_from(v4(3), 40_125, 7);
    let (v, moved, out) = x.judge_out(&again);
    assert_eq!((v, moved), (verdict::TX, cookied("tenant", false)));
    check_synack(&again, &out);
}

#[test]
fn a_spent_shared_budget_answers_unknown_ipv6_sources_with_cookies() {
    let x = spent_shared_budget(&syn6(v6("2001:db8:1::1")));
    expect(
        &x,
        &syn6(v6("2001:db8:2::1")),
        verdict::PASS,
        refreshed("tenant"),
    );
    let syn = syn6_from(v6("2001:db8:3::1"), 50_000, 99);
    let (v, moved, out) = x.judge_out(&syn);
    assert_eq!(v, verdict::TX, "counters moved: {moved:?}");
    assert_eq!(moved, cookied("tenant", true));
    let cookie = check_synack(&syn, &out);
    // The IPv6 table's largest below the client's 1460.
    assert_eq!(synack_mss(&out), 1440);
    expect(&x, &ack_of(&syn, cookie), verdict::PASS, acked());
    expect(&x, &ack_of(&syn, cookie ^ 0x100), verdict::PASS, passed());
}

#[test]
fn a_spent_host_budget_answers_unknown_sources_with_cookies() {
    let mut x = guard();
    cookies_on(&mut x);
    set_config(&mut x, |c| c.global = RateLimit::per_second(1, 1));
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(2)), verdict::PASS, refreshed("global"));
    let syn = syn4_from(v4(3), 1_000, 5);
    let (v, moved, out) = x.judge_out(&syn);
    assert_eq!((v, moved), (verdict::TX, cookied("global", true)));
    let cookie = check_synack(&syn, &out);
    assert_eq!(x.judge(&ack_of(&syn, cookie)).1, acked());
    // The IPv6 wildcard is a listener of its own: its refresh first.
    let syn = syn6_from(v6("2001:db8:3::1"), 1_001, 6);
    expect(&x, &syn, verdict::PASS, refreshed("global"));
    let (v, moved, out) = x.judge_out(&syn);
    assert_eq!((v, moved), (verdict::TX, cookied("global", false)));
    let cookie = check_synack(&syn, &out);
    assert_eq!(x.judge(&ack_of(&syn, cookie)).1, acked());
}

#[test]
fn with_cookies_off_a_spent_budget_drops() {
    let mut x = guard();
    x.maps
        .sync_tenant_limits(&[(DEFAULT_TENANT, RateLimit::per_second(1, 1))])
        .unwrap();
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(2)), verdict::DROP, crossed("tenant"));
    expect(&x, &syn4(v4(2)), verdict::DROP, dropped("tenant"));
    expect(&x, &syn4(v4(3)), verdict::DROP, crossed("tenant"));
    // Turned on, the next one is answered (after the listener's refresh).
    cookies_on(&mut x);
    expect(&x, &syn4(v4(4)), verdict::PASS, refreshed("tenant"));
    assert_eq!(x.judge(&syn4(v4(5))).0, verdict::TX);
}

#[test]
fn tenants_allowed_sources_and_spent_source_buckets_get_no_cookies() {
    let tenant = 77;
    let mut x = guard();
    cookies_on(&mut x);
    set_config(&mut x, |c| c.source = RateLimit::per_second(1, 1));
    x.maps
        .sync_tenant_limits(&[
            (tenant, RateLimit::per_second(1, 1)),
            (DEFAULT_TENANT, RateLimit::per_second(1, 1)),
        ])
        .unwrap();
    // Spend the shared budget and the listener's refresh.
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(2)), verdict::PASS, refreshed("tenant"));
    assert_eq!(x.judge(&syn4(v4(3))).0, verdict::TX, "cookies are on");
    // A source's own bucket: its drops stay drops (its crossing of the
    // shared budget was reported a moment ago).
    expect(&x, &syn4(v4(3)), verdict::DROP, dropped("source"));
    // A source of a tenant, refused by its tenant's budget: dropped.
    x.maps
        .set_source_tenant(IpAddr::V4(v4(10)), tenant)
        .unwrap();
    x.maps
        .set_source_tenant(IpAddr::V4(v4(11)), tenant)
        .unwrap();
    expect(&x, &syn4(v4(10)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(11)), verdict::DROP, crossed("tenant"));
    // Allowed: passed uncharged, as ever.
    x.maps
        .add_cidr(CidrList::Allow, "198.51.100.70/32".parse().unwrap(), None)
        .unwrap();
    expect(
        &x,
        &syn4(v4(70)),
        verdict::PASS,
        moved(&[("frames", 1), ("judged", 1), ("allowed", 1)]),
    );
    // A tenant's source refused by the host's budget: dropped.
    let mut y = guard();
    cookies_on(&mut y);
    set_config(&mut y, |c| c.global = RateLimit::per_second(1, 1));
    y.maps
        .set_source_tenant(IpAddr::V4(v4(10)), tenant)
        .unwrap();
    expect(&y, &syn4(v4(1)), verdict::PASS, admitted());
    expect(&y, &syn4(v4(10)), verdict::DROP, crossed("global"));
    // A tenant's own listener: its SYNs are the tenant's, never cookies.
    let mut z = XdpUnderTest::load();
    cookies_on(&mut z);
    let l: Listener = "*:11211".parse().unwrap();
    let wanted: Vec<_> = l
        .keys()
        .into_iter()
        .map(|k| (k, ListenerValue { tenant, flags: 0 }))
        .collect();
    z.maps.sync_listeners(&wanted).unwrap();
    z.maps
        .sync_tenant_limits(&[(tenant, RateLimit::per_second(1, 1))])
        .unwrap();
    expect(&z, &syn4(v4(1)), verdict::PASS, admitted());
    expect(&z, &syn4(v4(2)), verdict::DROP, crossed("tenant"));
    expect(&z, &syn4(v4(3)), verdict::DROP, crossed("tenant"));
}

#[test]
fn syns_a_cookie_cannot_answer_are_dropped_and_counted() {
    let x = spent_shared_budget(&syn4(v4(1)));
    expect(&x, &syn4(v4(2)), verdict::PASS, refreshed("tenant"));
    let mut unanswerable = crossed("tenant");
    unanswerable.insert("cookie_unanswerable", 1);
    // IPv4 options.
    let mut ip = Ipv4::new(v4(3), server4(), proto::TCP);
    ip.options = ipv4_opt::router_alert();
    let seg = Tcp::syn(1, PORT, 1).build(v4(3).into(), server4().into(), &[]);
    let f = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4).build(&ip.build(&seg));
    expect(&x, &f, verdict::DROP, unanswerable.clone());
    // An IPv6 extension header (after the IPv6 listener's refresh).
    expect(
        &x,
        &syn6(v6("2001:db8:9::1")),
        verdict::PASS,
        refreshed("tenant"),
    );
    let src = v6("2001:db8:3::1");
    let ip = Ipv6::new(src, server6(), proto::TCP).with_ext(Ipv6Ext::DestOpts(ipv6_opt::padn(6)));
    expect(&x, &syn6_with(src, ip), verdict::DROP, unanswerable.clone());
    // A data offset below 5.
    let mut tcp = Tcp::syn(1, PORT, 1);
    tcp.data_offset = Some(4);
    let seg = tcp.build(v4(4).into(), server4().into(), &[]);
    let f = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4)
        .build(&Ipv4::new(v4(4), server4(), proto::TCP).build(&seg));
    expect(&x, &f, verdict::DROP, unanswerable);
}

#[test]
fn a_syn_without_options_or_behind_vlan_tags_is_answered() {
    let x = spent_shared_budget(&syn4(v4(1)));
    expect(&x, &syn4(v4(2)), verdict::PASS, refreshed("tenant"));
    // No options at all: the frame grows by the MSS option, and the cookie
    // encodes the default MSS.
    let mut tcp = Tcp::new(3_333, PORT, tcp_flags::SYN);
    tcp.seq = 77;
    let seg = tcp.build(v4(3).into(), server4().into(), &[]);
    let syn = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4)
        .build(&Ipv4::new(v4(3), server4(), proto::TCP).build(&seg));
    let (v, _, out) = x.judge_out(&syn);
    assert_eq!(v, verdict::TX);
    let cookie = check_synack(&syn, &out);
    assert_eq!(synack_mss(&out), 536);
    assert_eq!(x.judge(&ack_of(&syn, cookie)).1["cookie_acks"], 1);
    // Only an MSS option, of 1400: the table's 1300. QinQ-tagged, and
    // padded to Ethernet's minimum.
    let mut tcp = Tcp::new(3_334, PORT, tcp_flags::SYN);
    tcp.options = tcp_opt::mss(1400);
    let seg = tcp.build(v4(4).into(), server4().into(), &[]);
    let mut syn = tagged(
        &[Vlan::dot1ad(100), Vlan::dot1q(10)],
        ETHERTYPE_IPV4,
        &Ipv4::new(v4(4), server4(), proto::TCP).build(&seg),
    );
    syn.resize(syn.len() + 6, 0);
    let (v, _, out) = x.judge_out(&syn);
    assert_eq!(v, verdict::TX);
    syn.truncate(syn.len() - 6);
    check_synack(&syn, &out);
    assert_eq!(synack_mss(&out), 1300);
}

/// Opens one of the program's pinned maps by name.
fn pinned_map<T: TryFrom<aya::maps::Map>>(x: &XdpUnderTest, name: &str) -> T
where
    <T as TryFrom<aya::maps::Map>>::Error: std::fmt::Debug,
{
    use aya::maps::{Map, MapData};
    let pin = x.paths().map_pin(name);
    Map::from_map_data(MapData::from_pin(&pin).unwrap())
        .unwrap()
        .try_into()
        .unwrap()
}

#[test]
fn each_listener_lets_one_refused_syn_through_a_second() {
    use aya::maps::HashMap as AyaHashMap;
    let mut x = spent_shared_budget(&syn4(v4(1)));
    // Another protected listener, on a specific address: its own refresh.
    let specific: Listener = "203.0.113.1:11300".parse().unwrap();
    let wild: Listener = "*:11211".parse().unwrap();
    let mut wanted: Vec<_> = wild
        .keys()
        .into_iter()
        .map(|k| (k, ListenerValue::default()))
        .collect();
    wanted.push((specific.keys()[0], ListenerValue::default()));
    x.maps.sync_listeners(&wanted).unwrap();
    expect(&x, &syn4(v4(2)), verdict::PASS, refreshed("tenant"));
    assert_eq!(x.run(&syn4(v4(3))), verdict::TX);
    let other = tcp4(v4(4), 11300, tcp_flags::SYN);
    assert_eq!(x.judge(&other).1.get("cookie_refresh"), Some(&1));
    assert_eq!(x.run(&tcp4(v4(5), 11300, tcp_flags::SYN)), verdict::TX);
    // An interval later (the listener's record set back), once more.
    let mut refresh: AyaHashMap<_, ListenerKey, u64> =
        pinned_map(&x, guard_common::maps::COOKIE_REFRESH);
    let keys: Vec<ListenerKey> = refresh.keys().map(Result::unwrap).collect();
    assert_eq!(keys.len(), 2, "one record per listener entry: {keys:?}");
    assert!(keys.contains(&specific.keys()[0]), "{keys:?}");
    let wildcard = wild.keys()[0];
    assert!(keys.contains(&wildcard), "{keys:?}");
    let interval_ago = monotonic_ns() - COOKIE_REFRESH_INTERVAL_NS - 100_000_000;
    refresh.insert(wildcard, interval_ago, 0).unwrap();
    expect(&x, &syn4(v4(6)), verdict::PASS, refreshed("tenant"));
    assert_eq!(x.run(&syn4(v4(7))), verdict::TX);
    // Just short of an interval after the last: not yet.
    let not_yet = monotonic_ns() - COOKIE_REFRESH_INTERVAL_NS + 300_000_000;
    refresh.insert(wildcard, not_yet, 0).unwrap();
    assert_eq!(x.run(&syn4(v4(8))), verdict::TX);
}

#[test]
fn acks_are_checked_only_shortly_after_a_cookie_was_sent() {
    use aya::maps::Array as AyaArray;
    let x = spent_shared_budget(&syn4(v4(1)));
    expect(&x, &syn4(v4(2)), verdict::PASS, refreshed("tenant"));
    let syn = syn4_from(v4(3), 40_000, 1);
    let (v, _, out) = x.judge_out(&syn);
    assert_eq!(v, verdict::TX);
    let ack = ack_of(&syn, check_synack(&syn, &out));
    // A guard that sent no cookie does not check, however valid the cookie.
    let y = guard();
    expect(&y, &ack, verdict::PASS, passed());
    // Nor does this one once the last cookie is older than the window.
    let mut clock: AyaArray<_, u64> = pinned_map(&x, guard_common::maps::COOKIE_CLOCK);
    let sent = clock.get(&0, 0).unwrap();
    assert!(sent != 0, "the time of the last cookie is kept");
    clock
        .set(0, monotonic_ns() - COOKIE_ACK_WINDOW_NS - 1_000_000_000, 0)
        .unwrap();
    expect(&x, &ack, verdict::PASS, passed());
    clock.set(0, sent, 0).unwrap();
    assert_eq!(x.judge(&ack).1["cookie_acks"], 1);
    // Nor for an unprotected port.
    let seg = {
        let mut t = Tcp::new(40_000, 22, tcp_flags::ACK);
        t.seq = 2;
        t.ack = 3;
        t.build(v4(3).into(), server4().into(), &[])
    };
    let f = Ethernet::new(MAC_B, MAC_A, ETHERTYPE_IPV4)
        .build(&Ipv4::new(v4(3), server4(), proto::TCP).build(&seg));
    expect(&x, &f, verdict::PASS, passed());
}

/// Mode `on`: the shared budget admits nothing, so every SYN of a source
/// with no tenant is answered with a cookie and none charges the host's
/// budget, which stays a tenant's. Back to a real budget, the shared bucket
/// admits again at once.
#[test]
fn with_a_shared_budget_that_admits_nothing_unknown_sources_never_charge_the_host() {
    let tenant = 77;
    let mut x = guard();
    cookies_on(&mut x);
    set_config(&mut x, |c| c.global = RateLimit::per_second(1, 1));
    x.maps
        .sync_tenant_limits(&[
            (DEFAULT_TENANT, RateLimit::NOTHING),
            (tenant, RateLimit::UNLIMITED),
        ])
        .unwrap();
    // Its one SYN, once: the host's one token goes with it.
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(2)), verdict::PASS, refreshed("tenant"));
    for i in 3..20 {
        let (v, moved, out) = x.judge_out(&syn4(v4(i)));
        assert_eq!(v, verdict::TX, "{moved:?}");
        check_synack(&syn4(v4(i)), &out);
    }
    // A tenant's source is judged by the host's budget alone: refilled
    // after a second, untouched by all those cookies.
    x.maps
        .set_source_tenant(IpAddr::V4(v4(50)), tenant)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1_100));
    expect(&x, &syn4(v4(50)), verdict::PASS, admitted());
    // From `on` back to a budget: admitted again at once, not in a century.
    set_config(&mut x, |c| c.global = RateLimit::UNLIMITED);
    x.maps
        .sync_tenant_limits(&[(DEFAULT_TENANT, RateLimit::per_second(100, 10))])
        .unwrap();
    expect(&x, &syn4(v4(60)), verdict::PASS, admitted());
}

/// The escalation ladder's stricter budget: while the daemon's entry for a
/// source lasts, that source's own bucket is charged with it instead of the
/// per-source budget; other sources, and the same source once the entry
/// has expired, are charged as before.
#[test]
fn a_strict_entry_cuts_its_source_to_the_strict_rate_until_it_expires() {
    use guard::ebpf::maps::monotonic_ns;
    let mut x = guard();
    // A generous per-source budget: 1,000/s, burst 100.
    set_config(&mut x, |c| c.source = RateLimit::per_second(1_000, 100));
    let strict = RateLimit::per_second(1, 2);
    let hour = monotonic_ns() + 3_600_000_000_000;
    x.maps.set_strict(IpAddr::V4(v4(1)), strict, hour).unwrap();
    // The strict source: its burst of 2, then dropped by its own bucket.
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(1)), verdict::DROP, crossed("source"));
    for _ in 0..20 {
        expect(&x, &syn4(v4(1)), verdict::DROP, dropped("source"));
    }
    // Another source keeps the per-source budget.
    for _ in 0..50 {
        expect(&x, &syn4(v4(2)), verdict::PASS, admitted());
    }
    // IPv6: one entry covers the source's /64, as its bucket does.
    x.maps
        .set_strict(IpAddr::V6(v6("2001:db8:5:6::1")), strict, hour)
        .unwrap();
    expect(&x, &syn6(v6("2001:db8:5:6::aa")), verdict::PASS, admitted());
    expect(&x, &syn6(v6("2001:db8:5:6::bb")), verdict::PASS, admitted());
    expect(
        &x,
        &syn6(v6("2001:db8:5:6::cc")),
        verdict::DROP,
        crossed("source"),
    );
    expect(&x, &syn6(v6("2001:db8:5:7::1")), verdict::PASS, admitted());
    // The daemon clears the map's flag only once the map is empty: the
    // entries still apply after a refresh.
    let has =
        |x: &XdpUnderTest| x.maps.config().unwrap().flags & guard_common::CONFIG_HAS_STRICT != 0;
    x.maps.refresh_flags().unwrap();
    assert!(has(&x));
    assert_eq!(x.run(&syn6(v6("2001:db8:5:6::dd"))), verdict::DROP);

    // An expired entry no longer applies, before the daemon removes it:
    // the per-source budget, far above the strict burst of 2.
    x.maps
        .set_strict(IpAddr::V4(v4(3)), strict, monotonic_ns() - 1)
        .unwrap();
    for _ in 0..50 {
        expect(&x, &syn4(v4(3)), verdict::PASS, admitted());
    }
    // A source whose strict step ends keeps its bucket: it spent two
    // seconds of the strict rate, so the per-source budget admits it again
    // once less than its own burst (99 ms at 1,000/s) is left of them, as
    // after any budget is raised.
    x.maps
        .set_strict(IpAddr::V4(v4(1)), strict, monotonic_ns() - 1)
        .unwrap();
    expect(&x, &syn4(v4(1)), verdict::DROP, dropped("source"));
    assert!(x.maps.remove_strict(IpAddr::V4(v4(1))).unwrap());
    assert!(!x.maps.remove_strict(IpAddr::V4(v4(1))).unwrap());
    assert!(x.maps.remove_strict(IpAddr::V4(v4(3))).unwrap());
    let back = Instant::now();
    while x.run(&syn4(v4(1))) == verdict::DROP {
        assert!(
            back.elapsed() < Duration::from_secs(3),
            "the per-source budget never came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Then it refills at the per-source rate: its whole burst in 100 ms.
    std::thread::sleep(Duration::from_millis(150));
    for _ in 0..50 {
        expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    }
    // Only the IPv6 entry is left; an empty map is not looked up.
    assert_eq!(x.maps.strict_entries().unwrap().len(), 1);
    assert!(
        x.maps
            .remove_strict(IpAddr::V6(v6("2001:db8:5:6::1")))
            .unwrap()
    );
    x.maps.refresh_flags().unwrap();
    assert!(!has(&x), "the flag is cleared once the map is empty");
}

/// A strict entry is the source's own budget whatever the per-source one
/// says, unlimited included.
#[test]
fn a_strict_entry_applies_with_unlimited_per_source_syns() {
    use guard::ebpf::maps::monotonic_ns;
    let mut x = guard();
    set_config(&mut x, |c| {
        c.source = RateLimit::UNLIMITED;
    });
    x.maps
        .set_strict(
            IpAddr::V4(v4(7)),
            RateLimit::per_second(1, 1),
            monotonic_ns() + 60_000_000_000,
        )
        .unwrap();
    expect(&x, &syn4(v4(7)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(7)), verdict::DROP, crossed("source"));
    for _ in 0..10 {
        expect(&x, &syn4(v4(8)), verdict::PASS, admitted());
    }
    // Entries reach the program through the flag set before them.
    assert_ne!(
        x.maps.config().unwrap().flags & guard_common::CONFIG_HAS_STRICT,
        0
    );
}

/// Frames are counted in the slot of the interface they came in on
/// (`ingress_ifindex % IFACE_SLOTS`), and the host's totals are the sum of
/// the slots. Two real interfaces (a veth pair in a namespace of this
/// test, each with a native XDP program so that its queue has the receive
/// state `BPF_PROG_TEST_RUN` wants) stand in for two NICs.
#[test]
fn counters_are_kept_per_interface_and_sum_to_the_hosts_totals() {
    use guard_common::{Counter, IFACE_SLOTS};
    use guard_tests::{EndAddrs, NetNs, VethPair};

    let mut x = guard();
    let ns = NetNs::new("ifslot").expect("namespace");
    let end = |n: u8| EndAddrs {
        v4: Ipv4Addr::new(10, 99, 0, n),
        v6: v6(&format!("fd00:99::{n}")),
    };
    let pair = VethPair::new(&ns, end(1), &ns, end(2)).expect("veth pair");
    let (a, b) = (pair.a.ifindex, pair.b.ifindex);
    assert_ne!(a % IFACE_SLOTS, b % IFACE_SLOTS, "indexes {a} and {b}");
    x.attach_pass(&ns, &pair.a.ifname).expect("XDP on a");
    x.attach_pass(&ns, &pair.b.ifname).expect("XDP on b");
    let before = x.maps.counter_totals().unwrap();
    let x = &x;
    ns.run_in(move || {
        assert_eq!(x.run_on(a, &syn4(v4(1))), verdict::PASS);
        assert_eq!(x.run_on(a, &syn4(v4(2))), verdict::PASS);
        assert_eq!(
            x.run_on(b, &tcp4(v4(3), PORT, tcp_flags::ACK)),
            verdict::PASS
        );
    })
    .expect("run in the namespace");
    let slots: BTreeMap<u32, _> = x.maps.counter_slots().unwrap().into_iter().collect();
    let at = |index: u32, c: Counter| {
        slots
            .get(&(index % IFACE_SLOTS))
            .map_or(0, |s| s[c as usize])
    };
    assert_eq!(at(a, Counter::Frames), 2);
    assert_eq!(at(a, Counter::Judged), 2);
    assert_eq!(at(a, Counter::Admitted), 2);
    assert_eq!(at(b, Counter::Frames), 1);
    assert_eq!(at(b, Counter::Passed), 1);
    assert_eq!(at(b, Counter::Judged), 0);
    let after = x.maps.counter_totals().unwrap();
    assert_eq!(
        after[Counter::Frames as usize] - before[Counter::Frames as usize],
        3
    );
    assert_eq!(
        after[Counter::Judged as usize] - before[Counter::Judged as usize],
        2
    );
}

/// A SYN a tenant's budget refuses, or the host's after the tenant's
/// admitted it, is counted at the tenant's slot; a tenant keeps its slot
/// across syncs and a newcomer taking a removed tenant's slot starts at 0.
#[test]
fn syn_drops_are_counted_per_tenant() {
    let mut x = guard();
    let (a, b, c) = (77, 78, 79);
    let unlimited = RateLimit::UNLIMITED;
    x.maps
        .sync_tenant_limits(&[
            (a, RateLimit::per_second(1, 2)),
            (DEFAULT_TENANT, RateLimit::per_second(1, 1)),
            (b, unlimited),
        ])
        .unwrap();
    x.maps.set_source_tenant(IpAddr::V4(v4(10)), a).unwrap();
    x.maps.set_source_tenant(IpAddr::V4(v4(40)), b).unwrap();
    x.maps.set_source_tenant(IpAddr::V4(v4(41)), b).unwrap();
    // a's burst of 2, then its budget refuses.
    expect(&x, &syn4(v4(10)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(10)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(10)), verdict::DROP, crossed("tenant"));
    // Sources with no tenant: the shared budget's burst of 1.
    expect(&x, &syn4(v4(20)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(21)), verdict::DROP, crossed("tenant"));
    // b is unlimited; the host's budget of 1 refuses its second SYN.
    set_config(&mut x, |c| c.global = RateLimit::per_second(1, 1));
    expect(&x, &syn4(v4(40)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(41)), verdict::DROP, crossed("global"));
    // A source-budget drop is nobody's (not b's, whose source it is).
    x.maps.set_source_tenant(IpAddr::V4(v4(50)), b).unwrap();
    set_config(&mut x, |c| {
        c.global = unlimited;
        c.source = RateLimit::per_second(1, 1);
    });
    expect(&x, &syn4(v4(50)), verdict::PASS, admitted());
    expect(&x, &syn4(v4(50)), verdict::DROP, crossed("source"));

    let drops = x.maps.tenant_drops().unwrap();
    let got = |t: u32| drops.get(&t).map(|d| (d.tenant, d.global));
    assert_eq!(got(a), Some((1, 0)));
    assert_eq!(got(DEFAULT_TENANT), Some((1, 0)));
    assert_eq!(got(b), Some((0, 1)));

    // a leaves, c arrives in its slot: c starts from nothing, b keeps its
    // count.
    x.maps
        .sync_tenant_limits(&[
            (DEFAULT_TENANT, RateLimit::per_second(1, 1)),
            (b, unlimited),
            (c, RateLimit::per_second(1, 1)),
        ])
        .unwrap();
    let drops = x.maps.tenant_drops().unwrap();
    let got = |t: u32| drops.get(&t).map(|d| (d.tenant, d.global));
    assert_eq!(got(a), None);
    assert_eq!(got(c), Some((0, 0)));
    assert_eq!(got(b), Some((0, 1)));
    assert_eq!(got(DEFAULT_TENANT), Some((1, 0)));
}

/// How many sources have a SYN bucket.
fn source_buckets(x: &XdpUnderTest) -> usize {
    let path = x.paths().map_pin(guard_common::maps::SOURCE_BUCKETS);
    let data = aya::maps::MapData::from_pin(&path).expect("the per-source map is pinned");
    let map: aya::maps::HashMap<_, guard_common::SourceKey, guard_common::BucketState> =
        aya::maps::Map::from_map_data(data)
            .unwrap()
            .try_into()
            .unwrap();
    map.keys().filter_map(Result::ok).count()
}

/// A flood of new sources that the shared budget refuses (cookies off)
/// leaves no per-source state behind, so it never evicts a known source's
/// bucket: only admitted and reported sources get one. With cookies on,
/// each answered source is charged, as the cookie tests above require.
#[test]
fn refused_new_sources_leave_no_source_state() {
    let mut x = guard();
    set_config(&mut x, |c| {
        c.source = RateLimit::per_second(50, 100);
        // One crossing described; the rest only counted.
        c.events = RateLimit::per_second(1, 1);
    });
    x.maps
        .sync_tenant_limits(&[(DEFAULT_TENANT, RateLimit::per_second(1, 1))])
        .unwrap();
    expect(&x, &syn4(v4(1)), verdict::PASS, admitted());
    assert_eq!(source_buckets(&x), 1, "the admitted source has a bucket");
    let new = |i: u32| syn4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i));
    for i in 0..200 {
        assert_eq!(x.run(&new(i)), verdict::DROP, "the shared budget is spent");
    }
    assert_eq!(
        source_buckets(&x),
        2,
        "the admitted source and the one reported crossing, not 200 refused sources"
    );
    // A known source is judged as before: its own bucket, then the
    // shared budget.
    assert_eq!(x.run(&syn4(v4(1))), verdict::DROP);

    // The first may be let through to refresh the listener's cookies.
    cookies_on(&mut x);
    let answered = (1000..1010)
        .filter(|i| x.run(&new(*i)) == verdict::TX)
        .count();
    assert!(answered >= 9, "cookies answer refused new sources");
    assert_eq!(source_buckets(&x), 12, "answered sources are charged");
}
