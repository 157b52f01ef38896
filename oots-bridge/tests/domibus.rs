//! The bridge against a fake Domibus WS plugin endpoint (SOAP 1.2 over
//! HTTP, started by the test): it polls the pending requests, retrieves
//! each, and submits the answer in the same conversation, original sender
//! and final recipient swapped, the evidence as the second payload part
//! the response's `RepositoryItemRef` names. The same request delivered
//! twice is answered once, the same way. The evidence source here is a
//! fixed one: the broker behind the bridge is the next step of issue 26.

mod common;

use common::provider;

use common::access_point::{AccessPoint, read_submitted, retrieved, serve};

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::fixed::Fixed;
use common::{CLASSIFICATION, ID, reference_request, request_with};
use onceonly_oots_bridge::bridge::{Bridge, EDM_MIME};
use onceonly_oots_bridge::edm::{NS_RIM, NS_XLINK};
use onceonly_oots_bridge::mapping::Mapping;
use onceonly_oots_bridge::transport::Message;
use onceonly_oots_bridge::transport::domibus::DomibusWs;

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
        // Another request under the first one's id.
        (
            "m5".to_owned(),
            retrieved(
                &request_with(&[("<p:FamilyName>Schneider", "<p:FamilyName>Schmidt")]),
                "conv-5",
            ),
        ),
        // Not an evidence request: an error another system sent. Left
        // unanswered, so two systems never answer each other's errors.
        (
            "m6".to_owned(),
            retrieved(&reference_request(), "conv-6")
                .replace(">ExecuteQueryRequest<", ">ExceptionResponse<"),
        ),
    ]);
    let source = Fixed::default();
    let bridge = Bridge::new(
        DomibusWs::new(endpoint.parse().expect("uri")),
        source,
        mapping(dir.path()),
        provider(),
    );
    assert_eq!(bridge.poll_once().await.expect("polled"), 5);
    assert!(point.pending.lock().expect("lock").is_empty());
    let submitted: Vec<Message> = point
        .submitted
        .lock()
        .expect("lock")
        .iter()
        .map(|e| read_submitted(e))
        .collect();
    assert_eq!(submitted.len(), 5);
    assert!(submitted.iter().all(|m| m.conversation_id != "conv-6"));

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
    // Another document under an id already answered: refused, and no
    // evidence of the first request goes to it.
    let reused = String::from_utf8(submitted[4].payloads[0].bytes.clone()).expect("utf-8");
    assert_eq!(submitted[4].payloads.len(), 1, "no evidence");
    assert!(reused.contains(r#"detail="R-BRIDGE-ID""#), "{reused}");
    assert_eq!(bridge_calls(&bridge), 1);
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

#[tokio::test]
async fn an_answer_the_access_point_does_not_take_is_sent_again_at_the_next_poll() {
    let dir = tempfile::tempdir().expect("dir");
    let point = Arc::new(AccessPoint::default());
    let endpoint = serve(point.clone()).await;
    point
        .pending
        .lock()
        .expect("lock")
        .push(("m1".to_owned(), retrieved(&reference_request(), "conv-1")));
    point.refuse_submits.store(1, Ordering::SeqCst);
    let bridge = Bridge::new(
        DomibusWs::new(endpoint.parse().expect("uri")),
        Fixed::default(),
        mapping(dir.path()),
        provider(),
    );
    assert_eq!(bridge.poll_once().await.expect("polled"), 1);
    assert!(
        point.submitted.lock().expect("lock").is_empty(),
        "refused once"
    );
    // Nothing pending now; the answer left over goes first.
    assert_eq!(bridge.poll_once().await.expect("polled"), 0);
    let submitted = point.submitted.lock().expect("lock").clone();
    assert_eq!(submitted.len(), 1);
    assert_eq!(read_submitted(&submitted[0]).action, "ExecuteQueryResponse");
    assert_eq!(bridge_calls(&bridge), 1, "fetched once");
}

/// The plugin on another host is reached over TLS only: its certificate
/// checked against the CA the configuration names, the bridge's client
/// certificate where the plugin asks for one, and the plugin user's
/// credentials sent in the call. A plugin whose certificate another CA
/// issued is not talked to; neither is plain HTTP to another host.
#[tokio::test]
async fn a_plugin_elsewhere_is_reached_over_tls_with_the_configured_roots_and_user() {
    use onceonly_certs::identity::Role;
    use onceonly_oots_bridge::config::AccessPoint as Configured;

    let pki = onceonly_integration_tests::pki_with(&[(Role::Authority, "oots-bridge")]);
    let (server_cert, server_key) = pki.participant_paths(Role::Broker, "broker");
    let (client_cert, client_key) = pki.participant_paths(Role::Authority, "oots-bridge");
    let dir = tempfile::tempdir().expect("dir");
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret\n").expect("password");
    let point = Arc::new(AccessPoint::default());
    let endpoint = common::access_point::serve_tls(
        point.clone(),
        &server_cert,
        &server_key,
        Some(&pki.ca_cert_path()),
    )
    .await;
    point
        .pending
        .lock()
        .expect("lock")
        .push(("m1".to_owned(), retrieved(&reference_request(), "conv-1")));
    let configured = Configured {
        endpoint: endpoint.clone(),
        ca: Some(pki.ca_cert_path()),
        cert: Some(client_cert.clone()),
        key: Some(client_key.clone()),
        username: Some("oots-bridge".into()),
        password_file: Some(password.clone()),
        poll_interval: std::time::Duration::from_secs(1),
    };
    let bridge = Bridge::new(
        configured.transport().expect("transport"),
        Fixed::default(),
        mapping(dir.path()),
        provider(),
    );
    assert_eq!(bridge.poll_once().await.expect("polled over TLS"), 1);
    assert_eq!(point.submitted.lock().expect("lock").len(), 1);
    let sent = point.authorizations.lock().expect("lock").clone();
    assert!(!sent.is_empty());
    assert!(
        sent.iter().all(|a| a == "Basic b290cy1icmlkZ2U6czNjcmV0"),
        "oots-bridge:s3cret on every call: {sent:?}"
    );

    // Another CA's certificate: not talked to, and the error says why.
    let other = onceonly_integration_tests::pki_with(&[]);
    let wrong_roots = Configured {
        ca: Some(other.ca_cert_path()),
        ..configured.clone()
    };
    let bridge = Bridge::new(
        wrong_roots.transport().expect("transport"),
        Fixed::default(),
        mapping(dir.path()),
        provider(),
    );
    let refused = bridge
        .poll_once()
        .await
        .expect_err("not trusted")
        .to_string();
    assert!(
        refused.contains("certificate") || refused.contains("UnknownIssuer"),
        "{refused}"
    );
    // Without the client certificate the plugin asks for: refused too.
    let no_client = Configured {
        cert: None,
        key: None,
        ..configured.clone()
    };
    let bridge = Bridge::new(
        no_client.transport().expect("transport"),
        Fixed::default(),
        mapping(dir.path()),
        provider(),
    );
    assert!(bridge.poll_once().await.is_err());
}
