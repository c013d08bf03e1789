//! Shared by the proxy tests: guard's proxy in this process, drained on
//! drop (panics included), and a blocking client. Memcached, child
//! processes and free ports come from `guard_test_support`, shared with
//! the privileged harness.

#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use guard::config::{BackendConfig, ProxyConfig};
// For the test files; not every test binary uses each.
#[allow(unused_imports)]
pub use guard_test_support::{ChildGuard, Memcached, PeerState, free_port, peer_state};

/// `mc` as a proxy backend of weight 1.
pub fn backend(mc: &Memcached) -> BackendConfig {
    BackendConfig {
        addr: mc.addr(),
        weight: 1,
    }
}

/// Proxy settings for tests: the given backends, defaults otherwise.
pub fn config(backends: &[&Memcached]) -> ProxyConfig {
    ProxyConfig {
        listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
        backends: backends.iter().map(|m| backend(m)).collect(),
        ..ProxyConfig::default()
    }
}

/// guard's proxy running in this process on its own runtime; stopped
/// (drained) on drop.
pub struct GuardProxy {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl GuardProxy {
    /// Starts the proxy and waits until requests reach the backends.
    pub fn start(config: ProxyConfig) -> Self {
        let p = Self::start_unchecked(config);
        p.wait_backends_up();
        p
    }

    /// Starts the proxy as one open tenant (its keys and budgets as
    /// `config` says) without waiting for its backends.
    pub fn start_unchecked(config: ProxyConfig) -> Self {
        let cx = guard::proxy::ProxyContext::open_for(&config);
        Self::start_with(config, cx)
    }

    /// Starts the proxy with the daemon's context (tenants, where logins
    /// are reported), without waiting for its backends.
    pub fn start_with(config: ProxyConfig, cx: guard::proxy::ProxyContext) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(async { guard::proxy::listener::bind(config.listen[0], config.backlog) })
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let done = runtime.spawn(guard::proxy::Proxy::run_with(
            vec![listener],
            config,
            cx,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            stop: Some(stop),
            done: Some(done),
            runtime: Some(runtime),
        }
    }

    /// Waits until a request goes through, so tests start with every
    /// backend connection up.
    fn wait_backends_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut c = Client::connect(self.addr);
        loop {
            c.send(b"mg __warmup__ v\r\n");
            if c.read_line() == "EN" {
                break;
            }
            assert!(Instant::now() < deadline, "backends never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Give the remaining pooled connections a moment to connect too.
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl GuardProxy {
    /// Drains as `guard run` does on SIGTERM and says how the proxy ended.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.finish()
            .unwrap_or_else(|| Err(anyhow::anyhow!("proxy already stopped")))
    }

    fn finish(&mut self) -> Option<anyhow::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let (done, rt) = (self.done.take()?, self.runtime.take()?);
        let ended =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), done).await });
        rt.shutdown_timeout(Duration::from_secs(5));
        Some(match ended {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(anyhow::anyhow!("proxy task failed: {e}")),
            Err(_) => Err(anyhow::anyhow!("proxy did not drain within 10 s")),
        })
    }
}

impl Drop for GuardProxy {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// A blocking client with a read timeout, so a missing reply fails the test
/// instead of hanging it.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, b: &[u8]) {
        self.stream.write_all(b).unwrap();
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk).expect("reply before timeout");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// One line, without CRLF.
    pub fn read_line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            assert!(self.fill() > 0, "connection closed");
        }
    }

    /// Everything up to and including `end` at the end of the buffer.
    pub fn read_until_suffix(&mut self, end: &[u8]) -> Vec<u8> {
        self.read_until_count(end, 1)
    }

    /// Everything up to the `n`th `end` line, which ends the buffer.
    pub fn read_until_count(&mut self, end: &[u8], n: usize) -> Vec<u8> {
        loop {
            let seen = self.buf.windows(end.len()).filter(|w| *w == end).count();
            if seen >= n && self.buf.ends_with(end) {
                return std::mem::take(&mut self.buf);
            }
            assert!(self.fill() > 0, "connection closed");
        }
    }

    /// Binary responses up to and including the one for `opaque`.
    pub fn read_binary_until(&mut self, opaque: u32) -> Vec<u8> {
        let mut at = 0;
        loop {
            while self.buf.len() >= at + 24 {
                let body = u32::from_be_bytes(self.buf[at + 8..at + 12].try_into().unwrap());
                let end = at + 24 + body as usize;
                if self.buf.len() < end {
                    break;
                }
                let op = u32::from_be_bytes(self.buf[at + 12..at + 16].try_into().unwrap());
                at = end;
                if op == opaque {
                    let out: Vec<u8> = self.buf.drain(..at).collect();
                    return out;
                }
            }
            assert!(self.fill() > 0, "connection closed");
        }
    }

    /// What guard did within `within`: closed the connection, stayed open
    /// and silent, or sent something (bytes already read but not yet taken
    /// count as sent). Independent of the stream's read timeout.
    pub fn peer_state(&mut self, within: Duration) -> PeerState {
        if !self.buf.is_empty() {
            return PeerState::Sent(std::mem::take(&mut self.buf));
        }
        guard_test_support::peer_state(&self.stream, within)
    }

    /// Panics unless guard closes the connection (end of stream or reset)
    /// within `within`, saying what it did instead.
    #[track_caller]
    pub fn expect_closed(&mut self, within: Duration) {
        match self.peer_state(within) {
            s if s.is_closed() => {}
            PeerState::Sent(b) => {
                panic!("sent {:?} instead of closing", String::from_utf8_lossy(&b))
            }
            s => panic!("still open after {within:?}: {s:?}"),
        }
    }
}

/// `stats` from guard (or a memcached), by name.
pub fn stats(addr: SocketAddr) -> std::collections::HashMap<String, String> {
    stats_group(addr, "")
}

/// `stats <group>` (e.g. `settings`) from guard or a memcached, by name.
pub fn stats_group(addr: SocketAddr, group: &str) -> std::collections::HashMap<String, String> {
    let mut c = Client::connect(addr);
    c.send(format!("stats {group}\r\n").as_bytes());
    let raw = c.read_until_suffix(b"END\r\n");
    String::from_utf8_lossy(&raw)
        .lines()
        .filter_map(|l| {
            let mut p = l.strip_prefix("STAT ")?.splitn(2, ' ');
            Some((p.next()?.to_string(), p.next()?.to_string()))
        })
        .collect()
}

/// One numeric `stats` value; panics, naming it, if there is none.
#[track_caller]
pub fn stat(addr: SocketAddr, name: &str) -> u64 {
    stats(addr)
        .get(name)
        .unwrap_or_else(|| panic!("no stat {name} from {addr}"))
        .parse()
        .unwrap_or_else(|e| panic!("stat {name}: {e}"))
}

/// A binary request frame.
pub fn bin(op: u8, key: &[u8], extras: &[u8], value: &[u8], cas: u64, opaque: u32) -> Vec<u8> {
    let mut f = vec![0x80, op];
    f.extend_from_slice(&(key.len() as u16).to_be_bytes());
    f.push(extras.len() as u8);
    f.push(0);
    f.extend_from_slice(&0u16.to_be_bytes());
    f.extend_from_slice(&((extras.len() + key.len() + value.len()) as u32).to_be_bytes());
    f.extend_from_slice(&opaque.to_be_bytes());
    f.extend_from_slice(&cas.to_be_bytes());
    f.extend_from_slice(extras);
    f.extend_from_slice(key);
    f.extend_from_slice(value);
    f
}
