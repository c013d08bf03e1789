//! Keeps the pinned maps in step with the configuration while the daemon
//! runs: applies it at start and on SIGHUP, removes expired deny/allow
//! entries, and reports limit events from the ring buffer.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::Context as _;
use aya::maps::{Map, MapData, RingBuf};
use guard_common::{
    EVENT_GLOBAL_LIMIT, EVENT_SOURCE_LIMIT, EVENT_TENANT_LIMIT, FAMILY_V4, LimitEvent, maps,
};
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use super::maps::{CidrList, GuardMaps};
use crate::{cidr::Cidr, config::Config, paths::Paths};

/// Limit events seen since the daemon started.
pub static LIMIT_EVENTS: AtomicU64 = AtomicU64::new(0);

/// Applies configurations to the pinned maps.
pub struct XdpControl {
    maps: GuardMaps,
    paths: Paths,
    /// Deny/allow entries that came from the config, so a reload removes
    /// the ones it dropped but never those added live with `guard deny add`.
    /// Kept in the state directory too: the maps outlive the daemon, and a
    /// restart with an edited config must remove what the old one added.
    configured: ConfiguredCidrs,
}

/// The deny/allow entries a config put in the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ConfiguredCidrs {
    deny: BTreeSet<Cidr>,
    allow: BTreeSet<Cidr>,
}

impl ConfiguredCidrs {
    /// What the previous daemon applied; nothing if it left no record (or
    /// an unreadable one, said in the log: entries it named then stay until
    /// deleted by hand).
    fn load(paths: &Paths) -> Self {
        crate::paths::read_state(&paths.configured_cidrs_file())
            .unwrap_or_else(|e| {
                warn!("ignoring {e:#}; deny/allow entries an earlier config added are kept");
                None
            })
            .unwrap_or_default()
    }

    fn save(&self, paths: &Paths) -> anyhow::Result<()> {
        crate::paths::write_state(&paths.configured_cidrs_file(), self)
    }
}

impl XdpControl {
    /// Opens the pinned maps and the record of what the last config added.
    pub fn open(paths: &Paths) -> anyhow::Result<Self> {
        Ok(Self {
            maps: GuardMaps::open(paths)?,
            paths: paths.clone(),
            configured: ConfiguredCidrs::load(paths),
        })
    }

    /// Makes the maps say what `config` says.
    pub fn apply(&mut self, config: &Config) -> anyhow::Result<()> {
        self.maps.set_config(&config.guard_config())?;
        self.maps.sync_listeners(&config.protected())?;
        self.maps.sync_tenant_limits(&config.tenant_limits())?;
        let deny: BTreeSet<Cidr> = config.xdp.deny.iter().copied().collect();
        let allow: BTreeSet<Cidr> = config.xdp.allow.iter().copied().collect();
        // Recorded before the maps change: whatever happens half-way, every
        // entry a config put in is on record for the next apply to remove.
        self.configured = ConfiguredCidrs {
            deny: self.configured.deny.union(&deny).copied().collect(),
            allow: self.configured.allow.union(&allow).copied().collect(),
        };
        self.configured.save(&self.paths)?;
        for (list, old, new) in [
            (CidrList::Deny, &self.configured.deny, &deny),
            (CidrList::Allow, &self.configured.allow, &allow),
        ] {
            for gone in old.difference(new) {
                self.maps.remove_cidr(list, *gone)?;
            }
            for cidr in new {
                self.maps.add_cidr(list, *cidr, None)?;
            }
        }
        self.configured = ConfiguredCidrs { deny, allow };
        self.configured.save(&self.paths)
    }

    /// Removes expired deny/allow entries.
    pub fn expire(&mut self) -> anyhow::Result<usize> {
        self.maps.remove_expired()
    }

    /// Read access to the maps.
    pub fn maps(&mut self) -> &mut GuardMaps {
        &mut self.maps
    }
}

/// Reads limit events until the ring buffer fails; logs and counts them.
pub async fn watch_events(paths: Paths) -> anyhow::Result<()> {
    let path = paths.map_pin(maps::EVENTS);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("cannot open pinned ring buffer {}", path.display()))?;
    let ring: RingBuf<MapData> = Map::from_map_data(data)?.try_into()?;
    // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd
    // owns the ring buffer, and always reports that same fd.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot poll the event ring buffer: {e}"))?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<LimitEvent>() {
                warn!("short limit event ({} bytes) ignored", item.len());
                continue;
            }
            // SAFETY: the kernel wrote a whole LimitEvent; read it unaligned.
            let event: LimitEvent = unsafe { item.as_ptr().cast::<LimitEvent>().read_unaligned() };
            LIMIT_EVENTS.fetch_add(1, Ordering::Relaxed);
            info!("{}", describe(&event));
        }
        guard.clear_ready();
    }
}

/// One line for the log.
pub fn describe(e: &LimitEvent) -> String {
    let source: IpAddr = if e.source.family == FAMILY_V4 {
        Ipv4Addr::new(
            e.source.addr[0],
            e.source.addr[1],
            e.source.addr[2],
            e.source.addr[3],
        )
        .into()
    } else {
        Ipv6Addr::from(e.source.addr).into()
    };
    let what = match e.reason {
        EVENT_SOURCE_LIMIT => "its own SYN budget",
        EVENT_TENANT_LIMIT => "its tenant's SYN budget",
        EVENT_GLOBAL_LIMIT => "the host's SYN budget",
        _ => "a SYN budget",
    };
    format!(
        "source {source} exceeded {what} on port {} (tenant {}); dropping its SYNs",
        e.port, e.tenant
    )
}
