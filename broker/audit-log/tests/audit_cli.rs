//! The `onceonly-audit verify-dir` command as an auditor runs it: exit code
//! 0 and a summary on a clean copy, exit code 1 naming the record on a
//! tampered one.

use std::process::Command;

use onceonly_audit_log::segment::{self, FILE_NAME, Frame};
use onceonly_audit_log::{AuditLog, public_key_path};
use onceonly_proto::v1::AuditRecord;
use ring::signature::{Ed25519KeyPair, KeyPair};

/// A fresh audit key, its public half written where the broker writes it
/// (hex, beside the key), as an auditor receives it.
fn new_key(key_path: &std::path::Path) -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
    let public = public_key_path(key_path);
    std::fs::create_dir_all(public.parent().expect("dir")).expect("dir");
    std::fs::write(
        &public,
        format!("{}\n", hex::encode(key.public_key().as_ref())),
    )
    .expect("pub");
    key
}

#[tokio::test]
async fn verify_dir_reports_clean_and_tampered_copies() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let key_path = dir.path().join("secrets/audit.key");
    {
        let db = onceonly_audit_log::open_storage(sled::Config::new().path(&data)).expect("db");
        let (log, writer) = AuditLog::open(&data, &db, true, new_key(&key_path)).expect("log");
        for n in 0..12 {
            log.append(AuditRecord {
                request_id: format!("r{n}"),
                ..Default::default()
            })
            .await
            .expect("append");
        }
        drop(log);
        drop(db);
        writer.await.expect("writer");
    }
    let saved = dir.path().join("saved-head.json");
    let run = |extra: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_onceonly-audit"))
            .arg("verify-dir")
            .arg("--data-dir")
            .arg(&data)
            .arg("--public-key")
            .arg(public_key_path(&key_path))
            .args(extra)
            .output()
            .expect("runs")
    };
    let clean = run(&["--save-head".as_ref(), saved.as_os_str()]);
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(String::from_utf8_lossy(&clean.stdout).contains("verified: 12 records"));

    assert!(saved.exists(), "no head saved");
    let log_file = data.join(FILE_NAME);
    let frames: Vec<Frame> = segment::read_all(&log_file)
        .expect("read")
        .into_iter()
        .map(|(_, frame, _)| frame)
        .collect();

    // Whole batches cut off the end: caught against the saved head only.
    segment::write_all(&log_file, &frames[..frames.len() - 2]).expect("write");
    assert!(run(&[]).status.success());
    let cut = run(&["--saved-head".as_ref(), saved.as_os_str()]);
    assert_eq!(cut.status.code(), Some(1));
    let message = String::from_utf8_lossy(&cut.stderr);
    assert!(message.contains("the log was truncated"), "{message}");

    // A record removed from the middle: named.
    let mut tampered_frames = frames.clone();
    let frame = tampered_frames
        .iter_mut()
        .find(|f| f.first_index <= 4 && 4 < f.first_index + f.records.len() as u64)
        .expect("frame of record 4");
    frame.records.remove((4 - frame.first_index) as usize);
    segment::write_all(&log_file, &tampered_frames).expect("write");
    let tampered = run(&[]);
    assert_eq!(tampered.status.code(), Some(1));
    let message = String::from_utf8_lossy(&tampered.stderr);
    assert!(message.contains("record 4 is missing"), "{message}");
}

#[test]
fn check_receipt_offline_accepts_a_signed_receipt_and_refuses_an_altered_one() {
    use prost::Message;
    let dir = tempfile::tempdir().expect("dir");
    let key_path = dir.path().join("secrets/audit.key");
    let key = new_key(&key_path);
    let leaves: Vec<(onceonly_merkle::Hash, String)> = (0..3)
        .map(|n| {
            (
                onceonly_merkle::leaf_hash(format!("record {n}").as_bytes()),
                format!("ex-{n}"),
            )
        })
        .collect();
    let receipt =
        onceonly_audit_log::receipt::sign_batch(&key, "replica-1", &leaves, 1_000, 3_000).remove(1);
    let check = |receipt: &onceonly_proto::v1::AuditReceipt, as_hex: bool| {
        let file = dir.path().join("receipt");
        let bytes = receipt.encode_to_vec();
        if as_hex {
            std::fs::write(&file, hex::encode(&bytes)).expect("write");
        } else {
            std::fs::write(&file, &bytes).expect("write");
        }
        Command::new(env!("CARGO_BIN_EXE_onceonly-audit"))
            .arg("check-receipt")
            .arg("--receipt")
            .arg(&file)
            .arg("--public-key")
            .arg(public_key_path(&key_path))
            .arg("--offline")
            .output()
            .expect("runs")
    };
    for as_hex in [false, true] {
        let good = check(&receipt, as_hex);
        assert!(
            good.status.success(),
            "{}",
            String::from_utf8_lossy(&good.stderr)
        );
        let out = String::from_utf8_lossy(&good.stdout);
        assert!(
            out.contains("receipt verified") && out.contains("ex-1") && out.contains("3000 ms"),
            "{out}"
        );
    }
    let mut moved = receipt.clone();
    moved.exchange_id = "ex-2".into();
    let refused = check(&moved, true);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not in the batch"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
