//! Quota counts shared by replicas: a caller's requests count against its
//! quota at every replica together.

use std::time::Duration;

/// Where one caller's requests count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaBucket {
    /// The bucket's key in the shared count: the quota's name, and the
    /// caller where each member has its own.
    pub key: String,
    /// The quota's name and limits, quoted to the caller.
    pub name: String,
    /// The time one request uses up of the rate (the GCRA's emission
    /// interval).
    pub interval: Duration,
    /// Requests admitted at once beyond the rate.
    pub burst: u32,
}

/// A caller over its quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverQuota {
    /// The quota's name and limits.
    pub quota: String,
    /// When the next request will be admitted.
    pub retry_after: Duration,
}

/// Why a shared count could not be taken.
pub type QuotaError = Box<dyn std::error::Error + Send + Sync>;

/// Counts requests against quotas, shared by replicas.
#[async_trait::async_trait]
pub trait QuotaCounter: Send + Sync {
    /// Counts one request in `bucket`: Ok(Err) where it is over the quota.
    async fn check(&self, bucket: &QuotaBucket) -> Result<Result<(), OverQuota>, QuotaError>;
}
