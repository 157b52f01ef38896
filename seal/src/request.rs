//! The authority's signed request: a JWT (RFC 7519) the requesting
//! authority signs with its certificate key for every evidence request, so
//! that no one between it and the register (the broker and its operator
//! included) can make up a request, alter one, or pass old evidence off as
//! the answer to a new one.
//!
//! - The broker verifies it before anything else and records its digest.
//! - The broker's ticket carries it (`req`); the connector verifies it
//!   again, checks that it says what the ticket and the request say, and
//!   that its nonce serves one exchange only ([`NonceBook`]).
//! - The register's statement names its nonce (`non`) and digest (`rqd`);
//!   the authority's [`crate::EvidenceOpener`] checks both.
//!
//! Claims (`typ` header `onceonly-request+jwt`):
//!
//! | claim | meaning |
//! | --- | --- |
//! | `iss` | the authority's SPIFFE id (the signer) |
//! | `rid` | the authority's `request_id` |
//! | `non` | a fresh random nonce, base64url, 22 to 64 characters (16 to 48 bytes) |
//! | `iat`, `exp` | issue and expiry, Unix seconds, at most [`MAX_LIFETIME_SECS`] apart |
//! | `evt` | the evidence type |
//! | `sbh` | the subject hash ([`crate::subject_hash`]) salted with `non` |
//! | `pur`, `lgb` | purpose and legal basis |
//! | `jur` | the jurisdiction asked for, or absent |
//! | `prm` | the parameters' hash ([`crate::parameters_hash`]), or absent |
//! | `cid` | the consent id named, or absent |
//! | `ecf` | SHA-256 (base64url) of the encryption certificate named, or absent |

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use onceonly_certs::{IdentityVerifier, Participant, Role};
use onceonly_proto::v1::{ProvideEvidenceRequest, RequestEvidenceRequest, SubjectIdScheme};
use serde::{Deserialize, Serialize};

use crate::jws::{self, JwsError, Signer, TimeRule};

/// The `typ` header of a signed request.
pub const REQUEST_TYPE: &str = "onceonly-request+jwt";

/// The longest lifetime (`exp - iat`) a signed request may claim.
pub const MAX_LIFETIME_SECS: i64 = 600;

/// The lifetime [`sign_request`] gives where the caller does not choose.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(120);

/// Clock skew tolerated between authority, broker and connector.
pub const LEEWAY_SECS: i64 = 5;

/// Random bytes in a nonce [`sign_request`] makes.
const NONCE_BYTES: usize = 18;

/// The shortest nonce accepted (16 bytes in base64url) and the longest.
const NONCE_LEN: std::ops::RangeInclusive<usize> = 22..=64;

/// What an authority signs. See the module docs for each claim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestClaims {
    /// The authority's SPIFFE id.
    pub iss: String,
    /// The authority's request id.
    pub rid: String,
    /// A fresh random nonce.
    pub non: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    /// The evidence type.
    pub evt: String,
    /// The subject hash, salted with the nonce.
    pub sbh: String,
    /// The purpose.
    pub pur: String,
    /// The legal basis.
    pub lgb: String,
    /// The jurisdiction asked for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jur: String,
    /// The hash of the evidence-type parameters.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prm: String,
    /// The consent named.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cid: String,
    /// The encryption certificate's SHA-256 (base64url), where one is named.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ecf: String,
}

impl RequestClaims {
    /// The claims for `request` as `requester` (a SPIFFE id) signs it at
    /// `now`, valid for `lifetime`, with a fresh nonce.
    pub fn for_request(
        request: &RequestEvidenceRequest,
        requester: &str,
        now: i64,
        lifetime: Duration,
    ) -> Result<Self, JwsError> {
        use ring::rand::SecureRandom;
        let mut nonce = [0u8; NONCE_BYTES];
        ring::rand::SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| JwsError::Key("no random bytes for a nonce".into()))?;
        let non = crate::base64_url(&nonce);
        let subject = request.subject.clone().unwrap_or_default();
        let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(MAX_LIFETIME_SECS);
        Ok(RequestClaims {
            iss: requester.to_owned(),
            rid: request.request_id.clone(),
            iat: now,
            exp: now.saturating_add(lifetime.min(MAX_LIFETIME_SECS)),
            evt: request.evidence_type.clone(),
            sbh: crate::subject_hash(&non, subject.scheme(), &subject.value),
            non,
            pur: request.purpose.clone(),
            lgb: request.legal_basis.clone(),
            jur: request.jurisdiction.clone(),
            prm: crate::parameters_hash(&request.parameters),
            cid: request.consent_id.clone(),
            ecf: crate::certificate_fingerprint(&request.encryption_certificate),
        })
    }

    /// The claims an authority would have signed for the request the
    /// broker forwards as `forwarded` (request id `request_id`): what a
    /// test, or the conformance kit playing both authority and broker,
    /// signs.
    pub fn for_forwarded(
        forwarded: &ProvideEvidenceRequest,
        request_id: &str,
        now: i64,
        lifetime: Duration,
    ) -> Result<Self, JwsError> {
        let request = RequestEvidenceRequest {
            request_id: request_id.to_owned(),
            evidence_type: forwarded.evidence_type.clone(),
            subject: forwarded.subject.clone(),
            jurisdiction: forwarded.jurisdiction.clone(),
            purpose: forwarded.purpose.clone(),
            legal_basis: forwarded.legal_basis.clone(),
            parameters: forwarded.parameters.clone(),
            encryption_certificate: forwarded.encryption_certificate.clone(),
            ..Default::default()
        };
        Self::for_request(&request, &forwarded.requester_id, now, lifetime)
    }

    /// The claims of `token` read WITHOUT checking its signature: for a
    /// party reading a token it made itself (or a tool showing one), never
    /// to trust one received ([`verify_request`] does that).
    pub fn read_unverified(token: &str) -> Option<Self> {
        use base64::Engine;
        let claims = token.split('.').nth(1)?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .ok()?;
        serde_json::from_slice(&json).ok()
    }

    /// Signs the claims as a signed request.
    pub fn sign(&self, signer: &Signer) -> Result<String, JwsError> {
        signer.sign(REQUEST_TYPE, self)
    }
}

/// The digest that names a signed request (`rqd`, and the audit record's
/// `signed_request_sha256` in base64url): SHA-256 of what was signed, the
/// token's header and claims (`header.claims`, ASCII) without its
/// signature, so that a signature re-encoded by a party in between (an
/// ECDSA signature has two valid forms) names the same request.
pub fn signed_digest(token: &str) -> String {
    crate::digest_b64(signing_input(token).as_bytes())
}

/// The part of a compact JWS its signature covers: all before the last
/// '.'.
pub fn signing_input(token: &str) -> &str {
    token.rsplit_once('.').map_or(token, |(signed, _)| signed)
}

/// What an authority keeps of a request it signed, to check the answer
/// against ([`SignedRequest::binding`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest {
    /// The token, as sent in `signed_request`.
    pub token: String,
    /// Its nonce.
    pub nonce: String,
    /// Its digest ([`signed_digest`]).
    pub digest: String,
    /// When it was signed, Unix seconds.
    pub issued_at: i64,
}

impl SignedRequest {
    /// What the evidence answering it must be bound to.
    pub fn binding(&self) -> RequestBinding<'_> {
        RequestBinding {
            nonce: &self.nonce,
            digest: &self.digest,
            issued_at: self.issued_at,
        }
    }
}

/// What a register's statement must name of the signed request it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBinding<'a> {
    /// The request's nonce (`non`).
    pub nonce: &'a str,
    /// Its digest ([`signed_digest`], `rqd`).
    pub digest: &'a str,
    /// When the request was signed: evidence issued before cannot answer it.
    pub issued_at: i64,
}

/// Signs `request` as `signer` (an authority's certificate and key), valid
/// for `lifetime` (at most [`MAX_LIFETIME_SECS`]), and puts the token in
/// its `signed_request`. Keep what it returns to open the answer.
pub fn sign_request(
    request: &mut RequestEvidenceRequest,
    signer: &Signer,
    lifetime: Duration,
) -> Result<SignedRequest, JwsError> {
    let claims = RequestClaims::for_request(
        request,
        &signer.participant().spiffe_id(),
        crate::unix_now(),
        lifetime,
    )?;
    let token = claims.sign(signer)?;
    request.signed_request = token.clone();
    Ok(SignedRequest {
        digest: signed_digest(&token),
        token,
        nonce: claims.non,
        issued_at: claims.iat,
    })
}

/// Why a signed request was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// None came where one is required.
    #[error("the request is not signed by the authority (signed_request is empty)")]
    Missing,
    /// Signature, signer or format.
    #[error("the signed request does not verify: {0}")]
    Invalid(JwsError),
    /// Signed by another participant than the one asking.
    #[error("the signed request was signed by {signer}, but the request comes from {requester}")]
    NotTheRequester {
        /// Who signed.
        signer: String,
        /// Who asks.
        requester: String,
    },
    /// Past its `exp`, not yet issued, or valid for too long.
    #[error("the signed request is not valid now: {0}")]
    Expired(String),
    /// A claim differs from the request's field.
    #[error("the signed request does not match the request: its {claim} differs from {field}")]
    Mismatch {
        /// Which claim.
        claim: &'static str,
        /// The request field it repeats.
        field: &'static str,
    },
    /// The nonce answered another exchange already.
    #[error("the signed request's nonce was used for exchange {first} already")]
    Replayed {
        /// The exchange it was used for first.
        first: String,
    },
    /// As many unexpired nonces remembered as allowed.
    #[error("{0} unexpired signed requests are remembered; no more are accepted until some expire")]
    TooMany(usize),
}

/// The fields of the request a signed request must repeat, as the checking
/// party sees them.
#[derive(Debug, Clone, Copy)]
pub struct RequestFields<'a> {
    /// The requester's SPIFFE id (from its certificate, or the ticket's).
    pub requester: &'a str,
    /// The request id, where the checking party knows it (the broker).
    pub request_id: Option<&'a str>,
    /// The evidence type.
    pub evidence_type: &'a str,
    /// The subject's scheme.
    pub subject_scheme: SubjectIdScheme,
    /// The subject's identifier.
    pub subject_value: &'a str,
    /// The purpose.
    pub purpose: &'a str,
    /// The legal basis.
    pub legal_basis: &'a str,
    /// The jurisdiction, or "".
    pub jurisdiction: &'a str,
    /// The parameters' hash, or "".
    pub parameters: &'a str,
    /// The consent id named, where the checking party knows it (the broker).
    pub consent_id: Option<&'a str>,
    /// The encryption certificate's SHA-256 (base64url), or "".
    pub encryption_certificate: &'a str,
}

/// A signed request that verified.
#[derive(Debug, Clone)]
pub struct VerifiedRequest {
    /// Its claims.
    pub claims: RequestClaims,
    /// The authority that signed it.
    pub signer: Participant,
    /// Its digest ([`signed_digest`]).
    pub digest: String,
}

impl VerifiedRequest {
    /// What the evidence answering it must be bound to.
    pub fn binding(&self) -> RequestBinding<'_> {
        RequestBinding {
            nonce: &self.claims.non,
            digest: &self.digest,
            issued_at: self.claims.iat,
        }
    }
}

/// Verifies `token` against `fields` at `now` (Unix seconds): signed by an
/// authority certificate of the trust domain (`trust`: chain, validity,
/// revocation) that is the requester's, valid now, every claim equal to
/// the request's.
pub fn verify_request(
    token: &str,
    trust: &IdentityVerifier,
    fields: &RequestFields<'_>,
    now: i64,
) -> Result<VerifiedRequest, RequestError> {
    if token.is_empty() {
        return Err(RequestError::Missing);
    }
    let verified = jws::verify::<RequestClaims>(
        token,
        REQUEST_TYPE,
        trust,
        Role::Authority,
        TimeRule {
            require_exp: true,
            leeway_secs: LEEWAY_SECS.unsigned_abs(),
        },
    )
    .map_err(|e| match e {
        JwsError::Expired => RequestError::Expired(format!("past its exp (now {now})")),
        other => RequestError::Invalid(other),
    })?;
    let claims = verified.claims;
    let signer = verified.signer.spiffe_id();
    if signer != fields.requester || claims.iss != signer {
        return Err(RequestError::NotTheRequester {
            signer,
            requester: fields.requester.to_owned(),
        });
    }
    let lifetime = claims.exp.saturating_sub(claims.iat);
    if !(0..=MAX_LIFETIME_SECS).contains(&lifetime) {
        return Err(RequestError::Expired(format!(
            "valid for {lifetime} s (iat {}, exp {}), not within the 0 to {MAX_LIFETIME_SECS} s a signed request may be",
            claims.iat, claims.exp
        )));
    }
    if claims.exp.saturating_add(LEEWAY_SECS) < now {
        return Err(RequestError::Expired(format!(
            "expired at {} (now {now})",
            claims.exp
        )));
    }
    if claims.iat > now.saturating_add(LEEWAY_SECS) {
        return Err(RequestError::Expired(format!(
            "issued in the future (iat {}, now {now}): the authority's clock is more than {LEEWAY_SECS} s ahead",
            claims.iat
        )));
    }
    if !NONCE_LEN.contains(&claims.non.len())
        || !claims
            .non
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(RequestError::Invalid(JwsError::Malformed(
            "non: a nonce is 22 to 64 base64url characters (16 to 48 random bytes)".into(),
        )));
    }
    let subject_hash =
        crate::subject_hash(&claims.non, fields.subject_scheme, fields.subject_value);
    let mut pairs = vec![
        (
            "evt",
            "evidence_type",
            claims.evt.as_str(),
            fields.evidence_type,
        ),
        ("sbh", "subject", &claims.sbh, &subject_hash),
        ("pur", "purpose", &claims.pur, fields.purpose),
        ("lgb", "legal_basis", &claims.lgb, fields.legal_basis),
        ("jur", "jurisdiction", &claims.jur, fields.jurisdiction),
        ("prm", "parameters", &claims.prm, fields.parameters),
        (
            "ecf",
            "encryption_certificate",
            &claims.ecf,
            fields.encryption_certificate,
        ),
    ];
    if let Some(request_id) = fields.request_id {
        pairs.push(("rid", "request_id", &claims.rid, request_id));
    }
    if let Some(consent_id) = fields.consent_id {
        pairs.push(("cid", "consent_id", &claims.cid, consent_id));
    }
    for (claim, field, signed, asked) in pairs {
        if signed != asked {
            return Err(RequestError::Mismatch { claim, field });
        }
    }
    Ok(VerifiedRequest {
        claims,
        signer: verified.signer,
        digest: signed_digest(token),
    })
}

/// The nonces of signed requests a connector accepted, each with the
/// exchange it served, until it expires: a signed request answers one
/// exchange (its forward attempts included), so a broker cannot run a
/// second exchange on an authority's one signature.
#[derive(Debug, Default)]
pub struct NonceBook {
    inner: Mutex<Nonces>,
}

#[derive(Debug, Default)]
struct Nonces {
    /// (issuer, nonce) to the exchange it serves.
    exchange_of: HashMap<(String, String), String>,
    by_expiry: BTreeMap<i64, Vec<(String, String)>>,
}

/// The most nonces a book holds at once (as many as tickets the replay
/// cache remembers).
pub const MAX_NONCES: usize = 1_000_000;

impl NonceBook {
    /// Records that `request`'s nonce serves `exchange_id`; Err where it
    /// serves another exchange. Nonces are the signer's own: the key is
    /// issuer and nonce, so one authority cannot use up another's.
    pub fn claim(
        &self,
        request: &RequestClaims,
        exchange_id: &str,
        now: i64,
    ) -> Result<(), RequestError> {
        let key = (request.iss.clone(), request.non.clone());
        let mut book = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(entry) = book.by_expiry.first_entry() {
            if entry.key().saturating_add(LEEWAY_SECS) >= now {
                break;
            }
            for key in entry.remove() {
                book.exchange_of.remove(&key);
            }
        }
        if let Some(first) = book.exchange_of.get(&key) {
            return if first == exchange_id {
                Ok(())
            } else {
                Err(RequestError::Replayed {
                    first: first.clone(),
                })
            };
        }
        if book.exchange_of.len() >= MAX_NONCES {
            return Err(RequestError::TooMany(MAX_NONCES));
        }
        book.exchange_of.insert(key.clone(), exchange_id.to_owned());
        book.by_expiry.entry(request.exp).or_default().push(key);
        Ok(())
    }

    /// Frees `request`'s nonce from `exchange_id`, which ended without
    /// evidence (the register failed or refused): the authority's retry,
    /// under a new exchange, may use the same signed request. Evidence
    /// issued keeps the nonce bound.
    pub fn release(&self, request: &RequestClaims, exchange_id: &str) {
        let key = (request.iss.clone(), request.non.clone());
        let mut book = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if book
            .exchange_of
            .get(&key)
            .is_some_and(|first| first == exchange_id)
        {
            book.exchange_of.remove(&key);
            // Its expiry entry stays, and removes nothing once it is due.
        }
    }
}
