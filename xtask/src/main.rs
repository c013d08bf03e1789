//! `cargo xtask`: guard's developer and CI entry point.
//!
//! - `demo`: the incident of `DESIGN.md` replayed twice on this machine,
//!   before (nutcracker, no XDP) and after (guard: XDP and proxy with
//!   tenants), with the same clients, backends and script: calm, a noisy
//!   tenant, a slow node, a reconnect storm beside a spoofed SYN flood,
//!   recovery. Prints a table per phase, writes charts (SVG), the figures
//!   (JSON) and with `--html` a page; `--quick` is the short script CI
//!   runs with `--check`. Root; removes everything it creates. The logic
//!   lives in the tests crate (`tests/src/demo/`, `tests/src/bin/demo.rs`).
//! - `setup`: installs what building and testing need on a fresh Debian
//!   machine (nightly `rust-src`, `bpf-linker` against the nightly's LLVM,
//!   Debian packages). Every other command runs it first; it is quick when
//!   everything is present.
//! - `test`: every test tier — unprivileged unit tests and a bounded run of
//!   each fuzz target from its corpus in the repository, then (as root)
//!   the kernel and end-to-end tests one at a time, then `demo --quick
//!   --check`, then each benchmark once in its reduced (`--quick`) mode.
//! - `run`: builds guard and runs it on the given interface, or on a demo
//!   veth pair it creates and removes: the interactive playground.
//! - `bench`: benchmarks (`bench xdp`, `bench proxy`, all by default),
//!   written to `BENCHMARKS.md`; `test` runs each once with `--quick`.
//!   `bench flood` (root) floods guard, nftables and syncookies alone live.
//! - `fuzz`: the protocol parsers under libFuzzer, checking their contract.
//! - `install`: the release binary, the systemd unit, the example config
//!   and the operator docs ([`install`]).

mod install;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// Debian packages the tests use.
const DEBIAN_PACKAGES: &[&str] = &[
    "memcached",
    "nutcracker",
    "libmemcached-tools",
    "iproute2",
    "hping3",
    "netsniff-ng",
    // The flood benchmark's per-source limit to compare guard with.
    "nftables",
    "tcpdump",
    "ethtool",
    // The status page's test loads it in a real headless browser.
    "chromium",
    // promtool checks the alert rules and the scrape config in docs/.
    "prometheus",
];

/// Python packages the tests drive guard with: memcache clients
/// (pymemcache: text; python-binary-memcached: binary and SASL PLAIN) and
/// Prometheus's own parser of the exposition `/metrics` serves.
const PIP_PACKAGES: &[&str] = &["pymemcache", "python-binary-memcached", "prometheus-client"];

#[derive(Parser)]
#[command(name = "xtask", about = "guard's developer and CI tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Replay the incident before (nutcracker) and after (guard), side by side (root).
    Demo {
        /// The short script (about 40 s instead of 2 min), as CI runs it.
        #[arg(long)]
        quick: bool,
        /// Where the charts go (SVG); the figures (JSON) and the page go beside it.
        #[arg(long, default_value = "demo/report.svg")]
        out: PathBuf,
        /// Also write an HTML page holding the tables and the charts.
        #[arg(long)]
        html: bool,
        /// Exit non-zero when "after" does not beat "before" where the checks demand it.
        #[arg(long)]
        check: bool,
        /// Run "after" without one mechanism, to see which check catches it.
        #[arg(long, value_name = "budgets|ejection|xdp")]
        after_without: Option<String>,
    },
    /// Install build and test prerequisites.
    Setup,
    /// Run every test tier (privileged tiers need root).
    Test {
        /// Skip the privileged kernel and end-to-end tests.
        #[arg(long)]
        unprivileged: bool,
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Build and run `guard run`; without --iface, on a demo veth pair.
    Run {
        /// Arguments for `guard run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the protocol parsers with cargo-fuzz (libFuzzer, nightly).
    Fuzz {
        /// `requests` or `responses`; both when omitted.
        target: Option<String>,
        /// How long to fuzz each target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run the benchmarks and write BENCHMARKS.md.
    Bench {
        /// Which: `proxy`, `xdp`, `all` (the default; both) or `flood`.
        which: Option<String>,
        /// A reduced run that only checks the benchmark still works; its
        /// report goes to target/bench-quick, not BENCHMARKS.md.
        #[arg(long)]
        quick: bool,
        /// Repeat each measurement this many times.
        #[arg(long)]
        runs: Option<usize>,
    },
    /// Install the release binary, the systemd unit, the example config
    /// and the operator docs (see docs/operations.md).
    Install(install::InstallArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    env::set_current_dir(&root)?;
    prepend_cargo_bin_to_path();
    match cli.command {
        Task::Demo {
            quick,
            out,
            html,
            check,
            after_without,
        } => {
            if !is_root() {
                bail!(
                    "the demo needs root: it creates network namespaces and veth pairs, attaches \
                     XDP and sends raw frames; run `cargo xtask demo` as root"
                );
            }
            setup()?;
            let mut args: Vec<String> = vec!["--out".into(), out.display().to_string()];
            args.extend(quick.then(|| "--quick".into()));
            args.extend(html.then(|| "--html".into()));
            args.extend(check.then(|| "--check".into()));
            if let Some(m) = after_without {
                args.extend(["--after-without".into(), m]);
            }
            demo(&args)
        }
        Task::Setup => setup(),
        Task::Test {
            unprivileged,
            filter,
        } => {
            setup()?;
            test(unprivileged, filter.as_deref())
        }
        Task::Run { args } => {
            setup()?;
            run(&args)
        }
        Task::Fuzz { target, seconds } => {
            setup()?;
            fuzz(target.as_deref(), seconds)
        }
        Task::Bench { which, quick, runs } => {
            setup()?;
            bench(which.as_deref().unwrap_or("all"), quick, runs)
        }
        Task::Install(args) => {
            // Building needs the toolchain, not the test prerequisites
            // `setup` adds: a missing bpf-linker fails the build, naming it.
            if !args.dry_run && args.binary.is_none() {
                check(Command::new("cargo").args(["build", "--release", "-p", "guard"])).context(
                    "building guard failed (`cargo xtask setup` installs what it needs)",
                )?;
            }
            install::install(&root, &args, &mut std::io::stdout())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// aya-build runs `rustup run nightly cargo`, so both must be on PATH.
fn prepend_cargo_bin_to_path() {
    if let Some(home) = env::var_os("HOME") {
        let bin = Path::new(&home).join(".cargo/bin");
        let path = env::var_os("PATH").unwrap_or_default();
        let mut parts: Vec<PathBuf> = env::split_paths(&path).collect();
        if !parts.contains(&bin) {
            parts.insert(0, bin);
            // SAFETY: single-threaded at this point.
            unsafe { env::set_var("PATH", env::join_paths(parts).expect("valid PATH")) };
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn status(cmd: &mut Command) -> anyhow::Result<ExitStatus> {
    eprintln!("xtask: {cmd:?}");
    cmd.status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))
}

fn check(cmd: &mut Command) -> anyhow::Result<()> {
    let st = status(cmd)?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn setup() -> anyhow::Result<()> {
    // The nightly toolchain builds the XDP program.
    if !quiet_ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        check(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let sysroot = capture(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let sysroot = PathBuf::from(sysroot.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        check(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    // It links against the nightly's own libLLVM, which rustc puts on the
    // library path when it runs the linker: ask the same way.
    if !quiet_ok(
        Command::new("bpf-linker")
            .arg("--version")
            .env("LD_LIBRARY_PATH", sysroot.join("lib")),
    ) {
        install_bpf_linker(&sysroot)?;
    }
    // The fuzz targets run in every test pass.
    if !quiet_ok(Command::new("cargo").args(["+nightly", "fuzz", "--version"])) {
        check(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_ok_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing Debian packages {}: run `cargo xtask setup` as root",
                missing.join(" ")
            );
        }
        check(Command::new("apt-get").args(["update", "-qq"]))?;
        check(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        // The packaged services are started by the tests themselves, or
        // not at all (prometheus is here for promtool).
        for svc in ["memcached", "nutcracker", "prometheus"] {
            let _ = Command::new("systemctl")
                .args(["disable", "--now", svc])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    if !quiet_ok(
        Command::new("python3").args(["-c", "import pymemcache, bmemcached, prometheus_client"]),
    ) {
        let pip = || {
            let mut c = Command::new("python3");
            c.args(["-m", "pip", "install", "--quiet"])
                .args(PIP_PACKAGES);
            c
        };
        // Debian's own python3 refuses pip outside a venv (PEP 668).
        if !quiet_ok(&mut pip()) {
            check(pip().arg("--break-system-packages"))?;
        }
    }
    Ok(())
}

/// bpf-linker must use the very LLVM that rustc nightly emits bitcode for.
/// No prebuilt binary can be fetched, so build it against the libLLVM that
/// ships inside the nightly toolchain.
fn install_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let version = capture(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV prints no LLVM version")?
        .to_string();
    let prefix = env::temp_dir().join(format!("guard-llvm-prefix-{}", std::process::id()));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let file_name = llvm.file_name().expect("file name");
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(file_name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)?;
    }
    let result = check(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    );
    let _ = std::fs::remove_dir_all(&prefix);
    result.context("building bpf-linker against the nightly toolchain's LLVM failed")
}

fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn test(unprivileged: bool, filter: Option<&str>) -> anyhow::Result<()> {
    // Tier 1: everything that needs no privileges.
    let mut unit = Command::new("cargo");
    unit.args([
        "test",
        "--workspace",
        "--exclude",
        "guard-tests",
        "--exclude",
        "guard-ebpf",
    ]);
    if let Some(f) = filter {
        unit.arg(f);
    }
    check(&mut unit)?;
    // A filter asks for some tests, not for the fuzzers.
    if filter.is_none() {
        for target in FUZZ_TARGETS {
            fuzz_target(target, FUZZ_SECONDS_IN_TESTS)?;
        }
    }
    if unprivileged {
        if filter.is_none() {
            bench("proxy", true, None)?;
        }
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the kernel and end-to-end tests need root (BPF, XDP, network namespaces): \
             run as root, or pass --unprivileged"
        );
    }
    remove_stale_test_objects();
    // Tiers 2 and 3: one test at a time, since they share the kernel. The
    // release build keeps flood generators fast enough to matter; the
    // end-to-end tests run the real binary.
    check(Command::new("cargo").args(["build", "--release", "-p", "guard"]))?;
    let mut privileged = Command::new("cargo");
    privileged.args(["test", "--release", "-p", "guard-tests"]);
    privileged.arg("--");
    if let Some(f) = filter {
        privileged.arg(f);
    }
    privileged.arg("--test-threads=1");
    check(&mut privileged)?;
    // Last, the incident replayed: its figures must show guard beating
    // nutcracker where the incident hurt (`tests/src/demo/checks.rs`).
    if filter.is_none_or(|f| "demo".contains(f)) {
        let dir = env::temp_dir().join(format!("gt-demo-{}", std::process::id()));
        let out = dir.join("report.svg");
        let args = [
            "--quick".to_string(),
            "--check".into(),
            "--out".into(),
            out.display().to_string(),
        ];
        demo(&args).with_context(|| {
            format!(
                "the demo's checks failed; its report is in {}",
                dir.display()
            )
        })?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    // Every benchmark once, reduced, so none stops working unnoticed;
    // nothing about speed is asserted.
    if filter.is_none() {
        bench("all", true, None)?;
    }
    Ok(())
}

/// Builds guard and the demo (release) and runs the demo with `args`,
/// after removing what a killed earlier run may have left. Ctrl-C goes
/// to the demo, which stops its phases and removes what it created.
fn demo(args: &[String]) -> anyhow::Result<()> {
    remove_stale_test_objects();
    check(Command::new("cargo").args(["build", "--release", "-p", "guard"]))?;
    check(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "guard-tests",
        "--bin",
        "demo",
    ]))?;
    // SAFETY: installing SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let st = status(Command::new(workspace_root().join("target/release/demo")).args(args));
    // SAFETY: restoring the default disposition has no preconditions.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    let st = st?;
    if st.code() == Some(130) {
        // Interrupted: the demo said so and removed what it created.
        std::process::exit(130);
    }
    if !st.success() {
        bail!("the demo failed ({st})");
    }
    Ok(())
}

/// Test namespaces, pin directories and temp files are named
/// `gt-<tag>-<pid>-<n>`; a test process killed outright (or a test that
/// panicked before its clean-up) cannot remove its own, so remove those
/// whose process is gone before starting.
fn remove_stale_test_objects() {
    let dead = |name: &str| -> bool {
        let mut parts = name.split('-');
        parts.next() == Some("gt")
            && parts
                .nth(1)
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let tmp = env::temp_dir();
    for (dir, is_netns) in [
        (Path::new("/run/netns"), true),
        (Path::new("/sys/fs/bpf"), false),
        (tmp.as_path(), false),
    ] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !dead(&name) {
                continue;
            }
            eprintln!(
                "xtask: removing {}, left by a test process that no longer runs",
                e.path().display()
            );
            if is_netns {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            } else if e.path().is_dir() {
                let _ = std::fs::remove_dir_all(e.path());
            } else {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    check(Command::new("cargo").args(["build", "--release", "-p", "guard"]))?;
    let guard = workspace_root().join("target/release/guard");
    if args
        .iter()
        .any(|a| a == "--iface" || a.starts_with("--iface="))
    {
        check(Command::new(&guard).arg("run").args(args))?;
        return Ok(());
    }
    if !is_root() {
        bail!("the demo creates a veth pair and attaches XDP: run as root");
    }
    // A demo veth pair whose far end sits in its own namespace.
    let pid = std::process::id();
    let ns = format!("guard-demo-{pid}");
    let iface = format!("gdemo{}", pid % 100_000);
    let peer = format!("gdpeer{}", pid % 100_000);
    let cleanup = Cleanup {
        ns: ns.clone(),
        iface: iface.clone(),
    };
    check(Command::new("ip").args(["netns", "add", &ns]))?;
    check(Command::new("ip").args([
        "link", "add", &iface, "type", "veth", "peer", "name", &peer, "netns", &ns,
    ]))?;
    check(Command::new("ip").args(["addr", "add", "10.211.0.1/24", "dev", &iface]))?;
    check(Command::new("ip").args(["link", "set", &iface, "up"]))?;
    check(Command::new("ip").args(["-n", &ns, "addr", "add", "10.211.0.2/24", "dev", &peer]))?;
    check(Command::new("ip").args(["-n", &ns, "link", "set", &peer, "up"]))?;
    // A real memcached behind the demo proxy.
    let backend_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let memcached = ChildKill(
        Command::new("memcached")
            .args(["-u", "root", "-l", "127.0.0.1", "-U", "0", "-p"])
            .arg(backend_port.to_string())
            .spawn()
            .context("cannot start memcached for the demo (cargo xtask setup installs it)")?,
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", backend_port)).is_err() {
        if std::time::Instant::now() > deadline {
            bail!("memcached did not start on 127.0.0.1:{backend_port}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!(
        "xtask: demo interface {iface} (10.211.0.1) ↔ namespace {ns} (10.211.0.2); \
         guard proxies 10.211.0.1:11211 to memcached on 127.0.0.1:{backend_port}. Try\n  \
         nsenter --net=/run/netns/{ns} memcslap --servers=10.211.0.1:11211 --concurrency=4 --execute-number=1000\n  \
         nsenter --net=/run/netns/{ns} hping3 -S -p 11211 --flood 10.211.0.1\n  \
         target/release/guard xdp status\n\
         Ctrl-C stops and removes it all"
    );
    // Ctrl-C reaches the whole process group: let guard handle it while
    // xtask lives on to remove the demo interface.
    // SAFETY: installing SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let mut cmd = Command::new(&guard);
    cmd.args(["run", "--iface", &iface, "--protect", "*:11211"])
        .args(["--listen", "10.211.0.1:11211", "--backend"])
        .arg(format!("127.0.0.1:{backend_port}"))
        .args(args);
    let st = status(&mut cmd)?;
    let _ = Command::new(&guard).args(["xdp", "detach"]).status();
    drop(memcached);
    drop(cleanup);
    if !st.success() {
        bail!("guard exited with {st}");
    }
    Ok(())
}

/// Kills and reaps a child process on drop.
struct ChildKill(std::process::Child);

impl Drop for ChildKill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cleanup {
    ns: String,
    iface: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.iface])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

const FUZZ_TARGETS: &[&str] = &["requests", "responses"];

/// How long `test` fuzzes each target.
const FUZZ_SECONDS_IN_TESTS: u64 = 30;

fn fuzz(target: Option<&str>, seconds: u64) -> anyhow::Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) if FUZZ_TARGETS.contains(&t) => vec![t],
        Some(t) => bail!(
            "unknown fuzz target `{t}`: try {}",
            FUZZ_TARGETS.join(" or ")
        ),
        None => FUZZ_TARGETS.to_vec(),
    };
    for t in targets {
        fuzz_target(t, seconds)?;
    }
    Ok(())
}

/// Fuzzes one target for `seconds`, starting from its corpus in the
/// repository (`guard/fuzz/corpus/<target>`). What it finds new goes to a
/// scratch directory, so runs leave the work tree as they found it; a
/// crashing input is kept under `guard/fuzz/artifacts/<target>`.
fn fuzz_target(target: &str, seconds: u64) -> anyhow::Result<()> {
    let fuzz_dir = workspace_root().join("guard/fuzz");
    let scratch = env::temp_dir().join(format!("gt-fuzz-{}-{target}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let result = check(
        Command::new("cargo")
            .current_dir(workspace_root().join("guard"))
            .args(["+nightly", "fuzz", "run", target])
            .arg(&scratch)
            .arg(fuzz_dir.join("corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}")),
    );
    let _ = std::fs::remove_dir_all(&scratch);
    result.with_context(|| format!("fuzz target `{target}` failed"))
}

/// A benchmark binary and how to run it. Every one takes `--quick` (a
/// reduced run that only shows it still works), `--runs N` and
/// `--charts DIR`, and prints its section of the report on stdout.
struct Benchmark {
    name: &'static str,
    binary: &'static str,
    needs_root: bool,
    /// Its section's title in `BENCHMARKS.md`.
    title: &'static str,
}

/// The benchmarks, in the order `BENCHMARKS.md` shows them.
const BENCHMARKS: &[Benchmark] = &[
    Benchmark {
        name: "proxy",
        binary: "bench-proxy",
        needs_root: false,
        title: "Proxy: guard beside nutcracker and memcached",
    },
    Benchmark {
        name: "xdp",
        binary: "bench-xdp",
        needs_root: true,
        title: "XDP: the cost of judging a frame",
    },
];

/// Live floods on a veth pair: guard beside nftables and syncookies alone
/// (`tests/src/bin/bench_flood.rs`, results in `docs/bench-xdp.md`).
fn bench_flood(quick: bool) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the flood benchmark creates namespaces and runs guard's XDP: run as root");
    }
    // It runs the real daemon, built like the benchmark.
    check(Command::new("cargo").args(["build", "--release", "-p", "guard"]))?;
    let args: Vec<String> = if quick {
        vec!["--quick".into()]
    } else {
        Vec::new()
    };
    print!("{}", run_bench_binary("bench-flood", &args)?);
    Ok(())
}

/// Where a full run's charts go, beside `BENCHMARKS.md`, which links them
/// by this name.
const CHARTS_DIR: &str = "benchmarks";

/// Runs the benchmarks `which` names. Each prints its section of the
/// report on stdout, kept under `target/bench/<name>.md`; a full run then
/// writes `BENCHMARKS.md` from every section there (a benchmark not run
/// this time keeps its last section) and its charts into `benchmarks/`.
/// A quick run writes under `target/bench-quick` (charts in `charts/`
/// there) and leaves `BENCHMARKS.md` alone.
fn bench(which: &str, quick: bool, runs: Option<usize>) -> anyhow::Result<()> {
    if which == "flood" {
        return bench_flood(quick);
    }
    let chosen: Vec<&Benchmark> = BENCHMARKS
        .iter()
        .filter(|b| which == "all" || which == b.name)
        .collect();
    if chosen.is_empty() {
        bail!("unknown benchmark `{which}`: try `proxy`, `xdp`, `all` or `flood`");
    }
    check(Command::new("cargo").args(["build", "--release", "-p", "guard"]))?;
    let dir = workspace_root().join(if quick {
        "target/bench-quick"
    } else {
        "target/bench"
    });
    std::fs::create_dir_all(&dir)?;
    // Charts are linked by the directory's own name, relative to the
    // Markdown that holds the section.
    let charts = if quick {
        dir.join("charts")
    } else {
        workspace_root().join(CHARTS_DIR)
    };
    for b in chosen {
        if b.needs_root && !is_root() {
            if which == "all" {
                eprintln!("xtask: skipping the {} benchmark: it needs root", b.name);
                continue;
            }
            bail!("the {} benchmark needs root", b.name);
        }
        let mut args: Vec<String> = Vec::new();
        if quick {
            args.push("--quick".into());
        }
        if let Some(n) = runs {
            args.extend(["--runs".into(), n.to_string()]);
        }
        args.extend(["--charts".into(), charts.display().to_string()]);
        let section = run_bench_binary(b.binary, &args)?;
        std::fs::write(dir.join(format!("{}.md", b.name)), &section)?;
        print!("{section}");
    }
    if !quick {
        write_report(&dir)?;
    }
    Ok(())
}

/// The machine the benchmarks ran on, as `lscpu` and the kernel name it:
/// CPU model, CPUs, kernel.
fn machine() -> String {
    let lscpu = capture(&mut Command::new("lscpu")).unwrap_or_default();
    let field = |name: &str| {
        lscpu
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map_or("unknown".to_string(), |v| v.trim().to_string())
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{}, {} CPUs ({} thread(s) per core), Linux {}",
        field("Model name"),
        field("CPU(s)"),
        field("Thread(s) per core"),
        kernel.trim()
    )
}

/// Writes `BENCHMARKS.md` from the sections under `dir`.
fn write_report(dir: &Path) -> anyhow::Result<()> {
    let mut out = format!(
        "# Benchmarks\n\n\
         Machine: {}.\n\n\
         Written by `cargo xtask bench` (every benchmark; `cargo xtask bench proxy` or \
         `cargo xtask bench xdp` for one, `--runs N` to repeat more; the XDP benchmark needs \
         root). Absolute figures differ several times between machines of the same kind and \
         with whatever else runs beside them; each table therefore carries its references, \
         measured in the same run, and a figure repeated over runs is shown as its range and \
         median, never its best. Charts are in `{CHARTS_DIR}/`. `cargo xtask test` runs each \
         benchmark once in a reduced mode (`--quick`) so none stops working unnoticed; that \
         run asserts nothing about speed. Live SYN floods against nftables and syncookies \
         alone (`cargo xtask bench flood`, root) are in \
         [docs/bench-xdp.md](docs/bench-xdp.md).\n\n",
        machine()
    );
    for b in BENCHMARKS {
        let Ok(section) = std::fs::read_to_string(dir.join(format!("{}.md", b.name))) else {
            continue;
        };
        out.push_str(&format!(
            "## {}\n\nCommand: `cargo xtask bench {}`\n\n{}\n\n",
            b.title,
            b.name,
            section.trim_end()
        ));
    }
    let path = workspace_root().join("BENCHMARKS.md");
    std::fs::write(&path, out)?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

/// Runs a benchmark binary (release) with `args`; returns what it printed
/// on stdout, its report section. Its progress goes to stderr as it runs.
fn run_bench_binary(name: &str, args: &[String]) -> anyhow::Result<String> {
    let mut cmd = Command::new("cargo");
    cmd.args(["run", "--release", "-p", "guard-tests", "--bin", name, "--"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    eprintln!("xtask: {cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot run the {name} benchmark"))?;
    if !out.status.success() {
        bail!("the {name} benchmark failed: {}", out.status);
    }
    Ok(String::from_utf8(out.stdout)?)
}
