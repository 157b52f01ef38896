//! Helpers the end-to-end tests share: a throw-away PKI, connectors started
//! on `127.0.0.1:0`, and gRPC channels presenting a chosen participant's
//! certificate over mutual TLS.

pub mod browser;
pub mod deployed;
pub mod otlp;
pub mod postgres;
pub mod probe;
pub mod replicas;
pub mod school;
pub mod world;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use onceonly_certs::tls::client_config;
use onceonly_certs::{MtlsConnector, Participant, Pki, Role};
use onceonly_connector_sdk::{Connector, ConnectorServer, RunningConnector};
use onceonly_proto::v1::connector_service_client::ConnectorServiceClient;
use onceonly_proto::v1::{
    DescribeConnectorRequest, DescribeConnectorResponse, ProvideEvidenceRequest,
    ProvideEvidenceResponse,
};
use onceonly_seal::{Signer, TicketClaims};
use tonic::transport::Channel;

/// The trust domain every test PKI uses.
pub const TRUST_DOMAIN: &str = "onceonly.test";

/// A fresh PKI with the broker and the given participants.
pub fn pki_with(participants: &[(Role, &str)]) -> onceonly_certs::pki::ThrowawayPki {
    Pki::throwaway(TRUST_DOMAIN, participants).expect("throw-away PKI")
}

/// Serves `router` over TLS (`config`) on a loopback port of its own until
/// the task is aborted: the address, and the task. For the stand-ins of
/// systems that are not ours (an HTTP API behind a register, an access
/// point's WS plugin).
pub async fn serve_router_tls(
    router: axum::Router,
    config: rustls::ServerConfig,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let router = router.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(
                    hyper_util::rt::TokioIo::new(tls),
                    hyper_util::service::TowerToHyperService::new(router),
                )
                .await;
            });
        }
    });
    (addr, task)
}

/// A loopback port free now, for a server a test starts as a process of
/// its own (PostgreSQL, chromedriver).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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

/// A ConnectorService client as (`role`, `id`) that, like the broker,
/// puts an authorization ticket on every request that carries none: signed
/// with the key of the PKI's broker certificate `broker`, for exactly that
/// request, addressed to the connector (whose id it asks the connector
/// once). Tests of the ticket checks set `authorization_ticket` themselves.
pub fn connector_client(pki: &Pki, role: Role, id: &str, addr: SocketAddr) -> TicketingClient {
    let (cert, key) = pki.participant_paths(Role::Broker, "broker");
    TicketingClient {
        inner: ConnectorServiceClient::new(channel_as(pki, role, id, addr, None)),
        signer: Arc::new(Signer::from_files(&cert, &key).expect("broker signer")),
        pki: pki.clone(),
        connector_id: None,
    }
}

/// See [`connector_client`]. The ticket it adds carries the request signed
/// by the requester, where the PKI holds the requester's certificate.
pub struct TicketingClient {
    inner: ConnectorServiceClient<Channel>,
    signer: Arc<Signer>,
    pki: Pki,
    connector_id: Option<String>,
}

/// The request `forwarded` as its requester, an authority of `pki` (issued
/// its certificate here where the PKI has none yet), would have signed it;
/// "" where the requester is not an authority's SPIFFE id.
pub fn signed_by_requester(pki: &Pki, forwarded: &ProvideEvidenceRequest) -> String {
    let Some(id) = forwarded
        .requester_id
        .rsplit_once("/authority/")
        .map(|(_, id)| id)
    else {
        return String::new();
    };
    let (cert, key) = pki.participant_paths(Role::Authority, id);
    if !cert.exists() {
        pki.issue(&onceonly_certs::IssueOptions::new(Role::Authority, id))
            .expect("the requester's certificate");
    }
    let signer = Signer::from_files(&cert, &key).expect("the requester's signer");
    onceonly_seal::RequestClaims::for_forwarded(
        forwarded,
        &forwarded.exchange_id,
        onceonly_seal::unix_now(),
        onceonly_seal::request::DEFAULT_LIFETIME,
    )
    .and_then(|claims| claims.sign(&signer))
    .expect("sign the request as the authority")
}

impl TicketingClient {
    /// ProvideEvidence, with a ticket where the request has none.
    pub async fn provide_evidence(
        &mut self,
        request: impl tonic::IntoRequest<ProvideEvidenceRequest>,
    ) -> Result<tonic::Response<ProvideEvidenceResponse>, tonic::Status> {
        let mut request = request.into_request();
        if request.get_ref().authorization_ticket.is_empty() {
            if self.connector_id.is_none() {
                // Refused for callers that are not the broker: those get no
                // ticket (they are refused before it is looked at).
                if let Ok(described) = self
                    .inner
                    .describe_connector(DescribeConnectorRequest {})
                    .await
                {
                    self.connector_id = Some(described.into_inner().connector_id);
                }
            }
            if let Some(connector_id) = &self.connector_id {
                let claims =
                    ticket_with_request(&self.pki, &self.signer, connector_id, request.get_ref());
                request.get_mut().authorization_ticket =
                    claims.sign(&self.signer).expect("sign ticket");
            }
        }
        self.inner.provide_evidence(request).await
    }

    /// DescribeConnector.
    pub async fn describe_connector(
        &mut self,
        request: impl tonic::IntoRequest<DescribeConnectorRequest>,
    ) -> Result<tonic::Response<DescribeConnectorResponse>, tonic::Status> {
        self.inner.describe_connector(request).await
    }
}

/// The ticket the broker (`signer`) would issue for `request` to connector
/// `connector_id`, valid for 60 s, with a fresh `jti`.
pub fn ticket_for(
    signer: &Signer,
    trust_domain: &str,
    connector_id: &str,
    request: &ProvideEvidenceRequest,
) -> String {
    ticket_claims(signer, trust_domain, connector_id, request)
        .sign(signer)
        .expect("sign ticket")
}

/// The claims of [`ticket_for`], to alter before signing: those the broker
/// issues ([`TicketClaims::for_request`]), addressed to the connector.
pub fn ticket_claims(
    signer: &Signer,
    trust_domain: &str,
    connector_id: &str,
    request: &ProvideEvidenceRequest,
) -> TicketClaims {
    let now = onceonly_seal::unix_now();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let serial = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    TicketClaims {
        aud: format!("spiffe://{trust_domain}/connector/{connector_id}"),
        jti: format!("test-{}-{serial}", std::process::id()),
        iat: now,
        exp: now + 60,
        ..TicketClaims::for_request(
            request,
            signer.participant().spiffe_id(),
            "test-rule".into(),
            String::new(),
        )
    }
}

/// [`ticket_claims`], carrying the request as its requester (an authority
/// of `pki`) signed it ([`signed_by_requester`]): a ticket a connector
/// answers.
pub fn ticket_with_request(
    pki: &Pki,
    signer: &Signer,
    connector_id: &str,
    request: &ProvideEvidenceRequest,
) -> TicketClaims {
    TicketClaims {
        req: signed_by_requester(pki, request),
        ..ticket_claims(signer, pki.trust_domain(), connector_id, request)
    }
}

/// Sends each of `refusals` (what, request, reason) to the connector and
/// asserts it is refused with PERMISSION_DENIED and that reason, and that
/// the probe register behind it (`counts`) never ran.
pub async fn assert_refused_before_the_register(
    client: &mut ConnectorServiceClient<Channel>,
    refusals: Vec<(
        &str,
        ProvideEvidenceRequest,
        onceonly_proto::v1::ErrorReason,
    )>,
    counts: &probe::ProbeCounts,
) {
    for (what, request, reason) in refusals {
        let status = client.provide_evidence(request).await.expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{what}: {status:?}"
        );
        assert_eq!(
            onceonly_proto::status::reason_of(&status),
            Some(reason),
            "{what}: {status:?}"
        );
    }
    assert_eq!(
        counts.started.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the register's code ran for a refused request"
    );
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

/// The HTTP status of `GET path` on a plain-HTTP listener (the admin
/// listener's `/ready`, as a load balancer's check sees it).
pub async fn http_status(addr: SocketAddr, path: &str) -> u16 {
    http_get(addr, path)
        .await
        .0
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// `GET path` on a plain-HTTP listener (the admin listener): the status
/// line and headers, and the body (a chunked one decoded).
pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin listener");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (head.to_owned(), body.to_owned());
    }
    let mut text = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        text.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    (head.to_owned(), text)
}

/// GET /metrics from an admin listener (broker or connector): the body,
/// after checking it is served as OpenMetrics text.
pub async fn scrape_metrics(addr: SocketAddr) -> String {
    let (head, body) = http_get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("openmetrics-text"),
        "{head}"
    );
    body
}

/// Asserts that `heads`, gathered in any order from any replicas, are one
/// history: each signed by `key`, one root per tree size, and each
/// consistent with the next larger one, as `auditor`'s consistency proofs
/// show (so every head is consistent with every later one).
pub async fn assert_one_history(
    auditor: &mut onceonly_proto::v1::audit_service_client::AuditServiceClient<
        tonic::transport::Channel,
    >,
    key: &[u8],
    mut heads: Vec<onceonly_merkle::sth::SignedTreeHead>,
) {
    heads.sort_by_key(|h| (h.tree_size, h.timestamp_ms));
    for pair in heads.windows(2) {
        let (older, newer) = (&pair[0], &pair[1]);
        older.verify(key).expect("signed by the audit key");
        if older.tree_size == newer.tree_size {
            assert_eq!(older.root_hash, newer.root_hash, "two trees of one size");
            continue;
        }
        let proof: Vec<onceonly_merkle::Hash> = auditor
            .get_consistency_proof(onceonly_proto::v1::GetConsistencyProofRequest {
                first_size: older.tree_size,
                second_size: newer.tree_size,
            })
            .await
            .expect("proof")
            .into_inner()
            .proof
            .into_iter()
            .map(|p| p.try_into().expect("32 bytes"))
            .collect();
        onceonly_merkle::verify_consistency(
            older.tree_size,
            newer.tree_size,
            &older.root_hash,
            &newer.root_hash,
            &proof,
        )
        .expect("every head extends the ones before");
    }
}

/// A binary of this build, beside the test's (`target/<profile>/`), which
/// `cargo test --workspace` builds; the message says how to build it where
/// it is missing.
pub fn binary(name: &str, package: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let binary = dir.join(name);
    assert!(
        binary.is_file(),
        "{} is missing: build it with `cargo build -p {package}` (cargo test --workspace does)",
        binary.display()
    );
    binary
}

/// Every audit record the broker shows the caller of `channel` (an
/// auditor sees them all), page by page.
pub async fn all_records(channel: Channel) -> Vec<onceonly_proto::v1::AuditRecord> {
    let mut auditor = onceonly_proto::v1::audit_service_client::AuditServiceClient::new(channel);
    let mut records = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = auditor
            .query_records(onceonly_proto::v1::QueryRecordsRequest {
                page_token: page_token.clone(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("the auditor queries")
            .into_inner();
        records.extend(page.records);
        if page.next_page_token.is_empty() {
            return records;
        }
        page_token = page.next_page_token;
    }
}

/// An EvidenceService client for one authority that signs every request
/// that carries no signature yet with the authority's certificate key, as
/// a real authority's client does ([`onceonly_seal::sign_request`]). Tests
/// of the signature checks set `signed_request` themselves, or use the
/// plain client.
#[derive(Clone)]
pub struct AuthorityClient {
    inner: onceonly_proto::v1::evidence_service_client::EvidenceServiceClient<Channel>,
    signer: Arc<Signer>,
}

impl AuthorityClient {
    /// A client on `channel` signing as the authority whose certificate
    /// and key `pki` holds.
    pub fn new(pki: &Pki, id: &str, channel: Channel) -> Self {
        let (cert, key) = pki.participant_paths(Role::Authority, id);
        AuthorityClient {
            inner: onceonly_proto::v1::evidence_service_client::EvidenceServiceClient::new(channel),
            signer: Arc::new(Signer::from_files(&cert, &key).expect("authority signer")),
        }
    }

    /// The authority's signer.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// RequestEvidence, signed where it is not yet.
    pub async fn request_evidence(
        &mut self,
        request: impl tonic::IntoRequest<onceonly_proto::v1::RequestEvidenceRequest>,
    ) -> Result<tonic::Response<onceonly_proto::v1::RequestEvidenceResponse>, tonic::Status> {
        self.request_signed(request).await.0
    }

    /// RequestEvidence, signed where it is not yet, with what the answer's
    /// statement must be bound to (None where the request came signed).
    pub async fn request_signed(
        &mut self,
        request: impl tonic::IntoRequest<onceonly_proto::v1::RequestEvidenceRequest>,
    ) -> (
        Result<tonic::Response<onceonly_proto::v1::RequestEvidenceResponse>, tonic::Status>,
        Option<onceonly_seal::SignedRequest>,
    ) {
        let mut request = request.into_request();
        let signed = if request.get_ref().signed_request.is_empty() {
            Some(
                onceonly_seal::sign_request(
                    request.get_mut(),
                    &self.signer,
                    onceonly_seal::request::DEFAULT_LIFETIME,
                )
                .expect("sign the request"),
            )
        } else {
            None
        };
        (self.inner.request_evidence(request).await, signed)
    }

    /// ListEvidenceTypes.
    pub async fn list_evidence_types(
        &mut self,
        request: impl tonic::IntoRequest<onceonly_proto::v1::ListEvidenceTypesRequest>,
    ) -> Result<tonic::Response<onceonly_proto::v1::ListEvidenceTypesResponse>, tonic::Status> {
        self.inner.list_evidence_types(request).await
    }
}
