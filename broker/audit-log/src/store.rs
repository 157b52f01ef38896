//! What the log's readers and its writer share: the log file, the sled
//! index beside it, the latest signed head and the log's health; and the
//! helpers that open storage and time a flush.

use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;
use std::sync::RwLock;
use std::sync::atomic::AtomicU64;

use onceonly_merkle::sth::SignedTreeHead;
use onceonly_merkle::{Hash, Subtrees, last_leaf, subtree_position, subtrees_completed};

use crate::index::keys;
use crate::metrics::AuditMetrics;
use crate::{AuditError, segment};

/// The sled tree of the log's (rebuildable) indexes.
pub(crate) const INDEX_TREE: &str = "audit-index";

/// What readers and the writer share: the file, the index, the head.
pub(crate) struct Store {
    pub(crate) file: File,
    pub(crate) index: sled::Tree,
    pub(crate) head: RwLock<Option<SignedTreeHead>>,
    /// Successful `fdatasync`s of the file, the frames' and the cut-backs'.
    pub(crate) flushes: AtomicU64,
    /// Why appends are refused until a restart (a failed flush or cut-back,
    /// or a failed index update), if so.
    pub(crate) broken: RwLock<Option<String>>,
    /// When the last batch failed (Unix ms; 0: never).
    pub(crate) last_failure_ms: std::sync::atomic::AtomicI64,
    /// Flush and batch figures, for the broker's metrics.
    pub(crate) metrics: AuditMetrics,
    /// Frames written but not yet in the index (the indexer
    /// takes them in larger batches behind the writer), ascending.
    pub(crate) recent: RwLock<VecDeque<BatchPlace>>,
    /// Every record below this index is in the sled index.
    pub(crate) indexed_end: AtomicU64,
}

pub(crate) use crate::index::BatchPlace;

impl Store {
    /// The batch holding log index `index`, where written: among the
    /// frames not yet indexed, else in the index. (The indexer adds a frame
    /// to the index before it leaves `recent`, so one of the two has it.)
    pub(crate) fn batch_of(&self, index: u64) -> Result<Option<BatchPlace>, AuditError> {
        {
            let recent = self.recent.read().map_err(|_| crate::fault::poisoned())?;
            if recent
                .front()
                .is_some_and(|first| index >= first.first_index)
            {
                let after = recent.partition_point(|place| place.first_index <= index);
                return Ok(after
                    .checked_sub(1)
                    .map(|at| recent[at])
                    .filter(|place| index < place.first_index + place.count));
            }
        }
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

    /// The batches holding records `start..end`, in order.
    pub(crate) fn batches_between(
        &self,
        start: u64,
        end: u64,
    ) -> impl Iterator<Item = Result<BatchPlace, AuditError>> + '_ {
        let mut next = start;
        std::iter::from_fn(move || {
            if next >= end {
                return None;
            }
            let found = match self.batch_of(next) {
                Ok(Some(place)) => {
                    next = place.first_index + place.count;
                    return Some(Ok(place));
                }
                Ok(None) => AuditError::Corrupt(format!("no frame holds record {next}")),
                Err(e) => e,
            };
            next = end;
            Some(Err(found))
        })
    }

    /// The exact bytes of record `index`.
    pub(crate) fn record_bytes(&self, index: u64) -> Result<Option<Vec<u8>>, AuditError> {
        let Some(place) = self.batch_of(index)? else {
            return Ok(None);
        };
        Ok(Some(segment::read_record(
            &self.file,
            place.offset,
            index - place.first_index,
        )?))
    }

    pub(crate) fn signed_size(&self) -> u64 {
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

/// [`open_storage`] off the async workers (opening waits out another
/// process's lock with sleeps); the error as text, for the caller to name
/// the directory and what to do.
pub async fn open_storage_async(config: sled::Config) -> Result<sled::Db, String> {
    tokio::task::spawn_blocking(move || open_storage(config))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}
