//! What can go wrong with the log's state, shared by the writer, the
//! indexer, the store and the log: the faults a test or drill injects, and
//! the error of a lock a panicking thread left poisoned.

use crate::AuditError;

/// A fault to inject into the log's writer, for fail-closed drills and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AuditFault {
    /// None: appends work.
    None = 0,
    /// Every append fails before it is written.
    Append = 1,
    /// Appends are written, flushed and answered, then indexing them fails
    /// (their frames must stay readable, and the log refuse further appends
    /// until reopened, which indexes them).
    IndexAfterFlush = 2,
}

/// The error for a lock a thread panicked while holding.
pub(crate) fn poisoned() -> AuditError {
    AuditError::Storage("a thread panicked while holding the signed head".into())
}
