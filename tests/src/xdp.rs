//! The XDP program loaded for `BPF_PROG_TEST_RUN`: real verifier, real maps,
//! pinned under a unique bpffs directory that is removed on drop.

use std::{collections::BTreeMap, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp, XdpMode},
};
use guard::{
    ebpf::{GUARD_OBJECT, ensure_bpffs, maps::GuardMaps},
    paths::Paths,
};
use guard_common::{GuardConfig, PROGRAM_FLOOR, PROGRAM_GUARD, PROGRAM_PASS, RateLimit};

/// XDP verdicts as the kernel returns them.
pub mod verdict {
    /// `XDP_ABORTED`.
    pub const ABORTED: u32 = 0;
    /// `XDP_DROP`.
    pub const DROP: u32 = 1;
    /// `XDP_PASS`.
    pub const PASS: u32 = 2;
    /// `XDP_TX`: the (rewritten) frame goes back out where it came in.
    pub const TX: u32 = 3;
}

/// The guard program and the empty baseline program, loaded and verified,
/// with typed access to their maps.
pub struct XdpUnderTest {
    ebpf: Ebpf,
    /// Handles on the maps (opened from this instance's pins).
    pub maps: GuardMaps,
    pins: PinDir,
}

/// Removes a pin directory and everything pinned in it, also when loading
/// fails half-way.
struct PinDir(Paths);

impl Drop for PinDir {
    fn drop(&mut self) {
        let dir = self.0.pin_dir();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&dir);
        let _ = std::fs::remove_dir(self.0.pin_root());
    }
}

impl XdpUnderTest {
    /// Loads both programs with maps pinned under a fresh directory, and a
    /// configuration that admits everything (no limits) until a test sets one.
    pub fn load() -> Self {
        crate::require_root();
        ensure_bpffs().expect("bpffs");
        let root = PathBuf::from(format!("/sys/fs/bpf/{}", crate::unique_name("xdp")));
        let paths = Paths::new(
            &root,
            std::env::temp_dir().join(crate::unique_name("state")),
        );
        std::fs::create_dir_all(paths.pin_dir()).expect("create pin dir");
        let pins = PinDir(paths.clone());
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(paths.pin_dir())
            .load(GUARD_OBJECT)
            .expect("load the XDP object");
        for name in [PROGRAM_GUARD, PROGRAM_PASS, PROGRAM_FLOOR] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .expect("program present")
                .try_into()
                .expect("an XDP program");
            prog.load()
                .unwrap_or_else(|e| panic!("verifier rejected {name}: {e:#}"));
        }
        let mut maps = GuardMaps::open(&paths).expect("open pinned maps");
        maps.set_config(&GuardConfig {
            source: RateLimit::UNLIMITED,
            global: RateLimit::UNLIMITED,
            // Every crossing described, unless a test sets a budget.
            events: RateLimit::per_second(1_000_000, 1_000_000),
            ipv6_prefix_len: 64,
            flags: 0,
        })
        .expect("config");
        Self { ebpf, maps, pins }
    }

    /// Loads the guard protecting `*:PORT` (both families, no tenant).
    pub fn protecting(port: u16) -> Self {
        let mut x = Self::load();
        let l: guard::config::Listener = format!("*:{port}").parse().expect("listener");
        let wanted: Vec<_> = l
            .keys()
            .into_iter()
            .map(|k| (k, guard_common::ListenerValue::default()))
            .collect();
        x.maps.sync_listeners(&wanted).expect("protect");
        x
    }

    /// Attaches the empty `XDP_PASS` program to `ifname` of `ns` in driver
    /// mode, until this instance is dropped. On veth, frames a peer's XDP
    /// program sends back with `XDP_TX` in driver mode arrive only at an
    /// interface with a native XDP program of its own.
    pub fn attach_pass(&mut self, ns: &crate::NsHandle, ifname: &str) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM_PASS)
            .context("the empty program is in the object")?
            .try_into()?;
        let ifname = ifname.to_owned();
        ns.run_in(move || prog.attach(&ifname, XdpMode::Driver).map(drop))?
            .context("attaching the empty XDP program in driver mode")
    }

    /// Where this instance's pins live.
    pub fn paths(&self) -> &Paths {
        &self.pins.0
    }

    fn program(&self, name: &str) -> &Xdp {
        self.ebpf
            .program(name)
            .expect("program present")
            .try_into()
            .expect("an XDP program")
    }

    /// Runs the guard once over `frame` and returns its verdict.
    pub fn run(&self, frame: &[u8]) -> u32 {
        self.run_program(PROGRAM_GUARD, frame, 1).0
    }

    /// Runs a program `repeat` times over `frame`: (verdict, ns per run).
    pub fn run_program(&self, name: &str, frame: &[u8], repeat: u32) -> (u32, u64) {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        };
        let r = self
            .program(name)
            .test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {name} failed: {e:#}"));
        (r.return_value, r.duration.as_nanos() as u64)
    }

    /// Runs the guard once over `frame` as if it arrived on the interface
    /// with index `ifindex` (queue 0) of the calling thread's network
    /// namespace: `BPF_PROG_TEST_RUN` takes the `xdp_md` context, and the
    /// kernel wants a real interface whose queue has XDP receive state
    /// (one with a native XDP program, see [`Self::attach_pass`]).
    pub fn run_on(&self, ifindex: u32, frame: &[u8]) -> u32 {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex. The kernel wants data and
        // data_meta 0 and data_end the frame's length.
        let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        };
        self.program(PROGRAM_GUARD)
            .test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on ifindex {ifindex} failed: {e:#}"))
            .return_value
    }

    /// Runs the guard once over `frame`: its verdict and the frame as the
    /// program left it (rewritten, resized).
    pub fn run_out(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; 4096];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let r = self
            .program(PROGRAM_GUARD)
            .test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {PROGRAM_GUARD} failed: {e:#}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// As [`Self::judge`], also returning the frame as the program left it.
    pub fn judge_out(&self, frame: &[u8]) -> (u32, BTreeMap<&'static str, u64>, Vec<u8>) {
        let before = self.counters();
        let (v, out) = self.run_out(frame);
        (v, moved(&before, &self.counters()), out)
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.maps.counters().expect("read counters")
    }

    /// Runs the guard once and returns (verdict, counters that moved).
    pub fn judge(&self, frame: &[u8]) -> (u32, BTreeMap<&'static str, u64>) {
        let before = self.counters();
        let v = self.run(frame);
        (v, moved(&before, &self.counters()))
    }
}

/// The counters that moved between two readings, by how much.
fn moved(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
) -> BTreeMap<&'static str, u64> {
    after
        .iter()
        .filter_map(|(k, a)| {
            let d = a - before.get(k).copied().unwrap_or(0);
            (d != 0).then_some((*k, d))
        })
        .collect()
}
