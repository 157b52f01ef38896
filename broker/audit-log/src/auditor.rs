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
    /// The receipt itself does not hold.
    #[error("{0}")]
    Receipt(#[from] crate::receipt::ReceiptError),
    /// A signed head later than the receipt's include_by lacks its record:
    /// the broker broke its signed promise (keep the receipt and the head).
    #[error(
        "the broker promised to include the record (leaf hash {leaf_hash}) by {include_by_ms} ms, but its head of {tree_size} records signed at {head_ms} ms does not hold it: keep this receipt and head, they prove the broken promise"
    )]
    PromiseBroken {
        /// The record's leaf hash, hex.
        leaf_hash: String,
        /// The promise.
        include_by_ms: u64,
        /// The head's size.
        tree_size: u64,
        /// When the head was signed.
        head_ms: u64,
    },
}

/// Where a receipt's record stands in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptStatus {
    /// In the log at `index`, proven against `head`.
    Included {
        /// The record's index.
        index: u64,
        /// The verified head that includes it.
        head: SignedTreeHead,
    },
    /// Not in the latest head yet, which was signed before the promise's
    /// deadline: check again after it.
    Pending {
        /// The latest head's size.
        tree_size: u64,
        /// The promise.
        include_by_ms: u64,
        /// Whether the deadline has passed by this machine's clock (by more
        /// than a minute, for clock differences): the broker publishes no
        /// head since, which breaks the promise too, though no signed head
        /// proves it yet.
        overdue: bool,
    },
}

/// Checks `receipt` offline with `public_key`, then against the broker's
/// latest signed head: proves the record's inclusion by its leaf hash, or
/// finds the promise still pending, or broken.
pub async fn check_receipt(
    client: &mut AuditServiceClient<Channel>,
    public_key: &[u8],
    receipt: &onceonly_proto::v1::AuditReceipt,
) -> Result<ReceiptStatus, AuditorError> {
    let checked = crate::receipt::verify(receipt, public_key)?;
    let head = client
        .get_signed_tree_head(GetSignedTreeHeadRequest {})
        .await?
        .into_inner()
        .tree_head
        .map(|h| head_from_proto(&h).map_err(|e| AuditorError::BadHead(e.to_string())))
        .transpose()?;
    let (size, head_ms) = head
        .as_ref()
        .map_or((0, 0), |h| (h.tree_size, h.timestamp_ms));
    if let Some(head) = &head {
        head.verify(public_key)
            .map_err(|e| AuditorError::BadHead(e.to_string()))?;
    }
    let not_there = || {
        if head_ms > checked.include_by_ms {
            Err(AuditorError::PromiseBroken {
                leaf_hash: hex::encode(checked.leaf_hash),
                include_by_ms: checked.include_by_ms,
                tree_size: size,
                head_ms,
            })
        } else {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            Ok(ReceiptStatus::Pending {
                tree_size: size,
                include_by_ms: checked.include_by_ms,
                overdue: now > checked.include_by_ms.saturating_add(60_000),
            })
        }
    };
    let Some(head) = head else {
        return not_there();
    };
    let proof = match client
        .get_inclusion_proof(onceonly_proto::v1::GetInclusionProofRequest {
            leaf_index: 0,
            tree_size: head.tree_size,
            leaf_hash: checked.leaf_hash.to_vec(),
        })
        .await
    {
        Ok(proof) => proof.into_inner(),
        Err(status) if status.code() == tonic::Code::NotFound => return not_there(),
        Err(status) => return Err(status.into()),
    };
    let path: Vec<Hash> = proof
        .audit_path
        .into_iter()
        .map(|p| {
            p.try_into()
                .map_err(|_| AuditorError::Entries("an audit path hash is not 32 bytes".into()))
        })
        .collect::<Result<_, _>>()?;
    onceonly_merkle::verify_inclusion(
        &checked.leaf_hash,
        proof.leaf_index,
        head.tree_size,
        &path,
        &head.root_hash,
    )
    .map_err(|e| {
        AuditorError::Entries(format!(
            "the broker's inclusion proof for the receipt's record does not verify: {e}"
        ))
    })?;
    // Where this caller may read entries (an auditor), the record at that
    // place must be the receipt's exchange's: a receipt moved to another
    // exchange's record is a broken promise too.
    match client
        .get_entries(GetEntriesRequest {
            start_index: proof.leaf_index,
            max_entries: 1,
        })
        .await
    {
        Ok(entries) => {
            let entry = entries
                .into_inner()
                .entries
                .into_iter()
                .next()
                .ok_or_else(|| {
                    AuditorError::Entries(format!("no entry at {}", proof.leaf_index))
                })?;
            let record = onceonly_proto::v1::AuditRecord::decode(entry.leaf_data.as_slice())
                .map_err(|e| AuditorError::Entries(format!("entry {}: {e}", proof.leaf_index)))?;
            if onceonly_merkle::leaf_hash(&entry.leaf_data) != checked.leaf_hash
                || record.exchange_id != receipt.exchange_id
            {
                return Err(AuditorError::Entries(format!(
                    "the record at {} is exchange {:?}, not the receipt's {:?}: keep the receipt, it proves the broken promise",
                    proof.leaf_index, record.exchange_id, receipt.exchange_id
                )));
            }
        }
        Err(status) if status.code() == tonic::Code::PermissionDenied => {}
        Err(status) => return Err(status.into()),
    }
    Ok(ReceiptStatus::Included {
        index: proof.leaf_index,
        head,
    })
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
            // A replica's record carries no index (0): the tree binds it.
            let claimed = if decoded.replica.is_empty() {
                entry.leaf_index
            } else {
                0
            };
            if decoded.log_index != claimed {
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
