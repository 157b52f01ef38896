//! Where the broker's state lives, behind one face for the request path:
//! the embedded store (sled and the log file in `data_dir`, one process),
//! or PostgreSQL shared by replicas ([`onceonly_store_postgres`]). This
//! module opens the chosen one and is the audit log's face; consents and
//! the idempotency window choose their backend in their own modules.

use std::sync::Arc;

use onceonly_audit_log::{AuditError, AuditFault, AuditFilter, AuditLog, AuditMetrics};
use onceonly_merkle::Hash;
use onceonly_merkle::sth::SignedTreeHead;
use onceonly_proto::v1::{AuditReceipt, AuditRecord};
use onceonly_store_postgres::{PgAuditLog, Pool};

use crate::config::{SchemaPolicy, StorageConfig};

/// The audit log, embedded or replicated.
#[derive(Clone)]
pub enum Audit {
    /// The log file in `data_dir`: records are in a signed head before the
    /// answer.
    Embedded(AuditLog),
    /// PostgreSQL: records are committed before the answer and in a signed
    /// head within the merge delay, as each receipt promises.
    Replicated(PgAuditLog),
}

/// Where an appended record is.
#[derive(Debug, Clone, Default)]
pub struct Appended {
    /// Its log index, where the record is already in a signed head.
    pub index: Option<u64>,
    /// The signed promise of inclusion, where it is not yet.
    pub receipt: Option<AuditReceipt>,
}

impl Audit {
    /// Appends `record` durably: Ok once it is committed.
    pub async fn append(&self, record: AuditRecord) -> Result<Appended, AuditError> {
        match self {
            Audit::Embedded(log) => log.append(record).await.map(|index| Appended {
                index: Some(index),
                receipt: None,
            }),
            Audit::Replicated(log) => log.append(record).await.map(|receipt| Appended {
                index: None,
                receipt: Some(receipt),
            }),
        }
    }

    /// The latest signed tree head.
    pub async fn signed_tree_head(&self) -> Result<Option<SignedTreeHead>, AuditError> {
        match self {
            Audit::Embedded(log) => log.signed_tree_head(),
            Audit::Replicated(log) => log.signed_tree_head().await,
        }
    }

    /// The audit path of record `index` in the tree of `size`, and the
    /// record's leaf hash.
    pub async fn inclusion_proof(
        &self,
        index: u64,
        size: u64,
    ) -> Result<(Vec<Hash>, Hash), AuditError> {
        match self {
            Audit::Embedded(log) => Ok((log.inclusion_proof(index, size)?, log.leaf_hash(index)?)),
            Audit::Replicated(log) => Ok((
                log.inclusion_proof(index, size).await?,
                log.leaf_hash(index).await?,
            )),
        }
    }

    /// The index of the record whose leaf hash is `leaf_hash`, among the
    /// first `size` (None where it is not there); Err(Unsupported) for the
    /// embedded log, which has no such index (its answers carry the
    /// record's log index instead, and a scan per call would let any
    /// caller make the broker read its whole log).
    pub async fn find_leaf(&self, leaf_hash: &Hash, size: u64) -> Result<Option<u64>, AuditError> {
        match self {
            Audit::Embedded(_) => Err(AuditError::OutOfRange(
                "lookup by leaf hash is for replicas' receipts; this broker runs on its embedded log, whose answers carry audit_log_index: ask by leaf_index".into(),
            )),
            Audit::Replicated(log) => Ok(log.find_leaf(leaf_hash).await?.filter(|i| *i < size)),
        }
    }

    /// The proof that the tree of `second` extends the tree of `first`.
    pub async fn consistency_proof(
        &self,
        first: u64,
        second: u64,
    ) -> Result<Vec<Hash>, AuditError> {
        match self {
            Audit::Embedded(log) => log.consistency_proof(first, second),
            Audit::Replicated(log) => log.consistency_proof(first, second).await,
        }
    }

    /// Entries from `start`, at most `max`: (index, record, leaf bytes).
    pub async fn entries(
        &self,
        start: u64,
        max: u64,
    ) -> Result<Vec<(u64, AuditRecord, Vec<u8>)>, AuditError> {
        match self {
            Audit::Embedded(log) => {
                let log = log.clone();
                // Reads from the file: off the async workers.
                tokio::task::spawn_blocking(move || {
                    let end = log.len().min(start.saturating_add(max));
                    let mut entries = Vec::new();
                    for index in start..end {
                        if let Some((record, leaf_data)) = log.entry(index)? {
                            entries.push((index, record, leaf_data));
                        }
                    }
                    Ok(entries)
                })
                .await
                .map_err(|e| AuditError::Storage(format!("reading entries: {e}")))?
            }
            Audit::Replicated(log) => log.entries(start, max).await,
        }
    }

    /// Up to `limit` records matching `filter` from `start`, and where to
    /// continue.
    pub async fn query(
        &self,
        filter: AuditFilter,
        start: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), AuditError> {
        match self {
            Audit::Embedded(log) => {
                let log = log.clone();
                // A query may scan the index and read the file.
                tokio::task::spawn_blocking(move || log.query(&filter, start, limit))
                    .await
                    .map_err(|e| AuditError::Storage(format!("audit query: {e}")))?
            }
            Audit::Replicated(log) => log.query(&filter, start, limit).await,
        }
    }

    /// Why appends are refused now, if they are (readiness follows it).
    pub fn refusing(&self) -> Option<String> {
        match self {
            Audit::Embedded(log) => log.refusing(),
            Audit::Replicated(log) => log.refusing(),
        }
    }

    /// Records covered by the latest signed head (as last seen).
    pub fn tree_size(&self) -> u64 {
        match self {
            Audit::Embedded(log) => log.tree_size(),
            Audit::Replicated(log) => log.tree_size(),
        }
    }

    /// Batch and flush (or commit) figures.
    pub fn metrics(&self) -> &AuditMetrics {
        match self {
            Audit::Embedded(log) => log.metrics(),
            Audit::Replicated(log) => log.metrics(),
        }
    }

    /// Makes every append fail while `failing` (drills and tests).
    pub fn inject_failure(&self, failing: bool) {
        match self {
            Audit::Embedded(log) => log.inject_failure(failing),
            Audit::Replicated(log) => log.inject_failure(failing),
        }
    }

    /// Injects `fault` (the embedded log's faults; the replicated log knows
    /// only failing appends).
    pub fn inject(&self, fault: AuditFault) {
        match self {
            Audit::Embedded(log) => log.inject(fault),
            Audit::Replicated(log) => log.inject_failure(fault != AuditFault::None),
        }
    }

    /// The embedded log, where that is the backend.
    pub fn embedded(&self) -> Option<&AuditLog> {
        match self {
            Audit::Embedded(log) => Some(log),
            Audit::Replicated(_) => None,
        }
    }

    /// The replicated log, where that is the backend.
    pub fn replicated(&self) -> Option<&PgAuditLog> {
        match self {
            Audit::Embedded(_) => None,
            Audit::Replicated(log) => Some(log),
        }
    }
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

/// Connects to PostgreSQL as `storage` says and brings the schema up to
/// this build's (or checks it).
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

/// `keys`: (name, check value) of the keys every replica must share.
pub async fn open_postgres(
    storage: &StorageConfig,
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
            url: storage.url.clone().unwrap_or_default(),
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
/// part, so a restarted process is a new lease holder.
pub fn replica_name() -> String {
    use rand::RngCore;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let mut tag = [0u8; 3];
    rand::rng().fill_bytes(&mut tag);
    format!("{host}-{}-{}", std::process::id(), hex::encode(tag))
}

/// Opens sled as `config` says, off the async workers.
pub use crate::audit::open_storage_async as open_sled;

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
    if config.storage.backend != crate::config::Backend::Postgres {
        return Err(MoveError::NoTarget(
            "the configuration's [storage] is embedded".into(),
        ));
    }
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
    let pseudonyms = Arc::new(crate::keys::load_checked_pseudonym_key(config)?);
    let pseudonym_check = crate::keys::pseudonym_key_check(config)?;
    let audit_key_id = onceonly_merkle::sth::key_id(&public_key);
    let pool = open_postgres(
        &config.storage,
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
    let embedded = crate::consent::ConsentStore::open(&db, pseudonyms.clone())?;
    let target = crate::consent::ConsentStore::postgres(pool, pseudonyms);
    let consents = embedded.all_embedded()?;
    for consent in &consents {
        target.import(consent, true).await?;
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
