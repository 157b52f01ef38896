//! A copied data directory is checked end to end with only the public key;
//! every kind of tampering is found and named where it happened.

use std::path::Path;

use onceonly_broker::audit::{AuditLog, Tamper, keys, verify_dir};
use onceonly_merkle::leaf_hash;
use onceonly_proto::v1::{AuditRecord, ExchangeOutcome};
use ring::signature::{Ed25519KeyPair, KeyPair};

const RECORDS: u64 = 40;

/// Writes `RECORDS` records in several batches; returns the public key.
async fn make_log(dir: &Path) -> Vec<u8> {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
    let public = key.public_key().as_ref().to_vec();
    let db = onceonly_broker::audit::open_storage(sled::Config::new().path(dir)).expect("db");
    let (log, writer) = AuditLog::open(&db, true, key).expect("log");
    for n in 0..RECORDS {
        log.append(AuditRecord {
            request_id: format!("req-{n}"),
            caller_id: "spiffe://onceonly.test/authority/a".into(),
            evidence_type: "birth-certificate".into(),
            outcome: ExchangeOutcome::Delivered as i32,
            payload_sha256: vec![n as u8; 32],
            ..Default::default()
        })
        .await
        .expect("append");
    }
    drop(log);
    drop(db);
    writer.await.expect("writer done");
    public
}

/// Opens the directory with raw sled, as an attacker with file access would.
fn tamper(dir: &Path, change: impl FnOnce(&sled::Tree)) {
    let db = onceonly_broker::audit::open_storage(sled::Config::new().path(dir)).expect("db");
    change(&db.open_tree("audit").expect("tree"));
    db.flush().expect("flush");
}

async fn fresh() -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().expect("dir");
    let public = make_log(dir.path()).await;
    (dir, public)
}

#[tokio::test]
async fn an_untouched_log_verifies() {
    let (dir, public) = fresh().await;
    let verified = verify_dir(dir.path(), &public).expect("clean");
    assert_eq!(verified.records, RECORDS);
}

#[tokio::test]
async fn one_changed_byte_is_found_and_named() {
    let (dir, public) = fresh().await;
    tamper(dir.path(), |tree| {
        let mut bytes = tree
            .get(keys::record(17))
            .expect("get")
            .expect("record")
            .to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01; // inside the payload digest
        tree.insert(keys::record(17), bytes).expect("insert");
    });
    assert_eq!(
        verify_dir(dir.path(), &public),
        Err(Tamper::Altered { index: 17 })
    );
}

#[tokio::test]
async fn a_deleted_record_is_found_and_named() {
    let (dir, public) = fresh().await;
    tamper(dir.path(), |tree| {
        tree.remove(keys::record(9)).expect("remove");
    });
    assert_eq!(
        verify_dir(dir.path(), &public),
        Err(Tamper::Removed { index: 9, next: 10 })
    );
}

#[tokio::test]
async fn two_swapped_records_are_found_and_named() {
    let (dir, public) = fresh().await;
    tamper(dir.path(), |tree| {
        let a = tree.get(keys::record(5)).expect("get").expect("a");
        let b = tree.get(keys::record(30)).expect("get").expect("b");
        tree.insert(keys::record(5), b).expect("insert");
        tree.insert(keys::record(30), a).expect("insert");
    });
    assert_eq!(
        verify_dir(dir.path(), &public),
        Err(Tamper::Reordered {
            position: 5,
            claims: 30
        })
    );
}

#[tokio::test]
async fn a_truncated_tail_is_found() {
    let (dir, public) = fresh().await;
    tamper(dir.path(), |tree| {
        for index in 35..RECORDS {
            tree.remove(keys::record(index)).expect("remove");
        }
    });
    assert_eq!(
        verify_dir(dir.path(), &public),
        Err(Tamper::Truncated {
            signed: RECORDS,
            present: 35
        })
    );
}

#[tokio::test]
async fn a_careful_forger_who_rewrites_leaf_hashes_is_caught_by_the_signed_heads() {
    let (dir, public) = fresh().await;
    tamper(dir.path(), |tree| {
        // Change record 22 AND its stored leaf hash, so only the tree
        // (and the signed heads over it) can tell.
        let mut bytes = tree
            .get(keys::record(22))
            .expect("get")
            .expect("record")
            .to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        tree.insert(keys::node(0, 22), leaf_hash(&bytes).to_vec())
            .expect("insert");
        tree.insert(keys::record(22), bytes).expect("insert");
    });
    match verify_dir(dir.path(), &public) {
        Err(Tamper::RootMismatch { from, to }) => {
            assert!(from <= 22 && 22 < to, "range {from}..{to} misses record 22");
            assert!(to - from <= 2, "range {from}..{to} is not narrow");
        }
        other => panic!("not caught: {other:?}"),
    }
}

#[tokio::test]
async fn a_forged_tree_head_fails_its_signature_check() {
    let (dir, public) = fresh().await;
    tamper(dir.path(), |tree| {
        use prost::Message;
        let bytes = tree.get(keys::HEAD).expect("get").expect("head");
        let mut head = onceonly_proto::v1::SignedTreeHead::decode(bytes.as_ref()).expect("decode");
        head.tree_size -= 1; // claim a shorter log
        tree.insert(keys::HEAD, head.encode_to_vec())
            .expect("insert");
    });
    assert!(matches!(
        verify_dir(dir.path(), &public),
        Err(Tamper::ForgedHead(_))
    ));

    // And a head signed by another key is refused too.
    let (dir, _) = fresh().await;
    let other = Ed25519KeyPair::from_pkcs8(
        Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .expect("key")
            .as_ref(),
    )
    .expect("key");
    assert!(matches!(
        verify_dir(dir.path(), other.public_key().as_ref()),
        Err(Tamper::ForgedHead(_))
    ));
}
