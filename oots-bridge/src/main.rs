//! `onceonly-oots-bridge`: answers EU evidence requests from an access
//! point's Domibus WS plugin through the broker, until SIGTERM or Ctrl-C.
//!
//! Exit codes: 0 stopped, 1 a configuration or start error (the message
//! names the file, line and fix), 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use onceonly_certs::identity::Role;
use onceonly_oots_bridge::bridge::Bridge;
use onceonly_oots_bridge::broker::BrokerSource;
use onceonly_oots_bridge::config::BridgeConfig;
use onceonly_oots_bridge::mapping::Mapping;
use onceonly_oots_bridge::preview::sign_in::{Person, TestSignIn};
use onceonly_oots_bridge::preview::{PreviewSettings, PreviewSpace};
use onceonly_oots_bridge::transport::domibus::DomibusWs;
use onceonly_seal::{DecryptionKey, EvidenceOpener, Signer};

/// The OOTS bridge.
#[derive(Debug, Parser)]
#[command(name = "onceonly-oots-bridge", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Poll the access point and answer its requests until SIGTERM.
    Serve {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check the configuration, the mapping and the certificates without
    /// serving.
    Check {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

type Prepared = (BridgeConfig, Bridge<DomibusWs, BrokerSource>);

fn prepare(path: &std::path::Path) -> anyhow::Result<Prepared> {
    let config = BridgeConfig::load(path)?;
    let mapping = Mapping::load(&config.mapping)?;
    if config.preview.is_none()
        && let Some(n) = mapping.evidence.iter().position(|entry| entry.preview)
    {
        anyhow::bail!(
            "{}: evidence[{n}] asks for the citizen's preview, and {} has no [preview] section; add one (see oots-bridge/config/bridge.toml) or set preview = false",
            config.mapping.display(),
            path.display()
        );
    }
    let (client, me) = onceonly_certs::tls::client_config(&config.tls)?;
    if me.role() != Role::Authority {
        anyhow::bail!(
            "{}: tls.cert is for {me}; the bridge asks the broker as an authority (onceonly-certs issue --role authority --id oots-bridge)",
            path.display()
        );
    }
    let verifier = onceonly_certs::tls::identity_verifier(&config.tls, me.trust_domain())?;
    let opener = EvidenceOpener::new(
        Arc::new(verifier),
        Some(DecryptionKey::from_files(
            &config.encryption.cert,
            &config.encryption.key,
        )?),
    );
    let certificate = onceonly_certs::pki::load_certs(&config.encryption.cert)?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("{}: no certificate", config.encryption.cert.display()))?
        .as_ref()
        .to_vec();
    let channel = onceonly_certs::tls::MtlsConnector::new(client, None).channel(
        &config.broker.to_string(),
        std::time::Duration::from_secs(5),
    )?;
    let source = BrokerSource::new(
        channel,
        Arc::new(Signer::from_files(&config.tls.cert, &config.tls.key)?),
        Arc::new(opener),
        certificate,
        config.deadlines.broker(),
    );
    let transport = config.access_point.transport()?;
    let provider = config.provider_agent();
    let mut bridge = Bridge::new(transport, source, mapping, provider);
    if let Some(preview) = &config.preview {
        // Checked here, so that `check` finds a bad certificate too.
        onceonly_certs::tls::web_server_config(&preview.cert, &preview.key)?;
        bridge = bridge.with_preview(Arc::new(PreviewSpace::new(PreviewSettings {
            public_url: preview.public_url.clone(),
            reach_within: config.deadlines.t2,
            decide_within: config.deadlines.t3,
        })));
    }
    Ok((config, bridge))
}

/// Serves the preview pages where configured.
async fn serve_preview(
    config: &BridgeConfig,
    bridge: &Arc<Bridge<DomibusWs, BrokerSource>>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(preview) = &config.preview else {
        return Ok(None);
    };
    let tls = onceonly_certs::tls::web_server_config(&preview.cert, &preview.key)?;
    let listener = tokio::net::TcpListener::bind(preview.listen)
        .await
        .map_err(|e| anyhow::anyhow!("preview.listen {}: {e}", preview.listen))?;
    tracing::warn!(
        "the preview's sign-in is the TEST sign-in: anyone holding a code is that person; for tests and demonstrations only"
    );
    let sign_in = TestSignIn::with(preview.test_sign_in.iter().map(|identity| {
        (
            identity.code.clone(),
            Person {
                identifier: identity.identifier.clone(),
                level_of_assurance: identity.level_of_assurance,
            },
        )
    }));
    tracing::info!(listen = %preview.listen, public_url = %preview.public_url, "preview pages served");
    Ok(Some(onceonly_oots_bridge::pages::spawn(
        listener,
        tls,
        bridge.clone(),
        Arc::new(sign_in),
    )))
}

async fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    let (config, bridge) = prepare(path)?;
    let bridge = Arc::new(bridge);
    let pages = serve_preview(&config, &bridge).await?;
    tracing::info!(
        broker = %config.broker,
        access_point = %config.access_point.endpoint,
        "OOTS bridge polling"
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(config.access_point.poll_interval);
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    // A signal also ends a poll under way: a message retrieved and not yet
    // answered then goes unanswered, and its requester times out (T1) and
    // may ask again; waiting could hold a stop for the broker's deadline.
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = terminate.recv() => break,
            _ = &mut interrupt => break,
        }
        tokio::select! {
            polled = bridge.poll_once() => match polled {
                Ok(0) => {}
                Ok(answered) => tracing::info!(answered, "answered requests"),
                Err(error) => tracing::warn!(%error, "the access point could not be polled; trying again"),
            },
            _ = terminate.recv() => break,
            _ = &mut interrupt => break,
        }
    }
    if let Some(pages) = pages {
        pages.abort();
    }
    tracing::info!("OOTS bridge stopped");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "onceonly=info,onceonly_oots_bridge=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => serve(&config).await,
            Command::Check { config } => {
                prepare(&config).map(|_| println!("{}: ok", config.display()))
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
