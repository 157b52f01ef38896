//! Offline verification of a copied data directory: with nothing but the
//! audit public key and the log file, every signed head, every record's
//! place and content, the stored tree nodes, and (where the auditor kept
//! one) that the log still extends an earlier head. Needs no sled.

use std::fs::File;
use std::path::Path;

use onceonly_merkle::sth::SignedTreeHead;
use onceonly_merkle::{Frontier, leaf_hash};
use onceonly_proto::v1::AuditRecord;
use prost::Message;

use crate::head::decode_head;
use crate::{handover, segment};

/// What [`verify_dir`] found wrong, naming where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Tamper {
    /// The data directory cannot be read as an audit log.
    #[error("the data directory cannot be read: {0}")]
    Unreadable(String),
    /// The latest tree head's signature does not verify.
    #[error("the latest signed tree head is forged or altered: {0}")]
    ForgedHead(String),
    /// The chain of signing keys (hand-overs) does not hold, or never
    /// reaches the trusted key.
    #[error("the audit log's signing keys do not chain to the trusted key: {0}")]
    KeyChain(String),
    /// A record is missing from the sequence.
    #[error("record {index} is missing (removed); the next record present is {next}")]
    Removed {
        /// The missing index.
        index: u64,
        /// The next present.
        next: u64,
    },
    /// A record sits at another position than it was written at.
    #[error("record at position {position} says it is record {claims}: records were reordered")]
    Reordered {
        /// Where it is.
        position: u64,
        /// Which it claims to be.
        claims: u64,
    },
    /// A record's bytes were changed.
    #[error("record {index} was altered: its content no longer matches its leaf hash")]
    Altered {
        /// The record.
        index: u64,
    },
    /// Records at the end are gone.
    #[error(
        "the log was truncated: the signed head covers {signed} records, only {present} are present (records {present}.. removed)"
    )]
    Truncated {
        /// Records the head covers.
        signed: u64,
        /// Records present.
        present: u64,
    },
    /// The records do not hash to the signed root; localized by history.
    #[error(
        "the records do not hash to the signed tree head; the first difference lies in records {from}..{to}"
    )]
    RootMismatch {
        /// First possibly altered record.
        from: u64,
        /// End of the range.
        to: u64,
    },
    /// Tree nodes stored with a batch do not match its records: proofs
    /// served from them would be wrong.
    #[error("the tree nodes stored with records {from}..{to} do not match the records")]
    TreeNodes {
        /// First record of the batch.
        from: u64,
        /// End of the batch.
        to: u64,
    },
    /// A frame's bytes fail their checksum though its records and head
    /// verify: the file was damaged or edited.
    #[error("the frame at byte {offset} fails its checksum: the file was damaged or edited")]
    Damaged {
        /// Where the frame starts.
        offset: u64,
    },
    /// The log does not extend a head saved earlier: history was rewritten.
    #[error(
        "the log does not extend the head saved at {size} records: its first {size} records hash to another root"
    )]
    NotExtending {
        /// The saved head's size.
        size: u64,
    },
}

/// What a clean [`verify_dir`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedLog {
    /// Records checked.
    pub records: u64,
    /// The verified head.
    pub head: Option<SignedTreeHead>,
}

/// Checks a (copied) data directory end to end with the audit public key
/// (raw 32 bytes) and nothing else: every batch's signed head, every
/// record's place and content, the stored tree nodes, and that the records
/// hash to each signed root. Names the first record that was altered,
/// removed or reordered. A torn last frame (a crash during an append) is
/// not counted: nobody was answered for it.
pub fn verify_dir(data_dir: &Path, public_key: &[u8]) -> Result<VerifiedLog, Tamper> {
    verify_dir_against(data_dir, public_key, None)
}

/// Reads every record of a data directory's log, in order, handing each
/// with its index to `visit`; returns how many. Reads only the log file
/// (a live broker may append meanwhile; a torn last frame ends the read),
/// and checks no signature: for looking at what the log holds (what a
/// policy change would have decided, say), with [`verify_dir`] for proof.
pub fn read_dir_records(
    data_dir: &Path,
    mut visit: impl FnMut(u64, AuditRecord),
) -> Result<u64, Tamper> {
    let path = data_dir.join(segment::FILE_NAME);
    let unreadable =
        |e: &dyn std::fmt::Display| Tamper::Unreadable(format!("{}: {e}", path.display()));
    let file = File::open(&path).map_err(|e| unreadable(&e))?;
    let file_len = file.metadata().map_err(|e| unreadable(&e))?.len();
    let mut offset = 0;
    let mut index = 0u64;
    loop {
        match segment::read_at(&file, offset, file_len).map_err(|e| unreadable(&e))? {
            segment::Read::End | segment::Read::Torn { .. } => return Ok(index),
            segment::Read::Malformed { reason } => {
                return Err(unreadable(&format!("byte {offset}: {reason}")));
            }
            segment::Read::Frame { frame, len, .. } => {
                for bytes in &frame.records {
                    let record = AuditRecord::decode(bytes.as_slice())
                        .map_err(|e| unreadable(&format!("record {index}: {e}")))?;
                    visit(index, record);
                    index += 1;
                }
                offset += len;
            }
        }
    }
}

/// [`verify_dir`], and that the log still holds the records of `saved`, a
/// head the auditor kept from an earlier check: a log cut back by whole
/// batches, or rewritten and re-signed, is only found this way.
pub fn verify_dir_against(
    data_dir: &Path,
    public_key: &[u8],
    saved: Option<&SignedTreeHead>,
) -> Result<VerifiedLog, Tamper> {
    let path = data_dir.join(segment::FILE_NAME);
    let unreadable =
        |e: &dyn std::fmt::Display| Tamper::Unreadable(format!("{}: {e}", path.display()));
    let file = File::open(&path).map_err(|e| unreadable(&e))?;
    let file_len = file.metadata().map_err(|e| unreadable(&e))?.len();
    let frames = |visit: &mut dyn FnMut(u64, segment::Frame, bool) -> Result<(), Tamper>| {
        let mut offset = 0;
        loop {
            match segment::read_at(&file, offset, file_len).map_err(|e| unreadable(&e))? {
                segment::Read::End | segment::Read::Torn { .. } => return Ok(()),
                segment::Read::Malformed { reason } => {
                    return Err(unreadable(&format!("byte {offset}: {reason}")));
                }
                segment::Read::Frame {
                    frame,
                    len,
                    checksum_ok,
                } => {
                    visit(offset, frame, checksum_ok)?;
                    offset += len;
                }
            }
        }
    };

    // First pass: which positions some record elsewhere claims, to tell a
    // removed record from a moved one. (Three reads of the file keep the
    // memory flat however long the log; verification is not a hot path.)
    // It also gathers the key hand-overs, to know which key signed what.
    let mut claimed_elsewhere = std::collections::HashSet::new();
    let mut handovers = Vec::new();
    let mut position = 0u64;
    let mut frame_count = 0usize;
    frames(&mut |_, frame, _| {
        frame_count += 1;
        for bytes in &frame.records {
            if let Ok(record) = AuditRecord::decode(bytes.as_slice()) {
                if record.log_index != position {
                    claimed_elsewhere.insert(record.log_index);
                }
                if let Some(handover) = record.key_handover {
                    handovers.push((position, handover));
                }
            }
            position += 1;
        }
        Ok(())
    })?;
    let chain = handover::KeyChain::build(public_key, &handovers)
        .map_err(|e| Tamper::KeyChain(e.to_string()))?;
    if let Some(saved) = saved {
        saved
            .verify(chain.key_for(saved.tree_size))
            .map_err(|e| Tamper::Unreadable(format!("the saved head does not verify: {e}")))?;
    }

    // Second pass: every record where it says it belongs.
    let mut position = 0u64;
    frames(&mut |_, frame, _| {
        for bytes in &frame.records {
            let record = AuditRecord::decode(bytes.as_slice())
                .map_err(|_| Tamper::Altered { index: position })?;
            if record.log_index != position {
                return Err(
                    if record.log_index > position && !claimed_elsewhere.contains(&position) {
                        Tamper::Removed {
                            index: position,
                            next: record.log_index,
                        }
                    } else {
                        Tamper::Reordered {
                            position,
                            claims: record.log_index,
                        }
                    },
                );
            }
            position += 1;
        }
        Ok(())
    })?;

    // Third pass: leaves, stored tree nodes and signed heads.
    let mut frontier = Frontier::new();
    let mut last_good = 0u64;
    let mut last_head: Option<SignedTreeHead> = None;
    let mut saved_checked = saved.is_none_or(|s| s.tree_size == 0);
    let mut frames_seen = 0usize;
    frames(&mut |offset, frame, checksum_ok| {
        frames_seen += 1;
        let is_last = frames_seen == frame_count;
        let from = frontier.size();
        let mut nodes = frame.nodes.iter();
        for bytes in &frame.records {
            let position = frontier.size();
            for (level, _, hash) in frontier.push(leaf_hash(bytes)) {
                if nodes.next() != Some(&hash) {
                    return Err(if level == 0 {
                        Tamper::Altered { index: position }
                    } else {
                        Tamper::TreeNodes {
                            from,
                            to: from + frame.records.len() as u64,
                        }
                    });
                }
            }
            if let Some(saved) = saved
                && saved.tree_size == frontier.size()
            {
                if saved.root_hash != frontier.root() {
                    return Err(Tamper::NotExtending {
                        size: saved.tree_size,
                    });
                }
                saved_checked = true;
            }
        }
        let present = frontier.size();
        if nodes.next().is_some() {
            return Err(Tamper::TreeNodes { from, to: present });
        }
        let head = decode_head(&frame.head).map_err(|e| {
            Tamper::ForgedHead(format!("the head of records {from}..{present}: {e}"))
        })?;
        head.verify(chain.key_for(present)).map_err(|e| {
            Tamper::ForgedHead(format!("the head of records {from}..{present}: {e}"))
        })?;
        if head.tree_size > present && is_last {
            return Err(Tamper::Truncated {
                signed: head.tree_size,
                present,
            });
        }
        if head.tree_size != present || head.root_hash != frontier.root() {
            return Err(Tamper::RootMismatch {
                from: last_good,
                to: present.max(head.tree_size),
            });
        }
        if !checksum_ok {
            return Err(Tamper::Damaged { offset });
        }
        last_good = present;
        last_head = Some(head);
        Ok(())
    })?;
    if let Some(saved) = saved
        && !saved_checked
    {
        return Err(Tamper::Truncated {
            signed: saved.tree_size,
            present: frontier.size(),
        });
    }
    Ok(VerifiedLog {
        records: frontier.size(),
        head: last_head,
    })
}
