//! The request window in PostgreSQL (table `idempotency`, migration 1):
//! the first replica to claim a request id runs the exchange; a repeat at
//! any replica gets its outcome, sealed under a key replicas hold and the
//! database does not, and bound to its claim.

use std::time::Duration;

use onceonly_proto::v1::{ExchangeOutcome, RequestEvidenceResponse};
use onceonly_store::{Claim, RequestWindow, RowKeys, StoredOutcome, StoredStatus, WindowError};
use prost::Message;

use crate::Pool;
use crate::batch::{answer_each, ask, in_batches};

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
    timeout: Duration,
    /// Claims waiting for their batch ([`claim_all`]).
    claims: tokio::sync::mpsc::Sender<Asked>,
    /// Outcomes waiting for their batch ([`store_all`]).
    outcomes: tokio::sync::mpsc::Sender<Outcome>,
}

/// Claims at most in one statement.
const MAX_CLAIMS: usize = 256;
/// Statements of claims in flight at once (measured: more gave smaller
/// batches and less throughput under load, fewer more waiting at low load).
const CLAIMS_IN_FLIGHT: usize = 4;
/// Expired request ids one sweep deletes at most.
const SWEPT: i64 = 10_000;
/// Outcomes at most in one statement, and such statements at once.
const MAX_OUTCOMES: usize = 256;
const OUTCOMES_IN_FLIGHT: usize = 4;

/// What a claim does where its request id is held already, in both of the
/// claim's statements: it takes the id over where the holder's claim
/// expired, or was abandoned (no outcome long past any deadline, `$6`).
/// Times are the database's, one clock for all.
macro_rules! take_over {
    () => {
        "
                 ON CONFLICT (caller_id, request_id) DO UPDATE
                   SET fingerprint = EXCLUDED.fingerprint, exchange_id = EXCLUDED.exchange_id,
                       outcome_sealed = NULL, started_at_ms = EXCLUDED.started_at_ms,
                       expires_at_ms = EXCLUDED.expires_at_ms
                   WHERE i.expires_at_ms <= EXCLUDED.started_at_ms
                      OR (i.outcome_sealed IS NULL AND i.started_at_ms < EXCLUDED.started_at_ms - $6)
                 "
    };
}

/// One claim asked of the batcher.
struct Asked {
    caller: String,
    request_id: String,
    fingerprint: [u8; 32],
    exchange_id: String,
    reply: tokio::sync::oneshot::Sender<Result<Claim, String>>,
}

/// One sealed outcome to store in its claim's row.
struct Outcome {
    caller: String,
    request_id: String,
    exchange_id: String,
    sealed: Vec<u8>,
    /// Ok(false): the claim is gone; Err: why nothing was stored.
    reply: tokio::sync::oneshot::Sender<Result<bool, String>>,
}

/// How the batcher claims.
#[derive(Clone)]
struct Claiming {
    pool: Pool,
    window_ms: i64,
    stale_ms: i64,
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
        let (claims, asked) = tokio::sync::mpsc::channel(MAX_CLAIMS * 4);
        let claiming = Claiming {
            pool: pool.clone(),
            window_ms: window.as_millis() as i64,
            stale_ms: stale_after.as_millis() as i64,
            timeout,
        };
        tokio::spawn(in_batches(
            asked,
            MAX_CLAIMS,
            CLAIMS_IN_FLIGHT,
            distinct_request_ids,
            move |now: Vec<Asked>| {
                let claiming = claiming.clone();
                async move {
                    let claims = claim_all(&claiming, &now).await;
                    answer_each(now, claims, |one| one.reply);
                }
            },
        ));
        let (outcomes, to_store) = tokio::sync::mpsc::channel(MAX_OUTCOMES * 4);
        let storing = (pool.clone(), timeout);
        tokio::spawn(in_batches(
            to_store,
            MAX_OUTCOMES,
            OUTCOMES_IN_FLIGHT,
            |_: &mut Vec<Outcome>| Vec::new(),
            move |now: Vec<Outcome>| {
                let (pool, timeout) = storing.clone();
                async move {
                    let stored = store_all(&pool, timeout, &now).await;
                    answer_each(now, stored, |one| one.reply);
                }
            },
        ));
        PgWindow {
            pool,
            sealing,
            timeout,
            claims,
            outcomes,
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

/// A request id twice in one statement would make PostgreSQL refuse it
/// (ON CONFLICT cannot affect a row twice): the second goes in the next
/// statement, and finds the first's claim. The rest in key order, the
/// order in which the statement locks their rows (as the outcomes'
/// statement does): two batches never wait for each other crosswise.
fn distinct_request_ids(batch: &mut Vec<Asked>) -> Vec<Asked> {
    let mut seen = std::collections::HashSet::new();
    let (mut now, next): (Vec<Asked>, Vec<Asked>) = batch
        .drain(..)
        .partition(|a| seen.insert((a.caller.clone(), a.request_id.clone())));
    now.sort_by(|a, b| (&a.caller, &a.request_id).cmp(&(&b.caller, &b.request_id)));
    *batch = now;
    next
}

/// What a claim of content `fingerprint` is, where it was not ours: the
/// holder's (fingerprint, exchange id) as read, if any.
fn held_by(held: Option<(Vec<u8>, String)>, fingerprint: &[u8; 32]) -> Claim {
    match held {
        // Released in between: the caller's retry loop runs it as new.
        None => Claim::Theirs {
            exchange_id: String::new(),
        },
        Some((theirs, exchange_id)) if theirs == fingerprint => Claim::Theirs { exchange_id },
        Some(_) => Claim::Conflict,
    }
}

/// One claim alone, in the statement of one row.
async fn claim_one(claiming: &Claiming, asked: &Asked) -> Result<Claim, WindowError> {
    let work = async {
        let client = claiming.pool.get().await?;
        let claim = client
            .prepare_cached(concat!(
                "WITH clock AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms)
                 INSERT INTO idempotency AS i
                     (caller_id, request_id, fingerprint, exchange_id, outcome_sealed, started_at_ms, expires_at_ms)
                 SELECT $1, $2, $3, $4, NULL, clock.now_ms, clock.now_ms + $5 FROM clock",
                take_over!(),
                "RETURNING exchange_id",
            ))
            .await?;
        let claimed = client
            .query_opt(
                &claim,
                &[
                    &asked.caller,
                    &asked.request_id,
                    &asked.fingerprint.as_slice(),
                    &asked.exchange_id,
                    &claiming.window_ms,
                    &claiming.stale_ms,
                ],
            )
            .await?;
        if claimed.is_some() {
            return Ok::<_, WindowError>(Claim::Ours);
        }
        let held = client
            .query_opt(
                "SELECT fingerprint, exchange_id FROM idempotency WHERE caller_id = $1 AND request_id = $2",
                &[&asked.caller, &asked.request_id],
            )
            .await?
            .map(|row| (row.get(0), row.get(1)));
        Ok(held_by(held, &asked.fingerprint))
    };
    tokio::time::timeout(claiming.timeout, work).await?
}

/// One statement claiming `asked` (distinct request ids), the answers in
/// order.
async fn claim_all(claiming: &Claiming, asked: &[Asked]) -> Result<Vec<Claim>, WindowError> {
    if let [one] = asked {
        return Ok(vec![claim_one(claiming, one).await?]);
    }
    let callers: Vec<&str> = asked.iter().map(|a| a.caller.as_str()).collect();
    let request_ids: Vec<&str> = asked.iter().map(|a| a.request_id.as_str()).collect();
    let fingerprints: Vec<&[u8]> = asked.iter().map(|a| a.fingerprint.as_slice()).collect();
    let exchange_ids: Vec<&str> = asked.iter().map(|a| a.exchange_id.as_str()).collect();
    let work = async {
        let client = claiming.pool.get().await?;
        // New, expired, or claimed and abandoned (no outcome long past any
        // deadline): ours. Times are the database's, one clock for all. A
        // request id not claimed is answered from the row that holds it
        // (as the statement found it). Prepared once per connection.
        let claim = client
            .prepare_cached(concat!(
                "WITH clock AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms),
                 claimed AS (
                   INSERT INTO idempotency AS i
                       (caller_id, request_id, fingerprint, exchange_id, outcome_sealed, started_at_ms, expires_at_ms)
                   SELECT q.caller_id, q.request_id, q.fingerprint, q.exchange_id, NULL, clock.now_ms, clock.now_ms + $5
                   FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[])
                          AS q(caller_id, request_id, fingerprint, exchange_id), clock",
                take_over!(),
                "RETURNING caller_id, request_id)
                 SELECT c.caller_id IS NOT NULL, i.fingerprint, i.exchange_id
                 FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS q(caller_id, request_id, n)
                 LEFT JOIN claimed c ON c.caller_id = q.caller_id AND c.request_id = q.request_id
                 LEFT JOIN idempotency i ON i.caller_id = q.caller_id AND i.request_id = q.request_id
                 ORDER BY q.n",
            ))
            .await?;
        let rows = client
            .query(
                &claim,
                &[
                    &callers,
                    &request_ids,
                    &fingerprints,
                    &exchange_ids,
                    &claiming.window_ms,
                    &claiming.stale_ms,
                ],
            )
            .await?;
        if rows.len() != asked.len() {
            return Err(format!(
                "the claim of {} request ids answered {} rows",
                asked.len(),
                rows.len()
            )
            .into());
        }
        // Not ours, and no row as the statement began: another statement
        // claimed it meanwhile. Read again, as it is now.
        let unseen: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|(_, row)| !row.get::<_, bool>(0) && row.get::<_, Option<Vec<u8>>>(1).is_none())
            .map(|(n, _)| n)
            .collect();
        let mut now_held = std::collections::HashMap::new();
        if !unseen.is_empty() {
            let callers: Vec<&str> = unseen.iter().map(|n| asked[*n].caller.as_str()).collect();
            let ids: Vec<&str> = unseen
                .iter()
                .map(|n| asked[*n].request_id.as_str())
                .collect();
            for row in client
                .query(
                    "SELECT i.caller_id, i.request_id, i.fingerprint, i.exchange_id
                     FROM idempotency i
                     JOIN unnest($1::text[], $2::text[]) AS q(caller_id, request_id)
                       ON i.caller_id = q.caller_id AND i.request_id = q.request_id",
                    &[&callers, &ids],
                )
                .await?
            {
                now_held.insert(
                    (row.get::<_, String>(0), row.get::<_, String>(1)),
                    (row.get::<_, Vec<u8>>(2), row.get::<_, String>(3)),
                );
            }
        }
        Ok::<_, WindowError>(
            rows.iter()
                .zip(asked)
                .map(|(row, asked)| {
                    if row.get::<_, bool>(0) {
                        return Claim::Ours;
                    }
                    let held = row
                        .get::<_, Option<Vec<u8>>>(1)
                        .map(|f| (f, row.get::<_, Option<String>>(2).unwrap_or_default()))
                        .or_else(|| {
                            now_held
                                .get(&(asked.caller.clone(), asked.request_id.clone()))
                                .cloned()
                        });
                    held_by(held, &asked.fingerprint)
                })
                .collect(),
        )
    };
    tokio::time::timeout(claiming.timeout, work).await?
}

/// Stores `outcomes` (one per claim) in one statement; per outcome whether
/// its claim's row took it (false: the claim is gone).
async fn store_all(
    pool: &Pool,
    timeout: Duration,
    outcomes: &[Outcome],
) -> Result<Vec<bool>, WindowError> {
    let work = async {
        let client = pool.get().await?;
        if let [one] = outcomes {
            let store = client
                .prepare_cached(
                    "UPDATE idempotency SET outcome_sealed = $4
                     WHERE caller_id = $1 AND request_id = $2 AND exchange_id = $3",
                )
                .await?;
            let updated = client
                .execute(
                    &store,
                    &[&one.caller, &one.request_id, &one.exchange_id, &one.sealed],
                )
                .await?;
            return Ok(vec![updated == 1]);
        }
        let callers: Vec<&str> = outcomes.iter().map(|o| o.caller.as_str()).collect();
        let request_ids: Vec<&str> = outcomes.iter().map(|o| o.request_id.as_str()).collect();
        let exchange_ids: Vec<&str> = outcomes.iter().map(|o| o.exchange_id.as_str()).collect();
        let sealed: Vec<&[u8]> = outcomes.iter().map(|o| o.sealed.as_slice()).collect();
        let store = client
            .prepare_cached(
                // The rows locked in key order first (as the claims'
                // statement takes them), so a claim batch and an outcome
                // batch never deadlock over two rows.
                "WITH q AS (
                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])
                     AS q(caller_id, request_id, exchange_id, sealed)),
                 locked AS (
                   SELECT i.caller_id, i.request_id FROM idempotency i
                   JOIN q ON i.caller_id = q.caller_id AND i.request_id = q.request_id
                   ORDER BY i.caller_id, i.request_id
                   FOR UPDATE OF i)
                 UPDATE idempotency AS i SET outcome_sealed = q.sealed
                 FROM q JOIN locked l USING (caller_id, request_id)
                 WHERE i.caller_id = q.caller_id AND i.request_id = q.request_id
                   AND i.exchange_id = q.exchange_id
                 RETURNING i.caller_id, i.request_id, i.exchange_id",
            )
            .await?;
        // What the UPDATE returned, not what it was asked: a claim taken
        // over meanwhile (another exchange id) keeps its own outcome.
        let stored: std::collections::HashSet<(String, String, String)> = client
            .query(&store, &[&callers, &request_ids, &exchange_ids, &sealed])
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        Ok::<_, WindowError>(
            outcomes
                .iter()
                .map(|o| {
                    stored.contains(&(
                        o.caller.clone(),
                        o.request_id.clone(),
                        o.exchange_id.clone(),
                    ))
                })
                .collect(),
        )
    };
    tokio::time::timeout(timeout, work).await?
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
        ask(&self.claims, "claim", |reply| Asked {
            caller: caller.to_owned(),
            request_id: request_id.to_owned(),
            fingerprint: *fingerprint,
            exchange_id: exchange_id.to_owned(),
            reply,
        })
        .await
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
            let stored = ask(&self.outcomes, "outcome", |reply| Outcome {
                caller: caller.to_owned(),
                request_id: request_id.to_owned(),
                exchange_id: exchange_id.to_owned(),
                sealed: bytes,
                reply,
            })
            .await?;
            if !stored {
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
        // The clock in a sub-select: evaluated once, so the expiry index
        // finds the expired rows (compared with clock_timestamp(), which
        // is volatile, every row of the table was read, on every sweep).
        // At most SWEPT rows a sweep, so no sweep is a long transaction
        // however many expired at once; the next sweep goes on.
        Ok(self
            .client()
            .await?
            .execute(
                "WITH clock AS MATERIALIZED (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms)
                 DELETE FROM idempotency i USING (
                   SELECT caller_id, request_id FROM idempotency
                   WHERE expires_at_ms <= (SELECT now_ms FROM clock)
                   ORDER BY expires_at_ms LIMIT $1
                 ) AS expired
                 WHERE i.caller_id = expired.caller_id AND i.request_id = expired.request_id
                   AND i.expires_at_ms <= (SELECT now_ms FROM clock)",
                &[&SWEPT],
            )
            .await?)
    }
}
