//! The doors closed, tried as an intruder would, over real mutual TLS:
//! unauthenticated floods leave nothing behind, revocation reaches open
//! connections and the connector hop, a stale revocation list is refused,
//! keys are never minted silently, a rotated key keeps the log verifiable,
//! nothing in the data directory names a citizen, and portals are seen.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use onceonly_broker::auditor::verify_remote;
use onceonly_broker::{BoundBroker, BrokerConfig};
use onceonly_certs::Role;
use onceonly_certs::security::RefusalKind;
use onceonly_integration_tests::world::{
    ANNA, AUTHORITIES, BrokerSettings, PORTAL, World, anna, birth_certificate,
};
use onceonly_integration_tests::{anonymous_client_config, channel_with};
use onceonly_proto::status::reason_of;
use onceonly_proto::v1::evidence_service_client::EvidenceServiceClient;
use onceonly_proto::v1::{
    AuditRecord, ErrorReason, ExchangeOutcome, GrantConsentRequest, QueryRecordsRequest, RecordKind,
};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BERLIN: &str = AUTHORITIES[0];
const PATIENCE: Duration = Duration::from_secs(20);

/// Anna's records, as the portal's view of her shows them.
async fn annas_view(world: &World) -> Vec<AuditRecord> {
    onceonly_proto::v1::audit_service_client::AuditServiceClient::new(
        world.channel(Role::Portal, PORTAL),
    )
    .query_records(QueryRecordsRequest {
        subject: Some(anna()),
        page_size: 1000,
        ..Default::default()
    })
    .await
    .expect("the portal reads Anna's view")
    .into_inner()
    .records
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            bytes.extend(all_bytes(&path));
        } else if let Ok(contents) = std::fs::read(&path) {
            bytes.extend(contents);
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn refused_calls(world: &World) -> u64 {
    world
        .running_broker()
        .broker()
        .expect("running")
        .security
        .calls_total()
}

/// A client configuration presenting a self-signed certificate that claims
/// `spiffe://onceonly.test/authority/intruder`.
fn self_signed_intruder(world: &World) -> Arc<rustls::ClientConfig> {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["intruder".into()]).expect("params");
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://onceonly.test/authority/intruder"
            .try_into()
            .expect("uri"),
    ));
    let cert = params.self_signed(&key).expect("self-signed");
    let dir = world.dir.path().join("intruder");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("intruder.pem"), cert.pem()).expect("cert");
    std::fs::write(dir.join("intruder.key"), key.serialize_pem()).expect("key");
    let files = onceonly_certs::TlsFiles::new(
        world.pki.ca_cert_path(),
        dir.join("intruder.pem"),
        dir.join("intruder.key"),
        Some(world.pki.crl_path()),
    );
    onceonly_certs::tls::client_config(&files)
        .expect("client TLS")
        .0
}

#[tokio::test]
async fn a_flood_of_unauthenticated_requests_leaves_no_trace_in_the_log_or_the_citizens_view() {
    const FLOOD: usize = 20;
    let world = World::start().await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("legit-1"))
        .await
        .expect("a legitimate request first");
    world.settle().await;
    let log_before = world.audit_records().await.len();
    let view_before = annas_view(&world).await;
    let refused_before = refused_calls(&world);

    let marker = "flood-purpose-7f3a9c";
    let anonymous = EvidenceServiceClient::new(channel_with(
        anonymous_client_config(&world.pki),
        world.broker_addr(),
        None,
    ));
    let intruder = EvidenceServiceClient::new(channel_with(
        self_signed_intruder(&world),
        world.broker_addr(),
        None,
    ));
    for (n, mut client) in
        (0..FLOOD).flat_map(|n| [(n, anonymous.clone()), (n + FLOOD, intruder.clone())])
    {
        let mut request = birth_certificate(&format!("flood-{n}"));
        request.purpose = format!("{marker}\nwith a newline");
        let status = client
            .request_evidence(request)
            .await
            .expect_err("no valid certificate");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }

    world.settle().await;
    assert_eq!(
        refused_calls(&world) - refused_before,
        2 * FLOOD as u64,
        "every refused call is counted"
    );
    let broker = world.running_broker().broker().expect("running");
    assert_eq!(
        broker.security.calls(RefusalKind::NoCertificate),
        FLOOD as u64
    );
    assert_eq!(
        broker.security.calls(RefusalKind::UntrustedIssuer),
        FLOOD as u64
    );
    // The view is read after the flood: it grew by exactly the record of
    // the read before it (the portal's read is itself recorded).
    let log_after = world.audit_records().await;
    assert_eq!(
        log_after.len(),
        log_before + 1,
        "only the portal's earlier read was added"
    );
    assert!(
        log_after
            .iter()
            .all(|r| !r.request_id.starts_with("flood-"))
    );
    let view_after = annas_view(&world).await;
    assert_eq!(view_after.len(), view_before.len() + 1);
    assert!(
        view_after
            .iter()
            .all(|r| !r.caller_id.contains("intruder") && !r.request_id.starts_with("flood-"))
    );
    assert!(
        !contains(
            &all_bytes(&world.dir.path().join("data")),
            marker.as_bytes()
        ),
        "a field of an unauthenticated request reached the data directory"
    );
}

/// Revokes the current certificate of (`role`, `id`) in the world's PKI.
fn revoke(world: &World, role: Role, id: &str) {
    let cert =
        onceonly_certs::pki::load_certs(&world.pki.participant_paths(role, id).0).expect("cert");
    let serial = onceonly_certs::inspect::CertificateSummary::of(&cert[0])
        .expect("summary")
        .serial;
    assert!(world.pki.revoke(&serial).expect("revoke"));
}

#[tokio::test]
async fn a_revoked_authoritys_open_connection_is_refused_after_reload() {
    let world = World::start().await;
    // One channel: one connection, kept open across the revocation.
    let mut berlin = world.authority(BERLIN);
    berlin
        .request_evidence(birth_certificate("open-1"))
        .await
        .expect("served before revocation");

    revoke(&world, Role::Authority, BERLIN);
    let closed = world.running_broker().reload_tls().expect("reload");
    assert!(
        closed >= 1,
        "the revoked authority's connection stayed open"
    );

    // The same client: its connection is gone; whatever it tries next is
    // refused for the revocation, never served.
    let mut last = None;
    for attempt in 0..5 {
        match berlin
            .request_evidence(birth_certificate(&format!("open-after-{attempt}")))
            .await
        {
            Ok(_) => panic!("a revoked authority received evidence"),
            // The connection the server closed: the channel reconnects.
            Err(status) if matches!(status.code(), Code::Unavailable | Code::Unknown) => {
                last = Some(status)
            }
            Err(status) => {
                last = Some(status);
                break;
            }
        }
    }
    let status = last.expect("an answer");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{}", status.message());
    world.settle().await;
    assert!(
        world
            .audit_records()
            .await
            .iter()
            .all(|r| !(r.request_id.starts_with("open-after-")
                && r.outcome() == ExchangeOutcome::Delivered)),
        "evidence was released after the revocation"
    );
}

#[tokio::test]
async fn a_revoked_connector_is_refused_with_its_own_reason_and_releases_nothing() {
    let world = World::start().await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("before"))
        .await
        .expect("the civil register serves");

    revoke(&world, Role::Connector, "civil-register");
    world.running_broker().reload_tls().expect("reload");

    let status = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("after"))
        .await
        .expect_err("a revoked register is not believed");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::ConnectorRefused));
    assert!(status.message().contains("revoked"), "{}", status.message());
    let records = world.wait_for_records("after", 1, PATIENCE).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].outcome(), ExchangeOutcome::Failed);
    assert!(!records[0].register_contacted);
    assert!(records[0].payload_sha256.is_empty());
}

async fn evidence_health(channel: &tonic::transport::Channel) -> ServingStatus {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "onceonly.v1.EvidenceService".into(),
        })
        .await
        .map(|r| r.into_inner().status())
        .unwrap_or(ServingStatus::Unknown)
}

async fn wait_for_health(channel: &tonic::transport::Channel, wanted: ServingStatus) {
    let waiting = async {
        while evidence_health(channel).await != wanted {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(PATIENCE, waiting)
        .await
        .unwrap_or_else(|_| panic!("health never became {wanted:?}"));
}

#[tokio::test]
async fn a_stale_revocation_list_refuses_every_caller_and_health_says_so() {
    let world = World::start().await;
    // Clients made while the list is fresh keep their own copy of it: the
    // test is about the broker's.
    let health = world.channel(Role::Auditor, "datenschutz");
    let mut berlin = world.authority(BERLIN);
    wait_for_health(&health, ServingStatus::Serving).await;
    world
        .pki
        .refresh_crl(time::OffsetDateTime::now_utc() - time::Duration::minutes(1))
        .expect("a list past its nextUpdate");
    world.running_broker().reload_tls().expect("reload");

    let mut status = None;
    for attempt in 0..5 {
        let refused = berlin
            .request_evidence(birth_certificate(&format!("stale-{attempt}")))
            .await
            .expect_err("nobody can be trusted with a stale list");
        let closed = matches!(refused.code(), Code::Unavailable | Code::Unknown);
        status = Some(refused);
        if !closed {
            break;
        }
    }
    let status = status.expect("an answer");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("revocation list"),
        "{}",
        status.message()
    );
    assert!(
        world
            .running_broker()
            .broker()
            .expect("running")
            .security
            .calls(RefusalKind::CrlStale)
            >= 1
    );
    wait_for_health(&health, ServingStatus::NotServing).await;

    // A fresh list: served again, healthy again.
    world
        .pki
        .refresh_crl(time::OffsetDateTime::now_utc() + time::Duration::days(1))
        .expect("fresh list");
    world.running_broker().reload_tls().expect("reload");
    wait_for_health(&health, ServingStatus::Serving).await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("fresh-1"))
        .await
        .expect("served with a fresh list");
}

#[tokio::test]
async fn with_crl_stale_warn_a_stale_list_is_still_used() {
    let world = World::start_with(BrokerSettings {
        tls: "crl_stale = \"warn\"\n".into(),
        ..BrokerSettings::default()
    })
    .await;
    let health = world.channel(Role::Auditor, "datenschutz");
    let mut berlin = world.authority(BERLIN);
    world
        .pki
        .refresh_crl(time::OffsetDateTime::now_utc() - time::Duration::minutes(1))
        .expect("stale list");
    world.running_broker().reload_tls().expect("reload");
    berlin
        .request_evidence(birth_certificate("warned-1"))
        .await
        .expect("served: the operator chose to warn");
    assert_eq!(evidence_health(&health).await, ServingStatus::Serving);
}

async fn bind_error(world: &World) -> String {
    let config = BrokerConfig::load(&world.config_path).expect("config");
    match BoundBroker::bind(&config).await {
        Ok(_) => panic!("the broker started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn serve_refuses_to_start_without_its_keys_naming_the_file() {
    let mut world = World::start().await;
    world.stop_broker().await;
    let secrets = world.dir.path().join("secrets");
    for key in ["audit.key", "pseudonym.key"] {
        let path = secrets.join(key);
        let saved = std::fs::read(&path).expect("key");
        std::fs::remove_file(&path).expect("remove");
        let message = bind_error(&world).await;
        assert!(
            message.contains(&path.display().to_string()),
            "{key}: {message}"
        );
        assert!(message.contains("onceonly-broker init"), "{message}");
        assert!(!path.exists(), "serve minted {key}");
        std::fs::write(&path, saved).expect("restore");
    }
    world.start_broker().await;
}

#[tokio::test]
async fn serve_refuses_a_replaced_pseudonym_key_naming_the_key_the_data_directory_and_the_fix() {
    let mut world = World::start().await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("pseudonymised-1"))
        .await
        .expect("a record under the first key");
    world.stop_broker().await;
    let config = BrokerConfig::load(&world.config_path).expect("config");
    let saved = std::fs::read(&config.pseudonym_key).expect("key");
    // A well-formed key, but not the one the data directory was made with.
    std::fs::write(
        &config.pseudonym_key,
        format!("{}\n", hex::encode([5u8; 32])),
    )
    .expect("another key");
    let message = bind_error(&world).await;
    for named in [&config.pseudonym_key, &config.data_dir] {
        assert!(
            message.contains(&named.display().to_string()),
            "{} not named: {message}",
            named.display()
        );
    }
    assert!(message.contains("Restore the original"), "{message}");
    std::fs::write(&config.pseudonym_key, saved).expect("restore");
    world.start_broker().await;
    assert!(
        annas_view(&world)
            .await
            .iter()
            .any(|r| r.request_id == "pseudonymised-1"),
        "under the restored key Anna's record is hers again"
    );
}

#[tokio::test]
async fn serve_refuses_a_log_whose_last_head_another_key_signed() {
    let mut world = World::start().await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("signed-1"))
        .await
        .expect("a record");
    world.stop_broker().await;
    let key = world.dir.path().join("secrets/audit.key");
    std::fs::remove_file(&key).expect("remove");
    std::fs::remove_file(world.dir.path().join("secrets/audit.key.pub")).expect("remove pub");
    onceonly_broker::keys::create_audit_key(&key).expect("a new key");
    let message = bind_error(&world).await;
    assert!(message.contains("audit.log"), "{message}");
    assert!(message.contains("does not verify"), "{message}");
    assert!(message.contains("rotate-audit-key"), "{message}");
}

#[tokio::test]
async fn a_rotated_audit_key_keeps_the_log_verifiable_with_either_key() {
    let mut world = World::start().await;
    for n in 0..3 {
        world
            .authority(BERLIN)
            .request_evidence(birth_certificate(&format!("before-{n}")))
            .await
            .expect("served");
    }
    let pub_path = world.dir.path().join("secrets/audit.key.pub");
    let old_key = onceonly_broker::auditor::load_public_key(&pub_path).expect("old key");
    world.stop_broker().await;
    let config = BrokerConfig::load(&world.config_path).expect("config");
    let rotation = onceonly_broker::keys::rotate_audit_key(&config)
        .await
        .expect("rotate");
    assert_eq!(rotation.old_public_key, hex::encode(&old_key));
    let secrets: Vec<String> = std::fs::read_dir(world.dir.path().join("secrets"))
        .expect("secrets")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        secrets
            .iter()
            .all(|name| !name.contains(".next") && !name.contains("retired")),
        "the old key, or the new one's draft, was left behind: {secrets:?}"
    );
    world.start_broker().await;
    for n in 0..3 {
        world
            .authority(BERLIN)
            .request_evidence(birth_certificate(&format!("after-{n}")))
            .await
            .expect("served after the rotation");
    }
    let new_key = onceonly_broker::auditor::load_public_key(&pub_path).expect("new key");
    assert_ne!(new_key, old_key);
    for trusted in [&old_key, &new_key] {
        for recompute in [false, true] {
            let audit = verify_remote(&mut world.auditor(), trusted, None, recompute)
                .await
                .expect("verifies across the hand-over");
            // Three exchanges before and three after the rotation, the
            // hand-over, and the policy's entry at each of the two starts.
            assert_eq!(audit.head.expect("head").tree_size, 9);
        }
        let verified = onceonly_broker::audit::verify_dir(&world.dir.path().join("data"), trusted)
            .expect("verify-dir across the hand-over");
        assert_eq!(verified.records, 9);
    }
    let records = world.audit_records().await;
    assert_eq!(
        records
            .iter()
            .filter(|r| r.kind() == RecordKind::KeyHandover)
            .count(),
        1
    );
    // A key that never signed the log is no anchor.
    let stranger = vec![7u8; 32];
    assert!(
        verify_remote(&mut world.auditor(), &stranger, None, true)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn no_raw_subject_id_anywhere_in_the_data_directory() {
    let world = World::start().await;
    world
        .portal()
        .grant_consent(residence_consent())
        .await
        .expect("grant");
    let mut residence = birth_certificate("residence-1");
    residence.evidence_type = "proof-of-residence".into();
    residence.legal_basis = "Art. 6 Abs. 1 lit. a DSGVO".into();
    world
        .authority(BERLIN)
        .request_evidence(residence)
        .await
        .expect("served with consent");
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("birth-1"))
        .await
        .expect("served");
    let _ = annas_view(&world).await;
    world.settle().await;
    let bytes = all_bytes(&world.dir.path().join("data"));
    assert!(bytes.len() > 1000, "the data directory holds the log");
    for form in [
        ANNA.to_owned(),
        hex::encode(ANNA),
        hex::encode_upper(ANNA),
        "ODIyODE4NjYyMDk".to_owned(), // base64 of the IDNr
    ] {
        assert!(
            !contains(&bytes, form.as_bytes()),
            "Anna's IDNr is readable in the data directory (as {form})"
        );
    }
}

#[tokio::test]
async fn a_portal_calling_the_evidence_service_is_refused() {
    let world = World::start().await;
    let status = EvidenceServiceClient::new(world.channel(Role::Portal, PORTAL))
        .request_evidence(birth_certificate("portal-asks-1"))
        .await
        .expect_err("a portal is not an authority");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::RoleNotPermitted));
    let records = world.wait_for_records("portal-asks-1", 1, PATIENCE).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    let record = &records[0];
    assert_eq!(record.outcome(), ExchangeOutcome::Denied, "{record:#?}");
    assert_eq!(
        record.caller_id,
        format!("spiffe://onceonly.test/portal/{PORTAL}")
    );
    assert!(!record.register_contacted, "{record:#?}");
    assert!(record.payload_sha256.is_empty(), "{record:#?}");
}

fn residence_consent() -> GrantConsentRequest {
    GrantConsentRequest {
        subject: Some(anna()),
        authority_id: format!("spiffe://onceonly.test/authority/{BERLIN}"),
        evidence_type: "proof-of-residence".into(),
        purpose: "parental-allowance".into(),
        expires_at: Some(prost_types::Timestamp {
            seconds: time::OffsetDateTime::now_utc().unix_timestamp() + 86_400,
            nanos: 0,
        }),
    }
}

/// Grants Anna's residence consent for Berlin through the portal.
async fn granted_residence(world: &World) -> onceonly_proto::v1::Consent {
    world
        .portal()
        .grant_consent(residence_consent())
        .await
        .expect("grant")
        .into_inner()
        .consent
        .expect("consent")
}

/// Berlin's request for Anna's proof of residence.
fn residence_request(id: &str) -> onceonly_proto::v1::RequestEvidenceRequest {
    let mut request = birth_certificate(id);
    request.evidence_type = "proof-of-residence".into();
    request.legal_basis = "Art. 6 Abs. 1 lit. a DSGVO".into();
    request
}

/// Runs `edit` on the `consents` tree of the stopped broker's data
/// directory, as someone with the data disk would, and flushes.
fn edit_consents<T>(world: &World, edit: impl FnOnce(&sled::Tree) -> T) -> T {
    let db = sled::open(world.dir.path().join("data")).expect("the stopped broker's sled");
    let tree = db.open_tree("consents").expect("consents");
    let result = edit(&tree);
    db.flush().expect("flush");
    result
}

#[tokio::test]
async fn a_repeated_request_id_gets_no_evidence_once_the_consent_is_revoked() {
    let world = World::start().await;
    let consent = world
        .portal()
        .grant_consent(residence_consent())
        .await
        .expect("grant")
        .into_inner()
        .consent
        .expect("consent");
    let mut residence = birth_certificate("replayed-1");
    residence.evidence_type = "proof-of-residence".into();
    residence.legal_basis = "Art. 6 Abs. 1 lit. a DSGVO".into();
    world
        .authority(BERLIN)
        .request_evidence(residence.clone())
        .await
        .expect("served with consent");
    world
        .portal()
        .revoke_consent(onceonly_proto::v1::RevokeConsentRequest {
            consent_id: consent.consent_id,
        })
        .await
        .expect("revoke");
    let status = world
        .authority(BERLIN)
        .request_evidence(residence)
        .await
        .expect_err("a replay must not outlive the consent");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason_of(&status), Some(ErrorReason::ConsentMissing));
}

#[tokio::test]
async fn a_consent_grant_and_a_portals_read_appear_in_the_subjects_view() {
    let world = World::start().await;
    let granted = world
        .portal()
        .grant_consent(residence_consent())
        .await
        .expect("grant")
        .into_inner()
        .consent
        .expect("consent");
    assert_eq!(
        granted.subject,
        Some(anna()),
        "the consent names its person"
    );
    onceonly_proto::v1::consent_service_client::ConsentServiceClient::new(
        world.channel(Role::Portal, PORTAL),
    )
    .list_consents(onceonly_proto::v1::ListConsentsRequest {
        subject: Some(anna()),
        ..Default::default()
    })
    .await
    .expect("list");
    world
        .portal()
        .revoke_consent(onceonly_proto::v1::RevokeConsentRequest {
            consent_id: granted.consent_id.clone(),
        })
        .await
        .expect("revoke");
    let _first_read = annas_view(&world).await;
    let view = annas_view(&world).await;
    for kind in [
        RecordKind::ConsentGranted,
        RecordKind::ConsentsListed,
        RecordKind::ConsentRevoked,
        RecordKind::HistoryRead,
    ] {
        assert!(
            view.iter().any(|r| r.kind() == kind),
            "{kind:?} missing from Anna's view"
        );
    }
    let portal = format!("spiffe://onceonly.test/portal/{PORTAL}");
    let grant = view
        .iter()
        .find(|r| r.kind() == RecordKind::ConsentGranted)
        .expect("the grant is in Anna's view");
    assert_eq!(grant.caller_id, portal);
    assert_eq!(grant.consent_id, granted.consent_id);
    assert_eq!(
        grant.consent_authority_id,
        format!("spiffe://onceonly.test/authority/{BERLIN}")
    );
    let read = view
        .iter()
        .find(|r| r.kind() == RecordKind::HistoryRead)
        .expect("the portal's earlier read is in Anna's view");
    assert_eq!(read.caller_id, portal);
}

#[tokio::test]
async fn a_portal_scoped_by_the_policy_cannot_record_other_consents() {
    let mut world = World::start().await;
    let policy = std::fs::read_to_string(world.policy_path()).expect("policy");
    std::fs::write(
        world.policy_path(),
        format!(
            "{policy}\n[[portal]]\nid = \"{PORTAL}\"\nevidence_types = [\"vehicle-registration\"]\n"
        ),
    )
    .expect("write");
    world.stop_broker().await;
    world.start_broker().await;
    let status = world
        .portal()
        .grant_consent(residence_consent())
        .await
        .expect_err("outside the portal's scope");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason_of(&status), Some(ErrorReason::PolicyDenied));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_consent_row_written_back_into_the_data_directory_does_not_undo_its_revocation() {
    let mut world = World::start().await;
    let consent = granted_residence(&world).await;
    // Someone with the data disk copies the active consent's row (its MAC
    // is valid for these values forever) while the broker is stopped.
    world.stop_broker().await;
    let active_row = edit_consents(&world, |tree| {
        tree.get(&consent.consent_id)
            .expect("read")
            .expect("the consent's row")
    });
    world.start_broker().await;
    world
        .portal()
        .revoke_consent(onceonly_proto::v1::RevokeConsentRequest {
            consent_id: consent.consent_id.clone(),
        })
        .await
        .expect("revoked");
    world.stop_broker().await;
    edit_consents(&world, |tree| {
        tree.insert(consent.consent_id.as_bytes(), active_row)
            .expect("the old row written back")
    });
    world.start_broker().await;
    let refused = world
        .authority(BERLIN)
        .request_evidence(residence_request("after-write-back"))
        .await
        .expect_err("evidence released on a consent the log has revoked");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::ConsentMissing));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consents_of_a_data_directory_from_before_tags_count_once_the_operator_tags_them() {
    let mut world = World::start().await;
    let consent = granted_residence(&world).await;
    // The row as an older version wrote it: no tag.
    world.stop_broker().await;
    edit_consents(&world, |tree| {
        let bytes = tree
            .get(&consent.consent_id)
            .expect("read")
            .expect("the consent's row");
        let mut row: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        row.as_object_mut().expect("object").remove("mac");
        tree.insert(
            consent.consent_id.as_bytes(),
            serde_json::to_vec(&row).expect("json"),
        )
        .expect("write")
    });
    world.start_broker().await;
    let refused = world
        .authority(BERLIN)
        .request_evidence(residence_request("untagged"))
        .await
        .expect_err("an untagged consent counted");
    assert_eq!(reason_of(&refused), Some(ErrorReason::ConsentMissing));

    // The operator tags them once, the broker stopped, with the binary as
    // it ships.
    world.stop_broker().await;
    let tagged = std::process::Command::new(onceonly_integration_tests::binary(
        "onceonly-broker",
        "onceonly-broker",
    ))
    .args(["tag-consents", "--config"])
    .arg(&world.config_path)
    .output()
    .expect("tag-consents runs");
    assert!(tagged.status.success(), "{tagged:?}");
    assert!(
        String::from_utf8_lossy(&tagged.stdout).starts_with("tagged 1 consents"),
        "{tagged:?}"
    );
    world.start_broker().await;
    world
        .authority(BERLIN)
        .request_evidence(residence_request("tagged"))
        .await
        .expect("the tagged consent counts");
}
