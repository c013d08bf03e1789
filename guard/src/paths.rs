//! Every filesystem location guard uses, in one place.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use guard_common::LAYOUT_VERSION;

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Default root of guard's pins inside bpffs.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/guard";
/// Default directory for guard's runtime state (tmpfs: gone after a reboot,
/// like the pins it describes).
pub const DEFAULT_STATE_ROOT: &str = "/run/guard";

/// The pin and state locations of one guard installation.
#[derive(Clone, Debug)]
pub struct Paths {
    pin_root: PathBuf,
    state_root: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Self::new(DEFAULT_PIN_ROOT, DEFAULT_STATE_ROOT)
    }
}

impl Paths {
    /// Locations under the given roots.
    pub fn new(pin_root: impl Into<PathBuf>, state_root: impl Into<PathBuf>) -> Self {
        Self {
            pin_root: pin_root.into(),
            state_root: state_root.into(),
        }
    }

    /// The root that holds every layout version's pins.
    pub fn pin_root(&self) -> &Path {
        &self.pin_root
    }

    /// Pins of the current layout: maps by name, links under `links/`.
    /// Versioned so that a daemon never adopts maps of another layout.
    pub fn pin_dir(&self) -> PathBuf {
        self.pin_root.join(format!("v{LAYOUT_VERSION}"))
    }

    /// Directory of pinned XDP links, one per interface.
    pub fn link_dir(&self) -> PathBuf {
        self.pin_dir().join("links")
    }

    /// The pinned link of one interface.
    pub fn link_pin(&self, iface: &str) -> PathBuf {
        self.link_dir().join(iface)
    }

    /// A pinned map.
    pub fn map_pin(&self, name: &str) -> PathBuf {
        self.pin_dir().join(name)
    }

    /// Pin and state directories left by daemons of older map layouts,
    /// oldest first: `(pin dir, state dir)`.
    pub fn older_layouts(&self) -> Vec<(PathBuf, PathBuf)> {
        let mut versions: Vec<u32> = std::fs::read_dir(&self.pin_root)
            .into_iter()
            .chain(std::fs::read_dir(&self.state_root))
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix('v')?
                    .parse::<u32>()
                    .ok()
            })
            .filter(|v| *v < LAYOUT_VERSION)
            .collect();
        versions.sort_unstable();
        versions.dedup();
        versions
            .into_iter()
            .map(|v| {
                (
                    self.pin_root.join(format!("v{v}")),
                    self.state_root.join(format!("v{v}")),
                )
            })
            .collect()
    }

    /// JSON description of the attachment (interfaces, modes).
    pub fn state_file(&self) -> PathBuf {
        self.state_root
            .join(format!("v{LAYOUT_VERSION}"))
            .join("xdp.json")
    }

    /// JSON report of the sources that crossed SYN budgets most often,
    /// written by the daemon for `guard xdp status`.
    pub fn offenders_file(&self) -> PathBuf {
        self.state_root
            .join(format!("v{LAYOUT_VERSION}"))
            .join("offenders.json")
    }

    /// JSON list of the deny/allow entries the last applied config set, so
    /// the next daemon removes those its config no longer has.
    pub fn configured_cidrs_file(&self) -> PathBuf {
        self.state_root
            .join(format!("v{LAYOUT_VERSION}"))
            .join("configured-cidrs.json")
    }
}

impl Paths {
    /// JSON record of the escalation ladder: every escalated source, its
    /// steps and why, and which deny entries escalation made; written by
    /// the daemon so a restart resumes the ladder and `guard deny list`
    /// can say which entries are escalation's.
    pub fn escalation_file(&self) -> PathBuf {
        self.state_root
            .join(format!("v{LAYOUT_VERSION}"))
            .join("escalation.json")
    }
}

/// Reads a JSON state file: `None` when there is none.
pub fn read_state<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("corrupt state file {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes a JSON state file, creating its directory. Written then renamed,
/// so a reader (or the next daemon after a crash) never sees half a file.
pub fn write_state(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
