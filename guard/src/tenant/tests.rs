//! Registry and verifier tests.

use std::{
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use super::*;
use crate::config::{Config, CredentialConfig, KeyMode};

fn hash(password: &str) -> PasswordHash {
    PasswordHash::generate(password.as_bytes(), password::MIN_ITERATIONS).unwrap()
}

fn cred(username: &str, password: &str, read_only: bool) -> CredentialConfig {
    CredentialConfig {
        username: username.into(),
        password_hash: hash(password),
        read_only,
    }
}

fn config() -> Config {
    let c = Config {
        tenants: vec![
            TenantConfig {
                name: "acme".into(),
                credentials: vec![
                    cred("acme-app", "old-secret", false),
                    // Rotation: the same user with its new password.
                    cred("acme-app", "new-secret", false),
                    cred("acme-ro", "reader", true),
                ],
                max_connections: 3,
                max_requests_per_sec: Some(1000),
                max_bytes_per_sec: Some(1 << 20),
                max_in_flight: Some(64),
                ..Default::default()
            },
            TenantConfig {
                name: "globex".into(),
                namespace: Some("gx".into()),
                credentials: vec![cred("globex", "hunter2", false)],
                ..Default::default()
            },
            // XDP-only tenant: no credentials, still a tenant.
            TenantConfig {
                name: "initech".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    c.validate().unwrap();
    c
}

fn settings() -> AuthSettings {
    AuthSettings {
        max_slow: 4,
        ..Default::default()
    }
}

#[test]
fn open_registry_needs_no_auth() {
    for r in [
        TenantRegistry::open(),
        TenantRegistry::from_config(&Config::default()).unwrap(),
    ] {
        assert!(!r.requires_auth());
        let id = r.open_identity().unwrap();
        assert_eq!(&*id.tenant.name, OPEN_TENANT);
        assert_eq!(id.tenant.id, DEFAULT_TENANT);
        assert_eq!(id.tenant.namespace.name(), b"_");
        assert!(!id.read_only);
        assert!(r.authenticate(b"x", b"y").is_ok());
        assert!(r.authenticate_cached(b"x", b"y").unwrap().is_ok());
    }
    // Tenants without credentials (SYN budgets only) leave it open.
    let c = Config {
        tenants: vec![TenantConfig {
            name: "acme".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    assert!(!TenantRegistry::from_config(&c).unwrap().requires_auth());
}

#[test]
fn correct_and_wrong_passwords() {
    let r = TenantRegistry::with_settings(&config(), settings()).unwrap();
    assert!(r.requires_auth());
    assert!(r.open_identity().is_none());
    let id = r.authenticate(b"globex", b"hunter2").unwrap();
    assert_eq!(&*id.tenant.name, "globex");
    assert_eq!(id.tenant.id, crate::config::tenant_id("globex"));
    assert_eq!(id.tenant.namespace.name(), b"gx");
    assert_eq!(id.username.as_deref(), Some("globex"));
    assert!(!id.read_only);
    assert_eq!(
        r.authenticate(b"globex", b"hunter3").unwrap_err(),
        AuthError::InvalidCredentials
    );
    assert_eq!(
        r.authenticate(b"globex", b"").unwrap_err(),
        AuthError::InvalidCredentials
    );
    // Another tenant's password does not open this user.
    assert_eq!(
        r.authenticate(b"globex", b"new-secret").unwrap_err(),
        AuthError::InvalidCredentials
    );
    assert_eq!(
        r.authenticate(b"nobody", b"hunter2").unwrap_err(),
        AuthError::InvalidCredentials
    );
    // Unknown users cost nothing.
    let slow = r.auth_stats().slow_verifications;
    assert_eq!(
        r.authenticate_cached(b"nobody", b"x").unwrap().unwrap_err(),
        AuthError::InvalidCredentials
    );
    assert_eq!(r.auth_stats().slow_verifications, slow);
}

#[test]
fn rotation_both_credentials_work_and_read_only_surfaces() {
    let c0 = config();
    let r = TenantRegistry::with_settings(&c0, settings()).unwrap();
    let old = r.authenticate(b"acme-app", b"old-secret").unwrap();
    let new = r.authenticate(b"acme-app", b"new-secret").unwrap();
    assert!(Arc::ptr_eq(&old.tenant, &new.tenant));
    assert!(!old.read_only && !new.read_only);
    let ro = r.authenticate(b"acme-ro", b"reader").unwrap();
    assert!(ro.read_only);
    assert!(Arc::ptr_eq(&ro.tenant, &old.tenant));
    assert_eq!(
        ro.tenant.limits,
        TenantLimits {
            max_connections: 3,
            max_requests_per_sec: 1000,
            requests_burst: 1000,
            max_bytes_per_sec: 1 << 20,
            bytes_burst: 1 << 20,
            max_in_flight: 64,
        }
    );
    assert_eq!(TenantLimits::limit(0), None);
    assert_eq!(TenantLimits::limit(5), Some(5));
    // Removing the old password from the config ends it at the reload,
    // even though it is cached.
    let mut c = c0.clone();
    c.tenants[0].credentials.remove(0);
    let r2 = r.reload(&c).unwrap();
    assert_eq!(
        r2.authenticate(b"acme-app", b"old-secret").unwrap_err(),
        AuthError::InvalidCredentials
    );
    // The remaining credential is still answered from the cache.
    let slow = r2.auth_stats().slow_verifications;
    r2.authenticate(b"acme-app", b"new-secret").unwrap();
    assert_eq!(r2.auth_stats().slow_verifications, slow);
}

#[test]
fn cache_hit_path_is_one_hmac() {
    let r = TenantRegistry::with_settings(&config(), settings()).unwrap();
    assert!(r.authenticate_cached(b"globex", b"hunter2").is_none());
    let t = Instant::now();
    r.authenticate(b"globex", b"hunter2").unwrap();
    let slow = t.elapsed();
    let before = r.auth_stats();
    assert_eq!(before.slow_verifications, 1);
    let n = 2000u32;
    let t = Instant::now();
    for _ in 0..n {
        r.authenticate(b"globex", b"hunter2").unwrap();
    }
    let cached = t.elapsed() / n;
    let via_cached = r
        .authenticate_cached(b"globex", b"hunter2")
        .unwrap()
        .unwrap();
    assert_eq!(&*via_cached.tenant.name, "globex");
    let after = r.auth_stats();
    assert_eq!(after.slow_verifications, 1, "cache hits ran PBKDF2");
    assert_eq!(after.cache_hits - before.cache_hits, u64::from(n) + 1);
    println!(
        "first verify ({} iterations): {slow:?}; cached verify: {cached:?} \
         (debug builds are ~10-30x slower than release)",
        password::MIN_ITERATIONS
    );
}

#[test]
fn wrong_password_is_remembered_for_a_while() {
    let r = TenantRegistry::with_settings(
        &config(),
        AuthSettings {
            failure_ttl: Duration::from_millis(300),
            ..settings()
        },
    )
    .unwrap();
    assert_eq!(
        r.authenticate(b"globex", b"guess").unwrap_err(),
        AuthError::InvalidCredentials
    );
    assert_eq!(r.auth_stats().slow_verifications, 1);
    for _ in 0..100 {
        assert_eq!(
            r.authenticate_cached(b"globex", b"guess")
                .unwrap()
                .unwrap_err(),
            AuthError::InvalidCredentials
        );
        assert_eq!(
            r.authenticate(b"globex", b"guess").unwrap_err(),
            AuthError::InvalidCredentials
        );
    }
    let s = r.auth_stats();
    assert_eq!(s.slow_verifications, 1);
    assert_eq!(s.failure_cache_hits, 200);
    // The right password is not blocked by the remembered wrong one.
    r.authenticate(b"globex", b"hunter2").unwrap();
    // After the TTL the wrong password is computed again.
    std::thread::sleep(Duration::from_millis(350));
    assert!(r.authenticate_cached(b"globex", b"guess").is_none());
    r.authenticate(b"globex", b"guess").unwrap_err();
    assert_eq!(r.auth_stats().slow_verifications, 3);
}

#[test]
fn slow_verifications_are_bounded() {
    let r = TenantRegistry::with_settings(
        &config(),
        AuthSettings {
            max_slow: 1,
            ..settings()
        },
    )
    .unwrap();
    r.authenticate(b"globex", b"hunter2").unwrap();
    // Hold the only slot, as a long verification would.
    let slot = r.verifier.try_slot().unwrap();
    assert!(r.verifier.try_slot().is_none());
    let t = Instant::now();
    assert_eq!(
        r.authenticate(b"acme-app", b"new-secret").unwrap_err(),
        AuthError::Busy
    );
    assert_eq!(
        r.authenticate(b"globex", b"wrong").unwrap_err(),
        AuthError::Busy
    );
    println!("busy answer took {:?}", t.elapsed());
    // Remembered passwords are still answered.
    r.authenticate(b"globex", b"hunter2").unwrap();
    assert_eq!(r.auth_stats().busy, 2);
    // Busy is not remembered as a failure.
    drop(slot);
    r.authenticate(b"acme-app", b"new-secret").unwrap();

    // With no slots at all, nothing uncached is ever computed.
    let none = TenantRegistry::with_settings(
        &config(),
        AuthSettings {
            max_slow: 0,
            ..settings()
        },
    )
    .unwrap();
    assert_eq!(
        none.authenticate(b"globex", b"hunter2").unwrap_err(),
        AuthError::Busy
    );
    assert_eq!(none.auth_stats().slow_verifications, 0);
}

#[test]
fn concurrent_wrong_passwords_never_exceed_the_bound() {
    let r = Arc::new(
        TenantRegistry::with_settings(
            &config(),
            AuthSettings {
                max_slow: 2,
                ..settings()
            },
        )
        .unwrap(),
    );
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let results: Vec<_> = (0..threads)
        .map(|i| {
            let (r, barrier) = (r.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                r.authenticate(b"globex", format!("wrong-{i}").as_bytes())
                    .unwrap_err()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let s = r.auth_stats();
    assert!(
        results
            .iter()
            .all(|e| matches!(e, AuthError::InvalidCredentials | AuthError::Busy))
    );
    assert_eq!(s.slow_verifications + s.busy, threads as u64);
    assert!(r.verifier.try_slot().is_some(), "slots leaked");
    println!("8 concurrent wrong passwords, bound 2: {s:?}");
}

#[test]
fn identical_concurrent_attempts_share_one_verification() {
    let r = Arc::new(
        TenantRegistry::with_settings(
            &config(),
            AuthSettings {
                max_slow: 1,
                ..settings()
            },
        )
        .unwrap(),
    );
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (r, barrier) = (r.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                r.authenticate(b"acme-app", b"new-secret")
            })
        })
        .collect();
    for h in handles {
        let id = h
            .join()
            .unwrap()
            .expect("a storm of one credential all succeeds");
        assert_eq!(&*id.tenant.name, "acme");
    }
    let s = r.auth_stats();
    assert_eq!(s.slow_verifications, 1, "{s:?}");
    assert_eq!(s.busy, 0, "{s:?}");
    println!("storm of 8 identical logins: {s:?}");
}

#[test]
fn reload_keeps_generations_and_cache() {
    let c = config();
    let r = TenantRegistry::with_settings(&c, settings()).unwrap();
    r.authenticate(b"globex", b"hunter2").unwrap();
    let acme = r.tenant("acme").unwrap().clone();
    let old_key = acme.namespace.backend_key(b"k").unwrap();
    acme.namespace.flush(None);
    let new_key = acme.namespace.backend_key(b"k").unwrap();

    let shared = SharedRegistry::new(r);
    let before = shared.load();
    shared.reload(&c).unwrap();
    let after = shared.load();
    assert!(!Arc::ptr_eq(&before, &after));
    let acme2 = after.tenant("acme").unwrap();
    // The flush survives the reload.
    assert_eq!(acme2.namespace.client_key(&old_key), None);
    assert_eq!(acme2.namespace.backend_key(b"k").unwrap(), new_key);
    // The cache too: no new PBKDF2 for a known-good password.
    after.authenticate(b"globex", b"hunter2").unwrap();
    assert_eq!(after.auth_stats().slow_verifications, 1);
    // Sessions holding the old registry keep working.
    before.authenticate(b"globex", b"hunter2").unwrap();
}

#[test]
fn reload_refreshes_sessions_by_credential() {
    let c = config();
    let shared = SharedRegistry::new(TenantRegistry::with_settings(&c, settings()).unwrap());
    let r = shared.load();
    let old = r.authenticate(b"acme-app", b"old-secret").unwrap();
    let new = r.authenticate(b"acme-app", b"new-secret").unwrap();
    let ro = r.authenticate(b"acme-ro", b"reader").unwrap();
    let gx = r.authenticate(b"globex", b"hunter2").unwrap();
    let v0 = shared.version();

    // Rotation finished: the old password goes; the reader may now write;
    // globex moves under another tenant name.
    let mut next = c.clone();
    next.tenants[0].credentials.remove(0);
    next.tenants[0].credentials[1].read_only = false;
    next.tenants[1].name = "globex-2".into();
    shared.reload(&next).unwrap();
    assert_ne!(shared.version(), v0, "a reload must be noticeable");
    let r = shared.load();
    assert!(r.refresh(&old).is_none(), "revoked password still served");
    let kept = r.refresh(&new).expect("unchanged credential kept");
    assert_eq!(kept.credential, new.credential);
    assert!(
        !Arc::ptr_eq(&kept, &new),
        "identity comes from the new registry"
    );
    assert!(
        !r.refresh(&ro).unwrap().read_only,
        "read-only flag refreshed"
    );
    assert!(r.refresh(&gx).is_none(), "a session never changes tenant");

    // Only tenants a session can be have keys, and so markers to sync.
    let served: Vec<String> = r
        .served_tenants()
        .iter()
        .map(|t| t.name.to_string())
        .collect();
    assert_eq!(served, ["acme", "globex-2"]);
    assert_eq!(TenantRegistry::open().served_tenants().len(), 1);

    // Re-hashing a password is a new credential: its sessions log in again.
    let mut rehashed = next.clone();
    rehashed.tenants[0].credentials[0] = cred("acme-app", "new-secret", false);
    shared.reload(&rehashed).unwrap();
    assert!(shared.load().refresh(&new).is_none());

    // Open to authenticated and back: every session starts over.
    let open = SharedRegistry::new(TenantRegistry::open());
    let anon = open.load().open_identity().unwrap();
    open.reload(&c).unwrap();
    assert!(open.load().refresh(&anon).is_none());
    assert!(TenantRegistry::open().refresh(&new).is_none());
    assert!(TenantRegistry::open().refresh(&anon).is_some());
}

#[test]
fn raw_key_mode_is_the_open_tenants_and_fixed_at_start() {
    let raw_config = || {
        let mut c = Config::default();
        c.proxy.keys = KeyMode::Raw;
        c.validate().unwrap();
        c
    };
    let is_raw = |r: &TenantRegistry| r.open_identity().unwrap().tenant.namespace.is_raw();
    for r in [
        TenantRegistry::open_with_keys(KeyMode::Raw),
        TenantRegistry::from_config(&raw_config()).unwrap(),
    ] {
        assert!(!r.requires_auth());
        assert_eq!(r.key_mode(), KeyMode::Raw);
        assert!(is_raw(&r));
        assert_eq!(r.served_tenants().len(), 1);
    }
    assert_eq!(TenantRegistry::open().key_mode(), KeyMode::Namespaced);
    assert!(!is_raw(&TenantRegistry::open()));

    // Started raw: a reload to namespaced keys keeps them raw, and so does
    // one that adds tenants and then takes them away again.
    let shared = SharedRegistry::new(TenantRegistry::from_config(&raw_config()).unwrap());
    shared.reload(&Config::default()).unwrap();
    assert!(is_raw(&shared.load()));
    shared.reload(&config()).unwrap();
    let with_tenants = shared.load();
    assert!(with_tenants.requires_auth());
    assert!(with_tenants.tenants().iter().all(|t| !t.namespace.is_raw()));
    shared.reload(&Config::default()).unwrap();
    assert!(is_raw(&shared.load()));

    // Started namespaced: a file that says raw changes nothing until a
    // restart, with or without tenants in between.
    let shared = SharedRegistry::new(TenantRegistry::from_config(&config()).unwrap());
    shared.reload(&raw_config()).unwrap();
    assert_eq!(shared.load().key_mode(), KeyMode::Namespaced);
    assert!(!is_raw(&shared.load()));
    let shared = SharedRegistry::new(TenantRegistry::open());
    shared.reload(&raw_config()).unwrap();
    assert!(!is_raw(&shared.load()));
}

#[test]
fn namespaces_isolate_tenants() {
    let r = TenantRegistry::with_settings(&config(), settings()).unwrap();
    let a = &r.tenant("acme").unwrap().namespace;
    let g = &r.tenant("globex").unwrap().namespace;
    let i = &r.tenant("initech").unwrap().namespace;
    for key in [&b"k"[..], b"gx:0000000:k", b"acme:0000000:k"] {
        let ka = a.backend_key(key).unwrap();
        assert_eq!(g.client_key(&ka), None);
        assert_eq!(i.client_key(&ka), None);
        let kg = g.backend_key(key).unwrap();
        assert!(kg.starts_with(b"gx:"));
        assert_eq!(a.client_key(&kg), None);
        // Flushing acme leaves globex's keys alone.
        a.flush(None);
        assert_eq!(g.client_key(&kg).unwrap(), key);
        assert_eq!(a.client_key(&ka), None);
    }
}

#[test]
fn hash_password_command() {
    let out = hash_password_from(&mut &b"s3cret\n"[..], password::MIN_ITERATIONS).unwrap();
    let h: PasswordHash = out.parse().unwrap();
    assert!(h.verify(b"s3cret"));
    let out = hash_password_from(&mut &b"with space\r\n"[..], password::MIN_ITERATIONS).unwrap();
    assert!(out.parse::<PasswordHash>().unwrap().verify(b"with space"));
    assert!(hash_password_from(&mut &b"\n"[..], password::MIN_ITERATIONS).is_err());
    assert!(hash_password_from(&mut &b"x"[..], 10).is_err());
}

#[test]
fn config_accepts_tenant_credentials() {
    let h = hash("pw");
    let c = Config::parse(&format!(
        r#"
        [[tenant]]
        name = "acme"
        namespace = "a1"
        max_connections = 100
        max_requests_per_sec = 5000
        max_bytes_per_sec = 10000000
        max_in_flight = 256
        credentials = [
            {{ username = "acme", password_hash = "{h}" }},
            {{ username = "acme-ro", password_hash = "{h}", read_only = true }},
        ]

        [[tenant]]
        name = "globex"
        [[tenant.credentials]]
        username = "globex"
        password_hash = "{h}"
        "#
    ))
    .unwrap();
    c.validate().unwrap();
    let t = &c.tenants[0];
    assert_eq!(t.namespace(), "a1");
    assert_eq!(c.tenants[1].namespace(), "globex");
    assert_eq!(t.credentials.len(), 2);
    assert!(t.credentials[1].read_only);
    assert!(!t.credentials[0].read_only);
    assert_eq!(t.max_connections, 100);
    assert_eq!(t.max_in_flight, Some(256));
    let r = TenantRegistry::from_config(&c).unwrap();
    assert!(r.authenticate(b"acme-ro", b"pw").unwrap().read_only);
    assert_eq!(r.tenant("acme").unwrap().limits.max_requests_per_sec, 5000);
    // Printing the config (`guard run --check`) and reading it back.
    let text = toml::to_string_pretty(&c).unwrap();
    assert_eq!(Config::parse(&text).unwrap(), c);
    // Unknown credential fields are refused.
    let e = Config::parse(
        "[[tenant]]\nname = \"a\"\ncredentials = [{ username = \"a\", password = \"x\" }]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown field `password`"), "{e}");
}

#[test]
fn config_rejects_bad_tenants() {
    let h = hash("pw");
    let tenant = |name: &str, ns: Option<&str>, users: &[&str]| TenantConfig {
        name: name.into(),
        namespace: ns.map(Into::into),
        credentials: users
            .iter()
            .map(|u| CredentialConfig {
                username: (*u).into(),
                password_hash: h.clone(),
                read_only: false,
            })
            .collect(),
        ..Default::default()
    };
    let check = |tenants: Vec<TenantConfig>| {
        let c = Config {
            tenants,
            ..Default::default()
        };
        c.validate().map_err(|e| format!("{e:#}"))
    };
    check(vec![tenant("a", None, &["u1"]), tenant("b", None, &["u2"])]).unwrap();
    let cases: Vec<(Vec<TenantConfig>, &str)> = vec![
        // Namespaces.
        (vec![tenant("a", Some("x y"), &[])], "space or control"),
        (vec![tenant("a", Some("x\ty"), &[])], "space or control"),
        (vec![tenant("a", Some(""), &[])], "1 to 40 bytes"),
        (
            vec![tenant("a", Some(&"n".repeat(41)), &[])],
            "1 to 40 bytes",
        ),
        (
            vec![
                tenant("a", Some("shared"), &[]),
                tenant("b", Some("shared"), &[]),
            ],
            "share the namespace",
        ),
        (
            vec![tenant("a", Some("ac"), &[]), tenant("b", Some("acme"), &[])],
            "prefix of the other",
        ),
        (
            // A default namespace (the name) colliding with an explicit one.
            vec![tenant("acme", None, &[]), tenant("b", Some("acme-eu"), &[])],
            "prefix of the other",
        ),
        // Usernames.
        (
            vec![tenant("a", None, &["u"]), tenant("b", None, &["u"])],
            "unique across tenants",
        ),
        (vec![tenant("a", None, &["bad user"])], "space or control"),
        (vec![tenant("a", None, &[""])], "username of 0 bytes"),
        (
            vec![tenant("a", None, &["u", "u"])],
            "same password_hash twice",
        ),
        (
            vec![TenantConfig {
                credentials: (0..5)
                    .map(|i| cred("u", &format!("pw{i}"), false))
                    .collect(),
                ..tenant("a", None, &[])
            }],
            "more than 4",
        ),
        // Names (existing rule).
        (vec![tenant("bad name", None, &[])], "bad tenant name"),
    ];
    for (tenants, want) in cases {
        let e = check(tenants.clone()).expect_err(want);
        assert!(e.contains(want), "{e} (wanted {want})");
    }
    // Malformed hashes are refused as the file is read, where they stand.
    let e = Config::parse(
        "[[tenant]]\nname = \"a\"\ncredentials = [{ username = \"u\", password_hash = \"md5$abc\" }]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("line 3") && e.contains("expected `pbkdf2-sha256$"),
        "{e}"
    );
    // Absurd budgets.
    let mut t = tenant("a", None, &[]);
    t.max_in_flight = Some(u64::MAX);
    assert!(check(vec![t]).unwrap_err().contains("max_in_flight"));
}

#[test]
fn budgets_default_to_the_proxys_and_divide_by_hosts() {
    let mut c = Config::parse(
        r#"
        [proxy]
        max_requests_per_sec = 1000
        requests_burst = 3000
        max_bytes_per_sec = 1048576
        max_in_flight = 64
        hosts = 3

        [[tenant]]
        name = "inherits"
        max_connections = 10

        [[tenant]]
        name = "own-rate"
        max_requests_per_sec = 500

        [[tenant]]
        name = "unlimited"
        max_requests_per_sec = 0
        max_bytes_per_sec = 0
        max_in_flight = 0

        [[tenant]]
        name = "own-burst"
        requests_burst = 7
        bytes_burst = 1
        "#,
    )
    .unwrap();
    c.validate().unwrap();
    let limits = |c: &Config, i: usize| TenantLimits::resolve(Some(&c.tenants[i]), &c.proxy);
    // [proxy]'s pair, a third of each, rounded up.
    assert_eq!(
        limits(&c, 0),
        TenantLimits {
            max_connections: 4,
            max_requests_per_sec: 334,
            requests_burst: 1000,
            max_bytes_per_sec: 349_526,
            bytes_burst: 349_526,
            max_in_flight: 22,
        }
    );
    // Its own rate: one second of it, not [proxy]'s burst.
    let own = limits(&c, 1);
    assert_eq!((own.max_requests_per_sec, own.requests_burst), (167, 167));
    assert_eq!(own.max_in_flight, 22);
    // 0 is unlimited, whatever [proxy] says.
    let free = limits(&c, 2);
    assert_eq!(
        (
            free.max_requests_per_sec,
            free.max_bytes_per_sec,
            free.max_in_flight
        ),
        (0, 0, 0)
    );
    // Its own burst with [proxy]'s rate; a share never rounds to 0.
    let burst = limits(&c, 3);
    assert_eq!((burst.max_requests_per_sec, burst.requests_burst), (334, 3));
    assert_eq!((burst.max_bytes_per_sec, burst.bytes_burst), (349_526, 1));
    assert_eq!(crate::config::per_host(1, 10_000), 1);
    assert_eq!(crate::config::per_host(0, 3), 0);
    assert_eq!(crate::config::per_host(10, 1), 10);
    // The open tenant takes [proxy]'s.
    c.tenants.clear();
    let open = TenantRegistry::from_config(&c).unwrap();
    assert_eq!(open.open_identity().unwrap().tenant.limits, limits_of(&c));
    assert_eq!(
        TenantRegistry::open_for(&c.proxy)
            .open_identity()
            .unwrap()
            .tenant
            .limits
            .max_requests_per_sec,
        334
    );
    // A file without budgets means what it always did: unlimited.
    let old = Config::parse("[[tenant]]\nname = \"a\"\nmax_connections = 5\n").unwrap();
    assert_eq!(
        limits(&old, 0),
        TenantLimits {
            max_connections: 5,
            ..Default::default()
        }
    );
    assert_eq!(
        TenantRegistry::open().tenants()[0].limits,
        TenantLimits::default()
    );
}

fn limits_of(c: &Config) -> TenantLimits {
    TenantLimits::resolve(None, &c.proxy)
}

#[test]
fn a_reload_changes_the_open_tenants_budgets_and_keeps_its_keys() {
    let mut c = Config::default();
    c.proxy.max_requests_per_sec = 100;
    let shared = SharedRegistry::new(TenantRegistry::from_config(&c).unwrap());
    let before = shared.load().open_identity().unwrap();
    before.tenant.namespace.flush(None);
    let generation = before.tenant.namespace.generation();
    // Unchanged: the very same tenant.
    shared.reload(&c).unwrap();
    let same = shared.load().refresh(&before).unwrap();
    assert!(Arc::ptr_eq(&same.tenant, &before.tenant));
    // Changed: new limits, the same key space and flush generation.
    c.proxy.max_requests_per_sec = 200;
    shared.reload(&c).unwrap();
    let after = shared.load().refresh(&before).unwrap();
    assert_eq!(after.tenant.limits.max_requests_per_sec, 200);
    assert_eq!(after.tenant.id, before.tenant.id);
    assert_eq!(after.tenant.namespace.generation(), generation);
    after.tenant.namespace.flush(None);
    assert_ne!(before.tenant.namespace.generation(), generation);
}

#[test]
fn budget_settings_are_bounded_with_a_clear_message() {
    let base =
        "[proxy]\nlisten = [\"127.0.0.1:11311\"]\nbackends = [{ addr = \"10.0.0.5:11211\" }]\n";
    let c = Config::parse(base).unwrap();
    c.validate().unwrap();
    assert_eq!(
        (
            c.proxy.max_requests_per_sec,
            c.proxy.requests_burst,
            c.proxy.max_bytes_per_sec,
            c.proxy.bytes_burst,
            c.proxy.max_in_flight,
            c.proxy.hosts
        ),
        (0, None, 0, None, 0, 1)
    );
    for (line, wanted) in [
        ("hosts = 0", "hosts must be 1..=10000, got 0"),
        ("hosts = 10001", "hosts must be 1..=10000, got 10001"),
        (
            "max_requests_per_sec = 1000000001",
            "max-requests-per-sec must be 0..=1000000000 (0 means unlimited), got 1000000001",
        ),
        (
            "max_bytes_per_sec = 1099511627777",
            "max-bytes-per-sec must be 0..=1099511627776",
        ),
        (
            "max_in_flight = 10000001",
            "max-in-flight must be 0..=10000000",
        ),
        (
            "requests_burst = 0",
            "requests-burst must be 1..=1000000000 (leave it out for one second of the rate), got 0",
        ),
        ("bytes_burst = 0", "bytes-burst must be 1..=1099511627776"),
    ] {
        let e = Config::parse(&format!("{base}{line}\n"))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains(wanted), "{line}: {e} (wanted {wanted})");
    }
    for (line, wanted) in [
        (
            "max_requests_per_sec = 1000000001",
            "tenant `a` max_requests_per_sec must be 0..=1000000000 (0 means unlimited)",
        ),
        (
            "requests_burst = 0",
            "tenant `a` requests_burst must be 1..",
        ),
        ("bytes_burst = 0", "tenant `a` bytes_burst must be 1.."),
        (
            "max_connections = 10000001",
            "tenant `a` max_connections must be 0..=10000000",
        ),
    ] {
        let e = Config::parse(&format!("[[tenant]]\nname = \"a\"\n{line}\n"))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains(wanted), "{line}: {e} (wanted {wanted})");
    }
    let e = Config::parse("[[tenant]]\nname = \"a\"\nmax_in_flight = -1\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_in_flight"), "{e}");
    // Printed by `--check` and read back.
    let c = Config::parse(&format!(
        "{base}max_requests_per_sec = 5\nbytes_burst = 9\nhosts = 2\n[[tenant]]\nname = \"a\"\nmax_in_flight = 3\n"
    ))
    .unwrap();
    let text = toml::to_string_pretty(&c).unwrap();
    assert_eq!(Config::parse(&text).unwrap(), c);
}
