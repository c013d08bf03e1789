//! Backends: a small pool of persistent connections per memcached, with
//! requests from every client pipelined on them.
//!
//! guard speaks only the non-quiet meta protocol to backends, so every
//! request gets exactly one reply unit and replies are matched to requests
//! by order alone. Each connection is one task: a writer and a reader
//! future share the queue of requests awaiting replies. A reply whose
//! client has gone is still read and dropped, which keeps the stream in
//! step. A request that outlives its deadline, a parse error or an I/O
//! error discards the whole connection (its queue can no longer be trusted
//! to line up) and fails everything queued on it; the task then reconnects
//! with backoff, failing new requests at once while it is down. The
//! backoff starts over only after a connection that answered something or
//! stayed up for the longest backoff (1 s), so a backend that accepts and
//! then hangs up or talks nonsense (memcached at its connection limit) is
//! retried ever more slowly too, not every 10 ms.
//!
//! Every failure is a [`ProxyError`] naming the backend and its cause
//! (the I/O error, the reply that did not parse, the deadline); clients
//! are told only [`ProxyError::reply_text`]. The connection task logs
//! failures, never a request: the first of each kind in an outage as a
//! warning, repeats (at most one per backoff) at debug level, and one line
//! when the backend answers again.

use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use log::{Level, debug, info, log};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::{Notify, oneshot},
    task::JoinHandle,
    time::{Instant, sleep_until, timeout},
};

use super::{
    error::{Cause, ErrorKind, ProxyError, Side},
    fair::{self, FairQueue},
    health::BackendHealth,
    stats::ProxyStats,
};
use crate::protocol::{self, Limits, Response};

/// Timeouts and limits every backend connection applies.
#[derive(Clone, Debug)]
pub struct BackendSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub connections: usize,
    /// Most requests outstanding on one connection.
    pub max_in_flight: usize,
}

/// Replies to one batch of meta requests, in request order.
pub type BatchResult = Result<Vec<Response>, ProxyError>;

/// A batch in flight: resolves when all its replies are in, or on failure.
#[derive(Debug)]
pub struct Call {
    rx: oneshot::Receiver<BatchResult>,
    backend: SocketAddr,
}

impl Call {
    /// Waits for the replies. The connection enforces the deadline: it
    /// fails everything queued on it when the oldest request outlives its
    /// timeout, and a connection task that vanished dropped the sender.
    /// (No timer of its own: one per request cost a timer-wheel insertion
    /// and, most of the time, a wake-up write to the runtime's eventfd.)
    pub async fn wait(self) -> BatchResult {
        let backend = self.backend;
        self.rx.await.unwrap_or_else(|_| {
            Err(ProxyError::new(Side::Internal, ErrorKind::Abandoned).at(backend))
        })
    }

    /// The backend the batch went to.
    pub fn backend(&self) -> SocketAddr {
        self.backend
    }

    /// A call that has already failed with `kind`: no allocation beyond
    /// the channel, as a dead backend under load fails every request so.
    pub fn failed(backend: SocketAddr, kind: ErrorKind) -> Self {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err(ProxyError::backend(backend, kind)));
        Self { rx, backend }
    }
}

struct Batch {
    bytes: Bytes,
    count: usize,
    reply: oneshot::Sender<BatchResult>,
    /// Holds the batch's place in its connection's in-flight count until
    /// the batch is answered, failed or dropped, whichever path it takes.
    _slot: InFlight,
}

/// `count` requests counted against a connection's in-flight bound;
/// released on drop.
struct InFlight {
    count: usize,
    of: Arc<AtomicUsize>,
}

impl InFlight {
    /// Takes `count` places, or `None` when the connection already holds
    /// `max`. A lone batch larger than `max` is let through on an idle
    /// connection: the bound is on what queues, not on one multi-get.
    fn take(of: &Arc<AtomicUsize>, count: usize, max: usize) -> Option<Self> {
        let before = of.fetch_add(count, Ordering::AcqRel);
        if before > 0 && before + count > max {
            of.fetch_sub(count, Ordering::AcqRel);
            return None;
        }
        Some(Self {
            count,
            of: of.clone(),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.of.fetch_sub(self.count, Ordering::AcqRel);
    }
}

struct Conn {
    /// Batches waiting to be written, a queue per tenant.
    queue: Arc<FairQueue<Batch>>,
    up: Arc<AtomicBool>,
    /// Requests sent on it and not yet answered (or still queued to it).
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Conn {
    /// The pool is gone: its task answers what it holds, then ends.
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// One memcached server and its connection pool.
pub struct BackendPool {
    addr: SocketAddr,
    conns: Vec<Conn>,
    max_in_flight: usize,
    stats: Arc<ProxyStats>,
    health: Arc<BackendHealth>,
    /// Cuts a reconnect backoff short.
    wake: Arc<Notify>,
    /// Probes passed: each starts the connections' backoff and outage
    /// over.
    probe_passes: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl BackendPool {
    /// Starts the pool's connection tasks, which report every answer and
    /// failure to `health`. Once the pool is dropped they answer what is
    /// still queued on them and end; [`Self::abort`] ends them at once.
    pub fn start(
        addr: SocketAddr,
        settings: &BackendSettings,
        stats: Arc<ProxyStats>,
        health: Arc<BackendHealth>,
    ) -> Self {
        let mut conns = Vec::new();
        let mut tasks = Vec::new();
        let wake = Arc::new(Notify::new());
        let probe_passes = Arc::new(AtomicU64::new(0));
        for _ in 0..settings.connections {
            let queue = Arc::new(FairQueue::default());
            let up = Arc::new(AtomicBool::new(false));
            tasks.push(tokio::spawn(run_connection(
                addr,
                settings.clone(),
                queue.clone(),
                PoolLink {
                    up: up.clone(),
                    stats: stats.clone(),
                    health: health.clone(),
                    wake: wake.clone(),
                    probe_passes: probe_passes.clone(),
                },
            )));
            conns.push(Conn {
                queue,
                up,
                in_flight: Arc::default(),
            });
        }
        Self {
            addr,
            conns,
            max_in_flight: settings.max_in_flight,
            stats,
            health,
            wake,
            probe_passes,
            tasks,
        }
    }

    /// The backend's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What its connections have seen of it.
    pub fn health(&self) -> &Arc<BackendHealth> {
        &self.health
    }

    /// Whether any connection is up.
    pub fn is_up(&self) -> bool {
        self.conns.iter().any(|c| c.up.load(Ordering::Relaxed))
    }

    /// Whether every connection is up: sessions are spread over all of
    /// them.
    pub fn all_up(&self) -> bool {
        self.conns.iter().all(|c| c.up.load(Ordering::Relaxed))
    }

    /// Requests queued to or awaiting replies on its connections.
    pub fn in_flight(&self) -> usize {
        self.conns
            .iter()
            .map(|c| c.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// The backend passed a probe and is about to take traffic again:
    /// connections waiting to reconnect try now, and the next failure is
    /// news again, counted from the shortest backoff (a backend killed
    /// right after its return is then ejected as fast as the first time).
    pub fn passed_probe(&self) {
        self.probe_passes.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_waiters();
    }

    /// Ends the connection tasks now, failing what they hold.
    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Like [`Self::call`], on the first connection that is up: for
    /// guard's own requests, which need no order with a session's.
    pub fn call_any(&self, bytes: Bytes, count: usize) -> Call {
        match self.conns.iter().position(|c| c.up.load(Ordering::Relaxed)) {
            Some(i) => self.call(bytes, count, i, fair::INTERNAL),
            None => Call::failed(self.addr, ErrorKind::Unavailable),
        }
    }

    /// Sends `count` encoded meta requests as one batch on the connection
    /// `affinity` picks. Fails at once when that connection is down rather
    /// than borrowing another: a session's requests must reach memcached
    /// over one connection to execute in the order it sent them, and a
    /// session switching connections as they go down and come back could
    /// have a later request overtake an earlier one. Waiting for a
    /// reconnect instead is the slowness that turns into reconnect storms.
    ///
    /// A connection holding `max_in_flight` requests refuses more at once
    /// (`Overloaded`): a backend that stopped keeping up costs its own
    /// keys an error, not a queue that grows until the request timeout.
    /// The bound counts every tenant's requests together; `tenant` is the
    /// queue the batch waits in to be written (see [`super::fair`]).
    pub fn call(&self, bytes: Bytes, count: usize, affinity: usize, tenant: u32) -> Call {
        let conn = &self.conns[affinity % self.conns.len()];
        if conn.up.load(Ordering::Relaxed) {
            let Some(slot) = InFlight::take(&conn.in_flight, count, self.max_in_flight) else {
                ProxyStats::add(&self.stats.backend_overloaded, 1);
                return Call::failed(self.addr, ErrorKind::Overloaded);
            };
            let (tx, rx) = oneshot::channel();
            let cost = bytes.len() + fair::REQUEST_WEIGHT * count;
            let batch = Batch {
                bytes,
                count,
                reply: tx,
                _slot: slot,
            };
            if conn.queue.push(tenant, batch, cost).is_ok() {
                return Call {
                    rx,
                    backend: self.addr,
                };
            }
        }
        Call::failed(self.addr, ErrorKind::Unavailable)
    }
}

/// The first wait before reconnecting.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
/// The longest wait before reconnecting; the wait doubles up to it.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

fn backend_limits() -> Limits {
    Limits {
        // Other clients of the same memcached may have stored anything it
        // accepts; refusing a reply would only break the connection.
        max_value_len: 1 << 30,
        max_line_len: 8 * 1024,
        ..Limits::default()
    }
}

/// What a connection task shares with its pool.
struct PoolLink {
    /// Whether the connection is up.
    up: Arc<AtomicBool>,
    stats: Arc<ProxyStats>,
    health: Arc<BackendHealth>,
    wake: Arc<Notify>,
    probe_passes: Arc<AtomicU64>,
}

async fn run_connection(
    addr: SocketAddr,
    settings: BackendSettings,
    queue: Arc<FairQueue<Batch>>,
    link: PoolLink,
) {
    let PoolLink {
        up,
        stats,
        health,
        wake,
        probe_passes,
    } = link;
    let mut probes_seen = probe_passes.load(Ordering::Relaxed);
    let mut backoff = MIN_BACKOFF;
    let mut outage = Outage::default();
    loop {
        let connect = timeout(settings.connect_timeout, TcpStream::connect(addr));
        let stream = tokio::select! {
            r = connect => r,
            () = closed(&queue) => return,
        };
        let failure = match stream {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                // Closing resets: requests not yet sent when a connection
                // is discarded (a timeout) are dropped by the kernel, not
                // delivered late (after a flush that re-admits it, say).
                let _ = stream.set_zero_linger();
                ProxyStats::add(&stats.backend_connects, 1);
                if outage.failures == 0 {
                    info!("backend {addr}: connected");
                } else {
                    debug!("backend {addr}: connected");
                }
                queue.set_open(true);
                up.store(true, Ordering::Relaxed);
                let since = Instant::now();
                let answered = || {
                    // A connection that answers is healthy: the next
                    // reconnect may start from the shortest backoff.
                    backoff = MIN_BACKOFF;
                    if let Some((failures, over)) = outage.over(Instant::now()) {
                        info!(
                            "backend {addr}: answering again after {failures} failed \
                             attempt(s) over {over:?}"
                        );
                    }
                };
                let end = serve(
                    addr,
                    stream,
                    &queue,
                    Served {
                        request_timeout: settings.request_timeout,
                        health: &health,
                    },
                    answered,
                )
                .await;
                up.store(false, Ordering::Relaxed);
                // What was queued and not written: the connection it
                // waited for is gone.
                let lost = end.clone().unwrap_or_else(|| {
                    ProxyError::new(Side::Internal, ErrorKind::Abandoned).at(addr)
                });
                for b in queue.set_open(false) {
                    let _ = b.reply.send(Err(lost.clone()));
                }
                // So is one that lasted as long as the longest backoff
                // (idle, it had nothing to answer): reconnecting it at
                // once cannot be faster than backing off would have been.
                if since.elapsed() >= MAX_BACKOFF {
                    backoff = MIN_BACKOFF;
                }
                let Some(e) = end else { return };
                if e.kind() == ErrorKind::Timeout {
                    ProxyStats::add(&stats.backend_timeouts, 1);
                }
                e
            }
            Ok(Err(e)) => connect_error(addr, e),
            Err(_) => ProxyError::backend(addr, ErrorKind::ConnectTimeout)
                .because(Cause::Elapsed(settings.connect_timeout)),
        };
        let probes = probe_passes.load(Ordering::Relaxed);
        if probes != probes_seen {
            probes_seen = probes;
            backoff = MIN_BACKOFF;
            outage = Outage::default();
        }
        health.failed(failure.kind());
        log!(
            outage.failure(failure.kind(), Instant::now()),
            "{}; retrying in {backoff:?}",
            failure.report()
        );
        let until = Instant::now() + backoff;
        tokio::select! {
            () = sleep_until(until) => {}
            () = wake.notified() => {}
            () = closed(&queue) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's failed attempts since it last got a reply: what keeps
/// a backend that stays down, or keeps failing the same way, from logging
/// a warning per attempt.
#[derive(Debug, Default)]
struct Outage {
    /// Connects that failed, and connections that ended before answering.
    failures: u32,
    /// When the first of them happened.
    since: Option<Instant>,
    /// The kind last logged as a warning in this outage.
    warned: Option<ErrorKind>,
}

impl Outage {
    /// Counts a failed attempt and says how to log it: a warning when its
    /// kind is news in this outage, debug when it repeats the last one.
    fn failure(&mut self, kind: ErrorKind, now: Instant) -> Level {
        self.failures = self.failures.saturating_add(1);
        self.since.get_or_insert(now);
        if self.warned.replace(kind) == Some(kind) {
            Level::Debug
        } else {
            Level::Warn
        }
    }

    /// The backend answered: ends the outage, returning how many attempts
    /// failed and since how long, if any did.
    fn over(&mut self, now: Instant) -> Option<(u32, Duration)> {
        self.warned = None;
        let since = self.since.take()?;
        Some((std::mem::take(&mut self.failures), now - since))
    }
}

/// A failed connect: refused (nothing listens there) told apart from the
/// rest (unreachable, reset, out of ports…).
fn connect_error(addr: SocketAddr, e: io::Error) -> ProxyError {
    let kind = if e.kind() == io::ErrorKind::ConnectionRefused {
        ErrorKind::ConnectRefused
    } else {
        ErrorKind::ConnectFailed
    };
    ProxyError::backend(addr, kind).because(e)
}

/// Returns once the pool is gone. While the connection is down its queue
/// takes nothing (sessions are refused at once), so nothing waits in it.
async fn closed<T>(queue: &FairQueue<T>) {
    while !queue.is_closed() {
        queue.changed().await;
    }
}

/// Most requests written on a connection and not yet answered. Beyond
/// it batches wait in the connection's tenant-fair queue, where a
/// tenant's request can be put before another's burst, and not in
/// memcached's socket, where it cannot.
pub const WINDOW: usize = 64;

/// Most request bytes written and not yet answered, for the same reason:
/// a few large values must not hold the wire for everyone.
pub const WINDOW_BYTES: usize = 256 * 1024;

/// What `serve` applies to a connection.
struct Served<'a> {
    request_timeout: Duration,
    /// Where each answered batch's latency goes.
    health: &'a BackendHealth,
}

struct Pending {
    count: usize,
    /// Its request bytes, for the window.
    size: usize,
    got: Vec<Response>,
    reply: oneshot::Sender<BatchResult>,
    /// When it was written: its latency is counted from here.
    written: Instant,
    deadline: Instant,
    _slot: InFlight,
}

/// Runs one connection until it fails (`Some`), or until the pool is
/// dropped and every request written has its reply (`None`), reporting
/// each answered batch's latency to `health` and calling `answered` at
/// the first reply. Everything still queued is failed before returning.
async fn serve(
    addr: SocketAddr,
    stream: TcpStream,
    queue: &FairQueue<Batch>,
    Served {
        request_timeout,
        health,
    }: Served<'_>,
    answered: impl FnOnce() + Send,
) -> Option<ProxyError> {
    let (mut rd, mut wr) = stream.into_split();
    let pending: Mutex<Written> = Mutex::new(Written::default());
    let queued = Notify::new();
    // Replies made room in the window.
    let room = Notify::new();
    // Set once the pool is gone and its queue is empty: the reader then
    // ends when nothing is left to answer, so a backend removed by a
    // reload finishes what it was sent instead of failing it.
    let closing = AtomicBool::new(false);
    let limits = backend_limits();

    let writer = async {
        let mut out = BytesMut::new();
        loop {
            // Something to write, and room to write it.
            loop {
                if !pending.lock().expect("pending lock").full() {
                    if !queue.is_empty() {
                        break;
                    }
                    if queue.is_closed() {
                        closing.store(true, Ordering::Release);
                        queued.notify_one();
                        return std::future::pending().await;
                    }
                    queue.changed().await;
                } else {
                    room.notified().await;
                }
            }
            let written = Instant::now();
            let deadline = written + request_timeout;
            {
                let mut p = pending.lock().expect("pending lock");
                while out.len() < 64 * 1024 && !p.full() {
                    let Some(b) = queue.pop() else { break };
                    out.extend_from_slice(&b.bytes);
                    p.push(Pending {
                        count: b.count,
                        size: b.bytes.len(),
                        got: Vec::with_capacity(b.count),
                        reply: b.reply,
                        written,
                        deadline,
                        _slot: b._slot,
                    });
                }
            }
            queued.notify_one();
            if let Err(e) = wr.write_all(&out).await {
                return Some(ProxyError::backend(addr, ErrorKind::ConnectionLost).because(e));
            }
            out.clear();
        }
    };

    let reader = async {
        let mut answered = Some(answered);
        let mut buf = BytesMut::with_capacity(16 * 1024);
        // Armed at most once per oldest-request deadline rather than
        // re-created on every read: deadlines are queued in increasing
        // order, so an armed timer never fires later than the oldest
        // request's deadline, and when it fires early (that request was
        // answered) it is re-armed for the new oldest.
        let timer = sleep_until(Instant::now());
        tokio::pin!(timer);
        let mut armed = false;
        loop {
            loop {
                match protocol::parse_response(&mut buf, &limits) {
                    Ok(Some(r)) => {
                        let mut p = pending.lock().expect("pending lock");
                        let Some(front) = p.queue.front_mut() else {
                            return Some(
                                ProxyError::backend(addr, ErrorKind::UnexpectedReply)
                                    .because(Cause::unrequested(&r)),
                            );
                        };
                        front.got.push(r);
                        if let Some(f) = answered.take() {
                            f();
                        }
                        if front.got.len() == front.count {
                            let was_full = p.full();
                            let done = p.pop().expect("front exists");
                            drop(p);
                            if was_full {
                                room.notify_one();
                            }
                            health.answered(done.written.elapsed());
                            // The client may have left; the reply is dropped.
                            let _ = done.reply.send(Ok(done.got));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        return Some(ProxyError::backend(addr, ErrorKind::ReplyParse).because(e));
                    }
                }
            }
            let deadline = pending
                .lock()
                .expect("pending lock")
                .queue
                .front()
                .map(|p| p.deadline);
            if deadline.is_none() && closing.load(Ordering::Acquire) {
                return None;
            }
            if let Some(d) = deadline.filter(|_| !armed) {
                timer.as_mut().reset(d);
                armed = true;
            }
            tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) => return Some(ProxyError::backend(addr, ErrorKind::ConnectionClosed)),
                    Err(e) => {
                        return Some(ProxyError::backend(addr, ErrorKind::ConnectionLost).because(e));
                    }
                    Ok(_) => {}
                },
                () = &mut timer, if armed => {
                    armed = false;
                    if deadline.is_some_and(|d| d <= Instant::now()) {
                        return Some(ProxyError::backend(addr, ErrorKind::Timeout)
                            .because(Cause::Elapsed(request_timeout)));
                    }
                }
                () = queued.notified() => {}
            }
        }
    };

    let end = tokio::select! {
        e = writer => e,
        e = reader => e,
    };
    // No error means the pool is gone: whoever still waits hears why.
    let failure = end
        .clone()
        .unwrap_or_else(|| ProxyError::new(Side::Internal, ErrorKind::Abandoned).at(addr));
    for p in pending.lock().expect("pending lock").queue.drain(..) {
        let _ = p.reply.send(Err(failure.clone()));
    }
    end
}

/// Batches written and awaiting replies, oldest first, and how much of
/// the window they take.
#[derive(Default)]
struct Written {
    queue: VecDeque<Pending>,
    requests: usize,
    bytes: usize,
}

impl Written {
    fn push(&mut self, p: Pending) {
        self.requests += p.count;
        self.bytes += p.size;
        self.queue.push_back(p);
    }

    fn pop(&mut self) -> Option<Pending> {
        let p = self.queue.pop_front()?;
        self.requests -= p.count;
        self.bytes -= p.size;
        Some(p)
    }

    /// No room for another batch (a lone batch larger than the window
    /// still goes out when nothing else is written).
    fn full(&self) -> bool {
        self.requests >= WINDOW || self.bytes >= WINDOW_BYTES
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use tokio::{io::AsyncReadExt as _, net::TcpListener};

    use super::*;

    fn settings(request_timeout: Duration) -> BackendSettings {
        BackendSettings {
            connect_timeout: Duration::from_millis(500),
            request_timeout,
            connections: 1,
            max_in_flight: 1024,
        }
    }

    /// A pool on one connection to `addr`, once that connection is up.
    async fn pool_up(addr: SocketAddr, request_timeout: Duration) -> BackendPool {
        let pool = start(addr, &settings(request_timeout), Arc::default());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pool.is_up() {
            assert!(Instant::now() < deadline, "never connected");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        pool
    }

    fn start(addr: SocketAddr, s: &BackendSettings, stats: Arc<ProxyStats>) -> BackendPool {
        BackendPool::start(addr, s, stats, Arc::default())
    }

    /// Accepts one connection, reads one request line, then answers it
    /// with `reply` (`None`: closes instead; empty: never answers).
    async fn fake_backend(reply: Option<&'static [u8]>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            while !got.ends_with(b"\n") {
                if s.read_buf(&mut got).await.unwrap_or(0) == 0 {
                    return;
                }
            }
            match reply {
                Some(r) => {
                    s.write_all(r).await.unwrap();
                    // Hold the connection open.
                    std::future::pending::<()>().await;
                }
                None => drop(s),
            }
        });
        addr
    }

    /// A connection that holds its bound refuses more at once, unsent;
    /// every way a batch ends gives its places back.
    #[tokio::test]
    async fn a_full_connection_refuses_at_once_and_frees_its_places() {
        let addr = fake_backend(Some(b"")).await;
        let mut s = settings(Duration::from_millis(300));
        s.max_in_flight = 3;
        let stats = Arc::new(ProxyStats::default());
        let pool = start(addr, &s, stats.clone());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pool.is_up() {
            assert!(Instant::now() < deadline, "never connected");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let get = || Bytes::from_static(b"mg k v\r\n");
        let held: Vec<Call> = (0..3).map(|_| pool.call(get(), 1, 0, 0)).collect();
        let started = Instant::now();
        let e = pool.call(get(), 1, 0, 0).wait().await.unwrap_err();
        assert_eq!((e.side(), e.kind()), (Side::Backend, ErrorKind::Overloaded));
        assert!(e.retryable());
        assert_eq!(e.reply_text(), "backend overloaded");
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "refused before the held requests' timeout"
        );
        assert_eq!(stats.backend_overloaded.load(Ordering::Relaxed), 1);
        assert_eq!(pool.conns[0].in_flight.load(Ordering::Relaxed), 3);
        // The held ones time out; their places come back with them.
        for c in held {
            assert_eq!(c.wait().await.unwrap_err().kind(), ErrorKind::Timeout);
        }
        assert_eq!(pool.conns[0].in_flight.load(Ordering::Relaxed), 0);
        // A failed call holds nothing, and a lone multi-get larger than
        // the bound still goes out on an idle connection.
        let big = InFlight::take(&pool.conns[0].in_flight, 5, 3).expect("idle: let through");
        assert!(InFlight::take(&pool.conns[0].in_flight, 1, 3).is_none());
        drop(big);
        assert_eq!(pool.conns[0].in_flight.load(Ordering::Relaxed), 0);
    }

    /// A pool dropped (its backend removed by a reload) answers what it
    /// was sent before its connections end, rather than failing it.
    #[tokio::test]
    async fn a_dropped_pool_answers_what_it_was_sent() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            while got.iter().filter(|&&b| b == b'\n').count() < 5 {
                if s.read_buf(&mut got).await.unwrap_or(0) == 0 {
                    return;
                }
            }
            // Slow, but within the request timeout.
            tokio::time::sleep(Duration::from_millis(200)).await;
            s.write_all(&b"EN\r\n".repeat(5)).await.unwrap();
            std::future::pending::<()>().await;
        });
        let pool = pool_up(addr, Duration::from_secs(5)).await;
        let calls: Vec<Call> = (0..5)
            .map(|_| pool.call(Bytes::from_static(b"mg k v\r\n"), 1, 0, 0))
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(pool);
        for c in calls {
            let r = c.wait().await.expect("answered after the pool was dropped");
            assert_eq!(r.len(), 1);
        }
    }

    /// A tenant's request queued behind another tenant's burst on the
    /// same connection is answered within a turn of it, not after it.
    #[tokio::test]
    async fn a_request_is_not_answered_after_another_tenants_burst() {
        let mc = guard_test_support::Memcached::start();
        let pool = pool_up(mc.addr(), Duration::from_secs(5)).await;
        let get = || Bytes::from_static(b"mg k v\r\n");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // The burst, all queued before the other tenant's request.
        let calls: Vec<Call> = (0..500).map(|_| pool.call(get(), 1, 0, 1)).collect();
        let lone = pool.call(get(), 1, 0, 2);
        for (tenant, call) in calls.into_iter().map(|c| (1, c)).chain([(2, lone)]) {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                call.wait().await.unwrap();
                order.lock().unwrap().push(tenant);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap();
        let before = order.iter().position(|&t| t == 2).unwrap();
        // At most what was written before it (the window) and one turn.
        assert!(
            before <= WINDOW + fair::QUANTUM / fair::REQUEST_WEIGHT,
            "answered after {before} of the burst"
        );
    }

    async fn one_call(pool: &BackendPool) -> BatchResult {
        pool.call(Bytes::from_static(b"mg k v\r\n"), 1, 0, 0)
            .wait()
            .await
    }

    #[tokio::test]
    async fn an_unparsable_reply_names_the_backend_and_the_parse_error() {
        let addr = fake_backend(Some(b"VA x\r\n")).await;
        let pool = pool_up(addr, Duration::from_secs(5)).await;
        let e = one_call(&pool).await.unwrap_err();
        assert_eq!((e.side(), e.kind()), (Side::Backend, ErrorKind::ReplyParse));
        assert_eq!(e.backend_addr(), Some(addr));
        assert!(
            matches!(e.cause(), Some(Cause::Protocol(p)) if p.kind == protocol::ErrorKind::BadResponse)
        );
        assert!(
            e.report()
                .to_string()
                .starts_with(&format!("backend {addr}: reply parse error: "))
        );
        assert_eq!(e.reply_text(), "backend connection lost");
    }

    #[tokio::test]
    async fn a_backend_that_closes_is_a_closed_connection() {
        let addr = fake_backend(None).await;
        let pool = pool_up(addr, Duration::from_secs(5)).await;
        let e = one_call(&pool).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionClosed);
        assert_eq!(e.to_string(), format!("backend {addr}: connection closed"));
        assert!(e.source().is_none());
    }

    #[tokio::test]
    async fn a_late_reply_is_a_timeout_with_its_deadline() {
        let addr = fake_backend(Some(b"")).await;
        let pool = pool_up(addr, Duration::from_millis(50)).await;
        let e = one_call(&pool).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert_eq!(
            e.report().to_string(),
            format!("backend {addr}: timeout: nothing within 50ms")
        );
        assert_eq!(e.reply_text(), "backend timeout");
        assert!(!e.retryable());
    }

    #[tokio::test]
    async fn a_down_connection_fails_at_once_as_unavailable_and_retryable() {
        // Nothing listens on a port just released.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let pool = start(addr, &settings(Duration::from_secs(1)), Arc::default());
        let e = one_call(&pool).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(e.backend_addr(), Some(addr));
        assert!(e.retryable());
        assert!(e.cause().is_none());
        let e = pool
            .call_any(Bytes::from_static(b"mn\r\n"), 1)
            .wait()
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
    }

    #[tokio::test]
    async fn a_backend_that_hangs_up_at_once_is_retried_ever_more_slowly() {
        // memcached at its connection limit accepts, says so and hangs up.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let _ = s.write_all(b"ERROR Too many open connections\r\n").await;
            }
        });
        let _pool = start(addr, &settings(Duration::from_secs(1)), Arc::default());
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Backing off from 10 ms: attempts at 0, 10, 30, 70, 150 and 310
        // ms. Starting over at every connect made that one every ~10 ms.
        let n = accepted.load(Ordering::Relaxed);
        assert!((2..=8).contains(&n), "{n} connections in 400 ms");
    }

    #[test]
    fn an_outage_warns_once_per_kind_and_ends_at_the_first_reply() {
        let t0 = Instant::now();
        let mut o = Outage::default();
        // A healthy start: nothing to report.
        assert_eq!(o.over(t0), None);
        assert_eq!(o.failure(ErrorKind::ConnectRefused, t0), Level::Warn);
        for _ in 0..10 {
            assert_eq!(o.failure(ErrorKind::ConnectRefused, t0), Level::Debug);
        }
        // A different failure is news, and so is the old one after it.
        assert_eq!(o.failure(ErrorKind::ConnectTimeout, t0), Level::Warn);
        assert_eq!(o.failure(ErrorKind::ConnectRefused, t0), Level::Warn);
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(o.over(t1), Some((13, Duration::from_secs(3))));
        assert_eq!(o.over(t1), None);
        // After a reply, the same failure warns again.
        assert_eq!(o.failure(ErrorKind::ConnectRefused, t1), Level::Warn);
    }

    #[tokio::test]
    async fn a_refused_connect_is_told_apart_from_other_failures() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            connect_error(addr, refused).kind(),
            ErrorKind::ConnectRefused
        );
        let other = io::Error::from(io::ErrorKind::HostUnreachable);
        let e = connect_error(addr, other);
        assert_eq!(e.kind(), ErrorKind::ConnectFailed);
        assert!(
            matches!(e.cause(), Some(Cause::Io(io)) if io.kind() == io::ErrorKind::HostUnreachable)
        );
    }
}
