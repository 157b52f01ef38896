//! End-to-end protection of evidence, so that the broker routes evidence
//! but can neither read nor forge it (the NOOTS "abstract authorization"
//! role of an intermediary):
//!
//! - [`request`]: the authority signs each request (a JWT binding what it
//!   asks, with a fresh nonce); the broker and the connector both check
//!   it, so nobody between authority and register can make one up.
//! - [`ticket`]: for every request it forwards, the broker signs a
//!   short-lived authorization ticket (a JWT, RFC 7519, i.e. a JWS, RFC 7515)
//!   binding who asked for what about whom and why, under which policy rule
//!   and consent. The connector verifies it before any register code runs.
//! - [`statement`]: the register's connector signs every piece of evidence
//!   it issues: a JWS over the payload's digest, media type, evidence type,
//!   exchange, requester and subject (the evidence itself stays outside the
//!   token, a detached signature in effect).
//! - [`encryption`]: where asked for (or required by the policy), the
//!   connector encrypts the payload to the requesting authority's encryption
//!   certificate with HPKE (RFC 9180), so the broker carries ciphertext only.
//! - [`opener`]: what an authority runs on what it receives: verify the
//!   register's signature against the trust domain's CA, check the binding
//!   to its request, decrypt.
//!
//! Every token is signed with the key of a participant certificate of the
//! trust domain (the same key its mutual TLS uses), the chain in the JWS
//! `x5c` header, so that any party holding the CA certificate and the
//! revocation list can check who signed; [`jws`] is that common part. The
//! formats are standard: the Python client in the tests checks them with
//! PyJWT, `cryptography` and pyhpke.

pub mod encryption;
pub mod jws;
pub mod opener;
pub mod request;
pub mod statement;
pub mod subject;
pub mod ticket;

pub use encryption::{DecryptionKey, Recipient, RecipientError};
pub use jws::{JwsError, Signer};
pub use opener::{EvidenceOpener, Expected, OpenError, OpenedEvidence};
pub use request::{
    NonceBook, RequestBinding, RequestClaims, RequestError, RequestFields, SignedRequest,
    VerifiedRequest, sign_request, verify_request,
};
pub use statement::StatementClaims;
pub use subject::{parameters_hash, subject_hash};
pub use ticket::{TicketClaims, TicketError, TicketExpectation, TicketVerifier};

/// Seconds since the Unix epoch, now (the clock every crate shares).
pub use onceonly_proto::time::unix_now;

/// SHA-256 of `bytes`, base64url without padding: how every digest in a
/// token is written.
pub fn digest_b64(bytes: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(bytes))
}

/// The SHA-256 (base64url) of an encryption certificate, "" for none: how
/// requests, tickets and statements name one.
pub fn certificate_fingerprint(der: &[u8]) -> String {
    if der.is_empty() {
        String::new()
    } else {
        digest_b64(der)
    }
}

/// `bytes` in base64url without padding.
pub fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
