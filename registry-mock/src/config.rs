//! A mock register's configuration file:
//!
//! ```toml
//! register = "civil"              # civil | vehicle | business
//! # data = "my-civil.json"        # optional: other data of the shipped shape
//!
//! [connector]                     # the SDK's ConnectorConfig
//! listen = "127.0.0.1:7101"
//! [connector.tls]
//! ca = "../pki/ca.pem"
//! cert = "../pki/connector/civil-register.pem"
//! key = "../pki/connector/civil-register.key"
//! crl = "../pki/crl.pem"
//!
//! [faults]                        # optional
//! latency = "50ms"
//! failure_rate = 0.1
//! refuse_subjects = ["82281866209"]
//! ```

use std::path::{Path, PathBuf};

use onceonly_certs::config_file::{self, ConfigFileError, relative_to};
use onceonly_connector_sdk::ConnectorConfig;
use serde::Deserialize;

use crate::faults::Faults;
use crate::registers::{MockRegister, RegisterKind};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    /// Which register to serve.
    pub register: RegisterKind,
    /// Data file; the shipped data where absent.
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// The connector server.
    pub connector: ConnectorConfig,
    /// Faults to inject.
    #[serde(default)]
    pub faults: Faults,
}

impl MockConfig {
    /// Reads, resolves relative paths, applies environment overrides and
    /// validates.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let mut config: MockConfig = config_file::load_toml(path)?;
        config.connector.resolve_paths(path);
        config.data = config.data.map(|data| relative_to(path, &data));
        config
            .connector
            .apply_env(path, |key| std::env::var(key).ok())?;
        config.connector.validate(path)?;
        config.faults.validate().map_err(|problem| {
            ConfigFileError::invalid(
                path,
                "faults",
                problem,
                "see the registry-mock README section",
            )
        })?;
        Ok(config)
    }

    /// The register this configuration describes.
    pub fn register(&self) -> Result<MockRegister, crate::data::DataError> {
        let register = match &self.data {
            Some(path) => MockRegister::from_file(self.register, path)?,
            None => MockRegister::embedded(self.register)?,
        };
        Ok(register.with_faults(self.faults.clone()))
    }
}
