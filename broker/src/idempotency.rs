//! Idempotency: a caller that repeats a request id within the window gets
//! the first outcome instead of a second exchange. A repeat that arrives
//! while the first is still in flight waits for it. A request id reused for
//! a different request is refused (ALREADY_EXISTS).
//!
//! Outcomes are kept in memory only, for the window, bounded in number and
//! in bytes (the oldest are forgotten first): evidence payloads are never
//! written to disk, and the cache never grows past its budget.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use onceonly_proto::v1::{ExchangeOutcome, RequestEvidenceResponse};
use tokio::sync::watch;

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
    Replay(watch::Receiver<Option<StoredOutcome>>),
    /// Seen before with different content.
    Conflict,
}

/// The first request's duty to publish its outcome. Dropped unfinished
/// (the caller went away), it forgets the request id so a retry can run.
pub struct Pending {
    key: Key,
    sender: Option<watch::Sender<Option<StoredOutcome>>>,
    cache: std::sync::Weak<Mutex<Inner>>,
}

impl Pending {
    /// Publishes the outcome to waiting and later repeats.
    pub fn finish(mut self, outcome: StoredOutcome) {
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
        }
    }

    /// The approximate bytes of outcomes held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// Looks up (`caller`, `request_id`) with the request's content
    /// `fingerprint`, registering it where new.
    pub fn begin(&self, caller: &str, request_id: &str, fingerprint: [u8; 32]) -> Begin {
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
                Begin::Replay(entry.outcome.clone())
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
        })
    }
}

/// Waits for a replayed outcome; `None` where the first request was
/// abandoned before it finished.
pub async fn wait_for(
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
        let Begin::New(pending) = cache.begin("a", "r1", [1; 32]) else {
            panic!("new")
        };
        let Begin::Replay(waiting) = cache.begin("a", "r1", [1; 32]) else {
            panic!("replay")
        };
        let waiter = tokio::spawn(wait_for(waiting));
        pending.finish(outcome("ex-1"));
        assert_eq!(
            waiter.await.expect("task").map(|o| o.exchange_id),
            Some("ex-1".into())
        );
        assert!(matches!(cache.begin("a", "r1", [2; 32]), Begin::Conflict));
        assert!(
            matches!(cache.begin("b", "r1", [1; 32]), Begin::New(_)),
            "ids are per caller"
        );
    }

    #[test]
    fn abandoned_requests_are_forgotten_and_old_ones_expire() {
        let cache = IdempotencyCache::new(Duration::from_millis(0), 10, 1 << 20);
        drop(cache.begin("a", "r1", [1; 32]));
        assert!(matches!(cache.begin("a", "r1", [1; 32]), Begin::New(_)));
        let bounded = IdempotencyCache::new(Duration::from_secs(60), 2, 1 << 20);
        for id in ["r1", "r2", "r3"] {
            if let Begin::New(p) = bounded.begin("a", id, [1; 32]) {
                p.finish(outcome(id));
            }
        }
        assert!(
            matches!(bounded.begin("a", "r1", [1; 32]), Begin::New(_)),
            "oldest evicted"
        );
    }

    #[test]
    fn memory_stays_within_the_byte_budget() {
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
            let Begin::New(pending) = cache.begin("a", &format!("r{n}"), [1; 32]) else {
                panic!("new")
            };
            pending.finish(outcome(n));
            // The newest entry may overshoot until the next request evicts.
            assert!(
                cache.bytes() <= budget + one_entry,
                "{} bytes held, budget {budget}, entry {one_entry}",
                cache.bytes()
            );
        }
        assert!(cache.bytes() > budget / 2, "the budget is used, not wasted");
        assert!(
            matches!(cache.begin("a", "r1999", [1; 32]), Begin::Replay(_)),
            "the newest is kept"
        );
        assert!(
            matches!(cache.begin("a", "r0", [1; 32]), Begin::New(_)),
            "the oldest is forgotten"
        );
    }
}
