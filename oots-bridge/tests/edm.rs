//! EDM documents written from the specification's field lists (TDD 2.0.1,
//! `../shared/OOTS.md`): a valid request is read by namespace and slot
//! name whatever the prefixes; each missing or malformed part is refused
//! with the right code and the rule in `detail`; hostile XML is refused
//! without expanding or exhausting anything; the answers carry what the
//! requester checks (`requestId`, agents, metadata, the payload's
//! reference) and read back namespace-correctly.

use onceonly_oots_bridge::edm::request::Agent;
use onceonly_oots_bridge::edm::response::{self, Evidence};
use onceonly_oots_bridge::edm::{
    ErrorCode, Limits, NS_QUERY, NS_RIM, NS_RS, NS_SDG, NS_XLINK, QueryRequest,
};
use onceonly_oots_bridge::mapping::Mapping;

mod common;

use common::provider;

use common::{CLASSIFICATION, ID, reference_request, request_with};

fn parse(xml: &str) -> Result<QueryRequest, onceonly_oots_bridge::edm::EdmError> {
    QueryRequest::parse(xml, &Limits::default())
}

#[test]
fn a_valid_request_is_read_by_namespace_and_slot_name_whatever_the_prefixes() {
    let request = parse(&reference_request()).expect("valid");
    assert_eq!(request.id, ID);
    assert_eq!(request.procedure, "T1");
    assert!(request.possibility_for_preview);
    assert_eq!(request.explicit_request_given, Some(true));
    assert_eq!(request.requester.identifier, "AT123456789");
    assert_eq!(
        request.requester.scheme,
        "urn:cef.eu:names:identifier:EAS:9930"
    );
    assert_eq!(request.requester.classification, "ER");
    assert_eq!(request.provider.identifier, "DE987654321");
    assert_eq!(
        request.person.identifier.as_deref(),
        Some("DE/AT/7f3c9e21a4b8")
    );
    assert_eq!(request.person.family_name, "Schneider");
    assert_eq!(request.person.date_of_birth, "1990-03-14");
    assert_eq!(request.evidence.classification, CLASSIFICATION);
    assert_eq!(request.evidence.formats, ["application/json"]);
    assert_eq!(request.requirements.len(), 1);

    // The same document with the standard prefixes, and the slots in
    // another order: the same request.
    let mut standard = reference_request();
    for (short, long) in [("q", "query"), ("r", "rim"), ("p", "sdg")] {
        for (from, to) in [
            (format!("<{short}:"), format!("<{long}:")),
            (format!("</{short}:"), format!("</{long}:")),
            (format!("xmlns:{short}="), format!("xmlns:{long}=")),
            (format!("\"{short}:"), format!("\"{long}:")),
        ] {
            standard = standard.replace(&from, &to);
        }
    }
    assert!(standard.contains("<rim:Slot") && standard.contains("x:type=\"rim:"));
    assert_eq!(parse(&standard).expect("valid"), request);
    // A look-alike element in another namespace is not a slot.
    let foreign = request_with(&[(
        r#"<r:Slot name="Procedure">"#,
        r#"<f:Slot xmlns:f="urn:example:not-rim" name="Procedure"><r:SlotValue x:type="r:StringValueType"><r:Value>X9</r:Value></r:SlotValue></f:Slot><r:Slot name="ProcedureOld">"#,
    )]);
    let refused = parse(&foreign).expect_err("no Procedure slot in the rim namespace");
    assert_eq!(refused.detail.as_deref(), Some("R-BRIDGE-SLOT-Procedure"));
}

#[test]
fn each_missing_or_malformed_part_is_refused_with_its_code_and_rule() {
    let cases: Vec<(&str, String, ErrorCode, &str)> = vec![
        (
            "no id",
            request_with(&[(&format!(r#" id="{ID}""#), "")]),
            ErrorCode::InvalidRequest,
            "R-BRIDGE-ID",
        ),
        (
            "an id that is no urn:uuid",
            request_with(&[(ID, "request-1")]),
            ErrorCode::InvalidRequest,
            "R-BRIDGE-ID",
        ),
        (
            "another EDM version",
            request_with(&[("oots-edm:v2.0", "oots-edm:v1.1")]),
            ErrorCode::InvalidRequest,
            "R-BRIDGE-SLOT-SpecificationIdentifier",
        ),
        (
            "no procedure",
            request_with(&[(
                r#"<r:Slot name="Procedure">"#,
                r#"<r:Slot name="Procedur">"#,
            )]),
            ErrorCode::InvalidRequest,
            "R-BRIDGE-SLOT-Procedure",
        ),
        (
            "a preview flag that is no boolean",
            request_with(&[(
                "<r:Value>true</r:Value></r:SlotValue></r:Slot>\n  <r:Slot name=\"ExplicitRequestGiven\">",
                "<r:Value>yes</r:Value></r:SlotValue></r:Slot>\n  <r:Slot name=\"ExplicitRequestGiven\">",
            )]),
            ErrorCode::InvalidRequest,
            "R-BRIDGE-SLOT-PossibilityForPreview",
        ),
        (
            "an issue time that is no time",
            request_with(&[("2026-12-05T10:00:00Z", "yesterday")]),
            ErrorCode::InvalidRequest,
            "R-BRIDGE-SLOT-IssueDateTime",
        ),
        (
            "a requester without identifier",
            request_with(&[(
                r#"<p:Identifier schemeID="urn:cef.eu:names:identifier:EAS:9930">AT123456789</p:Identifier>"#,
                "",
            )]),
            ErrorCode::InvalidRequest,
            "R-BRIDGE-SLOT-EvidenceRequester",
        ),
        (
            "a person with neither identifier nor birth date",
            request_with(&[
                (
                    r#"<p:Identifier schemeID="eidas">DE/AT/7f3c9e21a4b8</p:Identifier>"#,
                    "",
                ),
                ("<p:DateOfBirth>1990-03-14</p:DateOfBirth>", ""),
            ]),
            ErrorCode::InvalidRequest,
            "R-BRIDGE-SLOT-NaturalPerson",
        ),
        (
            "no evidence type classification",
            request_with(&[(
                &format!(
                    "<p:EvidenceTypeClassification>{CLASSIFICATION}</p:EvidenceTypeClassification>"
                ),
                "",
            )]),
            ErrorCode::InvalidRequest,
            "R-BRIDGE-SLOT-EvidenceRequest",
        ),
        (
            "not a QueryRequest",
            request_with(&[
                ("<q:QueryRequest ", "<q:QueryResponse "),
                ("</q:QueryRequest>", "</q:QueryResponse>"),
            ]),
            ErrorCode::InvalidRequest,
            "R-BRIDGE-ROOT",
        ),
    ];
    for (what, xml, code, rule) in cases {
        let refused = parse(&xml).expect_err(what);
        assert_eq!(
            (refused.code, refused.detail.as_deref()),
            (code, Some(rule)),
            "{what}: {refused}"
        );
    }
    // Another query than a document query: EDM:ERR:0008.
    let refused = parse(&request_with(&[(
        r#"queryDefinition="DocumentQuery""#,
        r#"queryDefinition="FindAllTheThings""#,
    )]))
    .expect_err("another query");
    assert_eq!(refused.code, ErrorCode::Query);
    // A legal person: not offered, EDM:ERR:0007.
    let refused = parse(&request_with(&[(
        r#"<r:Slot name="NaturalPerson">"#,
        r#"<r:Slot name="LegalPerson">"#,
    )]))
    .expect_err("a legal person");
    assert_eq!(refused.code, ErrorCode::UnsupportedCapability);
}

#[test]
fn hostile_xml_is_refused_before_it_costs_memory() {
    let limits = Limits::default();
    // Entity expansion ("billion laughs"): no DTD is read at all.
    let laughs = format!(
        r#"<?xml version="1.0"?><!DOCTYPE q [<!ENTITY a "lol"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]><q:QueryRequest xmlns:q="{NS_QUERY}" id="{ID}">&d;&d;&d;&d;</q:QueryRequest>"#
    );
    let refused = QueryRequest::parse(&laughs, &limits).expect_err("a DTD");
    assert_eq!(refused.detail.as_deref(), Some("R-BRIDGE-DTD"), "{refused}");
    // An external entity: refused the same way, nothing fetched.
    let external = format!(
        r#"<?xml version="1.0"?><!DOCTYPE q [<!ENTITY x SYSTEM "file:///etc/passwd">]><q:QueryRequest xmlns:q="{NS_QUERY}" id="{ID}">&x;</q:QueryRequest>"#
    );
    let refused = QueryRequest::parse(&external, &limits).expect_err("an external entity");
    assert_eq!(refused.detail.as_deref(), Some("R-BRIDGE-DTD"));
    // Deep nesting: 100 000 levels, refused at the depth limit.
    let deep = format!(
        r#"<q:QueryRequest xmlns:q="{NS_QUERY}" id="{ID}">{}{}</q:QueryRequest>"#,
        "<a>".repeat(100_000),
        "</a>".repeat(100_000)
    );
    let refused = QueryRequest::parse(
        &deep,
        &Limits {
            max_bytes: 10 << 20,
            ..limits
        },
    )
    .expect_err("deep");
    assert!(
        matches!(
            refused.detail.as_deref(),
            Some("R-BRIDGE-DEPTH" | "R-BRIDGE-NODES" | "R-BRIDGE-XML")
        ),
        "{refused}"
    );
    // A huge attribute.
    let huge = reference_request().replace(
        "returnType=\"LeafClassWithRepositoryItem\"",
        &format!("returnType=\"{}\"", "A".repeat(100_000)),
    );
    let refused = QueryRequest::parse(
        &huge,
        &Limits {
            max_bytes: 10 << 20,
            ..limits
        },
    )
    .expect_err("huge");
    assert_eq!(refused.detail.as_deref(), Some("R-BRIDGE-VALUE"));
    // Many nodes.
    let wide = format!(
        r#"<q:QueryRequest xmlns:q="{NS_QUERY}" id="{ID}">{}</q:QueryRequest>"#,
        "<a/>".repeat(100_000)
    );
    let refused = QueryRequest::parse(
        &wide,
        &Limits {
            max_bytes: 10 << 20,
            ..limits
        },
    )
    .expect_err("wide");
    assert_eq!(refused.detail.as_deref(), Some("R-BRIDGE-NODES"));
    // Too big to read at all.
    let big = format!("{}{}", reference_request(), " ".repeat(2 << 20));
    let refused = QueryRequest::parse(&big, &limits).expect_err("big");
    assert_eq!(refused.detail.as_deref(), Some("R-BRIDGE-SIZE"));
    // Not XML.
    let refused = QueryRequest::parse("<q:QueryRequest", &limits).expect_err("broken");
    assert_eq!(refused.code, ErrorCode::InvalidRequest);
}

fn slot_text(node: roxmltree::Node<'_, '_>, name: &str) -> Option<String> {
    node.children()
        .find(|c| {
            c.tag_name().namespace() == Some(NS_RIM)
                && c.tag_name().name() == "Slot"
                && c.attribute("name") == Some(name)
        })
        .and_then(|s| s.descendants().find(|d| d.tag_name().name() == "Value"))
        .and_then(|v| v.text())
        .map(str::to_owned)
}

#[test]
fn an_answer_names_the_request_the_agents_the_metadata_and_the_payload_part() {
    let request = parse(&reference_request()).expect("valid");
    let evidence = Evidence {
        identifier: "urn:uuid:11111111-2222-4333-8444-555555555555".into(),
        issuing_authority: Agent {
            identifier: "civil-register".into(),
            scheme: "urn:onceonly:connector".into(),
            name: "Melderegister <Berlin> & Co".into(),
            classification: String::new(),
        },
        issuing_date: "2026-12-05".into(),
        format: "application/json".into(),
        content_id: "evidence-1@onceonly".into(),
    };
    let xml = response::success(&request, &provider(), &evidence);
    let document = roxmltree::Document::parse(&xml).expect("well-formed");
    let root = document.root_element();
    assert_eq!(root.tag_name().namespace(), Some(NS_QUERY));
    assert_eq!(root.tag_name().name(), "QueryResponse");
    assert_eq!(root.attribute("requestId"), Some(ID));
    assert_eq!(root.attribute("status"), Some(response::SUCCESS));
    assert_eq!(
        slot_text(root, "SpecificationIdentifier").as_deref(),
        Some("oots-edm:v2.0")
    );
    let agents: Vec<_> = document
        .descendants()
        .filter(|d| d.tag_name().namespace() == Some(NS_SDG) && d.tag_name().name() == "Agent")
        .map(|a| {
            a.children()
                .find(|c| c.tag_name().name() == "Identifier")
                .and_then(|i| i.text())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        agents,
        ["DE987654321", "AT123456789"],
        "provider, requester"
    );
    let named = |name: &str| {
        document
            .descendants()
            .find(|d| d.tag_name().namespace() == Some(NS_SDG) && d.tag_name().name() == name)
            .and_then(|n| n.text())
            .map(str::to_owned)
    };
    assert_eq!(
        named("EvidenceTypeClassification").as_deref(),
        Some(CLASSIFICATION)
    );
    assert_eq!(named("Format").as_deref(), Some("application/json"));
    assert_eq!(named("IssuingDate").as_deref(), Some("2026-12-05"));
    // Escaped on the way out, whole on the way back.
    assert!(xml.contains("Melderegister &lt;Berlin&gt; &amp; Co"));
    assert_eq!(
        named("Name").as_deref(),
        Some("NOOTS Intermediäre Plattform")
    );
    let reference = document
        .descendants()
        .find(|d| {
            d.tag_name().namespace() == Some(NS_RIM) && d.tag_name().name() == "RepositoryItemRef"
        })
        .expect("a payload reference");
    assert_eq!(
        reference.attribute((NS_XLINK, "href")),
        Some("cid:evidence-1@onceonly")
    );
    let classification = document
        .descendants()
        .find(|d| {
            d.tag_name().name() == "Classification" && d.tag_name().namespace() == Some(NS_RIM)
        })
        .expect("classified");
    assert_eq!(
        classification.attribute("classificationNode"),
        Some("MainEvidence")
    );
}

#[test]
fn an_error_answer_carries_type_code_severity_detail_and_the_preview_location() {
    let request = parse(&reference_request()).expect("valid");
    for code in [
        ErrorCode::Authentication,
        ErrorCode::InvalidRequest,
        ErrorCode::ObjectNotFound,
        ErrorCode::Timeout,
        ErrorCode::UnresolvedReference,
        ErrorCode::UnsupportedCapability,
        ErrorCode::Query,
    ] {
        let error =
            onceonly_oots_bridge::edm::EdmError::new(code, "why \"it\" failed").with_detail("R-X");
        let xml = response::failure(&request.id, Some(&request.requester), &provider(), &error);
        let document = roxmltree::Document::parse(&xml).expect("well-formed");
        let root = document.root_element();
        assert_eq!(root.attribute("status"), Some(response::FAILURE));
        assert_eq!(root.attribute("requestId"), Some(ID));
        let exception = root
            .children()
            .find(|c| c.tag_name().namespace() == Some(NS_RS) && c.tag_name().name() == "Exception")
            .expect("an rs:Exception");
        assert_eq!(exception.attribute("code"), Some(code.code()));
        assert_eq!(
            exception.attribute(("http://www.w3.org/2001/XMLSchema-instance", "type")),
            Some(format!("rs:{}", code.exception_type()).as_str())
        );
        assert_eq!(
            exception.attribute("severity"),
            Some("urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error")
        );
        assert_eq!(exception.attribute("detail"), Some("R-X"));
        assert_eq!(exception.attribute("message"), Some("why \"it\" failed"));
        assert!(slot_text(exception, "Timestamp").is_some());
        assert_eq!(
            slot_text(root, "ErrorProvider"),
            None,
            "an agent, not a value"
        );
    }
    let preview = onceonly_oots_bridge::edm::EdmError::preview_required(
        "https://bridge.example.de/preview/abc".into(),
    );
    let xml = response::failure(&request.id, Some(&request.requester), &provider(), &preview);
    let document = roxmltree::Document::parse(&xml).expect("well-formed");
    let exception = document
        .descendants()
        .find(|d| d.tag_name().name() == "Exception")
        .expect("exception");
    assert_eq!(exception.attribute("code"), Some("EDM:ERR:0002"));
    assert_eq!(
        exception.attribute("severity"),
        Some("urn:sr.oots.tech.ec.europa.eu:codes:ErrorSeverity:EDMErrorResponse:PreviewRequired")
    );
    assert_eq!(
        slot_text(exception, "PreviewLocation").as_deref(),
        Some("https://bridge.example.de/preview/abc")
    );
}

#[test]
fn the_mapping_names_the_evidence_type_and_refuses_what_it_does_not_provide() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("mapping.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[evidence]]
classification = "{CLASSIFICATION}"
procedures = ["T1", "T2"]
evidence_type = "birth-certificate"
legal_basis = "Art. 14 Abs. 1 VO (EU) 2018/1724"
format = "application/json"
explicit_request_required = true
"#
        ),
    )
    .expect("write");
    let mapping = Mapping::load(&path).expect("loads");
    let request = parse(&reference_request()).expect("valid");
    let entry = mapping.find(&request).expect("mapped");
    assert_eq!(entry.evidence_type, "birth-certificate");
    assert_eq!(Mapping::purpose(&request.procedure), "oots:T1");

    let unknown_type = parse(&request_with(&[(
        CLASSIFICATION,
        "https://example.org/other",
    )]))
    .expect("valid");
    assert_eq!(
        mapping.find(&unknown_type).expect_err("unmapped").code,
        ErrorCode::ObjectNotFound
    );
    let other_procedure =
        parse(&request_with(&[(r#"value="T1""#, r#"value="U3""#)])).expect("valid");
    let refused = mapping
        .find(&other_procedure)
        .expect_err("another procedure");
    assert_eq!(
        (refused.code, refused.detail.as_deref()),
        (ErrorCode::InvalidRequest, Some("R-BRIDGE-PROCEDURE"))
    );
    let no_explicit = parse(&request_with(&[(
        "<r:Slot name=\"ExplicitRequestGiven\"><r:SlotValue x:type=\"r:BooleanValueType\"><r:Value>true",
        "<r:Slot name=\"ExplicitRequestGiven\"><r:SlotValue x:type=\"r:BooleanValueType\"><r:Value>false",
    )]))
    .expect("valid");
    let refused = mapping.find(&no_explicit).expect_err("not explicit");
    assert_eq!(refused.detail.as_deref(), Some("R-BRIDGE-EXPLICIT-REQUEST"));
    let pdf = parse(&request_with(&[(
        "<p:Format>application/json</p:Format>",
        "<p:Format>application/pdf</p:Format>",
    )]))
    .expect("valid");
    assert_eq!(
        mapping.find(&pdf).expect_err("pdf").code,
        ErrorCode::UnsupportedCapability
    );

    // The user's authentication below what the evidence needs (the
    // default, substantial): EDM:ERR:0001; an eIDAS URI reads too.
    for (stated, refused) in [
        ("Low", true),
        ("", true),
        ("somewhat", true),
        ("http://eidas.europa.eu/LoA/substantial", false),
        ("High", false),
    ] {
        let request = parse(&request_with(&[(
            "<p:LevelOfAssurance>High</p:LevelOfAssurance>",
            &format!("<p:LevelOfAssurance>{stated}</p:LevelOfAssurance>"),
        )]))
        .expect("valid");
        match mapping.find(&request) {
            Err(error) => {
                assert!(refused, "{stated}: {error}");
                assert_eq!(error.code, ErrorCode::Authentication);
            }
            Ok(_) => assert!(!refused, "{stated} was let through"),
        }
    }

    // A mapping may ask for the citizen's preview (the bridge then needs
    // its preview pages: see preview.rs).
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, format!("{text}preview = true\n")).expect("write");
    assert!(Mapping::load(&path).expect("preview").evidence[0].preview);

    // A mapping with an error names the file and the fix.
    std::fs::write(&path, "[[evidence]]\nclassification = \"x\"\nprocedures = []\nevidence_type = \"t\"\nlegal_basis = \"l\"\nformat = \"f\"\n").expect("write");
    let error = Mapping::load(&path).expect_err("no procedures").to_string();
    assert!(
        error.contains("mapping.toml") && error.contains("procedures"),
        "{error}"
    );
}

#[test]
fn the_brokers_refusals_map_once_to_edm_errors() {
    use onceonly_oots_bridge::edm::EdmError;
    use onceonly_proto::v1::ErrorReason as R;
    for (reason, code) in [
        (R::SubjectNotFound, ErrorCode::ObjectNotFound),
        (R::AmbiguousSubject, ErrorCode::ObjectNotFound),
        (R::SubjectBlocked, ErrorCode::ObjectNotFound),
        (R::NoRoute, ErrorCode::ObjectNotFound),
        (R::DeadlineExceeded, ErrorCode::Timeout),
        (R::ConnectorUnavailable, ErrorCode::Timeout),
        (R::BrokerUnavailable, ErrorCode::Timeout),
        (R::SignedRequestInvalid, ErrorCode::Query),
        (R::InvalidRequest, ErrorCode::InvalidRequest),
        (R::PolicyDenied, ErrorCode::Query),
    ] {
        let error = EdmError::from_broker(reason);
        assert_eq!(error.code, code, "{reason:?}");
        assert_eq!(error.detail.as_deref(), Some(reason.reason()));
        assert!(
            !error.message.contains("register"),
            "no internal words: {error}"
        );
    }
}
