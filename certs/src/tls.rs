//! Mutual TLS 1.3 for every hop, with rustls.
//!
//! tonic's built-in TLS cannot check revocation lists or reload
//! certificates, so servers here accept TCP themselves, run the rustls
//! handshake with an [`IdentityVerifier`] (chain, validity, CRL and SPIFFE id
//! in one), and hand tonic finished streams through `serve_with_incoming`.
//! Each stream carries the peer's verified [`PeerIdentity`], which handlers
//! read from the request extensions ([`peer_identity`]).
//!
//! Clients connect with [`MtlsConnector`], which presents the client
//! certificate and, beyond the usual server-name check, insists that the
//! server's SPIFFE id is the one expected: a connector presenting another
//! connector's certificate is refused before any request is sent.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;

use crate::connection::{
    ConnectionGate, ConnectionLimits, ConnectionSlot, ConnectionState, GateRefusal,
};
use crate::identity::{CrlState, IdentityError, IdentityVerifier, Participant, explain_tls_error};
use crate::pki::{
    CrlStalePolicy, PkiError, TlsFiles, check_crl_issuer, check_crl_number, load_certs, load_crl,
    parse_revocation_list,
};
use crate::security::{RefusalKind, SecurityEvents};

/// The ALPN protocol gRPC runs on.
const ALPN_H2: &[u8] = b"h2";

/// What can go wrong setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CRL file could not be used.
    #[error(transparent)]
    Files(#[from] PkiError),
    /// The private key file holds no usable key.
    #[error("{path}: no usable private key ({reason})")]
    Key {
        /// The key file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Our own certificate has no valid identity.
    #[error("own certificate {path}: {source}")]
    OwnIdentity {
        /// The certificate file.
        path: String,
        /// Why.
        source: IdentityError,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The identity verifier could not be built.
    #[error(transparent)]
    Verifier(#[from] IdentityError),
    /// No revocation list is configured, and running without one was not
    /// chosen explicitly.
    #[error(
        "no revocation list (tls.crl) is configured for {cert}: set tls.crl to the CA's crl.pem, or set tls.allow_no_crl = true to run without revocation checks"
    )]
    NoCrl {
        /// The certificate whose configuration lacks it.
        cert: String,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Our own certificate chain, key and identity, as read from `files`.
fn load_own(
    files: &TlsFiles,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        Participant,
    ),
    TlsError,
> {
    let chain = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let participant =
        Participant::from_certificate(&chain[0]).map_err(|source| TlsError::OwnIdentity {
            path: files.cert.display().to_string(),
            source,
        })?;
    Ok((chain, key, participant))
}

/// The revocation lists `files` name: one, or none where that was chosen
/// explicitly (`allow_no_crl`, logged). A list older (by number) than one
/// accepted before is an error on a reload (`reloading`: the list in force
/// stays); at start, where it is the only list there is, it is loaded with
/// the reason returned, and the verifier built on it refuses every peer
/// until a newer list is loaded (health says NOT_SERVING meanwhile).
#[allow(clippy::type_complexity)]
fn load_crls(
    files: &TlsFiles,
    reloading: bool,
) -> Result<(Vec<CertificateRevocationListDer<'static>>, Option<String>), TlsError> {
    match &files.crl {
        Some(path) => {
            let crl = load_crl(path)?;
            // Parsed here so that a damaged file is named as such, not
            // reported by the verifier as a "rejected certificate".
            parse_revocation_list(path, crl.as_ref())?;
            // And from our CA: another issuer's list matches no
            // certificate, so it would switch revocation off unnoticed.
            let cas = load_certs(&files.ca)?;
            check_crl_issuer(path, crl.as_ref(), &cas)?;
            // And not older than one accepted before: a list from before a
            // revocation would admit the revoked again.
            match check_crl_number(path, crl.as_ref(), &cas, files.crl_number_file.as_deref()) {
                Ok(_) => Ok((vec![crl], None)),
                Err(rolled_back @ PkiError::CrlRolledBack { .. }) if !reloading => {
                    tracing::error!(error = %rolled_back, "the only revocation list is older than one accepted before: every peer is refused until a newer list is loaded (SIGHUP)");
                    Ok((vec![crl], Some(rolled_back.to_string())))
                }
                Err(other) => Err(other.into()),
            }
        }
        None if files.allow_no_crl => {
            tracing::warn!(cert = %files.cert.display(), "running WITHOUT a revocation list (tls.allow_no_crl): revoked certificates are accepted");
            Ok((Vec::new(), None))
        }
        None => Err(TlsError::NoCrl {
            cert: files.cert.display().to_string(),
        }),
    }
}

/// Builds the identity verifier for `files` (CA and CRL).
pub fn identity_verifier(
    files: &TlsFiles,
    trust_domain: &str,
) -> Result<IdentityVerifier, TlsError> {
    identity_verifier_for(files, trust_domain, false)
}

fn identity_verifier_for(
    files: &TlsFiles,
    trust_domain: &str,
    reloading: bool,
) -> Result<IdentityVerifier, TlsError> {
    let roots = load_certs(&files.ca)?;
    let (crls, rolled_back) = load_crls(files, reloading)?;
    let verifier = IdentityVerifier::with_crl_policy(
        trust_domain,
        roots,
        crls,
        files.crl_stale == CrlStalePolicy::Refuse,
    )?;
    Ok(match rolled_back {
        Some(reason) => verifier.refusing_all(reason),
        None => verifier,
    })
}

/// When a server judges a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// In the handshake: a client without a valid certificate of our trust
    /// domain never gets a connection. For connectors, which serve only the
    /// broker.
    Strict,
    /// Right after the handshake, with the same verifier: the handshake
    /// still proves the client holds the certificate's key, but a refused
    /// client gets a connection whose every call the server answers with
    /// the precise reason (and can audit). For the broker, whose callers
    /// must learn why they were refused.
    Deferred,
}

/// A TLS 1.3 server configuration for a site people open in their own
/// browsers (the OOTS bridge's preview page): the chain and key in PEM,
/// no client certificate asked for, HTTP/2 or HTTP/1.1. The certificate
/// is the site's (a web PKI certificate for its host, in service), not a
/// participant's of the trust domain.
pub fn web_server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A TLS 1.3 server configuration asking for a client certificate of our
/// trust domain (the trust domain is our own certificate's), and the
/// verifier that judges it.
pub fn server_config(
    files: &TlsFiles,
    mode: ClientAuth,
) -> Result<(ServerConfig, Arc<IdentityVerifier>, Participant), TlsError> {
    server_config_for(files, mode, false)
}

fn server_config_for(
    files: &TlsFiles,
    mode: ClientAuth,
    reloading: bool,
) -> Result<(ServerConfig, Arc<IdentityVerifier>, Participant), TlsError> {
    let (chain, key, me) = load_own(files)?;
    let verifier = Arc::new(identity_verifier_for(files, me.trust_domain(), reloading)?);
    let client_verifier: Arc<dyn ClientCertVerifier> = match mode {
        ClientAuth::Strict => verifier.clone(),
        ClientAuth::Deferred => Arc::new(DeferredVerifier(verifier.clone())),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok((config, verifier, me))
}

/// Accepts any client certificate (or none) in the handshake, while still
/// checking the handshake signature, which proves possession of the
/// certificate's key. The chain is judged after the handshake.
#[derive(Debug)]
struct DeferredVerifier(Arc<IdentityVerifier>);

impl ClientCertVerifier for DeferredVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A TLS 1.3 client configuration presenting our certificate, trusting the
/// trust domain's CA and refusing servers whose certificate is on the
/// revocation list (or any, while the list is stale and the policy says
/// refuse).
pub fn client_config(files: &TlsFiles) -> Result<(Arc<ClientConfig>, Participant), TlsError> {
    client_config_for(files, false)
}

fn client_config_for(
    files: &TlsFiles,
    reloading: bool,
) -> Result<(Arc<ClientConfig>, Participant), TlsError> {
    let (chain, key, me) = load_own(files)?;
    let mut roots = RootCertStore::empty();
    for root in load_certs(&files.ca)? {
        roots.add(root)?;
    }
    // A list rolled back at start: the server side of the same process
    // refuses every peer, so nothing is asked of a server meanwhile.
    let (crls, _rolled_back) = load_crls(files, reloading)?;
    let mut verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider());
    if !crls.is_empty() {
        verifier = verifier
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
        if files.crl_stale == CrlStalePolicy::Refuse {
            verifier = verifier.enforce_revocation_expiration();
        }
    }
    let verifier = verifier.build().map_err(|e| {
        TlsError::Verifier(IdentityError::Rejected(format!(
            "cannot build the server verifier: {e}"
        )))
    })?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok((Arc::new(config), me))
}

/// A client TLS configuration that can be reloaded (new CRL, rotated
/// certificate). Connections opened before a reload keep theirs; a user
/// drops them on [`ReloadableClientTls::generation`] changing.
#[derive(Debug)]
pub struct ReloadableClientTls {
    files: TlsFiles,
    current: RwLock<Arc<ClientConfig>>,
    generation: AtomicU64,
}

impl ReloadableClientTls {
    /// Loads the configuration from `files`.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let (config, _) = client_config(&files)?;
        Ok(ReloadableClientTls {
            files,
            current: RwLock::new(config),
            generation: AtomicU64::new(0),
        })
    }

    /// Re-reads the files; on error the previous configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = self.prepare()?;
        self.install(config);
        Ok(())
    }

    /// Reads the files into a configuration without putting it in force
    /// (to swap several configurations only when all of them load).
    pub fn prepare(&self) -> Result<Arc<ClientConfig>, TlsError> {
        Ok(client_config_for(&self.files, true)?.0)
    }

    /// Makes connections opened so far count as old, so that they are
    /// opened (and their servers verified) again.
    pub fn install_again(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Puts a prepared configuration in force.
    pub fn install(&self, config: Arc<ClientConfig>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The configuration new connections use.
    pub fn current(&self) -> Arc<ClientConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts reloads: a cached connection from an older generation should
    /// be replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

/// A server TLS configuration that can be swapped while serving: new
/// connections use the new certificates and revocation list, established
/// ones keep theirs. A failed reload leaves the old configuration in force.
#[derive(Debug)]
pub struct ReloadableServerTls {
    files: TlsFiles,
    mode: ClientAuth,
    current: RwLock<(Arc<ServerConfig>, Arc<IdentityVerifier>)>,
    identity: Participant,
    /// Open connections, re-verified on every reload.
    connections: Mutex<Vec<std::sync::Weak<ConnectionState>>>,
    /// Counts reloads: a connection verified under an older configuration
    /// than the one in force when it is tracked is verified again.
    generation: AtomicU64,
    /// Told of every connection tracked, for [`close_on_expiry`].
    tracked: Arc<tokio::sync::Notify>,
}

/// A server configuration read from the files but not yet in force.
pub struct PreparedServerTls {
    config: ServerConfig,
    verifier: Arc<IdentityVerifier>,
}

impl ReloadableServerTls {
    /// Loads the configuration from `files`, judging clients in the
    /// handshake ([`ClientAuth::Strict`]).
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        Self::load_with(files, ClientAuth::Strict)
    }

    /// Loads the configuration from `files` with the given client
    /// authentication mode.
    pub fn load_with(files: TlsFiles, mode: ClientAuth) -> Result<Arc<Self>, TlsError> {
        let (config, verifier, identity) = server_config(&files, mode)?;
        Ok(Arc::new(ReloadableServerTls {
            files,
            mode,
            current: RwLock::new((Arc::new(config), verifier)),
            identity,
            connections: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            tracked: Arc::default(),
        }))
    }

    /// Re-reads the files. On error the previous configuration stays. Open
    /// connections are checked against the new configuration: one whose
    /// peer's certificate no longer verifies (revoked, expired, or any,
    /// while a stale list refuses) is closed, and its calls refused.
    /// Returns how many were closed.
    pub fn reload(&self) -> Result<usize, TlsError> {
        let prepared = self.prepare()?;
        Ok(self.install(prepared))
    }

    /// Reads the files into a configuration without putting it in force.
    pub fn prepare(&self) -> Result<PreparedServerTls, TlsError> {
        let (config, verifier, _) = server_config_for(&self.files, self.mode, true)?;
        Ok(PreparedServerTls { config, verifier })
    }

    /// Puts a prepared configuration in force and re-verifies the open
    /// connections under it; returns how many were closed.
    pub fn install(&self, prepared: PreparedServerTls) -> usize {
        {
            let mut current = self
                .current
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *current = (Arc::new(prepared.config), prepared.verifier);
            // Inside the lock: a handshake that took the old configuration
            // sees the generation move when it is tracked.
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        self.reverify()
    }

    /// Checks every open connection against the configuration in force
    /// (after a reload, or once the revocation list went stale by the
    /// clock) and closes those whose peer no longer verifies; returns how
    /// many were closed.
    pub fn reverify(&self) -> usize {
        let (_, verifier) = self.current();
        let closed = self
            .open_connections()
            .iter()
            .filter(|connection| !verify_open(&verifier, connection))
            .count();
        if closed > 0 {
            tracing::warn!(
                closed,
                "connections closed: their peers' certificates no longer verify"
            );
        }
        closed
    }

    /// Closes the open connections whose peer's certificate has expired
    /// since their handshake (calls on them were refused already; now the
    /// connection ends too); returns how many.
    pub fn close_expired(&self) -> usize {
        let mut closed = 0;
        for connection in self.open_connections() {
            // The refusal its calls already get once it expired, naming
            // who the certificate claims to be.
            if connection.closed().is_none()
                && let Some(expired) = connection.refusal()
            {
                connection.close(PeerRefusal {
                    claimed: claimed_by(connection.chain()),
                    ..expired
                });
                closed += 1;
            }
        }
        if closed > 0 {
            tracing::info!(
                closed,
                "connections closed: their peers' certificates expired"
            );
        }
        closed
    }

    /// How many connections are open.
    pub fn open_connection_count(&self) -> usize {
        self.open_connections().len()
    }

    /// When the first open connection's peer certificate expires (Unix
    /// seconds), among those not closed yet.
    fn next_expiry(&self) -> Option<i64> {
        self.open_connections()
            .iter()
            .filter(|c| c.closed().is_none())
            .filter_map(|c| c.not_after())
            .min()
    }

    /// Ends every open connection (the server stops and its drain is
    /// over): calls still in flight are cancelled, which lets their
    /// handlers record them and finish. Returns how many were open.
    pub fn shut_down_all(&self) -> usize {
        let open = self.open_connections();
        for connection in &open {
            connection.shut_down();
        }
        open.len()
    }

    /// The connections still open (forgetting those that ended).
    fn open_connections(&self) -> Vec<Arc<ConnectionState>> {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.retain(|c| c.strong_count() > 0);
        connections.iter().filter_map(|c| c.upgrade()).collect()
    }

    /// Keeps `connection`, verified under configuration `generation`, to
    /// be re-verified on reloads; verifies it at once where a reload came in
    /// between.
    fn track(&self, connection: &Arc<ConnectionState>, generation: u64) {
        {
            let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
            if connections.len() >= 64 && connections.len().is_power_of_two() {
                connections.retain(|c| c.strong_count() > 0);
            }
            connections.push(Arc::downgrade(connection));
        }
        self.tracked.notify_one();
        if self.generation.load(Ordering::SeqCst) != generation {
            let (_, verifier) = self.current();
            verify_open(&verifier, connection);
        }
    }

    /// The configuration new connections get, with its verifier and the
    /// generation it belongs to.
    fn current_with_generation(&self) -> (Arc<ServerConfig>, Arc<IdentityVerifier>, u64) {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (
            current.0.clone(),
            current.1.clone(),
            self.generation.load(Ordering::SeqCst),
        )
    }

    /// The state of the revocation list in force.
    pub fn crl_state(&self) -> CrlState {
        let (_, verifier) = self.current();
        verifier.crl_state(
            time::OffsetDateTime::now_utc().unix_timestamp(),
            self.files.crl.is_some(),
        )
    }

    /// The configuration new connections get, with its verifier.
    pub fn current(&self) -> (Arc<ServerConfig>, Arc<IdentityVerifier>) {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// When clients are judged.
    pub fn mode(&self) -> ClientAuth {
        self.mode
    }

    /// The server's own identity.
    pub fn identity(&self) -> &Participant {
        &self.identity
    }

    /// How many times a new configuration was installed: what was read
    /// from its files (e.g. a signing key) is read again when this moves.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The identity verifier in force (CA and revocation list).
    pub fn verifier(&self) -> Arc<IdentityVerifier> {
        self.current().1
    }

    /// The files the configuration is read from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

/// Verifies an open connection's peer again; closes the connection and
/// returns false where it no longer verifies.
fn verify_open(verifier: &IdentityVerifier, connection: &ConnectionState) -> bool {
    let Some((end_entity, intermediates)) = connection.chain().split_first() else {
        return true;
    };
    match verifier.verify(end_entity, intermediates) {
        Ok(_) => true,
        Err(e) => {
            connection.close(PeerRefusal {
                kind: e.refusal_kind(),
                reason: e.to_string(),
                claimed: claimed_by(connection.chain()),
            });
            false
        }
    }
}

/// Who a peer's certificate claims to be (its SPIFFE id), where it says.
fn claimed_by(chain: &[CertificateDer<'_>]) -> Option<String> {
    chain
        .first()
        .and_then(|leaf| Participant::from_certificate(leaf).ok())
        .map(|p| p.spiffe_id())
}

pub use crate::connection::{PeerIdentity, PeerRefusal};

/// Closes each open connection of `tls` once its peer's certificate
/// expires: it looks again when the first one expires, when a connection
/// is opened, and at least once a minute. Runs until aborted; holds `tls`
/// only weakly.
pub async fn close_on_expiry(tls: std::sync::Weak<ReloadableServerTls>) {
    const AT_LEAST_EVERY: i64 = 60;
    loop {
        let Some(strong) = tls.upgrade() else { return };
        strong.close_expired();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let wait = strong
            .next_expiry()
            .map_or(AT_LEAST_EVERY, |at| (at - now + 1).clamp(1, AT_LEAST_EVERY));
        let tracked = strong.tracked.clone();
        // Not held while waiting: the server's end ends this loop.
        drop(strong);
        let opened = tracked.notified();
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(wait.unsigned_abs())) => {}
            () = opened => {}
        }
    }
}

/// The caller's verified identity from a tonic request, or why there is
/// none (refused certificate, or a server not fed by [`MtlsIncoming`]).
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<&Participant, PeerRefusal> {
    match request.extensions().get::<PeerIdentity>() {
        Some(peer) => peer.verified(),
        None => Err(PeerRefusal {
            kind: RefusalKind::NoCertificate,
            reason: "not a mutual-TLS connection".into(),
            claimed: None,
        }),
    }
}

/// A server-side TLS stream whose peer is verified. It holds its place at
/// the door ([`ConnectionSlot`]) until it closes, and ends itself (reads
/// end of stream) once no call has been in flight for the idle timeout.
#[derive(Debug)]
pub struct MtlsStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerIdentity,
    activity: Arc<ConnectionState>,
    idle_timeout: Duration,
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    /// Until the client's first bytes after the handshake (the HTTP/2
    /// preface), it has only the handshake timeout from the handshake's end.
    first_bytes_by: Option<tokio::time::Instant>,
    /// When bytes last arrived: a call being read is not idle yet, even
    /// before its handler counts it.
    last_read: tokio::time::Instant,
    _slot: ConnectionSlot,
}

impl MtlsStream {
    /// Whether the connection has been idle past its timeout (or silent
    /// past the first-bytes limit). The timer is only a wake-up: it is
    /// re-armed when it fires and the connection turns out not to be idle
    /// yet, never on the hot path of a busy connection's reads.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.idle_timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let now = tokio::time::Instant::now();
            let expires = match (self.first_bytes_by, self.activity.idle_since()) {
                (Some(by), _) => by,
                (None, Some(since)) => {
                    tokio::time::Instant::from_std(since).max(self.last_read) + self.idle_timeout
                }
                // Calls in flight: look again a timeout from now.
                (None, None) => now + self.idle_timeout,
            };
            if expires <= now {
                return true;
            }
            self.idle_timer.as_mut().reset(expires);
        }
    }
}

impl Connected for MtlsStream {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

impl AsyncRead for MtlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.activity.register(cx.waker());
        if let Some(refusal) = this.activity.closed() {
            // Revoked or expired since the handshake: end the connection.
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                refusal.reason,
            )));
        }
        if this.activity.is_shut_down() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the server is stopping",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending if this.idle_expired(cx) => {
                tracing::debug!(peer = ?this.peer.remote_addr, "closing idle connection");
                // End of stream: the HTTP/2 server closes the connection.
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let now = tokio::time::Instant::now();
                if this.first_bytes_by.take().is_some() {
                    // From here the idle timeout rules: the timer was
                    // armed for the (longer) first-bytes deadline.
                    this.idle_timer.as_mut().reset(now + this.idle_timeout);
                }
                this.last_read = now;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for MtlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections and completes mutual TLS handshakes concurrently
/// (a slow client never holds up others), yielding verified streams for
/// `tonic::transport::Server::serve_with_incoming`. Connections over the
/// [`ConnectionLimits`] are closed at the door, before any TLS work; a
/// handshake not finished within the limit is dropped. Refused handshakes
/// are logged with the reason (at most one line a second) and never reach
/// tonic. The accept task ends when the stream is dropped.
pub struct MtlsIncoming {
    receiver: mpsc::Receiver<MtlsStream>,
}

impl MtlsIncoming {
    /// Starts accepting on `listener` with the configuration `tls` holds at
    /// the time of each connection, within `limits`.
    pub fn new(
        listener: TcpListener,
        tls: Arc<ReloadableServerTls>,
        limits: ConnectionLimits,
    ) -> Self {
        Self::with_events(listener, tls, limits, Arc::default())
    }

    /// Like [`MtlsIncoming::new`], counting refused connections in `events`.
    pub fn with_events(
        listener: TcpListener,
        tls: Arc<ReloadableServerTls>,
        limits: ConnectionLimits,
        events: Arc<SecurityEvents>,
    ) -> Self {
        let (sender, receiver) = mpsc::channel(64);
        tokio::spawn(accept_loop(listener, tls, limits, events, sender));
        MtlsIncoming { receiver }
    }
}

impl futures::Stream for MtlsIncoming {
    type Item = Result<MtlsStream, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx).map(|stream| stream.map(Ok))
    }
}

/// Logs a flood of refusals as one line a second with a count, so that a
/// flood costs neither disk nor time in proportion to its size.
#[derive(Debug, Default)]
struct RefusalLog {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RefusalLog {
    fn refused(&self, remote_addr: SocketAddr, reason: &str) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        if suppressed == 0 {
            tracing::warn!(%remote_addr, %reason, "client refused");
        } else {
            tracing::warn!(
                %remote_addr,
                %reason,
                suppressed,
                "client refused (and {suppressed} more refusals since the last line, not logged one by one)"
            );
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ReloadableServerTls>,
    limits: ConnectionLimits,
    events: Arc<SecurityEvents>,
    sender: mpsc::Sender<MtlsStream>,
) {
    let gate = ConnectionGate::new(&limits);
    let refusals = Arc::new(RefusalLog::default());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = sender.closed() => return,
        };
        let (tcp, remote_addr) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match gate.admit(remote_addr.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                let (kind, reason) = match refusal {
                    GateRefusal::Full => (RefusalKind::ConnectionLimit, "max_connections reached"),
                    GateRefusal::AddressFull => (
                        RefusalKind::AddressLimit,
                        "max_connections_per_address reached",
                    ),
                };
                events.connection_refused(kind);
                refusals.refused(remote_addr, reason);
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (config, verifier, generation) = tls.current_with_generation();
        let acceptor = TlsAcceptor::from(config);
        let sender = sender.clone();
        let refusals = refusals.clone();
        let limits = limits.clone();
        let events = events.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match handshake(acceptor, verifier, tcp, remote_addr, &limits, &refusals).await {
                Ok((inner, peer)) => {
                    let chain = match &peer.identity {
                        Ok(_) => inner
                            .get_ref()
                            .1
                            .peer_certificates()
                            .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
                            .unwrap_or_default(),
                        Err(_) => Vec::new(),
                    };
                    let activity = Arc::new(ConnectionState::new(chain));
                    tls.track(&activity, generation);
                    let stream = MtlsStream {
                        inner,
                        peer: PeerIdentity {
                            activity: Some(activity.clone()),
                            ..peer
                        },
                        activity,
                        idle_timeout: limits.idle_timeout,
                        // Armed for the first deadline: the first bytes'.
                        idle_timer: Box::pin(tokio::time::sleep(limits.handshake_timeout)),
                        first_bytes_by: Some(
                            tokio::time::Instant::now() + limits.handshake_timeout,
                        ),
                        last_read: tokio::time::Instant::now(),
                        _slot: slot,
                    };
                    let _ = sender.send(stream).await;
                }
                Err((kind, reason)) => {
                    events.connection_refused(kind);
                    refusals.refused(remote_addr, &reason);
                }
            }
        });
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    verifier: Arc<IdentityVerifier>,
    tcp: TcpStream,
    remote_addr: SocketAddr,
    limits: &ConnectionLimits,
    refusals: &RefusalLog,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, PeerIdentity), (RefusalKind, String)> {
    let timeout = limits.handshake_timeout;
    let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| {
            (
                RefusalKind::HandshakeTimeout,
                format!("handshake not completed within {timeout:?}"),
            )
        })?
        .map_err(|e| (handshake_refusal_kind(&e), explain_io_error(&e)))?;
    let (_, connection) = tls.get_ref();
    // In strict mode the handshake has verified the chain already; verifying
    // again is cheap and keeps one code path for both modes.
    let identity = match connection.peer_certificates() {
        Some([end_entity, intermediates @ ..]) => verifier
            .verify(end_entity, intermediates)
            .map_err(|e| PeerRefusal {
                kind: e.refusal_kind(),
                reason: e.to_string(),
                claimed: Participant::from_certificate(end_entity)
                    .ok()
                    .map(|p| p.spiffe_id()),
            }),
        _ => Err(PeerRefusal {
            kind: RefusalKind::NoCertificate,
            reason: "no client certificate presented".into(),
            claimed: None,
        }),
    };
    if let Err(refusal) = &identity {
        refusals.refused(
            remote_addr,
            &format!(
                "client certificate refused: {} (claims {})",
                refusal.reason,
                refusal.claimed.as_deref().unwrap_or("no identity")
            ),
        );
    }
    Ok((
        tls,
        PeerIdentity {
            identity,
            remote_addr: Some(remote_addr),
            activity: None,
        },
    ))
}

/// The class of a failed handshake: a certificate refused in it (strict
/// servers) by its reason, anything else as a failed handshake.
fn handshake_refusal_kind(error: &io::Error) -> RefusalKind {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(
            tls @ (rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented),
        ) => crate::identity::refusal_kind(tls),
        _ => RefusalKind::HandshakeFailed,
    }
}

/// Describes a TLS I/O error, unwrapping the rustls error inside it.
pub fn explain_io_error(error: &io::Error) -> String {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => explain_tls_error(tls),
        None => error.to_string(),
    }
}

/// Why a client connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address in the URI is unusable.
    #[error("invalid endpoint {0:?}: expected host:port")]
    InvalidEndpoint(String),
    /// TCP connect failed.
    #[error("cannot connect to {endpoint}: {source}")]
    Tcp {
        /// Where.
        endpoint: String,
        /// Why.
        source: io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake with {endpoint} failed: {reason}")]
    Handshake {
        /// Where.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The server's certificate was refused (revoked, expired, not of the
    /// trust domain's CA, or any while a stale revocation list refuses).
    #[error("{endpoint} presented a certificate that was refused: {reason}")]
    CertificateRefused {
        /// Where.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The server is not who we expected.
    #[error("{endpoint} presented identity {found}, expected {expected}")]
    IdentityMismatch {
        /// Where.
        endpoint: String,
        /// Whom we expected.
        expected: String,
        /// Whom we found (or why none).
        found: String,
    },
}

/// A tonic connector that opens mutual TLS connections and checks the
/// server's SPIFFE id.
#[derive(Clone)]
pub struct MtlsConnector {
    connector: TlsConnector,
    expected_server: Option<Participant>,
}

impl MtlsConnector {
    /// A connector presenting the client certificate of `config`, accepting
    /// only `expected_server` (any identity of the trust domain if `None`).
    pub fn new(config: Arc<ClientConfig>, expected_server: Option<Participant>) -> Self {
        MtlsConnector {
            connector: TlsConnector::from(config),
            expected_server,
        }
    }

    /// A lazily connecting tonic channel to `authority` (`host:port`)
    /// through this connector.
    pub fn channel(
        self,
        authority: &str,
        connect_timeout: Duration,
    ) -> Result<tonic::transport::Channel, ConnectError> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|_| ConnectError::InvalidEndpoint(authority.to_owned()))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true);
        Ok(endpoint.connect_with_connector_lazy(self))
    }

    async fn connect(
        self,
        uri: http::Uri,
    ) -> Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, ConnectError> {
        let endpoint = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .ok_or_else(|| ConnectError::InvalidEndpoint(uri.to_string()))?;
        let host = uri
            .host()
            .ok_or_else(|| ConnectError::InvalidEndpoint(endpoint.clone()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri
            .port_u16()
            .ok_or_else(|| ConnectError::InvalidEndpoint(endpoint.clone()))?;
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| ConnectError::InvalidEndpoint(endpoint.clone()))?;
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|source| ConnectError::Tcp {
                endpoint: endpoint.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| {
                let refused_certificate = matches!(
                    e.get_ref()
                        .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
                    Some(rustls::Error::InvalidCertificate(_))
                );
                if refused_certificate {
                    ConnectError::CertificateRefused {
                        endpoint: endpoint.clone(),
                        reason: explain_io_error(&e),
                    }
                } else {
                    ConnectError::Handshake {
                        endpoint: endpoint.clone(),
                        reason: explain_io_error(&e),
                    }
                }
            })?;
        if let Some(expected) = &self.expected_server {
            let found = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| Participant::from_certificate(cert));
            let matches = matches!(&found, Some(Ok(p)) if p == expected);
            if !matches {
                return Err(ConnectError::IdentityMismatch {
                    endpoint,
                    expected: expected.to_string(),
                    found: match found {
                        Some(Ok(p)) => p.to_string(),
                        Some(Err(e)) => e.to_string(),
                        None => "no certificate".into(),
                    },
                });
            }
        }
        Ok(TokioIo::new(tls))
    }
}

impl tower::Service<http::Uri> for MtlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// Finds a [`ConnectError`] in an error's source chain (tonic wraps
/// connector errors), to tell an identity mismatch from a plain outage.
pub fn find_connect_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ConnectError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<ConnectError>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// A TLS 1.3 client of a server outside the participant PKI (PostgreSQL):
/// the server's certificate verified against the roots in `ca` (PEM) and
/// for the host name dialled, as WebPKI does; with `client`, a certificate
/// chain and key (PEM) to present where the server asks for one.
pub fn external_client_config(
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert)?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
