//! A real twemproxy (`nutcracker`) for tests.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Result, bail};

use crate::{ChildGuard, free_port};

/// Where nutcracker is expected to be installed (Debian package).
pub const NUTCRACKER_BIN: &str = "/usr/sbin/nutcracker";

/// nutcracker with one pool, `guard`, hashing keys with md5 onto a ketama
/// continuum, as guard does; accepting by the time [`Nutcracker::start`]
/// returns. Stopped on drop, and its config and log files removed, so a
/// failing test leaves nothing behind.
#[derive(Debug)]
pub struct Nutcracker {
    addr: SocketAddr,
    child: ChildGuard,
    files: Vec<PathBuf>,
}

impl Nutcracker {
    /// Starts nutcracker on 127.0.0.1 and a [`free_port`] in front of
    /// `servers` (twemproxy's `servers:` entries, `ip:port:weight [name]`),
    /// with `extra` lines (two-space indented) added to the pool.
    pub fn start(servers: &[String], extra: &str) -> Result<Self> {
        if !std::path::Path::new(NUTCRACKER_BIN).exists() {
            bail!("{NUTCRACKER_BIN} not found (apt-get install nutcracker)");
        }
        let ip = Ipv4Addr::LOCALHOST;
        let port = free_port();
        let base = std::env::temp_dir().join(format!("nutcracker-{}-{port}", std::process::id()));
        let conf = base.with_extension("yml");
        let log = base.with_extension("log");
        let mut yaml = format!(
            "guard:\n  listen: {ip}:{port}\n  hash: md5\n  distribution: ketama\n{extra}  servers:\n"
        );
        for s in servers {
            yaml.push_str(&format!("   - {s}\n"));
        }
        fs::write(&conf, &yaml)?;
        let child = ChildGuard::spawn(
            Command::new(NUTCRACKER_BIN)
                .arg("-c")
                .arg(&conf)
                .args(["-s", &free_port().to_string(), "-a", "127.0.0.1", "-o"])
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?
        .with_grace(Duration::from_secs(1));
        let mut n = Nutcracker {
            addr: (ip, port).into(),
            child,
            files: vec![conf, log],
        };
        if let Err(e) = n.child.wait_accepting(n.addr) {
            bail!("nutcracker: {e:#}\n{}", n.log());
        }
        Ok(n)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.files[1]).unwrap_or_default()
    }
}

impl Drop for Nutcracker {
    fn drop(&mut self) {
        // Stopped before its files go, not after (as the field's own drop
        // would).
        let _ = self.child.terminate();
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
    }
}
