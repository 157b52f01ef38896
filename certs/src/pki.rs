//! The participant PKI on disk: one root CA per trust domain, one
//! certificate per participant, and a revocation list.
//!
//! A PKI directory looks like this (everything the `onceonly-certs` CLI and
//! the demo touch):
//!
//! ```text
//! pki/
//!   pki.toml                 trust domain, key algorithm, organisation
//!   ca.pem     ca.key        the root CA (the key is mode 0600)
//!   crl.pem                  the revocation list, signed by the CA
//!   <role>/<id>.pem          a participant's certificate
//!   <role>/<id>.key          its private key (mode 0600)
//! ```
//!
//! [`Pki::throwaway`] creates a complete PKI in a temporary directory in one
//! call, for tests and the demo.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::identity::{IdentityError, Participant, Role, validate_trust_domain};

/// The signature algorithm of generated keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256: the most widely supported choice.
    #[default]
    EcdsaP256,
    /// Ed25519: smaller and faster, supported by rustls and most modern stacks.
    Ed25519,
}

impl KeyAlgorithm {
    fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    /// Generates a fresh key pair.
    pub fn generate(self) -> Result<KeyPair, PkiError> {
        KeyPair::generate_for(self.rcgen()).map_err(PkiError::Rcgen)
    }
}

/// What went wrong in a PKI operation.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file exists where we would write; nothing was overwritten.
    #[error("{0} already exists; pass --force to overwrite it")]
    Exists(PathBuf),
    /// No PKI at this directory.
    #[error("{0} holds no PKI (no pki.toml); create one with `onceonly-certs init`")]
    NotInitialised(PathBuf),
    /// A file's content is not what it should be.
    #[error("{path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A revocation list not issued and signed by the trust domain's CA.
    #[error(
        "{path}: {reason}; use the CRL `onceonly-certs refresh-crl` writes for this trust domain's CA"
    )]
    ForeignCrl {
        /// The CRL file.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// A revocation list older (by its CRL number) than one this
    /// participant accepted before: a list from before a revocation would
    /// admit the revoked again.
    #[error(
        "{path}: revocation list number {number} is older than number {highest}, accepted before{recorded}; an older list would admit certificates revoked since. Distribute the newest crl.pem (`onceonly-certs refresh-crl` signs a newer one)"
    )]
    CrlRolledBack {
        /// The CRL file.
        path: PathBuf,
        /// Its number.
        number: u64,
        /// The highest number accepted before.
        highest: u64,
        /// Where that number is recorded (", as recorded in ..."), or "".
        recorded: String,
    },
    /// An identity part was invalid.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A DNS name or IP address for the certificate was invalid.
    #[error("invalid server name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The serial is not a certificate of this CA.
    #[error("no certificate with serial {0} was found in this PKI")]
    UnknownSerial(String),
    /// The organisation for certificate subjects is unusable.
    #[error(
        "invalid organisation {0:?}: give 1 to 64 characters, without control characters or spaces at either end (e.g. \"Land Berlin\")"
    )]
    InvalidOrganisation(String),
    /// An encryption certificate was asked for a role that does not
    /// receive encrypted evidence.
    #[error(
        "only authorities receive encrypted evidence: issue --encryption with --role authority, not {0}"
    )]
    EncryptionForRole(Role),
}

/// The PKI's metadata file, `pki.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PkiMeta {
    /// The SPIFFE trust domain, e.g. `onceonly.test`.
    pub trust_domain: String,
    /// The algorithm participant keys get by default.
    pub key_algorithm: KeyAlgorithm,
    /// The organisation (O) in the subject of every certificate issued.
    /// PKIs made before it was configurable have none in `pki.toml`: they
    /// keep [`DEFAULT_ORGANISATION`]. Written only when it differs, so
    /// such a `pki.toml` stays readable by older `onceonly-certs`.
    #[serde(
        default = "default_organisation",
        skip_serializing_if = "is_default_organisation"
    )]
    pub organisation: String,
}

/// The subject organisation of a PKI made without `--organisation`.
pub const DEFAULT_ORGANISATION: &str = "onceonly";

fn default_organisation() -> String {
    DEFAULT_ORGANISATION.to_owned()
}

fn is_default_organisation(organisation: &str) -> bool {
    organisation == DEFAULT_ORGANISATION
}

/// Bidirectional overrides and isolates, marks and zero-width characters:
/// invisible in a subject line, they could make one organisation read as
/// another.
fn is_invisible_formatting(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// Checks an organisation name for certificate subjects: 1 to 64
/// characters (X.520's upper bound), no control or invisible formatting
/// characters, no spaces at either end.
pub fn validate_organisation(organisation: &str) -> Result<(), PkiError> {
    let length = organisation.chars().count();
    let valid = (1..=64).contains(&length)
        && organisation.trim() == organisation
        && !organisation
            .chars()
            .any(|c| c.is_control() || is_invisible_formatting(c));
    if valid {
        Ok(())
    } else {
        Err(PkiError::InvalidOrganisation(organisation.to_owned()))
    }
}

/// How `init` creates a PKI.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// Key algorithm for the CA and, by default, every participant.
    pub key_algorithm: KeyAlgorithm,
    /// The organisation (O) in the subject of the CA's and every
    /// participant's certificate, e.g. `Land Berlin`.
    pub organisation: String,
    /// How long the root CA is valid.
    pub ca_validity: Duration,
    /// The broker's id (its certificate is issued at init).
    pub broker_id: String,
    /// DNS names and IP addresses the broker's server certificate covers.
    pub broker_names: Vec<String>,
    /// How long the broker's certificate is valid.
    pub broker_validity: Duration,
    /// Overwrite existing material.
    pub force: bool,
}

impl InitOptions {
    /// Defaults for a trust domain: ECDSA P-256, organisation
    /// [`DEFAULT_ORGANISATION`], a 10-year CA, a broker `broker` valid 90
    /// days for `localhost`, `127.0.0.1` and `::1`.
    pub fn new(trust_domain: &str) -> Self {
        InitOptions {
            trust_domain: trust_domain.to_owned(),
            key_algorithm: KeyAlgorithm::default(),
            organisation: default_organisation(),
            ca_validity: Duration::from_secs(10 * 365 * 86_400),
            broker_id: "broker".to_owned(),
            broker_names: default_server_names(),
            broker_validity: DEFAULT_VALIDITY,
            force: false,
        }
    }
}

/// Participant certificates are valid 90 days unless told otherwise.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(90 * 86_400);

/// The names a server certificate covers by default: loopback only.
pub fn default_server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

/// How `issue` creates a participant certificate.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// The role.
    pub role: Role,
    /// The id within the role.
    pub id: String,
    /// DNS names and IP addresses, for participants that serve (broker,
    /// connector); empty gives [`default_server_names`] for those roles.
    pub server_names: Vec<String>,
    /// Start of validity; `None` is one minute ago (tolerates small clock skew).
    pub not_before: Option<OffsetDateTime>,
    /// How long the certificate is valid from `not_before`.
    pub validity: Duration,
    /// Key algorithm; `None` takes the PKI's.
    pub key_algorithm: Option<KeyAlgorithm>,
    /// Overwrite an existing certificate and key of this participant.
    pub force: bool,
    /// Issue the authority's encryption certificate instead of its TLS
    /// certificate: key usage keyAgreement only, no extended key usage, a
    /// P-256 key (HPKE's DHKEM(P-256)), written to
    /// [`Pki::encryption_paths`]. Connectors encrypt evidence to it.
    pub encryption: bool,
}

impl IssueOptions {
    /// Defaults for a participant.
    pub fn new(role: Role, id: &str) -> Self {
        IssueOptions {
            role,
            id: id.to_owned(),
            server_names: Vec::new(),
            not_before: None,
            validity: DEFAULT_VALIDITY,
            key_algorithm: None,
            force: false,
            encryption: false,
        }
    }
}

/// A certificate just issued, with where it was written.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// Whose it is.
    pub participant: Participant,
    /// The certificate (PEM).
    pub cert_path: PathBuf,
    /// The private key (PEM, PKCS#8, mode 0600).
    pub key_path: PathBuf,
    /// The serial number, lower-case hex.
    pub serial_hex: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// The serial of the certificate this one replaced (`--force`), now on
    /// the revocation list: two valid certificates for one participant
    /// would leave the old key usable.
    pub revoked_serial: Option<String>,
}

/// The file paths a participant's TLS configuration needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The trust bundle: the CA certificate(s), PEM.
    pub ca: PathBuf,
    /// This participant's certificate (chain), PEM.
    pub cert: PathBuf,
    /// This participant's private key, PEM.
    pub key: PathBuf,
    /// The revocation list, PEM or DER. Required unless `allow_no_crl`.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// What to do while the revocation list is past its `nextUpdate`:
    /// `refuse` every peer (default: nobody can tell who was revoked since)
    /// or `warn` and go on.
    #[serde(default)]
    pub crl_stale: CrlStalePolicy,
    /// Run without a revocation list: an explicit opt-out, logged at start.
    #[serde(default)]
    pub allow_no_crl: bool,
    /// A file that keeps the highest CRL number accepted, so that a list
    /// older than it is refused after a restart too (within one process
    /// it always is). The broker keeps it in its data directory unless
    /// set; a connector where set.
    #[serde(default)]
    pub crl_number_file: Option<PathBuf>,
}

/// What a verifier does while its revocation list is stale.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CrlStalePolicy {
    /// Refuse every certificate until a fresh list is loaded.
    #[default]
    Refuse,
    /// Log a warning and go on checking against the stale list.
    Warn,
}

impl TlsFiles {
    /// What is wrong with the revocation settings, as (key, problem, fix):
    /// a CRL is required unless running without one was chosen.
    pub fn crl_problem(&self) -> Option<(&'static str, &'static str, &'static str)> {
        (self.crl.is_none() && !self.allow_no_crl).then_some((
            "tls.crl",
            "is missing",
            "point it at the CA's crl.pem (onceonly-certs keeps it current), or set tls.allow_no_crl = true to run without revocation checks",
        ))
    }

    /// Files with the given paths, a required CRL refused when stale.
    pub fn new(ca: PathBuf, cert: PathBuf, key: PathBuf, crl: Option<PathBuf>) -> Self {
        TlsFiles {
            ca,
            cert,
            key,
            crl,
            crl_stale: CrlStalePolicy::Refuse,
            allow_no_crl: false,
            crl_number_file: None,
        }
    }
}

/// A PKI directory.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
    meta: PkiMeta,
}

impl Pki {
    /// Creates a new PKI in `dir`: root CA, empty revocation list and the
    /// broker's certificate. Refuses to overwrite unless `options.force`.
    pub fn init(dir: &Path, options: &InitOptions) -> Result<(Pki, IssuedCertificate), PkiError> {
        validate_trust_domain(&options.trust_domain)?;
        validate_organisation(&options.organisation)?;
        let meta = PkiMeta {
            trust_domain: options.trust_domain.clone(),
            key_algorithm: options.key_algorithm,
            organisation: options.organisation.clone(),
        };
        let pki = Pki {
            dir: dir.to_owned(),
            meta,
        };
        for path in [pki.meta_path(), pki.ca_cert_path(), pki.ca_key_path()] {
            if path.exists() && !options.force {
                return Err(PkiError::Exists(path));
            }
        }
        create_dir(dir)?;

        let ca_key = options.key_algorithm.generate()?;
        let ca_params = ca_params(
            &options.trust_domain,
            &options.organisation,
            options.ca_validity,
        );
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let meta_text = toml::to_string(&pki.meta).map_err(|e| PkiError::Malformed {
            path: pki.meta_path(),
            reason: e.to_string(),
        })?;
        write_file(&pki.meta_path(), meta_text.as_bytes(), false, true)?;
        write_file(
            &pki.ca_key_path(),
            ca_key.serialize_pem().as_bytes(),
            true,
            true,
        )?;
        write_file(&pki.ca_cert_path(), ca_cert.pem().as_bytes(), false, true)?;
        pki.write_crl(Vec::new(), 1)?;

        let mut broker = IssueOptions::new(Role::Broker, &options.broker_id);
        broker.server_names = options.broker_names.clone();
        broker.validity = options.broker_validity;
        broker.force = options.force;
        let issued = pki.issue(&broker)?;
        Ok((pki, issued))
    }

    /// Opens an existing PKI directory.
    pub fn open(dir: &Path) -> Result<Pki, PkiError> {
        let meta_path = dir.join("pki.toml");
        let text = match fs::read_to_string(&meta_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PkiError::NotInitialised(dir.to_owned()));
            }
            Err(source) => {
                return Err(PkiError::Io {
                    path: meta_path,
                    source,
                });
            }
        };
        let meta: PkiMeta = toml::from_str(&text).map_err(|e| PkiError::Malformed {
            path: meta_path.clone(),
            reason: e.to_string(),
        })?;
        validate_trust_domain(&meta.trust_domain)?;
        validate_organisation(&meta.organisation).map_err(|e| PkiError::Malformed {
            path: meta_path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Pki {
            dir: dir.to_owned(),
            meta,
        })
    }

    /// Creates a whole throw-away PKI in a new temporary directory: the CA,
    /// the broker (id `broker`) and one certificate per `(role, id)`. The
    /// directory is removed when the returned [`ThrowawayPki`] is dropped.
    pub fn throwaway(
        trust_domain: &str,
        participants: &[(Role, &str)],
    ) -> Result<ThrowawayPki, PkiError> {
        let temp = tempfile::Builder::new()
            .prefix("onceonly-pki-")
            .tempdir()
            .map_err(|source| PkiError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let (pki, _broker) = Pki::init(temp.path(), &InitOptions::new(trust_domain))?;
        for (role, id) in participants {
            pki.issue(&IssueOptions::new(*role, id))?;
        }
        Ok(ThrowawayPki { pki, _temp: temp })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.meta.trust_domain
    }

    /// The organisation (O) in the subject of every certificate issued.
    pub fn organisation(&self) -> &str {
        &self.meta.organisation
    }

    fn meta_path(&self) -> PathBuf {
        self.dir.join("pki.toml")
    }

    /// The CA certificate (the trust bundle every participant needs).
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn ca_key_path(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// The revocation list.
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    /// Where a participant's certificate and key live.
    pub fn participant_paths(&self, role: Role, id: &str) -> (PathBuf, PathBuf) {
        let folder = self.dir.join(role.as_str());
        (
            folder.join(format!("{id}.pem")),
            folder.join(format!("{id}.key")),
        )
    }

    /// Where an authority's encryption certificate and key live.
    pub fn encryption_paths(&self, id: &str) -> (PathBuf, PathBuf) {
        let folder = self.dir.join(Role::Authority.as_str());
        (
            folder.join(format!("{id}.enc.pem")),
            folder.join(format!("{id}.enc.key")),
        )
    }

    /// The TLS files of a participant, with the CA and the revocation list.
    pub fn tls_files(&self, role: Role, id: &str) -> TlsFiles {
        let (cert, key) = self.participant_paths(role, id);
        TlsFiles::new(self.ca_cert_path(), cert, key, Some(self.crl_path()))
    }

    /// The participant a role and id give in this trust domain.
    pub fn participant(&self, role: Role, id: &str) -> Result<Participant, PkiError> {
        Ok(Participant::new(&self.meta.trust_domain, role, id)?)
    }

    /// The certificates in the directory now: every `<role>/<id>.pem` and
    /// `authority/<id>.enc.pem`, sorted by role and id. A replaced
    /// (`--force`) certificate is gone from the directory, so a revoked
    /// serial may have no holder here. Files that hold no certificate of a
    /// valid participant are skipped.
    pub fn stored_certificates(&self) -> Result<Vec<StoredCertificate>, PkiError> {
        let mut found = Vec::new();
        for role in Role::ALL {
            let folder = self.dir.join(role.as_str());
            let entries = match fs::read_dir(&folder) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(PkiError::Io {
                        path: folder,
                        source,
                    });
                }
            };
            for entry in entries {
                let path = entry
                    .map_err(|source| PkiError::Io {
                        path: folder.clone(),
                        source,
                    })?
                    .path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let Some(stem) = name.strip_suffix(".pem") else {
                    continue;
                };
                let (id, encryption) = match stem.strip_suffix(".enc") {
                    Some(id) => (id, true),
                    None => (stem, false),
                };
                let Ok(participant) = self.participant(role, id) else {
                    continue;
                };
                let Some(serial_hex) = load_certs(&path).ok().and_then(|certs| {
                    let (_, cert) = x509_parser::parse_x509_certificate(certs[0].as_ref()).ok()?;
                    Some(hex::encode(strip_sign_byte(cert.raw_serial())))
                }) else {
                    continue;
                };
                found.push(StoredCertificate {
                    participant,
                    encryption,
                    path,
                    serial_hex,
                });
            }
        }
        found.sort_by(|a, b| (&a.participant, a.encryption).cmp(&(&b.participant, b.encryption)));
        Ok(found)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key_pem = read_string(&self.ca_key_path())?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Malformed {
            path: self.ca_key_path(),
            reason: format!("not a usable private key: {e}"),
        })?;
        let cert_pem = read_string(&self.ca_cert_path())?;
        Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| PkiError::Malformed {
            path: self.ca_cert_path(),
            reason: format!("not a usable CA certificate: {e}"),
        })
    }

    /// Issues a participant certificate and writes it with its key.
    pub fn issue(&self, options: &IssueOptions) -> Result<IssuedCertificate, PkiError> {
        let participant = self.participant(options.role, &options.id)?;
        if options.encryption && options.role != Role::Authority {
            return Err(PkiError::EncryptionForRole(options.role));
        }
        let (cert_path, key_path) = if options.encryption {
            self.encryption_paths(&options.id)
        } else {
            self.participant_paths(options.role, &options.id)
        };
        for path in [&cert_path, &key_path] {
            if path.exists() && !options.force {
                return Err(PkiError::Exists(path.clone()));
            }
        }
        // The certificate a forced reissue replaces: revoked below.
        let replaced = if options.force && cert_path.exists() {
            let old = load_certs(&cert_path)?;
            let first = old.first().ok_or_else(|| PkiError::Malformed {
                path: cert_path.clone(),
                reason: "holds no certificate".into(),
            })?;
            let (_, parsed) = x509_parser::parse_x509_certificate(first.as_ref()).map_err(|e| {
                PkiError::Malformed {
                    path: cert_path.clone(),
                    reason: format!("not a certificate: {e}"),
                }
            })?;
            Some(hex::encode(strip_sign_byte(parsed.raw_serial())))
        } else {
            None
        };
        let names = if options.server_names.is_empty() && options.role.serves() {
            default_server_names()
        } else {
            options.server_names.clone()
        };
        let not_before = options
            .not_before
            .unwrap_or_else(|| OffsetDateTime::now_utc() - time::Duration::minutes(1));
        let mut params = if options.encryption {
            encryption_params(
                &participant,
                &self.meta.organisation,
                not_before,
                options.validity,
            )?
        } else {
            participant_params(
                &participant,
                &self.meta.organisation,
                &names,
                not_before,
                options.validity,
            )?
        };
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));

        let key = if options.encryption {
            KeyAlgorithm::EcdsaP256.generate()?
        } else {
            options
                .key_algorithm
                .unwrap_or(self.meta.key_algorithm)
                .generate()?
        };
        let cert = params.signed_by(&key, &self.issuer()?)?;

        // The replaced certificate is revoked before its files are: a crash
        // in between leaves none valid, never two.
        if let Some(old) = &replaced {
            self.revoke(old)?;
        }
        create_dir(cert_path.parent().unwrap_or(&self.dir))?;
        write_file(
            &key_path,
            key.serialize_pem().as_bytes(),
            true,
            options.force,
        )?;
        write_file(&cert_path, cert.pem().as_bytes(), false, options.force)?;
        Ok(IssuedCertificate {
            participant,
            cert_path,
            key_path,
            serial_hex: hex::encode(serial),
            not_after: params.not_after,
            revoked_serial: replaced,
        })
    }

    /// Signs certificate parameters of the caller's own making with the CA.
    /// For special cases and tests (e.g. a certificate with no SPIFFE id);
    /// participants get theirs from [`Pki::issue`].
    pub fn sign_custom(
        &self,
        params: &CertificateParams,
        public_key: &KeyPair,
    ) -> Result<rcgen::Certificate, PkiError> {
        Ok(params.signed_by(public_key, &self.issuer()?)?)
    }

    /// The serials on the current revocation list (lower-case hex) and the
    /// list's number.
    pub fn revoked_serials(&self) -> Result<(Vec<(String, i64)>, u64), PkiError> {
        let list = read_revocation_list(&self.crl_path())?;
        let serials = list
            .revoked
            .into_iter()
            .map(|(serial, when)| (serial, when.unix_timestamp()))
            .collect();
        Ok((serials, list.number))
    }

    /// Re-signs the revocation list unchanged but for its number and its
    /// `nextUpdate`, which becomes `next_update` (publish a fresh list
    /// before the old one goes stale).
    pub fn refresh_crl(&self, next_update: OffsetDateTime) -> Result<(), PkiError> {
        let _lock = self.lock_crl()?;
        let (revoked, number) = self.revoked_serials()?;
        self.write_crl_until(revoked, number + 1, next_update)
    }

    /// Holds the PKI's CRL lock: revocations from two processes at once
    /// must not lose one another's serial.
    fn lock_crl(&self) -> Result<fs::File, PkiError> {
        let path = self.dir.join("crl.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| PkiError::Io {
                path: path.clone(),
                source,
            })?;
        file.lock()
            .map_err(|source| PkiError::Io { path, source })?;
        Ok(file)
    }

    /// Puts `serial_hex` on the revocation list and re-signs it. Revoking a
    /// serial twice keeps the first revocation. Returns whether it was new.
    pub fn revoke(&self, serial_hex: &str) -> Result<bool, PkiError> {
        Ok(!self.revoke_all(&[serial_hex])?.is_empty())
    }

    /// Revokes every serial of `serials` (hex) in one new list; returns
    /// those that were not revoked before.
    pub fn revoke_all(&self, serials: &[&str]) -> Result<Vec<String>, PkiError> {
        let wanted = serials
            .iter()
            .map(|serial| normalized_serial(serial))
            .collect::<Result<Vec<_>, _>>()?;
        let _lock = self.lock_crl()?;
        let (mut revoked, number) = self.revoked_serials()?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut added = Vec::new();
        for serial_hex in wanted {
            if !revoked.iter().any(|(s, _)| *s == serial_hex) && !added.contains(&serial_hex) {
                added.push(serial_hex.clone());
                revoked.push((serial_hex, now));
            }
        }
        if !added.is_empty() {
            self.write_crl(revoked, number + 1)?;
        }
        Ok(added)
    }

    /// The serials to revoke when participant (`role`, `id`) is revoked:
    /// its certificate and, for an authority, its encryption certificate,
    /// which names the same identity and must not outlive it.
    pub fn serials_of_participant(&self, role: Role, id: &str) -> Result<Vec<String>, PkiError> {
        let mut paths = vec![self.participant_paths(role, id).0];
        if role == Role::Authority {
            let encryption = self.encryption_paths(id).0;
            if encryption.exists() {
                paths.push(encryption);
            }
        }
        paths
            .iter()
            .map(|path| {
                let der = load_certs(path)?.remove(0);
                let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| {
                    PkiError::Malformed {
                        path: path.clone(),
                        reason: format!("not a certificate: {e}"),
                    }
                })?;
                Ok(hex::encode(strip_sign_byte(cert.raw_serial())))
            })
            .collect()
    }

    fn write_crl(&self, revoked: Vec<(String, i64)>, number: u64) -> Result<(), PkiError> {
        let next_update = OffsetDateTime::now_utc() + time::Duration::days(30);
        self.write_crl_until(revoked, number, next_update)
    }

    /// Signs and writes the list atomically: a new file synced, then
    /// renamed over the old one, so a reader never sees half a list.
    fn write_crl_until(
        &self,
        revoked: Vec<(String, i64)>,
        number: u64,
        next_update: OffsetDateTime,
    ) -> Result<(), PkiError> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .into_iter()
            .map(|(serial_hex, when)| {
                let serial = hex::decode(&serial_hex).map_err(|_| PkiError::Malformed {
                    path: self.crl_path(),
                    reason: format!("serial {serial_hex} is not hex"),
                })?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: OffsetDateTime::from_unix_timestamp(when).unwrap_or(now),
                    reason_code: Some(RevocationReason::Unspecified),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update: (now - time::Duration::minutes(1))
                .min(next_update - time::Duration::seconds(1)),
            next_update,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer()?)?;
        replace_synced(&self.crl_path(), crl.pem()?.as_bytes()).map_err(|source| PkiError::Io {
            path: self.crl_path(),
            source,
        })
    }
}

/// A certificate found in a PKI directory ([`Pki::stored_certificates`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCertificate {
    /// Whose it is (from where it lies: `<role>/<id>.pem`).
    pub participant: Participant,
    /// An authority's encryption certificate (`<id>.enc.pem`).
    pub encryption: bool,
    /// The file.
    pub path: PathBuf,
    /// Its serial, lower-case hex, as the revocation list names it.
    pub serial_hex: String,
}

/// A revocation list as read from its file ([`read_revocation_list`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationList {
    /// The CRL number (counts re-signings).
    pub number: u64,
    /// When it was signed.
    pub this_update: OffsetDateTime,
    /// Until when it is current; verifiers refuse every peer after it
    /// (unless told to warn only).
    pub next_update: Option<OffsetDateTime>,
    /// The revoked serials (lower-case hex) and when each was revoked.
    pub revoked: Vec<(String, OffsetDateTime)>,
}

/// Reads and parses a revocation list (PEM or DER). Checks its form only,
/// not its signature: the TLS verifiers do that.
pub fn read_revocation_list(path: &Path) -> Result<RevocationList, PkiError> {
    parse_revocation_list(path, load_crl(path)?.as_ref())
}

/// Checks that the revocation list `der` (read from `path`) was issued and
/// The CRL number of a revocation list (0 where it carries none, or one
/// beyond 64 bits, which `onceonly-certs` never writes).
pub fn crl_number_of(der: &[u8]) -> u64 {
    x509_parser::parse_x509_crl(der)
        .ok()
        .and_then(|(_, crl)| crl.crl_number().and_then(|n| u64::try_from(n).ok()))
        .unwrap_or(0)
}

/// Refuses a revocation list whose number is below the highest accepted
/// before under the same CA: in this process, and where `record` names a
/// file, as recorded there (the file is raised to a higher number, written
/// atomically). Lists without a number count as 0.
pub fn check_crl_number(
    path: &Path,
    der: &[u8],
    cas: &[CertificateDer<'_>],
    record: Option<&Path>,
) -> Result<u64, PkiError> {
    use sha2::Digest;
    type Floors = std::sync::Mutex<std::collections::HashMap<[u8; 32], u64>>;
    static FLOORS: std::sync::OnceLock<Floors> = std::sync::OnceLock::new();
    let number = crl_number_of(der);
    let mut ca_id = sha2::Sha256::new();
    for ca in cas {
        ca_id.update(ca.as_ref());
    }
    let ca_id: [u8; 32] = ca_id.finalize().into();
    let recorded = match record {
        Some(file) => match std::fs::read_to_string(file) {
            Ok(text) => text.trim().parse::<u64>().map_err(|_| PkiError::Malformed {
                path: file.to_owned(),
                reason: format!(
                    "holds {:?}, not a CRL number; it records the highest accepted: restore it, or delete it to accept any list of the CA",
                    text.trim()
                ),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => {
                return Err(PkiError::Io {
                    path: file.to_owned(),
                    source,
                });
            }
        },
        None => 0,
    };
    let mut floors = FLOORS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let in_process = floors.get(&ca_id).copied().unwrap_or(0);
    let highest = in_process.max(recorded);
    if number < highest {
        return Err(PkiError::CrlRolledBack {
            path: path.to_owned(),
            number,
            highest,
            recorded: match record {
                Some(file) if recorded == highest => {
                    format!(", as recorded in {}", file.display())
                }
                _ => String::new(),
            },
        });
    }
    floors.insert(ca_id, number);
    if let Some(file) = record
        && number > recorded
    {
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|source| PkiError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        replace_synced(file, format!("{number}\n").as_bytes()).map_err(|source| PkiError::Io {
            path: file.to_owned(),
            source,
        })?;
    }
    Ok(number)
}

/// signed by one of `cas`, the trust domain's CA certificates. A list of
/// another issuer would match no certificate: with unknown revocation
/// status allowed, it would turn revocation off while looking current.
pub fn check_crl_issuer(
    path: &Path,
    der: &[u8],
    cas: &[CertificateDer<'_>],
) -> Result<(), PkiError> {
    let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| PkiError::Malformed {
        path: path.to_owned(),
        reason: format!("not a revocation list (X.509 CRL): {e}"),
    })?;
    let mut names = Vec::new();
    for ca in cas {
        let Ok((_, ca)) = x509_parser::parse_x509_certificate(ca.as_ref()) else {
            continue;
        };
        if ca.subject() != crl.issuer() {
            names.push(ca.subject().to_string());
            continue;
        }
        return crl
            .verify_signature(ca.public_key())
            .map_err(|e| PkiError::ForeignCrl {
                path: path.to_owned(),
                reason: format!(
                    "names the CA {} as its issuer, but its signature does not verify with that CA's key ({e})",
                    crl.issuer()
                ),
            });
    }
    Err(PkiError::ForeignCrl {
        path: path.to_owned(),
        reason: format!(
            "is issued by {}, not by this trust domain's CA ({})",
            crl.issuer(),
            names.join("; ")
        ),
    })
}

/// Parses a DER revocation list read from `path` (named in errors).
pub fn parse_revocation_list(path: &Path, der: &[u8]) -> Result<RevocationList, PkiError> {
    let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| PkiError::Malformed {
        path: path.to_owned(),
        reason: format!("not a revocation list (X.509 CRL): {e}"),
    })?;
    let when = |t: x509_parser::time::ASN1Time| {
        OffsetDateTime::from_unix_timestamp(t.timestamp()).map_err(|e| PkiError::Malformed {
            path: path.to_owned(),
            reason: format!("a time out of range: {e}"),
        })
    };
    let revoked = crl
        .iter_revoked_certificates()
        .map(|entry| {
            Ok((
                hex::encode(strip_sign_byte(entry.raw_serial())),
                when(entry.revocation_date)?,
            ))
        })
        .collect::<Result<Vec<_>, PkiError>>()?;
    Ok(RevocationList {
        number: crl
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0),
        this_update: when(crl.last_update())?,
        next_update: crl.next_update().map(when).transpose()?,
        revoked,
    })
}

/// A PKI in a temporary directory, removed on drop. Derefs to [`Pki`].
#[derive(Debug)]
pub struct ThrowawayPki {
    pki: Pki,
    _temp: tempfile::TempDir,
}

impl std::ops::Deref for ThrowawayPki {
    type Target = Pki;

    fn deref(&self) -> &Pki {
        &self.pki
    }
}

fn ca_params(trust_domain: &str, organisation: &str, validity: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, organisation);
    name.push(
        DnType::CommonName,
        format!("onceonly root CA {trust_domain}"),
    );
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + validity;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    // The trust domain is a URI SAN of the CA too: SPIFFE bundles do the same.
    if let Ok(uri) = format!("spiffe://{trust_domain}").try_into() {
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    params
}

fn participant_params(
    participant: &Participant,
    organisation: &str,
    server_names: &[String],
    not_before: OffsetDateTime,
    validity: Duration,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, organisation);
    name.push(DnType::OrganizationalUnitName, participant.role().as_str());
    name.push(DnType::CommonName, participant.id());
    params.distinguished_name = name;
    params.not_before = not_before;
    params.not_after = not_before + validity;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if participant.role().serves() {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    params.use_authority_key_identifier_extension = true;
    let uri = participant
        .spiffe_id()
        .try_into()
        .map_err(|e: rcgen::Error| PkiError::InvalidName {
            name: participant.spiffe_id(),
            reason: e.to_string(),
        })?;
    params.subject_alt_names.push(SanType::URI(uri));
    for name in server_names {
        params.subject_alt_names.push(server_name_san(name)?);
    }
    Ok(params)
}

/// An authority's encryption certificate: its SPIFFE id, key agreement
/// only and no extended key usage. No connector takes a TLS certificate for
/// it (they lack keyAgreement), and the trust domain's verifiers refuse it
/// for TLS and signatures (it lacks digitalSignature; webpki alone would
/// not, as it reads only extended key usage).
fn encryption_params(
    participant: &Participant,
    organisation: &str,
    not_before: OffsetDateTime,
    validity: Duration,
) -> Result<CertificateParams, PkiError> {
    let mut params = participant_params(participant, organisation, &[], not_before, validity)?;
    params.distinguished_name.push(
        DnType::OrganizationalUnitName,
        format!("{}-encryption", participant.role().as_str()),
    );
    params.key_usages = vec![KeyUsagePurpose::KeyAgreement];
    params.extended_key_usages = Vec::new();
    Ok(params)
}

fn server_name_san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        });
    if !valid {
        return Err(PkiError::InvalidName {
            name: name.to_owned(),
            reason: "not a DNS name or IP address".into(),
        });
    }
    let ia5 = name
        .try_into()
        .map_err(|e: rcgen::Error| PkiError::InvalidName {
            name: name.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(SanType::DnsName(ia5))
}

/// 16 random bytes, first bit clear so the DER INTEGER stays positive and
/// the serial stays within RFC 5280's 20 octets.
fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    rand::rng().fill_bytes(&mut serial);
    serial[0] &= 0x7f;
    if serial[0] == 0 {
        serial[0] = 0x01;
    }
    serial
}

/// DER integers carry a leading zero byte where the top bit is set; serials
/// are compared without it.
fn strip_sign_byte(serial: &[u8]) -> &[u8] {
    match serial {
        [0, rest @ ..] if !rest.is_empty() => rest,
        _ => serial,
    }
}

/// SHA-256 over a DER certificate, colon-free lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })
}

fn read_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Creates a new secret file (mode 0600) with `contents`, and its parent
/// folders (those it creates mode 0700: a folder of keys is nobody else's
/// to list); refuses to replace an existing file. Synced before returning.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    if let Some(parent) = path.parent() {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(parent).map_err(|source| PkiError::Io {
            path: parent.to_owned(),
            source,
        })?;
    }
    write_file(path, contents, true, false)
}

/// Writes a file, creating it with mode 0600 when `secret`; refuses to
/// replace an existing file unless `overwrite`. Syncs before returning so a
/// crash never leaves a half-written key.
fn write_file(path: &Path, contents: &[u8], secret: bool, overwrite: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists(path.to_owned())
        } else {
            io(e)
        }
    })?;
    #[cfg(unix)]
    if secret {
        // An overwritten file keeps its old mode; make sure a key is 0600.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

/// A serial as the revocation list writes it: lower-case hex without
/// colons, `0x` or sign byte; Err where `serial` is not hexadecimal.
pub fn normalized_serial(serial: &str) -> Result<String, PkiError> {
    let serial_hex = serial.trim().trim_start_matches("0x").to_ascii_lowercase();
    let serial = hex::decode(serial_hex.replace(':', ""))
        .map_err(|_| PkiError::UnknownSerial(format!("{serial_hex} (not hexadecimal)")))?;
    Ok(hex::encode(strip_sign_byte(&serial)))
}

/// Replaces `path` with `bytes` so that a crash leaves the old file or the
/// new one, never half of either, and the new one survives once this
/// returns: a draft beside it under a name of its own (created new, mode
/// 0644, never through a link), synced, renamed over, the folder synced.
pub fn replace_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut draft_name = path.as_os_str().to_owned();
    draft_name.push(format!(".new-{}", rand::random::<u64>()));
    let draft = PathBuf::from(draft_name);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o644).custom_flags(O_NOFOLLOW);
    }
    let written = options.open(&draft).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(error) = written.and_then(|()| fs::rename(&draft, path)) {
        let _ = fs::remove_file(&draft);
        return Err(error);
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::File::open(dir)?.sync_all()
}

/// `O_NOFOLLOW` (Linux): a link in the path's last component is refused.
#[cfg(unix)]
const O_NOFOLLOW: i32 = 0o400000;

pub use crate::identity::crl_next_update;

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = fs::read(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Malformed {
            path: path.to_owned(),
            reason: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Malformed {
            path: path.to_owned(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Reads a revocation list, PEM or DER.
pub fn load_crl(path: &Path) -> Result<CertificateRevocationListDer<'static>, PkiError> {
    let bytes = fs::read(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    if bytes.starts_with(b"-----") {
        CertificateRevocationListDer::from_pem_slice(&bytes).map_err(|e| PkiError::Malformed {
            path: path.to_owned(),
            reason: format!("not a PEM X509 CRL: {e}"),
        })
    } else {
        Ok(CertificateRevocationListDer::from(bytes))
    }
}
