//! The bridge against a fake Domibus WS plugin endpoint (SOAP 1.2 over
//! HTTP, started by the test): it polls the pending requests, retrieves
//! each, and submits the answer in the same conversation, original sender
//! and final recipient swapped, the evidence as the second payload part
//! the response's `RepositoryItemRef` names. The same request delivered
//! twice is answered once, the same way. The evidence source here is a
//! fixed one: the broker behind the bridge is the next step of issue 26.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use common::{CLASSIFICATION, ID, reference_request, request_with};
use onceonly_oots_bridge::bridge::{Bridge, EDM_MIME, EvidenceSource, Fetched};
use onceonly_oots_bridge::edm::request::Agent;
use onceonly_oots_bridge::edm::{EdmError, Limits, NS_RIM, NS_XLINK, QueryRequest};
use onceonly_oots_bridge::mapping::{Entry, Mapping};
use onceonly_oots_bridge::transport::Message;
use onceonly_oots_bridge::transport::domibus::{
    DomibusWs, NS_EBMS, NS_SOAP, NS_WSPLUGIN, read_retrieved,
};

/// What the fake access point holds: messages waiting, answers submitted.
#[derive(Default)]
struct AccessPoint {
    pending: Mutex<Vec<(String, String)>>,
    submitted: Mutex<Vec<String>>,
}

fn soap(body: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="{NS_SOAP}" xmlns:w="{NS_WSPLUGIN}"><env:Body>{body}</env:Body></env:Envelope>"#
    )
}

/// A retrieveMessage answer holding `request` as the access point gives it.
fn retrieved(request: &str, conversation: &str) -> String {
    let value = base64::engine::general_purpose::STANDARD.encode(request);
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="{NS_SOAP}" xmlns:w="{NS_WSPLUGIN}" xmlns:e="{NS_EBMS}"><s:Header><e:Messaging><e:UserMessage>
<e:CollaborationInfo><e:Service type="urn:oasis:names:tc:ebcore:ebrs:ebms:binding:1.0">QueryManager</e:Service><e:Action>ExecuteQueryRequest</e:Action><e:ConversationId>{conversation}</e:ConversationId></e:CollaborationInfo>
<e:MessageProperties><e:Property name="originalSender">urn:cef.eu:names:identifier:EAS:9930:AT123456789</e:Property><e:Property name="finalRecipient">urn:cef.eu:names:identifier:EAS:9930:DE987654321</e:Property><e:Property name="ExchangeId">ex-42</e:Property></e:MessageProperties>
<e:PayloadInfo><e:PartInfo href="cid:message"><e:PartProperties><e:Property name="MimeType">application/x-ebrs+xml</e:Property></e:PartProperties></e:PartInfo></e:PayloadInfo>
</e:UserMessage></e:Messaging></s:Header><s:Body><w:retrieveMessageResponse><payload payloadId="cid:message"><value>{value}</value></payload></w:retrieveMessageResponse></s:Body></s:Envelope>"#
    )
}

async fn serve(point: Arc<AccessPoint>) -> String {
    let app = axum::Router::new().route(
        "/wsplugin",
        axum::routing::post(move |body: String| {
            let point = point.clone();
            async move {
                let document = roxmltree::Document::parse(&body).expect("the bridge sends XML");
                let operation = document
                    .descendants()
                    .find(|d| d.tag_name().namespace() == Some(NS_WSPLUGIN))
                    .map(|d| d.tag_name().name().to_owned())
                    .unwrap_or_default();
                let answer = match operation.as_str() {
                    "listPendingMessagesRequest" => {
                        let ids: String = point
                            .pending
                            .lock()
                            .expect("lock")
                            .iter()
                            .map(|(id, _)| format!("<messageID>{id}</messageID>"))
                            .collect();
                        soap(&format!("<w:listPendingMessagesResponse>{ids}</w:listPendingMessagesResponse>"))
                    }
                    "retrieveMessageRequest" => {
                        let wanted = document
                            .descendants()
                            .find(|d| d.tag_name().name() == "messageID")
                            .and_then(|d| d.text())
                            .unwrap_or_default()
                            .to_owned();
                        let mut pending = point.pending.lock().expect("lock");
                        let at = pending.iter().position(|(id, _)| *id == wanted).expect("a pending message");
                        pending.remove(at).1
                    }
                    "submitRequest" => {
                        let mut submitted = point.submitted.lock().expect("lock");
                        submitted.push(body.clone());
                        soap(&format!(
                            "<w:submitResponse><messageID>answer-{}</messageID></w:submitResponse>",
                            submitted.len()
                        ))
                    }
                    other => soap(&format!(
                        r#"<env:Fault><env:Code><env:Value>env:Sender</env:Value></env:Code><env:Reason><env:Text xml:lang="en">unknown operation {other}</env:Text></env:Reason></env:Fault>"#
                    )),
                };
                ([("content-type", "application/soap+xml")], answer)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/wsplugin")
}

/// A fixed evidence source, counting its calls.
#[derive(Default)]
struct Fixed {
    calls: AtomicUsize,
}

impl EvidenceSource for Fixed {
    async fn fetch(
        &self,
        request: &QueryRequest,
        entry: &Entry,
        _: &Message,
    ) -> Result<Fetched, EdmError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Fetched {
            bytes: format!(
                r#"{{"evidence_type":"{}","family_name":"{}"}}"#,
                entry.evidence_type, request.person.family_name
            )
            .into_bytes(),
            issuing_authority: Agent {
                identifier: "civil-register".into(),
                scheme: "urn:onceonly:connector".into(),
                name: "Melderegister Berlin".into(),
                classification: String::new(),
            },
            issuing_date: "2026-12-05".into(),
        })
    }
}

fn mapping(dir: &std::path::Path) -> Mapping {
    let path = dir.join("mapping.toml");
    std::fs::write(
        &path,
        format!(
            "[[evidence]]\nclassification = \"{CLASSIFICATION}\"\nprocedures = [\"T1\"]\nevidence_type = \"birth-certificate\"\nlegal_basis = \"Art. 14 VO (EU) 2018/1724\"\nformat = \"application/json\"\n"
        ),
    )
    .expect("write");
    Mapping::load(&path).expect("mapping")
}

fn provider() -> Agent {
    Agent {
        identifier: "DE987654321".into(),
        scheme: "urn:cef.eu:names:identifier:EAS:9930".into(),
        name: "NOOTS Intermediäre Plattform".into(),
        classification: "IP".into(),
    }
}

/// A submitted answer, read as the access point reads it.
fn read_submitted(envelope: &str) -> Message {
    // The submitRequest carries the same payload shape as a retrieved
    // message; read it with the bridge's own reader after renaming.
    let as_retrieved = envelope.replace("ws:submitRequest", "ws:retrieveMessageResponse");
    read_retrieved(
        "submitted",
        &as_retrieved,
        &Limits {
            max_bytes: 1 << 24,
            max_value: 1 << 24,
            ..Limits::default()
        },
    )
    .expect("a well-formed submission")
}

#[tokio::test]
async fn requests_polled_from_the_access_point_are_answered_in_their_conversation_once() {
    let dir = tempfile::tempdir().expect("dir");
    let point = Arc::new(AccessPoint::default());
    let endpoint = serve(point.clone()).await;
    point.pending.lock().expect("lock").extend([
        ("m1".to_owned(), retrieved(&reference_request(), "conv-1")),
        // The same request again (the requester's retry).
        ("m2".to_owned(), retrieved(&reference_request(), "conv-1")),
        // One for evidence nobody provides here.
        (
            "m3".to_owned(),
            retrieved(
                &request_with(&[
                    (CLASSIFICATION, "https://example.org/unknown"),
                    (ID, "urn:uuid:00000000-0000-4000-8000-000000000003"),
                ]),
                "conv-3",
            ),
        ),
        // Not XML at all.
        (
            "m4".to_owned(),
            retrieved("this is not an EDM document", "conv-4"),
        ),
    ]);
    let source = Fixed::default();
    let bridge = Bridge::new(
        DomibusWs::new(endpoint.parse().expect("uri")),
        source,
        mapping(dir.path()),
        provider(),
    );
    assert_eq!(bridge.poll_once().await.expect("polled"), 4);
    assert!(point.pending.lock().expect("lock").is_empty());
    let submitted: Vec<Message> = point
        .submitted
        .lock()
        .expect("lock")
        .iter()
        .map(|e| read_submitted(e))
        .collect();
    assert_eq!(submitted.len(), 4);

    // The answer: same conversation, parties swapped, exchange id kept,
    // the EDM document first, the evidence the document references next.
    let first = &submitted[0];
    assert_eq!(first.action, "ExecuteQueryResponse");
    assert_eq!(first.conversation_id, "conv-1");
    assert_eq!(
        first.property("finalRecipient"),
        Some("urn:cef.eu:names:identifier:EAS:9930:AT123456789")
    );
    assert_eq!(
        first.property("originalSender"),
        Some("urn:cef.eu:names:identifier:EAS:9930:DE987654321")
    );
    assert_eq!(first.property("ExchangeId"), Some("ex-42"));
    assert_eq!(first.payloads.len(), 2);
    assert_eq!(first.payloads[0].mime_type, EDM_MIME);
    let answer = String::from_utf8(first.payloads[0].bytes.clone()).expect("utf-8");
    let document = roxmltree::Document::parse(&answer).expect("xml");
    assert_eq!(document.root_element().attribute("requestId"), Some(ID));
    let href = document
        .descendants()
        .find(|d| {
            d.tag_name().namespace() == Some(NS_RIM) && d.tag_name().name() == "RepositoryItemRef"
        })
        .and_then(|r| r.attribute((NS_XLINK, "href")))
        .expect("a reference");
    assert_eq!(href, format!("cid:{}", first.payloads[1].content_id));
    assert_eq!(first.payloads[1].mime_type, "application/json");
    assert_eq!(
        String::from_utf8_lossy(&first.payloads[1].bytes),
        r#"{"evidence_type":"birth-certificate","family_name":"Schneider"}"#
    );

    // Delivered twice: answered once, the same document both times.
    assert_eq!(submitted[1].payloads, first.payloads, "the same answer");
    assert_eq!(bridge_calls(&bridge), 1, "the evidence was fetched once");

    // Unmapped evidence: EDM:ERR:0004, nothing fetched for it.
    let refused = String::from_utf8(submitted[2].payloads[0].bytes.clone()).expect("utf-8");
    assert_eq!(submitted[2].action, "ExceptionResponse");
    assert!(refused.contains(r#"code="EDM:ERR:0004""#), "{refused}");
    assert!(refused.contains("urn:uuid:00000000-0000-4000-8000-000000000003"));
    // Not XML: EDM:ERR:0003, answered all the same.
    let broken = String::from_utf8(submitted[3].payloads[0].bytes.clone()).expect("utf-8");
    assert!(broken.contains(r#"code="EDM:ERR:0003""#), "{broken}");
    assert!(broken.contains(r#"detail="R-BRIDGE-XML""#), "{broken}");
}

fn bridge_calls(bridge: &Bridge<DomibusWs, Fixed>) -> usize {
    bridge.source().calls.load(Ordering::SeqCst)
}

#[tokio::test]
async fn an_access_point_that_faults_or_is_away_is_named() {
    let point = Arc::new(AccessPoint::default());
    let endpoint = serve(point).await;
    // A path the fake does not serve: HTTP 404.
    let away = DomibusWs::new(
        endpoint
            .replace("/wsplugin", "/nothing")
            .parse()
            .expect("uri"),
    );
    let error = onceonly_oots_bridge::transport::Transport::pending(&away)
        .await
        .expect_err("404")
        .to_string();
    assert!(
        error.contains("cannot be reached") && error.contains("404"),
        "{error}"
    );
    // Nobody listening.
    let gone = DomibusWs::new("http://127.0.0.1:9/wsplugin".parse().expect("uri"));
    let error = onceonly_oots_bridge::transport::Transport::pending(&gone)
        .await
        .expect_err("refused")
        .to_string();
    assert!(error.contains("127.0.0.1:9"), "{error}");
}
