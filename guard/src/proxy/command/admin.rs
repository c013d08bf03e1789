//! Commands about the server rather than keys: the `stats` groups and
//! memcached's administrative commands. guard answers each as memcached
//! does where a proxy can (`stats`, `stats reset`, `stats settings`, and
//! memcached's own errors for malformed lines, which the parser gives),
//! and refuses the rest by name with `CLIENT_ERROR <command> not
//! allowed: <why>`: the backends behind guard are shared, so their
//! settings are the operator's, and what they hold or log is every
//! client's. Nothing here ever reaches a backend.

use super::*;
use crate::{
    config::ProxyConfig,
    protocol::{AdminCommand, AdminRequest, DetailAction, StatsGroup},
};

/// Why guard refuses a command memcached would carry out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It changes a backend's settings or state, which every client of
    /// every proxy in front of it shares.
    Settings,
    /// It shows a backend's memory or connections, shared with other
    /// clients (and one backend of several says little of the whole).
    Shared,
    /// It would show keys of other clients (their namespaces included).
    Keys,
    /// It stops a process.
    Stop,
}

impl Refusal {
    /// The words after `not allowed: `.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::Settings => "backend settings are the operator's",
            Self::Shared => "the backends are shared with other clients",
            Self::Keys => "it would show other clients' keys",
            Self::Stop => "only the operator stops guard or its backends",
        }
    }
}

/// What guard does with a `stats` group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsAnswer {
    /// guard's counters and the client's tenant's.
    General,
    /// The client's tenant's counters count from zero again.
    Reset,
    /// guard's own settings, in memcached's format.
    Settings,
    /// Refused.
    Refused(Refusal),
}

impl StatsAnswer {
    /// guard's answer to `group`.
    pub fn of(group: StatsGroup) -> Self {
        use StatsGroup::*;
        match group {
            General => Self::General,
            Reset => Self::Reset,
            Settings => Self::Settings,
            // Per-prefix counters are the backends' to keep; their dump
            // lists key prefixes, which are tenants' namespaces.
            Detail(DetailAction::On | DetailAction::Off) | SizesEnable | SizesDisable => {
                Self::Refused(Refusal::Settings)
            }
            Detail(DetailAction::Dump) | Cachedump => Self::Refused(Refusal::Keys),
            Items | Slabs | Sizes | Conns | Extstore => Self::Refused(Refusal::Shared),
        }
    }
}

/// Why guard refuses an administrative command (all of them are).
pub fn admin_refusal(command: AdminCommand) -> Refusal {
    use AdminCommand::*;
    match command {
        CacheMemlimit | SlabsReassign | SlabsAutomove | Slabs | LruCrawler | Lru | Extstore
        | RefreshCerts => Refusal::Settings,
        LruCrawlerMetadump | Watch => Refusal::Keys,
        Shutdown => Refusal::Stop,
    }
}

/// The refusal's words (after `CLIENT_ERROR ` in text, the value of a
/// binary reply).
pub fn refusal_text(what: &str, why: Refusal) -> String {
    format!("{what} not allowed: {}", why.reason())
}

/// The name a refused `stats` group goes by in its refusal.
fn stats_name(group: StatsGroup) -> String {
    match group {
        // `stats detail on not allowed` reads badly: the group is named.
        StatsGroup::Detail(_) => "stats detail".to_owned(),
        g => format!("stats {}", g.words()),
    }
}

/// What `stats settings` shows: memcached's name where guard has the
/// same setting, guard's own `[proxy]` name otherwise, in this order,
/// each the value the process started with.
///
/// Left out: the addresses guard listens on and forwards to (the network
/// behind the proxy is the operator's), and the budgets and `hosts`,
/// which a reload changes and whose share on this host each tenant's
/// `stats` already shows (`tenant_max_*`).
const SHOWN: &[(&str, &str)] = &[
    ("max_connections", "maxconns"),
    ("backlog", "tcp_backlog"),
    ("threads", "num_threads"),
    // memcached's limit is on the whole item; guard's on the value.
    ("max_value_size", "item_size_max"),
    ("idle_timeout_secs", "idle_timeout"),
    ("max_connections_per_source", "max_connections_per_source"),
    ("request_read_timeout_ms", "request_read_timeout_ms"),
    ("max_pipeline_depth", "max_pipeline_depth"),
    ("auth_timeout_ms", "auth_timeout_ms"),
    ("connect_timeout_ms", "connect_timeout_ms"),
    ("request_timeout_ms", "request_timeout_ms"),
    ("backend_connections", "backend_connections"),
    ("backend_max_in_flight", "backend_max_in_flight"),
    ("miss_on_backend_error", "miss_on_backend_error"),
    ("drain_grace_secs", "drain_grace_secs"),
    ("keys", "keys"),
    ("eject", "eject"),
    ("eject_after_errors", "eject_after_errors"),
    ("outlier_ratio", "outlier_ratio"),
    ("outlier_min_gap_ms", "outlier_min_gap_ms"),
    ("outlier_interval_ms", "outlier_interval_ms"),
    ("max_ejected_percent", "max_ejected_percent"),
    ("eject_time_ms", "eject_time_ms"),
    ("max_eject_time_ms", "max_eject_time_ms"),
];

/// The `[proxy]` settings `stats settings` leaves out (see [`SHOWN`]);
/// a test holds every setting to one list or the other.
#[cfg(test)]
const NOT_SHOWN: &[&str] = &[
    "listen",
    "backends",
    "max_requests_per_sec",
    "requests_burst",
    "max_bytes_per_sec",
    "bytes_burst",
    "max_in_flight",
    "hosts",
];

/// memcached settings that say what guard refuses, as memcached's own
/// rows say it of a server started without them.
const DISABLED: &[(&str, &str)] = &[
    ("detail_enabled", "no"),
    ("dump_enabled", "no"),
    ("shutdown_command", "no"),
    ("slab_reassign", "no"),
    ("lru_crawler", "no"),
];

/// `stats settings` rows fixed at start, from the configuration the proxy
/// runs with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SettingsRows {
    rows: Vec<(&'static str, String)>,
}

impl SettingsRows {
    /// The rows for `config` (after the descriptor limit has capped its
    /// `max_connections`).
    pub fn new(config: &ProxyConfig) -> Self {
        let table = match toml::Value::try_from(config) {
            Ok(toml::Value::Table(t)) => t,
            // ProxyConfig is a struct of plain values: it always
            // serialises to a table (`guard run --check` prints it so).
            _ => Default::default(),
        };
        let rows = SHOWN
            .iter()
            .filter_map(|&(key, row)| {
                let value = match key {
                    // 0 means "by CPU count": show the count in force.
                    "threads" => config.runtime_threads().to_string(),
                    _ => match table.get(key)? {
                        toml::Value::Boolean(b) => yes_no(*b).to_owned(),
                        toml::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    },
                };
                Some((row, value))
            })
            .collect();
        Self { rows }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Every `stats settings` row for this client: memcached's names first
/// (those of [`SHOWN`], then the ones that depend on who asks, then what
/// guard refuses), then guard's own.
fn settings_rows(cx: &Cx) -> Vec<(Bytes, Bytes)> {
    let fixed = &cx.settings.rows;
    let memcached_named = SHOWN.iter().take_while(|(key, row)| key != row).count();
    let mut rows: Vec<(&str, String)> = fixed[..memcached_named.min(fixed.len())].to_vec();
    // Connections detect their protocol from the first byte, as memcached's
    // default does.
    rows.push(("binding_protocol", "auto-negotiate".to_owned()));
    // With tenants every client must log in; `stats` comes after it.
    rows.push(("auth_enabled_sasl", yes_no(cx.authenticated).to_owned()));
    rows.push(("auth_enabled_ascii", yes_no(cx.authenticated).to_owned()));
    // Raw keys have no flush generation: `flush_all` is refused.
    rows.push(("flush_enabled", yes_no(!cx.ns.is_raw()).to_owned()));
    rows.extend(DISABLED.iter().map(|&(k, v)| (k, v.to_owned())));
    rows.extend(fixed[memcached_named.min(fixed.len())..].iter().cloned());
    rows.into_iter()
        .map(|(k, v)| (Bytes::from_static(k.as_bytes()), Bytes::from(v)))
        .collect()
}

/// A text `stats` line.
pub(super) fn text_stats(group: StatsGroup, cx: &Cx) -> Slot {
    let rows = match StatsAnswer::of(group) {
        StatsAnswer::General => stat_rows(cx),
        StatsAnswer::Settings => settings_rows(cx),
        StatsAnswer::Reset => {
            cx.budgets.get(&cx.tenant).reset_stats();
            return Slot::Ready(Reply::bytes(b"RESET\r\n"));
        }
        StatsAnswer::Refused(why) => {
            let text = refusal_text(&stats_name(group), why);
            return Slot::Ready(Reply::bytes(format!("CLIENT_ERROR {text}\r\n").as_bytes()));
        }
    };
    let mut out = BytesMut::new();
    for (name, value) in rows {
        TextResponse::Stat { name, value }.encode(&mut out);
    }
    TextResponse::End.encode(&mut out);
    Slot::Ready(Reply { out, close: false })
}

/// A text administrative command: refused by name (nothing with a
/// `noreply` memcached would honour).
pub(super) fn text_admin(req: &AdminRequest) -> Slot {
    if req.noreply {
        return Slot::Ready(Reply::default());
    }
    let text = refusal_text(req.command.words(), admin_refusal(req.command));
    Slot::Ready(Reply::bytes(format!("CLIENT_ERROR {text}\r\n").as_bytes()))
}

/// A binary `STAT`: its key read as memcached reads it. A group memcached
/// does not know is "Not found" (0x0001), as from memcached; a refused one
/// is 0x0024 (access denied) with the refusal's words as its value.
pub(super) fn binary_stat(req: &BinaryRequest, cx: &Cx) -> Slot {
    let (op, opaque) = (req.opcode as u8, req.opaque);
    let one = |resp: BinaryResponse| {
        let mut out = BytesMut::new();
        resp.encode(&mut out);
        Slot::Ready(Reply { out, close: false })
    };
    let Some(group) = StatsGroup::from_binary_key(&req.key) else {
        return one(BinaryResponse::error(op, opaque, Status::KEY_NOT_FOUND));
    };
    let rows = match StatsAnswer::of(group) {
        StatsAnswer::General => stat_rows(cx),
        StatsAnswer::Settings => settings_rows(cx),
        // memcached answers a reset with the terminator alone.
        StatsAnswer::Reset => {
            cx.budgets.get(&cx.tenant).reset_stats();
            Vec::new()
        }
        StatsAnswer::Refused(why) => {
            return one(BinaryResponse {
                status: Status::ACCESS_DENIED,
                value: Bytes::from(refusal_text(&stats_name(group), why)),
                ..BinaryResponse::new(op, opaque)
            });
        }
    };
    let mut out = BytesMut::new();
    for (name, value) in rows {
        BinaryResponse {
            key: name,
            value,
            ..BinaryResponse::new(op, opaque)
        }
        .encode(&mut out);
    }
    BinaryResponse::new(op, opaque).encode(&mut out);
    Slot::Ready(Reply { out, close: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `[proxy]` setting is either shown or left out on purpose:
    /// a new setting fails here until someone decides.
    #[test]
    fn every_proxy_setting_is_shown_or_left_out_on_purpose() {
        let config = ProxyConfig {
            // Options serialise only when set.
            requests_burst: Some(1),
            bytes_burst: Some(1),
            ..ProxyConfig::default()
        };
        let toml::Value::Table(table) = toml::Value::try_from(&config).unwrap() else {
            panic!("not a table")
        };
        for key in table.keys() {
            let shown = SHOWN.iter().any(|(k, _)| k == key);
            let left_out = NOT_SHOWN.contains(&key.as_str());
            assert!(
                shown != left_out,
                "[proxy] {key}: shown {shown}, left out {left_out}"
            );
        }
        assert_eq!(SettingsRows::new(&config).rows.len(), SHOWN.len());
        assert_eq!(SHOWN.len() + NOT_SHOWN.len(), table.len());
    }

    #[test]
    fn rows_carry_the_configured_values_in_memcached_words() {
        let config = ProxyConfig {
            max_connections: 123,
            threads: 3,
            miss_on_backend_error: true,
            outlier_ratio: 2.5,
            ..ProxyConfig::default()
        };
        let rows = SettingsRows::new(&config).rows;
        let get = |name: &str| {
            rows.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("maxconns"), Some("123"));
        assert_eq!(get("num_threads"), Some("3"));
        assert_eq!(get("item_size_max"), Some("1048576"));
        assert_eq!(get("miss_on_backend_error"), Some("yes"));
        assert_eq!(get("outlier_ratio"), Some("2.5"));
        assert_eq!(get("keys"), Some("namespaced"));
        assert_eq!(get("eject"), Some("redistribute"));
        assert_eq!(get("max_connections"), None);
        // The memcached-named rows lead, as `settings_rows` relies on.
        let renamed = SHOWN.iter().take_while(|(k, r)| k != r).count();
        assert!(SHOWN[renamed..].iter().all(|(k, r)| k == r));
    }

    #[test]
    fn every_group_and_command_has_an_answer_with_a_reason() {
        use StatsGroup::*;
        assert_eq!(StatsAnswer::of(Reset), StatsAnswer::Reset);
        assert_eq!(
            StatsAnswer::of(Detail(DetailAction::Dump)),
            StatsAnswer::Refused(Refusal::Keys)
        );
        assert_eq!(
            refusal_text(&stats_name(Detail(DetailAction::On)), Refusal::Settings),
            "stats detail not allowed: backend settings are the operator's"
        );
        assert_eq!(
            refusal_text(
                AdminCommand::Shutdown.words(),
                admin_refusal(AdminCommand::Shutdown)
            ),
            "shutdown not allowed: only the operator stops guard or its backends"
        );
    }
}
