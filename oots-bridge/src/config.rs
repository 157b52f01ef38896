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
    /// The citizen's preview pages; needed where the mapping asks for a
    /// preview.
    pub preview: Option<PreviewConfig>,
}

/// Where the preview pages are served, and how people sign in there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewConfig {
    /// The address to listen on, e.g. "0.0.0.0:8444".
    pub listen: SocketAddr,
    /// The pages' public address as people's browsers reach them, e.g.
    /// "https://preview.example.de" (no trailing slash).
    pub public_url: String,
    /// The site's certificate chain (PEM): in service, a web PKI
    /// certificate for the public address's host.
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// For tests and demonstrations only: people sign in with these codes
    /// (no eID integration ships yet; see THREAT_MODEL.md).
    #[serde(default)]
    pub test_sign_in: Vec<TestIdentity>,
}

/// A code that signs one person in at the test sign-in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestIdentity {
    /// The code.
    pub code: String,
    /// The person's eIDAS identifier.
    pub identifier: String,
    /// The level of assurance the sign-in counts as (default "high").
    #[serde(default = "high")]
    pub level_of_assurance: crate::mapping::Assurance,
}

fn high() -> crate::mapping::Assurance {
    crate::mapping::Assurance::High
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

/// The longest T2 or T3 the bridge takes.
const MOST_PREVIEW_WAIT: Duration = Duration::from_secs(6 * 3600);

/// The OOTS deadlines (TDD: T1 5 minutes for a round trip without
/// preview, T2 15 minutes for the user to reach the preview, T3 40 minutes
/// to decide); the broker is given what T1 leaves after a margin for the
/// answer's way back, so a late register is EDM:ERR:0005 before the
/// requester gives up. The requester waits a minute longer than each.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Deadlines {
    /// T1 (default "5m").
    #[serde(with = "humantime_serde")]
    pub t1: Duration,
    /// What the bridge keeps of T1 for the answer's way back (default "30s").
    #[serde(with = "humantime_serde")]
    pub margin: Duration,
    /// T2: how long the person has to reach the preview and sign in
    /// (default "15m").
    #[serde(with = "humantime_serde")]
    pub t2: Duration,
    /// T3: how long the person has to decide once signed in (default
    /// "40m").
    #[serde(with = "humantime_serde")]
    pub t3: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            t1: Duration::from_secs(300),
            margin: Duration::from_secs(30),
            t2: Duration::from_secs(15 * 60),
            t3: Duration::from_secs(40 * 60),
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
        if let Some(preview) = &mut config.preview {
            preview.cert = relative_to(path, &preview.cert);
            preview.key = relative_to(path, &preview.key);
            preview.public_url = preview.public_url.trim_end_matches('/').to_owned();
            if preview
                .public_url
                .parse::<http::Uri>()
                .ok()
                .is_none_or(|uri| uri.scheme_str() != Some("https") || uri.host().is_none())
            {
                return Err(ConfigFileError::invalid(
                    path,
                    "preview.public_url",
                    format!("{:?} is not an https:// address", preview.public_url),
                    "give the address people's browsers reach the preview at, e.g. \"https://preview.example.de\"",
                ));
            }
            if preview.test_sign_in.is_empty() {
                return Err(ConfigFileError::invalid(
                    path,
                    "preview.test_sign_in",
                    "no way for people to sign in at the preview is configured",
                    "no eID sign-in ships yet: list [[preview.test_sign_in]] codes for a test or demonstration, or leave [preview] out and map no evidence with preview = true",
                ));
            }
        }
        for (key, value) in [
            ("deadlines.t2", config.deadlines.t2),
            ("deadlines.t3", config.deadlines.t3),
        ] {
            if value.is_zero() || value > MOST_PREVIEW_WAIT {
                return Err(ConfigFileError::invalid(
                    path,
                    key,
                    format!(
                        "{} is not between 1 s and 6 h",
                        humantime::format_duration(value)
                    ),
                    "give a duration such as \"15m\" (OOTS: T2 15 minutes, T3 40 minutes); the broker records a preview's steps only for exchanges of the last 24 hours",
                ));
            }
        }
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
