//! The same scripted sessions against memcached directly and through guard
//! (one backend each, both fresh, so even CAS uniques agree): the replies
//! must be byte-for-byte equal. guard's own answers (version, stats,
//! stats settings) are checked for their form instead, and what guard
//! refuses (memcached's administrative commands) for its exact words.

mod common;

use std::net::SocketAddr;

use common::{Client, GuardProxy, Memcached, bin, config};
use guard::config::ProxyConfig;

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

/// `stats` groups, `verbosity` and memcached's administrative commands
/// where guard answers as memcached does: malformed lines (memcached's
/// `ERROR` and usage errors), errors a last `noreply` silences, unknown
/// groups, `stats reset`, and `bget`. Each line was checked by hand
/// against memcached 1.6.18 too; the replies are compared byte for byte.
#[test]
fn server_commands_match_memcached_where_guard_answers_them() {
    compare_text(&[
        // The levels all leave memcached at 0: a verbose backend would
        // log every command to the test's stderr.
        b"verbosity\r\n",
        b"verbosity x\r\n",
        b"verbosity 0\r\n",
        b"verbosity 0 noreply\r\n",
        b"verbosity 0 2\r\n",
        b"verbosity 0 2 3\r\n",
        b"verbosity noreply\r\n",
        b"verbosity x noreply\r\n",
        b"verbosity noreply noreply\r\n",
        b"verbosity -1\r\n",
        b"verbosity +0\r\n",
        b"verbosity -0\r\n",
        b"verbosity 4294967296\r\n",
        b"verbosity 18446744073709551616\r\n",
        b"verbosity \t0\r\n",
        b"verbosity 0x\r\n",
        b"verbosity 0\r\r\n",
        b"stats reset\r\n",
        b"stats reset x\r\n",
        b"stats detail\r\n",
        b"stats detail foo\r\n",
        b"stats foo\r\n",
        b"stats noreply\r\n",
        b"stats proxy\r\n",
        b"stats Items\r\n",
        b"STATS\r\n",
        b"cache_memlimit\r\n",
        b"cache_memlimit 1 2 3\r\n",
        b"lru\r\n",
        b"extstore\r\n",
        b"misbehave\r\n",
        b"debugtime 1\r\n",
        b"set a 0 0 1\r\nx\r\n",
        b"bget a\r\n",
        b"bget\r\n",
        b"touch a x noreply\r\n",
        b"incr a x noreply\r\n",
        b"incr a noreply\r\n",
        b"decr a 1 2 noreply\r\n",
        b"delete a 1 noreply\r\n",
        b"delete a 1\r\n",
        b"flush_all x noreply\r\n",
        b"flush_all x\r\n",
        b"get a\r\n",
    ]);
}

/// What guard refuses, and its exact words: commands that would change
/// the shared backends' settings, show their memory, other clients'
/// keys, or stop a process. Nothing reaches the backend (its own `stats
/// settings` are unchanged afterwards) and the connection carries on.
#[test]
fn server_commands_guard_refuses_by_name() {
    const SETTINGS: &str = "backend settings are the operator's";
    const SHARED: &str = "the backends are shared with other clients";
    const KEYS: &str = "it would show other clients' keys";
    let refusals: &[(&[u8], String)] = &[
        (
            b"cache_memlimit 100\r\n",
            format!("cache_memlimit not allowed: {SETTINGS}"),
        ),
        (
            b"cache_memlimit x\r\n",
            format!("cache_memlimit not allowed: {SETTINGS}"),
        ),
        (b"cache_memlimit 100 noreply\r\n", String::new()),
        (
            b"slabs reassign 1 2\r\n",
            format!("slabs reassign not allowed: {SETTINGS}"),
        ),
        (
            b"slabs automove 2\r\n",
            format!("slabs automove not allowed: {SETTINGS}"),
        ),
        (b"slabs automove 2 noreply\r\n", String::new()),
        (b"slabs\r\n", format!("slabs not allowed: {SETTINGS}")),
        (
            b"lru_crawler disable\r\n",
            format!("lru_crawler not allowed: {SETTINGS}"),
        ),
        (
            b"lru_crawler sleep 1 noreply\r\n",
            format!("lru_crawler not allowed: {SETTINGS}"),
        ),
        (
            b"lru_crawler metadump all\r\n",
            format!("lru_crawler metadump not allowed: {KEYS}"),
        ),
        (b"lru mode flat\r\n", format!("lru not allowed: {SETTINGS}")),
        (b"lru tune 10 10 0.1 2 noreply\r\n", String::new()),
        (b"watch\r\n", format!("watch not allowed: {KEYS}")),
        (
            b"watch fetchers mutations\r\n",
            format!("watch not allowed: {KEYS}"),
        ),
        (
            b"extstore item_age 10\r\n",
            format!("extstore not allowed: {SETTINGS}"),
        ),
        (
            b"shutdown\r\n",
            "shutdown not allowed: only the operator stops guard or its backends".into(),
        ),
        (
            b"shutdown graceful noreply\r\n",
            "shutdown not allowed: only the operator stops guard or its backends".into(),
        ),
        (
            b"refresh_certs\r\n",
            format!("refresh_certs not allowed: {SETTINGS}"),
        ),
        (
            b"stats detail on\r\n",
            format!("stats detail not allowed: {SETTINGS}"),
        ),
        (
            b"stats detail off\r\n",
            format!("stats detail not allowed: {SETTINGS}"),
        ),
        (
            b"stats detail dump\r\n",
            format!("stats detail not allowed: {KEYS}"),
        ),
        (
            b"stats cachedump 1 1\r\n",
            format!("stats cachedump not allowed: {KEYS}"),
        ),
        (
            b"stats cachedump\r\n",
            format!("stats cachedump not allowed: {KEYS}"),
        ),
        (
            b"stats items\r\n",
            format!("stats items not allowed: {SHARED}"),
        ),
        (
            b"stats slabs\r\n",
            format!("stats slabs not allowed: {SHARED}"),
        ),
        (
            b"stats sizes\r\n",
            format!("stats sizes not allowed: {SHARED}"),
        ),
        (
            b"stats conns\r\n",
            format!("stats conns not allowed: {SHARED}"),
        ),
        (
            b"stats extstore\r\n",
            format!("stats extstore not allowed: {SHARED}"),
        ),
        (
            b"stats sizes_enable\r\n",
            format!("stats sizes_enable not allowed: {SETTINGS}"),
        ),
        (
            b"stats sizes_disable\r\n",
            format!("stats sizes_disable not allowed: {SETTINGS}"),
        ),
        // Accepted as memcached accepts it, and not passed on.
        (b"verbosity 2\r\n", "OK".into()),
    ];
    let mc = Memcached::start();
    let guard = GuardProxy::start(config(&[&mc]));
    let before = common::stats_group(mc.addr(), "settings");
    let script: Vec<&[u8]> = refusals.iter().map(|(line, _)| *line).collect();
    for ((line, reply), (_, wanted)) in run_text(guard.addr, &script).iter().zip(refusals) {
        let wanted = match wanted.as_str() {
            "" => "MN\r\n".to_owned(),
            "OK" => "OK\r\nMN\r\n".to_owned(),
            w => format!("CLIENT_ERROR {w}\r\nMN\r\n"),
        };
        assert_eq!(reply, &wanted, "{line:?}");
    }
    let after = common::stats_group(mc.addr(), "settings");
    for name in [
        "maxbytes",
        "verbosity",
        "detail_enabled",
        "slab_automove",
        "lru_crawler",
        "lru_crawler_sleep",
        "lru_segmented",
        "hot_lru_pct",
        "track_sizes",
        "ext_item_age",
    ] {
        assert_eq!(before.get(name), after.get(name), "backend setting {name}");
        assert!(before.contains_key(name), "memcached shows no {name}");
    }
}

/// `stats settings` shows guard's own settings in memcached's format:
/// memcached's names where guard has the setting, what guard refuses as
/// disabled, guard's own `[proxy]` names for the rest, and never an
/// address behind the proxy. `stats reset` zeroes the tenant's counters,
/// not guard's.
#[test]
fn stats_settings_and_reset_are_guards_own() {
    let mc = Memcached::start();
    let guard = GuardProxy::start(ProxyConfig {
        max_connections: 777,
        idle_timeout_secs: 42,
        ..config(&[&mc])
    });
    let mut c = Client::connect(guard.addr);
    c.send(b"stats settings\r\n");
    let raw = String::from_utf8(c.read_until_suffix(b"END\r\n")).unwrap();
    let mut names = std::collections::HashSet::new();
    let mut settings = std::collections::HashMap::new();
    for line in raw
        .strip_suffix("END\r\n")
        .unwrap()
        .split_terminator("\r\n")
    {
        let mut words = line.splitn(3, ' ');
        assert_eq!(words.next(), Some("STAT"), "{line}");
        let (name, value) = (words.next().unwrap(), words.next().unwrap());
        assert!(!value.is_empty() && !value.contains(' '), "{line}");
        assert!(names.insert(name.to_owned()), "{name} twice");
        settings.insert(name.to_owned(), value.to_owned());
    }
    for (name, value) in [
        ("maxconns", "777"),
        ("idle_timeout", "42"),
        ("item_size_max", "1048576"),
        ("tcp_backlog", "4096"),
        ("binding_protocol", "auto-negotiate"),
        ("auth_enabled_sasl", "no"),
        ("flush_enabled", "yes"),
        ("detail_enabled", "no"),
        ("dump_enabled", "no"),
        ("shutdown_command", "no"),
        ("request_timeout_ms", "250"),
        ("keys", "namespaced"),
    ] {
        assert_eq!(
            settings.get(name).map(String::as_str),
            Some(value),
            "{name}"
        );
    }
    assert!(!raw.contains(&mc.addr().port().to_string()), "{raw}");

    let counter = |c: &mut Client, name: &str| -> u64 {
        c.send(b"stats\r\n");
        let raw = String::from_utf8(c.read_until_suffix(b"END\r\n")).unwrap();
        let prefix = format!("STAT {name} ");
        raw.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {name} in {raw}"))
            .parse()
            .unwrap()
    };
    for _ in 0..5 {
        c.send(b"get k\r\n");
        assert_eq!(c.read_line(), "END");
    }
    assert!(counter(&mut c, "tenant_requests") >= 5);
    let cmd_get = counter(&mut c, "cmd_get");
    c.send(b"stats reset\r\n");
    assert_eq!(c.read_line(), "RESET");
    assert_eq!(counter(&mut c, "tenant_requests"), 0);
    assert_eq!(counter(&mut c, "tenant_bytes"), 0);
    c.send(b"get k\r\nget k\r\n");
    assert_eq!(c.read_line(), "END");
    assert_eq!(c.read_line(), "END");
    // Tenant-wide, as memcached's reset is server-wide: another
    // connection sees the same count.
    assert_eq!(
        counter(&mut Client::connect(guard.addr), "tenant_requests"),
        2
    );
    // guard's own counters are the operator's and keep counting.
    assert_eq!(counter(&mut c, "cmd_get"), cmd_get + 2);
}

/// Binary `STAT` with a key and binary VERBOSITY: memcached 1.6 reads the
/// key by prefix for `reset`, `settings` and `detail`, answers "Not
/// found" for groups it does not know (text-only ones included), and no
/// longer knows VERBOSITY ("Unknown command"). Compared byte for byte;
/// the refused groups get 0x0024 with the refusal's words.
#[test]
fn binary_stat_groups_and_verbosity_match_memcached() {
    const STAT: u8 = 0x10;
    const VERBOSITY: u8 = 0x1b;
    let script: Vec<Vec<u8>> = vec![
        bin(STAT, b"reset", b"", b"", 0, 1),
        bin(STAT, b"resetx", b"", b"", 0, 2),
        bin(STAT, b"detail", b"", b"", 0, 3),
        bin(STAT, b"detail foo", b"", b"", 0, 4),
        bin(STAT, b"detailx", b"", b"", 0, 5),
        bin(STAT, b"foo", b"", b"", 0, 6),
        bin(STAT, b"conns", b"", b"", 0, 7),
        bin(STAT, b"cachedump 1 1", b"", b"", 0, 8),
        bin(STAT, b"extstore", b"", b"", 0, 9),
        bin(STAT, b"noreply", b"", b"", 0, 10),
        bin(STAT, b"itemsx", b"", b"", 0, 11),
        // Without extras: memcached answers at once. With its 4 bytes of
        // extras, memcached 1.6.18 answers the same words but then skips
        // as many bytes again of whatever follows (its `write_bin_error`
        // swallows the body it has already read), losing the next
        // request: guard answers that form below, without the loss.
        bin(VERBOSITY, b"", b"", b"", 0, 12),
    ];
    let direct_mc = Memcached::start();
    let proxied_mc = Memcached::start();
    let guard = GuardProxy::start(config(&[&proxied_mc]));
    let direct = run_binary(direct_mc.addr(), &script);
    let proxied = run_binary(guard.addr, &script);
    for (i, (d, p)) in direct.iter().zip(&proxied).enumerate() {
        assert_eq!(
            d,
            p,
            "step {i}: {:?}",
            String::from_utf8_lossy(&script[i][24..])
        );
    }

    let mut c = Client::connect(guard.addr);
    c.send(&bin(VERBOSITY, b"", &1u32.to_be_bytes(), b"", 0, 12));
    c.send(&bin(0x0a, b"", b"", b"", 0, 13));
    let replies = c.read_binary_until(13);
    assert_eq!(
        &replies[..replies.len() - 24],
        &direct[11][..direct[11].len() - 24]
    );

    let refused = |c: &mut Client, key: &[u8], words: &str| {
        c.send(&bin(STAT, key, b"", b"", 0, 20));
        let r = c.read_binary_until(20);
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 0x0024, "{key:?}");
        assert_eq!(String::from_utf8_lossy(&r[24..]), words, "{key:?}");
    };
    refused(
        &mut c,
        b"items",
        "stats items not allowed: the backends are shared with other clients",
    );
    refused(
        &mut c,
        b"slabs",
        "stats slabs not allowed: the backends are shared with other clients",
    );
    refused(
        &mut c,
        b"sizes",
        "stats sizes not allowed: the backends are shared with other clients",
    );
    refused(
        &mut c,
        b"sizes_enable",
        "stats sizes_enable not allowed: backend settings are the operator's",
    );
    refused(
        &mut c,
        b"detail on",
        "stats detail not allowed: backend settings are the operator's",
    );
    refused(
        &mut c,
        b"detail dump",
        "stats detail not allowed: it would show other clients' keys",
    );

    // Every row carries the request's opaque: a noop after it marks the end.
    c.send(&bin(STAT, b"settings", b"", b"", 0, 21));
    c.send(&bin(0x0a, b"", b"", b"", 0, 22));
    let r = c.read_binary_until(22);
    let r = &r[..r.len() - 24];
    let mut at = 0;
    let mut names = Vec::new();
    while at < r.len() {
        let key_len = usize::from(u16::from_be_bytes([r[at + 2], r[at + 3]]));
        let body = u32::from_be_bytes(r[at + 8..at + 12].try_into().unwrap()) as usize;
        assert_eq!(u16::from_be_bytes([r[at + 6], r[at + 7]]), 0);
        names.push(String::from_utf8_lossy(&r[at + 24..at + 24 + key_len]).into_owned());
        at += 24 + body;
    }
    assert_eq!(
        names.last().map(String::as_str),
        Some(""),
        "ends with the terminator"
    );
    assert!(names.iter().any(|n| n == "maxconns") && names.iter().any(|n| n == "item_size_max"));
}
