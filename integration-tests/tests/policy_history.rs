//! The policy's history in the audit log: the policy in force at start and
//! after each reload is a log entry of its own; each exchange record names
//! the policy (digest, version) and rule that decided it; and
//! `onceonly-audit policy-at` proves offline which text that was.

use std::time::Duration;

use onceonly_integration_tests::binary;
use onceonly_integration_tests::world::{AUTHORITIES, SAMPLE_POLICY, World, birth_certificate};
use onceonly_proto::v1::{AuditRecord, RecordKind};
use sha2::{Digest, Sha256};

const BERLIN: &str = AUTHORITIES[0];
const KOELN: &str = AUTHORITIES[2];

/// A rule that lets Köln fetch birth certificates too.
const KOELN_BIRTH: &str = r#"
[[rule]]
id = "koeln-birth"
callers = ["kfz-steuer-koeln"]
evidence_types = ["birth-certificate"]
purposes = ["parental-allowance"]
legal_bases = ["§ 9 Abs. 1 BEEG"]
consent = "not-required"
"#;

async fn policy_entries(world: &World) -> Vec<AuditRecord> {
    world
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r.kind() == RecordKind::PolicyApplied)
        .collect()
}

async fn wait_for_entries(world: &World, count: usize) -> Vec<AuditRecord> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let entries = policy_entries(world).await;
        if entries.len() >= count {
            return entries;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} policy entries, not {count}: {entries:?}",
            entries.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn policy_at(world: &World, index: u64) -> std::process::Output {
    std::process::Command::new(binary("onceonly-audit", "onceonly-audit-log"))
        .arg("policy-at")
        .arg(index.to_string())
        .arg("--data-dir")
        .arg(world.dir.path().join("data"))
        .arg("--public-key")
        .arg(world.dir.path().join("secrets/audit.key.pub"))
        .output()
        .expect("runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_in_force_is_logged_and_policy_at_proves_which_text_decided_an_exchange() {
    let mut world = World::start().await;
    let first_digest = Sha256::digest(SAMPLE_POLICY.as_bytes()).to_vec();
    let entries = wait_for_entries(&world, 1).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].policy_sha256, first_digest);
    assert_eq!(entries[0].policy_version, 1);
    assert_eq!(entries[0].policy_applied_by, "the broker's start");
    assert!(entries[0].policy_changes.is_empty());

    world
        .authority(BERLIN)
        .request_evidence(birth_certificate("under-version-1"))
        .await
        .expect("evidence");
    world.settle().await;
    let first = world
        .wait_for_records("under-version-1", 1, Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(
        (first.policy_version, first.policy_sha256.clone()),
        (1, first_digest.clone())
    );
    assert_eq!(first.policy_rule, "parental-allowance-birth-certificate");

    // An edit, reloaded: its own entry, version 2, with what changed.
    let edited = format!("{SAMPLE_POLICY}{KOELN_BIRTH}");
    std::fs::write(world.policy_path(), &edited).expect("write");
    world
        .running_broker()
        .broker()
        .expect("running")
        .policy
        .reload()
        .expect("reloads");
    let entries = wait_for_entries(&world, 2).await;
    let second_digest = Sha256::digest(edited.as_bytes()).to_vec();
    assert_eq!(entries[1].policy_sha256, second_digest);
    assert_eq!(entries[1].policy_version, 2);
    assert_eq!(entries[1].policy_applied_by, "a change of the policy file");
    assert!(
        entries[1]
            .policy_changes
            .iter()
            .any(|c| c.starts_with("rule \"koeln-birth\" added")),
        "{:?}",
        entries[1].policy_changes
    );

    // The next exchange is decided by it, and its record says so.
    world
        .authority(KOELN)
        .request_evidence(birth_certificate("under-version-2"))
        .await
        .expect("allowed by the new rule");
    world.settle().await;
    let second = world
        .wait_for_records("under-version-2", 1, Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(
        (
            second.policy_version,
            second.policy_sha256.clone(),
            second.policy_rule.as_str()
        ),
        (2, second_digest, "koeln-birth")
    );

    // Offline, from the data directory: which text decided each.
    let shown = policy_at(&world, second.log_index);
    let out = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert!(
        out.contains("allowed by rule \"koeln-birth\" of policy version 2"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "put in force at record {} by a change of the policy file",
            entries[1].log_index
        )),
        "{out}"
    );
    assert!(out.contains("verified:"), "{out}");
    assert!(out.ends_with(&format!("---\n{edited}")), "{out}");
    let shown = policy_at(&world, first.log_index);
    let out = String::from_utf8_lossy(&shown.stdout);
    assert!(out.contains("of policy version 1"), "{out}");
    assert!(!out.contains("koeln-birth"), "{out}");

    // The kept text altered: refused, naming the file.
    let kept = world
        .dir
        .path()
        .join("data/policies")
        .join(format!("{}.toml", hex::encode(&second.policy_sha256)));
    std::fs::write(
        &kept,
        edited.replace("kfz-steuer-koeln", "elterngeld-berlin"),
    )
    .expect("alter");
    let refused = policy_at(&world, second.log_index);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("NOT VERIFIED") && err.contains(&kept.display().to_string()),
        "{err}"
    );
    std::fs::write(&kept, &edited).expect("restore");

    // A restart on the same text: an entry of its own, the same version.
    world.stop_broker().await;
    world.start_broker().await;
    let entries = wait_for_entries(&world, 3).await;
    assert_eq!(entries[2].policy_version, 2);
    assert_eq!(entries[2].policy_applied_by, "the broker's start");
}
