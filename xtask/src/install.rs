//! `cargo xtask install`: the release binary, the systemd unit, the
//! example configuration and the operator docs, where a package would put
//! them. `--dry-run` prints the plan and touches nothing; `--destdir`
//! stages the same tree under another root (for packaging, and for the
//! tests).
//!
//! It never writes `guard.toml`, never overwrites an operator's file but
//! the ones it owns, and never starts or restarts the service: an upgrade
//! is `cargo xtask install` then `systemctl restart guard`, which keeps
//! the XDP program attached throughout (docs/operations.md).

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use clap::Args;

/// Where the unit in the repository expects the binary, the config and
/// the docs; the plan rewrites these to the chosen directories.
const UNIT_BINARY: &str = "/usr/local/bin/guard";
const UNIT_CONFIG_DIR: &str = "/etc/guard/";
const UNIT_DOC_DIR: &str = "/usr/local/share/doc/guard/";

/// The operator docs installed beside each other (`alerts.yml` is loaded
/// by `prometheus.yml` from the same directory).
const DOCS: &[&str] = &[
    "README.md",
    "docs/operations.md",
    "docs/fleet.md",
    "docs/alerts.yml",
    "docs/prometheus.yml",
];

/// `cargo xtask install` flags.
#[derive(Args, Debug, Clone)]
pub struct InstallArgs {
    /// The binary goes to PREFIX/bin, the docs to PREFIX/share/doc/guard.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// The example config goes to SYSCONFDIR/guard.
    #[arg(long, default_value = "/etc")]
    pub sysconfdir: PathBuf,
    /// Where the systemd unit goes.
    #[arg(long, default_value = "/etc/systemd/system")]
    pub unitdir: PathBuf,
    /// Stage everything under this root instead of / (the unit still
    /// names the final paths).
    #[arg(long)]
    pub destdir: Option<PathBuf>,
    /// Print what would be installed, and build and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Install this binary instead of building target/release/guard.
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

/// What one file becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A copy of a file.
    Copy(PathBuf),
    /// Text made here (the unit, with its paths rewritten).
    Text(String),
}

/// One file to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub content: Content,
    /// Where it goes (under `--destdir`, if any).
    pub to: PathBuf,
    pub mode: u32,
}

impl InstallArgs {
    fn binary_path(&self) -> PathBuf {
        self.prefix.join("bin/guard")
    }

    fn config_dir(&self) -> PathBuf {
        self.sysconfdir.join("guard")
    }

    fn doc_dir(&self) -> PathBuf {
        self.prefix.join("share/doc/guard")
    }

    /// `path` under `--destdir`.
    fn staged(&self, path: &Path) -> PathBuf {
        match &self.destdir {
            Some(root) => root.join(path.strip_prefix("/").unwrap_or(path)),
            None => path.to_path_buf(),
        }
    }
}

/// The files to install, from the repository at `root`.
pub fn plan(root: &Path, args: &InstallArgs) -> anyhow::Result<Vec<Step>> {
    for dir in [&args.prefix, &args.sysconfdir, &args.unitdir] {
        if !dir.is_absolute() {
            bail!("{} is not an absolute path", dir.display());
        }
    }
    let unit = std::fs::read_to_string(root.join("packaging/guard.service"))
        .context("cannot read packaging/guard.service")?;
    for expected in [UNIT_BINARY, UNIT_CONFIG_DIR, UNIT_DOC_DIR] {
        if !unit.contains(expected) {
            bail!("packaging/guard.service no longer names {expected}: update xtask install");
        }
    }
    let dir = |p: PathBuf| format!("{}/", p.display());
    let unit = unit
        .replace(UNIT_BINARY, &args.binary_path().display().to_string())
        .replace(UNIT_CONFIG_DIR, &dir(args.config_dir()))
        .replace(UNIT_DOC_DIR, &dir(args.doc_dir()));
    let binary = args
        .binary
        .clone()
        .unwrap_or_else(|| root.join("target/release/guard"));
    let mut steps = vec![
        Step {
            content: Content::Copy(binary),
            to: args.staged(&args.binary_path()),
            mode: 0o755,
        },
        Step {
            content: Content::Text(unit),
            to: args.staged(&args.unitdir.join("guard.service")),
            mode: 0o644,
        },
        Step {
            content: Content::Copy(root.join("guard.example.toml")),
            to: args.staged(&args.config_dir().join("guard.example.toml")),
            mode: 0o644,
        },
    ];
    for doc in DOCS {
        let name = Path::new(doc).file_name().expect("a file name");
        steps.push(Step {
            content: Content::Copy(root.join(doc)),
            to: args.staged(&args.doc_dir().join(name)),
            mode: 0o644,
        });
    }
    Ok(steps)
}

/// Carries out (or, with `--dry-run`, prints) the plan, writing what it
/// does to `log`.
pub fn install(
    root: &Path,
    args: &InstallArgs,
    log: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let steps = plan(root, args)?;
    for step in &steps {
        let from = match &step.content {
            Content::Copy(p) => p.display().to_string(),
            Content::Text(_) => "packaging/guard.service (paths rewritten)".to_owned(),
        };
        writeln!(
            log,
            "{}install -m {:o} {from} {}",
            if args.dry_run { "would " } else { "" },
            step.mode,
            step.to.display()
        )?;
        if !args.dry_run {
            put(step)?;
        }
    }
    let config = args.config_dir().join("guard.toml");
    writeln!(
        log,
        "next: write {} (start from guard.example.toml beside it; \
         `guard run --check --config {}` validates it), then \
         `systemctl daemon-reload && systemctl enable --now guard`; \
         to upgrade a running guard, `systemctl restart guard` \
         (the XDP program stays attached meanwhile)",
        config.display(),
        config.display()
    )?;
    Ok(())
}

/// Writes one file beside its destination and renames it into place, so
/// a running binary is replaced, never written into ("text file busy"),
/// and a reader never sees half a file.
fn put(step: &Step) -> anyhow::Result<()> {
    let dir = step.to.parent().context("a destination has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let bytes = match &step.content {
        Content::Copy(p) => {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?
        }
        Content::Text(t) => t.clone().into_bytes(),
    };
    let name = step
        .to
        .file_name()
        .context("a file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.xtask-{}", std::process::id()));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(&bytes)?;
    f.set_permissions(std::fs::Permissions::from_mode(step.mode))?;
    f.sync_all()?;
    std::fs::rename(&tmp, &step.to)
        .with_context(|| format!("cannot move {} into place", step.to.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf()
    }

    fn args(destdir: Option<PathBuf>, dry_run: bool) -> InstallArgs {
        InstallArgs {
            prefix: "/opt/guard".into(),
            sysconfdir: "/etc/opt".into(),
            unitdir: "/lib/systemd/system".into(),
            destdir,
            dry_run,
            // Any file will do as the binary: building release is slow.
            binary: Some(root().join("Cargo.toml")),
        }
    }

    fn unit_of(steps: &[Step]) -> &str {
        steps
            .iter()
            .find_map(|s| match &s.content {
                Content::Text(t) => Some(t.as_str()),
                Content::Copy(_) => None,
            })
            .expect("the unit")
    }

    #[test]
    fn the_plan_puts_each_file_where_a_package_would() {
        let steps = plan(&root(), &args(None, false)).unwrap();
        let to: Vec<String> = steps.iter().map(|s| s.to.display().to_string()).collect();
        assert_eq!(
            to,
            [
                "/opt/guard/bin/guard",
                "/lib/systemd/system/guard.service",
                "/etc/opt/guard/guard.example.toml",
                "/opt/guard/share/doc/guard/README.md",
                "/opt/guard/share/doc/guard/operations.md",
                "/opt/guard/share/doc/guard/fleet.md",
                "/opt/guard/share/doc/guard/alerts.yml",
                "/opt/guard/share/doc/guard/prometheus.yml",
            ]
        );
        assert_eq!(steps[0].mode, 0o755);
        // The unit names the installed paths, not the repository's.
        let unit = unit_of(&steps);
        assert!(
            unit.contains(
                "\nExecStart=/opt/guard/bin/guard run --config /etc/opt/guard/guard.toml\n"
            ),
            "{unit}"
        );
        assert!(unit.contains("Documentation=file:/opt/guard/share/doc/guard/operations.md"));
        assert!(!unit.contains("/usr/local"), "{unit}");
        let rel = InstallArgs {
            prefix: "usr".into(),
            ..args(None, false)
        };
        assert!(plan(&root(), &rel).is_err());
    }

    /// A dry run prints every destination and creates nothing, not even
    /// under `--destdir`.
    #[test]
    fn a_dry_run_prints_the_plan_and_touches_nothing() {
        let dir = std::env::temp_dir().join(format!("guard-xtask-dry-{}", std::process::id()));
        let mut out = Vec::new();
        install(&root(), &args(Some(dir.clone()), true), &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(!dir.exists(), "a dry run created {}", dir.display());
        for step in plan(&root(), &args(Some(dir.clone()), true)).unwrap() {
            let line = format!("would install -m {:o} ", step.mode);
            assert!(
                out.lines()
                    .any(|l| l.starts_with(&line) && l.ends_with(&step.to.display().to_string())),
                "no `{line}… {}` in\n{out}",
                step.to.display()
            );
        }
        assert!(out.contains("systemctl restart guard"), "{out}");
    }

    /// Under `--destdir` every file lands with its mode, the unit with
    /// the final paths; a second install (an upgrade) replaces them.
    #[test]
    fn a_staged_install_writes_every_file_and_can_run_again() {
        let dir = std::env::temp_dir().join(format!("guard-xtask-stage-{}", std::process::id()));
        let a = args(Some(dir.clone()), false);
        for _ in 0..2 {
            install(&root(), &a, &mut std::io::sink()).unwrap();
        }
        let binary = dir.join("opt/guard/bin/guard");
        assert_eq!(
            std::fs::read(&binary).unwrap(),
            std::fs::read(root().join("Cargo.toml")).unwrap()
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&binary), 0o755);
        let unit = dir.join("lib/systemd/system/guard.service");
        assert_eq!(mode(&unit), 0o644);
        assert!(
            std::fs::read_to_string(&unit)
                .unwrap()
                .contains("ExecStart=/opt/guard/bin/guard run")
        );
        assert!(dir.join("etc/opt/guard/guard.example.toml").exists());
        assert!(!dir.join("etc/opt/guard/guard.toml").exists());
        assert!(dir.join("opt/guard/share/doc/guard/alerts.yml").exists());
        // Nothing left half-written beside them.
        let leftovers: Vec<_> = std::fs::read_dir(binary.parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What the unit must keep for docs/operations.md to be true; and,
    /// where systemd is installed, `systemd-analyze verify` on the unit
    /// as installed.
    #[test]
    fn the_unit_keeps_what_operations_promises() {
        let unit = std::fs::read_to_string(root().join("packaging/guard.service")).unwrap();
        let values = |key: &str| -> Vec<String> {
            unit.lines()
                .filter_map(|l| l.strip_prefix(&format!("{key}=")))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            values("CapabilityBoundingSet"),
            ["CAP_BPF CAP_NET_ADMIN CAP_PERFMON"]
        );
        assert_eq!(values("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
        assert_eq!(values("Restart"), ["on-failure"]);
        assert_eq!(values("RuntimeDirectoryPreserve"), ["yes"]);
        assert_eq!(values("LimitNOFILE"), ["1048576"]);
        assert!(
            values("User").is_empty(),
            "guard runs as uid 0 (see the unit)"
        );
        assert!(
            values("ProtectKernelTunables").is_empty(),
            "it makes /sys/fs/bpf read-only"
        );
        if std::process::Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("systemd-analyze is not installed: the unit's syntax is not verified");
            return;
        }
        // Installed under a prefix whose binary exists, as verify wants.
        let dir = std::env::temp_dir().join(format!("guard-xtask-verify-{}", std::process::id()));
        let a = InstallArgs {
            prefix: dir.clone(),
            sysconfdir: dir.join("etc"),
            unitdir: dir.join("units"),
            destdir: None,
            dry_run: false,
            binary: Some("/bin/true".into()),
        };
        install(&root(), &a, &mut std::io::sink()).unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.join("units/guard.service"))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify: {said}"
        );
    }
}
