//! The policy ("abstract authorization", the NOOTS Vermittlungsstelle's
//! check): rules of caller x evidence type x purpose x legal basis that
//! allow a request, and whether the subject's consent is required. Anything
//! no rule allows is denied.
//!
//! ```toml
//! [groups]
//! family-benefits = ["elterngeld-berlin", "kindergeld-nuernberg"]
//!
//! [[rule]]
//! id = "parental-allowance-birth-certificate"
//! callers = ["group:family-benefits"]        # authority ids, or group:<name>
//! evidence_types = ["birth-certificate"]
//! purposes = ["parental-allowance"]
//! legal_bases = ["§ 9 Abs. 1 BEEG"]
//! consent = "not-required"                   # or "required"
//! ```
//!
//! Where several rules allow a request, one that needs no consent wins: a
//! legal basis that suffices on its own suffices. [`PolicyStore`] holds the
//! policy in force and swaps in a new one only if it loads and checks
//! cleanly, so a broken edit never weakens or drops the old one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use onceonly_certs::config_file::{self, ConfigFileError, line_and_column};
use serde::Deserialize;
use toml::Spanned;

use crate::quota::{QuotaEntry, QuotaSpec, Quotas};
use crate::routing::RoutingTable;

/// Whether a rule needs the subject's consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConsentRequirement {
    /// The legal basis suffices.
    NotRequired,
    /// An active consent of the subject must exist.
    Required,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    id: Spanned<String>,
    callers: Spanned<Vec<String>>,
    evidence_types: Spanned<Vec<String>>,
    purposes: Spanned<Vec<String>>,
    legal_bases: Spanned<Vec<String>>,
    consent: ConsentRequirement,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    rule: Vec<RuleEntry>,
    #[serde(default)]
    quota: Vec<QuotaEntry>,
    #[serde(default)]
    default_quota: Option<QuotaSpec>,
    #[serde(default)]
    portal: Vec<PortalEntry>,
    #[serde(default)]
    encryption: Option<EncryptionEntry>,
    #[serde(default)]
    signed_requests: Option<SignedRequestsEntry>,
}

/// The `[signed_requests]` table: every authority signs each request,
/// except those listed while they move to signing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedRequestsEntry {
    /// Authorities (or `group:<name>`) whose unsigned requests are taken.
    unsigned_allowed: Spanned<Vec<String>>,
}

/// The authority ids `list` names (groups expanded); `key` says where, for
/// errors.
fn authorities(
    path: &Path,
    key: &str,
    list: &[String],
    groups: &BTreeMap<String, Vec<String>>,
) -> Result<BTreeSet<String>, ConfigFileError> {
    let mut ids = BTreeSet::new();
    for caller in list {
        if let Some(group) = caller.strip_prefix("group:") {
            let members = groups.get(group).ok_or_else(|| {
                ConfigFileError::invalid(
                    path,
                    key,
                    format!("group {group:?} is not defined"),
                    format!(
                        "add it under [groups] or fix the name ({})",
                        known(groups.keys().map(String::as_str))
                    ),
                )
            })?;
            ids.extend(members.iter().cloned());
        } else {
            onceonly_certs::identity::validate_id(caller).map_err(|e| {
                ConfigFileError::invalid(
                    path,
                    key,
                    e.to_string(),
                    "write an authority id, or group:<name>",
                )
            })?;
            ids.insert(caller.clone());
        }
    }
    Ok(ids)
}

/// The `[encryption]` table: evidence types released only encrypted to the
/// requester.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptionEntry {
    /// Evidence types a request must name an encryption certificate for.
    required_for: Spanned<Vec<String>>,
}

/// A `[[portal]]` entry: what a portal may record consents for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortalEntry {
    /// The portal's id.
    id: Spanned<String>,
    /// The evidence types it may grant and revoke consents for.
    evidence_types: Spanned<Vec<String>>,
}

/// One checked rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its id, quoted in audit logs and denials.
    pub id: String,
    /// The line of its `id` in the policy file, for findings about it.
    pub line: usize,
    /// Authority ids it covers (groups expanded).
    pub callers: BTreeSet<String>,
    /// Evidence types.
    pub evidence_types: BTreeSet<String>,
    /// Purposes.
    pub purposes: BTreeSet<String>,
    /// Legal bases.
    pub legal_bases: BTreeSet<String>,
    /// Consent.
    pub consent: ConsentRequirement,
}

/// What the policy says about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by `rule`; consent needed or not.
    Allow {
        /// The deciding rule.
        rule: String,
        /// Whether the subject's consent must be checked.
        consent: ConsentRequirement,
    },
    /// No rule allows it.
    Deny,
}

/// A checked policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    quotas: Arc<Quotas>,
    /// Portals scoped by a `[[portal]]` entry: the evidence types each may
    /// record consents for. A portal without an entry is not limited.
    portals: BTreeMap<String, BTreeSet<String>>,
    /// Evidence types released only encrypted to the requester.
    encryption_required: BTreeSet<String>,
    /// Authorities that may send requests they did not sign.
    unsigned_allowed: BTreeSet<String>,
}

impl Policy {
    /// Parses and checks policy TOML. Evidence types must be in `routing`'s
    /// catalogue; errors name the file, the line and the fix.
    pub fn parse(path: &Path, text: &str, routing: &RoutingTable) -> Result<Self, ConfigFileError> {
        let file: PolicyFile = config_file::parse_toml(path, text)?;
        let at = |span: std::ops::Range<usize>, key: &str| {
            let (line, _) = line_and_column(text, span.start);
            format!("line {line}: {key}")
        };
        for (group, members) in &file.groups {
            for member in members {
                onceonly_certs::identity::validate_id(member).map_err(|e| {
                    ConfigFileError::invalid(
                        path,
                        format!("groups.{group}"),
                        e.to_string(),
                        "list authority ids as in their certificates",
                    )
                })?;
            }
        }
        let quotas = Self::parse_quotas(path, text, &file)?;
        let mut encryption_required = BTreeSet::new();
        if let Some(entry) = &file.encryption {
            for evidence_type in entry.required_for.get_ref() {
                if routing.evidence_type(evidence_type).is_none() {
                    return Err(ConfigFileError::invalid(
                        path,
                        at(entry.required_for.span(), "encryption.required_for"),
                        format!("evidence type {evidence_type:?} is not in the catalogue"),
                        "use evidence type ids from the routing table",
                    ));
                }
                encryption_required.insert(evidence_type.clone());
            }
        }
        let mut portals = BTreeMap::new();
        for entry in &file.portal {
            let id = entry.id.get_ref();
            onceonly_certs::identity::validate_id(id).map_err(|e| {
                ConfigFileError::invalid(
                    path,
                    at(entry.id.span(), "portal.id"),
                    e.to_string(),
                    "write the portal's id as in its certificate",
                )
            })?;
            for evidence_type in entry.evidence_types.get_ref() {
                if routing.evidence_type(evidence_type).is_none() {
                    return Err(ConfigFileError::invalid(
                        path,
                        at(
                            entry.evidence_types.span(),
                            &format!("portal {id:?} evidence_types"),
                        ),
                        format!("evidence type {evidence_type:?} is not in the catalogue"),
                        "use evidence type ids from the routing table",
                    ));
                }
            }
            if portals
                .insert(
                    id.clone(),
                    entry.evidence_types.get_ref().iter().cloned().collect(),
                )
                .is_some()
            {
                return Err(ConfigFileError::invalid(
                    path,
                    at(entry.id.span(), "portal.id"),
                    format!("portal {id:?} has two entries"),
                    "give each portal one [[portal]] entry",
                ));
            }
        }
        let mut seen = BTreeSet::new();
        let mut rules = Vec::new();
        for entry in file.rule {
            let id = entry.id.get_ref().clone();
            if id.trim().is_empty() || !seen.insert(id.clone()) {
                return Err(ConfigFileError::invalid(
                    path,
                    at(entry.id.span(), "rule.id"),
                    format!("rule id {id:?} is empty or used twice"),
                    "give every rule its own id",
                ));
            }
            let callers = authorities(
                path,
                &at(entry.callers.span(), &format!("rule {id:?} callers")),
                entry.callers.get_ref(),
                &file.groups,
            )?;
            for evidence_type in entry.evidence_types.get_ref() {
                if routing.evidence_type(evidence_type).is_none() {
                    let catalogue = routing
                        .evidence_types()
                        .into_iter()
                        .map(|t| t.entry.id.as_str());
                    return Err(ConfigFileError::invalid(
                        path,
                        at(
                            entry.evidence_types.span(),
                            &format!("rule {id:?} evidence_types"),
                        ),
                        format!(
                            "evidence type {evidence_type:?} is not in the routing table's catalogue"
                        ),
                        format!("use one of: {}", known(catalogue)),
                    ));
                }
            }
            for (name, list) in [
                ("callers", &entry.callers),
                ("evidence_types", &entry.evidence_types),
                ("purposes", &entry.purposes),
                ("legal_bases", &entry.legal_bases),
            ] {
                if list.get_ref().iter().all(|v| v.trim().is_empty()) {
                    return Err(ConfigFileError::invalid(
                        path,
                        at(list.span(), &format!("rule {id:?} {name}")),
                        "is empty",
                        "list at least one value; a rule must say exactly whom, what and why it allows",
                    ));
                }
            }
            rules.push(Rule {
                line: line_and_column(text, entry.id.span().start).0,
                id,
                callers,
                evidence_types: entry.evidence_types.into_inner().into_iter().collect(),
                purposes: entry.purposes.into_inner().into_iter().collect(),
                legal_bases: entry.legal_bases.into_inner().into_iter().collect(),
                consent: entry.consent,
            });
        }

        let unsigned_allowed = match &file.signed_requests {
            Some(entry) => authorities(
                path,
                &at(
                    entry.unsigned_allowed.span(),
                    "signed_requests.unsigned_allowed",
                ),
                entry.unsigned_allowed.get_ref(),
                &file.groups,
            )?,
            None => BTreeSet::new(),
        };

        Ok(Policy {
            rules,
            quotas: Arc::new(quotas),
            portals,
            encryption_required,
            unsigned_allowed,
        })
    }

    /// Whether `caller_id` must sign its requests: every authority must,
    /// unless `[signed_requests] unsigned_allowed` names it.
    pub fn requires_signed_requests(&self, caller_id: &str) -> bool {
        !self.unsigned_allowed.contains(caller_id)
    }

    /// Checks and builds the `[[quota]]` entries and `[default_quota]`.
    fn parse_quotas(path: &Path, text: &str, file: &PolicyFile) -> Result<Quotas, ConfigFileError> {
        let at = |span: std::ops::Range<usize>, key: &str| {
            let (line, _) = line_and_column(text, span.start);
            format!("line {line}: {key}")
        };
        let mut seen = BTreeSet::new();
        for entry in &file.quota {
            let key = at(
                entry.callers.span(),
                &format!("quota {:?} callers", entry.id),
            );
            if entry.id.trim().is_empty() || !seen.insert(entry.id.clone()) {
                return Err(ConfigFileError::invalid(
                    path,
                    key,
                    format!("quota id {:?} is empty or used twice", entry.id),
                    "give every quota its own id",
                ));
            }
            if !entry.spec.is_valid() {
                return Err(ConfigFileError::invalid(
                    path,
                    key,
                    format!("quota {:?} gives {}", entry.id, entry.spec),
                    "give exactly one of per_second and per_minute",
                ));
            }
            if entry.callers.get_ref().is_empty() {
                return Err(ConfigFileError::invalid(
                    path,
                    key,
                    "is empty",
                    "list the authority ids or group:<name> the quota applies to",
                ));
            }
            for caller in entry.callers.get_ref() {
                match caller.strip_prefix("group:") {
                    Some(group) if !file.groups.contains_key(group) => {
                        return Err(ConfigFileError::invalid(
                            path,
                            key,
                            format!("group {group:?} is not defined"),
                            format!(
                                "add it under [groups] or fix the name ({})",
                                known(file.groups.keys().map(String::as_str))
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => onceonly_certs::identity::validate_id(caller).map_err(|e| {
                        ConfigFileError::invalid(
                            path,
                            key.clone(),
                            e.to_string(),
                            "write an authority id, or group:<name>",
                        )
                    })?,
                }
            }
        }
        if let Some(spec) = file.default_quota
            && !spec.is_valid()
        {
            return Err(ConfigFileError::invalid(
                path,
                "default_quota",
                format!("gives {spec}"),
                "give exactly one of per_second and per_minute",
            ));
        }
        Quotas::build(&file.quota, &file.groups, file.default_quota).map_err(
            |(position, conflict)| {
                let entry = &file.quota[position];
                ConfigFileError::invalid(
                    path,
                    at(entry.callers.span(), &format!("quota {:?} callers", entry.id)),
                    format!(
                        "{} is already limited by quota {:?}, and would also be by {:?}",
                        conflict.caller, conflict.quotas.0, conflict.quotas.1
                    ),
                    "name each authority in at most one quota directly and in at most one group quota",
                )
            },
        )
    }

    /// The request quotas in force.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Whether evidence of `evidence_type` may only be released encrypted
    /// to the requester (`[encryption] required_for`).
    pub fn requires_encryption(&self, evidence_type: &str) -> bool {
        self.encryption_required.contains(evidence_type)
    }

    /// Whether portal `portal_id` may record consents for `evidence_type`.
    pub fn portal_may(&self, portal_id: &str, evidence_type: &str) -> bool {
        self.portals
            .get(portal_id)
            .is_none_or(|types| types.contains(evidence_type))
    }

    /// Decides a request by the caller's id (authority id).
    pub fn decide(
        &self,
        caller_id: &str,
        evidence_type: &str,
        purpose: &str,
        legal_basis: &str,
    ) -> Decision {
        let mut decision = Decision::Deny;
        for rule in &self.rules {
            let matches = rule.callers.contains(caller_id)
                && rule.evidence_types.contains(evidence_type)
                && rule.purposes.contains(purpose)
                && rule.legal_bases.contains(legal_basis);
            if !matches {
                continue;
            }
            if rule.consent == ConsentRequirement::NotRequired {
                return Decision::Allow {
                    rule: rule.id.clone(),
                    consent: ConsentRequirement::NotRequired,
                };
            }
            if decision == Decision::Deny {
                decision = Decision::Allow {
                    rule: rule.id.clone(),
                    consent: ConsentRequirement::Required,
                };
            }
        }
        decision
    }

    /// The evidence types `caller_id` may request for some purpose, with
    /// whether every allowing rule needs consent.
    pub fn allowed_types(&self, caller_id: &str) -> HashMap<String, bool> {
        let mut allowed: HashMap<String, bool> = HashMap::new();
        for rule in self.rules.iter().filter(|r| r.callers.contains(caller_id)) {
            for evidence_type in &rule.evidence_types {
                let needs = rule.consent == ConsentRequirement::Required;
                allowed
                    .entry(evidence_type.clone())
                    .and_modify(|all_need| *all_need &= needs)
                    .or_insert(needs);
            }
        }
        allowed
    }

    /// The rules, in the file's order (the order [`Policy::decide`] reads
    /// them in).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The authorities that may send unsigned requests.
    pub fn unsigned_allowed(&self) -> &BTreeSet<String> {
        &self.unsigned_allowed
    }

    /// The evidence types released only encrypted.
    pub fn encryption_required(&self) -> &BTreeSet<String> {
        &self.encryption_required
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules (everything is denied).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

fn known<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    if names.is_empty() {
        "none defined".into()
    } else {
        names.join(", ")
    }
}

/// The policy in force, reloadable from its file.
#[derive(Debug)]
pub struct PolicyStore {
    path: PathBuf,
    current: RwLock<Arc<Policy>>,
    routing: Arc<RoutingTable>,
    /// Reloads tried, whether they took or not.
    reloads: std::sync::atomic::AtomicU64,
}

impl PolicyStore {
    /// Loads the policy at `path`; fails where it does not check.
    pub fn load(path: &Path, routing: Arc<RoutingTable>) -> Result<Self, ConfigFileError> {
        let policy = Self::read(path, &routing)?;
        Ok(Self::with_policy(path, policy, routing))
    }

    /// A store holding `policy`, reloaded from `path` (tests, and tools
    /// that check a policy text before it is a file).
    pub fn with_policy(path: &Path, policy: Policy, routing: Arc<RoutingTable>) -> Self {
        PolicyStore {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(policy)),
            routing,
            reloads: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn read(path: &Path, routing: &RoutingTable) -> Result<Policy, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Policy::parse(path, &text, routing)
    }

    /// The policy in force. Requests take it once and decide with it.
    pub fn current(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Re-reads the file; on any error the policy in force stays.
    pub fn reload(&self) -> Result<usize, ConfigFileError> {
        let tried = Self::read(&self.path, &self.routing);
        self.reloads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let policy = tried?;
        let rules = policy.len();
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(policy);
        Ok(rules)
    }

    /// Reloads tried so far (from the file watcher or SIGHUP), whether the
    /// file checked or not.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The policy file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing() -> RoutingTable {
        RoutingTable::parse(
            Path::new("routing.toml"),
            r#"
[connectors.civil-register]
endpoints = ["127.0.0.1:7101"]
[[evidence_types]]
id = "birth-certificate"
subject_schemes = ["DE_IDNR"]
routes = [{ connector = "civil-register" }]
[[evidence_types]]
id = "proof-of-residence"
subject_schemes = ["DE_IDNR"]
routes = [{ connector = "civil-register" }]
"#,
        )
        .expect("routing")
    }

    const POLICY: &str = r#"
[groups]
family = ["elterngeld-berlin", "kindergeld"]

[[rule]]
id = "birth"
callers = ["group:family"]
evidence_types = ["birth-certificate"]
purposes = ["parental-allowance"]
legal_bases = ["§ 9 BEEG"]
consent = "not-required"

[[rule]]
id = "residence-with-consent"
callers = ["elterngeld-berlin"]
evidence_types = ["proof-of-residence"]
purposes = ["parental-allowance"]
legal_bases = ["§ 9 BEEG"]
consent = "required"
"#;

    #[test]
    fn decides_by_all_four_dimensions_and_denies_by_default() {
        let policy = Policy::parse(Path::new("p.toml"), POLICY, &routing()).expect("parses");
        assert_eq!(
            policy.decide(
                "kindergeld",
                "birth-certificate",
                "parental-allowance",
                "§ 9 BEEG"
            ),
            Decision::Allow {
                rule: "birth".into(),
                consent: ConsentRequirement::NotRequired
            }
        );
        assert_eq!(
            policy.decide(
                "elterngeld-berlin",
                "proof-of-residence",
                "parental-allowance",
                "§ 9 BEEG"
            ),
            Decision::Allow {
                rule: "residence-with-consent".into(),
                consent: ConsentRequirement::Required
            }
        );
        for (caller, evidence, purpose, basis) in [
            (
                "kindergeld",
                "proof-of-residence",
                "parental-allowance",
                "§ 9 BEEG",
            ),
            (
                "elterngeld-berlin",
                "birth-certificate",
                "curiosity",
                "§ 9 BEEG",
            ),
            (
                "elterngeld-berlin",
                "birth-certificate",
                "parental-allowance",
                "§ 1 BGB",
            ),
            (
                "stranger",
                "birth-certificate",
                "parental-allowance",
                "§ 9 BEEG",
            ),
        ] {
            assert_eq!(
                policy.decide(caller, evidence, purpose, basis),
                Decision::Deny,
                "{caller} {evidence} {purpose} {basis}"
            );
        }
        assert!(Policy::default().decide("x", "y", "z", "w") == Decision::Deny);
    }

    #[test]
    fn lists_allowed_types_with_consent_flags() {
        let policy = Policy::parse(Path::new("p.toml"), POLICY, &routing()).expect("parses");
        let allowed = policy.allowed_types("elterngeld-berlin");
        assert_eq!(allowed.get("birth-certificate"), Some(&false));
        assert_eq!(allowed.get("proof-of-residence"), Some(&true));
        assert!(policy.allowed_types("stranger").is_empty());
    }

    #[test]
    fn errors_name_file_line_and_fix() {
        let broken = POLICY.replace("group:family", "group:famly");
        let message = Policy::parse(Path::new("policy.toml"), &broken, &routing())
            .expect_err("unknown group")
            .to_string();
        assert!(message.starts_with("policy.toml: line 7:"), "{message}");
        assert!(
            message.contains("group \"famly\" is not defined"),
            "{message}"
        );
        assert!(
            message.contains("family"),
            "names the known groups: {message}"
        );

        let broken = POLICY.replace("[\"proof-of-residence\"]", "[\"passport\"]");
        let message = Policy::parse(Path::new("policy.toml"), &broken, &routing())
            .expect_err("unknown type")
            .to_string();
        assert!(message.contains("line 16"), "{message}");
        assert!(
            message.contains("birth-certificate, proof-of-residence"),
            "{message}"
        );

        let broken = POLICY.replace("consent = \"required\"", "consent = \"maybe\"");
        let message = Policy::parse(Path::new("policy.toml"), &broken, &routing())
            .expect_err("bad consent")
            .to_string();
        assert!(message.starts_with("policy.toml:19:"), "{message}");

        let broken = POLICY.replace("purposes = [\"parental-allowance\"]\nlegal_bases = [\"§ 9 BEEG\"]\nconsent = \"not-required\"", "purposes = []\nlegal_bases = [\"§ 9 BEEG\"]\nconsent = \"not-required\"");
        let message = Policy::parse(Path::new("policy.toml"), &broken, &routing())
            .expect_err("empty purposes")
            .to_string();
        assert!(
            message.contains("purposes") && message.contains("is empty"),
            "{message}"
        );
    }

    #[test]
    fn quotas_are_read_checked_and_enforced() {
        let with_quota = format!(
            "{POLICY}\n[[quota]]\nid = \"family\"\ncallers = [\"group:family\"]\nper_minute = 1\nburst = 1\n"
        );
        let policy =
            Policy::parse(Path::new("policy.toml"), &with_quota, &routing()).expect("parses");
        assert!(policy.quotas().check("kindergeld").is_ok());
        let over = policy
            .quotas()
            .check("elterngeld-berlin")
            .expect_err("the group shares one request a minute");
        assert_eq!(over.quota, "family: 1/min, burst 1");
        assert!(
            policy.quotas().check("stranger").is_ok(),
            "no quota, no limit"
        );

        let both = with_quota.replace("per_minute = 1", "per_minute = 1\nper_second = 1");
        let message = Policy::parse(Path::new("policy.toml"), &both, &routing())
            .expect_err("two rates")
            .to_string();
        assert!(message.contains("line 23"), "{message}");
        assert!(
            message.contains("exactly one of per_second and per_minute"),
            "{message}"
        );

        let unknown = with_quota.replace("group:family\"]\nper", "group:famly\"]\nper");
        let message = Policy::parse(Path::new("policy.toml"), &unknown, &routing())
            .expect_err("unknown group")
            .to_string();
        assert!(
            message.contains("group \"famly\" is not defined"),
            "{message}"
        );

        let twice = format!(
            "{with_quota}\n[[quota]]\nid = \"again\"\ncallers = [\"group:family\"]\nper_second = 5\nburst = 5\n"
        );
        let message = Policy::parse(Path::new("policy.toml"), &twice, &routing())
            .expect_err("conflict")
            .to_string();
        assert!(message.contains("already limited by quota"), "{message}");
    }

    #[test]
    fn broken_reload_keeps_the_policy_in_force() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, POLICY).expect("write");
        let store = PolicyStore::load(&path, Arc::new(routing())).expect("loads");
        assert_eq!(store.current().len(), 2);
        std::fs::write(&path, "[[rule]\nid = ").expect("write");
        assert!(store.reload().is_err());
        assert_eq!(
            store.current().len(),
            2,
            "the broken edit replaced the policy"
        );
        std::fs::write(
            &path,
            POLICY
                .split("[[rule]]\nid = \"residence")
                .next()
                .expect("part"),
        )
        .expect("write");
        assert_eq!(store.reload().expect("reloads"), 1);
        assert_eq!(store.current().len(), 1);
    }
}
