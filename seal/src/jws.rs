//! JWS compact tokens (RFC 7515) signed with a participant's certificate
//! key, with the certificate chain in the `x5c` header: whoever holds the
//! trust domain's CA certificate and revocation list checks who signed,
//! without any key distribution of its own. ES256 for P-256 keys, EdDSA for
//! Ed25519 keys (the two key types `onceonly-certs` issues).
//!
//! Signatures are ring's with the key pair parsed once per signer
//! (jsonwebtoken parses the PKCS#8 key again for every token, which cost
//! about half of each signature); verification and its claim checks are
//! jsonwebtoken's (a well-kept JOSE crate on ring), so every token this
//! module signs is read back by an independent JWS implementation.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use onceonly_certs::{IdentityVerifier, Participant, Role};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};

/// Why a token was not accepted (or could not be made).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum JwsError {
    /// Not a JWS compact token, or its parts do not decode.
    #[error("not a well-formed JWS: {0}")]
    Malformed(String),
    /// The `typ` header names another kind of token.
    #[error("the token is of type {found:?}, expected {expected:?}")]
    WrongType {
        /// What was expected.
        expected: String,
        /// What the header says.
        found: String,
    },
    /// The signer's certificate does not verify against the trust domain
    /// (not issued by its CA, expired, revoked).
    #[error("the signer's certificate is refused: {0}")]
    SignerRefused(String),
    /// The signer is a participant of another role than expected.
    #[error("signed by {signer}, but only a participant of role {expected} may sign this")]
    WrongSigner {
        /// Who signed.
        signer: String,
        /// The role that may.
        expected: Role,
    },
    /// The signature does not verify under the certificate's key.
    #[error("the signature does not verify under the signer's certificate")]
    BadSignature,
    /// The token's `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// A key or certificate cannot sign (unsupported key type, unreadable).
    #[error("cannot sign: {0}")]
    Key(String),
}

/// Signs tokens as one participant: its certificate chain and key.
pub struct Signer {
    participant: Participant,
    algorithm: Algorithm,
    key: KeyPair,
    rng: ring::rand::SystemRandom,
    x5c: Vec<String>,
}

/// A private key parsed once, for every signature after.
enum KeyPair {
    Ecdsa(ring::signature::EcdsaKeyPair),
    Ed25519(ring::signature::Ed25519KeyPair),
}

/// A token's protected header (RFC 7515 section 4.1).
#[derive(Serialize)]
struct ProtectedHeader<'a> {
    typ: &'a str,
    alg: Algorithm,
    x5c: &'a [String],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("participant", &self.participant)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from a participant's certificate (PEM chain, leaf first)
    /// and PKCS#8 key (PEM): the files its TLS configuration names.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, JwsError> {
        use rustls_pki_types::pem::PemObject;
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| JwsError::Key(format!("{}: {e}", cert.display())))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| JwsError::Key(format!("{}: {e}", key.display())))?;
        Self::new(&chain, &key)
    }

    /// A signer from a chain (leaf first) and the leaf's private key.
    pub fn new(chain: &[CertificateDer<'_>], key: &PrivateKeyDer<'_>) -> Result<Self, JwsError> {
        let leaf = chain
            .first()
            .ok_or_else(|| JwsError::Key("the certificate file holds no certificate".into()))?;
        let participant = Participant::from_certificate(leaf)
            .map_err(|e| JwsError::Key(format!("the certificate names no participant: {e}")))?;
        let (algorithm, _) = public_key(leaf)?;
        let PrivateKeyDer::Pkcs8(pkcs8) = key else {
            return Err(JwsError::Key(
                "the private key is not PKCS#8 (onceonly-certs writes PKCS#8)".into(),
            ));
        };
        let rng = ring::rand::SystemRandom::new();
        let der = pkcs8.secret_pkcs8_der();
        let key = match algorithm {
            Algorithm::ES256 => ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                der,
                &rng,
            )
            .map(KeyPair::Ecdsa),
            _ => ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                .map(KeyPair::Ed25519),
        }
        .map_err(|e| JwsError::Key(format!("the private key does not parse: {e}")))?;
        let signer = Signer {
            participant,
            algorithm,
            key,
            rng,
            x5c: chain.iter().map(|c| STANDARD.encode(c.as_ref())).collect(),
        };
        // A key that does not belong to the certificate would sign tokens
        // nobody accepts: find out now, by verifying one under the
        // certificate's key.
        let token = signer.sign("onceonly-self-check", &serde_json::json!({}))?;
        let (_, decoding) = public_key(leaf)?;
        let mut validation = Validation::new(algorithm);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims = Default::default();
        jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation).map_err(|e| {
            JwsError::Key(format!(
                "the private key does not belong to the certificate ({e})"
            ))
        })?;
        Ok(signer)
    }

    /// Whose tokens these are.
    pub fn participant(&self) -> &Participant {
        &self.participant
    }

    /// Signs `claims` as a token of type `typ`.
    pub fn sign<C: Serialize>(&self, typ: &str, claims: &C) -> Result<String, JwsError> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = serde_json::to_vec(&ProtectedHeader {
            typ,
            alg: self.algorithm,
            x5c: &self.x5c,
        })
        .map_err(|e| JwsError::Key(e.to_string()))?;
        let claims = serde_json::to_vec(claims).map_err(|e| JwsError::Key(e.to_string()))?;
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(claims, &mut token);
        let signature = match &self.key {
            KeyPair::Ecdsa(key) => key
                .sign(&self.rng, token.as_bytes())
                .map_err(|_| JwsError::Key("the ECDSA signature failed".into()))?,
            KeyPair::Ed25519(key) => key.sign(token.as_bytes()),
        };
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut token);
        Ok(token)
    }
}

/// A token whose signature and signer were verified.
#[derive(Debug, Clone)]
pub struct Verified<C> {
    /// Its claims.
    pub claims: C,
    /// Who signed it (a certificate of the trust domain, of the role asked).
    pub signer: Participant,
}

/// How a token's times are checked.
#[derive(Debug, Clone, Copy)]
pub struct TimeRule {
    /// Whether the token must carry `exp` and be refused after it.
    pub require_exp: bool,
    /// Clock skew tolerated, seconds.
    pub leeway_secs: u64,
}

/// Verifies `token`: its type, the signer's chain against `trust` (CA,
/// validity, revocation), the signer's role, the signature, and the times.
pub fn verify<C: DeserializeOwned>(
    token: &str,
    typ: &str,
    trust: &IdentityVerifier,
    role: Role,
    times: TimeRule,
) -> Result<Verified<C>, JwsError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| JwsError::Malformed(e.to_string()))?;
    let found = header.typ.clone().unwrap_or_default();
    if found != typ {
        return Err(JwsError::WrongType {
            expected: typ.to_owned(),
            found,
        });
    }
    let chain: Vec<CertificateDer<'static>> = header
        .x5c
        .unwrap_or_default()
        .iter()
        .map(|c| STANDARD.decode(c).map(CertificateDer::from))
        .collect::<Result<_, _>>()
        .map_err(|e| JwsError::Malformed(format!("x5c: {e}")))?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(JwsError::Malformed(
            "no x5c header: the signer's certificate is missing".into(),
        ));
    };
    let signer = trust
        .verify_signer(leaf, intermediates)
        .map_err(|e| JwsError::SignerRefused(e.to_string()))?;
    if signer.role() != role {
        return Err(JwsError::WrongSigner {
            signer: signer.spiffe_id(),
            expected: role,
        });
    }
    let (algorithm, key) = public_key(leaf)?;
    if header.alg != algorithm {
        return Err(JwsError::Malformed(format!(
            "alg {:?} does not fit the signer's key ({algorithm:?})",
            header.alg
        )));
    }
    let mut validation = Validation::new(algorithm);
    validation.validate_aud = false;
    validation.validate_nbf = false;
    validation.validate_exp = times.require_exp;
    validation.leeway = times.leeway_secs;
    validation.required_spec_claims = if times.require_exp {
        ["exp".to_owned()].into()
    } else {
        Default::default()
    };
    let data = jsonwebtoken::decode::<C>(token, &key, &validation).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        match e.kind() {
            ErrorKind::ExpiredSignature => JwsError::Expired,
            ErrorKind::InvalidSignature => JwsError::BadSignature,
            _ => JwsError::Malformed(e.to_string()),
        }
    })?;
    Ok(Verified {
        claims: data.claims,
        signer,
    })
}

/// The JWS algorithm and verification key of a certificate's public key.
fn public_key(leaf: &CertificateDer<'_>) -> Result<(Algorithm, DecodingKey), JwsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| JwsError::Key(format!("not a certificate: {e}")))?;
    let spki = cert.public_key();
    let raw = &spki.subject_public_key.data;
    if spki.algorithm.algorithm == OID_SIG_ED25519 {
        return Ok((Algorithm::EdDSA, DecodingKey::from_ed_der(raw)));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == Some(OID_EC_P256) {
        return Ok((Algorithm::ES256, DecodingKey::from_ec_der(raw)));
    }
    Err(JwsError::Key(format!(
        "unsupported key type {} (P-256 or Ed25519 only)",
        spki.algorithm.algorithm
    )))
}

/// A [`Signer`] read from a participant's certificate and key files, read
/// again when the TLS configuration it belongs to was reloaded (its
/// generation moved), so a rotated certificate signs from the next token on.
#[derive(Debug)]
pub struct SignerCell {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    current: std::sync::Mutex<(u64, std::sync::Arc<Signer>)>,
}

impl SignerCell {
    /// Loads the signer now (so a key that cannot sign stops the start).
    pub fn load(cert: &Path, key: &Path, generation: u64) -> Result<Self, JwsError> {
        let signer = Signer::from_files(cert, key)?;
        Ok(SignerCell {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: std::sync::Mutex::new((generation, std::sync::Arc::new(signer))),
        })
    }

    /// The signer for TLS generation `generation`: the one loaded, or read
    /// anew where the generation moved (kept as it was where the new files
    /// cannot sign, logged by the caller).
    pub fn get(&self, generation: u64) -> Result<std::sync::Arc<Signer>, JwsError> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.0 != generation {
            let signer = Signer::from_files(&self.cert, &self.key)?;
            *current = (generation, std::sync::Arc::new(signer));
        }
        Ok(current.1.clone())
    }
}
