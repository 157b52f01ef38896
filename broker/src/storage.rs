//! Where the broker's state lives: the one place that chooses a backend.
//! [`open`] opens the embedded store (the log file and sled in
//! `data_dir`, one process) or PostgreSQL shared by replicas
//! ([`onceonly_store_postgres`]) as `[storage] backend` says, and hands
//! the request path a [`Stores`] of trait objects ([`onceonly_store`]):
//! nothing else in the broker matches on the backend. Also here: moving a
//! data directory into PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use onceonly_audit_log::AuditLog;
use onceonly_merkle::sth::SignedTreeHead;
pub use onceonly_store::{Appended, Shared, Stores};
use onceonly_store_postgres::Pool;
use tokio::task::JoinHandle;

use crate::config::{BrokerConfig, PostgresConfig, SchemaPolicy, StorageConfig};
use crate::pseudonym::Pseudonymiser;

/// Why the stores could not be opened: what, and why.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct OpenError {
    /// What could not be opened.
    pub what: String,
    /// Why.
    pub reason: String,
}

/// The stores, opened.
pub struct Opened {
    /// The stores the request path uses.
    pub stores: Stores,
    /// The audit log's writer: ends once the last handle to the log is
    /// gone, its last records flushed.
    pub writer: JoinHandle<()>,
    /// How long a durable write took at start (a timed flush, or a round
    /// trip to the database): the seed of the deadline reserve.
    pub append_seed: Duration,
}

/// Opens the stores `config` names, the log's heads signed by `audit_key`.
pub async fn open(
    config: &BrokerConfig,
    audit_key: ring::signature::Ed25519KeyPair,
    pseudonyms: &Arc<Pseudonymiser>,
) -> Result<Opened, OpenError> {
    match &config.storage {
        StorageConfig::Embedded => open_embedded(config, audit_key, pseudonyms).await,
        StorageConfig::Postgres(postgres) => {
            open_replicated(config, postgres, audit_key, pseudonyms).await
        }
    }
}

/// The data directory: sled (indexes, consents) and the log file.
async fn open_embedded(
    config: &BrokerConfig,
    audit_key: ring::signature::Ed25519KeyPair,
    pseudonyms: &Arc<Pseudonymiser>,
) -> Result<Opened, OpenError> {
    let in_data_dir = |what: &str, reason: String| OpenError {
        what: format!("{what} {}", config.data_dir.display()),
        reason,
    };
    let db = open_sled(
        sled::Config::new()
            .path(&config.data_dir)
            .cache_capacity(config.storage_cache.as_u64()),
    )
    .await
    .map_err(|reason| in_data_dir("data directory", reason))?;
    if !config.audit.durable {
        tracing::error!(
            data_dir = %config.data_dir.display(),
            "[audit] durable = false: records are NOT flushed before answers, so a crash loses answered requests' records; for measurements only, never in service"
        );
    }
    let (audit, writer) = AuditLog::open(&config.data_dir, &db, config.audit.durable, audit_key)
        .map_err(|e| OpenError {
            what: "audit log".into(),
            reason: e.to_string(),
        })?;
    let consents = onceonly_store::embedded::SledConsents::open(&db, pseudonyms.row_key())
        .map_err(|e| OpenError {
            what: "consent store".into(),
            reason: e.to_string(),
        })?;
    let data_dir = config.data_dir.clone();
    let flush = tokio::task::spawn_blocking(move || crate::audit::time_a_flush(&data_dir))
        .await
        .map_err(std::io::Error::other)
        .and_then(|timed| timed)
        .map_err(|e| in_data_dir("a timed flush in", e.to_string()))?;
    tracing::debug!(
        flush_ms = flush.as_secs_f64() * 1000.0,
        "timed a flush of the data directory"
    );
    Ok(Opened {
        stores: Stores {
            audit: Arc::new(audit),
            consents: Arc::new(consents),
            shared: None,
        },
        writer,
        append_seed: flush,
    })
}

/// PostgreSQL shared with other replicas: the schema checked or brought up
/// to date, the replicated log started (this replica's queue writer and
/// sequencer candidate).
async fn open_replicated(
    config: &BrokerConfig,
    storage: &PostgresConfig,
    audit_key: ring::signature::Ed25519KeyPair,
    pseudonyms: &Arc<Pseudonymiser>,
) -> Result<Opened, OpenError> {
    let postgres = |reason: String| OpenError {
        what: "PostgreSQL ([storage] url)".into(),
        reason,
    };
    let pseudonym_check =
        crate::keys::pseudonym_key_check(config).map_err(|e| postgres(e.to_string()))?;
    let audit_key_id =
        onceonly_merkle::sth::key_id(ring::signature::KeyPair::public_key(&audit_key).as_ref());
    let pools = open_postgres(
        storage,
        &[
            ("pseudonym_key", &pseudonym_check),
            ("audit_key", &audit_key_id),
        ],
    )
    .await
    .map_err(|e| postgres(e.to_string()))?;
    let replica = replica_name();
    let started = std::time::Instant::now();
    let (log, writer) = onceonly_store_postgres::PgAuditLog::open(
        pools.requests.clone(),
        pools.log.clone(),
        audit_key,
        pseudonyms.row_key(),
        onceonly_store_postgres::LogSettings {
            replica: replica.clone(),
            merge_delay: storage.merge_delay,
            lease: storage.sequencer_lease,
            interval: storage.sequencer_interval,
            timeout: storage.timeout,
        },
    )
    .await
    .map_err(|e| postgres(e.to_string()))?;
    // Opening read the latest head: a round trip, the seed of the deadline
    // reserve until commits are timed.
    let round_trip = started.elapsed();
    tracing::info!(%replica, "serving as a replica on PostgreSQL");
    // A claim with no outcome long after any exchange's deadline and every
    // bounded database step after it (audit commit, outcome store) is its
    // replica's crash.
    let stale_claim =
        config.limits.max_request_time + storage.timeout * 4 + Duration::from_secs(10);
    Ok(Opened {
        stores: Stores {
            audit: Arc::new(log),
            consents: Arc::new(onceonly_store_postgres::PgConsents::new(
                pools.requests.clone(),
                pseudonyms.row_key(),
            )),
            shared: Some(Shared {
                window: Arc::new(onceonly_store_postgres::PgWindow::new(
                    pools.window.clone(),
                    pseudonyms.row_keys(),
                    config.idempotency.window,
                    stale_claim,
                    storage.timeout,
                )),
                quotas: Arc::new(onceonly_store_postgres::PgQuotas::new(
                    pools.window,
                    storage.timeout,
                )),
            }),
        },
        writer,
        append_seed: round_trip,
    })
}

/// Why PostgreSQL could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// The password file could not be read.
    #[error("{path}: {source}")]
    PasswordFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The pool could not be built.
    #[error(transparent)]
    Pool(#[from] onceonly_store_postgres::PoolSetupError),
    /// The TLS files ([storage] ca, client_cert, client_key) are unusable.
    #[error("TLS to PostgreSQL: {0}")]
    Tls(String),
    /// No connection within the timeout, or the server refused it.
    #[error("PostgreSQL did not answer: {0}")]
    Connect(String),
    /// The schema is not this build's.
    #[error(transparent)]
    Schema(#[from] onceonly_store_postgres::MigrationError),
    /// A key differs from the other replicas'.
    #[error(transparent)]
    Keys(#[from] onceonly_store_postgres::KeyCheckError),
}

/// A replica's connections, by job.
#[derive(Clone)]
pub struct Pools {
    /// Durable work: audit commits, consents, readers (`pool_size`).
    pub requests: Pool,
    /// The idempotency window and quota counts: commits that do not wait
    /// for the WAL flush, as that state may be lost with a crash of the
    /// database like the embedded broker's memory (`pool_size`).
    pub window: Pool,
    /// The sequencer and the probe, two connections of their own.
    pub log: Pool,
}

/// Connects to PostgreSQL as `storage` says and brings the schema up to
/// this build's (or checks it). `keys`: (name, check value) of the keys
/// every replica must share.
pub async fn open_postgres(
    storage: &PostgresConfig,
    keys: &[(&str, &str)],
) -> Result<Pools, PostgresError> {
    let password = match &storage.password_file {
        Some(file) => Some(
            std::fs::read_to_string(file)
                .map_err(|source| PostgresError::PasswordFile {
                    path: file.display().to_string(),
                    source,
                })?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        ),
        None => None,
    };
    let tls = match &storage.ca {
        Some(ca) => Some(
            onceonly_certs::tls::external_client_config(
                ca,
                storage
                    .client_cert
                    .as_deref()
                    .zip(storage.client_key.as_deref()),
            )
            .map_err(|e| PostgresError::Tls(e.to_string()))?,
        ),
        None => None,
    };
    let settings =
        |size: usize, synchronous_commit: bool, name: &str| onceonly_store_postgres::PoolSettings {
            url: storage.url.clone(),
            password: password.clone(),
            size,
            timeout: storage.timeout,
            // As long as the lease: a dead sequencer's transaction (and its
            // lock on the lease row) ends by the time its lease would.
            idle_in_transaction: storage.sequencer_lease,
            tls: tls.clone(),
            application_name: name.to_owned(),
            synchronous_commit,
        };
    let pool =
        onceonly_store_postgres::pool(&settings(storage.pool_size, true, "onceonly-broker"))?;
    let pools = Pools {
        requests: pool.clone(),
        window: onceonly_store_postgres::pool(&settings(
            storage.pool_size,
            false,
            "onceonly-broker-window",
        ))?,
        log: onceonly_store_postgres::pool(&settings(2, true, "onceonly-broker-sequencer"))?,
    };
    let mut client = pool
        .get()
        .await
        .map_err(|e| PostgresError::Connect(onceonly_store_postgres::describe(&e)))?;
    let mode = match storage.schema {
        SchemaPolicy::Apply => onceonly_store_postgres::Mode::Apply,
        SchemaPolicy::Check => onceonly_store_postgres::Mode::Check,
    };
    let state = onceonly_store_postgres::migrate(&mut client, mode).await?;
    tracing::info!(?state, "PostgreSQL schema ready");
    onceonly_store_postgres::check_keys(&client, keys).await?;
    Ok(pools)
}

/// This process's name among replicas: host, process id and a random
/// part (64 bits: containers repeat host names and process ids), so a
/// restarted process is a new lease holder.
pub fn replica_name() -> String {
    use rand::RngCore;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let mut tag = [0u8; 8];
    rand::rng().fill_bytes(&mut tag);
    format!("{host}-{}-{}", std::process::id(), hex::encode(tag))
}

/// Opens sled as `config` says, off the async workers.
pub use crate::audit::open_storage_async as open_sled;

/// Tags the consents of `config.data_dir` written before consents were
/// authenticated (the broker stopped: sled's lock proves it), as the
/// broker's own; how many. Run once after upgrading such a directory.
pub async fn tag_consents(config: &BrokerConfig) -> Result<usize, OpenError> {
    let failed = |what: &str, reason: String| OpenError {
        what: format!("{what} {}", config.data_dir.display()),
        reason,
    };
    let pseudonyms = crate::keys::load_checked_pseudonym_key(config)
        .map_err(|e| failed("the pseudonym key for", e.to_string()))?;
    let db = open_sled(sled::Config::new().path(&config.data_dir))
        .await
        .map_err(|e| failed("data directory", format!("{e} (stop the broker first)")))?;
    onceonly_store::embedded::SledConsents::open(&db, pseudonyms.row_key())
        .and_then(|consents| consents.tag_untagged())
        .map_err(|e| failed("the consents in", e.to_string()))
}

/// What moving a data directory into PostgreSQL did.
#[derive(Debug, Clone)]
pub struct Moved {
    /// Records moved.
    pub records: u64,
    /// The last signed head, now the PostgreSQL log's.
    pub head: Option<SignedTreeHead>,
    /// Consents moved.
    pub consents: usize,
}

/// Why a data directory could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The configuration does not name a PostgreSQL target.
    #[error(
        "{0}: set [storage] backend = \"postgres\" and its url (the target); data_dir stays the source"
    )]
    NoTarget(String),
    /// A key could not be read.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// The embedded log does not verify.
    #[error("the data directory's log does not verify, so it is not moved: {0}")]
    Tampered(#[from] onceonly_audit_log::Tamper),
    /// The data directory could not be read.
    #[error("{0}")]
    Read(String),
    /// PostgreSQL refused.
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// The import failed (nothing was written).
    #[error(transparent)]
    Import(#[from] onceonly_store_postgres::audit::ImportError),
    /// A consent of the data directory fails its check (written or
    /// edited outside the broker): the move stops before anything is
    /// written.
    #[error(
        "{0}; nothing was moved (restore the data directory from a backup, or remove that consent, and move again)"
    )]
    Unauthentic(crate::consent::ConsentError),
    /// A consent could not be moved.
    #[error(transparent)]
    Consent(#[from] crate::consent::ConsentError),
}

/// Moves the log and the consents of `config.data_dir` (the broker
/// stopped) into the empty PostgreSQL database of `config.storage`: the log
/// is verified end to end first, then its records, tree and last signed
/// head are written as they are, so auditors' saved heads stay provable
/// against the replicas (the signed history goes on); consents keep their
/// ids, times and revocations. The data directory is left unchanged.
pub async fn move_to_postgres(config: &crate::BrokerConfig) -> Result<Moved, MoveError> {
    use ring::signature::KeyPair;
    let Some(target) = config.storage.postgres() else {
        return Err(MoveError::NoTarget(
            "the configuration's [storage] is embedded".into(),
        ));
    };
    let audit_key = crate::keys::load_audit_key(&config.audit_key)?;
    let public_key = audit_key.public_key().as_ref().to_vec();
    // sled first: its lock proves no broker runs on the data directory
    // (which would go on appending records this move does not carry).
    let db = open_sled(sled::Config::new().path(&config.data_dir))
        .await
        .map_err(|e| {
            MoveError::Read(format!(
                "{}: {e} (stop the broker first)",
                config.data_dir.display()
            ))
        })?;
    // Every consent must pass its check before anything is written: a row
    // written into the data directory by hand would otherwise be tagged
    // by PostgreSQL's store as genuine.
    let pseudonyms = Arc::new(crate::keys::load_checked_pseudonym_key(config)?);
    let embedded = onceonly_store::embedded::SledConsents::open(&db, pseudonyms.row_key())?;
    let consents = onceonly_store::ConsentStore::all(&embedded)
        .await
        .map_err(MoveError::Unauthentic)?;
    let data_dir = config.data_dir.clone();
    let key = public_key.clone();
    let (verified, frames) = tokio::task::spawn_blocking(move || {
        let verified = onceonly_audit_log::verify_dir(&data_dir, &key)?;
        let frames = onceonly_audit_log::segment::read_all(
            &data_dir.join(onceonly_audit_log::segment::FILE_NAME),
        )
        .map_err(|e| MoveError::Read(e.to_string()))?;
        Ok::<_, MoveError>((verified, frames))
    })
    .await
    .map_err(|e| MoveError::Read(e.to_string()))??;
    let size = verified.head.as_ref().map_or(0, |h| h.tree_size);
    let records: Vec<Vec<u8>> = frames
        .into_iter()
        .filter(|(_, _, checksum_ok)| *checksum_ok)
        .flat_map(|(_, frame, _)| frame.records)
        .take(size as usize)
        .collect();
    let pseudonym_check = crate::keys::pseudonym_key_check(config)?;
    let audit_key_id = onceonly_merkle::sth::key_id(&public_key);
    let pool = open_postgres(
        target,
        &[
            ("pseudonym_key", &pseudonym_check),
            ("audit_key", &audit_key_id),
        ],
    )
    .await?
    .requests;
    let log_moved = match &verified.head {
        Some(head) => {
            onceonly_store_postgres::audit::import(&pool, &records, head, &public_key).await?
        }
        None => onceonly_store_postgres::audit::Imported::Written,
    };
    // The consents: a rerun (after a failure here) finds the log already
    // there and adds the consents still missing.
    let target = onceonly_store_postgres::PgConsents::new(pool, pseudonyms.row_key());
    for consent in &consents {
        onceonly_store::ConsentStore::import(&target, consent).await?;
    }
    if log_moved == onceonly_store_postgres::audit::Imported::AlreadyThere {
        tracing::info!("the log was already moved by an earlier run; consents completed");
    }
    Ok(Moved {
        records: records.len() as u64,
        head: verified.head,
        consents: consents.len(),
    })
}
