//! # The onceonly connector SDK
//!
//! Put a register behind the onceonly broker in an afternoon: implement the
//! [`Connector`] trait (say which evidence types you serve; look one up),
//! and [`ConnectorServer`] gives you a complete `onceonly.v1.ConnectorService`:
//!
//! - mutual TLS 1.3 (rustls) that accepts only the broker's certificate
//!   (role `broker`, and only the configured `allowed_broker_id`), with the
//!   CRL (required unless `tls.allow_no_crl`) checked and reloaded on SIGHUP;
//! - requests validated before your code runs: a malformed subject id, an
//!   evidence type you do not serve, an unknown parameter, a request without
//!   the broker's valid authorization ticket for exactly it never reach you;
//! - the caller's deadline honoured (your future is dropped when it passes,
//!   and the broker gets DEADLINE_EXCEEDED), a concurrency limit, message
//!   size limits;
//! - the evidence envelope filled in: SHA-256 digest, connector id, time of
//!   issue, the register's signed statement, encryption to the requester
//!   where asked; your typed [`ProvideError`] mapped to the documented gRPC
//!   status;
//! - gRPC health checking and server reflection; `tracing` spans carrying
//!   the broker's W3C trace id and exchange id; Prometheus [`metrics`] on
//!   an optional admin listener; graceful shutdown.
//!
//! ## Example
//!
//! ```no_run
//! use onceonly_connector_sdk::{
//!     Connector, ConnectorConfig, ConnectorServer, EvidencePayload, EvidenceRequest,
//!     ProvideError, evidence_type,
//! };
//! use onceonly_connector_sdk::proto::{EvidenceTypeInfo, SubjectIdScheme};
//!
//! /// A register of dog licences, keyed by the holder's IDNr.
//! struct DogRegister;
//!
//! impl Connector for DogRegister {
//!     fn evidence_types(&self) -> Vec<EvidenceTypeInfo> {
//!         vec![evidence_type("dog-licence", "Dog licence", &["application/json"], &[SubjectIdScheme::DeIdnr])]
//!     }
//!
//!     async fn provide(&self, request: EvidenceRequest) -> Result<EvidencePayload, ProvideError> {
//!         match request.subject.value.as_str() {
//!             "86095742719" => Ok(EvidencePayload::json(r#"{"licence":"HUND-0815","breed":"Dackel"}"#)),
//!             _ => Err(ProvideError::SubjectNotFound),
//!         }
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> anyhow::Result<()> {
//!     let config = ConnectorConfig::load("dog-register.toml".as_ref())?;
//!     ConnectorServer::new(DogRegister, config).bind().await?.serve().await?;
//!     Ok(())
//! }
//! ```
//!
//! `connector-sdk/examples/minimal.rs` is the same as a runnable program;
//! `registry-mock/` is a fuller one with three registers.

pub mod config;
pub mod connector;
pub mod metrics;
pub mod server;
mod service;

pub use config::{ConnectorConfig, Limits};
pub use connector::{Connector, EvidencePayload, EvidenceRequest, ProvideError, Subject};
pub use server::{BoundConnector, ConnectorServer, RunningConnector, ServeError};

/// The onceonly.v1 wire types connectors use.
pub mod proto {
    pub use onceonly_proto::v1::{
        EvidenceParameter, EvidenceTypeInfo, RegisterSignature, SubjectIdScheme,
    };
}

/// Describes an evidence type with no parameters and no jurisdiction limit.
pub fn evidence_type(
    id: &str,
    display_name: &str,
    media_types: &[&str],
    subject_schemes: &[onceonly_proto::v1::SubjectIdScheme],
) -> onceonly_proto::v1::EvidenceTypeInfo {
    onceonly_proto::v1::EvidenceTypeInfo {
        evidence_type: id.to_owned(),
        display_name: display_name.to_owned(),
        media_types: media_types.iter().map(|m| (*m).to_owned()).collect(),
        subject_schemes: subject_schemes.iter().map(|s| *s as i32).collect(),
        ..Default::default()
    }
}
