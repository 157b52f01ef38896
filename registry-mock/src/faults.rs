//! Fault injection for tests and demos: added latency, a failure rate, and
//! subjects the register refuses.

use std::collections::HashSet;
use std::time::Duration;

use onceonly_connector_sdk::ProvideError;
use rand::Rng;
use serde::Deserialize;

/// What goes wrong, on purpose.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Added to every lookup, e.g. "250ms".
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Share of lookups (0.0 to 1.0) answered "register unavailable".
    pub failure_rate: f64,
    /// Subjects the register refuses (PERMISSION_DENIED, SUBJECT_BLOCKED).
    pub refuse_subjects: HashSet<String>,
}

impl Faults {
    /// Checks the values; errors name the key and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(format!(
                "faults.failure_rate: {} is not between 0.0 and 1.0",
                self.failure_rate
            ));
        }
        if self.latency > Duration::from_secs(600) {
            return Err("faults.latency: over 10 minutes; use a shorter latency".into());
        }
        Ok(())
    }

    /// Sleeps for the latency, then fails where configured.
    pub async fn apply(&self, subject: &str) -> Result<(), ProvideError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.refuse_subjects.contains(subject) {
            return Err(ProvideError::SubjectBlocked(
                "the register refuses this subject (fault injection)".into(),
            ));
        }
        if self.failure_rate > 0.0 && rand::rng().random_bool(self.failure_rate) {
            return Err(ProvideError::RegisterUnavailable(
                "injected failure (faults.failure_rate)".into(),
            ));
        }
        Ok(())
    }
}
