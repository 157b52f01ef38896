//! The reference EDM request the bridge's tests start from, written from
//! the specification's field lists.

#![allow(dead_code)]

pub mod access_point;
pub mod fixed;
pub mod world;

use onceonly_oots_bridge::edm::request::Agent;
use onceonly_oots_bridge::edm::{NS_QUERY, NS_RIM, NS_SDG};

pub const ID: &str = "urn:uuid:0b8f2a4e-5c1d-4e7a-9a53-2f6c8d1e7b40";
pub const CLASSIFICATION: &str =
    "https://sr.oots.tech.ec.europa.eu/evidencetypeclassifications/DE/5f4e2a3c-birth";

/// Replaces in the reference request: (what, with).
pub fn request_with(changes: &[(&str, &str)]) -> String {
    let mut xml = reference_request();
    for (from, to) in changes {
        assert!(xml.contains(from), "the reference request holds {from:?}");
        xml = xml.replacen(from, to, 1);
    }
    xml
}

/// A request as another member state's procedure portal sends it, with
/// prefixes of its own choosing (q, r, p instead of query, rim, sdg).
pub fn reference_request() -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<q:QueryRequest xmlns:q="{NS_QUERY}" xmlns:r="{NS_RIM}" xmlns:p="{NS_SDG}"
    xmlns:x="http://www.w3.org/2001/XMLSchema-instance" id="{ID}">
  <r:Slot name="IssueDateTime"><r:SlotValue x:type="r:DateTimeValueType"><r:Value>2026-12-05T10:00:00Z</r:Value></r:SlotValue></r:Slot>
  <r:Slot name="SpecificationIdentifier"><r:SlotValue x:type="r:StringValueType"><r:Value>oots-edm:v2.0</r:Value></r:SlotValue></r:Slot>
  <r:Slot name="Procedure"><r:SlotValue x:type="r:InternationalStringValueType"><r:Value><r:LocalizedString xml:lang="EN" value="T1"/></r:Value></r:SlotValue></r:Slot>
  <r:Slot name="PossibilityForPreview"><r:SlotValue x:type="r:BooleanValueType"><r:Value>true</r:Value></r:SlotValue></r:Slot>
  <r:Slot name="ExplicitRequestGiven"><r:SlotValue x:type="r:BooleanValueType"><r:Value>true</r:Value></r:SlotValue></r:Slot>
  <r:Slot name="Requirements"><r:SlotValue x:type="r:CollectionValueType"><r:Element x:type="r:AnyValueType">
    <p:Requirement><p:Identifier>https://sr.oots.tech.ec.europa.eu/requirements/proof-of-birth</p:Identifier><p:Name lang="EN">Proof of birth</p:Name></p:Requirement>
  </r:Element></r:SlotValue></r:Slot>
  <r:Slot name="EvidenceRequester"><r:SlotValue x:type="r:CollectionValueType"><r:Element x:type="r:AnyValueType">
    <p:Agent><p:Identifier schemeID="urn:cef.eu:names:identifier:EAS:9930">AT123456789</p:Identifier><p:Name lang="DE">Stadt Wien, Magistratsabteilung 35</p:Name><p:Classification>ER</p:Classification></p:Agent>
  </r:Element></r:SlotValue></r:Slot>
  <r:Slot name="EvidenceProvider"><r:SlotValue x:type="r:AnyValueType">
    <p:Agent><p:Identifier schemeID="urn:cef.eu:names:identifier:EAS:9930">DE987654321</p:Identifier><p:Name>NOOTS Intermediäre Plattform</p:Name></p:Agent>
  </r:SlotValue></r:Slot>
  <q:ResponseOption returnType="LeafClassWithRepositoryItem"/>
  <q:Query queryDefinition="DocumentQuery">
    <r:Slot name="NaturalPerson"><r:SlotValue x:type="r:AnyValueType"><p:Person>
      <p:LevelOfAssurance>High</p:LevelOfAssurance>
      <p:Identifier schemeID="eidas">DE/AT/7f3c9e21a4b8</p:Identifier>
      <p:FamilyName>Schneider</p:FamilyName>
      <p:GivenName>Anna Lena</p:GivenName>
      <p:DateOfBirth>1990-03-14</p:DateOfBirth>
    </p:Person></r:SlotValue></r:Slot>
    <r:Slot name="EvidenceRequest"><r:SlotValue x:type="r:AnyValueType"><p:DataServiceEvidenceType>
      <p:Identifier>urn:uuid:7d1c3b8e-birth-certificate</p:Identifier>
      <p:EvidenceTypeClassification>{CLASSIFICATION}</p:EvidenceTypeClassification>
      <p:Title lang="EN">Birth certificate</p:Title>
      <p:DistributedAs><p:Format>application/json</p:Format></p:DistributedAs>
    </p:DataServiceEvidenceType></r:SlotValue></r:Slot>
  </q:Query>
</q:QueryRequest>"#
    )
}

/// The reference request, changed by `changes`, asking for the birth
/// certificate as the register issues it (XML).
pub fn asked(changes: &[(&str, &str)]) -> String {
    let mut all = vec![(
        "<p:Format>application/json</p:Format>",
        "<p:Format>application/xml</p:Format>",
    )];
    all.extend_from_slice(changes);
    request_with(&all)
}

/// The bridge as the EU sees it, in the tests.
pub fn provider() -> Agent {
    Agent {
        identifier: "DE987654321".into(),
        scheme: "urn:cef.eu:names:identifier:EAS:9930".into(),
        name: "NOOTS Intermediäre Plattform".into(),
        classification: "IP".into(),
    }
}

/// The second request of a preview: `changes` applied to the reference
/// request, under `id`, carrying `location` and where to send the person
/// back.
pub fn second_request(id: &str, location: &str, changes: &[(&str, &str)]) -> String {
    let slots = format!(
        r#"<r:Slot name="PreviewLocation"><r:SlotValue x:type="r:StringValueType"><r:Value>{location}</r:Value></r:SlotValue></r:Slot>
  <r:Slot name="ReturnLocation"><r:SlotValue x:type="r:StringValueType"><r:Value>https://portal.wien.example/return?case=17</r:Value></r:SlotValue></r:Slot>
  <r:Slot name="IssueDateTime">"#
    );
    let mut all = vec![
        (ID, id),
        (r#"<r:Slot name="IssueDateTime">"#, slots.as_str()),
    ];
    all.extend_from_slice(changes);
    request_with(&all)
}

/// The `PreviewLocation` an EDM:ERR:0002 answer names.
pub fn preview_location(document: &str) -> String {
    let parsed = roxmltree::Document::parse(document).expect("an XML answer");
    parsed
        .descendants()
        .find(|d| {
            d.tag_name().namespace() == Some(NS_RIM)
                && d.tag_name().name() == "Slot"
                && d.attribute("name") == Some("PreviewLocation")
        })
        .and_then(|slot| {
            slot.descendants()
                .find(|d| d.tag_name().name() == "Value")
                .and_then(|v| v.text())
        })
        .unwrap_or_else(|| panic!("no PreviewLocation in {document}"))
        .to_owned()
}

/// The `code` (and `detail`) of an EDM error answer.
pub fn error_of(document: &str) -> (String, String) {
    let parsed = roxmltree::Document::parse(document).expect("an XML answer");
    let exception = parsed
        .descendants()
        .find(|d| d.tag_name().name() == "Exception")
        .unwrap_or_else(|| panic!("no exception in {document}"));
    (
        exception.attribute("code").unwrap_or_default().to_owned(),
        exception.attribute("detail").unwrap_or_default().to_owned(),
    )
}

/// GET `path` over TLS from the site at `addr` (HTTP/1.1), trusting only
/// the CA at `ca`: the status, the headers (lower-case names) and the body.
pub async fn https_get(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    path: &str,
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in onceonly_certs::pki::load_certs(ca).expect("the CA") {
        roots.add(cert).expect("a root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = connector.connect(name, tcp).await.expect("TLS");
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("sent");
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}
