//! Idempotency: a caller that repeats a request id within the window gets
//! the first outcome instead of a second exchange. A repeat that arrives
//! while the first is still in flight waits for it. A request id reused for
//! a different request is refused (ALREADY_EXISTS).
//!
//! Outcomes are kept in memory, for the window, bounded in number and in
//! bytes (the oldest are forgotten first), and the cache never grows past
//! its budget. The embedded broker writes no outcome to disk. Replicas on
//! PostgreSQL also share the window there ([`SharedWindow`]): the first
//! replica to see a request id claims it in the `idempotency` table and
//! stores the final outcome sealed (AES-256-GCM under a key derived from
//! the pseudonym key all replicas hold, bound to the caller and request
//! id), so evidence is never stored in the clear; a repeat at another
//! replica waits for that outcome and gets it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use onceonly_proto::v1::{ExchangeOutcome, RequestEvidenceResponse};
use prost::Message;
use tokio::sync::watch;

use crate::pseudonym::Pseudonymiser;

/// A finished exchange's outcome, as it can be replayed.
#[derive(Debug, Clone)]
pub struct StoredOutcome {
    /// The exchange that produced it (the replay's audit record names it).
    pub exchange_id: String,
    /// The response, or the refusal.
    pub result: Result<RequestEvidenceResponse, StoredStatus>,
}

/// A `tonic::Status` in a form that can be cloned and rebuilt.
#[derive(Debug, Clone)]
pub struct StoredStatus {
    /// Code.
    pub code: tonic::Code,
    /// Message.
    pub message: String,
    /// Encoded `google.rpc.Status` details.
    pub details: Vec<u8>,
    /// How the first exchange's record classed it; a replay's record is
    /// classed the same.
    pub outcome: ExchangeOutcome,
}

impl StoredStatus {
    /// Captures a status and its audit class.
    pub fn capture(status: &tonic::Status, outcome: ExchangeOutcome) -> Self {
        StoredStatus {
            code: status.code(),
            message: status.message().to_owned(),
            details: status.details().to_vec(),
            outcome,
        }
    }

    /// Rebuilds the status.
    pub fn rebuild(&self) -> tonic::Status {
        tonic::Status::with_details(self.code, self.message.clone(), self.details.clone().into())
    }
}

type Key = (String, String);

struct Entry {
    fingerprint: [u8; 32],
    created: Instant,
    outcome: watch::Receiver<Option<StoredOutcome>>,
    /// The outcome's approximate size, once finished.
    bytes: usize,
}

/// Bookkeeping per entry beyond its outcome (keys, maps, channel).
const ENTRY_OVERHEAD: usize = 256;

impl StoredOutcome {
    /// Approximate memory an outcome holds.
    fn size(&self) -> usize {
        ENTRY_OVERHEAD
            + match &self.result {
                Ok(response) => prost::Message::encoded_len(response),
                Err(status) => status.message.len() + status.details.len(),
            }
    }
}

/// What [`IdempotencyCache::begin`] found.
pub enum Begin {
    /// First time: run the exchange and [`Pending::finish`] it.
    New(Pending),
    /// Seen before with the same content: this is (or will be) its outcome.
    Replay(Replay),
    /// Seen before with different content.
    Conflict,
    /// The shared window could not be asked: running now could run the
    /// request a second time at another replica, so it does not run.
    Unavailable,
}

/// Where a repeat's first outcome comes from.
pub enum Replay {
    /// This replica runs (or ran) the first exchange.
    Local(watch::Receiver<Option<StoredOutcome>>),
    /// Another replica does: its outcome is read from the shared window.
    Shared {
        /// The window.
        window: Arc<SharedWindow>,
        /// The caller's id.
        caller: String,
        /// The request id.
        request_id: String,
        /// The first exchange's id.
        exchange_id: String,
    },
}

/// The first request's duty to publish its outcome. Dropped unfinished
/// (the caller went away), it forgets the request id so a retry can run.
pub struct Pending {
    key: Key,
    sender: Option<watch::Sender<Option<StoredOutcome>>>,
    cache: std::sync::Weak<Mutex<Inner>>,
    /// The claim in the shared window, where there is one: (window, the
    /// first exchange's id).
    shared: Option<(Arc<SharedWindow>, String)>,
}

impl Pending {
    /// Publishes the outcome to waiting and later repeats (at every
    /// replica, where the window is shared: stored before this returns).
    pub async fn finish(mut self, outcome: StoredOutcome) {
        if let Some((window, exchange_id)) = self.shared.take() {
            window
                .store(&self.key.0, &self.key.1, &exchange_id, &outcome)
                .await;
        }
        let Some(sender) = self.sender.take() else {
            return;
        };
        let size = outcome.size();
        let _ = sender.send(Some(outcome));
        if let Some(inner) = self.cache.upgrade() {
            let mut inner = inner.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = inner.entries.get_mut(&self.key) {
                entry.bytes = size;
                inner.bytes += size;
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some((window, exchange_id)) = self.shared.take() {
            // Unfinished: release the claim, so a retry at any replica runs.
            let (caller, request_id) = self.key.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    window.release(&caller, &request_id, &exchange_id).await;
                });
            }
        }
        if self.sender.is_some()
            && let Some(inner) = self.cache.upgrade()
        {
            let mut inner = inner.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = inner.entries.remove(&self.key) {
                inner.bytes -= entry.bytes;
            }
        }
    }
}

struct Inner {
    entries: HashMap<Key, Entry>,
    order: VecDeque<(Key, Instant)>,
    /// The sum of the entries' sizes.
    bytes: usize,
}

/// The cache of recent request ids.
pub struct IdempotencyCache {
    inner: std::sync::Arc<Mutex<Inner>>,
    window: Duration,
    max_entries: usize,
    max_bytes: usize,
    shared: Option<Arc<SharedWindow>>,
}

impl IdempotencyCache {
    /// A cache remembering up to `max_entries` ids, holding at most
    /// `max_bytes` of outcomes, for `window`.
    pub fn new(window: Duration, max_entries: usize, max_bytes: usize) -> Self {
        IdempotencyCache {
            inner: std::sync::Arc::new(Mutex::new(Inner {
                entries: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            })),
            window,
            max_entries: max_entries.max(1),
            max_bytes,
            shared: None,
        }
    }

    /// Shares the window with other replicas through `shared`.
    pub fn with_shared(mut self, shared: SharedWindow) -> Self {
        self.shared = Some(Arc::new(shared));
        self
    }

    /// Looks up (`caller`, `request_id`) with the request's content
    /// `fingerprint`, registering it where new: here, and where the window
    /// is shared, in the database for exchange `exchange_id`.
    pub async fn begin(
        &self,
        caller: &str,
        request_id: &str,
        fingerprint: [u8; 32],
        exchange_id: &str,
    ) -> Begin {
        let local = self.begin_local(caller, request_id, fingerprint);
        let Some(shared) = &self.shared else {
            return local;
        };
        let Begin::New(mut pending) = local else {
            return local;
        };
        match shared
            .claim(caller, request_id, &fingerprint, exchange_id)
            .await
        {
            Ok(Claim::Ours) => {
                if shared
                    .claims
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    % 1024
                    == 0
                {
                    let sweeping = shared.clone();
                    tokio::spawn(async move {
                        if let Err(e) = sweeping.sweep().await {
                            tracing::warn!(error = %onceonly_store_postgres::describe(e.as_ref()), "sweeping the shared idempotency window");
                        }
                    });
                }
                pending.shared = Some((shared.clone(), exchange_id.to_owned()));
                Begin::New(pending)
            }
            Ok(Claim::Conflict) => Begin::Conflict,
            Ok(Claim::Theirs { exchange_id }) => Begin::Replay(Replay::Shared {
                window: shared.clone(),
                caller: caller.to_owned(),
                request_id: request_id.to_owned(),
                exchange_id,
            }),
            Err(e) => {
                // The claim may even have landed with its answer lost:
                // running now could run the request twice.
                tracing::warn!(
                    error = %onceonly_store_postgres::describe(e.as_ref()),
                    "the shared idempotency window is unavailable"
                );
                Begin::Unavailable
            }
        }
    }

    /// The approximate bytes of outcomes held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// Looks up (`caller`, `request_id`) here only.
    pub fn begin_local(&self, caller: &str, request_id: &str, fingerprint: [u8; 32]) -> Begin {
        let key = (caller.to_owned(), request_id.to_owned());
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Forget what is past the window, and the oldest beyond the bounds.
        while let Some((old_key, created)) = inner.order.front().cloned() {
            let expired = now.duration_since(created) > self.window;
            if !expired && inner.entries.len() < self.max_entries && inner.bytes <= self.max_bytes {
                break;
            }
            inner.order.pop_front();
            if inner
                .entries
                .get(&old_key)
                .is_some_and(|e| e.created == created)
                && let Some(entry) = inner.entries.remove(&old_key)
            {
                inner.bytes -= entry.bytes;
            }
        }
        if let Some(entry) = inner.entries.get(&key) {
            return if entry.fingerprint == fingerprint {
                Begin::Replay(Replay::Local(entry.outcome.clone()))
            } else {
                Begin::Conflict
            };
        }
        let (sender, receiver) = watch::channel(None);
        inner.entries.insert(
            key.clone(),
            Entry {
                fingerprint,
                created: now,
                outcome: receiver,
                bytes: 0,
            },
        );
        inner.order.push_back((key.clone(), now));
        Begin::New(Pending {
            key,
            sender: Some(sender),
            cache: std::sync::Arc::downgrade(&self.inner),
            shared: None,
        })
    }
}

/// Waits for a replayed outcome; `None` where the first request was
/// abandoned before it finished.
pub async fn wait_for(replay: Replay) -> Option<StoredOutcome> {
    match replay {
        Replay::Local(receiver) => wait_for_local(receiver).await,
        Replay::Shared {
            window,
            caller,
            request_id,
            exchange_id,
        } => window.wait(&caller, &request_id, &exchange_id).await,
    }
}

async fn wait_for_local(
    mut receiver: watch::Receiver<Option<StoredOutcome>>,
) -> Option<StoredOutcome> {
    loop {
        if let Some(outcome) = receiver.borrow_and_update().clone() {
            return Some(outcome);
        }
        if receiver.changed().await.is_err() {
            return receiver.borrow().clone();
        }
    }
}

/// What the shared window said to a claim.
enum Claim {
    /// The request id is this replica's to run.
    Ours,
    /// Another exchange has it, with the same content.
    Theirs { exchange_id: String },
    /// Another exchange has it, with other content.
    Conflict,
}

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

/// The idempotency window in PostgreSQL, shared by replicas.
pub struct SharedWindow {
    pool: onceonly_store_postgres::Pool,
    sealing: Arc<Pseudonymiser>,
    window: Duration,
    /// A claim with no outcome after this is the claimant's crash: taken
    /// over.
    stale_after: Duration,
    timeout: Duration,
    /// Claims so far: every 1024th sweeps the expired ones.
    claims: std::sync::atomic::AtomicU64,
}

type WindowError = Box<dyn std::error::Error + Send + Sync>;

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

impl SharedWindow {
    /// The window in `pool`'s database; outcomes sealed under a key of
    /// `sealing`; a claim without an outcome for `stale_after` (longer
    /// than any exchange may run) is taken over.
    pub fn new(
        pool: onceonly_store_postgres::Pool,
        sealing: Arc<Pseudonymiser>,
        window: Duration,
        stale_after: Duration,
        timeout: Duration,
    ) -> Self {
        SharedWindow {
            pool,
            sealing,
            window,
            stale_after,
            timeout,
            claims: std::sync::atomic::AtomicU64::new(0),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, WindowError> {
        Ok(tokio::time::timeout(self.timeout, self.pool.get()).await??)
    }

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
            tracing::warn!(error = %onceonly_store_postgres::describe(e.as_ref()), "could not store the outcome in the shared idempotency window");
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
            tracing::warn!(error = %onceonly_store_postgres::describe(e.as_ref()), "could not release a claim in the shared idempotency window");
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
                        |e| tracing::warn!(error = %onceonly_store_postgres::describe(&e), "reading the shared idempotency window"),
                    ),
                Err(e) => {
                    tracing::warn!(error = %onceonly_store_postgres::describe(e.as_ref()), "reading the shared idempotency window");
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

    /// Forgets claims past the window (any replica may; each runs it now
    /// and then).
    pub async fn sweep(&self) -> Result<u64, WindowError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(id: &str) -> StoredOutcome {
        StoredOutcome {
            exchange_id: id.into(),
            result: Err(StoredStatus {
                code: tonic::Code::NotFound,
                message: "x".into(),
                details: vec![],
                outcome: ExchangeOutcome::Failed,
            }),
        }
    }

    #[tokio::test]
    async fn repeats_get_the_first_outcome_and_conflicts_are_refused() {
        let cache = IdempotencyCache::new(Duration::from_secs(60), 10, 1 << 20);
        let Begin::New(pending) = cache.begin_local("a", "r1", [1; 32]) else {
            panic!("new")
        };
        let Begin::Replay(waiting) = cache.begin_local("a", "r1", [1; 32]) else {
            panic!("replay")
        };
        let waiter = tokio::spawn(wait_for(waiting));
        pending.finish(outcome("ex-1")).await;
        assert_eq!(
            waiter.await.expect("task").map(|o| o.exchange_id),
            Some("ex-1".into())
        );
        assert!(matches!(
            cache.begin_local("a", "r1", [2; 32]),
            Begin::Conflict
        ));
        assert!(
            matches!(cache.begin_local("b", "r1", [1; 32]), Begin::New(_)),
            "ids are per caller"
        );
    }

    #[tokio::test]
    async fn abandoned_requests_are_forgotten_and_old_ones_expire() {
        let cache = IdempotencyCache::new(Duration::from_millis(0), 10, 1 << 20);
        drop(cache.begin_local("a", "r1", [1; 32]));
        assert!(matches!(
            cache.begin_local("a", "r1", [1; 32]),
            Begin::New(_)
        ));
        let bounded = IdempotencyCache::new(Duration::from_secs(60), 2, 1 << 20);
        for id in ["r1", "r2", "r3"] {
            if let Begin::New(p) = bounded.begin_local("a", id, [1; 32]) {
                p.finish(outcome(id)).await;
            }
        }
        assert!(
            matches!(bounded.begin_local("a", "r1", [1; 32]), Begin::New(_)),
            "oldest evicted"
        );
    }

    #[tokio::test]
    async fn memory_stays_within_the_byte_budget() {
        let budget = 64 * 1024;
        let cache = IdempotencyCache::new(Duration::from_secs(600), 1_000_000, budget);
        let outcome = |n: u32| StoredOutcome {
            exchange_id: format!("ex-{n}"),
            result: Ok(RequestEvidenceResponse {
                evidence: Some(onceonly_proto::v1::Evidence {
                    payload: vec![7; 1000],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let one_entry = outcome(1999).size();
        for n in 0..2_000 {
            let Begin::New(pending) = cache.begin_local("a", &format!("r{n}"), [1; 32]) else {
                panic!("new")
            };
            pending.finish(outcome(n)).await;
            // The newest entry may overshoot until the next request evicts.
            assert!(
                cache.bytes() <= budget + one_entry,
                "{} bytes held, budget {budget}, entry {one_entry}",
                cache.bytes()
            );
        }
        assert!(cache.bytes() > budget / 2, "the budget is used, not wasted");
        assert!(
            matches!(cache.begin_local("a", "r1999", [1; 32]), Begin::Replay(_)),
            "the newest is kept"
        );
        assert!(
            matches!(cache.begin_local("a", "r0", [1; 32]), Begin::New(_)),
            "the oldest is forgotten"
        );
    }
}
