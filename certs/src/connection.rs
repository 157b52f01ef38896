//! Limits on the connections a onceonly server (broker or connector)
//! accepts, so that no client, careless or hostile, can exhaust it:
//!
//! - at the door, before any TLS work: at most `max_connections` in all and
//!   `max_connections_per_address` from one IP address ([`ConnectionGate`]);
//!   a connection over either is closed at once;
//! - a client that does not finish its TLS handshake within
//!   `handshake_timeout` is dropped;
//! - HTTP/2: at most `max_concurrent_streams` calls per connection, caps on
//!   reset streams (the "rapid reset" attacks), keepalive pings that find
//!   dead peers, and a maximum connection age after which the client is
//!   asked (GOAWAY) to reconnect, so certificate rotation and revocation
//!   reach long-lived clients ([`ConnectionLimits::apply`]);
//! - a connection with no call in flight for `idle_timeout` is closed
//!   ([`CallTracking`] counts calls per connection; pings do not count).
//!
//! The values come from the servers' configuration files (`[connections]`),
//! with safe defaults.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::identity::Participant;
use crate::security::RefusalKind;

/// Connection limits, as `[connections]` in a server's configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// Connections open at once, handshakes included.
    pub max_connections: usize,
    /// Connections open at once from one IP address.
    pub max_connections_per_address: usize,
    /// How long a client may take to complete its TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection with no call in flight this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Calls (HTTP/2 streams) in flight at once on one connection.
    pub max_concurrent_streams: u32,
    /// Streams the server may reset because of client errors before it
    /// closes the connection.
    pub max_local_reset_streams: usize,
    /// Streams the client opened and reset before the server accepted
    /// them, at once, before the server closes the connection.
    pub max_pending_accept_reset_streams: usize,
    /// How often an HTTP/2 ping checks that a quiet peer is still there.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// After this long the client is asked to reconnect (GOAWAY), so that
    /// rotated certificates and revocations reach it.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// How long calls in flight may still take after the GOAWAY.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 10_000,
            max_connections_per_address: 512,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_concurrent_streams: 256,
            max_local_reset_streams: 64,
            max_pending_accept_reset_streams: 32,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(3600),
            max_connection_age_grace: Duration::from_secs(30),
        }
    }
}

/// What is wrong with a [`ConnectionLimits`] value: the key and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitProblem {
    /// The key under `[connections]`.
    pub key: &'static str,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: &'static str,
}

impl ConnectionLimits {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), LimitProblem> {
        let problem = |key, problem: &str, fix| {
            Err(LimitProblem {
                key,
                problem: problem.to_owned(),
                fix,
            })
        };
        if self.max_connections == 0 {
            return problem("max_connections", "is zero", "allow at least 1, e.g. 10000");
        }
        if self.max_connections_per_address == 0 {
            return problem(
                "max_connections_per_address",
                "is zero",
                "allow at least 1, e.g. 512",
            );
        }
        if self.max_concurrent_streams == 0 {
            return problem(
                "max_concurrent_streams",
                "is zero",
                "allow at least 1, e.g. 256",
            );
        }
        for (key, value) in [
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("keepalive_timeout", self.keepalive_timeout),
            ("max_connection_age", self.max_connection_age),
        ] {
            if value.is_zero() {
                return problem(key, "is zero", "give a duration, e.g. \"10s\"");
            }
        }
        Ok(())
    }

    /// Applies the HTTP/2 limits to a tonic server builder.
    pub fn apply<L>(&self, server: tonic::transport::Server<L>) -> tonic::transport::Server<L> {
        server
            .max_concurrent_streams(self.max_concurrent_streams)
            .http2_max_local_error_reset_streams(Some(self.max_local_reset_streams))
            .http2_max_pending_accept_reset_streams(Some(self.max_pending_accept_reset_streams))
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
            .max_connection_age(self.max_connection_age)
            .max_connection_age_grace(self.max_connection_age_grace)
    }
}

/// Counts open connections, in all and per address; a [`ConnectionSlot`]
/// holds one until the connection closes.
#[derive(Debug)]
pub struct ConnectionGate {
    total: Arc<Semaphore>,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_address: usize,
}

/// Why a connection was turned away at the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateRefusal {
    /// `max_connections` are open.
    Full,
    /// `max_connections_per_address` are open from this address.
    AddressFull,
}

impl ConnectionGate {
    /// A gate for `limits`.
    pub fn new(limits: &ConnectionLimits) -> Self {
        ConnectionGate {
            total: Arc::new(Semaphore::new(limits.max_connections)),
            per_address: Arc::new(Mutex::new(HashMap::new())),
            max_per_address: limits.max_connections_per_address,
        }
    }

    /// A slot for a connection from `address`, or why there is none. IPv4
    /// addresses mapped into IPv6 count as themselves, and an IPv6 address
    /// counts as its /64 network (one host's usual share).
    pub fn admit(&self, address: IpAddr) -> Result<ConnectionSlot, GateRefusal> {
        let address = counted_address(address);
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| GateRefusal::Full)?;
        let mut counts = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(address).or_insert(0);
        if *count >= self.max_per_address {
            return Err(GateRefusal::AddressFull);
        }
        *count += 1;
        Ok(ConnectionSlot {
            _permit: permit,
            address,
            per_address: self.per_address.clone(),
        })
    }

    /// Connections open now.
    pub fn open(&self, limits: &ConnectionLimits) -> usize {
        limits.max_connections - self.total.available_permits()
    }
}

/// The address a connection counts against: the canonical form, and for
/// IPv6 its /64 network.
fn counted_address(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let network = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(network.into())
        }
        v4 => v4,
    }
}

/// One admitted connection; frees its place when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    address: IpAddr,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// What a server knows about one open connection, shared between its
/// stream, the calls on it ([`CallTracking`]) and the server's TLS
/// configuration: the calls in flight and when the last one ended (for the
/// idle timeout), the peer's certificate chain and its expiry (re-checked
/// on every call and on every reload), and whether the server has closed
/// it (its peer's certificate was revoked or expired after the handshake).
#[derive(Debug)]
pub struct ConnectionState {
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` when a call last started or ended.
    last_change_ms: AtomicU64,
    epoch: Instant,
    /// The peer's verified chain, end entity first (empty where refused).
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The end entity's `notAfter` (Unix seconds).
    not_after: Option<i64>,
    /// Set once: why the connection is no longer served.
    closed: std::sync::OnceLock<PeerRefusal>,
    /// Set when the server stops: the connection ends, its calls with it.
    shut_down: std::sync::atomic::AtomicBool,
    /// Wakes the connection's stream to act on `closed`.
    waker: futures::task::AtomicWaker,
}

impl Default for ConnectionState {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl ConnectionState {
    /// The state of a connection whose peer presented `chain` (verified).
    pub fn new(chain: Vec<rustls::pki_types::CertificateDer<'static>>) -> Self {
        let not_after = chain.first().and_then(|cert| {
            x509_parser::parse_x509_certificate(cert.as_ref())
                .ok()
                .map(|(_, parsed)| parsed.validity().not_after.timestamp())
        });
        ConnectionState {
            in_flight: AtomicUsize::new(0),
            last_change_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            chain,
            not_after,
            closed: std::sync::OnceLock::new(),
            shut_down: std::sync::atomic::AtomicBool::new(false),
            waker: futures::task::AtomicWaker::new(),
        }
    }

    /// The peer's verified chain (empty where its certificate was refused).
    pub fn chain(&self) -> &[rustls::pki_types::CertificateDer<'static>] {
        &self.chain
    }

    /// The peer certificate's `notAfter` (Unix seconds), where known.
    pub fn not_after(&self) -> Option<i64> {
        self.not_after
    }

    /// Stops serving the connection: calls on it are refused with
    /// `refusal`, and its stream ends.
    pub fn close(&self, refusal: PeerRefusal) {
        if self.closed.set(refusal).is_ok() {
            self.waker.wake();
        }
    }

    /// Ends the connection because the server stops (its drain is over):
    /// the stream ends, and calls still in flight on it are cancelled.
    pub fn shut_down(&self) {
        if !self.shut_down.swap(true, Ordering::SeqCst) {
            self.waker.wake();
        }
    }

    /// Whether [`ConnectionState::shut_down`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::SeqCst)
    }

    /// Why the server closed the connection, if it did.
    pub fn closed(&self) -> Option<PeerRefusal> {
        self.closed.get().cloned()
    }

    /// Why the connection is no longer served, if it is not: closed by the
    /// server, or its peer's certificate expired since the handshake.
    pub fn refusal(&self) -> Option<PeerRefusal> {
        if let Some(closed) = self.closed.get() {
            return Some(closed.clone());
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match self.not_after {
            Some(not_after) if now > not_after => Some(PeerRefusal {
                kind: RefusalKind::Expired,
                reason: "certificate has expired since the connection was opened".into(),
                claimed: None,
            }),
            _ => None,
        }
    }

    /// Registers the stream's waker, to be woken by [`ConnectionState::close`].
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_change_ms.store(now, Ordering::Relaxed);
    }

    /// Counts a call until the guard drops.
    pub fn begin_call(self: &Arc<Self>) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
        CallGuard(self.clone())
    }

    /// When the connection became idle (no call in flight), if it is.
    pub fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.epoch + Duration::from_millis(self.last_change_ms.load(Ordering::Relaxed)))
    }
}

/// A call in flight; ends when dropped.
#[derive(Debug)]
pub struct CallGuard(Arc<ConnectionState>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        // Time first: between the two, the connection must not look idle
        // since the call began.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// When a call arrived at the server, as early as the server's own layers
/// see it: put in the request's extensions by [`CallTracking`], so that a
/// call's deadline is measured from the same instant as tonic's own timer.
#[derive(Debug, Clone, Copy)]
pub struct CallStarted(pub Instant);

/// A tower layer that counts each call against its connection's
/// [`ConnectionState`] (found in the request's extensions, where the server's
/// connection info puts it) until its response body has been sent, for the
/// idle timeout; and stamps the call with [`CallStarted`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CallTracking;

impl<S> tower::Layer<S> for CallTracking {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Tracked(inner)
    }
}

/// A service wrapped by [`CallTracking`].
#[derive(Debug, Clone)]
pub struct Tracked<S>(S);

impl<S, B> tower::Service<http::Request<B>> for Tracked<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(CallStarted(Instant::now()));
        let guard = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|peer| peer.activity.as_ref())
            .map(ConnectionState::begin_call);
        let response = self.0.call(request);
        Box::pin(async move {
            let response = response.await?;
            // The call lasts until its body is sent (server streams too).
            Ok(response.map(|body| tonic::body::Body::new(GuardedBody { inner: body, guard })))
        })
    }
}

/// A response body that ends its call's [`CallGuard`] when it is done.
struct GuardedBody {
    inner: tonic::body::Body,
    guard: Option<CallGuard>,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What a server knows about the peer of a connection, as request handlers
/// see it.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// Who the peer is, from its verified certificate; or, on a server with
    /// a server that defers client authentication (`ClientAuth::Deferred`), why its certificate was refused.
    pub identity: Result<Participant, PeerRefusal>,
    /// Its address.
    pub remote_addr: Option<SocketAddr>,
    /// The connection's calls in flight, for its idle timeout.
    pub activity: Option<Arc<ConnectionState>>,
}

impl PeerIdentity {
    /// Who the peer is; or why not: its certificate was refused, or the
    /// connection was judged again since (a revocation list or an expiry
    /// reached it).
    pub fn verified(&self) -> Result<&Participant, PeerRefusal> {
        match &self.identity {
            Ok(participant) => match self
                .activity
                .as_ref()
                .and_then(|connection| connection.refusal())
            {
                Some(refusal) => Err(PeerRefusal {
                    claimed: Some(participant.spiffe_id()),
                    ..refusal
                }),
                None => Ok(participant),
            },
            Err(refusal) => Err(refusal.clone()),
        }
    }
}

/// Why a peer's certificate was refused, and whom it claimed to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRefusal {
    /// The class of the refusal, for counting.
    pub kind: RefusalKind,
    /// The reason, for the caller and the log (e.g. "certificate has been
    /// revoked").
    pub reason: String,
    /// The SPIFFE id the certificate claims (unverified), if readable.
    pub claimed: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_counts_in_all_and_per_address_and_frees_on_drop() {
        let limits = ConnectionLimits {
            max_connections: 3,
            max_connections_per_address: 2,
            ..ConnectionLimits::default()
        };
        let gate = ConnectionGate::new(&limits);
        let one: IpAddr = [127, 0, 0, 2].into();
        let other: IpAddr = [127, 0, 0, 3].into();
        let a = gate.admit(one).expect("first");
        let _b = gate.admit(one).expect("second");
        assert_eq!(gate.admit(one).err(), Some(GateRefusal::AddressFull));
        let _c = gate.admit(other).expect("another address");
        assert_eq!(gate.admit(other).err(), Some(GateRefusal::Full));
        drop(a);
        gate.admit(one).expect("a place came free");
    }

    #[test]
    fn ipv6_counts_by_its_64_network_and_mapped_ipv4_as_itself() {
        let limits = ConnectionLimits {
            max_connections_per_address: 1,
            ..ConnectionLimits::default()
        };
        let gate = ConnectionGate::new(&limits);
        let _a = gate
            .admit("2001:db8::1".parse().expect("ip"))
            .expect("first");
        assert_eq!(
            gate.admit("2001:db8::2:3".parse().expect("ip")).err(),
            Some(GateRefusal::AddressFull),
            "same /64"
        );
        gate.admit("2001:db8:0:1::1".parse().expect("ip"))
            .expect("another /64");
        let _v4 = gate.admit("192.0.2.7".parse().expect("ip")).expect("v4");
        assert_eq!(
            gate.admit("::ffff:192.0.2.7".parse().expect("ip")).err(),
            Some(GateRefusal::AddressFull),
            "the mapped form is the same host"
        );
    }

    #[test]
    fn a_connection_is_idle_only_without_calls() {
        let activity = Arc::new(ConnectionState::default());
        assert!(activity.idle_since().is_some());
        let call = activity.begin_call();
        assert!(activity.idle_since().is_none());
        drop(call);
        assert!(activity.idle_since().is_some());
    }

    #[test]
    fn defaults_validate_and_zeros_are_named() {
        assert_eq!(ConnectionLimits::default().validate(), Ok(()));
        let zero = ConnectionLimits {
            max_concurrent_streams: 0,
            ..ConnectionLimits::default()
        };
        assert_eq!(
            zero.validate().expect_err("zero streams").key,
            "max_concurrent_streams"
        );
    }
}
