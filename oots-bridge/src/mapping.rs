//! Which EU request is which onceonly request: a procedure and an
//! evidence type classification (a Semantic Repository URI) name an
//! evidence type of the broker's catalogue, the legal basis the bridge
//! asks under, and whether a preview and the user's explicit request are
//! needed. The purpose the bridge names is the procedure (`oots:<code>`),
//! so that the broker's policy says which procedures the bridge may fetch
//! what for.

use std::path::Path;

use onceonly_certs::config_file::{ConfigFileError, load_toml};
use serde::Deserialize;

use crate::edm::{EdmError, ErrorCode, QueryRequest};

/// One kind of evidence the bridge provides.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The evidence type classification the EU request names.
    pub classification: String,
    /// The SDG Annex II procedures it is provided for, e.g. `["T1"]`.
    pub procedures: Vec<String>,
    /// The broker's evidence type.
    pub evidence_type: String,
    /// The legal basis the bridge asks under.
    pub legal_basis: String,
    /// The evidence's MIME type as the register delivers it.
    pub format: String,
    /// Whether the citizen previews the evidence before it is sent (default
    /// false). Where true, a request that does not allow a preview
    /// (`PossibilityForPreview = false`) is refused: nothing goes out
    /// unpreviewed.
    #[serde(default)]
    pub preview: bool,
    /// The eIDAS level of assurance the user's authentication must reach
    /// (`low`, `substantial` or `high`; default `substantial`).
    #[serde(default = "substantial")]
    pub level_of_assurance: Assurance,
    /// Whether the request must say the user asked explicitly
    /// (`ExplicitRequestGiven`; default true).
    #[serde(default = "required")]
    pub explicit_request_required: bool,
}

fn required() -> bool {
    true
}

fn substantial() -> Assurance {
    Assurance::Substantial
}

/// An eIDAS level of assurance, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Assurance {
    /// Low.
    Low,
    /// Substantial.
    Substantial,
    /// High.
    High,
}

impl Assurance {
    /// The level a request states, as a word ("High") or an eIDAS URI
    /// (`http://eidas.europa.eu/LoA/high`); None where it states none
    /// this reads.
    pub fn stated(text: &str) -> Option<Assurance> {
        let word = text.rsplit('/').next().unwrap_or_default().trim();
        match word.to_ascii_lowercase().as_str() {
            "low" => Some(Assurance::Low),
            "substantial" => Some(Assurance::Substantial),
            "high" => Some(Assurance::High),
            _ => None,
        }
    }
}

/// At most this much of a requester's text is repeated in an answer.
fn shown(text: &str) -> String {
    let mut shown: String = text.chars().take(100).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    shown
}

/// The mapping file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Each kind of evidence, as `[[evidence]]`.
    pub evidence: Vec<Entry>,
}

impl Mapping {
    /// Reads and checks the mapping at `path`: errors name the file, the
    /// line or entry, and the fix.
    pub fn load(path: &Path) -> Result<Mapping, ConfigFileError> {
        let mapping: Mapping = load_toml(path)?;
        mapping.check(path)?;
        Ok(mapping)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigFileError> {
        if self.evidence.is_empty() {
            return Err(ConfigFileError::invalid(
                path,
                "evidence",
                "no evidence is mapped",
                "add an [[evidence]] table for each kind of evidence the bridge provides",
            ));
        }
        for (n, entry) in self.evidence.iter().enumerate() {
            let key = format!("evidence[{n}]");
            if entry.procedures.is_empty() {
                return Err(ConfigFileError::invalid(
                    path,
                    format!("{key}.procedures"),
                    "names no procedure",
                    "list the SDG Annex II procedure codes it is provided for, e.g. [\"T1\"]",
                ));
            }
            if self.evidence[..n]
                .iter()
                .any(|other| other.classification == entry.classification)
            {
                return Err(ConfigFileError::invalid(
                    path,
                    format!("{key}.classification"),
                    format!("{:?} is mapped twice", entry.classification),
                    "map each classification once; list all its procedures in one entry",
                ));
            }
        }
        Ok(())
    }

    /// The entry that answers `request`, or the EDM error that says why
    /// none does.
    pub fn find(&self, request: &QueryRequest) -> Result<&Entry, EdmError> {
        let entry = self
            .evidence
            .iter()
            .find(|e| e.classification == request.evidence.classification)
            .ok_or_else(|| {
                EdmError::new(
                    ErrorCode::ObjectNotFound,
                    format!(
                        "no evidence of the type {} is provided here",
                        shown(&request.evidence.classification)
                    ),
                )
            })?;
        if !entry.procedures.contains(&request.procedure) {
            return Err(EdmError::invalid(
                "R-BRIDGE-PROCEDURE",
                format!(
                    "the evidence type {} is not provided for the procedure {:?}",
                    entry.classification,
                    shown(&request.procedure)
                ),
            ));
        }
        let stated = Assurance::stated(&request.person.level_of_assurance);
        if stated.is_none_or(|level| level < entry.level_of_assurance) {
            return Err(EdmError::new(
                ErrorCode::Authentication,
                format!(
                    "this evidence needs the user authenticated at eIDAS level {:?} or higher, not {:?}",
                    entry.level_of_assurance,
                    shown(&request.person.level_of_assurance)
                ),
            ));
        }
        if entry.explicit_request_required && request.explicit_request_given != Some(true) {
            return Err(EdmError::invalid(
                "R-BRIDGE-EXPLICIT-REQUEST",
                "this evidence is provided only at the user's explicit request (ExplicitRequestGiven = true)",
            ));
        }
        if !request.evidence.formats.is_empty() && !request.evidence.formats.contains(&entry.format)
        {
            return Err(EdmError::new(
                ErrorCode::UnsupportedCapability,
                format!(
                    "the evidence is provided as {}, not as {}",
                    entry.format,
                    shown(&request.evidence.formats.join(", "))
                ),
            ));
        }
        Ok(entry)
    }

    /// The purpose the bridge names for `procedure`.
    pub fn purpose(procedure: &str) -> String {
        format!("oots:{procedure}")
    }
}
