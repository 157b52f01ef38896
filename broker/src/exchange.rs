//! The path of one evidence request, top to bottom:
//!
//! 1. [`authenticate`]: the caller's identity and role, from its verified
//!    certificate only; an authority may request evidence, nobody else.
//! 2. [`validate`]: request id, evidence type known, subject well-formed for
//!    a scheme the type is keyed by, purpose and legal basis present,
//!    parameters known, sizes within limits. Every bad field is named.
//! 3. [`Broker::authorize`]: the policy allows caller x evidence type x
//!    purpose x legal basis (deny by default).
//! 4. [`Broker::check_consent`]: where the policy requires it, an active
//!    consent of the subject.
//! 5. [`Broker::route`]: evidence type and jurisdiction to a connector.
//! 6. forward ([`crate::forward`]): with the caller's deadline, the trace
//!    context and the exchange id; fail over only where safe.
//! 7. [`Broker::audit_and_answer`]: one audit record, durable, BEFORE the
//!    evidence is released; no record, no evidence.
//!
//! Every request, refused or not, leaves exactly one audit record. A request
//! id repeated within the idempotency window is answered with the first
//! outcome (and its own audit record naming the first exchange).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use onceonly_certs::{Participant, PeerRefusal, Role};
use onceonly_proto::metadata::{TraceContext, grpc_timeout};
use onceonly_proto::status::{certificate_refused, error, error_with_metadata, invalid_request};
use onceonly_proto::v1::{
    AuditRecord, ErrorReason, Evidence, ExchangeOutcome, ProvideEvidenceRequest,
    RequestEvidenceRequest, RequestEvidenceResponse,
};
use onceonly_proto::validate::{self, FieldViolation, Violations};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::audit::AuditLog;
use crate::consent::{ConsentStore, timestamp};
use crate::forward::{ForwardError, Forwarder};
use crate::idempotency::{Begin, IdempotencyCache, StoredOutcome, StoredStatus, wait_for};
use crate::policy::{ConsentRequirement, Decision, PolicyStore};
use crate::pseudonym::Pseudonymiser;
use crate::routing::{Destination, RoutingTable};

/// The largest share of a deadline kept back so that the broker's answer
/// (and its audit write) land before the caller gives up.
const DEADLINE_HEADROOM_MAX: Duration = Duration::from_millis(20);

/// A refusal: what the caller gets and how the audit log classes it.
#[derive(Debug)]
pub struct Refusal {
    /// The audit outcome.
    pub outcome: ExchangeOutcome,
    /// The caller's status.
    pub status: Status,
}

impl Refusal {
    fn rejected(status: Status) -> Self {
        Refusal {
            outcome: ExchangeOutcome::Rejected,
            status,
        }
    }
    fn denied(status: Status) -> Self {
        Refusal {
            outcome: ExchangeOutcome::Denied,
            status,
        }
    }
    fn failed(status: Status) -> Self {
        Refusal {
            outcome: ExchangeOutcome::Failed,
            status,
        }
    }
}

/// Everything the request path needs, shared by every request.
pub struct Broker {
    /// The evidence-type catalogue and routes.
    pub routing: Arc<RoutingTable>,
    /// The policy in force (reloadable).
    pub policy: Arc<PolicyStore>,
    /// Consents.
    pub consents: ConsentStore,
    /// The audit log.
    pub audit: AuditLog,
    /// Subject pseudonyms for the audit log.
    pub pseudonyms: Arc<Pseudonymiser>,
    /// Connections to connectors.
    pub forwarder: Forwarder,
    /// Recently seen request ids.
    pub idempotency: IdempotencyCache,
    /// Exchanges in flight at once.
    pub permits: Semaphore,
    /// Cap on any deadline.
    pub max_request_time: Duration,
}

/// What the path knows about the exchange so far; becomes the audit record.
struct Exchange {
    record: AuditRecord,
    started: Instant,
    deadline: Instant,
    trace: TraceContext,
}

impl Broker {
    /// Runs one evidence request from `peer` to its answer.
    pub async fn request_evidence(
        &self,
        peer: Result<Participant, PeerRefusal>,
        metadata: &tonic::metadata::MetadataMap,
        request: RequestEvidenceRequest,
    ) -> Result<RequestEvidenceResponse, Status> {
        let exchange = self.begin(metadata, &request);
        let span = tracing::info_span!(
            "request_evidence",
            exchange_id = %exchange.record.exchange_id,
            request_id = %request.request_id,
            trace_id = %exchange.trace.trace_id(),
            caller = tracing::field::Empty,
        );
        // Instrumented, not entered: an entered guard held across awaits
        // would stay entered on the worker thread while this request waits,
        // and other requests' logs would land in its span.
        self.run(exchange, peer, request).instrument(span).await
    }

    /// The path itself, inside the request's span.
    async fn run(
        &self,
        mut exchange: Exchange,
        peer: Result<Participant, PeerRefusal>,
        request: RequestEvidenceRequest,
    ) -> Result<RequestEvidenceResponse, Status> {
        // 1. authenticate
        let caller = match authenticate(peer) {
            Ok(caller) => caller,
            Err((refusal, claimed)) => {
                // Recorded apart from real callers: the claim is unverified.
                exchange.record.caller_id = claimed
                    .map(|c| format!("unverified:{c}"))
                    .unwrap_or_default();
                return self.audit_and_answer(exchange, Err(refusal)).await;
            }
        };
        tracing::Span::current().record("caller", tracing::field::display(&caller));
        exchange.record.caller_id = caller.spiffe_id();

        // Idempotency: a repeated request id gets the first outcome.
        let pending = if validate::request_id("request_id", &request.request_id).is_ok() {
            match self.idempotency.begin(
                &exchange.record.caller_id,
                &request.request_id,
                fingerprint(&request),
            ) {
                Begin::New(pending) => Some(pending),
                Begin::Replay(first) => return self.replay(exchange, first).await,
                Begin::Conflict => {
                    let status = error(
                        Code::AlreadyExists,
                        ErrorReason::RequestIdReused,
                        format!(
                            "request_id {:?} was used for a different request within the idempotency window; use a new request_id",
                            request.request_id
                        ),
                    );
                    return self
                        .audit_and_answer(exchange, Err(Refusal::rejected(status)))
                        .await;
                }
            }
        } else {
            None
        };

        let result = self.decide_and_fetch(&mut exchange, &caller, request).await;
        let answer = self.audit_and_answer(exchange, result).await;
        if let Some(pending) = pending {
            remember(pending, &answer);
        }
        answer
    }

    /// Steps 2 to 6.
    async fn decide_and_fetch(
        &self,
        exchange: &mut Exchange,
        caller: &Participant,
        request: RequestEvidenceRequest,
    ) -> Result<Evidence, Refusal> {
        // 2. validate
        validate(&self.routing, &request).map_err(Refusal::rejected)?;
        // 3. authorize
        let consent = self.authorize(exchange, caller, &request)?;
        // 4. consent
        if consent == ConsentRequirement::Required {
            self.check_consent(exchange, &request)?;
        }
        // 5. route
        let destination = self.route(&request)?;
        exchange.record.connector_id = destination.connector_id.clone();
        // 6. forward, within the concurrency limit and the deadline
        let _permit = tokio::time::timeout_at(exchange.deadline.into(), self.permits.acquire())
            .await
            .map_err(|_| Refusal::failed(deadline_status("waiting for a free slot")))?
            .map_err(|_| Refusal::failed(Status::unavailable("the broker is shutting down")))?;
        let forward = ProvideEvidenceRequest {
            exchange_id: exchange.record.exchange_id.clone(),
            evidence_type: request.evidence_type,
            subject: request.subject,
            jurisdiction: request.jurisdiction,
            purpose: request.purpose,
            legal_basis: request.legal_basis,
            requester_id: exchange.record.caller_id.clone(),
            parameters: request.parameters,
        };
        self.forwarder
            .forward(&destination, &forward, &exchange.trace, exchange.deadline)
            .await
            .map_err(|e| forward_refusal(&destination, e))
    }

    /// 3. The policy decides; deny by default.
    fn authorize(
        &self,
        exchange: &mut Exchange,
        caller: &Participant,
        request: &RequestEvidenceRequest,
    ) -> Result<ConsentRequirement, Refusal> {
        match self.policy.current().decide(
            caller.id(),
            &request.evidence_type,
            &request.purpose,
            &request.legal_basis,
        ) {
            Decision::Allow { rule, consent } => {
                exchange.record.policy_rule = rule;
                Ok(consent)
            }
            Decision::Deny => Err(Refusal::denied(error_with_metadata(
                Code::PermissionDenied,
                ErrorReason::PolicyDenied,
                format!(
                    "no policy rule allows {caller} to request {:?} for purpose {:?} under legal basis {:?}; ask the broker operator for a rule",
                    request.evidence_type, request.purpose, request.legal_basis
                ),
                [
                    ("caller".to_owned(), caller.spiffe_id()),
                    ("evidence_type".to_owned(), request.evidence_type.clone()),
                    ("purpose".to_owned(), request.purpose.clone()),
                    ("legal_basis".to_owned(), request.legal_basis.clone()),
                ]
                .into(),
            ))),
        }
    }

    /// 4. An active consent of the subject must cover the request.
    fn check_consent(
        &self,
        exchange: &mut Exchange,
        request: &RequestEvidenceRequest,
    ) -> Result<(), Refusal> {
        let subject = request.subject.clone().unwrap_or_default();
        let consent_id = Some(request.consent_id.as_str()).filter(|id| !id.is_empty());
        let found = self
            .consents
            .find_active(
                &subject,
                &exchange.record.caller_id,
                &request.evidence_type,
                &request.purpose,
                consent_id,
                now_ms(),
            )
            .map_err(|e| {
                tracing::error!(error = %e, "consent lookup failed");
                Refusal::failed(Status::unavailable(
                    "the consent store is unavailable; retry",
                ))
            })?;
        match found {
            Some(consent) => {
                exchange.record.consent_id = consent.consent_id;
                Ok(())
            }
            None => Err(Refusal::denied(error(
                Code::FailedPrecondition,
                ErrorReason::ConsentMissing,
                format!(
                    "the policy requires the subject's consent for {:?} for purpose {:?}, and no active consent exists (none granted, expired or revoked){}",
                    request.evidence_type,
                    request.purpose,
                    consent_id
                        .map(|id| format!("; consent {id:?} does not cover this request"))
                        .unwrap_or_default()
                ),
            ))),
        }
    }

    /// 5. Evidence type and jurisdiction to a connector.
    fn route(&self, request: &RequestEvidenceRequest) -> Result<Destination, Refusal> {
        let jurisdiction = Some(request.jurisdiction.as_str()).filter(|j| !j.is_empty());
        self.routing
            .route(&request.evidence_type, jurisdiction)
            .ok_or_else(|| {
                Refusal::failed(error(
                    Code::NotFound,
                    ErrorReason::NoRoute,
                    format!(
                        "no register serves {:?}{}",
                        request.evidence_type,
                        jurisdiction
                            .map(|j| format!(" for jurisdiction {j:?}"))
                            .unwrap_or_default()
                    ),
                ))
            })
    }

    /// Starts an exchange: its id, deadline, trace and the record's request
    /// fields.
    fn begin(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        request: &RequestEvidenceRequest,
    ) -> Exchange {
        let started = Instant::now();
        let budget = match grpc_timeout(metadata) {
            Some(timeout) => {
                (timeout - (timeout / 10).min(DEADLINE_HEADROOM_MAX)).min(self.max_request_time)
            }
            None => self.max_request_time,
        };
        let trace = TraceContext::extract(metadata).unwrap_or_else(TraceContext::new_root);
        let subject = request.subject.clone().unwrap_or_default();
        let mut id = [0u8; 12];
        rand::rng().fill_bytes(&mut id);
        let record = AuditRecord {
            exchange_id: format!("ex-{}", hex::encode(id)),
            request_id: truncate(&request.request_id, validate::MAX_REQUEST_ID_LEN),
            received_at: Some(timestamp(now_ms())),
            evidence_type: truncate(&request.evidence_type, 64),
            purpose: truncate(&request.purpose, validate::MAX_TEXT_LEN),
            legal_basis: truncate(&request.legal_basis, validate::MAX_TEXT_LEN),
            subject_scheme: subject.scheme,
            subject_pseudonym: if request.subject.is_some() {
                self.pseudonyms.pseudonym(subject.scheme, &subject.value)
            } else {
                Vec::new()
            },
            jurisdiction: truncate(&request.jurisdiction, validate::MAX_TEXT_LEN),
            trace_id: trace.trace_id(),
            ..Default::default()
        };
        Exchange {
            record,
            started,
            deadline: started + budget,
            trace,
        }
    }

    /// 7 and 8: write the record durably, then answer. Where the record
    /// cannot be written the caller gets UNAVAILABLE and no evidence.
    async fn audit_and_answer(
        &self,
        exchange: Exchange,
        result: Result<Evidence, Refusal>,
    ) -> Result<RequestEvidenceResponse, Status> {
        let Exchange {
            mut record,
            started,
            ..
        } = exchange;
        let evidence = match result {
            Ok(evidence) => {
                record.outcome = ExchangeOutcome::Delivered as i32;
                record.status_code = Code::Ok as i32;
                record.payload_sha256 = evidence.payload_sha256.clone();
                Ok(evidence)
            }
            Err(refusal) => {
                record.outcome = refusal.outcome as i32;
                record.status_code = refusal.status.code() as i32;
                record.status_message = truncate(refusal.status.message(), 1024);
                Err(refusal.status)
            }
        };
        record.latency_micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let exchange_id = record.exchange_id.clone();
        let request_id = record.request_id.clone();
        let outcome = record.outcome();
        match self.audit.append(record).await {
            Ok(index) => {
                tracing::info!(
                    ?outcome,
                    log_index = index,
                    latency_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "exchange audited"
                );
                evidence.map(|evidence| RequestEvidenceResponse {
                    request_id,
                    exchange_id,
                    evidence: Some(evidence),
                    audit_log_index: index,
                })
            }
            Err(audit_error) => {
                tracing::error!(%audit_error, ?outcome, "audit record not written: no evidence released");
                Err(error(
                    Code::Unavailable,
                    ErrorReason::AuditUnavailable,
                    "the audit record of this exchange could not be written, so no evidence was released; retry with the same request_id",
                ))
            }
        }
    }

    /// Answers a repeated request id with the first outcome, and audits the
    /// repeat as its own record naming the first exchange.
    async fn replay(
        &self,
        mut exchange: Exchange,
        first: tokio::sync::watch::Receiver<Option<StoredOutcome>>,
    ) -> Result<RequestEvidenceResponse, Status> {
        let outcome = tokio::time::timeout_at(exchange.deadline.into(), wait_for(first)).await;
        let Ok(Some(first)) = outcome else {
            let status = error(
                Code::Unavailable,
                ErrorReason::ConnectorUnavailable,
                "the first request with this request_id did not finish; retry",
            );
            return self
                .audit_and_answer(exchange, Err(Refusal::failed(status)))
                .await;
        };
        exchange.record.replay_of_exchange_id = first.exchange_id.clone();
        match first.result {
            Ok(response) => {
                let evidence = response.evidence.unwrap_or_default();
                exchange.record.connector_id = evidence.connector_id.clone();
                self.audit_and_answer(exchange, Ok(evidence)).await
            }
            Err(stored) => {
                let status = stored.rebuild();
                let outcome = outcome_of(status.code());
                self.audit_and_answer(exchange, Err(Refusal { outcome, status }))
                    .await
            }
        }
    }
}

/// Keeps a final outcome for repeats; a transient failure (UNAVAILABLE,
/// DEADLINE_EXCEEDED) is forgotten so the retry runs again.
fn remember(
    pending: crate::idempotency::Pending,
    answer: &Result<RequestEvidenceResponse, Status>,
) {
    let result = match answer {
        Ok(response) => Ok(response.clone()),
        Err(status)
            if matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted
            ) =>
        {
            return;
        }
        Err(status) => Err(StoredStatus::capture(status)),
    };
    let exchange_id = match &result {
        Ok(response) => response.exchange_id.clone(),
        Err(_) => String::new(),
    };
    pending.finish(StoredOutcome {
        exchange_id,
        result,
    });
}

/// The audit class of a status code.
fn outcome_of(code: Code) -> ExchangeOutcome {
    match code {
        Code::Ok => ExchangeOutcome::Delivered,
        Code::InvalidArgument | Code::AlreadyExists => ExchangeOutcome::Rejected,
        Code::PermissionDenied | Code::FailedPrecondition | Code::Unauthenticated => {
            ExchangeOutcome::Denied
        }
        _ => ExchangeOutcome::Failed,
    }
}

/// Step 1: the caller is who its verified certificate says, and an authority.
/// A refusal comes with the identity the certificate claimed, if any.
pub fn authenticate(
    peer: Result<Participant, PeerRefusal>,
) -> Result<Participant, (Refusal, Option<String>)> {
    let caller = peer.map_err(|refusal| {
        let status = certificate_refused(&refusal.reason);
        (Refusal::denied(status), refusal.claimed)
    })?;
    if caller.role() != Role::Authority {
        let claimed = Some(caller.spiffe_id());
        return Err((
            Refusal::denied(error(
                Code::PermissionDenied,
                ErrorReason::RoleNotPermitted,
                format!(
                    "{caller} has role {}; only authorities (role authority) may request evidence",
                    caller.role()
                ),
            )),
            claimed,
        ));
    }
    Ok(caller)
}

/// Step 2: checks every field; the status names each bad one.
pub fn validate(routing: &RoutingTable, request: &RequestEvidenceRequest) -> Result<(), Status> {
    let mut violations = Violations::new();
    violations
        .check(validate::request_id("request_id", &request.request_id))
        .check(validate::evidence_type_id(
            "evidence_type",
            &request.evidence_type,
        ))
        .check(validate::subject(request.subject.as_ref(), "subject"))
        .check(validate::required_text("purpose", &request.purpose))
        .check(validate::required_text("legal_basis", &request.legal_basis))
        .check(validate::optional_text(
            "jurisdiction",
            &request.jurisdiction,
        ))
        .check(validate::optional_text("consent_id", &request.consent_id));
    if request.parameters.len() > validate::MAX_PARAMETERS {
        violations.push(FieldViolation::new(
            "parameters",
            format!("at most {} parameters", validate::MAX_PARAMETERS),
        ));
    }
    let known = routing.evidence_type(&request.evidence_type);
    if let Some(evidence_type) = known {
        validate::against_type(
            &evidence_type.info,
            request.subject.as_ref(),
            &request.parameters,
            &mut violations,
        );
    }
    violations
        .into_result()
        .map_err(|v| invalid_request(ErrorReason::InvalidRequest, &v))?;
    if known.is_none() {
        let catalogue: Vec<&str> = routing
            .evidence_types()
            .into_iter()
            .map(|t| t.entry.id.as_str())
            .collect();
        return Err(invalid_request(
            ErrorReason::UnknownEvidenceType,
            &[FieldViolation::new(
                "evidence_type",
                format!(
                    "{:?} is not in the catalogue; known: {}",
                    request.evidence_type,
                    catalogue.join(", ")
                ),
            )],
        ));
    }
    Ok(())
}

/// The status and audit class of a failed forward.
fn forward_refusal(destination: &Destination, failure: ForwardError) -> Refusal {
    let connector = &destination.connector_id;
    match failure {
        ForwardError::DeadlineExceeded => Refusal::failed(deadline_status(&format!(
            "waiting for connector {connector}"
        ))),
        ForwardError::Unreachable(reason) => Refusal::failed(error(
            Code::Unavailable,
            ErrorReason::ConnectorUnavailable,
            format!(
                "connector {connector} is unreachable ({reason}); retry later with the same request_id"
            ),
        )),
        ForwardError::IdentityMismatch(reason) => Refusal::failed(error(
            Code::Unavailable,
            ErrorReason::ConnectorIdentityMismatch,
            format!(
                "connector {connector} could not be verified ({reason}); the broker did not send it the request"
            ),
        )),
        ForwardError::BadEvidence(reason) => Refusal::failed(error(
            Code::DataLoss,
            ErrorReason::ConnectorUnavailable,
            format!(
                "connector {connector} returned evidence that fails the broker's checks: {reason}"
            ),
        )),
        ForwardError::Connector(status) => {
            // Allowed, but the register did not deliver: FAILED, whatever
            // the register's reason.
            let passed_on = match status.code() {
                // The register's own answers, passed through with their details.
                Code::NotFound
                | Code::PermissionDenied
                | Code::InvalidArgument
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
            };
            Refusal::failed(passed_on)
        }
    }
}

fn deadline_status(what: &str) -> Status {
    error(
        Code::DeadlineExceeded,
        ErrorReason::DeadlineExceeded,
        format!(
            "the deadline passed while {what}; give the request a longer deadline, or retry later"
        ),
    )
}

/// The request's content, for telling a retry from a reused request id.
fn fingerprint(request: &RequestEvidenceRequest) -> [u8; 32] {
    let mut hash = Sha256::new();
    let subject = request.subject.clone().unwrap_or_default();
    let parameters: BTreeMap<&String, &String> = request.parameters.iter().collect();
    for part in [
        request.evidence_type.as_str(),
        &subject.scheme.to_string(),
        &subject.value,
        &request.jurisdiction,
        &request.purpose,
        &request.legal_basis,
        &request.consent_id,
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    for (key, value) in parameters {
        hash.update((key.len() as u64).to_be_bytes());
        hash.update(key.as_bytes());
        hash.update((value.len() as u64).to_be_bytes());
        hash.update(value.as_bytes());
    }
    hash.finalize().into()
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}
