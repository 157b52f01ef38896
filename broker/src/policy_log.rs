//! The policy's history in the audit log: every policy the broker puts in
//! force, at start or on a reload, becomes a log entry of its own
//! (`RECORD_KIND_POLICY_APPLIED`: the text's digest, its version, who or
//! what applied it, what changed), and every exchange record names the
//! policy that decided it (`policy_sha256`, `policy_version`, with
//! `policy_rule`). The texts are kept under their digests beside the log
//! ([`crate::policy::PolicyStore::keep_history`]), so an auditor proves
//! which text allowed an exchange: `onceonly-audit policy-at INDEX`.

use std::sync::Arc;
use std::time::Duration;

use onceonly_proto::time::{now_ms, timestamp};
use onceonly_proto::v1::{AuditRecord, RecordKind};

use crate::exchange::Broker;
use crate::policy::Applied;

/// The folder in the data directory the texts are kept in.
pub const FOLDER: &str = "policies";

/// The log entry of `applied`, by broker `broker_id` (its SPIFFE id).
pub fn entry(broker_id: &str, applied: &Applied) -> AuditRecord {
    AuditRecord {
        kind: RecordKind::PolicyApplied as i32,
        caller_id: broker_id.to_owned(),
        received_at: Some(timestamp(now_ms())),
        policy_sha256: applied.policy.sha256().to_vec(),
        policy_version: applied.policy.version(),
        policy_applied_by: applied.by.clone(),
        policy_changes: applied
            .previous
            .as_ref()
            .map(|previous| crate::policy_diff::diff(previous, &applied.policy))
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// Writes the entries of the policies put in force so far (at start,
/// and at the end of serving, after [`keep_writing`] stopped); Err where
/// the log refuses, the entries left queued.
pub async fn write_pending(broker: &Broker) -> Result<usize, onceonly_store::AuditError> {
    let pending = broker.policy.take_applied();
    for (written, applied) in pending.iter().enumerate() {
        if let Err(error) = write_one(broker, applied).await {
            broker.policy.requeue(pending[written..].to_vec());
            return Err(error);
        }
    }
    Ok(pending.len())
}

async fn write_one(broker: &Broker, applied: &Applied) -> Result<(), onceonly_store::AuditError> {
    let me = broker.tls.identity().spiffe_id();
    broker.audit.append(entry(&me, applied)).await?;
    tracing::info!(
        version = applied.policy.version(),
        sha256 = %hex::encode(applied.policy.sha256()),
        by = %applied.by,
        "policy in force, recorded in the audit log"
    );
    Ok(())
}

/// Writes each policy's entry as it is put in force, for as long as the
/// broker serves (aborted at its end; [`write_pending`] then writes what
/// is left); a refused append is tried again. An entry leaves the queue
/// only once written.
pub async fn keep_writing(broker: Arc<Broker>) {
    loop {
        let applied = broker.policy.next_applied().await;
        match write_one(&broker, &applied).await {
            Ok(()) => broker.policy.written(),
            Err(error) => {
                tracing::error!(%error, "the policy's log entry could not be written yet; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
