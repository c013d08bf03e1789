//! Classic text requests (`get`, `set`, `incr`, `flush_all`, …) as meta
//! requests, and their replies back in text.

use super::*;

/// A text reply for a one-key command: the meta code's text word, or the
/// backend's own error line.
fn text_status(
    r: Result<Response, ProxyError>,
    noreply: bool,
    word: impl Fn(MetaCode) -> Option<&'static str>,
) -> Reply {
    let reply = match r {
        Err(e) => server_error(&e),
        Ok(Response::Meta(m)) => match word(m.code) {
            Some(w) => Reply::bytes(format!("{w}\r\n").as_bytes()),
            None => Reply::bytes(BAD_REPLY),
        },
        Ok(other) => {
            let mut out = BytesMut::new();
            other.encode(&mut out);
            Reply { out, close: false }
        }
    };
    if noreply { Reply::default() } else { reply }
}

pub(super) fn dispatch(req: TextRequest, sh: &Cx) -> Slot {
    match req {
        TextRequest::Get(g) => text_get(g, sh),
        TextRequest::Store(s) => text_store(s, sh),
        TextRequest::Incr {
            key,
            delta,
            noreply,
        } => text_arith(sh, &key, delta, b"I", noreply),
        TextRequest::Decr {
            key,
            delta,
            noreply,
        } => text_arith(sh, &key, delta, b"D", noreply),
        TextRequest::Delete { key, noreply } => {
            let bkey = match sh.text_key(&key) {
                Ok(k) => k,
                Err(slot) => return slot,
            };
            let req = |key: &[u8]| meta_req(MetaCommand::Delete, key, Vec::new(), None);
            forward(sh, &bkey, req, move |_, r| {
                text_status(r, noreply, |c| match c {
                    MetaCode::Hd => Some("DELETED"),
                    MetaCode::Nf => Some("NOT_FOUND"),
                    MetaCode::Ex => Some("EXISTS"),
                    _ => None,
                })
            })
        }
        TextRequest::Touch {
            key,
            exptime,
            noreply,
        } => {
            ProxyStats::add(&sh.stats.cmd_touch, 1);
            let bkey = match sh.text_key(&key) {
                Ok(k) => k,
                Err(slot) => return slot,
            };
            let req = |key: &[u8]| {
                let touch = vec![MetaFlag::new(b'T', token(exptime))];
                meta_req(MetaCommand::Get, key, touch, None)
            };
            forward(sh, &bkey, req, move |_, r| {
                text_status(r, noreply, |c| match c {
                    MetaCode::Hd => Some("TOUCHED"),
                    MetaCode::En => Some("NOT_FOUND"),
                    _ => None,
                })
            })
        }
        TextRequest::FlushAll { delay, noreply } => {
            // memcached `-F` keeps noreply's silence for its refusal too.
            let (ok, refused) = if noreply {
                (Reply::default(), Reply::default())
            } else {
                (Reply::bytes(b"OK\r\n"), Reply::bytes(TEXT_FLUSH_REFUSED))
            };
            flush(sh, i64::from(delay.unwrap_or(0)), ok, refused)
        }
        TextRequest::Version => Slot::Ready(Reply::bytes(
            format!("VERSION {}\r\n", crate::proxy::version()).as_bytes(),
        )),
        // guard's log level is RUST_LOG's, and the backends' verbosity is
        // not a client's to change: accepted, as memcached accepts it, and
        // nothing changes.
        TextRequest::Verbosity { noreply, .. } => Slot::Ready(if noreply {
            Reply::default()
        } else {
            Reply::bytes(b"OK\r\n")
        }),
        TextRequest::Stats(group) => admin::text_stats(group, sh),
        TextRequest::Admin(a) => admin::text_admin(&a),
        TextRequest::Quit => Slot::Ready(Reply {
            out: BytesMut::new(),
            close: true,
        }),
    }
}

fn text_get(g: GetRequest, sh: &Cx) -> Slot {
    let mut flags = vec![flag(b'v'), flag(b'f')];
    if g.kind.returns_cas() {
        flags.push(flag(b'c'));
    }
    if let GetKind::Gat(e) | GetKind::Gats(e) = g.kind {
        flags.push(MetaFlag::new(b'T', token(e)));
        ProxyStats::add(&sh.stats.cmd_touch, g.keys.len() as u64);
    }
    let mut bkeys = Vec::with_capacity(g.keys.len());
    for k in &g.keys {
        match sh.text_key(k) {
            Ok(k) => bkeys.push(k),
            Err(slot) => return slot,
        }
    }
    let encode = |key: &[u8], out: &mut BytesMut| {
        out.unsplit(meta_req(MetaCommand::Get, key, flags.clone(), None));
    };
    let fan = sh.router.fan_out(&bkeys, encode, sh.caller());
    let failures = sh.failures.clone();
    let sh = sh.sh.clone();
    let with_cas = g.kind.returns_cas();
    waiting(async move {
        let results = fan.wait().await;
        let mut failed = false;
        let stats = &sh.stats;
        ProxyStats::add(&stats.cmd_get, results.len() as u64);
        let mut out = BytesMut::new();
        for (key, r) in g.keys.into_iter().zip(results) {
            match r {
                Ok(Response::Meta(m)) if m.code == MetaCode::Va => {
                    ProxyStats::add(&stats.get_hits, 1);
                    TextResponse::Value {
                        key,
                        flags: flag_u64(&m, b'f').unwrap_or(0) as u32,
                        cas: if with_cas { flag_u64(&m, b'c') } else { None },
                        data: m.value.unwrap_or_default(),
                    }
                    .encode(&mut out);
                }
                Ok(Response::Meta(m)) if m.code == MetaCode::En => {
                    ProxyStats::add(&stats.get_misses, 1);
                }
                Ok(Response::Meta(_)) => return Reply::bytes(BAD_REPLY),
                Ok(other) => {
                    // An error ends a get reply, as from memcached itself.
                    out.clear();
                    other.encode(&mut out);
                    return Reply { out, close: false };
                }
                Err(e) => {
                    ProxyStats::add(&stats.backend_errors, 1);
                    if sh.miss_on_backend_error {
                        ProxyStats::add(&stats.get_misses, 1);
                        failed = true;
                    } else {
                        failures.tenant();
                        return server_error(&e);
                    }
                }
            }
        }
        if failed {
            failures.tenant();
        }
        TextResponse::End.encode(&mut out);
        Reply { out, close: false }
    })
}

fn text_store(s: StoreRequest, sh: &Cx) -> Slot {
    ProxyStats::add(&sh.stats.cmd_set, 1);
    let bkey = match sh.text_key(&s.key) {
        Ok(k) => k,
        Err(slot) => return slot,
    };
    let mut flags = Vec::new();
    let mode: &[u8] = match s.command {
        StoreCommand::Set | StoreCommand::Cas(_) => b"S",
        StoreCommand::Add => b"E",
        StoreCommand::Replace => b"R",
        StoreCommand::Append => b"A",
        StoreCommand::Prepend => b"P",
    };
    flags.push(MetaFlag::new(b'M', Bytes::from_static(mode)));
    if !matches!(s.command, StoreCommand::Append | StoreCommand::Prepend) {
        flags.push(MetaFlag::new(b'F', token(s.flags)));
        flags.push(MetaFlag::new(b'T', token(s.exptime)));
    }
    if let StoreCommand::Cas(c) = s.command {
        flags.push(MetaFlag::new(b'C', token(c)));
    }
    let value = s.value;
    let req = |key: &[u8]| meta_req(MetaCommand::Set, key, flags, Some(value));
    let noreply = s.noreply;
    forward(sh, &bkey, req, move |_, r| {
        text_status(r, noreply, |c| match c {
            MetaCode::Hd => Some("STORED"),
            MetaCode::Ns => Some("NOT_STORED"),
            MetaCode::Ex => Some("EXISTS"),
            MetaCode::Nf => Some("NOT_FOUND"),
            _ => None,
        })
    })
}

fn text_arith(sh: &Cx, key: &[u8], delta: u64, mode: &'static [u8], noreply: bool) -> Slot {
    let bkey = match sh.text_key(key) {
        Ok(k) => k,
        Err(slot) => return slot,
    };
    let flags = vec![
        flag(b'v'),
        MetaFlag::new(b'M', Bytes::from_static(mode)),
        MetaFlag::new(b'D', token(delta)),
    ];
    let req = |key: &[u8]| meta_req(MetaCommand::Arithmetic, key, flags, None);
    forward(sh, &bkey, req, move |_, r| {
        let reply = match r {
            Ok(Response::Meta(m)) if m.code == MetaCode::Va => {
                let mut out = BytesMut::new();
                out.put_slice(&m.value.unwrap_or_default());
                out.put_slice(b"\r\n");
                Reply { out, close: false }
            }
            other => {
                return text_status(other, noreply, |c| match c {
                    MetaCode::Nf => Some("NOT_FOUND"),
                    MetaCode::Ex => Some("EXISTS"),
                    _ => None,
                });
            }
        };
        if noreply { Reply::default() } else { reply }
    })
}

// ---------------------------------------------------------------- meta
