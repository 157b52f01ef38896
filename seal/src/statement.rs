//! The register's signed statement about a piece of evidence: a JWS the
//! connector signs with its certificate key, binding the digest of the
//! bytes it sends (the payload, or the ciphertext where encrypted) to the
//! exchange, the requester, the subject and the evidence type. The evidence
//! travels beside it, so the token is a detached signature in effect: the
//! broker checks it and passes it on unchanged, the authority checks it
//! against the trust domain's CA, and the audit record keeps its digest.
//!
//! Claims (`typ` header `onceonly-evidence+jwt`):
//!
//! | claim | meaning |
//! | --- | --- |
//! | `iss` | the connector's SPIFFE id |
//! | `sub` | the requesting authority's SPIFFE id |
//! | `iat` | when the register issued the evidence, Unix seconds |
//! | `xid` | the exchange id |
//! | `evt` | the evidence type |
//! | `sbh` | the subject hash ([`crate::subject_hash`]) |
//! | `med` | the media type of the (plaintext) payload |
//! | `prm` | the parameters' hash ([`crate::parameters_hash`]), or absent |
//! | `dig` | SHA-256 (base64url) of the bytes carried |
//! | `enc` | where encrypted: `{"rcf": recipient certificate SHA-256, "ek": the HPKE encapsulated key, "suite": ...}` |
//! | `non` | the nonce of the authority's signed request, or absent where it sent none |
//! | `rqd` | the authority's signed request's digest ([`crate::request::signed_digest`]), or absent |

use onceonly_certs::{IdentityVerifier, Role};
use serde::{Deserialize, Serialize};

use crate::jws::{self, JwsError, Signer, TimeRule, Verified};

/// The `typ` header of a statement.
pub const STATEMENT_TYPE: &str = "onceonly-evidence+jwt";

/// What a register states about the evidence it issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementClaims {
    /// The connector's SPIFFE id.
    pub iss: String,
    /// The requesting authority's SPIFFE id.
    pub sub: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// The exchange id.
    pub xid: String,
    /// The evidence type.
    pub evt: String,
    /// The subject hash.
    pub sbh: String,
    /// The media type of the plaintext payload.
    pub med: String,
    /// The hash of the evidence-type parameters asked with.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prm: String,
    /// SHA-256 (base64url) of the bytes carried.
    pub dig: String,
    /// Where the payload is encrypted to the requester.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enc: Option<EncryptionClaims>,
    /// The nonce of the authority's signed request this answers.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub non: String,
    /// That signed request's digest ([`crate::request::signed_digest`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rqd: String,
}

/// How the payload was encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionClaims {
    /// SHA-256 (base64url) of the recipient's encryption certificate (DER).
    pub rcf: String,
    /// The HPKE encapsulated key, base64url.
    pub ek: String,
    /// The HPKE suite, [`crate::encryption::SUITE`].
    pub suite: String,
}

impl StatementClaims {
    /// Signs the claims as a statement.
    pub fn sign(&self, signer: &Signer) -> Result<String, JwsError> {
        signer.sign(STATEMENT_TYPE, self)
    }

    /// Verifies a statement: signed by a connector certificate of the trust
    /// domain (chain, validity, revocation, signature), and `iss` naming
    /// the signer.
    pub fn verify(
        token: &str,
        trust: &IdentityVerifier,
    ) -> Result<Verified<StatementClaims>, JwsError> {
        let verified = jws::verify::<StatementClaims>(
            token,
            STATEMENT_TYPE,
            trust,
            Role::Connector,
            TimeRule {
                require_exp: false,
                leeway_secs: 0,
            },
        )?;
        if verified.claims.iss != verified.signer.spiffe_id() {
            return Err(JwsError::WrongSigner {
                signer: verified.signer.spiffe_id(),
                expected: Role::Connector,
            });
        }
        Ok(verified)
    }
}
