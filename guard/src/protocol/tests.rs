//! Unit tests for every command and reply form, plus the chunking and
//! arbitrary-input properties (in `props`).

use bytes::{Bytes, BytesMut};

use super::*;

mod props;

fn lim() -> Limits {
    Limits::default()
}

/// Parses exactly one request consuming the whole input.
fn one(input: &[u8]) -> Request {
    let mut b = BytesMut::from(input);
    let r = parse_request(&mut b, &lim())
        .unwrap_or_else(|e| panic!("{e} for {:?}", String::from_utf8_lossy(input)))
        .expect("complete");
    assert!(b.is_empty(), "left over: {:?}", b);
    r
}

fn text(input: &[u8]) -> TextRequest {
    match one(input) {
        Request::Text(t) => t,
        other => panic!("not text: {other:?}"),
    }
}

fn meta(input: &[u8]) -> MetaRequest {
    match one(input) {
        Request::Meta(m) => m,
        other => panic!("not meta: {other:?}"),
    }
}

fn fail_with(input: &[u8], limits: &Limits) -> ProtocolError {
    let mut b = BytesMut::from(input);
    let e = parse_request(&mut b, limits).expect_err("should fail");
    assert_eq!(&b[..], input, "buffer must be untouched on error");
    assert!(e.discard > 0);
    e
}

fn fail(input: &[u8]) -> ProtocolError {
    fail_with(input, &lim())
}

fn reply(e: &ProtocolError) -> Vec<u8> {
    let mut out = BytesMut::new();
    e.write_reply(&mut out);
    out.to_vec()
}

fn incomplete(input: &[u8]) {
    let mut b = BytesMut::from(input);
    assert_eq!(parse_request(&mut b, &lim()), Ok(None));
    assert_eq!(&b[..], input);
}

fn encode_req(r: &Request) -> Vec<u8> {
    let mut out = BytesMut::new();
    r.encode(&mut out);
    out.to_vec()
}

/// Canonical requests re-encode byte for byte.
fn roundtrip(input: &[u8]) {
    assert_eq!(
        String::from_utf8_lossy(&encode_req(&one(input))),
        String::from_utf8_lossy(input)
    );
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

mod text_requests {
    use super::*;

    #[test]
    fn get_family() {
        assert_eq!(
            text(b"get foo\r\n"),
            TextRequest::Get(GetRequest {
                kind: GetKind::Get,
                keys: vec![b("foo")]
            })
        );
        assert_eq!(
            text(b"gets a  b c\r\n"),
            TextRequest::Get(GetRequest {
                kind: GetKind::Gets,
                keys: vec![b("a"), b("b"), b("c")]
            })
        );
        assert_eq!(
            text(b"gat 100 a b\r\n"),
            TextRequest::Get(GetRequest {
                kind: GetKind::Gat(100),
                keys: vec![b("a"), b("b")]
            })
        );
        assert_eq!(
            text(b"gats -1 a\n"),
            TextRequest::Get(GetRequest {
                kind: GetKind::Gats(-1),
                keys: vec![b("a")]
            })
        );
        // A key literally named noreply is just a key for get.
        assert_eq!(text(b"get noreply\r\n").keys(), vec![&b("noreply")]);
        for l in [
            &b"get a b\r\n"[..],
            b"gets x\r\n",
            b"gat 5 k\r\n",
            b"gats 0 k1 k2\r\n",
        ] {
            roundtrip(l);
        }
        assert!(GetKind::Gets.returns_cas() && !GetKind::Gat(1).returns_cas());
    }

    #[test]
    fn get_errors() {
        assert_eq!(reply(&fail(b"get\r\n")), b"ERROR\r\n");
        assert_eq!(reply(&fail(b"gat 10\r\n")), b"ERROR\r\n");
        assert_eq!(
            reply(&fail(b"gat x k\r\n")),
            b"CLIENT_ERROR invalid exptime argument\r\n"
        );
        let long = format!("get {}\r\n", "k".repeat(251));
        let e = fail(long.as_bytes());
        assert_eq!(reply(&e), b"CLIENT_ERROR bad command line format\r\n");
        assert_eq!(e.discard, long.len());
        assert!(!e.close);
        assert_eq!(
            reply(&fail(b"get a\x01b\r\n")),
            b"CLIENT_ERROR bad command line format\r\n"
        );
        let limits = Limits {
            max_keys_per_get: 2,
            ..lim()
        };
        assert_eq!(
            fail_with(b"get a b c\r\n", &limits).kind,
            ErrorKind::BadCommandLine
        );
        // 250 bytes is still fine.
        let ok = format!("get {}\r\n", "k".repeat(250));
        assert_eq!(text(ok.as_bytes()).keys()[0].len(), 250);
    }

    #[test]
    fn long_get_lines_use_the_retrieval_limit() {
        let keys: Vec<String> = (0..400).map(|i| format!("key{i:05}")).collect();
        let line = format!("get {}\r\n", keys.join(" "));
        assert!(line.len() > 2048);
        match text(line.as_bytes()) {
            TextRequest::Get(g) => assert_eq!(g.keys.len(), 400),
            other => panic!("{other:?}"),
        }
        // Partial long get line: still waiting, not "too long".
        incomplete(&line.as_bytes()[..3000]);
        // A non-get line past the limit is fatal.
        let junk = format!("set {}", "x".repeat(3000));
        let e = fail(junk.as_bytes());
        assert_eq!(reply(&e), b"CLIENT_ERROR line too long\r\n");
        assert!(e.close);
        let huge = format!("get {}", "k ".repeat(40000));
        assert!(fail(huge.as_bytes()).close);
    }

    #[test]
    fn storage_commands() {
        let s = |cmd: StoreCommand, v: &str, noreply| {
            TextRequest::Store(StoreRequest {
                command: cmd,
                key: b("k"),
                flags: 5,
                exptime: 10,
                value: b(v),
                noreply,
            })
        };
        assert_eq!(
            text(b"set k 5 10 4\r\na\r\nb\r\n"),
            s(StoreCommand::Set, "a\r\nb", false)
        );
        assert_eq!(
            text(b"add k 5 10 0\r\n\r\n"),
            s(StoreCommand::Add, "", false)
        );
        assert_eq!(
            text(b"replace k 5 10 1 noreply\r\nx\r\n"),
            s(StoreCommand::Replace, "x", true)
        );
        assert_eq!(
            text(b"append k 5 10 2\r\nxy\r\n"),
            s(StoreCommand::Append, "xy", false)
        );
        assert_eq!(
            text(b"prepend k 5 10 2\r\nxy\r\n"),
            s(StoreCommand::Prepend, "xy", false)
        );
        assert_eq!(
            text(b"cas k 5 10 2 77 noreply\r\nxy\r\n"),
            s(StoreCommand::Cas(77), "xy", true)
        );
        // memcached ignores a stray trailing token.
        assert_eq!(
            text(b"set k 5 10 1 junk\r\nx\r\n"),
            s(StoreCommand::Set, "x", false)
        );
        for l in [
            &b"set k 0 0 1\r\nx\r\n"[..],
            b"set k 4294967295 -1 3 noreply\r\na\nb\r\n",
            b"cas k 1 2 3 18446744073709551615\r\nabc\r\n",
            b"append k 0 0 0\r\n\r\n",
        ] {
            roundtrip(l);
        }
        assert_eq!(
            one(b"set k 0 0 1 noreply\r\nx\r\n").reply_shape(),
            ReplyShape::None
        );
        assert_eq!(one(b"set k 0 0 1\r\nx\r\n").reply_shape(), ReplyShape::One);
    }

    #[test]
    fn storage_incomplete_leaves_buffer() {
        incomplete(b"set k 0 0 5\r\n");
        incomplete(b"set k 0 0 5\r\nabc");
        incomplete(b"set k 0 0 5\r\nabcde");
        incomplete(b"set k 0 0 5\r\nabcde\r");
        incomplete(b"set k 0 0");
    }

    #[test]
    fn storage_errors() {
        assert_eq!(reply(&fail(b"set k 0 0\r\n")), b"ERROR\r\n");
        assert_eq!(reply(&fail(b"set k 0 0 1 noreply x\r\n")), b"ERROR\r\n");
        assert_eq!(reply(&fail(b"cas k 0 0 1\r\n")), b"ERROR\r\n");
        for bad in [
            &b"set k x 0 1\r\n"[..],
            b"set k 0 x 1\r\n",
            b"set k 0 0 x\r\n",
            b"set k 0 0 -1\r\n",
            b"set k 4294967296 0 1\r\n",
            b"cas k 0 0 1 x\r\n",
        ] {
            let e = fail(bad);
            assert_eq!(reply(&e), b"CLIENT_ERROR bad command line format\r\n");
            // memcached does not swallow a data block after a bad line.
            assert_eq!(e.discard, bad.len());
            assert!(!e.close);
        }
        let long = format!("set {} 0 0 1\r\nx\r\n", "k".repeat(251));
        assert_eq!(fail(long.as_bytes()).kind, ErrorKind::BadCommandLine);
    }

    #[test]
    fn too_large_value_is_swallowed_not_buffered() {
        let limits = Limits {
            max_value_len: 10,
            ..lim()
        };
        let line = b"set k 0 0 11\r\n";
        // Only the command line is buffered; the verdict is already known.
        let e = fail_with(line, &limits);
        assert_eq!(reply(&e), b"SERVER_ERROR object too large for cache\r\n");
        assert_eq!(e.discard, line.len() + 11 + 2);
        assert!(!e.close);
        let mut buf = BytesMut::from(&line[..]);
        assert_eq!(e.discard_from(&mut buf), 13);
        // Under noreply memcached stays silent but still swallows.
        let e = fail_with(b"set k 0 0 11 noreply\r\n", &limits);
        assert!(e.noreply);
        assert_eq!(reply(&e), b"");
        // Exactly at the limit is fine.
        let mut buf = BytesMut::from(&b"set k 0 0 10\r\n0123456789\r\n"[..]);
        assert!(parse_request(&mut buf, &limits).unwrap().is_some());
    }

    #[test]
    fn bad_data_chunk_closes() {
        let input = b"set k 0 0 3\r\nabcd\r\nget k\r\n";
        let e = fail(input);
        assert_eq!(reply(&e), b"CLIENT_ERROR bad data chunk\r\n");
        assert!(e.close);
        assert_eq!(e.discard, 13 + 5);
        for bad in [
            &b"set k 0 0 3\r\nabc\n\n"[..],
            b"set k 0 0 3\r\nabc\rX",
            b"set k 0 0 3\r\nabcX\n",
        ] {
            let e = fail(bad);
            assert_eq!(e.kind, ErrorKind::BadDataChunk);
            assert_eq!(e.discard, bad.len());
        }
    }

    #[test]
    fn arithmetic() {
        assert_eq!(
            text(b"incr n 5\r\n"),
            TextRequest::Incr {
                key: b("n"),
                delta: 5,
                noreply: false
            }
        );
        assert_eq!(
            text(b"decr n 18446744073709551615 noreply\r\n"),
            TextRequest::Decr {
                key: b("n"),
                delta: u64::MAX,
                noreply: true
            }
        );
        roundtrip(b"incr n 1\r\n");
        roundtrip(b"decr n 2 noreply\r\n");
        for bad in [
            &b"incr n x\r\n"[..],
            b"incr n -1\r\n",
            b"decr n 18446744073709551616\r\n",
        ] {
            assert_eq!(
                reply(&fail(bad)),
                b"CLIENT_ERROR invalid numeric delta argument\r\n"
            );
        }
        assert_eq!(reply(&fail(b"incr n\r\n")), b"ERROR\r\n");
        assert_eq!(reply(&fail(b"incr n 1 noreply x\r\n")), b"ERROR\r\n");
        assert_eq!(one(b"incr n 1\r\n").reply_shape(), ReplyShape::One);
    }

    #[test]
    fn delete() {
        let d = |noreply| TextRequest::Delete {
            key: b("k"),
            noreply,
        };
        assert_eq!(text(b"delete k\r\n"), d(false));
        assert_eq!(text(b"delete k noreply\r\n"), d(true));
        assert_eq!(text(b"delete k 0\r\n"), d(false));
        assert_eq!(text(b"delete k 0 noreply\r\n"), d(true));
        roundtrip(b"delete k\r\n");
        roundtrip(b"delete k noreply\r\n");
        let usage = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n";
        assert_eq!(reply(&fail(b"delete k 5\r\n")), usage);
        assert_eq!(reply(&fail(b"delete k 0 x\r\n")), usage);
        // memcached 1.6.18 reads the `noreply` first and keeps quiet.
        assert_eq!(reply(&fail(b"delete k 1 noreply\r\n")), b"");
        assert_eq!(reply(&fail(b"delete k 0 noreply x\r\n")), b"ERROR\r\n");
        assert_eq!(reply(&fail(b"delete\r\n")), b"ERROR\r\n");
    }

    #[test]
    fn touch_flush_misc() {
        assert_eq!(
            text(b"touch k 30\r\n"),
            TextRequest::Touch {
                key: b("k"),
                exptime: 30,
                noreply: false
            }
        );
        roundtrip(b"touch k -1 noreply\r\n");
        assert_eq!(
            reply(&fail(b"touch k soon\r\n")),
            b"CLIENT_ERROR invalid exptime argument\r\n"
        );
        assert_eq!(reply(&fail(b"touch k\r\n")), b"ERROR\r\n");

        let f = |delay, noreply| TextRequest::FlushAll { delay, noreply };
        assert_eq!(text(b"flush_all\r\n"), f(None, false));
        assert_eq!(text(b"flush_all noreply\r\n"), f(None, true));
        assert_eq!(text(b"flush_all 10\r\n"), f(Some(10), false));
        assert_eq!(text(b"flush_all 10 noreply\r\n"), f(Some(10), true));
        assert_eq!(text(b"flush_all -5 x\r\n"), f(Some(-5), false));
        roundtrip(b"flush_all 10 noreply\r\n");
        roundtrip(b"flush_all\r\n");
        assert_eq!(
            reply(&fail(b"flush_all soon\r\n")),
            b"CLIENT_ERROR invalid exptime argument\r\n"
        );
        assert_eq!(reply(&fail(b"flush_all soon noreply\r\n")), b"");
        assert_eq!(reply(&fail(b"flush_all 1 2 3\r\n")), b"ERROR\r\n");

        assert_eq!(text(b"version\r\n"), TextRequest::Version);
        roundtrip(b"version\r\n");
        assert_eq!(
            text(b"verbosity 1 noreply\r\n"),
            TextRequest::Verbosity {
                level: 1,
                noreply: true
            }
        );
        roundtrip(b"verbosity 2\r\n");
        assert_eq!(
            reply(&fail(b"verbosity x\r\n")),
            b"CLIENT_ERROR bad command line format\r\n"
        );
        assert_eq!(reply(&fail(b"verbosity\r\n")), b"ERROR\r\n");
        assert_eq!(reply(&fail(b"verbosity 1 2 3\r\n")), b"ERROR\r\n");
        // memcached reads `noreply` before the level: its error is silent.
        assert_eq!(reply(&fail(b"verbosity x noreply\r\n")), b"");
        assert_eq!(reply(&fail(b"verbosity noreply\r\n")), b"");
        assert_eq!(
            text(b"verbosity +5 x\r\n"),
            TextRequest::Verbosity {
                level: 5,
                noreply: false
            }
        );
        assert_eq!(text(b"stats\r\n"), TextRequest::Stats(StatsGroup::General));
        assert_eq!(
            text(b"stats cachedump 1 2\r\n"),
            TextRequest::Stats(StatsGroup::Cachedump)
        );
        assert_eq!(
            text(b"stats detail dump x\r\n"),
            TextRequest::Stats(StatsGroup::Detail(DetailAction::Dump))
        );
        for line in [&b"stats detail\r\n"[..], b"stats detail of\r\n"] {
            assert_eq!(
                reply(&fail(line)),
                b"CLIENT_ERROR usage: stats detail on|off|dump\r\n"
            );
        }
        for line in [
            &b"stats noreply\r\n"[..],
            b"stats foo\r\n",
            b"stats proxy\r\n",
        ] {
            assert_eq!(reply(&fail(line)), b"ERROR\r\n");
        }
        roundtrip(b"stats slabs\r\n");
        roundtrip(b"stats detail on\r\n");
        roundtrip(b"stats reset\r\n");
        assert_eq!(one(b"stats\r\n").reply_shape(), ReplyShape::Multi);
        assert_eq!(text(b"quit\r\n"), TextRequest::Quit);
        assert_eq!(one(b"quit\r\n").reply_shape(), ReplyShape::None);
        roundtrip(b"quit\r\n");
    }

    /// Errors memcached finds after reading a last `noreply` stay silent,
    /// as they do from memcached 1.6.18 (each line checked against it).
    #[test]
    fn errors_after_noreply_are_silent() {
        let long = "k".repeat(251);
        for line in [
            "touch a x noreply\r\n".to_owned(),
            "incr a x noreply\r\n".to_owned(),
            "incr a noreply\r\n".to_owned(),
            "decr a x noreply\r\n".to_owned(),
            format!("incr {long} 1 noreply\r\n"),
            format!("touch {long} 1 noreply\r\n"),
            format!("delete {long} noreply\r\n"),
            "delete a b noreply\r\n".to_owned(),
            "flush_all x noreply\r\n".to_owned(),
        ] {
            let e = fail(line.as_bytes());
            assert!(e.noreply, "{line}");
            assert_eq!(reply(&e), b"", "{line}");
        }
        // Token counts are checked before `noreply` is read.
        for line in ["incr a 1 2 noreply\r\n", "verbosity 1 noreply x\r\n"] {
            assert_eq!(reply(&fail(line.as_bytes())), b"ERROR\r\n", "{line}");
        }
        assert_eq!(
            reply(&fail(b"touch a x\r\n")),
            b"CLIENT_ERROR invalid exptime argument\r\n"
        );
    }

    #[test]
    fn bget_is_get() {
        assert_eq!(text(b"bget a b\r\n"), text(b"get a b\r\n"));
        assert_eq!(reply(&fail(b"bget\r\n")), b"ERROR\r\n");
    }

    #[test]
    fn admin_commands() {
        let admin = |line: &[u8]| match text(line) {
            TextRequest::Admin(a) => a,
            other => panic!("not admin: {other:?}"),
        };
        let a = admin(b"cache_memlimit 100 noreply\r\n");
        assert_eq!(
            (a.command, a.args, a.noreply),
            (AdminCommand::CacheMemlimit, vec![b("100")], true)
        );
        assert_eq!(
            one(b"cache_memlimit 100 noreply\r\n").reply_shape(),
            ReplyShape::None
        );
        // `shutdown` never reads `noreply`: it is an argument.
        let a = admin(b"shutdown noreply\r\n");
        assert_eq!((a.args, a.noreply), (vec![b("noreply")], false));
        let a = admin(b"lru_crawler metadump all\r\n");
        assert_eq!(
            (a.command, a.args),
            (AdminCommand::LruCrawlerMetadump, vec![b("all")])
        );
        assert_eq!(admin(b"watch noreply\r\n").args, Vec::<Bytes>::new());
        for line in [
            &b"cache_memlimit 100 noreply\r\n"[..],
            b"slabs reassign 1 2\r\n",
            b"slabs automove 1 noreply\r\n",
            b"slabs\r\n",
            b"lru_crawler metadump all\r\n",
            b"lru_crawler crawl 1\r\n",
            b"lru tune 10 10 0.1 2\r\n",
            b"lru noreply\r\n",
            b"watch fetchers mutations\r\n",
            b"extstore item_age 10 noreply\r\n",
            b"shutdown graceful\r\n",
            b"refresh_certs\r\n",
        ] {
            roundtrip(line);
        }
        for line in [
            &b"cache_memlimit\r\n"[..],
            b"cache_memlimit 1 2 3\r\n",
            b"lru\r\n",
            b"extstore\r\n",
            b"misbehave\r\n",
            b"debugtime 1\r\n",
        ] {
            assert_eq!(reply(&fail(line)), b"ERROR\r\n");
        }
    }

    #[test]
    fn unknown_and_empty() {
        for bad in [&b"bogus\r\n"[..], b"\r\n", b"   \r\n", b"GET k\r\n", b"\n"] {
            let e = fail(bad);
            assert_eq!(reply(&e), b"ERROR\r\n");
            assert_eq!(e.discard, bad.len());
            assert!(!e.close);
        }
    }

    #[test]
    fn key_rewriting_shares_value() {
        let mut r = text(b"set k 0 0 3\r\nabc\r\n");
        let value_ptr = match &r {
            TextRequest::Store(s) => s.value.as_ptr(),
            _ => unreachable!(),
        };
        r.map_keys(|k| {
            let mut p = BytesMut::from(&b"t1:"[..]);
            p.extend_from_slice(k);
            p.freeze()
        });
        match &r {
            TextRequest::Store(s) => assert_eq!(s.value.as_ptr(), value_ptr),
            _ => unreachable!(),
        }
        assert_eq!(encode_req(&Request::Text(r)), b"set t1:k 0 0 3\r\nabc\r\n");
        let mut g = text(b"get a b\r\n");
        g.map_keys(|k| Bytes::from([b"x_", &k[..]].concat()));
        assert_eq!(encode_req(&Request::Text(g)), b"get x_a x_b\r\n");
    }

    #[test]
    fn pipeline_parses_in_order() {
        let mut buf = BytesMut::from(&b"get a\r\nset b 0 0 1\r\nx\r\nmn\r\nget c"[..]);
        let mut seen = Vec::new();
        while let Some(r) = parse_request(&mut buf, &lim()).unwrap() {
            seen.push(r);
        }
        assert_eq!(seen.len(), 3);
        assert_eq!(&buf[..], b"get c");
        assert!(seen[2].is_barrier());
    }
}

mod text_responses {
    use super::*;

    fn resp(input: &[u8]) -> Response {
        let mut buf = BytesMut::from(input);
        let r = parse_response(&mut buf, &lim()).unwrap().expect("complete");
        assert!(buf.is_empty(), "left {:?}", buf);
        let mut out = BytesMut::new();
        r.encode(&mut out);
        assert_eq!(&out[..], input, "re-encoding");
        r
    }

    fn t(input: &[u8]) -> TextResponse {
        match resp(input) {
            Response::Text(t) => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn simple_lines() {
        assert_eq!(t(b"END\r\n"), TextResponse::End);
        assert_eq!(t(b"STORED\r\n"), TextResponse::Stored);
        assert_eq!(t(b"NOT_STORED\r\n"), TextResponse::NotStored);
        assert_eq!(t(b"EXISTS\r\n"), TextResponse::Exists);
        assert_eq!(t(b"NOT_FOUND\r\n"), TextResponse::NotFound);
        assert_eq!(t(b"DELETED\r\n"), TextResponse::Deleted);
        assert_eq!(t(b"TOUCHED\r\n"), TextResponse::Touched);
        assert_eq!(t(b"OK\r\n"), TextResponse::Ok);
        assert_eq!(t(b"RESET\r\n"), TextResponse::Reset);
        assert_eq!(t(b"ERROR\r\n"), TextResponse::Error);
        assert_eq!(t(b"42\r\n"), TextResponse::Number(42));
        assert_eq!(t(b"VERSION 1.6.21\r\n"), TextResponse::Version(b("1.6.21")));
        assert_eq!(
            t(b"STAT curr_items 10\r\n"),
            TextResponse::Stat {
                name: b("curr_items"),
                value: b("10")
            }
        );
        assert_eq!(
            t(b"STAT version 1.6 x\r\n"),
            TextResponse::Stat {
                name: b("version"),
                value: b("1.6 x")
            }
        );
        assert_eq!(
            t(b"CLIENT_ERROR bad data chunk\r\n"),
            TextResponse::ClientError {
                kind: ErrorReplyKind::Other,
                message: b("bad data chunk")
            }
        );
        assert_eq!(
            t(b"SERVER_ERROR out of memory storing object\r\n"),
            TextResponse::ServerError {
                kind: ErrorReplyKind::OutOfMemory,
                message: b("out of memory storing object")
            }
        );
        assert_eq!(
            t(b"ITEM foo [5 b; 0 s]\r\n"),
            TextResponse::Other(b("ITEM foo [5 b; 0 s]"))
        );
    }

    #[test]
    fn error_lines_get_their_kind_when_parsed() {
        use ErrorReplyKind::*;
        let kind = |input: &[u8]| match t(input) {
            TextResponse::ClientError { kind, .. } | TextResponse::ServerError { kind, .. } => kind,
            other => panic!("not an error line: {other:?}"),
        };
        assert_eq!(
            kind(b"SERVER_ERROR object too large for cache\r\n"),
            TooLarge
        );
        assert_eq!(kind(b"SERVER_ERROR out of memory\r\n"), OutOfMemory);
        assert_eq!(
            kind(b"SERVER_ERROR out of memory storing object\r\n"),
            OutOfMemory
        );
        assert_eq!(
            kind(b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
            NonNumeric
        );
        // Whole messages or memcached's prefix, as sent; nothing else.
        assert_eq!(
            kind(b"SERVER_ERROR Out of memory allocating new item\r\n"),
            Other
        );
        assert_eq!(kind(b"SERVER_ERROR object too large for cache!\r\n"), Other);
        assert_eq!(kind(b"SERVER_ERROR value too large\r\n"), Other);
        assert_eq!(kind(b"CLIENT_ERROR bad data chunk\r\n"), Other);
        assert_eq!(kind(b"CLIENT_ERROR \r\n"), Other);
        assert_eq!(
            TextResponse::server_error(b("out of memory")),
            TextResponse::ServerError {
                kind: OutOfMemory,
                message: b("out of memory")
            }
        );
    }

    #[test]
    fn values() {
        assert_eq!(
            t(b"VALUE k 3 5\r\nab\r\nc\r\n"),
            TextResponse::Value {
                key: b("k"),
                flags: 3,
                cas: None,
                data: b("ab\r\nc")
            }
        );
        assert_eq!(
            t(b"VALUE k 0 0 99\r\n\r\n"),
            TextResponse::Value {
                key: b("k"),
                flags: 0,
                cas: Some(99),
                data: b("")
            }
        );
        let mut buf = BytesMut::from(&b"VALUE k 0 5\r\nab"[..]);
        assert_eq!(parse_response(&mut buf, &lim()), Ok(None));
        assert_eq!(buf.len(), 15);
        let mut buf = BytesMut::from(&b"VALUE k 0 2\r\nabc\r\n"[..]);
        let e = parse_response(&mut buf, &lim()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadResponse);
        assert!(e.close);
        let mut buf = BytesMut::from(&b"VALUE k x 2\r\nab\r\n"[..]);
        assert!(parse_response(&mut buf, &lim()).unwrap_err().close);
        let small = Limits {
            max_value_len: 1,
            ..lim()
        };
        let mut buf = BytesMut::from(&b"VALUE k 0 2\r\n"[..]);
        let e = parse_response(&mut buf, &small).unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooLarge);
        assert_eq!(e.discard, 13 + 4);
    }

    #[test]
    fn multi_terminators() {
        assert!(TextResponse::End.ends_multi());
        assert!(TextResponse::server_error(b("x")).ends_multi());
        assert!(!TextResponse::Stored.ends_multi());
        assert!(
            !TextResponse::Stat {
                name: b("a"),
                value: b("b")
            }
            .ends_multi()
        );
        let get_reply = b"VALUE a 0 1\r\n1\r\nVALUE b 0 1\r\n2\r\nEND\r\nSTORED\r\n";
        let mut buf = BytesMut::from(&get_reply[..]);
        let mut n = 0;
        loop {
            let r = parse_response(&mut buf, &lim()).unwrap().unwrap();
            n += 1;
            if r.ends_multi() {
                break;
            }
        }
        assert_eq!(n, 3);
        assert_eq!(&buf[..], b"STORED\r\n");
    }

    #[test]
    fn long_reply_line_is_fatal() {
        let line = format!("SERVER_ERROR {}", "x".repeat(3000));
        let mut buf = BytesMut::from(line.as_bytes());
        let e = parse_response(&mut buf, &lim()).unwrap_err();
        assert!(e.close);
        assert_eq!(e.kind, ErrorKind::BadResponse);
    }
}

mod meta_requests {
    use super::*;

    #[test]
    fn mg() {
        let m = meta(b"mg foo v k t O123 q\r\n");
        assert_eq!(m.command, MetaCommand::Get);
        assert_eq!(m.key, b("foo"));
        assert!(m.quiet() && m.has_flag(b'k') && !m.base64_key());
        assert_eq!(m.opaque(), Some(&b("123")));
        assert_eq!(
            m.flags.iter().map(|f| f.flag).collect::<Vec<_>>(),
            b"vktOq".to_vec()
        );
        assert_eq!(m.value, None);
        assert_eq!(m.reply_shape(), ReplyShape::Quiet);
        roundtrip(b"mg foo v k t O123 q\r\n");
        roundtrip(b"mg foo\r\n");
        assert_eq!(meta(b"mg foo v\r\n").reply_shape(), ReplyShape::One);
        roundtrip(b"mg foo N30 R10 T-1 E5 s f c h l u\r\n");
    }

    #[test]
    fn base64_keys() {
        // "foo bar" has a space: only expressible as a base64 key.
        let mut m = meta(b"mg Zm9vIGJhcg== b v\r\n");
        assert!(m.base64_key());
        assert_eq!(m.decoded_key(), Some(b("foo bar")));
        m.set_decoded_key(b"t1:foo bar");
        assert_eq!(m.decoded_key(), Some(b("t1:foo bar")));
        assert_eq!(
            encode_req(&Request::Meta(m)),
            b"mg dDE6Zm9vIGJhcg== b v\r\n"
        );
        let mut plain = meta(b"md foo q\r\n");
        plain.set_decoded_key(b"t1:foo");
        assert_eq!(encode_req(&Request::Meta(plain)), b"md t1:foo q\r\n");
        for bad in [&b"mg !!!! b\r\n"[..], b"mg Zm9 b\r\n"] {
            assert_eq!(reply(&fail(bad)), b"CLIENT_ERROR error decoding key\r\n");
        }
    }

    #[test]
    fn ms() {
        let m = meta(b"ms foo 4 T30 F5 MA q\r\na\r\nb\r\n");
        assert_eq!(m.command, MetaCommand::Set);
        assert_eq!(m.value, Some(b("a\r\nb")));
        assert_eq!(m.store_mode(), Some(StoreMode::Append));
        assert!(m.quiet());
        roundtrip(b"ms foo 4 T30 F5 MA q\r\na\r\nb\r\n");
        roundtrip(b"ms foo 0\r\n\r\n");
        for (tok, mode) in [
            ("ME", StoreMode::Add),
            ("MP", StoreMode::Prepend),
            ("MR", StoreMode::Replace),
            ("MS", StoreMode::Set),
            ("c", StoreMode::Set),
        ] {
            let m = meta(format!("ms k 1 {tok}\r\nx\r\n").as_bytes());
            assert_eq!(m.store_mode(), Some(mode));
        }
        incomplete(b"ms foo 4 T30\r\nab");
        incomplete(b"ms foo 4 T30\r\nabcd\r");
    }

    #[test]
    fn ms_errors_swallow_the_block() {
        let input = b"ms foo 3 MZ\r\nabc\r\n";
        let e = fail(input);
        assert_eq!(reply(&e), b"CLIENT_ERROR invalid mode for ms M token\r\n");
        assert_eq!(e.discard, input.len());
        assert!(!e.close);
        assert_eq!(e.protocol, Protocol::Meta);
        let e = fail(b"ms foo 3 T30 T40\r\n");
        assert_eq!(reply(&e), b"CLIENT_ERROR duplicate flag\r\n");
        assert_eq!(e.discard, 18 + 5);
        let e = fail(b"ms foo x\r\nabc\r\n");
        assert_eq!(reply(&e), b"CLIENT_ERROR bad command line format\r\n");
        assert_eq!(e.discard, 10);
        assert_eq!(
            reply(&fail(b"ms foo\r\n")),
            b"CLIENT_ERROR bad command line format\r\n"
        );
        assert_eq!(fail(b"ms foo -1\r\n").kind, ErrorKind::BadCommandLine);
        let limits = Limits {
            max_value_len: 2,
            ..lim()
        };
        let e = fail_with(b"ms foo 3\r\n", &limits);
        assert_eq!(reply(&e), b"SERVER_ERROR object too large for cache\r\n");
        assert_eq!(e.discard, 10 + 5);
        let e = fail(b"ms foo 3\r\nabcXY");
        assert_eq!(reply(&e), b"CLIENT_ERROR bad data chunk\r\n");
        assert!(e.close);
    }

    #[test]
    fn md_ma_mn_me() {
        let m = meta(b"md foo q C12 I T30 x\r\n");
        assert_eq!(m.command, MetaCommand::Delete);
        roundtrip(b"md foo q C12 I T30 x\r\n");
        let m = meta(b"ma cnt MD D5 J10 N0 v\r\n");
        assert_eq!(m.arith_mode(), Some(ArithMode::Decr));
        assert_eq!(meta(b"ma cnt\r\n").arith_mode(), Some(ArithMode::Incr));
        assert_eq!(meta(b"ma cnt M-\r\n").arith_mode(), Some(ArithMode::Decr));
        assert_eq!(meta(b"ma cnt M+\r\n").arith_mode(), Some(ArithMode::Incr));
        assert_eq!(meta(b"mg k\r\n").arith_mode(), None);
        roundtrip(b"ma cnt MD D5 J10 N0 v\r\n");
        assert_eq!(
            reply(&fail(b"ma cnt MX\r\n")),
            b"CLIENT_ERROR invalid mode for ma M token\r\n"
        );
        assert_eq!(
            reply(&fail(b"ma cnt Dx\r\n")),
            b"CLIENT_ERROR invalid numeric delta value\r\n"
        );
        assert_eq!(
            reply(&fail(b"ma cnt J-1\r\n")),
            b"CLIENT_ERROR invalid numeric initial value\r\n"
        );
        let n = meta(b"mn\r\n");
        assert_eq!(n.command, MetaCommand::Noop);
        assert!(n.is_barrier());
        assert_eq!(n.reply_shape(), ReplyShape::One);
        roundtrip(b"mn\r\n");
        let d = meta(b"me foo\r\n");
        assert_eq!(d.command, MetaCommand::Debug);
        roundtrip(b"me foo\r\n");
    }

    #[test]
    fn flag_errors() {
        let r = |l: &[u8]| reply(&fail(l));
        assert_eq!(r(b"mg foo v v\r\n"), b"CLIENT_ERROR duplicate flag\r\n");
        assert_eq!(r(b"mg foo \xff\r\n"), b"CLIENT_ERROR duplicate flag\r\n");
        assert_eq!(r(b"mg foo z\r\n"), b"CLIENT_ERROR invalid flag\r\n");
        assert_eq!(
            r(b"mg foo Tx\r\n"),
            b"CLIENT_ERROR bad token in command line format\r\n"
        );
        assert_eq!(
            r(b"md foo Cx\r\n"),
            b"CLIENT_ERROR bad token in command line format\r\n"
        );
        assert_eq!(
            r(b"ms foo 1 Fx\r\nx\r\n"),
            b"CLIENT_ERROR bad command line format\r\n"
        );
        let opaque = format!("mg foo O{}\r\n", "1".repeat(32));
        assert_eq!(
            r(opaque.as_bytes()),
            b"CLIENT_ERROR opaque token too long\r\n"
        );
        meta(format!("mg foo O{}\r\n", "1".repeat(31)).as_bytes());
        // 2 + 19 tokens is one over memcached's budget of 20; 2 + 18 fits.
        let many = "mg foo v k s t c f h l u q O1 T1 N1 R1 E1 P L x I\r\n";
        meta(b"mg foo v k s t c f h l u q O1 T1 N1 R1 E1 P L x\r\n");
        assert_eq!(
            r(many.as_bytes()),
            b"CLIENT_ERROR options flags are too long\r\n"
        );
        assert_eq!(r(b"mg\r\n"), b"ERROR\r\n");
        let long = format!("mg {}\r\n", "k".repeat(251));
        assert_eq!(
            r(long.as_bytes()),
            b"CLIENT_ERROR bad command line format\r\n"
        );
    }

    #[test]
    fn flag_editing() {
        let mut m = meta(b"mg foo v\r\n");
        m.set_flag(b'O', "77");
        m.set_flag(b'q', "");
        assert_eq!(encode_req(&Request::Meta(m.clone())), b"mg foo v O77 q\r\n");
        m.set_flag(b'O', "78");
        assert_eq!(m.remove_flag(b'q').map(|f| f.flag), Some(b'q'));
        assert_eq!(encode_req(&Request::Meta(m)), b"mg foo v O78\r\n");
    }

    #[test]
    fn quiet_suppression_table() {
        use MetaCode::*;
        use MetaCommand::*;
        assert!(Get.quiet_suppresses(En));
        assert!(!Get.quiet_suppresses(Hd) && !Get.quiet_suppresses(Va));
        assert!(Set.quiet_suppresses(Hd));
        assert!(!Set.quiet_suppresses(Ns) && !Set.quiet_suppresses(Ex));
        assert!(Delete.quiet_suppresses(Hd) && !Delete.quiet_suppresses(Nf));
        assert!(!Delete.quiet_suppresses(Ex));
        assert!(Arithmetic.quiet_suppresses(Hd) && !Arithmetic.quiet_suppresses(Nf));
        assert!(!Arithmetic.quiet_suppresses(Va));
        assert!(!Noop.quiet_suppresses(Mn));
    }
}

mod meta_responses {
    use super::*;

    fn m(input: &[u8]) -> MetaResponse {
        let mut buf = BytesMut::from(input);
        let r = parse_response(&mut buf, &lim()).unwrap().expect("complete");
        assert!(buf.is_empty());
        let mut out = BytesMut::new();
        r.encode(&mut out);
        assert_eq!(&out[..], input);
        match r {
            Response::Meta(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn codes() {
        for (line, code) in [
            (&b"HD\r\n"[..], MetaCode::Hd),
            (b"EN\r\n", MetaCode::En),
            (b"NF\r\n", MetaCode::Nf),
            (b"NS\r\n", MetaCode::Ns),
            (b"EX\r\n", MetaCode::Ex),
            (b"MN\r\n", MetaCode::Mn),
        ] {
            assert_eq!(m(line), MetaResponse::new(code));
        }
        let r = m(b"HD c5 Oabc\r\n");
        assert_eq!(r.opaque(), Some(&b("abc")));
        assert_eq!(r.flag(b'c').map(|f| f.token.clone()), Some(b("5")));
    }

    #[test]
    fn va_and_keys() {
        let mut r = m(b"VA 4 f3 kt1:foo c9\r\nab\r\n\r\n");
        assert_eq!(r.code, MetaCode::Va);
        assert_eq!(r.value, Some(b("ab\r\n")));
        assert_eq!(r.returned_key(), Some(b("t1:foo")));
        r.set_returned_key(b"foo");
        let mut out = BytesMut::new();
        r.encode(&mut out);
        assert_eq!(&out[..], b"VA 4 f3 kfoo c9\r\nab\r\n\r\n");
        let mut r = m(b"HD kdDE6Zm9v b\r\n");
        assert_eq!(r.returned_key(), Some(b("t1:foo")));
        r.set_returned_key(b"foo");
        assert_eq!(r.flag(b'k').unwrap().token, b("Zm9v"));
        let mut buf = BytesMut::from(&b"VA 4 f3\r\nab"[..]);
        assert_eq!(parse_response(&mut buf, &lim()), Ok(None));
        let mut buf = BytesMut::from(&b"VA 1\r\nabc"[..]);
        assert!(parse_response(&mut buf, &lim()).unwrap_err().close);
        let mut buf = BytesMut::from(&b"VA x\r\n"[..]);
        assert!(parse_response(&mut buf, &lim()).unwrap_err().close);
    }

    #[test]
    fn me() {
        let r = m(b"ME foo exp=-1 la=5 cas=2 fetch=no cls=1 size=63\r\n");
        assert_eq!(r.key, Some(b("foo")));
        assert_eq!(r.flags.len(), 6);
    }
}

mod binary_protocol {
    use super::*;
    use bytes::BufMut;

    pub(super) fn frame(op: u8, extras: &[u8], key: &[u8], value: &[u8], opaque: u32) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u8(0x80);
        out.put_u8(op);
        out.put_u16(key.len() as u16);
        out.put_u8(extras.len() as u8);
        out.put_u8(0);
        out.put_u16(0);
        out.put_u32((extras.len() + key.len() + value.len()) as u32);
        out.put_u32(opaque);
        out.put_u64(0);
        out.put_slice(extras);
        out.put_slice(key);
        out.put_slice(value);
        out.to_vec()
    }

    fn bin(input: &[u8]) -> BinaryRequest {
        match one(input) {
            Request::Binary(r) => r,
            other => panic!("{other:?}"),
        }
    }

    /// A well-formed frame for every opcode.
    fn valid(op: Opcode) -> Vec<u8> {
        use Opcode::*;
        let o = op as u8;
        match op {
            Get | GetQ | GetK | GetKQ | Delete | DeleteQ => frame(o, b"", b"key", b"", 1),
            Set | Add | Replace | SetQ | AddQ | ReplaceQ => {
                frame(o, &[0, 0, 0, 7, 0, 0, 0, 60], b"key", b"v\r\nal", 1)
            }
            Increment | Decrement | IncrementQ | DecrementQ => {
                let mut e = Vec::new();
                e.extend_from_slice(&5u64.to_be_bytes());
                e.extend_from_slice(&1u64.to_be_bytes());
                e.extend_from_slice(&0u32.to_be_bytes());
                frame(o, &e, b"n", b"", 1)
            }
            Quit | QuitQ | Noop | Version | SaslListMechs => frame(o, b"", b"", b"", 1),
            Flush | FlushQ => frame(o, &[0, 0, 0, 9], b"", b"", 1),
            Append | Prepend | AppendQ | PrependQ => frame(o, b"", b"key", b"tail", 1),
            SaslAuth | SaslStep => frame(o, b"", b"PLAIN", b"\0u\0p", 1),
            Stat => frame(o, b"", b"items", b"", 1),
            Touch | Gat | GatQ | GatK | GatKQ => frame(o, &[0, 0, 0, 30], b"key", b"", 1),
        }
    }

    #[test]
    fn every_opcode_parses_and_roundtrips() {
        for op in Opcode::ALL {
            let f = valid(op);
            let r = bin(&f);
            assert_eq!(r.opcode, op);
            assert_eq!(Opcode::from_u8(op as u8), Some(op));
            assert_eq!(encode_req(&Request::Binary(r)), f, "{op:?}");
            // Split anywhere: incomplete until the last byte.
            for cut in [1, 23, 24, f.len() - 1] {
                if cut < f.len() {
                    incomplete(&f[..cut]);
                }
            }
        }
        assert_eq!(Opcode::from_u8(0x1f), None);
        assert_eq!(Opcode::from_u8(0x25), None);
    }

    #[test]
    fn decoded_extras() {
        assert_eq!(
            bin(&valid(Opcode::Set)).decoded_extras(),
            Extras::Store {
                flags: 7,
                exptime: 60
            }
        );
        assert_eq!(
            bin(&valid(Opcode::Increment)).decoded_extras(),
            Extras::Arith {
                delta: 5,
                initial: 1,
                exptime: 0
            }
        );
        assert_eq!(
            bin(&valid(Opcode::Gat)).decoded_extras(),
            Extras::Exptime(30)
        );
        assert_eq!(
            bin(&valid(Opcode::Flush)).decoded_extras(),
            Extras::Exptime(9)
        );
        assert_eq!(
            bin(&frame(0x08, b"", b"", b"", 0)).decoded_extras(),
            Extras::None
        );
        let e = Extras::Arith {
            delta: 1,
            initial: 2,
            exptime: 3,
        };
        assert_eq!(e.to_bytes().len(), 20);
        let r = bin(&valid(Opcode::Set));
        assert_eq!(r.key, b("key"));
        assert_eq!(r.value, b("v\r\nal"));
        assert_eq!(r.opaque, 1);
    }

    fn invalid(f: &[u8]) {
        let e = fail(f);
        assert_eq!(e.kind, ErrorKind::InvalidArguments, "{f:?}");
        assert!(e.close);
        let out = reply(&e);
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], f[1]);
        assert_eq!(&out[6..8], &[0, 4]);
        assert_eq!(&out[24..], b"Invalid arguments");
    }

    #[test]
    fn shape_violations_are_invalid_arguments() {
        invalid(&frame(0x00, b"", b"", b"", 0)); // get without key
        invalid(&frame(0x00, &[0; 4], b"k", b"", 0)); // get with extras
        invalid(&frame(0x00, b"", b"k", b"v", 0)); // get with value
        invalid(&frame(0x01, &[0; 4], b"k", b"v", 0)); // set with short extras
        invalid(&frame(0x01, &[0; 8], b"", b"v", 0)); // set without key
        invalid(&frame(0x04, b"", b"k", b"v", 0)); // delete with value
        invalid(&frame(0x05, &[0; 8], b"k", b"", 0)); // incr short extras
        invalid(&frame(0x07, b"", b"k", b"", 0)); // quit with key
        invalid(&frame(0x08, &[0; 2], b"", b"", 0)); // flush odd extras
        invalid(&frame(0x0a, b"", b"", b"x", 0)); // noop with body
        invalid(&frame(0x0b, &[0; 4], b"", b"", 0)); // version with extras
        invalid(&frame(0x0e, &[0; 8], b"k", b"v", 0)); // append with extras
        invalid(&frame(0x10, &[0; 4], b"", b"", 0)); // stat with extras
        invalid(&frame(0x1c, &[0; 4], b"", b"", 0)); // touch without key
        invalid(&frame(0x1d, b"", b"k", b"", 0)); // gat without extras
        invalid(&frame(0x20, b"", b"k", b"", 0)); // sasl list with key
        invalid(&frame(0x21, b"", b"", b"x", 0)); // sasl auth w/o mech
        invalid(&frame(0x00, b"", &[b'k'; 251], b"", 0)); // key too long
        // Body shorter than extras + key.
        let mut f = frame(0x00, b"", b"key", b"", 0);
        f[11] = 2;
        invalid(&f);
    }

    /// memcached 1.6 answers VERBOSITY "Unknown command" whatever its
    /// shape, and so does guard: the frame is skipped, the stream kept.
    #[test]
    fn verbosity_is_an_unknown_opcode() {
        for f in [
            frame(0x1b, &[0, 0, 0, 1], b"", b"", 3),
            frame(0x1b, b"", b"", b"", 3),
            frame(0x1b, &[0; 8], b"k", b"v", 3),
        ] {
            let e = fail(&f);
            assert_eq!(e.kind, ErrorKind::UnknownCommand);
            assert!(!e.close);
            assert_eq!(e.discard, f.len());
            let out = reply(&e);
            assert_eq!((out[1], &out[6..8]), (0x1b, &[0x00, 0x81][..]));
            assert_eq!(&out[24..], b"Unknown command");
        }
        assert_eq!(Opcode::from_u8(0x1b), None);
    }

    #[test]
    fn unknown_opcode_swallows_body() {
        let f = frame(0x40, b"ex", b"key", b"value", 9);
        let e = fail(&f[..24]);
        assert_eq!(e.kind, ErrorKind::UnknownCommand);
        assert!(!e.close);
        assert_eq!(e.discard, f.len());
        let out = reply(&e);
        assert_eq!(out[1], 0x40);
        assert_eq!(&out[6..8], &[0x00, 0x81]);
        assert_eq!(&out[12..16], &9u32.to_be_bytes());
        assert_eq!(&out[24..], b"Unknown command");
    }

    #[test]
    fn too_large_value_swallowed() {
        let limits = Limits {
            max_value_len: 4,
            ..lim()
        };
        let f = frame(0x11, &[0; 8], b"k", b"12345", 3);
        let e = fail_with(&f[..24], &limits);
        assert_eq!(e.kind, ErrorKind::TooLarge);
        assert_eq!(e.discard, f.len());
        assert!(!e.close);
        let out = reply(&e);
        assert_eq!(&out[6..8], &[0, 3]);
        assert_eq!(&out[24..], b"Too large.");
    }

    #[test]
    fn bad_magic_closes_silently() {
        let mut buf = BytesMut::from(&b"\x81\x00"[..]);
        let e = binary::parse_request(&mut buf, &lim()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadMagic);
        assert!(e.close);
        assert_eq!(reply(&e), b"");
        let mut empty = BytesMut::new();
        assert_eq!(binary::parse_request(&mut empty, &lim()), Ok(None));
    }

    #[test]
    fn quiet_semantics() {
        use Opcode::*;
        assert!(GetQ.quiet_suppresses(Status::KEY_NOT_FOUND));
        assert!(!GetQ.quiet_suppresses(Status::SUCCESS));
        assert!(GetKQ.quiet_suppresses(Status::KEY_NOT_FOUND));
        assert!(GatQ.quiet_suppresses(Status::KEY_NOT_FOUND));
        assert!(SetQ.quiet_suppresses(Status::SUCCESS));
        assert!(!SetQ.quiet_suppresses(Status::KEY_EXISTS));
        assert!(DeleteQ.quiet_suppresses(Status::SUCCESS));
        assert!(!DeleteQ.quiet_suppresses(Status::KEY_NOT_FOUND));
        assert!(!Get.quiet_suppresses(Status::KEY_NOT_FOUND));
        assert_eq!(bin(&valid(GetKQ)).reply_shape(), ReplyShape::Quiet);
        assert_eq!(bin(&valid(Get)).reply_shape(), ReplyShape::One);
        assert_eq!(bin(&valid(Quit)).reply_shape(), ReplyShape::One);
        assert_eq!(bin(&valid(QuitQ)).reply_shape(), ReplyShape::None);
        assert_eq!(bin(&valid(Stat)).reply_shape(), ReplyShape::Multi);
        assert!(Request::Binary(bin(&valid(Noop))).is_barrier());
        assert!(Opcode::ALL.iter().filter(|o| o.is_quiet()).count() == 14);
        assert!(Set.has_value() && !Get.has_value());
    }

    #[test]
    fn key_rewrite_recomputes_lengths() {
        let mut r = bin(&valid(Opcode::Set));
        r.key = b("tenant:key");
        let out = encode_req(&Request::Binary(r.clone()));
        assert_eq!(
            out,
            frame(
                0x01,
                &[0, 0, 0, 7, 0, 0, 0, 60],
                b"tenant:key",
                b"v\r\nal",
                1
            )
        );
        assert_eq!(bin(&out), r);
    }

    fn resp_frame(op: u8, status: u16, extras: &[u8], key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut f = frame(op, extras, key, value, 5);
        f[0] = 0x81;
        f[6..8].copy_from_slice(&status.to_be_bytes());
        f
    }

    #[test]
    fn responses() {
        let f = resp_frame(0x0c, 0, &[0, 0, 0, 3], b"key", b"val");
        let mut buf = BytesMut::from(&f[..]);
        let r = match parse_response(&mut buf, &lim()).unwrap().unwrap() {
            Response::Binary(r) => r,
            other => panic!("{other:?}"),
        };
        assert!(buf.is_empty());
        assert_eq!(r.flags(), Some(3));
        assert_eq!(r.key, b("key"));
        assert_eq!(r.value, b("val"));
        assert_eq!(r.opaque, 5);
        let mut out = BytesMut::new();
        r.encode(&mut out);
        assert_eq!(&out[..], &f[..]);
        let mut partial = BytesMut::from(&f[..30]);
        assert_eq!(parse_response(&mut partial, &lim()), Ok(None));

        let stat = resp_frame(0x10, 0, b"", b"pid", b"42");
        let end = resp_frame(0x10, 0, b"", b"", b"");
        let mut buf = BytesMut::from(&[stat.clone(), end.clone()].concat()[..]);
        let a = parse_response(&mut buf, &lim()).unwrap().unwrap();
        let z = parse_response(&mut buf, &lim()).unwrap().unwrap();
        assert!(!a.ends_multi() && z.ends_multi());

        let err = BinaryResponse::error(0x00, 7, Status::KEY_NOT_FOUND);
        let mut out = BytesMut::new();
        err.encode(&mut out);
        assert_eq!(
            &out[..12],
            &resp_frame(0x00, 1, b"", b"", b"Not found")[..12]
        );
        assert_eq!(&out[24..], b"Not found");
        assert!(err.ends_multi());

        let mut bad = BytesMut::from(&f[..]);
        bad[0] = 0x80;
        assert!(binary::parse_response(&mut bad, &lim()).unwrap_err().close);
        let mut short = BytesMut::from(&resp_frame(0, 0, b"", b"key", b"")[..]);
        short[11] = 1;
        assert!(parse_response(&mut short, &lim()).unwrap_err().close);
    }

    #[test]
    fn status_messages() {
        assert_eq!(Status::KEY_EXISTS.message(), "Data exists for key.");
        assert_eq!(Status::NOT_STORED.message(), "Not stored.");
        assert_eq!(
            Status::NON_NUMERIC.message(),
            "Non-numeric server-side value for incr or decr"
        );
        assert_eq!(Status::AUTH_ERROR.message(), "Auth failure.");
        assert_eq!(Status::OUT_OF_MEMORY.message(), "Out of memory");
        assert_eq!(ErrorKind::UnknownCommand.binary_status(), Status(0x81));
        assert_eq!(ErrorKind::TooLarge.binary_status(), Status(0x03));
        assert_eq!(ErrorKind::InvalidArguments.binary_status(), Status(0x04));
    }

    #[test]
    fn protocol_detection() {
        assert_eq!(Protocol::detect(0x80), Protocol::Binary);
        assert_eq!(Protocol::detect(b'g'), Protocol::Text);
        assert_eq!(one(&valid(Opcode::Noop)).protocol(), Protocol::Binary);
        assert_eq!(one(b"mn\r\n").protocol(), Protocol::Meta);
        assert_eq!(one(b"get a\r\n").protocol(), Protocol::Text);
    }
}
