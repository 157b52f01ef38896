//! Consents: a subject agreed that an authority may fetch an evidence type
//! about them for a purpose until a time. Revocation takes effect at once:
//! the request path reads the store on every check, so with replicas on
//! PostgreSQL a consent granted or revoked through one replica holds at
//! every other from the moment the grant or revocation is answered.
//!
//! Embedded, in sled: trees `consents` (consent id -> record, JSON) and
//! `consents_by_subject` (subject pseudonym, newest first, consent id ->
//! nothing), so a subject's consents are found without a scan. On
//! PostgreSQL: the `consents` table, indexed by pseudonym.

use std::sync::Arc;

use onceonly_proto::time::timestamp;
use onceonly_proto::v1::{Consent, ConsentState, SubjectId};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::pseudonym::Pseudonymiser;

/// A stored consent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredConsent {
    /// Its id.
    pub consent_id: String,
    /// Subject scheme (enum value).
    pub subject_scheme: i32,
    /// The subject's pseudonym (hex), for matching requests.
    pub subject_pseudonym: String,
    /// The subject id, sealed under a key derived from the pseudonym key
    /// ([`Pseudonymiser::seal`]): a consent is a legal record that must name
    /// its person, but a copied data directory must not reveal whom.
    pub subject_sealed: String,
    /// The authority's SPIFFE id.
    pub authority_id: String,
    /// The evidence type.
    pub evidence_type: String,
    /// The purpose.
    pub purpose: String,
    /// Unix milliseconds.
    pub granted_at_ms: i64,
    /// Unix milliseconds.
    pub expires_at_ms: i64,
    /// Unix milliseconds, once revoked.
    pub revoked_at_ms: Option<i64>,
    /// The portal that recorded it.
    pub recorded_by: String,
}

impl StoredConsent {
    /// Its state at `now_ms`.
    pub fn state(&self, now_ms: i64) -> ConsentState {
        if self.revoked_at_ms.is_some() {
            ConsentState::Revoked
        } else if now_ms >= self.expires_at_ms {
            ConsentState::Expired
        } else {
            ConsentState::Active
        }
    }

    /// The wire form at `now_ms`, naming `subject` (known to the caller, or
    /// opened with [`ConsentStore::subject_of`]).
    pub fn to_proto(&self, now_ms: i64, subject: SubjectId) -> Consent {
        Consent {
            consent_id: self.consent_id.clone(),
            subject: Some(subject),
            authority_id: self.authority_id.clone(),
            evidence_type: self.evidence_type.clone(),
            purpose: self.purpose.clone(),
            granted_at: Some(timestamp(self.granted_at_ms)),
            expires_at: Some(timestamp(self.expires_at_ms)),
            revoked_at: self.revoked_at_ms.map(timestamp),
            state: self.state(now_ms) as i32,
            recorded_by: self.recorded_by.clone(),
        }
    }
}

/// Why a consent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsentError {
    /// No consent with that id.
    #[error("no consent {0:?}")]
    NotFound(String),
    /// The storage failed.
    #[error("consent storage failed: {0}")]
    Storage(String),
    /// A stored consent cannot be read; its bytes are left as they are for
    /// the operator to inspect.
    #[error("stored consent {id:?} cannot be decoded ({reason}); it was left unchanged")]
    Corrupt {
        /// The consent id.
        id: String,
        /// Why it does not decode.
        reason: String,
    },
}

impl From<sled::Error> for ConsentError {
    fn from(e: sled::Error) -> Self {
        ConsentError::Storage(e.to_string())
    }
}

impl From<onceonly_store_postgres::tokio_postgres::Error> for ConsentError {
    fn from(e: onceonly_store_postgres::tokio_postgres::Error) -> Self {
        ConsentError::Storage(format!(
            "PostgreSQL: {}",
            onceonly_store_postgres::describe(&e)
        ))
    }
}

/// What a new consent covers.
#[derive(Debug, Clone)]
pub struct NewConsent {
    /// The subject.
    pub subject: SubjectId,
    /// The authority's SPIFFE id.
    pub authority_id: String,
    /// The evidence type.
    pub evidence_type: String,
    /// The purpose.
    pub purpose: String,
    /// Unix milliseconds.
    pub expires_at_ms: i64,
    /// The portal's SPIFFE id.
    pub recorded_by: String,
}

/// The consent store.
#[derive(Clone)]
pub struct ConsentStore {
    backend: Backend,
    pseudonyms: Arc<Pseudonymiser>,
}

#[derive(Clone)]
enum Backend {
    Sled {
        db: sled::Db,
        consents: sled::Tree,
        by_subject: sled::Tree,
    },
    Postgres(onceonly_store_postgres::Pool),
}

const COLUMNS: &str = "consent_id, subject_scheme, subject_pseudonym, subject_sealed, authority_id, evidence_type, purpose, granted_at_ms, expires_at_ms, revoked_at_ms, recorded_by, mac";

fn consent_of(row: &onceonly_store_postgres::tokio_postgres::Row) -> StoredConsent {
    StoredConsent {
        consent_id: row.get(0),
        subject_scheme: row.get(1),
        subject_pseudonym: row.get(2),
        subject_sealed: row.get(3),
        authority_id: row.get(4),
        evidence_type: row.get(5),
        purpose: row.get(6),
        granted_at_ms: row.get(7),
        expires_at_ms: row.get(8),
        revoked_at_ms: row.get(9),
        recorded_by: row.get(10),
    }
}

/// What a consent row's tag covers: every field, revocation included.
fn tag_input(consent: &StoredConsent) -> Result<Vec<u8>, ConsentError> {
    let mut input = b"onceonly-consent-row-v1\0".to_vec();
    input.extend(serde_json::to_vec(consent).map_err(|e| ConsentError::Storage(e.to_string()))?);
    Ok(input)
}

/// A consent write PostgreSQL answered without an error but did not make
/// (`what`: "the grant", "the revocation"), e.g. because a trigger on the
/// table skips or rewrites it. Nothing was changed, and the caller is told
/// so rather than "granted" or "revoked".
fn not_stored(what: &str, id: &str, how: &str) -> ConsentError {
    // The operator's hint goes to the log; the error (which also lands in
    // the audit record a citizen's view shows) says only what happened.
    tracing::error!(
        consent_id = id,
        "PostgreSQL did not store {what} of the consent: {how}, yet it reported success. A trigger on the consents table skips or rewrites writes (list its triggers with `\\d consents` in psql; replicas create none)"
    );
    ConsentError::Storage(format!(
        "the consent store did not store {what}; nothing was changed"
    ))
}

impl ConsentStore {
    /// Opens the store in `db`.
    pub fn open(db: &sled::Db, pseudonyms: Arc<Pseudonymiser>) -> Result<Self, ConsentError> {
        Ok(ConsentStore {
            backend: Backend::Sled {
                consents: db.open_tree("consents")?,
                by_subject: db.open_tree("consents_by_subject")?,
                db: db.clone(),
            },
            pseudonyms,
        })
    }

    /// The store in PostgreSQL behind `pool` (migrated), shared by replicas.
    pub fn postgres(pool: onceonly_store_postgres::Pool, pseudonyms: Arc<Pseudonymiser>) -> Self {
        ConsentStore {
            backend: Backend::Postgres(pool),
            pseudonyms,
        }
    }

    async fn client(
        pool: &onceonly_store_postgres::Pool,
    ) -> Result<deadpool_postgres::Object, ConsentError> {
        pool.get().await.map_err(|e| {
            ConsentError::Storage(format!(
                "PostgreSQL: {}",
                onceonly_store_postgres::describe(&e)
            ))
        })
    }

    /// A row's tag under the key replicas hold and the database does not:
    /// a consent row written by anyone else does not count.
    fn tag(&self, consent: &StoredConsent) -> Result<Vec<u8>, ConsentError> {
        Ok(
            ring::hmac::sign(&self.pseudonyms.row_key(), &tag_input(consent)?)
                .as_ref()
                .to_vec(),
        )
    }

    /// The row's consent, where its tag holds.
    fn authenticated(
        &self,
        row: &onceonly_store_postgres::tokio_postgres::Row,
    ) -> Result<StoredConsent, ConsentError> {
        let consent = consent_of(row);
        let tag: Vec<u8> = row.get(11);
        ring::hmac::verify(&self.pseudonyms.row_key(), &tag_input(&consent)?, &tag).map_err(
            |_| ConsentError::Corrupt {
                id: consent.consent_id.clone(),
                reason: "its tag does not authenticate it: it was not written by a replica (or was altered since)".into(),
            },
        )?;
        Ok(consent)
    }

    /// The rows' consents whose tags hold; the others are logged.
    fn authentic(
        &self,
        rows: &[onceonly_store_postgres::tokio_postgres::Row],
    ) -> Vec<StoredConsent> {
        rows.iter()
            .filter_map(|row| {
                self.authenticated(row)
                    .map_err(|e| tracing::error!(error = %e, "a consent row was ignored"))
                    .ok()
            })
            .collect()
    }

    fn subject_prefix(&self, subject: &SubjectId) -> Vec<u8> {
        self.pseudonyms.pseudonym(subject.scheme, &subject.value)
    }

    /// A fresh consent id.
    pub fn new_consent_id() -> String {
        let mut id = [0u8; 12];
        rand::rng().fill_bytes(&mut id);
        format!("cns-{}", hex::encode(id))
    }

    /// Records consent `consent_id` (from [`ConsentStore::new_consent_id`])
    /// durably.
    pub async fn grant(
        &self,
        consent_id: String,
        new: NewConsent,
        now_ms: i64,
    ) -> Result<StoredConsent, ConsentError> {
        let subject_sealed = self
            .pseudonyms
            .seal(&consent_id, new.subject.scheme, &new.subject.value)
            .map_err(|e| ConsentError::Storage(e.to_string()))?;
        let consent = StoredConsent {
            subject_scheme: new.subject.scheme,
            subject_pseudonym: hex::encode(self.subject_prefix(&new.subject)),
            subject_sealed,
            consent_id,
            authority_id: new.authority_id,
            evidence_type: new.evidence_type,
            purpose: new.purpose,
            granted_at_ms: now_ms,
            expires_at_ms: new.expires_at_ms,
            revoked_at_ms: None,
            recorded_by: new.recorded_by,
        };
        let (db, consents, by_subject) = match &self.backend {
            Backend::Sled {
                db,
                consents,
                by_subject,
            } => (db, consents, by_subject),
            Backend::Postgres(_) => {
                self.import(&consent, false).await?;
                return Ok(consent);
            }
        };
        let mut index_key = self.subject_prefix(&new.subject);
        index_key.extend_from_slice(&(u64::MAX - now_ms.max(0) as u64).to_be_bytes());
        index_key.extend_from_slice(consent.consent_id.as_bytes());
        let value =
            serde_json::to_vec(&consent).map_err(|e| ConsentError::Storage(e.to_string()))?;
        consents.insert(consent.consent_id.as_bytes(), value)?;
        by_subject.insert(index_key, consent.consent_id.as_bytes())?;
        db.flush_async().await?;
        Ok(consent)
    }

    /// Every consent of the embedded store (moving a data directory into
    /// PostgreSQL); empty for the PostgreSQL store.
    pub fn all_embedded(&self) -> Result<Vec<StoredConsent>, ConsentError> {
        let Backend::Sled { consents, .. } = &self.backend else {
            return Ok(Vec::new());
        };
        consents
            .iter()
            .map(|entry| {
                let (id, bytes) = entry?;
                serde_json::from_slice(&bytes).map_err(|e| ConsentError::Corrupt {
                    id: String::from_utf8_lossy(&id).into_owned(),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// Writes `consent` as it is (its id, times and revocation kept) into
    /// the PostgreSQL store, tagged (moving a data directory into it);
    /// with `if_absent`, a consent of that id already there is kept.
    pub async fn import(
        &self,
        consent: &StoredConsent,
        if_absent: bool,
    ) -> Result<(), ConsentError> {
        let Backend::Postgres(pool) = &self.backend else {
            return Err(ConsentError::Storage(
                "consents are imported into the PostgreSQL store only".into(),
            ));
        };
        let tag = self.tag(consent)?;
        let c = consent;
        let client = Self::client(pool).await?;
        let stored = client
            .execute(
                &format!(
                    "INSERT INTO consents ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12){}",
                    if if_absent { " ON CONFLICT (consent_id) DO NOTHING" } else { "" }
                ),
                &[
                    &c.consent_id,
                    &c.subject_scheme,
                    &c.subject_pseudonym,
                    &c.subject_sealed,
                    &c.authority_id,
                    &c.evidence_type,
                    &c.purpose,
                    &c.granted_at_ms,
                    &c.expires_at_ms,
                    &c.revoked_at_ms,
                    &c.recorded_by,
                    &tag,
                ],
            )
            .await?;
        // One row, or (if_absent) none because the consent is there already.
        let there = stored == 1
            || (if_absent
                && stored == 0
                && client
                    .query_opt(
                        "SELECT 1 FROM consents WHERE consent_id = $1",
                        &[&c.consent_id],
                    )
                    .await?
                    .is_some());
        if !there {
            return Err(not_stored(
                "the grant",
                &c.consent_id,
                &format!("the INSERT stored {stored} rows"),
            ));
        }
        Ok(())
    }

    /// The consent `id`.
    pub async fn get(&self, id: &str) -> Result<Option<StoredConsent>, ConsentError> {
        match &self.backend {
            Backend::Sled { consents, .. } => Self::sled_get(consents, id),
            Backend::Postgres(pool) => Self::client(pool)
                .await?
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM consents WHERE consent_id = $1"),
                    &[&id],
                )
                .await?
                .as_ref()
                .map(|row| self.authenticated(row))
                .transpose(),
        }
    }

    fn sled_get(consents: &sled::Tree, id: &str) -> Result<Option<StoredConsent>, ConsentError> {
        consents
            .get(id.as_bytes())?
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| ConsentError::Corrupt {
                    id: id.to_owned(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    /// Revokes consent `id` durably; an already revoked consent keeps its
    /// first revocation time.
    pub async fn revoke(&self, id: &str, now_ms: i64) -> Result<StoredConsent, ConsentError> {
        let (db, consents) = match &self.backend {
            Backend::Sled { db, consents, .. } => (db, consents),
            Backend::Postgres(pool) => {
                // Read, check and re-tag under the row's lock.
                let mut client = Self::client(pool).await?;
                let tx = client.transaction().await?;
                let row = tx
                    .query_opt(
                        &format!("SELECT {COLUMNS} FROM consents WHERE consent_id = $1 FOR UPDATE"),
                        &[&id],
                    )
                    .await?
                    .ok_or_else(|| ConsentError::NotFound(id.to_owned()))?;
                let mut consent = self.authenticated(&row)?;
                if consent.revoked_at_ms.is_none() {
                    consent.revoked_at_ms = Some(now_ms);
                    let tag = self.tag(&consent)?;
                    // What the table kept, not what was sent: the portal is
                    // told "revoked" only where the row says so.
                    let stored = tx
                        .query_opt(
                            "UPDATE consents SET revoked_at_ms = $2, mac = $3 WHERE consent_id = $1
                             RETURNING revoked_at_ms, mac",
                            &[&id, &now_ms, &tag],
                        )
                        .await?;
                    match stored {
                        None => {
                            return Err(not_stored(
                                "the revocation",
                                id,
                                "the UPDATE changed no row",
                            ));
                        }
                        Some(row)
                            if row.get::<_, Option<i64>>(0) != Some(now_ms)
                                || row.get::<_, Vec<u8>>(1) != tag =>
                        {
                            return Err(not_stored(
                                "the revocation",
                                id,
                                "the UPDATE stored other values than it was given",
                            ));
                        }
                        Some(_) => {}
                    }
                }
                tx.commit().await?;
                return Ok(consent);
            }
        };
        // Compare and swap, so that bytes that do not decode are reported
        // and kept, never replaced or deleted.
        let consent = loop {
            let Some(old) = consents.get(id.as_bytes())? else {
                return Err(ConsentError::NotFound(id.to_owned()));
            };
            let mut consent: StoredConsent =
                serde_json::from_slice(&old).map_err(|e| ConsentError::Corrupt {
                    id: id.to_owned(),
                    reason: e.to_string(),
                })?;
            consent.revoked_at_ms.get_or_insert(now_ms);
            let new =
                serde_json::to_vec(&consent).map_err(|e| ConsentError::Storage(e.to_string()))?;
            match consents.compare_and_swap(id.as_bytes(), Some(old), Some(new))? {
                Ok(()) => break consent,
                // Changed in between (another revocation): read again.
                Err(_) => continue,
            }
        };
        db.flush_async().await?;
        Ok(consent)
    }

    /// The subject a stored consent names, opened from its sealed form.
    pub fn subject_of(&self, consent: &StoredConsent) -> Result<SubjectId, ConsentError> {
        let (scheme, value) = self
            .pseudonyms
            .open(&consent.consent_id, &consent.subject_sealed)
            .map_err(|e| ConsentError::Corrupt {
                id: consent.consent_id.clone(),
                reason: e.to_string(),
            })?;
        Ok(SubjectId { scheme, value })
    }

    /// A subject's consents, newest first: up to `limit` after `skip`.
    pub async fn list(
        &self,
        subject: &SubjectId,
        skip: usize,
        limit: usize,
    ) -> Result<(Vec<StoredConsent>, bool), ConsentError> {
        let (consents, by_subject) = match &self.backend {
            Backend::Sled {
                consents,
                by_subject,
                ..
            } => (consents, by_subject),
            Backend::Postgres(pool) => {
                let rows = Self::client(pool)
                    .await?
                    .query(
                        &format!(
                            "SELECT {COLUMNS} FROM consents WHERE subject_pseudonym = $1
                             ORDER BY granted_at_ms DESC, consent_id OFFSET $2 LIMIT $3"
                        ),
                        &[
                            &hex::encode(self.subject_prefix(subject)),
                            &(skip as i64),
                            &(limit as i64 + 1),
                        ],
                    )
                    .await?;
                let more = rows.len() > limit;
                let mut found = self.authentic(&rows);
                found.truncate(limit);
                return Ok((found, more));
            }
        };
        let mut found = Vec::new();
        let mut more = false;
        for entry in by_subject
            .scan_prefix(self.subject_prefix(subject))
            .skip(skip)
        {
            let (_, id) = entry?;
            if found.len() == limit {
                more = true;
                break;
            }
            if let Some(consent) = Self::sled_get(consents, &String::from_utf8_lossy(&id))? {
                found.push(consent);
            }
        }
        Ok((found, more))
    }

    /// An active consent covering the request, if any. With `consent_id`,
    /// only that consent is considered.
    pub async fn find_active(
        &self,
        subject: &SubjectId,
        authority_id: &str,
        evidence_type: &str,
        purpose: &str,
        consent_id: Option<&str>,
        now_ms: i64,
    ) -> Result<Option<StoredConsent>, ConsentError> {
        let pseudonym = hex::encode(self.subject_prefix(subject));
        let covers = |c: &StoredConsent| {
            c.subject_scheme == subject.scheme
                && c.subject_pseudonym == pseudonym
                && c.authority_id == authority_id
                && c.evidence_type == evidence_type
                && c.purpose == purpose
                && c.state(now_ms) == ConsentState::Active
        };
        if let Some(id) = consent_id {
            return Ok(self.get(id).await?.filter(covers));
        }
        let (consents, by_subject) = match &self.backend {
            Backend::Sled {
                consents,
                by_subject,
                ..
            } => (consents, by_subject),
            Backend::Postgres(pool) => {
                let rows = Self::client(pool)
                    .await?
                    .query(
                        &format!(
                            "SELECT {COLUMNS} FROM consents
                             WHERE subject_pseudonym = $1 AND subject_scheme = $2
                               AND authority_id = $3 AND evidence_type = $4 AND purpose = $5
                               AND revoked_at_ms IS NULL AND expires_at_ms > $6
                             ORDER BY granted_at_ms DESC, consent_id"
                        ),
                        &[
                            &pseudonym,
                            &subject.scheme,
                            &authority_id,
                            &evidence_type,
                            &purpose,
                            &now_ms,
                        ],
                    )
                    .await?;
                return Ok(self.authentic(&rows).into_iter().find(covers));
            }
        };
        for entry in by_subject.scan_prefix(self.subject_prefix(subject)) {
            let (_, id) = entry?;
            if let Some(consent) = Self::sled_get(consents, &String::from_utf8_lossy(&id))?
                && covers(&consent)
            {
                return Ok(Some(consent));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(value: &str) -> SubjectId {
        SubjectId {
            scheme: 1,
            value: value.into(),
        }
    }

    #[tokio::test]
    async fn revoking_a_consent_that_does_not_decode_fails_and_keeps_its_bytes() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let store =
            ConsentStore::open(&db, Arc::new(Pseudonymiser::from_secret(&[1; 32]))).expect("store");
        let garbage = b"{not json".to_vec();
        let Backend::Sled { consents, .. } = &store.backend else {
            panic!("sled")
        };
        consents
            .insert("c-broken", garbage.clone())
            .expect("insert");
        let error = store.revoke("c-broken", 5).await.expect_err("corrupt");
        assert!(
            matches!(&error, ConsentError::Corrupt { id, .. } if id == "c-broken"),
            "{error:?}"
        );
        assert_eq!(
            consents.get("c-broken").expect("read").map(|b| b.to_vec()),
            Some(garbage),
            "the undecodable consent was changed or deleted"
        );
        assert!(matches!(
            store.revoke("c-missing", 5).await,
            Err(ConsentError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn grant_find_revoke_and_expire() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let store =
            ConsentStore::open(&db, Arc::new(Pseudonymiser::from_secret(&[1; 32]))).expect("store");
        let anna = subject("82281866209");
        let new = NewConsent {
            subject: anna.clone(),
            authority_id: "spiffe://t/authority/a".into(),
            evidence_type: "proof-of-residence".into(),
            purpose: "parental-allowance".into(),
            expires_at_ms: 10_000,
            recorded_by: "spiffe://t/portal/p".into(),
        };
        let consent = store
            .grant(ConsentStore::new_consent_id(), new.clone(), 1_000)
            .await
            .expect("grant");
        let find = async |now| {
            store
                .find_active(
                    &anna,
                    "spiffe://t/authority/a",
                    "proof-of-residence",
                    "parental-allowance",
                    None,
                    now,
                )
                .await
                .expect("find")
        };
        assert_eq!(
            find(2_000).await.map(|c| c.consent_id),
            Some(consent.consent_id.clone())
        );
        assert_eq!(find(10_000).await, None, "expired");
        assert!(
            store
                .find_active(
                    &anna,
                    "spiffe://t/authority/b",
                    "proof-of-residence",
                    "parental-allowance",
                    None,
                    2_000
                )
                .await
                .expect("find")
                .is_none(),
            "another authority"
        );
        assert!(
            store
                .find_active(
                    &anna,
                    "spiffe://t/authority/a",
                    "proof-of-residence",
                    "other-purpose",
                    None,
                    2_000
                )
                .await
                .expect("find")
                .is_none(),
            "another purpose"
        );

        let revoked = store
            .revoke(&consent.consent_id, 3_000)
            .await
            .expect("revoke");
        assert_eq!(revoked.revoked_at_ms, Some(3_000));
        assert_eq!(find(3_001).await, None, "revoked");
        let again = store
            .revoke(&consent.consent_id, 4_000)
            .await
            .expect("revoke again");
        assert_eq!(
            again.revoked_at_ms,
            Some(3_000),
            "first revocation time kept"
        );
        assert!(matches!(
            store.revoke("cns-nope", 1).await,
            Err(ConsentError::NotFound(_))
        ));

        let newer = store
            .grant(ConsentStore::new_consent_id(), new, 5_000)
            .await
            .expect("grant");
        let (listed, more) = store.list(&anna, 0, 10).await.expect("list");
        assert!(!more);
        assert_eq!(
            listed
                .iter()
                .map(|c| c.consent_id.clone())
                .collect::<Vec<_>>(),
            [newer.consent_id, consent.consent_id]
        );
        assert!(
            store
                .list(&subject("21641045750"), 0, 10)
                .await
                .expect("list")
                .0
                .is_empty()
        );
    }
}
