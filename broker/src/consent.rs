//! Consents: a subject agreed that an authority may fetch an evidence type
//! about them for a purpose until a time. Revocation takes effect at once:
//! the request path reads the store on every check, so with replicas on
//! PostgreSQL a consent granted or revoked through one replica holds at
//! every other from the moment the grant or revocation is answered.
//!
//! This module names and seals the subject (a pseudonym to match requests
//! by, the id itself sealed so a copied store does not reveal whom) and
//! hands plain rows to the [`ConsentStore`] the broker was opened with
//! (sled, PostgreSQL, or memory), which keeps and authenticates them.

use std::sync::Arc;

use onceonly_proto::time::timestamp;
use onceonly_proto::v1::{Consent, SubjectId};
pub use onceonly_store::consent::{ConsentError, ConsentQuery, ConsentStore, StoredConsent};
use rand::RngCore;

use crate::pseudonym::Pseudonymiser;
use crate::revocations::Revocations;

/// The wire form of `consent` at `now_ms`, naming `subject` (known to the
/// caller, or opened with [`Consents::subject_of`]).
pub fn to_proto(consent: &StoredConsent, now_ms: i64, subject: SubjectId) -> Consent {
    Consent {
        consent_id: consent.consent_id.clone(),
        subject: Some(subject),
        authority_id: consent.authority_id.clone(),
        evidence_type: consent.evidence_type.clone(),
        purpose: consent.purpose.clone(),
        granted_at: Some(timestamp(consent.granted_at_ms)),
        expires_at: Some(timestamp(consent.expires_at_ms)),
        revoked_at: consent.revoked_at_ms.map(timestamp),
        state: consent.state(now_ms) as i32,
        recorded_by: consent.recorded_by.clone(),
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

/// Consents as the services and the request path use them.
#[derive(Clone)]
pub struct Consents {
    store: Arc<dyn ConsentStore>,
    pseudonyms: Arc<Pseudonymiser>,
    revocations: Arc<Revocations>,
}

impl Consents {
    /// Consents kept in `store`, subjects named under `pseudonyms`; a
    /// consent in `revocations` is revoked whatever its row says.
    pub fn new(
        store: Arc<dyn ConsentStore>,
        pseudonyms: Arc<Pseudonymiser>,
        revocations: Arc<Revocations>,
    ) -> Self {
        Consents {
            store,
            pseudonyms,
            revocations,
        }
    }

    /// The revocations known from the log.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// `consent` as the log has it: revoked where the log says so, even if
    /// its row (written back with an old MAC) says otherwise.
    fn as_logged(&self, mut consent: StoredConsent) -> StoredConsent {
        if consent.revoked_at_ms.is_none()
            && let Some(at) = self.revocations.revoked_at(&consent.consent_id)
        {
            tracing::error!(
                consent_id = %consent.consent_id,
                "the consent's row says it is active, but the audit log holds its revocation: the row was written back (someone other than the broker writes to the store); it counts as revoked"
            );
            self.revocations.count_written_back();
            consent.revoked_at_ms = Some(at);
        }
        consent
    }

    fn pseudonym_of(&self, subject: &SubjectId) -> String {
        hex::encode(self.pseudonyms.pseudonym(subject.scheme, &subject.value))
    }

    /// A fresh consent id.
    pub fn new_consent_id() -> String {
        let mut id = [0u8; 12];
        rand::rng().fill_bytes(&mut id);
        format!("cns-{}", hex::encode(id))
    }

    /// Records consent `consent_id` (from [`Consents::new_consent_id`])
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
            subject_pseudonym: self.pseudonym_of(&new.subject),
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
        self.store.insert(&consent).await?;
        Ok(consent)
    }

    /// The consent `id`.
    pub async fn get(&self, id: &str) -> Result<Option<StoredConsent>, ConsentError> {
        Ok(self.store.get(id).await?.map(|c| self.as_logged(c)))
    }

    /// Revokes consent `id` durably; an already revoked consent keeps its
    /// first revocation time. Called once the request to revoke is in the
    /// log: from then on the consent counts as revoked here, also where the
    /// store fails to make the change (the log's readers count it the same).
    pub async fn revoke(&self, id: &str, now_ms: i64) -> Result<StoredConsent, ConsentError> {
        self.revocations.note(id, now_ms);
        self.store.revoke(id, now_ms).await
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
        let (found, more) = self
            .store
            .list(&self.pseudonym_of(subject), skip, limit)
            .await?;
        Ok((found.into_iter().map(|c| self.as_logged(c)).collect(), more))
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
        let pseudonym = self.pseudonym_of(subject);
        let query = ConsentQuery {
            subject_scheme: subject.scheme,
            subject_pseudonym: &pseudonym,
            authority_id,
            evidence_type,
            purpose,
        };
        let found = match consent_id {
            // A named consent that fails its check covers nothing (it is
            // logged): the request lacks a consent, it is not a store fault.
            Some(id) => match self.store.get(id).await {
                Err(ConsentError::Corrupt { id, reason }) => {
                    tracing::error!(consent_id = %id, %reason, "a named consent does not count");
                    None
                }
                other => other?,
            },
            None => self.store.find_active(&query, now_ms).await?,
        };
        let found = found.map(|c| self.as_logged(c));
        match found {
            Some(c) if query.covered_by(&c, now_ms) => Ok(Some(c)),
            // A row written back: another consent may still cover the
            // request (looked for the slow way, as this happens only when
            // the store was tampered with).
            Some(_) if consent_id.is_none() => {
                let mut skip = 0;
                loop {
                    let (page, more) = self.store.list(&pseudonym, skip, 100).await?;
                    skip += page.len();
                    if let Some(c) = page
                        .into_iter()
                        .map(|c| self.as_logged(c))
                        .find(|c| query.covered_by(c, now_ms))
                    {
                        return Ok(Some(c));
                    }
                    if !more {
                        return Ok(None);
                    }
                }
            }
            _ => Ok(None),
        }
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
        let pseudonyms = Arc::new(Pseudonymiser::from_secret(&[1; 32]));
        let store = Consents::new(
            Arc::new(
                onceonly_store::embedded::SledConsents::open(&db, pseudonyms.row_key())
                    .expect("store"),
            ),
            pseudonyms,
            Arc::default(),
        );
        let garbage = b"{not json".to_vec();
        let consents = db.open_tree("consents").expect("tree");
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
        let pseudonyms = Arc::new(Pseudonymiser::from_secret(&[1; 32]));
        // The same scenario against every embedded kind of store.
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::open(dir.path()).expect("db");
        let sled: Arc<dyn ConsentStore> = Arc::new(
            onceonly_store::embedded::SledConsents::open(&db, pseudonyms.row_key()).expect("store"),
        );
        let memory: Arc<dyn ConsentStore> =
            Arc::new(onceonly_store::memory::MemoryConsents::default());
        for backend in [sled, memory] {
            grant_find_revoke_and_expire_in(Consents::new(
                backend,
                pseudonyms.clone(),
                Arc::default(),
            ))
            .await;
        }
    }

    async fn grant_find_revoke_and_expire_in(store: Consents) {
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
            .grant(Consents::new_consent_id(), new.clone(), 1_000)
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
            .grant(Consents::new_consent_id(), new, 5_000)
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
