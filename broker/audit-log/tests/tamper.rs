//! A copied data directory is checked end to end with only the public key;
//! every kind of tampering is found and named where it happened. The
//! attacker here is careful: they rewrite the log file with correct frame
//! checksums, so only the tree and the signed heads can tell.

use std::path::Path;

use onceonly_audit_log::segment::{self, FILE_NAME, Frame};
use onceonly_audit_log::{AuditLog, Tamper, verify_dir, verify_dir_against};
use onceonly_merkle::{Frontier, leaf_hash};
use onceonly_proto::v1::{AuditRecord, ExchangeOutcome};
use prost::Message;
use ring::signature::{Ed25519KeyPair, KeyPair};

const RECORDS: u64 = 40;
/// Appends in flight at once while writing the log, so batches (frames)
/// hold several records.
const WAVE: u64 = 8;

fn record(n: u64) -> AuditRecord {
    AuditRecord {
        request_id: format!("req-{n}"),
        caller_id: "spiffe://onceonly.test/authority/a".into(),
        evidence_type: "birth-certificate".into(),
        outcome: ExchangeOutcome::Delivered as i32,
        payload_sha256: vec![n as u8; 32],
        ..Default::default()
    }
}

/// A log written with one key.
struct Written {
    pkcs8: Vec<u8>,
    public: Vec<u8>,
    head: onceonly_merkle::sth::SignedTreeHead,
}

/// Writes `RECORDS` records in several batches.
async fn make_log(dir: &Path) -> Written {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .expect("key")
        .as_ref()
        .to_vec();
    let key = Ed25519KeyPair::from_pkcs8(&pkcs8).expect("key");
    let public = key.public_key().as_ref().to_vec();
    let db = onceonly_audit_log::open_storage(sled::Config::new().path(dir)).expect("db");
    let (log, writer) = AuditLog::open(dir, &db, true, key).expect("log");
    for wave in 0..RECORDS / WAVE {
        // Held until the whole wave is queued: one frame per wave.
        log.hold_commits(true);
        let appends: Vec<_> = (0..WAVE)
            .map(|n| {
                let log = log.clone();
                tokio::spawn(async move { log.append(record(wave * WAVE + n)).await })
            })
            .collect();
        while log.queued() < (WAVE - 1) as usize {
            tokio::task::yield_now().await;
        }
        log.hold_commits(false);
        for append in appends {
            append.await.expect("task").expect("append");
        }
    }
    let head = log.signed_tree_head().expect("head").expect("some");
    drop(log);
    drop(db);
    writer.await.expect("writer done");
    Written {
        pkcs8,
        public,
        head,
    }
}

/// Rewrites the log file as an attacker with file access would.
fn tamper(dir: &Path, change: impl FnOnce(&mut Vec<Frame>)) {
    let path = dir.join(FILE_NAME);
    let mut frames: Vec<Frame> = segment::read_all(&path)
        .expect("read")
        .into_iter()
        .map(|(_, frame, _)| frame)
        .collect();
    change(&mut frames);
    segment::write_all(&path, &frames).expect("write");
}

/// The frame holding record `index`, and its place in it.
fn locate(frames: &mut [Frame], index: u64) -> (&mut Frame, usize) {
    let frame = frames
        .iter_mut()
        .find(|f| f.first_index <= index && index < f.first_index + f.records.len() as u64)
        .expect("a frame holds it");
    let at = (index - frame.first_index) as usize;
    (frame, at)
}

async fn fresh() -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().expect("dir");
    let written = make_log(dir.path()).await;
    (dir, written.public)
}

#[tokio::test]
async fn an_untouched_log_verifies_and_was_written_in_batches() {
    let (dir, public) = fresh().await;
    let verified = verify_dir(dir.path(), &public).expect("clean");
    assert_eq!(verified.records, RECORDS);
    let frames = segment::read_all(&dir.path().join(FILE_NAME)).expect("read");
    assert_eq!(
        frames.len() as u64,
        RECORDS / WAVE,
        "one frame per wave of {WAVE} appends"
    );
}

#[tokio::test]
async fn one_changed_byte_is_found_and_named() {
    let (dir, public) = fresh().await;
    tamper(dir.path(), |frames| {
        let (frame, at) = locate(frames, 17);
        let last = frame.records[at].len() - 1;
        frame.records[at][last] ^= 0x01; // inside the payload digest
    });
    assert_eq!(
        verify_dir(dir.path(), &public),
        Err(Tamper::Altered { index: 17 })
    );
}

#[tokio::test]
async fn a_byte_flipped_on_disk_is_found_and_stops_a_rebuild_of_the_index() {
    let (dir, public) = fresh().await;
    let path = dir.path().join(FILE_NAME);
    let frames = segment::read_all(&path).expect("read");
    let (offset, frame, _) = &frames[1];
    let mut bytes = std::fs::read(&path).expect("read");
    // The last byte of the frame's last record, checksum left as it was.
    let end = (*offset + frame.encode().len() as u64 - 1) as usize;
    bytes[end] ^= 0x01;
    std::fs::write(&path, bytes).expect("write");
    let last_of_frame = frame.first_index + frame.records.len() as u64 - 1;
    assert_eq!(
        verify_dir(dir.path(), &public),
        Err(Tamper::Altered {
            index: last_of_frame
        })
    );
    // Opening reads only the frames its index has not seen; rebuilding
    // the index reads them all and refuses the damaged one.
    let db = onceonly_audit_log::open_storage(sled::Config::new().path(dir.path())).expect("db");
    db.drop_tree("audit-index").expect("drop");
    let refused = AuditLog::open(dir.path(), &db, true, key());
    let Err(error) = refused else {
        panic!("a damaged log was opened");
    };
    assert!(error.to_string().contains("fails its checksum"), "{error}");
}

#[tokio::test]
async fn a_deleted_record_is_found_and_named() {
    let (dir, public) = fresh().await;
    tamper(dir.path(), |frames| {
        let (frame, at) = locate(frames, 9);
        frame.records.remove(at);
    });
    assert_eq!(
        verify_dir(dir.path(), &public),
        Err(Tamper::Removed { index: 9, next: 10 })
    );
}

#[tokio::test]
async fn two_swapped_records_are_found_and_named() {
    let (dir, public) = fresh().await;
    tamper(dir.path(), |frames| {
        let a = {
            let (frame, at) = locate(frames, 5);
            frame.records[at].clone()
        };
        let b = {
            let (frame, at) = locate(frames, 30);
            std::mem::replace(&mut frame.records[at], a)
        };
        let (frame, at) = locate(frames, 5);
        frame.records[at] = b;
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
async fn records_cut_from_under_the_last_head_are_found() {
    let (dir, public) = fresh().await;
    let mut last_frame_start = 0;
    tamper(dir.path(), |frames| {
        let last = frames.last_mut().expect("frames");
        last_frame_start = last.first_index;
        // Records and their tree nodes gone; the head still covers them.
        last.records.clear();
        last.nodes.clear();
    });
    assert_eq!(
        verify_dir(dir.path(), &public),
        Err(Tamper::Truncated {
            signed: RECORDS,
            present: last_frame_start
        })
    );
}

#[tokio::test]
async fn whole_batches_cut_off_are_found_against_a_saved_head() {
    let dir = tempfile::tempdir().expect("dir");
    let Written {
        public,
        head: saved,
        ..
    } = make_log(dir.path()).await;
    let mut kept = 0;
    tamper(dir.path(), |frames| {
        frames.truncate(frames.len() / 2);
        let last = frames.last().expect("frames");
        kept = last.first_index + last.records.len() as u64;
    });
    // Alone, a shorter log looks like an earlier one: nothing names it...
    assert_eq!(
        verify_dir(dir.path(), &public)
            .expect("looks clean")
            .records,
        kept
    );
    // ...but an auditor who kept the head of the last check sees the cut.
    assert_eq!(
        verify_dir_against(dir.path(), &public, Some(&saved)),
        Err(Tamper::Truncated {
            signed: RECORDS,
            present: kept
        })
    );
    // A clean log passes against its own head; a head from another key
    // is no evidence about it.
    let clean = tempfile::tempdir().expect("dir");
    let written = make_log(clean.path()).await;
    verify_dir_against(clean.path(), &written.public, Some(&written.head)).expect("extends");
    let other = tempfile::tempdir().expect("dir");
    let other_saved = make_log(other.path()).await.head;
    assert!(matches!(
        verify_dir_against(clean.path(), &written.public, Some(&other_saved)),
        Err(Tamper::Unreadable(_))
    ));
}

#[tokio::test]
async fn a_careful_forger_who_rewrites_the_tree_is_caught_by_the_signed_heads() {
    let (dir, public) = fresh().await;
    tamper(dir.path(), |frames| {
        // Change record 22 AND recompute every stored tree node, so only
        // the signed heads can tell.
        let (frame, at) = locate(frames, 22);
        let last = frame.records[at].len() - 1;
        frame.records[at][last] ^= 0x01;
        let mut frontier = Frontier::new();
        for frame in frames.iter_mut() {
            frame.nodes = frame
                .records
                .iter()
                .flat_map(|r| frontier.push(leaf_hash(r)))
                .map(|(_, _, hash)| hash)
                .collect();
        }
    });
    match verify_dir(dir.path(), &public) {
        Err(Tamper::RootMismatch { from, to }) => {
            assert!(from <= 22 && 22 < to, "range {from}..{to} misses record 22");
            assert!(to - from <= WAVE, "range {from}..{to} is not one batch");
        }
        other => panic!("not caught: {other:?}"),
    }
}

#[tokio::test]
async fn rewritten_tree_nodes_are_found() {
    let (dir, public) = fresh().await;
    tamper(dir.path(), |frames| {
        // A node above the leaves: proofs from it would be wrong.
        let frame = frames
            .iter_mut()
            .find(|f| f.nodes.len() > f.records.len())
            .expect("a frame completing an inner node");
        let inner = frame.nodes.len() - 1;
        frame.nodes[inner][0] ^= 0x01;
    });
    assert!(matches!(
        verify_dir(dir.path(), &public),
        Err(Tamper::TreeNodes { .. })
    ));
}

#[tokio::test]
async fn a_forged_tree_head_fails_its_signature_check() {
    let (dir, public) = fresh().await;
    tamper(dir.path(), |frames| {
        let last = frames.last_mut().expect("frames");
        let mut head =
            onceonly_proto::v1::SignedTreeHead::decode(last.head.as_slice()).expect("decode");
        head.timestamp = None; // any change breaks the signature
        last.head = head.encode_to_vec();
    });
    assert!(matches!(
        verify_dir(dir.path(), &public),
        Err(Tamper::ForgedHead(_))
    ));

    // And a head signed by another key is refused too.
    let (dir, _) = fresh().await;
    assert!(matches!(
        verify_dir(dir.path(), key().public_key().as_ref()),
        Err(Tamper::ForgedHead(_))
    ));
}

#[tokio::test]
async fn a_torn_last_frame_is_cut_off_on_reopening_and_the_log_goes_on() {
    let dir = tempfile::tempdir().expect("dir");
    let written = make_log(dir.path()).await;
    let path = dir.path().join(FILE_NAME);
    // Half a frame after the last one (into the space the writer reserved
    // ahead, or at the end of the file), as a crash in the middle of a
    // write leaves.
    let (half, data_end) = {
        let frames = segment::read_all(&path).expect("read");
        let bytes = frames[0].1.encode();
        let (last_offset, last, _) = frames.last().expect("frames");
        (
            bytes[..bytes.len() / 2].to_vec(),
            last_offset + last.encode().len() as u64,
        )
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&file, &half, data_end).expect("write");
    drop(file);
    assert_eq!(
        verify_dir(dir.path(), &written.public)
            .expect("torn tail ignored")
            .records,
        RECORDS
    );
    let db = onceonly_audit_log::open_storage(sled::Config::new().path(dir.path())).expect("db");
    // The index is thrown away too: reopening rebuilds it from the file.
    db.drop_tree("audit-index").expect("drop");
    let signing = Ed25519KeyPair::from_pkcs8(&written.pkcs8).expect("key");
    let (log, writer) = AuditLog::open(dir.path(), &db, true, signing).expect("reopens");
    assert_eq!(log.len(), RECORDS);
    assert_eq!(log.append(record(RECORDS)).await.expect("append"), RECORDS);
    let (found, _) = log
        .query(
            &onceonly_audit_log::AuditFilter {
                caller_id: Some("spiffe://onceonly.test/authority/a".into()),
                ..Default::default()
            },
            0,
            100,
        )
        .expect("query");
    assert_eq!(found.len() as u64, RECORDS + 1);
    drop(log);
    drop(db);
    writer.await.expect("writer");
    let verified = verify_dir_against(dir.path(), &written.public, Some(&written.head))
        .expect("the reopened log extends the old one");
    assert_eq!(verified.records, RECORDS + 1);
}

fn key() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
}
