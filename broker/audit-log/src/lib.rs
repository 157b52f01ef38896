//! The audit log: one record per exchange, in an append-only Merkle log in
//! the manner of Certificate Transparency (RFC 9162), durable before the
//! caller is answered.
//!
//! Appends go through one writer thread ([`writer`]) that batches whatever is waiting
//! (group commit). For a batch it assigns log indexes, hashes the records
//! into the tree ([`onceonly_merkle::Frontier`]), signs the new tree head
//! with the broker's audit key, and appends records, the tree nodes they
//! complete and the signed head as ONE frame to the log file
//! ([`segment`]), made durable with one `fdatasync`; only then is every
//! request in the batch answered. A crash leaves either the whole frame or
//! a torn tail that reopening cuts off (no one was answered for it), so
//! the log always reopens at its last signed head. A batch that fails
//! fails every request in it, and those callers get no evidence; after a
//! failed flush the log refuses all appends until restarted (the kernel
//! may have dropped the unflushed pages, so nothing later could be
//! trusted to be on disk).
//!
//! Sled ([`store`], [`index`]) holds only what can be rebuilt from the file: where each batch's
//! frame starts, and the query indexes (one entry per batch and indexed
//! value, listing the records). They are written after the flush without
//! one of their own; on opening, frames the index has not seen are indexed
//! again.
//!
//! Records hold the payload digest, never the payload, and the subject only
//! as a keyed pseudonym. [`verify_dir`] checks a copied data directory end
//! to end with nothing but the public key and the file.
//!
//! The crate by job:
//!
//! - [`segment`]: the log file's frames, written and read;
//! - [`head`]: signed tree heads on the wire, and the public key's file;
//! - [`handover`]: key rotation as signed log entries;
//! - [`verify`]: offline verification of a copied data directory;
//! - [`auditor`]: the auditor's remote checks over gRPC (the `onceonly-audit`
//!   CLI is a thin binary over these two);
//! - with the default `store` feature, the log the broker runs: [`log`]
//!   (open, recover, read, query, prove), [`writer`] (group commit),
//!   [`indexer`] (the index, in larger batches behind the writer),
//!   [`store`] (the file and sled together), [`index`] (the query indexes
//!   in sled), [`metrics`].
//!
//! Without `store` the crate builds with no sled at all: what an auditor's
//! tool needs and nothing it does not.

pub mod auditor;
#[cfg(feature = "store")]
pub mod fault;
pub mod handover;
pub mod head;
#[cfg(feature = "store")]
pub mod index;
#[cfg(feature = "store")]
pub mod indexer;
#[cfg(feature = "store")]
pub mod log;
#[cfg(feature = "store")]
pub mod metrics;
pub mod receipt;
pub mod segment;
#[cfg(feature = "store")]
pub mod store;
pub mod verify;
#[cfg(feature = "store")]
pub mod writer;

pub use head::{head_from_proto, head_to_proto, public_key_path};
#[cfg(feature = "store")]
pub use index::AuditFilter;
#[cfg(feature = "store")]
pub use log::{AuditFault, AuditLog};
#[cfg(feature = "store")]
pub use metrics::AuditMetrics;
#[cfg(feature = "store")]
pub use store::{open_storage, open_storage_async, time_a_flush};
pub use verify::{Tamper, VerifiedLog, verify_dir, verify_dir_against};

/// Why the log failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The storage failed.
    #[error("audit storage failed: {0}")]
    Storage(String),
    /// The writer is gone (shutting down).
    #[error("the audit writer has stopped")]
    WriterStopped,
    /// A stored record or head does not decode.
    #[error("audit log corrupt: {0}")]
    Corrupt(String),
    /// A proof was asked for sizes the log cannot prove.
    #[error("{0}")]
    OutOfRange(String),
    /// This log does not offer what was asked (the reason says what it
    /// offers instead).
    #[error("{0}")]
    Unsupported(String),
    /// The log's last signed head was not signed by the configured key.
    #[error(
        "{log}: its last signed tree head (of {size} records) does not verify under the configured audit key (public key {public_key}): this is not the key that signed this log. Restore the key that did; a new key is never started over an existing log (rotate with `onceonly-broker rotate-audit-key`)"
    )]
    WrongKey {
        /// The log file.
        log: String,
        /// The head's size.
        size: u64,
        /// The configured key's public half, hex.
        public_key: String,
    },
}

#[cfg(feature = "store")]
impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> Self {
        AuditError::Storage(e.to_string())
    }
}

impl From<std::io::Error> for AuditError {
    fn from(e: std::io::Error) -> Self {
        AuditError::Storage(format!("{}: {e}", segment::FILE_NAME))
    }
}
