//! The audit log: one record per exchange, in an append-only Merkle log in
//! the manner of Certificate Transparency (RFC 9162), durable before the
//! caller is answered.
//!
//! Appends go through one writer task that batches whatever is waiting
//! (group commit). For a batch it assigns log indexes, hashes the records
//! into the tree ([`onceonly_merkle::Frontier`]), signs the new tree head
//! with the broker's audit key, and writes records, tree nodes, index
//! entries and the signed head as ONE atomic sled batch, flushed with one
//! fsync; only then is every request in the batch answered. A crash leaves
//! either the whole batch or none of it: the log always reopens at its last
//! signed head. A batch that fails fails every request in it, and those
//! callers get no evidence.
//!
//! Records hold the payload digest, never the payload, and the subject only
//! as a keyed pseudonym. [`verify_dir`] checks a copied data directory end
//! to end with nothing but the public key.
//!
//! Storage layout, one sled tree `audit` (see [`keys`]).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use onceonly_merkle::sth::SignedTreeHead;
use onceonly_merkle::{Frontier, Hash, ProofError, Subtrees, leaf_hash};
use onceonly_proto::v1::{self as pb, AuditRecord, ExchangeOutcome};
use prost::Message;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tokio::sync::{mpsc, oneshot};

/// The most records one batch takes.
const MAX_BATCH: usize = 4096;

/// The key layout of the `audit` tree.
pub mod keys {
    /// `r` + index (u64 BE) -> the record's canonical protobuf bytes (the leaf data).
    pub const RECORD: u8 = b'r';
    /// `n` + level (u8) + index (u64 BE) -> perfect subtree hash (level 0: leaf hash).
    pub const NODE: u8 = b'n';
    /// `h` -> the latest signed tree head (protobuf `SignedTreeHead`).
    pub const HEAD: &[u8] = b"h";
    /// `s` + tree size (u64 BE) -> the signed tree head at that size (history).
    pub const HISTORY: u8 = b's';
    /// `x` + field (u8) + value length (u16 BE) + value + index (u64 BE) -> empty.
    pub const INDEX: u8 = b'x';

    /// The key of record `index`.
    pub fn record(index: u64) -> Vec<u8> {
        let mut key = vec![RECORD];
        key.extend_from_slice(&index.to_be_bytes());
        key
    }

    /// The key of a perfect subtree.
    pub fn node(level: u32, index: u64) -> Vec<u8> {
        let mut key = vec![NODE, level as u8];
        key.extend_from_slice(&index.to_be_bytes());
        key
    }

    /// The key of a historical head.
    pub fn history(size: u64) -> Vec<u8> {
        let mut key = vec![HISTORY];
        key.extend_from_slice(&size.to_be_bytes());
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

fn index_entries(record: &AuditRecord) -> Vec<(Field, Vec<u8>)> {
    let mut entries = vec![
        (Field::Caller, record.caller_id.as_bytes().to_vec()),
        (
            Field::EvidenceType,
            record.evidence_type.as_bytes().to_vec(),
        ),
        (Field::Outcome, record.outcome.to_be_bytes().to_vec()),
    ];
    if !record.subject_pseudonym.is_empty() {
        entries.push((Field::Subject, record.subject_pseudonym.clone()));
    }
    if !record.connector_id.is_empty() {
        entries.push((Field::Connector, record.connector_id.as_bytes().to_vec()));
    }
    entries
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
}

impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> Self {
        AuditError::Storage(e.to_string())
    }
}

struct Append {
    record: AuditRecord,
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

/// Perfect subtrees stored in the `audit` tree.
struct StoredSubtrees<'a>(&'a sled::Tree);

impl Subtrees for StoredSubtrees<'_> {
    type Error = AuditError;

    fn perfect(&self, level: u32, index: u64) -> Result<Hash, AuditError> {
        let bytes = self
            .0
            .get(keys::node(level, index))?
            .ok_or_else(|| AuditError::Corrupt(format!("tree node {level}/{index} missing")))?;
        bytes
            .as_ref()
            .try_into()
            .map_err(|_| AuditError::Corrupt(format!("tree node {level}/{index} is not 32 bytes")))
    }
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

/// The broker's audit signing key: Ed25519, PKCS#8 in a file kept apart
/// from the data directory; created (mode 0600) where missing, with the
/// public key beside it (`<file>.pub`, hex) for auditors.
pub fn load_or_create_signing_key(path: &Path) -> std::io::Result<Ed25519KeyPair> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let pkcs8 = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .map_err(|_| invalid("cannot generate an Ed25519 key".into()))?;
            onceonly_certs::pki::write_secret_file(path, pkcs8.as_ref())
                .map_err(std::io::Error::other)?;
            pkcs8.as_ref().to_vec()
        }
        Err(e) => return Err(e),
    };
    let key = Ed25519KeyPair::from_pkcs8(&pkcs8)
        .map_err(|_| invalid(format!("{}: not an Ed25519 PKCS#8 key", path.display())))?;
    let public_path = public_key_path(path);
    let public_hex = hex::encode(key.public_key().as_ref());
    if std::fs::read_to_string(&public_path)
        .map(|s| s.trim().to_owned())
        .ok()
        != Some(public_hex.clone())
    {
        std::fs::write(&public_path, format!("{public_hex}\n"))?;
    }
    Ok(key)
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
    tree: sled::Tree,
    appends: mpsc::Sender<Append>,
    /// Fault injection for fail-closed drills: while set, appends fail.
    fault: Arc<AtomicBool>,
}

impl AuditLog {
    /// Opens the log in `db` and starts its writer, which signs tree heads
    /// with `key`. `durable`: flush every batch to disk before answering.
    /// The writer ends (after its last flush) once every handle to the log
    /// is dropped; the returned task completes then.
    pub fn open(
        db: &sled::Db,
        durable: bool,
        key: Ed25519KeyPair,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), AuditError> {
        let tree = db.open_tree("audit")?;
        let size = match read_head(&tree)? {
            Some(head) => head.tree_size,
            None => 0,
        };
        let records = count_records(&tree)?;
        if records != size {
            return Err(AuditError::Corrupt(format!(
                "{records} records but the last signed head covers {size}; check it with `onceonly-audit verify-dir`"
            )));
        }
        let frontier = Frontier::from_store(&StoredSubtrees(&tree), size)?;
        let (appends, queue) = mpsc::channel(MAX_BATCH * 4);
        let fault = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            db: db.clone(),
            tree: tree.clone(),
            frontier,
            key,
            durable,
            fault: fault.clone(),
        };
        let task = tokio::spawn(writer.run(queue));
        Ok((
            AuditLog {
                tree,
                appends,
                fault,
            },
            task,
        ))
    }

    /// Appends `record` and returns its index once it is durable and
    /// covered by a signed tree head.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let (done, result) = oneshot::channel();
        self.appends
            .send(Append { record, done })
            .await
            .map_err(|_| AuditError::WriterStopped)?;
        result.await.map_err(|_| AuditError::WriterStopped)?
    }

    /// The latest signed tree head (None for an empty log).
    pub fn signed_tree_head(&self) -> Result<Option<SignedTreeHead>, AuditError> {
        read_head(&self.tree)
    }

    /// The number of records (the latest head's size).
    pub fn len(&self) -> u64 {
        self.signed_tree_head()
            .ok()
            .flatten()
            .map_or(0, |h| h.tree_size)
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record at `index` and its exact leaf bytes.
    pub fn entry(&self, index: u64) -> Result<Option<(AuditRecord, Vec<u8>)>, AuditError> {
        let Some(bytes) = self.tree.get(keys::record(index))? else {
            return Ok(None);
        };
        let record = AuditRecord::decode(bytes.as_ref())
            .map_err(|e| AuditError::Corrupt(format!("record {index}: {e}")))?;
        Ok(Some((record, bytes.to_vec())))
    }

    /// The record at `index`.
    pub fn get(&self, index: u64) -> Result<Option<AuditRecord>, AuditError> {
        Ok(self.entry(index)?.map(|(record, _)| record))
    }

    /// The leaf hash of record `index`.
    pub fn leaf_hash(&self, index: u64) -> Result<Hash, AuditError> {
        StoredSubtrees(&self.tree).perfect(0, index)
    }

    /// The inclusion proof of leaf `index` in the tree of `size` leaves.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, AuditError> {
        self.check_size(size)?;
        onceonly_merkle::inclusion_proof(&StoredSubtrees(&self.tree), index, size)
            .map_err(proof_error)
    }

    /// The consistency proof between two tree sizes.
    pub fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, AuditError> {
        self.check_size(second)?;
        onceonly_merkle::consistency_proof(&StoredSubtrees(&self.tree), first, second)
            .map_err(proof_error)
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
    /// selective index of the filter; scans only without one.
    pub fn query(
        &self,
        filter: &AuditFilter,
        start: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), AuditError> {
        let mut found = Vec::new();
        let consider =
            |index: u64, found: &mut Vec<AuditRecord>| -> Result<Option<u64>, AuditError> {
                if found.len() == limit {
                    return Ok(Some(index));
                }
                if let Some(record) = self.get(index)?
                    && filter.matches(&record)
                {
                    found.push(record);
                }
                Ok(None)
            };
        match filter.index() {
            Some(prefix) => {
                let mut from = prefix.clone();
                from.extend_from_slice(&start.to_be_bytes());
                for entry in self.tree.range(from..) {
                    let (key, _) = entry?;
                    if !key.starts_with(&prefix) || key.len() != prefix.len() + 8 {
                        break;
                    }
                    let index =
                        u64::from_be_bytes(key[prefix.len()..].try_into().unwrap_or_default());
                    if let Some(next) = consider(index, &mut found)? {
                        return Ok((found, Some(next)));
                    }
                }
            }
            None => {
                for entry in self.tree.range(keys::record(start)..keys::record(u64::MAX)) {
                    let (key, _) = entry?;
                    let index = u64::from_be_bytes(key[1..].try_into().unwrap_or_default());
                    if let Some(next) = consider(index, &mut found)? {
                        return Ok((found, Some(next)));
                    }
                }
            }
        }
        Ok((found, None))
    }

    /// Makes every append fail while `failing` (fail-closed drills and
    /// tests: the broker must then release no evidence).
    pub fn inject_failure(&self, failing: bool) {
        self.fault.store(failing, Ordering::SeqCst);
    }
}

fn proof_error(e: ProofError<AuditError>) -> AuditError {
    match e {
        ProofError::OutOfRange(reason) => AuditError::OutOfRange(reason),
        ProofError::Store(e) => e,
    }
}

fn read_head(tree: &sled::Tree) -> Result<Option<SignedTreeHead>, AuditError> {
    tree.get(keys::HEAD)?
        .map(|bytes| {
            pb::SignedTreeHead::decode(bytes.as_ref())
                .map_err(|e| AuditError::Corrupt(format!("signed tree head: {e}")))
                .and_then(|h| head_from_proto(&h))
        })
        .transpose()
}

fn count_records(tree: &sled::Tree) -> Result<u64, AuditError> {
    Ok(
        match tree
            .range(keys::record(0)..keys::record(u64::MAX))
            .next_back()
        {
            Some(entry) => {
                let (key, _) = entry?;
                u64::from_be_bytes(key[1..].try_into().unwrap_or_default()) + 1
            }
            None => 0,
        },
    )
}

/// The writer task's state.
struct Writer {
    db: sled::Db,
    tree: sled::Tree,
    frontier: Frontier,
    key: Ed25519KeyPair,
    durable: bool,
    fault: Arc<AtomicBool>,
}

impl Writer {
    async fn run(mut self, mut queue: mpsc::Receiver<Append>) {
        let mut batch: Vec<Append> = Vec::with_capacity(MAX_BATCH);
        while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let first = self.frontier.size();
            match self.commit(&mut batch).await {
                Ok(()) => {
                    for (offset, append) in batch.drain(..).enumerate() {
                        let _ = append.done.send(Ok(first + offset as u64));
                    }
                }
                Err(error) => {
                    tracing::error!(%error, records = batch.len(), "audit batch failed; its requests get no evidence");
                    for append in batch.drain(..) {
                        let _ = append.done.send(Err(error.clone()));
                    }
                }
            }
        }
    }

    /// Writes one batch atomically and (if durable) flushes it. On error
    /// the in-memory tree is left as it was, so the next batch reuses the
    /// indexes.
    async fn commit(&mut self, batch: &mut [Append]) -> Result<(), AuditError> {
        if self.fault.load(Ordering::SeqCst) {
            return Err(AuditError::Storage("injected failure".into()));
        }
        let mut frontier = self.frontier.clone();
        let mut write = sled::Batch::default();
        for append in batch.iter_mut() {
            let index = frontier.size();
            append.record.log_index = index;
            let leaf = append.record.encode_to_vec();
            for (level, node_index, hash) in frontier.push(leaf_hash(&leaf)) {
                write.insert(keys::node(level, node_index), hash.to_vec());
            }
            for (field, value) in index_entries(&append.record) {
                let mut key = keys::index_prefix(field as u8, &value);
                key.extend_from_slice(&index.to_be_bytes());
                write.insert(key, Vec::<u8>::new());
            }
            write.insert(keys::record(index), leaf);
        }
        let now_ms = u64::try_from(crate::exchange::now_ms()).unwrap_or(0);
        let head = SignedTreeHead::sign(&self.key, frontier.size(), frontier.root(), now_ms);
        let encoded = head_to_proto(&head).encode_to_vec();
        write.insert(keys::history(head.tree_size), encoded.clone());
        write.insert(keys::HEAD, encoded);
        self.tree.apply_batch(write)?;
        if self.durable {
            let db = self.db.clone();
            tokio::task::spawn_blocking(move || db.flush())
                .await
                .map_err(|e| AuditError::Storage(format!("flush task: {e}")))?
                .map_err(|e| AuditError::Storage(format!("flush: {e}")))?;
        }
        self.frontier = frontier;
        Ok(())
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
/// (raw 32 bytes): the head's signature, every record's place and content,
/// and that the records hash to the signed root. Names the first record
/// that was altered, removed or reordered.
pub fn verify_dir(data_dir: &Path, public_key: &[u8]) -> Result<VerifiedLog, Tamper> {
    let unreadable = |e: &dyn std::fmt::Display| Tamper::Unreadable(e.to_string());
    // Through `open_storage`: the process that last held the directory may
    // still be releasing sled's lock (its flusher thread outlives the Db).
    let db = open_storage(sled::Config::new().path(data_dir)).map_err(|e| unreadable(&e))?;
    let tree = db.open_tree("audit").map_err(|e| unreadable(&e))?;
    let Some(head) = read_head(&tree).map_err(|e| unreadable(&e))? else {
        return Ok(VerifiedLog {
            records: 0,
            head: None,
        });
    };
    head.verify(public_key)
        .map_err(|e| Tamper::ForgedHead(e.to_string()))?;

    // Signed heads of earlier sizes whose signatures verify, for localizing.
    let mut history: Vec<SignedTreeHead> = Vec::new();
    for entry in tree.scan_prefix([keys::HISTORY]) {
        let (_, bytes) = entry.map_err(|e| unreadable(&e))?;
        if let Ok(h) = pb::SignedTreeHead::decode(bytes.as_ref())
            .map_err(|e| AuditError::Corrupt(e.to_string()))
            .and_then(|h| head_from_proto(&h))
            && h.verify(public_key).is_ok()
            && h.tree_size <= head.tree_size
        {
            history.push(h);
        }
    }
    history.sort_by_key(|h| h.tree_size);
    let mut history = history.into_iter().peekable();
    let mut last_good = 0u64;

    let mut frontier = Frontier::new();
    let stored = StoredSubtrees(&tree);
    for entry in tree.range(keys::record(0)..keys::record(u64::MAX)) {
        let (key, bytes) = entry.map_err(|e| unreadable(&e))?;
        let position = u64::from_be_bytes(
            key[1..]
                .try_into()
                .map_err(|_| unreadable(&"bad record key"))?,
        );
        let expected = frontier.size();
        if position != expected {
            return Err(Tamper::Removed {
                index: expected,
                next: position,
            });
        }
        let record =
            AuditRecord::decode(bytes.as_ref()).map_err(|_| Tamper::Altered { index: position })?;
        if record.log_index != position {
            return Err(Tamper::Reordered {
                position,
                claims: record.log_index,
            });
        }
        let leaf = leaf_hash(&bytes);
        if stored.perfect(0, position).ok() != Some(leaf) {
            return Err(Tamper::Altered { index: position });
        }
        frontier.push(leaf);
        while let Some(h) = history.peek() {
            if h.tree_size > frontier.size() {
                break;
            }
            if h.tree_size == frontier.size() {
                if h.root_hash != frontier.root() {
                    return Err(Tamper::RootMismatch {
                        from: last_good,
                        to: h.tree_size,
                    });
                }
                last_good = h.tree_size;
            }
            history.next();
        }
    }
    let present = frontier.size();
    if present < head.tree_size {
        return Err(Tamper::Truncated {
            signed: head.tree_size,
            present,
        });
    }
    if present > head.tree_size || frontier.root() != head.root_hash {
        return Err(Tamper::RootMismatch {
            from: last_good,
            to: present.max(head.tree_size),
        });
    }
    Ok(VerifiedLog {
        records: present,
        head: Some(head),
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
        let (log, _writer) = AuditLog::open(&db, true, key()).expect("log");
        log.inject_failure(true);
        assert!(log.append(record("x")).await.is_err());
        log.inject_failure(false);
        assert_eq!(log.append(record("y")).await.expect("append"), 0);
        assert_eq!(log.len(), 1);
    }

    #[tokio::test]
    async fn queries_use_indexes_and_page() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let (log, _writer) = AuditLog::open(&db, false, key()).expect("log");
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
