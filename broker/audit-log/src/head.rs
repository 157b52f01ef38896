//! Signed tree heads on the wire and on disk, and where a signing key's
//! public half is written.

use std::path::Path;

use onceonly_merkle::sth::SignedTreeHead;
use onceonly_proto::time::{millis, timestamp};
use onceonly_proto::v1 as pb;
use prost::Message;

use crate::AuditError;

/// Where the public key of the signing key at `key_path` is written.
pub fn public_key_path(key_path: &Path) -> std::path::PathBuf {
    let mut name = key_path.as_os_str().to_owned();
    name.push(".pub");
    name.into()
}

/// Converts between the merkle crate's head and the wire message.
pub fn head_to_proto(head: &SignedTreeHead) -> pb::SignedTreeHead {
    pb::SignedTreeHead {
        tree_size: head.tree_size,
        root_hash: head.root_hash.to_vec(),
        timestamp: Some(timestamp(
            i64::try_from(head.timestamp_ms).unwrap_or(i64::MAX),
        )),
        signature_algorithm: onceonly_merkle::sth::ALGORITHM.into(),
        key_id: head.key_id.clone(),
        signature: head.signature.clone(),
    }
}

/// The wire head as the merkle crate's, where well-formed.
pub fn head_from_proto(head: &pb::SignedTreeHead) -> Result<SignedTreeHead, AuditError> {
    Ok(SignedTreeHead {
        tree_size: head.tree_size,
        root_hash: head
            .root_hash
            .as_slice()
            .try_into()
            .map_err(|_| AuditError::Corrupt("tree head root is not 32 bytes".into()))?,
        timestamp_ms: head
            .timestamp
            .as_ref()
            .map(|t| u64::try_from(millis(t)).unwrap_or(0))
            .unwrap_or(0),
        key_id: head.key_id.clone(),
        signature: head.signature.clone(),
    })
}

/// A head as stored in a frame (the wire message's bytes).
pub fn decode_head(bytes: &[u8]) -> Result<SignedTreeHead, AuditError> {
    pb::SignedTreeHead::decode(bytes)
        .map_err(|e| AuditError::Corrupt(format!("signed tree head: {e}")))
        .and_then(|h| head_from_proto(&h))
}
