//! Per-caller request quotas, part of the policy file: a sustained rate and
//! a burst, for one authority or shared by the members of a group. A caller
//! over its quota gets RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) with the time
//! until its next request is admitted; other callers are not affected.
//!
//! ```toml
//! [[quota]]
//! id = "family-benefits"
//! callers = ["group:family-benefits"]   # a group shares one quota
//! per_second = 20                       # or per_minute, for low rates
//! burst = 40
//!
//! [[quota]]
//! id = "kfz-koeln"
//! callers = ["kfz-steuer-koeln"]         # an authority has its own
//! per_second = 50
//! burst = 50
//!
//! [default_quota]                        # optional: every other authority,
//! per_second = 100                       # each on its own
//! burst = 200
//! ```
//!
//! A quota that names a caller directly is the one that applies to it, over
//! any group quota; a caller named directly by two quotas, or reached through
//! two group quotas, is refused when the policy loads. Counting uses the GCRA
//! of the `governor` crate (a well-kept limiter, lock-free per check). A
//! policy reload starts every quota afresh.
//!
//! Replicas on PostgreSQL share their quotas ([`onceonly_store::QuotaCounter`]): a caller's
//! gRPC connection stays with one replica, so splitting a quota between
//! replicas would refuse a caller whose traffic all lands on one, and
//! counting alone would let it have the quota once per replica. The same
//! GCRA runs in one `UPDATE` on an unlogged table, on the database's clock,
//! so a caller's requests count once wherever they land. Where the
//! database fails the check, the replica counts alone (at worst the quota
//! once per replica) — the request is then refused anyway if its audit
//! record cannot be written.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use serde::Deserialize;

/// A rate and a burst as written in the policy: `per_second` or
/// `per_minute` (exactly one), and `burst`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    /// Requests per second, sustained.
    #[serde(default)]
    pub per_second: Option<NonZeroU32>,
    /// Requests per minute, sustained (for low rates).
    #[serde(default)]
    pub per_minute: Option<NonZeroU32>,
    /// Requests that may come at once above the rate.
    pub burst: NonZeroU32,
}

impl QuotaSpec {
    /// Whether exactly one rate is given.
    pub fn is_valid(&self) -> bool {
        self.per_second.is_some() != self.per_minute.is_some()
    }

    fn quota(self) -> Quota {
        let rate = match (self.per_second, self.per_minute) {
            (Some(per_second), _) => Quota::per_second(per_second),
            (None, Some(per_minute)) => Quota::per_minute(per_minute),
            // Refused by the policy check; the strictest rate if it slips by.
            (None, None) => Quota::per_hour(NonZeroU32::MIN),
        };
        rate.allow_burst(self.burst)
    }
}

impl fmt::Display for QuotaSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.per_second, self.per_minute) {
            (Some(rate), _) => write!(f, "{rate}/s, burst {}", self.burst),
            (None, Some(rate)) => write!(f, "{rate}/min, burst {}", self.burst),
            (None, None) => write!(f, "no rate, burst {}", self.burst),
        }
    }
}

/// One `[[quota]]` entry of the policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaEntry {
    /// Its name, quoted to callers over it.
    pub id: String,
    /// Authority ids (each its own quota) or `group:<name>` (shared).
    pub callers: toml::Spanned<Vec<String>>,
    /// The limits.
    #[serde(flatten)]
    pub spec: QuotaSpec,
}

pub use onceonly_store::{OverQuota, QuotaBucket};

struct Bucket {
    name: String,
    /// The bucket's key in the shared table: the quota's name, and the
    /// caller where each member has its own.
    key: String,
    spec: QuotaSpec,
    limiter: DefaultDirectRateLimiter,
}

impl QuotaSpec {
    /// The time one request uses up of the rate (the GCRA's emission
    /// interval).
    pub fn emission_interval(&self) -> Duration {
        match (self.per_second, self.per_minute) {
            (Some(rate), _) => Duration::from_secs(1) / rate.get(),
            (None, Some(rate)) => Duration::from_secs(60) / rate.get(),
            (None, None) => Duration::from_secs(3600),
        }
    }
}

/// The quotas in force.
#[derive(Default)]
pub struct Quotas {
    by_caller: HashMap<String, Arc<Bucket>>,
    default: Option<(QuotaSpec, DefaultKeyedRateLimiter<String>)>,
}

impl fmt::Debug for Quotas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quotas")
            .field("callers", &self.by_caller.len())
            .field("default", &self.default.as_ref().map(|(spec, _)| spec))
            .finish()
    }
}

/// Why quotas could not be built; the policy names the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaConflict {
    /// The caller named twice.
    pub caller: String,
    /// The two quotas.
    pub quotas: (String, String),
}

impl Quotas {
    /// Builds the quotas from the policy's entries; `groups` resolves
    /// `group:<name>` (the policy has checked the names exist).
    pub fn build(
        entries: &[QuotaEntry],
        groups: &BTreeMap<String, Vec<String>>,
        default: Option<QuotaSpec>,
    ) -> Result<Self, (usize, QuotaConflict)> {
        let mut direct: HashMap<String, Arc<Bucket>> = HashMap::new();
        let mut via_group: HashMap<String, Arc<Bucket>> = HashMap::new();
        for (position, entry) in entries.iter().enumerate() {
            let name = format!("{}: {}", entry.id, entry.spec);
            let shared = Arc::new(Bucket {
                key: name.clone(),
                name,
                spec: entry.spec,
                limiter: DefaultDirectRateLimiter::direct(entry.spec.quota()),
            });
            for caller in entry.callers.get_ref() {
                let (members, table, bucket) = match caller.strip_prefix("group:") {
                    Some(group) => (
                        groups.get(group).cloned().unwrap_or_default(),
                        &mut via_group,
                        shared.clone(),
                    ),
                    None => (
                        vec![caller.clone()],
                        &mut direct,
                        Arc::new(Bucket {
                            name: shared.name.clone(),
                            key: format!("{}\n{caller}", shared.name),
                            spec: entry.spec,
                            limiter: DefaultDirectRateLimiter::direct(entry.spec.quota()),
                        }),
                    ),
                };
                for member in members {
                    if let Some(earlier) = table.insert(member.clone(), bucket.clone()) {
                        return Err((
                            position,
                            QuotaConflict {
                                caller: member,
                                quotas: (earlier.name.clone(), bucket.name.clone()),
                            },
                        ));
                    }
                }
            }
        }
        for (caller, bucket) in via_group {
            direct.entry(caller).or_insert(bucket);
        }
        Ok(Quotas {
            by_caller: direct,
            default: default.map(|spec| (spec, DefaultKeyedRateLimiter::keyed(spec.quota()))),
        })
    }

    /// Counts one request of `caller_id` (an authority id); Err where it is
    /// over its quota. Callers with no quota are never limited.
    pub fn check(&self, caller_id: &str) -> Result<(), OverQuota> {
        let (name, verdict) = match self.by_caller.get(caller_id) {
            Some(bucket) => (bucket.name.as_str(), bucket.limiter.check()),
            None => match &self.default {
                Some((_, limiter)) => ("default", limiter.check_key(&caller_id.to_owned())),
                None => return Ok(()),
            },
        };
        verdict.map_err(|not_until| OverQuota {
            quota: match (&self.default, name) {
                (Some((spec, _)), "default") => format!("default: {spec}"),
                _ => name.to_owned(),
            },
            retry_after: not_until.wait_time_from(DefaultClock::default().now()),
        })
    }

    /// The bucket `caller_id`'s requests count in, if it has a quota.
    pub fn bucket_of(&self, caller_id: &str) -> Option<QuotaBucket> {
        match self.by_caller.get(caller_id) {
            Some(bucket) => Some(QuotaBucket {
                key: bucket.key.clone(),
                name: bucket.name.clone(),
                interval: bucket.spec.emission_interval(),
                burst: bucket.spec.burst.get(),
            }),
            None => self.default.as_ref().map(|(spec, _)| QuotaBucket {
                key: format!("default: {spec}\n{caller_id}"),
                name: format!("default: {spec}"),
                interval: spec.emission_interval(),
                burst: spec.burst.get(),
            }),
        }
    }

    /// Whether no quota is set.
    pub fn is_empty(&self) -> bool {
        self.by_caller.is_empty() && self.default.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, callers: &[&str], per_second: u32, burst: u32) -> QuotaEntry {
        QuotaEntry {
            id: id.into(),
            callers: toml::Spanned::new(0..0, callers.iter().map(|c| c.to_string()).collect()),
            spec: QuotaSpec {
                per_second: NonZeroU32::new(per_second),
                per_minute: None,
                burst: NonZeroU32::new(burst).expect("nonzero"),
            },
        }
    }

    fn groups() -> BTreeMap<String, Vec<String>> {
        [("family".to_owned(), vec!["a".to_owned(), "b".to_owned()])].into()
    }

    #[test]
    fn a_caller_over_its_burst_is_refused_with_a_wait_and_others_are_not() {
        let quotas =
            Quotas::build(&[entry("tight", &["a"], 1, 2)], &groups(), None).expect("builds");
        assert!(quotas.check("a").is_ok());
        assert!(quotas.check("a").is_ok());
        let over = quotas
            .check("a")
            .expect_err("third request within the burst");
        assert_eq!(over.quota, "tight: 1/s, burst 2");
        assert!(over.retry_after > Duration::ZERO && over.retry_after <= Duration::from_secs(1));
        for _ in 0..100 {
            assert!(quotas.check("b").is_ok(), "b has no quota");
        }
    }

    #[test]
    fn a_group_shares_one_quota_and_a_direct_one_wins() {
        let quotas = Quotas::build(
            &[
                entry("family", &["group:family"], 1, 2),
                entry("own", &["b"], 1, 1),
            ],
            &groups(),
            None,
        )
        .expect("builds");
        assert!(quotas.check("a").is_ok());
        assert!(quotas.check("a").is_ok());
        // b is in the group, but its own quota applies.
        assert!(quotas.check("b").is_ok());
        assert!(quotas.check("b").is_err());
        assert!(quotas.check("a").is_err(), "the group's burst is used up");
    }

    #[test]
    fn the_default_quota_counts_each_caller_apart() {
        let spec = QuotaSpec {
            per_second: None,
            per_minute: NonZeroU32::new(1),
            burst: NonZeroU32::new(1).expect("nonzero"),
        };
        let quotas = Quotas::build(&[], &groups(), Some(spec)).expect("builds");
        assert!(quotas.check("x").is_ok());
        assert!(quotas.check("y").is_ok());
        let over = quotas.check("x").expect_err("x used its burst");
        assert_eq!(over.quota, "default: 1/min, burst 1");
    }

    #[test]
    fn a_caller_named_by_two_quotas_is_a_conflict() {
        let Err((position, conflict)) = Quotas::build(
            &[entry("one", &["a"], 1, 1), entry("two", &["a"], 2, 2)],
            &groups(),
            None,
        ) else {
            panic!("conflict accepted");
        };
        assert_eq!(position, 1);
        assert_eq!(conflict.caller, "a");
    }
}
