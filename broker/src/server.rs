//! Starting the broker: load and check configuration, policy and routing,
//! open the data directory, bind, and serve the three services with health
//! and reflection over mutual TLS. SIGHUP reloads the policy and the TLS
//! files (certificates, CRL); the policy file is also watched for changes.
//! A broken policy edit is refused and logged; the old policy stays.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use onceonly_certs::config_file::ConfigFileError;
use onceonly_certs::connection::CallTracking;
use onceonly_certs::identity::CrlState;
use onceonly_certs::tls::{ReloadableClientTls, TlsError};
use onceonly_certs::{
    ClientAuth, ConnectionLimits, MtlsIncoming, Participant, ReloadableServerTls, Role,
};
use onceonly_proto::v1::audit_service_server::AuditServiceServer;
use onceonly_proto::v1::consent_service_server::ConsentServiceServer;
use onceonly_proto::v1::evidence_service_server::EvidenceServiceServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::audit::AuditError;
use crate::config::BrokerConfig;
use crate::exchange::Broker;
use crate::forward::Forwarder;
use crate::policy::PolicyStore;
use crate::routing::RoutingTable;
use crate::services::{AuditGrpc, ConsentGrpc, EvidenceGrpc};
use onceonly_seal::jws::SignerCell;

/// Evidence payloads pass through; the largest the broker relays.
const MAX_RESPONSE_MESSAGE: usize = 16 * 1024 * 1024;
/// How often the policy file is checked for changes.
const POLICY_POLL: Duration = Duration::from_secs(1);

/// Why the broker could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration, policy or routing file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigFileError),
    /// TLS material is unusable.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The broker's key cannot sign authorization tickets.
    #[error("{path}: cannot sign authorization tickets with this key: {reason}")]
    Signer {
        /// The key file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The certificate is not a broker's.
    #[error(
        "{path} is the certificate of {identity}, not of a broker (role broker); issue one with `onceonly-certs init`"
    )]
    NotABroker {
        /// The certificate file.
        path: String,
        /// Whose it is.
        identity: Participant,
    },
    /// The data directory or the pseudonym key could not be opened.
    #[error("{what}: {reason}")]
    Storage {
        /// What.
        what: String,
        /// Why.
        reason: String,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A key is missing or unusable.
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(String),
}

impl From<AuditError> for StartError {
    fn from(e: AuditError) -> Self {
        StartError::Storage {
            what: "audit log".into(),
            reason: e.to_string(),
        }
    }
}

impl From<crate::storage::OpenError> for StartError {
    fn from(e: crate::storage::OpenError) -> Self {
        StartError::Storage {
            what: e.what,
            reason: e.reason,
        }
    }
}

/// Loads the broker's TLS files for both its sides (callers and
/// connectors), checking that its certificate is a broker's: what `bind`
/// needs, and what `onceonly-broker check` tries.
pub fn load_tls(
    config: &BrokerConfig,
) -> Result<(Arc<ReloadableServerTls>, Arc<ReloadableClientTls>), StartError> {
    let server_tls = ReloadableServerTls::load_with(config.tls.clone(), ClientAuth::Deferred)?;
    let identity = server_tls.identity().clone();
    if identity.role() != Role::Broker {
        return Err(StartError::NotABroker {
            path: config.tls.cert.display().to_string(),
            identity,
        });
    }
    let client_tls = Arc::new(ReloadableClientTls::load(config.tls.clone())?);
    Ok((server_tls, client_tls))
}

/// A broker with everything loaded and its port bound.
pub struct BoundBroker {
    broker: Arc<Broker>,
    tls: Arc<ReloadableServerTls>,
    listener: TcpListener,
    local_addr: SocketAddr,
    identity: Participant,
    audit_writer: JoinHandle<()>,
    grace: Duration,
    /// How long NOT_SERVING is announced before draining.
    announce: Duration,
    connections: ConnectionLimits,
    max_request_message: usize,
    /// The admin listener (metrics), where enabled.
    admin: Option<(TcpListener, SocketAddr)>,
    /// The console's listener, where configured.
    console: Option<(TcpListener, SocketAddr)>,
    /// The audit log's public key, with which the console checks heads.
    audit_public_key: Vec<u8>,
}

impl BoundBroker {
    /// Loads `config` and binds its listen address.
    pub async fn bind(config: &BrokerConfig) -> Result<Self, StartError> {
        let routing = Arc::new(RoutingTable::load(&config.routing)?);
        let policy = Arc::new(PolicyStore::load(&config.policy, routing.clone())?);
        let (server_tls, client_tls) = load_tls(config)?;
        let identity = server_tls.identity().clone();
        let pseudonyms = Arc::new(crate::keys::load_checked_pseudonym_key(config)?);
        let audit_key = crate::keys::load_audit_key(&config.audit_key)?;
        let audit_public_key = ring::signature::KeyPair::public_key(&audit_key)
            .as_ref()
            .to_vec();
        let crate::storage::Opened {
            stores,
            writer: audit_writer,
            append_seed,
        } = crate::storage::open(config, audit_key, &pseudonyms).await?;
        let revocations = crate::revocations::start(&stores.audit, audit_public_key.clone())
            .await
            .map_err(|e| StartError::Storage {
                what: "the audit log (reading consent revocations)".into(),
                reason: e.to_string(),
            })?;
        let signer = SignerCell::load(&config.tls.cert, &config.tls.key, server_tls.generation())
            .map_err(|e| StartError::Signer {
            path: config.tls.key.display().to_string(),
            reason: e.to_string(),
        })?;
        let broker = Arc::new(Broker::from_parts(crate::exchange::BrokerParts {
            routing,
            policy,
            stores,
            revocations,
            pseudonyms,
            forwarder: Forwarder::new(client_tls, identity.trust_domain(), config.circuit.clone()),
            tls: server_tls.clone(),
            signer,
            limits: config.limits.clone(),
            idempotency: config.idempotency.clone(),
            append_seed,
        }));
        // The policy in force at start is the first entry of this run's
        // policy history, written before anything is served.
        broker.policy.keep_history(
            &config.data_dir.join(crate::policy_log::FOLDER),
            "the broker's start",
        )?;
        crate::policy_log::write_pending(&broker)
            .await
            .map_err(|e| StartError::Storage {
                what: "the audit log (the policy's entry)".into(),
                reason: e.to_string(),
            })?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let admin = match config.admin.enabled {
            true => Some(bind_extra(config.admin.listen).await?),
            false => None,
        };
        let console = match config.console.listen {
            Some(addr) => Some(bind_extra(addr).await?),
            None => None,
        };
        Ok(BoundBroker {
            broker,
            tls: server_tls,
            listener,
            local_addr,
            identity,
            audit_writer,
            admin,
            console,
            audit_public_key,
            grace: config.shutdown_grace,
            announce: config.shutdown_announce,
            connections: config.connections.clone(),
            max_request_message: usize::try_from(config.limits.max_request_message.as_u64())
                .unwrap_or(usize::MAX),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address (metrics), where enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, addr)| *addr)
    }

    /// The console's address, where configured.
    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.console.as_ref().map(|(_, addr)| *addr)
    }

    /// The broker's identity.
    pub fn identity(&self) -> &Participant {
        &self.identity
    }

    /// The shared state (policy, audit log, ...).
    pub fn broker(&self) -> Arc<Broker> {
        self.broker.clone()
    }

    /// Serves until `shutdown` completes, then drains exchanges in flight
    /// (at most the grace period) and closes the data directory.
    pub async fn serve_with_shutdown(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        self.serve_until(shutdown, false).await
    }

    /// Serves until Ctrl-C or SIGTERM; SIGHUP reloads policy and TLS.
    pub async fn serve(self) -> Result<(), StartError> {
        self.serve_until_stopped(onceonly_certs::serve::terminate_signal())
            .await
    }

    /// Serves until `stop` completes (give it
    /// `onceonly_certs::serve::terminate_signal()` made before the process
    /// says it is ready); SIGHUP reloads policy and TLS.
    pub async fn serve_until_stopped(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        self.serve_until(stop, true).await
    }

    async fn serve_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        reload_on_sighup: bool,
    ) -> Result<(), StartError> {
        let BoundBroker {
            broker,
            tls,
            listener,
            local_addr,
            identity,
            audit_writer,
            grace,
            announce,
            connections,
            max_request_message,
            admin,
            console,
            audit_public_key,
        } = self;
        let console_task = console.map(|(listener, addr)| {
            tracing::info!(%addr, "console on https://{addr}/ (client certificate required)");
            crate::console::spawn(
                listener,
                tls.clone(),
                connections.clone(),
                broker.clone(),
                audit_public_key,
            )
        });
        let admin_task = admin.map(|(listener, addr)| {
            let registry = Arc::new(crate::admin::registry(&broker, tls.clone()));
            tracing::info!(%addr, "metrics on http://{addr}/metrics, readiness on /ready");
            tokio::spawn(onceonly_proto::telemetry::serve_admin(
                listener,
                registry,
                Some(broker.ready.clone()),
            ))
        });
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<EvidenceServiceServer<EvidenceGrpc>>()
            .await;
        health_reporter
            .set_serving::<ConsentServiceServer<ConsentGrpc>>()
            .await;
        health_reporter
            .set_serving::<AuditServiceServer<AuditGrpc>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(onceonly_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Serve(e.to_string()))?;
        // Every task started here is stopped below, and holds the broker
        // only weakly or until aborted: the audit writer ends only when
        // its last handle is gone, and the process with it.
        let sighup = reload_on_sighup.then(|| spawn_sighup_reload(&broker, tls.clone()));
        let watcher = tokio::spawn(watch_policy(broker.policy.clone()));
        let policy_entries = tokio::spawn(crate::policy_log::keep_writing(broker.clone()));
        let health_checker = tokio::spawn(check_connectors(broker.clone()));
        let crl_watcher = tokio::spawn(watch_readiness(
            tls.clone(),
            broker.clone(),
            health_reporter.clone(),
        ));
        let stop_crl_watcher = crl_watcher.abort_handle();
        let expiry_closer =
            tokio::spawn(onceonly_certs::tls::close_on_expiry(Arc::downgrade(&tls)));

        let (drain_started, drain_signal) = oneshot::channel::<()>();
        let shutting_down = broker.ready.clone();
        let signal = async move {
            shutdown.await;
            stop_crl_watcher.abort();
            set_all(&health_reporter, false).await;
            shutting_down.store(false, std::sync::atomic::Ordering::Relaxed);
            if !announce.is_zero() {
                // Health says NOT_SERVING while the broker still serves, so
                // load balancers move new traffic away before it stops
                // accepting.
                tracing::info!(
                    ?announce,
                    "broker shutting down; NOT_SERVING announced, still serving"
                );
                tokio::time::sleep(announce).await;
            }
            tracing::info!("broker shutting down; draining exchanges in flight");
            let _ = drain_started.send(());
        };
        tracing::info!(addr = %local_addr, identity = %identity, "broker serving");
        // Boxed so it can be dropped (with the services' handles on the
        // broker) before waiting for the audit writer below.
        // Health and reflection answer participants of the trust domain
        // only, as the three services do: a client whose certificate was
        // refused (a foreign CA, revoked, expired) learns nothing of the
        // broker, not even that it serves. Load balancers ask /ready on
        // the admin listener.
        let health = tonic::service::interceptor::InterceptedService::new(
            health.max_decoding_message_size(max_request_message),
            participants_only(broker.security.clone()),
        );
        let reflection = tonic::service::interceptor::InterceptedService::new(
            reflection.max_decoding_message_size(max_request_message),
            participants_only(broker.security.clone()),
        );
        let open_connections = tls.clone();
        let incoming =
            MtlsIncoming::with_events(listener, tls, connections.clone(), broker.security.clone());
        let mut serving = Box::pin(
            connections
                .apply(tonic::transport::Server::builder())
                .layer(CallTracking)
                .add_service(health)
                .add_service(reflection)
                .add_service(
                    EvidenceServiceServer::new(EvidenceGrpc(broker.clone()))
                        .max_decoding_message_size(max_request_message)
                        .max_encoding_message_size(MAX_RESPONSE_MESSAGE),
                )
                .add_service(
                    ConsentServiceServer::new(ConsentGrpc(broker.clone()))
                        .max_decoding_message_size(max_request_message),
                )
                .add_service(
                    AuditServiceServer::new(AuditGrpc(broker.clone()))
                        .max_decoding_message_size(max_request_message),
                )
                .serve_with_incoming_shutdown(incoming, signal),
        );
        let result = tokio::select! {
            result = &mut serving => result.map_err(|e| StartError::Serve(e.to_string())),
            () = async {
                let _ = drain_signal.await;
                tokio::time::sleep(grace).await;
            } => {
                // Ending the connections cancels the calls still on them:
                // their exchanges record themselves as cancelled and end,
                // and with them the last handles on the audit log.
                let cut = open_connections.shut_down_all();
                tracing::warn!(?grace, connections = cut, "exchanges still in flight after the grace period; their connections are closed, the exchanges recorded as cancelled");
                Ok(())
            }
        };
        drop(sighup);
        for task in [
            &watcher,
            &crl_watcher,
            &health_checker,
            &expiry_closer,
            &policy_entries,
        ] {
            task.abort();
        }
        for task in admin_task.iter().chain(&console_task) {
            task.abort();
        }
        drop(serving);
        // Aborted tasks drop their futures (and handles on the broker) at
        // their next poll; wait for that, so that only exchanges still
        // writing their records hold the broker now.
        for task in [
            watcher,
            crl_watcher,
            health_checker,
            expiry_closer,
            policy_entries,
        ]
        .into_iter()
        .chain(admin_task)
        .chain(console_task)
        {
            let _ = task.await;
        }
        // A policy put in force whose entry the stopped task had not
        // written yet is written now, before the log closes.
        if let Err(error) = crate::policy_log::write_pending(&broker).await {
            tracing::error!(%error, "the last policy's log entry could not be written");
        }
        // The audit writer ends once the last handle to the log is gone;
        // waiting for it means every batch is flushed and the data
        // directory closed before we return. Exchanges cut off by the
        // grace period write their (cancelled) records first; past that,
        // something holds the log that should not, and waiting longer
        // would turn a stop into a SIGKILL.
        let holders = Arc::strong_count(&broker) - 1;
        drop(broker);
        if tokio::time::timeout(WRITER_PATIENCE, audit_writer)
            .await
            .is_err()
        {
            // Not aborted: the embedded writer is a blocking thread, which
            // the runtime's shutdown gives a last moment; what it has not
            // flushed nobody was answered for.
            tracing::error!(
                exchanges_or_tasks_holding_the_broker = holders,
                patience = ?WRITER_PATIENCE,
                "the audit log did not close after the drain (exchanges still writing, or the database slow); stopping without waiting for it: every answered request's record is already durable"
            );
        }
        result
    }

    /// Serves in the background; the handle stops it.
    pub fn spawn(self) -> RunningBroker {
        let local_addr = self.local_addr;
        let admin_addr = self.admin_addr();
        let console_addr = self.console_addr();
        let tls = self.tls.clone();
        let broker = Arc::downgrade(&self.broker);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(self.serve_with_shutdown(async move {
            let _ = stopped.await;
        }));
        RunningBroker {
            local_addr,
            admin_addr,
            console_addr,
            tls,
            broker,
            stop: Some(stop),
            task,
        }
    }
}

/// Binds a listener beside the API's (admin, console).
async fn bind_extra(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok((listener, bound))
}

/// A broker serving in the background (tests, the demo).
pub struct RunningBroker {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    console_addr: Option<SocketAddr>,
    tls: Arc<ReloadableServerTls>,
    broker: std::sync::Weak<Broker>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), StartError>>,
}

impl RunningBroker {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address (metrics), where enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The console's address, where configured.
    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.console_addr
    }

    /// The server TLS configuration.
    pub fn tls(&self) -> &ReloadableServerTls {
        &self.tls
    }

    /// Reloads certificates and the CRL on both sides, as SIGHUP does;
    /// returns how many open connections were closed.
    pub fn reload_tls(&self) -> Result<usize, StartError> {
        let broker = self
            .broker()
            .ok_or_else(|| StartError::Serve("the broker has stopped".into()))?;
        Ok(reload_tls(&broker, &self.tls)?)
    }

    /// The shared state while serving.
    pub fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.upgrade()
    }

    /// Stops, drains, flushes and closes the data directory.
    pub async fn shutdown(mut self) -> Result<(), StartError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(StartError::Serve(format!("server task failed: {e}"))),
        }
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

/// Reloads the policy when its file changes (modification time or size).
async fn watch_policy(policy: Arc<PolicyStore>) {
    let stamp = |path: &std::path::Path| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut last = stamp(policy.path());
    loop {
        tokio::time::sleep(POLICY_POLL).await;
        let now = stamp(policy.path());
        if now != last {
            last = now;
            match policy.reload_if_changed("a change of the policy file") {
                Ok(Some(rules)) => {
                    tracing::info!(rules, file = %policy.path().display(), "policy reloaded")
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(%error, "policy NOT reloaded; the previous policy stays in force")
                }
            }
        }
    }
}

fn reload_policy(policy: &PolicyStore, by: &str) {
    match policy.reload_by(by) {
        Ok(rules) => tracing::info!(rules, file = %policy.path().display(), "policy reloaded"),
        Err(error) => {
            tracing::error!(%error, "policy NOT reloaded; the previous policy stays in force")
        }
    }
}

/// Reloads certificates and the CRL on both sides: the server's (open
/// connections whose peer no longer verifies are closed) and the client's
/// towards connectors (channels are opened again under the new list).
pub fn reload_tls(broker: &Broker, tls: &ReloadableServerTls) -> Result<usize, TlsError> {
    // Both sides load, or neither changes: a broker must never check its
    // callers against one list and its connectors against another.
    let server = tls.prepare()?;
    let client = broker.forwarder.tls().prepare()?;
    broker.forwarder.tls().install(client);
    let closed = tls.install(server);
    tracing::info!(closed, "TLS certificates and CRL reloaded");
    Ok(closed)
}

/// How long a stopping broker waits for its audit log to close once the
/// drain is over: the longest an exchange cut off by the grace period takes
/// to write its record is a register call's cancellation and one append.
const WRITER_PATIENCE: Duration = Duration::from_secs(10);

/// Reloads policy and TLS on SIGHUP while the guard lives. It holds the
/// broker weakly: a handler that kept it alive kept the audit writer, and
/// so the process, from ever ending (issue 21).
fn spawn_sighup_reload(
    broker: &Arc<Broker>,
    tls: Arc<ReloadableServerTls>,
) -> onceonly_certs::serve::SighupGuard {
    let broker = Arc::downgrade(broker);
    onceonly_certs::serve::on_sighup(move || {
        let Some(broker) = broker.upgrade() else {
            return;
        };
        reload_policy(&broker.policy, "SIGHUP");
        if let Err(error) = reload_tls(&broker, &tls) {
            tracing::error!(%error, "TLS NOT (fully) reloaded; the previous configuration stays");
        }
    })
}

/// An interceptor that lets through only calls of a verified participant:
/// any other is refused as the services refuse it (UNAUTHENTICATED with
/// the certificate's reason) and counted in `security`. One exception: a
/// certificate of the trust domain refused only because the broker's own
/// revocation list is stale, so its holder learns from health that the
/// broker is NOT_SERVING (the cause is the broker's, not the caller's).
fn participants_only(
    security: Arc<onceonly_certs::security::SecurityEvents>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    use onceonly_certs::security::RefusalKind;
    move |request: tonic::Request<()>| match onceonly_certs::tls::peer_identity(&request) {
        Ok(_) => Ok(request),
        Err(refusal) if refusal.kind == RefusalKind::CrlStale => Ok(request),
        Err(refusal) => {
            security.call_refused(refusal.kind);
            Err(crate::refusal::ServiceRefusal::Unauthenticated(refusal.reason).status())
        }
    }
}

/// Checks every connector endpoint's health every `circuit.health_interval`
/// ([`crate::circuit`]).
async fn check_connectors(broker: Arc<Broker>) {
    let interval = broker.forwarder.circuits().config().health_interval;
    loop {
        tokio::time::sleep(interval).await;
        broker.forwarder.check_health(&broker.routing).await;
    }
}

/// How often readiness (the audit log, the revocation list's freshness) is
/// checked.
const READINESS_CHECK: Duration = Duration::from_millis(250);

/// Keeps readiness (gRPC health) true to what the broker can do: NOT_SERVING
/// while the audit log refuses appends (no record, no evidence) and, where
/// configured to refuse, while the revocation list is stale; SERVING again
/// when the cause is gone. A list gone stale by the clock also makes what
/// was verified before be verified again.
async fn watch_readiness(
    tls: Arc<ReloadableServerTls>,
    broker: Arc<Broker>,
    health: tonic_health::server::HealthReporter,
) {
    let mut last_crl: Option<CrlState> = None;
    let mut serving: Option<bool> = None;
    loop {
        let state = tls.crl_state();
        let changed = match (&last_crl, &state) {
            (Some(CrlState::Stale { .. }), CrlState::Stale { .. }) => false,
            (Some(a), b) => std::mem::discriminant(a) != std::mem::discriminant(b),
            (None, _) => true,
        };
        if changed {
            match state {
                CrlState::Stale {
                    next_update,
                    refusing: true,
                } => {
                    tracing::error!(
                        next_update,
                        "the revocation list is stale: every caller is refused until a fresh one is published and loaded (SIGHUP)"
                    );
                    // Gone stale by the clock: what was verified before is
                    // verified again, on both sides.
                    tls.reverify();
                    broker.forwarder.tls().install_again();
                }
                CrlState::RolledBack => {
                    tracing::error!(
                        "the revocation list is older than one accepted before: every caller is refused until a newer one is loaded (SIGHUP)"
                    );
                }
                CrlState::Stale { next_update, .. } => {
                    tracing::warn!(
                        next_update,
                        "the revocation list is stale; serving on (tls.crl_stale = \"warn\")"
                    );
                }
                CrlState::Fresh { .. } | CrlState::None => {}
            }
        }
        let crl_refusing = matches!(
            state,
            CrlState::Stale { refusing: true, .. } | CrlState::RolledBack
        );
        let audit_refusing = broker.audit.refusing();
        let ready = !crl_refusing && audit_refusing.is_none();
        if serving != Some(ready) {
            if let Some(reason) = &audit_refusing {
                tracing::error!(%reason, "not serving: the audit log refuses appends");
            } else if serving == Some(false) && ready {
                tracing::info!("serving again");
            }
            set_all(&health, ready).await;
            broker
                .ready
                .store(ready, std::sync::atomic::Ordering::Relaxed);
            serving = Some(ready);
        }
        last_crl = Some(state);
        tokio::time::sleep(READINESS_CHECK).await;
    }
}

async fn set_all(health: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    health
        .set_service_status(
            "",
            if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            },
        )
        .await;
    if serving {
        health
            .set_serving::<EvidenceServiceServer<EvidenceGrpc>>()
            .await;
        health
            .set_serving::<ConsentServiceServer<ConsentGrpc>>()
            .await;
        health.set_serving::<AuditServiceServer<AuditGrpc>>().await;
    } else {
        health
            .set_not_serving::<EvidenceServiceServer<EvidenceGrpc>>()
            .await;
        health
            .set_not_serving::<ConsentServiceServer<ConsentGrpc>>()
            .await;
        health
            .set_not_serving::<AuditServiceServer<AuditGrpc>>()
            .await;
    }
}
