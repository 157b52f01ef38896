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
//! - Where the mapping asks for the citizen's preview ([`crate::preview`]),
//!   the first request is answered EDM:ERR:0002 and the evidence held; the
//!   second is held too, and answered when the person decides (or their
//!   time runs out), from the web page's task or the poll's. Each step is
//!   recorded in the broker's log before it takes effect.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use onceonly_proto::v1::PreviewStep;

use crate::edm::request::Agent;
use crate::edm::response::{self, Evidence};
use crate::edm::{EdmError, ErrorCode, Limits, QueryRequest};
use crate::mapping::{Entry, Mapping};
use crate::preview::sign_in::Person;
use crate::preview::{
    Held, OpenRefusal, Preview, PreviewSpace, Session, State, Waiting, random_token,
};
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

pub use crate::evidence::Fetched;

/// Where the evidence comes from: the broker, in service.
pub trait EvidenceSource: Send + Sync {
    /// The evidence `entry` names for `request`, or the EDM error.
    fn fetch(
        &self,
        request: &QueryRequest,
        entry: &Entry,
        message: &Message,
    ) -> impl Future<Output = Result<Fetched, EdmError>> + Send;

    /// Records `step` of `preview` durably (in the broker's log), before
    /// the bridge acts on it.
    fn record_step(
        &self,
        preview: &Preview,
        step: PreviewStep,
    ) -> impl Future<Output = Result<(), EdmError>> + Send;
}

/// Why a person's sign-in or decision at a preview was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreviewRefusal {
    /// The person's time ran out (T2 or T3): nothing was sent.
    #[error("the time to decide ran out; nothing was sent")]
    TooLate,
    /// The preview is closed already.
    #[error("this preview is closed ({0:?})")]
    Closed(State),
    /// The signed-in person is not the one the evidence is about.
    #[error("the evidence is about someone else")]
    NotTheirs,
    /// The sign-in is weaker than the evidence needs.
    #[error("the sign-in's level of assurance is too low for this evidence")]
    TooWeak,
    /// The person has not signed in (or in another browser).
    #[error("not signed in")]
    NotSignedIn,
    /// The step could not be recorded, so it was not taken.
    #[error("the step could not be recorded; nothing changed, try again")]
    NotRecorded,
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
    /// The citizen's preview, where offered.
    preview: Option<Arc<PreviewSpace>>,
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
            preview: None,
        }
    }

    /// The bridge, offering the citizen's preview in `space`.
    pub fn with_preview(mut self, space: Arc<PreviewSpace>) -> Self {
        self.preview = Some(space);
        self
    }

    /// The preview space, where offered.
    pub fn preview_space(&self) -> Option<&Arc<PreviewSpace>> {
        self.preview.as_ref()
    }

    /// The evidence source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Sends answers left over, then answers every request waiting at the
    /// access point; how many were answered. Err only where the access
    /// point cannot list its messages.
    pub async fn poll_once(&self) -> Result<usize, TransportError> {
        self.expire_overdue().await;
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
            // None: a second request of a preview, held for the decision.
            if let Some(answer) = self.answer(&incoming).await {
                self.send(answer).await;
            }
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

    /// The reply to `incoming`; None where it is the second request of a
    /// preview the person has not decided yet (it is answered then).
    pub async fn answer(&self, incoming: &Message) -> Option<Message> {
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
                return Some(self.reply(
                    incoming,
                    response::failure(&id, None, &self.provider, &error),
                    None,
                ));
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
                return Some(done.clone());
            }
            let reused = EdmError::invalid(
                "R-BRIDGE-ID",
                "this id was used for another request already; every request needs an id of its own",
            );
            return Some(self.failure(incoming, &request, &reused));
        }
        if let Some(location) = &request.preview_location {
            return self
                .second_round(incoming, &request, location, key, digest)
                .await;
        }
        let (reply, remembered) = match self.mapping.find(&request) {
            Err(error) => (self.failure(incoming, &request, &error), true),
            Ok(entry) if entry.preview => self.first_round(incoming, &request, entry).await,
            Ok(entry) => match self.source.fetch(&request, entry, incoming).await {
                // A late register may answer a retry: not remembered.
                Err(error) => (
                    self.failure(incoming, &request, &error),
                    error.code != ErrorCode::Timeout,
                ),
                Ok(fetched) => (self.evidence(incoming, &request, entry, fetched), true),
            },
        };
        if remembered {
            self.remember(key, digest, &reply);
        }
        Some(reply)
    }

    fn remember(&self, key: (String, String), digest: [u8; 32], reply: &Message) {
        self.answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remember(key, digest, reply.clone());
    }

    /// The QueryResponse carrying `fetched`.
    fn evidence(
        &self,
        incoming: &Message,
        request: &QueryRequest,
        entry: &Entry,
        fetched: Fetched,
    ) -> Message {
        let content_id = format!("evidence-1@{}", request.id.trim_start_matches("urn:uuid:"));
        let evidence = Evidence {
            identifier: response::new_urn(),
            issuing_authority: fetched.issuing_authority,
            issuing_date: fetched.issuing_date,
            format: entry.format.clone(),
            content_id: content_id.clone(),
        };
        self.reply(
            incoming,
            response::success(request, &self.provider, &evidence),
            Some(Payload {
                content_id,
                mime_type: entry.format.clone(),
                bytes: fetched.bytes,
            }),
        )
    }

    /// The first request of evidence the person previews: fetched, held,
    /// recorded as offered, and answered EDM:ERR:0002 with where to
    /// preview. The reply, and whether it is remembered for a request
    /// delivered again.
    async fn first_round(
        &self,
        incoming: &Message,
        request: &QueryRequest,
        entry: &Entry,
    ) -> (Message, bool) {
        let Some(space) = &self.preview else {
            let error = EdmError::new(
                ErrorCode::UnsupportedCapability,
                "this evidence is sent only after the user's preview, which is not offered here",
            );
            return (self.failure(incoming, request, &error), true);
        };
        if !request.possibility_for_preview {
            let error = EdmError::new(
                ErrorCode::UnsupportedCapability,
                "this evidence is sent only after the user has previewed it, and the request does not allow a preview (PossibilityForPreview = false)",
            )
            .with_detail("R-BRIDGE-PREVIEW-REQUIRED");
            return (self.failure(incoming, request, &error), true);
        }
        let fetched = match self.source.fetch(request, entry, incoming).await {
            Ok(fetched) => fetched,
            Err(error) => {
                let remembered = error.code != ErrorCode::Timeout;
                return (self.failure(incoming, request, &error), remembered);
            }
        };
        let later = |message: &str| EdmError::new(ErrorCode::Timeout, message.to_owned());
        let held = match space.open(incoming, request, entry, fetched) {
            Ok(held) => held,
            Err(OpenRefusal::Full) => {
                let error = later("too many previews are open; ask again later");
                return (self.failure(incoming, request, &error), false);
            }
            Err(OpenRefusal::ExchangeHasOne) => {
                let error = EdmError::invalid(
                    "R-BRIDGE-PREVIEW-OPEN",
                    "a preview is open in this exchange already; its second request carries its PreviewLocation",
                );
                return (self.failure(incoming, request, &error), true);
            }
        };
        let mut preview = held.lock().await;
        if let Err(error) = self
            .source
            .record_step(&preview, PreviewStep::Offered)
            .await
        {
            tracing::error!(%error, request_id = %request.id, "the preview could not be recorded; nothing is held");
            preview.set_state(State::Expired);
            let error = later("the preview could not be opened; ask again later");
            return (self.failure(incoming, request, &error), false);
        }
        tracing::info!(request_id = %request.id, exchange = %preview.exchange_id, "evidence held for the person's preview");
        let error = EdmError::preview_required(preview.location.clone());
        (self.failure(incoming, request, &error), true)
    }

    /// The second request of a preview: answered at once where the person
    /// has decided (or their time ran out), else held until then (None).
    async fn second_round(
        &self,
        incoming: &Message,
        request: &QueryRequest,
        location: &str,
        key: (String, String),
        digest: [u8; 32],
    ) -> Option<Message> {
        let answered = |reply: Message| {
            self.remember(key.clone(), digest, &reply);
            Some(reply)
        };
        let Some(space) = &self.preview else {
            let error = EdmError::new(
                ErrorCode::UnsupportedCapability,
                "this provider offers no preview",
            );
            return answered(self.failure(incoming, request, &error));
        };
        let Some(held) = space.at(location) else {
            let error = EdmError::new(
                ErrorCode::UnresolvedReference,
                "the PreviewLocation names no preview of this provider (unknown, or closed long ago)",
            )
            .with_detail("R-BRIDGE-PREVIEW-LOCATION");
            return answered(self.failure(incoming, request, &error));
        };
        let mut preview = held.lock().await;
        let same = |name: &str| incoming.property(name) == preview.first.property(name);
        let first = &preview.request;
        if !same("originalSender")
            || !same("ExchangeId")
            || incoming.property("ExchangeId").is_none()
            || request.evidence.classification != first.evidence.classification
            || request.procedure != first.procedure
            || request.person.identifier != first.person.identifier
            || request.requester.identifier != first.requester.identifier
        {
            let error = EdmError::invalid(
                "R-BRIDGE-PREVIEW-EXCHANGE",
                "a preview's second request must come in the same exchange (ExchangeId), from the same requester, and ask for the same evidence about the same person as the first",
            );
            return answered(self.failure(incoming, request, &error));
        }
        if preview.return_location.is_none() {
            preview.return_location = request
                .return_location
                .clone()
                .filter(|location| web_address(location));
        }
        if preview.overdue(Instant::now()) {
            self.expire(&mut preview).await;
        }
        match preview.state {
            State::Offered | State::Shown => match &preview.waiting {
                Some(waiting) if waiting.key == key => None,
                Some(_) => {
                    let error = EdmError::invalid(
                        "R-BRIDGE-PREVIEW-WAITING",
                        "another second request for this preview is waiting for the person's decision already",
                    );
                    answered(self.failure(incoming, request, &error))
                }
                None => {
                    preview.waiting = Some(Waiting {
                        incoming: incoming.clone(),
                        request: request.clone(),
                        key,
                        digest,
                    });
                    tracing::info!(request_id = %request.id, "second request held for the person's decision");
                    None
                }
            },
            State::Accepted => {
                let waiting = Waiting {
                    incoming: incoming.clone(),
                    request: request.clone(),
                    key,
                    digest,
                };
                let reply = self.conclude(&mut preview, &waiting).await;
                Some(reply)
            }
            State::Declined | State::Expired => {
                let error = closed_error(preview.state);
                answered(self.failure(incoming, request, &error))
            }
            State::Forwarded => {
                let error = EdmError::invalid(
                    "R-BRIDGE-PREVIEW-USED",
                    "the evidence of this preview was sent already; a new request starts a new preview",
                );
                answered(self.failure(incoming, request, &error))
            }
        }
    }

    /// The answer to the waiting second request, by the preview's state:
    /// the evidence where accepted (its sending recorded first), else the
    /// error; remembered where final.
    async fn conclude(&self, preview: &mut Preview, waiting: &Waiting) -> Message {
        let reply = match preview.state {
            State::Accepted => {
                if let Err(error) = self
                    .source
                    .record_step(preview, PreviewStep::Forwarded)
                    .await
                {
                    // Not sent without its record: the requester may ask
                    // again while the evidence is held.
                    tracing::error!(%error, "sending the accepted evidence could not be recorded; not sent");
                    let error = EdmError::new(
                        ErrorCode::Timeout,
                        "the evidence could not be sent now; ask again with the same PreviewLocation",
                    );
                    return self.failure(&waiting.incoming, &waiting.request, &error);
                }
                let Some(fetched) = preview.evidence.take() else {
                    let error = closed_error(State::Expired);
                    return self.failure(&waiting.incoming, &waiting.request, &error);
                };
                preview.set_state(State::Forwarded);
                tracing::info!(request_id = %waiting.request.id, exchange = %preview.exchange_id, "previewed evidence sent");
                self.evidence(&waiting.incoming, &waiting.request, &preview.entry, fetched)
            }
            state => self.failure(&waiting.incoming, &waiting.request, &closed_error(state)),
        };
        self.remember(waiting.key.clone(), waiting.digest, &reply);
        reply
    }

    /// Closes `preview` as run out of time: the evidence dropped, the step
    /// recorded (best effort: nothing is sent either way), a waiting
    /// second request answered.
    async fn expire(&self, preview: &mut Preview) {
        preview.set_state(State::Expired);
        if let Err(error) = self.source.record_step(preview, PreviewStep::Expired).await {
            tracing::error!(%error, exchange = %preview.exchange_id, "the preview's expiry could not be recorded (nothing was sent)");
        }
        tracing::info!(exchange = %preview.exchange_id, "preview expired; nothing sent");
        self.answer_waiting(preview).await;
    }

    async fn answer_waiting(&self, preview: &mut Preview) {
        if let Some(waiting) = preview.waiting.take() {
            let reply = self.conclude(preview, &waiting).await;
            self.send(reply).await;
        }
    }

    /// Closes every preview whose person did not come (T2) or decide (T3)
    /// in time. One busy with a step of its own is left for the next round
    /// (that step checks the time itself).
    pub async fn expire_overdue(&self) {
        let Some(space) = &self.preview else { return };
        for held in space.holding() {
            let Ok(mut preview) = held.try_lock() else {
                continue;
            };
            if preview.overdue(Instant::now()) {
                self.expire(&mut preview).await;
            }
        }
    }

    /// `person` signed in at `held`: shown the evidence (recorded first)
    /// where it is about them and their sign-in is strong enough; their
    /// browser's new session.
    ///
    /// Who the person is is checked first: someone else learns nothing of
    /// the preview, not even whether it is still open. Each sign-in that
    /// shows the evidence is recorded (SHOWN), the first one starting T3.
    pub async fn sign_in(&self, held: &Held, person: &Person) -> Result<Session, PreviewRefusal> {
        let mut preview = held.lock().await;
        if preview.request.person.identifier.as_deref() != Some(person.identifier.as_str()) {
            tracing::warn!(exchange = %preview.exchange_id, "someone else signed in at a preview: not shown");
            return Err(PreviewRefusal::NotTheirs);
        }
        if person.level_of_assurance < preview.needs() {
            return Err(PreviewRefusal::TooWeak);
        }
        if preview.overdue(Instant::now()) {
            self.expire(&mut preview).await;
            return Err(PreviewRefusal::TooLate);
        }
        if !preview.state.open() {
            return Err(PreviewRefusal::Closed(preview.state));
        }
        self.source
            .record_step(&preview, PreviewStep::Shown)
            .await
            .map_err(|error| {
                tracing::error!(%error, "showing the evidence could not be recorded: not shown");
                PreviewRefusal::NotRecorded
            })?;
        if preview.state == State::Offered {
            preview.set_state(State::Shown);
            preview.decide_by = self
                .preview
                .as_ref()
                .map(|space| Instant::now() + space.settings().decide_within);
        }
        let session = Session {
            id: random_token(),
            form_token: random_token(),
        };
        preview.session = Some(session.clone());
        Ok(session)
    }

    /// The person of `session` decided at `held`: recorded, then the
    /// waiting second request (if any) answered.
    pub async fn decide(
        &self,
        held: &Held,
        session: &str,
        accept: bool,
    ) -> Result<State, PreviewRefusal> {
        let mut preview = held.lock().await;
        if preview.overdue(Instant::now()) {
            self.expire(&mut preview).await;
            return Err(PreviewRefusal::TooLate);
        }
        if preview
            .session
            .as_ref()
            .is_none_or(|s| !crate::preview::same_secret(&s.id, session))
        {
            return Err(PreviewRefusal::NotSignedIn);
        }
        if preview.state != State::Shown {
            return Err(PreviewRefusal::Closed(preview.state));
        }
        let step = if accept {
            PreviewStep::Accepted
        } else {
            PreviewStep::Declined
        };
        self.source
            .record_step(&preview, step)
            .await
            .map_err(|error| {
                tracing::error!(%error, ?step, "the decision could not be recorded: not taken");
                PreviewRefusal::NotRecorded
            })?;
        preview.set_state(if accept {
            State::Accepted
        } else {
            State::Declined
        });
        tracing::info!(exchange = %preview.exchange_id, ?step, "the person decided");
        self.answer_waiting(&mut preview).await;
        Ok(preview.state)
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

/// The error a second request gets from a preview closed without sending.
fn closed_error(state: State) -> EdmError {
    match state {
        State::Declined => EdmError::new(
            ErrorCode::ObjectNotFound,
            "the user declined to have the evidence sent; nothing was sent",
        )
        .with_detail("R-BRIDGE-PREVIEW-DECLINED"),
        _ => EdmError::new(
            ErrorCode::Timeout,
            "the user did not reach the preview or decide in time; nothing was sent",
        )
        .with_detail("R-BRIDGE-PREVIEW-EXPIRED"),
    }
}

/// Whether `location` is an https address a page may link to.
fn web_address(location: &str) -> bool {
    location.len() <= 2048
        && location
            .parse::<http::Uri>()
            .ok()
            .is_some_and(|uri| uri.scheme_str() == Some("https") && uri.host().is_some())
}

/// The `@id` of a document that did not check, where it can be read.
fn request_id_of(document: &str, limits: &Limits) -> Option<String> {
    let parsed = crate::edm::parse(document, limits).ok()?;
    parsed.root_element().attribute("id").map(str::to_owned)
}
