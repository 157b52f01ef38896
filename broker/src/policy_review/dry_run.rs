//! The decisions already in the audit log, decided again under an edited
//! policy: which would change. Each logged exchange that the policy
//! decided is replayed with its own caller, evidence type, purpose, legal
//! basis and consent state at the time:
//!
//! - allowed then: its record names the rule (and the consent where one
//!   was needed);
//! - refused by the policy then: `POLICY_DENIED`, or `CONSENT_MISSING`
//!   under the rule that needed it;
//! - anything refused before the policy looked (malformed, unsigned, over
//!   quota, ...) and the log's other records are skipped and counted.
//!
//! A rule that needs consent allows the replayed request only where the
//! record shows a consent then, and refuses it where the record shows
//! there was none (`CONSENT_MISSING`, also when a consent was revoked while
//! the register answered); where the record cannot tell (the old decision
//! needed no consent, or its consent check did not finish), the decision
//! is counted as undetermined, not as a change. Subjects appear only as
//! the log's pseudonyms.
//!
//! What it does not replay: the policy's other settings (`[signed_requests]`,
//! `[encryption]`, quotas), whose refusals come before or beside the rules;
//! `onceonly-policy diff` names changes to them.

use std::collections::BTreeMap;

use crate::policy::{ConsentRequirement, Decision, Policy};
use onceonly_proto::v1::{AuditRecord, ErrorReason, RecordKind};

/// Which records to replay.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Only records received at or after this time (Unix seconds).
    pub since: Option<i64>,
    /// Only records from this log index on.
    pub from_index: Option<u64>,
    /// Only records before this log index.
    pub to_index: Option<u64>,
}

impl Window {
    fn holds(&self, index: u64, record: &AuditRecord) -> bool {
        let received = record.received_at.as_ref().map_or(0, |t| t.seconds);
        self.since.is_none_or(|since| received >= since)
            && self.from_index.is_none_or(|from| index >= from)
            && self.to_index.is_none_or(|to| index < to)
    }
}

/// A decision, then or now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "decision")]
pub enum Outcome {
    /// Allowed by `rule`.
    Allowed {
        /// The rule.
        rule: String,
    },
    /// No rule allows it.
    RefusedNoRule,
    /// `rule` allows it with the subject's consent, and there was none.
    RefusedNoConsent {
        /// The rule.
        rule: String,
    },
    /// `rule` allows it with the subject's consent, and the log does not
    /// show whether there was one (the old decision needed none).
    RefusedConsentNotOnRecord {
        /// The rule.
        rule: String,
    },
}

impl Outcome {
    fn allowed(&self) -> bool {
        matches!(self, Outcome::Allowed { .. })
    }

    /// The rule that decided, if one did.
    fn rule(&self) -> Option<&str> {
        match self {
            Outcome::Allowed { rule }
            | Outcome::RefusedNoConsent { rule }
            | Outcome::RefusedConsentNotOnRecord { rule } => Some(rule),
            Outcome::RefusedNoRule => None,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Allowed { rule } => write!(f, "allowed (rule {rule:?})"),
            Outcome::RefusedNoRule => f.write_str("refused (no rule allows it)"),
            Outcome::RefusedNoConsent { rule } => {
                write!(f, "refused (rule {rule:?} needs a consent there was not)")
            }
            Outcome::RefusedConsentNotOnRecord { rule } => write!(
                f,
                "refused (rule {rule:?} needs a consent the log does not show)"
            ),
        }
    }
}

/// One logged decision that would change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Changed {
    /// Its record's log index.
    pub index: u64,
    /// When the request came, Unix seconds.
    pub received_at: i64,
    /// The authority's id.
    pub caller: String,
    /// What it asked for.
    pub evidence_type: String,
    /// Why.
    pub purpose: String,
    /// Under which norm.
    pub legal_basis: String,
    /// The subject's pseudonym in the log (hex, its first 8 bytes).
    pub subject: String,
    /// Then.
    pub before: Outcome,
    /// Under the edited policy.
    pub after: Outcome,
}

impl Changed {
    /// allowed -> refused, or refused -> allowed.
    pub fn direction(&self) -> &'static str {
        if self.before.allowed() {
            "allowed -> refused"
        } else {
            "refused -> allowed"
        }
    }

    /// The rule it is grouped under: the one that allowed it then (for a
    /// decision now refused), or the one that allows it now.
    pub fn rule(&self) -> String {
        let rule = if self.before.allowed() {
            self.before.rule()
        } else {
            self.after.rule()
        };
        rule.unwrap_or("(no rule)").to_owned()
    }
}

/// What a dry run found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Records in the window that the policy decided, replayed.
    pub replayed: u64,
    /// Records in the window the policy did not decide (refused before it
    /// looked, replays of a request id, consent and audit events).
    pub skipped: u64,
    /// Decisions the edited policy would make only on a consent the log
    /// does not show either way: not counted as changes.
    pub undetermined: u64,
    /// The decisions that would change, in log order.
    pub changed: Vec<Changed>,
}

impl Report {
    /// The changes counted by rule and direction.
    pub fn by_rule(&self) -> BTreeMap<(String, &'static str), usize> {
        let mut counts = BTreeMap::new();
        for changed in &self.changed {
            *counts
                .entry((changed.rule(), changed.direction()))
                .or_default() += 1;
        }
        counts
    }

    /// The report for people: counts by rule, then every changed decision.
    pub fn table(&self) -> String {
        let mut out = format!(
            "replayed {} decision(s) ({} record(s) in the window not decided by the policy); {} would change\n",
            self.replayed,
            self.skipped,
            self.changed.len()
        );
        if self.undetermined > 0 {
            out.push_str(&format!(
                "{} decision(s) cannot be told: the edited policy asks for a consent the log does not show either way\n",
                self.undetermined
            ));
        }
        for ((rule, direction), count) in self.by_rule() {
            out.push_str(&format!("\nrule {rule:?}: {count} {direction}\n"));
            for changed in self
                .changed
                .iter()
                .filter(|c| c.rule() == rule && c.direction() == direction)
            {
                out.push_str(&format!(
                    "  #{} {} {} asked {} for {} under {:?}, subject {}: {} -> {}\n",
                    changed.index,
                    rfc3339(changed.received_at),
                    changed.caller,
                    changed.evidence_type,
                    changed.purpose,
                    changed.legal_basis,
                    changed.subject,
                    changed.before,
                    changed.after
                ));
            }
        }
        out
    }
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Replays `records` (index, record) in `window` under `policy`.
pub fn replay(
    records: impl IntoIterator<Item = (u64, AuditRecord)>,
    policy: &Policy,
    window: &Window,
) -> Report {
    let mut report = Report::default();
    for (index, record) in records {
        if !window.holds(index, &record) {
            continue;
        }
        let Some(before) = decided_then(&record) else {
            report.skipped += 1;
            continue;
        };
        report.replayed += 1;
        let caller = record
            .caller_id
            .rsplit_once("/authority/")
            .map_or(record.caller_id.as_str(), |(_, id)| id)
            .to_owned();
        let after = match policy.decide(
            &caller,
            &record.evidence_type,
            &record.purpose,
            &record.legal_basis,
        ) {
            Decision::Deny => Outcome::RefusedNoRule,
            Decision::Allow {
                rule,
                consent: ConsentRequirement::NotRequired,
            } => Outcome::Allowed { rule },
            Decision::Allow {
                rule,
                consent: ConsentRequirement::Required,
            } => {
                if record.error_reason() == ErrorReason::ConsentMissing {
                    Outcome::RefusedNoConsent { rule }
                } else if !record.consent_id.is_empty() {
                    Outcome::Allowed { rule }
                } else {
                    Outcome::RefusedConsentNotOnRecord { rule }
                }
            }
        };
        if matches!(after, Outcome::RefusedConsentNotOnRecord { .. }) {
            report.undetermined += 1;
            continue;
        }
        if before.allowed() != after.allowed() {
            report.changed.push(Changed {
                index,
                received_at: record.received_at.as_ref().map_or(0, |t| t.seconds),
                caller,
                evidence_type: record.evidence_type.clone(),
                purpose: record.purpose.clone(),
                legal_basis: record.legal_basis.clone(),
                subject: hex::encode(record.subject_pseudonym.get(..8).unwrap_or_default()),
                before,
                after,
            });
        }
    }
    report
}

/// What the policy decided for the exchange `record` logs; None where the
/// policy did not decide it.
fn decided_then(record: &AuditRecord) -> Option<Outcome> {
    if record.kind() != RecordKind::Unspecified || !record.replay_of_exchange_id.is_empty() {
        return None;
    }
    if record.error_reason() == ErrorReason::PolicyDenied {
        return Some(Outcome::RefusedNoRule);
    }
    if record.policy_rule.is_empty() {
        return None;
    }
    let rule = record.policy_rule.clone();
    Some(if record.error_reason() == ErrorReason::ConsentMissing {
        Outcome::RefusedNoConsent { rule }
    } else {
        Outcome::Allowed { rule }
    })
}
