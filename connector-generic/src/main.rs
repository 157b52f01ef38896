//! `onceonly-connector`: serves the evidence types of a mapping file, checks
//! a configuration, or tries one lookup locally.
//!
//! Exit codes: 0 success, 1 failure (the message names the file, line and
//! fix), 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use onceonly_connector::{GenericConfig, GenericConnector, Loaded};
use onceonly_connector_sdk::ConnectorServer;

/// mimalloc instead of glibc's malloc, as the other onceonly servers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A onceonly connector whose evidence types come from a mapping file.
#[derive(Debug, Parser)]
#[command(name = "onceonly-connector", version)]
struct Cli {
    /// Validate the configuration and the mapping (and each query against
    /// its database) without serving; same as `check`.
    #[arg(long, global = true)]
    check: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve until Ctrl-C or SIGTERM. SIGHUP reloads the mapping (an
    /// invalid one is refused and the old one serves on), the certificates
    /// and the CRL.
    Serve {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the configuration and the mapping, and prepare every SQL
    /// query against its database, without serving.
    Check {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run one lookup here, without a broker, and print the document: try
    /// a mapping before anyone is connected.
    Try {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// The evidence type.
        evidence_type: String,
        /// The subject's identifier (e.g. an IDNr).
        subject: String,
        /// Parameters, as name=value.
        parameters: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    onceonly_certs::report::exit_code(result)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = match cli.command {
        Command::Serve { config } if cli.check => Command::Check { config },
        command => command,
    };
    match command {
        Command::Serve { config } => {
            let config = GenericConfig::load(&config)?;
            let telemetry =
                onceonly_proto::telemetry::init(false, config.connector.trace_export().as_ref())?;
            let connector = GenericConnector::load(&config.mapping)?;
            let _reload = {
                let connector = connector.clone();
                onceonly_certs::serve::on_sighup(move || match connector.reload() {
                    Ok(types) => tracing::info!(types, "mapping reloaded"),
                    Err(error) => {
                        tracing::error!(%error, "mapping NOT reloaded; the previous mapping stays in force")
                    }
                })
            };
            let server = ConnectorServer::new(connector, config.connector)
                .bind()
                .await?;
            // Before the line that says it is ready: a SIGTERM after it stops.
            let stop = onceonly_certs::serve::terminate_signal();
            println!(
                "onceonly-connector serving as {} on {}",
                server.identity(),
                server.local_addr()
            );
            server.serve_until(stop).await?;
            if let Some(telemetry) = telemetry {
                telemetry.shutdown();
            }
        }
        Command::Check { config } => {
            onceonly_proto::telemetry::init(false, None)?;
            let config = GenericConfig::load(&config)?;
            let loaded = Loaded::load(&config.mapping)?;
            let queries = loaded.check_queries().await.map_err(anyhow::Error::msg)?;
            println!(
                "ok: {} evidence types from {} sources; {queries} queries prepared against their databases",
                loaded.mapping.evidence_types.len(),
                loaded.mapping.sources.len()
            );
        }
        Command::Try {
            config,
            evidence_type,
            subject,
            parameters,
        } => {
            onceonly_proto::telemetry::init(false, None)?;
            let config = GenericConfig::load(&config)?;
            let loaded = Loaded::load(&config.mapping)?;
            let mut pairs = std::collections::BTreeMap::new();
            for parameter in &parameters {
                let (name, value) = parameter
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("parameter {parameter:?}: write name=value"))?;
                pairs.insert(name.to_owned(), value.to_owned());
            }
            let values = onceonly_connector::lookup::Values::new(&subject, &pairs);
            let payload = loaded
                .lookup(&evidence_type, &values, None)
                .await
                .map_err(|e| anyhow::anyhow!("{evidence_type} for {subject}: {e}"))?;
            eprintln!("media type: {}", payload.media_type);
            println!("{}", String::from_utf8_lossy(&payload.bytes));
        }
    }
    Ok(())
}
