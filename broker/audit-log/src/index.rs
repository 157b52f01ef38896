//! The query indexes in sled: per batch and indexed value (subject
//! pseudonym, caller, evidence type, connector, outcome) one entry listing
//! the batch's records with it, and per batch where its frame starts. All
//! of it can be rebuilt from the log file.

use std::collections::BTreeMap;

use onceonly_proto::v1::{AuditRecord, ExchangeOutcome};

use crate::AuditError;

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

/// The index entries of consecutive frames, taken as one group: each
/// frame's place, and per indexed value one entry listing the group's
/// records with it, keyed by the group's first log index.
pub(crate) fn index_frames<'a>(
    frames: impl IntoIterator<Item = (BatchPlace, &'a [AuditRecord])>,
) -> sled::Batch {
    let mut lists: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut batch = sled::Batch::default();
    let mut group = None;
    for (place, records) in frames {
        group.get_or_insert(place.first_index);
        for (n, record) in records.iter().enumerate() {
            let index = place.first_index + n as u64;
            for prefix in index_prefixes(record) {
                lists
                    .entry(prefix)
                    .or_default()
                    .extend_from_slice(&index.to_be_bytes());
            }
        }
        batch.insert(&keys::batch(place.first_index)[..], &place.encode()[..]);
    }
    let group = group.unwrap_or_default();
    for (mut key, list) in lists {
        key.extend_from_slice(&group.to_be_bytes());
        batch.insert(key, list);
    }
    batch
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
    /// Whether `record` has what the filter asks for: the check every
    /// query makes of a record an index listed, so that an edited index
    /// (sled's, or the database's columns) cannot move a record into
    /// another subject's or caller's view.
    pub fn matches(&self, record: &AuditRecord) -> bool {
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
    pub(crate) fn index(&self) -> Option<Vec<u8>> {
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

/// Where a batch's frame is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchPlace {
    pub(crate) first_index: u64,
    pub(crate) offset: u64,
    pub(crate) count: u64,
}

impl BatchPlace {
    /// The value of its `b` entry: offset (u64 BE) and record count (u32 BE).
    pub(crate) fn encode(&self) -> [u8; 12] {
        let mut value = [0u8; 12];
        value[..8].copy_from_slice(&self.offset.to_be_bytes());
        value[8..].copy_from_slice(&(self.count as u32).to_be_bytes());
        value
    }

    pub(crate) fn decode(key: &[u8], value: &[u8]) -> Result<Self, AuditError> {
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
