use which::which;

/// Rebuild when the linker changes: it is an undeclared dependency of this crate.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
