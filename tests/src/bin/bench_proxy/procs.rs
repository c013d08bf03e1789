//! The processes under test: nutcracker and guard on free loopback ports,
//! in front of the benchmark's memcached backends.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use guard_tests::{ChildGuard, free_port};

/// nutcracker on a free loopback port in front of `backends`, with
/// `extra` lines added to its pool; its files live in `tmp` under `name`.
pub fn start_nutcracker(
    tmp: &std::path::Path,
    name: &str,
    backends: &[SocketAddr],
    extra: &str,
) -> (ChildGuard, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let servers: String = backends.iter().map(|a| format!("    - {a}:1\n")).collect();
    let conf = tmp.join(format!("{name}.yml"));
    std::fs::write(
        &conf,
        format!(
            "bench:\n  listen: {addr}\n  hash: md5\n  distribution: ketama\n  \
             auto_eject_hosts: false\n{extra}  servers:\n{servers}"
        ),
    )
    .unwrap();
    let mut child = ChildGuard::spawn(
        Command::new("/usr/sbin/nutcracker")
            .arg("-c")
            .arg(&conf)
            .arg("-o")
            .arg(tmp.join(format!("{name}.log")))
            .args(["-a", "127.0.0.1", "-s"])
            .arg(free_port().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("nutcracker (apt-get install nutcracker)")
    .with_grace(Duration::from_secs(1));
    child.wait_accepting(addr).expect("nutcracker");
    (child, addr)
}

/// guard's proxy on a free loopback port in front of `backends`, with
/// `extra` flags.
pub fn start_guard(
    tmp: &std::path::Path,
    backends: &[SocketAddr],
    extra: &[&str],
) -> (ChildGuard, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(guard_bin());
    cmd.args(["run", "--listen", &addr.to_string()]);
    for a in backends {
        cmd.args(["--backend", &a.to_string()]);
    }
    cmd.args(["--max-connections-per-source", "0"])
        .args(extra)
        .env("GUARD_PIN_ROOT", tmp.join("pins"))
        .env("GUARD_STATE_ROOT", tmp.join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = ChildGuard::spawn(&mut cmd)
        .expect("target/release/guard (cargo build --release -p guard)")
        .with_grace(Duration::from_secs(3));
    child.wait_accepting(addr).expect("guard");
    (child, addr)
}

fn guard_bin() -> PathBuf {
    std::env::var_os("GUARD_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/guard"),
        PathBuf::from,
    )
}
