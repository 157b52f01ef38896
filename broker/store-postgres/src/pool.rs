//! The replicas' connections to PostgreSQL: a deadpool pool of
//! tokio-postgres clients, each checked before reuse (a connection the
//! server closed is replaced), with bounded waits, so an outage turns into
//! errors within a known time instead of calls that hang.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

/// How to reach the database.
#[derive(Clone)]
pub struct PoolSettings {
    /// A libpq-style URL or key=value string, e.g.
    /// `postgres://onceonly@db.internal/onceonly`.
    pub url: String,
    /// The password, where it is kept apart from the URL.
    pub password: Option<String>,
    /// Connections at most.
    pub size: usize,
    /// The longest a connect, a wait for a free connection, one statement
    /// or a wait for a lock may take (the server enforces the last two).
    pub timeout: Duration,
    /// The longest a session may sit in an open transaction doing
    /// nothing before the server ends it: a replica that died inside a
    /// transaction (its host gone) then releases the locks it held, the
    /// sequencer lease's row among them, within this.
    pub idle_in_transaction: Duration,
    /// TLS to the server: required and verified (the server's certificate
    /// against this configuration's roots, for the URL's host name) where
    /// given; plaintext otherwise.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The sessions' `application_name` (where the URL names none), so
    /// `pg_stat_activity` shows whose they are.
    pub application_name: String,
    /// Whether a commit waits for its WAL flush (and synchronous standbys).
    /// Off only for state that may be lost with a crash of the database,
    /// as the embedded broker's memory is (the idempotency window).
    pub synchronous_commit: bool,
}

impl std::fmt::Debug for PoolSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSettings")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("size", &self.size)
            .field("timeout", &self.timeout)
            .field("idle_in_transaction", &self.idle_in_transaction)
            .field("tls", &self.tls.is_some())
            .field("application_name", &self.application_name)
            .field("synchronous_commit", &self.synchronous_commit)
            .finish()
    }
}

/// Why the pool could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PoolSetupError {
    /// The URL does not parse.
    #[error("the PostgreSQL URL does not parse: {0}")]
    Url(tokio_postgres::Error),
    /// deadpool refused the settings.
    #[error("the PostgreSQL pool could not be built: {0}")]
    Build(String),
}

/// The pool. Connecting is lazy: the first use connects.
pub fn pool(settings: &PoolSettings) -> Result<Pool, PoolSetupError> {
    let mut config =
        tokio_postgres::Config::from_str(&settings.url).map_err(PoolSetupError::Url)?;
    // Several hosts (a primary and standbys): only the one that takes
    // writes, never a standby that may lag (whose shorter history a
    // replica would take for lost), unless the URL asks otherwise.
    if config.get_target_session_attrs() == tokio_postgres::config::TargetSessionAttrs::Any {
        config.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    }
    if let Some(password) = &settings.password {
        config.password(password);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(settings.timeout);
    }
    if config.get_application_name().is_none() {
        config.application_name(&settings.application_name);
    }
    // Server-side bounds, which hold even where a client gave up on a
    // statement (a dropped future does not stop the server's work): no
    // statement or lock wait beyond the timeout, no idle transaction
    // beyond its limit. Operators' own `options` come first; ours win.
    let bound = |d: Duration| d.as_millis().max(1);
    let mut ours = format!(
        "-c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
        bound(settings.timeout),
        bound(settings.timeout),
        bound(settings.idle_in_transaction),
    );
    // Set either way: a durable pool's commits wait for the WAL flush (and
    // the synchronous standby) even where the server's or the role's
    // default says otherwise, or an operator's `options` in the URL.
    ours.push_str(if settings.synchronous_commit {
        " -c synchronous_commit=on"
    } else {
        " -c synchronous_commit=off"
    });
    let options = match config.get_options() {
        Some(theirs) if !theirs.is_empty() => format!("{theirs} {ours}"),
        _ => ours,
    };
    config.options(options);
    // A half-open connection (the server's host gone) is noticed within
    // the timeout: unacknowledged data gives up after it, and idle
    // connections are probed.
    config.tcp_user_timeout(settings.timeout);
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(10));
    config.keepalives_interval(Duration::from_secs(2));
    config.keepalives_retries(3);
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match &settings.tls {
        Some(tls) => {
            // Required, never "preferred": a server (or someone in the
            // path) that answers without TLS is refused, not used in the
            // clear.
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            Manager::from_config(
                config,
                tokio_postgres_rustls::MakeRustlsConnect::new(tls.as_ref().clone()),
                manager_config,
            )
        }
        None => Manager::from_config(config, tokio_postgres::NoTls, manager_config),
    };
    Pool::builder(manager)
        .max_size(settings.size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(settings.timeout))
        .create_timeout(Some(settings.timeout))
        .recycle_timeout(Some(settings.timeout))
        .build()
        .map_err(|e| PoolSetupError::Build(e.to_string()))
}
