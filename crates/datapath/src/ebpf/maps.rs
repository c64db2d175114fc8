//! The eBPF maps: their layout (shared with `bpf/nicwarden.bpf.c`, keep the two in sync), what
//! a [`Plan`] wants in them, and the writes that bring what they hold to it.
//!
//! Pure: the map I/O is behind [`super::BpfOps`].
//!
//! # Maps (pinned by name under the pin directory)
//!
//! | map | type | key | value |
//! |---|---|---|---|
//! | `nw_dst` | LPM trie, ≤ [`DST_MAX`] entries, no prealloc | `{u32 prefixlen; u32 addr}` (addr in network order) | `u32` slot |
//! | `nw_config` | array of [`SLOTS`] | `u32` slot | [`ScopeConfig`] `{u32 mode; u32 classid; u64 lease_id; u64 volume_limit}` |
//! | `nw_stats` | per-CPU array of [`SLOTS`] | `u32` slot | [`ScopeStats`] `{u64 bytes, packets, volume_drops, blocked_drops}` |
//! | `nw_used` | array of [`SLOTS`] (shared, atomically added to) | `u32` slot | `u64` bytes counted against the volume |
//! | `nw_police` | array of [`SLOTS`] (shared, BTF, `bpf_spin_lock`) | `u32` slot | [`Police`] `{bpf_spin_lock lock; u32 pad; u64 rate; u64 burst; s64 tokens; u64 last_ns; u64 frac}` |
//! | `nw_istats` | per-CPU array of [`SLOTS`] | `u32` slot | [`IngressStats`] `{u64 bytes, packets, policed_drops, blocked_drops}` |
//! | `nw_peer` | LPM trie, ≤ [`PEER_ADDRS_MAX`] entries, no prealloc | as `nw_dst` | `u32` peer index |
//! | `nw_peer_stats` | per-CPU array of [`PEERS`] | `u32` peer index | [`PeerStats`] `{u64 tx_bytes, tx_packets, rx_bytes, rx_packets, rx_dropped_bytes, rx_dropped_packets}` |
//! | `nw_peer_node` | array of [`PEERS`] (the agent's only) | `u32` peer index | `char node[64]`, NUL-padded; all zeroes: a free index |
//!
//! `nw_dst`, `nw_config`, `nw_stats` and `nw_used` are the egress program's (`nw_egress`);
//! the ingress program (`nw_ingress`) reads `nw_dst` (by *source* address) and `nw_config`
//! (the mode) and keeps `nw_police` and `nw_istats`.
//!
//! # Slots
//!
//! Slot 0 is the egress scope (class `1:10`), slot `1 + i` the peer scope *i* (class
//! `1:(0x100 + i)`), with peers numbered as in [`crate::plan`]; `classid` is the HTB class id
//! `0x0001_MMMM` of the scope's class. An unwritten slot is all zeroes, which the program
//! reads as blocked: fail closed. A slot no scope uses is written back to all zeroes.
//!
//! # Accounting
//!
//! `nw_used` of a slot holds the bytes of the slot's *lease* that passed: a lease seen for the
//! first time starts at its `start_used_bytes`; a lease that stays keeps its count (also
//! across agent restarts: the maps are pinned), raised to `start_used_bytes` if the
//! controller recorded more; a lease that moves to another slot (peers renumbered) takes its
//! count and its passed/dropped counters along. `bytes`, `packets` and `volume_drops` of
//! `nw_stats` belong to the lease in the same way; `blocked_drops` belongs to the slot (like
//! the HTB class statistics, see [`crate::plan`]). A slot whose lease ends keeps these counts
//! until its next lease starts (so that ending a lease stays one config write); they are not
//! reported meanwhile.
//!
//! # Peers
//!
//! Per-peer counters serve byte conservation between nodes, whatever the scopes: peer scopes
//! are per lease, and a node with only an egress lease has one slot for all its peers. Each
//! counted peer ([`crate::DesiredState::peers`]) has a *peer index*: its addresses map to it
//! in `nw_peer` (an LPM trie like `nw_dst`, so a peer may be given a prefix; the lookup is
//! bounded by the 32 bits of an address), its counters live at it in `nw_peer_stats`, and its
//! node name at it in `nw_peer_node`. The egress program adds a packet to `tx` of the peer of
//! its destination only when it passes it (after the volume and blocked decisions); the
//! ingress program adds a packet from a peer's address to `rx` when it admits it and to
//! `rx_dropped` when it drops it (blocked scope, policer). Non-IPv4 frames are not counted.
//!
//! The index of a peer is found again by its name in `nw_peer_node` (also by a restarted
//! agent: the maps are pinned), so its counters continue; a new peer takes the lowest free
//! index (name all zeroes), its counters zeroed before its name and addresses are written; a
//! peer no longer desired loses its addresses first, then its counters and its name are
//! cleared. An address moving to another peer is rewritten in place. Reconcile writes the
//! peer maps last (they decide nothing).
//!
//! # Ingress policing
//!
//! `nw_police` of a slot that passes traffic (lease or floor above 0) holds the slot's rate in
//! bytes/s (the lease or floor rate as HTB has it, [`crate::plan::ClassPlan::rate_bps`] / 8)
//! and burst (the class's effective burst, [`crate::plan::effective_burst`]); the agent writes
//! them with a full bucket whenever they differ (a rate change starts a full bucket), the
//! program keeps `tokens`, `last_ns` and `frac` ([`Police::admit`] is its arithmetic). A
//! blocked slot's bucket is left as it is: the program drops before it looks (so a revocation
//! stays one config write). `nw_istats` belongs to the slot, like the HTB class statistics
//! (it follows the slot, not a peer renumbered to another slot), and is zeroed with it.
//!
//! # Order of the writes
//!
//! Order of the writes of one reconcile: counters (`nw_used`, `nw_stats`) of slots whose
//! lease starts or moves and the policers (`nw_police`) whose rate or burst changes, then the
//! configs of the wanted slots, then destinations added or
//! moved, then destinations removed, then slots cleared (counters and policer first, config
//! last). So a config names a lease only once its counter is in place: every byte that passes
//! under a new lease is charged to it, and a scope opens only with its policer set. (The old
//! lease of a slot may pass what is in flight in the few microseconds between the two map
//! writes; nothing is charged to no one.) Each later decision about a scope (revocation, a
//! new volume) is one write of its config; one that also changes the rate (a new lease at
//! another rate, a floor above 0) writes the policer first.

use crate::plan::{
    PeerPlan, Plan, ScopePlan, EGRESS_MINOR, MAX_PEER_SCOPES, MAX_RATE_BPS, PEER_MINOR_BASE,
};
use crate::{Change, IngressStats};
use ipnet::Ipv4Net;
use nicwarden_lease::Scope;
use std::collections::{BTreeMap, BTreeSet};

/// Entries of the slot-indexed arrays (`NW_SLOTS` in the C program).
pub const SLOTS: u32 = 1024;
/// Most destination prefixes the LPM trie holds (`NW_DST_MAX`).
pub const DST_MAX: usize = 65536;
/// Entries of the peer-indexed arrays (`NW_PEERS`).
pub const PEERS: u32 = 1024;
/// Most peer addresses `nw_peer` holds (`NW_PEER_ADDRS_MAX`).
pub const PEER_ADDRS_MAX: usize = 4096;
/// Size of a `nw_peer_node` value (`NW_PEER_NAME_LEN`).
pub const PEER_NAME_SIZE: usize = 64;

const _: () = assert!(
    crate::plan::MAX_PEERS <= PEERS as usize,
    "every peer needs an index"
);
const _: () = assert!(crate::plan::MAX_PEER_ADDRS <= PEER_ADDRS_MAX);
const _: () = assert!(crate::plan::MAX_PEER_NAME_LEN < PEER_NAME_SIZE);

const _: () = assert!(MAX_PEER_SCOPES < SLOTS as usize, "every scope needs a slot");

/// `ScopeConfig::mode`: drop and count (also an unwritten slot).
pub const MODE_BLOCKED: u32 = 0;
/// `ScopeConfig::mode`: count against the volume, then steer to the class.
pub const MODE_LEASE: u32 = 1;
/// `ScopeConfig::mode`: a floor above 0; steer to the class (which HTB limits).
pub const MODE_FLOOR: u32 = 2;

/// Map names (also their pin file names) and the program's name.
pub const MAP_DST: &str = "nw_dst";
pub const MAP_CONFIG: &str = "nw_config";
pub const MAP_STATS: &str = "nw_stats";
pub const MAP_USED: &str = "nw_used";
pub const MAP_POLICE: &str = "nw_police";
pub const MAP_ISTATS: &str = "nw_istats";
pub const MAP_PEER: &str = "nw_peer";
pub const MAP_PEER_STATS: &str = "nw_peer_stats";
pub const MAP_PEER_NODE: &str = "nw_peer_node";
/// The egress program.
pub const PROGRAM: &str = "nw_egress";
/// The ingress program.
pub const PROGRAM_INGRESS: &str = "nw_ingress";

/// Highest policed rate in bytes/s the program computes with (`NW_RATE_MAX`).
pub const POLICE_RATE_MAX: u64 = (1 << 39) - 1;
/// Highest burst in bytes the program honours (`NW_BURST_MAX`).
pub const POLICE_BURST_MAX: u64 = 1 << 62;
/// After this long without a packet a bucket is full, whatever it held (`NW_REFILL_FULL_US`).
pub const POLICE_REFILL_FULL_US: u64 = 16_000_000;

const _: () = assert!(
    MAX_RATE_BPS / 8 <= POLICE_RATE_MAX,
    "every accepted rate must be policed exactly"
);

/// One slot of `nw_config`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScopeConfig {
    /// [`MODE_BLOCKED`], [`MODE_LEASE`] or [`MODE_FLOOR`] (anything else drops).
    pub mode: u32,
    /// HTB class id the program writes into `skb->priority` (`0x0001_MMMM` for class `1:MMMM`).
    pub classid: u32,
    /// The lease enforced (0 unless `mode` is [`MODE_LEASE`]).
    pub lease_id: u64,
    /// Bytes the lease may pass in total ([`crate::plan::UNLIMITED_VOLUME`] without a volume).
    pub volume_limit: u64,
}

impl ScopeConfig {
    /// Size of the C struct.
    pub const SIZE: usize = 24;

    /// The C struct's bytes (native byte order, no padding).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.mode.to_ne_bytes());
        b[4..8].copy_from_slice(&self.classid.to_ne_bytes());
        b[8..16].copy_from_slice(&self.lease_id.to_ne_bytes());
        b[16..24].copy_from_slice(&self.volume_limit.to_ne_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_ne_bytes(w)
        };
        ScopeConfig {
            mode: u32_at(0),
            classid: u32_at(4),
            lease_id: u64_at(8),
            volume_limit: u64_at(16),
        }
    }

    /// All zeroes: a slot no scope uses.
    pub fn is_cleared(&self) -> bool {
        *self == ScopeConfig::default()
    }

    /// e.g. "lease 7 (volume 1000000 B) -> class 1:10", "blocked", "unset".
    pub fn describe(&self) -> String {
        if self.is_cleared() {
            return "unset".to_string();
        }
        let class = format!("class {}", class_name(self.classid));
        match self.mode {
            MODE_BLOCKED => format!("blocked ({class})"),
            MODE_LEASE if self.volume_limit >= crate::plan::UNLIMITED_VOLUME => {
                format!("lease {} (no volume) -> {class}", self.lease_id)
            }
            MODE_LEASE => format!(
                "lease {} (volume {} B) -> {class}",
                self.lease_id, self.volume_limit
            ),
            MODE_FLOOR => format!("floor -> {class}"),
            other => format!("mode {other} (drops) -> {class}"),
        }
    }
}

fn class_name(classid: u32) -> String {
    format!("{:x}:{:x}", classid >> 16, classid & 0xffff)
}

/// One slot of `nw_stats`, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScopeStats {
    /// IP bytes passed (counted after the volume check).
    pub bytes: u64,
    pub packets: u64,
    /// Packets dropped because they did not fit in the volume.
    pub volume_drops: u64,
    /// Packets dropped because the scope is blocked.
    pub blocked_drops: u64,
}

impl ScopeStats {
    /// The C struct as four `u64`.
    pub fn to_array(&self) -> [u64; 4] {
        [
            self.bytes,
            self.packets,
            self.volume_drops,
            self.blocked_drops,
        ]
    }

    pub fn from_array(a: [u64; 4]) -> Self {
        ScopeStats {
            bytes: a[0],
            packets: a[1],
            volume_drops: a[2],
            blocked_drops: a[3],
        }
    }

    /// Adds another CPU's values.
    pub fn add(&mut self, other: &ScopeStats) {
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.packets = self.packets.wrapping_add(other.packets);
        self.volume_drops = self.volume_drops.wrapping_add(other.volume_drops);
        self.blocked_drops = self.blocked_drops.wrapping_add(other.blocked_drops);
    }

    /// The lease counters of `self` with the slot's blocked drops of `slot`.
    fn lease_part_with_blocked(&self, blocked_drops: u64) -> ScopeStats {
        ScopeStats {
            blocked_drops,
            ..*self
        }
    }
}

/// One slot of `nw_police`: the ingress token bucket. The lock word is not part of it (the
/// kernel neither returns nor overwrites it; reads and writes take the lock).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Police {
    /// Bytes per second; 0 admits nothing.
    pub rate: u64,
    /// Bytes.
    pub burst: u64,
    /// Bytes in the bucket; below 0 after a packet larger than the burst (a debt).
    pub tokens: i64,
    /// `bpf_ktime_get_ns()` up to which the bucket is refilled (0: never, which refills it
    /// fully on the next packet).
    pub last_ns: u64,
    /// The refill's remainder, in millionths of a byte.
    pub frac: u64,
}

impl Police {
    /// Size of the C struct (with the 4-byte lock and its padding in front).
    pub const SIZE: usize = 48;

    /// A policer at `rate` bytes/s with `burst` bytes, its bucket full.
    pub fn full(rate: u64, burst: u64) -> Self {
        Police {
            rate,
            burst,
            tokens: i64::try_from(burst.min(POLICE_BURST_MAX)).unwrap_or(i64::MAX),
            last_ns: 0,
            frac: 0,
        }
    }

    /// The C struct's bytes (native byte order; the lock word and the padding are zero).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[8..16].copy_from_slice(&self.rate.to_ne_bytes());
        b[16..24].copy_from_slice(&self.burst.to_ne_bytes());
        b[24..32].copy_from_slice(&self.tokens.to_ne_bytes());
        b[32..40].copy_from_slice(&self.last_ns.to_ne_bytes());
        b[40..48].copy_from_slice(&self.frac.to_ne_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            w
        };
        Police {
            rate: u64::from_ne_bytes(at(8)),
            burst: u64::from_ne_bytes(at(16)),
            tokens: i64::from_ne_bytes(at(24)),
            last_ns: u64::from_ne_bytes(at(32)),
            frac: u64::from_ne_bytes(at(40)),
        }
    }

    /// Rate and burst: what the agent decides (the rest is the program's).
    pub fn setting(&self) -> (u64, u64) {
        (self.rate, self.burst)
    }

    /// e.g. "5000000 B/s, burst 65536 B", "unset", "closed" (rate 0 with a burst).
    pub fn describe(&self) -> String {
        match self.setting() {
            (0, 0) => "unset".to_string(),
            (0, _) => "closed".to_string(),
            (rate, burst) => format!("{rate} B/s, burst {burst} B"),
        }
    }

    /// The program's arithmetic (`nw_police_admit` in the C program; keep the two in step):
    /// refills the bucket up to `now_ns` and takes `len` bytes from it if they fit; true
    /// admits the packet.
    ///
    /// Time is consumed in whole microseconds (the rest waits for the next packet) and the
    /// sub-byte part of a refill is carried in `frac`, so over any period the bucket gains
    /// exactly `rate × period` bytes (capped at the burst). A packet needs `min(len, burst)`
    /// tokens and takes `len`: one larger than the burst passes only from a full bucket and
    /// leaves a debt, so the rate holds on average.
    pub fn admit(&mut self, len: u64, now_ns: u64) -> bool {
        let rate = self.rate.min(POLICE_RATE_MAX);
        let burst = i64::try_from(self.burst.min(POLICE_BURST_MAX)).unwrap_or(i64::MAX);
        if now_ns > self.last_ns {
            let us = (now_ns - self.last_ns) / 1000;
            if us >= POLICE_REFILL_FULL_US {
                self.tokens = burst;
                self.frac = 0;
                self.last_ns = now_ns;
            } else if us > 0 {
                // us < 2^24 and rate < 2^39: no overflow, as in the C program.
                let num = us * rate + self.frac;
                let mut tokens = self
                    .tokens
                    .saturating_add(i64::try_from(num / 1_000_000).unwrap_or(i64::MAX));
                self.frac = num % 1_000_000;
                self.last_ns += us * 1000;
                if tokens >= burst {
                    tokens = burst;
                    self.frac = 0;
                }
                self.tokens = tokens;
            }
        }
        let len = i64::try_from(len).unwrap_or(i64::MAX);
        if rate != 0 && self.tokens >= len.min(burst) {
            self.tokens -= len;
            true
        } else {
            false
        }
    }
}

/// One entry of `nw_peer_stats`, summed over CPUs (the C struct `nw_peer_stats`). IP bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Passed by the egress program towards the peer.
    pub tx_bytes: u64,
    pub tx_packets: u64,
    /// Arrived from the peer and admitted by the ingress program.
    pub rx_bytes: u64,
    pub rx_packets: u64,
    /// Arrived from the peer and dropped by the ingress program (blocked, policed).
    pub rx_dropped_bytes: u64,
    pub rx_dropped_packets: u64,
}

impl PeerStats {
    /// The C struct as six `u64`.
    pub fn to_array(&self) -> [u64; 6] {
        [
            self.tx_bytes,
            self.tx_packets,
            self.rx_bytes,
            self.rx_packets,
            self.rx_dropped_bytes,
            self.rx_dropped_packets,
        ]
    }

    pub fn from_array(a: [u64; 6]) -> Self {
        PeerStats {
            tx_bytes: a[0],
            tx_packets: a[1],
            rx_bytes: a[2],
            rx_packets: a[3],
            rx_dropped_bytes: a[4],
            rx_dropped_packets: a[5],
        }
    }

    /// Adds another CPU's values.
    pub fn add(&mut self, other: &PeerStats) {
        let mut a = self.to_array();
        for (x, y) in a.iter_mut().zip(other.to_array()) {
            *x = x.wrapping_add(y);
        }
        *self = PeerStats::from_array(a);
    }

    /// The counters reported for `node`.
    pub fn counters(&self, node: &str) -> crate::PeerCounters {
        crate::PeerCounters {
            node: node.to_string(),
            tx_bytes: self.tx_bytes,
            tx_packets: self.tx_packets,
            rx_bytes: self.rx_bytes,
            rx_packets: self.rx_packets,
            rx_dropped_bytes: self.rx_dropped_bytes,
            rx_dropped_packets: self.rx_dropped_packets,
        }
    }
}

/// A `nw_peer_node` value: the name's bytes, NUL-padded (names are validated by the plan:
/// at most 63 bytes, no NUL; a longer one is cut).
pub fn peer_name_to_bytes(node: &str) -> [u8; PEER_NAME_SIZE] {
    let mut b = [0u8; PEER_NAME_SIZE];
    let n = node.len().min(PEER_NAME_SIZE - 1);
    b[..n].copy_from_slice(&node.as_bytes()[..n]);
    b
}

/// The name in a `nw_peer_node` value ("" for a free index; bytes that are not UTF-8 are
/// replaced, so such an entry matches no desired peer and is cleared).
pub fn peer_name_from_bytes(b: &[u8; PEER_NAME_SIZE]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(PEER_NAME_SIZE);
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl IngressStats {
    /// The C struct `nw_istats` as four `u64`.
    pub fn to_array(&self) -> [u64; 4] {
        [
            self.bytes,
            self.packets,
            self.policed_drops,
            self.blocked_drops,
        ]
    }

    pub fn from_array(a: [u64; 4]) -> Self {
        IngressStats {
            bytes: a[0],
            packets: a[1],
            policed_drops: a[2],
            blocked_drops: a[3],
        }
    }

    /// Adds another CPU's values.
    pub fn add(&mut self, other: &IngressStats) {
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.packets = self.packets.wrapping_add(other.packets);
        self.policed_drops = self.policed_drops.wrapping_add(other.policed_drops);
        self.blocked_drops = self.blocked_drops.wrapping_add(other.blocked_drops);
    }
}

/// The slot of a scope laid out in a plan.
pub fn slot_of(scope: &ScopePlan) -> u32 {
    if scope.class_minor == EGRESS_MINOR {
        0
    } else {
        1 + u32::from(scope.class_minor - PEER_MINOR_BASE)
    }
}

/// The HTB class id (`skb->priority`) of class `1:minor`.
pub fn classid(minor: u16) -> u32 {
    0x0001_0000 | u32::from(minor)
}

/// What `nw_config` should hold for a scope.
pub fn wanted_config(scope: &ScopePlan) -> ScopeConfig {
    let classid = classid(scope.class_minor);
    match (&scope.lease, scope.blocked) {
        (Some(l), _) => ScopeConfig {
            mode: MODE_LEASE,
            classid,
            lease_id: l.id.0,
            volume_limit: l.over,
        },
        (None, true) => ScopeConfig {
            mode: MODE_BLOCKED,
            classid,
            lease_id: 0,
            volume_limit: 0,
        },
        (None, false) => ScopeConfig {
            mode: MODE_FLOOR,
            classid,
            lease_id: 0,
            volume_limit: 0,
        },
    }
}

/// Rate (bytes/s) and burst (bytes) the ingress policer of a scope should have; `None` for a
/// blocked scope (its bucket is not looked at).
pub fn wanted_police(plan: &Plan, scope: &ScopePlan) -> Option<(u64, u64)> {
    if scope.blocked {
        return None;
    }
    plan.class(scope.class_minor)
        .map(|c| (c.rate_bps / 8, c.burst_bytes))
}

/// Destination prefix → slot, as `nw_dst` should hold it.
pub fn wanted_destinations(plan: &Plan) -> BTreeMap<Ipv4Net, u32> {
    plan.scopes
        .iter()
        .flat_map(|s| s.prefixes.iter().map(move |n| (*n, slot_of(s))))
        .collect()
}

/// What the maps hold, as far as a reconcile needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapsKernel {
    /// `nw_config`, every slot.
    pub configs: Vec<ScopeConfig>,
    /// `nw_used` of the slots in [`slots_to_read`].
    pub used: BTreeMap<u32, u64>,
    /// `nw_stats` (summed) of the slots in [`slots_to_read`].
    pub stats: BTreeMap<u32, ScopeStats>,
    /// `nw_dst`.
    pub destinations: BTreeMap<Ipv4Net, u32>,
    /// `nw_police` of the slots in [`slots_to_read`].
    pub police: BTreeMap<u32, Police>,
    /// `nw_istats` (summed) of the slots in [`slots_to_read`].
    pub ingress: BTreeMap<u32, IngressStats>,
    /// `nw_peer`.
    pub peer_addrs: BTreeMap<Ipv4Net, u32>,
    /// `nw_peer_node`, every index ("" = free).
    pub peer_nodes: Vec<String>,
}

impl MapsKernel {
    fn config(&self, slot: u32) -> ScopeConfig {
        self.configs.get(slot as usize).copied().unwrap_or_default()
    }
    fn used(&self, slot: u32) -> u64 {
        self.used.get(&slot).copied().unwrap_or(0)
    }
    fn stats(&self, slot: u32) -> ScopeStats {
        self.stats.get(&slot).copied().unwrap_or_default()
    }
    fn police(&self, slot: u32) -> Police {
        self.police.get(&slot).copied().unwrap_or_default()
    }
    fn ingress(&self, slot: u32) -> IngressStats {
        self.ingress.get(&slot).copied().unwrap_or_default()
    }
}

/// The slots whose counters a reconcile needs: the plan's, and every slot in use.
pub fn slots_to_read(plan: &Plan, configs: &[ScopeConfig]) -> BTreeSet<u32> {
    let mut slots: BTreeSet<u32> = plan.scopes.iter().map(slot_of).collect();
    slots.extend(
        configs
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.is_cleared())
            .filter_map(|(i, _)| u32::try_from(i).ok()),
    );
    slots
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapWrite {
    Used {
        slot: u32,
        used: u64,
    },
    /// Written as the given sums on one CPU and zero on the others.
    Stats {
        slot: u32,
        stats: ScopeStats,
    },
    Config {
        slot: u32,
        config: ScopeConfig,
    },
    /// Written as given (rate, burst and the bucket).
    Police {
        slot: u32,
        police: Police,
    },
    /// Written as the given sums on one CPU and zero on the others.
    IngressStats {
        slot: u32,
        stats: IngressStats,
    },
    Destination {
        net: Ipv4Net,
        slot: u32,
    },
    RemoveDestination {
        net: Ipv4Net,
    },
    /// Written as the given sums on one CPU and zero on the others.
    PeerStats {
        index: u32,
        stats: PeerStats,
    },
    /// `nw_peer_node` of an index ("" clears it).
    PeerNode {
        index: u32,
        node: String,
    },
    PeerAddr {
        net: Ipv4Net,
        index: u32,
    },
    RemovePeerAddr {
        net: Ipv4Net,
    },
}

/// The writes that bring the maps to a plan, in order, and their descriptions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapDiff {
    pub writes: Vec<MapWrite>,
    pub changes: Vec<Change>,
    /// The peer index of each counted peer once the writes are done.
    pub peer_index: BTreeMap<String, u32>,
}

fn change(s: String) -> Change {
    Change(format!("ebpf: {s}"))
}

fn volume_text(over: u64) -> String {
    if over >= crate::plan::UNLIMITED_VOLUME {
        "no volume".to_string()
    } else {
        format!("volume {over} B")
    }
}

/// Computes the writes that bring `kernel` to `plan` (see the module documentation for their
/// order). Empty when the maps already hold the plan.
pub fn diff(plan: &Plan, kernel: &MapsKernel) -> MapDiff {
    let mut counters = Vec::new();
    let mut configs = Vec::new();
    let mut changes = Vec::new();

    // Where each lease is counted now.
    let mut lease_slot: BTreeMap<u64, u32> = BTreeMap::new();
    for (i, c) in kernel.configs.iter().enumerate() {
        if c.mode == MODE_LEASE {
            if let Ok(slot) = u32::try_from(i) {
                lease_slot.entry(c.lease_id).or_insert(slot);
            }
        }
    }

    let mut wanted_slots = BTreeSet::new();
    for s in &plan.scopes {
        let slot = slot_of(s);
        wanted_slots.insert(slot);
        let name = format!("scope {} (slot {slot})", s.scope);
        if let Some(l) = &s.lease {
            match lease_slot.get(&l.id.0).copied() {
                Some(from) if from == slot => {
                    let used = kernel.used(slot);
                    if used < l.start_used {
                        counters.push(MapWrite::Used {
                            slot,
                            used: l.start_used,
                        });
                        changes.push(change(format!(
                            "{name}: lease {} used raised {used} -> {} B (the controller's record)",
                            l.id, l.start_used
                        )));
                    }
                }
                Some(from) => {
                    let used = kernel.used(from).max(l.start_used);
                    let stats = kernel
                        .stats(from)
                        .lease_part_with_blocked(kernel.stats(slot).blocked_drops);
                    counters.push(MapWrite::Used { slot, used });
                    counters.push(MapWrite::Stats { slot, stats });
                    changes.push(change(format!(
                        "{name}: lease {} moved from slot {from}, used {used} B and its counters carried over",
                        l.id
                    )));
                }
                None => {
                    let stats = ScopeStats::default()
                        .lease_part_with_blocked(kernel.stats(slot).blocked_drops);
                    if kernel.used(slot) != l.start_used {
                        counters.push(MapWrite::Used {
                            slot,
                            used: l.start_used,
                        });
                    }
                    if kernel.stats(slot) != stats {
                        counters.push(MapWrite::Stats { slot, stats });
                    }
                    changes.push(change(format!(
                        "{name}: lease {} counted from {} B ({})",
                        l.id,
                        l.start_used,
                        volume_text(l.over)
                    )));
                }
            }
        }
        if let Some((rate, burst)) = wanted_police(plan, s) {
            let have = kernel.police(slot);
            if have.setting() != (rate, burst) {
                let police = Police::full(rate, burst);
                counters.push(MapWrite::Police { slot, police });
                changes.push(change(format!(
                    "{name}: ingress policed at {} (was {})",
                    police.describe(),
                    have.describe()
                )));
            }
        }
        let want = wanted_config(s);
        let have = kernel.config(slot);
        if want != have {
            configs.push(MapWrite::Config { slot, config: want });
            changes.push(change(format!(
                "{name}: {} (was {})",
                want.describe(),
                have.describe()
            )));
        }
    }

    // Destinations: added or moved, then removed.
    let want_dst = wanted_destinations(plan);
    let scope_of_slot: BTreeMap<u32, &Scope> =
        plan.scopes.iter().map(|s| (slot_of(s), &s.scope)).collect();
    let scope_name = |slot: u32| {
        scope_of_slot
            .get(&slot)
            .map_or_else(|| format!("slot {slot}"), |s| s.to_string())
    };
    let mut dst_writes = Vec::new();
    for (net, slot) in &want_dst {
        match kernel.destinations.get(net) {
            Some(have) if have == slot => {}
            Some(have) => {
                dst_writes.push(MapWrite::Destination {
                    net: *net,
                    slot: *slot,
                });
                changes.push(change(format!(
                    "destination {net} -> {} (was slot {have})",
                    scope_name(*slot)
                )));
            }
            None => {
                dst_writes.push(MapWrite::Destination {
                    net: *net,
                    slot: *slot,
                });
                changes.push(change(format!(
                    "destination {net} -> {} added",
                    scope_name(*slot)
                )));
            }
        }
    }
    for (net, have) in &kernel.destinations {
        if !want_dst.contains_key(net) {
            dst_writes.push(MapWrite::RemoveDestination { net: *net });
            changes.push(change(format!("destination {net} (slot {have}) removed")));
        }
    }

    // Slots no scope uses any more.
    let mut clears = Vec::new();
    for (i, c) in kernel.configs.iter().enumerate() {
        let Ok(slot) = u32::try_from(i) else { continue };
        if c.is_cleared() || wanted_slots.contains(&slot) {
            continue;
        }
        if kernel.used(slot) != 0 {
            clears.push(MapWrite::Used { slot, used: 0 });
        }
        if kernel.stats(slot) != ScopeStats::default() {
            clears.push(MapWrite::Stats {
                slot,
                stats: ScopeStats::default(),
            });
        }
        if kernel.police(slot) != Police::default() {
            clears.push(MapWrite::Police {
                slot,
                police: Police::default(),
            });
        }
        if kernel.ingress(slot) != IngressStats::default() {
            clears.push(MapWrite::IngressStats {
                slot,
                stats: IngressStats::default(),
            });
        }
        clears.push(MapWrite::Config {
            slot,
            config: ScopeConfig::default(),
        });
        changes.push(change(format!(
            "slot {slot} cleared (was {})",
            c.describe()
        )));
    }

    let peers = diff_peers(&plan.peers, kernel);
    changes.extend(peers.changes);

    let mut writes = counters;
    writes.extend(configs);
    writes.extend(dst_writes);
    writes.extend(clears);
    writes.extend(peers.writes);
    MapDiff {
        writes,
        changes,
        peer_index: peers.peer_index,
    }
}

/// The index each peer already has in `nw_peer_node` (the first entry with its name).
pub fn installed_peer_index(peers: &[PeerPlan], nodes: &[String]) -> BTreeMap<String, u32> {
    let mut first: BTreeMap<&str, u32> = BTreeMap::new();
    for (i, name) in nodes.iter().enumerate() {
        if let Ok(i) = u32::try_from(i) {
            if !name.is_empty() && i < PEERS {
                first.entry(name.as_str()).or_insert(i);
            }
        }
    }
    peers
        .iter()
        .filter_map(|p| first.get(p.node.as_str()).map(|i| (p.node.clone(), *i)))
        .collect()
}

/// The writes that bring the peer maps to `peers` (see "Peers" in the module documentation
/// for the rules and the order).
fn diff_peers(peers: &[PeerPlan], kernel: &MapsKernel) -> MapDiff {
    let mut peer_index = installed_peer_index(peers, &kernel.peer_nodes);
    let kept: BTreeSet<u32> = peer_index.values().copied().collect();
    let mut removals = Vec::new();
    let mut frees = Vec::new();
    let mut news = Vec::new();
    let mut addr_writes = Vec::new();
    let (mut free_changes, mut new_changes) = (Vec::new(), Vec::new());
    let (mut removal_changes, mut addr_changes) = (Vec::new(), Vec::new());

    // Indices named but not kept: peers no longer desired (or a duplicate name).
    let mut freed = BTreeSet::new();
    for (i, name) in kernel.peer_nodes.iter().enumerate() {
        let Ok(index) = u32::try_from(i) else {
            continue;
        };
        if name.is_empty() || kept.contains(&index) {
            continue;
        }
        freed.insert(index);
        frees.push(MapWrite::PeerStats {
            index,
            stats: PeerStats::default(),
        });
        frees.push(MapWrite::PeerNode {
            index,
            node: String::new(),
        });
        free_changes.push(change(format!(
            "peer {name} (index {index}) removed, its counters cleared"
        )));
    }

    // New peers: the lowest indices nobody holds, then the ones just freed.
    let held: BTreeSet<u32> = kernel
        .peer_nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.is_empty())
        .filter_map(|(i, _)| u32::try_from(i).ok())
        .collect();
    let mut free = (0..PEERS)
        .filter(|i| !held.contains(i))
        .chain(freed.iter().copied());
    for p in peers {
        if peer_index.contains_key(&p.node) {
            continue;
        }
        // The plan holds at most MAX_PEERS <= PEERS peers, so an index is always left.
        let Some(index) = free.next() else { break };
        news.push(MapWrite::PeerStats {
            index,
            stats: PeerStats::default(),
        });
        news.push(MapWrite::PeerNode {
            index,
            node: p.node.clone(),
        });
        new_changes.push(change(format!("peer {} counted at index {index}", p.node)));
        peer_index.insert(p.node.clone(), index);
    }

    // Addresses: removed first (a removed peer stops counting before its counters are
    // cleared), added or moved last (a new peer counts once its counters are zero).
    let want: BTreeMap<Ipv4Net, (u32, &str)> = peers
        .iter()
        .filter_map(|p| peer_index.get(&p.node).map(|i| (p, *i)))
        .flat_map(|(p, i)| p.addrs.iter().map(move |n| (*n, (i, p.node.as_str()))))
        .collect();
    for (net, have) in &kernel.peer_addrs {
        if !want.contains_key(net) {
            removals.push(MapWrite::RemovePeerAddr { net: *net });
            removal_changes.push(change(format!("peer address {net} (index {have}) removed")));
        }
    }
    for (net, (index, node)) in &want {
        match kernel.peer_addrs.get(net) {
            Some(have) if have == index => {}
            Some(have) => {
                addr_writes.push(MapWrite::PeerAddr {
                    net: *net,
                    index: *index,
                });
                addr_changes.push(change(format!(
                    "peer address {net} -> peer {node} (index {index}; was index {have})"
                )));
            }
            None => {
                addr_writes.push(MapWrite::PeerAddr {
                    net: *net,
                    index: *index,
                });
                addr_changes.push(change(format!(
                    "peer address {net} -> peer {node} (index {index}) added"
                )));
            }
        }
    }

    let mut writes = removals;
    writes.extend(frees);
    writes.extend(news);
    writes.extend(addr_writes);
    let mut changes = removal_changes;
    changes.extend(free_changes);
    changes.extend(new_changes);
    changes.extend(addr_changes);
    MapDiff {
        writes,
        changes,
        peer_index,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    /// Runs `packets` (time in ns, IP length) through a policer; returns the verdicts as a
    /// string of `+` (admitted) and `-` (dropped) and the tokens left.
    #[track_caller]
    fn run(police: &mut Police, packets: &[(u64, u64)]) -> (String, i64) {
        let verdicts = packets
            .iter()
            .map(|&(t, len)| if police.admit(len, t) { '+' } else { '-' })
            .collect();
        (verdicts, police.tokens)
    }

    #[test]
    fn bucket_arithmetic() {
        #[track_caller]
        fn check(rate: u64, burst: u64, packets: &[(u64, u64)], expect: &str, tokens: i64) {
            let mut p = Police::full(rate, burst);
            assert_eq!(
                run(&mut p, packets),
                (expect.to_string(), tokens),
                "rate {rate} burst {burst}"
            );
        }
        // A full bucket passes the burst, then nothing until it refills.
        check(1000, 3000, &[(0, 1000), (0, 2000), (0, 1)], "++-", 0);
        // 1 ms at 1000 B/s is 1 byte.
        check(1000, 3000, &[(0, 3000), (MS, 1), (MS, 1)], "++-", 0);
        // Refill caps at the burst.
        check(
            1000,
            3000,
            &[(0, 3000), (10 * S, 3000), (10 * S, 1)],
            "++-",
            0,
        );
        // A packet larger than the burst passes from a full bucket only, leaving a debt that
        // later packets wait out.
        check(1000, 1000, &[(0, 1500), (0, 100), (S / 2, 100)], "+--", 0);
        check(1000, 1000, &[(0, 1500), (S / 2 + S / 10, 100)], "++", 0);
        check(1000, 1000, &[(0, 900), (0, 1500)], "+-", 100);
        // Rate 0 admits nothing, whatever the bucket holds.
        check(0, 1000, &[(0, 1), (100 * S, 1)], "--", 1000);
        // After 16 s without packets the bucket is full, even from a debt.
        check(1, 1000, &[(0, 5000), (20 * S, 1000)], "++", 0);
        // A fresh policer (last_ns 0) is full at any later time.
        check(7, 1000, &[(123 * S, 1000), (123 * S, 1)], "+-", 0);
        // Time that runs backwards (another CPU refilled later) refills nothing.
        check(1000, 1000, &[(S, 1000), (S / 2, 1), (S + MS, 1)], "+-+", 0);
    }

    /// Over any period the bucket gains exactly rate × period: refills that are not whole
    /// microseconds or whole bytes are carried, not lost.
    #[test]
    fn refill_is_exact_at_any_packet_spacing() {
        for (rate, step_ns, period) in [
            (1_234_567u64, 777u64, S),
            (1_000_000, 1_999, S),
            (3, 100_003, 15 * S),
            (125_000_000, 333, S / 20),
        ] {
            let burst = 1_000_000;
            let mut p = Police::full(rate, burst);
            // Drain the bucket at t = 1 µs, then at every step offer 1-byte packets until one
            // is dropped, for `period`.
            let start = 1_000;
            assert!(p.admit(burst, start));
            let mut admitted = 0u64;
            let mut t = start;
            while t < start + period {
                t += step_ns;
                while p.admit(1, t) {
                    admitted += 1;
                }
            }
            let elapsed = t - start;
            let expect = u128::from(rate) * u128::from(elapsed) / u128::from(S);
            let expect = u64::try_from(expect).unwrap_or(u64::MAX);
            // The last refill may wait for the next whole microsecond.
            let slack = rate / 1_000_000 + 1;
            assert!(
                admitted <= expect && expect - admitted <= slack,
                "rate {rate} step {step_ns}: admitted {admitted}, expected {expect}"
            );
        }
    }

    /// The largest rate over the longest partial refill does not overflow (debug builds
    /// panic on overflow).
    #[test]
    fn no_overflow_at_the_limits() {
        let mut p = Police::full(POLICE_RATE_MAX, POLICE_BURST_MAX);
        assert!(p.admit(u64::from(u32::MAX), 5));
        assert!(p.admit(1, POLICE_REFILL_FULL_US * 1000 - 1));
        let mut p = Police::full(u64::MAX, u64::MAX);
        assert!(p.admit(u64::MAX, 5));
        assert!(!p.admit(1, 6));
        assert!(
            !p.admit(1, POLICE_REFILL_FULL_US * 1000 - 1),
            "a debt of 2^62 B"
        );
        assert!(p.admit(1, POLICE_REFILL_FULL_US * 3000), "full after 16 s");
    }

    #[test]
    fn police_bytes_round_trip() {
        let p = Police {
            rate: 5_000_000,
            burst: 65_536,
            tokens: -1234,
            last_ns: 0x0102_0304_0506_0708,
            frac: 999_999,
        };
        let b = p.to_bytes();
        assert_eq!(b[..8], [0u8; 8], "the lock word and the padding stay zero");
        assert_eq!(b[8..16], 5_000_000u64.to_ne_bytes());
        assert_eq!(Police::from_bytes(&b), p);
        assert_eq!(p.describe(), "5000000 B/s, burst 65536 B");
        assert_eq!(Police::default().describe(), "unset");
        let s = IngressStats {
            bytes: 1,
            packets: 2,
            policed_drops: 3,
            blocked_drops: 4,
        };
        assert_eq!(IngressStats::from_array(s.to_array()), s);
    }
}
