//! What an authority does with the evidence it receives, and what the broker
//! checks before passing it on: the register's statement verifies against
//! the trust domain's CA, it is bound to this exchange, requester, subject
//! and evidence type, the digest matches the bytes carried; then, where
//! encrypted, the payload is decrypted with the authority's key. Every
//! failure names the check that failed.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use onceonly_certs::{IdentityVerifier, Participant};
use onceonly_proto::v1::{Evidence, SubjectIdScheme};

use crate::encryption::{Context, DecryptionKey, RecipientError};
use crate::jws::JwsError;
use crate::request::{LEEWAY_SECS, RequestBinding};
use crate::statement::StatementClaims;

/// How far a register's clock may lag the authority's before evidence
/// looks issued before the request it answers (the nonce binds it anyway;
/// this refuses only what is plainly older).
pub const STATEMENT_SKEW_SECS: i64 = 30;

/// What the evidence must be bound to.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The exchange id the broker answered with.
    pub exchange_id: &'a str,
    /// The evidence type asked for.
    pub evidence_type: &'a str,
    /// The subject asked about.
    pub subject_scheme: SubjectIdScheme,
    /// Its identifier.
    pub subject_value: &'a str,
    /// The requester's SPIFFE id.
    pub requester: &'a str,
    /// The evidence-type parameters asked with, where to check them.
    pub parameters: Option<&'a std::collections::HashMap<String, String>>,
    /// The connector id the caller expects to have signed (its own mapping
    /// of evidence type to register, not the broker's say), where it pins
    /// one; otherwise any connector of the trust domain, as the envelope
    /// names it.
    pub connector: Option<&'a str>,
    /// Whether the request named an encryption certificate: then evidence
    /// in clear is refused, whoever sent it.
    pub encrypted: bool,
    /// The signed request this answers, where the authority signed one
    /// ([`crate::SignedRequest::binding`]): the statement must name its
    /// nonce and digest, and be issued after it.
    pub request: Option<RequestBinding<'a>>,
}

/// Why evidence was not accepted; each names the check that failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// No register statement came with the evidence.
    #[error("check signature: the evidence carries no register statement (register_jws)")]
    NoStatement,
    /// The statement's signature or signer does not verify.
    #[error("check signature: {0}")]
    Signature(JwsError),
    /// The statement names another exchange, requester, subject, type or
    /// connector than expected.
    #[error("check binding: the register's statement names another {field}")]
    Binding {
        /// Which binding.
        field: &'static str,
    },
    /// The bytes carried are not the ones the register signed.
    #[error("check digest: the {what} is not the one the register signed (SHA-256 differs)")]
    Digest {
        /// Payload or ciphertext.
        what: &'static str,
    },
    /// Encrypted where clear was expected, or the other way round.
    #[error("check encryption: {0}")]
    Encryption(String),
    /// Decryption failed.
    #[error("check decryption: {0}")]
    Decrypt(RecipientError),
    /// Issued too long ago (or ahead of this clock) to be the answer to a
    /// request now, or before the request it claims to answer.
    #[error("check freshness: {0}")]
    Stale(String),
}

/// Evidence whose every check passed.
#[derive(Debug, Clone)]
pub struct OpenedEvidence {
    /// The payload, decrypted where it was encrypted.
    pub payload: Vec<u8>,
    /// Its media type.
    pub media_type: String,
    /// The connector that signed it.
    pub connector: Participant,
    /// When the register issued it, Unix seconds.
    pub issued_at: i64,
    /// Whether it travelled encrypted.
    pub was_encrypted: bool,
    /// The statement's claims.
    pub statement: StatementClaims,
}

/// Verifies the register's statement on `evidence` and its binding to
/// `expected`, and the digest of the bytes carried: what both the broker
/// and the authority check. Returns the claims and the signer.
pub fn check_statement(
    evidence: &Evidence,
    trust: &IdentityVerifier,
    expected: &Expected<'_>,
) -> Result<(StatementClaims, Participant), OpenError> {
    if evidence.register_jws.is_empty() {
        return Err(OpenError::NoStatement);
    }
    let verified =
        StatementClaims::verify(&evidence.register_jws, trust).map_err(OpenError::Signature)?;
    let claims = verified.claims;
    let subject_hash = crate::subject_hash(
        expected.exchange_id,
        expected.subject_scheme,
        expected.subject_value,
    );
    for (field, stated, wanted) in [
        ("exchange (xid)", claims.xid.as_str(), expected.exchange_id),
        ("requester (sub)", &claims.sub, expected.requester),
        ("evidence type (evt)", &claims.evt, expected.evidence_type),
        ("subject (sbh)", &claims.sbh, &subject_hash),
        (
            "evidence type than the envelope",
            &claims.evt,
            &evidence.evidence_type,
        ),
        (
            "media type than the envelope",
            &claims.med,
            &evidence.media_type,
        ),
        (
            "connector than the envelope",
            verified.signer.id(),
            &evidence.connector_id,
        ),
    ] {
        if stated != wanted {
            return Err(OpenError::Binding { field });
        }
    }
    if let Some(parameters) = expected.parameters
        && claims.prm != crate::parameters_hash(parameters)
    {
        return Err(OpenError::Binding {
            field: "parameters (prm)",
        });
    }
    if let Some(request) = expected.request {
        if claims.non != request.nonce {
            return Err(OpenError::Binding {
                field: "request nonce (non)",
            });
        }
        if claims.rqd != request.digest {
            return Err(OpenError::Binding {
                field: "signed request (rqd)",
            });
        }
        if claims.iat < request.issued_at.saturating_sub(STATEMENT_SKEW_SECS) {
            return Err(OpenError::Stale(format!(
                "the register issued it at {}, before the request was signed at {}",
                claims.iat, request.issued_at
            )));
        }
    }
    if let Some(connector) = expected.connector
        && verified.signer.id() != connector
    {
        return Err(OpenError::Binding {
            field: "connector than the one expected for this evidence type",
        });
    }
    match (&claims.enc, &evidence.encrypted_payload) {
        (None, None) if expected.encrypted => {
            return Err(OpenError::Encryption(
                "the evidence came in clear, though the request asked for it encrypted".into(),
            ));
        }
        (None, None) => {
            if claims.dig != crate::digest_b64(&evidence.payload) {
                return Err(OpenError::Digest { what: "payload" });
            }
        }
        (Some(enc), Some(sealed)) => {
            if claims.dig != crate::digest_b64(&sealed.ciphertext) {
                return Err(OpenError::Digest { what: "ciphertext" });
            }
            if enc.ek != URL_SAFE_NO_PAD.encode(&sealed.encapsulated_key) {
                return Err(OpenError::Digest {
                    what: "encapsulated key",
                });
            }
            if enc.rcf != URL_SAFE_NO_PAD.encode(&sealed.recipient_certificate_sha256) {
                return Err(OpenError::Binding {
                    field: "recipient certificate (enc.rcf)",
                });
            }
            if !evidence.payload.is_empty() {
                return Err(OpenError::Encryption(
                    "an encrypted piece of evidence also carries a clear payload".into(),
                ));
            }
        }
        (Some(_), None) => {
            return Err(OpenError::Encryption(
                "the register encrypted the payload, but the ciphertext is missing".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(OpenError::Encryption(
                "a ciphertext came that the register did not sign as encrypted".into(),
            ));
        }
    }
    Ok((claims, verified.signer))
}

/// The authority's side: checks evidence against the trust domain and its
/// request, and decrypts it.
#[derive(Debug)]
pub struct EvidenceOpener {
    trust: Arc<IdentityVerifier>,
    key: Option<DecryptionKey>,
    max_age: Duration,
}

/// How old evidence an [`EvidenceOpener`] accepts unless told otherwise.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(600);

impl EvidenceOpener {
    /// Checks against `trust` (the trust domain's CA and CRL, e.g.
    /// [`onceonly_certs::tls::identity_verifier`]); `key` decrypts evidence
    /// encrypted to this authority.
    pub fn new(trust: Arc<IdentityVerifier>, key: Option<DecryptionKey>) -> Self {
        EvidenceOpener {
            trust,
            key,
            max_age: DEFAULT_MAX_AGE,
        }
    }

    /// Accepts evidence the register issued at most `max_age` ago
    /// (default [`DEFAULT_MAX_AGE`]): older evidence is not taken as the
    /// answer to a request made now, whatever else it is bound to.
    pub fn with_max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// Verifies, checks the binding, and decrypts `evidence`.
    pub fn open(
        &self,
        evidence: &Evidence,
        expected: &Expected<'_>,
    ) -> Result<OpenedEvidence, OpenError> {
        let (statement, connector) = check_statement(evidence, &self.trust, expected)?;
        let now = crate::unix_now();
        let max_age = i64::try_from(self.max_age.as_secs()).unwrap_or(i64::MAX);
        if statement.iat > now.saturating_add(LEEWAY_SECS) {
            return Err(OpenError::Stale(format!(
                "the register says it issued it at {}, ahead of this clock ({now})",
                statement.iat
            )));
        }
        if now.saturating_sub(statement.iat) > max_age {
            return Err(OpenError::Stale(format!(
                "the register issued it at {}, {} s ago, more than the {max_age} s accepted",
                statement.iat,
                now.saturating_sub(statement.iat)
            )));
        }
        let payload = match &evidence.encrypted_payload {
            None => evidence.payload.clone(),
            Some(sealed) => {
                let key = self.key.as_ref().ok_or_else(|| {
                    OpenError::Encryption(
                        "the evidence is encrypted, and this opener has no decryption key".into(),
                    )
                })?;
                if statement.enc.as_ref().map(|e| e.rcf.as_str()) != Some(key.fingerprint()) {
                    return Err(OpenError::Encryption(
                        "the evidence is encrypted to another certificate than this key's".into(),
                    ));
                }
                key.open(
                    &Context {
                        exchange_id: expected.exchange_id,
                        evidence_type: expected.evidence_type,
                        requester: expected.requester,
                        media_type: &evidence.media_type,
                    },
                    &sealed.encapsulated_key,
                    &sealed.ciphertext,
                )
                .map_err(OpenError::Decrypt)?
            }
        };
        Ok(OpenedEvidence {
            payload,
            media_type: evidence.media_type.clone(),
            connector,
            issued_at: statement.iat,
            was_encrypted: evidence.encrypted_payload.is_some(),
            statement,
        })
    }
}
