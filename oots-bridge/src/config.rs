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
    /// The plugin's endpoint: "https://ap.example.de/domibus/services/wsplugin",
    /// or "http://127.0.0.1:8080/..." where it listens on the bridge's own
    /// host (evidence never crosses a network in clear).
    pub endpoint: String,
    /// For https: the CA certificates (PEM) the plugin's server certificate
    /// must chain to (no system roots).
    pub ca: Option<PathBuf>,
    /// The bridge's client certificate towards the plugin (PEM), where it
    /// asks for one; with `key`.
    pub cert: Option<PathBuf>,
    /// Its key (PEM).
    pub key: Option<PathBuf>,
    /// The plugin user the bridge signs in as (HTTP basic authentication),
    /// where the plugin asks for one; with `password_file`.
    pub username: Option<String>,
    /// A file holding that user's password (one line; keep it 0600).
    pub password_file: Option<PathBuf>,
    /// How often the bridge asks for pending messages (default "2s").
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl AccessPoint {
    fn check(&self, path: &Path) -> Result<(), ConfigFileError> {
        let invalid = |key: &str, problem: String, fix: &str| {
            Err(ConfigFileError::invalid(path, key, problem, fix))
        };
        let Some(uri) = self
            .endpoint
            .parse::<http::Uri>()
            .ok()
            .filter(|uri| uri.host().is_some())
        else {
            return invalid(
                "access_point.endpoint",
                format!("{:?} is not an address", self.endpoint),
                "give the WS plugin's address, e.g. \"https://ap.example.de/domibus/services/wsplugin\"",
            );
        };
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let own_host = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match uri.scheme_str() {
            Some("https") if self.ca.is_none() => {
                return invalid(
                    "access_point.ca",
                    "is missing for an https:// endpoint".into(),
                    "name the PEM file of the CA that issued the WS plugin's server certificate",
                );
            }
            Some("https") => {}
            Some("http") if own_host => {}
            Some("http") => {
                return invalid(
                    "access_point.endpoint",
                    format!(
                        "{:?} is plain HTTP to another host: evidence would cross the network in clear",
                        self.endpoint
                    ),
                    "use https:// with access_point.ca (plain http:// only to 127.0.0.1, ::1 or localhost)",
                );
            }
            _ => {
                return invalid(
                    "access_point.endpoint",
                    format!("{:?} is not an http:// or https:// address", self.endpoint),
                    "give the WS plugin's address, e.g. \"https://ap.example.de/domibus/services/wsplugin\"",
                );
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            return invalid(
                "access_point.cert",
                "and access_point.key come together".into(),
                "give both the client certificate and its key, or neither",
            );
        }
        if self.username.is_some() != self.password_file.is_some() {
            return invalid(
                "access_point.username",
                "and access_point.password_file come together".into(),
                "give the plugin user and the file holding its password, or neither",
            );
        }
        Ok(())
    }

    /// The transport to the plugin, as configured: its TLS (roots, client
    /// certificate) and its user.
    pub fn transport(&self) -> anyhow::Result<crate::transport::domibus::DomibusWs> {
        use crate::transport::domibus::DomibusWs;
        let endpoint: http::Uri = self.endpoint.parse()?;
        let mut transport = match &self.ca {
            None => DomibusWs::new(endpoint),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in onceonly_certs::pki::load_certs(ca)? {
                    roots
                        .add(cert)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
                }
                let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots);
                let tls = match (&self.cert, &self.key) {
                    (Some(cert), Some(key)) => {
                        use rustls::pki_types::pem::PemObject;
                        let chain = onceonly_certs::pki::load_certs(cert)?;
                        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
                        builder.with_client_auth_cert(chain, key)?
                    }
                    _ => builder.with_no_client_auth(),
                };
                DomibusWs::with_tls(endpoint, tls)
            }
        };
        if let (Some(user), Some(file)) = (&self.username, &self.password_file) {
            let password = std::fs::read_to_string(file).map_err(|e| {
                anyhow::anyhow!("access_point.password_file {}: {e}", file.display())
            })?;
            transport = transport.with_basic_auth(user, password.trim_end_matches(['\r', '\n']));
        }
        Ok(transport)
    }
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
        config.access_point.check(path)?;
        let access_point = &mut config.access_point;
        for slot in [
            &mut access_point.ca,
            &mut access_point.cert,
            &mut access_point.key,
            &mut access_point.password_file,
        ]
        .into_iter()
        .flatten()
        {
            *slot = relative_to(path, slot);
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

#[cfg(test)]
mod tests {
    use super::AccessPoint;
    use std::path::Path;

    fn access_point(endpoint: &str) -> AccessPoint {
        AccessPoint {
            endpoint: endpoint.into(),
            ca: None,
            cert: None,
            key: None,
            username: None,
            password_file: None,
            poll_interval: std::time::Duration::from_secs(2),
        }
    }

    #[test]
    fn evidence_crosses_no_network_in_clear_and_credentials_come_whole() {
        let file = Path::new("bridge.toml");
        let refused = |point: AccessPoint| point.check(file).expect_err("refused").to_string();
        for own in [
            "http://127.0.0.1:8080/wsplugin",
            "http://[::1]:8080/wsplugin",
            "http://localhost/wsplugin",
        ] {
            assert!(access_point(own).check(file).is_ok(), "{own}");
        }
        let said = refused(access_point("http://ap.example.de/wsplugin"));
        assert!(
            said.contains("bridge.toml") && said.contains("in clear") && said.contains("https://"),
            "{said}"
        );
        let said = refused(access_point("https://ap.example.de/wsplugin"));
        assert!(said.contains("access_point.ca"), "{said}");
        let mut https = access_point("https://ap.example.de/wsplugin");
        https.ca = Some("ca.pem".into());
        assert!(https.check(file).is_ok());
        let said = refused(AccessPoint {
            cert: Some("c.pem".into()),
            ..https.clone()
        });
        assert!(said.contains("access_point.cert"), "{said}");
        let said = refused(AccessPoint {
            username: Some("bridge".into()),
            ..https.clone()
        });
        assert!(said.contains("access_point.username"), "{said}");
        let said = refused(access_point("ftp://ap.example.de/x"));
        assert!(said.contains("not an http:// or https://"), "{said}");
    }
}
