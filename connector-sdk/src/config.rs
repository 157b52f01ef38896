//! A connector's configuration: a TOML file, environment overrides, and
//! validation whose errors name the file, the key and the fix.
//!
//! ```toml
//! listen = "127.0.0.1:7101"
//! allowed_broker_id = "broker"        # required: the only broker that may call
//!
//! [tls]
//! ca = "../pki/ca.pem"                # paths are relative to this file
//! cert = "../pki/connector/civil-register.pem"
//! key = "../pki/connector/civil-register.key"
//! crl = "../pki/crl.pem"              # required unless allow_no_crl; reloaded on SIGHUP
//! # allow_no_crl = true               # the explicit, logged opt-out of revocation checks
//! # crl_stale = "refuse"              # or "warn": what to do once the CRL is past nextUpdate
//!
//! [limits]
//! concurrency = 256                   # requests in the register at once
//! max_request_time = "30s"            # cap on any deadline
//! max_payload_size = "4MiB"
//!
//! [connections]                       # see onceonly_certs::connection
//! max_connections = 10000
//! handshake_timeout = "10s"
//! idle_timeout = "5m"
//! max_concurrent_streams = 256
//! max_connection_age = "1h"
//! ```
//!
//! Environment overrides (for containers): `ONCEONLY_CONNECTOR_LISTEN`,
//! `ONCEONLY_CONNECTOR_ALLOWED_BROKER_ID`, `ONCEONLY_CONNECTOR_TLS_CA`,
//! `ONCEONLY_CONNECTOR_TLS_CERT`, `ONCEONLY_CONNECTOR_TLS_KEY`,
//! `ONCEONLY_CONNECTOR_TLS_CRL`, `ONCEONLY_CONNECTOR_CONCURRENCY`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use onceonly_certs::config_file::{self, ConfigFileError, relative_to};
use onceonly_certs::{ConnectionLimits, TlsFiles};
use serde::Deserialize;

/// Everything a connector server needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    /// Where to listen.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The connector's certificate, key, the CA and the CRL (required
    /// unless `tls.allow_no_crl`, the explicit, logged opt-out).
    pub tls: TlsFiles,
    /// The id of the one broker that may call (the `<id>` of its
    /// `spiffe://<trust-domain>/broker/<id>`). Required: a connector that
    /// accepted any broker-role certificate would answer whoever obtained
    /// one.
    #[serde(default)]
    pub allowed_broker_id: Option<String>,
    /// Limits on requests.
    #[serde(default)]
    pub limits: Limits,
    /// Limits on connections.
    #[serde(default)]
    pub connections: ConnectionLimits,
    /// How long shutdown waits for requests in flight.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Evidence types this register releases only encrypted to the
    /// requester: a request without an encryption certificate is refused
    /// (FAILED_PRECONDITION, ENCRYPTION_REQUIRED) whatever the broker's
    /// ticket says, so not even a broker that issues itself tickets reads
    /// them.
    #[serde(default)]
    pub encryption_required_for: Vec<String>,
    /// Authorities (their ids) whose tickets this register answers without
    /// a request the authority signed. Default none: such a ticket is
    /// refused (PERMISSION_DENIED, SIGNED_REQUEST_MISSING), so that a broker
    /// cannot make up a request this register answers. List an authority
    /// only while the broker's policy lets it send unsigned requests
    /// (`[signed_requests] unsigned_allowed`); for it, and only for it, the
    /// broker's word is all a request rests on.
    #[serde(default)]
    pub accept_unsigned_from: Vec<String>,
    /// Where to serve `GET /metrics` (Prometheus text format, plain HTTP,
    /// no certificate: keep it on loopback); none: no admin listener.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// An OTLP/gRPC endpoint (e.g. `http://127.0.0.1:4317`) where the
    /// binary exports its spans, continuing the broker's trace; none: no
    /// export. (The binary installs the exporter, with
    /// `onceonly_proto::telemetry::init`.)
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Which spans are exported (`RUST_LOG` syntax); default
    /// `"onceonly=info"`: the connector's own, no HTTP/2 internals.
    #[serde(default = "default_trace_filter")]
    pub trace_filter: String,
    /// The `service.name` its spans carry; default: the connector's id
    /// from its certificate (e.g. `civil-register`), so a collector tells
    /// connectors apart.
    #[serde(default)]
    pub service_name: Option<String>,
}

fn default_trace_filter() -> String {
    onceonly_proto::telemetry::DEFAULT_TRACE_FILTER.to_owned()
}

/// A connector's limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Requests handed to the register at once; further ones wait (within
    /// their deadline).
    pub concurrency: usize,
    /// The longest any request may take, and the deadline of requests that
    /// bring none.
    #[serde(with = "humantime_serde")]
    pub max_request_time: Duration,
    /// The largest payload the connector sends.
    pub max_payload_size: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            concurrency: 256,
            max_request_time: Duration::from_secs(30),
            max_payload_size: ByteSize::mib(4),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7101))
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}

impl ConnectorConfig {
    /// A configuration with defaults around `tls`.
    pub fn new(tls: TlsFiles) -> Self {
        ConnectorConfig {
            listen: default_listen(),
            tls,
            allowed_broker_id: None,
            limits: Limits::default(),
            connections: ConnectionLimits::default(),
            shutdown_grace: default_shutdown_grace(),
            encryption_required_for: Vec::new(),
            accept_unsigned_from: Vec::new(),
            admin_listen: None,
            otlp_endpoint: None,
            trace_filter: default_trace_filter(),
            service_name: None,
        }
    }

    /// Reads `path`, applies the process environment's overrides and
    /// validates.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let mut config: ConnectorConfig = config_file::load_toml(path)?;
        config.resolve_paths(path);
        config.apply_env(path, |key| std::env::var(key).ok())?;
        config.validate(path)?;
        Ok(config)
    }

    /// Makes the TLS paths relative to the config file's folder.
    pub fn resolve_paths(&mut self, config_path: &Path) {
        let tls = &mut self.tls;
        tls.ca = relative_to(config_path, &tls.ca);
        tls.cert = relative_to(config_path, &tls.cert);
        tls.key = relative_to(config_path, &tls.key);
        tls.crl = tls.crl.as_ref().map(|crl| relative_to(config_path, crl));
        tls.crl_number_file = tls
            .crl_number_file
            .as_ref()
            .map(|file| relative_to(config_path, file));
    }

    /// Applies `ONCEONLY_CONNECTOR_*` overrides read through `env`.
    pub fn apply_env(
        &mut self,
        config_path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigFileError> {
        const PREFIX: &str = "ONCEONLY_CONNECTOR_";
        let var = |name: &str| env(&format!("{PREFIX}{name}"));
        if let Some(listen) = var("LISTEN") {
            self.listen = listen.parse().map_err(|e| {
                ConfigFileError::invalid(
                    config_path,
                    format!("{PREFIX}LISTEN"),
                    format!("{listen:?} is not an address: {e}"),
                    "write host:port, e.g. 0.0.0.0:7101",
                )
            })?;
        }
        if let Some(id) = var("ALLOWED_BROKER_ID") {
            self.allowed_broker_id = Some(id).filter(|id| !id.is_empty());
        }
        for (name, slot) in [
            ("TLS_CA", &mut self.tls.ca),
            ("TLS_CERT", &mut self.tls.cert),
            ("TLS_KEY", &mut self.tls.key),
        ] {
            if let Some(path) = var(name) {
                *slot = PathBuf::from(path);
            }
        }
        if let Some(crl) = var("TLS_CRL") {
            self.tls.crl = Some(PathBuf::from(crl)).filter(|p| !p.as_os_str().is_empty());
        }
        if let Some(concurrency) = var("CONCURRENCY") {
            self.limits.concurrency = concurrency.parse().map_err(|_| {
                ConfigFileError::invalid(
                    config_path,
                    format!("{PREFIX}CONCURRENCY"),
                    format!("{concurrency:?} is not a whole number"),
                    "set a number of requests, e.g. 256",
                )
            })?;
        }
        Ok(())
    }

    /// The OTLP export these settings ask for, if any: named
    /// `service_name`, or else by the connector's id in its certificate
    /// (`onceonly-connector` where the certificate cannot be read; serving
    /// then fails and says why).
    pub fn trace_export(&self) -> Option<onceonly_proto::telemetry::TraceExport> {
        let endpoint = self.otlp_endpoint.clone()?;
        let service_name = self.service_name.clone().unwrap_or_else(|| {
            onceonly_certs::pki::load_certs(&self.tls.cert)
                .ok()
                .and_then(|certs| certs.into_iter().next())
                .and_then(|cert| onceonly_certs::Participant::from_certificate(cert.as_ref()).ok())
                .map_or_else(|| "onceonly-connector".to_owned(), |p| p.id().to_owned())
        });
        Some(onceonly_proto::telemetry::TraceExport {
            endpoint,
            service_name,
            filter: self.trace_filter.clone(),
        })
    }

    /// Resolves paths, applies the environment's overrides and validates
    /// a `ConnectorConfig` that a binary's file holds under `[connector]`
    /// (the mock registers, `onceonly-connector`): errors name the keys as
    /// they stand there (`connector.limits.concurrency`).
    pub fn prepare_nested(&mut self, config_path: &Path) -> Result<(), ConfigFileError> {
        self.resolve_paths(config_path);
        self.apply_env(config_path, |key| std::env::var(key).ok())?;
        self.validate(config_path).map_err(|error| match error {
            ConfigFileError::Invalid {
                path,
                key,
                problem,
                fix,
            } => ConfigFileError::Invalid {
                path,
                key: format!("connector.{key}"),
                problem,
                fix,
            },
            other => other,
        })
    }

    /// Checks the values; `config_path` names the file in errors.
    pub fn validate(&self, config_path: &Path) -> Result<(), ConfigFileError> {
        let invalid = |key: &str, problem: String, fix: &str| {
            Err(ConfigFileError::invalid(config_path, key, problem, fix))
        };
        if let Err(problem) = onceonly_proto::telemetry::check_trace_filter(&self.trace_filter) {
            return invalid("trace_filter", problem, "or remove the key for the default");
        }
        if self
            .service_name
            .as_ref()
            .is_some_and(|name| name.trim().is_empty())
        {
            return invalid(
                "service_name",
                "is empty".into(),
                "name the connector as collectors should show it, or remove the key for its id",
            );
        }
        if !(1..=100_000).contains(&self.limits.concurrency) {
            return invalid(
                "limits.concurrency",
                format!("{} is out of range", self.limits.concurrency),
                "use 1 to 100000",
            );
        }
        if self.limits.max_request_time.is_zero() {
            return invalid(
                "limits.max_request_time",
                "is zero".into(),
                "give a duration such as \"30s\"",
            );
        }
        let size = self.limits.max_payload_size.as_u64();
        if !(1024..=64 * 1024 * 1024).contains(&size) {
            return invalid(
                "limits.max_payload_size",
                format!("{} is out of range", self.limits.max_payload_size),
                "use 1KiB to 64MiB",
            );
        }
        match &self.allowed_broker_id {
            None => {
                return invalid(
                    "allowed_broker_id",
                    "is missing".into(),
                    "name the broker that may call, e.g. allowed_broker_id = \"broker\" (the <id> of its spiffe://<trust-domain>/broker/<id>)",
                );
            }
            Some(id) if onceonly_certs::identity::validate_id(id).is_err() => {
                return invalid(
                    "allowed_broker_id",
                    format!("{id:?} is not a participant id"),
                    "use the <id> of the broker's spiffe://<trust-domain>/broker/<id>",
                );
            }
            Some(_) => {}
        }
        if let Some((key, problem, fix)) = self.tls.crl_problem() {
            return invalid(key, problem.into(), fix);
        }
        if let Err(limit) = self.connections.validate() {
            return invalid(
                &format!("connections.{}", limit.key),
                limit.problem,
                limit.fix,
            );
        }
        for (key, path) in [
            ("tls.ca", Some(&self.tls.ca)),
            ("tls.cert", Some(&self.tls.cert)),
            ("tls.key", Some(&self.tls.key)),
            ("tls.crl", self.tls.crl.as_ref()),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                return invalid(
                    key,
                    format!("{} does not exist", path.display()),
                    "point it at a file from `onceonly-certs` (e.g. onceonly-certs issue --role connector --id <id>)",
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConnectorConfig, ConfigFileError> {
        config_file::parse_toml(Path::new("connector.toml"), text)
    }

    #[test]
    fn defaults_fill_what_is_not_written() {
        let config = parse("[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n").expect("parses");
        assert_eq!(config.limits.concurrency, 256);
        assert_eq!(config.limits.max_payload_size, ByteSize::mib(4));
        assert_eq!(config.listen, default_listen());
    }

    #[test]
    fn sizes_and_durations_are_written_as_people_write_them() {
        let config = parse(
            "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[limits]\nmax_request_time = \"250ms\"\nmax_payload_size = \"512KiB\"\n",
        )
        .expect("parses");
        assert_eq!(config.limits.max_request_time, Duration::from_millis(250));
        assert_eq!(config.limits.max_payload_size, ByteSize::kib(512));
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let error =
            parse("[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[limits]\nconcurency = 5\n")
                .expect_err("typo");
        let message = error.to_string();
        assert!(message.starts_with("connector.toml:6:"), "{message}");
        assert!(message.contains("concurency"), "{message}");
    }

    #[test]
    fn validation_names_key_and_fix() {
        let mut config = parse("[tls]\nca = \"/nonexistent/ca.pem\"\ncert = \"b\"\nkey = \"c\"\n")
            .expect("parses");
        let message = config
            .validate(Path::new("c.toml"))
            .expect_err("no broker named")
            .to_string();
        assert!(message.contains("c.toml: allowed_broker_id"), "{message}");
        config.allowed_broker_id = Some("broker".into());
        let message = config
            .validate(Path::new("c.toml"))
            .expect_err("no CRL")
            .to_string();
        assert!(message.contains("c.toml: tls.crl"), "{message}");
        assert!(message.contains("allow_no_crl"), "{message}");
        config.tls.crl = Some("/nonexistent/crl.pem".into());
        let message = config
            .validate(Path::new("c.toml"))
            .expect_err("missing")
            .to_string();
        assert!(message.contains("c.toml: tls.ca"), "{message}");
        assert!(message.contains("onceonly-certs"), "{message}");
        config.limits.concurrency = 0;
        let message = config
            .validate(Path::new("c.toml"))
            .expect_err("zero")
            .to_string();
        assert!(message.contains("limits.concurrency"), "{message}");
    }

    #[test]
    fn environment_overrides_apply() {
        let mut config = parse("[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n").expect("parses");
        config
            .apply_env(Path::new("c.toml"), |key| match key {
                "ONCEONLY_CONNECTOR_LISTEN" => Some("0.0.0.0:9000".into()),
                "ONCEONLY_CONNECTOR_CONCURRENCY" => Some("8".into()),
                "ONCEONLY_CONNECTOR_TLS_CERT" => Some("/etc/conn.pem".into()),
                _ => None,
            })
            .expect("applies");
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.limits.concurrency, 8);
        assert_eq!(config.tls.cert, PathBuf::from("/etc/conn.pem"));
        let bad = config.apply_env(Path::new("c.toml"), |key| {
            (key == "ONCEONLY_CONNECTOR_CONCURRENCY").then(|| "many".into())
        });
        assert!(
            bad.expect_err("not a number")
                .to_string()
                .contains("ONCEONLY_CONNECTOR_CONCURRENCY")
        );
    }
}
