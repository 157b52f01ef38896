//! OPERATIONS.md as a script: the install commands of its section 1 are
//! read from the file itself (the block after the
//! `<!-- install: ... -->` marker) and run under a temporary root, the way
//! an operator pastes them. They must build and install every binary the
//! document and the shipped systemd units run. Once the document told
//! operators to build two binaries and then install three, and nothing
//! installed a connector.
//!
//! Rewrites keep the run cheaper and harmless: the release profile becomes
//! this build's own (`--release` dropped, `target/release/` is
//! `target/<profile>/`; cargo then builds only what the named packages'
//! features change: `.ci/run` builds the same beforehand), absolute paths
//! go under the temporary root, and only `cargo build` and `install` lines
//! are run at all.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use onceonly_integration_tests::deployed::repository;

const MARKER: &str = "<!-- install:";
/// The shipped systemd units.
const UNITS: [&str; 3] = [
    "onceonly-broker.service",
    "onceonly-registry-mock@.service",
    "onceonly-connector@.service",
];

/// The shell block right after the marker.
fn install_block(document: &str) -> String {
    let after = document
        .split_once(MARKER)
        .map(|(_, after)| after)
        .expect("OPERATIONS.md marks its install commands");
    let block = after
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .map(|(block, _)| block)
        .expect("a ```sh block follows the marker");
    block.to_owned()
}

/// The `onceonly-*` programs the document runs: first words of its command
/// lines (also after `sudo -u onceonly`), and the units' `ExecStart*=`.
fn programs_named(document: &str) -> BTreeSet<String> {
    let mut programs = BTreeSet::new();
    let mut in_block = false;
    for line in document.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        let line = line.trim_start();
        let line = line.strip_prefix("sudo -u onceonly ").unwrap_or(line);
        if let Some(first) = line.split_whitespace().next()
            && first.starts_with("onceonly-")
            && first[9..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '-')
        {
            programs.insert(first.to_owned());
        }
    }
    for unit in UNITS {
        let text = std::fs::read_to_string(repository().join("deploy").join(unit)).expect("unit");
        for line in text.lines() {
            if let Some((_, command)) = line.split_once("=/usr/local/bin/")
                && line.starts_with("Exec")
            {
                programs.insert(
                    command
                        .split_whitespace()
                        .next()
                        .expect("a program")
                        .to_owned(),
                );
            }
        }
    }
    programs
}

/// The block's commands, one per line (continuations joined), each a
/// `cargo build` or an `install`: anything else (a `useradd`, a
/// `systemctl`) is not run here, as root, on the test machine.
fn commands(block: &str) -> Result<Vec<String>, String> {
    let joined = block.replace("\\\n", " ");
    let commands: Vec<String> = joined
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for command in &commands {
        if !command.starts_with("cargo build ") && !command.starts_with("install ") {
            return Err(format!(
                "the install block runs {command:?}: keep it to cargo build and install (other steps go in a block of their own)"
            ));
        }
    }
    Ok(commands)
}

/// Runs `command` (from the block) with this build's profile for
/// `--release` and `root` under absolute paths.
fn run(command: &str, root: &Path) -> Result<(), String> {
    let profile_dir = onceonly_integration_tests::binary("onceonly-broker", "onceonly-broker")
        .parent()
        .expect("target/<profile>")
        .to_owned();
    let command = command
        .replace(" --release", "")
        .replace("target/release/", &format!("{}/", profile_dir.display()))
        .replace(" /usr/", &format!(" {}/usr/", root.display()))
        .replace(" /etc/", &format!(" {}/etc/", root.display()));
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &command])
        .current_dir(repository())
        .output()
        .expect("bash runs");
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The document's `cargo build`, run once per test process (both tests
/// would otherwise build at once and race each other's copies).
fn build_once(build: &str) -> Result<(), String> {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = tempfile::tempdir().expect("temp root");
            run(build, root.path())
        })
        .clone()
}

/// Runs `document`'s install block under a temporary root and checks that
/// it installed every program `document` and the units run; the error says
/// what is missing.
fn install_and_check(document: &str) -> Result<(), String> {
    let commands = commands(&install_block(document))?;
    let programs = programs_named(document);
    let root = tempfile::tempdir().expect("temp root");
    for command in &commands {
        if command.starts_with("cargo build ") {
            if command.contains("--workspace") || command.contains("onceonly-integration-tests") {
                return Err(format!(
                    "{command:?} builds the test suite's broker (feature test-hooks): name the packages"
                ));
            }
            build_once(command)?;
        } else {
            run(command, root.path())?;
        }
    }
    let bin = root.path().join("usr/local/bin");
    for program in &programs {
        let installed = bin.join(program);
        if !installed.is_file() {
            return Err(format!(
                "OPERATIONS.md runs {program}, which its install commands do not install"
            ));
        }
        if mode(&installed) != 0o755 {
            return Err(format!("{program} is not installed 0755"));
        }
        let help = Command::new(&installed)
            .arg("--help")
            .output()
            .expect("the installed binary runs");
        if !help.status.success() {
            return Err(format!("the installed {program} --help fails"));
        }
    }
    for unit in UNITS {
        if !root.path().join("etc/systemd/system").join(unit).is_file() {
            return Err(format!("{unit} is not installed"));
        }
    }
    Ok(())
}

fn operations_md() -> String {
    std::fs::read_to_string(repository().join("OPERATIONS.md")).expect("OPERATIONS.md")
}

#[test]
fn the_install_commands_of_operations_md_install_every_binary_it_names() {
    let document = operations_md();
    assert!(
        install_block(&document).contains("cargo build"),
        "the block builds"
    );
    let programs = programs_named(&document);
    for expected in [
        "onceonly-broker",
        "onceonly-certs",
        "onceonly-audit",
        "onceonly-registry-mock",
        "onceonly-connector",
    ] {
        assert!(
            programs.contains(expected),
            "OPERATIONS.md or the units name {expected}: {programs:?}"
        );
    }
    install_and_check(&document).unwrap_or_else(|error| panic!("{error}"));
}

#[test]
fn an_install_block_that_misses_a_binary_the_document_runs_is_caught() {
    // The defect an operator found: the auditor's tool named, not installed.
    let document = operations_md().replacen(" target/release/onceonly-audit", "", 1);
    let error = install_and_check(&document).expect_err("onceonly-audit is missing");
    assert!(error.contains("onceonly-audit"), "{error}");
}

#[test]
fn an_install_block_that_builds_the_test_broker_or_runs_other_steps_is_refused() {
    let workspace = operations_md().replacen(
        "cargo build --release --locked -p onceonly-broker",
        "cargo build --release --locked --workspace --bins -p onceonly-broker",
        1,
    );
    let error = install_and_check(&workspace).expect_err("--workspace");
    assert!(error.contains("test-hooks"), "{error}");
    let block = "cargo build -p x\nuseradd --system onceonly\n";
    assert!(commands(block).expect_err("useradd").contains("useradd"));
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}
