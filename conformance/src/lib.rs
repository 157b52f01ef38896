//! `onceonly-conformance`: checks a connector, in any language, against the
//! connector contract (CONNECTORS.md) from outside, playing the broker. It
//! is given the trust domain's CA, a broker certificate and key (to connect
//! as the broker and to sign tickets), the connector's address and id, and
//! one subject the register holds; it then tries what a broker would send
//! and what an intruder holding a broker certificate might:
//!
//! - requests without a ticket, or with an expired, forged (another key),
//!   wrongly addressed, replayed or mismatched one, which must be refused
//!   (PERMISSION_DENIED, `TICKET_*`) before register code runs;
//! - tickets whose authority-signed request is missing, altered, signed
//!   by another participant (the broker itself), or used for a second
//!   exchange, which must be refused too (PERMISSION_DENIED,
//!   `SIGNED_REQUEST_*`): a broker cannot make up a request;
//! - a valid request, whose evidence must come with a statement that
//!   verifies against the CA and binds the payload digest, the exchange,
//!   the requester, the subject, and the signed request's nonce and digest;
//! - encryption to the requester's certificate where asked (with one given),
//!   and a foreign encryption certificate, which must be refused;
//! - the deadline, health, and the documented refusal codes.
//!
//! Each check says what it expected and what it got ([`Report`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use onceonly_certs::tls::{client_config, identity_verifier};
use onceonly_certs::{MtlsConnector, Participant, Role, TlsFiles};
use onceonly_proto::status::reason_of;
use onceonly_proto::v1::connector_service_client::ConnectorServiceClient;
use onceonly_proto::v1::{
    DescribeConnectorRequest, ErrorReason, ProvideEvidenceRequest, ProvideEvidenceResponse,
    SubjectId, SubjectIdScheme,
};
use onceonly_seal::{
    DecryptionKey, EvidenceOpener, Expected, RequestBinding, RequestClaims, Signer, TicketClaims,
};
use serde::Serialize;
use tonic::Code;
use tonic::transport::Channel;

/// What to check, and with what.
#[derive(Debug, Clone)]
pub struct Target {
    /// The connector, host:port.
    pub address: String,
    /// Its id (`spiffe://<domain>/connector/<id>`).
    pub connector_id: String,
    /// The trust domain's CA (PEM).
    pub ca: PathBuf,
    /// The revocation list, if any.
    pub crl: Option<PathBuf>,
    /// A broker certificate of the trust domain (PEM).
    pub broker_cert: PathBuf,
    /// Its key.
    pub broker_key: PathBuf,
    /// An evidence type the connector serves.
    pub evidence_type: String,
    /// A subject it holds evidence about.
    pub subject: SubjectId,
    /// Parameters for that lookup.
    pub parameters: HashMap<String, String>,
    /// A subject it holds nothing about (for NOT_FOUND), if known.
    pub missing_subject: Option<String>,
    /// An authority certificate and key of the trust domain: the
    /// requester, who signs each request.
    pub authority: (PathBuf, PathBuf),
    /// That authority's encryption certificate and key, for the
    /// encryption check.
    pub encryption: Option<(PathBuf, PathBuf)>,
    /// The deadline of the deadline check.
    pub deadline: Duration,
}

/// One check's result.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Check {
    /// Its name, e.g. `ticket-missing`.
    pub name: String,
    /// What the contract asks for.
    pub expected: String,
    /// What the connector did.
    pub got: String,
    /// Whether that is what the contract asks for; None: not run (the
    /// reason is in `got`).
    pub pass: Option<bool>,
}

/// Every check's result.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// The connector checked.
    pub connector: String,
    /// The checks, in the order run.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether every check that ran passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.pass != Some(false))
    }

    /// The failed checks' names.
    pub fn failed(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| c.pass == Some(false))
            .map(|c| c.name.as_str())
            .collect()
    }

    /// The report as an aligned table for people.
    pub fn table(&self) -> String {
        let width = |f: &dyn Fn(&Check) -> usize, header: usize| {
            self.checks.iter().map(f).max().unwrap_or(0).max(header)
        };
        let (n, e) = (
            width(&|c| c.name.len(), 5),
            width(&|c| c.expected.chars().count().min(60), 8),
        );
        let mut out = format!(
            "{:<n$}  {:<e$}  {:<6}  got\n",
            "check", "expected", "result"
        );
        for c in &self.checks {
            let expected: String = c.expected.chars().take(60).collect();
            let result = match c.pass {
                Some(true) => "pass",
                Some(false) => "FAIL",
                None => "skip",
            };
            out.push_str(&format!(
                "{:<n$}  {expected:<e$}  {result:<6}  {}\n",
                c.name, c.got
            ));
        }
        let failed = self.failed();
        if failed.is_empty() {
            out.push_str(&format!("{}: conforms\n", self.connector));
        } else {
            out.push_str(&format!(
                "{}: {} check(s) failed: {}\n",
                self.connector,
                failed.len(),
                failed.join(", ")
            ));
        }
        out
    }
}

/// Why the checks could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// A file given cannot be used.
    #[error("{0}")]
    Setup(String),
}

/// The broker side of the checks.
struct Broker {
    client: ConnectorServiceClient<Channel>,
    signer: Arc<Signer>,
    authority: Arc<Signer>,
    trust_domain: String,
    audience: String,
    requester: String,
    target: Target,
    serial: u64,
}

impl Broker {
    fn request(&mut self, exchange: &str) -> ProvideEvidenceRequest {
        self.serial += 1;
        ProvideEvidenceRequest {
            exchange_id: format!(
                "conformance-{exchange}-{}-{}",
                std::process::id(),
                self.serial
            ),
            evidence_type: self.target.evidence_type.clone(),
            subject: Some(self.target.subject.clone()),
            purpose: "conformance-check".into(),
            legal_basis: "onceonly connector contract".into(),
            requester_id: self.requester.clone(),
            parameters: self.target.parameters.clone(),
            ..Default::default()
        }
    }

    /// The request the authority signs for `request`, valid 120 s.
    fn signed_request(&self, request: &ProvideEvidenceRequest) -> RequestClaims {
        RequestClaims::for_forwarded(
            request,
            &request.exchange_id,
            onceonly_seal::unix_now(),
            onceonly_seal::request::DEFAULT_LIFETIME,
        )
        // Where no random nonce can be had: empty claims, which no
        // connector accepts, so the checks that need them fail.
        .unwrap_or_default()
    }

    /// The ticket a broker would issue for `request`, valid 60 s, carrying
    /// the request the authority signed.
    fn claims(&mut self, request: &ProvideEvidenceRequest) -> TicketClaims {
        let signed = self.signed_request(request);
        TicketClaims {
            req: signed.sign(&self.authority).unwrap_or_default(),
            ..self.bare_claims(request)
        }
    }

    /// The ticket for `request` without a signed request.
    fn bare_claims(&mut self, request: &ProvideEvidenceRequest) -> TicketClaims {
        let now = onceonly_seal::unix_now();
        self.serial += 1;
        TicketClaims {
            aud: self.audience.clone(),
            jti: format!(
                "conformance-{}-{}-{}",
                std::process::id(),
                self.serial,
                rand::random::<u64>()
            ),
            iat: now,
            exp: now + 60,
            ..TicketClaims::for_request(
                request,
                self.signer.participant().spiffe_id(),
                "conformance-check".into(),
                String::new(),
            )
        }
    }

    fn sign(&self, claims: &TicketClaims) -> String {
        claims.sign(&self.signer).unwrap_or_default()
    }

    async fn call(
        &mut self,
        request: ProvideEvidenceRequest,
        deadline: Duration,
    ) -> (Result<ProvideEvidenceResponse, tonic::Status>, Duration) {
        let mut call = tonic::Request::new(request);
        call.set_timeout(deadline);
        let started = Instant::now();
        // Our own limit too: a connector that ignores the deadline must not
        // hold the checks for long.
        let answer = match tokio::time::timeout(
            deadline + Duration::from_secs(5),
            self.client.provide_evidence(call),
        )
        .await
        {
            Ok(answer) => answer.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(
                "no answer within the deadline and 5 s more",
            )),
        };
        (answer, started.elapsed())
    }
}

fn said(answer: &Result<ProvideEvidenceResponse, tonic::Status>) -> String {
    match answer {
        Ok(response) => match &response.evidence {
            Some(e) if e.encrypted_payload.is_some() => {
                format!("OK, {} encrypted ({})", e.media_type, e.connector_id)
            }
            Some(e) => format!("OK, {} bytes of {}", e.payload.len(), e.media_type),
            None => "OK without evidence".into(),
        },
        Err(status) => format!(
            "{:?}{}",
            status.code(),
            reason_of(status)
                .map(|r| format!(" {}", r.reason()))
                .unwrap_or_default()
        ),
    }
}

fn refusal_check(
    name: &str,
    answer: &Result<ProvideEvidenceResponse, tonic::Status>,
    code: Code,
    reasons: &[ErrorReason],
) -> Check {
    let pass = match answer {
        Err(status) => {
            status.code() == code && reason_of(status).is_some_and(|r| reasons.contains(&r))
        }
        Ok(_) => false,
    };
    Check {
        name: name.into(),
        expected: format!(
            "{code:?} {}",
            reasons
                .iter()
                .map(|r| r.reason())
                .collect::<Vec<_>>()
                .join(" or ")
        ),
        got: said(answer),
        pass: Some(pass),
    }
}

/// A self-made certificate and key with the broker's identity, not issued
/// by the trust domain's CA: what a forger has.
fn forged_signer(broker: &Participant) -> Result<Signer, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.subject_alt_names = vec![rcgen::SanType::URI(
        broker
            .spiffe_id()
            .try_into()
            .map_err(|e: rcgen::Error| e.to_string())?,
    )];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Signer::new(
        &[cert.der().clone()],
        &rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .map_err(|e| e.to_string())
}

/// A self-signed encryption certificate: not the requester's of the trust
/// domain.
fn foreign_encryption_certificate(requester: &str) -> Result<Vec<u8>, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.subject_alt_names = vec![rcgen::SanType::URI(
        requester
            .try_into()
            .map_err(|e: rcgen::Error| e.to_string())?,
    )];
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyAgreement];
    Ok(params
        .self_signed(&key)
        .map_err(|e| e.to_string())?
        .der()
        .to_vec())
}

/// The authority's signed request in the ticket: missing, altered after
/// signing, signed for another request, signed by the broker itself, and
/// reused for a second exchange (`used`, the valid check's). Each must be
/// refused before register code runs.
async fn signed_request_checks(
    broker: &mut Broker,
    report: &mut Report,
    used: &str,
    deadline: Duration,
) {
    let mut request = broker.request("unsigned");
    let claims = broker.bare_claims(&request);
    request.authorization_ticket = broker.sign(&claims);
    let (answer, _) = broker.call(request, deadline).await;
    report.checks.push(refusal_check(
        "signed-request-missing",
        &answer,
        Code::PermissionDenied,
        &[ErrorReason::SignedRequestMissing],
    ));

    // The token's claims edited after the authority signed them.
    let mut request = broker.request("altered");
    let mut claims = broker.claims(&request);
    claims.req = altered(&claims.req, |c| c.pur = "something-else".into());
    request.authorization_ticket = broker.sign(&claims);
    let (answer, _) = broker.call(request, deadline).await;
    report.checks.push(refusal_check(
        "signed-request-altered",
        &answer,
        Code::PermissionDenied,
        &[ErrorReason::SignedRequestInvalid],
    ));

    // Signed by the authority, for another subject than the one asked.
    let mut request = broker.request("other-subject-signed");
    let mut other = request.clone();
    other.subject = Some(SubjectId {
        scheme: SubjectIdScheme::DeIdnr.into(),
        value: "10000000000".into(),
    });
    let signed = broker.signed_request(&other);
    let claims = TicketClaims {
        req: signed.sign(&broker.authority).unwrap_or_default(),
        ..broker.bare_claims(&request)
    };
    request.authorization_ticket = broker.sign(&claims);
    let (answer, _) = broker.call(request, deadline).await;
    report.checks.push(refusal_check(
        "signed-request-mismatch",
        &answer,
        Code::PermissionDenied,
        &[ErrorReason::SignedRequestMismatch],
    ));

    // The broker, holding a valid broker key, signs the request itself.
    let mut request = broker.request("broker-signed");
    let signed = broker.signed_request(&request);
    let claims = TicketClaims {
        req: signed.sign(&broker.signer).unwrap_or_default(),
        ..broker.bare_claims(&request)
    };
    request.authorization_ticket = broker.sign(&claims);
    let (answer, _) = broker.call(request, deadline).await;
    report.checks.push(refusal_check(
        "signed-request-by-broker",
        &answer,
        Code::PermissionDenied,
        &[ErrorReason::SignedRequestInvalid],
    ));

    // The one signed request of the valid check, for a new exchange.
    // The same request as the valid check's, under a new exchange id.
    let mut request = broker.request("valid");
    let claims = TicketClaims {
        req: used.to_owned(),
        ..broker.bare_claims(&request)
    };
    request.authorization_ticket = broker.sign(&claims);
    let (answer, _) = broker.call(request, deadline).await;
    report.checks.push(refusal_check(
        "signed-request-reused",
        &answer,
        Code::PermissionDenied,
        &[ErrorReason::SignedRequestInvalid],
    ));
}

/// `token` with its claims changed by `edit` and its signature kept: what
/// a party in between would send.
fn altered(token: &str, edit: impl FnOnce(&mut RequestClaims)) -> String {
    let mut parts = token.splitn(3, '.');
    let (Some(header), Some(_), Some(signature)) = (parts.next(), parts.next(), parts.next())
    else {
        return token.to_owned();
    };
    let Some(mut claims) = RequestClaims::read_unverified(token) else {
        return token.to_owned();
    };
    edit(&mut claims);
    let claims = serde_json::to_vec(&claims).unwrap_or_default();
    format!(
        "{header}.{}.{signature}",
        onceonly_seal::base64_url(&claims)
    )
}

/// Runs every check against `target`.
pub async fn run(target: Target) -> Result<Report, ConformanceError> {
    let setup = |e: &dyn std::fmt::Display| ConformanceError::Setup(e.to_string());
    let files = TlsFiles::new(
        target.ca.clone(),
        target.broker_cert.clone(),
        target.broker_key.clone(),
        target.crl.clone(),
    );
    let files = TlsFiles {
        allow_no_crl: target.crl.is_none(),
        ..files
    };
    let (config, me) = client_config(&files).map_err(|e| setup(&e))?;
    if me.role() != Role::Broker {
        return Err(ConformanceError::Setup(format!(
            "{} is {me}, not a broker certificate: the checks play the broker",
            target.broker_cert.display()
        )));
    }
    let trust_domain = me.trust_domain().to_owned();
    let connector = Participant::new(&trust_domain, Role::Connector, &target.connector_id)
        .map_err(|e| setup(&e))?;
    let channel = MtlsConnector::new(config, Some(connector.clone()))
        .channel(&target.address, Duration::from_secs(5))
        .map_err(|e| setup(&e))?;
    let signer = Arc::new(
        Signer::from_files(&target.broker_cert, &target.broker_key).map_err(|e| setup(&e))?,
    );
    let verifier = Arc::new(identity_verifier(&files, &trust_domain).map_err(|e| setup(&e))?);
    let authority = Arc::new(
        Signer::from_files(&target.authority.0, &target.authority.1).map_err(|e| setup(&e))?,
    );
    if authority.participant().role() != Role::Authority {
        return Err(ConformanceError::Setup(format!(
            "{} is {}, not an authority certificate: the checks sign requests as the requester",
            target.authority.0.display(),
            authority.participant()
        )));
    }
    let requester = authority.participant().spiffe_id();
    let decryption = match &target.encryption {
        Some((cert, key)) => {
            let der = onceonly_certs::pki::load_certs(cert)
                .map_err(|e| setup(&e))?
                .into_iter()
                .next()
                .ok_or_else(|| {
                    ConformanceError::Setup(format!("{}: no certificate", cert.display()))
                })?;
            let owner = Participant::from_certificate(der.as_ref()).map_err(|e| setup(&e))?;
            if owner.spiffe_id() != requester {
                return Err(ConformanceError::Setup(format!(
                    "{} belongs to {owner}, not to the requester {requester}",
                    cert.display()
                )));
            }
            Some((
                der.as_ref().to_vec(),
                DecryptionKey::from_files(cert, key).map_err(|e| setup(&e))?,
            ))
        }
        None => None,
    };
    let mut broker = Broker {
        client: ConnectorServiceClient::new(channel.clone()),
        signer,
        authority,
        trust_domain,
        audience: connector.spiffe_id(),
        requester,
        target: target.clone(),
        serial: 0,
    };
    let mut report = Report {
        connector: connector.spiffe_id(),
        checks: Vec::new(),
    };
    let standard = Duration::from_secs(10);

    // Health and description.
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await;
    let serving = matches!(&health, Ok(r) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    report.checks.push(Check {
        name: "health".into(),
        expected: "grpc.health.v1 SERVING".into(),
        got: match &health {
            Ok(r) => format!("status {}", r.get_ref().status),
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        },
        pass: Some(serving),
    });
    let described = broker
        .client
        .describe_connector(DescribeConnectorRequest {})
        .await;
    report.checks.push(Check {
        name: "describe".into(),
        expected: format!("{} among the evidence types", target.evidence_type),
        got: match &described {
            Ok(d) => d
                .get_ref()
                .evidence_types
                .iter()
                .map(|t| t.evidence_type.clone())
                .collect::<Vec<_>>()
                .join(", "),
            Err(s) => format!("{:?}", s.code()),
        },
        pass: Some(described.as_ref().is_ok_and(|d| {
            d.get_ref()
                .evidence_types
                .iter()
                .any(|t| t.evidence_type == target.evidence_type)
        })),
    });

    // Tickets refused before register code runs.
    let request = broker.request("no-ticket");
    let (answer, _) = broker.call(request, standard).await;
    report.checks.push(refusal_check(
        "ticket-missing",
        &answer,
        Code::PermissionDenied,
        &[ErrorReason::TicketMissing],
    ));

    let mut request = broker.request("expired");
    let mut claims = broker.claims(&request);
    claims.iat -= 600;
    claims.exp = claims.iat + 30;
    request.authorization_ticket = broker.sign(&claims);
    let (answer, _) = broker.call(request, standard).await;
    report.checks.push(refusal_check(
        "ticket-expired",
        &answer,
        Code::PermissionDenied,
        &[ErrorReason::TicketExpired],
    ));

    let mut request = broker.request("forged");
    let claims = broker.claims(&request);
    match forged_signer(broker.signer.participant()) {
        Ok(forger) => {
            request.authorization_ticket = claims.sign(&forger).unwrap_or_default();
            let (answer, _) = broker.call(request, standard).await;
            report.checks.push(refusal_check(
                "ticket-forged",
                &answer,
                Code::PermissionDenied,
                &[ErrorReason::TicketInvalid],
            ));
        }
        Err(e) => return Err(ConformanceError::Setup(format!("cannot forge: {e}"))),
    }

    let mut request = broker.request("elsewhere");
    let mut claims = broker.claims(&request);
    claims.aud = format!(
        "spiffe://{}/connector/another-register",
        broker.trust_domain
    );
    request.authorization_ticket = broker.sign(&claims);
    let (answer, _) = broker.call(request, standard).await;
    report.checks.push(refusal_check(
        "ticket-wrong-connector",
        &answer,
        Code::PermissionDenied,
        &[ErrorReason::TicketMismatch, ErrorReason::TicketInvalid],
    ));

    let mut request = broker.request("other-subject");
    let mut claims = broker.claims(&request);
    claims.sbh =
        onceonly_seal::subject_hash(&request.exchange_id, SubjectIdScheme::DeIdnr, "10000000000");
    request.authorization_ticket = broker.sign(&claims);
    let (answer, _) = broker.call(request, standard).await;
    report.checks.push(refusal_check(
        "ticket-mismatch",
        &answer,
        Code::PermissionDenied,
        &[ErrorReason::TicketMismatch],
    ));

    // A valid request, its statement verified and bound.
    let mut request = broker.request("valid");
    let claims = broker.claims(&request);
    request.authorization_ticket = broker.sign(&claims);
    let replay = request.clone();
    let exchange_id = request.exchange_id.clone();
    let signed_request = claims.req.clone();
    let nonce = RequestClaims::read_unverified(&signed_request)
        .map(|c| c.non)
        .unwrap_or_default();
    let signed_digest = onceonly_seal::request::signed_digest(&signed_request);
    let (answer, _) = broker.call(request, standard).await;
    let opener = EvidenceOpener::new(verifier.clone(), None);
    let requester = broker.requester.clone();
    let expected = Expected {
        exchange_id: &exchange_id,
        evidence_type: &target.evidence_type,
        subject_scheme: target.subject.scheme(),
        subject_value: &target.subject.value,
        requester: &requester,
        parameters: Some(&target.parameters),
        connector: Some(&target.connector_id),
        encrypted: false,
        request: Some(RequestBinding {
            nonce: &nonce,
            digest: &signed_digest,
            issued_at: claims.iat,
        }),
    };
    report.checks.push(Check {
        name: "valid-request".into(),
        expected: "OK; a statement signed by this connector's certificate of the CA, binding digest, exchange, requester, subject and the signed request".into(),
        got: match &answer {
            Ok(response) => match response.evidence.as_ref().map(|e| opener.open(e, &expected)) {
                Some(Ok(opened)) => format!("OK, statement of {} verified and bound", opened.connector),
                Some(Err(refused)) => format!("OK, but {refused}"),
                None => "OK without evidence".into(),
            },
            Err(_) => said(&answer),
        },
        pass: Some(matches!(&answer, Ok(r) if r.evidence.as_ref().is_some_and(|e| opener.open(e, &expected).is_ok()))),
    });

    let (answer, _) = broker.call(replay, standard).await;
    report.checks.push(refusal_check(
        "ticket-replayed",
        &answer,
        Code::PermissionDenied,
        &[ErrorReason::TicketReplayed],
    ));

    signed_request_checks(&mut broker, &mut report, &signed_request, standard).await;

    // Encryption.
    match decryption {
        Some((der, key)) => {
            let mut request = broker.request("encrypted");
            request.encryption_certificate = der;
            let claims = broker.claims(&request);
            request.authorization_ticket = broker.sign(&claims);
            let exchange_id = request.exchange_id.clone();
            let (answer, _) = broker.call(request, standard).await;
            let opener = EvidenceOpener::new(verifier.clone(), Some(key));
            let signed_request = claims.req.clone();
            let nonce = RequestClaims::read_unverified(&signed_request)
                .map(|c| c.non)
                .unwrap_or_default();
            let signed_digest = onceonly_seal::request::signed_digest(&signed_request);
            let expected = Expected {
                exchange_id: &exchange_id,
                encrypted: true,
                request: Some(RequestBinding {
                    nonce: &nonce,
                    digest: &signed_digest,
                    issued_at: claims.iat,
                }),
                ..expected
            };
            let opened = answer
                .as_ref()
                .ok()
                .and_then(|r| r.evidence.as_ref())
                .map(|e| (e.encrypted_payload.is_some(), opener.open(e, &expected)));
            report.checks.push(Check {
                name: "encryption-honoured".into(),
                expected: "OK, the payload encrypted to the requester's certificate, decryptable with its key".into(),
                got: match &opened {
                    Some((true, Ok(_))) => "encrypted, decrypted and verified".into(),
                    Some((false, _)) => "OK, but the payload is in the clear".into(),
                    Some((true, Err(e))) => format!("encrypted, but {e}"),
                    None => said(&answer),
                },
                pass: Some(matches!(opened, Some((true, Ok(o)))  if o.was_encrypted)),
            });
        }
        None => report.checks.push(Check {
            name: "encryption-honoured".into(),
            expected: "the payload encrypted to the requester".into(),
            got: "not run: give --encryption-cert and --encryption-key".into(),
            pass: None,
        }),
    }
    let mut request = broker.request("foreign-encryption");
    request.encryption_certificate = foreign_encryption_certificate(&requester)
        .map_err(|e| ConformanceError::Setup(format!("cannot make a foreign certificate: {e}")))?;
    let claims = broker.claims(&request);
    request.authorization_ticket = broker.sign(&claims);
    let (answer, _) = broker.call(request, standard).await;
    report.checks.push(refusal_check(
        "encryption-foreign-refused",
        &answer,
        Code::InvalidArgument,
        &[ErrorReason::EncryptionCertificateRefused],
    ));

    // Refusal codes as documented.
    let mut request = broker.request("unknown-type");
    request.evidence_type = "onceonly-conformance-unknown-type".into();
    let claims = broker.claims(&request);
    request.authorization_ticket = broker.sign(&claims);
    let (answer, _) = broker.call(request, standard).await;
    report.checks.push(refusal_check(
        "unknown-evidence-type",
        &answer,
        Code::Unimplemented,
        &[ErrorReason::NoRoute],
    ));
    match target.missing_subject.clone() {
        Some(missing) => {
            let mut request = broker.request("missing");
            request.subject = Some(SubjectId {
                value: missing,
                ..target.subject.clone()
            });
            let claims = broker.claims(&request);
            request.authorization_ticket = broker.sign(&claims);
            let (answer, _) = broker.call(request, standard).await;
            report.checks.push(refusal_check(
                "subject-not-found",
                &answer,
                Code::NotFound,
                &[ErrorReason::SubjectNotFound],
            ));
        }
        None => report.checks.push(Check {
            name: "subject-not-found".into(),
            expected: "NotFound SUBJECT_NOT_FOUND".into(),
            got: "not run: give --missing-subject".into(),
            pass: None,
        }),
    }

    // The deadline: an answer (evidence or DEADLINE_EXCEEDED) by then.
    let mut request = broker.request("deadline");
    let claims = broker.claims(&request);
    request.authorization_ticket = broker.sign(&claims);
    let deadline = target.deadline;
    let (answer, took) = broker.call(request, deadline).await;
    let slack = Duration::from_millis(500);
    let in_time = took <= deadline + slack
        && match &answer {
            Ok(_) => true,
            Err(status) => status.code() == Code::DeadlineExceeded,
        };
    report.checks.push(Check {
        name: "deadline".into(),
        expected: format!(
            "an answer within the {} deadline (+{} slack): the evidence, or DeadlineExceeded",
            humantime::format_duration(deadline),
            humantime::format_duration(slack)
        ),
        got: format!("{} after {} ms", said(&answer), took.as_millis()),
        pass: Some(in_time),
    });
    Ok(report)
}
