//! The one mapping from onceonly failures to `tonic::Status`: the gRPC code,
//! a message a person can act on, and the `google.rpc` details a program
//! branches on (`ErrorInfo` with an [`ErrorReason`], `BadRequest` naming the
//! fields). Servers build statuses only through these functions; clients
//! read them back with [`reason_of`] and [`violated_fields`].

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::ERROR_DOMAIN;
use crate::v1::ErrorReason;
use crate::validate::FieldViolation;

/// A status with `code`, `message` and an `ErrorInfo` carrying `reason`.
pub fn error(code: Code, reason: ErrorReason, message: impl Into<String>) -> Status {
    error_with_metadata(code, reason, message, HashMap::new())
}

/// Like [`error`], with `ErrorInfo.metadata` (e.g. what the policy checked).
pub fn error_with_metadata(
    code: Code,
    reason: ErrorReason,
    message: impl Into<String>,
    metadata: HashMap<String, String>,
) -> Status {
    let details = ErrorDetails::with_error_info(reason.reason(), ERROR_DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

/// RESOURCE_EXHAUSTED with `reason`, a `google.rpc.RetryInfo` saying when
/// to try again, and, for a per-caller quota, a `google.rpc.QuotaFailure`
/// naming it (`subject`, `description`).
pub fn resource_exhausted(
    reason: ErrorReason,
    message: impl Into<String>,
    retry_after: std::time::Duration,
    quota: Option<(String, String)>,
) -> Status {
    let mut details = ErrorDetails::with_error_info(reason.reason(), ERROR_DOMAIN, HashMap::new());
    details.set_retry_info(Some(retry_after));
    if let Some((subject, description)) = quota {
        details.add_quota_failure_violation(subject, description);
    }
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// The `google.rpc.RetryInfo` delay of a status, if it has one.
pub fn retry_after(status: &Status) -> Option<std::time::Duration> {
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
}

/// UNAUTHENTICATED for a caller whose client certificate was refused,
/// with the verifier's `reason` (revoked, expired, unknown issuer, ...).
pub fn certificate_refused(reason: &str) -> Status {
    error(
        Code::Unauthenticated,
        ErrorReason::Unauthenticated,
        format!(
            "client certificate refused: {reason}; present a current certificate of this trust domain (onceonly-certs issue)"
        ),
    )
}

/// INVALID_ARGUMENT naming every violated field, in the message and as a
/// `BadRequest` detail.
pub fn invalid_request(reason: ErrorReason, violations: &[FieldViolation]) -> Status {
    let message = violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let mut details = ErrorDetails::with_error_info(reason.reason(), ERROR_DOMAIN, HashMap::new());
    details.set_bad_request(
        violations
            .iter()
            .map(|v| tonic_types::FieldViolation::new(v.field.clone(), v.description.clone()))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {message}"),
        details,
    )
}

/// The [`ErrorReason`] of a status built here, if it has one.
pub fn reason_of(status: &Status) -> Option<ErrorReason> {
    status
        .get_details_error_info()
        .filter(|info| info.domain == ERROR_DOMAIN)
        .and_then(|info| ErrorReason::from_reason(&info.reason))
}

/// The fields a status's `BadRequest` detail names.
pub fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_round_trip() {
        let status = invalid_request(
            ErrorReason::InvalidRequest,
            &[FieldViolation::new("subject.value", "bad check digit")],
        );
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(reason_of(&status), Some(ErrorReason::InvalidRequest));
        assert_eq!(violated_fields(&status), ["subject.value"]);
        assert!(status.message().contains("subject.value: bad check digit"));

        let denied = error(Code::PermissionDenied, ErrorReason::PolicyDenied, "no rule");
        assert_eq!(reason_of(&denied), Some(ErrorReason::PolicyDenied));
        assert!(violated_fields(&denied).is_empty());
        assert_eq!(reason_of(&Status::internal("plain")), None);
    }
}
