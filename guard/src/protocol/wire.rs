//! Byte-level helpers shared by the text, meta and binary codecs.

use bytes::{BufMut, Bytes, BytesMut};

/// A token's position inside the frame being parsed.
///
/// Offsets (rather than slices) let validation run on the borrowed buffer and
/// the same positions be turned into `Bytes` only once the frame is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn of<'a>(&self, line: &'a [u8]) -> &'a [u8] {
        &line[self.start..self.end]
    }
}

/// Produces `Bytes` for spans of an accepted frame.
///
/// The dry implementation lets a parser run its full validation before the
/// frame is split off the buffer, so errors leave the buffer untouched
/// without the parser being written twice.
pub(super) trait Slicer {
    /// Whether slices are real; dry runs skip building collections.
    const REAL: bool;
    fn slice(&self, span: Span) -> Bytes;
}

pub(super) struct Dry;

impl Slicer for Dry {
    const REAL: bool = false;
    fn slice(&self, _span: Span) -> Bytes {
        Bytes::new()
    }
}

impl Slicer for Bytes {
    const REAL: bool = true;
    fn slice(&self, span: Span) -> Bytes {
        Bytes::slice(self, span.start..span.end)
    }
}

/// Space-separated tokens, with runs of spaces collapsed exactly like
/// memcached's tokenizer (tabs and other bytes stay inside tokens).
pub(super) fn tokens(line: &[u8]) -> impl Iterator<Item = Span> + '_ {
    let mut pos = 0;
    std::iter::from_fn(move || {
        while pos < line.len() && line[pos] == b' ' {
            pos += 1;
        }
        if pos >= line.len() {
            return None;
        }
        let start = pos;
        while pos < line.len() && line[pos] != b' ' {
            pos += 1;
        }
        Some(Span { start, end: pos })
    })
}

/// The first `N` tokens of a line kept on the stack, plus the total count.
pub(super) struct Toks<const N: usize> {
    spans: [Span; N],
    pub count: usize,
}

impl<const N: usize> Toks<N> {
    pub fn new(line: &[u8]) -> Self {
        let mut spans = [Span::default(); N];
        let mut count = 0;
        for t in tokens(line) {
            if count < N {
                spans[count] = t;
            }
            count += 1;
        }
        Toks { spans, count }
    }

    /// Token `i`; only valid for `i < min(N, count)`.
    pub fn get(&self, i: usize) -> Span {
        debug_assert!(i < N && i < self.count);
        self.spans[i]
    }
}

/// Where the next line ends, if it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LineStatus {
    Incomplete,
    TooLong,
    /// `content` excludes the terminator; `total` includes `\n` (and `\r`).
    Line {
        content: usize,
        total: usize,
    },
}

/// Finds the end of the first line, searching no further than the limit so
/// that the verdict is the same however the bytes were chunked.
///
/// `long_ok` may grant a second, larger limit (multi-key gets); it is only
/// consulted once `max` bytes are buffered so its prefix test is stable.
pub(super) fn find_line(
    buf: &[u8],
    max: usize,
    long_max: usize,
    long_ok: impl Fn(&[u8]) -> bool,
) -> LineStatus {
    let window = buf.len().min(max);
    if let Some(nl) = buf[..window].iter().position(|&b| b == b'\n') {
        return line_at(buf, nl);
    }
    if buf.len() < max {
        return LineStatus::Incomplete;
    }
    if long_max > max && long_ok(buf) {
        let window = buf.len().min(long_max);
        if let Some(nl) = buf[..window].iter().position(|&b| b == b'\n') {
            return line_at(buf, nl);
        }
        if buf.len() < long_max {
            return LineStatus::Incomplete;
        }
    }
    LineStatus::TooLong
}

fn line_at(buf: &[u8], nl: usize) -> LineStatus {
    let content = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    LineStatus::Line {
        content,
        total: nl + 1,
    }
}

/// memcached text keys: non-empty, bounded, no whitespace or control bytes.
pub fn is_valid_text_key(key: &[u8], max_len: usize) -> bool {
    !key.is_empty() && key.len() <= max_len && key.iter().all(|&b| b > b' ' && b != 0x7f)
}

/// Strict unsigned decimal: digits only, no sign, no overflow.
pub(super) fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

pub(super) fn parse_u32(s: &[u8]) -> Option<u32> {
    parse_u64(s).and_then(|v| u32::try_from(v).ok())
}

/// An unsigned number as memcached's `safe_strtoul` reads it (for
/// `verbosity`): C `strtoul` in base 10 (leading white space, a sign,
/// digits), white space or the end after the digits, no value that
/// needed a `-` to wrap, and the result kept to 32 bits. So `+5`, `-0`
/// and `99999999999` are numbers, `-5`, `5x` and anything past 2^64 − 1
/// are not.
pub(super) fn strtoul_u32(s: &[u8]) -> Option<u32> {
    // C's isspace in the "C" locale.
    let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r');
    let mut i = s.iter().take_while(|&&b| is_space(b)).count();
    let negative = match s.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let digits = s[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in &s[i..i + digits] {
        // strtoul's ERANGE.
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    if s.get(i + digits).is_some_and(|&b| !is_space(b)) {
        return None;
    }
    // strtoul negates in unsigned arithmetic; memcached refuses a result
    // that is negative as a signed number only if a `-` made it so.
    let l = if negative { v.wrapping_neg() } else { v };
    if negative && (l as i64) < 0 {
        return None;
    }
    Some(l as u32)
}

/// Signed 32-bit decimal, the range memcached accepts for exptimes and sizes.
pub(super) fn parse_i32(s: &[u8]) -> Option<i32> {
    match s.split_first() {
        Some((b'-', rest)) => {
            let v = parse_u64(rest)?;
            if v > (i32::MAX as u64) + 1 {
                None
            } else {
                Some((-(v as i64)) as i32)
            }
        }
        _ => parse_u64(s).and_then(|v| i32::try_from(v).ok()),
    }
}

pub(super) fn put_u64(out: &mut BytesMut, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.put_slice(&tmp[i..]);
}

pub(super) fn put_i64(out: &mut BytesMut, v: i64) {
    if v < 0 {
        out.put_u8(b'-');
    }
    put_u64(out, v.unsigned_abs());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_collapse_spaces() {
        let line = b"  get  a b   c ";
        let t: Vec<&[u8]> = tokens(line).map(|s| s.of(line)).collect();
        assert_eq!(t, vec![&b"get"[..], b"a", b"b", b"c"]);
        assert_eq!(tokens(b"   ").count(), 0);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"+1"), None);
        assert_eq!(parse_u64(b"1a"), None);
        assert_eq!(parse_u32(b"4294967296"), None);
        assert_eq!(parse_i32(b"-2147483648"), Some(i32::MIN));
        assert_eq!(parse_i32(b"-2147483649"), None);
        assert_eq!(parse_i32(b"2147483648"), None);
        assert_eq!(parse_i32(b"-"), None);
        let mut b = BytesMut::new();
        put_u64(&mut b, 0);
        b.put_u8(b' ');
        put_i64(&mut b, i64::MIN);
        b.put_u8(b' ');
        put_u64(&mut b, u64::MAX);
        assert_eq!(&b[..], b"0 -9223372036854775808 18446744073709551615");
    }

    #[test]
    fn strtoul_as_memcached_reads_it() {
        // Each checked against memcached 1.6.18's `verbosity` (OK or
        // CLIENT_ERROR bad command line format).
        for (s, v) in [
            (&b"1"[..], Some(1)),
            (b"+5", Some(5)),
            (b"-0", Some(0)),
            (b"99999999999", Some(99_999_999_999_u64 as u32)),
            (b"18446744073709551615", Some(u32::MAX)),
            (b"-18446744073709551615", Some(1)),
            (b"\t5", Some(5)),
            (b"5\t", Some(5)),
            (b"1\r", Some(1)),
            (b"18446744073709551616", None),
            (b"-1", None),
            (b"5x", None),
            (b"x", None),
            (b"+", None),
            (b"", None),
            (b"0x10", None),
        ] {
            assert_eq!(strtoul_u32(s), v, "{:?}", String::from_utf8_lossy(s));
        }
    }

    #[test]
    fn line_finding_is_bounded() {
        let none = |_: &[u8]| false;
        assert_eq!(find_line(b"abc", 8, 8, none), LineStatus::Incomplete);
        assert_eq!(
            find_line(b"ab\r\nzz", 8, 8, none),
            LineStatus::Line {
                content: 2,
                total: 4
            }
        );
        assert_eq!(
            find_line(b"ab\n", 8, 8, none),
            LineStatus::Line {
                content: 2,
                total: 3
            }
        );
        // Newline just past the window is not seen: verdict must not depend
        // on how much happens to be buffered.
        assert_eq!(find_line(b"abcdefgh\n", 8, 8, none), LineStatus::TooLong);
        assert_eq!(
            find_line(b"abcdefg\n", 8, 8, none),
            LineStatus::Line {
                content: 7,
                total: 8
            }
        );
        let all = |_: &[u8]| true;
        assert_eq!(find_line(b"abcdefgh", 8, 16, all), LineStatus::Incomplete);
        assert_eq!(
            find_line(b"abcdefghij\n", 8, 16, all),
            LineStatus::Line {
                content: 10,
                total: 11
            }
        );
        assert_eq!(find_line(&[b'x'; 16], 8, 16, all), LineStatus::TooLong);
    }

    #[test]
    fn key_validation() {
        assert!(is_valid_text_key(b"foo:bar", 250));
        assert!(is_valid_text_key("ключ".as_bytes(), 250));
        assert!(!is_valid_text_key(b"", 250));
        assert!(!is_valid_text_key(b"a b", 250));
        assert!(!is_valid_text_key(b"a\tb", 250));
        assert!(!is_valid_text_key(b"a\x7f", 250));
        assert!(is_valid_text_key(&[b'k'; 250], 250));
        assert!(!is_valid_text_key(&[b'k'; 251], 250));
    }
}
