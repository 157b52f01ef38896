//! The audit log as the request path and the audit service see it.

use onceonly_audit_log::{AuditError, AuditFault, AuditFilter, AuditMetrics};
use onceonly_merkle::Hash;
use onceonly_merkle::sth::SignedTreeHead;
use onceonly_proto::v1::{AuditReceipt, AuditRecord};

/// Where an appended record is.
#[derive(Debug, Clone, Default)]
pub struct Appended {
    /// Its log index, where the record is already in a signed head.
    pub index: Option<u64>,
    /// The signed promise of inclusion, where it is not yet.
    pub receipt: Option<AuditReceipt>,
}

/// One entry of the log: its index, its record, and the exact bytes its
/// leaf hash is taken of.
pub type LogEntry = (u64, AuditRecord, Vec<u8>);

/// What a replicated log reports beyond the common figures (the admin
/// listener's gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaGauges {
    /// Whether this replica holds the sequencer lease.
    pub sequencer: bool,
    /// Sequencing runs that failed.
    pub failed_runs: u64,
    /// Queued rows the sequencer set aside.
    pub quarantined: u64,
    /// Receipts this replica gave whose records never reached the log.
    pub receipts_broken: u64,
    /// Queued records this replica's sequencer found missing from their
    /// replica's numbering: deleted before they were sequenced.
    pub queue_gaps: u64,
}

/// An append-only Merkle log of records (RFC 9162), durable before the
/// caller is answered.
#[async_trait::async_trait]
pub trait AuditStore: Send + Sync {
    /// Appends `record` durably: Ok once it is committed.
    async fn append(&self, record: AuditRecord) -> Result<Appended, AuditError>;

    /// The latest signed tree head.
    async fn signed_tree_head(&self) -> Result<Option<SignedTreeHead>, AuditError>;

    /// The audit path of record `index` in the tree of `size`, and the
    /// record's leaf hash.
    async fn inclusion_proof(&self, index: u64, size: u64)
    -> Result<(Vec<Hash>, Hash), AuditError>;

    /// The index of the record whose leaf hash is `leaf_hash`, among the
    /// first `size` (None where it is not there); [`AuditError::Unsupported`]
    /// where the log keeps no such index (its answers carry the record's
    /// log index instead).
    async fn find_leaf(&self, leaf_hash: &Hash, size: u64) -> Result<Option<u64>, AuditError>;

    /// The proof that the tree of `second` extends the tree of `first`.
    async fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, AuditError>;

    /// Entries from `start`, at most `max`.
    async fn entries(&self, start: u64, max: u64) -> Result<Vec<LogEntry>, AuditError>;

    /// Up to `limit` records matching `filter` from `start`, and where to
    /// continue. Every record returned has been checked against the filter
    /// and its leaf, so an edited index cannot move a record into another
    /// view.
    async fn query(
        &self,
        filter: AuditFilter,
        start: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), AuditError>;

    /// Why appends are refused now, if they are (readiness follows it).
    fn refusing(&self) -> Option<String>;

    /// Records covered by the latest signed head (as last seen).
    fn tree_size(&self) -> u64;

    /// Batch and flush (or commit) figures.
    fn metrics(&self) -> &AuditMetrics;

    /// The replicated log's own figures; None for a log of one process.
    fn replica_gauges(&self) -> Option<ReplicaGauges> {
        None
    }

    /// Injects `fault` (drills and tests; a log that knows fewer faults
    /// plays every fault as failing appends).
    fn inject(&self, fault: AuditFault);
}
