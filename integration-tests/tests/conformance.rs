//! `onceonly-conformance` against real connectors: the sample registers on
//! the SDK and `onceonly-connector` conform; connectors that break the
//! contract are caught, each by the check it breaks. The broken ones are
//! built here as a misbehaving front of a real connector, with its
//! connector certificate: one that lets requests through without the
//! broker's ticket (it adds one itself), one that signs with another
//! participant's key, one that ignores the request to encrypt, one that
//! answers past the deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use onceonly_certs::{ClientAuth, IssueOptions, MtlsIncoming, Pki, ReloadableServerTls, Role};
use onceonly_conformance::{Report, Target};
use onceonly_integration_tests::world::{ANNA, World};
use onceonly_integration_tests::{binary, channel_as, ticket_for};
use onceonly_proto::v1::connector_service_client::ConnectorServiceClient;
use onceonly_proto::v1::connector_service_server::{ConnectorService, ConnectorServiceServer};
use onceonly_proto::v1::{
    DescribeConnectorRequest, DescribeConnectorResponse, ProvideEvidenceRequest,
    ProvideEvidenceResponse, SubjectId, SubjectIdScheme,
};
use onceonly_seal::{Signer, StatementClaims};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const AUTHORITY: &str = "elterngeld-berlin";

fn target(world: &World, connector: SocketAddr, connector_id: &str, evidence_type: &str) -> Target {
    let (broker_cert, broker_key) = world.pki.participant_paths(Role::Broker, "broker");
    let mut encryption = IssueOptions::new(Role::Authority, AUTHORITY);
    encryption.encryption = true;
    if !world.pki.encryption_paths(AUTHORITY).0.exists() {
        world
            .pki
            .issue(&encryption)
            .expect("encryption certificate");
    }
    Target {
        address: connector.to_string(),
        connector_id: connector_id.into(),
        ca: world.pki.tls_files(Role::Broker, "broker").ca,
        crl: Some(world.pki.crl_path()),
        broker_cert,
        broker_key,
        evidence_type: evidence_type.into(),
        subject: SubjectId {
            scheme: SubjectIdScheme::DeIdnr.into(),
            value: ANNA.into(),
        },
        parameters: HashMap::new(),
        // A valid IDNr that neither sample register holds.
        missing_subject: Some("65432198704".into()),
        authority: world.pki.participant_paths(Role::Authority, AUTHORITY),
        encryption: Some(world.pki.encryption_paths(AUTHORITY)),
        deadline: Duration::from_millis(500),
    }
}

async fn check(target: Target) -> Report {
    onceonly_conformance::run(target)
        .await
        .expect("the checks run")
}

fn assert_conforms(report: &Report) {
    assert!(report.passed(), "{}", report.table());
    assert!(
        report.checks.iter().all(|c| c.pass == Some(true)),
        "every check ran: {}",
        report.table()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_registers_and_the_generic_connector_conform() {
    let world = World::start().await;
    let civil = world.registers[0].local_addr();
    assert_conforms(&check(target(&world, civil, "civil-register", "birth-certificate")).await);
    let school = world.registers[3].local_addr();
    assert_conforms(
        &check(target(
            &world,
            school,
            "school-register",
            "school-leaving-certificate",
        ))
        .await,
    );
}

/// How a misbehaving front breaks the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breach {
    /// Answers without the broker's ticket (mints one for the real
    /// connector behind it with a broker key it holds).
    SkipsTickets,
    /// Re-signs the register's statement with another participant's key.
    SignsWithAnotherKey,
    /// Drops the encryption certificate and answers in the clear.
    IgnoresEncryption,
    /// Answers, 2 s after the caller's deadline.
    AnswersLate,
}

struct Front {
    breach: Breach,
    upstream: ConnectorServiceClient<Channel>,
    broker: Arc<Signer>,
    other: Arc<Signer>,
    trust_domain: String,
    connector_id: String,
}

#[tonic::async_trait]
impl ConnectorService for Front {
    async fn provide_evidence(
        &self,
        request: Request<ProvideEvidenceRequest>,
    ) -> Result<Response<ProvideEvidenceResponse>, Status> {
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|t| t.to_str().ok())
            .and_then(|t| t.strip_suffix('m'))
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(Duration::from_millis);
        let mut request = request.into_inner();
        match self.breach {
            Breach::SkipsTickets => {
                request.authorization_ticket = ticket_for(
                    &self.broker,
                    &self.trust_domain,
                    &self.connector_id,
                    &request,
                );
            }
            Breach::IgnoresEncryption => {
                request.encryption_certificate.clear();
                request.authorization_ticket = ticket_for(
                    &self.broker,
                    &self.trust_domain,
                    &self.connector_id,
                    &request,
                );
            }
            Breach::SignsWithAnotherKey | Breach::AnswersLate => {}
        }
        let mut answer = self
            .upstream
            .clone()
            .provide_evidence(request)
            .await?
            .into_inner();
        match self.breach {
            Breach::SignsWithAnotherKey => {
                if let Some(evidence) = answer.evidence.as_mut() {
                    let payload = evidence.register_jws.split('.').nth(1).unwrap_or_default();
                    let claims: StatementClaims = serde_json::from_slice(
                        &base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .decode(payload)
                            .expect("base64url"),
                    )
                    .expect("statement claims");
                    evidence.register_jws = claims.sign(&self.other).expect("re-signed");
                }
            }
            Breach::AnswersLate => {
                tokio::time::sleep(deadline.unwrap_or_default() + Duration::from_secs(2)).await;
            }
            Breach::SkipsTickets | Breach::IgnoresEncryption => {}
        }
        Ok(Response::new(answer))
    }

    async fn describe_connector(
        &self,
        request: Request<DescribeConnectorRequest>,
    ) -> Result<Response<DescribeConnectorResponse>, Status> {
        self.upstream
            .clone()
            .describe_connector(request.into_inner())
            .await
    }
}

/// A front with connector `connector_id`'s certificate before the real
/// connector at `upstream`.
async fn front(pki: &Pki, connector_id: &str, upstream: SocketAddr, breach: Breach) -> SocketAddr {
    let tls = ReloadableServerTls::load_with(
        pki.tls_files(Role::Connector, connector_id),
        ClientAuth::Strict,
    )
    .expect("server TLS");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (broker_cert, broker_key) = pki.participant_paths(Role::Broker, "broker");
    let (other_cert, other_key) = pki.participant_paths(Role::Connector, "vehicle-register");
    let front = Front {
        breach,
        upstream: ConnectorServiceClient::new(channel_as(
            pki,
            Role::Broker,
            "broker",
            upstream,
            None,
        )),
        broker: Arc::new(Signer::from_files(&broker_cert, &broker_key).expect("broker key")),
        other: Arc::new(Signer::from_files(&other_cert, &other_key).expect("another key")),
        trust_domain: pki.trust_domain().to_owned(),
        connector_id: connector_id.to_owned(),
    };
    let incoming = MtlsIncoming::new(listener, tls, Default::default());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(tonic_health::server::health_reporter().1)
            .add_service(ConnectorServiceServer::new(front))
            .serve_with_incoming(incoming),
    );
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_that_break_the_contract_fail_the_check_they_break() {
    let world = World::start().await;
    let civil = world.registers[0].local_addr();
    for (breach, failing) in [
        (Breach::SkipsTickets, "ticket-missing"),
        (Breach::SignsWithAnotherKey, "valid-request"),
        (Breach::IgnoresEncryption, "encryption-honoured"),
        (Breach::AnswersLate, "deadline"),
    ] {
        let addr = front(&world.pki, "civil-register", civil, breach).await;
        let report = check(target(&world, addr, "civil-register", "birth-certificate")).await;
        assert!(!report.passed(), "{breach:?} passed:\n{}", report.table());
        assert!(
            report.failed().contains(&failing),
            "{breach:?} should fail {failing}:\n{}",
            report.table()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_prints_a_table_writes_json_and_says_so_in_its_exit_code() {
    let world = World::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let json = dir.path().join("report.json");
    let run = |connector: SocketAddr| {
        let target = target(&world, connector, "civil-register", "birth-certificate");
        let (cert, key) = target.encryption.clone().expect("encryption");
        std::process::Command::new(binary("onceonly-conformance", "onceonly-conformance"))
            .arg("--connector")
            .arg(&target.address)
            .args(["--connector-id", "civil-register"])
            .arg("--ca")
            .arg(&target.ca)
            .arg("--crl")
            .arg(target.crl.as_ref().expect("crl"))
            .arg("--broker-cert")
            .arg(&target.broker_cert)
            .arg("--broker-key")
            .arg(&target.broker_key)
            .arg("--authority-cert")
            .arg(&target.authority.0)
            .arg("--authority-key")
            .arg(&target.authority.1)
            .args(["--evidence-type", "birth-certificate", "--subject", ANNA])
            .args(["--missing-subject", "65432198704"])
            .arg("--encryption-cert")
            .arg(cert)
            .arg("--encryption-key")
            .arg(key)
            .arg("--json")
            .arg(&json)
            .output()
            .expect("runs")
    };
    let good = tokio::task::block_in_place(|| run(world.registers[0].local_addr()));
    let table = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(
        table.contains("ticket-forged") && table.contains("conforms"),
        "{table}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("JSON");
    assert!(
        report["checks"].as_array().is_some_and(|c| c.len() >= 12),
        "{report}"
    );

    let broken = front(
        &world.pki,
        "civil-register",
        world.registers[0].local_addr(),
        Breach::SkipsTickets,
    )
    .await;
    let bad = tokio::task::block_in_place(|| run(broken));
    assert_eq!(bad.status.code(), Some(1));
    let table = String::from_utf8_lossy(&bad.stdout);
    assert!(
        table.contains("FAIL") && table.contains("ticket-missing"),
        "{table}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("JSON");
    let missing = report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "ticket-missing"))
        .expect("the check");
    assert_eq!(missing["pass"], false, "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_that_answers_unsigned_requests_fails_exactly_that_check() {
    let world = World::start().await;
    // The real civil register, its operator having listed the requester in
    // accept_unsigned_from: a broker could make up requests it answers.
    let lenient = onceonly_connector_sdk::ConnectorServer::builder(
        onceonly_registry_mock::MockRegister::embedded(onceonly_registry_mock::RegisterKind::Civil)
            .expect("civil register"),
        world.pki.tls_files(Role::Connector, "civil-register"),
    )
    .allowed_broker("broker")
    .accept_unsigned_from(&[AUTHORITY])
    .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
    .bind()
    .await
    .expect("binds")
    .spawn();
    let report = check(target(
        &world,
        lenient.local_addr(),
        "civil-register",
        "birth-certificate",
    ))
    .await;
    assert_eq!(
        report.failed(),
        vec!["signed-request-missing"],
        "{}",
        report.table()
    );
    // A signed request that is there is still checked in full.
    for name in [
        "signed-request-altered",
        "signed-request-mismatch",
        "signed-request-by-broker",
        "signed-request-reused",
    ] {
        assert!(
            report
                .checks
                .iter()
                .any(|c| c.name == name && c.pass == Some(true)),
            "{name}: {}",
            report.table()
        );
    }
}
