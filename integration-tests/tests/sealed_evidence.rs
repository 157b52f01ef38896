//! The broker routes evidence but can neither read nor forge it, tried over
//! real mutual TLS: connectors refuse requests without a ticket the broker
//! signed for exactly them; registers sign what they issue and the caller
//! checks it; evidence encrypted to the requester passes the broker as
//! ciphertext only; a broker that alters one byte is caught by the caller.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use onceonly_certs::tls::{client_config, identity_verifier};
use onceonly_certs::{IssueOptions, Pki, Role, TlsFiles};
use onceonly_integration_tests::probe::{ProbeCounts, ProbeRegister};
use onceonly_integration_tests::world::{ANNA, World, anna, birth_certificate};
use onceonly_integration_tests::{
    TRUST_DOMAIN, assert_refused_before_the_register, channel_as, channel_with, pki_with,
    start_connector, ticket_with_request,
};
use onceonly_proto::status::{reason_of, violated_fields};
use onceonly_proto::v1::connector_service_client::ConnectorServiceClient;
use onceonly_proto::v1::evidence_service_client::EvidenceServiceClient;
use onceonly_proto::v1::{
    AuditRecord, ErrorReason, Evidence, ExchangeOutcome, ProvideEvidenceRequest, SubjectId,
    SubjectIdScheme,
};
use onceonly_seal::{DecryptionKey, EvidenceOpener, Expected, OpenError, Signer};
use sha2::{Digest, Sha256};
use tonic::Code;

const BERLIN: &str = "elterngeld-berlin";
const MUENCHEN: &str = "elterngeld-muenchen";
const PATIENCE: Duration = Duration::from_secs(20);

fn berlin_spiffe() -> String {
    format!("spiffe://{TRUST_DOMAIN}/authority/{BERLIN}")
}

/// Issues `authority`'s encryption certificate; its DER.
fn encryption_certificate(pki: &Pki, authority: &str) -> Vec<u8> {
    let mut options = IssueOptions::new(Role::Authority, authority);
    options.encryption = true;
    pki.issue(&options).expect("encryption certificate");
    der_of(&pki.encryption_paths(authority).0)
}

fn der_of(path: &Path) -> Vec<u8> {
    onceonly_certs::pki::load_certs(path)
        .expect("cert")
        .remove(0)
        .as_ref()
        .to_vec()
}

/// What the requesting authority runs on what it receives.
fn opener(pki: &Pki, key_of: Option<&str>) -> EvidenceOpener {
    let trust =
        identity_verifier(&pki.tls_files(Role::Authority, BERLIN), TRUST_DOMAIN).expect("trust");
    let key = key_of.map(|authority| {
        let (cert, key) = pki.encryption_paths(authority);
        DecryptionKey::from_files(&cert, &key).expect("decryption key")
    });
    EvidenceOpener::new(Arc::new(trust), key)
}

fn expected(exchange_id: &str) -> Expected<'_> {
    Expected {
        exchange_id,
        evidence_type: "birth-certificate",
        subject_scheme: SubjectIdScheme::DeIdnr,
        subject_value: ANNA,
        requester: "spiffe://onceonly.test/authority/elterngeld-berlin",
        parameters: None,
        connector: Some("civil-register"),
        encrypted: false,
        request: None,
    }
}

async fn the_record(world: &World, request_id: &str) -> AuditRecord {
    world.settle().await;
    let records = world.wait_for_records(request_id, 1, PATIENCE).await;
    assert_eq!(records.len(), 1, "records of {request_id}: {records:?}");
    records.into_iter().next().expect("one")
}

#[tokio::test]
async fn signed_evidence_is_verified_by_the_caller_and_audited_with_the_statement_digest() {
    let world = World::start().await;
    let response = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("signed-1"))
        .await
        .expect("evidence")
        .into_inner();
    let evidence = response.evidence.clone().expect("evidence");
    assert!(!evidence.register_jws.is_empty(), "the register signed");
    let opened = opener(&world.pki, None)
        .open(&evidence, &expected(&response.exchange_id))
        .expect("the caller verifies the register's signature");
    assert_eq!(opened.connector.id(), "civil-register");
    assert!(String::from_utf8_lossy(&opened.payload).contains("Schneider"));

    let record = the_record(&world, "signed-1").await;
    assert_eq!(
        record.register_jws_sha256,
        Sha256::digest(evidence.register_jws.as_bytes()).to_vec()
    );
    assert_eq!(
        record.payload_sha256,
        Sha256::digest(&evidence.payload).to_vec()
    );
    assert!(!record.encrypted);
}

#[tokio::test]
async fn encrypted_evidence_passes_the_broker_as_ciphertext_only() {
    let world = World::start().await;
    let certificate = encryption_certificate(&world.pki, BERLIN);
    let mut request = birth_certificate("sealed-1");
    request.encryption_certificate = certificate;
    let response = world
        .authority(BERLIN)
        .request_evidence(request)
        .await
        .expect("evidence")
        .into_inner();
    let evidence = response.evidence.clone().expect("evidence");
    assert!(evidence.payload.is_empty(), "no clear payload travelled");
    let sealed = evidence.encrypted_payload.clone().expect("encrypted");
    assert!(!String::from_utf8_lossy(&sealed.ciphertext).contains("Schneider"));

    let opened = opener(&world.pki, Some(BERLIN))
        .open(&evidence, &expected(&response.exchange_id))
        .expect("the caller decrypts");
    assert!(opened.was_encrypted);
    let xml = String::from_utf8(opened.payload).expect("utf-8");
    assert!(
        xml.contains("<Familienname>Schneider</Familienname>"),
        "{xml}"
    );

    // The record holds the ciphertext's and the statement's digests.
    let record = the_record(&world, "sealed-1").await;
    assert!(record.encrypted);
    assert_eq!(
        record.payload_sha256,
        Sha256::digest(&sealed.ciphertext).to_vec()
    );
    assert_eq!(
        record.register_jws_sha256,
        Sha256::digest(evidence.register_jws.as_bytes()).to_vec()
    );

    // Nothing of the plaintext anywhere in the broker's data directory.
    let config = onceonly_broker::BrokerConfig::load(&world.config_path).expect("config");
    for marker in [&b"Schneider"[..], b"Familienname", xml.as_bytes()] {
        for file in files_under(&config.data_dir) {
            let bytes = std::fs::read(&file).expect("read");
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker),
                "{} holds plaintext",
                file.display()
            );
        }
    }
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

#[tokio::test]
async fn a_broker_that_alters_one_byte_is_caught_by_the_caller_naming_the_check() {
    let world = World::start().await;
    let certificate = encryption_certificate(&world.pki, BERLIN);
    let broker = world.running_broker().broker().expect("running").clone();
    broker.faults.alter_evidence.store(true, Ordering::SeqCst);

    let response = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("altered-1"))
        .await
        .expect("the altered evidence is released")
        .into_inner();
    let error = opener(&world.pki, None)
        .open(
            response.evidence.as_ref().expect("evidence"),
            &expected(&response.exchange_id),
        )
        .expect_err("one byte changed");
    assert_eq!(error, OpenError::Digest { what: "payload" });
    assert!(error.to_string().starts_with("check digest"), "{error}");

    let mut request = birth_certificate("altered-2");
    request.encryption_certificate = certificate;
    let response = world
        .authority(BERLIN)
        .request_evidence(request)
        .await
        .expect("released")
        .into_inner();
    let error = opener(&world.pki, Some(BERLIN))
        .open(
            response.evidence.as_ref().expect("evidence"),
            &expected(&response.exchange_id),
        )
        .expect_err("one ciphertext byte changed");
    assert_eq!(error, OpenError::Digest { what: "ciphertext" });
}

async fn world_with_probe() -> (World, Arc<ProbeCounts>) {
    let mut world = World::start().await;
    let (probe, counts) = ProbeRegister::new(Duration::ZERO);
    let probe = start_connector(&world.pki, "civil-register", probe).await;
    world.replace_register("civil-register", probe).await;
    (world, counts)
}

#[tokio::test]
async fn encryption_to_another_authoritys_or_a_foreign_certificate_is_refused_before_the_register()
{
    let (world, counts) = world_with_probe().await;
    encryption_certificate(&world.pki, BERLIN);
    let muenchen = encryption_certificate(&world.pki, MUENCHEN);
    let foreign = Pki::throwaway(TRUST_DOMAIN, &[]).expect("foreign PKI");
    let foreign_berlin = encryption_certificate(&foreign, BERLIN);
    // Berlin's TLS certificate is no encryption certificate either.
    let tls_certificate = der_of(&world.pki.participant_paths(Role::Authority, BERLIN).0);

    for (n, certificate) in [muenchen, foreign_berlin, tls_certificate]
        .into_iter()
        .enumerate()
    {
        let id = format!("wrong-key-{n}");
        let mut request = birth_certificate(&id);
        request.encryption_certificate = certificate;
        let status = world
            .authority(BERLIN)
            .request_evidence(request)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(
            reason_of(&status),
            Some(ErrorReason::EncryptionCertificateRefused)
        );
        assert_eq!(violated_fields(&status), ["encryption_certificate"]);
        let record = the_record(&world, &id).await;
        assert!(!record.register_contacted, "{record:?}");
        assert_eq!(record.outcome(), ExchangeOutcome::Rejected);
    }
    assert_eq!(counts.started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_evidence_type_the_policy_releases_only_encrypted_needs_a_certificate() {
    let mut world = World::start().await;
    let policy = std::fs::read_to_string(world.policy_path()).expect("policy");
    std::fs::write(
        world.policy_path(),
        format!("{policy}\n[encryption]\nrequired_for = [\"birth-certificate\"]\n"),
    )
    .expect("policy");
    world.stop_broker().await;
    world.start_broker().await;

    let status = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("clear-1"))
        .await
        .expect_err("encryption required");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::EncryptionRequired));
    assert!(!the_record(&world, "clear-1").await.register_contacted);

    let mut request = birth_certificate("sealed-2");
    request.encryption_certificate = encryption_certificate(&world.pki, BERLIN);
    let response = world
        .authority(BERLIN)
        .request_evidence(request)
        .await
        .expect("encrypted evidence")
        .into_inner();
    assert!(
        response
            .evidence
            .and_then(|e: Evidence| e.encrypted_payload)
            .is_some()
    );
}

/// A connector with the probe register behind it, the broker's signer, and
/// a client presenting the broker's certificate that sends exactly what it
/// is given (no ticket of its own).
async fn probed_connector() -> (
    onceonly_certs::pki::ThrowawayPki,
    onceonly_connector_sdk::RunningConnector,
    Arc<ProbeCounts>,
    Signer,
    ConnectorServiceClient<tonic::transport::Channel>,
) {
    let pki = pki_with(&[
        (Role::Connector, "civil-register"),
        (Role::Authority, BERLIN),
        (Role::Authority, MUENCHEN),
        (Role::Broker, "rogue"),
    ]);
    let (probe, counts) = ProbeRegister::new(Duration::ZERO);
    let connector = start_connector(&pki, "civil-register", probe).await;
    let (cert, key) = pki.participant_paths(Role::Broker, "broker");
    let signer = Signer::from_files(&cert, &key).expect("signer");
    let client = ConnectorServiceClient::new(channel_as(
        &pki,
        Role::Broker,
        "broker",
        connector.local_addr(),
        None,
    ));
    (pki, connector, counts, signer, client)
}

fn provide_request(exchange_id: &str) -> ProvideEvidenceRequest {
    ProvideEvidenceRequest {
        exchange_id: exchange_id.into(),
        evidence_type: "birth-certificate".into(),
        subject: Some(anna()),
        purpose: "parental-allowance".into(),
        legal_basis: "§ 9 Abs. 1 BEEG".into(),
        requester_id: berlin_spiffe(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_connector_refuses_missing_forged_expired_replayed_and_mismatched_tickets() {
    let (pki, _connector, counts, broker, mut client) = probed_connector().await;
    let claims = |request: &ProvideEvidenceRequest| {
        ticket_with_request(&pki, &broker, "civil-register", request)
    };

    let mut refusals = Vec::new();
    // No ticket.
    refusals.push((
        "missing",
        provide_request("ex-none"),
        ErrorReason::TicketMissing,
    ));
    // A ticket whose claims were changed after signing.
    let mut forged = provide_request("ex-forged");
    let token = claims(&forged).sign(&broker).expect("sign");
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut widened = claims(&forged);
    widened.rul = "a-rule-nobody-wrote".into();
    parts[1] = onceonly_seal::base64_url(&serde_json::to_vec(&widened).expect("json"));
    forged.authorization_ticket = parts.join(".");
    refusals.push(("forged", forged, ErrorReason::TicketInvalid));
    // Signed by another broker certificate of the trust domain.
    let mut rogue = provide_request("ex-rogue");
    let (cert, key) = pki.participant_paths(Role::Broker, "rogue");
    let rogue_signer = Signer::from_files(&cert, &key).expect("signer");
    let mut rogue_claims = claims(&rogue);
    rogue_claims.iss = rogue_signer.participant().spiffe_id();
    rogue.authorization_ticket = rogue_claims.sign(&rogue_signer).expect("sign");
    refusals.push(("another broker", rogue, ErrorReason::TicketInvalid));
    // Expired.
    let mut expired = provide_request("ex-expired");
    let mut old = claims(&expired);
    old.iat -= 600;
    old.exp = onceonly_seal::unix_now() - 60;
    expired.authorization_ticket = old.sign(&broker).expect("sign");
    refusals.push(("expired", expired, ErrorReason::TicketExpired));
    // For another subject, another evidence type.
    let mut other_subject = provide_request("ex-subject");
    let mut for_someone_else = claims(&other_subject);
    for_someone_else.sbh =
        onceonly_seal::subject_hash("ex-subject", SubjectIdScheme::DeIdnr, "86095742719");
    other_subject.authorization_ticket = for_someone_else.sign(&broker).expect("sign");
    refusals.push((
        "another subject",
        other_subject,
        ErrorReason::TicketMismatch,
    ));
    let mut other_type = provide_request("ex-type");
    let mut for_another_type = claims(&other_type);
    for_another_type.evt = "proof-of-residence".into();
    other_type.authorization_ticket = for_another_type.sign(&broker).expect("sign");
    refusals.push((
        "another evidence type",
        other_type,
        ErrorReason::TicketMismatch,
    ));
    // A ticket for one request carried by another (another subject).
    let mut moved = provide_request("ex-moved");
    moved.authorization_ticket = claims(&moved).sign(&broker).expect("sign");
    moved.subject = Some(SubjectId {
        scheme: SubjectIdScheme::DeIdnr.into(),
        value: "86095742719".into(),
    });
    refusals.push((
        "moved to another subject",
        moved,
        ErrorReason::TicketMismatch,
    ));

    assert_refused_before_the_register(&mut client, refusals, &counts).await;

    // A good ticket once; the same ticket again is a replay.
    let mut good = provide_request("ex-good");
    good.authorization_ticket = claims(&good).sign(&broker).expect("sign");
    client
        .provide_evidence(good.clone())
        .await
        .expect("a good ticket");
    let status = client.provide_evidence(good).await.expect_err("replay");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason_of(&status), Some(ErrorReason::TicketReplayed));
    assert_eq!(counts.started.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_connector_refuses_to_encrypt_to_a_certificate_not_the_requesters() {
    let (pki, _connector, counts, broker, mut client) = probed_connector().await;
    // Even with a ticket the broker signed naming it: München's certificate
    // for Berlin's request.
    let mut request = provide_request("ex-key");
    request.encryption_certificate = encryption_certificate(&pki, MUENCHEN);
    request.authorization_ticket = ticket_with_request(&pki, &broker, "civil-register", &request)
        .sign(&broker)
        .expect("sign");
    let status = client
        .provide_evidence(request)
        .await
        .expect_err("another authority's key");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        reason_of(&status),
        Some(ErrorReason::EncryptionCertificateRefused)
    );
    assert_eq!(counts.started.load(Ordering::SeqCst), 0);

    // Berlin's own: encrypted, and the statement says to which certificate.
    let mut request = provide_request("ex-key-2");
    request.encryption_certificate = encryption_certificate(&pki, BERLIN);
    request.authorization_ticket = ticket_with_request(&pki, &broker, "civil-register", &request)
        .sign(&broker)
        .expect("sign");
    let evidence = client
        .provide_evidence(request)
        .await
        .expect("encrypted")
        .into_inner()
        .evidence
        .expect("evidence");
    assert!(evidence.payload.is_empty());
    assert!(evidence.encrypted_payload.is_some());
}

#[tokio::test]
async fn an_encryption_certificate_cannot_log_in_as_its_authority() {
    let world = World::start().await;
    encryption_certificate(&world.pki, BERLIN);
    let (cert, key) = world.pki.encryption_paths(BERLIN);
    let files = TlsFiles::new(
        world.pki.ca_cert_path(),
        cert,
        key,
        Some(world.pki.crl_path()),
    );
    let (config, _) = client_config(&files).expect("client TLS");
    let mut client = EvidenceServiceClient::new(channel_with(config, world.broker_addr(), None));
    let status = client
        .request_evidence(birth_certificate("enc-login"))
        .await
        .expect_err("an encryption certificate authenticates nobody");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("digitalSignature"), "{status:?}");
    assert!(
        world
            .audit_records()
            .await
            .iter()
            .all(|r| r.request_id != "enc-login")
    );
}

#[tokio::test]
async fn a_register_that_requires_encryption_refuses_a_ticket_without_a_certificate() {
    let pki = pki_with(&[
        (Role::Connector, "civil-register"),
        (Role::Authority, BERLIN),
    ]);
    let (probe, counts) = ProbeRegister::new(Duration::ZERO);
    let connector = onceonly_connector_sdk::ConnectorServer::builder(
        probe,
        pki.tls_files(Role::Connector, "civil-register"),
    )
    .allowed_broker("broker")
    .require_encryption_for(&["birth-certificate"])
    .listen("127.0.0.1:0".parse().expect("addr"))
    .bind()
    .await
    .expect("bind")
    .spawn();
    // A validly signed ticket, as a broker operator could mint one for
    // itself: the register still releases nothing in clear.
    let mut client = onceonly_integration_tests::connector_client(
        &pki,
        Role::Broker,
        "broker",
        connector.local_addr(),
    );
    let status = client
        .provide_evidence(provide_request("ex-clear"))
        .await
        .expect_err("clear refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::EncryptionRequired));
    assert_eq!(counts.started.load(Ordering::SeqCst), 0);
    let mut sealed = provide_request("ex-sealed");
    sealed.encryption_certificate = encryption_certificate(&pki, BERLIN);
    client
        .provide_evidence(sealed)
        .await
        .expect("encrypted is served");
    assert_eq!(counts.started.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_repeated_request_id_gets_sealed_evidence_the_caller_can_still_open() {
    let world = World::start().await;
    let certificate = encryption_certificate(&world.pki, BERLIN);
    let mut request = birth_certificate("sealed-again");
    request.encryption_certificate = certificate;
    let mut authority = world.authority(BERLIN);
    let first = authority
        .request_evidence(request.clone())
        .await
        .expect("first")
        .into_inner();
    let again = authority
        .request_evidence(request.clone())
        .await
        .expect("repeat")
        .into_inner();
    assert_eq!(again.exchange_id, first.exchange_id);
    opener(&world.pki, Some(BERLIN))
        .open(
            again.evidence.as_ref().expect("evidence"),
            &expected(&again.exchange_id),
        )
        .expect("the repeat opens as the first did");
    // Asking for the same request id in clear is another request.
    request.encryption_certificate.clear();
    let status = authority
        .request_evidence(request)
        .await
        .expect_err("another request under the same id");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
}

/// A connector written without the SDK, with the civil register's real
/// certificate, that answers with evidence it does not sign.
struct Unsigned;

#[tonic::async_trait]
impl onceonly_proto::v1::connector_service_server::ConnectorService for Unsigned {
    async fn provide_evidence(
        &self,
        request: tonic::Request<ProvideEvidenceRequest>,
    ) -> Result<tonic::Response<onceonly_proto::v1::ProvideEvidenceResponse>, tonic::Status> {
        let payload = b"<Geburtsurkunde/>".to_vec();
        Ok(tonic::Response::new(
            onceonly_proto::v1::ProvideEvidenceResponse {
                evidence: Some(Evidence {
                    evidence_type: request.into_inner().evidence_type,
                    payload_sha256: Sha256::digest(&payload).to_vec(),
                    payload,
                    media_type: "application/xml".into(),
                    connector_id: "civil-register".into(),
                    ..Default::default()
                }),
            },
        ))
    }

    async fn describe_connector(
        &self,
        _request: tonic::Request<onceonly_proto::v1::DescribeConnectorRequest>,
    ) -> Result<tonic::Response<onceonly_proto::v1::DescribeConnectorResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not needed"))
    }
}

#[tokio::test]
async fn evidence_without_the_registers_signed_statement_is_refused_and_recorded() {
    let world = World::start().await;
    let tls = onceonly_certs::ReloadableServerTls::load(
        world.pki.tls_files(Role::Connector, "civil-register"),
    )
    .expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                onceonly_proto::v1::connector_service_server::ConnectorServiceServer::new(Unsigned),
            )
            .serve_with_incoming(onceonly_certs::MtlsIncoming::new(
                listener,
                tls,
                Default::default(),
            )),
    );
    let mut world = world;
    let civil = world.registers[0].local_addr().to_string();
    let routing_path = world.dir.path().join("routing.toml");
    let routing = std::fs::read_to_string(&routing_path).expect("routing");
    std::fs::write(&routing_path, routing.replace(&civil, &addr.to_string())).expect("routing");
    world.stop_broker().await;
    world.start_broker().await;

    let status = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("unsigned-1"))
        .await
        .expect_err("no statement, no evidence");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::BadEvidence));
    assert!(status.message().contains("statement"), "{status:?}");
    let record = the_record(&world, "unsigned-1").await;
    assert_eq!(record.outcome(), ExchangeOutcome::Failed, "{record:?}");
    assert_eq!(record.error_reason(), ErrorReason::BadEvidence);
    assert!(record.register_contacted);
    assert!(record.payload_sha256.is_empty(), "nothing released");
}
