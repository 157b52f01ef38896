//! Traces over OTLP: a real OTLP/gRPC receiver (the OTLP trace service from
//! the `opentelemetry-proto` definitions, served by tonic) gets the spans of
//! one request, from the broker and from the connector, in the caller's
//! trace, each step's parent the exchange's span and the connector's span a
//! child of the broker's forward.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use onceonly_integration_tests::world::{AUTHORITIES, World, birth_certificate};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().expect("spans");
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_yields_broker_and_connector_spans_in_the_callers_trace() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let telemetry =
        onceonly_proto::telemetry::init(false, Some(("onceonly-test", &format!("http://{addr}"))))
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
            .spans
            .lock()
            .expect("spans")
            .iter()
            .filter(|s| hex::encode(&s.trace_id) == TRACE_ID)
            .cloned()
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
