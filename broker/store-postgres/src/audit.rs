//! The audit log on PostgreSQL, shared by broker replicas, in the manner
//! of Trillian:
//!
//! - **Queue.** Each replica commits its requests' records to
//!   `audit_queue` before it answers, in batches (one `INSERT` of many rows,
//!   one commit, as the embedded writer's group commit), and answers each
//!   with a [receipt](onceonly_audit_log::receipt): the batch's signed
//!   promise to be in a signed head within the merge delay.
//! - **Sequencer.** One replica at a time holds the lease row
//!   (`sequencer_lease`); each new holder takes the next epoch. Every
//!   sequencing run is one transaction that first locks the lease row and
//!   finds it still names its holder and epoch (fencing: a sequencer that
//!   lost its lease changes nothing), then takes queued records in commit
//!   order, gives them the next log indices, writes their leaves, the
//!   perfect subtrees they complete and a signed tree head, and deletes
//!   them from the queue. A head is published only by that commit; the
//!   heads' primary key (the tree size) and the leaves' (the index) refuse
//!   a second tree of the same size in any case.
//! - **Readers.** Heads, entries, proofs and queries are read from the
//!   tables, so every replica serves the same log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use deadpool_postgres::{GenericClient, Pool};
use onceonly_audit_log::{AuditError, AuditFilter, AuditMetrics, receipt};
use onceonly_merkle::sth::SignedTreeHead;
use onceonly_merkle::{Frontier, Hash, ProofError, Subtrees, leaf_hash};
use onceonly_proto::v1::{AuditReceipt, AuditRecord};
use prost::Message;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tokio::sync::{mpsc, oneshot};

use crate::sequence_numbers::{self, QueuePosition};

/// Records per queue commit at most.
const MAX_BATCH: usize = 1024;
/// Queued records one sequencing run takes at most.
const MAX_SEQUENCED: i64 = 20_000;

/// How the replicated log runs.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// This process's name in the lease and the queue; unique per start.
    pub replica: String,
    /// A committed record is in a signed head within this (the receipts'
    /// promise).
    pub merge_delay: Duration,
    /// A sequencer that stops renewing loses the lease after this.
    pub lease: Duration,
    /// How often the sequencer runs, and replicas try to take the lease.
    pub interval: Duration,
    /// The longest one database round may take before it counts as failed.
    pub timeout: Duration,
}

struct Append {
    record: AuditRecord,
    reply: oneshot::Sender<Result<AuditReceipt, AuditError>>,
}

struct Inner {
    /// Commits and readers.
    pool: Pool,
    /// The sequencer's and the probe's own connections: request traffic
    /// waiting for the other pool cannot starve the sequencer (which would
    /// stall the log and with it every replica).
    log_pool: Pool,
    key: Ed25519KeyPair,
    key_id: String,
    settings: LogSettings,
    /// Why the log refuses now (a failed commit or probe), cleared by the
    /// next success.
    failure: Mutex<Option<String>>,
    /// Tests and drills: every append fails.
    fault: AtomicBool,
    /// The latest head's size, as last read.
    tree_size: AtomicU64,
    /// The epoch this replica sequences under, 0 when it does not.
    epoch: AtomicU64,
    /// Heads this replica signed and committed.
    heads_published: AtomicU64,
    /// Sequencing runs that failed (the database, a cut connection).
    failed_runs: AtomicU64,
    /// Why no new receipt can be kept now, if so: records wait longer
    /// than a failover takes. Only the probe sets and clears it.
    lagging: Mutex<Option<String>>,
    /// Why this replica stopped for good, if it did: the database lost
    /// signed history, or its tree does not hash to its head. Cleared only
    /// by a restart (after the operator restored the database).
    halted: Mutex<Option<String>>,
    /// Authenticates queued records (replicas hold it, the database does
    /// not): a record written into the queue by anyone else is never
    /// signed into the log.
    row_key: ring::hmac::Key,
    /// Queued rows set aside because they did not authenticate or decode.
    quarantined: AtomicU64,
    /// The leaves this replica receipted and has not yet seen in the log,
    /// with their include-by times (ms, the database's clock), oldest
    /// first: a queued row deleted before the sequencer took it (by an
    /// intruder, or a trigger) shows as a receipt whose record never
    /// arrives.
    receipted: Mutex<std::collections::VecDeque<(Hash, u64)>>,
    /// Receipts this replica gave whose records never reached the log.
    receipts_broken: AtomicU64,
    /// Queued records this replica's sequencer found missing from their
    /// replica's numbering (deleted before they were sequenced).
    queue_gaps: AtomicU64,
    metrics: AuditMetrics,
}

/// The replicated audit log, as one replica sees it.
#[derive(Clone)]
pub struct PgAuditLog {
    inner: Arc<Inner>,
    appends: mpsc::Sender<Append>,
}

fn storage(e: impl std::error::Error) -> AuditError {
    AuditError::Storage(format!("PostgreSQL: {}", crate::describe(&e)))
}

async fn bounded<T, E: std::error::Error>(
    limit: Duration,
    what: &str,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, AuditError> {
    match tokio::time::timeout(limit, work).await {
        Ok(result) => result.map_err(storage),
        Err(_) => Err(AuditError::Storage(format!(
            "PostgreSQL: {what} took longer than {limit:?}"
        ))),
    }
}

fn hash_of(bytes: &[u8], what: &str) -> Result<Hash, AuditError> {
    bytes
        .try_into()
        .map_err(|_| AuditError::Corrupt(format!("{what}: {} bytes, not 32", bytes.len())))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn head_from_row(row: &tokio_postgres::Row) -> Result<SignedTreeHead, AuditError> {
    let size: i64 = row.get("tree_size");
    let ts: i64 = row.get("timestamp_ms");
    let key_id: Vec<u8> = row.get("key_id");
    Ok(SignedTreeHead {
        tree_size: size as u64,
        root_hash: hash_of(row.get("root_hash"), &format!("head {size}"))?,
        timestamp_ms: ts as u64,
        key_id: hex::encode(key_id),
        signature: row.get("signature"),
    })
}

async fn latest_head(client: &impl GenericClient) -> Result<Option<SignedTreeHead>, AuditError> {
    client
        .query_opt(
            "SELECT tree_size, root_hash, timestamp_ms, key_id, signature
             FROM audit_heads ORDER BY tree_size DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(storage)?
        .as_ref()
        .map(head_from_row)
        .transpose()
}

/// Subtree hashes fetched ahead, for the merkle crate's proofs: a first
/// pass with [`Wanted`] learns which subtrees a proof reads (they depend
/// only on the sizes), one query fetches them, a second pass computes.
struct Fetched(HashMap<(u32, u64), Hash>);

impl Subtrees for Fetched {
    type Error = AuditError;
    fn perfect(&self, level: u32, index: u64) -> Result<Hash, AuditError> {
        self.0
            .get(&(level, index))
            .copied()
            .ok_or_else(|| AuditError::Corrupt(format!("tree node {level}/{index} missing")))
    }
}

#[derive(Default)]
struct Wanted(Mutex<Vec<(u32, u64)>>);

impl Subtrees for Wanted {
    type Error = AuditError;
    fn perfect(&self, level: u32, index: u64) -> Result<Hash, AuditError> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((level, index));
        Ok([0; 32])
    }
}

/// Runs `compute` over the subtrees it needs, fetched in two queries.
async fn with_subtrees<T>(
    client: &impl GenericClient,
    compute: impl Fn(&dyn Subtrees<Error = AuditError>) -> Result<T, AuditError>,
) -> Result<T, AuditError> {
    let wanted = Wanted::default();
    compute(&wanted)?;
    let wanted = wanted.0.into_inner().unwrap_or_else(|p| p.into_inner());
    let leaves: Vec<i64> = wanted
        .iter()
        .filter(|(level, _)| *level == 0)
        .map(|(_, index)| to_i64(*index))
        .collect();
    let (levels, indices): (Vec<i32>, Vec<i64>) = wanted
        .iter()
        .filter(|(level, _)| *level > 0)
        .map(|(level, index)| (*level as i32, to_i64(*index)))
        .unzip();
    let mut fetched = HashMap::new();
    if !leaves.is_empty() {
        for row in client
            .query(
                "SELECT log_index, leaf_hash FROM audit_leaves WHERE log_index = ANY($1)",
                &[&leaves],
            )
            .await
            .map_err(storage)?
        {
            let index: i64 = row.get(0);
            fetched.insert((0, index as u64), hash_of(row.get(1), "a leaf hash")?);
        }
    }
    if !levels.is_empty() {
        for row in client
            .query(
                "SELECT n.level, n.node_index, n.hash FROM audit_nodes n
                 JOIN unnest($1::integer[], $2::bigint[]) AS w(level, node_index)
                 USING (level, node_index)",
                &[&levels, &indices],
            )
            .await
            .map_err(storage)?
        {
            let level: i32 = row.get(0);
            let index: i64 = row.get(1);
            fetched.insert(
                (level as u32, index as u64),
                hash_of(row.get(2), "a tree node")?,
            );
        }
    }
    compute(&Fetched(fetched))
}

fn proof_error(e: ProofError<AuditError>) -> AuditError {
    match e {
        ProofError::OutOfRange(reason) => AuditError::OutOfRange(reason),
        ProofError::Store(e) => e,
    }
}

impl PgAuditLog {
    /// Opens the log in the database behind `pool` (migrated): checks its
    /// latest head was signed by `key` (the key every replica holds), and
    /// starts this replica's queue writer, sequencer candidate and probe.
    /// They end once every handle is dropped; the returned task completes
    /// then.
    /// `row_key` authenticates queued records between replicas.
    /// `pool` serves commits and readers; `log_pool` (two connections
    /// suffice) the sequencer and the probe alone.
    pub async fn open(
        pool: Pool,
        log_pool: Pool,
        key: Ed25519KeyPair,
        row_key: ring::hmac::Key,
        settings: LogSettings,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), AuditError> {
        let client = bounded(settings.timeout, "connecting", pool.get()).await?;
        let head = latest_head(&client).await?;
        drop(client);
        if let Some(head) = &head
            && head.verify(key.public_key().as_ref()).is_err()
        {
            return Err(AuditError::WrongKey {
                log: "the PostgreSQL audit log".into(),
                size: head.tree_size,
                public_key: hex::encode(key.public_key().as_ref()),
            });
        }
        let inner = Arc::new(Inner {
            key_id: onceonly_merkle::sth::key_id(key.public_key().as_ref()),
            pool,
            log_pool,
            key,
            settings,
            failure: Mutex::new(None),
            fault: AtomicBool::new(false),
            tree_size: AtomicU64::new(head.map_or(0, |h| h.tree_size)),
            epoch: AtomicU64::new(0),
            heads_published: AtomicU64::new(0),
            failed_runs: AtomicU64::new(0),
            lagging: Mutex::new(None),
            halted: Mutex::new(None),
            row_key,
            quarantined: AtomicU64::new(0),
            receipted: Mutex::default(),
            receipts_broken: AtomicU64::new(0),
            queue_gaps: AtomicU64::new(0),
            metrics: AuditMetrics::default(),
        });
        let (appends, queue) = mpsc::channel(MAX_BATCH * 4);
        let sequencer = tokio::spawn(sequence(Arc::downgrade(&inner)));
        let probe = tokio::spawn(probe(Arc::downgrade(&inner)));
        let writer = tokio::spawn(write_queue(inner.clone(), queue));
        let task = tokio::spawn(async move {
            let _ = writer.await;
            // The writer held the last strong handle: the others end at
            // their next round.
            let _ = sequencer.await;
            let _ = probe.await;
        });
        Ok((PgAuditLog { inner, appends }, task))
    }

    /// Commits `record` to the queue (durably, batched with others) and
    /// returns its receipt.
    pub async fn append(&self, mut record: AuditRecord) -> Result<AuditReceipt, AuditError> {
        // Its bytes are fixed (and receipted) before the sequencer gives
        // it a place: it names the replica instead of an index.
        record.log_index = 0;
        record.replica = self.inner.settings.replica.clone();
        let (reply, result) = oneshot::channel();
        self.appends
            .send(Append { record, reply })
            .await
            .map_err(|_| AuditError::WriterStopped)?;
        result.await.map_err(|_| AuditError::WriterStopped)?
    }

    /// The latest signed tree head, read from the database.
    pub async fn signed_tree_head(&self) -> Result<Option<SignedTreeHead>, AuditError> {
        let client = self.client().await?;
        let head = latest_head(&client).await?;
        if let Some(head) = &head {
            self.inner
                .tree_size
                .fetch_max(head.tree_size, Ordering::AcqRel);
        }
        Ok(head)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, AuditError> {
        bounded(
            self.inner.settings.timeout,
            "waiting for a connection",
            self.inner.pool.get(),
        )
        .await
    }

    async fn checked_size(&self, size: u64) -> Result<(), AuditError> {
        let signed = self.signed_tree_head().await?.map_or(0, |h| h.tree_size);
        if size > signed {
            return Err(AuditError::OutOfRange(format!(
                "tree size {size} is beyond the latest signed head ({signed})"
            )));
        }
        Ok(())
    }

    /// Entries `start..start+max` that are in the tree: (index, record,
    /// the exact leaf bytes).
    pub async fn entries(
        &self,
        start: u64,
        max: u64,
    ) -> Result<Vec<(u64, AuditRecord, Vec<u8>)>, AuditError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT log_index, record FROM audit_leaves
                 WHERE log_index >= $1 AND log_index < $2 ORDER BY log_index",
                &[&to_i64(start), &to_i64(start.saturating_add(max))],
            )
            .await
            .map_err(storage)?;
        let entries: Vec<(u64, AuditRecord, Vec<u8>)> = rows
            .iter()
            .map(|row| {
                let index: i64 = row.get(0);
                let bytes: Vec<u8> = row.get(1);
                let mut record = AuditRecord::decode(bytes.as_slice())
                    .map_err(|e| AuditError::Corrupt(format!("record {index}: {e}")))?;
                // Its place, for reading; the leaf bytes stay as committed.
                record.log_index = index as u64;
                Ok((index as u64, record, bytes))
            })
            .collect::<Result<_, AuditError>>()?;
        self.inner.seen_in_log(&entries);
        Ok(entries)
    }

    /// The leaf hash of record `index`.
    pub async fn leaf_hash(&self, index: u64) -> Result<Hash, AuditError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT leaf_hash FROM audit_leaves WHERE log_index = $1",
                &[&to_i64(index)],
            )
            .await
            .map_err(storage)?
            .ok_or_else(|| AuditError::OutOfRange(format!("no record {index}")))?;
        hash_of(row.get(0), "a leaf hash")
    }

    /// The index of the record with `leaf_hash`, where it is in the tree.
    pub async fn find_leaf(&self, leaf_hash: &Hash) -> Result<Option<u64>, AuditError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT log_index FROM audit_leaves WHERE leaf_hash = $1 ORDER BY log_index LIMIT 1",
                &[&leaf_hash.as_slice()],
            )
            .await
            .map_err(storage)?
            .map(|row| row.get::<_, i64>(0) as u64))
    }

    /// The audit path of record `index` in the tree of `size`.
    pub async fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, AuditError> {
        self.checked_size(size).await?;
        let client = self.client().await?;
        with_subtrees(&client, |store| {
            onceonly_merkle::inclusion_proof(store, index, size).map_err(proof_error)
        })
        .await
    }

    /// The proof that the tree of `second` extends the tree of `first`.
    pub async fn consistency_proof(
        &self,
        first: u64,
        second: u64,
    ) -> Result<Vec<Hash>, AuditError> {
        self.checked_size(second).await?;
        let client = self.client().await?;
        with_subtrees(&client, |store| {
            onceonly_merkle::consistency_proof(store, first, second).map_err(proof_error)
        })
        .await
    }

    /// Up to `limit` records in the tree matching `filter`, from index
    /// `start` on, and the index to continue from (None at the end).
    pub async fn query(
        &self,
        filter: &AuditFilter,
        start: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), AuditError> {
        let signed = PgAuditLog::signed_tree_head(self)
            .await?
            .map_or(0, |h| h.tree_size);
        let client = self.client().await?;
        let outcome = filter.outcome.map(|o| o as i32);
        let rows = client
            .query(
                "SELECT log_index, record, leaf_hash FROM audit_leaves
                 WHERE log_index >= $1
                   AND ($2::bytea IS NULL OR subject_pseudonym = $2)
                   AND ($3::text IS NULL OR caller_id = $3)
                   AND ($4::text IS NULL OR evidence_type = $4)
                   AND ($5::text IS NULL OR connector_id = $5)
                   AND ($6::integer IS NULL OR outcome = $6)
                   AND ($7::bigint IS NULL OR received_s >= $7)
                   AND ($8::bigint IS NULL OR received_s < $8)
                   AND log_index < $10
                 ORDER BY log_index LIMIT $9",
                &[
                    &to_i64(start),
                    &filter.subject_pseudonym,
                    &filter.caller_id,
                    &filter.evidence_type,
                    &filter.connector_id,
                    &outcome,
                    &filter.received_after,
                    &filter.received_before,
                    &(limit as i64 + 1),
                    // Only what a signed head covers: a row inserted
                    // beyond it is no record of the log.
                    &to_i64(signed),
                ],
            )
            .await
            .map_err(storage)?;
        let mut records = Vec::with_capacity(rows.len().min(limit));
        for row in rows {
            let index: i64 = row.get(0);
            if records.len() == limit {
                return Ok((records, Some(index as u64)));
            }
            let bytes: Vec<u8> = row.get(1);
            let mut record = AuditRecord::decode(bytes.as_slice())
                .map_err(|e| AuditError::Corrupt(format!("record {index}: {e}")))?;
            // The columns the query filtered on are not in the Merkle leaf:
            // someone with write access could edit them and move a record
            // into another subject's or authority's view while the log
            // still verifies. Each record must have what it was found for,
            // and be the leaf it is stored as.
            if !filter.matches(&record) || leaf_hash(&bytes).as_slice() != row.get::<_, &[u8]>(2) {
                return Err(AuditError::Corrupt(format!(
                    "record {index} is listed in audit_leaves under columns (or a leaf hash) its signed bytes do not have: the table was edited outside the replicas; nothing of this query is shown. `onceonly-audit verify` checks the records themselves"
                )));
            }
            // Its place, for reading (the committed bytes carry none).
            record.log_index = index as u64;
            records.push(record);
        }
        Ok((records, None))
    }

    /// Makes every append fail while `failing` (fail-closed drills).
    pub fn inject_failure(&self, failing: bool) {
        self.inner.fault.store(failing, Ordering::SeqCst);
        if !failing {
            *self.inner.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Why the log refuses appends now, if it does: an injected fault, or
    /// the database failed the last commit or probe (until one succeeds),
    /// or records wait in the queue longer than the merge delay (no
    /// sequencer keeps the receipts' promise).
    pub fn refusing(&self) -> Option<String> {
        if self.inner.fault.load(Ordering::SeqCst) {
            return Some("appends fail (injected fault)".into());
        }
        if let Some(halt) = self.inner.halt() {
            return Some(halt);
        }
        if let Some(lag) = self.inner.lag() {
            return Some(lag);
        }
        self.inner
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Queued rows this replica's sequencer set aside (they did not
    /// authenticate or decode).
    pub fn quarantined(&self) -> u64 {
        self.inner.quarantined.load(Ordering::Relaxed)
    }

    /// Records covered by the latest signed head, as last read.
    pub fn tree_size(&self) -> u64 {
        self.inner.tree_size.load(Ordering::Relaxed)
    }

    /// The epoch this replica sequences under, where it holds the lease.
    pub fn sequencer_epoch(&self) -> Option<u64> {
        Some(self.inner.epoch.load(Ordering::SeqCst)).filter(|e| *e != 0)
    }

    /// Heads this replica signed and committed as sequencer.
    pub fn heads_published(&self) -> u64 {
        self.inner.heads_published.load(Ordering::Relaxed)
    }

    /// Sequencing runs of this replica that failed.
    pub fn failed_runs(&self) -> u64 {
        self.inner.failed_runs.load(Ordering::Relaxed)
    }

    /// Receipts this replica gave whose records never reached the log.
    pub fn receipts_broken(&self) -> u64 {
        self.inner.receipts_broken.load(Ordering::Relaxed)
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.inner.settings.replica
    }

    /// Batch figures (the fsync histogram times queue commits here).
    pub fn metrics(&self) -> &AuditMetrics {
        &self.inner.metrics
    }
}

#[onceonly_store::async_trait]
impl onceonly_store::AuditStore for PgAuditLog {
    async fn append(&self, record: AuditRecord) -> Result<onceonly_store::Appended, AuditError> {
        PgAuditLog::append(self, record)
            .await
            .map(|receipt| onceonly_store::Appended {
                index: None,
                receipt: Some(receipt),
            })
    }

    async fn signed_tree_head(&self) -> Result<Option<SignedTreeHead>, AuditError> {
        PgAuditLog::signed_tree_head(self).await
    }

    async fn inclusion_proof(
        &self,
        index: u64,
        size: u64,
    ) -> Result<(Vec<Hash>, Hash), AuditError> {
        Ok((
            PgAuditLog::inclusion_proof(self, index, size).await?,
            self.leaf_hash(index).await?,
        ))
    }

    async fn find_leaf(&self, leaf: &Hash, size: u64) -> Result<Option<u64>, AuditError> {
        Ok(PgAuditLog::find_leaf(self, leaf)
            .await?
            .filter(|i| *i < size))
    }

    async fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, AuditError> {
        PgAuditLog::consistency_proof(self, first, second).await
    }

    async fn entries(
        &self,
        start: u64,
        max: u64,
    ) -> Result<Vec<onceonly_store::LogEntry>, AuditError> {
        PgAuditLog::entries(self, start, max).await
    }

    async fn query(
        &self,
        filter: AuditFilter,
        start: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), AuditError> {
        PgAuditLog::query(self, &filter, start, limit).await
    }

    fn refusing(&self) -> Option<String> {
        PgAuditLog::refusing(self)
    }

    fn tree_size(&self) -> u64 {
        PgAuditLog::tree_size(self)
    }

    fn metrics(&self) -> &AuditMetrics {
        PgAuditLog::metrics(self)
    }

    fn replica_gauges(&self) -> Option<onceonly_store::ReplicaGauges> {
        Some(onceonly_store::ReplicaGauges {
            sequencer: self.sequencer_epoch().is_some(),
            failed_runs: self.failed_runs(),
            quarantined: self.quarantined(),
            receipts_broken: self.receipts_broken(),
            queue_gaps: self.inner.queue_gaps.load(Ordering::Relaxed),
        })
    }

    fn inject(&self, fault: onceonly_audit_log::AuditFault) {
        // The replicated log knows one fault: failing appends.
        self.inject_failure(fault != onceonly_audit_log::AuditFault::None);
    }
}

/// Why a log could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The database failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The PostgreSQL log already holds records.
    #[error(
        "the PostgreSQL audit log is not empty ({0} records, queued or sequenced): a data directory's log is moved only into an empty one, before any replica serves"
    )]
    NotEmpty(i64),
    /// The records do not hash to the head, or another key signed it.
    #[error("the log to import does not match its signed head: {0}")]
    Mismatch(String),
}

/// What [`import`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imported {
    /// The log was written.
    Written,
    /// The database already holds exactly this log (an earlier move that
    /// stopped after it): nothing was written.
    AlreadyThere,
}

/// Rows per insert statement of an import.
const IMPORT_CHUNK: usize = 10_000;

/// Moves a whole verified log (every record's bytes, in order, and its
/// last signed head, signed by the key whose raw public key is
/// `public_key`) into the empty PostgreSQL log behind `pool`, in one
/// transaction (a database already holding exactly this log is left as it
/// is): leaves, tree nodes and the head as they are, so the signed
/// history goes on (later heads extend this one, provably). Records keep
/// their log_index; they name no replica.
pub async fn import(
    pool: &Pool,
    records: &[Vec<u8>],
    head: &SignedTreeHead,
    public_key: &[u8],
) -> Result<Imported, ImportError> {
    head.verify(public_key)
        .map_err(|e| ImportError::Mismatch(format!("the head does not verify: {e}")))?;
    if head.tree_size != records.len() as u64 {
        return Err(ImportError::Mismatch(format!(
            "{} records, but the head covers {}",
            records.len(),
            head.tree_size
        )));
    }
    let mut frontier = Frontier::new();
    let mut columns = LeafColumns::default();
    let (mut levels, mut nodes, mut hashes) = (Vec::new(), Vec::new(), Vec::new());
    for (index, bytes) in records.iter().enumerate() {
        let record = AuditRecord::decode(bytes.as_slice())
            .map_err(|e| ImportError::Mismatch(format!("record {index}: {e}")))?;
        let leaf = leaf_hash(bytes);
        for (level, node, hash) in frontier.push(leaf) {
            if level > 0 {
                levels.push(level as i32);
                nodes.push(to_i64(node));
                hashes.push(hash.to_vec());
            }
        }
        columns.push(index as u64, leaf, &record, bytes.clone(), String::new(), 0);
    }
    if frontier.root() != head.root_hash {
        return Err(ImportError::Mismatch(
            "the records do not hash to the head's root".into(),
        ));
    }
    let mut client = pool
        .get()
        .await
        .map_err(|e| AuditError::Storage(format!("PostgreSQL: {}", crate::describe(&e))))?;
    let tx = client.transaction().await.map_err(storage)?;
    // No sequencer may run meanwhile.
    tx.batch_execute(
        "LOCK TABLE sequencer_lease, audit_queue, audit_leaves, audit_heads IN EXCLUSIVE MODE",
    )
    .await
    .map_err(storage)?;
    let present: i64 = tx
        .query_one(
            "SELECT (SELECT count(*) FROM audit_leaves) + (SELECT count(*) FROM audit_queue)
                  + (SELECT count(*) FROM audit_heads)",
            &[],
        )
        .await
        .map_err(storage)?
        .get(0);
    if present != 0 {
        // This very log, moved before (a rerun after a later step failed)?
        let there = latest_head(&tx).await?;
        let queued: i64 = tx
            .query_one("SELECT count(*) FROM audit_queue", &[])
            .await
            .map_err(storage)?
            .get(0);
        if queued == 0
            && there
                .as_ref()
                .is_some_and(|h| h.tree_size == head.tree_size && h.root_hash == head.root_hash)
        {
            return Ok(Imported::AlreadyThere);
        }
        return Err(ImportError::NotEmpty(present));
    }
    // Imported leaves take negative queue ids: unique, and apart from the
    // queue's own.
    let queue_ids: Vec<i64> = columns.indices.iter().map(|i| -(i + 1)).collect();
    for start in (0..queue_ids.len()).step_by(IMPORT_CHUNK) {
        let end = (start + IMPORT_CHUNK).min(queue_ids.len());
        insert_leaves(&tx, &columns.slice(start..end), &queue_ids[start..end]).await?;
    }
    for start in (0..levels.len()).step_by(IMPORT_CHUNK) {
        let end = (start + IMPORT_CHUNK).min(levels.len());
        tx.execute(
            "INSERT INTO audit_nodes (level, node_index, hash)
             SELECT * FROM unnest($1::integer[], $2::bigint[], $3::bytea[])",
            &[
                &&levels[start..end],
                &&nodes[start..end],
                &&hashes[start..end],
            ],
        )
        .await
        .map_err(storage)?;
    }
    tx.execute(
        "INSERT INTO audit_heads (tree_size, root_hash, timestamp_ms, key_id, signature, sequencer_epoch)
         VALUES ($1, $2, $3, $4, $5, 0)",
        &[
            &to_i64(head.tree_size),
            &head.root_hash.as_slice(),
            &to_i64(head.timestamp_ms),
            &hex::decode(&head.key_id).unwrap_or_default(),
            &head.signature,
        ],
    )
    .await
    .map_err(storage)?;
    tx.commit().await.map_err(storage)?;
    Ok(Imported::Written)
}

async fn insert_leaves(
    tx: &deadpool_postgres::Transaction<'_>,
    columns: &LeafColumns,
    queue_ids: &[i64],
) -> Result<(), AuditError> {
    let stored = tx.execute(
        "INSERT INTO audit_leaves (log_index, queue_id, leaf_hash, record, replica, queued_at_ms,
             subject_pseudonym, caller_id, evidence_type, connector_id, outcome, received_s)
         SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[], $5::text[],
             $6::bigint[], $7::bytea[], $8::text[], $9::text[], $10::text[], $11::integer[],
             $12::bigint[])",
        &[
            &columns.indices,
            &queue_ids,
            &columns.leaves,
            &columns.records,
            &columns.replicas,
            &columns.queued_at,
            &columns.subjects,
            &columns.callers,
            &columns.evidence_types,
            &columns.connectors,
            &columns.outcomes,
            &columns.received,
        ],
    )
    .await
    .map_err(storage)?;
    written("audit_leaves", stored, columns.indices.len())
}

/// Ok where a write stored the `sent` rows it was given: a trigger that
/// drops rows makes PostgreSQL report success for fewer.
fn written(table: &str, stored: u64, sent: usize) -> Result<(), AuditError> {
    if stored == sent as u64 {
        return Ok(());
    }
    Err(AuditError::Corrupt(format!(
        "PostgreSQL stored {stored} of the {sent} rows written to {table}, yet reported success: a trigger on the table drops rows (list its triggers with `\\d {table}` in psql; replicas create none). The run was rolled back; sequencing stops until the database is checked and the replica restarted"
    )))
}

impl Inner {
    /// Takes the receipted leaves among `entries` (read from the log, each
    /// hashed from its bytes, below a signed head) off the receipt watch:
    /// every replica reads the whole log as it grows (for revocations), so
    /// the watch need not read those records again.
    fn seen_in_log(&self, entries: &[(u64, AuditRecord, Vec<u8>)]) {
        if self
            .receipted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return;
        }
        let signed = self.tree_size.load(Ordering::Acquire);
        // Hashed outside the lock: appends wait for it.
        let seen: std::collections::HashSet<Hash> = entries
            .iter()
            .filter(|(index, _, _)| *index < signed)
            .map(|(_, _, bytes)| leaf_hash(bytes))
            .collect();
        let mut receipted = self.receipted.lock().unwrap_or_else(|p| p.into_inner());
        receipted.retain(|(leaf, _)| !seen.contains(leaf));
    }

    fn failed(&self, reason: String) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    fn succeeded(&self) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn halt(&self) -> Option<String> {
        self.halted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops appends and sequencing until a restart.
    fn halt_with(&self, reason: &str) {
        tracing::error!(%reason, "the replicated audit log stops until a restart");
        self.halted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| reason.to_owned());
    }

    fn lag(&self) -> Option<String> {
        self.lagging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// One queue commit of `records`, numbered from `position`; their
    /// receipts, in order.
    async fn commit(
        &self,
        records: &[AuditRecord],
        position: QueuePosition,
    ) -> Result<Vec<AuditReceipt>, AuditError> {
        if self.fault.load(Ordering::SeqCst) {
            return Err(AuditError::Storage("appends fail (injected fault)".into()));
        }
        if let Some(halt) = self.halt() {
            return Err(AuditError::Storage(halt));
        }
        // A receipt promises inclusion within the merge delay: none is
        // given while nothing sequences.
        if let Some(lag) = self.lag() {
            return Err(AuditError::Storage(lag));
        }
        let bytes: Vec<Vec<u8>> = records.iter().map(Message::encode_to_vec).collect();
        let leaves: Vec<Hash> = bytes.iter().map(|b| leaf_hash(b)).collect();
        let leaf_bytes: Vec<&[u8]> = leaves.iter().map(|h| h.as_slice()).collect();
        let numbers = position.numbers(records.len());
        let tags: Vec<Vec<u8>> = bytes
            .iter()
            .zip(&numbers)
            .map(|(b, n)| {
                sequence_numbers::row_tag(
                    &self.row_key,
                    &self.settings.replica,
                    (position.segment, *n, position.chain),
                    b,
                )
            })
            .collect();
        let client = bounded(
            self.settings.timeout,
            "waiting for a connection",
            self.pool.get(),
        )
        .await?;
        let started = Instant::now();
        // The commit time is the database's (one clock for every replica
        // and the sequencer's heads), taken as the rows are written. What
        // the statement returns is what the table stored: the batch is
        // committed only once every row is there (a BEFORE INSERT trigger
        // that returns NULL makes an INSERT store nothing and succeed).
        // Prepared once per connection: this runs for every batch.
        let insert = bounded(
            self.settings.timeout,
            "preparing the audit commit",
            client.prepare_cached(
                "WITH clock AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms),
                 written AS (
                   INSERT INTO audit_queue (replica, leaf_hash, record, mac, queued_at_ms, segment, replica_seq, chain_segment, chain_last)
                   SELECT $1, q.leaf_hash, q.record, q.mac, clock.now_ms, $6, q.replica_seq, $8, $9
                   FROM unnest($2::bytea[], $3::bytea[], $4::bytea[], $7::bigint[]) WITH ORDINALITY AS q(leaf_hash, record, mac, replica_seq, n), clock
                   ORDER BY q.n
                   RETURNING queued_at_ms)
                 SELECT count(*), min(queued_at_ms), max(queued_at_ms),
                        -- A batch stored in part, or at no real time, fails
                        -- the statement itself, so it rolls back whole (one
                        -- round trip, no transaction around it): the cast
                        -- of this text is evaluated only on that branch.
                        CASE WHEN count(*) = $5::bigint AND min(queued_at_ms) > 0 THEN 0
                             ELSE ('onceonly: audit_queue stored ' || count(*) || ' of ' || $5::bigint
                                   || ' rows, at ' || coalesce(min(queued_at_ms), 0) || ' ms: a trigger drops or rewrites them')::int
                        END
                 FROM written",
            ),
        )
        .await?;
        let sent = records.len() as i64;
        let row = bounded(
            self.settings.timeout,
            "committing audit records",
            client.query_one(
                &insert,
                &[
                    &self.settings.replica,
                    &leaf_bytes,
                    &bytes,
                    &tags,
                    &sent,
                    &position.segment,
                    &numbers,
                    &position.chain.0,
                    &position.chain.1,
                ],
            ),
        )
        .await?;
        // The same check here, for its message (and should the statement's
        // ever be lost).
        let committed_at = stored_commit_time(records.len(), row.get(0), row.get(1), row.get(2))?;
        self.metrics
            .fsync_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.batch_records.observe(records.len() as f64);
        let include_by = committed_at + self.settings.merge_delay.as_millis() as u64;
        self.receipted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(leaves.iter().map(|leaf| (*leaf, include_by)));
        let named: Vec<(Hash, String)> = leaves
            .into_iter()
            .zip(records.iter().map(|r| r.exchange_id.clone()))
            .collect();
        Ok(receipt::sign_batch(
            &self.key,
            &self.settings.replica,
            &named,
            committed_at,
            include_by,
        ))
    }
}

/// The commit time of a queue commit of `sent` records, from what its
/// INSERT returned: the rows stored and their earliest and latest
/// `queued_at_ms`. Err unless every record was stored, at a real time: a
/// receipt (and with it evidence) is never given for a record the
/// database did not keep.
fn stored_commit_time(
    sent: usize,
    stored: i64,
    earliest: Option<i64>,
    latest: Option<i64>,
) -> Result<u64, AuditError> {
    if usize::try_from(stored).ok() != Some(sent) {
        return Err(AuditError::Storage(format!(
            "PostgreSQL stored {stored} of the {sent} audit records written to audit_queue, yet reported success: a trigger on the table drops rows (list its triggers with `\\d audit_queue` in psql; replicas create none). The batch's requests were refused (no evidence released)"
        )));
    }
    match (earliest, latest) {
        (Some(earliest), Some(latest)) if earliest > 0 => Ok(latest as u64),
        _ => Err(AuditError::Storage(format!(
            "PostgreSQL stored the {sent} audit records written to audit_queue with commit times {earliest:?}..{latest:?} ms, not the database's clock: a trigger on the table rewrites queued_at_ms (list its triggers with `\\d audit_queue` in psql; replicas create none). The batch was rolled back and its requests refused (no evidence released)"
        ))),
    }
}

/// The queue writer: takes what has queued up, commits it as one batch,
/// answers each.
async fn write_queue(inner: Arc<Inner>, mut queue: mpsc::Receiver<Append>) {
    let mut batch = Vec::new();
    // One commit at a time: a number is visible only once every lower one
    // of its segment is (the sequencer's gap check relies on it).
    let mut position = QueuePosition::start();
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (records, replies): (Vec<_>, Vec<_>) =
            batch.drain(..).map(|a| (a.record, a.reply)).unzip();
        match inner.commit(&records, position).await {
            Ok(receipts) => {
                position.committed(records.len());
                inner.succeeded();
                for (reply, receipt) in replies.into_iter().zip(receipts) {
                    let _ = reply.send(Ok(receipt));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, records = records.len(), "audit records not committed");
                inner.failed(format!("the last audit commit failed: {e}"));
                position.uncertain();
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The probe: reads the latest head's size, so readiness follows the
/// database, and checks no record waits past the merge delay.
async fn probe(inner: Weak<Inner>) {
    loop {
        let Some(interval) = inner
            .upgrade()
            .map(|i| i.settings.interval.max(Duration::from_millis(50)))
        else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let result: Result<Option<String>, AuditError> = async {
            // What this replica saw before the query starts: every head it
            // counts was committed before, so the query's snapshot holds
            // it (read after, a head committed meanwhile would look lost).
            let seen = inner.tree_size.load(Ordering::Acquire);
            let client =
                bounded(inner.settings.timeout, "connecting", inner.log_pool.get()).await?;
            let row = bounded(
                inner.settings.timeout,
                "probing",
                client.query_one(
                    "SELECT (SELECT max(tree_size) FROM audit_heads),
                            (extract(epoch FROM clock_timestamp()) * 1000)::bigint
                              - (SELECT min(queued_at_ms) FROM audit_queue),
                            (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                    &[],
                ),
            )
            .await?;
            let size_now = row.get::<_, Option<i64>>(0).unwrap_or(0);
            watch_receipts(&inner, &client, row.get::<_, i64>(2), size_now).await?;
            let size = row.get::<_, Option<i64>>(0).unwrap_or(0) as u64;
            inner.tree_size.fetch_max(size, Ordering::AcqRel);
            if size < seen {
                return Err(AuditError::Corrupt(format!(
                    "the database's latest signed head covers {size} records, but this replica saw one of {seen}: committed history was lost (a failover to a replica that lagged, or a restore); stop the replicas and restore the database"
                )));
            }
            // On the database's clock, as the records' commit times.
            let waited: Option<i64> = row.get(1);
            // Longer than a failover takes and than half the merge delay:
            // no sequencer is coming back in time for new receipts.
            let patience = (inner.settings.lease + inner.settings.interval * 3)
                .max(inner.settings.merge_delay / 2);
            Ok(waited
                .filter(|w| *w > patience.as_millis() as i64)
                .map(|waited| {
                    format!(
                        "a committed record has waited {waited} ms for the sequencer, longer than a failover takes and half the merge delay ({} ms): no replica sequences the log, so no receipt is given",
                        patience.as_millis()
                    )
                }))
        }
        .await;
        match result {
            Ok(lag) => {
                *inner.lagging.lock().unwrap_or_else(|p| p.into_inner()) = lag;
                inner.succeeded();
            }
            Err(e @ AuditError::Corrupt(_)) => inner.halt_with(&e.to_string()),
            Err(e) => inner.failed(e.to_string()),
        }
    }
}

/// Checks the leaves this replica receipted whose include-by time (plus
/// two sequencer rounds) has passed, at `now_ms` on the database's clock:
/// each must be in the log by now, or still in the queue (which the lag
/// check reports). One in neither was deleted from the queue before it was
/// sequenced, although its commit was acknowledged and its evidence
/// released: the database is not the replicas' alone any more, so the log
/// stops (Corrupt: appends refused, readiness NOT_SERVING) until an
/// operator has looked.
async fn watch_receipts(
    inner: &Inner,
    client: &deadpool_postgres::Object,
    now_ms: i64,
    signed_size: i64,
) -> Result<(), AuditError> {
    let grace = (inner.settings.interval * 2).as_millis() as u64;
    let now = u64::try_from(now_ms).unwrap_or(0);
    let due: Vec<Hash> = inner
        .receipted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .take_while(|(_, include_by)| include_by.saturating_add(grace) <= now)
        .map(|(leaf, _)| *leaf)
        .collect();
    if due.is_empty() {
        return Ok(());
    }
    let wanted: Vec<&[u8]> = due.iter().map(|leaf| leaf.as_slice()).collect();
    let rows = bounded(
        inner.settings.timeout,
        "checking receipted records",
        client.query(
            "SELECT leaf_hash, record, true FROM audit_leaves
               WHERE leaf_hash = ANY($1) AND log_index < $2
             UNION ALL
             SELECT leaf_hash, record, false FROM audit_queue WHERE leaf_hash = ANY($1)",
            &[&wanted, &signed_size],
        ),
    )
    .await?;
    let mut logged = std::collections::HashSet::new();
    let mut queued = std::collections::HashSet::new();
    for row in &rows {
        let leaf: Vec<u8> = row.get(0);
        // A row counts only as what its bytes are: a row made up to carry
        // the leaf hash of a deleted record does not hash to it.
        if leaf_hash(row.get::<_, &[u8]>(1)).as_slice() != leaf.as_slice() {
            continue;
        }
        if row.get::<_, bool>(2) {
            logged.insert(leaf);
        } else {
            queued.insert(leaf);
        }
    }
    let missing: Vec<&Hash> = due
        .iter()
        .filter(|leaf| !logged.contains(leaf.as_slice()) && !queued.contains(leaf.as_slice()))
        .collect();
    {
        let mut receipted = inner.receipted.lock().unwrap_or_else(|p| p.into_inner());
        // The due ones are the oldest: drop those in the log (or lost, and
        // reported now); keep those still queued for the next round.
        let mut kept = std::collections::VecDeque::new();
        for _ in 0..due.len() {
            if let Some((leaf, include_by)) = receipted.pop_front()
                && queued.contains(leaf.as_slice())
            {
                kept.push_back((leaf, include_by));
            }
        }
        while let Some(entry) = kept.pop_back() {
            receipted.push_front(entry);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    inner
        .receipts_broken
        .fetch_add(missing.len() as u64, Ordering::Relaxed);
    Err(AuditError::Corrupt(format!(
        "{} record(s) this replica committed to audit_queue and receipted (leaf {} first) are neither in the signed log nor in the queue past their include-by time: a queued row was deleted before it was sequenced (a trigger on audit_queue, or a writer other than the replicas), set aside in audit_quarantine, or lost with a database failover to a standby that lagged. Their holders' `onceonly-audit check-receipt` fails; this replica refuses new requests until the database is checked (`\\d audit_queue` lists triggers; look into audit_quarantine) and it is restarted",
        missing.len(),
        hex::encode(missing[0])
    )))
}

/// What a replica holding the lease knows.
struct Leadership {
    epoch: i64,
    /// The tree as of the last head; None until read (again) under the
    /// lease, e.g. after a round whose commit may or may not have landed.
    frontier: Option<Frontier>,
    last_timestamp_ms: u64,
    /// The marks this sequencer stored (replica, segment) → last number:
    /// a stored mark found lower, or gone, was rolled back.
    marks: HashMap<(String, i64), i64>,
}

/// The sequencer candidate: every interval, takes the lease where it is
/// free or expired, and while it holds it, sequences.
async fn sequence(inner: Weak<Inner>) {
    let mut leadership: Option<Leadership> = None;
    loop {
        let Some(interval) = inner.upgrade().map(|i| i.settings.interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        // Halted: nothing more is signed, nor the lease taken, until a
        // restart.
        if inner.halt().is_some() {
            continue;
        }
        let result = match &mut leadership {
            None => acquire(&inner).await.map(|epoch| {
                if let Some(epoch) = epoch {
                    tracing::info!(epoch, replica = %inner.settings.replica, "took the sequencer lease");
                    inner.epoch.store(epoch as u64, Ordering::SeqCst);
                    leadership = Some(Leadership {
                        epoch,
                        frontier: None,
                        last_timestamp_ms: 0,
                        marks: HashMap::new(),
                    });
                }
            }),
            Some(leader) => match sequence_once(&inner, leader).await {
                Ok(true) => Ok(()),
                Ok(false) => {
                    tracing::warn!(epoch = leader.epoch, "lost the sequencer lease");
                    inner.epoch.store(0, Ordering::SeqCst);
                    leadership = None;
                    Ok(())
                }
                Err(e) => {
                    // The commit may or may not have landed: read the tree
                    // again under the lease next time.
                    leader.frontier = None;
                    inner.failed_runs.fetch_add(1, Ordering::Relaxed);
                    if matches!(e, AuditError::Corrupt(_) | AuditError::WrongKey { .. }) {
                        inner.halt_with(&e.to_string());
                    }
                    Err(e)
                }
            },
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "sequencing round failed");
        }
    }
}

/// Takes the lease where it is free, expired, or this replica's own; the
/// new epoch then.
async fn acquire(inner: &Inner) -> Result<Option<i64>, AuditError> {
    let client = bounded(inner.settings.timeout, "connecting", inner.log_pool.get()).await?;
    let lease_ms = inner.settings.lease.as_millis() as i64;
    let row = bounded(
        inner.settings.timeout,
        "taking the sequencer lease",
        client.query_opt(
            "INSERT INTO sequencer_lease AS l (singleton, holder, epoch, expires_at)
             VALUES (true, $1, 1, now() + $2::float8 * interval '1 millisecond')
             ON CONFLICT (singleton) DO UPDATE
               SET holder = EXCLUDED.holder, epoch = l.epoch + 1, expires_at = EXCLUDED.expires_at
               WHERE l.expires_at < now() OR l.holder = EXCLUDED.holder
             RETURNING epoch",
            &[&inner.settings.replica, &(lease_ms as f64)],
        ),
    )
    .await?;
    Ok(row.map(|r| r.get(0)))
}

/// One sequencing run, one transaction. Ok(false): the lease is lost.
async fn sequence_once(inner: &Inner, leader: &mut Leadership) -> Result<bool, AuditError> {
    let limit = inner.settings.timeout;
    let mut client = bounded(limit, "connecting", inner.log_pool.get()).await?;
    let work = async {
        let tx = client.transaction().await.map_err(storage)?;
        // Fencing: the lease row, locked, must still be ours.
        let ours = tx
            .query_opt(
                "SELECT 1 FROM sequencer_lease WHERE holder = $1 AND epoch = $2 FOR UPDATE",
                &[&inner.settings.replica, &leader.epoch],
            )
            .await
            .map_err(storage)?;
        if ours.is_none() {
            return Ok(false);
        }
        tx.execute(
            "UPDATE sequencer_lease SET expires_at = now() + $1::float8 * interval '1 millisecond'",
            &[&(inner.settings.lease.as_millis() as f64)],
        )
        .await
        .map_err(storage)?;
        // Read before the head, as in the probe.
        let seen = inner.tree_size.load(Ordering::Acquire);
        let head = latest_head(&tx).await?;
        let size = head.as_ref().map_or(0, |h| h.tree_size);
        if size < seen {
            return Err(AuditError::Corrupt(format!(
                "the database's latest head covers {size} records, below the {seen} this replica saw: committed history was lost; sequencing stops"
            )));
        }
        let frontier = match leader.frontier.take() {
            Some(frontier)
                if frontier.size() == size
                    && head.as_ref().is_none_or(|h| h.root_hash == frontier.root()) =>
            {
                frontier
            }
            _ => {
                let frontier =
                    with_subtrees(&tx, |store| Frontier::from_store(store, size)).await?;
                if let Some(head) = &head {
                    if frontier.root() != head.root_hash {
                        return Err(AuditError::Corrupt(format!(
                            "the stored tree does not hash to the signed head of {size} records; sequencing stops"
                        )));
                    }
                    if head.verify(inner.key.public_key().as_ref()).is_err() {
                        return Err(AuditError::WrongKey {
                            log: "the PostgreSQL audit log".into(),
                            size,
                            public_key: hex::encode(inner.key.public_key().as_ref()),
                        });
                    }
                    leader.last_timestamp_ms = leader.last_timestamp_ms.max(head.timestamp_ms);
                }
                frontier
            }
        };
        let queued = tx
            .query(
                "SELECT queue_id, record, replica, queued_at_ms, mac, segment, replica_seq,
                        chain_segment, chain_last
                 FROM audit_queue ORDER BY queue_id LIMIT $1",
                &[&MAX_SEQUENCED],
            )
            .await
            .map_err(storage)?;
        if queued.is_empty() {
            tx.commit().await.map_err(storage)?;
            leader.frontier = Some(frontier);
            return Ok(true);
        }
        let mut next = frontier.clone();
        let mut queue_ids = Vec::with_capacity(queued.len());
        let mut columns = LeafColumns::default();
        let (mut levels, mut nodes, mut hashes) = (Vec::new(), Vec::new(), Vec::new());
        let mut set_aside: Vec<(i64, String)> = Vec::new();
        // Every record is unique (its exchange id, its time): a leaf the log
        // holds already, or one queued twice, is a copied row, which must
        // not be signed into the log a second time.
        let queued_leaves: Vec<Vec<u8>> = queued
            .iter()
            .map(|row| leaf_hash(row.get::<_, &[u8]>(1)).to_vec())
            .collect();
        let mut seen: std::collections::HashSet<Vec<u8>> = tx
            .query(
                "SELECT leaf_hash FROM audit_leaves WHERE leaf_hash = ANY($1)",
                &[&queued_leaves],
            )
            .await
            .map_err(storage)?
            .iter()
            .map(|row| row.get::<_, Vec<u8>>(0))
            .collect();
        // Written by a replica (it holds the key), or by someone else:
        // only the former is signed into the log.
        let authentic: Vec<bool> = queued
            .iter()
            .map(|row| {
                sequence_numbers::row_is_authentic(
                    &inner.row_key,
                    row.get(2),
                    (row.get(5), row.get(6), (row.get(7), row.get(8))),
                    row.get(1),
                    row.get(4),
                )
            })
            .collect();
        let numbers =
            check_numbers(&tx, &inner.row_key, &queued, &authentic, &leader.marks).await?;
        for (row, authentic) in queued.iter().zip(authentic) {
            let queue_id: i64 = row.get(0);
            let record_bytes: Vec<u8> = row.get(1);
            if !authentic {
                set_aside.push((
                    queue_id,
                    "its tag does not authenticate it: not written by a replica".into(),
                ));
                continue;
            }
            if numbers.copies.contains(&queue_id) {
                set_aside.push((
                    queue_id,
                    format!(
                        "its number ({} in segment {} of replica {}) was taken already: the row is a copy of one sequenced or queued before",
                        row.get::<_, i64>(6),
                        row.get::<_, i64>(5),
                        row.get::<_, &str>(2)
                    ),
                ));
                continue;
            }
            let record = match AuditRecord::decode(record_bytes.as_slice()) {
                Ok(record) => record,
                Err(e) => {
                    set_aside.push((queue_id, format!("it does not decode: {e}")));
                    continue;
                }
            };
            let leaf = leaf_hash(&record_bytes);
            if !seen.insert(leaf.to_vec()) {
                set_aside.push((
                    queue_id,
                    "a copy of a record the log already holds (or queued twice): the row was copied".into(),
                ));
                continue;
            }
            let index = next.size();
            for (level, node, hash) in next.push(leaf) {
                if level > 0 {
                    levels.push(level as i32);
                    nodes.push(to_i64(node));
                    hashes.push(hash.to_vec());
                }
            }
            queue_ids.push(queue_id);
            columns.push(index, leaf, &record, record_bytes, row.get(2), row.get(3));
        }
        if !set_aside.is_empty() {
            let (ids, reasons): (Vec<i64>, Vec<String>) = set_aside.into_iter().unzip();
            for (id, reason) in ids.iter().zip(&reasons) {
                tracing::error!(queue_id = id, %reason, "a queued audit row was set aside in audit_quarantine");
            }
            let moved = tx.query_one(
                "WITH moved AS (DELETE FROM audit_queue WHERE queue_id = ANY($1) RETURNING *),
                 kept AS (INSERT INTO audit_quarantine (queue_id, replica, leaf_hash, record, mac, queued_at_ms, segment, replica_seq, chain_segment, chain_last, reason)
                 SELECT m.queue_id, m.replica, m.leaf_hash, m.record, m.mac, m.queued_at_ms, m.segment, m.replica_seq, m.chain_segment, m.chain_last, r.reason
                 FROM moved m JOIN unnest($1::bigint[], $2::text[]) AS r(queue_id, reason) USING (queue_id)
                 RETURNING 1)
                 SELECT count(*) FROM kept",
                &[&ids, &reasons],
            )
            .await
            .map_err(storage)?
            .get::<_, i64>(0);
            if moved != ids.len() as i64 {
                return Err(AuditError::Corrupt(format!(
                    "PostgreSQL moved {moved} of the {} rows to set aside into audit_quarantine, yet reported success: a trigger on audit_queue or audit_quarantine keeps or drops rows. Sequencing stops until the database is checked and the replica restarted",
                    ids.len()
                )));
            }
            inner
                .quarantined
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
        }
        // Reported before the commit: a commit cut off (or held back by a
        // trigger past the run's time limit) may still land, and must not
        // take the only report of a gap with it. A run rolled back finds
        // the gap again and reports it twice, which is the safe side.
        report_gaps(inner, &numbers.gaps);
        store_numbers(&tx, &inner.row_key, &numbers, leader.epoch).await?;
        if queue_ids.is_empty() {
            tx.commit().await.map_err(storage)?;
            leader.marks.extend(numbers.marks.clone());
            leader.frontier = Some(frontier);
            return Ok(true);
        }
        insert_leaves(&tx, &columns, &queue_ids).await?;
        let stored = tx
            .execute(
                "INSERT INTO audit_nodes (level, node_index, hash)
                 SELECT * FROM unnest($1::integer[], $2::bigint[], $3::bytea[])",
                &[&levels, &nodes, &hashes],
            )
            .await
            .map_err(storage)?;
        written("audit_nodes", stored, levels.len())?;
        // The database's clock, as the receipts' commit times.
        let clock: i64 = tx
            .query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                &[],
            )
            .await
            .map_err(storage)?
            .get(0);
        let timestamp = (clock.max(0) as u64).max(leader.last_timestamp_ms);
        let head = SignedTreeHead::sign(&inner.key, next.size(), next.root(), timestamp);
        let stored = tx
            .execute(
                "INSERT INTO audit_heads (tree_size, root_hash, timestamp_ms, key_id, signature, sequencer_epoch)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &to_i64(head.tree_size),
                    &head.root_hash.as_slice(),
                    &to_i64(head.timestamp_ms),
                    &hex::decode(&inner.key_id).unwrap_or_default(),
                    &head.signature,
                    &leader.epoch,
                ],
            )
            .await
            .map_err(storage)?;
        written("audit_heads", stored, 1)?;
        // What the DELETE removed, not what it was asked to: a BEFORE DELETE
        // trigger that keeps the rows would have every later run take them
        // again. Nothing of this run is committed then (its head unsigned).
        let taken = tx
            .execute(
                "DELETE FROM audit_queue WHERE queue_id = ANY($1)",
                &[&queue_ids],
            )
            .await
            .map_err(storage)?;
        if taken != queue_ids.len() as u64 {
            return Err(AuditError::Corrupt(format!(
                "PostgreSQL removed {taken} of the {} sequenced rows from audit_queue, yet reported success: a trigger on the table keeps rows (list its triggers with `\\d audit_queue` in psql; replicas create none). The run was rolled back; sequencing stops until the database is checked and the replica restarted",
                queue_ids.len()
            )));
        }
        tx.commit().await.map_err(storage)?;
        leader.last_timestamp_ms = timestamp;
        leader.frontier = Some(next);
        inner.tree_size.fetch_max(head.tree_size, Ordering::AcqRel);
        inner.heads_published.fetch_add(1, Ordering::Relaxed);
        leader.marks.extend(numbers.marks.clone());
        Ok(true)
    };
    match tokio::time::timeout(limit.saturating_mul(4), work).await {
        Ok(result) => result,
        Err(_) => Err(AuditError::Storage(format!(
            "PostgreSQL: a sequencing run took longer than {:?}",
            limit.saturating_mul(4)
        ))),
    }
}

/// The numbers of the authentic rows of `queued` (columns as the
/// sequencer reads them) checked against their segments' stored marks.
/// A mark that does not authenticate stops the run: it was edited, to hide
/// a deleted row or to pass a copied one.
async fn check_numbers(
    tx: &impl GenericClient,
    key: &ring::hmac::Key,
    queued: &[tokio_postgres::Row],
    authentic: &[bool],
    stored_before: &HashMap<(String, i64), i64>,
) -> Result<sequence_numbers::Checked, AuditError> {
    let numbered: Vec<sequence_numbers::Numbered> = queued
        .iter()
        .zip(authentic)
        .filter(|(row, authentic)| **authentic && row.get::<_, i64>(6) > 0)
        .map(|(row, _)| sequence_numbers::Numbered {
            queue_id: row.get(0),
            replica: row.get(2),
            segment: row.get(5),
            seq: row.get(6),
            chain: (row.get(7), row.get(8)),
        })
        .collect();
    if numbered.is_empty() {
        return Ok(sequence_numbers::Checked::default());
    }
    // Each row's segment, and the one its chain names.
    let wanted: std::collections::HashSet<(&str, i64)> = numbered
        .iter()
        .flat_map(|row| {
            [
                (row.replica.as_str(), row.segment),
                (row.replica.as_str(), row.chain.0),
            ]
        })
        .collect();
    let (replicas, segments): (Vec<&str>, Vec<i64>) = wanted.iter().copied().unzip();
    let mut marks = HashMap::new();
    for row in tx
        .query(
            "SELECT m.replica, m.segment, m.last_seq, m.mac FROM audit_queue_marks m
             JOIN unnest($1::text[], $2::bigint[]) AS s(replica, segment) USING (replica, segment)",
            &[&replicas, &segments],
        )
        .await
        .map_err(storage)?
    {
        let (replica, segment, last): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if !sequence_numbers::mark_is_authentic(key, &replica, segment, last, row.get(3)) {
            return Err(AuditError::Corrupt(format!(
                "the mark of replica {replica}'s segment {segment} in audit_queue_marks (last number {last}) does not authenticate: it was edited in the database, to hide a deleted queued row or pass a copied one. Sequencing stops until the database is checked and the replica restarted"
            )));
        }
        marks.insert((replica, segment), last);
    }
    // A mark this sequencer stored, found lower or gone: rolled back (an
    // older authentic row written back, or the row deleted), which would
    // let a copy through as new.
    // Only the segments of this run's rows: the sequencer's memory grows
    // with every segment it took, this run's rows do not.
    for (replica, segment) in &wanted {
        let key = (replica.to_string(), *segment);
        let Some(last) = stored_before.get(&key) else {
            continue;
        };
        if marks.get(&key).is_none_or(|found| found < last) {
            return Err(AuditError::Corrupt(format!(
                "the mark of replica {replica}'s segment {segment} in audit_queue_marks was rolled back (this sequencer stored {last}, the table holds {:?}): an older row was written back or the row deleted, to pass a copied queued row. Sequencing stops until the database is checked and the replica restarted",
                marks.get(&key)
            )));
        }
    }
    Ok(sequence_numbers::check(&numbered, &marks))
}

/// Stores a run's new marks and the gaps it found, each write checked.
async fn store_numbers(
    tx: &impl GenericClient,
    key: &ring::hmac::Key,
    numbers: &sequence_numbers::Checked,
    epoch: i64,
) -> Result<(), AuditError> {
    if !numbers.marks.is_empty() {
        let mut replicas = Vec::new();
        let mut segments = Vec::new();
        let mut lasts = Vec::new();
        let mut tags = Vec::new();
        for ((replica, segment), last) in &numbers.marks {
            tags.push(sequence_numbers::mark_tag(key, replica, *segment, *last));
            replicas.push(replica.as_str());
            segments.push(*segment);
            lasts.push(*last);
        }
        let stored = tx
            .execute(
                "INSERT INTO audit_queue_marks (replica, segment, last_seq, mac)
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[])
                 ON CONFLICT (replica, segment)
                 DO UPDATE SET last_seq = EXCLUDED.last_seq, mac = EXCLUDED.mac",
                &[&replicas, &segments, &lasts, &tags],
            )
            .await
            .map_err(storage)?;
        written("audit_queue_marks", stored, replicas.len())?;
    }
    if !numbers.gaps.is_empty() {
        let replicas: Vec<&str> = numbers.gaps.iter().map(|g| g.replica.as_str()).collect();
        let segments: Vec<i64> = numbers.gaps.iter().map(|g| g.segment).collect();
        let firsts: Vec<i64> = numbers.gaps.iter().map(|g| g.first).collect();
        let lasts: Vec<i64> = numbers.gaps.iter().map(|g| g.last).collect();
        let stored = tx
            .execute(
                "INSERT INTO audit_queue_gaps AS g (replica, segment, first_seq, last_seq, sequencer_epoch)
                 SELECT r, s, f, l, $5 FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS n(r, s, f, l)
                 ON CONFLICT (replica, segment, first_seq) DO UPDATE
                   SET last_seq = greatest(g.last_seq, EXCLUDED.last_seq), noticed_at = now()",
                &[&replicas, &segments, &firsts, &lasts, &epoch],
            )
            .await
            .map_err(storage)?;
        written("audit_queue_gaps", stored, replicas.len())?;
    }
    Ok(())
}

/// Counts and logs the gaps a run found (before its commit).
fn report_gaps(inner: &Inner, gaps: &[sequence_numbers::Gap]) {
    for gap in gaps {
        tracing::error!(
            replica = %gap.replica,
            segment = gap.segment,
            first = gap.first,
            last = gap.last,
            "queued audit records were deleted before they were sequenced: their receipts are broken (see audit_queue_gaps; look for triggers with `\\d audit_queue` in psql)"
        );
        inner.queue_gaps.fetch_add(gap.len(), Ordering::Relaxed);
    }
}

/// The columns of the leaves one run writes.
#[derive(Default)]
struct LeafColumns {
    indices: Vec<i64>,
    leaves: Vec<Vec<u8>>,
    records: Vec<Vec<u8>>,
    replicas: Vec<String>,
    queued_at: Vec<i64>,
    subjects: Vec<Option<Vec<u8>>>,
    callers: Vec<String>,
    evidence_types: Vec<String>,
    connectors: Vec<String>,
    outcomes: Vec<i32>,
    received: Vec<i64>,
}

impl LeafColumns {
    /// The rows `range`, for a chunked insert.
    fn slice(&self, range: std::ops::Range<usize>) -> LeafColumns {
        LeafColumns {
            indices: self.indices[range.clone()].to_vec(),
            leaves: self.leaves[range.clone()].to_vec(),
            records: self.records[range.clone()].to_vec(),
            replicas: self.replicas[range.clone()].to_vec(),
            queued_at: self.queued_at[range.clone()].to_vec(),
            subjects: self.subjects[range.clone()].to_vec(),
            callers: self.callers[range.clone()].to_vec(),
            evidence_types: self.evidence_types[range.clone()].to_vec(),
            connectors: self.connectors[range.clone()].to_vec(),
            outcomes: self.outcomes[range.clone()].to_vec(),
            received: self.received[range].to_vec(),
        }
    }

    fn push(
        &mut self,
        index: u64,
        leaf: Hash,
        record: &AuditRecord,
        bytes: Vec<u8>,
        replica: String,
        queued_at_ms: i64,
    ) {
        self.indices.push(to_i64(index));
        self.leaves.push(leaf.to_vec());
        self.records.push(bytes);
        self.replicas.push(replica);
        self.queued_at.push(queued_at_ms);
        self.subjects
            .push((!record.subject_pseudonym.is_empty()).then(|| record.subject_pseudonym.clone()));
        self.callers.push(record.caller_id.clone());
        self.evidence_types.push(record.evidence_type.clone());
        self.connectors.push(record.connector_id.clone());
        self.outcomes.push(record.outcome);
        self.received
            .push(record.received_at.as_ref().map_or(0, |t| t.seconds));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_counts_only_when_every_record_was_stored_at_a_real_time() {
        assert_eq!(
            stored_commit_time(3, 3, Some(1_000), Some(1_000)).expect("stored"),
            1_000
        );
        for (stored, earliest, latest) in [
            // A BEFORE INSERT trigger returning NULL: nothing stored, and
            // max() of no rows is NULL.
            (0, None, None),
            // One row of three dropped.
            (2, Some(1_000), Some(1_000)),
            // The commit time rewritten.
            (3, Some(0), Some(1_000)),
            (3, Some(-5), Some(-5)),
        ] {
            let refused = stored_commit_time(3, stored, earliest, latest)
                .expect_err("not every record stored at a real time");
            assert!(
                matches!(&refused, AuditError::Storage(why) if why.contains("audit_queue")),
                "{refused:?}"
            );
        }
    }
}
