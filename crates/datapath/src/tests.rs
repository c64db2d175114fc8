//! Reconcile logic against the in-memory kernel ([`crate::fake::FakeKernel`]).

use crate::fake::fixtures::{egress, floor, lease, peer};
use crate::fake::FakeKernel;
use crate::test_support::apply;
use crate::{
    ClassStats, Datapath, DatapathError, DesiredState, IngressStats, LeaseCounters, LinuxDatapath,
    ScopeCounters, ScopeEnforce, ScopeSpec,
};
use nicwarden_lease::{LeaseId, Scope};

const DEV: &str = "fab0";

fn state(scopes: Vec<ScopeSpec>) -> DesiredState {
    DesiredState {
        scopes,
        peers: Vec::new(),
    }
}

/// Egress lease 7 with a volume, peer b on lease 9 without one, peer c blocked.
fn three_scopes() -> DesiredState {
    three_scopes_with(lease(7, 100_000_000, Some(1_000_000), 500), floor(0))
}

/// The scopes of [`three_scopes`] with egress enforced by `egress_enforce` and peer c by `c`.
fn three_scopes_with(egress_enforce: ScopeEnforce, c: ScopeEnforce) -> DesiredState {
    state(vec![
        egress(egress_enforce),
        peer("b", &["198.18.0.2/32"], lease(9, 10_000_000, None, 0)),
        peer("c", &["198.18.0.3/32"], c),
    ])
}

// The changes a first install of [`three_scopes`] reports, in this order (with the root
// qdisc's line between the nft ones and the classes).
/// The nft changes of a first install of [`three_scopes`].
const INSTALL_NFT: [&str; 3] = [
    "nft: table inet nicwarden created (2 quotas, 5 rules)",
    "nft: quota q9 (peer:b) added: over 4611686018427387904 bytes, used from 0",
    "nft: quota q7 (egress) added: over 1000000 bytes, used from 500",
];
/// The classes a first install of [`three_scopes`] adds, in order.
const INSTALL_CLASSES: [&str; 5] = [
    "tc: class 1:2 (control) added: rate 1000000 bit/s, burst 65536 B, quantum 12500, leaf pfifo limit 100",
    "tc: class 1:3 (drop) added: rate 8 bit/s, burst 10 B, quantum 1514, leaf pfifo limit 0 (drops everything)",
    "tc: class 1:10 (egress) added: rate 100000000 bit/s, burst 65536 B, quantum 200000, leaf pfifo limit 1000",
    "tc: class 1:100 (peer:b) added: rate 10000000 bit/s, burst 65536 B, quantum 125000, leaf pfifo limit 1000",
    "tc: class 1:101 (peer:c) added: rate 8 bit/s, burst 10 B, quantum 1514, leaf pfifo limit 0 (drops everything)",
];
/// The filters a first install of [`three_scopes`] adds, in order.
const INSTALL_FILTERS: [&str; 5] = [
    "tc: filter pref 1 ::1 (control) arp match u32 0 0 -> 1:2 added",
    "tc: filter pref 2 ::1 (control) 0x88b5 match u32 0 0 -> 1:2 added",
    "tc: filter pref 100 ::1 (peer:b) ip match ip dst 198.18.0.2/32 -> 1:100 added",
    "tc: filter pref 101 ::1 (peer:c) ip match ip dst 198.18.0.3/32 -> 1:101 added",
    "tc: filter pref 1000 ::1 (egress) all match u32 0 0 -> 1:10 added",
];

fn fresh() -> (FakeKernel, LinuxDatapath) {
    let k = FakeKernel::new(DEV);
    let dp = k.datapath();
    (k, dp)
}

/// First install on an empty kernel: the exact tc commands and nft script.
#[test]
fn renders_first_install() {
    #[track_caller]
    fn check(desired: DesiredState, tc: &[&str], nft: &str) {
        let (k, mut dp) = fresh();
        apply(&mut dp, &desired);
        let log = k.take_log();
        let (scripts, cmds): (Vec<String>, Vec<String>) =
            log.into_iter().partition(|l| l.contains('\n'));
        assert_eq!(cmds, tc);
        assert_eq!(scripts, [nft]);
    }

    let root = "qdisc replace dev fab0 root handle 1: htb default 3 direct_qlen 0";
    let fixed = [
        "class add dev fab0 parent 1: classid 1:2 htb rate 1000000bit ceil 1000000bit burst 65536 cburst 65536 quantum 12500",
        "qdisc replace dev fab0 parent 1:2 handle 2: pfifo limit 100",
        "class add dev fab0 parent 1: classid 1:3 htb rate 8bit ceil 8bit burst 10 cburst 10 quantum 1514",
        "qdisc replace dev fab0 parent 1:3 handle 3: pfifo limit 0",
    ];
    let arp = "filter add dev fab0 parent 1: protocol arp pref 1 handle ::1 u32 match u32 0 0 classid 1:2";
    let probe = "filter add dev fab0 parent 1: protocol 0x88b5 pref 2 handle ::1 u32 match u32 0 0 classid 1:2";
    let egress_filter = "filter add dev fab0 parent 1: protocol all pref 1000 handle ::1 u32 match u32 0 0 classid 1:10";
    let with = |middle: &[&'static str], filters: &[&'static str]| -> Vec<&'static str> {
        let mut v = vec![root];
        v.extend(fixed);
        v.extend(middle);
        v.push(arp);
        v.push(probe);
        v.extend(filters);
        v.push(egress_filter);
        v
    };

    // Everything blocked: egress at floor 0, dropped by nft and by tc.
    check(
        state(vec![egress(floor(0))]),
        &with(
            &[
                "class add dev fab0 parent 1: classid 1:10 htb rate 8bit ceil 8bit burst 10 cburst 10 quantum 1514",
                "qdisc replace dev fab0 parent 1:10 handle 10: pfifo limit 0",
            ],
            &[],
        ),
        "add table inet nicwarden
delete table inet nicwarden
table inet nicwarden {
\tcounter b10 { packets 0 bytes 0 }
\tchain postrouting {
\t\ttype filter hook postrouting priority 0; policy accept;
\t\toifname \"fab0\" counter name \"b10\" drop
\t}
}
",
    );

    // Egress at a non-zero floor: shaped, nothing counted.
    check(
        state(vec![egress(floor(2_000_000))]),
        &with(
            &[
                "class add dev fab0 parent 1: classid 1:10 htb rate 2000000bit ceil 2000000bit burst 65536 cburst 65536 quantum 25000",
                "qdisc replace dev fab0 parent 1:10 handle 10: pfifo limit 1000",
            ],
            &[],
        ),
        "add table inet nicwarden
delete table inet nicwarden
table inet nicwarden {
\tchain postrouting {
\t\ttype filter hook postrouting priority 0; policy accept;
\t}
}
",
    );

    // Three scopes: leases with and without volume, a blocked peer.
    check(
        three_scopes(),
        &with(
            &[
                "class add dev fab0 parent 1: classid 1:10 htb rate 100000000bit ceil 100000000bit burst 65536 cburst 65536 quantum 200000",
                "qdisc replace dev fab0 parent 1:10 handle 10: pfifo limit 1000",
                "class add dev fab0 parent 1: classid 1:100 htb rate 10000000bit ceil 10000000bit burst 65536 cburst 65536 quantum 125000",
                "qdisc replace dev fab0 parent 1:100 handle 100: pfifo limit 1000",
                "class add dev fab0 parent 1: classid 1:101 htb rate 8bit ceil 8bit burst 10 cburst 10 quantum 1514",
                "qdisc replace dev fab0 parent 1:101 handle 101: pfifo limit 0",
            ],
            &[
                "filter add dev fab0 parent 1: protocol ip pref 100 handle ::1 u32 match ip dst 198.18.0.2/32 classid 1:100",
                "filter add dev fab0 parent 1: protocol ip pref 101 handle ::1 u32 match ip dst 198.18.0.3/32 classid 1:101",
            ],
        ),
        "add table inet nicwarden
delete table inet nicwarden
table inet nicwarden {
\tquota q9 { over 4611686018427387904 bytes used 0 bytes }
\tquota q7 { over 1000000 bytes used 500 bytes }
\tcounter d9 { packets 0 bytes 0 }
\tcounter p9 { packets 0 bytes 0 }
\tcounter b101 { packets 0 bytes 0 }
\tcounter d7 { packets 0 bytes 0 }
\tcounter p7 { packets 0 bytes 0 }
\tchain postrouting {
\t\ttype filter hook postrouting priority 0; policy accept;
\t\toifname \"fab0\" ip daddr { 198.18.0.2/32 } quota name \"q9\" counter name \"d9\" drop
\t\toifname \"fab0\" ip daddr { 198.18.0.2/32 } counter name \"p9\" accept
\t\toifname \"fab0\" ip daddr { 198.18.0.3/32 } counter name \"b101\" drop
\t\toifname \"fab0\" quota name \"q7\" counter name \"d7\" drop
\t\toifname \"fab0\" counter name \"p7\" accept
\t}
}
",
    );

    // A peer with several prefixes (one filter each, aggregated), a start above the volume
    // (clamped: the kernel refuses used > over), an explicit burst.
    check(
        state(vec![
            egress(floor(0)),
            peer(
                "a",
                &["198.19.0.0/24", "198.19.1.0/24", "198.19.8.8/32"],
                ScopeEnforce::Lease {
                    lease: LeaseId(3),
                    rate_bps: 1_000_000_000,
                    burst_bytes: 1_000_000,
                    volume: Some(10_000),
                    start_used_bytes: 50_000,
                },
            ),
        ]),
        &with(
            &[
                "class add dev fab0 parent 1: classid 1:10 htb rate 8bit ceil 8bit burst 10 cburst 10 quantum 1514",
                "qdisc replace dev fab0 parent 1:10 handle 10: pfifo limit 0",
                "class add dev fab0 parent 1: classid 1:100 htb rate 1000000000bit ceil 1000000000bit burst 1000000 cburst 1000000 quantum 200000",
                "qdisc replace dev fab0 parent 1:100 handle 100: pfifo limit 1000",
            ],
            &[
                "filter add dev fab0 parent 1: protocol ip pref 100 handle ::1 u32 match ip dst 198.19.0.0/23 classid 1:100",
                "filter add dev fab0 parent 1: protocol ip pref 100 handle ::2 u32 match ip dst 198.19.8.8/32 classid 1:100",
            ],
        ),
        "add table inet nicwarden
delete table inet nicwarden
table inet nicwarden {
\tquota q3 { over 10000 bytes used 10000 bytes }
\tcounter d3 { packets 0 bytes 0 }
\tcounter p3 { packets 0 bytes 0 }
\tcounter b10 { packets 0 bytes 0 }
\tchain postrouting {
\t\ttype filter hook postrouting priority 0; policy accept;
\t\toifname \"fab0\" ip daddr { 198.19.0.0/23, 198.19.8.8/32 } quota name \"q3\" counter name \"d3\" drop
\t\toifname \"fab0\" ip daddr { 198.19.0.0/23, 198.19.8.8/32 } counter name \"p3\" accept
\t\toifname \"fab0\" counter name \"b10\" drop
\t}
}
",
    );
}

#[test]
fn first_install_reports_changes() {
    let (_k, mut dp) = fresh();
    let changes = apply(&mut dp, &three_scopes());
    assert_eq!(
        changes,
        [
            &INSTALL_NFT[..],
            &["tc: root qdisc htb 1: default 3 installed on fab0 (was noqueue 0:)"],
            &INSTALL_CLASSES,
            &INSTALL_FILTERS
        ]
        .concat()
    );
}

/// Re-applying changes nothing, in the same process and in a restarted one (no memory: the
/// kernel's rounded text rates are compared with a tolerance).
#[test]
fn reapply_is_a_no_op() {
    #[track_caller]
    fn check(desired: DesiredState) {
        let (k, mut dp) = fresh();
        apply(&mut dp, &desired);
        k.add_leaf_stats(0x10, 1000, 10, 1);
        k.take_log();
        assert_eq!(apply(&mut dp, &desired), Vec::<String>::new());
        let mut restarted = k.datapath();
        assert_eq!(apply(&mut restarted, &desired), Vec::<String>::new());
        assert_eq!(k.take_log(), Vec::<String>::new());
        assert_eq!(k.leaf_stats(0x10), Some((1000, 10, 1)));
    }
    check(three_scopes());
    check(state(vec![egress(floor(0))]));
    // Rates the kernel prints rounded ("123456Kbit") and odd ones (kept in bytes/s).
    check(state(vec![egress(lease(1, 123_456_789, None, 0))]));
    check(state(vec![egress(lease(1, 999_999, Some(5), 0))]));
    check(state(vec![egress(lease(1, 4_000_000_000_000, None, 0))]));
    check(state(vec![
        egress(floor(8)),
        peer("x", &[], lease(2, 8, None, 0)),
    ]));
}

/// A change touches only what differs, in place: counters and queues are kept.
#[test]
fn changes_only_what_differs() {
    #[track_caller]
    fn check(before: DesiredState, after: DesiredState, changes: &[&str], cmds: &[&str]) {
        let (k, mut dp) = fresh();
        apply(&mut dp, &before);
        for minor in k.class_minors() {
            k.add_leaf_stats(minor, 100, 1, 0);
        }
        k.take_log();
        assert_eq!(apply(&mut dp, &after), changes);
        assert_eq!(k.take_log(), cmds);
        // Classes that stayed kept their counters.
        for minor in k.class_minors() {
            if before_has(&before, minor) {
                assert_eq!(k.leaf_stats(minor).map(|s| s.0), Some(100), "1:{minor:x}");
            }
        }
        assert_eq!(apply(&mut dp, &after), Vec::<String>::new());
    }
    fn before_has(d: &DesiredState, minor: u16) -> bool {
        crate::plan::Plan::build(DEV, d).is_ok_and(|p| p.class(minor).is_some())
    }

    // Rate change of one lease.
    check(
        three_scopes(),
        three_scopes_with(lease(7, 200_000_000, Some(1_000_000), 500), floor(0)),
        &["tc: class 1:10 (egress) rate 100000000 -> 200000000 bit/s, burst 65536 -> 125000 B"],
        &["class change dev fab0 parent 1: classid 1:10 htb rate 200000000bit ceil 200000000bit burst 125000 cburst 125000 quantum 200000"],
    );
    // A change below the kernel's display resolution is still applied (memory of last plan).
    check(
        state(vec![egress(lease(1, 123_456_000, None, 0))]),
        state(vec![egress(lease(1, 123_456_800, None, 0))]),
        &["tc: class 1:10 (egress) rate 123456000 -> 123456800 bit/s"],
        &["class change dev fab0 parent 1: classid 1:10 htb rate 123456800bit ceil 123456800bit burst 77160 cburst 77160 quantum 200000"],
    );
    // Lease lapses to the blocked floor: class closed, leaf drops all, quota removed.
    check(
        state(vec![egress(lease(7, 100_000_000, Some(1_000_000), 0))]),
        state(vec![egress(floor(0))]),
        &[
            "nft: quota q7 removed (used 0 of 1000000 bytes)",
            "nft: chain postrouting rewritten (2 -> 1 rules)",
            "tc: class 1:10 (egress) rate 100000000 -> 8 bit/s, burst 65536 -> 10 B, quantum 200000 -> 1514",
            "tc: class 1:10 (egress) leaf pfifo 10: limit 1000 -> pfifo 10: limit 0",
        ],
        &[
            "add table inet nicwarden\ndelete table inet nicwarden\ntable inet nicwarden {\n\tcounter b10 { packets 0 bytes 0 }\n\tchain postrouting {\n\t\ttype filter hook postrouting priority 0; policy accept;\n\t\toifname \"fab0\" counter name \"b10\" drop\n\t}\n}\n",
            "class change dev fab0 parent 1: classid 1:10 htb rate 8bit ceil 8bit burst 10 cburst 10 quantum 1514",
            "qdisc replace dev fab0 parent 1:10 handle 10: pfifo limit 0",
        ],
    );
    // A peer's prefixes change: its filters are replaced / added / removed by handle.
    check(
        state(vec![
            egress(floor(0)),
            peer("b", &["198.18.0.2/32", "198.18.5.0/24"], floor(0)),
        ]),
        state(vec![
            egress(floor(0)),
            peer("b", &["198.18.0.9/32"], floor(0)),
        ]),
        &[
            "nft: chain postrouting rewritten (2 -> 2 rules)",
            "tc: filter pref 100 802::2 removed",
            "tc: filter pref 100 ::1 (peer:b) ip match ip dst 198.18.0.9/32 -> 1:100 replaced",
        ],
        &[
            "add table inet nicwarden\ndelete table inet nicwarden\ntable inet nicwarden {\n\tcounter b100 { packets 0 bytes 0 }\n\tcounter b10 { packets 0 bytes 0 }\n\tchain postrouting {\n\t\ttype filter hook postrouting priority 0; policy accept;\n\t\toifname \"fab0\" ip daddr { 198.18.0.9/32 } counter name \"b100\" drop\n\t\toifname \"fab0\" counter name \"b10\" drop\n\t}\n}\n",
            "filter del dev fab0 parent 1: protocol ip pref 100 handle 802::2 u32",
            "filter replace dev fab0 parent 1: protocol ip pref 100 handle 802::1 u32 match ip dst 198.18.0.9/32 classid 1:100",
        ],
    );
    // A peer scope goes away: its filters go before its class (the kernel refuses otherwise).
    check(
        state(vec![
            egress(floor(0)),
            peer("b", &["198.18.0.2/32"], floor(0)),
            peer("c", &["198.18.0.3/32"], floor(0)),
        ]),
        state(vec![egress(floor(0)), peer("b", &["198.18.0.2/32"], floor(0))]),
        &[
            "nft: chain postrouting rewritten (3 -> 2 rules)",
            "tc: filter pref 101 (ip u32, 1 filters) removed",
            "tc: class 1:101 removed",
        ],
        &[
            "add table inet nicwarden\ndelete table inet nicwarden\ntable inet nicwarden {\n\tcounter b100 { packets 0 bytes 0 }\n\tcounter b10 { packets 0 bytes 0 }\n\tchain postrouting {\n\t\ttype filter hook postrouting priority 0; policy accept;\n\t\toifname \"fab0\" ip daddr { 198.18.0.2/32 } counter name \"b100\" drop\n\t\toifname \"fab0\" counter name \"b10\" drop\n\t}\n}\n",
            "filter del dev fab0 parent 1: pref 101",
            "class del dev fab0 classid 1:101",
        ],
    );
}

/// Rewriting the nft table carries every continuing quota's `used` and counter over.
#[test]
fn quota_usage_survives_table_rewrites() {
    let (k, mut dp) = fresh();
    apply(&mut dp, &three_scopes());
    k.add_quota_used("q7", 40_000);
    k.add_counter("p7", 30, 40_000);
    k.add_counter("d9", 2, 100);

    // Peer c gets a lease: the table is rewritten.
    let c_lease = lease(11, 1_000_000, Some(2_000), 1_500);
    let next = three_scopes_with(lease(7, 100_000_000, Some(1_000_000), 500), c_lease.clone());
    let changes = apply(&mut dp, &next);
    assert_eq!(
        changes,
        [
            "nft: quota q11 (peer:c) added: over 2000 bytes, used from 1500",
            "nft: chain postrouting rewritten (5 -> 6 rules)",
            "tc: class 1:101 (peer:c) rate 8 -> 1000000 bit/s, burst 10 -> 65536 B, quantum 1514 -> 12500",
            "tc: class 1:101 (peer:c) leaf pfifo 101: limit 0 -> pfifo 101: limit 1000",
        ]
    );
    assert_eq!(k.quota("q7"), Some((1_000_000, 40_500)));
    assert_eq!(k.quota("q11"), Some((2_000, 1_500)));
    assert_eq!(k.counter("p7"), Some((30, 40_000)));
    assert_eq!(k.counter("d9"), Some((2, 100)));

    // A volume raise keeps the usage.
    let raised = three_scopes_with(lease(7, 100_000_000, Some(5_000_000), 500), c_lease.clone());
    assert_eq!(
        apply(&mut dp, &raised),
        ["nft: quota q7 (egress) over 1000000 -> 5000000 bytes (used 40500 carried over)"]
    );
    assert_eq!(k.quota("q7"), Some((5_000_000, 40_500)));

    // The controller recorded more than this kernel has (e.g. the node rebooted and the table
    // was rebuilt from an older record): never count below the controller's record.
    let recorded = three_scopes_with(lease(7, 100_000_000, Some(5_000_000), 90_000), c_lease);
    assert_eq!(
        apply(&mut dp, &recorded),
        ["nft: quota q7 (egress) used 40500 -> 90000 bytes (controller's record)"]
    );
    assert_eq!(k.quota("q7"), Some((5_000_000, 90_000)));
    assert_eq!(apply(&mut dp, &recorded), Vec::<String>::new());
}

#[test]
fn counters_per_scope() {
    let (k, mut dp) = fresh();
    assert_eq!(dp.counters().ok(), Some(vec![]));
    apply(&mut dp, &three_scopes());
    k.add_leaf_stats(0x10, 5_000, 5, 0);
    k.add_leaf_stats(0x101, 0, 0, 9);
    // The quota counts dropped packets too: used runs past the volume.
    k.add_quota_used("q7", 1_200_000);
    k.add_counter("p7", 900, 999_000);
    k.add_counter("d7", 4, 4_000);
    k.add_quota_used("q9", 777);
    k.add_counter("p9", 3, 777);
    let got = dp.counters().expect("counters");
    assert_eq!(
        got,
        [
            ScopeCounters {
                scope: Scope::Egress,
                class: ClassStats {
                    bytes: 5_000,
                    packets: 5,
                    drops: 0
                },
                lease: Some(LeaseCounters {
                    lease: LeaseId(7),
                    used_bytes: 1_000_000,
                    passed_packets: 900,
                    volume_drops: 4,
                    exhausted: true
                }),
                ingress: IngressStats::default(),
            },
            ScopeCounters {
                scope: Scope::Peer("b".into()),
                class: ClassStats::default(),
                lease: Some(LeaseCounters {
                    lease: LeaseId(9),
                    used_bytes: 777,
                    passed_packets: 3,
                    volume_drops: 0,
                    exhausted: false
                }),
                ingress: IngressStats::default(),
            },
            ScopeCounters {
                scope: Scope::Peer("c".into()),
                class: ClassStats {
                    bytes: 0,
                    packets: 0,
                    drops: 9
                },
                lease: None,
                ingress: IngressStats::default(),
            },
        ]
    );
    // An exhausted lease stays exhausted through a table rewrite (used is clamped to over).
    let more = three_scopes_with(
        lease(7, 100_000_000, Some(1_000_000), 500),
        lease(11, 1_000_000, None, 0),
    );
    apply(&mut dp, &more);
    assert_eq!(k.quota("q7"), Some((1_000_000, 1_000_000)));
    let egress = dp.counters().expect("counters").remove(0);
    assert_eq!(
        egress.lease.map(|l| (l.used_bytes, l.exhausted)),
        Some((1_000_000, true))
    );
}

/// Whatever was lost (a crash mid-batch, tampering), the next reconcile restores it.
#[test]
fn repairs_partial_state() {
    let reference = {
        let (k, mut dp) = fresh();
        apply(&mut dp, &three_scopes());
        snapshot(&k)
    };
    #[track_caller]
    fn check(break_it: impl Fn(&FakeKernel, &mut LinuxDatapath), expect: &[&str], reference: &str) {
        let (k, mut dp) = fresh();
        break_it(&k, &mut dp);
        let changes = apply(&mut dp, &three_scopes());
        assert_eq!(changes, expect);
        assert_eq!(snapshot(&k), reference);
        assert_eq!(apply(&mut dp, &three_scopes()), Vec::<String>::new());
    }

    // A class (and its leaf) deleted behind our back; its filter stays and, meanwhile, sends
    // its traffic to the default drop class.
    check(
        |k, dp| {
            apply(dp, &three_scopes());
            k.delete_class(0x100);
        },
        &["tc: class 1:100 (peer:b) added: rate 10000000 bit/s, burst 65536 B, quantum 125000, leaf pfifo limit 1000"],
        &reference,
    );
    // A filter deleted.
    check(
        |k, dp| {
            apply(dp, &three_scopes());
            k.delete_filter(1000, 1);
        },
        &["tc: filter pref 1000 ::1 (egress) all match u32 0 0 -> 1:10 added"],
        &reference,
    );
    // The nft table deleted: re-created, quotas start from the controller's record.
    check(
        |k, dp| {
            apply(dp, &three_scopes());
            k.delete_table();
        },
        &INSTALL_NFT,
        &reference,
    );
    // A crash in the middle of the first tc batch (after the 8th command).
    check(
        |k, dp| {
            k.fail_next_tc_batch_at(9);
            let err = dp.reconcile(&three_scopes()).err().map(|e| e.to_string());
            assert_eq!(
                err.as_deref(),
                Some("apply tc batch (command 9 of 16: `qdisc replace dev fab0 parent 1:100 handle 100: pfifo limit 1000`; the ones before it applied): `tc -batch -` failed (exit status 1): injected failure")
            );
        },
        &[
            &[
                "tc: class 1:100 (peer:b) leaf pfifo 8004: limit 1000 -> pfifo 100: limit 1000",
                "tc: class 1:101 (peer:c) added: rate 8 bit/s, burst 10 B, quantum 1514, leaf pfifo limit 0 (drops everything)",
            ],
            &INSTALL_FILTERS[..],
        ]
        .concat(),
        &reference,
    );
    // nft failed once: tc was still applied, the error reported, nft done next time.
    check(
        |k, dp| {
            k.fail_next_nft_apply();
            let err = dp.reconcile(&three_scopes()).err().map(|e| e.to_string());
            assert_eq!(
                err.as_deref(),
                Some("apply nft script to table inet nicwarden: `nft -f -` failed (exit status 1): injected failure")
            );
            assert_eq!(k.root_kind(), "htb");
        },
        &INSTALL_NFT,
        &reference,
    );
    // A root qdisc that is not ours (wrong default): re-created.
    check(
        |k, _| {
            let mut tc = k.tc_ops();
            tc.batch(&["qdisc replace dev fab0 root handle 1: htb default 10".to_string()])
                .expect("set up");
        },
        &[
            &INSTALL_NFT[..],
            &["tc: root qdisc htb 1: on fab0 re-created (had default Some(16), direct_qlen Some(1000); class counters reset)"],
            &INSTALL_CLASSES,
            &INSTALL_FILTERS,
        ]
        .concat(),
        &reference,
    );
    // A class changed behind our back is changed back, even by a process that remembers
    // having set it (the kernel text is checked too).
    check(
        |k, dp| {
            apply(dp, &three_scopes());
            let mut tc = k.tc_ops();
            tc.batch(&["class change dev fab0 parent 1: classid 1:10 htb rate 900000000bit ceil 900000000bit burst 65536 cburst 65536 quantum 200000".to_string()])
                .expect("tamper");
        },
        &["tc: class 1:10 (egress) re-asserted rate 100000000 bit/s, burst 65536 B, quantum 200000, leaf pfifo limit 1000"],
        &reference,
    );
}

/// Kernel state as the tools print it, minus what legitimately differs between two runs
/// (filter hash table ids).
fn snapshot(k: &FakeKernel) -> String {
    let mut tc = k.tc_ops();
    let mut nft = k.nft_ops();
    let qdiscs = tc.qdiscs_json(DEV).unwrap_or_default();
    let classes = tc.classes_text(DEV).unwrap_or_default();
    let filters = crate::tc::parse_filters(&tc.filters_json(DEV).unwrap_or_default())
        .map(|prefs| {
            prefs
                .iter()
                .flat_map(|(p, kp)| {
                    kp.nodes.iter().map(move |(n, f)| {
                        format!("{p} {} {n} {:?} {:?}", kp.protocol, f.class_minor, f.key)
                    })
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    let table = nft.list_table_json().ok().flatten().unwrap_or_default();
    format!("{qdiscs}\n{classes}\n{filters}\n{table}")
}

#[test]
fn invalid_state_changes_nothing() {
    let (k, mut dp) = fresh();
    apply(&mut dp, &three_scopes());
    k.take_log();
    let bad = state(vec![
        egress(floor(0)),
        peer("b", &["198.18.0.0/16"], floor(0)),
        peer("c", &["198.18.0.3/32"], floor(0)),
    ]);
    let err = dp.reconcile(&bad).err().map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("invalid desired state: destination 198.18.0.3/32 of scope peer:c overlaps 198.18.0.0/16 of scope peer:b")
    );
    assert_eq!(k.take_log(), Vec::<String>::new());
    // The previous state is still what counters report on.
    assert_eq!(dp.counters().map(|c| c.len()).ok(), Some(3));
}

#[test]
fn adding_a_peer_renumbers_the_ones_after_it() {
    let (k, mut dp) = fresh();
    apply(
        &mut dp,
        &state(vec![
            egress(floor(0)),
            peer("m", &["198.18.0.3/32"], floor(1_000_000)),
        ]),
    );
    let changes = apply(
        &mut dp,
        &state(vec![
            egress(floor(0)),
            peer("a", &["198.18.0.2/32"], floor(0)),
            peer("m", &["198.18.0.3/32"], floor(1_000_000)),
        ]),
    );
    assert_eq!(
        changes,
        [
            "nft: chain postrouting rewritten (2 -> 3 rules)",
            "tc: class 1:100 (peer:a) rate 1000000 -> 8 bit/s, burst 65536 -> 10 B, quantum 12500 -> 1514",
            "tc: class 1:100 (peer:a) leaf pfifo 100: limit 1000 -> pfifo 100: limit 0",
            "tc: class 1:101 (peer:m) added: rate 1000000 bit/s, burst 65536 B, quantum 12500, leaf pfifo limit 1000",
            "tc: filter pref 100 ::1 (peer:a) ip match ip dst 198.18.0.2/32 -> 1:100 replaced",
            "tc: filter pref 101 ::1 (peer:m) ip match ip dst 198.18.0.3/32 -> 1:101 added",
        ]
    );
    assert_eq!(k.class_rate(0x101), Some(1_000_000));
    assert_eq!(k.leaf_limit(0x100), Some(0));
}

#[test]
fn remove_leaves_nothing() {
    let (k, mut dp) = fresh();
    apply(&mut dp, &three_scopes());
    dp.remove().expect("remove");
    assert_eq!(k.root_kind(), "noqueue");
    assert!(!k.has_table());
    assert_eq!(k.filter_counts(), vec![]);
    // Idempotent, and a later reconcile installs everything again.
    dp.remove().expect("remove again");
    assert_eq!(dp.counters().ok(), Some(vec![]));
    assert_eq!(apply(&mut dp, &three_scopes()).len(), 14);
    assert_eq!(k.rule_count(), 5);
}

#[test]
fn unknown_device_is_reported_with_its_name() {
    let k = FakeKernel::new(DEV);
    let mut dp = LinuxDatapath::with_ops("fab9", k.tc_ops(), k.nft_ops());
    let err = dp.reconcile(&three_scopes()).err().map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("list tc objects of fab9: `tc show dev fab9` failed (exit status 1): Cannot find device \"fab9\"")
    );
}

#[test]
fn desired_state_serde_round_trip() {
    let d = three_scopes();
    let json = serde_json::to_string(&d).expect("serialize");
    let back: DesiredState = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, d);
}

/// A desired state written before peers existed still reads (no peers); one with peers
/// round-trips.
#[test]
fn desired_state_peers_default_to_none() {
    let mut old = serde_json::to_value(three_scopes()).expect("serialize");
    old.as_object_mut().map(|o| o.remove("peers"));
    assert!(old.get("scopes").is_some() && old.get("peers").is_none());
    let d: DesiredState = serde_json::from_value(old).expect("deserialize");
    assert_eq!(d.peers, []);
    let d = DesiredState {
        peers: vec![crate::fake::fixtures::counted("b", &["198.18.0.2/32"])],
        ..three_scopes()
    };
    let json = serde_json::to_string(&d).expect("serialize");
    let back: DesiredState = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, d);
}

/// The tc backend validates the peers like the eBPF one, and says it does not count them.
#[test]
fn tc_backend_has_no_peer_counters() {
    let k = FakeKernel::new("fab0");
    let mut dp = k.datapath();
    let bad = DesiredState {
        peers: vec![crate::fake::fixtures::counted("b", &[])],
        ..three_scopes()
    };
    let err = dp.reconcile(&bad).expect_err("invalid").to_string();
    assert_eq!(err, "invalid desired state: counted peer b: no address");
    let good = DesiredState {
        peers: vec![crate::fake::fixtures::counted("b", &["198.18.0.2/32"])],
        ..three_scopes()
    };
    apply(&mut dp, &good);
    let err = dp.peer_counters().expect_err("tc counts no peers");
    assert!(matches!(err, DatapathError::Unavailable(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "datapath unavailable: per-peer byte counters need the ebpf backend"
    );
}
