//! The `onceonly-conformance` binary's usage errors (its checks run
//! against real connectors in integration-tests/tests/conformance.rs,
//! which this target also builds the binary for).

use std::process::Command;

fn conformance() -> Command {
    Command::new(env!("CARGO_BIN_EXE_onceonly-conformance"))
}

/// Every argument the kit needs, its files not there.
fn arguments() -> Vec<&'static str> {
    vec![
        "--connector",
        "127.0.0.1:1",
        "--connector-id",
        "civil-register",
        "--ca",
        "/nonexistent/ca.pem",
        "--broker-cert",
        "/nonexistent/broker.pem",
        "--broker-key",
        "/nonexistent/broker.key",
        "--authority-cert",
        "/nonexistent/authority.pem",
        "--authority-key",
        "/nonexistent/authority.key",
        "--evidence-type",
        "birth-certificate",
        "--subject",
        "82281866209",
    ]
}

#[test]
fn a_usage_error_exits_2_and_names_the_fix() {
    let output = conformance()
        .args(arguments())
        .args(["--scheme", "PASSPORT"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("DE_IDNR"));
}

#[test]
fn the_requester_who_signs_is_a_required_argument() {
    let without: Vec<&str> = arguments()
        .into_iter()
        .filter(|a| !a.contains("authority"))
        .collect();
    let output = conformance().args(without).output().expect("runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--authority-cert"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn files_that_cannot_be_read_are_a_setup_error_not_a_verdict() {
    let output = conformance().args(arguments()).output().expect("runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/"));
}
