//! Validation of a [`DesiredState`] and its translation into the kernel layout ([`Plan`]).
//!
//! Pure: no I/O. The plan is the single source of the numbers both backends (tc and nftables)
//! program, so the two can never disagree about a scope's class, prefixes or lease.
//!
//! # Numbering (the reconcile keys)
//!
//! | object | key |
//! |---|---|
//! | root qdisc | `htb 1: default 3 direct_qlen 0` |
//! | control class (ARP, link probes) | `1:2`, leaf `2:`, filters `protocol arp pref 1 handle ::1` and `protocol 0x88b5 pref 2 handle ::1` |
//! | drop class (unclassified) | `1:3`, leaf `3:` (`pfifo limit 0`) |
//! | egress scope | class `1:10`, leaf `10:`, filter `protocol all pref 1000 handle ::1` |
//! | peer scope *i* | class `1:(0x100 + i)`, leaf `(0x100 + i):`, filters `protocol ip pref (100 + i) handle ::(k + 1)` for its *k*-th prefix |
//!
//! *i* is the index of the peer in the sorted order of peer names (the order of [`Scope`]).
//!
//! The filters are laid out only with [`Steering::U32Filters`] (the tc backend). With
//! [`Steering::SkbPriority`] (the eBPF backend) the plan has no filters: the eBPF program
//! classifies each packet and names its class in `skb->priority`, which HTB honours; a plan
//! without filters also makes the tc reconcile delete any u32 filters it finds on `1:`.
//! Adding or removing a peer therefore renumbers the peers after it: their classes keep their
//! minor but change their parameters, so the tc class statistics of a minor follow the slot,
//! not the peer. Per-lease accounting lives in nftables objects named after the lease id and
//! is not affected.
//!
//! # Burst and quantum
//!
//! HTB keeps a class's burst as a `u32` count of 64 ns ticks of transmission time at the class
//! rate, so a burst worth more than ~274 s of the rate silently wraps; and a burst of less
//! than about one millisecond of the rate keeps HTB from reaching the rate at high speeds. So
//! the effective burst is:
//!
//! * requested: the lease's `burst_bytes`, or, when that is 0 (and for floors), the default
//!   `max(rate × 5 ms, 64 KiB)`;
//! * raised to at least `max(rate × 1 ms, 2 × 1514 B)`;
//! * capped at `rate × 10 s` (far below the tick wrap).
//!
//! The quantum is set explicitly to `clamp(rate / 10 (bytes), 1514, 200000)`, so HTB never
//! derives it from `r2q` (and never warns "quantum is big/small"). All scope classes are
//! siblings under the root with `ceil = rate`, so they never borrow and the quantum does not
//! affect sharing.

use crate::{DatapathError, DesiredState, ScopeEnforce};
use ipnet::Ipv4Net;
use nicwarden_lease::{LeaseId, Scope};
use std::collections::BTreeSet;

/// Minor of the control class (ARP, link probes).
pub const CONTROL_MINOR: u16 = 0x2;
/// Minor of the drop class (HTB default: whatever no filter classifies).
pub const DROP_MINOR: u16 = 0x3;
/// Minor of the egress scope's class.
pub const EGRESS_MINOR: u16 = 0x10;
/// Minor of the first peer scope's class.
pub const PEER_MINOR_BASE: u16 = 0x100;
/// Filter preference of the ARP filter.
pub const ARP_PREF: u16 = 1;
/// Filter preference of the link-probe filter (EtherType 0x88B5, to the control class: probes
/// are never throttled by quotas).
pub const PROBE_PREF: u16 = 2;
/// The link probes' EtherType as `tc filter add ... protocol` takes it. `tc -j filter show`
/// prints it back as `[34997]` (iproute2 names only the protocols it knows), see
/// [`same_protocol`].
pub const PROBE_PROTOCOL: &str = "0x88b5";
/// Filter preference of the first peer scope.
pub const PEER_PREF_BASE: u16 = 100;
/// Filter preference of the egress catch-all filter.
pub const EGRESS_PREF: u16 = 1000;
/// At most this many peer scopes (their prefs must stay below [`EGRESS_PREF`]).
pub const MAX_PEER_SCOPES: usize = (EGRESS_PREF - PEER_PREF_BASE) as usize;
/// At most this many prefixes per peer scope after aggregation (u32 node ids are 12 bits).
pub const MAX_PREFIXES_PER_SCOPE: usize = 0xfff;
/// At most this many counted peers ([`crate::DesiredState::peers`]; the eBPF map
/// `nw_peer_stats` has one entry per peer).
pub const MAX_PEERS: usize = 1024;
/// At most this many peer addresses in all, after aggregation (entries of `nw_peer`).
pub const MAX_PEER_ADDRS: usize = 4096;
/// Longest peer node name in bytes (node names are at most 63; the eBPF backend keeps each
/// in a 64-byte slot).
pub const MAX_PEER_NAME_LEN: usize = 63;
/// The kernel keeps rates in bytes/s: 8 bit/s is the smallest non-zero rate.
pub const MIN_RATE_BPS: u64 = 8;
/// Highest accepted rate (4 Tbit/s); far above any NIC, far below the kernel's overflow.
pub const MAX_RATE_BPS: u64 = 4_000_000_000_000;
/// The `over` of the quota of a lease without a volume: the quota still records used bytes
/// (kernel state that survives agent restarts) but never fires.
pub const UNLIMITED_VOLUME: u64 = 1 << 62;
/// Largest accepted volume (anything larger would collide with [`UNLIMITED_VOLUME`]).
pub const MAX_VOLUME_BYTES: u64 = UNLIMITED_VOLUME - 1;
/// Rate of the control class (ARP, link probes: a probe and at most a few dozen answers of
/// a few hundred bytes per interval and port).
pub const CONTROL_RATE_BPS: u64 = 1_000_000;

const MTU_FRAME_BYTES: u64 = 1514;
const DEFAULT_BURST_MIN_BYTES: u64 = 64 * 1024;
const QUANTUM_MAX: u64 = 200_000;

/// Leaf queue length of a scope that passes traffic.
pub const LEAF_LIMIT_PASS: u32 = 1000;
/// Leaf queue length of the control class.
pub const LEAF_LIMIT_CONTROL: u32 = 100;

/// Parameters of one HTB class and its leaf `pfifo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassPlan {
    pub minor: u16,
    /// "egress", "peer:NODE", "control" or "drop".
    pub label: String,
    /// rate = ceil, in bit/s, a multiple of 8 (what the kernel stores).
    pub rate_bps: u64,
    /// burst = cburst, bytes.
    pub burst_bytes: u64,
    pub quantum: u64,
    /// Leaf `pfifo limit`; 0 drops every packet.
    pub leaf_limit: u32,
}

/// What one u32 filter matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterMatch {
    /// `match u32 0 0` (everything).
    All,
    /// `match ip dst PREFIX`.
    IpDst(Ipv4Net),
}

/// Whether a filter protocol as a plan writes it (`arp`, `0x88b5`, ...) and as `tc -j filter
/// show` prints it (`arp`, `[34997]`, ...) name the same protocol. Names compare as they are;
/// numbers (`0x88b5`, `[34997]`, `34997`) by value.
pub fn same_protocol(plan: &str, shown: &str) -> bool {
    fn number(s: &str) -> Option<u32> {
        let s = s.trim();
        if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            return number(inner);
        }
        match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        }
    }
    plan == shown || matches!((number(plan), number(shown)), (Some(a), Some(b)) if a == b)
}

impl FilterMatch {
    /// (value, mask, offset) of the u32 key, as `tc -j filter show` reports it.
    pub fn key(&self) -> (u32, u32, i64) {
        match self {
            FilterMatch::All => (0, 0, 0),
            FilterMatch::IpDst(net) => (u32::from(net.network()), u32::from(net.netmask()), 16),
        }
    }
    pub fn render(&self) -> String {
        match self {
            FilterMatch::All => "match u32 0 0".to_string(),
            FilterMatch::IpDst(net) => format!("match ip dst {net}"),
        }
    }
}

/// One u32 filter on `parent 1:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterPlan {
    pub pref: u16,
    /// Node id within the pref's hash table (`handle ::node`), from 1.
    pub node: u32,
    /// "arp", [`PROBE_PROTOCOL`], "ip" or "all".
    pub protocol: &'static str,
    pub matcher: FilterMatch,
    /// Target class minor.
    pub class_minor: u16,
    pub label: String,
}

/// The lease part of a scope, as nftables enforces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeasePlan {
    pub id: LeaseId,
    pub volume: Option<u64>,
    /// The quota's `over`: the volume, or [`UNLIMITED_VOLUME`].
    pub over: u64,
    /// Where counting starts for a quota seen for the first time (≤ `over`).
    pub start_used: u64,
}

/// One scope, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopePlan {
    pub scope: Scope,
    pub class_minor: u16,
    /// Aggregated, sorted destination prefixes (empty for egress).
    pub prefixes: Vec<Ipv4Net>,
    pub lease: Option<LeasePlan>,
    /// At a floor of 0: nftables (or the eBPF program) drops the scope's traffic as well as
    /// tc (see `nft.rs`).
    pub blocked: bool,
}

/// How packets reach their HTB class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steering {
    /// u32 filters on the root qdisc (the tc backend): ARP and link probes to the control
    /// class, each peer
    /// prefix to its scope's class, everything else to egress.
    U32Filters,
    /// No filters: something before HTB (the eBPF backend's program) sets `skb->priority` to
    /// the class id; what names no class falls to the default (drop) class.
    SkbPriority,
}

/// One counted peer, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPlan {
    pub node: String,
    /// Aggregated, sorted; never empty.
    pub addrs: Vec<Ipv4Net>,
}

/// The whole kernel layout for one desired state on one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub dev: String,
    /// The counted peers, sorted by node (see [`crate::DesiredState::peers`]).
    pub peers: Vec<PeerPlan>,
    /// Sorted by scope (egress first, then peers by name).
    pub scopes: Vec<ScopePlan>,
    /// Sorted by minor; includes the control and drop classes.
    pub classes: Vec<ClassPlan>,
    /// Sorted by (pref, node); empty with [`Steering::SkbPriority`].
    pub filters: Vec<FilterPlan>,
}

impl Plan {
    pub fn class(&self, minor: u16) -> Option<&ClassPlan> {
        self.classes.iter().find(|c| c.minor == minor)
    }

    /// Validates `desired` for device `dev` and lays it out, with u32 filters.
    pub fn build(dev: &str, desired: &DesiredState) -> Result<Plan, DatapathError> {
        Self::build_with(dev, desired, Steering::U32Filters)
    }

    /// Validates `desired` for device `dev` and lays it out; `steering` says whether the plan
    /// carries u32 filters.
    pub fn build_with(
        dev: &str,
        desired: &DesiredState,
        steering: Steering,
    ) -> Result<Plan, DatapathError> {
        validate_iface(dev)?;
        let invalid = |msg: String| Err(DatapathError::Invalid(msg));

        let mut specs: Vec<&crate::ScopeSpec> = desired.scopes.iter().collect();
        specs.sort_by(|a, b| a.scope.cmp(&b.scope));
        for pair in specs.windows(2) {
            if pair[0].scope == pair[1].scope {
                return invalid(format!("scope {} listed twice", pair[0].scope));
            }
        }
        if !specs.iter().any(|s| s.scope == Scope::Egress) {
            return invalid("scope egress missing (it is always present)".to_string());
        }
        let peers = specs.iter().filter(|s| s.scope != Scope::Egress).count();
        if peers > MAX_PEER_SCOPES {
            return invalid(format!(
                "{peers} peer scopes; at most {MAX_PEER_SCOPES} are supported"
            ));
        }

        let mut leases_seen = BTreeSet::new();
        let mut taken: Vec<(u32, u32, Ipv4Net, &Scope)> = Vec::new();
        let mut plan = Plan {
            dev: dev.to_string(),
            peers: build_peers(&desired.peers)?,
            scopes: Vec::new(),
            classes: vec![
                class(
                    CONTROL_MINOR,
                    "control",
                    CONTROL_RATE_BPS,
                    0,
                    LEAF_LIMIT_CONTROL,
                ),
                class(DROP_MINOR, "drop", MIN_RATE_BPS, 0, 0),
            ],
            filters: vec![
                FilterPlan {
                    pref: ARP_PREF,
                    node: 1,
                    protocol: "arp",
                    matcher: FilterMatch::All,
                    class_minor: CONTROL_MINOR,
                    label: "control".to_string(),
                },
                FilterPlan {
                    pref: PROBE_PREF,
                    node: 1,
                    protocol: PROBE_PROTOCOL,
                    matcher: FilterMatch::All,
                    class_minor: CONTROL_MINOR,
                    label: "control".to_string(),
                },
            ],
        };

        let mut peer_index: u16 = 0;
        for spec in specs {
            let label = spec.scope.to_string();
            let (class_minor, pref) = match &spec.scope {
                Scope::Egress => {
                    if !spec.destinations.is_empty() {
                        return invalid(
                            "scope egress must not list destinations (it is everything the peer scopes do not match)"
                                .to_string(),
                        );
                    }
                    (EGRESS_MINOR, EGRESS_PREF)
                }
                Scope::Peer(name) => {
                    if name.is_empty() {
                        return invalid("peer scope with an empty node name".to_string());
                    }
                    let i = peer_index;
                    peer_index += 1;
                    (PEER_MINOR_BASE + i, PEER_PREF_BASE + i)
                }
            };

            let prefixes = Ipv4Net::aggregate(&spec.destinations);
            if prefixes.len() > MAX_PREFIXES_PER_SCOPE {
                return invalid(format!(
                    "scope {label}: {} destination prefixes; at most {MAX_PREFIXES_PER_SCOPE} are supported",
                    prefixes.len()
                ));
            }
            for net in &prefixes {
                let (lo, hi) = interval(net);
                if let Some((_, _, other, other_scope)) =
                    taken.iter().find(|(a, b, _, _)| lo <= *b && *a <= hi)
                {
                    return invalid(format!(
                        "destination {net} of scope {label} overlaps {other} of scope {other_scope}"
                    ));
                }
                taken.push((lo, hi, *net, &spec.scope));
            }

            let (class, lease) = match &spec.enforce {
                ScopeEnforce::Lease {
                    lease,
                    rate_bps,
                    burst_bytes,
                    volume,
                    start_used_bytes,
                } => {
                    check_rate(&label, "lease rate", *rate_bps, false)?;
                    if let Some(v) = volume {
                        if *v > MAX_VOLUME_BYTES {
                            return invalid(format!(
                                "scope {label}: volume {v} bytes above the maximum {MAX_VOLUME_BYTES}"
                            ));
                        }
                    }
                    if !leases_seen.insert(*lease) {
                        return invalid(format!("lease {lease} enforced in two scopes"));
                    }
                    let over = volume.unwrap_or(UNLIMITED_VOLUME);
                    (
                        class(
                            class_minor,
                            &label,
                            *rate_bps,
                            *burst_bytes,
                            LEAF_LIMIT_PASS,
                        ),
                        Some(LeasePlan {
                            id: *lease,
                            volume: *volume,
                            over,
                            start_used: (*start_used_bytes).min(over),
                        }),
                    )
                }
                ScopeEnforce::Floor { rate_bps: 0 } => {
                    (class(class_minor, &label, MIN_RATE_BPS, 0, 0), None)
                }
                ScopeEnforce::Floor { rate_bps } => {
                    check_rate(&label, "floor rate", *rate_bps, true)?;
                    (
                        class(class_minor, &label, *rate_bps, 0, LEAF_LIMIT_PASS),
                        None,
                    )
                }
            };
            plan.classes.push(class);

            match &spec.scope {
                Scope::Egress => plan.filters.push(FilterPlan {
                    pref,
                    node: 1,
                    protocol: "all",
                    matcher: FilterMatch::All,
                    class_minor,
                    label: label.clone(),
                }),
                Scope::Peer(_) => {
                    for (k, net) in prefixes.iter().enumerate() {
                        plan.filters.push(FilterPlan {
                            pref,
                            node: k as u32 + 1,
                            protocol: "ip",
                            matcher: FilterMatch::IpDst(*net),
                            class_minor,
                            label: label.clone(),
                        });
                    }
                }
            }
            plan.scopes.push(ScopePlan {
                scope: spec.scope.clone(),
                class_minor,
                prefixes,
                lease,
                blocked: spec.enforce == ScopeEnforce::Floor { rate_bps: 0 },
            });
        }
        plan.classes.sort_by_key(|c| c.minor);
        match steering {
            Steering::U32Filters => plan.filters.sort_by_key(|f| (f.pref, f.node)),
            Steering::SkbPriority => plan.filters.clear(),
        }
        Ok(plan)
    }
}

fn check_rate(label: &str, what: &str, rate: u64, floor: bool) -> Result<(), DatapathError> {
    if !(MIN_RATE_BPS..=MAX_RATE_BPS).contains(&rate) {
        let zero = if floor { " (or 0 = blocked)" } else { "" };
        return Err(DatapathError::Invalid(format!(
            "scope {label}: {what} {rate} bit/s outside {MIN_RATE_BPS}..={MAX_RATE_BPS}{zero}"
        )));
    }
    Ok(())
}

fn class(minor: u16, label: &str, rate_bps: u64, burst: u64, leaf_limit: u32) -> ClassPlan {
    let rate_bps = rate_bps / 8 * 8;
    ClassPlan {
        minor,
        label: label.to_string(),
        rate_bps,
        burst_bytes: effective_burst(rate_bps, burst),
        quantum: quantum(rate_bps),
        leaf_limit,
    }
}

/// The burst HTB gets for `rate_bps` when `requested` bytes were asked for (0 = default).
/// See the module documentation.
pub fn effective_burst(rate_bps: u64, requested: u64) -> u64 {
    let rate_bytes = rate_bps / 8;
    let want = if requested == 0 {
        (rate_bytes / 200).max(DEFAULT_BURST_MIN_BYTES)
    } else {
        requested
    };
    let floor = (rate_bytes / 1000).max(2 * MTU_FRAME_BYTES);
    let cap = rate_bytes.saturating_mul(10).max(1);
    want.max(floor).min(cap)
}

/// The HTB quantum for `rate_bps`. See the module documentation.
pub fn quantum(rate_bps: u64) -> u64 {
    (rate_bps / 8 / 10).clamp(MTU_FRAME_BYTES, QUANTUM_MAX)
}

/// Validates the counted peers: names non-empty, at most [`MAX_PEER_NAME_LEN`] bytes, no
/// NUL, each listed once; at least one address each; no address of one peer overlapping one
/// of another; at most [`MAX_PEERS`] peers and [`MAX_PEER_ADDRS`] addresses in all.
fn build_peers(peers: &[crate::PeerCount]) -> Result<Vec<PeerPlan>, DatapathError> {
    let invalid = |msg: String| Err(DatapathError::Invalid(msg));
    if peers.len() > MAX_PEERS {
        return invalid(format!(
            "{} counted peers; at most {MAX_PEERS} are supported",
            peers.len()
        ));
    }
    let mut out: Vec<PeerPlan> = Vec::with_capacity(peers.len());
    for p in peers {
        if p.node.is_empty() {
            return invalid("counted peer with an empty node name".to_string());
        }
        if p.node.len() > MAX_PEER_NAME_LEN || p.node.contains('\0') {
            return invalid(format!(
                "counted peer {:?}: node names are at most {MAX_PEER_NAME_LEN} bytes without NUL",
                p.node
            ));
        }
        if p.addrs.is_empty() {
            return invalid(format!("counted peer {}: no address", p.node));
        }
        out.push(PeerPlan {
            node: p.node.clone(),
            addrs: Ipv4Net::aggregate(&p.addrs),
        });
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    for pair in out.windows(2) {
        if pair[0].node == pair[1].node {
            return invalid(format!("counted peer {} listed twice", pair[0].node));
        }
    }
    let total: usize = out.iter().map(|p| p.addrs.len()).sum();
    if total > MAX_PEER_ADDRS {
        return invalid(format!(
            "{total} counted peer addresses in all; at most {MAX_PEER_ADDRS} are supported"
        ));
    }
    // Sorted by start, a range overlaps an earlier one iff it starts before the furthest end
    // seen so far. (Ranges of one peer do not overlap: they are aggregated.)
    let mut ranges: Vec<(u32, u32, Ipv4Net, &str)> = out
        .iter()
        .flat_map(|p| {
            p.addrs
                .iter()
                .map(move |n| (interval(n), *n, p.node.as_str()))
        })
        .map(|((lo, hi), net, node)| (lo, hi, net, node))
        .collect();
    ranges.sort_unstable();
    let mut furthest: Option<&(u32, u32, Ipv4Net, &str)> = None;
    for r in &ranges {
        if let Some(f) = furthest {
            if r.0 <= f.1 {
                return invalid(format!(
                    "address {} of counted peer {} overlaps {} of counted peer {}",
                    r.2, r.3, f.2, f.3
                ));
            }
        }
        if furthest.is_none_or(|f| r.1 > f.1) {
            furthest = Some(r);
        }
    }
    Ok(out)
}

/// Inclusive address range of a prefix.
pub fn interval(net: &Ipv4Net) -> (u32, u32) {
    (u32::from(net.network()), u32::from(net.broadcast()))
}

/// Interface names end up inside tc commands and nft strings: keep them to what Linux allows
/// and what needs no quoting.
fn validate_iface(dev: &str) -> Result<(), DatapathError> {
    let ok = !dev.is_empty()
        && dev.len() <= 15
        && dev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(DatapathError::Invalid(format!(
            "fabric interface name `{dev}`: must be 1-15 characters of [A-Za-z0-9._@-]"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::fixtures::{egress, lease, peer};
    use crate::ScopeSpec;

    #[test]
    fn burst_and_quantum() {
        #[track_caller]
        fn check(rate: u64, requested: u64, burst: u64, q: u64) {
            assert_eq!(
                (effective_burst(rate, requested), quantum(rate)),
                (burst, q),
                "rate {rate} requested {requested}"
            );
        }
        // default burst: max(5 ms of rate, 64 KiB)
        check(100_000_000, 0, 65_536, 200_000);
        check(1_000_000_000, 0, 625_000, 200_000);
        check(50_000_000, 0, 65_536, 200_000);
        // explicit burst raised to 1 ms of rate / 2 frames
        check(1_000_000_000, 1_000, 125_000, 200_000);
        check(1_000_000, 1_000, 3_028, 12_500);
        check(1_000_000, 500_000, 500_000, 12_500);
        // capped at 10 s of rate (kernel tick wrap)
        check(8, 0, 10, 1_514);
        check(10_000, 0, 12_500, 1_514);
    }

    const BLOCKED: ScopeEnforce = ScopeEnforce::Floor { rate_bps: 0 };

    #[test]
    fn rejects_bad_peers() {
        use crate::fake::fixtures::counted;
        use crate::PeerCount;
        #[track_caller]
        fn check(peers: Vec<PeerCount>, expect: &str) {
            let desired = DesiredState {
                scopes: vec![egress(BLOCKED)],
                peers,
            };
            let err = Plan::build("fab0", &desired)
                .expect_err("must be rejected")
                .to_string();
            assert_eq!(err, format!("invalid desired state: {expect}"));
        }
        check(
            vec![counted("", &["198.18.0.2/32"])],
            "counted peer with an empty node name",
        );
        check(
            vec![counted(&"n".repeat(64), &["198.18.0.2/32"])],
            &format!(
                "counted peer {:?}: node names are at most 63 bytes without NUL",
                "n".repeat(64)
            ),
        );
        check(
            vec![counted("a\0b", &["198.18.0.2/32"])],
            "counted peer \"a\\0b\": node names are at most 63 bytes without NUL",
        );
        check(vec![counted("a", &[])], "counted peer a: no address");
        check(
            vec![
                counted("a", &["198.18.0.2/32"]),
                counted("a", &["198.18.0.3/32"]),
            ],
            "counted peer a listed twice",
        );
        check(
            vec![
                counted("a", &["198.18.0.0/16"]),
                counted("b", &["198.18.4.0/24"]),
            ],
            "address 198.18.4.0/24 of counted peer b overlaps 198.18.0.0/16 of counted peer a",
        );
        check(
            vec![
                counted("b", &["198.18.0.9/32", "198.18.0.2/32"]),
                counted("a", &["198.18.0.1/32", "198.18.0.9/32"]),
            ],
            "address 198.18.0.9/32 of counted peer b overlaps 198.18.0.9/32 of counted peer a",
        );
        let many = |n: usize| -> Vec<PeerCount> {
            (0..n)
                .map(|i| PeerCount {
                    node: format!("n{i}"),
                    addrs: vec![Ipv4Net::new(
                        std::net::Ipv4Addr::from(0x0a00_0000 + 2 * i as u32),
                        32,
                    )
                    .expect("prefix")],
                })
                .collect()
        };
        check(
            many(MAX_PEERS + 1),
            "1025 counted peers; at most 1024 are supported",
        );
        let scattered = |n: u32| -> Vec<Ipv4Net> {
            (0..n)
                .map(|i| {
                    Ipv4Net::new(std::net::Ipv4Addr::from(0x0a00_0000 + 2 * i), 32).expect("prefix")
                })
                .collect()
        };
        check(
            vec![PeerCount {
                node: "a".into(),
                addrs: scattered(MAX_PEER_ADDRS as u32 + 1),
            }],
            "4097 counted peer addresses in all; at most 4096 are supported",
        );

        // At the limits, and duplicate or adjacent addresses of one peer: accepted,
        // aggregated, sorted by node.
        let desired = |peers| DesiredState {
            scopes: vec![egress(BLOCKED)],
            peers,
        };
        assert!(Plan::build("fab0", &desired(many(MAX_PEERS))).is_ok());
        let plan = Plan::build(
            "fab0",
            &desired(vec![
                PeerCount {
                    node: "a".into(),
                    addrs: scattered(MAX_PEER_ADDRS as u32),
                },
                counted("b", &["198.18.0.2/32", "198.18.0.3/32", "198.18.0.2/32"]),
            ]),
        );
        assert!(plan.is_err(), "4098 addresses in all");
        let plan = Plan::build(
            "fab0",
            &desired(vec![
                counted("b", &["198.18.0.2/32", "198.18.0.3/32", "198.18.0.2/32"]),
                counted("a", &["198.18.0.1/32"]),
            ]),
        )
        .expect("valid");
        assert_eq!(
            plan.peers,
            [
                PeerPlan {
                    node: "a".into(),
                    addrs: vec!["198.18.0.1/32".parse().expect("prefix")],
                },
                PeerPlan {
                    node: "b".into(),
                    addrs: vec!["198.18.0.2/31".parse().expect("prefix")],
                },
            ]
        );
    }

    #[test]
    fn rejects_bad_desired_states() {
        #[track_caller]
        fn check(dev: &str, scopes: Vec<ScopeSpec>, expect: &str) {
            let err = Plan::build(
                dev,
                &DesiredState {
                    scopes,
                    peers: Vec::new(),
                },
            )
            .expect_err("must be rejected")
            .to_string();
            assert_eq!(err, format!("invalid desired state: {expect}"));
        }
        check(
            "fab0",
            vec![],
            "scope egress missing (it is always present)",
        );
        check(
            "fab0",
            vec![egress(BLOCKED), egress(BLOCKED)],
            "scope egress listed twice",
        );
        check(
            "fab0",
            vec![
                egress(BLOCKED),
                peer("a", &["198.18.0.0/16"], BLOCKED),
                peer("b", &["198.18.4.0/24"], BLOCKED),
            ],
            "destination 198.18.4.0/24 of scope peer:b overlaps 198.18.0.0/16 of scope peer:a",
        );
        check(
            "fab0",
            vec![ScopeSpec {
                scope: Scope::Egress,
                destinations: vec!["198.18.0.0/16".parse().expect("prefix")],
                enforce: BLOCKED,
            }],
            "scope egress must not list destinations (it is everything the peer scopes do not match)",
        );
        check(
            "fab0",
            vec![egress(lease(1, 5_000_000_000_000, None, 0))],
            "scope egress: lease rate 5000000000000 bit/s outside 8..=4000000000000",
        );
        check(
            "fab0",
            vec![egress(lease(1, 7, None, 0))],
            "scope egress: lease rate 7 bit/s outside 8..=4000000000000",
        );
        check(
            "fab0",
            vec![egress(ScopeEnforce::Floor { rate_bps: 3 })],
            "scope egress: floor rate 3 bit/s outside 8..=4000000000000 (or 0 = blocked)",
        );
        check(
            "fab0",
            vec![
                egress(lease(7, 1_000_000, None, 0)),
                peer("a", &["198.18.0.0/24"], lease(7, 1_000_000, None, 0)),
            ],
            "lease 7 enforced in two scopes",
        );
        check(
            "fab0",
            vec![egress(lease(1, 1_000_000, Some(1 << 62), 0))],
            "scope egress: volume 4611686018427387904 bytes above the maximum 4611686018427387903",
        );
        check(
            "fab0",
            vec![egress(BLOCKED), peer("", &[], BLOCKED)],
            "peer scope with an empty node name",
        );
        check(
            "fab0\" accept",
            vec![egress(BLOCKED)],
            "fabric interface name `fab0\" accept`: must be 1-15 characters of [A-Za-z0-9._@-]",
        );
        let many: Vec<ScopeSpec> = std::iter::once(egress(BLOCKED))
            .chain((0..=MAX_PEER_SCOPES).map(|i| peer(&format!("n{i:04}"), &[], BLOCKED)))
            .collect();
        check("fab0", many, "901 peer scopes; at most 900 are supported");
    }

    #[test]
    fn lays_out_scopes_in_sorted_order() {
        let desired = DesiredState {
            peers: Vec::new(),
            scopes: vec![
                peer("zeta", &["198.19.9.0/24"], BLOCKED),
                egress(lease(5, 50_000_001, Some(1000), 0)),
                // adjacent prefixes are aggregated; host bits are cleared
                peer(
                    "alpha",
                    &["198.19.1.0/24", "198.19.0.7/24", "198.19.4.4/32"],
                    ScopeEnforce::Floor {
                        rate_bps: 1_000_000,
                    },
                ),
            ],
        };
        let plan = Plan::build("fab0", &desired).expect("valid");
        let summary: Vec<String> = plan
            .scopes
            .iter()
            .map(|s| {
                let nets: Vec<String> = s.prefixes.iter().map(|n| n.to_string()).collect();
                format!("{} 1:{:x} [{}]", s.scope, s.class_minor, nets.join(" "))
            })
            .collect();
        assert_eq!(
            summary,
            [
                "egress 1:10 []",
                "peer:alpha 1:100 [198.19.0.0/23 198.19.4.4/32]",
                "peer:zeta 1:101 [198.19.9.0/24]"
            ]
        );
        let classes: Vec<String> = plan
            .classes
            .iter()
            .map(|c| {
                format!(
                    "1:{:x} {} rate {} burst {} quantum {} limit {}",
                    c.minor, c.label, c.rate_bps, c.burst_bytes, c.quantum, c.leaf_limit
                )
            })
            .collect();
        assert_eq!(
            classes,
            [
                "1:2 control rate 1000000 burst 65536 quantum 12500 limit 100",
                "1:3 drop rate 8 burst 10 quantum 1514 limit 0",
                "1:10 egress rate 50000000 burst 65536 quantum 200000 limit 1000",
                "1:100 peer:alpha rate 1000000 burst 65536 quantum 12500 limit 1000",
                "1:101 peer:zeta rate 8 burst 10 quantum 1514 limit 0",
            ]
        );
        let filters: Vec<String> = plan
            .filters
            .iter()
            .map(|f| {
                format!(
                    "{} ::{} {} {} -> 1:{:x}",
                    f.pref,
                    f.node,
                    f.protocol,
                    f.matcher.render(),
                    f.class_minor
                )
            })
            .collect();
        assert_eq!(
            filters,
            [
                "1 ::1 arp match u32 0 0 -> 1:2",
                "2 ::1 0x88b5 match u32 0 0 -> 1:2",
                "100 ::1 ip match ip dst 198.19.0.0/23 -> 1:100",
                "100 ::2 ip match ip dst 198.19.4.4/32 -> 1:100",
                "101 ::1 ip match ip dst 198.19.9.0/24 -> 1:101",
                "1000 ::1 all match u32 0 0 -> 1:10",
            ]
        );
        assert_eq!(
            plan.scopes[0].lease,
            Some(LeasePlan {
                id: LeaseId(5),
                volume: Some(1000),
                over: 1000,
                start_used: 0
            })
        );
    }

    #[test]
    fn filter_protocols_compare_as_tc_prints_them() {
        for (plan, shown, same) in [
            ("arp", "arp", true),
            ("ip", "ip", true),
            ("all", "all", true),
            ("arp", "ip", false),
            (PROBE_PROTOCOL, "[34997]", true),
            (PROBE_PROTOCOL, "0x88B5", true),
            (PROBE_PROTOCOL, "34997", true),
            (PROBE_PROTOCOL, "[35020]", false),
            (PROBE_PROTOCOL, "all", false),
            (PROBE_PROTOCOL, "[]", false),
        ] {
            assert_eq!(same_protocol(plan, shown), same, "{plan} vs {shown}");
        }
    }
}
