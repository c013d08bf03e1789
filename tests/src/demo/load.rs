//! The demo's clients, all in the client namespace, each bound to its
//! own source address, and what they record.
//!
//! - steady: each tenant's load through the whole run, a request at a
//!   time on each connection, paced; a client that waits longer than the
//!   script's timeout gives up, closes the connection and reconnects, as
//!   the incident's clients did;
//! - spike: the noisy tenant's pipelined sets during its phase;
//! - storm: clients that connect, ask one get, wait the short timeout at
//!   most, close and connect again, until the storm's attempts are spent.
//!
//! Every loop ends at its deadline, when told to, or when the demo is
//! interrupted.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

use super::stopped;

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A reply the protocol defines for it (a value, a miss, STORED).
    Served,
    /// An error reply (SERVER_ERROR, CLIENT_ERROR, ERROR).
    Refused,
    /// No reply within the client's timeout.
    TimedOut,
    /// The connection failed, closed or could not be opened.
    Failed,
}

impl Outcome {
    /// Everything but [`Outcome::Served`] is an error to the client.
    pub fn is_error(self) -> bool {
        self != Outcome::Served
    }
}

/// One steady request: when it was sent, how long until its reply or
/// until the client gave up.
#[derive(Clone, Copy, Debug)]
pub struct Req {
    /// Milliseconds from the run's start.
    pub t_ms: u32,
    /// Microseconds to the reply; the timeout for a timed-out request.
    pub lat_us: u32,
    /// How it ended.
    pub outcome: Outcome,
}

/// One pipelined batch of the spike.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpikeBatch {
    /// Milliseconds from the run's start.
    pub t_ms: u32,
    /// Requests written.
    pub offered: u32,
    /// Stored.
    pub served: u32,
    /// Error replies (over budget, backend errors).
    pub refused: u32,
    /// Not answered in time, or the connection failed.
    pub failed: u32,
}

/// One attempt of a storm client.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    /// Milliseconds from the run's start.
    pub t_ms: u32,
    /// Whether the connect (and login) succeeded.
    pub connected: bool,
    /// How its get ended (`Failed` when it never connected).
    pub outcome: Outcome,
}

/// Everything the clients of one run record.
pub struct Recorder {
    /// The run's start.
    pub t0: Instant,
    /// Per tenant, every steady request.
    pub steady: Vec<Mutex<Vec<Req>>>,
    /// The spike's batches.
    pub spike: Mutex<Vec<SpikeBatch>>,
    /// The storm's attempts.
    pub storm: Mutex<Vec<Attempt>>,
    /// Milliseconds of every connect any client started.
    pub connects: Mutex<Vec<u32>>,
    /// Set when the run is over: every client stops.
    pub end: AtomicBool,
}

/// A lock a panicking client left is still sound: every update is a push.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new(tenants: usize) -> Self {
        Self {
            t0: Instant::now(),
            steady: (0..tenants).map(|_| Mutex::new(Vec::new())).collect(),
            spike: Mutex::new(Vec::new()),
            storm: Mutex::new(Vec::new()),
            connects: Mutex::new(Vec::new()),
            end: AtomicBool::new(false),
        }
    }

    /// Milliseconds since the run's start.
    pub fn now_ms(&self) -> u32 {
        self.t0.elapsed().as_millis().min(u128::from(u32::MAX)) as u32
    }

    fn over(&self) -> bool {
        self.end.load(Ordering::Relaxed) || stopped()
    }
}

/// What every client needs to know.
#[derive(Clone)]
pub struct ClientSetup {
    /// The proxy.
    pub dst: SocketAddr,
    /// Log in first (guard) with these, per tenant; `None` for
    /// nutcracker, which has no authentication.
    pub logins: Option<Vec<(String, String)>>,
    /// Tenant names, used as key prefixes.
    pub tenants: Vec<String>,
    /// How long a client waits for a reply.
    pub timeout: Duration,
    /// No client runs past this, whatever else happens.
    pub hard_deadline: Instant,
}

/// A connection from `src` to `dst`, opened within `timeout`.
pub fn connect(src: Ipv4Addr, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    // The port is chosen at connect, per destination, not at bind: the
    // storm's thousands of connects from one address never run short.
    let one: libc::c_int = 1;
    // SAFETY: a valid int option on a socket we own.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    s.connect_timeout(&dst.into(), timeout)?;
    s.set_tcp_nodelay(true)?;
    Ok(s.into())
}

/// A client connection with its read buffer.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// How one exchange ended.
enum Reply {
    Ok,
    Error,
    TimedOut,
    Closed,
}

impl Conn {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends `req` and reads `replies` whole replies by `deadline`,
    /// counting each.
    fn exchange(&mut self, req: &[u8], replies: usize, deadline: Instant) -> (usize, usize, Reply) {
        if self.stream.write_all(req).is_err() {
            return (0, 0, Reply::Closed);
        }
        let (mut ok, mut err) = (0, 0);
        while ok + err < replies {
            if let Some((len, good)) = reply_len(&self.buf) {
                self.buf.drain(..len);
                if good {
                    ok += 1;
                } else {
                    err += 1;
                }
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (ok, err, Reply::TimedOut);
            }
            let _ = self.stream.set_read_timeout(Some(left));
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return (ok, err, Reply::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return (ok, err, Reply::TimedOut);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return (ok, err, Reply::Closed),
            }
        }
        let last = if err > 0 { Reply::Error } else { Reply::Ok };
        (ok, err, last)
    }

    /// One request and its reply.
    fn request(&mut self, req: &[u8], deadline: Instant) -> Reply {
        self.exchange(req, 1, deadline).2
    }

    /// memcached's text login (`set` of "user password"), as guard takes it.
    fn login(&mut self, user: &str, password: &str, deadline: Instant) -> Reply {
        let creds = format!("{user} {password}");
        let req = format!("set auth 0 0 {}\r\n{creds}\r\n", creds.len());
        self.request(req.as_bytes(), deadline)
    }
}

/// Length of the whole reply at the start of `buf` and whether it is a
/// good one, if it is all there.
fn reply_len(buf: &[u8]) -> Option<(usize, bool)> {
    let eol = buf.windows(2).position(|w| w == b"\r\n")? + 2;
    if let Some(header) = buf.strip_prefix(b"VALUE ") {
        let line = std::str::from_utf8(&header[..eol - 8]).ok()?;
        let len: usize = line.split(' ').nth(2)?.parse().ok()?;
        let end = eol + len + 2 + 5;
        return (buf.len() >= end).then_some((end, true));
    }
    let line = &buf[..eol];
    let good = line == b"END\r\n" || line == b"STORED\r\n";
    Some((eol, good))
}

/// xorshift: keys and the get/set mix.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Opens a connection and logs in if the side needs it; records the
/// connect.
fn open(
    rec: &Recorder,
    setup: &ClientSetup,
    tenant: usize,
    src: Ipv4Addr,
    connect_timeout: Duration,
    login_by: Instant,
) -> Option<Conn> {
    lock(&rec.connects).push(rec.now_ms());
    let mut c = Conn::new(connect(src, setup.dst, connect_timeout).ok()?);
    if let Some(logins) = &setup.logins {
        let (user, pw) = &logins[tenant];
        if !matches!(c.login(user, pw, login_by), Reply::Ok) {
            return None;
        }
    }
    Some(c)
}

/// Sleeps until `at` in short steps, so a stop is seen; false if the run
/// ended first.
fn sleep_until(rec: &Recorder, at: Instant) -> bool {
    loop {
        if rec.over() {
            return false;
        }
        let now = Instant::now();
        if now >= at {
            return true;
        }
        std::thread::sleep((at - now).min(Duration::from_millis(50)));
    }
}

/// One connection of a tenant's steady load, for the whole run: a get
/// (80%) or a set of 100 bytes (20%) of one of the tenant's 1,000 keys,
/// every `every`; a request not answered within the timeout is an
/// error, and the client closes and reconnects. Missed slots are
/// skipped, not caught up.
pub fn steady(
    rec: &Recorder,
    setup: &ClientSetup,
    tenant: usize,
    src: Ipv4Addr,
    every: Duration,
    seed: u64,
) {
    let prefix = &setup.tenants[tenant];
    let mut rng = Rng(seed | 1);
    let value = [b'v'; 100];
    let mut conn: Option<Conn> = None;
    let mut next = Instant::now();
    let mut req = Vec::with_capacity(256);
    while Instant::now() < setup.hard_deadline && sleep_until(rec, next) {
        next = (next + every).max(Instant::now());
        let t_ms = rec.now_ms();
        let sent = Instant::now();
        if conn.is_none() {
            conn = open(
                rec,
                setup,
                tenant,
                src,
                Duration::from_secs(1),
                sent + setup.timeout,
            );
            if conn.is_none() {
                lock(&rec.steady[tenant]).push(Req {
                    t_ms,
                    lat_us: sent.elapsed().as_micros() as u32,
                    outcome: Outcome::Failed,
                });
                continue;
            }
        }
        let r = rng.next();
        req.clear();
        let key = format!("{prefix}:{}", (r >> 8) % 1_000);
        if r % 10 < 8 {
            req.extend_from_slice(format!("get {key}\r\n").as_bytes());
        } else {
            req.extend_from_slice(format!("set {key} 0 0 {}\r\n", value.len()).as_bytes());
            req.extend_from_slice(&value);
            req.extend_from_slice(b"\r\n");
        }
        let c = conn.as_mut().expect("connected above");
        let reply = c.request(&req, Instant::now() + setup.timeout);
        let lat = sent.elapsed();
        let outcome = match reply {
            Reply::Ok => Outcome::Served,
            Reply::Error => Outcome::Refused,
            Reply::TimedOut => Outcome::TimedOut,
            Reply::Closed => Outcome::Failed,
        };
        if matches!(outcome, Outcome::TimedOut | Outcome::Failed) {
            // The client gives up on this connection and opens another.
            conn = None;
        }
        let lat_us = if outcome == Outcome::TimedOut {
            setup.timeout.as_micros() as u32
        } else {
            lat.as_micros().min(u128::from(u32::MAX)) as u32
        };
        lock(&rec.steady[tenant]).push(Req {
            t_ms,
            lat_us,
            outcome,
        });
    }
}

/// The key of the noisy tenant's `i`th large value.
pub fn spike_key(prefix: &str, i: usize) -> String {
    format!("{prefix}:big{i}")
}

/// Stores the noisy tenant's `keys` large values, `value_len` bytes
/// each, through the proxy from `src`: what its spike will read.
pub fn preload_spike(setup: &ClientSetup, src: Ipv4Addr, keys: usize, value_len: usize) -> usize {
    let prefix = &setup.tenants[0];
    let value = vec![b'x'; value_len];
    let Ok(s) = connect(src, setup.dst, Duration::from_secs(2)) else {
        return 0;
    };
    let mut c = Conn::new(s);
    if let Some(l) = &setup.logins
        && !matches!(
            c.login(&l[0].0, &l[0].1, Instant::now() + Duration::from_secs(2)),
            Reply::Ok
        )
    {
        return 0;
    }
    let mut stored = 0;
    for i in 0..keys {
        let mut req = format!("set {} 0 0 {value_len}\r\n", spike_key(prefix, i)).into_bytes();
        req.extend_from_slice(&value);
        req.extend_from_slice(b"\r\n");
        stored += usize::from(matches!(
            c.request(&req, Instant::now() + Duration::from_secs(2)),
            Reply::Ok
        ));
    }
    stored
}

/// Lowers the calling thread's priority, as a load generator on the
/// proxy's own cores must: clients on other hosts do not take the
/// proxy's CPU.
pub fn nice_this_thread(nice: i32) {
    // SAFETY: gettid has no preconditions; PRIO_PROCESS with a thread id
    // changes only that thread (Linux).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice);
    }
}

/// One connection of the noisy tenant's spike, until `stop`: `depth`
/// pipelined gets of its large values (`keys` of them) every `every`,
/// each batch given a second for its replies.
#[allow(clippy::too_many_arguments)]
pub fn spike(
    rec: &Recorder,
    setup: &ClientSetup,
    src: Ipv4Addr,
    n: usize,
    depth: usize,
    keys: usize,
    every: Duration,
    stop: &AtomicBool,
) {
    nice_this_thread(10);
    let prefix = &setup.tenants[0];
    let mut batch = Vec::new();
    for i in 0..depth {
        let key = spike_key(prefix, (n * depth + i) % keys.max(1));
        batch.extend_from_slice(format!("get {key}\r\n").as_bytes());
    }
    let mut conn: Option<Conn> = None;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed)
        && Instant::now() < setup.hard_deadline
        && sleep_until(rec, next)
    {
        next = (next + every).max(Instant::now());
        let t_ms = rec.now_ms();
        let deadline = Instant::now() + Duration::from_secs(1);
        if conn.is_none() {
            conn = open(rec, setup, 0, src, Duration::from_secs(1), deadline);
        }
        let mut b = SpikeBatch {
            t_ms,
            offered: depth as u32,
            ..SpikeBatch::default()
        };
        match conn.as_mut() {
            None => b.failed = depth as u32,
            Some(c) => {
                let (ok, err, last) = c.exchange(&batch, depth, deadline);
                b.served = ok as u32;
                b.refused = err as u32;
                b.failed = (depth - ok - err) as u32;
                if matches!(last, Reply::TimedOut | Reply::Closed) {
                    conn = None;
                }
            }
        }
        lock(&rec.spike).push(b);
    }
}

/// One storm client: `attempts` times, paced evenly until `until`, it
/// connects (within the script's connect timeout), logs in if needed,
/// asks one get, waits the client timeout at most, and closes.
#[allow(clippy::too_many_arguments)]
pub fn storm(
    rec: &Recorder,
    setup: &ClientSetup,
    tenant: usize,
    src: Ipv4Addr,
    attempts: usize,
    connect_timeout: Duration,
    until: Instant,
    seed: u64,
) {
    let prefix = &setup.tenants[tenant];
    let start = Instant::now();
    let span = until.saturating_duration_since(start);
    let mut rng = Rng(seed | 1);
    for i in 0..attempts {
        let at = start + span.mul_f64(i as f64 / attempts.max(1) as f64);
        // A client that fell behind its schedule makes fewer attempts
        // rather than outlast the phase.
        if Instant::now() >= until || Instant::now() >= setup.hard_deadline || !sleep_until(rec, at)
        {
            return;
        }
        let t_ms = rec.now_ms();
        let deadline = Instant::now() + connect_timeout + setup.timeout;
        let Some(mut c) = open(rec, setup, tenant, src, connect_timeout, deadline) else {
            lock(&rec.storm).push(Attempt {
                t_ms,
                connected: false,
                outcome: Outcome::Failed,
            });
            continue;
        };
        let key = format!("{prefix}:{}", (rng.next() >> 8) % 1_000);
        let outcome = match c.request(
            format!("get {key}\r\n").as_bytes(),
            Instant::now() + setup.timeout,
        ) {
            Reply::Ok => Outcome::Served,
            Reply::Error => Outcome::Refused,
            Reply::TimedOut => Outcome::TimedOut,
            Reply::Closed => Outcome::Failed,
        };
        // Closed whatever happened: a FIN, as a client that gives up sends.
        drop(c);
        lock(&rec.storm).push(Attempt {
            t_ms,
            connected: true,
            outcome,
        });
    }
}

/// Connects once from every address and logs in, as clients that were
/// there before the incident had: guard has verified each source by
/// the time the storm comes (nutcracker is asked a `version`).
pub fn warm_up(setup: &ClientSetup, sources: &[(usize, Ipv4Addr)]) -> usize {
    let mut ok = 0;
    for &(tenant, src) in sources {
        let Ok(s) = connect(src, setup.dst, Duration::from_secs(2)) else {
            continue;
        };
        let mut c = Conn::new(s);
        let by = Instant::now() + Duration::from_secs(2);
        let good = match &setup.logins {
            Some(l) => matches!(c.login(&l[tenant].0, &l[tenant].1, by), Reply::Ok),
            None => {
                c.stream.write_all(b"version\r\n").is_ok() && {
                    let mut line = [0u8; 64];
                    let _ = c.stream.set_read_timeout(Some(Duration::from_secs(2)));
                    c.stream
                        .read(&mut line)
                        .is_ok_and(|n| line[..n].starts_with(b"VERSION"))
                }
            }
        };
        ok += usize::from(good);
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_whole_or_waited_for() {
        assert_eq!(reply_len(b"END\r\n"), Some((5, true)));
        assert_eq!(reply_len(b"STORED\r\nEND\r\n"), Some((8, true)));
        assert_eq!(
            reply_len(b"SERVER_ERROR tenant over budget: requests/s\r\n"),
            Some((45, false))
        );
        let value = b"VALUE k 0 5\r\nhello\r\nEND\r\n";
        assert_eq!(reply_len(value), Some((value.len(), true)));
        for cut in 0..value.len() {
            assert_eq!(reply_len(&value[..cut]), None, "cut at {cut}");
        }
        assert_eq!(reply_len(b"ST"), None);
    }
}
