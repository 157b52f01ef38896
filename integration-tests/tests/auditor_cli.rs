//! `onceonly-audit` as an auditor runs it against a running broker, with
//! only the files the CA operator hands over (ca.pem, crl.pem, the
//! auditor's certificate and key, and the broker's audit.key.pub) in a
//! folder of their own: no PKI directory, no pki.toml, no CA key.
//!
//! Needs the binary: `cargo build -p onceonly-audit-log` (`cargo test
//! --workspace` builds it).

use std::path::{Path, PathBuf};
use std::process::Output;

use onceonly_certs::Role;
use onceonly_integration_tests::binary;
use onceonly_integration_tests::world::{AUDITOR, AUTHORITIES, World, birth_certificate};

/// The auditor's folder: what the CA operator and the broker's operator
/// hand over, under the names the README gives.
fn handed_over(world: &World, folder: &Path) {
    let files = world.pki.tls_files(Role::Auditor, AUDITOR);
    for (from, to) in [
        (files.ca, "ca.pem"),
        (files.crl.expect("crl"), "crl.pem"),
        (files.cert, "datenschutz.pem"),
        (files.key, "datenschutz.key"),
        (
            world.dir.path().join("secrets/audit.key.pub"),
            "audit.key.pub",
        ),
    ] {
        std::fs::copy(&from, folder.join(to)).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
}

async fn audit(folder: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(binary("onceonly-audit", "onceonly-audit-log"))
        .current_dir(folder)
        .args(args)
        .output()
        .await
        .expect("onceonly-audit runs")
}

fn succeeded(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn an_auditor_with_the_handed_over_files_verifies_and_queries_the_log() {
    let world = World::start().await;
    for n in 0..3 {
        world
            .authority(AUTHORITIES[0])
            .request_evidence(birth_certificate(&format!("auditor-cli-{n}")))
            .await
            .expect("delivered");
    }
    let folder = tempfile::tempdir().expect("dir");
    handed_over(&world, folder.path());
    let broker = world.broker_addr().to_string();
    let files = [
        "--ca",
        "ca.pem",
        "--crl",
        "crl.pem",
        "--cert",
        "datenschutz.pem",
        "--key",
        "datenschutz.key",
        "--broker",
        &broker,
    ];

    // verify, as the README shows it, saving the head for the next audit.
    let mut args = vec!["verify"];
    args.extend(files);
    args.extend([
        "--public-key",
        "audit.key.pub",
        "--save-head",
        "last-audit.json",
    ]);
    let out = succeeded(&audit(folder.path(), &args).await);
    assert!(out.contains("signed tree head verified"), "{out}");
    assert!(out.contains("entries downloaded and re-hashed"), "{out}");
    assert!(folder.path().join("last-audit.json").is_file());

    // query: every record, as the auditor sees them.
    let mut args = vec!["query", "--format", "jsonl"];
    args.extend(files);
    let out = succeeded(&audit(folder.path(), &args).await);
    for n in 0..3 {
        assert!(out.contains(&format!("\"auditor-cli-{n}\"")), "{out}");
    }

    // The same from a config file, with the saved head.
    let config: PathBuf = folder.path().join("auditor.toml");
    std::fs::write(
        &config,
        format!(
            "broker = \"{broker}\"\nca = \"ca.pem\"\ncrl = \"crl.pem\"\ncert = \"datenschutz.pem\"\nkey = \"datenschutz.key\"\n"
        ),
    )
    .expect("config");
    let elsewhere = tempfile::tempdir().expect("dir");
    let config_arg = config.to_str().expect("utf-8");
    let public_key = folder.path().join("audit.key.pub");
    let saved = folder.path().join("last-audit.json");
    let out = succeeded(
        &audit(
            elsewhere.path(),
            &[
                "verify",
                "--config",
                config_arg,
                "--public-key",
                public_key.to_str().expect("utf-8"),
                "--saved-head",
                saved.to_str().expect("utf-8"),
            ],
        )
        .await,
    );
    assert!(out.contains("consistency proven"), "{out}");

    // A broker id the broker does not have: refused before any request,
    // with what to pass.
    let mut args = vec!["query", "--broker-id", "another-broker"];
    args.extend(files);
    let refused = audit(folder.path(), &args).await;
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr);
    let expected = format!(
        "expected spiffe://{}/broker/another-broker",
        world.pki.trust_domain()
    );
    assert!(message.contains(&expected), "{message}");
    assert!(message.contains("pass --broker-id"), "{message}");

    // And the demo's way still works: the PKI directory and an id.
    let pki_dir = world.pki.dir().to_str().expect("utf-8").to_owned();
    let out = succeeded(
        &audit(
            folder.path(),
            &[
                "verify",
                "--pki",
                &pki_dir,
                "--id",
                AUDITOR,
                "--broker",
                &broker,
                "--public-key",
                "audit.key.pub",
                "--no-recompute",
            ],
        )
        .await,
    );
    assert!(out.contains("signed tree head verified"), "{out}");
}
