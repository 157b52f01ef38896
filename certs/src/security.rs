//! Security events a server counts instead of storing: connections turned
//! away at the door, handshakes that failed or timed out, and calls refused
//! because the client's certificate was. A flood of such events costs a
//! counter increment each (and one log line a second), never disk in
//! proportion to the flood, and leaves nothing linked to a subject.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalKind {
    /// At the door: `max_connections` reached.
    ConnectionLimit,
    /// At the door: `max_connections_per_address` reached.
    AddressLimit,
    /// The TLS handshake did not finish within the handshake timeout (or
    /// the client sent nothing after it).
    HandshakeTimeout,
    /// The TLS handshake failed (protocol error, no common parameters, a
    /// certificate refused in the handshake itself).
    HandshakeFailed,
    /// The client presented no certificate.
    NoCertificate,
    /// Its certificate is revoked.
    Revoked,
    /// Its certificate is expired or not yet valid.
    Expired,
    /// Its certificate does not chain to the trust domain's CA.
    UntrustedIssuer,
    /// Its certificate is of another trust domain, or carries no usable
    /// identity.
    BadIdentity,
    /// The revocation list is stale and the server refuses until a fresh
    /// one is published.
    CrlStale,
    /// Any other certificate problem.
    OtherCertificate,
}

impl RefusalKind {
    /// Every kind, in a fixed order (for counters and metrics).
    pub const ALL: [RefusalKind; 11] = [
        RefusalKind::ConnectionLimit,
        RefusalKind::AddressLimit,
        RefusalKind::HandshakeTimeout,
        RefusalKind::HandshakeFailed,
        RefusalKind::NoCertificate,
        RefusalKind::Revoked,
        RefusalKind::Expired,
        RefusalKind::UntrustedIssuer,
        RefusalKind::BadIdentity,
        RefusalKind::CrlStale,
        RefusalKind::OtherCertificate,
    ];

    /// A stable snake_case name (log fields, metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::ConnectionLimit => "connection_limit",
            RefusalKind::AddressLimit => "address_limit",
            RefusalKind::HandshakeTimeout => "handshake_timeout",
            RefusalKind::HandshakeFailed => "handshake_failed",
            RefusalKind::NoCertificate => "no_certificate",
            RefusalKind::Revoked => "revoked",
            RefusalKind::Expired => "expired",
            RefusalKind::UntrustedIssuer => "untrusted_issuer",
            RefusalKind::BadIdentity => "bad_identity",
            RefusalKind::CrlStale => "crl_stale",
            RefusalKind::OtherCertificate => "other_certificate",
        }
    }

    fn index(self) -> usize {
        RefusalKind::ALL
            .iter()
            .position(|k| *k == self)
            .unwrap_or(RefusalKind::ALL.len() - 1)
    }
}

impl fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of refused connections and calls, by [`RefusalKind`].
#[derive(Debug, Default)]
pub struct SecurityEvents {
    connections: [AtomicU64; RefusalKind::ALL.len()],
    calls: [AtomicU64; RefusalKind::ALL.len()],
}

impl SecurityEvents {
    /// Counts a connection refused (at the door or in the handshake).
    pub fn connection_refused(&self, kind: RefusalKind) {
        self.connections[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a call refused because of its client's certificate.
    pub fn call_refused(&self, kind: RefusalKind) {
        self.calls[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections refused for `kind` so far.
    pub fn connections(&self, kind: RefusalKind) -> u64 {
        self.connections[kind.index()].load(Ordering::Relaxed)
    }

    /// Calls refused for `kind` so far.
    pub fn calls(&self, kind: RefusalKind) -> u64 {
        self.calls[kind.index()].load(Ordering::Relaxed)
    }

    /// Calls refused for any reason so far.
    pub fn calls_total(&self) -> u64 {
        RefusalKind::ALL.iter().map(|k| self.calls(*k)).sum()
    }

    /// Connections refused for any reason so far.
    pub fn connections_total(&self) -> u64 {
        RefusalKind::ALL.iter().map(|k| self.connections(*k)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind_and_in_all() {
        let events = SecurityEvents::default();
        events.call_refused(RefusalKind::Revoked);
        events.call_refused(RefusalKind::Revoked);
        events.call_refused(RefusalKind::NoCertificate);
        events.connection_refused(RefusalKind::AddressLimit);
        assert_eq!(events.calls(RefusalKind::Revoked), 2);
        assert_eq!(events.calls_total(), 3);
        assert_eq!(events.connections_total(), 1);
        assert_eq!(events.connections(RefusalKind::Revoked), 0);
        for kind in RefusalKind::ALL {
            assert_eq!(
                kind.index(),
                RefusalKind::ALL
                    .iter()
                    .position(|k| *k == kind)
                    .unwrap_or(99)
            );
        }
    }
}
