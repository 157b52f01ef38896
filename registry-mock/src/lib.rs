//! Sample registers for onceonly, each a real connector built on the
//! connector SDK: a civil register (birth certificates, proof of residence,
//! keyed by IDNr), a vehicle register (by holder IDNr and licence plate) and
//! a commercial register (by register number), with fictitious data shipped
//! in `data/`, JSON and XML payloads, and switches for latency, failures and
//! refused subjects.
//!
//! [`MockRegister`] is the connector; [`config::MockConfig`] the file the
//! `onceonly-registry-mock` binary reads.

pub mod config;
pub mod data;
pub mod faults;
pub mod registers;

pub use faults::Faults;
pub use registers::{MockRegister, RegisterKind};
