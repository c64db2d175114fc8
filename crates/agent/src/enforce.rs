//! From lease decisions to the datapath's desired state, and from kernel counters back to
//! per-lease usage. Pure: no kernel, no clock (time is passed in), so it is unit-tested here.

use crate::config::DatapathConfig;
use nicwarden_datapath::{DesiredState, ScopeCounters, ScopeEnforce, ScopeSpec};
use nicwarden_lease::agent::{Enforce, ScopeDecision};
use nicwarden_lease::{LeaseId, Scope, Time, Usage};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Kernel view of one scope, as shown on the status endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScopeKernel {
    pub scope: String,
    /// Bytes, packets and drops of the scope's shaping class (since the class was made).
    pub bytes: u64,
    pub packets: u64,
    pub drops: u64,
    /// Rate measured over the last sampling interval, bits/s (at the link layer).
    pub rate_bps: u64,
    /// Packets dropped because the lease's volume is spent.
    pub volume_drops: u64,
    /// Arriving from the scope's peers (`ebpf` backend): bytes let in, packets dropped by
    /// the ingress policer or because the scope is blocked.
    #[serde(default)]
    pub ingress_bytes: u64,
    #[serde(default)]
    pub ingress_drops: u64,
}

/// What the datapath part of the agent shows on `/status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DatapathStatus {
    pub backend: String,
    pub fabric_iface: String,
    /// Reconciles that changed something in the kernel, since start.
    pub changes_applied: u64,
    /// The latest reconcile or counter error, cleared by the next success.
    pub last_error: Option<String>,
    /// Peer scopes with a lease but no known fabric address: their traffic cannot be told
    /// apart, so it is enforced under `egress`.
    pub unresolved_peers: Vec<String>,
    pub scopes: Vec<ScopeKernel>,
}

/// Remembers what each lease started from and the previous counter sample.
#[derive(Default)]
pub struct Enforcer {
    /// Usage the controller had recorded when this agent first enforced the lease: the
    /// kernel quota starts from it (only when the kernel does not hold the lease already).
    start_used: BTreeMap<LeaseId, u64>,
    /// Class drops when the lease was first seen, so rate drops are per lease.
    drop_base: BTreeMap<LeaseId, u64>,
    /// Each enforced lease's volume.
    volumes: BTreeMap<LeaseId, u64>,
    last_sample: Option<(Time, BTreeMap<String, u64>)>,
}

impl Enforcer {
    /// The desired kernel state for `decisions`. Peer scopes without a configured address
    /// are returned in the second value and left out (their traffic falls under egress).
    pub fn desired(
        &mut self,
        cfg: &DatapathConfig,
        decisions: &[ScopeDecision],
    ) -> (DesiredState, Vec<String>) {
        let mut unresolved = Vec::new();
        let mut scopes = Vec::new();
        for d in decisions {
            let destinations = match &d.scope {
                Scope::Egress => Vec::new(),
                Scope::Peer(node) => match cfg.peer_prefixes(node) {
                    Some(p) if !p.is_empty() => p,
                    _ => {
                        unresolved.push(node.clone());
                        continue;
                    }
                },
            };
            let enforce = match (d.enforce, d.lease) {
                (
                    Enforce::Allow {
                        rate_bps,
                        burst_bytes,
                        ..
                    },
                    Some(lease),
                ) => {
                    let start = *self.start_used.entry(lease).or_insert(d.usage.bytes);
                    if let Some(v) = d.volume_bytes {
                        self.volumes.insert(lease, v);
                    }
                    ScopeEnforce::Lease {
                        lease,
                        rate_bps,
                        burst_bytes,
                        volume: d.volume_bytes,
                        start_used_bytes: start,
                    }
                }
                (Enforce::Floor { rate_bps }, _) | (Enforce::Allow { rate_bps, .. }, None) => {
                    ScopeEnforce::Floor { rate_bps }
                }
            };
            scopes.push(ScopeSpec {
                scope: d.scope.clone(),
                destinations,
                enforce,
            });
        }
        scopes.sort_by(|a, b| a.scope.cmp(&b.scope));
        // Forget leases no longer enforced anywhere.
        let live: Vec<LeaseId> = decisions.iter().filter_map(|d| d.lease).collect();
        self.start_used.retain(|id, _| live.contains(id));
        self.drop_base.retain(|id, _| live.contains(id));
        self.volumes.retain(|id, _| live.contains(id));
        // Every configured peer is counted on its own (byte conservation), whatever the
        // lease scopes are.
        let peers = cfg
            .peers
            .iter()
            .map(|(node, addrs)| nicwarden_datapath::PeerCount {
                node: node.clone(),
                addrs: addrs.clone(),
            })
            .collect();
        (DesiredState { scopes, peers }, unresolved)
    }

    /// Per-lease usage from kernel counters, and the per-scope kernel view (with rates
    /// measured since the previous sample).
    pub fn usage(
        &mut self,
        now: Time,
        counters: &[ScopeCounters],
    ) -> (Vec<(Scope, LeaseId, Usage)>, Vec<ScopeKernel>) {
        let mut usage = Vec::new();
        let mut kernel = Vec::new();
        let prev = self.last_sample.take();
        let mut sample = BTreeMap::new();
        for c in counters {
            let key = c.scope.to_string();
            let rate_bps = match &prev {
                Some((t, bytes)) if t.millis_until(now) > 0 => bytes
                    .get(&key)
                    .map(|b| c.class.bytes.saturating_sub(*b) * 8 * 1000 / t.millis_until(now))
                    .unwrap_or(0),
                _ => 0,
            };
            sample.insert(key.clone(), c.class.bytes);
            let mut k = ScopeKernel {
                scope: key,
                bytes: c.class.bytes,
                packets: c.class.packets,
                drops: c.class.drops,
                rate_bps,
                volume_drops: 0,
                ingress_bytes: c.ingress.bytes,
                ingress_drops: c.ingress.policed_drops + c.ingress.blocked_drops,
            };
            if let Some(l) = &c.lease {
                let base = *self.drop_base.entry(l.lease).or_insert(c.class.drops);
                k.volume_drops = l.volume_drops;
                // An exact datapath can stop short of the volume by less than a packet and
                // drop from there: that lease is spent all the same.
                let bytes = match self.volumes.get(&l.lease) {
                    Some(v) if l.exhausted => l.used_bytes.max(*v),
                    _ => l.used_bytes,
                };
                usage.push((
                    c.scope.clone(),
                    l.lease,
                    Usage {
                        bytes,
                        packets: l.passed_packets,
                        dropped_packets: l.volume_drops + c.class.drops.saturating_sub(base),
                    },
                ));
            }
            kernel.push(k);
        }
        self.last_sample = Some((now, sample));
        (usage, kernel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nicwarden_datapath::{ClassStats, LeaseCounters};
    use nicwarden_lease::agent::SlotState;

    fn decision(scope: Scope, lease: Option<u64>, enforce: Enforce, used: u64) -> ScopeDecision {
        ScopeDecision {
            scope,
            state: if lease.is_some() {
                SlotState::Active
            } else {
                SlotState::Pending
            },
            lease: lease.map(LeaseId),
            enforce,
            reason: String::new(),
            deadline_in_ms: None,
            seq: None,
            rate_bps: None,
            volume_bytes: Some(1000),
            usage: Usage {
                bytes: used,
                ..Usage::default()
            },
        }
    }

    fn cfg() -> DatapathConfig {
        let mut c = DatapathConfig::default();
        c.peers
            .insert("node2".into(), vec!["198.18.0.2/32".parse().expect("net")]);
        c
    }

    #[test]
    fn desired_maps_leases_floors_and_unresolved_peers() {
        let allow = Enforce::Allow {
            rate_bps: 50_000_000,
            burst_bytes: 65536,
            volume_left: Some(900),
        };
        let decisions = vec![
            decision(Scope::Egress, None, Enforce::Floor { rate_bps: 0 }, 0),
            decision(Scope::Peer("node2".into()), Some(7), allow, 100),
            decision(Scope::Peer("node9".into()), Some(8), allow, 0),
        ];
        let mut e = Enforcer::default();
        let (d, unresolved) = e.desired(&cfg(), &decisions);
        assert_eq!(unresolved, vec!["node9".to_string()]);
        assert_eq!(d.scopes.len(), 2);
        assert_eq!(d.scopes[0].scope, Scope::Egress);
        assert_eq!(d.scopes[0].enforce, ScopeEnforce::Floor { rate_bps: 0 });
        assert_eq!(
            d.scopes[1].enforce,
            ScopeEnforce::Lease {
                lease: LeaseId(7),
                rate_bps: 50_000_000,
                burst_bytes: 65536,
                volume: Some(1000),
                start_used_bytes: 100,
            }
        );
        // Usage grows, but the lease's start stays what it was when first enforced, so the
        // desired state is stable (re-applying it changes nothing).
        let mut later = decisions.clone();
        later[1].usage.bytes = 600;
        let (d2, _) = e.desired(&cfg(), &later);
        assert_eq!(d, d2);
    }

    #[test]
    fn an_exhausted_lease_counts_as_its_whole_volume() {
        // The eBPF datapath is exact: 9 packets of 100 fit a volume of 950, the tenth is
        // dropped, and `used` stays at 900. The lease is spent all the same.
        let mut e = Enforcer::default();
        let allow = Enforce::Allow {
            rate_bps: 1_000,
            burst_bytes: 100,
            volume_left: Some(50),
        };
        let mut d = decision(Scope::Egress, Some(4), allow, 0);
        d.volume_bytes = Some(950);
        e.desired(&cfg(), &[d]);
        let counters = |exhausted| {
            vec![ScopeCounters {
                scope: Scope::Egress,
                class: ClassStats::default(),
                lease: Some(LeaseCounters {
                    lease: LeaseId(4),
                    used_bytes: 900,
                    passed_packets: 9,
                    volume_drops: u64::from(exhausted),
                    exhausted,
                }),
                ingress: nicwarden_datapath::IngressStats::default(),
            }]
        };
        assert_eq!(e.usage(Time(0), &counters(false)).0[0].2.bytes, 900);
        assert_eq!(e.usage(Time(1), &counters(true)).0[0].2.bytes, 950);
    }

    #[test]
    fn usage_from_counters_with_rates_and_per_lease_drops() {
        let mut e = Enforcer::default();
        let sample = |bytes, drops, used| {
            vec![ScopeCounters {
                scope: Scope::Egress,
                class: ClassStats {
                    bytes,
                    packets: bytes / 1000,
                    drops,
                },
                lease: Some(LeaseCounters {
                    lease: LeaseId(3),
                    used_bytes: used,
                    passed_packets: 10,
                    volume_drops: 2,
                    exhausted: false,
                }),
                ingress: nicwarden_datapath::IngressStats::default(),
            }]
        };
        let (u, k) = e.usage(Time(1000), &sample(5000, 4, 700));
        assert_eq!(k[0].rate_bps, 0, "no rate before a second sample");
        assert_eq!(u[0].2.bytes, 700);
        assert_eq!(
            u[0].2.dropped_packets, 2,
            "class drops before the lease are not its own"
        );
        let (u, k) = e.usage(Time(1500), &sample(130_000, 9, 900));
        assert_eq!(k[0].rate_bps, 125_000 * 8 * 2);
        assert_eq!(u[0].2.dropped_packets, 2 + 5);
        assert_eq!(u[0].2.packets, 10);
    }
}
