//! The `onceonly-registry-mock` binary as an operator runs it (and so
//! `cargo test --workspace` builds it for the tests that start it as the
//! systemd unit does).

use std::process::Command;

fn mock() -> Command {
    Command::new(env!("CARGO_BIN_EXE_onceonly-registry-mock"))
}

#[test]
fn subjects_lists_the_idnrs_a_register_holds() {
    let output = mock().args(["subjects", "civil"]).output().expect("runs");
    assert!(output.status.success());
    let listed = String::from_utf8_lossy(&output.stdout);
    assert!(
        listed.lines().any(|l| l.trim() == "82281866209"),
        "{listed}"
    );
}

#[test]
fn a_missing_config_file_is_named_and_the_exit_code_says_failure() {
    let output = mock()
        .args(["serve", "--config", "/nonexistent/civil.toml"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("/nonexistent/civil.toml"), "{said}");
    assert_eq!(
        said.matches("No such file").count(),
        1,
        "the cause is said once: {said}"
    );
}
