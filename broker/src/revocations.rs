//! Revocations as the signed log has them.
//!
//! A consent row carries a MAC over its fields, so no one without the
//! broker's keys can write a consent of their own. But the row as it was
//! before a revocation carries a valid MAC too, and someone who can write
//! to the store (the database, or the data disk) could write it back. So
//! revocations are also taken from where no one can take them back
//! unnoticed: every revocation leaves a record in the audit log, whose
//! signed heads the store cannot forge. [`follow`] reads the log from its
//! start, checks every entry against the latest signed head (the entries
//! must hash to its root), and keeps the consents revoked there. A
//! revocation is recorded before it is made, so it counts from the moment
//! its record is in the log, also where the consent store then failed to
//! make it (a second record says "not carried out", and the portal is
//! told to retry): failing closed, nothing written into the queue can
//! take a revocation back. The consent module's `Consents` applies them to
//! every consent it reads, whatever the row says, and notes its own
//! revocations at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use onceonly_merkle::{Frontier, leaf_hash};
use onceonly_proto::v1::{AuditRecord, RecordKind};
use onceonly_store::AuditStore;
use tonic::Code;

/// How often the log is read for new entries.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(250);
/// How long to wait after a round that did not check out.
const BACK_OFF: Duration = Duration::from_secs(5);
/// The longest one round may take (database reads included).
const ROUND_LIMIT: Duration = Duration::from_secs(60);
/// Entries read at once.
const PAGE: u64 = 1000;

#[derive(Debug, Default)]
struct Known {
    /// Consent id -> when it was revoked (Unix ms).
    revoked: HashMap<String, i64>,
}

/// The consents revoked, with when (Unix ms).
#[derive(Debug, Default)]
pub struct Revocations {
    known: RwLock<Known>,
    /// The log's size up to which it was read and checked.
    followed: AtomicU64,
    /// Rounds in which the log did not check out.
    failed_checks: AtomicU64,
    /// Consent rows read that said "active" for a consent the log has
    /// revoked.
    written_back: AtomicU64,
}

impl Revocations {
    /// When consent `id` was revoked, where it was.
    pub fn revoked_at(&self, id: &str) -> Option<i64> {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .revoked
            .get(id)
            .copied()
    }

    /// How many consents are known revoked.
    pub fn count(&self) -> usize {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .revoked
            .len()
    }

    /// Notes a revocation this broker made (before the log shows it).
    pub fn note(&self, id: &str, at_ms: i64) {
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .revoked
            .entry(id.to_owned())
            .or_insert(at_ms);
    }

    /// The log's size up to which revocations are known.
    pub fn followed(&self) -> u64 {
        self.followed.load(Ordering::Acquire)
    }

    /// Rounds in which the log's entries did not check out against its
    /// signed head.
    pub fn failed_checks(&self) -> u64 {
        self.failed_checks.load(Ordering::Relaxed)
    }

    /// Consent rows read that said "active" for a consent the log has
    /// revoked (rows written back).
    pub fn written_back(&self) -> u64 {
        self.written_back.load(Ordering::Relaxed)
    }

    /// Counts a row found written back.
    pub fn count_written_back(&self) {
        self.written_back.fetch_add(1, Ordering::Relaxed);
    }

    fn apply(&self, record: &AuditRecord) {
        // The record of the request to revoke, written before the change
        // (not the "not carried out" one that may follow it).
        if record.status_code != Code::Ok as i32 {
            return;
        }
        let at = record
            .received_at
            .as_ref()
            .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000));
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .revoked
            .entry(record.consent_id.clone())
            .or_insert(at);
    }
}

/// Why a round of reading the log stopped.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The log could not be read.
    #[error(transparent)]
    Audit(#[from] onceonly_store::AuditError),
    /// What was read does not check out against the signed head.
    #[error("{0}")]
    Mismatch(String),
}

/// Reads `audit` once from its start, checking every entry against its
/// signed head (under `public_key`), before the broker serves: no consent
/// is checked before the revocations in the log are known. Then a task
/// follows the log every interval.
pub async fn start(
    audit: &Arc<dyn AuditStore>,
    public_key: Vec<u8>,
) -> Result<Arc<Revocations>, FollowError> {
    let revocations = Arc::new(Revocations::default());
    let mut frontier = Frontier::new();
    let started = std::time::Instant::now();
    follow_once(&revocations, audit.as_ref(), &public_key, &mut frontier).await?;
    tracing::info!(
        entries = frontier.size(),
        revoked = revocations.count(),
        seconds = started.elapsed().as_secs_f64(),
        "read the consent revocations in the audit log"
    );
    tokio::spawn(follow(
        Arc::downgrade(&revocations),
        Arc::downgrade(audit),
        public_key,
        frontier,
    ));
    Ok(revocations)
}

/// Follows `audit` from `frontier` every interval, checking entries
/// against its signed heads (under `public_key`) and noting revocations,
/// until `revocations` or the log is dropped (it holds neither between
/// rounds: the log's writer ends with its last handle).
async fn follow(
    revocations: Weak<Revocations>,
    audit: Weak<dyn AuditStore>,
    public_key: Vec<u8>,
    mut frontier: Frontier,
) {
    let mut pause = FOLLOW_INTERVAL;
    loop {
        tokio::time::sleep(pause).await;
        let (Some(revocations), Some(audit)) = (revocations.upgrade(), audit.upgrade()) else {
            return;
        };
        let round = tokio::time::timeout(
            ROUND_LIMIT,
            follow_once(&revocations, audit.as_ref(), &public_key, &mut frontier),
        )
        .await
        .unwrap_or_else(|_| {
            Err(FollowError::Mismatch(format!(
                "a round took longer than {ROUND_LIMIT:?}"
            )))
        });
        pause = match round {
            Ok(()) => FOLLOW_INTERVAL,
            Err(e) => {
                revocations.failed_checks.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "reading revocations from the audit log failed; consents revoked since are known only from their rows");
                BACK_OFF
            }
        };
    }
}

async fn follow_once(
    revocations: &Revocations,
    audit: &dyn AuditStore,
    public_key: &[u8],
    frontier: &mut Frontier,
) -> Result<(), FollowError> {
    let Some(head) = audit.signed_tree_head().await? else {
        return Ok(());
    };
    head.verify(public_key).map_err(|e| {
        FollowError::Mismatch(format!(
            "the log's latest head (of {} records) does not verify: {e}",
            head.tree_size
        ))
    })?;
    if head.tree_size < frontier.size() {
        return Err(FollowError::Mismatch(format!(
            "the log's latest head covers {} records, fewer than the {} already read",
            head.tree_size,
            frontier.size()
        )));
    }
    // Read into a copy: only a stretch that hashes to the head counts.
    let mut next = frontier.clone();
    let mut records = Vec::new();
    while next.size() < head.tree_size {
        let start = next.size();
        let entries = audit
            .entries(start, PAGE.min(head.tree_size - start))
            .await?;
        if entries.is_empty() {
            return Err(FollowError::Mismatch(format!(
                "the log has no entry {start}, below its signed size {}",
                head.tree_size
            )));
        }
        for (index, record, leaf_data) in entries {
            if index != next.size() {
                return Err(FollowError::Mismatch(format!(
                    "the log skips from entry {} to {index}",
                    next.size()
                )));
            }
            if index >= head.tree_size {
                break;
            }
            next.push(leaf_hash(&leaf_data));
            // Only what counts is kept (a long stretch of the log is not).
            if record.kind() == RecordKind::ConsentRevoked && !record.consent_id.is_empty() {
                records.push(record);
            }
        }
    }
    if next.root() != head.root_hash {
        return Err(FollowError::Mismatch(format!(
            "the log's entries up to {} do not hash to its signed head: entries were edited or replaced",
            head.tree_size
        )));
    }
    for record in &records {
        revocations.apply(record);
    }
    *frontier = next;
    revocations
        .followed
        .store(frontier.size(), Ordering::Release);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use onceonly_proto::time::timestamp;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn revocation(id: &str, ok: bool) -> AuditRecord {
        AuditRecord {
            kind: RecordKind::ConsentRevoked as i32,
            consent_id: id.into(),
            received_at: Some(timestamp(5_000)),
            status_code: if ok { 0 } else { Code::Unavailable as i32 },
            ..AuditRecord::default()
        }
    }

    #[tokio::test]
    async fn a_revocation_counts_from_its_record_and_nothing_later_takes_it_back() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let public = key.public_key().as_ref().to_vec();
        let log = Arc::new(onceonly_store::memory::MemoryAudit::new(key));
        for record in [
            revocation("cns-a", true),
            AuditRecord::default(),
            // A revocation whose change failed still counts (fail closed):
            // a "not carried out" record, genuine or replayed, takes
            // nothing back.
            revocation("cns-b", true),
            revocation("cns-b", false),
            revocation("cns-c", false),
        ] {
            log.append(record).await.expect("append");
        }
        let revocations = Revocations::default();
        let mut frontier = Frontier::new();
        follow_once(&revocations, log.as_ref(), &public, &mut frontier)
            .await
            .expect("the log checks out");
        assert_eq!(revocations.followed(), 5);
        assert_eq!(revocations.revoked_at("cns-a"), Some(5_000));
        assert_eq!(revocations.revoked_at("cns-b"), Some(5_000));
        assert_eq!(
            revocations.revoked_at("cns-c"),
            None,
            "only a failure record"
        );
        // Another key's heads do not count.
        let other = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let other = Ed25519KeyPair::from_pkcs8(other.as_ref()).expect("key");
        assert!(
            follow_once(
                &revocations,
                log.as_ref(),
                other.public_key().as_ref(),
                &mut Frontier::new()
            )
            .await
            .is_err()
        );
    }
}
