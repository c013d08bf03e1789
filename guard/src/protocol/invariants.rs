//! What every parse must guarantee, as checks the property tests and the
//! fuzz targets (`cargo xtask fuzz`) share. Test code: built for tests and
//! with the `fuzzing` feature only.

use bytes::BytesMut;

use super::{
    Limits, MetaCommand, Request, TextRequest, is_valid_text_key, meta, parse_request,
    reader::{FrameReader, Next, Parse, RequestParser, ResponseParser},
};

/// Checks a parsed request against the limits it was parsed with: keys are
/// valid and short enough, values fit, and the request re-encodes to bytes
/// that parse back identically.
pub fn request_invariants(r: &Request, limits: &Limits) -> Result<(), String> {
    let fail = |what: &str| Err(format!("{what}: {r:?}"));
    match r {
        Request::Text(t) => {
            if t.keys()
                .iter()
                .any(|k| !is_valid_text_key(k, limits.max_key_len))
            {
                return fail("invalid text key");
            }
            if let TextRequest::Get(g) = t
                && (g.keys.is_empty() || g.keys.len() > limits.max_keys_per_get)
            {
                return fail("bad number of get keys");
            }
            if let TextRequest::Store(s) = t
                && s.value.len() > limits.max_value_len
            {
                return fail("value over the limit");
            }
        }
        Request::Meta(m) => {
            if m.command != MetaCommand::Noop
                && (!is_valid_text_key(&m.key, limits.max_key_len) || m.decoded_key().is_none())
            {
                return fail("invalid meta key");
            }
            if m.value.is_some() != (m.command == MetaCommand::Set) {
                return fail("value on a command that takes none");
            }
            if m.value
                .as_ref()
                .is_some_and(|v| v.len() > limits.max_value_len)
            {
                return fail("value over the limit");
            }
            if m.flags.len() > meta::MAX_META_TOKENS {
                return fail("too many meta flags");
            }
        }
        Request::Binary(b) => {
            if b.key.len() > limits.max_key_len || b.value.len() > limits.max_value_len {
                return fail("binary key or value over the limit");
            }
        }
    }
    // Encoders always end lines with CRLF, so a bare-LF line may grow by one.
    let roomy = Limits {
        max_line_len: limits.max_line_len + 1,
        max_retrieval_line_len: limits.max_retrieval_line_len + 1,
        ..limits.clone()
    };
    let mut out = BytesMut::new();
    r.encode(&mut out);
    let mut again = out.clone();
    match parse_request(&mut again, &roomy) {
        Ok(Some(back)) if back == *r && again.is_empty() => Ok(()),
        other => Err(format!("{r:?} re-encoded as {out:?} parses as {other:?}")),
    }
}

/// Feeds `input` in chunks of `chunk` bytes to a [`FrameReader`] as a
/// proxy would (requests: one protocol per connection, from its first
/// byte), checking the parser's contract after every call: incomplete
/// leaves the buffer untouched, an error leaves it untouched and names a
/// positive number of bytes to discard, a parsed frame consumed bytes and
/// satisfies [`request_invariants`]. Returns how many frames parsed.
pub fn drive(
    input: &[u8],
    chunk: usize,
    limits: &Limits,
    responses: bool,
) -> Result<usize, String> {
    if responses {
        drive_reader(
            FrameReader::new(ResponseParser, limits.clone()),
            input,
            chunk,
            |_| Ok(()),
        )
    } else {
        drive_reader(
            FrameReader::new(RequestParser::default(), limits.clone()),
            input,
            chunk,
            |r| request_invariants(r, limits),
        )
    }
}

fn drive_reader<P: Parse>(
    mut reader: FrameReader<P>,
    input: &[u8],
    chunk: usize,
    check: impl Fn(&P::Item) -> Result<(), String>,
) -> Result<usize, String> {
    let mut frames = 0;
    for piece in input.chunks(chunk.max(1)) {
        reader.buffer().extend_from_slice(piece);
        loop {
            match reader.next_frame_checked()? {
                Next::Frame(item) => {
                    check(&item)?;
                    frames += 1;
                }
                Next::Error(e) => {
                    let mut reply = BytesMut::new();
                    e.write_reply(&mut reply);
                    if e.close {
                        return Ok(frames);
                    }
                }
                Next::Empty | Next::Partial => break,
            }
        }
    }
    Ok(frames)
}

/// One fuzz input: its first byte picks the chunk size, the rest is the
/// stream, driven with default limits and with small ones (so over-limit
/// paths are reached by small inputs too). Panics on a broken contract.
pub fn fuzz_one(data: &[u8], responses: bool) {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let small = Limits {
        max_key_len: 16,
        max_value_len: 64,
        max_line_len: 96,
        max_retrieval_line_len: 160,
        max_keys_per_get: 4,
        ..Limits::default()
    };
    for limits in [Limits::default(), small] {
        if let Err(e) = drive(input, usize::from(chunk) + 1, &limits, responses) {
            panic!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_accepts_a_pipeline_at_every_chunk_size() {
        let input = b"set a 0 0 1\r\nx\r\nget a b\r\nmg a v\r\nbogus\r\ndelete a\r\n";
        for chunk in 1..=input.len() {
            assert_eq!(
                drive(input, chunk, &Limits::default(), false),
                Ok(4),
                "chunk {chunk}"
            );
        }
        let replies = b"VALUE a 0 1\r\nx\r\nEND\r\nSTORED\r\nHD\r\n";
        assert_eq!(drive(replies, 3, &Limits::default(), true), Ok(4));
        fuzz_one(b"\x00set a 0 0 1\r\nx\r\n", false);
        fuzz_one(b"\x02VALUE a 0 1\r\nx\r\nEND\r\n", true);
    }

    /// The fuzz targets' seeds keep the contract in every `cargo test`,
    /// not only when `cargo xtask fuzz` runs.
    #[test]
    fn every_fuzz_seed_keeps_the_contract() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let mut seeds = 0;
        for (target, responses) in [("requests", false), ("responses", true)] {
            for entry in std::fs::read_dir(corpus.join(target)).unwrap() {
                fuzz_one(&std::fs::read(entry.unwrap().path()).unwrap(), responses);
                seeds += 1;
            }
        }
        assert!(seeds >= 20, "only {seeds} seeds under {}", corpus.display());
    }

    #[test]
    fn invariants_reject_what_limits_forbid() {
        let mut buf = BytesMut::from(&b"set abcdefgh 0 0 1\r\nx\r\n"[..]);
        let r = parse_request(&mut buf, &Limits::default())
            .unwrap()
            .unwrap();
        let tight = Limits {
            max_key_len: 4,
            ..Limits::default()
        };
        assert!(request_invariants(&r, &tight).is_err());
        assert!(request_invariants(&r, &Limits::default()).is_ok());
    }
}
