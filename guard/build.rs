use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Builds the XDP program (`guard-ebpf`) for the BPF target with the nightly
/// toolchain and leaves the object in `OUT_DIR`, where `guard::ebpf` embeds it.
/// With guard's `bench-programs` feature the object also holds the
/// benchmark's programs.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .context("guard has no parent directory")?
        .join("guard-ebpf");
    let root_dir = root_dir.to_str().context("non-UTF-8 workspace path")?;
    let bench = std::env::var_os("CARGO_FEATURE_BENCH_PROGRAMS").is_some();
    let features: &[&str] = if bench { &["bench"] } else { &[] };
    let package = Package {
        name: "guard-ebpf",
        root_dir,
        features,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
}
