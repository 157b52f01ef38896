//! Quota counts in PostgreSQL (table `quota_gcra`), shared by replicas: a
//! caller's requests count against its quota at every replica together,
//! on the database's one clock.
//!
//! The counts that wait at a moment go out together ([`crate::batch`]):
//! per bucket one count of n requests, which admits the first k that fit.
//! A caller's bucket is one row, which every one of its requests would
//! otherwise update in a statement (and a row lock) of its own.

use std::time::Duration;

use onceonly_store::{OverQuota, QuotaBucket, QuotaCounter, QuotaError};

use crate::Pool;
use crate::batch::{ask, in_batches};

/// Counts at most in one batch, and batches at once.
const MAX_COUNTS: usize = 256;
const COUNTS_IN_FLIGHT: usize = 2;
/// Buckets of one batch counted at once (each on a connection of its own).
const BUCKETS_AT_ONCE: usize = 4;

/// Quotas counted in PostgreSQL.
pub struct PgQuotas {
    counts: tokio::sync::mpsc::Sender<Asked>,
}

/// One request to count.
struct Asked {
    bucket: QuotaBucket,
    reply: tokio::sync::oneshot::Sender<Result<Result<(), OverQuota>, String>>,
}

impl PgQuotas {
    /// Quotas counted in `pool`'s database, each count within `timeout`.
    pub fn new(pool: Pool, timeout: Duration) -> Self {
        let (counts, asked) = tokio::sync::mpsc::channel(MAX_COUNTS * 4);
        tokio::spawn(in_batches(
            asked,
            MAX_COUNTS,
            COUNTS_IN_FLIGHT,
            |_: &mut Vec<Asked>| Vec::new(),
            move |now: Vec<Asked>| {
                let pool = pool.clone();
                async move {
                    let counted = count_all(&pool, timeout, &now).await;
                    for (one, counted) in now.into_iter().zip(counted) {
                        let _ = one.reply.send(counted);
                    }
                }
            },
        ));
        PgQuotas { counts }
    }
}

/// A bucket's limits in the database's units: (interval, tolerance) in
/// microseconds. A request uses up one interval; a bucket admits while
/// it stays within `burst` intervals of now.
fn limits(bucket: &QuotaBucket) -> (i64, i64) {
    let interval = i64::try_from(bucket.interval.as_micros())
        .unwrap_or(i64::MAX)
        .max(1);
    (interval, interval.saturating_mul(i64::from(bucket.burst)))
}

/// GCRA for `n` requests at once: of a bucket whose theoretical arrival
/// time is `tat` (µs) at `now`, how many are admitted, first come first,
/// and the new theoretical arrival time. What `n` counts of one request
/// each would give.
fn admit(tat: i64, now: i64, (interval, tolerance): (i64, i64), n: usize) -> (usize, i64) {
    let base = tat.max(now);
    let room = tolerance.saturating_sub(base - now);
    let fit = if room < 0 { 0 } else { room / interval };
    let admitted = usize::try_from(fit).unwrap_or(usize::MAX).min(n);
    if admitted == 0 {
        return (0, tat);
    }
    (
        admitted,
        base.saturating_add(interval.saturating_mul(admitted as i64)),
    )
}

/// How long a refused request waits: until the bucket's arrival time is
/// within the tolerance of one more request.
fn retry_after(tat: i64, now: i64, (interval, tolerance): (i64, i64)) -> Duration {
    let wait = tat
        .saturating_sub(now)
        .saturating_sub(tolerance - interval)
        .max(0);
    Duration::from_micros(wait as u64)
}

/// Counts `asked`, bucket by bucket (a few at once, each within
/// `timeout`); the answers in order. A bucket that cannot be counted (its
/// row locked, the database failing) fails its own requests only.
async fn count_all(
    pool: &Pool,
    timeout: Duration,
    asked: &[Asked],
) -> Vec<Result<Result<(), OverQuota>, String>> {
    let mut buckets: Vec<(&QuotaBucket, Vec<usize>)> = Vec::new();
    for (n, one) in asked.iter().enumerate() {
        match buckets.iter_mut().find(|(bucket, _)| {
            bucket.key == one.bucket.key && limits(bucket) == limits(&one.bucket)
        }) {
            Some((_, members)) => members.push(n),
            None => buckets.push((&one.bucket, vec![n])),
        }
    }
    let mut answers: Vec<Result<Result<(), OverQuota>, String>> = vec![Ok(Ok(())); asked.len()];
    let mut counted: Vec<Result<(usize, Duration), String>> = Vec::with_capacity(buckets.len());
    for some in buckets.chunks(BUCKETS_AT_ONCE) {
        counted.extend(
            futures::future::join_all(
                some.iter()
                    .map(|(bucket, members)| count_within(pool, timeout, bucket, members.len())),
            )
            .await,
        );
    }
    for ((bucket, members), counted) in buckets.iter().zip(counted) {
        match counted {
            Ok((admitted, wait)) => {
                for n in &members[admitted..] {
                    answers[*n] = Ok(Err(OverQuota {
                        quota: bucket.name.clone(),
                        retry_after: wait,
                    }));
                }
            }
            Err(why) => {
                for n in members {
                    answers[*n] = Err(why.clone());
                }
            }
        }
    }
    answers
}

/// [`count`] within `timeout`, its error as text.
async fn count_within(
    pool: &Pool,
    timeout: Duration,
    bucket: &QuotaBucket,
    n: usize,
) -> Result<(usize, Duration), String> {
    match tokio::time::timeout(timeout, count(pool, bucket, n)).await {
        Ok(Ok(counted)) => Ok(counted),
        Ok(Err(e)) => Err(crate::describe(e.as_ref())),
        Err(_) => Err(format!("counting took longer than {timeout:?}")),
    }
}

/// Counts `n` requests in `bucket`: how many are admitted (the first),
/// and how long the others wait.
async fn count(
    pool: &Pool,
    bucket: &QuotaBucket,
    n: usize,
) -> Result<(usize, Duration), QuotaError> {
    let limits = limits(bucket);
    let (interval, tolerance) = limits;
    let mut client = pool.get().await?;
    if n == 1 {
        // One request: one statement. The theoretical arrival time moves
        // on by one interval, from now at the earliest; admitted while it
        // stays within the tolerance of now. Prepared once per connection.
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
        if client
            .query_opt(&count, &[&bucket.key, &interval, &tolerance])
            .await?
            .is_some()
        {
            return Ok((1, Duration::ZERO));
        }
        let row = client
            .query_one(
                "SELECT tat_us, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
                 FROM quota_gcra WHERE bucket = $1",
                &[&bucket.key],
            )
            .await?;
        return Ok((0, retry_after(row.get(0), row.get(1), limits)));
    }
    // Several: the bucket's row locked (made where it is new), counted
    // here on the database's clock, written back, in one transaction.
    let tx = client.transaction().await?;
    let lock = tx
        .prepare_cached(
            "WITH clock AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS now_us)
             INSERT INTO quota_gcra AS q (bucket, tat_us)
             SELECT $1, clock.now_us FROM clock
             ON CONFLICT (bucket) DO UPDATE SET tat_us = q.tat_us
             RETURNING tat_us, (SELECT now_us FROM clock)",
        )
        .await?;
    let row = tx.query_one(&lock, &[&bucket.key]).await?;
    let (tat, now): (i64, i64) = (row.get(0), row.get(1));
    let (admitted, next) = admit(tat, now, limits, n);
    if next != tat {
        let store = tx
            .prepare_cached("UPDATE quota_gcra SET tat_us = $2 WHERE bucket = $1")
            .await?;
        let stored = tx.execute(&store, &[&bucket.key, &next]).await?;
        if stored != 1 {
            return Err(format!(
                "quota_gcra stored {stored} of 1 count for bucket {}: a trigger on the table drops writes",
                bucket.key
            )
            .into());
        }
    }
    tx.commit().await?;
    Ok((admitted, retry_after(next, now, limits)))
}

#[onceonly_store::async_trait]
impl QuotaCounter for PgQuotas {
    async fn check(&self, bucket: &QuotaBucket) -> Result<Result<(), OverQuota>, QuotaError> {
        ask(&self.counts, "quota", |reply| Asked {
            bucket: bucket.clone(),
            reply,
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` counts of one request each, as the one-row statement makes them.
    fn one_by_one(mut tat: i64, now: i64, limits: (i64, i64), n: usize) -> (usize, i64) {
        let mut admitted = 0;
        for _ in 0..n {
            let (one, next) = admit(tat, now, limits, 1);
            admitted += one;
            tat = next;
        }
        (admitted, tat)
    }

    #[test]
    fn a_batch_admits_what_its_requests_one_by_one_would() {
        let now = 1_000_000;
        for limits in [(1_000, 5_000), (1, 1_000_000), (250_000, 250_000), (7, 21)] {
            for tat in [
                0,
                now - 10_000,
                now,
                now + 500,
                now + 4_000,
                now + 5_000,
                now + 9_999,
            ] {
                for n in [1, 2, 3, 5, 8, 100] {
                    assert_eq!(
                        admit(tat, now, limits, n),
                        one_by_one(tat, now, limits, n),
                        "tat {tat}, limits {limits:?}, n {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_full_bucket_admits_none_and_names_the_wait() {
        let now = 1_000_000;
        // Burst of 5 at 1 ms each, all used up: the next one in 1 ms.
        let limits = (1_000, 5_000);
        let full = now + 5_000;
        assert_eq!(admit(full, now, limits, 3), (0, full));
        assert_eq!(retry_after(full, now, limits), Duration::from_millis(1));
        // Room for two of five.
        let (admitted, next) = admit(now + 3_000, now, limits, 5);
        assert_eq!((admitted, next), (2, now + 5_000));
        assert_eq!(retry_after(next, now, limits), Duration::from_millis(1));
        // An idle bucket admits a whole burst, no more.
        assert_eq!(admit(0, now, limits, 8), (5, now + 5_000));
    }
}
