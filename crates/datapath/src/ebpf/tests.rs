//! The eBPF backend's reconcile logic against the in-memory bpf subsystem ([`FakeBpf`]) and
//! the in-memory tc ([`FakeKernel`]).

use super::maps::{PeerStats, Police, ScopeConfig, ScopeStats, MODE_LEASE};
use super::{EbpfDatapath, FakeBpf, Hook, Verdict};
use crate::fake::fixtures::{counted, egress, floor, lease, peer};
use crate::fake::FakeKernel;
use crate::test_support::apply;
use crate::{
    ClassStats, Datapath, DesiredState, IngressStats, LeaseCounters, PeerCount, PeerCounters,
    ScopeCounters, ScopeSpec,
};
use nicwarden_lease::{LeaseId, Scope};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

const DEV: &str = "fab0";
const B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const C: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);

fn pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/nicwarden/node-1")
}

fn state(scopes: Vec<ScopeSpec>) -> DesiredState {
    DesiredState {
        scopes,
        peers: Vec::new(),
    }
}

/// Egress lease 7 with a volume (500 B already used), peer b on lease 9 without one, peer c
/// blocked.
fn three_scopes() -> DesiredState {
    state(vec![
        egress(lease(7, 100_000_000, Some(1_000_000), 500)),
        peer("b", &["198.18.0.2/32"], lease(9, 10_000_000, None, 0)),
        peer("c", &["198.18.0.3/32"], floor(0)),
    ])
}

struct Node {
    tc: FakeKernel,
    bpf: FakeBpf,
    dir: PathBuf,
}

impl Node {
    fn new() -> Node {
        Node {
            tc: FakeKernel::new(DEV),
            bpf: FakeBpf::new(DEV),
            dir: pin_dir(),
        }
    }
    /// A datapath as a (new) agent process would have.
    fn datapath(&self) -> EbpfDatapath {
        self.bpf.datapath(&self.tc, &self.dir)
    }
    /// The maps, rendered: non-empty slots (config, used, stats, policer rate and burst,
    /// ingress stats) and destinations.
    fn maps(&self) -> Vec<String> {
        let mut out = Vec::new();
        for slot in 0..super::maps::SLOTS {
            let config = self.bpf.config(&self.dir, slot).unwrap_or_default();
            let used = self.bpf.used(&self.dir, slot).unwrap_or(0);
            let stats = self.bpf.stats(&self.dir, slot).unwrap_or_default();
            let police = self.bpf.police(&self.dir, slot).unwrap_or_default();
            let ingress = self.bpf.ingress_stats(&self.dir, slot).unwrap_or_default();
            if config.is_cleared()
                && used == 0
                && stats == ScopeStats::default()
                && police == Police::default()
                && ingress == IngressStats::default()
            {
                continue;
            }
            let mut line = format!("slot {slot}: {}", config.describe());
            if used != 0 {
                line.push_str(&format!(", used {used}"));
            }
            if stats != ScopeStats::default() {
                line.push_str(&format!(", stats {:?}", stats.to_array()));
            }
            if police.setting() != (0, 0) {
                line.push_str(&format!(", police {}/{}", police.rate, police.burst));
            }
            if ingress != IngressStats::default() {
                line.push_str(&format!(", ingress {:?}", ingress.to_array()));
            }
            out.push(line);
        }
        for (net, slot) in self.bpf.destinations(&self.dir).unwrap_or_default() {
            out.push(format!("dst {net} -> slot {slot}"));
        }
        out
    }
    /// Sends `n` packets of `len` IP bytes to `dst` (None: ARP); returns how many passed.
    fn send(&self, dst: Option<Ipv4Addr>, n: u64, len: u64) -> u64 {
        (0..n)
            .filter(|_| matches!(self.bpf.packet(dst, len), Verdict::Pass(_)))
            .count() as u64
    }
    /// `n` packets of `len` IP bytes arrive from `src` (None: not IPv4), all at `now_ns`;
    /// returns how many passed.
    fn receive(&self, src: Option<Ipv4Addr>, n: u64, len: u64, now_ns: u64) -> u64 {
        (0..n)
            .filter(|_| self.bpf.arrive(src, len, now_ns) == Verdict::Pass(0))
            .count() as u64
    }
    /// Our programs attached at both hooks (and clsact present).
    fn attached_ours(&self) -> bool {
        Hook::ALL.iter().all(|h| {
            self.bpf.attached(*h).is_some()
                && self.bpf.attached(*h) == self.bpf.pinned_program(&self.dir, *h)
        }) && self.bpf.clsact()
    }
    /// Nothing attached at either hook, no clsact.
    fn nothing_attached(&self) -> bool {
        Hook::ALL.iter().all(|h| self.bpf.attached(*h).is_none()) && !self.bpf.clsact()
    }
}

/// A node and a datapath on it.
fn fresh() -> (Node, EbpfDatapath) {
    let n = Node::new();
    let dp = n.datapath();
    (n, dp)
}

#[track_caller]
fn counters(dp: &mut EbpfDatapath) -> Vec<ScopeCounters> {
    match dp.counters() {
        Ok(c) => c,
        Err(e) => panic!("counters failed: {e}"),
    }
}

fn scope<'a>(counters: &'a [ScopeCounters], s: &Scope) -> &'a ScopeCounters {
    match counters.iter().find(|c| &c.scope == s) {
        Some(c) => c,
        None => panic!("no counters for {s}: {counters:?}"),
    }
}

/// What the maps hold after a first install of various desired states.
#[test]
fn map_contents_for_desired_states() {
    #[track_caller]
    fn check(desired: DesiredState, expect: &[&str]) {
        let n = Node::new();
        apply(&mut n.datapath(), &desired);
        assert_eq!(n.maps(), expect);
        assert!(n.attached_ours());
    }
    check(
        state(vec![egress(floor(0))]),
        &["slot 0: blocked (class 1:10)"],
    );
    check(
        state(vec![egress(floor(2_000_000))]),
        &["slot 0: floor -> class 1:10, police 250000/65536"],
    );
    // Policers at the scope's rate in bytes/s with its HTB burst; none for a blocked scope.
    check(
        three_scopes(),
        &[
            "slot 0: lease 7 (volume 1000000 B) -> class 1:10, used 500, police 12500000/65536",
            "slot 1: lease 9 (no volume) -> class 1:100, police 1250000/65536",
            "slot 2: blocked (class 1:101)",
            "dst 198.18.0.2/32 -> slot 1",
            "dst 198.18.0.3/32 -> slot 2",
        ],
    );
    // Several prefixes (aggregated as in the tc plan), a start above the volume (clamped).
    check(
        state(vec![
            egress(floor(0)),
            peer(
                "a",
                &["198.19.0.0/24", "198.19.1.0/24", "198.19.8.8/32"],
                lease(3, 1_000_000_000, Some(10_000), 50_000),
            ),
            peer("z", &["10.0.0.0/8"], floor(1_000_000)),
        ]),
        &[
            "slot 0: blocked (class 1:10)",
            "slot 1: lease 3 (volume 10000 B) -> class 1:100, used 10000, police 125000000/625000",
            "slot 2: floor -> class 1:101, police 125000/65536",
            "dst 10.0.0.0/8 -> slot 2",
            "dst 198.19.0.0/23 -> slot 1",
            "dst 198.19.8.8/32 -> slot 1",
        ],
    );
}

/// The first install: what is reported, and the tc layout without any filter.
#[test]
fn first_install_reports_changes_and_installs_no_filters() {
    let (n, mut dp) = fresh();
    let changes = apply(&mut dp, &three_scopes());
    let dir = n.dir.display();
    assert_eq!(
        changes,
        [
            "ebpf: bpf filesystem mounted on /sys/fs/bpf".to_string(),
            format!("ebpf: maps created, pinned under {dir}"),
            "ebpf: program nw_egress loaded, pinned".to_string(),
            "ebpf: program nw_ingress loaded, pinned".to_string(),
            "ebpf: scope egress (slot 0): lease 7 counted from 500 B (volume 1000000 B)".to_string(),
            "ebpf: scope egress (slot 0): ingress policed at 12500000 B/s, burst 65536 B (was unset)".to_string(),
            "ebpf: scope egress (slot 0): lease 7 (volume 1000000 B) -> class 1:10 (was unset)".to_string(),
            "ebpf: scope peer:b (slot 1): lease 9 counted from 0 B (no volume)".to_string(),
            "ebpf: scope peer:b (slot 1): ingress policed at 1250000 B/s, burst 65536 B (was unset)".to_string(),
            "ebpf: scope peer:b (slot 1): lease 9 (no volume) -> class 1:100 (was unset)".to_string(),
            "ebpf: scope peer:c (slot 2): blocked (class 1:101) (was unset)".to_string(),
            "ebpf: destination 198.18.0.2/32 -> peer:b added".to_string(),
            "ebpf: destination 198.18.0.3/32 -> peer:c added".to_string(),
            "tc: root qdisc htb 1: default 3 installed on fab0 (was noqueue 0:)".to_string(),
            "tc: class 1:2 (control) added: rate 1000000 bit/s, burst 65536 B, quantum 12500, leaf pfifo limit 100".to_string(),
            "tc: class 1:3 (drop) added: rate 8 bit/s, burst 10 B, quantum 1514, leaf pfifo limit 0 (drops everything)".to_string(),
            "tc: class 1:10 (egress) added: rate 100000000 bit/s, burst 65536 B, quantum 200000, leaf pfifo limit 1000".to_string(),
            "tc: class 1:100 (peer:b) added: rate 10000000 bit/s, burst 65536 B, quantum 125000, leaf pfifo limit 1000".to_string(),
            "tc: class 1:101 (peer:c) added: rate 8 bit/s, burst 10 B, quantum 1514, leaf pfifo limit 0 (drops everything)".to_string(),
            "ebpf: program nw_egress attached to fab0 egress (clsact, pref 1, handle 0x1)".to_string(),
            "ebpf: program nw_ingress attached to fab0 ingress (clsact, pref 1, handle 0x1)".to_string(),
        ]
    );
    assert_eq!(n.tc.filter_counts(), vec![]);
    assert!(!n.tc.has_table(), "no nftables");
}

/// On a node the tc backend programmed, the eBPF backend keeps the HTB classes (counters
/// and all) and removes the u32 filters: steering is the program's now.
#[test]
fn takes_over_the_tc_backends_htb() {
    let n = Node::new();
    let mut tc_backend = n.tc.datapath();
    tc_backend
        .reconcile(&three_scopes())
        .unwrap_or_else(|e| panic!("tc backend: {e}"));
    n.tc.add_leaf_stats(0x10, 1000, 10, 0);
    let changes = apply(&mut n.datapath(), &three_scopes());
    let tc: Vec<&String> = changes.iter().filter(|c| c.starts_with("tc:")).collect();
    assert_eq!(
        tc,
        [
            "tc: filter pref 1 (arp u32, 1 filters) removed",
            "tc: filter pref 2 ([34997] u32, 1 filters) removed",
            "tc: filter pref 100 (ip u32, 1 filters) removed",
            "tc: filter pref 101 (ip u32, 1 filters) removed",
            "tc: filter pref 1000 (all u32, 1 filters) removed",
        ]
    );
    assert_eq!(n.tc.filter_counts(), vec![]);
    assert_eq!(n.tc.leaf_stats(0x10), Some((1000, 10, 0)));
    // (The tc backend's nftables table is not the eBPF backend's to remove.)
    assert!(n.tc.has_table());
}

/// Applying the same state again changes nothing and writes nothing, in the same process
/// and in a restarted one; counters continue.
#[test]
fn reapply_is_a_no_op_and_restart_continues() {
    #[track_caller]
    fn check(desired: DesiredState) {
        let (n, mut dp) = fresh();
        apply(&mut dp, &desired);
        n.send(Some(OTHER), 3, 100);
        n.send(Some(B), 2, 200);
        n.send(Some(C), 1, 300);
        n.receive(Some(B), 4, 200, T0);
        n.receive(Some(C), 5, 200, T0);
        let before = counters(&mut dp);
        let maps = n.maps();
        n.bpf.take_log();
        n.tc.take_log();
        assert_eq!(apply(&mut dp, &desired), Vec::<String>::new());
        let mut restarted = n.datapath();
        assert_eq!(apply(&mut restarted, &desired), Vec::<String>::new());
        assert_eq!(n.bpf.take_log(), Vec::<String>::new());
        assert_eq!(n.tc.take_log(), Vec::<String>::new());
        assert_eq!(n.maps(), maps);
        assert_eq!(counters(&mut restarted), before);
        // And they continue from there, the buckets with them.
        n.send(Some(OTHER), 1, 100);
        n.send(Some(B), 1, 100);
        n.send(Some(C), 1, 100);
        n.receive(Some(B), 1, 100, T0);
        assert_ne!(counters(&mut restarted), before);
    }
    check(three_scopes());
    check(state(vec![egress(floor(0))]));
    check(state(vec![
        egress(floor(8)),
        peer("x", &["198.18.0.0/30"], lease(2, 8, None, 0)),
    ]));
}

/// The lease of a scope changes: its count restarts at the new lease's start; the slot's
/// blocked drops stay.
#[test]
fn lease_change_resets_used() {
    let (n, mut dp) = fresh();
    apply(
        &mut dp,
        &state(vec![
            egress(floor(0)),
            peer("b", &["198.18.0.2/32"], floor(0)),
        ]),
    );
    assert_eq!(n.send(Some(B), 4, 100), 0);
    apply(
        &mut dp,
        &state(vec![
            egress(floor(0)),
            peer(
                "b",
                &["198.18.0.2/32"],
                lease(9, 1_000_000, Some(10_000), 0),
            ),
        ]),
    );
    assert_eq!(n.send(Some(B), 10, 100), 10);
    assert_eq!(n.bpf.used(&n.dir, 1), Some(1000));
    n.bpf.take_log();

    let changes = apply(
        &mut dp,
        &state(vec![
            egress(floor(0)),
            peer(
                "b",
                &["198.18.0.2/32"],
                lease(10, 1_000_000, Some(10_000), 300),
            ),
        ]),
    );
    assert_eq!(
        changes,
        [
            "ebpf: scope peer:b (slot 1): lease 10 counted from 300 B (volume 10000 B)",
            "ebpf: scope peer:b (slot 1): lease 10 (volume 10000 B) -> class 1:100 (was lease 9 (volume 10000 B) -> class 1:100)",
        ]
    );
    // Counters first, then the config: every byte under lease 10 is charged to it.
    assert_eq!(
        n.bpf.take_log(),
        [
            "used 1 = 300",
            "stats 1 = [0, 0, 0, 4]",
            "config 1 = lease 10 (volume 10000 B) -> class 1:100",
        ]
    );
    let b = scope(&counters(&mut dp), &Scope::Peer("b".into())).clone();
    assert_eq!(
        b.lease,
        Some(LeaseCounters {
            lease: LeaseId(10),
            used_bytes: 300,
            passed_packets: 0,
            volume_drops: 0,
            exhausted: false
        })
    );
    assert_eq!(b.class.drops, 4, "blocked drops belong to the slot");
}

/// The same lease keeps its count across reconciles that change other things (rate, other
/// scopes), and is raised, never lowered, to the controller's record.
#[test]
fn same_lease_keeps_used() {
    let (n, mut dp) = fresh();
    let with = |rate: u64, start: u64| {
        state(vec![
            egress(lease(7, rate, Some(1_000_000), start)),
            peer("c", &["198.18.0.3/32"], floor(0)),
        ])
    };
    apply(&mut dp, &with(100_000_000, 0));
    n.send(Some(OTHER), 10, 1000);
    n.bpf.take_log();
    // A rate change is tc's business and the ingress policer's (a full bucket at the new
    // rate); the count stays.
    assert_eq!(
        apply(&mut dp, &with(50_000_000, 0)),
        [
            "ebpf: scope egress (slot 0): ingress policed at 6250000 B/s, burst 65536 B (was 12500000 B/s, burst 65536 B)",
            "tc: class 1:10 (egress) rate 100000000 -> 50000000 bit/s",
        ]
    );
    assert_eq!(n.bpf.take_log(), ["police 0 = 6250000 B/s, burst 65536 B"]);
    assert_eq!(n.bpf.used(&n.dir, 0), Some(10_000));
    // The controller recorded less: kept.
    assert_eq!(
        apply(&mut dp, &with(50_000_000, 4_000)),
        Vec::<String>::new()
    );
    assert_eq!(n.bpf.used(&n.dir, 0), Some(10_000));
    // The controller recorded more: raised.
    assert_eq!(
        apply(&mut dp, &with(50_000_000, 25_000)),
        ["ebpf: scope egress (slot 0): lease 7 used raised 10000 -> 25000 B (the controller's record)"]
    );
    assert_eq!(n.bpf.take_log(), ["used 0 = 25000"]);
    let e = scope(&counters(&mut dp), &Scope::Egress).lease;
    assert_eq!(
        e,
        Some(LeaseCounters {
            lease: LeaseId(7),
            used_bytes: 25_000,
            passed_packets: 10,
            volume_drops: 0,
            exhausted: false
        })
    );
}

/// A revocation (lease -> blocked) and a new volume are one config write each (a blocked
/// scope's policer is left as it is); what changes the rate writes the policer first.
#[test]
fn decisions_are_one_map_write() {
    #[track_caller]
    fn check(after: crate::ScopeEnforce, log: &[&str]) {
        let (n, mut dp) = fresh();
        let with = |b: crate::ScopeEnforce| {
            state(vec![egress(floor(0)), peer("b", &["198.18.0.2/32"], b)])
        };
        apply(&mut dp, &with(lease(9, 1_000_000, Some(10_000), 0)));
        n.bpf.take_log();
        apply(&mut dp, &with(after));
        assert_eq!(n.bpf.take_log(), log);
    }
    check(floor(0), &["config 1 = blocked (class 1:100)"]);
    check(
        floor(1_000),
        &[
            "police 1 = 125 B/s, burst 1250 B",
            "config 1 = floor -> class 1:100",
        ],
    );
    check(
        lease(9, 1_000_000, Some(20_000), 0),
        &["config 1 = lease 9 (volume 20000 B) -> class 1:100"],
    );
    check(
        lease(9, 2_000_000, Some(10_000), 0),
        &["police 1 = 250000 B/s, burst 65536 B"],
    );
}

/// Exact volume: nothing beyond it passes; the counters tell what happened.
#[test]
fn volume_is_exact() {
    let (n, mut dp) = fresh();
    apply(
        &mut dp,
        &state(vec![
            egress(lease(21, 100_000_000, Some(20_000), 0)),
            peer("c", &["198.18.0.3/32"], floor(0)),
        ]),
    );
    // 1028 B packets: 19 fit in 20 000 B.
    assert_eq!(n.send(Some(OTHER), 100, 1028), 19);
    // A smaller packet still fits in what is left (20 000 - 19 532 = 468).
    assert_eq!(n.send(Some(OTHER), 1, 468), 1);
    assert_eq!(n.send(Some(OTHER), 1, 1), 0);
    assert_eq!(n.send(Some(C), 5, 100), 0);
    assert_eq!(n.send(None, 3, 60), 3, "ARP passes");
    assert_eq!(
        n.bpf.packet(None, 60),
        Verdict::Pass(0x0001_0002),
        "ARP goes to the control class"
    );
    let c = counters(&mut dp);
    assert_eq!(
        scope(&c, &Scope::Egress).lease,
        Some(LeaseCounters {
            lease: LeaseId(21),
            used_bytes: 20_000,
            passed_packets: 20,
            volume_drops: 82,
            exhausted: true
        })
    );
    assert_eq!(
        scope(&c, &Scope::Peer("c".into())).class,
        ClassStats {
            bytes: 0,
            packets: 0,
            drops: 5
        }
    );
}

/// A long time after boot: a fresh bucket is full at any such time.
const T0: u64 = 1_000 * 1_000_000_000;
const SEC: u64 = 1_000_000_000;

/// Ingress, packet by packet: the source picks the slot (a miss is the egress scope), a
/// blocked scope drops, the others are policed by their bucket; what is not IPv4 passes
/// uncounted. The counters tell what happened.
#[test]
fn ingress_polices_by_source() {
    let (n, mut dp) = fresh();
    // Peer b at 80 kbit/s = 10 000 B/s, burst 65 536 B (the default: 64 KiB).
    apply(
        &mut dp,
        &state(vec![
            egress(lease(7, 100_000_000, None, 0)),
            peer("b", &["198.18.0.2/32"], lease(9, 80_000, None, 0)),
            peer("c", &["198.18.0.3/32"], floor(0)),
        ]),
    );
    assert_eq!(
        n.bpf.police(&n.dir, 1).map(|p| p.setting()),
        Some((10_000, 65_536))
    );
    // The full bucket: 65 packets of 1000 B, not the 66th; nothing more at the same time.
    assert_eq!(n.receive(Some(B), 100, 1000, T0), 65);
    // One second later: 10 000 B more (plus the 536 B left).
    assert_eq!(n.receive(Some(B), 100, 1000, T0 + SEC), 10);
    // 1.5 s later still: 15 000 + 536 B.
    assert_eq!(n.receive(Some(B), 100, 1000, T0 + 5 * SEC / 2), 15);
    // Blocked: nothing, whatever the bucket (none is written for it).
    assert_eq!(n.receive(Some(C), 5, 100, T0), 0);
    // Any other source is the egress scope (12.5 MB/s, burst 64 KiB).
    assert_eq!(n.receive(Some(OTHER), 60, 1000, T0), 60);
    assert_eq!(n.receive(Some(Ipv4Addr::new(10, 1, 2, 3)), 10, 1000, T0), 5);
    // ARP, IPv6, ...: pass, counted nowhere.
    assert_eq!(n.receive(None, 1000, 1500, T0), 1000);
    // Egress is not ingress: sending to b charges b's volume counters, not its bucket.
    assert_eq!(n.send(Some(B), 3, 100), 3);

    let c = counters(&mut dp);
    assert_eq!(
        scope(&c, &Scope::Peer("b".into())).ingress,
        IngressStats {
            bytes: 90_000,
            packets: 90,
            policed_drops: 35 + 90 + 85,
            blocked_drops: 0,
        }
    );
    assert_eq!(
        scope(&c, &Scope::Peer("c".into())).ingress,
        IngressStats {
            blocked_drops: 5,
            ..Default::default()
        }
    );
    assert_eq!(
        scope(&c, &Scope::Egress).ingress,
        IngressStats {
            bytes: 65_000,
            packets: 65,
            policed_drops: 5,
            blocked_drops: 0,
        }
    );
    // Ingress drops are not egress drops.
    assert_eq!(scope(&c, &Scope::Peer("c".into())).class.drops, 0);
    assert_eq!(
        scope(&c, &Scope::Peer("b".into()))
            .lease
            .map(|l| l.passed_packets),
        Some(3)
    );

    // Everything blocked (no lease): no fabric traffic in either direction, only ARP.
    apply(
        &mut dp,
        &state(vec![
            egress(floor(0)),
            peer("b", &["198.18.0.2/32"], floor(0)),
            peer("c", &["198.18.0.3/32"], floor(0)),
        ]),
    );
    for src in [B, C, OTHER] {
        assert_eq!(n.receive(Some(src), 3, 100, T0 + 100 * SEC), 0, "{src}");
    }
    assert_eq!(n.receive(None, 3, 60, T0 + 100 * SEC), 3, "ARP passes");
}

/// A sender at three times a scope's rate for 2 s gets the burst and exactly the rate.
#[test]
fn ingress_admits_the_rate_of_an_overload() {
    let (n, mut dp) = fresh();
    let rate = 8_000_000; // 1 MB/s
    apply(
        &mut dp,
        &state(vec![
            egress(floor(0)),
            peer("b", &["198.18.0.0/24"], lease(9, rate, None, 0)),
        ]),
    );
    let burst = 65_536;
    // 1000-byte packets at 3 MB/s: one every 333 333 ns, for 2 s.
    let (mut offered, mut admitted) = (0u64, 0u64);
    let mut t = T0;
    while t < T0 + 2 * SEC {
        offered += 1000;
        admitted += 1000 * n.receive(Some(Ipv4Addr::new(198, 18, 0, 77)), 1, 1000, t);
        t += 333_333;
    }
    let expect = burst + rate / 8 * 2;
    assert!(offered > 3 * expect - 300_000, "{offered}");
    assert!(
        admitted <= expect && expect - admitted < 1000,
        "admitted {admitted} B, expected {expect} B (burst + 2 s of the rate)"
    );
    let b = scope(&counters(&mut dp), &Scope::Peer("b".into())).ingress;
    assert_eq!(b.bytes, admitted);
    assert_eq!(b.packets + b.policed_drops, offered / 1000);
}

/// Peers renumbered (one added before another): a lease that moves slots takes its count
/// and counters along; a removed scope's slot is cleared.
#[test]
fn renumbering_moves_counts_and_removal_clears() {
    let (n, mut dp) = fresh();
    apply(
        &mut dp,
        &state(vec![
            egress(floor(0)),
            peer(
                "m",
                &["198.18.0.2/32"],
                lease(9, 1_000_000, Some(100_000), 0),
            ),
        ]),
    );
    n.send(Some(B), 7, 100);
    let changes = apply(
        &mut dp,
        &state(vec![
            egress(floor(0)),
            peer("a", &["198.18.0.3/32"], floor(0)),
            peer(
                "m",
                &["198.18.0.2/32"],
                lease(9, 1_000_000, Some(100_000), 0),
            ),
        ]),
    );
    assert!(
        changes.contains(
            &"ebpf: scope peer:m (slot 2): lease 9 moved from slot 1, used 700 B and its counters carried over"
                .to_string()
        ),
        "{changes:#?}"
    );
    assert_eq!(
        n.maps(),
        [
            "slot 0: blocked (class 1:10)",
            // The slot lease 9 left keeps its counts until its next lease starts (so that
            // a revocation stays one write); a blocked scope reports none of them.
            // (Its policer too: a blocked slot's bucket is not looked at.)
            "slot 1: blocked (class 1:100), used 700, stats [700, 7, 0, 0], police 125000/65536",
            "slot 2: lease 9 (volume 100000 B) -> class 1:101, used 700, stats [700, 7, 0, 0], police 125000/65536",
            "dst 198.18.0.2/32 -> slot 2",
            "dst 198.18.0.3/32 -> slot 1",
        ]
    );
    let m = scope(&counters(&mut dp), &Scope::Peer("m".into())).lease;
    assert_eq!(m.map(|l| (l.used_bytes, l.passed_packets)), Some((700, 7)));

    // Both peers go: their slots are cleared (ingress counters and policers too), their
    // prefixes fall back to egress.
    n.send(Some(C), 2, 100);
    assert_eq!(n.receive(Some(B), 2, 100, T0), 2);
    let changes = apply(&mut dp, &state(vec![egress(floor(0))]));
    assert_eq!(
        changes,
        [
            "ebpf: destination 198.18.0.2/32 (slot 2) removed",
            "ebpf: destination 198.18.0.3/32 (slot 1) removed",
            "ebpf: slot 1 cleared (was blocked (class 1:100))",
            "ebpf: slot 2 cleared (was lease 9 (volume 100000 B) -> class 1:101)",
            "tc: class 1:100 removed",
            "tc: class 1:101 removed",
        ]
    );
    assert_eq!(n.maps(), ["slot 0: blocked (class 1:10)"]);
}

/// Tampering is repaired by the next reconcile; a foreign program in our slot is replaced.
#[test]
fn repairs_tampering() {
    let (n, mut dp) = fresh();
    apply(&mut dp, &three_scopes());
    let reference = n.maps();
    n.bpf.take_log();

    n.bpf.tamper_config(
        &n.dir,
        2,
        ScopeConfig {
            mode: MODE_LEASE,
            classid: 0x0001_0101,
            lease_id: 99,
            volume_limit: u64::MAX,
        },
    );
    n.bpf
        .tamper_remove_destination(&n.dir, "198.18.0.2/32".parse().expect("net"));
    n.bpf.tamper_police(&n.dir, 1, Police::full(1, 1));
    n.bpf.attach_foreign(Hook::Egress, 4242);
    n.bpf.tamper_detach(Hook::Ingress);
    let changes = apply(&mut dp, &three_scopes());
    assert_eq!(
        changes,
        [
            "ebpf: scope peer:b (slot 1): ingress policed at 1250000 B/s, burst 65536 B (was 1 B/s, burst 1 B)",
            "ebpf: scope peer:c (slot 2): blocked (class 1:101) (was lease 99 (no volume) -> class 1:101)",
            "ebpf: destination 198.18.0.2/32 -> peer:b added",
            "ebpf: program nw_egress attached to fab0 egress, replacing bpf filter pref 1 handle 0x1 running program 4242 (other)",
            "ebpf: program nw_ingress attached to fab0 ingress (clsact, pref 1, handle 0x1)",
        ]
    );
    assert_eq!(n.maps(), reference);
    assert!(n.attached_ours());
    assert_eq!(apply(&mut dp, &three_scopes()), Vec::<String>::new());
}

/// A failed map write fails the reconcile without attaching over half-written maps; the
/// next reconcile completes.
#[test]
fn failure_is_repaired_by_the_next_reconcile() {
    let (n, mut dp) = fresh();
    n.bpf.fail_next("set_destination");
    let err = dp.reconcile(&three_scopes()).err().map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("fake set_destination: injected failure")
    );
    assert!(n.nothing_attached(), "not attached over partial maps");
    assert_eq!(n.tc.root_kind(), "htb", "tc went ahead");
    let changes = apply(&mut dp, &three_scopes());
    assert_eq!(
        changes,
        [
            "ebpf: destination 198.18.0.2/32 -> peer:b added",
            "ebpf: destination 198.18.0.3/32 -> peer:c added",
            "ebpf: program nw_egress attached to fab0 egress (clsact, pref 1, handle 0x1)",
            "ebpf: program nw_ingress attached to fab0 ingress (clsact, pref 1, handle 0x1)",
        ]
    );
}

/// An invalid desired state is rejected before anything is touched.
#[test]
fn invalid_state_changes_nothing() {
    let (n, mut dp) = fresh();
    let err = dp
        .reconcile(&state(vec![peer("b", &[], floor(0))]))
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("invalid desired state: scope egress missing (it is always present)")
    );
    assert_eq!(n.bpf.take_log(), Vec::<String>::new());
    assert_eq!(n.bpf.pin_dirs(), Vec::<PathBuf>::new());
    assert_eq!(n.tc.root_kind(), "noqueue");
}

/// remove() detaches, unpins and removes the tc state; a second remove is a no-op.
#[test]
fn remove_leaves_nothing() {
    let (n, mut dp) = fresh();
    apply(&mut dp, &three_scopes());
    dp.remove().unwrap_or_else(|e| panic!("remove: {e}"));
    assert!(n.nothing_attached());
    assert_eq!(n.bpf.pin_dirs(), Vec::<PathBuf>::new());
    assert_eq!(n.tc.root_kind(), "noqueue");
    assert_eq!(counters(&mut dp), vec![]);
    dp.remove().unwrap_or_else(|e| panic!("second remove: {e}"));
    // And a later reconcile starts from scratch.
    apply(&mut dp, &three_scopes());
    assert_eq!(n.bpf.used(&n.dir, 0), Some(500));
}

#[test]
fn default_pin_dir() {
    assert_eq!(
        EbpfDatapath::default_pin_dir("node-1"),
        Path::new("/sys/fs/bpf/nicwarden/node-1")
    );
    assert_eq!(EbpfDatapath::new("fab0", &pin_dir()).pin_dir(), pin_dir());
}

#[test]
fn config_bytes_round_trip() {
    let c = ScopeConfig {
        mode: 1,
        classid: 0x0001_0100,
        lease_id: 0x0102_0304_0506_0708,
        volume_limit: 1 << 62,
    };
    assert_eq!(ScopeConfig::from_bytes(&c.to_bytes()), c);
    assert_eq!(c.to_bytes()[..4], 1u32.to_ne_bytes());
    assert_eq!(
        c.describe(),
        "lease 72623859790382856 (no volume) -> class 1:100"
    );
}

#[test]
fn in_netns_names_the_namespace_it_cannot_enter() {
    let mut dp = EbpfDatapath::in_netns("nicwarden-no-such-ns", DEV, &pin_dir());
    let err = dp
        .reconcile(&three_scopes())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with("enter network namespace nicwarden-no-such-ns: No such file or directory"),
        "{err}"
    );
}

/// A desired state with counted peers.
fn with_peers(scopes: Vec<ScopeSpec>, peers: Vec<PeerCount>) -> DesiredState {
    DesiredState { scopes, peers }
}

#[track_caller]
fn peer_counters(dp: &mut EbpfDatapath) -> Vec<PeerCounters> {
    match dp.peer_counters() {
        Ok(c) => c,
        Err(e) => panic!("peer_counters failed: {e}"),
    }
}

/// (node, tx bytes/packets, rx bytes/packets, rx dropped bytes/packets), rendered.
fn peer_rows(c: &[PeerCounters]) -> Vec<String> {
    c.iter()
        .map(|p| {
            format!(
                "{}: tx {}/{} rx {}/{} dropped {}/{}",
                p.node,
                p.tx_bytes,
                p.tx_packets,
                p.rx_bytes,
                p.rx_packets,
                p.rx_dropped_bytes,
                p.rx_dropped_packets
            )
        })
        .collect()
}

/// The changes about peers.
fn peer_changes(changes: &[String]) -> Vec<&str> {
    changes
        .iter()
        .filter(|c| c.starts_with("ebpf: peer"))
        .map(String::as_str)
        .collect()
}

/// Per peer, whatever the scopes: tx counts only what the egress program passes (not what
/// the volume or a blocked scope drops), rx what the ingress program admits, rx_dropped what
/// it drops (blocked scope, policer); frames that are not IPv4 count nowhere.
#[test]
fn peers_count_what_passes_and_what_is_dropped() {
    let (n, mut dp) = fresh();
    apply(
        &mut dp,
        &with_peers(
            vec![
                // 1000 B of volume; policed at 12.5 MB/s, burst 64 KiB.
                egress(lease(7, 100_000_000, Some(1_000), 0)),
                // 10 000 B/s, burst 64 KiB.
                peer("b", &["198.18.0.2/32"], lease(9, 80_000, None, 0)),
                peer("c", &["198.18.0.3/32"], floor(0)),
            ],
            vec![
                counted("o", &["198.18.0.4/32"]),
                counted("b", &["198.18.0.2/32"]),
                counted("c", &["198.18.0.3/32"]),
            ],
        ),
    );
    assert_eq!(n.send(Some(B), 3, 100), 3);
    // In the egress scope: 10 fit in the volume, 5 are dropped and not counted.
    assert_eq!(n.send(Some(OTHER), 15, 100), 10);
    assert_eq!(n.send(Some(C), 4, 100), 0, "blocked");
    assert_eq!(n.send(None, 5, 60), 5, "ARP");
    assert_eq!(n.send(Some(Ipv4Addr::new(10, 9, 9, 9)), 1, 50), 0);
    // The bucket of b holds 65 of 1000 B.
    assert_eq!(n.receive(Some(B), 70, 1000, T0), 65);
    assert_eq!(n.receive(Some(C), 4, 200, T0), 0, "blocked");
    assert_eq!(n.receive(Some(OTHER), 2, 100, T0), 2);
    assert_eq!(n.receive(None, 3, 100, T0), 3, "not IPv4");
    assert_eq!(
        peer_rows(&peer_counters(&mut dp)),
        [
            "b: tx 300/3 rx 65000/65 dropped 5000/5",
            "c: tx 0/0 rx 0/0 dropped 800/4",
            "o: tx 1000/10 rx 200/2 dropped 0/0",
        ]
    );
    // The scope counters are counted as before, apart from the peers.
    let c = counters(&mut dp);
    assert_eq!(scope(&c, &Scope::Peer("c".into())).ingress.blocked_drops, 4);
    assert_eq!(scope(&c, &Scope::Egress).class.drops, 0);

    // A peer that is a prefix counts every address in it; a lease that ends changes no peer.
    apply(
        &mut dp,
        &with_peers(
            vec![egress(floor(8_000_000))],
            vec![counted("net", &["10.9.0.0/16"])],
        ),
    );
    assert_eq!(n.send(Some(Ipv4Addr::new(10, 9, 9, 9)), 2, 50), 2);
    assert_eq!(n.send(Some(Ipv4Addr::new(10, 8, 9, 9)), 2, 50), 2);
    assert_eq!(
        peer_rows(&peer_counters(&mut dp)),
        ["net: tx 100/2 rx 0/0 dropped 0/0"]
    );
    // Blocked everything: all that arrives from the peer is dropped and counted so.
    apply(
        &mut dp,
        &with_peers(
            vec![egress(floor(0))],
            vec![counted("net", &["10.9.0.0/16"])],
        ),
    );
    assert_eq!(n.receive(Some(Ipv4Addr::new(10, 9, 0, 1)), 3, 500, T0), 0);
    assert_eq!(n.send(Some(Ipv4Addr::new(10, 9, 9, 9)), 2, 50), 0);
    assert_eq!(
        peer_rows(&peer_counters(&mut dp)),
        ["net: tx 100/2 rx 0/0 dropped 1500/3"]
    );
}

/// The peer maps follow the desired peers: a peer keeps its index and its counters (also in
/// a restarted agent), a removed peer's addresses, counters and name go, a new peer starts
/// from zero at a free index, an address moves in place.
#[test]
fn peer_maps_are_diffed_and_counters_kept() {
    let (n, mut dp) = fresh();
    let scopes = || vec![egress(lease(7, 100_000_000, None, 0))];
    let first = with_peers(
        scopes(),
        vec![
            counted("b", &["198.18.0.3/32", "198.18.1.0/24"]),
            counted("a", &["198.18.0.2/32"]),
        ],
    );
    assert_eq!(
        peer_counters(&mut dp),
        [],
        "nothing before the first reconcile"
    );
    let changes = apply(&mut dp, &first);
    assert_eq!(
        peer_changes(&changes),
        [
            "ebpf: peer a counted at index 0",
            "ebpf: peer b counted at index 1",
            "ebpf: peer address 198.18.0.2/32 -> peer a (index 0) added",
            "ebpf: peer address 198.18.0.3/32 -> peer b (index 1) added",
            "ebpf: peer address 198.18.1.0/24 -> peer b (index 1) added",
        ]
    );
    assert_eq!(n.send(Some(B), 2, 100), 2);
    assert_eq!(n.send(Some(C), 1, 100), 1);
    assert_eq!(n.send(Some(Ipv4Addr::new(198, 18, 1, 7)), 1, 50), 1);
    let counted_first = [
        "a: tx 200/2 rx 0/0 dropped 0/0",
        "b: tx 150/2 rx 0/0 dropped 0/0",
    ];
    assert_eq!(peer_rows(&peer_counters(&mut dp)), counted_first);
    assert_eq!(apply(&mut dp, &first), Vec::<String>::new());

    // A restarted agent finds the peers by name: nothing to do, nothing reset.
    let mut restarted = n.datapath();
    assert_eq!(peer_counters(&mut restarted), []);
    n.bpf.take_log();
    assert_eq!(apply(&mut restarted, &first), Vec::<String>::new());
    assert_eq!(n.bpf.take_log(), Vec::<String>::new(), "no map write");
    assert_eq!(peer_rows(&peer_counters(&mut restarted)), counted_first);

    // a goes (its address moves to the new peer c), b loses its /24, d comes.
    let second = with_peers(
        scopes(),
        vec![
            counted("b", &["198.18.0.3/32"]),
            counted("c", &["198.18.0.2/32"]),
            counted("d", &["198.18.0.4/32"]),
        ],
    );
    let changes = apply(&mut restarted, &second);
    assert_eq!(
        peer_changes(&changes),
        [
            "ebpf: peer address 198.18.1.0/24 (index 1) removed",
            "ebpf: peer a (index 0) removed, its counters cleared",
            "ebpf: peer c counted at index 2",
            "ebpf: peer d counted at index 3",
            "ebpf: peer address 198.18.0.2/32 -> peer c (index 2; was index 0)",
            "ebpf: peer address 198.18.0.4/32 -> peer d (index 3) added",
        ]
    );
    assert_eq!(n.bpf.peer_node(&n.dir, 0).as_deref(), Some(""));
    assert_eq!(n.bpf.peer_stats(&n.dir, 0), Some(PeerStats::default()));
    assert_eq!(n.send(Some(B), 1, 100), 1);
    assert_eq!(
        n.send(Some(Ipv4Addr::new(198, 18, 1, 7)), 1, 50),
        1,
        "no peer's"
    );
    assert_eq!(
        peer_rows(&peer_counters(&mut restarted)),
        [
            "b: tx 150/2 rx 0/0 dropped 0/0",
            "c: tx 100/1 rx 0/0 dropped 0/0",
            "d: tx 0/0 rx 0/0 dropped 0/0",
        ]
    );
    assert_eq!(
        n.bpf
            .peer_addrs(&n.dir)
            .map(|m| m.into_iter().collect::<Vec<_>>()),
        Some(vec![
            ("198.18.0.2/32".parse().expect("net"), 2),
            ("198.18.0.3/32".parse().expect("net"), 1),
            ("198.18.0.4/32".parse().expect("net"), 3),
        ])
    );

    // a comes back: a fresh start at the lowest free index.
    let third = with_peers(
        scopes(),
        [second.peers.clone(), vec![counted("a", &["198.18.2.1/32"])]].concat(),
    );
    let changes = apply(&mut restarted, &third);
    assert_eq!(
        peer_changes(&changes),
        [
            "ebpf: peer a counted at index 0",
            "ebpf: peer address 198.18.2.1/32 -> peer a (index 0) added",
        ]
    );
    assert_eq!(
        peer_rows(&peer_counters(&mut restarted))[0],
        "a: tx 0/0 rx 0/0 dropped 0/0"
    );

    // No peers: everything cleared.
    let changes = apply(&mut restarted, &with_peers(scopes(), vec![]));
    assert_eq!(peer_changes(&changes).len(), 8, "{changes:#?}");
    assert_eq!(n.bpf.peer_addrs(&n.dir), Some(Default::default()));
    for i in 0..4 {
        assert_eq!(n.bpf.peer_node(&n.dir, i).as_deref(), Some(""));
        assert_eq!(n.bpf.peer_stats(&n.dir, i), Some(PeerStats::default()));
    }
    assert_eq!(peer_counters(&mut restarted), []);
}

/// A failed peer write is repaired by the next reconcile; meanwhile the counters of the
/// installed peers are still read (by name), the others read zero. A name erased behind the
/// datapath's back makes that peer start again.
#[test]
fn peer_failures_and_tampering_are_repaired() {
    let (n, mut dp) = fresh();
    let desired = with_peers(
        vec![egress(lease(7, 100_000_000, None, 0))],
        vec![counted("a", &["198.18.0.2/32"])],
    );
    apply(&mut dp, &desired);
    assert_eq!(n.send(Some(B), 2, 100), 2);
    let more = with_peers(
        desired.scopes.clone(),
        vec![
            counted("a", &["198.18.0.2/32"]),
            counted("b", &["198.18.0.3/32"]),
        ],
    );
    n.bpf.fail_next("set_peer_addr");
    let err = dp.reconcile(&more).expect_err("injected failure");
    assert_eq!(err.to_string(), "fake set_peer_addr: injected failure");
    assert_eq!(n.send(Some(C), 1, 100), 1);
    assert_eq!(
        peer_rows(&peer_counters(&mut dp)),
        [
            "a: tx 200/2 rx 0/0 dropped 0/0",
            "b: tx 0/0 rx 0/0 dropped 0/0",
        ]
    );
    let changes = apply(&mut dp, &more);
    assert_eq!(
        peer_changes(&changes),
        ["ebpf: peer address 198.18.0.3/32 -> peer b (index 1) added"]
    );
    assert_eq!(n.send(Some(C), 1, 100), 1);
    assert_eq!(
        peer_rows(&peer_counters(&mut dp)),
        [
            "a: tx 200/2 rx 0/0 dropped 0/0",
            "b: tx 100/1 rx 0/0 dropped 0/0",
        ]
    );

    // Someone erases b's name: b is counted again from zero, at the index it had.
    n.bpf.tamper_peer_node(&n.dir, 1, "");
    let changes = apply(&mut dp, &more);
    assert_eq!(peer_changes(&changes), ["ebpf: peer b counted at index 1"]);
    assert_eq!(
        peer_rows(&peer_counters(&mut dp))[1],
        "b: tx 0/0 rx 0/0 dropped 0/0"
    );
    // A foreign name: cleared.
    n.bpf.tamper_peer_node(&n.dir, 9, "intruder");
    let changes = apply(&mut dp, &more);
    assert_eq!(
        peer_changes(&changes),
        ["ebpf: peer intruder (index 9) removed, its counters cleared"]
    );
    assert_eq!(apply(&mut dp, &more), Vec::<String>::new());
}

#[test]
fn peer_stats_and_names_round_trip() {
    let s = PeerStats {
        tx_bytes: 1,
        tx_packets: 2,
        rx_bytes: 3,
        rx_packets: 4,
        rx_dropped_bytes: 5,
        rx_dropped_packets: 6,
    };
    assert_eq!(PeerStats::from_array(s.to_array()), s);
    let mut sum = s;
    sum.add(&s);
    assert_eq!(sum.to_array(), [2, 4, 6, 8, 10, 12]);
    let name = "node-17.rack-3";
    let b = super::maps::peer_name_to_bytes(name);
    assert_eq!(b.len(), 64);
    assert_eq!(&b[..name.len()], name.as_bytes());
    assert!(b[name.len()..].iter().all(|c| *c == 0));
    assert_eq!(super::maps::peer_name_from_bytes(&b), name);
    assert_eq!(super::maps::peer_name_from_bytes(&[0; 64]), "");
    let long = "x".repeat(80);
    assert_eq!(
        super::maps::peer_name_from_bytes(&super::maps::peer_name_to_bytes(&long)),
        "x".repeat(63)
    );
}
