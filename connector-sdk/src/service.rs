//! The `onceonly.v1.ConnectorService` implementation around a
//! [`Connector`]: the caller check, request validation, the deadline, the
//! concurrency limit, the broker's authorization ticket, and the evidence
//! envelope (digest, connector id, time of issue, the register's signed
//! statement, encryption to the requester where asked). The implementer's
//! code is reached only by a well-formed request from the broker that
//! carries a ticket the broker signed for exactly this request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use onceonly_certs::{Participant, ReloadableServerTls, Role, peer_identity};
use onceonly_proto::deadline::{Deadline, MIN_WORK, Reserve};
use onceonly_proto::metadata::TraceContext;
use onceonly_proto::status::{certificate_refused, error, invalid_request};
use onceonly_proto::v1::connector_service_server::ConnectorService;
use onceonly_proto::v1::{
    DescribeConnectorRequest, DescribeConnectorResponse, EncryptedPayload, ErrorReason, Evidence,
    EvidenceTypeInfo, ProvideEvidenceRequest, ProvideEvidenceResponse,
};
use onceonly_proto::validate::{self, FieldViolation, Violations};
use onceonly_seal::encryption::{Context, SUITE};
use onceonly_seal::jws::SignerCell;
use onceonly_seal::statement::EncryptionClaims;
use onceonly_seal::{
    NonceBook, Recipient, RequestError, RequestFields, StatementClaims, TicketError,
    TicketExpectation, TicketVerifier,
};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::connector::{Connector, EvidencePayload, EvidenceRequest, ProvideError, Subject};
use crate::metrics::ConnectorMetrics;

/// What a connector keeps back from the broker's deadline for its answer's
/// trip back: 5 ms, and at least a fifth of the deadline (the one deadline
/// model of [`onceonly_proto::deadline`]), so that its DEADLINE_EXCEEDED
/// reaches the broker before the broker's own timer fires.
const RESERVE: Reserve = Reserve {
    fixed: Duration::from_millis(5),
    factor: 0,
};

/// The limits a connector service enforces.
#[derive(Debug, Clone)]
pub(crate) struct ServiceLimits {
    /// Requests handed to the implementer at once; more wait their turn
    /// (within their deadline).
    pub concurrency: usize,
    /// The longest a request may take when the caller sets no deadline, and
    /// the cap on any deadline.
    pub max_request_time: Duration,
    /// The largest payload the connector will send.
    pub max_payload_size: usize,
    /// Evidence types released only encrypted to the requester.
    pub encryption_required_for: Vec<String>,
    /// Authorities (ids) whose tickets are answered without their signed
    /// request.
    pub accept_unsigned_from: Vec<String>,
}

/// The gRPC service wrapping a connector.
pub(crate) struct ConnectorGrpc<C> {
    connector: Arc<C>,
    /// This connector's id, from its own certificate.
    connector_id: String,
    register_name: String,
    /// The evidence types served, by id: read once, checked on every request.
    served: HashMap<String, EvidenceTypeInfo>,
    /// Only this broker id may call.
    allowed_broker: String,
    /// This connector's SPIFFE id (tickets' audience, statements' issuer).
    me: String,
    /// The CA and CRL in force, for tickets' and encryption certificates'
    /// chains; its generation also tells the signer to reload.
    tls: Arc<ReloadableServerTls>,
    /// Signs statements with this connector's certificate key.
    signer: SignerCell,
    /// The broker's tickets, with the ones accepted (replays refused).
    tickets: TicketVerifier,
    /// The nonces of the authorities' signed requests, each with the one
    /// exchange it may serve.
    nonces: NonceBook,
    /// The SPIFFE ids of the authorities whose tickets are answered
    /// without their signed request (`accept_unsigned_from`), worked out
    /// once rather than on every request.
    unsigned_accepted: std::collections::HashSet<String>,
    /// Evidence types this register releases only encrypted.
    encryption_required: std::collections::HashSet<String>,
    permits: Arc<Semaphore>,
    limits: ServiceLimits,
    metrics: Arc<ConnectorMetrics>,
}

/// A request that passed every check, with what the answer needs.
struct Admitted {
    request: EvidenceRequest,
    /// Where the evidence is to be encrypted to.
    recipient: Option<Recipient>,
}

impl<C: Connector> ConnectorGrpc<C> {
    pub(crate) fn new(
        connector: Arc<C>,
        me: &Participant,
        allowed_broker: String,
        limits: ServiceLimits,
        tls: Arc<ReloadableServerTls>,
        signer: SignerCell,
    ) -> Self {
        let broker = Participant::new(me.trust_domain(), Role::Broker, &allowed_broker)
            .map_or_else(|_| allowed_broker.clone(), |b| b.spiffe_id());
        let served = connector
            .evidence_types()
            .into_iter()
            .map(|info| (info.evidence_type.clone(), info))
            .collect();
        ConnectorGrpc {
            register_name: connector.register_name(),
            connector,
            connector_id: me.id().to_owned(),
            served,
            allowed_broker,
            me: me.spiffe_id(),
            tls,
            signer,
            tickets: TicketVerifier::new(&broker),
            nonces: NonceBook::default(),
            unsigned_accepted: limits
                .accept_unsigned_from
                .iter()
                .filter_map(|id| Participant::new(me.trust_domain(), Role::Authority, id).ok())
                .map(|authority| authority.spiffe_id())
                .collect(),
            encryption_required: limits.encryption_required_for.iter().cloned().collect(),
            metrics: Arc::default(),
            permits: Arc::new(Semaphore::new(limits.concurrency.max(1))),
            limits,
        }
    }

    /// Only the broker may call a connector.
    fn check_caller<T>(&self, request: &Request<T>) -> Result<Participant, Status> {
        let caller =
            peer_identity(request).map_err(|refusal| certificate_refused(&refusal.reason))?;
        if caller.role() != Role::Broker {
            return Err(error(
                Code::PermissionDenied,
                ErrorReason::RoleNotPermitted,
                format!(
                    "{caller} has role {}; only the broker (role broker) may call a connector",
                    caller.role()
                ),
            ));
        }
        if caller.id() != self.allowed_broker {
            let allowed = &self.allowed_broker;
            return Err(error(
                Code::PermissionDenied,
                ErrorReason::RoleNotPermitted,
                format!("{caller} is not the broker this connector serves (broker id {allowed})"),
            ));
        }
        Ok(caller.clone())
    }

    /// Checks the request, its ticket and its encryption certificate, and
    /// turns it into what the implementer sees.
    fn admit(&self, mut request: ProvideEvidenceRequest) -> Result<Admitted, Status> {
        let token = std::mem::take(&mut request.authorization_ticket);
        let certificate = std::mem::take(&mut request.encryption_certificate);
        let mut request = self.validate(request)?;
        let fingerprint = onceonly_seal::certificate_fingerprint(&certificate);
        let trust = self.tls.verifier();
        let subject_hash = onceonly_seal::subject_hash(
            &request.exchange_id,
            request.subject.scheme,
            &request.subject.value,
        );
        let parameters = onceonly_seal::parameters_hash(&request.parameters);
        let expected = TicketExpectation {
            audience: &self.me,
            exchange_id: &request.exchange_id,
            requester: &request.requester_id,
            evidence_type: &request.evidence_type,
            subject_hash: &subject_hash,
            purpose: &request.purpose,
            legal_basis: &request.legal_basis,
            jurisdiction: request.jurisdiction.as_deref().unwrap_or(""),
            parameters: &parameters,
            encryption_certificate: &fingerprint,
        };
        let now = onceonly_seal::unix_now();
        let ticket = self
            .tickets
            .verify(&token, &trust, &expected, now)
            .map_err(|refusal| {
                tracing::warn!(%refusal, "authorization ticket refused");
                ticket_status(&refusal)
            })?;
        // The authority's own signature on what the ticket lets through:
        // the broker's word alone does not make a request.
        let answered_unsigned =
            ticket.req.is_empty() && self.unsigned_accepted.contains(&request.requester_id);
        let signed_request = if answered_unsigned {
            None
        } else {
            let fields = RequestFields {
                requester: &request.requester_id,
                request_id: None,
                evidence_type: &request.evidence_type,
                subject_scheme: request.subject.scheme,
                subject_value: &request.subject.value,
                purpose: &request.purpose,
                legal_basis: &request.legal_basis,
                jurisdiction: request.jurisdiction.as_deref().unwrap_or(""),
                parameters: &parameters,
                consent_id: None,
                encryption_certificate: &fingerprint,
            };
            let verified = onceonly_seal::verify_request(&ticket.req, &trust, &fields, now)
                .and_then(|verified| {
                    // The consent the authority named is the one the
                    // broker's ticket says covered it, where both name one.
                    let (signed, ticketed) = (&verified.claims.cid, &ticket.cid);
                    if !signed.is_empty() && !ticketed.is_empty() && signed != ticketed {
                        return Err(RequestError::Mismatch {
                            claim: "cid",
                            field: "the ticket's consent (cid)",
                        });
                    }
                    Ok(verified)
                })
                .map_err(|refusal| {
                    tracing::warn!(%refusal, "the authority's signed request refused");
                    signed_request_status(&refusal)
                })?;
            Some(verified)
        };
        let recipient = if certificate.is_empty() {
            if self.encryption_required.contains(&request.evidence_type) {
                // The register's own rule: a broker that mints itself a
                // ticket without a certificate still gets no clear evidence.
                return Err(error(
                    Code::FailedPrecondition,
                    ErrorReason::EncryptionRequired,
                    format!(
                        "this register releases {:?} only encrypted to the requester: the request names no encryption certificate",
                        request.evidence_type
                    ),
                ));
            }
            None
        } else {
            let recipient = Recipient::from_certificate(&certificate, &trust)
                .map_err(|e| encryption_certificate_refused(e.to_string()))?;
            if recipient.participant().spiffe_id() != request.requester_id {
                return Err(encryption_certificate_refused(format!(
                    "it belongs to {}, not to the requester {}",
                    recipient.participant(),
                    request.requester_id
                )));
            }
            Some(recipient)
        };
        // Last, once nothing else refuses it: the nonce serves this
        // exchange (released again where it ends without evidence).
        if let Some(verified) = &signed_request {
            self.nonces
                .claim(&verified.claims, &request.exchange_id, now)
                .map_err(|refusal| {
                    tracing::warn!(%refusal, "the authority's signed request refused");
                    signed_request_status(&refusal)
                })?;
        }
        request.ticket = Some(ticket);
        request.signed_request = signed_request;
        Ok(Admitted { request, recipient })
    }

    /// Checks the request and turns it into what the implementer sees.
    fn validate(&self, request: ProvideEvidenceRequest) -> Result<EvidenceRequest, Status> {
        let mut violations = Violations::new();
        violations
            .check(validate::request_id("exchange_id", &request.exchange_id))
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
            .check(validate::optional_text(
                "requester_id",
                &request.requester_id,
            ));
        let served = self.served.get(&request.evidence_type);
        if let Some(info) = served {
            validate::against_type(
                info,
                request.subject.as_ref(),
                &request.parameters,
                &mut violations,
            );
        }
        violations
            .into_result()
            .map_err(|v| invalid_request(ErrorReason::InvalidRequest, &v))?;
        if served.is_none() {
            return Err(provide_error_status(&ProvideError::EvidenceTypeNotServed(
                request.evidence_type,
            )));
        }
        let subject = request.subject.unwrap_or_default();
        Ok(EvidenceRequest {
            exchange_id: request.exchange_id,
            evidence_type: request.evidence_type,
            subject: Subject {
                scheme: subject.scheme(),
                value: subject.value,
            },
            jurisdiction: Some(request.jurisdiction).filter(|j| !j.is_empty()),
            purpose: request.purpose,
            legal_basis: request.legal_basis,
            requester_id: request.requester_id,
            parameters: request.parameters,
            deadline: None,
            ticket: None,
            signed_request: None,
        })
    }

    fn envelope(
        &self,
        request: &EvidenceRequest,
        recipient: Option<&Recipient>,
        payload: EvidencePayload,
    ) -> Result<Evidence, Status> {
        if payload.bytes.len() > self.limits.max_payload_size {
            tracing::error!(
                size = payload.bytes.len(),
                limit = self.limits.max_payload_size,
                "payload exceeds max_payload_size"
            );
            return Err(error(
                Code::ResourceExhausted,
                ErrorReason::LimitExceeded,
                format!(
                    "the register's payload is {} bytes, over this connector's limit of {} bytes",
                    payload.bytes.len(),
                    self.limits.max_payload_size
                ),
            ));
        }
        // Nothing is signed in a media type this connector does not
        // declare for the evidence type: the broker would refuse it anyway,
        // and a signature must not vouch for an HTML page or a program
        // passed off as the evidence.
        let declared = self
            .served
            .get(&request.evidence_type)
            .map_or(&[][..], |info| info.media_types.as_slice());
        if !validate::media_type_listed(declared, &payload.media_type) {
            let found = validate::printable(&payload.media_type, 100);
            tracing::error!(
                media_type = %found,
                evidence_type = %request.evidence_type,
                "the register's payload is of a media type this connector does not declare; not signed"
            );
            return Err(error(
                Code::Internal,
                ErrorReason::BadEvidence,
                format!(
                    "the register answered media type {found:?}, which this connector does not declare for {:?} ({}); nothing was signed",
                    request.evidence_type,
                    declared.join(", ")
                ),
            ));
        }
        let now = time::OffsetDateTime::now_utc();
        let sealing_failed = |detail: String| {
            tracing::error!(%detail, "cannot seal the evidence");
            Status::internal(
                "the connector could not sign or encrypt the evidence; its operator has the details in its log",
            )
        };
        let (payload_bytes, encrypted_payload, encryption) = match recipient {
            None => (payload.bytes, None, None),
            Some(recipient) => {
                let context = Context {
                    exchange_id: &request.exchange_id,
                    evidence_type: &request.evidence_type,
                    requester: &request.requester_id,
                    media_type: &payload.media_type,
                };
                let sealed = recipient
                    .seal(&context, &payload.bytes)
                    .map_err(|e| sealing_failed(e.to_string()))?;
                let claims = EncryptionClaims {
                    rcf: recipient.fingerprint().to_owned(),
                    ek: onceonly_seal::base64_url(&sealed.encapsulated_key),
                    suite: SUITE.to_owned(),
                };
                let encrypted = EncryptedPayload {
                    suite: SUITE.to_owned(),
                    encapsulated_key: sealed.encapsulated_key,
                    ciphertext: sealed.ciphertext,
                    recipient_certificate_sha256: recipient.certificate_sha256().to_vec(),
                };
                (Vec::new(), Some(encrypted), Some(claims))
            }
        };
        let carried = encrypted_payload
            .as_ref()
            .map_or(payload_bytes.as_slice(), |e| e.ciphertext.as_slice());
        let digest = Sha256::digest(carried).to_vec();
        let statement = StatementClaims {
            iss: self.me.clone(),
            sub: request.requester_id.clone(),
            iat: now.unix_timestamp(),
            xid: request.exchange_id.clone(),
            evt: request.evidence_type.clone(),
            sbh: onceonly_seal::subject_hash(
                &request.exchange_id,
                request.subject.scheme,
                &request.subject.value,
            ),
            med: payload.media_type.clone(),
            prm: onceonly_seal::parameters_hash(&request.parameters),
            dig: onceonly_seal::base64_url(&digest),
            enc: encryption,
            non: request
                .signed_request
                .as_ref()
                .map(|signed| signed.claims.non.clone())
                .unwrap_or_default(),
            rqd: request
                .signed_request
                .as_ref()
                .map(|signed| signed.digest.clone())
                .unwrap_or_default(),
        };
        let register_jws = statement
            .sign(&self.signer.get(self.tls.generation()))
            .map_err(|e| sealing_failed(e.to_string()))?;
        Ok(Evidence {
            evidence_type: request.evidence_type.clone(),
            payload_sha256: digest,
            payload: payload_bytes,
            media_type: payload.media_type,
            connector_id: self.connector_id.clone(),
            issued_at: Some(prost_types::Timestamp {
                seconds: now.unix_timestamp(),
                nanos: i32::try_from(now.nanosecond()).unwrap_or(0),
            }),
            register_signature: payload.register_signature,
            register_jws,
            encrypted_payload,
        })
    }

    /// The caller's deadline (capped by `max_request_time`) and, within
    /// it, the deadline for the register's work; Err where the caller's
    /// deadline is too short to do anything.
    fn deadlines<T>(
        &self,
        request: &Request<T>,
        received: Instant,
    ) -> Result<(Deadline, Deadline), Status> {
        let deadline =
            Deadline::of_call(request.metadata(), received, self.limits.max_request_time);
        let reserve = RESERVE.for_call(deadline.total(), Duration::ZERO);
        let work = deadline
            .keep_back(reserve, MIN_WORK)
            .map_err(|too_short| too_short.status())?;
        Ok((deadline, work))
    }
}

/// A signed request's nonce claimed for one exchange: freed when dropped
/// unless kept (evidence was issued).
struct NonceHold<'a> {
    book: &'a NonceBook,
    request: Option<&'a onceonly_seal::RequestClaims>,
    exchange_id: &'a str,
    keep: bool,
}

impl Drop for NonceHold<'_> {
    fn drop(&mut self) {
        if let (false, Some(request)) = (self.keep, self.request) {
            self.book.release(request, self.exchange_id);
        }
    }
}

/// PERMISSION_DENIED with the reason of each refusal of the authority's
/// signed request.
fn signed_request_status(refusal: &RequestError) -> Status {
    let reason = match refusal {
        RequestError::Missing => ErrorReason::SignedRequestMissing,
        RequestError::Mismatch { .. } => ErrorReason::SignedRequestMismatch,
        RequestError::TooMany(_) => {
            return error(
                Code::ResourceExhausted,
                ErrorReason::LimitExceeded,
                format!("{refusal}; retry later"),
            );
        }
        RequestError::Invalid(_)
        | RequestError::NotTheRequester { .. }
        | RequestError::Expired(_)
        | RequestError::Replayed { .. } => ErrorReason::SignedRequestInvalid,
    };
    error(Code::PermissionDenied, reason, refusal.to_string())
}

/// PERMISSION_DENIED with the reason of each ticket refusal.
fn ticket_status(refusal: &TicketError) -> Status {
    let reason = match refusal {
        TicketError::Missing => ErrorReason::TicketMissing,
        TicketError::Invalid(_) | TicketError::WrongIssuer { .. } => ErrorReason::TicketInvalid,
        TicketError::Expired(_) => ErrorReason::TicketExpired,
        TicketError::Replayed { .. } => ErrorReason::TicketReplayed,
        TicketError::Mismatch { .. } => ErrorReason::TicketMismatch,
        TicketError::TooMany(_) => {
            return error(
                Code::Unavailable,
                ErrorReason::ConnectorUnavailable,
                refusal.to_string(),
            );
        }
    };
    error(Code::PermissionDenied, reason, refusal.to_string())
}

/// INVALID_ARGUMENT (ENCRYPTION_CERTIFICATE_REFUSED) naming the field.
fn encryption_certificate_refused(why: String) -> Status {
    invalid_request(
        ErrorReason::EncryptionCertificateRefused,
        &[FieldViolation::new(
            "encryption_certificate",
            format!("the encryption certificate is refused: {why}"),
        )],
    )
}

/// The documented status of each [`ProvideError`].
pub(crate) fn provide_error_status(provide_error: &ProvideError) -> Status {
    match provide_error {
        ProvideError::SubjectNotFound => error(
            Code::NotFound,
            ErrorReason::SubjectNotFound,
            provide_error.to_string(),
        ),
        ProvideError::EvidenceTypeNotServed(_) => error(
            Code::Unimplemented,
            ErrorReason::NoRoute,
            provide_error.to_string(),
        ),
        ProvideError::SubjectBlocked(_) => error(
            Code::PermissionDenied,
            ErrorReason::SubjectBlocked,
            provide_error.to_string(),
        ),
        ProvideError::InvalidParameter { name, reason } => invalid_request(
            ErrorReason::InvalidRequest,
            &[FieldViolation::new(
                format!("parameters[{name}]"),
                reason.clone(),
            )],
        ),
        ProvideError::AmbiguousSubject => error(
            Code::FailedPrecondition,
            ErrorReason::AmbiguousSubject,
            provide_error.to_string(),
        ),
        ProvideError::TooSlow(_) => error(
            Code::DeadlineExceeded,
            ErrorReason::DeadlineExceeded,
            provide_error.to_string(),
        ),
        ProvideError::RegisterUnavailable(_) => error(
            Code::Unavailable,
            ErrorReason::ConnectorUnavailable,
            provide_error.to_string(),
        ),
        ProvideError::Internal(_) => Status::internal(
            "the connector failed unexpectedly; its operator has the details in its log",
        ),
    }
}

fn deadline_exceeded(deadline: &Deadline) -> Status {
    error(
        Code::DeadlineExceeded,
        ErrorReason::DeadlineExceeded,
        format!(
            "the register did not answer within the deadline ({:?})",
            deadline.total()
        ),
    )
}

#[tonic::async_trait]
impl<C: Connector> ConnectorService for ConnectorGrpc<C> {
    async fn provide_evidence(
        &self,
        request: Request<ProvideEvidenceRequest>,
    ) -> Result<Response<ProvideEvidenceResponse>, Status> {
        let started = request
            .extensions()
            .get::<onceonly_certs::connection::CallStarted>()
            .map_or_else(Instant::now, |c| c.0);
        let evidence_type = if self.served.contains_key(&request.get_ref().evidence_type) {
            request.get_ref().evidence_type.clone()
        } else {
            "unknown".to_owned()
        };
        let answer = self.provide(request, started).await;
        self.metrics
            .record(&evidence_type, &answer, started.elapsed());
        answer
    }

    async fn describe_connector(
        &self,
        request: Request<DescribeConnectorRequest>,
    ) -> Result<Response<DescribeConnectorResponse>, Status> {
        self.describe(request)
    }
}

impl<C: Connector> ConnectorGrpc<C> {
    /// What the connector's metrics count and time ([`crate::metrics`]).
    pub(crate) fn metrics(&self) -> Arc<ConnectorMetrics> {
        self.metrics.clone()
    }

    async fn provide(
        &self,
        request: Request<ProvideEvidenceRequest>,
        started: Instant,
    ) -> Result<Response<ProvideEvidenceResponse>, Status> {
        let caller = self.check_caller(&request)?;
        let trace =
            TraceContext::extract(request.metadata()).unwrap_or_else(TraceContext::new_root);
        let (deadline, work_deadline) = self.deadlines(&request, started)?;
        let span = tracing::info_span!(
            "provide_evidence",
            // Not validated yet: control characters dropped, length capped
            // (CR/LF could forge log lines in a text log).
            exchange_id = %validate::printable(&request.get_ref().exchange_id, 128),
            evidence_type = %validate::printable(&request.get_ref().evidence_type, 128),
            trace_id = %trace.trace_id(),
            caller = %caller,
        );
        onceonly_proto::telemetry::continue_trace(&span, &trace);
        async move {
            let Admitted {
                request: mut evidence_request,
                recipient,
            } = self.admit(request.into_inner())?;
            evidence_request.deadline = Some(work_deadline.instant());
            let answered_for = evidence_request.clone();
            // The signed request's nonce stays with this exchange only where
            // evidence is issued: a failure, a refusal or a call the broker
            // gave up frees it for the authority's retry (a new exchange).
            let mut nonce = NonceHold {
                book: &self.nonces,
                request: answered_for.signed_request.as_ref().map(|s| &s.claims),
                exchange_id: &answered_for.exchange_id,
                keep: false,
            };

            // Dropped at the deadline, or when the broker cancels the call
            // (tonic drops this future): either way the register's work is
            // cancelled.
            let outcome = work_deadline.run(async {
                let _permit = self
                    .permits
                    .acquire()
                    .await
                    .map_err(|_| Status::unavailable("connector is shutting down"))?;
                self.connector
                    .provide(evidence_request)
                    .await
                    .map_err(|e| {
                        if let ProvideError::Internal(detail) = &e {
                            tracing::error!(%detail, "connector failed");
                        }
                        provide_error_status(&e)
                    })
            })
            .await;
            let result = match outcome {
                Ok(Ok(payload)) => self.envelope(&answered_for, recipient.as_ref(), payload),
                Ok(Err(status)) => Err(status),
                Err(_elapsed) => Err(deadline_exceeded(&deadline)),
            };
            nonce.keep = result.is_ok();
            let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
            match &result {
                Ok(evidence) => tracing::info!(latency_ms, bytes = evidence.payload.len(), "evidence provided"),
                Err(status) => tracing::info!(latency_ms, code = ?status.code(), message = status.message(), "evidence refused"),
            }
            result.map(|evidence| {
                Response::new(ProvideEvidenceResponse {
                    evidence: Some(evidence),
                })
            })
        }
        .instrument(span)
        .await
    }

    fn describe(
        &self,
        request: Request<DescribeConnectorRequest>,
    ) -> Result<Response<DescribeConnectorResponse>, Status> {
        self.check_caller(&request)?;
        let mut evidence_types: Vec<EvidenceTypeInfo> = self.served.values().cloned().collect();
        evidence_types.sort_by(|a, b| a.evidence_type.cmp(&b.evidence_type));
        for info in &mut evidence_types {
            info.consent_required = false;
        }
        Ok(Response::new(DescribeConnectorResponse {
            connector_id: self.connector_id.clone(),
            register_name: self.register_name.clone(),
            evidence_types,
        }))
    }
}
