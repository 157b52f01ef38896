//! What a register operator implements: the [`Connector`] trait, the
//! request it receives and the answers it may give.

use std::collections::HashMap;
use std::future::Future;
use std::time::Instant;

use onceonly_proto::v1::{EvidenceTypeInfo, RegisterSignature, SubjectIdScheme};

/// A register's connector. Implement this; [`crate::ConnectorServer`] does
/// the rest (TLS, caller checks, validation, deadlines, digest, envelope).
pub trait Connector: Send + Sync + 'static {
    /// The evidence types this connector serves. Read once when the server
    /// starts: a request for any other type is refused with UNIMPLEMENTED
    /// before [`Connector::provide`] is called, and a request whose subject
    /// scheme or parameters do not fit the type is refused with
    /// INVALID_ARGUMENT.
    fn evidence_types(&self) -> Vec<EvidenceTypeInfo>;

    /// A human-readable name of the register behind the connector.
    fn register_name(&self) -> String {
        String::new()
    }

    /// Looks up one piece of evidence. The request is already checked:
    /// the caller is the broker, the subject id is well-formed, the evidence
    /// type is one this connector serves. When the caller's deadline passes
    /// the future is dropped (cancelled), so hold no locks across awaits
    /// that the register must see released.
    fn provide(
        &self,
        request: EvidenceRequest,
    ) -> impl Future<Output = Result<EvidencePayload, ProvideError>> + Send;
}

/// A subject identifier that has passed its scheme's well-formedness check.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subject {
    /// The scheme.
    pub scheme: SubjectIdScheme,
    /// The identifier, well-formed for the scheme.
    pub value: String,
}

/// One evidence request, as the connector sees it.
#[derive(Debug, Clone)]
pub struct EvidenceRequest {
    /// The broker's exchange id: log it, it joins your log to the broker's
    /// audit log.
    pub exchange_id: String,
    /// The evidence type, one of those this connector serves.
    pub evidence_type: String,
    /// Whom the evidence is about.
    pub subject: Subject,
    /// The jurisdiction asked for, if any.
    pub jurisdiction: Option<String>,
    /// The purpose the authority gave.
    pub purpose: String,
    /// The legal basis the authority gave.
    pub legal_basis: String,
    /// The requesting authority's SPIFFE id.
    pub requester_id: String,
    /// Evidence-type parameters (only those the type declares).
    pub parameters: HashMap<String, String>,
    /// When the broker stops waiting, if it said.
    pub deadline: Option<Instant>,
    /// The broker's authorization ticket for this request, verified: keep
    /// it with your own record (its `rul` names the broker's policy rule,
    /// `cid` the consent). Always set on requests the SDK hands over.
    pub ticket: Option<onceonly_seal::TicketClaims>,
    /// The requesting authority's own signed request, verified against
    /// this request (its claims, signer and digest): what the authority
    /// itself asked for, keep it with your record too. None only where the
    /// connector accepts unsigned requests and the authority sent none.
    pub signed_request: Option<onceonly_seal::VerifiedRequest>,
}

/// What a register returns: the bytes and their media type. The SDK adds
/// the digest, the connector id and the time of issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvidencePayload {
    /// The evidence, exactly as the register produces it.
    pub bytes: Vec<u8>,
    /// Its IANA media type.
    pub media_type: String,
    /// The register's own signature, where it signs evidence.
    pub register_signature: Option<RegisterSignature>,
}

impl EvidencePayload {
    /// A payload of `media_type`.
    pub fn new(bytes: impl Into<Vec<u8>>, media_type: impl Into<String>) -> Self {
        EvidencePayload {
            bytes: bytes.into(),
            media_type: media_type.into(),
            register_signature: None,
        }
    }

    /// An `application/json` payload.
    pub fn json(bytes: impl Into<Vec<u8>>) -> Self {
        Self::new(bytes, "application/json")
    }

    /// An `application/xml` payload.
    pub fn xml(bytes: impl Into<Vec<u8>>) -> Self {
        Self::new(bytes, "application/xml")
    }
}

/// Why a register could not provide evidence. Each variant has one
/// documented gRPC status (see `connector.proto`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProvideError {
    /// The register holds nothing for this subject. NOT_FOUND.
    #[error("the register holds no record for this subject")]
    SubjectNotFound,
    /// This connector does not serve the evidence type. UNIMPLEMENTED.
    #[error("evidence type {0:?} is not served by this connector")]
    EvidenceTypeNotServed(String),
    /// The register refuses to release data about this subject (e.g. a
    /// blocking notice). PERMISSION_DENIED.
    #[error("the register refuses this subject: {0}")]
    SubjectBlocked(String),
    /// A parameter's value is not acceptable. INVALID_ARGUMENT.
    #[error("parameter {name:?}: {reason}")]
    InvalidParameter {
        /// The parameter.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Several records match the subject where one is expected: the
    /// register does not guess. FAILED_PRECONDITION (AMBIGUOUS_SUBJECT).
    #[error("several records of the register match this subject; it does not guess which is meant")]
    AmbiguousSubject,
    /// The register's source did not answer within its own time limit
    /// (or the caller's deadline). DEADLINE_EXCEEDED.
    #[error("the register did not answer in time: {0}")]
    TooSlow(String),
    /// The register is down or failing; the broker may retry. UNAVAILABLE.
    #[error("register unavailable: {0}")]
    RegisterUnavailable(String),
    /// A bug or unexpected state in the connector. INTERNAL; the details
    /// are logged, not sent.
    #[error("internal connector error: {0}")]
    Internal(String),
}
