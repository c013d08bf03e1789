//! `/metrics`: the picture in the OpenMetrics text format, through
//! `prometheus-client`'s encoder. Every name and label is listed in the
//! README; labels are configured things only (tenants, backends,
//! interfaces, fixed reasons), never a client's address.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use super::status::{Buckets, Status};
use crate::proxy::{health::HISTOGRAM_BOUNDS, router::BackendState};

/// The content type of what [`render`] returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// XDP counters that are a verdict on a frame: `(counter, verdict,
/// reason)`.
const VERDICTS: &[(&str, &str, &str)] = &[
    ("passed", "pass", "not_judged"),
    ("admitted", "pass", "admitted"),
    ("allowed", "pass", "allow_list"),
    ("not_ip", "pass", "not_ip"),
    ("fragment", "pass", "fragment"),
    ("parse_ethernet", "pass", "malformed"),
    ("parse_vlan", "pass", "malformed"),
    ("parse_ipv4", "pass", "malformed"),
    ("parse_ipv6", "pass", "malformed"),
    ("parse_ipv6_ext", "pass", "malformed"),
    ("parse_tcp", "pass", "malformed"),
    ("parse_udp", "pass", "malformed"),
    ("drop_deny", "drop", "deny_list"),
    ("drop_source", "drop", "source_budget"),
    ("drop_tenant", "drop", "tenant_budget"),
    ("drop_global", "drop", "host_budget"),
    ("drop_udp", "drop", "udp"),
];

/// The XDP counters summed by `(verdict, reason)`.
fn verdicts(
    counters: &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<(&'static str, &'static str), u64> {
    let mut out = std::collections::BTreeMap::new();
    for (k, v, r) in VERDICTS {
        *out.entry((*v, *r)).or_default() += counters.get(*k).copied().unwrap_or(0);
    }
    out
}

/// Renders `status` as an OpenMetrics exposition.
pub fn render(status: &Status) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatusCollector(status.clone())));
    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail; an encoder error would be a bug in
    // the names below, and an empty scrape says so loudly enough.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct StatusCollector(Status);

type Labels = Vec<(&'static str, String)>;

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in rows {
        m.encode_family(&l)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, v) in rows {
        m.encode_family(&l)?.encode_gauge(&v)?;
    }
    Ok(())
}

fn histogram<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, &'a Buckets)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (l, b) in rows {
        // The encoder adds the buckets up itself.
        let mut last = 0;
        let per_bucket: Vec<(f64, u64)> = b
            .cumulative
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let bound = HISTOGRAM_BOUNDS.get(i).copied().unwrap_or(f64::INFINITY);
                let n = c.saturating_sub(last);
                last = c;
                (bound, n)
            })
            .collect();
        m.encode_family(&l)?.encode_histogram::<NoLabelSet>(
            b.sum_secs,
            b.count,
            &per_bucket,
            None,
        )?;
    }
    Ok(())
}

impl Collector for StatusCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let e = &mut enc;
        gauge(
            e,
            "guard_build_info",
            "The running guard's version (always 1).",
            [(labels([("version", &s.version)]), 1u64)],
        )?;
        gauge(
            e,
            "guard_uptime_seconds",
            "Seconds since the daemon started.",
            [(Labels::new(), s.uptime_secs)],
        )?;
        gauge(
            e,
            "guard_ready",
            "1 when /readyz answers 200: configuration loaded, XDP attached where configured, a healthy backend.",
            [(Labels::new(), u64::from(s.ready))],
        )?;
        counter(
            e,
            "guard_config_reloads",
            "Configuration reloads (SIGHUP), by result.",
            [
                (labels([("result", "ok")]), s.config.reloads_ok),
                (labels([("result", "failed")]), s.config.reloads_failed),
            ],
        )?;
        if let Some(x) = &s.xdp {
            let c = |k: &str| x.counters.get(k).copied().unwrap_or(0);
            gauge(
                e,
                "guard_xdp_attached",
                "1 when the XDP program is attached to the interface.",
                x.interfaces
                    .iter()
                    .map(|i| (labels([("interface", &i.name)]), u64::from(i.attached))),
            )?;
            // By interface: the host's totals are their sum.
            let per = |k: &'static str| {
                x.by_interface.iter().map(move |i| {
                    (
                        labels([("interface", &i.interface)]),
                        i.counters.get(k).copied().unwrap_or(0),
                    )
                })
            };
            counter(
                e,
                "guard_xdp_frames",
                "Frames the XDP program saw, by interface.",
                per("frames"),
            )?;
            counter(
                e,
                "guard_xdp_syns_judged",
                "SYNs to a protected listener that were judged, by interface.",
                per("judged"),
            )?;
            counter(
                e,
                "guard_xdp_verdicts",
                "Frames by interface, verdict and the reason for it.",
                x.by_interface.iter().flat_map(|i| {
                    verdicts(&i.counters).into_iter().map(|((v, r), n)| {
                        (
                            labels([("interface", &i.interface), ("verdict", v), ("reason", r)]),
                            n,
                        )
                    })
                }),
            )?;
            counter(
                e,
                "guard_xdp_tenant_syn_drops",
                "SYNs refused per tenant, by the budget that refused them: the tenant's, or the host's after the tenant's admitted them (answered with a cookie or dropped).",
                x.tenant_syn_drops.iter().flat_map(|t| {
                    [
                        (
                            labels([("tenant", &t.tenant), ("budget", "tenant")]),
                            t.tenant_budget,
                        ),
                        (
                            labels([("tenant", &t.tenant), ("budget", "host")]),
                            t.host_budget,
                        ),
                    ]
                }),
            )?;
            counter(
                e,
                "guard_xdp_syn_cookies",
                "SYN cookies from XDP: SYN-ACKs sent, SYNs let through to refresh a listener, SYNs that could not be answered, valid cookie ACKs.",
                [
                    (labels([("outcome", "sent")]), c("cookies_sent")),
                    (labels([("outcome", "refresh")]), c("cookie_refresh")),
                    (
                        labels([("outcome", "unanswerable")]),
                        c("cookie_unanswerable"),
                    ),
                    (labels([("outcome", "ack_valid")]), c("cookie_acks")),
                ],
            )?;
            let esc = |k: &str| x.escalation.get(k).copied().unwrap_or(0);
            counter(
                e,
                "guard_escalations",
                "Escalation ladder steps, by what was done to the source.",
                [
                    ("strict", "escalation_strict"),
                    ("deny", "escalation_denied"),
                    ("held", "escalation_held"),
                    ("spared", "escalation_spared"),
                    ("deescalated", "escalation_deescalated"),
                    ("forgotten", "escalation_forgotten"),
                    ("ladder_full", "escalation_full"),
                ]
                .map(|(step, k)| (labels([("step", step)]), esc(k))),
            )?;
            counter(
                e,
                "guard_escalation_signals",
                "Misbehaviour thresholds the proxy crossed, by whether they reached the ladder.",
                [
                    (labels([("outcome", "reported")]), esc("escalation_signals")),
                    (
                        labels([("outcome", "dropped")]),
                        esc("escalation_signals_dropped"),
                    ),
                ],
            )?;
            gauge(
                e,
                "guard_escalation_sources",
                "Sources escalated now, by step.",
                [
                    (
                        labels([("step", "strict")]),
                        esc("escalation_sources_strict"),
                    ),
                    (labels([("step", "deny")]), esc("escalation_sources_denied")),
                ],
            )?;
            counter(
                e,
                "guard_xdp_verified_syns",
                "Judged SYNs from verified sources (charged to their own and their tenant's budgets only).",
                [(Labels::new(), c("verified"))],
            )?;
            counter(
                e,
                "guard_xdp_limit_events",
                "Sources crossing a budget, by what became of the event.",
                [
                    (labels([("outcome", "sent")]), c("events_sent")),
                    (labels([("outcome", "suppressed")]), c("events_suppressed")),
                    (labels([("outcome", "lost")]), c("events_lost")),
                ],
            )?;
            gauge(
                e,
                "guard_xdp_verified_sources",
                "Sources verified now (their SYNs skip the shared and host budgets).",
                [(Labels::new(), x.verified_sources)],
            )?;
            gauge(
                e,
                "guard_xdp_deny_entries",
                "Deny-list entries in force.",
                [(Labels::new(), x.deny_entries)],
            )?;
        }
        if let Some(p) = &s.proxy {
            gauge(
                e,
                "guard_proxy_connections",
                "Client connections open now.",
                [(Labels::new(), p.connections)],
            )?;
            counter(
                e,
                "guard_proxy_connections_accepted",
                "Client connections accepted.",
                [(Labels::new(), p.connections_accepted)],
            )?;
            counter(
                e,
                "guard_proxy_connections_refused",
                "Client connections refused or closed early, by reason.",
                p.connections_refused
                    .iter()
                    .map(|(r, n)| (labels([("reason", r)]), *n)),
            )?;
            counter(
                e,
                "guard_proxy_requests",
                "Client requests by tenant and command class.",
                p.tenants.iter().flat_map(|t| {
                    t.requests
                        .iter()
                        .map(|(c, n)| (labels([("tenant", &t.name), ("class", c)]), *n))
                }),
            )?;
            counter(
                e,
                "guard_proxy_errors",
                "Client requests answered with a backend error, by tenant and command class.",
                p.tenants.iter().flat_map(|t| {
                    t.errors
                        .iter()
                        .map(|(c, n)| (labels([("tenant", &t.name), ("class", c)]), *n))
                }),
            )?;
            counter(
                e,
                "guard_proxy_budget_refusals",
                "Requests refused over a tenant's budget, by tenant and budget.",
                p.tenants.iter().flat_map(|t| {
                    t.refused
                        .iter()
                        .map(|(b, n)| (labels([("tenant", &t.name), ("budget", b)]), *n))
                }),
            )?;
            gauge(
                e,
                "guard_proxy_tenant_connections",
                "Client connections open now, by tenant.",
                p.tenants
                    .iter()
                    .map(|t| (labels([("tenant", &t.name)]), t.connections)),
            )?;
            gauge(
                e,
                "guard_proxy_tenant_in_flight",
                "Backend requests in flight now, by tenant.",
                p.tenants
                    .iter()
                    .map(|t| (labels([("tenant", &t.name)]), t.in_flight)),
            )?;
            histogram(
                e,
                "guard_proxy_request_duration_seconds",
                "Time from a request's dispatch to its reply, for requests that went to the backends, by tenant.",
                p.tenants
                    .iter()
                    .map(|t| (labels([("tenant", &t.name)]), &t.latency)),
            )?;
            counter(
                e,
                "guard_proxy_flushes",
                "flush_all requests.",
                [(Labels::new(), p.flushes)],
            )?;
            counter(
                e,
                "guard_proxy_protocol_errors",
                "Requests that could not be parsed.",
                [(Labels::new(), p.protocol_errors)],
            )?;
            counter(
                e,
                "guard_proxy_auth_failures",
                "Failed authentication attempts.",
                [(Labels::new(), p.auth_failures)],
            )?;
            gauge(
                e,
                "guard_backend_state",
                "1 for the state each backend is in: healthy, ejected, probing or joining.",
                p.backends.iter().flat_map(|b| {
                    BackendState::ALL.iter().map(|st| {
                        (
                            labels([("backend", &b.addr), ("state", st.label())]),
                            u64::from(b.state == *st),
                        )
                    })
                }),
            )?;
            gauge(
                e,
                "guard_backend_connected",
                "1 when any connection to the backend is up.",
                p.backends
                    .iter()
                    .map(|b| (labels([("backend", &b.addr)]), u64::from(b.connected))),
            )?;
            gauge(
                e,
                "guard_backend_in_flight",
                "Requests queued to or awaiting replies from the backend.",
                p.backends
                    .iter()
                    .map(|b| (labels([("backend", &b.addr)]), b.in_flight)),
            )?;
            counter(
                e,
                "guard_backend_ejections",
                "Times the backend was ejected (for errors or latency).",
                p.backends
                    .iter()
                    .map(|b| (labels([("backend", &b.addr)]), b.ejections)),
            )?;
            histogram(
                e,
                "guard_backend_request_duration_seconds",
                "Time the backend took to answer a batch of requests.",
                p.backends
                    .iter()
                    .map(|b| (labels([("backend", &b.addr)]), &b.latency)),
            )?;
            counter(
                e,
                "guard_backend_errors",
                "Requests answered with an error because their backend failed.",
                [(Labels::new(), p.backend_errors)],
            )?;
            counter(
                e,
                "guard_backend_timeouts",
                "Backend connections discarded after a request timed out.",
                [(Labels::new(), p.backend_timeouts)],
            )?;
        }
        Ok(())
    }
}
