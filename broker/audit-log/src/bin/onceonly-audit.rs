//! `onceonly-audit`: query the exchange log, and verify it offline.
//!
//! Exit codes: 0 success (and, for the verify commands, the log verified),
//! 1 the log did not verify or the operation failed (the message says
//! where), 2 usage error.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use onceonly_audit_log::auditor::{
    ReceiptStatus, SavedHead, check_receipt, load_public_key, verify_remote,
};
use onceonly_audit_log::verify_dir_against;
use onceonly_certs::{MtlsConnector, Participant, Pki, Role, TlsFiles};
use onceonly_proto::v1::audit_service_client::AuditServiceClient;
use onceonly_proto::v1::{
    AuditRecord, ExchangeOutcome, QueryRecordsRequest, RecordKind, SubjectId, SubjectIdScheme,
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

/// How to reach the broker: its address and the caller's certificate.
#[derive(Debug, Args)]
struct Connection {
    /// The broker, host:port.
    #[arg(long, default_value = "127.0.0.1:7443")]
    broker: String,
    /// A PKI directory made with onceonly-certs (with --id).
    #[arg(long, default_value = "pki")]
    pki: PathBuf,
    /// Your participant id in the PKI (needed to reach the broker).
    #[arg(long)]
    id: Option<String>,
    /// Your role.
    #[arg(long, default_value = "auditor")]
    role: Role,
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
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn client(connection: &Connection) -> anyhow::Result<AuditServiceClient<Channel>> {
    let pki = Pki::open(&connection.pki)?;
    let id = connection
        .id
        .as_deref()
        .context("--id is needed to reach the broker: your participant id in the PKI")?;
    let files: TlsFiles = pki.tls_files(connection.role, id);
    let (config, _) = onceonly_certs::tls::client_config(&files)?;
    let broker: Participant = pki.participant(Role::Broker, "broker")?;
    let channel = MtlsConnector::new(config, Some(broker))
        .channel(&connection.broker, Duration::from_secs(5))?;
    Ok(AuditServiceClient::new(channel))
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
            let key = load_public_key(&public_key)?;
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
            let mut out = Output::new(format, std::io::stdout())?;
            let mut written = 0usize;
            loop {
                let page = client.query_records(request.clone()).await?.into_inner();
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
            }
        }
        Command::Verify {
            connection,
            public_key,
            saved_head,
            save_head,
            no_recompute,
        } => {
            let public_key = load_public_key(&public_key)?;
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
        Command::VerifyDir {
            data_dir,
            public_key,
            saved_head,
            save_head,
        } => {
            let public_key = load_public_key(&public_key)?;
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

/// Writes records in the chosen format (to stdout, or to a buffer in tests).
enum Output<W: Write> {
    Table(W),
    Jsonl(W),
    Csv(Box<csv::Writer<W>>),
}

/// The CSV and JSON Lines columns; `kind` came last, so columns counted by
/// position before it still hold what they held.
const COLUMNS: [&str; 17] = [
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

fn fields(r: &AuditRecord) -> [String; 17] {
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
    ]
}

impl<W: Write> Output<W> {
    fn new(format: Format, mut out: W) -> anyhow::Result<Self> {
        Ok(match format {
            Format::Table => {
                writeln!(
                    out,
                    "{:>6}  {:<20}  {:<15}  {:<52}  {:<28}  {:<10}  {:<18}  {:<10}",
                    "index",
                    "received",
                    "kind",
                    "caller",
                    "evidence type",
                    "outcome",
                    "status",
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
                "{:>6}  {:<20}  {:<15}  {:<52}  {:<28}  {:<10}  {:<18}  {:<10}",
                f[0], f[1], f[16], f[4], f[5], f[11], f[12], f[10]
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
}
