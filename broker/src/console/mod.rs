//! The console: the broker's policy and audit log in a browser, for the
//! people who do not use a terminal. Policy staff edit a policy, see its
//! lint findings, what it changes and which logged decisions it would
//! have decided otherwise, and apply it; auditors and data-protection
//! officers browse the log and see each record's inclusion proof checked;
//! a citizen's history is shown as a portal's transparency view shows it.
//!
//! Served by the broker, on a listener of its own (`[console] listen`),
//! not by a binary of its own: a person is their client certificate, and
//! the broker is what checks certificates (trust domain, revocation list,
//! expiry on open connections) and what applies a policy. Served here, the
//! log entry of an applied policy names the person whose handshake the
//! broker itself verified; a separate console would have had to be
//! trusted to say who applied it. Not on the admin listener either: that
//! is plain HTTP for metrics scrapers, and the console needs mutual TLS.
//!
//! - [`auth`]: who is looking (their certificate and role), and the CSRF
//!   check every change passes;
//! - [`page`]: the layout, German and English labels, the stylesheet;
//! - [`policy_pages`]: edit, review (lint, diff, dry run) and apply;
//! - [`log_pages`]: records, one record with its proof, consistency
//!   between two heads, one citizen's history.
//!
//! Pages are rendered on the server; there is no script at all, and the
//! Content-Security-Policy says so.

mod auth;
mod log_pages;
mod page;
mod policy_pages;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::{get, post};
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use onceonly_certs::{ConnectionLimits, MtlsIncoming, ReloadableServerTls};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::Connected;

use crate::exchange::Broker;

pub use auth::Viewer;
pub use page::Lang;

/// What every page of the console reaches.
pub struct Console {
    broker: Arc<Broker>,
    /// Signs each person's CSRF token (random per run).
    csrf_key: ring::hmac::Key,
    /// The audit log's public key: heads are checked with it, as an
    /// auditor's own tool would.
    log_public_key: Vec<u8>,
}

impl Console {
    /// The console of `broker`, checking heads with `log_public_key`.
    pub fn new(
        broker: Arc<Broker>,
        log_public_key: Vec<u8>,
    ) -> Result<Self, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        Ok(Console {
            broker,
            csrf_key: ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)?,
            log_public_key,
        })
    }
}

/// The Content-Security-Policy of every answer: the stylesheet from the
/// console itself, no script from anywhere, forms posting only here, and
/// no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The largest form the console takes (a policy text with room to spare).
const MAX_FORM: usize = 256 * 1024;

/// How long a client has to send a request's headers.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The console's routes.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(page::home))
        .route("/console.css", get(page::stylesheet))
        .route("/policy", get(policy_pages::edit))
        .route(
            "/policy/review",
            post(policy_pages::review).get(policy_pages::to_editor),
        )
        .route(
            "/policy/apply",
            post(policy_pages::apply).get(policy_pages::to_editor),
        )
        .route("/records", get(log_pages::records))
        .route("/records/lookup", post(log_pages::records_of))
        .route("/records/{index}", get(log_pages::record))
        .route("/consistency", get(log_pages::consistency))
        .route(
            "/history",
            get(log_pages::history_form).post(log_pages::history),
        )
        .fallback(page::not_found)
        // A policy is a few kilobytes; forms are refused far above that.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(console)
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not "no-referrer": under it browsers send `Origin: null` even on the
    // console's own forms (Fetch, "serializing a request origin"), and the
    // CSRF check needs the real one. Other sites learn nothing.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    // Records and policies are not for shared caches or the back button
    // of the next person at the desk.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    response
}

/// Serves the console on `listener` with the broker's TLS (`tls`: its
/// certificate, trust domain and revocation list) until aborted; aborting
/// it closes the console's connections too.
pub fn spawn(
    listener: TcpListener,
    tls: Arc<ReloadableServerTls>,
    limits: ConnectionLimits,
    broker: Arc<Broker>,
    log_public_key: Vec<u8>,
) -> JoinHandle<()> {
    let events = broker.security.clone();
    let console = match Console::new(broker, log_public_key) {
        Ok(console) => Arc::new(console),
        Err(_) => {
            tracing::error!("no randomness for the console's CSRF key; the console is not served");
            return tokio::spawn(async {});
        }
    };
    let app = router(console);
    tokio::spawn(async move {
        let mut incoming = MtlsIncoming::with_events(listener, tls, limits, events);
        let mut connections = tokio::task::JoinSet::new();
        while let Some(stream) = incoming.next().await {
            let Ok(stream) = stream else { continue };
            // Who the peer is (or why not) goes with each of its requests.
            let peer = stream.connect_info();
            let app = app.clone();
            let service = hyper_util::service::TowerToHyperService::new(tower::service_fn(
                move |mut request: http::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(peer.clone());
                    tower::ServiceExt::oneshot(app.clone(), request)
                },
            ));
            connections.spawn(async move {
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // Without a timer hyper has no header timeout: a client
                // trickling bytes would hold its slot for ever.
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT);
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(32)
                    .keep_alive_interval(std::time::Duration::from_secs(30))
                    .keep_alive_timeout(HEADER_READ_TIMEOUT);
                let served = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(error) = served {
                    tracing::debug!(%error, "console connection ended");
                }
            });
            while connections.try_join_next().is_some() {}
        }
    })
}
