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
//! with backoff, failing new requests at once while it is down.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use log::{info, warn};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::{Notify, mpsc, oneshot},
    task::JoinHandle,
    time::{Instant, sleep_until, timeout},
};

use super::stats::ProxyStats;
use crate::protocol::{self, Limits, Response};

/// Why a backend request failed.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// No connection to the backend is up.
    #[error("backend unavailable")]
    Unavailable,
    /// The reply did not arrive within the request timeout.
    #[error("backend timeout")]
    Timeout,
    /// The connection broke or the backend sent something unparsable.
    #[error("backend connection lost")]
    Lost,
}

/// Timeouts and limits every backend connection applies.
#[derive(Clone, Debug)]
pub struct BackendSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub connections: usize,
}

/// Replies to one batch of meta requests, in request order.
pub type BatchResult = Result<Vec<Response>, BackendError>;

/// A batch in flight: resolves when all its replies are in, or on failure.
#[derive(Debug)]
pub struct Call {
    rx: oneshot::Receiver<BatchResult>,
}

impl Call {
    /// Waits for the replies. The connection enforces the deadline: it
    /// fails everything queued on it when the oldest request outlives its
    /// timeout, and a connection task that vanished dropped the sender.
    /// (No timer of its own: one per request cost a timer-wheel insertion
    /// and, most of the time, a wake-up write to the runtime's eventfd.)
    pub async fn wait(self) -> BatchResult {
        self.rx.await.unwrap_or(Err(BackendError::Lost))
    }

    fn failed(e: BackendError) -> Self {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err(e));
        Self { rx }
    }
}

struct Batch {
    bytes: Bytes,
    count: usize,
    reply: oneshot::Sender<BatchResult>,
}

struct Conn {
    tx: mpsc::UnboundedSender<Batch>,
    up: Arc<AtomicBool>,
}

/// One memcached server and its connection pool.
pub struct BackendPool {
    addr: SocketAddr,
    conns: Vec<Conn>,
    next: AtomicUsize,
}

impl BackendPool {
    /// Starts the pool's connection tasks; they live until the pool is
    /// dropped (or their handles are aborted).
    pub fn start(
        addr: SocketAddr,
        settings: &BackendSettings,
        stats: Arc<ProxyStats>,
    ) -> (Self, Vec<JoinHandle<()>>) {
        let mut conns = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..settings.connections {
            let (tx, rx) = mpsc::unbounded_channel();
            let up = Arc::new(AtomicBool::new(false));
            tasks.push(tokio::spawn(run_connection(
                addr,
                settings.clone(),
                rx,
                up.clone(),
                stats.clone(),
            )));
            conns.push(Conn { tx, up });
        }
        let pool = Self {
            addr,
            conns,
            next: AtomicUsize::new(0),
        };
        (pool, tasks)
    }

    /// The backend's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether any connection is up.
    pub fn is_up(&self) -> bool {
        self.conns.iter().any(|c| c.up.load(Ordering::Relaxed))
    }

    /// Like [`Self::call`], on the first connection that is up: for
    /// guard's own requests, which need no order with a session's.
    pub fn call_any(&self, bytes: Bytes, count: usize) -> Call {
        match self.conns.iter().position(|c| c.up.load(Ordering::Relaxed)) {
            Some(i) => self.call(bytes, count, i),
            None => Call::failed(BackendError::Unavailable),
        }
    }

    /// A connection choice for one client session. A session sends all
    /// its requests to a backend over the same connection, so memcached
    /// executes them in the order the client sent them.
    pub fn affinity(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends `count` encoded meta requests as one batch on the connection
    /// `affinity` picks. Fails at once when that connection is down rather
    /// than borrowing another: a session's requests must reach memcached
    /// over one connection to execute in the order it sent them, and a
    /// session switching connections as they go down and come back could
    /// have a later request overtake an earlier one. Waiting for a
    /// reconnect instead is the slowness that turns into reconnect storms.
    pub fn call(&self, bytes: Bytes, count: usize, affinity: usize) -> Call {
        let conn = &self.conns[affinity % self.conns.len()];
        if conn.up.load(Ordering::Relaxed) {
            let (tx, rx) = oneshot::channel();
            let batch = Batch {
                bytes,
                count,
                reply: tx,
            };
            if conn.tx.send(batch).is_ok() {
                return Call { rx };
            }
        }
        Call::failed(BackendError::Unavailable)
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(10);
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

async fn run_connection(
    addr: SocketAddr,
    settings: BackendSettings,
    mut rx: mpsc::UnboundedReceiver<Batch>,
    up: Arc<AtomicBool>,
    stats: Arc<ProxyStats>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let connect = timeout(settings.connect_timeout, TcpStream::connect(addr));
        let stream = tokio::select! {
            r = connect => r,
            // Nothing is routed here while down; a batch that raced the
            // failure is answered at once.
            () = fail_incoming(&mut rx) => return,
        };
        match stream {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                ProxyStats::add(&stats.backend_connects, 1);
                info!("backend {addr}: connected");
                up.store(true, Ordering::Relaxed);
                backoff = MIN_BACKOFF;
                let end = serve(stream, &mut rx, settings.request_timeout).await;
                up.store(false, Ordering::Relaxed);
                match end {
                    None => return,
                    Some(e) => {
                        if e == BackendError::Timeout {
                            ProxyStats::add(&stats.backend_timeouts, 1);
                        }
                        warn!("backend {addr}: {e}; reconnecting");
                    }
                }
            }
            Ok(Err(e)) => warn!("backend {addr}: cannot connect: {e}"),
            Err(_) => warn!(
                "backend {addr}: connect timed out after {:?}",
                settings.connect_timeout
            ),
        }
        let until = Instant::now() + backoff;
        tokio::select! {
            () = sleep_until(until) => {}
            () = fail_incoming(&mut rx) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Answers every batch that arrives with `Unavailable`; returns when the
/// pool is gone.
async fn fail_incoming(rx: &mut mpsc::UnboundedReceiver<Batch>) {
    while let Some(b) = rx.recv().await {
        let _ = b.reply.send(Err(BackendError::Unavailable));
    }
}

struct Pending {
    count: usize,
    got: Vec<Response>,
    reply: oneshot::Sender<BatchResult>,
    deadline: Instant,
}

/// Runs one connection until it fails (`Some`) or the pool is dropped
/// (`None`). Everything still queued is failed before returning.
async fn serve(
    stream: TcpStream,
    rx: &mut mpsc::UnboundedReceiver<Batch>,
    request_timeout: Duration,
) -> Option<BackendError> {
    let (mut rd, mut wr) = stream.into_split();
    let pending: Mutex<VecDeque<Pending>> = Mutex::new(VecDeque::new());
    let queued = Notify::new();
    let limits = backend_limits();

    let writer = async {
        let mut out = BytesMut::new();
        loop {
            let first = rx.recv().await?;
            let deadline = Instant::now() + request_timeout;
            {
                let mut p = pending.lock().expect("pending lock");
                let mut next = Some(first);
                while let Some(b) = next.take() {
                    out.extend_from_slice(&b.bytes);
                    p.push_back(Pending {
                        count: b.count,
                        got: Vec::with_capacity(b.count),
                        reply: b.reply,
                        deadline,
                    });
                    if out.len() < 64 * 1024 {
                        next = rx.try_recv().ok();
                    }
                }
            }
            queued.notify_one();
            if wr.write_all(&out).await.is_err() {
                return Some(BackendError::Lost);
            }
            out.clear();
        }
    };

    let reader = async {
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
                        let Some(front) = p.front_mut() else {
                            return BackendError::Lost;
                        };
                        front.got.push(r);
                        if front.got.len() == front.count {
                            let done = p.pop_front().expect("front exists");
                            drop(p);
                            // The client may have left; the reply is dropped.
                            let _ = done.reply.send(Ok(done.got));
                        }
                    }
                    Ok(None) => break,
                    Err(_) => return BackendError::Lost,
                }
            }
            let deadline = pending
                .lock()
                .expect("pending lock")
                .front()
                .map(|p| p.deadline);
            if let Some(d) = deadline.filter(|_| !armed) {
                timer.as_mut().reset(d);
                armed = true;
            }
            tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return BackendError::Lost,
                    Ok(_) => {}
                },
                () = &mut timer, if armed => {
                    armed = false;
                    if deadline.is_some_and(|d| d <= Instant::now()) {
                        return BackendError::Timeout;
                    }
                }
                () = queued.notified() => {}
            }
        }
    };

    let end = tokio::select! {
        e = writer => e,
        e = reader => Some(e),
    };
    let failure = end.unwrap_or(BackendError::Lost);
    for p in pending.lock().expect("pending lock").drain(..) {
        let _ = p.reply.send(Err(failure));
    }
    end
}
