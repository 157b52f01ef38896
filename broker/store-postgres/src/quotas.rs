//! Quota counts in PostgreSQL (table `quota_gcra`), shared by replicas: a
//! caller's requests count against its quota at every replica together,
//! on the database's one clock.

use std::time::Duration;

use onceonly_store::{OverQuota, QuotaBucket, QuotaCounter, QuotaError};

use crate::Pool;

/// Quotas counted in PostgreSQL.
pub struct PgQuotas {
    pool: Pool,
    timeout: Duration,
}

impl PgQuotas {
    /// Quotas counted in `pool`'s database, each count within `timeout`.
    pub fn new(pool: Pool, timeout: Duration) -> Self {
        PgQuotas { pool, timeout }
    }
}

#[onceonly_store::async_trait]
impl QuotaCounter for PgQuotas {
    async fn check(&self, bucket: &QuotaBucket) -> Result<Result<(), OverQuota>, QuotaError> {
        let interval = i64::try_from(bucket.interval.as_micros()).unwrap_or(i64::MAX);
        let tolerance = interval.saturating_mul(i64::from(bucket.burst));
        let work = async {
            let client = self.pool.get().await?;
            // GCRA: the theoretical arrival time moves on by one interval
            // per request, from now at the earliest; a request is admitted
            // while it stays within burst intervals of now.
            // Prepared once per connection: this runs for every request.
            let count = client
                .prepare_cached(
                    "WITH clock AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS now_us)
                     INSERT INTO quota_gcra AS q (bucket, tat_us)
                     SELECT $1, clock.now_us + $2 FROM clock
                     ON CONFLICT (bucket) DO UPDATE
                       SET tat_us = greatest(q.tat_us, EXCLUDED.tat_us - $2) + $2
                       WHERE greatest(q.tat_us, EXCLUDED.tat_us - $2) + $2 - (EXCLUDED.tat_us - $2) <= $3
                     RETURNING tat_us",
                )
                .await?;
            let admitted = client
                .query_opt(&count, &[&bucket.key, &interval, &tolerance])
                .await?;
            if admitted.is_some() {
                return Ok(Ok(()));
            }
            let wait_us: i64 = client
                .query_one(
                    "SELECT tat_us - (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
                     FROM quota_gcra WHERE bucket = $1",
                    &[&bucket.key],
                )
                .await?
                .get(0);
            let retry_after = wait_us.saturating_sub(tolerance - interval).max(0);
            Ok::<_, QuotaError>(Err(OverQuota {
                quota: bucket.name.clone(),
                retry_after: Duration::from_micros(retry_after as u64),
            }))
        };
        tokio::time::timeout(self.timeout, work).await?
    }
}
