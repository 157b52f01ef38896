//! The path of one evidence request, top to bottom:
//!
//! 1. [`authenticate`]: the caller's identity and role, from its verified
//!    certificate only; an authority may request evidence, nobody else.
//!    Then the limits that need to know the caller: its quota
//!    ([`crate::quota`]) and whether its deadline can hold the exchange and
//!    its record ([`onceonly_proto::deadline`]).
//! 2. [`validate`]: request id, evidence type known, subject well-formed for
//!    a scheme the type is keyed by, purpose and legal basis present,
//!    parameters known, sizes within limits. Every bad field is named.
//! 3. [`authorize`]: the policy allows caller x evidence type x
//!    purpose x legal basis (deny by default).
//! 4. [`Broker::check_consent`]: where the policy requires it, an active
//!    consent of the subject.
//! 5. [`Broker::route`]: evidence type and jurisdiction to a connector.
//! 6. forward ([`crate::forward`]): within the exchange limit
//!    ([`ExchangeLimit`]: excess is shed, not queued without bound), with
//!    the work deadline, the trace context and the exchange id; fail over
//!    only where safe.
//! 7. [`Broker::audit_and_answer`]: one audit record, durable, BEFORE the
//!    evidence is released; no record, no evidence.
//!
//! The steps return what they decided (the rule, the consent, the
//! destination) and the path writes it into the exchange's one audit
//! record, whose request fields are set when it begins and whose outcome
//! is set by [`Broker::audit_and_answer`]; every decision is taken under
//! the one policy snapshot the exchange took when it began.
//!
//! Every request, refused or not, leaves exactly one audit record, also
//! when the caller cancels or drops its connection: the exchange runs in a
//! task of its own ([`Broker::request_evidence`]), which the caller's
//! going away only asks to stop waiting (the register call is dropped, so
//! the register sees the cancellation), never to skip the record. Every
//! way an exchange ends without evidence is a [`Refusal`], classed in one
//! place ([`crate::refusal`]). A request id repeated within the idempotency
//! window is answered with the first outcome (and its own audit record
//! naming the first exchange).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use onceonly_certs::security::SecurityEvents;
use onceonly_certs::{Participant, PeerRefusal, ReloadableServerTls, Role};
use onceonly_proto::deadline::{Deadline, LatencyWindow, Reserve};
use onceonly_proto::metadata::TraceContext;
use onceonly_proto::v1::{
    AuditRecord, ErrorReason, Evidence, ExchangeOutcome, ProvideEvidenceRequest,
    RequestEvidenceRequest, RequestEvidenceResponse,
};
use onceonly_proto::validate::{self, FieldViolation, Violations, printable};
use onceonly_seal::jws::SignerCell;
use onceonly_seal::{Recipient, RequestFields, TicketClaims, VerifiedRequest};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::consent::Consents;
use crate::forward::{Authorization, ForwardError, Forwarder};
use crate::idempotency::{Begin, IdempotencyCache, StoredOutcome, StoredStatus, wait_for};
use crate::policy::{ConsentRequirement, Decision, PolicyStore};
use crate::pseudonym::Pseudonymiser;
pub use crate::refusal::{DeniedRequest, Refusal};
use crate::routing::{Destination, RoutingTable};
use onceonly_proto::time::{now_ms, timestamp};

/// What the broker keeps back from a caller's deadline for its audit write
/// and answer: 5 ms for the answer, three times the slowest append of the
/// last seconds (seeded at start with a timed flush of the data directory),
/// and at least a fifth of the caller's timeout.
const RESERVE: Reserve = Reserve {
    fixed: Duration::from_millis(5),
    factor: 3,
};

/// The retry hint a shed exchange gets.
const SHED_RETRY_AFTER: Duration = Duration::from_millis(100);

/// The least a forward to a connector must have after the reserve: the
/// connector keeps back its own reserve (5 ms at least) and needs time to
/// work (10 ms), and the call crosses the network twice.
const FORWARD_MIN: Duration = Duration::from_millis(20);

/// Everything the request path needs, shared by every request.
pub struct Broker {
    /// The evidence-type catalogue and routes.
    pub routing: Arc<RoutingTable>,
    /// The policy in force, quotas included (reloadable).
    pub policy: Arc<PolicyStore>,
    /// Consents.
    pub consents: Consents,
    /// Quotas counted in the database replicas share, where they do.
    pub shared_quotas: Option<Arc<dyn onceonly_store::QuotaCounter>>,
    /// The audit log.
    pub audit: Arc<dyn onceonly_store::AuditStore>,
    /// Subject pseudonyms for the audit log.
    pub pseudonyms: Arc<Pseudonymiser>,
    /// Connections to connectors.
    pub forwarder: Forwarder,
    /// Recently seen request ids.
    pub idempotency: IdempotencyCache,
    /// Exchanges with a register at once, and how many may wait.
    pub exchanges: ExchangeLimit,
    /// Cap on any deadline.
    pub max_request_time: Duration,
    /// How long audit appends took lately: sizes the deadline reserve.
    pub append_latency: LatencyWindow,
    /// Exchange tasks alive at once (each runs to its record whatever the
    /// caller does, so they are bounded apart from HTTP/2 streams).
    pub exchange_tasks: Arc<Semaphore>,
    /// Refused connections and calls, counted, never stored.
    pub security: Arc<SecurityEvents>,
    /// The broker's server TLS: its CA and CRL check the registers'
    /// statements and the authorities' encryption certificates.
    pub tls: Arc<ReloadableServerTls>,
    /// Signs authorization tickets with the broker's certificate key.
    pub signer: SignerCell,
    /// Test-only faults (a broker that alters evidence), off in service.
    pub faults: Faults,
    /// Whether the broker reports SERVING (gRPC health, and `/ready` on
    /// the admin listener).
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// What the request path counts and times ([`crate::metrics`]).
    pub metrics: crate::metrics::Metrics,
}

/// What a broker is built from, each part loaded or opened already: the
/// server module builds it from the configuration's files,
/// tests from texts, a throw-away PKI and stores in memory.
pub struct BrokerParts {
    /// The evidence-type catalogue and routes.
    pub routing: Arc<RoutingTable>,
    /// The policy in force.
    pub policy: Arc<PolicyStore>,
    /// Where the broker's state lives.
    pub stores: onceonly_store::Stores,
    /// Revocations known from the signed log ([`crate::revocations`]).
    pub revocations: Arc<crate::revocations::Revocations>,
    /// Subject pseudonyms and the stores' row keys.
    pub pseudonyms: Arc<Pseudonymiser>,
    /// Connections to connectors.
    pub forwarder: Forwarder,
    /// The broker's server TLS (its identity, CA and CRL).
    pub tls: Arc<ReloadableServerTls>,
    /// Signs tickets with the broker's certificate key.
    pub signer: SignerCell,
    /// Limits on requests.
    pub limits: crate::config::Limits,
    /// The idempotency window.
    pub idempotency: crate::config::Idempotency,
    /// How long a durable append took at start: the deadline reserve's
    /// first estimate.
    pub append_seed: Duration,
}

impl Broker {
    /// The broker made of `parts`.
    pub fn from_parts(parts: BrokerParts) -> Self {
        let BrokerParts {
            routing,
            policy,
            stores,
            revocations,
            pseudonyms,
            forwarder,
            tls,
            signer,
            limits,
            idempotency,
            append_seed,
        } = parts;
        let cache = IdempotencyCache::new(
            idempotency.window,
            idempotency.max_entries,
            usize::try_from(idempotency.max_bytes.as_u64()).unwrap_or(usize::MAX),
        );
        Broker {
            routing,
            policy,
            consents: Consents::new(stores.consents, pseudonyms.clone(), revocations),
            shared_quotas: stores.shared.as_ref().map(|shared| shared.quotas.clone()),
            audit: stores.audit,
            pseudonyms,
            forwarder,
            idempotency: match stores.shared {
                Some(shared) => cache.with_shared(shared.window),
                None => cache,
            },
            exchanges: ExchangeLimit::new(limits.concurrency, limits.max_waiting),
            max_request_time: limits.max_request_time,
            append_latency: LatencyWindow::seeded(append_seed),
            exchange_tasks: Arc::new(Semaphore::new(limits.max_exchanges)),
            security: Arc::default(),
            tls,
            signer,
            faults: Faults::default(),
            ready: Arc::default(),
            metrics: crate::metrics::Metrics::default(),
        }
    }
}

/// Faults a test can switch on to play a broker that misbehaves; they do
/// nothing unless the crate is built with the `test-hooks` feature, and no
/// configuration reaches them.
#[derive(Debug, Default)]
pub struct Faults {
    /// Flip one byte of the evidence after the broker's own checks.
    #[cfg(feature = "test-hooks")]
    pub alter_evidence: std::sync::atomic::AtomicBool,
}

impl Faults {
    #[cfg_attr(not(feature = "test-hooks"), allow(clippy::unused_self))]
    fn apply(&self, _evidence: &mut Evidence) {
        #[cfg(feature = "test-hooks")]
        if self.alter_evidence.load(Ordering::SeqCst) {
            let bytes = match _evidence.encrypted_payload.as_mut() {
                Some(sealed) => &mut sealed.ciphertext,
                None => &mut _evidence.payload,
            };
            if let Some(byte) = bytes.first_mut() {
                *byte ^= 0x01;
            }
        }
    }
}

/// What the path knows about the exchange so far; becomes the audit record.
struct Exchange {
    record: AuditRecord,
    started: Instant,
    /// The caller's deadline.
    deadline: Deadline,
    /// The deadline for the work: the caller's less the reserve for the
    /// audit write and the answer.
    work_deadline: Deadline,
    trace: TraceContext,
    /// The policy in force when the exchange began: every decision of the
    /// exchange (quota, rule, consent, encryption) is taken under this one,
    /// so a reload in between cannot mix two policies. (A repeat that
    /// waited for its first exchange decides again under the policy in
    /// force when that one's outcome arrived.)
    policy: Arc<crate::policy::Policy>,
}

impl Broker {
    /// Runs one evidence request from `peer` to its answer. A caller
    /// without a valid certificate of the trust domain is refused here,
    /// counted and logged (rate-limited) but never recorded: nothing it
    /// sends is stored. Every other exchange runs in its own task: if this
    /// future is dropped (the caller cancelled, or its connection went),
    /// the task is told to stop waiting, records the exchange as cancelled
    /// and ends. `arrived` is when the call reached the server (the start of
    /// its deadline).
    pub async fn request_evidence(
        self: &Arc<Self>,
        peer: Result<Participant, PeerRefusal>,
        metadata: &tonic::metadata::MetadataMap,
        arrived: Option<Instant>,
        request: RequestEvidenceRequest,
    ) -> Result<RequestEvidenceResponse, Status> {
        let peer = match peer {
            Ok(peer) => peer,
            Err(refusal) => {
                self.security.call_refused(refusal.kind);
                let refusal = Refusal::Unauthenticated {
                    reason: refusal.reason,
                };
                return Err(refusal.status());
            }
        };
        let exchange = self.begin(metadata, arrived, &request);
        let span = tracing::info_span!(
            "request_evidence",
            exchange_id = %exchange.record.exchange_id,
            // Not validated yet: control characters (CR/LF could forge
            // log lines in a text log) dropped, the length capped.
            request_id = %onceonly_proto::validate::printable(
                &request.request_id,
                onceonly_proto::validate::MAX_REQUEST_ID_LEN
            ),
            trace_id = %exchange.trace.trace_id(),
            caller = %peer,
        );
        onceonly_proto::telemetry::continue_trace(&span, &exchange.trace);
        let Ok(task_slot) = self.exchange_tasks.clone().try_acquire_owned() else {
            // No room for another exchange task: shed. Its record is
            // written by a small task of its own, so that it lands even if
            // the caller goes while the audit queue is full (the number of
            // these is bounded by the streams the connections may carry).
            let shed = Refusal::Overloaded {
                retry_after: SHED_RETRY_AFTER,
            };
            let mut exchange = exchange;
            exchange.record.caller_id = peer.spiffe_id();
            let broker = self.clone();
            let recorded = tokio::spawn(
                async move { broker.audit_and_answer(exchange, Err(shed)).await }.instrument(span),
            );
            return match recorded.await {
                Ok(answer) => answer.map_err(|refusal| refusal.status()),
                Err(join_error) => {
                    tracing::error!(%join_error, "recording a shed exchange failed");
                    Err(Refusal::AuditUnavailable.status())
                }
            };
        };
        let caller_gone = CancellationToken::new();
        let cancel_on_drop = caller_gone.clone().drop_guard();
        let broker = self.clone();
        // Instrumented, not entered: an entered guard held across awaits
        // would stay entered on the worker thread while this request waits,
        // and other requests' logs would land in its span.
        let exchange = tokio::spawn(
            async move {
                let _task_slot = task_slot;
                broker.run(exchange, peer, request, caller_gone).await
            }
            .instrument(span),
        );
        let answer = match exchange.await {
            Ok(answer) => answer.map_err(|refusal| refusal.status()),
            Err(join_error) => {
                tracing::error!(%join_error, "exchange task failed");
                Err(Refusal::TaskFailed.status())
            }
        };
        cancel_on_drop.disarm();
        answer
    }

    /// The path itself, in the exchange's own task.
    async fn run(
        &self,
        mut exchange: Exchange,
        peer: Participant,
        request: RequestEvidenceRequest,
        caller_gone: CancellationToken,
    ) -> Result<RequestEvidenceResponse, Refusal> {
        // 1. authenticate: the certificate verified; the role must be an
        // authority's; then the caller's quota, and whether its deadline can
        // hold anything.
        exchange.record.caller_id = peer.spiffe_id();
        let authenticated = self
            .count_quota(&exchange.policy, authorize_role(peer))
            .instrument(tracing::info_span!("authenticate"))
            .await
            .and_then(|caller| {
                let reserve =
                    RESERVE.for_call(exchange.deadline.total(), self.append_latency.recent_max());
                let work_deadline = exchange
                    .deadline
                    .keep_back(reserve, FORWARD_MIN)
                    .map_err(Refusal::DeadlineTooShort)?;
                Ok((caller, work_deadline))
            });
        let caller = match authenticated {
            Ok((caller, work_deadline)) => {
                exchange.work_deadline = work_deadline;
                caller
            }
            Err(refusal) => return self.audit_and_answer(exchange, Err(refusal)).await,
        };
        // The authority's signature on what it asks, before anything is
        // looked up or decided for it; its digest goes into the record.
        let signed = match tracing::info_span!("verify_signed_request")
            .in_scope(|| self.verify_signed_request(&exchange.policy, &caller, &request))
        {
            Ok(signed) => signed,
            Err(refusal) => return self.audit_and_answer(exchange, Err(refusal)).await,
        };
        if signed.is_some() {
            // What the authority signed (its header and claims), as the
            // register's statement names it (rqd).
            exchange.record.signed_request_sha256 = Sha256::digest(
                onceonly_seal::request::signing_input(&request.signed_request),
            )
            .to_vec();
        }

        // Idempotency: a repeated request id gets the first outcome; where
        // the first did not finish (cancelled, or a transient failure), this
        // one runs as new.
        let mut pending = None;
        if validate::request_id("request_id", &request.request_id).is_ok() {
            let fingerprint = fingerprint(&request);
            for _attempt in 0..2 {
                match self
                    .idempotency
                    .begin(
                        &exchange.record.caller_id,
                        &request.request_id,
                        fingerprint,
                        &exchange.record.exchange_id,
                    )
                    .await
                {
                    Begin::New(new) => {
                        pending = Some(new);
                        break;
                    }
                    Begin::Replay(first) => {
                        match self.wait_for_first(&exchange, first, &caller_gone).await {
                            Ok(Some(first)) => {
                                return self.replay(exchange, first, &caller, &request).await;
                            }
                            Ok(None) => continue,
                            Err(refusal) => {
                                return self.audit_and_answer(exchange, Err(refusal)).await;
                            }
                        }
                    }
                    Begin::Conflict => {
                        let refusal = Refusal::RequestIdReused {
                            request_id: request.request_id,
                        };
                        return self.audit_and_answer(exchange, Err(refusal)).await;
                    }
                    Begin::Unavailable => {
                        return self
                            .audit_and_answer(exchange, Err(Refusal::IdempotencyUnavailable))
                            .await;
                    }
                }
            }
            if pending.is_none() {
                return self
                    .audit_and_answer(exchange, Err(Refusal::FirstDidNotFinish))
                    .await;
            }
        }

        let result = tokio::select! {
            biased;
            () = caller_gone.cancelled() => Err(Refusal::Cancelled),
            result = self.decide_and_fetch(&mut exchange, &caller, request, signed) => result,
        };
        let exchange_id = exchange.record.exchange_id.clone();
        let answer = self.audit_and_answer(exchange, result).await;
        if let Some(pending) = pending {
            remember(pending, exchange_id, &answer).await;
        }
        answer
    }

    /// Counts the request against the caller's quota: in the database
    /// where replicas share it (counted here alone where that fails),
    /// here otherwise.
    async fn count_quota(
        &self,
        quotas: &crate::policy::Policy,
        caller: Result<Participant, Refusal>,
    ) -> Result<Participant, Refusal> {
        let caller = caller?;
        let verdict = match (&self.shared_quotas, quotas.quotas().bucket_of(caller.id())) {
            (Some(shared), Some(bucket)) => match shared.check(&bucket).await {
                Ok(verdict) => verdict,
                Err(e) => {
                    tracing::warn!(
                        error = %onceonly_store::describe(e.as_ref()),
                        "the shared quota count failed; counting here alone"
                    );
                    quotas.quotas().check(caller.id())
                }
            },
            _ => quotas.quotas().check(caller.id()),
        };
        verdict.map_err(|over| Refusal::QuotaExceeded {
            caller: caller.spiffe_id(),
            quota: over.quota,
            retry_after: over.retry_after,
        })?;
        Ok(caller)
    }

    /// Waits for the first exchange of a repeated request id: its outcome,
    /// or None where it ended without one (the repeat then runs as new).
    async fn wait_for_first(
        &self,
        exchange: &Exchange,
        first: crate::idempotency::Replay,
        caller_gone: &CancellationToken,
    ) -> Result<Option<StoredOutcome>, Refusal> {
        tokio::select! {
            biased;
            () = caller_gone.cancelled() => Err(Refusal::Cancelled),
            first = exchange.work_deadline.run(wait_for(first)) => match first {
                Ok(first) => Ok(first),
                Err(_elapsed) => Err(Refusal::DeadlineExceeded {
                    what: "waiting for the first request with this request_id".into(),
                }),
            },
        }
    }

    /// The authority's signed request, verified against the request and
    /// the caller: None where it sent none and the policy lets it.
    fn verify_signed_request(
        &self,
        policy: &crate::policy::Policy,
        caller: &Participant,
        request: &RequestEvidenceRequest,
    ) -> Result<Option<VerifiedRequest>, Refusal> {
        if request.signed_request.is_empty() && !policy.requires_signed_requests(caller.id()) {
            return Ok(None);
        }
        let subject = request.subject.clone().unwrap_or_default();
        let parameters = onceonly_seal::parameters_hash(&request.parameters);
        let encryption_certificate =
            onceonly_seal::certificate_fingerprint(&request.encryption_certificate);
        let fields = RequestFields {
            requester: &caller.spiffe_id(),
            request_id: Some(&request.request_id),
            evidence_type: &request.evidence_type,
            subject_scheme: subject.scheme(),
            subject_value: &subject.value,
            purpose: &request.purpose,
            legal_basis: &request.legal_basis,
            jurisdiction: &request.jurisdiction,
            parameters: &parameters,
            consent_id: Some(&request.consent_id),
            encryption_certificate: &encryption_certificate,
        };
        onceonly_seal::verify_request(
            &request.signed_request,
            &self.tls.verifier(),
            &fields,
            onceonly_seal::unix_now(),
        )
        .map(Some)
        .map_err(|refused| {
            tracing::info!(%refused, "signed request refused");
            Refusal::SignedRequest(refused)
        })
    }

    /// Steps 2 to 6.
    async fn decide_and_fetch(
        &self,
        exchange: &mut Exchange,
        caller: &Participant,
        request: RequestEvidenceRequest,
        signed: Option<VerifiedRequest>,
    ) -> Result<Evidence, Refusal> {
        // 2. validate
        tracing::info_span!("validate").in_scope(|| validate(&self.routing, &request))?;
        // 3. authorize
        let (rule, consent) = tracing::info_span!("authorize")
            .in_scope(|| authorize(&exchange.policy, caller, &request))?;
        exchange.record.policy_rule = rule;
        // 4. consent
        if consent == ConsentRequirement::Required {
            exchange.record.consent_id = self
                .check_consent(&exchange.record.caller_id, &request)
                .instrument(tracing::info_span!("consent"))
                .await?;
        }
        // Encryption to the requester: its own certificate, checked before
        // any register is called; 5. route
        // (the ticket then names that certificate, by its fingerprint).
        let destination = tracing::info_span!("route").in_scope(|| {
            self.check_encryption(&exchange.policy, caller, &request)?;
            self.route(&request)
        })?;
        exchange.record.connector_id = destination.connector_id.clone();
        // What the consent is checked against again before release (7).
        let asked_consent =
            (consent == ConsentRequirement::Required).then(|| ConsentAsked::of(&request));
        // 6. forward, within the exchange limit and the work deadline, with
        // a ticket saying what the policy decided
        let _slot = self.exchanges.admit(exchange.work_deadline).await?;
        let forward = ProvideEvidenceRequest {
            exchange_id: exchange.record.exchange_id.clone(),
            evidence_type: request.evidence_type,
            subject: request.subject,
            jurisdiction: request.jurisdiction,
            purpose: request.purpose,
            legal_basis: request.legal_basis,
            requester_id: exchange.record.caller_id.clone(),
            parameters: request.parameters,
            authorization_ticket: String::new(),
            encryption_certificate: request.encryption_certificate,
        };
        let authorization = Authorization {
            claims: TicketClaims {
                req: request.signed_request,
                ..TicketClaims::for_request(
                    &forward,
                    self.forwarder_identity(),
                    exchange.record.policy_rule.clone(),
                    exchange.record.consent_id.clone(),
                )
            },
            signed_request: signed,
            signer: self.signer.get(self.tls.generation()),
            trust: self.tls.verifier(),
        };
        let forwarding = Instant::now();
        // Boxed: the forward's state (a tonic call) is most of an
        // exchange's future, which is otherwise moved whole into its task
        // and through every await.
        let forwarded = Box::pin(
            self.forwarder
                .forward(
                    &destination,
                    &forward,
                    &authorization,
                    &exchange.trace,
                    exchange.work_deadline,
                    &mut exchange.record.register_contacted,
                )
                .instrument(tracing::info_span!("forward", connector = %destination.connector_id)),
        )
        .await;
        // A forward refused by open circuits never reached the connector.
        if !matches!(forwarded, Err(ForwardError::CircuitOpen)) {
            self.metrics
                .connector_seconds
                .get_or_create(&crate::metrics::ConnectorLabels {
                    connector: destination.connector_id.clone(),
                })
                .observe(forwarding.elapsed().as_secs_f64());
        }
        let mut evidence = forwarded.map_err(|error| Refusal::Forward {
            connector: destination.connector_id.clone(),
            error,
        })?;
        self.faults.apply(&mut evidence);
        // 7. consent again, now that the register has answered: one revoked
        // meanwhile (the register may take seconds) releases nothing, and
        // the record says the consent is missing.
        if let Some(asked) = asked_consent {
            let consent_id = exchange.record.consent_id.clone();
            self.active_consent(&exchange.record.caller_id, &asked, Some(&consent_id))
                .instrument(tracing::info_span!("consent_again"))
                .await
                .inspect_err(|_| {
                    tracing::info!(
                        consent_id,
                        "consent revoked (or expired) while the register answered: nothing released"
                    );
                })?;
        }
        Ok(evidence)
    }

    /// The broker's own SPIFFE id (the tickets' issuer).
    fn forwarder_identity(&self) -> String {
        self.tls.identity().spiffe_id()
    }

    /// Checks the requester's encryption certificate, where the request
    /// names one: it must be the caller's own, issued by the trust domain's
    /// CA; where the policy requires encryption, the request must name one.
    fn check_encryption(
        &self,
        policy: &crate::policy::Policy,
        caller: &Participant,
        request: &RequestEvidenceRequest,
    ) -> Result<(), Refusal> {
        if request.encryption_certificate.is_empty() {
            if policy.requires_encryption(&request.evidence_type) {
                return Err(Refusal::EncryptionRequired {
                    evidence_type: request.evidence_type.clone(),
                });
            }
            return Ok(());
        }
        let recipient =
            Recipient::from_certificate(&request.encryption_certificate, &self.tls.verifier())
                .map_err(|e| Refusal::EncryptionCertificateRefused(e.to_string()))?;
        if recipient.participant() != caller {
            return Err(Refusal::EncryptionCertificateRefused(format!(
                "it belongs to {}, not to the caller {caller}",
                recipient.participant()
            )));
        }
        Ok(())
    }

    /// Steps 3 and 4 again, for a replay of delivered evidence.
    async fn allowed_still(
        &self,
        exchange: &mut Exchange,
        caller: &Participant,
        request: &RequestEvidenceRequest,
    ) -> Result<(), Refusal> {
        let (rule, consent) = authorize(&exchange.policy, caller, request)?;
        exchange.record.policy_rule = rule;
        if consent == ConsentRequirement::Required {
            exchange.record.consent_id = self
                .check_consent(&exchange.record.caller_id, request)
                .await?;
        }
        // An encryption requirement (or a certificate revoked) since.
        self.check_encryption(&exchange.policy, caller, request)?;
        Ok(())
    }

    /// Step 4: an active consent of the subject must cover the request
    /// of `caller_id` (the one it names, where it names one); its id.
    async fn check_consent(
        &self,
        caller_id: &str,
        request: &RequestEvidenceRequest,
    ) -> Result<String, Refusal> {
        let named = Some(request.consent_id.as_str()).filter(|id| !id.is_empty());
        self.active_consent(caller_id, &ConsentAsked::of(request), named)
            .await
    }

    /// An active consent of `asked.subject` for `caller_id`'s evidence
    /// type and purpose (consent `named`, where given): its id, or
    /// CONSENT_MISSING. Steps 4 and 7.
    async fn active_consent(
        &self,
        caller_id: &str,
        asked: &ConsentAsked,
        named: Option<&str>,
    ) -> Result<String, Refusal> {
        let found = self
            .consents
            .find_active(
                &asked.subject,
                caller_id,
                &asked.evidence_type,
                &asked.purpose,
                named,
                now_ms(),
            )
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "consent lookup failed");
                Refusal::ConsentStoreUnavailable
            })?;
        match found {
            Some(consent) => Ok(consent.consent_id),
            None => Err(Refusal::ConsentMissing {
                evidence_type: asked.evidence_type.clone(),
                purpose: asked.purpose.clone(),
                consent_id: named.map(str::to_owned),
            }),
        }
    }

    /// 5. Evidence type and jurisdiction to a connector.
    fn route(&self, request: &RequestEvidenceRequest) -> Result<Destination, Refusal> {
        let jurisdiction = Some(request.jurisdiction.as_str()).filter(|j| !j.is_empty());
        self.routing
            .route(&request.evidence_type, jurisdiction)
            .ok_or_else(|| Refusal::NoRoute {
                evidence_type: request.evidence_type.clone(),
                jurisdiction: jurisdiction.map(str::to_owned),
            })
    }

    /// Starts an exchange: its id, deadline, trace and the record's request
    /// fields.
    fn begin(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        arrived: Option<Instant>,
        request: &RequestEvidenceRequest,
    ) -> Exchange {
        let started = arrived.unwrap_or_else(Instant::now);
        let deadline = Deadline::of_call(metadata, started, self.max_request_time);
        let trace = TraceContext::extract(metadata).unwrap_or_else(TraceContext::new_root);
        let subject = request.subject.clone().unwrap_or_default();
        let mut id = [0u8; 12];
        rand::rng().fill_bytes(&mut id);
        // The policy this exchange is decided under, named in its record.
        let policy = self.policy.current();
        let record = AuditRecord {
            exchange_id: format!("ex-{}", hex::encode(id)),
            request_id: printable(&request.request_id, validate::MAX_REQUEST_ID_LEN),
            received_at: Some(timestamp(now_ms())),
            evidence_type: printable(&request.evidence_type, 64),
            purpose: printable(&request.purpose, validate::MAX_TEXT_LEN),
            legal_basis: printable(&request.legal_basis, validate::MAX_TEXT_LEN),
            subject_scheme: subject.scheme,
            subject_pseudonym: if request.subject.is_some() {
                self.pseudonyms.pseudonym(subject.scheme, &subject.value)
            } else {
                Vec::new()
            },
            jurisdiction: printable(&request.jurisdiction, validate::MAX_TEXT_LEN),
            trace_id: trace.trace_id(),
            policy_sha256: policy.sha256().to_vec(),
            policy_version: policy.version(),
            // Kept as sent where they check; validation refuses the rest.
            correlation_ids: if validate::correlation_ids(
                "correlation_ids",
                &request.correlation_ids,
            )
            .is_ok()
            {
                request.correlation_ids.clone()
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        Exchange {
            record,
            started,
            deadline,
            work_deadline: deadline,
            trace,
            policy,
        }
    }

    /// 7 and 8: write the record durably, then answer. Where the record
    /// cannot be written the caller gets UNAVAILABLE and no evidence.
    async fn audit_and_answer(
        &self,
        exchange: Exchange,
        result: Result<Evidence, Refusal>,
    ) -> Result<RequestEvidenceResponse, Refusal> {
        let Exchange {
            mut record,
            started,
            ..
        } = exchange;
        match &result {
            Ok(evidence) => {
                record.outcome = ExchangeOutcome::Delivered as i32;
                record.status_code = Code::Ok as i32;
                // The digest of what was carried: the ciphertext where the
                // evidence is encrypted (the broker never held the plaintext).
                record.payload_sha256 = evidence.payload_sha256.clone();
                record.register_jws_sha256 =
                    Sha256::digest(evidence.register_jws.as_bytes()).to_vec();
                record.encrypted = evidence.encrypted_payload.is_some();
            }
            Err(refusal) => {
                let status = refusal.status();
                record.outcome = refusal.outcome() as i32;
                record.status_code = status.code() as i32;
                // Connector messages come from outside too.
                record.status_message = printable(status.message(), 1024);
                // From the status just built (not built again).
                record.error_reason = onceonly_proto::status::reason_of(&status)
                    .unwrap_or(ErrorReason::Unspecified)
                    as i32;
            }
        }
        record.latency_micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let exchange_id = record.exchange_id.clone();
        let request_id = record.request_id.clone();
        let outcome = record.outcome();
        let labels = crate::metrics::ExchangeLabels {
            evidence_type: evidence_type_label(self, &record.evidence_type),
            outcome: outcome_label(record.outcome()),
            reason: if record.error_reason == 0 {
                "none".to_owned()
            } else {
                record.error_reason().reason().to_owned()
            },
        };
        let appending = Instant::now();
        let appended = self
            .audit
            .append(record)
            .instrument(tracing::info_span!("audit"))
            .await;
        self.append_latency.record(appending.elapsed());
        self.metrics
            .audit_append_seconds
            .observe(appending.elapsed().as_secs_f64());
        // Without its record the exchange released nothing: counted as the
        // caller saw it.
        let labels = if appended.is_err() {
            crate::metrics::ExchangeLabels {
                outcome: "failed".to_owned(),
                reason: ErrorReason::AuditUnavailable.reason().to_owned(),
                ..labels
            }
        } else {
            labels
        };
        self.metrics.exchanges.get_or_create(&labels).inc();
        self.metrics
            .exchange_seconds
            .observe(started.elapsed().as_secs_f64());
        match appended {
            Ok(appended) => {
                tracing::info!(
                    ?outcome,
                    log_index = appended.index,
                    latency_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "exchange audited"
                );
                result.map(|evidence| RequestEvidenceResponse {
                    request_id,
                    exchange_id,
                    evidence: Some(evidence),
                    audit_log_index: appended.index.unwrap_or(0),
                    audit_receipt: appended.receipt,
                })
            }
            Err(audit_error) => {
                tracing::error!(%audit_error, ?outcome, "audit record not written: no evidence released");
                Err(Refusal::AuditUnavailable)
            }
        }
    }

    /// Answers a repeated request id with the first outcome, and audits the
    /// repeat as its own record naming the first exchange.
    async fn replay(
        &self,
        mut exchange: Exchange,
        first: StoredOutcome,
        caller: &Participant,
        request: &RequestEvidenceRequest,
    ) -> Result<RequestEvidenceResponse, Refusal> {
        exchange.record.replay_of_exchange_id = first.exchange_id.clone();
        // The policy as it is now, not as it was before waiting for the
        // first exchange: a rule removed meanwhile takes effect.
        exchange.policy = self.policy.current();
        match first.result {
            Ok(response) => {
                // Evidence is released again only where it would be now: a
                // consent revoked or a rule removed since takes effect at
                // once, replay or not.
                if let Err(refusal) = self.allowed_still(&mut exchange, caller, request).await {
                    return self.audit_and_answer(exchange, Err(refusal)).await;
                }
                let evidence = response.evidence.unwrap_or_default();
                exchange.record.connector_id = evidence.connector_id.clone();
                // The evidence was issued, signed (and encrypted) for the
                // first exchange: the caller checks it against that id.
                self.audit_and_answer(exchange, Ok(evidence))
                    .await
                    .map(|mut answer| {
                        answer.exchange_id = first.exchange_id;
                        answer
                    })
            }
            Err(stored) => {
                self.audit_and_answer(exchange, Err(Refusal::Replayed(stored)))
                    .await
            }
        }
    }
}

/// The audit outcome as a metric label.
fn outcome_label(outcome: ExchangeOutcome) -> String {
    outcome
        .as_str_name()
        .trim_start_matches("EXCHANGE_OUTCOME_")
        .to_ascii_lowercase()
}

/// Keeps a final outcome for repeats (with the exchange that produced it);
/// a transient failure (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
/// CANCELLED) is forgotten so the retry runs again.
async fn remember(
    pending: crate::idempotency::Pending,
    exchange_id: String,
    answer: &Result<RequestEvidenceResponse, Refusal>,
) {
    let result = match answer {
        Ok(response) => Ok(response.clone()),
        Err(refusal) if refusal.is_transient() => return,
        Err(refusal) => Err(StoredStatus::capture(&refusal.status(), refusal.outcome())),
    };
    pending
        .finish(StoredOutcome {
            exchange_id,
            result,
        })
        .await;
}

/// How many exchanges may be with registers at once, and how many more may
/// wait for a slot; the rest are shed (RESOURCE_EXHAUSTED, audited) rather
/// than queued without bound. A shed exchange must leave its audit record,
/// so this limit sits inside the request path rather than as a tower layer
/// in front of it.
pub struct ExchangeLimit {
    slots: Semaphore,
    capacity: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
    peak: AtomicUsize,
}

impl ExchangeLimit {
    /// `concurrency` exchanges at once, `max_waiting` more waiting.
    pub fn new(concurrency: usize, max_waiting: usize) -> Self {
        ExchangeLimit {
            slots: Semaphore::new(concurrency),
            capacity: concurrency,
            waiting: AtomicUsize::new(0),
            max_waiting,
            peak: AtomicUsize::new(0),
        }
    }

    /// A slot, waiting (at most until `deadline`) only where fewer than
    /// `max_waiting` already wait.
    pub async fn admit(&self, deadline: Deadline) -> Result<SemaphorePermit<'_>, Refusal> {
        let slot = match self.slots.try_acquire() {
            Ok(slot) => slot,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(Refusal::Overloaded {
                        retry_after: SHED_RETRY_AFTER,
                    });
                }
                // Counted out however the wait ends, also when the exchange
                // is dropped (its caller went away) while waiting.
                let _waiting = Waiting(&self.waiting);
                match deadline.run(self.slots.acquire()).await {
                    Ok(Ok(slot)) => slot,
                    Ok(Err(_closed)) => {
                        return Err(Refusal::Overloaded {
                            retry_after: SHED_RETRY_AFTER,
                        });
                    }
                    Err(_elapsed) => {
                        return Err(Refusal::DeadlineExceeded {
                            what: "waiting for a free exchange slot".into(),
                        });
                    }
                }
            }
        };
        self.peak.fetch_max(self.in_flight(), Ordering::Relaxed);
        Ok(slot)
    }

    /// Exchanges with registers now.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    /// Exchanges waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// The most exchanges with registers at once since start.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

/// One waiter counted in [`ExchangeLimit`] until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Step 3: the policy decides, deny by default; the rule that allowed the
/// request, and whether it needs a consent.
fn authorize(
    policy: &crate::policy::Policy,
    caller: &Participant,
    request: &RequestEvidenceRequest,
) -> Result<(String, ConsentRequirement), Refusal> {
    match policy.decide(
        caller.id(),
        &request.evidence_type,
        &request.purpose,
        &request.legal_basis,
    ) {
        Decision::Allow { rule, consent } => Ok((rule, consent)),
        Decision::Deny => Err(Refusal::PolicyDenied(Box::new(DeniedRequest {
            caller: caller.clone(),
            evidence_type: request.evidence_type.clone(),
            purpose: request.purpose.clone(),
            legal_basis: request.legal_basis.clone(),
        }))),
    }
}

/// Step 1, after the certificate verified: only an authority may request
/// evidence.
pub fn authorize_role(caller: Participant) -> Result<Participant, Refusal> {
    if caller.role() != Role::Authority {
        return Err(Refusal::RoleNotPermitted { caller });
    }
    Ok(caller)
}

/// Step 2: checks every field; the status names each bad one.
pub fn validate(routing: &RoutingTable, request: &RequestEvidenceRequest) -> Result<(), Refusal> {
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
        .check(validate::optional_text("consent_id", &request.consent_id))
        .check(validate::correlation_ids(
            "correlation_ids",
            &request.correlation_ids,
        ));
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
        .map_err(|violations| Refusal::Invalid {
            reason: ErrorReason::InvalidRequest,
            violations,
        })?;
    if known.is_none() {
        let catalogue: Vec<&str> = routing
            .evidence_types()
            .into_iter()
            .map(|t| t.entry.id.as_str())
            .collect();
        return Err(Refusal::Invalid {
            reason: ErrorReason::UnknownEvidenceType,
            violations: vec![FieldViolation::new(
                "evidence_type",
                format!(
                    "{:?} is not in the catalogue; known: {}",
                    request.evidence_type,
                    catalogue.join(", ")
                ),
            )],
        });
    }
    Ok(())
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
    // Asking for it encrypted (to which certificate) is part of the request.
    hash.update((request.encryption_certificate.len() as u64).to_be_bytes());
    hash.update(&request.encryption_certificate);
    for (key, value) in parameters {
        hash.update((key.len() as u64).to_be_bytes());
        hash.update(key.as_bytes());
        hash.update((value.len() as u64).to_be_bytes());
        hash.update(value.as_bytes());
    }
    hash.finalize().into()
}

/// The label value for an evidence type: itself where catalogued.
pub fn evidence_type_label(broker: &Broker, evidence_type: &str) -> String {
    if broker.routing.evidence_type(evidence_type).is_some() {
        evidence_type.to_owned()
    } else {
        "unknown".to_owned()
    }
}

#[cfg(test)]
#[path = "exchange_tests.rs"]
mod tests;

/// What a consent was checked against, kept for the check after the
/// register answered (the request itself is moved into the forward).
struct ConsentAsked {
    subject: onceonly_proto::v1::SubjectId,
    evidence_type: String,
    purpose: String,
}

impl ConsentAsked {
    fn of(request: &RequestEvidenceRequest) -> Self {
        ConsentAsked {
            subject: request.subject.clone().unwrap_or_default(),
            evidence_type: request.evidence_type.clone(),
            purpose: request.purpose.clone(),
        }
    }
}
