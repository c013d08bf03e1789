//! `cargo xtask demo`: the incident of `DESIGN.md` replayed twice on one
//! machine — before (nutcracker, no XDP) and after (guard: XDP and proxy
//! with tenants) — with the same clients, backends and script; then a
//! table per phase (stdout), the charts (SVG), the figures (JSON) and,
//! with `--html`, a page holding both. See `guard_tests::demo`.
//!
//! ```text
//! demo [--quick] [--out demo/report.svg] [--html] [--check]
//!      [--after-without budgets|ejection|xdp]
//! demo --from-json demo/report.json [--out …] [--html]   # redraw a report
//! ```
//!
//! Needs root (namespaces, veth, XDP, raw sockets) and the release build
//! of guard (`GUARD_BIN` overrides it). Everything it creates is removed
//! when it ends, fails, or is interrupted (SIGINT/SIGTERM).

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use guard_tests::demo::{
    self, Mechanism, Options, Script, Side,
    report::{self, Report},
    watch::Progress,
    world::World,
};

const USAGE: &str = "usage: demo [--quick] [--out FILE.svg] [--html] [--check] \
                     [--after-without budgets|ejection|xdp] [--from-json REPORT.json]";

fn parse_args() -> Result<(Options, Option<PathBuf>)> {
    let mut from_json = None;
    let mut opts = Options {
        quick: false,
        out: PathBuf::from("demo/report.svg"),
        html: false,
        check: false,
        without: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--html" => opts.html = true,
            "--check" => opts.check = true,
            "--out" => opts.out = args.next().context(USAGE)?.into(),
            "--from-json" => from_json = Some(args.next().context(USAGE)?.into()),
            "--after-without" => {
                let m = args.next().context(USAGE)?;
                opts.without = Some(Mechanism::parse(&m).with_context(|| {
                    format!("unknown mechanism `{m}`: budgets, ejection or xdp")
                })?);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    Ok((opts, from_json))
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::from(if demo::stopped() { 130 } else { 2 })
        }
    }
}

/// Runs the demo; `Ok(false)` when `--check` found a check failing.
fn run() -> Result<bool> {
    let (opts, from_json) = parse_args()?;
    if let Some(path) = from_json {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let report: Report = serde_json::from_str(&text)?;
        return write_outputs(&opts, &report);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo needs root: it creates network namespaces and veth pairs, attaches XDP \
             and sends raw frames (run `cargo xtask demo` as root)"
        );
    }
    demo::install_signal_handlers();
    // The storm's clients, memcached and the proxies (which inherit it)
    // each need a descriptor per connection.
    let nofile = guard::descriptors::raise_soft_limit().context("raising RLIMIT_NOFILE")?;
    let script = if opts.quick {
        Script::quick()
    } else {
        Script::full()
    };
    if nofile < 4_096 {
        bail!("the descriptor limit ({nofile}) is too low: raise the hard limit (ulimit -Hn)");
    }
    let progress = Progress::new();
    progress.say(&format!(
        "demo: {} script, {:.0} s per side; building the namespaces and backends",
        if opts.quick { "quick" } else { "full" },
        script.length().as_secs_f64()
    ));
    let world = World::new(&script)?;
    let before = demo::run::run_side(&world, Side::Before, &script, None, &progress)?;
    if demo::stopped() {
        bail!("interrupted");
    }
    // Let the kernel forget the first run's half-open connections.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let after = demo::run::run_side(&world, Side::After, &script, opts.without, &progress)?;
    if demo::stopped() {
        bail!("interrupted");
    }
    drop(world);

    let before = report::side_report(&before, &script);
    let after = report::side_report(&after, &script);
    let checks = demo::checks::evaluate(&before, &after);
    let report = Report {
        mode: if opts.quick { "quick" } else { "full" }.to_string(),
        machine: guard_tests::machine(),
        after_without: opts.without.map(|m| m.name().to_string()),
        phases: report::phase_infos(&script),
        tenants: script.tenants.iter().map(|t| t.to_string()).collect(),
        client_timeout_ms: script.client_timeout.as_millis() as u64,
        before,
        after,
        checks,
    };
    write_outputs(&opts, &report)
}

/// Prints the tables, writes the SVG, the JSON and the page; false when
/// `--check` and a check failed.
fn write_outputs(opts: &Options, report: &Report) -> Result<bool> {
    println!("{}", report::markdown(report));
    if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let svg = demo::chart::draw(report)?;
    std::fs::write(&opts.out, &svg).with_context(|| format!("writing {}", opts.out.display()))?;
    let json = opts.out.with_extension("json");
    std::fs::write(&json, serde_json::to_string_pretty(report)?)?;
    let mut written = vec![opts.out.display().to_string(), json.display().to_string()];
    if opts.html {
        let html = opts.out.with_extension("html");
        std::fs::write(&html, report::html(report, &svg))?;
        written.push(html.display().to_string());
    }
    eprintln!("demo: wrote {}", written.join(", "));
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.id.as_str())
        .collect();
    if failed.is_empty() {
        eprintln!("demo: every check holds");
        Ok(true)
    } else {
        eprintln!("demo: checks failing: {}", failed.join(", "));
        Ok(!opts.check)
    }
}
