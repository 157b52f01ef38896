//! The audit log the broker runs: opening (and recovering) it, appending
//! through the [`crate::writer`], reading records, proofs and queries.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use onceonly_merkle::sth::SignedTreeHead;
use onceonly_merkle::{Frontier, Hash, ProofError, Subtrees};
use onceonly_proto::time::now_ms;
use onceonly_proto::v1::AuditRecord;
use prost::Message;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tokio::sync::{mpsc, oneshot};

pub use crate::fault::AuditFault;
use crate::fault::poisoned;
use crate::head::decode_head;
use crate::index::{AuditFilter, index_frames, keys};
use crate::metrics::AuditMetrics;
use crate::store::{BatchPlace, INDEX_TREE, Store};
use crate::writer::{Append, MAX_BATCH, Writer};
use crate::{AuditError, segment};

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
            metrics: AuditMetrics::default(),
            recent: RwLock::new(std::collections::VecDeque::new()),
            indexed_end: AtomicU64::new(0),
        };
        let (end, head) = recover(&store, &path)?;
        // Opening indexed every frame in the file.
        store
            .indexed_end
            .store(head.as_ref().map_or(0, |h| h.tree_size), Ordering::Release);
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
        let (indexer, indexer_thread) = crate::indexer::spawn(store.clone(), fault.clone())
            .map_err(|e| AuditError::Storage(format!("starting the audit indexer: {e}")))?;
        let writer = Writer {
            store: store.clone(),
            end,
            frontier,
            key,
            durable,
            fault: fault.clone(),
            held: held.clone(),
            area: Vec::new(),
            ends: Vec::new(),
            nodes: Vec::new(),
            frame: Vec::new(),
            indexer: Some(indexer),
            indexer_thread: Some(indexer_thread),
            reserved_to: store.file.metadata()?.len(),
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
    /// selective index of the filter for what is indexed, and scans the
    /// frames of the rest: all of them without an index, the few the
    /// indexer has not taken yet with one.
    pub fn query(
        &self,
        filter: &AuditFilter,
        start: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), AuditError> {
        let size = self.len();
        let mut found = Vec::new();
        let scan_from = match filter.index() {
            None => start,
            Some(prefix) => {
                // Below `indexed` the index lists every match; a frame
                // indexed while this query runs is scanned, not listed too.
                let indexed = self.store.indexed_end.load(Ordering::Acquire).min(size);
                let mut from = prefix.clone();
                from.extend_from_slice(&start.to_be_bytes());
                // The group entry before `start` may list records after it.
                let before = self
                    .store
                    .index
                    .range(prefix.clone()..from.clone())
                    .next_back();
                'listed: for entry in before.into_iter().chain(self.store.index.range(from..)) {
                    let (key, list) = entry?;
                    if !key.starts_with(&prefix) || key.len() != prefix.len() + 8 {
                        break;
                    }
                    // Groups and their lists ascend: the indexes do too.
                    for bytes in list.chunks_exact(8) {
                        let index = u64::from_be_bytes(bytes.try_into().unwrap_or_default());
                        if index >= indexed {
                            break 'listed;
                        }
                        if index < start {
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
                start.max(indexed)
            }
        };
        let file_len = self.store.file.metadata()?.len();
        for place in self.store.batches_between(scan_from, size) {
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
                if index < scan_from {
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
        (failed != 0 && now_ms() - failed < 30_000)
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
    pub fn metrics(&self) -> &AuditMetrics {
        &self.store.metrics
    }
}

fn proof_error(e: ProofError<AuditError>) -> AuditError {
    match e {
        ProofError::OutOfRange(reason) => AuditError::OutOfRange(reason),
        ProofError::Store(e) => e,
    }
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
    // What this opening did, for the operator (after a restore above all).
    let mut index_rebuilt = false;
    let mut torn_tail_cut_bytes = 0u64;
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
                index_rebuilt = true;
            }
        }
    }
    let indexed_from = next_index;
    let mut frames_indexed = 0u64;
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
                torn_tail_cut_bytes = file_len - offset;
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
        store.index.apply_batch(index_frames([(
            BatchPlace {
                first_index: next_index,
                offset,
                count: records.len() as u64,
            },
            &records[..],
        )]))?;
        next_index += records.len() as u64;
        offset += len;
        head = Some(frame.head);
        frames_indexed += 1;
    }
    let head = head.map(|bytes| decode_head(&bytes)).transpose()?;
    if head.as_ref().map_or(0, |h| h.tree_size) != next_index {
        return Err(corrupt(
            offset,
            &format!("{next_index} records but the last signed head says otherwise"),
        ));
    }
    // One line that says what the opening found and did: after a restore
    // the operator sees how many records the log holds, whether the index
    // was rebuilt (and from which record), and what a crash left behind.
    tracing::info!(
        path = %path.display(),
        records = next_index,
        bytes = offset,
        index_rebuilt,
        indexes_rebuilt_from = (frames_indexed > 0).then_some(indexed_from),
        frames_indexed,
        torn_tail_cut_bytes,
        "audit log opened"
    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{open_storage, verify_dir};
    use onceonly_proto::v1::ExchangeOutcome;

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
    async fn a_batch_whose_indexing_fails_stays_readable_and_stops_appends_until_reopened() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
        let key = || Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let (log, writer) = AuditLog::open(dir.path(), &db, true, key()).expect("log");
        assert_eq!(log.append(record("kept")).await.expect("append"), 0);

        log.inject(AuditFault::IndexAfterFlush);
        // Durable and signed before the index is touched: it is answered.
        assert_eq!(log.append(record("answered")).await.expect("append"), 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.refusing().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the failed index never stopped the log"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        log.inject(AuditFault::None);
        assert!(
            log.refusing().is_some_and(|why| why.contains("indexing")),
            "{:?}",
            log.refusing()
        );
        assert!(
            log.append(record("after")).await.is_err(),
            "appends are refused until restart"
        );
        // What was answered is still read, proved and found.
        assert_eq!(log.len(), 2);
        assert_eq!(
            log.get(1).expect("get").expect("record").caller_id,
            "answered"
        );
        log.inclusion_proof(1, 2).expect("proof");
        let answered = AuditFilter {
            caller_id: Some("answered".into()),
            ..Default::default()
        };
        assert_eq!(log.query(&answered, 0, 10).expect("query").0.len(), 1);
        drop(log);
        writer.await.expect("writer");

        // Reopening indexes it, and appends work again.
        let (log, _writer) = AuditLog::open(dir.path(), &db, true, key()).expect("reopen");
        assert_eq!(log.len(), 2);
        assert_eq!(log.query(&answered, 0, 10).expect("query").0.len(), 1);
        assert_eq!(log.append(record("later")).await.expect("append"), 2);
    }

    #[tokio::test]
    async fn queries_across_indexed_and_not_yet_indexed_records_miss_and_repeat_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let (log, _writer) = AuditLog::open(dir.path(), &db, false, key()).expect("log");
        let make = |n: u64| {
            let mut r = record(if n.is_multiple_of(3) { "a" } else { "b" });
            r.subject_pseudonym = vec![(n % 5) as u8; 32];
            r
        };
        for n in 0..40 {
            log.append(make(n)).await.expect("append");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.store.indexed_end.load(Ordering::Acquire) < 40 {
            assert!(std::time::Instant::now() < deadline, "never indexed");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // These are queried before the indexer takes them.
        for n in 40..80 {
            log.append(make(n)).await.expect("append");
        }
        let filters = [
            AuditFilter {
                caller_id: Some("a".into()),
                ..Default::default()
            },
            AuditFilter {
                subject_pseudonym: Some(vec![2; 32]),
                ..Default::default()
            },
            // No index: a scan of every frame.
            AuditFilter {
                received_before: Some(1),
                ..Default::default()
            },
        ];
        for filter in &filters {
            let expected: Vec<u64> = (0..80)
                .filter(|&n| {
                    let mut r = make(n);
                    r.log_index = n;
                    filter.matches(&r)
                })
                .collect();
            let mut seen = Vec::new();
            let mut from = Some(0);
            while let Some(start) = from {
                let (page, next) = log.query(filter, start, 3).expect("query");
                assert!(page.len() <= 3);
                seen.extend(page.iter().map(|r| r.log_index));
                from = next;
            }
            assert_eq!(seen, expected, "{filter:?}");
        }
    }

    #[tokio::test]
    async fn space_is_reserved_ahead_and_a_reopened_log_writes_into_it() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(segment::FILE_NAME);
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
        let key = || Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let data_end = |path: &Path| {
            segment::read_all(path)
                .expect("read")
                .last()
                .map_or(0, |(offset, frame, _)| offset + frame.encode().len() as u64)
        };
        {
            let db = sled::open(dir.path()).expect("db");
            let (log, writer) = AuditLog::open(dir.path(), &db, true, key()).expect("log");
            for n in 0..3 {
                log.append(record(&format!("r{n}"))).await.expect("append");
            }
            drop(log);
            writer.await.expect("writer");
        }
        let len = std::fs::metadata(&path).expect("file").len();
        let end = data_end(&path);
        assert!(len >= segment::RESERVE, "{len} bytes: nothing reserved");
        assert!(
            end < len,
            "the frames end at {end}, inside the reserved {len}"
        );
        let db = sled::open(dir.path()).expect("db");
        let (log, writer) = AuditLog::open(dir.path(), &db, true, key()).expect("reopen");
        assert_eq!(log.len(), 3);
        assert_eq!(log.append(record("r3")).await.expect("append"), 3);
        drop(log);
        writer.await.expect("writer");
        assert_eq!(
            std::fs::metadata(&path).expect("file").len(),
            len,
            "written into the reserve"
        );
        assert!(data_end(&path) > end);
        let public = key().public_key().as_ref().to_vec();
        assert_eq!(
            verify_dir(dir.path(), &public).expect("verifies").records,
            4
        );
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
