//! Audit receipts: a broker replica's signed promise, given with its
//! answer, that the exchange's record is committed and will be in a signed
//! tree head within the log's merge delay (like a Certificate Transparency
//! SCT). A replica commits records in batches and signs each batch once:
//! the signature covers the batch's Merkle tree hash, and each receipt
//! carries the audit path from its leaf to that root. Anyone with the
//! broker's audit public key checks a receipt offline ([`verify`]); the
//! `onceonly-audit check-receipt` command then finds it in the log.

use onceonly_merkle::sth::{ALGORITHM, key_id};
use onceonly_merkle::{Hash, inclusion_proof, mth, verify_inclusion};
use onceonly_proto::time::timestamp;
use onceonly_proto::v1::AuditReceipt;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// What a receipt's signature starts with.
pub const SIGNING_CONTEXT: &[u8] = b"onceonly-receipt-v1\n";
/// What a bound leaf's hash input starts with.
pub const LEAF_CONTEXT: &[u8] = b"onceonly-receipt-leaf-v1\0";

/// The batch tree's leaf for a record: its leaf hash bound to the exchange
/// it names, so a receipt cannot be moved to another exchange.
pub fn bound_leaf(leaf_hash: &Hash, exchange_id: &str) -> Hash {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(LEAF_CONTEXT);
    hasher.update(leaf_hash);
    hasher.update(exchange_id.as_bytes());
    hasher.finalize().into()
}

/// The bytes a batch's signature covers.
pub fn signing_input(
    batch_size: u64,
    committed_at_ms: u64,
    include_by_ms: u64,
    replica: &str,
    batch_root: &Hash,
) -> Vec<u8> {
    let mut input = Vec::with_capacity(SIGNING_CONTEXT.len() + 28 + replica.len() + 32);
    input.extend_from_slice(SIGNING_CONTEXT);
    input.extend_from_slice(&batch_size.to_be_bytes());
    input.extend_from_slice(&committed_at_ms.to_be_bytes());
    input.extend_from_slice(&include_by_ms.to_be_bytes());
    input.extend_from_slice(&(replica.len() as u32).to_be_bytes());
    input.extend_from_slice(replica.as_bytes());
    input.extend_from_slice(batch_root);
    input
}

/// Signs one batch of committed records, given as (leaf hash, exchange id),
/// and returns each one's receipt, in the batch's order. One signature for
/// the whole batch.
pub fn sign_batch(
    key: &Ed25519KeyPair,
    replica: &str,
    records: &[(Hash, String)],
    committed_at_ms: u64,
    include_by_ms: u64,
) -> Vec<AuditReceipt> {
    let bound: Vec<Hash> = records
        .iter()
        .map(|(leaf, exchange_id)| bound_leaf(leaf, exchange_id))
        .collect();
    let root = mth(&bound);
    let size = bound.len() as u64;
    let signature = key
        .sign(&signing_input(
            size,
            committed_at_ms,
            include_by_ms,
            replica,
            &root,
        ))
        .as_ref()
        .to_vec();
    let key_id = key_id(key.public_key().as_ref());
    records
        .iter()
        .enumerate()
        .map(|(n, (leaf, exchange_id))| {
            // n < size: the proof exists.
            let path = inclusion_proof(bound.as_slice(), n as u64, size).unwrap_or_default();
            AuditReceipt {
                leaf_hash: leaf.to_vec(),
                exchange_id: exchange_id.clone(),
                committed_at: Some(timestamp(committed_at_ms as i64)),
                include_by: Some(timestamp(include_by_ms as i64)),
                batch_size: size,
                batch_index: n as u64,
                batch_path: path.iter().map(|h| h.to_vec()).collect(),
                batch_root: root.to_vec(),
                signature_algorithm: ALGORITHM.to_owned(),
                key_id: key_id.clone(),
                signature: signature.clone(),
                replica: replica.to_owned(),
            }
        })
        .collect()
}

/// Why a receipt does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// A field is missing or has the wrong length.
    #[error("the receipt is malformed: {0}")]
    Malformed(String),
    /// Another key signed it.
    #[error("the receipt names key {receipt} but the audit key is {expected}")]
    OtherKey {
        /// The receipt's key id.
        receipt: String,
        /// The given key's id.
        expected: String,
    },
    /// The leaf is not in the signed batch.
    #[error("the receipt's leaf is not in the batch its signature covers")]
    NotInBatch,
    /// The signature does not verify.
    #[error("the receipt's signature does not verify under the audit key")]
    BadSignature,
}

/// A checked receipt's facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedReceipt {
    /// The record's leaf hash.
    pub leaf_hash: Hash,
    /// When it was committed (Unix milliseconds).
    pub committed_at_ms: u64,
    /// When the log promised to include it by (Unix milliseconds).
    pub include_by_ms: u64,
}

fn hash_of(bytes: &[u8], what: &str) -> Result<Hash, ReceiptError> {
    bytes
        .try_into()
        .map_err(|_| ReceiptError::Malformed(format!("{what} is {} bytes, not 32", bytes.len())))
}

fn millis(t: Option<&prost_types::Timestamp>, what: &str) -> Result<u64, ReceiptError> {
    let t = t.ok_or_else(|| ReceiptError::Malformed(format!("{what} is missing")))?;
    u64::try_from(onceonly_proto::time::millis(t))
        .map_err(|_| ReceiptError::Malformed(format!("{what} is before 1970")))
}

/// Checks `receipt` offline with the broker's raw 32-byte Ed25519 audit
/// public key: its leaf is in the signed batch, and the batch's signature
/// holds.
pub fn verify(receipt: &AuditReceipt, public_key: &[u8]) -> Result<CheckedReceipt, ReceiptError> {
    let expected = key_id(public_key);
    if receipt.key_id != expected {
        return Err(ReceiptError::OtherKey {
            receipt: receipt.key_id.clone(),
            expected,
        });
    }
    if receipt.signature_algorithm != ALGORITHM {
        return Err(ReceiptError::Malformed(format!(
            "signature algorithm {:?}, not {ALGORITHM}",
            receipt.signature_algorithm
        )));
    }
    let leaf_hash = hash_of(&receipt.leaf_hash, "leaf_hash")?;
    let root = hash_of(&receipt.batch_root, "batch_root")?;
    let path = receipt
        .batch_path
        .iter()
        .map(|h| hash_of(h, "a batch_path hash"))
        .collect::<Result<Vec<_>, _>>()?;
    if receipt.batch_index >= receipt.batch_size {
        return Err(ReceiptError::Malformed(format!(
            "batch_index {} is not below batch_size {}",
            receipt.batch_index, receipt.batch_size
        )));
    }
    verify_inclusion(
        &bound_leaf(&leaf_hash, &receipt.exchange_id),
        receipt.batch_index,
        receipt.batch_size,
        &path,
        &root,
    )
    .map_err(|_| ReceiptError::NotInBatch)?;
    let committed_at_ms = millis(receipt.committed_at.as_ref(), "committed_at")?;
    let include_by_ms = millis(receipt.include_by.as_ref(), "include_by")?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(
            &signing_input(
                receipt.batch_size,
                committed_at_ms,
                include_by_ms,
                &receipt.replica,
                &root,
            ),
            &receipt.signature,
        )
        .map_err(|_| ReceiptError::BadSignature)?;
    Ok(CheckedReceipt {
        leaf_hash,
        committed_at_ms,
        include_by_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use onceonly_merkle::leaf_hash;
    use ring::rand::SystemRandom;

    fn new_key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
    }

    #[test]
    fn every_receipt_of_a_batch_verifies_and_any_change_breaks_it() {
        let key = new_key();
        let public = key.public_key().as_ref().to_vec();
        for size in [1usize, 2, 3, 7, 8, 13] {
            let leaves: Vec<(Hash, String)> = (0..size)
                .map(|n| {
                    (
                        leaf_hash(format!("record {n}").as_bytes()),
                        format!("ex-{n}"),
                    )
                })
                .collect();
            let receipts = sign_batch(&key, "r1", &leaves, 1_000, 2_000);
            for (n, receipt) in receipts.iter().enumerate() {
                let checked = verify(receipt, &public).expect("verifies");
                assert_eq!(checked.leaf_hash, leaves[n].0);
                assert_eq!(receipt.exchange_id, leaves[n].1);
                assert_eq!(
                    (checked.committed_at_ms, checked.include_by_ms),
                    (1_000, 2_000)
                );
            }
        }
        let leaves: Vec<(Hash, String)> = (0..5u8)
            .map(|n| (leaf_hash(&[n]), format!("ex-{n}")))
            .collect();
        let good = sign_batch(&key, "r1", &leaves, 1_000, 2_000).remove(3);

        // Moved to another exchange, or claimed by another replica.
        let mut other_exchange = good.clone();
        other_exchange.exchange_id = "ex-1".into();
        assert_eq!(
            verify(&other_exchange, &public),
            Err(ReceiptError::NotInBatch)
        );
        let mut other_replica = good.clone();
        other_replica.replica = "r2".into();
        assert_eq!(
            verify(&other_replica, &public),
            Err(ReceiptError::BadSignature)
        );

        let mut other_leaf = good.clone();
        other_leaf.leaf_hash = leaf_hash(b"another record").to_vec();
        assert_eq!(verify(&other_leaf, &public), Err(ReceiptError::NotInBatch));

        let mut later = good.clone();
        later.include_by = Some(timestamp(9_000));
        assert_eq!(verify(&later, &public), Err(ReceiptError::BadSignature));

        let mut moved = good.clone();
        moved.batch_index = 2;
        assert_eq!(verify(&moved, &public), Err(ReceiptError::NotInBatch));

        let mut beyond = good.clone();
        beyond.batch_index = 5;
        assert!(matches!(
            verify(&beyond, &public),
            Err(ReceiptError::Malformed(_))
        ));

        let stranger = new_key();
        assert!(matches!(
            verify(&good, stranger.public_key().as_ref()),
            Err(ReceiptError::OtherKey { .. })
        ));
        let mut forged = sign_batch(&stranger, "r1", &leaves, 1_000, 2_000).remove(3);
        forged.key_id = good.key_id.clone();
        assert_eq!(verify(&forged, &public), Err(ReceiptError::BadSignature));
    }
}
