//! The indexer thread: takes the frames the writer (`writer` module) has made
//! durable and adds them to the sled index in larger batches, behind the
//! writer and off the path of any request.
//!
//! Indexing each frame as it was committed cost a sled batch per frame
//! (with batches of one record at low load, five keys per record) and sled
//! writing its own log beside ours: at one request at a time it was a
//! third of the broker's CPU. Grouping frames for up to [`MAX_DELAY`] or
//! [`MAX_RECORDS`] records writes one entry per indexed value per group
//! instead. Until a frame is indexed, readers find it in
//! [`crate::store::Store::recent`] and queries scan it directly, so
//! nothing appended is ever missing from a read. The index is rebuildable
//! from the file: after a crash, opening indexes what it had not taken.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use onceonly_proto::v1::AuditRecord;

use crate::fault::AuditFault;
use crate::index::index_frames;
use crate::store::{BatchPlace, Store};

/// The longest a durable frame waits for the index.
pub const MAX_DELAY: Duration = Duration::from_millis(200);

/// Records taken into the index at most in one sled batch.
pub const MAX_RECORDS: usize = 4096;

/// Frames the writer may have handed over and the indexer not taken yet:
/// beyond it the writer waits (the index falls no further behind).
const QUEUE: usize = 256;

/// One durable frame and its records, handed over by the writer.
pub(crate) struct Job {
    pub(crate) place: BatchPlace,
    pub(crate) records: Vec<AuditRecord>,
}

/// Starts the indexer for `store`; it ends once the sender is dropped,
/// after indexing what it was given.
pub(crate) fn spawn(
    store: Arc<Store>,
    fault: Arc<AtomicU8>,
) -> std::io::Result<(SyncSender<Job>, std::thread::JoinHandle<()>)> {
    let (jobs, queue) = std::sync::mpsc::sync_channel(QUEUE);
    let thread = std::thread::Builder::new()
        .name("audit-indexer".into())
        .spawn(move || run(&store, &fault, &queue))?;
    Ok((jobs, thread))
}

fn run(store: &Store, fault: &AtomicU8, queue: &Receiver<Job>) {
    let mut pending: Vec<Job> = Vec::new();
    let mut records = 0usize;
    let mut since = Instant::now();
    let mut failed = false;
    loop {
        // After a failure nothing more is indexed (a restart rebuilds the
        // index from the file): frames still arriving are dropped, and the
        // thread waits without a timeout.
        if failed {
            pending.clear();
            records = 0;
        }
        let received = if pending.is_empty() {
            queue.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            queue.recv_timeout(MAX_DELAY.saturating_sub(since.elapsed()))
        };
        let closed = match received {
            Ok(job) => {
                if pending.is_empty() {
                    since = Instant::now();
                }
                records += job.records.len();
                pending.push(job);
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        let due = closed || records >= MAX_RECORDS || since.elapsed() >= MAX_DELAY;
        if due && !pending.is_empty() && !failed {
            if let Err(reason) = index(store, fault, &pending) {
                // The frames stay readable from `recent`; a restart
                // rebuilds the index from the file.
                tracing::error!(%reason, "the audit index failed; the log refuses further appends until the broker restarts");
                if let Ok(mut broken) = store.broken.write() {
                    broken.get_or_insert(format!("indexing: {reason}"));
                }
                failed = true;
            }
            pending.clear();
            records = 0;
        }
        if closed {
            return;
        }
    }
}

/// Adds `jobs` (consecutive frames) to the index as one sled batch, then
/// lets them leave `recent`.
fn index(store: &Store, fault: &AtomicU8, jobs: &[Job]) -> Result<(), String> {
    let Some(last) = jobs.last() else {
        return Ok(());
    };
    let end = last.place.first_index + last.place.count;
    let batch = index_frames(jobs.iter().map(|job| (job.place, &job.records[..])));
    if fault.load(Ordering::SeqCst) == AuditFault::IndexAfterFlush as u8 {
        return Err("injected index failure".into());
    }
    store.index.apply_batch(batch).map_err(|e| e.to_string())?;
    store.indexed_end.store(end, Ordering::Release);
    let mut recent = store.recent.write().map_err(|_| "poisoned".to_owned())?;
    while recent
        .front()
        .is_some_and(|place| place.first_index + place.count <= end)
    {
        recent.pop_front();
    }
    Ok(())
}
