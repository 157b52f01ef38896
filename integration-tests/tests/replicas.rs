//! Broker replicas on PostgreSQL (issue 15), against a real server each
//! test starts for itself: consents and request ids hold across replicas,
//! the replicated Merkle log is one log from any replica, receipts check
//! offline and against the log, and without the database replicas refuse,
//! release nothing, report NOT_SERVING and recover by themselves.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use onceonly_broker::auditor::{ReceiptStatus, check_receipt, load_public_key, verify_remote};
use onceonly_certs::Role;
use onceonly_integration_tests::AuthorityClient;
use onceonly_integration_tests::postgres::TestPostgres;
use onceonly_integration_tests::replicas::{
    MERGE_DELAY_MS, database, grant_residence, replicas, residence,
};
use onceonly_integration_tests::world::{
    AUDITOR, AUTHORITIES, BrokerSettings, PORTAL, World, anna, birth_certificate,
};
use onceonly_merkle::sth::SignedTreeHead;
use onceonly_proto::status::reason_of;
use onceonly_proto::v1::audit_service_client::AuditServiceClient;
use onceonly_proto::v1::consent_service_client::ConsentServiceClient;
use onceonly_proto::v1::{
    ErrorReason, GetInclusionProofRequest, GetSignedTreeHeadRequest, RevokeConsentRequest,
};
use tonic::Code;
use tonic::transport::Channel;

const BERLIN: &str = AUTHORITIES[0];

fn authority(world: &World, addr: SocketAddr) -> AuthorityClient {
    world.authority_at(addr, BERLIN)
}

fn portal(world: &World, addr: SocketAddr) -> ConsentServiceClient<Channel> {
    ConsentServiceClient::new(world.channel_to(addr, Role::Portal, PORTAL))
}

fn auditor(world: &World, addr: SocketAddr) -> AuditServiceClient<Channel> {
    AuditServiceClient::new(world.channel_to(addr, Role::Auditor, AUDITOR))
}

fn audit_public_key(world: &World) -> Vec<u8> {
    load_public_key(&world.dir.path().join("secrets/audit.key.pub")).expect("public key")
}

async fn head_at(world: &World, addr: SocketAddr) -> Option<SignedTreeHead> {
    auditor(world, addr)
        .get_signed_tree_head(GetSignedTreeHeadRequest {})
        .await
        .expect("head")
        .into_inner()
        .tree_head
        .map(|h| onceonly_broker::audit::head_from_proto(&h).expect("well-formed head"))
}

/// Waits (at most `limit`) until the head served at `addr` covers `size`.
async fn head_covering(
    world: &World,
    addr: SocketAddr,
    size: u64,
    limit: Duration,
) -> SignedTreeHead {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(head) = head_at(world, addr).await
            && head.tree_size >= size
        {
            return head;
        }
        assert!(
            Instant::now() < deadline,
            "no head of {size} records within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consents_and_request_ids_hold_across_replicas() {
    let (_postgres, world, others) = replicas(1).await;
    let (a, b) = (world.broker_addr(), others[0].local_addr());

    // Granted through A, enforced at B at once.
    let consent = grant_residence(&world, a, BERLIN).await;
    let delivered = authority(&world, b)
        .request_evidence(residence("across-1"))
        .await
        .expect("B sees the consent granted at A")
        .into_inner();
    assert!(delivered.evidence.is_some());
    // The portal lists it at B too.
    let listed = portal(&world, b)
        .list_consents(onceonly_proto::v1::ListConsentsRequest {
            subject: Some(anna()),
            ..Default::default()
        })
        .await
        .expect("list at B")
        .into_inner();
    assert!(
        listed
            .consents
            .iter()
            .any(|c| c.consent_id == consent.consent_id),
        "{listed:?}"
    );

    // The citizen's view at B shows the exchange answered at B (and reading
    // it is itself recorded, at B, before the answer).
    let deadline = Instant::now() + Duration::from_millis(MERGE_DELAY_MS * 2);
    let view = loop {
        let view = AuditServiceClient::new(world.channel_to(b, Role::Portal, PORTAL))
            .query_records(onceonly_proto::v1::QueryRecordsRequest {
                subject: Some(anna()),
                ..Default::default()
            })
            .await
            .expect("the portal reads Anna's view at B")
            .into_inner()
            .records;
        if view.iter().any(|r| r.request_id == "across-1") || Instant::now() > deadline {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(view.iter().any(|r| r.request_id == "across-1"), "{view:?}");
    assert!(
        view.iter()
            .all(|r| r.subject_pseudonym == view[0].subject_pseudonym),
        "only Anna's records"
    );

    // Revoked through B, enforced at A at once.
    portal(&world, b)
        .revoke_consent(RevokeConsentRequest {
            consent_id: consent.consent_id.clone(),
        })
        .await
        .expect("portal revokes at B");
    let refused = authority(&world, a)
        .request_evidence(residence("across-2"))
        .await
        .expect_err("A sees the revocation made at B");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::ConsentMissing));

    // A request id answered at A is answered at B with the first outcome:
    // the same exchange and the same evidence, not a second exchange.
    let first = authority(&world, a)
        .request_evidence(birth_certificate("same-id-1"))
        .await
        .expect("first at A")
        .into_inner();
    let again = authority(&world, b)
        .request_evidence(birth_certificate("same-id-1"))
        .await
        .expect("repeat at B")
        .into_inner();
    assert_eq!(again.exchange_id, first.exchange_id);
    let (first_evidence, again_evidence) = (
        first.evidence.expect("evidence"),
        again.evidence.expect("evidence"),
    );
    assert_eq!(again_evidence.payload, first_evidence.payload);
    assert_eq!(again_evidence.register_jws, first_evidence.register_jws);
    // What the replicas keep in the database names no citizen and holds
    // no evidence in the clear (outcomes are sealed).
    let db = database(&_postgres).await;
    let mut dump = String::new();
    for table in ["consents", "idempotency", "audit_queue", "audit_leaves"] {
        for row in db
            .query(&format!("SELECT t::text FROM {table} t"), &[])
            .await
            .expect("dump")
        {
            dump.push_str(row.get::<_, &str>(0));
        }
    }
    assert!(dump.contains("same-id-1"), "the dump holds the rows");
    for secret in [
        onceonly_integration_tests::world::ANNA.to_owned(),
        hex::encode(onceonly_integration_tests::world::ANNA),
        hex::encode(&first_evidence.payload),
        hex::encode(&first_evidence.payload[..16]),
    ] {
        assert!(!dump.contains(&secret), "{secret} is in the database");
    }
    // Reused for something else at B: refused.
    let mut other = birth_certificate("same-id-1");
    other.purpose = "something-else".into();
    let reused = authority(&world, b)
        .request_evidence(other)
        .await
        .expect_err("same id, other request");
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");

    // Both the first and the repeat are audited, once each, in the one log.
    let deadline = Instant::now() + Duration::from_millis(MERGE_DELAY_MS * 2);
    let mut records = world.audit_records().await;
    while of_count(&records, "same-id-1") < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        records = world.audit_records().await;
    }
    assert_eq!(
        of_count(&records, "same-id-1"),
        3,
        "first, repeat and conflict"
    );
    assert_eq!(of_count(&records, "across-1"), 1);
}

fn of_count(records: &[onceonly_proto::v1::AuditRecord], id: &str) -> usize {
    records.iter().filter(|r| r.request_id == id).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_check_offline_and_against_the_log_served_by_any_replica() {
    let (_postgres, world, others) = replicas(1).await;
    let (a, b) = (world.broker_addr(), others[0].local_addr());
    let key = audit_public_key(&world);

    let mut receipts = Vec::new();
    for n in 0..20 {
        let addr = if n % 2 == 0 { a } else { b };
        let answer = authority(&world, addr)
            .request_evidence(birth_certificate(&format!("receipt-{n}")))
            .await
            .expect("delivered")
            .into_inner();
        assert_eq!(
            answer.audit_log_index, 0,
            "replicas answer before sequencing"
        );
        let receipt = answer.audit_receipt.expect("a receipt with every answer");
        // Offline: the signature and the batch path hold.
        let checked = onceonly_broker::audit::receipt::verify(&receipt, &key).expect("verifies");
        assert_eq!(
            checked.include_by_ms - checked.committed_at_ms,
            MERGE_DELAY_MS,
            "the promise is the merge delay"
        );
        receipts.push(receipt);
    }
    // A receipt altered in any part no longer verifies.
    let mut forged = receipts[0].clone();
    forged.include_by = Some(onceonly_proto::time::timestamp(i64::MAX / 4));
    assert!(onceonly_broker::audit::receipt::verify(&forged, &key).is_err());
    let mut moved = receipts[0].clone();
    moved.leaf_hash = receipts[1].leaf_hash.clone();
    assert!(onceonly_broker::audit::receipt::verify(&moved, &key).is_err());

    // Within the merge delay every receipt's record is in a signed head,
    // provable at either replica, and the head was signed by its deadline.
    let head = head_covering(&world, b, 20, Duration::from_millis(MERGE_DELAY_MS * 2)).await;
    for (n, receipt) in receipts.iter().enumerate() {
        let addr = if n % 2 == 0 { b } else { a };
        match check_receipt(&mut auditor(&world, addr), &key, receipt)
            .await
            .expect("receipt checks against the log")
        {
            ReceiptStatus::Included { head: proven, .. } => {
                assert!(proven.tree_size >= 20);
            }
            ReceiptStatus::Pending { .. } => panic!("receipt {n} not included in {head:?}"),
        }
    }
    let first_included = {
        let proof = auditor(&world, a)
            .get_inclusion_proof(GetInclusionProofRequest {
                tree_size: head.tree_size,
                leaf_hash: receipts[0].leaf_hash.clone(),
                ..Default::default()
            })
            .await
            .expect("proof by hash")
            .into_inner();
        proof.leaf_index
    };
    let entries = world
        .running_broker()
        .broker()
        .expect("running")
        .audit
        .clone();
    let committed = entries
        .entries(first_included, 1)
        .await
        .expect("entry")
        .pop()
        .expect("one");
    assert_eq!(
        onceonly_merkle::leaf_hash(&committed.2).to_vec(),
        receipts[0].leaf_hash,
        "the proof by hash names the receipt's record"
    );

    // A leaf hash the log does not hold: NOT_FOUND; a malformed one:
    // INVALID_ARGUMENT.
    let missing = auditor(&world, a)
        .get_inclusion_proof(GetInclusionProofRequest {
            tree_size: head.tree_size,
            leaf_hash: vec![7; 32],
            ..Default::default()
        })
        .await
        .expect_err("no such leaf");
    assert_eq!(missing.code(), Code::NotFound);
    let malformed = auditor(&world, a)
        .get_inclusion_proof(GetInclusionProofRequest {
            tree_size: head.tree_size,
            leaf_hash: vec![7; 5],
            ..Default::default()
        })
        .await
        .expect_err("not a hash");
    assert_eq!(malformed.code(), Code::InvalidArgument);

    // The whole log verifies from either replica, as `onceonly-audit
    // verify` does it: head signature, every entry re-hashed, and each
    // replica's head consistent with the other's.
    let from_a = verify_remote(&mut auditor(&world, a), &key, None, true)
        .await
        .expect("verifies at A");
    let from_b = verify_remote(&mut auditor(&world, b), &key, from_a.head.as_ref(), true)
        .await
        .expect("verifies at B, extending A's head");
    assert!(from_b.consistent_with_saved);
    assert!(from_b.entries_checked >= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_postgres_replicas_refuse_release_nothing_and_recover() {
    let (postgres, world, others) = replicas(1).await;
    let (a, b) = (world.broker_addr(), others[0].local_addr());
    authority(&world, a)
        .request_evidence(birth_certificate("before-outage"))
        .await
        .expect("delivered before the outage");

    let postgres = tokio::task::spawn_blocking(move || {
        postgres.stop().expect("stops");
        postgres
    })
    .await
    .expect("join");

    for (n, addr) in [a, b].into_iter().enumerate() {
        let refused = authority(&world, addr)
            .request_evidence(birth_certificate(&format!("during-outage-{n}")))
            .await
            .expect_err("no evidence without its record");
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert_eq!(reason_of(&refused), Some(ErrorReason::AuditUnavailable));
    }
    for addr in [a, b] {
        wait_for_health(&world, addr, false).await;
    }
    // A load balancer's HTTP check sees it too.
    let admin = [
        world.admin_addr(),
        others[0].admin_addr().expect("admin listener"),
    ];
    for addr in admin {
        assert_eq!(
            onceonly_integration_tests::http_status(addr, "/ready").await,
            503
        );
    }

    let _postgres = tokio::task::spawn_blocking(move || {
        postgres.start_again().expect("starts again");
        postgres
    })
    .await
    .expect("join");
    for addr in [a, b] {
        wait_for_health(&world, addr, true).await;
    }
    for addr in admin {
        assert_eq!(
            onceonly_integration_tests::http_status(addr, "/ready").await,
            200
        );
    }
    for (n, addr) in [a, b].into_iter().enumerate() {
        let answer = authority(&world, addr)
            .request_evidence(birth_certificate(&format!("after-outage-{n}")))
            .await
            .expect("serving again")
            .into_inner();
        assert!(answer.audit_receipt.is_some());
    }
    // Nothing from the outage is in the log; everything answered is (with
    // the policy entries of the replicas' starts).
    let policy_entries = world
        .audit_records()
        .await
        .iter()
        .filter(|r| r.kind() == onceonly_proto::v1::RecordKind::PolicyApplied)
        .count() as u64;
    let head = head_covering(
        &world,
        a,
        3 + policy_entries,
        Duration::from_millis(MERGE_DELAY_MS * 2),
    )
    .await;
    let records = world.audit_records().await;
    assert_eq!(head.tree_size as usize, records.len());
    for id in ["before-outage", "after-outage-0", "after-outage-1"] {
        assert_eq!(of_count(&records, id), 1, "{id}");
    }
    for id in ["during-outage-0", "during-outage-1"] {
        assert_eq!(of_count(&records, id), 0, "{id} was refused, unrecorded");
    }
}

/// Waits (at most 20 s) until the broker at `addr` reports `serving`.
async fn wait_for_health(world: &World, addr: SocketAddr, serving: bool) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let wanted = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = HealthClient::new(world.channel_to(addr, Role::Auditor, AUDITOR))
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status());
        if status.as_ref().is_ok_and(|s| *s == wanted) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} did not report {wanted:?} within 20 s (last {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_stay_consistent_when_the_sequencers_connections_are_cut_mid_batch() {
    let (postgres, world, others) = replicas(1).await;
    let addrs = [world.broker_addr(), others[0].local_addr()];
    let (client, connection) =
        tokio_postgres::connect(&postgres.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connects");
    tokio::spawn(connection);

    // Load on both replicas while the sequencer's connections are killed
    // again and again; every head either replica serves is recorded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut client = authority(&world, addrs[w % 2]);
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("cut-{w}-{n}");
                n += 1;
                if let Ok(answer) = client.request_evidence(birth_certificate(&id)).await {
                    acknowledged.push((id, answer.into_inner().audit_receipt));
                }
            }
            acknowledged
        }));
    }
    let mut heads: Vec<SignedTreeHead> = Vec::new();
    let started = Instant::now();
    let mut cuts = 0;
    let mut round = 0u64;
    let replicated: Vec<_> = [world.running_broker(), &others[0]]
        .iter()
        .map(|r| r.broker().expect("running").audit.clone())
        .collect();
    let failed_runs = || {
        replicated
            .iter()
            .map(|r| r.replica_gauges().expect("replicated").failed_runs)
            .sum::<u64>()
    };
    // Until a sequencing run was cut (at least 4 s of it, at most 60).
    while started.elapsed() < Duration::from_secs(4)
        || (failed_runs() == 0 && started.elapsed() < Duration::from_secs(60))
    {
        // The sequencers' sessions (the sequencer candidates' and probes'
        // own pool), caught running a statement or between the statements
        // of a sequencing transaction.
        let killed: i64 = client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = 'onceonly-broker-sequencer'
                   AND state IN ('active', 'idle in transaction')",
                &[],
            )
            .await
            .expect("terminate")
            .get(0);
        cuts += killed;
        round += 1;
        // Heads now and then (each read is a new connection).
        for addr in addrs.iter().copied().filter(|_| round.is_multiple_of(4)) {
            if let Ok(mut audit) = auditor(&world, addr)
                .get_signed_tree_head(GetSignedTreeHeadRequest {})
                .await
                .map(|r| r.into_inner().tree_head)
                && let Some(head) = audit.take()
            {
                heads.push(onceonly_broker::audit::head_from_proto(&head).expect("head"));
            }
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.expect("writer"));
    }
    assert!(cuts > 0, "no backend was cut");
    assert!(failed_runs() > 0, "no sequencing run was cut");
    assert!(!acknowledged.is_empty(), "nothing was answered");

    // Every acknowledged request is in a head within the merge delay:
    // the queue drains (records committed without an answer, their
    // connection cut, are sequenced too).
    let deadline = Instant::now() + Duration::from_millis(MERGE_DELAY_MS * 2);
    loop {
        let queued: i64 = client
            .query_one("SELECT count(*) FROM audit_queue", &[])
            .await
            .expect("queue")
            .get(0);
        if queued == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{queued} records never sequenced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let final_head = head_covering(
        &world,
        addrs[0],
        acknowledged.len() as u64,
        Duration::from_millis(MERGE_DELAY_MS * 2),
    )
    .await;
    heads.push(final_head.clone());
    let key = audit_public_key(&world);
    let records = world.audit_records().await;
    for (id, receipt) in &acknowledged {
        assert_eq!(of_count(&records, id), 1, "{id}: exactly one record");
        let receipt = receipt.as_ref().expect("receipt");
        assert!(matches!(
            check_receipt(&mut auditor(&world, addrs[1]), &key, receipt).await,
            Ok(ReceiptStatus::Included { .. })
        ));
    }
    // No fork: one root per size, and each head is consistent with every
    // later one (proven by the replica that did not serve it).
    onceonly_integration_tests::assert_one_history(&mut auditor(&world, addrs[1]), &key, heads)
        .await;
    verify_remote(&mut auditor(&world, addrs[0]), &key, None, true)
        .await
        .expect("the whole log verifies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_into_the_database_by_anyone_but_a_replica_do_not_count() {
    let (postgres, world, others) = replicas(1).await;
    let (a, b) = (world.broker_addr(), others[0].local_addr());
    let db = database(&postgres).await;

    // An intruder with write access to the database copies a real consent
    // row (granted for another authority) and rewrites it for Berlin: the
    // replicas do not honour it.
    let granted = grant_residence(&world, a, AUTHORITIES[1]).await;
    db.execute(
        "INSERT INTO consents
         SELECT 'cns-forged', subject_scheme, subject_pseudonym, subject_sealed,
                'spiffe://onceonly.test/authority/' || $2, evidence_type, purpose,
                granted_at_ms, expires_at_ms, revoked_at_ms, recorded_by, mac
         FROM consents WHERE consent_id = $1",
        &[&granted.consent_id, &BERLIN],
    )
    .await
    .expect("forged row");
    let refused = authority(&world, b)
        .request_evidence(residence("forged-consent-1"))
        .await
        .expect_err("a forged consent row is no consent");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::ConsentMissing));
    // Un-revoking a revoked consent by clearing its revocation: refused too.
    let own = grant_residence(&world, a, BERLIN).await;
    portal(&world, b)
        .revoke_consent(RevokeConsentRequest {
            consent_id: own.consent_id.clone(),
        })
        .await
        .expect("revoke");
    db.execute(
        "UPDATE consents SET revoked_at_ms = NULL WHERE consent_id = $1",
        &[&own.consent_id],
    )
    .await
    .expect("un-revoke");
    let refused = authority(&world, a)
        .request_evidence(residence("forged-consent-2"))
        .await
        .expect_err("an altered consent row is no consent");
    assert_eq!(reason_of(&refused), Some(ErrorReason::ConsentMissing));

    // An intruder writes an audit record straight into the queue: the
    // sequencer sets it aside and signs only what replicas committed.
    authority(&world, a)
        .request_evidence(birth_certificate("genuine-1"))
        .await
        .expect("delivered");
    let forged = prost::Message::encode_to_vec(&onceonly_proto::v1::AuditRecord {
        exchange_id: "ex-forged".into(),
        request_id: "forged-record".into(),
        caller_id: format!("spiffe://onceonly.test/authority/{BERLIN}"),
        ..Default::default()
    });
    db.execute(
        "INSERT INTO audit_queue (replica, leaf_hash, record, mac, queued_at_ms)
         VALUES ('intruder', $1, $2, $3, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)",
        &[
            &onceonly_merkle::leaf_hash(&forged).as_slice(),
            &forged,
            &vec![0u8; 32],
        ],
    )
    .await
    .expect("forged queue row");
    authority(&world, b)
        .request_evidence(birth_certificate("genuine-2"))
        .await
        .expect("delivered");
    let deadline = Instant::now() + Duration::from_millis(MERGE_DELAY_MS * 2);
    let quarantined = loop {
        let rows: i64 = db
            .query_one(
                "SELECT count(*) FROM audit_quarantine WHERE replica = 'intruder'",
                &[],
            )
            .await
            .expect("quarantine")
            .get(0);
        if rows > 0 {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "the forged row was never set aside"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(quarantined, 1);
    world
        .wait_for_records("genuine-2", 1, Duration::from_millis(MERGE_DELAY_MS * 2))
        .await;
    let records = world.audit_records().await;
    assert_eq!(
        of_count(&records, "forged-record"),
        0,
        "signed into the log"
    );
    let head = head_covering(&world, b, 1, Duration::from_secs(5)).await;
    let leaves = head.tree_size as usize;
    assert_eq!(leaves, records.len());
    verify_remote(
        &mut auditor(&world, a),
        &audit_public_key(&world),
        None,
        true,
    )
    .await
    .expect("the log verifies without it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_sequencer_replicas_give_no_receipt_and_resume_with_one() {
    let (postgres, world, others) = replicas(1).await;
    let (a, b) = (world.broker_addr(), others[0].local_addr());
    authority(&world, a)
        .request_evidence(birth_certificate("before-stall"))
        .await
        .expect("delivered");
    // Sequenced: the lease row exists.
    head_covering(&world, a, 1, Duration::from_millis(MERGE_DELAY_MS * 2)).await;
    // Hold the lease row's lock, as a sequencer whose host died inside its
    // transaction would: no replica can sequence.
    let mut db = database(&postgres).await;
    let holder = db.transaction().await.expect("transaction");
    let locked = holder
        .execute("SELECT * FROM sequencer_lease FOR UPDATE", &[])
        .await
        .expect("lock");
    assert_eq!(locked, 1, "the lease row is locked");
    // A record committed now would wait past any failover: the replicas
    // notice, refuse (no receipt they could not keep) and stop serving.
    let _ = authority(&world, b)
        .request_evidence(birth_certificate("stalled-0"))
        .await;
    for addr in [a, b] {
        wait_for_health(&world, addr, false).await;
    }
    let refused = authority(&world, a)
        .request_evidence(birth_certificate("stalled-1"))
        .await
        .expect_err("no receipt while nothing sequences");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::AuditUnavailable));

    // The lock goes (the server ends a dead session's idle transaction
    // after storage.sequencer_lease): sequencing resumes by itself.
    holder.rollback().await.expect("release");
    for addr in [a, b] {
        wait_for_health(&world, addr, true).await;
    }
    let answer = authority(&world, b)
        .request_evidence(birth_certificate("after-stall"))
        .await
        .expect("serving again")
        .into_inner();
    assert!(answer.audit_receipt.is_some());
    let after = world
        .wait_for_records("after-stall", 1, Duration::from_millis(MERGE_DELAY_MS * 2))
        .await;
    assert_eq!(after.len(), 1);
    let records = world.audit_records().await;
    assert_eq!(of_count(&records, "stalled-1"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_holds_across_replicas() {
    let (_postgres, mut world, _others) = replicas(0).await;
    // Berlin may make 3 requests at once, then 1 a minute, wherever they
    // land.
    let policy = std::fs::read_to_string(world.policy_path()).expect("policy");
    std::fs::write(
        world.policy_path(),
        format!(
            "{policy}\n[[quota]]\nid = \"berlin\"\ncallers = [\"{BERLIN}\"]\nper_minute = 1\nburst = 3\n"
        ),
    )
    .expect("policy");
    world.stop_broker().await;
    world.start_broker().await;
    let other = world.start_replica(1).await;
    let (a, b) = (world.broker_addr(), other.local_addr());
    for (n, addr) in [a, b, a].into_iter().enumerate() {
        authority(&world, addr)
            .request_evidence(birth_certificate(&format!("quota-{n}")))
            .await
            .unwrap_or_else(|e| panic!("request {n} is within the burst: {e:?}"));
    }
    for (n, addr) in [b, a].into_iter().enumerate() {
        let over = authority(&world, addr)
            .request_evidence(birth_certificate(&format!("over-quota-{n}")))
            .await
            .expect_err("the burst is used up across both replicas");
        assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
        assert_eq!(reason_of(&over), Some(ErrorReason::QuotaExceeded));
        let retry = onceonly_proto::status::retry_after(&over).expect("RetryInfo");
        assert!(
            retry > Duration::from_secs(30) && retry <= Duration::from_secs(60),
            "{retry:?}"
        );
    }
    // Another authority has no quota and is not affected.
    world
        .authority_at(b, AUTHORITIES[1])
        .request_evidence(birth_certificate("other-authority"))
        .await
        .expect("other callers are not limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directorys_log_and_consents_move_into_postgres_with_their_signed_history() {
    // A broker on its embedded data directory, with history and a consent.
    let mut world = World::start().await;
    let a = world.broker_addr();
    grant_residence(&world, a, BERLIN).await;
    for id in ["before-move-1", "before-move-2"] {
        authority(&world, a)
            .request_evidence(birth_certificate(id))
            .await
            .expect("delivered");
    }
    let key = audit_public_key(&world);
    let saved = verify_remote(&mut auditor(&world, a), &key, None, true)
        .await
        .expect("verifies")
        .head
        .expect("a head");
    world.stop_broker().await;

    // Moved into PostgreSQL.
    let postgres = tokio::task::spawn_blocking(TestPostgres::start)
        .await
        .expect("join")
        .expect("PostgreSQL starts");
    let text = std::fs::read_to_string(&world.config_path).expect("config");
    std::fs::write(
        &world.config_path,
        format!(
            "{text}\n[storage]\nbackend = \"postgres\"\nurl = \"{}\"\nmerge_delay = \"{MERGE_DELAY_MS}ms\"\n",
            postgres.url("postgres")
        ),
    )
    .expect("config");
    let config = onceonly_broker::BrokerConfig::load(&world.config_path).expect("config");
    // An intruder in the data directory forges a consent for another
    // authority from the genuine row: the move refuses it before writing
    // anything (PostgreSQL's store would otherwise tag it as genuine).
    let data_dir = config.data_dir.clone();
    let forge = |forging: bool| {
        let db = sled::open(&data_dir).expect("the stopped broker's sled");
        let tree = db.open_tree("consents").expect("consents");
        if forging {
            let (_, genuine) = tree.iter().next().expect("a consent").expect("read");
            let mut row: serde_json::Value = serde_json::from_slice(&genuine).expect("json");
            row["consent_id"] = "cns-forged".into();
            row["authority_id"] = "spiffe://onceonly.test/authority/intruder".into();
            tree.insert("cns-forged", serde_json::to_vec(&row).expect("json"))
                .expect("forged");
        } else {
            tree.remove("cns-forged").expect("removed");
        }
        db.flush().expect("flush");
    };
    forge(true);
    let refused = onceonly_broker::storage::move_to_postgres(&config)
        .await
        .expect_err("a forged consent is moved");
    assert!(
        matches!(
            &refused,
            onceonly_broker::storage::MoveError::Unauthentic(_)
        ) && refused.to_string().contains("cns-forged"),
        "{refused}"
    );
    let tables: i64 = database(&postgres)
        .await
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await
        .expect("tables")
        .get(0);
    assert_eq!(tables, 0, "a refused move wrote into PostgreSQL");
    forge(false);
    let moved = onceonly_broker::storage::move_to_postgres(&config)
        .await
        .expect("moves");
    assert_eq!(moved.records, saved.tree_size);
    assert_eq!(moved.consents, 1);
    // Run again (as after a failure half-way), it finds the same log there
    // and completes nothing twice.
    let again = onceonly_broker::storage::move_to_postgres(&config)
        .await
        .expect("a rerun of the same move");
    assert_eq!(again.records, moved.records);

    // A replica on it: the moved consent holds, the log goes on, and the
    // head saved before the move is provably part of it.
    world.start_broker().await;
    let a = world.broker_addr();
    authority(&world, a)
        .request_evidence(residence("after-move"))
        .await
        .expect("the moved consent is honoured");
    world
        .wait_for_records("after-move", 1, Duration::from_millis(MERGE_DELAY_MS * 2))
        .await;
    let audit = verify_remote(&mut auditor(&world, a), &key, Some(&saved), true)
        .await
        .expect("the moved log verifies and extends the saved head");
    assert!(audit.consistent_with_saved);
    assert!(audit.head.expect("head").tree_size > saved.tree_size);
    let records = world.audit_records().await;
    for id in ["before-move-1", "before-move-2", "after-move"] {
        assert_eq!(of_count(&records, id), 1, "{id}");
    }
    let consents: i64 = database(&postgres)
        .await
        .query_one("SELECT count(*) FROM consents", &[])
        .await
        .expect("consents")
        .get(0);
    assert_eq!(consents, 1, "the rerun added no second copy");
    // Once the replicas' log has gone on, no data directory is moved in.
    let late = onceonly_broker::storage::move_to_postgres(&config)
        .await
        .expect_err("the target holds more than that log");
    assert!(late.to_string().contains("not empty"), "{late}");
    drop(postgres);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_other_keys_than_the_others_refuses_to_start() {
    let (_postgres, world, _others) = replicas(0).await;
    // Another pseudonym key, made as `init` makes keys.
    let text = std::fs::read_to_string(&world.config_path).expect("config");
    let stranger = world.dir.path().join("stranger.toml");
    std::fs::write(
        &stranger,
        text.replace("secrets/pseudonym.key", "secrets/other-pseudonym.key")
            .replace("secrets/audit.key", "secrets/other-audit.key")
            .replacen("data_dir = \"data\"", "data_dir = \"data-stranger\"", 1),
    )
    .expect("config");
    let config = onceonly_broker::BrokerConfig::load(&stranger).expect("config");
    onceonly_broker::keys::init(&config).expect("other keys");
    for (file, which) in [
        (
            text.replace("secrets/pseudonym.key", "secrets/other-pseudonym.key"),
            "pseudonym_key",
        ),
        (
            text.replace("secrets/audit.key", "secrets/other-audit.key"),
            "audit_key",
        ),
    ] {
        std::fs::write(
            &stranger,
            file.replacen(
                "data_dir = \"data\"",
                &format!("data_dir = \"data-{which}\""),
                1,
            ),
        )
        .expect("config");
        let config = onceonly_broker::BrokerConfig::load(&stranger).expect("config");
        let refused = match onceonly_broker::BoundBroker::bind(&config).await {
            Ok(_) => panic!("a replica with another {which} started"),
            Err(e) => e.to_string(),
        };
        assert!(
            refused.contains(which) && refused.contains("same"),
            "{which}: {refused}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_lost_signed_history_is_refused() {
    let (postgres, world, _others) = replicas(0).await;
    let a = world.broker_addr();
    for batch in 0..2 {
        authority(&world, a)
            .request_evidence(birth_certificate(&format!("history-{batch}")))
            .await
            .expect("delivered");
        head_covering(
            &world,
            a,
            batch + 1,
            Duration::from_millis(MERGE_DELAY_MS * 2),
        )
        .await;
    }
    // As a failover to a standby that lagged, or a restore of an older
    // backup, would: the latest head and its records are gone.
    let db = database(&postgres).await;
    db.batch_execute(
        "DELETE FROM audit_heads WHERE tree_size = (SELECT max(tree_size) FROM audit_heads);
         DELETE FROM audit_nodes WHERE level > 0;
         DELETE FROM audit_leaves WHERE log_index >= (SELECT max(tree_size) FROM audit_heads);",
    )
    .await
    .expect("history lost");
    wait_for_health(&world, a, false).await;
    let refused = authority(&world, a)
        .request_evidence(birth_certificate("after-loss"))
        .await
        .expect_err("no evidence on a history that lost answered records");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::AuditUnavailable));
    let heads: i64 = db
        .query_one("SELECT count(*) FROM audit_heads", &[])
        .await
        .expect("heads")
        .get(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later: i64 = db
        .query_one("SELECT count(*) FROM audit_heads", &[])
        .await
        .expect("heads")
        .get(0);
    assert_eq!(
        heads, later,
        "the sequencer signed on over the lost history"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_reach_postgres_over_verified_tls_only() {
    let postgres = tokio::task::spawn_blocking(|| {
        let postgres = TestPostgres::start()?;
        let ca = postgres.enable_tls(true)?;
        Ok::<_, anyhow::Error>((postgres, ca))
    })
    .await
    .expect("join");
    let (postgres, ca) = postgres.expect("PostgreSQL with TLS starts");
    let dir = tempfile::tempdir().expect("dir");
    let ca_path = dir.path().join("postgres-ca.pem");
    std::fs::write(&ca_path, ca).expect("ca");
    let world = World::start_with(BrokerSettings {
        sections: format!(
            "[storage]\nbackend = \"postgres\"\nurl = \"{}\"\nca = {:?}\nmerge_delay = \"{MERGE_DELAY_MS}ms\"\n",
            postgres.url("postgres"),
            ca_path
        ),
        ..Default::default()
    })
    .await;
    let answer = authority(&world, world.broker_addr())
        .request_evidence(birth_certificate("over-tls"))
        .await
        .expect("served over TLS to PostgreSQL")
        .into_inner();
    assert!(answer.audit_receipt.is_some());
    // Every session of the replica is TLS 1.3.
    let db = database_over_tls(&postgres, &ca_path).await;
    let plain: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name LIKE 'onceonly-broker%' AND (NOT s.ssl OR s.version <> 'TLSv1.3')",
            &[],
        )
        .await
        .expect("sessions")
        .get(0);
    assert_eq!(plain, 0, "a replica session without TLS 1.3");

    // Without the CA (plaintext), and with another CA: a replica does not
    // start, and says why.
    let text = std::fs::read_to_string(&world.config_path).expect("config");
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(
        &other_ca,
        rcgen::CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .self_signed(&rcgen::KeyPair::generate().expect("key"))
            .expect("cert")
            .pem(),
    )
    .expect("other ca");
    for (variant, expected) in [
        (
            text.replace(&format!("ca = {ca_path:?}\n"), ""),
            "no encryption",
        ),
        (
            text.replace(&format!("{ca_path:?}"), &format!("{other_ca:?}")),
            "certificate",
        ),
    ] {
        let path = world.dir.path().join("broker-variant.toml");
        std::fs::write(
            &path,
            variant.replacen("data_dir = \"data\"", "data_dir = \"data-variant\"", 1),
        )
        .expect("config");
        let config = onceonly_broker::BrokerConfig::load(&path).expect("config");
        let refused = match onceonly_broker::BoundBroker::bind(&config).await {
            Ok(_) => panic!("a replica started with {expected:?} expected"),
            Err(e) => e.to_string(),
        };
        assert!(
            refused.to_lowercase().contains(expected),
            "{expected}: {refused}"
        );
    }
}

async fn database_over_tls(
    postgres: &TestPostgres,
    ca: &std::path::Path,
) -> tokio_postgres::Client {
    let tls = onceonly_certs::tls::external_client_config(ca, None).expect("tls");
    let mut config: tokio_postgres::Config = postgres.url("postgres").parse().expect("url");
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = config
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(
            tls.as_ref().clone(),
        ))
        .await
        .expect("connects over TLS");
    tokio::spawn(connection);
    client
}
