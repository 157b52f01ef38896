//! What an edit of the policy changes, in words a person who owns the
//! rules reads: rules added, removed and changed (who, what, why, under
//! which norm, with whose consent), their order where it decides, and the
//! policy-wide settings (signed requests, encryption). The broker writes
//! it into the log entry of each policy it applies; `onceonly-policy diff`
//! prints it before.

use std::collections::BTreeSet;

use crate::policy::{ConsentRequirement, Policy, Rule};

/// The changes from `old` to `new`, one sentence each, in the new file's
/// order (removed rules last).
pub fn diff(old: &Policy, new: &Policy) -> Vec<String> {
    let mut changes = Vec::new();
    let find = |policy: &'_ Policy, id: &str| -> Option<(usize, Rule)> {
        policy
            .rules()
            .iter()
            .position(|r| r.id == id)
            .map(|p| (p, policy.rules()[p].clone()))
    };
    for (position, rule) in new.rules().iter().enumerate() {
        match find(old, &rule.id) {
            None => changes.push(format!(
                "rule {:?} added (line {}): {}",
                rule.id,
                rule.line,
                describe(rule)
            )),
            Some((old_position, before)) => {
                changes.extend(changed(&before, rule));
                if old_position != position && overlaps_any(new, rule) {
                    changes.push(format!(
                        "rule {:?} moved from position {} to {}: it overlaps other rules, so the order decides which one applies",
                        rule.id,
                        old_position + 1,
                        position + 1
                    ));
                }
            }
        }
    }
    for rule in old.rules() {
        if find(new, &rule.id).is_none() {
            changes.push(format!(
                "rule {:?} removed: it allowed {}; those requests are refused unless another rule allows them",
                rule.id,
                describe(rule)
            ));
        }
    }
    changes.extend(set_change(
        "authorities that may send unsigned requests",
        old.unsigned_allowed(),
        new.unsigned_allowed(),
    ));
    changes.extend(set_change(
        "evidence types released only encrypted",
        old.encryption_required(),
        new.encryption_required(),
    ));
    changes
}

/// A rule in words.
fn describe(rule: &Rule) -> String {
    format!(
        "{} to ask for {} for {} under {}, {}",
        list(&rule.callers),
        list(&rule.evidence_types),
        list(&rule.purposes),
        list(&rule.legal_bases),
        match rule.consent {
            ConsentRequirement::Required => "with the subject's consent",
            ConsentRequirement::NotRequired => "without the subject's consent",
        }
    )
}

fn list(items: &BTreeSet<String>) -> String {
    items.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// What changed in one rule.
fn changed(before: &Rule, after: &Rule) -> Vec<String> {
    let mut changes = Vec::new();
    for (what, old, new) in [
        ("authorities", &before.callers, &after.callers),
        (
            "evidence types",
            &before.evidence_types,
            &after.evidence_types,
        ),
        ("purposes", &before.purposes, &after.purposes),
        ("legal bases", &before.legal_bases, &after.legal_bases),
    ] {
        let added: BTreeSet<String> = new.difference(old).cloned().collect();
        let removed: BTreeSet<String> = old.difference(new).cloned().collect();
        if !added.is_empty() {
            changes.push(format!(
                "rule {:?} (line {}) now also allows {what} {}",
                after.id,
                after.line,
                list(&added)
            ));
        }
        if !removed.is_empty() {
            changes.push(format!(
                "rule {:?} (line {}) no longer allows {what} {}",
                after.id,
                after.line,
                list(&removed)
            ));
        }
    }
    if before.consent != after.consent {
        changes.push(format!(
            "rule {:?} (line {}) {}",
            after.id,
            after.line,
            match after.consent {
                ConsentRequirement::Required => "now needs the subject's consent",
                ConsentRequirement::NotRequired => "no longer needs the subject's consent",
            }
        ));
    }
    changes
}

/// Whether `rule` and another rule of `policy` can match the same request.
fn overlaps_any(policy: &Policy, rule: &Rule) -> bool {
    policy.rules().iter().any(|other| {
        other.id != rule.id
            && !other.callers.is_disjoint(&rule.callers)
            && !other.evidence_types.is_disjoint(&rule.evidence_types)
            && !other.purposes.is_disjoint(&rule.purposes)
            && !other.legal_bases.is_disjoint(&rule.legal_bases)
    })
}

fn set_change(what: &str, old: &BTreeSet<String>, new: &BTreeSet<String>) -> Vec<String> {
    let mut changes = Vec::new();
    let added: BTreeSet<String> = new.difference(old).cloned().collect();
    let removed: BTreeSet<String> = old.difference(new).cloned().collect();
    if !added.is_empty() {
        changes.push(format!("{what}: now also {}", list(&added)));
    }
    if !removed.is_empty() {
        changes.push(format!("{what}: no longer {}", list(&removed)));
    }
    changes
}
