//! The gRPC metadata conventions of onceonly.v1: W3C trace context
//! (`traceparent`, `tracestate`) and the broker's exchange id header.
//!
//! Trace context is parsed and written with OpenTelemetry's W3C
//! `TraceContextPropagator`, so every hop (authority -> broker -> connector)
//! joins one trace whatever the caller's language.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use rand::RngCore;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

/// The header the broker sends connectors with the exchange id.
pub const EXCHANGE_ID_HEADER: &str = "x-onceonly-exchange-id";

/// One hop's place in a distributed trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    span: SpanContext,
}

impl TraceContext {
    /// The caller's trace context from request metadata, if it sent a valid
    /// `traceparent`.
    pub fn extract(metadata: &MetadataMap) -> Option<Self> {
        let context = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
        let span = context.span().span_context().clone();
        span.is_valid().then_some(TraceContext { span })
    }

    /// A new trace, for a request that arrived without one.
    pub fn new_root() -> Self {
        let mut rng = rand::rng();
        let trace_id = TraceId::from_bytes(nonzero_bytes::<16>(&mut rng));
        let span_id = SpanId::from_bytes(nonzero_bytes::<8>(&mut rng));
        TraceContext {
            span: SpanContext::new(
                trace_id,
                span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
        }
    }

    /// The context of a child hop: same trace, a new span id.
    pub fn child(&self) -> Self {
        let span_id = SpanId::from_bytes(nonzero_bytes::<8>(&mut rand::rng()));
        TraceContext {
            span: SpanContext::new(
                self.span.trace_id(),
                span_id,
                self.span.trace_flags(),
                false,
                self.span.trace_state().clone(),
            ),
        }
    }

    /// The context of an existing span (e.g. the current exported span).
    pub fn from_span_context(span: SpanContext) -> Self {
        TraceContext { span }
    }

    /// This context as an OpenTelemetry parent.
    pub fn as_parent(&self) -> opentelemetry::Context {
        opentelemetry::Context::new().with_remote_span_context(self.span.clone())
    }

    /// Writes `traceparent` (and `tracestate`) into outgoing metadata.
    pub fn inject(&self, metadata: &mut MetadataMap) {
        let context = opentelemetry::Context::new().with_remote_span_context(self.span.clone());
        TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
    }

    /// The trace id, 32 hex digits: what logs and audit records carry.
    pub fn trace_id(&self) -> String {
        self.span.trace_id().to_string()
    }

    /// This hop's span id, 16 hex digits.
    pub fn span_id(&self) -> String {
        self.span.span_id().to_string()
    }
}

/// The caller's deadline from the `grpc-timeout` header (gRPC over HTTP/2:
/// at most 8 digits and a unit H, M, S, m, u or n), if it sent one.
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<std::time::Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    use std::time::Duration;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

fn nonzero_bytes<const N: usize>(rng: &mut impl RngCore) -> [u8; N] {
    let mut bytes = [0u8; N];
    while bytes.iter().all(|b| *b == 0) {
        rng.fill_bytes(&mut bytes);
    }
    bytes
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_children_share_the_trace() {
        let root = TraceContext::new_root();
        let mut metadata = MetadataMap::new();
        root.child().inject(&mut metadata);
        let header = metadata
            .get("traceparent")
            .expect("injected")
            .to_str()
            .expect("ascii");
        assert!(
            header.starts_with(&format!("00-{}-", root.trace_id())),
            "{header}"
        );
        let extracted = TraceContext::extract(&metadata).expect("extracts");
        assert_eq!(extracted.trace_id(), root.trace_id());
        assert_ne!(extracted.span_id(), root.span_id());
    }

    #[test]
    fn grpc_timeout_is_parsed() {
        let mut metadata = MetadataMap::new();
        assert_eq!(grpc_timeout(&metadata), None);
        metadata.insert("grpc-timeout", MetadataValue::from_static("250m"));
        assert_eq!(
            grpc_timeout(&metadata),
            Some(std::time::Duration::from_millis(250))
        );
        metadata.insert("grpc-timeout", MetadataValue::from_static("2S"));
        assert_eq!(
            grpc_timeout(&metadata),
            Some(std::time::Duration::from_secs(2))
        );
        metadata.insert("grpc-timeout", MetadataValue::from_static("123456789m"));
        assert_eq!(grpc_timeout(&metadata), None, "more than 8 digits");
        metadata.insert("grpc-timeout", MetadataValue::from_static("5x"));
        assert_eq!(grpc_timeout(&metadata), None);
    }

    #[test]
    fn malformed_traceparent_is_ignored() {
        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", MetadataValue::from_static("00-zz-yy-01"));
        assert_eq!(TraceContext::extract(&metadata), None);
        assert_eq!(TraceContext::extract(&MetadataMap::new()), None);
    }
}
