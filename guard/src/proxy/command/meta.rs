//! Meta requests, forwarded with the tenant's namespace on their keys.

use super::*;

pub(super) fn dispatch(mut req: MetaRequest, sh: &Cx) -> Slot {
    let command = req.command;
    if command == MetaCommand::Noop {
        return Slot::Ready(Reply::bytes(b"MN\r\n"));
    }
    let quiet = req.remove_flag(b'q').is_some();
    let Some(client_key) = req.decoded_key() else {
        return Slot::Ready(Reply::bytes(b"CLIENT_ERROR error decoding key\r\n"));
    };
    let bkey = match sh.text_key(&client_key) {
        Ok(k) => k,
        Err(slot) => return slot,
    };
    match command {
        MetaCommand::Get => ProxyStats::add(&sh.stats.cmd_get, 1),
        MetaCommand::Set => ProxyStats::add(&sh.stats.cmd_set, 1),
        _ => {}
    }
    let opaque = req.opaque().cloned();
    let wants_key = req.has_flag(b'k');
    let base64 = req.base64_key();
    let encode = |key: &[u8]| {
        if base64 {
            req.set_decoded_key(key);
        } else {
            req.key = Bytes::copy_from_slice(key);
        }
        let mut encoded = BytesMut::new();
        req.encode(&mut encoded);
        encoded
    };
    forward(sh, &bkey, encode, move |sh, r| {
        let mut out = BytesMut::new();
        match r {
            Ok(Response::Meta(mut m)) => {
                if command == MetaCommand::Get {
                    let hit = matches!(m.code, MetaCode::Va | MetaCode::Hd);
                    let counter = if hit {
                        &sh.stats.get_hits
                    } else {
                        &sh.stats.get_misses
                    };
                    ProxyStats::add(counter, 1);
                }
                if quiet && command.quiet_suppresses(m.code) {
                    return Reply::default();
                }
                // One key per request: the client's own, whatever name it
                // had on the backend (namespaced, or a gutter name while
                // its home is ejected, which a raw namespace would pass
                // through unchanged).
                if m.flag(b'k').is_some() {
                    m.set_returned_key(&client_key);
                }
                if m.key.is_some() {
                    m.key = Some(client_key.clone());
                }
                m.encode(&mut out);
            }
            Ok(other) => other.encode(&mut out),
            Err(e) => {
                if command == MetaCommand::Get && sh.miss_on_backend_error {
                    ProxyStats::add(&sh.stats.get_misses, 1);
                    if quiet {
                        return Reply::default();
                    }
                    let mut m = MetaResponse::new(MetaCode::En);
                    if let Some(o) = opaque {
                        m.set_flag(b'O', o);
                    }
                    if wants_key {
                        if base64 {
                            m.set_flag(b'b', Bytes::new());
                        }
                        m.set_returned_key(&client_key);
                    }
                    m.encode(&mut out);
                } else {
                    return server_error(&e);
                }
            }
        }
        Reply { out, close: false }
    })
}

// ---------------------------------------------------------------- binary
