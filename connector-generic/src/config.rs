//! The connector's configuration file: where the mapping is, and the SDK's
//! server settings under `[connector]`.
//!
//! ```toml
//! mapping = "mapping.toml"          # relative to this file
//!
//! [connector]                       # the SDK's settings
//! listen = "127.0.0.1:7104"
//! allowed_broker_id = "broker"
//! [connector.tls]
//! ca = "/etc/onceonly/tls/ca.pem"
//! cert = "/etc/onceonly/tls/school-register.pem"
//! key = "/etc/onceonly/tls/school-register.key"
//! crl = "/etc/onceonly/tls/crl.pem"
//! ```

use std::path::{Path, PathBuf};

use onceonly_certs::config_file::{self, ConfigFileError, relative_to};
use onceonly_connector_sdk::ConnectorConfig;
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericConfig {
    /// The mapping file (reloaded on SIGHUP).
    pub mapping: PathBuf,
    /// The connector server.
    pub connector: ConnectorConfig,
}

impl GenericConfig {
    /// Reads, resolves relative paths, applies `ONCEONLY_CONNECTOR_*`
    /// overrides and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let mut config: GenericConfig = config_file::load_toml(path)?;
        config.mapping = relative_to(path, &config.mapping);
        config.connector.prepare_nested(path)?;
        if !config.mapping.is_file() {
            return Err(ConfigFileError::invalid(
                path,
                "mapping",
                format!("{} does not exist", config.mapping.display()),
                "name the mapping file (relative to this file), e.g. mapping = \"mapping.toml\"",
            ));
        }
        Ok(config)
    }
}
