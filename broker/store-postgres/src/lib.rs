//! The broker's state in PostgreSQL, for replicas that serve together
//! (issue 15): its versioned schema, the connection [`pool`], and the
//! replicated [`audit`] log. Every replica calls
//! [`migrate`] at start: under an advisory lock (so replicas starting at
//! once apply each migration once), it applies the migrations this build
//! knows and the database lacks, each recorded with a checksum, and refuses
//! a database whose applied migrations were altered or that is ahead of
//! this build. With [`Mode::Check`] it changes nothing and names what is
//! missing, for operators who apply schema changes themselves.

pub mod audit;
mod batch;
pub mod consents;
pub mod pool;
pub mod quotas;
mod sequence_numbers;
pub mod window;

pub use audit::{LogSettings, PgAuditLog};
pub use consents::PgConsents;
pub use deadpool_postgres::Pool;
pub use pool::{PoolSettings, PoolSetupError, pool};
pub use quotas::PgQuotas;
pub use tokio_postgres;
pub use window::PgWindow;

use sha2::{Digest, Sha256};

/// An error with its causes (tokio-postgres shows only "db error" for a
/// server's refusal, whose message is its source).
pub use onceonly_store::describe;

/// One versioned schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its version: 1, 2, ... in order.
    pub version: i32,
    /// Its name (the file's, without the number).
    pub name: &'static str,
    /// Its SQL.
    pub sql: &'static str,
}

impl Migration {
    /// SHA-256 of its SQL, hex: what the database records it applied.
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }
}

/// The migrations of this build, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "replicated_state",
        sql: include_str!("../migrations/0001_replicated_state.sql"),
    },
    Migration {
        version: 2,
        name: "replicas_at_work",
        sql: include_str!("../migrations/0002_replicas_at_work.sql"),
    },
    Migration {
        version: 3,
        name: "queue_sequence_numbers",
        sql: include_str!("../migrations/0003_queue_sequence_numbers.sql"),
    },
    Migration {
        version: 4,
        name: "outcomes_inline",
        sql: include_str!("../migrations/0004_outcomes_inline.sql"),
    },
];

/// The table that records applied migrations.
pub const MIGRATIONS_TABLE: &str = "onceonly_schema_migrations";

/// Key of the advisory lock replicas take while migrating ("onceonly" in
/// ASCII, as a number).
const MIGRATION_LOCK: i64 = 0x6f6e_6365_6f6e_6c79;

/// Whether [`migrate`] may change the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Apply what is missing.
    Apply,
    /// Change nothing; fail naming what is missing.
    Check,
}

/// Why the schema is not what this build needs.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The database did not answer or refused a statement.
    #[error("PostgreSQL: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),
    /// An applied migration is not the one this build has.
    #[error(
        "schema migration {version} ({name}) applied to this database differs from this build's (checksum {applied} there, {expected} here): a released migration was edited; restore it and add the change as a new migration"
    )]
    Altered {
        /// Its version.
        version: i32,
        /// Its name.
        name: String,
        /// The checksum the database recorded.
        applied: String,
        /// This build's.
        expected: String,
    },
    /// The database has migrations this build does not know.
    #[error(
        "the database is at schema version {database}, this build knows up to {known}: run a broker of the release that applied it (or newer)"
    )]
    Ahead {
        /// The database's highest version.
        database: i32,
        /// This build's highest.
        known: i32,
    },
    /// Check mode, and migrations are missing.
    #[error(
        "the database lacks schema migrations {missing:?}: apply them first (as a replica that migrates at start does), then start this one"
    )]
    Missing {
        /// The versions missing.
        missing: Vec<i32>,
    },
}

/// What [`migrate`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaState {
    /// The schema version now.
    pub version: i32,
    /// The versions this call applied.
    pub applied: Vec<i32>,
}

/// Brings the schema to this build's version (or checks it is there), in
/// one transaction under the migration lock.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    mode: Mode,
) -> Result<SchemaState, MigrationError> {
    let transaction = client.transaction().await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let exists: bool = transaction
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&MIGRATIONS_TABLE])
        .await?
        .get(0);
    if !exists {
        if mode == Mode::Check {
            return Err(MigrationError::Missing {
                missing: MIGRATIONS.iter().map(|m| m.version).collect(),
            });
        }
        transaction
            .batch_execute(&format!(
                "CREATE TABLE {MIGRATIONS_TABLE} (
                    version    integer PRIMARY KEY,
                    name       text NOT NULL,
                    checksum   text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )"
            ))
            .await?;
    }
    let rows = transaction
        .query(
            &format!("SELECT version, name, checksum FROM {MIGRATIONS_TABLE} ORDER BY version"),
            &[],
        )
        .await?;
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    let mut done = Vec::new();
    for row in rows {
        let version: i32 = row.get(0);
        let name: String = row.get(1);
        let applied: String = row.get(2);
        let Some(ours) = MIGRATIONS.iter().find(|m| m.version == version) else {
            return Err(MigrationError::Ahead {
                database: version.max(known),
                known,
            });
        };
        if applied != ours.checksum() {
            return Err(MigrationError::Altered {
                version,
                name,
                applied,
                expected: ours.checksum(),
            });
        }
        done.push(version);
    }
    let missing: Vec<&Migration> = MIGRATIONS
        .iter()
        .filter(|m| !done.contains(&m.version))
        .collect();
    if missing.is_empty() {
        transaction.commit().await?;
        return Ok(SchemaState {
            version: known,
            applied: Vec::new(),
        });
    }
    if mode == Mode::Check {
        return Err(MigrationError::Missing {
            missing: missing.iter().map(|m| m.version).collect(),
        });
    }
    let mut applied = Vec::new();
    for migration in missing {
        transaction.batch_execute(migration.sql).await?;
        transaction
            .execute(
                &format!(
                    "INSERT INTO {MIGRATIONS_TABLE} (version, name, checksum) VALUES ($1, $2, $3)"
                ),
                &[&migration.version, &migration.name, &migration.checksum()],
            )
            .await?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied schema migration"
        );
        applied.push(migration.version);
    }
    transaction.commit().await?;
    Ok(SchemaState {
        version: known,
        applied,
    })
}

/// A replica's key is not the one the others hold.
#[derive(Debug, thiserror::Error)]
pub enum KeyCheckError {
    /// The database failed.
    #[error("PostgreSQL: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),
    /// The check value differs.
    #[error(
        "this replica's {name} is not the one the other replicas use (check value {ours} here, {theirs} recorded in the database): give every replica the same {name} file"
    )]
    Differs {
        /// Which key.
        name: String,
        /// This replica's check value.
        ours: String,
        /// The one recorded.
        theirs: String,
    },
}

/// Records each (key name, check value) where it is the first, and
/// otherwise refuses one that differs from the recorded value.
pub async fn check_keys(
    client: &tokio_postgres::Client,
    keys: &[(&str, &str)],
) -> Result<(), KeyCheckError> {
    for (name, ours) in keys {
        client
            .execute(
                "INSERT INTO key_checks (name, check_value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[name, ours],
            )
            .await?;
        let theirs: String = client
            .query_one(
                "SELECT check_value FROM key_checks WHERE name = $1",
                &[name],
            )
            .await?
            .get(0);
        if theirs != *ours {
            return Err(KeyCheckError::Differs {
                name: (*name).to_owned(),
                ours: (*ours).to_owned(),
                theirs,
            });
        }
    }
    Ok(())
}
