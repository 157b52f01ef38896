//! The audit log: one record per exchange, appended durably before the
//! caller is answered.
//!
//! Appends go through one writer task that batches whatever is waiting
//! (group commit): a batch is written to sled and flushed to disk with one
//! fsync, then every request in it is answered. A request whose record
//! could not be made durable gets an error and no evidence (fail closed).
//!
//! Records are stored as their canonical protobuf encoding (`AuditRecord`),
//! keyed by their big-endian log index, holding the payload digest and the
//! subject's pseudonym, never the payload or the subject id.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use onceonly_proto::v1::{AuditRecord, ExchangeOutcome};
use prost::Message;
use tokio::sync::{mpsc, oneshot};

/// The most records one batch takes.
const MAX_BATCH: usize = 4096;

/// Why a record could not be appended or read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The storage failed.
    #[error("audit storage failed: {0}")]
    Storage(String),
    /// The writer is gone (shutting down).
    #[error("the audit writer has stopped")]
    WriterStopped,
    /// A stored record does not decode.
    #[error("audit record {index} is corrupt: {reason}")]
    Corrupt {
        /// Its index.
        index: u64,
        /// Why.
        reason: String,
    },
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
}

/// The audit log.
#[derive(Clone)]
pub struct AuditLog {
    records: sled::Tree,
    appends: mpsc::Sender<Append>,
    /// Fault injection for fail-closed drills: while set, appends fail.
    fault: Arc<AtomicBool>,
}

impl AuditLog {
    /// Opens the log in `db` and starts its writer task. `durable`: flush
    /// every batch to disk before answering. The writer ends (after its
    /// last flush) once every handle to the log is dropped; the returned
    /// task completes then.
    pub fn open(
        db: &sled::Db,
        durable: bool,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), AuditError> {
        let records = db
            .open_tree("audit_records")
            .map_err(|e| AuditError::Storage(e.to_string()))?;
        let next_index = match records
            .last()
            .map_err(|e| AuditError::Storage(e.to_string()))?
        {
            Some((key, _)) => decode_index(&key)? + 1,
            None => 0,
        };
        let (appends, queue) = mpsc::channel(MAX_BATCH * 4);
        let fault = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(writer(
            db.clone(),
            records.clone(),
            queue,
            next_index,
            durable,
            fault.clone(),
        ));
        Ok((
            AuditLog {
                records,
                appends,
                fault,
            },
            task,
        ))
    }

    /// Appends `record` and returns its index once it is durable.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let (done, result) = oneshot::channel();
        self.appends
            .send(Append { record, done })
            .await
            .map_err(|_| AuditError::WriterStopped)?;
        result.await.map_err(|_| AuditError::WriterStopped)?
    }

    /// The number of records.
    pub fn len(&self) -> u64 {
        self.records
            .last()
            .ok()
            .flatten()
            .and_then(|(key, _)| decode_index(&key).ok())
            .map_or(0, |last| last + 1)
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record at `index`.
    pub fn get(&self, index: u64) -> Result<Option<AuditRecord>, AuditError> {
        self.records
            .get(index.to_be_bytes())
            .map_err(|e| AuditError::Storage(e.to_string()))?
            .map(|bytes| decode_record(index, &bytes))
            .transpose()
    }

    /// Up to `limit` records matching `filter`, from index `start` on, and
    /// the index to continue from (None at the end).
    pub fn query(
        &self,
        filter: &AuditFilter,
        start: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), AuditError> {
        let mut found = Vec::new();
        for entry in self.records.range(start.to_be_bytes()..) {
            let (key, bytes) = entry.map_err(|e| AuditError::Storage(e.to_string()))?;
            let index = decode_index(&key)?;
            if found.len() == limit {
                return Ok((found, Some(index)));
            }
            let record = decode_record(index, &bytes)?;
            if filter.matches(&record) {
                found.push(record);
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

fn decode_index(key: &[u8]) -> Result<u64, AuditError> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| AuditError::Corrupt {
            index: u64::MAX,
            reason: format!("key of {} bytes", key.len()),
        })
}

fn decode_record(index: u64, bytes: &[u8]) -> Result<AuditRecord, AuditError> {
    AuditRecord::decode(bytes).map_err(|e| AuditError::Corrupt {
        index,
        reason: e.to_string(),
    })
}

/// The writer task: batches appends, writes them, flushes once, answers.
async fn writer(
    db: sled::Db,
    records: sled::Tree,
    mut queue: mpsc::Receiver<Append>,
    mut next_index: u64,
    durable: bool,
    fault: Arc<AtomicBool>,
) {
    let mut batch: Vec<Append> = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let first = next_index;
        let result = if fault.load(Ordering::SeqCst) {
            Err(AuditError::Storage("injected failure".into()))
        } else {
            let mut write = sled::Batch::default();
            for (offset, append) in batch.iter_mut().enumerate() {
                let index = first + offset as u64;
                append.record.log_index = index;
                write.insert(&index.to_be_bytes(), append.record.encode_to_vec());
            }
            match records.apply_batch(write) {
                Err(e) => Err(AuditError::Storage(e.to_string())),
                Ok(()) if durable => {
                    let db = db.clone();
                    match tokio::task::spawn_blocking(move || db.flush()).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(AuditError::Storage(format!("flush: {e}"))),
                        Err(e) => Err(AuditError::Storage(format!("flush task: {e}"))),
                    }
                }
                Ok(()) => Ok(()),
            }
        };
        match result {
            Ok(()) => {
                next_index += batch.len() as u64;
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

    #[tokio::test]
    async fn concurrent_appends_get_distinct_indexes_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let db = sled::open(dir.path()).expect("db");
            let (log, writer) = AuditLog::open(&db, true).expect("log");
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
            drop(log);
            drop(db);
            writer.await.expect("writer ends once the log is dropped");
        }
        let db = sled::open(dir.path()).expect("reopen");
        let (log, _writer) = AuditLog::open(&db, true).expect("log");
        assert_eq!(log.len(), 64);
        assert_eq!(log.append(record("after")).await.expect("append"), 64);
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
        assert_eq!(next, None);
    }

    #[tokio::test]
    async fn injected_failure_fails_the_append() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let (log, _writer) = AuditLog::open(&db, true).expect("log");
        log.inject_failure(true);
        assert!(log.append(record("x")).await.is_err());
        log.inject_failure(false);
        assert_eq!(log.append(record("y")).await.expect("append"), 0);
    }
}
