//! The writer thread: group commit. It takes whatever appends are waiting,
//! writes them, their tree nodes and a signed head as one frame, flushes
//! it once, and only then answers every append in the batch; then hands
//! the frame to the [`crate::indexer`].

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use onceonly_merkle::sth::SignedTreeHead;
use onceonly_merkle::{Frontier, Hash, leaf_hash};
use onceonly_proto::time::now_ms;
use onceonly_proto::v1::{self as pb, AuditRecord};
use prost::Message;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tokio::sync::{mpsc, oneshot};

use crate::fault::{AuditFault, poisoned};
use crate::head::head_to_proto;
use crate::indexer::Job;
use crate::store::{BatchPlace, Store};
use crate::{AuditError, handover, segment};

/// The most records one batch takes.
pub(crate) const MAX_BATCH: usize = 4096;

pub(crate) struct Append {
    pub(crate) record: AuditRecord,
    /// Set on a key hand-over: the writer signs the hand-over with its key,
    /// this batch's head and all later ones with this one.
    pub(crate) new_key: Option<Ed25519KeyPair>,
    pub(crate) done: oneshot::Sender<Result<u64, AuditError>>,
}

/// The writer thread's state.
pub(crate) struct Writer {
    pub(crate) store: Arc<Store>,
    /// Where the next frame goes.
    pub(crate) end: u64,
    pub(crate) frontier: Frontier,
    pub(crate) key: Ed25519KeyPair,
    pub(crate) durable: bool,
    pub(crate) fault: Arc<AtomicU8>,
    pub(crate) held: Arc<AtomicBool>,
    // Buffers reused from batch to batch.
    pub(crate) area: Vec<u8>,
    pub(crate) ends: Vec<usize>,
    pub(crate) nodes: Vec<Hash>,
    pub(crate) frame: Vec<u8>,
    /// Where durable frames go to be indexed (dropped at the end, to let
    /// the indexer finish).
    pub(crate) indexer: Option<std::sync::mpsc::SyncSender<Job>>,
    pub(crate) indexer_thread: Option<std::thread::JoinHandle<()>>,
    /// The file is allocated (zeros beyond the last frame) up to here.
    pub(crate) reserved_to: u64,
}

impl Writer {
    pub(crate) fn run(mut self, mut queue: mpsc::Receiver<Append>) {
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
                Ok(place) => {
                    self.store.last_failure_ms.store(0, Ordering::Relaxed);
                    let records = batch
                        .drain(..)
                        .enumerate()
                        .map(|(offset, append)| {
                            let _ = append.done.send(Ok(first + offset as u64));
                            append.record
                        })
                        .collect();
                    if let Some(indexer) = &self.indexer {
                        // Blocks only while the indexer is a whole queue
                        // behind: then appends wait rather than the index
                        // falling further behind.
                        let _ = indexer.send(Job { place, records });
                    }
                }
                Err(error) => {
                    self.store
                        .last_failure_ms
                        .store(now_ms(), Ordering::Relaxed);
                    tracing::error!(%error, records = batch.len(), "audit batch failed; its requests get no evidence");
                    for append in batch.drain(..) {
                        let _ = append.done.send(Err(error.clone()));
                    }
                }
            }
        }
        drop(self.indexer.take());
        if let Some(thread) = self.indexer_thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the audit indexer panicked");
        }
    }

    /// Appends one batch as one frame and (if durable) flushes it, and
    /// returns where it is. On error the file is cut back to where it was
    /// and the in-memory tree left as it was.
    fn commit(&mut self, batch: &mut [Append]) -> Result<BatchPlace, AuditError> {
        let fault = self.fault.load(Ordering::SeqCst);
        if fault == AuditFault::Append as u8 {
            return Err(AuditError::Storage("injected failure".into()));
        }
        if let Some(reason) = self
            .store
            .broken
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
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
        let now_ms = u64::try_from(now_ms()).unwrap_or(0);
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
        self.reserve(self.frame.len() as u64);
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
        let place = BatchPlace {
            first_index,
            offset: self.end,
            count: batch.len() as u64,
        };
        self.store
            .recent
            .write()
            .map_err(|_| poisoned())?
            .push_back(place);
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
        Ok(place)
    }

    /// Makes sure `len` bytes after the last frame are reserved (allocated,
    /// reading as zeros), so the next flushes need not grow the file. Where
    /// the file system cannot reserve, the log grows as it writes.
    fn reserve(&mut self, len: u64) {
        if self.end + len <= self.reserved_to {
            return;
        }
        let wanted = segment::RESERVE.max(len);
        match rustix::fs::fallocate(
            &self.store.file,
            rustix::fs::FallocateFlags::empty(),
            self.end,
            wanted,
        ) {
            Ok(()) => self.reserved_to = self.end + wanted,
            Err(e) => {
                tracing::debug!(error = %e, "cannot reserve space ahead in the audit log; it grows as it writes");
                self.reserved_to = u64::MAX;
            }
        }
    }

    /// Cuts the file back to its last whole frame, durably where the log is
    /// durable: a frame that was flushed and is then cut back must not
    /// reappear after a crash, since its requests got no evidence.
    fn cut_back(&mut self) {
        if let Err(e) = self.store.file.set_len(self.end) {
            tracing::error!(error = %e, "cannot cut the audit log back after a failed append");
            return;
        }
        self.reserved_to = self.end;
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
        *self.store.broken.write().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
        AuditError::Storage(reason)
    }
}
