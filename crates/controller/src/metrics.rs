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
pub struct ScopeLabels {
    pub node: String,
    pub scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

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
    /// Per scope, from the agents' reports: measured rate, leased rate, the current lease's
    /// counters. Counters restart with each new lease, so they are gauges.
    pub scope_rate: Family<ScopeLabels, FloatGauge>,
    pub scope_leased: Family<ScopeLabels, Gauge>,
    pub scope_bytes: Family<ScopeLabels, Gauge>,
    pub scope_dropped: Family<ScopeLabels, Gauge>,
    pub node_last_report: Family<NodeLabel, FloatGauge>,
    pub telemetry_reports: Counter,
    pub telemetry_series: Gauge,
    pub telemetry_memory: Gauge,
    pub event_subscribers: Gauge,
    pub mesh_updates_sent: Counter,
    pub mesh_published: Gauge,
    pub mesh_rotations: Counter,
    pub tamper_reports: Counter,
    pub topology_findings: Family<FindingLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct FindingLabels {
    pub kind: String,
    pub severity: String,
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
        let scope_rate = Family::<ScopeLabels, FloatGauge>::default();
        registry.register(
            "scope_rate_bits_per_second",
            "Measured rate of a lease scope over the agent's last report interval",
            scope_rate.clone(),
        );
        let scope_leased = Family::<ScopeLabels, Gauge>::default();
        registry.register(
            "scope_leased_bits_per_second",
            "Granted rate of the scope's active lease (0: none, the floor applies)",
            scope_leased.clone(),
        );
        let scope_bytes = Family::<ScopeLabels, Gauge>::default();
        registry.register(
            "scope_lease_bytes",
            "Bytes counted under the scope's current lease (restarts with each lease)",
            scope_bytes.clone(),
        );
        let scope_dropped = Family::<ScopeLabels, Gauge>::default();
        registry.register(
            "scope_lease_dropped_packets",
            "Packets dropped under the scope's current lease (restarts with each lease)",
            scope_dropped.clone(),
        );
        let node_last_report = Family::<NodeLabel, FloatGauge>::default();
        registry.register(
            "node_last_report_timestamp_seconds",
            "Unix time of the node's last usage report",
            node_last_report.clone(),
        );
        let telemetry_reports = Counter::default();
        registry.register(
            "telemetry_reports",
            "Usage reports received from agents",
            telemetry_reports.clone(),
        );
        let telemetry_series = Gauge::default();
        registry.register(
            "telemetry_series",
            "(node, scope) series held in memory",
            telemetry_series.clone(),
        );
        let telemetry_memory = Gauge::default();
        registry.register(
            "telemetry_history_bytes",
            "Memory held by the 1-second history (fixed per series)",
            telemetry_memory.clone(),
        );
        let event_subscribers = Gauge::default();
        registry.register(
            "event_stream_subscribers",
            "Open live event streams (dashboards)",
            event_subscribers.clone(),
        );
        let mesh_updates_sent = Counter::default();
        registry.register(
            "mesh_updates_sent",
            "Signed peer-set updates pushed to agents (one per recipient)",
            mesh_updates_sent.clone(),
        );
        let mesh_published = Gauge::default();
        registry.register(
            "mesh_published_nodes",
            "Nodes whose WireGuard entry is currently published to their group's peers",
            mesh_published.clone(),
        );
        let mesh_rotations = Counter::default();
        registry.register(
            "mesh_key_rotations",
            "WireGuard key rotations recorded",
            mesh_rotations.clone(),
        );
        let tamper_reports = Counter::default();
        registry.register(
            "tamper_reports",
            "Nodes declared tampered",
            tamper_reports.clone(),
        );
        let topology_findings = Family::<FindingLabels, Gauge>::default();
        registry.register(
            "topology_findings",
            "Open interconnect-verification findings by kind and severity",
            topology_findings.clone(),
        );
        Metrics {
            topology_findings,
            mesh_updates_sent,
            mesh_published,
            mesh_rotations,
            tamper_reports,
            scope_rate,
            scope_leased,
            scope_bytes,
            scope_dropped,
            node_last_report,
            telemetry_reports,
            telemetry_series,
            telemetry_memory,
            event_subscribers,
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

    /// Sets the open findings per kind and severity (kinds with none go back to 0).
    pub fn set_topology_findings(
        &self,
        counts: &std::collections::BTreeMap<
            (
                nicwarden_topology::FindingKind,
                nicwarden_topology::Severity,
            ),
            i64,
        >,
    ) {
        for kind in nicwarden_topology::FindingKind::ALL {
            for severity in [
                nicwarden_topology::Severity::Info,
                nicwarden_topology::Severity::Warning,
                nicwarden_topology::Severity::Critical,
            ] {
                let labels = FindingLabels {
                    kind: kind.as_str().to_string(),
                    severity: format!("{severity:?}").to_lowercase(),
                };
                match counts.get(&(kind, severity)) {
                    Some(n) => {
                        self.topology_findings.get_or_create(&labels).set(*n);
                    }
                    None => {
                        if let Some(g) = self.topology_findings.get(&labels) {
                            g.set(0);
                        }
                    }
                }
            }
        }
    }

    /// Updates a scope's series from a report received at `now_ms`.
    pub fn observe_scope(
        &self,
        node: &str,
        s: &nicwarden_telemetry::ReportScope,
        leased_bps: u64,
        rate_bps: f64,
        now_ms: u64,
    ) {
        let l = ScopeLabels {
            node: node.to_string(),
            scope: s.scope.clone(),
        };
        let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
        self.scope_leased.get_or_create(&l).set(clamp(leased_bps));
        self.scope_bytes.get_or_create(&l).set(clamp(s.bytes));
        self.scope_dropped
            .get_or_create(&l)
            .set(clamp(s.dropped_packets));
        self.node_last_report
            .get_or_create(&NodeLabel {
                node: node.to_string(),
            })
            .set(now_ms as f64 / 1000.0);
        self.scope_rate.get_or_create(&l).set(rate_bps);
    }

    /// Drops a removed node's series.
    pub fn forget_node(&self, node: &str, scopes: &[String]) {
        for scope in scopes {
            let l = ScopeLabels {
                node: node.to_string(),
                scope: scope.clone(),
            };
            self.scope_rate.remove(&l);
            self.scope_leased.remove(&l);
            self.scope_bytes.remove(&l);
            self.scope_dropped.remove(&l);
        }
        self.node_last_report.remove(&NodeLabel {
            node: node.to_string(),
        });
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
