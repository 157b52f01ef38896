//! The onceonly broker: the service requesting authorities call to fetch
//! evidence from the register that holds it.
//!
//! Start with [`exchange`], the path of one request from authentication to
//! the durable audit record and the answer. Around it:
//!
//! - [`config`] reads `broker.toml`;
//! - [`routing`] is the evidence-type catalogue and where each type is served;
//! - [`policy`] says who may fetch what, why, and with whose consent, and
//!   [`quota`] how often; [`policy_review`] lints an edited policy and
//!   replays logged decisions under it, and [`console`] shows both to
//!   policy staff, and the log to auditors, in a browser;
//! - [`refusal`] is every way an exchange ends without evidence, classed
//!   once into a gRPC status and an audit outcome;
//! - [`consent`] names and seals the subjects of consents, and
//!   [`revocations`] keeps the revocations the signed log holds, so no
//!   row written back can undo one;
//! - [`storage_config`] is `[storage]`: the backend, chosen once;
//! - [`storage`] opens the stores the request path keeps its state in
//!   (the traits of [`onceonly_store`]: the audit log, consents, the
//!   request window, quotas), embedded or on PostgreSQL: the one place
//!   that chooses a backend;
//! - [`audit`] is the durable, group-committed audit log (the
//!   `onceonly-audit-log` crate, beside [`onceonly_merkle`]), and
//!   [`access_log`] records in it what portals do with a subject's data;
//! - [`pseudonym`] makes keyed pseudonyms of subject ids for the log;
//! - [`keys`] creates (once), loads and rotates the broker's own keys;
//! - [`idempotency`] gives repeated request ids the first outcome;
//! - [`forward`] calls connectors over mutual TLS, with identity checks and
//!   failover, skipping endpoints whose [`circuit`] is open;
//! - [`services`] are the gRPC services; [`server`] starts, serves, reloads
//!   and stops them, and keeps readiness (gRPC health) true;
//! - [`metrics`] counts and times what the broker does, served on a
//!   separate admin listener.
//!
//! The `onceonly-broker` binary is a thin CLI over [`server`].

pub mod access_log;
pub mod admin;
pub mod circuit;
pub mod config;
pub mod consent;
pub mod console;
pub mod exchange;
pub mod forward;
pub mod idempotency;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod policy_diff;
pub mod policy_log;
pub mod policy_review;
pub mod pseudonym;
pub mod quota;
pub mod refusal;
pub mod revocations;
pub mod routing;
pub mod server;
pub mod services;
pub mod storage;
pub mod storage_config;

pub use config::BrokerConfig;
/// The audit log, a crate of its own ([`onceonly_audit_log`]): the broker
/// runs it, auditors verify it without the broker.
pub use onceonly_audit_log as audit;
/// The auditor's remote checks (the `onceonly-audit` CLI's).
pub use onceonly_audit_log::auditor;
pub use server::{BoundBroker, RunningBroker, StartError};
