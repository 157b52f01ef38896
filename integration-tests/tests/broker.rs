//! The broker end to end: real broker, real mock registers, real mutual TLS
//! on loopback. Every refusal is checked for its status code and for the
//! one audit record it leaves.

use std::time::Duration;

use onceonly_certs::Role;
use onceonly_certs::security::RefusalKind;
use onceonly_integration_tests::world::{AUTHORITIES, PORTAL, World};
use onceonly_integration_tests::{anonymous_client_config, channel_with};
use onceonly_proto::status::{reason_of, violated_fields};
use onceonly_proto::v1::evidence_service_client::EvidenceServiceClient;
use onceonly_proto::v1::{
    AuditRecord, ErrorReason, ExchangeOutcome, GrantConsentRequest, ListEvidenceTypesRequest,
    QueryRecordsRequest, RequestEvidenceRequest, RevokeConsentRequest, SubjectId, SubjectIdScheme,
};
use sha2::{Digest, Sha256};
use tonic::Code;

const BERLIN: &str = AUTHORITIES[0];
/// Anna Lena Schneider, in the civil register (Berlin).
const ANNA: &str = "82281866209";
/// A well-formed IDNr no register holds.
const NOBODY: &str = "86095742719";
const PURPOSE: &str = "parental-allowance";
const BEEG: &str = "§ 9 Abs. 1 BEEG";
const CONSENT_BASIS: &str = "Art. 6 Abs. 1 lit. a DSGVO";

fn idnr(value: &str) -> Option<SubjectId> {
    Some(SubjectId {
        scheme: SubjectIdScheme::DeIdnr.into(),
        value: value.into(),
    })
}

fn request(
    id: &str,
    evidence_type: &str,
    subject: &str,
    legal_basis: &str,
) -> RequestEvidenceRequest {
    RequestEvidenceRequest {
        request_id: id.into(),
        evidence_type: evidence_type.into(),
        subject: idnr(subject),
        purpose: PURPOSE.into(),
        legal_basis: legal_basis.into(),
        ..Default::default()
    }
}

fn birth_certificate(id: &str) -> RequestEvidenceRequest {
    request(id, "birth-certificate", ANNA, BEEG)
}

fn residence(id: &str) -> RequestEvidenceRequest {
    request(id, "proof-of-residence", ANNA, CONSENT_BASIS)
}

/// Anna's consent, through the portal, to Berlin's fetching her proof of
/// residence for the parental allowance, for an hour.
async fn grant_residence_consent(world: &World) -> onceonly_proto::v1::Consent {
    world
        .portal()
        .grant_consent(GrantConsentRequest {
            subject: idnr(ANNA),
            authority_id: format!("spiffe://onceonly.test/authority/{BERLIN}"),
            evidence_type: "proof-of-residence".into(),
            purpose: PURPOSE.into(),
            expires_at: Some(prost_types::Timestamp {
                seconds: time_now() + 3600,
                nanos: 0,
            }),
        })
        .await
        .expect("portal grants")
        .into_inner()
        .consent
        .expect("consent")
}

/// The one audit record of `request_id`; fails where there is not exactly one.
async fn record_of(world: &World, request_id: &str) -> AuditRecord {
    let records: Vec<AuditRecord> = world
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r.request_id == request_id)
        .collect();
    assert_eq!(records.len(), 1, "records of {request_id}: {records:#?}");
    records.into_iter().next().expect("one record")
}

fn assert_recorded(record: &AuditRecord, outcome: ExchangeOutcome, code: Code) {
    assert_eq!(record.outcome(), outcome, "{record:#?}");
    assert_eq!(record.status_code, code as i32, "{record:#?}");
    assert!(!record.exchange_id.is_empty());
    assert!(record.received_at.is_some());
}

#[tokio::test]
async fn allowed_request_delivers_evidence_with_a_digest_the_caller_can_recompute() {
    let world = World::start().await;
    let response = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("allowed-1"))
        .await
        .expect("allowed by rule parental-allowance-birth-certificate")
        .into_inner();
    let evidence = response.evidence.expect("evidence");
    assert_eq!(
        evidence.payload_sha256,
        Sha256::digest(&evidence.payload).to_vec()
    );
    assert_eq!(evidence.connector_id, "civil-register");
    assert!(String::from_utf8_lossy(&evidence.payload).contains("Schneider"));
    assert_eq!(response.request_id, "allowed-1");

    let record = record_of(&world, "allowed-1").await;
    assert_recorded(&record, ExchangeOutcome::Delivered, Code::Ok);
    assert_eq!(record.exchange_id, response.exchange_id);
    assert_eq!(record.log_index, response.audit_log_index);
    assert_eq!(
        record.payload_sha256, evidence.payload_sha256,
        "digest, never the payload"
    );
    assert_eq!(record.connector_id, "civil-register");
    assert_eq!(
        record.caller_id,
        format!("spiffe://onceonly.test/authority/{BERLIN}")
    );
    assert_eq!(record.policy_rule, "parental-allowance-birth-certificate");
    assert_eq!(record.purpose, PURPOSE);
    assert_eq!(record.legal_basis, BEEG);
    assert_eq!(record.subject_pseudonym.len(), 32, "keyed hash");
    let stored = prost::Message::encode_to_vec(&record);
    assert!(
        !stored.windows(ANNA.len()).any(|w| w == ANNA.as_bytes()),
        "the subject id is stored in the clear"
    );
}

#[tokio::test]
async fn request_outside_the_policy_is_permission_denied() {
    let world = World::start().await;
    // Berlin's parental allowance office asks for vehicle data.
    let status = world
        .authority(BERLIN)
        .request_evidence(request("denied-1", "vehicle-registration", ANNA, BEEG))
        .await
        .expect_err("no rule allows it");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason_of(&status), Some(ErrorReason::PolicyDenied));
    assert!(
        status.message().contains("vehicle-registration"),
        "{}",
        status.message()
    );
    let record = record_of(&world, "denied-1").await;
    assert_recorded(&record, ExchangeOutcome::Denied, Code::PermissionDenied);
    assert!(record.connector_id.is_empty(), "nothing was routed");
    assert!(record.policy_rule.is_empty());
}

#[tokio::test]
async fn consent_is_required_then_granted_then_revoked() {
    let world = World::start().await;
    let mut authority = world.authority(BERLIN);

    let missing = authority
        .request_evidence(residence("consent-1"))
        .await
        .expect_err("no consent yet");
    assert_eq!(missing.code(), Code::FailedPrecondition);
    assert_eq!(reason_of(&missing), Some(ErrorReason::ConsentMissing));
    assert_recorded(
        &record_of(&world, "consent-1").await,
        ExchangeOutcome::Denied,
        Code::FailedPrecondition,
    );

    let consent = grant_residence_consent(&world).await;

    let delivered = authority
        .request_evidence(residence("consent-2"))
        .await
        .expect("consent granted")
        .into_inner();
    assert!(delivered.evidence.is_some());
    let record = record_of(&world, "consent-2").await;
    assert_recorded(&record, ExchangeOutcome::Delivered, Code::Ok);
    assert_eq!(record.consent_id, consent.consent_id);

    world
        .portal()
        .revoke_consent(RevokeConsentRequest {
            consent_id: consent.consent_id.clone(),
        })
        .await
        .expect("portal revokes");
    let revoked = authority
        .request_evidence(residence("consent-3"))
        .await
        .expect_err("consent revoked");
    assert_eq!(revoked.code(), Code::FailedPrecondition);
    assert_recorded(
        &record_of(&world, "consent-3").await,
        ExchangeOutcome::Denied,
        Code::FailedPrecondition,
    );
}

/// Issue 24: the consent is checked again after the register answered. A
/// consent revoked while the register worked releases nothing, and the
/// record says the consent is missing (the register was contacted).
#[tokio::test]
async fn a_consent_revoked_while_the_register_answers_releases_nothing() {
    use std::sync::atomic::Ordering;
    let mut world = World::start().await;
    let (probe, counts) =
        onceonly_integration_tests::probe::ProbeRegister::new(Duration::from_secs(2));
    let probe = onceonly_integration_tests::start_connector(
        &world.pki,
        "civil-register",
        probe.serving("proof-of-residence", "application/json"),
    )
    .await;
    world.replace_register("civil-register", probe).await;
    let consent = grant_residence_consent(&world).await;
    let mut authority = world.authority(BERLIN);
    let call = tokio::spawn(async move {
        authority
            .request_evidence(residence("revoked-meanwhile"))
            .await
    });
    assert!(
        counts
            .wait_until(Duration::from_secs(20), |c| c
                .started
                .load(Ordering::SeqCst)
                == 1)
            .await,
        "the request never reached the register"
    );
    world
        .portal()
        .revoke_consent(RevokeConsentRequest {
            consent_id: consent.consent_id.clone(),
        })
        .await
        .expect("portal revokes");
    let refused = call
        .await
        .expect("task")
        .expect_err("evidence released under a consent revoked meanwhile");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::ConsentMissing));
    assert_eq!(
        counts.finished.load(Ordering::SeqCst),
        1,
        "the register answered"
    );
    let record = record_of(&world, "revoked-meanwhile").await;
    assert_recorded(&record, ExchangeOutcome::Denied, Code::FailedPrecondition);
    assert_eq!(
        record.error_reason(),
        ErrorReason::ConsentMissing,
        "{record:#?}"
    );
    assert!(record.register_contacted, "{record:#?}");
    assert!(record.payload_sha256.is_empty(), "{record:#?}");
    assert_eq!(record.consent_id, consent.consent_id);
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument_naming_the_field() {
    let world = World::start().await;
    let mut authority = world.authority(BERLIN);
    let mut bad_idnr = birth_certificate("invalid-idnr");
    bad_idnr.subject = idnr("82281866208");
    let mut unknown_type = birth_certificate("invalid-type");
    unknown_type.evidence_type = "passport".into();
    let mut no_purpose = birth_certificate("invalid-purpose");
    no_purpose.purpose.clear();
    let mut bad_correlation = birth_certificate("invalid-correlation");
    bad_correlation.correlation_ids = vec![onceonly_proto::v1::CorrelationId {
        name: "oots.conversation_id".into(),
        value: "line\nbreak".into(),
    }];
    for (request, field, reason) in [
        (bad_idnr, "subject.value", ErrorReason::InvalidRequest),
        (
            unknown_type,
            "evidence_type",
            ErrorReason::UnknownEvidenceType,
        ),
        (no_purpose, "purpose", ErrorReason::InvalidRequest),
        (
            bad_correlation,
            "correlation_ids[0].value",
            ErrorReason::InvalidRequest,
        ),
    ] {
        let id = request.request_id.clone();
        let status = authority
            .request_evidence(request)
            .await
            .expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument, "{id}");
        assert_eq!(violated_fields(&status), [field], "{id}");
        assert_eq!(reason_of(&status), Some(reason), "{id}");
        assert!(
            status.message().contains(field),
            "{id}: {}",
            status.message()
        );
        let record = record_of(&world, &id).await;
        assert_recorded(&record, ExchangeOutcome::Rejected, Code::InvalidArgument);
        assert!(
            record.correlation_ids.is_empty(),
            "ids that do not check are not kept: {record:?}"
        );
    }
}

#[tokio::test]
async fn unknown_subject_is_not_found_from_the_register() {
    let world = World::start().await;
    let status = world
        .authority(BERLIN)
        .request_evidence(request("nobody-1", "birth-certificate", NOBODY, BEEG))
        .await
        .expect_err("no such person");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        reason_of(&status),
        Some(ErrorReason::SubjectNotFound),
        "details passed through"
    );
    let record = record_of(&world, "nobody-1").await;
    assert_recorded(&record, ExchangeOutcome::Failed, Code::NotFound);
    assert_eq!(record.connector_id, "civil-register");
}

/// Refused callers without a valid certificate leave no record: nothing
/// they send is stored.
async fn assert_not_recorded(world: &World, request_id: &str) {
    world.settle().await;
    assert!(
        world
            .audit_records()
            .await
            .iter()
            .all(|r| r.request_id != request_id),
        "a refused caller's request {request_id} was recorded"
    );
}

fn refused_calls(world: &World, kind: RefusalKind) -> u64 {
    world
        .running_broker()
        .broker()
        .expect("running")
        .security
        .calls(kind)
}

#[tokio::test]
async fn certificate_from_an_untrusted_ca_is_refused_counted_and_not_recorded() {
    let world = World::start().await;
    let foreign = onceonly_integration_tests::pki_with(&[(Role::Authority, BERLIN)]);
    let mut files = foreign.tls_files(Role::Authority, BERLIN);
    files.ca = world.pki.ca_cert_path();
    files.crl = Some(world.pki.crl_path());
    let (config, _) = onceonly_certs::tls::client_config(&files).expect("tls");
    let status = EvidenceServiceClient::new(channel_with(config, world.broker_addr(), None))
        .request_evidence(birth_certificate("foreign-1"))
        .await
        .expect_err("foreign CA");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("signature does not verify"),
        "{}",
        status.message()
    );
    assert_eq!(refused_calls(&world, RefusalKind::UntrustedIssuer), 1);
    assert_not_recorded(&world, "foreign-1").await;
}

/// Health's answer and reflection's list of services on `channel`.
async fn health_and_reflection(
    channel: tonic::transport::Channel,
) -> (
    Result<i32, tonic::Status>,
    Result<Vec<String>, tonic::Status>,
) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "onceonly.v1.EvidenceService".into(),
        })
        .await
        .map(|answer| answer.into_inner().status);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let listed = async {
        let mut responses = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await?
            .into_inner();
        let response = responses
            .message()
            .await?
            .ok_or_else(|| tonic::Status::internal("no reflection response"))?;
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                Ok(list.service.into_iter().map(|s| s.name).collect())
            }
            other => Err(tonic::Status::internal(format!("{other:?}"))),
        }
    }
    .await;
    (health, listed)
}

/// Issue 24: on the gRPC port only participants of the trust domain get
/// any answer; health and reflection included (load balancers use the
/// admin listener's /ready).
#[tokio::test]
async fn a_stranger_gets_no_answer_from_health_or_reflection() {
    let world = World::start().await;
    let foreign = onceonly_integration_tests::pki_with(&[(Role::Authority, BERLIN)]);
    let mut files = foreign.tls_files(Role::Authority, BERLIN);
    files.ca = world.pki.ca_cert_path();
    files.crl = Some(world.pki.crl_path());
    let (config, _) = onceonly_certs::tls::client_config(&files).expect("tls");
    let (health, listed) =
        health_and_reflection(channel_with(config, world.broker_addr(), None)).await;
    for refused in [
        health.expect_err("health answered a stranger"),
        listed.expect_err("reflection answered a stranger"),
    ] {
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert_eq!(
            reason_of(&refused),
            Some(ErrorReason::Unauthenticated),
            "{refused:?}"
        );
        assert!(
            refused.message().contains("signature does not verify"),
            "{}",
            refused.message()
        );
    }
    assert_eq!(refused_calls(&world, RefusalKind::UntrustedIssuer), 2);

    // A participant, whatever its role, gets both.
    let (health, listed) = health_and_reflection(world.channel(Role::Authority, BERLIN)).await;
    assert_eq!(
        health.expect("health answers a participant"),
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let listed = listed.expect("reflection answers a participant");
    assert!(
        listed.contains(&"onceonly.v1.EvidenceService".to_owned()),
        "{listed:?}"
    );
}

#[tokio::test]
async fn client_without_certificate_is_refused_counted_and_not_recorded() {
    let world = World::start().await;
    let status = EvidenceServiceClient::new(channel_with(
        anonymous_client_config(&world.pki),
        world.broker_addr(),
        None,
    ))
    .request_evidence(birth_certificate("anonymous-1"))
    .await
    .expect_err("no certificate");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("no client certificate"),
        "{}",
        status.message()
    );
    assert_eq!(refused_calls(&world, RefusalKind::NoCertificate), 1);
    assert_not_recorded(&world, "anonymous-1").await;
}

#[tokio::test]
async fn revoked_certificate_is_refused_after_reload() {
    let world = World::start().await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("before-revocation"))
        .await
        .expect("valid before revocation");
    let cert =
        onceonly_certs::pki::load_certs(&world.pki.participant_paths(Role::Authority, BERLIN).0)
            .expect("cert");
    let serial = onceonly_certs::inspect::CertificateSummary::of(&cert[0])
        .expect("summary")
        .serial;
    world.pki.revoke(&serial).expect("revoke");
    world.running_broker().tls().reload().expect("reload CRL");

    let status = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("after-revocation"))
        .await
        .expect_err("revoked");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"), "{}", status.message());
    assert_eq!(refused_calls(&world, RefusalKind::Revoked), 1);
    assert_not_recorded(&world, "after-revocation").await;
}

#[tokio::test]
async fn connector_calling_the_evidence_service_is_refused() {
    let world = World::start().await;
    let status = EvidenceServiceClient::new(world.channel(Role::Connector, "civil-register"))
        .request_evidence(birth_certificate("wrong-role-1"))
        .await
        .expect_err("a connector is not an authority");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason_of(&status), Some(ErrorReason::RoleNotPermitted));
    let record = record_of(&world, "wrong-role-1").await;
    assert_recorded(&record, ExchangeOutcome::Denied, Code::PermissionDenied);
    // Its certificate verified: it is recorded as who it is.
    assert_eq!(
        record.caller_id,
        "spiffe://onceonly.test/connector/civil-register"
    );

    let status = world
        .portal()
        .list_consents(onceonly_proto::v1::ListConsentsRequest {
            subject: idnr(ANNA),
            ..Default::default()
        })
        .await;
    assert!(status.is_ok(), "the portal may list consents");
    let status = onceonly_proto::v1::consent_service_client::ConsentServiceClient::new(
        world.channel(Role::Authority, BERLIN),
    )
    .grant_consent(GrantConsentRequest::default())
    .await
    .expect_err("an authority cannot grant consents for citizens");
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn connector_presenting_the_wrong_identity_is_refused() {
    // The routing table sends civil-register traffic to the vehicle
    // register's address: a connector with another identity.
    let world = World::start().await;
    let vehicle_addr = world.registers[1].local_addr().to_string();
    let civil_addr = world.registers[0].local_addr().to_string();
    let mut world = world;
    let routing = std::fs::read_to_string(world.dir.path().join("routing.toml")).expect("routing");
    std::fs::write(
        world.dir.path().join("routing.toml"),
        routing.replacen(&civil_addr, &vehicle_addr, 1),
    )
    .expect("write");
    world.stop_broker().await;
    world.start_broker().await;

    let status = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("impostor-1"))
        .await
        .expect_err("impostor connector");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        reason_of(&status),
        Some(ErrorReason::ConnectorIdentityMismatch)
    );
    assert!(
        status.message().contains("vehicle-register"),
        "{}",
        status.message()
    );
    assert_recorded(
        &record_of(&world, "impostor-1").await,
        ExchangeOutcome::Failed,
        Code::Unavailable,
    );
}

#[tokio::test]
async fn connector_down_is_unavailable_and_failover_reaches_the_second_endpoint() {
    let world = World::start().await;
    let civil = world.registers[0].local_addr().to_string();
    // A port nobody listens on, and nobody else can take while the test
    // runs: bound, never listening (connections to it are refused).
    let reserved = tokio::net::TcpSocket::new_v4().expect("socket");
    reserved
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let dead = reserved.local_addr().expect("addr").to_string();
    let mut world = world;
    let routing_path = world.dir.path().join("routing.toml");
    let original = std::fs::read_to_string(&routing_path).expect("routing");

    // Only the dead endpoint: UNAVAILABLE.
    std::fs::write(
        &routing_path,
        original.replace(&format!("[\"{civil}\"]"), &format!("[\"{dead}\"]")),
    )
    .expect("write");
    world.stop_broker().await;
    world.start_broker().await;
    let status = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("down-1"))
        .await
        .expect_err("connector down");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason_of(&status), Some(ErrorReason::ConnectorUnavailable));
    assert_recorded(
        &record_of(&world, "down-1").await,
        ExchangeOutcome::Failed,
        Code::Unavailable,
    );

    // The dead endpoint first, the live one second: failover delivers.
    std::fs::write(
        &routing_path,
        original.replace(
            &format!("[\"{civil}\"]"),
            &format!("[\"{dead}\", \"{civil}\"]"),
        ),
    )
    .expect("write");
    world.stop_broker().await;
    world.start_broker().await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("failover-1"))
        .await
        .expect("second endpoint serves");
    assert_recorded(
        &record_of(&world, "failover-1").await,
        ExchangeOutcome::Delivered,
        Code::Ok,
    );
}

#[tokio::test]
async fn no_record_means_no_evidence() {
    let world = World::start().await;
    let broker = world.running_broker().broker().expect("running");
    broker
        .audit
        .inject(onceonly_broker::audit::AuditFault::Append);
    let status = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("unaudited-1"))
        .await
        .expect_err("evidence without its audit record");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason_of(&status), Some(ErrorReason::AuditUnavailable));
    broker
        .audit
        .inject(onceonly_broker::audit::AuditFault::None);
    assert!(
        world
            .audit_records()
            .await
            .iter()
            .all(|r| r.request_id != "unaudited-1"),
        "a failed audit write left a record"
    );
    // The retry with the same request id runs again and succeeds.
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("unaudited-1"))
        .await
        .expect("retry after the audit log recovers");
    assert_recorded(
        &record_of(&world, "unaudited-1").await,
        ExchangeOutcome::Delivered,
        Code::Ok,
    );
}

#[tokio::test]
async fn repeated_request_id_gets_the_first_outcome_and_reuse_is_refused() {
    let world = World::start().await;
    let mut authority = world.authority(BERLIN);
    let first = authority
        .request_evidence(birth_certificate("idem-1"))
        .await
        .expect("first")
        .into_inner();
    let again = authority
        .request_evidence(birth_certificate("idem-1"))
        .await
        .expect("repeat")
        .into_inner();
    assert_eq!(
        again.evidence, first.evidence,
        "the first outcome, not a second exchange"
    );
    // The evidence was issued for the first exchange: the repeat names it,
    // and its own record (at its own index) points to it.
    assert_eq!(again.exchange_id, first.exchange_id);
    assert_ne!(again.audit_log_index, first.audit_log_index);

    let records: Vec<AuditRecord> = world
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r.request_id == "idem-1")
        .collect();
    assert_eq!(records.len(), 2, "each request leaves its own record");
    assert_eq!(records[1].replay_of_exchange_id, first.exchange_id);
    assert_eq!(records[1].payload_sha256, records[0].payload_sha256);

    let mut different = birth_certificate("idem-1");
    different.purpose = "something-else".into();
    let status = authority
        .request_evidence(different)
        .await
        .expect_err("reused id");
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(reason_of(&status), Some(ErrorReason::RequestIdReused));
}

#[tokio::test]
async fn a_broker_restart_loses_no_audit_record() {
    let mut world = World::start().await;
    let mut authority = world.authority(BERLIN);
    let mut expected = Vec::new();
    for n in 0..5 {
        let id = format!("restart-ok-{n}");
        authority
            .request_evidence(birth_certificate(&id))
            .await
            .expect("allowed");
        expected.push(id);
        let id = format!("restart-denied-{n}");
        let _ = authority
            .request_evidence(request(&id, "vehicle-registration", ANNA, BEEG))
            .await
            .expect_err("denied");
        expected.push(id);
    }
    let before = world.audit_records().await;
    world.stop_broker().await;
    world.start_broker().await;
    let after = world.audit_records().await;
    // Every record as it was, then the restart's own policy entry.
    assert_eq!(
        after[..before.len()],
        before[..],
        "records changed across the restart"
    );
    assert_eq!(
        after[before.len()..]
            .iter()
            .map(|r| (r.kind(), r.policy_applied_by.as_str()))
            .collect::<Vec<_>>(),
        vec![(
            onceonly_proto::v1::RecordKind::PolicyApplied,
            "the broker's start"
        )]
    );
    for id in expected {
        assert!(after.iter().any(|r| r.request_id == id), "{id} lost");
    }
    // New records continue the log.
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("after-restart"))
        .await
        .expect("serves after restart");
    assert_eq!(
        record_of(&world, "after-restart").await.log_index,
        after.len() as u64
    );
}

#[tokio::test]
async fn live_policy_reload_allows_after_an_edit_and_keeps_the_old_one_when_broken() {
    let world = World::start().await;
    let munich = AUTHORITIES[3]; // gewerbeamt-muenchen
    let birth = |id: &str| request(id, "birth-certificate", ANNA, BEEG);
    let status = world
        .authority(munich)
        .request_evidence(birth("reload-before"))
        .await
        .expect_err("not in policy yet");
    assert_eq!(status.code(), Code::PermissionDenied);

    // A broken edit: refused, the old policy stays.
    let policy = std::fs::read_to_string(world.policy_path()).expect("policy");
    let reloads = reloads_of(&world);
    std::fs::write(
        world.policy_path(),
        format!("{policy}\n[[rule]]\nid = \"broken\"\ncallers = [\"group:nope\"]\n"),
    )
    .expect("write");
    wait_for_reload(&world, reloads).await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("reload-broken-old-still-allows"))
        .await
        .expect("the old policy is still in force");

    // A good edit: allowed from then on, without a restart.
    let rule = format!(
        "\n[[rule]]\nid = \"munich-birth\"\ncallers = [\"{munich}\"]\nevidence_types = [\"birth-certificate\"]\npurposes = [\"{PURPOSE}\"]\nlegal_bases = [\"{BEEG}\"]\nconsent = \"not-required\"\n"
    );
    let reloads = reloads_of(&world);
    std::fs::write(world.policy_path(), format!("{policy}{rule}")).expect("write");
    wait_for_reload(&world, reloads).await;
    world
        .authority(munich)
        .request_evidence(birth("reload-after"))
        .await
        .expect("allowed after the edit");
    assert_eq!(
        record_of(&world, "reload-after").await.policy_rule,
        "munich-birth"
    );
}

fn reloads_of(world: &World) -> u64 {
    world
        .running_broker()
        .broker()
        .expect("running")
        .policy
        .reloads()
}

/// Waits until the broker has tried a reload after `seen` (it polls the
/// policy file once a second), however long a busy machine takes.
async fn wait_for_reload(world: &World, seen: u64) {
    let waiting = async {
        while reloads_of(world) <= seen {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the broker never reloaded the edited policy");
}

#[tokio::test]
async fn authorities_list_what_they_may_request_and_see_only_their_own_records() {
    let world = World::start().await;
    let types = world
        .authority(BERLIN)
        .list_evidence_types(ListEvidenceTypesRequest {})
        .await
        .expect("list")
        .into_inner()
        .evidence_types;
    let listed: Vec<(&str, bool)> = types
        .iter()
        .map(|t| (t.evidence_type.as_str(), t.consent_required))
        .collect();
    assert_eq!(
        listed,
        [("birth-certificate", false), ("proof-of-residence", true)]
    );

    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("own-1"))
        .await
        .expect("ok");
    let koeln = AUTHORITIES[2];
    let _ = world
        .authority(koeln)
        .request_evidence(request("other-1", "birth-certificate", ANNA, BEEG))
        .await;
    let own = onceonly_proto::v1::audit_service_client::AuditServiceClient::new(
        world.channel(Role::Authority, BERLIN),
    )
    .query_records(QueryRecordsRequest::default())
    .await
    .expect("own records")
    .into_inner()
    .records;
    assert!(own.iter().any(|r| r.request_id == "own-1"));
    assert!(
        own.iter().all(|r| r.caller_id.ends_with(BERLIN)),
        "saw another authority's records"
    );

    // The portal sees one subject's records, and must name the subject.
    let portal = onceonly_proto::v1::audit_service_client::AuditServiceClient::new(
        world.channel(Role::Portal, PORTAL),
    );
    let status = portal
        .clone()
        .query_records(QueryRecordsRequest::default())
        .await
        .expect_err("no subject");
    assert_eq!(status.code(), Code::InvalidArgument);
    let annas = portal
        .clone()
        .query_records(QueryRecordsRequest {
            subject: idnr(ANNA),
            ..Default::default()
        })
        .await
        .expect("transparency view")
        .into_inner()
        .records;
    // Her two exchanges, and this read of her history itself.
    assert_eq!(
        annas
            .iter()
            .filter(|r| r.kind() == onceonly_proto::v1::RecordKind::Unspecified)
            .count(),
        2,
        "{annas:#?}"
    );
    assert_eq!(annas.len(), 3, "{annas:#?}");
    let nobodys = portal
        .clone()
        .query_records(QueryRecordsRequest {
            subject: idnr(NOBODY),
            ..Default::default()
        })
        .await
        .expect("transparency view")
        .into_inner()
        .records;
    assert!(
        nobodys
            .iter()
            .all(|r| r.kind() == onceonly_proto::v1::RecordKind::HistoryRead),
        "{nobodys:#?}"
    );
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// RecordPreviewStep records a step only of the caller's own delivered
/// exchange about the same subject; everything else is refused with the
/// precise code, and leaves no record.
#[tokio::test]
async fn preview_steps_are_recorded_only_for_the_callers_own_delivered_exchange() {
    use onceonly_proto::v1::{CorrelationId, PreviewStep, RecordKind, RecordPreviewStepRequest};
    let world = World::start().await;
    let delivered = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("preview-1"))
        .await
        .expect("delivered")
        .into_inner();
    let step = |exchange_id: &str, subject: &str, step: PreviewStep| RecordPreviewStepRequest {
        exchange_id: exchange_id.into(),
        subject: idnr(subject),
        step: step.into(),
        correlation_ids: vec![CorrelationId {
            name: "oots.exchange_id".into(),
            value: "ex-42".into(),
        }],
    };
    world.settle().await;
    let before = world.audit_records().await.len();
    let berlin = || EvidenceServiceClient::new(world.channel(Role::Authority, BERLIN));
    let refusals = [
        (
            berlin(),
            step("ex-0123456789abcdef", ANNA, PreviewStep::Shown),
            Code::NotFound,
            "no exchange",
        ),
        (
            berlin(),
            step(&delivered.exchange_id, NOBODY, PreviewStep::Shown),
            Code::NotFound,
            "no exchange",
        ),
        (
            EvidenceServiceClient::new(world.channel(Role::Authority, AUTHORITIES[1])),
            step(&delivered.exchange_id, ANNA, PreviewStep::Shown),
            Code::NotFound,
            "no exchange",
        ),
        (
            berlin(),
            step(&delivered.exchange_id, ANNA, PreviewStep::Unspecified),
            Code::InvalidArgument,
            "step",
        ),
        (
            berlin(),
            step("", ANNA, PreviewStep::Shown),
            Code::InvalidArgument,
            "exchange_id",
        ),
        (
            EvidenceServiceClient::new(world.channel(Role::Portal, PORTAL)),
            step(&delivered.exchange_id, ANNA, PreviewStep::Shown),
            Code::PermissionDenied,
            "RecordPreviewStep",
        ),
    ];
    for (mut client, request, code, says) in refusals {
        let status = client
            .record_preview_step(request.clone())
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{request:?}: {status:?}");
        assert!(
            status.message().contains(says)
                || violated_fields(&status).iter().any(|f| f.contains(says)),
            "{request:?}: {status:?}"
        );
    }
    world.settle().await;
    assert_eq!(
        world.audit_records().await.len(),
        before,
        "a refused step leaves no record"
    );

    // Out of order: refused, FAILED_PRECONDITION.
    let out_of_order = |s: PreviewStep| {
        let request = step(&delivered.exchange_id, ANNA, s);
        let mut client = berlin();
        async move {
            let status = client
                .record_preview_step(request)
                .await
                .expect_err("out of order");
            assert_eq!(status.code(), Code::FailedPrecondition, "{s:?}: {status:?}");
            assert!(status.message().contains("cannot follow"), "{status:?}");
        }
    };
    out_of_order(PreviewStep::Accepted).await;
    for s in [
        PreviewStep::Offered,
        PreviewStep::Shown,
        PreviewStep::Accepted,
    ] {
        berlin()
            .record_preview_step(step(&delivered.exchange_id, ANNA, s))
            .await
            .expect("recorded");
    }
    out_of_order(PreviewStep::Offered).await;
    out_of_order(PreviewStep::Declined).await;
    world.settle().await;
    let records = world.audit_records().await;
    let exchange = records
        .iter()
        .find(|r| r.exchange_id == delivered.exchange_id)
        .expect("the exchange");
    let steps: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.kind() == RecordKind::PreviewStep)
        .collect();
    assert_eq!(
        steps.iter().map(|r| r.preview_step()).collect::<Vec<_>>(),
        [
            PreviewStep::Offered,
            PreviewStep::Shown,
            PreviewStep::Accepted
        ]
    );
    for record in steps {
        assert_eq!(record.preview_of_exchange_id, delivered.exchange_id);
        assert_eq!(record.caller_id, exchange.caller_id);
        assert_eq!(record.subject_pseudonym, exchange.subject_pseudonym);
        assert_eq!(record.evidence_type, "birth-certificate");
        assert_eq!(record.purpose, PURPOSE);
        assert_eq!(record.correlation_ids[0].value, "ex-42");
        assert!(record.payload_sha256.is_empty(), "a step releases nothing");
    }

    // One preview records a handful of steps, not without end: the
    // broker reads a preview's records back to check the order, and that
    // reading is bounded (63 steps: OFFERED, then SHOWN at each sign-in).
    let another = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("preview-2"))
        .await
        .expect("delivered")
        .into_inner();
    berlin()
        .record_preview_step(step(&another.exchange_id, ANNA, PreviewStep::Offered))
        .await
        .expect("offered");
    for _ in 0..62 {
        berlin()
            .record_preview_step(step(&another.exchange_id, ANNA, PreviewStep::Shown))
            .await
            .expect("shown again");
    }
    let status = berlin()
        .record_preview_step(step(&another.exchange_id, ANNA, PreviewStep::Shown))
        .await
        .expect_err("the 64th step");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("most steps (63)"), "{status:?}");
    world.settle().await;
    assert_eq!(
        world
            .audit_records()
            .await
            .iter()
            .filter(|r| r.preview_of_exchange_id == another.exchange_id)
            .count(),
        63,
        "the refused step left no record"
    );
}
