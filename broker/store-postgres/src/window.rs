//! The request window in PostgreSQL (table `idempotency`, migration 1):
//! the first replica to claim a request id runs the exchange; a repeat at
//! any replica gets its outcome, sealed under a key replicas hold and the
//! database does not, and bound to its claim.

use std::time::Duration;

use onceonly_proto::v1::{ExchangeOutcome, RequestEvidenceResponse};
use onceonly_store::{Claim, RequestWindow, RowKeys, StoredOutcome, StoredStatus, WindowError};
use prost::Message;

use crate::Pool;

/// An outcome as sealed in the shared window.
#[derive(Clone, PartialEq, prost::Message)]
struct SealedOutcome {
    #[prost(string, tag = "1")]
    exchange_id: String,
    #[prost(message, optional, tag = "2")]
    response: Option<RequestEvidenceResponse>,
    #[prost(int32, tag = "3")]
    code: i32,
    #[prost(string, tag = "4")]
    message: String,
    #[prost(bytes = "vec", tag = "5")]
    details: Vec<u8>,
    #[prost(int32, tag = "6")]
    outcome: i32,
    #[prost(bool, tag = "7")]
    refused: bool,
}

/// The request window in PostgreSQL (table `idempotency`), shared by
/// replicas.
pub struct PgWindow {
    pool: Pool,
    sealing: RowKeys,
    window: Duration,
    /// A claim with no outcome after this is the claimant's crash: taken
    /// over.
    stale_after: Duration,
    timeout: Duration,
}

/// What a sealed outcome is bound to: its claim (caller, request id and
/// the exchange that claimed it), so a database writer cannot move an
/// outcome to another claim.
fn context(caller: &str, request_id: &str, exchange_id: &str) -> Vec<u8> {
    let mut context = b"onceonly-idempotency-v1\0".to_vec();
    for part in [caller, request_id, exchange_id] {
        context.extend_from_slice(&(part.len() as u32).to_be_bytes());
        context.extend_from_slice(part.as_bytes());
    }
    context
}

impl PgWindow {
    /// The window in `pool`'s database; outcomes sealed under a key of
    /// `sealing`; a claim without an outcome for `stale_after` (longer
    /// than any exchange may run) is taken over.
    pub fn new(
        pool: Pool,
        sealing: RowKeys,
        window: Duration,
        stale_after: Duration,
        timeout: Duration,
    ) -> Self {
        PgWindow {
            pool,
            sealing,
            window,
            stale_after,
            timeout,
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, WindowError> {
        Ok(tokio::time::timeout(self.timeout, self.pool.get()).await??)
    }

    fn open(
        &self,
        caller: &str,
        request_id: &str,
        exchange_id: &str,
        bytes: &[u8],
    ) -> Option<StoredOutcome> {
        let plain = self
            .sealing
            .open_outcome(&context(caller, request_id, exchange_id), bytes)
            .map_err(|e| tracing::error!(error = %e, "a shared outcome does not open"))
            .ok()?;
        let sealed = SealedOutcome::decode(plain.as_slice())
            .map_err(|e| tracing::error!(error = %e, "a shared outcome does not decode"))
            .ok()?;
        let result = if sealed.refused {
            Err(StoredStatus {
                code: tonic::Code::from_i32(sealed.code),
                message: sealed.message,
                details: sealed.details,
                outcome: ExchangeOutcome::try_from(sealed.outcome)
                    .unwrap_or(ExchangeOutcome::Failed),
            })
        } else {
            Ok(sealed.response.unwrap_or_default())
        };
        Some(StoredOutcome {
            exchange_id: sealed.exchange_id,
            result,
        })
    }
}

#[onceonly_store::async_trait]
impl RequestWindow for PgWindow {
    async fn claim(
        &self,
        caller: &str,
        request_id: &str,
        fingerprint: &[u8; 32],
        exchange_id: &str,
    ) -> Result<Claim, WindowError> {
        let client = self.client().await?;
        let window = self.window.as_millis() as i64;
        let stale = self.stale_after.as_millis() as i64;
        // New, expired, or claimed and abandoned (no outcome long past any
        // deadline): ours. Times are the database's, one clock for all.
        // Prepared once per connection: this runs for every request.
        let claim = client
            .prepare_cached(
                "WITH clock AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms)
                 INSERT INTO idempotency AS i
                     (caller_id, request_id, fingerprint, exchange_id, outcome_sealed, started_at_ms, expires_at_ms)
                 SELECT $1, $2, $3, $4, NULL, clock.now_ms, clock.now_ms + $5 FROM clock
                 ON CONFLICT (caller_id, request_id) DO UPDATE
                   SET fingerprint = EXCLUDED.fingerprint, exchange_id = EXCLUDED.exchange_id,
                       outcome_sealed = NULL, started_at_ms = EXCLUDED.started_at_ms,
                       expires_at_ms = EXCLUDED.expires_at_ms
                   WHERE i.expires_at_ms <= EXCLUDED.started_at_ms
                      OR (i.outcome_sealed IS NULL AND i.started_at_ms < EXCLUDED.started_at_ms - $6)
                 RETURNING exchange_id",
            )
            .await?;
        let claimed = client
            .query_opt(
                &claim,
                &[
                    &caller,
                    &request_id,
                    &fingerprint.as_slice(),
                    &exchange_id,
                    &window,
                    &stale,
                ],
            )
            .await?;
        if claimed.is_some() {
            return Ok(Claim::Ours);
        }
        let Some(row) = client
            .query_opt(
                "SELECT fingerprint, exchange_id FROM idempotency WHERE caller_id = $1 AND request_id = $2",
                &[&caller, &request_id],
            )
            .await?
        else {
            // Released in between: the caller's retry loop runs it as new.
            return Ok(Claim::Theirs {
                exchange_id: String::new(),
            });
        };
        let theirs: Vec<u8> = row.get(0);
        Ok(if theirs == fingerprint {
            Claim::Theirs {
                exchange_id: row.get(1),
            }
        } else {
            Claim::Conflict
        })
    }

    /// Stores the final outcome of `exchange_id`'s claim, sealed; logged
    /// where it fails (repeats elsewhere then run again after the claim
    /// goes stale, and find it audited as a new exchange).
    async fn store(
        &self,
        caller: &str,
        request_id: &str,
        exchange_id: &str,
        outcome: &StoredOutcome,
    ) {
        let sealed = SealedOutcome {
            exchange_id: outcome.exchange_id.clone(),
            response: outcome.result.as_ref().ok().cloned(),
            code: outcome.result.as_ref().err().map_or(0, |s| s.code as i32),
            message: outcome
                .result
                .as_ref()
                .err()
                .map(|s| s.message.clone())
                .unwrap_or_default(),
            details: outcome
                .result
                .as_ref()
                .err()
                .map(|s| s.details.clone())
                .unwrap_or_default(),
            outcome: outcome
                .result
                .as_ref()
                .err()
                .map_or(0, |s| s.outcome as i32),
            refused: outcome.result.is_err(),
        };
        let result: Result<(), WindowError> = async {
            let bytes = self
                .sealing
                .seal_outcome(&context(caller, request_id, exchange_id), &sealed.encode_to_vec())?;
            let client = self.client().await?;
            let store = client
                .prepare_cached(
                    "UPDATE idempotency SET outcome_sealed = $4
                     WHERE caller_id = $1 AND request_id = $2 AND exchange_id = $3",
                )
                .await?;
            let updated = client
                .execute(&store, &[&caller, &request_id, &exchange_id, &bytes])
                .await?;
            if updated == 0 {
                return Err("the claim is gone (taken over as stale, or expired) before its outcome was stored".into());
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %crate::describe(e.as_ref()), "could not store the outcome in the shared idempotency window");
        }
    }

    async fn release(&self, caller: &str, request_id: &str, exchange_id: &str) {
        let result: Result<u64, WindowError> = async {
            Ok(self
                .client()
                .await?
                .execute(
                    "DELETE FROM idempotency
                     WHERE caller_id = $1 AND request_id = $2 AND exchange_id = $3 AND outcome_sealed IS NULL",
                    &[&caller, &request_id, &exchange_id],
                )
                .await?)
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %crate::describe(e.as_ref()), "could not release a claim in the shared idempotency window");
        }
    }

    /// Waits for the outcome of `exchange_id`'s claim; None where the claim
    /// was released (or taken over) without one.
    async fn wait(
        &self,
        caller: &str,
        request_id: &str,
        exchange_id: &str,
    ) -> Option<StoredOutcome> {
        if exchange_id.is_empty() {
            return None;
        }
        let mut pause = Duration::from_millis(5);
        loop {
            let row = match self.client().await {
                Ok(client) => client
                    .query_opt(
                        "SELECT exchange_id, outcome_sealed FROM idempotency
                         WHERE caller_id = $1 AND request_id = $2",
                        &[&caller, &request_id],
                    )
                    .await
                    .map_err(
                        |e| tracing::warn!(error = %crate::describe(&e), "reading the shared idempotency window"),
                    ),
                Err(e) => {
                    tracing::warn!(error = %crate::describe(e.as_ref()), "reading the shared idempotency window");
                    Err(())
                }
            };
            match row {
                Ok(None) => return None,
                Ok(Some(row)) if row.get::<_, String>(0) != exchange_id => return None,
                Ok(Some(row)) => {
                    if let Some(bytes) = row.get::<_, Option<Vec<u8>>>(1) {
                        return self.open(caller, request_id, exchange_id, &bytes);
                    }
                }
                Err(()) => {}
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Forgets claims past the window (any replica may; each runs it now
    /// and then).
    async fn sweep(&self) -> Result<u64, WindowError> {
        Ok(self
            .client()
            .await?
            .execute(
                "DELETE FROM idempotency
                 WHERE expires_at_ms <= (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                &[],
            )
            .await?)
    }
}
