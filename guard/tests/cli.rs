//! The real binary's answers to bad input: one line naming the problem, a
//! non-zero exit, nothing attached. Needs no privileges.

use std::process::Command;

fn guard(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_guard"))
        .args(args)
        .env("GUARD_PIN_ROOT", "/nonexistent/guard-cli-test")
        .output()
        .expect("run guard");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), err)
}

#[test]
fn bad_flags_and_configs_fail_with_one_clear_line() {
    let dir = std::env::temp_dir().join(format!("guard-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[xdp]\nsyn_burst = -1\n").unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--iface", "eth0"], "--protect"),
        (
            &[
                "run",
                "--iface",
                "eth0",
                "--protect",
                "*:11211",
                "--syn-rate",
                "5",
                "--syn-burst",
                "0",
            ],
            "syn-burst",
        ),
        (&["run", "--config", bad.to_str().unwrap()], "bad.toml"),
        (
            &["run", "--config", "/nonexistent/guard.toml"],
            "cannot read config file",
        ),
        (&["run"], "nothing to run"),
    ];
    for (args, needle) in cases {
        let (ok, err) = guard(args);
        assert!(!ok, "{args:?} must fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err}"
        );
    }
    // clap's own errors (unknown values) also fail before anything happens.
    let (ok, err) = guard(&["run", "--xdp-mode", "fast"]);
    assert!(!ok);
    assert!(err.contains("unknown XDP mode"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_prints_the_resolved_configuration() {
    let out = Command::new(env!("CARGO_BIN_EXE_guard"))
        .args([
            "run",
            "--check",
            "--iface",
            "eth9",
            "--protect",
            "*:11211",
            "--syn-rate",
            "9",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("syn_rate = 9"), "{text}");
    assert!(text.contains("\"*:11211\""), "{text}");
}

#[test]
fn operator_commands_without_pins_explain_themselves() {
    let (ok, err) = guard(&["deny", "list"]);
    assert!(!ok);
    assert!(err.contains("is guard attached?"), "{err}");
}

#[test]
fn probe_rejects_bad_addresses_and_settings_before_probing() {
    let cases: &[(&[&str], &str)] = &[
        (&["probe"], "<ADDR:PORT>"),
        (&["probe", "nohost"], "invalid value 'nohost'"),
        (
            &["probe", "127.0.0.1:11211", "--against", "10.0.0.1"],
            "invalid value '10.0.0.1'",
        ),
        (
            &["probe", "127.0.0.1:11211", "--outlier-ratio", "0.5"],
            "must be 0 (latency not judged) or 1.1..=1000",
        ),
        (
            &["probe", "127.0.0.1:11211", "--timeout-ms", "0"],
            "--timeout-ms",
        ),
    ];
    for (args, needle) in cases {
        let (ok, err) = guard(args);
        assert!(!ok, "{args:?} must fail");
        let first = err.lines().next().unwrap_or_default();
        assert!(first.starts_with("error: "), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// Every command's `--help`, run on the real binary, succeeds, and names
/// each of its flags; every command and argument has help text. The
/// commands are walked from the CLI's own definition, so one added later
/// is held to the same.
#[test]
fn every_command_has_complete_help() {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, path: &[String], out: &mut Vec<(Vec<String>, clap::Command)>) {
        for sub in cmd.get_subcommands() {
            let mut p = path.to_vec();
            p.push(sub.get_name().to_owned());
            out.push((p.clone(), sub.clone()));
            walk(sub, &p, out);
        }
    }
    let top = guard::cli::Cli::command();
    let mut commands = vec![(Vec::new(), top.clone())];
    walk(&top, &[], &mut commands);
    assert!(commands.len() >= 15, "{} commands", commands.len());
    for (path, cmd) in &commands {
        let name = format!("guard {}", path.join(" "));
        assert!(cmd.get_about().is_some(), "{name}: no description");
        let out = Command::new(env!("CARGO_BIN_EXE_guard"))
            .args(path)
            .arg("--help")
            .output()
            .expect("run guard");
        assert!(out.status.success(), "{name} --help failed");
        let help = String::from_utf8_lossy(&out.stdout);
        for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            let id = arg.get_id().as_str();
            assert!(arg.get_help().is_some(), "{name}: {id} has no help");
            if let Some(long) = arg.get_long() {
                assert!(
                    help.contains(&format!("--{long}")),
                    "{name} --help: no --{long}"
                );
            }
        }
        for sub in cmd.get_subcommands() {
            assert!(
                help.contains(sub.get_name()),
                "{name} --help: no {}",
                sub.get_name()
            );
        }
    }
}

/// `guard run --check --config guard.example.toml`, as an operator runs
/// it: the example at the top of the repository is a configuration the
/// real binary accepts (that it has every option is checked beside
/// `config::Config`).
#[test]
fn the_example_config_passes_check() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../guard.example.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_guard"))
        .args(["run", "--check", "--config", example])
        .env("GUARD_PIN_ROOT", "/nonexistent/guard-cli-test")
        .output()
        .expect("run guard");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let printed = String::from_utf8_lossy(&out.stdout);
    // What is in force, the example's own values among it.
    for line in ["interfaces = [\"eth0\"]", "hosts = 1", "name = \"globex\""] {
        assert!(printed.contains(line), "no {line} in {printed}");
    }
}
