//! Tenants through the real binary and a real memcached: authentication
//! (text `-Y` form and SASL PLAIN), isolation by namespace, per-tenant
//! flush, read-only credentials, rotation, connection caps, key limits,
//! the auth deadline, and SIGHUP reloads. One in-process test checks what
//! sessions report to the XDP side.

mod common;
mod tenant_common;

use std::time::{Duration, Instant};

use common::{Client, Memcached, bin};
use tenant_common::{GuardProcess, bin_call, hash, sasl_auth, text_auth};

const AUTH_FAILURE: &str = "CLIENT_ERROR authentication failure";
const UNAUTHENTICATED: &str = "CLIENT_ERROR unauthenticated";
const DENIED: &str = "CLIENT_ERROR permission denied";

/// acme (namespace `acme`): `acme-app` with two passwords (rotation) and
/// the read-only `acme-dash`. globex (namespace `gx`): `globex`. small: at
/// most two connections.
fn tenants() -> String {
    format!(
        r#"
[[tenant]]
name = "acme"
credentials = [
  {{ username = "acme-app", password_hash = "{}" }},
  {{ username = "acme-app", password_hash = "{}" }},
  {{ username = "acme-dash", password_hash = "{}", read_only = true }},
]

[[tenant]]
name = "globex"
namespace = "gx"
credentials = [{{ username = "globex", password_hash = "{}" }}]

[[tenant]]
name = "small"
max_connections = 2
credentials = [{{ username = "small", password_hash = "{}" }}]
"#,
        hash("old-secret"),
        hash("new-secret"),
        hash("dash-pw"),
        hash("gx-pw"),
        hash("small-pw"),
    )
}

/// A generous deadline: debug-build PBKDF2 on two busy cores is slow, and
/// these tests take their time between logins.
const AUTH_TIMEOUT: &str = "auth_timeout_ms = 10000";

fn start(mc: &Memcached) -> GuardProcess {
    GuardProcess::start(mc, AUTH_TIMEOUT, &tenants())
}

fn set(c: &mut Client, key: &str, value: &str) -> String {
    c.send(format!("set {key} 0 0 {}\r\n{value}\r\n", value.len()).as_bytes());
    c.read_line()
}

fn get(c: &mut Client, key: &str) -> Option<String> {
    c.send(format!("get {key}\r\n").as_bytes());
    let line = c.read_line();
    if line == "END" {
        return None;
    }
    assert!(line.starts_with(&format!("VALUE {key} ")), "{line}");
    let value = c.read_line();
    assert_eq!(c.read_line(), "END");
    Some(value)
}

#[test]
fn tenants_see_only_their_own_keys() {
    let mc = Memcached::start();
    let guard = start(&mc);
    let mut acme = guard.text_client("acme-app", "new-secret");
    let mut gx = guard.text_client("globex", "gx-pw");
    assert_eq!(set(&mut acme, "shared", "acme-value"), "STORED");
    assert_eq!(set(&mut gx, "shared", "globex-value"), "STORED");
    assert_eq!(get(&mut acme, "shared").as_deref(), Some("acme-value"));
    assert_eq!(get(&mut gx, "shared").as_deref(), Some("globex-value"));
    // A key only one tenant wrote is a miss for the other.
    assert_eq!(set(&mut acme, "only-acme", "x"), "STORED");
    assert_eq!(get(&mut gx, "only-acme"), None);
    // Meta and multi-get return the client's keys, not the backend's.
    gx.send(b"mg shared k v\r\n");
    assert_eq!(gx.read_line(), "VA 12 kshared");
    assert_eq!(gx.read_line(), "globex-value");
    acme.send(b"gets shared only-acme\r\n");
    let reply = String::from_utf8(acme.read_until_suffix(b"END\r\n")).unwrap();
    assert!(reply.starts_with("VALUE shared 0 10 "), "{reply}");
    assert!(reply.contains("VALUE only-acme 0 1 "), "{reply}");
    // The backend holds both, each under its tenant's namespace.
    let mut raw = Client::connect(mc.addr());
    assert_eq!(get(&mut raw, "shared"), None);
    assert_eq!(
        get(&mut raw, "acme:0000000:shared").as_deref(),
        Some("acme-value")
    );
    assert_eq!(
        get(&mut raw, "gx:0000000:shared").as_deref(),
        Some("globex-value")
    );
    // Binary clients of the same tenant share its keys.
    let mut b = guard.binary_client("globex", "gx-pw");
    let (st, v) = bin_call(&mut b, 0x00, b"shared", b"", b"");
    assert_eq!((st, v.as_slice()), (0, &b"globex-value"[..]));
}

#[test]
fn wrong_passwords_are_refused_text_and_sasl() {
    let mc = Memcached::start();
    let guard = start(&mc);
    // Text: wrong password, unknown user, no space; the connection stays
    // unauthenticated and may try again.
    let mut c = Client::connect(guard.addr);
    assert_eq!(text_auth(&mut c, "acme-app", "wrong"), AUTH_FAILURE);
    assert_eq!(text_auth(&mut c, "nobody", "new-secret"), AUTH_FAILURE);
    // Another tenant's password does not open this user.
    assert_eq!(text_auth(&mut c, "acme-app", "gx-pw"), AUTH_FAILURE);
    c.send(b"set auth 0 0 8\r\nacme-app\r\n");
    assert_eq!(
        c.read_line(),
        "CLIENT_ERROR bad authentication token format"
    );
    c.send(b"get shared\r\n");
    assert_eq!(c.read_line(), UNAUTHENTICATED);
    assert_eq!(text_auth(&mut c, "acme-app", "old-secret"), "STORED");

    // SASL: 0x20 for a wrong password, a malformed message or another
    // mechanism; the connection stays open.
    let mut b = Client::connect(guard.addr);
    assert_eq!(sasl_auth(&mut b, "globex", "wrong"), 0x20);
    b.send(&bin(0x21, b"PLAIN", b"", b"globex gx-pw", 0, 1));
    assert_eq!(tenant_common::status(&b.read_binary_until(1)), 0x20);
    b.send(&bin(0x21, b"CRAM-MD5", b"", b"x", 0, 2));
    assert_eq!(tenant_common::status(&b.read_binary_until(2)), 0x20);
    let (st, _) = bin_call(&mut b, 0x00, b"k", b"", b"");
    assert_eq!(st, 0x20);
    assert_eq!(sasl_auth(&mut b, "globex", "gx-pw"), 0);
    let (st, _) = bin_call(&mut b, 0x00, b"k", b"", b"");
    assert_eq!(st, 0x01, "authenticated: a plain miss");
    // One identity per connection.
    assert_eq!(sasl_auth(&mut b, "acme-app", "new-secret"), 0x83);
}

#[test]
fn unauthenticated_clients_can_only_authenticate() {
    let mc = Memcached::start();
    let guard = start(&mc);
    let mut owner = guard.text_client("acme-app", "new-secret");
    assert_eq!(set(&mut owner, "k", "v"), "STORED");

    let mut c = Client::connect(guard.addr);
    for cmd in [
        &b"get k\r\n"[..],
        b"gets k\r\n",
        b"delete k\r\n",
        b"incr k 1\r\n",
        b"touch k 10\r\n",
        b"flush_all\r\n",
        b"stats\r\n",
        b"version\r\n",
        b"mg k v\r\n",
        b"md k\r\n",
        b"mn\r\n",
        b"add k 0 0 3\r\na b\r\n",
    ] {
        c.send(cmd);
        assert_eq!(c.read_line(), UNAUTHENTICATED, "{cmd:?}");
    }
    // The first `set` is an authentication, never a store.
    c.send(b"set k 0 0 5\r\nhello\r\n");
    assert_eq!(
        c.read_line(),
        "CLIENT_ERROR bad authentication token format"
    );
    // An oversized value is refused without buffering it.
    let big = vec![b'x'; 100_000];
    c.send(format!("set k 0 0 {}\r\n", big.len()).as_bytes());
    c.send(&big);
    c.send(b"\r\n");
    assert!(c.read_line().starts_with("SERVER_ERROR"));
    c.send(b"get k\r\n");
    assert_eq!(c.read_line(), UNAUTHENTICATED);

    // Binary: version and SASL mechanisms are served, nothing else.
    let mut b = Client::connect(guard.addr);
    let (st, v) = bin_call(&mut b, 0x20, b"", b"", b"");
    assert_eq!((st, v.as_slice()), (0, &b"PLAIN"[..]));
    let (st, v) = bin_call(&mut b, 0x0b, b"", b"", b"");
    assert_eq!(st, 0);
    assert!(v.starts_with(b"guard-"));
    for (op, extras, value) in [
        (0x00u8, &b""[..], &b""[..]),
        (0x01, &[0u8; 8][..], &b"evil"[..]),
        (0x04, b"", b""),
        (0x08, b"", b""),
        (0x10, b"", b""),
        (0x1c, &[0u8; 4][..], b""),
    ] {
        let key: &[u8] = if matches!(op, 0x08 | 0x10) { b"" } else { b"k" };
        let (st, _) = bin_call(&mut b, op, key, extras, value);
        assert_eq!(st, 0x20, "opcode {op:#x}");
    }
    // Nothing reached the backend.
    assert_eq!(get(&mut owner, "k").as_deref(), Some("v"));
}

#[test]
fn idle_unauthenticated_clients_are_closed_at_the_deadline() {
    let mc = Memcached::start();
    let guard = GuardProcess::start(&mc, "auth_timeout_ms = 1500", &tenants());
    let started = Instant::now();
    let mut idle = Client::connect(guard.addr);
    // A client that keeps failing is closed at the same deadline.
    let mut failing = Client::connect(guard.addr);
    assert_eq!(text_auth(&mut failing, "acme-app", "wrong"), AUTH_FAILURE);
    let authed = guard.text_client("globex", "gx-pw");
    idle.expect_closed(Duration::from_secs(5));
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "closed after the 1.5 s deadline, not before: {:?}",
        started.elapsed()
    );
    failing.expect_closed(Duration::from_secs(1));
    // The deadline does not apply once authenticated.
    std::thread::sleep(Duration::from_millis(500));
    let mut authed = authed;
    assert_eq!(set(&mut authed, "still", "here"), "STORED");
}

#[test]
fn rotated_credentials_both_work() {
    let mc = Memcached::start();
    let guard = start(&mc);
    let mut old = guard.text_client("acme-app", "old-secret");
    let mut new = guard.text_client("acme-app", "new-secret");
    assert_eq!(set(&mut old, "rot", "1"), "STORED");
    assert_eq!(get(&mut new, "rot").as_deref(), Some("1"));
    let mut b = guard.binary_client("acme-app", "old-secret");
    assert_eq!(bin_call(&mut b, 0x00, b"rot", b"", b"").0, 0);
    let mut b = guard.binary_client("acme-app", "new-secret");
    assert_eq!(bin_call(&mut b, 0x00, b"rot", b"", b"").0, 0);
    // Many logins with the same credential (a reconnect storm) stay cheap
    // and correct.
    for _ in 0..50 {
        let mut c = Client::connect(guard.addr);
        assert_eq!(text_auth(&mut c, "acme-app", "new-secret"), "STORED");
    }
}

#[test]
fn read_only_credentials_read_but_never_write() {
    let mc = Memcached::start();
    let guard = start(&mc);
    let mut app = guard.text_client("acme-app", "new-secret");
    assert_eq!(set(&mut app, "ro", "value"), "STORED");
    assert_eq!(set(&mut app, "n", "5"), "STORED");
    let mut dash = guard.text_client("acme-dash", "dash-pw");
    assert_eq!(get(&mut dash, "ro").as_deref(), Some("value"));
    dash.send(b"gets ro n\r\n");
    let reply = String::from_utf8(dash.read_until_suffix(b"END\r\n")).unwrap();
    assert_eq!(reply.matches("VALUE").count(), 2, "{reply}");
    dash.send(b"mg ro v\r\n");
    assert_eq!(dash.read_line(), "VA 5");
    assert_eq!(dash.read_line(), "value");
    for cmd in [
        &b"set ro 0 0 1\r\nx\r\n"[..],
        b"add new 0 0 1\r\nx\r\n",
        b"replace ro 0 0 1\r\nx\r\n",
        b"append ro 0 0 1\r\nx\r\n",
        b"prepend ro 0 0 1\r\nx\r\n",
        b"cas ro 0 0 1 1\r\nx\r\n",
        b"set ro 0 0 1 noreply\r\nx\r\n",
        b"incr n 1\r\n",
        b"decr n 1\r\n",
        b"delete ro\r\n",
        b"touch ro 100\r\n",
        b"gat 100 ro\r\n",
        b"gats 100 ro\r\n",
        b"flush_all\r\n",
        b"ms ro 1\r\nx\r\n",
        b"md ro\r\n",
        b"ma n\r\n",
        b"mg ro v T30\r\n",
        b"mg fresh N30\r\n",
    ] {
        dash.send(cmd);
        assert_eq!(dash.read_line(), DENIED, "{cmd:?}");
    }
    dash.send(b"version\r\n");
    assert!(dash.read_line().starts_with("VERSION guard-"));

    // Binary: reads work, writes get 0x24.
    let mut b = guard.binary_client("acme-dash", "dash-pw");
    let (st, v) = bin_call(&mut b, 0x00, b"ro", b"", b"");
    assert_eq!((st, v.as_slice()), (0, &b"value"[..]));
    let store = [0u8; 8];
    let arith = [0u8; 20];
    for (op, extras, value) in [
        (0x01u8, &store[..], &b"x"[..]),
        (0x02, &store[..], b"x"),
        (0x03, &store[..], b"x"),
        (0x11, &store[..], b"x"),
        (0x0e, b"", b"x"),
        (0x04, b"", b""),
        (0x05, &arith[..], b""),
        (0x06, &arith[..], b""),
        (0x1c, &[0u8; 4][..], b""),
        (0x1d, &[0u8; 4][..], b""),
    ] {
        let key: &[u8] = if op == 0x05 || op == 0x06 {
            b"n"
        } else {
            b"ro"
        };
        let (st, v) = bin_call(&mut b, op, key, extras, value);
        assert_eq!(st, 0x24, "opcode {op:#x}");
        assert_eq!(v, b"Permission denied");
    }
    let (st, _) = bin_call(&mut b, 0x08, b"", b"", b"");
    assert_eq!(st, 0x24, "flush");

    // Nothing changed.
    assert_eq!(get(&mut app, "ro").as_deref(), Some("value"));
    assert_eq!(get(&mut app, "n").as_deref(), Some("5"));
    assert_eq!(get(&mut app, "new"), None);
    app.send(b"stats\r\n");
    let stats = String::from_utf8(app.read_until_suffix(b"END\r\n")).unwrap();
    assert!(stats.contains("STAT permission_denied 30\r\n"), "{stats}");
    assert!(stats.contains("STAT tenant acme\r\n"), "{stats}");
    assert!(!stats.contains("globex"), "{stats}");
}

#[test]
fn flush_all_flushes_only_the_tenant() {
    let mc = Memcached::start();
    let guard = start(&mc);
    let mut acme = guard.text_client("acme-app", "new-secret");
    let mut gx = guard.text_client("globex", "gx-pw");
    assert_eq!(set(&mut acme, "a", "1"), "STORED");
    assert_eq!(set(&mut gx, "b", "2"), "STORED");
    acme.send(b"flush_all\r\n");
    assert_eq!(acme.read_line(), "OK");
    assert_eq!(get(&mut acme, "a"), None);
    assert_eq!(get(&mut gx, "b").as_deref(), Some("2"));
    // The tenant's other connections see the flush too.
    let mut acme2 = guard.text_client("acme-app", "old-secret");
    assert_eq!(get(&mut acme2, "a"), None);
    assert_eq!(set(&mut acme, "a", "new"), "STORED");
    assert_eq!(get(&mut acme2, "a").as_deref(), Some("new"));
    // The backend was not flushed: the old generation's key is still there.
    let mut raw = Client::connect(mc.addr());
    assert_eq!(get(&mut raw, "acme:0000000:a").as_deref(), Some("1"));
    assert_eq!(get(&mut raw, "gx:0000000:b").as_deref(), Some("2"));
    // Binary flush, likewise.
    let mut b = guard.binary_client("globex", "gx-pw");
    assert_eq!(bin_call(&mut b, 0x08, b"", b"", b"").0, 0);
    assert_eq!(get(&mut gx, "b"), None);
    assert_eq!(get(&mut acme, "a").as_deref(), Some("new"));
    assert_eq!(get(&mut raw, "gx:0000000:b").as_deref(), Some("2"));
}

/// One numeric row of `stats` on an authenticated connection.
fn stat_of(c: &mut Client, name: &str) -> u64 {
    c.send(b"stats\r\n");
    let raw = String::from_utf8(c.read_until_suffix(b"END\r\n")).unwrap();
    let prefix = format!("STAT {name} ");
    raw.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in {raw}"))
        .parse()
        .unwrap()
}

/// `stats reset` (text or binary) zeroes its own tenant's counters, for
/// every connection of that tenant, and never another tenant's.
#[test]
fn stats_reset_resets_only_the_tenants_own_counters() {
    let mc = Memcached::start();
    let guard = start(&mc);
    let mut acme = guard.text_client("acme-app", "new-secret");
    let mut acme2 = guard.text_client("acme-app", "old-secret");
    let mut gx = guard.text_client("globex", "gx-pw");
    for _ in 0..5 {
        assert_eq!(get(&mut acme, "a"), None);
        assert_eq!(get(&mut gx, "b"), None);
    }
    let gx_before = stat_of(&mut gx, "tenant_requests");
    assert!(gx_before >= 5, "{gx_before}");
    assert!(stat_of(&mut acme, "tenant_requests") >= 5);
    acme.send(b"stats reset\r\n");
    assert_eq!(acme.read_line(), "RESET");
    assert_eq!(stat_of(&mut acme2, "tenant_requests"), 0);
    assert_eq!(stat_of(&mut gx, "tenant_requests"), gx_before);
    assert_eq!(get(&mut acme2, "a"), None);
    assert_eq!(stat_of(&mut acme, "tenant_requests"), 1);
    // Binary, from globex: its own again.
    let mut b = guard.binary_client("globex", "gx-pw");
    assert_eq!(bin_call(&mut b, 0x10, b"reset", b"", b""), (0, Vec::new()));
    assert_eq!(stat_of(&mut gx, "tenant_requests"), 0);
    assert_eq!(stat_of(&mut acme, "tenant_requests"), 1);
}

#[test]
fn tenant_connection_cap() {
    let mc = Memcached::start();
    let guard = start(&mc);
    // Backends up first, so no login below is retried.
    let _other = guard.text_client("globex", "gx-pw");
    let first = guard.text_client("small", "small-pw");
    let mut second = guard.binary_client("small", "small-pw");
    let mut third = Client::connect(guard.addr);
    assert_eq!(
        text_auth(&mut third, "small", "small-pw"),
        "SERVER_ERROR too many connections"
    );
    third.expect_closed(Duration::from_secs(2));
    let mut bin_third = Client::connect(guard.addr);
    assert_eq!(sasl_auth(&mut bin_third, "small", "small-pw"), 0x86);
    bin_third.expect_closed(Duration::from_secs(2));
    // Other tenants are not affected.
    let _another = guard.text_client("globex", "gx-pw");
    // The two admitted connections work; closing one frees its place.
    assert_eq!(bin_call(&mut second, 0x00, b"k", b"", b"").0, 0x01);
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = Client::connect(guard.addr);
        if text_auth(&mut c, "small", "small-pw") == "STORED" {
            break;
        }
        assert!(Instant::now() < deadline, "the cap was never released");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn key_limit_counts_the_namespace() {
    let mc = Memcached::start();
    let guard = start(&mc);
    let mut acme = guard.text_client("acme-app", "new-secret");
    // 250 - ("acme" + ":" + 7 generation digits + ":") = 237.
    let fits = "k".repeat(237);
    let over = "k".repeat(238);
    assert_eq!(set(&mut acme, &fits, "v"), "STORED");
    assert_eq!(get(&mut acme, &fits).as_deref(), Some("v"));
    let reply = set(&mut acme, &over, "v");
    assert!(reply.starts_with("CLIENT_ERROR"), "{reply}");
    // As memcached does, the refused line's data block is read as a
    // command of its own.
    assert_eq!(acme.read_line(), "ERROR");
    acme.send(format!("get {over}\r\n").as_bytes());
    assert!(acme.read_line().starts_with("CLIENT_ERROR"));
    acme.send(format!("mg {over} v\r\n").as_bytes());
    assert!(acme.read_line().starts_with("CLIENT_ERROR"));
    // The session goes on.
    assert_eq!(get(&mut acme, &fits).as_deref(), Some("v"));
    // A shorter namespace leaves a longer key: "gx" gives 239.
    let mut gx = guard.text_client("globex", "gx-pw");
    assert_eq!(set(&mut gx, &"g".repeat(239), "v"), "STORED");
    assert!(set(&mut gx, &"g".repeat(240), "v").starts_with("CLIENT_ERROR"));
    assert_eq!(gx.read_line(), "ERROR");
    // Binary: the same limit.
    let mut b = guard.binary_client("acme-app", "new-secret");
    let (st, v) = bin_call(&mut b, 0x00, fits.as_bytes(), b"", b"");
    assert_eq!((st, v.as_slice()), (0, &b"v"[..]));
}

#[test]
fn sighup_reloads_credentials_and_keeps_flushes() {
    let mc = Memcached::start();
    // Credentials that stay keep their stored hash across the edit, as an
    // operator's config file does.
    let (old, new, dash) = (hash("old-secret"), hash("new-secret"), hash("dash-pw"));
    let acme = |credentials: String| {
        format!("[[tenant]]\nname = \"acme\"\ncredentials = [{credentials}]\n")
    };
    let first = acme(format!(
        r#"{{ username = "acme-app", password_hash = "{old}" }},
  {{ username = "acme-app", password_hash = "{new}" }},
  {{ username = "acme-dash", password_hash = "{dash}", read_only = true }}"#
    )) + &format!(
        "[[tenant]]\nname = \"globex\"\ncredentials = [{{ username = \"globex\", password_hash = \"{}\" }}]\n",
        hash("gx-pw")
    );
    let mut guard = GuardProcess::start(&mc, AUTH_TIMEOUT, &first);
    let mut acme_app = guard.text_client("acme-app", "new-secret");
    let mut leaked = guard.text_client("acme-app", "old-secret");
    let mut dashboard = guard.text_client("acme-dash", "dash-pw");
    assert_eq!(set(&mut acme_app, "before", "1"), "STORED");
    acme_app.send(b"flush_all\r\n");
    assert_eq!(acme_app.read_line(), "OK");
    assert_eq!(set(&mut acme_app, "after", "2"), "STORED");
    assert_eq!(set(&mut dashboard, "dash", "x"), DENIED);

    // The old password is retired (say it leaked), a new user appears, the
    // dashboard may now write, globex is gone.
    let reloaded = acme(format!(
        r#"{{ username = "acme-app", password_hash = "{new}" }},
  {{ username = "acme-ci", password_hash = "{}" }},
  {{ username = "acme-dash", password_hash = "{dash}" }}"#,
        hash("ci-pw")
    ));
    guard.reload(&mc, AUTH_TIMEOUT, &reloaded);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = Client::connect(guard.addr);
        if text_auth(&mut c, "acme-ci", "ci-pw") == "STORED" {
            break;
        }
        assert!(Instant::now() < deadline, "reload never took effect");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = Client::connect(guard.addr);
    assert_eq!(text_auth(&mut c, "acme-app", "old-secret"), AUTH_FAILURE);
    let mut c = Client::connect(guard.addr);
    assert_eq!(text_auth(&mut c, "globex", "gx-pw"), AUTH_FAILURE);
    // The flush generation survived: old keys stay hidden, newer ones seen.
    let mut ci = guard.text_client("acme-ci", "ci-pw");
    assert_eq!(get(&mut ci, "before"), None);
    assert_eq!(get(&mut ci, "after").as_deref(), Some("2"));
    // Connections whose credential is still configured go on, with the
    // rights it has now.
    assert_eq!(get(&mut acme_app, "after").as_deref(), Some("2"));
    assert_eq!(set(&mut dashboard, "dash", "x"), "STORED");
    // The session logged in with the retired password was closed by the
    // reload itself, idle as it was.
    leaked.expect_closed(Duration::from_secs(5));
}

#[test]
fn authentications_are_reported_for_xdp() {
    use guard::{
        config::Config,
        proxy::ProxyContext,
        tenant::{SharedRegistry, TenantRegistry},
    };
    use std::sync::Arc;

    let mc = Memcached::start();
    let text = format!(
        "{}\n{}",
        tenant_common::proxy_section(&mc, 0, ""),
        tenants()
    );
    let config = Config::parse(&text).unwrap();
    config.validate().unwrap();
    let registry = Arc::new(SharedRegistry::new(
        TenantRegistry::from_config(&config).unwrap(),
    ));
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let cx = ProxyContext {
        tenants: registry,
        learned: Some(tx),
        ..ProxyContext::default()
    };
    let proxy = common::GuardProxy::start_with(config.proxy.clone(), cx);
    let addr = proxy.addr;

    let mut bad = Client::connect(addr);
    assert_eq!(text_auth(&mut bad, "globex", "nope"), AUTH_FAILURE);
    let mut c = Client::connect(addr);
    assert_eq!(text_auth(&mut c, "globex", "gx-pw"), "STORED");
    let deadline = Instant::now() + Duration::from_secs(5);
    let got = loop {
        match rx.try_recv() {
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => break r.ok(),
        }
    };
    // With the credential that proved it, so a reload revoking that
    // credential takes the source's verified status back.
    let stored = config.tenants[1].credentials[0].password_hash.to_string();
    assert_eq!(
        got,
        Some(guard::proxy::Learned {
            source: std::net::IpAddr::from([127, 0, 0, 1]),
            tenant: guard::config::tenant_id("globex"),
            credential: guard::tenant::credential_id(&stored),
        })
    );
    // Only successes are reported.
    assert!(rx.try_recv().is_err());

    proxy.stop().unwrap();
}
