//! What both runs share: the namespaces, the backends, the slow node's
//! relay, the client addresses; and the proxy each run puts in front.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{Mechanism, Script, Side};
use crate::{
    ChildGuard, DelayRelay, Memcached, TempDir, Topology, connect_in, daemon::GuardDaemon,
};

/// The proxy's port on the server's veth address.
pub const PORT: u16 = 11211;

/// The backends' names in tables, in `backends` order; the last is the
/// one behind the relay.
pub const NODE_NAMES: [&str; 3] = ["node-a", "node-b", "node-c"];

/// Namespaces, backends and addresses. Fields drop in order: the relay
/// and memcached before the topology they run in.
pub struct World {
    /// The slow node's network: replies of the third memcached pass it.
    pub relay: DelayRelay,
    /// The three memcached, on 127.0.0.1 in the server namespace.
    pub memcached: Vec<Memcached>,
    /// Server and client namespaces and their veth pair.
    pub topo: Topology,
    /// Config files and logs.
    pub dir: TempDir,
    /// Where clients connect.
    pub listen: SocketAddr,
    /// What the proxies are given: two memcached and the relay.
    pub backends: [SocketAddr; 3],
    /// One source address per tenant's steady load.
    pub tenant_sources: [Ipv4Addr; 3],
    /// The noisy tenant's spike.
    pub spike_source: Ipv4Addr,
    /// One per storm client.
    pub storm_sources: Vec<Ipv4Addr>,
}

impl World {
    /// Builds it all; `Drop` removes it all.
    pub fn new(script: &Script) -> Result<Self> {
        let topo = Topology::new().context("creating the namespaces and the veth pair")?;
        topo.flush_tcp_metrics()?;
        let memcached = (0..3)
            .map(|i| {
                topo.server
                    .start_memcached(SocketAddr::from(([127, 0, 0, 1], 21211 + i)))
                    .context("starting memcached (cargo xtask setup installs it)")
            })
            .collect::<Result<Vec<_>>>()?;
        let target = memcached[2].addr();
        // Started from a thread inside the server namespace: its listener
        // and every thread it starts live there.
        let relay = topo.server.run_in(move || DelayRelay::start(target))?;
        let backends = [memcached[0].addr(), memcached[1].addr(), relay.addr()];
        let net = topo.client_v4().octets();
        let host = |h: u8| Ipv4Addr::new(net[0], net[1], net[2], h);
        if script.storm_sources > 100 {
            bail!("at most 100 storm sources");
        }
        let tenant_sources = [host(10), host(11), host(12)];
        let spike_source = host(20);
        let storm_sources: Vec<Ipv4Addr> = (0..script.storm_sources)
            .map(|i| host(100 + i as u8))
            .collect();
        let client = topo.client_if();
        for a in tenant_sources
            .iter()
            .chain([&spike_source])
            .chain(&storm_sources)
        {
            client.add_addr(IpAddr::V4(*a))?;
        }
        let listen = SocketAddr::new(IpAddr::V4(topo.server_v4()), PORT);
        Ok(World {
            relay,
            memcached,
            dir: TempDir::new("demo")?,
            topo,
            listen,
            backends,
            tenant_sources,
            spike_source,
            storm_sources,
        })
    }

    /// Empties every memcached, so each run starts from a cold cache.
    pub fn flush_backends(&self) -> Result<()> {
        for mc in &self.memcached {
            let mut s = connect_in(&self.topo.server, mc.addr(), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"flush_all\r\n")?;
            let mut ok = [0u8; 4];
            s.read_exact(&mut ok)?;
            if &ok != b"OK\r\n" {
                bail!(
                    "flush_all on {}: {:?}",
                    mc.addr(),
                    String::from_utf8_lossy(&ok)
                );
            }
        }
        Ok(())
    }

    /// The name of a backend address as shown in tables.
    pub fn node_name(&self, addr: &str) -> Option<&'static str> {
        self.backends
            .iter()
            .position(|b| addr.contains(&b.to_string()))
            .map(|i| NODE_NAMES[i])
    }

    /// A tenant's login.
    pub fn credentials(tenant: &str) -> (String, String) {
        (format!("{tenant}-app"), format!("{tenant}-secret"))
    }
}

/// The proxy of one run.
pub enum Proxy {
    /// Before.
    Nutcracker {
        /// The process.
        child: ChildGuard,
        /// Its stats port, in the server namespace.
        stats: SocketAddr,
        /// Its log file.
        log: PathBuf,
    },
    /// After.
    Guard(GuardDaemon),
}

impl Proxy {
    /// Starts the side's proxy in the server namespace and waits until
    /// clients can connect.
    pub fn start(
        world: &World,
        side: Side,
        script: &Script,
        without: Option<Mechanism>,
    ) -> Result<Self> {
        match side {
            Side::Before => start_nutcracker(world),
            Side::After => start_guard(world, script, without),
        }
    }

    /// What it is, for tables.
    pub fn label(&self) -> String {
        match self {
            Proxy::Nutcracker { .. } => "nutcracker".into(),
            Proxy::Guard(_) => "guard".into(),
        }
    }
}

/// nutcracker as the provider likely ran it: ketama over md5, the same
/// servers, `auto_eject_hosts` with twemproxy's usual failure limit and a
/// retry matching guard's first ejection (10 s), and a server timeout of
/// a second: a node that answers, however slowly, is never a failure.
fn start_nutcracker(world: &World) -> Result<Proxy> {
    let conf = world.dir.join("nutcracker.yml");
    let log = world.dir.join("nutcracker.log");
    let servers: String = world
        .backends
        .iter()
        .map(|b| format!("    - {b}:1\n"))
        .collect();
    std::fs::write(
        &conf,
        format!(
            "demo:\n  listen: {}\n  hash: md5\n  distribution: ketama\n  timeout: 1000\n  \
             auto_eject_hosts: true\n  server_retry_timeout: 10000\n  server_failure_limit: 3\n  \
             servers:\n{servers}",
            world.listen
        ),
    )?;
    let stats = SocketAddr::from(([127, 0, 0, 1], 22222));
    let mut cmd = world
        .topo
        .server
        .command(guard_test_support::NUTCRACKER_BIN);
    cmd.arg("-c")
        .arg(&conf)
        .arg("-o")
        .arg(&log)
        .args(["-a", "127.0.0.1", "-s", "22222", "-i", "250"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = ChildGuard::spawn(&mut cmd)
        .context("starting nutcracker (cargo xtask setup installs it)")?
        .with_grace(Duration::from_secs(2));
    let (client, listen) = (world.topo.client.handle(), world.listen);
    child.wait_until(Duration::from_secs(10), "accepting clients", || {
        connect_in(&client, listen, Duration::from_millis(200)).is_ok()
    })?;
    Ok(Proxy::Nutcracker { child, stats, log })
}

/// guard with its XDP program on the server's veth, protecting the
/// proxy's port, and three tenants with credentials and a budget each;
/// every other setting its default.
fn start_guard(world: &World, script: &Script, without: Option<Mechanism>) -> Result<Proxy> {
    let conf = world.dir.join("guard.toml");
    let mut toml = String::new();
    if without != Some(Mechanism::Xdp) {
        toml.push_str(&format!(
            "[xdp]\ninterfaces = [\"{}\"]\nprotect = [\"*:{PORT}\"]\n\n",
            world.topo.server_if().ifname
        ));
    }
    let backends: Vec<String> = world
        .backends
        .iter()
        .map(|b| format!("{{ addr = \"{b}\" }}"))
        .collect();
    toml.push_str(&format!(
        "[proxy]\nlisten = [\"{}\"]\nbackends = [{}]\n",
        world.listen,
        backends.join(", ")
    ));
    if without == Some(Mechanism::Ejection) {
        toml.push_str("eject_after_errors = 0\noutlier_ratio = 0.0\n");
    }
    for tenant in script.tenants {
        let (user, password) = World::credentials(tenant);
        let hash = guard::tenant::PasswordHash::generate(password.as_bytes(), 10_000)
            .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))?;
        toml.push_str(&format!("\n[[tenant]]\nname = \"{tenant}\"\n"));
        if without != Some(Mechanism::Budgets) {
            toml.push_str(&format!(
                "max_requests_per_sec = {}\nmax_bytes_per_sec = {}\nmax_in_flight = {}\n",
                script.budget, script.byte_budget, script.in_flight_budget
            ));
        }
        toml.push_str(&format!(
            "credentials = [{{ username = \"{user}\", password_hash = \"{hash}\" }}]\n"
        ));
    }
    std::fs::write(&conf, toml)?;
    let args = ["--config", conf.to_str().context("config path")?];
    let daemon = if without == Some(Mechanism::Xdp) {
        GuardDaemon::start_proxy(&world.topo.server, &args)
    } else {
        GuardDaemon::start(&world.topo.server, &args)
    }
    .context("starting guard (cargo xtask demo builds it)")?;
    Ok(Proxy::Guard(daemon))
}
