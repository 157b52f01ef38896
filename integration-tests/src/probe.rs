//! A register for tests that need to watch what reaches it: it serves
//! `birth-certificate` after a configurable latency, and counts the calls
//! that started, that are in its code at once (and the most at once), that
//! finished, and that were dropped before finishing (cancelled by the
//! caller going away or by a deadline).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use onceonly_connector_sdk::proto::{EvidenceTypeInfo, SubjectIdScheme};
use onceonly_connector_sdk::{
    Connector, EvidencePayload, EvidenceRequest, ProvideError, evidence_type,
};
use tokio::sync::Notify;

/// What the probe register saw; shared with the test.
#[derive(Debug, Default)]
pub struct ProbeCounts {
    /// Calls that reached the register's code.
    pub started: AtomicUsize,
    /// Calls in the register's code now.
    pub in_flight: AtomicUsize,
    /// The most calls in the register's code at once.
    pub peak: AtomicUsize,
    /// Calls that ran to their answer.
    pub finished: AtomicUsize,
    /// Calls dropped before their answer: the register saw a cancellation.
    pub cancelled: AtomicUsize,
    /// Wakes waiters whenever a count changes.
    pub changed: Notify,
}

impl ProbeCounts {
    /// Waits (at most `limit`) until `condition` holds on the counts; false
    /// if it never did.
    pub async fn wait_until(
        &self,
        limit: Duration,
        condition: impl Fn(&ProbeCounts) -> bool,
    ) -> bool {
        let waiting = async {
            loop {
                let changed = self.changed.notified();
                if condition(self) {
                    return;
                }
                // Counts change from other tasks; a missed wake-up costs at
                // most this poll interval.
                let _ = tokio::time::timeout(Duration::from_millis(50), changed).await;
            }
        };
        tokio::time::timeout(limit, waiting).await.is_ok()
    }
}

/// The probe register.
#[derive(Debug, Clone)]
pub struct ProbeRegister {
    latency: Duration,
    counts: Arc<ProbeCounts>,
    /// The media type it answers with, and the one it declares (they
    /// differ for a register that answers outside its own declaration).
    media_type: String,
    declared: String,
    /// The evidence type it serves.
    evidence_type: String,
}

impl ProbeRegister {
    /// A register that answers after `latency`, and its counts.
    pub fn new(latency: Duration) -> (Self, Arc<ProbeCounts>) {
        let counts = Arc::new(ProbeCounts::default());
        (
            ProbeRegister {
                latency,
                counts: counts.clone(),
                media_type: "application/xml".into(),
                declared: "application/xml".into(),
                evidence_type: "birth-certificate".into(),
            },
            counts,
        )
    }

    /// The same register, declaring and answering `media_type` instead
    /// (outside the broker's catalogue, for its check).
    pub fn answering_as(mut self, media_type: &str) -> Self {
        self.media_type = media_type.into();
        self.declared = media_type.into();
        self
    }

    /// The same register, serving `evidence_type` in `media_type` instead
    /// (e.g. `proof-of-residence`, which needs the subject's consent).
    pub fn serving(mut self, evidence_type: &str, media_type: &str) -> Self {
        self.evidence_type = evidence_type.into();
        self.answering_as(media_type)
    }

    /// The same register, answering `media_type` while it still declares
    /// `application/xml` (for the SDK's check).
    pub fn answering_undeclared(mut self, media_type: &str) -> Self {
        self.media_type = media_type.into();
        self
    }
}

/// Counts a call out when dropped, as finished or as cancelled.
struct InFlight {
    counts: Arc<ProbeCounts>,
    finished: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counts.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.finished {
            self.counts.finished.fetch_add(1, Ordering::SeqCst);
        } else {
            self.counts.cancelled.fetch_add(1, Ordering::SeqCst);
        }
        self.counts.changed.notify_waiters();
    }
}

impl Connector for ProbeRegister {
    fn evidence_types(&self) -> Vec<EvidenceTypeInfo> {
        vec![evidence_type(
            &self.evidence_type,
            &self.evidence_type,
            &[self.declared.as_str()],
            &[SubjectIdScheme::DeIdnr],
        )]
    }

    async fn provide(&self, _request: EvidenceRequest) -> Result<EvidencePayload, ProvideError> {
        self.counts.started.fetch_add(1, Ordering::SeqCst);
        let now = self.counts.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.counts.peak.fetch_max(now, Ordering::SeqCst);
        self.counts.changed.notify_waiters();
        let mut guard = InFlight {
            counts: self.counts.clone(),
            finished: false,
        };
        tokio::time::sleep(self.latency).await;
        guard.finished = true;
        Ok(EvidencePayload::new(
            b"<Geburtsurkunde/>".to_vec(),
            self.media_type.clone(),
        ))
    }
}
