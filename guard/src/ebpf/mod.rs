//! Loading, attaching and pinning the XDP program, and adopting what an
//! earlier `guard run` left pinned.
//!
//! Everything lives under a versioned bpffs directory (see [`Paths`]): the
//! maps by name and one link per interface. A link pinned there keeps the
//! program attached while the daemon is down; a new daemon swaps its freshly
//! loaded program into the existing link atomically (`bpf_link_update`), so
//! protection never lapses across a restart. Only `guard xdp detach`
//! removes it. An upgrade to a build with another map layout takes over the
//! links an older layout pinned the same way (its maps, and so its buckets
//! and live deny/allow entries, are left behind and removed).

pub mod control;
pub mod cookies;
pub mod events;
pub mod maps;
pub mod settings;
pub mod trace;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use guard_common::PROGRAM_GUARD;
use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::{config::XdpModeSetting, paths::Paths};

/// The compiled XDP object, built by `build.rs` from `guard-ebpf`.
pub static GUARD_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard"));

/// The mode an interface's program actually runs in.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    /// Native, in the driver.
    Drv,
    /// Generic, in the kernel's receive path.
    Skb,
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Drv => "drv",
            Self::Skb => "skb",
        })
    }
}

/// One interface the guard is attached to, as recorded in the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedInterface {
    /// Interface name.
    pub name: String,
    /// Mode in force.
    pub mode: AttachedMode,
    /// Unix time of the first attachment.
    pub since_unix: u64,
}

/// The state file: which interfaces carry the guard, in which mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachState {
    /// Attached interfaces.
    pub interfaces: Vec<AttachedInterface>,
}

impl AttachState {
    /// Reads the state file; a missing file is an empty state.
    pub fn load(paths: &Paths) -> anyhow::Result<Self> {
        Ok(crate::paths::read_state(&paths.state_file())?.unwrap_or_default())
    }

    fn save(&self, paths: &Paths) -> anyhow::Result<()> {
        crate::paths::write_state(&paths.state_file(), self)
    }

    fn mode_of(&self, iface: &str) -> Option<&AttachedInterface> {
        self.interfaces.iter().find(|i| i.name == iface)
    }
}

/// The loaded, attached guard. Dropping it leaves the program attached.
pub struct XdpGuard {
    // Holds the program (and its maps) loaded by this process.
    ebpf: Ebpf,
    state: AttachState,
}

impl XdpGuard {
    /// Loads the program and attaches it to `interfaces`, adopting pinned
    /// maps and links of an earlier run. Interfaces pinned by an earlier run
    /// but no longer wanted are detached. On error nothing new stays
    /// attached or pinned.
    pub fn attach(
        paths: &Paths,
        interfaces: &[String],
        mode: XdpModeSetting,
    ) -> anyhow::Result<Self> {
        ensure_bpffs()?;
        maps::check_pinned_layout(paths)?;
        let pin_dir = paths.pin_dir();
        let fresh = !pin_dir.join(guard_common::maps::CONFIG).exists();
        fs::create_dir_all(paths.link_dir()).with_context(|| {
            format!("cannot create pin directory {}", paths.link_dir().display())
        })?;

        let mut attempt = Attempt {
            paths,
            fresh,
            new_links: Vec::new(),
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(GUARD_OBJECT)
            .context("the kernel refused the XDP object (needs BPF, BTF and CAP_BPF/root)")?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_GUARD)
            .context("the XDP object has no `guard` program")?
            .try_into()?;
        program
            .load()
            .context("the verifier rejected the XDP program")?;

        let older = paths.older_layouts();
        let mut old = AttachState::load(paths).unwrap_or_default();
        for (_, state_dir) in &older {
            let older: AttachState = crate::paths::read_state(&state_dir.join("xdp.json"))
                .ok()
                .flatten()
                .unwrap_or_default();
            for entry in older.interfaces {
                if old.mode_of(&entry.name).is_none() {
                    old.interfaces.push(entry);
                }
            }
        }
        let mut state = AttachState::default();
        for iface in interfaces {
            let pin = paths.link_pin(iface);
            if !pin.exists() {
                take_over_older_link(&older, iface, &pin)?;
            }
            let adopted = if pin.exists() {
                adopt(program, &pin, iface)?
            } else {
                false
            };
            let entry = if adopted {
                let prev = old.mode_of(iface);
                let mode_now = prev.map_or(AttachedMode::Skb, |p| p.mode);
                if !mode_matches(mode, mode_now) {
                    warn!(
                        "{iface}: keeping the pinned link's {mode_now} mode rather than detaching; \
                         run `guard xdp detach` first to change it to {mode}"
                    );
                }
                info!(
                    "{iface}: adopted the pinned XDP link ({mode_now} mode), program replaced atomically"
                );
                AttachedInterface {
                    name: iface.clone(),
                    mode: mode_now,
                    since_unix: prev.map_or_else(unix_now, |p| p.since_unix),
                }
            } else {
                let used = attach_new(program, iface, mode, &pin)?;
                attempt.new_links.push(pin);
                AttachedInterface {
                    name: iface.clone(),
                    mode: used,
                    since_unix: unix_now(),
                }
            };
            state.interfaces.push(entry);
        }

        // Interfaces an earlier run attached that this run does not want.
        for stale in &old.interfaces {
            if !interfaces.contains(&stale.name) {
                detach_link(&paths.link_pin(&stale.name))?;
                info!("{}: detached (no longer configured)", stale.name);
            }
        }
        for entry in fs::read_dir(paths.link_dir())? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !interfaces.contains(&name) {
                detach_link(&entry.path())?;
                info!("{name}: detached (no longer configured)");
            }
        }
        state.save(paths)?;
        attempt.commit();
        remove_older_layouts(&older);
        Ok(Self { ebpf, state })
    }

    /// What is attached where.
    pub fn state(&self) -> &AttachState {
        &self.state
    }

    /// Starts forwarding the trace lines of the program this process
    /// loaded (and put on the interfaces) into `ring` and the log; see
    /// [`trace::spawn_logger`]. Needs a tokio runtime.
    pub fn spawn_trace_logger(
        &mut self,
        ring: std::sync::Arc<trace::TraceRing>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        trace::spawn_logger(&mut self.ebpf, ring)
    }
}

/// Undoes a half-finished attach: links pinned by this attempt, and the map
/// pins if there were none before it.
struct Attempt<'a> {
    paths: &'a Paths,
    fresh: bool,
    new_links: Vec<std::path::PathBuf>,
}

impl Attempt<'_> {
    fn commit(mut self) {
        self.new_links.clear();
        self.fresh = false;
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        for pin in &self.new_links {
            let _ = detach_link(pin);
        }
        if self.fresh {
            remove_map_pins(self.paths);
        }
    }
}

fn mode_matches(wanted: XdpModeSetting, actual: AttachedMode) -> bool {
    matches!(
        (wanted, actual),
        (XdpModeSetting::Auto, _)
            | (XdpModeSetting::Drv, AttachedMode::Drv)
            | (XdpModeSetting::Skb, AttachedMode::Skb)
    )
}

/// Swaps this process's program into a pinned link. `Ok(false)` if the pin
/// is stale (its interface went away), in which case it is removed.
fn adopt(program: &mut Xdp, pin: &Path, iface: &str) -> anyhow::Result<bool> {
    let link = PinnedLink::from_pin(pin)
        .with_context(|| format!("cannot open pinned link {}", pin.display()))?;
    let fd_link: FdLink = link.into();
    let xdp_link = XdpLink::try_from(fd_link)
        .with_context(|| format!("{} is not an XDP link", pin.display()))?;
    match program.attach_to_link(xdp_link) {
        Ok(_) => Ok(true),
        Err(e) => {
            warn!("{iface}: pinned link is defunct ({e}); attaching afresh");
            let _ = fs::remove_file(pin);
            Ok(false)
        }
    }
}

fn attach_new(
    program: &mut Xdp,
    iface: &str,
    mode: XdpModeSetting,
    pin: &Path,
) -> anyhow::Result<AttachedMode> {
    let (id, used) = match mode {
        XdpModeSetting::Drv => (
            program.attach(iface, XdpMode::Driver).with_context(|| {
                format!("failed to attach the XDP program to {iface} in driver mode — try --xdp-mode skb")
            })?,
            AttachedMode::Drv,
        ),
        XdpModeSetting::Skb => (
            program
                .attach(iface, XdpMode::Skb)
                .with_context(|| format!("failed to attach the XDP program to {iface} in skb mode"))?,
            AttachedMode::Skb,
        ),
        XdpModeSetting::Auto => match program.attach(iface, XdpMode::Driver) {
            Ok(id) => (id, AttachedMode::Drv),
            Err(e) => {
                warn!("{iface}: driver mode unavailable ({e}); falling back to skb mode");
                (
                    program.attach(iface, XdpMode::Skb).with_context(|| {
                        format!("failed to attach the XDP program to {iface} in driver or skb mode")
                    })?,
                    AttachedMode::Skb,
                )
            }
        },
    };
    info!("{iface}: XDP program attached in {used} mode");
    let link = program.take_link(id)?;
    let fd_link = FdLink::try_from(link)
        .context("the kernel attached XDP without a bpf_link (needs Linux ≥ 5.9)")?;
    fd_link
        .pin(pin)
        .with_context(|| format!("cannot pin the XDP link at {}", pin.display()))?;
    Ok(used)
}

/// Moves the link an older layout pinned for `iface` to `pin`, where
/// [`adopt`] then swaps this program into it: the interface is never
/// without a program.
fn take_over_older_link(
    older: &[(PathBuf, PathBuf)],
    iface: &str,
    pin: &Path,
) -> anyhow::Result<()> {
    for (pin_dir, _) in older {
        let old = pin_dir.join("links").join(iface);
        if !old.exists() {
            continue;
        }
        let link = PinnedLink::from_pin(&old)
            .with_context(|| format!("cannot open pinned link {}", old.display()))?;
        let fd_link: FdLink = link.into();
        fd_link
            .pin(pin)
            .with_context(|| format!("cannot pin the XDP link at {}", pin.display()))?;
        fs::remove_file(&old).with_context(|| format!("cannot remove {}", old.display()))?;
        info!(
            "{iface}: taking over the XDP link pinned under {} by an older guard",
            pin_dir.display()
        );
        return Ok(());
    }
    Ok(())
}

/// Removes what daemons of older layouts (`older`, from
/// [`Paths::older_layouts`]) left: links still pinned there are detached,
/// their maps and state files removed. Best effort: what cannot be
/// removed is said and left for `guard xdp detach`.
fn remove_older_layouts(older: &[(PathBuf, PathBuf)]) {
    for (pin_dir, state_dir) in older {
        if let Ok(links) = fs::read_dir(pin_dir.join("links")) {
            for link in links.flatten() {
                let name = link.file_name().to_string_lossy().into_owned();
                match detach_link(&link.path()) {
                    Ok(()) => {
                        info!("{name}: detached the older guard's link (no longer configured)")
                    }
                    Err(e) => warn!("{name}: cannot detach the older guard's link: {e:#}"),
                }
            }
        }
        for dir in [pin_dir, state_dir] {
            if dir.exists() {
                match fs::remove_dir_all(dir) {
                    Ok(()) => info!("removed {} (an older map layout)", dir.display()),
                    Err(e) => warn!("cannot remove {}: {e}", dir.display()),
                }
            }
        }
    }
}

/// Detaches the link pinned at `pin` (if any) by removing its last reference.
fn detach_link(pin: &Path) -> anyhow::Result<()> {
    if !pin.exists() {
        return Ok(());
    }
    match PinnedLink::from_pin(pin) {
        Ok(link) => {
            // Dropping the unpinned fd releases the link, which detaches it.
            drop(link.unpin()?);
        }
        Err(_) => fs::remove_file(pin)?,
    }
    Ok(())
}

fn remove_map_pins(paths: &Paths) {
    for name in guard_common::maps::ALL {
        let _ = fs::remove_file(paths.map_pin(name));
    }
}

/// Detaches the guard from every interface and removes every pin and the
/// state file. Idempotent.
pub fn detach_all(paths: &Paths) -> anyhow::Result<Vec<String>> {
    let mut detached = Vec::new();
    // Detached here rather than left to `remove_older_layouts`, so that a
    // link that cannot be detached fails the command.
    let older = paths.older_layouts();
    for (pin_dir, _) in &older {
        if let Ok(links) = fs::read_dir(pin_dir.join("links")) {
            for link in links.flatten() {
                detach_link(&link.path())?;
                detached.push(link.file_name().to_string_lossy().into_owned());
            }
        }
    }
    remove_older_layouts(&older);
    let link_dir = paths.link_dir();
    if link_dir.exists() {
        for entry in fs::read_dir(&link_dir)? {
            let entry = entry?;
            detach_link(&entry.path())?;
            detached.push(entry.file_name().to_string_lossy().into_owned());
        }
        let _ = fs::remove_dir(&link_dir);
    }
    remove_map_pins(paths);
    let _ = fs::remove_dir(paths.pin_dir());
    let _ = fs::remove_dir(paths.pin_root());
    let _ = fs::remove_file(paths.state_file());
    let _ = fs::remove_file(paths.configured_cidrs_file());
    let _ = fs::remove_file(paths.offenders_file());
    let _ = fs::remove_file(paths.escalation_file());
    detached.sort();
    detached.dedup();
    Ok(detached)
}

/// Seconds since the Unix epoch, as the state files record times.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Mounts bpffs at /sys/fs/bpf unless it already is.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let path = std::ffi::CString::new(crate::paths::BPFFS).expect("no NUL");
    // SAFETY: statfs with a valid C string and an out pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut st) };
    if rc == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    fs::create_dir_all(crate::paths::BPFFS)?;
    let fstype = std::ffi::CString::new("bpf").expect("no NUL");
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "cannot mount bpffs at {}: {} (run as root, or `mount -t bpf bpf /sys/fs/bpf`)",
            crate::paths::BPFFS,
            std::io::Error::last_os_error()
        );
    }
    info!("mounted bpffs at {}", crate::paths::BPFFS);
    Ok(())
}
