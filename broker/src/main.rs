//! `onceonly-broker`: creates the broker's keys, runs the broker, checks
//! its files, rotates its audit key, moves a data directory into
//! PostgreSQL for replicas.
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
    /// Check a configuration with its policy, routing table and keys,
    /// without serving: run it before starting or reloading a broker (the
    /// shipped unit runs it before every start). Fails where `serve`
    /// would, keys missing (before `init`) included.
    Check {
        /// The broker configuration (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create the audit signing key (and its .pub for auditors) and the
    /// pseudonym key named in the configuration. Run once, before the first
    /// `serve`; refuses to replace any key. Back the keys up: without the
    /// pseudonym key no citizen's records can be found, and `serve` refuses
    /// to start without either.
    Init {
        /// The broker configuration (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Hand the audit log over to a new signing key (the broker must be
    /// stopped): the old key signs the new one in a log record, later heads
    /// are signed by the new key, and verifiers that trust the old key
    /// follow the hand-over. Give auditors the new .pub afterwards.
    RotateAuditKey {
        /// The broker configuration (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Move the audit log and the consents of `data_dir` (the broker
    /// stopped) into the empty PostgreSQL database of `[storage]`, before
    /// any replica serves: the log is verified end to end, then written as
    /// it is (records, tree, last signed head), so the signed history goes
    /// on and auditors' saved heads stay provable. `data_dir` is unchanged.
    MoveToPostgres {
        /// The broker configuration (TOML), `[storage]` naming the target.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Tag the consents of a data directory written before consents were
    /// authenticated, as the broker's own (the broker stopped). Run once
    /// after upgrading such a directory: until then those consents do not
    /// count. Never run it on a directory someone else may have written to.
    TagConsents {
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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Traces go over OTLP where the configuration names an endpoint.
    let export = match &cli.command {
        Command::Serve { config, .. } => BrokerConfig::load(config)
            .ok()
            .and_then(|c| c.telemetry.export()),
        _ => None,
    };
    let telemetry = {
        let _runtime = runtime.enter();
        onceonly_proto::telemetry::init(json_logs, export.as_ref())
    };
    let telemetry = match telemetry {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command));
    if let Some(telemetry) = telemetry {
        let _runtime = runtime.enter();
        telemetry.shutdown();
    }
    // Everything that matters is closed by now (the audit log flushed); a
    // blocking task still running must not hold the process.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    onceonly_certs::report::exit_code(result)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config, .. } => {
            let config = BrokerConfig::load(&config)?;
            let broker = BoundBroker::bind(&config).await?;
            // Before the line that says it is ready: a SIGTERM after it stops.
            let stop = onceonly_certs::serve::terminate_signal();
            println!(
                "onceonly broker {} listening on {}",
                broker.identity(),
                broker.local_addr()
            );
            broker.serve_until_stopped(stop).await?;
        }
        Command::Init { config } => {
            let config = BrokerConfig::load(&config)?;
            for path in onceonly_broker::keys::init(&config)? {
                println!("created {}", path.display());
            }
            println!(
                "keys created; back them up apart from the data directory, then run `onceonly-broker serve`"
            );
        }
        Command::RotateAuditKey { config } => {
            let config = BrokerConfig::load(&config)?;
            let rotation = onceonly_broker::keys::rotate_audit_key(&config).await?;
            println!(
                "audit key rotated at log index {}: {} -> {}",
                rotation.log_index, rotation.old_public_key, rotation.new_public_key
            );
            println!(
                "the old private key was deleted; give auditors the new {} (they may keep trusting the old public key: verifiers follow the hand-over)",
                onceonly_broker::audit::public_key_path(&config.audit_key).display()
            );
        }
        Command::TagConsents { config } => {
            let config = BrokerConfig::load(&config)?;
            let tagged = onceonly_broker::storage::tag_consents(&config).await?;
            println!(
                "tagged {tagged} consents of {}; the broker counts them again",
                config.data_dir.display()
            );
        }
        Command::MoveToPostgres { config } => {
            let config = BrokerConfig::load(&config)?;
            let moved = onceonly_broker::storage::move_to_postgres(&config).await?;
            println!(
                "moved {} records and {} consents into PostgreSQL; its log goes on from the signed head of {} records",
                moved.records,
                moved.consents,
                moved.head.as_ref().map_or(0, |h| h.tree_size)
            );
            println!(
                "start the replicas on it; auditors check the move with `onceonly-audit verify --saved-head` against any replica"
            );
        }
        Command::Check { config } => {
            let config = BrokerConfig::load(&config)?;
            let routing = RoutingTable::load(&config.routing)?;
            let text = std::fs::read_to_string(&config.policy)?;
            let policy = Policy::parse(&config.policy, &text, &routing)?;
            onceonly_broker::keys::check(&config)?;
            let (tls, _) = onceonly_broker::server::load_tls(&config)?;
            println!(
                "ok: {} evidence types, {} policy rules, keys present, TLS files of {}",
                routing.evidence_types().len(),
                policy.len(),
                tls.identity()
            );
        }
    }
    Ok(())
}
