//! One EU request in, one answer out: the EDM document read and checked,
//! mapped, the evidence fetched from an [`EvidenceSource`] (the broker, in
//! service), and the QueryResponse or the EDM error sent back over the
//! [`Transport`].
//!
//! - A request delivered twice (the same sender, `@id` and document) is
//!   answered once, the same way both times; another document under an
//!   `@id` already answered is refused (EDM:ERR:0003), never given the
//!   first one's answer. The memory of answers is bounded.
//! - Only `ExecuteQueryRequest` messages are answered; anything else is
//!   logged and left, so two systems never answer each other's errors.
//! - Each message stands alone: one that cannot be retrieved or answered
//!   does not stop the others, and an answer the access point did not
//!   take is sent again at the next poll.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Mutex;

use crate::edm::request::Agent;
use crate::edm::response::{self, Evidence};
use crate::edm::{EdmError, Limits, QueryRequest};
use crate::mapping::{Entry, Mapping};
use crate::transport::{Message, Payload, Transport, TransportError};

/// The MIME type of EDM documents.
pub const EDM_MIME: &str = "application/x-ebrs+xml";

/// The ebMS action of an evidence request.
pub const EXECUTE_QUERY_REQUEST: &str = "ExecuteQueryRequest";

/// How many answers the bridge remembers for requests delivered again.
const REMEMBERED: usize = 10_000;

/// Answers given, by (original sender, request `@id`), with the digest of
/// the document they answered; the oldest forgotten first.
#[derive(Default)]
struct Answered {
    by_request: HashMap<(String, String), ([u8; 32], Message)>,
    order: VecDeque<(String, String)>,
}

impl Answered {
    fn remember(&mut self, key: (String, String), digest: [u8; 32], answer: Message) {
        if self
            .by_request
            .insert(key.clone(), (digest, answer))
            .is_none()
        {
            self.order.push_back(key);
        }
        while self.order.len() > REMEMBERED {
            if let Some(oldest) = self.order.pop_front() {
                self.by_request.remove(&oldest);
            }
        }
    }
}

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
    answered: Mutex<Answered>,
    /// Answers the access point did not take yet.
    outbox: Mutex<Vec<Message>>,
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
            answered: Mutex::new(Answered::default()),
            outbox: Mutex::new(Vec::new()),
        }
    }

    /// The evidence source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Sends answers left over, then answers every request waiting at the
    /// access point; how many were answered. Err only where the access
    /// point cannot list its messages.
    pub async fn poll_once(&self) -> Result<usize, TransportError> {
        let left = std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|p| p.into_inner()));
        for answer in left {
            self.send(answer).await;
        }
        let pending = self.transport.pending().await?;
        let mut answered = 0;
        for message_id in &pending {
            let incoming = match self.transport.retrieve(message_id).await {
                Ok(incoming) => incoming,
                Err(error) => {
                    tracing::error!(%message_id, %error, "a pending message could not be retrieved; the others go on");
                    continue;
                }
            };
            if incoming.action != EXECUTE_QUERY_REQUEST {
                tracing::warn!(%message_id, action = %incoming.action, "not an evidence request: not answered");
                continue;
            }
            let answer = self.answer(&incoming).await;
            self.send(answer).await;
            answered += 1;
        }
        Ok(answered)
    }

    /// Submits `answer`; keeps it for the next poll where the access point
    /// does not take it.
    async fn send(&self, answer: Message) {
        if let Err(error) = self.transport.submit(&answer).await {
            tracing::error!(%error, conversation = %answer.conversation_id, "the answer was not taken; it is sent again at the next poll");
            self.outbox
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(answer);
        }
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
        let key = (
            incoming
                .property("originalSender")
                .unwrap_or_default()
                .to_owned(),
            request.id.clone(),
        );
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, document.as_bytes())
            .as_ref()
            .try_into()
            .unwrap_or_default();
        if let Some((first, done)) = self
            .answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_request
            .get(&key)
        {
            if *first == digest {
                return done.clone();
            }
            let reused = EdmError::invalid(
                "R-BRIDGE-ID",
                "this id was used for another request already; every request needs an id of its own",
            );
            return self.failure(incoming, &request, &reused);
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
                .remember(key, digest, reply.clone());
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
