//! What each step of end-to-end protection costs on this machine, one
//! thread, with P-256 (ES256) and with Ed25519 (EdDSA) participant keys:
//! `cargo run --release -p onceonly-seal --example seal_cost`.

use std::sync::Arc;
use std::time::Instant;

use onceonly_certs::tls::identity_verifier;
use onceonly_certs::{IssueOptions, KeyAlgorithm, Pki, Role};
use onceonly_proto::v1::SubjectIdScheme;
use onceonly_seal::encryption::Context;
use onceonly_seal::request::DEFAULT_LIFETIME;
use onceonly_seal::{
    Recipient, RequestFields, Signer, StatementClaims, TicketClaims, TicketExpectation,
    TicketVerifier, sign_request, subject_hash, unix_now, verify_request,
};

fn time(what: &str, rounds: u32, mut f: impl FnMut(u32)) {
    let started = Instant::now();
    for n in 0..rounds {
        f(n);
    }
    let per = started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
    println!("| {what} | {per:.1} |");
}

fn main() -> anyhow::Result<()> {
    for (name, algorithm) in [
        ("P-256, ES256", KeyAlgorithm::EcdsaP256),
        ("Ed25519, EdDSA", KeyAlgorithm::Ed25519),
    ] {
        println!("\nbroker and connector keys: {name}\n");
        measure(algorithm)?;
    }
    Ok(())
}

fn measure(algorithm: KeyAlgorithm) -> anyhow::Result<()> {
    let pki = Pki::throwaway(
        "onceonly.test",
        &[
            (Role::Connector, "civil-register"),
            (Role::Authority, "berlin"),
        ],
    )?;
    let mut options = IssueOptions::new(Role::Authority, "berlin");
    options.encryption = true;
    pki.issue(&options)?;
    for (role, id) in [
        (Role::Broker, "broker"),
        (Role::Connector, "civil-register"),
    ] {
        let mut options = IssueOptions::new(role, id);
        options.key_algorithm = Some(algorithm);
        options.force = true;
        pki.issue(&options)?;
    }
    let trust = Arc::new(identity_verifier(
        &pki.tls_files(Role::Broker, "broker"),
        "onceonly.test",
    )?);
    let (cert, key) = pki.participant_paths(Role::Broker, "broker");
    let broker = Signer::from_files(&cert, &key)?;
    let (cert, key) = pki.participant_paths(Role::Connector, "civil-register");
    let connector = Signer::from_files(&cert, &key)?;
    let now = unix_now();
    let sbh = subject_hash("ex-1", SubjectIdScheme::DeIdnr, "86095742719");
    let claims = |jti: u32| TicketClaims {
        iss: "spiffe://onceonly.test/broker/broker".into(),
        aud: "spiffe://onceonly.test/connector/civil-register".into(),
        sub: "spiffe://onceonly.test/authority/berlin".into(),
        jti: format!("t-{jti}"),
        iat: now,
        exp: now + 30,
        xid: "ex-1".into(),
        evt: "birth-certificate".into(),
        sbh: sbh.clone(),
        pur: "p".into(),
        lgb: "l".into(),
        jur: String::new(),
        prm: String::new(),
        rul: "r".into(),
        cid: String::new(),
        ecf: String::new(),
        req: String::new(),
    };
    println!("| step | µs |\n| --- | ---: |");
    time("sign a ticket (broker)", 500, |n| {
        claims(n).sign(&broker).expect("sign");
    });
    let tokens: Vec<String> = (0..500)
        .map(|n| claims(n).sign(&broker).expect("sign"))
        .collect();
    let verifier = TicketVerifier::new("spiffe://onceonly.test/broker/broker");
    let expected = TicketExpectation {
        audience: "spiffe://onceonly.test/connector/civil-register",
        exchange_id: "ex-1",
        requester: "spiffe://onceonly.test/authority/berlin",
        evidence_type: "birth-certificate",
        subject_hash: &sbh,
        purpose: "p",
        legal_basis: "l",
        jurisdiction: "",
        parameters: "",
        encryption_certificate: "",
    };
    time("verify a ticket (connector)", 500, |n| {
        verifier
            .verify(&tokens[n as usize], &trust, &expected, now)
            .expect("verify");
    });
    let statement = StatementClaims {
        iss: "spiffe://onceonly.test/connector/civil-register".into(),
        sub: "spiffe://onceonly.test/authority/berlin".into(),
        iat: now,
        xid: "ex-1".into(),
        evt: "birth-certificate".into(),
        sbh: sbh.clone(),
        med: "application/xml".into(),
        prm: String::new(),
        dig: "x".into(),
        enc: None,
        non: String::new(),
        rqd: String::new(),
    };
    time("sign a statement (connector)", 500, |_| {
        statement.sign(&connector).expect("sign");
    });
    let signed = statement.sign(&connector)?;
    time("verify a statement (broker, authority)", 500, |_| {
        StatementClaims::verify(&signed, &trust).expect("verify");
    });
    // The authority's signed request: signed once per request by the
    // authority, verified by the broker and again by the connector.
    let (cert, key) = pki.participant_paths(Role::Authority, "berlin");
    let authority = Signer::from_files(&cert, &key)?;
    let request = onceonly_proto::v1::RequestEvidenceRequest {
        request_id: "r-1".into(),
        evidence_type: "birth-certificate".into(),
        subject: Some(onceonly_proto::v1::SubjectId {
            scheme: SubjectIdScheme::DeIdnr.into(),
            value: "86095742719".into(),
        }),
        purpose: "p".into(),
        legal_basis: "l".into(),
        ..Default::default()
    };
    time("sign a request (authority)", 500, |_| {
        sign_request(&mut request.clone(), &authority, DEFAULT_LIFETIME).expect("sign");
    });
    let signed_request = sign_request(&mut request.clone(), &authority, DEFAULT_LIFETIME)?;
    let fields = RequestFields {
        requester: "spiffe://onceonly.test/authority/berlin",
        request_id: Some("r-1"),
        evidence_type: "birth-certificate",
        subject_scheme: SubjectIdScheme::DeIdnr,
        subject_value: "86095742719",
        purpose: "p",
        legal_basis: "l",
        jurisdiction: "",
        parameters: "",
        consent_id: Some(""),
        encryption_certificate: "",
    };
    time(
        "verify a signed request (broker; the connector too)",
        500,
        |_| {
            verify_request(&signed_request.token, &trust, &fields, unix_now()).expect("verify");
        },
    );
    println!(
        "| (a signed request is {} bytes; it rides in the ticket) | |",
        signed_request.token.len()
    );
    let (enc_cert, _) = pki.encryption_paths("berlin");
    let der = onceonly_certs::pki::load_certs(&enc_cert)?.remove(0);
    time("check an encryption certificate", 500, |_| {
        Recipient::from_certificate(&der, &trust).expect("recipient");
    });
    let recipient = Recipient::from_certificate(&der, &trust)?;
    let payload = vec![7u8; 500];
    let context = Context {
        exchange_id: "ex-1",
        evidence_type: "birth-certificate",
        requester: "spiffe://onceonly.test/authority/berlin",
        media_type: "application/xml",
    };
    time("HPKE-encrypt 500 bytes (connector)", 500, |_| {
        recipient.seal(&context, &payload).expect("seal");
    });
    raw_signature_floor(algorithm, signed.as_bytes());
    Ok(())
}

/// The signature primitive alone (ring, key parsed once): the floor under
/// the token rows above, whatever the JWS framing and chain checks add.
fn raw_signature_floor(algorithm: KeyAlgorithm, message: &[u8]) {
    use ring::signature::{self, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    type Sign<'a> = Box<dyn Fn() -> Vec<u8> + 'a>;
    type Verify<'a> = Box<dyn Fn(&[u8]) + 'a>;
    let (sign, verify): (Sign<'_>, Verify<'_>) = match algorithm {
        KeyAlgorithm::Ed25519 => {
            let der = signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
            let key = signature::Ed25519KeyPair::from_pkcs8(der.as_ref()).expect("key");
            let public = key.public_key().as_ref().to_vec();
            (
                Box::new(move || key.sign(message).as_ref().to_vec()),
                Box::new(move |sig| {
                    signature::UnparsedPublicKey::new(&signature::ED25519, &public)
                        .verify(message, sig)
                        .expect("verify")
                }),
            )
        }
        _ => {
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let der = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("key");
            let key = signature::EcdsaKeyPair::from_pkcs8(alg, der.as_ref(), &rng).expect("key");
            let public = key.public_key().as_ref().to_vec();
            (
                Box::new(move || key.sign(&rng, message).expect("sign").as_ref().to_vec()),
                Box::new(move |sig| {
                    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &public)
                        .verify(message, sig)
                        .expect("verify")
                }),
            )
        }
    };
    time("the signature alone: sign (ring)", 500, |_| {
        sign();
    });
    let sig = sign();
    time("the signature alone: verify (ring)", 500, |_| verify(&sig));
}
