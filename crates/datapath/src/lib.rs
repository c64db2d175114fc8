//! The nicwarden datapath: turns the agent's per-scope decisions into Linux kernel state on
//! the fabric interface, and reads the kernel's counters back.
//!
//! This crate owns everything nicwarden installs in the kernel of a node: the HTB qdisc tree
//! with its u32 classifiers on the fabric interface (shaping, floors, fail-closed drop class)
//! and the nftables table `inet nicwarden` (per-lease volume quotas and counters). The agent
//! describes *what* to enforce as a [`DesiredState`]; a [`Datapath`] makes the kernel match it
//! ([`Datapath::reconcile`], idempotent, repairing partial state) and reports
//! [`ScopeCounters`]. [`LinuxDatapath`] is the tc + nftables backend; [`EbpfDatapath`] (see
//! [`ebpf`]) is the eBPF backend: a tc program on the clsact egress hook decides per packet
//! (exact volume, blocked scopes, classification by an LPM trie) and HTB still shapes; a
//! second one on the clsact ingress hook polices what arrives from each scope's addresses
//! with a token bucket at the scope's rate (and drops it when the scope is blocked).
//!
//! Per-peer counters, for byte conservation between nodes: [`DesiredState::peers`] lists
//! every known peer node and its fabric addresses, whatever the scopes, and
//! [`Datapath::peer_counters`] reports per peer what this node passed towards it (`tx`) and
//! what arrived from it, admitted (`rx`) or dropped by the program (`rx_dropped`), in IP
//! bytes, cumulative since the peer was installed ([`PeerCounters`]). For nodes A and B, A's
//! `tx` to B equals B's `rx + rx_dropped` from A when nothing is lost between them. The eBPF
//! backend counts in its maps `nw_peer`, `nw_peer_stats` and `nw_peer_node` (see
//! [`ebpf::maps`]); the tc backend validates the peers but does not count them
//! ([`DatapathError::Unavailable`]).
//!
//! Kernel state outlives the agent on purpose: the agent never removes it on exit, so a node
//! whose agent died keeps enforcing its last state (fail closed), and a restarted agent
//! reconciles against what it finds, without resetting counters or volume accounting.
//!
//! Layering: [`plan`] validates a desired state and lays it out (class minors, filter
//! preferences, burst and quantum); `tc.rs` and `nft.rs` parse what the kernel shows and
//! compute the difference (`nft.rs` documents the nftables table); `ops.rs` runs `tc` and
//! `nft` for them, behind the narrow [`TcOps`] / [`NftOps`] traits, with an in-memory
//! fake kernel in [`fake`]; `shaper.rs` is the HTB layer both backends share. The eBPF backend
//! adds [`BpfOps`] (aya, with an in-memory [`ebpf::FakeBpf`]) and its program,
//! `bpf/nicwarden.bpf.c`, compiled by `build.rs` with clang and embedded in the crate.
//! [`guard`] is the mesh's fabric guard (`inet nicwarden_guard`: only WireGuard crosses the
//! fabric), independent of the backend.

pub mod ebpf;
mod error;
pub mod fake;
pub mod guard;
mod nft;
mod ops;
pub mod plan;
mod shaper;
mod tc;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

pub use ebpf::{BpfOps, EbpfDatapath, RealBpf};
pub use error::DatapathError;
pub use guard::{FabricGuard, GuardCounters, GuardSpec};
pub use ops::{GuardOps, NftOps, RealNft, RealTc, TcOps};

use ipnet::Ipv4Net;
use nft::{NftDesired, NftKernel};
use nicwarden_lease::{LeaseId, Scope};
use plan::Plan;
use serde::{Deserialize, Serialize};
use shaper::Shaper;
use std::fmt;

/// What the kernel should enforce on the fabric interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// One entry per scope, sorted by scope; [`Scope::Egress`] is always present (everything
    /// the peer scopes do not match). (The datapath sorts a copy itself; duplicates are
    /// rejected.)
    pub scopes: Vec<ScopeSpec>,
    /// Every known peer node and its fabric addresses, whatever the scopes: what it sent to
    /// and received from each is counted per peer ([`Datapath::peer_counters`], the eBPF
    /// backend), for byte conservation between nodes. Addresses of different peers must not
    /// overlap; at most [`plan::MAX_PEERS`] peers with [`plan::MAX_PEER_ADDRS`] addresses in
    /// all. (The datapath sorts a copy itself; duplicates are rejected.)
    #[serde(default)]
    pub peers: Vec<PeerCount>,
}

/// A peer node whose traffic is counted (see [`DesiredState::peers`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCount {
    /// The peer's node name (at most [`plan::MAX_PEER_NAME_LEN`] bytes).
    pub node: String,
    /// Its fabric addresses (/32s in practice; prefixes are counted by longest match). At
    /// least one.
    pub addrs: Vec<Ipv4Net>,
}

/// What one peer's traffic amounted to on this node's fabric interface, cumulative since
/// the peer was first installed (counters survive agent restarts; a peer removed from the
/// desired state and added again starts from zero), summed over CPUs. Bytes are IP packet
/// lengths, as everywhere in the datapath; only IPv4 packets are counted.
///
/// `tx_*` counts what the eBPF program *passed* towards the peer's addresses (after the
/// volume and blocked decisions; HTB may still drop it afterwards, which shows in the
/// scope's [`ClassStats::drops`], not here). `rx_*` counts what arrived from the peer's
/// addresses and was admitted; `rx_dropped_*` what arrived from them and the program dropped
/// (the ingress policer, a blocked scope). So for peers A and B, what A counts as `tx` to B
/// equals what B counts as `rx + rx_dropped` from A, when nothing is lost between them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounters {
    pub node: String,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_dropped_bytes: u64,
    pub rx_dropped_packets: u64,
}

/// One scope of a [`DesiredState`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeSpec {
    pub scope: Scope,
    /// Destination prefixes classified into this scope (peer scopes); empty for Egress.
    /// Overlaps between different peer scopes are rejected.
    pub destinations: Vec<Ipv4Net>,
    pub enforce: ScopeEnforce,
}

/// How a scope is enforced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScopeEnforce {
    /// A valid lease: shape to `rate_bps` (HTB rate = ceil, burst = `burst_bytes`, 0 = a default
    /// derived from the rate; see [`plan`]), and if `volume` is `Some`, drop once `volume`
    /// bytes have been counted against the lease; counting starts at `start_used_bytes` (what
    /// the controller already recorded), so a fresh kernel does not reset it.
    Lease {
        lease: LeaseId,
        rate_bps: u64,
        burst_bytes: u64,
        volume: Option<u64>,
        start_used_bytes: u64,
    },
    /// No valid lease: the floor rate (0 = drop everything in this scope).
    Floor { rate_bps: u64 },
}

/// Statistics of a scope's HTB class (from its leaf qdisc). Bytes include link-layer headers.
/// `drops` of a blocked scope also counts what nftables dropped before tc (counter `bM`).
/// They belong to the class *slot* (see [`plan`] for numbering) and are reset when the slot
/// is re-created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassStats {
    pub bytes: u64,
    pub packets: u64,
    pub drops: u64,
}

/// The nftables accounting of one lease. Bytes are IP packet lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseCounters {
    pub lease: LeaseId,
    /// Counted against the volume, including `start_used_bytes`; never above the volume.
    pub used_bytes: u64,
    pub passed_packets: u64,
    /// Packets dropped because the volume was spent.
    pub volume_drops: u64,
    /// The volume is spent (always false without a volume).
    pub exhausted: bool,
}

/// What arrived on the fabric interface from a scope's addresses (a peer scope's
/// destination prefixes, read as sources; everything else is the egress scope), as the eBPF
/// backend's ingress policer saw it. Bytes are IP packet lengths. Like [`ClassStats`] they
/// belong to the scope's slot (see [`ebpf::maps`]). The tc backend does not police ingress
/// and reports zeros.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressStats {
    /// Admitted by the policer.
    pub bytes: u64,
    pub packets: u64,
    /// Packets dropped because they exceeded the scope's rate (token bucket).
    pub policed_drops: u64,
    /// Packets dropped because the scope is blocked.
    pub blocked_drops: u64,
}

/// Kernel counters of one scope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeCounters {
    pub scope: Scope,
    pub class: ClassStats,
    /// `Some` when the scope is enforcing a lease.
    pub lease: Option<LeaseCounters>,
    /// Ingress policing (eBPF backend; zeros from the tc backend).
    #[serde(default)]
    pub ingress: IngressStats,
}

/// One applied change, human-readable (e.g. "tc: class 1:10 (egress) rate 50000000 -> 100000000 bit/s").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change(pub String);

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A kernel enforcement backend.
pub trait Datapath: Send {
    fn name(&self) -> &'static str;
    /// Brings the kernel to `desired`, changing only what differs; returns the changes (empty =
    /// already there). Idempotent: applying the same DesiredState twice returns no changes the
    /// second time and resets no counters. After a crash mid-update (partial kernel state), the
    /// next reconcile repairs it. An invalid `desired` is rejected before anything is changed.
    fn reconcile(&mut self, desired: &DesiredState) -> Result<Vec<Change>, DatapathError>;
    /// Kernel counters per scope of the current desired state (the last valid one passed to
    /// `reconcile`; empty before the first).
    fn counters(&mut self) -> Result<Vec<ScopeCounters>, DatapathError>;
    /// Per-peer byte counters of the peers of the current desired state (the last valid one
    /// passed to `reconcile`; empty before the first), sorted by node; a peer not installed
    /// yet (its reconcile failed) reads as zeros. [`DatapathError::Unavailable`] from a
    /// backend that does not count per peer.
    fn peer_counters(&mut self) -> Result<Vec<PeerCounters>, DatapathError>;
    /// Removes everything this backend installed. Only for an explicit operator cleanup; the
    /// agent never calls it on exit (the kernel keeps enforcing when the agent dies).
    fn remove(&mut self) -> Result<(), DatapathError>;
}

/// The "tc" backend: HTB shaping (tc) + volume quotas (nftables) on one fabric interface.
///
/// tc: an HTB root `1: default 3` whose default class drops (fail closed), a control class (ARP, link probes), one
/// class per scope with u32 filters by destination; layout, numbering, burst and quantum: see
/// [`plan`]. nftables: table `inet nicwarden`, chain `postrouting`, per lease `L` a quota `qL`
/// (`over` = the volume, or [`plan::UNLIMITED_VOLUME`]) and counters `dL` (volume drops) and `pL`
/// (passed), matched by destination prefixes for peer scopes; the table is replaced atomically
/// when it differs, carrying quota usage over. Only the fabric interface
/// is touched (tc objects live on it, nft rules match `oifname` = it), so the management
/// interface keeps working whatever the leases say.
pub struct LinuxDatapath {
    tc: Shaper,
    nft: Box<dyn NftOps>,
    /// The plan of the last reconcile that completed: what the kernel is known to hold. `None`
    /// after a failure or in a fresh process (then the kernel is read and compared).
    applied: Option<Plan>,
    /// The last valid desired state: what `counters` reports on.
    current: Option<Plan>,
}

impl LinuxDatapath {
    /// The real backend on `fabric_iface` in this process's network namespace.
    pub fn new(fabric_iface: &str) -> Self {
        Self::with_ops(
            fabric_iface,
            Box::new(RealTc::new()),
            Box::new(RealNft::new()),
        )
    }

    /// The real backend on `fabric_iface` inside the named network namespace `netns`
    /// (`/run/netns/NETNS`): tc runs as `tc -n NETNS`, nft as `ip netns exec NETNS nft`.
    pub fn in_netns(netns: &str, fabric_iface: &str) -> Self {
        Self::with_ops(
            fabric_iface,
            Box::new(RealTc::in_netns(netns)),
            Box::new(RealNft::in_netns(netns)),
        )
    }

    /// The backend over the given kernel interfaces (fakes in tests).
    pub fn with_ops(fabric_iface: &str, tc: Box<dyn TcOps>, nft: Box<dyn NftOps>) -> Self {
        LinuxDatapath {
            tc: Shaper::new(fabric_iface, tc),
            nft,
            applied: None,
            current: None,
        }
    }

    /// Checks that this host can run the backend: root, `tc` (iproute2) and `nft`
    /// (nftables) installed. The error says what to install.
    pub fn check_available() -> Result<(), DatapathError> {
        ops::check_available()
    }

    /// The fabric interface this backend programs.
    pub fn fabric_iface(&self) -> &str {
        self.tc.dev()
    }

    fn read_nft(&mut self) -> Result<Option<NftKernel>, DatapathError> {
        self.nft
            .list_table_json()?
            .map(|json| NftKernel::parse(&json))
            .transpose()
    }

    fn reconcile_nft(&mut self, plan: &Plan) -> Result<Vec<Change>, DatapathError> {
        let want = NftDesired::from_plan(plan);
        let kernel = self.read_nft()?;
        if kernel.as_ref().is_some_and(|k| want.matches(k)) {
            return Ok(Vec::new());
        }
        self.nft.apply(&want.script(kernel.as_ref()))?;
        Ok(want.describe(kernel.as_ref()))
    }
}

/// Joins the results of the parts of one reconcile: all the changes when every part
/// succeeded, otherwise the first failure (logging any later one as the `nth` failure, and
/// the changes that were applied before it).
pub(crate) fn merge_reconcile<const N: usize>(
    dev: &str,
    results: [Result<Vec<Change>, DatapathError>; N],
    nth: &str,
) -> Result<Vec<Change>, DatapathError> {
    let mut changes = Vec::new();
    let mut failure = None;
    for result in results {
        match result {
            Ok(c) => changes.extend(c),
            Err(e) if failure.is_none() => failure = Some(e),
            Err(e) => {
                tracing::warn!(dev = %dev, error = %e, "datapath reconcile: {nth} failure")
            }
        }
    }
    match failure {
        None => Ok(changes),
        Some(e) => {
            for c in &changes {
                tracing::info!(dev = %dev, change = %c, "applied before the reconcile failed");
            }
            Err(e)
        }
    }
}

impl Datapath for LinuxDatapath {
    fn name(&self) -> &'static str {
        "tc"
    }

    fn reconcile(&mut self, desired: &DesiredState) -> Result<Vec<Change>, DatapathError> {
        let plan = Plan::build(self.tc.dev(), desired)?;
        self.current = Some(plan.clone());
        // Until this completes, what the kernel holds is only known by reading it.
        let last = self.applied.take();
        // nftables first, so that a scope opening up in tc is already counted against its
        // volume. A failure of one half does not stop the other: the kernel gets as close to
        // the desired state as it can, and the next reconcile retries the rest.
        let nft = self.reconcile_nft(&plan);
        let tc = self.tc.reconcile(&plan, last.as_ref());
        let changes = merge_reconcile(self.tc.dev(), [nft, tc], "second")?;
        self.applied = Some(plan);
        Ok(changes)
    }

    fn counters(&mut self) -> Result<Vec<ScopeCounters>, DatapathError> {
        let Some(plan) = self.current.clone() else {
            return Ok(Vec::new());
        };
        let leaves = self.tc.leaves()?;
        let nft = if plan.scopes.iter().any(|s| s.lease.is_some() || s.blocked) {
            self.read_nft()?
        } else {
            None
        };
        Ok(plan
            .scopes
            .iter()
            .map(|s| ScopeCounters {
                scope: s.scope.clone(),
                class: {
                    let mut c = leaves
                        .get(&s.class_minor)
                        .map(|l| l.stats)
                        .unwrap_or_default();
                    // A blocked scope's packets are dropped by nftables before tc sees them.
                    if s.blocked {
                        c.drops += nft
                            .as_ref()
                            .and_then(|k| k.counters.get(&nft::blocked_name(s.class_minor)))
                            .map_or(0, |k| k.packets);
                    }
                    c
                },
                lease: s.lease.as_ref().map(|l| {
                    let quota = nft
                        .as_ref()
                        .and_then(|k| k.quotas.get(&nft::quota_name(l.id)));
                    let counter = |name: String| {
                        nft.as_ref()
                            .and_then(|k| k.counters.get(&name))
                            .copied()
                            .unwrap_or_default()
                    };
                    let used = quota.map_or(0, |q| q.used).max(l.start_used);
                    LeaseCounters {
                        lease: l.id,
                        used_bytes: l.volume.map_or(used, |v| used.min(v)),
                        passed_packets: counter(nft::passed_name(l.id)).packets,
                        volume_drops: counter(nft::drops_name(l.id)).packets,
                        exhausted: l.volume.is_some_and(|v| used >= v),
                    }
                }),
                // The tc backend does not police what arrives.
                ingress: IngressStats::default(),
            })
            .collect())
    }

    fn peer_counters(&mut self) -> Result<Vec<PeerCounters>, DatapathError> {
        // nftables could count per peer with named counters, but only for what leaves
        // through the rules (nothing of what arrives is policed or dropped by this backend).
        Err(DatapathError::Unavailable(
            "per-peer byte counters need the ebpf backend".to_string(),
        ))
    }

    fn remove(&mut self) -> Result<(), DatapathError> {
        self.applied = None;
        self.current = None;
        self.tc.remove()?;
        if self.nft.list_table_json()?.is_some() {
            self.nft.apply(&nft::delete_script())?;
        }
        Ok(())
    }
}
