//! Keeps the pinned maps in step with the configuration while the daemon
//! runs: applies it at start and on SIGHUP and removes expired deny/allow
//! entries. Limit events are [`super::events`]' business.

use std::collections::BTreeSet;

use anyhow::Context as _;
use log::warn;
use serde::{Deserialize, Serialize};

use super::{
    maps::{CidrList, GuardMaps},
    settings,
};
use crate::{cidr::Cidr, config::Config, paths::Paths};

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

/// The deny/allow entries the last applied config put in the maps, as
/// `guard deny|allow list` shows their origin: `(deny, allow)`.
pub fn configured(paths: &Paths) -> (BTreeSet<Cidr>, BTreeSet<Cidr>) {
    let c = crate::paths::read_state::<ConfiguredCidrs>(&paths.configured_cidrs_file())
        .ok()
        .flatten()
        .unwrap_or_default();
    (c.deny, c.allow)
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
        self.maps.set_config(&settings::guard_config(config))?;
        self.maps.sync_listeners(&settings::protected(config))?;
        self.maps
            .sync_tenant_limits(&settings::tenant_limits(config))?;
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
        self.configured.save(&self.paths)?;
        let revoked = self.revoke_verified(config)?;
        if revoked > 0 {
            log::info!(
                "{revoked} verified source(s) lost their status: what proved them is no \
                 longer configured"
            );
        }
        Ok(())
    }

    /// Takes the verified status from sources whose proof no longer
    /// stands under `config`: a credential removed or re-hashed, a tenant
    /// gone, the open tenant gone (tenants now log in), or verification
    /// turned off. Works from the map alone, so it holds after a restart.
    fn revoke_verified(&mut self, config: &Config) -> anyhow::Result<usize> {
        if config.xdp.verified_secs == 0 {
            return self.maps.remove_verified_where(|_| true);
        }
        let credentials: BTreeSet<u32> = config
            .tenants
            .iter()
            .flat_map(|t| &t.credentials)
            .map(|c| crate::tenant::credential_id(&c.password_hash.to_string()))
            .collect();
        let tenants: BTreeSet<u32> = config
            .tenants
            .iter()
            .map(|t| crate::config::tenant_id(&t.name))
            .collect();
        let open = credentials.is_empty();
        self.maps.remove_verified_where(|v| {
            if v.reserved == 0 {
                // Proved on the open tenant.
                !open
            } else {
                !credentials.contains(&v.reserved) || !tenants.contains(&v.tenant)
            }
        })
    }

    /// Records that `learned.source` proved itself: its SYNs charge its
    /// tenant (when it has one), and it is verified for `valid_for`. A
    /// reconnect storm logs in by the thousand: the map is read first and
    /// written only when something would change (a new tenant, or an
    /// expiry less than half the window away).
    pub fn learn(
        &mut self,
        learned: crate::proxy::Learned,
        valid_for: std::time::Duration,
    ) -> anyhow::Result<()> {
        let crate::proxy::Learned {
            source,
            tenant,
            credential,
        } = learned;
        if tenant != guard_common::DEFAULT_TENANT
            && !matches!(self.maps.source_tenant(source), Ok(Some(t)) if t == tenant)
        {
            self.maps
                .set_source_tenant(source, tenant)
                .with_context(|| format!("cannot record {source} as tenant {tenant:#x}"))?;
        }
        if valid_for.is_zero() {
            return Ok(());
        }
        let now = super::maps::monotonic_ns();
        let half = u64::try_from(valid_for.as_nanos() / 2).unwrap_or(u64::MAX);
        let fresh = self.maps.verified_entry(source)?.is_some_and(|v| {
            v.tenant == tenant
                && v.reserved == credential
                && v.expires_ns > now.saturating_add(half)
        });
        if !fresh {
            self.maps
                .set_verified(source, tenant, credential, valid_for)
                .with_context(|| format!("cannot record {source} as verified"))?;
        }
        Ok(())
    }

    /// Removes verified sources whose status lapsed; returns how many.
    pub fn sweep_verified(&mut self) -> anyhow::Result<usize> {
        self.maps.sweep_verified(super::maps::monotonic_ns())
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
