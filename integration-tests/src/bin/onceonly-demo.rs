//! `onceonly-demo`: the whole exchange on loopback, explained as it happens.
//!
//! A throw-away PKI, three mock registers and the broker (sample policy and
//! routing from `broker/config/`), all over mutual TLS on real ports; then an
//! authority's requests (allowed, denied, needing consent before and after
//! the citizen grants it, and after she revokes it), and the audit trail as
//! the auditor and the citizen see it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use onceonly_integration_tests::world::{AUTHORITIES, PORTAL, World};
use onceonly_proto::status::reason_of;
use onceonly_proto::v1::{
    AuditRecord, ExchangeOutcome, GrantConsentRequest, QueryRecordsRequest, RecordKind,
    RequestEvidenceRequest, RevokeConsentRequest, SubjectId, SubjectIdScheme,
};
use sha2::{Digest, Sha256};

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
        "Three registers, each a connector built on the SDK, serving mutual TLS",
    );
    for (register, what) in world.registers.iter().zip([
        "birth-certificate (XML), proof-of-residence (JSON)",
        "vehicle-registration (JSON)",
        "commercial-register-extract (XML)",
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
            .request_evidence(ask("demo-1", "birth-certificate", "§ 9 Abs. 1 BEEG"))
            .await,
    );

    step(
        5,
        "The same office asks for her vehicle registration: no policy rule allows that",
    );
    show(
        authority
            .request_evidence(ask("demo-2", "vehicle-registration", "§ 9 Abs. 1 BEEG"))
            .await,
    );

    step(
        6,
        "It asks for her proof of residence, which the policy allows only with her consent",
    );
    show(
        authority
            .request_evidence(ask(
                "demo-3",
                "proof-of-residence",
                "Art. 6 Abs. 1 lit. a DSGVO",
            ))
            .await,
    );

    step(
        7,
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

    step(8, "The office asks again");
    show(
        authority
            .request_evidence(ask(
                "demo-4",
                "proof-of-residence",
                "Art. 6 Abs. 1 lit. a DSGVO",
            ))
            .await,
    );

    step(9, "Anna revokes her consent; the office asks once more");
    world
        .portal()
        .revoke_consent(RevokeConsentRequest {
            consent_id: consent.consent_id.clone(),
        })
        .await?;
    show(
        authority
            .request_evidence(ask(
                "demo-5",
                "proof-of-residence",
                "Art. 6 Abs. 1 lit. a DSGVO",
            ))
            .await,
    );

    step(
        10,
        "The audit trail, as the data-protection auditor sees it (one record per request)",
    );
    let records = world.audit_records().await;
    print_trail(&records);
    println!(
        "   The log holds the payload's SHA-256, never the payload, and the subject only as a keyed pseudonym."
    );

    step(
        11,
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

fn show(
    result: Result<tonic::Response<onceonly_proto::v1::RequestEvidenceResponse>, tonic::Status>,
) {
    match result {
        Ok(response) => {
            let response = response.into_inner();
            let Some(evidence) = response.evidence else {
                println!("   -> OK, but no evidence (unexpected)");
                return;
            };
            let recomputed = Sha256::digest(&evidence.payload).to_vec() == evidence.payload_sha256;
            println!(
                "   -> OK: {} bytes of {} from {}, SHA-256 {}... ({})",
                evidence.payload.len(),
                evidence.media_type,
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
            let text = match serde_json::from_slice::<serde_json::Value>(&evidence.payload) {
                Ok(json) => serde_json::to_string_pretty(&json).unwrap_or_default(),
                Err(_) => String::from_utf8_lossy(&evidence.payload).into_owned(),
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
