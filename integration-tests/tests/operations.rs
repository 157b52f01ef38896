//! What an operator sees: the admin listener's metrics after real
//! exchanges, parsed by an independent Prometheus text-format parser, and
//! readiness (gRPC health) following the audit log.

use std::collections::HashMap;
use std::time::Duration;

use onceonly_broker::audit::AuditFault;
use onceonly_certs::Role;
use onceonly_integration_tests::world::{AUDITOR, AUTHORITIES, World, birth_certificate};
use onceonly_proto::status::reason_of;
use onceonly_proto::v1::ErrorReason;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BERLIN: &str = AUTHORITIES[0];
const PATIENCE: Duration = Duration::from_secs(20);

/// GET /metrics from the broker's admin listener.
async fn scrape(world: &World) -> String {
    onceonly_integration_tests::scrape_metrics(world.admin_addr()).await
}

/// The samples of a scrape, parsed by `prometheus-parse`: name and labels
/// (sorted, `k=v` joined by `,`) to value.
fn samples(text: &str) -> HashMap<String, f64> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    scrape
        .samples
        .into_iter()
        .filter_map(|sample| {
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let mut labels: Vec<String> = sample
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            labels.sort();
            Some((format!("{}{{{}}}", sample.metric, labels.join(",")), value))
        })
        .collect()
}

fn value(samples: &HashMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have {:#?}", samples.keys()))
}

#[tokio::test]
async fn metrics_after_real_exchanges_count_what_happened() {
    let world = World::start().await;
    let mut authority = world.authority(BERLIN);
    for n in 0..3 {
        authority
            .request_evidence(birth_certificate(&format!("metrics-{n}")))
            .await
            .expect("delivered");
    }
    let mut denied = birth_certificate("metrics-denied");
    denied.evidence_type = "vehicle-registration".into();
    authority
        .request_evidence(denied)
        .await
        .expect_err("no rule allows it");
    let mut unknown = birth_certificate("metrics-unknown");
    unknown.evidence_type = "no-such-type".into();
    authority
        .request_evidence(unknown)
        .await
        .expect_err("not catalogued");
    world.settle().await;

    let text = scrape(&world).await;
    let samples = samples(&text);
    assert_eq!(
        value(
            &samples,
            "onceonly_exchanges_total{evidence_type=birth-certificate,outcome=delivered,reason=none}"
        ),
        3.0
    );
    assert_eq!(
        value(
            &samples,
            "onceonly_exchanges_total{evidence_type=vehicle-registration,outcome=denied,reason=POLICY_DENIED}"
        ),
        1.0
    );
    // A caller's free text never becomes a label.
    assert_eq!(
        value(
            &samples,
            "onceonly_exchanges_total{evidence_type=unknown,outcome=rejected,reason=UNKNOWN_EVIDENCE_TYPE}"
        ),
        1.0
    );
    assert!(!text.contains("no-such-type"));
    // Five exchanges and the policy's entry from the start.
    assert_eq!(value(&samples, "onceonly_audit_tree_size{}"), 6.0);
    assert_eq!(
        value(&samples, "onceonly_exchange_duration_seconds_count{}"),
        5.0
    );
    assert_eq!(
        value(
            &samples,
            "onceonly_connector_duration_seconds_count{connector=civil-register}"
        ),
        3.0
    );
    assert!(value(&samples, "onceonly_audit_fsync_duration_seconds_count{}") >= 1.0);
    assert_eq!(value(&samples, "onceonly_audit_refusing{}"), 0.0);
    assert_eq!(value(&samples, "onceonly_exchanges_in_flight{}"), 0.0);
    assert_eq!(
        value(
            &samples,
            "onceonly_refused_calls_total{reason=no_certificate}"
        ),
        0.0
    );
    let broker_expiry = value(
        &samples,
        "onceonly_certificate_expiry_seconds{certificate=broker}",
    );
    assert!(
        broker_expiry > 80.0 * 86_400.0 && broker_expiry <= 90.0 * 86_400.0,
        "{broker_expiry}"
    );
    assert!(
        value(
            &samples,
            "onceonly_certificate_expiry_seconds{certificate=ca}"
        ) > broker_expiry
    );
    assert!(value(&samples, "onceonly_crl_next_update_seconds{}") > 0.0);
    assert!(value(&samples, "onceonly_crl_age_seconds{}") >= 0.0);
}

async fn health(world: &World) -> ServingStatus {
    let mut client = HealthClient::new(world.channel(Role::Auditor, AUDITOR));
    client
        .check(HealthCheckRequest {
            service: "onceonly.v1.EvidenceService".into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status()
}

async fn wait_for_health(world: &World, wanted: ServingStatus) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if health(world).await == wanted {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never became {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn readiness_is_not_serving_while_the_audit_log_refuses_appends() {
    let world = World::start().await;
    wait_for_health(&world, ServingStatus::Serving).await;
    let broker = world.running_broker().broker().expect("running");

    broker.audit.inject(AuditFault::Append);
    let status = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("ready-1"))
        .await
        .expect_err("no record, no evidence");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason_of(&status), Some(ErrorReason::AuditUnavailable));
    wait_for_health(&world, ServingStatus::NotServing).await;
    let samples = samples(&scrape(&world).await);
    assert_eq!(value(&samples, "onceonly_audit_refusing{}"), 1.0);
    // Counted as the caller saw it: failed, nothing released.
    assert_eq!(
        value(
            &samples,
            "onceonly_exchanges_total{evidence_type=birth-certificate,outcome=failed,reason=AUDIT_UNAVAILABLE}"
        ),
        1.0
    );
    assert!(!samples.keys().any(|k| k.starts_with(
        "onceonly_exchanges_total{evidence_type=birth-certificate,outcome=delivered"
    )));

    broker.audit.inject(AuditFault::None);
    wait_for_health(&world, ServingStatus::Serving).await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("ready-2"))
        .await
        .expect("serving again");
}

/// A TCP endpoint in front of a register that either swallows connections
/// (accepts, never answers: a hung host) or forwards them to the register.
struct Switchable {
    addr: std::net::SocketAddr,
    forwarding: std::sync::Arc<std::sync::atomic::AtomicBool>,
    forwarded: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Switchable {
    async fn start(target: std::net::SocketAddr) -> Switchable {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let forwarding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let forwarded = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mode, count) = (forwarding.clone(), forwarded.clone());
        tokio::spawn(async move {
            let mut swallowed = Vec::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                if mode.load(Ordering::SeqCst) {
                    count.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                } else {
                    swallowed.push(inbound);
                }
            }
        });
        Switchable {
            addr,
            forwarding,
            forwarded,
        }
    }
}

/// An installation whose circuits open after two failures and stay open
/// 10 s, longer than any of these tests waits (health checks out of the
/// way: the test runs one itself).
async fn circuit_world() -> World {
    World::start_with(onceonly_integration_tests::world::BrokerSettings {
        sections:
            "[circuit]\nfailure_threshold = 2\nopen_for = \"10s\"\nhealth_interval = \"1h\"\n"
                .into(),
        ..Default::default()
    })
    .await
}

/// Routes the civil register's evidence to `endpoints` (a TOML array) and
/// restarts the broker.
async fn reroute_civil(world: &mut World, endpoints: &str) {
    let civil = world.registers[0].local_addr().to_string();
    let routing_path = world.dir.path().join("routing.toml");
    let original = std::fs::read_to_string(&routing_path).expect("routing");
    std::fs::write(
        &routing_path,
        original.replace(&format!("[\"{civil}\"]"), endpoints),
    )
    .expect("routing");
    world.stop_broker().await;
    world.start_broker().await;
}

#[tokio::test]
async fn a_hung_endpoint_opens_its_circuit_is_skipped_and_closes_when_it_returns() {
    use std::sync::atomic::Ordering;
    let mut world = circuit_world().await;
    let civil = world.registers[0].local_addr();
    let hung = Switchable::start(civil).await;
    reroute_civil(&mut world, &format!("[\"{}\", \"{civil}\"]", hung.addr)).await;
    let mut authority = world.authority(BERLIN);
    let endpoint_up = format!(
        "onceonly_connector_endpoint_up{{connector=civil-register,endpoint={}}}",
        hung.addr
    );

    // Two requests each wait for the hung endpoint's connect timeout, then
    // fail over: the circuit opens.
    for n in 0..2 {
        let started = std::time::Instant::now();
        authority
            .request_evidence(birth_certificate(&format!("hung-{n}")))
            .await
            .expect("failover delivers");
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "the hung endpoint was tried: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(value(&samples(&scrape(&world).await), &endpoint_up), 0.0);
    // Now requests skip it: no connect timeout (3 s) is waited for.
    for n in 2..5 {
        let started = std::time::Instant::now();
        authority
            .request_evidence(birth_certificate(&format!("hung-{n}")))
            .await
            .expect("delivered");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "an open circuit was tried: {:?}",
            started.elapsed()
        );
    }
    // The endpoint comes back; its health check answers SERVING and the
    // circuit closes: it serves again.
    hung.forwarding.store(true, Ordering::SeqCst);
    let broker = world.running_broker().broker().expect("running");
    broker.forwarder.check_health(&broker.routing).await;
    assert_eq!(value(&samples(&scrape(&world).await), &endpoint_up), 1.0);
    authority
        .request_evidence(birth_certificate("hung-back"))
        .await
        .expect("delivered");
    assert_eq!(value(&samples(&scrape(&world).await), &endpoint_up), 1.0);
    assert!(
        hung.forwarded.load(Ordering::SeqCst) >= 1,
        "the endpoint served again"
    );
}

#[tokio::test]
async fn a_connector_whose_every_endpoint_is_open_fails_fast_with_its_own_reason() {
    let mut world = circuit_world().await;
    let hung = Switchable::start(world.registers[0].local_addr()).await;
    reroute_civil(&mut world, &format!("[\"{}\"]", hung.addr)).await;
    let mut authority = world.authority(BERLIN);
    for n in 0..2 {
        let status = authority
            .request_evidence(birth_certificate(&format!("open-{n}")))
            .await
            .expect_err("hung");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason_of(&status), Some(ErrorReason::ConnectorUnavailable));
    }
    let started = std::time::Instant::now();
    let status = authority
        .request_evidence(birth_certificate("open-fast"))
        .await
        .expect_err("every circuit open");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::ConnectorCircuitOpen));
    world.settle().await;
    let records = world.wait_for_records("open-fast", 1, PATIENCE).await;
    assert_eq!(records.len(), 1);
    assert!(!records[0].register_contacted, "{:?}", records[0]);
    assert_eq!(records[0].error_reason(), ErrorReason::ConnectorCircuitOpen);
}

#[tokio::test]
async fn a_connector_serves_its_own_metrics_counting_answers_and_refusals() {
    use onceonly_proto::v1::connector_service_client::ConnectorServiceClient;
    use onceonly_proto::v1::{ProvideEvidenceRequest, SubjectId, SubjectIdScheme};
    let pki = onceonly_integration_tests::pki_with(&[(Role::Connector, "civil-register")]);
    let register =
        onceonly_registry_mock::MockRegister::embedded(onceonly_registry_mock::RegisterKind::Civil)
            .expect("data");
    let connector = onceonly_connector_sdk::ConnectorServer::builder(
        register,
        pki.tls_files(Role::Connector, "civil-register"),
    )
    .allowed_broker("broker")
    .listen("127.0.0.1:0".parse().expect("addr"))
    .admin_listen("127.0.0.1:0".parse().expect("addr"))
    .bind()
    .await
    .expect("bind")
    .spawn();
    let request = |id: &str| ProvideEvidenceRequest {
        exchange_id: id.into(),
        evidence_type: "birth-certificate".into(),
        subject: Some(SubjectId {
            scheme: SubjectIdScheme::DeIdnr.into(),
            value: onceonly_integration_tests::world::ANNA.into(),
        }),
        purpose: "parental-allowance".into(),
        legal_basis: "§ 9 Abs. 1 BEEG".into(),
        requester_id: "spiffe://onceonly.test/authority/elterngeld-berlin".into(),
        ..Default::default()
    };
    let mut broker = onceonly_integration_tests::connector_client(
        &pki,
        Role::Broker,
        "broker",
        connector.local_addr(),
    );
    for n in 0..2 {
        broker
            .provide_evidence(request(&format!("ex-{n}")))
            .await
            .expect("answered");
    }
    let mut unticketed = ConnectorServiceClient::new(onceonly_integration_tests::channel_as(
        &pki,
        Role::Broker,
        "broker",
        connector.local_addr(),
        None,
    ));
    unticketed
        .provide_evidence(request("ex-none"))
        .await
        .expect_err("no ticket");

    let samples = samples(
        &onceonly_integration_tests::scrape_metrics(connector.admin_addr().expect("admin")).await,
    );
    assert_eq!(
        value(
            &samples,
            "onceonly_connector_requests_total{code=Ok,evidence_type=birth-certificate,reason=none}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "onceonly_connector_requests_total{code=PermissionDenied,evidence_type=birth-certificate,reason=TICKET_MISSING}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "onceonly_connector_request_duration_seconds_count{}"
        ),
        3.0
    );
}

#[tokio::test]
async fn readiness_is_not_serving_while_the_broker_announces_its_shutdown() {
    let mut world = World::start().await;
    // A top-level key, so before every table.
    let config = std::fs::read_to_string(&world.config_path).expect("config");
    std::fs::write(
        &world.config_path,
        format!("shutdown_announce = \"3s\"\n{config}"),
    )
    .expect("config");
    world.stop_broker().await;
    world.start_broker().await;
    wait_for_health(&world, ServingStatus::Serving).await;
    let mut health = HealthClient::new(world.channel(Role::Auditor, AUDITOR));
    let broker = world.broker.take().expect("running");
    let stopping = tokio::spawn(broker.shutdown());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("still serving while it announces")
            .into_inner()
            .status();
        if status == ServingStatus::NotServing {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stopping.await.expect("task").expect("stops cleanly");
}

#[tokio::test]
async fn a_broker_started_on_a_revocation_list_older_than_one_it_accepted_serves_nobody() {
    let mut world = World::start().await;
    wait_for_health(&world, ServingStatus::Serving).await;
    let before_revocation = std::fs::read(world.pki.crl_path()).expect("crl");
    // A revocation, loaded: the broker records the list's number.
    let revoked = world
        .pki
        .participant_paths(Role::Authority, "gewerbeamt-muenchen")
        .0;
    let serial = onceonly_certs::inspect::CertificateSummary::of(
        &onceonly_certs::pki::load_certs(&revoked).expect("cert")[0],
    )
    .expect("summary")
    .serial;
    world.pki.revoke(&serial).expect("revoke");
    let newer = std::fs::read(world.pki.crl_path()).expect("crl");
    world.running_broker().reload_tls().expect("the newer list");
    let recorded = world.dir.path().join("data").join("crl-number");
    let (_, number) = world.pki.revoked_serials().expect("crl");
    assert_eq!(
        std::fs::read_to_string(&recorded).expect("recorded").trim(),
        number.to_string()
    );

    // Pushed back while it runs: refused, the newer stays in force.
    std::fs::write(world.pki.crl_path(), &before_revocation).expect("push back");
    let refused = world
        .running_broker()
        .reload_tls()
        .expect_err("an older list");
    assert!(
        refused.to_string().contains("older than number"),
        "{refused}"
    );
    wait_for_health(&world, ServingStatus::Serving).await;

    // Restarted with the older list as the only one: NOT_SERVING, and
    // every caller refused, until a newer list is loaded.
    world.stop_broker().await;
    world.start_broker().await;
    wait_for_health(&world, ServingStatus::NotServing).await;
    let status = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("rolled-back-1"))
        .await
        .expect_err("nobody while the list is rolled back");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("older than number"), "{status:?}");
    std::fs::write(world.pki.crl_path(), &newer).expect("the newer list");
    world.running_broker().reload_tls().expect("reloads");
    wait_for_health(&world, ServingStatus::Serving).await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("rolled-back-2"))
        .await
        .expect("serving again");
}
