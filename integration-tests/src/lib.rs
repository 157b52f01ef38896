//! Helpers the end-to-end tests share: a throw-away PKI, connectors started
//! on `127.0.0.1:0`, and gRPC channels presenting a chosen participant's
//! certificate over mutual TLS.

pub mod probe;
pub mod world;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use onceonly_certs::tls::client_config;
use onceonly_certs::{MtlsConnector, Participant, Pki, Role};
use onceonly_connector_sdk::{Connector, ConnectorServer, RunningConnector};
use onceonly_proto::v1::connector_service_client::ConnectorServiceClient;
use tonic::transport::Channel;

/// The trust domain every test PKI uses.
pub const TRUST_DOMAIN: &str = "onceonly.test";

/// A fresh PKI with the broker and the given participants.
pub fn pki_with(participants: &[(Role, &str)]) -> onceonly_certs::pki::ThrowawayPki {
    Pki::throwaway(TRUST_DOMAIN, participants).expect("throw-away PKI")
}

/// Starts `connector` with the certificate of connector `id` on a free
/// loopback port.
pub async fn start_connector<C: Connector>(pki: &Pki, id: &str, connector: C) -> RunningConnector {
    ConnectorServer::builder(connector, pki.tls_files(Role::Connector, id))
        .allowed_broker("broker")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .bind()
        .await
        .expect("connector binds")
        .spawn()
}

/// A channel to `addr` presenting participant (`role`, `id`)'s certificate,
/// expecting the server to be `expected_server` where given.
pub fn channel_as(
    pki: &Pki,
    role: Role,
    id: &str,
    addr: SocketAddr,
    expected_server: Option<Participant>,
) -> Channel {
    let (config, _) = client_config(&pki.tls_files(role, id)).expect("client TLS config");
    channel_with(config, addr, expected_server)
}

/// A channel with an arbitrary client TLS configuration.
pub fn channel_with(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    expected_server: Option<Participant>,
) -> Channel {
    MtlsConnector::new(config, expected_server)
        .channel(&addr.to_string(), Duration::from_secs(5))
        .expect("channel")
}

/// A ConnectorService client as (`role`, `id`).
pub fn connector_client(
    pki: &Pki,
    role: Role,
    id: &str,
    addr: SocketAddr,
) -> ConnectorServiceClient<Channel> {
    ConnectorServiceClient::new(channel_as(pki, role, id, addr, None))
}

/// A client TLS configuration that trusts the PKI's CA but presents no
/// certificate.
pub fn anonymous_client_config(pki: &Pki) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in onceonly_certs::pki::load_certs(&pki.ca_cert_path()).expect("ca") {
        roots.add(ca).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A channel whose TCP connections the test can cut from outside, as a
/// client that vanishes mid-request would (`shutdown` on the socket: the
/// server reads end of stream).
pub struct CuttableChannel {
    /// The channel.
    pub channel: Channel,
    sockets: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl CuttableChannel {
    /// Cuts every connection the channel opened.
    pub fn cut(&self) {
        for socket in self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A channel to `addr` with `config` whose connections [`CuttableChannel::cut`]
/// can cut.
pub fn cuttable_channel(config: Arc<rustls::ClientConfig>, addr: SocketAddr) -> CuttableChannel {
    use std::os::fd::AsFd;
    let sockets: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Arc::default();
    let kept = sockets.clone();
    let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let config = config.clone();
        let kept = kept.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let handle = tcp.as_fd().try_clone_to_owned()?;
            kept.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(std::net::TcpStream::from(handle));
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
                .map_err(std::io::Error::other)?
                .to_owned();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_with_connector_lazy(connector);
    CuttableChannel { channel, sockets }
}
