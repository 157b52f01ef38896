//! End to end: EU requests polled from a fake Domibus WS plugin, answered
//! through a real broker and the sample civil register (registry-mock),
//! over mutual TLS on loopback. The bridge asks as its own authority
//! (`oots-bridge`), signed, encrypted to its own key; the evidence is
//! checked against the register's statement before it goes out.

mod common;

use std::sync::Arc;

use common::access_point::{AccessPoint, document, retrieved, serve, submitted};
use common::world::{BRIDGE, bridge_for};
use common::{ID, asked};
use onceonly_integration_tests::world::World;
use onceonly_proto::v1::{ErrorReason, ExchangeOutcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eu_requests_are_answered_through_the_broker_with_the_registers_evidence_or_the_right_error()
 {
    let world = World::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let point = Arc::new(AccessPoint::default());
    let endpoint = serve(point.clone()).await;
    let bridge = bridge_for(&world, dir.path(), &endpoint, "");

    const NOBODY: &str = "urn:uuid:00000000-0000-4000-8000-000000000002";
    const T2: &str = "urn:uuid:00000000-0000-4000-8000-000000000003";
    point.pending.lock().expect("lock").extend([
        ("m1".to_owned(), retrieved(&asked(&[]), "conv-1")),
        ("m2".to_owned(), retrieved(&asked(&[]), "conv-1")),
        (
            "m3".to_owned(),
            retrieved(
                &asked(&[
                    (ID, NOBODY),
                    ("<p:FamilyName>Schneider", "<p:FamilyName>Niemand"),
                ]),
                "conv-2",
            ),
        ),
        (
            "m4".to_owned(),
            retrieved(
                &asked(&[(ID, T2), (r#"value="T1""#, r#"value="T2""#)]),
                "conv-3",
            ),
        ),
    ]);
    assert_eq!(bridge.poll_once().await.expect("polled"), 4);
    let answers = submitted(&point);
    assert_eq!(answers.len(), 4);

    // Anna's birth certificate, from the civil register, matched on her
    // name and date of birth, decrypted and verified by the bridge.
    let first = &answers[0];
    assert_eq!(first.action, "ExecuteQueryResponse", "{}", document(first));
    assert!(document(first).contains(&format!(r#"requestId="{ID}""#)));
    assert!(
        document(first).contains("civil-register"),
        "the issuing register"
    );
    let evidence = String::from_utf8(first.payloads[1].bytes.clone()).expect("xml");
    assert!(
        evidence.contains("Schneider") && evidence.contains("1990-03-14"),
        "{evidence}"
    );
    // Asked twice, answered once: one exchange in the broker's log.
    assert_eq!(answers[1].payloads, first.payloads);
    world.settle().await;
    let records = world.audit_records().await;
    let exchanges: Vec<_> = records.iter().filter(|r| r.request_id == ID).collect();
    assert_eq!(exchanges.len(), 1, "{exchanges:?}");
    let record = exchanges[0];
    assert_eq!(
        record.caller_id,
        format!("spiffe://onceonly.test/authority/{BRIDGE}")
    );
    assert_eq!(record.purpose, "oots:T1");
    assert_eq!(record.outcome(), ExchangeOutcome::Delivered);
    assert!(
        record.encrypted,
        "the evidence passed the broker encrypted to the bridge"
    );
    assert_eq!(record.policy_rule, "oots-t1-birth-certificate");
    // The OOTS exchange's ids are in the broker's record.
    let ids: Vec<(&str, &str)> = record
        .correlation_ids
        .iter()
        .map(|c| (c.name.as_str(), c.value.as_str()))
        .collect();
    assert_eq!(
        ids,
        [
            ("oots.conversation_id", "conv-1"),
            ("oots.exchange_id", "ex-42"),
            ("oots.message_id", "m1"),
            (
                "oots.original_sender",
                "urn:cef.eu:names:identifier:EAS:9930:AT123456789"
            ),
            ("oots.requester", "AT123456789"),
        ]
    );

    // Nobody of that name and birth date: EDM:ERR:0004, from the register.
    let nobody = document(&answers[2]);
    assert_eq!(answers[2].action, "ExceptionResponse");
    assert!(nobody.contains(r#"code="EDM:ERR:0004""#), "{nobody}");
    assert!(nobody.contains(r#"detail="SUBJECT_NOT_FOUND""#), "{nobody}");
    let refused = records
        .iter()
        .find(|r| r.request_id == NOBODY)
        .expect("recorded");
    assert_eq!(refused.error_reason(), ErrorReason::SubjectNotFound);

    // Procedure T2: the mapping provides it, the broker's policy does not
    // let the bridge fetch for it: refused by the broker, recorded.
    let t2 = document(&answers[3]);
    assert!(t2.contains(r#"detail="POLICY_DENIED""#), "{t2}");
    let denied = records
        .iter()
        .find(|r| r.request_id == T2)
        .expect("recorded");
    assert_eq!(denied.error_reason(), ErrorReason::PolicyDenied);
}
