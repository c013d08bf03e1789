//! Chunking equivalence and arbitrary-input properties.

use proptest::prelude::*;

use super::super::{
    reader::{Parse, ResponseParser},
    *,
};
use super::binary_protocol::frame;

/// What a driver observed, comparable across chunkings. Discard lengths of
/// closing errors depend on how much was buffered, so they are left out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event<T> {
    Item(T),
    Error {
        kind: ErrorKind,
        close: bool,
        discard: Option<usize>,
    },
}

/// Feeds `chunks` one by one into a [`FrameReader`] as a proxy does,
/// collecting what it yields and checking the parser's contract.
fn drive<P: Parse + Clone>(parser: &P, chunks: &[&[u8]], limits: &Limits) -> Vec<Event<P::Item>>
where
    P::Item: std::fmt::Debug,
{
    let mut reader = FrameReader::new(parser.clone(), limits.clone());
    let mut events = Vec::new();
    for chunk in chunks {
        reader.buffer().extend_from_slice(chunk);
        loop {
            match reader
                .next_frame_checked()
                .unwrap_or_else(|e| panic!("{e}"))
            {
                Next::Frame(item) => events.push(Event::Item(item)),
                Next::Error(e) => {
                    events.push(Event::Error {
                        kind: e.kind,
                        close: e.close,
                        discard: (!e.close).then_some(e.discard),
                    });
                    if e.close {
                        return events;
                    }
                }
                Next::Empty | Next::Partial => break,
            }
        }
    }
    events
}

/// A client connection's parser, which keeps the protocol of its first
/// byte, and the backend's.
const REQUESTS: RequestParser = RequestParser::new();
const RESPONSES: ResponseParser = ResponseParser;

fn small_limits() -> Limits {
    Limits {
        max_key_len: 16,
        max_value_len: 16,
        max_line_len: 64,
        max_retrieval_line_len: 200,
        max_keys_per_get: 8,
        max_pipeline_depth: 8,
    }
}

fn text_pipeline() -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(
        b"get a b c\r\nset k 1 2 5\r\nab\r\nc\r\ngets x\r\nincr n 5\r\ndecr n 2 noreply\r\n\
delete k\r\ndelete k 0 noreply\r\ntouch k 10\r\ngat 10 a b\r\ngats 0 z\r\nflush_all 0\r\n\
flush_all noreply\r\nversion\r\nverbosity 1\r\nstats items\r\ncas k 1 2 3 99 noreply\r\n\
a\nb\r\nappend k 0 0 2\r\n\r\n\r\nprepend k 0 0 0\r\n\r\nadd k 0 0 1\nx\r\n\
replace k 0 0 1 noreply\r\ny\r\nxyz\r\n\r\nget\r\nincr n x\r\ndelete k 9\r\n\
set big 0 0 20\r\n01234567890123456789\r\nget after_big\r\n",
    );
    // A long multi-get (over max_line_len, under the retrieval limit).
    s.extend_from_slice(b"get k1 k2 k3 k4 k5 k6 k7 k8\r\n");
    s.extend_from_slice(
        b"get aaaaaaaaaa bbbbbbbbbb cccccccccc dddddddddd eeeeeeeeee ffffffffff\r\n",
    );
    s.extend_from_slice(b"get a b c d e f g h i\r\n"); // too many keys
    s.extend_from_slice(b"set k 0 0 3\r\nabcd\r\nget never\r\n"); // bad chunk: close
    s
}

fn meta_pipeline() -> Vec<u8> {
    b"mg foo v k O123 q\r\nms foo 4 T30 MA\r\nab\r\n\r\nmd foo q\r\nma n MD D5\r\nmn\r\n\
me foo\r\nmg Zm9v b k\r\nms bad 3 MZ\r\nxyz\r\nmg foo v v\r\nms big 40 T1\r\n\
0123456789012345678901234567890123456789\r\nmg after\r\nmg !!! b\r\nmn\r\n\
ms foo 2\r\nabc"
        .to_vec()
}

fn binary_pipeline() -> Vec<u8> {
    let mut s = Vec::new();
    s.extend(frame(
        0x01,
        &[0, 0, 0, 1, 0, 0, 0, 0],
        b"key",
        b"v\r\nal\r\n",
        1,
    ));
    s.extend(frame(0x09, b"", b"miss", b"", 2));
    s.extend(frame(0x0d, b"", b"hit", b"", 3));
    s.extend(frame(0x40, b"ex", b"unknown", b"body", 4));
    s.extend(frame(0x11, &[0; 8], b"big", &[b'x'; 40], 5));
    s.extend(frame(0x10, b"", b"", b"", 6));
    s.extend(frame(0x1d, &[0, 0, 0, 9], b"k", b"", 7));
    s.extend(frame(0x0a, b"", b"", b"", 8));
    s.extend(frame(0x00, &[0; 4], b"k", b"", 9)); // invalid: close
    s
}

fn mixed_pipeline() -> Vec<u8> {
    let mut s = b"get a\r\n".to_vec();
    s.extend(frame(0x0a, b"", b"", b"", 1));
    s.extend_from_slice(b"mg k v\r\nset k 0 0 2\r\n\x80\x81\r\n");
    s.extend(frame(0x0c, b"", b"k", b"", 2));
    s.extend_from_slice(b"set k 0 0 3\r\n"); // truncated at end of stream
    s
}

/// Lines near and past both line limits; the verdict must not depend on
/// how much of the line happened to be buffered.
fn long_lines() -> Vec<u8> {
    let mut s = b"version\r\n".to_vec();
    s.extend_from_slice(format!("stats settings {}\r\n", "s".repeat(46)).as_bytes()); // 63 bytes: fits
    s.extend_from_slice(format!("get {}\r\n", "k ".repeat(60)).as_bytes()); // too many keys
    s.extend_from_slice(format!("get {}\r\n", "k ".repeat(8)).as_bytes());
    s.extend_from_slice(format!("get {}\r\n", "kkkkkkkkkkkkkkk ".repeat(12)).as_bytes()); // 198 bytes
    s.extend_from_slice(format!("stats {}\r\n", "s".repeat(100)).as_bytes()); // too long: close
    s.extend_from_slice(b"version\r\n");
    s
}

/// The `stats` groups and memcached's administrative commands, with the
/// malformed lines memcached answers `ERROR` or a usage error, and errors
/// a last `noreply` silences.
fn admin_pipeline() -> Vec<u8> {
    b"stats\r\nstats reset\r\nstats settings x\r\nstats detail\r\nstats detail dump\r\n\
stats noreply\r\nstats cachedump 1 1\r\ncache_memlimit 100 noreply\r\ncache_memlimit\r\n\
slabs reassign 1 2\r\nlru_crawler metadump all\r\nlru\r\nlru mode flat noreply\r\n\
watch\r\nextstore item_age 1\r\nshutdown graceful\r\nrefresh_certs noreply\r\n\
verbosity x noreply\r\nverbosity +1\r\nbget k\r\ntouch k x noreply\r\nmisbehave\r\n"
        .to_vec()
}

fn request_streams() -> Vec<Vec<u8>> {
    vec![
        admin_pipeline(),
        text_pipeline(),
        meta_pipeline(),
        binary_pipeline(),
        mixed_pipeline(),
        long_lines(),
    ]
}

fn response_stream() -> Vec<u8> {
    let mut s = b"VALUE a 0 5\r\nab\r\nc\r\nVALUE b 3 1 99\r\nx\r\nEND\r\nSTORED\r\nNOT_STORED\r\n\
EXISTS\r\nNOT_FOUND\r\nDELETED\r\nTOUCHED\r\n12345\r\nOK\r\nVERSION 1.6.21\r\n\
STAT pid 1\r\nSTAT uptime 2\r\nEND\r\nERROR\r\nCLIENT_ERROR bad data chunk\r\n\
SERVER_ERROR out of memory\r\nVA 3 f1 kfoo\r\na\r\n\r\nHD c1\r\nEN\r\nNF\r\nNS\r\nEX\r\n\
MN\r\nME foo exp=-1 la=1\r\nVALUE big 0 30\r\n012345678901234567890123456789\r\nEND\r\n"
        .to_vec();
    let mut r = frame(0x0c, &[0, 0, 0, 1], b"key", b"val\r\n", 1);
    r[0] = 0x81;
    s.extend(r);
    s.extend_from_slice(b"VALUE k 0 1\r\nxy\r\n"); // bad chunk: close
    s
}

fn check_request(r: &Request, limits: &Limits) {
    if let Err(e) = invariants::request_invariants(r, limits) {
        panic!("{e}");
    }
}

fn crlf_room(l: &Limits) -> Limits {
    Limits {
        max_line_len: l.max_line_len + 1,
        max_retrieval_line_len: l.max_retrieval_line_len + 1,
        ..l.clone()
    }
}

fn whole<P: Parse + Clone>(parser: &P, s: &[u8], l: &Limits) -> Vec<Event<P::Item>>
where
    P::Item: std::fmt::Debug,
{
    drive(parser, &[s], l)
}

#[test]
fn streams_have_expected_shape() {
    let l = small_limits();
    let text = whole(&REQUESTS, &text_pipeline(), &l);
    let errors: Vec<_> = text
        .iter()
        .filter_map(|e| match e {
            Event::Error { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            ErrorKind::UnknownCommand,
            ErrorKind::UnknownCommand,
            ErrorKind::UnknownCommand,
            ErrorKind::InvalidDelta,
            ErrorKind::BadDeleteFormat,
            ErrorKind::TooLarge,
            ErrorKind::BadCommandLine,
            ErrorKind::BadDataChunk,
        ]
    );
    assert!(matches!(
        text.last(),
        Some(Event::Error { close: true, .. })
    ));
    let items = text.iter().filter(|e| matches!(e, Event::Item(_))).count();
    assert_eq!(items, 23);
    for e in &text {
        if let Event::Item(r) = e {
            check_request(r, &l);
        }
    }
    let admin = whole(&REQUESTS, &admin_pipeline(), &l);
    let errors: Vec<_> = admin
        .iter()
        .filter_map(|e| match e {
            Event::Error { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            ErrorKind::StatsDetailUsage,
            ErrorKind::UnknownCommand,
            ErrorKind::UnknownCommand,
            ErrorKind::UnknownCommand,
            ErrorKind::BadCommandLine,
            ErrorKind::InvalidExptime,
            ErrorKind::UnknownCommand,
        ]
    );
    assert_eq!(admin.len(), 22);
    for e in &admin {
        if let Event::Item(r) = e {
            check_request(r, &l);
        }
    }
    let meta = whole(&REQUESTS, &meta_pipeline(), &l);
    assert_eq!(meta.len(), 13);
    let bin = whole(&REQUESTS, &binary_pipeline(), &l);
    assert_eq!(bin.len(), 9);
    assert!(matches!(
        bin[3],
        Event::Error {
            kind: ErrorKind::UnknownCommand,
            close: false,
            ..
        }
    ));
    let mixed = whole(&REQUESTS, &mixed_pipeline(), &l);
    assert_eq!(mixed.len(), 5);
    let long = whole(&REQUESTS, &long_lines(), &l);
    assert_eq!(long.len(), 6);
    assert!(matches!(
        long[5],
        Event::Error {
            kind: ErrorKind::LineTooLong,
            close: true,
            ..
        }
    ));
    let resp = whole(&RESPONSES, &response_stream(), &l);
    assert_eq!(resp.len(), 30);
    assert!(matches!(
        resp[26],
        Event::Error {
            kind: ErrorKind::TooLarge,
            close: false,
            ..
        }
    ));
}

/// Every single split point, plus byte-at-a-time, matches the whole parse.
#[test]
fn every_split_point_matches_whole_parse() {
    let l = small_limits();
    let check = |parse: &ResponseParser, s: &[u8]| {
        let expect = whole(parse, s, &l);
        for i in 0..=s.len() {
            assert_eq!(
                drive(parse, &[&s[..i], &s[i..]], &l),
                expect,
                "split at {i}"
            );
        }
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(drive(parse, &bytes, &l), expect);
    };
    for s in request_streams() {
        let expect = whole(&REQUESTS, &s, &l);
        for i in 0..=s.len() {
            assert_eq!(
                drive(&REQUESTS, &[&s[..i], &s[i..]], &l),
                expect,
                "split at {i}"
            );
        }
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(drive(&REQUESTS, &bytes, &l), expect);
    }
    check(&RESPONSES, &response_stream());
}

fn split_at_points(s: &[u8], mut cuts: Vec<usize>) -> Vec<&[u8]> {
    cuts.iter_mut().for_each(|c| *c %= s.len() + 1);
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in cuts {
        out.push(&s[prev..c]);
        prev = c;
    }
    out.push(&s[prev..]);
    out
}

/// Fragments that steer random input into the interesting parser paths.
fn fragment() -> impl Strategy<Value = Vec<u8>> {
    let words: Vec<&'static [u8]> = vec![
        b"get ",
        b"gets ",
        b"gat ",
        b"set ",
        b"cas ",
        b"incr ",
        b"delete ",
        b"touch ",
        b"flush_all",
        b"stats",
        b" detail",
        b" reset",
        b" settings",
        b"verbosity ",
        b"cache_memlimit ",
        b"slabs reassign ",
        b"lru_crawler ",
        b"lru ",
        b"watch",
        b"shutdown",
        b"bget ",
        b"+",
        b"mg ",
        b"ms ",
        b"md ",
        b"ma ",
        b"mn",
        b"me ",
        b"VALUE ",
        b"VA ",
        b"HD",
        b"END",
        b"STAT ",
        b"k",
        b"key",
        b" ",
        b"  ",
        b"\r\n",
        b"\n",
        b"\r",
        b"0",
        b"1",
        b"5",
        b"20",
        b"-1",
        b"noreply",
        b" v",
        b" q",
        b" b",
        b" k",
        b" T5",
        b" O1",
        b" MA",
        b" MZ",
        b"Zm9v",
        b"\x80",
        b"\x81",
        b"\x00",
        b"\x01\x00\x03\x08",
    ];
    prop_oneof![
        3 => proptest::sample::select(words).prop_map(|w| w.to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 1..6),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9:_]{1,12}",
        1 => "[a-z]{15,20}",
        1 => "[A-Za-z0-9+/]{2,8}={0,2}",
        1 => "[a-z]{1,3}[\\x00-\\x20\\x7f][a-z]{0,2}",
    ]
}

fn num() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0u32..40).prop_map(|n| n.to_string()),
        1 => Just("-1".to_string()),
        1 => Just("x".to_string()),
        1 => Just("4294967296".to_string()),
    ]
}

fn data() -> impl Strategy<Value = (String, Vec<u8>)> {
    // Declared length is usually right, sometimes off by one or too large.
    (
        proptest::collection::vec(
            proptest::sample::select(vec![b'a', b'\r', b'\n', b' ']),
            0..20,
        ),
        prop_oneof![8 => Just(0i64), 1 => Just(1i64), 1 => Just(-1i64), 1 => Just(30i64)],
    )
        .prop_map(|(d, off)| ((d.len() as i64 + off).max(0).to_string(), d))
}

fn meta_flags() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        proptest::sample::select(vec![
            "v", "k", "q", "b", "c", "f", "s", "t", "O12", "T30", "N5", "R1", "MA", "ME", "MD",
            "M+", "MZ", "D3", "J7", "C9", "E1", "F3", "I", "x", "Tx", "z",
        ]),
        0..5,
    )
    .prop_map(|f| f.iter().map(|x| format!(" {x}")).collect())
}

/// One near-valid command of any kind, in any of the three protocols.
fn command() -> impl Strategy<Value = Vec<u8>> {
    let nr = || prop_oneof![3 => Just(""), 1 => Just(" noreply")];
    prop_oneof![
        (
            proptest::sample::select(vec!["get", "gets"]),
            proptest::collection::vec(key(), 0..10)
        )
            .prop_map(|(c, k)| format!("{c} {}\r\n", k.join(" ")).into_bytes()),
        (
            proptest::sample::select(vec!["gat", "gats"]),
            num(),
            proptest::collection::vec(key(), 1..4)
        )
            .prop_map(|(c, n, k)| format!("{c} {n} {}\r\n", k.join(" ")).into_bytes()),
        (
            proptest::sample::select(vec!["set", "add", "replace", "append", "prepend", "cas"]),
            key(),
            num(),
            num(),
            data(),
            nr(),
            num()
        )
            .prop_map(|(c, k, f, e, (len, d), nr, cas)| {
                let cas = if c == "cas" {
                    format!(" {cas}")
                } else {
                    String::new()
                };
                [
                    format!("{c} {k} {f} {e} {len}{cas}{nr}\r\n").into_bytes(),
                    d,
                    b"\r\n".to_vec(),
                ]
                .concat()
            }),
        (
            proptest::sample::select(vec!["incr", "decr", "touch"]),
            key(),
            num(),
            nr()
        )
            .prop_map(|(c, k, n, nr)| format!("{c} {k} {n}{nr}\r\n").into_bytes()),
        (
            key(),
            proptest::sample::select(vec!["", " 0", " noreply", " 0 noreply", " 1"])
        )
            .prop_map(|(k, t)| format!("delete {k}{t}\r\n").into_bytes()),
        proptest::sample::select(vec![
            "flush_all\r\n",
            "flush_all 10 noreply\r\n",
            "version\r\n",
            "verbosity 1\r\n",
            "verbosity x noreply\r\n",
            "stats items\r\n",
            "stats reset\r\n",
            "stats detail on\r\n",
            "stats detail\r\n",
            "stats bogus\r\n",
            "cache_memlimit 100 noreply\r\n",
            "slabs reassign 1 2\r\n",
            "slabs automove 1 noreply\r\n",
            "lru_crawler metadump all\r\n",
            "lru tune 10 10 0.1 2 noreply\r\n",
            "watch fetchers\r\n",
            "extstore item_age 10\r\n",
            "shutdown\r\n",
            "refresh_certs noreply\r\n",
            "bget a b\r\n",
            "quit\r\n",
            "mn\r\n",
            "bogus\r\n",
            "\r\n",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        (
            proptest::sample::select(vec!["mg", "md", "ma", "me"]),
            key(),
            meta_flags()
        )
            .prop_map(|(c, k, f)| format!("{c} {k}{f}\r\n").into_bytes()),
        (key(), data(), meta_flags()).prop_map(|(k, (len, d), f)| {
            [
                format!("ms {k} {len}{f}\r\n").into_bytes(),
                d,
                b"\r\n".to_vec(),
            ]
            .concat()
        }),
        (
            proptest::sample::select(
                Opcode::ALL
                    .iter()
                    .map(|o| *o as u8)
                    .chain([0x40, 0x1f, 0x1b])
                    .collect::<Vec<_>>()
            ),
            proptest::sample::select(vec![0usize, 4, 8, 20]),
            proptest::collection::vec(any::<u8>(), 0..6),
            proptest::collection::vec(any::<u8>(), 0..20),
        )
            .prop_map(|(op, ext, k, v)| frame(op, &vec![0; ext], &k, &v, 7)),
    ]
}

fn stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (
            proptest::collection::vec(command(), 0..12),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        )
            .prop_map(|(cmds, corrupt)| {
                let mut s = cmds.concat();
                for (i, b) in corrupt {
                    if !s.is_empty() {
                        let n = s.len();
                        s[i % n] = b;
                    }
                }
                s
            }),
        1 => proptest::collection::vec(fragment(), 0..60).prop_map(|v| v.concat()),
        1 => proptest::collection::vec(any::<u8>(), 0..300),
    ]
}

fn limits_strategy() -> impl Strategy<Value = Limits> {
    prop_oneof![Just(small_limits()), Just(Limits::default())]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random multi-splits of the representative streams.
    #[test]
    fn random_splits_match_whole_parse(
        which in 0usize..6,
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let l = small_limits();
        if which == 5 {
            let s = response_stream();
            let chunks = split_at_points(&s, cuts);
            prop_assert_eq!(drive(&RESPONSES, &chunks, &l), whole(&RESPONSES, &s, &l));
        } else {
            let s = request_streams().swap_remove(which);
            let chunks = split_at_points(&s, cuts);
            prop_assert_eq!(drive(&REQUESTS, &chunks, &l), whole(&REQUESTS, &s, &l));
        }
    }

    /// Arbitrary bytes never panic, every parsed request respects the
    /// limits and re-encodes faithfully, and chunking never matters.
    #[test]
    fn arbitrary_requests(s in stream(), cuts in proptest::collection::vec(any::<usize>(), 0..6), l in limits_strategy()) {
        let events = whole(&REQUESTS, &s, &l);
        for e in &events {
            if let Event::Item(r) = e {
                check_request(r, &l);
            }
        }
        let chunks = split_at_points(&s, cuts);
        prop_assert_eq!(drive(&REQUESTS, &chunks, &l), events);
    }

    /// Same for the backend-reply parser.
    #[test]
    fn arbitrary_responses(s in stream(), cuts in proptest::collection::vec(any::<usize>(), 0..6), l in limits_strategy()) {
        let events = whole(&RESPONSES, &s, &l);
        for e in &events {
            if let Event::Item(r) = e {
                let mut out = BytesMut::new();
                r.encode(&mut out);
                let mut again = out.clone();
                prop_assert_eq!(parse_response(&mut again, &crlf_room(&l)), Ok(Some(r.clone())));
            }
        }
        let chunks = split_at_points(&s, cuts);
        prop_assert_eq!(drive(&RESPONSES, &chunks, &l), events);
    }
}
