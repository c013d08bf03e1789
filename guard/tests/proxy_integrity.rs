//! Integrity under failure: a randomized, pipelined workload from many
//! clients (mixed commands, noreply, multi-gets across backends) while
//! backends are killed (SIGKILL) and restarted on the same port mid-run.
//! Every reply must match the request it answers and agree with a model
//! of the cache: a miss is allowed after a backend restart, a wrong or
//! misattributed value never.
//!
//! Each client owns a disjoint key space, so its model is exact. The model
//! keeps, per key, the set of states the cache may be in (absent, or an
//! item); a reply narrows the set, an unanswered write (noreply, quiet, or
//! `SERVER_ERROR`) widens it to "applied or not", and a backend kill adds
//! "absent" to every key. Values encode (client, key, version), so a value
//! from another key or client is recognised even when the model no longer
//! knows a key's exact value.
//!
//! Kills are bracketed by a global epoch that the controller bumps before
//! the SIGKILL and again once the process is reaped (the restart comes
//! after). A client reads the epoch after each reply: a reply read after
//! a bump may come from a restarted, empty memcached, and is checked with
//! "absent" added.
//!
//! Each kill also ejects the dead backend (its failed reconnects), its
//! keys move to the others under fresh gutter names, and after the
//! restart it is probed, flushed and re-admitted, so keys change backends
//! twice per kill while the pipelines run. From the kill until the
//! re-admission is seen in `stats` the run is *unsettled*: every reply
//! may be a miss (the gutter and the flushed node start empty), but never
//! a wrong or older value, and always the reply to its own request.
//!
//! The same workload runs over the binary protocol (set/add/replace/
//! append/prepend/delete, their quiet forms, getk, and getkq+noop
//! multi-gets; opaques tie every response to its request).
//!
//! The seed is printed; `GUARD_INTEGRITY_SEED=<n>` replays the choices
//! (the interleaving with kills stays timing-dependent).

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst},
    time::{Duration, Instant},
};

use common::{GuardProxy, Memcached, config, free_port, stat};

const CLIENTS: usize = 16;
const KEYS_PER_CLIENT: usize = 48;
const OPS_PER_CLIENT: usize = 2_000;
const KILLS: usize = 3;
/// No new batches after this; the whole test stays well under 30 s.
const RUN_LIMIT: Duration = Duration::from_secs(40);
/// Beyond this many possible states a key is "unknown": any value
/// attributed to it is accepted until a reply pins it down again.
const MAX_POSSIBLE: usize = 64;
/// Values are not grown past this by append/prepend.
const MAX_GROWN_LEN: usize = 4_000;

// ------------------------------------------------------------ randomness

fn seed() -> u64 {
    std::env::var("GUARD_INTEGRITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// SplitMix64: small, seedable, good enough for choosing operations.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
}

// ------------------------------------------------------------ the model

#[derive(Clone, Debug)]
struct Item {
    data: Vec<u8>,
    flags: u32,
    /// The CAS unique, when a `gets` has shown it since the last write.
    cas: Option<u64>,
}

fn trim(d: &[u8]) -> &[u8] {
    // memcached pads a decremented counter with spaces in place.
    let end = d.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    &d[..end]
}

impl Item {
    fn same(&self, data: &[u8], flags: u32) -> bool {
        trim(&self.data) == trim(data) && self.flags == flags
    }
}

/// One possible state of a key: absent, or this item.
type Possible = Option<Item>;

#[derive(Clone, Debug)]
enum State {
    Known(Vec<Possible>),
    /// Too many possibilities to track; only attribution is checked.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Stored,
    NotStored,
    Exists,
    NotFound,
    Deleted,
    Touched,
    Number(u64),
}

#[derive(Clone, Debug)]
enum Kind {
    Set,
    Add,
    Replace,
    Append,
    Prepend,
    Cas(u64),
    Incr(u64),
    Decr(u64),
    Delete,
    Touch,
}

impl Kind {
    fn allows(&self, o: Outcome) -> bool {
        use Outcome::*;
        match self {
            Kind::Set => o == Stored,
            Kind::Add | Kind::Replace | Kind::Append | Kind::Prepend => {
                matches!(o, Stored | NotStored)
            }
            Kind::Cas(_) => matches!(o, Stored | Exists | NotFound),
            Kind::Incr(_) | Kind::Decr(_) => matches!(o, Number(_) | NotFound),
            Kind::Delete => matches!(o, Deleted | NotFound),
            Kind::Touch => matches!(o, Touched | NotFound),
        }
    }
}

#[derive(Clone, Debug)]
struct KeyOp {
    kind: Kind,
    key: usize,
    value: Vec<u8>,
    noreply: bool,
}

#[derive(Clone, Debug)]
enum Op {
    One(KeyOp),
    Get { keys: Vec<usize>, cas: bool },
}

/// What a get said about one key.
#[derive(Clone, Debug)]
enum Seen {
    Hit {
        data: Vec<u8>,
        flags: u32,
        cas: Option<u64>,
    },
    Miss,
}

fn is_counter(key: usize) -> bool {
    key.is_multiple_of(4)
}

/// Counter values carry their owner in their high digits.
fn counter_owner(client: usize, key: usize) -> u64 {
    (client * 1000 + key) as u64
}

const COUNTER_SCALE: u64 = 10_000_000;

/// Every (possible) reply of `op` from state `p`, with the state after.
fn effects(op: &KeyOp, flags: u32, p: &Possible) -> Vec<(Outcome, Possible)> {
    use Outcome::*;
    let new = || {
        Some(Item {
            data: op.value.clone(),
            flags,
            cas: None,
        })
    };
    let number = |n: u64, i: &Item| {
        Some(Item {
            data: n.to_string().into_bytes(),
            flags: i.flags,
            cas: None,
        })
    };
    let parse = |i: &Item| -> Option<u64> { std::str::from_utf8(trim(&i.data)).ok()?.parse().ok() };
    match (&op.kind, p) {
        (Kind::Set, _) => vec![(Stored, new())],
        (Kind::Add, None) | (Kind::Replace, Some(_)) => vec![(Stored, new())],
        (Kind::Add, Some(_)) => vec![(NotStored, p.clone())],
        (Kind::Replace | Kind::Append | Kind::Prepend, None) => vec![(NotStored, None)],
        (Kind::Append, Some(i)) => vec![(
            Stored,
            Some(Item {
                data: [&i.data[..], &op.value].concat(),
                flags: i.flags,
                cas: None,
            }),
        )],
        (Kind::Prepend, Some(i)) => vec![(
            Stored,
            Some(Item {
                data: [&op.value[..], &i.data].concat(),
                flags: i.flags,
                cas: None,
            }),
        )],
        (Kind::Cas(_) | Kind::Incr(_) | Kind::Decr(_) | Kind::Delete | Kind::Touch, None) => {
            vec![(NotFound, None)]
        }
        (Kind::Cas(c), Some(i)) => match i.cas {
            Some(x) if x == *c => vec![(Stored, new())],
            Some(_) => vec![(Exists, p.clone())],
            None => vec![(Stored, new()), (Exists, p.clone())],
        },
        (Kind::Incr(d), Some(i)) => match parse(i) {
            Some(n) => {
                let r = n.wrapping_add(*d);
                vec![(Number(r), number(r, i))]
            }
            None => vec![],
        },
        (Kind::Decr(d), Some(i)) => match parse(i) {
            Some(n) => {
                let r = n.saturating_sub(*d);
                vec![(Number(r), number(r, i))]
            }
            None => vec![],
        },
        (Kind::Delete, Some(_)) => vec![(Deleted, None)],
        (Kind::Touch, Some(i)) => vec![(
            Touched,
            Some(Item {
                cas: None,
                ..i.clone()
            }),
        )],
    }
}

fn same_possible(a: &Possible, b: &Possible) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => x.same(&y.data, y.flags),
        _ => false,
    }
}

fn normalize(ps: Vec<Possible>) -> State {
    let mut out: Vec<Possible> = Vec::new();
    for p in ps {
        match out.iter_mut().find(|q| same_possible(q, &p)) {
            Some(Some(q)) => {
                if q.cas != p.as_ref().and_then(|i| i.cas) {
                    q.cas = None;
                }
            }
            Some(None) => {}
            None => out.push(p),
        }
    }
    if out.len() > MAX_POSSIBLE {
        State::Unknown
    } else {
        State::Known(out)
    }
}

/// One client's key space and what the cache may hold for each key.
struct Model {
    client: usize,
    keys: Vec<State>,
    version: u64,
    /// The kill epoch the model has accounted for.
    epoch: u64,
    /// The last few things that happened to each key, for the failure
    /// message.
    history: Vec<std::collections::VecDeque<String>>,
    start: Instant,
}

impl Model {
    fn new(client: usize) -> Self {
        Self {
            client,
            keys: vec![State::Known(vec![None]); KEYS_PER_CLIENT],
            version: 0,
            epoch: 0,
            history: vec![Default::default(); KEYS_PER_CLIENT],
            start: Instant::now(),
        }
    }

    fn note(&mut self, key: usize, what: String) {
        let h = &mut self.history[key];
        if h.len() == 12 {
            h.pop_front();
        }
        h.push_back(format!("{:.3?} {what}", self.start.elapsed()));
    }

    fn recent(&self, key: usize) -> String {
        let h: Vec<&str> = self.history[key].iter().map(String::as_str).collect();
        format!("\n    recently: {}", h.join("\n              "))
    }

    fn key_name(&self, key: usize) -> String {
        format!("c{}-k{key}", self.client)
    }

    fn flags(&self, key: usize) -> u32 {
        (self.client * 1000 + key) as u32
    }

    /// Whether `data` can only have been written by this client for `key`.
    fn attributed(&self, key: usize, data: &[u8]) -> bool {
        if is_counter(key) {
            std::str::from_utf8(trim(data))
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|n| n / COUNTER_SCALE == counter_owner(self.client, key))
        } else {
            // Fragments "[client.key.version]" followed by lowercase filler.
            let prefix = format!("{}.{}.", self.client, key);
            let mut parts = data.split(|&b| b == b'[');
            parts.next() == Some(&[][..])
                && parts.all(|f| {
                    f.starts_with(prefix.as_bytes())
                        && f.iter().all(|&b| {
                            b.is_ascii_digit() || b == b'.' || b == b']' || b.is_ascii_lowercase()
                        })
                })
        }
    }

    /// A kill may have emptied the key's backend.
    fn may_be_absent(&mut self, key: usize) {
        self.note(key, "may be absent".into());
        if let State::Known(ps) = &mut self.keys[key] {
            let mut ps = std::mem::take(ps);
            ps.push(None);
            self.keys[key] = normalize(ps);
        }
    }

    /// Accounts for kills since the model last looked.
    fn catch_up(&mut self, epoch: u64) {
        if epoch != self.epoch {
            self.all_may_be_absent();
            self.epoch = epoch;
        }
    }

    fn all_may_be_absent(&mut self) {
        for k in 0..self.keys.len() {
            self.may_be_absent(k);
        }
    }

    /// Applies a one-key op whose reply was `reply` (`None`: no reply, or
    /// a backend failure: applied or not).
    fn step(&mut self, op: &KeyOp, reply: Option<Outcome>) -> Result<(), String> {
        let flags = self.flags(op.key);
        let shown = String::from_utf8_lossy(&op.value[..op.value.len().min(16)]).into_owned();
        self.note(op.key, format!("{:?} {shown} -> {reply:?}", op.kind));
        let next = match (&self.keys[op.key], reply) {
            (State::Known(ps), None) => {
                let mut next = ps.clone();
                for p in ps {
                    next.extend(effects(op, flags, p).into_iter().map(|(_, n)| n));
                }
                normalize(next)
            }
            (State::Known(ps), Some(o)) => {
                let next: Vec<Possible> = ps
                    .iter()
                    .flat_map(|p| effects(op, flags, p))
                    .filter(|(out, _)| *out == o)
                    .map(|(_, n)| n)
                    .collect();
                if next.is_empty() {
                    return Err(format!(
                        "reply {o:?} to {:?} on {} is impossible; the cache may hold {}{}",
                        op.kind,
                        self.key_name(op.key),
                        describe(ps),
                        self.recent(op.key)
                    ));
                }
                normalize(next)
            }
            (State::Unknown, None) => State::Unknown,
            (State::Unknown, Some(o)) => {
                if !op.kind.allows(o) {
                    return Err(format!(
                        "reply {o:?} to {:?} on {}",
                        op.kind,
                        self.key_name(op.key)
                    ));
                }
                let item = |data: Vec<u8>| {
                    State::Known(vec![Some(Item {
                        data,
                        flags,
                        cas: None,
                    })])
                };
                match (&op.kind, o) {
                    (Kind::Set | Kind::Add | Kind::Replace | Kind::Cas(_), Outcome::Stored) => {
                        item(op.value.clone())
                    }
                    (_, Outcome::NotFound | Outcome::Deleted)
                    | (Kind::Replace | Kind::Append | Kind::Prepend, Outcome::NotStored) => {
                        State::Known(vec![None])
                    }
                    (_, Outcome::Number(n)) => {
                        let data = n.to_string().into_bytes();
                        if !self.attributed(op.key, &data) {
                            return Err(format!(
                                "{:?} on {} answered {n}, not this key's counter",
                                op.kind,
                                self.key_name(op.key)
                            ));
                        }
                        item(data)
                    }
                    _ => State::Unknown,
                }
            }
        };
        self.keys[op.key] = next;
        Ok(())
    }

    /// Narrows `key` by what a get saw.
    fn observe(&mut self, key: usize, seen: &Seen) -> Result<(), String> {
        let flags = self.flags(key);
        self.note(key, format!("get saw {}", describe_seen(seen)));
        let next = match (&self.keys[key], seen) {
            (State::Known(ps), _) => {
                let next: Vec<Possible> = ps
                    .iter()
                    .filter_map(|p| match (p, seen) {
                        (None, Seen::Miss) => Some(None),
                        (Some(i), Seen::Hit { data, flags, cas }) if i.same(data, *flags) => {
                            Some(Some(Item {
                                cas: *cas,
                                ..i.clone()
                            }))
                        }
                        _ => None,
                    })
                    .collect();
                if next.is_empty() {
                    return Err(format!(
                        "get {} saw {}; the cache may hold {}{}",
                        self.key_name(key),
                        describe_seen(seen),
                        describe(ps),
                        self.recent(key)
                    ));
                }
                State::Known(next)
            }
            (State::Unknown, Seen::Miss) => State::Known(vec![None]),
            (
                State::Unknown,
                Seen::Hit {
                    data,
                    flags: f,
                    cas,
                },
            ) => {
                if !self.attributed(key, data) || *f != flags {
                    return Err(format!(
                        "get {} saw {}, which this client never wrote to it",
                        self.key_name(key),
                        describe_seen(seen)
                    ));
                }
                State::Known(vec![Some(Item {
                    data: data.clone(),
                    flags,
                    cas: *cas,
                })])
            }
        };
        self.keys[key] = next;
        Ok(())
    }

    /// The one item the key surely holds, if the model knows it.
    fn sure_item(&self, key: usize) -> Option<&Item> {
        match &self.keys[key] {
            State::Known(ps) if ps.len() == 1 => ps[0].as_ref(),
            _ => None,
        }
    }

    fn longest(&self, key: usize) -> usize {
        match &self.keys[key] {
            State::Known(ps) => ps.iter().flatten().map(|i| i.data.len()).max().unwrap_or(0),
            State::Unknown => usize::MAX,
        }
    }

    /// A value only this client writes to `key`.
    fn value(&mut self, key: usize, rng: &mut Rng, fragment: bool) -> Vec<u8> {
        self.version += 1;
        let v = self.version;
        if is_counter(key) {
            let n = counter_owner(self.client, key) * COUNTER_SCALE
                + 1_000_000
                + rng.below(1_000_000) as u64;
            return n.to_string().into_bytes();
        }
        let mut data = format!("[{}.{}.{v}]", self.client, key).into_bytes();
        let filler = if fragment {
            rng.below(16)
        } else if rng.percent(2) {
            5_000 + rng.below(20_000)
        } else {
            rng.below(200)
        };
        data.extend((0..filler).map(|i| b'a' + ((v as usize + i) % 26) as u8));
        data
    }

    /// A random operation on this client's keys.
    fn random_op(&mut self, rng: &mut Rng) -> Op {
        let key = rng.below(KEYS_PER_CLIENT);
        let roll = rng.below(100);
        if roll < 28 {
            let n = 1 + rng.below(8);
            let mut keys: Vec<usize> = Vec::new();
            while keys.len() < n {
                let k = rng.below(KEYS_PER_CLIENT);
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
            return Op::Get {
                keys,
                cas: rng.percent(50),
            };
        }
        let noreply = rng.percent(15);
        let kind = if is_counter(key) {
            match roll {
                28..=42 => Kind::Set,
                43..=47 => Kind::Add,
                48..=52 => Kind::Replace,
                53..=72 => Kind::Incr(1 + rng.below(100) as u64),
                73..=84 => Kind::Decr(1 + rng.below(100) as u64),
                85..=89 => Kind::Delete,
                90..=93 => Kind::Touch,
                _ => self.cas_kind(key, rng),
            }
        } else {
            match roll {
                28..=45 => Kind::Set,
                46..=52 => Kind::Add,
                53..=59 => Kind::Replace,
                60..=67 => Kind::Append,
                68..=73 => Kind::Prepend,
                74..=79 => Kind::Delete,
                80..=84 => Kind::Touch,
                _ => self.cas_kind(key, rng),
            }
        };
        let kind = match kind {
            Kind::Append | Kind::Prepend if self.longest(key) > MAX_GROWN_LEN => Kind::Set,
            k => k,
        };
        let value = match kind {
            Kind::Set | Kind::Add | Kind::Replace | Kind::Cas(_) => self.value(key, rng, false),
            Kind::Append | Kind::Prepend => self.value(key, rng, true),
            _ => Vec::new(),
        };
        Op::One(KeyOp {
            kind,
            key,
            value,
            noreply,
        })
    }

    /// A cas with the unique a `gets` showed (usually), or a stale one.
    fn cas_kind(&self, key: usize, rng: &mut Rng) -> Kind {
        match self.sure_item(key).and_then(|i| i.cas) {
            Some(c) if rng.percent(80) => Kind::Cas(c),
            Some(c) => Kind::Cas(c + 1 + rng.below(1000) as u64),
            None => Kind::Cas(1 << 40 | rng.next() >> 30),
        }
    }
}

fn describe_item(data: &[u8], flags: u32) -> String {
    let s = String::from_utf8_lossy(data);
    let short: String = s.chars().take(60).collect();
    format!(
        "{short:?}{} (len {}, flags {flags})",
        if s.len() > 60 { "…" } else { "" },
        data.len()
    )
}

fn describe(ps: &[Possible]) -> String {
    ps.iter()
        .map(|p| match p {
            None => "absent".to_string(),
            Some(i) => describe_item(&i.data, i.flags),
        })
        .collect::<Vec<_>>()
        .join(" or ")
}

fn describe_seen(s: &Seen) -> String {
    match s {
        Seen::Miss => "a miss".into(),
        Seen::Hit { data, flags, .. } => describe_item(data, *flags),
    }
}

// ------------------------------------------------------------ the wire

/// A blocking connection with its own buffer; every read has a timeout.
struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    fn fill(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err("connection closed by guard".into()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(format!("no reply within the timeout: {e}")),
        }
    }

    fn line(&mut self) -> Result<String, String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            self.fill()?;
        }
    }

    fn exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(self.buf.drain(..n).collect())
    }
}

// ------------------------------------------------------------ text protocol

fn encode_text(m: &Model, op: &Op, out: &mut Vec<u8>) {
    match op {
        Op::Get { keys, cas } => {
            out.extend_from_slice(if *cas { b"gets" } else { b"get" });
            for &k in keys {
                out.push(b' ');
                out.extend_from_slice(m.key_name(k).as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        Op::One(op) => {
            let key = m.key_name(op.key);
            let nr = if op.noreply { " noreply" } else { "" };
            let store = |cmd: &str, cas: Option<u64>, out: &mut Vec<u8>| {
                let cas = cas.map(|c| format!(" {c}")).unwrap_or_default();
                out.extend_from_slice(
                    format!(
                        "{cmd} {key} {} 0 {}{cas}{nr}\r\n",
                        m.flags(op.key),
                        op.value.len()
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(&op.value);
                out.extend_from_slice(b"\r\n");
            };
            match op.kind {
                Kind::Set => store("set", None, out),
                Kind::Add => store("add", None, out),
                Kind::Replace => store("replace", None, out),
                Kind::Append => store("append", None, out),
                Kind::Prepend => store("prepend", None, out),
                Kind::Cas(c) => store("cas", Some(c), out),
                Kind::Incr(d) => {
                    out.extend_from_slice(format!("incr {key} {d}{nr}\r\n").as_bytes())
                }
                Kind::Decr(d) => {
                    out.extend_from_slice(format!("decr {key} {d}{nr}\r\n").as_bytes())
                }
                Kind::Delete => out.extend_from_slice(format!("delete {key}{nr}\r\n").as_bytes()),
                Kind::Touch => out.extend_from_slice(format!("touch {key} 0{nr}\r\n").as_bytes()),
            }
        }
    }
}

/// A one-key reply line: `None` for a backend failure.
fn text_outcome(kind: &Kind, line: &str) -> Result<Option<Outcome>, String> {
    if line.starts_with("SERVER_ERROR ") {
        return Ok(None);
    }
    let o = match line {
        "STORED" => Outcome::Stored,
        "NOT_STORED" => Outcome::NotStored,
        "EXISTS" => Outcome::Exists,
        "NOT_FOUND" => Outcome::NotFound,
        "DELETED" => Outcome::Deleted,
        "TOUCHED" => Outcome::Touched,
        n if matches!(kind, Kind::Incr(_) | Kind::Decr(_))
            && !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Outcome::Number(n.parse().map_err(|e| format!("{n:?}: {e}"))?)
        }
        other => return Err(format!("reply {other:?} has the wrong shape")),
    };
    if !kind.allows(o) {
        return Err(format!("reply {line:?} cannot answer {kind:?}"));
    }
    Ok(Some(o))
}

/// A get reply: each requested key's hit or miss, or `None` for a backend
/// failure.
fn read_text_get(
    w: &mut Wire,
    m: &Model,
    keys: &[usize],
    cas: bool,
) -> Result<Option<Vec<Seen>>, String> {
    let mut seen: Vec<Seen> = vec![Seen::Miss; keys.len()];
    let mut next = 0;
    let mut first = true;
    loop {
        let line = w.line()?;
        if line == "END" {
            return Ok(Some(seen));
        }
        if first && line.starts_with("SERVER_ERROR ") {
            return Ok(None);
        }
        first = false;
        let f: Vec<&str> = line.split(' ').collect();
        let ok_shape = f.first() == Some(&"VALUE") && f.len() == if cas { 5 } else { 4 };
        if !ok_shape {
            return Err(format!("get reply line {line:?} has the wrong shape"));
        }
        let Some(pos) = keys[next..]
            .iter()
            .position(|&k| m.key_name(k) == f[1])
            .map(|p| p + next)
        else {
            return Err(format!(
                "get of {:?} answered for key {:?} (not requested, or out of order)",
                keys.iter().map(|&k| m.key_name(k)).collect::<Vec<_>>(),
                f[1]
            ));
        };
        let flags: u32 = f[2].parse().map_err(|_| format!("flags in {line:?}"))?;
        let len: usize = f[3].parse().map_err(|_| format!("length in {line:?}"))?;
        let unique = if cas {
            Some(f[4].parse().map_err(|_| format!("cas in {line:?}"))?)
        } else {
            None
        };
        let mut data = w.exact(len + 2)?;
        if !data.ends_with(b"\r\n") {
            return Err(format!("value of {line:?} not followed by CRLF"));
        }
        data.truncate(len);
        seen[pos] = Seen::Hit {
            data,
            flags,
            cas: unique,
        };
        next = pos + 1;
    }
}

// ------------------------------------------------------------ binary protocol

mod op {
    pub const SET: u8 = 0x01;
    pub const ADD: u8 = 0x02;
    pub const REPLACE: u8 = 0x03;
    pub const DELETE: u8 = 0x04;
    pub const NOOP: u8 = 0x0a;
    pub const GETK: u8 = 0x0c;
    pub const GETKQ: u8 = 0x0d;
    pub const APPEND: u8 = 0x0e;
    pub const PREPEND: u8 = 0x0f;
    /// The quiet form of a store or delete opcode.
    pub fn quiet(op: u8) -> u8 {
        match op {
            SET => 0x11,
            ADD => 0x12,
            REPLACE => 0x13,
            DELETE => 0x14,
            APPEND => 0x19,
            PREPEND => 0x1a,
            other => other,
        }
    }
}

/// What the binary client sends: no cas, incr/decr or touch.
fn binary_op(m: &mut Model, rng: &mut Rng) -> Op {
    loop {
        let o = m.random_op(rng);
        if let Op::One(k) = &o
            && matches!(
                k.kind,
                Kind::Cas(_) | Kind::Incr(_) | Kind::Decr(_) | Kind::Touch
            )
        {
            continue;
        }
        return o;
    }
}

struct BinReply {
    opcode: u8,
    status: u16,
    opaque: u32,
    extras: Vec<u8>,
    key: Vec<u8>,
    value: Vec<u8>,
}

impl Wire {
    /// The next response's opaque, without consuming it.
    fn peek_opaque(&mut self) -> Result<u32, String> {
        while self.buf.len() < 24 {
            self.fill()?;
        }
        Ok(u32::from_be_bytes(self.buf[12..16].try_into().unwrap()))
    }

    fn bin_reply(&mut self) -> Result<BinReply, String> {
        let h = self.exact(24)?;
        if h[0] != 0x81 {
            return Err(format!("response magic {:#04x}", h[0]));
        }
        let key_len = u16::from_be_bytes([h[2], h[3]]) as usize;
        let extras_len = h[4] as usize;
        let body = u32::from_be_bytes(h[8..12].try_into().unwrap()) as usize;
        if body < key_len + extras_len {
            return Err(format!("body {body} shorter than key and extras"));
        }
        let mut b = self.exact(body)?;
        let value = b.split_off(extras_len + key_len);
        let key = b.split_off(extras_len);
        Ok(BinReply {
            opcode: h[1],
            status: u16::from_be_bytes([h[6], h[7]]),
            opaque: u32::from_be_bytes(h[12..16].try_into().unwrap()),
            extras: b,
            key,
            value,
        })
    }
}

/// A store/delete reply's outcome, `None` for a backend failure.
fn binary_outcome(kind: &Kind, status: u16) -> Result<Option<Outcome>, String> {
    let o = match (kind, status) {
        (_, 0x0086) => return Ok(None),
        (Kind::Delete, 0) => Outcome::Deleted,
        (Kind::Delete, 1) => Outcome::NotFound,
        (_, 0) => Outcome::Stored,
        (Kind::Add, 2) | (Kind::Replace, 1) | (Kind::Append | Kind::Prepend, 5) => {
            Outcome::NotStored
        }
        (k, s) => return Err(format!("status {s:#06x} cannot answer {k:?}")),
    };
    Ok(Some(o))
}

fn binary_client(
    addr: SocketAddr,
    client: usize,
    seed: u64,
    run: &Run,
) -> Result<(Model, Tally), String> {
    let mut rng = Rng(seed ^ (client as u64).wrapping_mul(0x1000_0000_01B3) ^ 0xB1);
    let mut m = Model::new(client);
    let mut t = Tally::default();
    let mut w = Wire::connect(addr);
    m.epoch = run.epoch.load(SeqCst);
    let mut opaque: u32 = 1;
    while run.keep_going(t.ops) {
        let e0 = run.epoch.load(SeqCst);
        m.catch_up(e0);
        let depth = 1 + rng.below(16);
        let ops: Vec<Op> = (0..depth).map(|_| binary_op(&mut m, &mut rng)).collect();
        // Each op's opaques: one per key for gets.
        let mut out = Vec::new();
        let mut opaques: Vec<Vec<u32>> = Vec::new();
        for o in &ops {
            let mut mine = Vec::new();
            match o {
                Op::Get { keys, .. } => {
                    // One key: getk; several: getkq each, answered up to the noop.
                    let code = if keys.len() == 1 { op::GETK } else { op::GETKQ };
                    for &k in keys {
                        out.extend(common::bin(
                            code,
                            m.key_name(k).as_bytes(),
                            b"",
                            b"",
                            0,
                            opaque,
                        ));
                        mine.push(opaque);
                        opaque = opaque.wrapping_add(1);
                    }
                }
                Op::One(k) => {
                    let code = match k.kind {
                        Kind::Set => op::SET,
                        Kind::Add => op::ADD,
                        Kind::Replace => op::REPLACE,
                        Kind::Append => op::APPEND,
                        Kind::Prepend => op::PREPEND,
                        Kind::Delete => op::DELETE,
                        _ => unreachable!(),
                    };
                    let code = if k.noreply { op::quiet(code) } else { code };
                    let extras: Vec<u8> = match k.kind {
                        Kind::Set | Kind::Add | Kind::Replace => {
                            [m.flags(k.key).to_be_bytes(), 0u32.to_be_bytes()].concat()
                        }
                        _ => Vec::new(),
                    };
                    out.extend(common::bin(
                        code,
                        m.key_name(k.key).as_bytes(),
                        &extras,
                        &k.value,
                        0,
                        opaque,
                    ));
                    mine.push(opaque);
                    opaque = opaque.wrapping_add(1);
                }
            }
            opaques.push(mine);
        }
        let noop = opaque;
        opaque = opaque.wrapping_add(1);
        out.extend(common::bin(op::NOOP, b"", b"", b"", 0, noop));
        w.stream.write_all(&out).map_err(|e| e.to_string())?;
        let context = |i: usize, e: String| {
            format!(
                "binary client {client}, batch {}, request {i} of {depth} ({:?}): {e}",
                t.batches, ops[i]
            )
        };
        let mut loose = false;
        for (i, o) in ops.iter().enumerate() {
            match o {
                Op::One(k) => {
                    let mine = opaques[i][0];
                    let answered =
                        !k.noreply || w.peek_opaque().map_err(|e| context(i, e))? == mine;
                    let outcome = if answered {
                        let r = w.bin_reply().map_err(|e| context(i, e))?;
                        if r.opaque != mine {
                            return Err(context(
                                i,
                                format!("answered with opaque {}, expected {mine}", r.opaque),
                            ));
                        }
                        loose |= run.loose_since(e0);
                        binary_outcome(&k.kind, r.status).map_err(|e| context(i, e))?
                    } else {
                        // Silent, so no reply to read the run's state
                        // after: now is as late as this can be known.
                        loose |= run.loose_since(e0);
                        // Quiet and silent: it succeeded.
                        Some(match k.kind {
                            Kind::Delete => Outcome::Deleted,
                            _ => Outcome::Stored,
                        })
                    };
                    if loose {
                        m.may_be_absent(k.key);
                    }
                    match outcome {
                        None => t.server_errors += 1,
                        Some(Outcome::Stored) => t.stored += 1,
                        _ => {}
                    }
                    m.step(k, outcome).map_err(|e| context(i, e))?;
                    if loose {
                        m.may_be_absent(k.key);
                    }
                }
                Op::Get { keys, .. } => {
                    let quiet = keys.len() > 1;
                    for (&key, &mine) in keys.iter().zip(&opaques[i]) {
                        let answered =
                            !quiet || w.peek_opaque().map_err(|e| context(i, e))? == mine;
                        let seen = if answered {
                            let r = w.bin_reply().map_err(|e| context(i, e))?;
                            loose |= run.loose_since(e0);
                            if r.opaque != mine {
                                return Err(context(
                                    i,
                                    format!("answered with opaque {}, expected {mine}", r.opaque),
                                ));
                            }
                            if r.status == 0 && r.key != m.key_name(key).as_bytes() {
                                return Err(context(
                                    i,
                                    format!(
                                        "hit for key {:?}, expected {}",
                                        String::from_utf8_lossy(&r.key),
                                        m.key_name(key)
                                    ),
                                ));
                            }
                            match r.status {
                                0 if r.extras.len() == 4 => Some(Seen::Hit {
                                    data: r.value,
                                    flags: u32::from_be_bytes(r.extras[..4].try_into().unwrap()),
                                    cas: None,
                                }),
                                1 if !quiet => Some(Seen::Miss),
                                0x0086 => None,
                                s => {
                                    return Err(context(
                                        i,
                                        format!("get status {s:#06x} (opcode {:#04x})", r.opcode),
                                    ));
                                }
                            }
                        } else {
                            // Silence is the miss: it was decided no
                            // earlier than the next reply peeked at.
                            loose |= run.loose_since(e0);
                            Some(Seen::Miss)
                        };
                        if loose {
                            m.may_be_absent(key);
                        }
                        match &seen {
                            None => t.server_errors += 1,
                            Some(s) => {
                                match s {
                                    Seen::Hit { .. } => t.hits += 1,
                                    Seen::Miss => t.misses += 1,
                                }
                                m.observe(key, s).map_err(|e| context(i, e))?;
                            }
                        }
                    }
                }
            }
        }
        let r = w
            .bin_reply()
            .map_err(|e| format!("binary client {client}: {e}"))?;
        if r.opaque != noop || r.opcode != op::NOOP {
            return Err(format!(
                "binary client {client}, batch {}: expected the noop ({noop}), got opcode {:#04x} opaque {}",
                t.batches, r.opcode, r.opaque
            ));
        }
        if !w.buf.is_empty() {
            return Err(format!(
                "binary client {client}: {} unexpected bytes after the noop",
                w.buf.len()
            ));
        }
        m.catch_up(run.epoch.load(SeqCst));
        t.ops += depth;
        t.batches += 1;
        run.ops.fetch_add(depth, SeqCst);
    }
    Ok((m, t))
}

// ------------------------------------------------------------ the run

/// Shared by clients and the controller.
struct Run {
    /// Bumped before each kill and again once the killed process is gone.
    epoch: AtomicU64,
    ops: AtomicUsize,
    failed: AtomicBool,
    clients_done: AtomicUsize,
    /// Backends killed and restarted so far.
    kills_done: AtomicUsize,
    /// Set from a kill until the backend is back in the ring.
    unsettled: AtomicBool,
    start: Instant,
}

impl Run {
    /// Whether a reply read now may be a miss for a reason the model does
    /// not see: the epoch moved since `e0`, or a backend is out.
    fn loose_since(&self, e0: u64) -> bool {
        self.epoch.load(SeqCst) != e0 || self.unsettled.load(SeqCst)
    }
}

impl Run {
    /// Clients run their share of operations, and on until every kill has
    /// happened (a slow machine must not end the workload before the
    /// failures it is about), within the time limit.
    fn keep_going(&self, ops: usize) -> bool {
        (ops < OPS_PER_CLIENT || self.kills_done.load(SeqCst) < KILLS)
            && self.start.elapsed() < RUN_LIMIT
            && !self.failed.load(SeqCst)
    }
}

#[derive(Default, Debug)]
struct Tally {
    ops: usize,
    batches: usize,
    server_errors: usize,
    hits: usize,
    misses: usize,
    stored: usize,
}

/// One client's run over the text protocol; returns its model.
fn text_client(
    addr: SocketAddr,
    client: usize,
    seed: u64,
    run: &Run,
) -> Result<(Model, Tally), String> {
    let mut rng = Rng(seed ^ (client as u64).wrapping_mul(0x1000_0000_01B3));
    let mut m = Model::new(client);
    let mut t = Tally::default();
    let mut w = Wire::connect(addr);
    m.epoch = run.epoch.load(SeqCst);
    while run.keep_going(t.ops) {
        let e0 = run.epoch.load(SeqCst);
        m.catch_up(e0);
        let depth = 1 + rng.below(16);
        let ops: Vec<Op> = (0..depth).map(|_| m.random_op(&mut rng)).collect();
        let mut out = Vec::new();
        for op in &ops {
            encode_text(&m, op, &mut out);
        }
        out.extend_from_slice(b"mn\r\n");
        // Sometimes in two writes, splitting a request anywhere.
        if rng.percent(20) && out.len() > 1 {
            let at = 1 + rng.below(out.len() - 1);
            w.stream.write_all(&out[..at]).map_err(|e| e.to_string())?;
            w.stream.write_all(&out[at..]).map_err(|e| e.to_string())?;
        } else {
            w.stream.write_all(&out).map_err(|e| e.to_string())?;
        }
        let context = |i: usize, e: String| {
            format!(
                "client {client}, batch {}, request {i} of {depth} ({:?}): {e}",
                t.batches, ops[i]
            )
        };
        let mut loose = false;
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::One(k) if k.noreply => {
                    // No reply to read the run's state after: what it is
                    // now is as late as this op can be known to have run.
                    // (A re-admission's flush can empty the key's backend
                    // just before it runs, in the same batch.)
                    loose |= run.loose_since(e0);
                    if loose {
                        m.may_be_absent(k.key);
                    }
                    m.step(k, None).map_err(|e| context(i, e))?;
                    if loose {
                        m.may_be_absent(k.key);
                    }
                }
                Op::One(k) => {
                    let line = w.line().map_err(|e| context(i, e))?;
                    loose |= run.loose_since(e0);
                    if loose {
                        m.may_be_absent(k.key);
                    }
                    let o = text_outcome(&k.kind, &line).map_err(|e| context(i, e))?;
                    match o {
                        None => t.server_errors += 1,
                        Some(Outcome::Stored) => t.stored += 1,
                        _ => {}
                    }
                    m.step(k, o).map_err(|e| context(i, e))?;
                    if loose {
                        m.may_be_absent(k.key);
                    }
                }
                Op::Get { keys, cas } => {
                    let got = read_text_get(&mut w, &m, keys, *cas).map_err(|e| context(i, e))?;
                    loose |= run.loose_since(e0);
                    let Some(seen) = got else {
                        t.server_errors += 1;
                        continue;
                    };
                    for (&k, s) in keys.iter().zip(&seen) {
                        if loose {
                            m.may_be_absent(k);
                        }
                        match s {
                            Seen::Hit { .. } => t.hits += 1,
                            Seen::Miss => t.misses += 1,
                        }
                        m.observe(k, s).map_err(|e| context(i, e))?;
                    }
                }
            }
        }
        let mn = w.line().map_err(|e| format!("client {client}: {e}"))?;
        if mn != "MN" {
            return Err(format!(
                "client {client}, batch {}: expected MN after {depth} replies, got {mn:?} \
                 (a reply too many, or out of order)",
                t.batches
            ));
        }
        if !w.buf.is_empty() {
            return Err(format!(
                "client {client}, batch {}: {} unexpected bytes after MN: {:?}",
                t.batches,
                w.buf.len(),
                String::from_utf8_lossy(&w.buf[..w.buf.len().min(80)])
            ));
        }
        // Writes acknowledged before we noticed a kill may have been lost.
        m.catch_up(run.epoch.load(SeqCst));
        t.ops += depth;
        t.batches += 1;
        run.ops.fetch_add(depth, SeqCst);
    }
    Ok((m, t))
}

/// After the run, with every backend up again: each key holds what the
/// model allows.
fn final_text_check(addr: SocketAddr, m: &mut Model, epoch: u64) -> Result<(), String> {
    // Kills after this client finished count too.
    m.catch_up(epoch);
    let mut w = Wire::connect(addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    for key in 0..KEYS_PER_CLIENT {
        loop {
            w.stream
                .write_all(format!("gets {}\r\n", m.key_name(key)).as_bytes())
                .map_err(|e| e.to_string())?;
            match read_text_get(&mut w, m, &[key], true)? {
                Some(seen) => {
                    m.observe(key, &seen[0])
                        .map_err(|e| format!("final check, client {}: {e}", m.client))?;
                    break;
                }
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                None => return Err(format!("{} still fails after the run", m.key_name(key))),
            }
        }
    }
    Ok(())
}

/// Kills one backend (SIGKILL) at 20%, 45% and 70% of the workload and
/// restarts it on the same port after a short outage.
fn controller(
    backends: &mut [Option<Memcached>],
    ports: &[u16],
    seed: u64,
    run: &Run,
    proxy: SocketAddr,
) -> usize {
    let mut rng = Rng(seed ^ 0xC0FF_EE00);
    let total = CLIENTS * OPS_PER_CLIENT;
    let mut kills = 0;
    for pct in [20, 45, 70].into_iter().take(KILLS) {
        loop {
            if run.failed.load(SeqCst) || run.clients_done.load(SeqCst) == CLIENTS {
                return kills;
            }
            if run.ops.load(SeqCst) >= total * pct / 100 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let victim = rng.below(backends.len());
        run.unsettled.store(true, SeqCst);
        run.epoch.fetch_add(1, SeqCst);
        // Memcached's drop is SIGKILL and reap.
        drop(backends[victim].take());
        run.epoch.fetch_add(1, SeqCst);
        kills += 1;
        // Long enough for three failed reconnects (10, 20, 40 ms apart):
        // the dead backend is ejected before it returns.
        let outage = Duration::from_millis(300 + rng.below(500) as u64);
        eprintln!(
            "integrity: killed backend {victim} (port {}) at {:.1?}, {} ops done; restarting after {outage:?}",
            ports[victim],
            run.start.elapsed(),
            run.ops.load(SeqCst)
        );
        std::thread::sleep(outage);
        backends[victim] = Some(Memcached::start_on(ports[victim]));
        eprintln!(
            "integrity: backend {victim} back at {:.1?}",
            run.start.elapsed()
        );
        // Probed, flushed and in the ring again: only then is the run
        // settled, after one more epoch so replies read meanwhile stay
        // loose.
        let deadline = Instant::now() + Duration::from_secs(15);
        while stat(proxy, "backend_readmissions") < kills as u64 {
            if Instant::now() > deadline {
                eprintln!("integrity: backend {victim} was not re-admitted within 15 s");
                run.failed.store(true, SeqCst);
                return kills;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "integrity: backend {victim} re-admitted at {:.1?}",
            run.start.elapsed()
        );
        run.epoch.fetch_add(1, SeqCst);
        run.unsettled.store(false, SeqCst);
        run.kills_done.fetch_add(1, SeqCst);
    }
    kills
}

type ClientFn = fn(SocketAddr, usize, u64, &Run) -> Result<(Model, Tally), String>;

/// Runs `client` on every client thread while the controller kills and
/// restarts backends, then checks every key once more over text.
fn workload(client: ClientFn) {
    let _ = env_logger::builder().is_test(true).try_init();
    let seed = seed();
    eprintln!("integrity: seed {seed} (GUARD_INTEGRITY_SEED={seed} to replay)");
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut backends: Vec<Option<Memcached>> = ports
        .iter()
        .map(|&p| Some(Memcached::start_on(p)))
        .collect();
    let mut cfg = {
        let refs: Vec<&Memcached> = backends.iter().flatten().collect();
        config(&refs)
    };
    // Failures here come from kills, which fail requests at once; a long
    // timeout keeps a slow debug build on two shared cores from adding
    // timeouts (after which a request may still run late, which this model
    // does not allow for).
    cfg.request_timeout_ms = 3_000;
    // Ejections come from the kills alone: latency on a loaded debug
    // build is no reason, and a miss with no kill behind it would be one
    // the model cannot allow. Re-admission soon after a restart, so keys
    // move back while the pipelines run.
    cfg.outlier_ratio = 0.0;
    cfg.eject_time_ms = 200;
    cfg.max_eject_time_ms = 400;
    let guard = GuardProxy::start(cfg);
    let addr = guard.addr;
    let run = Run {
        epoch: AtomicU64::new(0),
        ops: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        clients_done: AtomicUsize::new(0),
        kills_done: AtomicUsize::new(0),
        unsettled: AtomicBool::new(false),
        start: Instant::now(),
    };

    let (results, kills) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let run = &run;
                s.spawn(move || {
                    let r = client(addr, c, seed, run);
                    if r.is_err() {
                        run.failed.store(true, SeqCst);
                    }
                    run.clients_done.fetch_add(1, SeqCst);
                    r
                })
            })
            .collect();
        let kills = controller(&mut backends, &ports, seed, &run, addr);
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (results, kills)
    });

    let mut failures = Vec::new();
    let mut total = Tally::default();
    let mut models = Vec::new();
    for r in results {
        match r {
            Ok((m, t)) => {
                total.ops += t.ops;
                total.batches += t.batches;
                total.server_errors += t.server_errors;
                total.hits += t.hits;
                total.misses += t.misses;
                total.stored += t.stored;
                models.push(m);
            }
            Err(e) => failures.push(e),
        }
    }
    if failures.is_empty() {
        for m in &mut models {
            if let Err(e) = final_text_check(addr, m, run.epoch.load(SeqCst)) {
                failures.push(e);
            }
        }
    }
    eprintln!(
        "integrity: {kills} kills, {:.1?}; {total:?}",
        run.start.elapsed()
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} client(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        kills, KILLS,
        "seed {seed}: the workload ended before every kill"
    );
    // Every kill ejected its backend and the restart brought it back.
    assert_eq!(stat(addr, "backend_ejections"), KILLS as u64, "seed {seed}");
    assert_eq!(
        stat(addr, "backend_readmissions"),
        KILLS as u64,
        "seed {seed}"
    );
    // The run must have exercised something on both sides of the failures.
    assert!(
        total.stored > 1000 && total.hits > 1000,
        "seed {seed}: {total:?}"
    );
}

#[test]
fn text_workload_survives_backend_restarts() {
    workload(text_client);
}

#[test]
fn binary_workload_survives_backend_restarts() {
    workload(binary_client);
}
