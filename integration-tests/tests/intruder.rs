//! An intruder in the replicas' PostgreSQL database (THREAT_MODEL, issue
//! 23): someone who can create triggers on the tables, without the keys
//! the replicas hold. Each test installs a trigger that makes a write the
//! replicas depend on store nothing, or something else, while PostgreSQL
//! reports success, and checks that the replicas notice: the caller is
//! refused with the status and reason named here, and nothing is released
//! or reported done that the database did not keep.

use std::time::{Duration, Instant};

use onceonly_integration_tests::replicas::{
    MERGE_DELAY_MS, database, grant_residence, replicas, residence,
};
use onceonly_integration_tests::world::{AUTHORITIES, birth_certificate};
use onceonly_proto::status::reason_of;
use onceonly_proto::v1::{
    AuditRecord, ErrorReason, GrantConsentRequest, RecordKind, RevokeConsentRequest,
};
use tonic::Code;

const BERLIN: &str = AUTHORITIES[0];

/// A trigger function that makes the row's write a no-op: PostgreSQL skips
/// the row and reports success.
const DROP_ROW: &str =
    "CREATE FUNCTION onceonly_drop() RETURNS trigger AS 'BEGIN RETURN NULL; END' LANGUAGE plpgsql";

/// The records of `kind` about consent `consent_id`, in log order, once
/// there are at least `count` (waiting at most two merge delays).
async fn consent_records(
    world: &onceonly_integration_tests::world::World,
    kind: RecordKind,
    consent_id: &str,
    count: usize,
) -> Vec<AuditRecord> {
    let deadline = Instant::now() + Duration::from_millis(MERGE_DELAY_MS * 2);
    loop {
        let records: Vec<AuditRecord> = world
            .audit_records()
            .await
            .into_iter()
            .filter(|r| r.kind() == kind && r.consent_id == consent_id)
            .collect();
        if records.len() >= count || Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_queue_that_drops_rows_gets_refusals_and_releases_no_evidence() {
    let (postgres, world, _) = replicas(0).await;
    let db = database(&postgres).await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("before-trigger"))
        .await
        .expect("delivered while the queue stores rows");

    db.batch_execute(&format!(
        "{DROP_ROW};
         CREATE TRIGGER drop_queue BEFORE INSERT ON audit_queue
           FOR EACH ROW EXECUTE FUNCTION onceonly_drop();"
    ))
    .await
    .expect("the intruder's trigger");
    let refused = match world
        .authority(BERLIN)
        .request_evidence(birth_certificate("while-dropped"))
        .await
    {
        Ok(answer) => panic!(
            "evidence released while its record was dropped: receipt {:?}",
            answer.into_inner().audit_receipt
        ),
        Err(status) => status,
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::AuditUnavailable));

    // Without the trigger the same replica delivers again, at once.
    db.batch_execute("DROP TRIGGER drop_queue ON audit_queue")
        .await
        .expect("drop the trigger");
    let answer = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("after-trigger"))
        .await
        .expect("delivered once the queue stores rows again")
        .into_inner();
    assert!(answer.evidence.is_some());
    let receipt = answer.audit_receipt.expect("a receipt");
    let now_s = onceonly_proto::time::now_ms() / 1000;
    assert!(
        receipt
            .committed_at
            .is_some_and(|t| (t.seconds - now_s).abs() < 60),
        "committed now, by the database's clock: {receipt:?}"
    );

    // The log holds what was answered, and nothing of the refusal.
    world
        .wait_for_records(
            "after-trigger",
            1,
            Duration::from_millis(MERGE_DELAY_MS * 2),
        )
        .await;
    let records = world.audit_records().await;
    let of = |id: &str| records.iter().filter(|r| r.request_id == id).count();
    assert_eq!(of("before-trigger"), 1);
    assert_eq!(of("after-trigger"), 1);
    assert_eq!(of("while-dropped"), 0, "refused, and unrecorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_the_database_skips_is_refused_not_reported_done() {
    let (postgres, world, _) = replicas(0).await;
    let db = database(&postgres).await;
    let consent = grant_residence(&world, world.broker_addr(), BERLIN).await;
    let revoke = || async {
        world
            .portal()
            .revoke_consent(RevokeConsentRequest {
                consent_id: consent.consent_id.clone(),
            })
            .await
    };

    // Every UPDATE of a consent row is skipped.
    db.batch_execute(&format!(
        "{DROP_ROW};
         CREATE TRIGGER keep_consents BEFORE UPDATE ON consents
           FOR EACH ROW EXECUTE FUNCTION onceonly_drop();"
    ))
    .await
    .expect("the intruder's trigger");
    let refused = match revoke().await {
        Ok(answer) => panic!(
            "the portal was told the consent is revoked while its row is unchanged: {:?}",
            answer.into_inner().consent
        ),
        Err(status) => status,
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(
        reason_of(&refused),
        Some(ErrorReason::BrokerUnavailable),
        "{refused:?}"
    );

    // Every UPDATE stores the row as it was (its old MAC included).
    db.batch_execute(
        "CREATE OR REPLACE FUNCTION onceonly_drop() RETURNS trigger AS 'BEGIN RETURN OLD; END' LANGUAGE plpgsql",
    )
    .await
    .expect("the intruder's second trigger");
    let refused = match revoke().await {
        Ok(answer) => panic!(
            "the portal was told the consent is revoked while its old row was kept: {:?}",
            answer.into_inner().consent
        ),
        Err(status) => status,
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::BrokerUnavailable));

    // The store kept the consent, but the log holds the citizen's request
    // to revoke it: the broker fails closed and no longer counts it.
    let refused = world
        .authority(BERLIN)
        .request_evidence(residence("revocation-asked"))
        .await
        .expect_err("a consent whose revocation was asked for");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::ConsentMissing));

    // Without the trigger the revocation takes effect.
    db.batch_execute("DROP TRIGGER keep_consents ON consents")
        .await
        .expect("drop the trigger");
    let revoked = revoke()
        .await
        .expect("revoked once the database stores it")
        .into_inner()
        .consent
        .expect("consent");
    assert!(revoked.revoked_at.is_some());
    let refused = world
        .authority(BERLIN)
        .request_evidence(residence("revoked"))
        .await
        .expect_err("a revoked consent");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::ConsentMissing));

    // The log: every revocation asked for is recorded before it is made;
    // each that did not take effect is followed by a record saying so.
    let records = consent_records(&world, RecordKind::ConsentRevoked, &consent.consent_id, 5).await;
    let statuses: Vec<Code> = records
        .iter()
        .map(|r| Code::from_i32(r.status_code))
        .collect();
    assert_eq!(
        statuses,
        [
            Code::Ok,
            Code::Unavailable,
            Code::Ok,
            Code::Unavailable,
            Code::Ok
        ],
        "{records:#?}"
    );
    for failed in records.iter().filter(|r| r.status_code != 0) {
        assert!(
            failed.status_message.starts_with("not carried out"),
            "{failed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_the_database_drops_is_refused_not_reported_done() {
    let (postgres, world, _) = replicas(0).await;
    let db = database(&postgres).await;
    db.batch_execute(&format!(
        "{DROP_ROW};
         CREATE TRIGGER drop_consents BEFORE INSERT ON consents
           FOR EACH ROW EXECUTE FUNCTION onceonly_drop();"
    ))
    .await
    .expect("the intruder's trigger");
    let grant = GrantConsentRequest {
        subject: Some(onceonly_integration_tests::world::anna()),
        authority_id: format!("spiffe://onceonly.test/authority/{BERLIN}"),
        evidence_type: "proof-of-residence".into(),
        purpose: "parental-allowance".into(),
        expires_at: Some(onceonly_proto::time::timestamp(
            onceonly_proto::time::now_ms() + 3_600_000,
        )),
    };
    let refused = match world.portal().grant_consent(grant).await {
        Ok(answer) => panic!(
            "the portal was told a consent was granted that the database did not store: {:?}",
            answer.into_inner().consent
        ),
        Err(status) => status,
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::BrokerUnavailable));
    let stored: i64 = db
        .query_one("SELECT count(*) FROM consents", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(stored, 0);

    db.batch_execute("DROP TRIGGER drop_consents ON consents")
        .await
        .expect("drop the trigger");
    grant_residence(&world, world.broker_addr(), BERLIN).await;
    world
        .authority(BERLIN)
        .request_evidence(residence("granted"))
        .await
        .expect("granted once the database stores it");
}

/// The records `channel`'s participant sees, or the refusal.
async fn view(
    channel: tonic::transport::Channel,
    subject: Option<onceonly_proto::v1::SubjectId>,
) -> Result<Vec<AuditRecord>, tonic::Status> {
    onceonly_proto::v1::audit_service_client::AuditServiceClient::new(channel)
        .query_records(onceonly_proto::v1::QueryRecordsRequest {
            subject,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().records)
}

/// The columns queries filter on are not in the Merkle leaf: an intruder
/// who edits them must not move a record into another authority's or
/// another citizen's view (the log itself would still verify). Queries
/// check each record against what it was found for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_moved_into_another_view_is_refused_not_shown() {
    use onceonly_certs::Role;
    use onceonly_integration_tests::world::{PORTAL, anna};
    const MUENCHEN: &str = AUTHORITIES[1];
    const KOELN: &str = AUTHORITIES[2];
    let (postgres, world, _) = replicas(0).await;
    let db = database(&postgres).await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("moved-between-authorities"))
        .await
        .expect("delivered");
    // Another person's vehicle, fetched by the tax office.
    let mut vehicle = birth_certificate("moved-between-citizens");
    vehicle.evidence_type = "vehicle-registration".into();
    vehicle.purpose = "vehicle-tax-assessment".into();
    vehicle.legal_basis = "§ 1 KraftStG".into();
    vehicle.subject = Some(onceonly_proto::v1::SubjectId {
        value: "21641045750".into(),
        ..anna()
    });
    world
        .authority(KOELN)
        .request_evidence(vehicle)
        .await
        .expect("delivered");
    for id in ["moved-between-authorities", "moved-between-citizens"] {
        let sequenced = world
            .wait_for_records(id, 1, Duration::from_millis(MERGE_DELAY_MS * 3))
            .await;
        assert_eq!(sequenced.len(), 1, "{id} sequenced");
    }
    let muenchen = || world.channel(Role::Authority, MUENCHEN);
    let portal = || world.channel(Role::Portal, PORTAL);
    assert!(
        view(muenchen(), None)
            .await
            .expect("its own view")
            .is_empty(),
        "München asked for nothing"
    );
    let anna_before = view(portal(), Some(anna())).await.expect("Anna's view");
    assert!(
        anna_before
            .iter()
            .all(|r| r.request_id != "moved-between-citizens")
    );

    // The intruder moves Berlin's record into München's view.
    let moved = db
        .execute(
            "UPDATE audit_leaves SET caller_id = $1 WHERE caller_id = $2",
            &[
                &format!("spiffe://onceonly.test/authority/{MUENCHEN}"),
                &format!("spiffe://onceonly.test/authority/{BERLIN}"),
            ],
        )
        .await
        .expect("the intruder's update");
    assert!(moved >= 1);
    let refused = view(muenchen(), None)
        .await
        .expect_err("München must not see Berlin's record as its own");
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::AuditLogInconsistent));

    // And someone else's vehicle record into Anna's history.
    let moved = db
        .execute(
            "UPDATE audit_leaves SET subject_pseudonym =
               (SELECT subject_pseudonym FROM audit_leaves WHERE caller_id = $1 LIMIT 1)
             WHERE caller_id = $2",
            &[
                &format!("spiffe://onceonly.test/authority/{MUENCHEN}"),
                &format!("spiffe://onceonly.test/authority/{KOELN}"),
            ],
        )
        .await
        .expect("the intruder's update");
    assert!(moved >= 1);
    let refused = view(portal(), Some(anna()))
        .await
        .expect_err("Anna's view must not show another person's record");
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::AuditLogInconsistent));
}

/// A queued row copied while it waited, and put back after its record was
/// signed into the log, must not be signed in a second time (a citizen's
/// view would show an authority fetching their data twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_queue_row_is_set_aside_not_sequenced_twice() {
    let (postgres, world, _) = replicas(0).await;
    let db = database(&postgres).await;
    db.batch_execute(
        "CREATE TABLE stolen (LIKE audit_queue);
         CREATE FUNCTION onceonly_copy() RETURNS trigger AS
           'BEGIN INSERT INTO stolen SELECT (NEW).*; RETURN NULL; END' LANGUAGE plpgsql;
         CREATE TRIGGER copy_queue AFTER INSERT ON audit_queue
           FOR EACH ROW EXECUTE FUNCTION onceonly_copy();",
    )
    .await
    .expect("the intruder's copying trigger");
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("copied"))
        .await
        .expect("delivered");
    let sequenced = world
        .wait_for_records("copied", 1, Duration::from_millis(MERGE_DELAY_MS * 3))
        .await;
    assert_eq!(sequenced.len(), 1);
    let put_back = db
        .execute(
            "INSERT INTO audit_queue (replica, leaf_hash, record, mac, queued_at_ms, segment, replica_seq, chain_segment, chain_last)
             SELECT replica, leaf_hash, record, mac, queued_at_ms, segment, replica_seq, chain_segment, chain_last FROM stolen",
            &[],
        )
        .await
        .expect("the copy goes back into the queue");
    assert!(put_back >= 1);
    // The sequencer takes the queue every 100 ms: wait until it is empty.
    let deadline = Instant::now() + Duration::from_millis(MERGE_DELAY_MS * 3);
    loop {
        let waiting: i64 = db
            .query_one("SELECT count(*) FROM audit_queue", &[])
            .await
            .expect("count")
            .get(0);
        if waiting == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the queue was never taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let quarantined: Vec<String> = db
        .query("SELECT reason FROM audit_quarantine", &[])
        .await
        .expect("quarantine")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        quarantined.iter().any(|reason| reason.contains("copy")),
        "{quarantined:?}"
    );
    let records = world
        .wait_for_records("copied", 2, Duration::from_secs(1))
        .await;
    assert_eq!(records.len(), 1, "signed into the log twice: {records:?}");
}

/// The value of gauge `name` in the replica's metrics, where it is there.
async fn gauge(world: &onceonly_integration_tests::world::World, name: &str) -> Option<f64> {
    gauge_at(world.admin_addr(), name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_row_deleted_before_sequencing_stops_the_replica() {
    let (postgres, world, _) = replicas(0).await;
    let db = database(&postgres).await;
    // An AFTER trigger: the INSERT stores the row (so the commit's count
    // holds) and the trigger deletes it at once, before the sequencer's
    // next round.
    db.batch_execute(
        "CREATE FUNCTION onceonly_vanish() RETURNS trigger AS
           'BEGIN DELETE FROM audit_queue WHERE queue_id = NEW.queue_id; RETURN NULL; END'
           LANGUAGE plpgsql;
         CREATE TRIGGER vanish AFTER INSERT ON audit_queue
           FOR EACH ROW EXECUTE FUNCTION onceonly_vanish();",
    )
    .await
    .expect("the intruder's trigger");
    // This answer went out with a receipt before the row vanished: a
    // receipt is a promise about the future, which only its holder's
    // check-receipt and the replica's own watch can hold to account.
    let vanished = world
        .authority(BERLIN)
        .request_evidence(birth_certificate("vanished"))
        .await
        .expect("committed, then deleted")
        .into_inner();
    assert!(vanished.audit_receipt.is_some());
    db.batch_execute("DROP TRIGGER vanish ON audit_queue")
        .await
        .expect("the intruder covers its tracks");
    assert_eq!(
        gauge(&world, "onceonly_audit_receipts_broken").await,
        Some(0.0),
        "counted before the record was due"
    );

    // Past the receipt's include-by time the replica finds its record in
    // neither the log nor the queue, and stops.
    let deadline = Instant::now() + Duration::from_millis(MERGE_DELAY_MS * 3);
    while gauge(&world, "onceonly_audit_receipts_broken").await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the deleted row was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        gauge(&world, "onceonly_audit_refusing").await,
        Some(1.0),
        "readiness still says serving"
    );
    let refused = match world
        .authority(BERLIN)
        .request_evidence(birth_certificate("after-the-loss"))
        .await
    {
        Ok(answer) => panic!(
            "evidence released by a replica whose receipted record was deleted: {:?}",
            answer.into_inner().audit_receipt
        ),
        Err(status) => status,
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::AuditUnavailable));
    let records = world.audit_records().await;
    assert!(
        records.iter().all(|r| r.request_id != "vanished"),
        "the deleted record is in the log after all"
    );
}

/// A queued row deleted before it was sequenced, with a later row of the
/// same replica after it: the sequencer sees the gap in that replica's
/// numbers, records it and reports it, from the tables alone (without the
/// writing replica's memory of its receipts, which a restart loses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_row_deleted_before_sequencing_is_a_gap_in_its_replicas_numbers() {
    let (postgres, world, _) = replicas(0).await;
    let db = database(&postgres).await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("gap-before"))
        .await
        .expect("delivered");
    world
        .wait_for_records("gap-before", 1, Duration::from_millis(MERGE_DELAY_MS * 3))
        .await;
    db.batch_execute(
        "CREATE FUNCTION onceonly_vanish_one() RETURNS trigger AS
           $$BEGIN
             IF encode(NEW.record, 'escape') LIKE '%gap-vanished%' THEN
               DELETE FROM audit_queue WHERE queue_id = NEW.queue_id;
             END IF;
             RETURN NULL;
           END$$ LANGUAGE plpgsql;
         CREATE TRIGGER vanish_one AFTER INSERT ON audit_queue
           FOR EACH ROW EXECUTE FUNCTION onceonly_vanish_one();",
    )
    .await
    .expect("the intruder's trigger");
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("gap-vanished"))
        .await
        .expect("committed, then deleted");
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("gap-after"))
        .await
        .expect("delivered");
    db.batch_execute("DROP TRIGGER vanish_one ON audit_queue")
        .await
        .expect("the intruder covers its tracks");

    let deadline = Instant::now() + Duration::from_millis(MERGE_DELAY_MS * 2);
    let gaps = loop {
        let gaps: Vec<(String, i64, i64, i64)> = db
            .query(
                "SELECT replica, segment, first_seq, last_seq FROM audit_queue_gaps",
                &[],
            )
            .await
            .expect("gaps")
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
            .collect();
        if !gaps.is_empty() {
            break gaps;
        }
        assert!(Instant::now() < deadline, "the gap was never noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // One record missing: the one after "gap-before", in the replica's
    // first segment (a random number).
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    let (replica, segment, first, last) = &gaps[0];
    assert!(*segment > 0 && first == last, "{gaps:?}");
    let before = world
        .wait_for_records("gap-before", 1, Duration::from_secs(1))
        .await;
    assert_eq!(&before[0].replica, replica);
    assert_eq!(
        gauge(&world, "onceonly_audit_queue_gaps").await,
        Some(1.0),
        "the sequencer did not report the gap"
    );
    let after = world
        .wait_for_records("gap-after", 1, Duration::from_millis(MERGE_DELAY_MS * 2))
        .await;
    assert_eq!(after.len(), 1, "the log stopped at the gap");
    let records = world.audit_records().await;
    assert!(
        records.iter().all(|r| r.request_id != "gap-vanished"),
        "the deleted record is in the log after all"
    );
    // The numbers' mark cannot be moved on to hide the gap: a mark
    // edited in the database stops the sequencer, loudly.
    db.execute("UPDATE audit_queue_marks SET last_seq = last_seq + 5", &[])
        .await
        .expect("the intruder edits the marks");
    the_sequencer_stops_at(&world, "after-the-edit", "an edited mark").await;
}

/// Sends `request_id` (committed to the queue, receipted) and checks the
/// sequencer's next run fails rather than sequence it under `what`.
async fn the_sequencer_stops_at(
    world: &onceonly_integration_tests::world::World,
    request_id: &str,
    what: &str,
) {
    let failed_before = gauge(world, "onceonly_audit_sequencer_failed_runs")
        .await
        .unwrap_or(0.0);
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate(request_id))
        .await
        .expect("committed to the queue");
    let deadline = Instant::now() + Duration::from_millis(MERGE_DELAY_MS * 3);
    while gauge(world, "onceonly_audit_sequencer_failed_runs")
        .await
        .unwrap_or(0.0)
        <= failed_before
    {
        assert!(Instant::now() < deadline, "a sequencer signed past {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        world
            .audit_records()
            .await
            .iter()
            .all(|r| r.request_id != request_id),
        "sequenced under {what}"
    );
}

/// A mark written back as it was (an older row, authentic): the sequencer
/// holds the marks it stored and stops rather than take a copy for new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_mark_written_back_stops_the_sequencer() {
    let (postgres, world, _) = replicas(0).await;
    let db = database(&postgres).await;
    let patience = Duration::from_millis(MERGE_DELAY_MS * 3);
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("mark-1"))
        .await
        .expect("delivered");
    world.wait_for_records("mark-1", 1, patience).await;
    let saved: Vec<(String, i64, i64, Vec<u8>)> = db
        .query(
            "SELECT replica, segment, last_seq, mac FROM audit_queue_marks",
            &[],
        )
        .await
        .expect("marks")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    assert!(!saved.is_empty(), "no mark stored");
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("mark-2"))
        .await
        .expect("delivered");
    world.wait_for_records("mark-2", 1, patience).await;
    for (replica, segment, last, mac) in &saved {
        db.execute(
            "UPDATE audit_queue_marks SET last_seq = $3, mac = $4 WHERE replica = $1 AND segment = $2",
            &[replica, segment, last, mac],
        )
        .await
        .expect("the intruder writes the old mark back");
    }
    the_sequencer_stops_at(&world, "mark-3", "a rolled-back mark").await;
}

/// The value of gauge `name` at the admin listener `addr`.
async fn gauge_at(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let text = onceonly_integration_tests::scrape_metrics(addr).await;
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_consent_row_written_back_does_not_undo_its_revocation() {
    let (postgres, world, others) = replicas(1).await;
    let db = database(&postgres).await;
    let consent = grant_residence(&world, world.broker_addr(), BERLIN).await;
    // The intruder keeps the row as it is while the consent is active: its
    // MAC is valid, for these values, forever.
    let saved = db
        .query_one(
            "SELECT revoked_at_ms, mac FROM consents WHERE consent_id = $1",
            &[&consent.consent_id],
        )
        .await
        .expect("the active row");
    assert_eq!(saved.get::<_, Option<i64>>(0), None);
    let old_mac: Vec<u8> = saved.get(1);

    // The citizen revokes through replica 0; replica 1 learns of it from
    // the database row, and from the signed log.
    world
        .portal()
        .revoke_consent(RevokeConsentRequest {
            consent_id: consent.consent_id.clone(),
        })
        .await
        .expect("revoked");
    let other = others[0].local_addr();
    let other_admin = others[0].admin_addr().expect("admin listener");
    let deadline =
        Instant::now() + Duration::from_millis(MERGE_DELAY_MS * 3) + Duration::from_secs(10);
    while gauge_at(other_admin, "onceonly_revocations_known").await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "replica 1 never read the revocation from the log"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The old row goes back, with its old MAC: a valid row of an active
    // consent, as far as the database can tell.
    let written = db
        .execute(
            "UPDATE consents SET revoked_at_ms = NULL, mac = $2 WHERE consent_id = $1",
            &[&consent.consent_id, &old_mac],
        )
        .await
        .expect("the intruder writes the old row back");
    assert_eq!(written, 1);
    for (addr, replica) in [(world.broker_addr(), "replica-0"), (other, "replica-1")] {
        let refused = match world
            .authority_at(addr, BERLIN)
            .request_evidence(residence(&format!("after-write-back-{replica}")))
            .await
        {
            Ok(_) => panic!("{replica} released evidence on a consent revoked in the log"),
            Err(status) => status,
        };
        assert_eq!(
            refused.code(),
            Code::FailedPrecondition,
            "{replica}: {refused:?}"
        );
        assert_eq!(
            reason_of(&refused),
            Some(ErrorReason::ConsentMissing),
            "{replica}"
        );
    }
    assert!(
        gauge_at(other_admin, "onceonly_consent_rows_written_back")
            .await
            .is_some_and(|n| n >= 1.0),
        "the written-back row was not counted"
    );
    // The portal's view says revoked too, whatever the row says.
    let listed = world
        .portal()
        .list_consents(onceonly_proto::v1::ListConsentsRequest {
            subject: Some(onceonly_integration_tests::world::anna()),
            ..Default::default()
        })
        .await
        .expect("listed")
        .into_inner();
    let shown = listed
        .consents
        .iter()
        .find(|c| c.consent_id == consent.consent_id)
        .expect("the consent is listed");
    assert!(shown.revoked_at.is_some(), "{shown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_that_keeps_sequenced_rows_stops_the_sequencer_before_it_signs_twice() {
    let (postgres, world, _) = replicas(0).await;
    let db = database(&postgres).await;
    let logged = || async {
        db.query_one("SELECT count(*) FROM audit_leaves", &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
    };
    let before = logged().await;
    // Every DELETE from the queue is skipped: the sequencer's next run
    // would take the same rows again and sign them into the log twice.
    db.batch_execute(&format!(
        "{DROP_ROW};
         CREATE TRIGGER keep_queue BEFORE DELETE ON audit_queue
           FOR EACH ROW EXECUTE FUNCTION onceonly_drop();"
    ))
    .await
    .expect("the intruder's trigger");
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("kept-in-queue"))
        .await
        .expect("committed to the queue before the trigger matters");
    let deadline = Instant::now() + Duration::from_millis(MERGE_DELAY_MS * 2);
    while gauge(&world, "onceonly_audit_refusing").await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the sequencer never noticed the rows it could not take"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = match world
        .authority(BERLIN)
        .request_evidence(birth_certificate("after-the-halt"))
        .await
    {
        Ok(answer) => panic!(
            "evidence released by a replica whose sequencer stopped: {:?}",
            answer.into_inner().audit_receipt
        ),
        Err(status) => status,
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason_of(&refused), Some(ErrorReason::AuditUnavailable));
    assert_eq!(
        logged().await,
        before,
        "the run that could not take its rows was committed"
    );
}
