//! Usage counters for an agent without a kernel datapath (`[datapath] backend = "none"`):
//! `none` (all zero) and `simulated:RATE` (for tests and demos). With a datapath, usage comes
//! from the kernel's counters (see [`crate::enforce`]).

use nicwarden_lease::agent::{Enforce, ScopeDecision};
use nicwarden_lease::{LeaseId, Scope, Time, Usage};
use std::collections::HashMap;

/// A source of cumulative per-lease usage counters.
pub trait UsageSource: Send {
    /// Cumulative usage of each scope's current lease, sampled at `now` given the decisions
    /// currently enforced.
    fn sample(&mut self, now: Time, decisions: &[ScopeDecision]) -> Vec<(Scope, LeaseId, Usage)>;
}

/// A parsed `counters` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterSpec {
    None,
    Simulated { offered_bps: u64 },
}

impl CounterSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "none" {
            return Ok(CounterSpec::None);
        }
        if let Some(rate) = s.strip_prefix("simulated:") {
            let offered_bps = rate.parse::<u64>().map_err(|_| {
                format!("counters: `simulated:RATE` needs RATE in bits/s, got `{rate}`")
            })?;
            if offered_bps == 0 {
                return Err("counters: simulated rate must be > 0".into());
            }
            return Ok(CounterSpec::Simulated { offered_bps });
        }
        Err(format!(
            "counters must be `none` or `simulated:RATE_BPS`, got `{s}`"
        ))
    }

    pub fn build(self) -> Box<dyn UsageSource> {
        match self {
            CounterSpec::None => Box::new(NoCounters),
            CounterSpec::Simulated { offered_bps } => Box::new(Simulated::new(offered_bps)),
        }
    }
}

/// No traffic is counted (no datapath yet).
pub struct NoCounters;

impl UsageSource for NoCounters {
    fn sample(&mut self, _now: Time, decisions: &[ScopeDecision]) -> Vec<(Scope, LeaseId, Usage)> {
        decisions
            .iter()
            .filter_map(|d| d.lease.map(|id| (d.scope.clone(), id, d.usage)))
            .collect()
    }
}

/// Pretends `offered_bps` of traffic is offered in every scope and that the enforced
/// decision lets through `min(offered, allowed)`, never beyond the volume left. Counts
/// 1500-byte packets; what does not fit is counted as dropped.
pub struct Simulated {
    offered_bps: u64,
    last: Option<Time>,
    per_lease: HashMap<LeaseId, (Usage, u64)>, // usage, carry of bits below one byte
}

impl Simulated {
    pub fn new(offered_bps: u64) -> Self {
        Simulated {
            offered_bps,
            last: None,
            per_lease: HashMap::new(),
        }
    }
}

impl UsageSource for Simulated {
    fn sample(&mut self, now: Time, decisions: &[ScopeDecision]) -> Vec<(Scope, LeaseId, Usage)> {
        let dt_ms = self.last.map(|l| l.millis_until(now)).unwrap_or(0);
        self.last = Some(now);
        let mut out = Vec::new();
        for d in decisions {
            let Some(id) = d.lease else { continue };
            let entry = self.per_lease.entry(id).or_insert((d.usage, 0));
            let (usage, carry) = entry;
            let offered_bits = self.offered_bps as u128 * dt_ms as u128 / 1000;
            let allowed_bits = match d.enforce {
                Enforce::Allow {
                    rate_bps,
                    volume_left,
                    ..
                } => {
                    let by_rate = (rate_bps.min(self.offered_bps)) as u128 * dt_ms as u128 / 1000;
                    match volume_left {
                        Some(left) => by_rate.min(left as u128 * 8),
                        None => by_rate,
                    }
                }
                Enforce::Floor { rate_bps } => {
                    (rate_bps.min(self.offered_bps)) as u128 * dt_ms as u128 / 1000
                }
            };
            let bits = allowed_bits + *carry as u128;
            let bytes = (bits / 8) as u64;
            *carry = (bits % 8) as u64;
            usage.bytes = usage.bytes.saturating_add(bytes);
            usage.packets = usage.packets.saturating_add(bytes.div_ceil(1500));
            let dropped_bytes = (offered_bits.saturating_sub(allowed_bits) / 8) as u64;
            usage.dropped_packets = usage
                .dropped_packets
                .saturating_add(dropped_bytes.div_ceil(1500));
            out.push((d.scope.clone(), id, *usage));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_specs() {
        let check = |s: &str, want: Result<CounterSpec, ()>| {
            assert_eq!(CounterSpec::parse(s).map_err(|_| ()), want, "{s}");
        };
        check("none", Ok(CounterSpec::None));
        check(
            "simulated:1000",
            Ok(CounterSpec::Simulated { offered_bps: 1000 }),
        );
        check("simulated:0", Err(()));
        check("simulated:fast", Err(()));
        check("ebpf", Err(()));
        check("", Err(()));
    }
}
