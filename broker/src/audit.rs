//! The audit log: one record per exchange, in an append-only Merkle log in
//! the manner of Certificate Transparency (RFC 9162), durable before the
//! caller is answered.
//!
//! Appends go through one writer thread that batches whatever is waiting
//! (group commit). For a batch it assigns log indexes, hashes the records
//! into the tree ([`onceonly_merkle::Frontier`]), signs the new tree head
//! with the broker's audit key, and appends records, the tree nodes they
//! complete and the signed head as ONE frame to the log file
//! ([`segment`]), made durable with one `fdatasync`; only then is every
//! request in the batch answered. A crash leaves either the whole frame or
//! a torn tail that reopening cuts off (no one was answered for it), so
//! the log always reopens at its last signed head. A batch that fails
//! fails every request in it, and those callers get no evidence; after a
//! failed flush the log refuses all appends until restarted (the kernel
//! may have dropped the unflushed pages, so nothing later could be
//! trusted to be on disk).
//!
//! Sled holds only what can be rebuilt from the file: where each batch's
//! frame starts, and the query indexes (one entry per batch and indexed
//! value, listing the records). They are written after the flush without
//! one of their own; on opening, frames the index has not seen are indexed
//! again.
//!
//! Records hold the payload digest, never the payload, and the subject only
//! as a keyed pseudonym. [`verify_dir`] checks a copied data directory end
//! to end with nothing but the public key and the file.

pub mod handover;
pub mod segment;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use onceonly_merkle::sth::SignedTreeHead;
use onceonly_merkle::{
    Frontier, Hash, ProofError, Subtrees, last_leaf, leaf_hash, subtree_position,
    subtrees_completed,
};
use onceonly_proto::v1::{self as pb, AuditRecord, ExchangeOutcome};
use prost::Message;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tokio::sync::{mpsc, oneshot};

/// The most records one batch takes.
const MAX_BATCH: usize = 4096;

/// The sled tree of the log's (rebuildable) indexes.
const INDEX_TREE: &str = "audit-index";

/// The key layout of the `audit-index` tree.
pub mod keys {
    /// `b` + first log index (u64 BE) -> the batch's frame: offset in the
    /// file (u64 BE) and record count (u32 BE).
    pub const BATCH: u8 = b'b';
    /// `x` + field (u8) + value length (u16 BE) + value + first log index
    /// of the batch (u64 BE) -> the batch's records with that value (u64
    /// BE each, ascending).
    pub const INDEX: u8 = b'x';

    /// The key of the batch starting at `first_index`.
    pub fn batch(first_index: u64) -> [u8; 9] {
        let mut key = [BATCH; 9];
        key[1..].copy_from_slice(&first_index.to_be_bytes());
        key
    }

    /// The prefix of an index's entries for one value.
    pub fn index_prefix(field: u8, value: &[u8]) -> Vec<u8> {
        let mut key = vec![INDEX, field];
        key.extend_from_slice(&(value.len().min(u16::MAX as usize) as u16).to_be_bytes());
        key.extend_from_slice(&value[..value.len().min(u16::MAX as usize)]);
        key
    }
}

/// The indexed fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Field {
    Subject = 1,
    Caller = 2,
    EvidenceType = 3,
    Connector = 4,
    Outcome = 5,
}

/// The index prefixes a record is listed under.
fn index_prefixes(record: &AuditRecord) -> impl Iterator<Item = Vec<u8>> + '_ {
    [
        Some(keys::index_prefix(
            Field::Caller as u8,
            record.caller_id.as_bytes(),
        )),
        Some(keys::index_prefix(
            Field::EvidenceType as u8,
            record.evidence_type.as_bytes(),
        )),
        Some(keys::index_prefix(
            Field::Outcome as u8,
            &record.outcome.to_be_bytes(),
        )),
        (!record.subject_pseudonym.is_empty())
            .then(|| keys::index_prefix(Field::Subject as u8, &record.subject_pseudonym)),
        (!record.connector_id.is_empty())
            .then(|| keys::index_prefix(Field::Connector as u8, record.connector_id.as_bytes())),
    ]
    .into_iter()
    .flatten()
}

/// The index entries of one batch: its frame's place, and per indexed
/// value one entry listing the batch's records with it.
fn index_batch<'a>(
    first_index: u64,
    offset: u64,
    records: impl Iterator<Item = &'a AuditRecord>,
) -> sled::Batch {
    let mut lists: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut count = 0u32;
    for (n, record) in records.enumerate() {
        let index = first_index + n as u64;
        for prefix in index_prefixes(record) {
            lists
                .entry(prefix)
                .or_default()
                .extend_from_slice(&index.to_be_bytes());
        }
        count += 1;
    }
    let mut batch = sled::Batch::default();
    for (mut key, list) in lists {
        key.extend_from_slice(&first_index.to_be_bytes());
        batch.insert(key, list);
    }
    let mut place = offset.to_be_bytes().to_vec();
    place.extend_from_slice(&count.to_be_bytes());
    batch.insert(&keys::batch(first_index)[..], place);
    batch
}

/// Why the log failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The storage failed.
    #[error("audit storage failed: {0}")]
    Storage(String),
    /// The writer is gone (shutting down).
    #[error("the audit writer has stopped")]
    WriterStopped,
    /// A stored record or head does not decode.
    #[error("audit log corrupt: {0}")]
    Corrupt(String),
    /// A proof was asked for sizes the log cannot prove.
    #[error("{0}")]
    OutOfRange(String),
    /// The log's last signed head was not signed by the configured key.
    #[error(
        "{log}: its last signed tree head (of {size} records) does not verify under the configured audit key (public key {public_key}): this is not the key that signed this log. Restore the key that did; a new key is never started over an existing log (rotate with `onceonly-broker rotate-audit-key`)"
    )]
    WrongKey {
        /// The log file.
        log: String,
        /// The head's size.
        size: u64,
        /// The configured key's public half, hex.
        public_key: String,
    },
}

impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> Self {
        AuditError::Storage(e.to_string())
    }
}

impl From<std::io::Error> for AuditError {
    fn from(e: std::io::Error) -> Self {
        AuditError::Storage(format!("{}: {e}", segment::FILE_NAME))
    }
}

struct Append {
    record: AuditRecord,
    /// Set on a key hand-over: the writer signs the hand-over with its key,
    /// this batch's head and all later ones with this one.
    new_key: Option<Ed25519KeyPair>,
    done: oneshot::Sender<Result<u64, AuditError>>,
}

/// Which records a query wants; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Subject pseudonym.
    pub subject_pseudonym: Option<Vec<u8>>,
    /// Caller SPIFFE id.
    pub caller_id: Option<String>,
    /// Evidence type.
    pub evidence_type: Option<String>,
    /// Connector id.
    pub connector_id: Option<String>,
    /// Outcome.
    pub outcome: Option<ExchangeOutcome>,
    /// Received at or after (Unix seconds).
    pub received_after: Option<i64>,
    /// Received before (Unix seconds).
    pub received_before: Option<i64>,
}

impl AuditFilter {
    fn matches(&self, record: &AuditRecord) -> bool {
        let received = record.received_at.as_ref().map_or(0, |t| t.seconds);
        self.subject_pseudonym
            .as_ref()
            .is_none_or(|p| *p == record.subject_pseudonym)
            && self
                .caller_id
                .as_ref()
                .is_none_or(|c| *c == record.caller_id)
            && self
                .evidence_type
                .as_ref()
                .is_none_or(|e| *e == record.evidence_type)
            && self
                .connector_id
                .as_ref()
                .is_none_or(|c| *c == record.connector_id)
            && self.outcome.is_none_or(|o| o as i32 == record.outcome)
            && self.received_after.is_none_or(|t| received >= t)
            && self.received_before.is_none_or(|t| received < t)
    }

    /// The most selective index the filter can use.
    fn index(&self) -> Option<Vec<u8>> {
        if let Some(p) = &self.subject_pseudonym {
            return Some(keys::index_prefix(Field::Subject as u8, p));
        }
        if let Some(c) = &self.caller_id {
            return Some(keys::index_prefix(Field::Caller as u8, c.as_bytes()));
        }
        if let Some(c) = &self.connector_id {
            return Some(keys::index_prefix(Field::Connector as u8, c.as_bytes()));
        }
        if let Some(e) = &self.evidence_type {
            return Some(keys::index_prefix(Field::EvidenceType as u8, e.as_bytes()));
        }
        self.outcome
            .map(|o| keys::index_prefix(Field::Outcome as u8, &(o as i32).to_be_bytes()))
    }
}

/// What readers and the writer share: the file, the index, the head.
struct Store {
    file: File,
    index: sled::Tree,
    head: RwLock<Option<SignedTreeHead>>,
    /// Successful `fdatasync`s of the file, the frames' and the cut-backs'.
    flushes: AtomicU64,
    /// Why appends are refused until a restart (a failed flush), if so.
    broken: RwLock<Option<String>>,
    /// When the last batch failed (Unix ms; 0: never).
    last_failure_ms: std::sync::atomic::AtomicI64,
    /// Flush and batch figures, for the broker's metrics.
    metrics: crate::metrics::AuditMetrics,
}

/// Where a batch's frame is.
#[derive(Debug, Clone, Copy)]
struct BatchPlace {
    first_index: u64,
    offset: u64,
    count: u64,
}

impl BatchPlace {
    fn decode(key: &[u8], value: &[u8]) -> Result<Self, AuditError> {
        let corrupt = || AuditError::Corrupt("a batch index entry is malformed".into());
        let first_index = u64::from_be_bytes(key[1..].try_into().map_err(|_| corrupt())?);
        if value.len() != 12 {
            return Err(corrupt());
        }
        Ok(BatchPlace {
            first_index,
            offset: u64::from_be_bytes(value[..8].try_into().map_err(|_| corrupt())?),
            count: u64::from(u32::from_be_bytes(
                value[8..].try_into().map_err(|_| corrupt())?,
            )),
        })
    }
}

impl Store {
    /// The batch holding log index `index`, where indexed.
    fn batch_of(&self, index: u64) -> Result<Option<BatchPlace>, AuditError> {
        let Some(entry) = self
            .index
            .range(keys::batch(0)..=keys::batch(index))
            .next_back()
        else {
            return Ok(None);
        };
        let (key, value) = entry?;
        let place = BatchPlace::decode(&key, &value)?;
        Ok((index < place.first_index + place.count).then_some(place))
    }

    /// The batches from the one holding `start` on.
    fn batches_from(
        &self,
        start: u64,
    ) -> impl Iterator<Item = Result<BatchPlace, AuditError>> + '_ {
        let first = self.batch_of(start).transpose();
        let rest = self
            .index
            .range(keys::batch(start.saturating_add(1))..=keys::batch(u64::MAX))
            .map(|entry| {
                let (key, value) = entry?;
                BatchPlace::decode(&key, &value)
            });
        first.into_iter().chain(rest)
    }

    /// The exact bytes of record `index`.
    fn record_bytes(&self, index: u64) -> Result<Option<Vec<u8>>, AuditError> {
        let Some(place) = self.batch_of(index)? else {
            return Ok(None);
        };
        Ok(Some(segment::read_record(
            &self.file,
            place.offset,
            index - place.first_index,
        )?))
    }

    fn signed_size(&self) -> u64 {
        self.head
            .read()
            .map(|head| head.as_ref().map_or(0, |h| h.tree_size))
            .unwrap_or(0)
    }
}

/// Perfect subtrees, from the frames that completed them.
impl Subtrees for Store {
    type Error = AuditError;

    fn perfect(&self, level: u32, index: u64) -> Result<Hash, AuditError> {
        let missing = || AuditError::Corrupt(format!("tree node {level}/{index} missing"));
        let place = self
            .batch_of(last_leaf(level, index))?
            .ok_or_else(missing)?;
        let j = subtree_position(level, index)
            .checked_sub(subtrees_completed(place.first_index))
            .ok_or_else(missing)?;
        Ok(segment::read_node(&self.file, place.offset, j)?)
    }
}

/// How long one durable append of a small frame takes in `dir`: the
/// slowest of three timed `write` + `fdatasync` of 4 KiB to a probe file
/// (removed after). The broker seeds its deadline reserve with it, so the
/// first exchange after a start keeps back a measured flush, not a guess.
/// Blocking: call it off the async workers.
pub fn time_a_flush(dir: &Path) -> std::io::Result<std::time::Duration> {
    use std::io::Write;
    let path = dir.join(".flush-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = [0u8; 4096];
    let mut slowest = std::time::Duration::ZERO;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        slowest = slowest.max(started.elapsed());
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(slowest)
}

/// Opens a sled data directory. A directory this process has just closed
/// can stay locked for a moment while sled frees its caches (deferred,
/// epoch-based reclamation), so a busy lock is retried for up to 5 s before
/// the error is returned.
pub fn open_storage(config: sled::Config) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock") =>
            {
                if std::time::Instant::now() >= deadline {
                    return Err(sled::Error::Io(e));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Where the public key of the signing key at `key_path` is written.
pub fn public_key_path(key_path: &Path) -> std::path::PathBuf {
    let mut name = key_path.as_os_str().to_owned();
    name.push(".pub");
    name.into()
}

/// Converts between the merkle crate's head and the wire message.
pub fn head_to_proto(head: &SignedTreeHead) -> pb::SignedTreeHead {
    pb::SignedTreeHead {
        tree_size: head.tree_size,
        root_hash: head.root_hash.to_vec(),
        timestamp: Some(crate::consent::timestamp(
            i64::try_from(head.timestamp_ms).unwrap_or(i64::MAX),
        )),
        signature_algorithm: onceonly_merkle::sth::ALGORITHM.into(),
        key_id: head.key_id.clone(),
        signature: head.signature.clone(),
    }
}

/// The wire head as the merkle crate's, where well-formed.
pub fn head_from_proto(head: &pb::SignedTreeHead) -> Result<SignedTreeHead, AuditError> {
    Ok(SignedTreeHead {
        tree_size: head.tree_size,
        root_hash: head
            .root_hash
            .as_slice()
            .try_into()
            .map_err(|_| AuditError::Corrupt("tree head root is not 32 bytes".into()))?,
        timestamp_ms: head
            .timestamp
            .as_ref()
            .map(|t| u64::try_from(crate::consent::millis(t)).unwrap_or(0))
            .unwrap_or(0),
        key_id: head.key_id.clone(),
        signature: head.signature.clone(),
    })
}

/// The audit log.
#[derive(Clone)]
pub struct AuditLog {
    store: Arc<Store>,
    appends: mpsc::Sender<Append>,
    /// Fault injection for fail-closed drills ([`AuditFault`]).
    fault: Arc<AtomicU8>,
    /// While set, the writer holds its next batch open (tests that need
    /// several appends in one frame).
    held: Arc<AtomicBool>,
}

/// A fault to inject into the log's writer, for fail-closed drills and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AuditFault {
    /// None: appends work.
    None = 0,
    /// Every append fails before it is written.
    Append = 1,
    /// Appends are written and flushed, then indexing them fails (the
    /// writer must cut the frame back durably and refuse further appends).
    IndexAfterFlush = 2,
}

impl AuditLog {
    /// Opens the log kept in `data_dir` (its file) and `db` (its indexes),
    /// cutting off a torn tail and indexing frames the index has not seen,
    /// and starts its writer, which signs tree heads with `key`.
    /// `durable`: flush every batch to disk before answering. The writer
    /// ends once every handle to the log is dropped; the returned task
    /// completes then.
    pub fn open(
        data_dir: &Path,
        db: &sled::Db,
        durable: bool,
        key: Ed25519KeyPair,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), AuditError> {
        let path = data_dir.join(segment::FILE_NAME);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| AuditError::Storage(format!("{}: {e}", path.display())))?;
        let store = Store {
            file,
            index: db.open_tree(INDEX_TREE)?,
            head: RwLock::new(None),
            flushes: AtomicU64::new(0),
            broken: RwLock::new(None),
            last_failure_ms: std::sync::atomic::AtomicI64::new(0),
            metrics: crate::metrics::AuditMetrics::default(),
        };
        let (end, head) = recover(&store, &path)?;
        let size = head.as_ref().map_or(0, |h| h.tree_size);
        let frontier = Frontier::from_store(&store, size)?;
        if let Some(head) = &head
            && frontier.root() != head.root_hash
        {
            return Err(AuditError::Corrupt(format!(
                "{}: the records do not hash to the last signed head; check it with `onceonly-audit verify-dir`",
                path.display()
            )));
        }
        if let Some(head) = &head
            && head.verify(key.public_key().as_ref()).is_err()
        {
            return Err(AuditError::WrongKey {
                log: path.display().to_string(),
                size: head.tree_size,
                public_key: hex::encode(key.public_key().as_ref()),
            });
        }
        *store.head.write().map_err(|_| poisoned())? = head;
        let store = Arc::new(store);
        let (appends, queue) = mpsc::channel(MAX_BATCH * 4);
        let fault = Arc::new(AtomicU8::new(AuditFault::None as u8));
        let held = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            store: store.clone(),
            end,
            frontier,
            key,
            durable,
            fault: fault.clone(),
            held: held.clone(),
            broken: None,
            area: Vec::new(),
            ends: Vec::new(),
            nodes: Vec::new(),
            frame: Vec::new(),
        };
        let task = tokio::task::spawn_blocking(move || writer.run(queue));
        Ok((
            AuditLog {
                store,
                appends,
                fault,
                held,
            },
            task,
        ))
    }

    /// Appends `record` and returns its index once it is durable and
    /// covered by a signed tree head.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let (done, result) = oneshot::channel();
        self.appends
            .send(Append {
                record,
                new_key: None,
                done,
            })
            .await
            .map_err(|_| AuditError::WriterStopped)?;
        result.await.map_err(|_| AuditError::WriterStopped)?
    }

    /// Hands the log over to `new_key`: appends a hand-over record signed
    /// by the current key; its batch's head and all later heads are signed
    /// by `new_key`. Returns the hand-over's index once durable.
    pub async fn rotate_key(&self, new_key: Ed25519KeyPair) -> Result<u64, AuditError> {
        let (done, result) = oneshot::channel();
        self.appends
            .send(Append {
                record: AuditRecord::default(),
                new_key: Some(new_key),
                done,
            })
            .await
            .map_err(|_| AuditError::WriterStopped)?;
        result.await.map_err(|_| AuditError::WriterStopped)?
    }

    /// The latest signed tree head (None for an empty log).
    pub fn signed_tree_head(&self) -> Result<Option<SignedTreeHead>, AuditError> {
        Ok(self.store.head.read().map_err(|_| poisoned())?.clone())
    }

    /// The number of records (the latest head's size).
    pub fn len(&self) -> u64 {
        self.store.signed_size()
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record at `index` and its exact leaf bytes.
    pub fn entry(&self, index: u64) -> Result<Option<(AuditRecord, Vec<u8>)>, AuditError> {
        if index >= self.len() {
            return Ok(None);
        }
        let Some(bytes) = self.store.record_bytes(index)? else {
            return Ok(None);
        };
        let record = AuditRecord::decode(bytes.as_slice())
            .map_err(|e| AuditError::Corrupt(format!("record {index}: {e}")))?;
        Ok(Some((record, bytes)))
    }

    /// The record at `index`.
    pub fn get(&self, index: u64) -> Result<Option<AuditRecord>, AuditError> {
        Ok(self.entry(index)?.map(|(record, _)| record))
    }

    /// The leaf hash of record `index`.
    pub fn leaf_hash(&self, index: u64) -> Result<Hash, AuditError> {
        self.check_size(index.saturating_add(1))?;
        self.store.perfect(0, index)
    }

    /// The inclusion proof of leaf `index` in the tree of `size` leaves.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, AuditError> {
        self.check_size(size)?;
        onceonly_merkle::inclusion_proof(&*self.store, index, size).map_err(proof_error)
    }

    /// The consistency proof between two tree sizes.
    pub fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, AuditError> {
        self.check_size(second)?;
        onceonly_merkle::consistency_proof(&*self.store, first, second).map_err(proof_error)
    }

    fn check_size(&self, size: u64) -> Result<(), AuditError> {
        let signed = self.len();
        if size > signed {
            return Err(AuditError::OutOfRange(format!(
                "tree size {size} is beyond the latest signed head ({signed})"
            )));
        }
        Ok(())
    }

    /// Up to `limit` records matching `filter`, from index `start` on, and
    /// the index to continue from (None at the end). Uses the most
    /// selective index of the filter; scans the file only without one.
    pub fn query(
        &self,
        filter: &AuditFilter,
        start: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), AuditError> {
        let size = self.len();
        let mut found = Vec::new();
        match filter.index() {
            Some(prefix) => {
                let mut from = prefix.clone();
                from.extend_from_slice(&start.to_be_bytes());
                // The batch entry before `start` may list records after it.
                let before = self
                    .store
                    .index
                    .range(prefix.clone()..from.clone())
                    .next_back();
                for entry in before.into_iter().chain(self.store.index.range(from..)) {
                    let (key, list) = entry?;
                    if !key.starts_with(&prefix) || key.len() != prefix.len() + 8 {
                        break;
                    }
                    for bytes in list.chunks_exact(8) {
                        let index = u64::from_be_bytes(bytes.try_into().unwrap_or_default());
                        if index < start || index >= size {
                            continue;
                        }
                        if found.len() == limit {
                            return Ok((found, Some(index)));
                        }
                        if let Some(record) = self.get(index)?
                            && filter.matches(&record)
                        {
                            found.push(record);
                        }
                    }
                }
            }
            None => {
                let file_len = self.store.file.metadata()?.len();
                for place in self.store.batches_from(start) {
                    let place = place?;
                    let segment::Read::Frame { frame, .. } =
                        segment::read_at(&self.store.file, place.offset, file_len)?
                    else {
                        return Err(AuditError::Corrupt(format!(
                            "no frame at byte {} for records from {}",
                            place.offset, place.first_index
                        )));
                    };
                    for (n, bytes) in frame.records.iter().enumerate() {
                        let index = place.first_index + n as u64;
                        if index < start {
                            continue;
                        }
                        if index >= size {
                            return Ok((found, None));
                        }
                        if found.len() == limit {
                            return Ok((found, Some(index)));
                        }
                        let record = AuditRecord::decode(bytes.as_slice())
                            .map_err(|e| AuditError::Corrupt(format!("record {index}: {e}")))?;
                        if filter.matches(&record) {
                            found.push(record);
                        }
                    }
                }
            }
        }
        Ok((found, None))
    }

    /// Makes every append fail while `failing` (fail-closed drills and
    /// tests: the broker must then release no evidence).
    pub fn inject_failure(&self, failing: bool) {
        self.inject(if failing {
            AuditFault::Append
        } else {
            AuditFault::None
        });
    }

    /// Injects `fault` into the writer until another is injected.
    pub fn inject(&self, fault: AuditFault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
        if fault == AuditFault::None {
            // The failures were the drill's: readiness need not wait out
            // the memory of them.
            self.store.last_failure_ms.store(0, Ordering::Relaxed);
        }
    }

    /// While `held`, the writer keeps the batch it has begun open, so every
    /// append sent meanwhile joins the same frame (tests of group commit).
    pub fn hold_commits(&self, held: bool) {
        self.held.store(held, Ordering::SeqCst);
    }

    /// Appends waiting for the writer (beyond the one it holds).
    pub fn queued(&self) -> usize {
        self.appends.max_capacity() - self.appends.capacity()
    }

    /// Successful flushes (`fdatasync`) of the log file so far.
    pub fn flushes(&self) -> u64 {
        self.store.flushes.load(Ordering::Relaxed)
    }

    /// Why the log refuses appends now, if it does: a failed flush (until
    /// a restart), an injected fault, or a batch that failed within the
    /// last 30 s (a write error; a later batch may succeed, and readiness
    /// does not flap faster than that). Readiness follows it.
    pub fn refusing(&self) -> Option<String> {
        if self.fault.load(Ordering::SeqCst) == AuditFault::Append as u8 {
            return Some("appends fail (injected fault)".into());
        }
        if let Some(reason) = self.store.broken.read().ok().and_then(|b| b.clone()) {
            return Some(format!(
                "appends refused since a failed flush ({reason}); restart the broker"
            ));
        }
        let failed = self.store.last_failure_ms.load(Ordering::Relaxed);
        (failed != 0 && crate::exchange::now_ms() - failed < 30_000)
            .then(|| "an audit batch failed in the last 30 s".to_owned())
    }

    /// The log's size: records covered by the latest signed head.
    pub fn tree_size(&self) -> u64 {
        self.store
            .head
            .read()
            .ok()
            .and_then(|head| head.as_ref().map(|h| h.tree_size))
            .unwrap_or(0)
    }

    /// Flush and batch figures.
    pub fn metrics(&self) -> &crate::metrics::AuditMetrics {
        &self.store.metrics
    }
}

fn poisoned() -> AuditError {
    AuditError::Storage("a thread panicked while holding the signed head".into())
}

fn proof_error(e: ProofError<AuditError>) -> AuditError {
    match e {
        ProofError::OutOfRange(reason) => AuditError::OutOfRange(reason),
        ProofError::Store(e) => e,
    }
}

fn decode_head(bytes: &[u8]) -> Result<SignedTreeHead, AuditError> {
    pb::SignedTreeHead::decode(bytes)
        .map_err(|e| AuditError::Corrupt(format!("signed tree head: {e}")))
        .and_then(|h| head_from_proto(&h))
}

/// Brings the index up to the file and finds where the next frame goes
/// and the last signed head. Cuts off a torn last frame (written while
/// the process died; nobody was answered for it); refuses a file damaged
/// anywhere else.
fn recover(store: &Store, path: &Path) -> Result<(u64, Option<SignedTreeHead>), AuditError> {
    let corrupt = |offset: u64, what: &str| {
        AuditError::Corrupt(format!(
            "{}: byte {offset}: {what}; check it with `onceonly-audit verify-dir`",
            path.display()
        ))
    };
    let file_len = store.file.metadata()?.len();
    let (mut offset, mut next_index, mut head) = (0u64, 0u64, None);
    // Resume after the last indexed frame, where the file still holds it.
    if let Some(entry) = store
        .index
        .range(keys::batch(0)..=keys::batch(u64::MAX))
        .next_back()
    {
        let (key, value) = entry?;
        let place = BatchPlace::decode(&key, &value)?;
        match segment::read_at(&store.file, place.offset, file_len)? {
            segment::Read::Frame {
                frame,
                len,
                checksum_ok: true,
            } if frame.first_index == place.first_index
                && frame.records.len() as u64 == place.count =>
            {
                offset = place.offset + len;
                next_index = place.first_index + place.count;
                head = Some(frame.head);
            }
            _ => {
                // The index is ahead of the file (a log not flushed and a
                // power cut) or belongs to another file: rebuild it.
                tracing::warn!(path = %path.display(), "the audit index does not match the log file; rebuilding it");
                store.index.clear()?;
            }
        }
    }
    loop {
        let (frame, len) = match segment::read_at(&store.file, offset, file_len)? {
            segment::Read::End => break,
            segment::Read::Frame {
                frame,
                len,
                checksum_ok: true,
            } => (frame, len),
            segment::Read::Frame { .. } => {
                return Err(corrupt(offset, "a frame fails its checksum"));
            }
            segment::Read::Malformed { reason } => return Err(corrupt(offset, &reason)),
            segment::Read::Torn { reason } => {
                cut_torn_tail(store, path, offset, &reason)?;
                break;
            }
        };
        if frame.first_index != next_index {
            return Err(corrupt(
                offset,
                &format!(
                    "a frame of records from {} where record {next_index} was due",
                    frame.first_index
                ),
            ));
        }
        let records = frame
            .records
            .iter()
            .enumerate()
            .map(|(n, bytes)| {
                AuditRecord::decode(bytes.as_slice())
                    .map_err(|e| corrupt(offset, &format!("record {}: {e}", next_index + n as u64)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        store
            .index
            .apply_batch(index_batch(next_index, offset, records.iter()))?;
        next_index += records.len() as u64;
        offset += len;
        head = Some(frame.head);
    }
    let head = head.map(|bytes| decode_head(&bytes)).transpose()?;
    if head.as_ref().map_or(0, |h| h.tree_size) != next_index {
        return Err(corrupt(
            offset,
            &format!("{next_index} records but the last signed head says otherwise"),
        ));
    }
    Ok((offset, head))
}

fn cut_torn_tail(store: &Store, path: &Path, offset: u64, reason: &str) -> Result<(), AuditError> {
    tracing::warn!(
        path = %path.display(),
        offset,
        reason,
        "cutting off a torn audit frame: the process died while appending it, before anyone was answered"
    );
    store.file.set_len(offset)?;
    store.file.sync_all()?;
    Ok(())
}

/// The writer thread's state.
struct Writer {
    store: Arc<Store>,
    /// Where the next frame goes.
    end: u64,
    frontier: Frontier,
    key: Ed25519KeyPair,
    durable: bool,
    fault: Arc<AtomicU8>,
    held: Arc<AtomicBool>,
    /// Set after a failed flush: no later append can be trusted to land.
    broken: Option<String>,
    // Buffers reused from batch to batch.
    area: Vec<u8>,
    ends: Vec<usize>,
    nodes: Vec<Hash>,
    frame: Vec<u8>,
}

impl Writer {
    fn run(mut self, mut queue: mpsc::Receiver<Append>) {
        let mut batch: Vec<Append> = Vec::with_capacity(MAX_BATCH);
        while let Some(append) = queue.blocking_recv() {
            while self.held.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            batch.push(append);
            // A key hand-over closes its batch: the head after it is the
            // first signed by the new key.
            while batch.len() < MAX_BATCH && batch.last().is_some_and(|a| a.new_key.is_none()) {
                match queue.try_recv() {
                    Ok(append) => batch.push(append),
                    Err(_) => break,
                }
            }
            let first = self.frontier.size();
            self.store.metrics.batch_records.observe(batch.len() as f64);
            match self.commit(&mut batch) {
                Ok(()) => {
                    self.store.last_failure_ms.store(0, Ordering::Relaxed);
                    for (offset, append) in batch.drain(..).enumerate() {
                        let _ = append.done.send(Ok(first + offset as u64));
                    }
                }
                Err(error) => {
                    self.store
                        .last_failure_ms
                        .store(crate::exchange::now_ms(), Ordering::Relaxed);
                    tracing::error!(%error, records = batch.len(), "audit batch failed; its requests get no evidence");
                    for append in batch.drain(..) {
                        let _ = append.done.send(Err(error.clone()));
                    }
                }
            }
        }
    }

    /// Appends one batch as one frame and (if durable) flushes it, then
    /// indexes it. On error the file is cut back to where it was and the
    /// in-memory tree left as it was.
    fn commit(&mut self, batch: &mut [Append]) -> Result<(), AuditError> {
        let fault = self.fault.load(Ordering::SeqCst);
        if fault == AuditFault::Append as u8 {
            return Err(AuditError::Storage("injected failure".into()));
        }
        if let Some(reason) = &self.broken {
            return Err(AuditError::Storage(format!(
                "appends refused since an earlier failure ({reason}); restart the broker"
            )));
        }
        let first_index = self.frontier.size();
        let mut frontier = self.frontier.clone();
        self.area.clear();
        self.ends.clear();
        self.nodes.clear();
        for append in batch.iter_mut() {
            append.record.log_index = frontier.size();
            // A hand-over (always the last of its batch) is signed by the
            // key in force; the batch's head by the new key.
            if let Some(new_key) = &append.new_key {
                append.record.kind = pb::RecordKind::KeyHandover as i32;
                append.record.key_handover = Some(handover::sign(
                    append.record.log_index,
                    &self.key,
                    new_key.public_key().as_ref(),
                ));
            }
            let start = self.area.len();
            append
                .record
                .encode(&mut self.area)
                .map_err(|e| AuditError::Storage(format!("encoding a record: {e}")))?;
            self.ends.push(self.area.len());
            let completed = frontier.push(leaf_hash(&self.area[start..]));
            self.nodes
                .extend(completed.into_iter().map(|(_, _, hash)| hash));
        }
        let now_ms = u64::try_from(crate::exchange::now_ms()).unwrap_or(0);
        let head_key = batch
            .last()
            .and_then(|append| append.new_key.as_ref())
            .unwrap_or(&self.key);
        let head = SignedTreeHead::sign(head_key, frontier.size(), frontier.root(), now_ms);
        let head_bytes = head_to_proto(&head).encode_to_vec();
        segment::encode(
            &mut self.frame,
            first_index,
            &self.ends,
            &self.area,
            &self.nodes,
            &head_bytes,
        );
        if let Err(e) = self.store.file.write_all_at(&self.frame, self.end) {
            self.cut_back();
            return Err(e.into());
        }
        if self.durable {
            let flushing = std::time::Instant::now();
            if let Err(e) = self.store.file.sync_data() {
                return Err(self.break_down(format!("flushing {}: {e}", segment::FILE_NAME)));
            }
            self.store
                .metrics
                .fsync_seconds
                .observe(flushing.elapsed().as_secs_f64());
            self.store.flushes.fetch_add(1, Ordering::Relaxed);
        }
        let index = index_batch(first_index, self.end, batch.iter().map(|a| &a.record));
        let indexed = if fault == AuditFault::IndexAfterFlush as u8 {
            Err(sled::Error::Unsupported("injected index failure".into()))
        } else {
            self.store.index.apply_batch(index)
        };
        if let Err(e) = indexed {
            return Err(self.break_down(format!("indexing: {e}")));
        }
        self.end += self.frame.len() as u64;
        self.frontier = frontier;
        *self.store.head.write().map_err(|_| poisoned())? = Some(head);
        if let Some(new_key) = batch.last_mut().and_then(|append| append.new_key.take()) {
            self.key = new_key;
            tracing::info!(
                public_key = %hex::encode(self.key.public_key().as_ref()),
                "the audit log is signed by its new key from here on"
            );
        }
        Ok(())
    }

    /// Cuts the file back to its last whole frame, durably where the log is
    /// durable: a frame that was flushed and is then cut back must not
    /// reappear after a crash, since its requests got no evidence.
    fn cut_back(&self) {
        if let Err(e) = self.store.file.set_len(self.end) {
            tracing::error!(error = %e, "cannot cut the audit log back after a failed append");
            return;
        }
        if self.durable {
            match self.store.file.sync_data() {
                Ok(()) => {
                    self.store.flushes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "cannot flush the cut-back audit log: after a crash the failed batch may reappear, holding records of requests that got no evidence"
                ),
            }
        }
    }

    /// After a failed flush or index update: cut back, and refuse every
    /// later append until restarted.
    fn break_down(&mut self, reason: String) -> AuditError {
        self.cut_back();
        tracing::error!(%reason, "the audit log refuses further appends until the broker restarts");
        self.broken = Some(reason.clone());
        if let Ok(mut broken) = self.store.broken.write() {
            *broken = Some(reason.clone());
        }
        AuditError::Storage(reason)
    }
}

/// What [`verify_dir`] found wrong, naming where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Tamper {
    /// The data directory cannot be read as an audit log.
    #[error("the data directory cannot be read: {0}")]
    Unreadable(String),
    /// The latest tree head's signature does not verify.
    #[error("the latest signed tree head is forged or altered: {0}")]
    ForgedHead(String),
    /// The chain of signing keys (hand-overs) does not hold, or never
    /// reaches the trusted key.
    #[error("the audit log's signing keys do not chain to the trusted key: {0}")]
    KeyChain(String),
    /// A record is missing from the sequence.
    #[error("record {index} is missing (removed); the next record present is {next}")]
    Removed {
        /// The missing index.
        index: u64,
        /// The next present.
        next: u64,
    },
    /// A record sits at another position than it was written at.
    #[error("record at position {position} says it is record {claims}: records were reordered")]
    Reordered {
        /// Where it is.
        position: u64,
        /// Which it claims to be.
        claims: u64,
    },
    /// A record's bytes were changed.
    #[error("record {index} was altered: its content no longer matches its leaf hash")]
    Altered {
        /// The record.
        index: u64,
    },
    /// Records at the end are gone.
    #[error(
        "the log was truncated: the signed head covers {signed} records, only {present} are present (records {present}.. removed)"
    )]
    Truncated {
        /// Records the head covers.
        signed: u64,
        /// Records present.
        present: u64,
    },
    /// The records do not hash to the signed root; localized by history.
    #[error(
        "the records do not hash to the signed tree head; the first difference lies in records {from}..{to}"
    )]
    RootMismatch {
        /// First possibly altered record.
        from: u64,
        /// End of the range.
        to: u64,
    },
    /// Tree nodes stored with a batch do not match its records: proofs
    /// served from them would be wrong.
    #[error("the tree nodes stored with records {from}..{to} do not match the records")]
    TreeNodes {
        /// First record of the batch.
        from: u64,
        /// End of the batch.
        to: u64,
    },
    /// A frame's bytes fail their checksum though its records and head
    /// verify: the file was damaged or edited.
    #[error("the frame at byte {offset} fails its checksum: the file was damaged or edited")]
    Damaged {
        /// Where the frame starts.
        offset: u64,
    },
    /// The log does not extend a head saved earlier: history was rewritten.
    #[error(
        "the log does not extend the head saved at {size} records: its first {size} records hash to another root"
    )]
    NotExtending {
        /// The saved head's size.
        size: u64,
    },
}

/// What a clean [`verify_dir`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedLog {
    /// Records checked.
    pub records: u64,
    /// The verified head.
    pub head: Option<SignedTreeHead>,
}

/// Checks a (copied) data directory end to end with the audit public key
/// (raw 32 bytes) and nothing else: every batch's signed head, every
/// record's place and content, the stored tree nodes, and that the records
/// hash to each signed root. Names the first record that was altered,
/// removed or reordered. A torn last frame (a crash during an append) is
/// not counted: nobody was answered for it.
pub fn verify_dir(data_dir: &Path, public_key: &[u8]) -> Result<VerifiedLog, Tamper> {
    verify_dir_against(data_dir, public_key, None)
}

/// [`verify_dir`], and that the log still holds the records of `saved`, a
/// head the auditor kept from an earlier check: a log cut back by whole
/// batches, or rewritten and re-signed, is only found this way.
pub fn verify_dir_against(
    data_dir: &Path,
    public_key: &[u8],
    saved: Option<&SignedTreeHead>,
) -> Result<VerifiedLog, Tamper> {
    let path = data_dir.join(segment::FILE_NAME);
    let unreadable =
        |e: &dyn std::fmt::Display| Tamper::Unreadable(format!("{}: {e}", path.display()));
    let file = File::open(&path).map_err(|e| unreadable(&e))?;
    let file_len = file.metadata().map_err(|e| unreadable(&e))?.len();
    let frames = |visit: &mut dyn FnMut(u64, segment::Frame, bool) -> Result<(), Tamper>| {
        let mut offset = 0;
        loop {
            match segment::read_at(&file, offset, file_len).map_err(|e| unreadable(&e))? {
                segment::Read::End | segment::Read::Torn { .. } => return Ok(()),
                segment::Read::Malformed { reason } => {
                    return Err(unreadable(&format!("byte {offset}: {reason}")));
                }
                segment::Read::Frame {
                    frame,
                    len,
                    checksum_ok,
                } => {
                    visit(offset, frame, checksum_ok)?;
                    offset += len;
                }
            }
        }
    };

    // First pass: which positions some record elsewhere claims, to tell a
    // removed record from a moved one. (Three reads of the file keep the
    // memory flat however long the log; verification is not a hot path.)
    // It also gathers the key hand-overs, to know which key signed what.
    let mut claimed_elsewhere = std::collections::HashSet::new();
    let mut handovers = Vec::new();
    let mut position = 0u64;
    let mut frame_count = 0usize;
    frames(&mut |_, frame, _| {
        frame_count += 1;
        for bytes in &frame.records {
            if let Ok(record) = AuditRecord::decode(bytes.as_slice()) {
                if record.log_index != position {
                    claimed_elsewhere.insert(record.log_index);
                }
                if let Some(handover) = record.key_handover {
                    handovers.push((position, handover));
                }
            }
            position += 1;
        }
        Ok(())
    })?;
    let chain = handover::KeyChain::build(public_key, &handovers)
        .map_err(|e| Tamper::KeyChain(e.to_string()))?;
    if let Some(saved) = saved {
        saved
            .verify(chain.key_for(saved.tree_size))
            .map_err(|e| Tamper::Unreadable(format!("the saved head does not verify: {e}")))?;
    }

    // Second pass: every record where it says it belongs.
    let mut position = 0u64;
    frames(&mut |_, frame, _| {
        for bytes in &frame.records {
            let record = AuditRecord::decode(bytes.as_slice())
                .map_err(|_| Tamper::Altered { index: position })?;
            if record.log_index != position {
                return Err(
                    if record.log_index > position && !claimed_elsewhere.contains(&position) {
                        Tamper::Removed {
                            index: position,
                            next: record.log_index,
                        }
                    } else {
                        Tamper::Reordered {
                            position,
                            claims: record.log_index,
                        }
                    },
                );
            }
            position += 1;
        }
        Ok(())
    })?;

    // Third pass: leaves, stored tree nodes and signed heads.
    let mut frontier = Frontier::new();
    let mut last_good = 0u64;
    let mut last_head: Option<SignedTreeHead> = None;
    let mut saved_checked = saved.is_none_or(|s| s.tree_size == 0);
    let mut frames_seen = 0usize;
    frames(&mut |offset, frame, checksum_ok| {
        frames_seen += 1;
        let is_last = frames_seen == frame_count;
        let from = frontier.size();
        let mut nodes = frame.nodes.iter();
        for bytes in &frame.records {
            let position = frontier.size();
            for (level, _, hash) in frontier.push(leaf_hash(bytes)) {
                if nodes.next() != Some(&hash) {
                    return Err(if level == 0 {
                        Tamper::Altered { index: position }
                    } else {
                        Tamper::TreeNodes {
                            from,
                            to: from + frame.records.len() as u64,
                        }
                    });
                }
            }
            if let Some(saved) = saved
                && saved.tree_size == frontier.size()
            {
                if saved.root_hash != frontier.root() {
                    return Err(Tamper::NotExtending {
                        size: saved.tree_size,
                    });
                }
                saved_checked = true;
            }
        }
        let present = frontier.size();
        if nodes.next().is_some() {
            return Err(Tamper::TreeNodes { from, to: present });
        }
        let head = decode_head(&frame.head).map_err(|e| {
            Tamper::ForgedHead(format!("the head of records {from}..{present}: {e}"))
        })?;
        head.verify(chain.key_for(present)).map_err(|e| {
            Tamper::ForgedHead(format!("the head of records {from}..{present}: {e}"))
        })?;
        if head.tree_size > present && is_last {
            return Err(Tamper::Truncated {
                signed: head.tree_size,
                present,
            });
        }
        if head.tree_size != present || head.root_hash != frontier.root() {
            return Err(Tamper::RootMismatch {
                from: last_good,
                to: present.max(head.tree_size),
            });
        }
        if !checksum_ok {
            return Err(Tamper::Damaged { offset });
        }
        last_good = present;
        last_head = Some(head);
        Ok(())
    })?;
    if let Some(saved) = saved
        && !saved_checked
    {
        return Err(Tamper::Truncated {
            signed: saved.tree_size,
            present: frontier.size(),
        });
    }
    Ok(VerifiedLog {
        records: frontier.size(),
        head: last_head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(caller: &str) -> AuditRecord {
        AuditRecord {
            caller_id: caller.into(),
            evidence_type: "birth-certificate".into(),
            outcome: ExchangeOutcome::Delivered as i32,
            ..Default::default()
        }
    }

    fn key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
    }

    #[tokio::test]
    async fn concurrent_appends_get_distinct_indexes_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
        let public = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .expect("key")
            .public_key()
            .as_ref()
            .to_vec();
        {
            let db = sled::open(dir.path()).expect("db");
            let (log, writer) = AuditLog::open(
                dir.path(),
                &db,
                true,
                Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key"),
            )
            .expect("log");
            let mut tasks = Vec::new();
            for n in 0..64 {
                let log = log.clone();
                tasks.push(tokio::spawn(async move {
                    log.append(record(&format!("c{n}"))).await
                }));
            }
            let mut indexes = Vec::new();
            for task in tasks {
                indexes.push(task.await.expect("task").expect("append"));
            }
            indexes.sort_unstable();
            assert_eq!(indexes, (0..64).collect::<Vec<u64>>());
            let head = log.signed_tree_head().expect("head").expect("some");
            assert_eq!(head.tree_size, 64);
            head.verify(&public).expect("signed");
            let proof = log.inclusion_proof(7, 64).expect("proof");
            onceonly_merkle::verify_inclusion(
                &log.leaf_hash(7).expect("leaf"),
                7,
                64,
                &proof,
                &head.root_hash,
            )
            .expect("included");
            drop(log);
            drop(db);
            writer.await.expect("writer ends once the log is dropped");
        }
        assert_eq!(
            verify_dir(dir.path(), &public).expect("verifies").records,
            64
        );
        let db = open_storage(sled::Config::new().path(dir.path())).expect("reopen");
        let (log, _writer) = AuditLog::open(
            dir.path(),
            &db,
            true,
            Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key"),
        )
        .expect("log");
        assert_eq!(log.len(), 64);
        let old_root = log
            .signed_tree_head()
            .expect("head")
            .expect("some")
            .root_hash;
        assert_eq!(log.append(record("after")).await.expect("append"), 64);
        let head = log.signed_tree_head().expect("head").expect("some");
        let proof = log.consistency_proof(64, 65).expect("proof");
        onceonly_merkle::verify_consistency(64, 65, &old_root, &head.root_hash, &proof)
            .expect("extends");
        let (found, next) = log
            .query(
                &AuditFilter {
                    caller_id: Some("c7".into()),
                    ..Default::default()
                },
                0,
                10,
            )
            .expect("query");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].log_index, 7);
        assert_eq!(next, None);
    }

    #[tokio::test]
    async fn injected_failure_fails_the_append_and_leaves_no_trace() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let (log, _writer) = AuditLog::open(dir.path(), &db, true, key()).expect("log");
        log.inject_failure(true);
        assert!(log.append(record("x")).await.is_err());
        log.inject_failure(false);
        assert_eq!(log.append(record("y")).await.expect("append"), 0);
        assert_eq!(log.len(), 1);
    }

    #[tokio::test]
    async fn a_flushed_batch_whose_indexing_fails_is_cut_back_durably() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let path = dir.path().join(segment::FILE_NAME);
        let (log, _writer) = AuditLog::open(dir.path(), &db, true, key()).expect("log");
        assert_eq!(log.append(record("kept")).await.expect("append"), 0);
        let length = std::fs::metadata(&path).expect("file").len();
        let flushes = log.flushes();

        log.inject(AuditFault::IndexAfterFlush);
        assert!(log.append(record("lost")).await.is_err());
        log.inject(AuditFault::None);
        assert_eq!(std::fs::metadata(&path).expect("file").len(), length);
        assert_eq!(
            log.flushes(),
            flushes + 2,
            "the frame's flush and the cut-back's flush"
        );
        assert!(
            log.append(record("after")).await.is_err(),
            "appends are refused until restart"
        );
        assert_eq!(log.len(), 1);
    }

    #[tokio::test]
    async fn queries_use_indexes_and_page() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let (log, _writer) = AuditLog::open(dir.path(), &db, false, key()).expect("log");
        for n in 0..30u64 {
            let mut r = record(if n % 3 == 0 { "a" } else { "b" });
            r.subject_pseudonym = vec![(n % 5) as u8; 32];
            log.append(r).await.expect("append");
        }
        let filter = AuditFilter {
            caller_id: Some("a".into()),
            ..Default::default()
        };
        let (page, next) = log.query(&filter, 0, 4).expect("query");
        assert_eq!(
            page.iter().map(|r| r.log_index).collect::<Vec<_>>(),
            [0, 3, 6, 9]
        );
        let (rest, end) = log.query(&filter, next.expect("more"), 100).expect("query");
        assert_eq!(
            rest.iter().map(|r| r.log_index).collect::<Vec<_>>(),
            [12, 15, 18, 21, 24, 27]
        );
        assert_eq!(end, None);
        let both = AuditFilter {
            caller_id: Some("a".into()),
            subject_pseudonym: Some(vec![0; 32]),
            ..Default::default()
        };
        let (found, _) = log.query(&both, 0, 100).expect("query");
        assert_eq!(
            found.iter().map(|r| r.log_index).collect::<Vec<_>>(),
            [0, 15]
        );
    }
}
