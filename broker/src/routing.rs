//! The routing table ("register data navigation") and the evidence-type
//! catalogue: which evidence types exist, what their payloads and subjects
//! look like, and which connector, at which endpoints, serves each one for
//! which jurisdiction. Loaded from a TOML file:
//!
//! ```toml
//! [connectors.civil-register]
//! endpoints = ["127.0.0.1:7101", "127.0.0.1:7111"]   # tried in order
//! timeout = "5s"                                     # cap on any forward
//!
//! [[evidence_types]]
//! id = "birth-certificate"
//! display_name = "Birth certificate"
//! media_types = ["application/xml"]
//! subject_schemes = ["DE_IDNR"]
//! routes = [{ connector = "civil-register" }]        # any jurisdiction
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use onceonly_certs::config_file::{self, ConfigFileError, line_and_column};
use onceonly_proto::v1::{EvidenceParameter, EvidenceTypeInfo, SubjectIdScheme};
use serde::Deserialize;

/// A connector as the routing table knows it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorEntry {
    /// `host:port` endpoints, tried in order: the second is used only where
    /// the first cannot be reached.
    pub endpoints: Vec<String>,
    /// The longest a forward to this connector may take.
    #[serde(default = "default_connector_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_connector_timeout() -> Duration {
    Duration::from_secs(10)
}

/// One route of an evidence type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The connector id.
    pub connector: String,
    /// ISO 3166-2 codes this route serves; empty serves any.
    #[serde(default)]
    pub jurisdictions: Vec<String>,
}

/// A parameter an evidence type accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParameterEntry {
    /// Its key.
    pub name: String,
    /// What it means.
    #[serde(default)]
    pub description: String,
    /// Whether requests must carry it.
    #[serde(default)]
    pub required: bool,
}

/// A catalogued evidence type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceTypeEntry {
    /// The id, e.g. `birth-certificate`.
    pub id: String,
    /// Human-readable name.
    #[serde(default)]
    pub display_name: String,
    /// What it proves.
    #[serde(default)]
    pub description: String,
    /// Payload media types.
    #[serde(default)]
    pub media_types: Vec<String>,
    /// Subject schemes it is keyed by: `DE_IDNR`, `DE_COMMERCIAL_REGISTER`, `EIDAS`.
    pub subject_schemes: Vec<String>,
    /// Parameters beyond the subject.
    #[serde(default)]
    pub parameters: Vec<ParameterEntry>,
    /// Where requests go.
    pub routes: Vec<Route>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutingFile {
    #[serde(default)]
    connectors: BTreeMap<String, ConnectorEntry>,
    #[serde(default)]
    evidence_types: Vec<toml::Spanned<EvidenceTypeEntry>>,
}

/// A checked evidence type with its parsed schemes.
#[derive(Debug, Clone)]
pub struct EvidenceType {
    /// As written.
    pub entry: EvidenceTypeEntry,
    /// Parsed subject schemes.
    pub schemes: Vec<SubjectIdScheme>,
    /// The wire description (consent_required left false: the policy's).
    pub info: EvidenceTypeInfo,
}

impl EvidenceType {
    fn new(entry: EvidenceTypeEntry, schemes: Vec<SubjectIdScheme>) -> Self {
        let info = Self::describe(&entry, &schemes);
        EvidenceType {
            entry,
            schemes,
            info,
        }
    }

    fn describe(entry: &EvidenceTypeEntry, schemes: &[SubjectIdScheme]) -> EvidenceTypeInfo {
        EvidenceTypeInfo {
            evidence_type: entry.id.clone(),
            display_name: entry.display_name.clone(),
            description: entry.description.clone(),
            media_types: entry.media_types.clone(),
            subject_schemes: schemes.iter().map(|s| *s as i32).collect(),
            jurisdictions: {
                let mut all: Vec<String> = entry
                    .routes
                    .iter()
                    .flat_map(|r| r.jurisdictions.iter().cloned())
                    .collect();
                all.sort();
                all.dedup();
                all
            },
            consent_required: false,
            parameters: entry
                .parameters
                .iter()
                .map(|p| EvidenceParameter {
                    name: p.name.clone(),
                    description: p.description.clone(),
                    required: p.required,
                })
                .collect(),
        }
    }
}

/// The checked routing table.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    connectors: BTreeMap<String, ConnectorEntry>,
    evidence_types: HashMap<String, EvidenceType>,
}

/// Where one request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The connector id.
    pub connector_id: String,
    /// Its endpoints, in order.
    pub endpoints: Vec<String>,
    /// Its timeout.
    pub timeout: Duration,
    /// The media types the catalogue lists for the evidence type (none:
    /// the catalogue does not restrict them).
    pub media_types: Vec<String>,
}

impl RoutingTable {
    /// Reads and checks a routing file.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and checks routing TOML.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigFileError> {
        let file: RoutingFile = config_file::parse_toml(path, text)?;
        let mut table = RoutingTable {
            connectors: file.connectors,
            evidence_types: HashMap::new(),
        };
        for (id, connector) in &table.connectors {
            let key = format!("connectors.{id}");
            onceonly_certs::identity::validate_id(id).map_err(|e| {
                ConfigFileError::invalid(
                    path,
                    &key,
                    e.to_string(),
                    "use the id in the connector's certificate",
                )
            })?;
            if connector.endpoints.is_empty() {
                return Err(ConfigFileError::invalid(
                    path,
                    format!("{key}.endpoints"),
                    "is empty",
                    "list at least one host:port",
                ));
            }
            for endpoint in &connector.endpoints {
                if endpoint
                    .rsplit_once(':')
                    .and_then(|(_, port)| port.parse::<u16>().ok())
                    .is_none()
                {
                    return Err(ConfigFileError::invalid(
                        path,
                        format!("{key}.endpoints"),
                        format!("{endpoint:?} is not host:port"),
                        "write e.g. \"civil.example:7101\" or \"127.0.0.1:7101\"",
                    ));
                }
            }
            if connector.timeout.is_zero() {
                return Err(ConfigFileError::invalid(
                    path,
                    format!("{key}.timeout"),
                    "is zero",
                    "give e.g. \"5s\"",
                ));
            }
        }
        for spanned in file.evidence_types {
            let (line, _) = line_and_column(text, spanned.span().start);
            let entry = spanned.into_inner();
            let key = format!("line {line}: evidence_types[{}]", entry.id);
            if let Err(v) = onceonly_proto::validate::evidence_type_id("id", &entry.id) {
                return Err(ConfigFileError::invalid(
                    path,
                    key,
                    v.description,
                    "rename the evidence type",
                ));
            }
            let mut schemes = Vec::new();
            for name in &entry.subject_schemes {
                let scheme = SubjectIdScheme::from_str_name(&format!("SUBJECT_ID_SCHEME_{name}"))
                    .filter(|s| *s != SubjectIdScheme::Unspecified)
                    .ok_or_else(|| {
                        ConfigFileError::invalid(
                            path,
                            format!("{key}.subject_schemes"),
                            format!("unknown scheme {name:?}"),
                            "use DE_IDNR, DE_COMMERCIAL_REGISTER or EIDAS",
                        )
                    })?;
                schemes.push(scheme);
            }
            if schemes.is_empty() {
                return Err(ConfigFileError::invalid(
                    path,
                    format!("{key}.subject_schemes"),
                    "is empty",
                    "name the scheme(s) the type is keyed by",
                ));
            }
            if entry.routes.is_empty() {
                return Err(ConfigFileError::invalid(
                    path,
                    format!("{key}.routes"),
                    "is empty",
                    "route it to at least one connector",
                ));
            }
            for route in &entry.routes {
                if !table.connectors.contains_key(&route.connector) {
                    return Err(ConfigFileError::invalid(
                        path,
                        format!("{key}.routes"),
                        format!("connector {:?} is not in [connectors]", route.connector),
                        format!(
                            "add [connectors.{}] with its endpoints, or fix the name",
                            route.connector
                        ),
                    ));
                }
            }
            if table.evidence_types.contains_key(&entry.id) {
                return Err(ConfigFileError::invalid(
                    path,
                    key,
                    "is defined twice",
                    "keep one definition",
                ));
            }
            if entry.media_types.is_empty() {
                tracing::warn!(
                    evidence_type = %entry.id,
                    file = %path.display(),
                    "the catalogue lists no media_types for this evidence type: answers of any media type are released; list them (e.g. media_types = [\"application/xml\"]) so that others are refused"
                );
            }
            table
                .evidence_types
                .insert(entry.id.clone(), EvidenceType::new(entry, schemes));
        }
        Ok(table)
    }

    /// The catalogued evidence type `id`.
    pub fn evidence_type(&self, id: &str) -> Option<&EvidenceType> {
        self.evidence_types.get(id)
    }

    /// Every connector and its endpoints, by connector id.
    pub fn connectors(&self) -> Vec<(String, Vec<String>)> {
        self.connectors
            .iter()
            .map(|(id, entry)| (id.clone(), entry.endpoints.clone()))
            .collect()
    }

    /// Every catalogued evidence type, sorted by id.
    pub fn evidence_types(&self) -> Vec<&EvidenceType> {
        let mut all: Vec<&EvidenceType> = self.evidence_types.values().collect();
        all.sort_by(|a, b| a.entry.id.cmp(&b.entry.id));
        all
    }

    /// Where a request for `evidence_type` in `jurisdiction` goes: the first
    /// route naming the jurisdiction, else the first route open to any.
    pub fn route(&self, evidence_type: &str, jurisdiction: Option<&str>) -> Option<Destination> {
        let entry = &self.evidence_types.get(evidence_type)?.entry;
        let routes = &entry.routes;
        let route = match jurisdiction {
            Some(j) => routes
                .iter()
                .find(|r| r.jurisdictions.iter().any(|rj| rj == j))
                .or_else(|| routes.iter().find(|r| r.jurisdictions.is_empty())),
            None => routes.first(),
        }?;
        let connector = self.connectors.get(&route.connector)?;
        Some(Destination {
            connector_id: route.connector.clone(),
            endpoints: connector.endpoints.clone(),
            timeout: connector.timeout,
            media_types: entry.media_types.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = r#"
[connectors.civil-register]
endpoints = ["127.0.0.1:7101"]
[connectors.civil-by]
endpoints = ["127.0.0.1:7201", "127.0.0.1:7202"]
timeout = "2s"

[[evidence_types]]
id = "proof-of-residence"
subject_schemes = ["DE_IDNR"]
routes = [{ connector = "civil-by", jurisdictions = ["DE-BY"] }, { connector = "civil-register" }]
"#;

    #[test]
    fn routes_by_jurisdiction_with_fallback() {
        let table = RoutingTable::parse(Path::new("routing.toml"), TABLE).expect("parses");
        let by = table
            .route("proof-of-residence", Some("DE-BY"))
            .expect("route");
        assert_eq!(by.connector_id, "civil-by");
        assert_eq!(by.endpoints.len(), 2);
        assert_eq!(by.timeout, Duration::from_secs(2));
        let be = table
            .route("proof-of-residence", Some("DE-BE"))
            .expect("route");
        assert_eq!(be.connector_id, "civil-register");
        assert_eq!(table.route("birth-certificate", None), None);
    }

    #[test]
    fn unknown_connector_is_named_with_its_line() {
        let text = TABLE.replace(
            "{ connector = \"civil-register\" }",
            "{ connector = \"civl\" }",
        );
        let error = RoutingTable::parse(Path::new("routing.toml"), &text).expect_err("bad");
        let message = error.to_string();
        assert!(message.contains("routing.toml"), "{message}");
        assert!(
            message.contains("line 8: evidence_types[proof-of-residence].routes"),
            "{message}"
        );
        assert!(
            message.contains("\"civl\" is not in [connectors]"),
            "{message}"
        );
    }

    #[test]
    fn unknown_scheme_is_refused() {
        let text = TABLE.replace("DE_IDNR", "PASSPORT");
        let error = RoutingTable::parse(Path::new("r.toml"), &text).expect_err("bad");
        assert!(
            error.to_string().contains("unknown scheme \"PASSPORT\""),
            "{error}"
        );
    }
}
