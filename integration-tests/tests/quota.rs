//! Per-caller quotas from the policy file, over real mutual TLS: an
//! authority over its quota gets RESOURCE_EXHAUSTED with QuotaFailure and
//! RetryInfo and one audit record; another authority in the same second is
//! served.

use std::time::Duration;

use onceonly_integration_tests::world::{AUTHORITIES, World};
use onceonly_proto::status::{reason_of, retry_after};
use onceonly_proto::v1::{
    ErrorReason, ExchangeOutcome, RequestEvidenceRequest, SubjectId, SubjectIdScheme,
};
use tonic::Code;
use tonic_types::StatusExt;

const BERLIN: &str = AUTHORITIES[0];
const KOELN: &str = AUTHORITIES[2];
const ANNA: &str = "82281866209";

fn request(
    id: &str,
    evidence_type: &str,
    purpose: &str,
    legal_basis: &str,
) -> RequestEvidenceRequest {
    RequestEvidenceRequest {
        request_id: id.into(),
        evidence_type: evidence_type.into(),
        subject: Some(SubjectId {
            scheme: SubjectIdScheme::DeIdnr.into(),
            value: ANNA.into(),
        }),
        purpose: purpose.into(),
        legal_basis: legal_basis.into(),
        ..Default::default()
    }
}

fn vehicle(id: &str) -> RequestEvidenceRequest {
    request(
        id,
        "vehicle-registration",
        "vehicle-tax-assessment",
        "§ 1 KraftStG",
    )
}

#[tokio::test]
async fn an_authority_over_its_quota_is_refused_with_retry_info_and_others_are_served() {
    let mut world = World::start().await;
    // Two requests, then one a minute: the third within the test is over.
    let policy = std::fs::read_to_string(world.policy_path()).expect("policy");
    std::fs::write(
        world.policy_path(),
        format!(
            "{policy}\n[[quota]]\nid = \"kfz-koeln\"\ncallers = [\"{KOELN}\"]\nper_minute = 1\nburst = 2\n"
        ),
    )
    .expect("write policy");
    world.stop_broker().await;
    world.start_broker().await;

    let mut koeln = world.authority(KOELN);
    for n in 0..2 {
        let answer = koeln.request_evidence(vehicle(&format!("kfz-{n}"))).await;
        if let Err(status) = &answer {
            assert_ne!(
                reason_of(status),
                Some(ErrorReason::QuotaExceeded),
                "within the burst: {status:?}"
            );
        }
    }
    let status = koeln
        .request_evidence(vehicle("kfz-2"))
        .await
        .expect_err("over quota");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::QuotaExceeded));
    let wait = retry_after(&status).expect("RetryInfo");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(60),
        "{wait:?}"
    );
    let quota = status.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations.len(), 1);
    assert!(
        quota.violations[0]
            .subject
            .ends_with("/authority/kfz-steuer-koeln"),
        "{quota:?}"
    );
    assert!(
        quota.violations[0]
            .description
            .contains("kfz-koeln: 1/min, burst 2"),
        "{quota:?}"
    );

    // Another authority in the same second is served.
    world
        .authority(BERLIN)
        .request_evidence(request(
            "berlin-1",
            "birth-certificate",
            "parental-allowance",
            "§ 9 Abs. 1 BEEG",
        ))
        .await
        .expect("another authority is not limited by kfz-koeln's quota");

    let records = world
        .wait_for_records("kfz-2", 1, Duration::from_secs(10))
        .await;
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record.outcome(), ExchangeOutcome::Denied);
    assert_eq!(record.error_reason(), ErrorReason::QuotaExceeded);
    assert_eq!(record.status_code, Code::ResourceExhausted as i32);
    assert!(!record.register_contacted);
    assert!(record.connector_id.is_empty());
}
