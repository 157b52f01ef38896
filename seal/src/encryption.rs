//! Encryption of evidence to the requesting authority, with HPKE (RFC 9180,
//! base mode) in the suite DHKEM(P-256, HKDF-SHA256), HKDF-SHA256,
//! AES-256-GCM (ids 0x0010, 0x0001, 0x0002).
//!
//! Sealing (the connector's side, once per encrypted answer) is written
//! here on ring's primitives: its P-256 is assembly, and the `hpke` crate's
//! pure-Rust P-256 (two scalar multiplications) made sealing cost 680 µs,
//! most of an encrypted exchange's CPU. Opening (the authority's side,
//! which needs a static private key that ring's ECDH does not take) stays
//! with the `hpke` crate, so each side is checked against the other
//! implementation in the tests, and the Python client opens with pyhpke.
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
use hpke::{Deserializable, OpModeR, Serializable};
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
    /// The recipient's public key, an uncompressed P-256 point (`pkRm`).
    public_key: Vec<u8>,
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
        let public_key = encryption_key(der)?;
        // A point on the curve, checked once here rather than at sealing.
        <Kem as hpke::Kem>::PublicKey::from_bytes(&public_key)
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

    /// Encrypts `plaintext` to this recipient within `context`: HPKE
    /// `SealBase` (RFC 9180 section 6.1) in this module's suite.
    pub fn seal(&self, context: &Context<'_>, plaintext: &[u8]) -> Result<Sealed, RecipientError> {
        let failed = |what: &str| RecipientError::Crypto(format!("cannot encrypt: {what}"));
        // Encap (section 4.1): an ephemeral key, its DH with the
        // recipient's, the shared secret over both public keys.
        let rng = ring::rand::SystemRandom::new();
        let ephemeral =
            ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::ECDH_P256, &rng)
                .map_err(|_| failed("no ephemeral key"))?;
        let encapsulated_key = ephemeral
            .compute_public_key()
            .map_err(|_| failed("no ephemeral public key"))?
            .as_ref()
            .to_vec();
        let peer =
            ring::agreement::UnparsedPublicKey::new(&ring::agreement::ECDH_P256, &self.public_key);
        let dh = ring::agreement::agree_ephemeral(ephemeral, &peer, |dh| dh.to_vec())
            .map_err(|_| failed("the key agreement failed"))?;
        let kem_context = [encapsulated_key.as_slice(), &self.public_key].concat();
        let eae_prk = labeled_extract(KEM_SUITE, b"", b"eae_prk", &dh);
        let shared_secret = labeled_expand(&eae_prk, KEM_SUITE, b"shared_secret", &kem_context, 32);
        // KeySchedule (section 5.1), base mode: no PSK.
        let psk_id_hash = labeled_extract(HPKE_SUITE, b"", b"psk_id_hash", b"");
        let info_hash = labeled_extract(HPKE_SUITE, b"", b"info_hash", &context.info());
        let key_schedule_context = [&[0u8][..], &psk_id_hash, &info_hash].concat();
        let secret = labeled_extract(HPKE_SUITE, &shared_secret, b"secret", b"");
        let key = labeled_expand(&secret, HPKE_SUITE, b"key", &key_schedule_context, 32);
        let base_nonce = labeled_expand(
            &secret,
            HPKE_SUITE,
            b"base_nonce",
            &key_schedule_context,
            12,
        );
        // The first (and only) message: sequence number 0, the nonce as is.
        let key = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key)
                .map_err(|_| failed("the AEAD key"))?,
        );
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(&base_nonce)
            .map_err(|_| failed("the nonce"))?;
        let mut ciphertext = plaintext.to_vec();
        key.seal_in_place_append_tag(
            nonce,
            ring::aead::Aad::from(context.media_type.as_bytes()),
            &mut ciphertext,
        )
        .map_err(|_| failed("the AEAD"))?;
        Ok(Sealed {
            encapsulated_key,
            ciphertext,
        })
    }
}

/// `suite_id` of the KEM, DHKEM(P-256, HKDF-SHA256): "KEM" || 0x0010.
const KEM_SUITE: &[u8] = b"KEM\x00\x10";

/// `suite_id` of the whole suite: "HPKE" || KEM 0x0010 || KDF 0x0001 ||
/// AEAD 0x0002.
const HPKE_SUITE: &[u8] = b"HPKE\x00\x10\x00\x01\x00\x02";

/// `LabeledExtract(salt, label, ikm)` (RFC 9180 section 4) with
/// HKDF-SHA256: HMAC-SHA256 keyed by `salt` over "HPKE-v1" || suite ||
/// label || ikm.
fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, salt);
    let mut context = ring::hmac::Context::with_key(&key);
    for part in [&b"HPKE-v1"[..], suite, label, ikm] {
        context.update(part);
    }
    context.sign().as_ref().to_vec()
}

/// `LabeledExpand(prk, label, info, length)` (RFC 9180 section 4) with
/// HKDF-SHA256, for `length` up to 32 (one HKDF-Expand block): T(1) =
/// HMAC-SHA256(prk, I2OSP(length, 2) || "HPKE-v1" || suite || label ||
/// info || 0x01), cut to `length`.
fn labeled_expand(prk: &[u8], suite: &[u8], label: &[u8], info: &[u8], length: u16) -> Vec<u8> {
    debug_assert!(length <= 32, "one block of HKDF-SHA256");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, prk);
    let mut context = ring::hmac::Context::with_key(&key);
    for part in [
        &length.to_be_bytes()[..],
        b"HPKE-v1",
        suite,
        label,
        info,
        &[1u8],
    ] {
        context.update(part);
    }
    let mut okm = context.sign().as_ref().to_vec();
    okm.truncate(usize::from(length));
    okm
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
