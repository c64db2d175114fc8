//! The telemetry state machine: ingest reports, answer queries, emit minute aggregates.

use crate::ring::{Point, Ring, ScopeState};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// A series is one scope of one node: `(node, scope)`.
pub type SeriesKey = (String, String);

#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// Seconds of 1-second history kept in memory per series.
    pub history_secs: usize,
    /// A node whose last report is older than this is stale.
    pub stale_after_ms: u64,
    /// Scopes kept per node; a report naming more is cut (bounded memory whatever an agent
    /// sends).
    pub max_scopes_per_node: usize,
    /// Lease-term changes kept per series (the chart's leased-rate step line).
    pub max_term_changes: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            history_secs: 3600,
            stale_after_ms: 5000,
            max_scopes_per_node: 64,
            max_term_changes: 256,
        }
    }
}

/// One scope of a report, as decoded from the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportScope {
    pub scope: String,
    /// 0: no lease.
    pub lease_id: u64,
    /// Cumulative counters of the lease (they restart when the lease changes).
    pub bytes: u64,
    pub packets: u64,
    pub dropped_packets: u64,
    pub state: ScopeState,
    pub deadline_in_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct UsageReport {
    /// The agent's monotonic ms when it read its counters (None: use arrival time).
    pub sample_time_ms: Option<u64>,
    pub scopes: Vec<ReportScope>,
}

/// The terms a scope is leased at, from `t_ms` on (a step function).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Terms {
    pub t_ms: u64,
    pub lease_id: Option<u64>,
    pub leased_bps: u64,
    pub floor_bps: u64,
    pub volume_bytes: Option<u64>,
}

/// The latest of a scope.
#[derive(Clone, Debug, PartialEq)]
pub struct ScopeLatest {
    pub scope: String,
    pub lease_id: Option<u64>,
    pub state: ScopeState,
    pub rate_bps: f64,
    pub bytes: u64,
    pub packets: u64,
    pub dropped_packets: u64,
    pub deadline_in_ms: Option<u64>,
    /// Arrival of the report (controller unix ms).
    pub reported_at_ms: u64,
}

/// One minute of one series, for the store.
#[derive(Clone, Debug, PartialEq)]
pub struct MinutePoint {
    pub node: String,
    pub scope: String,
    /// Start of the minute, unix ms.
    pub t_ms: u64,
    pub bytes: u64,
    pub packets: u64,
    pub dropped_packets: u64,
    pub peak_rate_bps: f64,
    pub state: ScopeState,
}

#[derive(Debug)]
struct MinuteAcc {
    minute: u64,
    bytes: u64,
    packets: u64,
    drops: u64,
    peak: f64,
    state: ScopeState,
}

#[derive(Debug)]
struct Baseline {
    lease_id: u64,
    bytes: u64,
    packets: u64,
    drops: u64,
    /// Agent sample time if it sent one, else arrival (they are never mixed).
    at_ms: u64,
    agent_clock: bool,
}

#[derive(Debug)]
struct Series {
    ring: Ring,
    latest: Option<ScopeLatest>,
    base: Option<Baseline>,
    minute: Option<MinuteAcc>,
    terms: VecDeque<Terms>,
}

#[derive(Debug, Default)]
struct NodeTelem {
    scopes: BTreeMap<String, Series>,
    last_report_ms: Option<u64>,
    stale_announced: bool,
}

/// See the crate docs.
#[derive(Debug)]
pub struct Telemetry {
    cfg: TelemetryConfig,
    nodes: HashMap<String, NodeTelem>,
    changed: HashSet<String>,
    minutes: Vec<MinutePoint>,
    reports: u64,
    scopes_refused: u64,
}

/// What [`Telemetry::ingest`] did with a report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ingested {
    pub scopes: usize,
    /// Scopes dropped because the node already has `max_scopes_per_node`.
    pub refused: usize,
}

fn add_minute(out: &mut Vec<MinutePoint>, node: &str, scope: &str, acc: MinuteAcc) {
    out.push(MinutePoint {
        node: node.to_string(),
        scope: scope.to_string(),
        t_ms: acc.minute * 60_000,
        bytes: acc.bytes,
        packets: acc.packets,
        dropped_packets: acc.drops,
        peak_rate_bps: acc.peak,
        state: acc.state,
    });
}

impl Series {
    fn new(cap: usize) -> Series {
        Series {
            ring: Ring::new(cap),
            latest: None,
            base: None,
            minute: None,
            terms: VecDeque::new(),
        }
    }
}

impl Telemetry {
    pub fn new(cfg: TelemetryConfig) -> Telemetry {
        Telemetry {
            cfg,
            nodes: HashMap::new(),
            changed: HashSet::new(),
            minutes: Vec::new(),
            reports: 0,
            scopes_refused: 0,
        }
    }

    pub fn config(&self) -> &TelemetryConfig {
        &self.cfg
    }

    /// Folds one report from `node`, received at `now_ms` (controller unix ms).
    ///
    /// Rates come from the counters' growth over the agent's own sample interval, so the
    /// network's jitter does not distort them. A counter that goes back, or a scope whose
    /// lease changed, restarts the baseline: that second shows no rate rather than a wrong
    /// one.
    pub fn ingest(&mut self, now_ms: u64, node: &str, report: &UsageReport) -> Ingested {
        let cap = self.cfg.history_secs;
        let max_scopes = self.cfg.max_scopes_per_node;
        let nt = self.nodes.entry(node.to_string()).or_default();
        nt.last_report_ms = Some(now_ms);
        nt.stale_announced = false;
        self.changed.insert(node.to_string());
        self.reports += 1;
        let mut out = Ingested::default();
        let sec = now_ms / 1000;
        for s in &report.scopes {
            if !nt.scopes.contains_key(&s.scope) && nt.scopes.len() >= max_scopes {
                out.refused += 1;
                continue;
            }
            out.scopes += 1;
            let series = nt
                .scopes
                .entry(s.scope.clone())
                .or_insert_with(|| Series::new(cap));
            let (at_ms, agent_clock) = match report.sample_time_ms {
                Some(t) => (t, true),
                None => (now_ms, false),
            };
            let (d_bytes, d_packets, d_drops, rate) = match &series.base {
                Some(b)
                    if b.lease_id == s.lease_id
                        && b.agent_clock == agent_clock
                        && s.bytes >= b.bytes
                        && at_ms > b.at_ms =>
                {
                    let db = s.bytes - b.bytes;
                    let dt = at_ms - b.at_ms;
                    (
                        db,
                        s.packets.saturating_sub(b.packets),
                        s.dropped_packets.saturating_sub(b.drops),
                        db as f64 * 8.0 * 1000.0 / dt as f64,
                    )
                }
                // Same sample again (a duplicate): nothing new.
                Some(b)
                    if b.lease_id == s.lease_id
                        && b.agent_clock == agent_clock
                        && at_ms == b.at_ms =>
                {
                    continue;
                }
                _ => (0, 0, 0, 0.0),
            };
            series.base = Some(Baseline {
                lease_id: s.lease_id,
                bytes: s.bytes,
                packets: s.packets,
                drops: s.dropped_packets,
                at_ms,
                agent_clock,
            });
            let clamp32 = |v: u64| v.min(u32::MAX as u64) as u32;
            series.ring.record(
                sec,
                d_bytes,
                clamp32(d_packets),
                clamp32(d_drops),
                rate as f32,
                s.state,
            );
            let minute = sec / 60;
            match &mut series.minute {
                Some(acc) if acc.minute == minute => {
                    acc.bytes += d_bytes;
                    acc.packets += d_packets;
                    acc.drops += d_drops;
                    acc.peak = acc.peak.max(rate);
                    acc.state = s.state;
                }
                Some(acc) if acc.minute > minute => {}
                slot => {
                    if let Some(done) = slot.take() {
                        add_minute(&mut self.minutes, node, &s.scope, done);
                    }
                    *slot = Some(MinuteAcc {
                        minute,
                        bytes: d_bytes,
                        packets: d_packets,
                        drops: d_drops,
                        peak: rate,
                        state: s.state,
                    });
                }
            }
            series.latest = Some(ScopeLatest {
                scope: s.scope.clone(),
                lease_id: (s.lease_id != 0).then_some(s.lease_id),
                state: s.state,
                rate_bps: rate,
                bytes: s.bytes,
                packets: s.packets,
                dropped_packets: s.dropped_packets,
                deadline_in_ms: s.deadline_in_ms,
                reported_at_ms: now_ms,
            });
        }
        self.scopes_refused += out.refused as u64;
        out
    }

    /// Records the terms a scope is leased at from `t.t_ms` (`lease_id` None: no lease).
    /// Only changes are kept, at most `max_term_changes` per series.
    pub fn note_terms(&mut self, node: &str, scope: &str, t: Terms) {
        let cap = self.cfg.history_secs;
        let max = self.cfg.max_term_changes.max(1);
        let max_scopes = self.cfg.max_scopes_per_node;
        let nt = self.nodes.entry(node.to_string()).or_default();
        if !nt.scopes.contains_key(scope) && nt.scopes.len() >= max_scopes {
            return;
        }
        let series = nt
            .scopes
            .entry(scope.to_string())
            .or_insert_with(|| Series::new(cap));
        let same = series.terms.back().is_some_and(|b| {
            (b.lease_id, b.leased_bps, b.floor_bps, b.volume_bytes)
                == (t.lease_id, t.leased_bps, t.floor_bps, t.volume_bytes)
        });
        if same {
            return;
        }
        if series.terms.len() == max {
            series.terms.pop_front();
        }
        series.terms.push_back(t);
        self.changed.insert(node.to_string());
    }

    /// The terms in force over `[from_ms, to_ms]`: the last change at or before `from_ms`
    /// and every change after it.
    pub fn terms(&self, node: &str, scope: &str, from_ms: u64, to_ms: u64) -> Vec<Terms> {
        let Some(s) = self.nodes.get(node).and_then(|n| n.scopes.get(scope)) else {
            return Vec::new();
        };
        let first = s.terms.iter().rposition(|t| t.t_ms <= from_ms).unwrap_or(0);
        s.terms
            .iter()
            .skip(first)
            .filter(|t| t.t_ms <= to_ms)
            .cloned()
            .collect()
    }

    /// The current terms of a scope.
    pub fn current_terms(&self, node: &str, scope: &str) -> Option<&Terms> {
        self.nodes.get(node)?.scopes.get(scope)?.terms.back()
    }

    /// Marks a node as changed for the next live tick (connected, disconnected, ...).
    pub fn mark_changed(&mut self, node: &str) {
        self.changed.insert(node.to_string());
    }

    /// Nodes that changed since the last call, plus nodes that went stale since: each
    /// stale node is announced once until it reports again. Sorted.
    pub fn take_changed(&mut self, now_ms: u64) -> Vec<String> {
        let stale_after = self.cfg.stale_after_ms;
        for (name, nt) in self.nodes.iter_mut() {
            let stale = nt
                .last_report_ms
                .is_none_or(|t| now_ms.saturating_sub(t) > stale_after);
            if stale && !nt.stale_announced && nt.last_report_ms.is_some() {
                nt.stale_announced = true;
                self.changed.insert(name.clone());
            }
        }
        let mut v: Vec<String> = self.changed.drain().collect();
        v.sort();
        v
    }

    pub fn last_report_ms(&self, node: &str) -> Option<u64> {
        self.nodes.get(node)?.last_report_ms
    }

    pub fn is_stale(&self, node: &str, now_ms: u64) -> bool {
        self.last_report_ms(node)
            .is_none_or(|t| now_ms.saturating_sub(t) > self.cfg.stale_after_ms)
    }

    /// The latest of every scope of a node that has reported, by scope name.
    pub fn latest(&self, node: &str) -> Vec<&ScopeLatest> {
        self.nodes
            .get(node)
            .map(|n| {
                n.scopes
                    .values()
                    .filter_map(|s| s.latest.as_ref())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Scopes known for a node (reported or leased), sorted.
    pub fn scopes(&self, node: &str) -> Vec<&str> {
        self.nodes
            .get(node)
            .map(|n| n.scopes.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// 1-second points of a node's scopes (all if `scope` is None) in `[from_ms, to_ms]`.
    pub fn series(
        &self,
        node: &str,
        scope: Option<&str>,
        from_ms: u64,
        to_ms: u64,
    ) -> Vec<(String, Vec<Point>)> {
        let Some(nt) = self.nodes.get(node) else {
            return Vec::new();
        };
        nt.scopes
            .iter()
            .filter(|(name, _)| scope.is_none_or(|s| s == name.as_str()))
            .map(|(name, s)| (name.clone(), s.ring.range(from_ms / 1000, to_ms / 1000)))
            .collect()
    }

    /// Closes every minute that ended before `now_ms`'s minute and returns all closed
    /// minutes not yet taken (for the store).
    pub fn take_minutes(&mut self, now_ms: u64) -> Vec<MinutePoint> {
        let current = now_ms / 60_000;
        for (node, nt) in self.nodes.iter_mut() {
            for (scope, s) in nt.scopes.iter_mut() {
                if s.minute.as_ref().is_some_and(|m| m.minute < current) {
                    if let Some(done) = s.minute.take() {
                        add_minute(&mut self.minutes, node, scope, done);
                    }
                }
            }
        }
        std::mem::take(&mut self.minutes)
    }

    /// Forgets a node (removed from the fleet).
    pub fn remove_node(&mut self, node: &str) {
        self.nodes.remove(node);
        self.changed.remove(node);
    }

    /// Drops series with no point and no term change within the history window (a scope
    /// that stopped being reported), so the series count follows the live fleet.
    pub fn gc(&mut self, now_ms: u64) {
        let horizon_s = (now_ms / 1000).saturating_sub(self.cfg.history_secs as u64);
        for nt in self.nodes.values_mut() {
            nt.scopes.retain(|_, s| {
                let last_point = s.ring.newest_sec().unwrap_or(0);
                let last_term = s.terms.back().map(|t| t.t_ms / 1000).unwrap_or(0);
                let live_lease = s.terms.back().is_some_and(|t| t.lease_id.is_some());
                live_lease || last_point.max(last_term) >= horizon_s
            });
        }
    }

    pub fn series_count(&self) -> usize {
        self.nodes.values().map(|n| n.scopes.len()).sum()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Reports ingested since start.
    pub fn reports(&self) -> u64 {
        self.reports
    }

    /// Scopes refused since start (over `max_scopes_per_node`).
    pub fn scopes_refused(&self) -> u64 {
        self.scopes_refused
    }

    /// Heap bytes of the 1-second history (the dominant, fixed part of the cost).
    pub fn memory_bytes(&self) -> usize {
        self.nodes
            .values()
            .flat_map(|n| n.scopes.values())
            .map(|s| s.ring.memory_bytes())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(name: &str, lease: u64, bytes: u64, state: ScopeState) -> ReportScope {
        ReportScope {
            scope: name.into(),
            lease_id: lease,
            bytes,
            packets: bytes / 1000,
            dropped_packets: 0,
            state,
            deadline_in_ms: Some(10_000),
        }
    }

    fn report(sample: u64, scopes: Vec<ReportScope>) -> UsageReport {
        UsageReport {
            sample_time_ms: Some(sample),
            scopes,
        }
    }

    fn small() -> Telemetry {
        Telemetry::new(TelemetryConfig {
            history_secs: 120,
            ..Default::default()
        })
    }

    #[test]
    fn rate_comes_from_the_agents_sample_times_not_arrival() {
        let mut t = small();
        let a = ScopeState::Active;
        t.ingest(
            1_000_000,
            "n1",
            &report(5_000, vec![scope("egress", 1, 0, a)]),
        );
        // Arrives 1.7 s later, but the agent sampled exactly 1 s after the first sample.
        t.ingest(
            1_001_700,
            "n1",
            &report(6_000, vec![scope("egress", 1, 12_500_000, a)]),
        );
        let l = t.latest("n1");
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].rate_bps, 100_000_000.0);
        assert_eq!(l[0].lease_id, Some(1));
        let s = t.series("n1", Some("egress"), 0, u64::MAX);
        let pts = &s[0].1;
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[1].bytes, 12_500_000);
        assert_eq!(pts[1].rate_bps, 100_000_000.0);
        assert_eq!(pts[1].t_ms, 1_001_000);
    }

    #[test]
    fn arrival_time_is_used_without_a_sample_time() {
        let mut t = small();
        let r = |b| UsageReport {
            sample_time_ms: None,
            scopes: vec![scope("egress", 1, b, ScopeState::Active)],
        };
        t.ingest(10_000, "n", &r(0));
        t.ingest(12_000, "n", &r(1_000));
        assert_eq!(t.latest("n")[0].rate_bps, 4_000.0);
    }

    #[test]
    fn a_new_lease_or_a_counter_reset_restarts_the_baseline() {
        let mut t = small();
        let a = ScopeState::Active;
        t.ingest(
            1_000,
            "n",
            &report(1_000, vec![scope("egress", 1, 5_000, a)]),
        );
        t.ingest(2_000, "n", &report(2_000, vec![scope("egress", 2, 100, a)]));
        assert_eq!(t.latest("n")[0].rate_bps, 0.0);
        t.ingest(3_000, "n", &report(3_000, vec![scope("egress", 2, 50, a)]));
        assert_eq!(t.latest("n")[0].rate_bps, 0.0);
        t.ingest(
            4_000,
            "n",
            &report(4_000, vec![scope("egress", 2, 1_050, a)]),
        );
        assert_eq!(t.latest("n")[0].rate_bps, 8_000.0);
    }

    #[test]
    fn duplicate_samples_are_ignored() {
        let mut t = small();
        let a = ScopeState::Active;
        t.ingest(1_000, "n", &report(1_000, vec![scope("egress", 1, 0, a)]));
        t.ingest(
            2_000,
            "n",
            &report(2_000, vec![scope("egress", 1, 1_000, a)]),
        );
        t.ingest(
            2_100,
            "n",
            &report(2_000, vec![scope("egress", 1, 1_000, a)]),
        );
        let pts = &t.series("n", None, 0, u64::MAX)[0].1;
        assert_eq!(pts.iter().map(|p| p.bytes).sum::<u64>(), 1_000);
    }

    #[test]
    fn scopes_per_node_are_bounded() {
        let mut t = Telemetry::new(TelemetryConfig {
            history_secs: 10,
            max_scopes_per_node: 2,
            ..Default::default()
        });
        let scopes = (0..5)
            .map(|i| scope(&format!("peer:p{i}"), 1, 0, ScopeState::Active))
            .collect();
        let r = t.ingest(1_000, "n", &report(1, scopes));
        assert_eq!(
            r,
            Ingested {
                scopes: 2,
                refused: 3
            }
        );
        assert_eq!(t.series_count(), 2);
        assert_eq!(t.memory_bytes(), 2 * 10 * crate::ring::POINT_BYTES);
    }

    #[test]
    fn minutes_aggregate_and_close() {
        let mut t = small();
        let a = ScopeState::Active;
        // 0..=59 s of minute 1, each second 1,000 bytes.
        for i in 0..=60u64 {
            t.ingest(
                60_000 + i * 1000,
                "n",
                &report(i * 1000, vec![scope("egress", 1, i * 1000, a)]),
            );
        }
        // The report at 120 s (minute 2) closed minute 1.
        let m = t.take_minutes(121_000);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].t_ms, 60_000);
        assert_eq!(m[0].bytes, 59_000);
        assert_eq!(m[0].peak_rate_bps, 8_000.0);
        // Minute 2 closes when time passes it, even with no further report.
        let m = t.take_minutes(180_000);
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].t_ms, m[0].bytes), (120_000, 1_000));
        assert!(t.take_minutes(500_000).is_empty());
    }

    #[test]
    fn changes_and_staleness_are_announced_once() {
        let mut t = small();
        t.ingest(1_000, "a", &report(1, vec![]));
        t.ingest(1_000, "b", &report(1, vec![]));
        assert_eq!(t.take_changed(1_500), vec!["a", "b"]);
        assert!(t.take_changed(2_000).is_empty());
        t.ingest(5_000, "a", &report(2, vec![]));
        // b last reported at 1 s: stale after 6 s.
        assert_eq!(t.take_changed(6_500), vec!["a", "b"]);
        assert!(t.is_stale("b", 6_500));
        assert!(!t.is_stale("a", 6_500));
        assert!(t.take_changed(7_000).is_empty());
        t.mark_changed("a");
        assert_eq!(t.take_changed(7_000), vec!["a"]);
    }

    fn terms(t_ms: u64, lease_id: Option<u64>, leased_bps: u64, volume: Option<u64>) -> Terms {
        Terms {
            t_ms,
            lease_id,
            leased_bps,
            floor_bps: 0,
            volume_bytes: volume,
        }
    }

    #[test]
    fn terms_are_a_step_function_of_changes() {
        let mut t = small();
        t.note_terms("n", "egress", terms(1_000, Some(1), 100, None));
        t.note_terms("n", "egress", terms(2_000, Some(1), 100, None));
        t.note_terms("n", "egress", terms(3_000, Some(1), 50, Some(9)));
        t.note_terms("n", "egress", terms(4_000, None, 0, None));
        let all = t.terms("n", "egress", 0, u64::MAX);
        assert_eq!(
            all.iter().map(|x| x.t_ms).collect::<Vec<_>>(),
            vec![1_000, 3_000, 4_000]
        );
        // The window starting at 3.5 s includes the terms in force then.
        let w = t.terms("n", "egress", 3_500, 10_000);
        assert_eq!(
            w.iter().map(|x| x.t_ms).collect::<Vec<_>>(),
            vec![3_000, 4_000]
        );
        assert_eq!(
            t.current_terms("n", "egress").map(|x| x.lease_id),
            Some(None)
        );
    }

    #[test]
    fn gc_drops_dead_series_but_keeps_leased_ones() {
        let mut t = small();
        let a = ScopeState::Active;
        t.ingest(1_000, "n", &report(1, vec![scope("peer:x", 0, 0, a)]));
        t.note_terms("n", "egress", terms(1_000, Some(3), 10, None));
        t.gc(1_000_000);
        assert_eq!(t.scopes("n"), vec!["egress"]);
        t.remove_node("n");
        assert_eq!(t.series_count(), 0);
    }
}
