//! The controller's Prometheus metrics: one registry, created at start and handed down.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Every metric the controller exports (names end in their unit, per the style guide).
pub struct Metrics {
    pub registry: Registry,
    /// Leases by state: active, revoked, expired.
    pub leases: Family<StateLabel, Gauge>,
    pub agents_connected: Gauge,
    pub grant_duration: Histogram,
    pub directives_sent: Counter,
    pub lease_expirations: Counter,
    /// Leases whose reported usage reached their volume.
    pub volume_exhausted: Counter,
    pub enrollments: Family<ResultLabel, Counter>,
    pub session_refusals: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nicwarden");
        let leases = Family::<StateLabel, Gauge>::default();
        registry.register("leases", "Leases by state", leases.clone());
        let agents_connected = Gauge::default();
        registry.register(
            "agents_connected",
            "Agents with an open session",
            agents_connected.clone(),
        );
        let grant_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "grant_duration_seconds",
            "Time to grant a lease, from request to persisted and sent",
            grant_duration.clone(),
        );
        let directives_sent = Counter::default();
        registry.register(
            "directives_sent",
            "Signed directives (leases, revocations) pushed to agents",
            directives_sent.clone(),
        );
        let lease_expirations = Counter::default();
        registry.register(
            "lease_expirations",
            "Leases that lapsed without renewal",
            lease_expirations.clone(),
        );
        let volume_exhausted = Counter::default();
        registry.register(
            "lease_volume_exhausted",
            "Leases whose reported usage reached their transfer volume",
            volume_exhausted.clone(),
        );
        let enrollments = Family::<ResultLabel, Counter>::default();
        registry.register(
            "enrollments",
            "Enrollment attempts by result",
            enrollments.clone(),
        );
        let session_refusals = Counter::default();
        registry.register(
            "session_refusals",
            "Agent sessions refused (no or wrong certificate, identity mismatch)",
            session_refusals.clone(),
        );
        Metrics {
            registry,
            leases,
            agents_connected,
            grant_duration,
            directives_sent,
            lease_expirations,
            volume_exhausted,
            enrollments,
            session_refusals,
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
