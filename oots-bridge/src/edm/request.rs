//! An EDM `query:QueryRequest`: read by namespace and slot name, checked
//! for what the bridge needs, each missing or malformed part refused
//! (EDM:ERR:0003) with the slot and the rule in `detail`.

use roxmltree::{Document, Node};

use super::{EdmError, ErrorCode, Limits, NS_QUERY, NS_RIM, NS_SDG, SPECIFICATION};

/// An agent: an evidence requester or provider.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Agent {
    /// Its identifier.
    pub identifier: String,
    /// The identifier's scheme (`schemeID`).
    pub scheme: String,
    /// Its name.
    pub name: String,
    /// ER (evidence requester), IP (intermediary platform), ...
    pub classification: String,
}

/// The natural person the evidence is about, as the requester names them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Person {
    /// The eIDAS level of assurance of their authentication.
    pub level_of_assurance: String,
    /// Their eIDAS unique identifier (e.g. `DE/AT/0123...`), if given.
    pub identifier: Option<String>,
    /// The identifier's scheme.
    pub scheme: String,
    /// Family name.
    pub family_name: String,
    /// Given name.
    pub given_name: String,
    /// Date of birth, `YYYY-MM-DD`.
    pub date_of_birth: String,
}

/// The evidence asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EvidenceRequest {
    /// The requested evidence type's identifier.
    pub identifier: String,
    /// Its classification in the Semantic Repository (a URI).
    pub classification: String,
    /// Its title (the first given).
    pub title: String,
    /// The formats it may come in (MIME types), where named.
    pub formats: Vec<String>,
}

/// A requirement the procedure asks evidence for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Requirement {
    /// A Semantic Repository URI.
    pub identifier: String,
    /// Its name.
    pub name: String,
}

/// An evidence request, as the bridge reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueryRequest {
    /// `@id`, e.g. `urn:uuid:...`: answered with `@requestId`.
    pub id: String,
    /// `IssueDateTime`.
    pub issue_date_time: String,
    /// `Procedure`: the SDG Annex II procedure code.
    pub procedure: String,
    /// `PossibilityForPreview`.
    pub possibility_for_preview: bool,
    /// `ExplicitRequestGiven`, where sent.
    pub explicit_request_given: Option<bool>,
    /// `Requirements`.
    pub requirements: Vec<Requirement>,
    /// `EvidenceRequester`: the first agent.
    pub requester: Agent,
    /// `EvidenceProvider`.
    pub provider: Agent,
    /// `NaturalPerson`.
    pub person: Person,
    /// `EvidenceRequest`.
    pub evidence: EvidenceRequest,
    /// `PreviewLocation`, in the second request of a preview.
    pub preview_location: Option<String>,
    /// `ReturnLocation`, in the second request of a preview.
    pub return_location: Option<String>,
}

fn is(node: &Node<'_, '_>, namespace: &str, name: &str) -> bool {
    node.is_element()
        && node.tag_name().name() == name
        && node.tag_name().namespace() == Some(namespace)
}

fn child<'a, 'input>(
    node: Node<'a, 'input>,
    namespace: &str,
    name: &str,
) -> Option<Node<'a, 'input>> {
    node.children().find(|c| is(c, namespace, name))
}

/// The slots directly under `node`, by name.
fn slot<'a, 'input>(node: Node<'a, 'input>, name: &str) -> Option<Node<'a, 'input>> {
    node.children()
        .filter(|c| is(c, NS_RIM, "Slot"))
        .find(|c| c.attribute("name") == Some(name))
        .and_then(|s| child(s, NS_RIM, "SlotValue"))
}

/// A slot value's text: its `rim:Value`, or the first localized string.
fn value_text(slot_value: Node<'_, '_>) -> Option<String> {
    let value = slot_value.descendants().find(|d| is(d, NS_RIM, "Value"))?;
    if let Some(localized) = value
        .descendants()
        .find(|d| is(d, NS_RIM, "LocalizedString"))
    {
        return localized.attribute("value").map(|v| v.trim().to_owned());
    }
    value
        .text()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

fn sdg_text(node: Node<'_, '_>, name: &str) -> Option<String> {
    child(node, NS_SDG, name)
        .and_then(|n| n.text())
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

fn missing(slot: &str) -> EdmError {
    EdmError::invalid(
        &format!("R-BRIDGE-SLOT-{slot}"),
        format!("the required slot {slot} is missing or empty"),
    )
}

fn boolean(slot: &str, text: &str) -> Result<bool, EdmError> {
    match text {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(EdmError::invalid(
            &format!("R-BRIDGE-SLOT-{slot}"),
            format!("the slot {slot} must be a boolean (true or false), not {other:?}"),
        )),
    }
}

fn agent(node: Node<'_, '_>) -> Agent {
    let identifier = child(node, NS_SDG, "Identifier");
    Agent {
        identifier: identifier
            .and_then(|i| i.text())
            .unwrap_or_default()
            .trim()
            .to_owned(),
        scheme: identifier
            .and_then(|i| i.attribute("schemeID"))
            .unwrap_or_default()
            .to_owned(),
        name: sdg_text(node, "Name").unwrap_or_default(),
        classification: sdg_text(node, "Classification").unwrap_or_default(),
    }
}

fn agent_in(slot_value: Node<'_, '_>, slot_name: &str) -> Result<Agent, EdmError> {
    let node = slot_value
        .descendants()
        .find(|d| is(d, NS_SDG, "Agent"))
        .ok_or_else(|| missing(slot_name))?;
    let agent = agent(node);
    if agent.identifier.is_empty() {
        return Err(EdmError::invalid(
            &format!("R-BRIDGE-SLOT-{slot_name}"),
            format!("the agent in {slot_name} has no sdg:Identifier"),
        ));
    }
    Ok(agent)
}

/// `urn:uuid:` and a UUID in canonical form (8-4-4-4-12 hex digits).
fn is_urn_uuid(id: &str) -> bool {
    let Some(uuid) = id.strip_prefix("urn:uuid:") else {
        return false;
    };
    uuid.len() == 36
        && uuid.bytes().enumerate().all(|(n, b)| match n {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

impl QueryRequest {
    /// Reads and checks a QueryRequest document.
    pub fn parse(xml: &str, limits: &Limits) -> Result<QueryRequest, EdmError> {
        let document = super::parse(xml, limits)?;
        Self::read(&document)
    }

    fn read(document: &Document<'_>) -> Result<QueryRequest, EdmError> {
        let root = document.root_element();
        if !is(&root, NS_QUERY, "QueryRequest") {
            return Err(EdmError::invalid(
                "R-BRIDGE-ROOT",
                format!(
                    "the document is a {{{}}}{}, not a query:QueryRequest",
                    root.tag_name().namespace().unwrap_or_default(),
                    root.tag_name().name()
                ),
            ));
        }
        let id = root
            .attribute("id")
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                EdmError::invalid("R-BRIDGE-ID", "the QueryRequest has no id attribute")
            })?
            .to_owned();
        if !is_urn_uuid(&id) {
            return Err(EdmError::invalid(
                "R-BRIDGE-ID",
                "the QueryRequest's id must be a urn:uuid: with a UUID in its canonical form",
            ));
        }
        let text = |name: &str| slot(root, name).and_then(value_text);
        let specification =
            text("SpecificationIdentifier").ok_or_else(|| missing("SpecificationIdentifier"))?;
        if specification != SPECIFICATION {
            return Err(EdmError::invalid(
                "R-BRIDGE-SLOT-SpecificationIdentifier",
                format!("the bridge speaks {SPECIFICATION}, not {specification:?}"),
            ));
        }
        let issue_date_time = text("IssueDateTime").ok_or_else(|| missing("IssueDateTime"))?;
        if time::OffsetDateTime::parse(
            &issue_date_time,
            &time::format_description::well_known::Rfc3339,
        )
        .is_err()
        {
            return Err(EdmError::invalid(
                "R-BRIDGE-SLOT-IssueDateTime",
                format!(
                    "IssueDateTime must be a date and time (RFC 3339), not {issue_date_time:?}"
                ),
            ));
        }
        let procedure = text("Procedure").ok_or_else(|| missing("Procedure"))?;
        let possibility_for_preview = boolean(
            "PossibilityForPreview",
            &text("PossibilityForPreview").ok_or_else(|| missing("PossibilityForPreview"))?,
        )?;
        let explicit_request_given = text("ExplicitRequestGiven")
            .map(|t| boolean("ExplicitRequestGiven", &t))
            .transpose()?;
        let requirements = slot(root, "Requirements")
            .map(|value| {
                value
                    .descendants()
                    .filter(|d| is(d, NS_SDG, "Requirement"))
                    .map(|r| Requirement {
                        identifier: sdg_text(r, "Identifier").unwrap_or_default(),
                        name: sdg_text(r, "Name").unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let requester = agent_in(
            slot(root, "EvidenceRequester").ok_or_else(|| missing("EvidenceRequester"))?,
            "EvidenceRequester",
        )?;
        let provider = agent_in(
            slot(root, "EvidenceProvider").ok_or_else(|| missing("EvidenceProvider"))?,
            "EvidenceProvider",
        )?;
        let preview_location = text("PreviewLocation");
        let return_location = text("ReturnLocation");

        let query = child(root, NS_QUERY, "Query")
            .ok_or_else(|| EdmError::new(ErrorCode::Query, "the request has no query:Query"))?;
        if query.attribute("queryDefinition") != Some("DocumentQuery") {
            return Err(EdmError::new(
                ErrorCode::Query,
                format!(
                    "the query definition must be DocumentQuery, not {:?}",
                    query.attribute("queryDefinition").unwrap_or_default()
                ),
            ));
        }
        if slot(query, "LegalPerson").is_some() && slot(query, "NaturalPerson").is_none() {
            return Err(EdmError::new(
                ErrorCode::UnsupportedCapability,
                "evidence about legal persons is not offered through this provider",
            ));
        }
        let person_node = slot(query, "NaturalPerson")
            .and_then(|v| v.descendants().find(|d| is(d, NS_SDG, "Person")))
            .ok_or_else(|| missing("NaturalPerson"))?;
        let identifier = child(person_node, NS_SDG, "Identifier");
        let person = Person {
            level_of_assurance: sdg_text(person_node, "LevelOfAssurance").unwrap_or_default(),
            identifier: identifier
                .and_then(|i| i.text())
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty()),
            scheme: identifier
                .and_then(|i| i.attribute("schemeID"))
                .unwrap_or_default()
                .to_owned(),
            family_name: sdg_text(person_node, "FamilyName").unwrap_or_default(),
            given_name: sdg_text(person_node, "GivenName").unwrap_or_default(),
            date_of_birth: sdg_text(person_node, "DateOfBirth").unwrap_or_default(),
        };
        if person.family_name.is_empty()
            || person.given_name.is_empty()
            || person.date_of_birth.is_empty()
        {
            return Err(EdmError::invalid(
                "R-BRIDGE-SLOT-NaturalPerson",
                "the person needs a family name, a given name and a date of birth: the register matches on all three",
            ));
        }
        let evidence_node = slot(query, "EvidenceRequest")
            .and_then(|v| {
                v.descendants()
                    .find(|d| is(d, NS_SDG, "DataServiceEvidenceType"))
            })
            .ok_or_else(|| missing("EvidenceRequest"))?;
        let evidence = EvidenceRequest {
            identifier: sdg_text(evidence_node, "Identifier").unwrap_or_default(),
            classification: sdg_text(evidence_node, "EvidenceTypeClassification").ok_or_else(
                || {
                    EdmError::invalid(
                        "R-BRIDGE-SLOT-EvidenceRequest",
                        "the requested evidence type has no sdg:EvidenceTypeClassification",
                    )
                },
            )?,
            title: sdg_text(evidence_node, "Title").unwrap_or_default(),
            formats: evidence_node
                .descendants()
                .filter(|d| is(d, NS_SDG, "Format"))
                .filter_map(|f| f.text().map(|t| t.trim().to_owned()))
                .filter(|f| !f.is_empty())
                .collect(),
        };
        Ok(QueryRequest {
            id,
            issue_date_time,
            procedure,
            possibility_for_preview,
            explicit_request_given,
            requirements,
            requester,
            provider,
            person,
            evidence,
            preview_location,
            return_location,
        })
    }
}
