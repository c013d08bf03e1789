//! Tier 3: the proxy and the XDP guard in one `guard` process, inside a
//! network namespace: what the proxy learns at login (which tenant a source
//! belongs to) reaches the XDP program, which then charges that source's
//! SYNs to the tenant's budget. Needs root; run with `--test-threads=1`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use guard::{config::tenant_id, tenant::password::PasswordHash};
use guard_tests::{Topology, connect_from, daemon::GuardDaemon, net::connect_error_kind};

const PORT: u16 = 11311;

#[test]
fn login_attributes_the_source_to_its_tenant_in_xdp() {
    let topo = Topology::new().expect("topology");
    topo.flush_tcp_metrics().unwrap();
    let mc = topo
        .server
        .start_memcached("127.0.0.1:11211".parse().unwrap())
        .expect("memcached");
    let hash = PasswordHash::generate(b"s3cret", 1_000)
        .unwrap()
        .to_string();
    let dir = guard_tests::TempDir::new("conf").unwrap();
    let conf = dir.join("guard.toml");
    let listen = SocketAddr::new(IpAddr::V4(topo.server_v4()), PORT);
    std::fs::write(
        &conf,
        format!(
            r#"
[xdp]
interfaces = ["{iface}"]
mode = "skb"
protect = ["*:{PORT}"]
syn_rate = 1000
syn_burst = 1000
tenant_syn_rate = 1000
tenant_syn_burst = 1000
report_interval_secs = 1

[proxy]
listen = ["{listen}"]
backends = [{{ addr = "{backend}" }}]

[[tenant]]
name = "acme"
syn_rate = 1
syn_burst = 4
credentials = [{{ username = "acme-app", password_hash = "{hash}" }}]
"#,
            iface = topo.server_if().ifname,
            backend = mc.addr(),
        ),
    )
    .unwrap();
    let guard =
        GuardDaemon::start(&topo.server, &["--config", conf.to_str().unwrap()]).expect("guard");
    let client: IpAddr = topo.client_v4().into();
    assert_eq!(guard.maps().unwrap().source_tenant(client).unwrap(), None);

    // Log in with memcached's text authentication.
    let mut s = login(&topo, client, listen);
    wait_for_tenant(&guard, client);

    // The kernel's LRU may evict a source at any time: the next login must
    // write it again, however recently the daemon wrote it before.
    guard.maps().unwrap().remove_source_tenant(client).unwrap();
    assert_eq!(guard.maps().unwrap().source_tenant(client).unwrap(), None);
    let again = login(&topo, client, listen);
    wait_for_tenant(&guard, client);
    drop(again);

    // From now on this source's SYNs charge acme's budget (burst 4), not
    // the generous per-source and default budgets.
    let before = guard.counters().unwrap();
    let mut unanswered = 0;
    for _ in 0..8 {
        match connect_from(&topo.client, client, listen, Duration::from_millis(500)) {
            Ok(_) => {}
            // Dropped: no SYN-ACK and no reset either.
            Err(e) if connect_error_kind(&e) == Some(std::io::ErrorKind::TimedOut) => {
                unanswered += 1;
            }
            Err(e) => panic!("a connect failed otherwise than by a dropped SYN: {e:#}"),
        }
    }
    let after = guard.counters().unwrap();
    let dropped = after["drop_tenant"] - before["drop_tenant"];
    assert!(dropped >= 1, "tenant budget never applied: {after:?}");
    assert!(
        unanswered >= 1,
        "some connects must go unanswered once acme's burst is spent"
    );
    // The drops raised a limit event, which the daemon counts and names
    // the tenant of in its next summary.
    let deadline = Instant::now() + Duration::from_secs(5);
    // Retried connects may cross again a second later: one or more events.
    let summary = "from 1 source; by tenant: acme ";
    let top = format!("; top sources: {client} (");
    loop {
        let events = stat(&mut s, "xdp_limit_events");
        let log = guard.log_text();
        if events >= 1
            && log.lines().any(|l| {
                l.contains("tenant SYN budgets") && l.contains(summary) && l.contains(&top)
            })
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no limit event counted and summarised:\n{}",
            guard.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Another source, not attributed, is unaffected.
    connect_from(
        &topo.client,
        topo.client2_v4.into(),
        listen,
        Duration::from_secs(2),
    )
    .expect("unattributed source connects");
    drop(s);
    drop(guard);
}

/// A connection from `client` logged in as acme-app.
fn login(topo: &Topology, client: IpAddr, listen: SocketAddr) -> std::net::TcpStream {
    let mut s =
        connect_from(&topo.client, client, listen, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let creds = "acme-app s3cret";
    write!(s, "set auth 0 0 {}\r\n{creds}\r\n", creds.len()).unwrap();
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "STORED\r\n");
    s
}

/// Waits until the XDP map charges `client` to acme.
fn wait_for_tenant(guard: &GuardDaemon, client: IpAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while guard.maps().unwrap().source_tenant(client).unwrap() != Some(tenant_id("acme")) {
        assert!(
            Instant::now() < deadline,
            "login never reached XDP:\n{}",
            guard.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One counter from `stats` on an open connection.
fn stat(s: &mut std::net::TcpStream, name: &str) -> u64 {
    s.write_all(b"stats\r\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut value = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "connection closed during stats");
        if line == "END\r\n" {
            return value.unwrap_or_else(|| panic!("stats has no {name}"));
        }
        if let Some(v) = line.strip_prefix(&format!("STAT {name} ")) {
            value = Some(v.trim().parse().unwrap());
        }
    }
}
