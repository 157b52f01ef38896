//! The EDM's error codes (EDM:ERR:0001-0008) and what each is answered
//! with: the exception type, code, severity and detail of an
//! `rs:Exception`. Every way the bridge refuses a request becomes one
//! [`EdmError`], mapped once ([`EdmError::from_broker`] for the broker's
//! refusals).

use onceonly_proto::v1::ErrorReason;

/// An EDM error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// EDM:ERR:0001, the requester is not authenticated.
    Authentication,
    /// EDM:ERR:0002, a preview is required first.
    PreviewRequired,
    /// EDM:ERR:0003, the request breaks a rule (`detail` names it).
    InvalidRequest,
    /// EDM:ERR:0004, no such evidence or person.
    ObjectNotFound,
    /// EDM:ERR:0005, the provider could not answer in time.
    Timeout,
    /// EDM:ERR:0006, a reference cannot be resolved.
    UnresolvedReference,
    /// EDM:ERR:0007, a format or option is not supported.
    UnsupportedCapability,
    /// EDM:ERR:0008, the query itself is invalid.
    Query,
}

impl ErrorCode {
    /// The code, e.g. `EDM:ERR:0003`.
    pub fn code(self) -> &'static str {
        match self {
            ErrorCode::Authentication => "EDM:ERR:0001",
            ErrorCode::PreviewRequired => "EDM:ERR:0002",
            ErrorCode::InvalidRequest => "EDM:ERR:0003",
            ErrorCode::ObjectNotFound => "EDM:ERR:0004",
            ErrorCode::Timeout => "EDM:ERR:0005",
            ErrorCode::UnresolvedReference => "EDM:ERR:0006",
            ErrorCode::UnsupportedCapability => "EDM:ERR:0007",
            ErrorCode::Query => "EDM:ERR:0008",
        }
    }

    /// The `rs:Exception`'s `xsi:type` (local name, in the `rs:` namespace).
    pub fn exception_type(self) -> &'static str {
        match self {
            ErrorCode::Authentication => "AuthenticationExceptionType",
            ErrorCode::PreviewRequired => "AuthorizationExceptionType",
            ErrorCode::InvalidRequest => "InvalidRequestExceptionType",
            ErrorCode::ObjectNotFound => "ObjectNotFoundExceptionType",
            ErrorCode::Timeout => "TimeoutExceptionType",
            ErrorCode::UnresolvedReference => "UnresolvedReferenceExceptionType",
            ErrorCode::UnsupportedCapability => "UnsupportedCapabilityExceptionType",
            ErrorCode::Query => "QueryExceptionType",
        }
    }

    /// The severity: an error, but for the preview's.
    pub fn severity(self) -> &'static str {
        match self {
            ErrorCode::PreviewRequired => {
                "urn:sr.oots.tech.ec.europa.eu:codes:ErrorSeverity:EDMErrorResponse:PreviewRequired"
            }
            _ => "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error",
        }
    }
}

/// A refusal, as the requester will read it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {message}{}", code.code(), detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
pub struct EdmError {
    /// Which error.
    pub code: ErrorCode,
    /// What a person reads.
    pub message: String,
    /// The rule broken, where one is (e.g. `R-EDM-REQ-S009`).
    pub detail: Option<String>,
    /// For EDM:ERR:0002: where the citizen previews the evidence.
    pub preview_location: Option<String>,
}

impl EdmError {
    /// An error of `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        EdmError {
            code,
            message: message.into(),
            detail: None,
            preview_location: None,
        }
    }

    /// EDM:ERR:0003 for a broken rule.
    pub fn invalid(rule: &str, message: impl Into<String>) -> Self {
        EdmError {
            detail: Some(rule.to_owned()),
            ..EdmError::new(ErrorCode::InvalidRequest, message)
        }
    }

    /// EDM:ERR:0002 with where to preview.
    pub fn preview_required(location: String) -> Self {
        EdmError {
            preview_location: Some(location),
            ..EdmError::new(
                ErrorCode::PreviewRequired,
                "The evidence provider requires the user to preview the evidence before it is sent",
            )
        }
    }

    /// The EDM error for a broker refusal of `reason`: mapped once, here.
    /// The requester reads a fixed message per code and the reason's name
    /// in `detail`; the broker's own words (which may name registers,
    /// policies or a blocking notice) stay in the bridge's log.
    pub fn from_broker(reason: ErrorReason) -> Self {
        use ErrorReason as R;
        let (code, message) = match reason {
            // No such person, several (never a guess), or one whose record
            // is blocked: the requester cannot tell these apart.
            R::SubjectNotFound | R::AmbiguousSubject | R::SubjectBlocked | R::NotFound => (
                ErrorCode::ObjectNotFound,
                "no evidence about this person can be provided",
            ),
            R::UnknownEvidenceType | R::NoRoute => (
                ErrorCode::ObjectNotFound,
                "this evidence is not provided here",
            ),
            // The provider could not answer now; a later request may be
            // answered.
            R::DeadlineExceeded
            | R::DeadlineTooShort
            | R::ConnectorUnavailable
            | R::ConnectorCircuitOpen
            | R::BrokerUnavailable
            | R::AuditUnavailable
            | R::Overloaded
            | R::QuotaExceeded
            | R::Cancelled => (
                ErrorCode::Timeout,
                "the evidence provider could not answer in time; ask again later",
            ),
            R::InvalidRequest | R::RequestIdReused => (
                ErrorCode::InvalidRequest,
                "the request cannot be answered as it stands",
            ),
            // Who may fetch what (policy, consent), and the provider's own
            // failures (its credentials, bad evidence).
            _ => (
                ErrorCode::Query,
                "the evidence provider cannot answer this request",
            ),
        };
        EdmError::new(code, message).with_detail(reason.reason())
    }

    /// With `detail`.
    pub fn with_detail(mut self, detail: &str) -> Self {
        self.detail = Some(detail.to_owned());
        self
    }
}
