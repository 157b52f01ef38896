//! Traces over OTLP, where an endpoint is configured: `tracing` spans
//! become OpenTelemetry spans (tracing-opentelemetry), exported in batches
//! over OTLP/gRPC (opentelemetry-otlp on tonic) from a tokio task. A hop's
//! span continues the caller's trace ([`continue_trace`]: its parent is the
//! span the caller's `traceparent` names), and calls onward carry the
//! current span as their `traceparent` ([`onward`]), so authority, broker
//! and connector spans form one tree. Without an endpoint nothing is
//! exported and [`onward`] falls back to a child of the caller's context.

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metadata::TraceContext;

/// Why traces cannot be exported.
#[derive(Debug, thiserror::Error)]
#[error("cannot export traces to {endpoint}: {reason}")]
pub struct TelemetryError {
    /// The OTLP endpoint.
    pub endpoint: String,
    /// Why.
    pub reason: String,
}

/// An installed OTLP trace pipeline; flush or shut it down before exit.
#[derive(Debug, Clone)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports the spans of `service_name` to the OTLP/gRPC `endpoint`
    /// (e.g. `http://127.0.0.1:4317`). Call within a tokio runtime.
    pub fn otlp(service_name: &str, endpoint: &str) -> Result<Self, TelemetryError> {
        let error = |reason: String| TelemetryError {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| error(e.to_string()))?;
        let processor =
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name.to_owned())
                    .build(),
            )
            .build();
        Ok(Telemetry { provider })
    }

    /// The `tracing` layer that turns spans into exported ones.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("onceonly"))
    }

    /// Exports what is buffered now.
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }

    /// Exports what is buffered and stops.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "shutting traces down failed");
        }
    }
}

/// Makes `span` continue `caller`'s trace: its parent is the caller's span.
pub fn continue_trace(span: &tracing::Span, caller: &TraceContext) {
    let _ = span.set_parent(caller.as_parent());
}

/// The trace context to send onward from within the current span: that
/// span's, where spans are exported; else a child of `fallback`.
pub fn onward(fallback: &TraceContext) -> TraceContext {
    let context = tracing::Span::current().context();
    let span = context.span().span_context().clone();
    if span.is_valid() {
        TraceContext::from_span_context(span)
    } else {
        fallback.child()
    }
}

/// Serves `registry` at `GET /metrics` (OpenMetrics text, which Prometheus
/// reads) on `listener` until the task is dropped: the admin listener of
/// the broker and of connectors. Plain HTTP, no certificate: it carries
/// nothing but figures, and listens on loopback unless told otherwise.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: std::sync::Arc<prometheus_client::registry::Registry>,
) {
    serve_admin(listener, registry, None).await;
}

/// [`serve_metrics`], and where `ready` is given, `GET /ready`: 200 while
/// it holds, 503 otherwise — readiness (as gRPC health reports it) for
/// load balancers that cannot speak gRPC over mutual TLS (HAProxy's
/// `option httpchk`).
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    registry: std::sync::Arc<prometheus_client::registry::Registry>,
    ready: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) {
    use axum::response::IntoResponse;
    let mut app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut text = String::new();
                if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
                    tracing::error!(error = %e, "cannot encode the metrics");
                }
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
                    .into_response()
            }
        }),
    );
    if let Some(ready) = ready {
        app = app.route(
            "/ready",
            axum::routing::get(move || {
                let serving = ready.load(std::sync::atomic::Ordering::Relaxed);
                async move {
                    if serving {
                        (axum::http::StatusCode::OK, "SERVING\n")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
                    }
                }
            }),
        );
    }
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "the admin listener stopped");
    }
}

/// Latency histogram buckets for every onceonly metric: 0.1 ms to ~26 s
/// (beyond a connector's timeout, up to the longest deadline), doubling.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 19)
}

/// What spans are exported by default: those of onceonly's own crates
/// (their targets all begin `onceonly`), at `info` and above. The request
/// path's spans are all there; the HTTP/2 and tower internals below them
/// (`poll_ready`, `FramedRead::poll_next`, `send_data`, ...) are not: they
/// were about 250 root spans per request and 100 a second when idle.
pub const DEFAULT_TRACE_FILTER: &str = "onceonly=info";

/// Where and as what a process exports its spans over OTLP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceExport {
    /// The OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// The resource's `service.name`: each process names itself (the
    /// broker, each connector by its id), so a collector tells them apart.
    pub service_name: String,
    /// Which spans are exported, in `RUST_LOG` syntax (`target=level`,
    /// comma-separated); [`DEFAULT_TRACE_FILTER`] unless configured.
    pub filter: String,
}

/// Checks a trace filter setting; the error says what is wrong with it.
pub fn check_trace_filter(filter: &str) -> Result<(), String> {
    if filter.trim().is_empty() {
        return Err(format!(
            "is empty, which would export nothing; give e.g. {DEFAULT_TRACE_FILTER:?}, or leave otlp_endpoint unset to export nothing"
        ));
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|e| {
            format!(
                "not a trace filter ({e}); write `target=level` directives separated by commas, e.g. {DEFAULT_TRACE_FILTER:?}"
            )
        })
}

/// Installs the process's logging: `RUST_LOG` filter (default `info`),
/// plain or JSON lines on stderr, and, where `export` is given, spans
/// exported over OTLP (only those its filter admits). Call within a tokio
/// runtime when exporting; keep the returned pipeline to flush it before
/// exit.
pub fn init(json: bool, export: Option<&TraceExport>) -> Result<Option<Telemetry>, TelemetryError> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = if json {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    let traces = match export {
        Some(export) => {
            let trace_filter = tracing_subscriber::EnvFilter::builder()
                .parse(&export.filter)
                .map_err(|e| TelemetryError {
                    endpoint: export.endpoint.clone(),
                    reason: format!("trace filter {:?}: {e}", export.filter),
                })?;
            let telemetry = Telemetry::otlp(&export.service_name, &export.endpoint)?;
            let layer = telemetry.layer().with_filter(trace_filter);
            Some((telemetry, layer))
        }
        None => None,
    };
    let (telemetry, layer) = match traces {
        Some((telemetry, layer)) => (Some(telemetry), Some(layer)),
        None => (None, None),
    };
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(layer)
        .try_init();
    Ok(telemetry)
}
