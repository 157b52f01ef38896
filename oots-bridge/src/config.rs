//! `bridge.toml`: where the broker and the access point are, the bridge's
//! identity towards each, the mapping, and the OOTS deadlines. Paths are
//! relative to the file; errors name the file, the line and the fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use onceonly_certs::config_file::{ConfigFileError, load_toml, relative_to};
use onceonly_certs::pki::TlsFiles;
use serde::Deserialize;

use crate::edm::request::Agent;

/// The bridge's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// The broker's API address, e.g. "127.0.0.1:7443".
    pub broker: SocketAddr,
    /// The bridge's authority certificate towards the broker (role
    /// `authority`), with the trust domain's CA and CRL.
    pub tls: TlsFiles,
    /// The bridge's encryption certificate and key: evidence comes
    /// encrypted to it.
    pub encryption: EncryptionFiles,
    /// The mapping file (see `oots-bridge/config/mapping.toml`).
    pub mapping: PathBuf,
    /// The access point's backend interface.
    pub access_point: AccessPoint,
    /// Who the bridge is to the EU: the evidence provider's agent.
    pub provider: ProviderAgent,
    /// The OOTS deadlines.
    #[serde(default)]
    pub deadlines: Deadlines,
}

/// The encryption certificate and key (PEM).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionFiles {
    /// `<id>.enc.pem`.
    pub cert: PathBuf,
    /// `<id>.enc.key`.
    pub key: PathBuf,
}

/// The access point's backend interface: the Domibus WS plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessPoint {
    /// The plugin's endpoint, e.g. "http://127.0.0.1:8080/domibus/services/wsplugin".
    pub endpoint: String,
    /// How often the bridge asks for pending messages (default "2s").
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
}

fn default_poll() -> Duration {
    Duration::from_secs(2)
}

/// The bridge as the EU sees it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderAgent {
    /// Its identifier, e.g. "DE987654321".
    pub identifier: String,
    /// The identifier's scheme, e.g. "urn:cef.eu:names:identifier:EAS:9930".
    pub scheme: String,
    /// Its name.
    pub name: String,
}

/// The OOTS deadlines (TDD: T1 5 minutes for a round trip without
/// preview); the broker is given what T1 leaves after a margin for the
/// answer's way back, so a late register is EDM:ERR:0005 before the
/// requester gives up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Deadlines {
    /// T1 (default "5m").
    #[serde(with = "humantime_serde")]
    pub t1: Duration,
    /// What the bridge keeps of T1 for the answer's way back (default "30s").
    #[serde(with = "humantime_serde")]
    pub margin: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            t1: Duration::from_secs(300),
            margin: Duration::from_secs(30),
        }
    }
}

impl Deadlines {
    /// How long the broker is given.
    pub fn broker(&self) -> Duration {
        self.t1.saturating_sub(self.margin)
    }
}

impl BridgeConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<BridgeConfig, ConfigFileError> {
        let mut config: BridgeConfig = load_toml(path)?;
        for slot in [
            &mut config.tls.ca,
            &mut config.tls.cert,
            &mut config.tls.key,
            &mut config.encryption.cert,
            &mut config.encryption.key,
            &mut config.mapping,
        ] {
            *slot = relative_to(path, slot);
        }
        config.tls.crl = config.tls.crl.as_ref().map(|crl| relative_to(path, crl));
        if config.deadlines.broker().is_zero() {
            return Err(ConfigFileError::invalid(
                path,
                "deadlines",
                "the margin leaves the broker no time within T1",
                "make deadlines.margin shorter than deadlines.t1",
            ));
        }
        if config.access_point.poll_interval.is_zero() {
            return Err(ConfigFileError::invalid(
                path,
                "access_point.poll_interval",
                "is zero",
                "give an interval such as \"2s\"",
            ));
        }
        if config
            .access_point
            .endpoint
            .parse::<http::Uri>()
            .ok()
            .is_none_or(|uri| uri.scheme_str() != Some("http") || uri.host().is_none())
        {
            return Err(ConfigFileError::invalid(
                path,
                "access_point.endpoint",
                format!(
                    "{:?} is not an http:// address",
                    config.access_point.endpoint
                ),
                "give the WS plugin's address, e.g. \"http://127.0.0.1:8080/domibus/services/wsplugin\" (the plugin listens on the access point's host; TLS to it is the next step)",
            ));
        }
        Ok(config)
    }

    /// The provider's agent.
    pub fn provider_agent(&self) -> Agent {
        Agent {
            identifier: self.provider.identifier.clone(),
            scheme: self.provider.scheme.clone(),
            name: self.provider.name.clone(),
            classification: "IP".into(),
        }
    }
}
