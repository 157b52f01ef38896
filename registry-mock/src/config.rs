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
        config.data = config.data.map(|data| relative_to(path, &data));
        config.connector.prepare_nested(path)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped civil sample with `edit` applied, its TLS files from a
    /// throw-away PKI, loaded from a file.
    fn load_edited(edit: impl Fn(String) -> String) -> Result<MockConfig, ConfigFileError> {
        let pki = onceonly_certs::Pki::throwaway(
            "onceonly.test",
            &[(onceonly_certs::Role::Connector, "civil-register")],
        )
        .expect("PKI");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("civil.toml");
        let sample = include_str!("../config/civil.toml")
            .replace("\"../../pki/", &format!("\"{}/", pki.dir().display()));
        std::fs::write(&path, edit(sample)).expect("write");
        MockConfig::load(&path)
    }

    #[test]
    fn the_shipped_sample_loads() {
        load_edited(|text| text).expect("the sample is valid");
    }

    #[test]
    fn an_sdk_setting_in_error_is_named_where_it_stands_under_connector() {
        let error = load_edited(|text| text.replace("concurrency = 256", "concurrency = 0"))
            .expect_err("zero concurrency");
        let text = error.to_string();
        assert!(text.contains("connector.limits.concurrency"), "{text}");
        assert!(text.contains("civil.toml"), "{text}");
    }

    #[test]
    fn admin_listen_and_otlp_endpoint_are_read_under_connector() {
        let config = load_edited(|text| {
            text.replace(
                "# admin_listen = \"127.0.0.1:9471\"",
                "admin_listen = \"127.0.0.1:9471\"",
            )
            .replace(
                "# otlp_endpoint = \"http://127.0.0.1:4317\"",
                "otlp_endpoint = \"http://127.0.0.1:4317\"",
            )
        })
        .expect("valid");
        assert_eq!(
            config.connector.admin_listen,
            Some("127.0.0.1:9471".parse().expect("addr"))
        );
        let export = config.connector.trace_export().expect("an export");
        assert_eq!(export.endpoint, "http://127.0.0.1:4317");
        assert_eq!(
            export.filter,
            onceonly_proto::telemetry::DEFAULT_TRACE_FILTER
        );
    }

    #[test]
    fn a_bad_trace_filter_is_refused_naming_the_key() {
        let error = load_edited(|text| {
            text.replace(
                "allowed_broker_id = \"broker\"\n",
                "allowed_broker_id = \"broker\"\ntrace_filter = \"onceonly=loud\"\n",
            )
        })
        .expect_err("not a level");
        let text = error.to_string();
        assert!(text.contains("connector.trace_filter"), "{text}");
    }
}
