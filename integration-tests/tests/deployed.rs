//! The binaries as they ship: `onceonly-certs` makes the PKI, the three
//! sample registers and the broker run as processes started from the
//! command lines of the shipped systemd units (`deploy/`), with their
//! configuration files in the layout of OPERATIONS.md, and are stopped with
//! SIGTERM and reloaded with SIGHUP, as systemd stops and reloads them.
//!
//! In-process tests once hid a broker that never exited on SIGTERM (a
//! SIGHUP task held it, and so its audit writer, forever) and an OTLP
//! export that flooded the collector with HTTP/2 internals. This test sees
//! both, from outside: the processes' exit, and the spans a real OTLP
//! receiver gets.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use onceonly_certs::Role;
use onceonly_integration_tests::AuthorityClient;
use onceonly_integration_tests::deployed::{Installation, Process, REGISTERS, Settings};
use onceonly_integration_tests::otlp::Receiver;
use onceonly_integration_tests::world::birth_certificate;
use onceonly_integration_tests::{all_records, binary, scrape_metrics};
use onceonly_proto::v1::{AuditRecord, ExchangeOutcome, RecordKind};

const BROKER_UNIT: &str = "onceonly-broker.service";
const CONNECTOR_UNIT: &str = "onceonly-registry-mock@.service";
const ANNOUNCE: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_secs(3);
/// Beyond announce and grace: start-up of the drain, the log's close, the
/// traces' last export, on a busy machine. Shorter than the broker's own
/// patience with a log still held (10 s), which the logs must not mention
/// either, and than the slow register's latency in the cut-off test.
const STOP_MARGIN: Duration = Duration::from_secs(6);
const AUTHORITY: &str = "elterngeld-berlin";
const REVOKED_AUTHORITY: &str = "elterngeld-muenchen";
/// The longest one caller's call may take (the register answers within
/// its latency; the broker within its grace period).
const CALL_LIMIT: Duration = Duration::from_secs(20);

/// Concurrent callers while SIGTERM arrives.
const CALLERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_binaries_stop_on_sigterm_reload_on_sighup_and_lose_no_record() {
    let (receiver, endpoint) = Receiver::start().await;
    let installation = Installation::lay_out(Settings {
        shutdown_announce: ANNOUNCE,
        shutdown_grace: GRACE,
        // Long enough that SIGTERM finds requests with the register.
        civil_latency: Duration::from_millis(300),
        otlp_endpoint: Some(endpoint),
    });
    let mut connectors = start_connectors_and_configure(&installation);

    // The unit's ExecStartPre (`check`) fails before `init`: serve would.
    let check = installation.run_start_pre(BROKER_UNIT);
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "check passed without keys");
    assert!(
        said.contains("onceonly-broker init"),
        "check names the fix: {said}"
    );
    installation
        .init_broker()
        .unwrap_or_else(|error| panic!("init: {error}"));
    let secrets = installation.state().join("secrets");
    assert_eq!(
        mode(&secrets),
        0o700,
        "init makes the key folder nobody else's"
    );
    let check = installation.run_start_pre(BROKER_UNIT);
    assert!(
        check.status.success(),
        "check after init: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    // A connector's certificate where the broker's belongs: check refuses
    // it, as serve would.
    let tls = installation.etc().join("tls");
    let (connector_cert, connector_key) = installation
        .pki
        .participant_paths(Role::Connector, "civil-register");
    for (from, to) in [
        (&connector_cert, "broker.pem"),
        (&connector_key, "broker.key"),
    ] {
        std::fs::copy(tls.join(to), tls.join(format!("{to}.kept"))).expect("keep");
        std::fs::copy(from, tls.join(to)).expect("swap");
    }
    let check = installation.run_start_pre(BROKER_UNIT);
    assert!(
        !check.status.success(),
        "check took a connector's certificate"
    );
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("civil-register"),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    for name in ["broker.pem", "broker.key"] {
        std::fs::rename(tls.join(format!("{name}.kept")), tls.join(name)).expect("restore");
    }

    // Under load, SIGTERM: the process exits within announce + grace, and
    // every answered request has its record.
    let mut broker = installation.start(BROKER_UNIT, "broker");
    let answered = under_load_until_stopped(&installation, &mut broker).await;
    assert!(
        answered.len() >= 2 * CALLERS,
        "too few answers to judge: {}",
        answered.len()
    );
    let verify = std::process::Command::new(binary("onceonly-audit", "onceonly-audit-log"))
        .arg("verify-dir")
        .arg("--data-dir")
        .arg(installation.state().join("data"))
        .arg("--public-key")
        .arg(secrets.join("audit.key.pub"))
        .output()
        .expect("onceonly-audit runs");
    assert!(
        verify.status.success(),
        "the log verifies after the stop: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // It starts again on the same data directory, with every record.
    assert!(installation.run_start_pre(BROKER_UNIT).status.success());
    let mut broker = installation.start(BROKER_UNIT, "broker");
    let records = exchange_records(&installation, &broker).await;
    // The start says what it found: every record, nothing rebuilt or cut
    // after a clean stop.
    let opened = broker
        .logs()
        .lines()
        .rfind(|line| line.contains("\"audit log opened\""))
        .map(str::to_owned)
        .expect("the start logs what it opened");
    // (The start's own policy entry came after the log was opened.)
    assert!(
        opened.contains(&format!("\"records\":{}", records.len() - 1))
            && opened.contains("\"index_rebuilt\":false")
            && opened.contains("\"torn_tail_cut_bytes\":0"),
        "{opened}"
    );
    let mut by_exchange: HashMap<&str, Vec<&AuditRecord>> = HashMap::new();
    // Exchanges only: the policy's entries (one per start) name none.
    for record in records.iter().filter(|r| !r.exchange_id.is_empty()) {
        by_exchange
            .entry(record.exchange_id.as_str())
            .or_default()
            .push(record);
    }
    for exchange_id in &answered {
        let found = by_exchange.get(exchange_id.as_str()).map_or(0, Vec::len);
        assert_eq!(
            found, 1,
            "answered exchange {exchange_id} has {found} records"
        );
        assert_eq!(
            by_exchange[exchange_id.as_str()][0].outcome(),
            ExchangeOutcome::Delivered
        );
    }
    assert!(
        by_exchange.values().all(|records| records.len() == 1),
        "an exchange with two records"
    );

    // SIGHUP reloads the CRL: a newly revoked authority is refused, the
    // others are served.
    ask(
        &installation,
        &broker,
        REVOKED_AUTHORITY,
        "before-revocation",
    )
    .await
    .expect("served before its revocation");
    let revoke = std::process::Command::new(binary("onceonly-certs", "onceonly-certs"))
        .arg("--dir")
        .arg(installation.root.path().join("pki"))
        .args(["revoke", "--role", "authority", "--id", REVOKED_AUTHORITY])
        .output()
        .expect("onceonly-certs runs");
    assert!(revoke.status.success());
    installation.publish_crl();
    broker.signal("HUP");
    let mut refused = false;
    for attempt in 0..100 {
        if ask(
            &installation,
            &broker,
            REVOKED_AUTHORITY,
            &format!("after-revocation-{attempt}"),
        )
        .await
        .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused,
        "the revoked authority is still served after SIGHUP"
    );
    ask(&installation, &broker, AUTHORITY, "after-reload")
        .await
        .expect("others are served after the reload");
    assert!(
        broker.logs().contains("TLS certificates and CRL reloaded"),
        "the reload is logged:\n{}",
        broker.logs()
    );

    // Connectors report their own certificate's expiry and the CRL's age.
    let metrics = scrape_metrics(connectors[0].admin_addr()).await;
    for needle in [
        "onceonly_certificate_expiry_seconds{certificate=\"connector\"}",
        "onceonly_certificate_expiry_seconds{certificate=\"ca\"}",
        "onceonly_crl_age_seconds",
        "onceonly_crl_next_update_seconds",
    ] {
        assert!(
            metrics.contains(needle),
            "the connector's metrics lack {needle}"
        );
    }

    // Idle, SIGTERM: out within the announcement and a margin.
    let records = exchange_records(&installation, &broker).await;
    broker.signal("TERM");
    let (status, took) = broker
        .wait_exit(ANNOUNCE + STOP_MARGIN)
        .unwrap_or_else(|| panic!("the idle broker did not exit:\n{}", broker.logs()));
    assert!(status.success(), "exit status {status}");
    assert!(took >= ANNOUNCE, "NOT_SERVING was announced first");
    for connector in &mut connectors {
        connector.signal("TERM");
        let (status, _) = connector
            .wait_exit(STOP_MARGIN)
            .unwrap_or_else(|| panic!("a connector did not exit:\n{}", connector.logs()));
        assert!(status.success(), "connector exit status {status}");
    }

    // Every process flushed its spans on the way out: one trace per
    // exchange, a handful of others, and no library internals.
    let spans = receiver.spans();
    let exchanges: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.kind() == RecordKind::Unspecified)
        .collect();
    let request_traces: HashSet<Vec<u8>> = spans
        .iter()
        .filter(|s| s.span.name == "request_evidence")
        .map(|s| s.span.trace_id.clone())
        .collect();
    let exchange_spans = spans
        .iter()
        .filter(|s| s.span.name == "request_evidence")
        .count();
    assert_eq!(
        exchange_spans,
        exchanges.len(),
        "one request_evidence span per exchange record"
    );
    assert_eq!(request_traces.len(), exchanges.len(), "one trace each");
    let others: Vec<&str> = spans
        .iter()
        .filter(|s| !request_traces.contains(&s.span.trace_id))
        .map(|s| s.span.name.as_str())
        .collect();
    assert!(
        others.len() <= 20,
        "{} spans outside the request traces: {:?}",
        others.len(),
        &others[..others.len().min(40)]
    );
    assert!(
        spans.len() <= exchanges.len() * 12 + 20,
        "{} spans for {} exchanges",
        spans.len(),
        exchanges.len()
    );
    let services: HashSet<(&str, &str)> = spans
        .iter()
        .filter(|s| {
            matches!(
                s.span.name.as_str(),
                "request_evidence" | "provide_evidence"
            )
        })
        .map(|s| (s.service.as_str(), s.span.name.as_str()))
        .collect();
    assert_eq!(
        services,
        HashSet::from([
            ("onceonly-broker", "request_evidence"),
            ("civil-register", "provide_evidence"),
        ]),
        "each process names its own service"
    );
}

/// `CALLERS` authorities' applications ask for evidence until the broker
/// stops; SIGTERM goes out once `2 * CALLERS` answers are in. Returns the
/// exchange ids of the answers with evidence, after checking the process
/// exited cleanly within announce + grace + margin.
async fn under_load_until_stopped(
    installation: &Installation,
    broker: &mut Process,
) -> Vec<String> {
    let started = std::time::Instant::now();
    let answers = Arc::new(AtomicUsize::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for caller in 0..CALLERS {
        let mut client = AuthorityClient::new(
            &installation.pki,
            AUTHORITY,
            installation.channel(broker.addr, Role::Authority, AUTHORITY),
        );
        let (answers, stopped) = (answers.clone(), stopped.clone());
        callers.push(tokio::spawn(async move {
            let mut delivered = Vec::new();
            for n in 0.. {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                // Bounded: a call on a connection the stopping broker
                // left must not keep this caller (and the test) waiting
                // after the process is gone (seen once in CI: the test
                // hung here with the broker exited).
                match tokio::time::timeout(
                    CALL_LIMIT,
                    client.request_evidence(birth_certificate(&format!("load-{caller}-{n}"))),
                )
                .await
                {
                    Ok(Ok(answer)) => {
                        delivered.push(answer.into_inner().exchange_id);
                        answers.fetch_add(1, Ordering::SeqCst);
                    }
                    // Refused while shutting down, or the port is closed:
                    // try again until the process is gone.
                    Ok(Err(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            delivered
        }));
    }
    while answers.load(Ordering::SeqCst) < 2 * CALLERS {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the broker answered {} requests in a minute:\n{}",
            answers.load(Ordering::SeqCst),
            broker.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    broker.signal("TERM");
    let exited = tokio::task::block_in_place(|| broker.wait_exit(ANNOUNCE + GRACE + STOP_MARGIN));
    stopped.store(true, Ordering::SeqCst);
    let Some((status, took)) = exited else {
        panic!(
            "the broker did not exit within {:?} of SIGTERM:\n{}",
            ANNOUNCE + GRACE + STOP_MARGIN,
            broker.logs()
        );
    };
    assert!(status.success(), "exit status {status}:\n{}", broker.logs());
    assert!(
        took >= ANNOUNCE,
        "NOT_SERVING was announced first ({took:?})"
    );
    assert!(
        !broker.logs().contains("did not close after the drain"),
        "the audit log was held past the drain:\n{}",
        broker.logs()
    );
    let mut delivered = Vec::new();
    for caller in callers {
        let caller = tokio::time::timeout(CALL_LIMIT * 2, caller)
            .await
            .expect("a caller still waits after the broker exited");
        delivered.extend(caller.expect("caller"));
    }
    delivered
}

/// One request for Anna's birth certificate as `authority`, on a new
/// connection (so a reloaded CRL applies to it).
async fn ask(
    installation: &Installation,
    broker: &Process,
    authority: &str,
    request_id: &str,
) -> Result<(), tonic::Status> {
    AuthorityClient::new(
        &installation.pki,
        authority,
        installation.channel(broker.addr, Role::Authority, authority),
    )
    .request_evidence(birth_certificate(request_id))
    .await
    .map(drop)
}

/// Every record, as the auditor sees them.
async fn exchange_records(installation: &Installation, broker: &Process) -> Vec<AuditRecord> {
    all_records(installation.channel(broker.addr, Role::Auditor, "datenschutz")).await
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// Exchanges still with a slow register when the grace period ends are cut
/// off with their connections: the broker exits in time, and each one has
/// its record, as cancelled, with the register contacted. (Before, their
/// connections lived on and the stop waited for the broker's last handle.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_that_outlast_the_grace_period_are_cut_off_and_recorded() {
    const SLOW: usize = 3;
    let register_latency = Duration::from_secs(20);
    let installation = Installation::lay_out(Settings {
        shutdown_announce: Duration::ZERO,
        shutdown_grace: Duration::from_secs(1),
        civil_latency: register_latency,
        otlp_endpoint: None,
    });
    let _connectors = start_connectors_and_configure(&installation);
    installation
        .init_broker()
        .unwrap_or_else(|error| panic!("init: {error}"));
    let mut broker = installation.start(BROKER_UNIT, "broker");
    let mut calls = Vec::new();
    for n in 0..SLOW {
        let mut client = AuthorityClient::new(
            &installation.pki,
            AUTHORITY,
            installation.channel(broker.addr, Role::Authority, AUTHORITY),
        );
        calls.push(tokio::spawn(async move {
            let mut request = tonic::Request::new(birth_certificate(&format!("slow-{n}")));
            request.set_timeout(Duration::from_secs(30));
            client.request_evidence(request).await
        }));
    }
    // Until the broker has all of them with the register.
    let admin = broker.admin_addr();
    let waiting = std::time::Instant::now();
    loop {
        let metrics = scrape_metrics(admin).await;
        let in_flight = metrics
            .lines()
            .find_map(|line| line.strip_prefix("onceonly_exchanges_in_flight "))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if in_flight >= SLOW as f64 {
            break;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(30),
            "the exchanges never reached the register:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.signal("TERM");
    let (status, took) =
        tokio::task::block_in_place(|| broker.wait_exit(Duration::from_secs(1) + STOP_MARGIN))
            .unwrap_or_else(|| {
                panic!(
                    "the broker waited for its slow exchanges:\n{}",
                    broker.logs()
                )
            });
    assert!(status.success(), "exit status {status}:\n{}", broker.logs());
    assert!(took < register_latency, "{took:?}");
    assert!(
        !broker.logs().contains("did not close after the drain"),
        "{}",
        broker.logs()
    );
    for call in calls {
        call.await
            .expect("the call's task")
            .expect_err("no evidence for a cut-off exchange");
    }

    let broker = installation.start(BROKER_UNIT, "broker");
    let records = exchange_records(&installation, &broker).await;
    for n in 0..SLOW {
        let request_id = format!("slow-{n}");
        let mine: Vec<&AuditRecord> = records
            .iter()
            .filter(|r| r.request_id == request_id)
            .collect();
        assert_eq!(mine.len(), 1, "{request_id}: {records:?}");
        assert_eq!(
            mine[0].outcome(),
            ExchangeOutcome::Cancelled,
            "{:?}",
            mine[0]
        );
        assert!(mine[0].register_contacted, "{:?}", mine[0]);
    }
}

/// The sample registers started as their unit starts them, and the
/// broker's configuration written to route to them.
fn start_connectors_and_configure(installation: &Installation) -> Vec<Process> {
    let connectors: Vec<Process> = REGISTERS
        .iter()
        .map(|(register, _, _)| installation.start(CONNECTOR_UNIT, register))
        .collect();
    let addresses: Vec<(&str, std::net::SocketAddr)> = REGISTERS
        .iter()
        .zip(&connectors)
        .map(|((register, _, _), process)| (*register, process.addr))
        .collect();
    installation.configure_broker(&addresses);
    connectors
}
