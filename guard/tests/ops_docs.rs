//! The operator docs checked against the real things: the alert rules
//! (`docs/alerts.yml`) and the fleet's scrape configuration
//! (`docs/prometheus.yml`) by Prometheus's own `promtool` (their syntax,
//! and the rules' unit tests in `docs/alerts.test.yml`), and every metric
//! the rules name against the exposition guard's `/metrics` renders.
//! `promtool` comes with Debian's `prometheus` package, which
//! `cargo xtask setup` installs.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

/// Runs `promtool ARGS` in `dir`; panics with its output unless it passed.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install Debian's prometheus package (cargo xtask setup does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_and_their_own_tests() {
    let text = promtool(&docs(), &["check", "rules", "alerts.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
    // Each case feeds series as guard names them and expects the alerts
    // (labels, annotations, timing) that must fire, and no others.
    promtool(&docs(), &["test", "rules", "alerts.test.yml"]);
}

/// The scrape configuration, with the rule file it loads; its token file
/// is the operator's, so a stand-in sits beside a copy.
#[test]
fn the_fleet_scrape_config_passes_promtool() {
    let dir = std::env::temp_dir().join(format!("guard-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["prometheus.yml", "alerts.yml"] {
        std::fs::copy(docs().join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("guard-admin.token"),
        "a-token-of-16-chars-or-more\n",
    )
    .unwrap();
    let text = promtool(&dir, &["check", "config", "prometheus.yml"]);
    assert!(text.contains("1 rule files found"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every metric an alert rule names is one guard serves, under the name
/// the exposition gives it (`_total` for counters, `_bucket` for
/// histograms): the families are read from what `/metrics` renders for a
/// daemon running both XDP and the proxy.
#[test]
fn alert_rules_name_only_metrics_guard_serves() {
    use guard::admin::{metrics, status::Status};
    let exposition = metrics::render(&Status {
        xdp: Some(Default::default()),
        proxy: Some(Default::default()),
        ..Default::default()
    });
    let families: BTreeMap<&str, &str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    assert!(families.len() >= 25, "{exposition}");
    let rules = std::fs::read_to_string(docs().join("alerts.yml")).unwrap();
    let mut named = 0;
    let mut rest = rules.as_str();
    while let Some(at) = rest.find("guard_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let served = families.iter().any(|(family, kind)| match *kind {
            "counter" => name == format!("{family}_total"),
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name == format!("{family}{s}")),
            _ => name == *family,
        });
        assert!(
            served,
            "docs/alerts.yml names {name}, which /metrics does not serve"
        );
        named += 1;
    }
    assert!(named >= 15, "only {named} metrics named");
}
