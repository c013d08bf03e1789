//! What the runs recorded, per phase and side: the figures (also written
//! as JSON), the table that prints them side by side, and the HTML page.

use serde::{Deserialize, Serialize};

use super::{
    Script,
    checks::Check,
    load::{Outcome, lock},
    run::RunData,
};

/// The whole report, as written to `report.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// `full` or `quick`.
    pub mode: String,
    /// CPU, vCPUs and kernel.
    pub machine: String,
    /// `budgets`, `ejection` or `xdp` when "after" ran without it.
    pub after_without: Option<String>,
    /// The phases: name, what happens, when.
    pub phases: Vec<PhaseInfo>,
    /// Tenant names; the first is the noisy one.
    pub tenants: Vec<String>,
    /// The clients' reply timeout, milliseconds.
    pub client_timeout_ms: u64,
    /// nutcracker.
    pub before: SideReport,
    /// guard.
    pub after: SideReport,
    /// The comparisons CI asserts.
    pub checks: Vec<Check>,
}

/// One phase of the script.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PhaseInfo {
    /// Its name.
    pub name: String,
    /// What happens in it.
    pub what: String,
    /// Seconds from the run's start.
    pub start_s: f64,
    /// See `start_s`.
    pub end_s: f64,
}

/// One side's figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SideReport {
    /// The proxy.
    pub proxy: String,
    /// Client addresses that connected before the run, of all.
    pub warmed_up: [usize; 2],
    /// Per phase, in order.
    pub phases: Vec<PhaseFigures>,
    /// Over time, for the charts.
    pub series: Series,
}

/// One phase's figures on one side.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PhaseFigures {
    /// The phase.
    pub phase: String,
    /// Each tenant's steady load.
    pub tenants: Vec<TenantFigures>,
    /// The noisy tenant's spike (noisy phase only).
    pub spike: Option<SpikeFigures>,
    /// The reconnect storm (storm phase only).
    pub storm: Option<StormFigures>,
    /// Most connections open on the proxy port in a sample.
    pub connections_max: u32,
    /// Most sockets in CLOSE_WAIT on the proxy port in a sample.
    pub close_wait_max: u32,
    /// CLOSE_WAIT sockets, mean over the samples.
    pub close_wait_mean: f64,
    /// CLOSE_WAIT sockets, median of the samples: what was typical,
    /// whatever a moment's stall of the machine left in one sample.
    pub close_wait_median: f64,
    /// SYNs to the proxy port.
    pub syn: SynFigures,
    /// Backends ejected, re-admitted, failing probes.
    pub ejections: Vec<EventFigure>,
}

/// A tenant's steady load in a phase.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TenantFigures {
    /// The tenant.
    pub name: String,
    /// Requests its clients meant to send in the phase (its steady rate
    /// times the phase's length): what a client waiting on a reply does
    /// not send counts against the proxy as much as an error.
    pub wanted: u64,
    /// Requests sent (and connects that failed).
    pub requests: u64,
    /// Answered as the protocol defines.
    pub served: u64,
    /// Everything else: error replies, timeouts, failed connections.
    pub errors: u64,
    /// Of the errors, timeouts (the client gave up, closed, reconnected).
    pub timeouts: u64,
    /// Median time to the reply or to giving up, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile of the same.
    pub p99_ms: f64,
}

impl TenantFigures {
    /// Requests wanted and not served: errors, and requests never sent
    /// while the clients waited.
    pub fn unserved(&self) -> u64 {
        self.wanted.saturating_sub(self.served)
    }
}

/// The spike's requests.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SpikeFigures {
    /// Written.
    pub offered: u64,
    /// Answered with their value.
    pub served: u64,
    /// Refused with an error reply (over budget).
    pub refused: u64,
    /// Not answered within a second, or lost with their connection.
    pub failed: u64,
}

/// The storm's connection attempts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StormFigures {
    /// Made.
    pub attempts: u64,
    /// Connected (and logged in, after).
    pub connected: u64,
    /// Whose get was answered in time.
    pub served: u64,
    /// Whose get timed out: the client closed with it pending.
    pub timed_out: u64,
}

/// SYNs to the proxy's port in a phase.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SynFigures {
    /// The spoofed flood's, sent.
    pub flood_sent: u64,
    /// Connects the clients started (each at least one SYN).
    pub client_connects: u64,
    /// SYNs the XDP program judged (0 without XDP).
    pub judged: u64,
    /// Dropped by the XDP program (0 without XDP).
    pub dropped_by_xdp: u64,
    /// Reaching the kernel: judged and not dropped with XDP; without it,
    /// the flood and the connects (no SYN is dropped before the kernel).
    pub reaching_kernel: u64,
    /// SYN cookies the kernel sent (its SYN queue overflowed).
    pub syn_cookies: u64,
    /// SYNs the kernel dropped for a full accept queue.
    pub listen_drops: u64,
}

/// Something the proxy reported about a backend.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventFigure {
    /// Seconds from the run's start.
    pub t_s: f64,
    /// What happened.
    pub text: String,
}

/// A side's figures over time.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Series {
    /// Every socket sample: seconds, open, CLOSE_WAIT.
    pub sockets: Vec<(f64, u32, u32)>,
    /// Per tenant, per second of the run: p99 (ms) and errors.
    pub tenants: Vec<TenantSeries>,
}

/// One tenant's seconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TenantSeries {
    /// The tenant.
    pub name: String,
    /// Per second: (second, p99 ms, errors).
    pub seconds: Vec<(f64, f64, u64)>,
}

fn median(mut v: Vec<u32>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        f64::from(v[n / 2])
    } else {
        (f64::from(v[n / 2 - 1]) + f64::from(v[n / 2])) / 2.0
    }
}

fn quantile_ms(lat: &mut [u32], q: f64) -> f64 {
    if lat.is_empty() {
        return 0.0;
    }
    lat.sort_unstable();
    let i = ((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1;
    f64::from(lat[i]) / 1e3
}

/// Turns a run's records into its figures.
pub fn side_report(run: &RunData, script: &Script) -> SideReport {
    let rec = &run.rec;
    let mut phases = Vec::new();
    let connects = lock(&rec.connects).clone();
    let spike = lock(&rec.spike).clone();
    let storm = lock(&rec.storm).clone();
    let steady: Vec<Vec<_>> = rec.steady.iter().map(|m| lock(m).clone()).collect();
    for (phase, mark) in script.phases.iter().zip(&run.marks) {
        let within = |t: u32| t >= mark.start_ms && t < mark.end_ms;
        let tenants = script
            .tenants
            .iter()
            .zip(&steady)
            .map(|(name, reqs)| {
                let mut f = TenantFigures {
                    name: name.to_string(),
                    wanted: u64::from(script.steady_rate)
                        * u64::from(mark.end_ms.saturating_sub(mark.start_ms))
                        / 1_000,
                    ..TenantFigures::default()
                };
                let mut lat = Vec::new();
                for r in reqs.iter().filter(|r| within(r.t_ms)) {
                    f.requests += 1;
                    match r.outcome {
                        Outcome::Served => f.served += 1,
                        Outcome::TimedOut => {
                            f.errors += 1;
                            f.timeouts += 1;
                        }
                        Outcome::Refused | Outcome::Failed => f.errors += 1,
                    }
                    if r.outcome != Outcome::Failed {
                        lat.push(r.lat_us);
                    }
                }
                f.p50_ms = quantile_ms(&mut lat, 0.5);
                f.p99_ms = quantile_ms(&mut lat, 0.99);
                f
            })
            .collect();
        let spike_f =
            spike
                .iter()
                .filter(|b| within(b.t_ms))
                .fold(None, |acc: Option<SpikeFigures>, b| {
                    let mut s = acc.unwrap_or_default();
                    s.offered += u64::from(b.offered);
                    s.served += u64::from(b.served);
                    s.refused += u64::from(b.refused);
                    s.failed += u64::from(b.failed);
                    Some(s)
                });
        let storm_f =
            storm
                .iter()
                .filter(|a| within(a.t_ms))
                .fold(None, |acc: Option<StormFigures>, a| {
                    let mut s = acc.unwrap_or_default();
                    s.attempts += 1;
                    s.connected += u64::from(a.connected);
                    s.served += u64::from(a.outcome == Outcome::Served);
                    s.timed_out += u64::from(a.outcome == Outcome::TimedOut);
                    Some(s)
                });
        let samples: Vec<_> = run.samples.iter().filter(|s| within(s.t_ms)).collect();
        let client_connects = connects.iter().filter(|t| within(**t)).count() as u64;
        let flood_sent = mark.flood.map_or(0, |f| f.sent);
        let (judged, dropped) = mark.xdp.as_ref().map_or((0, 0), |x| {
            let d: u64 = ["drop_deny", "drop_source", "drop_tenant", "drop_global"]
                .iter()
                .map(|k| x.get(k).copied().unwrap_or(0))
                .sum();
            (x.get("judged").copied().unwrap_or(0), d)
        });
        let reaching_kernel = if mark.xdp.is_some() {
            judged - dropped.min(judged)
        } else {
            flood_sent + client_connects
        };
        phases.push(PhaseFigures {
            phase: phase.name.to_string(),
            tenants,
            spike: spike_f,
            storm: storm_f,
            connections_max: samples.iter().map(|s| s.open()).max().unwrap_or(0),
            close_wait_max: samples.iter().map(|s| s.close_wait).max().unwrap_or(0),
            close_wait_mean: samples.iter().map(|s| f64::from(s.close_wait)).sum::<f64>()
                / samples.len().max(1) as f64,
            close_wait_median: median(samples.iter().map(|s| s.close_wait).collect()),
            syn: SynFigures {
                flood_sent,
                client_connects,
                judged,
                dropped_by_xdp: dropped,
                reaching_kernel,
                syn_cookies: mark.syn_cookies,
                listen_drops: mark.listen_drops,
            },
            ejections: run
                .events
                .iter()
                .filter(|e| within(e.t_ms))
                .map(|e| EventFigure {
                    t_s: f64::from(e.t_ms) / 1e3,
                    text: e.text.clone(),
                })
                .collect(),
        });
    }
    let end_s = run.marks.last().map_or(0, |m| m.end_ms) / 1_000 + 1;
    let tenants = script
        .tenants
        .iter()
        .zip(&steady)
        .map(|(name, reqs)| TenantSeries {
            name: name.to_string(),
            seconds: (0..end_s)
                .filter_map(|sec| {
                    let mut lat = Vec::new();
                    let mut errors = 0;
                    for r in reqs.iter().filter(|r| r.t_ms / 1_000 == sec) {
                        errors += u64::from(r.outcome.is_error());
                        if r.outcome != Outcome::Failed {
                            lat.push(r.lat_us);
                        }
                    }
                    (!lat.is_empty() || errors > 0)
                        .then(|| (sec as f64 + 0.5, quantile_ms(&mut lat, 0.99), errors))
                })
                .collect(),
        })
        .collect();
    SideReport {
        proxy: run.proxy.clone(),
        warmed_up: [run.warmed_up.0, run.warmed_up.1],
        phases,
        series: Series {
            sockets: run
                .samples
                .iter()
                .map(|s| (f64::from(s.t_ms) / 1e3, s.open(), s.close_wait))
                .collect(),
            tenants,
        },
    }
}

/// The phases as the report states them.
pub fn phase_infos(script: &Script) -> Vec<PhaseInfo> {
    script
        .phases
        .iter()
        .zip(script.bounds())
        .map(|(p, (from, to))| PhaseInfo {
            name: p.name.to_string(),
            what: script.describe(p.kind),
            start_s: from.as_secs_f64(),
            end_s: to.as_secs_f64(),
        })
        .collect()
}

/// 12,345.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(v: f64, cap_ms: u64) -> String {
    if v >= cap_ms as f64 {
        format!("≥{cap_ms}")
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

/// Whether "after" is better: fewer is better unless `more_is_better`.
fn verdict(before: f64, after: f64, more_is_better: bool) -> &'static str {
    let (b, a) = if more_is_better {
        (after, before)
    } else {
        (before, after)
    };
    if (a - b).abs() <= f64::EPSILON.max(b.abs() * 0.02) {
        "same"
    } else if a < b {
        "yes"
    } else {
        "**no**"
    }
}

/// Whether "after" is better on latency: p50 and p99 judged apart, and
/// both named when they disagree (guard can add a little to the median
/// while it cuts the tail). Both are capped at the client's timeout,
/// where the client gave up either way.
fn latency_verdict(b: &TenantFigures, a: &TenantFigures, cap_ms: u64) -> String {
    let cap = cap_ms as f64;
    both(
        ("p50", verdict(b.p50_ms.min(cap), a.p50_ms.min(cap), false)),
        ("p99", verdict(b.p99_ms.min(cap), a.p99_ms.min(cap), false)),
    )
}

/// Two verdicts on one row: one word when they agree, both named when
/// they do not.
fn both((n1, v1): (&str, &str), (n2, v2): (&str, &str)) -> String {
    if v1 == v2 {
        v1.to_string()
    } else {
        format!("{n1} {v1}, {n2} {v2}")
    }
}

/// One table row: label, before, after, verdict.
type Row = [String; 4];

fn row(label: &str, before: String, after: String, verdict: &str) -> Row {
    [label.to_string(), before, after, verdict.to_string()]
}

/// The rows of one phase's table.
pub fn phase_rows(report: &Report, i: usize) -> Vec<Row> {
    let (b, a) = (&report.before.phases[i], &report.after.phases[i]);
    let cap = report.client_timeout_ms;
    let mut rows = Vec::new();
    for (tb, ta) in b.tenants.iter().zip(&a.tenants) {
        // What was wanted is nominal, the rate times the phase's length,
        // and each side's phase lasts as long as it ran (a phase starts
        // once the last one's clients are joined): within 1 % it is
        // shown once, as about so many.
        let wanted = if tb.wanted == ta.wanted {
            format!("of {} wanted", thousands(tb.wanted))
        } else if tb.wanted.abs_diff(ta.wanted) * 100 <= tb.wanted.max(ta.wanted) {
            format!("of ≈{} wanted", thousands(tb.wanted))
        } else {
            format!(
                "of {} / {} wanted",
                thousands(tb.wanted),
                thousands(ta.wanted)
            )
        };
        rows.push(row(
            &format!("{}: served / errors ({wanted})", tb.name),
            format!("{} / {}", thousands(tb.served), thousands(tb.errors)),
            format!("{} / {}", thousands(ta.served), thousands(ta.errors)),
            &both(
                ("served", verdict(tb.served as f64, ta.served as f64, true)),
                ("errors", verdict(tb.errors as f64, ta.errors as f64, false)),
            ),
        ));
        rows.push(row(
            &format!("{}: p50 / p99 ms", tb.name),
            format!("{} / {}", ms(tb.p50_ms, cap), ms(tb.p99_ms, cap)),
            format!("{} / {}", ms(ta.p50_ms, cap), ms(ta.p99_ms, cap)),
            &latency_verdict(tb, ta, cap),
        ));
    }
    if let (Some(sb), Some(sa)) = (&b.spike, &a.spike) {
        rows.push(row(
            &format!(
                "{} spike: offered / served / refused / failed",
                report.tenants[0]
            ),
            format!(
                "{} / {} / {} / {}",
                thousands(sb.offered),
                thousands(sb.served),
                thousands(sb.refused),
                thousands(sb.failed)
            ),
            format!(
                "{} / {} / {} / {}",
                thousands(sa.offered),
                thousands(sa.served),
                thousands(sa.refused),
                thousands(sa.failed)
            ),
            "by design: refused over its budget, at once",
        ));
    }
    if let (Some(sb), Some(sa)) = (&b.storm, &a.storm) {
        rows.push(row(
            "storm: attempts / connected / answered / timed out",
            format!(
                "{} / {} / {} / {}",
                thousands(sb.attempts),
                thousands(sb.connected),
                thousands(sb.served),
                thousands(sb.timed_out)
            ),
            format!(
                "{} / {} / {} / {}",
                thousands(sa.attempts),
                thousands(sa.connected),
                thousands(sa.served),
                thousands(sa.timed_out)
            ),
            verdict(sb.served as f64, sa.served as f64, true),
        ));
    }
    rows.push(row(
        "connections open (max)",
        thousands(u64::from(b.connections_max)),
        thousands(u64::from(a.connections_max)),
        verdict(
            f64::from(b.connections_max),
            f64::from(a.connections_max),
            false,
        ),
    ));
    rows.push(row(
        "CLOSE_WAIT (max / mean)",
        format!("{} / {:.1}", b.close_wait_max, b.close_wait_mean),
        format!("{} / {:.1}", a.close_wait_max, a.close_wait_mean),
        verdict(
            f64::from(b.close_wait_max),
            f64::from(a.close_wait_max),
            false,
        ),
    ));
    // Without XDP nothing is dropped before the kernel: what reaches it
    // is what was offered, not a measured count.
    let syn = |s: &SynFigures, xdp: bool| {
        format!(
            "{} / {} / {}",
            thousands(s.flood_sent + s.client_connects),
            if xdp {
                thousands(s.dropped_by_xdp)
            } else {
                "no XDP".to_string()
            },
            thousands(s.reaching_kernel)
        )
    };
    let after_xdp = report.after_without.as_deref() != Some("xdp");
    rows.push(row(
        "SYNs offered / dropped by XDP / reaching the kernel",
        syn(&b.syn, false),
        syn(&a.syn, after_xdp),
        verdict(
            b.syn.reaching_kernel as f64,
            a.syn.reaching_kernel as f64,
            false,
        ),
    ));
    if b.syn.syn_cookies + a.syn.syn_cookies + b.syn.listen_drops + a.syn.listen_drops > 0 {
        rows.push(row(
            "kernel: SYN cookies sent / listen drops",
            format!(
                "{} / {}",
                thousands(b.syn.syn_cookies),
                thousands(b.syn.listen_drops)
            ),
            format!(
                "{} / {}",
                thousands(a.syn.syn_cookies),
                thousands(a.syn.listen_drops)
            ),
            verdict(b.syn.syn_cookies as f64, a.syn.syn_cookies as f64, false),
        ));
    }
    let events = |p: &PhaseFigures| {
        if p.ejections.is_empty() {
            "none".to_string()
        } else {
            p.ejections
                .iter()
                .map(|e| format!("{:.1} s: {}", e.t_s, e.text))
                .collect::<Vec<_>>()
                .join("<br>")
        }
    };
    rows.push(row("backends ejected", events(b), events(a), ""));
    rows
}

/// The tables as Markdown, one per phase, and the checks.
pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "guard demo ({}): the incident replayed, before ({}) and after ({}{}), same clients, \
         same backends, same script. Machine: {}.\n\
         Latency is to the reply or to the client giving up ({} ms); errors are error replies, \
         timeouts and failed connections. Before, nutcracker has no logins: tenants differ only \
         by key prefix.\n",
        report.mode,
        report.before.proxy,
        report.after.proxy,
        report
            .after_without
            .as_ref()
            .map_or(String::new(), |m| format!(" without {m}")),
        report.machine,
        report.client_timeout_ms,
    ));
    for (i, p) in report.phases.iter().enumerate() {
        out.push_str(&format!(
            "\n### {}. {} ({:.0}–{:.0} s): {}\n\n",
            i + 1,
            p.name,
            p.start_s,
            p.end_s,
            p.what
        ));
        out.push_str("| | before: nutcracker | after: guard | after better? |\n");
        out.push_str("|---|---:|---:|---|\n");
        for r in phase_rows(report, i) {
            out.push_str(&format!("| {} | {} | {} | {} |\n", r[0], r[1], r[2], r[3]));
        }
    }
    out.push_str(
        "\n### Checks\n\n| check | before | after | rule | verdict |\n|---|---:|---:|---|---|\n",
    );
    for c in &report.checks {
        out.push_str(&format!(
            "| {}: {} | {} | {} | {} | {} |\n",
            c.phase,
            c.what,
            figure(c.before),
            figure(c.after),
            c.rule,
            if c.pass { "pass" } else { "**FAIL**" }
        ));
    }
    out
}

/// A check's figure: whole numbers as such, means to one decimal.
fn figure(v: f64) -> String {
    if v.fract() == 0.0 {
        thousands(v as u64)
    } else {
        format!("{v:.1}")
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace("&lt;br&gt;", "<br>")
}

/// A page holding the tables and the charts, self-contained.
pub fn html(report: &Report, svg: &str) -> String {
    let mut out = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>guard: the incident, replayed</title><style>\
         body{font-family:sans-serif;max-width:1240px;margin:2em auto;color:#222}\
         table{border-collapse:collapse;margin:0.5em 0 1.5em}\
         td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px}\
         td:nth-child(2),td:nth-child(3){text-align:right}\
         .no{color:#b00;font-weight:bold}.fail{color:#b00;font-weight:bold}\
         </style></head><body>\n<h1>guard: the incident, replayed</h1>\n",
    );
    out.push_str(&format!(
        "<p>Before: {} (no XDP). After: {}{} (XDP and proxy, tenants with budgets). Same \
         clients, same three memcached (node-c behind a relay that can delay its replies), \
         same script ({}). Machine: {}. Latency is to the reply or to the client giving up \
         ({} ms).</p>\n<figure>{}</figure>\n",
        html_escape(&report.before.proxy),
        html_escape(&report.after.proxy),
        report
            .after_without
            .as_ref()
            .map_or(String::new(), |m| format!(" without {m}")),
        report.mode,
        html_escape(&report.machine),
        report.client_timeout_ms,
        svg,
    ));
    for (i, p) in report.phases.iter().enumerate() {
        out.push_str(&format!(
            "<h2>{}. {} ({:.0}–{:.0} s)</h2><p>{}</p>\n<table><tr><th></th>\
             <th>before: nutcracker</th><th>after: guard</th><th>after better?</th></tr>\n",
            i + 1,
            html_escape(&p.name),
            p.start_s,
            p.end_s,
            html_escape(&p.what)
        ));
        for r in phase_rows(report, i) {
            let v = html_escape(&r[3]).replace("**no**", "<span class=\"no\">no</span>");
            out.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{v}</td></tr>\n",
                html_escape(&r[0]),
                html_escape(&r[1]),
                html_escape(&r[2])
            ));
        }
        out.push_str("</table>\n");
    }
    out.push_str(
        "<h2>Checks</h2>\n<table><tr><th>check</th><th>before</th><th>after</th><th>rule</th>\
         <th>verdict</th></tr>\n",
    );
    for c in &report.checks {
        out.push_str(&format!(
            "<tr><td>{}: {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            html_escape(&c.phase),
            html_escape(&c.what),
            figure(c.before),
            figure(c.after),
            html_escape(&c.rule),
            if c.pass {
                "pass"
            } else {
                "<span class=\"fail\">FAIL</span>"
            }
        ));
    }
    out.push_str("</table>\n</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3, 1, 2]), 2.0);
        assert_eq!(median(vec![4, 1, 3, 2]), 2.5);
        let mut lat: Vec<u32> = (1..=100).map(|i| i * 1_000).collect();
        assert_eq!(quantile_ms(&mut lat, 0.5), 50.0);
        assert_eq!(quantile_ms(&mut lat, 0.99), 99.0);
    }

    #[test]
    fn verdicts_say_no_plainly() {
        assert_eq!(verdict(10.0, 1.0, false), "yes");
        assert_eq!(verdict(1.0, 10.0, false), "**no**");
        assert_eq!(verdict(5.0, 5.0, false), "same");
        assert_eq!(verdict(1.0, 10.0, true), "yes");
        let lat = |p50_ms, p99_ms| TenantFigures {
            p50_ms,
            p99_ms,
            ..TenantFigures::default()
        };
        assert_eq!(
            latency_verdict(&lat(0.2, 7.0), &lat(0.3, 2.0), 100),
            "p50 **no**, p99 yes"
        );
        assert_eq!(latency_verdict(&lat(0.2, 7.0), &lat(0.1, 2.0), 100), "yes");
        assert_eq!(
            latency_verdict(&lat(150.0, 130.0), &lat(100.0, 100.0), 100),
            "same"
        );
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
    }
}
