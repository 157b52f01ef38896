//! `onceonly-registry-mock`: runs one sample register as a connector.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use onceonly_connector_sdk::ConnectorServer;
use onceonly_registry_mock::config::MockConfig;
use onceonly_registry_mock::{MockRegister, RegisterKind};

/// mimalloc instead of glibc's malloc, which under load took a quarter of
/// the broker's CPU and kept freed memory per thread (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run a sample register (civil, vehicle or business) with fictitious data
/// as a onceonly connector over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "onceonly-registry-mock", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the register a config file describes, until Ctrl-C or SIGTERM
    /// (SIGHUP reloads certificates and the CRL).
    Serve {
        /// The config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List the subjects a register holds: what a demo can ask for.
    Subjects {
        /// Which register.
        #[arg(value_enum)]
        register: RegisterKind,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    onceonly_certs::report::exit_code(run(Cli::parse().command).await)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => {
            let config = MockConfig::load(&config)?;
            // Traces go over OTLP where the configuration names an endpoint.
            let telemetry =
                onceonly_proto::telemetry::init(false, config.connector.trace_export().as_ref())?;
            let register = config.register().context("loading register data")?;
            let server = ConnectorServer::new(register, config.connector)
                .bind()
                .await?;
            // Before the line that says it is ready: a SIGTERM after it stops.
            let stop = onceonly_certs::serve::terminate_signal();
            println!(
                "{:?} register serving as {} on {}",
                config.register,
                server.identity(),
                server.local_addr()
            );
            server.serve_until(stop).await?;
            if let Some(telemetry) = telemetry {
                telemetry.shutdown();
            }
        }
        Command::Subjects { register } => {
            onceonly_proto::telemetry::init(false, None)?;
            for subject in MockRegister::embedded(register)?.subjects() {
                println!("{subject}");
            }
        }
    }
    Ok(())
}
