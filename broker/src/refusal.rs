//! Every way a call can be refused, as typed errors, and the one place that
//! turns them into what the caller sees (gRPC status with its
//! `ErrorReason` and details), for all three services: [`Refusal`] for an
//! exchange (with how the audit log classes it, [`ExchangeOutcome`]), and
//! [`ServiceRefusal`] for the consent and audit services. The request path
//! and the services only ever return one of these; nothing else in the
//! broker builds a `Status`.

use std::time::Duration;

use onceonly_certs::{Participant, Role};
use onceonly_proto::deadline::TooShort;
use onceonly_proto::status::{
    certificate_refused, error, error_with_metadata, invalid_request, reason_of, resource_exhausted,
};
use onceonly_proto::v1::{ErrorReason, ExchangeOutcome};
use onceonly_proto::validate::FieldViolation;
use tonic::{Code, Status};

use crate::consent::ConsentError;
use crate::forward::ForwardError;
use crate::idempotency::StoredStatus;
use onceonly_seal::RequestError;
use onceonly_store::AuditError;

/// Why an exchange ended without evidence.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The caller's certificate was refused.
    #[error("client certificate refused: {reason}")]
    Unauthenticated {
        /// The verifier's reason.
        reason: String,
    },
    /// The authority's signed request is missing where the policy requires
    /// one, does not verify, or says something else than the request.
    #[error(transparent)]
    SignedRequest(RequestError),
    /// The caller is not an authority.
    #[error("{caller} may not request evidence")]
    RoleNotPermitted {
        /// Who called.
        caller: Participant,
    },
    /// The caller is over its quota.
    #[error("{caller} is over quota {quota}")]
    QuotaExceeded {
        /// Who called.
        caller: String,
        /// The quota's name and limits, as the policy gives them.
        quota: String,
        /// When the next request will be admitted.
        retry_after: Duration,
    },
    /// The request id was used for another request within the window.
    #[error("request id {request_id:?} reused")]
    RequestIdReused {
        /// The id.
        request_id: String,
    },
    /// The caller's deadline cannot hold the exchange and its record.
    #[error(transparent)]
    DeadlineTooShort(TooShort),
    /// Fields are malformed, missing, or unknown; each is named.
    #[error("invalid request: {}", violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    Invalid {
        /// `INVALID_REQUEST`, or `UNKNOWN_EVIDENCE_TYPE`.
        reason: ErrorReason,
        /// Every bad field.
        violations: Vec<FieldViolation>,
    },
    /// The exchange's task failed (a bug): nothing was released.
    #[error("the exchange task failed")]
    TaskFailed,
    /// No policy rule allows the request.
    #[error("no policy rule allows it")]
    PolicyDenied(Box<DeniedRequest>),
    /// The policy requires consent and none covers the request.
    #[error("no active consent")]
    ConsentMissing {
        /// What for.
        evidence_type: String,
        /// Why.
        purpose: String,
        /// The consent the caller named, if any.
        consent_id: Option<String>,
    },
    /// The consent store could not be read.
    #[error("consent store unavailable")]
    ConsentStoreUnavailable,
    /// The request-id window replicas share could not be read or claimed.
    #[error("shared idempotency window unavailable")]
    IdempotencyUnavailable,
    /// The encryption certificate the request names is not the caller's
    /// own encryption certificate of the trust domain.
    #[error("encryption certificate refused: {0}")]
    EncryptionCertificateRefused(String),
    /// The policy requires encryption for the evidence type and the request
    /// names no encryption certificate.
    #[error("encryption required for {evidence_type}")]
    EncryptionRequired {
        /// What for.
        evidence_type: String,
    },
    /// No connector serves the evidence type (there).
    #[error("no route")]
    NoRoute {
        /// What for.
        evidence_type: String,
        /// Where, if asked.
        jurisdiction: Option<String>,
    },
    /// The broker carries as many exchanges as it may; this one was shed.
    #[error("overloaded")]
    Overloaded {
        /// A hint when to retry.
        retry_after: Duration,
    },
    /// The deadline passed while the broker did `what`.
    #[error("deadline exceeded while {what}")]
    DeadlineExceeded {
        /// What the broker was doing.
        what: String,
    },
    /// Forwarding to the connector failed.
    #[error("connector {connector}: {error:?}")]
    Forward {
        /// The connector.
        connector: String,
        /// How.
        error: ForwardError,
    },
    /// The caller cancelled the call or dropped its connection.
    #[error("cancelled by the caller")]
    Cancelled,
    /// The audit record could not be written, so nothing is released.
    #[error("audit record not written")]
    AuditUnavailable,
    /// A repeat of a request id whose first exchange did not finish.
    #[error("the first request with this id did not finish")]
    FirstDidNotFinish,
    /// A repeat of a request id answered with the first exchange's refusal,
    /// classed as the first one was.
    #[error("replay of a refusal")]
    Replayed(StoredStatus),
}

/// What an authority gets for a signed request refused: INVALID_ARGUMENT
/// naming the field a claim differs from, UNAUTHENTICATED otherwise.
fn signed_request_refused(refused: &RequestError) -> Status {
    match refused {
        RequestError::Mismatch { claim, field } => invalid_request(
            ErrorReason::SignedRequestMismatch,
            &[FieldViolation::new(
                "signed_request",
                format!(
                    "its claim {claim} differs from the request's {field}: sign the request as it is sent"
                ),
            )],
        ),
        RequestError::Missing => error(
            Code::Unauthenticated,
            ErrorReason::SignedRequestMissing,
            "the policy requires this authority to sign its requests, and signed_request is empty: sign each request with your certificate key (see RequestEvidenceRequest.signed_request)",
        ),
        other => error(
            Code::Unauthenticated,
            ErrorReason::SignedRequestInvalid,
            format!("{other}; sign each request anew with your own certificate key"),
        ),
    }
}

/// What the policy was asked, and denied.
#[derive(Debug)]
pub struct DeniedRequest {
    /// Who called.
    pub caller: Participant,
    /// What for.
    pub evidence_type: String,
    /// Why.
    pub purpose: String,
    /// Under which norm.
    pub legal_basis: String,
}

impl Refusal {
    /// How the audit log classes it.
    pub fn outcome(&self) -> ExchangeOutcome {
        use ExchangeOutcome::*;
        match self {
            Refusal::Invalid { .. }
            | Refusal::RequestIdReused { .. }
            | Refusal::EncryptionCertificateRefused(_)
            | Refusal::SignedRequest(RequestError::Mismatch { .. }) => Rejected,
            Refusal::Unauthenticated { .. }
            | Refusal::SignedRequest(_)
            | Refusal::RoleNotPermitted { .. }
            | Refusal::QuotaExceeded { .. }
            | Refusal::PolicyDenied(_)
            | Refusal::ConsentMissing { .. }
            | Refusal::EncryptionRequired { .. } => Denied,
            Refusal::Cancelled => Cancelled,
            Refusal::Replayed(first) => first.outcome,
            Refusal::DeadlineTooShort(_)
            | Refusal::ConsentStoreUnavailable
            | Refusal::IdempotencyUnavailable
            | Refusal::NoRoute { .. }
            | Refusal::Overloaded { .. }
            | Refusal::DeadlineExceeded { .. }
            | Refusal::Forward { .. }
            | Refusal::AuditUnavailable
            | Refusal::FirstDidNotFinish
            | Refusal::TaskFailed => Failed,
        }
    }

    /// Whether a repeat of the request id should run again rather than get
    /// this outcome: transient failures are forgotten.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.status_code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Cancelled
        )
    }

    fn status_code(&self) -> Code {
        match self {
            Refusal::Replayed(first) => first.code,
            other => other.status().code(),
        }
    }

    /// What the caller gets.
    pub fn status(&self) -> Status {
        match self {
            Refusal::Unauthenticated { reason } => certificate_refused(reason),
            Refusal::SignedRequest(refused) => signed_request_refused(refused),
            Refusal::RoleNotPermitted { caller } => {
                role_not_permitted(caller, "RequestEvidence", &[Role::Authority])
            }
            Refusal::QuotaExceeded {
                caller,
                quota,
                retry_after,
            } => resource_exhausted(
                ErrorReason::QuotaExceeded,
                format!(
                    "{caller} is over its request quota ({quota}); retry after {} ms",
                    retry_after.as_millis().max(1)
                ),
                *retry_after,
                Some((caller.clone(), format!("quota {quota}"))),
            ),
            Refusal::RequestIdReused { request_id } => error(
                Code::AlreadyExists,
                ErrorReason::RequestIdReused,
                format!(
                    "request_id {request_id:?} was used for a different request within the idempotency window; use a new request_id"
                ),
            ),
            Refusal::DeadlineTooShort(too_short) => too_short.status(),
            Refusal::Invalid { reason, violations } => invalid_request(*reason, violations),
            Refusal::TaskFailed => error(
                Code::Internal,
                ErrorReason::BrokerUnavailable,
                "the broker failed on this request; its operator has the details in its log",
            ),
            Refusal::PolicyDenied(denied) => {
                let DeniedRequest {
                    caller,
                    evidence_type,
                    purpose,
                    legal_basis,
                } = denied.as_ref();
                error_with_metadata(
                    Code::PermissionDenied,
                    ErrorReason::PolicyDenied,
                    format!(
                        "no policy rule allows {caller} to request {evidence_type:?} for purpose {purpose:?} under legal basis {legal_basis:?}; ask the broker operator for a rule"
                    ),
                    [
                        ("caller".to_owned(), caller.spiffe_id()),
                        ("evidence_type".to_owned(), evidence_type.clone()),
                        ("purpose".to_owned(), purpose.clone()),
                        ("legal_basis".to_owned(), legal_basis.clone()),
                    ]
                    .into(),
                )
            }
            Refusal::ConsentMissing {
                evidence_type,
                purpose,
                consent_id,
            } => error(
                Code::FailedPrecondition,
                ErrorReason::ConsentMissing,
                format!(
                    "the policy requires the subject's consent for {evidence_type:?} for purpose {purpose:?}, and no active consent exists (none granted, expired or revoked){}",
                    consent_id
                        .as_ref()
                        .map(|id| format!("; consent {id:?} does not cover this request"))
                        .unwrap_or_default()
                ),
            ),
            Refusal::EncryptionCertificateRefused(why) => invalid_request(
                ErrorReason::EncryptionCertificateRefused,
                &[FieldViolation::new(
                    "encryption_certificate",
                    format!(
                        "{why}; name your own encryption certificate (onceonly-certs issue --encryption)"
                    ),
                )],
            ),
            Refusal::EncryptionRequired { evidence_type } => error(
                Code::FailedPrecondition,
                ErrorReason::EncryptionRequired,
                format!(
                    "the policy releases {evidence_type:?} only encrypted to the requester: name your encryption certificate in encryption_certificate"
                ),
            ),
            Refusal::IdempotencyUnavailable => error(
                Code::Unavailable,
                ErrorReason::BrokerUnavailable,
                "the request ids the replicas share cannot be checked now, so this request did not run; retry with the same request_id",
            ),
            Refusal::ConsentStoreUnavailable => error(
                Code::Unavailable,
                ErrorReason::BrokerUnavailable,
                "the consent store is unavailable; retry with the same request_id",
            ),
            Refusal::NoRoute {
                evidence_type,
                jurisdiction,
            } => error(
                Code::NotFound,
                ErrorReason::NoRoute,
                format!(
                    "no register serves {evidence_type:?}{}",
                    jurisdiction
                        .as_ref()
                        .map(|j| format!(" for jurisdiction {j:?}"))
                        .unwrap_or_default()
                ),
            ),
            Refusal::Overloaded { retry_after } => resource_exhausted(
                ErrorReason::Overloaded,
                format!(
                    "the broker is carrying as many exchanges as it is configured for; retry after {} ms with the same request_id",
                    retry_after.as_millis().max(1)
                ),
                *retry_after,
                None,
            ),
            Refusal::DeadlineExceeded { what } => error(
                Code::DeadlineExceeded,
                ErrorReason::DeadlineExceeded,
                format!(
                    "the deadline passed while {what}; give the request a longer deadline, or retry later"
                ),
            ),
            Refusal::Forward { connector, error } => forward_status(connector, error),
            Refusal::Cancelled => error(
                Code::Cancelled,
                ErrorReason::Cancelled,
                "the caller cancelled the call or closed its connection",
            ),
            Refusal::AuditUnavailable => error(
                Code::Unavailable,
                ErrorReason::AuditUnavailable,
                "the audit record of this exchange could not be written, so no evidence was released; retry with the same request_id",
            ),
            Refusal::FirstDidNotFinish => error(
                Code::Unavailable,
                ErrorReason::BrokerUnavailable,
                "the first request with this request_id did not finish; retry",
            ),
            Refusal::Replayed(first) => first.rebuild(),
        }
    }

    /// The `ErrorReason` the caller gets, for the audit record.
    pub fn reason(&self) -> ErrorReason {
        reason_of(&self.status()).unwrap_or(ErrorReason::Unspecified)
    }
}

/// The status of a failed forward.
fn forward_status(connector: &str, failure: &ForwardError) -> Status {
    match failure {
        ForwardError::DeadlineExceeded => error(
            Code::DeadlineExceeded,
            ErrorReason::DeadlineExceeded,
            format!(
                "the deadline passed while waiting for connector {connector}; give the request a longer deadline, or retry later"
            ),
        ),
        ForwardError::Unreachable(reason) => error(
            Code::Unavailable,
            ErrorReason::ConnectorUnavailable,
            format!(
                "connector {connector} is unreachable ({reason}); retry later with the same request_id"
            ),
        ),
        ForwardError::IdentityMismatch(reason) => error(
            Code::Unavailable,
            ErrorReason::ConnectorIdentityMismatch,
            format!(
                "connector {connector} could not be verified ({reason}); the broker did not send it the request"
            ),
        ),
        ForwardError::CertificateRefused(reason) => error(
            Code::Unavailable,
            ErrorReason::ConnectorRefused,
            format!(
                "connector {connector} was not trusted ({reason}); the broker did not send it the request"
            ),
        ),
        ForwardError::CircuitOpen => error(
            Code::Unavailable,
            ErrorReason::ConnectorCircuitOpen,
            format!(
                "every endpoint of connector {connector} failed recently (circuit open); the broker did not try them; retry later with the same request_id"
            ),
        ),
        ForwardError::CannotAuthorize(reason) => error(
            Code::Unavailable,
            ErrorReason::BrokerUnavailable,
            format!(
                "the broker could not sign the authorization ticket for connector {connector} ({reason}); its operator has the details in its log"
            ),
        ),
        ForwardError::BadEvidence(reason) => error(
            Code::DataLoss,
            ErrorReason::BadEvidence,
            format!(
                "connector {connector} returned evidence that fails the broker's checks: {reason}"
            ),
        ),
        ForwardError::Connector(status) => match status.code() {
            // The register's own answers, passed through with their details.
            Code::NotFound
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::Unavailable
            | Code::ResourceExhausted => Status::with_details(
                status.code(),
                format!("register {connector}: {}", status.message()),
                status.details().to_vec().into(),
            ),
            code => error(
                Code::Unavailable,
                ErrorReason::ConnectorUnavailable,
                format!(
                    "connector {connector} failed ({code:?}: {})",
                    status.message()
                ),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_refusal_carries_a_reason_and_the_role_wording_is_shared() {
        let portal = Participant::new("onceonly.test", Role::Portal, "p").expect("participant");
        let refusals = [
            ServiceRefusal::Unauthenticated("expired".into()),
            ServiceRefusal::RoleNotPermitted {
                caller: portal.clone(),
                what: "GetEntries",
                roles: &[Role::Auditor],
            },
            ServiceRefusal::OthersRecords,
            ServiceRefusal::invalid("subject", "required"),
            ServiceRefusal::PortalOutOfScope {
                portal: portal.clone(),
                evidence_type: "birth-certificate".into(),
            },
            ServiceRefusal::Consent(ConsentError::NotFound("cns-x".into())),
            ServiceRefusal::Consent(ConsentError::Corrupt {
                id: "cns-x".into(),
                reason: "tag".into(),
            }),
            ServiceRefusal::Consent(ConsentError::Storage("down".into())),
            ServiceRefusal::NotRecorded,
            ServiceRefusal::ChangeFailed("panicked".into()),
            ServiceRefusal::Audit(AuditError::OutOfRange("size".into())),
            ServiceRefusal::Audit(AuditError::Unsupported("no index".into())),
            ServiceRefusal::Audit(AuditError::Corrupt("edited".into())),
            ServiceRefusal::Audit(AuditError::WriterStopped),
            ServiceRefusal::LeafNotFound { tree_size: 3 },
        ];
        for refusal in &refusals {
            let status = refusal.status();
            assert!(
                reason_of(&status).is_some_and(|r| r != ErrorReason::Unspecified),
                "{refusal:?} gives {status:?} without a reason"
            );
        }
        // The exchange and the services word a role refusal alike.
        let exchange = Refusal::RoleNotPermitted {
            caller: portal.clone(),
        }
        .status();
        let service = ServiceRefusal::RoleNotPermitted {
            caller: portal,
            what: "RequestEvidence",
            roles: &[Role::Authority],
        }
        .status();
        assert_eq!(exchange.message(), service.message());
        assert_eq!(exchange.details(), service.details());
    }

    #[test]
    fn a_registers_refusal_is_failed_and_its_replay_is_classed_the_same() {
        let refusal = Refusal::Forward {
            connector: "civil-register".into(),
            error: ForwardError::Connector(error(
                Code::PermissionDenied,
                ErrorReason::SubjectBlocked,
                "blocked",
            )),
        };
        assert_eq!(refusal.outcome(), ExchangeOutcome::Failed);
        let status = refusal.status();
        assert_eq!(status.code(), Code::PermissionDenied);
        let replay = Refusal::Replayed(StoredStatus::capture(&status, refusal.outcome()));
        assert_eq!(replay.outcome(), ExchangeOutcome::Failed);
        assert_eq!(replay.status().code(), Code::PermissionDenied);
        assert_eq!(replay.reason(), ErrorReason::SubjectBlocked);
    }

    #[test]
    fn limits_are_resource_exhausted_with_retry_info() {
        let quota = Refusal::QuotaExceeded {
            caller: "spiffe://t/authority/a".into(),
            quota: "a: 5/s, burst 5".into(),
            retry_after: Duration::from_millis(200),
        };
        let status = quota.status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(quota.reason(), ErrorReason::QuotaExceeded);
        assert_eq!(
            onceonly_proto::status::retry_after(&status),
            Some(Duration::from_millis(200))
        );
        assert_eq!(quota.outcome(), ExchangeOutcome::Denied);
        assert!(quota.is_transient());
        let shed = Refusal::Overloaded {
            retry_after: Duration::from_millis(50),
        };
        assert_eq!(shed.outcome(), ExchangeOutcome::Failed);
        assert_eq!(shed.reason(), ErrorReason::Overloaded);
    }

    #[test]
    fn cancellation_is_its_own_outcome() {
        assert_eq!(Refusal::Cancelled.outcome(), ExchangeOutcome::Cancelled);
        assert_eq!(Refusal::Cancelled.reason(), ErrorReason::Cancelled);
        assert!(Refusal::Cancelled.is_transient());
    }
}

/// PERMISSION_DENIED for `caller`, whose role is not among `roles`, the
/// ones `what` is for.
fn role_not_permitted(caller: &Participant, what: &str, roles: &[Role]) -> Status {
    let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    error(
        Code::PermissionDenied,
        ErrorReason::RoleNotPermitted,
        format!(
            "{caller} has role {}; {what} is for role {}",
            caller.role(),
            roles.join(" or ")
        ),
    )
}

/// Why a call to the consent or the audit service was refused.
#[derive(Debug, thiserror::Error)]
pub enum ServiceRefusal {
    /// The caller's certificate was refused.
    #[error("client certificate refused: {0}")]
    Unauthenticated(String),
    /// The caller's role may not make this call.
    #[error("{caller} may not call {what}")]
    RoleNotPermitted {
        /// Who called.
        caller: Participant,
        /// The call.
        what: &'static str,
        /// The roles it is for.
        roles: &'static [Role],
    },
    /// An authority asked for another caller's records.
    #[error("an authority sees only its own requests")]
    OthersRecords,
    /// Fields of the request are missing or malformed.
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    /// The policy limits the portal to other evidence types.
    #[error("{portal} may not record consents for {evidence_type:?}")]
    PortalOutOfScope {
        /// The portal.
        portal: Participant,
        /// The evidence type it asked about.
        evidence_type: String,
    },
    /// The consent store failed, or has no such consent.
    #[error(transparent)]
    Consent(#[from] ConsentError),
    /// The change's record could not be written, so it was not made.
    #[error("the access could not be recorded")]
    NotRecorded,
    /// The task making a recorded change failed.
    #[error("the consent change task failed: {0}")]
    ChangeFailed(String),
    /// The audit log failed, or cannot answer this.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// No exchange of the caller's with this id delivered evidence about
    /// the subject lately.
    #[error("no delivered exchange {0:?} of the caller's about this subject")]
    UnknownExchange(String),
    /// A preview step that cannot follow the one recorded before it.
    #[error("preview step {step:?} cannot follow {last:?}")]
    StepOutOfOrder {
        /// The step recorded last, if any.
        last: Option<onceonly_proto::v1::PreviewStep>,
        /// The step asked for.
        step: onceonly_proto::v1::PreviewStep,
    },
    /// The preview has had the most steps one may record.
    #[error("the preview has its most steps ({0}) recorded")]
    TooManySteps(usize),
    /// No record with the leaf hash asked for is in the tree of this size.
    #[error("no record with this leaf hash in the tree of {tree_size} records")]
    LeafNotFound {
        /// The tree size asked about.
        tree_size: u64,
    },
}

impl From<ServiceRefusal> for Status {
    fn from(refusal: ServiceRefusal) -> Status {
        refusal.status()
    }
}

impl ServiceRefusal {
    /// One bad field.
    pub fn invalid(field: &str, problem: impl Into<String>) -> Self {
        ServiceRefusal::Invalid(vec![FieldViolation::new(field, problem)])
    }

    /// What the caller gets.
    pub fn status(&self) -> Status {
        match self {
            ServiceRefusal::Unauthenticated(reason) => certificate_refused(reason),
            ServiceRefusal::RoleNotPermitted {
                caller,
                what,
                roles,
            } => role_not_permitted(caller, what, roles),
            ServiceRefusal::OthersRecords => error(
                Code::PermissionDenied,
                ErrorReason::RoleNotPermitted,
                "an authority sees only its own requests",
            ),
            ServiceRefusal::Invalid(violations) => {
                invalid_request(ErrorReason::InvalidRequest, violations)
            }
            ServiceRefusal::PortalOutOfScope {
                portal,
                evidence_type,
            } => error(
                Code::PermissionDenied,
                ErrorReason::PolicyDenied,
                format!(
                    "{portal} may not record consents for {evidence_type:?}; the broker's policy ([[portal]]) limits it to other evidence types"
                ),
            ),
            ServiceRefusal::Consent(ConsentError::NotFound(id)) => error(
                Code::NotFound,
                ErrorReason::NotFound,
                format!("no consent {id:?}"),
            ),
            ServiceRefusal::Consent(ConsentError::Corrupt { id, reason }) => {
                tracing::error!(consent_id = %id, %reason, "a stored consent cannot be used");
                error(
                    Code::DataLoss,
                    ErrorReason::BrokerUnavailable,
                    format!(
                        "consent {id:?} is stored but cannot be used (unreadable, or not written by the broker), and was left unchanged; the broker operator must restore it from a backup"
                    ),
                )
            }
            ServiceRefusal::Consent(ConsentError::Storage(reason)) => {
                tracing::error!(%reason, "consent storage failed");
                error(
                    Code::Unavailable,
                    ErrorReason::BrokerUnavailable,
                    "the consent store is unavailable; retry (the broker operator has the details in its log)",
                )
            }
            ServiceRefusal::NotRecorded => error(
                Code::Unavailable,
                ErrorReason::AuditUnavailable,
                "this access to a subject's data could not be recorded, so it was not carried out; retry",
            ),
            ServiceRefusal::ChangeFailed(reason) => {
                tracing::error!(%reason, "consent change task failed");
                error(
                    Code::Internal,
                    ErrorReason::BrokerUnavailable,
                    "the consent change failed; the broker operator has the details in its log",
                )
            }
            ServiceRefusal::Audit(AuditError::OutOfRange(reason)) => invalid_request(
                ErrorReason::InvalidRequest,
                &[FieldViolation::new("tree_size", reason.clone())],
            ),
            ServiceRefusal::Audit(AuditError::Unsupported(reason)) => error(
                Code::FailedPrecondition,
                ErrorReason::InvalidRequest,
                reason.clone(),
            ),
            ServiceRefusal::Audit(AuditError::Corrupt(reason)) => {
                tracing::error!(%reason, "the audit log's stored state disagrees with its records");
                error(
                    Code::DataLoss,
                    ErrorReason::AuditLogInconsistent,
                    "the audit log's stored index disagrees with its signed records, so nothing is shown; the broker operator has the details in its log",
                )
            }
            ServiceRefusal::Audit(other) => {
                tracing::error!(error = %other, "audit log failed");
                error(
                    Code::Unavailable,
                    ErrorReason::AuditUnavailable,
                    "the audit log is unavailable; retry",
                )
            }
            ServiceRefusal::UnknownExchange(exchange_id) => error(
                Code::NotFound,
                ErrorReason::NotFound,
                format!(
                    "no exchange {exchange_id:?} of yours delivered evidence about this subject in the last 24 hours; name the exchange_id RequestEvidence answered, with the same subject"
                ),
            ),
            ServiceRefusal::StepOutOfOrder { last, step } => error(
                Code::FailedPrecondition,
                ErrorReason::InvalidRequest,
                format!(
                    "{} cannot follow {}: a preview goes OFFERED, SHOWN (at each sign-in), then ACCEPTED, DECLINED or EXPIRED, and FORWARDED once, only after ACCEPTED",
                    step.as_str_name(),
                    last.map_or("nothing", |l| l.as_str_name())
                ),
            ),
            ServiceRefusal::TooManySteps(most) => error(
                Code::FailedPrecondition,
                ErrorReason::InvalidRequest,
                format!(
                    "this exchange's preview has its most steps ({most}) recorded already; a preview takes a handful: start a new request"
                ),
            ),
            ServiceRefusal::LeafNotFound { tree_size } => error(
                Code::NotFound,
                ErrorReason::NotFound,
                format!(
                    "no record with this leaf hash in the tree of {tree_size} records (yet): a receipt's record is in a signed head by its include_by"
                ),
            ),
        }
    }
}
