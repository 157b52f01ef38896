//! Running a connector: bind, serve over mutual TLS with health and
//! reflection, reload certificates and the CRL on SIGHUP, and shut down
//! gracefully (health says NOT_SERVING, no new connections, requests in
//! flight finish within the grace period).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use onceonly_certs::connection::CallTracking;
use onceonly_certs::tls::TlsError;
use onceonly_certs::{MtlsIncoming, Participant, ReloadableServerTls, TlsFiles};
use onceonly_proto::v1::connector_service_server::ConnectorServiceServer;
use onceonly_seal::jws::SignerCell;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::ConnectorConfig;
use crate::connector::Connector;
use crate::service::{ConnectorGrpc, ServiceLimits};

/// Request messages are small (ids and short texts); anything larger is
/// refused by the gRPC layer with RESOURCE_EXHAUSTED.
const MAX_REQUEST_MESSAGE: usize = 64 * 1024;

/// Why a connector could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The certificate, key, CA or CRL is unusable.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The connector's certificate is not a connector's.
    #[error(
        "the certificate {path} is {identity}, which is not a connector identity (role connector); issue one with `onceonly-certs issue --role connector --id <id>`"
    )]
    NotAConnector {
        /// The certificate.
        path: String,
        /// Whose it is.
        identity: Participant,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The connector's key cannot sign evidence statements.
    #[error("{path}: cannot sign evidence with this key: {reason}")]
    Signer {
        /// The key file.
        path: String,
        /// Why.
        reason: String,
    },
    /// No `allowed_broker_id`: the connector would answer any broker.
    #[error(
        "no allowed_broker_id is set: a connector answers exactly one broker; set allowed_broker_id in its configuration (or call .allowed_broker(id))"
    )]
    NoAllowedBroker,
    /// Server reflection could not be set up.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A connector server, configured; [`ConnectorServer::bind`] starts it.
pub struct ConnectorServer<C> {
    connector: Arc<C>,
    config: ConnectorConfig,
}

impl<C: Connector> ConnectorServer<C> {
    /// A server for `connector` with `config` (e.g. from
    /// [`ConnectorConfig::load`]).
    pub fn new(connector: C, config: ConnectorConfig) -> Self {
        ConnectorServer {
            connector: Arc::new(connector),
            config,
        }
    }

    /// A server with defaults around `tls`; adjust with the builder methods.
    pub fn builder(connector: C, tls: TlsFiles) -> Self {
        Self::new(connector, ConnectorConfig::new(tls))
    }

    /// Listen here (default 127.0.0.1:7101; port 0 picks a free one).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.config.listen = addr;
        self
    }

    /// Accept only the broker with this id (required).
    pub fn allowed_broker(mut self, broker_id: impl Into<String>) -> Self {
        self.config.allowed_broker_id = Some(broker_id.into());
        self
    }

    /// Release these evidence types only encrypted to the requester (see
    /// [`ConnectorConfig::encryption_required_for`]).
    pub fn require_encryption_for(mut self, evidence_types: &[&str]) -> Self {
        self.config.encryption_required_for =
            evidence_types.iter().map(|t| (*t).to_owned()).collect();
        self
    }

    /// Answer these authorities' tickets without their signed request (see
    /// [`ConnectorConfig::accept_unsigned_from`]).
    pub fn accept_unsigned_from(mut self, authorities: &[&str]) -> Self {
        self.config.accept_unsigned_from = authorities.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// Serve metrics on `addr` (see [`ConnectorConfig::admin_listen`]).
    pub fn admin_listen(mut self, addr: SocketAddr) -> Self {
        self.config.admin_listen = Some(addr);
        self
    }

    /// Requests in the register at once (default 256).
    pub fn concurrency(mut self, limit: usize) -> Self {
        self.config.limits.concurrency = limit;
        self
    }

    /// Cap on any request's time (default 30 s).
    pub fn max_request_time(mut self, limit: Duration) -> Self {
        self.config.limits.max_request_time = limit;
        self
    }

    /// Loads TLS and binds the listener; the returned server knows its
    /// address and identity before it serves.
    pub async fn bind(self) -> Result<BoundConnector<C>, ServeError> {
        if self.config.allowed_broker_id.is_none() {
            return Err(ServeError::NoAllowedBroker);
        }
        let tls = ReloadableServerTls::load(self.config.tls.clone())?;
        let identity = tls.identity().clone();
        let signer = SignerCell::load(
            &self.config.tls.cert,
            &self.config.tls.key,
            tls.generation(),
        )
        .map_err(|e| ServeError::Signer {
            path: self.config.tls.key.display().to_string(),
            reason: e.to_string(),
        })?;
        if identity.role() != onceonly_certs::Role::Connector {
            return Err(ServeError::NotAConnector {
                path: self.config.tls.cert.display().to_string(),
                identity,
            });
        }
        let listener = TcpListener::bind(self.config.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: self.config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: self.config.listen,
            source,
        })?;
        let admin = match self.config.admin_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::Bind { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| ServeError::Bind { addr, source })?;
                Some((listener, bound))
            }
            None => None,
        };
        Ok(BoundConnector {
            server: self,
            tls,
            signer,
            admin,
            listener,
            local_addr,
            identity,
        })
    }
}

/// A connector bound to its address, ready to serve.
pub struct BoundConnector<C> {
    server: ConnectorServer<C>,
    tls: Arc<ReloadableServerTls>,
    signer: SignerCell,
    admin: Option<(TcpListener, SocketAddr)>,
    listener: TcpListener,
    local_addr: SocketAddr,
    identity: Participant,
}

impl<C: Connector> BoundConnector<C> {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Its identity, from its certificate.
    pub fn identity(&self) -> &Participant {
        &self.identity
    }

    /// The admin listener's address (metrics), where configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, addr)| *addr)
    }

    /// The TLS configuration; `reload()` picks up new certificates and CRLs.
    pub fn tls(&self) -> Arc<ReloadableServerTls> {
        self.tls.clone()
    }

    /// Serves until `shutdown` completes, then drains requests in flight
    /// (for at most the configured grace period).
    pub async fn serve_with_shutdown(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let config = &self.server.config;
        let grpc = ConnectorGrpc::new(
            self.server.connector.clone(),
            &self.identity,
            config.allowed_broker_id.clone().unwrap_or_default(),
            ServiceLimits {
                concurrency: config.limits.concurrency,
                max_request_time: config.limits.max_request_time,
                max_payload_size: usize::try_from(config.limits.max_payload_size.as_u64())
                    .unwrap_or(usize::MAX),
                encryption_required_for: config.encryption_required_for.clone(),
                accept_unsigned_from: config.accept_unsigned_from.clone(),
            },
            self.tls.clone(),
            self.signer,
        );
        let admin_task = self.admin.map(|(listener, addr)| {
            tracing::info!(%addr, "connector metrics on http://{addr}/metrics");
            let mut registry = grpc.metrics().registry();
            registry.register_collector(Box::new(onceonly_certs::metrics::TlsLifetimes::new(
                self.tls.clone(),
                "connector",
            )));
            tokio::spawn(onceonly_proto::telemetry::serve_metrics(
                listener,
                Arc::new(registry),
            ))
        });
        let max_response = usize::try_from(config.limits.max_payload_size.as_u64())
            .unwrap_or(usize::MAX)
            .saturating_add(MAX_REQUEST_MESSAGE);
        let service = ConnectorServiceServer::new(grpc)
            .max_decoding_message_size(MAX_REQUEST_MESSAGE)
            .max_encoding_message_size(max_response);

        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<ConnectorServiceServer<ConnectorGrpc<C>>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(onceonly_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;

        tracing::info!(
            addr = %self.local_addr,
            identity = %self.identity,
            "connector serving"
        );
        let health = health.max_decoding_message_size(MAX_REQUEST_MESSAGE);
        let reflection = reflection.max_decoding_message_size(MAX_REQUEST_MESSAGE);
        let incoming =
            MtlsIncoming::new(self.listener, self.tls.clone(), config.connections.clone());
        let expiry_closer = tokio::spawn(onceonly_certs::tls::close_on_expiry(Arc::downgrade(
            &self.tls,
        )));
        let grace = config.shutdown_grace;
        let (drain_started, drain_signal) = oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            health_reporter
                .set_not_serving::<ConnectorServiceServer<ConnectorGrpc<C>>>()
                .await;
            tracing::info!("connector shutting down; draining requests in flight");
            let _ = drain_started.send(());
        };
        let serving = config
            .connections
            .apply(tonic::transport::Server::builder())
            .layer(CallTracking)
            .add_service(health)
            .add_service(reflection)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, signal);
        tokio::pin!(serving);
        tokio::select! {
            result = &mut serving => result?,
            () = async {
                let _ = drain_signal.await;
                tokio::time::sleep(grace).await;
            } => {
                // Their connections end, and the lookups on them with them.
                let cut = self.tls.shut_down_all();
                tracing::warn!(?grace, connections = cut, "requests still in flight after the grace period; their connections are closed");
            }
        }
        expiry_closer.abort();
        if let Some(admin) = admin_task {
            admin.abort();
        }
        Ok(())
    }

    /// Serves until Ctrl-C or SIGTERM; reloads TLS files on SIGHUP.
    pub async fn serve(self) -> Result<(), ServeError> {
        self.serve_until(onceonly_certs::serve::terminate_signal())
            .await
    }

    /// Serves until `stop` completes (give it
    /// `onceonly_certs::serve::terminate_signal()` made before the process
    /// says it is ready); reloads TLS files on SIGHUP.
    pub async fn serve_until(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let _sighup = spawn_sighup_reload(self.tls.clone());
        self.serve_with_shutdown(stop).await
    }

    /// Serves in a background task; the handle stops it.
    pub fn spawn(self) -> RunningConnector {
        let local_addr = self.local_addr;
        let admin_addr = self.admin_addr();
        let identity = self.identity.clone();
        let tls = self.tls.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(self.serve_with_shutdown(async move {
            let _ = stopped.await;
        }));
        RunningConnector {
            local_addr,
            admin_addr,
            identity,
            tls,
            stop: Some(stop),
            task,
        }
    }
}

/// A connector serving in the background.
pub struct RunningConnector {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    identity: Participant,
    tls: Arc<ReloadableServerTls>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningConnector {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address (metrics), where configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Its identity.
    pub fn identity(&self) -> &Participant {
        &self.identity
    }

    /// Its TLS configuration (call `reload()` after revoking a certificate).
    pub fn tls(&self) -> &ReloadableServerTls {
        &self.tls
    }

    /// Stops accepting, drains requests in flight, and waits for the end.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(join_error) => Err(ServeError::Reflection(format!(
                "server task failed: {join_error}"
            ))),
        }
    }
}

impl Drop for RunningConnector {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

/// Reloads the TLS files on every SIGHUP, while the guard lives; a failed
/// reload keeps the old ones.
pub fn spawn_sighup_reload(tls: Arc<ReloadableServerTls>) -> onceonly_certs::serve::SighupGuard {
    onceonly_certs::serve::on_sighup(move || match tls.reload() {
        Ok(closed) => tracing::info!(
            closed,
            "TLS certificates and CRL reloaded; connections whose peer no longer verifies closed"
        ),
        Err(error) => {
            tracing::error!(%error, "TLS reload failed; keeping the previous configuration")
        }
    })
}
