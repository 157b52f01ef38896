//! `onceonly-demo`: the whole exchange on loopback, explained as it happens.
//!
//! A throw-away PKI, three mock registers, a fourth served by the generic
//! connector from a mapping file over SQLite, and the broker (sample policy
//! and routing from `broker/config/`), all over mutual TLS on real ports;
//! then an authority's requests (allowed, denied, needing consent before
//! and after the citizen grants it, and after she revokes it; evidence the
//! register signed, and evidence encrypted to the office, both verified by
//! the office), a second authority's request to the register without code,
//! and the audit trail as the auditor and the citizen see it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use onceonly_certs::tls::identity_verifier;
use onceonly_certs::{IssueOptions, Role};
use onceonly_integration_tests::school::{BAFOEG, SCHOOL_REGISTER, school_leaving_certificate};
use onceonly_integration_tests::world::{AUTHORITIES, PORTAL, World};
use onceonly_proto::status::reason_of;
use onceonly_proto::v1::{
    AuditRecord, ExchangeOutcome, GrantConsentRequest, QueryRecordsRequest, RecordKind,
    RequestEvidenceRequest, RevokeConsentRequest, SubjectId, SubjectIdScheme,
};
use onceonly_seal::{DecryptionKey, EvidenceOpener, Expected};
use sha2::{Digest, Sha256};
use std::sync::Arc;

const ANNA: &str = "82281866209";
const BERLIN: &str = AUTHORITIES[0];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();

    println!("onceonly demo: the once-only principle, on this machine\n");
    let world = World::start().await;

    step(1, "A throw-away PKI for trust domain onceonly.test");
    println!("   in {}", world.pki.dir().display());
    println!("   a root CA, and a certificate for each participant, its identity a SPIFFE id:");
    println!(
        "   spiffe://onceonly.test/broker/broker, .../connector/civil-register, .../authority/{BERLIN}, ..."
    );

    step(
        2,
        "Four registers, each a connector on the SDK, serving mutual TLS; the fourth runs no code of its own",
    );
    for (register, what) in world.registers.iter().zip([
        "birth-certificate (XML), proof-of-residence (JSON)",
        "vehicle-registration (JSON)",
        "commercial-register-extract (XML)",
        "school-leaving-certificate (JSON): onceonly-connector, a mapping file over SQLite",
    ]) {
        println!(
            "   {:<52} {:<16} {what}",
            register.identity().to_string(),
            register.local_addr().to_string()
        );
    }

    step(
        3,
        "The broker, with the sample policy and routing table (broker/config/)",
    );
    println!(
        "   listening on {}; audit log and consents in {}",
        world.broker_addr(),
        world.dir.path().join("data").display()
    );

    let mut authority = world.authority(BERLIN);
    // What the office runs on what it receives: the register's signature
    // checked against the trust domain's CA, the binding to its request,
    // and decryption with its own encryption key.
    let mut encryption = IssueOptions::new(Role::Authority, BERLIN);
    encryption.encryption = true;
    world.pki.issue(&encryption)?;
    let (enc_cert, enc_key) = world.pki.encryption_paths(BERLIN);
    let opener = EvidenceOpener::new(
        Arc::new(identity_verifier(
            &world.pki.tls_files(Role::Authority, BERLIN),
            "onceonly.test",
        )?),
        Some(DecryptionKey::from_files(&enc_cert, &enc_key)?),
    );
    let civil = Asker {
        opener: &opener,
        authority: BERLIN,
        connector: "civil-register",
    };
    let anna = Some(SubjectId {
        scheme: SubjectIdScheme::DeIdnr.into(),
        value: ANNA.into(),
    });
    let ask = |id: &str, evidence_type: &str, legal_basis: &str| RequestEvidenceRequest {
        request_id: id.into(),
        evidence_type: evidence_type.into(),
        subject: anna.clone(),
        purpose: "parental-allowance".into(),
        legal_basis: legal_basis.into(),
        ..Default::default()
    };

    step(
        4,
        "The parental allowance office Berlin asks for Anna Lena Schneider's birth certificate",
    );
    println!(
        "   (IDNr {ANNA}, purpose parental-allowance, legal basis § 9 Abs. 1 BEEG; allowed by the policy)"
    );
    show(
        authority
            .request_signed(ask("demo-1", "birth-certificate", "§ 9 Abs. 1 BEEG"))
            .await,
        &civil,
    );

    step(
        5,
        "It asks again, naming its encryption certificate: the register encrypts to it (HPKE)",
    );
    println!(
        "   (the broker checks and forwards ciphertext only; it cannot read or replace the evidence)"
    );
    let mut sealed = ask("demo-1e", "birth-certificate", "§ 9 Abs. 1 BEEG");
    sealed.encryption_certificate = onceonly_certs::pki::load_certs(&enc_cert)?
        .remove(0)
        .as_ref()
        .to_vec();
    show(authority.request_signed(sealed).await, &civil);

    step(
        6,
        "The same office asks for her vehicle registration: no policy rule allows that",
    );
    show(
        authority
            .request_signed(ask("demo-2", "vehicle-registration", "§ 9 Abs. 1 BEEG"))
            .await,
        &civil,
    );

    step(
        7,
        "It asks for her proof of residence, which the policy allows only with her consent",
    );
    show(
        authority
            .request_signed(ask(
                "demo-3",
                "proof-of-residence",
                "Art. 6 Abs. 1 lit. a DSGVO",
            ))
            .await,
        &civil,
    );

    step(
        8,
        "Anna grants that consent in the citizen portal, for one hour",
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let consent = world
        .portal()
        .grant_consent(GrantConsentRequest {
            subject: anna.clone(),
            authority_id: format!("spiffe://onceonly.test/authority/{BERLIN}"),
            evidence_type: "proof-of-residence".into(),
            purpose: "parental-allowance".into(),
            expires_at: Some(prost_types::Timestamp {
                seconds: now + 3600,
                nanos: 0,
            }),
        })
        .await?
        .into_inner()
        .consent
        .ok_or_else(|| anyhow::anyhow!("the portal returned no consent"))?;
    println!("   -> consent {} recorded by {PORTAL}", consent.consent_id);

    step(9, "The office asks again");
    show(
        authority
            .request_signed(ask(
                "demo-4",
                "proof-of-residence",
                "Art. 6 Abs. 1 lit. a DSGVO",
            ))
            .await,
        &civil,
    );

    step(10, "Anna revokes her consent; the office asks once more");
    world
        .portal()
        .revoke_consent(RevokeConsentRequest {
            consent_id: consent.consent_id.clone(),
        })
        .await?;
    show(
        authority
            .request_signed(ask(
                "demo-5",
                "proof-of-residence",
                "Art. 6 Abs. 1 lit. a DSGVO",
            ))
            .await,
        &civil,
    );

    step(
        11,
        "The student finance office (BAfoeG) asks for Anna's school-leaving certificate",
    );
    println!(
        "   (the school register wrote no code: onceonly-connector serves it from connector-generic/config/school-mapping.toml,"
    );
    println!(
        "    a parameterised query over an SQLite file and a JSON template; the SDK under it checks the ticket, signs, keeps the deadline)"
    );
    let bafoeg_opener = EvidenceOpener::new(
        Arc::new(identity_verifier(
            &world.pki.tls_files(Role::Authority, BAFOEG),
            "onceonly.test",
        )?),
        None,
    );
    show(
        world
            .authority(BAFOEG)
            .request_signed(school_leaving_certificate("demo-6", ANNA))
            .await,
        &Asker {
            opener: &bafoeg_opener,
            authority: BAFOEG,
            connector: SCHOOL_REGISTER,
        },
    );

    step(
        12,
        "The audit trail, as the data-protection auditor sees it (one record per request)",
    );
    let records = world.audit_records().await;
    print_trail(&records);
    println!(
        "   The log holds the payload's SHA-256, never the payload, and the subject only as a keyed pseudonym."
    );

    step(
        13,
        "What Anna sees in the citizen portal's transparency view",
    );
    let about_anna = onceonly_proto::v1::audit_service_client::AuditServiceClient::new(
        world.channel(onceonly_certs::Role::Portal, PORTAL),
    )
    .query_records(QueryRecordsRequest {
        subject: anna.clone(),
        ..Default::default()
    })
    .await?
    .into_inner()
    .records;
    for record in &about_anna {
        let who = short_caller(&record.caller_id);
        match record.kind() {
            RecordKind::ConsentGranted => println!(
                "   {who} recorded her consent for {} to fetch her {} ({})",
                short_caller(&record.consent_authority_id),
                record.evidence_type,
                record.purpose
            ),
            RecordKind::ConsentRevoked => println!(
                "   {who} recorded that she revoked her consent for {} ({})",
                record.evidence_type, record.purpose
            ),
            RecordKind::ConsentsListed => println!("   {who} listed her consents"),
            RecordKind::HistoryRead => println!("   {who} read this history of hers"),
            _ => println!(
                "   {who} asked for her {} ({}): {}",
                record.evidence_type,
                record.purpose,
                outcome_word(record.outcome())
            ),
        }
    }

    println!(
        "\nDone. Everything above ran over mutual TLS 1.3 on loopback; the PKI and data are removed now."
    );
    println!(
        "Next: README.md (set-up), proto/onceonly/v1/ (the API), broker/config/ (policy, routing)."
    );
    tokio::time::timeout(Duration::from_secs(30), async move {
        let mut world = world;
        world.stop_broker().await;
    })
    .await?;
    Ok(())
}

fn step(n: u32, text: &str) {
    println!("\n{n:>2}. {text}");
}

/// Who asked and which register should have answered, for the office's
/// checks of what it got.
struct Asker<'a> {
    opener: &'a EvidenceOpener,
    authority: &'a str,
    connector: &'a str,
}

fn show(
    (result, signed): (
        Result<tonic::Response<onceonly_proto::v1::RequestEvidenceResponse>, tonic::Status>,
        Option<onceonly_seal::SignedRequest>,
    ),
    asker: &Asker<'_>,
) {
    match result {
        Ok(response) => {
            let response = response.into_inner();
            let Some(evidence) = response.evidence else {
                println!("   -> OK, but no evidence (unexpected)");
                return;
            };
            let carried = evidence
                .encrypted_payload
                .as_ref()
                .map_or(evidence.payload.as_slice(), |sealed| {
                    sealed.ciphertext.as_slice()
                });
            let recomputed = Sha256::digest(carried).to_vec() == evidence.payload_sha256;
            println!(
                "   -> OK: {} bytes of {}{} from {}, SHA-256 {}... ({})",
                carried.len(),
                evidence.media_type,
                if evidence.encrypted_payload.is_some() {
                    ", encrypted"
                } else {
                    ""
                },
                evidence.connector_id,
                &hex::encode(&evidence.payload_sha256)[..16],
                if recomputed {
                    "recomputed: matches"
                } else {
                    "recomputed: MISMATCH"
                }
            );
            println!(
                "      exchange {}, audit log index {}",
                response.exchange_id, response.audit_log_index
            );
            let expected = Expected {
                exchange_id: &response.exchange_id,
                evidence_type: &evidence.evidence_type,
                subject_scheme: SubjectIdScheme::DeIdnr,
                subject_value: ANNA,
                requester: &format!("spiffe://onceonly.test/authority/{}", asker.authority),
                parameters: Some(&Default::default()),
                connector: Some(asker.connector),
                // Asked encrypted (the office's own signed request says so):
                // clear evidence is then refused.
                encrypted: signed
                    .as_ref()
                    .and_then(|s| onceonly_seal::RequestClaims::read_unverified(&s.token))
                    .is_some_and(|claims| !claims.ecf.is_empty()),
                request: signed.as_ref().map(onceonly_seal::SignedRequest::binding),
            };
            let payload = match asker.opener.open(&evidence, &expected) {
                Ok(opened) => {
                    println!(
                        "      the office verified: signed by {} (certificate issued by the CA), bound to this exchange, requester, subject and the request the office signed{}",
                        opened.connector,
                        if opened.was_encrypted {
                            "; decrypted with its own key"
                        } else {
                            ""
                        }
                    );
                    opened.payload
                }
                Err(refused) => {
                    println!("      the office REFUSED it: {refused}");
                    return;
                }
            };
            let text = match serde_json::from_slice::<serde_json::Value>(&payload) {
                Ok(json) => serde_json::to_string_pretty(&json).unwrap_or_default(),
                Err(_) => String::from_utf8_lossy(&payload).into_owned(),
            };
            for line in text.lines().take(10) {
                let line: String = line.chars().take(110).collect();
                println!("      | {line}");
            }
        }
        Err(status) => {
            let reason = reason_of(&status)
                .map(|r| format!(" ({})", r.reason()))
                .unwrap_or_default();
            println!("   -> {:?}{reason}", status.code());
            println!("      {}", status.message());
        }
    }
}

fn short_caller(caller: &str) -> &str {
    caller.rsplit('/').next().unwrap_or(caller)
}

fn outcome_word(outcome: ExchangeOutcome) -> &'static str {
    match outcome {
        ExchangeOutcome::Delivered => "delivered",
        ExchangeOutcome::Rejected => "rejected (malformed)",
        ExchangeOutcome::Denied => "refused",
        ExchangeOutcome::Failed => "failed",
        ExchangeOutcome::Cancelled => "cancelled",
        ExchangeOutcome::Unspecified => "?",
    }
}

fn print_trail(records: &[AuditRecord]) {
    println!(
        "   {:>3}  {:<10} {:<19} {:<20} {:<10} {:<20} {:<15} {:<12}",
        "#", "request", "caller", "evidence type", "outcome", "status", "connector", "digest"
    );
    for r in records {
        let code = tonic::Code::from_i32(r.status_code);
        let digest = if r.payload_sha256.is_empty() {
            "-".into()
        } else {
            format!("{}...", &hex::encode(&r.payload_sha256)[..8])
        };
        println!(
            "   {:>3}  {:<10} {:<19} {:<20} {:<10} {:<20} {:<15} {:<12}",
            r.log_index,
            r.request_id,
            short_caller(&r.caller_id),
            r.evidence_type,
            match r.kind() {
                RecordKind::Unspecified => format!("{:?}", r.outcome()).to_uppercase(),
                RecordKind::ConsentGranted => "CONSENT+".into(),
                RecordKind::ConsentRevoked => "CONSENT-".into(),
                RecordKind::ConsentsListed => "LISTED".into(),
                RecordKind::HistoryRead => "READ".into(),
                RecordKind::KeyHandover => "NEW KEY".into(),
                RecordKind::PolicyApplied => format!("POLICY v{}", r.policy_version),
                RecordKind::PreviewStep => format!("PREVIEW {:?}", r.preview_step()).to_uppercase(),
            },
            format!("{code:?}"),
            if r.connector_id.is_empty() {
                "-"
            } else {
                &r.connector_id
            },
            digest
        );
    }
}
