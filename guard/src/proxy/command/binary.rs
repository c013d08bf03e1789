//! Binary requests as meta requests, and their replies back as binary
//! frames with memcached's statuses.

use super::*;

fn binary_failure(op: Opcode, opaque: u32, e: &ProxyError) -> BinaryResponse {
    BinaryResponse {
        status: Status::TEMPORARY_FAILURE,
        value: Bytes::from_static(e.reply_text().as_bytes()),
        ..BinaryResponse::new(op as u8, opaque)
    }
}

/// The binary status for a backend reply that is not a meta reply: for
/// memcached's error lines, the status its binary protocol has for the
/// failure their parsed kind names, else one for the line's class; for
/// anything else (`ERROR`, a stray line), an internal error.
fn binary_error_status(r: &Response) -> Status {
    match r {
        Response::Text(TextResponse::ClientError { kind, .. }) => {
            error_reply_status(*kind).unwrap_or(Status::INVALID_ARGUMENTS)
        }
        Response::Text(TextResponse::ServerError { kind, .. }) => {
            error_reply_status(*kind).unwrap_or(Status::INTERNAL_ERROR)
        }
        _ => Status::INTERNAL_ERROR,
    }
}

/// The binary status of a failure the binary protocol names itself.
fn error_reply_status(kind: ErrorReplyKind) -> Option<Status> {
    match kind {
        ErrorReplyKind::TooLarge => Some(Status::VALUE_TOO_LARGE),
        ErrorReplyKind::OutOfMemory => Some(Status::OUT_OF_MEMORY),
        ErrorReplyKind::NonNumeric => Some(Status::NON_NUMERIC),
        ErrorReplyKind::Other => None,
    }
}

fn encode_binary(op: Opcode, resp: BinaryResponse) -> Reply {
    if op.quiet_suppresses(resp.status) {
        return Reply::default();
    }
    let mut out = BytesMut::new();
    resp.encode(&mut out);
    Reply { out, close: false }
}

/// Forwards a binary request; `render` maps a meta reply to the binary
/// response, errors are mapped here.
fn forward_binary(
    sh: &Cx,
    req: &BinaryRequest,
    command: MetaCommand,
    flags: Vec<MetaFlag>,
    value: Option<Bytes>,
    render: impl FnOnce(&Shared, MetaResponse) -> BinaryResponse + Send + 'static,
) -> Slot {
    let (op, opaque) = (req.opcode, req.opaque);
    let Ok(bkey) = sh.ns.backend_key(&req.key) else {
        // memcached's answer to a key over its limit.
        return Slot::Ready(encode_binary(
            op,
            BinaryResponse::error(op as u8, opaque, Status::INVALID_ARGUMENTS),
        ));
    };
    let is_read = command == MetaCommand::Get;
    let encode = |key: &[u8]| meta_req(command, key, flags, value);
    forward(sh, &bkey, encode, move |sh, r| {
        let resp = match r {
            Ok(Response::Meta(m)) => render(sh, m),
            Ok(other) => BinaryResponse::error(op as u8, opaque, binary_error_status(&other)),
            Err(_) if is_read && sh.miss_on_backend_error => {
                BinaryResponse::error(op as u8, opaque, Status::KEY_NOT_FOUND)
            }
            Err(e) => binary_failure(op, opaque, &e),
        };
        encode_binary(op, resp)
    })
}

pub(super) fn dispatch(req: BinaryRequest, sh: &Cx) -> Slot {
    use Opcode::*;
    let (op, opaque) = (req.opcode, req.opaque);
    let local = |resp: BinaryResponse| Slot::Ready(encode_binary(op, resp));
    match op {
        Get | GetQ | GetK | GetKQ | Gat | GatQ | GatK | GatKQ | Touch => binary_get(req, sh),
        Set | Add | Replace | SetQ | AddQ | ReplaceQ | Append | Prepend | AppendQ | PrependQ => {
            binary_store(req, sh)
        }
        Delete | DeleteQ => {
            let mut flags = Vec::new();
            if req.cas != 0 {
                flags.push(MetaFlag::new(b'C', token(req.cas)));
            }
            forward_binary(
                sh,
                &req,
                MetaCommand::Delete,
                flags,
                None,
                move |_, m| match m.code {
                    MetaCode::Hd => BinaryResponse::new(op as u8, opaque),
                    MetaCode::Nf => BinaryResponse::error(op as u8, opaque, Status::KEY_NOT_FOUND),
                    MetaCode::Ex => BinaryResponse::error(op as u8, opaque, Status::KEY_EXISTS),
                    _ => BinaryResponse::error(op as u8, opaque, Status::INTERNAL_ERROR),
                },
            )
        }
        Increment | Decrement | IncrementQ | DecrementQ => binary_arith(req, sh),
        Flush | FlushQ => {
            let delay = match req.decoded_extras() {
                Extras::Exptime(d) => i64::from(d),
                _ => 0,
            };
            // memcached `-F` answers both forms with its auth error
            // (`process_bin_flush`), the quiet one too: quiet hides
            // success only.
            flush(
                sh,
                delay,
                encode_binary(op, BinaryResponse::new(op as u8, opaque)),
                encode_binary(
                    op,
                    BinaryResponse::error(op as u8, opaque, Status::AUTH_ERROR),
                ),
            )
        }
        Noop => local(BinaryResponse::new(op as u8, opaque)),
        Version => local(BinaryResponse {
            value: Bytes::from(crate::proxy::version()),
            ..BinaryResponse::new(op as u8, opaque)
        }),
        Quit => {
            let mut r = encode_binary(op, BinaryResponse::new(op as u8, opaque));
            r.close = true;
            Slot::Ready(r)
        }
        QuitQ => Slot::Ready(Reply {
            out: BytesMut::new(),
            close: true,
        }),
        Stat => admin::binary_stat(&req, sh),
        // The open tenant: answer as a memcached without SASL, which SASL
        // clients take as "no authentication needed".
        SaslListMechs | SaslAuth | SaslStep if !sh.authenticated => local(BinaryResponse::error(
            op as u8,
            opaque,
            Status::UNKNOWN_COMMAND,
        )),
        SaslListMechs => local(auth::sasl_list_mechs_response(&req)),
        // Already authenticated: one identity per connection.
        SaslAuth | SaslStep => local(BinaryResponse {
            status: Status::NOT_SUPPORTED,
            value: Bytes::from_static(b"Already authenticated"),
            ..BinaryResponse::new(op as u8, opaque)
        }),
    }
}

fn binary_get(req: BinaryRequest, sh: &Cx) -> Slot {
    use Opcode::*;
    let (op, opaque) = (req.opcode, req.opaque);
    let mut flags = vec![flag(b'f'), flag(b'c')];
    if op != Touch {
        flags.insert(0, flag(b'v'));
    }
    if matches!(op, Gat | GatQ | GatK | GatKQ | Touch) {
        ProxyStats::add(&sh.stats.cmd_touch, 1);
        if let Extras::Exptime(e) = req.decoded_extras() {
            flags.push(MetaFlag::new(b'T', token(e as i32)));
        }
    }
    if op != Touch {
        ProxyStats::add(&sh.stats.cmd_get, 1);
    }
    let with_key = matches!(op, GetK | GetKQ | GatK | GatKQ);
    let key = req.key.clone();
    forward_binary(
        sh,
        &req,
        MetaCommand::Get,
        flags,
        None,
        move |sh, m| match m.code {
            MetaCode::Va | MetaCode::Hd => {
                ProxyStats::add(&sh.stats.get_hits, 1);
                BinaryResponse {
                    cas: flag_u64(&m, b'c').unwrap_or(0),
                    extras: Extras::Flags(flag_u64(&m, b'f').unwrap_or(0) as u32).to_bytes(),
                    key: if with_key { key } else { Bytes::new() },
                    value: m.value.unwrap_or_default(),
                    ..BinaryResponse::new(op as u8, opaque)
                }
            }
            MetaCode::En => {
                ProxyStats::add(&sh.stats.get_misses, 1);
                if with_key {
                    BinaryResponse {
                        status: Status::KEY_NOT_FOUND,
                        key,
                        ..BinaryResponse::new(op as u8, opaque)
                    }
                } else {
                    BinaryResponse::error(op as u8, opaque, Status::KEY_NOT_FOUND)
                }
            }
            _ => BinaryResponse::error(op as u8, opaque, Status::INTERNAL_ERROR),
        },
    )
}

fn binary_store(req: BinaryRequest, sh: &Cx) -> Slot {
    use Opcode::*;
    ProxyStats::add(&sh.stats.cmd_set, 1);
    let (op, opaque) = (req.opcode, req.opaque);
    let mode: &'static [u8] = match op {
        Add | AddQ => b"E",
        Replace | ReplaceQ => b"R",
        Append | AppendQ => b"A",
        Prepend | PrependQ => b"P",
        _ => b"S",
    };
    let mut flags = vec![flag(b'c'), MetaFlag::new(b'M', Bytes::from_static(mode))];
    if let Extras::Store { flags: f, exptime } = req.decoded_extras() {
        flags.push(MetaFlag::new(b'F', token(f)));
        flags.push(MetaFlag::new(b'T', token(exptime as i32)));
    }
    if req.cas != 0 {
        flags.push(MetaFlag::new(b'C', token(req.cas)));
    }
    let value = Some(req.value.clone());
    forward_binary(sh, &req, MetaCommand::Set, flags, value, move |_, m| {
        let status = match m.code {
            MetaCode::Hd => {
                return BinaryResponse {
                    cas: flag_u64(&m, b'c').unwrap_or(0),
                    ..BinaryResponse::new(op as u8, opaque)
                };
            }
            // What memcached's binary protocol says for a refused store.
            MetaCode::Ns => match op {
                Add | AddQ => Status::KEY_EXISTS,
                Replace | ReplaceQ => Status::KEY_NOT_FOUND,
                _ => Status::NOT_STORED,
            },
            MetaCode::Ex => Status::KEY_EXISTS,
            MetaCode::Nf => Status::KEY_NOT_FOUND,
            _ => Status::INTERNAL_ERROR,
        };
        BinaryResponse::error(op as u8, opaque, status)
    })
}

fn binary_arith(req: BinaryRequest, sh: &Cx) -> Slot {
    use Opcode::*;
    let (op, opaque) = (req.opcode, req.opaque);
    let Extras::Arith {
        delta,
        initial,
        exptime,
    } = req.decoded_extras()
    else {
        return Slot::Ready(encode_binary(
            op,
            BinaryResponse::error(op as u8, opaque, Status::INVALID_ARGUMENTS),
        ));
    };
    let mode: &'static [u8] = if matches!(op, Increment | IncrementQ) {
        b"I"
    } else {
        b"D"
    };
    let mut flags = vec![
        flag(b'v'),
        flag(b'c'),
        MetaFlag::new(b'M', Bytes::from_static(mode)),
        MetaFlag::new(b'D', token(delta)),
    ];
    // All ones means "do not create on a miss".
    if exptime != u32::MAX {
        flags.push(MetaFlag::new(b'N', token(exptime as i32)));
        flags.push(MetaFlag::new(b'J', token(initial)));
    }
    if req.cas != 0 {
        flags.push(MetaFlag::new(b'C', token(req.cas)));
    }
    forward_binary(
        sh,
        &req,
        MetaCommand::Arithmetic,
        flags,
        None,
        move |_, m| match m.code {
            MetaCode::Va => {
                let n: u64 = m
                    .value
                    .as_deref()
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                BinaryResponse {
                    cas: flag_u64(&m, b'c').unwrap_or(0),
                    value: Bytes::copy_from_slice(&n.to_be_bytes()),
                    ..BinaryResponse::new(op as u8, opaque)
                }
            }
            MetaCode::Nf => BinaryResponse::error(op as u8, opaque, Status::KEY_NOT_FOUND),
            MetaCode::Ex => BinaryResponse::error(op as u8, opaque, Status::KEY_EXISTS),
            _ => BinaryResponse::error(op as u8, opaque, Status::INTERNAL_ERROR),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Limits, parse_response};

    fn parsed(line: &[u8]) -> Response {
        let mut buf = BytesMut::from(line);
        let r = parse_response(&mut buf, &Limits::default())
            .unwrap()
            .unwrap();
        assert!(buf.is_empty());
        r
    }

    /// How the status was chosen before error lines got a kind when
    /// parsed, by searching their text; kept to show that every line
    /// memcached sends still maps as it did.
    fn by_searching_text(r: &Response) -> Status {
        let text = match r {
            Response::Text(
                TextResponse::ServerError { message, .. }
                | TextResponse::ClientError { message, .. },
            ) => &message[..],
            _ => &b""[..],
        };
        let has = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
        if has(b"too large") {
            Status::VALUE_TOO_LARGE
        } else if has(b"out of memory") {
            Status::OUT_OF_MEMORY
        } else if has(b"non-numeric") {
            Status::NON_NUMERIC
        } else if matches!(r, Response::Text(TextResponse::ClientError { .. })) {
            Status::INVALID_ARGUMENTS
        } else {
            Status::INTERNAL_ERROR
        }
    }

    /// Every error line memcached 1.6's text and meta commands send
    /// (proto_text.c, memcached.c), and the status a binary client gets
    /// for it through guard.
    const MEMCACHED: &[(&[u8], Status)] = &[
        (
            b"SERVER_ERROR object too large for cache\r\n",
            Status::VALUE_TOO_LARGE,
        ),
        (
            b"SERVER_ERROR out of memory storing object\r\n",
            Status::OUT_OF_MEMORY,
        ),
        (b"SERVER_ERROR out of memory\r\n", Status::OUT_OF_MEMORY),
        (
            b"SERVER_ERROR out of memory writing get response\r\n",
            Status::OUT_OF_MEMORY,
        ),
        (
            b"SERVER_ERROR out of memory writing stats\r\n",
            Status::OUT_OF_MEMORY,
        ),
        (
            b"SERVER_ERROR out of memory reading request\r\n",
            Status::OUT_OF_MEMORY,
        ),
        // `ma … N` that cannot allocate the item it creates: capitalised,
        // so the text search never matched it.
        (
            b"SERVER_ERROR Out of memory allocating new item\r\n",
            Status::INTERNAL_ERROR,
        ),
        (
            b"SERVER_ERROR refcount overflow during fetch\r\n",
            Status::INTERNAL_ERROR,
        ),
        (
            b"SERVER_ERROR Unhandled storage type.\r\n",
            Status::INTERNAL_ERROR,
        ),
        (
            b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
            Status::NON_NUMERIC,
        ),
        (
            b"CLIENT_ERROR bad data chunk\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR bad command line format\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR bad token in command line format\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (b"CLIENT_ERROR invalid flag\r\n", Status::INVALID_ARGUMENTS),
        (
            b"CLIENT_ERROR duplicate flag\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR invalid or duplicate flag\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR options flags are too long\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR options flags too long\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR opaque token too long\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR incorrect length for M token\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR invalid mode for ms M token\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR invalid mode for ma M token\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR invalid numeric initial value\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR invalid numeric delta value\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR invalid numeric delta argument\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR invalid exptime argument\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (
            b"CLIENT_ERROR error decoding key\r\n",
            Status::INVALID_ARGUMENTS,
        ),
        (b"CLIENT_ERROR line too long\r\n", Status::INVALID_ARGUMENTS),
        (b"ERROR\r\n", Status::INTERNAL_ERROR),
        (
            b"ERROR Too many open connections\r\n",
            Status::INTERNAL_ERROR,
        ),
    ];

    #[test]
    fn each_memcached_error_line_maps_as_the_text_search_did() {
        for &(line, status) in MEMCACHED {
            let r = parsed(line);
            let name = String::from_utf8_lossy(line);
            assert_eq!(binary_error_status(&r), status, "{name}");
            assert_eq!(binary_error_status(&r), by_searching_text(&r), "{name}");
        }
    }

    #[test]
    fn each_kind_has_its_status_and_other_falls_back_to_the_class() {
        use ErrorReplyKind::*;
        assert_eq!(error_reply_status(TooLarge), Some(Status::VALUE_TOO_LARGE));
        assert_eq!(error_reply_status(OutOfMemory), Some(Status::OUT_OF_MEMORY));
        assert_eq!(error_reply_status(NonNumeric), Some(Status::NON_NUMERIC));
        assert_eq!(error_reply_status(Other), None);
        let status = |r: TextResponse| binary_error_status(&Response::Text(r));
        assert_eq!(
            status(TextResponse::client_error("new words")),
            Status::INVALID_ARGUMENTS
        );
        assert_eq!(
            status(TextResponse::client_error("")),
            Status::INVALID_ARGUMENTS
        );
        assert_eq!(
            status(TextResponse::server_error("new words")),
            Status::INTERNAL_ERROR
        );
        assert_eq!(
            status(TextResponse::server_error("")),
            Status::INTERNAL_ERROR
        );
        // The kind decides, whichever class the line has.
        assert_eq!(
            status(TextResponse::ClientError {
                kind: OutOfMemory,
                message: Bytes::new()
            }),
            Status::OUT_OF_MEMORY
        );
    }

    #[test]
    fn replies_that_are_not_error_lines_are_internal_errors() {
        for line in [
            &b"STORED\r\n"[..],
            b"END\r\n",
            b"42\r\n",
            b"ITEM x\r\n",
            b"HD\r\n",
        ] {
            let r = parsed(line);
            assert_eq!(binary_error_status(&r), Status::INTERNAL_ERROR, "{r:?}");
            assert_eq!(binary_error_status(&r), by_searching_text(&r), "{r:?}");
        }
        let binary = Response::Binary(BinaryResponse::error(0x01, 0, Status::KEY_NOT_FOUND));
        assert_eq!(binary_error_status(&binary), Status::INTERNAL_ERROR);
    }

    #[test]
    fn words_in_lines_memcached_never_sends_no_longer_decide() {
        // The text search took these for the failures they mention.
        for (line, searched) in [
            (
                &b"SERVER_ERROR value too large\r\n"[..],
                Status::VALUE_TOO_LARGE,
            ),
            (b"CLIENT_ERROR key too large\r\n", Status::VALUE_TOO_LARGE),
            (
                b"SERVER_ERROR cache out of memory\r\n",
                Status::OUT_OF_MEMORY,
            ),
            (b"CLIENT_ERROR non-numeric\r\n", Status::NON_NUMERIC),
        ] {
            let r = parsed(line);
            assert_eq!(by_searching_text(&r), searched);
            let class = match r {
                Response::Text(TextResponse::ClientError { .. }) => Status::INVALID_ARGUMENTS,
                _ => Status::INTERNAL_ERROR,
            };
            assert_eq!(binary_error_status(&r), class, "{r:?}");
        }
    }
}
