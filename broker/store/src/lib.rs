//! Where the broker's state lives, behind one seam.
//!
//! The request path keeps four kinds of state, each behind a trait of its
//! own with plain data types:
//!
//! - [`AuditStore`]: the append-only Merkle log of exchange records;
//! - [`ConsentStore`]: subjects' consents, every row authenticated;
//! - [`RequestWindow`]: request ids recently claimed, shared by replicas so
//!   a repeat at another replica gets the first outcome;
//! - [`QuotaCounter`]: per-caller rate counts, shared by replicas.
//!
//! Implementations: [`embedded`] (the log file and sled in the data
//! directory, one process), the PostgreSQL crate `onceonly-store-postgres`
//! (all its SQL beside its migrations), and [`memory`] (tests: the request
//! path without disk or database). The broker picks one at start-up and
//! hands the request path a [`Stores`]; nothing above this crate matches on
//! a backend.

pub mod audit;
pub mod consent;
pub mod embedded;
pub mod keys;
pub mod memory;
pub mod quota;
pub mod window;

use std::sync::Arc;

pub use audit::{Appended, AuditStore, LogEntry, ReplicaGauges};
pub use consent::{ConsentError, ConsentQuery, ConsentStore, StoredConsent};
pub use keys::RowKeys;
pub use onceonly_audit_log::{AuditError, AuditFault, AuditFilter, AuditMetrics};
pub use quota::{OverQuota, QuotaBucket, QuotaCounter, QuotaError};
pub use window::{Claim, RequestWindow, StoredOutcome, StoredStatus, WindowError};

/// Re-exported for implementations of the traits.
pub use async_trait::async_trait;

/// An error with its causes, each once: stores' errors often say only
/// "db error" or "io error" themselves, with the reason in a source.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The stores of one broker (or replica), opened once at start-up.
#[derive(Clone)]
pub struct Stores {
    /// The audit log.
    pub audit: Arc<dyn AuditStore>,
    /// Consents.
    pub consents: Arc<dyn ConsentStore>,
    /// Present where replicas share state: request ids and quota counts.
    /// A broker alone keeps both in memory (the cache and the limiter of
    /// the broker crate), which the embedded backend does not persist.
    pub shared: Option<Shared>,
}

/// State replicas share beyond the log and consents.
#[derive(Clone)]
pub struct Shared {
    /// Request ids claimed, and their outcomes.
    pub window: Arc<dyn RequestWindow>,
    /// Quota counts.
    pub quotas: Arc<dyn QuotaCounter>,
}
