//! Shared by the tenant and client-library tests: the real `guard` binary
//! running the proxy from a config file, with cheap password hashes.

#![allow(dead_code)]

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{ChildGuard, Client, Memcached, bin, free_port};

/// A stored password hash, with the fewest iterations the config takes
/// so tests stay fast.
pub fn hash(password: &str) -> String {
    guard::tenant::PasswordHash::generate(password.as_bytes(), 1_000)
        .unwrap()
        .to_string()
}

/// `guard run --config FILE` as a child process; on drop SIGTERM, up to
/// 10 s to drain, then SIGKILL, and its directory removed.
pub struct GuardProcess {
    child: ChildGuard,
    pub addr: SocketAddr,
    dir: PathBuf,
    pub config_path: PathBuf,
}

/// The `[proxy]` section for one memcached on a free port, plus `extra`
/// lines (e.g. `auth_timeout_ms = 300`).
pub fn proxy_section(mc: &Memcached, port: u16, extra: &str) -> String {
    format!(
        "[proxy]\nlisten = [\"127.0.0.1:{port}\"]\nbackends = [{{ addr = \"{}\" }}]\n{extra}\n",
        mc.addr()
    )
}

/// The config file: `[proxy]`, then `rest`; the admin endpoint off
/// unless `rest` has an `[admin]` table (tests run side by side, and the
/// default port is one).
fn config_text(mc: &Memcached, port: u16, proxy_extra: &str, rest: &str) -> String {
    let admin = if rest.contains("[admin]") {
        ""
    } else {
        "\n[admin]\nlisten = \"\"\n"
    };
    format!("{}\n{rest}\n{admin}", proxy_section(mc, port, proxy_extra))
}

impl GuardProcess {
    /// Starts guard with `[proxy]` for `mc` plus `rest` (tenant tables).
    pub fn start(mc: &Memcached, proxy_extra: &str, rest: &str) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("guard-tenants-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("guard.toml");
        std::fs::write(&config_path, config_text(mc, port, proxy_extra, rest)).unwrap();
        let log = std::fs::File::create(dir.join("guard.log")).unwrap();
        let mut child = ChildGuard::spawn(
            Command::new(env!("CARGO_BIN_EXE_guard"))
                .args(["run", "--config", config_path.to_str().unwrap()])
                .env("GUARD_PIN_ROOT", dir.join("pins"))
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log),
        )
        .expect("start guard")
        .with_grace(Duration::from_secs(10));
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        child.wait_accepting(addr).unwrap();
        Self {
            child,
            addr,
            dir,
            config_path,
        }
    }

    /// Rewrites the config file (same `[proxy]`) and sends SIGHUP.
    pub fn reload(&mut self, mc: &Memcached, proxy_extra: &str, rest: &str) {
        std::fs::write(
            &self.config_path,
            config_text(mc, self.addr.port(), proxy_extra, rest),
        )
        .unwrap();
        self.signal(libc::SIGHUP);
    }

    /// What guard has logged so far (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("guard.log")).unwrap_or_default()
    }

    pub fn signal(&mut self, sig: i32) {
        self.child.signal(sig).unwrap();
    }

    /// A text client authenticated as `user` (memcached `-Y` form), once
    /// requests reach the backend.
    pub fn text_client(&self, user: &str, password: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = Client::connect(self.addr);
            assert_eq!(text_auth(&mut c, user, password), "STORED");
            c.send(b"mg __warmup__ v\r\n");
            if c.read_line() == "EN" {
                return c;
            }
            assert!(Instant::now() < deadline, "backend never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A binary client authenticated with SASL PLAIN as `user`.
    pub fn binary_client(&self, user: &str, password: &str) -> Client {
        let mut c = Client::connect(self.addr);
        assert_eq!(sasl_auth(&mut c, user, password), 0);
        c
    }
}

impl Drop for GuardProcess {
    fn drop(&mut self) {
        // Stopped before its directory goes, not after (as the field's own
        // drop would).
        let _ = self.child.terminate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends memcached's text authentication and returns the reply line.
pub fn text_auth(c: &mut Client, user: &str, password: &str) -> String {
    let token = format!("{user} {password}");
    c.send(format!("set auth 0 0 {}\r\n{token}\r\n", token.len()).as_bytes());
    c.read_line()
}

/// Sends SASL PLAIN over the binary protocol; returns the status.
pub fn sasl_auth(c: &mut Client, user: &str, password: &str) -> u16 {
    let msg = format!("\0{user}\0{password}");
    c.send(&bin(0x21, b"PLAIN", b"", msg.as_bytes(), 0, 0x5a5a));
    let r = c.read_binary_until(0x5a5a);
    status(&r)
}

/// The status of the last binary response in `frames`.
pub fn status(frames: &[u8]) -> u16 {
    let last = last_frame(frames);
    u16::from_be_bytes([last[6], last[7]])
}

/// The value of the last binary response in `frames`.
pub fn value(frames: &[u8]) -> Vec<u8> {
    let last = last_frame(frames);
    let key = u16::from_be_bytes([last[2], last[3]]) as usize;
    let extras = last[4] as usize;
    last[24 + extras + key..].to_vec()
}

fn last_frame(frames: &[u8]) -> &[u8] {
    let mut at = 0;
    loop {
        let body = u32::from_be_bytes(frames[at + 8..at + 12].try_into().unwrap()) as usize;
        let end = at + 24 + body;
        if end >= frames.len() {
            return &frames[at..end];
        }
        at = end;
    }
}

/// One binary request and its response's (status, value).
pub fn bin_call(c: &mut Client, op: u8, key: &[u8], extras: &[u8], val: &[u8]) -> (u16, Vec<u8>) {
    c.send(&bin(op, key, extras, val, 0, 0x77));
    let r = c.read_binary_until(0x77);
    (status(&r), value(&r))
}
