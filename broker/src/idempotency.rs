//! Idempotency: a caller that repeats a request id within the window gets
//! the first outcome instead of a second exchange. A repeat that arrives
//! while the first is still in flight waits for it. A request id reused for
//! a different request is refused (ALREADY_EXISTS).
//!
//! Outcomes are kept in memory, for the window, bounded in number and in
//! bytes (the oldest are forgotten first), and the cache never grows past
//! its budget. The embedded broker writes no outcome to disk. Replicas on
//! PostgreSQL also share the window there ([`RequestWindow`], the
//! `onceonly-store-postgres` crate's `PgWindow`): the first
//! replica to see a request id claims it in the `idempotency` table and
//! stores the final outcome sealed (AES-256-GCM under a key derived from
//! the pseudonym key all replicas hold, bound to the caller and request
//! id), so evidence is never stored in the clear; a repeat at another
//! replica waits for that outcome and gets it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use onceonly_store::{Claim, RequestWindow, StoredOutcome, StoredStatus};

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

/// Approximate memory an outcome holds.
fn size_of(outcome: &StoredOutcome) -> usize {
    ENTRY_OVERHEAD
        + match &outcome.result {
            Ok(response) => prost::Message::encoded_len(response),
            Err(status) => status.message.len() + status.details.len(),
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
        window: Arc<dyn RequestWindow>,
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
    shared: Option<(Arc<dyn RequestWindow>, String)>,
}

impl Pending {
    /// Publishes the outcome to waiting and later repeats (at every
    /// replica, where the window is shared: stored before this returns, so
    /// that a drain waits for it; in a task of its own, a restart could
    /// leave the claim without its outcome and a repeat elsewhere would run
    /// the exchange a second time).
    pub async fn finish(mut self, outcome: StoredOutcome) {
        if let Some((window, exchange_id)) = self.shared.take() {
            window
                .store(&self.key.0, &self.key.1, &exchange_id, &outcome)
                .await;
        }
        let Some(sender) = self.sender.take() else {
            return;
        };
        let size = size_of(&outcome);
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
    shared: Option<Arc<dyn RequestWindow>>,
    /// Claims in the shared window so far: every 1024th sweeps the
    /// expired ones.
    claims: std::sync::atomic::AtomicU64,
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
            claims: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Shares the window with other replicas through `shared`.
    pub fn with_shared(mut self, shared: Arc<dyn RequestWindow>) -> Self {
        self.shared = Some(shared);
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
                if self
                    .claims
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    .is_multiple_of(1024)
                {
                    let sweeping = shared.clone();
                    tokio::spawn(async move {
                        if let Err(e) = sweeping.sweep().await {
                            tracing::warn!(error = %onceonly_store::describe(e.as_ref()), "sweeping the shared idempotency window");
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
                    error = %onceonly_store::describe(e.as_ref()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use onceonly_proto::v1::{ExchangeOutcome, RequestEvidenceResponse};

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
        let one_entry = size_of(&outcome(1999));
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
