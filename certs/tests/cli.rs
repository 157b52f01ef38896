//! The `onceonly-certs` binary as a CA operator runs it: `revoked` names
//! times and holders, `init --organisation` reaches every certificate's
//! subject, and a failure says its cause once.

use std::path::Path;
use std::process::{Command, Output};

use onceonly_certs::pki::{self, Pki};
use onceonly_certs::{InitOptions, IssueOptions, Role};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fn certs(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onceonly-certs"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .env_remove("ONCEONLY_PKI_DIR")
        .output()
        .expect("onceonly-certs runs")
}

fn success(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

/// The subject organisation (O) of a PEM certificate.
fn organisation_of(path: &Path) -> String {
    let der = pki::load_certs(path).expect("cert").remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parses");
    let organisations: Vec<String> = cert
        .subject()
        .iter_organization()
        .map(|o| o.as_str().expect("utf-8").to_owned())
        .collect();
    assert_eq!(organisations.len(), 1, "one O: {organisations:?}");
    organisations[0].clone()
}

#[test]
fn revoked_names_each_serial_s_time_and_holder() {
    let dir = tempfile::tempdir().expect("dir");
    let pki_dir = dir.path().join("pki");
    success(&certs(&pki_dir, &["init", "--trust-domain", "land.test"]));
    for (role, id) in [("connector", "civil-register"), ("authority", "kfz")] {
        success(&certs(&pki_dir, &["issue", "--role", role, "--id", id]));
    }
    success(&certs(
        &pki_dir,
        &[
            "issue",
            "--role",
            "authority",
            "--id",
            "kfz",
            "--encryption",
        ],
    ));
    let before = OffsetDateTime::now_utc().replace_nanosecond(0).expect("0");
    success(&certs(
        &pki_dir,
        &["revoke", "--role", "connector", "--id", "civil-register"],
    ));
    let encryption_cert = pki_dir.join("authority/kfz.enc.pem");
    let encryption_cert = encryption_cert.to_str().expect("utf-8");
    success(&certs(&pki_dir, &["revoke", "--cert", encryption_cert]));
    // A replaced certificate is revoked and gone from the directory.
    success(&certs(
        &pki_dir,
        &["issue", "--role", "authority", "--id", "kfz", "--force"],
    ));

    let out = success(&certs(&pki_dir, &["revoked"]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].starts_with("CRL number "), "{out}");
    assert!(lines[0].contains("current until 20"), "{out}");
    assert!(lines[0].ends_with("; 3 revoked"), "{out}");
    assert!(!out.contains("unix time"), "{out}");

    let pki = Pki::open(&pki_dir).expect("pki");
    let stored = pki.stored_certificates().expect("stored");
    let serial_of = |role: Role, id: &str, encryption: bool| {
        stored
            .iter()
            .find(|c| {
                c.participant.role() == role
                    && c.participant.id() == id
                    && c.encryption == encryption
            })
            .expect("stored")
            .serial_hex
            .clone()
    };
    let line_of = |serial: &str| {
        *lines
            .iter()
            .find(|line| line.starts_with(serial))
            .unwrap_or_else(|| panic!("{serial} listed: {out}"))
    };

    let civil = line_of(&serial_of(Role::Connector, "civil-register", false));
    assert!(
        civil.ends_with("  connector/civil-register  spiffe://land.test/connector/civil-register"),
        "{civil}"
    );
    // The time is RFC 3339 in UTC, and the time of the revocation.
    let when = civil.split("  ").nth(1).expect("time");
    let when = when.strip_prefix("revoked ").expect("revoked <time>");
    assert!(when.ends_with('Z'), "{when}");
    let when = OffsetDateTime::parse(when, &Rfc3339).expect("RFC 3339");
    assert!(
        when >= before && when <= OffsetDateTime::now_utc(),
        "{when}"
    );

    let encryption = line_of(&serial_of(Role::Authority, "kfz", true));
    assert!(
        encryption.ends_with("  authority/kfz (encryption)  spiffe://land.test/authority/kfz"),
        "{encryption}"
    );

    // The third is kfz's replaced TLS certificate: no longer in the folder.
    let current_kfz = serial_of(Role::Authority, "kfz", false);
    assert!(
        !out.contains(&current_kfz),
        "the current one is not revoked"
    );
    let replaced: Vec<&&str> = lines
        .iter()
        .filter(|line| line.ends_with("  (not in this PKI directory)"))
        .collect();
    assert_eq!(replaced.len(), 1, "{out}");
}

#[test]
fn the_organisation_given_at_init_is_in_every_subject() {
    let dir = tempfile::tempdir().expect("dir");
    let pki_dir = dir.path().join("pki");
    let out = success(&certs(&pki_dir, &["init", "--organisation", "Land Berlin"]));
    assert!(out.contains("organisation \"Land Berlin\""), "{out}");
    success(&certs(
        &pki_dir,
        &["issue", "--role", "authority", "--id", "elterngeld-berlin"],
    ));
    success(&certs(
        &pki_dir,
        &[
            "issue",
            "--role",
            "authority",
            "--id",
            "elterngeld-berlin",
            "--encryption",
        ],
    ));
    let pki = Pki::open(&pki_dir).expect("pki");
    assert_eq!(pki.organisation(), "Land Berlin");
    for path in [
        pki.ca_cert_path(),
        pki.participant_paths(Role::Broker, "broker").0,
        pki.participant_paths(Role::Authority, "elterngeld-berlin")
            .0,
        pki.encryption_paths("elterngeld-berlin").0,
    ] {
        assert_eq!(organisation_of(&path), "Land Berlin", "{}", path.display());
    }
    let meta = std::fs::read_to_string(pki_dir.join("pki.toml")).expect("pki.toml");
    assert!(meta.contains("organisation = \"Land Berlin\""), "{meta}");

    // A control character is refused before anything is written.
    let other = dir.path().join("other");
    let refused = certs(&other, &["init", "--organisation", "Land\nBerlin"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("invalid organisation"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!other.join("pki.toml").exists());
}

#[test]
fn a_pki_made_before_the_organisation_was_configurable_keeps_onceonly() {
    let dir = tempfile::tempdir().expect("dir");
    let (pki, broker) = Pki::init(dir.path(), &InitOptions::new("old.test")).expect("init");
    assert_eq!(organisation_of(&broker.cert_path), "onceonly");
    // Its pki.toml is as such PKIs have it: no organisation line.
    let meta = std::fs::read_to_string(dir.path().join("pki.toml")).expect("pki.toml");
    assert!(!meta.contains("organisation"), "{meta}");
    std::fs::write(
        dir.path().join("pki.toml"),
        "trust_domain = \"old.test\"\nkey_algorithm = \"ecdsa-p256\"\n",
    )
    .expect("write");
    let reopened = Pki::open(pki.dir()).expect("opens");
    assert_eq!(reopened.organisation(), "onceonly");
    let issued = reopened
        .issue(&IssueOptions::new(Role::Portal, "buergerportal"))
        .expect("issue");
    assert_eq!(organisation_of(&issued.cert_path), "onceonly");
}

#[test]
fn a_failure_says_its_cause_once() {
    let dir = tempfile::tempdir().expect("dir");
    let pki_dir = dir.path().join("pki");
    success(&certs(&pki_dir, &["init"]));
    std::fs::remove_file(pki_dir.join("crl.pem")).expect("rm");
    let failed = certs(&pki_dir, &["revoked"]);
    assert_eq!(failed.status.code(), Some(1));
    let message = String::from_utf8_lossy(&failed.stderr);
    assert!(message.contains("crl.pem"), "{message}");
    assert_eq!(
        message.matches("No such file or directory").count(),
        1,
        "{message}"
    );
}

#[test]
fn revoking_an_authority_revokes_its_encryption_certificate_with_it() {
    let dir = tempfile::tempdir().expect("dir");
    let pki_dir = dir.path().join("pki");
    success(&certs(&pki_dir, &["init", "--trust-domain", "land.test"]));
    for extra in [&[][..], &["--encryption"][..]] {
        let mut args = vec!["issue", "--role", "authority", "--id", "kfz"];
        args.extend_from_slice(extra);
        success(&certs(&pki_dir, &args));
    }
    success(&certs(
        &pki_dir,
        &["issue", "--role", "authority", "--id", "other"],
    ));
    let out = success(&certs(
        &pki_dir,
        &["revoke", "--role", "authority", "--id", "kfz"],
    ));
    assert_eq!(out.matches("revoked serial").count(), 2, "{out}");

    let pki = Pki::open(&pki_dir).expect("pki");
    let (revoked, _) = pki.revoked_serials().expect("crl");
    let stored = pki.stored_certificates().expect("stored");
    for encryption in [false, true] {
        let serial = &stored
            .iter()
            .find(|c| c.participant.id() == "kfz" && c.encryption == encryption)
            .expect("stored")
            .serial_hex;
        assert!(
            revoked.iter().any(|(s, _)| s == serial),
            "encryption {encryption}: {serial} not in {revoked:?}"
        );
    }
    // The encryption certificate is refused as a recipient from then on.
    let trust = onceonly_certs::tls::identity_verifier(
        &pki.tls_files(Role::Authority, "other"),
        "land.test",
    )
    .expect("trust");
    let der = onceonly_certs::pki::load_certs(&pki.encryption_paths("kfz").0)
        .expect("cert")
        .remove(0);
    assert!(trust.verify_encryption_certificate(&der).is_err());
    // Revoking again changes nothing and says so.
    let again = success(&certs(
        &pki_dir,
        &["revoke", "--role", "authority", "--id", "kfz"],
    ));
    assert_eq!(again.matches("already revoked").count(), 2, "{again}");
}
