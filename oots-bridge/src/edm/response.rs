//! What the bridge answers: a `query:QueryResponse` with the evidence's
//! metadata and a reference to the AS4 payload part holding its bytes, or
//! one with an `rs:Exception`. Written with every value escaped.

use super::request::{Agent, QueryRequest};
use super::{EdmError, NS_QUERY, NS_RIM, NS_RS, NS_SDG, NS_XLINK, NS_XSI, SPECIFICATION, escape};

/// `@status` of an answer with evidence.
pub const SUCCESS: &str = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success";
/// `@status` of an error answer.
pub const FAILURE: &str = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure";

/// The evidence an answer carries.
#[derive(Debug, Clone)]
pub struct Evidence {
    /// Its identifier (`urn:uuid:...`).
    pub identifier: String,
    /// Who issued it (the register, as the EU sees it).
    pub issuing_authority: Agent,
    /// When, `YYYY-MM-DD`.
    pub issuing_date: String,
    /// Its MIME type.
    pub format: String,
    /// The AS4 payload part's Content-ID (without `cid:`).
    pub content_id: String,
}

fn string_slot(name: &str, value: &str) -> String {
    format!(
        r#"<rim:Slot name="{name}"><rim:SlotValue xsi:type="rim:StringValueType"><rim:Value>{}</rim:Value></rim:SlotValue></rim:Slot>"#,
        escape(value)
    )
}

fn date_time_slot(name: &str, value: &str) -> String {
    format!(
        r#"<rim:Slot name="{name}"><rim:SlotValue xsi:type="rim:DateTimeValueType"><rim:Value>{}</rim:Value></rim:SlotValue></rim:Slot>"#,
        escape(value)
    )
}

fn agent_xml(agent: &Agent, classification: &str) -> String {
    format!(
        r#"<sdg:Agent><sdg:Identifier schemeID="{}">{}</sdg:Identifier><sdg:Name>{}</sdg:Name><sdg:Classification>{}</sdg:Classification></sdg:Agent>"#,
        escape(&agent.scheme),
        escape(&agent.identifier),
        escape(&agent.name),
        escape(classification),
    )
}

fn agent_slot(name: &str, agent: &Agent, classification: &str) -> String {
    format!(
        r#"<rim:Slot name="{name}"><rim:SlotValue xsi:type="rim:AnyValueType">{}</rim:SlotValue></rim:Slot>"#,
        agent_xml(agent, classification)
    )
}

fn open(status: &str, request_id: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><query:QueryResponse xmlns:query="{NS_QUERY}" xmlns:rs="{NS_RS}" xmlns:rim="{NS_RIM}" xmlns:sdg="{NS_SDG}" xmlns:xsi="{NS_XSI}" xmlns:xlink="{NS_XLINK}" status="{status}" requestId="{}">"#,
        escape(request_id)
    )
}

/// Now, as the EDM writes times.
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A fresh `urn:uuid:`.
pub fn new_urn() -> String {
    let mut bytes = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The answer with `evidence` to `request`, from `provider`.
pub fn success(request: &QueryRequest, provider: &Agent, evidence: &Evidence) -> String {
    let person = &request.person;
    let mut xml = open(SUCCESS, &request.id);
    xml.push_str(&string_slot("SpecificationIdentifier", SPECIFICATION));
    xml.push_str(&string_slot("EvidenceResponseIdentifier", &new_urn()));
    xml.push_str(&date_time_slot("IssueDateTime", &now()));
    xml.push_str(&agent_slot("EvidenceProvider", provider, "EP"));
    xml.push_str(&agent_slot(
        "EvidenceRequester",
        &request.requester,
        &request.requester.classification,
    ));
    xml.push_str("<rim:RegistryObjectList>");
    xml.push_str(&format!(
        r#"<rim:RegistryObject id="{}">"#,
        escape(&new_urn())
    ));
    xml.push_str(&format!(
        concat!(
            r#"<rim:Slot name="EvidenceMetadata"><rim:SlotValue xsi:type="rim:AnyValueType"><sdg:Evidence>"#,
            r#"<sdg:Identifier>{id}</sdg:Identifier>"#,
            r#"<sdg:IsAbout><sdg:NaturalPerson><sdg:Identifier schemeID="{scheme}">{person}</sdg:Identifier>"#,
            r#"<sdg:FamilyName>{family}</sdg:FamilyName><sdg:GivenName>{given}</sdg:GivenName><sdg:DateOfBirth>{birth}</sdg:DateOfBirth></sdg:NaturalPerson></sdg:IsAbout>"#,
            r#"<sdg:IssuingAuthority><sdg:Identifier schemeID="{issuer_scheme}">{issuer}</sdg:Identifier><sdg:Name>{issuer_name}</sdg:Name></sdg:IssuingAuthority>"#,
            r#"<sdg:IsConformantTo><sdg:EvidenceTypeClassification>{classification}</sdg:EvidenceTypeClassification><sdg:Title>{title}</sdg:Title></sdg:IsConformantTo>"#,
            r#"<sdg:IssuingDate>{date}</sdg:IssuingDate>"#,
            r#"<sdg:Distribution><sdg:Format>{format}</sdg:Format></sdg:Distribution>"#,
            r#"</sdg:Evidence></rim:SlotValue></rim:Slot>"#,
        ),
        id = escape(&evidence.identifier),
        scheme = escape(&person.scheme),
        person = escape(person.identifier.as_deref().unwrap_or_default()),
        family = escape(&person.family_name),
        given = escape(&person.given_name),
        birth = escape(&person.date_of_birth),
        issuer_scheme = escape(&evidence.issuing_authority.scheme),
        issuer = escape(&evidence.issuing_authority.identifier),
        issuer_name = escape(&evidence.issuing_authority.name),
        classification = escape(&request.evidence.classification),
        title = escape(&request.evidence.title),
        date = escape(&evidence.issuing_date),
        format = escape(&evidence.format),
    ));
    xml.push_str(&format!(
        r#"<rim:Classification id="{}" classificationScheme="urn:fdc:oots:classification:edm" classificationNode="MainEvidence"/>"#,
        escape(&new_urn())
    ));
    xml.push_str(&format!(
        r#"<rim:RepositoryItemRef xlink:href="cid:{}" xlink:title="Evidence"/>"#,
        escape(&evidence.content_id)
    ));
    xml.push_str("</rim:RegistryObject></rim:RegistryObjectList></query:QueryResponse>");
    xml
}

/// The error answer to the request `request_id` (empty where the request
/// was too broken to name itself), from `provider`.
pub fn failure(
    request_id: &str,
    requester: Option<&Agent>,
    provider: &Agent,
    error: &EdmError,
) -> String {
    let mut xml = open(FAILURE, request_id);
    xml.push_str(&string_slot("SpecificationIdentifier", SPECIFICATION));
    xml.push_str(&string_slot("EvidenceResponseIdentifier", &new_urn()));
    xml.push_str(&agent_slot("ErrorProvider", provider, "ERRP"));
    if let Some(requester) = requester {
        xml.push_str(&agent_slot(
            "EvidenceRequester",
            requester,
            &requester.classification,
        ));
    }
    xml.push_str(&format!(
        r#"<rs:Exception xsi:type="rs:{}" severity="{}" message="{}" code="{}"{}>"#,
        error.code.exception_type(),
        error.code.severity(),
        escape(&error.message),
        error.code.code(),
        error
            .detail
            .as_deref()
            .map(|d| format!(r#" detail="{}""#, escape(d)))
            .unwrap_or_default(),
    ));
    xml.push_str(&date_time_slot("Timestamp", &now()));
    if let Some(location) = &error.preview_location {
        xml.push_str(&string_slot("PreviewLocation", location));
    }
    xml.push_str("</rs:Exception></query:QueryResponse>");
    xml
}
