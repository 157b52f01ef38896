//! The broker's authorization ticket: a JWT (RFC 7519) the broker signs for
//! every request it forwards, binding what its policy decided. The
//! connector verifies it before any register code runs: signed by the
//! broker certificate of the trust domain it serves, addressed to this
//! connector, not expired, every field equal to the request's, and not seen
//! before within its lifetime. A holder of a broker certificate who skips
//! the policy gets no ticket, so no evidence.
//!
//! Claims (`typ` header `onceonly-ticket+jwt`):
//!
//! | claim | meaning |
//! | --- | --- |
//! | `iss` | the broker's SPIFFE id |
//! | `aud` | the connector's SPIFFE id |
//! | `sub` | the requesting authority's SPIFFE id |
//! | `jti` | unique per forwarded attempt (replay key) |
//! | `iat`, `exp` | issue and expiry, Unix seconds |
//! | `xid` | the exchange id |
//! | `evt` | the evidence type |
//! | `sbh` | the subject hash ([`crate::subject_hash`]) |
//! | `pur`, `lgb` | purpose and legal basis |
//! | `jur` | the jurisdiction asked for, or absent |
//! | `prm` | the parameters' hash ([`crate::parameters_hash`]), or absent |
//! | `rul` | the id of the policy rule that allowed it |
//! | `cid` | the consent that covered it, where one was needed |
//! | `ecf` | SHA-256 (base64url) of the encryption certificate named, or absent |
//! | `req` | the authority's signed request ([`crate::request`]), or absent where it sent none |

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use onceonly_certs::{IdentityVerifier, Role};
use onceonly_proto::v1::ProvideEvidenceRequest;
use serde::{Deserialize, Serialize};

use crate::jws::{self, JwsError, Signer, TimeRule};

/// The `typ` header of a ticket.
pub const TICKET_TYPE: &str = "onceonly-ticket+jwt";

/// The longest lifetime a connector accepts (`exp - iat`): a ticket is for
/// one forward, within one deadline.
pub const MAX_LIFETIME_SECS: i64 = 300;

/// Clock skew tolerated between broker and connector.
pub const LEEWAY_SECS: u64 = 5;

/// Tickets a connector remembers at most (each until it expires): more at
/// once than a connector can have been sent within a ticket's lifetime is
/// refused rather than grown without bound.
pub const MAX_REMEMBERED: usize = 1_000_000;

/// What a ticket says. See the module docs for each claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketClaims {
    /// The broker's SPIFFE id.
    pub iss: String,
    /// The connector's SPIFFE id.
    pub aud: String,
    /// The requesting authority's SPIFFE id.
    pub sub: String,
    /// Unique per forwarded attempt.
    pub jti: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    /// The exchange id.
    pub xid: String,
    /// The evidence type.
    pub evt: String,
    /// The subject hash.
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
    /// The policy rule that allowed the request.
    pub rul: String,
    /// The consent that covered it, where one was needed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cid: String,
    /// The encryption certificate's SHA-256 (base64url), where encryption
    /// was asked for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ecf: String,
    /// The authority's signed request, as it came; checked by the connector
    /// ([`crate::request::verify_request`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub req: String,
}

impl TicketClaims {
    /// The claims of a ticket for `request` as broker `issuer` forwards it
    /// under policy rule `rule` and consent `consent` ("" where none was
    /// needed): every field the connector compares with the request, from
    /// the request itself. `aud`, `jti`, `iat` and `exp` are each attempt's
    /// to set.
    pub fn for_request(
        request: &ProvideEvidenceRequest,
        issuer: String,
        rule: String,
        consent: String,
    ) -> Self {
        let subject = request.subject.clone().unwrap_or_default();
        TicketClaims {
            iss: issuer,
            aud: String::new(),
            sub: request.requester_id.clone(),
            jti: String::new(),
            iat: 0,
            exp: 0,
            xid: request.exchange_id.clone(),
            evt: request.evidence_type.clone(),
            sbh: crate::subject_hash(&request.exchange_id, subject.scheme(), &subject.value),
            pur: request.purpose.clone(),
            lgb: request.legal_basis.clone(),
            jur: request.jurisdiction.clone(),
            prm: crate::parameters_hash(&request.parameters),
            rul: rule,
            cid: consent,
            ecf: crate::certificate_fingerprint(&request.encryption_certificate),
            req: String::new(),
        }
    }

    /// Signs the claims as a ticket.
    pub fn sign(&self, signer: &Signer) -> Result<String, JwsError> {
        signer.sign(TICKET_TYPE, self)
    }
}

/// Why a connector refused a ticket.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TicketError {
    /// The request carries no ticket.
    #[error("the request carries no authorization ticket")]
    Missing,
    /// Signature, signer or format.
    #[error("the authorization ticket is refused: {0}")]
    Invalid(JwsError),
    /// Signed by a broker, but not the one this connector serves.
    #[error(
        "the authorization ticket was issued by {found}, not by the broker this connector serves ({expected})"
    )]
    WrongIssuer {
        /// The broker served.
        expected: String,
        /// Who issued it.
        found: String,
    },
    /// Past its `exp`, or valid for longer than a ticket may be.
    #[error("the authorization ticket has expired ({0})")]
    Expired(String),
    /// Already used within its lifetime.
    #[error("the authorization ticket {jti} was used before")]
    Replayed {
        /// Its id.
        jti: String,
    },
    /// The connector remembers as many tickets as it may; try later.
    #[error("the connector remembers {0} unexpired tickets and accepts no more until some expire")]
    TooMany(usize),
    /// A field differs from the request's.
    #[error("the authorization ticket does not match the request: its {field} differs")]
    Mismatch {
        /// Which claim.
        field: &'static str,
    },
}

/// What the request a ticket comes with says; the ticket must say the same.
#[derive(Debug, Clone)]
pub struct TicketExpectation<'a> {
    /// This connector's SPIFFE id.
    pub audience: &'a str,
    /// The exchange id.
    pub exchange_id: &'a str,
    /// The requester's SPIFFE id.
    pub requester: &'a str,
    /// The evidence type.
    pub evidence_type: &'a str,
    /// The subject hash of the request's subject.
    pub subject_hash: &'a str,
    /// Purpose.
    pub purpose: &'a str,
    /// Legal basis.
    pub legal_basis: &'a str,
    /// Jurisdiction, or "".
    pub jurisdiction: &'a str,
    /// The parameters' hash, or "".
    pub parameters: &'a str,
    /// SHA-256 (base64url) of the encryption certificate, or "".
    pub encryption_certificate: &'a str,
}

/// Verifies tickets for one connector, remembering the ones it accepted
/// until they expire.
#[derive(Debug)]
pub struct TicketVerifier {
    broker: String,
    seen: Mutex<Seen>,
}

/// The tickets accepted and not yet expired: a set to look a `jti` up, and
/// the same ids ordered by expiry, so forgetting the expired ones costs
/// only what is forgotten (a sweep over every remembered ticket on every
/// call made the connector's cost grow with its throughput).
#[derive(Debug, Default)]
struct Seen {
    jtis: HashSet<String>,
    by_expiry: BTreeMap<i64, Vec<String>>,
    /// The latest `now` tickets were forgotten at: a ticket that expired
    /// by then may have been forgotten, so it is refused as expired even
    /// where a caller's clock reads earlier (another thread's call, or a
    /// clock stepped back).
    swept: i64,
}

impl Seen {
    /// Forgets every ticket whose `exp` plus the leeway is before `now`.
    fn forget_expired(&mut self, now: i64, leeway: i64) {
        self.swept = self.swept.max(now);
        let now = self.swept;
        while let Some(entry) = self.by_expiry.first_entry() {
            if entry.key().saturating_add(leeway) >= now {
                break;
            }
            for jti in entry.remove() {
                self.jtis.remove(&jti);
            }
        }
    }
}

impl TicketVerifier {
    /// Accepts tickets from the broker with SPIFFE id `broker`.
    pub fn new(broker: &str) -> Self {
        TicketVerifier {
            broker: broker.to_owned(),
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Verifies `token` against the request described by `expected`, at
    /// `now` (Unix seconds), with `trust` checking the signer's certificate.
    /// An accepted ticket is remembered: the same one again is a replay.
    pub fn verify(
        &self,
        token: &str,
        trust: &IdentityVerifier,
        expected: &TicketExpectation<'_>,
        now: i64,
    ) -> Result<TicketClaims, TicketError> {
        if token.is_empty() {
            return Err(TicketError::Missing);
        }
        let verified = jws::verify::<TicketClaims>(
            token,
            TICKET_TYPE,
            trust,
            Role::Broker,
            TimeRule {
                require_exp: true,
                leeway_secs: LEEWAY_SECS,
            },
        )
        .map_err(|e| match e {
            JwsError::Expired => TicketError::Expired(format!("past its exp (now {now})")),
            other => TicketError::Invalid(other),
        })?;
        let claims = verified.claims;
        if verified.signer.spiffe_id() != self.broker || claims.iss != self.broker {
            return Err(TicketError::WrongIssuer {
                expected: self.broker.clone(),
                found: verified.signer.spiffe_id(),
            });
        }
        let leeway = i64::try_from(LEEWAY_SECS).unwrap_or(0);
        let lifetime = claims.exp.saturating_sub(claims.iat);
        if !(0..=MAX_LIFETIME_SECS).contains(&lifetime) {
            return Err(TicketError::Expired(format!(
                "valid for {lifetime} s (iat {}, exp {}), not within the 0 to {MAX_LIFETIME_SECS} s a ticket may be",
                claims.iat, claims.exp
            )));
        }
        if claims.iat > now.saturating_add(leeway) {
            return Err(TicketError::Expired(format!(
                "issued in the future (iat {}, now {now}): the broker's and the connector's clocks differ by more than {LEEWAY_SECS} s",
                claims.iat
            )));
        }
        for (field, ticket, request) in [
            ("aud", &claims.aud, expected.audience),
            ("xid (exchange id)", &claims.xid, expected.exchange_id),
            ("sub (requester)", &claims.sub, expected.requester),
            ("evt (evidence type)", &claims.evt, expected.evidence_type),
            ("sbh (subject)", &claims.sbh, expected.subject_hash),
            ("pur (purpose)", &claims.pur, expected.purpose),
            ("lgb (legal basis)", &claims.lgb, expected.legal_basis),
            ("jur (jurisdiction)", &claims.jur, expected.jurisdiction),
            ("prm (parameters)", &claims.prm, expected.parameters),
            (
                "ecf (encryption certificate)",
                &claims.ecf,
                expected.encryption_certificate,
            ),
        ] {
            if ticket != request {
                return Err(TicketError::Mismatch { field });
            }
        }
        self.remember(&claims, now)?;
        Ok(claims)
    }

    fn remember(&self, claims: &TicketClaims, now: i64) -> Result<(), TicketError> {
        let leeway = i64::try_from(LEEWAY_SECS).unwrap_or(0);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.forget_expired(now, leeway);
        if claims.exp.saturating_add(leeway) < seen.swept {
            return Err(TicketError::Expired(format!(
                "past its exp {} (tickets that expired by {} are no longer remembered)",
                claims.exp, seen.swept
            )));
        }
        if seen.jtis.contains(&claims.jti) {
            return Err(TicketError::Replayed {
                jti: claims.jti.clone(),
            });
        }
        if seen.jtis.len() >= MAX_REMEMBERED {
            return Err(TicketError::TooMany(MAX_REMEMBERED));
        }
        seen.jtis.insert(claims.jti.clone());
        seen.by_expiry
            .entry(claims.exp)
            .or_default()
            .push(claims.jti.clone());
        Ok(())
    }

    /// Tickets remembered now.
    pub fn remembered(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .jtis
            .len()
    }
}
