//! `onceonly-audit` as an auditor meets it before reaching the broker: what
//! it says when files are missing, damaged or stale. The advice is the
//! auditor's (pass the four files, ask the CA operator), never the CA's
//! (`onceonly-certs init` would mint a new CA), and each cause is said once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use onceonly_certs::{Pki, Role};

/// The advice every "you lack a file" error gives.
const PASS_THE_FILES: &str =
    "pass --ca, --crl, --cert and --key with the files your CA operator gave you";
const HOW_ISSUED: &str = "`onceonly-certs issue --role auditor --id YOU` on the CA's machine";

/// Runs `onceonly-audit query` in `dir` (so no `pki` folder of the
/// developer's is picked up) with `args`; the broker address is a port
/// nothing listens on.
fn query(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onceonly-audit"))
        .current_dir(dir)
        .arg("query")
        .arg("--broker")
        .arg(closed_port())
        .args(args)
        .output()
        .expect("onceonly-audit runs")
}

/// 127.0.0.1 and a port that was free a moment ago.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

/// The error line of a run that must fail with exit code 1.
fn failure(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        output.stdout.is_empty(),
        "nothing on stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    stderr
}

/// The auditor's advice, and none of the CA's.
fn assert_auditor_advice(message: &str) {
    assert!(message.contains(PASS_THE_FILES), "{message}");
    assert!(message.contains(HOW_ISSUED), "{message}");
    assert!(!message.contains("onceonly-certs init"), "{message}");
}

/// A PKI with an auditor, and the files its operator hands the auditor,
/// copied into a folder of their own (no pki.toml, no CA key).
struct HandedOver {
    pki: onceonly_certs::pki::ThrowawayPki,
    dir: tempfile::TempDir,
}

impl HandedOver {
    fn new() -> Self {
        let pki = Pki::throwaway("onceonly.test", &[(Role::Auditor, "datenschutz")]).expect("pki");
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key) = pki.participant_paths(Role::Auditor, "datenschutz");
        for (from, to) in [
            (pki.ca_cert_path(), "ca.pem"),
            (pki.crl_path(), "crl.pem"),
            (cert, "datenschutz.pem"),
            (key, "datenschutz.key"),
        ] {
            std::fs::copy(from, dir.path().join(to)).expect("copy");
        }
        HandedOver { pki, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `--ca ca.pem --crl <crl> --cert datenschutz.pem --key datenschutz.key`.
    fn flags(&self, crl: &str) -> Vec<String> {
        vec![
            "--ca".into(),
            "ca.pem".into(),
            "--crl".into(),
            crl.into(),
            "--cert".into(),
            "datenschutz.pem".into(),
            "--key".into(),
            "datenschutz.key".into(),
        ]
    }

    fn query(&self, args: &[String]) -> Output {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        query(self.dir.path(), &args)
    }
}

#[test]
fn without_files_the_auditor_is_told_what_to_pass_not_to_create_a_ca() {
    let empty = tempfile::tempdir().expect("dir");

    // Nothing at all.
    let message = failure(&query(empty.path(), &[]));
    assert!(message.contains("no certificate"), "{message}");
    assert_auditor_advice(&message);

    // --pki at a folder with no pki.toml: the CA's CLI would advise
    // `onceonly-certs init` here; the auditor's tool must not.
    let message = failure(&query(empty.path(), &["--pki", ".", "--id", "datenschutz"]));
    assert_auditor_advice(&message);
    let message = failure(&query(
        empty.path(),
        &["--pki", "no-such-dir", "--id", "datenschutz"],
    ));
    assert!(
        message.contains("no-such-dir/auditor/datenschutz.pem"),
        "{message}"
    );
    assert_auditor_advice(&message);
    let message = failure(&query(empty.path(), &["--pki", "."]));
    assert!(message.contains("needs --id"), "{message}");
    assert_auditor_advice(&message);

    // Some of the four flags: the missing ones are named.
    let message = failure(&query(
        empty.path(),
        &["--ca", "ca.pem", "--cert", "me.pem"],
    ));
    assert!(
        message.starts_with("error: --crl, --key missing"),
        "{message}"
    );
    assert_auditor_advice(&message);

    // All four, none there: the first is named, with what it should be.
    let message = failure(&query(
        empty.path(),
        &[
            "--ca", "ca.pem", "--crl", "crl.pem", "--cert", "me.pem", "--key", "me.key",
        ],
    ));
    assert!(message.contains("--cert me.pem: No such file"), "{message}");
    assert!(message.contains("takes your certificate"), "{message}");
    assert!(message.contains(HOW_ISSUED), "{message}");
    assert!(!message.contains("onceonly-certs init"), "{message}");
}

#[test]
fn a_missing_or_damaged_crl_is_named_with_its_cause_once() {
    let handed = HandedOver::new();
    std::fs::remove_file(handed.path("crl.pem")).expect("rm");
    let message = failure(&handed.query(&handed.flags("crl.pem")));
    assert!(message.contains("--crl crl.pem"), "{message}");
    assert_eq!(
        message.matches("No such file or directory").count(),
        1,
        "the cause once: {message}"
    );
    assert!(message.contains(HOW_ISSUED), "{message}");

    // The same through --pki: the PKI directory without its crl.pem.
    std::fs::remove_file(handed.pki.crl_path()).expect("rm");
    let pki_dir = handed.pki.dir().to_str().expect("utf-8").to_owned();
    let message =
        failure(&handed.query(&["--pki".into(), pki_dir, "--id".into(), "datenschutz".into()]));
    assert!(message.contains("crl.pem"), "{message}");
    assert_eq!(
        message.matches("No such file or directory").count(),
        1,
        "the cause once: {message}"
    );
    assert_auditor_advice(&message);

    // Not a revocation list: said once, naming the flag and the file.
    std::fs::copy(handed.path("ca.pem"), handed.path("not-a-crl.pem")).expect("copy");
    let message = failure(&handed.query(&handed.flags("not-a-crl.pem")));
    assert!(message.contains("--crl not-a-crl.pem"), "{message}");
    assert_eq!(
        message.matches("not a PEM X509 CRL").count(),
        1,
        "{message}"
    );
    std::fs::write(handed.path("garbage.crl"), b"\x30\x03\x02\x01").expect("write");
    let message = failure(&handed.query(&handed.flags("garbage.crl")));
    assert!(message.contains("--crl garbage.crl"), "{message}");
    assert!(message.contains("not a revocation list"), "{message}");
    assert!(!message.contains("certificate rejected"), "{message}");
}

#[test]
fn a_stale_crl_sends_the_auditor_to_the_ca_operator() {
    let handed = HandedOver::new();
    let past = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    handed.pki.refresh_crl(past).expect("re-signed, stale");
    std::fs::copy(handed.pki.crl_path(), handed.path("crl.pem")).expect("copy");
    let message = failure(&handed.query(&handed.flags("crl.pem")));
    assert!(message.contains("was current until"), "{message}");
    assert!(
        message.contains("Ask your CA operator for the current crl.pem"),
        "{message}"
    );
}

#[test]
fn a_key_of_another_certificate_is_refused_as_such() {
    let handed = HandedOver::new();
    let (_, broker_key) = handed.pki.participant_paths(Role::Broker, "broker");
    std::fs::copy(broker_key, handed.path("datenschutz.key")).expect("copy");
    let message = failure(&handed.query(&handed.flags("crl.pem")));
    assert!(
        message.contains("must be the pair your CA operator issued together"),
        "{message}"
    );
}

#[test]
fn good_files_get_as_far_as_the_broker_from_flags_or_a_config_file() {
    let handed = HandedOver::new();
    // Nothing listens on the port: the files were taken, the connection
    // is what fails, and the message says what to check.
    let message = failure(&handed.query(&handed.flags("crl.pem")));
    assert!(message.contains("cannot reach the broker"), "{message}");
    assert!(message.contains("check --broker"), "{message}");
    assert_eq!(
        message.matches("Connection refused").count(),
        1,
        "{message}"
    );

    // The same files named in a config file, relative to it.
    let config = handed.path("auditor.toml");
    std::fs::write(
        &config,
        format!(
            "broker = \"{}\"\nca = \"ca.pem\"\ncrl = \"crl.pem\"\ncert = \"datenschutz.pem\"\nkey = \"datenschutz.key\"\n",
            closed_port()
        ),
    )
    .expect("config");
    let elsewhere = tempfile::tempdir().expect("dir");
    let output = Command::new(env!("CARGO_BIN_EXE_onceonly-audit"))
        .current_dir(elsewhere.path())
        .args(["query", "--config"])
        .arg(&config)
        .output()
        .expect("runs");
    let message = failure(&output);
    assert!(message.contains("cannot reach the broker"), "{message}");

    // A file it names is not there: the key and the file are named.
    std::fs::write(
        &config,
        "ca = \"ca.pem\"\ncrl = \"old-crl.pem\"\ncert = \"datenschutz.pem\"\nkey = \"datenschutz.key\"\n",
    )
    .expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_onceonly-audit"))
        .args(["query", "--config"])
        .arg(&config)
        .output()
        .expect("runs");
    let message = failure(&output);
    assert!(
        message.contains(&format!("crl in {}", config.display())),
        "{message}"
    );
    assert!(message.contains("old-crl.pem: No such file"), "{message}");
    assert!(message.contains(HOW_ISSUED), "{message}");

    // A misspelt key: named, with its line.
    std::fs::write(&config, "brokr = \"x:1\"\n").expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_onceonly-audit"))
        .args(["query", "--config"])
        .arg(&config)
        .output()
        .expect("runs");
    let message = failure(&output);
    assert!(message.contains("auditor.toml:1:1"), "{message}");
    assert!(message.contains("brokr"), "{message}");
}
