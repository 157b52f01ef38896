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

    /// The EDM error for a broker refusal of `reason` (its gRPC message in
    /// `message`): mapped once, here.
    pub fn from_broker(reason: ErrorReason, message: &str) -> Self {
        use ErrorReason as R;
        let code = match reason {
            // The register has no such person, or several (never a guess),
            // or the bridge asked for a type nobody serves.
            R::SubjectNotFound | R::AmbiguousSubject | R::NotFound | R::UnknownEvidenceType => {
                ErrorCode::ObjectNotFound
            }
            R::DeadlineExceeded | R::DeadlineTooShort => ErrorCode::Timeout,
            R::Unauthenticated | R::SignedRequestMissing | R::SignedRequestInvalid => {
                ErrorCode::Authentication
            }
            R::InvalidRequest | R::SignedRequestMismatch | R::RequestIdReused => {
                ErrorCode::InvalidRequest
            }
            R::NoRoute => ErrorCode::UnresolvedReference,
            R::EncryptionCertificateRefused => ErrorCode::UnsupportedCapability,
            // Refusals for who asked (policy, consent, quota) and the
            // provider's own failures: the request cannot be answered as
            // it stands; the EDM has no closer code for them.
            _ => ErrorCode::Query,
        };
        EdmError::new(code, format!("The evidence provider refused: {message}"))
            .with_detail(reason.reason())
    }

    /// With `detail`.
    pub fn with_detail(mut self, detail: &str) -> Self {
        self.detail = Some(detail.to_owned());
        self
    }
}
