//! A client in another language: a Python grpcio client generated from the
//! `.proto` files calls the broker over mutual TLS, verifies the register's
//! signature with PyJWT and `cryptography`, and decrypts evidence encrypted
//! to it with pyhpke: the formats are the standards, not ours.
//!
//! The test finds a Python with those packages (`.ci/run` installs them);
//! where the system Python lacks them it creates a virtual environment under
//! `target/` and installs them from PyPI, so that `cargo test` alone works
//! on a fresh machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use onceonly_certs::{IssueOptions, Role};
use onceonly_integration_tests::world::{AUTHORITIES, World};

const ANNA: &str = "82281866209";

/// What the client needs from PyPI (`.ci/run` installs the same).
const PYTHON_PACKAGES: [&str; 5] = ["grpcio", "grpcio-tools", "pyjwt", "cryptography", "pyhpke"];

fn has_grpc(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import grpc, grpc_tools, jwt, cryptography, pyhpke"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A Python interpreter with grpcio and grpcio-tools.
fn python_with_grpc(workspace: &Path) -> PathBuf {
    let system = PathBuf::from("python3");
    if has_grpc(&system) {
        return system;
    }
    let venv = workspace.join("target/python-grpc-venv");
    let python = venv.join("bin/python");
    if !has_grpc(&python) {
        let created = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status();
        assert!(
            created.is_ok_and(|s| s.success()),
            "python3 -m venv failed: install python3-venv"
        );
        let installed = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .args(PYTHON_PACKAGES)
            .status();
        assert!(
            installed.is_ok_and(|s| s.success()),
            "pip install {} failed (needs PyPI)",
            PYTHON_PACKAGES.join(" ")
        );
    }
    python
}

#[tokio::test]
async fn a_python_grpcio_client_calls_the_broker_over_mutual_tls() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_owned();
    let python = python_with_grpc(&workspace);
    let world = World::start().await;
    let files = world.pki.tls_files(Role::Authority, AUTHORITIES[0]);
    let mut encryption = IssueOptions::new(Role::Authority, AUTHORITIES[0]);
    encryption.encryption = true;
    world
        .pki
        .issue(&encryption)
        .expect("encryption certificate");
    let (enc_cert, enc_key) = world.pki.encryption_paths(AUTHORITIES[0]);
    let output = tokio::process::Command::new(&python)
        .arg(workspace.join("integration-tests/python/authority_client.py"))
        .arg("--target")
        .arg(world.broker_addr().to_string())
        .arg("--ca")
        .arg(&files.ca)
        .arg("--cert")
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .arg("--proto-dir")
        .arg(workspace.join("proto"))
        .arg("--subject")
        .arg(ANNA)
        .arg("--enc-cert")
        .arg(&enc_cert)
        .arg("--enc-key")
        .arg(&enc_key)
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(lines[0]["code"], "OK", "{stdout}");
    assert_eq!(lines[0]["digest_ok"], true, "{stdout}");
    assert_eq!(lines[0]["signature_ok"], true, "{stdout}");
    assert_eq!(
        lines[0]["signed_by"],
        "spiffe://onceonly.test/connector/civil-register"
    );
    assert_eq!(lines[0]["connector"], "civil-register");
    // The request was signed with PyJWT and the statement names its nonce.
    assert_eq!(lines[0]["bound_to_nonce"], true, "{stdout}");
    assert_eq!(lines[1]["code"], "PERMISSION_DENIED", "{stdout}");
    // Unsigned, where the policy requires a signature.
    assert_eq!(lines[2]["code"], "UNAUTHENTICATED", "{stdout}");
    assert!(
        lines[2]["message"]
            .as_str()
            .is_some_and(|m| m.contains("signed_request is empty")),
        "{stdout}"
    );
    // Encrypted to the authority: signature checked, plaintext recovered.
    assert_eq!(lines[3]["code"], "OK", "{stdout}");
    assert_eq!(lines[3]["encrypted"], true, "{stdout}");
    assert_eq!(lines[3]["signature_ok"], true, "{stdout}");
    assert_eq!(lines[3]["bound_to_nonce"], true, "{stdout}");
    assert_eq!(lines[3]["digest_ok"], true, "{stdout}");
    assert_eq!(lines[3]["plaintext_has_surname"], true, "{stdout}");
    let records = world.audit_records().await;
    assert!(
        records
            .iter()
            .any(|r| r.request_id == "python-allowed" && r.status_code == 0)
    );
    assert!(
        records
            .iter()
            .any(|r| r.request_id == "python-denied" && r.status_code == 7)
    );
}
