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
    /// Authorities that may send unsigned requests.
    unsigned_allowed: BTreeSet<String>,
    /// SHA-256 of the text it was parsed from.
    sha256: [u8; 32],
    /// That text.
    text: Arc<str>,
    /// Its version at this broker ([`PolicyStore`] counts them; 0 until
    /// it is in force with a history).
    version: u64,
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
            sha256: {
                use sha2::Digest;
                sha2::Sha256::digest(text.as_bytes()).into()
            },
            text: Arc::from(text),
            version: 0,
        })
    }

    /// SHA-256 of the text it was parsed from: its name in the log.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// The text it was parsed from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Its version at this broker (0 where no history is kept).
    pub fn version(&self) -> u64 {
        self.version
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
        match self.deciding_rule(caller_id, evidence_type, purpose, legal_basis) {
            Some(rule) => Decision::Allow {
                rule: self.rules[rule].id.clone(),
                consent: self.rules[rule].consent,
            },
            None => Decision::Deny,
        }
    }

    /// Which rule decides a request (its position): the first matching
    /// rule that needs no consent, else the first matching one; None where
    /// none matches. [`Policy::decide`] and the policy linter both ask it.
    pub fn deciding_rule(
        &self,
        caller_id: &str,
        evidence_type: &str,
        purpose: &str,
        legal_basis: &str,
    ) -> Option<usize> {
        let mut first_with_consent = None;
        for (index, rule) in self.rules.iter().enumerate() {
            let matches = rule.callers.contains(caller_id)
                && rule.evidence_types.contains(evidence_type)
                && rule.purposes.contains(purpose)
                && rule.legal_bases.contains(legal_basis);
            if !matches {
                continue;
            }
            if rule.consent == ConsentRequirement::NotRequired {
                return Some(index);
            }
            first_with_consent.get_or_insert(index);
        }
        first_with_consent
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

/// The policy in force, reloadable from its file, with its history: every
/// policy put in force is kept under its digest in a folder beside the log
/// (where [`PolicyStore::keep_history`] named one) and waits, as an
/// [`Applied`], for the broker to write its log entry.
#[derive(Debug)]
pub struct PolicyStore {
    path: PathBuf,
    current: RwLock<Arc<Policy>>,
    routing: Arc<RoutingTable>,
    /// Reloads tried, whether they took or not.
    reloads: std::sync::atomic::AtomicU64,
    /// Where texts are kept, by digest.
    history: std::sync::OnceLock<PathBuf>,
    /// Policies put in force whose log entries are not written yet.
    applied: std::sync::Mutex<Vec<Applied>>,
    /// Told when one is added.
    applied_notify: tokio::sync::Notify,
    /// Held from reading a file to putting it in force: the file watcher
    /// and SIGHUP may reload at once, and versions must follow one order.
    reloading: std::sync::Mutex<()>,
}

/// Why [`PolicyStore::apply_text`] put nothing in force.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Another policy was put in force since the change was reviewed.
    #[error(
        "the policy in force changed (it is now version {version}) since this change was reviewed; review it again against the policy in force"
    )]
    Changed {
        /// The version in force now.
        version: u64,
    },
    /// The text is the policy in force.
    #[error("this text is the policy in force already; nothing to apply")]
    Unchanged,
    /// The policy file was edited since the policy in force was read from
    /// it (an edit not reloaded yet, or one the broker refused).
    #[error(
        "{path} was edited by hand and differs from the policy in force; reload it (or undo the edit), then review the change again"
    )]
    FileEdited {
        /// The policy file.
        path: PathBuf,
    },
    /// The text does not check, or the file could not be written.
    #[error(transparent)]
    Invalid(#[from] ConfigFileError),
}

/// A policy put in force, for its log entry.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The policy (its digest, version and text).
    pub policy: Arc<Policy>,
    /// Who or what applied it.
    pub by: String,
    /// The policy in force before it, where there was one.
    pub previous: Option<Arc<Policy>>,
}

/// The file in the history folder naming the version in force and its
/// digest: "<version> <hex>".
const CURRENT: &str = "current";

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
            history: std::sync::OnceLock::new(),
            applied: std::sync::Mutex::new(Vec::new()),
            applied_notify: tokio::sync::Notify::new(),
            reloading: std::sync::Mutex::new(()),
        }
    }

    /// Keeps the history in `dir` (the data directory's `policies`): the
    /// policy in force gets its version (the one recorded there, or one
    /// more where its text differs), its text is kept under its digest,
    /// and it waits for its log entry, applied by `by`.
    pub fn keep_history(&self, dir: &Path, by: &str) -> Result<(), ConfigFileError> {
        std::fs::create_dir_all(dir).map_err(|source| ConfigFileError::Read {
            path: dir.to_owned(),
            source,
        })?;
        let _reloading = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.history.set(dir.to_owned());
        let recorded = std::fs::read_to_string(dir.join(CURRENT))
            .ok()
            .and_then(|line| {
                let (version, hex) = line.trim().split_once(' ')?;
                Some((version.parse::<u64>().ok()?, hex.to_owned()))
            });
        let policy = self.current();
        let (version, previous) = match recorded {
            Some((version, hex)) if hex == hex::encode(policy.sha256) => (version, None),
            Some((version, hex)) => {
                // Changed while the broker was down: the entry says what
                // changed against the text it last had in force, where that
                // is kept and still reads.
                let kept = dir.join(format!("{hex}.toml"));
                let previous = std::fs::read_to_string(&kept)
                    .ok()
                    .and_then(|text| Policy::parse(&kept, &text, &self.routing).ok())
                    .map(|mut previous| {
                        previous.version = version;
                        Arc::new(previous)
                    });
                (version + 1, previous)
            }
            None => (1, None),
        };
        self.put_in_force((*policy).clone(), version, by, previous)
    }

    /// Keeps `policy`'s text, puts it in force as `version`, and queues
    /// its log entry.
    fn put_in_force(
        &self,
        mut policy: Policy,
        version: u64,
        by: &str,
        previous: Option<Arc<Policy>>,
    ) -> Result<(), ConfigFileError> {
        policy.version = version;
        if let Some(dir) = self.history.get() {
            let hex = hex::encode(policy.sha256);
            let file = dir.join(format!("{hex}.toml"));
            let current = dir.join(CURRENT);
            // Kept once; a kept copy that no longer hashes to its name (the
            // disk, or someone with it) is written again.
            let intact = std::fs::read(&file).is_ok_and(|kept| {
                use sha2::Digest;
                sha2::Sha256::digest(&kept).as_slice() == policy.sha256
            });
            if !intact {
                onceonly_certs::pki::replace_synced(&file, policy.text.as_bytes()).map_err(
                    |source| ConfigFileError::Read {
                        path: file.clone(),
                        source,
                    },
                )?;
            }
            onceonly_certs::pki::replace_synced(&current, format!("{version} {hex}\n").as_bytes())
                .map_err(|source| ConfigFileError::Read {
                    path: current.clone(),
                    source,
                })?;
        }
        let policy = Arc::new(policy);
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = policy.clone();
        if self.history.get().is_some() {
            self.applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Applied {
                    policy,
                    by: by.to_owned(),
                    previous,
                });
            self.applied_notify.notify_one();
        }
        Ok(())
    }

    /// The oldest policy put in force whose log entry is still to be
    /// written, left in the queue until [`Self::written`] says it is (so
    /// that an entry is never lost between being taken and written);
    /// waits for one where there is none.
    pub async fn next_applied(&self) -> Applied {
        loop {
            let first = self
                .applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .first()
                .cloned();
            if let Some(first) = first {
                return first;
            }
            self.applied_notify.notified().await;
        }
    }

    /// Whether the log entry of `version` is still queued (not written).
    pub fn entry_pending(&self, version: u64) -> bool {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|applied| applied.policy.version() == version)
    }

    /// The oldest queued entry was written: takes it from the queue.
    pub fn written(&self) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if !applied.is_empty() {
            applied.remove(0);
        }
    }

    /// Puts back entries that could not be written, before any newer.
    pub fn requeue(&self, mut entries: Vec<Applied>) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        entries.append(&mut applied);
        *applied = entries;
        self.applied_notify.notify_one();
    }

    /// The policies put in force whose log entries are still to be
    /// written, without waiting.
    pub fn take_applied(&self) -> Vec<Applied> {
        std::mem::take(&mut *self.applied.lock().unwrap_or_else(|p| p.into_inner()))
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
        self.reload_by("a change of the policy file")
    }

    /// [`Self::reload`], saying who or what asked for it in the log entry.
    pub fn reload_by(&self, by: &str) -> Result<usize, ConfigFileError> {
        self.reload_from_file(by, true)
            .map(|rules| rules.unwrap_or_default())
    }

    /// [`Self::reload_by`], only where the file's text differs from the
    /// policy in force: the file watcher's reload, so that a file written
    /// again with the same text (by [`Self::apply_text`], say) puts nothing
    /// in force and writes no log entry. Ok(None) where unchanged.
    pub fn reload_if_changed(&self, by: &str) -> Result<Option<usize>, ConfigFileError> {
        self.reload_from_file(by, false)
    }

    /// Reads the file and puts it in force as `by` applied it: the same
    /// text again only where `even_unchanged` (then under its version).
    /// The rules put in force; None where the text was unchanged and left.
    fn reload_from_file(
        &self,
        by: &str,
        even_unchanged: bool,
    ) -> Result<Option<usize>, ConfigFileError> {
        let _reloading = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let tried = Self::read(&self.path, &self.routing);
        self.reloads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let policy = tried?;
        let rules = policy.len();
        let before = self.current();
        let version = if policy.sha256 != before.sha256 {
            before.version + 1
        } else if even_unchanged {
            before.version
        } else {
            return Ok(None);
        };
        self.put_in_force(policy, version, by, Some(before))?;
        Ok(Some(rules))
    }

    /// Puts `text` in force as the policy `by` applied (the console's
    /// apply): checked as a reload checks the file, then written to the
    /// policy file (synced, replaced whole) and put in force under one
    /// lock, so that the file watcher cannot claim it. Only where the
    /// policy in force is still `expected_sha256` (what the person
    /// reviewed the change against): [`ApplyError::Changed`] otherwise.
    /// Returns the policy now in force.
    pub fn apply_text(
        &self,
        text: &str,
        expected_sha256: &[u8; 32],
        by: &str,
    ) -> Result<Arc<Policy>, ApplyError> {
        let _reloading = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.current();
        if before.sha256 != *expected_sha256 {
            return Err(ApplyError::Changed {
                version: before.version,
            });
        }
        let policy = Policy::parse(&self.path, text, &self.routing)?;
        if policy.sha256 == before.sha256 {
            return Err(ApplyError::Unchanged);
        }
        // A hand edit of the file not yet reloaded (or refused) is not
        // overwritten unseen.
        let on_disk = std::fs::read(&self.path).map_err(|source| ConfigFileError::Read {
            path: self.path.clone(),
            source,
        })?;
        {
            use sha2::Digest;
            if sha2::Sha256::digest(&on_disk).as_slice() != before.sha256 {
                return Err(ApplyError::FileEdited {
                    path: self.path.clone(),
                });
            }
        }
        let written = onceonly_certs::pki::replace_synced(&self.path, text.as_bytes());
        let put = written
            .map_err(|source| ConfigFileError::Read {
                path: self.path.clone(),
                source,
            })
            .and_then(|()| self.put_in_force(policy, before.version + 1, by, Some(before.clone())));
        if let Err(error) = put {
            // Nothing applied means nothing applied: the file goes back to
            // the policy in force, or the file watcher would put the text
            // in force in nobody's name.
            if let Err(restore) = onceonly_certs::pki::replace_synced(&self.path, &on_disk) {
                tracing::error!(file = %self.path.display(), %restore, "the policy file could not be restored after a failed apply; check it before the next reload");
            }
            return Err(error.into());
        }
        Ok(self.current())
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

    #[test]
    fn each_policy_put_in_force_is_kept_by_digest_and_counted_once_per_text() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("policy.toml");
        let history = dir.path().join("data/policies");
        std::fs::write(&path, POLICY).expect("write");
        let store = PolicyStore::load(&path, Arc::new(routing())).expect("loads");
        assert!(store.take_applied().is_empty(), "no history kept yet");
        store.keep_history(&history, "start").expect("history");
        let first = store.current();
        assert_eq!(first.version(), 1);
        let kept = history.join(format!("{}.toml", hex::encode(first.sha256())));
        assert_eq!(std::fs::read_to_string(&kept).expect("kept"), POLICY);
        let applied = store.take_applied();
        assert_eq!(applied.len(), 1);
        assert_eq!(applied[0].by, "start");

        // The same text again: an entry, the same version.
        store.reload_by("SIGHUP").expect("reloads");
        assert_eq!(store.current().version(), 1);
        // Another text: the next version, with what changed.
        let shorter = POLICY
            .split("[[rule]]\nid = \"residence")
            .next()
            .expect("part");
        std::fs::write(&path, shorter).expect("write");
        store.reload_by("SIGHUP").expect("reloads");
        assert_eq!(store.current().version(), 2);
        let applied = store.take_applied();
        assert_eq!(
            applied
                .iter()
                .map(|a| a.policy.version())
                .collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(
            applied[1].previous.as_ref().map(|p| p.version()),
            Some(1),
            "the entry knows what it replaced"
        );
        // Entries that could not be written go back before newer ones.
        store.requeue(applied.clone());
        assert_eq!(store.take_applied().len(), 2);

        // A restart on the same data directory resumes the count; on a
        // new text, one more.
        let again = PolicyStore::load(&path, Arc::new(routing())).expect("loads");
        again.keep_history(&history, "start").expect("history");
        assert_eq!(again.current().version(), 2);
        std::fs::write(&path, POLICY).expect("write");
        let third = PolicyStore::load(&path, Arc::new(routing())).expect("loads");
        third.keep_history(&history, "start").expect("history");
        assert_eq!(third.current().version(), 3);
        // Changed while the broker was down: the entry knows the text
        // before, kept under its digest.
        let applied = third.take_applied();
        assert_eq!(
            applied[0].previous.as_ref().map(|p| (p.version(), p.len())),
            Some((2, 1))
        );
        // A kept text that no longer hashes to its name is written again.
        std::fs::write(&kept, "altered").expect("alter");
        let fourth = PolicyStore::load(&path, Arc::new(routing())).expect("loads");
        fourth.keep_history(&history, "start").expect("history");
        assert_eq!(std::fs::read_to_string(&kept).expect("kept"), POLICY);
        // No temporary files left behind.
        let names: Vec<String> = std::fs::read_dir(&history)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".new")), "{names:?}");
    }

    #[test]
    fn applying_a_text_checks_it_writes_the_file_and_names_who_applied_it() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, POLICY).expect("write");
        let store = PolicyStore::load(&path, Arc::new(routing())).expect("loads");
        store
            .keep_history(&dir.path().join("policies"), "start")
            .expect("history");
        store.take_applied();
        let reviewed = *store.current().sha256();
        let shorter = POLICY
            .split("[[rule]]\nid = \"residence")
            .next()
            .expect("part");

        // Refused, nothing written, nothing in force: a text that does not
        // check, the text in force, a review against another policy.
        assert!(matches!(
            store.apply_text("[[rule]]\nid = \"x\"\n", &reviewed, "anna"),
            Err(ApplyError::Invalid(_))
        ));
        assert!(matches!(
            store.apply_text(POLICY, &reviewed, "anna"),
            Err(ApplyError::Unchanged)
        ));
        assert!(matches!(
            store.apply_text(shorter, &[7; 32], "anna"),
            Err(ApplyError::Changed { version: 1 })
        ));
        assert_eq!(std::fs::read_to_string(&path).expect("file"), POLICY);
        assert_eq!(store.current().version(), 1);
        assert!(store.take_applied().is_empty());

        // Applied: in force, in the file, one entry by the person.
        let now = store
            .apply_text(shorter, &reviewed, "anna")
            .expect("applies");
        assert_eq!((now.version(), now.len()), (2, 1));
        assert_eq!(std::fs::read_to_string(&path).expect("file"), shorter);
        let applied = store.take_applied();
        assert_eq!(applied.len(), 1);
        assert_eq!(applied[0].by, "anna");
        // The file watcher, seeing the file it wrote, puts nothing in force.
        assert_eq!(store.reload_if_changed("watcher").expect("reads"), None);
        assert!(store.take_applied().is_empty());
        // A review of the old policy can no longer be applied.
        assert!(matches!(
            store.apply_text(POLICY, &reviewed, "bert"),
            Err(ApplyError::Changed { version: 2 })
        ));
        // A hand edit not reloaded yet is not overwritten.
        std::fs::write(&path, POLICY).expect("write");
        assert!(matches!(
            store.apply_text(&format!("# reworded\n{POLICY}"), now.sha256(), "bert"),
            Err(ApplyError::FileEdited { .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).expect("file"), POLICY);
        // An edit of the file is the watcher's to apply, once.
        assert_eq!(store.reload_if_changed("watcher").expect("reads"), Some(2));
        assert_eq!(store.current().version(), 3);
        assert_eq!(store.take_applied()[0].by, "watcher");
    }
}
