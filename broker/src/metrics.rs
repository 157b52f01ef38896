//! What the broker is doing, for its operator: metrics in the Prometheus
//! text format (OpenMetrics, by the official `prometheus-client` crate) on
//! a separate admin listener (`[admin] listen`, loopback by default), apart
//! from the mutual-TLS API port so that scraping needs no participant
//! certificate and the API port serves participants only.
//!
//! Here: the counters and histograms the request path and the audit writer
//! record as things happen ([`Metrics`], [`AuditMetrics`]). The registry
//! the admin listener serves, with the gauges read from the broker's state
//! at each scrape, is in the `admin` module. `OPERATIONS.md` lists every
//! metric.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use onceonly_proto::telemetry::latency_buckets;

/// The labels of an exchange.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeLabels {
    /// A catalogued evidence type, or `unknown` (callers' free text never
    /// becomes a label).
    pub evidence_type: String,
    /// The audit outcome, e.g. `delivered`, `denied`.
    pub outcome: String,
    /// The `ErrorReason` name, or `none`.
    pub reason: String,
}

/// The label of a connector.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectorLabels {
    /// The connector id from the routing table.
    pub connector: String,
}

/// What the request path records.
#[derive(Debug)]
pub struct Metrics {
    /// Exchanges by evidence type, outcome and reason.
    pub exchanges: Family<ExchangeLabels, Counter>,
    /// From the call's arrival to its durable record.
    pub exchange_seconds: Histogram,
    /// The forward to a connector, by connector.
    pub connector_seconds: Family<ConnectorLabels, Histogram>,
    /// One audit append, queued to durable.
    pub audit_append_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            exchanges: Family::default(),
            exchange_seconds: Histogram::new(latency_buckets()),
            connector_seconds: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            audit_append_seconds: Histogram::new(latency_buckets()),
        }
    }
}

pub use onceonly_audit_log::AuditMetrics;
