//! Checks `Ketama` against the real twemproxy: keys are written through
//! `nutcracker` (ketama + md5) and then looked up directly on each
//! memcached to see where twemproxy put them.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use guard::proxy::ketama::{Ketama, md5_hash, server_identity};
use guard_test_support::{ChildGuard, MEMCACHED_BIN, Memcached, accepts, free_port};

const NUTCRACKER: &str = "/usr/sbin/nutcracker";
const KEYS: usize = 2_000;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// nutcracker, stopped on drop with its config and log files removed, so
/// a failing assertion leaves nothing behind.
struct Nutcracker {
    child: ChildGuard,
    files: Vec<PathBuf>,
}

impl Nutcracker {
    fn log(&self) -> String {
        self.files
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .collect()
    }
}

impl Drop for Nutcracker {
    fn drop(&mut self) {
        let _ = self.child.terminate();
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
    }
}

/// One `servers:` entry and the memcached behind it.
struct Backend {
    ip: Ipv4Addr,
    port: u16,
    weight: u32,
    name: Option<String>,
}

impl Backend {
    fn new(weight: u32) -> Backend {
        let ip = Ipv4Addr::LOCALHOST;
        Backend {
            ip,
            port: free_port(),
            weight,
            name: None,
        }
    }

    fn named(weight: u32, name: &str) -> Backend {
        Backend {
            name: Some(name.to_owned()),
            ..Backend::new(weight)
        }
    }

    fn addr(&self) -> SocketAddr {
        (self.ip, self.port).into()
    }

    fn conf_line(&self) -> String {
        let mut line = format!("{}:{}:{}", self.ip, self.port, self.weight);
        if let Some(name) = &self.name {
            line.push(' ');
            line.push_str(name);
        }
        line
    }

    fn identity(&self) -> (String, u32) {
        let host = self.ip.to_string();
        (
            server_identity(&host, self.port, self.name.as_deref()),
            self.weight,
        )
    }

    fn start(&self) -> Memcached {
        Memcached::start_with(
            Command::new(MEMCACHED_BIN).args(["-m", "16", "-t", "1"]),
            self.addr(),
            accepts,
        )
        .unwrap_or_else(|e| panic!("{e:#}"))
    }
}

fn start_nutcracker(backends: &[Backend], extra_conf: &str) -> (Nutcracker, SocketAddr) {
    let ip = Ipv4Addr::LOCALHOST;
    let port = free_port();
    let stats_port = free_port();
    let base = std::env::temp_dir().join(format!("ketama-test-{}-{port}", std::process::id()));
    let conf = base.with_extension("yml");
    let log = base.with_extension("log");
    let mut yaml = format!(
        "guard:\n  listen: {ip}:{port}\n  hash: md5\n  distribution: ketama\n{extra_conf}  servers:\n"
    );
    for b in backends {
        yaml.push_str(&format!("   - {}\n", b.conf_line()));
    }
    fs::write(&conf, &yaml).unwrap();
    let child = ChildGuard::spawn(
        Command::new(NUTCRACKER)
            .arg("-c")
            .arg(&conf)
            .args(["-s", &stats_port.to_string(), "-a", "127.0.0.1", "-o"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
    .with_grace(Duration::from_secs(1));
    let mut p = Nutcracker {
        child,
        files: vec![conf, log],
    };
    let addr = (ip, port).into();
    if let Err(e) = p.child.wait_accepting(addr) {
        panic!("nutcracker: {e:#}\n{}", p.log());
    }
    (p, addr)
}

/// A text-protocol connection.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        Conn {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with("\r\n"), "truncated reply {line:?}");
        line.truncate(line.len() - 2);
        line
    }

    /// Returns the reply line, `STORED` on success.
    fn set(&mut self, key: &str, value: &str) -> String {
        write!(self.writer, "set {key} 0 0 {}\r\n{value}\r\n", value.len()).unwrap();
        self.line()
    }

    fn get(&mut self, key: &str) -> Option<String> {
        write!(self.writer, "get {key}\r\n").unwrap();
        let first = self.line();
        if first == "END" {
            return None;
        }
        assert!(first.starts_with(&format!("VALUE {key} ")), "{first:?}");
        let value = self.line();
        assert_eq!(self.line(), "END");
        Some(value)
    }
}

/// Keys of varied length and shape, deterministic across runs.
fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let pad = format!("{:08x}", md5_hash(i.to_string().as_bytes()));
            format!("{prefix}{i}/{}", &pad[..i % 9])
        })
        .collect()
}

/// Writes `keys` through twemproxy and returns, per key, the index of the
/// backend that holds it.
fn placement(proxy: SocketAddr, backends: &[Backend], keys: &[String]) -> HashMap<String, usize> {
    let mut conn = Conn::open(proxy);
    for key in keys {
        assert_eq!(conn.set(key, key), "STORED", "set {key} via twemproxy");
    }
    let mut found = HashMap::new();
    for (index, backend) in backends.iter().enumerate() {
        let Ok(stream) = TcpStream::connect(backend.addr()) else {
            continue; // an ejected backend that was stopped
        };
        drop(stream);
        let mut conn = Conn::open(backend.addr());
        for key in keys {
            if let Some(value) = conn.get(key) {
                assert_eq!(&value, key);
                let previous = found.insert(key.clone(), index);
                assert_eq!(previous, None, "{key} on two backends");
            }
        }
    }
    assert_eq!(
        found.len(),
        keys.len(),
        "some keys were not stored anywhere"
    );
    found
}

fn assert_agrees(ketama: &Ketama, found: &HashMap<String, usize>, keys: &[String]) {
    let mismatches: Vec<_> = keys
        .iter()
        .filter(|k| ketama.server_for(k.as_bytes()) != Some(found[*k]))
        .map(|k| (k, found[k], ketama.server_for(k.as_bytes())))
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} of {} keys disagree (key, twemproxy, ours), first: {:?}",
        mismatches.len(),
        keys.len(),
        &mismatches[..mismatches.len().min(5)]
    );
}

fn check(backends: Vec<Backend>) -> Vec<usize> {
    check_with_keys(backends, keys("guard:", KEYS))
}

/// Runs a whole-pool comparison and returns how many keys each backend got.
fn check_with_keys(backends: Vec<Backend>, keys: Vec<String>) -> Vec<usize> {
    let _servers: Vec<Memcached> = backends.iter().map(Backend::start).collect();
    let (_proxy, proxy_addr) = start_nutcracker(&backends, "  auto_eject_hosts: false\n");
    let found = placement(proxy_addr, &backends, &keys);
    let list: Vec<_> = backends.iter().map(Backend::identity).collect();
    assert_agrees(&Ketama::new(&list), &found, &keys);
    let mut counts = vec![0; backends.len()];
    for index in found.values() {
        counts[*index] += 1;
    }
    counts
}

#[test]
fn three_equal_servers() {
    let counts = check((0..3).map(|_| Backend::new(1)).collect());
    assert!(counts.iter().all(|&c| c > 400), "{counts:?}");
}

#[test]
fn weighted_1_2_3() {
    let counts = check([1, 2, 3].into_iter().map(Backend::new).collect());
    assert!(counts[0] < counts[1] && counts[1] < counts[2], "{counts:?}");
}

/// Weights where twemproxy's f32 arithmetic gives four points fewer than
/// exact arithmetic would, for each of the four light servers.
#[test]
fn weighted_float_rounding_edge() {
    check([1, 2, 3, 4, 15].into_iter().map(Backend::new).collect());
}

#[test]
fn named_servers_hash_by_name() {
    check(vec![
        Backend::named(1, "alpha"),
        Backend::named(1, "beta"),
        Backend::named(2, "gamma"),
    ]);
}

/// Without a name, port 11211 is left out of the identity. Each backend
/// needs port 11211, so they sit on distinct loopback addresses.
#[test]
fn default_port_is_left_out_of_identity() {
    let mut backends = Vec::new();
    for last in 101..=250u8 {
        let ip = Ipv4Addr::new(127, 0, 0, last);
        if TcpListener::bind((ip, 11211)).is_ok() {
            backends.push(Backend {
                ip,
                port: 11211,
                weight: 1,
                name: None,
            });
        }
        if backends.len() == 3 {
            break;
        }
    }
    assert_eq!(backends.len(), 3, "no free 127.0.0.x:11211");
    let identity = backends[0].identity().0;
    check(backends);
    assert!(!identity.contains(':'), "{identity}");
}

/// Two names whose continua share a point value, with keys that land
/// exactly on it. twemproxy sorts its servers by name, shorter first, and
/// sorts the continuum stably, so the shorter name wins the tie in either
/// config order even though it sorts last bytewise.
#[test]
fn equal_point_values_go_to_name_sorting_first() {
    let (short, long, tie) = colliding_names();
    assert!(short.len() < long.len() && short > long);
    // Hashes in (below, tie] dispatch to the tie, `below` being the next
    // smaller point value on the two-server continuum.
    let below = [&short, &long]
        .iter()
        .flat_map(|name| (0..40).flat_map(move |n| md5_words(format!("{name}-{n}").as_bytes())))
        .filter(|&v| v < tie)
        .max();
    let on_tie: Vec<String> = (0..)
        .map(|i| format!("tie:{i}"))
        .filter(|key| {
            let h = md5_hash(key.as_bytes());
            h <= tie && below.is_none_or(|below| h > below)
        })
        .take(20)
        .collect();
    let mut keys = keys("guard:", 500);
    keys.extend(on_tie.iter().cloned());
    for (first, second, winner) in [(&short, &long, 0), (&long, &short, 1)] {
        let list = [(first.clone(), 1), (second.clone(), 1)];
        assert_eq!(Ketama::new(&list).server_for_hash(tie), Some(winner));
        let counts = check_with_keys(
            vec![Backend::named(1, first), Backend::named(1, second)],
            keys.clone(),
        );
        assert!(counts[winner] >= on_tie.len(), "{counts:?}");
    }
}

/// Finds a short name ("z..") and a longer one ("a..") with a point value in
/// common, and that value.
fn colliding_names() -> (String, String, u32) {
    let mut short: HashMap<u32, String> = HashMap::new();
    for i in 0..1000 {
        let name = format!("z{i}");
        for n in 0..40 {
            for value in md5_words(format!("{name}-{n}").as_bytes()) {
                short.insert(value, name.clone());
            }
        }
    }
    for i in 0..100_000 {
        let name = format!("a{i:06}");
        for n in 0..40 {
            for value in md5_words(format!("{name}-{n}").as_bytes()) {
                if let Some(s) = short.get(&value) {
                    return (s.clone(), name, value);
                }
            }
        }
    }
    unreachable!("no collision");
}

fn md5_words(data: &[u8]) -> [u32; 4] {
    // md5_hash only exposes the first word; the continuum uses all four.
    use md5::{Digest, Md5};
    let d = Md5::digest(data);
    std::array::from_fn(|i| {
        u32::from_le_bytes([d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]])
    })
}

/// A request for the dead server `dead` fails and makes twemproxy (with
/// `server_failure_limit: 1`) eject it.
fn make_eject(proxy: &Nutcracker, proxy_addr: SocketAddr, all: &Ketama, dead: usize) {
    let probe = keys("probe:", 1000)
        .into_iter()
        .find(|k| all.server_for(k.as_bytes()) == Some(dead))
        .unwrap();
    let reply = Conn::open(proxy_addr).set(&probe, "x");
    assert!(
        reply.starts_with("SERVER_ERROR"),
        "{reply}\n{}",
        proxy.log()
    );
}

/// With `auto_eject_hosts`, a failed server is dropped from the continuum
/// and the rest is rebuilt over the live servers only.
#[test]
fn ejected_server_is_left_out() {
    let backends: Vec<Backend> = [1, 2, 3].into_iter().map(Backend::new).collect();
    let list: Vec<_> = backends.iter().map(Backend::identity).collect();
    let mut servers: Vec<Option<Memcached>> = backends.iter().map(|b| Some(b.start())).collect();
    let (proxy, proxy_addr) = start_nutcracker(
        &backends,
        "  auto_eject_hosts: true\n  server_failure_limit: 1\n  server_retry_timeout: 600000\n",
    );
    const DEAD: usize = 1;
    servers[DEAD] = None;
    let all = Ketama::new(&list);
    make_eject(&proxy, proxy_addr, &all, DEAD);

    let keys = keys("guard:", KEYS);
    let found = placement(proxy_addr, &backends, &keys);
    assert!(found.values().all(|&i| i != DEAD));
    let live = Ketama::with_live(&list, |i| i != DEAD);
    assert_agrees(&live, &found, &keys);
    // The all-live continuum would have placed some keys elsewhere, so the
    // agreement above really is about the rebuilt continuum.
    assert!(
        keys.iter()
            .any(|k| all.server_for(k.as_bytes()) != Some(found[k]))
    );
}

/// Keys memcached at `addr` holds, decoded from `lru_crawler metadump`.
fn stored_keys(addr: SocketAddr) -> Vec<String> {
    let mut conn = Conn::open(addr);
    write!(conn.writer, "lru_crawler metadump all\r\n").unwrap();
    let mut keys = Vec::new();
    loop {
        // Dump lines end in a bare LF, `END` in CRLF.
        let mut line = String::new();
        conn.reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        assert!(!line.is_empty(), "metadump ended early");
        if line == "END" {
            return keys;
        }
        let Some(enc) = line.split(' ').find_map(|f| f.strip_prefix("key=")) else {
            continue;
        };
        let mut key = Vec::new();
        let b = enc.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                key.push(u8::from_str_radix(&enc[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                key.push(b[i]);
                i += 1;
            }
        }
        keys.push(String::from_utf8(key).unwrap());
    }
}

/// guard, over the same servers with raw keys, ejects a dead one as
/// twemproxy does and sends that server's keys where twemproxy sends
/// them (under its gutter names, so they are never read back as stale
/// values). Keys of live servers stay where they were: with equal
/// weights that is where twemproxy puts them too; with unequal weights
/// twemproxy, recomputing every server's share, also moves some keys
/// between live servers, and guard does not.
#[test]
fn guard_sends_an_ejected_servers_keys_where_twemproxy_does() {
    for weights in [[1, 1, 1], [1, 2, 1]] {
        let backends: Vec<Backend> = weights.into_iter().map(Backend::new).collect();
        let list: Vec<_> = backends.iter().map(Backend::identity).collect();
        let mut servers: Vec<Option<Memcached>> =
            backends.iter().map(|b| Some(b.start())).collect();
        let (nutcracker, proxy_addr) = start_nutcracker(
            &backends,
            "  auto_eject_hosts: true\n  server_failure_limit: 1\n  server_retry_timeout: 600000\n",
        );
        let guard = common::GuardProxy::start(guard::config::ProxyConfig {
            listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
            backends: backends
                .iter()
                .map(|b| guard::config::BackendConfig {
                    addr: b.addr(),
                    weight: b.weight,
                })
                .collect(),
            keys: guard::config::KeyMode::Raw,
            eject_time_ms: 600_000,
            max_eject_time_ms: 600_000,
            ..guard::config::ProxyConfig::default()
        });
        const DEAD: usize = 1;
        servers[DEAD] = None;
        let all = Ketama::new(&list);
        make_eject(&nutcracker, proxy_addr, &all, DEAD);
        // guard ejects it for its failed reconnects.
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        let mut g = Conn::open(guard.addr);
        while common::stat(guard.addr, "backends_ejected") != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "guard never ejected it"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        let keys = keys("guard:", KEYS);
        let twemproxy = placement(proxy_addr, &backends, &keys);
        // Now through guard, under other names so the two do not meet.
        let mine: Vec<String> = keys.iter().map(|k| format!("g{k}")).collect();
        for k in &mine {
            assert_eq!(g.set(k, k), "STORED", "set {k} via guard");
        }
        let mut placed: HashMap<String, (usize, bool)> = HashMap::new();
        for (index, b) in backends.iter().enumerate() {
            if index == DEAD {
                continue;
            }
            for name in stored_keys(b.addr()) {
                // `~` and 13 digits name the ejection; then `:` and the key.
                let (key, gutter) = match name.strip_prefix('~') {
                    Some(rest) => (rest[14..].to_string(), true),
                    None => (name, false),
                };
                if key.starts_with("gguard:") {
                    assert_eq!(placed.insert(key.clone(), (index, gutter)), None, "{key}");
                }
            }
        }
        assert_eq!(placed.len(), mine.len(), "{weights:?}: keys missing");
        let (mut agree, mut kept_home) = (0, 0);
        for (k, g) in keys.iter().zip(&mine) {
            let (on, gutter) = placed[g];
            let home = all.server_for(g.as_bytes()).unwrap();
            // Where twemproxy puts the same key, over the same live set.
            let theirs = Ketama::with_live(&list, |i| i != DEAD).server_for(g.as_bytes());
            if home == DEAD {
                assert!(
                    gutter,
                    "{g}: a key of the ejected server under its own name"
                );
                assert_eq!(Some(on), theirs, "{weights:?} {g}");
                agree += 1;
            } else {
                assert!(!gutter, "{g}");
                assert_eq!(on, home, "{weights:?}: {g} left its live home");
                kept_home += usize::from(Some(on) != theirs);
            }
            // The oracle is twemproxy itself for the keys it placed.
            assert_eq!(
                Ketama::with_live(&list, |i| i != DEAD).server_for(k.as_bytes()),
                Some(twemproxy[k])
            );
        }
        assert!(agree > 100, "{weights:?}: {agree}");
        if weights == [1, 1, 1] {
            assert_eq!(
                kept_home, 0,
                "equal weights: every key where twemproxy puts it"
            );
        } else {
            // Two servers of weight 1 left: each now gets 160 points
            // instead of 120, and takes some keys from the other.
            assert!(kept_home > 0, "{weights:?}");
        }
        eprintln!(
            "weights {weights:?}: {agree} keys of the ejected server placed as twemproxy \
             does; {kept_home} keys of live servers that twemproxy moves stay home"
        );
    }
}
