//! JWS compact tokens (RFC 7515) signed with a participant's certificate
//! key, with the certificate chain in the `x5c` header: whoever holds the
//! trust domain's CA certificate and revocation list checks who signed,
//! without any key distribution of its own. ES256 for P-256 keys, EdDSA for
//! Ed25519 keys (the two key types `onceonly-certs` issues).
//!
//! Signatures and their checks are ring's, with the key pair parsed once
//! per signer and each signer certificate's public key once per process:
//! jsonwebtoken (which we used first) parses the PKCS#8 key for every
//! signature and the header, claims and certificate twice for every
//! verification, about a third of what a token cost. The format is plain
//! RFC 7515 compact serialization; the tests read every kind of token we
//! sign with jsonwebtoken, and sign tokens with it for us to verify, and
//! the Python client reads them with PyJWT.
//!
//! What a verifier refuses before any signature is checked: anything but
//! three base64url parts, a `crit` header (no extension is understood), an
//! `alg` other than the one the signer's certificate key implies (so no
//! `none`, no algorithm confusion), a missing `x5c`.

use std::path::Path;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use onceonly_certs::{IdentityVerifier, Participant, Role};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
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

/// The JWS algorithms (RFC 7518, RFC 8037) of the two key types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    /// ECDSA with P-256 and SHA-256.
    ES256,
    /// Ed25519.
    EdDSA,
}

impl Algorithm {
    /// Its `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::ES256 => "ES256",
            Algorithm::EdDSA => "EdDSA",
        }
    }

    fn verification(self) -> &'static dyn ring::signature::VerificationAlgorithm {
        match self {
            Algorithm::ES256 => &ring::signature::ECDSA_P256_SHA256_FIXED,
            Algorithm::EdDSA => &ring::signature::ED25519,
        }
    }
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
        let (algorithm, public) = public_key(leaf)?;
        let (signed, signature) = token
            .rsplit_once('.')
            .ok_or_else(|| JwsError::Key("the self-check token is malformed".into()))?;
        if !signature_holds(algorithm, &public, signed, signature)
            .map_err(|e| JwsError::Key(e.to_string()))?
        {
            return Err(JwsError::Key(
                "the private key does not belong to the certificate".into(),
            ));
        }
        Ok(signer)
    }

    /// Whose tokens these are.
    pub fn participant(&self) -> &Participant {
        &self.participant
    }

    /// Signs `claims` as a token of type `typ`.
    pub fn sign<C: Serialize>(&self, typ: &str, claims: &C) -> Result<String, JwsError> {
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

/// The protected header a verifier reads.
#[derive(Deserialize)]
struct ReadHeader {
    #[serde(default)]
    typ: String,
    alg: String,
    #[serde(default)]
    x5c: Vec<String>,
    /// Whether the header names `crit` at all (even as null, which RFC
    /// 7515 does not allow either).
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(value: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(value).map(|_| true)
}

/// The registered time claim a verifier checks.
#[derive(Deserialize)]
struct ReadTimes {
    #[serde(default)]
    exp: Option<i64>,
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
    let malformed = |what: &str| JwsError::Malformed(what.to_owned());
    let mut parts = token.split('.');
    let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("a JWS has three parts separated by '.'"));
    };
    let decode = |part: &str, what: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| JwsError::Malformed(format!("{what}: {e}")))
    };
    let header: ReadHeader = serde_json::from_slice(&decode(header_b64, "header")?)
        .map_err(|e| JwsError::Malformed(format!("header: {e}")))?;
    if header.typ != typ {
        return Err(JwsError::WrongType {
            expected: typ.to_owned(),
            found: header.typ,
        });
    }
    if header.crit {
        return Err(malformed(
            "the header names critical extensions (crit), and none is understood here",
        ));
    }
    let chain: Vec<CertificateDer<'static>> = header
        .x5c
        .iter()
        .map(|c| STANDARD.decode(c).map(CertificateDer::from))
        .collect::<Result<_, _>>()
        .map_err(|e| JwsError::Malformed(format!("x5c: {e}")))?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(malformed(
            "no x5c header: the signer's certificate is missing",
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
    let (algorithm, public) = cached_public_key(leaf)?;
    if header.alg != algorithm.name() {
        return Err(JwsError::Malformed(format!(
            "alg {:?} does not fit the signer's key ({algorithm:?})",
            header.alg
        )));
    }
    let signed = &token[..header_b64.len() + 1 + claims_b64.len()];
    if !signature_holds(algorithm, &public, signed, signature_b64)
        .map_err(|e| JwsError::Malformed(format!("signature: {e}")))?
    {
        return Err(JwsError::BadSignature);
    }
    let claims_json = decode(claims_b64, "claims")?;
    let claim_times: ReadTimes = serde_json::from_slice(&claims_json)
        .map_err(|e| JwsError::Malformed(format!("claims: {e}")))?;
    if times.require_exp {
        let exp = claim_times
            .exp
            .ok_or_else(|| malformed("the token has no exp claim"))?;
        let leeway = i64::try_from(times.leeway_secs).unwrap_or(i64::MAX);
        if exp.saturating_add(leeway) < crate::unix_now() {
            return Err(JwsError::Expired);
        }
    }
    let claims = serde_json::from_slice(&claims_json)
        .map_err(|e| JwsError::Malformed(format!("claims: {e}")))?;
    Ok(Verified { claims, signer })
}

/// Whether `signature_b64` (base64url) is the signature of `signed` under
/// `public` with `algorithm`; Err where it does not decode. The one place
/// signatures are checked, for tokens and for a signer's self-check.
fn signature_holds(
    algorithm: Algorithm,
    public: &[u8],
    signed: &str,
    signature_b64: &str,
) -> Result<bool, base64::DecodeError> {
    let signature = URL_SAFE_NO_PAD.decode(signature_b64)?;
    Ok(
        ring::signature::UnparsedPublicKey::new(algorithm.verification(), public)
            .verify(signed.as_bytes(), &signature)
            .is_ok(),
    )
}

/// Public keys of signer certificates this process has read, by the
/// certificate's SHA-256. Derived from the certificate bytes alone (trust
/// is checked on every token, before this is asked), so one cache serves
/// every verifier; cleared when full rather than grown.
fn cached_public_key(leaf: &CertificateDer<'_>) -> Result<(Algorithm, Arc<[u8]>), JwsError> {
    use sha2::Digest;
    const MAX_KEYS: usize = 1024;
    type Keys = Mutex<HashMap<[u8; 32], (Algorithm, Arc<[u8]>)>>;
    static KEYS: OnceLock<Keys> = OnceLock::new();
    let keys = KEYS.get_or_init(Default::default);
    let id: [u8; 32] = sha2::Sha256::digest(leaf.as_ref()).into();
    if let Some(found) = keys.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
        return Ok(found.clone());
    }
    let (algorithm, public) = public_key(leaf)?;
    let entry = (algorithm, Arc::<[u8]>::from(public));
    let mut keys = keys.lock().unwrap_or_else(|p| p.into_inner());
    if keys.len() >= MAX_KEYS {
        keys.clear();
    }
    keys.insert(id, entry.clone());
    Ok(entry)
}

/// The JWS algorithm and raw public key of a certificate.
fn public_key(leaf: &CertificateDer<'_>) -> Result<(Algorithm, Vec<u8>), JwsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| JwsError::Key(format!("not a certificate: {e}")))?;
    let spki = cert.public_key();
    let raw = spki.subject_public_key.data.to_vec();
    if spki.algorithm.algorithm == OID_SIG_ED25519 {
        return Ok((Algorithm::EdDSA, raw));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == Some(OID_EC_P256) {
        return Ok((Algorithm::ES256, raw));
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
    /// anew where the generation moved. Where the new files cannot sign,
    /// the signer loaded before stays in use (logged once, as an error),
    /// and the files are read again at the next generation: a bad reload
    /// never stops the signing.
    pub fn get(&self, generation: u64) -> std::sync::Arc<Signer> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.0 != generation {
            current.0 = generation;
            match Signer::from_files(&self.cert, &self.key) {
                Ok(signer) => current.1 = std::sync::Arc::new(signer),
                Err(error) => tracing::error!(
                    %error,
                    cert = %self.cert.display(),
                    key = %self.key.display(),
                    "the reloaded certificate and key cannot sign; signing on with the ones loaded before"
                ),
            }
        }
        current.1.clone()
    }
}
