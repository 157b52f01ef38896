//! What the audit writer records, for the broker's metrics registry.

use onceonly_proto::telemetry::latency_buckets;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// What the audit writer records.
#[derive(Debug, Clone)]
pub struct AuditMetrics {
    /// One `fdatasync` of the log file.
    pub fsync_seconds: Histogram,
    /// Records per group-commit batch.
    pub batch_records: Histogram,
}

impl Default for AuditMetrics {
    fn default() -> Self {
        AuditMetrics {
            fsync_seconds: Histogram::new(latency_buckets()),
            batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
        }
    }
}
