//! The keys stores use to authenticate and seal what they keep, derived by
//! the broker from its pseudonym key (which every replica shares and the
//! storage never sees), and handed in so no store needs the broker's
//! pseudonymiser.

use std::sync::Arc;

use ring::rand::SecureRandom;
use ring::{aead, hmac};

/// Keys for rows written where someone else might write too.
#[derive(Clone)]
pub struct RowKeys {
    /// Tags consent rows and queued audit records.
    pub row_tag: hmac::Key,
    /// Seals the outcomes in the shared request window.
    pub outcome_seal: Arc<aead::LessSafeKey>,
}

/// A sealed value does not open under this key (another key, or altered),
/// or could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a sealed outcome does not open under this key (another key, or altered), or could not be sealed"
)]
pub struct Unsealable;

/// Seals `plain` under `key`, bound to `context` (AES-256-GCM): a random
/// nonce, then the ciphertext and tag.
pub fn seal(key: &aead::LessSafeKey, context: &[u8], plain: &[u8]) -> Result<Vec<u8>, Unsealable> {
    let mut nonce = [0u8; aead::NONCE_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| Unsealable)?;
    let mut data = plain.to_vec();
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(context),
        &mut data,
    )
    .map_err(|_| Unsealable)?;
    let mut sealed = nonce.to_vec();
    sealed.extend_from_slice(&data);
    Ok(sealed)
}

/// Opens what [`seal`] sealed under `key` for `context`.
pub fn open(key: &aead::LessSafeKey, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Unsealable> {
    if sealed.len() < aead::NONCE_LEN {
        return Err(Unsealable);
    }
    let (nonce, rest) = sealed.split_at(aead::NONCE_LEN);
    let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| Unsealable)?;
    let mut data = rest.to_vec();
    let plain = key
        .open_in_place(nonce, aead::Aad::from(context), &mut data)
        .map_err(|_| Unsealable)?;
    Ok(plain.to_vec())
}

impl RowKeys {
    /// Seals an outcome for the shared request window, bound to `context`.
    pub fn seal_outcome(&self, context: &[u8], plain: &[u8]) -> Result<Vec<u8>, Unsealable> {
        seal(&self.outcome_seal, context, plain)
    }

    /// Opens what [`RowKeys::seal_outcome`] sealed for `context`.
    pub fn open_outcome(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Unsealable> {
        open(&self.outcome_seal, context, sealed)
    }
}
