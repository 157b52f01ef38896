//! The broker's configuration file, `broker.toml`:
//!
//! ```toml
//! listen = "127.0.0.1:7443"
//! data_dir = "data"                     # audit.log; sled: its indexes, consents
//! policy = "policy.toml"                # reloaded on SIGHUP and on change
//! routing = "routing.toml"
//! pseudonym_key = "secrets/pseudonym.key"   # keep it outside data_dir
//! audit_key = "secrets/audit.key"       # signs tree heads; .pub beside it
//! storage_cache = "16MiB"               # sled page cache
//!
//! [tls]
//! ca = "pki/ca.pem"
//! cert = "pki/broker/broker.pem"
//! key = "pki/broker/broker.key"
//! crl = "pki/crl.pem"                   # reloaded on SIGHUP
//!
//! [limits]
//! max_request_time = "30s"              # cap on any caller's deadline
//! concurrency = 1024                    # exchanges with registers at once
//! max_waiting = 1024                    # more may wait; the rest are shed
//! max_request_message = "64KiB"         # any service's request, health too
//! max_exchanges = 4096                  # exchanges alive at once, all steps
//!
//! [connections]                         # see onceonly_certs::connection
//! max_connections = 10000
//! max_connections_per_address = 512
//! handshake_timeout = "10s"
//! idle_timeout = "5m"                   # no call in flight this long: closed
//! max_concurrent_streams = 256          # calls at once on one connection
//! max_local_reset_streams = 64
//! max_pending_accept_reset_streams = 32
//! keepalive_interval = "30s"
//! keepalive_timeout = "10s"
//! max_connection_age = "1h"             # then GOAWAY: rotation reaches everyone
//! max_connection_age_grace = "30s"
//!
//! [idempotency]
//! window = "10m"
//! max_entries = 100000
//! max_bytes = "16MiB"                   # memory for remembered outcomes
//!
//! [audit]
//! durable = true                        # fsync before answering (keep it on)
//!
//! [storage]                             # where consents, request ids and the log live
//! backend = "embedded"                  # data_dir (default), or "postgres" for replicas
//! # url = "postgres://onceonly@db.internal/onceonly"
//! # password_file = "secrets/postgres.password"   # kept out of the URL and this file
//! # ca = "pki/postgres-ca.pem"          # TLS 1.3, required and verified
//! # client_cert = "..."                 # where the server wants client certificates
//! # client_key = "..."
//! # pool_size = 16
//! # timeout = "5s"                      # one database round at most
//! # schema = "apply"                    # or "check": fail naming missing migrations
//! # merge_delay = "2s"                  # a committed record is in a signed head by then
//! # sequencer_lease = "1s"              # a dead sequencer is replaced after this
//! # sequencer_interval = "100ms"
//! ```
//!
//! Relative paths are relative to the config file's folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use onceonly_certs::config_file::{self, ConfigFileError, relative_to};
use onceonly_certs::{ConnectionLimits, TlsFiles};
use serde::Deserialize;

pub use crate::storage_config::{PostgresConfig, SchemaPolicy, StorageConfig};

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Where authorities, portals and auditors connect.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The data directory: the audit log file, and sled (the log's indexes, consents).
    pub data_dir: PathBuf,
    /// The policy file.
    pub policy: PathBuf,
    /// The routing table and evidence-type catalogue.
    pub routing: PathBuf,
    /// The key that pseudonymises subject ids in the audit log; created
    /// (mode 0600) where missing. Keep it apart from `data_dir`, so a copied
    /// data directory does not reveal whom records are about.
    pub pseudonym_key: PathBuf,
    /// The Ed25519 key that signs the audit log's tree heads (PKCS#8);
    /// created (mode 0600) where missing, its public key written beside it
    /// as `<file>.pub` for auditors. Keep it apart from `data_dir`.
    pub audit_key: PathBuf,
    /// The broker's certificate, key, CA and CRL. The broker's certificate
    /// is also its client certificate towards connectors.
    pub tls: TlsFiles,
    /// Memory for sled's page cache (the audit log's indexes and the
    /// consents; the log's records are read from its file). sled's own
    /// default is 1 GiB; the broker keeps it small and leaves the rest to
    /// the operating system's file cache.
    #[serde(default = "default_storage_cache")]
    pub storage_cache: bytesize::ByteSize,
    /// Limits on requests.
    #[serde(default)]
    pub limits: Limits,
    /// Limits on connections.
    #[serde(default)]
    pub connections: ConnectionLimits,
    /// Idempotency.
    #[serde(default)]
    pub idempotency: Idempotency,
    /// Audit.
    #[serde(default)]
    pub audit: AuditConfig,
    /// How long shutdown waits for exchanges in flight.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long, on shutdown, health says NOT_SERVING while the broker still
    /// serves, before it stops accepting and drains: long enough for load
    /// balancers' health checks to see it (e.g. "5s"). Default none.
    #[serde(default, with = "humantime_serde")]
    pub shutdown_announce: Duration,
    /// The admin listener (metrics).
    #[serde(default)]
    pub admin: Admin,
    /// The console for policy staff and auditors (off by default).
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Connector endpoints' circuit breakers and health checks.
    #[serde(default)]
    pub circuit: crate::circuit::CircuitConfig,
    /// Traces.
    #[serde(default)]
    pub telemetry: Telemetry,
    /// Where the broker's state lives: the data directory, or PostgreSQL
    /// shared by replicas.
    #[serde(default)]
    pub storage: StorageConfig,
}

/// Where traces go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// An OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`: spans of every
    /// step of the request path are exported there, continuing the
    /// caller's `traceparent`. None: no export.
    pub otlp_endpoint: Option<String>,
    /// Which spans are exported (`RUST_LOG` syntax): by default onceonly's
    /// own (`"onceonly=info"`), none of the HTTP/2 and tower internals.
    pub trace_filter: String,
    /// The `service.name` the spans carry (replicas may add their name).
    pub service_name: String,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            otlp_endpoint: None,
            trace_filter: onceonly_proto::telemetry::DEFAULT_TRACE_FILTER.to_owned(),
            service_name: "onceonly-broker".to_owned(),
        }
    }
}

impl Telemetry {
    /// The OTLP export these settings ask for, if any.
    pub fn export(&self) -> Option<onceonly_proto::telemetry::TraceExport> {
        self.otlp_endpoint
            .as_ref()
            .map(|endpoint| onceonly_proto::telemetry::TraceExport {
                endpoint: endpoint.clone(),
                service_name: self.service_name.clone(),
                filter: self.trace_filter.clone(),
            })
    }
}

/// The admin listener: plain HTTP, apart from the mutual-TLS API port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Whether the admin listener runs (default true).
    pub enabled: bool,
    /// Where `GET /metrics` (Prometheus text format) is served; default
    /// 127.0.0.1:9464. Loopback by default: expose it beyond the host only
    /// behind a firewall or a scraping proxy, as it needs no certificate.
    pub listen: SocketAddr,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// The console: the policy and the audit log in a browser, for policy
/// staff, auditors and data-protection officers. Served by the broker over
/// HTTPS with the API's own certificate, trust domain and revocation list:
/// a person is their client certificate (`policy-admin` or `auditor`
/// role), with no passwords.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Where the console listens, e.g. "127.0.0.1:8443"; none (the
    /// default): no console.
    pub listen: Option<SocketAddr>,
}

/// Request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// The cap on any caller's deadline, and the deadline of requests that
    /// bring none.
    #[serde(with = "humantime_serde")]
    pub max_request_time: Duration,
    /// Exchanges with registers at once.
    pub concurrency: usize,
    /// Exchanges that may wait for one of those slots (within their
    /// deadline); any more are shed with RESOURCE_EXHAUSTED (OVERLOADED).
    pub max_waiting: usize,
    /// The largest request message any service accepts (health and
    /// reflection included).
    pub max_request_message: bytesize::ByteSize,
    /// Exchanges alive at once, in every step. Each runs to its audit
    /// record whatever its caller does; beyond this many, new ones are shed
    /// (RESOURCE_EXHAUSTED, OVERLOADED), recorded.
    pub max_exchanges: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_time: Duration::from_secs(30),
            concurrency: 1024,
            max_waiting: 1024,
            max_request_message: bytesize::ByteSize::kib(64),
            max_exchanges: 4096,
        }
    }
}

/// How long request ids are remembered.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Idempotency {
    /// A request id repeated within this window gets the first outcome.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// The most outcomes remembered; the oldest are forgotten first.
    pub max_entries: usize,
    /// The most memory outcomes (evidence included) may hold; the oldest
    /// are forgotten first.
    pub max_bytes: bytesize::ByteSize,
}

impl Default for Idempotency {
    fn default() -> Self {
        Idempotency {
            window: Duration::from_secs(600),
            max_entries: 100_000,
            max_bytes: bytesize::ByteSize::mib(16),
        }
    }
}

/// The audit log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Flush every batch to disk before answering. Turning it off loses
    /// the guarantee that an answered request has its record; only for
    /// measuring what durability costs.
    pub durable: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { durable: true }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}

fn default_storage_cache() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(16)
}

fn default_grace() -> Duration {
    Duration::from_secs(15)
}

impl BrokerConfig {
    /// Reads `path`, resolves relative paths against its folder, validates.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let mut config: BrokerConfig = config_file::load_toml(path)?;
        config.resolve_paths(path);
        config.validate(path)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, path: &Path) {
        for slot in [
            &mut self.data_dir,
            &mut self.policy,
            &mut self.routing,
            &mut self.pseudonym_key,
            &mut self.audit_key,
            &mut self.tls.ca,
            &mut self.tls.cert,
            &mut self.tls.key,
        ] {
            *slot = relative_to(path, slot);
        }
        self.tls.crl = self.tls.crl.as_ref().map(|crl| relative_to(path, crl));
        // The highest CRL number accepted is kept with the data, so that an
        // older list is refused after a restart too.
        self.tls.crl_number_file = Some(match &self.tls.crl_number_file {
            Some(file) => relative_to(path, file),
            None => self.data_dir.join("crl-number"),
        });
        if let StorageConfig::Postgres(postgres) = &mut self.storage {
            for file in [
                &mut postgres.password_file,
                &mut postgres.ca,
                &mut postgres.client_cert,
                &mut postgres.client_key,
            ] {
                *file = file.as_ref().map(|f| relative_to(path, f));
            }
        }
    }

    /// Checks the values; errors name the file, the key and the fix.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigFileError> {
        let invalid = |key: &str, problem: String, fix: &str| {
            Err(ConfigFileError::invalid(path, key, problem, fix))
        };
        if self.limits.max_request_time.is_zero() {
            return invalid(
                "limits.max_request_time",
                "is zero".into(),
                "give e.g. \"30s\"",
            );
        }
        if !(1..=1_000_000).contains(&self.limits.concurrency) {
            return invalid(
                "limits.concurrency",
                format!("{} is out of range", self.limits.concurrency),
                "use 1 to 1000000",
            );
        }
        if self.limits.max_exchanges < self.limits.concurrency {
            return invalid(
                "limits.max_exchanges",
                format!(
                    "{} is below limits.concurrency ({})",
                    self.limits.max_exchanges, self.limits.concurrency
                ),
                "allow at least as many exchanges alive as may be with registers, e.g. 4096",
            );
        }
        if self.limits.max_request_message.as_u64() < 1024 {
            return invalid(
                "limits.max_request_message",
                format!(
                    "{} is too small for any request",
                    self.limits.max_request_message
                ),
                "give at least \"1KiB\", e.g. \"64KiB\"",
            );
        }
        if let Err(limit) = self.connections.validate() {
            return invalid(
                &format!("connections.{}", limit.key),
                limit.problem,
                limit.fix,
            );
        }
        if self.idempotency.max_entries == 0 {
            return invalid(
                "idempotency.max_entries",
                "is zero".into(),
                "remember at least one request, e.g. 100000",
            );
        }
        if let Err(problem) =
            onceonly_proto::telemetry::check_trace_filter(&self.telemetry.trace_filter)
        {
            return invalid(
                "telemetry.trace_filter",
                problem,
                "or remove the key for the default",
            );
        }
        if self.telemetry.service_name.trim().is_empty() {
            return invalid(
                "telemetry.service_name",
                "is empty".into(),
                "name the process as collectors should show it, e.g. \"onceonly-broker\"",
            );
        }
        if let Some((key, problem, fix)) = self.tls.crl_problem() {
            return invalid(key, problem.into(), fix);
        }
        if let Some((key, problem, fix)) = self.storage.problem() {
            return invalid(key, problem, fix);
        }
        if self.audit_key.starts_with(&self.data_dir) {
            return invalid(
                "audit_key",
                format!("{} is inside data_dir", self.audit_key.display()),
                "keep the signing key apart from the log it signs (e.g. secrets/audit.key)",
            );
        }
        if self.pseudonym_key.starts_with(&self.data_dir) {
            return invalid(
                "pseudonym_key",
                format!("{} is inside data_dir", self.pseudonym_key.display()),
                "keep the key apart from the data (e.g. secrets/pseudonym.key), so a copied data directory does not reveal whom records are about",
            );
        }
        let postgres = match &self.storage {
            StorageConfig::Postgres(postgres) => Some(postgres),
            StorageConfig::Embedded => None,
        };
        for (key, file) in [
            ("policy", Some(&self.policy)),
            ("routing", Some(&self.routing)),
            ("tls.ca", Some(&self.tls.ca)),
            ("tls.cert", Some(&self.tls.cert)),
            ("tls.key", Some(&self.tls.key)),
            ("tls.crl", self.tls.crl.as_ref()),
            (
                "storage.password_file",
                postgres.and_then(|p| p.password_file.as_ref()),
            ),
            ("storage.ca", postgres.and_then(|p| p.ca.as_ref())),
            (
                "storage.client_cert",
                postgres.and_then(|p| p.client_cert.as_ref()),
            ),
            (
                "storage.client_key",
                postgres.and_then(|p| p.client_key.as_ref()),
            ),
        ] {
            if let Some(file) = file
                && !file.is_file()
            {
                return invalid(
                    key,
                    format!("{} does not exist", file.display()),
                    "point it at an existing file (paths are relative to the config file)",
                );
            }
        }
        Ok(())
    }
}
