//! The same scripted sessions against memcached directly and through guard
//! (one backend each, both fresh, so even CAS uniques agree): the replies
//! must be byte-for-byte equal. guard's own answers (version, stats) are
//! left out of the scripts on purpose.

mod common;

use std::net::SocketAddr;

use common::{Client, GuardProxy, Memcached, bin, config};

/// Sends each text/meta step followed by `mn`, and records the reply up to
/// `MN`, so replies (or their absence, for noreply and quiet modes) line up.
fn run_text(addr: SocketAddr, script: &[&[u8]]) -> Vec<(String, String)> {
    let mut c = Client::connect(addr);
    script
        .iter()
        .map(|step| {
            c.send(step);
            c.send(b"mn\r\n");
            let own = step.windows(4).filter(|w| *w == b"mn\r\n").count();
            let reply = c.read_until_count(b"MN\r\n", own + 1);
            (
                String::from_utf8_lossy(step).into_owned(),
                String::from_utf8_lossy(&reply).into_owned(),
            )
        })
        .collect()
}

fn compare_text(script: &[&[u8]]) {
    let direct_mc = Memcached::start();
    let proxied_mc = Memcached::start();
    let guard = GuardProxy::start(config(&[&proxied_mc]));
    let direct = run_text(direct_mc.addr(), script);
    let proxied = run_text(guard.addr, script);
    for (d, p) in direct.iter().zip(&proxied) {
        assert_eq!(d, p, "step {:?}", d.0);
    }
}

#[test]
fn text_protocol_matches_memcached() {
    compare_text(&[
        b"set a 5 0 3\r\nabc\r\n",
        b"get a\r\n",
        b"add a 0 0 1\r\nx\r\n",
        b"add b 1 0 2\r\nbb\r\n",
        b"replace c 0 0 1\r\nc\r\n",
        b"replace b 2 0 3\r\nbbb\r\n",
        b"append b 0 0 2\r\n__\r\n",
        b"prepend b 0 0 2\r\n^^\r\n",
        b"append nokey 0 0 1\r\nx\r\n",
        b"prepend nokey 0 0 1\r\nx\r\n",
        b"get b\r\n",
        b"gets a b nokey\r\n",
        b"cas a 0 0 1 999\r\nz\r\n",
        b"cas nokey 0 0 1 1\r\nz\r\n",
        b"cas a 7 0 1 1\r\nz\r\n",
        b"gets a\r\n",
        b"set n 0 0 2\r\n10\r\n",
        b"incr n 5\r\n",
        b"decr n 100\r\n",
        b"incr n 18446744073709551615\r\n",
        b"incr nokey 1\r\n",
        b"decr nokey 1\r\n",
        b"incr b 1\r\n",
        b"set q 0 0 1 noreply\r\nq\r\n",
        b"get q\r\n",
        b"add q 0 0 1 noreply\r\nx\r\n",
        b"replace q 3 0 1 noreply\r\nr\r\n",
        b"append q 0 0 1 noreply\r\n+\r\n",
        b"prepend q 0 0 1 noreply\r\n-\r\n",
        b"cas q 0 0 1 1 noreply\r\nc\r\n",
        b"gets q\r\n",
        b"incr n 1 noreply\r\n",
        b"decr n 1 noreply\r\n",
        b"touch q 100 noreply\r\n",
        b"delete q noreply\r\n",
        b"get q n\r\n",
        b"touch a 100\r\n",
        b"touch nokey 100\r\n",
        b"gat 100 a b nokey\r\n",
        b"gats 200 a\r\n",
        b"gat 0 nokey\r\n",
        b"delete a\r\n",
        b"delete a\r\n",
        b"delete b 0\r\n",
        b"get a b n\r\n",
        b"set expired 0 -1 1\r\nx\r\n",
        b"get expired\r\n",
        b"set big 0 0 0\r\n\r\n",
        b"get big\r\n",
        b"get a a a\r\n",
        b"bogus command\r\n",
        b"get\r\n",
        b"delete a b c\r\n",
        b"incr n abc\r\n",
        b"verbosity 1\r\n",
    ]);
}

#[test]
fn meta_protocol_matches_memcached() {
    compare_text(&[
        b"ms m1 3 T0 F7\r\nabc\r\n",
        b"mg m1 v f c k O123\r\n",
        b"mg m1 v\r\n",
        b"mg m1 t f\r\n",
        b"mg m1\r\n",
        b"mg missing v\r\n",
        b"mg missing v q\r\n",
        b"mg missing v k O5\r\n",
        b"mg m1 v q k O77\r\n",
        b"ms m1 2 MA\r\nde\r\n",
        b"ms m1 2 MP\r\nxx\r\n",
        b"mg m1 v\r\n",
        b"ms m2 1 ME\r\nx\r\n",
        b"ms m2 1 ME\r\ny\r\n",
        b"ms m3 1 MR\r\nz\r\n",
        b"ms m2 1 MR c\r\nw\r\n",
        b"ms m1 1 C999\r\nq\r\n",
        b"ms nokey 1 C1\r\nq\r\n",
        b"ms m1 1 q\r\nq\r\n",
        b"ms m1 1 q MR\r\nr\r\n",
        b"ms nokey 1 q MR\r\nr\r\n",
        b"mg m1 v c\r\n",
        b"md m2\r\n",
        b"md m2\r\n",
        b"md m2 q\r\n",
        b"md m1 q\r\n",
        b"ma cnt\r\n",
        b"ma cnt q\r\n",
        b"ma cnt N0 J10 v\r\n",
        b"ma cnt v D5\r\n",
        b"ma cnt v MD D100\r\n",
        b"ma cnt q D2\r\n",
        b"ma cnt v t\r\n",
        b"ms m5 2\r\nhi\r\n",
        b"ma m5 v\r\n",
        b"ms bWtleQ== 2 b\r\nhi\r\n",
        b"mg bWtleQ== b v k\r\n",
        b"mg mkey v k\r\n",
        b"mn\r\n",
        b"mg a v q\r\nmg b v q\r\nmg m5 v q k\r\nmn\r\n",
        b"ms m6 2 T0 I\r\nhi\r\n",
        b"mg m6 v\r\n",
        b"mg m1 zz\r\n",
        b"ms m1 2 MX\r\nhi\r\n",
        b"ma m1 MX\r\n",
    ]);
}

fn run_binary(addr: SocketAddr, script: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut c = Client::connect(addr);
    script
        .iter()
        .map(|step| {
            c.send(step);
            c.send(&bin(0x0a, b"", b"", b"", 0, 0xffff_ffff));
            c.read_binary_until(0xffff_ffff)
        })
        .collect()
}

fn store_extras(flags: u32, exptime: u32) -> Vec<u8> {
    [flags.to_be_bytes(), exptime.to_be_bytes()].concat()
}

fn arith_extras(delta: u64, initial: u64, exptime: u32) -> Vec<u8> {
    [
        &delta.to_be_bytes()[..],
        &initial.to_be_bytes(),
        &exptime.to_be_bytes(),
    ]
    .concat()
}

#[test]
fn binary_protocol_matches_memcached() {
    const GET: u8 = 0x00;
    const SET: u8 = 0x01;
    const ADD: u8 = 0x02;
    const REPLACE: u8 = 0x03;
    const DELETE: u8 = 0x04;
    const INCR: u8 = 0x05;
    const DECR: u8 = 0x06;
    const GETQ: u8 = 0x09;
    const NOOP: u8 = 0x0a;
    const GETK: u8 = 0x0c;
    const GETKQ: u8 = 0x0d;
    const APPEND: u8 = 0x0e;
    const PREPEND: u8 = 0x0f;
    const SETQ: u8 = 0x11;
    const ADDQ: u8 = 0x12;
    const DELETEQ: u8 = 0x14;
    const INCRQ: u8 = 0x15;
    const APPENDQ: u8 = 0x19;
    const TOUCH: u8 = 0x1c;
    const GAT: u8 = 0x1d;
    const GATQ: u8 = 0x1e;
    const GATK: u8 = 0x23;
    let se = store_extras(0xdead_beef, 0);
    let script: Vec<Vec<u8>> = vec![
        bin(SET, b"k1", &se, b"v1", 0, 1),
        bin(GET, b"k1", b"", b"", 0, 2),
        bin(GETK, b"k1", b"", b"", 0, 3),
        bin(GET, b"nokey", b"", b"", 0, 4),
        bin(GETK, b"nokey", b"", b"", 0, 5),
        [
            bin(GETQ, b"nokey", b"", b"", 0, 6),
            bin(GETKQ, b"k1", b"", b"", 0, 7),
            bin(GETQ, b"k1", b"", b"", 0, 8),
            bin(GETKQ, b"nokey", b"", b"", 0, 9),
            bin(NOOP, b"", b"", b"", 0, 10),
        ]
        .concat(),
        bin(ADD, b"k1", &se, b"x", 0, 11),
        bin(ADD, b"k2", &store_extras(2, 0), b"two", 0, 12),
        bin(REPLACE, b"k3", &se, b"x", 0, 13),
        bin(REPLACE, b"k2", &store_extras(3, 0), b"TWO", 0, 14),
        bin(SET, b"k1", &se, b"x", 999, 15),
        bin(SET, b"k1", &se, b"v1-cas", 1, 16),
        bin(APPEND, b"k1", b"", b"++", 0, 17),
        bin(PREPEND, b"k1", b"", b"--", 0, 18),
        bin(GET, b"k1", b"", b"", 0, 19),
        bin(APPEND, b"nokey", b"", b"++", 0, 20),
        bin(DELETE, b"k2", b"", b"", 0, 21),
        bin(DELETE, b"k2", b"", b"", 0, 22),
        bin(INCR, b"cnt", b"", b"", 0, 0)
            .split_off(0)
            .into_iter()
            .take(0)
            .collect(),
        bin(INCR, b"cnt", &arith_extras(5, 10, 0), b"", 0, 23),
        bin(INCR, b"cnt", &arith_extras(5, 10, 0), b"", 0, 24),
        bin(DECR, b"cnt", &arith_extras(100, 10, 0), b"", 0, 25),
        bin(INCR, b"nocnt", &arith_extras(1, 0, u32::MAX), b"", 0, 26),
        bin(INCR, b"k1", &arith_extras(1, 0, 0), b"", 0, 27),
        bin(TOUCH, b"k1", &100u32.to_be_bytes(), b"", 0, 28),
        bin(TOUCH, b"nokey", &100u32.to_be_bytes(), b"", 0, 29),
        bin(GAT, b"k1", &200u32.to_be_bytes(), b"", 0, 30),
        bin(GATK, b"k1", &200u32.to_be_bytes(), b"", 0, 31),
        bin(GAT, b"nokey", &200u32.to_be_bytes(), b"", 0, 32),
        [
            bin(SETQ, b"k5", &se, b"five", 0, 33),
            bin(ADDQ, b"k5", &se, b"again", 0, 34),
            bin(GETQ, b"k5", b"", b"", 0, 35),
            bin(APPENDQ, b"k5", b"", b"!", 0, 36),
            bin(GATQ, b"k5", &0u32.to_be_bytes(), b"", 0, 37),
            bin(INCRQ, b"cnt", &arith_extras(1, 0, 0), b"", 0, 38),
            bin(DELETEQ, b"k5", b"", b"", 0, 39),
            bin(DELETEQ, b"k5", b"", b"", 0, 40),
            bin(NOOP, b"", b"", b"", 0, 41),
        ]
        .concat(),
        bin(GET, b"cnt", b"", b"", 0, 42),
    ];
    let script: Vec<Vec<u8>> = script.into_iter().filter(|s| !s.is_empty()).collect();
    let direct_mc = Memcached::start();
    let proxied_mc = Memcached::start();
    let guard = GuardProxy::start(config(&[&proxied_mc]));
    let direct = run_binary(direct_mc.addr(), &script);
    let proxied = run_binary(guard.addr, &script);
    for (i, (d, p)) in direct.iter().zip(&proxied).enumerate() {
        assert_eq!(
            d,
            p,
            "step {i}: {:02x?}",
            &script[i][..script[i].len().min(24)]
        );
    }
}
