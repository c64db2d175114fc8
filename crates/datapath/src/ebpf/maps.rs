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
//! Order of the writes of one reconcile: counters (`nw_used`, `nw_stats`) of slots whose
//! lease starts or moves, then the configs of the wanted slots, then destinations added or
//! moved, then destinations removed, then slots cleared (counters first, config last). So a
//! config names a lease only once its counter is in place: every byte that passes under a
//! new lease is charged to it. (The old lease of a slot may pass what is in flight in the
//! few microseconds between the two map writes; nothing is charged to no one.) Each later
//! decision about a scope (revocation, floor, a new volume) is one write of its config.

use crate::plan::{Plan, ScopePlan, EGRESS_MINOR, MAX_PEER_SCOPES, PEER_MINOR_BASE};
use crate::Change;
use ipnet::Ipv4Net;
use nicwarden_lease::Scope;
use std::collections::{BTreeMap, BTreeSet};

/// Entries of the slot-indexed arrays (`NW_SLOTS` in the C program).
pub const SLOTS: u32 = 1024;
/// Most destination prefixes the LPM trie holds (`NW_DST_MAX`).
pub const DST_MAX: usize = 65536;

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
pub const PROGRAM: &str = "nw_egress";

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
    Destination {
        net: Ipv4Net,
        slot: u32,
    },
    RemoveDestination {
        net: Ipv4Net,
    },
}

/// The writes that bring the maps to a plan, in order, and their descriptions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapDiff {
    pub writes: Vec<MapWrite>,
    pub changes: Vec<Change>,
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
        clears.push(MapWrite::Config {
            slot,
            config: ScopeConfig::default(),
        });
        changes.push(change(format!(
            "slot {slot} cleared (was {})",
            c.describe()
        )));
    }

    let mut writes = counters;
    writes.extend(configs);
    writes.extend(dst_writes);
    writes.extend(clears);
    MapDiff { writes, changes }
}
