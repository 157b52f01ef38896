//! The Domibus WS plugin (SOAP 1.2, namespace `http://eu.domibus.wsplugin/`):
//! the bridge polls `listPendingMessages`, fetches each with
//! `retrieveMessage` (the ebMS `Messaging` header with the conversation
//! and properties, payloads base64 in `<payload><value>`), and answers
//! with `submitMessage`. Answers are read with the same limits as EDM
//! documents.
//!
//! Over HTTPS (the plugin's server certificate checked against the roots
//! the configuration names, optionally a client certificate), or plain
//! HTTP where the plugin listens on the bridge's own host; with HTTP basic
//! authentication where the plugin asks for a user (Domibus's plugin
//! users).

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use roxmltree::Node;

use super::{Message, Payload, Transport, TransportError};
use crate::edm::{Limits, escape};

/// SOAP 1.2.
pub const NS_SOAP: &str = "http://www.w3.org/2003/05/soap-envelope";
/// The WS plugin's operations.
pub const NS_WSPLUGIN: &str = "http://eu.domibus.wsplugin/";
/// ebMS 3 core (the `Messaging` header).
pub const NS_EBMS: &str = "http://docs.oasis-open.org/ebxml-msg/ebms/v3.0/ns/core/200704/";

/// The ebMS service of OOTS queries.
pub const SERVICE: &str = "QueryManager";
/// Its type.
pub const SERVICE_TYPE: &str = "urn:oasis:names:tc:ebcore:ebrs:ebms:binding:1.0";

/// How long one call to the access point may take.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The largest SOAP answer read (an EDM document and its evidence).
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// A Domibus access point's WS plugin.
#[derive(Clone)]
pub struct DomibusWs {
    endpoint: http::Uri,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// The `Authorization` header's value, where the plugin asks for a user.
    authorization: Option<http::HeaderValue>,
    limits: Limits,
}

impl std::fmt::Debug for DomibusWs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credentials stay out of logs.
        f.debug_struct("DomibusWs")
            .field("endpoint", &self.endpoint)
            .field("authorization", &self.authorization.as_ref().map(|_| "…"))
            .finish()
    }
}

impl DomibusWs {
    /// The plugin at `endpoint` over plain HTTP (e.g.
    /// `http://127.0.0.1:8080/domibus/services/wsplugin`, on the bridge's
    /// own host).
    ///
    /// # Panics
    ///
    /// Never in practice: rustls with ring offers its default protocol
    /// versions.
    pub fn new(endpoint: http::Uri) -> Self {
        let no_roots = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|builder| {
            builder
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        });
        match no_roots {
            Ok(config) => DomibusWs::with_tls(endpoint, config),
            // Not reached: ring offers the default versions.
            Err(error) => panic!("rustls with ring: {error}"),
        }
    }

    /// The plugin at `endpoint` (https:// or http://), TLS configured by
    /// `tls` (its roots, and a client certificate where the plugin asks
    /// for one).
    pub fn with_tls(endpoint: http::Uri, tls: rustls::ClientConfig) -> Self {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        DomibusWs {
            endpoint,
            client: Client::builder(TokioExecutor::new()).build(connector),
            authorization: None,
            limits: Limits {
                max_bytes: MAX_ANSWER,
                max_value: MAX_ANSWER,
                ..Limits::default()
            },
        }
    }

    /// Signs in to the plugin as `user` with `password` (HTTP basic
    /// authentication; send it over HTTPS only, or on the own host).
    pub fn with_basic_auth(mut self, user: &str, password: &str) -> Self {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        self.authorization = http::HeaderValue::from_str(&format!("Basic {token}"))
            .ok()
            .map(|mut value| {
                value.set_sensitive(true);
                value
            });
        self
    }

    async fn call(
        &self,
        operation: &'static str,
        envelope: String,
    ) -> Result<String, TransportError> {
        let unreachable = |reason: String| TransportError::Unreachable {
            endpoint: self.endpoint.to_string(),
            reason,
        };
        let mut request = http::Request::post(self.endpoint.clone())
            .header(
                http::header::CONTENT_TYPE,
                format!("application/soap+xml; charset=utf-8; action=\"{operation}\""),
            )
            .body(Full::new(Bytes::from(envelope)))
            .map_err(|e| unreachable(e.to_string()))?;
        if let Some(authorization) = &self.authorization {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, authorization.clone());
        }
        // One deadline for the whole call: a hung access point must not
        // hold the bridge (or its shutdown).
        let exchanged = tokio::time::timeout(CALL_TIMEOUT, async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| unreachable(error_chain(&e)))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok::<_, TransportError>((status, body))
        })
        .await
        .map_err(|_| unreachable(format!("no answer within {CALL_TIMEOUT:?}")))?;
        let (status, body) = exchanged?;
        let text = String::from_utf8(body.to_vec()).map_err(|_| TransportError::Malformed {
            operation,
            reason: "not UTF-8".into(),
        })?;
        if let Some(fault) = fault_reason(&text, &self.limits) {
            return Err(TransportError::Fault {
                operation,
                reason: fault,
            });
        }
        if !status.is_success() {
            return Err(unreachable(format!("HTTP {status}")));
        }
        Ok(text)
    }
}

/// An error with its causes (a TLS failure sits a few levels down).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut said = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        said.push_str(": ");
        said.push_str(&next.to_string());
        cause = next.source();
    }
    said
}

fn envelope(header: &str, body: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><soap:Envelope xmlns:soap="{NS_SOAP}" xmlns:ws="{NS_WSPLUGIN}" xmlns:eb="{NS_EBMS}"><soap:Header>{header}</soap:Header><soap:Body>{body}</soap:Body></soap:Envelope>"#
    )
}

fn is(node: &Node<'_, '_>, namespace: &str, name: &str) -> bool {
    node.is_element()
        && node.tag_name().name() == name
        && node.tag_name().namespace() == Some(namespace)
}

/// The text of the first element `name` (any namespace, as the plugin
/// leaves its children unqualified) under `node`.
fn text_of(node: Node<'_, '_>, name: &str) -> Option<String> {
    node.descendants()
        .find(|d| d.is_element() && d.tag_name().name() == name)
        .and_then(|d| d.text())
        .map(|t| t.trim().to_owned())
}

fn fault_reason(text: &str, limits: &Limits) -> Option<String> {
    let document = crate::edm::parse(text, limits).ok()?;
    let fault = document.descendants().find(|d| is(d, NS_SOAP, "Fault"))?;
    Some(text_of(fault, "Text").unwrap_or_else(|| "a SOAP fault without reason".into()))
}

fn malformed(operation: &'static str, reason: impl Into<String>) -> TransportError {
    TransportError::Malformed {
        operation,
        reason: reason.into(),
    }
}

/// The ebMS header of `message`, sent as its reply.
fn messaging(message: &Message) -> String {
    let properties: String = message
        .properties
        .iter()
        .map(|(name, value)| {
            format!(
                r#"<eb:Property name="{}">{}</eb:Property>"#,
                escape(name),
                escape(value)
            )
        })
        .collect();
    let parts: String = message
        .payloads
        .iter()
        .map(|p| {
            format!(
                r#"<eb:PartInfo href="cid:{}"><eb:PartProperties><eb:Property name="MimeType">{}</eb:Property></eb:PartProperties></eb:PartInfo>"#,
                escape(&p.content_id),
                escape(&p.mime_type)
            )
        })
        .collect();
    format!(
        concat!(
            r#"<eb:Messaging><eb:UserMessage>"#,
            r#"<eb:CollaborationInfo><eb:Service type="{service_type}">{service}</eb:Service><eb:Action>{action}</eb:Action><eb:ConversationId>{conversation}</eb:ConversationId></eb:CollaborationInfo>"#,
            r#"<eb:MessageProperties>{properties}</eb:MessageProperties>"#,
            r#"<eb:PayloadInfo>{parts}</eb:PayloadInfo>"#,
            r#"</eb:UserMessage></eb:Messaging>"#
        ),
        service_type = SERVICE_TYPE,
        service = SERVICE,
        action = escape(&message.action),
        conversation = escape(&message.conversation_id),
        properties = properties,
        parts = parts,
    )
}

/// Reads a retrieveMessage answer.
pub fn read_retrieved(
    message_id: &str,
    text: &str,
    limits: &Limits,
) -> Result<Message, TransportError> {
    const OP: &str = "retrieveMessage";
    let document = crate::edm::parse(text, limits).map_err(|e| malformed(OP, e.message))?;
    let user = document
        .descendants()
        .find(|d| is(d, NS_EBMS, "UserMessage"))
        .ok_or_else(|| malformed(OP, "no eb:UserMessage header"))?;
    let properties = user
        .descendants()
        .filter(|d| {
            is(d, NS_EBMS, "Property")
                && d.parent()
                    .is_some_and(|p| is(&p, NS_EBMS, "MessageProperties"))
        })
        .filter_map(|p| {
            Some((
                p.attribute("name")?.to_owned(),
                p.text().unwrap_or_default().trim().to_owned(),
            ))
        })
        .collect();
    let mime_of = |cid: &str| {
        user.descendants()
            .filter(|d| is(d, NS_EBMS, "PartInfo"))
            .find(|part| part.attribute("href").map(|h| h.trim_start_matches("cid:")) == Some(cid))
            .and_then(|part| {
                part.descendants()
                    .find(|d| is(d, NS_EBMS, "Property") && d.attribute("name") == Some("MimeType"))
                    .and_then(|m| m.text())
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    };
    let body = document
        .descendants()
        .find(|d| is(d, NS_WSPLUGIN, "retrieveMessageResponse"))
        .ok_or_else(|| malformed(OP, "no ws:retrieveMessageResponse"))?;
    let mut payloads = Vec::new();
    for payload in body
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "payload")
    {
        let content_id = payload
            .attribute("payloadId")
            .unwrap_or_default()
            .trim_start_matches("cid:")
            .to_owned();
        let value = text_of(payload, "value").unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.split_whitespace().collect::<String>())
            .map_err(|e| malformed(OP, format!("payload {content_id} is not base64: {e}")))?;
        payloads.push(Payload {
            mime_type: mime_of(&content_id),
            content_id,
            bytes,
        });
    }
    if payloads.is_empty() {
        return Err(malformed(OP, "the message has no payload"));
    }
    Ok(Message {
        message_id: message_id.to_owned(),
        conversation_id: text_of(user, "ConversationId").unwrap_or_default(),
        action: text_of(user, "Action").unwrap_or_default(),
        properties,
        payloads,
    })
}

impl Transport for DomibusWs {
    async fn pending(&self) -> Result<Vec<String>, TransportError> {
        const OP: &str = "listPendingMessages";
        let text = self
            .call(OP, envelope("", "<ws:listPendingMessagesRequest/>"))
            .await?;
        let document =
            crate::edm::parse(&text, &self.limits).map_err(|e| malformed(OP, e.message))?;
        let list = document
            .descendants()
            .find(|d| is(d, NS_WSPLUGIN, "listPendingMessagesResponse"))
            .ok_or_else(|| malformed(OP, "no ws:listPendingMessagesResponse"))?;
        Ok(list
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == "messageID")
            .filter_map(|c| c.text().map(|t| t.trim().to_owned()))
            .filter(|id| !id.is_empty())
            .collect())
    }

    async fn retrieve(&self, message_id: &str) -> Result<Message, TransportError> {
        let text = self
            .call(
                "retrieveMessage",
                envelope(
                    "",
                    &format!(
                        "<ws:retrieveMessageRequest><messageID>{}</messageID></ws:retrieveMessageRequest>",
                        escape(message_id)
                    ),
                ),
            )
            .await?;
        read_retrieved(message_id, &text, &self.limits)
    }

    async fn submit(&self, message: &Message) -> Result<String, TransportError> {
        const OP: &str = "submitMessage";
        let payloads: String = message
            .payloads
            .iter()
            .map(|p| {
                format!(
                    r#"<payload payloadId="cid:{}" contentType="{}"><value>{}</value></payload>"#,
                    escape(&p.content_id),
                    escape(&p.mime_type),
                    base64::engine::general_purpose::STANDARD.encode(&p.bytes)
                )
            })
            .collect();
        let text = self
            .call(
                OP,
                envelope(
                    &messaging(message),
                    &format!("<ws:submitRequest>{payloads}</ws:submitRequest>"),
                ),
            )
            .await?;
        let document =
            crate::edm::parse(&text, &self.limits).map_err(|e| malformed(OP, e.message))?;
        document
            .descendants()
            .find(|d| is(d, NS_WSPLUGIN, "submitResponse"))
            .and_then(|r| text_of(r, "messageID"))
            .ok_or_else(|| malformed(OP, "no messageID in ws:submitResponse"))
    }
}
