//! Consents in PostgreSQL (table `consents`, migration 1), shared by
//! replicas: a consent granted or revoked through one replica holds at
//! every other from the moment it is answered. Every row carries a tag
//! ([`onceonly_store::consent::tag`]) under the key replicas hold and the
//! database does not, and every write's effect is checked as it is made
//! (its row count, what RETURNING gives back): a BEFORE trigger that skips
//! or rewrites a write makes the call fail, not succeed silently. A change
//! undone afterwards (an AFTER trigger, an old row written back with its
//! old tag) is caught above the store: brokers take revocations from the
//! signed audit log as well (the broker's `revocations` module).

use onceonly_store::consent::{self, ConsentError, ConsentQuery, ConsentStore, StoredConsent};
use ring::hmac;
use tokio_postgres::Row;

use crate::Pool;

const COLUMNS: &str = "consent_id, subject_scheme, subject_pseudonym, subject_sealed, authority_id, evidence_type, purpose, granted_at_ms, expires_at_ms, revoked_at_ms, recorded_by, mac";

fn storage(e: impl std::error::Error) -> ConsentError {
    ConsentError::Storage(format!("PostgreSQL: {}", crate::describe(&e)))
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

/// The consents table, its rows tagged under the replicas' row key.
#[derive(Clone)]
pub struct PgConsents {
    pool: Pool,
    key: hmac::Key,
}

impl PgConsents {
    /// The table in `pool`'s (migrated) database.
    pub fn new(pool: Pool, row_key: hmac::Key) -> Self {
        PgConsents { pool, key: row_key }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, ConsentError> {
        self.pool.get().await.map_err(storage)
    }

    /// The row's consent, where its tag holds.
    fn checked(&self, row: &Row) -> Result<StoredConsent, ConsentError> {
        let consent = StoredConsent {
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
        };
        let tag: Vec<u8> = row.get(11);
        consent::authenticated(&self.key, consent, &tag)
    }

    /// Inserts `c` tagged; with `if_absent`, a consent of that id already
    /// there is kept (Ok(false)).
    async fn write(&self, c: &StoredConsent, if_absent: bool) -> Result<bool, ConsentError> {
        let tag = consent::tag(&self.key, c)?;
        let client = self.client().await?;
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
            .await
            .map_err(storage)?;
        if stored == 1 {
            return Ok(true);
        }
        // None stored: with if_absent because the consent is there already.
        if if_absent
            && stored == 0
            && client
                .query_opt(
                    "SELECT 1 FROM consents WHERE consent_id = $1",
                    &[&c.consent_id],
                )
                .await
                .map_err(storage)?
                .is_some()
        {
            return Ok(false);
        }
        Err(not_stored(
            "the grant",
            &c.consent_id,
            &format!("the INSERT stored {stored} rows"),
        ))
    }
}

#[onceonly_store::async_trait]
impl ConsentStore for PgConsents {
    async fn insert(&self, consent: &StoredConsent) -> Result<(), ConsentError> {
        self.write(consent, false).await.map(|_| ())
    }

    async fn import(&self, consent: &StoredConsent) -> Result<bool, ConsentError> {
        self.write(consent, true).await
    }

    async fn get(&self, id: &str) -> Result<Option<StoredConsent>, ConsentError> {
        self.client()
            .await?
            .query_opt(
                &format!("SELECT {COLUMNS} FROM consents WHERE consent_id = $1"),
                &[&id],
            )
            .await
            .map_err(storage)?
            .as_ref()
            .map(|row| self.checked(row))
            .transpose()
    }

    async fn revoke(&self, id: &str, now_ms: i64) -> Result<StoredConsent, ConsentError> {
        // Read, check and re-tag under the row's lock.
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(storage)?;
        let row = tx
            .query_opt(
                &format!("SELECT {COLUMNS} FROM consents WHERE consent_id = $1 FOR UPDATE"),
                &[&id],
            )
            .await
            .map_err(storage)?
            .ok_or_else(|| ConsentError::NotFound(id.to_owned()))?;
        let mut consent = self.checked(&row)?;
        if consent.revoked_at_ms.is_none() {
            consent.revoked_at_ms = Some(now_ms);
            let tag = consent::tag(&self.key, &consent)?;
            // What the table kept, not what was sent: the portal is told
            // "revoked" only where the row says so.
            let stored = tx
                .query_opt(
                    "UPDATE consents SET revoked_at_ms = $2, mac = $3 WHERE consent_id = $1
                     RETURNING revoked_at_ms, mac",
                    &[&id, &now_ms, &tag],
                )
                .await
                .map_err(storage)?;
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
        tx.commit().await.map_err(storage)?;
        Ok(consent)
    }

    async fn list(
        &self,
        pseudonym: &str,
        skip: usize,
        limit: usize,
    ) -> Result<(Vec<StoredConsent>, bool), ConsentError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM consents WHERE subject_pseudonym = $1
                     ORDER BY granted_at_ms DESC, consent_id OFFSET $2 LIMIT $3"
                ),
                &[&pseudonym, &(skip as i64), &(limit as i64 + 1)],
            )
            .await
            .map_err(storage)?;
        let more = rows.len() > limit;
        let mut found = consent::authentic(rows.iter().map(|row| self.checked(row)));
        found.truncate(limit);
        Ok((found, more))
    }

    async fn find_active(
        &self,
        query: &ConsentQuery<'_>,
        now_ms: i64,
    ) -> Result<Option<StoredConsent>, ConsentError> {
        let rows = self
            .client()
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
                    &query.subject_pseudonym,
                    &query.subject_scheme,
                    &query.authority_id,
                    &query.evidence_type,
                    &query.purpose,
                    &now_ms,
                ],
            )
            .await
            .map_err(storage)?;
        Ok(consent::authentic(rows.iter().map(|row| self.checked(row)))
            .into_iter()
            .find(|c| query.covered_by(c, now_ms)))
    }

    async fn all(&self) -> Result<Vec<StoredConsent>, ConsentError> {
        self.client()
            .await?
            .query(
                &format!("SELECT {COLUMNS} FROM consents ORDER BY consent_id"),
                &[],
            )
            .await
            .map_err(storage)?
            .iter()
            .map(|row| self.checked(row))
            .collect()
    }
}
