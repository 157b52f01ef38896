//! The broker as the bridge's evidence source. To the broker, the bridge
//! is an authority like any other: it signs each request with its own
//! key, asks for the evidence encrypted to its own encryption
//! certificate, and checks what comes back against the register's
//! statement (signature, exchange, requester, subject, parameters, the
//! request it signed) before anything is handed to the access point.
//! There, end-to-end protection ends: the AS4 layer (signed and encrypted
//! between access points) carries the evidence on.
//!
//! The person is named by their eIDAS identifier, with the family name,
//! given names and date of birth the requester sent: the register matches
//! on them, and no match or several are refused (EDM:ERR:0004), never
//! guessed. The request's `@id` is the broker's request id, so a request
//! delivered twice is one exchange in the log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use onceonly_proto::v1::evidence_service_client::EvidenceServiceClient;
use onceonly_proto::v1::{
    CorrelationId, ErrorReason, PreviewStep, RecordPreviewStepRequest, RequestEvidenceRequest,
    SubjectId, SubjectIdScheme,
};
use onceonly_seal::{EvidenceOpener, Expected, Signer};
use tonic::transport::Channel;

use crate::bridge::{EvidenceSource, Fetched};
use crate::edm::request::Agent;
use crate::edm::{EdmError, ErrorCode, QueryRequest};
use crate::mapping::{Entry, Mapping};
use crate::preview::Preview;
use crate::transport::Message;

/// How long a signed request is good for.
const SIGNED_FOR: Duration = Duration::from_secs(120);

/// The broker, asked as the bridge's authority identity.
pub struct BrokerSource {
    client: EvidenceServiceClient<Channel>,
    signer: Arc<Signer>,
    opener: Arc<EvidenceOpener>,
    /// The bridge's encryption certificate (DER): evidence comes encrypted
    /// to it.
    encryption_certificate: Vec<u8>,
    /// How long the bridge waits for the register (within OOTS's T1).
    deadline: Duration,
}

impl BrokerSource {
    /// A source calling the broker over `channel`.
    pub fn new(
        channel: Channel,
        signer: Arc<Signer>,
        opener: Arc<EvidenceOpener>,
        encryption_certificate: Vec<u8>,
        deadline: Duration,
    ) -> Self {
        BrokerSource {
            client: EvidenceServiceClient::new(channel),
            signer,
            opener,
            encryption_certificate,
            deadline,
        }
    }
}

/// The parameters the register matches the person on.
fn person_parameters(request: &QueryRequest) -> HashMap<String, String> {
    let person = &request.person;
    [
        ("family_name", &person.family_name),
        ("given_names", &person.given_name),
        ("date_of_birth", &person.date_of_birth),
    ]
    .into_iter()
    .filter(|(_, value)| !value.is_empty())
    .map(|(name, value)| (name.to_owned(), value.clone()))
    .collect()
}

/// The OOTS exchange's ids and who asked, for the broker's audit record
/// (the request's `@id` is its request id): the record then names the EU
/// requester behind the bridge, as its access point and the request state
/// it (AS4 authenticates the access points, not the authority).
fn correlation_ids(message: &Message, request: &QueryRequest) -> Vec<CorrelationId> {
    [
        (
            "oots.conversation_id",
            Some(message.conversation_id.as_str()),
        ),
        ("oots.exchange_id", message.property("ExchangeId")),
        ("oots.message_id", Some(message.message_id.as_str())),
        ("oots.original_sender", message.property("originalSender")),
        (
            "oots.requester",
            Some(request.requester.identifier.as_str()),
        ),
    ]
    .into_iter()
    .filter_map(|(name, value)| {
        // What the broker accepts: printable, no bidirectional controls.
        let value: String = value?
            .chars()
            .filter(|c| !c.is_control() && !onceonly_proto::validate::is_bidi_control(*c))
            .take(256)
            .collect();
        (!value.is_empty()).then(|| CorrelationId {
            name: name.into(),
            value,
        })
    })
    .collect()
}

fn refusal(status: &tonic::Status) -> EdmError {
    if matches!(
        status.code(),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    ) {
        return EdmError::new(ErrorCode::Timeout, "the register did not answer in time");
    }
    let reason = match onceonly_proto::status::reason_of(status) {
        Some(reason) => reason,
        // No answer from the broker at all (down, unreachable): a later
        // request may be answered.
        None if status.code() == tonic::Code::Unavailable => ErrorReason::BrokerUnavailable,
        None => ErrorReason::Unspecified,
    };
    tracing::warn!(
        ?reason,
        message = status.message(),
        "the broker refused the bridge's request"
    );
    EdmError::from_broker(reason)
}

impl EvidenceSource for BrokerSource {
    async fn fetch(
        &self,
        request: &QueryRequest,
        entry: &Entry,
        message: &Message,
    ) -> Result<Fetched, EdmError> {
        let eidas = request.person.identifier.clone().ok_or_else(|| {
            EdmError::new(
                ErrorCode::ObjectNotFound,
                "the person cannot be matched without an eIDAS identifier",
            )
        })?;
        let parameters = person_parameters(request);
        let mut ask = RequestEvidenceRequest {
            request_id: request.id.clone(),
            evidence_type: entry.evidence_type.clone(),
            subject: Some(SubjectId {
                scheme: SubjectIdScheme::Eidas.into(),
                value: eidas.clone(),
            }),
            purpose: Mapping::purpose(&request.procedure),
            legal_basis: entry.legal_basis.clone(),
            parameters: parameters.clone(),
            encryption_certificate: self.encryption_certificate.clone(),
            correlation_ids: correlation_ids(message, request),
            ..Default::default()
        };
        let signed =
            onceonly_seal::sign_request(&mut ask, &self.signer, SIGNED_FOR).map_err(|e| {
                EdmError::new(
                    ErrorCode::Query,
                    format!("the bridge could not sign its request: {e}"),
                )
            })?;
        let mut call = tonic::Request::new(ask);
        call.set_timeout(self.deadline);
        // The OOTS exchange's ids, for the broker's trace and the bridge's
        // log line (the request id is the broker's request id).
        tracing::info!(
            request_id = %request.id,
            conversation = %message.conversation_id,
            exchange = message.property("ExchangeId").unwrap_or_default(),
            explicit_request_given = ?request.explicit_request_given,
            "asking the broker"
        );
        let response = self
            .client
            .clone()
            .request_evidence(call)
            .await
            .map_err(|status| refusal(&status))?
            .into_inner();
        let evidence = response.evidence.ok_or_else(|| {
            EdmError::new(ErrorCode::Query, "the broker answered without evidence")
        })?;
        let requester = self.signer.participant().spiffe_id();
        let expected = Expected {
            exchange_id: &response.exchange_id,
            evidence_type: &entry.evidence_type,
            subject_scheme: SubjectIdScheme::Eidas,
            subject_value: &eidas,
            requester: &requester,
            parameters: Some(&parameters),
            connector: None,
            encrypted: true,
            request: Some(signed.binding()),
        };
        let opened = self.opener.open(&evidence, &expected).map_err(|refused| {
            tracing::error!(%refused, request_id = %request.id, "evidence refused: it does not verify against the register's statement");
            EdmError::new(
                ErrorCode::Query,
                "the evidence did not verify against the register's statement; nothing is sent",
            )
        })?;
        let issued = time::OffsetDateTime::from_unix_timestamp(opened.issued_at)
            .map(|t| t.date().to_string())
            .unwrap_or_default();
        Ok(Fetched {
            bytes: opened.payload,
            issuing_authority: Agent {
                identifier: opened.connector.id().to_owned(),
                scheme: format!("spiffe://{}/connector", opened.connector.trust_domain()),
                name: opened.connector.id().to_owned(),
                classification: String::new(),
            },
            issuing_date: issued,
            exchange_id: response.exchange_id,
        })
    }

    async fn record_step(&self, preview: &Preview, step: PreviewStep) -> Result<(), EdmError> {
        let unrecorded = |why: String| {
            EdmError::new(
                ErrorCode::Timeout,
                format!("the preview's step could not be recorded: {why}"),
            )
        };
        let subject = preview
            .request
            .person
            .identifier
            .clone()
            .ok_or_else(|| unrecorded("no eIDAS identifier".into()))?;
        let mut call = tonic::Request::new(RecordPreviewStepRequest {
            exchange_id: preview.exchange_id.clone(),
            subject: Some(SubjectId {
                scheme: SubjectIdScheme::Eidas.into(),
                value: subject,
            }),
            step: step.into(),
            correlation_ids: correlation_ids(&preview.first, &preview.request),
        });
        call.set_timeout(Duration::from_secs(10));
        self.client
            .clone()
            .record_preview_step(call)
            .await
            .map(|_| ())
            .map_err(|status| unrecorded(status.message().to_owned()))
    }
}
