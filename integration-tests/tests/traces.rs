//! Traces over OTLP: a real OTLP/gRPC receiver (the OTLP trace service from
//! the `opentelemetry-proto` definitions, served by tonic) gets the spans of
//! one request, from the broker and from the connector, in the caller's
//! trace, each step's parent the exchange's span and the connector's span a
//! child of the broker's forward.

use std::time::Duration;

use onceonly_integration_tests::otlp::{Receiver, Span};
use onceonly_integration_tests::world::{AUTHORITIES, World, birth_certificate};
use tonic::Request;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_yields_broker_and_connector_spans_in_the_callers_trace() {
    let (receiver, endpoint) = Receiver::start().await;
    let telemetry = onceonly_proto::telemetry::init(
        false,
        Some(&onceonly_proto::telemetry::TraceExport {
            endpoint,
            service_name: "onceonly-test".into(),
            filter: onceonly_proto::telemetry::DEFAULT_TRACE_FILTER.into(),
        }),
    )
    .expect("exporter")
    .expect("installed");

    let world = World::start().await;
    let mut call = Request::new(birth_certificate("traced-1"));
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN}-01")
            .parse()
            .expect("header"),
    );
    world
        .authority(AUTHORITIES[0])
        .request_evidence(call)
        .await
        .expect("delivered");
    world.settle().await;

    // Flush until the connector's span (the last to end) has arrived.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let flushing = telemetry.clone();
        tokio::task::spawn_blocking(move || flushing.flush())
            .await
            .expect("flush");
        let spans: Vec<Span> = receiver
            .spans()
            .into_iter()
            .map(|received| received.span)
            .filter(|s| hex::encode(&s.trace_id) == TRACE_ID)
            .collect();
        if spans.iter().any(|s| s.name == "provide_evidence")
            && spans.iter().any(|s| s.name == "request_evidence")
        {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans never arrived: {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let named = |name: &str| {
        spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
            panic!(
                "no span {name}: {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    };
    let exchange = named("request_evidence");
    assert_eq!(hex::encode(&exchange.parent_span_id), CALLER_SPAN);
    for step in [
        "authenticate",
        "validate",
        "authorize",
        "route",
        "forward",
        "audit",
    ] {
        assert_eq!(
            named(step).parent_span_id,
            exchange.span_id,
            "{step} is a step of the exchange"
        );
    }
    let connector = named("provide_evidence");
    assert_eq!(
        connector.parent_span_id,
        named("forward").span_id,
        "the connector continues the broker's forward"
    );
    let connector_spans = spans
        .iter()
        .filter(|s| s.name == "provide_evidence")
        .count();
    assert_eq!(connector_spans, 1, "one connector span for one request");
}
