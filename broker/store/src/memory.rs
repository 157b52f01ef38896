//! In-memory stores for tests: the request path and its refusals tried
//! without disk, database or TLS. They keep the same contracts as the real
//! backends (the log is a real Merkle tree with signed heads; consents keep
//! their first revocation; the window and the quotas answer like
//! PostgreSQL's), and lose everything with the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use onceonly_audit_log::{AuditError, AuditFault, AuditFilter, AuditMetrics};
use onceonly_merkle::sth::SignedTreeHead;
use onceonly_merkle::{Hash, ProofError, leaf_hash};
use onceonly_proto::v1::AuditRecord;
use prost::Message;
use ring::signature::Ed25519KeyPair;

use crate::audit::{Appended, AuditStore, LogEntry};
use crate::consent::{ConsentError, ConsentQuery, ConsentStore, StoredConsent};
use crate::quota::{OverQuota, QuotaBucket, QuotaCounter, QuotaError};
use crate::window::{Claim, RequestWindow, StoredOutcome, WindowError};
use crate::{Shared, Stores};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// All four stores in memory, the log's heads signed by `key`.
pub fn stores(key: Ed25519KeyPair) -> Stores {
    Stores {
        audit: Arc::new(MemoryAudit::new(key)),
        consents: Arc::new(MemoryConsents::default()),
        shared: Some(Shared {
            window: Arc::new(MemoryWindow::default()),
            quotas: Arc::new(MemoryQuotas::default()),
        }),
    }
}

struct Log {
    /// Each record and the bytes its leaf is taken of.
    entries: Vec<(AuditRecord, Vec<u8>)>,
    leaves: Vec<Hash>,
    head: Option<SignedTreeHead>,
}

/// A Merkle log in memory: every append is in a signed head at once.
pub struct MemoryAudit {
    key: Ed25519KeyPair,
    log: Mutex<Log>,
    fault: AtomicU8,
    metrics: AuditMetrics,
}

impl MemoryAudit {
    /// An empty log whose heads `key` signs.
    pub fn new(key: Ed25519KeyPair) -> Self {
        MemoryAudit {
            key,
            log: Mutex::new(Log {
                entries: Vec::new(),
                leaves: Vec::new(),
                head: None,
            }),
            fault: AtomicU8::new(AuditFault::None as u8),
            metrics: AuditMetrics::default(),
        }
    }

    /// Every record so far, in log order.
    pub fn records(&self) -> Vec<AuditRecord> {
        lock(&self.log)
            .entries
            .iter()
            .map(|(record, _)| record.clone())
            .collect()
    }

    fn check_size(log: &Log, size: u64) -> Result<(), AuditError> {
        if size > log.leaves.len() as u64 {
            return Err(AuditError::OutOfRange(format!(
                "tree size {size} exceeds the log's {} records",
                log.leaves.len()
            )));
        }
        Ok(())
    }
}

fn proof_error(e: ProofError<std::convert::Infallible>) -> AuditError {
    match e {
        ProofError::OutOfRange(reason) => AuditError::OutOfRange(reason),
        ProofError::Store(never) => match never {},
    }
}

#[async_trait::async_trait]
impl AuditStore for MemoryAudit {
    async fn append(&self, mut record: AuditRecord) -> Result<Appended, AuditError> {
        if self.fault.load(Ordering::SeqCst) != AuditFault::None as u8 {
            return Err(AuditError::Storage("injected fault: appends fail".into()));
        }
        let mut log = lock(&self.log);
        let index = log.entries.len() as u64;
        record.log_index = index;
        let bytes = record.encode_to_vec();
        log.leaves.push(leaf_hash(&bytes));
        log.entries.push((record, bytes));
        let Ok(root) = onceonly_merkle::root(log.leaves.as_slice(), index + 1);
        let now = u64::try_from(onceonly_proto::time::now_ms()).unwrap_or(0);
        log.head = Some(SignedTreeHead::sign(&self.key, index + 1, root, now));
        Ok(Appended {
            index: Some(index),
            receipt: None,
        })
    }

    async fn signed_tree_head(&self) -> Result<Option<SignedTreeHead>, AuditError> {
        Ok(lock(&self.log).head.clone())
    }

    async fn inclusion_proof(
        &self,
        index: u64,
        size: u64,
    ) -> Result<(Vec<Hash>, Hash), AuditError> {
        let log = lock(&self.log);
        Self::check_size(&log, size)?;
        let path = onceonly_merkle::inclusion_proof(log.leaves.as_slice(), index, size)
            .map_err(proof_error)?;
        Ok((path, log.leaves[index as usize]))
    }

    async fn find_leaf(&self, leaf: &Hash, size: u64) -> Result<Option<u64>, AuditError> {
        let log = lock(&self.log);
        Ok(log
            .leaves
            .iter()
            .take(size as usize)
            .position(|l| l == leaf)
            .map(|i| i as u64))
    }

    async fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, AuditError> {
        let log = lock(&self.log);
        Self::check_size(&log, second)?;
        onceonly_merkle::consistency_proof(log.leaves.as_slice(), first, second)
            .map_err(proof_error)
    }

    async fn entries(&self, start: u64, max: u64) -> Result<Vec<LogEntry>, AuditError> {
        let log = lock(&self.log);
        Ok(log
            .entries
            .iter()
            .enumerate()
            .skip(start as usize)
            .take(max as usize)
            .map(|(i, (record, bytes))| (i as u64, record.clone(), bytes.clone()))
            .collect())
    }

    async fn query(
        &self,
        filter: AuditFilter,
        start: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), AuditError> {
        let log = lock(&self.log);
        let mut found = Vec::new();
        for (index, (record, _)) in log.entries.iter().enumerate().skip(start as usize) {
            if !filter.matches(record) {
                continue;
            }
            if found.len() == limit {
                return Ok((found, Some(index as u64)));
            }
            found.push(record.clone());
        }
        Ok((found, None))
    }

    fn refusing(&self) -> Option<String> {
        (self.fault.load(Ordering::SeqCst) != AuditFault::None as u8)
            .then(|| "injected fault: the in-memory log refuses appends".to_owned())
    }

    fn tree_size(&self) -> u64 {
        lock(&self.log).leaves.len() as u64
    }

    fn metrics(&self) -> &AuditMetrics {
        &self.metrics
    }

    fn inject(&self, fault: AuditFault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }
}

/// Consents in memory.
#[derive(Default)]
pub struct MemoryConsents {
    consents: Mutex<BTreeMap<String, StoredConsent>>,
}

impl MemoryConsents {
    /// A subject's consents, newest first.
    fn of_subject(&self, pseudonym: &str) -> Vec<StoredConsent> {
        let mut found: Vec<StoredConsent> = lock(&self.consents)
            .values()
            .filter(|c| c.subject_pseudonym == pseudonym)
            .cloned()
            .collect();
        found.sort_by(|a, b| {
            b.granted_at_ms
                .cmp(&a.granted_at_ms)
                .then_with(|| a.consent_id.cmp(&b.consent_id))
        });
        found
    }
}

#[async_trait::async_trait]
impl ConsentStore for MemoryConsents {
    async fn insert(&self, consent: &StoredConsent) -> Result<(), ConsentError> {
        lock(&self.consents).insert(consent.consent_id.clone(), consent.clone());
        Ok(())
    }

    async fn import(&self, consent: &StoredConsent) -> Result<bool, ConsentError> {
        let mut consents = lock(&self.consents);
        if consents.contains_key(&consent.consent_id) {
            return Ok(false);
        }
        consents.insert(consent.consent_id.clone(), consent.clone());
        Ok(true)
    }

    async fn get(&self, id: &str) -> Result<Option<StoredConsent>, ConsentError> {
        Ok(lock(&self.consents).get(id).cloned())
    }

    async fn revoke(&self, id: &str, now_ms: i64) -> Result<StoredConsent, ConsentError> {
        let mut consents = lock(&self.consents);
        let consent = consents
            .get_mut(id)
            .ok_or_else(|| ConsentError::NotFound(id.to_owned()))?;
        consent.revoked_at_ms.get_or_insert(now_ms);
        Ok(consent.clone())
    }

    async fn list(
        &self,
        pseudonym: &str,
        skip: usize,
        limit: usize,
    ) -> Result<(Vec<StoredConsent>, bool), ConsentError> {
        let all = self.of_subject(pseudonym);
        let more = all.len() > skip.saturating_add(limit);
        Ok((all.into_iter().skip(skip).take(limit).collect(), more))
    }

    async fn find_active(
        &self,
        query: &ConsentQuery<'_>,
        now_ms: i64,
    ) -> Result<Option<StoredConsent>, ConsentError> {
        Ok(self
            .of_subject(query.subject_pseudonym)
            .into_iter()
            .find(|c| query.covered_by(c, now_ms)))
    }

    async fn all(&self) -> Result<Vec<StoredConsent>, ConsentError> {
        Ok(lock(&self.consents).values().cloned().collect())
    }
}

struct WindowEntry {
    fingerprint: [u8; 32],
    exchange_id: String,
    outcome: Option<StoredOutcome>,
    claimed: Instant,
}

/// A shared request window in memory (one process playing replicas).
pub struct MemoryWindow {
    entries: Mutex<HashMap<(String, String), WindowEntry>>,
    changed: tokio::sync::Notify,
    window: Duration,
}

impl Default for MemoryWindow {
    fn default() -> Self {
        MemoryWindow::with_window(Duration::from_secs(600))
    }
}

impl MemoryWindow {
    /// A window that remembers a request id for `window`.
    pub fn with_window(window: Duration) -> Self {
        MemoryWindow {
            entries: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            window,
        }
    }
}

#[async_trait::async_trait]
impl RequestWindow for MemoryWindow {
    async fn claim(
        &self,
        caller: &str,
        request_id: &str,
        fingerprint: &[u8; 32],
        exchange_id: &str,
    ) -> Result<Claim, WindowError> {
        let mut entries = lock(&self.entries);
        let key = (caller.to_owned(), request_id.to_owned());
        match entries.get(&key) {
            Some(entry) if entry.fingerprint != *fingerprint => Ok(Claim::Conflict),
            Some(entry) => Ok(Claim::Theirs {
                exchange_id: entry.exchange_id.clone(),
            }),
            None => {
                entries.insert(
                    key,
                    WindowEntry {
                        fingerprint: *fingerprint,
                        exchange_id: exchange_id.to_owned(),
                        outcome: None,
                        claimed: Instant::now(),
                    },
                );
                Ok(Claim::Ours)
            }
        }
    }

    async fn store(
        &self,
        caller: &str,
        request_id: &str,
        exchange_id: &str,
        outcome: &StoredOutcome,
    ) {
        if let Some(entry) =
            lock(&self.entries).get_mut(&(caller.to_owned(), request_id.to_owned()))
            && entry.exchange_id == exchange_id
        {
            entry.outcome = Some(outcome.clone());
        }
        self.changed.notify_waiters();
    }

    async fn release(&self, caller: &str, request_id: &str, exchange_id: &str) {
        let key = (caller.to_owned(), request_id.to_owned());
        let mut entries = lock(&self.entries);
        if entries
            .get(&key)
            .is_some_and(|e| e.exchange_id == exchange_id && e.outcome.is_none())
        {
            entries.remove(&key);
        }
        drop(entries);
        self.changed.notify_waiters();
    }

    async fn wait(
        &self,
        caller: &str,
        request_id: &str,
        exchange_id: &str,
    ) -> Option<StoredOutcome> {
        let key = (caller.to_owned(), request_id.to_owned());
        loop {
            let changed = self.changed.notified();
            {
                let entries = lock(&self.entries);
                match entries.get(&key) {
                    Some(entry) if entry.exchange_id == exchange_id => {
                        if let Some(outcome) = &entry.outcome {
                            return Some(outcome.clone());
                        }
                    }
                    // Released, or taken over by another exchange.
                    _ => return None,
                }
            }
            changed.await;
        }
    }

    async fn sweep(&self) -> Result<u64, WindowError> {
        let mut entries = lock(&self.entries);
        let before = entries.len();
        entries.retain(|_, e| e.claimed.elapsed() <= self.window);
        Ok((before - entries.len()) as u64)
    }
}

/// Quota counts in memory: the GCRA the PostgreSQL counter runs.
#[derive(Default)]
pub struct MemoryQuotas {
    /// Theoretical arrival time per bucket.
    tat: Mutex<HashMap<String, Instant>>,
}

#[async_trait::async_trait]
impl QuotaCounter for MemoryQuotas {
    async fn check(&self, bucket: &QuotaBucket) -> Result<Result<(), OverQuota>, QuotaError> {
        let now = Instant::now();
        let tolerance = bucket.interval * bucket.burst;
        let mut tat = lock(&self.tat);
        let current = tat.get(&bucket.key).copied().unwrap_or(now).max(now);
        let next = current + bucket.interval;
        if next.duration_since(now) <= tolerance {
            tat.insert(bucket.key.clone(), next);
            return Ok(Ok(()));
        }
        Ok(Err(OverQuota {
            quota: bucket.name.clone(),
            retry_after: next.duration_since(now) - tolerance,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
    }

    #[tokio::test]
    async fn the_memory_log_proves_what_it_holds_under_an_independent_check() {
        use ring::signature::KeyPair;
        let key = key();
        let public = key.public_key().as_ref().to_vec();
        let log = MemoryAudit::new(key);
        for n in 0..5 {
            let appended = log
                .append(AuditRecord {
                    exchange_id: format!("x-{n}"),
                    ..AuditRecord::default()
                })
                .await
                .expect("append");
            assert_eq!(appended.index, Some(n));
        }
        let head = log.signed_tree_head().await.expect("head").expect("some");
        head.verify(&public).expect("signed");
        assert_eq!(head.tree_size, 5);
        let (path, leaf) = log.inclusion_proof(3, 5).await.expect("proof");
        onceonly_merkle::verify_inclusion(&leaf, 3, 5, &path, &head.root_hash).expect("included");
        log.inject(AuditFault::Append);
        assert!(log.append(AuditRecord::default()).await.is_err());
        assert!(log.refusing().is_some());
        assert_eq!(log.tree_size(), 5, "a failed append changed the log");
    }

    #[tokio::test]
    async fn quotas_in_memory_admit_the_burst_then_refuse_with_a_wait() {
        let quotas = MemoryQuotas::default();
        let bucket = QuotaBucket {
            key: "q".into(),
            name: "q: 1/s".into(),
            interval: Duration::from_secs(1),
            burst: 2,
        };
        assert!(quotas.check(&bucket).await.expect("count").is_ok());
        assert!(quotas.check(&bucket).await.expect("count").is_ok());
        let over = quotas
            .check(&bucket)
            .await
            .expect("count")
            .expect_err("over");
        assert!(over.retry_after > Duration::ZERO && over.retry_after <= Duration::from_secs(1));
    }
}
