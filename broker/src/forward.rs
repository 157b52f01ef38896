//! Forwarding an allowed request to the connector the routing table names:
//! over mutual TLS with the broker's certificate, insisting that the
//! connector's certificate carries the connector id the table expects, with
//! the caller's deadline (capped by the connector's timeout), the exchange
//! id and the W3C trace context. A second endpoint is tried only where the
//! first could not be reached or its register reported itself unavailable
//! (evidence retrieval is a read, so that is safe). Each attempt carries an
//! authorization ticket of its own (a fresh `jti`), signed by the broker,
//! saying what the policy decided. The evidence that comes back is checked:
//! digest, connector id, evidence type, and the register's signed statement
//! (signed by that connector's certificate, bound to this exchange,
//! requester and subject, encrypted to the requester where asked).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use onceonly_certs::tls::{ConnectError, ReloadableClientTls, find_connect_error};
use onceonly_certs::{IdentityVerifier, MtlsConnector, Participant, Role};
use onceonly_proto::deadline::{Deadline, deadline_aware};
use onceonly_proto::metadata::{EXCHANGE_ID_HEADER, TraceContext};
use onceonly_proto::status::reason_of;
use onceonly_proto::v1::connector_service_client::ConnectorServiceClient;
use onceonly_proto::v1::{ErrorReason, Evidence, ProvideEvidenceRequest};
use onceonly_seal::opener::{Expected, check_statement};
use onceonly_seal::{Signer, TicketClaims, VerifiedRequest};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::circuit::{Admission, CircuitConfig, Circuits};
use crate::routing::{Destination, RoutingTable};

/// How long a TCP + TLS connect to a connector may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a forward failed.
#[derive(Debug)]
pub enum ForwardError {
    /// The connector answered with an error status (passed on).
    Connector(tonic::Status),
    /// No endpoint could be reached; the last reason.
    Unreachable(String),
    /// An endpoint presented another identity than the table expects.
    IdentityMismatch(String),
    /// An endpoint's certificate was refused (revoked, expired, ...).
    CertificateRefused(String),
    /// The deadline passed.
    DeadlineExceeded,
    /// The evidence failed the broker's checks.
    BadEvidence(String),
    /// The broker could not sign the authorization ticket.
    CannotAuthorize(String),
    /// Every endpoint's circuit is open: none was tried.
    CircuitOpen,
}

/// What a forward carries to authorize itself, and what the evidence that
/// comes back must be bound to.
pub struct Authorization {
    /// The ticket's claims; `aud`, `jti`, `iat` and `exp` are set per
    /// attempt.
    pub claims: TicketClaims,
    /// The broker's signer.
    pub signer: Arc<Signer>,
    /// The CA and CRL that the register's statement must verify under.
    pub trust: Arc<IdentityVerifier>,
    /// The authority's signed request (also in the ticket's `req`), which
    /// the register's statement must name.
    pub signed_request: Option<VerifiedRequest>,
}

impl Authorization {
    /// A ticket for one attempt at `connector_id`, valid until `deadline`
    /// (plus a second, for the rounding to whole seconds).
    fn ticket(
        &self,
        trust_domain: &str,
        connector_id: &str,
        deadline: Deadline,
    ) -> Result<String, ForwardError> {
        let audience = Participant::new(trust_domain, Role::Connector, connector_id)
            .map_err(|e| ForwardError::CannotAuthorize(e.to_string()))?;
        let mut jti = [0u8; 16];
        rand::rng().fill_bytes(&mut jti);
        let now = onceonly_seal::unix_now();
        let lifetime = i64::try_from(deadline.remaining().as_secs())
            .unwrap_or(i64::MAX)
            .saturating_add(2)
            .min(onceonly_seal::ticket::MAX_LIFETIME_SECS);
        let claims = TicketClaims {
            aud: audience.spiffe_id(),
            jti: hex::encode(jti),
            iat: now,
            exp: now + lifetime,
            ..self.claims.clone()
        };
        claims
            .sign(&self.signer)
            .map_err(|e| ForwardError::CannotAuthorize(e.to_string()))
    }
}

/// Opens and keeps one channel per connector endpoint.
pub struct Forwarder {
    tls: Arc<ReloadableClientTls>,
    trust_domain: String,
    /// Channels by (connector, endpoint), with the TLS generation they were
    /// opened under: after a reload (a new CRL) they are opened again, so
    /// that a connector revoked since is checked anew.
    channels: Mutex<HashMap<(String, String), (u64, Channel)>>,
    /// Each endpoint's circuit breaker.
    circuits: Circuits,
}

impl Forwarder {
    /// A forwarder presenting the broker's client configuration.
    pub fn new(tls: Arc<ReloadableClientTls>, trust_domain: &str, circuit: CircuitConfig) -> Self {
        Forwarder {
            tls,
            trust_domain: trust_domain.to_owned(),
            channels: Mutex::new(HashMap::new()),
            circuits: Circuits::new(circuit),
        }
    }

    /// The endpoints' circuit breakers.
    pub fn circuits(&self) -> &Circuits {
        &self.circuits
    }

    /// Asks every endpoint of `routing` for its gRPC health, once: a
    /// failure counts against its circuit like a failed request, SERVING
    /// closes it ([`crate::circuit`]).
    pub async fn check_health(&self, routing: &RoutingTable) {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        let timeout = self.circuits.config().health_timeout;
        for (connector, endpoints) in routing.connectors() {
            for endpoint in endpoints {
                let healthy = match self.channel(&connector, &endpoint) {
                    Ok(channel) => {
                        let mut client = HealthClient::new(channel);
                        let check = client.check(HealthCheckRequest {
                            service: "onceonly.v1.ConnectorService".into(),
                        });
                        matches!(
                            tokio::time::timeout(timeout, check).await,
                            Ok(Ok(answer)) if answer.get_ref().status() == ServingStatus::Serving
                        )
                    }
                    Err(_) => false,
                };
                if healthy {
                    self.circuits.success(&connector, &endpoint);
                } else {
                    tracing::debug!(%connector, %endpoint, "health check failed");
                    self.circuits.failure(&connector, &endpoint);
                }
            }
        }
    }

    /// The client TLS configuration (reload it with the server's).
    pub fn tls(&self) -> &ReloadableClientTls {
        &self.tls
    }

    fn channel(&self, connector_id: &str, endpoint: &str) -> Result<Channel, ForwardError> {
        let key = (connector_id.to_owned(), endpoint.to_owned());
        let generation = self.tls.generation();
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((opened_under, channel)) = channels.get(&key)
            && *opened_under == generation
        {
            return Ok(channel.clone());
        }
        let expected = Participant::new(&self.trust_domain, Role::Connector, connector_id)
            .map_err(|e| ForwardError::Unreachable(e.to_string()))?;
        let channel = MtlsConnector::new(self.tls.current(), Some(expected))
            .channel(endpoint, CONNECT_TIMEOUT)
            .map_err(|e| ForwardError::Unreachable(e.to_string()))?;
        channels.insert(key, (generation, channel.clone()));
        Ok(channel)
    }

    /// Forwards `request` to `destination`, finishing by `deadline` (each
    /// endpoint also within the connector's timeout). `contacted` is set
    /// while a call is under way with an endpoint that was reached, and
    /// stays set once one answered: whether the register saw the request.
    /// Dropping the future drops the call, which cancels it at the
    /// connector.
    pub async fn forward(
        &self,
        destination: &Destination,
        request: &ProvideEvidenceRequest,
        authorization: &Authorization,
        trace: &TraceContext,
        deadline: Deadline,
        contacted: &mut bool,
    ) -> Result<Evidence, ForwardError> {
        let mut last_failure = ForwardError::Unreachable("no endpoints".into());
        let mut tried = false;
        let connector = destination.connector_id.as_str();
        for endpoint in &destination.endpoints {
            let admission = self.circuits.admit(connector, endpoint);
            if admission == Admission::Skip {
                continue;
            }
            tried = true;
            let attempt = deadline.at_most(destination.timeout);
            if attempt.has_passed() {
                if admission == Admission::Probe {
                    self.circuits.failure(connector, endpoint);
                }
                return Err(ForwardError::DeadlineExceeded);
            }
            let mut attempt_request = request.clone();
            attempt_request.authorization_ticket =
                authorization.ticket(&self.trust_domain, &destination.connector_id, attempt)?;
            let mut call = tonic::Request::new(attempt_request);
            attempt.apply(&mut call);
            onceonly_proto::telemetry::onward(trace).inject(call.metadata_mut());
            if let Ok(value) = MetadataValue::try_from(request.exchange_id.as_str()) {
                call.metadata_mut().insert(EXCHANGE_ID_HEADER, value);
            }
            let mut client =
                ConnectorServiceClient::new(self.channel(&destination.connector_id, endpoint)?);
            let already = *contacted;
            // Until the call proves otherwise, the register may see it.
            *contacted = true;
            let status = match attempt.run(client.provide_evidence(call)).await {
                Err(_elapsed) => {
                    // The endpoint's own timeout (not the caller's deadline)
                    // ran out, or a probe did: the endpoint is failing.
                    if admission == Admission::Probe || attempt != deadline {
                        self.circuits.failure(connector, endpoint);
                    }
                    return Err(ForwardError::DeadlineExceeded);
                }
                Ok(Ok(response)) => {
                    self.circuits.success(connector, endpoint);
                    return check_evidence(
                        destination,
                        request,
                        authorization,
                        response.into_inner().evidence,
                    );
                }
                Ok(Err(status)) => deadline_aware(status),
            };
            let failure = classify(&status);
            if matches!(failure, Failure::Final) {
                self.circuits.success(connector, endpoint);
            } else {
                self.circuits.failure(connector, endpoint);
            }
            match failure {
                Failure::Unreachable(reason) => {
                    *contacted = already;
                    tracing::warn!(%endpoint, connector = %destination.connector_id, %reason, "connector endpoint unreachable; trying the next");
                    last_failure = ForwardError::Unreachable(format!("{endpoint}: {reason}"));
                }
                Failure::CertificateRefused(reason) => {
                    *contacted = already;
                    tracing::error!(%endpoint, connector = %destination.connector_id, %reason, "connector certificate refused");
                    last_failure = ForwardError::CertificateRefused(reason);
                }
                Failure::Identity(reason) => {
                    *contacted = already;
                    tracing::error!(%endpoint, connector = %destination.connector_id, %reason, "connector presented the wrong identity");
                    last_failure = ForwardError::IdentityMismatch(reason);
                }
                Failure::RegisterDown => {
                    tracing::warn!(%endpoint, connector = %destination.connector_id, message = status.message(), "register unavailable; trying the next endpoint");
                    last_failure = ForwardError::Connector(status);
                }
                Failure::Final => {
                    if status.code() == Code::DeadlineExceeded {
                        return Err(ForwardError::DeadlineExceeded);
                    }
                    return Err(ForwardError::Connector(status));
                }
            }
        }
        if !tried {
            return Err(ForwardError::CircuitOpen);
        }
        Err(last_failure)
    }
}

enum Failure {
    /// Never reached the connector: try the next endpoint.
    Unreachable(String),
    /// The endpoint is not the connector we expect.
    Identity(String),
    /// The endpoint's certificate was refused.
    CertificateRefused(String),
    /// The connector said its register is down: the next endpoint may serve.
    RegisterDown,
    /// An answer to pass on.
    Final,
}

fn classify(status: &tonic::Status) -> Failure {
    if let Some(source) = std::error::Error::source(status)
        && let Some(connect) = find_connect_error(source)
    {
        return match connect {
            ConnectError::IdentityMismatch { .. } => Failure::Identity(connect.to_string()),
            ConnectError::CertificateRefused { .. } => {
                Failure::CertificateRefused(connect.to_string())
            }
            other => Failure::Unreachable(other.to_string()),
        };
    }
    match (status.code(), reason_of(status)) {
        (Code::Unavailable, Some(ErrorReason::ConnectorUnavailable)) => Failure::RegisterDown,
        // A transport failure without a reason from the connector: the
        // request never got an answer from it.
        (Code::Unavailable | Code::Unknown, None) => {
            Failure::Unreachable(status.message().to_owned())
        }
        _ => Failure::Final,
    }
}

fn check_evidence(
    destination: &Destination,
    request: &ProvideEvidenceRequest,
    authorization: &Authorization,
    evidence: Option<Evidence>,
) -> Result<Evidence, ForwardError> {
    let evidence = evidence.ok_or_else(|| {
        ForwardError::BadEvidence("the connector answered without evidence".into())
    })?;
    let carried = evidence
        .encrypted_payload
        .as_ref()
        .map_or(evidence.payload.as_slice(), |sealed| {
            sealed.ciphertext.as_slice()
        });
    if evidence.payload_sha256 != Sha256::digest(carried).as_slice() {
        return Err(ForwardError::BadEvidence(
            "payload_sha256 does not match the payload".into(),
        ));
    }
    let subject = request.subject.clone().unwrap_or_default();
    let expected = Expected {
        exchange_id: &request.exchange_id,
        evidence_type: &request.evidence_type,
        subject_scheme: subject.scheme(),
        subject_value: &subject.value,
        requester: &request.requester_id,
        parameters: Some(&request.parameters),
        connector: Some(&destination.connector_id),
        encrypted: !authorization.claims.ecf.is_empty(),
        request: authorization
            .signed_request
            .as_ref()
            .map(VerifiedRequest::binding),
    };
    let (statement, _signer) = check_statement(&evidence, &authorization.trust, &expected)
        .map_err(|e| ForwardError::BadEvidence(format!("the register's statement: {e}")))?;
    // What the ticket named (the fingerprint of the certificate asked for).
    let encrypted_to = Some(&authorization.claims.ecf).filter(|ecf| !ecf.is_empty());
    match (encrypted_to, &statement.enc) {
        (None, None) => {}
        (Some(asked), Some(enc)) if *asked == enc.rcf => {}
        (Some(_), _) => {
            return Err(ForwardError::BadEvidence(
                "the evidence is not encrypted to the requester's certificate".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(ForwardError::BadEvidence(
                "the evidence is encrypted, though the requester did not ask for it".into(),
            ));
        }
    }
    if evidence.connector_id != destination.connector_id {
        return Err(ForwardError::BadEvidence(format!(
            "evidence claims connector {:?}, but came from {:?}",
            evidence.connector_id, destination.connector_id
        )));
    }
    if evidence.evidence_type != request.evidence_type {
        return Err(ForwardError::BadEvidence(format!(
            "asked for {:?}, got {:?}",
            request.evidence_type, evidence.evidence_type
        )));
    }
    // Signed by the register or not, a payload of a type the catalogue
    // does not list for the evidence type (an HTML page, a program) is not
    // that evidence.
    if !onceonly_proto::validate::media_type_listed(&destination.media_types, &evidence.media_type)
    {
        return Err(ForwardError::BadEvidence(format!(
            "the register answered {:?}, which the catalogue does not list for {:?} (it lists {})",
            onceonly_proto::validate::printable(&evidence.media_type, 100),
            request.evidence_type,
            destination.media_types.join(", ")
        )));
    }
    Ok(evidence)
}
