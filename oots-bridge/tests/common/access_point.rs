//! A fake Domibus WS plugin endpoint (SOAP 1.2 over HTTP, on loopback)
//! for the bridge's tests: messages waiting, retrieved whole, answers
//! submitted and kept for the test to read.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use base64::Engine;
use onceonly_oots_bridge::edm::Limits;
use onceonly_oots_bridge::transport::Message;
use onceonly_oots_bridge::transport::domibus::{NS_EBMS, NS_SOAP, NS_WSPLUGIN, read_retrieved};

/// What the fake access point holds: messages waiting, answers submitted.
#[derive(Default)]
pub struct AccessPoint {
    pub pending: Mutex<Vec<(String, String)>>,
    pub submitted: Mutex<Vec<String>>,
    /// How many submissions to refuse with a SOAP fault, from the next.
    pub refuse_submits: std::sync::atomic::AtomicUsize,
    /// The `Authorization` header of each call, where one was sent.
    pub authorizations: Mutex<Vec<String>>,
}

fn soap(body: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="{NS_SOAP}" xmlns:w="{NS_WSPLUGIN}"><env:Body>{body}</env:Body></env:Envelope>"#
    )
}

/// A retrieveMessage answer holding `request` as the access point gives it.
pub fn retrieved(request: &str, conversation: &str) -> String {
    let value = base64::engine::general_purpose::STANDARD.encode(request);
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="{NS_SOAP}" xmlns:w="{NS_WSPLUGIN}" xmlns:e="{NS_EBMS}"><s:Header><e:Messaging><e:UserMessage>
<e:CollaborationInfo><e:Service type="urn:oasis:names:tc:ebcore:ebrs:ebms:binding:1.0">QueryManager</e:Service><e:Action>ExecuteQueryRequest</e:Action><e:ConversationId>{conversation}</e:ConversationId></e:CollaborationInfo>
<e:MessageProperties><e:Property name="originalSender">urn:cef.eu:names:identifier:EAS:9930:AT123456789</e:Property><e:Property name="finalRecipient">urn:cef.eu:names:identifier:EAS:9930:DE987654321</e:Property><e:Property name="ExchangeId">ex-42</e:Property></e:MessageProperties>
<e:PayloadInfo><e:PartInfo href="cid:message"><e:PartProperties><e:Property name="MimeType">application/x-ebrs+xml</e:Property></e:PartProperties></e:PartInfo></e:PayloadInfo>
</e:UserMessage></e:Messaging></s:Header><s:Body><w:retrieveMessageResponse><payload payloadId="cid:message"><value>{value}</value></payload></w:retrieveMessageResponse></s:Body></s:Envelope>"#
    )
}

/// The plugin's one route.
fn router(point: Arc<AccessPoint>) -> axum::Router {
    axum::Router::new().route(
        "/wsplugin",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let point = point.clone();
            async move {
                if let Some(authorization) = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                {
                    point
                        .authorizations
                        .lock()
                        .expect("lock")
                        .push(authorization.to_owned());
                }
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
                    "submitRequest"
                        if point
                            .refuse_submits
                            .fetch_update(
                                std::sync::atomic::Ordering::SeqCst,
                                std::sync::atomic::Ordering::SeqCst,
                                |n| n.checked_sub(1),
                            )
                            .is_ok() =>
                    {
                        soap(
                            r#"<env:Fault><env:Code><env:Value>env:Receiver</env:Value></env:Code><env:Reason><env:Text xml:lang="en">the access point is busy</env:Text></env:Reason></env:Fault>"#,
                        )
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
    )
}

/// Serves the plugin over plain HTTP on loopback: its endpoint.
pub async fn serve(point: Arc<AccessPoint>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = router(point);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/wsplugin")
}

/// Serves the plugin over TLS with `cert` and `key` (PEM), on loopback,
/// asking for a client certificate issued by `client_ca` where given: its
/// endpoint.
pub async fn serve_tls(
    point: Arc<AccessPoint>,
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> String {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in onceonly_certs::pki::load_certs(ca).expect("CA") {
                roots.add(cert).expect("root");
            }
            builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("verifier"),
            )
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(
            onceonly_certs::pki::load_certs(cert).expect("cert"),
            rustls::pki_types::PrivateKeyDer::from_pem_file(key).expect("key"),
        )
        .expect("server config");
    let (addr, _) = onceonly_integration_tests::serve_router_tls(router(point), config).await;
    format!("https://127.0.0.1:{}/wsplugin", addr.port())
}

/// A submitted answer, read as the access point reads it.
pub fn read_submitted(envelope: &str) -> Message {
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

/// Every answer submitted so far, read.
pub fn submitted(point: &AccessPoint) -> Vec<Message> {
    point
        .submitted
        .lock()
        .expect("lock")
        .iter()
        .map(|e| read_submitted(e))
        .collect()
}

/// The EDM document of a submitted answer.
pub fn document(message: &Message) -> String {
    String::from_utf8(message.payloads[0].bytes.clone()).expect("utf-8")
}

/// Puts `message` at `point` as message `id`, lets `bridge` poll, and
/// returns the EDM documents of the answers submitted meanwhile.
pub async fn deliver<T, S>(
    point: &AccessPoint,
    bridge: &onceonly_oots_bridge::bridge::Bridge<T, S>,
    id: &str,
    message: String,
) -> Vec<String>
where
    T: onceonly_oots_bridge::transport::Transport,
    S: onceonly_oots_bridge::bridge::EvidenceSource,
{
    let before = submitted(point).len();
    point
        .pending
        .lock()
        .expect("lock")
        .push((id.to_owned(), message));
    bridge.poll_once().await.expect("polled");
    submitted(point)[before..].iter().map(document).collect()
}
