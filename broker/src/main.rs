//! `onceonly-broker`: runs the broker, or checks its files.
//!
//! Exit codes: 0 success, 1 failure (the message names the file, line and
//! fix), 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use onceonly_broker::policy::Policy;
use onceonly_broker::routing::RoutingTable;
use onceonly_broker::{BoundBroker, BrokerConfig};

/// mimalloc instead of glibc's malloc, which under load took a quarter of
/// the broker's CPU and kept freed memory per thread (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The onceonly evidence-exchange broker.
#[derive(Debug, Parser)]
#[command(name = "onceonly-broker", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker until Ctrl-C or SIGTERM. SIGHUP reloads the policy
    /// and the TLS files; the policy file is also reloaded when it changes.
    Serve {
        /// The broker configuration (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Log as JSON lines.
        #[arg(long)]
        json_logs: bool,
    },
    /// Check a configuration with its policy and routing table, without
    /// serving: run it before reloading a live broker.
    Check {
        /// The broker configuration (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_logs = matches!(
        cli.command,
        Command::Serve {
            json_logs: true,
            ..
        }
    );
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if json_logs {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
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

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config, .. } => {
            let config = BrokerConfig::load(&config)?;
            let broker = BoundBroker::bind(&config).await?;
            println!(
                "onceonly broker {} listening on {}",
                broker.identity(),
                broker.local_addr()
            );
            broker.serve().await?;
        }
        Command::Check { config } => {
            let config = BrokerConfig::load(&config)?;
            let routing = RoutingTable::load(&config.routing)?;
            let text = std::fs::read_to_string(&config.policy)?;
            let policy = Policy::parse(&config.policy, &text, &routing)?;
            println!(
                "ok: {} evidence types, {} policy rules",
                routing.evidence_types().len(),
                policy.len()
            );
        }
    }
    Ok(())
}
