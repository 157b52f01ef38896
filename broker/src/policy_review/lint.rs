//! What in a policy can never take effect, or reaches further than meant.
//! The broker refuses what is wrong outright (unknown evidence types,
//! undefined groups, empty lists: [`crate::policy::Policy::parse`]);
//! these are the findings a file that loads can still have:
//!
//! - a rule that can never match: its callers are an empty group;
//! - a rule shadowed by earlier ones: for every caller, evidence type,
//!   purpose and legal basis it names, another rule decides first (the
//!   broker takes the first rule that needs no consent, else the first
//!   that needs one), so it never decides anything;
//! - an authority the trust domain never issued a certificate to (given
//!   the CA's directory): a typo, or a rule for nobody yet;
//! - a broad rule: one that lets more authorities than a threshold ask.

use std::collections::BTreeSet;

use crate::policy::Policy;

/// The most caller x evidence type x purpose x legal basis combinations a
/// rule's shadowing is worked out for; a rule naming more is not checked
/// for shadowing (and is found broad long before).
const MAX_COMBINATIONS: usize = 100_000;

/// What kind of finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The rule can never match a request.
    NeverMatches,
    /// Earlier rules decide everything the rule names.
    Shadowed,
    /// The rule names an authority without a certificate.
    UnknownAuthority,
    /// The rule lets more authorities ask than the threshold.
    Broad,
    /// The rule names too many combinations to be checked for shadowing.
    NotChecked,
}

/// One finding, at the line of the rule it is about.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// The rule's line (its `id`).
    pub line: usize,
    /// The rule.
    pub rule: String,
    /// What kind.
    pub kind: Kind,
    /// What a person reads, with the fix.
    pub message: String,
}

/// How [`check`] judges.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The authorities the trust domain issued certificates to; unknown
    /// authorities are not looked for where None.
    pub known_authorities: Option<BTreeSet<String>>,
    /// A rule letting more authorities than this ask is broad.
    pub broad: usize,
}

/// The findings about `policy`, in the file's order.
pub fn check(policy: &Policy, options: &Options) -> Vec<Finding> {
    let mut findings = Vec::new();
    let rules = policy.rules();
    for (position, rule) in rules.iter().enumerate() {
        let mut finding = |kind, message: String| {
            findings.push(Finding {
                line: rule.line,
                rule: rule.id.clone(),
                kind,
                message,
            });
        };
        if rule.callers.is_empty() {
            finding(
                Kind::NeverMatches,
                "its callers are an empty group, so it can never match: add the authorities to the group, or remove the rule".into(),
            );
            continue;
        }
        if let Some(known) = &options.known_authorities {
            let unknown: Vec<&str> = rule
                .callers
                .iter()
                .filter(|caller| !known.contains(*caller))
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                finding(
                    Kind::UnknownAuthority,
                    format!(
                        "names {} with no certificate in the trust domain: check the spelling, or issue the certificate (onceonly-certs issue --role authority --id ...)",
                        unknown.join(", ")
                    ),
                );
            }
        }
        if options.broad > 0 && rule.callers.len() > options.broad {
            finding(
                Kind::Broad,
                format!(
                    "lets {} authorities ask, more than {}: check that the law allows each of them, or split the rule",
                    rule.callers.len(),
                    options.broad
                ),
            );
        }
        match shadowed_by(policy, position) {
            Shadowing::Shadowed(deciders) => finding(
                Kind::Shadowed,
                format!(
                    "decides nothing: rule(s) {} decide every request it names first (a rule without consent before one with; otherwise the earlier one). Remove it, or narrow the earlier rule (it still shows in ListEvidenceTypes)",
                    deciders.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ),
            Shadowing::TooMany => finding(
                Kind::NotChecked,
                format!(
                    "names more than {MAX_COMBINATIONS} caller x evidence type x purpose x legal basis combinations, too many to check whether earlier rules shadow it: split it"
                ),
            ),
            Shadowing::Decides => {}
        }
    }
    findings
}

/// Whether a rule decides anything.
enum Shadowing {
    /// It decides some request.
    Decides,
    /// These rules decide every request it names.
    Shadowed(BTreeSet<String>),
    /// Too many combinations to work out.
    TooMany,
}

/// Whether rule `position` decides any request it names.
fn shadowed_by(policy: &Policy, position: usize) -> Shadowing {
    let rules = policy.rules();
    let rule = &rules[position];
    let combinations = [
        rule.evidence_types.len(),
        rule.purposes.len(),
        rule.legal_bases.len(),
    ]
    .into_iter()
    .try_fold(rule.callers.len(), usize::checked_mul);
    if combinations.is_none_or(|n| n > MAX_COMBINATIONS) {
        return Shadowing::TooMany;
    }
    let mut deciders = BTreeSet::new();
    for caller in &rule.callers {
        for evidence_type in &rule.evidence_types {
            for purpose in &rule.purposes {
                for legal_basis in &rule.legal_bases {
                    match policy.deciding_rule(caller, evidence_type, purpose, legal_basis) {
                        Some(decider) if decider != position => {
                            deciders.insert(rules[decider].id.clone());
                        }
                        _ => return Shadowing::Decides,
                    }
                }
            }
        }
    }
    Shadowing::Shadowed(deciders)
}
