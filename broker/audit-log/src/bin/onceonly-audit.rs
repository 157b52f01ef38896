//! `onceonly-audit`: query the exchange log, and verify it offline.
//!
//! An auditor reaches the broker with the files the CA operator hands over:
//! the CA certificate, the revocation list, and the auditor's own
//! certificate and key (`--ca`, `--crl`, `--cert`, `--key`, or the same
//! names in an `--config` file). The trust domain is read from the
//! auditor's certificate, and the broker must present the SPIFFE id of the
//! trust domain's `broker` (or of `--broker-id`). `--pki DIR --id ID` reads
//! the same files from a PKI directory laid out as `onceonly-certs` makes
//! it (the CA's own, or the demo's).
//!
//! Errors are written for the auditor: what to pass, or what to ask the CA
//! operator for; never advice only the CA can follow.
//!
//! Exit codes: 0 success (and, for the verify commands, the log verified),
//! 1 the log did not verify or the operation failed (the message says
//! where), 2 usage error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use onceonly_audit_log::auditor::{
    ReceiptStatus, SavedHead, check_receipt, load_public_key, verify_remote,
};
use onceonly_audit_log::verify_dir_against;
use onceonly_certs::pki::read_revocation_list;
use onceonly_certs::report::error_chain;
use onceonly_certs::tls::{ConnectError, TlsError, find_connect_error};
use onceonly_certs::{MtlsConnector, Participant, PkiError, Role, TlsFiles};
use onceonly_proto::v1::audit_service_client::AuditServiceClient;
use onceonly_proto::v1::{
    AuditRecord, ErrorReason, ExchangeOutcome, QueryRecordsRequest, RecordKind, SubjectId,
    SubjectIdScheme,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tonic::transport::Channel;

/// Query the onceonly exchange log and prove it was not altered.
#[derive(Debug, Parser)]
#[command(name = "onceonly-audit", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Query exchange records (as the auditor, every record; as a portal,
    /// one subject's; as an authority, its own).
    Query {
        #[command(flatten)]
        connection: Connection,
        #[command(flatten)]
        filters: Filters,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// At most this many records (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// Fetch the signed tree head, check it with the broker's public key,
    /// download every entry and recompute the tree; with --saved-head,
    /// prove the log extends the head saved at the last audit.
    Verify {
        #[command(flatten)]
        connection: Connection,
        /// The broker's audit public key (the broker's audit.key.pub).
        #[arg(long)]
        public_key: PathBuf,
        /// A head saved by an earlier `verify --save-head`.
        #[arg(long)]
        saved_head: Option<PathBuf>,
        /// Save the verified head here, for the next audit.
        #[arg(long)]
        save_head: Option<PathBuf>,
        /// Only check the head and consistency; do not download entries.
        #[arg(long)]
        no_recompute: bool,
    },
    /// Check a data directory (or a copy) end to end and name the first
    /// record that was altered, removed or reordered. Reads only the log
    /// file, so it may run beside a live broker; with --saved-head, also
    /// prove the log still holds the head saved at the last audit.
    VerifyDir {
        /// The broker's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The broker's audit public key (audit.key.pub).
        #[arg(long)]
        public_key: PathBuf,
        /// A head saved by an earlier `verify --save-head` or `verify-dir --save-head`.
        #[arg(long)]
        saved_head: Option<PathBuf>,
        /// Save the verified head here, for the next audit.
        #[arg(long)]
        save_head: Option<PathBuf>,
    },
    /// Show the policy text that decided the exchange logged at INDEX (or
    /// that a policy entry at INDEX applied), from a data directory (or a
    /// copy): the log is verified end to end with the public key first,
    /// then the text the broker kept under the record's digest is checked
    /// against it, and printed.
    PolicyAt {
        /// The log index of the record.
        index: u64,
        /// The broker's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The broker's audit public key (audit.key.pub).
        #[arg(long)]
        public_key: PathBuf,
    },
    /// Check an audit receipt (a replica's signed promise to include an
    /// exchange's record, from RequestEvidenceResponse.audit_receipt):
    /// offline against the public key, then, unless --offline, prove the
    /// record is in the broker's latest signed head (exit 0), or find it
    /// not yet due (exit 0, says so) or overdue (exit 1: a broken promise).
    CheckReceipt {
        /// The receipt: its protobuf encoding, as a binary file or as hex.
        #[arg(long)]
        receipt: PathBuf,
        /// The broker's audit public key (audit.key.pub).
        #[arg(long)]
        public_key: PathBuf,
        /// Only check the signature and the batch path.
        #[arg(long)]
        offline: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

/// How to reach the broker: its address and identity, and your
/// certificate. Give the files your CA operator handed over (--ca, --crl,
/// --cert, --key) or name them in --config; --pki with --id reads them from
/// a PKI directory as onceonly-certs lays it out.
#[derive(Debug, Args)]
struct Connection {
    /// The broker, host:port [default: 127.0.0.1:7443]. The host must be a
    /// name the broker's certificate covers.
    #[arg(long, value_name = "HOST:PORT")]
    broker: Option<String>,
    /// The broker's participant id in your trust domain, or its whole
    /// SPIFFE id [default: broker].
    #[arg(long, value_name = "ID")]
    broker_id: Option<String>,
    /// The trust domain's CA certificate (ca.pem), from your CA operator.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The CA's revocation list (crl.pem), from your CA operator; get the
    /// current one before it goes stale.
    #[arg(long, value_name = "FILE")]
    crl: Option<PathBuf>,
    /// Your certificate (e.g. datenschutz.pem), from your CA operator.
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Your private key (e.g. datenschutz.key), from your CA operator.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// An auditor configuration file (TOML) with `broker`, `broker_id`,
    /// `ca`, `crl`, `cert` and `key` (paths relative to the file); flags
    /// override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A PKI directory as onceonly-certs makes it (the CA's, or the demo's):
    /// with --id, reads ca.pem, crl.pem and <role>/<id>.pem and .key in it
    /// [default: pki].
    #[arg(long, value_name = "DIR", conflicts_with_all = ["ca", "crl", "cert", "key", "config"])]
    pki: Option<PathBuf>,
    /// Your participant id in the --pki directory.
    #[arg(long, conflicts_with_all = ["ca", "crl", "cert", "key", "config"])]
    id: Option<String>,
    /// Your role in the --pki directory.
    #[arg(long, default_value = "auditor")]
    role: Role,
}

/// An auditor's configuration file (`--config`): where the broker is and
/// the files the CA operator handed over.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditorConfig {
    /// host:port.
    broker: Option<String>,
    /// The broker's id in the trust domain, or its SPIFFE id.
    broker_id: Option<String>,
    /// ca.pem.
    ca: Option<PathBuf>,
    /// crl.pem.
    crl: Option<PathBuf>,
    /// The auditor's certificate.
    cert: Option<PathBuf>,
    /// The auditor's private key.
    key: Option<PathBuf>,
}

/// Where an auditor's files come from.
const ISSUED: &str = "your auditor certificate is issued with `onceonly-certs issue --role auditor --id YOU` on the CA's machine; ca.pem and crl.pem come from the same directory";

/// What an auditor who has no files yet is told.
const ASK_THE_CA: &str =
    "As an auditor, pass --ca, --crl, --cert and --key with the files your CA operator gave you";

/// Where the TLS files came from, to say which flag a bad one was.
#[derive(Debug)]
enum FilesFrom {
    /// --ca, --crl, --cert, --key, or the --config file: the flags of
    /// the files named only there.
    Given {
        config: Option<PathBuf>,
        from_config: Vec<&'static str>,
    },
    /// A PKI directory (--pki/--id).
    PkiDir(PathBuf),
}

/// The broker to reach, and the files to reach it with.
#[derive(Debug)]
struct Reach {
    broker: String,
    broker_id: Option<String>,
    files: TlsFiles,
    from: FilesFrom,
}

impl Connection {
    /// Works out which files to use: flags over the config file; or the
    /// PKI directory's. Says what is missing in the auditor's terms.
    fn reach(&self) -> anyhow::Result<Reach> {
        let config = match &self.config {
            Some(path) => {
                let mut config: AuditorConfig =
                    onceonly_certs::config_file::load_toml(path).map_err(|e| {
                        anyhow::anyhow!(
                            "{}; --config names an auditor configuration file with broker, broker_id, ca, crl, cert and key",
                            error_chain(&e)
                        )
                    })?;
                for file in [
                    &mut config.ca,
                    &mut config.crl,
                    &mut config.cert,
                    &mut config.key,
                ]
                .into_iter()
                .flatten()
                {
                    *file = onceonly_certs::config_file::relative_to(path, file);
                }
                config
            }
            None => AuditorConfig::default(),
        };
        let broker = self
            .broker
            .clone()
            .or(config.broker)
            .unwrap_or_else(|| "127.0.0.1:7443".to_owned());
        let broker_id = self.broker_id.clone().or(config.broker_id);
        if self.pki.is_some() || self.id.is_some() {
            let dir = self.pki.clone().unwrap_or_else(|| PathBuf::from("pki"));
            let Some(id) = &self.id else {
                anyhow::bail!(
                    "--pki {} needs --id: your participant id in that PKI directory. {ASK_THE_CA} ({ISSUED}).",
                    dir.display()
                );
            };
            let folder = dir.join(self.role.as_str());
            let files = TlsFiles::new(
                dir.join("ca.pem"),
                folder.join(format!("{id}.pem")),
                folder.join(format!("{id}.key")),
                Some(dir.join("crl.pem")),
            );
            return Ok(Reach {
                broker,
                broker_id,
                files,
                from: FilesFrom::PkiDir(dir),
            });
        }
        let given = [
            ("--ca", self.ca.clone().or(config.ca)),
            ("--crl", self.crl.clone().or(config.crl)),
            ("--cert", self.cert.clone().or(config.cert)),
            ("--key", self.key.clone().or(config.key)),
        ];
        let missing: Vec<&str> = given
            .iter()
            .filter(|(_, path)| path.is_none())
            .map(|(flag, _)| *flag)
            .collect();
        if missing.len() == given.len() {
            anyhow::bail!(
                "no certificate to reach the broker with. {ASK_THE_CA}, or name them in --config auditor.toml ({ISSUED})."
            );
        }
        if !missing.is_empty() {
            anyhow::bail!(
                "{} missing: the broker is reached with all four of --ca, --crl, --cert and --key. {ASK_THE_CA} ({ISSUED}).",
                missing.join(", ")
            );
        }
        let flags = [&self.ca, &self.crl, &self.cert, &self.key];
        let from_config = given
            .iter()
            .zip(flags)
            .filter(|(_, flag)| flag.is_none())
            .map(|((name, _), _)| *name)
            .collect();
        let [ca, crl, cert, key] = given.map(|(_, path)| path.unwrap_or_default());
        Ok(Reach {
            broker,
            broker_id,
            files: TlsFiles::new(ca, cert, key, Some(crl)),
            from: FilesFrom::Given {
                config: self.config.clone(),
                from_config,
            },
        })
    }
}

impl Reach {
    /// Each file readable and the revocation list current, or a message
    /// naming the flag, the file and what to ask for.
    fn check_files(&self) -> anyhow::Result<()> {
        for (flag, path, what) in self.named_files() {
            if let Err(e) = std::fs::File::open(&path) {
                anyhow::bail!("{}", self.unusable(flag, &path, what, &e.to_string()));
            }
        }
        let [.., (flag, crl, what)] = self.named_files();
        let list = read_revocation_list(&crl)
            .map_err(|e| anyhow::anyhow!("{}", self.unusable(flag, &crl, what, &e.to_string())))?;
        if let Some(until) = list.next_update
            && until < OffsetDateTime::now_utc()
        {
            anyhow::bail!(
                "the revocation list {} was current until {}: a stale list cannot show that the broker's certificate is not revoked, so the broker would be refused. Ask your CA operator for the current crl.pem (they re-sign it with `onceonly-certs refresh-crl`).",
                crl.display(),
                until.format(&Rfc3339).unwrap_or_else(|_| until.to_string())
            );
        }
        Ok(())
    }

    /// Each file with its flag and what it should be, in the order the TLS
    /// configuration loads them (so the first with a path is the one a
    /// load error of that path is about).
    fn named_files(&self) -> [(&'static str, PathBuf, &'static str); 4] {
        [
            ("--cert", self.files.cert.clone(), "your certificate"),
            ("--key", self.files.key.clone(), "your private key"),
            ("--ca", self.files.ca.clone(), "the CA certificate (ca.pem)"),
            (
                "--crl",
                self.files.crl.clone().unwrap_or_default(),
                "the CA's revocation list (crl.pem)",
            ),
        ]
    }

    /// What a TLS load error about `path` says, in the auditor's terms.
    fn unusable_file(&self, path: &Path, why: &str) -> String {
        match self.named_files().into_iter().find(|(_, p, _)| p == path) {
            Some((flag, path, what)) => self.unusable(flag, &path, what, why),
            None => format!("{}: {why}", path.display()),
        }
    }

    /// A file that cannot be used, and why, in the terms of where it came
    /// from: which flag, what it should be, whom to ask.
    fn unusable(&self, flag: &str, path: &Path, what: &str, why: &str) -> String {
        let why = why
            .strip_prefix(&format!("{}: ", path.display()))
            .unwrap_or(why);
        match &self.from {
            FilesFrom::Given {
                config: Some(config),
                from_config,
            } if from_config.contains(&flag) => format!(
                "{} in {}: {}: {why}. It names {what}, one of the files your CA operator gave you ({ISSUED}).",
                flag.trim_start_matches("--"),
                config.display(),
                path.display()
            ),
            FilesFrom::Given { .. } => format!(
                "{flag} {}: {why}. {flag} takes {what}, one of the files your CA operator gave you ({ISSUED}).",
                path.display()
            ),
            FilesFrom::PkiDir(dir) => format!(
                "{}: {why}. --pki {} --id ID reads a PKI directory as onceonly-certs lays it out (ca.pem, crl.pem, ROLE/ID.pem and ROLE/ID.key). {ASK_THE_CA} ({ISSUED}).",
                path.display(),
                dir.display()
            ),
        }
    }
}

#[derive(Debug, Args)]
struct Filters {
    /// Records about this German IDNr.
    #[arg(long)]
    subject_idnr: Option<String>,
    /// Records about this commercial register number, e.g. "F1103:HRB 123456".
    #[arg(long)]
    subject_register: Option<String>,
    /// Records of this caller (SPIFFE id).
    #[arg(long)]
    caller: Option<String>,
    /// Records of this evidence type.
    #[arg(long)]
    evidence_type: Option<String>,
    /// Records that went to this connector.
    #[arg(long)]
    connector: Option<String>,
    /// Records with this outcome.
    #[arg(long, value_enum)]
    outcome: Option<Outcome>,
    /// Received at or after (RFC 3339, e.g. 2026-11-23T00:00:00Z).
    #[arg(long)]
    after: Option<String>,
    /// Received before (RFC 3339).
    #[arg(long)]
    before: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Outcome {
    Delivered,
    Rejected,
    Denied,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON object per line.
    Jsonl,
    /// CSV with a header row, for spreadsheets.
    Csv,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

async fn client(connection: &Connection) -> anyhow::Result<AuditServiceClient<Channel>> {
    let reach = connection.reach()?;
    reach.check_files()?;
    let (config, me) = onceonly_certs::tls::client_config(&reach.files).map_err(|e| {
        let message = match &e {
            TlsError::Files(PkiError::Malformed { path, reason }) => {
                reach.unusable_file(path, reason)
            }
            TlsError::Files(PkiError::Io { path, source }) => {
                reach.unusable_file(path, &source.to_string())
            }
            TlsError::Key { .. } | TlsError::Rustls(_) => format!(
                "{}. Your certificate and key must be the pair your CA operator issued together.",
                error_chain(&e)
            ),
            TlsError::OwnIdentity { .. } => format!(
                "{}. Your certificate must be one issued with `onceonly-certs issue`.",
                error_chain(&e)
            ),
            _ => error_chain(&e),
        };
        anyhow::anyhow!("{message}")
    })?;
    let broker: Participant = match reach.broker_id.as_deref() {
        Some(spiffe) if spiffe.starts_with("spiffe://") => {
            let broker: Participant = spiffe
                .parse()
                .map_err(|e| anyhow::anyhow!("--broker-id {spiffe}: {e}"))?;
            // Only a broker of your own trust domain answers for the log.
            if broker.role() != Role::Broker || broker.trust_domain() != me.trust_domain() {
                anyhow::bail!(
                    "--broker-id {spiffe}: not a broker of your trust domain; give spiffe://{}/broker/<id>, or just the <id>",
                    me.trust_domain()
                );
            }
            broker
        }
        id => Participant::new(me.trust_domain(), Role::Broker, id.unwrap_or("broker"))
            .map_err(|e| anyhow::anyhow!("--broker-id: {e}"))?,
    };
    let channel = MtlsConnector::new(config, Some(broker))
        .channel(&reach.broker, Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!("--broker: {e}"))?;
    Ok(AuditServiceClient::new(channel))
}

/// An error as the auditor reads it: a failed connection says what to
/// check, a refusal the broker's reason; every cause said once.
fn describe(error: &anyhow::Error) -> String {
    if let Some(connect) = find_connect_error(error.as_ref()) {
        let hint = match connect {
            ConnectError::Tcp { .. } => {
                "check --broker (host:port) and that the broker is running there"
            }
            ConnectError::InvalidEndpoint(_) => "--broker takes host:port",
            ConnectError::CertificateRefused { reason, .. }
                if reason.contains("NotValidForName") =>
            {
                "the host in --broker must be a name the broker's certificate covers (ask its operator which)"
            }
            ConnectError::CertificateRefused { .. } => {
                "the broker's certificate did not verify against --ca and --crl; check that they are your CA operator's current ones"
            }
            ConnectError::Handshake { .. } => {
                "check that --broker is the broker's gRPC port, and --ca, --cert and --key are your CA operator's current ones"
            }
            ConnectError::IdentityMismatch { .. } => {
                "if your trust domain's broker has another id than `broker`, pass --broker-id"
            }
        };
        return format!("cannot reach the broker: {connect}; {hint}");
    }
    if let Some(status) = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<tonic::Status>())
    {
        return match status.code() {
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => format!(
                "the broker refused: {} ({:?}); ask your CA operator whether your certificate is current and of role auditor",
                status.message(),
                status.code()
            ),
            code => format!("the broker answered {code:?}: {}", status.message()),
        };
    }
    error_chain(error.as_ref())
}

/// The broker's audit public key, or what to ask for.
fn read_public_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    load_public_key(path).map_err(|e| {
        anyhow::anyhow!(
            "{e}; --public-key takes the broker's audit.key.pub, which the broker's operator hands out"
        )
    })
}

fn timestamp(text: &Option<String>, flag: &str) -> anyhow::Result<Option<prost_types::Timestamp>> {
    text.as_ref()
        .map(|t| {
            let when = OffsetDateTime::parse(t, &Rfc3339)
                .with_context(|| format!("{flag} {t:?} is not RFC 3339"))?;
            Ok(prost_types::Timestamp {
                seconds: when.unix_timestamp(),
                nanos: 0,
            })
        })
        .transpose()
}

/// A receipt file: the protobuf encoding, binary or hex.
fn read_receipt(path: &std::path::Path) -> anyhow::Result<onceonly_proto::v1::AuditReceipt> {
    use prost::Message;
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let bytes = match hex::decode(text.trim()) {
        Ok(decoded) => decoded,
        Err(_) => bytes,
    };
    onceonly_proto::v1::AuditReceipt::decode(bytes.as_slice()).with_context(|| {
        format!(
            "{} is not an AuditReceipt (its protobuf encoding, binary or hex)",
            path.display()
        )
    })
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::CheckReceipt {
            receipt,
            public_key,
            offline,
            connection,
        } => {
            let receipt = read_receipt(&receipt)?;
            let key = read_public_key(&public_key)?;
            let checked = onceonly_audit_log::receipt::verify(&receipt, &key)?;
            // Names from the broker, printed as data, never as terminal
            // control sequences.
            println!(
                "receipt verified: exchange {} (leaf {}) committed at {} ms by replica {}, to be in the log by {} ms",
                receipt.exchange_id.escape_debug(),
                hex::encode(checked.leaf_hash),
                checked.committed_at_ms,
                receipt.replica.escape_debug(),
                checked.include_by_ms
            );
            if !offline {
                match check_receipt(&mut client(&connection).await?, &key, &receipt).await? {
                    ReceiptStatus::Included { index, head } => println!(
                        "included: record {index} in the signed head of {} records (signed at {} ms)",
                        head.tree_size, head.timestamp_ms
                    ),
                    ReceiptStatus::Pending {
                        tree_size,
                        include_by_ms,
                        overdue,
                    } => {
                        if overdue {
                            anyhow::bail!(
                                "not in the log, and the broker has signed no head since its promise fell due at {include_by_ms} ms (latest head: {tree_size} records): the promise is broken or the log stalled; keep the receipt"
                            );
                        }
                        println!(
                            "not yet in the log (latest head: {tree_size} records); due by {include_by_ms} ms: check again after"
                        )
                    }
                }
            }
        }
        Command::Query {
            connection,
            filters,
            format,
            limit,
        } => {
            let mut client = client(&connection).await?;
            let subject = match (&filters.subject_idnr, &filters.subject_register) {
                (Some(idnr), _) => Some(SubjectId {
                    scheme: SubjectIdScheme::DeIdnr.into(),
                    value: idnr.clone(),
                }),
                (None, Some(number)) => Some(SubjectId {
                    scheme: SubjectIdScheme::DeCommercialRegister.into(),
                    value: number.clone(),
                }),
                (None, None) => None,
            };
            let mut request = QueryRecordsRequest {
                subject,
                caller_id: filters.caller.clone().unwrap_or_default(),
                evidence_type: filters.evidence_type.clone().unwrap_or_default(),
                connector_id: filters.connector.clone().unwrap_or_default(),
                outcome: filters.outcome.map_or(0, |o| match o {
                    Outcome::Delivered => ExchangeOutcome::Delivered as i32,
                    Outcome::Rejected => ExchangeOutcome::Rejected as i32,
                    Outcome::Denied => ExchangeOutcome::Denied as i32,
                    Outcome::Failed => ExchangeOutcome::Failed as i32,
                    Outcome::Cancelled => ExchangeOutcome::Cancelled as i32,
                }),
                received_after: timestamp(&filters.after, "--after")?,
                received_before: timestamp(&filters.before, "--before")?,
                page_size: 1000,
                page_token: String::new(),
            };
            // The header only once the broker answered: a failed call
            // prints nothing but the error.
            let mut page = client.query_records(request.clone()).await?.into_inner();
            let mut out = Output::new(format, std::io::stdout())?;
            let mut written = 0usize;
            loop {
                for record in &page.records {
                    if limit != 0 && written == limit {
                        return out.finish().map(drop);
                    }
                    out.write(record)?;
                    written += 1;
                }
                if page.next_page_token.is_empty() {
                    return out.finish().map(drop);
                }
                request.page_token = page.next_page_token;
                page = client.query_records(request.clone()).await?.into_inner();
            }
        }
        Command::Verify {
            connection,
            public_key,
            saved_head,
            save_head,
            no_recompute,
        } => {
            let public_key = read_public_key(&public_key)?;
            let saved = saved_head.as_deref().map(SavedHead::load).transpose()?;
            let mut client = client(&connection).await?;
            let audit =
                verify_remote(&mut client, &public_key, saved.as_ref(), !no_recompute).await?;
            match &audit.head {
                None => println!("the log is empty; nothing to verify"),
                Some(head) => {
                    println!(
                        "signed tree head verified: {} records, root {}",
                        head.tree_size,
                        hex::encode(head.root_hash)
                    );
                    if !no_recompute {
                        println!(
                            "all {} entries downloaded and re-hashed: they give the signed root",
                            audit.entries_checked
                        );
                    }
                    if let Some(saved) = &saved {
                        println!(
                            "the log extends the head saved earlier ({} records): consistency proven",
                            saved.tree_size
                        );
                    }
                    if let Some(path) = &save_head {
                        SavedHead::store(head, path)?;
                        println!("head saved to {} for the next audit", path.display());
                    }
                }
            }
        }
        Command::PolicyAt {
            index,
            data_dir,
            public_key,
        } => {
            let public_key = read_public_key(&public_key)?;
            print!("{}", policy_at(index, &data_dir, &public_key)?);
        }
        Command::VerifyDir {
            data_dir,
            public_key,
            saved_head,
            save_head,
        } => {
            let public_key = read_public_key(&public_key)?;
            let saved = saved_head.as_deref().map(SavedHead::load).transpose()?;
            let verified = verify_dir_against(&data_dir, &public_key, saved.as_ref())
                .map_err(|tamper| anyhow::anyhow!("NOT VERIFIED: {tamper}"))?;
            println!(
                "verified: {} records; every record in place and unaltered, and they hash to the signed tree heads",
                verified.records
            );
            if let Some(saved) = &saved {
                println!(
                    "the log extends the head saved earlier ({} records)",
                    saved.tree_size
                );
            }
            if let (Some(path), Some(head)) = (save_head, &verified.head) {
                SavedHead::store(head, &path)?;
                println!("head saved to {} for the next audit", path.display());
            }
        }
    }
    Ok(())
}

/// What `policy-at` prints: the record at `index`, the policy entry that
/// put its policy in force, and the text, after proving the log and the
/// text's digest.
fn policy_at(index: u64, data_dir: &Path, public_key: &[u8]) -> anyhow::Result<String> {
    use sha2::Digest;
    let verified = verify_dir_against(data_dir, public_key, None)
        .map_err(|tamper| anyhow::anyhow!("NOT VERIFIED: {tamper}"))?;
    if index >= verified.records {
        anyhow::bail!(
            "the log holds {} records: there is no record {index}",
            verified.records
        );
    }
    let mut record = None;
    let mut entries = Vec::new();
    onceonly_audit_log::verify::read_dir_records(data_dir, |at, read| {
        if read.kind() == RecordKind::PolicyApplied {
            entries.push((at, read.clone()));
        }
        if at == index {
            record = Some(read);
        }
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let record = record.ok_or_else(|| anyhow::anyhow!("record {index} could not be read"))?;
    if record.policy_sha256.is_empty() {
        anyhow::bail!(
            "record {index} names no policy (written before the broker kept its policy history, or not an exchange)"
        );
    }
    let hex = hex::encode(&record.policy_sha256);
    let file = data_dir.join("policies").join(format!("{hex}.toml"));
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "the policy text record {index} names is not kept at {}",
            file.display()
        )
    })?;
    if sha2::Sha256::digest(text.as_bytes()).as_slice() != record.policy_sha256.as_slice() {
        anyhow::bail!(
            "NOT VERIFIED: {} does not hash to the digest record {index} names ({hex}): the kept text was altered",
            file.display()
        );
    }
    let mut out = String::new();
    if record.kind() == RecordKind::PolicyApplied {
        out.push_str(&format!(
            "record {index}: policy version {} (sha256 {hex}) put in force by {}\n",
            record.policy_version, record.policy_applied_by
        ));
    } else {
        out.push_str(&format!(
            "record {index}: exchange {} by {}, outcome {:?}{}, {} of policy version {} (sha256 {hex})\n",
            record.exchange_id,
            record.caller_id,
            record.outcome(),
            match record.error_reason() {
                ErrorReason::Unspecified => String::new(),
                reason => format!(" ({})", reason.as_str_name().trim_start_matches("ERROR_REASON_")),
            },
            if record.policy_rule.is_empty() {
                "no rule allowing it".to_owned()
            } else {
                format!("allowed by rule {:?}", record.policy_rule)
            },
            record.policy_version
        ));
        // The entry that put this version in force: the latest before the
        // record, or (written a moment after the policy took effect) the
        // first after it.
        let same = |entry: &AuditRecord| {
            entry.policy_sha256 == record.policy_sha256
                && entry.policy_version == record.policy_version
                && entry.replica == record.replica
        };
        let entry = entries
            .iter()
            .rev()
            .find(|(at, entry)| *at <= index && same(entry))
            .or_else(|| entries.iter().find(|(_, entry)| same(entry)));
        let Some((at, entry)) = entry else {
            anyhow::bail!(
                "NOT PROVEN: no entry in the log puts policy version {} (sha256 {hex}) in force",
                record.policy_version
            );
        };
        out.push_str(&format!(
            "that policy was put in force at record {at} by {}\n",
            entry.policy_applied_by
        ));
        for change in &entry.policy_changes {
            out.push_str(&format!("  changed: {change}\n"));
        }
    }
    out.push_str(&format!(
        "verified: the log's {} records hash to its signed tree heads, and the text below hashes to the digest record {index} names\n---\n{text}",
        verified.records
    ));
    if !text.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

/// Writes records in the chosen format (to stdout, or to a buffer in tests).
enum Output<W: Write> {
    Table(W),
    Jsonl(W),
    Csv(Box<csv::Writer<W>>),
}

/// The CSV and JSON Lines columns; new ones come last (`kind`, then
/// `error_reason`, `register_contacted`, `policy_rule`, `replica`), so
/// columns counted by position before them still hold what they held.
const COLUMNS: [&str; 21] = [
    "log_index",
    "received_at",
    "exchange_id",
    "request_id",
    "caller_id",
    "evidence_type",
    "purpose",
    "legal_basis",
    "subject_pseudonym",
    "jurisdiction",
    "connector_id",
    "outcome",
    "status_code",
    "status_message",
    "payload_sha256",
    "consent_id",
    "kind",
    "error_reason",
    "register_contacted",
    "policy_rule",
    "replica",
];

/// What a record is, as the `kind` column says it: `EXCHANGE` (an evidence
/// request, `RECORD_KIND_UNSPECIFIED` in the API), `CONSENT_GRANTED`,
/// `CONSENT_REVOKED`, `CONSENTS_LISTED`, `HISTORY_READ`, `KEY_HANDOVER`;
/// `UNKNOWN(<n>)` for a kind newer than this tool.
fn kind(r: &AuditRecord) -> String {
    match RecordKind::try_from(r.kind) {
        Ok(RecordKind::Unspecified) => "EXCHANGE".to_owned(),
        Ok(kind) => kind
            .as_str_name()
            .trim_start_matches("RECORD_KIND_")
            .to_owned(),
        Err(_) => format!("UNKNOWN({})", r.kind),
    }
}

/// The `ErrorReason` the caller got, as its name (`QUOTA_EXCEEDED`,
/// `CONNECTOR_CIRCUIT_OPEN`, ...); empty for delivered evidence and for
/// records of other kinds.
fn error_reason(r: &AuditRecord) -> String {
    match ErrorReason::try_from(r.error_reason) {
        Ok(ErrorReason::Unspecified) => String::new(),
        Ok(reason) => reason.reason().to_owned(),
        Err(_) => format!("UNKNOWN({})", r.error_reason),
    }
}

fn fields(r: &AuditRecord) -> [String; 21] {
    let received = r
        .received_at
        .as_ref()
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default();
    [
        r.log_index.to_string(),
        received,
        r.exchange_id.clone(),
        r.request_id.clone(),
        r.caller_id.clone(),
        r.evidence_type.clone(),
        r.purpose.clone(),
        r.legal_basis.clone(),
        hex::encode(&r.subject_pseudonym),
        r.jurisdiction.clone(),
        r.connector_id.clone(),
        r.outcome()
            .as_str_name()
            .trim_start_matches("EXCHANGE_OUTCOME_")
            .to_owned(),
        format!("{:?}", tonic::Code::from_i32(r.status_code)),
        r.status_message.clone(),
        hex::encode(&r.payload_sha256),
        r.consent_id.clone(),
        kind(r),
        error_reason(r),
        r.register_contacted.to_string(),
        r.policy_rule.clone(),
        r.replica.clone(),
    ]
}

impl<W: Write> Output<W> {
    fn new(format: Format, mut out: W) -> anyhow::Result<Self> {
        Ok(match format {
            Format::Table => {
                writeln!(
                    out,
                    "{:>6}  {:<20}  {:<15}  {:<52}  {:<28}  {:<10}  {:<18}  {:<30}  {:<10}",
                    "index",
                    "received",
                    "kind",
                    "caller",
                    "evidence type",
                    "outcome",
                    "status",
                    "reason",
                    "connector"
                )?;
                Output::Table(out)
            }
            Format::Jsonl => Output::Jsonl(out),
            Format::Csv => {
                let mut writer = csv::Writer::from_writer(out);
                writer.write_record(COLUMNS)?;
                Output::Csv(Box::new(writer))
            }
        })
    }

    fn write(&mut self, record: &AuditRecord) -> anyhow::Result<()> {
        // Record text came from callers and registers: never let it steer a
        // terminal or a spreadsheet.
        let f = fields(record).map(|field| escaped(&field));
        match self {
            Output::Table(out) => writeln!(
                out,
                "{:>6}  {:<20}  {:<15}  {:<52}  {:<28}  {:<10}  {:<18}  {:<30}  {:<10}",
                f[0], f[1], f[16], f[4], f[5], f[11], f[12], f[17], f[10]
            )?,
            Output::Jsonl(out) => {
                let object: serde_json::Map<String, serde_json::Value> = COLUMNS
                    .iter()
                    .zip(f)
                    .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String(v)))
                    .collect();
                writeln!(out, "{}", serde_json::Value::Object(object))?;
            }
            Output::Csv(writer) => writer.write_record(f.iter().map(|cell| formula_safe(cell)))?,
        }
        Ok(())
    }

    /// Flushes what was written and hands back the writer.
    fn finish(self) -> anyhow::Result<W> {
        let mut out = match self {
            Output::Table(out) | Output::Jsonl(out) => out,
            Output::Csv(writer) => writer.into_inner().map_err(|e| e.into_error())?,
        };
        out.flush()?;
        Ok(out)
    }
}

/// `text` with control and bidirectional formatting characters written as
/// `\u{..}` escapes, so they neither move the cursor nor reorder what a
/// reader sees.
fn escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if c.is_control() || onceonly_proto::validate::is_bidi_control(c) {
            out.push_str(&format!("\\u{{{:04x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// A CSV cell a spreadsheet will not run as a formula (CSV injection): a
/// leading `=`, `+`, `-`, `@`, tab or carriage return gets a `'` before it.
fn formula_safe(cell: &str) -> String {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{cell}")
    } else {
        cell.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_text_cannot_steer_a_terminal_or_a_spreadsheet() {
        assert_eq!(escaped("a\nb\u{202E}c"), "a\\u{000a}b\\u{202e}c");
        assert_eq!(
            escaped("a\\u{000a}"),
            "a\\\\u{000a}",
            "a backslash is escaped too"
        );
        assert_eq!(formula_safe("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        assert_eq!(formula_safe("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(formula_safe("-1+1"), "'-1+1");
        assert_eq!(formula_safe("parental-allowance"), "parental-allowance");

        // What the table and the CSV print of a record, its kind included.
        let grant = AuditRecord {
            log_index: 7,
            kind: RecordKind::ConsentGranted as i32,
            caller_id: "spiffe://onceonly.test/portal/\u{202E}latrop".into(),
            purpose: "=HYPERLINK(\"x\")".into(),
            evidence_type: "proof-of-residence".into(),
            ..Default::default()
        };
        let exchange = AuditRecord {
            log_index: 8,
            evidence_type: "birth-certificate".into(),
            ..Default::default()
        };
        let unknown = AuditRecord {
            log_index: 9,
            kind: 99,
            ..Default::default()
        };
        let printed = |format: Format| {
            let mut out = Output::new(format, Vec::new()).expect("header");
            for record in [&grant, &exchange, &unknown] {
                out.write(record).expect("written");
            }
            String::from_utf8(out.finish().expect("flushed")).expect("utf-8")
        };

        let table = printed(Format::Table);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].contains("  kind  "), "{table}");
        assert!(lines[1].contains("  CONSENT_GRANTED  "), "{table}");
        assert!(lines[1].contains("portal/\\u{202e}latrop"), "{table}");
        assert!(!table.contains('\u{202E}'), "{table}");
        assert!(lines[2].contains("  EXCHANGE  "), "{table}");
        assert!(lines[3].contains("  UNKNOWN(99)  "), "{table}");

        let csv = printed(Format::Csv);
        let mut reader = csv::Reader::from_reader(csv.as_bytes());
        let header = reader.headers().expect("header").clone();
        let column = |name: &str| header.iter().position(|h| h == name).expect(name);
        let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("row")).collect();
        let kinds: Vec<&str> = rows.iter().map(|row| &row[column("kind")]).collect();
        assert_eq!(kinds, ["CONSENT_GRANTED", "EXCHANGE", "UNKNOWN(99)"]);
        assert_eq!(&rows[0][column("purpose")], "'=HYPERLINK(\"x\")");
        assert_eq!(
            &rows[0][column("caller_id")],
            "spiffe://onceonly.test/portal/\\u{202e}latrop"
        );
    }

    #[test]
    fn every_format_shows_the_refusal_reason_the_caller_got() {
        let over_quota = AuditRecord {
            log_index: 3,
            outcome: ExchangeOutcome::Denied as i32,
            status_code: tonic::Code::ResourceExhausted as i32,
            error_reason: ErrorReason::QuotaExceeded as i32,
            ..Default::default()
        };
        let circuit_open = AuditRecord {
            log_index: 4,
            outcome: ExchangeOutcome::Failed as i32,
            status_code: tonic::Code::Unavailable as i32,
            error_reason: ErrorReason::ConnectorCircuitOpen as i32,
            ..Default::default()
        };
        let delivered = AuditRecord {
            log_index: 5,
            outcome: ExchangeOutcome::Delivered as i32,
            register_contacted: true,
            ..Default::default()
        };
        let printed = |format: Format| {
            let mut out = Output::new(format, Vec::new()).expect("header");
            for record in [&over_quota, &circuit_open, &delivered] {
                out.write(record).expect("written");
            }
            String::from_utf8(out.finish().expect("flushed")).expect("utf-8")
        };
        let table = printed(Format::Table);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("  reason  "), "{table}");
        assert!(lines[1].contains("  QUOTA_EXCEEDED  "), "{table}");
        assert!(lines[2].contains("  CONNECTOR_CIRCUIT_OPEN  "), "{table}");

        let csv = printed(Format::Csv);
        let mut reader = csv::Reader::from_reader(csv.as_bytes());
        let header = reader.headers().expect("header").clone();
        let column = |name: &str| header.iter().position(|h| h == name).expect(name);
        assert_eq!(column("kind"), 16, "older columns keep their places");
        let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("row")).collect();
        let reasons: Vec<&str> = rows
            .iter()
            .map(|row| &row[column("error_reason")])
            .collect();
        assert_eq!(reasons, ["QUOTA_EXCEEDED", "CONNECTOR_CIRCUIT_OPEN", ""]);
        assert_eq!(&rows[2][column("register_contacted")], "true");

        let jsonl = printed(Format::Jsonl);
        let first: serde_json::Value =
            serde_json::from_str(jsonl.lines().next().expect("a line")).expect("JSON");
        assert_eq!(first["error_reason"], "QUOTA_EXCEEDED");
    }
}
