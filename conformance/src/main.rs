//! `onceonly-conformance`: checks a connector against the connector
//! contract, playing the broker. Prints a table (check, expected, result,
//! got), writes a JSON report where asked, and exits 1 on any failure.
//!
//! Exit codes: 0 the connector conforms, 1 a check failed, 2 usage or
//! set-up error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use onceonly_conformance::{Target, run};
use onceonly_proto::v1::{SubjectId, SubjectIdScheme};

/// Check a onceonly connector (any language) against the connector contract.
#[derive(Debug, Parser)]
#[command(name = "onceonly-conformance", version)]
struct Cli {
    /// The connector, host:port.
    #[arg(long)]
    connector: String,
    /// Its participant id (spiffe://<domain>/connector/<id>).
    #[arg(long)]
    connector_id: String,
    /// The trust domain's CA certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// The revocation list (PEM or DER).
    #[arg(long)]
    crl: Option<PathBuf>,
    /// A broker certificate of the trust domain (the checks play the broker).
    #[arg(long)]
    broker_cert: PathBuf,
    /// Its private key.
    #[arg(long)]
    broker_key: PathBuf,
    /// An evidence type the connector serves.
    #[arg(long)]
    evidence_type: String,
    /// A subject the register holds evidence about.
    #[arg(long)]
    subject: String,
    /// Its identifier scheme.
    #[arg(long, default_value = "DE_IDNR")]
    scheme: String,
    /// A parameter of that lookup, name=value (repeatable).
    #[arg(long = "parameter")]
    parameters: Vec<String>,
    /// A subject the register holds nothing about (checks NOT_FOUND).
    #[arg(long)]
    missing_subject: Option<String>,
    /// An authority certificate of the trust domain: the requester, who
    /// signs each request (the checks play it too).
    #[arg(long)]
    authority_cert: PathBuf,
    /// Its private key.
    #[arg(long)]
    authority_key: PathBuf,
    /// That authority's encryption certificate (checks encryption).
    #[arg(long, requires = "encryption_key")]
    encryption_cert: Option<PathBuf>,
    /// Its key.
    #[arg(long, requires = "encryption_cert")]
    encryption_key: Option<PathBuf>,
    /// The deadline of the deadline check.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let scheme = match SubjectIdScheme::from_str_name(&format!("SUBJECT_ID_SCHEME_{}", cli.scheme))
    {
        Some(scheme) => scheme,
        None => {
            eprintln!(
                "error: --scheme {}: use DE_IDNR, DE_COMMERCIAL_REGISTER or EIDAS",
                cli.scheme
            );
            return ExitCode::from(2);
        }
    };
    let mut parameters = HashMap::new();
    for parameter in &cli.parameters {
        let Some((name, value)) = parameter.split_once('=') else {
            eprintln!("error: --parameter {parameter:?}: write name=value");
            return ExitCode::from(2);
        };
        parameters.insert(name.to_owned(), value.to_owned());
    }
    let target = Target {
        address: cli.connector,
        connector_id: cli.connector_id,
        ca: cli.ca,
        crl: cli.crl,
        broker_cert: cli.broker_cert,
        broker_key: cli.broker_key,
        evidence_type: cli.evidence_type,
        subject: SubjectId {
            scheme: scheme.into(),
            value: cli.subject,
        },
        parameters,
        missing_subject: cli.missing_subject,
        authority: (cli.authority_cert, cli.authority_key),
        encryption: cli.encryption_cert.zip(cli.encryption_key),
        deadline: cli.deadline,
    };
    let report = match run(target).await {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.table());
    if let Some(path) = &cli.json {
        let written = serde_json::to_vec_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|json| std::fs::write(path, json).map_err(|e| e.to_string()));
        if let Err(error) = written {
            eprintln!("error: {}: {error}", path.display());
            return ExitCode::from(2);
        }
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
