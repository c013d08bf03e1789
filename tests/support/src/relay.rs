//! A TCP relay that holds back replies, so a real memcached behind it
//! looks like a node on a slow network. There is no netem here (and it
//! would need root); a relay delays one process's traffic and nobody
//! else's.
//!
//! Each connection runs on three threads: requests are copied to the
//! server as they come; replies are read as they come and stamped with
//! when they may leave (arrival plus the delay in force then), and a
//! writer sends each at its time, in order. Stamping on arrival rather
//! than sleeping before each write is what keeps delays from adding up
//! over a pipeline: a round trip gains the delay once, however many
//! replies are in flight.
//!
//! Nothing blocks for ever: a blocked read or write is woken by shutting
//! its socket down, a waiting writer by a condition variable, and the
//! acceptor looks for the stop flag every few milliseconds; so closing
//! connections and dropping the relay take moments.

use std::{
    fmt,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::free_port;

/// How long the acceptor sleeps when nobody is connecting: the most it
/// takes to notice the relay is being dropped.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// How long a relayed connection may take to reach the target; within a
/// test the target is local, so this only bounds a drop behind one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A relay on 127.0.0.1 to `target` that delays every reply (server to
/// client) by a delay that can be changed while it runs; requests pass at
/// once. Dropping it closes every connection and ends its threads.
pub struct DelayRelay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    target: SocketAddr,
    delay_ns: AtomicU64,
    accepted: AtomicUsize,
    stopping: AtomicBool,
    connections: Mutex<Vec<Arc<Connection>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A lock that a panicking holder left behind still guards sound data:
/// every update here is a single push or drain.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DelayRelay {
    /// Starts relaying to `target` from 127.0.0.1 on a [`free_port`],
    /// with no delay.
    pub fn start(target: SocketAddr) -> Self {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("relay: binding {addr}: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("relay: {e}"));
        let shared = Arc::new(Shared {
            target,
            delay_ns: AtomicU64::new(0),
            accepted: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("relay {addr}"))
                .spawn(move || accept_loop(&listener, &shared))
                .unwrap_or_else(|e| panic!("relay: spawning its acceptor: {e}"))
        };
        Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The delay for replies that arrive from now on; replies already
    /// held keep the delay they arrived under.
    pub fn set_delay(&self, delay: Duration) {
        let ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_ns.store(ns, Ordering::Relaxed);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Closes every relayed connection now, on both sides (replies still
    /// held are dropped); the relay goes on accepting.
    pub fn reset_connections(&self) {
        let open = std::mem::take(&mut *lock(&self.shared.connections));
        for c in open {
            c.close();
        }
    }
}

impl fmt::Debug for DelayRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DelayRelay")
            .field("addr", &self.addr)
            .field("target", &self.shared.target)
            .field(
                "delay",
                &Duration::from_nanos(self.shared.delay_ns.load(Ordering::Relaxed)),
            )
            .finish()
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        // The acceptor first, so no connection is registered after the
        // ones closed below.
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        self.reset_connections();
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stopping.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                relay(client, shared);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // WouldBlock, or a failure such as EMFILE that waiting may cure.
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
}

/// Connects `client` to the target and starts its threads; a target that
/// cannot be reached closes the client, as a dead node would.
fn relay(client: TcpStream, shared: &Arc<Shared>) {
    let Ok(server) = TcpStream::connect_timeout(&shared.target, CONNECT_TIMEOUT) else {
        return;
    };
    let conn = match Connection::new(client, server) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("relay: setting up a connection: {e}");
            return;
        }
    };
    {
        let mut open = lock(&shared.connections);
        open.retain(|c| !c.is_closed());
        open.push(conn.clone());
    }
    let (tx, rx) = mpsc::channel();
    let mut threads = lock(&shared.threads);
    threads.retain(|t| !t.is_finished());
    let c = conn.clone();
    threads.push(spawn("relay requests", move || c.requests()));
    let (c, delay) = (conn.clone(), shared.clone());
    threads.push(spawn("relay replies in", move || {
        c.read_replies(&delay.delay_ns, &tx);
    }));
    threads.push(spawn("relay replies out", move || conn.write_replies(&rx)));
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .unwrap_or_else(|e| panic!("relay: spawning a thread: {e}"))
}

/// A reply chunk and when it may be written; `None` marks the server's
/// end of stream.
type Held = Option<(Instant, Vec<u8>)>;

/// One relayed connection. Its threads read and write through shared
/// references to the sockets; closing shuts both down, which wakes any of
/// them blocked on one.
struct Connection {
    client: TcpStream,
    server: TcpStream,
    closed: Mutex<bool>,
    wake: Condvar,
    /// Directions (requests, replies) that have ended; both ended closes
    /// the connection.
    ended: AtomicUsize,
}

impl Connection {
    fn new(client: TcpStream, server: TcpStream) -> io::Result<Self> {
        client.set_nonblocking(false)?;
        // Small writes go out at once, so the delay is the only delay.
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        Ok(Self {
            client,
            server,
            closed: Mutex::new(false),
            wake: Condvar::new(),
            ended: AtomicUsize::new(0),
        })
    }

    fn close(&self) {
        *lock(&self.closed) = true;
        self.wake.notify_all();
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }

    fn is_closed(&self) -> bool {
        *lock(&self.closed)
    }

    /// Waits until `at`; false if the connection closed first.
    fn wait_until(&self, at: Instant) -> bool {
        let mut closed = lock(&self.closed);
        loop {
            if *closed {
                return false;
            }
            let now = Instant::now();
            if now >= at {
                return true;
            }
            closed = self
                .wake
                .wait_timeout(closed, at - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn direction_ended(&self) {
        if self.ended.fetch_add(1, Ordering::Relaxed) + 1 == 2 {
            self.close();
        }
    }

    /// Client to server, at once; the client's end of stream is passed on
    /// as a half close, so replies to what it sent still come back.
    fn requests(&self) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match (&self.client).read(&mut buf) {
                Ok(0) => {
                    let _ = self.server.shutdown(Shutdown::Write);
                    break;
                }
                Ok(n) => {
                    if (&self.server).write_all(&buf[..n]).is_err() {
                        self.close();
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close();
                    break;
                }
            }
        }
        self.direction_ended();
    }

    /// Server to the writer: each chunk stamped with its release time.
    fn read_replies(&self, delay_ns: &AtomicU64, out: &mpsc::Sender<Held>) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match (&self.server).read(&mut buf) {
                Ok(0) => {
                    let _ = out.send(None);
                    break;
                }
                Ok(n) => {
                    let delay = Duration::from_nanos(delay_ns.load(Ordering::Relaxed));
                    if out
                        .send(Some((Instant::now() + delay, buf[..n].to_vec())))
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close();
                    break;
                }
            }
        }
    }

    /// Each held chunk to the client at its time, in order; the server's
    /// end of stream follows the last of them.
    fn write_replies(&self, held: &mpsc::Receiver<Held>) {
        for chunk in held {
            let Some((at, bytes)) = chunk else {
                let _ = self.client.shutdown(Shutdown::Write);
                break;
            };
            if !self.wait_until(at) {
                break;
            }
            if (&self.client).write_all(&bytes).is_err() {
                self.close();
                break;
            }
        }
        self.direction_ended();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader};

    use super::*;
    use crate::{Memcached, peer_state};

    fn connect(relay: &DelayRelay) -> BufReader<TcpStream> {
        let s = TcpStream::connect(relay.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        BufReader::new(s)
    }

    fn line(c: &mut BufReader<TcpStream>) -> String {
        let mut l = String::new();
        c.read_line(&mut l).unwrap();
        l
    }

    /// One `mn` and its `MN`: memcached's cheapest round trip.
    fn round_trip(c: &mut BufReader<TcpStream>) -> Duration {
        let t = Instant::now();
        c.get_mut().write_all(b"mn\r\n").unwrap();
        assert_eq!(line(c), "MN\r\n");
        t.elapsed()
    }

    #[test]
    fn a_round_trip_gains_the_delay() {
        let mc = Memcached::start();
        let relay = DelayRelay::start(mc.addr());
        let mut c = connect(&relay);
        // Generous: only tells "no delay" from 150 ms.
        let fast = round_trip(&mut c);
        assert!(fast < Duration::from_millis(100), "{fast:?}");
        relay.set_delay(Duration::from_millis(150));
        let slow = round_trip(&mut c);
        assert!(slow >= Duration::from_millis(150), "{slow:?}");
        assert!(slow < Duration::from_secs(2), "{slow:?}");
        assert_eq!(relay.connections(), 1);
    }

    #[test]
    fn a_live_switch_applies_to_the_next_request() {
        let mc = Memcached::start();
        let relay = DelayRelay::start(mc.addr());
        let mut c = connect(&relay);
        relay.set_delay(Duration::from_millis(200));
        assert!(round_trip(&mut c) >= Duration::from_millis(200));
        relay.set_delay(Duration::ZERO);
        let fast = round_trip(&mut c);
        assert!(fast < Duration::from_millis(100), "{fast:?}");
        relay.set_delay(Duration::from_millis(200));
        assert!(round_trip(&mut c) >= Duration::from_millis(200));
    }

    /// Replies that arrive 5 ms apart leave 100 ms after each arrived, in
    /// order: 20 of them take about 100 + 20 × 5 ms, nowhere near the
    /// 2 s that delays added one after another would take.
    #[test]
    fn pipelined_replies_are_delayed_once_not_one_after_another() {
        let mc = Memcached::start();
        let mut direct = BufReader::new(TcpStream::connect(mc.addr()).unwrap());
        for i in 0..20 {
            write!(direct.get_mut(), "ms k{i} 2\r\nv{}\r\n", i % 10).unwrap();
            assert_eq!(line(&mut direct), "HD\r\n");
        }
        let relay = DelayRelay::start(mc.addr());
        relay.set_delay(Duration::from_millis(100));
        let mut c = connect(&relay);
        let t = Instant::now();
        for i in 0..20 {
            write!(c.get_mut(), "mg k{i} v\r\n").unwrap();
            // Apart, so each reply arrives at the relay as its own chunk.
            std::thread::sleep(Duration::from_millis(5));
        }
        for i in 0..20 {
            assert_eq!(line(&mut c), "VA 2\r\n");
            assert_eq!(line(&mut c), format!("v{}\r\n", i % 10));
        }
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(
            took < Duration::from_millis(800),
            "delays added up: {took:?}"
        );
    }

    #[test]
    fn reset_closes_every_connection_and_keeps_accepting() {
        let mc = Memcached::start();
        let relay = DelayRelay::start(mc.addr());
        let mut a = connect(&relay);
        let mut b = connect(&relay);
        round_trip(&mut a);
        round_trip(&mut b);
        assert_eq!(relay.connections(), 2);
        relay.reset_connections();
        for c in [&a, &b] {
            let s = peer_state(c.get_ref(), Duration::from_secs(2));
            assert!(s.is_closed(), "{s:?}");
        }
        let mut c = connect(&relay);
        round_trip(&mut c);
        assert_eq!(relay.connections(), 3);
    }

    /// Even with a reply held for a minute, a drop returns at once and
    /// the client sees its connection closed.
    #[test]
    fn drop_closes_connections_promptly() {
        let mc = Memcached::start();
        let relay = DelayRelay::start(mc.addr());
        let mut c = connect(&relay);
        round_trip(&mut c);
        relay.set_delay(Duration::from_secs(60));
        c.get_mut().write_all(b"mn\r\n").unwrap();
        let addr = relay.addr();
        // Until the reply is held, a drop could beat it to the relay.
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        drop(relay);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let s = peer_state(c.get_ref(), Duration::from_secs(2));
        assert!(s.is_closed(), "{s:?}");
        assert!(TcpStream::connect(addr).is_err(), "still listening");
    }
}
