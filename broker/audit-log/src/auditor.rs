//! The auditor's side of the audit log, used by the `onceonly-audit` CLI:
//! fetch the broker's signed tree head, check it offline with the broker's
//! public key, recompute the tree from the raw entries, and check that the
//! log still extends a head saved earlier (so the broker cannot quietly
//! rewrite history between two audits).

use std::path::Path;

use onceonly_merkle::sth::SignedTreeHead;
use onceonly_merkle::{Frontier, Hash, leaf_hash, verify_consistency};
use onceonly_proto::v1::audit_service_client::AuditServiceClient;
use onceonly_proto::v1::{GetConsistencyProofRequest, GetEntriesRequest, GetSignedTreeHeadRequest};
use prost::Message;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::handover::KeyChain;
use crate::head::head_from_proto;

/// Why an audit failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditorError {
    /// The broker did not answer.
    #[error("the broker refused or failed: {0}")]
    Broker(#[from] tonic::Status),
    /// The head's signature does not verify.
    #[error("the broker's signed tree head does not verify: {0}")]
    BadHead(String),
    /// The log is not an extension of the head saved earlier.
    #[error(
        "the log does not extend the tree head saved earlier (size {saved}): {reason}; the history was rewritten"
    )]
    Inconsistent {
        /// The saved head's size.
        saved: u64,
        /// Why.
        reason: String,
    },
    /// An entry is not where it should be, or the entries do not hash to
    /// the signed root.
    #[error("the log's entries do not match its signed head: {0}")]
    Entries(String),
    /// A file could not be read or written.
    #[error("{0}")]
    File(String),
}

/// A tree head as an auditor keeps it between audits (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedHead {
    /// Records in the tree.
    pub tree_size: u64,
    /// The tree hash, hex.
    pub root_hash: String,
    /// When signed, Unix milliseconds.
    pub timestamp_ms: u64,
    /// The signing key's id.
    pub key_id: String,
    /// The signature, hex.
    pub signature: String,
}

impl SavedHead {
    /// Saves a verified head.
    pub fn from_head(head: &SignedTreeHead) -> Self {
        SavedHead {
            tree_size: head.tree_size,
            root_hash: hex::encode(head.root_hash),
            timestamp_ms: head.timestamp_ms,
            key_id: head.key_id.clone(),
            signature: hex::encode(&head.signature),
        }
    }

    /// The head, where the file is well-formed.
    pub fn to_head(&self) -> Result<SignedTreeHead, AuditorError> {
        let bad = |what: &str| AuditorError::File(format!("saved head: {what} is not valid hex"));
        Ok(SignedTreeHead {
            tree_size: self.tree_size,
            root_hash: hex::decode(&self.root_hash)
                .ok()
                .and_then(|r| r.try_into().ok())
                .ok_or_else(|| bad("root_hash"))?,
            timestamp_ms: self.timestamp_ms,
            key_id: self.key_id.clone(),
            signature: hex::decode(&self.signature).map_err(|_| bad("signature"))?,
        })
    }

    /// Reads a saved head file.
    pub fn load(path: &Path) -> Result<SignedTreeHead, AuditorError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AuditorError::File(format!("{}: {e}", path.display())))?;
        let saved: SavedHead = serde_json::from_str(&text)
            .map_err(|e| AuditorError::File(format!("{}: {e}", path.display())))?;
        saved.to_head()
    }

    /// Writes a head to a file.
    pub fn store(head: &SignedTreeHead, path: &Path) -> Result<(), AuditorError> {
        let text = serde_json::to_string_pretty(&SavedHead::from_head(head))
            .map_err(|e| AuditorError::File(e.to_string()))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| AuditorError::File(format!("{}: {e}", path.display())))
    }
}

/// Reads the broker's audit public key: hex of the raw 32 bytes, as the
/// broker writes it beside its key (`audit.key.pub`).
pub fn load_public_key(path: &Path) -> Result<Vec<u8>, AuditorError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AuditorError::File(format!("{}: {e}", path.display())))?;
    hex::decode(text.trim())
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or_else(|| {
            AuditorError::File(format!(
                "{}: not an Ed25519 public key (64 hex digits)",
                path.display()
            ))
        })
}

/// What a remote audit established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteAudit {
    /// The verified head.
    pub head: Option<SignedTreeHead>,
    /// Entries downloaded and re-hashed.
    pub entries_checked: u64,
    /// Whether consistency with a saved head was proven.
    pub consistent_with_saved: bool,
}

/// Audits a broker: verifies its latest head with `public_key` (or, after
/// key rotations, with the key the chain of hand-overs from `public_key`
/// leads to), proves it extends `saved` (where given), and, with
/// `recompute`, downloads every entry and recomputes the tree. Where the
/// heads are not signed by `public_key` itself, the entries are downloaded
/// anyway to follow the hand-overs.
pub async fn verify_remote(
    client: &mut AuditServiceClient<Channel>,
    public_key: &[u8],
    saved: Option<&SignedTreeHead>,
    recompute: bool,
) -> Result<RemoteAudit, AuditorError> {
    let head = client
        .get_signed_tree_head(GetSignedTreeHeadRequest {})
        .await?
        .into_inner()
        .tree_head;
    let Some(head) = head else {
        if let Some(saved) = saved {
            saved.verify(public_key).map_err(|e| {
                AuditorError::File(format!("the saved head itself does not verify: {e}"))
            })?;
        }
        return Ok(RemoteAudit {
            head: None,
            entries_checked: 0,
            consistent_with_saved: saved.is_none(),
        });
    };
    let head = head_from_proto(&head).map_err(|e| AuditorError::BadHead(e.to_string()))?;
    let signed_by_trusted =
        head.verify(public_key).is_ok() && saved.is_none_or(|s| s.verify(public_key).is_ok());
    let mut checked = 0u64;
    let mut chain = None;
    if recompute || !signed_by_trusted {
        let walked = walk_entries(client, &head).await?;
        checked = walked.entries;
        chain = Some(
            KeyChain::build(public_key, &walked.handovers)
                .map_err(|e| AuditorError::BadHead(format!("key chain: {e}")))?,
        );
    }
    let key_for = |size: u64| chain.as_ref().map_or(public_key, |c| c.key_for(size));
    if let Some(saved) = saved {
        saved.verify(key_for(saved.tree_size)).map_err(|e| {
            AuditorError::File(format!("the saved head itself does not verify: {e}"))
        })?;
    }
    head.verify(key_for(head.tree_size))
        .map_err(|e| AuditorError::BadHead(e.to_string()))?;

    let mut consistent = false;
    if let Some(saved) = saved {
        if saved.tree_size > head.tree_size {
            return Err(AuditorError::Inconsistent {
                saved: saved.tree_size,
                reason: format!("the log shrank to {} records", head.tree_size),
            });
        }
        let proof = client
            .get_consistency_proof(GetConsistencyProofRequest {
                first_size: saved.tree_size,
                second_size: head.tree_size,
            })
            .await?
            .into_inner()
            .proof;
        let proof: Vec<Hash> = proof
            .into_iter()
            .filter_map(|p| p.try_into().ok())
            .collect();
        verify_consistency(
            saved.tree_size,
            head.tree_size,
            &saved.root_hash,
            &head.root_hash,
            &proof,
        )
        .map_err(|e| AuditorError::Inconsistent {
            saved: saved.tree_size,
            reason: e.to_string(),
        })?;
        consistent = true;
    }

    Ok(RemoteAudit {
        head: Some(head),
        entries_checked: checked,
        consistent_with_saved: consistent,
    })
}

/// What walking every entry of a log found.
struct Walked {
    entries: u64,
    handovers: Vec<(u64, onceonly_proto::v1::KeyHandover)>,
}

/// Downloads every entry up to `head`, checks each names its place, that
/// they hash to the head's root, and gathers the key hand-overs.
async fn walk_entries(
    client: &mut AuditServiceClient<Channel>,
    head: &SignedTreeHead,
) -> Result<Walked, AuditorError> {
    let mut frontier = Frontier::new();
    let mut handovers = Vec::new();
    while frontier.size() < head.tree_size {
        let entries = client
            .get_entries(GetEntriesRequest {
                start_index: frontier.size(),
                max_entries: 1000,
            })
            .await?
            .into_inner()
            .entries;
        if entries.is_empty() {
            return Err(AuditorError::Entries(format!(
                "the broker sent no entry at index {} of {}",
                frontier.size(),
                head.tree_size
            )));
        }
        for entry in entries {
            if frontier.size() == head.tree_size {
                break;
            }
            if entry.leaf_index != frontier.size() {
                return Err(AuditorError::Entries(format!(
                    "expected entry {}, got {}",
                    frontier.size(),
                    entry.leaf_index
                )));
            }
            let decoded = onceonly_proto::v1::AuditRecord::decode(entry.leaf_data.as_slice())
                .map_err(|e| AuditorError::Entries(format!("entry {}: {e}", entry.leaf_index)))?;
            if decoded.log_index != entry.leaf_index {
                return Err(AuditorError::Entries(format!(
                    "entry {} says it is {}",
                    entry.leaf_index, decoded.log_index
                )));
            }
            if let Some(handover) = decoded.key_handover {
                handovers.push((entry.leaf_index, handover));
            }
            frontier.push(leaf_hash(&entry.leaf_data));
        }
    }
    if frontier.root() != head.root_hash {
        return Err(AuditorError::Entries(format!(
            "the {} entries hash to {}, the signed head says {}",
            head.tree_size,
            hex::encode(frontier.root()),
            hex::encode(head.root_hash)
        )));
    }
    Ok(Walked {
        entries: frontier.size(),
        handovers,
    })
}
