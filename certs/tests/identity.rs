//! Certificates issued by the PKI parse back to their identity; every kind of
//! bad certificate is refused by the same verifier the TLS handshake uses,
//! with an error that says why.

use std::time::Duration;

use onceonly_certs::pki::{self, IssueOptions, KeyAlgorithm, Pki};
use onceonly_certs::{IdentityError, IdentityVerifier, Role};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, SanType};
use time::OffsetDateTime;

const TD: &str = "onceonly.test";

fn verifier(pki: &Pki) -> IdentityVerifier {
    let files = pki.tls_files(Role::Broker, "broker");
    onceonly_certs::tls::identity_verifier(&files, TD).expect("verifier")
}

fn cert_of(pki: &Pki, role: Role, id: &str) -> rustls::pki_types::CertificateDer<'static> {
    pki::load_certs(&pki.participant_paths(role, id).0)
        .expect("cert")
        .remove(0)
}

fn rejection(result: Result<onceonly_certs::Participant, IdentityError>) -> String {
    match result {
        Ok(p) => panic!("accepted {p}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_role_parses_back_to_its_identity() {
    let pki = Pki::throwaway(TD, &[]).expect("pki");
    let verifier = verifier(&pki);
    for (n, role) in Role::ALL.into_iter().enumerate() {
        let id = format!("participant-{n}");
        let mut options = IssueOptions::new(role, &id);
        if n % 2 == 1 {
            options.key_algorithm = Some(KeyAlgorithm::Ed25519);
        }
        pki.issue(&options).expect("issue");
        let participant = verifier
            .verify(&cert_of(&pki, role, &id), &[])
            .expect("verifies");
        assert_eq!(participant.role(), role);
        assert_eq!(participant.id(), id);
        assert_eq!(participant.trust_domain(), TD);
        assert_eq!(
            participant.spiffe_id(),
            format!("spiffe://{TD}/{role}/{id}")
        );
    }
}

#[test]
fn certificate_from_another_ca_is_rejected() {
    let ours = Pki::throwaway(TD, &[]).expect("pki");
    let theirs = Pki::throwaway("elsewhere.test", &[(Role::Authority, "intruder")]).expect("pki");
    let why =
        rejection(verifier(&ours).verify(&cert_of(&theirs, Role::Authority, "intruder"), &[]));
    assert!(why.contains("unknown issuer"), "{why}");
}

#[test]
fn certificate_from_an_impostor_ca_of_the_same_name_is_rejected() {
    let ours = Pki::throwaway(TD, &[]).expect("pki");
    let impostor = Pki::throwaway(TD, &[(Role::Authority, "intruder")]).expect("pki");
    let why =
        rejection(verifier(&ours).verify(&cert_of(&impostor, Role::Authority, "intruder"), &[]));
    assert!(why.contains("signature does not verify"), "{why}");
}

#[test]
fn expired_certificate_is_rejected() {
    let pki = Pki::throwaway(TD, &[]).expect("pki");
    let mut options = IssueOptions::new(Role::Authority, "stale");
    options.not_before = Some(OffsetDateTime::now_utc() - time::Duration::days(10));
    options.validity = Duration::from_secs(86_400);
    pki.issue(&options).expect("issue");
    let why = rejection(verifier(&pki).verify(&cert_of(&pki, Role::Authority, "stale"), &[]));
    assert!(why.contains("expired"), "{why}");
}

#[test]
fn certificate_not_yet_valid_is_rejected() {
    let pki = Pki::throwaway(TD, &[]).expect("pki");
    let mut options = IssueOptions::new(Role::Authority, "future");
    options.not_before = Some(OffsetDateTime::now_utc() + time::Duration::days(1));
    pki.issue(&options).expect("issue");
    let why = rejection(verifier(&pki).verify(&cert_of(&pki, Role::Authority, "future"), &[]));
    assert!(why.contains("not valid yet"), "{why}");
}

#[test]
fn revoked_certificate_is_rejected_and_others_are_not() {
    let pki = Pki::throwaway(TD, &[(Role::Authority, "a"), (Role::Authority, "b")]).expect("pki");
    let a = cert_of(&pki, Role::Authority, "a");
    assert!(verifier(&pki).verify(&a, &[]).is_ok());

    let serial = onceonly_certs::inspect::CertificateSummary::of(&a)
        .expect("summary")
        .serial;
    assert!(pki.revoke(&serial).expect("revoke"));
    assert!(
        !pki.revoke(&serial).expect("revoke again"),
        "second revoke is a no-op"
    );
    let (revoked, number) = pki.revoked_serials().expect("crl");
    assert_eq!(revoked.len(), 1);
    assert_eq!(number, 2);

    let verifier = verifier(&pki);
    let why = rejection(verifier.verify(&a, &[]));
    assert!(why.contains("revoked"), "{why}");
    assert!(
        verifier
            .verify(&cert_of(&pki, Role::Authority, "b"), &[])
            .is_ok()
    );
}

/// Signs a leaf with the PKI's CA whose URI SANs are `uris`.
fn custom_leaf(pki: &Pki, uris: &[&str]) -> rustls::pki_types::CertificateDer<'static> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "custom");
    params.not_before = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(1);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("ia5")))
        .collect();
    params
        .subject_alt_names
        .push(SanType::DnsName("localhost".try_into().expect("ia5")));
    let key = KeyAlgorithm::EcdsaP256.generate().expect("key");
    pki.sign_custom(&params, &key).expect("sign").der().clone()
}

#[test]
fn certificate_without_spiffe_id_is_rejected() {
    let pki = Pki::throwaway(TD, &[]).expect("pki");
    let cert = custom_leaf(&pki, &["https://example.org/not-spiffe"]);
    let result = verifier(&pki).verify(&cert, &[]);
    assert_eq!(result, Err(IdentityError::NoSpiffeId));
}

#[test]
fn certificate_with_two_spiffe_ids_is_rejected() {
    let pki = Pki::throwaway(TD, &[]).expect("pki");
    let cert = custom_leaf(
        &pki,
        &[
            "spiffe://onceonly.test/authority/a",
            "spiffe://onceonly.test/admin/b",
        ],
    );
    let why = rejection(verifier(&pki).verify(&cert, &[]));
    assert!(why.contains("2 SPIFFE ids"), "{why}");
}

#[test]
fn certificate_with_malformed_spiffe_id_is_rejected() {
    let pki = Pki::throwaway(TD, &[]).expect("pki");
    let cert = custom_leaf(&pki, &["spiffe://onceonly.test/emperor/napoleon"]);
    let why = rejection(verifier(&pki).verify(&cert, &[]));
    assert!(why.contains("unknown role"), "{why}");
}

#[test]
fn identity_of_another_trust_domain_is_rejected() {
    let pki = Pki::throwaway(TD, &[]).expect("pki");
    let cert = custom_leaf(&pki, &["spiffe://elsewhere.test/authority/a"]);
    let result = verifier(&pki).verify(&cert, &[]);
    assert!(
        matches!(result, Err(IdentityError::ForeignTrustDomain { .. })),
        "{result:?}"
    );
}

#[test]
fn existing_material_is_not_overwritten_without_force() {
    let pki = Pki::throwaway(TD, &[(Role::Portal, "p")]).expect("pki");
    let before = std::fs::read(pki.participant_paths(Role::Portal, "p").0).expect("read");
    let again = pki.issue(&IssueOptions::new(Role::Portal, "p"));
    assert!(matches!(again, Err(pki::PkiError::Exists(_))), "{again:?}");
    assert_eq!(
        std::fs::read(pki.participant_paths(Role::Portal, "p").0).expect("read"),
        before
    );
    let mut forced = IssueOptions::new(Role::Portal, "p");
    forced.force = true;
    pki.issue(&forced).expect("forced issue");
    assert_ne!(
        std::fs::read(pki.participant_paths(Role::Portal, "p").0).expect("read"),
        before
    );
    let init_again = Pki::init(pki.dir(), &pki::InitOptions::new(TD));
    assert!(
        matches!(init_again, Err(pki::PkiError::Exists(_))),
        "{init_again:?}"
    );
}

#[cfg(unix)]
#[test]
fn private_keys_are_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::throwaway(TD, &[(Role::Connector, "civil")]).expect("pki");
    for key in [
        pki.participant_paths(Role::Connector, "civil").1,
        pki.participant_paths(Role::Broker, "broker").1,
        pki.dir().join("ca.key"),
    ] {
        let mode = std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }
}

#[test]
fn invalid_participant_ids_are_refused_at_issue() {
    let pki = Pki::throwaway(TD, &[]).expect("pki");
    for bad in ["", "..", "a/b", "spaces here", &"x".repeat(129)] {
        let result = pki.issue(&IssueOptions::new(Role::Authority, bad));
        assert!(
            matches!(
                result,
                Err(pki::PkiError::Identity(IdentityError::InvalidId(_)))
            ),
            "{bad:?}: {result:?}"
        );
    }
}

#[test]
fn a_forced_reissue_revokes_the_certificate_it_replaces() {
    let pki = Pki::throwaway("onceonly.test", &[(Role::Authority, "a")]).expect("pki");
    let old = cert_of(&pki, Role::Authority, "a");
    let mut options = onceonly_certs::IssueOptions::new(Role::Authority, "a");
    assert!(
        pki.issue(&options).is_err(),
        "reissued without --force over an existing certificate"
    );
    options.force = true;
    let issued = pki.issue(&options).expect("forced reissue");
    let old_serial = onceonly_certs::inspect::CertificateSummary::of(&old)
        .expect("summary")
        .serial;
    assert_eq!(issued.revoked_serial.as_deref(), Some(old_serial.as_str()));
    let verifier = verifier(&pki);
    assert!(
        rejection(verifier.verify(&old, &[])).contains("revoked"),
        "the replaced certificate still verifies"
    );
    verifier
        .verify(&cert_of(&pki, Role::Authority, "a"), &[])
        .expect("the new certificate verifies");
}

#[test]
fn a_stale_revocation_list_refuses_every_certificate_unless_told_to_warn() {
    let pki = Pki::throwaway("onceonly.test", &[(Role::Authority, "a")]).expect("pki");
    pki.refresh_crl(time::OffsetDateTime::now_utc() - time::Duration::minutes(5))
        .expect("stale list");
    let cert = cert_of(&pki, Role::Authority, "a");
    let refusing = verifier(&pki);
    let reason = rejection(refusing.verify(&cert, &[]));
    assert!(reason.contains("nextUpdate"), "{reason}");
    let mut files = pki.tls_files(Role::Broker, "broker");
    files.crl_stale = onceonly_certs::pki::CrlStalePolicy::Warn;
    let warning =
        onceonly_certs::tls::identity_verifier(&files, "onceonly.test").expect("verifier");
    warning.verify(&cert, &[]).expect("a stale list only warns");
}
