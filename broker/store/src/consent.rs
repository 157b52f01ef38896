//! Consents as stored: a subject agreed that an authority may fetch an
//! evidence type about them for a purpose until a time.
//!
//! A store keeps them as they are given; pseudonymising and sealing the
//! subject happen above it (the broker's `consent` module). Every row a
//! store keeps carries a tag ([`tag`]) under a key the broker holds and
//! the storage does not, over all its fields: a row written or edited by
//! anyone but the broker does not count, in sled as in PostgreSQL.

use onceonly_proto::v1::ConsentState;
use ring::hmac;
use serde::{Deserialize, Serialize};

/// A stored consent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredConsent {
    /// Its id.
    pub consent_id: String,
    /// Subject scheme (enum value).
    pub subject_scheme: i32,
    /// The subject's pseudonym (hex), for matching requests.
    pub subject_pseudonym: String,
    /// The subject id, sealed under a key derived from the pseudonym key:
    /// a consent is a legal record that must name its person, but a copied
    /// store must not reveal whom.
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
}

/// What a request needs a consent for.
#[derive(Debug, Clone, Copy)]
pub struct ConsentQuery<'a> {
    /// Subject scheme (enum value).
    pub subject_scheme: i32,
    /// The subject's pseudonym (hex).
    pub subject_pseudonym: &'a str,
    /// The authority's SPIFFE id.
    pub authority_id: &'a str,
    /// The evidence type.
    pub evidence_type: &'a str,
    /// The purpose.
    pub purpose: &'a str,
}

impl ConsentQuery<'_> {
    /// Whether `consent` is active at `now_ms` and covers this request.
    pub fn covered_by(&self, consent: &StoredConsent, now_ms: i64) -> bool {
        consent.subject_scheme == self.subject_scheme
            && consent.subject_pseudonym == self.subject_pseudonym
            && consent.authority_id == self.authority_id
            && consent.evidence_type == self.evidence_type
            && consent.purpose == self.purpose
            && consent.state(now_ms) == ConsentState::Active
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
    /// A stored consent cannot be read, or its tag does not hold; its
    /// bytes are left as they are for the operator to inspect.
    #[error("stored consent {id:?} cannot be used ({reason}); it was left unchanged")]
    Corrupt {
        /// The consent id.
        id: String,
        /// Why.
        reason: String,
    },
}

/// Persists consents; every implementation authenticates its rows.
#[async_trait::async_trait]
pub trait ConsentStore: Send + Sync {
    /// Stores a new consent durably.
    async fn insert(&self, consent: &StoredConsent) -> Result<(), ConsentError>;

    /// Stores `consent` as it is (moving a data directory): Ok(false)
    /// where a consent of that id is there already (kept as it is).
    async fn import(&self, consent: &StoredConsent) -> Result<bool, ConsentError>;

    /// The consent `id`, where its tag holds.
    async fn get(&self, id: &str) -> Result<Option<StoredConsent>, ConsentError>;

    /// Revokes consent `id` durably; an already revoked consent keeps its
    /// first revocation time. Ok only where the store kept the revocation.
    async fn revoke(&self, id: &str, now_ms: i64) -> Result<StoredConsent, ConsentError>;

    /// The consents of the subject with pseudonym `pseudonym` (hex), newest
    /// first: up to `limit` after `skip`, and whether there are more.
    async fn list(
        &self,
        pseudonym: &str,
        skip: usize,
        limit: usize,
    ) -> Result<(Vec<StoredConsent>, bool), ConsentError>;

    /// The newest consent active at `now_ms` that covers `query`, if any.
    async fn find_active(
        &self,
        query: &ConsentQuery<'_>,
        now_ms: i64,
    ) -> Result<Option<StoredConsent>, ConsentError>;

    /// Every consent, each checked: Err naming the first that fails its
    /// check (moving a data directory refuses to carry such a row).
    async fn all(&self) -> Result<Vec<StoredConsent>, ConsentError>;
}

/// The bytes a consent's tag covers: every field, revocation included.
fn tag_input(consent: &StoredConsent) -> Result<Vec<u8>, ConsentError> {
    let mut input = b"onceonly-consent-row-v1\0".to_vec();
    input.extend(serde_json::to_vec(consent).map_err(|e| ConsentError::Storage(e.to_string()))?);
    Ok(input)
}

/// A consent's tag under `key` (the row key every replica shares).
pub fn tag(key: &hmac::Key, consent: &StoredConsent) -> Result<Vec<u8>, ConsentError> {
    Ok(hmac::sign(key, &tag_input(consent)?).as_ref().to_vec())
}

/// `consent` where `tag` authenticates it under `key`.
pub fn authenticated(
    key: &hmac::Key,
    consent: StoredConsent,
    tag: &[u8],
) -> Result<StoredConsent, ConsentError> {
    match hmac::verify(key, &tag_input(&consent)?, tag) {
        Ok(()) => Ok(consent),
        Err(_) => Err(ConsentError::Corrupt {
            id: consent.consent_id,
            reason: "its tag does not authenticate it: it was not written by the broker (or was altered since)".into(),
        }),
    }
}

/// The consents among `checked` that passed; the others are logged and
/// left out (a forged row must not hide the genuine ones beside it).
pub fn authentic(
    checked: impl IntoIterator<Item = Result<StoredConsent, ConsentError>>,
) -> Vec<StoredConsent> {
    checked
        .into_iter()
        .filter_map(|consent| {
            consent
                .map_err(|e| tracing::error!(error = %e, "a consent row was ignored"))
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consent() -> StoredConsent {
        StoredConsent {
            consent_id: "cns-1".into(),
            subject_scheme: 1,
            subject_pseudonym: "ab".into(),
            subject_sealed: "sealed".into(),
            authority_id: "spiffe://t/authority/a".into(),
            evidence_type: "birth-certificate".into(),
            purpose: "p".into(),
            granted_at_ms: 1,
            expires_at_ms: 10,
            revoked_at_ms: None,
            recorded_by: "spiffe://t/portal/p".into(),
        }
    }

    #[test]
    fn a_tag_covers_every_field_and_only_its_key_makes_it() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]);
        let c = consent();
        let t = tag(&key, &c).expect("tag");
        assert_eq!(authenticated(&key, c.clone(), &t).expect("holds"), c);
        let mut revoked = c.clone();
        revoked.revoked_at_ms = Some(5);
        assert!(matches!(
            authenticated(&key, revoked, &t),
            Err(ConsentError::Corrupt { .. })
        ));
        let other = hmac::Key::new(hmac::HMAC_SHA256, &[8; 32]);
        assert!(authenticated(&other, c, &t).is_err());
    }
}
