//! Connection bursts: thousands of clients connecting at once, each
//! sending one request and staying, with every connect timed.
//!
//! Used by the end-to-end storm test (inside a client namespace) and by
//! the proxy benchmark (on loopback). A connect that took a second or more
//! met a full accept queue: the kernel dropped its SYN and the client
//! waited for the retransmit (the initial RTO is 1 s).

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    sync::{Arc, Barrier},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::NsHandle;

/// What to send and how far to go.
#[derive(Clone, Debug)]
pub struct BurstConfig {
    /// Connections to open.
    pub clients: usize,
    /// Threads connecting side by side, each one connection after another.
    pub threads: usize,
    /// Sent on each connection as soon as it is up (may be empty).
    pub request: &'static [u8],
    /// Longest wait for one connect (covers a few SYN retransmits).
    pub connect_timeout: Duration,
    /// Niceness of the connecting threads: above 0, a server on the same
    /// cores is not starved by its own load generator, as it would not be
    /// by clients on other hosts.
    pub nice: i32,
    /// Longest the whole burst may take; connections not opened by then
    /// are counted as failed.
    pub limit: Duration,
}

impl Default for BurstConfig {
    fn default() -> Self {
        Self {
            clients: 16_000,
            threads: 16,
            request: b"get k\r\n",
            connect_timeout: Duration::from_secs(10),
            nice: 10,
            limit: Duration::from_secs(120),
        }
    }
}

/// The connections a burst opened and how long each connect took.
#[derive(Debug)]
pub struct Burst {
    /// The open connections, their requests sent.
    pub streams: Vec<TcpStream>,
    /// Each connect's duration, in no particular order.
    pub connect_times: Vec<Duration>,
    /// When the connecting threads were let go.
    pub started: Instant,
    /// From the start until the last connection was up and had sent.
    pub elapsed: Duration,
    /// Connections that failed or were never tried within the limit.
    pub failed: usize,
    /// The first failure, for the report.
    pub first_error: Option<String>,
}

impl Burst {
    /// Connects that took at least `d`.
    pub fn slower_than(&self, d: Duration) -> usize {
        self.connect_times.iter().filter(|t| **t >= d).count()
    }

    /// The `p`-quantile (0..=1) of the connect times.
    pub fn percentile(&self, p: f64) -> Duration {
        let mut t = self.connect_times.clone();
        t.sort_unstable();
        if t.is_empty() {
            return Duration::ZERO;
        }
        let i = ((t.len() as f64 * p).ceil() as usize).clamp(1, t.len()) - 1;
        t[i]
    }

    /// One line: count, time, connect-time quantiles, 1 s retransmits.
    pub fn summary(&self) -> String {
        format!(
            "{} connected in {:.2} s ({} failed); connect p50 {:?}, p99 {:?}, max {:?}; \
             {} took >= 900 ms (a dropped SYN)",
            self.streams.len(),
            self.elapsed.as_secs_f64(),
            self.failed,
            self.percentile(0.50),
            self.percentile(0.99),
            self.percentile(1.0),
            self.slower_than(Duration::from_millis(900)),
        )
    }
}

/// Opens `config.clients` connections to `dst` from `config.threads`
/// threads started together, inside `ns` if given (else here).
pub fn burst(ns: Option<&NsHandle>, dst: SocketAddr, config: &BurstConfig) -> Result<Burst> {
    if config.threads == 0 {
        bail!("a burst needs at least one thread");
    }
    let start_line = Arc::new(Barrier::new(config.threads + 1));
    let deadline_after = config.limit;
    let mut handles: Vec<JoinHandle<Result<Share>>> = Vec::new();
    for i in 0..config.threads {
        let n = config.clients / config.threads + usize::from(i < config.clients % config.threads);
        let (barrier, cfg) = (start_line.clone(), config.clone());
        let work = move || -> Result<Share> {
            if cfg.nice != 0 {
                // SAFETY: gettid has no preconditions; PRIO_PROCESS with a
                // thread id changes only that thread (Linux).
                let r = unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, cfg.nice)
                };
                if r != 0 {
                    bail!("setpriority: {}", std::io::Error::last_os_error());
                }
            }
            barrier.wait();
            Ok(connect_many(dst, n, &cfg, Instant::now() + deadline_after))
        };
        handles.push(match ns {
            Some(ns) => ns.spawn_thread(work)?,
            None => std::thread::Builder::new()
                .name("burst".into())
                .spawn(work)
                .context("spawning a burst thread")?,
        });
    }
    start_line.wait();
    let started = Instant::now();
    let mut out = Burst {
        streams: Vec::with_capacity(config.clients),
        connect_times: Vec::with_capacity(config.clients),
        started,
        elapsed: Duration::ZERO,
        failed: 0,
        first_error: None,
    };
    for h in handles {
        let share = match h.join() {
            Ok(r) => r?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        out.streams.extend(share.streams);
        out.connect_times.extend(share.times);
        out.failed += share.failed;
        out.first_error = out.first_error.or(share.first_error);
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

struct Share {
    streams: Vec<TcpStream>,
    times: Vec<Duration>,
    failed: usize,
    first_error: Option<String>,
}

fn connect_many(dst: SocketAddr, n: usize, cfg: &BurstConfig, deadline: Instant) -> Share {
    let mut share = Share {
        streams: Vec::with_capacity(n),
        times: Vec::with_capacity(n),
        failed: 0,
        first_error: None,
    };
    for i in 0..n {
        if Instant::now() >= deadline {
            share.failed += n - i;
            share
                .first_error
                .get_or_insert_with(|| format!("burst limit of {:?} reached", cfg.limit));
            break;
        }
        let t = Instant::now();
        let opened = TcpStream::connect_timeout(&dst, cfg.connect_timeout).and_then(|mut s| {
            let took = t.elapsed();
            if !cfg.request.is_empty() {
                s.write_all(cfg.request)?;
            }
            Ok((s, took))
        });
        match opened {
            Ok((s, took)) => {
                share.times.push(took);
                share.streams.push(s);
            }
            Err(e) => {
                share.failed += 1;
                share.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    share
}

/// Closes `s` with a reset instead of a FIN (`SO_LINGER` 0), as a client
/// that times out and aborts does; it leaves no TIME_WAIT behind.
pub fn close_with_reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}
