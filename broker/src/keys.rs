//! The broker's own keys, which are never minted implicitly:
//!
//! - the audit signing key (Ed25519, PKCS#8, mode 0600, `audit_key`), with
//!   its public half beside it (`<audit_key>.pub`, hex) for auditors;
//! - the pseudonym key (32 random bytes, hex, mode 0600, `pseudonym_key`),
//!   under which subject ids become the pseudonyms the log stores.
//!
//! [`init`] creates both, once (`onceonly-broker init`); `serve` only
//! [`load_audit_key`]s and [`load_checked_pseudonym_key`]s them and refuses
//! to start when one is missing: a lost key, or anyone who can write the
//! data disk, must not start a new history or empty every citizen's view
//! silently. A *replaced* pseudonym key is refused too: the data directory
//! keeps the key's check value ([`PSEUDONYM_CHECK_FILE`], an HMAC of a fixed
//! label under the key, which reveals nothing of it), written at the first
//! start and compared at every start after. (A replaced audit key is found
//! by the signed heads in the log.)
//! [`rotate_audit_key`] hands the log over to a new audit key with a record
//! the old key signs (see [`crate::audit::handover`]).

use std::path::{Path, PathBuf};

use rand::RngCore;
use ring::hmac;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::audit::{AuditLog, public_key_path};
use crate::config::BrokerConfig;
use crate::pseudonym::Pseudonymiser;

/// What is wrong with a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key does not exist.
    #[error(
        "the {what} {path} does not exist; keys are never created by `serve`: create them once with `onceonly-broker init --config <broker.toml>`, or restore this one from its backup"
    )]
    Missing {
        /// Which key.
        what: &'static str,
        /// Where it should be.
        path: PathBuf,
    },
    /// `init` found a key already there.
    #[error(
        "{path} already exists; init never replaces a key (the audit key is rotated with `onceonly-broker rotate-audit-key`)"
    )]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The file is not such a key.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The pseudonym key is not the one the data directory was created
    /// with.
    #[error(
        "the pseudonym key {key} is not the one the data directory {data_dir} was created with ({check} holds another key's check value): under another key no record or consent matches its citizen any more. Restore the original {key} from its backup; nothing in the data directory was changed"
    )]
    PseudonymKeyReplaced {
        /// The pseudonym key file.
        key: PathBuf,
        /// The data directory.
        data_dir: PathBuf,
        /// The check value file in the data directory.
        check: PathBuf,
    },
    /// The public key file names another key.
    #[error(
        "{public} does not hold the public half of {key}; auditors verify with that file: restore the matching pair"
    )]
    PublicMismatch {
        /// The public key file.
        public: PathBuf,
        /// The private key file.
        key: PathBuf,
    },
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The audit log refused the hand-over.
    #[error("the audit log: {0}")]
    Log(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates the audit key (with its `.pub`) and the pseudonym key of
/// `config`; refuses where any of them exists. Returns the files written.
pub fn init(config: &BrokerConfig) -> Result<Vec<PathBuf>, KeyError> {
    let public = public_key_path(&config.audit_key);
    for path in [&config.audit_key, &public, &config.pseudonym_key] {
        if path.exists() {
            return Err(KeyError::Exists { path: path.clone() });
        }
    }
    create_audit_key(&config.audit_key)?;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    write_secret(&config.pseudonym_key, hex::encode(secret).as_bytes())?;
    Ok(vec![
        config.audit_key.clone(),
        public,
        config.pseudonym_key.clone(),
    ])
}

/// Creates a new audit signing key at `path` (mode 0600) and its `.pub`;
/// refuses where `path` exists.
pub fn create_audit_key(path: &Path) -> Result<Ed25519KeyPair, KeyError> {
    let pkcs8 = new_audit_key()?;
    write_secret(path, pkcs8.as_ref())?;
    let key = parse_audit_key(path, pkcs8.as_ref())?;
    write_public(&public_key_path(path), &key)?;
    Ok(key)
}

fn new_audit_key() -> Result<ring::pkcs8::Document, KeyError> {
    Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).map_err(|_| {
        KeyError::Invalid {
            path: PathBuf::new(),
            reason: "the system could not generate an Ed25519 key".into(),
        }
    })
}

fn write_secret(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    onceonly_certs::pki::write_secret_file(path, contents).map_err(|e| match e {
        onceonly_certs::PkiError::Exists(path) => KeyError::Exists { path },
        other => KeyError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(other.to_string()),
        },
    })
}

fn write_public(path: &Path, key: &Ed25519KeyPair) -> Result<(), KeyError> {
    let text = format!("{}\n", hex::encode(key.public_key().as_ref()));
    let fresh = path.with_extension("pub.new");
    std::fs::write(&fresh, text).map_err(io(&fresh))?;
    std::fs::rename(&fresh, path).map_err(io(path))
}

fn parse_audit_key(path: &Path, pkcs8: &[u8]) -> Result<Ed25519KeyPair, KeyError> {
    Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| KeyError::Invalid {
        path: path.to_owned(),
        reason: "not an Ed25519 PKCS#8 key".into(),
    })
}

/// Loads the audit signing key at `path`, which must exist, and checks that
/// `<path>.pub` (where it exists) holds its public half.
pub fn load_audit_key(path: &Path) -> Result<Ed25519KeyPair, KeyError> {
    let key = read_audit_key(path)?;
    if !public_key_matches(path, &key)? {
        write_public(&public_key_path(path), &key)?;
    }
    Ok(key)
}

/// The audit signing key at `path`, which must exist.
fn read_audit_key(path: &Path) -> Result<Ed25519KeyPair, KeyError> {
    let pkcs8 = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyError::Missing {
                what: "audit signing key",
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(io(path)(e)),
    };
    parse_audit_key(path, &pkcs8)
}

/// Whether `<path>.pub` holds `key`'s public half: true if it does, false
/// if it is missing, an error if it names another key.
fn public_key_matches(path: &Path, key: &Ed25519KeyPair) -> Result<bool, KeyError> {
    let public = public_key_path(path);
    match std::fs::read_to_string(&public) {
        Ok(text) if text.trim() == hex::encode(key.public_key().as_ref()) => Ok(true),
        Ok(_) => Err(KeyError::PublicMismatch {
            public,
            key: path.to_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(&public)(e)),
    }
}

/// What `onceonly-broker check` verifies of the keys, changing nothing:
/// both exist and parse, `audit.key.pub` (where present) holds the audit
/// key's public half, and the pseudonym key is the one the data directory
/// was created with (where it has a check value). So a `check` that
/// passes is not followed by a `serve` that refuses for a key.
pub fn check(config: &BrokerConfig) -> Result<(), KeyError> {
    let audit_key = read_audit_key(&config.audit_key)?;
    public_key_matches(&config.audit_key, &audit_key)?;
    let secret = read_pseudonym_secret(&config.pseudonym_key)?;
    let check = config.data_dir.join(PSEUDONYM_CHECK_FILE);
    match std::fs::read_to_string(&check) {
        Ok(text) if text.trim() != pseudonym_check_value(&secret) => {
            Err(KeyError::PseudonymKeyReplaced {
                key: config.pseudonym_key.clone(),
                data_dir: config.data_dir.clone(),
                check,
            })
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(&check)(e)),
    }
}

/// Loads the pseudonym key at `path`, which must exist.
pub fn load_pseudonym_key(path: &Path) -> Result<Pseudonymiser, KeyError> {
    read_pseudonym_secret(path).map(|secret| Pseudonymiser::from_secret(&secret))
}

/// The file in the data directory that holds the pseudonym key's check
/// value (hex).
pub const PSEUDONYM_CHECK_FILE: &str = "pseudonym-key.check";

/// What the check value is the HMAC-SHA-256 of, under the pseudonym key: a
/// fixed label no pseudonym input begins with.
const CHECK_LABEL: &[u8] = b"onceonly-pseudonym-key-check-v1";

/// Loads the pseudonym key of `config`, which must exist, and checks that
/// it is the key the data directory was created with: `serve` refuses
/// another one ([`KeyError::PseudonymKeyReplaced`]), under which every
/// record and consent would match no citizen. A data directory without a
/// check value (new, or from before key checks) gets one, logged.
pub fn load_checked_pseudonym_key(config: &BrokerConfig) -> Result<Pseudonymiser, KeyError> {
    let (path, data_dir) = (&config.pseudonym_key, &config.data_dir);
    let secret = read_pseudonym_secret(path)?;
    let expected = pseudonym_check_value(&secret);
    let check = data_dir.join(PSEUDONYM_CHECK_FILE);
    match std::fs::read_to_string(&check) {
        Ok(text) if text.trim() == expected => {}
        Ok(text) if text.trim().len() == 64 && hex::decode(text.trim()).is_ok() => {
            return Err(KeyError::PseudonymKeyReplaced {
                key: path.clone(),
                data_dir: data_dir.clone(),
                check,
            });
        }
        Ok(_) => {
            return Err(KeyError::Invalid {
                path: check,
                reason: format!(
                    "not a pseudonym key check value (64 hex digits); restore it from the backup of the data directory, or, only if {} is certainly the key this data directory was created with, remove the file and the next start writes it again",
                    path.display()
                ),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let had_data = std::fs::read_dir(data_dir).is_ok_and(|mut d| d.next().is_some());
            write_check(&check, &expected)?;
            if had_data {
                tracing::warn!(
                    check = %check.display(),
                    key = %path.display(),
                    "the data directory had no pseudonym key check value (it predates key checks); wrote one for the configured key, which from now on is the only one serve accepts"
                );
            } else {
                tracing::info!(
                    check = %check.display(),
                    key = %path.display(),
                    "recorded the pseudonym key's check value in the new data directory"
                );
            }
        }
        Err(e) => return Err(io(&check)(e)),
    }
    Ok(Pseudonymiser::from_secret(&secret))
}

/// The pseudonym key's check value (hex): replicas compare it in the
/// database as a data directory keeps it in its file.
pub fn pseudonym_check_value(secret: &[u8]) -> String {
    hex::encode(hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, secret),
        CHECK_LABEL,
    ))
}

/// The pseudonym key's check value, read from its file.
pub fn pseudonym_key_check(config: &BrokerConfig) -> Result<String, KeyError> {
    read_pseudonym_secret(&config.pseudonym_key).map(|secret| pseudonym_check_value(&secret))
}

/// Writes the check value to `path` (via a synced draft and a rename, so a
/// crash leaves no half-written file), creating the data directory.
fn write_check(path: &Path, value: &str) -> Result<(), KeyError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    onceonly_certs::pki::replace_synced(path, format!("{value}\n").as_bytes()).map_err(io(path))
}

/// The 32 secret bytes of the pseudonym key at `path`, which must exist.
fn read_pseudonym_secret(path: &Path) -> Result<Vec<u8>, KeyError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyError::Missing {
                what: "pseudonym key",
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(io(path)(e)),
    };
    let secret = hex::decode(text.trim())
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or_else(|| KeyError::Invalid {
            path: path.to_owned(),
            reason: "not a pseudonym key (64 hex digits)".into(),
        })?;
    Ok(secret)
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The hand-over record's index in the log.
    pub log_index: u64,
    /// The old public key, hex.
    pub old_public_key: String,
    /// The new public key, hex.
    pub new_public_key: String,
}

/// Hands the audit log of `config` (broker stopped) over to a new key.
///
/// Crash-safe and resumable: the log is opened first (so a running broker
/// is found before anything is written); the new key is written to
/// `<audit_key>.next`; the hand-over is appended and flushed; then the old
/// key is deleted (a retired key could still sign a fork that an auditor
/// anchored on it would accept), the new one moved into place and `.pub`
/// rewritten. Run again after a crash, it finishes a hand-over already in
/// the log, or drops a `.next` the log never used and starts over.
pub async fn rotate_audit_key(config: &BrokerConfig) -> Result<Rotation, KeyError> {
    if config.storage.postgres().is_some() {
        return Err(KeyError::Log(
            "rotating the audit key of the replicated log on PostgreSQL is not supported yet ([storage] backend = \"postgres\"); the embedded log's rotation does not apply to it".into(),
        ));
    }
    let next_path = suffixed(&config.audit_key, ".next");
    let old = load_audit_key(&config.audit_key)?;
    let old_public = hex::encode(old.public_key().as_ref());
    let db = crate::audit::open_storage_async(sled::Config::new().path(&config.data_dir))
        .await
        .map_err(|e| {
            KeyError::Log(format!(
                "{}: {e} (stop the broker before rotating its key)",
                config.data_dir.display()
            ))
        })?;

    if next_path.exists() {
        let next = load_audit_key_unchecked(&next_path)?;
        let next_public = hex::encode(next.public_key().as_ref());
        if let Ok((log, writer)) = AuditLog::open(&config.data_dir, &db, true, next) {
            // The log ends with a hand-over to this very key: an earlier run
            // handed over and stopped before the swap.
            let log_index = log.len().checked_sub(1);
            let handed_over = log_index
                .and_then(|index| log.get(index).ok().flatten())
                .and_then(|record| record.key_handover)
                .is_some_and(|h| hex::encode(&h.new_public_key) == next_public);
            drop(log);
            let _ = writer.await;
            if handed_over {
                drop(db);
                swap_in(config, &next_path)?;
                return Ok(Rotation {
                    log_index: log_index.unwrap_or(0),
                    old_public_key: old_public,
                    new_public_key: next_public,
                });
            }
        }
        // The log never saw this key: an earlier run stopped before the
        // hand-over.
        std::fs::remove_file(&next_path).map_err(io(&next_path))?;
    }

    let (log, writer) = AuditLog::open(&config.data_dir, &db, true, old)
        .map_err(|e| KeyError::Log(e.to_string()))?;
    let pkcs8 = new_audit_key()?;
    write_secret(&next_path, pkcs8.as_ref())?;
    sync_dir(&next_path)?;
    let new = parse_audit_key(&next_path, pkcs8.as_ref())?;
    let new_public = hex::encode(new.public_key().as_ref());
    let log_index = log
        .rotate_key(new)
        .await
        .map_err(|e| KeyError::Log(e.to_string()))?;
    drop(log);
    let _ = writer.await;
    drop(db);
    swap_in(config, &next_path)?;
    Ok(Rotation {
        log_index,
        old_public_key: old_public,
        new_public_key: new_public,
    })
}

/// Deletes the old audit key, moves the new one into its place, rewrites
/// `.pub`, and syncs the folder.
fn swap_in(config: &BrokerConfig, next_path: &Path) -> Result<(), KeyError> {
    std::fs::remove_file(&config.audit_key).map_err(io(&config.audit_key))?;
    std::fs::rename(next_path, &config.audit_key).map_err(io(&config.audit_key))?;
    let key = load_audit_key_unchecked(&config.audit_key)?;
    write_public(&public_key_path(&config.audit_key), &key)?;
    sync_dir(&config.audit_key)
}

/// Syncs the folder holding `path`, so renames and new files survive a crash.
fn sync_dir(path: &Path) -> Result<(), KeyError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn load_audit_key_unchecked(path: &Path) -> Result<Ed25519KeyPair, KeyError> {
    let pkcs8 = std::fs::read(path).map_err(io(path))?;
    parse_audit_key(path, &pkcs8)
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> BrokerConfig {
        let text = "data_dir = \"data\"\npolicy = \"p\"\nrouting = \"r\"\npseudonym_key = \"secrets/pseudonym.key\"\naudit_key = \"secrets/audit.key\"\n[tls]\nca = \"ca\"\ncert = \"c\"\nkey = \"k\"\n";
        let path = dir.join("broker.toml");
        std::fs::write(&path, text).expect("config");
        let mut config: BrokerConfig =
            onceonly_certs::config_file::load_toml(&path).expect("parses");
        config.audit_key = dir.join("secrets/audit.key");
        config.pseudonym_key = dir.join("secrets/pseudonym.key");
        config.data_dir = dir.join("data");
        config
    }

    #[test]
    fn keys_are_made_once_private_and_never_silently() {
        let dir = tempfile::tempdir().expect("dir");
        let config = config(dir.path());
        let missing = load_audit_key(&config.audit_key).expect_err("no key yet");
        assert!(
            missing.to_string().contains("onceonly-broker init"),
            "{missing}"
        );
        assert!(matches!(
            load_pseudonym_key(&config.pseudonym_key),
            Err(KeyError::Missing { .. })
        ));
        assert!(
            !config.audit_key.exists(),
            "loading must not create the key"
        );

        let written = init(&config).expect("init");
        assert_eq!(written.len(), 3);
        #[cfg(unix)]
        for secret in [&config.audit_key, &config.pseudonym_key] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(secret)
                .expect("meta")
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{}", secret.display());
        }
        let key = load_audit_key(&config.audit_key).expect("loads");
        assert_eq!(
            std::fs::read_to_string(public_key_path(&config.audit_key))
                .expect("pub")
                .trim(),
            hex::encode(key.public_key().as_ref())
        );
        let pseudonyms = load_pseudonym_key(&config.pseudonym_key).expect("loads");
        assert_eq!(
            pseudonyms.pseudonym(1, "82281866209"),
            load_pseudonym_key(&config.pseudonym_key)
                .expect("again")
                .pseudonym(1, "82281866209")
        );
        assert!(matches!(init(&config), Err(KeyError::Exists { .. })));

        // A .pub that names another key is refused, not rewritten.
        std::fs::write(public_key_path(&config.audit_key), "00\n").expect("write");
        assert!(matches!(
            load_audit_key(&config.audit_key),
            Err(KeyError::PublicMismatch { .. })
        ));
    }

    #[test]
    fn a_replaced_pseudonym_key_is_refused_naming_the_key_the_data_directory_and_the_fix() {
        let dir = tempfile::tempdir().expect("dir");
        let config = config(dir.path());
        init(&config).expect("init");
        let key_text = std::fs::read_to_string(&config.pseudonym_key).expect("key");
        let check = config.data_dir.join(PSEUDONYM_CHECK_FILE);

        // The first start writes the check value (the data directory need
        // not exist yet); it is not the key.
        load_checked_pseudonym_key(&config).expect("first start");
        let value = std::fs::read_to_string(&check).expect("check value written");
        assert_eq!(value.trim().len(), 64);
        assert!(
            !value.contains(key_text.trim()),
            "the check value is the key"
        );
        load_checked_pseudonym_key(&config).expect("same key");

        // Another key, however well-formed, is refused, and nothing changes.
        std::fs::remove_file(&config.pseudonym_key).expect("remove");
        write_secret(&config.pseudonym_key, hex::encode([9u8; 32]).as_bytes()).expect("replace");
        let refused = load_checked_pseudonym_key(&config).expect_err("a replaced key");
        assert!(
            matches!(refused, KeyError::PseudonymKeyReplaced { .. }),
            "{refused}"
        );
        let message = refused.to_string();
        for named in [&config.pseudonym_key, &config.data_dir] {
            assert!(message.contains(&named.display().to_string()), "{message}");
        }
        assert!(message.contains("Restore the original"), "{message}");
        assert_eq!(std::fs::read_to_string(&check).expect("kept"), value);

        // With the right key back, it starts.
        std::fs::remove_file(&config.pseudonym_key).expect("remove");
        write_secret(&config.pseudonym_key, key_text.as_bytes()).expect("restore");
        load_checked_pseudonym_key(&config).expect("restored");

        // A check file that is no check value is refused, naming it.
        std::fs::write(&check, "garbage\n").expect("write");
        let refused = load_checked_pseudonym_key(&config).expect_err("a broken check value");
        assert!(
            refused.to_string().contains(&check.display().to_string()),
            "{refused}"
        );
    }

    #[test]
    fn a_data_directory_from_before_key_checks_gets_its_check_value_at_start() {
        let dir = tempfile::tempdir().expect("dir");
        let config = config(dir.path());
        init(&config).expect("init");
        load_checked_pseudonym_key(&config).expect("first start");
        let check = config.data_dir.join(PSEUDONYM_CHECK_FILE);
        let value = std::fs::read_to_string(&check).expect("check value");

        // A data directory with data but no check value, as one created
        // before this check: the start writes the same value, and from then
        // on another key is refused.
        std::fs::remove_file(&check).expect("remove");
        std::fs::write(config.data_dir.join("audit.log"), b"").expect("data");
        load_checked_pseudonym_key(&config).expect("starts");
        assert_eq!(std::fs::read_to_string(&check).expect("written"), value);
        assert!(
            !suffixed(&check, ".new").exists(),
            "the draft was left behind"
        );
        std::fs::remove_file(&config.pseudonym_key).expect("remove");
        write_secret(&config.pseudonym_key, hex::encode([7u8; 32]).as_bytes()).expect("replace");
        assert!(matches!(
            load_checked_pseudonym_key(&config),
            Err(KeyError::PseudonymKeyReplaced { .. })
        ));
    }
}
