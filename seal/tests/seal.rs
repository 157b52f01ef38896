//! Tickets, statements and encryption against a real throw-away PKI: what
//! verifies, and every way a forger, a replayer or a broker that swaps a
//! key fails.

use std::sync::Arc;

use onceonly_certs::tls::identity_verifier;
use onceonly_certs::{IdentityVerifier, IssueOptions, Pki, Role};
use onceonly_proto::v1::{EncryptedPayload, Evidence, SubjectIdScheme};
use onceonly_seal::encryption::{Context, SUITE};
use onceonly_seal::jws::JwsError;
use onceonly_seal::statement::EncryptionClaims;
use onceonly_seal::{
    DecryptionKey, EvidenceOpener, Expected, NonceBook, OpenError, Recipient, RecipientError,
    RequestBinding, RequestClaims, RequestError, RequestFields, SignedRequest, Signer,
    StatementClaims, TicketClaims, TicketError, TicketExpectation, TicketVerifier, digest_b64,
    sign_request, subject_hash, unix_now, verify_request,
};

const TD: &str = "onceonly.test";
const ANNA: &str = "86095742719";
const BERLIN: &str = "spiffe://onceonly.test/authority/elterngeld-berlin";
const CIVIL: &str = "spiffe://onceonly.test/connector/civil-register";
const BROKER: &str = "spiffe://onceonly.test/broker/broker";

struct Setup {
    pki: onceonly_certs::pki::ThrowawayPki,
    trust: Arc<IdentityVerifier>,
}

fn setup() -> Setup {
    let pki = Pki::throwaway(
        TD,
        &[
            (Role::Connector, "civil-register"),
            (Role::Authority, "elterngeld-berlin"),
            (Role::Authority, "other-authority"),
            (Role::Broker, "rogue-broker"),
        ],
    )
    .expect("pki");
    for id in ["elterngeld-berlin", "other-authority"] {
        let mut options = IssueOptions::new(Role::Authority, id);
        options.encryption = true;
        pki.issue(&options).expect("encryption certificate");
    }
    let trust =
        Arc::new(identity_verifier(&pki.tls_files(Role::Broker, "broker"), TD).expect("trust"));
    Setup { pki, trust }
}

fn signer(setup: &Setup, role: Role, id: &str) -> Signer {
    let (cert, key) = setup.pki.participant_paths(role, id);
    Signer::from_files(&cert, &key).expect("signer")
}

fn ticket_claims() -> TicketClaims {
    let now = unix_now();
    TicketClaims {
        iss: BROKER.into(),
        aud: CIVIL.into(),
        sub: BERLIN.into(),
        jti: "t-1".into(),
        iat: now,
        exp: now + 30,
        xid: "ex-1".into(),
        evt: "birth-certificate".into(),
        sbh: subject_hash("ex-1", SubjectIdScheme::DeIdnr, ANNA),
        pur: "parental-allowance".into(),
        lgb: "§ 9 Abs. 1 BEEG".into(),
        jur: String::new(),
        prm: String::new(),
        rul: "berlin-birth".into(),
        cid: String::new(),
        ecf: String::new(),
        req: String::new(),
    }
}

fn expectation(sbh: &str) -> TicketExpectation<'_> {
    TicketExpectation {
        audience: CIVIL,
        exchange_id: "ex-1",
        requester: BERLIN,
        evidence_type: "birth-certificate",
        subject_hash: sbh,
        purpose: "parental-allowance",
        legal_basis: "§ 9 Abs. 1 BEEG",
        jurisdiction: "",
        parameters: "",
        encryption_certificate: "",
    }
}

#[test]
fn a_ticket_verifies_once_and_is_a_replay_after() {
    let setup = setup();
    let token = ticket_claims()
        .sign(&signer(&setup, Role::Broker, "broker"))
        .expect("sign");
    let verifier = TicketVerifier::new(BROKER);
    let sbh = subject_hash("ex-1", SubjectIdScheme::DeIdnr, ANNA);
    let claims = verifier
        .verify(&token, &setup.trust, &expectation(&sbh), unix_now())
        .expect("a good ticket");
    assert_eq!(claims.rul, "berlin-birth");
    assert_eq!(
        verifier.verify(&token, &setup.trust, &expectation(&sbh), unix_now()),
        Err(TicketError::Replayed { jti: "t-1".into() })
    );
}

#[test]
fn a_ticket_is_remembered_until_its_expiry_and_leeway_pass_and_then_forgotten() {
    use onceonly_seal::ticket::LEEWAY_SECS;
    let setup = setup();
    let broker = signer(&setup, Role::Broker, "broker");
    let verifier = TicketVerifier::new(BROKER);
    let sbh = subject_hash("ex-1", SubjectIdScheme::DeIdnr, ANNA);
    let now = unix_now();
    // Three tickets expiring 10, 20 and 30 s from now.
    let tokens: Vec<(String, i64)> = [10, 20, 30]
        .into_iter()
        .map(|lifetime| {
            let mut claims = ticket_claims();
            claims.jti = format!("t-{lifetime}");
            claims.exp = now + lifetime;
            (claims.sign(&broker).expect("sign"), claims.exp)
        })
        .collect();
    for (token, _) in &tokens {
        verifier
            .verify(token, &setup.trust, &expectation(&sbh), now)
            .expect("a good ticket");
    }
    assert_eq!(verifier.remembered(), 3);
    let leeway = i64::try_from(LEEWAY_SECS).expect("small");
    let (first, first_exp) = &tokens[0];
    // At its expiry plus the leeway it is still a replay ...
    assert_eq!(
        verifier.verify(first, &setup.trust, &expectation(&sbh), first_exp + leeway),
        Err(TicketError::Replayed { jti: "t-10".into() })
    );
    // ... one second later it is forgotten, and only it: the others stay
    // replays. Forgotten, it is refused as expired by the memory itself,
    // though the signature check (on the real clock) still finds it
    // unexpired.
    let later = first_exp + leeway + 1;
    assert!(matches!(
        verifier.verify(first, &setup.trust, &expectation(&sbh), later),
        Err(TicketError::Expired(_))
    ));
    assert_eq!(verifier.remembered(), 2, "t-20 and t-30");
    assert_eq!(
        verifier.verify(&tokens[1].0, &setup.trust, &expectation(&sbh), later),
        Err(TicketError::Replayed { jti: "t-20".into() })
    );
    // A call whose clock reads earlier (another thread's, or a clock
    // stepped back) cannot slip the forgotten ticket in either.
    assert!(matches!(
        verifier.verify(first, &setup.trust, &expectation(&sbh), first_exp + leeway),
        Err(TicketError::Expired(_))
    ));
    // Past every expiry, all are forgotten at the next call.
    let last = tokens[2].1 + leeway + 1;
    let mut fresh = ticket_claims();
    fresh.jti = "t-fresh".into();
    fresh.exp = now + 60;
    verifier
        .verify(
            &fresh.sign(&broker).expect("sign"),
            &setup.trust,
            &expectation(&sbh),
            last,
        )
        .expect("a fresh ticket");
    assert_eq!(verifier.remembered(), 1);
}

#[test]
fn forged_expired_foreign_and_mismatched_tickets_are_refused_by_name() {
    let setup = setup();
    let broker = signer(&setup, Role::Broker, "broker");
    let verifier = TicketVerifier::new(BROKER);
    let sbh = subject_hash("ex-1", SubjectIdScheme::DeIdnr, ANNA);
    let expected = expectation(&sbh);
    let verify = |token: &str| verifier.verify(token, &setup.trust, &expected, unix_now());

    assert_eq!(verify(""), Err(TicketError::Missing));

    // One changed claim under the old signature.
    let token = ticket_claims().sign(&broker).expect("sign");
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut forged = ticket_claims();
    forged.rul = "a-rule-never-written".into();
    parts[1] = base64_url(&serde_json::to_vec(&forged).expect("json"));
    assert_eq!(
        verify(&parts.join(".")),
        Err(TicketError::Invalid(JwsError::BadSignature))
    );

    // Signed by a connector, or by another broker of the trust domain.
    let by_connector = ticket_claims()
        .sign(&signer(&setup, Role::Connector, "civil-register"))
        .expect("sign");
    assert!(matches!(
        verify(&by_connector),
        Err(TicketError::Invalid(JwsError::WrongSigner { .. }))
    ));
    let mut rogue_claims = ticket_claims();
    rogue_claims.iss = "spiffe://onceonly.test/broker/rogue-broker".into();
    rogue_claims.jti = "t-rogue".into();
    let rogue = rogue_claims
        .sign(&signer(&setup, Role::Broker, "rogue-broker"))
        .expect("sign");
    assert!(matches!(
        verify(&rogue),
        Err(TicketError::WrongIssuer { .. })
    ));

    // Signed by a broker certificate of another CA.
    let foreign = Pki::throwaway(TD, &[]).expect("foreign pki");
    let (cert, key) = foreign.participant_paths(Role::Broker, "broker");
    let mut foreign_claims = ticket_claims();
    foreign_claims.jti = "t-foreign".into();
    let token = foreign_claims
        .sign(&Signer::from_files(&cert, &key).expect("signer"))
        .expect("sign");
    assert!(matches!(
        verify(&token),
        Err(TicketError::Invalid(JwsError::SignerRefused(_)))
    ));

    // Expired (beyond the leeway), and valid for too long.
    let mut old = ticket_claims();
    old.jti = "t-old".into();
    old.iat -= 120;
    old.exp = unix_now() - 60;
    assert!(matches!(
        verify(&old.sign(&broker).expect("sign")),
        Err(TicketError::Expired(_))
    ));
    let mut long = ticket_claims();
    long.jti = "t-long".into();
    long.exp = long.iat + 3600;
    assert!(matches!(
        verify(&long.sign(&broker).expect("sign")),
        Err(TicketError::Expired(_))
    ));

    // Another subject, another evidence type, another requester.
    let mut other_subject = ticket_claims();
    other_subject.jti = "t-subject".into();
    other_subject.sbh = subject_hash("ex-1", SubjectIdScheme::DeIdnr, "12345678903");
    assert_eq!(
        verify(&other_subject.sign(&broker).expect("sign")),
        Err(TicketError::Mismatch {
            field: "sbh (subject)"
        })
    );
    let mut other_type = ticket_claims();
    other_type.jti = "t-type".into();
    other_type.evt = "vehicle-registration".into();
    assert_eq!(
        verify(&other_type.sign(&broker).expect("sign")),
        Err(TicketError::Mismatch {
            field: "evt (evidence type)"
        })
    );
    let mut other_parameters = ticket_claims();
    other_parameters.jti = "t-prm".into();
    other_parameters.prm = onceonly_seal::parameters_hash(&std::collections::HashMap::from([(
        "licence_plate".to_owned(),
        "B-XX 9".to_owned(),
    )]));
    assert_eq!(
        verify(&other_parameters.sign(&broker).expect("sign")),
        Err(TicketError::Mismatch {
            field: "prm (parameters)"
        })
    );
    // Dated in the future beyond the leeway.
    let mut future = ticket_claims();
    future.jti = "t-future".into();
    future.iat += 120;
    future.exp += 120;
    assert!(matches!(
        verify(&future.sign(&broker).expect("sign")),
        Err(TicketError::Expired(_))
    ));
    // None of the refused tickets was remembered.
    assert_eq!(verifier.remembered(), 0);
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn expected() -> Expected<'static> {
    Expected {
        exchange_id: "ex-1",
        evidence_type: "birth-certificate",
        subject_scheme: SubjectIdScheme::DeIdnr,
        subject_value: ANNA,
        requester: BERLIN,
        parameters: None,
        connector: None,
        encrypted: false,
        request: None,
    }
}

fn signed_evidence(setup: &Setup, payload: &[u8], recipient: Option<&Recipient>) -> Evidence {
    let context = Context {
        exchange_id: "ex-1",
        evidence_type: "birth-certificate",
        requester: BERLIN,
        media_type: "application/json",
    };
    let (carried, encrypted, enc) = match recipient {
        None => (payload.to_vec(), None, None),
        Some(recipient) => {
            let sealed = recipient.seal(&context, payload).expect("seal");
            (
                sealed.ciphertext.clone(),
                Some(EncryptedPayload {
                    suite: SUITE.into(),
                    encapsulated_key: sealed.encapsulated_key.clone(),
                    ciphertext: sealed.ciphertext,
                    recipient_certificate_sha256: recipient.certificate_sha256().to_vec(),
                }),
                Some(EncryptionClaims {
                    rcf: recipient.fingerprint().into(),
                    ek: base64_url(&sealed.encapsulated_key),
                    suite: SUITE.into(),
                }),
            )
        }
    };
    let statement = StatementClaims {
        iss: CIVIL.into(),
        sub: BERLIN.into(),
        iat: unix_now(),
        xid: "ex-1".into(),
        evt: "birth-certificate".into(),
        sbh: subject_hash("ex-1", SubjectIdScheme::DeIdnr, ANNA),
        med: "application/json".into(),
        prm: String::new(),
        dig: digest_b64(&carried),
        enc,
        non: String::new(),
        rqd: String::new(),
    };
    Evidence {
        evidence_type: "birth-certificate".into(),
        payload: if encrypted.is_some() {
            Vec::new()
        } else {
            payload.to_vec()
        },
        media_type: "application/json".into(),
        connector_id: "civil-register".into(),
        register_jws: statement
            .sign(&signer(setup, Role::Connector, "civil-register"))
            .expect("sign"),
        encrypted_payload: encrypted,
        ..Default::default()
    }
}

fn recipient(setup: &Setup, id: &str) -> Recipient {
    let (cert, _) = setup.pki.encryption_paths(id);
    let der = onceonly_certs::pki::load_certs(&cert)
        .expect("cert")
        .remove(0);
    Recipient::from_certificate(&der, &setup.trust).expect("recipient")
}

fn decryption_key(setup: &Setup, id: &str) -> DecryptionKey {
    let (cert, key) = setup.pki.encryption_paths(id);
    DecryptionKey::from_files(&cert, &key).expect("key")
}

#[test]
fn signed_evidence_opens_and_one_changed_byte_names_the_digest_check() {
    let setup = setup();
    let opener = EvidenceOpener::new(setup.trust.clone(), None);
    let evidence = signed_evidence(&setup, br#"{"name":"Anna"}"#, None);
    let opened = opener.open(&evidence, &expected()).expect("opens");
    assert_eq!(opened.payload, br#"{"name":"Anna"}"#);
    assert_eq!(opened.connector.spiffe_id(), CIVIL);

    let mut altered = evidence.clone();
    altered.payload[3] ^= 1;
    let error = opener.open(&altered, &expected()).expect_err("altered");
    assert_eq!(error, OpenError::Digest { what: "payload" });
    assert!(error.to_string().starts_with("check digest"), "{error}");

    let mut elsewhere = expected();
    elsewhere.exchange_id = "ex-2";
    assert_eq!(
        opener
            .open(&evidence, &elsewhere)
            .expect_err("another exchange"),
        OpenError::Binding {
            field: "exchange (xid)"
        }
    );
    let mut stripped = evidence;
    stripped.register_jws.clear();
    assert_eq!(
        opener.open(&stripped, &expected()).expect_err("unsigned"),
        OpenError::NoStatement
    );
}

#[test]
fn encrypted_evidence_opens_only_for_its_recipient_and_context() {
    let setup = setup();
    let berlin = recipient(&setup, "elterngeld-berlin");
    assert_eq!(berlin.participant().spiffe_id(), BERLIN);
    let evidence = signed_evidence(&setup, br#"{"name":"Anna"}"#, Some(&berlin));
    assert!(evidence.payload.is_empty());

    let opener = EvidenceOpener::new(
        setup.trust.clone(),
        Some(decryption_key(&setup, "elterngeld-berlin")),
    );
    let opened = opener.open(&evidence, &expected()).expect("opens");
    assert!(opened.was_encrypted);
    assert_eq!(opened.payload, br#"{"name":"Anna"}"#);

    // Another authority's key.
    let other = EvidenceOpener::new(
        setup.trust.clone(),
        Some(decryption_key(&setup, "other-authority")),
    );
    assert!(matches!(
        other.open(&evidence, &expected()),
        Err(OpenError::Encryption(_))
    ));
    // A flipped ciphertext byte fails the register's digest.
    let mut altered = evidence.clone();
    if let Some(sealed) = altered.encrypted_payload.as_mut() {
        sealed.ciphertext[0] ^= 1;
    }
    assert_eq!(
        opener.open(&altered, &expected()).expect_err("altered"),
        OpenError::Digest { what: "ciphertext" }
    );
}

#[test]
fn only_an_authoritys_encryption_certificate_of_the_ca_is_a_recipient() {
    let setup = setup();
    // A TLS certificate is not for encryption.
    let (tls_cert, _) = setup
        .pki
        .participant_paths(Role::Authority, "elterngeld-berlin");
    let der = onceonly_certs::pki::load_certs(&tls_cert)
        .expect("cert")
        .remove(0);
    assert!(matches!(
        Recipient::from_certificate(&der, &setup.trust),
        Err(RecipientError::NotForEncryption(_))
    ));
    // An encryption certificate from another CA.
    let foreign = Pki::throwaway(TD, &[]).expect("foreign");
    let mut options = IssueOptions::new(Role::Authority, "elterngeld-berlin");
    options.encryption = true;
    foreign.issue(&options).expect("issue");
    let (cert, _) = foreign.encryption_paths("elterngeld-berlin");
    let der = onceonly_certs::pki::load_certs(&cert)
        .expect("cert")
        .remove(0);
    assert!(matches!(
        Recipient::from_certificate(&der, &setup.trust),
        Err(RecipientError::NotIssued(_))
    ));
    // And an encryption certificate authenticates nobody (no TLS login, no
    // signature): it lacks digitalSignature.
    let (enc, _) = setup.pki.encryption_paths("elterngeld-berlin");
    let der = onceonly_certs::pki::load_certs(&enc)
        .expect("cert")
        .remove(0);
    let refused = setup.trust.verify(&der, &[]).expect_err("no login");
    assert!(
        refused.to_string().contains("digitalSignature"),
        "{refused}"
    );
    // Only authorities get one.
    let mut options = IssueOptions::new(Role::Connector, "civil-register");
    options.encryption = true;
    options.force = true;
    assert!(setup.pki.issue(&options).is_err());
}

/// The raw public key of a certificate file's leaf, for jsonwebtoken.
fn raw_public_key(cert: &std::path::Path) -> Vec<u8> {
    let der = onceonly_certs::pki::load_certs(cert)
        .expect("cert")
        .remove(0);
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
    parsed.public_key().subject_public_key.data.to_vec()
}

fn x5c(cert: &std::path::Path) -> Vec<String> {
    use base64::Engine;
    onceonly_certs::pki::load_certs(cert)
        .expect("cert")
        .iter()
        .map(|c| base64::engine::general_purpose::STANDARD.encode(c.as_ref()))
        .collect()
}

#[test]
fn tokens_we_sign_are_read_by_jsonwebtoken_and_its_tokens_by_us_for_both_key_types() {
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
    use onceonly_certs::KeyAlgorithm;
    let setup = setup();
    let sbh = subject_hash("ex-1", SubjectIdScheme::DeIdnr, ANNA);
    for (key_type, alg) in [
        (KeyAlgorithm::EcdsaP256, Algorithm::ES256),
        (KeyAlgorithm::Ed25519, Algorithm::EdDSA),
    ] {
        let mut options = IssueOptions::new(Role::Broker, "broker");
        options.key_algorithm = Some(key_type);
        options.force = true;
        setup.pki.issue(&options).expect("broker certificate");
        let (cert, key) = setup.pki.participant_paths(Role::Broker, "broker");
        let raw = raw_public_key(&cert);
        let decoding = match alg {
            Algorithm::ES256 => DecodingKey::from_ec_der(&raw),
            _ => DecodingKey::from_ed_der(&raw),
        };
        let mut validation = Validation::new(alg);
        validation.validate_aud = false;

        // Ours, read by jsonwebtoken: header and claims as we wrote them.
        let mut claims = ticket_claims();
        claims.jti = format!("ours-{alg:?}");
        let token = claims
            .sign(&signer(&setup, Role::Broker, "broker"))
            .expect("sign");
        let read = jsonwebtoken::decode::<TicketClaims>(&token, &decoding, &validation)
            .unwrap_or_else(|e| panic!("{alg:?}: jsonwebtoken refuses our token: {e}"));
        assert_eq!(read.claims, claims);
        assert_eq!(read.header.typ.as_deref(), Some("onceonly-ticket+jwt"));
        assert_eq!(read.header.x5c, Some(x5c(&cert)));

        // jsonwebtoken's, read by us.
        use rustls_pki_types::pem::PemObject;
        let rustls_pki_types::PrivateKeyDer::Pkcs8(pkcs8) =
            rustls_pki_types::PrivateKeyDer::from_pem_file(&key).expect("key")
        else {
            panic!("onceonly-certs writes PKCS#8");
        };
        let encoding = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_der(pkcs8.secret_pkcs8_der()),
            _ => EncodingKey::from_ed_der(pkcs8.secret_pkcs8_der()),
        };
        let mut header = Header::new(alg);
        header.typ = Some("onceonly-ticket+jwt".into());
        header.x5c = Some(x5c(&cert));
        let mut theirs = ticket_claims();
        theirs.jti = format!("theirs-{alg:?}");
        let token = jsonwebtoken::encode(&header, &theirs, &encoding).expect("encode");
        let verifier = TicketVerifier::new(BROKER);
        let verified = verifier
            .verify(&token, &setup.trust, &expectation(&sbh), unix_now())
            .unwrap_or_else(|e| panic!("{alg:?}: we refuse jsonwebtoken's token: {e}"));
        assert_eq!(verified, theirs);
    }
}

#[test]
fn tokens_outside_what_we_sign_are_refused_before_their_signature_counts() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let setup = setup();
    let (cert, _) = setup.pki.participant_paths(Role::Broker, "broker");
    let sbh = subject_hash("ex-1", SubjectIdScheme::DeIdnr, ANNA);
    let good = ticket_claims()
        .sign(&signer(&setup, Role::Broker, "broker"))
        .expect("sign");
    let (_, claims_b64) = good.split_once('.').expect("parts");
    let (claims_b64, signature_b64) = claims_b64.split_once('.').expect("parts");
    let with_header = |header: serde_json::Value, signature: &str| {
        format!(
            "{}.{claims_b64}.{signature}",
            URL_SAFE_NO_PAD.encode(header.to_string())
        )
    };
    let refuse = |token: &str| {
        let verifier = TicketVerifier::new(BROKER);
        match verifier.verify(token, &setup.trust, &expectation(&sbh), unix_now()) {
            Err(TicketError::Invalid(e)) => e,
            other => panic!("not refused as invalid: {other:?}"),
        }
    };
    let x5c = x5c(&cert);
    // alg none, with no signature.
    let none = with_header(
        serde_json::json!({"typ": "onceonly-ticket+jwt", "alg": "none", "x5c": x5c}),
        "",
    );
    assert!(matches!(refuse(&none), JwsError::Malformed(m) if m.contains("alg")));
    // HS256 (a MAC keyed with the public key, the classic confusion).
    let hs = with_header(
        serde_json::json!({"typ": "onceonly-ticket+jwt", "alg": "HS256", "x5c": x5c}),
        signature_b64,
    );
    assert!(matches!(refuse(&hs), JwsError::Malformed(m) if m.contains("alg")));
    // A critical extension we do not understand.
    let crit = with_header(
        serde_json::json!({"typ": "onceonly-ticket+jwt", "alg": "ES256", "x5c": x5c, "crit": ["exp"]}),
        signature_b64,
    );
    assert!(matches!(refuse(&crit), JwsError::Malformed(m) if m.contains("crit")));
    let crit_null = with_header(
        serde_json::json!({"typ": "onceonly-ticket+jwt", "alg": "ES256", "x5c": x5c, "crit": null}),
        signature_b64,
    );
    assert!(matches!(refuse(&crit_null), JwsError::Malformed(m) if m.contains("crit")));
    // Four parts, and the JWS JSON serialization's padding.
    assert!(matches!(
        refuse(&format!("{good}.x")),
        JwsError::Malformed(_)
    ));
    assert!(matches!(
        refuse(&format!("{good}=")),
        JwsError::Malformed(_)
    ));
    // The good one, untouched, still verifies: the refusals were the edits'.
    TicketVerifier::new(BROKER)
        .verify(&good, &setup.trust, &expectation(&sbh), unix_now())
        .expect("the untouched token");
}

/// Evidence for "ex-1" whose statement, issued at `iat`, names the signed
/// request by `nonce` and `digest`.
fn evidence_answering(setup: &Setup, nonce: &str, digest: &str, iat: i64) -> Evidence {
    let payload = br#"{"name":"Anna"}"#;
    let statement = StatementClaims {
        iss: CIVIL.into(),
        sub: BERLIN.into(),
        iat,
        xid: "ex-1".into(),
        evt: "birth-certificate".into(),
        sbh: subject_hash("ex-1", SubjectIdScheme::DeIdnr, ANNA),
        med: "application/json".into(),
        prm: String::new(),
        dig: digest_b64(payload),
        enc: None,
        non: nonce.into(),
        rqd: digest.into(),
    };
    Evidence {
        evidence_type: "birth-certificate".into(),
        payload: payload.to_vec(),
        media_type: "application/json".into(),
        connector_id: "civil-register".into(),
        register_jws: statement
            .sign(&signer(setup, Role::Connector, "civil-register"))
            .expect("sign"),
        ..Default::default()
    }
}

fn berlin_request() -> onceonly_proto::v1::RequestEvidenceRequest {
    onceonly_proto::v1::RequestEvidenceRequest {
        request_id: "r-1".into(),
        evidence_type: "birth-certificate".into(),
        subject: Some(onceonly_proto::v1::SubjectId {
            scheme: SubjectIdScheme::DeIdnr.into(),
            value: ANNA.into(),
        }),
        purpose: "parental-allowance".into(),
        legal_basis: "§ 9 Abs. 1 BEEG".into(),
        parameters: [("copy".to_owned(), "certified".to_owned())].into(),
        ..Default::default()
    }
}

/// The fields of `request` as the broker checks them (caller Berlin).
fn fields_of(
    request: &onceonly_proto::v1::RequestEvidenceRequest,
    parameters: &str,
) -> RequestFields<'static> {
    let leak = |s: &str| -> &'static str { Box::leak(s.to_owned().into_boxed_str()) };
    let subject = request.subject.clone().unwrap_or_default();
    RequestFields {
        requester: BERLIN,
        request_id: Some(leak(&request.request_id)),
        evidence_type: leak(&request.evidence_type),
        subject_scheme: subject.scheme(),
        subject_value: leak(&subject.value),
        purpose: leak(&request.purpose),
        legal_basis: leak(&request.legal_basis),
        jurisdiction: leak(&request.jurisdiction),
        parameters: leak(parameters),
        consent_id: Some(leak(&request.consent_id)),
        encryption_certificate: "",
    }
}

/// Berlin's request, signed by Berlin.
fn signed_berlin_request(
    setup: &Setup,
) -> (onceonly_proto::v1::RequestEvidenceRequest, SignedRequest) {
    let berlin = signer(setup, Role::Authority, "elterngeld-berlin");
    let mut request = berlin_request();
    let signed = sign_request(
        &mut request,
        &berlin,
        onceonly_seal::request::DEFAULT_LIFETIME,
    )
    .expect("sign");
    (request, signed)
}

#[test]
fn a_signed_request_verifies_for_its_request_and_each_changed_field_is_named() {
    let setup = setup();
    let (request, signed) = signed_berlin_request(&setup);
    assert_eq!(request.signed_request, signed.token);
    let parameters = onceonly_seal::parameters_hash(&request.parameters);
    let now = unix_now();
    let verified = verify_request(
        &signed.token,
        &setup.trust,
        &fields_of(&request, &parameters),
        now,
    )
    .expect("verifies");
    assert_eq!(verified.digest, signed.digest);
    assert_eq!(verified.claims.non, signed.nonce);
    assert!(verified.claims.non.len() >= 22);
    // Each field the claims repeat, changed in the request.
    type Change = fn(&mut onceonly_proto::v1::RequestEvidenceRequest);
    let changes: Vec<(&str, Change)> = vec![
        ("rid", |r| r.request_id = "r-2".into()),
        ("evt", |r| r.evidence_type = "proof-of-residence".into()),
        ("sbh", |r| {
            r.subject.as_mut().expect("subject").value = "10000000000".into()
        }),
        ("pur", |r| r.purpose = "other".into()),
        ("lgb", |r| r.legal_basis = "other".into()),
        ("jur", |r| r.jurisdiction = "DE-BY".into()),
        ("cid", |r| r.consent_id = "c-1".into()),
    ];
    for (claim, change) in changes {
        let mut changed = request.clone();
        change(&mut changed);
        let refused = verify_request(
            &signed.token,
            &setup.trust,
            &fields_of(&changed, &parameters),
            now,
        )
        .expect_err(claim);
        assert!(
            matches!(refused, RequestError::Mismatch { claim: c, .. } if c == claim),
            "{claim}: {refused:?}"
        );
    }
    let refused = verify_request(
        &signed.token,
        &setup.trust,
        &fields_of(&request, "another-parameters-hash"),
        now,
    )
    .expect_err("parameters");
    assert!(matches!(
        refused,
        RequestError::Mismatch { claim: "prm", .. }
    ));
    let refused = verify_request(
        &signed.token,
        &setup.trust,
        &RequestFields {
            encryption_certificate: "a-certificate",
            ..fields_of(&request, &parameters)
        },
        now,
    )
    .expect_err("encryption certificate");
    assert!(matches!(
        refused,
        RequestError::Mismatch { claim: "ecf", .. }
    ));
}

#[test]
fn signed_requests_of_others_out_of_time_or_altered_are_refused_by_name() {
    let setup = setup();
    let berlin = signer(&setup, Role::Authority, "elterngeld-berlin");
    let request = berlin_request();
    let parameters = onceonly_seal::parameters_hash(&request.parameters);
    let fields = fields_of(&request, &parameters);
    let now = unix_now();
    let lifetime = onceonly_seal::request::DEFAULT_LIFETIME;
    let claims = RequestClaims::for_request(&request, BERLIN, now, lifetime).expect("claims");
    let verify = |token: &str| verify_request(token, &setup.trust, &fields, now);

    assert!(matches!(verify(""), Err(RequestError::Missing)));
    verify(&claims.sign(&berlin).expect("sign")).expect("the authority's own");

    // Another authority's signature on Berlin's request.
    let other = signer(&setup, Role::Authority, "other-authority");
    let by_other = RequestClaims {
        iss: other.participant().spiffe_id(),
        ..claims.clone()
    };
    assert!(matches!(
        verify(&by_other.sign(&other).expect("sign")),
        Err(RequestError::NotTheRequester { .. })
    ));
    // Berlin's claims, signed with another key that names Berlin as iss.
    assert!(matches!(
        verify(&claims.sign(&other).expect("sign")),
        Err(RequestError::NotTheRequester { .. })
    ));
    // A broker (or connector) key is no authority's.
    let broker = signer(&setup, Role::Broker, "broker");
    assert!(matches!(
        verify(&claims.sign(&broker).expect("sign")),
        Err(RequestError::Invalid(JwsError::WrongSigner { .. }))
    ));
    // Out of time: expired, too long-lived, from the future.
    for (what, iat, exp) in [
        ("expired", now - 900, now - 600),
        ("a day long", now, now + 86_400),
        ("from the future", now + 60, now + 120),
        ("exp before iat", now, now - 1),
    ] {
        let timed = RequestClaims {
            iat,
            exp,
            ..claims.clone()
        };
        assert!(
            matches!(
                verify(&timed.sign(&berlin).expect("sign")),
                Err(RequestError::Expired(_))
            ),
            "{what}"
        );
    }
    // A nonce too short to be fresh.
    let short = RequestClaims {
        non: "abc".into(),
        sbh: subject_hash("abc", SubjectIdScheme::DeIdnr, ANNA),
        ..claims.clone()
    };
    assert!(matches!(
        verify(&short.sign(&berlin).expect("sign")),
        Err(RequestError::Invalid(JwsError::Malformed(_)))
    ));
    // The claims edited, the signature kept.
    let token = claims.sign(&berlin).expect("sign");
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let widened = RequestClaims {
        pur: "anything".into(),
        ..claims.clone()
    };
    parts[1] = base64_url(&serde_json::to_vec(&widened).expect("json"));
    assert!(matches!(
        verify_request(
            &parts.join("."),
            &setup.trust,
            &RequestFields {
                purpose: "anything",
                ..fields
            },
            now
        ),
        Err(RequestError::Invalid(JwsError::BadSignature))
    ));
}

#[test]
fn a_nonce_answers_one_exchange_until_it_expires() {
    let book = NonceBook::default();
    let now = unix_now();
    let claims = RequestClaims::for_request(
        &berlin_request(),
        BERLIN,
        now,
        std::time::Duration::from_secs(60),
    )
    .expect("claims");
    book.claim(&claims, "ex-1", now).expect("first");
    book.claim(&claims, "ex-1", now)
        .expect("a retry of the same exchange");
    assert_eq!(
        book.claim(&claims, "ex-2", now),
        Err(RequestError::Replayed {
            first: "ex-1".into()
        })
    );
    // Forgotten once expired (and the leeway passed): by then the request
    // itself is refused as expired.
    book.claim(&claims, "ex-2", claims.exp + 6)
        .expect("forgotten after expiry");
}

#[test]
fn a_statement_must_name_the_request_it_answers_and_be_fresh() {
    let setup = setup();
    let opener = EvidenceOpener::new(setup.trust.clone(), None);
    let now = unix_now();
    let binding = RequestBinding {
        nonce: "the-nonce-of-the-request-1",
        digest: "the-digest",
        issued_at: now - 10,
    };
    let answering = Expected {
        request: Some(binding),
        ..expected()
    };
    let evidence = evidence_answering(&setup, binding.nonce, binding.digest, now);
    opener.open(&evidence, &answering).expect("bound and fresh");
    // Asked encrypted, came in clear (signed so by the register): refused.
    assert!(matches!(
        opener.open(
            &evidence,
            &Expected {
                encrypted: true,
                ..answering
            }
        ),
        Err(OpenError::Encryption(_))
    ));

    for (what, evidence, field) in [
        (
            "another request's nonce",
            evidence_answering(&setup, "another-nonce-of-a-request", binding.digest, now),
            "request nonce (non)",
        ),
        (
            "another request's digest",
            evidence_answering(&setup, binding.nonce, "another-digest", now),
            "signed request (rqd)",
        ),
        (
            "no request named",
            evidence_answering(&setup, "", "", now),
            "request nonce (non)",
        ),
    ] {
        assert_eq!(
            opener.open(&evidence, &answering).expect_err(what),
            OpenError::Binding { field },
            "{what}"
        );
    }
    // Issued before the request was signed: an old answer.
    let before = evidence_answering(&setup, binding.nonce, binding.digest, now - 60);
    assert!(matches!(
        opener.open(&before, &answering),
        Err(OpenError::Stale(_))
    ));
    // Older than the authority accepts, whatever it names.
    let old = evidence_answering(&setup, "", "", now - 3600);
    assert!(matches!(
        opener.open(&old, &expected()),
        Err(OpenError::Stale(_))
    ));
    EvidenceOpener::new(setup.trust.clone(), None)
        .with_max_age(std::time::Duration::from_secs(7200))
        .open(&old, &expected())
        .expect("within a window the authority widened");
    // From the future.
    let ahead = evidence_answering(&setup, "", "", now + 600);
    assert!(matches!(
        opener.open(&ahead, &expected()),
        Err(OpenError::Stale(_))
    ));
}

#[test]
fn a_signer_cell_signs_on_with_its_key_when_a_reload_brings_files_that_cannot_sign() {
    let setup = setup();
    let dir = tempfile::tempdir().expect("dir");
    let (cert, key) = setup
        .pki
        .participant_paths(Role::Connector, "civil-register");
    let (cert_copy, key_copy) = (dir.path().join("c.pem"), dir.path().join("c.key"));
    std::fs::copy(&cert, &cert_copy).expect("copy");
    std::fs::copy(&key, &key_copy).expect("copy");
    let cell = onceonly_seal::jws::SignerCell::load(&cert_copy, &key_copy, 0).expect("loads");
    let before = cell.get(0);
    // A reload (generation 1) that finds a key file that is no key.
    std::fs::write(&key_copy, "not a key").expect("write");
    for _ in 0..3 {
        let after = cell.get(1);
        assert!(
            std::sync::Arc::ptr_eq(&before, &after),
            "the signer loaded before signs on"
        );
        let token = StatementClaims {
            iss: CIVIL.into(),
            sub: BERLIN.into(),
            iat: unix_now(),
            xid: "ex-1".into(),
            evt: "birth-certificate".into(),
            sbh: subject_hash("ex-1", SubjectIdScheme::DeIdnr, ANNA),
            med: "application/json".into(),
            prm: String::new(),
            dig: digest_b64(b"x"),
            enc: None,
            non: String::new(),
            rqd: String::new(),
        }
        .sign(&after)
        .expect("signs");
        StatementClaims::verify(&token, &setup.trust).expect("verifies");
    }
    // The files repaired, the next reload takes them.
    std::fs::copy(&key, &key_copy).expect("copy");
    assert!(!std::sync::Arc::ptr_eq(&before, &cell.get(2)));
}

#[test]
fn a_nonce_is_its_signers_own_and_is_freed_by_an_exchange_without_evidence() {
    let book = NonceBook::default();
    let now = unix_now();
    let berlin = RequestClaims::for_request(
        &berlin_request(),
        BERLIN,
        now,
        std::time::Duration::from_secs(60),
    )
    .expect("claims");
    // Another authority signing the same nonce uses up nothing of Berlin's.
    let other = RequestClaims {
        iss: "spiffe://onceonly.test/authority/other-authority".into(),
        ..berlin.clone()
    };
    book.claim(&other, "ex-0", now).expect("the other's");
    book.claim(&berlin, "ex-1", now).expect("Berlin's own");
    // Freed by the exchange that ended without evidence: the retry's.
    book.release(&berlin, "ex-1");
    book.claim(&berlin, "ex-2", now).expect("the retry");
    // Only the exchange that holds it frees it.
    book.release(&berlin, "ex-1");
    assert!(matches!(
        book.claim(&berlin, "ex-3", now),
        Err(RequestError::Replayed { .. })
    ));
}

#[test]
fn the_digest_of_a_signed_request_does_not_depend_on_how_its_signature_is_written() {
    let setup = setup();
    let (_, signed) = signed_berlin_request(&setup);
    let (signed_part, _) = signed.token.rsplit_once('.').expect("three parts");
    assert_eq!(
        signed.digest,
        digest_b64(signed_part.as_bytes()),
        "over header and claims"
    );
    assert_eq!(
        onceonly_seal::request::signed_digest(&format!("{signed_part}.another-signature")),
        signed.digest
    );
}
