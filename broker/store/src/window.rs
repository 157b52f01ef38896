//! The request window: request ids recently claimed, so a repeat gets the
//! first outcome instead of a second exchange. Each broker keeps one in
//! memory; replicas also share one ([`RequestWindow`]), so a repeat at
//! another replica is answered the same.

use onceonly_proto::v1::{ExchangeOutcome, RequestEvidenceResponse};

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

/// What the shared window said to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The request id is this replica's to run.
    Ours,
    /// Another exchange has it, with the same content.
    Theirs {
        /// That exchange.
        exchange_id: String,
    },
    /// Another exchange has it, with other content.
    Conflict,
}

/// Why the shared window could not be asked.
pub type WindowError = Box<dyn std::error::Error + Send + Sync>;

/// Request ids claimed by replicas together, and their outcomes.
#[async_trait::async_trait]
pub trait RequestWindow: Send + Sync {
    /// Claims (`caller`, `request_id`) with the request's content
    /// `fingerprint` for exchange `exchange_id`.
    async fn claim(
        &self,
        caller: &str,
        request_id: &str,
        fingerprint: &[u8; 32],
        exchange_id: &str,
    ) -> Result<Claim, WindowError>;

    /// Stores the outcome of the claim of `exchange_id` (failures are
    /// logged: the outcome is already the caller's).
    async fn store(
        &self,
        caller: &str,
        request_id: &str,
        exchange_id: &str,
        outcome: &StoredOutcome,
    );

    /// Releases an unfinished claim, so a retry at any replica runs.
    async fn release(&self, caller: &str, request_id: &str, exchange_id: &str);

    /// Waits for the outcome of another replica's exchange `exchange_id`;
    /// None where it was abandoned (or could not be read in time).
    async fn wait(
        &self,
        caller: &str,
        request_id: &str,
        exchange_id: &str,
    ) -> Option<StoredOutcome>;

    /// Forgets claims past the window: how many.
    async fn sweep(&self) -> Result<u64, WindowError>;
}
