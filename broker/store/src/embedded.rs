//! The embedded backend: one broker process, its state in the data
//! directory. The audit log is the log file with its sled indexes
//! ([`onceonly_audit_log::AuditLog`]); consents are in sled
//! ([`SledConsents`]). Request ids and quota counts are the broker's own
//! memory, so [`crate::Stores::shared`] is None.

use std::sync::Arc;

use onceonly_audit_log::{AuditError, AuditFault, AuditFilter, AuditLog, AuditMetrics};
use onceonly_merkle::Hash;
use onceonly_merkle::sth::SignedTreeHead;
use onceonly_proto::v1::AuditRecord;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::audit::{Appended, AuditStore, LogEntry};
use crate::consent::{self, ConsentError, ConsentQuery, ConsentStore, StoredConsent};

/// Runs `work` (file and sled reads) off the async workers.
async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, AuditError> + Send + 'static,
) -> Result<T, AuditError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| AuditError::Storage(format!("{what}: {e}")))?
}

#[async_trait::async_trait]
impl AuditStore for AuditLog {
    async fn append(&self, record: AuditRecord) -> Result<Appended, AuditError> {
        AuditLog::append(self, record).await.map(|index| Appended {
            index: Some(index),
            receipt: None,
        })
    }

    async fn signed_tree_head(&self) -> Result<Option<SignedTreeHead>, AuditError> {
        AuditLog::signed_tree_head(self)
    }

    async fn inclusion_proof(
        &self,
        index: u64,
        size: u64,
    ) -> Result<(Vec<Hash>, Hash), AuditError> {
        Ok((
            AuditLog::inclusion_proof(self, index, size)?,
            self.leaf_hash(index)?,
        ))
    }

    async fn find_leaf(&self, _leaf_hash: &Hash, _size: u64) -> Result<Option<u64>, AuditError> {
        // A scan per call would let any caller make the broker read its
        // whole log; the embedded log's answers carry the index instead.
        Err(AuditError::Unsupported(
            "this broker runs on its embedded log, which keeps no index by leaf hash: its answers carry audit_log_index; ask by leaf_index".into(),
        ))
    }

    async fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, AuditError> {
        AuditLog::consistency_proof(self, first, second)
    }

    async fn entries(&self, start: u64, max: u64) -> Result<Vec<LogEntry>, AuditError> {
        let log = self.clone();
        blocking("reading entries", move || {
            let end = log.len().min(start.saturating_add(max));
            let mut entries = Vec::new();
            for index in start..end {
                if let Some((record, leaf_data)) = log.entry(index)? {
                    entries.push((index, record, leaf_data));
                }
            }
            Ok(entries)
        })
        .await
    }

    async fn query(
        &self,
        filter: AuditFilter,
        start: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), AuditError> {
        let log = self.clone();
        blocking("audit query", move || log.query(&filter, start, limit)).await
    }

    fn refusing(&self) -> Option<String> {
        AuditLog::refusing(self)
    }

    fn tree_size(&self) -> u64 {
        AuditLog::tree_size(self)
    }

    fn metrics(&self) -> &AuditMetrics {
        AuditLog::metrics(self)
    }

    fn inject(&self, fault: AuditFault) {
        AuditLog::inject(self, fault);
    }
}

/// A consent as kept in sled: its fields and its tag (hex).
#[derive(Serialize, Deserialize)]
struct Row {
    #[serde(flatten)]
    consent: StoredConsent,
    /// Absent only in rows written before consents were tagged (see
    /// [`SledConsents::tag_untagged`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

/// Consents in sled: trees `consents` (consent id -> [`Row`], JSON) and
/// `consents_by_subject` (subject pseudonym, newest first, consent id ->
/// nothing), so a subject's consents are found without a scan. Every row
/// is tagged like PostgreSQL's ([`consent::tag`]): a row written into the
/// data directory by anything but the broker does not count, and moving
/// the directory into PostgreSQL refuses it.
#[derive(Clone)]
pub struct SledConsents {
    db: sled::Db,
    consents: sled::Tree,
    by_subject: sled::Tree,
    key: Arc<hmac::Key>,
}

fn storage(e: sled::Error) -> ConsentError {
    ConsentError::Storage(e.to_string())
}

fn corrupt(id: &[u8], reason: impl std::fmt::Display) -> ConsentError {
    ConsentError::Corrupt {
        id: String::from_utf8_lossy(id).into_owned(),
        reason: reason.to_string(),
    }
}

impl SledConsents {
    /// Opens the store in `db`, its rows tagged under `key`. A row without
    /// a tag (written before consents were authenticated, or by someone
    /// else) does not count until [`SledConsents::tag_untagged`] is run on
    /// purpose: nothing in the data directory can make the broker tag rows
    /// by itself.
    pub fn open(db: &sled::Db, key: hmac::Key) -> Result<Self, ConsentError> {
        Ok(SledConsents {
            consents: db.open_tree("consents").map_err(storage)?,
            by_subject: db.open_tree("consents_by_subject").map_err(storage)?,
            db: db.clone(),
            key: Arc::new(key),
        })
    }

    /// Tags every row that has no tag yet, as the broker's own: run once by
    /// the operator after upgrading a data directory from before consents
    /// were authenticated, the broker stopped. Rows that do not decode are
    /// left as they are. Returns how many were tagged.
    pub fn tag_untagged(&self) -> Result<usize, ConsentError> {
        let mut tagged = 0usize;
        for entry in self.consents.iter() {
            let (id, bytes) = entry.map_err(storage)?;
            let Ok(mut row) = serde_json::from_slice::<Row>(&bytes) else {
                continue;
            };
            if row.mac.is_none() && row.consent.consent_id.as_bytes() == id.as_ref() {
                row.mac = Some(hex::encode(consent::tag(&self.key, &row.consent)?));
                self.consents
                    .insert(id, Self::encode(&row)?)
                    .map_err(storage)?;
                tagged += 1;
            }
        }
        self.db.flush().map_err(storage)?;
        Ok(tagged)
    }

    fn encode(row: &Row) -> Result<Vec<u8>, ConsentError> {
        serde_json::to_vec(row).map_err(|e| ConsentError::Storage(e.to_string()))
    }

    fn row(&self, consent: StoredConsent) -> Result<Row, ConsentError> {
        let mac = Some(hex::encode(consent::tag(&self.key, &consent)?));
        Ok(Row { consent, mac })
    }

    /// The consent in `bytes`, where it decodes and its tag holds.
    fn decode(&self, id: &[u8], bytes: &[u8]) -> Result<StoredConsent, ConsentError> {
        let row: Row = serde_json::from_slice(bytes).map_err(|e| corrupt(id, e))?;
        let Some(mac) = row.mac else {
            return Err(corrupt(
                id,
                "it has no tag: it was not written by the broker",
            ));
        };
        let mac = hex::decode(mac).map_err(|e| corrupt(id, format!("its tag: {e}")))?;
        if row.consent.consent_id.as_bytes() != id {
            return Err(corrupt(id, "it is stored under another consent's id"));
        }
        consent::authenticated(&self.key, row.consent, &mac)
    }

    fn read(&self, id: &[u8]) -> Result<Option<StoredConsent>, ConsentError> {
        self.consents
            .get(id)
            .map_err(storage)?
            .map(|bytes| self.decode(id, &bytes))
            .transpose()
    }

    /// The ids of a subject's consents, newest first.
    fn subject_ids(
        &self,
        pseudonym: &str,
    ) -> Result<impl Iterator<Item = Result<sled::IVec, ConsentError>>, ConsentError> {
        let prefix = hex::decode(pseudonym)
            .map_err(|e| ConsentError::Storage(format!("a subject pseudonym: {e}")))?;
        Ok(self
            .by_subject
            .scan_prefix(prefix)
            .map(|entry| entry.map(|(_, id)| id).map_err(storage)))
    }

    fn write(&self, consent: &StoredConsent) -> Result<(), ConsentError> {
        let mut index_key = hex::decode(&consent.subject_pseudonym)
            .map_err(|e| ConsentError::Storage(format!("a subject pseudonym: {e}")))?;
        index_key
            .extend_from_slice(&(u64::MAX - consent.granted_at_ms.max(0) as u64).to_be_bytes());
        index_key.extend_from_slice(consent.consent_id.as_bytes());
        let value = Self::encode(&self.row(consent.clone())?)?;
        self.consents
            .insert(consent.consent_id.as_bytes(), value)
            .map_err(storage)?;
        self.by_subject
            .insert(index_key, consent.consent_id.as_bytes())
            .map_err(storage)?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl ConsentStore for SledConsents {
    async fn insert(&self, consent: &StoredConsent) -> Result<(), ConsentError> {
        self.write(consent)?;
        self.db.flush_async().await.map_err(storage)?;
        Ok(())
    }

    async fn import(&self, consent: &StoredConsent) -> Result<bool, ConsentError> {
        if self
            .consents
            .contains_key(consent.consent_id.as_bytes())
            .map_err(storage)?
        {
            return Ok(false);
        }
        self.insert(consent).await?;
        Ok(true)
    }

    async fn get(&self, id: &str) -> Result<Option<StoredConsent>, ConsentError> {
        self.read(id.as_bytes())
    }

    async fn revoke(&self, id: &str, now_ms: i64) -> Result<StoredConsent, ConsentError> {
        // Compare and swap, so that bytes that fail their check are
        // reported and kept, never replaced or deleted.
        let consent = loop {
            let Some(old) = self.consents.get(id.as_bytes()).map_err(storage)? else {
                return Err(ConsentError::NotFound(id.to_owned()));
            };
            let mut consent = self.decode(id.as_bytes(), &old)?;
            if consent.revoked_at_ms.is_some() {
                break consent;
            }
            consent.revoked_at_ms = Some(now_ms);
            let new = Self::encode(&self.row(consent.clone())?)?;
            match self
                .consents
                .compare_and_swap(id.as_bytes(), Some(old), Some(new))
                .map_err(storage)?
            {
                Ok(()) => break consent,
                // Changed in between (another revocation): read again.
                Err(_) => continue,
            }
        };
        self.db.flush_async().await.map_err(storage)?;
        Ok(consent)
    }

    async fn list(
        &self,
        pseudonym: &str,
        skip: usize,
        limit: usize,
    ) -> Result<(Vec<StoredConsent>, bool), ConsentError> {
        let mut found = Vec::new();
        let mut more = false;
        for id in self.subject_ids(pseudonym)?.skip(skip) {
            let id = id?;
            if found.len() == limit {
                more = true;
                break;
            }
            found.extend(consent::authentic(self.read(&id).transpose()));
        }
        Ok((found, more))
    }

    async fn find_active(
        &self,
        query: &ConsentQuery<'_>,
        now_ms: i64,
    ) -> Result<Option<StoredConsent>, ConsentError> {
        for id in self.subject_ids(query.subject_pseudonym)? {
            let id = id?;
            if let Some(found) = consent::authentic(self.read(&id).transpose())
                .into_iter()
                .find(|c| query.covered_by(c, now_ms))
            {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    async fn all(&self) -> Result<Vec<StoredConsent>, ConsentError> {
        self.consents
            .iter()
            .map(|entry| {
                let (id, bytes) = entry.map_err(storage)?;
                self.decode(&id, &bytes)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consent(id: &str, granted: i64) -> StoredConsent {
        StoredConsent {
            consent_id: id.into(),
            subject_scheme: 1,
            subject_pseudonym: "abcd".into(),
            subject_sealed: "sealed".into(),
            authority_id: "spiffe://t/authority/a".into(),
            evidence_type: "proof-of-residence".into(),
            purpose: "parental-allowance".into(),
            granted_at_ms: granted,
            expires_at_ms: 10_000,
            revoked_at_ms: None,
            recorded_by: "spiffe://t/portal/p".into(),
        }
    }

    fn key() -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &[3; 32])
    }

    fn query() -> ConsentQuery<'static> {
        ConsentQuery {
            subject_scheme: 1,
            subject_pseudonym: "abcd",
            authority_id: "spiffe://t/authority/a",
            evidence_type: "proof-of-residence",
            purpose: "parental-allowance",
        }
    }

    #[tokio::test]
    async fn a_row_written_into_sled_by_hand_does_not_count_and_cannot_be_moved() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let store = SledConsents::open(&db, key()).expect("store");
        store
            .insert(&consent("cns-real", 1_000))
            .await
            .expect("grant");
        // The intruder copies the genuine row, revokes it by hand, and
        // forges a second consent with a made-up tag.
        let tree = db.open_tree("consents").expect("tree");
        let mut forged: serde_json::Value =
            serde_json::from_slice(&tree.get("cns-real").expect("get").expect("there"))
                .expect("json");
        forged["consent_id"] = "cns-forged".into();
        forged["granted_at_ms"] = 2_000.into();
        tree.insert("cns-forged", serde_json::to_vec(&forged).expect("json"))
            .expect("insert");
        let mut index = hex::decode("abcd").expect("hex");
        index.extend_from_slice(&(u64::MAX - 2_000).to_be_bytes());
        index.extend_from_slice(b"cns-forged");
        db.open_tree("consents_by_subject")
            .expect("tree")
            .insert(index, &b"cns-forged"[..])
            .expect("index");

        assert!(matches!(
            store.get("cns-forged").await,
            Err(ConsentError::Corrupt { id, .. }) if id == "cns-forged"
        ));
        let (listed, _) = store.list("abcd", 0, 10).await.expect("list");
        assert_eq!(
            listed
                .iter()
                .map(|c| c.consent_id.as_str())
                .collect::<Vec<_>>(),
            ["cns-real"],
            "the forged row is listed"
        );
        assert_eq!(
            store
                .find_active(&query(), 1_500)
                .await
                .expect("find")
                .map(|c| c.consent_id),
            Some("cns-real".into())
        );
        let refused = store.all().await.expect_err("a forged row is exported");
        assert!(
            matches!(&refused, ConsentError::Corrupt { id, .. } if id == "cns-forged"),
            "{refused:?}"
        );

        // Revoked through the broker, then the revocation edited out of
        // the row (its tag kept): the row no longer counts at all.
        store.revoke("cns-real", 3_000).await.expect("revoke");
        let mut unrevoked: serde_json::Value =
            serde_json::from_slice(&tree.get("cns-real").expect("get").expect("there"))
                .expect("json");
        unrevoked["revoked_at_ms"] = serde_json::Value::Null;
        tree.insert("cns-real", serde_json::to_vec(&unrevoked).expect("json"))
            .expect("insert");
        assert_eq!(
            store.find_active(&query(), 3_500).await.expect("find"),
            None
        );
    }

    #[tokio::test]
    async fn rows_from_before_tags_count_only_once_the_operator_tags_them() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let old = consent("cns-old", 1_000);
        db.open_tree("consents")
            .expect("tree")
            .insert("cns-old", serde_json::to_vec(&old).expect("json"))
            .expect("insert");
        let store = SledConsents::open(&db, key()).expect("store");
        assert!(
            matches!(
                store.get("cns-old").await,
                Err(ConsentError::Corrupt { .. })
            ),
            "opening tagged a row by itself"
        );
        drop(store);
        // Reopening never tags either: no marker to delete, nothing to
        // trigger.
        let store = SledConsents::open(&db, key()).expect("store");
        assert!(store.get("cns-old").await.is_err());
        assert_eq!(store.tag_untagged().expect("tagged"), 1);
        assert_eq!(store.get("cns-old").await.expect("get"), Some(old));
        assert_eq!(store.tag_untagged().expect("again"), 0, "tagged twice");
    }
}
