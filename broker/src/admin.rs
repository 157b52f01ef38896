//! What the admin listener serves: the registry of the broker's metrics
//! ([`crate::metrics`], recorded as things happen) and the gauges read from
//! its state at each scrape ([`StateCollector`]): exchanges in flight, the
//! log's size, the replica's sequencing, refused connections and calls,
//! connector circuits; certificate and CRL lifetimes come from
//! [`onceonly_certs::metrics`]. Apart from `metrics` so that the request
//! path's counters do not depend on the broker they count.

use std::sync::{Arc, Weak};

use onceonly_certs::ReloadableServerTls;
use onceonly_certs::metrics::gauge;
use onceonly_certs::security::RefusalKind;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::exchange::Broker;

/// The registry the admin listener serves: `broker`'s recorded metrics and
/// its state at each scrape.
pub fn registry(broker: &Arc<Broker>, tls: Arc<ReloadableServerTls>) -> Registry {
    let mut registry = Registry::default();
    let metrics = &broker.metrics;
    registry.register(
        "onceonly_exchanges",
        "Evidence exchanges, by evidence type, audit outcome and ErrorReason",
        metrics.exchanges.clone(),
    );
    registry.register(
        "onceonly_exchange_duration_seconds",
        "Exchanges from arrival to their durable audit record",
        metrics.exchange_seconds.clone(),
    );
    registry.register(
        "onceonly_connector_duration_seconds",
        "Forwards to a connector, by connector (every endpoint tried)",
        metrics.connector_seconds.clone(),
    );
    registry.register(
        "onceonly_audit_append_duration_seconds",
        "One audit append, from queued to durable",
        metrics.audit_append_seconds.clone(),
    );
    let audit = broker.audit.metrics();
    registry.register(
        "onceonly_audit_fsync_duration_seconds",
        "One fdatasync of the audit log file",
        audit.fsync_seconds.clone(),
    );
    registry.register(
        "onceonly_audit_batch_records",
        "Records per group-commit batch of the audit log",
        audit.batch_records.clone(),
    );
    registry.register_collector(Box::new(StateCollector {
        broker: Arc::downgrade(broker),
    }));
    registry.register_collector(Box::new(onceonly_certs::metrics::TlsLifetimes::new(
        tls, "broker",
    )));
    registry
}

/// The registry as text, for one scrape.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::error!(error = %e, "cannot encode the metrics");
    }
    text
}

/// Gauges and counters read from the broker's state at each scrape.
#[derive(Debug)]
pub struct StateCollector {
    broker: Weak<Broker>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    connector: String,
    endpoint: String,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(broker) = self.broker.upgrade() else {
            return Ok(());
        };
        gauge(
            &mut encoder,
            "onceonly_exchanges_in_flight",
            "Exchanges with a register now",
            broker.exchanges.in_flight() as f64,
        )?;
        gauge(
            &mut encoder,
            "onceonly_exchanges_waiting",
            "Exchanges waiting for a slot to a register",
            broker.exchanges.waiting() as f64,
        )?;
        gauge(
            &mut encoder,
            "onceonly_audit_tree_size",
            "Records covered by the audit log's latest signed tree head",
            broker.audit.tree_size() as f64,
        )?;
        gauge(
            &mut encoder,
            "onceonly_audit_refusing",
            "1 while the audit log refuses appends (readiness is NOT_SERVING)",
            f64::from(u8::from(broker.audit.refusing().is_some())),
        )?;
        let revocations = broker.consents.revocations();
        gauge(
            &mut encoder,
            "onceonly_revocations_followed",
            "Audit log entries read and checked against the signed head for consent revocations",
            revocations.followed() as f64,
        )?;
        gauge(
            &mut encoder,
            "onceonly_revocations_known",
            "Consents known revoked from the audit log (or revoked by this broker since its start)",
            revocations.count() as f64,
        )?;
        gauge(
            &mut encoder,
            "onceonly_revocations_check_failures",
            "Rounds in which the audit log's entries did not check out against its signed head while reading revocations",
            revocations.failed_checks() as f64,
        )?;
        gauge(
            &mut encoder,
            "onceonly_consent_rows_written_back",
            "Consent rows read that said active for a consent the audit log has revoked (an old row written back); each counted as revoked",
            revocations.written_back() as f64,
        )?;
        if let Some(replica) = broker.audit.replica_gauges() {
            gauge(
                &mut encoder,
                "onceonly_audit_sequencer",
                "1 while this replica holds the sequencer lease",
                f64::from(u8::from(replica.sequencer)),
            )?;
            gauge(
                &mut encoder,
                "onceonly_audit_sequencer_failed_runs",
                "Sequencing runs of this replica that failed (a cut connection, the database)",
                replica.failed_runs as f64,
            )?;
            gauge(
                &mut encoder,
                "onceonly_audit_quarantined",
                "Queued rows this replica's sequencer set aside (not written by a replica, or undecodable)",
                replica.quarantined as f64,
            )?;
            gauge(
                &mut encoder,
                "onceonly_audit_receipts_broken",
                "Receipts this replica gave whose records never reached the log (a queued row deleted before it was sequenced); the replica then refuses requests",
                replica.receipts_broken as f64,
            )?;
            gauge(
                &mut encoder,
                "onceonly_audit_queue_gaps",
                "Queued records this replica's sequencer found missing from their replica's numbering (deleted before they were sequenced; listed in audit_queue_gaps)",
                replica.queue_gaps as f64,
            )?;
        }
        for (name, help, count) in [
            (
                "onceonly_refused_connections",
                "Connections refused at the door or in the TLS handshake, by reason",
                &(|kind| broker.security.connections(kind)) as &dyn Fn(RefusalKind) -> u64,
            ),
            (
                "onceonly_refused_calls",
                "Calls refused because the client's certificate was, by reason",
                &|kind| broker.security.calls(kind),
            ),
        ] {
            let metric_type = ConstCounter::new(0u64).metric_type();
            let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
            for kind in RefusalKind::ALL {
                let labels = ReasonLabel {
                    reason: kind.as_str().to_owned(),
                };
                ConstCounter::new(count(kind)).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "onceonly_connector_endpoint_up",
                "1 while a connector endpoint's circuit is closed, 0 while open",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for (connector, endpoint, up) in broker.forwarder.circuits().states() {
                let labels = EndpointLabels {
                    connector,
                    endpoint,
                };
                ConstGauge::new(i64::from(up)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
