//! The `onceonly-audit verify-dir` command as an auditor runs it: exit code
//! 0 and a summary on a clean copy, exit code 1 naming the record on a
//! tampered one.

use std::process::Command;

use onceonly_broker::audit::{AuditLog, keys, load_or_create_signing_key, public_key_path};
use onceonly_proto::v1::AuditRecord;

#[tokio::test]
async fn verify_dir_reports_clean_and_tampered_copies() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let key_path = dir.path().join("secrets/audit.key");
    {
        let db = onceonly_broker::audit::open_storage(sled::Config::new().path(&data)).expect("db");
        let (log, writer) = AuditLog::open(
            &db,
            true,
            load_or_create_signing_key(&key_path).expect("key"),
        )
        .expect("log");
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
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_onceonly-audit"))
            .arg("verify-dir")
            .arg("--data-dir")
            .arg(&data)
            .arg("--public-key")
            .arg(public_key_path(&key_path))
            .output()
            .expect("runs")
    };
    let clean = run();
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(String::from_utf8_lossy(&clean.stdout).contains("verified: 12 records"));

    {
        let db = onceonly_broker::audit::open_storage(sled::Config::new().path(&data)).expect("db");
        let tree = db.open_tree("audit").expect("tree");
        tree.remove(keys::record(4)).expect("remove");
        db.flush().expect("flush");
    }
    let tampered = run();
    assert_eq!(tampered.status.code(), Some(1));
    let message = String::from_utf8_lossy(&tampered.stderr);
    assert!(message.contains("record 4 is missing"), "{message}");
}
