//! `onceonly-policy`: check a policy file, say what an edit changes, and
//! replay the decisions in the audit log against an edited policy, before
//! it is applied.
//!
//! Exit codes: 0 done (`check`: no findings), 1 `check` found something,
//! 2 usage error or a file that cannot be used (named, with line and fix).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use onceonly_certs::{Pki, Role};
use onceonly_policy::{diff, dry_run, lint};

/// Check and compare onceonly policies, and see what an edit would decide.
#[derive(Debug, Parser)]
#[command(name = "onceonly-policy", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a policy file and report what cannot take effect or
    /// reaches further than meant, each finding with its line.
    Check {
        /// The policy file.
        file: PathBuf,
        /// The routing table whose catalogue the policy may name [default:
        /// routing.toml beside the policy].
        #[arg(long)]
        routing: Option<PathBuf>,
        /// The CA's directory (onceonly-certs --dir): authorities without
        /// a certificate there are reported.
        #[arg(long)]
        pki: Option<PathBuf>,
        /// A rule letting more authorities than this ask is reported as
        /// broad (0: never).
        #[arg(long, default_value_t = 10)]
        broad: usize,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Say in words what changes from one policy file to another.
    Diff {
        /// The policy in force.
        old: PathBuf,
        /// The edited policy.
        new: PathBuf,
        /// The routing table [default: routing.toml beside the new policy].
        #[arg(long)]
        routing: Option<PathBuf>,
    },
    /// Decide the exchanges in the audit log again under an edited policy
    /// and list every decision that would change, grouped by rule. Reads
    /// the broker's data directory (or a copy), never writing to it, or
    /// asks the broker as an auditor (--broker, for replicas too).
    DryRun {
        /// The edited policy.
        new: PathBuf,
        /// The broker's data directory (its audit log).
        #[arg(long, required_unless_present = "broker", conflicts_with = "broker")]
        data_dir: Option<PathBuf>,
        /// The broker (host:port), asked through the auditor's API.
        #[arg(long, requires = "pki", requires = "id")]
        broker: Option<String>,
        /// The broker's participant id [default: broker].
        #[arg(long, default_value = "broker")]
        broker_id: String,
        /// A PKI directory (onceonly-certs --dir) holding your auditor
        /// certificate, the CA and the CRL.
        #[arg(long)]
        pki: Option<PathBuf>,
        /// Your auditor id in it.
        #[arg(long)]
        id: Option<String>,
        /// The routing table [default: routing.toml beside the policy].
        #[arg(long)]
        routing: Option<PathBuf>,
        /// Only the last N days.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        days: Option<u32>,
        /// Only records from this log index on.
        #[arg(long)]
        from: Option<u64>,
        /// Only records before this log index.
        #[arg(long)]
        to: Option<u64>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// For people.
    Table,
    /// For programs.
    Json,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// `routing`, or routing.toml beside `policy`.
fn routing_for(policy: &Path, routing: Option<PathBuf>) -> PathBuf {
    routing.unwrap_or_else(|| {
        policy
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("routing.toml")
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check {
            file,
            routing,
            pki,
            broad,
            format,
        } => {
            let (policy, _) = onceonly_policy::load(&file, &routing_for(&file, routing))?;
            let known_authorities = match pki {
                Some(dir) => Some(issued_authorities(&dir)?),
                None => None,
            };
            let findings = lint::check(
                &policy,
                &lint::Options {
                    known_authorities,
                    broad,
                },
            );
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&findings)?),
                Format::Table => {
                    for finding in &findings {
                        println!(
                            "{}:{}: rule {:?}: {}",
                            file.display(),
                            finding.line,
                            finding.rule,
                            finding.message
                        );
                    }
                    println!(
                        "{}: {} rule(s), {} finding(s)",
                        file.display(),
                        policy.len(),
                        findings.len()
                    );
                }
            }
            Ok(if findings.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Diff { old, new, routing } => {
            let routing = routing_for(&new, routing);
            let (before, _) = onceonly_policy::load(&old, &routing)?;
            let (after, _) = onceonly_policy::load(&new, &routing)?;
            let changes = diff::diff(&before, &after);
            if changes.is_empty() {
                println!("no rule changes");
            }
            for change in changes {
                println!("{change}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::DryRun {
            new,
            data_dir,
            broker,
            broker_id,
            pki,
            id,
            routing,
            days,
            from,
            to,
            format,
        } => {
            let (policy, _) = onceonly_policy::load(&new, &routing_for(&new, routing))?;
            let window = dry_run::Window {
                since: days.map(|days| {
                    time::OffsetDateTime::now_utc().unix_timestamp() - i64::from(days) * 86_400
                }),
                from_index: from,
                to_index: to,
            };
            let mut records = Vec::new();
            match (data_dir, broker, pki, id) {
                (Some(data_dir), _, _, _) => {
                    onceonly_audit_log::verify::read_dir_records(&data_dir, |index, record| {
                        records.push((index, record));
                    })?;
                }
                (None, Some(broker), Some(pki), Some(id)) => {
                    records = records_from_broker(&broker, &broker_id, &pki, &id)?;
                }
                _ => anyhow::bail!("give --data-dir, or --broker with --pki and --id"),
            }
            let report = dry_run::replay(records, &policy, &window);
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Table => print!("{}", report.table()),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Every record of the broker at `broker`, asked as auditor `id` of the
/// PKI in `pki` (QueryRecords, page by page), with its log index.
fn records_from_broker(
    broker: &str,
    broker_id: &str,
    pki: &Path,
    id: &str,
) -> anyhow::Result<Vec<(u64, onceonly_proto::v1::AuditRecord)>> {
    use onceonly_proto::v1::QueryRecordsRequest;
    use onceonly_proto::v1::audit_service_client::AuditServiceClient;
    let pki = Pki::open(pki)?;
    let (config, me) = onceonly_certs::tls::client_config(&pki.tls_files(Role::Auditor, id))?;
    let expected = onceonly_certs::Participant::new(me.trust_domain(), Role::Broker, broker_id)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let channel = onceonly_certs::MtlsConnector::new(config, Some(expected))
            .channel(broker, std::time::Duration::from_secs(10))?;
        let mut auditor = AuditServiceClient::new(channel);
        let mut records = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = auditor
                .query_records(QueryRecordsRequest {
                    page_token: page_token.clone(),
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .map_err(|status| {
                    anyhow::anyhow!(
                        "the broker refused the query: {:?}: {}",
                        status.code(),
                        status.message()
                    )
                })?
                .into_inner();
            records.extend(page.records.into_iter().map(|r| (r.log_index, r)));
            if page.next_page_token.is_empty() {
                return Ok(records);
            }
            page_token = page.next_page_token;
        }
    })
}

/// The ids of the authorities the CA in `dir` issued certificates to.
fn issued_authorities(dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    let pki = Pki::open(dir)?;
    Ok(pki
        .stored_certificates()?
        .into_iter()
        .filter(|c| c.participant.role() == Role::Authority)
        .map(|c| c.participant.id().to_owned())
        .collect())
}
