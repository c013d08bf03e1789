//! The admin endpoint of the real binary: `/metrics` parsed by
//! Prometheus's own Python parser while the proxy serves, `/readyz`
//! following a backend killed and restarted, the token, the refusal of a
//! non-loopback address, a flood of scrapes beside the proxy's latency,
//! the status page in a real headless browser, and `guard status`.

mod common;
mod tenant_common;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Memcached, free_port};
use tenant_common::{GuardProcess, hash};

/// One test at a time: each measures or renders beside a proxy, and the
/// browser and the scrapers would weigh on the others.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

const TOKEN: &str = "s3cret-admin-token-0123456789";

/// A GET with `Connection: close`: (status code, body).
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("admin endpoint accepts");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .expect("a whole response before the timeout");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    (code, body.to_owned())
}

/// Guard with two tenants, `a` (a generous budget) and `b` (five
/// requests a second, so it gets refused), and its admin endpoint.
fn start(mc: &Memcached, admin_extra: &str) -> (GuardProcess, SocketAddr) {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let rest = format!(
        r#"
[admin]
listen = "{admin}"
{admin_extra}

[[tenant]]
name = "a"
credentials = [{{ username = "a", password_hash = "{}" }}]

[[tenant]]
name = "b"
max_requests_per_sec = 5
requests_burst = 5
credentials = [{{ username = "b", password_hash = "{}" }}]
"#,
        hash("pa"),
        hash("pb"),
    );
    let g = GuardProcess::start(mc, "", &rest);
    (g, admin)
}

/// Waits until `/status` satisfies `ok`, up to 15 s (a few samples).
fn wait_status(
    admin: SocketAddr,
    token: Option<&str>,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, body) = get(admin, "/status", token);
        if code == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).expect("/status is JSON");
            if ok(&v) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never; last /status {code}: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `/metrics` parsed by `prometheus_client`'s OpenMetrics parser: sample
/// name with its labels (sorted, `k=v,…`) → value. The parser rejects
/// anything that is not a valid exposition.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (cargo xtask setup installs it and prometheus_client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The metric families the README documents, with the part that serves
/// them (`proxy`, `xdp`, `any`): its table is the list of stable names.
fn documented() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let rows: Vec<(String, String)> = readme
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix("`guard_")?.strip_suffix('`')?;
            let part = cells.get(4)?.to_string();
            Some((format!("guard_{name}"), part))
        })
        .collect();
    assert!(rows.len() > 20, "the README's metrics table: {rows:?}");
    rows
}

fn sample(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        panic!(
            "{key} missing from /metrics: {:?}",
            m.keys().collect::<Vec<_>>()
        )
    })
}

#[test]
fn metrics_parse_with_prometheus_parser_and_move_under_load() {
    let _one = serial();
    let mc = Memcached::start();
    let (g, admin) = start(&mc, "");
    let mut a = g.text_client("a", "pa");
    let mut b = g.text_client("b", "pb");
    // The first sample has the tenants at rest.
    wait_status(admin, None, "a first sample", |v| {
        v["proxy"]["tenants"].is_array()
    });
    let (code, before) = get(admin, "/metrics", None);
    assert_eq!(code, 200);
    let before = parse_metrics(&before);

    for i in 0..200 {
        a.send(format!("set k{i} 0 0 5\r\nvalue\r\n").as_bytes());
        assert_eq!(a.read_line(), "STORED");
        a.send(format!("get k{i}\r\n").as_bytes());
        assert_eq!(
            a.read_until_suffix(b"END\r\n"),
            format!("VALUE k{i} 0 5\r\nvalue\r\nEND\r\n").as_bytes()
        );
    }
    // Over b's five a second: refused at once.
    let mut refused = 0;
    for _ in 0..30 {
        b.send(b"get x\r\n");
        let line = b.read_line();
        if line.starts_with("SERVER_ERROR tenant over budget") {
            refused += 1;
        } else {
            assert_eq!(line, "END");
        }
    }
    assert!(refused > 0, "b was never over its budget");
    wait_status(admin, None, "a's requests in a sample", |v| {
        v["proxy"]["tenants"][0]["requests"]["get"].as_u64() >= Some(201)
    });
    let (code, text) = get(admin, "/metrics", None);
    assert_eq!(code, 200);
    let after = parse_metrics(&text);

    // Every documented proxy (and general) family is there.
    let families: Vec<&str> = after.keys().map(|k| k.split('{').next().unwrap()).collect();
    for (name, part) in documented() {
        if part == "xdp" {
            continue;
        }
        assert!(
            families.iter().any(|f| *f == name
                || f.strip_prefix(name.as_str())
                    .is_some_and(|s| ["_total", "_bucket", "_count", "_sum"].contains(&s))),
            "{name} is documented but not served"
        );
    }
    // No family is served that the README does not name.
    let names: Vec<String> = documented().into_iter().map(|(n, _)| n).collect();
    for f in &families {
        let base = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| f.strip_suffix(s))
            .unwrap_or(f);
        assert!(
            names.iter().any(|n| n == base || n == f),
            "{f} is served but not documented"
        );
    }

    let moved = |key: &str| sample(&after, key) - before.get(key).copied().unwrap_or(0.0);
    assert!(moved("guard_proxy_requests_total{class=get,tenant=a}") >= 200.0);
    assert!(moved("guard_proxy_requests_total{class=store,tenant=a}") >= 200.0);
    assert!(
        moved("guard_proxy_budget_refusals_total{budget=requests_per_sec,tenant=b}")
            >= f64::from(refused)
    );
    assert!(moved("guard_proxy_request_duration_seconds_count{tenant=a}") >= 400.0);
    assert!(moved("guard_proxy_request_duration_seconds_sum{tenant=a}") > 0.0);
    assert!(
        sample(
            &after,
            "guard_proxy_request_duration_seconds_bucket{le=+Inf,tenant=a}"
        ) == sample(
            &after,
            "guard_proxy_request_duration_seconds_count{tenant=a}"
        )
    );
    let backend = format!("backend={}", mc.addr());
    assert!(
        moved(&format!(
            "guard_backend_request_duration_seconds_count{{{backend}}}"
        )) >= 400.0
    );
    assert_eq!(
        sample(
            &after,
            &format!("guard_backend_state{{{backend},state=healthy}}")
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            &format!("guard_backend_state{{{backend},state=ejected}}")
        ),
        0.0
    );
    assert_eq!(
        sample(&after, "guard_proxy_tenant_connections{tenant=a}"),
        1.0
    );
    assert!(sample(&after, "guard_proxy_connections_accepted_total{}") >= 2.0);
    assert_eq!(sample(&after, "guard_ready{}"), 1.0);
    // Only configured names as labels: the tenants and the backend.
    for k in after.keys() {
        assert!(!k.contains("127.0.0.1:") || k.contains(&backend), "{k}");
    }
    drop(g);
}

#[test]
fn readiness_follows_the_backend_and_health_the_process() {
    let _one = serial();
    let port = free_port();
    let mc = Memcached::start_on(port);
    let (g, admin) = start(&mc, "");
    wait_status(admin, None, "ready", |v| v["ready"] == true);
    assert_eq!(get(admin, "/readyz", None), (200, "ready\n".to_owned()));

    drop(mc);
    let v = wait_status(admin, None, "not ready once the backend is gone", |v| {
        v["ready"] == false
    });
    assert_eq!(v["not_ready"][0], "no healthy backend", "{v}");
    let (code, body) = get(admin, "/readyz", None);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no healthy backend"), "{body}");
    assert_eq!(get(admin, "/healthz", None).0, 200);

    let _mc = Memcached::start_on(port);
    wait_status(admin, None, "ready again once it is back", |v| {
        v["ready"] == true
    });
    assert_eq!(get(admin, "/readyz", None).0, 200);
    drop(g);
}

#[test]
fn a_token_is_required_of_the_data_and_checked() {
    let _one = serial();
    let mc = Memcached::start();
    let (g, admin) = start(&mc, &format!("token = \"{TOKEN}\""));
    for path in ["/metrics", "/status", "/readyz"] {
        assert_eq!(get(admin, path, None).0, 401, "{path} without a token");
        assert_eq!(
            get(admin, path, Some("wrong")).0,
            401,
            "{path} with a wrong token"
        );
        let almost = &TOKEN[..TOKEN.len() - 1];
        assert_eq!(
            get(admin, path, Some(almost)).0,
            401,
            "{path} with a prefix"
        );
    }
    wait_status(admin, Some(TOKEN), "data with the token", |v| {
        v["ready"] == true
    });
    assert_eq!(get(admin, "/metrics", Some(TOKEN)).0, 200);
    // The page holds no data, and liveness no secret.
    let (code, page) = get(admin, "/", None);
    assert_eq!(code, 200);
    assert!(page.contains("<title>guard status</title>"));
    assert_eq!(get(admin, "/healthz", None).0, 200);

    // `guard status` reads the token from the same config file.
    let out = Command::new(env!("CARGO_BIN_EXE_guard"))
        .args(["status", "--config", g.config_path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(": ready"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("a ")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("b ")), "{text}");
    assert!(text.contains(&mc.addr().to_string()), "{text}");
    drop(g);
}

#[test]
fn a_non_loopback_admin_needs_the_flag_and_a_token() {
    let check = |args: &[&str], config: &str| {
        let dir = std::env::temp_dir().join(format!("guard-admin-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.toml", free_port()));
        std::fs::write(&path, config).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_guard"))
            .args(["run", "--check", "--config", path.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(TOKEN),
            "--check printed the token"
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = check(&["--admin", "0.0.0.0:9311"], "");
    assert!(!ok);
    assert!(
        err.contains("reachable from other hosts") && err.contains("--admin-allow-remote"),
        "{err}"
    );
    let (ok, err) = check(&["--admin", "0.0.0.0:9311", "--admin-allow-remote"], "");
    assert!(!ok);
    assert!(err.contains("token"), "{err}");
    let (ok, err) = check(
        &["--admin", "0.0.0.0:9311", "--admin-allow-remote"],
        "[admin]\ntoken = \"short\"\n",
    );
    assert!(!ok, "a short token");
    assert!(err.contains("16 characters"), "{err}");
    let (ok, err) = check(
        &["--admin-allow-remote"],
        &format!("[admin]\nlisten = \"0.0.0.0:9311\"\ntoken = \"{TOKEN}\"\n"),
    );
    assert!(ok, "{err}");
    let (ok, err) = check(&["--admin", "off"], "");
    assert!(ok, "{err}");
    let (ok, err) = check(&["--admin", "nowhere"], "");
    assert!(!ok);
    assert!(err.contains("ADDR:PORT or off"), "{err}");
}

/// Sequential `get`s on one connection: the latency of each, sorted.
fn latencies(c: &mut common::Client, n: usize) -> Vec<Duration> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.send(b"get k\r\n");
        c.read_until_suffix(b"END\r\n");
        v.push(t.elapsed());
    }
    v
}

fn p99(v: &[Duration]) -> Duration {
    v[v.len() * 99 / 100]
}

#[test]
fn a_flood_of_scrapes_does_not_move_the_proxys_latency() {
    let _one = serial();
    let mc = Memcached::start();
    let (g, admin) = start(&mc, "");
    let mut a = g.text_client("a", "pa");
    a.send(b"set k 0 0 5\r\nvalue\r\n");
    assert_eq!(a.read_line(), "STORED");
    wait_status(admin, None, "a first sample", |v| v["ready"] == true);
    latencies(&mut a, 500);

    // More scrapers than the endpoint serves at once, each scraping as
    // fast as it is answered while `flooding` is set; calm and flooded
    // runs alternate, so a change in the machine's own load falls on
    // both.
    let flooding = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let scrapers: Vec<_> = (0..48)
        .map(|i| {
            let (flooding, stop, scrapes) = (flooding.clone(), stop.clone(), scrapes.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                let path = ["/metrics", "/status", "/"][i % 3];
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if !flooding.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    if let Ok(mut s) = TcpStream::connect(admin) {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        let _ = write!(
                            s,
                            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                        );
                        let mut sink = Vec::new();
                        if s.read_to_end(&mut sink).is_ok() && sink.starts_with(b"HTTP/1.1 200") {
                            scrapes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    let (mut calm, mut flooded) = (Vec::new(), Vec::new());
    let mut flood_secs = 0.0;
    for _ in 0..4 {
        calm.extend(latencies(&mut a, 750));
        flooding.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        flooded.extend(latencies(&mut a, 750));
        flood_secs += started.elapsed().as_secs_f64() + 0.2;
        flooding.store(false, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for s in scrapers {
        s.join().unwrap();
    }
    let served = scrapes.load(Ordering::Relaxed);
    calm.sort();
    flooded.sort();
    let (calm99, flood99) = (p99(&calm), p99(&flooded));
    println!(
        "get p50/p99: calm {:?}/{calm99:?}; during {served} scrapes in {flood_secs:.1} s {:?}/{flood99:?}",
        calm[calm.len() / 2],
        flooded[flooded.len() / 2]
    );
    assert!(served > 0, "no scrape was answered");
    // The endpoint answers its quota and no more, however many ask (the
    // scrapers keep a few answers in hand between two runs).
    let quota = f64::from(guard::admin::MAX_REQUESTS_PER_SEC) * (flood_secs + 4.0);
    assert!(
        (served as f64) <= quota,
        "{served} scrapes answered in {flood_secs:.1} s"
    );
    // Generous: the test's own threads share two cores with guard.
    assert!(
        flood99 <= calm99 * 3 + Duration::from_millis(2),
        "p99 {flood99:?} during the flood, {calm99:?} without"
    );
    drop(g);
}

#[test]
fn the_status_page_renders_live_numbers_in_a_real_browser() {
    let _one = serial();
    let mc = Memcached::start();
    let (g, admin) = start(&mc, "");
    let mut a = g.text_client("a", "pa");
    a.send(b"set k 0 0 5\r\nvalue\r\n");
    assert_eq!(a.read_line(), "STORED");
    let load = |c: &mut common::Client, n: usize| {
        for _ in 0..n {
            c.send(b"get k\r\n");
            c.read_until_suffix(b"END\r\n");
        }
    };
    load(&mut a, 100);
    wait_status(admin, None, "a's requests in a sample", |v| {
        v["proxy"]["tenants"][0]["requests"]["get"].as_u64() >= Some(100)
    });
    let first = render(admin);
    load(&mut a, 300);
    wait_status(admin, None, "a's later requests in a sample", |v| {
        v["proxy"]["tenants"][0]["requests"]["get"].as_u64() >= Some(400)
    });
    let second = render(admin);

    for dom in [&first, &second] {
        assert!(
            dom.contains(r#"id="ready" class="badge ok">ready<"#),
            "{dom}"
        );
        assert!(
            dom.contains(&format!(
                r#"data-backend="{}" data-state="healthy""#,
                mc.addr()
            )),
            "{dom}"
        );
        assert!(dom.contains(r#"data-tenant="b""#), "{dom}");
        // The script replaced every placeholder it owns.
        let version = between(dom, r#"id="version">"#, "<");
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
    }
    let requests = |dom: &str| -> u64 {
        between(dom, r#"data-tenant="a" data-requests=""#, "\"")
            .parse()
            .unwrap()
    };
    let (r1, r2) = (requests(&first), requests(&second));
    assert!(r1 >= 101, "{r1}");
    assert!(
        r2 >= r1 + 300,
        "the page's numbers did not move: {r1} then {r2}"
    );
    assert_ne!(
        between(&first, r#"data-unix=""#, "\""),
        between(&second, r#"data-unix=""#, "\""),
        "the page showed the same sample twice"
    );
    drop(g);
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> &'a str {
    let from = s
        .find(start)
        .unwrap_or_else(|| panic!("{start} not in the page: {s}"))
        + start.len();
    let len = s[from..].find(end).unwrap();
    &s[from..from + len]
}

/// The page after its script ran, from Debian's chromium, headless.
fn render(admin: SocketAddr) -> String {
    let profile = std::env::temp_dir().join(format!(
        "guard-chromium-{}-{}",
        std::process::id(),
        free_port()
    ));
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://{admin}/"))
        .stdin(Stdio::null())
        .output()
        .expect("chromium (cargo xtask setup installs it)");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn guard_status_without_a_daemon_says_why() {
    let dir = std::env::temp_dir().join(format!("guard-status-{}", std::process::id()));
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_guard"))
        .args(["status", "--admin", &format!("127.0.0.1:{port}")])
        .env("GUARD_PIN_ROOT", dir.join("pins"))
        .env("GUARD_STATE_ROOT", &dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "no answer from the admin endpoint at 127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert!(err.contains("no pinned XDP state either"), "{err}");
}
