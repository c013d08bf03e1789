//! Tier 3: the escalation ladder, with the real `guard` binary running the
//! proxy and XDP in one process inside a network namespace, a real
//! memcached behind it, and real clients: one address misbehaves (churns,
//! guesses passwords, sends garbage) while a well-behaved client uses
//! another. Thresholds and steps are short, so each test runs in seconds;
//! every loop is bounded in count and time. Needs root; run with
//! `--test-threads=1`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use guard::{ebpf::maps::monotonic_ns, escalation::EscalationState};
use guard_tests::{Memcached, NsHandle, TempDir, Topology, connect_from, daemon::GuardDaemon};

const PORT: u16 = 11411;

/// The ladder's settings every test starts from: a 2 s window, a strict
/// budget of 2 SYNs a second (burst 2) for 4 s, a 3 s deny, and a deny
/// after 2 seconds of SYNs dropped by the strict budget.
const LADDER: &str = "
window_secs = 2
strict_syn_rate = 2
strict_syn_burst = 2
strict_secs = 4
deny_secs = 3
strict_overrun_secs = 2
forget_secs = 60
";

/// Everything a test runs; dropped processes first, then the namespaces.
struct Setup {
    guard: GuardDaemon,
    _memcached: Memcached,
    _dir: TempDir,
    topo: Topology,
    listen: SocketAddr,
}

impl Setup {
    /// guard with XDP on the server's veth (per-source budget 100/s, burst
    /// 100) and the proxy on the server's address; `escalation` is added
    /// to [`LADDER`] under `[escalation]`, `tenants` after it.
    fn start(escalation: &str, tenants: &str) -> Self {
        let topo = Topology::new().expect("topology");
        topo.flush_tcp_metrics().unwrap();
        let memcached = topo
            .server
            .start_memcached("127.0.0.1:11211".parse().unwrap())
            .expect("memcached");
        let dir = TempDir::new("escalation").unwrap();
        let conf = dir.join("guard.toml");
        let listen = SocketAddr::new(IpAddr::V4(topo.server_v4()), PORT);
        // The test's own settings replace the ladder's of the same name.
        let ladder: String = LADDER
            .lines()
            .filter(|l| {
                let key = l.split('=').next().unwrap_or("").trim();
                key.is_empty()
                    || !escalation
                        .lines()
                        .any(|o| o.split('=').next().unwrap_or("").trim() == key)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(
            &conf,
            format!(
                r#"
[xdp]
interfaces = ["{iface}"]
mode = "skb"
protect = ["*:{PORT}"]
syn_rate = 100
syn_burst = 100
tenant_syn_rate = 100000
tenant_syn_burst = 100000
global_syn_rate = 0
report_interval_secs = 1

[proxy]
listen = ["{listen}"]
backends = [{{ addr = "{backend}" }}]
drain_grace_secs = 1

[escalation]
{ladder}
{escalation}

{tenants}
"#,
                iface = topo.server_if().ifname,
                backend = memcached.addr(),
            ),
        )
        .unwrap();
        let guard = GuardDaemon::start(&topo.server, &["--config", conf.to_str().unwrap()])
            .expect("start guard");
        Self {
            guard,
            _memcached: memcached,
            _dir: dir,
            topo,
            listen,
        }
    }

    /// The misbehaving address.
    fn bad(&self) -> IpAddr {
        self.topo.client_v4().into()
    }

    /// The well-behaved client's address.
    fn good(&self) -> IpAddr {
        self.topo.client2_v4.into()
    }

    /// When `source`'s strict entry expires, while it is in force.
    fn strict_until(&self, source: IpAddr) -> Option<u64> {
        let entries = self.guard.maps().ok()?.strict_entries().ok()?;
        let now = monotonic_ns();
        entries
            .into_iter()
            .find(|(s, e)| *s == source && e.active(now))
            .map(|(_, e)| e.expires_ns)
    }

    /// `source`'s line of `guard deny list`, if it is on it.
    fn deny_line(&self, source: IpAddr) -> Option<String> {
        let out = self.guard.cli(&["deny", "list"]).unwrap();
        let prefix = format!("{source}/32 ");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with(&prefix))
            .map(str::to_string)
    }

    /// `source`'s line of `guard deny list` once it is there as
    /// escalation's (the daemon records the ladder within a second of
    /// writing the entry).
    fn escalation_deny_line(&self, source: IpAddr) -> Option<String> {
        self.deny_line(source)
            .filter(|l| l.contains(" escalation: "))
    }

    /// The ladder as the daemon last recorded it.
    fn state(&self) -> EscalationState {
        EscalationState::load(&self.guard.paths())
            .unwrap()
            .expect("the daemon records the ladder")
    }

    /// Log lines containing every one of `parts`.
    fn log_lines(&self, parts: &[&str]) -> Vec<String> {
        self.guard
            .log_text()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
            .collect()
    }

    /// Polls `f` every 100 ms (calling `between` each time) until it gives
    /// a value, for at most `within`.
    fn wait<T>(
        &self,
        what: &str,
        within: Duration,
        mut between: impl FnMut(),
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within {within:?}:\n{}",
                self.guard.log_text()
            );
            between();
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A memcache connection speaking the text protocol.
struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(
        ns: &NsHandle,
        src: IpAddr,
        dst: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let s = connect_from(ns, src, dst, timeout)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("a reply line");
        line
    }

    /// Text authentication: `set` with `username password` as the value.
    fn login(&mut self, user: &str, password: &str) -> String {
        let creds = format!("{user} {password}");
        write!(self.w, "set auth 0 0 {}\r\n{creds}\r\n", creds.len()).unwrap();
        self.line()
    }

    /// A set and a get of the same key, checked.
    fn set_get(&mut self, key: &str, value: &str) {
        write!(
            self.w,
            "set {key} 0 0 {}\r\n{value}\r\nget {key}\r\n",
            value.len()
        )
        .unwrap();
        assert_eq!(self.line(), "STORED\r\n");
        assert_eq!(self.line(), format!("VALUE {key} 0 {}\r\n", value.len()));
        assert_eq!(self.line(), format!("{value}\r\n"));
        assert_eq!(self.line(), "END\r\n");
    }

    /// One counter of `stats`.
    fn stat(&mut self, name: &str) -> u64 {
        self.w.write_all(b"stats\r\n").unwrap();
        let mut value = None;
        loop {
            let line = self.line();
            assert!(!line.is_empty(), "connection closed during stats");
            if line == "END\r\n" {
                return value.unwrap_or_else(|| panic!("stats has no {name}"));
            }
            if let Some(v) = line.strip_prefix(&format!("STAT {name} ")) {
                value = Some(v.trim().parse().unwrap());
            }
        }
    }
}

/// The well-behaved client: keeps its connections, uses them, and opens a
/// new one every second (logging in when `login` names a credential).
/// Every request and every connect must succeed.
struct GoodClient {
    ns: NsHandle,
    src: IpAddr,
    dst: SocketAddr,
    login: Option<(&'static str, &'static str)>,
    conns: Vec<Conn>,
    last_open: Instant,
    requests: u64,
    connects: u64,
}

impl GoodClient {
    fn new(setup: &Setup, src: IpAddr, login: Option<(&'static str, &'static str)>) -> Self {
        let mut c = Self {
            ns: setup.topo.client.handle(),
            src,
            dst: setup.listen,
            login,
            conns: Vec::new(),
            last_open: Instant::now(),
            requests: 0,
            connects: 0,
        };
        c.open();
        c
    }

    fn open(&mut self) {
        let mut conn = Conn::open(&self.ns, self.src, self.dst, Duration::from_secs(2))
            .unwrap_or_else(|e| {
                panic!("the well-behaved client's connect {}: {e:#}", self.connects)
            });
        if let Some((user, password)) = self.login {
            assert_eq!(conn.login(user, password), "STORED\r\n");
        }
        self.conns.push(conn);
        self.connects += 1;
        self.last_open = Instant::now();
    }

    /// A request on each connection, and a new connection each second.
    fn exercise(&mut self, new_connections: bool) {
        if new_connections && self.last_open.elapsed() >= Duration::from_secs(1) {
            self.open();
        }
        let n = self.requests;
        for (i, c) in self.conns.iter_mut().enumerate() {
            c.set_get(&format!("good{i}"), &format!("v{n}"));
        }
        self.requests += 1;
    }
}

/// What a misbehaving loop did, with the time of each connect.
#[derive(Debug, Default)]
struct Attempts {
    /// (seconds since the start, connected).
    connects: Vec<(f64, bool)>,
}

impl Attempts {
    /// Connects tried and made between `from` and `to` seconds.
    fn between(&self, from: f64, to: f64) -> (usize, usize) {
        let window: Vec<_> = self
            .connects
            .iter()
            .filter(|(t, _)| (from..to).contains(t))
            .collect();
        (window.len(), window.iter().filter(|(_, ok)| *ok).count())
    }
}

/// Runs `each` on every connection `src` manages to open to `dst`, in a
/// loop inside `ns`, until `stop` is set (at most `max` and 100,000
/// connects). A connect gets 300 ms: a SYN the guard drops is not retried.
fn misbehave(
    ns: &NsHandle,
    src: IpAddr,
    dst: SocketAddr,
    stop: Arc<AtomicBool>,
    max: Duration,
    each: impl Fn(&mut TcpStream) + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<Attempts>> {
    ns.spawn_thread(move || {
        let start = Instant::now();
        let mut attempts = Attempts::default();
        while !stop.load(Ordering::Relaxed)
            && start.elapsed() < max
            && attempts.connects.len() < 100_000
        {
            let t = start.elapsed().as_secs_f64();
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(src, 0).into())?;
            match socket.connect_timeout(&dst.into(), Duration::from_millis(300)) {
                Ok(()) => {
                    attempts.connects.push((t, true));
                    let mut s: TcpStream = socket.into();
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    each(&mut s);
                }
                Err(_) => attempts.connects.push((t, false)),
            }
        }
        Ok(attempts)
    })
    .expect("spawn in the client namespace")
}

fn secs_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// (2) A source opening and closing connections in a loop is put on the
/// strict budget for its churn, then denied for hammering it; once the
/// loop stops, the deny, then the strict step, end by themselves and the
/// source connects as before. A well-behaved client on another address is
/// served throughout.
#[test]
fn a_churner_gets_the_strict_budget_then_a_deny_and_both_end_when_it_stops() {
    let s = Setup::start("churn_connections = 20\nchurn_lifetime_ms = 1000", "");
    let (bad, good) = (s.bad(), s.good());
    let mut client = GoodClient::new(&s, good, None);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let churner = misbehave(
        &s.topo.client.handle(),
        bad,
        s.listen,
        stop.clone(),
        Duration::from_secs(30),
        |_| {},
    );
    let t_strict = s.wait(
        "the churner put on the strict budget",
        Duration::from_secs(10),
        || client.exercise(true),
        || s.strict_until(bad).map(|_| secs_since(start)),
    );
    let denied = s.wait(
        "the churner denied",
        Duration::from_secs(15),
        || client.exercise(true),
        || s.escalation_deny_line(bad).map(|l| (secs_since(start), l)),
    );
    let status = s.guard.cli(&["xdp", "status"]).unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    // It keeps churning into its deny for a while.
    let until = Instant::now() + Duration::from_millis(1_500);
    while Instant::now() < until {
        client.exercise(true);
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let attempts = churner.join().unwrap().unwrap();
    let t_stop = secs_since(start);
    let (t_deny, line) = denied;

    // Why, as the log and the deny list say it.
    let strict_lines = s.log_lines(&["escalation: ", &format!("{bad} on the strict SYN budget")]);
    assert_eq!(strict_lines.len(), 1, "{strict_lines:?}");
    assert!(
        strict_lines[0].contains("connection churn: 20 connections closed within 1000 ms"),
        "{}",
        strict_lines[0]
    );
    assert!(
        line.contains(
            "escalation: first deny: kept opening connections over its strict SYN budget"
        ),
        "{line}"
    );
    assert!(status.contains("escalation on"), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with(&bad.to_string()) && l.contains("denied")),
        "{status}"
    );

    // Once the loop stops: the deny ends, then the strict step, and the
    // entries go; nothing escalates it again.
    let t_back = s.wait(
        "the churner back on the normal budget",
        Duration::from_secs(15),
        || client.exercise(true),
        || {
            (!s.log_lines(&[&format!(
                "de-escalation: {bad} back on the normal SYN budget"
            )])
            .is_empty())
            .then(|| secs_since(start))
        },
    );
    assert_eq!(
        s.log_lines(&[&format!("de-escalation: {bad}'s deny ended")])
            .len(),
        1
    );
    s.wait(
        "the expired deny entry removed",
        Duration::from_secs(3),
        || {},
        || s.deny_line(bad).is_none().then_some(()),
    );
    assert_eq!(s.strict_until(bad), None);
    assert_eq!(
        s.log_lines(&[&format!("{bad} denied for")]).len(),
        1,
        "escalated once only"
    );
    // Its bucket refills at the per-source rate: five connects in a row.
    std::thread::sleep(Duration::from_millis(1_100));
    for i in 0..5 {
        Conn::open(&s.topo.client, bad, s.listen, Duration::from_millis(500))
            .unwrap_or_else(|e| panic!("connect {i} after the ladder ended: {e:#}"));
    }
    // Counted, in the proxy's stats too.
    let conn = &mut client.conns[0];
    assert_eq!(conn.stat("escalation_strict"), 1);
    assert_eq!(conn.stat("escalation_denied"), 1);
    assert_eq!(conn.stat("escalation_deescalated"), 2);
    assert_eq!(conn.stat("escalation_sources_strict"), 0);

    println!("guard deny list, while denied:\n{line}\nguard xdp status, while denied:\n{status}");
    let (n0, ok0) = attempts.between(0.0, t_strict);
    let (n1, ok1) = attempts.between(t_strict, t_deny);
    let (n2, ok2) = attempts.between(t_deny, t_stop);
    println!(
        "churner: strict after {t_strict:.2} s ({ok0} of {n0} connects made), denied after \
         {t_deny:.2} s ({ok1} of {n1} made on the strict budget), stopped at {t_stop:.2} s \
         ({ok2} of {n2} made while denied), back on the normal budget at {t_back:.2} s; \
         well-behaved client: {} connects and {} rounds of requests, no failure",
        client.connects, client.requests
    );
    // The strict budget (2/s, burst 2) held it, and the deny dropped all.
    assert!(
        ok1 as f64 <= 2.0 + 2.0 * (t_deny - t_strict) + 3.0,
        "{ok1} connects in {:.2} s on the strict budget",
        t_deny - t_strict
    );
    assert!(n2 >= 3, "the churner kept trying while denied: {n2}");
    assert_eq!(ok2, 0, "connects made while denied");
    assert!(client.connects >= 3 && client.requests >= 10);
    assert!(
        s.log_lines(&[&good.to_string(), "escalation"]).is_empty(),
        "the well-behaved client was escalated"
    );
}

/// (3) A password guesser is escalated for its failed logins, up to a
/// deny, while the tenant's good client on another address logs in and is
/// served throughout. Then the same guesser behind the good client's
/// address (a NAT gateway): held at the strict budget, never denied, while
/// the good client's live sessions go on.
#[test]
fn a_password_guesser_escalates_and_a_good_login_elsewhere_is_unaffected() {
    let hash = guard::tenant::password::PasswordHash::generate(b"s3cret", 1_000)
        .unwrap()
        .to_string();
    let tenant = format!(
        r#"
[[tenant]]
name = "acme"
credentials = [{{ username = "acme-app", password_hash = "{hash}" }}]
"#
    );
    let s = Setup::start("auth_failures = 5", &tenant);
    let (bad, good) = (s.bad(), s.good());
    let mut client = GoodClient::new(&s, good, Some(("acme-app", "s3cret")));
    let guess = |s: &mut TcpStream| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        for i in 0..3 {
            let creds = format!("acme-app guess{i}");
            if write!(s, "set auth 0 0 {}\r\n{creds}\r\n", creds.len()).is_err() {
                return;
            }
            let mut line = String::new();
            if r.read_line(&mut line).is_err() || line.is_empty() {
                return;
            }
            assert_eq!(line, "CLIENT_ERROR authentication failure\r\n");
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let guesser = misbehave(
        &s.topo.client.handle(),
        bad,
        s.listen,
        stop.clone(),
        Duration::from_secs(30),
        guess,
    );
    let t_strict = s.wait(
        "the guesser put on the strict budget",
        Duration::from_secs(10),
        || client.exercise(true),
        || s.strict_until(bad).map(|_| secs_since(start)),
    );
    let (t_deny, line) = s.wait(
        "the guesser denied",
        Duration::from_secs(15),
        || client.exercise(true),
        || s.escalation_deny_line(bad).map(|l| (secs_since(start), l)),
    );
    stop.store(true, Ordering::Relaxed);
    let attempts = guesser.join().unwrap().unwrap();
    let strict_lines = s.log_lines(&[&format!("{bad} on the strict SYN budget")]);
    assert!(
        strict_lines[0].contains("5 failed authentications in 2 s"),
        "{strict_lines:?}"
    );
    assert!(line.contains("escalation: first deny: "), "{line}");
    // A good login from another address, during the deny.
    client.open();
    client.exercise(false);
    assert_eq!(s.strict_until(good), None);
    assert!(s.deny_line(good).is_none());
    let (n, ok) = attempts.between(0.0, 100.0);
    println!(
        "guesser: strict after {t_strict:.2} s, denied after {t_deny:.2} s ({ok} of {n} \
         connects made); good client: {} logins and {} rounds of requests, no failure",
        client.connects, client.requests
    );

    // The NAT: a guesser behind the good client's own address. Its live
    // logins hold the address at the strict budget, never the deny list.
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let nat_guesser = misbehave(
        &s.topo.client.handle(),
        good,
        s.listen,
        stop.clone(),
        Duration::from_secs(30),
        guess,
    );
    let t_held = s.wait(
        "the shared address held at the strict budget",
        Duration::from_secs(15),
        || {
            client.exercise(false);
            assert!(
                s.deny_line(good).is_none(),
                "the shared address was denied:\n{}",
                s.guard.log_text()
            );
        },
        || {
            (!s.log_lines(&[&format!("{good} held at the strict SYN budget")])
                .is_empty())
            .then(|| secs_since(start))
        },
    );
    // Keep guessing a while longer: held again, never denied.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        client.exercise(false);
        assert!(s.deny_line(good).is_none(), "the shared address was denied");
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let nat = nat_guesser.join().unwrap().unwrap();
    let held = s.log_lines(&[&format!("{good} held at the strict SYN budget")]);
    assert!(
        held[0].contains("live session") && held[0].contains("tenant acme"),
        "{held:?}"
    );
    assert!(s.log_lines(&[&format!("{good} denied")]).is_empty());
    assert!(
        s.strict_until(good).is_some(),
        "capped by the strict budget"
    );
    // Still served, on the sessions it kept and on a new one (the strict
    // budget admits two SYNs a second; a dropped one is retried in 1 s).
    client.exercise(false);
    client.open();
    let (n, ok) = nat.between(0.0, 100.0);
    println!("{}", held[0]);
    println!(
        "guesser behind the good client's address: held at the strict budget after \
         {t_held:.2} s, {} time(s), never denied ({ok} of {n} connects made); the good \
         client kept {} sessions and made a new one",
        held.len(),
        client.conns.len() - 1
    );
}

/// (4) A source sending garbage that loses the stream is escalated; a
/// well-behaved client on another address is unaffected.
#[test]
fn a_garbage_sender_escalates_and_a_good_client_elsewhere_is_unaffected() {
    let s = Setup::start("protocol_errors = 3", "");
    let (bad, good) = (s.bad(), s.good());
    let mut client = GoodClient::new(&s, good, None);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let sender = misbehave(
        &s.topo.client.handle(),
        bad,
        s.listen,
        stop.clone(),
        Duration::from_secs(30),
        send_garbage,
    );
    let t_strict = s.wait(
        "the garbage sender put on the strict budget",
        Duration::from_secs(10),
        || client.exercise(true),
        || s.strict_until(bad).map(|_| secs_since(start)),
    );
    let (t_deny, line) = s.wait(
        "the garbage sender denied",
        Duration::from_secs(15),
        || client.exercise(true),
        || s.escalation_deny_line(bad).map(|l| (secs_since(start), l)),
    );
    stop.store(true, Ordering::Relaxed);
    let attempts = sender.join().unwrap().unwrap();
    let strict_lines = s.log_lines(&[&format!("{bad} on the strict SYN budget")]);
    assert!(
        strict_lines[0].contains("3 connections closed for protocol errors in 2 s"),
        "{strict_lines:?}"
    );
    assert!(line.contains("escalation: first deny: "), "{line}");
    for _ in 0..5 {
        client.exercise(true);
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(s.strict_until(good), None);
    assert!(s.deny_line(good).is_none());
    let (n, ok) = attempts.between(0.0, 100.0);
    println!(
        "garbage sender: strict after {t_strict:.2} s, denied after {t_deny:.2} s ({ok} of \
         {n} connects made); good client: {} connects and {} rounds of requests, no failure",
        client.connects, client.requests
    );
}

/// A request that loses the stream (a data block longer than announced),
/// then read until guard closes.
fn send_garbage(s: &mut TcpStream) {
    if s.write_all(b"set k 0 0 3\r\nabcdef\r\n").is_err() {
        return;
    }
    let mut buf = [0u8; 256];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

/// (5) The ladder survives a restart: the strict and deny entries stay in
/// force and on record, the new daemon ends them, and it remembers the
/// source's repeats, so its next offence is a second deny, twice as long,
/// not a first strict step.
#[test]
fn escalation_state_survives_a_daemon_restart() {
    let mut s = Setup::start("protocol_errors = 3\nstrict_secs = 8\ndeny_secs = 5", "");
    let bad = s.bad();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = misbehave(
        &s.topo.client.handle(),
        bad,
        s.listen,
        stop.clone(),
        Duration::from_secs(30),
        send_garbage,
    );
    let line = s.wait(
        "the garbage sender denied",
        Duration::from_secs(15),
        || {},
        || s.escalation_deny_line(bad),
    );
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap().unwrap();
    assert!(line.contains("escalation: first deny: "), "{line}");
    let strict = s
        .strict_until(bad)
        .expect("on the strict budget after the deny");
    let before = s.state();
    let rung = before
        .rungs
        .iter()
        .find(|r| r.source == bad)
        .unwrap()
        .clone();
    assert_eq!((rung.strict_repeats, rung.deny_repeats), (1, 1));

    let downtime = s.guard.restart().expect("restart");
    assert_eq!(
        s.log_lines(&["escalation: resumed 1 source from the previous run"])
            .len(),
        1,
        "{}",
        s.guard.log_text()
    );
    // The entries stayed in force, and on record as escalation's.
    assert_eq!(s.strict_until(bad), Some(strict));
    let line = s.deny_line(bad).expect("still denied after the restart");
    assert!(line.contains("escalation: first deny: "), "{line}");
    let json = s.guard.cli(&["deny", "list", "--json"]).unwrap();
    let json = String::from_utf8_lossy(&json.stdout).into_owned();
    assert!(
        json.contains(&format!("\"cidr\": \"{bad}/32\""))
            && json.contains("\"origin\": \"escalation\"")
            && json.contains("\"reason\": \"first deny: "),
        "{json}"
    );
    let after = s.state();
    assert_eq!(after.rungs, before.rungs, "the ladder resumed as it was");
    // The new daemon ends the deny when it runs out ...
    s.wait(
        "the deny ended by the new daemon",
        Duration::from_secs(10),
        || {},
        || {
            (!s.log_lines(&[&format!("de-escalation: {bad}'s deny ended")])
                .is_empty())
            .then_some(())
        },
    );
    // ... and an offence in the probation that follows is its second
    // deny, twice as long: the ladder remembered the first.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = misbehave(
        &s.topo.client.handle(),
        bad,
        s.listen,
        stop.clone(),
        Duration::from_secs(30),
        send_garbage,
    );
    let denied = s.wait(
        "the second deny",
        Duration::from_secs(15),
        || {},
        || {
            s.log_lines(&[&format!("escalation: {bad} denied for 10 s")])
                .first()
                .cloned()
        },
    );
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap().unwrap();
    assert!(denied.contains("(second deny)"), "{denied}");
    assert!(
        s.log_lines(&[&format!("{bad} on the strict SYN budget")])
            .len()
            == 1,
        "a fresh ladder would have started again from the strict step"
    );
    println!(
        "restart took {:.0} ms; the deny and the strict step survived it, and the next \
         offence was the second deny: {denied}",
        downtime.as_secs_f64() * 1000.0
    );
}
