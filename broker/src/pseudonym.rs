//! Subject pseudonyms: HMAC-SHA-256 of the subject id under a key kept
//! apart from the data directory. The audit log stores only the pseudonym,
//! so a stolen data directory does not reveal whom records are about, while
//! an auditor who is given a subject id can still find its records.
//!
//! Consents must name their person (a consent is a legal record), so the
//! consent store keeps the subject id sealed (AES-256-GCM) under a second
//! key derived from the same secret (HKDF-SHA-256, its own label): the
//! secret never enters the data directory, and a copy of it reveals no
//! subject id.

use onceonly_proto::v1::SubjectIdScheme;
use ring::{aead, hkdf, hmac};

/// Domain separation for the HMAC input.
const CONTEXT: &[u8] = b"onceonly-subject-pseudonym-v1\0";

/// Turns subject ids into pseudonyms, and seals and opens them for the
/// consent store.
pub struct Pseudonymiser {
    key: hmac::Key,
    sealing: aead::LessSafeKey,
    rows: onceonly_store::RowKeys,
}

/// Why a subject id could not be sealed, or a sealed one opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a sealed subject id does not open under this pseudonym key (another key, or altered), or could not be sealed"
)]
pub struct Unsealable;

/// The HKDF label of the consent sealing key.
const SEALING_LABEL: &[u8] = b"onceonly-consent-subject-sealing-v1";
/// The HKDF label of the key that seals remembered outcomes (evidence
/// included) in the replicas' shared idempotency window.
const OUTCOME_LABEL: &[u8] = b"onceonly-idempotency-outcome-sealing-v1";
/// The HKDF label of the key that authenticates rows replicas share in
/// PostgreSQL (queued audit records, consents).
const ROWS_LABEL: &[u8] = b"onceonly-shared-row-authentication-v1";

/// HKDF output length for an HMAC-SHA-256 key.
struct HmacKeyLen;

impl hkdf::KeyType for HmacKeyLen {
    fn len(&self) -> usize {
        32
    }
}

impl std::fmt::Debug for Pseudonymiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymiser(<key>)")
    }
}

impl Pseudonymiser {
    /// A pseudonymiser with a given secret.
    pub fn from_secret(secret: &[u8]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"onceonly").extract(secret);
        let derive = |label: &[u8]| {
            let okm = prk
                .expand(&[label], &aead::AES_256_GCM)
                .map(aead::UnboundKey::from);
            // expand fails only for an output longer than 255 hashes; 32
            // bytes never is.
            match okm {
                Ok(key) => aead::LessSafeKey::new(key),
                Err(_) => unreachable!("HKDF-SHA-256 yields 32 bytes"),
            }
        };
        let mut rows = [0u8; 32];
        let filled = prk
            .expand(&[ROWS_LABEL], HmacKeyLen)
            .and_then(|okm| okm.fill(&mut rows));
        if filled.is_err() {
            unreachable!("HKDF-SHA-256 yields 32 bytes");
        }
        Pseudonymiser {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            sealing: derive(SEALING_LABEL),
            rows: onceonly_store::RowKeys {
                row_tag: hmac::Key::new(hmac::HMAC_SHA256, &rows),
                outcome_seal: std::sync::Arc::new(derive(OUTCOME_LABEL)),
            },
        }
    }

    /// Seals a subject id for the consent store, bound to `context` (the
    /// consent id): hex of a random nonce and the ciphertext.
    pub fn seal(&self, context: &str, scheme: i32, value: &str) -> Result<String, Unsealable> {
        onceonly_store::keys::seal(
            &self.sealing,
            context.as_bytes(),
            format!("{scheme}:{value}").as_bytes(),
        )
        .map(hex::encode)
        .map_err(|_| Unsealable)
    }

    /// Opens what [`Pseudonymiser::seal`] sealed with the same `context`.
    pub fn open(&self, context: &str, sealed: &str) -> Result<(i32, String), Unsealable> {
        let bytes = hex::decode(sealed).map_err(|_| Unsealable)?;
        let plain = onceonly_store::keys::open(&self.sealing, context.as_bytes(), &bytes)
            .map_err(|_| Unsealable)?;
        let text = std::str::from_utf8(&plain).map_err(|_| Unsealable)?;
        let (scheme, value) = text.split_once(':').ok_or(Unsealable)?;
        Ok((scheme.parse().map_err(|_| Unsealable)?, value.to_owned()))
    }

    /// The key that authenticates rows replicas share (derived, never the
    /// secret itself).
    pub fn row_key(&self) -> hmac::Key {
        self.rows.row_tag.clone()
    }

    /// The keys stores authenticate and seal their rows with.
    pub fn row_keys(&self) -> onceonly_store::RowKeys {
        self.rows.clone()
    }

    /// The pseudonym of a subject id (also of a malformed one, so that even
    /// refused requests are findable by what they named).
    pub fn pseudonym(&self, scheme: i32, value: &str) -> Vec<u8> {
        let scheme_name = SubjectIdScheme::try_from(scheme)
            .map(|s| s.as_str_name())
            .unwrap_or("UNKNOWN");
        let mut context = hmac::Context::with_key(&self.key);
        context.update(CONTEXT);
        context.update(scheme_name.as_bytes());
        context.update(b"\0");
        context.update(value.as_bytes());
        context.sign().as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_keyed_and_stable() {
        let first = Pseudonymiser::from_secret(&[3; 32]);
        let again = Pseudonymiser::from_secret(&[3; 32]);
        let a = first.pseudonym(1, "82281866209");
        assert_eq!(a, again.pseudonym(1, "82281866209"));
        assert_ne!(a, first.pseudonym(1, "21641045750"));
        assert_ne!(
            a,
            first.pseudonym(2, "82281866209"),
            "scheme is part of the input"
        );
        assert_ne!(
            a,
            Pseudonymiser::from_secret(&[7; 32]).pseudonym(1, "82281866209")
        );
    }

    #[test]
    fn sealed_subjects_open_only_with_their_key_and_context() {
        let key = Pseudonymiser::from_secret(&[3; 32]);
        let sealed = key.seal("cns-1", 1, "82281866209").expect("seal");
        assert!(!sealed.contains("82281866209"));
        assert!(
            !hex::decode(&sealed)
                .expect("hex")
                .windows(11)
                .any(|w| w == b"82281866209")
        );
        assert_eq!(key.open("cns-1", &sealed), Ok((1, "82281866209".into())));
        assert_eq!(
            key.open("cns-2", &sealed),
            Err(Unsealable),
            "moved to another consent"
        );
        assert_eq!(
            Pseudonymiser::from_secret(&[4; 32]).open("cns-1", &sealed),
            Err(Unsealable)
        );
        assert_ne!(
            sealed,
            key.seal("cns-1", 1, "82281866209").expect("seal"),
            "fresh nonce"
        );
    }
}
