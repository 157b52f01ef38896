//! Encryption of evidence to the requesting authority, with HPKE (RFC 9180,
//! base mode) in the suite DHKEM(P-256, HKDF-SHA256), HKDF-SHA256,
//! AES-256-GCM (ids 0x0010, 0x0001, 0x0002), by the `hpke` crate.
//!
//! The recipient's key is certified by the trust domain's PKI: an
//! encryption certificate `onceonly-certs issue --encryption` gives an
//! authority (its SPIFFE id, key usage keyAgreement only, a P-256 key). The
//! connector checks that the certificate chains to the CA, is not revoked
//! and names the requester of the ticket before it encrypts to it, so the
//! broker cannot put in a key of its own: it cannot get a certificate for
//! the authority's id.
//!
//! The HPKE `info` binds the ciphertext to its exchange:
//! `"onceonly-evidence-v1" 0x00 exchange_id 0x00 evidence_type 0x00 requester`;
//! the associated data is the payload's media type.

use std::path::Path;

use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::DhP256HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use onceonly_certs::{IdentityVerifier, Participant, Role};
use rustls_pki_types::CertificateDer;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};

type Kem = DhP256HkdfSha256;

/// The HPKE suite, as named in statements.
pub const SUITE: &str = "HPKE-Base-P256-SHA256-A256GCM";

/// The label that starts the HPKE `info`.
const INFO_LABEL: &[u8] = b"onceonly-evidence-v1";

/// Why a recipient certificate, a key or a ciphertext is refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RecipientError {
    /// Not a certificate of the trust domain (another CA, expired, revoked).
    #[error("the encryption certificate is refused: {0}")]
    NotIssued(String),
    /// Issued, but to a participant that is not an authority.
    #[error("the encryption certificate belongs to {0}, which is not an authority")]
    NotAnAuthority(String),
    /// An authority's certificate, but not one for encryption.
    #[error("the certificate is not an encryption certificate: {0}")]
    NotForEncryption(String),
    /// A key file that cannot be used.
    #[error("unusable key: {0}")]
    Key(String),
    /// HPKE failed (sealing), or the ciphertext does not open under this
    /// key and context (altered, or for another exchange or recipient).
    #[error("{0}")]
    Crypto(String),
}

/// What a ciphertext is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The exchange id.
    pub exchange_id: &'a str,
    /// The evidence type.
    pub evidence_type: &'a str,
    /// The requester's SPIFFE id.
    pub requester: &'a str,
    /// The plaintext's media type (the associated data).
    pub media_type: &'a str,
}

impl Context<'_> {
    fn info(&self) -> Vec<u8> {
        let mut info = INFO_LABEL.to_vec();
        for part in [self.exchange_id, self.evidence_type, self.requester] {
            info.push(0);
            info.extend_from_slice(part.as_bytes());
        }
        info
    }
}

/// A ciphertext and the key it was encapsulated with.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// The HPKE `enc`: the sender's ephemeral public key.
    pub encapsulated_key: Vec<u8>,
    /// The AEAD ciphertext with its tag.
    pub ciphertext: Vec<u8>,
}

/// An authority's encryption certificate, checked against the trust domain.
#[derive(Debug, Clone)]
pub struct Recipient {
    participant: Participant,
    certificate_sha256: Vec<u8>,
    fingerprint: String,
    public_key: <Kem as hpke::Kem>::PublicKey,
}

impl Recipient {
    /// Checks `der`: issued by the trust domain's CA, valid, not revoked, an
    /// authority's, for key agreement, with a P-256 key.
    pub fn from_certificate(der: &[u8], trust: &IdentityVerifier) -> Result<Self, RecipientError> {
        let participant = trust
            .verify_encryption_certificate_cached(&CertificateDer::from(der))
            .map_err(|e| RecipientError::NotIssued(e.to_string()))?;
        if participant.role() != Role::Authority {
            return Err(RecipientError::NotAnAuthority(participant.spiffe_id()));
        }
        let raw = encryption_key(der)?;
        let public_key = <Kem as hpke::Kem>::PublicKey::from_bytes(&raw)
            .map_err(|e| RecipientError::NotForEncryption(format!("its key: {e}")))?;
        use sha2::Digest;
        Ok(Recipient {
            participant,
            certificate_sha256: sha2::Sha256::digest(der).to_vec(),
            fingerprint: crate::digest_b64(der),
            public_key,
        })
    }

    /// Whose certificate it is.
    pub fn participant(&self) -> &Participant {
        &self.participant
    }

    /// SHA-256 (base64url) of the certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// SHA-256 of the certificate.
    pub fn certificate_sha256(&self) -> &[u8] {
        &self.certificate_sha256
    }

    /// Encrypts `plaintext` to this recipient within `context`.
    pub fn seal(&self, context: &Context<'_>, plaintext: &[u8]) -> Result<Sealed, RecipientError> {
        let (encapsulated, ciphertext) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, Kem, _>(
            &OpModeS::Base,
            &self.public_key,
            &context.info(),
            plaintext,
            context.media_type.as_bytes(),
            &mut rand::rng(),
        )
        .map_err(|e| RecipientError::Crypto(format!("cannot encrypt: {e}")))?;
        Ok(Sealed {
            encapsulated_key: encapsulated.to_bytes().to_vec(),
            ciphertext,
        })
    }
}

/// The public key of an encryption certificate (uncompressed P-256 point),
/// after checking its key usage.
fn encryption_key(der: &[u8]) -> Result<Vec<u8>, RecipientError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| RecipientError::NotIssued(format!("not a certificate: {e}")))?;
    let key_agreement = cert
        .key_usage()
        .ok()
        .flatten()
        .is_some_and(|usage| usage.value.key_agreement());
    if !key_agreement {
        return Err(RecipientError::NotForEncryption(
            "its key usage does not include keyAgreement (issue one with onceonly-certs issue --encryption)".into(),
        ));
    }
    let spki = cert.public_key();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(RecipientError::NotForEncryption(
            "its key is not a P-256 key".into(),
        ));
    }
    Ok(spki.subject_public_key.data.to_vec())
}

/// An authority's decryption key, with the fingerprint of the certificate
/// it belongs to.
pub struct DecryptionKey {
    secret: <Kem as hpke::Kem>::PrivateKey,
    fingerprint: String,
}

impl std::fmt::Debug for DecryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptionKey")
            .field("certificate", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl DecryptionKey {
    /// The key from an encryption certificate (PEM) and its PKCS#8 private
    /// key (PEM), as `onceonly-certs issue --encryption` writes them.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, RecipientError> {
        use rustls_pki_types::PrivateKeyDer;
        use rustls_pki_types::pem::PemObject;
        let cert_der = CertificateDer::from_pem_file(cert)
            .map_err(|e| RecipientError::Key(format!("{}: {e}", cert.display())))?;
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| RecipientError::Key(format!("{}: {e}", key.display())))?;
        let PrivateKeyDer::Pkcs8(pkcs8) = key_der else {
            return Err(RecipientError::Key(format!(
                "{}: not a PKCS#8 key",
                key.display()
            )));
        };
        Self::new(&cert_der, pkcs8.secret_pkcs8_der())
    }

    /// The key from a certificate (DER) and a PKCS#8 P-256 key (DER).
    pub fn new(cert_der: &[u8], pkcs8: &[u8]) -> Result<Self, RecipientError> {
        use p256::pkcs8::DecodePrivateKey;
        let secret = p256::SecretKey::from_pkcs8_der(pkcs8)
            .map_err(|e| RecipientError::Key(format!("not a P-256 PKCS#8 key: {e}")))?;
        let secret = <Kem as hpke::Kem>::PrivateKey::from_bytes(&secret.to_bytes())
            .map_err(|e| RecipientError::Key(e.to_string()))?;
        let public = encryption_key(cert_der)?;
        if <Kem as hpke::Kem>::sk_to_pk(&secret).to_bytes().as_slice() != public.as_slice() {
            return Err(RecipientError::Key(
                "the key does not belong to the certificate".into(),
            ));
        }
        Ok(DecryptionKey {
            secret,
            fingerprint: crate::digest_b64(cert_der),
        })
    }

    /// SHA-256 (base64url) of the certificate this key belongs to.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Decrypts a ciphertext sealed to this key within `context`.
    pub fn open(
        &self,
        context: &Context<'_>,
        encapsulated_key: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, RecipientError> {
        let encapsulated = <Kem as hpke::Kem>::EncappedKey::from_bytes(encapsulated_key)
            .map_err(|e| RecipientError::Crypto(format!("the encapsulated key: {e}")))?;
        hpke::single_shot_open::<AesGcm256, HkdfSha256, Kem>(
            &OpModeR::Base,
            &self.secret,
            &encapsulated,
            &context.info(),
            ciphertext,
            context.media_type.as_bytes(),
        )
        .map_err(|_| {
            RecipientError::Crypto(
                "the ciphertext does not open: altered, or for another exchange or key".into(),
            )
        })
    }
}
