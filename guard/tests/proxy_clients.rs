//! Independent client libraries against the real binary and memcached:
//! pymemcache (text protocol) on an open-tenant guard, and
//! python-binary-memcached (binary protocol, SASL PLAIN) on a guard with
//! tenants. The scenarios live in `tests/clients/`; `cargo xtask setup`
//! installs both libraries.

mod common;
mod tenant_common;

use std::{
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::{Client, Memcached};
use tenant_common::{GuardProcess, hash};

/// Runs a scenario script with a deadline; returns its output.
fn python(script: &str, args: &[String]) -> Output {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let probe = Command::new("python3")
        .args(["-c", "import pymemcache, bmemcached"])
        .output()
        .expect("python3 runs");
    assert!(
        probe.status.success(),
        "pymemcache and python-binary-memcached are missing: run `cargo xtask setup`\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let mut child = Command::new("python3")
        .arg(&path)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start python3");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn assert_passed(out: &Output, library: &str, min_checks: usize) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{library} scenario failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let result = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("RESULT {library} ")))
        .unwrap_or_else(|| panic!("no RESULT line:\n{stdout}"));
    let n: usize = result.split_whitespace().next().unwrap().parse().unwrap();
    assert!(n >= min_checks, "{result}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), n);
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn pymemcache_on_the_open_tenant() {
    let mc = Memcached::start();
    let guard = GuardProcess::start(&mc, "", "");
    // Backends up before the scenario starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = Client::connect(guard.addr);
    loop {
        c.send(b"mg __warmup__ v\r\n");
        if c.read_line() == "EN" {
            break;
        }
        assert!(Instant::now() < deadline, "backend never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = python(
        "pymemcache_scenario.py",
        &["127.0.0.1".into(), guard.addr.port().to_string()],
    );
    assert_passed(&out, "pymemcache", 40);
    // flush_all reached no backend: the key stored before it is still
    // there, under the open tenant's first generation.
    let mut raw = Client::connect(mc.addr());
    raw.send(b"get _:0000000:survivor\r\n");
    assert_eq!(raw.read_line(), "VALUE _:0000000:survivor 0 1");
    assert_eq!(raw.read_line(), "s");
    assert_eq!(raw.read_line(), "END");
}

#[test]
fn python_binary_memcached_with_sasl() {
    let mc = Memcached::start();
    let tenants = format!(
        r#"
[[tenant]]
name = "acme"
credentials = [
  {{ username = "acme-app", password_hash = "{}" }},
  {{ username = "acme-dash", password_hash = "{}", read_only = true }},
]
"#,
        hash("app secret"),
        hash("dash-pw"),
    );
    let guard = GuardProcess::start(&mc, "auth_timeout_ms = 10000", &tenants);
    // Backends up before the scenario starts.
    drop(guard.text_client("acme-app", "app secret"));
    let out = python(
        "bmemcached_scenario.py",
        &[
            "127.0.0.1".into(),
            guard.addr.port().to_string(),
            "acme-app".into(),
            "app secret".into(),
            "acme-dash".into(),
            "dash-pw".into(),
        ],
    );
    assert_passed(&out, "bmemcached", 20);
    // Everything the library stored is in acme's namespace on the backend.
    let mut raw = Client::connect(mc.addr());
    raw.send(b"get k acme:0000000:k\r\n");
    let reply = String::from_utf8(raw.read_until_suffix(b"END\r\n")).unwrap();
    assert!(reply.starts_with("VALUE acme:0000000:k "), "{reply}");
    assert_eq!(reply.matches("VALUE").count(), 1, "{reply}");
}
