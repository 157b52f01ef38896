//! The storage seam's contract, one scenario per trait, run against every
//! backend: in memory, embedded (the log file and sled), and a real
//! PostgreSQL. A backend that answers differently from the others fails
//! here, before any broker runs on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use onceonly_broker::pseudonym::Pseudonymiser;
use onceonly_integration_tests::postgres::TestPostgres;
use onceonly_proto::v1::{AuditRecord, ExchangeOutcome};
use onceonly_store::{
    AuditFilter, AuditStore, Claim, ConsentError, ConsentQuery, ConsentStore, QuotaBucket,
    QuotaCounter, RequestWindow, StoredConsent, StoredOutcome, StoredStatus,
};
use ring::signature::{Ed25519KeyPair, KeyPair};

fn audit_key() -> (Ed25519KeyPair, Vec<u8>) {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
    let public = key.public_key().as_ref().to_vec();
    (key, public)
}

fn consent(id: &str, authority: &str, granted: i64) -> StoredConsent {
    StoredConsent {
        consent_id: id.into(),
        subject_scheme: 1,
        subject_pseudonym: "a1b2".into(),
        subject_sealed: "sealed".into(),
        authority_id: authority.into(),
        evidence_type: "proof-of-residence".into(),
        purpose: "parental-allowance".into(),
        granted_at_ms: granted,
        expires_at_ms: 100_000,
        revoked_at_ms: None,
        recorded_by: "spiffe://t/portal/p".into(),
    }
}

async fn consents_keep_their_contract(store: &dyn ConsentStore, backend: &str) {
    let berlin = "spiffe://t/authority/berlin";
    let query = ConsentQuery {
        subject_scheme: 1,
        subject_pseudonym: "a1b2",
        authority_id: berlin,
        evidence_type: "proof-of-residence",
        purpose: "parental-allowance",
    };
    store
        .insert(&consent("cns-old", berlin, 1_000))
        .await
        .expect("insert");
    store
        .insert(&consent("cns-new", berlin, 2_000))
        .await
        .expect("insert");
    store
        .insert(&consent("cns-other", "spiffe://t/authority/hamburg", 3_000))
        .await
        .expect("insert");
    let found = store.find_active(&query, 5_000).await.expect("find");
    assert_eq!(
        found.map(|c| c.consent_id),
        Some("cns-new".into()),
        "{backend}: the newest"
    );
    let (page, more) = store.list("a1b2", 0, 2).await.expect("list");
    assert_eq!(
        page.iter()
            .map(|c| c.consent_id.as_str())
            .collect::<Vec<_>>(),
        ["cns-other", "cns-new"],
        "{backend}: newest first"
    );
    assert!(more, "{backend}: a third is there");
    let (rest, more) = store.list("a1b2", 2, 2).await.expect("list");
    assert_eq!(rest.len(), 1, "{backend}");
    assert!(!more, "{backend}");

    let revoked = store.revoke("cns-new", 6_000).await.expect("revoke");
    assert_eq!(revoked.revoked_at_ms, Some(6_000), "{backend}");
    let again = store.revoke("cns-new", 7_000).await.expect("revoke again");
    assert_eq!(
        again.revoked_at_ms,
        Some(6_000),
        "{backend}: the first revocation time stays"
    );
    let found = store.find_active(&query, 7_000).await.expect("find");
    assert_eq!(
        found.map(|c| c.consent_id),
        Some("cns-old".into()),
        "{backend}: the older one still covers"
    );
    assert_eq!(
        store.find_active(&query, 100_000).await.expect("find"),
        None,
        "{backend}: expired"
    );
    assert!(
        matches!(
            store.revoke("cns-none", 1).await,
            Err(ConsentError::NotFound(_))
        ),
        "{backend}"
    );
    assert_eq!(store.get("cns-none").await.expect("get"), None, "{backend}");
    assert!(
        !store
            .import(&consent("cns-old", berlin, 9))
            .await
            .expect("import"),
        "{backend}: kept"
    );
    assert_eq!(
        store
            .get("cns-old")
            .await
            .expect("get")
            .map(|c| c.granted_at_ms),
        Some(1_000),
        "{backend}: an import over an existing consent changed it"
    );
    assert!(
        store
            .import(&consent("cns-moved", berlin, 500))
            .await
            .expect("import"),
        "{backend}"
    );
    assert_eq!(store.all().await.expect("all").len(), 4, "{backend}");
}

fn refused(id: &str) -> StoredOutcome {
    StoredOutcome {
        exchange_id: id.into(),
        result: Err(StoredStatus {
            code: tonic::Code::NotFound,
            message: "no such subject".into(),
            details: vec![1, 2, 3],
            outcome: ExchangeOutcome::Failed,
        }),
    }
}

async fn the_window_keeps_its_contract(window: Arc<dyn RequestWindow>, backend: &str) {
    let claim = |rid: &'static str, fingerprint: u8, exchange: &'static str| {
        let window = window.clone();
        async move {
            window
                .claim("caller", rid, &[fingerprint; 32], exchange)
                .await
                .expect("claim")
        }
    };
    assert_eq!(claim("r1", 1, "x-1").await, Claim::Ours, "{backend}");
    assert_eq!(
        claim("r1", 1, "x-2").await,
        Claim::Theirs {
            exchange_id: "x-1".into()
        },
        "{backend}"
    );
    assert_eq!(claim("r1", 2, "x-3").await, Claim::Conflict, "{backend}");
    let waiting = {
        let window = window.clone();
        tokio::spawn(async move { window.wait("caller", "r1", "x-1").await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    window.store("caller", "r1", "x-1", &refused("x-1")).await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter got the outcome in time")
        .expect("task")
        .expect("an outcome");
    assert_eq!(outcome.exchange_id, "x-1", "{backend}");
    let status = outcome.result.expect_err("refused");
    assert_eq!(
        (status.code, status.details),
        (tonic::Code::NotFound, vec![1, 2, 3]),
        "{backend}"
    );
    // Releasing a finished claim changes nothing; an unfinished one is
    // released, and its waiters told so.
    window.release("caller", "r1", "x-1").await;
    assert!(
        window.wait("caller", "r1", "x-1").await.is_some(),
        "{backend}"
    );
    assert_eq!(claim("r2", 1, "x-4").await, Claim::Ours, "{backend}");
    window.release("caller", "r2", "x-4").await;
    assert!(
        window.wait("caller", "r2", "x-4").await.is_none(),
        "{backend}"
    );
    assert_eq!(
        claim("r2", 1, "x-5").await,
        Claim::Ours,
        "{backend}: released, so claimable"
    );
    // Many replicas claim one request id at once: exactly one runs it, the
    // others are told whose it is.
    let racing: Vec<_> = (0..8)
        .map(|n| {
            let window = window.clone();
            tokio::spawn(async move {
                let exchange = format!("x-race-{n}");
                let claim = window
                    .claim("caller", "r3", &[3; 32], &exchange)
                    .await
                    .expect("claim");
                (exchange, claim)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in racing {
        outcomes.push(task.await.expect("task"));
    }
    let winners: Vec<&String> = outcomes
        .iter()
        .filter(|(_, c)| *c == Claim::Ours)
        .map(|(x, _)| x)
        .collect();
    assert_eq!(winners.len(), 1, "{backend}: {outcomes:?}");
    let winner = Claim::Theirs {
        exchange_id: winners[0].clone(),
    };
    for (_, claim) in &outcomes {
        assert!(
            *claim == Claim::Ours || *claim == winner,
            "{backend}: {outcomes:?}"
        );
    }
    window.sweep().await.expect("sweep");
}

/// How long the sweep test's window remembers a request id.
const SHORT_WINDOW: Duration = Duration::from_millis(400);

/// A window of [`SHORT_WINDOW`] forgets what expired, and only that.
async fn expired_claims_are_swept(window: Arc<dyn RequestWindow>, backend: &str) {
    let claim = |rid: &'static str, fingerprint: u8, exchange: &'static str| {
        let window = window.clone();
        async move {
            window
                .claim("sweeper", rid, &[fingerprint; 32], exchange)
                .await
                .expect("claim")
        }
    };
    assert_eq!(claim("old", 1, "x-old").await, Claim::Ours, "{backend}");
    tokio::time::sleep(SHORT_WINDOW + Duration::from_millis(300)).await;
    assert_eq!(claim("fresh", 1, "x-fresh").await, Claim::Ours, "{backend}");
    assert_eq!(
        window.sweep().await.expect("sweep"),
        1,
        "{backend}: the expired claim, and it alone"
    );
    assert_eq!(
        claim("fresh", 2, "x-other").await,
        Claim::Conflict,
        "{backend}: the fresh claim was swept"
    );
    assert_eq!(
        claim("old", 2, "x-new").await,
        Claim::Ours,
        "{backend}: forgotten, so claimable with other content"
    );
    assert_eq!(window.sweep().await.expect("sweep"), 0, "{backend}");
}

async fn quotas_keep_their_contract(quotas: &dyn QuotaCounter, backend: &str) {
    let bucket = QuotaBucket {
        key: format!("{backend}-bucket"),
        name: "test: 1/min, burst 2".into(),
        interval: Duration::from_secs(60),
        burst: 2,
    };
    assert!(
        quotas.check(&bucket).await.expect("count").is_ok(),
        "{backend}"
    );
    assert!(
        quotas.check(&bucket).await.expect("count").is_ok(),
        "{backend}"
    );
    let over = quotas
        .check(&bucket)
        .await
        .expect("count")
        .expect_err("over");
    assert_eq!(over.quota, bucket.name, "{backend}");
    assert!(
        over.retry_after > Duration::from_secs(50) && over.retry_after <= Duration::from_secs(60),
        "{backend}: {:?}",
        over.retry_after
    );

    // Many at once (counted together where the backend batches): exactly
    // the burst is admitted, whatever the order, and each refusal names
    // its wait.
    let burst = QuotaBucket {
        key: format!("{backend}-burst"),
        name: "test: 1/min, burst 5".into(),
        interval: Duration::from_secs(60),
        burst: 5,
    };
    let counts = futures::future::join_all((0..40).map(|_| quotas.check(&burst))).await;
    let admitted = counts
        .iter()
        .filter(|count| matches!(count, Ok(Ok(()))))
        .count();
    assert_eq!(admitted, 5, "{backend}: {counts:?}");
    for count in &counts {
        if let Ok(Err(over)) = count {
            assert!(
                over.retry_after > Duration::from_secs(50)
                    && over.retry_after <= Duration::from_secs(60),
                "{backend}: {:?}",
                over.retry_after
            );
        }
    }
    assert!(
        counts.iter().all(Result::is_ok),
        "{backend}: a count failed: {counts:?}"
    );
}

async fn the_log_keeps_its_contract(log: &dyn AuditStore, public_key: &[u8], backend: &str) {
    for caller in ["a", "b", "c"] {
        log.append(AuditRecord {
            caller_id: format!("spiffe://t/authority/{caller}"),
            exchange_id: format!("x-{caller}"),
            ..AuditRecord::default()
        })
        .await
        .expect("append");
    }
    // Replicas sequence within the merge delay.
    let started = Instant::now();
    let head = loop {
        match log.signed_tree_head().await.expect("head") {
            Some(head) if head.tree_size >= 3 => break head,
            _ if started.elapsed() > Duration::from_secs(20) => panic!("{backend}: not sequenced"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert_eq!(head.tree_size, 3, "{backend}");
    head.verify(public_key).expect("signed by the audit key");
    let entries = log.entries(0, 10).await.expect("entries");
    assert_eq!(entries.len(), 3, "{backend}");
    for (index, _, leaf_data) in &entries {
        let (path, leaf) = log.inclusion_proof(*index, 3).await.expect("proof");
        assert_eq!(leaf, onceonly_merkle::leaf_hash(leaf_data), "{backend}");
        onceonly_merkle::verify_inclusion(&leaf, *index, 3, &path, &head.root_hash)
            .expect("included");
    }
    let (found, next) = log
        .query(
            AuditFilter {
                caller_id: Some("spiffe://t/authority/b".into()),
                ..AuditFilter::default()
            },
            0,
            10,
        )
        .await
        .expect("query");
    assert_eq!(
        found
            .iter()
            .map(|r| r.exchange_id.as_str())
            .collect::<Vec<_>>(),
        ["x-b"],
        "{backend}"
    );
    assert_eq!(next, None, "{backend}");
    assert!(
        log.inclusion_proof(0, 4).await.is_err(),
        "{backend}: beyond the head"
    );
    assert!(log.refusing().is_none(), "{backend}");
}

#[tokio::test]
async fn every_store_in_memory_keeps_the_contract() {
    let (key, public) = audit_key();
    let stores = onceonly_store::memory::stores(key);
    let shared = stores.shared.expect("memory shares");
    consents_keep_their_contract(stores.consents.as_ref(), "memory").await;
    the_window_keeps_its_contract(shared.window, "memory").await;
    expired_claims_are_swept(
        Arc::new(onceonly_store::memory::MemoryWindow::with_window(
            SHORT_WINDOW,
        )),
        "memory",
    )
    .await;
    quotas_keep_their_contract(shared.quotas.as_ref(), "memory").await;
    the_log_keeps_its_contract(stores.audit.as_ref(), &public, "memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_stores_keep_the_contract() {
    let dir = tempfile::tempdir().expect("dir");
    let db = sled::open(dir.path()).expect("sled");
    let keys = Pseudonymiser::from_secret(&[9; 32]);
    let consents =
        onceonly_store::embedded::SledConsents::open(&db, keys.row_key()).expect("consents");
    consents_keep_their_contract(&consents, "sled").await;
    let (key, public) = audit_key();
    let (log, writer) =
        onceonly_broker::audit::AuditLog::open(dir.path(), &db, true, key).expect("log");
    the_log_keeps_its_contract(&log, &public, "embedded log").await;
    assert!(matches!(
        AuditStore::find_leaf(&log, &[0; 32], 3).await,
        Err(onceonly_store::AuditError::Unsupported(_))
    ));
    drop(log);
    writer.await.expect("the writer ends with its log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_stores_keep_the_contract() {
    let postgres = tokio::task::spawn_blocking(TestPostgres::start)
        .await
        .expect("join")
        .expect("PostgreSQL starts");
    let pool = |name: &str, synchronous_commit: bool| {
        onceonly_store_postgres::pool(&onceonly_store_postgres::PoolSettings {
            url: postgres.url("postgres"),
            password: None,
            size: 4,
            timeout: Duration::from_secs(10),
            idle_in_transaction: Duration::from_secs(10),
            tls: None,
            application_name: name.into(),
            synchronous_commit,
        })
        .expect("pool")
    };
    let requests = pool("stores-test", true);
    let mut client = requests.get().await.expect("connect");
    onceonly_store_postgres::migrate(&mut client, onceonly_store_postgres::Mode::Apply)
        .await
        .expect("schema");
    drop(client);
    let keys = Pseudonymiser::from_secret(&[9; 32]);
    let consents = onceonly_store_postgres::PgConsents::new(requests.clone(), keys.row_key());
    consents_keep_their_contract(&consents, "postgres").await;
    let window = pool("stores-test-window", false);
    the_window_keeps_its_contract(
        Arc::new(onceonly_store_postgres::PgWindow::new(
            window.clone(),
            keys.row_keys(),
            Duration::from_secs(600),
            Duration::from_secs(60),
            Duration::from_secs(10),
        )),
        "postgres",
    )
    .await;
    expired_claims_are_swept(
        Arc::new(onceonly_store_postgres::PgWindow::new(
            window.clone(),
            keys.row_keys(),
            SHORT_WINDOW,
            Duration::from_secs(60),
            Duration::from_secs(10),
        )),
        "postgres",
    )
    .await;
    quotas_keep_their_contract(
        &onceonly_store_postgres::PgQuotas::new(window, Duration::from_secs(10)),
        "postgres",
    )
    .await;
    let (key, public) = audit_key();
    let (log, writer) = onceonly_store_postgres::PgAuditLog::open(
        requests,
        pool("stores-test-sequencer", true),
        key,
        keys.row_key(),
        onceonly_store_postgres::LogSettings {
            replica: "stores-test".into(),
            merge_delay: Duration::from_millis(200),
            lease: Duration::from_secs(5),
            interval: Duration::from_millis(20),
            timeout: Duration::from_secs(10),
        },
    )
    .await
    .expect("log");
    the_log_keeps_its_contract(&log, &public, "postgres").await;
    drop(log);
    writer.await.expect("the writer ends with its log");
}
