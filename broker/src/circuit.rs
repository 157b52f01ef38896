//! Per-endpoint circuit breakers for connectors, and their active health
//! checks. An endpoint that failed `failure_threshold` times in a row (it
//! could not be reached, or its register said it was down) is *open*: for
//! `open_for` no request tries it, so a dead endpoint costs no connect
//! timeout per request, and failover goes straight to the next. Then one
//! request may probe it (*half-open*): success closes it, failure opens it
//! again. Independently, every `health_interval` each endpoint is asked
//! over gRPC health (`grpc.health.v1.Health/Check`, over the same mutual
//! TLS): a failure counts like a failed request, SERVING closes the
//! circuit. A request whose every endpoint is open fails at once with
//! UNAVAILABLE (CONNECTOR_CIRCUIT_OPEN), audited.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The circuit breakers' settings (`[circuit]` in the broker's
/// configuration).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitConfig {
    /// Consecutive failures that open an endpoint's circuit.
    pub failure_threshold: u32,
    /// How long an open circuit keeps requests away before one may probe.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// How often every endpoint's gRPC health is checked.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// How long one health check may take.
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
            health_interval: Duration::from_secs(5),
            // More than a connect (3 s): a fresh channel's handshake is part
            // of the first check.
            health_timeout: Duration::from_secs(4),
        }
    }
}

/// Whether a request may try an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go.
    Go,
    /// Half-open: this request is the probe.
    Probe,
    /// Open: skip it.
    Skip,
}

#[derive(Debug, Default)]
struct EndpointState {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    /// When the probe under way began (a probe whose request went away
    /// unresolved stops counting after `open_for`).
    probing: Option<Instant>,
}

/// Every endpoint's circuit.
#[derive(Debug)]
pub struct Circuits {
    config: CircuitConfig,
    states: Mutex<HashMap<(String, String), EndpointState>>,
}

impl Circuits {
    /// All closed.
    pub fn new(config: CircuitConfig) -> Self {
        Circuits {
            config,
            states: Mutex::new(HashMap::new()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &CircuitConfig {
        &self.config
    }

    fn with<R>(
        &self,
        connector: &str,
        endpoint: &str,
        f: impl FnOnce(&mut EndpointState) -> R,
    ) -> R {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let state = states
            .entry((connector.to_owned(), endpoint.to_owned()))
            .or_default();
        f(state)
    }

    /// Whether a request may try `endpoint` of `connector` now.
    pub fn admit(&self, connector: &str, endpoint: &str) -> Admission {
        let open_for = self.config.open_for;
        self.with(connector, endpoint, |state| {
            let now = Instant::now();
            let probe_under_way = state
                .probing
                .is_some_and(|began| now.duration_since(began) < open_for);
            match state.open_until {
                None => Admission::Go,
                Some(until) if now < until || probe_under_way => Admission::Skip,
                Some(_) => {
                    state.probing = Some(now);
                    Admission::Probe
                }
            }
        })
    }

    /// The endpoint answered: closed.
    pub fn success(&self, connector: &str, endpoint: &str) {
        let was_open = self.with(connector, endpoint, |state| {
            let was_open = state.open_until.is_some();
            *state = EndpointState::default();
            was_open
        });
        if was_open {
            tracing::info!(%connector, %endpoint, "connector endpoint answers again: circuit closed");
        }
    }

    /// The endpoint failed (unreachable, or its register down).
    pub fn failure(&self, connector: &str, endpoint: &str) {
        let threshold = self.config.failure_threshold.max(1);
        let open_for = self.config.open_for;
        let opened = self.with(connector, endpoint, |state| {
            state.consecutive_failures = state.consecutive_failures.saturating_add(1);
            let opens = state.probing.is_some() || state.consecutive_failures >= threshold;
            let was_open = state.open_until.is_some();
            if opens {
                state.open_until = Some(Instant::now() + open_for);
                state.probing = None;
            }
            opens && !was_open
        });
        if opened {
            tracing::warn!(%connector, %endpoint, ?open_for, "connector endpoint failing: circuit open, requests skip it");
        }
    }

    /// Every endpoint seen, with whether its circuit is closed (up).
    pub fn states(&self) -> Vec<(String, String, bool)> {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = states
            .iter()
            .map(|((connector, endpoint), state)| {
                (
                    connector.clone(),
                    endpoint.clone(),
                    state.open_until.is_none(),
                )
            })
            .collect();
        all.sort();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_open_a_probe_closes_and_a_failed_probe_opens_again() {
        let circuits = Circuits::new(CircuitConfig {
            failure_threshold: 2,
            open_for: Duration::from_millis(30),
            ..CircuitConfig::default()
        });
        assert_eq!(circuits.admit("c", "e"), Admission::Go);
        circuits.failure("c", "e");
        assert_eq!(circuits.admit("c", "e"), Admission::Go, "one failure");
        circuits.failure("c", "e");
        assert_eq!(circuits.admit("c", "e"), Admission::Skip, "open");
        assert_eq!(circuits.states(), vec![("c".into(), "e".into(), false)]);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(circuits.admit("c", "e"), Admission::Probe);
        assert_eq!(
            circuits.admit("c", "e"),
            Admission::Skip,
            "one probe at a time"
        );
        circuits.failure("c", "e");
        assert_eq!(circuits.admit("c", "e"), Admission::Skip, "open again");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(circuits.admit("c", "e"), Admission::Probe);
        circuits.success("c", "e");
        assert_eq!(circuits.admit("c", "e"), Admission::Go, "closed");
        assert_eq!(circuits.states(), vec![("c".into(), "e".into(), true)]);
        // Other endpoints are not affected.
        assert_eq!(circuits.admit("c", "other"), Admission::Go);
    }
}
