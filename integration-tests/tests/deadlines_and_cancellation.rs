//! Every request leaves its record, whatever the caller or the network
//! does: a caller that cancels, a caller whose connection vanishes, a
//! deadline the register cannot meet, a deadline too short for anything.
//! Real broker, real connectors, real mutual TLS on loopback; the register
//! is a probe that counts what reaches it and what is cancelled under it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use onceonly_certs::Role;
use onceonly_certs::tls::client_config;
use onceonly_integration_tests::AuthorityClient;
use onceonly_integration_tests::probe::{ProbeCounts, ProbeRegister};
use onceonly_integration_tests::world::{AUTHORITIES, World, birth_certificate};
use onceonly_integration_tests::{cuttable_channel, start_connector};
use onceonly_proto::deadline::is_timer_expiry;
use onceonly_proto::status::reason_of;
use onceonly_proto::v1::{AuditRecord, ErrorReason, ExchangeOutcome, ListEvidenceTypesRequest};
use tonic::Code;

const BERLIN: &str = AUTHORITIES[0];
/// Long enough for anything on a loaded machine; never reached when the
/// code is right.
const PATIENCE: Duration = Duration::from_secs(20);

/// A world whose civil register is a probe answering after `latency`.
async fn world_with_probe(latency: Duration) -> (World, Arc<ProbeCounts>) {
    let mut world = World::start().await;
    let (probe, counts) = ProbeRegister::new(latency);
    let probe = start_connector(&world.pki, "civil-register", probe).await;
    world.replace_register("civil-register", probe).await;
    (world, counts)
}

/// The one record of `request_id`, once written and the broker has no
/// exchange left that could write another; fails where there is not
/// exactly one.
async fn the_record(world: &World, request_id: &str) -> AuditRecord {
    world.wait_for_records(request_id, 1, PATIENCE).await;
    world.settle().await;
    let records = world.wait_for_records(request_id, 1, PATIENCE).await;
    assert_eq!(records.len(), 1, "records of {request_id}: {records:?}");
    records.into_iter().next().expect("one")
}

fn assert_cancelled(record: &AuditRecord) {
    assert_eq!(record.outcome(), ExchangeOutcome::Cancelled, "{record:?}");
    assert_eq!(record.error_reason(), ErrorReason::Cancelled, "{record:?}");
    assert_eq!(record.status_code, Code::Cancelled as i32, "{record:?}");
    assert!(record.register_contacted, "{record:?}");
    assert_eq!(record.connector_id, "civil-register");
    assert!(record.payload_sha256.is_empty());
}

#[tokio::test]
async fn a_caller_that_cancels_leaves_one_cancelled_record_and_the_register_sees_it() {
    let (world, counts) = world_with_probe(Duration::from_secs(60)).await;
    let mut client = world.authority(BERLIN);
    let call =
        tokio::spawn(async move { client.request_evidence(birth_certificate("cancel-1")).await });
    assert!(
        counts
            .wait_until(PATIENCE, |c| c.started.load(Ordering::SeqCst) == 1)
            .await,
        "the request never reached the register"
    );
    // Dropping the call's future resets its HTTP/2 stream: a gRPC cancel.
    call.abort();

    assert!(
        counts
            .wait_until(PATIENCE, |c| c.cancelled.load(Ordering::SeqCst) == 1)
            .await,
        "the register never saw the cancellation"
    );
    assert_cancelled(&the_record(&world, "cancel-1").await);
    assert_eq!(counts.finished.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_caller_that_drops_its_connection_leaves_one_cancelled_record() {
    let (world, counts) = world_with_probe(Duration::from_secs(60)).await;
    let (config, _) =
        client_config(&world.pki.tls_files(Role::Authority, BERLIN)).expect("client TLS");
    let connection = cuttable_channel(config, world.broker_addr());
    let mut client = AuthorityClient::new(&world.pki, BERLIN, connection.channel.clone());
    let call =
        tokio::spawn(async move { client.request_evidence(birth_certificate("vanish-1")).await });
    assert!(
        counts
            .wait_until(PATIENCE, |c| c.started.load(Ordering::SeqCst) == 1)
            .await,
        "the request never reached the register"
    );
    connection.cut();

    assert!(
        counts
            .wait_until(PATIENCE, |c| c.cancelled.load(Ordering::SeqCst) == 1)
            .await,
        "the register never saw the cancellation"
    );
    assert_cancelled(&the_record(&world, "vanish-1").await);
    let answer = tokio::time::timeout(PATIENCE, call)
        .await
        .expect("the cut call ends")
        .expect("task");
    assert!(answer.is_err(), "a cut connection delivered: {answer:?}");
}

#[tokio::test]
async fn a_deadline_the_register_cannot_meet_is_deadline_exceeded_from_the_broker_with_its_record()
{
    let (world, counts) = world_with_probe(Duration::from_secs(5)).await;
    let mut client = world.authority(BERLIN);
    // Connect first, so the 300 ms are the exchange's alone.
    client
        .list_evidence_types(ListEvidenceTypesRequest {})
        .await
        .expect("connected");

    let mut call = tonic::Request::new(birth_certificate("slow-1"));
    call.set_timeout(Duration::from_millis(300));
    let status = client
        .request_evidence(call)
        .await
        .expect_err("the register takes 5 s");
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "the caller's own timer fired first: {status:?}"
    );
    assert_eq!(reason_of(&status), Some(ErrorReason::DeadlineExceeded));

    let record = the_record(&world, "slow-1").await;
    assert_eq!(record.outcome(), ExchangeOutcome::Failed, "{record:?}");
    assert_eq!(record.status_code, Code::DeadlineExceeded as i32);
    assert_eq!(record.error_reason(), ErrorReason::DeadlineExceeded);
    assert!(record.register_contacted);
    assert!(
        counts
            .wait_until(PATIENCE, |c| c.cancelled.load(Ordering::SeqCst) == 1)
            .await,
        "the register's work went on past the deadline"
    );
}

#[tokio::test]
async fn a_deadline_too_short_for_anything_is_refused_at_once_with_its_record() {
    let (world, counts) = world_with_probe(Duration::ZERO).await;
    let mut client = world.authority(BERLIN);
    client
        .list_evidence_types(ListEvidenceTypesRequest {})
        .await
        .expect("connected");

    // Less than the least the broker keeps back (5 ms) and needs for work.
    let mut call = tonic::Request::new(birth_certificate("hasty-1"));
    call.set_timeout(Duration::from_millis(12));
    let status = client
        .request_evidence(call)
        .await
        .expect_err("too short to do anything");
    // The broker answers within a millisecond or two; on a machine busy
    // enough to delay that past 12 ms the client's own timer speaks.
    if !is_timer_expiry(&status) {
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert_eq!(reason_of(&status), Some(ErrorReason::DeadlineTooShort));
        assert!(
            status.message().contains("at least"),
            "{}",
            status.message()
        );
    }

    let record = the_record(&world, "hasty-1").await;
    assert_eq!(record.error_reason(), ErrorReason::DeadlineTooShort);
    assert_eq!(record.status_code, Code::DeadlineExceeded as i32);
    assert!(!record.register_contacted, "{record:?}");
    assert_eq!(counts.started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_waiter_that_is_cancelled_frees_its_place_in_the_queue() {
    let mut world = onceonly_integration_tests::world::World::start_with(
        onceonly_integration_tests::world::BrokerSettings {
            limits: "concurrency = 1\nmax_waiting = 1\n".into(),
            ..Default::default()
        },
    )
    .await;
    let (probe, counts) = ProbeRegister::new(Duration::from_secs(60));
    let probe = start_connector(&world.pki, "civil-register", probe).await;
    world.replace_register("civil-register", probe).await;

    // One exchange holds the only slot; a second waits, then is cancelled.
    let mut busy = world.authority(BERLIN);
    let busy = tokio::spawn(async move { busy.request_evidence(birth_certificate("busy")).await });
    assert!(
        counts
            .wait_until(PATIENCE, |c| c.started.load(Ordering::SeqCst) == 1)
            .await
    );
    let mut waiter = world.authority(BERLIN);
    let waiter =
        tokio::spawn(async move { waiter.request_evidence(birth_certificate("waiter")).await });
    let broker = world.running_broker().broker().expect("running");
    let queued = async {
        while broker.exchanges.waiting() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(PATIENCE, queued)
        .await
        .expect("the second exchange never queued");
    waiter.abort();
    let records = world.wait_for_records("waiter", 1, PATIENCE).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].outcome(), ExchangeOutcome::Cancelled);
    assert_eq!(
        broker.exchanges.waiting(),
        0,
        "the cancelled waiter is still counted"
    );

    // Its place in the queue is free again: the next one waits (and meets
    // its deadline) instead of being shed.
    let mut call = tonic::Request::new(birth_certificate("next"));
    call.set_timeout(Duration::from_millis(500));
    let status = world
        .authority(BERLIN)
        .request_evidence(call)
        .await
        .expect_err("the slot is still taken");
    assert_eq!(
        reason_of(&status),
        Some(ErrorReason::DeadlineExceeded),
        "shed although the queue is empty: {status:?}"
    );
    busy.abort();
}

/// Issue 24: a register's signed answer in a media type the catalogue does
/// not list for the evidence type (birth-certificate: application/xml) is
/// not released: DATA_LOSS (BAD_EVIDENCE), and the record says so.
#[tokio::test]
async fn evidence_in_a_media_type_outside_the_catalogue_is_not_released() {
    for (n, media_type) in ["text/html", "application/x-msdownload"]
        .into_iter()
        .enumerate()
    {
        let mut world = World::start().await;
        let (probe, _counts) = ProbeRegister::new(Duration::ZERO);
        let probe =
            start_connector(&world.pki, "civil-register", probe.answering_as(media_type)).await;
        world.replace_register("civil-register", probe).await;
        let request_id = format!("media-type-{n}");
        let refused = world
            .authority(BERLIN)
            .request_evidence(birth_certificate(&request_id))
            .await
            .expect_err("released a payload outside the catalogue");
        assert_eq!(refused.code(), Code::DataLoss, "{media_type}: {refused:?}");
        assert_eq!(
            reason_of(&refused),
            Some(ErrorReason::BadEvidence),
            "{refused:?}"
        );
        assert!(
            refused.message().contains(media_type) && refused.message().contains("application/xml"),
            "{}",
            refused.message()
        );
        let record = the_record(&world, &request_id).await;
        assert_eq!(
            record.error_reason(),
            ErrorReason::BadEvidence,
            "{record:?}"
        );
        assert!(record.payload_sha256.is_empty(), "{record:?}");
    }
    // The listed type, with parameters, is released.
    let mut world = World::start().await;
    let (probe, _counts) = ProbeRegister::new(Duration::ZERO);
    let probe = start_connector(
        &world.pki,
        "civil-register",
        probe.answering_as("application/xml; charset=utf-8"),
    )
    .await;
    world.replace_register("civil-register", probe).await;
    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("media-type-listed"))
        .await
        .expect("the catalogue's own type is released");
}
