//! Where "after" must beat "before", and by how much: the figures CI
//! asserts (`cargo xtask demo --check`, run by `cargo xtask test`).
//!
//! Each check names the phase where the incident hurt, the figure, and
//! the guard mechanism that makes the difference; each demands that
//! "before" shows the harm clearly (at least a floor, so a run where the
//! incident did not happen cannot pass) and that "after" stays below a
//! fraction of it. The margins are wide on purpose: the machine is small
//! and shared, and only differences of several times are asserted.
//! `--after-without budgets|ejection|xdp` runs "after" without one
//! mechanism, which makes its checks fail.

use serde::{Deserialize, Serialize};

use super::report::{PhaseFigures, SideReport};

/// One comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Check {
    /// Short stable name.
    pub id: String,
    /// The phase it looks at.
    pub phase: String,
    /// The figure.
    pub what: String,
    /// The guard mechanism it shows.
    pub mechanism: String,
    /// Before's figure.
    pub before: f64,
    /// After's figure.
    pub after: f64,
    /// The rule, in words.
    pub rule: String,
    /// Whether it held.
    pub pass: bool,
}

/// A figure of one phase on one side.
type Figure = fn(&PhaseFigures) -> f64;

struct Spec {
    id: &'static str,
    phase: &'static str,
    what: &'static str,
    mechanism: &'static str,
    figure: Figure,
    /// Before must reach this (the incident happened).
    before_at_least: f64,
    /// After must stay at or below before divided by this…
    divisor: f64,
    /// …or at or below this, whichever is larger.
    after_floor: f64,
}

fn unserved_of_others(p: &PhaseFigures) -> f64 {
    p.tenants.iter().skip(1).map(|t| t.unserved() as f64).sum()
}

fn errors_of_all(p: &PhaseFigures) -> f64 {
    p.tenants.iter().map(|t| t.errors as f64).sum()
}

const SPECS: &[Spec] = &[
    // Not errors alone: without budgets, guard's fair sharing still keeps
    // most of the other tenants' requests under their timeout, but makes
    // them wait (a measured run: p50 0.2 → 35 ms, half of their requests
    // never sent), which is what the incident's customers felt.
    Spec {
        id: "noisy-unserved",
        phase: "noisy tenant",
        what: "requests the tenants within their budgets wanted and were not served",
        mechanism: "budgets",
        figure: unserved_of_others,
        // Measured before: 306 to 3,766 requests (quick and full runs; the
        // quick script's other tenants want about 1,200 in the phase, and
        // nutcracker on an idle machine loses the fewest), so 100 (8 % of
        // what they want) says the incident hurt without failing a run
        // where it hurt less.
        before_at_least: 100.0,
        divisor: 4.0,
        after_floor: 0.0,
    },
    Spec {
        id: "slow-errors",
        phase: "slow node",
        what: "errors of the steady load",
        mechanism: "ejection",
        figure: errors_of_all,
        before_at_least: 30.0,
        divisor: 2.0,
        after_floor: 0.0,
    },
    Spec {
        id: "slow-close-wait",
        phase: "slow node",
        what: "CLOSE_WAIT sockets (median of the samples)",
        mechanism: "release on close",
        figure: |p| p.close_wait_median,
        before_at_least: 2.0,
        divisor: 5.0,
        after_floor: 0.0,
    },
    Spec {
        id: "storm-errors",
        phase: "reconnect storm",
        what: "errors of the steady load",
        mechanism: "ejection",
        figure: errors_of_all,
        before_at_least: 30.0,
        divisor: 2.0,
        after_floor: 0.0,
    },
    Spec {
        id: "storm-close-wait",
        phase: "reconnect storm",
        what: "CLOSE_WAIT sockets (median of the samples)",
        mechanism: "release on close",
        figure: |p| p.close_wait_median,
        before_at_least: 5.0,
        divisor: 5.0,
        after_floor: 0.0,
    },
    Spec {
        id: "storm-syns",
        phase: "reconnect storm",
        what: "SYNs reaching the kernel",
        mechanism: "xdp",
        figure: |p| p.syn.reaching_kernel as f64,
        before_at_least: 10_000.0,
        divisor: 2.0,
        after_floor: 0.0,
    },
];

/// Every check on the two sides' figures.
pub fn evaluate(before: &SideReport, after: &SideReport) -> Vec<Check> {
    SPECS
        .iter()
        .map(|s| {
            let find = |side: &SideReport| {
                side.phases
                    .iter()
                    .find(|p| p.phase == s.phase)
                    .map(s.figure)
            };
            let (b, a) = (find(before), find(after));
            let bound = b.map_or(0.0, |b| (b / s.divisor).max(s.after_floor));
            let pass = matches!((b, a), (Some(b), Some(a)) if b >= s.before_at_least && a <= bound);
            Check {
                id: s.id.to_string(),
                phase: s.phase.to_string(),
                what: s.what.to_string(),
                mechanism: s.mechanism.to_string(),
                before: b.unwrap_or(0.0),
                after: a.unwrap_or(0.0),
                rule: format!(
                    "before ≥ {}, after ≤ {}",
                    s.before_at_least,
                    if s.after_floor > 0.0 {
                        format!("max(before/{}, {})", s.divisor, s.after_floor)
                    } else {
                        format!("before/{}", s.divisor)
                    }
                ),
                pass,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::report::{Series, TenantFigures};

    fn side(noisy_errors: u64, close_wait_median: f64) -> SideReport {
        let phases = SPECS
            .iter()
            .map(|s| PhaseFigures {
                phase: s.phase.to_string(),
                tenants: ["acme", "globex", "initech"]
                    .iter()
                    .map(|n| TenantFigures {
                        name: n.to_string(),
                        errors: noisy_errors,
                        wanted: 10_000,
                        served: 10_000 - noisy_errors * 10,
                        ..TenantFigures::default()
                    })
                    .collect(),
                close_wait_median,
                syn: crate::demo::report::SynFigures {
                    reaching_kernel: noisy_errors * 1_000,
                    ..Default::default()
                },
                ..PhaseFigures::default()
            })
            .collect();
        SideReport {
            proxy: "x".into(),
            warmed_up: [0, 0],
            phases,
            series: Series::default(),
        }
    }

    #[test]
    fn a_wide_margin_passes() {
        let checks = evaluate(&side(100, 30.0), &side(1, 0.0));
        assert!(checks.iter().all(|c| c.pass), "{checks:#?}");
    }

    #[test]
    fn after_no_better_fails_every_check() {
        let checks = evaluate(&side(100, 30.0), &side(100, 30.0));
        assert!(checks.iter().all(|c| !c.pass), "{checks:#?}");
    }

    /// A run where "before" never showed the incident proves nothing.
    #[test]
    fn before_without_harm_fails_every_check() {
        let checks = evaluate(&side(0, 0.0), &side(0, 0.0));
        assert!(checks.iter().all(|c| !c.pass), "{checks:#?}");
    }

    #[test]
    fn a_missing_phase_fails() {
        let mut after = side(1, 0.0);
        after.phases.clear();
        let checks = evaluate(&side(100, 30.0), &after);
        assert!(checks.iter().all(|c| !c.pass));
    }
}
