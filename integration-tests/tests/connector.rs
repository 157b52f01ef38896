//! The connector SDK and the mock registers over real mutual TLS on
//! loopback: who may call, what comes back, and every documented failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use onceonly_certs::Role;
use onceonly_connector_sdk::proto::{EvidenceTypeInfo, SubjectIdScheme};
use onceonly_connector_sdk::{
    Connector, EvidencePayload, EvidenceRequest, ProvideError, evidence_type,
};
use onceonly_integration_tests::*;
use onceonly_proto::status::{reason_of, violated_fields};
use onceonly_proto::v1::connector_service_client::ConnectorServiceClient;
use onceonly_proto::v1::{ErrorReason, ProvideEvidenceRequest, SubjectId};
use onceonly_registry_mock::{Faults, MockRegister, RegisterKind};
use sha2::{Digest, Sha256};
use tonic::Code;

/// Anna Lena Schneider in the shipped civil register.
const ANNA: &str = "82281866209";
/// Lukas Becker: a blocking notice is registered for him.
const LUKAS_BLOCKED: &str = "83406788423";
/// A well-formed IDNr the registers do not hold.
const NOBODY: &str = "86095742719";

fn idnr(value: &str) -> Option<SubjectId> {
    Some(SubjectId {
        scheme: SubjectIdScheme::DeIdnr.into(),
        value: value.into(),
    })
}

fn request(evidence_type: &str, subject: Option<SubjectId>) -> ProvideEvidenceRequest {
    ProvideEvidenceRequest {
        exchange_id: "ex-1".into(),
        evidence_type: evidence_type.into(),
        subject,
        purpose: "parental-allowance".into(),
        legal_basis: "§ 9 Abs. 1 BEEG".into(),
        requester_id: "spiffe://onceonly.test/authority/elterngeld-berlin".into(),
        ..Default::default()
    }
}

async fn civil_register(pki: &onceonly_certs::Pki) -> onceonly_connector_sdk::RunningConnector {
    let register = MockRegister::embedded(RegisterKind::Civil).expect("data");
    start_connector(pki, "civil-register", register).await
}

#[tokio::test]
async fn broker_gets_evidence_with_a_digest_it_can_recompute() {
    let pki = pki_with(&[(Role::Connector, "civil-register")]);
    let connector = civil_register(&pki).await;
    let mut client = connector_client(&pki, Role::Broker, "broker", connector.local_addr());

    let evidence = client
        .provide_evidence(request("birth-certificate", idnr(ANNA)))
        .await
        .expect("evidence")
        .into_inner()
        .evidence
        .expect("evidence set");
    assert_eq!(
        evidence.payload_sha256,
        Sha256::digest(&evidence.payload).to_vec()
    );
    assert_eq!(evidence.media_type, "application/xml");
    assert_eq!(evidence.connector_id, "civil-register");
    assert!(evidence.issued_at.is_some());
    let xml = String::from_utf8(evidence.payload).expect("utf-8");
    assert!(
        xml.contains("<Familienname>Schneider</Familienname>"),
        "{xml}"
    );

    let residence = client
        .provide_evidence(request("proof-of-residence", idnr(ANNA)))
        .await
        .expect("residence")
        .into_inner()
        .evidence
        .expect("evidence set");
    assert_eq!(residence.media_type, "application/json");
    let json = String::from_utf8(residence.payload).expect("utf-8");
    assert!(json.contains("\"postal_code\":\"10119\""), "{json}");
}

#[tokio::test]
async fn authority_certificate_is_refused() {
    let pki = pki_with(&[
        (Role::Connector, "civil-register"),
        (Role::Authority, "elterngeld-berlin"),
    ]);
    let connector = civil_register(&pki).await;
    let mut client = connector_client(
        &pki,
        Role::Authority,
        "elterngeld-berlin",
        connector.local_addr(),
    );
    let status = client
        .provide_evidence(request("birth-certificate", idnr(ANNA)))
        .await
        .expect_err("authority must not call a connector directly");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::RoleNotPermitted));
    assert!(
        status.message().contains("only the broker"),
        "{}",
        status.message()
    );
}

/// In TLS 1.3 the server judges the client certificate after the client
/// has finished its side of the handshake, so the refusal reaches the client
/// as the server's fatal alert on the connection, never as an answer.
fn assert_refused_in_handshake(status: &tonic::Status) {
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown),
        "{status:?}"
    );
    let detail = format!("{status:?}");
    assert!(
        detail.contains("alert") || detail.contains("handshake"),
        "not a TLS refusal: {detail}"
    );
}

#[tokio::test]
async fn certificate_from_a_foreign_ca_is_refused() {
    let pki = pki_with(&[(Role::Connector, "civil-register")]);
    let foreign = pki_with(&[]);
    let connector = civil_register(&pki).await;
    let mut files = foreign.tls_files(Role::Broker, "broker");
    files.ca = pki.ca_cert_path();
    files.crl = Some(pki.crl_path());
    let (config, _) = onceonly_certs::tls::client_config(&files).expect("tls");
    let mut client =
        ConnectorServiceClient::new(channel_with(config, connector.local_addr(), None));
    let status = client
        .provide_evidence(request("birth-certificate", idnr(ANNA)))
        .await
        .expect_err("foreign broker certificate accepted");
    assert_refused_in_handshake(&status);
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let pki = pki_with(&[(Role::Connector, "civil-register")]);
    let connector = civil_register(&pki).await;
    let mut client = ConnectorServiceClient::new(channel_with(
        anonymous_client_config(&pki),
        connector.local_addr(),
        None,
    ));
    let status = client
        .provide_evidence(request("birth-certificate", idnr(ANNA)))
        .await
        .expect_err("anonymous client accepted");
    assert_refused_in_handshake(&status);
}

#[tokio::test]
async fn only_the_configured_broker_id_may_call() {
    let pki = pki_with(&[(Role::Connector, "civil-register"), (Role::Broker, "rogue")]);
    let register = MockRegister::embedded(RegisterKind::Civil).expect("data");
    let connector = onceonly_connector_sdk::ConnectorServer::builder(
        register,
        pki.tls_files(Role::Connector, "civil-register"),
    )
    .listen("127.0.0.1:0".parse().expect("addr"))
    .allowed_broker("broker")
    .bind()
    .await
    .expect("bind")
    .spawn();
    let status = connector_client(&pki, Role::Broker, "rogue", connector.local_addr())
        .provide_evidence(request("birth-certificate", idnr(ANNA)))
        .await
        .expect_err("rogue broker accepted");
    assert_eq!(status.code(), Code::PermissionDenied);
    connector_client(&pki, Role::Broker, "broker", connector.local_addr())
        .provide_evidence(request("birth-certificate", idnr(ANNA)))
        .await
        .expect("the configured broker is served");
}

#[tokio::test]
async fn unknown_subject_gives_not_found() {
    let pki = pki_with(&[(Role::Connector, "civil-register")]);
    let connector = civil_register(&pki).await;
    let status = connector_client(&pki, Role::Broker, "broker", connector.local_addr())
        .provide_evidence(request("birth-certificate", idnr(NOBODY)))
        .await
        .expect_err("nobody has no birth certificate here");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(reason_of(&status), Some(ErrorReason::SubjectNotFound));
}

#[tokio::test]
async fn blocked_subject_is_refused_by_the_register() {
    let pki = pki_with(&[(Role::Connector, "civil-register")]);
    let connector = civil_register(&pki).await;
    let status = connector_client(&pki, Role::Broker, "broker", connector.local_addr())
        .provide_evidence(request("birth-certificate", idnr(LUKAS_BLOCKED)))
        .await
        .expect_err("blocking notice ignored");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason_of(&status), Some(ErrorReason::SubjectBlocked));
}

#[tokio::test]
async fn unserved_evidence_type_gives_unimplemented() {
    let pki = pki_with(&[(Role::Connector, "civil-register")]);
    let connector = civil_register(&pki).await;
    let status = connector_client(&pki, Role::Broker, "broker", connector.local_addr())
        .provide_evidence(request("vehicle-registration", idnr(ANNA)))
        .await
        .expect_err("civil register does not serve vehicles");
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(reason_of(&status), Some(ErrorReason::NoRoute));
}

#[tokio::test]
async fn injected_failures_give_unavailable_and_refusals_permission_denied() {
    let pki = pki_with(&[
        (Role::Connector, "civil-register"),
        (Role::Connector, "flaky"),
    ]);
    let failing = MockRegister::embedded(RegisterKind::Civil)
        .expect("data")
        .with_faults(Faults {
            failure_rate: 1.0,
            ..Faults::default()
        });
    let connector = start_connector(&pki, "flaky", failing).await;
    let status = connector_client(&pki, Role::Broker, "broker", connector.local_addr())
        .provide_evidence(request("birth-certificate", idnr(ANNA)))
        .await
        .expect_err("failure rate 1.0");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason_of(&status), Some(ErrorReason::ConnectorUnavailable));

    let refusing = MockRegister::embedded(RegisterKind::Civil)
        .expect("data")
        .with_faults(Faults {
            refuse_subjects: [ANNA.to_owned()].into(),
            ..Faults::default()
        });
    let connector = start_connector(&pki, "civil-register", refusing).await;
    let status = connector_client(&pki, Role::Broker, "broker", connector.local_addr())
        .provide_evidence(request("birth-certificate", idnr(ANNA)))
        .await
        .expect_err("refused subject");
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn vehicle_register_selects_by_plate_and_rejects_unknown_parameters() {
    let pki = pki_with(&[(Role::Connector, "vehicle-register")]);
    let register = MockRegister::embedded(RegisterKind::Vehicle).expect("data");
    let connector = start_connector(&pki, "vehicle-register", register).await;
    let mut client = connector_client(&pki, Role::Broker, "broker", connector.local_addr());
    // Deniz Yılmaz holds two cars.
    let deniz = "21641045750";
    let all = client
        .provide_evidence(request("vehicle-registration", idnr(deniz)))
        .await
        .expect("vehicles")
        .into_inner()
        .evidence
        .expect("evidence");
    let all = String::from_utf8(all.payload).expect("utf-8");
    assert!(
        all.contains("K-DY 4012") && all.contains("K-DY 77E"),
        "{all}"
    );

    let mut one = request("vehicle-registration", idnr(deniz));
    one.parameters
        .insert("licence_plate".into(), "k-dy 77e".into());
    let one = client
        .provide_evidence(one)
        .await
        .expect("one vehicle")
        .into_inner()
        .evidence
        .expect("evidence");
    let one = String::from_utf8(one.payload).expect("utf-8");
    assert!(
        one.contains("K-DY 77E") && !one.contains("K-DY 4012"),
        "{one}"
    );

    let mut bad = request("vehicle-registration", idnr(deniz));
    bad.parameters.insert("colour".into(), "red".into());
    let status = client
        .provide_evidence(bad)
        .await
        .expect_err("unknown parameter");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["parameters[colour]"]);
}

/// A connector that counts the calls that reach it.
struct Counting(Arc<AtomicUsize>);

impl Connector for Counting {
    fn evidence_types(&self) -> Vec<EvidenceTypeInfo> {
        vec![evidence_type(
            "birth-certificate",
            "Birth certificate",
            &["application/json"],
            &[SubjectIdScheme::DeIdnr],
        )]
    }

    async fn provide(&self, _request: EvidenceRequest) -> Result<EvidencePayload, ProvideError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(EvidencePayload::json("{}"))
    }
}

#[tokio::test]
async fn malformed_subject_never_reaches_the_implementer() {
    let pki = pki_with(&[(Role::Connector, "counting")]);
    let calls = Arc::new(AtomicUsize::new(0));
    let connector = start_connector(&pki, "counting", Counting(calls.clone())).await;
    let mut client = connector_client(&pki, Role::Broker, "broker", connector.local_addr());

    let cases = [
        (idnr("82281866208"), "subject.value"), // check digit wrong
        (idnr("8228186620"), "subject.value"),  // too short
        (
            Some(SubjectId {
                scheme: SubjectIdScheme::DeCommercialRegister.into(),
                value: "F1103:HRB 123456".into(),
            }),
            "subject.scheme", // well-formed, but not a scheme this type is keyed by
        ),
        (
            Some(SubjectId {
                scheme: 0,
                value: ANNA.into(),
            }),
            "subject.scheme",
        ),
        (None, "subject"),
    ];
    for (subject, field) in cases {
        let status = client
            .provide_evidence(request("birth-certificate", subject.clone()))
            .await
            .expect_err("malformed subject accepted");
        assert_eq!(status.code(), Code::InvalidArgument, "{subject:?}");
        assert_eq!(violated_fields(&status), [field], "{subject:?}");
    }
    let mut missing_purpose = request("birth-certificate", idnr(ANNA));
    missing_purpose.purpose.clear();
    let status = client
        .provide_evidence(missing_purpose)
        .await
        .expect_err("no purpose");
    assert_eq!(violated_fields(&status), ["purpose"]);

    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "a malformed request reached the register"
    );
    client
        .provide_evidence(request("birth-certificate", idnr(ANNA)))
        .await
        .expect("well-formed request served");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A register that takes far too long, and records whether it finished or
/// was dropped (cancelled).
struct Slow {
    finished: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

struct DropFlag(Arc<AtomicUsize>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Connector for Slow {
    fn evidence_types(&self) -> Vec<EvidenceTypeInfo> {
        Counting(Arc::default()).evidence_types()
    }

    async fn provide(&self, _request: EvidenceRequest) -> Result<EvidencePayload, ProvideError> {
        let _flag = DropFlag(self.dropped.clone());
        tokio::time::sleep(Duration::from_secs(30)).await;
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(EvidencePayload::json("{}"))
    }
}

#[tokio::test]
async fn request_past_its_deadline_is_cancelled() {
    let pki = pki_with(&[(Role::Connector, "slow")]);
    let finished = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let connector = start_connector(
        &pki,
        "slow",
        Slow {
            finished: finished.clone(),
            dropped: dropped.clone(),
        },
    )
    .await;
    let mut client = connector_client(&pki, Role::Broker, "broker", connector.local_addr());
    let mut call = tonic::Request::new(request("birth-certificate", idnr(ANNA)));
    call.set_timeout(Duration::from_millis(300));
    let status = client
        .provide_evidence(call)
        .await
        .expect_err("deadline passed");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::DeadlineExceeded));
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the register's work was not cancelled"
    );
    assert_eq!(finished.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn health_and_reflection_answer() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let pki = pki_with(&[(Role::Connector, "civil-register")]);
    let connector = civil_register(&pki).await;
    let channel = channel_as(&pki, Role::Broker, "broker", connector.local_addr(), None);

    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "onceonly.v1.ConnectorService".into(),
        })
        .await
        .expect("health answers")
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection answers")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("stream")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"onceonly.v1.ConnectorService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}

#[tokio::test]
async fn shutdown_reports_not_serving_and_drains() {
    let pki = pki_with(&[(Role::Connector, "civil-register")]);
    let connector = civil_register(&pki).await;
    let addr = connector.local_addr();
    connector_client(&pki, Role::Broker, "broker", addr)
        .provide_evidence(request("birth-certificate", idnr(ANNA)))
        .await
        .expect("served before shutdown");
    tokio::time::timeout(Duration::from_secs(15), connector.shutdown())
        .await
        .expect("shutdown completes")
        .expect("clean shutdown");
    let status = connector_client(&pki, Role::Broker, "broker", addr)
        .provide_evidence(request("birth-certificate", idnr(ANNA)))
        .await
        .expect_err("served after shutdown");
    assert_eq!(status.code(), Code::Unavailable);
}

#[tokio::test]
async fn a_connector_without_allowed_broker_id_refuses_to_start() {
    let pki = pki_with(&[(Role::Connector, "civil-register")]);
    let register = MockRegister::embedded(RegisterKind::Civil).expect("data");
    let refused = onceonly_connector_sdk::ConnectorServer::builder(
        register,
        pki.tls_files(Role::Connector, "civil-register"),
    )
    .listen("127.0.0.1:0".parse().expect("addr"))
    .bind()
    .await;
    let Err(error) = refused else {
        panic!("a connector that answers any broker started");
    };
    assert!(
        matches!(error, onceonly_connector_sdk::ServeError::NoAllowedBroker),
        "{error}"
    );
    assert!(error.to_string().contains("allowed_broker_id"), "{error}");
}

/// Issue 24: the SDK signs nothing in a media type the connector does not
/// declare for the evidence type (a register's code returning an HTML page
/// or a program): INTERNAL (BAD_EVIDENCE), and the reason names both.
#[tokio::test]
async fn a_payload_in_an_undeclared_media_type_is_not_signed() {
    let pki = pki_with(&[(Role::Connector, "civil-register")]);
    for media_type in ["text/html", "application/x-msdownload"] {
        let (probe, counts) = onceonly_integration_tests::probe::ProbeRegister::new(Duration::ZERO);
        let connector = start_connector(
            &pki,
            "civil-register",
            probe.answering_undeclared(media_type),
        )
        .await;
        let status = connector_client(&pki, Role::Broker, "broker", connector.local_addr())
            .provide_evidence(request("birth-certificate", idnr(ANNA)))
            .await
            .expect_err("signed a payload it does not declare");
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert_eq!(
            onceonly_proto::status::reason_of(&status),
            Some(onceonly_proto::v1::ErrorReason::BadEvidence)
        );
        assert!(
            status.message().contains(media_type) && status.message().contains("application/xml"),
            "{}",
            status.message()
        );
        assert_eq!(
            counts.finished.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the register's code ran"
        );
    }
}
