//! One EU request in, one answer out: the EDM document read and checked,
//! mapped, the evidence fetched from an [`EvidenceSource`] (the broker, in
//! service), and the QueryResponse or the EDM error sent back over the
//! [`Transport`]. A request delivered twice (the same `@id`) is answered
//! once, the same way both times.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use crate::edm::request::Agent;
use crate::edm::response::{self, Evidence};
use crate::edm::{EdmError, Limits, QueryRequest};
use crate::mapping::{Entry, Mapping};
use crate::transport::{Message, Payload, Transport, TransportError};

/// The MIME type of EDM documents.
pub const EDM_MIME: &str = "application/x-ebrs+xml";

/// Evidence fetched for a request.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Its bytes, checked against the register's statement.
    pub bytes: Vec<u8>,
    /// Who issued it.
    pub issuing_authority: Agent,
    /// When, `YYYY-MM-DD`.
    pub issuing_date: String,
}

/// Where the evidence comes from: the broker, in service.
pub trait EvidenceSource: Send + Sync {
    /// The evidence `entry` names for `request`, or the EDM error.
    fn fetch(
        &self,
        request: &QueryRequest,
        entry: &Entry,
        message: &Message,
    ) -> impl Future<Output = Result<Fetched, EdmError>> + Send;
}

/// The bridge.
pub struct Bridge<T, S> {
    transport: T,
    source: S,
    mapping: Mapping,
    /// Who the bridge is to the EU (the evidence provider).
    provider: Agent,
    limits: Limits,
    /// Answers given, by request `@id`.
    answered: Mutex<HashMap<String, Message>>,
}

impl<T: Transport, S: EvidenceSource> Bridge<T, S> {
    /// A bridge answering from `source` over `transport`.
    pub fn new(transport: T, source: S, mapping: Mapping, provider: Agent) -> Self {
        Bridge {
            transport,
            source,
            mapping,
            provider,
            limits: Limits::default(),
            answered: Mutex::new(HashMap::new()),
        }
    }

    /// The evidence source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Answers every message waiting at the access point; how many.
    pub async fn poll_once(&self) -> Result<usize, TransportError> {
        let pending = self.transport.pending().await?;
        for message_id in &pending {
            let incoming = self.transport.retrieve(message_id).await?;
            let answer = self.answer(&incoming).await;
            self.transport.submit(&answer).await?;
        }
        Ok(pending.len())
    }

    /// The reply to `incoming`.
    pub async fn answer(&self, incoming: &Message) -> Message {
        let document = incoming
            .payloads
            .first()
            .map(|p| String::from_utf8_lossy(&p.bytes).into_owned())
            .unwrap_or_default();
        let request = match QueryRequest::parse(&document, &self.limits) {
            Ok(request) => request,
            Err(error) => {
                // Too broken to name itself: answered without requestId
                // unless one can be read.
                let id = request_id_of(&document, &self.limits).unwrap_or_default();
                return self.reply(
                    incoming,
                    response::failure(&id, None, &self.provider, &error),
                    None,
                );
            }
        };
        if let Some(done) = self
            .answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&request.id)
        {
            let mut again = done.clone();
            again.conversation_id = incoming.conversation_id.clone();
            return again;
        }
        let mut remembered = true;
        let reply = match self.mapping.find(&request) {
            Err(error) => self.failure(incoming, &request, &error),
            Ok(entry) => match self.source.fetch(&request, entry, incoming).await {
                Err(error) => {
                    // A late register may answer a retry: not remembered.
                    remembered = error.code != crate::edm::ErrorCode::Timeout;
                    self.failure(incoming, &request, &error)
                }
                Ok(fetched) => {
                    let content_id =
                        format!("evidence-1@{}", request.id.trim_start_matches("urn:uuid:"));
                    let evidence = Evidence {
                        identifier: response::new_urn(),
                        issuing_authority: fetched.issuing_authority,
                        issuing_date: fetched.issuing_date,
                        format: entry.format.clone(),
                        content_id: content_id.clone(),
                    };
                    self.reply(
                        incoming,
                        response::success(&request, &self.provider, &evidence),
                        Some(Payload {
                            content_id,
                            mime_type: entry.format.clone(),
                            bytes: fetched.bytes,
                        }),
                    )
                }
            },
        };
        if remembered {
            self.answered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(request.id.clone(), reply.clone());
        }
        reply
    }

    fn failure(&self, incoming: &Message, request: &QueryRequest, error: &EdmError) -> Message {
        self.reply(
            incoming,
            response::failure(&request.id, Some(&request.requester), &self.provider, error),
            None,
        )
    }

    fn reply(&self, incoming: &Message, document: String, evidence: Option<Payload>) -> Message {
        let action = if evidence.is_some() {
            "ExecuteQueryResponse"
        } else {
            "ExceptionResponse"
        };
        // Original sender and final recipient change places.
        let mut properties = Vec::new();
        if let Some(sender) = incoming.property("originalSender") {
            properties.push(("finalRecipient".to_owned(), sender.to_owned()));
        }
        if let Some(recipient) = incoming.property("finalRecipient") {
            properties.push(("originalSender".to_owned(), recipient.to_owned()));
        }
        if let Some(exchange) = incoming.property("ExchangeId") {
            properties.push(("ExchangeId".to_owned(), exchange.to_owned()));
        }
        let mut payloads = vec![Payload {
            content_id: "message".into(),
            mime_type: EDM_MIME.into(),
            bytes: document.into_bytes(),
        }];
        payloads.extend(evidence);
        Message {
            message_id: String::new(),
            conversation_id: incoming.conversation_id.clone(),
            action: action.into(),
            properties,
            payloads,
        }
    }
}

/// The `@id` of a document that did not check, where it can be read.
fn request_id_of(document: &str, limits: &Limits) -> Option<String> {
    let parsed = crate::edm::parse(document, limits).ok()?;
    parsed.root_element().attribute("id").map(str::to_owned)
}
