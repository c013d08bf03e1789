//! Commands about a server rather than its keys: the `stats` groups, and
//! memcached's administrative commands (`cache_memlimit`, `slabs`,
//! `lru_crawler`, `lru`, `watch`, `extstore`, `shutdown`,
//! `refresh_certs`).
//!
//! The parser recognises them as memcached 1.6 does (`proto_text.c`,
//! `proto_bin.c`), down to which malformed lines get `ERROR` and which
//! honour `noreply`, so the proxy can answer each as memcached would or
//! refuse it by name; what it answers is the proxy's business
//! (`proxy::command`), not the parser's.

use bytes::Bytes;

/// A `stats` group: text `stats <group> …`, or the key of a binary `STAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatsGroup {
    /// `stats` alone: the general counters.
    General,
    /// `stats reset`: zero the counters.
    Reset,
    /// `stats settings`: the server's settings.
    Settings,
    /// `stats detail on|off|dump`: per-key-prefix counters.
    Detail(DetailAction),
    /// `stats items`: per slab class item counts.
    Items,
    /// `stats slabs`: per slab class memory.
    Slabs,
    /// `stats sizes`: the item size histogram.
    Sizes,
    /// `stats sizes_enable`: start the histogram.
    SizesEnable,
    /// `stats sizes_disable`: stop it.
    SizesDisable,
    /// `stats cachedump <class> <limit>`: keys of a slab class (text only).
    Cachedump,
    /// `stats conns`: every connection (text only).
    Conns,
    /// `stats extstore`: external storage (text only).
    Extstore,
}

/// What `stats detail` was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DetailAction {
    On,
    Off,
    Dump,
}

/// Why a `stats` line is not a request memcached would carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsLineError {
    /// No such group: memcached answers `ERROR`.
    Unknown,
    /// `stats detail` without `on`, `off` or `dump`: memcached answers
    /// `CLIENT_ERROR usage: stats detail on|off|dump`.
    DetailUsage,
}

impl StatsGroup {
    /// The group of a text `stats` line from its arguments (the tokens
    /// after `stats`). Arguments memcached ignores are ignored; a refused
    /// group is recognised whatever its arguments, as memcached's own
    /// refusals (`stats cachedump` under `-X`) come before any is read.
    pub fn from_text_args(args: &[&[u8]]) -> Result<Self, StatsLineError> {
        let Some((&group, rest)) = args.split_first() else {
            return Ok(Self::General);
        };
        Ok(match group {
            b"reset" => Self::Reset,
            b"settings" => Self::Settings,
            b"detail" => match rest.first() {
                Some(&b"on") => Self::Detail(DetailAction::On),
                Some(&b"off") => Self::Detail(DetailAction::Off),
                Some(&b"dump") => Self::Detail(DetailAction::Dump),
                _ => return Err(StatsLineError::DetailUsage),
            },
            b"items" => Self::Items,
            b"slabs" => Self::Slabs,
            b"sizes" => Self::Sizes,
            b"sizes_enable" => Self::SizesEnable,
            b"sizes_disable" => Self::SizesDisable,
            b"cachedump" => Self::Cachedump,
            b"conns" => Self::Conns,
            b"extstore" => Self::Extstore,
            _ => return Err(StatsLineError::Unknown),
        })
    }

    /// The group a binary `STAT` key names, as memcached's
    /// `process_bin_stat` reads it: `reset`, `settings` and `detail` by
    /// prefix (`resetx` resets), the histogram and slab groups exactly;
    /// `None` for what it answers "Not found" (`stats conns`,
    /// `cachedump` and `extstore` exist in text only).
    pub fn from_binary_key(key: &[u8]) -> Option<Self> {
        if key.is_empty() {
            return Some(Self::General);
        }
        if key.starts_with(b"reset") {
            return Some(Self::Reset);
        }
        if key.starts_with(b"settings") {
            return Some(Self::Settings);
        }
        if let Some(rest) = key.strip_prefix(b"detail") {
            return if rest.starts_with(b" dump") {
                Some(Self::Detail(DetailAction::Dump))
            } else if rest.starts_with(b" on") {
                Some(Self::Detail(DetailAction::On))
            } else if rest.starts_with(b" off") {
                Some(Self::Detail(DetailAction::Off))
            } else {
                None
            };
        }
        Some(match key {
            b"items" => Self::Items,
            b"slabs" => Self::Slabs,
            b"sizes" => Self::Sizes,
            b"sizes_enable" => Self::SizesEnable,
            b"sizes_disable" => Self::SizesDisable,
            _ => return None,
        })
    }

    /// The words after `stats` that ask for this group (empty for the
    /// general one), as a text line and in replies that name it.
    pub fn words(self) -> &'static str {
        match self {
            Self::General => "",
            Self::Reset => "reset",
            Self::Settings => "settings",
            Self::Detail(DetailAction::On) => "detail on",
            Self::Detail(DetailAction::Off) => "detail off",
            Self::Detail(DetailAction::Dump) => "detail dump",
            Self::Items => "items",
            Self::Slabs => "slabs",
            Self::Sizes => "sizes",
            Self::SizesEnable => "sizes_enable",
            Self::SizesDisable => "sizes_disable",
            Self::Cachedump => "cachedump",
            Self::Conns => "conns",
            Self::Extstore => "extstore",
        }
    }
}

/// A line memcached answers `ERROR` before its command's handler runs:
/// too few (or, for `cache_memlimit`, too many) tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrongTokenCount;

/// One of memcached's administrative text commands: they change or show
/// the server's own state (memory, slabs, LRU, logs, storage, the
/// process), never a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdminCommand {
    /// `cache_memlimit <megabytes> [noreply]`.
    CacheMemlimit,
    /// `slabs reassign <src> <dst>`.
    SlabsReassign,
    /// `slabs automove <0|1|2> [noreply]`, `slabs automove ratio <r>`.
    SlabsAutomove,
    /// `slabs` with anything else.
    Slabs,
    /// `lru_crawler metadump <classes|all|hash>`: every key's metadata.
    LruCrawlerMetadump,
    /// `lru_crawler crawl|tocrawl|sleep|enable|disable …`.
    LruCrawler,
    /// `lru tune|mode|temp_ttl … [noreply]`.
    Lru,
    /// `watch [streams…]`: the server's log stream.
    Watch,
    /// `extstore <setting> <value> [noreply]`.
    Extstore,
    /// `shutdown [graceful]`.
    Shutdown,
    /// `refresh_certs [noreply]`.
    RefreshCerts,
}

impl AdminCommand {
    /// The command of a text line, from its tokens (`toks[0]` is the
    /// command word). `Ok(None)`: not an administrative command.
    /// `Err(_)`: the wrong number of tokens for memcached to take it as
    /// the command at all (its `WANT_TOKENS` checks): `ERROR`.
    pub fn from_tokens(toks: &[&[u8]]) -> Result<Option<Self>, WrongTokenCount> {
        let n = toks.len();
        let sub = toks.get(1).copied();
        Ok(Some(match toks.first().copied() {
            Some(b"cache_memlimit") if n == 2 || n == 3 => Self::CacheMemlimit,
            Some(b"cache_memlimit") => return Err(WrongTokenCount),
            // memcached takes `reassign` only with exactly two classes,
            // `automove` with at least one argument; anything else is
            // still `slabs`, and refused as such.
            Some(b"slabs") if n == 4 && sub == Some(b"reassign") => Self::SlabsReassign,
            Some(b"slabs") if n >= 3 && sub == Some(b"automove") => Self::SlabsAutomove,
            Some(b"slabs") => Self::Slabs,
            Some(b"lru_crawler") if sub == Some(b"metadump") => Self::LruCrawlerMetadump,
            Some(b"lru_crawler") => Self::LruCrawler,
            Some(b"lru" | b"extstore") if n < 2 => return Err(WrongTokenCount),
            Some(b"lru") => Self::Lru,
            Some(b"extstore") => Self::Extstore,
            Some(b"watch") => Self::Watch,
            Some(b"shutdown") => Self::Shutdown,
            Some(b"refresh_certs") => Self::RefreshCerts,
            _ => return Ok(None),
        }))
    }

    /// The words that name the command on the line; its arguments follow.
    pub fn words(self) -> &'static str {
        match self {
            Self::CacheMemlimit => "cache_memlimit",
            Self::SlabsReassign => "slabs reassign",
            Self::SlabsAutomove => "slabs automove",
            Self::Slabs => "slabs",
            Self::LruCrawlerMetadump => "lru_crawler metadump",
            Self::LruCrawler => "lru_crawler",
            Self::Lru => "lru",
            Self::Watch => "watch",
            Self::Extstore => "extstore",
            Self::Shutdown => "shutdown",
            Self::RefreshCerts => "refresh_certs",
        }
    }

    /// How many tokens [`Self::words`] takes.
    pub fn word_count(self) -> usize {
        self.words().split(' ').count()
    }

    /// Whether a last `noreply` token silences the reply, as memcached's
    /// handler calls `set_noreply_maybe` before it answers (`slabs
    /// reassign`, `lru_crawler` and `shutdown` never do).
    pub fn honours_noreply(self) -> bool {
        matches!(
            self,
            Self::CacheMemlimit
                | Self::SlabsAutomove
                | Self::Lru
                | Self::Watch
                | Self::Extstore
                | Self::RefreshCerts
        )
    }
}

/// An administrative request: the command, its arguments as sent (without
/// a `noreply` the command honours) and whether it asked for no reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRequest {
    pub command: AdminCommand,
    pub args: Vec<Bytes>,
    pub noreply: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_groups_as_memcached_reads_them() {
        use StatsGroup::*;
        let g = |args: &[&[u8]]| StatsGroup::from_text_args(args);
        assert_eq!(g(&[]), Ok(General));
        assert_eq!(g(&[b"reset", b"x"]), Ok(Reset));
        assert_eq!(g(&[b"settings", b"x"]), Ok(Settings));
        assert_eq!(g(&[b"detail", b"on", b"x"]), Ok(Detail(DetailAction::On)));
        assert_eq!(g(&[b"detail"]), Err(StatsLineError::DetailUsage));
        assert_eq!(g(&[b"detail", b"of"]), Err(StatsLineError::DetailUsage));
        assert_eq!(g(&[b"cachedump"]), Ok(Cachedump));
        for unknown in [&b"noreply"[..], b"foo", b"proxy", b"Items", b"resetx"] {
            assert_eq!(g(&[unknown]), Err(StatsLineError::Unknown));
        }
        for group in [
            Reset,
            Settings,
            Detail(DetailAction::Dump),
            Items,
            Slabs,
            Sizes,
            SizesEnable,
            SizesDisable,
            Cachedump,
            Conns,
            Extstore,
        ] {
            let words: Vec<&[u8]> = group.words().split(' ').map(str::as_bytes).collect();
            assert_eq!(g(&words), Ok(group));
        }
    }

    #[test]
    fn binary_keys_as_memcached_reads_them() {
        use StatsGroup::*;
        let g = StatsGroup::from_binary_key;
        assert_eq!(g(b""), Some(General));
        assert_eq!(g(b"resetx"), Some(Reset));
        assert_eq!(g(b"settingsxyz"), Some(Settings));
        assert_eq!(g(b"detail dumpxx"), Some(Detail(DetailAction::Dump)));
        assert_eq!(g(b"detail off"), Some(Detail(DetailAction::Off)));
        assert_eq!(g(b"detail"), None);
        assert_eq!(g(b"detailx"), None);
        assert_eq!(g(b"items"), Some(Items));
        assert_eq!(g(b"itemsx"), None);
        for text_only in [&b"conns"[..], b"cachedump 1 1", b"extstore", b"noreply"] {
            assert_eq!(g(text_only), None);
        }
    }

    #[test]
    fn admin_commands_by_memcached_token_rules() {
        use AdminCommand::*;
        let c = |line: &str| {
            let toks: Vec<&[u8]> = line.split(' ').map(str::as_bytes).collect();
            AdminCommand::from_tokens(&toks)
        };
        assert_eq!(c("cache_memlimit"), Err(WrongTokenCount));
        assert_eq!(c("cache_memlimit 100"), Ok(Some(CacheMemlimit)));
        assert_eq!(c("cache_memlimit 1 2 3"), Err(WrongTokenCount));
        assert_eq!(c("slabs reassign 1 2"), Ok(Some(SlabsReassign)));
        assert_eq!(c("slabs reassign 1 2 noreply"), Ok(Some(Slabs)));
        assert_eq!(c("slabs automove 1"), Ok(Some(SlabsAutomove)));
        assert_eq!(c("slabs automove"), Ok(Some(Slabs)));
        assert_eq!(c("lru_crawler metadump all"), Ok(Some(LruCrawlerMetadump)));
        assert_eq!(c("lru_crawler"), Ok(Some(LruCrawler)));
        assert_eq!(c("lru"), Err(WrongTokenCount));
        assert_eq!(c("lru foo"), Ok(Some(Lru)));
        assert_eq!(c("extstore"), Err(WrongTokenCount));
        assert_eq!(c("watch"), Ok(Some(Watch)));
        assert_eq!(c("shutdown graceful"), Ok(Some(Shutdown)));
        assert_eq!(c("refresh_certs"), Ok(Some(RefreshCerts)));
        assert_eq!(c("get"), Ok(None));
        assert_eq!(SlabsReassign.word_count(), 2);
        assert!(!Shutdown.honours_noreply() && Watch.honours_noreply());
    }
}
