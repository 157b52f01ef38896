//! A connector's metrics, in the Prometheus (OpenMetrics) text format on
//! its own admin listener (`admin_listen`, off unless set; loopback is
//! the sensible choice), like the broker's: requests by evidence type, gRPC
//! code and `ErrorReason` (refusals included: ticket refusals, invalid
//! requests, the register's own answers), and their latency.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::{Response, Status};

/// The labels of one request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// A served evidence type, or `unknown`.
    pub evidence_type: String,
    /// The gRPC code, e.g. `Ok`, `PermissionDenied`.
    pub code: String,
    /// The `ErrorReason` name, or `none`.
    pub reason: String,
}

/// What the connector records.
#[derive(Debug)]
pub struct ConnectorMetrics {
    /// Requests by evidence type, code and reason.
    pub requests: Family<RequestLabels, Counter>,
    /// From the call's arrival to its answer.
    pub request_seconds: Histogram,
}

impl Default for ConnectorMetrics {
    fn default() -> Self {
        ConnectorMetrics {
            requests: Family::default(),
            request_seconds: Histogram::new(onceonly_proto::telemetry::latency_buckets()),
        }
    }
}

impl ConnectorMetrics {
    /// Counts one answered request.
    pub fn record<T>(
        &self,
        evidence_type: &str,
        answer: &Result<Response<T>, Status>,
        took: Duration,
    ) {
        let (code, reason) = match answer {
            Ok(_) => ("Ok".to_owned(), "none".to_owned()),
            Err(status) => (
                format!("{:?}", status.code()),
                onceonly_proto::status::reason_of(status)
                    .map_or("none", |r| r.reason())
                    .to_owned(),
            ),
        };
        self.requests
            .get_or_create(&RequestLabels {
                evidence_type: evidence_type.to_owned(),
                code,
                reason,
            })
            .inc();
        self.request_seconds.observe(took.as_secs_f64());
    }

    /// The registry to serve.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        registry.register(
            "onceonly_connector_requests",
            "ProvideEvidence requests, by evidence type, gRPC code and ErrorReason",
            self.requests.clone(),
        );
        registry.register(
            "onceonly_connector_request_duration_seconds",
            "ProvideEvidence requests from arrival to answer",
            self.request_seconds.clone(),
        );
        registry
    }
}
