//! `[storage]` of `broker.toml`: where the broker's state lives, chosen
//! once at start-up (issue 23). The TOML keeps its flat form (`backend =
//! "postgres"` beside the PostgreSQL keys), read into a table of its own
//! that refuses unknown keys, then into [`StorageConfig`]: an enum, so
//! nothing downstream can read a PostgreSQL setting of an embedded broker.
//! A parse error names the file, the line and the key; a key that belongs
//! to the other backend is refused by name, not ignored.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Where consents, the idempotency window and the audit log live.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "StorageTable")]
pub enum StorageConfig {
    /// sled and the log file in `data_dir`: one broker process.
    #[default]
    Embedded,
    /// PostgreSQL: any number of replicas serving together.
    Postgres(PostgresConfig),
}

/// Whether a replica brings the schema up to date at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchemaPolicy {
    /// Apply missing migrations (under a lock; replicas may start at once).
    #[default]
    Apply,
    /// Change nothing; refuse to start naming what is missing.
    Check,
}

/// `[storage]` with `backend = "postgres"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// A URL (`postgres://user@host:port/db`) or libpq key=value string.
    /// Leave the password out; give `password_file`.
    pub url: String,
    /// A file holding the password (one line).
    pub password_file: Option<PathBuf>,
    /// The CA (PEM) of the server's certificate: TLS 1.3 to the server,
    /// required and verified for the URL's host. Without it the connection
    /// is plaintext, which is refused for a server not on this host unless
    /// `insecure_plaintext`.
    pub ca: Option<PathBuf>,
    /// A client certificate and key (PEM) to present, where the server
    /// authenticates clients by certificate.
    pub client_cert: Option<PathBuf>,
    /// The key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Allow a plaintext connection to a server on another host (records,
    /// pseudonyms and ciphertexts then cross the network unprotected; only
    /// on a network you trust like the host itself).
    pub insecure_plaintext: bool,
    /// Connections per replica at most.
    pub pool_size: usize,
    /// The longest one database round may take.
    pub timeout: Duration,
    /// Apply or only check the schema at start.
    pub schema: SchemaPolicy,
    /// A committed audit record is in a signed tree head within this; each
    /// answer's receipt promises it.
    pub merge_delay: Duration,
    /// A sequencer that stops renewing its lease is replaced after this.
    pub sequencer_lease: Duration,
    /// How often the sequencer runs (and others try the lease).
    pub sequencer_interval: Duration,
}

impl PostgresConfig {
    /// The PostgreSQL settings at their defaults, for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            password_file: None,
            ca: None,
            client_cert: None,
            client_key: None,
            insecure_plaintext: false,
            pool_size: 16,
            timeout: Duration::from_secs(5),
            schema: SchemaPolicy::Apply,
            merge_delay: Duration::from_secs(2),
            sequencer_lease: Duration::from_secs(1),
            sequencer_interval: Duration::from_millis(100),
        }
    }
}

/// `[storage]` as written: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageTable {
    #[serde(default)]
    backend: Backend,
    url: Option<String>,
    password_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    insecure_plaintext: Option<bool>,
    pool_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    schema: Option<SchemaPolicy>,
    #[serde(default, with = "humantime_serde")]
    merge_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    sequencer_lease: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    sequencer_interval: Option<Duration>,
}

/// `backend = ...`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Backend {
    #[default]
    Embedded,
    Postgres,
}

impl TryFrom<StorageTable> for StorageConfig {
    type Error = String;

    fn try_from(table: StorageTable) -> Result<Self, String> {
        let StorageTable {
            backend,
            url,
            password_file,
            ca,
            client_cert,
            client_key,
            insecure_plaintext,
            pool_size,
            timeout,
            schema,
            merge_delay,
            sequencer_lease,
            sequencer_interval,
        } = table;
        if backend == Backend::Embedded {
            let given = [
                ("url", url.is_some()),
                ("password_file", password_file.is_some()),
                ("ca", ca.is_some()),
                ("client_cert", client_cert.is_some()),
                ("client_key", client_key.is_some()),
                ("insecure_plaintext", insecure_plaintext.is_some()),
                ("pool_size", pool_size.is_some()),
                ("timeout", timeout.is_some()),
                ("schema", schema.is_some()),
                ("merge_delay", merge_delay.is_some()),
                ("sequencer_lease", sequencer_lease.is_some()),
                ("sequencer_interval", sequencer_interval.is_some()),
            ];
            if let Some((key, _)) = given.iter().find(|(_, given)| *given) {
                return Err(format!(
                    "storage.{key} applies to backend \"postgres\" only, and this [storage] is embedded (the default): set backend = \"postgres\" to use it, or remove {key}"
                ));
            }
            return Ok(StorageConfig::Embedded);
        }
        let Some(url) = url else {
            return Err(
                "storage.url is missing for backend \"postgres\": give e.g. url = \"postgres://onceonly@db.internal/onceonly\"".into(),
            );
        };
        let defaults = PostgresConfig::new(url);
        Ok(StorageConfig::Postgres(PostgresConfig {
            password_file,
            ca,
            client_cert,
            client_key,
            insecure_plaintext: insecure_plaintext.unwrap_or(defaults.insecure_plaintext),
            pool_size: pool_size.unwrap_or(defaults.pool_size),
            timeout: timeout.unwrap_or(defaults.timeout),
            schema: schema.unwrap_or(defaults.schema),
            merge_delay: merge_delay.unwrap_or(defaults.merge_delay),
            sequencer_lease: sequencer_lease.unwrap_or(defaults.sequencer_lease),
            sequencer_interval: sequencer_interval.unwrap_or(defaults.sequencer_interval),
            ..defaults
        }))
    }
}

impl StorageConfig {
    /// The PostgreSQL settings, where the backend is PostgreSQL.
    pub fn postgres(&self) -> Option<&PostgresConfig> {
        match self {
            StorageConfig::Postgres(postgres) => Some(postgres),
            StorageConfig::Embedded => None,
        }
    }

    /// The first problem with the `[storage]` values: (key, problem, fix).
    pub fn problem(&self) -> Option<(&'static str, String, &'static str)> {
        self.postgres().and_then(PostgresConfig::problem)
    }
}

impl PostgresConfig {
    /// The first problem with the values: (key, problem, fix).
    pub fn problem(&self) -> Option<(&'static str, String, &'static str)> {
        let url = &self.url;
        let parsed = match url.parse::<onceonly_store_postgres::tokio_postgres::Config>() {
            Ok(parsed) => parsed,
            Err(e) => {
                return Some((
                    "storage.url",
                    format!("does not parse ({e})"),
                    "give postgres://user@host:port/database, or host=... dbname=... key=value pairs",
                ));
            }
        };
        if parsed.get_password().is_some() {
            return Some((
                "storage.url",
                "holds a password".into(),
                "keep the password out of the configuration: put it in a file of its own and name it in storage.password_file",
            ));
        }
        if self.ca.is_none() && !self.insecure_plaintext {
            use onceonly_store_postgres::tokio_postgres::config::Host;
            // Where connections go: `hostaddr` (when given) wins over the
            // host's name.
            let remote = parsed
                .get_hostaddrs()
                .iter()
                .find(|ip| !ip.is_loopback())
                .map(|ip| ip.to_string())
                .or_else(|| {
                    parsed.get_hosts().iter().find_map(|host| match host {
                        Host::Tcp(name) => {
                            let local = name == "localhost"
                                || name
                                    .parse::<std::net::IpAddr>()
                                    .is_ok_and(|ip| ip.is_loopback());
                            (!local && parsed.get_hostaddrs().is_empty()).then(|| name.clone())
                        }
                        Host::Unix(_) => None,
                    })
                });
            if let Some(host) = remote {
                return Some((
                    "storage.ca",
                    format!(
                        "is missing, so the connection to {host} would be plaintext: records, pseudonyms and sealed outcomes would cross the network unprotected"
                    ),
                    "give the CA (PEM) of the PostgreSQL server's certificate (TLS is then required and verified), or, only on a network you trust like this host, set storage.insecure_plaintext = true",
                ));
            }
        }
        if self.client_cert.is_some() && self.ca.is_none() {
            return Some((
                "storage.client_cert",
                "is given without storage.ca, so it would never be presented (no TLS)".into(),
                "give storage.ca as well, or drop the client certificate",
            ));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Some((
                "storage.client_cert",
                "and storage.client_key come together".into(),
                "give both, or neither",
            ));
        }
        if !(1..=1000).contains(&self.pool_size) {
            return Some((
                "storage.pool_size",
                format!("{} is out of range", self.pool_size),
                "use 1 to 1000, e.g. 16",
            ));
        }
        for (key, value) in [
            ("storage.timeout", self.timeout),
            ("storage.merge_delay", self.merge_delay),
            ("storage.sequencer_lease", self.sequencer_lease),
            ("storage.sequencer_interval", self.sequencer_interval),
        ] {
            if value.is_zero() {
                return Some((key, "is zero".into(), "give a duration, e.g. \"1s\""));
            }
        }
        // A sequencer that dies right after a commit is replaced within the
        // lease and an interval, and the next holder sequences within
        // another: the receipts' promise must outlast that.
        let failover = self.sequencer_lease + self.sequencer_interval * 3;
        if self.merge_delay < failover {
            return Some((
                "storage.merge_delay",
                format!(
                    "{} is shorter than a sequencer failover (sequencer_lease + 3 x sequencer_interval = {})",
                    humantime::format_duration(self.merge_delay),
                    humantime::format_duration(failover)
                ),
                "raise merge_delay or shorten sequencer_lease, e.g. merge_delay = \"2s\" with sequencer_lease = \"1s\"",
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct File {
        #[serde(default)]
        storage: StorageConfig,
    }

    fn storage(toml_text: &str) -> StorageConfig {
        toml::from_str::<File>(toml_text).expect("parses").storage
    }

    fn refused(toml_text: &str) -> toml::de::Error {
        toml::from_str::<File>(toml_text).expect_err("refused")
    }

    /// The 1-based line a parse error points at.
    fn line_of(toml_text: &str, error: &toml::de::Error) -> usize {
        let start = error.span().expect("an error with its place").start;
        toml_text[..start].matches('\n').count() + 1
    }

    fn postgres(extra: &str) -> StorageConfig {
        storage(&format!(
            "[storage]\nbackend = \"postgres\"\nurl = \"postgres://a@127.0.0.1/c\"\n{extra}"
        ))
    }

    #[test]
    fn the_embedded_default_needs_nothing() {
        assert_eq!(storage(""), StorageConfig::Embedded);
        assert_eq!(storage("[storage]\n"), StorageConfig::Embedded);
        assert_eq!(
            storage("[storage]\nbackend = \"embedded\"\n"),
            StorageConfig::Embedded
        );
        assert_eq!(StorageConfig::Embedded.problem(), None);
        assert_eq!(StorageConfig::Embedded.postgres(), None);
    }

    #[test]
    fn postgres_takes_its_keys_with_defaults_for_the_rest() {
        let chosen = postgres("pool_size = 4\nmerge_delay = \"3s\"\nschema = \"check\"\n");
        let expected = PostgresConfig {
            pool_size: 4,
            merge_delay: Duration::from_secs(3),
            schema: SchemaPolicy::Check,
            ..PostgresConfig::new("postgres://a@127.0.0.1/c")
        };
        assert_eq!(chosen, StorageConfig::Postgres(expected));
        assert_eq!(chosen.problem(), None);
    }

    #[test]
    fn a_postgres_setup_that_cannot_work_is_refused_by_key_with_its_fix() {
        let missing = refused("listen = 1\n[storage]\nbackend = \"postgres\"\n");
        assert!(
            missing.message().contains("storage.url") && missing.message().contains("postgres://"),
            "{missing}"
        );
        assert_eq!(
            line_of("listen = 1\n[storage]\nbackend = \"postgres\"\n", &missing),
            2
        );
        let garbled =
            storage("[storage]\nbackend = \"postgres\"\nurl = \"postgres://a@b:notaport/c\"\n")
                .problem();
        assert!(
            matches!(garbled, Some(("storage.url", _, _))),
            "{garbled:?}"
        );
        let no_pool = postgres("pool_size = 0\n").problem();
        assert!(
            matches!(no_pool, Some(("storage.pool_size", _, _))),
            "{no_pool:?}"
        );
        // A receipt's promise must outlast a sequencer failover.
        let short = postgres("merge_delay = \"1s\"\nsequencer_lease = \"1s\"\n").problem();
        assert!(
            matches!(&short, Some(("storage.merge_delay", problem, _)) if problem.contains("failover")),
            "{short:?}"
        );
        let zero = postgres("sequencer_interval = \"0s\"\n").problem();
        assert!(
            matches!(zero, Some(("storage.sequencer_interval", _, _))),
            "{zero:?}"
        );
        // Across a network: TLS, or an explicit, named choice against it.
        let remote =
            storage("[storage]\nbackend = \"postgres\"\nurl = \"postgres://a@db.internal/c\"\n")
                .problem();
        assert!(
            matches!(&remote, Some(("storage.ca", problem, _)) if problem.contains("db.internal")),
            "{remote:?}"
        );
        let by_address = storage(
            "[storage]\nbackend = \"postgres\"\nurl = \"host=localhost hostaddr=203.0.113.5 user=a dbname=c\"\n",
        )
        .problem();
        assert!(
            matches!(&by_address, Some(("storage.ca", problem, _)) if problem.contains("203.0.113.5")),
            "{by_address:?}"
        );
        let chosen = storage(
            "[storage]\nbackend = \"postgres\"\nurl = \"postgres://a@db.internal/c\"\ninsecure_plaintext = true\n",
        );
        assert_eq!(chosen.problem(), None);
        let password = storage(
            "[storage]\nbackend = \"postgres\"\nurl = \"postgres://a:secret@127.0.0.1/c\"\n",
        )
        .problem();
        assert!(
            matches!(&password, Some(("storage.url", _, fix)) if fix.contains("password_file")),
            "{password:?}"
        );
    }

    #[test]
    fn an_unknown_backend_or_key_is_refused_by_name_and_line() {
        let text = "[storage]\nbackend = \"mysql\"\n";
        let unknown = refused(text);
        assert!(
            unknown.message().contains("mysql") && unknown.message().contains("postgres"),
            "{unknown}"
        );
        assert_eq!(line_of(text, &unknown), 2);
        let text =
            "[storage]\nbackend = \"postgres\"\nurl = \"postgres://a@127.0.0.1/c\"\npool = 3\n";
        let typo = refused(text);
        assert!(typo.message().contains("pool"), "{typo}");
        assert_eq!(line_of(text, &typo), 4);
        let text = "[storage]\nbackend = \"postgres\"\nurl = \"postgres://a@127.0.0.1/c\"\nmerge_delay = \"soon\"\n";
        let garbled = refused(text);
        assert_eq!(line_of(text, &garbled), 4, "{garbled}");
    }

    #[test]
    fn a_postgres_key_under_the_embedded_backend_is_refused_not_ignored() {
        // Forgetting `backend = "postgres"` would otherwise start a broker
        // on its data directory, apart from the replicas.
        let text = "# replicas\n[storage]\nurl = \"postgres://a@127.0.0.1/c\"\n";
        let forgotten = refused(text);
        assert!(
            forgotten.message().contains("storage.url")
                && forgotten.message().contains("backend = \"postgres\""),
            "{forgotten}"
        );
        assert_eq!(line_of(text, &forgotten), 2);
        let explicit = refused("[storage]\nbackend = \"embedded\"\nmerge_delay = \"2s\"\n");
        assert!(
            explicit.message().contains("storage.merge_delay"),
            "{explicit}"
        );
    }
}
