//! The onceonly participant PKI, identities and mutual TLS.
//!
//! - [`pki`]: create a root CA for a trust domain, issue participant
//!   certificates (`spiffe://<trust-domain>/<role>/<id>`), revoke them into a
//!   standard CRL; [`pki::Pki::throwaway`] makes a whole PKI for a test.
//! - [`identity`]: the one place that turns a certificate into a
//!   [`Participant`] and verifies chain, validity and revocation.
//! - [`tls`]: rustls TLS 1.3 server and client configurations, a reloadable
//!   server configuration, and the glue that hands verified streams (with the
//!   peer's identity) to tonic.
//! - [`connection`]: limits on the connections a server accepts (at the
//!   door, in the handshake, per HTTP/2 connection, when idle).
//! - [`security`]: counters of refused connections and calls, by reason.
//! - [`inspect`]: what `onceonly-certs inspect` prints.
//! - [`report`]: an error and its causes, for a person, each cause once.
//!
//! The `onceonly-certs` binary is a thin CLI over this library.

pub mod config_file;
pub mod connection;
pub mod identity;
pub mod inspect;
pub mod metrics;
pub mod pki;
pub mod report;
pub mod security;
pub mod serve;
pub mod tls;

pub use connection::ConnectionLimits;
pub use identity::{IdentityError, IdentityVerifier, Participant, Role};
pub use pki::{InitOptions, IssueOptions, KeyAlgorithm, Pki, PkiError, TlsFiles};
pub use tls::{
    ClientAuth, MtlsConnector, MtlsIncoming, PeerIdentity, PeerRefusal, ReloadableServerTls,
    peer_identity,
};
