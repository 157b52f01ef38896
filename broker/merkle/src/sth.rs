//! Signed tree heads: the broker's signed statement "the log has this many
//! records, and this is their tree hash, at this time". An auditor keeps
//! the heads it has seen; an inclusion proof shows a record is in a head's
//! tree, a consistency proof that a later head extends an earlier one.
//!
//! The signature is Ed25519 over [`SignedTreeHead::signing_input`]:
//! `"onceonly-sth-v1\n" || tree_size (u64 BE) || timestamp_ms (u64 BE) ||
//! root_hash (32 bytes)` (documented in `audit.proto`).

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};

use crate::Hash;

/// Domain separation for tree head signatures.
pub const SIGNING_CONTEXT: &[u8] = b"onceonly-sth-v1\n";
/// The signature algorithm's name in `SignedTreeHead.signature_algorithm`.
pub const ALGORITHM: &str = "Ed25519";

/// A tree head and its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedTreeHead {
    /// Records in the tree.
    pub tree_size: u64,
    /// The tree hash.
    pub root_hash: Hash,
    /// When it was signed, Unix milliseconds.
    pub timestamp_ms: u64,
    /// SHA-256 of the public key, hex: which key signed.
    pub key_id: String,
    /// The Ed25519 signature (64 bytes).
    pub signature: Vec<u8>,
}

/// Why a tree head is not to be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SthError {
    /// The signature does not verify with the key.
    #[error(
        "the tree head's signature does not verify with the broker's audit key: forged or altered"
    )]
    BadSignature,
    /// It names another key than the one given.
    #[error("the tree head was signed by key {found}, not by the expected key {expected}")]
    WrongKey {
        /// The key id expected.
        expected: String,
        /// The key id in the head.
        found: String,
    },
}

impl SignedTreeHead {
    /// The bytes the signature covers.
    pub fn signing_input(tree_size: u64, timestamp_ms: u64, root_hash: &Hash) -> Vec<u8> {
        let mut input = Vec::with_capacity(SIGNING_CONTEXT.len() + 48);
        input.extend_from_slice(SIGNING_CONTEXT);
        input.extend_from_slice(&tree_size.to_be_bytes());
        input.extend_from_slice(&timestamp_ms.to_be_bytes());
        input.extend_from_slice(root_hash);
        input
    }

    /// Signs a head.
    pub fn sign(key: &Ed25519KeyPair, tree_size: u64, root_hash: Hash, timestamp_ms: u64) -> Self {
        let signature = key
            .sign(&Self::signing_input(tree_size, timestamp_ms, &root_hash))
            .as_ref()
            .to_vec();
        SignedTreeHead {
            tree_size,
            root_hash,
            timestamp_ms,
            key_id: key_id(key.public_key().as_ref()),
            signature,
        }
    }

    /// Checks the signature with the raw 32-byte Ed25519 public key.
    pub fn verify(&self, public_key: &[u8]) -> Result<(), SthError> {
        let expected = key_id(public_key);
        if self.key_id != expected {
            return Err(SthError::WrongKey {
                expected,
                found: self.key_id.clone(),
            });
        }
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(
                &Self::signing_input(self.tree_size, self.timestamp_ms, &self.root_hash),
                &self.signature,
            )
            .map_err(|_| SthError::BadSignature)
    }
}

/// A key's id: SHA-256 of the raw public key, hex.
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(Sha256::digest(public_key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn new_key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("parse")
    }

    #[test]
    fn signed_heads_verify_and_forgeries_do_not() {
        let key = new_key();
        let public = key.public_key().as_ref().to_vec();
        let head = SignedTreeHead::sign(&key, 42, [7; 32], 1_790_000_000_000);
        assert_eq!(head.verify(&public), Ok(()));

        let mut bigger = head.clone();
        bigger.tree_size = 43;
        assert_eq!(bigger.verify(&public), Err(SthError::BadSignature));
        let mut other_root = head.clone();
        other_root.root_hash[0] ^= 1;
        assert_eq!(other_root.verify(&public), Err(SthError::BadSignature));
        let mut later = head.clone();
        later.timestamp_ms += 1;
        assert_eq!(later.verify(&public), Err(SthError::BadSignature));

        let impostor = new_key();
        let forged = SignedTreeHead::sign(&impostor, 42, [7; 32], 1_790_000_000_000);
        assert!(matches!(
            forged.verify(&public),
            Err(SthError::WrongKey { .. })
        ));
        let mut relabelled = forged;
        relabelled.key_id = head.key_id.clone();
        assert_eq!(relabelled.verify(&public), Err(SthError::BadSignature));
    }
}
